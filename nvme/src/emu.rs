//! An in-process emulated NVMe controller that follows the specification.
//!
//! It plays the device side of the protocol the way a PCIe controller
//! does, so the real driver code runs against it unchanged: it exposes the
//! controller registers (CAP, VS, CC, CSTS, AQA, ASQ, ACQ, doorbells with
//! the configured stride) through [`RegisterAccess`], reads submission
//! entries from the queue memory the driver allocated (resolving IOVAs
//! through the shared [`DmaContext`], as an IOMMU would), follows PRP1,
//! PRP2 and PRP lists, and posts completion entries with phase tags and SQ
//! head pointers. Behaviour follows QEMU's `hw/nvme/ctrl.c` where the
//! specification leaves a choice, so the conformance suite passes on both.
//!
//! Admin commands: Identify (CNS 0, 1, 2), Create/Delete I/O SQ and CQ,
//! Set/Get Features (Number of Queues, Volatile Write Cache), Get Log Page
//! (Error Information, SMART / Health), Abort. NVM commands: Read, Write,
//! Flush, Write Zeroes, Dataset Management (deallocate) and Copy (source
//! range formats 0 and 1, with MSRC, MSSRL and MCL enforced).
//!
//! Namespaces have 512-byte or 4 KiB blocks and are backed by sparse
//! memory, a file, or nothing ("null": reads return no data, writes are
//! dropped; for overhead benchmarks). The controller runs [`EmuMode::Inline`]
//! (a doorbell write processes the queue before returning) or
//! [`EmuMode::Thread`] (its own thread polls the doorbells). Faults can be
//! injected with [`EmuController::inject`] and
//! [`EmuController::set_fatal`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use backing_store::SparseMemory;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::dma::{self, DmaContext, Region};
use crate::error::{Error, Result};
use crate::mmio::{RegisterAccess, max_doorbell_qid};
use crate::regs::{self, Cc, Csts};
use crate::spec::{
    self, CopyRangeFormat0, CopyRangeFormat1, DsmRange, ErrorLogEntry, IdentifyController,
    IdentifyNamespace, NvmeStatus, SmartLog, SubmissionEntry, admin_opc, nvm_opc,
};
use crate::transport::Transport;

/// How the emulated controller processes its queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EmuMode {
    /// A doorbell write processes the queues before it returns.
    #[default]
    Inline,
    /// A thread of its own polls the doorbells.
    Thread,
}

/// What stores a namespace's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Nothing: reads transfer no data, writes are dropped.
    Null,
    /// Sparse memory: unwritten blocks read as zeros.
    Memory,
    /// A file (created if missing, extended to the namespace size).
    File(PathBuf),
}

/// A namespace of the emulated controller.
#[derive(Clone, Debug)]
pub struct NamespaceConfig {
    /// Block size: 512 or 4096.
    pub block_size: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Backing store.
    pub backing: Backing,
    /// Maximum Single Source Range Length (blocks) for Copy.
    pub mssrl: u16,
    /// Maximum Copy Length (blocks).
    pub mcl: u32,
    /// Maximum Source Range Count, 0's based.
    pub msrc: u8,
    /// Whether the namespace is formatted with 64-bit guard protection
    /// information, which makes Copy format 1 (and only it) valid.
    pub pi_64b_guard: bool,
}

impl NamespaceConfig {
    /// A namespace of `blocks` blocks of `block_size` bytes on sparse
    /// memory, with the rig's Copy limits (MSSRL 128, MCL 256, MSRC 15).
    pub fn memory(block_size: u32, blocks: u64) -> NamespaceConfig {
        NamespaceConfig {
            block_size,
            blocks,
            backing: Backing::Memory,
            mssrl: 128,
            mcl: 256,
            msrc: 15,
            pi_64b_guard: false,
        }
    }

    /// A null namespace (no data), for overhead benchmarks.
    pub fn null(block_size: u32, blocks: u64) -> NamespaceConfig {
        NamespaceConfig {
            backing: Backing::Null,
            ..NamespaceConfig::memory(block_size, blocks)
        }
    }
}

/// Configuration of an emulated controller.
#[derive(Clone, Debug)]
pub struct EmuConfig {
    /// CAP.MQES (0's based): largest I/O queue is MQES + 1 entries.
    pub mqes: u16,
    /// CAP.DSTRD: doorbell stride is `4 << dstrd` bytes.
    pub dstrd: u8,
    /// Identify MDTS (units of 4 KiB pages, log2; 0 = no limit).
    pub mdts: u8,
    /// I/O queue pairs the controller supports.
    pub max_io_queues: u16,
    /// Serial number (also names the controller in errors: `emu:SERIAL`).
    pub serial: String,
    /// Namespaces, NSID 1 upwards.
    pub namespaces: Vec<NamespaceConfig>,
    /// How queues are processed.
    pub mode: EmuMode,
}

impl Default for EmuConfig {
    fn default() -> EmuConfig {
        EmuConfig {
            mqes: 2047,
            dstrd: 0,
            mdts: 7,
            max_io_queues: 64,
            serial: "EMU0001".to_owned(),
            namespaces: vec![NamespaceConfig::memory(512, 128 * 1024)],
            mode: EmuMode::Inline,
        }
    }
}

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete the command with this status instead of executing it.
    Status(NvmeStatus),
    /// Execute the command but never post its completion.
    DropCompletion,
    /// Execute the command and post its completion with this CID and SQ
    /// head instead of the right ones (a misbehaving device).
    Garble {
        /// CID to report.
        cid: u16,
        /// SQ head to report.
        sqhd: u16,
    },
}

/// Injects `action` on the `nth` (1-based) command with `opcode` on the
/// admin queue (`admin`) or any I/O queue, counted from the injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Admin (true) or NVM (false) opcode.
    pub admin: bool,
    /// The opcode.
    pub opcode: u8,
    /// Which occurrence, 1-based.
    pub nth: u64,
    /// What to do.
    pub action: FaultAction,
}

const VENDOR_ID: u16 = 0x1b36; // Red Hat, as QEMU's controller.
const SQE_SIZE: usize = 64;
const CQE_SIZE: usize = 16;

/// The emulated controller: a [`Transport`] the driver can bring up.
pub struct EmuController {
    regs: EmuRegs,
    thread: Option<JoinHandle<()>>,
}

/// The emulated controller's register window.
pub struct EmuRegs {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    ctx: Arc<DmaContext>,
    mode: EmuMode,
    cap: u64,
    window_len: usize,
    stride: usize,
    cc: AtomicU32,
    csts: AtomicU32,
    aqa: AtomicU32,
    asq: AtomicU64,
    acq: AtomicU64,
    intms: AtomicU32,
    /// Doorbell values, index `2·qid` (SQ tail) and `2·qid + 1` (CQ head).
    doorbells: Box<[AtomicU32]>,
    /// Set by a doorbell write in thread mode; the thread clears it.
    pending: AtomicBool,
    /// Gone from the bus ([`EmuController::remove`]): registers read all
    /// ones, writes are dropped, nothing is processed.
    removed: AtomicBool,
    /// The platform wants the device back ([`EmuController::request_removal`]).
    removal_requested: AtomicBool,
    /// MMIO doorbell writes so far.
    doorbell_writes: AtomicU64,
    stop: AtomicBool,
    core: Mutex<Core>,
}

