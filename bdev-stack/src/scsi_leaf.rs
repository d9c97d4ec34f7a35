//! The SCSI LUN leaf: a [`BlockDevice`] over a probed logical unit.
//!
//! Two transports:
//!
//! - `sg:` — a LUN behind `/dev/sgN`. Data channels run over
//!   [`SgQueue`] (queued asynchronous sg I/O, several files per LUN): each
//!   channel owns one page-aligned [`AlignedBuf`] per slot, sized to the
//!   leaf's max transfer when it opens, and copies between the caller's
//!   [`DmaSlice`] and that buffer (the queued interface owns its buffers
//!   while a command is in flight, so the device never touches caller
//!   memory). READ(16)/WRITE(16), SYNCHRONIZE CACHE(16), WRITE SAME(16) for
//!   write zeroes and UNMAP for deallocate where the LUN's VPD pages say it
//!   supports them.
//! - `sgemu:` — a LUN of the in-process [`EmuTarget`], for host tests and
//!   machines without SCSI hardware. Its data channel executes each command
//!   through the same typed commands when it is submitted (like the memory
//!   leaf) and completes it at the next poll.
//!
//! Copy offload ([`ScsiLeaf::open_copy_channel`]) runs EXTENDED COPY(LID1)
//! (identification CSCDs 0xE4 by NAA, block-to-block segments 0x02),
//! POPULATE TOKEN + RECEIVE ROD TOKEN INFORMATION, and WRITE USING TOKEN
//! with OFFSET INTO ROD. Submission only records the command (into storage
//! sized when the channel opens); the command is executed **synchronously
//! inside [`CopyChannel::poll`]**, through `SG_IO` or the emulator: copy
//! commands are few and large, and a copy manager holds the command for
//! the whole copy anyway, so a queued path would buy little.
//!
//! Outcomes follow what the copy engine needs to keep data safe:
//! ILLEGAL REQUEST (the command was not executed) is `NotDone` —
//! `TokenExpired`/`TokenInvalid` for INVALID TOKEN OPERATION (ASC 0x23),
//! `Limits` for too many descriptors, `OutOfRange` for LBA OUT OF RANGE,
//! `Unsupported` otherwise; UNIT ATTENTION, NOT READY and BUSY are
//! `NotDone(NotExecuted)`; COPY ABORTED, medium and hardware errors,
//! timeouts and transport failures leave the destination unknown
//! (`DestinationUnknown`). No partial counts are claimed: LIO has no
//! RECEIVE COPY STATUS for LID1 lists, and a status read back under a
//! reused list identifier could describe an earlier command, so a failed
//! copy is always redone in full.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use scsi_sg::emu::{EmuConfig, EmuLun, EmuTarget};
use scsi_sg::tpc::{BlockRange, CopyOperatingParameters, CscdId, ExtendedCopy, Segment};
use scsi_sg::vpd::RodLimits;
use scsi_sg::{
    AlignedBuf, AsyncXfer, CommandOutcome, Identity, ScsiDevice, ScsiStatus, ScsiTransport,
    SenseKey, SgDevice, SgQueue, TokenProblem,
};
use tracing::{debug, info, warn};

use crate::device::{
    Access, BlockDevice, Channel, Completion, CopyOffload, DeviceId, DeviceInfo, DeviceKind, IoOp,
    IoRequest, LeafFragment, NotSync, SubmitError, SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::identity::OffloadDomain;
use crate::offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRange, OffloadRequest, OffloadSource, OffloadSubmitError, RodToken,
};
use crate::spec::{LeafError, LeafFactory, LeafSpec};

/// Largest read or write one sg command carries, whatever VPD 0xB0 allows:
/// each channel slot owns a buffer this big.
pub const SG_MAX_TRANSFER_BYTES: u64 = 512 << 10;

/// Timeout of data commands through the sg queue.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest designator an identification CSCD descriptor holds.
const MAX_DESIGNATOR: usize = 20;

/// The transport under a leaf.
enum Backend {
    /// A LUN through `/dev/sgN`: the probed device for synchronous
    /// commands (copy offload), and the path for the queued data channels.
    Sg {
        lun: Arc<ScsiDevice<SgDevice>>,
        path: PathBuf,
    },
    /// A LUN of the in-process emulated target.
    Emu { lun: Arc<ScsiDevice<EmuLun>> },
}

/// What the leaf may send for the data operations beyond read and write.
#[derive(Debug, Clone, Copy)]
struct DataCaps {
    /// WRITE SAME(16) blocks per command (0: unlimited by the LUN).
    write_same_max: u64,
    /// UNMAP blocks per command (0: unlimited by the LUN).
    unmap_max: u64,
}

