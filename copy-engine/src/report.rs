//! What a copy did: per method, the pieces, commands and bytes; the wall
//! time; and every range that could not be copied, with why.

use std::fmt;
use std::time::Duration;

use bdev_stack::{DeviceId, IoError, OffloadError};

/// How bytes were moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// NVMe Copy (opcode 0x19) within a namespace.
    NvmeCopy,
    /// SCSI EXTENDED COPY (LID1) through a copy manager.
    ExtendedCopy,
    /// SCSI WRITE USING TOKEN from a ROD token.
    RodToken,
    /// Read into host buffers and written back, pipelined.
    Bounce,
    /// Read into host buffers, all of them before any write, because the
    /// pieces read what other pieces write.
    Staged,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 5] = [
        Method::NvmeCopy,
        Method::ExtendedCopy,
        Method::RodToken,
        Method::Bounce,
        Method::Staged,
    ];

    /// True for the device offloads.
    pub fn is_offload(self) -> bool {
        matches!(
            self,
            Method::NvmeCopy | Method::ExtendedCopy | Method::RodToken
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::NvmeCopy => "nvme-copy",
            Method::ExtendedCopy => "xcopy",
            Method::RodToken => "rod-token",
            Method::Bounce => "bounce",
            Method::Staged => "staged",
        })
    }
}

/// What one method did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodStats {
    /// Pieces (or the parts of pieces that a failed offload left over)
    /// this method moved.
    pub pieces: u64,
    /// Commands: offload commands that completed with data moved, or
    /// bounce writes.
    pub commands: u64,
    /// Bytes this method wrote: for an offload, bytes the destination
    /// leaves' commands wrote (each mirror leg counts); for bounce and
    /// staging, bytes written through the destination device, once, however
    /// many legs its layers fan them out to.
    pub bytes: u64,
}

/// Why a range was not copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CopyFailure {
    /// Reading the source failed.
    #[error("reading the source: {0}")]
    Read(IoError),
    /// Writing the destination failed; the destination range may hold
    /// anything.
    #[error("writing the destination: {0}")]
    Write(IoError),
    /// An offload failed and its bounce could not be started.
    #[error("offload failed and bounce could not be started: {0}")]
    Offload(OffloadError),
}

/// Why pieces whose leaves both offer an offload of one kind were bounced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum RefusalReason {
    /// NVMe Copy: source and destination are not one namespace of one
    /// controller this process opened (a reported NQN never pairs them).
    #[error("NVMe Copy needs one namespace of one opened controller")]
    OtherNamespace,
    /// EXTENDED COPY: the LUNs are not reached through one copy manager.
    #[error("EXTENDED COPY needs both LUNs behind one copy manager")]
    OtherCopyManager,
    /// EXTENDED COPY: a LUN's designator was not verified unique among the
    /// LUNs its copy manager reaches, so the copy manager might resolve it
    /// to another LUN.
    #[error("a LUN designator is not verified unique within its copy manager")]
    DesignatorNotUnique,
    /// WRITE USING TOKEN: the token was made by another copy manager.
    #[error("the ROD token was made by another copy manager")]
    TokenFromOtherCopyManager,
    /// The device's advertised limits allow no command.
    #[error("the device's copy limits allow no command")]
    Limits,
}

/// A pair of leaves the engine did not offload between, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadRefused {
    /// The source leaf.
    pub src_leaf: DeviceId,
    /// The destination leaf.
    pub dst_leaf: DeviceId,
    /// Why.
    pub reason: RefusalReason,
}

/// What one destination leaf's offload commands did (a mirror's legs each
/// have their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafOffload {
    /// The destination leaf that executed the commands.
    pub leaf: DeviceId,
    /// The method.
    pub method: Method,
    /// Commands that moved data.
    pub commands: u64,
    /// Bytes they moved.
    pub bytes: u64,
}

