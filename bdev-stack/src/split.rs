//! Splitting, done once for every virtual device that maps ranges onto
//! members: concat and stripe are a [`Layout`] each, and [`SplitDevice`]
//! turns a layout into a device whose channels split requests at member,
//! chunk and member-max-transfer boundaries.
//!
//! A parent request lives in a slot of a pool sized at `open_channel`. It is
//! split lazily: a cursor walks the range, submitting one child per run to
//! the member's channel, whose context is the parent's slot. When a member
//! is busy the parent waits in a queue (one entry per parent, so it cannot
//! overflow) and resumes at its cursor on the next poll. The parent
//! completes when its cursor is at the end and no child is outstanding,
//! with the first error any child reported.
//!
//! Most requests fit one member whole (inside one chunk, within the
//! member's largest transfer): those take the direct path. They still hold
//! a slot (so the channel's depth bounds them), but only the caller's
//! context is kept; the child's context is the slot tagged [`DIRECT`], and
//! its completion is rewritten in place in the caller's array. A direct
//! request the member does not take (busy, refused) falls back to the split
//! path. `poll` harvests only members with children outstanding, straight
//! into the caller's array, starting from a rotating member.

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::debug;

use crate::buffer::{DmaContextId, DmaSlice};
use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, SupportedOps, check_map_range, common_block_size,
};
use crate::error::{BdevError, IoError};
use crate::hold::WriteHolds;
use crate::pool::Slab;

/// How a virtual device lays its blocks out over its members.
pub trait Layout: Send + Sync + 'static {
    /// The device kind this layout makes.
    const KIND: DeviceKind;

    /// Where the first run of `[lba, lba + blocks)` lives: `(member index,
    /// member lba, run length)`, with `1 <= run <= blocks`. `blocks > 0` and
    /// the range lies inside the device.
    fn locate(&self, lba: u64, blocks: u64) -> (usize, u64, u64);

    /// Blocks of the device.
    fn block_count(&self) -> u64;

    /// Requests inside a multiple of this perform best (0: no preference).
    fn optimal_boundary(&self) -> u64;
}

/// Members end to end, like dm-linear or SPDK's concat.
#[derive(Debug)]
pub struct ConcatLayout {
    /// First block of each member, then the total.
    starts: Vec<u64>,
}

impl Layout for ConcatLayout {
    const KIND: DeviceKind = DeviceKind::Concat;

    fn locate(&self, lba: u64, blocks: u64) -> (usize, u64, u64) {
        // starts[0] == 0 <= lba, so the partition point is at least 1.
        let member = self.starts.partition_point(|&start| start <= lba) - 1;
        let member_end = self.starts[member + 1];
        (
            member,
            lba - self.starts[member],
            blocks.min(member_end - lba),
        )
    }

    fn block_count(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    fn optimal_boundary(&self) -> u64 {
        0
    }
}

/// Members interleaved in chunks, like dm-stripe or RAID 0.
#[derive(Debug)]
pub struct StripeLayout {
    chunk_blocks: u64,
    members: u64,
    member_blocks: u64,
}

impl Layout for StripeLayout {
    const KIND: DeviceKind = DeviceKind::Stripe;

    #[inline]
    fn locate(&self, lba: u64, blocks: u64) -> (usize, u64, u64) {
        // Every request goes through here: shifts and masks where the
        // chunk and member count are powers of two (the common case), a
        // 64-bit division costs tens of cycles.
        let (chunk, within) = if self.chunk_blocks.is_power_of_two() {
            let shift = self.chunk_blocks.trailing_zeros();
            (lba >> shift, lba & (self.chunk_blocks - 1))
        } else {
            (lba / self.chunk_blocks, lba % self.chunk_blocks)
        };
        let (row, member) = if self.members.is_power_of_two() {
            let shift = self.members.trailing_zeros();
            (chunk >> shift, chunk & (self.members - 1))
        } else {
            (chunk / self.members, chunk % self.members)
        };
        let member_lba = row * self.chunk_blocks + within;
        (
            member as usize,
            member_lba,
            blocks.min(self.chunk_blocks - within),
        )
    }

    fn block_count(&self) -> u64 {
        self.member_blocks * self.members
    }

