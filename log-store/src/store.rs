//! The store: segments, the map, the writer and the cleaner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_stack::nvme_leaf::dma_allocator_for;
use bdev_stack::{BlockDevice, DmaAllocator, LbaRange};
use copy_engine::{CopyEngine, CopyOptions, Method};
use tracing::{debug, info};

use crate::io::{BlockIo, Span};
use crate::layout::{
    EntriesCrc, Entry, Geometry, GeometryError, SUMMARY_ENTRY, SUMMARY_HEADER, Summary, Superblock,
    reserve_for,
};
use crate::{GcError, Policy};

/// A map entry for a logical block never written.
const UNMAPPED: u64 = u64::MAX;
/// Victims one cleaning round takes at most.
const MAX_VICTIMS: usize = 64;
/// Fresh destination segments one cleaning round fills at most.
const MAX_FRESH: u32 = 4;

/// How a store is laid out (at format) and run.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Segment size in bytes (format only).
    pub segment_bytes: u64,
    /// Logical size as a fraction of the data slots (format only).
    pub fill: f64,
    /// How the cleaner picks victims.
    pub policy: Policy,
    /// Relocate with device copy offload where the device can; off: every
    /// block through host memory.
    pub offload: bool,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            segment_bytes: 1 << 20,
            fill: 0.8,
            policy: Policy::Greedy,
            offload: true,
        }
    }
}

/// What the writer and the cleaner have done since the store was opened.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CleanStats {
    /// Blocks the user wrote.
    pub user_blocks: u64,
    /// Cleaning rounds (one gather copy each).
    pub rounds: u64,
    /// Segments cleaned and freed.
    pub segments_cleaned: u64,
    /// Live blocks relocated.
    pub blocks_relocated: u64,
    /// Relocated bytes the device copied.
    pub bytes_offloaded: u64,
    /// Relocated bytes that went through host memory.
    pub bytes_bounced: u64,
    /// Copy commands sent (offload) or I/Os (bounce) for relocation.
    pub copy_commands: u64,
    /// Wall time of relocation: copy, flush, summaries.
    pub relocation_wall: Duration,
    /// CPU time of the cleaning thread over the same spans.
    pub relocation_cpu: Duration,
    /// Of the relocation wall time, the copy engine's part.
    pub copy_wall: Duration,
    /// Of the relocation CPU time, the copy engine's part.
    pub copy_cpu: Duration,
    /// Segment commits (summary writes).
    pub commits: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// Taking appends: the user head or the relocation head.
    Open,
    Sealed,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    state: State,
    /// Slots filled.
    used: u32,
    /// Slots named by the last durable summary.
    committed: u32,
    /// Slots the map points at.
    live: u32,
    /// The summary area the next commit writes.
    next_area: u8,
    /// Newest stamp in the segment: its age for cost-benefit.
    newest: u64,
}

impl Segment {
    const FREE: Segment = Segment {
        state: State::Free,
        used: 0,
        committed: 0,
        live: 0,
        next_area: 0,
        newest: 0,
    };
}

/// One live slot to relocate.
#[derive(Debug, Clone, Copy)]
struct Move {
    from: u64,
    entry: Entry,
}

/// A log-structured block store on a block device. Not thread-safe: one
/// thread drives it.
///
/// Writes are durable once committed ([`LogStore::sync`], or their segment
/// filling up); dropping the store without [`LogStore::sync`] is a crash:
/// what was not committed is lost, what was is found again by
/// [`LogStore::open`].
pub struct LogStore {
    name: String,
    dev: Arc<dyn BlockDevice>,
    geo: Geometry,
    store_id: u64,
    io: BlockIo,
    engine: CopyEngine,
    policy: Policy,
    segments: Vec<Segment>,
    /// Per segment: the CRC of its entries up to its last commit.
    crcs: Vec<EntriesCrc>,
    /// Per data slot (segment * data_slots + slot): what it holds.
    entries: Vec<Entry>,
    /// Per logical block: its slot, or [`UNMAPPED`].
    map: Vec<u64>,
    /// Per data slot, one bit: the map points at it. The cleaner scans a
    /// victim's bits (sequential) instead of looking each slot's block up
    /// in the map (random).
    live_slots: Vec<u64>,
    free: Vec<u32>,
    /// Victims of cleaning rounds whose destinations' summaries are
    /// written but not yet flushed: free after the next flush.
    pending_free: Vec<u32>,
    /// The last round's summaries, written in the background: segment and
    /// its `committed` before, to undo if the write fails.
    unsettled: Vec<(u32, u32)>,
    /// Victims whose relocation's summary failed to write: their blocks on
    /// the device are what a reopen finds, so they are never reused.
    stranded: Vec<u32>,
    user_head: Option<u32>,
    /// The user head's data slots, written at commit.
    user_buf: Vec<u8>,
    gc_head: Option<u32>,
    next_stamp: u64,
    next_seq: u64,
    /// Free segments below which the cleaner runs.
    reserve: u32,
    /// Every user write with a smaller stamp is durable.
    durable_stamp: u64,
    stats: CleanStats,
    area: Vec<u8>,
    candidates: Vec<(f64, u32)>,
    moves: Vec<Move>,
    src_ranges: Vec<LbaRange>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("device", &self.name)
            .field("geometry", &self.geo)
            .field("free", &self.free.len())
            .finish_non_exhaustive()
    }
}

