//! The block-device abstraction: a device describes itself
//! ([`DeviceInfo`]), maps logical ranges to leaves ([`BlockDevice::map`]) and
//! hands each thread a [`Channel`] to submit and poll I/O.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::buffer::{DmaAllocator, DmaContextId, DmaSlice};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::identity::{BackingId, OffloadDomain};
use crate::offload::CopyChannel;

/// Identifies a device within the process: leaves, virtual devices and
/// wrappers each get one when built. Copy-engine fragments and I/O errors
/// name devices by it; [`find_device`] turns it back into the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

impl DeviceId {
    /// A fresh id. Ids come from one process-wide counter so that a leaf
    /// shared by two stacks (a copy's source and destination) has one id in
    /// both, which is how the copy engine sees "same device".
    pub fn fresh() -> DeviceId {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        DeviceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bdev#{}", self.0)
    }
}

/// An I/O operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read blocks into the buffer.
    Read,
    /// Write blocks from the buffer.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Set blocks to zero without a data buffer.
    WriteZeroes,
    /// Tell the device the blocks are unused (TRIM/UNMAP/Dataset Management).
    /// Later reads return zeroes on every device this crate provides.
    Deallocate,
}

impl IoOp {
    /// The capability bit that says a device supports this operation.
    pub fn required_op(self) -> SupportedOps {
        match self {
            IoOp::Read => SupportedOps::READ,
            IoOp::Write => SupportedOps::WRITE,
            IoOp::Flush => SupportedOps::FLUSH,
            IoOp::WriteZeroes => SupportedOps::WRITE_ZEROES,
            IoOp::Deallocate => SupportedOps::DEALLOCATE,
        }
    }

    /// True for operations that carry a data buffer.
    pub fn moves_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::Write)
    }

    /// True for operations that change the blocks of a range.
    pub fn modifies(self) -> bool {
        matches!(self, IoOp::Write | IoOp::WriteZeroes | IoOp::Deallocate)
    }
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::WriteZeroes => "write-zeroes",
            IoOp::Deallocate => "deallocate",
        })
    }
}

bitflags::bitflags! {
    /// The operations a device supports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SupportedOps: u8 {
        /// Read.
        const READ = 1 << 0;
        /// Write.
        const WRITE = 1 << 1;
        /// Flush.
        const FLUSH = 1 << 2;
        /// Write zeroes.
        const WRITE_ZEROES = 1 << 3;
        /// Deallocate.
        const DEALLOCATE = 1 << 4;
    }
}

/// A copy offload a leaf can take part in, with what the copy engine needs
/// to pair it with another leaf and to size commands. Virtual devices have
/// none: the copy engine reaches leaves through [`BlockDevice::map`].
///
/// Pairing is on the [`OffloadDomain`]s, which the library controls; the
/// strings devices report are kept for logs and extra checks only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOffload {
    /// NVMe Copy (opcode 0x19) within one namespace.
    NvmeCopy {
        /// The opened controller: Copy pairs only within one.
        controller: OffloadDomain,
        /// The subsystem NQN the controller reported (may be empty, and
        /// may repeat across controllers: never grants pairing).
        subsystem: String,
        /// Namespace id.
        nsid: u32,
        /// MSRC + 1: source ranges per command.
        max_ranges: u32,
        /// MSSRL: blocks per source range.
        max_range_blocks: u64,
        /// MCL: blocks per command.
        max_command_blocks: u64,
    },
    /// SCSI EXTENDED COPY (LID1) through a copy manager.
    ScsiExtendedCopy {
        /// The LUN's NAA designator from VPD page 0x83 (EXTENDED COPY
        /// names LUNs by it: see `designator_unique`).
        naa: Vec<u8>,
        /// The copy manager that reaches the LUN.
        copy_manager: OffloadDomain,
        /// True when the designator was verified unique among the LUNs the
        /// copy manager reaches; EXTENDED COPY names LUNs by designator, so
        /// the engine pairs only verified ones.
        designator_unique: bool,
        /// Segment descriptors per command.
        max_segments: u16,
        /// Bytes per segment.
        max_segment_bytes: u64,
    },
    /// SCSI POPULATE TOKEN / WRITE USING TOKEN.
    ScsiRodToken {
        /// The LUN's NAA designator from VPD page 0x83.
        naa: Vec<u8>,
        /// The copy manager that makes and takes the LUN's tokens: WRITE
        /// USING TOKEN goes only to a LUN of the one that made the token.
        copy_manager: OffloadDomain,
        /// Range descriptors per command (VPD 0x8F).
        max_ranges: u32,
        /// Blocks one token may describe (VPD 0x8F).
        max_token_blocks: u64,
    },
}

