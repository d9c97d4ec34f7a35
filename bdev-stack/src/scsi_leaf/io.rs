//! The data channels of a SCSI leaf: [`EmuChannel`] runs each request
//! through the emulated LUN's typed commands at submission; [`SgChannel`]
//! queues CDBs on an [`SgQueue`] with one aligned buffer per slot.

use std::collections::VecDeque;
use std::path::Path;
#[cfg(feature = "emu")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "emu")]
use scsi_sg::ScsiDevice;
#[cfg(feature = "emu")]
use scsi_sg::emu::EmuLun;
use scsi_sg::{AlignedBuf, AsyncXfer, CommandOutcome, ScsiStatus, SenseKey, SgQueue};
use tracing::{debug, warn};

#[cfg(feature = "emu")]
use super::ScsiLeaf;
use super::{DataCaps, caller_buf, scsi_error};
use crate::device::{
    Channel, Completion, DeviceId, DeviceInfo, IoOp, IoRequest, NotSync, SubmitError,
};
use crate::error::{BdevError, IoError, IoErrorKind};

/// Timeout of data commands through the sg queue.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks a no-data request against the per-command limits of WRITE SAME
/// and UNMAP (the stack splits reads and writes, not these).
fn check_no_data_limits(info: &DeviceInfo, caps: DataCaps, req: &IoRequest) -> Result<(), IoError> {
    let max = match req.op {
        IoOp::WriteZeroes => caps.write_same_max,
        IoOp::Deallocate => caps.unmap_max,
        _ => return Ok(()),
    };
    let max = if max == 0 { u64::from(u32::MAX) } else { max };
    let max = max.min(u64::from(u32::MAX));
    if req.blocks > max {
        return Err(req.error(info.id, IoErrorKind::TooLarge { max_blocks: max }));
    }
    Ok(())
}

/// What a failed data command means for the stack.
fn io_kind_of(sense: Option<&scsi_sg::Sense>, block_count: u64) -> IoErrorKind {
    match sense {
        Some(s) => match s.key {
            SenseKey::MediumError | SenseKey::HardwareError => IoErrorKind::Medium,
            SenseKey::IllegalRequest if s.asc == 0x21 => IoErrorKind::OutOfRange { block_count },
            SenseKey::IllegalRequest if s.asc == 0x20 || s.asc == 0x24 => IoErrorKind::Unsupported,
            _ => IoErrorKind::Os { errno: libc::EIO },
        },
        None => IoErrorKind::Os { errno: libc::EIO },
    }
}

/// The data channel of an emulated LUN: commands run at submission through
/// the typed commands of [`ScsiDevice`], and complete at the next poll.
#[cfg(feature = "emu")]
pub(super) struct EmuChannel {
    info: DeviceInfo,
    caps: DataCaps,
    lun: Arc<ScsiDevice<EmuLun>>,
    /// One block of zeroes, the data of WRITE SAME.
    zero_block: Box<[u8]>,
    done: VecDeque<Completion>,
    depth: usize,
    _not_sync: NotSync,
}

#[cfg(feature = "emu")]
impl EmuChannel {
    pub(super) fn new(leaf: &ScsiLeaf, lun: &Arc<ScsiDevice<EmuLun>>, depth: usize) -> EmuChannel {
        let depth = depth.max(1);
        EmuChannel {
            info: leaf.info.clone(),
            caps: leaf.caps,
            lun: Arc::clone(lun),
            zero_block: vec![0u8; leaf.info.block_size as usize].into_boxed_slice(),
            done: VecDeque::with_capacity(depth),
            depth,
            _not_sync: NotSync::default(),
        }
    }

