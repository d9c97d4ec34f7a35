//! The polled NVMe driver: controller bring-up and admin commands
//! ([`Controller`]), and I/O queue pairs ([`QueuePair`]), generic over the
//! [`Transport`].
//!
//! # Model
//!
//! - Each [`QueuePair`] is owned by one thread (`Send`, `!Sync`). Submission
//!   never blocks and never allocates: command contexts (CID-indexed slots),
//!   request contexts and PRP list pages are preallocated at creation; a
//!   full queue is [`SubmitError::QueueFull`].
//! - Submissions are staged; [`QueuePair::ring`] (or the next
//!   [`QueuePair::poll`]) writes the SQ tail doorbell once for the batch,
//!   or every N staged commands when asked
//!   ([`QueuePair::set_sq_doorbell_every`]).
//! - [`QueuePair::poll`] harvests at most `max` completions and calls the
//!   callback once per request (a request split into several commands
//!   completes once, with the first error).
//! - Everything the device writes (CQEs, identify data) is checked before
//!   use; garbage gives an [`Error::BadDeviceData`], never a panic.
//! - [`Controller::reset`] disables and re-enables the controller; every
//!   queue pair notices on its next call, reports its outstanding requests
//!   as [`IoError::Aborted`] and re-creates its queues.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros};

use crate::dma::{self, DmaBuffer, DmaSlice, Region};
use crate::error::{Error, Result};
use crate::mmio::RegisterAccess;
use crate::regs::{self, Aqa, Cc, Csts, ShutdownStatus};
use crate::spec::{
    CopyRangeFormat0, IdentifyController, IdentifyNamespace, NvmeStatus, OACS_DBBUF,
    SubmissionEntry, admin_opc, cns, fid,
};
use crate::split::{self, CopyLimits, CopySplitter, PRP_LIST_ENTRIES};
use crate::transport::Transport;

mod admin;
mod controller;
mod ns_cmd;
mod qpair;
mod ring;

use admin::{AdminQueue, disable, enable};
pub use controller::Controller;
use controller::Shared;
pub use qpair::QueuePair;
pub use ring::DoorbellWrites;
use ring::Ring;

/// Memory page size the driver configures (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;
const ADMIN_ENTRIES: u16 = 32;
/// How long a queue with commands outstanding polls without progress
/// before it checks the controller's status and the command timeouts, and
/// how often it checks again while it stays idle.
const IDLE_CHECK: Duration = Duration::from_millis(1);
const SQE: usize = 64;
const CQE: usize = 16;

/// Options for bringing a controller up.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// I/O queue pairs to ask for (Set Features Number of Queues).
    pub io_queues: u16,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller
    /// offers them (OACS bit 8): most doorbell writes become memory writes.
    /// Off by default: they pay off where an MMIO write traps to a
    /// hypervisor (KVM); on QEMU 7.2 under TCG, measured in one boot, they
    /// cost (QEMU then reads and writes the shadow pages through the IOMMU
    /// for every command): 4 KiB random reads fell from about 25-30 K to
    /// 12-21 K IOPS at QD 1 and from 61-67 K to 30-63 K at QD 32.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            io_queues: 8,
            admin_timeout: Duration::from_secs(10),
            shadow_doorbells: false,
        }
    }
}

/// Options for an I/O queue pair.
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// Queue entries (capped by CAP.MQES + 1); at most `entries - 1`
    /// commands are outstanding.
    pub entries: u16,
    /// Per-command timeout, counted from the doorbell write that hands the
    /// command to the controller (one clock read per doorbell batch);
    /// `None` disables the check. A command past it is asked to abort.
    pub timeout: Option<Duration>,
    /// How long a timed-out command has, once asked to abort, before the
    /// queue pair is deleted and re-created (or the controller reset, if
    /// that fails). Its request is reported only then, once the device can
    /// no longer touch its memory.
    pub abort_timeout: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            entries: 256,
            timeout: Some(Duration::from_secs(30)),
            abort_timeout: Duration::from_secs(5),
        }
    }
}