/// The kind of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Host memory.
    Memory,
    /// A file or block device through `pread`/`pwrite`.
    File,
    /// An NVMe namespace.
    Nvme,
    /// A SCSI logical unit.
    Scsi,
    /// An in-process emulated device.
    Emulated,
    /// A wrapper that injects faults, for tests.
    FaultInjector,
    /// Members end to end.
    Concat,
    /// Members interleaved in chunks.
    Stripe,
    /// Every member holds every block.
    Mirror,
    /// A window on another device (a member's data area).
    Slice,
}

/// What a device says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Process-wide identity.
    pub id: DeviceId,
    /// Human-readable name, e.g. `mem0` or `stripe(mem0,mem1)`.
    pub name: String,
    /// The kind.
    pub kind: DeviceKind,
    /// Bytes per block.
    pub block_size: u32,
    /// Size in blocks.
    pub block_count: u64,
    /// Largest read or write in one request, in blocks. Virtual devices
    /// split, so theirs is `u64::MAX`.
    pub max_transfer_blocks: u64,
    /// Required alignment of buffer addresses, in bytes.
    pub buf_align: usize,
    /// True when buffers must carry a device address ([`DmaSlice::iova`]):
    /// NVMe builds PRPs from it. Such a leaf takes only buffers of its own
    /// DMA context ([`BlockDevice::iova_allocator`]); a stack over several
    /// of them works when they share one context (one leaf registry), so
    /// that one IOVA per buffer serves every leaf.
    pub needs_iova: bool,
    /// With [`DeviceInfo::needs_iova`], the DMA context buffers must be in
    /// ([`DmaSlice::dma_context`]): the leaf's own, or the one every leaf
    /// of a stack shares, so a stack refuses a buffer of another context
    /// before any leaf sees it. `None` when host memory serves, or when a
    /// stack's leaves are in several contexts (no buffer serves them all;
    /// each leaf still refuses what is not its own).
    pub dma_context: Option<DmaContextId>,
    /// Requests that do not cross a multiple of this many blocks perform
    /// best (stripe chunk, NVMe NOIOB); 0 when there is none.
    pub optimal_boundary_blocks: u64,
    /// Operations supported.
    pub ops: SupportedOps,
    /// Copy offloads the device can take part in.
    pub copy_offloads: Vec<CopyOffload>,
}

