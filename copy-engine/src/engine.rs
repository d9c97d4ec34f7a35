//! Phase 2, copy out, and the engine that runs it: map the destination,
//! intersect with the source tokens, stage hazards, copy self-overlapping
//! pieces in memmove order, offload each group of pieces whose leaves can
//! copy between themselves, and bounce the rest.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bdev_stack::wait::{Wait, Waiter};
use bdev_stack::{
    Access, BlockDevice, CopyOffload, DeviceInfo, DmaAllocator, HostAllocator, LbaRange,
    LeafFragment, OffloadCompletion, OffloadError, OffloadOutcome, OffloadRange, OffloadRequest,
    OffloadSource, OffloadSubmitError, find_device,
};
use tracing::{debug, warn};

use crate::bounce::{Bouncer, DstIndex, Item, Leaf, Mode, Retry};
use crate::error::CopyError;
use crate::plan::{
    CopyCommand, CopyLimits, CopyRange, Fragment, Piece, batch, cross_hazards, intersect,
    memmove_chunks, sort_into_groups,
};
use crate::report::{CopyReport, Method};
use crate::token::{SourceTokens, TokenKind, check_ranges, copy_in, copy_in_checked};

/// Default bytes of bounce memory in flight (8 MiB).
pub const DEFAULT_BOUNCE_BYTES: usize = 8 << 20;

/// Default size of one bounce buffer (1 MiB).
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 20;

/// How a [`CopyEngine`] works.
#[derive(Clone)]
pub struct CopyOptions {
    /// Bounce memory in flight, in bytes: the buffers, allocated once.
    pub bounce_bytes: usize,
    /// Bytes per bounce buffer (and so per bounce read and write).
    pub buffer_bytes: usize,
    /// Use device offloads where the leaves allow (off: bounce everything,
    /// for comparisons).
    pub offload: bool,
    /// Offload commands in flight per destination leaf.
    pub offload_depth: usize,
    /// Where bounce buffers come from: a driver's DMA allocator when leaves
    /// need DMA-mapped memory.
    pub allocator: Arc<dyn DmaAllocator>,
    /// How to wait while only offload commands are in flight.
    pub offload_wait: OffloadWait,
}

/// How the engine waits for offload commands. An offloaded copy keeps the
/// device busy for far longer than a read or write, and the point of
/// offloading is to give the host its CPU back, so by default the engine
/// sleeps instead of spinning while nothing completes: with
/// [`Wait::Paced`](bdev_stack::wait::Wait::Paced) each leaf's pace on Copy
/// commands (time per block) is kept with its channel across copies.
pub type OffloadWait = Wait;

impl Default for CopyOptions {
    fn default() -> CopyOptions {
        CopyOptions {
            bounce_bytes: DEFAULT_BOUNCE_BYTES,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            offload: true,
            offload_depth: 16,
            allocator: Arc::new(HostAllocator),
            offload_wait: OffloadWait::default(),
        }
    }
}

impl std::fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("bounce_bytes", &self.bounce_bytes)
            .field("buffer_bytes", &self.buffer_bytes)
            .field("offload", &self.offload)
            .field("offload_depth", &self.offload_depth)
            .field("offload_wait", &self.offload_wait)
            .finish_non_exhaustive()
    }
}

/// How a group of pieces is offloaded.
#[derive(Debug, Clone, Copy)]
struct Pairing {
    method: Method,
    limits: CopyLimits,
}

/// Whether a fragment with token `kind` can be copied by `dst` itself.
fn pair(kind: &TokenKind, dst: &DeviceInfo) -> Option<Pairing> {
    for offload in &dst.copy_offloads {
        match (kind, offload) {
            (
                TokenKind::Nvme { subsystem, nsid },
                CopyOffload::NvmeCopy {
                    subsystem: dst_subsystem,
                    nsid: dst_nsid,
                    max_ranges,
                    max_range_blocks,
                    max_command_blocks,
                },
            ) if **subsystem == **dst_subsystem && nsid == dst_nsid => {
                if *max_ranges == 0 || *max_range_blocks == 0 || *max_command_blocks == 0 {
                    return None;
                }
                return Some(Pairing {
                    method: Method::NvmeCopy,
                    limits: CopyLimits {
                        max_ranges: *max_ranges,
                        max_range_blocks: *max_range_blocks,
                        max_command_blocks: *max_command_blocks,
                        contiguous_destination: true,
                        contiguous_source: false,
                    },
                });
            }
            (
                TokenKind::ExtendedCopy { copy_manager, .. },
                CopyOffload::ScsiExtendedCopy {
                    copy_manager: dst_manager,
                    max_segments,
                    max_segment_bytes,
                    ..
                },
            ) if **copy_manager == **dst_manager => {
                return CopyLimits::xcopy(*max_segments, *max_segment_bytes, dst.block_size).map(
                    |limits| Pairing {
                        method: Method::ExtendedCopy,
                        limits,
                    },
                );
            }
            (
                TokenKind::Rod { .. },
                CopyOffload::ScsiRodToken {
                    max_ranges,
                    max_token_blocks,
                    ..
                },
            ) => {
                let descriptors = u16::try_from(*max_ranges).unwrap_or(u16::MAX);
                return CopyLimits::write_using_token(descriptors, *max_token_blocks).map(
                    |limits| Pairing {
                        method: Method::RodToken,
                        limits,
                    },
                );
            }
            _ => {}
        }
    }
    None
}

