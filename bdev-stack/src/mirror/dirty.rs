//! The mirror's write-intent map: per region, writes in flight, whether a
//! resync holds it, and whether an unclean stop left it suspect.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::BdevError;

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
    pub(super) region_blocks: u64,
    pub(super) block_count: u64,
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

    pub(crate) fn region_of(&self, lba: u64) -> u64 {
        lba / self.region_blocks
    }

    pub(crate) fn region(&self, region: u64) -> Option<&AtomicU32> {
        self.regions.get(usize::try_from(region).ok()?)
    }

    /// Registers `writes` child writes in `region`, unless a resync holds it.
    pub(crate) fn try_begin_writes(&self, region: u64, writes: u32) -> bool {
        self.region(region).is_some_and(|r| {
            // Sequentially consistent with the write-intent bits' clearing
            // (see `IntentLog::write_cleared`).
            r.fetch_update(Ordering::SeqCst, Ordering::Acquire, |v| {
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

    /// True while writes are in flight in `region`.
    pub(crate) fn in_flight(&self, region: u64) -> bool {
        self.region(region)
            .is_some_and(|r| r.load(Ordering::SeqCst) & COUNT_MASK != 0)
    }

    /// Marks `region` suspect: its legs may differ (an unclean stop the
    /// on-device bitmap recorded); reads use the primary until a resync.
    pub(crate) fn mark_suspect(&self, region: u64) {
        if let Some(r) = self.region(region) {
            r.fetch_or(SUSPECT, Ordering::AcqRel);
        }
    }

    pub(crate) fn is_suspect(&self, region: u64) -> bool {
        self.region(region)
            .is_some_and(|r| r.load(Ordering::Acquire) & SUSPECT != 0)
    }

    /// Takes the region for a resync once no write is in flight there.
    pub(crate) fn try_lock(&self, region: u64) -> bool {
        self.region(region).is_some_and(|r| {
            r.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & (LOCKED | COUNT_MASK) == 0).then_some(v | LOCKED)
            })
            .is_ok()
        })
    }

    pub(crate) fn unlock(&self, region: u64, clear_suspect: bool) {
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
    pub(crate) fn recover_after_unclean_stop(&self) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