impl DeviceInfo {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.block_count * u64::from(self.block_size)
    }

    /// Checks a request against this description: op supported, range
    /// inside the device, buffer length and alignment right, transfer not
    /// too large.
    pub fn validate(&self, req: &IoRequest) -> Result<(), IoError> {
        let fail = |kind| Err(req.error(self.id, kind));
        if !self.ops.contains(req.op.required_op()) {
            return fail(IoErrorKind::Unsupported);
        }
        if req.op == IoOp::Flush {
            return Ok(());
        }
        if req.blocks == 0 {
            return fail(IoErrorKind::Empty);
        }
        match req.lba.checked_add(req.blocks) {
            Some(end) if end <= self.block_count => {}
            _ => {
                return fail(IoErrorKind::OutOfRange {
                    block_count: self.block_count,
                });
            }
        }
        if req.op.moves_data() {
            if req.blocks > self.max_transfer_blocks {
                return fail(IoErrorKind::TooLarge {
                    max_blocks: self.max_transfer_blocks,
                });
            }
            let transfer_bytes = req.blocks * u64::from(self.block_size);
            if req.buf.len() as u64 != transfer_bytes {
                return fail(IoErrorKind::BufferLength {
                    buffer_bytes: req.buf.len(),
                    transfer_bytes,
                });
            }
            if !(req.buf.host_ptr() as usize).is_multiple_of(self.buf_align) {
                return fail(IoErrorKind::Misaligned {
                    align: self.buf_align,
                });
            }
            if self.needs_iova {
                match (req.buf.dma_context(), self.dma_context) {
                    (None, _) => return fail(IoErrorKind::NotDmaMapped),
                    // Its IOVA would name someone else's memory here.
                    (Some(buffer), Some(device)) if buffer != device => {
                        return fail(IoErrorKind::WrongDmaContext { buffer, device });
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// One I/O request.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest {
    /// The operation.
    pub op: IoOp,
    /// First block.
    pub lba: u64,
    /// Blocks (ignored by flush).
    pub blocks: u64,
    /// The data for reads and writes; [`DmaSlice::EMPTY`] otherwise.
    pub buf: DmaSlice,
    /// The caller's context, returned in the completion.
    pub ctx: u64,
}

impl IoRequest {
    /// A read of `blocks` blocks at `lba` into `buf`.
    pub fn read(lba: u64, blocks: u64, buf: DmaSlice, ctx: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Read,
            lba,
            blocks,
            buf,
            ctx,
        }
    }

    /// A write of `blocks` blocks at `lba` from `buf`.
    pub fn write(lba: u64, blocks: u64, buf: DmaSlice, ctx: u64) -> IoRequest {
        IoRequest {
            op: IoOp::Write,
            lba,
            blocks,
            buf,
            ctx,
        }
    }

    /// The error of this request failing on `device` for `kind`.
    pub fn error(&self, device: DeviceId, kind: IoErrorKind) -> IoError {
        IoError {
            device,
            op: self.op,
            lba: self.lba,
            blocks: self.blocks,
            kind,
        }
    }

    /// An operation without data (flush, write zeroes, deallocate).
    pub fn no_data(op: IoOp, lba: u64, blocks: u64, ctx: u64) -> IoRequest {
        IoRequest {
            op,
            lba,
            blocks,
            buf: DmaSlice::EMPTY,
            ctx,
        }
    }
}

/// A finished I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The context given at submission.
    pub ctx: u64,
    /// The outcome.
    pub result: Result<(), IoError>,
}

impl Completion {
    /// A placeholder for sizing completion arrays.
    pub const EMPTY: Completion = Completion {
        ctx: 0,
        result: Ok(()),
    };
}

/// Why a submission was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The channel's queue is full: poll, then submit again.
    #[error("queue full")]
    Busy,
    /// The request is invalid for the device; nothing was started.
    #[error(transparent)]
    Invalid(IoError),
}

/// A per-thread queue to a device: submit requests, poll completions.
///
/// `Send` but not `Sync`: a channel belongs to one thread at a time, like an
/// NVMe queue pair. Submission never blocks and does not allocate once the
/// channel is open; a full queue is [`SubmitError::Busy`].
///
/// Every accepted request completes: a leaf whose device does not answer
/// completes the request with an error once its per-command timeout has
/// passed (the drivers own those timeouts). Callers above, the copy engine
/// among them, rely on this and poll without deadlines of their own.
pub trait Channel: Send {
    /// The device this channel submits to.
    fn device(&self) -> DeviceId;

    /// Starts a request. On `Ok`, its completion will come out of
    /// [`Channel::poll`] carrying `req.ctx`.
    ///
    /// # Safety
    /// The memory `req.buf` describes must stay allocated, and must be
    /// neither read nor written by anyone but this channel (for a read) or
    /// written by anyone (for a write), until the completion for this
    /// request has been returned by `poll`.
    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError>;

    /// Harvests up to `out.len()` completions into `out`, returning how many.
    /// Never blocks on a device except where a leaf documents that it
    /// performs its I/O here (the file leaf).
    fn poll(&mut self, out: &mut [Completion]) -> usize;

    /// Requests submitted and not yet returned by `poll`.
    fn outstanding(&self) -> usize;
}

/// Which side of a copy a mapping is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Where the bytes can be read: one leaf per logical block (a mirror
    /// gives one healthy leg).
    Read,
    /// Where the bytes must be written: every leaf that must receive them (a
    /// mirror gives every leg that takes writes).
    Write,
}