/// The copy engine: options, bounce buffers and planning vectors, kept
/// across copies so the steady state allocates nothing per piece.
///
/// The channels (queue pairs) a copy opens to its leaves stay open for the
/// next copy, as an SPDK application keeps its queue pairs: opening one
/// costs admin commands and DMA mappings, more CPU than an offloaded copy
/// itself. Leaves a copy does not use are let go of after it, all of them
/// after a copy with failures (a channel may be broken), and
/// [`CopyEngine::close_channels`] lets go at once.
pub struct CopyEngine {
    options: CopyOptions,
    bouncer: Bouncer,
    leaves: Vec<Leaf>,
    leaf_index: LeafIndex,
    mapped: Vec<LeafFragment>,
    src_fragments: Vec<Fragment>,
    dst_fragments: Vec<Fragment>,
    pieces: Vec<Piece>,
    hazard_flags: Vec<bool>,
    sub: Vec<Piece>,
    chunks: Vec<Piece>,
    items: Vec<Item>,
    fallback_items: Vec<Item>,
    cmd_ranges: Vec<CopyRange>,
    commands: Vec<CopyCommand>,
    offload_ranges: Vec<OffloadRange>,
    offload_done: Vec<OffloadCompletion>,
    command_tokens: Vec<usize>,
    /// Waits for offload commands (holds the timer of
    /// [`OffloadWait::Paced`]), made on first use.
    waiter: Option<Waiter>,
}

impl std::fmt::Debug for CopyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyEngine")
            .field("options", &self.options)
            .field("buffers", &self.bouncer.buffer_count())
            .finish_non_exhaustive()
    }
}

/// Everything one copy-out needs besides the engine.
struct Job<'a> {
    tokens: &'a SourceTokens,
    block_size: u64,
    dst_index: DstIndex,
    src_index: DstIndex,
    /// The source root's leaf-table index, when failed reads are retried
    /// through it.
    retry_leaf: Option<u32>,
    report: CopyReport,
}

impl CopyEngine {
    /// An engine with `options`; allocates its bounce buffers now.
    pub fn new(options: CopyOptions) -> Result<CopyEngine, CopyError> {
        if options.buffer_bytes == 0 || options.bounce_bytes < options.buffer_bytes {
            return Err(CopyError::InvalidOptions {
                reason: format!(
                    "bounce budget of {} bytes cannot hold one {}-byte buffer",
                    options.bounce_bytes, options.buffer_bytes
                ),
            });
        }
        let count = options.bounce_bytes / options.buffer_bytes;
        let mut buffers = Vec::with_capacity(count);
        for _ in 0..count {
            buffers.push(
                options
                    .allocator
                    .allocate(options.buffer_bytes)
                    .map_err(|source| CopyError::Device {
                        device: "bounce allocator".into(),
                        action: "allocating bounce buffers",
                        source,
                    })?,
            );
        }
        Ok(CopyEngine {
            bouncer: Bouncer::new(buffers, options.buffer_bytes),
            options,
            leaves: Vec::new(),
            leaf_index: LeafIndex::default(),
            mapped: Vec::new(),
            src_fragments: Vec::new(),
            dst_fragments: Vec::new(),
            pieces: Vec::new(),
            hazard_flags: Vec::new(),
            sub: Vec::new(),
            chunks: Vec::new(),
            items: Vec::new(),
            fallback_items: Vec::new(),
            cmd_ranges: Vec::new(),
            commands: Vec::new(),
            offload_ranges: Vec::new(),
            offload_done: Vec::new(),
            command_tokens: Vec::new(),
            waiter: None,
        })
    }

    /// The options.
    pub fn options(&self) -> &CopyOptions {
        &self.options
    }

    /// Phase 1: see [`copy_in`].
    pub fn copy_in(
        &mut self,
        source: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
    ) -> Result<SourceTokens, CopyError> {
        copy_in(source, ranges)
    }