impl LogStore {
    /// The layout [`LogStore::format`] would give `dev` with `opts`.
    pub fn plan(dev: &Arc<dyn BlockDevice>, opts: &StoreOptions) -> Result<Geometry, GcError> {
        let info = dev.info();
        plan_for(info.block_size, info.block_count, opts).map_err(|source| GcError::BadLayout {
            device: info.name.clone(),
            source,
        })
    }

    /// Formats `dev` as an empty store and opens it.
    pub fn format(dev: Arc<dyn BlockDevice>, opts: &StoreOptions) -> Result<LogStore, GcError> {
        let geo = LogStore::plan(&dev, opts)?;
        let info = dev.info();
        let bs = u64::from(info.block_size);
        let sb = Superblock {
            geometry: geo,
            store_id: fresh_store_id(),
        };
        let allocator = allocator_for(&dev)?;
        let mut io = BlockIo::open(&dev, &allocator)?;
        let mut raw = vec![0u8; (geo.super_blocks() * bs) as usize];
        sb.encode(&mut raw);
        io.write(0, &raw)?;
        io.flush()?;
        info!(device = %info.name, ?geo, "store formatted");
        LogStore::assemble(dev, sb, io, allocator, opts, None)
    }

    /// Opens the store on `dev`, rebuilding the map from the summaries.
    pub fn open(dev: Arc<dyn BlockDevice>, opts: &StoreOptions) -> Result<LogStore, GcError> {
        let info = dev.info();
        let allocator = allocator_for(&dev)?;
        let mut io = BlockIo::open(&dev, &allocator)?;
        let bs = u64::from(info.block_size);
        let mut raw = vec![0u8; bs as usize];
        io.read(0, &mut raw)?;
        let sb = Superblock::decode(&raw, &info.name, info.block_size, info.block_count)?;
        let g = sb.geometry;
        let area_bytes = g.summary_bytes();
        let mut areas = vec![0u8; g.segments as usize * 2 * area_bytes];
        let spans: Vec<Span> = (0..g.segments)
            .flat_map(|s| [0u8, 1].map(|a| (s, a)))
            .enumerate()
            .map(|(i, (s, a))| Span {
                lba: g.summary_lba(s, a),
                blocks: g.summary_blocks,
                offset: i * area_bytes,
            })
            .collect();
        io.read_spans(&spans, &mut areas)?;
        let summaries: Vec<Option<Summary>> = (0..g.segments)
            .map(|s| {
                [0u8, 1]
                    .into_iter()
                    .filter_map(|a| {
                        let at = (s as usize * 2 + a as usize) * area_bytes;
                        Summary::decode(
                            &areas[at..at + area_bytes],
                            sb.store_id,
                            s,
                            a,
                            g.data_slots,
                        )
                    })
                    .max_by_key(|sum| sum.seq)
            })
            .collect();
        LogStore::assemble(dev, sb, io, allocator, opts, Some(summaries))
    }