/// A run of a device's blocks that lives on one leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafFragment {
    /// First block on the mapped device.
    pub lba: u64,
    /// Length in blocks.
    pub blocks: u64,
    /// The leaf holding it.
    pub leaf: DeviceId,
    /// First block on the leaf.
    pub leaf_lba: u64,
    /// Which copy of the data this is. For [`Access::Read`] always 0; for
    /// [`Access::Write`], the fragments with one `replica` value never
    /// overlap, so each replica index is one (partial) partition of the
    /// range: a range under a two-leg mirror has replicas 0 and 1.
    pub replica: u16,
}

/// A block device: a leaf or a virtual device built from others.
pub trait BlockDevice: Send + Sync {
    /// What the device is.
    fn info(&self) -> &DeviceInfo;

    /// Opens a channel for the calling thread that can hold `depth`
    /// requests in flight. Pools are sized here; nothing is allocated per
    /// I/O afterwards.
    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError>;

    /// The devices this one is built from (empty for a leaf).
    fn members(&self) -> Vec<Arc<dyn BlockDevice>>;

    /// For a leaf that needs IOVAs ([`DeviceInfo::needs_iova`]), the
    /// allocator of the buffers it takes: those of its DMA context. `None`
    /// for every other device; for a stack, ask
    /// [`crate::nvme_leaf::dma_allocator_for`].
    fn iova_allocator(&self) -> Option<Arc<dyn DmaAllocator>> {
        None
    }

    /// For a leaf of host memory with buffers that serve it best (the
    /// io_uring leaves' registered buffers), their allocator; `None`
    /// otherwise. [`crate::nvme_leaf::dma_allocator_for`] gives a stack
    /// without IOVA leaves the first leaf's.
    fn host_allocator(&self) -> Option<Arc<dyn DmaAllocator>> {
        None
    }

    /// Opens a channel for offloaded copies onto this device, for the
    /// calling thread, holding `depth` commands in flight; `None` when the
    /// device executes no copy offload (every virtual device: the copy
    /// engine reaches leaves through [`BlockDevice::map`]). A leaf that
    /// advertises [`DeviceInfo::copy_offloads`] returns a channel.
    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        let _ = depth;
        Ok(None)
    }

    /// What this leaf's blocks are, for overlap checks: leaves with equal
    /// backings are one set of blocks. The default, for a leaf nothing
    /// else reaches, is its own id.
    fn backing(&self) -> BackingId {
        BackingId::Device(self.info().id)
    }

    /// Takes this device's part in a copy that writes `[lba, lba +
    /// blocks)` through its leaves (offloads the engine sends to them):
    /// holds what must be held while those writes are in flight, recording
    /// it in `holds`, which releases it when dropped. A mirror counts the
    /// range in its write intent, so a resync cannot copy a region under
    /// the copy; virtual devices pass the part of the range each member
    /// holds to it. Returns `Ok(false)`, holding nothing new, when a part
    /// is held by someone else (a resync copying a region): release
    /// `holds` and try again later.
    ///
    /// A layer that must see every write as it is made (one that
    /// transforms data) maps to itself, not to its members, so the engine
    /// writes through its channels and never offloads under it.
    fn hold_copy_writes(
        &self,
        lba: u64,
        blocks: u64,
        holds: &mut crate::hold::WriteHolds,
    ) -> Result<bool, IoError> {
        let _ = (lba, blocks, holds);
        Ok(true)
    }

    /// Appends to `out` the leaf fragments of `[lba, lba + blocks)` for
    /// `access`, in increasing `lba` order per replica.
    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError>;
}