    fn optimal_boundary(&self) -> u64 {
        self.chunk_blocks
    }
}

/// A virtual device that maps each block to one member through a [`Layout`].
pub struct SplitDevice<L: Layout> {
    info: DeviceInfo,
    members: Vec<Arc<dyn BlockDevice>>,
    layout: Arc<L>,
}

/// Members end to end.
pub type Concat = SplitDevice<ConcatLayout>;
/// Members interleaved in chunks.
pub type Stripe = SplitDevice<StripeLayout>;

fn member_names(members: &[Arc<dyn BlockDevice>]) -> String {
    members
        .iter()
        .map(|m| m.info().name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl SplitDevice<ConcatLayout> {
    /// Concatenates `members` (at least one) in order.
    pub fn new(members: Vec<Arc<dyn BlockDevice>>) -> Result<Concat, BdevError> {
        if members.is_empty() {
            return Err(BdevError::TooFewMembers {
                device: "concat",
                min: 1,
                got: 0,
            });
        }
        let name = format!("concat({})", member_names(&members));
        common_block_size(&name, &members)?;
        let mut starts = Vec::with_capacity(members.len() + 1);
        let mut next = 0u64;
        for member in &members {
            starts.push(next);
            next = next.checked_add(member.info().block_count).ok_or_else(|| {
                BdevError::InvalidParameter {
                    device: name.clone(),
                    parameter: "members",
                    reason: "total size overflows".into(),
                }
            })?;
        }
        starts.push(next);
        Ok(SplitDevice::assemble(
            name,
            members,
            ConcatLayout { starts },
        ))
    }
}

impl SplitDevice<StripeLayout> {
    /// Stripes over `members` (at least two) in chunks of `chunk_blocks`.
    /// Each member contributes its size rounded down to whole chunks of the
    /// smallest member.
    pub fn new(members: Vec<Arc<dyn BlockDevice>>, chunk_blocks: u64) -> Result<Stripe, BdevError> {
        if members.len() < 2 {
            return Err(BdevError::TooFewMembers {
                device: "stripe",
                min: 2,
                got: members.len(),
            });
        }
        let name = format!("stripe({})", member_names(&members));
        common_block_size(&name, &members)?;
        let smallest = members
            .iter()
            .map(|m| m.info().block_count)
            .min()
            .unwrap_or(0);
        if chunk_blocks == 0 || chunk_blocks > smallest {
            return Err(BdevError::InvalidParameter {
                device: name,
                parameter: "chunk",
                reason: format!(
                    "{chunk_blocks} blocks; must be 1..={smallest} (the smallest member)"
                ),
            });
        }
        let layout = StripeLayout {
            chunk_blocks,
            members: members.len() as u64,
            member_blocks: smallest / chunk_blocks * chunk_blocks,
        };
        Ok(SplitDevice::assemble(name, members, layout))
    }
}

impl<L: Layout> SplitDevice<L> {
    fn assemble(name: String, members: Vec<Arc<dyn BlockDevice>>, layout: L) -> SplitDevice<L> {
        let first = members[0].info();
        let ops = members
            .iter()
            .fold(SupportedOps::all(), |ops, m| ops & m.info().ops);
        let buf_align = members
            .iter()
            .map(|m| m.info().buf_align)
            .max()
            .unwrap_or(1);
        let members_need_iova = members.iter().any(|m| m.info().needs_iova);
        SplitDevice {
            info: DeviceInfo {
                id: DeviceId::fresh(),
                name,
                kind: L::KIND,
                block_size: first.block_size,
                block_count: layout.block_count(),
                max_transfer_blocks: u64::MAX,
                buf_align,
                needs_iova: members_need_iova,
                dma_context: crate::device::shared_dma_context(&members),
                optimal_boundary_blocks: layout.optimal_boundary(),
                ops,
                copy_offloads: Vec::new(),
            },
            members,
            layout: Arc::new(layout),
        }
    }

    /// The layout.
    pub fn layout(&self) -> &L {
        &self.layout
    }
}

impl<L: Layout> BlockDevice for SplitDevice<L> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let depth = depth.max(1);
        // A parent may put several children on one member (chunks, max
        // transfer); give members room for a few each, and let Busy pace
        // the rest.
        let member_depth = depth.saturating_mul(4);
        let mut members = Vec::with_capacity(self.members.len());
        for member in &self.members {
            members.push(Member {
                channel: member.open_channel(member_depth)?,
                max_blocks: member.info().max_transfer_blocks.max(1),
                outstanding: 0,
            });
        }
        Ok(Box::new(SplitChannel {
            info: self.info.clone(),
            layout: Arc::clone(&self.layout),
            members,
            next_member: 0,
            parents: Slab::new(depth),
            direct: vec![Direct::default(); depth],
            stalled: VecDeque::with_capacity(depth),
            done: VecDeque::with_capacity(depth),
            scratch: vec![Completion::EMPTY; member_depth.min(256)],
            quick: QuickCheck::new(&self.info),
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.members.clone()
    }

    fn hold_copy_writes(
        &self,
        lba: u64,
        blocks: u64,
        holds: &mut WriteHolds,
    ) -> Result<bool, IoError> {
        check_map_range(&self.info, lba, blocks, Access::Write)?;
        // Per member, the span of its blocks the range touches: holding
        // the span (a superset for a stripe) is one call per member, not
        // one per chunk.
        let mut spans: Vec<Option<(u64, u64)>> = vec![None; self.members.len()];
        let mut cursor = 0;
        while cursor < blocks {
            let (member, member_lba, run) = self.layout.locate(lba + cursor, blocks - cursor);
            let span = &mut spans[member];
            *span = Some(match *span {
                Some((start, end)) => (start.min(member_lba), end.max(member_lba + run)),
                None => (member_lba, member_lba + run),
            });
            cursor += run;
        }
        for (member, span) in spans.into_iter().enumerate() {
            if let Some((start, end)) = span
                && !self.members[member].hold_copy_writes(start, end - start, holds)?
            {
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
        let mut cursor = 0;
        while cursor < blocks {
            let here = lba + cursor;
            let (member, member_lba, run) = self.layout.locate(here, blocks - cursor);
            let first_new = out.len();
            self.members[member].map(member_lba, run, access, out)?;
            // The member reported in its own block numbers: move them to ours.
            for fragment in &mut out[first_new..] {
                fragment.lba = fragment.lba - member_lba + here;
            }
            cursor += run;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Parent {
    ctx: u64,
    op: Option<IoOp>,
    lba: u64,
    blocks: u64,
    buf: Option<DmaSlice>,
    /// Blocks (or, for flush, members) already handed to members.
    cursor: u64,
    /// Where the cursor stops: `blocks`, or the member count for flush.
    end: u64,
    outstanding: u32,
    error: Option<IoError>,
}

/// A member's channel, with what the split path needs of it at hand.
struct Member {
    channel: Box<dyn Channel>,
    /// The member's largest transfer, in blocks (at least 1).
    max_blocks: u64,
    /// Children submitted to the member and not yet harvested from it:
    /// members with none are not polled.
    outstanding: u32,
}

/// A request that went to one member whole (the direct path): all the
/// channel keeps of it is the caller's context.
#[derive(Debug, Clone, Copy, Default)]
struct Direct {
    ctx: u64,
    busy: bool,
}

/// Marks a child context as a direct request's slot; split children carry
/// their parent's slot (a `u32`) as it is.
const DIRECT: u64 = 1 << 63;

struct SplitChannel<L: Layout> {
    info: DeviceInfo,
    layout: Arc<L>,
    members: Vec<Member>,
    /// The member `poll` harvests first, rotated so that a caller with a
    /// small completion array starves none.
    next_member: usize,
    /// Per-request slots: every accepted request holds one (so `depth`
    /// bounds requests in flight), split or direct. A split request keeps
    /// its state here.
    parents: Slab<Parent>,
    /// The direct-path state of each slot.
    direct: Vec<Direct>,
    /// Parents whose cursor stopped on a busy member.
    stalled: VecDeque<u32>,
    /// Parents finished and not yet returned by poll.
    done: VecDeque<u32>,
    /// Where members' completions go when the caller's array is full.
    scratch: Vec<Completion>,
    quick: QuickCheck,
    _not_sync: NotSync,
}

/// What [`DeviceInfo::validate`] checks of a read or write, precomputed
/// for the submit path: a request that passes is one `validate` accepts;
/// any other goes to `validate` for the verdict and the error.
#[derive(Debug, Clone, Copy)]
struct QuickCheck {
    read: bool,
    write: bool,
    block_count: u64,
    block_size: u64,
    max_transfer_blocks: u64,
    /// `buf_align - 1` (reads and writes are off when the alignment is not
    /// a power of two).
    align_mask: usize,
    needs_iova: bool,
    dma_context: Option<DmaContextId>,
}

impl QuickCheck {
    fn new(info: &DeviceInfo) -> QuickCheck {
        let pow2 = info.buf_align.is_power_of_two();
        QuickCheck {
            read: pow2 && info.ops.contains(SupportedOps::READ),
            write: pow2 && info.ops.contains(SupportedOps::WRITE),
            block_count: info.block_count,
            block_size: u64::from(info.block_size),
            max_transfer_blocks: info.max_transfer_blocks,
            align_mask: info.buf_align.wrapping_sub(1),
            needs_iova: info.needs_iova,
            dma_context: info.dma_context,
        }
    }

    /// True when `req` is a read or write `validate` accepts; false says
    /// nothing.
    #[inline]
    fn passes(&self, req: &IoRequest) -> bool {
        let op = match req.op {
            IoOp::Read => self.read,
            IoOp::Write => self.write,
            _ => false,
        };
        op && req.blocks != 0
            && req
                .lba
                .checked_add(req.blocks)
                .is_some_and(|end| end <= self.block_count)
            && req.blocks <= self.max_transfer_blocks
            && req
                .blocks
                .checked_mul(self.block_size)
                .is_some_and(|bytes| bytes == req.buf.len() as u64)
            && (req.buf.host_ptr() as usize) & self.align_mask == 0
            && (!self.needs_iova
                || req
                    .buf
                    .dma_context()
                    .is_some_and(|c| self.dma_context.is_none_or(|d| d == c)))
    }
}

impl<L: Layout> SplitChannel<L> {
    /// Hands the parent's remaining runs to members until done or a member
    /// is busy.
    fn dispatch(&mut self, slot: u32) {
        let bs = u64::from(self.info.block_size);
        loop {
            let parent = self.parents.at(slot);
            if parent.cursor >= parent.end {
                break;
            }
            let Some(op) = parent.op else { break };
            let (member, child) = if op == IoOp::Flush {
                let member = parent.cursor as usize;
                (member, IoRequest::no_data(op, 0, 0, u64::from(slot)))
            } else {
                let here = parent.lba + parent.cursor;
                let (member, member_lba, run) =
                    self.layout.locate(here, parent.blocks - parent.cursor);
                let run = run.min(self.members[member].max_blocks);
                let buf = match parent.buf {
                    Some(buf) => buf
                        .sub((parent.cursor * bs) as usize, (run * bs) as usize)
                        .unwrap_or(DmaSlice::EMPTY),
                    None => DmaSlice::EMPTY,
                };
                let child = IoRequest {
                    op,
                    lba: member_lba,
                    blocks: run,
                    buf,
                    ctx: u64::from(slot),
                };
                (member, child)
            };
            let advance = if op == IoOp::Flush { 1 } else { child.blocks };
            // SAFETY: the child's buffer is a sub-run of the parent's, which
            // our caller's submit contract keeps valid until the parent
            // completes, and the parent outlives its children.
            match unsafe { self.members[member].channel.submit(child) } {
                Ok(()) => {
                    self.members[member].outstanding += 1;
                    let parent = self.parents.at(slot);
                    parent.outstanding += 1;
                    parent.cursor += advance;
                }
                Err(SubmitError::Busy) => {
                    self.stalled.push_back(slot);
                    return;
                }
                Err(SubmitError::Invalid(error)) => {
                    // Validated at the parent, so a member refusing its
                    // part is a member limit we did not know; fail the part.
                    debug!(%error, "member refused a child request");
                    let parent = self.parents.at(slot);
                    parent.error.get_or_insert(error);
                    parent.cursor += advance;
                }
            }
        }
        self.finish_if_done(slot);
    }

    fn finish_if_done(&mut self, slot: u32) {
        let parent = self.parents.at(slot);
        if parent.cursor >= parent.end && parent.outstanding == 0 {
            self.done.push_back(slot);
        }
    }

    fn child_done(&mut self, completion: Completion) {
        let Some(parent) = self.parents.get_mut(completion.ctx) else {
            debug!(ctx = completion.ctx, "completion for an unknown parent");
            return;
        };
        if parent.outstanding == 0 {
            debug!(ctx = completion.ctx, "completion for an idle parent");
            return;
        }
        parent.outstanding -= 1;
        if let Err(error) = completion.result {
            parent.error.get_or_insert(error);
        }
        // Indices from get_mut fit u32: they came from our slab.
        self.finish_if_done(completion.ctx as u32);
    }

    /// Tries to hand `req` (validated, not a flush) to one member whole,
    /// under `slot`. False when it spans members, chunks or the member's
    /// largest transfer, or the member did not take it: the caller splits.
    #[inline]
    fn submit_direct(&mut self, req: &IoRequest, slot: u32) -> bool {
        let (member, member_lba, run) = self.layout.locate(req.lba, req.blocks);
        let m = &mut self.members[member];
        if run != req.blocks || run > m.max_blocks {
            return false;
        }
        let child = IoRequest {
            op: req.op,
            lba: member_lba,
            blocks: run,
            buf: if req.op.moves_data() {
                req.buf
            } else {
                DmaSlice::EMPTY
            },
            ctx: u64::from(slot) | DIRECT,
        };
        // SAFETY: the child is the caller's request moved onto the member,
        // with the caller's buffer, whose submit contract holds until the
        // completion is returned by our poll, which comes after the
        // member's.
        if unsafe { m.channel.submit(child) }.is_err() {
            // Busy or refused: the split path retries, stalls on Busy and
            // fails the request on a refusal, as for any child.
            return false;
        }
        m.outstanding += 1;
        self.direct[slot as usize] = Direct {
            ctx: req.ctx,
            busy: true,
        };
        true
    }

    /// Ends the direct request whose child context is `ctx`, returning the
    /// caller's context; `None` (logged) for a context that names no
    /// direct request in flight.
    #[inline]
    fn direct_done(&mut self, ctx: u64) -> Option<(u32, u64)> {
        let slot = ctx & !DIRECT;
        match usize::try_from(slot)
            .ok()
            .and_then(|i| self.direct.get_mut(i))
        {
            Some(direct) if direct.busy => {
                direct.busy = false;
                // Slots fit u32: `direct` has one entry per slab slot.
                Some((slot as u32, direct.ctx))
            }
            _ => {
                debug!(ctx, "completion for an unknown direct request");
                None
            }
        }
    }

    /// Returns finished parents into `out` from `n` on; the new count.
    fn emit_done(&mut self, out: &mut [Completion], n: usize) -> usize {
        self.parents.emit(&mut self.done, out, n, |parent| {
            parent.op = None;
            Completion {
                ctx: parent.ctx,
                result: parent.error.map_or(Ok(()), Err),
            }
        })
    }

    /// Harvests member `index` into `out` from `n` on: direct completions
    /// are rewritten in place to the caller's context, split children are
    /// taken out and counted against their parents. The new count.
    fn harvest_into(&mut self, index: usize, out: &mut [Completion], n: usize) -> usize {
        let m = &mut self.members[index];
        let got = m.channel.poll(&mut out[n..]);
        m.outstanding = m.outstanding.saturating_sub(got as u32);
        let mut kept = n;
        for i in n..n + got {
            let ctx = out[i].ctx;
            if ctx & DIRECT != 0 {
                if let Some((slot, caller_ctx)) = self.direct_done(ctx) {
                    self.parents.put(slot);
                    if kept != i {
                        out[kept] = out[i];
                    }
                    out[kept].ctx = caller_ctx;
                    kept += 1;
                }
            } else {
                self.child_done(out[i]);
            }
        }
        kept
    }

    /// Harvests member `index` into the scratch array (the caller's is
    /// full): direct completions wait in `done` like finished parents.
    fn harvest_to_scratch(&mut self, index: usize) {
        let m = &mut self.members[index];
        let got = m.channel.poll(&mut self.scratch);
        m.outstanding = m.outstanding.saturating_sub(got as u32);
        for i in 0..got {
            let completion = self.scratch[i];
            if completion.ctx & DIRECT != 0 {
                if let Some((slot, ctx)) = self.direct_done(completion.ctx) {
                    let parent = self.parents.at(slot);
                    parent.ctx = ctx;
                    parent.error = completion.result.err();
                    self.done.push_back(slot);
                }
            } else {
                self.child_done(completion);
            }
        }
    }
}

impl<L: Layout> Channel for SplitChannel<L> {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.quick.passes(&req) {
            debug_assert!(self.info.validate(&req).is_ok(), "{req:?}");
        } else {
            self.info.validate(&req).map_err(SubmitError::Invalid)?;
        }
        let slot = self.parents.take().ok_or(SubmitError::Busy)?;
        if req.op != IoOp::Flush && self.submit_direct(&req, slot) {
            return Ok(());
        }
        let end = if req.op == IoOp::Flush {
            self.members.len() as u64
        } else {
            req.blocks
        };
        *self.parents.at(slot) = Parent {
            ctx: req.ctx,
            op: Some(req.op),
            lba: req.lba,
            blocks: req.blocks,
            buf: req.op.moves_data().then_some(req.buf),
            cursor: 0,
            end,
            outstanding: 0,
            error: None,
        };
        self.dispatch(slot);
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        for _ in 0..self.stalled.len() {
            if let Some(slot) = self.stalled.pop_front() {
                self.dispatch(slot);
            }
        }
        let mut n = self.emit_done(out, 0);
        let count = self.members.len();
        let first = self.next_member;
        self.next_member = if first + 1 >= count { 0 } else { first + 1 };
        for k in 0..count {
            let index = if first + k >= count {
                first + k - count
            } else {
                first + k
            };
            if self.members[index].outstanding == 0 {
                continue;
            }
            if n < out.len() {
                n = self.harvest_into(index, out, n);
            } else {
                // Still poll (it rings the member's doorbell and moves its
                // queue along); what it returns waits in `done`.
                self.harvest_to_scratch(index);
            }
        }
        self.emit_done(out, n)
    }

    fn outstanding(&self) -> usize {
        self.parents.in_use()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{DmaMemory, HostBuffer};
    use crate::error::IoErrorKind;

    /// A member that holds at most `cap` requests (then Busy), completes
    /// them on the next poll, and fails those that start at `fail_lba`.
    struct Toy {
        info: DeviceInfo,
        cap: usize,
        fail_lba: u64,
    }

    struct ToyChannel {
        id: DeviceId,
        cap: usize,
        fail_lba: u64,
        held: VecDeque<Completion>,
    }

    impl Toy {
        fn device(blocks: u64, cap: usize, fail_lba: u64) -> Arc<dyn BlockDevice> {
            Arc::new(Toy {
                info: DeviceInfo {
                    id: DeviceId::fresh(),
                    name: "toy".into(),
                    kind: DeviceKind::Memory,
                    block_size: 512,
                    block_count: blocks,
                    max_transfer_blocks: 64,
                    buf_align: 1,
                    needs_iova: false,
                    dma_context: None,
                    optimal_boundary_blocks: 0,
                    ops: SupportedOps::all(),
                    copy_offloads: Vec::new(),
                },
                cap,
                fail_lba,
            })
        }
    }

    impl BlockDevice for Toy {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn open_channel(&self, _depth: usize) -> Result<Box<dyn Channel>, BdevError> {
            Ok(Box::new(ToyChannel {
                id: self.info.id,
                cap: self.cap,
                fail_lba: self.fail_lba,
                held: VecDeque::new(),
            }))
        }
        fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
            Vec::new()
        }
        fn map(&self, _: u64, _: u64, _: Access, _: &mut Vec<LeafFragment>) -> Result<(), IoError> {
            Ok(())
        }
    }

    impl Channel for ToyChannel {
        fn device(&self) -> DeviceId {
            self.id
        }
        unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
            if self.held.len() >= self.cap {
                return Err(SubmitError::Busy);
            }
            let result = if req.lba == self.fail_lba {
                Err(req.error(self.id, IoErrorKind::Medium))
            } else {
                Ok(())
            };
            self.held.push_back(Completion {
                ctx: req.ctx,
                result,
            });
            Ok(())
        }
        fn poll(&mut self, out: &mut [Completion]) -> usize {
            crate::device::drain_completions(&mut self.held, out)
        }
        fn outstanding(&self) -> usize {
            self.held.len()
        }
    }

    /// Submits reads of `(lba, blocks)` with ctx = index + 100, then polls
    /// with arrays of `sizes` (cycled) until all are back; returns the
    /// results by index.
    fn run(
        stripe: &Stripe,
        depth: usize,
        reads: &[(u64, u64)],
        sizes: &[usize],
    ) -> Vec<Result<(), IoError>> {
        let mut ch = stripe.open_channel(depth).expect("channel");
        let mut bufs: Vec<HostBuffer> = reads
            .iter()
            .map(|&(_, blocks)| HostBuffer::new(blocks as usize * 512).expect("buffer"))
            .collect();
        for (i, &(lba, blocks)) in reads.iter().enumerate() {
            let req = IoRequest::read(lba, blocks, bufs[i].dma_slice(), i as u64 + 100);
            // SAFETY: `bufs` outlives the channel's use: we poll until
            // every request is back before dropping them.
            unsafe { ch.submit(req) }.expect("accepted");
        }
        assert_eq!(ch.outstanding(), reads.len());
        let mut results = vec![None; reads.len()];
        let mut out = [Completion::EMPTY; 8];
        let mut round = 0;
        while ch.outstanding() > 0 {
            let size = sizes[round % sizes.len()];
            round += 1;
            assert!(round < 10_000, "requests never completed");
            let n = ch.poll(&mut out[..size]);
            for c in &out[..n] {
                let i = (c.ctx - 100) as usize;
                assert!(results[i].is_none(), "ctx {} completed twice", c.ctx);
                results[i] = Some(c.result);
            }
        }
        drop(bufs.drain(..));
        results.into_iter().map(|r| r.expect("completed")).collect()
    }

    fn stripe(cap: usize, fail_lba: u64) -> Stripe {
        // Two members, chunks of 8 blocks.
        Stripe::new(
            vec![
                Toy::device(1024, cap, fail_lba),
                Toy::device(1024, cap, fail_lba),
            ],
            8,
        )
        .expect("stripe")
    }

    #[test]
    fn direct_and_split_requests_complete_once_through_small_arrays() {
        let s = stripe(64, u64::MAX);
        // Inside one chunk (direct), across chunks, larger than the
        // members' 64-block transfer.
        let reads = [(0, 1), (8, 8), (3, 9), (17, 2), (40, 1), (0, 200), (9, 1)];
        for sizes in [&[1][..], &[0, 1, 0, 2], &[8]] {
            let results = run(&s, 8, &reads, sizes);
            assert!(results.iter().all(Result::is_ok), "{results:?}");
        }
    }

    #[test]
    fn a_busy_member_stalls_a_direct_request_until_polled() {
        // Members take one request at a time: the second and third read
        // on member 0 find it busy and wait in the split path.
        let s = stripe(1, u64::MAX);
        let results = run(&s, 4, &[(0, 1), (1, 1), (2, 4), (8, 1)], &[1, 0, 4]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    #[test]
    fn member_errors_reach_the_caller_with_its_context() {
        // Requests at member lba 8 fail: stripe lba 16 (member 0) and 24
        // (member 1), and the second child of a read of 12..20.
        let s = stripe(64, 8);
        let reads = [(16, 1), (17, 1), (12, 8), (24, 1), (25, 1), (4, 8)];
        let results = run(&s, 8, &reads, &[1, 8]);
        for i in [1, 4, 5] {
            assert!(results[i].is_ok(), "{i}: {results:?}");
        }
        for i in [0, 2, 3] {
            let e = results[i].expect_err("fails");
            assert_eq!((e.kind, e.lba), (IoErrorKind::Medium, 8), "{i}: {e:?}");
        }
    }

    #[test]
    fn the_quick_check_passes_only_what_validate_accepts() {
        let mut info = stripe(64, u64::MAX).info().clone();
        let mut buf = HostBuffer::new(64 * 512 + 8).expect("buffer");
        let whole = buf.dma_slice();
        let mut passed = 0;
        for align in [1, 4, 8, 3] {
            info.buf_align = align;
            let quick = QuickCheck::new(&info);
            for op in [IoOp::Read, IoOp::Write, IoOp::Flush, IoOp::WriteZeroes] {
                for lba in [0, 5, 2040, 2047, 2048, u64::MAX] {
                    for blocks in [0, 1, 8, 64] {
                        for (offset, len) in [(0, 512), (0, 4096), (1, 4096), (4, 512), (8, 0)] {
                            let buf = whole.sub(offset, len).expect("sub");
                            let req = IoRequest {
                                op,
                                lba,
                                blocks,
                                buf,
                                ctx: 0,
                            };
                            if quick.passes(&req) {
                                assert!(info.validate(&req).is_ok(), "{align} {req:?}");
                                passed += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(passed > 0);
    }
}