    fn assemble(
        dev: Arc<dyn BlockDevice>,
        sb: Superblock,
        io: BlockIo,
        allocator: Arc<dyn DmaAllocator>,
        opts: &StoreOptions,
        summaries: Option<Vec<Option<Summary>>>,
    ) -> Result<LogStore, GcError> {
        let g = sb.geometry;
        let bs = g.block_size as usize;
        let engine = CopyEngine::new(CopyOptions {
            offload: opts.offload,
            allocator,
            // Victims' live slots come in short runs, so a round is many
            // small ranges: keep enough Copy commands in flight that the
            // device works on all of a round's at once.
            offload_depth: 64,
            ..CopyOptions::default()
        })?;
        let mut store = LogStore {
            name: dev.info().name.clone(),
            dev,
            geo: g,
            store_id: sb.store_id,
            io,
            engine,
            policy: opts.policy,
            segments: vec![Segment::FREE; g.segments as usize],
            crcs: vec![EntriesCrc::default(); g.segments as usize],
            entries: vec![Entry { lbn: 0, stamp: 0 }; g.total_slots() as usize],
            map: vec![UNMAPPED; g.logical_blocks as usize],
            live_slots: vec![0; g.total_slots().div_ceil(64) as usize],
            free: Vec::new(),
            pending_free: Vec::new(),
            unsettled: Vec::new(),
            stranded: Vec::new(),
            user_head: None,
            user_buf: vec![0u8; g.data_slots as usize * bs],
            gc_head: None,
            next_stamp: 1,
            next_seq: 1,
            reserve: reserve_for(g.segments),
            durable_stamp: 1,
            stats: CleanStats::default(),
            area: Vec::new(),
            candidates: Vec::new(),
            moves: Vec::new(),
            src_ranges: Vec::new(),
        };
        if let Some(summaries) = summaries {
            store.rebuild(summaries)?;
        }
        // Free list popped from the end: lowest segments first.
        store.free = (0..g.segments)
            .rev()
            .filter(|&s| store.segments[s as usize].state == State::Free)
            .collect();
        Ok(store)
    }

    /// The map from the summaries: per logical block the copy with the
    /// highest stamp, ties to the later summary.
    fn rebuild(&mut self, summaries: Vec<Option<Summary>>) -> Result<(), GcError> {
        let slots = u64::from(self.geo.data_slots);
        // Per logical block: (stamp, seq) of the mapped copy.
        let mut best: Vec<(u64, u64)> = vec![(0, 0); self.map.len()];
        let mut found = 0u64;
        for sum in summaries.iter().flatten() {
            let seg = &mut self.segments[sum.segment as usize];
            seg.used = sum.entries.len() as u32;
            seg.committed = seg.used;
            seg.next_area = sum.area ^ 1;
            seg.state = if seg.used > 0 {
                State::Sealed
            } else {
                State::Free
            };
            self.next_seq = self.next_seq.max(sum.seq + 1);
            for (slot, e) in sum.entries.iter().enumerate() {
                let Some(b) = best.get_mut(e.lbn as usize) else {
                    return Err(GcError::BadSummary {
                        device: self.name.clone(),
                        segment: sum.segment,
                        lbn: e.lbn,
                        logical_blocks: self.geo.logical_blocks,
                    });
                };
                let at = u64::from(sum.segment) * slots + slot as u64;
                self.entries[at as usize] = *e;
                seg.newest = seg.newest.max(e.stamp);
                self.next_stamp = self.next_stamp.max(e.stamp + 1);
                if (e.stamp, sum.seq) > *b {
                    *b = (e.stamp, sum.seq);
                    self.map[e.lbn as usize] = at;
                }
                found += 1;
            }
        }
        for &at in self.map.iter().filter(|&&at| at != UNMAPPED) {
            self.segments[(at / slots) as usize].live += 1;
            self.live_slots[(at / 64) as usize] |= 1 << (at % 64);
        }
        let mut sealed = 0;
        for seg in &mut self.segments {
            if seg.state == State::Sealed && seg.live == 0 {
                *seg = Segment {
                    next_area: seg.next_area,
                    ..Segment::FREE
                };
            } else if seg.state == State::Sealed {
                sealed += 1;
            }
        }
        self.durable_stamp = self.next_stamp;
        info!(
            device = %self.name,
            sealed,
            slots_found = found,
            mapped = self.map.iter().filter(|&&m| m != UNMAPPED).count(),
            "store opened"
        );
        Ok(())
    }

    /// The layout.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Logical blocks.
    pub fn logical_blocks(&self) -> u64 {
        self.geo.logical_blocks
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.geo.block_size as usize
    }

    /// What the writer and the cleaner have done since open.
    pub fn stats(&self) -> &CleanStats {
        &self.stats
    }