    /// Both phases: copies `src_ranges` of `src` (concatenated) to
    /// `dst_ranges` of `dst` (concatenated); the lists may differ in shape
    /// when their totals match.
    pub fn copy(
        &mut self,
        src: &Arc<dyn BlockDevice>,
        src_ranges: &[LbaRange],
        dst: &Arc<dyn BlockDevice>,
        dst_ranges: &[LbaRange],
    ) -> Result<CopyReport, CopyError> {
        let total = check_ranges(src.as_ref(), src_ranges)?;
        self.check_destination(dst, dst_ranges, src, total)?;
        let tokens = copy_in_checked(src, src_ranges, total)?;
        self.copy_out_checked(dst, dst_ranges, &tokens, true)
    }

    /// Checks block sizes, the destination ranges, and that lengths match;
    /// returns the total.
    fn check_destination(
        &self,
        dst: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        src: &Arc<dyn BlockDevice>,
        src_blocks: u64,
    ) -> Result<u64, CopyError> {
        let (si, di) = (src.info(), dst.info());
        if si.block_size != di.block_size {
            return Err(CopyError::BlockSizeMismatch {
                source_name: si.name.clone(),
                src_block_size: si.block_size,
                destination: di.name.clone(),
                dst_block_size: di.block_size,
            });
        }
        let total = check_ranges(dst.as_ref(), ranges)?;
        if total != src_blocks {
            return Err(CopyError::LengthMismatch {
                source_name: si.name.clone(),
                src_blocks,
                destination: di.name.clone(),
                dst_blocks: total,
            });
        }
        let mut sorted: Vec<&LbaRange> = ranges.iter().filter(|r| r.blocks > 0).collect();
        sorted.sort_unstable_by_key(|r| r.lba);
        for w in sorted.windows(2) {
            if w[0].lba + w[0].blocks > w[1].lba {
                return Err(CopyError::DestinationOverlap {
                    device: di.name.clone(),
                    first_lba: w[0].lba,
                    first_blocks: w[0].blocks,
                    second_lba: w[1].lba,
                    second_blocks: w[1].blocks,
                });
            }
        }
        Ok(total)
    }

    /// The leaf-table index of a leaf the mappings named (all entered
    /// before planning).
    fn slot(&self, id: u32) -> Result<u32, CopyError> {
        self.leaf_index
            .get(&id)
            .copied()
            .ok_or(CopyError::UnknownLeaf {
                device: "copy plan".into(),
                leaf: bdev_stack::DeviceId(id),
            })
    }

    /// The leaf-table index of leaf `id`, found under `root`.
    fn leaf(&mut self, root: &Arc<dyn BlockDevice>, id: u32) -> Result<u32, CopyError> {
        if let Some(&i) = self.leaf_index.get(&id) {
            self.leaves[i as usize].in_use = true;
            return Ok(i);
        }
        let device =
            find_device(root, bdev_stack::DeviceId(id)).ok_or_else(|| CopyError::UnknownLeaf {
                device: root.info().name.clone(),
                leaf: bdev_stack::DeviceId(id),
            })?;
        let i = self.leaves.len() as u32;
        self.leaves.push(Leaf::new(device));
        self.leaf_index.insert(id, i);
        Ok(i)
    }

    /// Closes the channels kept open from earlier copies and lets go of
    /// their devices.
    pub fn close_channels(&mut self) {
        self.leaves.clear();
        self.leaf_index.clear();
    }

    /// Keeps the leaves this copy used, with their channels, for the next
    /// copy; lets go of the others.
    fn keep_used_leaves(&mut self) {
        if self.leaves.iter().all(|leaf| leaf.in_use) {
            for leaf in &mut self.leaves {
                leaf.in_use = false;
            }
            return;
        }
        self.leaves.retain(|leaf| leaf.in_use);
        self.leaf_index.clear();
        for (i, leaf) in self.leaves.iter_mut().enumerate() {
            leaf.in_use = false;
            self.leaf_index.insert(leaf.id.0, i as u32);
        }
    }

    /// Phase 2: copies the bytes `tokens` describe to `ranges` of `dest`
    /// (concatenated). Errors come before any byte moves; failures of
    /// single I/Os are in the report's `not_copied`.
    pub fn copy_out(
        &mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        tokens: &SourceTokens,
    ) -> Result<CopyReport, CopyError> {
        self.copy_out_checked(dest, ranges, tokens, false)
    }

    /// [`CopyEngine::copy_out`]; `checked`: the destination ranges were
    /// checked against the tokens already.
    fn copy_out_checked(
        &mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        tokens: &SourceTokens,
        checked: bool,
    ) -> Result<CopyReport, CopyError> {
        for leaf in &mut self.leaves {
            leaf.in_use = false;
        }
        let result = self.plan_and_copy(dest, ranges, tokens, checked);
        match &result {
            Ok(report) if report.not_copied.is_empty() && report.fallbacks == 0 => {
                self.keep_used_leaves()
            }
            _ => self.close_channels(),
        }
        result
    }