/// What the driver knows about a namespace (from Identify Namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Size in blocks (NSZE).
    pub blocks: u64,
    /// Maximum Single Source Range Length.
    pub mssrl: u16,
    /// Maximum Copy Length.
    pub mcl: u32,
    /// Maximum Source Range Count (0's based).
    pub msrc: u8,
}

impl Namespace {
    fn shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }

    /// The namespace `nsid` that Identify Namespace describes, or `None`
    /// when FLBAS names no usable LBA format.
    pub fn from_identify(nsid: u32, id: &IdentifyNamespace) -> Option<Namespace> {
        Some(Namespace {
            nsid,
            block_size: id.block_size()?,
            blocks: id.nsze.get(),
            mssrl: id.mssrl.get(),
            mcl: id.mcl.get(),
            msrc: id.msrc,
        })
    }

    /// The Copy commands that copy source `ranges` of `(lba, blocks)`,
    /// concatenated, to `dest` within this namespace, split to MSRC,
    /// MSSRL and MCL; refused when a range is empty or beyond the
    /// namespace, or the namespace cannot copy.
    pub fn copy_splitter<'r>(
        &self,
        ranges: &'r [(u64, u64)],
        dest: u64,
    ) -> std::result::Result<CopySplitter<'r>, SubmitError> {
        let total = ranges.iter().try_fold(0u64, |a, r| a.checked_add(r.1));
        if total.is_none_or(|t| t == 0 || dest.checked_add(t).is_none_or(|e| e > self.blocks))
            || ranges
                .iter()
                .any(|&(l, n)| l.checked_add(n).is_none_or(|e| e > self.blocks))
        {
            return Err(SubmitError::Invalid(
                "copy range empty or beyond the namespace",
            ));
        }
        CopySplitter::new(ranges, dest, self.copy_limits()).ok_or(SubmitError::Invalid(
            "namespace cannot copy (MSSRL, MCL or MSRC is 0)",
        ))
    }

    /// The Write Zeroes commands that zero `blocks` at `lba` (65 536
    /// blocks each), with their count; refused when the range is empty or
    /// beyond the namespace.
    pub fn write_zeroes_commands(
        &self,
        lba: u64,
        blocks: u64,
    ) -> std::result::Result<(usize, impl Iterator<Item = SubmissionEntry>), SubmitError> {
        if blocks == 0 || lba.checked_add(blocks).is_none_or(|e| e > self.blocks) {
            return Err(SubmitError::Invalid(
                "LBA range empty or beyond the namespace",
            ));
        }
        let nsid = self.nsid;
        let commands = (0..blocks.div_ceil(65536)).map(move |k| {
            let at = k * 65536;
            let n = (blocks - at).min(65536);
            crate::cmd::WriteZeroes::new(nsid, lba + at, n as u32).build()
        });
        Ok((blocks.div_ceil(65536) as usize, commands))
    }

    /// Checks the source ranges of one unsplit Copy command (format 0,
    /// one descriptor page): 1 to 128 ranges of 1 to 65536 blocks. The
    /// device judges the rest.
    pub fn check_single_copy(ranges: &[(u64, u64)]) -> std::result::Result<(), SubmitError> {
        if ranges.is_empty() || ranges.len() > 128 || ranges.iter().any(|r| r.1 == 0 || r.1 > 65536)
        {
            return Err(SubmitError::Invalid(
                "one Copy takes 1 to 128 ranges of 1 to 65536 blocks",
            ));
        }
        Ok(())
    }

    /// Copy limits for one command with format-0 descriptors.
    pub fn copy_limits(&self) -> CopyLimits {
        CopyLimits {
            max_ranges: (self.msrc as usize + 1).min(PAGE_SIZE as usize / 32),
            mssrl: self.mssrl as u64,
            mcl: self.mcl as u64,
        }
    }
}

