//! The NVMe namespace leaf: a [`BlockDevice`] over one namespace of an
//! [`nvme::Controller`], generic over its transport (VFIO or the in-process
//! emulator), so the I/O path inside the leaf is statically dispatched down
//! to the doorbell write.
//!
//! - Each [`Channel`] owns one I/O queue pair (created when the channel
//!   opens); submission validates, stages the command with PRPs built from
//!   the request's [`DmaSlice::iova`] and returns; `poll` rings and harvests.
//!   Per-request state lives in a slab sized at open: nothing is allocated
//!   per I/O.
//! - Buffers must carry IOVAs of the controller's [`DmaContext`]
//!   ([`DeviceInfo::needs_iova`]): allocate them from
//!   [`NvmeNamespace::dma_allocator`] (an [`NvmeDmaAllocator`]).
//! - The description comes from Identify: block size and count, MDTS as the
//!   largest transfer, NOIOB as the optimal boundary, ONCS for write zeroes,
//!   deallocate (advertised when DLFEAT says deallocated blocks read as
//!   zeroes) and Copy. With Copy and non-zero MSRC/MSSRL/MCL the leaf
//!   advertises [`CopyOffload::NvmeCopy`] and opens [`CopyChannel`]s that
//!   send one Copy command per [`OffloadRequest`].
//!
//! Spec leaves (registered in [`crate::spec::LeafRegistry::with_defaults`]):
//! `emu:SIZE[,bs=512|4096][,null][,msrc=N,mssrl=N,mcl=N][,file=PATH][,thread]` opens an
//! in-process emulated controller with one namespace; `nvme:DDDD:BB:DD.F/NSID`
//! opens a namespace of a controller bound to vfio-pci. All `emu:` leaves of
//! a process share one host DMA context ([`emu_dma_context`]) and all
//! `nvme:` leaves one VFIO container ([`vfio_dma_context`]), as SPDK keeps
//! one per process, so one buffer serves a stripe over several controllers.
//! `emu:` and `nvme:` leaves do not share a context: a stack mixing them has
//! no buffer both accept.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use nvme::emu::{Backing, EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::spec::{ONCS_COPY, ONCS_DSM, ONCS_WRITE_ZEROES, ascii_field};
use nvme::vfio::{PciAddress, VfioPci};
use nvme::{
    Controller, ControllerOptions, DmaBuffer, DmaContext, Namespace, NvmeStatus, QueueOptions,
    QueuePair, Transport,
};

use crate::buffer::{DmaAllocator, DmaMemory, DmaSlice};
use crate::device::{
    Access, BlockDevice, Channel, Completion, CopyOffload, DeviceId, DeviceInfo, DeviceKind, IoOp,
    IoRequest, LeafFragment, NotSync, SubmitError, SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::identity::{BackingId, OffloadDomain};
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRequest, OffloadSource, OffloadSubmitError,
};
use crate::spec::{
    LeafError, LeafFactory, LeafSpec, bytes_of, option_value, parse_size, size_option,
};

/// Blocks one Write Zeroes command takes (NLB is 16 bits, 0's based).
const WRITE_ZEROES_BLOCKS: u64 = 1 << 16;
/// Ranges one Dataset Management command takes.
const DSM_RANGES: usize = 256;
/// Source ranges one format-0 Copy command can carry in the queue pair's
/// one descriptor page (4096 / 32).
const COPY_RANGES: u32 = 128;
/// Queue entries at least: the slack lets completion doorbells be batched.
const MIN_QUEUE_ENTRIES: usize = 256;

/// A namespace of an NVMe controller as a block device.
pub struct NvmeNamespace<T: Transport> {
    info: DeviceInfo,
    ctrl: Arc<Controller<T>>,
    ns: Namespace,
    queue: QueueOptions,
}

