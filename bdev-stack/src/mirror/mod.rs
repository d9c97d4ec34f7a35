//! The mirror: N legs holding the same blocks (RAID 1, dm-raid1).
//!
//! - Writes (and write zeroes, deallocate, flush) go to every leg that takes
//!   writes (healthy or resyncing) and complete when all have. A leg that
//!   fails a write is marked failed; the write succeeds if a healthy leg
//!   took it.
//! - Reads go to one healthy leg, round-robin per channel; a failed read is
//!   retried on the other healthy legs before the caller sees an error.
//! - A [`DirtyMap`] counts writes in flight per region. It is the mirror's
//!   write-intent log: after an unclean stop, the regions it still shows
//!   are the only ones whose legs may differ, so [`Mirror::with_dirty_map`]
//!   marks them suspect (read from the primary leg only) and
//!   [`Mirror::resync_dirty`] copies just those.
//! - [`Mirror::replace_leg`] swaps in a new leg, which takes writes at once
//!   and serves reads once the returned [`Resync`] has copied every region
//!   into it. The resync locks one region at a time: it waits for writes in
//!   flight there to drain, and writes that arrive meanwhile wait in their
//!   channel until the region is copied, so no write can be overtaken by
//!   older data.
//!
//! Requests are split at region boundaries and at the legs' maximum
//! transfer, so every child lies in one region.
//!
//! Layout: `dirty` (the write-intent map), `channel` (the I/O path),
//! `resync` (rebuilding legs); this file holds the mirror and its health.

pub(crate) mod assemble;
mod channel;
mod check;
mod dirty;
pub(crate) mod intent;
pub mod meta;
mod resync;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{info, warn};

use crate::buffer::{DmaAllocator, HostAllocator};
use crate::device::{
    Access, BlockDevice, Channel, DeviceId, DeviceInfo, DeviceKind, IoOp, LeafFragment,
    SupportedOps, check_map_range, common_block_size,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::hold::WriteHolds;
use crate::slice::Slice;
pub use assemble::{Assembly, ResyncNeed};
use channel::MirrorChannel;
pub use check::CheckReport;
pub use dirty::DirtyMap;
use resync::ResyncMode;
pub use resync::{Resync, ResyncReport, ResyncStep};

/// Most legs a mirror can have (leg sets are 32-bit masks).
pub const MAX_LEGS: usize = 32;

/// Medium errors a leg may give on reads before it is failed (as md's
/// `max_read_errors`): each is repaired from another leg, but a leg that
/// keeps failing is dying.
pub const READ_ERROR_LIMIT: u64 = 20;

/// Default dirty-region size, in bytes (as md's default bitmap chunk order
/// of magnitude: small enough to resync little, large enough to be cheap).
pub const DEFAULT_REGION_BYTES: u64 = 1 << 20;

pub(super) const HEALTHY: u8 = 0;
pub(super) const FAILED: u8 = 1;
pub(super) const RESYNCING: u8 = 2;

/// The state of one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegHealth {
    /// Holds every block; serves reads and writes.
    Healthy,
    /// Failed a write (or was failed by a resync); takes no I/O.
    Failed,
    /// Being resynced: takes writes, not reads.
    Resyncing {
        /// Blocks copied so far.
        done_blocks: u64,
        /// Blocks to copy.
        total_blocks: u64,
    },
}

/// What a mirror reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorHealth {
    /// Per leg.
    pub legs: Vec<LegHealth>,
    /// Regions an unclean stop left suspect, awaiting [`Mirror::resync_dirty`].
    pub suspect_regions: usize,
    /// Reads that failed on one leg and were retried on another.
    pub read_retries: u64,
    /// Blocks rewritten on a leg whose read failed, from a leg that read
    /// them (md's read repair).
    pub read_repairs: u64,
}

impl MirrorHealth {
    /// True when some leg does not hold every block.
    pub fn is_degraded(&self) -> bool {
        self.legs.iter().any(|l| *l != LegHealth::Healthy)
    }
}

