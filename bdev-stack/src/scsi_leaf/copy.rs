//! The copy channel of a SCSI leaf: EXTENDED COPY(LID1), POPULATE TOKEN
//! and WRITE USING TOKEN, recorded at submission and executed in `poll`,
//! with the outcomes the copy engine needs to keep data safe.
//!
//! A ROD-token command that ends GOOD may still have done less than asked:
//! a copy manager may stop a WRITE USING TOKEN early, or make a ROD that
//! represents only the first blocks of a POPULATE TOKEN's ranges. So after
//! each one the channel reads RECEIVE ROD TOKEN INFORMATION for its list
//! identifier: a short write is `Partial` at the transfer count, a short
//! ROD gives a token of the blocks it represents, and an answer that
//! cannot be trusted (other units, a count past the command, another
//! command's information, or no answer) leaves a write's destination
//! unknown and gives no token.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use scsi_sg::tpc::{
    BlockRange, CopyOperatingParameters, CscdId, ExtendedCopy, RodTokenInformation, Segment,
};
use scsi_sg::vpd::RodLimits;
use scsi_sg::{ScsiDevice, ScsiTransport, SenseKey, TokenProblem, cdb};
use tracing::{debug, warn};

use super::{MAX_DESIGNATOR, ScsiLeaf};
use crate::device::{DeviceId, NotSync};
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRange, OffloadRequest, OffloadSource, OffloadSubmitError, RodToken,
};

/// List identifiers for one leaf's copy commands. A copy manager keeps a
/// ROD-token command's information under its list identifier until it is
/// read, so two commands in flight at once must not share one: the leaf's
/// channels draw from one counter, and each leaf starts its own 2^20 apart
/// (from its device id), so that LUNs of one target do not meet either.
pub(super) struct ListIds(AtomicU32);

impl ListIds {
    pub(super) fn new(leaf: DeviceId) -> ListIds {
        ListIds(AtomicU32::new((leaf.0 & 0xfff) << 20))
    }

    fn next(&self) -> u32 {
        loop {
            // Only uniqueness matters, not ordering with other memory.
            let id = self.0.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }
}

/// Blocks a WRITE USING TOKEN of `asked` blocks wrote, as its RECEIVE ROD
/// TOKEN INFORMATION tells; `Err` with why the answer cannot be trusted.
fn written_blocks(info: &RodTokenInformation, asked: u64) -> Result<u64, &'static str> {
    if info.response_to_service_action != cdb::TPC_OUT_WRITE_USING_TOKEN {
        return Err("the information is about another command");
    }
    if !info.completed() {
        return Err("the copy operation status is not 'completed'");
    }
    let written = info
        .transfer_count_blocks()
        .ok_or("the transfer count is not in blocks")?;
    if written > asked {
        return Err("the transfer count is larger than the command");
    }
    Ok(written)
}

/// Blocks, from the start of a POPULATE TOKEN's `asked` blocks, that its
/// ROD represents, as its RECEIVE ROD TOKEN INFORMATION tells (never more
/// than asked); `Err` with why the answer cannot be trusted.
fn represented_blocks(info: &RodTokenInformation, asked: u64) -> Result<u64, &'static str> {
    if info.response_to_service_action != cdb::TPC_OUT_POPULATE_TOKEN {
        return Err("the information is about another command");
    }
    if !info.completed() {
        return Err("the copy operation status is not 'completed'");
    }
    match info.transfer_count_blocks() {
        None => Err("the transfer count is not in blocks"),
        Some(0) => Err("the ROD represents no blocks"),
        Some(represented) => Ok(represented.min(asked)),
    }
}