impl<T: Transport> NvmeNamespace<T> {
    /// The leaf over namespace `nsid` of `ctrl`, described from Identify.
    ///
    /// Errors: [`BdevError::InvalidParameter`] for a namespace the
    /// controller does not have (the reason lists those it has), and
    /// [`BdevError::Nvme`] when Identify Namespace fails.
    pub fn new(ctrl: Arc<Controller<T>>, nsid: u32) -> Result<NvmeNamespace<T>, BdevError> {
        let name = format!("{}/{nsid}", ctrl.name());
        let Some(ns) = ctrl.namespace(nsid) else {
            let have: Vec<String> = ctrl
                .namespaces()
                .iter()
                .map(|n| n.nsid.to_string())
                .collect();
            return Err(BdevError::InvalidParameter {
                device: name,
                parameter: "namespace",
                reason: format!(
                    "no active namespace {nsid} (active: {})",
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            });
        };
        let id_ns = ctrl
            .identify_namespace(nsid)
            .map_err(|source| BdevError::Nvme {
                device: name.clone(),
                action: "Identify Namespace",
                source: Box::new(source),
            })?;
        let ident = ctrl.identify();
        let oncs = ident.oncs.get();
        let mut ops = SupportedOps::READ | SupportedOps::WRITE | SupportedOps::FLUSH;
        if oncs & ONCS_WRITE_ZEROES != 0 {
            ops |= SupportedOps::WRITE_ZEROES;
        }
        // The stack promises zeroes after a deallocate: only where DLFEAT
        // bits 2:0 say deallocated blocks read as zeroes.
        if oncs & ONCS_DSM != 0 && id_ns.dlfeat & 0x7 == 1 {
            ops |= SupportedOps::DEALLOCATE;
        }
        let bs = u64::from(ns.block_size);
        let mut copy_offloads = Vec::new();
        if oncs & ONCS_COPY != 0 && ns.mssrl > 0 && ns.mcl > 0 {
            let nqn = ascii_field(&ident.subnqn);
            copy_offloads.push(CopyOffload::NvmeCopy {
                controller: OffloadDomain::handle(&ctrl),
                subsystem: nqn,
                nsid,
                max_ranges: (u32::from(ns.msrc) + 1).min(COPY_RANGES),
                max_range_blocks: u64::from(ns.mssrl),
                max_command_blocks: u64::from(ns.mcl),
            });
        }
        let info = DeviceInfo {
            id: DeviceId::fresh(),
            name,
            kind: DeviceKind::Nvme,
            block_size: ns.block_size,
            block_count: ns.blocks,
            max_transfer_blocks: (ctrl.max_transfer() as u64 / bs).max(1),
            // PRP entries must be dword aligned.
            buf_align: 4,
            needs_iova: true,
            optimal_boundary_blocks: u64::from(id_ns.noiob.get()),
            ops,
            copy_offloads,
        };
        tracing::info!(
            device = %info.name,
            id = %info.id,
            block_size = info.block_size,
            blocks = info.block_count,
            max_transfer_blocks = info.max_transfer_blocks,
            copy = !info.copy_offloads.is_empty(),
            "NVMe namespace leaf ready"
        );
        Ok(NvmeNamespace {
            info,
            ctrl,
            ns,
            queue: QueueOptions::default(),
        })
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller<T>> {
        &self.ctrl
    }

    /// The namespace as the driver knows it.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// An allocator of buffers valid on this controller (and on every
    /// other controller of its DMA context).
    pub fn dma_allocator(&self) -> Arc<dyn DmaAllocator> {
        Arc::new(NvmeDmaAllocator::new(Arc::clone(
            self.ctrl.transport().dma(),
        )))
    }

    fn with_kind(mut self, kind: DeviceKind) -> NvmeNamespace<T> {
        self.info.kind = kind;
        self
    }

    fn open_qpair(&self, depth: usize) -> Result<QueuePair<T>, BdevError> {
        let entries =
            u16::try_from(depth.saturating_add(1).max(MIN_QUEUE_ENTRIES)).unwrap_or(u16::MAX);
        self.ctrl
            .create_qpair(QueueOptions {
                entries,
                ..self.queue
            })
            .map_err(|source| BdevError::Nvme {
                device: self.info.name.clone(),
                action: "create an I/O queue pair",
                source: Box::new(source),
            })
    }
}

impl<T: Transport> BlockDevice for NvmeNamespace<T> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let qp = self.open_qpair(depth)?;
        let depth = depth.max(1).min(qp.depth());
        Ok(Box::new(NvmeChannel {
            info: self.info.clone(),
            ns: self.ns,
            qp,
            slots: vec![IoSlot::default(); depth],
            free: (0..depth as u32).rev().collect(),
            failed: VecDeque::with_capacity(depth),
            dead: false,
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn backing(&self) -> BackingId {
        BackingId::Namespace {
            controller: OffloadDomain::handle(&self.ctrl),
            nsid: self.ns.nsid,
        }
    }

    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        let Some(CopyOffload::NvmeCopy { max_ranges, .. }) = self.info.copy_offloads.first() else {
            return Ok(None);
        };
        let max_ranges = *max_ranges as usize;
        let qp = self.open_qpair(depth)?;
        let depth = depth.max(1).min(qp.depth());
        Ok(Some(Box::new(NvmeCopyChannel {
            info: self.info.clone(),
            ns: self.ns,
            qp,
            ranges: Vec::with_capacity(max_ranges),
            max_ranges,
            slots: (0..depth)
                .map(|_| CopySlot {
                    ctx: 0,
                    dst: 0,
                    range_blocks: Vec::with_capacity(max_ranges),
                    busy: false,
                })
                .collect(),
            free: (0..depth as u32).rev().collect(),
            ready: VecDeque::with_capacity(depth),
            depth,
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

/// What a channel remembers of a request while the device has it.
#[derive(Debug, Clone, Copy)]
struct IoSlot {
    ctx: u64,
    op: IoOp,
    lba: u64,
    blocks: u64,
    busy: bool,
}

impl Default for IoSlot {
    fn default() -> IoSlot {
        IoSlot {
            ctx: 0,
            op: IoOp::Read,
            lba: 0,
            blocks: 0,
            busy: false,
        }
    }
}

/// The I/O channel: one queue pair.
struct NvmeChannel<T: Transport> {
    info: DeviceInfo,
    ns: Namespace,
    qp: QueuePair<T>,
    slots: Vec<IoSlot>,
    free: Vec<u32>,
    /// Completions made by the channel itself (controller failure).
    failed: VecDeque<Completion>,
    /// The controller failed: everything outstanding was failed, and
    /// nothing more is taken.
    dead: bool,
    _not_sync: NotSync,
}

/// The stack's error kind for an NVMe failure.
fn io_kind(e: nvme::IoError, block_count: u64) -> IoErrorKind {
    match e {
        nvme::IoError::Timeout => IoErrorKind::Timeout,
        nvme::IoError::Aborted => IoErrorKind::Aborted,
        nvme::IoError::Removed => IoErrorKind::DeviceRemoved,
        nvme::IoError::Status(s) => {
            if s.sct == nvme::spec::sct::MEDIA {
                IoErrorKind::Medium
            } else if s.same_code(NvmeStatus::LBA_OUT_OF_RANGE) {
                IoErrorKind::OutOfRange { block_count }
            } else if s.same_code(NvmeStatus::INVALID_OPCODE) {
                IoErrorKind::Unsupported
            } else {
                IoErrorKind::Nvme {
                    sct: s.sct,
                    sc: s.sc,
                    dnr: s.dnr,
                }
            }
        }
    }
}

impl<T: Transport> NvmeChannel<T> {
    fn error(&self, req: &IoRequest, kind: IoErrorKind) -> IoError {
        IoError {
            device: self.info.id,
            op: req.op,
            lba: req.lba,
            blocks: req.blocks,
            kind,
        }
    }

    /// Fails every outstanding request with [`IoErrorKind::DeviceFailed`]
    /// and stops taking new ones.
    fn fail_all(&mut self) {
        self.dead = true;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.busy {
                slot.busy = false;
                self.free.push(i as u32);
                self.failed.push_back(Completion {
                    ctx: slot.ctx,
                    result: Err(IoError {
                        device: self.info.id,
                        op: slot.op,
                        lba: slot.lba,
                        blocks: slot.blocks,
                        kind: IoErrorKind::DeviceFailed,
                    }),
                });
            }
        }
    }

    /// Stages the command for `req` (validated) with tag `slot`.
    fn stage(&mut self, req: &IoRequest, slot: u32) -> Result<(), nvme::SubmitError> {
        let tag = u64::from(slot);
        let ns = &self.ns;
        match req.op {
            IoOp::Read => {
                let iova = req.buf.iova().unwrap_or(0);
                // SAFETY: `validate` checked the buffer carries an IOVA and
                // holds the transfer; the contract of `Channel::submit`
                // keeps it allocated and untouched until `poll` returns
                // this request's completion, which comes after the queue
                // pair reports it.
                unsafe { self.qp.read_iova(ns, req.lba, iova, req.buf.len(), tag) }
            }
            IoOp::Write => {
                let iova = req.buf.iova().unwrap_or(0);
                // SAFETY: as for reads.
                unsafe { self.qp.write_iova(ns, req.lba, iova, req.buf.len(), tag) }
            }
            IoOp::Flush => self.qp.flush(ns, tag),
            IoOp::WriteZeroes => self.qp.write_zeroes(ns, req.lba, req.blocks, tag),
            IoOp::Deallocate => {
                let mut ranges = [(0u64, 0u32); DSM_RANGES];
                let (mut lba, mut left, mut n) = (req.lba, req.blocks, 0);
                while left > 0 {
                    let take = left.min(u64::from(u32::MAX));
                    ranges[n] = (lba, take as u32);
                    lba += take;
                    left -= take;
                    n += 1;
                }
                self.qp.deallocate(ns, &ranges[..n], tag)
            }
        }
    }
}

impl<T: Transport> Channel for NvmeChannel<T> {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.dead {
            return Err(SubmitError::Invalid(
                self.error(&req, IoErrorKind::DeviceFailed),
            ));
        }
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        match req.op {
            IoOp::WriteZeroes
                if req.blocks.div_ceil(WRITE_ZEROES_BLOCKS) > self.slots.len() as u64 =>
            {
                return Err(SubmitError::Invalid(self.error(
                    &req,
                    IoErrorKind::TooLarge {
                        max_blocks: WRITE_ZEROES_BLOCKS * self.slots.len() as u64,
                    },
                )));
            }
            IoOp::Deallocate if req.blocks > u64::from(u32::MAX) * DSM_RANGES as u64 => {
                return Err(SubmitError::Invalid(self.error(
                    &req,
                    IoErrorKind::TooLarge {
                        max_blocks: u64::from(u32::MAX) * DSM_RANGES as u64,
                    },
                )));
            }
            _ => {}
        }
        let Some(slot) = self.free.pop() else {
            return Err(SubmitError::Busy);
        };
        match self.stage(&req, slot) {
            Ok(()) => {
                self.slots[slot as usize] = IoSlot {
                    ctx: req.ctx,
                    op: req.op,
                    lba: req.lba,
                    blocks: req.blocks,
                    busy: true,
                };
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                match e {
                    nvme::SubmitError::QueueFull => Err(SubmitError::Busy),
                    nvme::SubmitError::Removed => Err(SubmitError::Invalid(
                        self.error(&req, IoErrorKind::DeviceRemoved),
                    )),
                    nvme::SubmitError::Invalid(why) => {
                        tracing::warn!(device = %self.info.name, why, op = %req.op, lba = req.lba, "NVMe queue pair refused a request");
                        Err(SubmitError::Invalid(
                            self.error(&req, IoErrorKind::DeviceFailed),
                        ))
                    }
                }
            }
        }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = crate::device::drain_completions(&mut self.failed, out);
        if n == out.len() || self.dead {
            return n;
        }
        let (id, block_count) = (self.info.id, self.info.block_count);
        let (slots, free) = (&mut self.slots, &mut self.free);
        let polled = self.qp.poll(out.len() - n, |c| {
            let Some(slot) = usize::try_from(c.tag).ok().and_then(|i| slots.get_mut(i)) else {
                return;
            };
            if !slot.busy {
                return;
            }
            slot.busy = false;
            free.push(c.tag as u32);
            out[n] = Completion {
                ctx: slot.ctx,
                result: c.result.map(|_| ()).map_err(|e| IoError {
                    device: id,
                    op: slot.op,
                    lba: slot.lba,
                    blocks: slot.blocks,
                    kind: io_kind(e, block_count),
                }),
            };
            n += 1;
        });
        match polled {
            Ok(_) => {}
            Err(nvme::Error::BadDeviceData { what, .. }) => {
                // The driver consumed and ignored the bad entries.
                tracing::warn!(device = %self.info.name, what, "bad completion from the device ignored");
            }
            Err(e) => {
                tracing::error!(device = %self.info.name, error = %e, "NVMe queue pair failed; failing outstanding I/O");
                self.fail_all();
                n += crate::device::drain_completions(&mut self.failed, &mut out[n..]);
            }
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len() + self.failed.len()
    }
}

/// A copy command in flight.
struct CopySlot {
    ctx: u64,
    dst: u64,
    /// Blocks of each source range, in order (for partial completions).
    range_blocks: Vec<u64>,
    busy: bool,
}

/// The copy channel: NVMe Copy (format 0) through a queue pair of its own.
struct NvmeCopyChannel<T: Transport> {
    info: DeviceInfo,
    ns: Namespace,
    qp: QueuePair<T>,
    /// The current command's `(slba, blocks)` source ranges.
    ranges: Vec<(u64, u64)>,
    /// Source ranges per command (MSRC + 1, at most one descriptor page).
    max_ranges: usize,
    slots: Vec<CopySlot>,
    free: Vec<u32>,
    /// Completions decided without the device.
    ready: VecDeque<OffloadCompletion>,
    depth: usize,
    _not_sync: NotSync,
}

/// What an NVMe Copy failure means for the destination: the status, and
/// DW0 (the first source range not copied).
fn copy_outcome(
    error: nvme::IoError,
    dw0: u32,
    range_blocks: &[u64],
    mut make: impl FnMut(OffloadErrorKind, DeviceStatus) -> OffloadError,
) -> OffloadOutcome {
    let status = match error.status() {
        Some(s) => DeviceStatus::Nvme {
            sct: s.sct,
            sc: s.sc,
            dnr: s.dnr,
        },
        None => DeviceStatus::None,
    };
    let Some(s) = error.status().filter(|_| error != nvme::IoError::Aborted) else {
        // Timed out or aborted by a reset: nothing is known.
        return OffloadOutcome::DestinationUnknown(make(OffloadErrorKind::NotExecuted, status));
    };
    // Checked before anything is copied (NVM Command Set 3.3.1: limits,
    // descriptor format, opcode, namespace).
    let not_done = if s.same_code(NvmeStatus::CMD_SIZE_LIMIT) {
        Some(OffloadErrorKind::Limits)
    } else if s.same_code(NvmeStatus::INVALID_FIELD)
        || s.same_code(NvmeStatus::INVALID_OPCODE)
        || s.same_code(NvmeStatus::INVALID_FORMAT)
    {
        Some(OffloadErrorKind::Unsupported)
    } else if s.same_code(NvmeStatus::INVALID_NAMESPACE) {
        Some(OffloadErrorKind::OutOfRange)
    } else if s.sct == nvme::spec::sct::GENERIC && (s.sc == 0x82 || s.sc == 0x20) {
        // Namespace Not Ready, Namespace is Write Protected.
        Some(OffloadErrorKind::NotExecuted)
    } else {
        None
    };
    if let Some(kind) = not_done {
        return OffloadOutcome::NotDone(make(kind, status));
    }
    let kind = if s.sct == nvme::spec::sct::MEDIA {
        OffloadErrorKind::Medium
    } else if s.same_code(NvmeStatus::LBA_OUT_OF_RANGE) {
        OffloadErrorKind::OutOfRange
    } else {
        OffloadErrorKind::NotExecuted
    };
    // DW0: the lowest numbered source range not copied; the ones before it
    // were. A value of 0 or beyond the ranges says nothing is known done.
    let first_failed = dw0 as usize;
    if first_failed > 0 && first_failed < range_blocks.len() {
        return OffloadOutcome::Partial {
            blocks_done: range_blocks[..first_failed].iter().sum(),
            error: make(kind, status),
        };
    }
    if first_failed == 0 && s.same_code(NvmeStatus::LBA_OUT_OF_RANGE) {
        // The first range failed its range check: nothing was written.
        return OffloadOutcome::NotDone(make(kind, status));
    }
    OffloadOutcome::DestinationUnknown(make(kind, status))
}

impl<T: Transport> NvmeCopyChannel<T> {
    fn error(
        &self,
        req: &OffloadRequest<'_>,
        kind: OffloadErrorKind,
        status: DeviceStatus,
    ) -> OffloadError {
        OffloadError {
            device: self.info.id,
            dst_lba: req.ranges.first().map_or(0, |r| r.dst),
            blocks: req.blocks(),
            kind,
            status,
        }
    }

    /// Checks a command against NVMe Copy's shape and the namespace's
    /// limits, filling `self.ranges`.
    fn prepare(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadErrorKind> {
        let ns = self.ns;
        let Some(first) = req.ranges.first() else {
            return Err(OffloadErrorKind::OutOfRange);
        };
        if req.ranges.len() > self.max_ranges {
            return Err(OffloadErrorKind::Limits);
        }
        self.ranges.clear();
        let mut total = 0u64;
        let mut next_dst = first.dst;
        for r in req.ranges {
            let inside = |start: u64| start.checked_add(r.blocks).is_some_and(|e| e <= ns.blocks);
            if r.blocks == 0 || !inside(r.src) || !inside(r.dst) {
                return Err(OffloadErrorKind::OutOfRange);
            }
            if r.blocks > u64::from(ns.mssrl) || r.dst != next_dst {
                return Err(OffloadErrorKind::Limits);
            }
            next_dst += r.blocks;
            total += r.blocks;
            self.ranges.push((r.src, r.blocks));
        }
        if total > u64::from(ns.mcl) {
            return Err(OffloadErrorKind::Limits);
        }
        Ok(())
    }
}

impl<T: Transport> CopyChannel for NvmeCopyChannel<T> {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    fn submit_copy(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadSubmitError> {
        if self.outstanding() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        if !matches!(req.source, OffloadSource::SameDevice) {
            // A namespace copies only within itself.
            let error = self.error(req, OffloadErrorKind::Unsupported, DeviceStatus::None);
            self.ready.push_back(OffloadCompletion {
                ctx: req.ctx,
                outcome: OffloadOutcome::NotDone(error),
            });
            return Ok(());
        }
        if let Err(kind) = self.prepare(req) {
            return Err(OffloadSubmitError::Invalid(self.error(
                req,
                kind,
                DeviceStatus::None,
            )));
        }
        let Some(slot) = self.free.pop() else {
            return Err(OffloadSubmitError::Busy);
        };
        let dst = req.ranges.first().map_or(0, |r| r.dst);
        match self
            .qp
            .copy_single(&self.ns, &self.ranges, dst, u64::from(slot))
        {
            Ok(()) => {
                let s = &mut self.slots[slot as usize];
                s.ctx = req.ctx;
                s.dst = dst;
                s.busy = true;
                s.range_blocks.clear();
                s.range_blocks.extend(self.ranges.iter().map(|r| r.1));
                Ok(())
            }
            Err(nvme::SubmitError::QueueFull) => {
                self.free.push(slot);
                Err(OffloadSubmitError::Busy)
            }
            Err(nvme::SubmitError::Removed) => {
                self.free.push(slot);
                Err(OffloadSubmitError::Invalid(self.error(
                    req,
                    OffloadErrorKind::NotExecuted,
                    DeviceStatus::None,
                )))
            }
            Err(nvme::SubmitError::Invalid(why)) => {
                self.free.push(slot);
                tracing::warn!(device = %self.info.name, why, "NVMe queue pair refused a Copy");
                Err(OffloadSubmitError::Invalid(self.error(
                    req,
                    OffloadErrorKind::Limits,
                    DeviceStatus::None,
                )))
            }
        }
    }

    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError> {
        if self.outstanding() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        // NVMe has no ROD tokens.
        let error = OffloadError {
            device: self.info.id,
            dst_lba: ranges.first().map_or(0, |r| r.lba),
            blocks: ranges.iter().map(|r| r.blocks).sum(),
            kind: OffloadErrorKind::Unsupported,
            status: DeviceStatus::None,
        };
        self.ready.push_back(OffloadCompletion {
            ctx,
            outcome: OffloadOutcome::NotDone(error),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize {
        let mut n = crate::device::drain_completions_into(&mut self.ready, out, max);
        if n == max {
            return n;
        }
        let id = self.info.id;
        let (slots, free) = (&mut self.slots, &mut self.free);
        let polled = self.qp.poll(max - n, |c| {
            let Some(slot) = usize::try_from(c.tag).ok().and_then(|i| slots.get_mut(i)) else {
                return;
            };
            if !slot.busy {
                return;
            }
            slot.busy = false;
            free.push(c.tag as u32);
            let blocks = slot.range_blocks.iter().sum();
            let dst = slot.dst;
            let outcome = match c.result {
                Ok(_) => OffloadOutcome::Done,
                Err(e) => copy_outcome(e, c.dw0, &slot.range_blocks, |kind, status| OffloadError {
                    device: id,
                    dst_lba: dst,
                    blocks,
                    kind,
                    status,
                }),
            };
            out.push(OffloadCompletion {
                ctx: slot.ctx,
                outcome,
            });
            n += 1;
        });
        if let Err(e) = polled {
            if matches!(e, nvme::Error::BadDeviceData { .. }) {
                tracing::warn!(device = %self.info.name, error = %e, "bad completion from the device ignored");
            } else {
                // The controller failed: every command in flight left its
                // destination in an unknown state.
                tracing::error!(device = %self.info.name, error = %e, "NVMe queue pair failed; failing outstanding copies");
                for (i, slot) in self.slots.iter_mut().enumerate() {
                    if slot.busy {
                        slot.busy = false;
                        self.free.push(i as u32);
                        self.ready.push_back(OffloadCompletion {
                            ctx: slot.ctx,
                            outcome: OffloadOutcome::DestinationUnknown(OffloadError {
                                device: id,
                                dst_lba: slot.dst,
                                blocks: slot.range_blocks.iter().sum(),
                                kind: OffloadErrorKind::NotExecuted,
                                status: DeviceStatus::None,
                            }),
                        });
                    }
                }
            }
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }
}

/// Allocates buffers from an NVMe [`DmaContext`]: every controller of the
/// context accepts them.
#[derive(Debug, Clone)]
pub struct NvmeDmaAllocator {
    ctx: Arc<DmaContext>,
}

impl NvmeDmaAllocator {
    /// An allocator over `ctx`.
    pub fn new(ctx: Arc<DmaContext>) -> NvmeDmaAllocator {
        NvmeDmaAllocator { ctx }
    }

    /// The context.
    pub fn context(&self) -> &Arc<DmaContext> {
        &self.ctx
    }

    /// A buffer of `len` bytes, typed (for [`crate::OwnedChannel`]).
    pub fn alloc(&self, len: usize) -> Result<NvmeDmaBuffer, BdevError> {
        let buf = self.ctx.alloc(len).map_err(|source| BdevError::Nvme {
            device: "DMA context".into(),
            action: "allocate a DMA buffer",
            source: Box::new(source),
        })?;
        Ok(NvmeDmaBuffer { buf })
    }
}

impl DmaAllocator for NvmeDmaAllocator {
    fn allocate(&self, len: usize) -> Result<Box<dyn DmaMemory>, BdevError> {
        Ok(Box::new(self.alloc(len)?))
    }
}

/// A DMA buffer of an NVMe context as stack I/O memory. Its bytes are only
/// reached by copies (volatile), never by reference: a device may write
/// them.
#[derive(Debug)]
pub struct NvmeDmaBuffer {
    buf: DmaBuffer,
}

impl NvmeDmaBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false: empty buffers cannot be allocated.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Copies bytes out of the buffer at `offset`.
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<(), BdevError> {
        self.buf.read_bytes(offset, dst).map_err(dma_error)
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<(), BdevError> {
        self.buf.write_bytes(offset, src).map_err(dma_error)
    }

    /// The driver's buffer.
    pub fn inner(&self) -> &DmaBuffer {
        &self.buf
    }
}

fn dma_error(source: nvme::Error) -> BdevError {
    BdevError::Nvme {
        device: "DMA buffer".into(),
        action: "access a DMA buffer",
        source: Box::new(source),
    }
}

// SAFETY: the mapping is owned by the `DmaBuffer`, page-aligned, neither
// moved nor freed while it lives, and its IOVA maps exactly it in the
// context's IOMMU domain (or host IOVA table).
unsafe impl DmaMemory for NvmeDmaBuffer {
    fn dma_slice(&mut self) -> DmaSlice {
        let ptr = NonNull::new(self.buf.as_ptr()).unwrap_or(NonNull::dangling());
        // SAFETY: `ptr..ptr + len` is the buffer's own mapping (library
        // memory, never caller stack or heap) and `iova` maps it.
        unsafe { DmaSlice::from_raw_parts(ptr, self.buf.len(), Some(self.buf.iova())) }
    }
}

/// The host DMA context every `emu:` leaf of the process uses (one, so a
/// buffer serves a stack over several emulated controllers).
pub fn emu_dma_context() -> Arc<DmaContext> {
    static CTX: OnceLock<Arc<DmaContext>> = OnceLock::new();
    Arc::clone(CTX.get_or_init(DmaContext::host))
}

/// Buffers for stacks of `emu:` leaves.
pub fn emu_dma_allocator() -> Arc<dyn DmaAllocator> {
    Arc::new(NvmeDmaAllocator::new(emu_dma_context()))
}

/// The VFIO container every `nvme:` leaf of the process joins (one, like
/// SPDK's, so a buffer serves a stripe over several controllers). Created
/// on first use; buffers can be allocated once a controller is open in it.
pub fn vfio_dma_context() -> Result<Arc<DmaContext>, BdevError> {
    static CTX: Mutex<Option<Arc<DmaContext>>> = Mutex::new(None);
    let mut ctx = CTX.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(c) = ctx.as_ref() {
        return Ok(Arc::clone(c));
    }
    let c = DmaContext::vfio().map_err(|source| BdevError::Nvme {
        device: "VFIO container".into(),
        action: "open /dev/vfio/vfio",
        source: Box::new(source),
    })?;
    *ctx = Some(Arc::clone(&c));
    Ok(c)
}

/// Buffers for stacks of `nvme:` leaves.
pub fn vfio_dma_allocator() -> Result<Arc<dyn DmaAllocator>, BdevError> {
    Ok(Arc::new(NvmeDmaAllocator::new(vfio_dma_context()?)))
}

/// The allocator whose buffers every leaf under `device` accepts: the
/// emulators' context for stacks with `emu:` leaves, the VFIO container for
/// stacks with `nvme:` leaves, host memory when no leaf needs an IOVA.
///
/// Errors: [`BdevError::InvalidParameter`] for a stack that mixes `emu:`
/// and `nvme:` leaves (no one context serves both), and the VFIO
/// container's error.
pub fn dma_allocator_for(
    device: &Arc<dyn BlockDevice>,
) -> Result<Arc<dyn DmaAllocator>, BdevError> {
    fn walk(d: &Arc<dyn BlockDevice>, emu: &mut bool, vfio: &mut bool) {
        let members = d.members();
        let info = d.info();
        if members.is_empty() && info.needs_iova {
            match info.kind {
                DeviceKind::Emulated => *emu = true,
                _ => *vfio = true,
            }
        }
        for m in &members {
            walk(m, emu, vfio);
        }
    }
    let (mut emu, mut vfio) = (false, false);
    walk(device, &mut emu, &mut vfio);
    match (emu, vfio) {
        (true, true) => Err(BdevError::InvalidParameter {
            device: device.info().name.clone(),
            parameter: "leaves",
            reason: "mixes emu: and nvme: leaves; no DMA context serves both".into(),
        }),
        (true, false) => Ok(emu_dma_allocator()),
        (false, true) => vfio_dma_allocator(),
        (false, false) => Ok(Arc::new(crate::buffer::HostAllocator)),
    }
}

/// The controller at `addr`, opened in the process's VFIO container and
/// brought up on first use; shared by every leaf over its namespaces (a
/// device can be opened through VFIO only once).
pub fn vfio_controller(addr: &str) -> Result<Arc<Controller<VfioPci>>, BdevError> {
    static OPEN: Mutex<Option<HashMap<String, Weak<Controller<VfioPci>>>>> = Mutex::new(None);
    let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    let map = open.get_or_insert_with(HashMap::new);
    if let Some(ctrl) = map.get(addr).and_then(Weak::upgrade) {
        return Ok(ctrl);
    }
    let ctx = vfio_dma_context()?;
    let nvme_err = |action, source| BdevError::Nvme {
        device: addr.to_string(),
        action,
        source: Box::new(source),
    };
    let dev = VfioPci::open_in(&ctx, addr).map_err(|e| nvme_err("open through VFIO", e))?;
    let ctrl = Arc::new(
        Controller::new(dev, ControllerOptions::default())
            .map_err(|e| nvme_err("bring the controller up", e))?,
    );
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(addr.to_string(), Arc::downgrade(&ctrl));
    Ok(ctrl)
}

/// Opens namespace `nsid` of the controller at PCI address `addr` (bound
/// to vfio-pci) as a leaf.
pub fn open_vfio_namespace(addr: &str, nsid: u32) -> Result<NvmeNamespace<VfioPci>, BdevError> {
    NvmeNamespace::new(vfio_controller(addr)?, nsid)
}

/// An emulated namespace for [`open_emu_namespace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuNamespace {
    /// Size in bytes (a multiple of the block size).
    pub size: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// No data (reads return nothing, writes are dropped): for overhead
    /// benchmarks.
    pub null: bool,
    /// MSRC (0's based), MSSRL, MCL: Copy limits; zero MSSRL or MCL turns
    /// Copy off.
    pub copy: (u8, u16, u32),
    /// Keep the blocks in this file (created if missing, extended to the
    /// size) instead of sparse memory, so they outlive the controller: a
    /// store can be closed, or lose power, and be opened again.
    pub file: Option<PathBuf>,
    /// Run the controller on a thread of its own, as a drive works beside
    /// the host, instead of inside the doorbell write.
    pub threaded: bool,
}

impl EmuNamespace {
    /// A memory-backed namespace with the VM rig's Copy limits (MSRC 15,
    /// MSSRL 128, MCL 256).
    pub fn memory(size: u64, block_size: u32) -> EmuNamespace {
        EmuNamespace {
            size,
            block_size,
            null: false,
            copy: (15, 128, 256),
            file: None,
            threaded: false,
        }
    }
}

/// Opens an in-process emulated controller (inline: a doorbell write
/// processes the queue) with one namespace, in the process's emulator DMA
/// context, as a leaf.
pub fn open_emu_namespace(cfg: EmuNamespace) -> Result<NvmeNamespace<EmuController>, BdevError> {
    let bs = u64::from(cfg.block_size);
    let invalid = |parameter, reason: String| BdevError::InvalidParameter {
        device: "emu".into(),
        parameter,
        reason,
    };
    if cfg.block_size != 512 && cfg.block_size != 4096 {
        return Err(invalid(
            "block size",
            format!(
                "{}: emulated namespaces have 512 or 4096-byte blocks",
                cfg.block_size
            ),
        ));
    }
    if cfg.size == 0 || !cfg.size.is_multiple_of(bs) {
        return Err(invalid(
            "size",
            format!("{} is not a non-zero multiple of {bs}", cfg.size),
        ));
    }
    let blocks = cfg.size / bs;
    let mut ns = match (&cfg.file, cfg.null) {
        (Some(_), true) => {
            return Err(invalid(
                "backing",
                "a null namespace keeps no data, so it takes no file".into(),
            ));
        }
        (None, true) => NamespaceConfig::null(cfg.block_size, blocks),
        (file, false) => NamespaceConfig {
            backing: file.clone().map_or(Backing::Memory, Backing::File),
            ..NamespaceConfig::memory(cfg.block_size, blocks)
        },
    };
    (ns.msrc, ns.mssrl, ns.mcl) = cfg.copy;
    let ctx = emu_dma_context();
    let id = DeviceId::fresh();
    let emu = EmuController::new(
        &ctx,
        EmuConfig {
            serial: format!("EMU{:05}", id.0),
            mqes: 4095,
            namespaces: vec![ns],
            mode: if cfg.threaded {
                EmuMode::Thread
            } else {
                EmuMode::Inline
            },
            ..EmuConfig::default()
        },
    )
    .map_err(|source| BdevError::Nvme {
        device: "emu".into(),
        action: "create the emulated controller",
        source: Box::new(source),
    })?;
    let name = emu.name();
    let ctrl =
        Controller::new(emu, ControllerOptions::default()).map_err(|source| BdevError::Nvme {
            device: name,
            action: "bring the emulated controller up",
            source: Box::new(source),
        })?;
    Ok(NvmeNamespace::new(Arc::new(ctrl), 1)?.with_kind(DeviceKind::Emulated))
}

/// Opens `emu:SIZE[,bs=512|4096][,null][,msrc=N][,mssrl=N][,mcl=N][,file=PATH][,thread]`
/// leaves.
pub(crate) struct EmuFactory;

impl LeafFactory for EmuFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        const ALLOWED: &[&str] = &["bs", "null", "msrc", "mssrl", "mcl", "file", "thread"];
        let size = parse_size(spec.body)
            .map(bytes_of)
            .map_err(LeafError::BadBody)?;
        let block_size = match size_option(spec, ALLOWED, "bs")? {
            None => 512,
            Some(bs @ (512 | 4096)) => bs as u32,
            Some(bs) => {
                return Err(LeafError::BadOption {
                    key: "bs".into(),
                    reason: format!("{bs}: emulated namespaces have 512 or 4096-byte blocks"),
                });
            }
        };
        let flag = |key: &str| match option_value(spec, ALLOWED, key)? {
            None => Ok(false),
            Some("") => Ok(true),
            Some(v) => Err(LeafError::BadOption {
                key: key.to_string(),
                reason: format!("`{key}` is a flag and takes no value (got `{v}`)"),
            }),
        };
        let null = flag("null")?;
        let threaded = flag("thread")?;
        let file = match option_value(spec, ALLOWED, "file")? {
            None => None,
            Some("") => {
                return Err(LeafError::BadOption {
                    key: "file".into(),
                    reason: "needs a path: file=PATH".into(),
                });
            }
            Some(path) => Some(PathBuf::from(path)),
        };
        let number = |key: &str, max: u64| -> Result<Option<u64>, LeafError> {
            option_value(spec, ALLOWED, key)?
                .map(|v| match v.parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(LeafError::BadOption {
                        key: key.to_string(),
                        reason: format!("`{v}` is not a number in 0..={max}"),
                    }),
                })
                .transpose()
        };
        let rig = EmuNamespace::memory(size, block_size).copy;
        let copy = (
            number("msrc", 127)?.map_or(rig.0, |n| n as u8),
            number("mssrl", u64::from(u16::MAX))?.map_or(rig.1, |n| n as u16),
            number("mcl", u64::from(u32::MAX))?.map_or(rig.2, |n| n as u32),
        );
        let ns = open_emu_namespace(EmuNamespace {
            size,
            block_size,
            null,
            copy,
            file,
            threaded,
        })?;
        Ok(Arc::new(ns))
    }
}

/// Opens `nvme:DDDD:BB:DD.F/NSID` leaves.
pub(crate) struct NvmeFactory;

impl LeafFactory for NvmeFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        if let Some(o) = spec.options.first() {
            return Err(LeafError::BadOption {
                key: o.key.to_string(),
                reason: "nvme: takes no options".into(),
            });
        }
        let Some((addr, nsid)) = spec.body.rsplit_once('/') else {
            return Err(LeafError::BadBody(format!(
                "`{}`: expected DDDD:BB:DD.F/NSID, e.g. 0000:00:04.0/1",
                spec.body
            )));
        };
        addr.parse::<PciAddress>()
            .map_err(|e| LeafError::BadBody(e.to_string()))?;
        let nsid = match nsid.parse::<u32>() {
            Ok(n) if n > 0 && n != u32::MAX => n,
            _ => {
                return Err(LeafError::BadBody(format!(
                    "`{nsid}` is not a namespace id (1 to 0xfffffffe)"
                )));
            }
        };
        Ok(Arc::new(open_vfio_namespace(addr, nsid)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_error(s: NvmeStatus) -> nvme::IoError {
        nvme::IoError::Status(s)
    }

    fn outcome(e: nvme::IoError, dw0: u32) -> OffloadOutcome {
        copy_outcome(e, dw0, &[8, 16, 32], |kind, status| OffloadError {
            device: DeviceId(1),
            dst_lba: 100,
            blocks: 56,
            kind,
            status,
        })
    }

    #[test]
    fn copy_failures_map_to_what_the_destination_holds() {
        assert!(matches!(
            outcome(status_error(NvmeStatus::CMD_SIZE_LIMIT), 0),
            OffloadOutcome::NotDone(OffloadError {
                kind: OffloadErrorKind::Limits,
                ..
            })
        ));
        assert!(matches!(
            outcome(status_error(NvmeStatus::INVALID_FIELD), 0),
            OffloadOutcome::NotDone(OffloadError {
                kind: OffloadErrorKind::Unsupported,
                ..
            })
        ));
        // DW0 = 2: ranges 0 and 1 were copied.
        assert_eq!(
            match outcome(status_error(NvmeStatus::UNRECOVERED_READ), 2) {
                OffloadOutcome::Partial { blocks_done, error } => {
                    assert_eq!(error.kind, OffloadErrorKind::Medium);
                    blocks_done
                }
                other => panic!("{other:?}"),
            },
            24
        );
        // A media error in range 0, and any failure with DNR and no
        // progress: the destination is unknown.
        assert!(matches!(
            outcome(status_error(NvmeStatus::WRITE_FAULT), 0),
            OffloadOutcome::DestinationUnknown(_)
        ));
        assert!(matches!(
            outcome(status_error(NvmeStatus::INTERNAL_ERROR.dnr()), 0),
            OffloadOutcome::DestinationUnknown(_)
        ));
        // DW0 beyond the ranges says nothing usable.
        assert!(matches!(
            outcome(status_error(NvmeStatus::UNRECOVERED_READ), 7),
            OffloadOutcome::DestinationUnknown(_)
        ));
        assert!(matches!(
            outcome(nvme::IoError::Timeout, 0),
            OffloadOutcome::DestinationUnknown(_)
        ));
        assert!(matches!(
            outcome(nvme::IoError::Aborted, 0),
            OffloadOutcome::DestinationUnknown(_)
        ));
        assert!(matches!(
            outcome(status_error(NvmeStatus::LBA_OUT_OF_RANGE), 0),
            OffloadOutcome::NotDone(OffloadError {
                kind: OffloadErrorKind::OutOfRange,
                ..
            })
        ));
    }

    #[test]
    fn channels_are_send() {
        fn send<T: Send>() {}
        send::<NvmeChannel<EmuController>>();
        send::<NvmeCopyChannel<VfioPci>>();
        send::<NvmeDmaBuffer>();
    }
}