    fn plan_and_copy(
        &mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        tokens: &SourceTokens,
        checked: bool,
    ) -> Result<CopyReport, CopyError> {
        let start = Instant::now();
        let total = if checked {
            tokens.total_blocks
        } else {
            self.check_destination(dest, ranges, &tokens.source, tokens.total_blocks)?
        };
        let block_size = u64::from(dest.info().block_size);

        // The source partition, from the tokens.
        self.src_fragments.clear();
        let mut next = 0;
        for t in &tokens.tokens {
            if t.logical != next || t.blocks == 0 {
                return Err(CopyError::BadTokens {
                    total_blocks: tokens.total_blocks,
                });
            }
            next += t.blocks;
            self.src_fragments.push(Fragment {
                logical: t.logical,
                blocks: t.blocks,
                leaf: t.leaf.0,
                lba: t.leaf_lba,
            });
        }
        if next != total {
            return Err(CopyError::BadTokens {
                total_blocks: tokens.total_blocks,
            });
        }
        // Runs of tokens share a leaf: look each run's up once.
        let mut last = None;
        for t in &tokens.tokens {
            if last != Some(t.leaf.0) {
                self.leaf(&tokens.source, t.leaf.0)?;
                last = Some(t.leaf.0);
            }
        }

        // The destination partitions, one per replica.
        self.dst_fragments.clear();
        let mut dst_index = DstIndex {
            starts: Vec::with_capacity(ranges.len()),
        };
        let mut logical = 0;
        let mut replica0 = 0;
        for r in ranges {
            dst_index.starts.push((logical, r.lba));
            self.mapped.clear();
            dest.map(r.lba, r.blocks, Access::Write, &mut self.mapped)
                .map_err(|e| CopyError::Map {
                    device: dest.info().name.clone(),
                    lba: r.lba,
                    blocks: r.blocks,
                    source: e,
                })?;
            for f in &self.mapped {
                if f.replica == 0 {
                    replica0 += f.blocks;
                }
                self.dst_fragments.push(Fragment {
                    logical: logical + (f.lba - r.lba),
                    blocks: f.blocks,
                    leaf: f.leaf.0,
                    lba: f.leaf_lba,
                });
            }
            logical += r.blocks;
        }
        // Replica 0 of each range is a whole partition of it (further
        // replicas may cover parts: a mirror under one concat member).
        if replica0 != total {
            return Err(CopyError::Plan(
                crate::plan::PlanError::DestinationCoverage {
                    covered: replica0,
                    total,
                },
            ));
        }
        let mut last = None;
        for i in 0..self.dst_fragments.len() {
            let id = self.dst_fragments[i].leaf;
            if last != Some(id) {
                self.leaf(dest, id)?;
                last = Some(id);
            }
        }

        self.pieces.clear();
        intersect(&self.src_fragments, &self.dst_fragments, &mut self.pieces)?;
        // A piece whose bytes are already where they must go needs nothing,
        // and must not take part in hazards it does not cause.
        self.pieces
            .retain(|p| !(p.src_leaf == p.dst_leaf && p.src_lba == p.dst_lba));

        let retry_leaf = if tokens.has_mirror {
            Some(self.leaf(&tokens.source, tokens.source.info().id.0)?)
        } else {
            None
        };
        let mut job = Job {
            tokens,
            block_size,
            dst_index,
            src_index: DstIndex {
                starts: tokens.starts.clone(),
            },
            retry_leaf,
            report: CopyReport {
                blocks: total,
                ..CopyReport::default()
            },
        };

        // Hazards: pieces reading what others write. Staged first, through
        // memory, all reads before any write; checked against the budget
        // before anything moves.
        let hazards = cross_hazards(&self.pieces);
        self.hazard_flags.clear();
        self.hazard_flags.resize(self.pieces.len(), false);
        for &h in &hazards {
            self.hazard_flags[h] = true;
        }
        self.items.clear();
        for (i, p) in self.pieces.iter().enumerate() {
            if self.hazard_flags[i] {
                let p = *p;
                push_items(
                    &self.leaves,
                    &self.leaf_index,
                    &p,
                    self.bouncer.buffer_bytes as u64 / block_size,
                    &mut self.items,
                );
            }
        }
        if self.items.len() > self.bouncer.buffer_count() {
            return Err(CopyError::StagingTooLarge {
                needed_buffers: self.items.len(),
                buffer_bytes: self.bouncer.buffer_bytes,
                budget_buffers: self.bouncer.buffer_count(),
            });
        }
        job.report.bytes_expected = self.pieces.iter().map(|p| p.blocks * block_size).sum();
        if !self.items.is_empty() {
            debug!(
                pieces = hazards.len(),
                items = self.items.len(),
                "staging overlapping pieces"
            );
            self.bounce_items(Mode::Barrier, Method::Staged, &mut job)?;
        }

        // The rest: self-overlapping pieces one by one, then groups.
        let mut pieces = std::mem::take(&mut self.pieces);
        let mut write = 0;
        for i in 0..pieces.len() {
            if !self.hazard_flags[i] {
                pieces[write] = pieces[i];
                write += 1;
            }
        }
        pieces.truncate(write);
        let result = self.copy_pieces(&mut pieces, &mut job);
        self.pieces = pieces;
        result?;

        job.report.wall = start.elapsed();
        debug!(report = %job.report, "copy out");
        Ok(job.report)
    }

