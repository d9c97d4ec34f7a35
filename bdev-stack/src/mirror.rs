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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{debug, info, warn};

use crate::buffer::{DmaAllocator, DmaMemory, DmaSlice, HostAllocator};
use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, SupportedOps, check_map_range, common_block_size,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::hold::WriteHolds;
use crate::pool::Slab;

/// Most legs a mirror can have (leg sets are 32-bit masks).
pub const MAX_LEGS: usize = 32;

/// Default dirty-region size, in bytes (as md's default bitmap chunk order
/// of magnitude: small enough to resync little, large enough to be cheap).
pub const DEFAULT_REGION_BYTES: u64 = 1 << 20;

const LOCKED: u32 = 1 << 31;
const SUSPECT: u32 = 1 << 30;
const COUNT_MASK: u32 = SUSPECT - 1;

/// Per-region write-intent state of a mirror: writes in flight, whether a
/// resync holds the region, and whether an unclean stop left it suspect.
///
/// Keep the `Arc` to survive the mirror: a map whose counts are not zero when
/// a new mirror is assembled over it records an unclean stop.
#[derive(Debug)]
pub struct DirtyMap {
    region_blocks: u64,
    block_count: u64,
    regions: Box<[AtomicU32]>,
}

impl DirtyMap {
    /// A clean map for `block_count` blocks in regions of `region_blocks`.
    pub fn new(block_count: u64, region_blocks: u64) -> Result<DirtyMap, BdevError> {
        if region_blocks == 0 {
            return Err(BdevError::InvalidParameter {
                device: "mirror".into(),
                parameter: "region",
                reason: "zero blocks".into(),
            });
        }
        let count = usize::try_from(block_count.div_ceil(region_blocks)).map_err(|_| {
            BdevError::InvalidParameter {
                device: "mirror".into(),
                parameter: "region",
                reason: "too many regions for this host".into(),
            }
        })?;
        Ok(DirtyMap {
            region_blocks,
            block_count,
            regions: (0..count).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    /// Blocks per region.
    pub fn region_blocks(&self) -> u64 {
        self.region_blocks
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.regions.len() as u64
    }

    /// Regions with writes in flight or left suspect by an unclean stop.
    pub fn dirty_regions(&self) -> Vec<u64> {
        (0..self.regions.len())
            .filter(|&r| self.regions[r].load(Ordering::Acquire) & (COUNT_MASK | SUSPECT) != 0)
            .map(|r| r as u64)
            .collect()
    }

    fn region_of(&self, lba: u64) -> u64 {
        lba / self.region_blocks
    }

    fn region(&self, region: u64) -> Option<&AtomicU32> {
        self.regions.get(usize::try_from(region).ok()?)
    }

    /// Registers `writes` child writes in `region`, unless a resync holds it.
    pub(crate) fn try_begin_writes(&self, region: u64, writes: u32) -> bool {
        self.region(region).is_some_and(|r| {
            r.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & LOCKED == 0).then_some(v + writes)
            })
            .is_ok()
        })
    }

    pub(crate) fn end_write(&self, region: u64) {
        if let Some(r) = self.region(region) {
            r.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn is_suspect(&self, region: u64) -> bool {
        self.region(region)
            .is_some_and(|r| r.load(Ordering::Acquire) & SUSPECT != 0)
    }

    /// Takes the region for a resync once no write is in flight there.
    fn try_lock(&self, region: u64) -> bool {
        self.region(region).is_some_and(|r| {
            r.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & (LOCKED | COUNT_MASK) == 0).then_some(v | LOCKED)
            })
            .is_ok()
        })
    }

    fn unlock(&self, region: u64, clear_suspect: bool) {
        if let Some(r) = self.region(region) {
            let clear = if clear_suspect {
                LOCKED | SUSPECT
            } else {
                LOCKED
            };
            r.fetch_and(!clear, Ordering::AcqRel);
        }
    }

    /// Turns writes left in flight by an unclean stop into suspect regions;
    /// returns how many there are.
    fn recover_after_unclean_stop(&self) -> usize {
        let mut suspect = 0;
        for r in self.regions.iter() {
            let v = r.load(Ordering::Acquire);
            if v & (COUNT_MASK | SUSPECT) != 0 {
                r.store(SUSPECT, Ordering::Release);
                suspect += 1;
            } else if v & LOCKED != 0 {
                // A resync was copying it when everything stopped.
                r.store(SUSPECT, Ordering::Release);
                suspect += 1;
            }
        }
        suspect
    }
}