/// Why a submission was refused. Small and `Copy`: the hot path returns it
/// by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No free command slot (or not enough for a request that must be
    /// split): poll and retry.
    #[error("queue full")]
    QueueFull,
    /// The request is malformed (reason given).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The controller is gone (surprise removal or removal requested):
    /// nothing more is sent to it.
    #[error("controller removed")]
    Removed,
    /// The queue's connection is down (NVMe/TCP): reconnect it.
    #[error("connection to the controller is down; reconnect the queue")]
    Disconnected,
}

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The device completed a command with an error status.
    #[error("{0}")]
    Status(NvmeStatus),
    /// No completion within the queue's timeout, nor after an Abort: the
    /// queue (or the controller) was reset, so the device no longer touches
    /// the request's memory. The command may have executed, wholly or in
    /// part: a write's or a Copy's destination is unknown.
    #[error("command timed out (it may have executed; its destination is unknown)")]
    Timeout,
    /// Outstanding when its queue was deleted or the controller reset: the
    /// device no longer touches its memory, but the command may have
    /// executed in part (reported with Command Aborted due to SQ Deletion).
    #[error("aborted by a queue or controller reset (it may have executed in part)")]
    Aborted,
    /// Outstanding when the controller went away (registers reading all
    /// ones, or removal requested and the controller stopped): it may have
    /// executed in part; the device touches its memory no more.
    #[error("controller removed (the command may have executed in part)")]
    Removed,
    /// Outstanding when its connection failed (NVMe/TCP: reset, closed, a
    /// malformed PDU, a timeout): it may have executed, wholly or in part.
    /// Nothing arrives for it any more.
    #[error("connection to the controller lost (the command may have executed, wholly or in part)")]
    Disconnected,
    /// The host's transport failed the command with this OS error number
    /// instead of passing on a device status: a kernel's passthrough
    /// refuses command shapes it does not forward (EINVAL for a command
    /// naming another namespace than its node's), before the device sees
    /// them. Never produced by [`QueuePair`].
    #[error("the host refused or failed the command (OS error {errno}): see the errno")]
    Os {
        /// The `errno` value.
        errno: i32,
    },
}

impl IoError {
    /// The NVMe status this error corresponds to, if any.
    pub fn status(&self) -> Option<NvmeStatus> {
        match self {
            IoError::Status(s) => Some(*s),
            IoError::Aborted => Some(NvmeStatus::ABORTED_SQ_DELETION),
            IoError::Timeout | IoError::Removed | IoError::Disconnected | IoError::Os { .. } => {
                None
            }
        }
    }
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// Dword 0 of the (last) completion, or the error.
    pub result: std::result::Result<u32, IoError>,
    /// Dword 0 of the (last) completion also when it failed (a failed Copy
    /// reports there the first source range it did not copy); 0 when no
    /// completion arrived (timeout, reset).
    pub dw0: u32,
}

/// The namespaces of an Identify Active Namespace List (`list`, 4 KiB),
/// each described by `identify`; NSIDs must ascend and be at most `nn`.
pub(crate) fn active_namespaces(
    device: &str,
    list: &[u8],
    nn: u32,
    mut identify: impl FnMut(u32) -> Result<IdentifyNamespace>,
) -> Result<Vec<Namespace>> {
    let mut out = Vec::new();
    let mut last = 0u32;
    for w in list.chunks_exact(4) {
        let nsid = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        if nsid == 0 {
            break;
        }
        if nsid <= last || nsid > nn {
            return Err(Error::BadDeviceData {
                device: device.to_owned(),
                what: format!("active namespace list entry {nsid} after {last} (NN {nn})"),
            });
        }
        last = nsid;
        let id = identify(nsid)?;
        let Some(ns) = Namespace::from_identify(nsid, &id) else {
            return Err(Error::BadDeviceData {
                device: device.to_owned(),
                what: format!(
                    "namespace {nsid}: FLBAS {:#x} names no valid LBA format",
                    id.flbas
                ),
            });
        };
        out.push(ns);
    }
    Ok(out)
}

const _: () = assert!(PRP_LIST_ENTRIES * 8 == PAGE_SIZE as usize);

#[cfg(test)]
mod tests {
    #[test]
    fn ownership_model() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<super::QueuePair<crate::emu::EmuController>>();
        send::<super::QueuePair<crate::vfio::VfioPci>>();
        send_sync::<super::Controller<crate::emu::EmuController>>();
        send_sync::<super::Controller<crate::vfio::VfioPci>>();
        send_sync::<crate::DmaSlice>();
    }
}