/// A SCSI logical unit as a leaf of the block-device stack.
pub struct ScsiLeaf {
    info: DeviceInfo,
    backend: Backend,
    caps: DataCaps,
    naa: Option<Vec<u8>>,
    xcopy: Option<CopyOperatingParameters>,
    rod: Option<RodLimits>,
}

impl fmt::Debug for ScsiLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScsiLeaf")
            .field("name", &self.info.name)
            .field("id", &self.info.id)
            .field("block_size", &self.info.block_size)
            .field("block_count", &self.info.block_count)
            .field("copy_offloads", &self.info.copy_offloads)
            .finish_non_exhaustive()
    }
}

fn scsi_error(device: &Path, action: &'static str, source: scsi_sg::Error) -> BdevError {
    BdevError::Scsi {
        device: device.display().to_string(),
        action,
        source: Box::new(source),
    }
}

/// The copy manager a LUN behind `/dev/sgN` is reached through: its SCSI
/// target nexus (`host:channel:target` from sysfs), so that the LUNs of
/// one LIO `tcm_loop` target share one. `None` when sysfs does not say.
fn sg_copy_manager(path: &Path) -> Option<String> {
    let node = path.file_name()?.to_str()?;
    let link = std::fs::read_link(format!("/sys/class/scsi_generic/{node}/device")).ok()?;
    let hctl = link.file_name()?.to_str()?;
    let mut parts = hctl.split(':');
    let (h, c, t, l) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if [h, c, t, l]
        .iter()
        .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    Some(format!("scsi-nexus:{h}:{c}:{t}"))
}

impl ScsiLeaf {
    /// Opens and probes the LUN behind the sg node `path` (`/dev/sgN`).
    ///
    /// Errors are [`BdevError::Scsi`] with the typed SCSI error: no such
    /// device, no permission, not an sg character device (a `/dev/sdX`
    /// path is refused: the queued interface needs the sg node), not a
    /// direct-access device.
    pub fn open_sg(path: impl AsRef<Path>) -> Result<ScsiLeaf, BdevError> {
        let path = path.as_ref();
        // Opening a queue checks the node is an sg character device; the
        // queue itself is not kept.
        drop(SgQueue::open(path, 1).map_err(|e| scsi_error(path, "opening the sg node", e))?);
        let lun = ScsiDevice::open(path).map_err(|e| scsi_error(path, "probing the LUN", e))?;
        let copy_manager = sg_copy_manager(path).unwrap_or_else(|| {
            warn!(path = %path.display(), "no SCSI nexus in sysfs: EXTENDED COPY limited to this LUN");
            format!("scsi-lun:{}", path.display())
        });
        let name = format!("sg:{}", path.display());
        ScsiLeaf::build(
            name,
            DeviceKind::Scsi,
            copy_manager,
            lun.identity().clone(),
            SG_MAX_TRANSFER_BYTES,
            Backend::Sg {
                lun: Arc::new(lun),
                path: path.to_path_buf(),
            },
        )
    }

    /// A leaf over LUN `lun` of an emulated target. `copy_manager` names the
    /// target: LUNs given the same name must belong to the same
    /// [`EmuTarget`](scsi_sg::emu::EmuTarget), which is what lets EXTENDED
    /// COPY and ROD tokens pass between them.
    pub fn from_emu(lun: EmuLun, copy_manager: &str) -> Result<ScsiLeaf, BdevError> {
        let path = lun.path().to_path_buf();
        let lun = ScsiDevice::probe(lun).map_err(|e| scsi_error(&path, "probing the LUN", e))?;
        ScsiLeaf::build(
            format!("sgemu:{}", path.display()),
            DeviceKind::Emulated,
            format!("sgemu-target:{copy_manager}"),
            lun.identity().clone(),
            1 << 20,
            Backend::Emu { lun: Arc::new(lun) },
        )
    }

