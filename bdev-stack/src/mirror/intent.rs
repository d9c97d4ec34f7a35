//! The durable write-intent log of a mirror with metadata, as md's bitmap:
//! a region's bit is on every writable member (superblock and bitmap
//! written, then flushed) before the first write into the region starts;
//! bits of regions that stay quiet are cleared lazily. The superblock
//! travels with it: clean or dirty, the event counter, member states.
//!
//! Bitmap writes are synchronous, under one lock: writers that need bits
//! while one is being written find them set when it is done, or set theirs
//! in the next, so concurrent writers share bitmap writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::dirty::DirtyMap;
use super::meta::{MemberState, SUPERBLOCK_BYTES, Superblock};
use crate::buffer::{DmaAllocator, DmaMemory};
use crate::device::{BlockDevice, Channel, Completion, IoOp, IoRequest, SubmitError};
use crate::error::{BdevError, IoError};

/// How long a region stays quiet before its bit is cleared (md's bitmap
/// daemon clears after a few seconds, so hot regions keep their bits).
const CLEAR_AFTER: Duration = Duration::from_secs(5);

pub(crate) struct IntentLog {
    name: String,
    state: Mutex<LogState>,
    /// The durable bits, readable without the lock: a write into a region
    /// whose bit is on the members needs no more than this look.
    durable: Box<[AtomicU64]>,
    /// When the next clearing pass is due, in milliseconds since `epoch`.
    pass_due_ms: AtomicU64,
    epoch: Instant,
}

struct LogState {
    /// The raw members, by leg (the mirror's legs are their data areas).
    members: Vec<Arc<dyn BlockDevice>>,
    channels: Vec<Option<Box<dyn Channel>>>,
    sb: Superblock,
    /// The bitmap as on the members.
    bits: Vec<u8>,
    /// Bits seen quiet at the last clearing pass.
    quiet: Vec<u8>,
    last_pass: Instant,
    buffer: Box<dyn DmaMemory>,
}

fn bit(bits: &[u8], region: u64) -> bool {
    usize::try_from(region / 8)
        .ok()
        .and_then(|i| bits.get(i))
        .is_some_and(|b| b & (1 << (region % 8)) != 0)
}

fn set(bits: &mut [u8], region: u64, on: bool) {
    if let Some(b) = usize::try_from(region / 8)
        .ok()
        .and_then(|i| bits.get_mut(i))
    {
        if on {
            *b |= 1 << (region % 8);
        } else {
            *b &= !(1 << (region % 8));
        }
    }
}

