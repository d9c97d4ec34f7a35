//! The memory leaf: a sparse RAM disk. Chunks are allocated on first write
//! and read as zeroes until then, so a 64 GiB test device costs only what
//! is written. I/O happens during `submit` (a memory copy does not block)
//! and completes at the next `poll`.
//!
//! [`MemDevice::with_copy_offload`] makes it an offload-capable leaf: it
//! advertises an NVMe-Copy-like [`CopyOffload::NvmeCopy`] with the limits
//! given and copies inside itself through a [`CopyChannel`], front to back
//! in 64 KiB steps like a simple controller (so a command whose source and
//! destination overlap gets what such a device would give it). A
//! [`CopyFaultHandle`] injects the failures the copy engine must survive:
//! clean failures, partial completions and destinations left in an unknown
//! state.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::device::{
    Access, BlockDevice, Channel, Completion, CopyOffload, DeviceId, DeviceInfo, DeviceKind, IoOp,
    IoRequest, LeafFragment, NotSync, SubmitError, SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError};
use crate::identity::OffloadDomain;
use crate::offload::no_rod_tokens;
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRequest, OffloadSource, OffloadSubmitError,
};
use backing_store::{CHUNK_BYTES, SparseMemory};

/// Largest transfer a memory device takes by default, in bytes (1 MiB, a
/// common NVMe MDTS).
pub const DEFAULT_MEM_MAX_TRANSFER_BYTES: u64 = 1 << 20;

/// The device's bytes, allocated as they are written.
type ChunkTable = Mutex<SparseMemory>;

/// A sparse memory block device.
pub struct MemDevice {
    info: DeviceInfo,
    chunks: Arc<ChunkTable>,
    copy: Option<(MemCopyLimits, CopyFaultHandle)>,
}

/// The copy limits an offload-capable memory leaf advertises, in NVMe's
/// terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemCopyLimits {
    /// Source ranges per command (MSRC + 1).
    pub max_ranges: u32,
    /// Blocks per source range (MSSRL).
    pub max_range_blocks: u64,
    /// Blocks per command (MCL).
    pub max_command_blocks: u64,
}

impl Default for MemCopyLimits {
    /// The limits of the VM rig's QEMU namespaces: MSRC 15, MSSRL 128,
    /// MCL 256.
    fn default() -> MemCopyLimits {
        MemCopyLimits {
            max_ranges: 16,
            max_range_blocks: 128,
            max_command_blocks: 256,
        }
    }
}

/// A fault an offload-capable memory leaf injects into a copy command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFault {
    /// Copy nothing; complete with [`OffloadOutcome::NotDone`] of this kind.
    Clean(OffloadErrorKind),
    /// Copy the first `ranges` ranges, scribble over the first block of the
    /// next one's destination, and complete with
    /// [`OffloadOutcome::Partial`] (as an NVMe Copy reporting range
    /// `ranges` in DW0). A command with no more ranges than that is done,
    /// and the fault is used up without counting as injected.
    Partial {
        /// Ranges copied.
        ranges: u32,
    },
    /// Scribble over every destination block and complete with
    /// [`OffloadOutcome::DestinationUnknown`].
    DestinationUnknown,
}

#[derive(Debug, Default)]
struct CopyFaultState {
    queue: VecDeque<CopyFault>,
    every: Option<CopyFault>,
    commands: u64,
    injected: u64,
}

/// Shared control of the faults an offload-capable [`MemDevice`] injects
/// into its copy commands.
#[derive(Debug, Clone, Default)]
pub struct CopyFaultHandle {
    state: Arc<Mutex<CopyFaultState>>,
}

