//! The I/O channel: a ring of its own, a slab of request slots sized at
//! open, NVMe commands built by `nvme::cmd` and carried as passthrough.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{cqueue, squeue};
use nvme::cmd::{Deallocate, Flush, Prps, Read, Write, WriteZeroes};
use nvme::spec::{DsmRange, SubmissionEntry};
use zerocopy::IntoBytes;

use super::sys::{self, Outcome, PassthruCmd};
use crate::device::{
    Channel, Completion, DeviceId, DeviceInfo, IoOp, IoRequest, NotSync, SubmitError,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::registered::RegisteredMemory;
use crate::uring::Ring;

/// Blocks one Write Zeroes command takes (NLB is 16 bits, 0's based).
const WRITE_ZEROES_BLOCKS: u64 = 1 << 16;
/// Write Zeroes commands one request may become.
const WRITE_ZEROES_PARTS: u64 = 16;
/// Dataset Management ranges one request may carry (each up to 2^32 - 1
/// blocks).
const DSM_RANGES: usize = 16;

/// What a channel remembers of a request while the kernel has it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    ctx: u64,
    op: IoOp,
    lba: u64,
    blocks: u64,
    /// Commands of the request not yet completed.
    parts: u32,
    /// The first failure among its commands.
    error: Option<IoErrorKind>,
}

/// The stack's error kind for a passthrough completion.
pub(super) fn io_kind(outcome: Outcome, block_count: u64) -> Option<IoErrorKind> {
    sys::io_error(outcome).map(|e| crate::nvme_leaf::io_kind(e, block_count))
}

/// The I/O channel of an `ng:` leaf.
pub(super) struct NgChannel {
    info: DeviceInfo,
    file: Arc<File>,
    nsid: u32,
    ring: Ring<squeue::Entry128, cqueue::Entry32>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Dataset Management ranges, one set per slot, alive while the
    /// kernel has the command.
    dsm: Vec<[DsmRange; DSM_RANGES]>,
    /// Completions decided without the kernel.
    ready: VecDeque<Completion>,
    /// The leaf's registered memory, when this ring registered it.
    registered: Option<Arc<RegisteredMemory>>,
    _not_sync: NotSync,
}

impl NgChannel {
    pub(super) fn new(
        info: DeviceInfo,
        file: Arc<File>,
        nsid: u32,
        depth: usize,
        polled: bool,
        registered: Option<Arc<RegisteredMemory>>,
    ) -> Result<NgChannel, BdevError> {
        // A request is at most WRITE_ZEROES_PARTS commands.
        let mut ring = Ring::new(
            &info.name,
            depth + WRITE_ZEROES_PARTS as usize,
            depth * WRITE_ZEROES_PARTS as usize,
            polled,
        )?;
        let registered = registered.filter(|memory| ring.register(&info.name, memory));
        Ok(NgChannel {
            info,
            file,
            nsid,
            ring,
            slots: vec![
                Slot {
                    ctx: 0,
                    op: IoOp::Read,
                    lba: 0,
                    blocks: 0,
                    parts: 0,
                    error: None,
                };
                depth
            ],
            free: (0..depth as u32).rev().collect(),
            dsm: vec![[DsmRange::default(); DSM_RANGES]; depth],
            ready: VecDeque::with_capacity(depth),
            registered,
            _not_sync: NotSync::default(),
        })
    }

    /// Pushes one passthrough command for `slot`; `fixed`: the registered
    /// buffer the data lies in.
    ///
    /// # Safety
    /// `addr..addr + len` must stay valid until the command completes.
    unsafe fn push(
        &mut self,
        slot: u32,
        sqe: &SubmissionEntry,
        (addr, len): (u64, usize),
        fixed: Option<u16>,
    ) -> bool {
        let entry = PassthruCmd::from_sqe(sqe, addr, len as u32).entry(
            self.file.as_raw_fd(),
            fixed,
            u64::from(slot),
        );
        // SAFETY: the caller keeps the data valid; the file lives in self.
        unsafe { self.ring.push(&entry) }
    }
}

