//! The copy channel: NVMe Copy (format 0) through a queue pair of its own.

use std::collections::VecDeque;

use nvme::{BlockQueue, Namespace, NvmeStatus};

use crate::device::{DeviceId, DeviceInfo, NotSync};
use crate::offload::no_rod_tokens;
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRequest, OffloadSource, OffloadSubmitError,
};

/// A copy command in flight.
struct CopySlot {
    ctx: u64,
    dst: u64,
    /// Blocks of each source range, in order (for partial completions).
    range_blocks: Vec<u64>,
    busy: bool,
}

/// The copy channel: NVMe Copy (format 0) through a queue pair of its own.
pub(super) struct NvmeCopyChannel<Q: BlockQueue> {
    info: DeviceInfo,
    ns: Namespace,
    qp: Q,
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

/// What a failed NVMe Copy onto `dst` of `device` means for the
/// destination (see [`copy_outcome`]).
pub(crate) fn failed_copy(
    device: DeviceId,
    dst: u64,
    error: nvme::IoError,
    dw0: u32,
    range_blocks: &[u64],
) -> OffloadOutcome {
    let blocks = range_blocks.iter().sum();
    copy_outcome(error, dw0, range_blocks, |kind, status| OffloadError {
        device,
        dst_lba: dst,
        blocks,
        kind,
        status,
    })
}

/// What an NVMe Copy failure means for the destination: the status, and
/// DW0 (the first source range not copied).
pub(crate) fn copy_outcome(
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

impl<Q: BlockQueue> NvmeCopyChannel<Q> {
    pub(super) fn new(
        info: DeviceInfo,
        ns: Namespace,
        qp: Q,
        depth: usize,
        max_ranges: usize,
    ) -> Self {
        NvmeCopyChannel {
            info,
            ns,
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
        }
    }

    fn error(
        &self,
        req: &OffloadRequest<'_>,
        kind: OffloadErrorKind,
        status: DeviceStatus,
    ) -> OffloadError {
        req.error(self.info.id, kind, status)
    }

    /// Checks a command against NVMe Copy's shape and the namespace's
    /// limits, filling `self.ranges`.
    fn prepare(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadErrorKind> {
        let limits = CopyLimits {
            max_ranges: self.max_ranges,
            max_range_blocks: u64::from(self.ns.mssrl),
            max_command_blocks: u64::from(self.ns.mcl),
            block_count: self.ns.blocks,
        };
        check_copy(req, &limits, &mut self.ranges)
    }
}

/// The limits an NVMe Copy command is checked against.
pub(crate) struct CopyLimits {
    /// Source ranges per command.
    pub max_ranges: usize,
    /// MSSRL.
    pub max_range_blocks: u64,
    /// MCL.
    pub max_command_blocks: u64,
    /// The namespace's size.
    pub block_count: u64,
}

/// Checks a command against NVMe Copy's shape (source ranges in order onto
/// one contiguous destination) and `limits`, filling `ranges` with its
/// `(slba, blocks)` source ranges.
pub(crate) fn check_copy(
    req: &OffloadRequest<'_>,
    limits: &CopyLimits,
    ranges: &mut Vec<(u64, u64)>,
) -> Result<(), OffloadErrorKind> {
    let Some(first) = req.ranges.first() else {
        return Err(OffloadErrorKind::OutOfRange);
    };
    if req.ranges.len() > limits.max_ranges {
        return Err(OffloadErrorKind::Limits);
    }
    ranges.clear();
    let mut total = 0u64;
    let mut next_dst = first.dst;
    for r in req.ranges {
        let inside = |start: u64| {
            start
                .checked_add(r.blocks)
                .is_some_and(|e| e <= limits.block_count)
        };
        if r.blocks == 0 || !inside(r.src) || !inside(r.dst) {
            return Err(OffloadErrorKind::OutOfRange);
        }
        if r.blocks > limits.max_range_blocks || r.dst != next_dst {
            return Err(OffloadErrorKind::Limits);
        }
        next_dst += r.blocks;
        total += r.blocks;
        ranges.push((r.src, r.blocks));
    }
    if total > limits.max_command_blocks {
        return Err(OffloadErrorKind::Limits);
    }
    Ok(())
}

impl<Q: BlockQueue> CopyChannel for NvmeCopyChannel<Q> {
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
            Err(nvme::SubmitError::Removed | nvme::SubmitError::Disconnected) => {
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
            let outcome = match c.result {
                Ok(_) => OffloadOutcome::Done,
                Err(e) => failed_copy(id, slot.dst, e, c.dw0, &slot.range_blocks),
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
}