struct Queue {
    region: Arc<Region>,
    offset: usize,
    size: u16,
}

struct Sq {
    q: Queue,
    cqid: u16,
    head: u16,
    tail: u16,
}

struct Cq {
    q: Queue,
    head: u16,
    tail: u16,
    phase: bool,
}

enum Store {
    Null,
    Memory(SparseMemory),
    File(File),
}

/// Shadow doorbell pages: `(region, offset of the page)` each.
struct DbBuf {
    shadow: (Arc<Region>, usize),
    eventidx: (Arc<Region>, usize),
}

impl DbBuf {
    fn read(&self, slot: usize) -> Option<u32> {
        dma::region_read_u32(&self.shadow.0, self.shadow.1 + slot)
    }
    fn write_shadow(&self, slot: usize, v: u32) {
        dma::region_write_u32(&self.shadow.0, self.shadow.1 + slot, v);
    }
    fn write_eventidx(&self, slot: usize, v: u32) {
        dma::region_write_u32(&self.eventidx.0, self.eventidx.1 + slot, v);
    }
}

struct Namespace {
    cfg: NamespaceConfig,
    store: Store,
}

impl Namespace {
    fn bytes(&self) -> u64 {
        self.cfg.blocks * self.cfg.block_size as u64
    }

    fn read(&self, at: u64, dst: &mut [u8]) -> bool {
        match &self.store {
            Store::Null => true,
            Store::Memory(memory) => memory.read(at, dst).is_ok(),
            Store::File(f) => f.read_exact_at(dst, at).is_ok(),
        }
    }

    fn write(&mut self, at: u64, src: Option<&[u8]>, len: usize) -> bool {
        match &mut self.store {
            Store::Null => true,
            Store::Memory(memory) => match src {
                Some(s) => memory.write(at, &s[..len]).is_ok(),
                // Whole chunks go back, like deallocation on a thin device.
                None => memory.zero(at, len as u64, true).is_ok(),
            },
            Store::File(f) => match src {
                Some(s) => f.write_all_at(&s[..len], at).is_ok(),
                None => {
                    let zeros = vec![0u8; len.min(1 << 20)];
                    let mut done = 0;
                    while done < len {
                        let n = zeros.len().min(len - done);
                        if f.write_all_at(&zeros[..n], at + done as u64).is_err() {
                            return false;
                        }
                        done += n;
                    }
                    true
                }
            },
        }
    }
}

struct Core {
    cfg: EmuConfig,
    namespaces: Vec<Namespace>,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    /// Number of Queues feature: allocated I/O SQs and CQs (1-based).
    nsq: u16,
    ncq: u16,
    vwc: bool,
    faults: Vec<(Fault, u64)>,
    fatal: bool,
    /// I/O commands left to execute before the power fails
    /// ([`EmuController::power_cut_after`]).
    power_left: Option<u64>,
    /// Shadow doorbell and EventIdx pages (Doorbell Buffer Config).
    dbbuf: Option<DbBuf>,
    /// I/O submission queues whose doorbells are held back
    /// ([`EmuController::hold_queue`]): their commands wait unfetched.
    held: u64,
    errors: Vec<ErrorLogEntry>,
    error_count: u64,
    reads: u64,
    writes: u64,
    units_read: u64,
    units_written: u64,
    scratch: Vec<u8>,
}

/// Outcome of one command.
struct Done {
    status: NvmeStatus,
    dw0: u32,
    post: bool,
    garble: Option<(u16, u16)>,
}

impl Done {
    fn ok(dw0: u32) -> Done {
        Done {
            status: NvmeStatus::SUCCESS,
            dw0,
            post: true,
            garble: None,
        }
    }
    fn err(status: NvmeStatus) -> Done {
        Done {
            status,
            dw0: 0,
            post: true,
            garble: None,
        }
    }
}

type Cmd<T = ()> = std::result::Result<T, NvmeStatus>;

impl EmuController {
    /// Creates a controller whose DMA memory comes from `ctx` (a host
    /// context: [`DmaContext::host`]). The controller starts disabled, as
    /// after a PCI reset; bring it up with [`crate::Controller::new`].
    pub fn new(ctx: &Arc<DmaContext>, cfg: EmuConfig) -> Result<EmuController> {
        if !ctx.is_host() {
            return Err(Error::InvalidArgument(
                "the emulated controller needs a host DMA context",
            ));
        }
        if cfg.mqes < 1 || cfg.dstrd > 8 || cfg.max_io_queues == 0 {
            return Err(Error::InvalidArgument(
                "emulator: MQES ≥ 1, DSTRD ≤ 8 and ≥ 1 I/O queue required",
            ));
        }
        let mut namespaces = Vec::with_capacity(cfg.namespaces.len());
        for ns in &cfg.namespaces {
            if ns.block_size != 512 && ns.block_size != 4096 || ns.blocks == 0 {
                return Err(Error::InvalidArgument(
                    "emulated namespaces have 512 or 4096-byte blocks and at least one block",
                ));
            }
            let Some(bytes) = ns.blocks.checked_mul(u64::from(ns.block_size)) else {
                return Err(Error::InvalidArgument(
                    "emulated namespace larger than 2^64 bytes",
                ));
            };
            let store = match &ns.backing {
                Backing::Null => Store::Null,
                Backing::Memory => Store::Memory(SparseMemory::new(bytes)),
                Backing::File(p) => {
                    // Created safely if missing, extended if short, never
                    // shrunk: the namespace is the file's first bytes.
                    let f = backing_store::open_file(p, Some(bytes), false)
                        .map_err(|e| Error::BackingFile {
                            path: p.clone(),
                            source: e.into_io(),
                        })?
                        .file;
                    Store::File(f)
                }
            };
            namespaces.push(Namespace {
                cfg: ns.clone(),
                store,
            });
        }
        let stride = 4usize << cfg.dstrd;
        let qpairs = cfg.max_io_queues as usize + 1;
        let window_len = regs::cq_head_doorbell(cfg.max_io_queues, stride) + 4;
        // CAP: MQES, CQR (contiguous queues required, like QEMU), TO = 15
        // (7.5 s), DSTRD, CSS = NVM, MPSMIN 0 (4 KiB), MPSMAX 4 (64 KiB).
        let cap =
            cfg.mqes as u64 | 1 << 16 | 15 << 24 | (cfg.dstrd as u64) << 32 | 1 << 37 | 4 << 52;
        let mode = cfg.mode;
        let shared = Arc::new(Shared {
            name: format!("emu:{}", cfg.serial),
            ctx: Arc::clone(ctx),
            mode,
            cap,
            window_len,
            stride,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            aqa: AtomicU32::new(0),
            asq: AtomicU64::new(0),
            acq: AtomicU64::new(0),
            intms: AtomicU32::new(0),
            doorbells: (0..2 * qpairs).map(|_| AtomicU32::new(0)).collect(),
            pending: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            removal_requested: AtomicBool::new(false),
            doorbell_writes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            core: Mutex::new(Core {
                nsq: cfg.max_io_queues,
                ncq: cfg.max_io_queues,
                sqs: (0..qpairs).map(|_| None).collect(),
                cqs: (0..qpairs).map(|_| None).collect(),
                cfg,
                namespaces,
                vwc: false,
                faults: Vec::new(),
                fatal: false,
                power_left: None,
                held: 0,
                dbbuf: None,
                errors: Vec::new(),
                error_count: 0,
                reads: 0,
                writes: 0,
                units_read: 0,
                units_written: 0,
                scratch: Vec::new(),
            }),
        });
        let thread = if mode == EmuMode::Thread {
            let s = Arc::clone(&shared);
            let h = std::thread::Builder::new()
                .name(format!("{}-poller", shared.name))
                .spawn(move || s.poll_thread())
                .map_err(|source| Error::DmaAlloc { len: 0, source })?;
            Some(h)
        } else {
            None
        };
        Ok(EmuController {
            regs: EmuRegs { shared },
            thread,
        })
    }

