//! The bounce path: read into host (DMA) buffers, write back out,
//! pipelined over a fixed set of buffers allocated once per engine, so the
//! steady state allocates nothing and memory in flight is bounded.
//!
//! Bytes are read from the source token's leaf (retried through the source
//! root, where a mirror tries its other legs) and written through the
//! destination root's own channel, so every layer of the destination
//! stack sees them: a mirror counts them in its write intent, holds them
//! off a region under resync, writes every leg that takes writes and fails
//! a leg whose write fails. Bounce work is collected as logical ranges, so
//! a range that several replicas (mirror legs) need is written once.

use std::collections::VecDeque;

use bdev_stack::{Completion, DmaMemory, IoRequest, SubmitError};
use tracing::warn;

use crate::error::CopyError;
use crate::leaves::{Leaf, Leaves};
use crate::report::{CopyFailure, CopyReport, Method, NotCopied};
use crate::token::SourceTokens;

/// One bounce transfer: at most one buffer's worth, within both devices'
/// maximum transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Item {
    /// Source leaf (index into the leaf table).
    pub(crate) src: u32,
    pub(crate) src_lba: u64,
    /// Destination: the destination root (index into the leaf table).
    pub(crate) dst: u32,
    pub(crate) dst_lba: u64,
    pub(crate) blocks: u64,
    /// Start in the logical copy space.
    pub(crate) logical: u64,
    /// The first item of a piece (for the report's piece counts).
    pub(crate) new_piece: bool,
    /// Already read again through the source root.
    pub(crate) retried: bool,
}

/// Where a failed source read may be tried again: the source root (a
/// mirror tries its other legs), at the LBAs `index` gives.
pub(crate) struct Retry<'a> {
    pub(crate) leaf: u32,
    pub(crate) index: &'a DstIndex,
}

/// How items may be ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Reads and writes overlap freely, every buffer in use.
    Pipelined,
    /// Every read completes before the first write (staging through
    /// memory); all items must fit in the buffers at once.
    Barrier,
    /// One item at a time, each read then written (memmove order).
    Serial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    Reading,
    Read,
    Writing,
}

/// Maps a logical block to a device's LBA (the destination's, or the
/// source's for retries).
pub(crate) struct DstIndex {
    /// (logical start, destination LBA) per destination range, by logical.
    pub(crate) starts: Vec<(u64, u64)>,
}

impl DstIndex {
    pub(crate) fn lba(&self, logical: u64) -> u64 {
        let i = self.starts.partition_point(|&(l, _)| l <= logical);
        match i.checked_sub(1).and_then(|i| self.starts.get(i)) {
            Some(&(l, lba)) => lba + (logical - l),
            None => logical,
        }
    }
}

impl DstIndex {
    /// The first logical block after `logical` where a new range starts.
    fn next_start(&self, logical: u64) -> u64 {
        let i = self.starts.partition_point(|&(l, _)| l <= logical);
        self.starts.get(i).map_or(u64::MAX, |&(l, _)| l)
    }
}

/// Where bounced bytes go and come from.
pub(crate) struct Route<'a> {
    pub(crate) tokens: &'a SourceTokens,
    pub(crate) src_index: &'a DstIndex,
    pub(crate) dst_root: u32,
    pub(crate) dst_index: &'a DstIndex,
    pub(crate) buffer_blocks: u64,
}

/// Turns the logical ranges in `ranges` (sorted and merged here, so
/// replicas of one range count once) into items in `out`, each within one
/// buffer, one source token, one source range and one destination range.
pub(crate) fn cut_items(
    ranges: &mut Vec<(u64, u64)>,
    leaves: &Leaves,
    route: &Route<'_>,
    out: &mut Vec<Item>,
) -> Result<(), CopyError> {
    ranges.sort_unstable();
    let mut merged = 0;
    for i in 0..ranges.len() {
        let (start, blocks) = ranges[i];
        if merged > 0 {
            let (last_start, last_blocks) = ranges[merged - 1];
            // Overlapping ranges are one range's replicas; adjacent ones
            // stay apart, as pieces of their own.
            if start < last_start + last_blocks {
                let end = (start + blocks).max(last_start + last_blocks);
                ranges[merged - 1].1 = end - last_start;
                continue;
            }
        }
        ranges[merged] = (start, blocks);
        merged += 1;
    }
    ranges.truncate(merged);
    let dst_max = leaves.table[route.dst_root as usize]
        .device
        .info()
        .max_transfer_blocks;
    for &(start, blocks) in ranges.iter() {
        let end = start + blocks;
        let mut cursor = start;
        while cursor < end {
            let token = &route.tokens.tokens[route.tokens.token_at(cursor)];
            let src = leaves.slot(token.leaf.0)?;
            let src_max = leaves.table[src as usize].device.info().max_transfer_blocks;
            let cap = route.buffer_blocks.min(src_max).min(dst_max).max(1);
            let limit = end
                .min(token.logical + token.blocks)
                .min(route.dst_index.next_start(cursor))
                .min(route.src_index.next_start(cursor));
            let run = (limit.saturating_sub(cursor)).clamp(1, cap);
            out.push(Item {
                src,
                src_lba: token.leaf_lba + (cursor - token.logical),
                dst: route.dst_root,
                dst_lba: route.dst_index.lba(cursor),
                blocks: run,
                logical: cursor,
                new_piece: cursor == start,
                retried: false,
            });
            cursor += run;
        }
    }
    Ok(())
}