const HEALTHY: u8 = 0;
const FAILED: u8 = 1;
const RESYNCING: u8 = 2;

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
}

impl MirrorHealth {
    /// True when some leg does not hold every block.
    pub fn is_degraded(&self) -> bool {
        self.legs.iter().any(|l| *l != LegHealth::Healthy)
    }
}

struct Shared {
    name: String,
    block_size: u32,
    block_count: u64,
    legs: Mutex<Vec<Arc<dyn BlockDevice>>>,
    health: Box<[AtomicU8]>,
    resync_done: Box<[AtomicU64]>,
    /// Bumped when a leg is replaced, so channels reopen their leg channels.
    generation: AtomicU64,
    dirty: Arc<DirtyMap>,
    read_retries: AtomicU64,
    /// Memory for the resync's copies.
    allocator: Mutex<Arc<dyn DmaAllocator>>,
}

impl Shared {
    fn legs(&self) -> MutexGuard<'_, Vec<Arc<dyn BlockDevice>>> {
        // The leg list is always a valid list, poisoned or not.
        self.legs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn allocator(&self) -> Arc<dyn DmaAllocator> {
        Arc::clone(
            &self
                .allocator
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn state(&self, leg: usize) -> u8 {
        self.health[leg].load(Ordering::Acquire)
    }

    fn mask(&self, wanted: impl Fn(u8) -> bool) -> u32 {
        (0..self.health.len())
            .filter(|&l| wanted(self.state(l)))
            .fold(0, |m, l| m | 1 << l)
    }

    /// Legs that serve reads.
    fn readable(&self) -> u32 {
        self.mask(|s| s == HEALTHY)
    }

    /// Legs that must receive writes.
    fn writable(&self) -> u32 {
        self.mask(|s| s == HEALTHY || s == RESYNCING)
    }

    fn fail_leg(&self, leg: usize, error: &IoError) {
        if self.health[leg].swap(FAILED, Ordering::AcqRel) != FAILED {
            warn!(mirror = %self.name, leg, %error, "mirror leg failed; mirror degraded");
        }
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
                allocator: Mutex::new(Arc::new(HostAllocator)),
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
        let new = device.info();
        if new.block_size != self.shared.block_size {
            return Err(BdevError::BlockSizeMismatch {
                device: self.info.name.clone(),
                member: new.name.clone(),
                expected: self.shared.block_size,
                found: new.block_size,
            });
        }
        if new.block_count < self.shared.block_count {
            return Err(self.state_error(format!(
                "replacement {} has {} blocks, the mirror needs {}",
                new.name, new.block_count, self.shared.block_count
            )));
        }
        let source = self.primary()?;
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
        let depth = depth.max(1);
        let leg_count = self.shared.health.len();
        let leg_depth = depth.saturating_mul(4);
        let children = depth.saturating_mul(leg_count).saturating_mul(4).max(64);
        let mut channel = MirrorChannel {
            info: self.info.clone(),
            shared: Arc::clone(&self.shared),
            generation: u64::MAX,
            leg_devices: Vec::with_capacity(leg_count),
            leg_channels: Vec::with_capacity(leg_count),
            leg_generation: vec![0; leg_count],
            leg_depth,
            retired: Vec::new(),
            max_run: 1,
            next_read_leg: 0,
            parents: Slab::new(depth),
            children: Slab::new(children),
            stalled: VecDeque::with_capacity(depth),
            retry: VecDeque::with_capacity(children),
            done: VecDeque::with_capacity(depth),
            scratch: vec![Completion::EMPTY; leg_depth.min(256)],
            _not_sync: NotSync::default(),
        };
        channel.refresh_legs();
        Ok(Box::new(channel))
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

#[derive(Default)]
struct Parent {
    ctx: u64,
    op: Option<IoOp>,
    lba: u64,
    blocks: u64,
    buf: Option<DmaSlice>,
    cursor: u64,
    end: u64,
    outstanding: u32,
    error: Option<IoError>,
    /// Healthy legs that were sent a part of this write.
    legs_written: u32,
    /// Legs that failed a part of it.
    legs_failed: u32,
}

#[derive(Default, Clone, Copy)]
struct Child {
    parent: u32,
    leg: usize,
    generation: u64,
    op: Option<IoOp>,
    lba: u64,
    blocks: u64,
    buf: Option<DmaSlice>,
    /// Legs a read has been tried on.
    tried: u32,
    /// The dirty region a write holds a count in.
    region: Option<u64>,
}

struct MirrorChannel {
    info: DeviceInfo,
    shared: Arc<Shared>,
    generation: u64,
    leg_devices: Vec<Arc<dyn BlockDevice>>,
    leg_channels: Vec<Option<Box<dyn Channel>>>,
    /// Bumped per leg when its device changes, so completions from the old
    /// device's channel are not blamed on the new one.
    leg_generation: Vec<u64>,
    leg_depth: usize,
    /// Channels of replaced legs, polled until their last child returns.
    retired: Vec<(usize, Box<dyn Channel>)>,
    /// Largest child: the smallest maximum transfer among the legs.
    max_run: u64,
    next_read_leg: usize,
    parents: Slab<Parent>,
    children: Slab<Child>,
    stalled: VecDeque<u32>,
    retry: VecDeque<u32>,
    done: VecDeque<u32>,
    scratch: Vec<Completion>,
    _not_sync: NotSync,
}

impl MirrorChannel {
    /// Reopens channels to legs whose device changed (leg replacement).
    /// Allocates, but only when a leg was replaced.
    fn refresh_legs(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let legs = self.shared.legs().clone();
        for (leg, device) in legs.into_iter().enumerate() {
            let same = self
                .leg_devices
                .get(leg)
                .is_some_and(|old| std::ptr::addr_eq(Arc::as_ptr(old), Arc::as_ptr(&device)));
            if same {
                continue;
            }
            let channel = match device.open_channel(self.leg_depth) {
                Ok(channel) => Some(channel),
                Err(error) => {
                    warn!(mirror = %self.info.name, leg, %error, "cannot open a channel to a leg; failing it");
                    self.shared.health[leg].store(FAILED, Ordering::Release);
                    None
                }
            };
            if leg < self.leg_devices.len() {
                self.leg_devices[leg] = device;
                self.leg_generation[leg] += 1;
                if let Some(old) = std::mem::replace(&mut self.leg_channels[leg], channel)
                    && old.outstanding() > 0
                {
                    self.retired.push((leg, old));
                }
            } else {
                self.leg_devices.push(device);
                self.leg_channels.push(channel);
            }
        }
        self.max_run = self
            .leg_devices
            .iter()
            .map(|d| d.info().max_transfer_blocks)
            .min()
            .unwrap_or(1)
            .max(1);
    }

    fn next_readable(&mut self, region: u64, tried: u32) -> Option<usize> {
        let readable = self.shared.readable() & !tried;
        if readable == 0 {
            return None;
        }
        if self.shared.dirty.is_suspect(region) {
            // Only the primary's copy is trusted until the resync; if it
            // has been tried, any remaining leg beats an error.
            let primary = self.shared.readable().trailing_zeros();
            if readable & (1 << primary) != 0 {
                return Some(primary as usize);
            }
        }
        let legs = self.leg_devices.len();
        for step in 0..legs {
            let leg = (self.next_read_leg + step) % legs;
            if readable & (1 << leg) != 0 {
                self.next_read_leg = leg + 1;
                return Some(leg);
            }
        }
        None
    }

    fn dispatch(&mut self, slot: u32) {
        let bs = u64::from(self.info.block_size);
        loop {
            let parent = self.parents.at(slot);
            let (Some(op), cursor) = (parent.op, parent.cursor) else {
                return;
            };
            if cursor >= parent.end {
                break;
            }
            let lba = parent.lba + cursor;
            let region_blocks = self.shared.dirty.region_blocks;
            let region = lba / region_blocks;
            let run = if op == IoOp::Flush {
                0
            } else {
                (parent.blocks - cursor)
                    .min(region_blocks - lba % region_blocks)
                    .min(self.max_run)
            };
            let buf = parent
                .buf
                .and_then(|b| b.sub((cursor * bs) as usize, (run * bs) as usize));
            let mut child = Child {
                parent: slot,
                leg: 0,
                generation: 0,
                op: Some(op),
                lba,
                blocks: run,
                buf,
                tried: 0,
                region: None,
            };
            let advance = if op == IoOp::Flush { 1 } else { run };
            if op == IoOp::Read {
                let Some(leg) = self.next_readable(region, 0) else {
                    self.fail_part(slot, op, lba, run, advance);
                    continue;
                };
                let Some(child_slot) = self.children.take() else {
                    self.stalled.push_back(slot);
                    return;
                };
                child.leg = leg;
                child.generation = self.leg_generation[leg];
                *self.children.at(child_slot) = child;
                let parent = self.parents.at(slot);
                parent.outstanding += 1;
                parent.cursor += advance;
                self.submit_child(child_slot);
                continue;
            }
            let writable = self.shared.writable();
            let healthy = self.shared.readable();
            if writable == 0 {
                self.fail_part(slot, op, lba, run, advance);
                continue;
            }
            let fan_out = writable.count_ones();
            if self.children.available() < fan_out as usize {
                self.stalled.push_back(slot);
                return;
            }
            if op != IoOp::Flush {
                if !self.shared.dirty.try_begin_writes(region, fan_out) {
                    // A resync holds the region: wait for it.
                    self.stalled.push_back(slot);
                    return;
                }
                child.region = Some(region);
            }
            let parent = self.parents.at(slot);
            parent.outstanding += fan_out;
            parent.cursor += advance;
            parent.legs_written |= writable & healthy;
            for leg in 0..self.leg_devices.len() {
                if writable & (1 << leg) == 0 {
                    continue;
                }
                let Some(child_slot) = self.children.take() else {
                    break; // counted above: cannot happen
                };
                child.leg = leg;
                child.generation = self.leg_generation[leg];
                *self.children.at(child_slot) = child;
                self.submit_child(child_slot);
            }
        }
        self.finish_if_done(slot);
    }

    /// Fails a part of a parent that no leg can take.
    fn fail_part(&mut self, slot: u32, op: IoOp, lba: u64, blocks: u64, advance: u64) {
        let parent = self.parents.at(slot);
        parent.error.get_or_insert(IoError {
            device: self.info.id,
            op,
            lba,
            blocks,
            kind: IoErrorKind::NoHealthyLeg,
        });
        parent.cursor += advance;
    }

    fn submit_child(&mut self, child_slot: u32) {
        let child = *self.children.at(child_slot);
        let Some(op) = child.op else { return };
        let stale = child.generation != self.leg_generation[child.leg];
        if stale && op.modifies() {
            // The leg was replaced since the child was made; the new leg
            // takes writes, and this one belongs to it now.
            self.children.at(child_slot).generation = self.leg_generation[child.leg];
        }
        let Some(channel) = self.leg_channels[child.leg].as_mut() else {
            self.child_done(child_slot, Err(self.leg_unavailable(&child)));
            return;
        };
        if op == IoOp::Read && (stale || self.shared.readable() & (1 << child.leg) == 0) {
            self.child_done(child_slot, Err(self.leg_unavailable(&child)));
            return;
        }
        let req = IoRequest {
            op,
            lba: child.lba,
            blocks: child.blocks,
            buf: child.buf.unwrap_or(DmaSlice::EMPTY),
            ctx: u64::from(child_slot),
        };
        // SAFETY: the child's buffer is a sub-run of its parent's, valid
        // until the parent completes, which waits for this child.
        match unsafe { channel.submit(req) } {
            Ok(()) => {}
            Err(SubmitError::Busy) => self.retry.push_back(child_slot),
            Err(SubmitError::Invalid(error)) => self.child_done(child_slot, Err(error)),
        }
    }

    fn leg_unavailable(&self, child: &Child) -> IoError {
        IoError {
            device: self.leg_devices[child.leg].info().id,
            op: child.op.unwrap_or(IoOp::Read),
            lba: child.lba,
            blocks: child.blocks,
            kind: IoErrorKind::NoHealthyLeg,
        }
    }

    fn child_done(&mut self, child_slot: u32, result: Result<(), IoError>) {
        let child = *self.children.at(child_slot);
        let Some(op) = child.op else {
            debug!(child_slot, "completion for an idle child");
            return;
        };
        let current = child.generation == self.leg_generation[child.leg];
        if op == IoOp::Read {
            if let Err(error) = result {
                let tried = child.tried | 1 << child.leg;
                let region = self.shared.dirty.region_of(child.lba);
                if let Some(leg) = self.next_readable(region, tried) {
                    debug!(%error, leg, "read failed; retrying on another leg");
                    self.shared.read_retries.fetch_add(1, Ordering::Relaxed);
                    let next = self.children.at(child_slot);
                    next.tried = tried;
                    next.leg = leg;
                    next.generation = self.leg_generation[leg];
                    self.submit_child(child_slot);
                    return;
                }
                self.parents.at(child.parent).error.get_or_insert(error);
            }
        } else {
            if let Some(region) = child.region {
                self.shared.dirty.end_write(region);
            }
            if let Err(error) = result {
                if current {
                    self.shared.fail_leg(child.leg, &error);
                }
                let parent = self.parents.at(child.parent);
                parent.legs_failed |= 1 << child.leg;
                // The write fails only when no healthy leg it went to is
                // left; a leg's own failure lives on in its health. Legs
                // written to are never added after that point (no healthy
                // leg remains), so the verdict is final.
                if parent.error.is_none() && parent.legs_written & !parent.legs_failed == 0 {
                    parent.error = Some(error);
                }
            }
        }
        self.children.at(child_slot).op = None;
        self.children.put(child_slot);
        let parent = self.parents.at(child.parent);
        parent.outstanding = parent.outstanding.saturating_sub(1);
        self.finish_if_done(child.parent);
    }

    fn finish_if_done(&mut self, slot: u32) {
        let parent = self.parents.at(slot);
        if parent.cursor < parent.end || parent.outstanding > 0 {
            return;
        }
        self.done.push_back(slot);
    }

    fn harvest(&mut self, channel: Option<usize>) {
        loop {
            let n = match channel {
                Some(leg) => match self.leg_channels[leg].as_mut() {
                    Some(ch) => ch.poll(&mut self.scratch),
                    None => 0,
                },
                None => {
                    let mut n = 0;
                    for (_, ch) in &mut self.retired {
                        n += ch.poll(&mut self.scratch[n..]);
                    }
                    n
                }
            };
            for i in 0..n {
                let completion = self.scratch[i];
                match u32::try_from(completion.ctx) {
                    Ok(slot)
                        if (slot as usize) < self.children.in_use() + self.children.available() =>
                    {
                        self.child_done(slot, completion.result)
                    }
                    _ => debug!(ctx = completion.ctx, "completion for an unknown child"),
                }
            }
            if n < self.scratch.len() {
                break;
            }
        }
    }
}

impl Channel for MirrorChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        self.refresh_legs();
        let slot = self.parents.take().ok_or(SubmitError::Busy)?;
        *self.parents.at(slot) = Parent {
            ctx: req.ctx,
            op: Some(req.op),
            lba: req.lba,
            blocks: req.blocks,
            buf: req.op.moves_data().then_some(req.buf),
            cursor: 0,
            end: if req.op == IoOp::Flush { 1 } else { req.blocks },
            outstanding: 0,
            error: None,
            legs_written: 0,
            legs_failed: 0,
        };
        self.dispatch(slot);
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        self.refresh_legs();
        for _ in 0..self.retry.len() {
            if let Some(child_slot) = self.retry.pop_front() {
                self.submit_child(child_slot);
            }
        }
        for _ in 0..self.stalled.len() {
            if let Some(slot) = self.stalled.pop_front() {
                self.dispatch(slot);
            }
        }
        for leg in 0..self.leg_channels.len() {
            self.harvest(Some(leg));
        }
        if !self.retired.is_empty() {
            self.harvest(None);
            self.retired.retain(|(_, ch)| ch.outstanding() > 0);
        }
        let mut n = 0;
        while n < out.len() {
            let Some(slot) = self.done.pop_front() else {
                break;
            };
            let parent = self.parents.at(slot);
            out[n] = Completion {
                ctx: parent.ctx,
                result: parent.error.map_or(Ok(()), Err),
            };
            parent.op = None;
            self.parents.put(slot);
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.parents.in_use()
    }
}

enum ResyncMode {
    /// Copy every region into a replaced leg.
    Rebuild { target: usize },
    /// Copy suspect regions to every other healthy leg.
    Dirty,
}

/// What one [`Resync::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Copied one region.
    Copied {
        /// The region.
        region: u64,
    },
    /// The next region has writes in flight; step again later.
    Waiting,
    /// Nothing left; the legs are in sync.
    Finished,
}

/// What a resync did, in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncReport {
    /// Regions copied.
    pub regions: u64,
    /// Blocks copied (per target leg).
    pub blocks: u64,
}

/// A background resync: copies regions from a source leg to target legs,
/// one region at a time, holding each against concurrent writes while it is
/// copied. Drive it with [`Resync::step`] from a polling loop or with
/// [`Resync::run`] on a thread of its own; I/O on the mirror continues
/// meanwhile.
pub struct Resync {
    shared: Arc<Shared>,
    mode: ResyncMode,
    source: Box<dyn Channel>,
    targets: Vec<(usize, Box<dyn Channel>)>,
    buffer: Box<dyn DmaMemory>,
    chunk_blocks: u64,
    next_region: u64,
    report: ResyncReport,
    finished: bool,
}

impl Resync {
    fn new(shared: Arc<Shared>, source_leg: usize, mode: ResyncMode) -> Result<Resync, BdevError> {
        let legs = shared.legs().clone();
        let target_legs: Vec<usize> = match mode {
            ResyncMode::Rebuild { target } => vec![target],
            ResyncMode::Dirty => (0..legs.len())
                .filter(|&l| l != source_leg && shared.state(l) == HEALTHY)
                .collect(),
        };
        let source = legs[source_leg].open_channel(1)?;
        let mut targets = Vec::with_capacity(target_legs.len());
        for &leg in &target_legs {
            targets.push((leg, legs[leg].open_channel(1)?));
        }
        let max_transfer = target_legs
            .iter()
            .chain(std::iter::once(&source_leg))
            .map(|&l| legs[l].info().max_transfer_blocks)
            .min()
            .unwrap_or(1);
        let chunk_blocks = shared.dirty.region_blocks.min(max_transfer).max(1);
        let bytes = usize::try_from(chunk_blocks * u64::from(shared.block_size))
            .map_err(|_| BdevError::OutOfMemory { bytes: usize::MAX })?;
        Ok(Resync {
            buffer: shared.allocator().allocate(bytes)?,
            shared,
            mode,
            source,
            targets,
            chunk_blocks,
            next_region: 0,
            report: ResyncReport::default(),
            finished: false,
        })
    }

