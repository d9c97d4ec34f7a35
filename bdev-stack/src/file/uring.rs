//! The io_uring engine: a ring per channel, reads, writes and flushes in
//! flight together, short transfers continued, completions reaped without
//! blocking.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types};

use super::sync::Zeroing;
use crate::device::{
    Channel, Completion, DeviceId, DeviceInfo, IoOp, IoRequest, NotSync, SubmitError,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::registered::RegisteredMemory;
use crate::uring::Ring;

/// What a channel remembers of a request while the kernel has it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    ctx: u64,
    op: IoOp,
    lba: u64,
    blocks: u64,
    /// The request's buffer and its length in bytes.
    ptr: *mut u8,
    len: u64,
    /// Bytes transferred so far (short transfers continue from here).
    done: u64,
    /// The registered buffer the data lies in.
    fixed: Option<u16>,
    /// Accepted and not yet handed back.
    busy: bool,
}

// SAFETY: the pointer names the buffer the submit contract hands the
// channel until completion; the channel moves between threads with it.
unsafe impl Send for Slot {}

/// The io_uring channel of a file leaf.
pub(super) struct UringChannel {
    info: DeviceInfo,
    file: Arc<File>,
    ring: Ring<squeue::Entry, cqueue::Entry>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Continuations of short transfers the ring had no room for.
    resume: VecDeque<u32>,
    /// Write zeroes and deallocations accepted, to be performed at the
    /// next poll (synchronously: rare, and not the data path).
    zero_pending: VecDeque<u32>,
    /// Finished requests not yet handed out, with their outcome; their
    /// slots stay taken until then.
    ready: VecDeque<(u32, Result<(), IoErrorKind>)>,
    zeroing: Zeroing,
    /// The leaf's registered memory, when this ring registered it.
    registered: Option<Arc<RegisteredMemory>>,
    _not_sync: NotSync,
}

impl UringChannel {
    pub(super) fn new(
        info: DeviceInfo,
        file: Arc<File>,
        depth: usize,
        registered: Option<Arc<RegisteredMemory>>,
    ) -> Result<UringChannel, BdevError> {
        let mut ring = Ring::new(&info.name, depth, depth, false)?;
        let registered = registered.filter(|memory| ring.register(&info.name, memory));
        let empty = Slot {
            ctx: 0,
            op: IoOp::Read,
            lba: 0,
            blocks: 0,
            ptr: std::ptr::null_mut(),
            len: 0,
            done: 0,
            fixed: None,
            busy: false,
        };
        Ok(UringChannel {
            zeroing: Zeroing::new(&info)?,
            info,
            file,
            ring,
            slots: vec![empty; depth],
            free: (0..depth as u32).rev().collect(),
            resume: VecDeque::with_capacity(depth),
            zero_pending: VecDeque::with_capacity(depth),
            ready: VecDeque::with_capacity(depth),
            registered,
            _not_sync: NotSync::default(),
        })
    }