    fn build(
        name: String,
        kind: DeviceKind,
        copy_manager: String,
        identity: Identity,
        max_transfer_bytes: u64,
        backend: Backend,
    ) -> Result<ScsiLeaf, BdevError> {
        let block_size = identity.capacity.logical_block_length;
        let invalid = |parameter, reason: String| BdevError::InvalidParameter {
            device: name.clone(),
            parameter,
            reason,
        };
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(invalid(
                "block size",
                format!("the LUN reports {block_size}-byte blocks"),
            ));
        }
        let block_count = identity
            .capacity
            .block_count()
            .ok_or_else(|| invalid("capacity", "READ CAPACITY(16) gave no size".into()))?;
        let mut max_transfer_blocks = (max_transfer_bytes / u64::from(block_size)).max(1);
        let limits = identity.block_limits;
        if let Some(l) = limits
            && l.max_transfer > 0
        {
            max_transfer_blocks = max_transfer_blocks.min(u64::from(l.max_transfer));
        }
        let mut ops = SupportedOps::READ | SupportedOps::WRITE | SupportedOps::FLUSH;
        let provisioning = identity.provisioning;
        // WRITE SAME of a zero block writes zeroes whether or not the LUN
        // is thin; LIO and the emulator take it. Limited by VPD 0xB0.
        let write_same_max = limits.map_or(0, |l| l.max_write_same);
        if limits.is_some() {
            ops |= SupportedOps::WRITE_ZEROES;
        }
        // Deallocate must read back as zeroes (the stack's contract): only
        // a LUN that takes UNMAP and reads unmapped blocks as zeroes.
        let unmap_max = limits.map_or(0, |l| u64::from(l.max_unmap_lba_count));
        if provisioning.is_some_and(|p| p.lbpu && p.lbprz) && unmap_max > 0 {
            ops |= SupportedOps::DEALLOCATE;
        }
        let naa = identity.naa().map(<[u8]>::to_vec);
        let mut copy_offloads = Vec::new();
        let xcopy = match (&naa, identity.copy.extended_copy.clone()) {
            (Some(naa), Some(p)) if naa.len() <= MAX_DESIGNATOR && p.max_cscd_descriptors >= 2 => {
                copy_offloads.push(CopyOffload::ScsiExtendedCopy {
                    naa: naa.clone(),
                    copy_manager: OffloadDomain::address(&copy_manager),
                    designator_unique: true,
                    max_segments: p.max_segment_descriptors,
                    max_segment_bytes: u64::from(p.max_segment_length),
                });
                Some(p)
            }
            _ => None,
        };
        let rod = match (&naa, identity.copy.rod_tokens.as_ref()) {
            (Some(naa), Some(r)) if r.limits.max_range_descriptors > 0 => {
                copy_offloads.push(CopyOffload::ScsiRodToken {
                    naa: naa.clone(),
                    copy_manager: OffloadDomain::address(&copy_manager),
                    max_ranges: u32::from(r.limits.max_range_descriptors),
                    // A ROD token counts blocks; 0 means no stated limit.
                    max_token_blocks: r.limits.max_token_transfer_size,
                });
                Some(r.limits)
            }
            _ => None,
        };
        let info = DeviceInfo {
            id: DeviceId::fresh(),
            name,
            kind,
            block_size,
            block_count,
            max_transfer_blocks,
            // Data passes through the channel's own aligned buffers.
            buf_align: 1,
            needs_iova: false,
            optimal_boundary_blocks: limits.map_or(0, |l| u64::from(l.optimal_transfer)),
            ops,
            copy_offloads,
        };
        info!(
            leaf = %info.name,
            id = %info.id,
            block_size,
            block_count,
            max_transfer_blocks,
            xcopy = xcopy.is_some(),
            rod = rod.is_some(),
            copy_manager = %copy_manager,
            "SCSI leaf ready"
        );
        Ok(ScsiLeaf {
            info,
            backend,
            caps: DataCaps {
                write_same_max,
                unmap_max,
            },
            naa,
            xcopy,
            rod,
        })
    }

    /// What the probe learned about the LUN.
    pub fn identity(&self) -> &Identity {
        match &self.backend {
            Backend::Sg { lun, .. } => lun.identity(),
            Backend::Emu { lun } => lun.identity(),
        }
    }

    fn copy_channel<T: ScsiTransport + Send + Sync + 'static>(
        &self,
        lun: &Arc<ScsiDevice<T>>,
        depth: usize,
    ) -> Box<dyn CopyChannel> {
        let depth = depth.max(1);
        let per_command = self
            .xcopy
            .as_ref()
            .map_or(0, |p| usize::from(p.max_segment_descriptors))
            .max(self.rod.map_or(0, |r| usize::from(r.max_range_descriptors)))
            .max(1);
        Box::new(ScsiCopyChannel {
            id: self.info.id,
            name: self.info.name.clone(),
            block_size: self.info.block_size,
            block_count: self.info.block_count,
            naa: self.naa.clone().unwrap_or_default(),
            xcopy: self.xcopy.clone(),
            rod: self.rod,
            lun: Arc::clone(lun),
            pending: VecDeque::with_capacity(depth),
            free: (0..depth)
                .map(|_| Vec::with_capacity(per_command))
                .collect(),
            depth,
            next_list_id: 1,
            _not_sync: NotSync::default(),
        })
    }
}