    /// Copies the next region, if its writes have drained.
    pub fn step(&mut self) -> Result<ResyncStep, BdevError> {
        if self.finished {
            return Ok(ResyncStep::Finished);
        }
        let dirty = Arc::clone(&self.shared.dirty);
        if let ResyncMode::Dirty = self.mode {
            while self.next_region < dirty.region_count() && !dirty.is_suspect(self.next_region) {
                self.next_region += 1;
            }
        }
        if self.next_region >= dirty.region_count() {
            self.finish();
            return Ok(ResyncStep::Finished);
        }
        if let ResyncMode::Rebuild { target } = self.mode
            && self.shared.state(target) != RESYNCING
        {
            return Err(BdevError::MirrorState {
                device: self.shared.name.clone(),
                reason: format!("leg {target} failed during its resync"),
            });
        }
        let region = self.next_region;
        if !dirty.try_lock(region) {
            return Ok(ResyncStep::Waiting);
        }
        let copied = self.copy_region(region);
        dirty.unlock(
            region,
            copied.is_ok() && matches!(self.mode, ResyncMode::Dirty),
        );
        let blocks = copied?;
        self.next_region += 1;
        self.report.regions += 1;
        self.report.blocks += blocks;
        if let ResyncMode::Rebuild { target } = self.mode {
            self.shared.resync_done[target].fetch_add(blocks, Ordering::AcqRel);
        }
        Ok(ResyncStep::Copied { region })
    }

