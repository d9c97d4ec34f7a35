//! The copy-offload seam: how the copy engine hands one batched offload
//! command to a leaf and learns what became of it.
//!
//! A leaf that can take part in a copy offload advertises it in
//! [`DeviceInfo::copy_offloads`](crate::DeviceInfo::copy_offloads) and opens
//! a [`CopyChannel`] through
//! [`BlockDevice::open_copy_channel`](crate::BlockDevice::open_copy_channel).
//! The channel is opened on the
//! leaf that executes the command, which for every protocol here is the
//! destination:
//!
//! | protocol | [`OffloadSource`] | ranges |
//! | --- | --- | --- |
//! | NVMe Copy (0x19) | [`OffloadSource::SameDevice`] | source LBAs; destinations continue one another (one SDLBA per command); at most MSRC+1 ranges of MSSRL blocks, MCL blocks in all |
//! | EXTENDED COPY LID1 | [`OffloadSource::Designator`] (the source LUN's NAA, for its identification CSCD descriptor) | one block-to-block segment each |
//! | WRITE USING TOKEN | [`OffloadSource::RodToken`] | `src` is the offset into the ROD; sources continue one another (OFFSET INTO ROD plus a sequential read) |
//!
//! POPULATE TOKEN is [`CopyChannel::submit_populate`], opened on the source
//! LUN; its completion carries the [`RodToken`].
//!
//! Completions carry an [`OffloadOutcome`] that says what the copy engine
//! needs to keep data safe: done; not done with the destination untouched
//! (fall back); partially done (a prefix of the ranges, in blocks: NVMe's
//! CQE DW0 range index, EXTENDED COPY's segments processed and WRITE USING
//! TOKEN's transfer count all convert to it); or failed with the
//! destination in an unknown state (redo by other means).
//!
//! Submission copies the command into the channel's own memory (an NVMe
//! leaf builds its source range descriptors in DMA memory it owns), so it
//! borrows the request only for the call and is safe: no caller memory is
//! ever handed to a device.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use crate::device::DeviceId;

/// One range of an offloaded copy: `blocks` blocks from `src` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadRange {
    /// Source: an LBA on the source leaf, or an offset (in blocks) into a
    /// ROD token.
    pub src: u64,
    /// Destination LBA on the leaf the command is submitted to.
    pub dst: u64,
    /// Length in blocks.
    pub blocks: u64,
}

/// A run of blocks on one device, for POPULATE TOKEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaRange {
    /// First block.
    pub lba: u64,
    /// Length in blocks.
    pub blocks: u64,
}

/// A representation-of-data token from POPULATE TOKEN / RECEIVE ROD TOKEN
/// INFORMATION (SBC-4 5.x), with what the engine needs to use it.
#[derive(Clone, PartialEq, Eq)]
pub struct RodToken {
    bytes: Arc<[u8]>,
    blocks: u64,
    expires: Option<Instant>,
}

impl RodToken {
    /// Length of a ROD token in bytes (SPC-4: 512).
    pub const LEN: usize = 512;

    /// A token of exactly [`RodToken::LEN`] bytes describing `blocks`
    /// blocks, usable until `expires` (`None`: the device gave no
    /// inactivity timeout). `None` when the device returned a token of the
    /// wrong length: the bytes come from a device and are not trusted.
    pub fn new(bytes: &[u8], blocks: u64, expires: Option<Instant>) -> Option<RodToken> {
        (bytes.len() == RodToken::LEN).then(|| RodToken {
            bytes: Arc::from(bytes),
            blocks,
            expires,
        })
    }

    /// The token's bytes, as WRITE USING TOKEN sends them.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Blocks the ROD describes.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// When the device will have dropped it, if it said.
    pub fn expires(&self) -> Option<Instant> {
        self.expires
    }

    /// True once the expiry has passed.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

impl fmt::Debug for RodToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RodToken")
            .field("blocks", &self.blocks)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Where an offloaded copy reads from.
#[derive(Debug, Clone, Copy)]
pub enum OffloadSource<'a> {
    /// The leaf the command is submitted to (NVMe Copy within a
    /// namespace, or EXTENDED COPY from a LUN to itself).
    SameDevice,
    /// Another LUN reachable through the destination's copy manager, named
    /// by its NAA designator from VPD page 0x83 (EXTENDED COPY LID1).
    Designator {
        /// The designator.
        naa: &'a [u8],
        /// Its block size, for the CSCD descriptor's device type specific
        /// parameters.
        block_size: u32,
    },
    /// A ROD token; each range's `src` is an offset into the ROD (WRITE
    /// USING TOKEN with OFFSET INTO ROD).
    RodToken(&'a RodToken),
}

impl OffloadSource<'_> {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            OffloadSource::SameDevice => "same device",
            OffloadSource::Designator { .. } => "designator",
            OffloadSource::RodToken(_) => "rod token",
        }
    }
}

/// One offload command.
#[derive(Debug, Clone, Copy)]
pub struct OffloadRequest<'a> {
    /// Where the bytes come from.
    pub source: OffloadSource<'a>,
    /// The ranges, in the order the device processes them. A partial
    /// completion reports a prefix of them.
    pub ranges: &'a [OffloadRange],
    /// The caller's context, returned in the completion.
    pub ctx: u64,
}

impl OffloadRequest<'_> {
    /// Blocks the command copies.
    pub fn blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.blocks).sum()
    }

    /// The error of this command failing on `device` for `kind`.
    pub fn error(
        &self,
        device: DeviceId,
        kind: OffloadErrorKind,
        status: DeviceStatus,
    ) -> OffloadError {
        OffloadError {
            device,
            dst_lba: self.ranges.first().map_or(0, |r| r.dst),
            blocks: self.blocks(),
            kind,
            status,
        }
    }
}