/// The DMA context buffers of a device over `members` must be in: the one
/// every member that needs IOVAs names, `None` if they name several (or
/// none).
pub(crate) fn shared_dma_context(members: &[Arc<dyn BlockDevice>]) -> Option<DmaContextId> {
    let mut contexts = members
        .iter()
        .map(|m| m.info())
        .filter(|i| i.needs_iova)
        .map(|i| i.dma_context);
    let first = contexts.next()??;
    contexts.all(|c| c == Some(first)).then_some(first)
}

/// Checks that a mapped range lies inside `info`'s device.
pub(crate) fn check_map_range(
    info: &DeviceInfo,
    lba: u64,
    blocks: u64,
    access: Access,
) -> Result<(), IoError> {
    match lba.checked_add(blocks) {
        Some(end) if end <= info.block_count => Ok(()),
        _ => Err(IoError {
            device: info.id,
            op: match access {
                Access::Read => IoOp::Read,
                Access::Write => IoOp::Write,
            },
            lba,
            blocks,
            kind: IoErrorKind::OutOfRange {
                block_count: info.block_count,
            },
        }),
    }
}

/// The mapping of a leaf: itself.
pub(crate) fn map_leaf(
    info: &DeviceInfo,
    lba: u64,
    blocks: u64,
    access: Access,
    out: &mut Vec<LeafFragment>,
) -> Result<(), IoError> {
    check_map_range(info, lba, blocks, access)?;
    if blocks > 0 {
        out.push(LeafFragment {
            lba,
            blocks,
            leaf: info.id,
            leaf_lba: lba,
            replica: 0,
        });
    }
    Ok(())
}

/// Finds the device with `id` in the tree under `root` (including `root`).
pub fn find_device(root: &Arc<dyn BlockDevice>, id: DeviceId) -> Option<Arc<dyn BlockDevice>> {
    if root.info().id == id {
        return Some(Arc::clone(root));
    }
    root.members()
        .iter()
        .find_map(|member| find_device(member, id))
}

/// Checks that all members share one block size, returning it.
pub(crate) fn common_block_size(
    device: &str,
    members: &[Arc<dyn BlockDevice>],
) -> Result<u32, BdevError> {
    let first = members.first().ok_or(BdevError::TooFewMembers {
        device: "virtual device",
        min: 1,
        got: 0,
    })?;
    let expected = first.info().block_size;
    for member in members {
        let found = member.info().block_size;
        if found != expected {
            return Err(BdevError::BlockSizeMismatch {
                device: device.to_string(),
                member: member.info().name.clone(),
                expected,
                found,
            });
        }
    }
    Ok(expected)
}

/// Marker that makes a channel `!Sync` while leaving it `Send`.
pub(crate) type NotSync = std::marker::PhantomData<std::cell::Cell<()>>;

impl fmt::Debug for dyn BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.info();
        f.debug_struct("BlockDevice")
            .field("id", &info.id)
            .field("name", &info.name)
            .field("kind", &info.kind)
            .finish()
    }
}

/// Moves completions from `queue` into `out`, oldest first, until either
/// runs out; returns how many moved. The leaves that complete from a queue
/// share it.
pub(crate) fn drain_completions<T>(
    queue: &mut std::collections::VecDeque<T>,
    out: &mut [T],
) -> usize {
    let n = queue.len().min(out.len());
    for (slot, c) in out.iter_mut().zip(queue.drain(..n)) {
        *slot = c;
    }
    n
}

/// [`drain_completions`] into a vector, at most `max`.
pub(crate) fn drain_completions_into<T>(
    queue: &mut std::collections::VecDeque<T>,
    out: &mut Vec<T>,
    max: usize,
) -> usize {
    let n = queue.len().min(max);
    out.extend(queue.drain(..n));
    n
}
