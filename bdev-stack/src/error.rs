//! Errors: [`IoError`] for one I/O (small, `Copy`, carried in completions
//! without allocating) and [`BdevError`] for everything off the I/O path
//! (building devices, opening channels, resync).

use std::fmt;

use crate::buffer::DmaContextId;
use crate::device::{DeviceId, IoOp};

/// Why one I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoErrorKind {
    /// The range runs past the end of the device.
    #[error("range past the end of the device ({block_count} blocks)")]
    OutOfRange {
        /// The device's size in blocks.
        block_count: u64,
    },
    /// A read or write of zero blocks.
    #[error("empty transfer")]
    Empty,
    /// More blocks than the device takes in one command.
    #[error("transfer larger than the device's maximum of {max_blocks} blocks")]
    TooLarge {
        /// The device's maximum transfer, in blocks.
        max_blocks: u64,
    },
    /// The buffer's length is not the transfer's length.
    #[error("buffer of {buffer_bytes} bytes for a transfer of {transfer_bytes} bytes")]
    BufferLength {
        /// Bytes in the buffer.
        buffer_bytes: usize,
        /// Bytes the range covers.
        transfer_bytes: u64,
    },
    /// The buffer's address is not aligned as the device requires.
    #[error("buffer not aligned to {align} bytes")]
    Misaligned {
        /// The alignment the device requires.
        align: usize,
    },
    /// The device needs a DMA-mapped buffer (with an IOVA) and got host
    /// memory.
    #[error("buffer is not DMA-mapped")]
    NotDmaMapped,
    /// The buffer is mapped in another DMA context than the device's (a
    /// buffer of another registry's stack): its IOVA would reach someone
    /// else's memory. Nothing was sent to the device.
    #[error(
        "buffer belongs to {buffer}, not the device's {device}: allocate buffers from this \
         stack's allocator (bdev_stack::nvme_leaf::dma_allocator_for(&stack))"
    )]
    WrongDmaContext {
        /// The buffer's context.
        buffer: DmaContextId,
        /// The device's context.
        device: DmaContextId,
    },
    /// The device does not support the operation.
    #[error("operation not supported by the device")]
    Unsupported,
    /// The medium could not deliver or store the data (real or injected).
    #[error("medium error")]
    Medium,
    /// The operating system returned an error number.
    #[error("OS error {errno}")]
    Os {
        /// The `errno` value.
        errno: i32,
    },
    /// A mirror had no leg able to take the I/O.
    #[error("no healthy leg")]
    NoHealthyLeg,
    /// An NVMe command completed with this status (media errors, range
    /// errors and invalid opcodes map to [`IoErrorKind::Medium`],
    /// [`IoErrorKind::OutOfRange`] and [`IoErrorKind::Unsupported`]).
    #[error("NVMe status sct {sct:#x} sc {sc:#04x} dnr {dnr}")]
    Nvme {
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
        /// Do not retry.
        dnr: bool,
    },
    /// The device did not complete the command within the driver's
    /// per-command timeout.
    #[error("command timed out")]
    Timeout,
    /// The command was outstanding when the controller was reset: not
    /// known to have been executed.
    #[error("aborted by a controller reset")]
    Aborted,
    /// The controller failed (fatal status) or the queue was lost: the
    /// channel completes what it held with this and takes nothing more.
    #[error("controller failed")]
    DeviceFailed,
    /// The device is gone (surprise removal, or its removal was
    /// requested): nothing more is sent to it. A mirror fails the leg.
    #[error("device removed")]
    DeviceRemoved,
}

/// One failed I/O: which device, which operation, which blocks, and why.
///
/// Children of split requests report the member device and the member's
/// range, which is where the failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError {
    /// The device that failed the I/O.
    pub device: DeviceId,
    /// The operation.
    pub op: IoOp,
    /// First block of the range, on `device`.
    pub lba: u64,
    /// Length of the range in blocks.
    pub blocks: u64,
    /// What went wrong.
    pub kind: IoErrorKind,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of blocks {}..{} on {}: {}",
            self.op,
            self.lba,
            self.lba.saturating_add(self.blocks),
            self.device,
            self.kind
        )
    }
}

impl std::error::Error for IoError {}