    /// Copies pieces free of cross hazards.
    fn copy_pieces(&mut self, pieces: &mut [Piece], job: &mut Job<'_>) -> Result<(), CopyError> {
        let buffer_blocks = self.bouncer.buffer_bytes as u64 / job.block_size;
        self.items.clear();
        self.fallback_items.clear();
        // Self-overlapping pieces: memmove order, one command at a time.
        for p in pieces.iter().filter(|p| p.overlaps_itself()) {
            let p = *p;
            self.copy_overlapping(&p, buffer_blocks, job)?;
        }
        for group in sort_into_groups(pieces) {
            let (src, dst) = (self.slot(group.src_leaf)?, self.slot(group.dst_leaf)?);
            let kind = &job.tokens.tokens[job.tokens.token_at(group.pieces[0].logical)].kind;
            let pairing = if self.options.offload {
                pair(kind, self.leaves[dst as usize].device.info())
            } else {
                None
            };
            let movable = group.pieces.iter().filter(|p| !p.overlaps_itself());
            match pairing {
                Some(pairing) => {
                    self.sub.clear();
                    self.sub.extend(movable);
                    if pairing.method == Method::RodToken {
                        // One command reads one ROD: batch per token.
                        let t = job.tokens;
                        self.sub
                            .sort_unstable_by_key(|p| (t.token_at(p.logical), p.dst_lba));
                    }
                    let sub = std::mem::take(&mut self.sub);
                    let result = self.offload(&sub, src, dst, pairing, job);
                    self.sub = sub;
                    result?;
                }
                None => {
                    for p in movable {
                        push_items(
                            &self.leaves,
                            &self.leaf_index,
                            p,
                            buffer_blocks,
                            &mut self.items,
                        );
                    }
                }
            }
        }
        self.items.append(&mut self.fallback_items);
        if !self.items.is_empty() {
            self.bounce_items(Mode::Pipelined, Method::Bounce, job)?;
        }
        Ok(())
    }

    /// Bounces `self.items` (kept, with their allocation, for the next
    /// use).
    fn bounce_items(
        &mut self,
        mode: Mode,
        method: Method,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let items = std::mem::take(&mut self.items);
        let retry = job.retry_leaf.map(|leaf| Retry {
            leaf,
            index: &job.src_index,
        });
        let result = self.bouncer.run(
            &mut self.leaves,
            &items,
            mode,
            method,
            job.block_size,
            &job.dst_index,
            retry.as_ref(),
            &mut job.report,
        );
        self.items = items;
        result
    }

    /// A piece whose source and destination overlap on one leaf: memmove
    /// chunks, each finished before the next starts; offloaded when the
    /// leaf copies within itself, else bounced.
    fn copy_overlapping(
        &mut self,
        p: &Piece,
        buffer_blocks: u64,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let leaf = self.slot(p.src_leaf)?;
        let kind = &job.tokens.tokens[job.tokens.token_at(p.logical)].kind;
        let pairing = if self.options.offload {
            pair(kind, self.leaves[leaf as usize].device.info())
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
            None => self.bounce_cap(leaf, leaf, buffer_blocks),
        };
        self.chunks.clear();
        memmove_chunks(p, cap, &mut self.chunks);
        let chunks = std::mem::take(&mut self.chunks);
        let mut result = Ok(());
        for chunk in &chunks {
            self.sub.clear();
            self.sub.push(*chunk);
            let sub = std::mem::take(&mut self.sub);
            result = match pairing {
                Some(pairing) => self.offload(&sub, leaf, leaf, pairing, job),
                None => Ok(()),
            };
            self.sub = sub;
            if result.is_err() {
                break;
            }
            // The offload's fallbacks, or the chunk itself, bounced now:
            // the next chunk may read what this one writes.
            self.items.clear();
            if pairing.is_none() {
                push_items(
                    &self.leaves,
                    &self.leaf_index,
                    chunk,
                    buffer_blocks,
                    &mut self.items,
                );
            }
            self.items.append(&mut self.fallback_items);
            if !self.items.is_empty() {
                result = self.bounce_items(Mode::Serial, Method::Bounce, job);
                self.items.clear();
                if result.is_err() {
                    break;
                }
            }
        }
        self.chunks = chunks;
        result
    }

