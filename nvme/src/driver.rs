//! The polled NVMe driver: controller bring-up and admin commands
//! ([`Controller`]), and I/O queue pairs ([`QueuePair`]), generic over the
//! [`Transport`].
//!
//! # Model
//!
//! - Each [`QueuePair`] is owned by one thread (`Send`, `!Sync`). Submission
//!   never blocks and never allocates: command contexts (CID-indexed slots),
//!   request contexts and PRP list pages are preallocated at creation; a
//!   full queue is [`SubmitError::QueueFull`].
//! - Submissions are staged; [`QueuePair::ring`] (or the next
//!   [`QueuePair::poll`]) writes the SQ tail doorbell once for the batch,
//!   or every N staged commands when asked
//!   ([`QueuePair::set_sq_doorbell_every`]).
//! - [`QueuePair::poll`] harvests at most `max` completions and calls the
//!   callback once per request (a request split into several commands
//!   completes once, with the first error).
//! - Everything the device writes (CQEs, identify data) is checked before
//!   use; garbage gives an [`Error::BadDeviceData`], never a panic.
//! - [`Controller::reset`] disables and re-enables the controller; every
//!   queue pair notices on its next call, reports its outstanding requests
//!   as [`IoError::Aborted`] and re-creates its queues.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros};

use crate::dma::{self, DmaBuffer, DmaSlice, Region};
use crate::error::{Error, Result};
use crate::mmio::RegisterAccess;
use crate::regs::{self, Aqa, Cc, Csts, ShutdownStatus};
use crate::spec::{
    CopyRangeFormat0, IdentifyController, IdentifyNamespace, NvmeStatus, OACS_DBBUF,
    SubmissionEntry, admin_opc, cns, fid, nvm_opc,
};
use crate::split::{self, CopyLimits, CopySplitter, PRP_LIST_ENTRIES};
use crate::transport::Transport;

/// Memory page size the driver configures (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;
const ADMIN_ENTRIES: u16 = 32;
/// How long a queue with commands outstanding polls without progress
/// before it checks the controller's status and the command timeouts, and
/// how often it checks again while it stays idle.
const IDLE_CHECK: Duration = Duration::from_millis(1);
const SQE: usize = 64;
const CQE: usize = 16;

/// Options for bringing a controller up.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// I/O queue pairs to ask for (Set Features Number of Queues).
    pub io_queues: u16,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller
    /// offers them (OACS bit 8): most doorbell writes become memory writes.
    /// Off by default: they pay off where an MMIO write traps to a
    /// hypervisor (KVM); on QEMU 7.2 under TCG, measured in one boot, they
    /// cost (QEMU then reads and writes the shadow pages through the IOMMU
    /// for every command): 4 KiB random reads fell from about 25-30 K to
    /// 12-21 K IOPS at QD 1 and from 61-67 K to 30-63 K at QD 32.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            io_queues: 8,
            admin_timeout: Duration::from_secs(10),
            shadow_doorbells: false,
        }
    }
}

/// Options for an I/O queue pair.
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// Queue entries (capped by CAP.MQES + 1); at most `entries - 1`
    /// commands are outstanding.
    pub entries: u16,
    /// Per-command timeout, counted from the doorbell write that hands the
    /// command to the controller (one clock read per doorbell batch);
    /// `None` disables the check.
    pub timeout: Option<Duration>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            entries: 256,
            timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// What the driver knows about a namespace (from Identify Namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Size in blocks (NSZE).
    pub blocks: u64,
    /// Maximum Single Source Range Length.
    pub mssrl: u16,
    /// Maximum Copy Length.
    pub mcl: u32,
    /// Maximum Source Range Count (0's based).
    pub msrc: u8,
}

impl Namespace {
    fn shift(&self) -> u32 {
        self.block_size.trailing_zeros()
    }

    /// Copy limits for one command with format-0 descriptors.
    pub fn copy_limits(&self) -> CopyLimits {
        CopyLimits {
            max_ranges: (self.msrc as usize + 1).min(PAGE_SIZE as usize / 32),
            mssrl: self.mssrl as u64,
            mcl: self.mcl as u64,
        }
    }
}

/// Why a submission was refused. Small and `Copy`: the hot path returns it
/// by value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No free command slot (or not enough for a request that must be
    /// split): poll and retry.
    #[error("queue full")]
    QueueFull,
    /// The request is malformed (reason given).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

/// How a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The device completed a command with an error status.
    #[error("{0}")]
    Status(NvmeStatus),
    /// No completion within the queue's timeout.
    #[error("command timed out")]
    Timeout,
    /// Outstanding when the controller was reset: not known to have been
    /// executed (reported with Command Aborted due to SQ Deletion).
    #[error("aborted by controller reset")]
    Aborted,
}

impl IoError {
    /// The NVMe status this error corresponds to, if any.
    pub fn status(&self) -> Option<NvmeStatus> {
        match self {
            IoError::Status(s) => Some(*s),
            IoError::Aborted => Some(NvmeStatus::ABORTED_SQ_DELETION),
            IoError::Timeout => None,
        }
    }
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The caller's tag.
    pub tag: u64,
    /// Dword 0 of the (last) completion, or the error.
    pub result: std::result::Result<u32, IoError>,
    /// Dword 0 of the (last) completion also when it failed (a failed Copy
    /// reports there the first source range it did not copy); 0 when no
    /// completion arrived (timeout, reset).
    pub dw0: u32,
}

/// A submission/completion queue pair's ring state.
struct Ring {
    qid: u16,
    entries: u16,
    sq: DmaBuffer,
    cq: DmaBuffer,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
    unrung: bool,
    /// Shadow doorbells, when the controller supports them.
    dbbuf: Option<RingDbBuf>,
    /// Last SQ tail and CQ head published (shadow or MMIO).
    sq_published: u16,
    cq_published: u16,
    /// Doorbell register (MMIO) writes so far.
    doorbell_writes: DoorbellWrites,
}

/// Doorbell register writes of a queue pair: each is an MMIO write, which
/// in a VM traps to the hypervisor, so their count per I/O is a cost
/// figure of the submission and completion paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellWrites {
    /// SQ tail doorbell writes.
    pub sq: u64,
    /// CQ head doorbell writes.
    pub cq: u64,
}

/// A queue's slots in the shadow doorbell and EventIdx pages (NVMe Base
/// 2.0, 5.8 Doorbell Buffer Config): the same offsets as its doorbell
/// registers relative to 0x1000.
struct RingDbBuf {
    shadow: Arc<Region>,
    eventidx: Arc<Region>,
    sq_off: usize,
    cq_off: usize,
}