impl CopyFaultHandle {
    fn with<T>(&self, f: impl FnOnce(&mut CopyFaultState) -> T) -> T {
        // Plain data: a poisoned lock still holds valid state.
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Injects `fault` into the next copy command not yet given a fault
    /// (faults queue up, one per command).
    pub fn push(&self, fault: CopyFault) {
        self.with(|s| s.queue.push_back(fault));
    }

    /// Injects `fault` into every copy command once the queue is empty;
    /// `None` stops it.
    pub fn set_every(&self, fault: Option<CopyFault>) {
        self.with(|s| s.every = fault);
    }

    /// Removes every queued and standing fault.
    pub fn clear(&self) {
        self.with(|s| {
            s.queue.clear();
            s.every = None;
        });
    }

    /// Copy commands accepted so far.
    pub fn commands(&self) -> u64 {
        self.with(|s| s.commands)
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.with(|s| s.injected)
    }

    /// The fault for the next command, of `ranges` ranges. A partial
    /// fault that leaves no range uncopied does not apply: it is used up
    /// and not counted.
    fn decide(&self, ranges: usize) -> Option<CopyFault> {
        self.with(|s| {
            s.commands += 1;
            let fault = s.queue.pop_front().or(s.every).filter(|f| match f {
                CopyFault::Partial { ranges: done } => (*done as usize) < ranges,
                _ => true,
            });
            if fault.is_some() {
                s.injected += 1;
            }
            fault
        })
    }
}

impl MemDevice {
    /// A device of `size_bytes` (a multiple of `block_size`) in blocks of
    /// `block_size` bytes, taking at most `max_transfer_bytes` per request.
    pub fn new(
        size_bytes: u64,
        block_size: u32,
        max_transfer_bytes: u64,
    ) -> Result<MemDevice, BdevError> {
        let id = DeviceId::fresh();
        let name = format!("mem{}", id.0);
        let invalid = |parameter, reason: String| BdevError::InvalidParameter {
            device: name.clone(),
            parameter,
            reason,
        };
        if block_size < 512 || !block_size.is_power_of_two() || block_size as usize > CHUNK_BYTES {
            return Err(invalid(
                "block size",
                format!("{block_size} is not a power of two in 512..=65536"),
            ));
        }
        let bs = u64::from(block_size);
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(invalid(
                "size",
                format!("{size_bytes} is not a non-zero multiple of {block_size}"),
            ));
        }
        if max_transfer_bytes < bs {
            return Err(invalid(
                "max transfer",
                format!("{max_transfer_bytes} is smaller than one block"),
            ));
        }
        Ok(MemDevice {
            info: DeviceInfo {
                id,
                name,
                kind: DeviceKind::Memory,
                block_size,
                block_count: size_bytes / bs,
                max_transfer_blocks: max_transfer_bytes / bs,
                buf_align: 1,
                needs_iova: false,
                dma_context: None,
                optimal_boundary_blocks: 0,
                ops: SupportedOps::all(),
                copy_offloads: Vec::new(),
            },
            chunks: Arc::new(Mutex::new(SparseMemory::new(size_bytes))),
            copy: None,
        })
    }

    /// Makes this an offload-capable leaf: it advertises
    /// [`CopyOffload::NvmeCopy`] within itself (its own memory as the
    /// controller, namespace 1) with `limits`, and opens [`CopyChannel`]s.
    pub fn with_copy_offload(mut self, limits: MemCopyLimits) -> Result<MemDevice, BdevError> {
        if limits.max_ranges == 0 || limits.max_range_blocks == 0 || limits.max_command_blocks == 0
        {
            return Err(BdevError::InvalidParameter {
                device: self.info.name.clone(),
                parameter: "copy limits",
                reason: format!("{limits:?} has a zero limit"),
            });
        }
        self.info.copy_offloads = vec![CopyOffload::NvmeCopy {
            controller: OffloadDomain::handle(&self.chunks),
            subsystem: format!("mem:{}", self.info.id.0),
            nsid: 1,
            max_ranges: limits.max_ranges,
            max_range_blocks: limits.max_range_blocks,
            max_command_blocks: limits.max_command_blocks,
        }];
        self.copy = Some((limits, CopyFaultHandle::default()));
        Ok(self)
    }