impl Channel for NgChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        let parts = match req.op {
            IoOp::WriteZeroes => req.blocks.div_ceil(WRITE_ZEROES_BLOCKS),
            _ => 1,
        };
        let too_large = match req.op {
            IoOp::WriteZeroes if parts > WRITE_ZEROES_PARTS => {
                Some(WRITE_ZEROES_BLOCKS * WRITE_ZEROES_PARTS)
            }
            IoOp::Deallocate if req.blocks > u64::from(u32::MAX) * DSM_RANGES as u64 => {
                Some(u64::from(u32::MAX) * DSM_RANGES as u64)
            }
            _ => None,
        };
        if let Some(max_blocks) = too_large {
            return Err(SubmitError::Invalid(
                req.error(self.info.id, IoErrorKind::TooLarge { max_blocks }),
            ));
        }
        if !self.ring.reserve(parts as usize) {
            return Err(SubmitError::Busy);
        }
        let Some(slot) = self.free.pop() else {
            return Err(SubmitError::Busy);
        };
        self.slots[slot as usize] = Slot {
            ctx: req.ctx,
            op: req.op,
            lba: req.lba,
            blocks: req.blocks,
            parts: parts as u32,
            error: None,
        };
        let nsid = self.nsid;
        let addr = req.buf.host_ptr() as u64;
        let fixed = self
            .registered
            .as_ref()
            .and_then(|memory| memory.fixed_index(&req.buf));
        // The room was reserved: every push below succeeds.
        // SAFETY (all pushes): the request's buffer stays valid until
        // `poll` returns its completion (the contract of `submit`); the
        // DSM ranges live in `self.dsm[slot]` until then.
        match req.op {
            IoOp::Read => unsafe {
                let sqe = Read::new(nsid, req.lba, req.blocks as u32).build(Prps::NONE);
                self.push(slot, &sqe, (addr, req.buf.len()), fixed);
            },
            IoOp::Write => unsafe {
                let sqe = Write::new(nsid, req.lba, req.blocks as u32).build(Prps::NONE);
                self.push(slot, &sqe, (addr, req.buf.len()), fixed);
            },
            IoOp::Flush => unsafe {
                self.push(slot, &Flush::new(nsid).build(), (0, 0), None);
            },
            IoOp::WriteZeroes => {
                let (mut lba, mut left) = (req.lba, req.blocks);
                while left > 0 {
                    let take = left.min(WRITE_ZEROES_BLOCKS);
                    let sqe = WriteZeroes::new(nsid, lba, take as u32).build();
                    // SAFETY: no data.
                    unsafe { self.push(slot, &sqe, (0, 0), None) };
                    lba += take;
                    left -= take;
                }
            }
            IoOp::Deallocate => {
                let ranges = &mut self.dsm[slot as usize];
                let (mut lba, mut left, mut n) = (req.lba, req.blocks, 0);
                while left > 0 {
                    let take = left.min(u64::from(u32::MAX));
                    ranges[n] = DsmRange {
                        cattr: 0.into(),
                        nlb: (take as u32).into(),
                        slba: lba.into(),
                    };
                    lba += take;
                    left -= take;
                    n += 1;
                }
                let bytes = ranges[..n].as_bytes();
                let (addr, len) = (bytes.as_ptr() as u64, bytes.len());
                let sqe = Deallocate::new(nsid, n as u32).build(Prps::NONE);
                // SAFETY: the ranges live in self.dsm until completion.
                unsafe { self.push(slot, &sqe, (addr, len), None) };
            }
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = crate::device::drain_completions(&mut self.ready, out);
        if n == out.len() {
            return n;
        }
        let (id, block_count) = (self.info.id, self.info.block_count);
        let (slots, free, ready) = (&mut self.slots, &mut self.free, &mut self.ready);
        self.ring.reap(usize::MAX, |user_data, result, _| {
            let index = user_data as usize;
            let Some(slot) = slots.get_mut(index) else {
                return;
            };
            if slot.parts == 0 {
                return;
            }
            slot.parts -= 1;
            if slot.error.is_none() {
                slot.error = io_kind(sys::outcome(result), block_count);
            }
            if slot.parts > 0 {
                return;
            }
            free.push(index as u32);
            let completion = Completion {
                ctx: slot.ctx,
                result: match slot.error {
                    None => Ok(()),
                    Some(kind) => Err(IoError {
                        device: id,
                        op: slot.op,
                        lba: slot.lba,
                        blocks: slot.blocks,
                        kind,
                    }),
                },
            };
            if n < out.len() {
                out[n] = completion;
                n += 1;
            } else {
                // Kept for the next poll; the queue holds one per slot.
                ready.push_back(completion);
            }
        });
        n
    }

    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len()
    }
}

impl Drop for NgChannel {
    fn drop(&mut self) {
        // The device may still write into buffers of commands in flight:
        // wait for their completions (the kernel's timeout bounds the wait).
        self.ring.drain(|_, _, _| {});
    }
}