    /// Runs a validated request.
    ///
    /// # Safety
    /// `req.buf` must satisfy [`Channel::submit`]'s contract.
    unsafe fn perform(&self, req: &IoRequest) -> Result<(), scsi_sg::Error> {
        match req.op {
            IoOp::Read => {
                // SAFETY: the caller upholds submit's contract for req,
                // which is in flight until its completion is polled.
                unsafe { caller_buf::with_bytes_mut(req, |buf| self.lun.read(req.lba, buf)) }
            }
            IoOp::Write => {
                // SAFETY: as above.
                unsafe { caller_buf::with_bytes(req, |buf| self.lun.write(req.lba, buf, false)) }
            }
            IoOp::Flush => self.lun.synchronize_cache(),
            IoOp::WriteZeroes => {
                let blocks = u32::try_from(req.blocks).unwrap_or(u32::MAX);
                self.lun
                    .write_same(req.lba, blocks, &self.zero_block, false)
            }
            IoOp::Deallocate => {
                let blocks = u32::try_from(req.blocks).unwrap_or(u32::MAX);
                self.lun.unmap(&[(req.lba, blocks)])
            }
        }
    }
}

#[cfg(feature = "emu")]
impl Channel for EmuChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.done.len() >= self.depth {
            return Err(SubmitError::Busy);
        }
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        check_no_data_limits(&self.info, self.caps, &req).map_err(SubmitError::Invalid)?;
        // SAFETY: the caller upholds submit's contract for req.buf.
        let result = match unsafe { self.perform(&req) } {
            // The command was not executed and the condition is now
            // cleared: send it once more, as the sg channel does.
            Err(e) if e.is_unit_attention() => {
                debug!(leaf = %self.info.name, lba = req.lba, "UNIT ATTENTION: retrying once");
                // SAFETY: as above.
                unsafe { self.perform(&req) }
            }
            other => other,
        };
        let result = result.map_err(|e| {
            debug!(leaf = %self.info.name, op = %req.op, lba = req.lba, blocks = req.blocks, error = %e, "SCSI command failed");
            req.error(self.info.id, io_kind_of(e.sense(), self.info.block_count))
        });
        self.done.push_back(Completion {
            ctx: req.ctx,
            result,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        crate::device::drain_completions(&mut self.done, out)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}

/// One command slot of an sg channel: its buffer (absent while the queue
/// holds it) and the request it serves.
struct SgSlot {
    buf: Option<AlignedBuf>,
    req: Option<IoRequest>,
    retried: bool,
}

/// The data channel of an sg LUN, over a [`SgQueue`].
pub(super) struct SgChannel {
    info: DeviceInfo,
    caps: DataCaps,
    queue: SgQueue,
    slots: Vec<SgSlot>,
    free: Vec<usize>,
    done: VecDeque<Completion>,
    _not_sync: NotSync,
}

/// The CDB and data phase of a request, built into `buf`.
fn build_command(
    info: &DeviceInfo,
    req: &IoRequest,
    mut buf: AlignedBuf,
) -> Result<([u8; 16], usize, AsyncXfer), AlignedBuf> {
    let blocks = u32::try_from(req.blocks).unwrap_or(u32::MAX);
    let bs = usize::try_from(info.block_size).unwrap_or(usize::MAX);
    Ok(match req.op {
        IoOp::Read => {
            let n = req.buf.len();
            (
                scsi_sg::cdb::read16(req.lba, blocks, false),
                16,
                AsyncXfer::FromDevice(buf, n),
            )
        }
        IoOp::Write => {
            let n = req.buf.len();
            let Some(dst) = buf.as_mut_slice().get_mut(..n) else {
                return Err(buf);
            };
            // SAFETY: the request was accepted by submit and is in flight
            // (its slot holds it until the completion is returned), so the
            // submit contract holds for its buffer of n bytes.
            unsafe { caller_buf::with_bytes(req, |src| dst.copy_from_slice(src)) };
            (
                scsi_sg::cdb::write16(req.lba, blocks, false),
                16,
                AsyncXfer::ToDevice(buf, n),
            )
        }
        IoOp::Flush => (
            scsi_sg::cdb::synchronize_cache16(0, 0),
            16,
            AsyncXfer::ToDevice(buf, 0),
        ),
        IoOp::WriteZeroes => {
            let Some(block) = buf.as_mut_slice().get_mut(..bs) else {
                return Err(buf);
            };
            block.fill(0);
            (
                scsi_sg::cdb::write_same16(req.lba, blocks, false),
                16,
                AsyncXfer::ToDevice(buf, bs),
            )
        }
        IoOp::Deallocate => {
            // UNMAP parameter list with one block descriptor (SBC-4 5.32.2).
            let Some(p) = buf.as_mut_slice().get_mut(..24) else {
                return Err(buf);
            };
            p.fill(0);
            p[0..2].copy_from_slice(&22u16.to_be_bytes());
            p[2..4].copy_from_slice(&16u16.to_be_bytes());
            p[8..16].copy_from_slice(&req.lba.to_be_bytes());
            p[16..20].copy_from_slice(&blocks.to_be_bytes());
            let mut cdb = [0u8; 16];
            cdb[..10].copy_from_slice(&scsi_sg::cdb::unmap(24));
            (cdb, 10, AsyncXfer::ToDevice(buf, 24))
        }
    })
}

impl SgChannel {
    pub(super) fn open(
        info: &DeviceInfo,
        caps: DataCaps,
        path: &Path,
        depth: usize,
    ) -> Result<SgChannel, BdevError> {
        let files = depth.div_ceil(scsi_sg::sys::sgq::SG_MAX_QUEUE).max(1);
        let queue =
            SgQueue::open(path, files).map_err(|e| scsi_error(path, "opening an sg queue", e))?;
        let depth = depth.min(queue.capacity()).max(1);
        let bytes = usize::try_from(info.max_transfer_blocks * u64::from(info.block_size))
            .unwrap_or(usize::MAX)
            .max(4096);
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth {
            let buf = AlignedBuf::new(bytes).ok_or(BdevError::OutOfMemory { bytes })?;
            slots.push(SgSlot {
                buf: Some(buf),
                req: None,
                retried: false,
            });
        }
        debug!(path = %path.display(), depth, files, slot_bytes = bytes, "sg channel open");
        Ok(SgChannel {
            info: info.clone(),
            caps,
            queue,
            free: (0..depth).rev().collect(),
            slots,
            done: VecDeque::with_capacity(depth),
            _not_sync: NotSync::default(),
        })
    }

    /// Queues slot `i`'s request. On refusal the buffer is back in the slot.
    fn start(&mut self, i: usize) -> Result<(), scsi_sg::RejectReason> {
        let Some(slot) = self.slots.get_mut(i) else {
            return Err(scsi_sg::RejectReason::Invalid);
        };
        let (Some(req), Some(buf)) = (slot.req, slot.buf.take()) else {
            return Err(scsi_sg::RejectReason::Invalid);
        };
        let (cdb, len, xfer) = match build_command(&self.info, &req, buf) {
            Ok(c) => c,
            Err(buf) => {
                slot.buf = Some(buf);
                return Err(scsi_sg::RejectReason::Invalid);
            }
        };
        match self.queue.submit(i as u64, &cdb[..len], xfer, IO_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(rejected) => {
                if let Some(slot) = self.slots.get_mut(i) {
                    slot.buf = match rejected.xfer {
                        AsyncXfer::FromDevice(b, _) | AsyncXfer::ToDevice(b, _) => Some(b),
                        AsyncXfer::None => None,
                    };
                }
                Err(rejected.reason)
            }
        }
    }

    /// Turns one queue completion into a stack completion (or a retry).
    fn finish(&mut self, c: scsi_sg::Completion) {
        let i = usize::try_from(c.tag).unwrap_or(usize::MAX);
        let Some(slot) = self.slots.get_mut(i) else {
            warn!(leaf = %self.info.name, tag = c.tag, "completion for an unknown slot");
            return;
        };
        slot.buf = c.buf;
        let Some(req) = slot.req else {
            return;
        };
        let result: Result<(), IoErrorKind> = match &c.result {
            Ok(o) if o.status == ScsiStatus::Good => {
                if req.op == IoOp::Read {
                    if o.transferred() != req.buf.len() {
                        Err(IoErrorKind::Os { errno: libc::EIO })
                    } else if let Some(src) = slot
                        .buf
                        .as_ref()
                        .and_then(|b| b.as_slice().get(..req.buf.len()))
                    {
                        // SAFETY: the submit contract gives this channel the
                        // caller's buffer of req.buf.len() bytes until the
                        // completion is returned, which happens below.
                        unsafe { caller_buf::with_bytes_mut(&req, |dst| dst.copy_from_slice(src)) };
                        Ok(())
                    } else {
                        Err(IoErrorKind::Os { errno: libc::EIO })
                    }
                } else {
                    Ok(())
                }
            }
            Ok(o) => {
                let sense = o.sense().and_then(Result::ok);
                if sense.is_some_and(|s| s.key == SenseKey::UnitAttention) && !slot.retried {
                    // The command was not executed; the condition is now
                    // reported and cleared: send it once more.
                    slot.retried = true;
                    debug!(leaf = %self.info.name, lba = req.lba, "UNIT ATTENTION: retrying once");
                    if self.start(i).is_ok() {
                        return;
                    }
                }
                log_failure(&self.info.name, &req, o);
                Err(io_kind_of(sense.as_ref(), self.info.block_count))
            }
            Err(e) => {
                warn!(leaf = %self.info.name, op = %req.op, lba = req.lba, error = %e, "sg command failed");
                Err(match e {
                    scsi_sg::Error::Timeout { .. } => IoErrorKind::Timeout,
                    _ => IoErrorKind::Os { errno: libc::EIO },
                })
            }
        };
        if let Some(slot) = self.slots.get_mut(i) {
            slot.req = None;
            slot.retried = false;
        }
        self.free.push(i);
        self.done.push_back(Completion {
            ctx: req.ctx,
            result: result.map_err(|kind| req.error(self.info.id, kind)),
        });
    }
}

fn log_failure(name: &str, req: &IoRequest, o: &CommandOutcome) {
    warn!(leaf = %name, op = %req.op, lba = req.lba, blocks = req.blocks, status = ?o.status, sense = ?o.sense(), "SCSI command failed");
}

impl Channel for SgChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        check_no_data_limits(&self.info, self.caps, &req).map_err(SubmitError::Invalid)?;
        let Some(i) = self.free.pop() else {
            return Err(SubmitError::Busy);
        };
        if let Some(slot) = self.slots.get_mut(i) {
            slot.req = Some(req);
            slot.retried = false;
        }
        match self.start(i) {
            Ok(()) => Ok(()),
            Err(reason) => {
                if let Some(slot) = self.slots.get_mut(i) {
                    slot.req = None;
                }
                self.free.push(i);
                match reason {
                    scsi_sg::RejectReason::QueueFull => Err(SubmitError::Busy),
                    other => {
                        warn!(leaf = %self.info.name, reason = ?other, "sg submission refused");
                        let errno = match &other {
                            scsi_sg::RejectReason::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
                            _ => libc::EINVAL,
                        };
                        Err(SubmitError::Invalid(
                            req.error(self.info.id, IoErrorKind::Os { errno }),
                        ))
                    }
                }
            }
        }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.done.len() < out.len() && self.queue.in_flight() > 0 {
            let want = out.len() - self.done.len();
            // Completions are parked in `done` (sized to the depth) and
            // handed out below; `finish` may resubmit after UNIT ATTENTION.
            let mut got: [Option<scsi_sg::Completion>; 16] = Default::default();
            let mut n = 0;
            let res = self.queue.poll(want.min(got.len()), |c| {
                if let Some(slot) = got.get_mut(n) {
                    *slot = Some(c);
                    n += 1;
                }
            });
            if let Err(e) = res {
                warn!(leaf = %self.info.name, error = %e, "sg queue poll failed");
            }
            for c in got.iter_mut().take(n) {
                if let Some(c) = c.take() {
                    self.finish(c);
                }
            }
        }
        crate::device::drain_completions(&mut self.done, out)
    }

    fn outstanding(&self) -> usize {
        self.queue.in_flight() + self.done.len()
    }
}
