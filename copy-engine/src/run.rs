//! One copy-out, planned and run: the source as it stands now, the
//! destination held and mapped, the two partitions intersected, hazards
//! staged, self-overlapping pieces copied in memmove order, groups
//! offloaded, and the rest bounced.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wait::Waiter;
use bdev_stack::{
    Access, BlockDevice, LbaRange, LeafFragment, OffloadCompletion, OffloadRange, WriteHolds,
};
use tracing::debug;

use crate::bounce::{Bouncer, DstIndex, Item, Mode, Retry, Route, cut_items};
use crate::engine::CopyOptions;
use crate::error::CopyError;
use crate::leaves::Leaves;
use crate::offload::pair;
use crate::plan::{
    CopyCommand, CopyRange, Fragment, Piece, PlanError, cross_hazards, intersect, memmove_chunks,
    sort_into_groups,
};
use crate::report::{CopyReport, Method};
use crate::token::{SourceToken, SourceTokens, kind_of};

/// How long a copy waits for a resync to let go of a destination region
/// before it gives up with [`CopyError::DestinationBusy`]. A resync holds
/// one region only while it copies it, so this is far beyond any healthy
/// wait.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// The vectors a copy plans in, kept across copies for their allocations.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) mapped: Vec<LeafFragment>,
    pub(crate) src_fragments: Vec<Fragment>,
    pub(crate) dst_fragments: Vec<Fragment>,
    pub(crate) pieces: Vec<Piece>,
    pub(crate) hazard_flags: Vec<bool>,
    pub(crate) sub: Vec<Piece>,
    pub(crate) chunks: Vec<Piece>,
    /// Logical ranges waiting to be bounced.
    pub(crate) bounce: Vec<(u64, u64)>,
    pub(crate) items: Vec<Item>,
    pub(crate) commands: Commands,
    /// What the destination stack holds for the copy in flight.
    pub(crate) holds: WriteHolds,
}

/// Offload command scratch.
#[derive(Default)]
pub(crate) struct Commands {
    pub(crate) ranges: Vec<CopyRange>,
    pub(crate) list: Vec<CopyCommand>,
    /// The token each command reads (an index into the tokens).
    pub(crate) token: Vec<usize>,
    pub(crate) offload_ranges: Vec<OffloadRange>,
    pub(crate) done: Vec<OffloadCompletion>,
    /// Commands refused for an expired or invalidated ROD token.
    pub(crate) stale: Vec<usize>,
}

/// Everything one copy-out needs besides the engine.
pub(crate) struct Job<'a> {
    pub(crate) tokens: &'a SourceTokens,
    pub(crate) block_size: u64,
    pub(crate) dst_index: DstIndex,
    pub(crate) src_index: DstIndex,
    /// The destination root's table index: bounced bytes go through it.
    pub(crate) dst_root: u32,
    /// The source root's table index, when failed reads are retried
    /// through it.
    pub(crate) retry_leaf: Option<u32>,
    pub(crate) report: CopyReport,
}

impl Job<'_> {
    pub(crate) fn buffer_blocks(&self, bouncer: &Bouncer) -> u64 {
        (bouncer.buffer_bytes as u64 / self.block_size).max(1)
    }
}

/// The engine's parts, borrowed for one copy-out.
pub(crate) struct Run<'e> {
    pub(crate) options: &'e CopyOptions,
    pub(crate) leaves: &'e mut Leaves,
    pub(crate) bouncer: &'e mut Bouncer,
    pub(crate) waiter: &'e mut Waiter,
    pub(crate) scratch: &'e mut Scratch,
}

