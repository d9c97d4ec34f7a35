//! The copy channel: NVMe Copy (format 0) within the namespace, as a
//! passthrough command on a ring of its own.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{cqueue, squeue};
use nvme::cmd::{Copy, Prps};
use nvme::spec::CopyRangeFormat0;
use zerocopy::IntoBytes;

use super::namespace::COPY_RANGES;
use super::sys::{self, Outcome, PassthruCmd};
use crate::device::{DeviceId, DeviceInfo, NotSync};
use crate::error::BdevError;
use crate::nvme_leaf::{CopyLimits, check_copy, failed_copy};
use crate::offload::no_rod_tokens;
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRequest, OffloadSource, OffloadSubmitError,
};
use crate::uring::Ring;

/// A Copy command the kernel has.
struct CopySlot {
    ctx: u64,
    dst: u64,
    /// Blocks of each source range, in order (for partial completions).
    range_blocks: Vec<u64>,
    /// The descriptors the device reads.
    descriptors: Box<[CopyRangeFormat0]>,
    busy: bool,
}

/// The copy channel of an `ng:` leaf.
pub(super) struct NgCopyChannel {
    info: DeviceInfo,
    file: Arc<File>,
    nsid: u32,
    limits: CopyLimits,
    ring: Ring<squeue::Entry128, cqueue::Entry32>,
    /// The current command's `(slba, blocks)` source ranges.
    ranges: Vec<(u64, u64)>,
    slots: Vec<CopySlot>,
    free: Vec<u32>,
    ready: VecDeque<OffloadCompletion>,
    depth: usize,
    _not_sync: NotSync,
}

impl NgCopyChannel {
    pub(super) fn new(
        info: DeviceInfo,
        file: Arc<File>,
        nsid: u32,
        depth: usize,
        (max_ranges, max_range_blocks, max_command_blocks): (u32, u64, u64),
    ) -> Result<NgCopyChannel, BdevError> {
        let max_ranges = max_ranges.min(COPY_RANGES) as usize;
        // Interrupts: a Copy is long and the copy engine sleeps while it
        // runs; on a polled ring it would complete only at the next poll
        // (relocation through a polled ring fell to a third of the
        // interrupt-driven rate, falling further each round).
        let ring = Ring::new(&info.name, depth, depth, false)?;
        let limits = CopyLimits {
            max_ranges,
            max_range_blocks,
            max_command_blocks,
            block_count: info.block_count,
        };
        Ok(NgCopyChannel {
            info,
            file,
            nsid,
            limits,
            ring,
            ranges: Vec::with_capacity(max_ranges),
            slots: (0..depth)
                .map(|_| CopySlot {
                    ctx: 0,
                    dst: 0,
                    range_blocks: Vec::with_capacity(max_ranges),
                    descriptors: vec![CopyRangeFormat0::default(); max_ranges].into_boxed_slice(),
                    busy: false,
                })
                .collect(),
            free: (0..depth as u32).rev().collect(),
            ready: VecDeque::with_capacity(depth),
            depth,
            _not_sync: NotSync::default(),
        })
    }

    fn error(
        &self,
        req: &OffloadRequest<'_>,
        kind: OffloadErrorKind,
        status: DeviceStatus,
    ) -> OffloadError {
        req.error(self.info.id, kind, status)
    }
}

/// What a Copy the kernel failed means: refused before the device saw it
/// (nothing written) or cancelled by a reset (destination unknown).
fn errno_outcome(errno: i32, error: OffloadError) -> OffloadOutcome {
    match errno {
        libc::EINVAL
        | libc::EFAULT
        | libc::ENOMEM
        | libc::EACCES
        | libc::EPERM
        | libc::EOPNOTSUPP
        | libc::ENOTTY => OffloadOutcome::NotDone(error),
        _ => OffloadOutcome::DestinationUnknown(error),
    }
}

impl CopyChannel for NgCopyChannel {
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
        if let Err(kind) = check_copy(req, &self.limits, &mut self.ranges) {
            return Err(OffloadSubmitError::Invalid(self.error(
                req,
                kind,
                DeviceStatus::None,
            )));
        }
        if !self.ring.reserve(1) {
            return Err(OffloadSubmitError::Busy);
        }
        let Some(index) = self.free.pop() else {
            return Err(OffloadSubmitError::Busy);
        };
        let dst = req.ranges.first().map_or(0, |r| r.dst);
        let slot = &mut self.slots[index as usize];
        for (descriptor, &(slba, blocks)) in slot.descriptors.iter_mut().zip(&self.ranges) {
            *descriptor = CopyRangeFormat0 {
                slba: slba.into(),
                nlb: ((blocks - 1) as u16).into(),
                ..CopyRangeFormat0::default()
            };
        }
        let count = self.ranges.len();
        let bytes = slot.descriptors[..count].as_bytes();
        let sqe = Copy::new(self.nsid, dst, count as u32).build(Prps::NONE);
        let entry = PassthruCmd::from_sqe(&sqe, bytes.as_ptr() as u64, bytes.len() as u32).entry(
            self.file.as_raw_fd(),
            None,
            u64::from(index),
        );
        slot.ctx = req.ctx;
        slot.dst = dst;
        slot.busy = true;
        slot.range_blocks.clear();
        slot.range_blocks.extend(self.ranges.iter().map(|r| r.1));
        // SAFETY: the descriptors live in the slot, which is neither reused
        // nor dropped (the channel drains its ring on drop) until the
        // command completes; room was reserved.
        unsafe { self.ring.push(&entry) };
        Ok(())
    }

    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError> {
        if self.outstanding() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        self.ready
            .push_back(no_rod_tokens(self.info.id, ranges, ctx, DeviceStatus::None));
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize {
        let mut n = crate::device::drain_completions_into(&mut self.ready, out, max);
        if n == max {
            return n;
        }
        let id = self.info.id;
        let (slots, free, ready) = (&mut self.slots, &mut self.free, &mut self.ready);
        self.ring.reap(usize::MAX, |user_data, result, cqe| {
            let Some(slot) = slots.get_mut(user_data as usize) else {
                return;
            };
            if !slot.busy {
                return;
            }
            slot.busy = false;
            free.push(user_data as u32);
            let outcome = match sys::outcome(result) {
                Outcome::Done => OffloadOutcome::Done,
                Outcome::Status(s) => failed_copy(
                    id,
                    slot.dst,
                    nvme::IoError::Status(s),
                    // DW0: the first source range not copied.
                    cqe.big_cqe()[0] as u32,
                    &slot.range_blocks,
                ),
                Outcome::Errno(errno) => errno_outcome(
                    errno,
                    OffloadError {
                        device: id,
                        dst_lba: slot.dst,
                        blocks: slot.range_blocks.iter().sum(),
                        kind: OffloadErrorKind::NotExecuted,
                        status: DeviceStatus::None,
                    },
                ),
            };
            let completion = OffloadCompletion {
                ctx: slot.ctx,
                outcome,
            };
            if n < max {
                out.push(completion);
                n += 1;
            } else {
                ready.push_back(completion);
            }
        });
        n
    }

    fn outstanding(&self) -> usize {
        self.depth - self.free.len() + self.ready.len()
    }
}

impl Drop for NgCopyChannel {
    fn drop(&mut self) {
        // The device may still read the descriptors of commands in flight.
        self.ring.drain(|_, _, _| {});
    }
}