    fn bounce_cap(&self, src: u32, dst: u32, buffer_blocks: u64) -> u64 {
        let max = |i: u32| self.leaves[i as usize].device.info().max_transfer_blocks;
        buffer_blocks.min(max(src)).min(max(dst)).max(1)
    }

    /// Offloads `pieces` (sorted by destination LBA, or by token and
    /// destination LBA for ROD tokens) from leaf `src` to leaf `dst`.
    /// Whatever the device does not do lands in `fallback_items`.
    fn offload(
        &mut self,
        pieces: &[Piece],
        src: u32,
        dst: u32,
        pairing: Pairing,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        self.cmd_ranges.clear();
        self.commands.clear();
        // Batch per run of pieces on one token (all of them, but for ROD).
        let tokens = job.tokens;
        let mut token_of_command = std::mem::take(&mut self.command_tokens);
        token_of_command.clear();
        for run in pieces.chunk_by(|a, b| {
            pairing.method != Method::RodToken
                || tokens.token_at(a.logical) == tokens.token_at(b.logical)
        }) {
            batch(
                run,
                &pairing.limits,
                &mut self.cmd_ranges,
                &mut self.commands,
            );
            token_of_command.resize(self.commands.len(), tokens.token_at(run[0].logical));
        }
        let result = self.run_commands(pieces, src, dst, pairing, &token_of_command, job);
        self.command_tokens = token_of_command;
        result
    }

    /// Submits the batched commands and handles their completions.
    fn run_commands(
        &mut self,
        pieces: &[Piece],
        src: u32,
        dst: u32,
        pairing: Pairing,
        token_of_command: &[usize],
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let buffer_blocks = self.bouncer.buffer_bytes as u64 / job.block_size;
        let tokens = job.tokens;
        let depth = self.options.offload_depth.max(1);
        let leaf = &mut self.leaves[dst as usize];
        if !leaf.copy_opened {
            leaf.copy_opened = true;
            leaf.copy =
                leaf.device
                    .open_copy_channel(depth)
                    .map_err(|source| CopyError::Device {
                        device: leaf.device.info().name.clone(),
                        action: "opening a copy channel",
                        source,
                    })?;
        }
        let Some(mut channel) = leaf.copy.take() else {
            // Advertised but no channel: bounce all of it.
            warn!(leaf = %leaf.device.info().name, "offload advertised but no copy channel; bouncing");
            for p in pieces {
                push_items(
                    &self.leaves,
                    &self.leaf_index,
                    p,
                    buffer_blocks,
                    &mut self.fallback_items,
                );
            }
            return Ok(());
        };
        let src_info = self.leaves[src as usize].device.info();
        let naa: Option<Arc<[u8]>> =
            match &tokens.tokens[token_of_command.first().copied().unwrap_or(0)].kind {
                TokenKind::ExtendedCopy { naa, .. } => Some(Arc::clone(naa)),
                _ => None,
            };
        let src_block_size = src_info.block_size;
        let mut next = 0;
        let mut waiter = self
            .waiter
            .take()
            .unwrap_or_else(|| Waiter::new(self.options.offload_wait));
        waiter.set_pace(self.leaves[dst as usize].copy_pace);
        let mut in_flight = 0u64;
        self.offload_done.clear();
        self.offload_done.reserve(depth);
        while next < self.commands.len() || channel.outstanding() > 0 {
            let mut handed_over = false;
            while next < self.commands.len() {
                let cmd = self.commands[next];
                let token = &tokens.tokens[token_of_command[next]];
                self.offload_ranges.clear();
                for r in &self.cmd_ranges[cmd.first_range..cmd.first_range + cmd.range_count] {
                    let src = match pairing.method {
                        // Offset into the ROD, which starts at the token's
                        // first block.
                        Method::RodToken => r.src_lba - token.leaf_lba,
                        _ => r.src_lba,
                    };
                    self.offload_ranges.push(OffloadRange {
                        src,
                        dst: r.dst_lba,
                        blocks: r.blocks,
                    });
                }
                let source = match (&pairing.method, &token.kind, &naa) {
                    (Method::RodToken, TokenKind::Rod { token }, _) => {
                        OffloadSource::RodToken(token)
                    }
                    (Method::ExtendedCopy, _, Some(naa)) => OffloadSource::Designator {
                        naa,
                        block_size: src_block_size,
                    },
                    _ => OffloadSource::SameDevice,
                };
                let req = OffloadRequest {
                    source,
                    ranges: &self.offload_ranges,
                    ctx: next as u64,
                };
                match channel.submit_copy(&req) {
                    Ok(()) => {
                        next += 1;
                        in_flight += cmd.blocks;
                        handed_over = true;
                    }
                    Err(OffloadSubmitError::Busy) => break,
                    Err(OffloadSubmitError::Invalid(e)) => {
                        warn!(error = %e, "offload refused; bouncing its ranges");
                        job.report.fallbacks += 1;
                        self.fall_back(pieces, &cmd, 0, src, dst, buffer_blocks);
                        next += 1;
                    }
                }
            }
            if handed_over {
                waiter.submitted(in_flight);
            }
            self.offload_done.clear();
            let completed = channel.poll(&mut self.offload_done, depth);
            let mut failed = false;
            for c in &self.offload_done {
                failed |= !matches!(c.outcome, OffloadOutcome::Done);
                if let Some(cmd) = usize::try_from(c.ctx)
                    .ok()
                    .and_then(|i| self.commands.get(i))
                {
                    in_flight = in_flight.saturating_sub(cmd.blocks);
                }
            }
            waiter.after_poll(completed, failed, in_flight);
            let done = std::mem::take(&mut self.offload_done);
            for c in &done {
                let Some(cmd) = usize::try_from(c.ctx)
                    .ok()
                    .and_then(|i| self.commands.get(i))
                    .copied()
                else {
                    warn!(
                        ctx = c.ctx,
                        "offload completion for an unknown command; ignored"
                    );
                    continue;
                };
                let ranges = &self.cmd_ranges[cmd.first_range..cmd.first_range + cmd.range_count];
                let stats_done = |report: &mut CopyReport, blocks: u64, whole_ranges: u64| {
                    let s = report.method_mut(pairing.method);
                    s.commands += 1;
                    s.bytes += blocks * job.block_size;
                    s.pieces += whole_ranges;
                };
                match &c.outcome {
                    OffloadOutcome::Done => {
                        stats_done(&mut job.report, cmd.blocks, ranges.len() as u64)
                    }
                    OffloadOutcome::Partial { blocks_done, error } => {
                        // Device data: never trust it past the command.
                        let done_blocks = (*blocks_done).min(cmd.blocks);
                        let mut whole = 0;
                        let mut acc = 0;
                        for r in ranges {
                            if acc + r.blocks <= done_blocks {
                                whole += 1;
                            }
                            acc += r.blocks;
                        }
                        log_fallback(error, "partially done");
                        job.report.fallbacks += 1;
                        if done_blocks > 0 {
                            stats_done(&mut job.report, done_blocks, whole);
                        }
                        self.fall_back(pieces, &cmd, done_blocks, src, dst, buffer_blocks);
                    }
                    OffloadOutcome::NotDone(error) => {
                        log_fallback(error, "not done");
                        job.report.fallbacks += 1;
                        self.fall_back(pieces, &cmd, 0, src, dst, buffer_blocks);
                    }
                    OffloadOutcome::DestinationUnknown(error) => {
                        log_fallback(error, "destination unknown; redoing by bounce");
                        job.report.fallbacks += 1;
                        self.fall_back(pieces, &cmd, 0, src, dst, buffer_blocks);
                    }
                    OffloadOutcome::Token(_) => {
                        warn!(
                            "copy command completed with a token; treating its destination as unknown"
                        );
                        job.report.fallbacks += 1;
                        self.fall_back(pieces, &cmd, 0, src, dst, buffer_blocks);
                    }
                }
            }
            self.offload_done = done;
        }
        let leaf = &mut self.leaves[dst as usize];
        leaf.copy = Some(channel);
        leaf.copy_pace = waiter.pace();
        self.waiter = Some(waiter);
        Ok(())
    }