    fn shared(&self) -> &Shared {
        &self.regs.shared
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.shared().lock().faults.push((fault, 0));
    }

    /// Sets (or clears) Controller Fatal Status: while set, the controller
    /// processes no commands. A controller reset (CC.EN 1 → 0) clears it.
    pub fn set_fatal(&self, fatal: bool) {
        let shared = self.shared();
        let mut core = shared.lock();
        core.fatal = fatal;
        if fatal {
            shared.csts.fetch_or(Csts::CFS.bits(), Ordering::SeqCst);
        } else {
            shared.csts.fetch_and(!Csts::CFS.bits(), Ordering::SeqCst);
        }
    }

    /// Cuts the power after `commands` more I/O commands: those execute
    /// and complete, the next one and every later one are never executed,
    /// and the controller reports fatal status (CSTS.CFS) from then on, as
    /// a drive that lost power mid-run (what the host had in flight is
    /// lost; what completed is in the backing store). A reset does not
    /// bring it back: open a new controller over the same backing file.
    pub fn power_cut_after(&self, commands: u64) {
        self.shared().lock().power_left = Some(commands);
    }

    /// Takes the controller off the bus, as a surprise removal: from now on
    /// its registers read all ones, register writes are dropped and no
    /// command is fetched, executed or completed. Memory is never touched
    /// again.
    pub fn remove(&self) {
        let shared = self.shared();
        let _core = shared.lock();
        shared.removed.store(true, Ordering::SeqCst);
    }

    /// Asks the host to give the device back, as the kernel does through
    /// VFIO's device request on hot unplug: the controller keeps working
    /// until the host stops it and releases it
    /// ([`Transport::release`](crate::Transport::release)), after which it
    /// is gone as after [`EmuController::remove`].
    pub fn request_removal(&self) {
        self.shared()
            .removal_requested
            .store(true, Ordering::SeqCst);
    }

    /// Holds back I/O submission queue `qid` (`held`), as a device stuck on
    /// it would: commands rung in wait unfetched and unexecuted, so their
    /// buffers may still be touched long after the host gave up on them.
    /// Releasing it executes them then, unless the host deleted the queue
    /// meanwhile (Delete I/O SQ discards them, as the specification has a
    /// controller abort what a deleted queue holds) or reset the
    /// controller.
    pub fn hold_queue(&self, qid: u16, held: bool) {
        let shared = self.shared();
        let mut core = shared.lock();
        let bit = 1u64.checked_shl(u32::from(qid)).unwrap_or(0);
        if held {
            core.held |= bit;
        } else {
            core.held &= !bit;
            match shared.mode {
                EmuMode::Inline => shared.process(&mut core),
                EmuMode::Thread => shared.pending.store(true, Ordering::Release),
            }
        }
    }

    /// MMIO doorbell writes received so far (shadow doorbell updates are
    /// memory writes and not counted).
    pub fn doorbell_writes(&self) -> u64 {
        self.shared().doorbell_writes.load(Ordering::Relaxed)
    }

    /// Reads `len` bytes of namespace `nsid` at byte offset `at` directly
    /// from the backing store (for tests). `None` for a null namespace or a
    /// bad range.
    pub fn backing_read(&self, nsid: u32, at: u64, len: usize) -> Option<Vec<u8>> {
        let core = self.shared().lock();
        let ns = core.namespaces.get(nsid.checked_sub(1)? as usize)?;
        if matches!(ns.store, Store::Null) || at.checked_add(len as u64)? > ns.bytes() {
            return None;
        }
        let mut v = vec![0u8; len];
        ns.read(at, &mut v).then_some(v)
    }
}

impl Drop for EmuController {
    fn drop(&mut self) {
        self.shared().stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take()
            && h.join().is_err()
        {
            tracing::error!(emu = %self.shared().name, "emulator thread panicked");
        }
    }
}

impl std::fmt::Debug for EmuController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuController")
            .field("name", &self.shared().name)
            .field("mode", &self.shared().mode)
            .finish()
    }
}

impl Transport for EmuController {
    type Regs = EmuRegs;

    #[inline]
    fn regs(&self) -> &EmuRegs {
        &self.regs
    }

    fn dma(&self) -> &Arc<DmaContext> {
        &self.shared().ctx
    }

    fn name(&self) -> String {
        self.shared().name.clone()
    }

    fn max_doorbell_qid(&self) -> u16 {
        max_doorbell_qid(self.shared().window_len, self.shared().stride).unwrap_or(0)
    }

    fn removal_requested(&self) -> bool {
        self.shared().removal_requested.load(Ordering::Acquire)
    }

    fn release(&self) {
        self.remove();
    }
}

impl EmuRegs {
    fn doorbell_index(&self, offset: usize) -> Option<usize> {
        let rel = offset.checked_sub(regs::DOORBELL_BASE)?;
        let s = &self.shared;
        (rel.is_multiple_of(s.stride))
            .then_some(rel / s.stride)
            .filter(|&i| i < s.doorbells.len())
    }
}

impl RegisterAccess for EmuRegs {
    fn window_len(&self) -> usize {
        self.shared.window_len
    }