    /// The handle to the faults injected into copy commands, for an
    /// offload-capable leaf.
    pub fn copy_faults(&self) -> Option<CopyFaultHandle> {
        self.copy.as_ref().map(|(_, handle)| handle.clone())
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(MemChannel {
            info: self.info.clone(),
            chunks: Arc::clone(&self.chunks),
            done: VecDeque::with_capacity(depth.max(1)),
            depth: depth.max(1),
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        let Some((limits, faults)) = &self.copy else {
            return Ok(None);
        };
        let depth = depth.max(1);
        Ok(Some(Box::new(MemCopyChannel {
            info: self.info.clone(),
            chunks: Arc::clone(&self.chunks),
            limits: *limits,
            faults: faults.clone(),
            done: VecDeque::with_capacity(depth),
            depth,
            scratch: vec![0; CHUNK_BYTES].into_boxed_slice(),
            ranges: Vec::with_capacity(limits.max_ranges as usize),
            _not_sync: NotSync::default(),
        })))
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        map_leaf(&self.info, lba, blocks, access, out)
    }
}

struct MemChannel {
    info: DeviceInfo,
    chunks: Arc<ChunkTable>,
    done: VecDeque<Completion>,
    depth: usize,
    _not_sync: NotSync,
}

impl MemChannel {
    fn lock(&self) -> MutexGuard<'_, SparseMemory> {
        // A panic elsewhere while holding the lock leaves bytes, not broken
        // invariants: the chunk table stays valid, so carry on.
        self.chunks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the request's bytes. Caller has validated the request, so
    /// its range lies inside the device and its buffer holds it whole.
    fn perform(&self, req: &IoRequest) {
        let bs = u64::from(self.info.block_size);
        let offset = req.lba * bs;
        let len = req.blocks * bs;
        let mut memory = self.lock();
        // Range errors cannot happen on a validated request; were one to,
        // nothing is moved.
        let _ = match req.op {
            IoOp::Flush => Ok(()),
            IoOp::Read => {
                // SAFETY: validate() checked the buffer holds the whole
                // transfer; the submit contract makes it ours to write.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(req.buf.host_ptr(), len as usize) };
                memory.read(offset, dst)
            }
            IoOp::Write => {
                // SAFETY: as above, and the buffer stays unchanged until
                // completion.
                let src = unsafe { std::slice::from_raw_parts(req.buf.host_ptr(), len as usize) };
                memory.write(offset, src)
            }
            IoOp::WriteZeroes => memory.zero(offset, len, false),
            // Deallocation gives whole chunks back, like a thin device.
            IoOp::Deallocate => memory.zero(offset, len, true),
        };
    }
}

impl Channel for MemChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.done.len() >= self.depth {
            return Err(SubmitError::Busy);
        }
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        self.perform(&req);
        self.done.push_back(Completion {
            ctx: req.ctx,
            result: Ok(()),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        crate::device::drain_completions(&mut self.done, out)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}

/// The copy channel of an offload-capable memory leaf.
struct MemCopyChannel {
    info: DeviceInfo,
    chunks: Arc<ChunkTable>,
    limits: MemCopyLimits,
    faults: CopyFaultHandle,
    done: VecDeque<OffloadCompletion>,
    depth: usize,
    /// One step of a copy: the device copies front to back through it.
    scratch: Box<[u8]>,
    /// The command's source ranges, as checked.
    ranges: Vec<(u64, u64)>,
    _not_sync: NotSync,
}

/// The byte the leaf scribbles over destinations it leaves in an unknown
/// state.
const SCRIBBLE: u8 = 0xde;

impl MemCopyChannel {
    fn error(&self, req: &OffloadRequest<'_>, kind: OffloadErrorKind) -> OffloadError {
        let status = match kind {
            // NVMe generic status: Invalid Field in Command, LBA Out of
            // Range; media: Unrecovered Read Error; otherwise aborted.
            OffloadErrorKind::Unsupported | OffloadErrorKind::Limits => DeviceStatus::Nvme {
                sct: 0,
                sc: 0x02,
                dnr: true,
            },
            OffloadErrorKind::OutOfRange => DeviceStatus::Nvme {
                sct: 0,
                sc: 0x80,
                dnr: true,
            },
            OffloadErrorKind::Medium => DeviceStatus::Nvme {
                sct: 2,
                sc: 0x81,
                dnr: false,
            },
            _ => DeviceStatus::Nvme {
                sct: 0,
                sc: 0x07,
                dnr: false,
            },
        };
        req.error(self.info.id, kind, status)
    }

    /// Checks a command against NVMe Copy's rules and this leaf's limits.
    fn validate(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadErrorKind> {
        let limits = crate::nvme_leaf::CopyLimits {
            max_ranges: self.limits.max_ranges as usize,
            max_range_blocks: self.limits.max_range_blocks,
            max_command_blocks: self.limits.max_command_blocks,
            block_count: self.info.block_count,
        };
        crate::nvme_leaf::check_copy(req, &limits, &mut self.ranges)
    }

    /// Copies one range front to back through the scratch buffer.
    fn copy_range(&mut self, memory: &mut SparseMemory, src: u64, dst: u64, blocks: u64) {
        let bs = u64::from(self.info.block_size);
        let (src, dst, len) = (src * bs, dst * bs, blocks * bs);
        let mut done = 0;
        while done < len {
            let run = (len - done).min(self.scratch.len() as u64) as usize;
            // Validated ranges lie inside the device.
            let _ = memory.read(src + done, &mut self.scratch[..run]);
            let _ = memory.write(dst + done, &self.scratch[..run]);
            done += run as u64;
        }
    }

    /// Overwrites `blocks` blocks at `dst` with [`SCRIBBLE`].
    fn scribble(&mut self, memory: &mut SparseMemory, dst: u64, blocks: u64) {
        let bs = u64::from(self.info.block_size);
        let len = blocks * bs;
        let mut done = 0;
        while done < len {
            let run = (len - done).min(self.scratch.len() as u64) as usize;
            self.scratch[..run].fill(SCRIBBLE);
            let _ = memory.write(dst * bs + done, &self.scratch[..run]);
            done += run as u64;
        }
    }

    /// Executes a validated command, with its injected fault if any.
    fn execute(&mut self, req: &OffloadRequest<'_>) -> OffloadOutcome {
        let fault = self.faults.decide(req.ranges.len());
        if let Some(CopyFault::Clean(kind)) = fault {
            return OffloadOutcome::NotDone(self.error(req, kind));
        }
        let chunks_arc = Arc::clone(&self.chunks);
        // Memory contents stay valid across a panic elsewhere.
        let mut chunks = chunks_arc.lock().unwrap_or_else(PoisonError::into_inner);
        match fault {
            Some(CopyFault::DestinationUnknown) => {
                for r in req.ranges {
                    self.scribble(&mut chunks, r.dst, r.blocks);
                }
                OffloadOutcome::DestinationUnknown(self.error(req, OffloadErrorKind::Medium))
            }
            Some(CopyFault::Partial { ranges }) if (ranges as usize) < req.ranges.len() => {
                let copied = &req.ranges[..ranges as usize];
                for r in copied {
                    self.copy_range(&mut chunks, r.src, r.dst, r.blocks);
                }
                self.scribble(&mut chunks, req.ranges[ranges as usize].dst, 1);
                OffloadOutcome::Partial {
                    blocks_done: copied.iter().map(|r| r.blocks).sum(),
                    error: self.error(req, OffloadErrorKind::Medium),
                }
            }
            _ => {
                for r in req.ranges {
                    self.copy_range(&mut chunks, r.src, r.dst, r.blocks);
                }
                OffloadOutcome::Done
            }
        }
    }
}

impl CopyChannel for MemCopyChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    fn submit_copy(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadSubmitError> {
        if self.done.len() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        let outcome = match req.source {
            OffloadSource::SameDevice => {
                if let Err(kind) = self.validate(req) {
                    return Err(OffloadSubmitError::Invalid(self.error(req, kind)));
                }
                self.execute(req)
            }
            // An NVMe namespace copies only within itself.
            OffloadSource::Designator { .. } | OffloadSource::RodToken(_) => {
                OffloadOutcome::NotDone(self.error(req, OffloadErrorKind::Unsupported))
            }
        };
        self.done.push_back(OffloadCompletion {
            ctx: req.ctx,
            outcome,
        });
        Ok(())
    }

    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError> {
        if self.done.len() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        // An NVMe-like leaf has no ROD tokens: Invalid Command Opcode.
        let status = DeviceStatus::Nvme {
            sct: 0,
            sc: 0x01,
            dnr: true,
        };
        self.done
            .push_back(no_rod_tokens(self.info.id, ranges, ctx, status));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize {
        crate::device::drain_completions_into(&mut self.done, out, max)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}