/// A destination range that was not (or not certainly) copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCopied {
    /// Start in the logical copy space, in blocks.
    pub logical: u64,
    /// Length in blocks.
    pub blocks: u64,
    /// The destination device's LBA of the first block (the device given
    /// to `copy_out`).
    pub dst_lba: u64,
    /// The device the range was being written through when it failed:
    /// the destination given to `copy_out` (bounced bytes go through it,
    /// and a mirror in it fails a leg that cannot take them, rather than
    /// failing the copy).
    pub dst_leaf: DeviceId,
    /// Where on that device.
    pub dst_leaf_lba: u64,
    /// Why.
    pub failure: CopyFailure,
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub(crate) stats: [MethodStats; 5],
    /// Offload commands that failed and whose ranges were bounced instead
    /// (wholly or their unfinished part).
    pub fallbacks: u64,
    /// Blocks in the logical copy space.
    pub blocks: u64,
    /// Bytes that had to reach destination leaves: the copy's bytes times
    /// the copies a destination keeps (mirror legs). Offloaded plus host
    /// bytes equal it when no mirror is in the destination.
    pub bytes_expected: u64,
    /// Wall time of the copy-out phase.
    pub wall: Duration,
    /// Ranges not copied, with why. Empty when the copy is complete.
    pub not_copied: Vec<NotCopied>,
    /// Offload commands per destination leaf.
    pub per_leaf: Vec<LeafOffload>,
    /// Leaf pairs that offer offloads of one kind but were bounced, and
    /// why.
    pub refused: Vec<OffloadRefused>,
    /// ROD tokens that had expired or been invalidated and were populated
    /// again.
    pub tokens_repopulated: u64,
}

impl CopyReport {
    /// What `method` did.
    pub fn method(&self, method: Method) -> &MethodStats {
        &self.stats[method.index()]
    }

    pub(crate) fn method_mut(&mut self, method: Method) -> &mut MethodStats {
        &mut self.stats[method.index()]
    }

    /// Counts an offload command that moved `bytes` onto `leaf`.
    pub(crate) fn leaf_offload(&mut self, leaf: DeviceId, method: Method, bytes: u64) {
        match self
            .per_leaf
            .iter_mut()
            .find(|l| l.leaf == leaf && l.method == method)
        {
            Some(l) => {
                l.commands += 1;
                l.bytes += bytes;
            }
            None => self.per_leaf.push(LeafOffload {
                leaf,
                method,
                commands: 1,
                bytes,
            }),
        }
    }

    /// Records that `src_leaf` and `dst_leaf` were not paired, once.
    pub(crate) fn refuse(&mut self, src_leaf: DeviceId, dst_leaf: DeviceId, reason: RefusalReason) {
        let refusal = OffloadRefused {
            src_leaf,
            dst_leaf,
            reason,
        };
        if !self.refused.contains(&refusal) {
            self.refused.push(refusal);
        }
    }

    /// Bytes moved by device offloads.
    pub fn offloaded_bytes(&self) -> u64 {
        Method::ALL
            .iter()
            .filter(|m| m.is_offload())
            .map(|m| self.method(*m).bytes)
            .sum()
    }

    /// Bytes moved through host memory.
    pub fn host_bytes(&self) -> u64 {
        self.method(Method::Bounce).bytes + self.method(Method::Staged).bytes
    }

    /// True when every byte reached every destination leaf.
    pub fn is_complete(&self) -> bool {
        self.not_copied.is_empty()
    }
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} blocks{}: {} bytes offloaded, {} through host memory, for {} leaf bytes in {:?} ({} offload fallbacks)",
            self.blocks,
            if self.is_complete() {
                ""
            } else {
                " (INCOMPLETE)"
            },
            self.offloaded_bytes(),
            self.host_bytes(),
            self.bytes_expected,
            self.wall,
            self.fallbacks
        )?;
        for m in Method::ALL {
            let s = self.method(m);
            if s.pieces + s.commands + s.bytes > 0 {
                writeln!(
                    f,
                    "  {m:<10} pieces {:>8} commands {:>8} bytes {:>12}",
                    s.pieces, s.commands, s.bytes
                )?;
            }
        }
        for l in &self.per_leaf {
            writeln!(
                f,
                "  {:<10} on {}: commands {:>8} bytes {:>12}",
                l.method, l.leaf, l.commands, l.bytes
            )?;
        }
        for r in &self.refused {
            writeln!(
                f,
                "  not offloaded {} -> {}: {}",
                r.src_leaf, r.dst_leaf, r.reason
            )?;
        }
        for n in &self.not_copied {
            writeln!(
                f,
                "  not copied: {}+{} (leaf {} at {}): {}",
                n.dst_lba, n.blocks, n.dst_leaf, n.dst_leaf_lba, n.failure
            )?;
        }
        Ok(())
    }
}
