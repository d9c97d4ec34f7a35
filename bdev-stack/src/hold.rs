//! What a copy holds in the destination stack while it writes through the
//! leaves: the write intent of the mirrors it writes under.

use std::sync::Arc;

use crate::mirror::DirtyMap;

/// Write-intent counts a copy holds, taken by
/// [`BlockDevice::hold_copy_writes`](crate::BlockDevice::hold_copy_writes)
/// and released on [`WriteHolds::release`] or drop. While held, a mirror
/// counts the copy's regions as written (a resync waits for them, and an
/// unclean stop leaves them to resync).
#[derive(Debug, Default)]
pub struct WriteHolds {
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    map: Arc<DirtyMap>,
    first_region: u64,
    last_region: u64,
}

impl WriteHolds {
    /// Nothing held.
    pub fn new() -> WriteHolds {
        WriteHolds::default()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds taken (one per mirror and range).
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Lets go of everything held; keeps the allocation.
    pub fn release(&mut self) {
        for held in self.held.drain(..) {
            for region in held.first_region..=held.last_region {
                held.map.end_write(region);
            }
        }
    }

    /// Records regions `first..=last` of `map`, whose counts the caller
    /// has just taken.
    pub(crate) fn push(&mut self, map: &Arc<DirtyMap>, first_region: u64, last_region: u64) {
        self.held.push(Held {
            map: Arc::clone(map),
            first_region,
            last_region,
        });
    }
}

impl Drop for WriteHolds {
    fn drop(&mut self) {
        self.release();
    }
}
