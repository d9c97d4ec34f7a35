//! A safe face for channels: buffers are moved into the channel at
//! submission and handed back with their completion, so the type system
//! keeps them alive and unaliased while a device owns them.

use crate::buffer::DmaMemory;
use crate::device::{BlockDevice, Channel, Completion, IoOp, IoRequest, SubmitError};
use crate::error::{BdevError, IoError, IoErrorKind};

/// A refused submission, with the buffer given back.
#[derive(Debug)]
pub struct Rejected<B> {
    /// Why.
    pub error: SubmitError,
    /// The buffer, untouched.
    pub buf: Option<B>,
}

/// A [`Channel`] that owns the buffers of its requests while they run.
pub struct OwnedChannel<B: DmaMemory> {
    inner: Box<dyn Channel>,
    block_size: u64,
    slots: Vec<Option<(u64, Option<B>)>>,
    free: Vec<u32>,
    scratch: Vec<Completion>,
}

impl<B: DmaMemory> OwnedChannel<B> {
    /// Opens a channel to `device` for `depth` requests in flight.
    pub fn open(device: &dyn BlockDevice, depth: usize) -> Result<OwnedChannel<B>, BdevError> {
        let depth = depth.max(1);
        let mut slots = Vec::with_capacity(depth);
        slots.resize_with(depth, || None);
        Ok(OwnedChannel {
            inner: device.open_channel(depth)?,
            block_size: u64::from(device.info().block_size),
            slots,
            free: (0..depth as u32).rev().collect(),
            scratch: vec![Completion::EMPTY; depth],
        })
    }

    /// Reads `blocks` blocks at `lba` into the start of `buf`.
    pub fn read(&mut self, lba: u64, blocks: u64, buf: B, ctx: u64) -> Result<(), Rejected<B>> {
        self.submit(IoOp::Read, lba, blocks, Some(buf), ctx)
    }

    /// Writes `blocks` blocks at `lba` from the start of `buf`.
    pub fn write(&mut self, lba: u64, blocks: u64, buf: B, ctx: u64) -> Result<(), Rejected<B>> {
        self.submit(IoOp::Write, lba, blocks, Some(buf), ctx)
    }

    /// Submits `op`; `buf` is required for reads and writes, and ignored
    /// (given back at completion) otherwise.
    pub fn submit(
        &mut self,
        op: IoOp,
        lba: u64,
        blocks: u64,
        mut buf: Option<B>,
        ctx: u64,
    ) -> Result<(), Rejected<B>> {
        let slice = if op.moves_data() {
            let wanted = blocks.saturating_mul(self.block_size);
            let whole = buf.as_mut().map(|b| b.dma_slice());
            let Some(slice) = whole.and_then(|w| w.sub(0, usize::try_from(wanted).ok()?)) else {
                let error = SubmitError::Invalid(IoError {
                    device: self.inner.device(),
                    op,
                    lba,
                    blocks,
                    kind: IoErrorKind::BufferLength {
                        buffer_bytes: whole.map_or(0, |w| w.len()),
                        transfer_bytes: wanted,
                    },
                });
                return Err(Rejected { error, buf });
            };
            slice
        } else {
            crate::buffer::DmaSlice::EMPTY
        };
        let Some(slot) = self.free.pop() else {
            return Err(Rejected {
                error: SubmitError::Busy,
                buf,
            });
        };
        let req = IoRequest {
            op,
            lba,
            blocks,
            buf: slice,
            ctx: u64::from(slot),
        };
        // SAFETY: on success the buffer moves into `slots` and stays there,
        // untouched (we never hand out access to it), until its completion
        // is harvested in `poll`; moving a DmaMemory does not move the
        // memory it owns.
        match unsafe { self.inner.submit(req) } {
            Ok(()) => {
                self.slots[slot as usize] = Some((ctx, buf));
                Ok(())
            }
            Err(error) => {
                self.free.push(slot);
                Err(Rejected { error, buf })
            }
        }
    }

    /// Harvests up to `max` completions, calling `done(ctx, result, buf)`
    /// for each; returns how many.
    pub fn poll(
        &mut self,
        max: usize,
        mut done: impl FnMut(u64, Result<(), IoError>, Option<B>),
    ) -> usize {
        let max = max.min(self.scratch.len());
        let n = self.inner.poll(&mut self.scratch[..max]);
        for completion in &self.scratch[..n] {
            let Some(slot) = usize::try_from(completion.ctx)
                .ok()
                .and_then(|i| self.slots.get_mut(i))
            else {
                continue;
            };
            if let Some((ctx, buf)) = slot.take() {
                self.free.push(completion.ctx as u32);
                done(ctx, completion.result, buf);
            }
        }
        n
    }

    /// Requests in flight.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl<B: DmaMemory> Drop for OwnedChannel<B> {
    fn drop(&mut self) {
        // A device may still write buffers of requests in flight: leaking
        // them is the only safe thing left to do with them.
        let mut leaked = 0;
        for slot in &mut self.slots {
            if let Some((_, Some(buf))) = slot.take() {
                std::mem::forget(buf);
                leaked += 1;
            }
        }
        if leaked > 0 {
            tracing::warn!(leaked, "channel dropped with I/O in flight; buffers leaked");
        }
    }
}