    /// The entry that moves the rest of slot `index`'s transfer.
    fn entry(&self, index: u32) -> squeue::Entry {
        let slot = &self.slots[index as usize];
        let fd = types::Fd(self.file.as_raw_fd());
        let offset = slot.lba * u64::from(self.info.block_size) + slot.done;
        // SAFETY: `done <= len`, inside the request's buffer.
        let ptr = unsafe { slot.ptr.add(slot.done as usize) };
        let left = (slot.len - slot.done) as u32;
        let entry = match (slot.op, slot.fixed) {
            (IoOp::Read, Some(index)) => opcode::ReadFixed::new(fd, ptr, left, index)
                .offset(offset)
                .build(),
            (IoOp::Write, Some(index)) => opcode::WriteFixed::new(fd, ptr, left, index)
                .offset(offset)
                .build(),
            (IoOp::Read, None) => opcode::Read::new(fd, ptr, left).offset(offset).build(),
            (IoOp::Write, None) => opcode::Write::new(fd, ptr, left).offset(offset).build(),
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(u64::from(index))
    }

    fn finish(&mut self, index: u32, result: Result<(), IoErrorKind>) -> Completion {
        let slot = self.slots[index as usize];
        self.free.push(index);
        Completion {
            ctx: slot.ctx,
            result: result.map_err(|kind| IoError {
                device: self.info.id,
                op: slot.op,
                lba: slot.lba,
                blocks: slot.blocks,
                kind,
            }),
        }
    }
}

impl Channel for UringChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        let zeroing = matches!(req.op, IoOp::WriteZeroes | IoOp::Deallocate);
        if self.free.is_empty() || (!zeroing && !self.ring.reserve(1)) {
            return Err(SubmitError::Busy);
        }
        let Some(index) = self.free.pop() else {
            return Err(SubmitError::Busy);
        };
        let bs = u64::from(self.info.block_size);
        self.slots[index as usize] = Slot {
            ctx: req.ctx,
            op: req.op,
            lba: req.lba,
            blocks: req.blocks,
            ptr: req.buf.host_ptr(),
            len: if req.op.moves_data() {
                req.blocks * bs
            } else {
                0
            },
            done: 0,
            fixed: self
                .registered
                .as_ref()
                .and_then(|memory| memory.fixed_index(&req.buf)),
            busy: true,
        };
        if zeroing {
            // Performed at the next poll: submission never blocks.
            self.zero_pending.push_back(index);
            return Ok(());
        }
        let entry = self.entry(index);
        // SAFETY: the buffer stays the channel's until `poll` returns the
        // completion (the contract of `submit`); room was reserved.
        unsafe { self.ring.push(&entry) };
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let bs = u64::from(self.info.block_size);
        let fd = self.file.as_raw_fd();
        while let Some(index) = self.zero_pending.pop_front() {
            let slot = self.slots[index as usize];
            let result = self
                .zeroing
                .perform(fd, slot.op, slot.lba * bs, slot.blocks * bs);
            self.slots[index as usize].busy = false;
            self.ready.push_back((index, result));
        }
        // Continuations first, while there is room on the ring.
        while let Some(&index) = self.resume.front() {
            let entry = self.entry(index);
            // SAFETY: as at submission: the slot's buffer is still ours.
            if !unsafe { self.ring.push(&entry) } {
                break;
            }
            self.resume.pop_front();
        }
        let mut reaped = [(0u64, 0i32); 64];
        loop {
            let mut count = 0;
            self.ring.reap(reaped.len(), |user_data, result, _| {
                reaped[count] = (user_data, result);
                count += 1;
            });
            for &(user_data, result) in &reaped[..count] {
                let index = user_data as u32;
                let Some(slot) = self.slots.get_mut(index as usize) else {
                    continue;
                };
                if !slot.busy {
                    // Not ours to complete (a completion the kernel should
                    // not have sent): completing it would free a slot twice.
                    continue;
                }
                let outcome = if result < 0 {
                    Err(IoErrorKind::Os { errno: -result })
                } else if slot.len == 0 {
                    Ok(())
                } else if result == 0 {
                    // Past the end of a file that shrank under us.
                    Err(IoErrorKind::Medium)
                } else {
                    slot.done += result as u64;
                    if slot.done < slot.len {
                        self.resume.push_back(index);
                        continue;
                    }
                    Ok(())
                };
                slot.busy = false;
                self.ready.push_back((index, outcome));
            }
            if count < reaped.len() {
                break;
            }
        }
        let mut n = 0;
        while n < out.len() {
            let Some((index, outcome)) = self.ready.pop_front() else {
                break;
            };
            out[n] = self.finish(index, outcome);
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Drop for UringChannel {
    fn drop(&mut self) {
        // The kernel may still move data into buffers of requests in
        // flight: wait for them.
        self.ring.drain(|_, _, _| {});
    }
}