    /// Free segments, counting those the last cleaning round freed (the
    /// next flush makes them reusable).
    pub fn free_segments(&self) -> u32 {
        (self.free.len() + self.pending_free.len()) as u32
    }

    /// Every user write with a smaller stamp is durable.
    pub fn durable_stamp(&self) -> u64 {
        self.durable_stamp
    }

    /// Appends a new version of logical block `lbn`; returns its stamp.
    /// Durable once committed (see [`LogStore::durable_stamp`]).
    pub fn write(&mut self, lbn: u64, data: &[u8]) -> Result<u64, GcError> {
        self.check_block(lbn, data.len())?;
        let bs = self.block_size();
        let head = match self.user_head {
            Some(h) => h,
            None => {
                let h = self.take_free()?;
                self.user_head = Some(h);
                h
            }
        };
        let seg = self.segments[head as usize];
        let slot = seg.used;
        self.user_buf[slot as usize * bs..(slot as usize + 1) * bs].copy_from_slice(data);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let at = self.slot_index(head, slot);
        self.entries[at as usize] = Entry { lbn, stamp };
        self.remap(lbn, at);
        let seg = &mut self.segments[head as usize];
        seg.used += 1;
        seg.newest = stamp;
        self.stats.user_blocks += 1;
        if seg.used == self.geo.data_slots {
            self.commit_user()?;
            self.segments[head as usize].state = State::Sealed;
            self.user_head = None;
            // Every block superseded so far is superseded durably: the
            // cleaner may treat it as dead.
            if self.free_segments() <= self.reserve {
                self.clean(self.reserve + 2)?;
            }
        }
        Ok(stamp)
    }

    /// Reads the current version of `lbn` into `out`; `false` (and zeros)
    /// for a block never written.
    pub fn read(&mut self, lbn: u64, out: &mut [u8]) -> Result<bool, GcError> {
        self.check_block(lbn, out.len())?;
        let bs = self.block_size();
        let at = self.map[lbn as usize];
        if at == UNMAPPED {
            out.fill(0);
            return Ok(false);
        }
        let (seg, slot) = self.split_index(at);
        if Some(seg) == self.user_head && slot >= self.segments[seg as usize].committed {
            out.copy_from_slice(&self.user_buf[slot as usize * bs..(slot as usize + 1) * bs]);
            return Ok(true);
        }
        let lba = self.geo.slot_lba(seg, slot);
        self.io.read(lba, out)?;
        Ok(true)
    }

    /// Reads logical blocks `lbns` into consecutive blocks of `out`;
    /// returns which were ever written (unwritten ones read as zeros).
    pub fn read_many(&mut self, lbns: &[u64], out: &mut [u8]) -> Result<Vec<bool>, GcError> {
        let bs = self.block_size();
        if out.len() != lbns.len() * bs {
            return Err(GcError::Config(format!(
                "{} blocks need {} bytes, the buffer has {}",
                lbns.len(),
                lbns.len() * bs,
                out.len()
            )));
        }
        let mut written = Vec::with_capacity(lbns.len());
        let mut spans = Vec::with_capacity(lbns.len());
        for (i, &lbn) in lbns.iter().enumerate() {
            self.check_lbn(lbn)?;
            let at = self.map[lbn as usize];
            let block = &mut out[i * bs..(i + 1) * bs];
            if at == UNMAPPED {
                block.fill(0);
                written.push(false);
                continue;
            }
            written.push(true);
            let (seg, slot) = self.split_index(at);
            if Some(seg) == self.user_head && slot >= self.segments[seg as usize].committed {
                block.copy_from_slice(&self.user_buf[slot as usize * bs..(slot as usize + 1) * bs]);
            } else {
                spans.push(Span {
                    lba: self.geo.slot_lba(seg, slot),
                    blocks: 1,
                    offset: i * bs,
                });
            }
        }
        self.io.read_spans(&spans, out)?;
        Ok(written)
    }