    /// Queues for bounce the part of `cmd` after its first `done_blocks`
    /// blocks.
    fn fall_back(
        &mut self,
        pieces: &[Piece],
        cmd: &CopyCommand,
        done_blocks: u64,
        src: u32,
        dst: u32,
        buffer_blocks: u64,
    ) {
        let mut skip = done_blocks;
        for r in &self.cmd_ranges[cmd.first_range..cmd.first_range + cmd.range_count] {
            if skip >= r.blocks {
                skip -= r.blocks;
                continue;
            }
            let (src_lba, dst_lba, blocks) = (r.src_lba + skip, r.dst_lba + skip, r.blocks - skip);
            skip = 0;
            // The logical block of this destination block: the piece that
            // holds it (pieces of one destination leaf never overlap there).
            let logical = pieces
                .iter()
                .find(|p| p.dst_lba <= dst_lba && dst_lba < p.dst_lba + p.blocks)
                .map_or(0, |p| p.logical + (dst_lba - p.dst_lba));
            let piece = Piece {
                logical,
                blocks,
                src_leaf: self.leaves[src as usize].id.0,
                src_lba,
                dst_leaf: self.leaves[dst as usize].id.0,
                dst_lba,
            };
            push_items(
                &self.leaves,
                &self.leaf_index,
                &piece,
                buffer_blocks,
                &mut self.fallback_items,
            );
        }
    }
}

fn log_fallback(error: &OffloadError, what: &str) {
    warn!(%error, "offload {what}; bouncing its ranges");
}