impl Run<'_> {
    /// Plans and runs a copy-out whose ranges were checked.
    pub(crate) fn copy_out(
        mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        tokens: &SourceTokens,
    ) -> Result<CopyReport, CopyError> {
        let start = Instant::now();
        let total = tokens.total_blocks;
        let block_size = u64::from(dest.info().block_size);

        // The source as it stands now: a mirror leg a token names may have
        // failed since copy-in.
        let current = if tokens.has_mirror {
            self.current_tokens(tokens)?
        } else {
            None
        };
        let tokens = current.as_ref().unwrap_or(tokens);
        self.source_fragments(tokens)?;

        // The destination: held in every layer that must see the writes,
        // then mapped onto the leaves that take them.
        take_holds(dest, ranges, &mut self.scratch.holds)?;
        let dst_index = self.destination_fragments(dest, ranges, total)?;
        let dst_root = self.leaves.enter(dest, dest.info().id.0)?;
        let retry_leaf = if tokens.has_mirror {
            Some(
                self.leaves
                    .enter(&tokens.source, tokens.source.info().id.0)?,
            )
        } else {
            None
        };

        let scratch = &mut *self.scratch;
        scratch.pieces.clear();
        intersect(
            &scratch.src_fragments,
            &scratch.dst_fragments,
            &mut scratch.pieces,
        )?;
        // A piece whose bytes are already where they must go needs nothing,
        // and must not take part in hazards it does not cause.
        scratch
            .pieces
            .retain(|p| !(p.src_leaf == p.dst_leaf && p.src_lba == p.dst_lba));

        let mut job = Job {
            tokens,
            block_size,
            dst_index,
            src_index: DstIndex {
                starts: tokens.starts.clone(),
            },
            dst_root,
            retry_leaf,
            report: CopyReport {
                blocks: total,
                ..CopyReport::default()
            },
        };
        job.report.bytes_expected = scratch.pieces.iter().map(|p| p.blocks * block_size).sum();

        // Hazards: pieces reading what others write. Staged first, through
        // memory, all reads before any write; checked against the budget
        // before anything moves.
        let hazards = cross_hazards(&scratch.pieces);
        scratch.hazard_flags.clear();
        scratch.hazard_flags.resize(scratch.pieces.len(), false);
        for &h in &hazards {
            scratch.hazard_flags[h] = true;
        }
        scratch.bounce.clear();
        for (p, _) in scratch
            .pieces
            .iter()
            .zip(&scratch.hazard_flags)
            .filter(|(_, h)| **h)
        {
            scratch.bounce.push((p.logical, p.blocks));
        }
        if !scratch.bounce.is_empty() {
            debug!(pieces = hazards.len(), "staging overlapping pieces");
            self.bounce(Mode::Barrier, Method::Staged, &mut job)?;
        }

        // The rest: self-overlapping pieces one by one, then groups.
        let scratch = &mut *self.scratch;
        let mut write = 0;
        for i in 0..scratch.pieces.len() {
            if !scratch.hazard_flags[i] {
                scratch.pieces[write] = scratch.pieces[i];
                write += 1;
            }
        }
        scratch.pieces.truncate(write);
        self.copy_pieces(&mut job)?;

        job.report.wall = start.elapsed();
        debug!(report = %job.report, "copy out");
        Ok(job.report)
    }

    /// The tokens of a mirror source as the source maps now: a token whose
    /// leaf and blocks the source still reads is kept; the others are
    /// replaced by tokens on the leaves the source now reads from. `None`
    /// when every token stands.
    fn current_tokens(&mut self, tokens: &SourceTokens) -> Result<Option<SourceTokens>, CopyError> {
        let mut fresh: Option<Vec<SourceToken>> = None;
        let mapped = &mut self.scratch.mapped;
        for (i, &(logical, lba)) in tokens.starts.iter().enumerate() {
            let end = tokens
                .starts
                .get(i + 1)
                .map_or(tokens.total_blocks, |&(l, _)| l);
            mapped.clear();
            tokens
                .source
                .map(lba, end - logical, Access::Read, mapped)
                .map_err(|e| CopyError::Map {
                    device: tokens.source.info().name.clone(),
                    lba,
                    blocks: end - logical,
                    source: e,
                })?;
            for f in mapped.iter() {
                let f_logical = logical + (f.lba - lba);
                let first = tokens.token_at(f_logical);
                let mut cursor = f_logical;
                let mut stands = true;
                let mut last = first;
                for (j, t) in tokens.tokens.iter().enumerate().skip(first) {
                    if t.logical >= f_logical + f.blocks {
                        break;
                    }
                    last = j;
                    stands &= t.logical == cursor
                        && t.leaf == f.leaf
                        && t.leaf_lba == f.leaf_lba + (t.logical - f_logical);
                    cursor = t.logical + t.blocks;
                }
                stands &= cursor == f_logical + f.blocks;
                if stands && fresh.is_none() {
                    continue;
                }
                let list = fresh.get_or_insert_with(|| {
                    // Everything before this fragment stood.
                    tokens.tokens[..first].to_vec()
                });
                if stands {
                    list.extend_from_slice(&tokens.tokens[first..=last]);
                } else {
                    let device =
                        bdev_stack::find_device(&tokens.source, f.leaf).ok_or_else(|| {
                            CopyError::UnknownLeaf {
                                device: tokens.source.info().name.clone(),
                                leaf: f.leaf,
                            }
                        })?;
                    tracing::warn!(
                        source = %tokens.source.info().name,
                        leaf = %device.info().name,
                        logical = f_logical,
                        blocks = f.blocks,
                        "source tokens name a leg that no longer serves reads; using the one that does"
                    );
                    list.push(SourceToken {
                        logical: f_logical,
                        blocks: f.blocks,
                        leaf: f.leaf,
                        leaf_lba: f.leaf_lba,
                        kind: kind_of(&device.info().copy_offloads),
                    });
                }
            }
        }
        Ok(fresh.map(|list| SourceTokens {
            tokens: list,
            ..tokens.clone()
        }))
    }

    /// The source partition from `tokens`, each fragment on its leaf's
    /// table entry.
    fn source_fragments(&mut self, tokens: &SourceTokens) -> Result<(), CopyError> {
        let fragments = &mut self.scratch.src_fragments;
        fragments.clear();
        let mut next = 0;
        let mut last: Option<(u32, u32)> = None;
        for t in &tokens.tokens {
            if t.logical != next || t.blocks == 0 {
                return Err(CopyError::BadTokens {
                    total_blocks: tokens.total_blocks,
                });
            }
            next += t.blocks;
            // Runs of tokens share a leaf: look each run's up once.
            let slot = match last {
                Some((id, slot)) if id == t.leaf.0 => slot,
                _ => self.leaves.enter(&tokens.source, t.leaf.0)?,
            };
            last = Some((t.leaf.0, slot));
            fragments.push(Fragment {
                logical: t.logical,
                blocks: t.blocks,
                leaf: self.leaves.canonical(slot),
                lba: t.leaf_lba,
            });
        }
        if next != tokens.total_blocks {
            return Err(CopyError::BadTokens {
                total_blocks: tokens.total_blocks,
            });
        }
        Ok(())
    }

    /// The destination partitions, one per replica; returns the logical
    /// index of the ranges.
    fn destination_fragments(
        &mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        total: u64,
    ) -> Result<DstIndex, CopyError> {
        let scratch = &mut *self.scratch;
        scratch.dst_fragments.clear();
        let mut dst_index = DstIndex {
            starts: Vec::with_capacity(ranges.len()),
        };
        let mut logical = 0;
        let mut replica0 = 0;
        let mut last: Option<(u32, u32)> = None;
        for r in ranges {
            dst_index.starts.push((logical, r.lba));
            scratch.mapped.clear();
            dest.map(r.lba, r.blocks, Access::Write, &mut scratch.mapped)
                .map_err(|e| CopyError::Map {
                    device: dest.info().name.clone(),
                    lba: r.lba,
                    blocks: r.blocks,
                    source: e,
                })?;
            for f in &scratch.mapped {
                if f.replica == 0 {
                    replica0 += f.blocks;
                }
                let slot = match last {
                    Some((id, slot)) if id == f.leaf.0 => slot,
                    _ => self.leaves.enter(dest, f.leaf.0)?,
                };
                last = Some((f.leaf.0, slot));
                scratch.dst_fragments.push(Fragment {
                    logical: logical + (f.lba - r.lba),
                    blocks: f.blocks,
                    leaf: self.leaves.canonical(slot),
                    lba: f.leaf_lba,
                });
            }
            logical += r.blocks;
        }
        // Replica 0 of each range is a whole partition of it (further
        // replicas may cover parts: a mirror under one concat member).
        if replica0 != total {
            return Err(CopyError::Plan(PlanError::DestinationCoverage {
                covered: replica0,
                total,
            }));
        }
        Ok(dst_index)
    }

    /// Copies the pieces in `scratch.pieces`, free of cross hazards.
    fn copy_pieces(&mut self, job: &mut Job<'_>) -> Result<(), CopyError> {
        self.scratch.bounce.clear();
        // Self-overlapping pieces: memmove order, one command at a time.
        for i in 0..self.scratch.pieces.len() {
            let p = self.scratch.pieces[i];
            if p.overlaps_itself() {
                self.copy_overlapping(&p, job)?;
            }
        }
        let mut pieces = std::mem::take(&mut self.scratch.pieces);
        let result = self.copy_groups(&mut pieces, job);
        self.scratch.pieces = pieces;
        result?;
        if !self.scratch.bounce.is_empty() {
            self.bounce(Mode::Pipelined, Method::Bounce, job)?;
        }
        Ok(())
    }

    /// Offloads each group of pieces whose leaves pair; queues the rest
    /// for bounce.
    fn copy_groups(&mut self, pieces: &mut [Piece], job: &mut Job<'_>) -> Result<(), CopyError> {
        for group in sort_into_groups(pieces) {
            let (src, dst) = (
                self.leaves.slot(group.src_leaf)?,
                self.leaves.slot(group.dst_leaf)?,
            );
            let kind = &job.tokens.tokens[job.tokens.token_at(group.pieces[0].logical)].kind;
            let pairing = if self.options.offload {
                match pair(kind, self.leaves.table[dst as usize].device.info()) {
                    Ok(pairing) => Some(pairing),
                    Err(reason) => {
                        if let Some(reason) = reason {
                            job.report.refuse(
                                self.leaves.table[src as usize].id,
                                self.leaves.table[dst as usize].id,
                                reason,
                            );
                        }
                        None
                    }
                }
            } else {
                None
            };
            let movable = group.pieces.iter().filter(|p| !p.overlaps_itself());
            match pairing {
                Some(pairing) => {
                    let sub = &mut self.scratch.sub;
                    sub.clear();
                    sub.extend(movable);
                    if pairing.method == Method::RodToken {
                        // One command reads one ROD: batch per token.
                        let t = job.tokens;
                        sub.sort_unstable_by_key(|p| (t.token_at(p.logical), p.dst_lba));
                    }
                    let sub = std::mem::take(&mut self.scratch.sub);
                    let result = self.offload(&sub, src, dst, pairing, job);
                    self.scratch.sub = sub;
                    result?;
                }
                None => {
                    for p in movable {
                        self.scratch.bounce.push((p.logical, p.blocks));
                    }
                }
            }
        }
        Ok(())
    }

    /// Bounces the logical ranges in `scratch.bounce` (kept, with their
    /// allocation, for the next use).
    pub(crate) fn bounce(
        &mut self,
        mode: Mode,
        method: Method,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let scratch = &mut *self.scratch;
        scratch.items.clear();
        cut_items(
            &mut scratch.bounce,
            self.leaves,
            &Route {
                tokens: job.tokens,
                src_index: &job.src_index,
                dst_root: job.dst_root,
                dst_index: &job.dst_index,
                buffer_blocks: job.buffer_blocks(self.bouncer),
            },
            &mut scratch.items,
        )?;
        scratch.bounce.clear();
        let retry = job.retry_leaf.map(|leaf| Retry {
            leaf,
            index: &job.src_index,
        });
        self.bouncer.run(
            &mut self.leaves.table,
            &scratch.items,
            mode,
            method,
            job.block_size,
            &job.dst_index,
            retry.as_ref(),
            &mut job.report,
        )
    }

    /// A piece whose source and destination overlap on one leaf: memmove
    /// chunks, each finished before the next starts; offloaded when the
    /// leaf copies within itself, else bounced.
    fn copy_overlapping(&mut self, p: &Piece, job: &mut Job<'_>) -> Result<(), CopyError> {
        let leaf = self.leaves.slot(p.src_leaf)?;
        let kind = &job.tokens.tokens[job.tokens.token_at(p.logical)].kind;
        let pairing = if self.options.offload {
            pair(kind, self.leaves.table[leaf as usize].device.info())
                .ok()
                // A ROD may be read after the destination changed it.
                .filter(|pairing| pairing.method != Method::RodToken)
        } else {
            None
        };
        let cap = match pairing {
            Some(pairing) => pairing
                .limits
                .max_range_blocks
                .min(pairing.limits.max_command_blocks),
            None => job.buffer_blocks(self.bouncer),
        };
        let mut chunks = std::mem::take(&mut self.scratch.chunks);
        chunks.clear();
        memmove_chunks(p, cap, &mut chunks);
        let mut result = Ok(());
        for chunk in &chunks {
            // The offload's fallbacks, or the chunk itself, bounced at
            // once: the next chunk may read what this one writes.
            self.scratch.bounce.clear();
            match pairing {
                Some(pairing) => {
                    self.scratch.sub.clear();
                    self.scratch.sub.push(*chunk);
                    let sub = std::mem::take(&mut self.scratch.sub);
                    result = self.offload(&sub, leaf, leaf, pairing, job);
                    self.scratch.sub = sub;
                }
                None => self.scratch.bounce.push((chunk.logical, chunk.blocks)),
            }
            if result.is_ok() && !self.scratch.bounce.is_empty() {
                result = self.bounce(Mode::Serial, Method::Bounce, job);
            }
            if result.is_err() {
                break;
            }
        }
        self.scratch.bounce.clear();
        self.scratch.chunks = chunks;
        result
    }
}

/// Holds `ranges` of `dest` in every layer that must see the copy's
/// writes, waiting (without holding anything) while a resync has a region.
fn take_holds(
    dest: &Arc<dyn BlockDevice>,
    ranges: &[LbaRange],
    holds: &mut WriteHolds,
) -> Result<(), CopyError> {
    let started = Instant::now();
    let mut pause = Duration::from_micros(10);
    loop {
        let mut all = true;
        for r in ranges.iter().filter(|r| r.blocks > 0) {
            match dest.hold_copy_writes(r.lba, r.blocks, holds) {
                Ok(true) => {}
                Ok(false) => {
                    all = false;
                    break;
                }
                Err(e) => {
                    holds.release();
                    return Err(CopyError::Map {
                        device: dest.info().name.clone(),
                        lba: r.lba,
                        blocks: r.blocks,
                        source: e,
                    });
                }
            }
        }
        if all {
            return Ok(());
        }
        holds.release();
        let waited = started.elapsed();
        if waited >= HOLD_TIMEOUT {
            return Err(CopyError::DestinationBusy {
                device: dest.info().name.clone(),
                waited,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}
