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

use std::collections::VecDeque;
use std::sync::Arc;

use tracing::debug;

use crate::buffer::DmaSlice;
use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, SupportedOps, check_map_range, common_block_size,
};
use crate::error::{BdevError, IoError};
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
        let mut member_max = Vec::with_capacity(self.members.len());
        for member in &self.members {
            members.push(member.open_channel(member_depth)?);
            member_max.push(member.info().max_transfer_blocks.max(1));
        }
        Ok(Box::new(SplitChannel {
            info: self.info.clone(),
            layout: Arc::clone(&self.layout),
            members,
            member_max,
            parents: Slab::new(depth),
            stalled: VecDeque::with_capacity(depth),
            done: VecDeque::with_capacity(depth),
            scratch: vec![Completion::EMPTY; member_depth.min(256)],
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.members.clone()
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

struct SplitChannel<L: Layout> {
    info: DeviceInfo,
    layout: Arc<L>,
    members: Vec<Box<dyn Channel>>,
    member_max: Vec<u64>,
    parents: Slab<Parent>,
    /// Parents whose cursor stopped on a busy member.
    stalled: VecDeque<u32>,
    /// Parents finished and not yet returned by poll.
    done: VecDeque<u32>,
    scratch: Vec<Completion>,
    _not_sync: NotSync,
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
                let run = run.min(self.member_max[member]);
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
            match unsafe { self.members[member].submit(child) } {
                Ok(()) => {
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
}

impl<L: Layout> Channel for SplitChannel<L> {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        let slot = self.parents.take().ok_or(SubmitError::Busy)?;
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
        for member in 0..self.members.len() {
            let n = self.members[member].poll(&mut self.scratch);
            for i in 0..n {
                let completion = self.scratch[i];
                self.child_done(completion);
            }
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