impl BlockDevice for ScsiLeaf {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let depth = depth.max(1);
        match &self.backend {
            Backend::Emu { lun } => Ok(Box::new(EmuChannel {
                info: self.info.clone(),
                caps: self.caps,
                lun: Arc::clone(lun),
                zero_block: vec![0u8; self.info.block_size as usize].into_boxed_slice(),
                done: VecDeque::with_capacity(depth),
                depth,
                _not_sync: NotSync::default(),
            })),
            Backend::Sg { path, .. } => SgChannel::open(&self.info, self.caps, path, depth)
                .map(|c| Box::new(c) as Box<dyn Channel>),
        }
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        if self.info.copy_offloads.is_empty() {
            return Ok(None);
        }
        Ok(Some(match &self.backend {
            Backend::Sg { lun, .. } => self.copy_channel(lun, depth),
            Backend::Emu { lun } => self.copy_channel(lun, depth),
        }))
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        map_leaf(&self.info, lba, blocks, access, out)
    }
}

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
        return Err(IoError {
            device: info.id,
            op: req.op,
            lba: req.lba,
            blocks: req.blocks,
            kind: IoErrorKind::TooLarge { max_blocks: max },
        });
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
struct EmuChannel {
    info: DeviceInfo,
    caps: DataCaps,
    lun: Arc<ScsiDevice<EmuLun>>,
    /// One block of zeroes, the data of WRITE SAME.
    zero_block: Box<[u8]>,
    done: VecDeque<Completion>,
    depth: usize,
    _not_sync: NotSync,
}

