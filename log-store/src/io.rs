//! Synchronous, pipelined block I/O for the store: whole runs written or
//! read in transfers of up to the device's limit, several in flight,
//! through a fixed pool of DMA buffers allocated once.
//!
//! Waits are paced ([`copy_engine::wait`]): the store is a background
//! writer whose flushes and summary writes the device may take a while
//! over, so after a short spin the thread sleeps for as long as the device
//! took for work of the same kind and size before, on a timer armed
//! before the doorbell.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_stack::{BlockDevice, DmaAllocator, DmaMemory, IoError, IoOp, OwnedChannel, SubmitError};
use copy_engine::wait::{Pace, Wait, Waiter};

use crate::GcError;

/// Requests in flight.
const DEPTH: usize = 16;
/// Largest transfer, whatever the device allows (keeps the pool small).
const MAX_TRANSFER_BYTES: u64 = 256 << 10;
/// A request that has not completed by then is reported, not waited for.
const DEADLINE: Duration = Duration::from_secs(30);
/// Empty polls before a wait starts sleeping.
const SPIN_POLLS: u32 = 64;
/// Batches are paced apart by operation and by size class (the power of
/// two of their units: blocks, or one per flush).
const SIZE_CLASSES: usize = 24;

type Buffer = Box<dyn DmaMemory>;

/// An unused request context.
const FREE: (usize, usize) = (usize::MAX, 0);

/// The caller's side of a transfer.
enum Data<'a> {
    Write(&'a [u8]),
    Read(&'a mut [u8]),
    None,
}

impl Data<'_> {
    fn op(&self) -> IoOp {
        match self {
            Data::Write(_) => IoOp::Write,
            Data::Read(_) => IoOp::Read,
            Data::None => IoOp::Flush,
        }
    }

    fn len(&self) -> usize {
        match self {
            Data::Write(d) => d.len(),
            Data::Read(d) => d.len(),
            Data::None => 0,
        }
    }
}

/// One channel to the store's device and its buffers.
pub struct BlockIo {
    device: String,
    block_size: u64,
    max_blocks: u64,
    ch: OwnedChannel<Buffer>,
    free: Vec<Buffer>,
    /// Per request context: byte offset in the caller's slice and length
    /// while in flight, [`FREE`] otherwise.
    spans: Vec<(usize, usize)>,
    /// Per request context: issued by [`BlockIo::write_spans_background`].
    background: Vec<bool>,
    /// The first failure of a background write not yet reported.
    background_failure: Option<GcError>,
    /// The first failure of the requests in flight.
    failure: Option<GcError>,
    pacing: Pacing,
}

/// What the waits know of the device's pace.
struct Pacing {
    waiter: Waiter,
    /// Per operation (read, write, flush) and size class.
    paces: [[Pace; SIZE_CLASSES]; 3],
    /// Units (blocks, one per flush) in flight, and submitted since the
    /// last poll.
    in_flight: u64,
    fresh: u64,
    /// The batch being waited for, unless more was added to it while in
    /// flight (then its time teaches nothing).
    batch: Option<(usize, usize)>,
    mixed: bool,
}

impl Pacing {
    fn new() -> Pacing {
        Pacing {
            waiter: Waiter::new(Wait::default()),
            paces: [[Pace::default(); SIZE_CLASSES]; 3],
            in_flight: 0,
            fresh: 0,
            batch: None,
            mixed: false,
        }
    }

    fn submitted(&mut self, units: u64) {
        self.in_flight += units;
        self.fresh += units;
    }

    /// Before the poll that rings the doorbell: arms the wait for a new
    /// batch.
    fn before_poll(&mut self, op: IoOp) {
        if std::mem::take(&mut self.fresh) == 0 {
            return;
        }
        if self.batch.is_some() {
            self.mixed = true;
            return;
        }
        let op = match op {
            IoOp::Read => 0,
            IoOp::Write => 1,
            _ => 2,
        };
        let class = (u64::BITS - self.in_flight.leading_zeros()) as usize;
        let key = (op, class.min(SIZE_CLASSES - 1));
        self.batch = Some(key);
        self.mixed = false;
        self.waiter.set_pace(self.paces[key.0][key.1]);
        self.waiter.submitted(self.in_flight);
    }

    /// After a poll that completed `units`; sleeps if `sleep` and nothing
    /// completed. Returns whether it slept.
    fn after_poll(&mut self, completed: usize, units: u64, failed: bool, sleep: bool) -> bool {
        self.in_flight = self.in_flight.saturating_sub(units);
        if completed == 0 && !sleep {
            return false;
        }
        let slept = self.waiter.after_poll(completed, failed, self.in_flight);
        if self.in_flight == 0
            && let Some((op, class)) = self.batch.take()
            && !self.mixed
        {
            self.paces[op][class] = self.waiter.pace();
        }
        slept
    }
}

/// One part of a scattered transfer: `blocks` at `lba` to or from `offset`
/// bytes into the caller's slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First block on the device.
    pub lba: u64,
    /// Blocks.
    pub blocks: u64,
    /// Byte offset in the caller's slice.
    pub offset: usize,
}