    /// Steps until finished, yielding the thread while a region is busy.
    pub fn run(mut self) -> Result<ResyncReport, BdevError> {
        loop {
            match self.step()? {
                ResyncStep::Finished => return Ok(self.report),
                ResyncStep::Waiting => std::thread::yield_now(),
                ResyncStep::Copied { .. } => {}
            }
        }
    }

    /// What has been copied so far.
    pub fn report(&self) -> ResyncReport {
        self.report
    }

    fn finish(&mut self) {
        self.finished = true;
        if let ResyncMode::Rebuild { target } = self.mode
            && self.shared.health[target]
                .compare_exchange(RESYNCING, HEALTHY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            info!(mirror = %self.shared.name, leg = target, "resync finished; leg healthy");
        }
    }

    fn copy_region(&mut self, region: u64) -> Result<u64, BdevError> {
        let region_blocks = self.shared.dirty.region_blocks;
        let start = region * region_blocks;
        let end = (start + region_blocks).min(self.shared.block_count);
        let bs = u64::from(self.shared.block_size);
        let mut lba = start;
        while lba < end {
            let blocks = (end - lba).min(self.chunk_blocks);
            let buf = self
                .buffer
                .dma_slice()
                .sub(0, (blocks * bs) as usize)
                .ok_or(BdevError::OutOfMemory {
                    bytes: (blocks * bs) as usize,
                })?;
            run_sync(self.source.as_mut(), IoRequest::read(lba, blocks, buf, 0)).map_err(
                |source| BdevError::Io {
                    context: "resync: reading the source leg",
                    source,
                },
            )?;
            for (leg, target) in &mut self.targets {
                if let Err(error) = run_sync(target.as_mut(), IoRequest::write(lba, blocks, buf, 0))
                {
                    self.shared.fail_leg(*leg, &error);
                    return Err(BdevError::Io {
                        context: "resync: writing a target leg",
                        source: error,
                    });
                }
            }
            lba += blocks;
        }
        Ok(end - start)
    }
}

/// Runs one request to completion on a channel the caller owns alone.
fn run_sync(channel: &mut dyn Channel, req: IoRequest) -> Result<(), IoError> {
    loop {
        // SAFETY: the buffer is the resync's own, untouched until this
        // returns, which is after the completion.
        match unsafe { channel.submit(req) } {
            Ok(()) => break,
            Err(SubmitError::Busy) => {
                let mut drain = [Completion::EMPTY; 1];
                channel.poll(&mut drain);
            }
            Err(SubmitError::Invalid(error)) => return Err(error),
        }
    }
    let mut out = [Completion::EMPTY; 1];
    loop {
        if channel.poll(&mut out) == 1 {
            return out[0].result;
        }
        std::hint::spin_loop();
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
    fn dirty_map_keeps_writes_and_resync_apart() {
        let map = DirtyMap::new(64, 16).expect("map");
        assert!(map.try_begin_writes(1, 2));
        assert!(!map.try_lock(1), "resync must wait for writes in flight");
        map.end_write(1);
        map.end_write(1);
        assert!(map.try_lock(1));
        assert!(
            !map.try_begin_writes(1, 1),
            "writes must wait for the resync"
        );
        assert!(map.try_begin_writes(2, 1), "other regions are free");
        map.unlock(1, false);
        assert!(map.try_begin_writes(1, 1));
        assert_eq!(map.dirty_regions(), vec![1, 2]);
        assert_eq!(map.recover_after_unclean_stop(), 2);
        assert!(map.is_suspect(1) && map.is_suspect(2) && !map.is_suspect(0));
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