impl EmuChannel {
    /// Runs a validated request.
    ///
    /// # Safety
    /// `req.buf` must satisfy [`Channel::submit`]'s contract.
    unsafe fn perform(&self, req: &IoRequest) -> Result<(), scsi_sg::Error> {
        match req.op {
            IoOp::Read => {
                // SAFETY: validate() checked the buffer covers exactly the
                // transfer; the submit contract makes it ours to write
                // until the completion is polled, and nobody else reads it.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(req.buf.host_ptr(), req.buf.len()) };
                self.lun.read(req.lba, buf)
            }
            IoOp::Write => {
                // SAFETY: as above; for a write nobody writes the buffer
                // until completion, so a shared slice is sound.
                let buf = unsafe { std::slice::from_raw_parts(req.buf.host_ptr(), req.buf.len()) };
                self.lun.write(req.lba, buf, false)
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
            IoError {
                device: self.info.id,
                op: req.op,
                lba: req.lba,
                blocks: req.blocks,
                kind: io_kind_of(e.sense(), self.info.block_count),
            }
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
struct SgChannel {
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
            // SAFETY: validate() checked the buffer holds n bytes; the
            // submit contract keeps it unchanged until completion, and it
            // is library memory distinct from this channel's buffer.
            let src = unsafe { std::slice::from_raw_parts(req.buf.host_ptr(), n) };
            dst.copy_from_slice(src);
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
    fn open(
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
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                src.as_ptr(),
                                req.buf.host_ptr(),
                                src.len(),
                            )
                        };
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
            result: result.map_err(|kind| IoError {
                device: self.info.id,
                op: req.op,
                lba: req.lba,
                blocks: req.blocks,
                kind,
            }),
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
                        Err(SubmitError::Invalid(IoError {
                            device: self.info.id,
                            op: req.op,
                            lba: req.lba,
                            blocks: req.blocks,
                            kind: IoErrorKind::Os { errno },
                        }))
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

/// An offload command recorded by `submit_*`, executed by `poll`.
struct PendingCopy {
    ctx: u64,
    op: PendingOp,
    ranges: Vec<OffloadRange>,
}

enum PendingOp {
    Copy(PendingSource),
    Populate,
}

enum PendingSource {
    SameDevice,
    Designator {
        naa: [u8; MAX_DESIGNATOR],
        len: usize,
        block_size: u32,
    },
    Rod(RodToken),
}

/// The copy channel of a SCSI leaf (the destination for copies, the
/// source for POPULATE TOKEN).
struct ScsiCopyChannel<T: ScsiTransport> {
    id: DeviceId,
    name: String,
    block_size: u32,
    block_count: u64,
    naa: Vec<u8>,
    xcopy: Option<CopyOperatingParameters>,
    rod: Option<RodLimits>,
    lun: Arc<ScsiDevice<T>>,
    pending: VecDeque<PendingCopy>,
    /// Range vectors sized when the channel opened, reused per command.
    free: Vec<Vec<OffloadRange>>,
    depth: usize,
    next_list_id: u32,
    _not_sync: NotSync,
}

fn scsi_status(e: &scsi_sg::Error) -> DeviceStatus {
    e.sense()
        .map_or(DeviceStatus::None, |s| DeviceStatus::Scsi {
            key: s.key as u8,
            asc: s.asc,
            ascq: s.ascq,
        })
}

/// Whether the device can have written anything, and why it failed.
enum Failure {
    Clean(OffloadErrorKind),
    Unknown(OffloadErrorKind),
}

fn classify(e: &scsi_sg::Error) -> Failure {
    use scsi_sg::Error as E;
    match e {
        E::Token { problem, .. } => Failure::Clean(match problem {
            TokenProblem::Expired => OffloadErrorKind::TokenExpired,
            _ => OffloadErrorKind::TokenInvalid,
        }),
        // Refused before anything was sent.
        E::Unsupported { .. } => Failure::Clean(OffloadErrorKind::Unsupported),
        E::InvalidRequest { .. } | E::InvalidCdb { .. } | E::TransferTooLarge { .. } => {
            Failure::Clean(OffloadErrorKind::Limits)
        }
        E::Status { .. } => Failure::Clean(OffloadErrorKind::NotExecuted),
        E::CheckCondition { sense, .. } => match sense.key {
            SenseKey::IllegalRequest => Failure::Clean(match (sense.asc, sense.ascq) {
                (0x23, 0x07) => OffloadErrorKind::TokenExpired,
                (0x23, _) => OffloadErrorKind::TokenInvalid,
                (0x21, _) => OffloadErrorKind::OutOfRange,
                // TOO MANY SEGMENT/TARGET DESCRIPTORS, PARAMETER LIST LENGTH.
                (0x26, 0x06 | 0x08) | (0x1a, _) => OffloadErrorKind::Limits,
                _ => OffloadErrorKind::Unsupported,
            }),
            SenseKey::UnitAttention | SenseKey::NotReady => {
                Failure::Clean(OffloadErrorKind::NotExecuted)
            }
            SenseKey::MediumError | SenseKey::HardwareError => {
                Failure::Unknown(OffloadErrorKind::Medium)
            }
            // COPY ABORTED, ABORTED COMMAND and the rest: the copy may have
            // moved some of the blocks.
            _ => Failure::Unknown(OffloadErrorKind::NotExecuted),
        },
        _ => Failure::Unknown(OffloadErrorKind::Medium),
    }
}

impl<T: ScsiTransport> ScsiCopyChannel<T> {
    fn error(
        &self,
        ranges: &[OffloadRange],
        kind: OffloadErrorKind,
        status: DeviceStatus,
    ) -> OffloadError {
        OffloadError {
            device: self.id,
            dst_lba: ranges.first().map_or(0, |r| r.dst),
            blocks: ranges.iter().map(|r| r.blocks).sum(),
            kind,
            status,
        }
    }

    fn list_id(&mut self) -> u32 {
        let id = self.next_list_id;
        self.next_list_id = self.next_list_id.wrapping_add(1).max(1);
        id
    }

    fn fail(&self, ranges: &[OffloadRange], e: &scsi_sg::Error) -> OffloadOutcome {
        let status = scsi_status(e);
        match classify(e) {
            Failure::Clean(kind) => {
                debug!(leaf = %self.name, error = %e, ?kind, "offload not done");
                OffloadOutcome::NotDone(self.error(ranges, kind, status))
            }
            Failure::Unknown(kind) => {
                warn!(leaf = %self.name, error = %e, "offload failed; destination unknown");
                OffloadOutcome::DestinationUnknown(self.error(ranges, kind, status))
            }
        }
    }

    fn refuse(&self, ranges: &[OffloadRange], kind: OffloadErrorKind) -> OffloadOutcome {
        OffloadOutcome::NotDone(self.error(ranges, kind, DeviceStatus::None))
    }

    fn check_dst(&self, ranges: &[OffloadRange]) -> bool {
        !ranges.is_empty()
            && ranges.iter().all(|r| {
                r.blocks > 0
                    && u32::try_from(r.blocks).is_ok()
                    && r.dst
                        .checked_add(r.blocks)
                        .is_some_and(|e| e <= self.block_count)
            })
    }

    fn extended_copy(
        &mut self,
        src_naa: &[u8],
        src_block_size: u32,
        ranges: &[OffloadRange],
    ) -> OffloadOutcome {
        let Some((snlid, max_segment_length, max_segments)) = self
            .xcopy
            .as_ref()
            .map(|p| (p.snlid, p.max_segment_length, p.max_segment_descriptors))
        else {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        };
        if src_block_size != self.block_size {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        }
        if !self.check_dst(ranges) {
            return self.refuse(ranges, OffloadErrorKind::OutOfRange);
        }
        let bs = u64::from(self.block_size.max(1));
        let max_blocks = (u64::from(max_segment_length) / bs).min(u64::from(u16::MAX));
        if ranges.len() > usize::from(max_segments) || ranges.iter().any(|r| r.blocks > max_blocks)
        {
            return self.refuse(ranges, OffloadErrorKind::Limits);
        }
        let same = src_naa == self.naa.as_slice();
        let mut cscds = vec![CscdId {
            naa: src_naa.to_vec(),
            block_len: src_block_size,
        }];
        if !same {
            cscds.push(CscdId {
                naa: self.naa.clone(),
                block_len: self.block_size,
            });
        }
        let segments = ranges
            .iter()
            .map(|r| Segment {
                source: 0,
                destination: if same { 0 } else { 1 },
                blocks: u16::try_from(r.blocks).unwrap_or(u16::MAX),
                source_lba: r.src,
                destination_lba: r.dst,
            })
            .collect();
        let list_id = u8::try_from(self.list_id() & 0xff).unwrap_or(0);
        let list = ExtendedCopy {
            list_id,
            no_list_id: snlid,
            cscds,
            segments,
        };
        match self.lun.extended_copy(&list) {
            Ok(()) => OffloadOutcome::Done,
            Err(e) => self.fail(ranges, &e),
        }
    }

    fn write_using_token(&mut self, token: &RodToken, ranges: &[OffloadRange]) -> OffloadOutcome {
        let Some(limits) = self.rod else {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        };
        if !self.check_dst(ranges) {
            return self.refuse(ranges, OffloadErrorKind::OutOfRange);
        }
        if ranges.len() > usize::from(limits.max_range_descriptors)
            || ranges
                .windows(2)
                .any(|w| w[0].src + w[0].blocks != w[1].src)
        {
            return self.refuse(ranges, OffloadErrorKind::Limits);
        }
        if token.is_expired(Instant::now()) {
            return self.refuse(ranges, OffloadErrorKind::TokenExpired);
        }
        let Ok(rod) = scsi_sg::tpc::RodToken::parse(token.bytes()) else {
            return self.refuse(ranges, OffloadErrorKind::TokenInvalid);
        };
        let offset = ranges.first().map_or(0, |r| r.src);
        let dst: Vec<BlockRange> = ranges
            .iter()
            .map(|r| BlockRange {
                lba: r.dst,
                blocks: u32::try_from(r.blocks).unwrap_or(u32::MAX),
            })
            .collect();
        let list_id = self.list_id();
        match self
            .lun
            .write_using_token(list_id, &rod, offset, &dst, false)
        {
            Ok(()) => OffloadOutcome::Done,
            Err(e) => self.fail(ranges, &e),
        }
    }

    fn populate(&mut self, ranges: &[OffloadRange]) -> OffloadOutcome {
        let Some(limits) = self.rod else {
            return self.refuse(ranges, OffloadErrorKind::Unsupported);
        };
        let blocks: u64 = ranges.iter().map(|r| r.blocks).sum();
        if ranges.len() > usize::from(limits.max_range_descriptors)
            || (limits.max_token_transfer_size > 0 && blocks > limits.max_token_transfer_size)
        {
            return self.refuse(ranges, OffloadErrorKind::Limits);
        }
        let block_ranges: Option<Vec<BlockRange>> = ranges
            .iter()
            .map(|r| {
                let n = u32::try_from(r.blocks).ok()?;
                let end = r.src.checked_add(r.blocks)?;
                (n > 0 && end <= self.block_count).then_some(BlockRange {
                    lba: r.src,
                    blocks: n,
                })
            })
            .collect();
        let Some(block_ranges) = block_ranges else {
            return self.refuse(ranges, OffloadErrorKind::OutOfRange);
        };
        let list_id = self.list_id();
        let started = Instant::now();
        match self.lun.populate_token(list_id, &block_ranges, 0) {
            Ok(rod) => {
                // Asked for the device's default inactivity timeout: the
                // token is good until then at least.
                let expires = (limits.default_inactivity_timeout > 0).then(|| {
                    started + Duration::from_secs(u64::from(limits.default_inactivity_timeout))
                });
                match RodToken::new(&rod.0, blocks, expires) {
                    Some(token) => OffloadOutcome::Token(token),
                    None => self.refuse(ranges, OffloadErrorKind::TokenInvalid),
                }
            }
            Err(e) => match self.fail(ranges, &e) {
                // POPULATE TOKEN writes nothing: whatever failed, the
                // (source) blocks are as they were.
                OffloadOutcome::DestinationUnknown(err) => OffloadOutcome::NotDone(err),
                other => other,
            },
        }
    }

    fn execute(&mut self, p: &PendingCopy) -> OffloadOutcome {
        match &p.op {
            PendingOp::Populate => self.populate(&p.ranges),
            PendingOp::Copy(PendingSource::SameDevice) => {
                let naa = self.naa.clone();
                let bs = self.block_size;
                self.extended_copy(&naa, bs, &p.ranges)
            }
            PendingOp::Copy(PendingSource::Designator {
                naa,
                len,
                block_size,
            }) => {
                let naa = naa.get(..*len).unwrap_or(&[]);
                self.extended_copy(naa, *block_size, &p.ranges)
            }
            PendingOp::Copy(PendingSource::Rod(token)) => self.write_using_token(token, &p.ranges),
        }
    }

    fn record(
        &mut self,
        ctx: u64,
        op: PendingOp,
        fill: impl FnOnce(&mut Vec<OffloadRange>),
    ) -> Result<(), OffloadSubmitError> {
        if self.pending.len() >= self.depth {
            return Err(OffloadSubmitError::Busy);
        }
        let mut ranges = self.free.pop().unwrap_or_default();
        ranges.clear();
        fill(&mut ranges);
        self.pending.push_back(PendingCopy { ctx, op, ranges });
        Ok(())
    }
}

impl<T: ScsiTransport + Send + Sync> CopyChannel for ScsiCopyChannel<T> {
    fn device(&self) -> DeviceId {
        self.id
    }

    fn submit_copy(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadSubmitError> {
        let source = match req.source {
            OffloadSource::SameDevice => PendingSource::SameDevice,
            OffloadSource::Designator { naa, block_size } => {
                let mut buf = [0u8; MAX_DESIGNATOR];
                let Some(dst) = buf.get_mut(..naa.len()) else {
                    return Err(OffloadSubmitError::Invalid(self.error(
                        req.ranges,
                        OffloadErrorKind::Unsupported,
                        DeviceStatus::None,
                    )));
                };
                dst.copy_from_slice(naa);
                PendingSource::Designator {
                    naa: buf,
                    len: naa.len(),
                    block_size,
                }
            }
            OffloadSource::RodToken(token) => PendingSource::Rod(token.clone()),
        };
        self.record(req.ctx, PendingOp::Copy(source), |v| {
            v.extend_from_slice(req.ranges)
        })
    }

    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError> {
        self.record(ctx, PendingOp::Populate, |v| {
            v.extend(ranges.iter().map(|r| OffloadRange {
                src: r.lba,
                dst: r.lba,
                blocks: r.blocks,
            }));
        })
    }

    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let outcome = self.execute(&p);
            out.push(OffloadCompletion {
                ctx: p.ctx,
                outcome,
            });
            self.free.push(p.ranges);
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.pending.len()
    }
}

/// Opens `sg:/dev/sgN` leaves: the LUN through [`SgQueue`].
#[derive(Debug, Default)]
pub struct SgFactory;

impl LeafFactory for SgFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        if let Some(option) = spec.options.first() {
            return Err(LeafError::BadOption {
                key: option.key.to_string(),
                reason: "sg: takes no options".into(),
            });
        }
        if !spec.body.starts_with('/') {
            return Err(LeafError::BadBody(format!(
                "`{}` is not a device path (e.g. sg:/dev/sg1)",
                spec.body
            )));
        }
        Ok(Arc::new(ScsiLeaf::open_sg(spec.body)?))
    }
}

/// How a spec asked an emulated target to be built; later LUNs naming the
/// target must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EmuSettings {
    xcopy: bool,
    rod: bool,
}

#[derive(Default)]
struct EmuTargets {
    targets: HashMap<String, (EmuTarget, EmuSettings)>,
    anonymous: u64,
}

/// Opens `sgemu:SIZE[,bs=512][,target=NAME][,xcopy=on|off][,rod[=on|off]]`
/// leaves: LUNs of in-process emulated SCSI targets.
///
/// LUNs that name the same `target` (within one factory, so within one
/// [`LeafRegistry`](crate::spec::LeafRegistry)) are LUNs of one
/// [`EmuTarget`], so EXTENDED COPY and ROD tokens pass between them; a LUN
/// without `target` gets a target of its own. `xcopy` (default on) and
/// `rod` (default off) set what the target's copy manager offers; every
/// LUN of a target must say the same. The copy engine prefers EXTENDED
/// COPY where a LUN offers both, so a ROD-token stack says `xcopy=off,rod=on`.
#[derive(Default)]
pub struct SgEmuFactory {
    targets: Mutex<EmuTargets>,
}

impl fmt::Debug for SgEmuFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SgEmuFactory").finish_non_exhaustive()
    }
}