/// Whether moving a doorbell from `old` to `new` passes the controller's
/// EventIdx `ei`, i.e. `ei` lies in `[old, new)` (modulo 2^16): then the
/// controller may be idle and must be told by MMIO. As in Linux's
/// `nvme_dbbuf_need_event` and virtio's `vring_need_event`.
#[inline]
pub(crate) fn need_event(ei: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(ei).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Ring {
    fn new<T: Transport>(t: &T, qid: u16, entries: u16) -> Result<Ring> {
        let stride = regs::Cap(t.regs().read64(regs::CAP)).doorbell_stride();
        let sq = t.dma().alloc(entries as usize * SQE)?;
        let cq = t.dma().alloc(entries as usize * CQE)?;
        Ok(Ring {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            sq_db: regs::sq_tail_doorbell(qid, stride),
            cq_db: regs::cq_head_doorbell(qid, stride),
            unrung: false,
            dbbuf: None,
            sq_published: 0,
            cq_published: 0,
            doorbell_writes: DoorbellWrites::default(),
        })
    }

    /// Back to the state of a freshly created queue: indices zero, phase
    /// one, and the CQ cleared so stale entries cannot look new.
    fn clear(&mut self) {
        self.cq.fill(0);
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase = true;
        self.unrung = false;
        self.sq_published = 0;
        self.cq_published = 0;
        if let Some(d) = &self.dbbuf {
            // A new queue starts at 0; the controller reads these.
            for off in [d.sq_off, d.cq_off] {
                dma::region_write_u32(&d.shadow, off, 0);
                dma::region_write_u32(&d.eventidx, off, 0);
            }
        }
    }

    /// Uses the shadow doorbell pages from now on. A new queue (`fresh`)
    /// starts from zeroed slots; a live one (the admin queue) publishes its
    /// current values on its next doorbell.
    fn attach_dbbuf(&mut self, shadow: Arc<Region>, eventidx: Arc<Region>, fresh: bool) {
        let base = regs::DOORBELL_BASE;
        self.dbbuf = Some(RingDbBuf {
            shadow,
            eventidx,
            sq_off: self.sq_db - base,
            cq_off: self.cq_db - base,
        });
        if fresh {
            self.clear();
        }
    }

    /// Publishes `value` for the doorbell at `db` (shadow slot `off`):
    /// MMIO only when there are no shadow doorbells, when `force`, or when
    /// the controller's EventIdx says it may not look at the shadow.
    /// Returns whether it wrote the register.
    #[inline]
    fn publish<R: RegisterAccess>(
        &self,
        regs: &R,
        db: usize,
        off: Option<usize>,
        value: u16,
        old: u16,
        force: bool,
    ) -> bool {
        match (&self.dbbuf, off) {
            (Some(d), Some(off)) => {
                dma::region_write_u32(&d.shadow, off, value as u32);
                // The shadow store must be visible before we read EventIdx
                // (store -> load ordering needs a full fence); the
                // controller writes EventIdx before re-reading the shadow.
                fence(Ordering::SeqCst);
                let ei = dma::region_read_u32(&d.eventidx, off).unwrap_or(0) as u16;
                if force || need_event(ei, value, old) {
                    regs.write32(db, value as u32);
                    return true;
                }
                false
            }
            _ => {
                regs.write32(db, value as u32);
                true
            }
        }
    }

    /// CQ entries consumed but not yet handed back to the controller.
    #[inline]
    fn cq_unpublished(&self) -> usize {
        let e = self.entries as usize;
        (self.cq_head as usize + e - self.cq_published as usize) % e
    }

    /// Publishes the CQ head after consuming entries.
    #[inline]
    fn ring_cq<R: RegisterAccess>(&mut self, regs: &R) {
        let off = self.dbbuf.as_ref().map(|d| d.cq_off);
        if self.publish(
            regs,
            self.cq_db,
            off,
            self.cq_head,
            self.cq_published,
            self.qid == 0,
        ) {
            self.doorbell_writes.cq += 1;
        }
        self.cq_published = self.cq_head;
    }

    #[inline]
    fn push(&mut self, sqe: &SubmissionEntry) {
        let off = self.sq_tail as usize * SQE;
        let words: [u64; 8] = zerocopy::transmute!(*sqe);
        // In bounds and aligned by construction (sq_tail < entries, 64-byte
        // slots); the write cannot fail.
        let _ = self.sq.write_u64s(off, &words);
        self.sq_tail += 1;
        if self.sq_tail == self.entries {
            self.sq_tail = 0;
        }
        self.unrung = true;
    }

    #[inline]
    fn ring<R: RegisterAccess>(&mut self, regs: &R) {
        if self.unrung {
            // The SQEs were written with ordinary (volatile) stores to
            // write-back memory; the device must see them before it sees
            // the new tail. A full fence orders those stores before the
            // doorbell store on every architecture (on x86 the UC MMIO
            // store is already ordered; this documents and guarantees it).
            fence(Ordering::SeqCst);
            let off = self.dbbuf.as_ref().map(|d| d.sq_off);
            if self.publish(
                regs,
                self.sq_db,
                off,
                self.sq_tail,
                self.sq_published,
                self.qid == 0,
            ) {
                self.doorbell_writes.sq += 1;
            }
            self.sq_published = self.sq_tail;
            self.unrung = false;
        }
    }

    /// The next CQE if its phase tag is current: `(dw0, sqhd, cid, status)`.
    #[inline]
    fn peek(&self) -> Option<(u32, u16, u16, u16)> {
        let off = self.cq_head as usize * CQE;
        let dw3 = self.cq.load_u32(off + 12)?;
        let status = (dw3 >> 16) as u16;
        if (status & 1 != 0) != self.phase {
            return None;
        }
        // The phase tag is written last by the device; read the rest only
        // after seeing it.
        fence(Ordering::Acquire);
        let dw0 = self.cq.load_u32(off)?;
        let dw2 = self.cq.load_u32(off + 8)?;
        Some((dw0, dw2 as u16, dw3 as u16, status))
    }

    #[inline]
    fn advance(&mut self) {
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
    }
}

/// Controller state shared by the [`Controller`] handle and its queue pairs.
struct Shared<T: Transport> {
    transport: T,
    name: String,
    cap: regs::Cap,
    admin: Mutex<AdminQueue>,
    /// Incremented by each reset; queue pairs compare it with theirs.
    generation: AtomicU64,
    qids: Mutex<Vec<bool>>,
    granted: u16,
    ident: Box<IdentifyController>,
    namespaces: Vec<Namespace>,
    max_transfer: usize,
    opts: ControllerOptions,
    failed: AtomicBool,
    /// Shadow doorbell and EventIdx pages, once configured.
    dbbuf: Option<(Arc<Region>, Arc<Region>)>,
}

struct AdminQueue {
    ring: Ring,
    buf: DmaBuffer,
    cid: u16,
    /// Owners of the shadow doorbell and EventIdx pages.
    dbbuf_pages: Option<(DmaBuffer, DmaBuffer)>,
}

/// An NVMe controller, brought up and identified. Cheap to share: queue
/// pairs keep it alive. Dropping the last handle (and every queue pair)
/// shuts the controller down (CC.SHN).
pub struct Controller<T: Transport> {
    shared: Arc<Shared<T>>,
}

fn wait_until<R: RegisterAccess>(
    regs: &R,
    name: &str,
    timeout: Duration,
    what: &'static str,
    done: impl Fn(Csts) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let csts = regs.csts();
        if done(csts) {
            return Ok(());
        }
        if csts.contains(Csts::CFS) && csts.bits() != u32::MAX {
            return Err(Error::ControllerFatal {
                device: name.to_owned(),
            });
        }
        if start.elapsed() > timeout {
            return Err(Error::ControllerTimeout {
                device: name.to_owned(),
                what,
                waited_ms: timeout.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn disable<T: Transport>(t: &T, name: &str, cap: regs::Cap) -> Result<()> {
    let regs = t.regs();
    let cc = regs.cc();
    if cc.en() {
        regs.write32(regs::CC, cc.with_en(false).0);
    }
    wait_until(
        regs,
        name,
        cap.ready_timeout().max(Duration::from_millis(500)),
        "CSTS.RDY = 0",
        |c| !c.contains(Csts::RDY),
    )
}

fn enable<T: Transport>(t: &T, name: &str, cap: regs::Cap, admin: &AdminQueue) -> Result<()> {
    let regs = t.regs();
    let aqa = Aqa::from_entries(ADMIN_ENTRIES, ADMIN_ENTRIES)
        .ok_or(Error::InvalidArgument("admin queue size"))?;
    regs.write32(regs::AQA, aqa.0);
    regs.write64(regs::ASQ, admin.ring.sq.iova());
    regs.write64(regs::ACQ, admin.ring.cq.iova());
    let cc = Cc::default()
        .with_css(Cc::CSS_NVM)
        .with_mps(0)
        .with_ams(Cc::AMS_ROUND_ROBIN)
        .with_iosqes(Cc::IOSQES_NVM)
        .with_iocqes(Cc::IOCQES_NVM)
        .with_en(true);
    regs.write32(regs::CC, cc.0);
    wait_until(
        regs,
        name,
        cap.ready_timeout().max(Duration::from_millis(500)),
        "CSTS.RDY = 1",
        |c| c.contains(Csts::RDY) && c.bits() != u32::MAX,
    )
}

impl<T: Transport> Controller<T> {
    /// Brings the controller up per the specification: disable and wait
    /// for CSTS.RDY = 0 within CAP.TO, set up the admin queue, enable and
    /// wait for RDY, Identify the controller and its active namespaces,
    /// and ask for `opts.io_queues` I/O queue pairs.
    pub fn new(transport: T, opts: ControllerOptions) -> Result<Controller<T>> {
        let name = transport.name();
        let cap = transport.regs().cap();
        if cap.0 == u64::MAX {
            return Err(Error::BadDeviceData {
                device: name,
                what: "CAP reads all ones".into(),
            });
        }
        if !cap.css_nvm() {
            return Err(Error::Unsupported {
                device: name,
                what: "the NVM command set (CAP.CSS bit 0)".into(),
            });
        }
        if cap.mpsmin() != 0 {
            return Err(Error::Unsupported {
                device: name,
                what: format!("4 KiB memory pages (CAP.MPSMIN = {})", cap.mpsmin()),
            });
        }
        if cap.mqes() < 1 {
            return Err(Error::BadDeviceData {
                device: name,
                what: "CAP.MQES = 0".into(),
            });
        }
        disable(&transport, &name, cap)?;
        let admin = AdminQueue {
            ring: Ring::new(&transport, 0, ADMIN_ENTRIES)?,
            buf: transport.dma().alloc(PAGE_SIZE as usize)?,
            cid: 0,
            dbbuf_pages: None,
        };
        enable(&transport, &name, cap, &admin)?;
        let mut ctrl = Controller {
            shared: Arc::new(Shared {
                name: name.clone(),
                cap,
                admin: Mutex::new(admin),
                generation: AtomicU64::new(0),
                qids: Mutex::new(Vec::new()),
                granted: 0,
                ident: Box::new(IdentifyController::new_zeroed()),
                namespaces: Vec::new(),
                max_transfer: 0,
                opts: opts.clone(),
                failed: AtomicBool::new(false),
                dbbuf: None,
                transport,
            }),
        };
        let ident = ctrl.identify_controller()?;
        let mdts = match ident.mdts {
            0 => None,
            m => 1u64
                .checked_shl(m as u32)
                .and_then(|p| p.checked_mul(PAGE_SIZE)),
        };
        let max_transfer = mdts
            .unwrap_or(u64::MAX)
            .min(split::max_prp_transfer(PAGE_SIZE)) as usize;
        let namespaces = ctrl.identify_namespaces(ident.nn.get())?;
        let granted = ctrl.set_queue_count(opts.io_queues)?;
        let max_qid = ctrl.shared.transport.max_doorbell_qid();
        let granted = granted.min(max_qid);
        let dbbuf = if opts.shadow_doorbells && ident.oacs.get() & OACS_DBBUF != 0 {
            let s = &ctrl.shared;
            Some(s.configure_dbbuf(&mut s.lock_admin())?)
        } else {
            None
        };
        let shared = Arc::get_mut(&mut ctrl.shared)
            .ok_or(Error::InvalidArgument("controller shared during bring-up"))?;
        *shared.ident = ident;
        shared.max_transfer = max_transfer;
        shared.namespaces = namespaces;
        shared.granted = granted;
        shared.dbbuf = dbbuf;
        shared.qids = Mutex::new(vec![false; granted as usize + 1]);
        tracing::info!(
            device = %shared.name,
            model = %shared.ident.model(),
            serial = %shared.ident.serial(),
            mdts = shared.ident.mdts,
            max_transfer,
            io_queues = granted,
            shadow_doorbells = shared.dbbuf.is_some(),
            namespaces = shared.namespaces.len(),
            "NVMe controller ready"
        );
        Ok(ctrl)
    }

    /// The transport (VFIO device or emulator).
    pub fn transport(&self) -> &T {
        &self.shared.transport
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// CAP as read at bring-up.
    pub fn cap(&self) -> regs::Cap {
        self.shared.cap
    }

    /// Identify Controller data from bring-up.
    pub fn identify(&self) -> &IdentifyController {
        &self.shared.ident
    }

    /// Active namespaces, in NSID order.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.shared.namespaces
    }

    /// The namespace `nsid`, if active.
    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        self.shared
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .copied()
    }

    /// Largest transfer of one command (MDTS, capped by one PRP list page).
    pub fn max_transfer(&self) -> usize {
        self.shared.max_transfer
    }

    /// I/O queue pairs granted.
    pub fn io_queues(&self) -> u16 {
        self.shared.granted
    }

    /// Allocates a DMA buffer usable with this controller.
    pub fn dma_alloc(&self, len: usize) -> Result<DmaBuffer> {
        self.shared.transport.dma().alloc(len)
    }

    /// Checks CSTS.CFS.
    pub fn check_fatal(&self) -> Result<()> {
        self.shared.check_fatal()
    }

    /// Runs one admin command and waits for it (bounded by the admin
    /// timeout). `data` is the length of the transfer through the admin
    /// data page (PRP1), at most 4 KiB; `to_device` bytes are copied there
    /// first. Returns dword 0 and, for transfers from the device, the bytes.
    pub fn admin(
        &self,
        what: &str,
        sqe: SubmissionEntry,
        data: usize,
        to_device: Option<&[u8]>,
    ) -> Result<(u32, Vec<u8>)> {
        self.shared.admin(what, sqe, data, to_device)
    }

    fn identify_controller(&self) -> Result<IdentifyController> {
        let sqe = SubmissionEntry::new(admin_opc::IDENTIFY, 0).with_cdws(&[cns::CONTROLLER as u32]);
        let (_, data) = self.admin("Identify Controller", sqe, 4096, None)?;
        IdentifyController::read_from_bytes(&data).map_err(|_| Error::BadDeviceData {
            device: self.shared.name.clone(),
            what: "short Identify Controller data".into(),
        })
    }

    /// Identify Namespace `nsid`, raw.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace> {
        let sqe =
            SubmissionEntry::new(admin_opc::IDENTIFY, nsid).with_cdws(&[cns::NAMESPACE as u32]);
        let (_, data) = self.admin(&format!("Identify Namespace {nsid}"), sqe, 4096, None)?;
        IdentifyNamespace::read_from_bytes(&data).map_err(|_| Error::BadDeviceData {
            device: self.shared.name.clone(),
            what: "short Identify Namespace data".into(),
        })
    }

    fn identify_namespaces(&self, nn: u32) -> Result<Vec<Namespace>> {
        let sqe =
            SubmissionEntry::new(admin_opc::IDENTIFY, 0).with_cdws(&[cns::ACTIVE_NS_LIST as u32]);
        let (_, data) = self.admin("Identify Active Namespace List", sqe, 4096, None)?;
        let mut out = Vec::new();
        let mut last = 0u32;
        for w in data.chunks_exact(4) {
            let nsid = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            if nsid == 0 {
                break;
            }
            if nsid <= last || nsid > nn {
                return Err(Error::BadDeviceData {
                    device: self.shared.name.clone(),
                    what: format!("active namespace list entry {nsid} after {last} (NN {nn})"),
                });
            }
            last = nsid;
            let id = self.identify_namespace(nsid)?;
            let Some(block_size) = id.block_size() else {
                return Err(Error::BadDeviceData {
                    device: self.shared.name.clone(),
                    what: format!(
                        "namespace {nsid}: FLBAS {:#x} names no valid LBA format",
                        id.flbas
                    ),
                });
            };
            out.push(Namespace {
                nsid,
                block_size,
                blocks: id.nsze.get(),
                mssrl: id.mssrl.get(),
                mcl: id.mcl.get(),
                msrc: id.msrc,
            });
        }
        Ok(out)
    }

    fn set_queue_count(&self, want: u16) -> Result<u16> {
        let n = want.clamp(1, 0xfffe) - 1;
        let sqe = SubmissionEntry::new(admin_opc::SET_FEATURES, 0)
            .with_cdws(&[fid::NUMBER_OF_QUEUES as u32, n as u32 | (n as u32) << 16]);
        let (dw0, _) = self.admin("Set Features Number of Queues", sqe, 0, None)?;
        let nsq = (dw0 & 0xffff) as u16;
        let ncq = (dw0 >> 16) as u16;
        Ok(nsq.min(ncq).saturating_add(1).min(want.max(1)))
    }

    /// Creates an I/O queue pair on a free queue id.
    pub fn create_qpair(&self, opts: QueueOptions) -> Result<QueuePair<T>> {
        QueuePair::new(Arc::clone(&self.shared), opts)
    }

    /// Resets the controller: CC.EN 1 → 0 (the controller deletes every
    /// queue and aborts what they held), re-creates the admin queue and
    /// re-enables. Each queue pair then reports its outstanding requests as
    /// [`IoError::Aborted`] on its next `poll` and re-creates its queues.
    pub fn reset(&self) -> Result<()> {
        let s = &self.shared;
        // The admin lock is held throughout: a queue pair that notices the
        // reset re-creates its queues only once the controller is back.
        let mut admin = s.lock_admin();
        // Bump first: a queue pair racing with us stops trusting its ring.
        s.generation.fetch_add(1, Ordering::SeqCst);
        disable(&s.transport, &s.name, s.cap)?;
        admin.ring.clear();
        enable(&s.transport, &s.name, s.cap, &admin)?;
        let n = s.granted.saturating_sub(1) as u32;
        let sqe = SubmissionEntry::new(admin_opc::SET_FEATURES, 0)
            .with_cdws(&[fid::NUMBER_OF_QUEUES as u32, n | n << 16]);
        s.admin_locked(&mut admin, "Set Features Number of Queues", sqe, 0, None)?;
        if s.dbbuf.is_some() {
            // CC.EN 1 -> 0 also dropped the shadow doorbell configuration.
            admin.ring.dbbuf = None;
            s.configure_dbbuf(&mut admin)?;
        }
        drop(admin);
        s.failed.store(false, Ordering::SeqCst);
        tracing::info!(device = %s.name, "controller reset");
        Ok(())
    }
}

impl<T: Transport> Clone for Controller<T> {
    fn clone(&self) -> Self {
        Controller {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T: Transport> std::fmt::Debug for Controller<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.shared.name)
            .field("io_queues", &self.shared.granted)
            .field("namespaces", &self.shared.namespaces)
            .finish()
    }
}

impl<T: Transport> Shared<T> {
    fn lock_admin(&self) -> MutexGuard<'_, AdminQueue> {
        // The admin queue is left consistent before anything can panic.
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_fatal(&self) -> Result<()> {
        let csts = self.transport.regs().csts();
        if csts.contains(Csts::CFS) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(Error::ControllerFatal {
                device: self.name.clone(),
            });
        }
        Ok(())
    }

    fn admin(
        &self,
        what: &str,
        sqe: SubmissionEntry,
        data: usize,
        to_device: Option<&[u8]>,
    ) -> Result<(u32, Vec<u8>)> {
        let mut q = self.lock_admin();
        self.admin_locked(&mut q, what, sqe, data, to_device)
    }

    fn admin_locked(
        &self,
        q: &mut AdminQueue,
        what: &str,
        mut sqe: SubmissionEntry,
        data: usize,
        to_device: Option<&[u8]>,
    ) -> Result<(u32, Vec<u8>)> {
        if data > PAGE_SIZE as usize || to_device.is_some_and(|d| d.len() > data) {
            return Err(Error::InvalidArgument("admin data beyond one 4 KiB page"));
        }
        if data > 0 {
            q.buf.fill(0);
            if let Some(d) = to_device {
                q.buf.write_bytes(0, d)?;
            }
            sqe.prp1 = q.buf.iova().into();
        }
        q.cid = q.cid.wrapping_add(1);
        let cid = q.cid;
        sqe.cid = cid.into();
        q.ring.push(&sqe);
        q.ring.ring(self.transport.regs());
        let start = Instant::now();
        let timeout = self.opts.admin_timeout;
        let mut spins = 0u32;
        loop {
            if let Some((dw0, sqhd, got_cid, status)) = q.ring.peek() {
                q.ring.advance();
                q.ring.ring_cq(self.transport.regs());
                if sqhd >= q.ring.entries {
                    return Err(Error::BadDeviceData {
                        device: self.name.clone(),
                        what: format!(
                            "admin CQE with SQ head {sqhd} (queue of {})",
                            q.ring.entries
                        ),
                    });
                }
                q.ring.sq_head = sqhd;
                if got_cid != cid {
                    // A stale completion (e.g. of a timed-out command): skip.
                    tracing::warn!(device = %self.name, got_cid, cid, "unexpected admin completion skipped");
                    continue;
                }
                let st = NvmeStatus::from_field(status);
                if !st.is_success() {
                    return Err(Error::AdminCommand {
                        device: self.name.clone(),
                        command: what.to_owned(),
                        status: st,
                    });
                }
                let mut out = vec![0u8; data];
                if data > 0 {
                    q.buf.read_bytes(0, &mut out)?;
                }
                return Ok((dw0, out));
            }
            spins += 1;
            if spins.is_multiple_of(256) {
                self.check_fatal()?;
                if start.elapsed() > timeout {
                    return Err(Error::AdminTimeout {
                        device: self.name.clone(),
                        command: what.to_owned(),
                        waited_ms: timeout.as_millis() as u64,
                    });
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn create_queues(&self, ring: &Ring) -> Result<()> {
        let qid = ring.qid as u32;
        let qsize = (ring.entries - 1) as u32;
        let mut cq =
            SubmissionEntry::new(admin_opc::CREATE_CQ, 0).with_cdws(&[qid | qsize << 16, 1]);
        cq.prp1 = ring.cq.iova().into();
        self.admin(&format!("Create I/O CQ {qid}"), cq, 0, None)?;
        let mut sq = SubmissionEntry::new(admin_opc::CREATE_SQ, 0)
            .with_cdws(&[qid | qsize << 16, 1 | qid << 16]);
        sq.prp1 = ring.sq.iova().into();
        if let Err(e) = self.admin(&format!("Create I/O SQ {qid}"), sq, 0, None) {
            let del = SubmissionEntry::new(admin_opc::DELETE_CQ, 0).with_cdws(&[qid]);
            let _ = self.admin(&format!("Delete I/O CQ {qid}"), del, 0, None);
            return Err(e);
        }
        Ok(())
    }

    fn delete_queues(&self, qid: u16) -> Result<()> {
        let q = qid as u32;
        let sq = SubmissionEntry::new(admin_opc::DELETE_SQ, 0).with_cdws(&[q]);
        self.admin(&format!("Delete I/O SQ {qid}"), sq, 0, None)?;
        let cq = SubmissionEntry::new(admin_opc::DELETE_CQ, 0).with_cdws(&[q]);
        self.admin(&format!("Delete I/O CQ {qid}"), cq, 0, None)?;
        Ok(())
    }

    /// Sends Doorbell Buffer Config with the shadow doorbell and EventIdx
    /// pages (allocated on first use) and attaches the admin ring to them.
    fn configure_dbbuf(&self, q: &mut AdminQueue) -> Result<(Arc<Region>, Arc<Region>)> {
        if q.dbbuf_pages.is_none() {
            let a = self.transport.dma().alloc(PAGE_SIZE as usize)?;
            let b = self.transport.dma().alloc(PAGE_SIZE as usize)?;
            q.dbbuf_pages = Some((a, b));
        }
        let Some((a, b)) = &q.dbbuf_pages else {
            return Err(Error::InvalidArgument("shadow doorbell pages"));
        };
        let mut sqe = SubmissionEntry::new(admin_opc::DBBUF_CONFIG, 0);
        sqe.prp1 = a.iova().into();
        sqe.prp2 = b.iova().into();
        let (shadow, eventidx) = (a.region(), b.region());
        self.admin_locked(q, "Doorbell Buffer Config", sqe, 0, None)?;
        q.ring
            .attach_dbbuf(Arc::clone(&shadow), Arc::clone(&eventidx), false);
        Ok((shadow, eventidx))
    }

    fn lock_qids(&self) -> MutexGuard<'_, Vec<bool>> {
        self.qids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Transport> Drop for Shared<T> {
    fn drop(&mut self) {
        // Normal shutdown (CC.SHN = 01b), then wait for SHST = complete.
        let regs = self.transport.regs();
        let cc = regs.cc();
        if !cc.en() {
            return;
        }
        regs.write32(regs::CC, cc.with_shn(Cc::SHN_NORMAL).0);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let csts = regs.csts();
            if csts.shst() == ShutdownStatus::Complete || csts.bits() == u32::MAX {
                tracing::debug!(device = %self.name, "controller shut down");
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        tracing::warn!(device = %self.name, "shutdown did not complete within 5 s");
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Busy,
    /// Reported as timed out; the CID stays out of use until a reset, since
    /// the device may still complete it.
    TimedOut,
}

#[derive(Clone, Copy)]
struct Slot {
    state: SlotState,
    req: u16,
    submitted: Option<Instant>,
}

struct Req {
    busy: bool,
    tag: u64,
    remaining: u16,
    error: Option<IoError>,
    dw0: u32,
    /// Keeps the data buffer alive while the device owns it.
    buf: Option<DmaSlice>,
    aborted: bool,
}

/// An I/O submission/completion queue pair, owned by one thread: `Send`,
/// not `Sync`.
///
/// ```compile_fail
/// fn sync<T: Sync>() {}
/// sync::<nvme::QueuePair<nvme::emu::EmuController>>();
/// ```
pub struct QueuePair<T: Transport> {
    shared: Arc<Shared<T>>,
    ring: Ring,
    generation: u64,
    /// One 4 KiB page per CID: PRP list, Copy descriptors or DSM ranges.
    pool: DmaBuffer,
    slots: Box<[Slot]>,
    free_cids: Vec<u16>,
    reqs: Box<[Req]>,
    free_reqs: Vec<u16>,
    timeout: Option<Duration>,
    outstanding: usize,
    aborted_pending: usize,
    idle_polls: u32,
    /// When an idle queue next looks at the controller (see `poll`).
    idle_check_at: Option<Instant>,
    max_transfer: usize,
    /// CIDs submitted since the last doorbell: their timeout starts when
    /// it is rung.
    unstamped: Vec<u16>,
    /// Ring the SQ doorbell once this many commands are staged (0: only
    /// on `ring`/`poll`).
    sq_doorbell_every: u16,
    /// Commands staged since the last SQ doorbell.
    staged: u16,
}

impl<T: Transport> QueuePair<T> {
    fn new(shared: Arc<Shared<T>>, opts: QueueOptions) -> Result<QueuePair<T>> {
        let entries = opts.entries.clamp(
            2,
            shared.cap.max_queue_entries().min(u16::MAX as u32) as u16,
        );
        let qid = {
            let mut q = shared.lock_qids();
            match (1..q.len()).find(|&i| !q[i]) {
                Some(i) => {
                    q[i] = true;
                    i as u16
                }
                None => {
                    return Err(Error::NoFreeQueue {
                        device: shared.name.clone(),
                        granted: shared.granted,
                    });
                }
            }
        };
        let release = |shared: &Shared<T>| shared.lock_qids()[qid as usize] = false;
        let built = (|| {
            let mut ring = Ring::new(&shared.transport, qid, entries)?;
            if let Some((sh, ei)) = &shared.dbbuf {
                ring.attach_dbbuf(Arc::clone(sh), Arc::clone(ei), true);
            }
            let depth = entries as usize - 1;
            let pool = shared.transport.dma().alloc(depth * PAGE_SIZE as usize)?;
            shared.create_queues(&ring)?;
            Ok((ring, pool, depth))
        })();
        let (ring, pool, depth) = match built {
            Ok(b) => b,
            Err(e) => {
                release(&shared);
                return Err(e);
            }
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        let max_transfer = shared.max_transfer;
        Ok(QueuePair {
            generation,
            ring,
            pool,
            slots: vec![
                Slot {
                    state: SlotState::Free,
                    req: 0,
                    submitted: None,
                };
                depth
            ]
            .into_boxed_slice(),
            free_cids: (0..depth as u16).rev().collect(),
            reqs: (0..depth)
                .map(|_| Req {
                    busy: false,
                    tag: 0,
                    remaining: 0,
                    error: None,
                    dw0: 0,
                    buf: None,
                    aborted: false,
                })
                .collect(),
            free_reqs: (0..depth as u16).rev().collect(),
            timeout: opts.timeout,
            outstanding: 0,
            aborted_pending: 0,
            idle_polls: 0,
            idle_check_at: None,
            max_transfer,
            unstamped: Vec::with_capacity(depth),
            sq_doorbell_every: 0,
            staged: 0,
            shared,
        })
    }

    /// The queue id.
    pub fn qid(&self) -> u16 {
        self.ring.qid
    }

    /// Commands that may be outstanding at once (entries - 1).
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Requests submitted and not yet reported by `poll`.
    pub fn outstanding(&self) -> usize {
        self.reqs.iter().filter(|r| r.busy).count()
    }

    /// Free command slots right now.
    pub fn free_slots(&self) -> usize {
        self.free_cids.len()
    }

    /// Largest data transfer of one command; larger reads and writes are
    /// split.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// Doorbell register writes since the queue pair was created.
    pub fn doorbell_writes(&self) -> DoorbellWrites {
        self.ring.doorbell_writes
    }

    #[inline]
    fn stale(&self) -> bool {
        self.shared.generation.load(Ordering::Acquire) != self.generation
    }

    /// After a controller reset: every outstanding request becomes
    /// Aborted (reported by the next poll), the ring restarts, the queues
    /// are re-created.
    fn recover(&mut self) -> Result<()> {
        let gen_now = self.shared.generation.load(Ordering::SeqCst);
        for r in self.reqs.iter_mut().filter(|r| r.busy && !r.aborted) {
            r.aborted = true;
            self.aborted_pending += 1;
        }
        for (cid, s) in self.slots.iter_mut().enumerate() {
            if s.state != SlotState::Free {
                s.state = SlotState::Free;
                self.free_cids.push(cid as u16);
            }
        }
        self.outstanding = 0;
        self.unstamped.clear();
        self.staged = 0;
        self.ring.clear();
        self.generation = gen_now;
        self.shared.create_queues(&self.ring)
    }

    fn alloc_req(&mut self, tag: u64, parts: u16, buf: Option<DmaSlice>) -> u16 {
        // Callers checked free_cids.len() ≥ parts ≥ 1; free_reqs is at least
        // as long as free_cids (each busy request holds ≥ 1 CID or is an
        // aborted request awaiting report, which holds none but counts).
        let r = self.free_reqs.pop().unwrap_or(0);
        let req = &mut self.reqs[r as usize];
        req.busy = true;
        req.tag = tag;
        req.remaining = parts;
        req.error = None;
        req.dw0 = 0;
        req.buf = buf;
        req.aborted = false;
        r
    }

    #[inline]
    fn check_submit(&mut self, parts: usize) -> std::result::Result<(), SubmitError> {
        if self.stale() && self.recover().is_err() {
            return Err(SubmitError::Invalid("queue pair lost by controller reset"));
        }
        if parts == 0 {
            return Err(SubmitError::Invalid("empty request"));
        }
        if parts > self.slots.len() {
            return Err(SubmitError::Invalid(
                "request needs more commands than the queue depth",
            ));
        }
        if self.free_cids.len() < parts || self.free_reqs.is_empty() {
            return Err(SubmitError::QueueFull);
        }
        // The controller sees consumed-but-unpublished CQ entries as
        // occupied: every command in flight must still find a free slot.
        if self.ring.cq_unpublished() + self.outstanding + parts >= self.ring.entries as usize {
            self.ring.ring_cq(self.shared.transport.regs());
        }
        Ok(())
    }

    #[inline]
    fn push_cmd(&mut self, req: u16, mut sqe: SubmissionEntry) -> u16 {
        let cid = self.free_cids.pop().unwrap_or(0);
        let slot = &mut self.slots[cid as usize];
        slot.state = SlotState::Busy;
        slot.req = req;
        // Stamped when the doorbell is rung (one clock read per batch).
        slot.submitted = None;
        if self.timeout.is_some() {
            self.unstamped.push(cid);
        }
        sqe.cid = cid.into();
        self.ring.push(&sqe);
        self.outstanding += 1;
        self.staged = self.staged.saturating_add(1);
        if self.staged == self.sq_doorbell_every {
            self.ring_and_stamp();
        }
        cid
    }

    /// Rings the SQ doorbell by itself each time `n` commands are staged,
    /// so the controller starts on the first part of a large refill while
    /// the rest is still being queued; 0 (the default) rings only on
    /// [`QueuePair::ring`] and [`QueuePair::poll`]: one doorbell write per
    /// batch, the fewest MMIO writes.
    ///
    /// Measured on QEMU 7.2's controller under TCG (4 KiB random reads,
    /// `ustor-perf --sq-doorbell-every`): at QD 32, 16 gave about 425 K
    /// IOPS against 360 K with one doorbell per refill; at QD 64 and 128,
    /// extra doorbells cost 5-15 % (each MMIO write waits for QEMU's device
    /// lock while it processes the previous part).
    pub fn set_sq_doorbell_every(&mut self, n: u16) {
        self.sq_doorbell_every = n;
    }

    /// Rings the SQ doorbell for staged commands and starts their
    /// timeouts, with one clock read for the batch.
    #[inline]
    fn ring_and_stamp(&mut self) {
        if !self.unstamped.is_empty() {
            let now = Instant::now();
            for &cid in &self.unstamped {
                if let Some(slot) = self.slots.get_mut(cid as usize)
                    && slot.state == SlotState::Busy
                {
                    slot.submitted = Some(now);
                }
            }
            self.unstamped.clear();
        }
        self.staged = 0;
        self.ring.ring(self.shared.transport.regs());
    }

    #[inline]
    fn pool_iova(&self, cid: u16) -> u64 {
        self.pool.iova() + cid as u64 * PAGE_SIZE
    }

    /// A read or write of `len` bytes at `iova`; `keep` holds the memory
    /// alive while the device owns it, when the caller handed one over.
    fn rw(
        &mut self,
        opc: u8,
        ns: &Namespace,
        lba: u64,
        (iova, len): (u64, usize),
        keep: Option<&DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let shift = ns.shift();
        if len == 0 || len & (ns.block_size as usize - 1) != 0 {
            return Err(SubmitError::Invalid(
                "length is not a multiple of the block size",
            ));
        }
        if !iova.is_multiple_of(4) {
            return Err(SubmitError::Invalid("buffer is not dword aligned"));
        }
        let blocks = (len >> shift) as u64;
        if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        // Split at multiples of the block size no larger than max_transfer;
        // the first page may be partial, so leave room for it in the list.
        let chunk = (self.max_transfer >> shift << shift).max(ns.block_size as usize);
        let parts = len.div_ceil(chunk);
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, keep.cloned());
        let base_iova = iova;
        let mut off = 0usize;
        while off < len {
            let n = chunk.min(len - off);
            let iova = base_iova + off as u64;
            let cid_peek = *self.free_cids.last().unwrap_or(&0);
            let list = self.pool_iova(cid_peek);
            let pool = &self.pool;
            let base = cid_peek as usize * PAGE_SIZE as usize;
            let prps = split::build_prps(iova, n, PAGE_SIZE, list, |k, e| {
                let _ = pool.write_u64(base + 8 * k, e);
            });
            let Some((prp1, prp2, _)) = prps else {
                // Unreachable: the buffer is dword aligned and each part is
                // at most max_transfer ≤ one PRP list page. Should it ever
                // happen, the part is failed, never sent malformed, and the
                // request is still reported exactly once.
                let r = &mut self.reqs[req as usize];
                r.error = Some(IoError::Status(NvmeStatus::INVALID_FIELD));
                r.remaining -= 1;
                if r.remaining == 0 {
                    r.aborted = true;
                    self.aborted_pending += 1;
                }
                off += n;
                continue;
            };
            let nlb = (n >> shift) as u32 - 1;
            let slba = lba + (off >> shift) as u64;
            let mut sqe = SubmissionEntry::new(opc, ns.nsid).with_cdws(&[
                slba as u32,
                (slba >> 32) as u32,
                nlb,
            ]);
            sqe.prp1 = prp1.into();
            sqe.prp2 = prp2.into();
            self.push_cmd(req, sqe);
            off += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes (a multiple of the block size) at `lba` into
    /// `buf`. Staged: call [`QueuePair::ring`] or [`QueuePair::poll`].
    #[inline]
    pub fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(
            nvm_opc::READ,
            ns,
            lba,
            (buf.iova(), buf.len()),
            Some(buf),
            tag,
        )
    }

    /// Reads `len` bytes (a multiple of the block size) at `lba` into the
    /// DMA memory at `iova`, which the caller keeps alive: for layers that
    /// describe buffers by address (the block-device stack). Staged like
    /// [`QueuePair::read`].
    ///
    /// # Safety
    ///
    /// `iova..iova + len` must be memory of this controller's
    /// [`DmaContext`](crate::DmaContext) that stays allocated, and that
    /// nobody else reads or writes, until this request's completion has
    /// been reported by [`QueuePair::poll`] (or the queue pair dropped).
    #[inline]
    pub unsafe fn read_iova(
        &mut self,
        ns: &Namespace,
        lba: u64,
        iova: u64,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(nvm_opc::READ, ns, lba, (iova, len), None, tag)
    }

    /// Writes `len` bytes at `iova` to `lba`. Staged like
    /// [`QueuePair::read`].
    ///
    /// # Safety
    ///
    /// `iova..iova + len` must be memory of this controller's
    /// [`DmaContext`](crate::DmaContext) that stays allocated, and that
    /// nobody writes, until this request's completion has been reported by
    /// [`QueuePair::poll`] (or the queue pair dropped).
    #[inline]
    pub unsafe fn write_iova(
        &mut self,
        ns: &Namespace,
        lba: u64,
        iova: u64,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(nvm_opc::WRITE, ns, lba, (iova, len), None, tag)
    }

    /// Writes `buf` at `lba`. Staged like [`QueuePair::read`].
    #[inline]
    pub fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(
            nvm_opc::WRITE,
            ns,
            lba,
            (buf.iova(), buf.len()),
            Some(buf),
            tag,
        )
    }

    /// Flushes the namespace's volatile write cache.
    pub fn flush(&mut self, ns: &Namespace, tag: u64) -> std::result::Result<(), SubmitError> {
        self.check_submit(1)?;
        let req = self.alloc_req(tag, 1, None);
        self.push_cmd(req, SubmissionEntry::new(nvm_opc::FLUSH, ns.nsid));
        Ok(())
    }

    /// Writes zeroes to `blocks` blocks at `lba` (split at 65536 blocks).
    pub fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if blocks == 0 || lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(SubmitError::Invalid(
                "LBA range empty or beyond the namespace",
            ));
        }
        let parts = blocks.div_ceil(65536) as usize;
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, None);
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(65536);
            let s = lba + done;
            let sqe = SubmissionEntry::new(nvm_opc::WRITE_ZEROES, ns.nsid).with_cdws(&[
                s as u32,
                (s >> 32) as u32,
                (n - 1) as u32,
            ]);
            self.push_cmd(req, sqe);
            done += n;
        }
        Ok(())
    }

    /// Deallocates (trims) `ranges` of `(lba, blocks)`: one Dataset
    /// Management command, at most 256 ranges of at most 2^32 - 1 blocks.
    pub fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u32)],
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(SubmitError::Invalid("deallocate takes 1 to 256 ranges"));
        }
        if ranges
            .iter()
            .any(|&(l, n)| l.checked_add(n as u64).is_none_or(|e| e > ns.blocks))
        {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        self.check_submit(1)?;
        let cid = *self.free_cids.last().unwrap_or(&0);
        let base = cid as usize * PAGE_SIZE as usize;
        for (i, &(l, n)) in ranges.iter().enumerate() {
            let at = base + 16 * i;
            let _ = self.pool.write_u32(at, 0);
            let _ = self.pool.write_u32(at + 4, n);
            let _ = self.pool.write_u64(at + 8, l);
        }
        let req = self.alloc_req(tag, 1, None);
        let mut sqe = SubmissionEntry::new(nvm_opc::DSM, ns.nsid)
            .with_cdws(&[(ranges.len() - 1) as u32, 1 << 2]);
        sqe.prp1 = self.pool_iova(cid).into();
        self.push_cmd(req, sqe);
        Ok(())
    }

    /// Copies source `ranges` of `(lba, blocks)`, concatenated, to `dest`
    /// within the namespace, split into as many Copy commands (format 0) as
    /// MSRC, MSSRL and MCL require; completes once.
    pub fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let total = ranges.iter().try_fold(0u64, |a, r| a.checked_add(r.1));
        if total.is_none_or(|t| t == 0 || dest.checked_add(t).is_none_or(|e| e > ns.blocks))
            || ranges
                .iter()
                .any(|&(l, n)| l.checked_add(n).is_none_or(|e| e > ns.blocks))
        {
            return Err(SubmitError::Invalid(
                "copy range empty or beyond the namespace",
            ));
        }
        let Some(splitter) = CopySplitter::new(ranges, dest, ns.copy_limits()) else {
            return Err(SubmitError::Invalid(
                "namespace cannot copy (MSSRL, MCL or MSRC is 0)",
            ));
        };
        let parts = splitter.count_commands();
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, None);
        let mut sp = splitter;
        loop {
            let cid = *self.free_cids.last().unwrap_or(&0);
            let base = cid as usize * PAGE_SIZE as usize;
            let pool = &self.pool;
            let Some((d, count, _)) = sp.next_command(|i, slba, n| {
                write_copy_desc(pool, base + 32 * i, slba, n);
            }) else {
                break;
            };
            self.push_copy(req, ns, cid, d, count);
        }
        Ok(())
    }

    /// Sends exactly one Copy command (format 0) with these source ranges
    /// and no splitting: the device enforces its limits (Command Size Limit
    /// Exceeded when they are exceeded). At most 128 ranges, each at most
    /// 65536 blocks.
    pub fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if ranges.is_empty() || ranges.len() > 128 || ranges.iter().any(|r| r.1 == 0 || r.1 > 65536)
        {
            return Err(SubmitError::Invalid(
                "one Copy takes 1 to 128 ranges of 1 to 65536 blocks",
            ));
        }
        self.check_submit(1)?;
        let cid = *self.free_cids.last().unwrap_or(&0);
        let base = cid as usize * PAGE_SIZE as usize;
        for (i, &(slba, n)) in ranges.iter().enumerate() {
            write_copy_desc(&self.pool, base + 32 * i, slba, n);
        }
        let req = self.alloc_req(tag, 1, None);
        self.push_copy(req, ns, cid, dest, ranges.len());
        Ok(())
    }

    /// Passthrough: sends `sqe` as given except for the CID and, when
    /// `buf` is given, PRP1/PRP2 describing it (at most
    /// [`QueuePair::max_transfer`] bytes). No other check: the device
    /// judges the command.
    pub fn submit_raw(
        &mut self,
        mut sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if let Some(b) = buf
            && (b.is_empty() || b.len() > self.max_transfer || b.iova() % 4 != 0)
        {
            return Err(SubmitError::Invalid(
                "raw buffer empty, misaligned or beyond max transfer",
            ));
        }
        self.check_submit(1)?;
        if let Some(b) = buf {
            let cid = *self.free_cids.last().unwrap_or(&0);
            let base = cid as usize * PAGE_SIZE as usize;
            let pool = &self.pool;
            let list = self.pool_iova(cid);
            let Some((p1, p2, _)) =
                split::build_prps(b.iova(), b.len(), PAGE_SIZE, list, |k, e| {
                    let _ = pool.write_u64(base + 8 * k, e);
                })
            else {
                return Err(SubmitError::Invalid("raw buffer does not fit one PRP list"));
            };
            sqe.prp1 = p1.into();
            sqe.prp2 = p2.into();
        }
        let req = self.alloc_req(tag, 1, buf.cloned());
        self.push_cmd(req, sqe);
        Ok(())
    }

    fn push_copy(&mut self, req: u16, ns: &Namespace, cid: u16, dest: u64, count: usize) {
        let mut sqe = SubmissionEntry::new(nvm_opc::COPY, ns.nsid).with_cdws(&[
            dest as u32,
            (dest >> 32) as u32,
            (count - 1) as u32,
        ]);
        sqe.prp1 = self.pool_iova(cid).into();
        let got = self.push_cmd(req, sqe);
        debug_assert_eq!(got, cid);
    }

    /// Writes the SQ tail doorbell once for everything staged since the
    /// last ring.
    #[inline]
    pub fn ring(&mut self) {
        if !self.stale() {
            self.ring_and_stamp();
        }
    }

    /// Rings the doorbell for staged submissions, then harvests up to `max`
    /// completions, calling `on_done` once per finished request. Returns
    /// the number of requests reported.
    ///
    /// Errors: [`Error::ControllerFatal`] (checked when idle), and
    /// [`Error::BadDeviceData`] for a completion with an impossible CID or
    /// SQ head (the entry is consumed and ignored).
    pub fn poll(&mut self, max: usize, mut on_done: impl FnMut(Completion)) -> Result<usize> {
        if self.stale() {
            self.recover()?;
        }
        let mut reported = 0;
        if self.aborted_pending > 0 {
            for r in 0..self.reqs.len() {
                if reported >= max {
                    return Ok(reported);
                }
                let req = &mut self.reqs[r];
                if req.busy && req.aborted {
                    req.busy = false;
                    req.aborted = false;
                    req.buf = None;
                    self.aborted_pending -= 1;
                    self.free_reqs.push(r as u16);
                    reported += 1;
                    on_done(Completion {
                        tag: req.tag,
                        result: Err(IoError::Aborted),
                        dw0: 0,
                    });
                }
            }
        }
        self.ring_and_stamp();
        let mut consumed = 0;
        let mut bad: Option<String> = None;
        while reported < max {
            let Some((dw0, sqhd, cid, status)) = self.ring.peek() else {
                break;
            };
            self.ring.advance();
            consumed += 1;
            if sqhd >= self.ring.entries {
                bad.get_or_insert_with(|| {
                    format!("queue {}: CQE with SQ head {sqhd}", self.ring.qid)
                });
                continue;
            }
            self.ring.sq_head = sqhd;
            let Some(slot) = self.slots.get_mut(cid as usize) else {
                bad.get_or_insert_with(|| {
                    format!("queue {}: CQE with CID {cid} beyond depth", self.ring.qid)
                });
                continue;
            };
            match slot.state {
                SlotState::Busy => {}
                SlotState::TimedOut => {
                    // Late completion of a command already reported as
                    // timed out: the CID is usable again.
                    slot.state = SlotState::Free;
                    self.free_cids.push(cid);
                    continue;
                }
                SlotState::Free => {
                    bad.get_or_insert_with(|| {
                        format!("queue {}: CQE for idle CID {cid}", self.ring.qid)
                    });
                    continue;
                }
            }
            slot.state = SlotState::Free;
            let r = slot.req as usize;
            self.free_cids.push(cid);
            self.outstanding -= 1;
            let req = &mut self.reqs[r];
            let st = NvmeStatus::from_field(status);
            if !st.is_success() && req.error.is_none() {
                req.error = Some(IoError::Status(st));
            }
            req.dw0 = dw0;
            req.remaining = req.remaining.saturating_sub(1);
            if req.remaining == 0 && req.busy && !req.aborted {
                req.busy = false;
                req.buf = None;
                self.free_reqs.push(r as u16);
                reported += 1;
                on_done(Completion {
                    tag: req.tag,
                    result: match req.error {
                        None => Ok(req.dw0),
                        Some(e) => Err(e),
                    },
                    dw0: req.dw0,
                });
            }
        }
        if consumed > 0 {
            // CQ head doorbells are batched: the controller only needs a
            // free slot for each command it may complete, which
            // `check_submit` guarantees; beyond that, hand back at least
            // every half queue.
            if self.ring.cq_unpublished() * 2 >= self.ring.entries as usize {
                self.ring.ring_cq(self.shared.transport.regs());
            }
            self.idle_polls = 0;
            self.idle_check_at = None;
        } else if self.outstanding > 0 {
            self.idle_polls = self.idle_polls.wrapping_add(1);
            // Look at the controller (CSTS, expired commands) once the
            // queue has waited IDLE_CHECK without progress, then every
            // IDLE_CHECK, with a clock read every 16 idle polls: a spinning
            // caller makes no register access during ordinary waits, and
            // one that sleeps between polls (a background copy, a flush)
            // still sees a failed controller or an expired command within
            // a few dozen polls. Register reads are not free: in a VM each
            // traps to the hypervisor, and QEMU serialises them with its
            // device emulation (one lock), so a read in every wait would
            // stall the poller while the controller works.
            if self.idle_polls.is_multiple_of(16) {
                let now = Instant::now();
                match self.idle_check_at {
                    None => self.idle_check_at = Some(now + IDLE_CHECK),
                    Some(due) if now >= due => {
                        self.idle_check_at = Some(now + IDLE_CHECK);
                        // Insurance against a controller that misses a
                        // shadow doorbell update: state the SQ tail by MMIO
                        // now and then.
                        if self.ring.dbbuf.is_some() {
                            self.shared
                                .transport
                                .regs()
                                .write32(self.ring.sq_db, self.ring.sq_tail as u32);
                            self.ring.doorbell_writes.sq += 1;
                        }
                        self.shared.check_fatal()?;
                        reported += self.expire(max - reported, &mut on_done);
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(what) = bad {
            return Err(Error::BadDeviceData {
                device: self.shared.name.clone(),
                what,
            });
        }
        Ok(reported)
    }

    /// Reports requests whose commands exceeded the timeout.
    fn expire(&mut self, max: usize, on_done: &mut impl FnMut(Completion)) -> usize {
        let Some(timeout) = self.timeout else {
            return 0;
        };
        let now = Instant::now();
        let mut reported = 0;
        for cid in 0..self.slots.len() {
            if reported >= max {
                break;
            }
            let slot = self.slots[cid];
            if slot.state != SlotState::Busy
                || slot
                    .submitted
                    .is_none_or(|t| now.duration_since(t) < timeout)
            {
                continue;
            }
            self.slots[cid].state = SlotState::TimedOut;
            self.outstanding -= 1;
            let r = slot.req as usize;
            let req = &mut self.reqs[r];
            req.error = Some(IoError::Timeout);
            req.remaining = req.remaining.saturating_sub(1);
            tracing::warn!(device = %self.shared.name, qid = self.ring.qid, cid, "command timed out");
            if req.remaining == 0 && req.busy {
                req.busy = false;
                req.buf = None;
                self.free_reqs.push(r as u16);
                reported += 1;
                on_done(Completion {
                    tag: req.tag,
                    result: Err(IoError::Timeout),
                    dw0: 0,
                });
            }
        }
        reported
    }

    /// Polls until every outstanding request is reported or `timeout`
    /// passes; returns the completions.
    pub fn drain(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        let start = Instant::now();
        let mut out = Vec::new();
        while self.outstanding() > 0 {
            self.poll(usize::MAX, |c| out.push(c))?;
            if start.elapsed() > timeout {
                return Err(Error::ControllerTimeout {
                    device: self.shared.name.clone(),
                    what: "outstanding I/O to complete",
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
        Ok(out)
    }
}

fn write_copy_desc(pool: &DmaBuffer, at: usize, slba: u64, blocks: u64) {
    let d = CopyRangeFormat0 {
        slba: slba.into(),
        nlb: ((blocks - 1) as u16).into(),
        ..Default::default()
    };
    let _ = pool.write(at, d);
}

impl<T: Transport> Drop for QueuePair<T> {
    fn drop(&mut self) {
        if !self.stale()
            && !self.shared.failed.load(Ordering::SeqCst)
            && let Err(e) = self.shared.delete_queues(self.ring.qid)
        {
            tracing::warn!(device = %self.shared.name, qid = self.ring.qid, error = %e, "deleting I/O queues failed");
        }
        self.shared.lock_qids()[self.ring.qid as usize] = false;
    }
}

impl<T: Transport> std::fmt::Debug for QueuePair<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("device", &self.shared.name)
            .field("qid", &self.ring.qid)
            .field("depth", &self.slots.len())
            .finish()
    }
}

const _: () = assert!(PRP_LIST_ENTRIES * 8 == PAGE_SIZE as usize);

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn ownership_model() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<super::QueuePair<crate::emu::EmuController>>();
        send::<super::QueuePair<crate::vfio::VfioPci>>();
        send_sync::<super::Controller<crate::emu::EmuController>>();
        send_sync::<super::Controller<crate::vfio::VfioPci>>();
        send_sync::<crate::DmaSlice>();
    }

    #[test]
    fn event_index_window() {
        // Ring iff ei lies in [old, new).
        assert!(need_event(0, 1, 0));
        assert!(!need_event(0, 2, 1), "device has not caught up to 1");
        assert!(need_event(1, 2, 1));
        assert!(need_event(5, 7, 3));
        assert!(!need_event(7, 7, 3));
        assert!(!need_event(2, 7, 3));
        // Across the queue wrap (indices mod queue size, compared mod 2^16).
        assert!(need_event(254, 1, 250), "ei in [250, 256) ∪ [0, 1)");
        assert!(need_event(0, 1, 250));
        assert!(!need_event(100, 1, 250));
        assert!(!need_event(3, 3, 3), "nothing new");
    }
}