/// The sense a copy manager kept with a command's information, if any.
fn information_status(info: &RodTokenInformation) -> DeviceStatus {
    info.sense
        .as_ref()
        .map_or(DeviceStatus::None, |s| DeviceStatus::Scsi {
            key: s.key as u8,
            asc: s.asc,
            ascq: s.ascq,
        })
}

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
    list_ids: Arc<ListIds>,
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
            list_ids: Arc::clone(&leaf.list_ids),
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
        self.list_ids.next()
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
            Ok(()) => self.written(list_id, ranges),
            Err(e) => self.fail(ranges, &e),
        }
    }

    /// What a WRITE USING TOKEN under `list_id` that ended GOOD did, by
    /// the copy manager's RECEIVE ROD TOKEN INFORMATION.
    fn written(&self, list_id: u32, ranges: &[OffloadRange]) -> OffloadOutcome {
        let asked: u64 = ranges.iter().map(|r| r.blocks).sum();
        let info = match self.lun.receive_rod_token_information(list_id) {
            Ok(info) => info,
            Err(e) => {
                warn!(leaf = %self.name, list_id, error = %e, "WRITE USING TOKEN ended GOOD but its RECEIVE ROD TOKEN INFORMATION failed: destination unknown");
                return OffloadOutcome::DestinationUnknown(self.error(
                    ranges,
                    OffloadErrorKind::NotExecuted,
                    scsi_status(&e),
                ));
            }
        };
        let status = information_status(&info);
        match written_blocks(&info, asked) {
            Ok(written) if written == asked => OffloadOutcome::Done,
            Ok(written) => {
                debug!(leaf = %self.name, list_id, asked, written, "WRITE USING TOKEN wrote fewer blocks than asked");
                OffloadOutcome::Partial {
                    blocks_done: written,
                    error: self.error(ranges, OffloadErrorKind::NotExecuted, status),
                }
            }
            Err(why) => {
                warn!(leaf = %self.name, list_id, ?info, "WRITE USING TOKEN ended GOOD but {why}: destination unknown");
                OffloadOutcome::DestinationUnknown(self.error(
                    ranges,
                    OffloadErrorKind::NotExecuted,
                    status,
                ))
            }
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
        match self
            .lun
            .populate_token_information(list_id, &block_ranges, 0)
        {
            Ok(info) => {
                let represented = match represented_blocks(&info, blocks) {
                    Ok(represented) => represented,
                    Err(why) => {
                        warn!(leaf = %self.name, list_id, ?info, "POPULATE TOKEN's token not used: {why}");
                        return self.refuse(ranges, OffloadErrorKind::TokenInvalid);
                    }
                };
                if represented < blocks {
                    debug!(leaf = %self.name, list_id, asked = blocks, represented, "POPULATE TOKEN made a ROD shorter than asked");
                }
                // Asked for the device's default inactivity timeout: the
                // token is good until then at least.
                let expires = (limits.default_inactivity_timeout > 0).then(|| {
                    started + Duration::from_secs(u64::from(limits.default_inactivity_timeout))
                });
                match info
                    .token
                    .and_then(|rod| RodToken::new(&rod.0, represented, expires))
                {
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use scsi_sg::emu::{EmuConfig, EmuLun, EmuTarget};
    use scsi_sg::tpc::{COPY_STATUS_COMPLETED, COPY_STATUS_COMPLETED_WITH_RESIDUAL};
    use scsi_sg::{CommandOutcome, DataTransfer};

    use super::*;
    use crate::device::BlockDevice;

    fn information(service_action: u8, status: u8, units: u8, count: u64) -> RodTokenInformation {
        RodTokenInformation {
            response_to_service_action: service_action,
            copy_operation_status: status,
            operation_counter: 0,
            completion_status: 0,
            transfer_count_units: units,
            transfer_count: count,
            segments_processed: 0,
            sense: None,
            token: None,
        }
    }

    const WUT: u8 = cdb::TPC_OUT_WRITE_USING_TOKEN;
    const POPULATE: u8 = cdb::TPC_OUT_POPULATE_TOKEN;
    const BLOCKS: u8 = scsi_sg::tpc::TRANSFER_COUNT_UNITS_BLOCKS;

    #[test]
    fn a_write_count_is_trusted_only_in_blocks_completed_and_within_the_command() {
        let ok = COPY_STATUS_COMPLETED;
        let residual = COPY_STATUS_COMPLETED_WITH_RESIDUAL;
        assert_eq!(
            written_blocks(&information(WUT, ok, BLOCKS, 32), 32),
            Ok(32)
        );
        assert_eq!(
            written_blocks(&information(WUT, residual, BLOCKS, 5), 32),
            Ok(5)
        );
        assert_eq!(
            written_blocks(&information(WUT, residual, BLOCKS, 0), 32),
            Ok(0)
        );
        // Bytes (0x00) or KiB (0x01): not converted by guessing.
        assert!(written_blocks(&information(WUT, ok, 0x00, 32 * 512), 32).is_err());
        assert!(written_blocks(&information(WUT, ok, 0x01, 16), 32).is_err());
        assert!(written_blocks(&information(WUT, ok, BLOCKS, 33), 32).is_err());
        assert!(written_blocks(&information(POPULATE, ok, BLOCKS, 32), 32).is_err());
        // Completed with errors, aborted, still running.
        for status in [0x02, 0x04, 0x10, 0x60] {
            assert!(written_blocks(&information(WUT, status, BLOCKS, 32), 32).is_err());
        }
    }

    #[test]
    fn a_rod_is_sized_by_its_count_and_never_past_what_was_asked() {
        let ok = COPY_STATUS_COMPLETED;
        assert_eq!(
            represented_blocks(&information(POPULATE, ok, BLOCKS, 40), 40),
            Ok(40)
        );
        assert_eq!(
            represented_blocks(&information(POPULATE, 0x03, BLOCKS, 9), 40),
            Ok(9)
        );
        assert_eq!(
            represented_blocks(&information(POPULATE, ok, BLOCKS, 99), 40),
            Ok(40)
        );
        assert!(represented_blocks(&information(POPULATE, ok, BLOCKS, 0), 40).is_err());
        assert!(represented_blocks(&information(POPULATE, ok, 0x00, 40 * 512), 40).is_err());
        assert!(represented_blocks(&information(WUT, ok, BLOCKS, 40), 40).is_err());
        assert!(represented_blocks(&information(POPULATE, 0x02, BLOCKS, 40), 40).is_err());
    }

    /// An emulated LUN whose RECEIVE ROD TOKEN INFORMATION answers about a
    /// WRITE USING TOKEN are rewritten by `garble` (as a faulty copy
    /// manager would answer), to drive the channel with them.
    struct Garbled {
        lun: EmuLun,
        garble: fn(&mut [u8]),
    }

    impl ScsiTransport for Garbled {
        fn path(&self) -> &Path {
            self.lun.path()
        }

        fn execute(
            &self,
            cdb: &[u8],
            mut data: DataTransfer<'_>,
            timeout: Duration,
        ) -> Result<CommandOutcome, scsi_sg::Error> {
            let outcome = self.lun.execute(cdb, data.reborrow(), timeout)?;
            let rrti = cdb.first() == Some(&cdb::THIRD_PARTY_COPY_IN)
                && cdb.get(1).map(|b| b & 0x1f) == Some(cdb::TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION);
            if let (true, DataTransfer::FromDevice(buf)) = (rrti, data)
                && buf.get(4).map(|b| b & 0x1f) == Some(WUT)
            {
                (self.garble)(buf);
            }
            Ok(outcome)
        }
    }

    /// A WRITE USING TOKEN of 16 blocks from a fresh token, on a channel
    /// whose information answers are rewritten by `garble`.
    fn write_through(garble: fn(&mut [u8])) -> Option<OffloadOutcome> {
        let target = EmuTarget::new("garbled", EmuConfig::default());
        let src = ScsiLeaf::from_emu(target.add_memory_lun(64, 512)).expect("src");
        let dst = ScsiLeaf::from_emu(target.add_memory_lun(64, 512)).expect("dst");
        let mut src_ch = src.open_copy_channel(1).expect("open").expect("a channel");
        let mut out = Vec::with_capacity(1);
        src_ch
            .submit_populate(&[LbaRange { lba: 0, blocks: 16 }], 0)
            .expect("populate");
        while src_ch.poll(&mut out, 1) == 0 {}
        let Some(OffloadOutcome::Token(token)) = out.pop().map(|c| c.outcome) else {
            panic!("no token");
        };
        let garbled = Garbled {
            lun: target.lun(1).expect("lun 1"),
            garble,
        };
        let lun = Arc::new(ScsiDevice::probe(garbled).expect("probe"));
        let mut ch = ScsiCopyChannel::new(&dst, &lun, 1);
        ch.submit_copy(&OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &[OffloadRange {
                src: 0,
                dst: 8,
                blocks: 16,
            }],
            ctx: 1,
        })
        .expect("submit");
        while ch.poll(&mut out, 1) == 0 {}
        out.pop().map(|c| c.outcome)
    }

    #[test]
    fn garbled_information_after_a_good_write_leaves_the_destination_unknown() {
        assert_eq!(write_through(|_| {}), Some(OffloadOutcome::Done));
        let garbles: [fn(&mut [u8]); 4] = [
            // Transfer count in bytes.
            |b| b[15] = 0x00,
            // More blocks than the command had.
            |b| b[16..24].copy_from_slice(&1000u64.to_be_bytes()),
            // About a POPULATE TOKEN.
            |b| b[4] = POPULATE,
            // Completed with errors.
            |b| b[5] = 0x02,
        ];
        for garble in garbles {
            let outcome = write_through(garble);
            assert!(
                matches!(&outcome, Some(OffloadOutcome::DestinationUnknown(e)) if e.dst_lba == 8 && e.blocks == 16),
                "{outcome:?}"
            );
        }
    }
}