    fn read32(&self, offset: usize) -> u32 {
        let s = &self.shared;
        if s.removed.load(Ordering::Acquire) {
            return u32::MAX;
        }
        match offset {
            regs::CAP => s.cap as u32,
            o if o == regs::CAP + 4 => (s.cap >> 32) as u32,
            regs::VS => regs::Version::V1_4.0,
            regs::INTMS | regs::INTMC => s.intms.load(Ordering::SeqCst),
            regs::CC => s.cc.load(Ordering::SeqCst),
            regs::CSTS => s.csts.load(Ordering::SeqCst),
            regs::AQA => s.aqa.load(Ordering::SeqCst),
            regs::ASQ => s.asq.load(Ordering::SeqCst) as u32,
            o if o == regs::ASQ + 4 => (s.asq.load(Ordering::SeqCst) >> 32) as u32,
            regs::ACQ => s.acq.load(Ordering::SeqCst) as u32,
            o if o == regs::ACQ + 4 => (s.acq.load(Ordering::SeqCst) >> 32) as u32,
            // Doorbells and reserved registers read as zero (as on QEMU).
            o if self.in_window(o, 4) => 0,
            _ => u32::MAX,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let s = &self.shared;
        if s.removed.load(Ordering::Acquire) {
            return;
        }
        if offset >= regs::DOORBELL_BASE {
            match self.doorbell_index(offset) {
                Some(i) => {
                    s.doorbell_writes.fetch_add(1, Ordering::Relaxed);
                    s.doorbells[i].store(value, Ordering::Release);
                    match s.mode {
                        EmuMode::Inline => {
                            let mut core = s.lock();
                            s.process(&mut core);
                        }
                        EmuMode::Thread => s.pending.store(true, Ordering::Release),
                    }
                }
                None => {
                    tracing::warn!(emu = %s.name, offset, "write outside the doorbells ignored")
                }
            }
            return;
        }
        match offset {
            regs::CC => {
                let mut core = s.lock();
                s.write_cc(&mut core, Cc(value));
            }
            regs::INTMS => {
                s.intms.fetch_or(value, Ordering::SeqCst);
            }
            regs::INTMC => {
                s.intms.fetch_and(!value, Ordering::SeqCst);
            }
            regs::AQA => s.aqa.store(value & 0x0fff_0fff, Ordering::SeqCst),
            regs::ASQ => set_low(&s.asq, value),
            o if o == regs::ASQ + 4 => set_high(&s.asq, value),
            regs::ACQ => set_low(&s.acq, value),
            o if o == regs::ACQ + 4 => set_high(&s.acq, value),
            _ => {
                tracing::debug!(emu = %s.name, offset, value, "write to read-only register ignored")
            }
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | hi << 32
    }

    fn write64(&self, offset: usize, value: u64) {
        match offset {
            regs::ASQ => self.shared.asq.store(value, Ordering::SeqCst),
            regs::ACQ => self.shared.acq.store(value, Ordering::SeqCst),
            _ => {
                self.write32(offset, value as u32);
                self.write32(offset + 4, (value >> 32) as u32);
            }
        }
    }
}

fn set_low(r: &AtomicU64, v: u32) {
    let old = r.load(Ordering::SeqCst);
    r.store((old & !0xffff_ffff) | v as u64, Ordering::SeqCst);
}

fn set_high(r: &AtomicU64, v: u32) {
    let old = r.load(Ordering::SeqCst);
    r.store((old & 0xffff_ffff) | (v as u64) << 32, Ordering::SeqCst);
}

fn page_size_of(cc: Cc) -> u64 {
    1u64 << (12 + cc.mps())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // Core operations keep it consistent before anything can panic.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn poll_thread(&self) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            if self.pending.swap(false, Ordering::AcqRel) {
                let mut core = self.lock();
                self.process(&mut core);
                idle = 0;
            } else {
                idle = idle.saturating_add(1);
                if idle < 1000 {
                    std::hint::spin_loop();
                } else if idle < 2000 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    fn ready(&self) -> bool {
        self.csts.load(Ordering::SeqCst) & Csts::RDY.bits() != 0
    }

    fn write_cc(&self, core: &mut Core, new: Cc) {
        let old = Cc(self.cc.swap(new.0, Ordering::SeqCst));
        if !old.en() && new.en() {
            self.enable(core, new);
        } else if old.en() && !new.en() {
            self.controller_reset(core);
        }
        if new.shn() != Cc::SHN_NONE && old.shn() == Cc::SHN_NONE {
            // Shutdown processing is immediate: nothing is cached.
            core.sqs.iter_mut().for_each(|q| *q = None);
            core.cqs.iter_mut().for_each(|q| *q = None);
            self.csts.fetch_or(0b10 << 2, Ordering::SeqCst);
        } else if new.shn() == Cc::SHN_NONE {
            self.csts
                .fetch_and(!Csts::SHST_MASK.bits(), Ordering::SeqCst);
        }
    }

    fn controller_reset(&self, core: &mut Core) {
        core.sqs.iter_mut().for_each(|q| *q = None);
        core.cqs.iter_mut().for_each(|q| *q = None);
        core.fatal = false;
        core.dbbuf = None;
        core.nsq = core.cfg.max_io_queues;
        core.ncq = core.cfg.max_io_queues;
        for d in self.doorbells.iter() {
            d.store(0, Ordering::SeqCst);
        }
        self.csts.store(0, Ordering::SeqCst);
    }

    fn enable(&self, core: &mut Core, cc: Cc) {
        let aqa = regs::Aqa(self.aqa.load(Ordering::SeqCst));
        let asq = self.asq.load(Ordering::SeqCst);
        let acq = self.acq.load(Ordering::SeqCst);
        let ps = page_size_of(cc);
        let cap = regs::Cap(self.cap);
        let why = if cc.css() != Cc::CSS_NVM {
            Some("CC.CSS is not NVM")
        } else if cc.mps() > cap.mpsmax() {
            Some("CC.MPS above CAP.MPSMAX")
        } else if cc.iosqes() != Cc::IOSQES_NVM || cc.iocqes() != Cc::IOCQES_NVM {
            Some("CC.IOSQES/IOCQES not 6/4")
        } else if aqa.asqs() < 1 || aqa.acqs() < 1 {
            Some("admin queues smaller than 2 entries")
        } else if !asq.is_multiple_of(ps) || !acq.is_multiple_of(ps) || asq == 0 || acq == 0 {
            Some("ASQ/ACQ not page aligned")
        } else {
            None
        };
        if let Some(why) = why {
            tracing::warn!(emu = %self.name, why, "enable refused; CSTS.RDY stays 0");
            return;
        }
        let sq = self.map_queue(asq, aqa.sq_entries(), SQE_SIZE);
        let cq = self.map_queue(acq, aqa.cq_entries(), CQE_SIZE);
        let (Some(sq), Some(cq)) = (sq, cq) else {
            tracing::warn!(emu = %self.name, asq, acq, "admin queue memory not mapped; enable refused");
            return;
        };
        core.sqs[0] = Some(Sq {
            q: sq,
            cqid: 0,
            head: 0,
            tail: 0,
        });
        core.cqs[0] = Some(Cq {
            q: cq,
            head: 0,
            tail: 0,
            phase: true,
        });
        self.doorbells[0].store(0, Ordering::SeqCst);
        self.doorbells[1].store(0, Ordering::SeqCst);
        self.csts.fetch_or(Csts::RDY.bits(), Ordering::SeqCst);
    }

    fn map_queue(&self, iova: u64, entries: u16, entry_size: usize) -> Option<Queue> {
        let (region, offset) = self.ctx.translate(iova, entries as usize * entry_size)?;
        Some(Queue {
            region,
            offset,
            size: entries,
        })
    }

    /// Processes every submission queue until it is empty or its
    /// completion queue is full.
    fn process(&self, core: &mut Core) {
        if core.fatal || !self.ready() || self.removed.load(Ordering::Acquire) {
            return;
        }
        for qid in 0..core.sqs.len() {
            self.process_sq(core, qid);
        }
    }

    fn process_sq(&self, core: &mut Core, qid: usize) {
        if qid != 0 && core.held & 1u64.checked_shl(qid as u32).unwrap_or(0) != 0 {
            return;
        }
        let shadow_slot = 2 * qid * self.stride;
        let tail = match (&core.dbbuf, qid) {
            (Some(d), 1..) => d.read(shadow_slot).unwrap_or(u32::MAX),
            _ => self.doorbells[2 * qid].load(Ordering::Acquire),
        };
        let Some(sq) = core.sqs[qid].as_mut() else {
            return;
        };
        if tail >= sq.q.size as u32 {
            tracing::warn!(emu = %self.name, qid, tail, size = sq.q.size, "SQ tail doorbell out of range ignored");
            return;
        }
        sq.tail = tail as u16;
        loop {
            if core.fatal {
                return;
            }
            let Some(sq) = core.sqs[qid].as_mut() else {
                return;
            };
            if sq.head == sq.tail {
                // With shadow doorbells: publish how far we have looked
                // (EventIdx), then look again, so a tail the host wrote
                // meanwhile is either seen here or rung by MMIO.
                let Some(d) = core.dbbuf.as_ref().filter(|_| qid != 0) else {
                    return;
                };
                d.write_eventidx(shadow_slot, sq.tail as u32);
                fence(Ordering::SeqCst);
                match d.read(shadow_slot) {
                    Some(t) if t < sq.q.size as u32 && t as u16 != sq.tail => {
                        sq.tail = t as u16;
                        continue;
                    }
                    _ => return,
                }
            }
            let cqid = sq.cqid as usize;
            let Some(cq) = core.cqs[cqid].as_mut() else {
                return;
            };
            let cq_head = match (&core.dbbuf, cqid) {
                (Some(d), 1..) => d.read((2 * cqid + 1) * self.stride).unwrap_or(u32::MAX),
                _ => self.doorbells[2 * cqid + 1].load(Ordering::Acquire),
            };
            if cq_head < cq.q.size as u32 {
                cq.head = cq_head as u16;
            }
            if (cq.tail + 1) % cq.q.size == cq.head {
                return; // CQ full: resume when the host frees entries.
            }
            if qid != 0 {
                match core.power_left {
                    Some(0) => {
                        self.fatal(core, "power cut");
                        core.power_left = Some(0);
                        return;
                    }
                    Some(n) => core.power_left = Some(n - 1),
                    None => {}
                }
            }
            let Some(sq) = core.sqs[qid].as_mut() else {
                return;
            };
            let mut raw = [0u8; SQE_SIZE];
            let off = sq.q.offset + sq.head as usize * SQE_SIZE;
            if !dma::region_read(&sq.q.region, off, &mut raw) {
                self.fatal(core, "SQ memory unreadable");
                return;
            }
            sq.head = (sq.head + 1) % sq.q.size;
            let head = sq.head;
            let sqe = SubmissionEntry::read_from_bytes(&raw).unwrap_or_default();
            let done = if qid == 0 {
                self.admin(core, &sqe)
            } else {
                core.io(&self.ctx, Cc(self.cc.load(Ordering::Relaxed)), &sqe)
            };
            let done = core.apply_faults(qid == 0, sqe.opc, done);
            if !done.status.is_success() {
                core.log_error(qid as u16, &sqe, done.status);
            }
            if done.post {
                let (cid, sqhd) = done.garble.unwrap_or((sqe.cid.get(), head));
                self.post(core, cqid, qid as u16, sqhd, cid, &done);
            }
        }
    }

    fn fatal(&self, core: &mut Core, why: &str) {
        tracing::error!(emu = %self.name, why, "controller fatal status");
        core.fatal = true;
        self.csts.fetch_or(Csts::CFS.bits(), Ordering::SeqCst);
    }

    fn post(&self, core: &mut Core, cqid: usize, sqid: u16, sqhd: u16, cid: u16, done: &Done) {
        let Some(cq) = core.cqs[cqid].as_mut() else {
            return;
        };
        let off = cq.q.offset + cq.tail as usize * CQE_SIZE;
        let r = &cq.q.region;
        let ok = dma::region_write_u64(r, off, done.dw0 as u64)
            && dma::region_write_u32(r, off + 8, sqhd as u32 | (sqid as u32) << 16);
        // The entry's first 12 bytes must be visible before the dword that
        // carries the phase tag: the host treats the new phase as "entry
        // complete" and then reads the rest.
        fence(Ordering::Release);
        let ok = ok
            && dma::region_write_u32(
                r,
                off + 12,
                cid as u32 | (done.status.to_field(cq.phase) as u32) << 16,
            );
        if !ok {
            self.fatal(core, "CQ memory unwritable");
            return;
        }
        cq.tail += 1;
        if cq.tail == cq.q.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
    }

    fn admin(&self, core: &mut Core, sqe: &SubmissionEntry) -> Done {
        let cc = Cc(self.cc.load(Ordering::Relaxed));
        let r = match sqe.opc {
            admin_opc::IDENTIFY => core.identify(&self.ctx, cc, sqe),
            admin_opc::CREATE_CQ => self.create_cq(core, cc, sqe),
            admin_opc::CREATE_SQ => self.create_sq(core, sqe),
            admin_opc::DELETE_SQ => Self::delete_sq(core, sqe),
            admin_opc::DELETE_CQ => Self::delete_cq(core, sqe),
            admin_opc::SET_FEATURES => core.set_features(sqe),
            admin_opc::GET_FEATURES => core.get_features(sqe),
            admin_opc::GET_LOG_PAGE => core.get_log_page(&self.ctx, cc, sqe),
            // QEMU: abort is accepted and never aborts (dw0 bit 0 = 1).
            admin_opc::ABORT => Ok(1),
            admin_opc::DBBUF_CONFIG => self.dbbuf_config(core, cc, sqe),
            _ => Err(NvmeStatus::INVALID_OPCODE),
        };
        match r {
            Ok(dw0) => Done::ok(dw0),
            Err(s) => Done::err(s),
        }
    }

    fn create_cq(&self, core: &mut Core, cc: Cc, sqe: &SubmissionEntry) -> Cmd<u32> {
        let qid = (sqe.cdw10.get() & 0xffff) as usize;
        let qsize = (sqe.cdw10.get() >> 16) as u16;
        if qid == 0 || qid > core.ncq as usize || qid >= core.cqs.len() || core.cqs[qid].is_some() {
            return Err(NvmeStatus::INVALID_QID);
        }
        if qsize == 0 || qsize > core.cfg.mqes {
            return Err(NvmeStatus::INVALID_QUEUE_SIZE);
        }
        if sqe.cdw11.get() & 1 == 0 {
            return Err(NvmeStatus::INVALID_FIELD); // CAP.CQR: contiguous only
        }
        let base = sqe.prp1.get();
        if base == 0 || !base.is_multiple_of(page_size_of(cc)) {
            return Err(NvmeStatus::INVALID_PRP_OFFSET);
        }
        let q = self
            .map_queue(base, qsize + 1, CQE_SIZE)
            .ok_or(NvmeStatus::DATA_TRANSFER_ERROR)?;
        self.doorbells[2 * qid + 1].store(0, Ordering::SeqCst);
        core.cqs[qid] = Some(Cq {
            q,
            head: 0,
            tail: 0,
            phase: true,
        });
        Ok(0)
    }

    fn create_sq(&self, core: &mut Core, sqe: &SubmissionEntry) -> Cmd<u32> {
        let qid = (sqe.cdw10.get() & 0xffff) as usize;
        let qsize = (sqe.cdw10.get() >> 16) as u16;
        let cqid = (sqe.cdw11.get() >> 16) as usize;
        if qid == 0 || qid > core.nsq as usize || qid >= core.sqs.len() || core.sqs[qid].is_some() {
            return Err(NvmeStatus::INVALID_QID);
        }
        if cqid == 0 || cqid >= core.cqs.len() || core.cqs[cqid].is_none() {
            return Err(NvmeStatus::CQ_INVALID);
        }
        if qsize == 0 || qsize > core.cfg.mqes {
            return Err(NvmeStatus::INVALID_QUEUE_SIZE);
        }
        if sqe.cdw11.get() & 1 == 0 {
            return Err(NvmeStatus::INVALID_FIELD);
        }
        let base = sqe.prp1.get();
        let cc = Cc(self.cc.load(Ordering::Relaxed));
        if base == 0 || !base.is_multiple_of(page_size_of(cc)) {
            return Err(NvmeStatus::INVALID_PRP_OFFSET);
        }
        let q = self
            .map_queue(base, qsize + 1, SQE_SIZE)
            .ok_or(NvmeStatus::DATA_TRANSFER_ERROR)?;
        self.doorbells[2 * qid].store(0, Ordering::SeqCst);
        core.sqs[qid] = Some(Sq {
            q,
            cqid: cqid as u16,
            head: 0,
            tail: 0,
        });
        Ok(0)
    }

    fn dbbuf_config(&self, core: &mut Core, cc: Cc, sqe: &SubmissionEntry) -> Cmd<u32> {
        let ps = page_size_of(cc);
        let (dbs, eis) = (sqe.prp1.get(), sqe.prp2.get());
        if dbs == 0 || eis == 0 || !dbs.is_multiple_of(ps) || !eis.is_multiple_of(ps) {
            return Err(NvmeStatus::INVALID_FIELD);
        }
        let len = ps as usize;
        let shadow = self
            .ctx
            .translate(dbs, len)
            .ok_or(NvmeStatus::DATA_TRANSFER_ERROR)?;
        let eventidx = self
            .ctx
            .translate(eis, len)
            .ok_or(NvmeStatus::DATA_TRANSFER_ERROR)?;
        let d = DbBuf { shadow, eventidx };
        // As QEMU: existing queues' current values seed the shadow.
        for (qid, sq) in core.sqs.iter().enumerate() {
            if let Some(sq) = sq {
                d.write_shadow(2 * qid * self.stride, sq.tail as u32);
            }
        }
        for (qid, cq) in core.cqs.iter().enumerate() {
            if let Some(cq) = cq {
                d.write_shadow((2 * qid + 1) * self.stride, cq.head as u32);
            }
        }
        core.dbbuf = Some(d);
        Ok(0)
    }

    fn delete_sq(core: &mut Core, sqe: &SubmissionEntry) -> Cmd<u32> {
        let qid = (sqe.cdw10.get() & 0xffff) as usize;
        match core.sqs.get_mut(qid) {
            Some(q @ Some(_)) if qid != 0 => {
                *q = None;
                Ok(0)
            }
            _ => Err(NvmeStatus::INVALID_QID),
        }
    }

    fn delete_cq(core: &mut Core, sqe: &SubmissionEntry) -> Cmd<u32> {
        let qid = (sqe.cdw10.get() & 0xffff) as usize;
        if qid == 0 || qid >= core.cqs.len() || core.cqs[qid].is_none() {
            return Err(NvmeStatus::INVALID_QID);
        }
        if core.sqs.iter().flatten().any(|s| s.cqid as usize == qid) {
            return Err(NvmeStatus::INVALID_QUEUE_DELETION);
        }
        core.cqs[qid] = None;
        Ok(0)
    }
}

/// Walks a PRP-described transfer of `len` bytes, calling `f(iova, n)` for
/// each contiguous segment in order (NVMe Base 2.0, 4.1.1). PRP list
/// entries are read from host memory through `ctx`.
fn prp_walk(
    ctx: &DmaContext,
    ps: u64,
    prp1: u64,
    prp2: u64,
    len: usize,
    mut f: impl FnMut(u64, usize) -> bool,
) -> Cmd {
    if len == 0 {
        return Ok(());
    }
    let ps_us = ps as usize;
    let first = (ps_us - (prp1 % ps) as usize).min(len);
    if !f(prp1, first) {
        return Err(NvmeStatus::DATA_TRANSFER_ERROR);
    }
    let mut rem = len - first;
    if rem == 0 {
        return Ok(());
    }
    if rem <= ps_us {
        if !prp2.is_multiple_of(ps) {
            return Err(NvmeStatus::INVALID_PRP_OFFSET);
        }
        return if f(prp2, rem) {
            Ok(())
        } else {
            Err(NvmeStatus::DATA_TRANSFER_ERROR)
        };
    }
    let mut list = prp2;
    loop {
        if !list.is_multiple_of(8) {
            return Err(NvmeStatus::INVALID_PRP_OFFSET);
        }
        let slots = (ps - list % ps) as usize / 8;
        let (region, base) = ctx
            .translate(list, slots * 8)
            .ok_or(NvmeStatus::DATA_TRANSFER_ERROR)?;
        let mut chained = false;
        for i in 0..slots {
            let entry = dma::region_read_u64(&region, base + 8 * i)
                .ok_or(NvmeStatus::DATA_TRANSFER_ERROR)?;
            if i == slots - 1 && rem > ps_us {
                list = entry;
                chained = true;
                break;
            }
            if entry % ps != 0 {
                return Err(NvmeStatus::INVALID_PRP_OFFSET);
            }
            let n = rem.min(ps_us);
            if !f(entry, n) {
                return Err(NvmeStatus::DATA_TRANSFER_ERROR);
            }
            rem -= n;
            if rem == 0 {
                return Ok(());
            }
        }
        if !chained {
            return Err(NvmeStatus::INVALID_FIELD);
        }
    }
}

/// Host → device: fills `buf` from the PRP-described host memory.
fn h2c(ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry, buf: &mut [u8]) -> Cmd {
    let mut pos = 0;
    prp_walk(
        ctx,
        page_size_of(cc),
        sqe.prp1.get(),
        sqe.prp2.get(),
        buf.len(),
        |iova, n| {
            let ok = ctx.device_read(iova, &mut buf[pos..pos + n]);
            pos += n;
            ok
        },
    )
}

/// Device → host: writes `buf` to the PRP-described host memory.
fn c2h(ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry, buf: &[u8]) -> Cmd {
    let mut pos = 0;
    prp_walk(
        ctx,
        page_size_of(cc),
        sqe.prp1.get(),
        sqe.prp2.get(),
        buf.len(),
        |iova, n| {
            let ok = ctx.device_write(iova, &buf[pos..pos + n]);
            pos += n;
            ok
        },
    )
}

impl Core {
    fn apply_faults(&mut self, admin: bool, opcode: u8, done: Done) -> Done {
        if self.faults.is_empty() {
            return done;
        }
        let mut fired = None;
        for (i, (f, seen)) in self.faults.iter_mut().enumerate() {
            if f.admin == admin && f.opcode == opcode {
                *seen += 1;
                if *seen == f.nth && fired.is_none() {
                    fired = Some((i, f.action));
                }
            }
        }
        match fired {
            None => done,
            Some((i, action)) => {
                self.faults.remove(i);
                match action {
                    FaultAction::Status(status) => Done::err(status),
                    FaultAction::DropCompletion => Done {
                        post: false,
                        ..done
                    },
                    FaultAction::Garble { cid, sqhd } => Done {
                        garble: Some((cid, sqhd)),
                        ..done
                    },
                }
            }
        }
    }

    fn log_error(&mut self, sqid: u16, sqe: &SubmissionEntry, status: NvmeStatus) {
        self.error_count += 1;
        let mut e = ErrorLogEntry::new_zeroed();
        e.error_count = self.error_count.into();
        e.sqid = sqid.into();
        e.cid = sqe.cid;
        e.status_field = status.to_field(false).into();
        e.nsid = sqe.nsid;
        e.lba = (sqe.cdw10.get() as u64 | (sqe.cdw11.get() as u64) << 32).into();
        self.errors.insert(0, e);
        self.errors.truncate(64);
    }

    fn mdts_bytes(&self) -> Option<usize> {
        (self.cfg.mdts != 0).then(|| 4096usize << self.cfg.mdts)
    }

    fn identify_controller(&self) -> IdentifyController {
        let mut id = IdentifyController::new_zeroed();
        id.vid = VENDOR_ID.into();
        id.ssvid = 0x1af4.into();
        pad(&mut id.sn, &self.cfg.serial);
        pad(&mut id.mn, "ustor emulated NVMe controller");
        pad(&mut id.fr, env!("CARGO_PKG_VERSION"));
        id.rab = 6;
        id.ieee = [0x00, 0x54, 0x52];
        id.mdts = self.cfg.mdts;
        id.cntlid = 0.into();
        id.ver = regs::Version::V1_4.0.into();
        id.cntrltype = 1;
        id.oacs = spec::OACS_DBBUF.into();
        id.acl = 3;
        id.aerl = 3;
        id.frmw = 3;
        id.lpa = 0x7;
        id.elpe = 63;
        id.sqes = 0x66;
        id.cqes = 0x44;
        id.nn = (self.namespaces.len() as u32).into();
        id.oncs = (spec::ONCS_COPY | spec::ONCS_WRITE_ZEROES | spec::ONCS_DSM).into();
        id.vwc = 1;
        id.ocfs = 0x3.into();
        let nqn = format!("nqn.2019-08.org.ustor:emu-{}", self.cfg.serial);
        pad_nul(&mut id.subnqn, &nqn);
        id
    }

    fn identify_namespace(&self, ns: &Namespace) -> IdentifyNamespace {
        let mut id = IdentifyNamespace::new_zeroed();
        let c = &ns.cfg;
        id.nsze = c.blocks.into();
        id.ncap = c.blocks.into();
        id.nuse = c.blocks.into();
        id.nsfeat = 0;
        id.nlbaf = 1;
        id.flbas = if c.block_size == 512 { 0 } else { 1 };
        id.dlfeat = 1; // deallocated blocks read as zeros
        id.lbaf[0].lbads = 9;
        id.lbaf[1].lbads = 12;
        id.mssrl = c.mssrl.into();
        id.mcl = c.mcl.into();
        id.msrc = c.msrc;
        id
    }

    fn identify(&mut self, ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry) -> Cmd<u32> {
        let cns = (sqe.cdw10.get() & 0xff) as u8;
        let nsid = sqe.nsid.get();
        let data: Vec<u8> = match cns {
            spec::cns::CONTROLLER => self.identify_controller().as_bytes().to_vec(),
            spec::cns::NAMESPACE => {
                let i = nsid.checked_sub(1).ok_or(NvmeStatus::INVALID_NAMESPACE)? as usize;
                let ns = self
                    .namespaces
                    .get(i)
                    .ok_or(NvmeStatus::INVALID_NAMESPACE)?;
                self.identify_namespace(ns).as_bytes().to_vec()
            }
            spec::cns::ACTIVE_NS_LIST => {
                if nsid >= 0xffff_fffe {
                    return Err(NvmeStatus::INVALID_NAMESPACE);
                }
                let mut v = vec![0u8; 4096];
                let ids = (1..=self.namespaces.len() as u32).filter(|&n| n > nsid);
                for (slot, id) in v.chunks_exact_mut(4).zip(ids) {
                    slot.copy_from_slice(&id.to_le_bytes());
                }
                v
            }
            _ => return Err(NvmeStatus::INVALID_FIELD),
        };
        c2h(ctx, cc, sqe, &data)?;
        Ok(0)
    }

    fn set_features(&mut self, sqe: &SubmissionEntry) -> Cmd<u32> {
        let fid = (sqe.cdw10.get() & 0xff) as u8;
        let v = sqe.cdw11.get();
        match fid {
            spec::fid::NUMBER_OF_QUEUES => {
                let nsqr = (v & 0xffff) as u16;
                let ncqr = (v >> 16) as u16;
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Err(NvmeStatus::INVALID_FIELD);
                }
                let max = self.cfg.max_io_queues;
                self.nsq = (nsqr + 1).min(max);
                self.ncq = (ncqr + 1).min(max);
                Ok((self.nsq - 1) as u32 | ((self.ncq - 1) as u32) << 16)
            }
            spec::fid::VOLATILE_WRITE_CACHE => {
                self.vwc = v & 1 != 0;
                Ok(0)
            }
            _ => Err(NvmeStatus::INVALID_FIELD),
        }
    }

    fn get_features(&mut self, sqe: &SubmissionEntry) -> Cmd<u32> {
        match (sqe.cdw10.get() & 0xff) as u8 {
            spec::fid::NUMBER_OF_QUEUES => {
                Ok((self.nsq - 1) as u32 | ((self.ncq - 1) as u32) << 16)
            }
            spec::fid::VOLATILE_WRITE_CACHE => Ok(self.vwc as u32),
            _ => Err(NvmeStatus::INVALID_FIELD),
        }
    }

    fn get_log_page(&mut self, ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry) -> Cmd<u32> {
        let lid = (sqe.cdw10.get() & 0xff) as u8;
        let numdl = sqe.cdw10.get() >> 16;
        let numdu = sqe.cdw11.get() & 0xffff;
        let len = ((numdu << 16 | numdl) as usize + 1) * 4;
        let offset = sqe.cdw12.get() as u64 | (sqe.cdw13.get() as u64) << 32;
        if let Some(m) = self.mdts_bytes()
            && len > m
        {
            return Err(NvmeStatus::INVALID_FIELD);
        }
        let log: Vec<u8> = match lid {
            spec::lid::ERROR_INFO => {
                let mut v = vec![0u8; 64 * 64];
                for (slot, e) in v.chunks_exact_mut(64).zip(&self.errors) {
                    slot.copy_from_slice(e.as_bytes());
                }
                v
            }
            spec::lid::SMART => {
                let mut s = SmartLog::new_zeroed();
                s.temperature = 300.into();
                s.avail_spare = 100;
                s.spare_thresh = 10;
                s.data_units_read[..8].copy_from_slice(&self.units_read.to_le_bytes());
                s.data_units_written[..8].copy_from_slice(&self.units_written.to_le_bytes());
                s.host_reads[..8].copy_from_slice(&self.reads.to_le_bytes());
                s.host_writes[..8].copy_from_slice(&self.writes.to_le_bytes());
                s.num_err_log_entries[..8].copy_from_slice(&self.error_count.to_le_bytes());
                s.as_bytes().to_vec()
            }
            _ => return Err(NvmeStatus::INVALID_LOG_PAGE),
        };
        if offset > log.len() as u64 || !offset.is_multiple_of(4) {
            return Err(NvmeStatus::INVALID_FIELD);
        }
        let mut out = vec![0u8; len];
        let src = &log[offset as usize..];
        let n = src.len().min(len);
        out[..n].copy_from_slice(&src[..n]);
        c2h(ctx, cc, sqe, &out)?;
        Ok(0)
    }

    fn io(&mut self, ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry) -> Done {
        match self.io_inner(ctx, cc, sqe) {
            Ok(()) => Done::ok(0),
            Err(s) => Done::err(s),
        }
    }

    fn ns_index(&self, nsid: u32) -> Cmd<usize> {
        match nsid.checked_sub(1) {
            Some(i) if (i as usize) < self.namespaces.len() => Ok(i as usize),
            _ => Err(NvmeStatus::INVALID_NAMESPACE),
        }
    }

    fn check_range(&self, ns: usize, slba: u64, nlb: u64) -> Cmd {
        match slba.checked_add(nlb) {
            Some(end) if end <= self.namespaces[ns].cfg.blocks => Ok(()),
            _ => Err(NvmeStatus::LBA_OUT_OF_RANGE),
        }
    }

    fn io_inner(&mut self, ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry) -> Cmd {
        let slba = sqe.cdw10.get() as u64 | (sqe.cdw11.get() as u64) << 32;
        match sqe.opc {
            nvm_opc::FLUSH => {
                if sqe.nsid.get() != 0xffff_ffff {
                    self.ns_index(sqe.nsid.get())?;
                }
                Ok(())
            }
            nvm_opc::READ | nvm_opc::WRITE => {
                let ns = self.ns_index(sqe.nsid.get())?;
                let nlb = (sqe.cdw12.get() & 0xffff) as u64 + 1;
                let bs = self.namespaces[ns].cfg.block_size as usize;
                let len = nlb as usize * bs;
                if let Some(m) = self.mdts_bytes()
                    && len > m
                {
                    return Err(NvmeStatus::INVALID_FIELD);
                }
                self.check_range(ns, slba, nlb)?;
                let units = len.div_ceil(512) as u64;
                if sqe.opc == nvm_opc::READ {
                    self.reads += 1;
                    self.units_read += units;
                } else {
                    self.writes += 1;
                    self.units_written += units;
                }
                if matches!(self.namespaces[ns].store, Store::Null) {
                    // No data to move: the null namespace measures overhead.
                    return Ok(());
                }
                let mut buf = std::mem::take(&mut self.scratch);
                buf.clear();
                buf.resize(len, 0);
                let at = slba * bs as u64;
                let r = if sqe.opc == nvm_opc::READ {
                    if self.namespaces[ns].read(at, &mut buf) {
                        c2h(ctx, cc, sqe, &buf)
                    } else {
                        Err(NvmeStatus::UNRECOVERED_READ)
                    }
                } else {
                    h2c(ctx, cc, sqe, &mut buf).and_then(|()| {
                        if self.namespaces[ns].write(at, Some(&buf), len) {
                            Ok(())
                        } else {
                            Err(NvmeStatus::WRITE_FAULT)
                        }
                    })
                };
                self.scratch = buf;
                r
            }
            nvm_opc::WRITE_ZEROES => {
                let ns = self.ns_index(sqe.nsid.get())?;
                let nlb = (sqe.cdw12.get() & 0xffff) as u64 + 1;
                self.check_range(ns, slba, nlb)?;
                let bs = self.namespaces[ns].cfg.block_size as u64;
                if self.namespaces[ns].write(slba * bs, None, (nlb * bs) as usize) {
                    Ok(())
                } else {
                    Err(NvmeStatus::WRITE_FAULT)
                }
            }
            nvm_opc::DSM => {
                let ns = self.ns_index(sqe.nsid.get())?;
                let nr = (sqe.cdw10.get() & 0xff) as usize + 1;
                let deallocate = sqe.cdw11.get() & (1 << 2) != 0;
                let mut raw = vec![0u8; nr * 16];
                h2c(ctx, cc, sqe, &mut raw)?;
                let bs = self.namespaces[ns].cfg.block_size as u64;
                let mut ranges = Vec::with_capacity(nr);
                for c in raw.chunks_exact(16) {
                    let r = DsmRange::read_from_bytes(c).unwrap_or_default();
                    self.check_range(ns, r.slba.get(), r.nlb.get() as u64)?;
                    ranges.push(r);
                }
                if deallocate {
                    for r in ranges {
                        let len = (r.nlb.get() as u64 * bs) as usize;
                        if !self.namespaces[ns].write(r.slba.get() * bs, None, len) {
                            return Err(NvmeStatus::WRITE_FAULT);
                        }
                    }
                }
                Ok(())
            }
            nvm_opc::COPY => self.copy(ctx, cc, sqe, slba),
            _ => Err(NvmeStatus::INVALID_OPCODE),
        }
    }

    fn copy(&mut self, ctx: &DmaContext, cc: Cc, sqe: &SubmissionEntry, sdlba: u64) -> Cmd {
        let ns = self.ns_index(sqe.nsid.get())?;
        let nr = (sqe.cdw12.get() & 0xff) as usize + 1;
        let format = ((sqe.cdw12.get() >> 8) & 0xf) as u8;
        let cfg = self.namespaces[ns].cfg.clone();
        // Checks in QEMU's order: range count, format, then each range.
        if nr > cfg.msrc as usize + 1 {
            return Err(NvmeStatus::CMD_SIZE_LIMIT);
        }
        let desc = match format {
            0 => 32,
            1 => 40,
            _ => return Err(NvmeStatus::INVALID_FIELD),
        };
        if (format == 1) != cfg.pi_64b_guard {
            return Err(NvmeStatus::INVALID_FORMAT);
        }
        let mut raw = vec![0u8; nr * desc];
        h2c(ctx, cc, sqe, &mut raw)?;
        let mut ranges = Vec::with_capacity(nr);
        for c in raw.chunks_exact(desc) {
            let (slba, nlb) = if format == 0 {
                let d = CopyRangeFormat0::read_from_bytes(c).unwrap_or_default();
                (d.slba.get(), d.nlb.get() as u64 + 1)
            } else {
                let d = CopyRangeFormat1::read_from_bytes(c).unwrap_or_default();
                (d.slba.get(), d.nlb.get() as u64 + 1)
            };
            if nlb > cfg.mssrl as u64 {
                return Err(NvmeStatus::CMD_SIZE_LIMIT);
            }
            ranges.push((slba, nlb));
        }
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        if total > cfg.mcl as u64 {
            return Err(NvmeStatus::CMD_SIZE_LIMIT);
        }
        for &(slba, nlb) in &ranges {
            self.check_range(ns, slba, nlb)?;
        }
        self.check_range(ns, sdlba, total)?;
        let bs = cfg.block_size as u64;
        let mut data = vec![0u8; (total * bs) as usize];
        let mut pos = 0usize;
        for &(slba, nlb) in &ranges {
            let n = (nlb * bs) as usize;
            if !self.namespaces[ns].read(slba * bs, &mut data[pos..pos + n]) {
                return Err(NvmeStatus::UNRECOVERED_READ);
            }
            pos += n;
        }
        if self.namespaces[ns].write(sdlba * bs, Some(&data), data.len()) {
            Ok(())
        } else {
            Err(NvmeStatus::WRITE_FAULT)
        }
    }
}

fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn pad_nul(dst: &mut [u8], s: &str) {
    dst.fill(0);
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}