/// The device's own words about a failed command, when it gave any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// No device status (the leaf refused the command itself).
    None,
    /// NVMe completion status.
    Nvme {
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
        /// Do not retry.
        dnr: bool,
    },
    /// SCSI sense.
    Scsi {
        /// Sense key.
        key: u8,
        /// Additional sense code.
        asc: u8,
        /// Additional sense code qualifier.
        ascq: u8,
    },
}

/// Why an offload command did not do (all of) its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadErrorKind {
    /// The device does not support this offload, or not between these
    /// devices (invalid opcode, unreachable copy target, ...).
    #[error("offload not supported")]
    Unsupported,
    /// The command breaks the device's limits (ranges, range length,
    /// command length, destination contiguity).
    #[error("command exceeds the device's copy limits")]
    Limits,
    /// A range lies outside the device, or the command has no blocks.
    #[error("range outside the device or empty")]
    OutOfRange,
    /// The device did not execute the command (aborted, resources
    /// exhausted, copy manager busy).
    #[error("not executed")]
    NotExecuted,
    /// The ROD token expired.
    #[error("ROD token expired")]
    TokenExpired,
    /// The ROD token was invalidated (the source changed, or the device
    /// dropped it) or was never valid here.
    #[error("ROD token invalid")]
    TokenInvalid,
    /// A medium or transport error while copying.
    #[error("medium error")]
    Medium,
}

/// A failed offload command: where, how much, why, and the device status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadError {
    /// The leaf that executed (or refused) the command.
    pub device: DeviceId,
    /// Destination LBA of the command's first range.
    pub dst_lba: u64,
    /// Blocks in the command.
    pub blocks: u64,
    /// Why.
    pub kind: OffloadErrorKind,
    /// The device's status, when it gave one.
    pub status: DeviceStatus,
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "offloaded copy of {} blocks to {}.. on {}: {}",
            self.blocks, self.dst_lba, self.device, self.kind
        )?;
        match self.status {
            DeviceStatus::None => Ok(()),
            DeviceStatus::Nvme { sct, sc, dnr } => {
                write!(
                    f,
                    " (sct {sct:#x} sc {sc:#04x}{})",
                    if dnr { " dnr" } else { "" }
                )
            }
            DeviceStatus::Scsi { key, asc, ascq } => {
                write!(f, " (sense {key:#x}/{asc:#04x}/{ascq:#04x})")
            }
        }
    }
}

impl std::error::Error for OffloadError {}

/// What became of an offload command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffloadOutcome {
    /// Every range was copied.
    Done,
    /// Nothing was written: the destination is as it was. Fall back (or
    /// re-populate an expired or invalidated token).
    NotDone(OffloadError),
    /// The first `blocks_done` blocks of the ranges, in order, were copied;
    /// the rest were not, and the range the device stopped in may hold
    /// anything.
    Partial {
        /// Blocks copied, counted through the ranges in order.
        blocks_done: u64,
        /// Why it stopped.
        error: OffloadError,
    },
    /// The command failed and any of its destination blocks may hold
    /// anything: redo them by other means.
    DestinationUnknown(OffloadError),
    /// A POPULATE TOKEN succeeded: the token.
    Token(RodToken),
}

/// A finished offload command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadCompletion {
    /// The context given at submission.
    pub ctx: u64,
    /// What happened.
    pub outcome: OffloadOutcome,
}

/// Why an offload submission was not accepted; nothing was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadSubmitError {
    /// The channel is full: poll, then submit again.
    #[error("copy queue full")]
    Busy,
    /// The command is not valid for the device.
    #[error(transparent)]
    Invalid(OffloadError),
}

/// A per-thread queue of offload commands to one leaf.
///
/// Like [`crate::Channel`], `Send` and not `Sync`; submission does not
/// block and does not allocate once the channel is open; and, as there,
/// every accepted command completes, with an error after the driver's
/// per-command timeout if the device stays silent.
pub trait CopyChannel: Send {
    /// The leaf this channel submits to.
    fn device(&self) -> DeviceId;

    /// Starts an offloaded copy onto this leaf. On `Ok`, its completion will
    /// come out of [`CopyChannel::poll`].
    fn submit_copy(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadSubmitError>;

    /// Starts a POPULATE TOKEN over `ranges` of this leaf; the completion's
    /// outcome is [`OffloadOutcome::Token`] on success.
    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError>;

    /// Moves up to `max` completions into `out` (which should have the room:
    /// the channel pushes, and a `Vec` with capacity does not allocate);
    /// returns how many.
    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize;

    /// Commands submitted and not yet returned by `poll`.
    fn outstanding(&self) -> usize;
}

/// The completion of a POPULATE TOKEN sent to a leaf without ROD tokens
/// (NVMe has none): not done, unsupported, with the device's `status`.
pub(crate) fn no_rod_tokens(
    device: DeviceId,
    ranges: &[LbaRange],
    ctx: u64,
    status: DeviceStatus,
) -> OffloadCompletion {
    OffloadCompletion {
        ctx,
        outcome: OffloadOutcome::NotDone(OffloadError {
            device,
            dst_lba: ranges.first().map_or(0, |r| r.lba),
            blocks: ranges.iter().map(|r| r.blocks).sum(),
            kind: OffloadErrorKind::Unsupported,
            status,
        }),
    }
}