impl BlockIo {
    /// Opens a channel to `dev` with buffers from `allocator`.
    pub fn open(
        dev: &Arc<dyn BlockDevice>,
        allocator: &Arc<dyn DmaAllocator>,
    ) -> Result<BlockIo, GcError> {
        let info = dev.info();
        let block_size = u64::from(info.block_size);
        let max_blocks = (MAX_TRANSFER_BYTES / block_size)
            .min(info.max_transfer_blocks)
            .max(1);
        let device_error = |action: &'static str, source| GcError::Device {
            device: info.name.clone(),
            action,
            source,
        };
        let ch = OwnedChannel::open(dev.as_ref(), DEPTH)
            .map_err(|e| device_error("opening a channel", e))?;
        let mut free = Vec::with_capacity(DEPTH);
        for _ in 0..DEPTH {
            free.push(
                allocator
                    .allocate((max_blocks * block_size) as usize)
                    .map_err(|e| device_error("allocating I/O buffers", e))?,
            );
        }
        Ok(BlockIo {
            device: info.name.clone(),
            block_size,
            max_blocks,
            ch,
            free,
            spans: vec![FREE; DEPTH],
            background: vec![false; DEPTH],
            background_failure: None,
            failure: None,
            pacing: Pacing::new(),
        })
    }

    /// Writes `data` (whole blocks) at `lba`.
    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), GcError> {
        let blocks = self.whole_blocks(data.len())?;
        self.transfer(
            &[Span {
                lba,
                blocks,
                offset: 0,
            }],
            Data::Write(data),
            false,
        )
    }

    /// Reads whole blocks at `lba` into `out`.
    pub fn read(&mut self, lba: u64, out: &mut [u8]) -> Result<(), GcError> {
        let blocks = self.whole_blocks(out.len())?;
        self.transfer(
            &[Span {
                lba,
                blocks,
                offset: 0,
            }],
            Data::Read(out),
            false,
        )
    }

    /// Reads each span into its place in `out`.
    pub fn read_spans(&mut self, spans: &[Span], out: &mut [u8]) -> Result<(), GcError> {
        self.transfer(spans, Data::Read(out), false)
    }

    /// Writes each span from its place in `data`.
    pub fn write_spans(&mut self, spans: &[Span], data: &[u8]) -> Result<(), GcError> {
        self.transfer(spans, Data::Write(data), false)
    }

    /// Starts writing each span from its place in `data` (copied before
    /// this returns) and returns without waiting; [`BlockIo::settle`] (and
    /// so [`BlockIo::flush`]) waits for it and reports its failure.
    pub fn write_spans_background(&mut self, spans: &[Span], data: &[u8]) -> Result<(), GcError> {
        self.transfer(spans, Data::Write(data), true)
    }

    /// Waits for the background writes; the first failure among them.
    pub fn settle(&mut self) -> Result<(), GcError> {
        let mut none = Data::None;
        while self.background.iter().any(|&b| b) {
            self.reap(&mut none)?;
        }
        self.background_failure.take().map_or(Ok(()), Err)
    }

    /// Makes every completed write durable: the background writes first
    /// complete (a flush covers only what completed before it), and fail
    /// the flush if they failed.
    pub fn flush(&mut self) -> Result<(), GcError> {
        self.settle()?;
        let mut none = Data::None;
        let slot = self.claim_slot(0, 0, &mut none)?;
        loop {
            match self.ch.submit(IoOp::Flush, 0, 0, None, slot) {
                Ok(()) => {
                    self.pacing.submitted(1);
                    break;
                }
                Err(r) => match r.error {
                    SubmitError::Busy => self.reap(&mut none)?,
                    SubmitError::Invalid(e) => {
                        self.spans[slot as usize] = FREE;
                        return Err(self.io_error(e));
                    }
                },
            }
        }
        self.drain(&mut none)?;
        self.take_failure()
    }

    fn whole_blocks(&self, len: usize) -> Result<u64, GcError> {
        if len == 0 || !(len as u64).is_multiple_of(self.block_size) {
            return Err(GcError::Config(format!(
                "{len} bytes is not a whole number of {}-byte blocks",
                self.block_size
            )));
        }
        Ok(len as u64 / self.block_size)
    }

    /// `background`: return once submitted (writes only).
    fn transfer(
        &mut self,
        spans: &[Span],
        mut data: Data<'_>,
        background: bool,
    ) -> Result<(), GcError> {
        let bs = self.block_size;
        let op = data.op();
        for s in spans {
            let end = s.offset as u64 + s.blocks * bs;
            if end > data.len() as u64 {
                return Err(GcError::Config(format!(
                    "{} blocks at byte {} pass the end of a {}-byte buffer",
                    s.blocks,
                    s.offset,
                    data.len()
                )));
            }
            let mut done = 0;
            while done < s.blocks {
                let n = self.max_blocks.min(s.blocks - done);
                let at = s.offset + (done * bs) as usize;
                let len = (n * bs) as usize;
                let mut buf = loop {
                    if let Some(b) = self.free.pop() {
                        break b;
                    }
                    self.reap(&mut data)?;
                };
                if let Data::Write(src) = &data {
                    buf.fill_from(0, &src[at..at + len])
                        .map_err(|source| GcError::Device {
                            device: self.device.clone(),
                            action: "filling an I/O buffer",
                            source,
                        })?;
                }
                let slot = self.claim_slot(at, len, &mut data)?;
                self.background[slot as usize] = background;
                let mut pending = Some(buf);
                while let Some(b) = pending.take() {
                    match self.ch.submit(op, s.lba + done, n, Some(b), slot) {
                        Ok(()) => self.pacing.submitted(n),
                        Err(r) => match r.error {
                            SubmitError::Busy => {
                                pending = r.buf;
                                self.reap(&mut data)?;
                            }
                            SubmitError::Invalid(e) => {
                                self.spans[slot as usize] = FREE;
                                self.background[slot as usize] = false;
                                self.free.extend(r.buf);
                                self.drain(&mut data)?;
                                return Err(self.io_error(e));
                            }
                        },
                    }
                }
                done += n;
            }
        }
        if background {
            // Ring the doorbell now; the completion is harvested later.
            // It is not waited for, so it teaches the pacing nothing.
            let (_, units, _) = self.harvest(&mut data);
            self.pacing.in_flight = self.pacing.in_flight.saturating_sub(units);
            self.pacing.fresh = 0;
            return Ok(());
        }
        self.drain(&mut data)?;
        self.take_failure()
    }

    /// A free request context, recording where its data goes.
    fn claim_slot(&mut self, at: usize, len: usize, data: &mut Data<'_>) -> Result<u64, GcError> {
        loop {
            if let Some(i) = self.spans.iter().position(|s| *s == FREE) {
                self.spans[i] = (at, len);
                self.background[i] = false;
                return Ok(i as u64);
            }
            self.reap(data)?;
        }
    }

    /// Waits for every request in flight.
    fn drain(&mut self, data: &mut Data<'_>) -> Result<(), GcError> {
        while self.spans.iter().any(|s| *s != FREE) {
            self.reap(data)?;
        }
        Ok(())
    }

    /// Harvests at least one completion, or times out.
    fn reap(&mut self, data: &mut Data<'_>) -> Result<(), GcError> {
        // The clock is read only once the paced sleep was not enough: in a
        // VM a clock read can be an emulated device access.
        let mut sleeping_since: Option<Instant> = None;
        let mut idle = 0u32;
        let mut slept = false;
        self.pacing.before_poll(data.op());
        loop {
            let (n, units, failed) = self.harvest(data);
            // Spin through the few microseconds a read or write takes,
            // then give the CPU back while waiting longer (a flush, a busy
            // device): the store is a background writer.
            idle += 1;
            if n == 0
                && slept
                && sleeping_since.get_or_insert_with(Instant::now).elapsed() > DEADLINE
            {
                return Err(GcError::Timeout {
                    device: self.device.clone(),
                    outstanding: self.ch.outstanding(),
                });
            }
            slept = self.pacing.after_poll(n, units, failed, idle > SPIN_POLLS);
            if n > 0 {
                return Ok(());
            }
            if !slept {
                std::hint::spin_loop();
            }
        }
    }

    /// One poll of the channel (it rings the doorbell for what was
    /// submitted): the completions it gave, their units, whether any
    /// failed.
    fn harvest(&mut self, data: &mut Data<'_>) -> (usize, u64, bool) {
        let (spans, free, failure) = (&mut self.spans, &mut self.free, &mut self.failure);
        let (background, background_failure) = (&mut self.background, &mut self.background_failure);
        let device = &self.device;
        let bs = self.block_size;
        let (mut units, mut failed) = (0u64, false);
        let n = self.ch.poll(DEPTH, |ctx, result, mut buf| {
            let (at, len) = spans
                .get_mut(ctx as usize)
                .map(|s| std::mem::replace(s, FREE))
                .unwrap_or(FREE);
            let in_background = background.get_mut(ctx as usize).is_some_and(std::mem::take);
            units += (len as u64 / bs).max(1);
            failed |= result.is_err();
            if let Err(source) = result {
                let first = if in_background {
                    &mut *background_failure
                } else {
                    &mut *failure
                };
                first.get_or_insert(GcError::Io {
                    device: device.clone(),
                    source,
                });
            } else if !in_background
                && let Data::Read(out) = data
                && let Some(out) = out.get_mut(at..at + len)
                && let Some(b) = buf.as_mut()
                && let Err(source) = b.copy_to(0, out)
            {
                failure.get_or_insert(GcError::Device {
                    device: device.clone(),
                    action: "copying out of an I/O buffer",
                    source,
                });
            }
            free.extend(buf);
        });
        (n, units, failed)
    }

    fn take_failure(&mut self) -> Result<(), GcError> {
        self.failure.take().map_or(Ok(()), Err)
    }

    fn io_error(&self, source: IoError) -> GcError {
        GcError::Io {
            device: self.device.clone(),
            source,
        }
    }
}
