//! The copy channel of a SCSI leaf: EXTENDED COPY(LID1), POPULATE TOKEN
//! and WRITE USING TOKEN, recorded at submission and executed in `poll`,
//! with the outcomes the copy engine needs to keep data safe.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scsi_sg::tpc::{BlockRange, CopyOperatingParameters, CscdId, ExtendedCopy, Segment};
use scsi_sg::vpd::RodLimits;
use scsi_sg::{ScsiDevice, ScsiTransport, SenseKey, TokenProblem};
use tracing::{debug, warn};

use super::{MAX_DESIGNATOR, ScsiLeaf};
use crate::device::{DeviceId, NotSync};
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRange, OffloadRequest, OffloadSource, OffloadSubmitError, RodToken,
};

/// An offload command recorded by `submit_*`, executed by `poll`.
struct PendingCopy {
    ctx: u64,
    op: PendingOp,
    ranges: Vec<OffloadRange>,
}

enum PendingOp {
    Copy(PendingSource),
    Populate,
}

enum PendingSource {
    SameDevice,
    Designator {
        naa: [u8; MAX_DESIGNATOR],
        len: usize,
        block_size: u32,
    },
    Rod(RodToken),
}

/// The copy channel of a SCSI leaf (the destination for copies, the
/// source for POPULATE TOKEN).
pub(super) struct ScsiCopyChannel<T: ScsiTransport> {
    id: DeviceId,
    name: String,
    block_size: u32,
    block_count: u64,
    naa: Vec<u8>,
    xcopy: Option<CopyOperatingParameters>,
    rod: Option<RodLimits>,
    lun: Arc<ScsiDevice<T>>,
    pending: VecDeque<PendingCopy>,
    /// Range vectors sized when the channel opened, reused per command.
    free: Vec<Vec<OffloadRange>>,
    depth: usize,
    next_list_id: u32,
    _not_sync: NotSync,
}

fn scsi_status(e: &scsi_sg::Error) -> DeviceStatus {
    e.sense()
        .map_or(DeviceStatus::None, |s| DeviceStatus::Scsi {
            key: s.key as u8,
            asc: s.asc,
            ascq: s.ascq,
        })
}

/// Whether the device can have written anything, and why it failed.
enum Failure {
    Clean(OffloadErrorKind),
    Unknown(OffloadErrorKind),
}

fn classify(e: &scsi_sg::Error) -> Failure {
    use scsi_sg::Error as E;
    match e {
        E::Token { problem, .. } => Failure::Clean(match problem {
            TokenProblem::Expired => OffloadErrorKind::TokenExpired,
            _ => OffloadErrorKind::TokenInvalid,
        }),
        // Refused before anything was sent.
        E::Unsupported { .. } => Failure::Clean(OffloadErrorKind::Unsupported),
        E::InvalidRequest { .. } | E::InvalidCdb { .. } | E::TransferTooLarge { .. } => {
            Failure::Clean(OffloadErrorKind::Limits)
        }
        E::Status { .. } => Failure::Clean(OffloadErrorKind::NotExecuted),
        E::CheckCondition { sense, .. } => match sense.key {
            SenseKey::IllegalRequest => Failure::Clean(match (sense.asc, sense.ascq) {
                (0x23, 0x07) => OffloadErrorKind::TokenExpired,
                (0x23, _) => OffloadErrorKind::TokenInvalid,
                (0x21, _) => OffloadErrorKind::OutOfRange,
                // TOO MANY SEGMENT/TARGET DESCRIPTORS, PARAMETER LIST LENGTH.
                (0x26, 0x06 | 0x08) | (0x1a, _) => OffloadErrorKind::Limits,
                _ => OffloadErrorKind::Unsupported,
            }),
            SenseKey::UnitAttention | SenseKey::NotReady => {
                Failure::Clean(OffloadErrorKind::NotExecuted)
            }
            SenseKey::MediumError | SenseKey::HardwareError => {
                Failure::Unknown(OffloadErrorKind::Medium)
            }
            // COPY ABORTED, ABORTED COMMAND and the rest: the copy may have
            // moved some of the blocks.
            _ => Failure::Unknown(OffloadErrorKind::NotExecuted),
        },
        _ => Failure::Unknown(OffloadErrorKind::Medium),
    }
}

impl<T: ScsiTransport> ScsiCopyChannel<T> {
    pub(super) fn new(leaf: &ScsiLeaf, lun: &Arc<ScsiDevice<T>>, depth: usize) -> Self {
        let depth = depth.max(1);
        let per_command = leaf
            .xcopy
            .as_ref()
            .map_or(0, |p| usize::from(p.max_segment_descriptors))
            .max(leaf.rod.map_or(0, |r| usize::from(r.max_range_descriptors)))
            .max(1);
        ScsiCopyChannel {
            id: leaf.info.id,
            name: leaf.info.name.clone(),
            block_size: leaf.info.block_size,
            block_count: leaf.info.block_count,
            naa: leaf.naa.clone().unwrap_or_default(),
            xcopy: leaf.xcopy.clone(),
            rod: leaf.rod,
            lun: Arc::clone(lun),
            pending: VecDeque::with_capacity(depth),
            free: (0..depth)
                .map(|_| Vec::with_capacity(per_command))
                .collect(),
            depth,
            next_list_id: 1,
            _not_sync: NotSync::default(),
        }
    }