/// Errors off the I/O path: building, opening, resyncing.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// Members of a virtual device have different block sizes.
    #[error("{device}: member {member} has {found}-byte blocks, expected {expected}")]
    BlockSizeMismatch {
        /// The virtual device being built.
        device: String,
        /// The offending member's name.
        member: String,
        /// The block size of the first member.
        expected: u32,
        /// The offending member's block size.
        found: u32,
    },
    /// A virtual device was given too few members.
    #[error("{device} needs at least {min} members, got {got}")]
    TooFewMembers {
        /// The kind of virtual device.
        device: &'static str,
        /// The minimum.
        min: usize,
        /// How many it got.
        got: usize,
    },
    /// A parameter is out of its valid range.
    #[error("{device}: invalid {parameter}: {reason}")]
    InvalidParameter {
        /// The device being built.
        device: String,
        /// The parameter's name.
        parameter: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// An OS call failed while setting a device up.
    #[error("{device}: {action}")]
    Os {
        /// The device concerned.
        device: String,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Memory for buffers or pools could not be obtained.
    #[error("cannot allocate {bytes} bytes of I/O buffer")]
    OutOfMemory {
        /// The size asked for.
        bytes: usize,
    },
    /// An I/O issued by the library itself (resync, set-up) failed.
    #[error("{context}")]
    Io {
        /// What the library was doing.
        context: &'static str,
        /// The failed I/O.
        #[source]
        source: IoError,
    },
    /// A member's mirror metadata is missing or damaged.
    #[error("{device}: mirror metadata")]
    Metadata {
        /// The member.
        device: String,
        /// What is wrong with it.
        #[source]
        source: crate::mirror::meta::MetaError,
    },
    /// A device cannot join the array being assembled.
    #[error("{device} {reason}")]
    Assembly {
        /// The device.
        device: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A leg index or mirror operation is not valid in the mirror's state.
    #[error("{device}: {reason}")]
    MirrorState {
        /// The mirror.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// An NVMe driver call failed while opening a leaf or a channel.
    #[error("{device}: {action}")]
    Nvme {
        /// The controller or namespace concerned.
        device: String,
        /// What was being done.
        action: &'static str,
        /// The driver's error (it says how to bind a device to vfio-pci,
        /// which address is bad, ...).
        #[source]
        source: Box<nvme::Error>,
    },
    /// A SCSI call failed while opening a LUN leaf or a channel: the
    /// typed error says which (no such device, no permission, not an sg
    /// node, not a direct-access device, CHECK CONDITION with its sense).
    #[error("{device}: {action}")]
    Scsi {
        /// The LUN concerned.
        device: String,
        /// What was being done.
        action: &'static str,
        /// The SCSI layer's error (boxed: it carries sense data and paths,
        /// and `BdevError` travels in every `Result` off the I/O path).
        #[source]
        source: Box<scsi_sg::Error>,
    },
    /// io_uring could not be set up for a channel.
    #[error("{device}: io_uring is not available: {hint}")]
    IoUringUnavailable {
        /// The device whose channel was being opened.
        device: String,
        /// What to do about it.
        hint: &'static str,
        /// The OS error of `io_uring_setup`.
        #[source]
        source: std::io::Error,
    },
    /// An NVMe generic character device (`ng:`) could not be used.
    #[error("{device}: {problem}")]
    Passthrough {
        /// The character device.
        device: String,
        /// What is wrong, and what to do.
        problem: String,
        /// The OS error, where there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A leaf kind reserved for a driver that is not registered.
    #[error("leaf kind `{kind}:` is not available yet (no factory registered)")]
    LeafKindNotAvailable {
        /// The prefix, e.g. `nvme`.
        kind: String,
    },
    /// An emulated leaf in a build without the emulators.
    #[error(
        "leaf kind `{kind}:` is an emulated device, and this build has no emulators: \
         build bdev-stack with its `emu` feature (on by default)"
    )]
    EmulatorNotBuilt {
        /// The prefix: `emu` or `sgemu`.
        kind: &'static str,
    },
}

/// `e` and its causes, one a line: the command-line tools print the whole
/// chain, as a cause names the value at fault (an OS error, a path) and an
/// error what to do about it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str("\n  caused by: ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