impl SgEmuFactory {
    /// A factory with no targets yet.
    pub fn new() -> SgEmuFactory {
        SgEmuFactory::default()
    }

    /// The target named `name`, once a spec has made it (for tests: fault
    /// injection, advancing the token clock).
    pub fn target(&self, name: &str) -> Option<EmuTarget> {
        self.lock().targets.get(name).map(|(t, _)| t.clone())
    }

    fn lock(&self) -> MutexGuard<'_, EmuTargets> {
        // The map stays consistent across a panic elsewhere.
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn on_off(spec: &LeafSpec<'_>, key: &str, default: bool) -> Result<bool, LeafError> {
    match spec
        .options
        .iter()
        .rev()
        .find(|o| o.key == key)
        .map(|o| o.value)
    {
        None => Ok(default),
        // A bare flag (`sgemu:1m,rod`) is on.
        Some("" | "on" | "1" | "yes" | "true") => Ok(true),
        Some("off" | "0" | "no" | "false") => Ok(false),
        Some(other) => Err(LeafError::BadOption {
            key: key.to_string(),
            reason: format!("`{other}`: say on or off"),
        }),
    }
}

impl LeafFactory for SgEmuFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        const ALLOWED: &[&str] = &["bs", "target", "xcopy", "rod"];
        if let Some(option) = spec.options.iter().find(|o| !ALLOWED.contains(&o.key)) {
            return Err(LeafError::BadOption {
                key: option.key.to_string(),
                reason: format!("sgemu: takes only {}", ALLOWED.join(", ")),
            });
        }
        let size = parse_byte_size(spec.body).map_err(LeafError::BadBody)?;
        let block_size = match spec.options.iter().rev().find(|o| o.key == "bs") {
            None => 512,
            Some(o) => parse_byte_size(o.value)
                .ok()
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| *b >= 512 && b.is_power_of_two())
                .ok_or_else(|| LeafError::BadOption {
                    key: "bs".into(),
                    reason: format!("`{}`: a power of two of at least 512", o.value),
                })?,
        };
        let blocks = size / u64::from(block_size);
        if blocks == 0 || size % u64::from(block_size) != 0 {
            return Err(LeafError::BadBody(format!(
                "{size} bytes is not a positive multiple of the {block_size}-byte block"
            )));
        }
        let settings = EmuSettings {
            xcopy: on_off(spec, "xcopy", true)?,
            rod: on_off(spec, "rod", false)?,
        };
        let mut targets = self.lock();
        let name = match spec.options.iter().rev().find(|o| o.key == "target") {
            Some(o) => o.value.to_string(),
            None => {
                targets.anonymous += 1;
                format!("anonymous-{}", targets.anonymous)
            }
        };
        let target = match targets.targets.get(&name) {
            Some((target, existing)) if *existing == settings => target.clone(),
            Some((_, existing)) => {
                return Err(LeafError::BadOption {
                    key: "target".into(),
                    reason: format!(
                        "target `{name}` was made with xcopy={} rod={}; its LUNs must agree",
                        if existing.xcopy { "on" } else { "off" },
                        if existing.rod { "on" } else { "off" },
                    ),
                });
            }
            None => {
                let mut config = EmuConfig::default();
                if !settings.xcopy {
                    // No segment descriptors: the probe finds no usable
                    // EXTENDED COPY and the target refuses any list.
                    config.copy.max_segment_descriptors = 0;
                }
                if !settings.rod {
                    config.rod = None;
                }
                let target = EmuTarget::new(&name, config);
                targets
                    .targets
                    .insert(name.clone(), (target.clone(), settings));
                target
            }
        };
        drop(targets);
        let lun = target.add_memory_lun(blocks, block_size);
        Ok(Arc::new(ScsiLeaf::from_emu(lun, &name)?))
    }
}

/// Bytes with an optional `k`, `m`, `g` suffix.
fn parse_byte_size(value: &str) -> Result<u64, String> {
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'k' | b'K') => (&value[..value.len() - 1], 10),
        Some(b'm' | b'M') => (&value[..value.len() - 1], 20),
        Some(b'g' | b'G') => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("`{value}` is not a size (e.g. 4096, 128k, 64m)"))
}