/// The bounce buffers and per-buffer state, allocated once.
pub(crate) struct Bouncer {
    buffers: Vec<Box<dyn DmaMemory>>,
    pub(crate) buffer_bytes: usize,
    slots: Vec<(Item, Phase)>,
    free: Vec<u32>,
    ready: VecDeque<u32>,
    completions: Vec<Completion>,
}

impl Bouncer {
    pub(crate) fn new(buffers: Vec<Box<dyn DmaMemory>>, buffer_bytes: usize) -> Bouncer {
        let n = buffers.len();
        Bouncer {
            buffers,
            buffer_bytes,
            slots: vec![(Item::default(), Phase::Free); n],
            free: (0..n as u32).rev().collect(),
            ready: VecDeque::with_capacity(n),
            completions: vec![Completion::EMPTY; n.max(1)],
        }
    }

    /// Buffers available.
    pub(crate) fn buffer_count(&self) -> usize {
        self.buffers.len()
    }

    fn record(
        report: &mut CopyReport,
        leaves: &[Leaf],
        dst_index: &DstIndex,
        item: &Item,
        failure: CopyFailure,
    ) {
        warn!(%failure, logical = item.logical, blocks = item.blocks, "range not copied");
        report.not_copied.push(NotCopied {
            logical: item.logical,
            blocks: item.blocks,
            dst_lba: dst_index.lba(item.logical),
            dst_leaf: leaves[item.dst as usize].id,
            dst_leaf_lba: item.dst_lba,
            failure,
        });
    }