    fn error(
        &self,
        ranges: &[OffloadRange],
        kind: OffloadErrorKind,
        status: DeviceStatus,
    ) -> OffloadError {
        OffloadError {
            device: self.id,
            dst_lba: ranges.first().map_or(0, |r| r.dst),
            blocks: ranges.iter().map(|r| r.blocks).sum(),
            kind,
            status,
        }
    }

    fn list_id(&mut self) -> u32 {
        let id = self.next_list_id;
        self.next_list_id = self.next_list_id.wrapping_add(1).max(1);
        id
    }

    fn fail(&self, ranges: &[OffloadRange], e: &scsi_sg::Error) -> OffloadOutcome {
        let status = scsi_status(e);
        match classify(e) {
            Failure::Clean(kind) => {
                debug!(leaf = %self.name, error = %e, ?kind, "offload not done");
                OffloadOutcome::NotDone(self.error(ranges, kind, status))
            }
            Failure::Unknown(kind) => {
                warn!(leaf = %self.name, error = %e, "offload failed; destination unknown");
                OffloadOutcome::DestinationUnknown(self.error(ranges, kind, status))
            }
        }
    }

    fn refuse(&self, ranges: &[OffloadRange], kind: OffloadErrorKind) -> OffloadOutcome {
        OffloadOutcome::NotDone(self.error(ranges, kind, DeviceStatus::None))
    }

    fn check_dst(&self, ranges: &[OffloadRange]) -> bool {
        !ranges.is_empty()
            && ranges.iter().all(|r| {
                r.blocks > 0
                    && u32::try_from(r.blocks).is_ok()
                    && r.dst
                        .checked_add(r.blocks)
                        .is_some_and(|e| e <= self.block_count)
            })
    }

    fn extended_copy(
        &mut self,
        src_naa: &[u8],
        src_block_size: u32,
        ranges: &[OffloadRange],
    ) -> OffloadOutcome {
        let Some((snlid, max_segment_length, max_segments)) = self
            .xcopy
            .as_ref()
            .map(|p| (p.snlid, p.max_segment_length, p.max_segment_descriptors))
        else {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        };
        if src_block_size != self.block_size {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        }
        if !self.check_dst(ranges) {
            return self.refuse(ranges, OffloadErrorKind::OutOfRange);
        }
        let bs = u64::from(self.block_size.max(1));
        let max_blocks = (u64::from(max_segment_length) / bs).min(u64::from(u16::MAX));
        if ranges.len() > usize::from(max_segments) || ranges.iter().any(|r| r.blocks > max_blocks)
        {
            return self.refuse(ranges, OffloadErrorKind::Limits);
        }
        let same = src_naa == self.naa.as_slice();
        let mut cscds = vec![CscdId {
            naa: src_naa.to_vec(),
            block_len: src_block_size,
        }];
        if !same {
            cscds.push(CscdId {
                naa: self.naa.clone(),
                block_len: self.block_size,
            });
        }
        let segments = ranges
            .iter()
            .map(|r| Segment {
                source: 0,
                destination: if same { 0 } else { 1 },
                blocks: u16::try_from(r.blocks).unwrap_or(u16::MAX),
                source_lba: r.src,
                destination_lba: r.dst,
            })
            .collect();
        let list_id = u8::try_from(self.list_id() & 0xff).unwrap_or(0);
        let list = ExtendedCopy {
            list_id,
            no_list_id: snlid,
            cscds,
            segments,
        };
        match self.lun.extended_copy(&list) {
            Ok(()) => OffloadOutcome::Done,
            Err(e) => self.fail(ranges, &e),
        }
    }

    fn write_using_token(&mut self, token: &RodToken, ranges: &[OffloadRange]) -> OffloadOutcome {
        let Some(limits) = self.rod else {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        };
        if !self.check_dst(ranges) {
            return self.refuse(ranges, OffloadErrorKind::OutOfRange);
        }
        if ranges.len() > usize::from(limits.max_range_descriptors)
            || ranges
                .windows(2)
                .any(|w| w[0].src + w[0].blocks != w[1].src)
        {
            return self.refuse(ranges, OffloadErrorKind::Limits);
        }
        if token.is_expired(Instant::now()) {
            return self.refuse(ranges, OffloadErrorKind::TokenExpired);
        }
        let Ok(rod) = scsi_sg::tpc::RodToken::parse(token.bytes()) else {
            return self.refuse(ranges, OffloadErrorKind::TokenInvalid);
        };
        let offset = ranges.first().map_or(0, |r| r.src);
        let dst: Vec<BlockRange> = ranges
            .iter()
            .map(|r| BlockRange {
                lba: r.dst,
                blocks: u32::try_from(r.blocks).unwrap_or(u32::MAX),
            })
            .collect();
        let list_id = self.list_id();
        match self
            .lun
            .write_using_token(list_id, &rod, offset, &dst, false)
        {
            Ok(()) => OffloadOutcome::Done,
            Err(e) => self.fail(ranges, &e),
        }
    }