    /// Commits every write so far: durable when this returns.
    pub fn sync(&mut self) -> Result<(), GcError> {
        if let Some(h) = self.user_head
            && self.segments[h as usize].committed < self.segments[h as usize].used
        {
            self.commit_user()?;
        } else if !self.pending_free.is_empty() || !self.unsettled.is_empty() {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every completed write durable; victims waiting for that are
    /// free from then on.
    fn flush(&mut self) -> Result<(), GcError> {
        if let Err(e) = self.io.settle() {
            // The last round's summaries did not make it: their segments
            // keep their last good summary (the area written next is the
            // failed one again), and the victims keep what the device
            // still names there.
            for (segment, committed) in self.unsettled.drain(..) {
                let seg = &mut self.segments[segment as usize];
                seg.next_area ^= 1;
                seg.committed = committed;
                self.crcs[segment as usize].reset();
            }
            tracing::warn!(
                segments = ?self.pending_free,
                error = %e,
                "relocation summary write failed; its victims stay unused until the store is reopened"
            );
            self.stranded.append(&mut self.pending_free);
            return Err(e);
        }
        self.unsettled.clear();
        self.io.flush()?;
        self.free.append(&mut self.pending_free);
        Ok(())
    }

    /// Writes the user head's new slots, flushes, commits its summary.
    fn commit_user(&mut self) -> Result<(), GcError> {
        let Some(head) = self.user_head else {
            return Ok(());
        };
        let seg = self.segments[head as usize];
        let bs = self.block_size();
        let (from, to) = (seg.committed as usize, seg.used as usize);
        if to > from {
            let lba = self.geo.slot_lba(head, from as u32);
            self.io.write(lba, &self.user_buf[from * bs..to * bs])?;
        }
        self.flush()?;
        self.write_summaries(&[head], false)?;
        self.flush()?;
        self.durable_stamp = self.next_stamp;
        Ok(())
    }

    /// Writes the summaries (all used slots) of `segments` to their next
    /// areas, all at once; in the `background` (see
    /// [`BlockIo::write_spans_background`]): the next flush waits for it.
    fn write_summaries(&mut self, segments: &[u32], background: bool) -> Result<(), GcError> {
        let area_bytes = self.geo.summary_bytes();
        self.area.resize(segments.len() * area_bytes, 0);
        let mut spans = [Span {
            lba: 0,
            blocks: 0,
            offset: 0,
        }; MAX_FRESH as usize + 1];
        if segments.len() > spans.len() {
            return Err(GcError::Config(format!(
                "{} summaries at once, at most {}",
                segments.len(),
                spans.len()
            )));
        }
        let bs = self.geo.block_size as usize;
        for (i, &segment) in segments.iter().enumerate() {
            let seg = self.segments[segment as usize];
            let first = self.slot_index(segment, 0) as usize;
            let offset = i * area_bytes;
            // Only the blocks the entries reach: what lies past them in
            // the area is not part of the summary.
            let blocks = (SUMMARY_HEADER + seg.used as usize * SUMMARY_ENTRY)
                .div_ceil(bs)
                .min(self.geo.summary_blocks as usize);
            Summary::encode_parts(
                segment,
                seg.next_area,
                self.next_seq + i as u64,
                &self.entries[first..first + seg.used as usize],
                self.store_id,
                &mut self.crcs[segment as usize],
                &mut self.area[offset..offset + blocks * bs],
            )?;
            spans[i] = Span {
                lba: self.geo.summary_lba(segment, seg.next_area),
                blocks: blocks as u64,
                offset,
            };
        }
        if background {
            self.io
                .write_spans_background(&spans[..segments.len()], &self.area)?;
        } else {
            self.io.write_spans(&spans[..segments.len()], &self.area)?;
        }
        self.next_seq += segments.len() as u64;
        for &segment in segments {
            let seg = &mut self.segments[segment as usize];
            if background {
                self.unsettled.push((segment, seg.committed));
            }
            seg.next_area ^= 1;
            seg.committed = seg.used;
        }
        self.stats.commits += segments.len() as u64;
        Ok(())
    }

    /// Commits the user head, then cleans until `target` segments are free.
    pub fn clean(&mut self, target: u32) -> Result<(), GcError> {
        // What the cleaner counts as dead must be superseded durably.
        self.sync()?;
        let mut stalled = 0;
        while self.free_segments() < target {
            let before = self.free_segments();
            self.clean_round(target - before)?;
            // A round can consume as many segments as it frees while it
            // fills the relocation head; more than a pass over the store
            // without gaining one means there is nothing to gain.
            if self.free_segments() > before {
                stalled = 0;
            } else {
                stalled += 1;
                if stalled > self.geo.segments {
                    return Err(GcError::NoSpace {
                        free: self.free_segments(),
                    });
                }
            }
        }
        Ok(())
    }

    /// One round: pick victims, relocate their live slots in one gather,
    /// flush, commit the destinations, free the victims.
    fn clean_round(&mut self, needed: u32) -> Result<(), GcError> {
        let t0 = Instant::now();
        let cpu0 = thread_cpu_time();
        let slots = self.geo.data_slots;
        let room = self
            .gc_head
            .map_or(0, |h| slots - self.segments[h as usize].used);

        // Victims: by policy, as many as fill the head and up to four
        // fresh segments (fewer when free segments are scarce): one
        // larger gather per round amortises the copy's fixed costs.
        let fresh_max = self.free_segments().saturating_sub(1).clamp(1, MAX_FRESH);
        let budget = room + fresh_max * slots;
        self.candidates.clear();
        for (i, seg) in self.segments.iter().enumerate() {
            let i = i as u32;
            if seg.state == State::Sealed && seg.live < slots {
                let age = self.next_stamp.saturating_sub(seg.newest);
                self.candidates
                    .push((self.policy.score(seg.live, slots, age), i));
            }
        }
        if self.candidates.is_empty() {
            return Err(GcError::NoSpace {
                free: self.free_segments(),
            });
        }
        // Only the best few can become victims: select them, then sort
        // just those (a store has thousands of segments, a round takes a
        // handful).
        let order = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if self.candidates.len() > MAX_VICTIMS {
            self.candidates
                .select_nth_unstable_by(MAX_VICTIMS - 1, order);
            self.candidates.truncate(MAX_VICTIMS);
        }
        self.candidates.sort_unstable_by(order);
        let mut victims: Vec<u32> = Vec::new();
        let mut total = 0u32;
        for &(_, s) in &self.candidates {
            let live = self.segments[s as usize].live;
            if total + live <= budget {
                victims.push(s);
                total += live;
            }
            // Enough when the round frees what is needed net of the fresh
            // segments it fills: cleaning more now would take victims
            // before their blocks had time to die.
            let fresh_needed = total.saturating_sub(room).div_ceil(slots);
            let net = (victims.len() as u32).saturating_sub(fresh_needed);
            if victims.len() == MAX_VICTIMS || total >= budget || net >= needed {
                break;
            }
        }

        // The live slots, in victim and slot order, and their sources.
        self.moves.clear();
        self.src_ranges.clear();
        for &v in &victims {
            let (first, end) = (
                self.slot_index(v, 0),
                self.slot_index(v, self.segments[v as usize].used),
            );
            let mut word = first / 64;
            while word * 64 < end {
                // The live bits of this word within the victim's slots.
                let mut bits = self.live_slots[word as usize];
                if word * 64 < first {
                    bits &= !0 << (first % 64);
                }
                if (word + 1) * 64 > end {
                    bits &= !(!0 << (end % 64));
                }
                while bits != 0 {
                    let at = word * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let entry = self.entries[at as usize];
                    debug_assert_eq!(self.map[entry.lbn as usize], at);
                    self.moves.push(Move { from: at, entry });
                    let lba = self.geo.slot_lba(v, (at - first) as u32);
                    match self.src_ranges.last_mut() {
                        Some(r) if r.lba + r.blocks == lba => r.blocks += 1,
                        _ => self.src_ranges.push(LbaRange { lba, blocks: 1 }),
                    }
                }
                word += 1;
            }
        }
        let moved = self.moves.len() as u32;

        // Destinations: the head's room, then fresh segments.
        let mut dests: Vec<(u32, u32, u32)> = Vec::new(); // (segment, first slot, count)
        let mut left = moved;
        if let Some(h) = self.gc_head {
            let n = left.min(room);
            if n > 0 {
                dests.push((h, self.segments[h as usize].used, n));
                left -= n;
            }
        }
        let mut fresh: Vec<u32> = Vec::new();
        while left > 0 {
            let s = match self.take_free() {
                Ok(s) => s,
                Err(e) => {
                    self.give_back(&fresh);
                    return Err(e);
                }
            };
            fresh.push(s);
            let n = left.min(slots);
            dests.push((s, 0, n));
            left -= n;
        }
        let dst_ranges: Vec<LbaRange> = dests
            .iter()
            .map(|&(s, first, n)| LbaRange {
                lba: self.geo.slot_lba(s, first),
                blocks: u64::from(n),
            })
            .collect();

        if moved > 0 {
            let (copy_t0, copy_cpu0) = (Instant::now(), thread_cpu_time());
            let report = match self
                .engine
                .copy(&self.dev, &self.src_ranges, &self.dev, &dst_ranges)
            {
                Ok(r) => r,
                Err(e) => {
                    self.give_back(&fresh);
                    return Err(e.into());
                }
            };
            if !report.is_complete() {
                self.give_back(&fresh);
                return Err(GcError::Relocation {
                    count: report.not_copied.len(),
                    report: report.to_string(),
                });
            }
            self.stats.copy_wall += copy_t0.elapsed();
            self.stats.copy_cpu += thread_cpu_time().saturating_sub(copy_cpu0);
            self.stats.bytes_offloaded += report.offloaded_bytes();
            self.stats.bytes_bounced += report.host_bytes();
            self.stats.copy_commands += Method::ALL
                .iter()
                .map(|&m| report.method(m).commands)
                .sum::<u64>();
            // The copies must be durable before a summary names them
            // (this also frees the last round's victims).
            if let Err(e) = self.flush() {
                self.give_back(&fresh);
                return Err(e);
            }
        }

        // Name the moved slots in the destinations' summaries: the moves
        // fill the destinations in order.
        let mut next = 0;
        for &(s, first, n) in &dests {
            let at = self.slot_index(s, first) as usize;
            let moves = &self.moves[next..next + n as usize];
            let mut newest = self.segments[s as usize].newest;
            for (slot, mv) in self.entries[at..at + n as usize].iter_mut().zip(moves) {
                *slot = mv.entry;
                newest = newest.max(mv.entry.stamp);
            }
            self.segments[s as usize].newest = newest;
            next += n as usize;
        }
        let mut written = [0u32; MAX_FRESH as usize + 1];
        for (i, &(s, first, n)) in dests.iter().enumerate() {
            let seg = &mut self.segments[s as usize];
            seg.used = first + n;
            seg.state = State::Open;
            written[i] = s;
        }
        // In the background: the next flush (the next round's, or the
        // next commit's) waits for it before it makes it durable, and only
        // then are the victims free.
        self.write_summaries(&written[..dests.len()], true)?;

        // Point the map at the copies. The victims are free once the
        // summaries are durable: after the next flush, which a later
        // round or commit makes anyway.
        // Every live slot of the victims moved: they hold nothing now, the
        // destinations gain what they received.
        let mut next = 0;
        for &(s, first, n) in &dests {
            let at = self.slot_index(s, first);
            for (k, mv) in self.moves[next..next + n as usize].iter().enumerate() {
                debug_assert_eq!(self.map[mv.entry.lbn as usize], mv.from);
                let to = at + k as u64;
                self.map[mv.entry.lbn as usize] = to;
                self.live_slots[(mv.from / 64) as usize] &= !(1 << (mv.from % 64));
                self.live_slots[(to / 64) as usize] |= 1 << (to % 64);
            }
            self.segments[s as usize].live += n;
            next += n as usize;
        }
        for &v in &victims {
            let seg = &mut self.segments[v as usize];
            debug_assert_eq!(
                u64::from(seg.live),
                self.moves
                    .iter()
                    .filter(|m| m.from / u64::from(slots) == u64::from(v))
                    .count() as u64,
                "victim {v}: live slots not all moved"
            );
            *seg = Segment {
                next_area: seg.next_area,
                ..Segment::FREE
            };
            if dests.is_empty() {
                // Nothing was live: nothing to make durable first.
                self.free.push(v);
            } else {
                self.pending_free.push(v);
            }
        }
        // The head moves on when full.
        if let Some(h) = self.gc_head
            && self.segments[h as usize].used == slots
        {
            self.segments[h as usize].state = State::Sealed;
            self.gc_head = None;
        }
        for &s in &fresh {
            if self.segments[s as usize].used == slots {
                self.segments[s as usize].state = State::Sealed;
            } else {
                // Only the last can be partly filled, and the head before
                // it is full by then.
                self.gc_head = Some(s);
            }
        }
        self.stats.rounds += 1;
        self.stats.segments_cleaned += victims.len() as u64;
        self.stats.blocks_relocated += u64::from(moved);
        self.stats.relocation_wall += t0.elapsed();
        self.stats.relocation_cpu += thread_cpu_time().saturating_sub(cpu0);
        debug!(
            victims = victims.len(),
            moved,
            free = self.free_segments(),
            "cleaning round"
        );
        Ok(())
    }

    /// Returns unused fresh segments after a failed round.
    fn give_back(&mut self, fresh: &[u32]) {
        for &s in fresh.iter().rev() {
            self.segments[s as usize].state = State::Free;
            self.free.push(s);
        }
    }

    fn take_free(&mut self) -> Result<u32, GcError> {
        if self.free.is_empty() && !self.pending_free.is_empty() {
            self.flush()?;
        }
        let s = self.free.pop().ok_or(GcError::NoSpace { free: 0 })?;
        self.crcs[s as usize].reset();
        let seg = &mut self.segments[s as usize];
        *seg = Segment {
            state: State::Open,
            next_area: seg.next_area,
            ..Segment::FREE
        };
        Ok(s)
    }

    /// Points `lbn` at slot `at`, moving the live count.
    fn remap(&mut self, lbn: u64, at: u64) {
        let slots = u64::from(self.geo.data_slots);
        let old = std::mem::replace(&mut self.map[lbn as usize], at);
        if old != UNMAPPED {
            self.segments[(old / slots) as usize].live -= 1;
            self.live_slots[(old / 64) as usize] &= !(1 << (old % 64));
        }
        self.segments[(at / slots) as usize].live += 1;
        self.live_slots[(at / 64) as usize] |= 1 << (at % 64);
    }

    /// Checks a one-block request: the block exists, the buffer is a block.
    fn check_block(&self, lbn: u64, len: usize) -> Result<(), GcError> {
        self.check_lbn(lbn)?;
        if len != self.block_size() {
            return Err(GcError::Config(format!(
                "a block is {} bytes, not {len}",
                self.block_size()
            )));
        }
        Ok(())
    }

    fn check_lbn(&self, lbn: u64) -> Result<(), GcError> {
        if lbn >= self.geo.logical_blocks {
            return Err(GcError::OutOfRange {
                lbn,
                logical_blocks: self.geo.logical_blocks,
            });
        }
        Ok(())
    }

    fn slot_index(&self, segment: u32, slot: u32) -> u64 {
        u64::from(segment) * u64::from(self.geo.data_slots) + u64::from(slot)
    }

    fn split_index(&self, at: u64) -> (u32, u32) {
        let slots = u64::from(self.geo.data_slots);
        ((at / slots) as u32, (at % slots) as u32)
    }
}

/// The layout of `opts` on a device of `block_count` blocks of
/// `block_size` bytes.
fn plan_for(
    block_size: u32,
    block_count: u64,
    opts: &StoreOptions,
) -> Result<Geometry, GeometryError> {
    if !(opts.fill > 0.0 && opts.fill < 1.0) {
        return Err(GeometryError::Fill { value: opts.fill });
    }
    let bs = u64::from(block_size);
    if opts.segment_bytes == 0 || !opts.segment_bytes.is_multiple_of(bs) {
        return Err(GeometryError::SegmentNotBlocks {
            value: opts.segment_bytes,
            block_size,
        });
    }
    let probe = Geometry::new(block_size, block_count, opts.segment_bytes / bs, 0)?;
    // The cleaner's reserve and one head each for the user and the
    // cleaner are never counted as capacity.
    let min = reserve_for(probe.segments) + 3;
    if probe.segments < min {
        return Err(GeometryError::TooFewSegments {
            value: probe.segments,
            min,
        });
    }
    let max = probe.usable_slots().saturating_sub(1);
    // A float fill of at most the slots: the cast cannot overflow.
    let logical_blocks = (opts.fill * probe.total_slots() as f64) as u64;
    if logical_blocks == 0 || logical_blocks > max {
        return Err(GeometryError::LogicalBlocks {
            value: logical_blocks,
            max,
        });
    }
    Ok(Geometry {
        logical_blocks,
        ..probe
    })
}

/// The buffers the device's leaves accept.
fn allocator_for(dev: &Arc<dyn BlockDevice>) -> Result<Arc<dyn DmaAllocator>, GcError> {
    dma_allocator_for(dev).map_err(|source| GcError::Device {
        device: dev.info().name.clone(),
        action: "choosing a buffer allocator",
        source,
    })
}

/// A store id no earlier format on the device is likely to share.
fn fresh_store_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// CPU time of the calling thread (the scheduler's exact runtime, not
/// ticks).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a timespec we own; clock_gettime writes one.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0).min(999_999_999),
    )
}
