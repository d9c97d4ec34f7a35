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
    /// Bytes written to destination leaves by this method.
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
    /// The destination leaf (for a mirror, the leg) that did not get it.
    pub dst_leaf: DeviceId,
    /// Where on that leaf.
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
    /// the copies a destination keeps (mirror legs).
    pub bytes_expected: u64,
    /// Wall time of the copy-out phase.
    pub wall: Duration,
    /// Ranges not copied, with why. Empty when the copy is complete.
    pub not_copied: Vec<NotCopied>,
}

impl CopyReport {
    /// What `method` did.
    pub fn method(&self, method: Method) -> &MethodStats {
        &self.stats[method.index()]
    }

    pub(crate) fn method_mut(&mut self, method: Method) -> &mut MethodStats {
        &mut self.stats[method.index()]
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
            "copied {} of {} bytes in {:?} ({} offload fallbacks)",
            self.offloaded_bytes() + self.host_bytes(),
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