    /// Moves `items` through the buffers. Failed reads and writes are
    /// listed in `report.not_copied`; bytes written count for `method`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &mut self,
        leaves: &mut [Leaf],
        items: &[Item],
        mode: Mode,
        method: Method,
        block_size: u64,
        dst_index: &DstIndex,
        retry: Option<&Retry<'_>>,
        report: &mut CopyReport,
    ) -> Result<(), CopyError> {
        let n = self.buffers.len();
        if mode == Mode::Barrier && items.len() > n {
            return Err(CopyError::StagingTooLarge {
                needed_buffers: items.len(),
                buffer_bytes: self.buffer_bytes,
                budget_buffers: n,
            });
        }
        // Check every item and open every channel first: nothing moves if
        // one cannot be done.
        for item in items {
            if item.blocks == 0 || item.blocks.saturating_mul(block_size) > self.buffer_bytes as u64
            {
                return Err(CopyError::InvalidOptions {
                    reason: format!(
                        "a {}-block transfer does not fit a {}-byte bounce buffer",
                        item.blocks, self.buffer_bytes
                    ),
                });
            }
            leaves[item.src as usize].io(n)?;
            leaves[item.dst as usize].io(n)?;
        }
        if let Some(retry) = retry {
            leaves[retry.leaf as usize].io(n)?;
        }
        let limit = if mode == Mode::Serial { 1 } else { n };
        let mut next = 0;
        let mut in_use = 0;
        let mut reading = 0;
        loop {
            // Start reads into free buffers.
            while next < items.len() && in_use < limit {
                let Some(slot) = self.free.pop() else { break };
                let item = items[next];
                let bytes = item.blocks * block_size;
                let Some(buf) = usize::try_from(bytes)
                    .ok()
                    .and_then(|len| self.buffers[slot as usize].dma_slice().sub(0, len))
                else {
                    // Checked above: unreachable. Never leave with I/O in
                    // flight into our buffers.
                    self.free.push(slot);
                    self.drain(leaves);
                    return Err(CopyError::InvalidOptions {
                        reason: format!("a {bytes}-byte transfer does not fit a bounce buffer"),
                    });
                };
                let channel = leaves[item.src as usize].io(n)?;
                let req = IoRequest::read(item.src_lba, item.blocks, buf, u64::from(slot));
                // SAFETY: the buffer belongs to this bouncer and is not
                // touched until the read's completion comes back through
                // `poll` below; `run` returns only when no slot is in
                // flight, and the buffers live as long as the bouncer.
                match unsafe { channel.submit(req) } {
                    Ok(()) => {
                        self.slots[slot as usize] = (item, Phase::Reading);
                        in_use += 1;
                        reading += 1;
                        next += 1;
                    }
                    Err(SubmitError::Busy) => {
                        self.free.push(slot);
                        break;
                    }
                    Err(SubmitError::Invalid(e)) => {
                        self.free.push(slot);
                        Self::record(report, leaves, dst_index, &item, CopyFailure::Read(e));
                        next += 1;
                    }
                }
            }
            // Start writes of buffers read, unless a barrier holds them.
            let hold = mode == Mode::Barrier && (next < items.len() || reading > 0);
            while let Some(&slot) = self.ready.front().filter(|_| !hold) {
                let (item, _) = self.slots[slot as usize];
                let bytes = (item.blocks * block_size) as usize;
                let Some(buf) = self.buffers[slot as usize].dma_slice().sub(0, bytes) else {
                    self.drain(leaves);
                    return Err(CopyError::InvalidOptions {
                        reason: format!("a {bytes}-byte transfer does not fit a bounce buffer"),
                    });
                };
                let channel = leaves[item.dst as usize].io(n)?;
                let req = IoRequest::write(item.dst_lba, item.blocks, buf, u64::from(slot));
                // SAFETY: as for the read; the buffer holds the read's
                // bytes and nobody changes it until this write completes.
                match unsafe { channel.submit(req) } {
                    Ok(()) => {
                        self.ready.pop_front();
                        self.slots[slot as usize].1 = Phase::Writing;
                    }
                    Err(SubmitError::Busy) => break,
                    Err(SubmitError::Invalid(e)) => {
                        self.ready.pop_front();
                        self.release(slot, &mut in_use);
                        Self::record(report, leaves, dst_index, &item, CopyFailure::Write(e));
                    }
                }
            }
            if in_use == 0 && next >= items.len() {
                return Ok(());
            }
            // Harvest.
            for leaf_index in 0..leaves.len() {
                let Some(channel) = leaves[leaf_index].io.as_mut() else {
                    continue;
                };
                if channel.outstanding() == 0 {
                    continue;
                }
                let got = channel.poll(&mut self.completions);
                for i in 0..got {
                    let Completion { ctx, result } = self.completions[i];
                    let Some(&(item, phase)) =
                        usize::try_from(ctx).ok().and_then(|s| self.slots.get(s))
                    else {
                        warn!(ctx, "completion for an unknown bounce slot; ignored");
                        continue;
                    };
                    let slot = ctx as u32;
                    match (phase, result) {
                        (Phase::Reading, Ok(())) => {
                            reading -= 1;
                            self.slots[slot as usize].1 = Phase::Read;
                            self.ready.push_back(slot);
                        }
                        (Phase::Reading, Err(e)) => {
                            if let Some(retry) = retry.filter(|_| !item.retried)
                                && self.retry_read(leaves, retry, slot, item, block_size)
                            {
                                warn!(error = %e, "source read failed; reading through the source again");
                                continue;
                            }
                            reading -= 1;
                            self.release(slot, &mut in_use);
                            Self::record(report, leaves, dst_index, &item, CopyFailure::Read(e));
                        }
                        (Phase::Writing, Ok(())) => {
                            self.release(slot, &mut in_use);
                            let stats = report.method_mut(method);
                            stats.bytes += item.blocks * block_size;
                            stats.commands += 1;
                            stats.pieces += u64::from(item.new_piece);
                        }
                        (Phase::Writing, Err(e)) => {
                            self.release(slot, &mut in_use);
                            Self::record(report, leaves, dst_index, &item, CopyFailure::Write(e));
                        }
                        (phase, _) => {
                            warn!(
                                ctx,
                                ?phase,
                                "completion for a bounce slot not in flight; ignored"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Reads `item` again into `slot` through the source root; false if
    /// the read could not be started.
    fn retry_read(
        &mut self,
        leaves: &mut [Leaf],
        retry: &Retry<'_>,
        slot: u32,
        item: Item,
        block_size: u64,
    ) -> bool {
        let bytes = (item.blocks * block_size) as usize;
        let Some(buf) = self.buffers[slot as usize].dma_slice().sub(0, bytes) else {
            return false;
        };
        let Some(channel) = leaves[retry.leaf as usize].io.as_mut() else {
            return false;
        };
        let req = IoRequest::read(
            retry.index.lba(item.logical),
            item.blocks,
            buf,
            u64::from(slot),
        );
        // SAFETY: as for the first read: the buffer is this bouncer's and
        // untouched until this read's completion is harvested.
        match unsafe { channel.submit(req) } {
            Ok(()) => {
                self.slots[slot as usize].0.retried = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Waits until no I/O is in flight into the buffers, discarding the
    /// completions: only for leaving `run` early.
    fn drain(&mut self, leaves: &mut [Leaf]) {
        loop {
            let mut busy = false;
            for leaf in leaves.iter_mut() {
                if let Some(channel) = leaf.io.as_mut().filter(|c| c.outstanding() > 0) {
                    busy = true;
                    channel.poll(&mut self.completions);
                }
            }
            if !busy {
                break;
            }
        }
        self.ready.clear();
        self.free.clear();
        self.free.extend((0..self.slots.len() as u32).rev());
        for slot in &mut self.slots {
            slot.1 = Phase::Free;
        }
    }

    fn release(&mut self, slot: u32, in_use: &mut usize) {
        self.slots[slot as usize].1 = Phase::Free;
        self.free.push(slot);
        *in_use -= 1;
    }
}