/// Leaf id to leaf-table index. Looked up per fragment and piece, so hashed
/// with one multiplication rather than SipHash: the keys are small device
/// ids handed out by the stack, not attacker-chosen.
pub(crate) type LeafIndex = HashMap<u32, u32, BuildHasherDefault<LeafIdHasher>>;

/// Fibonacci hashing of a `u32` key.
#[derive(Default)]
pub(crate) struct LeafIdHasher(u64);

impl Hasher for LeafIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = (u64::from(id) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Cuts `p` into bounce items within one buffer and both leaves' maximum
/// transfer.
fn push_items(
    leaves: &[Leaf],
    index: &LeafIndex,
    p: &Piece,
    buffer_blocks: u64,
    out: &mut Vec<Item>,
) {
    let (Some(&src), Some(&dst)) = (index.get(&p.src_leaf), index.get(&p.dst_leaf)) else {
        return;
    };
    let max = |i: u32| leaves[i as usize].device.info().max_transfer_blocks;
    let cap = buffer_blocks.min(max(src)).min(max(dst)).max(1);
    let mut done = 0;
    while done < p.blocks {
        let blocks = (p.blocks - done).min(cap);
        out.push(Item {
            src,
            src_lba: p.src_lba + done,
            dst,
            dst_lba: p.dst_lba + done,
            blocks,
            logical: p.logical + done,
            new_piece: done == 0,
            retried: false,
        });
        done += blocks;
    }
}

/// Phase 2 with a default engine (allocates its bounce buffers): see
/// [`CopyEngine::copy_out`].
pub fn copy_out(
    dest: &Arc<dyn BlockDevice>,
    ranges: &[LbaRange],
    tokens: &SourceTokens,
) -> Result<CopyReport, CopyError> {
    CopyEngine::new(CopyOptions::default())?.copy_out(dest, ranges, tokens)
}

/// Both phases with a default engine: see [`CopyEngine::copy`].
pub fn copy(
    src: &Arc<dyn BlockDevice>,
    src_ranges: &[LbaRange],
    dst: &Arc<dyn BlockDevice>,
    dst_ranges: &[LbaRange],
) -> Result<CopyReport, CopyError> {
    CopyEngine::new(CopyOptions::default())?.copy(src, src_ranges, dst, dst_ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_stack::{BdevError, Channel, CopyChannel, DeviceId, IoError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A memory leaf that counts the channels opened to it.
    struct Counting {
        info: DeviceInfo,
        inner: Arc<dyn BlockDevice>,
        opened: AtomicUsize,
    }

    impl Counting {
        fn new() -> Arc<Counting> {
            let inner = bdev_stack::spec::build("mem:1m,copy=nvme").unwrap();
            let mut info = inner.info().clone();
            info.id = DeviceId::fresh();
            Arc::new(Counting {
                info,
                inner,
                opened: AtomicUsize::new(0),
            })
        }
    }

    impl BlockDevice for Counting {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }

        fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.inner.open_channel(depth)
        }

        fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
            Vec::new()
        }

        fn open_copy_channel(
            &self,
            depth: usize,
        ) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.inner.open_copy_channel(depth)
        }

        fn map(
            &self,
            lba: u64,
            blocks: u64,
            access: Access,
            out: &mut Vec<LeafFragment>,
        ) -> Result<(), IoError> {
            let first = out.len();
            self.inner.map(lba, blocks, access, out)?;
            for f in &mut out[first..] {
                f.leaf = self.info.id;
            }
            Ok(())
        }
    }

    #[test]
    fn channels_stay_open_for_the_next_copy_over_the_same_leaves() {
        for offload in [true, false] {
            let mut engine = CopyEngine::new(CopyOptions {
                offload,
                ..CopyOptions::default()
            })
            .unwrap();
            let (a, b) = (Counting::new(), Counting::new());
            let (dev_a, dev_b): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) =
                (a.clone(), b.clone());
            let src = [LbaRange { lba: 0, blocks: 64 }];
            let dst = [LbaRange {
                lba: 512,
                blocks: 64,
            }];
            for _ in 0..3 {
                assert!(
                    engine
                        .copy(&dev_a, &src, &dev_a, &dst)
                        .unwrap()
                        .is_complete()
                );
            }
            assert_eq!(a.opened.load(Ordering::Relaxed), 1, "offload {offload}");
            // A copy over other leaves lets the first ones go.
            assert!(
                engine
                    .copy(&dev_b, &src, &dev_b, &dst)
                    .unwrap()
                    .is_complete()
            );
            drop(dev_a);
            assert_eq!(Arc::strong_count(&a), 1, "offload {offload}");
            engine.close_channels();
            drop(dev_b);
            assert_eq!(Arc::strong_count(&b), 1, "offload {offload}");
        }
    }
}
