//! The mirror's per-thread channel: requests split at region boundaries
//! and the legs' maximum transfer, writes fanned out to every leg that
//! takes writes (counted in the write-intent map, waiting while a resync
//! holds their region), reads spread over the healthy legs and retried on
//! the others.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{debug, warn};

use super::{FAILED, Shared};
use crate::buffer::DmaSlice;
use crate::device::{
    BlockDevice, Channel, Completion, DeviceId, DeviceInfo, IoOp, IoRequest, NotSync, SubmitError,
};
use crate::error::{IoError, IoErrorKind};
use crate::pool::Slab;

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
    /// Legs whose read gave a medium error: repaired once a leg reads.
    read_failed: u32,
    /// A repair write (rewriting a leg whose read failed), not a part of
    /// the parent's own operation.
    repair: bool,
    /// The dirty region a write holds a count in.
    region: Option<u64>,
}

pub(super) struct MirrorChannel {
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
    /// Polls since the write-intent log's clearing was last looked at.
    polls: u32,
    /// Where the legs' blocks start on the devices the channels go to
    /// (a member's data offset, with metadata).
    leg_offset: u64,
    _not_sync: NotSync,
}

impl MirrorChannel {
    /// A channel of `depth` requests over the mirror `shared` describes.
    pub(super) fn open(info: DeviceInfo, shared: Arc<Shared>, depth: usize) -> MirrorChannel {
        let depth = depth.max(1);
        let leg_count = shared.health.len();
        let leg_depth = depth.saturating_mul(4);
        let children = depth.saturating_mul(leg_count).saturating_mul(4).max(64);
        let mut channel = MirrorChannel {
            info,
            shared,
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
            polls: 0,
            leg_offset: 0,
            _not_sync: NotSync::default(),
        };
        channel.refresh_legs();
        channel
    }

    /// Reopens channels to legs whose device changed (leg replacement).
    /// Allocates, but only when a leg was replaced.
    fn refresh_legs(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let legs = self.shared.legs().clone();
        // With metadata, the legs are the members' data areas: talk to the
        // members themselves, at the data offset.
        let raw = self
            .shared
            .intent
            .as_ref()
            .map(|log| log.members_and_offset());
        self.leg_offset = raw.as_ref().map_or(0, |(_, offset)| *offset);
        for (leg, device) in legs.into_iter().enumerate() {
            let same = self
                .leg_devices
                .get(leg)
                .is_some_and(|old| std::ptr::addr_eq(Arc::as_ptr(old), Arc::as_ptr(&device)));
            if same {
                continue;
            }
            let target = raw
                .as_ref()
                .and_then(|(members, _)| members.get(leg))
                .unwrap_or(&device);
            let channel = match target.open_channel(self.leg_depth) {
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
                read_failed: 0,
                repair: false,
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
            let mut writable = self.shared.writable();
            let mut healthy = self.shared.readable();
            if writable == 0 {
                self.fail_part(slot, op, lba, run, advance);
                continue;
            }
            let mut fan_out = writable.count_ones();
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
                // With metadata, the region's bit is durable before the
                // write starts (counted first, so no clearing pass can
                // drop it meanwhile). A leg whose bitmap write failed is
                // failed, and gets no share of the write.
                if self.shared.ensure_intent(region, region) {
                    let now = self.shared.writable() & writable;
                    for _ in now.count_ones()..fan_out {
                        self.shared.dirty.end_write(region);
                    }
                    (writable, healthy, fan_out) = (now, self.shared.readable(), now.count_ones());
                    if writable == 0 {
                        self.fail_part(slot, op, lba, run, advance);
                        continue;
                    }
                }
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
            lba: child.lba + self.leg_offset,
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
                // A leg whose device is gone is failed on a read too: it
                // will take no writes, so it must serve no reads.
                if current && error.kind == IoErrorKind::DeviceRemoved {
                    self.shared.fail_leg(child.leg, &error);
                }
                // A medium error is repaired from a leg that reads; a leg
                // that keeps giving them is failed.
                let mut read_failed = child.read_failed;
                if current && error.kind == IoErrorKind::Medium {
                    read_failed |= 1 << child.leg;
                    let errors =
                        self.shared.read_errors[child.leg].fetch_add(1, Ordering::AcqRel) + 1;
                    if errors > super::READ_ERROR_LIMIT {
                        warn!(
                            leg = child.leg,
                            errors, "too many read errors; failing the leg"
                        );
                        self.shared.fail_leg(child.leg, &error);
                    }
                }
                let tried = child.tried | 1 << child.leg;
                let region = self.shared.dirty.region_of(child.lba);
                if let Some(leg) = self.next_readable(region, tried) {
                    debug!(%error, leg, "read failed; retrying on another leg");
                    self.shared.read_retries.fetch_add(1, Ordering::Relaxed);
                    let next = self.children.at(child_slot);
                    next.tried = tried;
                    next.read_failed = read_failed;
                    next.leg = leg;
                    next.generation = self.leg_generation[leg];
                    self.submit_child(child_slot);
                    return;
                }
                self.parents.at(child.parent).error.get_or_insert(error);
            } else if child.read_failed != 0 {
                self.repair(&child);
            }
        } else if child.repair {
            if let Some(region) = child.region {
                self.shared.dirty.end_write(region);
            }
            match result {
                Ok(()) => {
                    self.shared.read_repairs.fetch_add(1, Ordering::Relaxed);
                    debug!(leg = child.leg, lba = child.lba, "read error repaired");
                }
                // The leg could neither read nor take the data back.
                Err(error) if current => self.shared.fail_leg(child.leg, &error),
                Err(_) => {}
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

    /// Rewrites the blocks `read` has just read on every leg whose read of
    /// them gave a medium error, from the parent's buffer (md's read
    /// repair; the parent completes once the repairs have). Best effort:
    /// with no child slot free, or a resync holding the region, the
    /// repair waits for the next read there.
    fn repair(&mut self, read: &Child) {
        let region = self.shared.dirty.region_of(read.lba);
        let targets = read.read_failed & self.shared.readable();
        for leg in (0..self.leg_devices.len()).filter(|l| targets & (1 << l) != 0) {
            if self.children.available() == 0 || !self.shared.dirty.try_begin_writes(region, 1) {
                return;
            }
            self.shared.ensure_intent(region, region);
            let Some(slot) = self.children.take() else {
                self.shared.dirty.end_write(region);
                return;
            };
            *self.children.at(slot) = Child {
                leg,
                generation: self.leg_generation[leg],
                op: Some(IoOp::Write),
                tried: 0,
                read_failed: 0,
                repair: true,
                region: Some(region),
                ..*read
            };
            self.parents.at(read.parent).outstanding += 1;
            self.submit_child(slot);
        }
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
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(1024) {
            self.shared.clear_quiet_intent();
        }
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
        self.parents.emit(&mut self.done, out, 0, |parent| {
            parent.op = None;
            Completion {
                ctx: parent.ctx,
                result: parent.error.map_or(Ok(()), Err),
            }
        })
    }

    fn outstanding(&self) -> usize {
        self.parents.in_use()
    }
}