pub(super) struct Shared {
    pub(super) name: String,
    pub(super) block_size: u32,
    pub(super) block_count: u64,
    pub(super) legs: Mutex<Vec<Arc<dyn BlockDevice>>>,
    pub(super) health: Box<[AtomicU8]>,
    pub(super) resync_done: Box<[AtomicU64]>,
    /// Bumped when a leg is replaced, so channels reopen their leg channels.
    pub(super) generation: AtomicU64,
    pub(super) dirty: Arc<DirtyMap>,
    pub(super) read_retries: AtomicU64,
    pub(super) read_repairs: AtomicU64,
    /// Read errors per leg; past [`READ_ERROR_LIMIT`] the leg is failed.
    pub(super) read_errors: Box<[AtomicU64]>,
    /// Memory for the resync's copies.
    pub(super) allocator: Mutex<Arc<dyn DmaAllocator>>,
    /// The durable write-intent log and superblocks, for a mirror with
    /// metadata.
    pub(super) intent: Option<Arc<intent::IntentLog>>,
}

impl Shared {
    pub(super) fn legs(&self) -> MutexGuard<'_, Vec<Arc<dyn BlockDevice>>> {
        // The leg list is always a valid list, poisoned or not.
        self.legs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn allocator(&self) -> Arc<dyn DmaAllocator> {
        Arc::clone(
            &self
                .allocator
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub(super) fn state(&self, leg: usize) -> u8 {
        self.health[leg].load(Ordering::Acquire)
    }

    pub(super) fn mask(&self, wanted: impl Fn(u8) -> bool) -> u32 {
        (0..self.health.len())
            .filter(|&l| wanted(self.state(l)))
            .fold(0, |m, l| m | 1 << l)
    }

    /// Legs that serve reads.
    pub(super) fn readable(&self) -> u32 {
        self.mask(|s| s == HEALTHY)
    }

    /// Legs that must receive writes.
    pub(super) fn writable(&self) -> u32 {
        self.mask(|s| s == HEALTHY || s == RESYNCING)
    }

    pub(super) fn fail_leg(&self, leg: usize, error: &IoError) {
        if self.health[leg].swap(FAILED, Ordering::AcqRel) != FAILED {
            warn!(mirror = %self.name, leg, %error, "mirror leg failed; mirror degraded");
            self.record_failure(leg);
        }
    }

    /// With metadata: the surviving members learn that `leg` failed (a
    /// later assembly must not trust it); a member whose metadata write
    /// fails then is failed too.
    fn record_failure(&self, leg: usize) {
        let Some(log) = &self.intent else {
            return;
        };
        let mut failing = log.leg_failed(leg, self.writable());
        while failing != 0 {
            let next = failing.trailing_zeros() as usize;
            failing &= failing - 1;
            if self.health[next].swap(FAILED, Ordering::AcqRel) != FAILED {
                warn!(mirror = %self.name, leg = next, "metadata write failed; leg failed");
                failing |= log.leg_failed(next, self.writable());
            }
        }
    }

    /// With metadata: the lazy clearing of quiet regions' bits, due every
    /// few seconds (polling calls it now and then).
    pub(super) fn clear_quiet_intent(&self) {
        let Some(log) = &self.intent else {
            return;
        };
        let failed = log.maybe_clear(self.writable(), &self.dirty);
        self.fail_intent_legs(failed);
    }

    /// With metadata: once a resync has made the legs equal, the bits of
    /// regions with nothing in flight are cleared at once (a crash then
    /// resyncs only what was written since).
    pub(super) fn settle_intent(&self) {
        let Some(log) = &self.intent else {
            return;
        };
        let failed = log.clear_settled(self.writable(), &self.dirty);
        self.fail_intent_legs(failed);
    }

    fn fail_intent_legs(&self, failed: u32) {
        for leg in (0..self.health.len()).filter(|l| failed & (1 << l) != 0) {
            if self.health[leg].swap(FAILED, Ordering::AcqRel) != FAILED {
                warn!(mirror = %self.name, leg, "write-intent update failed; leg failed");
                self.record_failure(leg);
            }
        }
    }

    /// With metadata: makes the bits of regions `first..=last` durable
    /// before writes into them start. Legs whose metadata write fails are
    /// failed, as for a failed write.
    /// Returns true when a leg was failed meanwhile (the caller recounts
    /// its legs).
    pub(super) fn ensure_intent(&self, first: u64, last: u64) -> bool {
        let Some(log) = &self.intent else {
            return false;
        };
        if log.is_marked(first, last) {
            return false;
        }
        let failed = log.ensure(first, last, self.writable());
        for leg in (0..self.health.len()).filter(|l| failed & (1 << l) != 0) {
            if self.health[leg].swap(FAILED, Ordering::AcqRel) != FAILED {
                warn!(mirror = %self.name, leg, "write-intent update failed; leg failed");
                self.record_failure(leg);
            }
        }
        failed != 0
    }
}

/// A mirror over N legs. See the module documentation.
pub struct Mirror {
    info: DeviceInfo,
    shared: Arc<Shared>,
}

impl Mirror {
    /// A mirror of `legs` (2..=32, one block size) with dirty regions of
    /// `region_blocks` blocks and a fresh, clean [`DirtyMap`].
    pub fn new(legs: Vec<Arc<dyn BlockDevice>>, region_blocks: u64) -> Result<Mirror, BdevError> {
        let block_count = legs.iter().map(|l| l.info().block_count).min().unwrap_or(0);
        let dirty = Arc::new(DirtyMap::new(block_count, region_blocks)?);
        Mirror::with_dirty_map(legs, dirty)
    }

    /// A mirror over `legs` whose write-intent log is `dirty`, e.g. the map
    /// of a previous instance over the same legs. Regions the map shows
    /// dirty become suspect: reads there use the primary (first healthy)
    /// leg until [`Mirror::resync_dirty`] has made the legs equal.
    pub fn with_dirty_map(
        legs: Vec<Arc<dyn BlockDevice>>,
        dirty: Arc<DirtyMap>,
    ) -> Result<Mirror, BdevError> {
        Mirror::with_parts(legs, dirty, None)
    }

    fn with_parts(
        legs: Vec<Arc<dyn BlockDevice>>,
        dirty: Arc<DirtyMap>,
        intent: Option<Arc<intent::IntentLog>>,
    ) -> Result<Mirror, BdevError> {
        if legs.len() < 2 || legs.len() > MAX_LEGS {
            return Err(BdevError::TooFewMembers {
                device: "mirror (at most 32 legs)",
                min: 2,
                got: legs.len(),
            });
        }
        let name = format!(
            "mirror({})",
            legs.iter()
                .map(|l| l.info().name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let block_size = common_block_size(&name, &legs)?;
        let block_count = legs.iter().map(|l| l.info().block_count).min().unwrap_or(0);
        if dirty.block_count != block_count {
            return Err(BdevError::InvalidParameter {
                device: name,
                parameter: "dirty map",
                reason: format!(
                    "covers {} blocks, the legs {block_count}",
                    dirty.block_count
                ),
            });
        }
        let suspect = dirty.recover_after_unclean_stop();
        if suspect > 0 {
            info!(mirror = %name, suspect, "unclean stop: regions to resync");
        }
        let ops = legs
            .iter()
            .fold(SupportedOps::all(), |ops, l| ops & l.info().ops);
        let buf_align = legs.iter().map(|l| l.info().buf_align).max().unwrap_or(1);
        let id = DeviceId::fresh();
        let info = DeviceInfo {
            id,
            name: name.clone(),
            kind: DeviceKind::Mirror,
            block_size,
            block_count,
            max_transfer_blocks: u64::MAX,
            buf_align,
            needs_iova: legs.iter().any(|l| l.info().needs_iova),
            dma_context: crate::device::shared_dma_context(&legs),
            optimal_boundary_blocks: dirty.region_blocks,
            ops,
            copy_offloads: Vec::new(),
        };
        let leg_count = legs.len();
        Ok(Mirror {
            info,
            shared: Arc::new(Shared {
                name,
                block_size,
                block_count,
                legs: Mutex::new(legs),
                health: (0..leg_count).map(|_| AtomicU8::new(HEALTHY)).collect(),
                resync_done: (0..leg_count).map(|_| AtomicU64::new(0)).collect(),
                generation: AtomicU64::new(0),
                dirty,
                read_retries: AtomicU64::new(0),
                read_repairs: AtomicU64::new(0),
                read_errors: (0..leg_count).map(|_| AtomicU64::new(0)).collect(),
                allocator: Mutex::new(Arc::new(HostAllocator)),
                intent,
            }),
        })
    }

    /// Makes resyncs take their buffers from `allocator` (host memory by
    /// default): legs that need DMA-mapped memory need this.
    pub fn set_allocator(&self, allocator: Arc<dyn DmaAllocator>) {
        *self
            .shared
            .allocator
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = allocator;
    }

    /// The write-intent log; keep it to reassemble after an unclean stop.
    pub fn dirty_map(&self) -> Arc<DirtyMap> {
        Arc::clone(&self.shared.dirty)
    }

    /// The mirror's health.
    pub fn health(&self) -> MirrorHealth {
        let legs = (0..self.shared.health.len())
            .map(|l| match self.shared.state(l) {
                HEALTHY => LegHealth::Healthy,
                RESYNCING => LegHealth::Resyncing {
                    done_blocks: self.shared.resync_done[l].load(Ordering::Acquire),
                    total_blocks: self.shared.block_count,
                },
                _ => LegHealth::Failed,
            })
            .collect();
        let suspect_regions = (0..self.shared.dirty.region_count())
            .filter(|&r| self.shared.dirty.is_suspect(r))
            .count();
        MirrorHealth {
            legs,
            suspect_regions,
            read_retries: self.shared.read_retries.load(Ordering::Relaxed),
            read_repairs: self.shared.read_repairs.load(Ordering::Relaxed),
        }
    }

    fn state_error(&self, reason: String) -> BdevError {
        BdevError::MirrorState {
            device: self.info.name.clone(),
            reason,
        }
    }

    /// Replaces failed leg `leg` with `device`, which takes writes at once.
    /// Run the returned [`Resync`] (on any thread, while I/O continues) to
    /// copy the data in; the leg serves reads once it has finished.
    pub fn replace_leg(
        &self,
        leg: usize,
        device: Arc<dyn BlockDevice>,
    ) -> Result<Resync, BdevError> {
        if leg >= self.shared.health.len() {
            return Err(self.state_error(format!("no leg {leg}")));
        }
        if self.shared.state(leg) != FAILED {
            return Err(self.state_error(format!("leg {leg} has not failed")));
        }
        // With metadata, `device` is a raw member: its data area is the leg.
        let (device, member) = match &self.shared.intent {
            Some(log) => {
                let layout = log.superblock().layout;
                let slice = Slice::new(Arc::clone(&device), layout.data_offset, layout.data_blocks)
                    .map_err(|_| {
                        self.state_error(format!(
                            "replacement {} is too small for the mirror's metadata and {} data blocks",
                            device.info().name,
                            layout.data_blocks
                        ))
                    })?;
                (Arc::new(slice) as Arc<dyn BlockDevice>, Some(device))
            }
            None => (device, None),
        };
        let new = device.info();
        if new.block_size != self.shared.block_size {
            return Err(BdevError::BlockSizeMismatch {
                device: self.info.name.clone(),
                member: new.name.clone(),
                expected: self.shared.block_size,
                found: new.block_size,
            });
        }
        if let Some(ours) = self.info.dma_context
            && new.needs_iova
            && new.dma_context != Some(ours)
        {
            return Err(self.state_error(format!(
                "replacement {} is in another DMA context than the mirror's buffers: \
                 open it with the leaf registry that built the mirror",
                new.name
            )));
        }
        if new.block_count < self.shared.block_count {
            return Err(self.state_error(format!(
                "replacement {} has {} blocks, the mirror needs {}",
                new.name, new.block_count, self.shared.block_count
            )));
        }
        let source = self.primary()?;
        if let (Some(log), Some(member)) = (&self.shared.intent, member) {
            let failed = log.leg_replaced(leg, member, self.shared.writable());
            if failed & (1 << leg) != 0 {
                return Err(self.state_error(format!(
                    "writing the metadata to the replacement for leg {leg} failed"
                )));
            }
        }
        {
            let mut legs = self.shared.legs();
            legs[leg] = device;
            self.shared.resync_done[leg].store(0, Ordering::Release);
            self.shared.health[leg].store(RESYNCING, Ordering::Release);
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        info!(mirror = %self.info.name, leg, "leg replaced; resync pending");
        Resync::new(
            Arc::clone(&self.shared),
            source,
            ResyncMode::Rebuild { target: leg },
        )
    }

    /// Fails leg `leg` by hand (as `mdadm --fail`): it takes no more I/O
    /// and can then be replaced. The last leg that serves reads cannot be
    /// failed: the mirror would lose its data.
    pub fn fail_leg(&self, leg: usize) -> Result<(), BdevError> {
        if leg >= self.shared.health.len() {
            return Err(self.state_error(format!("no leg {leg}")));
        }
        if self.shared.readable() == 1 << leg {
            return Err(self.state_error(format!(
                "leg {leg} is the last leg that serves reads; replace another first"
            )));
        }
        if self.shared.health[leg].swap(FAILED, Ordering::AcqRel) != FAILED {
            warn!(mirror = %self.info.name, leg, "mirror leg failed by request; mirror degraded");
        }
        Ok(())
    }

    /// Copies the regions an unclean stop left suspect from the primary leg
    /// to the other healthy legs.
    pub fn resync_dirty(&self) -> Result<Resync, BdevError> {
        let source = self.primary()?;
        Resync::new(Arc::clone(&self.shared), source, ResyncMode::Dirty)
    }

    fn primary(&self) -> Result<usize, BdevError> {
        let readable = self.shared.readable();
        if readable == 0 {
            return Err(self.state_error("no healthy leg".into()));
        }
        Ok(readable.trailing_zeros() as usize)
    }
}

impl BlockDevice for Mirror {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(MirrorChannel::open(
            self.info.clone(),
            Arc::clone(&self.shared),
            depth,
        )))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.shared.legs().clone()
    }

    fn hold_copy_writes(
        &self,
        lba: u64,
        blocks: u64,
        holds: &mut WriteHolds,
    ) -> Result<bool, IoError> {
        check_map_range(&self.info, lba, blocks, Access::Write)?;
        if blocks == 0 {
            return Ok(true);
        }
        let dirty = &self.shared.dirty;
        let (first, last) = (dirty.region_of(lba), dirty.region_of(lba + blocks - 1));
        for region in first..=last {
            if !dirty.try_begin_writes(region, 1) {
                // A resync holds it: give back what was taken, so nobody
                // waits while holding.
                for taken in first..region {
                    dirty.end_write(taken);
                }
                return Ok(false);
            }
        }
        holds.push(dirty, first, last);
        // Offloads write the legs beside the mirror's channel: their
        // regions' bits are durable before they start, as for any write.
        self.shared.ensure_intent(first, last);
        // Legs may hold further layers (a mirror under a leg).
        let legs = self.shared.legs().clone();
        let writable = self.shared.writable();
        for (leg, device) in legs.iter().enumerate() {
            if writable & (1 << leg) != 0 && !device.hold_copy_writes(lba, blocks, holds)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        check_map_range(&self.info, lba, blocks, access)?;
        let legs = self.shared.legs().clone();
        let no_leg = IoError {
            device: self.info.id,
            op: IoOp::Read,
            lba,
            blocks,
            kind: IoErrorKind::NoHealthyLeg,
        };
        match access {
            Access::Read => {
                // One leg for the whole range: the primary, which is also
                // the only trustworthy one in suspect regions.
                let readable = self.shared.readable();
                if readable == 0 {
                    return Err(no_leg);
                }
                legs[readable.trailing_zeros() as usize].map(lba, blocks, access, out)
            }
            Access::Write => {
                let writable = self.shared.writable();
                if writable == 0 {
                    return Err(IoError {
                        op: IoOp::Write,
                        ..no_leg
                    });
                }
                let mut base = 0u16;
                for (leg, device) in legs.iter().enumerate() {
                    if writable & (1 << leg) == 0 {
                        continue;
                    }
                    let first_new = out.len();
                    device.map(lba, blocks, access, out)?;
                    let mut replicas = 0u16;
                    for fragment in &mut out[first_new..] {
                        replicas = replicas.max(fragment.replica + 1);
                        fragment.replica += base;
                    }
                    base += replicas;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostBuffer, MemDevice, OwnedChannel};

    fn mem(blocks: u64) -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(blocks * 512, 512, 1 << 16).expect("mem"))
    }

    #[test]
    fn a_write_waits_while_a_resync_holds_its_region() {
        let leg0 = mem(64);
        let leg1 = mem(64);
        let mirror = Mirror::new(vec![leg0.clone(), leg1], 16).expect("mirror");
        let dirty = mirror.dirty_map();
        let mut ch = OwnedChannel::<HostBuffer>::open(&mirror, 2).expect("channel");
        assert!(dirty.try_lock(1));
        let mut buf = HostBuffer::new(512).expect("buffer");
        buf.as_mut_slice().fill(0x5a);
        ch.write(20, 1, buf, 7)
            .map_err(|r| r.error)
            .expect("submit");
        for _ in 0..10 {
            assert_eq!(ch.poll(4, |_, _, _| {}), 0, "write overtook the resync");
        }
        let mut leg_ch = OwnedChannel::<HostBuffer>::open(leg0.as_ref(), 1).expect("channel");
        let read_leg0 = |leg_ch: &mut OwnedChannel<HostBuffer>| {
            let buf = HostBuffer::new(512).expect("buffer");
            leg_ch
                .read(20, 1, buf, 0)
                .map_err(|r| r.error)
                .expect("submit");
            let mut byte = None;
            while byte.is_none() {
                leg_ch.poll(1, |_, _, b| byte = b.map(|b| b.as_slice()[0]));
            }
            byte
        };
        assert_eq!(
            read_leg0(&mut leg_ch),
            Some(0),
            "leg written under the lock"
        );
        dirty.unlock(1, false);
        let mut done = None;
        while done.is_none() {
            ch.poll(4, |ctx, result, _| done = Some((ctx, result)));
        }
        assert_eq!(done, Some((7, Ok(()))));
        assert_eq!(read_leg0(&mut leg_ch), Some(0x5a));
    }

    #[test]
    fn resync_step_waits_for_writes_in_flight_in_its_region() {
        let leg0 = mem(64);
        let (leg1, faults) = crate::FaultyDevice::new(mem(64));
        let mirror = Mirror::new(vec![leg0, Arc::new(leg1)], 16).expect("mirror");
        let mut ch = OwnedChannel::<HostBuffer>::open(&mirror, 2).expect("channel");
        faults.fail_nth(1);
        ch.submit(IoOp::WriteZeroes, 0, 1, None, 1)
            .map_err(|r| r.error)
            .expect("submit");
        while ch.poll(1, |_, r, _| assert!(r.is_ok())) == 0 {}
        assert_eq!(mirror.health().legs[1], LegHealth::Failed);

        let mut resync = mirror.replace_leg(1, mem(64)).expect("replace");
        // A write submitted but not yet harvested holds region 0.
        ch.submit(IoOp::WriteZeroes, 3, 1, None, 2)
            .map_err(|r| r.error)
            .expect("submit");
        assert_eq!(resync.step().expect("step"), ResyncStep::Waiting);
        while ch.poll(1, |_, r, _| assert!(r.is_ok())) == 0 {}
        assert_eq!(
            resync.step().expect("step"),
            ResyncStep::Copied { region: 0 }
        );
        let report = resync.run().expect("run");
        assert_eq!(report.blocks, 64);
        assert!(!mirror.health().is_degraded());
    }
}