    fn populate(&mut self, ranges: &[OffloadRange]) -> OffloadOutcome {
        let Some(limits) = self.rod else {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        };
        let blocks: u64 = ranges.iter().map(|r| r.blocks).sum();
        if ranges.len() > usize::from(limits.max_range_descriptors)
            || (limits.max_token_transfer_size > 0 && blocks > limits.max_token_transfer_size)
        {
            return self.refuse(ranges, OffloadErrorKind::Limits);
        }
        let block_ranges: Option<Vec<BlockRange>> = ranges
            .iter()
            .map(|r| {
                let n = u32::try_from(r.blocks).ok()?;
                let end = r.src.checked_add(r.blocks)?;
                (n > 0 && end <= self.block_count).then_some(BlockRange {
                    lba: r.src,
                    blocks: n,
                })
            })
            .collect();
        let Some(block_ranges) = block_ranges else {
            return self.refuse(ranges, OffloadErrorKind::OutOfRange);
        };
        let list_id = self.list_id();
        let started = Instant::now();
        match self.lun.populate_token(list_id, &block_ranges, 0) {
            Ok(rod) => {
                // Asked for the device's default inactivity timeout: the
                // token is good until then at least.
                let expires = (limits.default_inactivity_timeout > 0).then(|| {
                    started + Duration::from_secs(u64::from(limits.default_inactivity_timeout))
                });
                match RodToken::new(&rod.0, blocks, expires) {
                    Some(token) => OffloadOutcome::Token(token),
                    None => self.refuse(ranges, OffloadErrorKind::TokenInvalid),
                }
            }
            Err(e) => match self.fail(ranges, &e) {
                // POPULATE TOKEN writes nothing: whatever failed, the
                // (source) blocks are as they were.
                OffloadOutcome::DestinationUnknown(err) => OffloadOutcome::NotDone(err),
                other => other,
            },
        }
    }

    fn execute(&mut self, p: &PendingCopy) -> OffloadOutcome {
        match &p.op {
            PendingOp::Populate => self.populate(&p.ranges),
            PendingOp::Copy(PendingSource::SameDevice) => {
                let naa = self.naa.clone();
                let bs = self.block_size;
                self.extended_copy(&naa, bs, &p.ranges)
            }
            PendingOp::Copy(PendingSource::Designator {
                naa,
                len,
                block_size,
            }) => {
                let naa = naa.get(..*len).unwrap_or(&[]);
                self.extended_copy(naa, *block_size, &p.ranges)
            }
            PendingOp::Copy(PendingSource::Rod(token)) => self.write_using_token(token, &p.ranges),
        }
    }

    fn record(
        &mut self,
        ctx: u64,
        op: PendingOp,
        fill: impl FnOnce(&mut Vec<OffloadRange>),
    ) -> Result<(), OffloadSubmitError> {
        if self.pending.len() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        let mut ranges = self.free.pop().unwrap_or_default();
        ranges.clear();
        fill(&mut ranges);
        self.pending.push_back(PendingCopy { ctx, op, ranges });
        Ok(())
    }
}

impl<T: ScsiTransport + Send + Sync> CopyChannel for ScsiCopyChannel<T> {
    fn device(&self) -> DeviceId {
        self.id
    }

    fn submit_copy(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadSubmitError> {
        let source = match req.source {
            OffloadSource::SameDevice => PendingSource::SameDevice,
            OffloadSource::Designator { naa, block_size } => {
                let mut buf = [0u8; MAX_DESIGNATOR];
                let Some(dst) = buf.get_mut(..naa.len()) else {
                    return Err(OffloadSubmitError::Invalid(self.error(
                        req.ranges,
                        OffloadErrorKind::Unsupported,
                        DeviceStatus::None,
                    )));
                };
                dst.copy_from_slice(naa);
                PendingSource::Designator {
                    naa: buf,
                    len: naa.len(),
                    block_size,
                }
            }
            OffloadSource::RodToken(token) => PendingSource::Rod(token.clone()),
        };
        self.record(req.ctx, PendingOp::Copy(source), |v| {
            v.extend_from_slice(req.ranges)
        })
    }

    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError> {
        self.record(ctx, PendingOp::Populate, |v| {
            v.extend(ranges.iter().map(|r| OffloadRange {
                src: r.lba,
                dst: r.lba,
                blocks: r.blocks,
            }));
        })
    }

    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let outcome = self.execute(&p);
            out.push(OffloadCompletion {
                ctx: p.ctx,
                outcome,
            });
            self.free.push(p.ranges);
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.pending.len()
    }
}