impl IntentLog {
    /// A log over `members` (raw devices, by leg) whose current superblock
    /// is `sb` and bitmap `bits`.
    pub(super) fn new(
        name: String,
        members: Vec<Arc<dyn BlockDevice>>,
        sb: Superblock,
        bits: Vec<u8>,
        allocator: &Arc<dyn DmaAllocator>,
    ) -> Result<IntentLog, BdevError> {
        let bytes = usize::try_from(sb.layout.meta_bytes())
            .map_err(|_| BdevError::OutOfMemory { bytes: usize::MAX })?;
        let channels = members.iter().map(|_| None).collect();
        let durable: Box<[AtomicU64]> = (0..bits.len().div_ceil(8))
            .map(|i| {
                let mut word = [0u8; 8];
                let end = (i * 8 + 8).min(bits.len());
                word[..end - i * 8].copy_from_slice(&bits[i * 8..end]);
                AtomicU64::new(u64::from_le_bytes(word))
            })
            .collect();
        Ok(IntentLog {
            durable,
            pass_due_ms: AtomicU64::new(CLEAR_AFTER.as_millis() as u64),
            epoch: Instant::now(),
            name,
            state: Mutex::new(LogState {
                members,
                channels,
                quiet: vec![0; bits.len()],
                bits,
                sb,
                last_pass: Instant::now(),
                buffer: allocator.allocate(bytes)?,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        // The state is rewritten whole on every update: valid when poisoned.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the bits of `first..=last` durable on the `writable` legs
    /// before writes into those regions start; returns the legs whose
    /// metadata write failed (the caller fails them). Marks the array
    /// dirty on its first write.
    pub(super) fn ensure(&self, first: u64, last: u64, writable: u32) -> u32 {
        // The common case, a region already marked: a few loads, no lock
        // and no clock.
        if (first..=last).all(|r| self.is_durable(r)) {
            return 0;
        }
        let mut st = self.lock();
        if (first..=last).all(|r| bit(&st.bits, r)) {
            return 0;
        }
        for r in first..=last {
            set(&mut st.bits, r, true);
            set(&mut st.quiet, r, false);
        }
        if st.sb.clean {
            st.sb.clean = false;
            st.sb.events += 1;
        }
        let failed = st.write(writable, &self.name);
        self.publish(&st.bits);
        failed
    }

    /// Clears the bits of regions that stayed quiet since the last pass,
    /// once [`CLEAR_AFTER`] has passed: called now and then from polling
    /// (one clock read); returns the legs whose metadata write failed.
    pub(super) fn maybe_clear(&self, writable: u32, dirty: &DirtyMap) -> u32 {
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        if now_ms < self.pass_due_ms.load(Ordering::Relaxed) {
            return 0;
        }
        let mut st = self.lock();
        self.pass_due_ms
            .store(now_ms + CLEAR_AFTER.as_millis() as u64, Ordering::Relaxed);
        let before = st.bits.clone();
        st.clear_pass(dirty);
        self.write_cleared(&mut st, before, writable, dirty)
    }

    /// Clears at once the bits of every region with no write in flight and
    /// nothing to resync (a resync just made the legs equal); returns the
    /// legs whose metadata write failed.
    pub(super) fn clear_settled(&self, writable: u32, dirty: &DirtyMap) -> u32 {
        let mut st = self.lock();
        let before = st.bits.clone();
        for r in 0..dirty.region_count() {
            if !dirty.in_flight(r) && !dirty.is_suspect(r) {
                set(&mut st.bits, r, false);
                set(&mut st.quiet, r, false);
            }
        }
        self.write_cleared(&mut st, before, writable, dirty)
    }

    /// Writes bits some of which were just cleared. Cleared bits stop
    /// counting as durable first; then a region a writer entered meanwhile
    /// (counted in before it could see the bit go) keeps its bit. Writers
    /// count themselves in and then look at the bit, the clearer publishes
    /// and then looks at the count, all sequentially consistent: one of
    /// the two sees the other.
    fn write_cleared(
        &self,
        st: &mut LogState,
        before: Vec<u8>,
        writable: u32,
        dirty: &DirtyMap,
    ) -> u32 {
        if st.bits == before {
            return 0;
        }
        self.publish(&st.bits);
        let mut raced = false;
        for r in 0..dirty.region_count() {
            if bit(&before, r) && !bit(&st.bits, r) && dirty.in_flight(r) {
                set(&mut st.bits, r, true);
                raced = true;
            }
        }
        if raced {
            self.publish(&st.bits);
        }
        if st.bits == before {
            return 0;
        }
        st.write(writable, &self.name)
    }

    /// True when every region of `first..=last` is marked on the members:
    /// the lock-free look writers take first.
    pub(super) fn is_marked(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|r| self.is_durable(r))
    }

    fn is_durable(&self, region: u64) -> bool {
        usize::try_from(region / 64)
            .ok()
            .and_then(|i| self.durable.get(i))
            .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (region % 64)) != 0)
    }

    /// Publishes the bits just written for the lock-free look.
    fn publish(&self, bits: &[u8]) {
        for (i, w) in self.durable.iter().enumerate() {
            let mut word = [0u8; 8];
            let end = (i * 8 + 8).min(bits.len());
            word[..end - i * 8].copy_from_slice(&bits[i * 8..end]);
            w.store(u64::from_le_bytes(word), Ordering::SeqCst);
        }
    }

    /// Records that `leg` failed, on the legs still `writable`.
    pub(super) fn leg_failed(&self, leg: usize, writable: u32) -> u32 {
        let mut st = self.lock();
        if let Some(s) = st.sb.states.get_mut(leg) {
            *s = MemberState::Failed;
        }
        st.sb.events += 1;
        st.write(writable & !(1 << leg), &self.name)
    }

    /// Records a replacement member at `leg`, resyncing from zero.
    pub(super) fn leg_replaced(
        &self,
        leg: usize,
        member: Arc<dyn BlockDevice>,
        writable: u32,
    ) -> u32 {
        let mut st = self.lock();
        if let Some(m) = st.members.get_mut(leg) {
            *m = member;
        }
        if let Some(c) = st.channels.get_mut(leg) {
            *c = None;
        }
        if let Some(s) = st.sb.states.get_mut(leg) {
            *s = MemberState::Resyncing { done: 0 };
        }
        st.sb.events += 1;
        st.write(writable | 1 << leg, &self.name)
    }

    /// Records that `leg` holds every block again.
    pub(super) fn leg_healthy(&self, leg: usize, writable: u32) -> u32 {
        let mut st = self.lock();
        if let Some(s) = st.sb.states.get_mut(leg) {
            *s = MemberState::Healthy;
        }
        st.sb.events += 1;
        st.write(writable, &self.name)
    }

    /// A clean stop: with no write in flight, every bit cleared and the
    /// array marked clean on the `writable` legs.
    pub(super) fn stop_clean(&self, writable: u32, dirty: &DirtyMap) -> Result<(), BdevError> {
        let mut st = self.lock();
        if !dirty.dirty_regions().is_empty() {
            return Err(BdevError::MirrorState {
                device: self.name.clone(),
                reason:
                    "writes or suspect regions remain: finish them (and resync) before a clean stop"
                        .into(),
            });
        }
        st.bits.fill(0);
        st.quiet.fill(0);
        st.sb.clean = true;
        st.sb.events += 1;
        let failed = st.write(writable, &self.name);
        self.publish(&st.bits);
        if failed != 0 {
            return Err(BdevError::MirrorState {
                device: self.name.clone(),
                reason: format!("marking the array clean failed on legs {failed:#b}"),
            });
        }
        info!(mirror = %self.name, events = st.sb.events, "array stopped clean");
        Ok(())
    }

    /// Writes the metadata to every member (a new array); returns the
    /// members whose write failed.
    pub(super) fn write_all_members(&self) -> u32 {
        let mut st = self.lock();
        let all = (1u32 << st.members.len()) - 1;
        st.write(all, &self.name)
    }

    /// The raw members by leg, and the first block of their data areas:
    /// a channel goes to the member itself at that offset, without the
    /// slice between (one layer less on every I/O).
    pub(super) fn members_and_offset(&self) -> (Vec<Arc<dyn BlockDevice>>, u64) {
        let st = self.lock();
        (st.members.clone(), st.sb.layout.data_offset)
    }

    /// The current superblock (as the members hold it).
    pub(super) fn superblock(&self) -> Superblock {
        self.lock().sb.clone()
    }
}

impl LogState {
    /// Clears bits of regions quiet at this pass and the last (no write
    /// in flight either time): a region written since keeps its bit, and
    /// so does a suspect one (its legs may differ until a resync copies
    /// it; a crash before then must find it again).
    fn clear_pass(&mut self, dirty: &DirtyMap) {
        for r in 0..dirty.region_count() {
            if !bit(&self.bits, r) {
                continue;
            }
            if dirty.in_flight(r) || dirty.is_suspect(r) {
                set(&mut self.quiet, r, false);
            } else if bit(&self.quiet, r) {
                set(&mut self.bits, r, false);
                set(&mut self.quiet, r, false);
            } else {
                set(&mut self.quiet, r, true);
            }
        }
        self.last_pass = Instant::now();
    }

    /// Writes the superblock and bitmap to every leg in `legs`, and
    /// flushes; returns the legs that failed.
    fn write(&mut self, legs: u32, name: &str) -> u32 {
        self.sb.bitmap_crc = crc32fast::hash(&self.bits);
        let mut failed = 0;
        for leg in 0..self.members.len() {
            if legs & (1 << leg) == 0 {
                continue;
            }
            if let Err(error) = self.write_leg(leg) {
                warn!(mirror = %name, leg, %error, "writing the mirror's metadata failed");
                failed |= 1 << leg;
            }
        }
        failed
    }

    fn write_leg(&mut self, leg: usize) -> Result<(), IoError> {
        let mut sb = self.sb.clone();
        sb.member_index = leg as u32;
        let mut area = vec![0u8; SUPERBLOCK_BYTES as usize];
        sb.encode(&mut area);
        let member = Arc::clone(&self.members[leg]);
        let info = member.info();
        let bs = u64::from(info.block_size);
        let blocks = self.sb.layout.meta_bytes() / bs;
        let fill = |buffer: &mut Box<dyn DmaMemory>, bits: &[u8]| {
            buffer
                .fill_from(0, &area)
                .and_then(|()| buffer.fill_from(SUPERBLOCK_BYTES as usize, bits))
        };
        let fill_error = |_| IoError {
            device: info.id,
            op: IoOp::Write,
            lba: 0,
            blocks,
            kind: crate::error::IoErrorKind::Empty,
        };
        fill(&mut self.buffer, &self.bits).map_err(fill_error)?;
        if self.channels[leg].is_none() {
            let channel = member.open_channel(1).map_err(|_| IoError {
                device: info.id,
                op: IoOp::Write,
                lba: 0,
                blocks,
                kind: crate::error::IoErrorKind::DeviceFailed,
            })?;
            self.channels[leg] = Some(channel);
        }
        let Some(channel) = self.channels[leg].as_mut() else {
            return Ok(());
        };
        let buf = self.buffer.dma_slice();
        run_sync(channel.as_mut(), IoRequest::write(0, blocks, buf, 0))?;
        run_sync(channel.as_mut(), IoRequest::no_data(IoOp::Flush, 0, 0, 0))
    }
}

/// Runs one request to completion on a channel the caller owns alone.
pub(crate) fn run_sync(channel: &mut dyn Channel, req: IoRequest) -> Result<(), IoError> {
    loop {
        // SAFETY: the buffer belongs to the caller, untouched until this
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
    use crate::buffer::HostAllocator;
    use crate::mem::MemDevice;
    use crate::mirror::meta::{Level, MemberState, MetaLayout};

    fn log(bits: Vec<u8>, layout: MetaLayout) -> IntentLog {
        let members: Vec<Arc<dyn BlockDevice>> = (0..2)
            .map(|_| {
                Arc::new(MemDevice::new(1 << 20, 512, 1 << 20).expect("mem"))
                    as Arc<dyn BlockDevice>
            })
            .collect();
        let sb = Superblock {
            level: Level::Mirror,
            array_id: [7; 16],
            member_index: 0,
            member_count: 2,
            layout,
            events: 3,
            clean: false,
            states: vec![MemberState::Healthy; 2],
            bitmap_crc: 0,
        };
        let allocator: Arc<dyn DmaAllocator> = Arc::new(HostAllocator);
        IntentLog::new("log".into(), members, sb, bits, &allocator).expect("log")
    }

    #[test]
    fn quiet_regions_lose_their_bits_but_suspect_and_busy_ones_keep_them() {
        let layout = MetaLayout::new(2048, 512, 64).expect("layout");
        let dirty = DirtyMap::new(layout.data_blocks, 64).expect("dirty map");
        let log = log(vec![0b0111; layout.bitmap_bytes as usize], layout);
        // Region 0 awaits a resync; region 1 has a write in flight;
        // region 2 is quiet.
        dirty.mark_suspect(0);
        assert!(dirty.try_begin_writes(1, 1));
        let mut st = log.lock();
        st.clear_pass(&dirty);
        st.clear_pass(&dirty);
        assert!(bit(&st.bits, 0), "a suspect region lost its bit");
        assert!(bit(&st.bits, 1), "a region being written lost its bit");
        assert!(!bit(&st.bits, 2), "a quiet region kept its bit");
    }
}
