//! The I/O channel: one queue pair, a slab of request slots sized at open.

use std::collections::VecDeque;

use nvme::{BlockQueue, DataRef, Namespace, NvmeStatus};

use crate::device::{
    Channel, Completion, DeviceId, DeviceInfo, IoOp, IoRequest, NotSync, SubmitError,
};
use crate::error::{IoError, IoErrorKind};

/// Blocks one Write Zeroes command takes (NLB is 16 bits, 0's based).
const WRITE_ZEROES_BLOCKS: u64 = 1 << 16;
/// Ranges one Dataset Management command takes.
const DSM_RANGES: usize = 256;

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
pub(super) struct NvmeChannel<Q: BlockQueue> {
    info: DeviceInfo,
    ns: Namespace,
    qp: Q,
    slots: Vec<IoSlot>,
    free: Vec<u32>,
    /// Completions made by the channel itself (controller failure).
    failed: VecDeque<Completion>,
    /// The controller failed: everything outstanding was failed, and
    /// nothing more is taken.
    dead: bool,
    _not_sync: NotSync,
}

/// Where a request's buffer lies, as the queue takes it.
fn data_ref(buf: &crate::buffer::DmaSlice) -> DataRef {
    DataRef {
        iova: buf.iova(),
        host: buf.host_ptr(),
        len: buf.len(),
    }
}

/// The stack's error kind for an NVMe failure.
pub(crate) fn io_kind(e: nvme::IoError, block_count: u64) -> IoErrorKind {
    match e {
        nvme::IoError::Timeout => IoErrorKind::Timeout,
        nvme::IoError::Aborted => IoErrorKind::Aborted,
        nvme::IoError::Removed => IoErrorKind::DeviceRemoved,
        // The connection failed: the command may have executed; the queue
        // takes nothing until it is connected again.
        nvme::IoError::Disconnected => IoErrorKind::DeviceFailed,
        nvme::IoError::Os { errno } => IoErrorKind::Os { errno },
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

impl<Q: BlockQueue> NvmeChannel<Q> {
    pub(super) fn new(info: DeviceInfo, ns: Namespace, qp: Q, depth: usize) -> Self {
        NvmeChannel {
            info,
            ns,
            qp,
            slots: vec![IoSlot::default(); depth],
            free: (0..depth as u32).rev().collect(),
            failed: VecDeque::with_capacity(depth),
            dead: false,
            _not_sync: NotSync::default(),
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
                // SAFETY: `validate` checked the buffer holds the transfer
                // (and carries an IOVA where the transport needs one); the
                // contract of `Channel::submit` keeps it allocated and
                // untouched until `poll` returns this request's completion,
                // which comes after the queue reports it.
                unsafe { self.qp.read_data(ns, req.lba, data_ref(&req.buf), tag) }
            }
            IoOp::Write => {
                // SAFETY: as for reads.
                unsafe { self.qp.write_data(ns, req.lba, data_ref(&req.buf), tag) }
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

impl<Q: BlockQueue> Channel for NvmeChannel<Q> {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.dead {
            return Err(SubmitError::Invalid(
                req.error(self.info.id, IoErrorKind::DeviceFailed),
            ));
        }
        // Refuses, among others, a buffer of another DMA context
        // (`DeviceInfo::dma_context` is the controller's).
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        match req.op {
            IoOp::WriteZeroes
                if req.blocks.div_ceil(WRITE_ZEROES_BLOCKS) > self.slots.len() as u64 =>
            {
                return Err(SubmitError::Invalid(req.error(
                    self.info.id,
                    IoErrorKind::TooLarge {
                        max_blocks: WRITE_ZEROES_BLOCKS * self.slots.len() as u64,
                    },
                )));
            }
            IoOp::Deallocate if req.blocks > u64::from(u32::MAX) * DSM_RANGES as u64 => {
                return Err(SubmitError::Invalid(req.error(
                    self.info.id,
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
                        req.error(self.info.id, IoErrorKind::DeviceRemoved),
                    )),
                    nvme::SubmitError::Disconnected => Err(SubmitError::Invalid(
                        req.error(self.info.id, IoErrorKind::DeviceFailed),
                    )),
                    nvme::SubmitError::Invalid(why) => {
                        tracing::warn!(device = %self.info.name, why, op = %req.op, lba = req.lba, "NVMe queue pair refused a request");
                        Err(SubmitError::Invalid(
                            req.error(self.info.id, IoErrorKind::DeviceFailed),
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
