//! The NVMe/TCP controller: its admin queue, bring-up through Fabrics
//! properties, Identify, Keep Alive, I/O queues and discovery.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zerocopy::FromBytes;

use super::fabrics::{self, DiscoveryEntry, DiscoveryLogEntry, DiscoveryLogHeader};
use super::queue::{AdminData, TcpQueuePair};
use super::{TcpError, TcpOptions, TcpTarget};
use crate::driver::{Completion, Namespace, QueueOptions, active_namespaces};
use crate::regs::{self, Cap, Cc, Csts};
use crate::spec::{IdentifyController, IdentifyNamespace, SubmissionEntry, admin_opc, cns, fid};
use crate::{DmaBuffer, DmaContext, Error, Result};

/// In-capsule data the admin queue's capsules carry (as Linux does).
const ADMIN_INLINE: usize = 8192;
/// Entries of the admin queue.
const ADMIN_ENTRIES: u16 = 32;
/// Transfer limit when MDTS sets none.
const DEFAULT_MAX_TRANSFER: usize = 1 << 20;
/// Discovery log entries read at most.
const MAX_DISCOVERY_RECORDS: u64 = 1024;

/// Ends the keep-alive thread: set when the association's last holder
/// (the controller or one of its queues) lets go of it.
#[derive(Default)]
struct StopToken {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopToken {
    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Waits `period` or until stopped; true when stopped.
    fn wait(&self, period: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, period, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *stopped
    }
}

/// One association: what the controller and its queues share. Its admin
/// queue, and with it the association, lives as long as the controller
/// or any queue it made.
struct Shared {
    target: Arc<TcpTarget>,
    admin: Mutex<TcpQueuePair>,
    cntlid: u16,
    down: AtomicBool,
    stop: Arc<StopToken>,
    qids: Mutex<Vec<bool>>,
    /// Where the search for a free queue id starts: ids go round, so one
    /// just closed (which the controller may still be tearing down) is
    /// taken last.
    next_qid: std::sync::atomic::AtomicUsize,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

impl Shared {
    fn new(target: &Arc<TcpTarget>, admin: TcpQueuePair) -> Shared {
        Shared {
            target: Arc::clone(target),
            cntlid: admin.cntlid,
            admin: Mutex::new(admin),
            down: AtomicBool::new(false),
            stop: Arc::default(),
            qids: Mutex::new(Vec::new()),
            next_qid: std::sync::atomic::AtomicUsize::new(1),
        }
    }

    fn lock_admin(&self) -> MutexGuard<'_, TcpQueuePair> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_qids(&self) -> MutexGuard<'_, Vec<bool>> {
        self.qids.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A controller reached over NVMe/TCP. `Send + Sync`; I/O goes through
/// [`TcpQueuePair`]s it creates, one per thread.
pub struct TcpController {
    shared: Arc<Shared>,
    name: String,
    cap: Cap,
    identify: Box<IdentifyController>,
    namespaces: Vec<Namespace>,
    io_queues: u16,
    max_transfer: usize,
    inline_data: usize,
    dma: Arc<DmaContext>,
}

impl TcpController {
    /// Connects to `subnqn` at `addr` (`host:port`) and brings the
    /// controller up.
    pub fn connect(addr: &str, subnqn: &str, opts: TcpOptions) -> Result<TcpController> {
        let target = Arc::new(TcpTarget::new(addr, subnqn, opts)?);
        TcpController::connect_to(target)
    }

    /// Brings up the controller of `target`.
    pub fn connect_to(target: Arc<TcpTarget>) -> Result<TcpController> {
        let (admin, cap) = admin_queue(&target)?;
        let shared = Arc::new(Shared::new(&target, admin));
        let identify = identify_controller(&shared)?;
        let mdts = identify.mdts;
        let max_transfer = if mdts == 0 || mdts > 20 {
            DEFAULT_MAX_TRANSFER
        } else {
            // MPSMIN is 4 KiB on every fabrics controller we meet; CAP
            // says so and is used.
            (cap.min_page_size() << mdts).min(DEFAULT_MAX_TRANSFER)
        };
        let ioccsz = identify.ioccsz.get() as usize;
        let inline_data = (ioccsz * 16).saturating_sub(64).min(max_transfer);
        let granted = set_queue_count(&shared, target.opts.io_queues)?;
        let namespaces = identify_namespaces(&shared, identify.nn.get())?;
        *shared.lock_qids() = vec![false; usize::from(granted) + 1];
        start_keep_alive(&shared);
        Ok(TcpController {
            name: target.to_string(),
            shared,
            cap,
            identify,
            namespaces,
            io_queues: granted,
            max_transfer,
            inline_data,
            dma: DmaContext::host(),
        })
    }

    /// The target, as `nvme-tcp:ADDR:PORT/SUBNQN`.
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// The target this controller is connected to.
    pub fn target(&self) -> &Arc<TcpTarget> {
        &self.shared.target
    }

    /// The controller id the subsystem gave this association.
    pub fn cntlid(&self) -> u16 {
        self.shared.cntlid
    }

    /// CAP, as Property Get read it.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// Identify Controller data.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// Active namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// Namespace `nsid`, if active.
    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid).copied()
    }

    /// Largest transfer of one command.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// In-capsule data I/O queues carry (IOCCSZ).
    pub fn inline_data(&self) -> usize {
        self.inline_data
    }

    /// I/O queues granted.
    pub fn io_queues(&self) -> u16 {
        self.io_queues
    }

    /// Whether the association is down (its admin queue failed or Keep
    /// Alive went unanswered).
    pub fn is_down(&self) -> bool {
        self.shared.down.load(Ordering::SeqCst) || self.shared.lock_admin().failure().is_some()
    }

    /// A buffer for the queues' safe submission functions.
    pub fn dma_alloc(&self, len: usize) -> Result<DmaBuffer> {
        self.dma.alloc(len)
    }

    /// Runs one admin command and waits for it: `data_len` bytes from the
    /// controller, or `to_device` bytes to it. Returns dword 0 and the
    /// bytes read.
    pub fn admin(
        &self,
        what: &str,
        sqe: SubmissionEntry,
        data_len: usize,
        to_device: Option<&[u8]>,
    ) -> Result<(u32, Vec<u8>)> {
        admin(&self.shared, what, sqe, data_len, to_device)
    }

    /// Identify Namespace `nsid`, raw.
    pub fn identify_namespace(&self, nsid: u32) -> Result<IdentifyNamespace> {
        identify_namespace(&self.shared, nsid)
    }

    /// Connects an I/O queue on a free queue id.
    pub fn create_qpair(&self, opts: QueueOptions) -> Result<TcpQueuePair> {
        // A controller may still be tearing down the queue a closed
        // connection had (Linux nvmet does it in a work item) and answer
        // Connect for that id with Command Sequence Error: try the next
        // free id, then wait a little for the old one to go.
        let mut last = None;
        for attempt in 0..40 {
            match self.try_create_qpair(opts) {
                Err(Error::Tcp(e)) if e.queue_still_held() => {
                    last = Some(Error::Tcp(e));
                    if attempt >= usize::from(self.io_queues) {
                        std::thread::sleep(Duration::from_millis(25));
                    }
                }
                other => return other,
            }
        }
        Err(last.unwrap_or(Error::NoFreeQueue {
            device: self.name(),
            granted: self.io_queues,
        }))
    }

    fn try_create_qpair(&self, opts: QueueOptions) -> Result<TcpQueuePair> {
        if self.is_down() {
            return Err(TcpError::ControllerDown {
                target: self.name(),
            }
            .into());
        }
        let qid = {
            let mut q = self.shared.lock_qids();
            let n = q.len().saturating_sub(1).max(1);
            let start = self.shared.next_qid.load(Ordering::Relaxed);
            let Some(qid) = (0..n)
                .map(|k| 1 + (start - 1 + k) % n)
                .find(|&i| q.get(i) == Some(&false))
            else {
                return Err(Error::NoFreeQueue {
                    device: self.name(),
                    granted: self.io_queues,
                });
            };
            q[qid] = true;
            self.shared.next_qid.store(1 + qid % n, Ordering::Relaxed);
            qid as u16
        };
        let entries = opts.entries.min(self.cap.mqes().saturating_add(1)).max(2);
        let opts = QueueOptions { entries, ..opts };
        let qp = TcpQueuePair::connect(
            &self.shared.target,
            qid,
            self.shared.cntlid,
            opts,
            0,
            self.inline_data,
            self.max_transfer,
        );
        match qp {
            Ok(mut qp) => {
                let shared = Arc::clone(&self.shared);
                qp.on_drop = Some(Box::new(move |qid| {
                    if let Some(slot) = shared.lock_qids().get_mut(usize::from(qid)) {
                        *slot = false;
                    }
                }));
                Ok(qp)
            }
            Err(e) => {
                self.shared.lock_qids()[usize::from(qid)] = false;
                Err(e)
            }
        }
    }

    /// Connects the admin queue anew after the association went down (a
    /// new controller id: I/O queues of the old one must be connected
    /// again with [`TcpController::create_qpair`]).
    pub fn reconnect(&mut self) -> Result<()> {
        let (admin, cap) = admin_queue(&self.shared.target)?;
        let shared = Arc::new(Shared::new(&self.shared.target, admin));
        let granted = set_queue_count(&shared, self.io_queues)?;
        *shared.lock_qids() = vec![false; usize::from(granted) + 1];
        self.io_queues = granted;
        self.cap = cap;
        self.shared = shared;
        start_keep_alive(&self.shared);
        Ok(())
    }

    /// Normal shutdown (CC.SHN), then the connection closes.
    pub fn shutdown(&self) -> Result<()> {
        let cc = Cc(property_get(&self.shared, regs::CC, false)? as u32).with_shn(1);
        property_set(&self.shared, regs::CC, cc.0)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let csts =
                Csts::from_bits_retain(property_get(&self.shared, regs::CSTS, false)? as u32);
            if csts.shst() == regs::ShutdownStatus::Complete {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(Error::ControllerTimeout {
            device: self.name(),
            what: "CSTS.SHST = complete",
            waited_ms: 5000,
        })
    }
}

impl std::fmt::Debug for TcpController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpController")
            .field("target", &self.name())
            .field("cntlid", &self.shared.cntlid)
            .finish()
    }
}

/// Connects the admin queue, reads CAP, enables the controller.
fn admin_queue(target: &Arc<TcpTarget>) -> Result<(TcpQueuePair, Cap)> {
    let kato = target.opts.keep_alive.as_millis().min(u128::from(u32::MAX)) as u32;
    let opts = QueueOptions {
        entries: ADMIN_ENTRIES,
        timeout: None,
        ..QueueOptions::default()
    };
    let mut admin = TcpQueuePair::connect(
        target,
        0,
        fabrics::DYNAMIC_CNTLID,
        opts,
        kato,
        ADMIN_INLINE,
        4096,
    )?;
    let cap = Cap(prop_get(&mut admin, regs::CAP, true)?);
    let cc = Cc(prop_get(&mut admin, regs::CC, false)? as u32);
    if cc.en() {
        return Err(Error::BadDeviceData {
            device: target.to_string(),
            what: "a new association's controller is already enabled (CC.EN = 1)".into(),
        });
    }
    let cc = Cc(0)
        .with_iosqes(6)
        .with_iocqes(4)
        .with_css(0)
        .with_en(true);
    prop_set(&mut admin, regs::CC, cc.0)?;
    let wait = cap.ready_timeout().max(Duration::from_millis(500));
    let deadline = Instant::now() + wait;
    loop {
        let csts = Csts::from_bits_retain(prop_get(&mut admin, regs::CSTS, false)? as u32);
        if csts.contains(Csts::CFS) {
            return Err(Error::ControllerFatal {
                device: target.to_string(),
            });
        }
        if csts.contains(Csts::RDY) {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::ControllerTimeout {
                device: target.to_string(),
                what: "CSTS.RDY = 1",
                waited_ms: wait.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((admin, cap))
}

fn prop_get(admin: &mut TcpQueuePair, offset: usize, eight: bool) -> Result<u64> {
    let (c, dw1) = admin.admin_like(
        fabrics::property_get(offset as u32, eight),
        AdminData::None,
        "Property Get",
    )?;
    checked(admin, "Property Get", c).map(|_| u64::from(c.dw0) | u64::from(dw1) << 32)
}

fn prop_set(admin: &mut TcpQueuePair, offset: usize, value: u32) -> Result<()> {
    let (c, _) = admin.admin_like(
        fabrics::property_set(offset as u32, value),
        AdminData::None,
        "Property Set",
    )?;
    checked(admin, "Property Set", c).map(|_| ())
}

fn property_get(shared: &Shared, offset: usize, eight: bool) -> Result<u64> {
    prop_get(&mut shared.lock_admin(), offset, eight)
}

fn property_set(shared: &Shared, offset: usize, value: u32) -> Result<()> {
    prop_set(&mut shared.lock_admin(), offset, value)
}

fn checked(admin: &TcpQueuePair, what: &str, c: Completion) -> Result<u32> {
    c.result.map_err(|e| match e.status() {
        Some(status) => Error::AdminCommand {
            device: admin.target.to_string(),
            command: what.to_owned(),
            status,
        },
        None => Error::from(admin.failure().cloned().unwrap_or(TcpError::Closed {
            target: admin.target.to_string(),
            qid: 0,
        })),
    })
}

fn admin(
    shared: &Shared,
    what: &str,
    sqe: SubmissionEntry,
    data_len: usize,
    to_device: Option<&[u8]>,
) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; if to_device.is_some() { 0 } else { data_len }];
    let data = match to_device {
        Some(bytes) => AdminData::Out(bytes),
        None if data_len > 0 => AdminData::In(out.as_mut_ptr(), out.len()),
        None => AdminData::None,
    };
    // The admin queue is locked only to submit and to poll, never while
    // waiting, so Keep Alive goes out while a long command runs. `out`
    // outlives the command: it is answered, or the connection is failed
    // (closed) before this returns.
    let req = shared.lock_admin().submit_internal(sqe, data)?;
    let deadline = Instant::now() + shared.target.opts.admin_timeout;
    loop {
        {
            let mut q = shared.lock_admin();
            if let Some(r) = q.wait_internal(req, deadline, what) {
                let (c, _) = r?;
                let dw0 = checked(&q, what, c)?;
                return Ok((dw0, out));
            }
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn identify_controller(shared: &Shared) -> Result<Box<IdentifyController>> {
    let sqe = SubmissionEntry::new(admin_opc::IDENTIFY, 0).with_cdws(&[cns::CONTROLLER as u32]);
    let (_, data) = admin(shared, "Identify Controller", sqe, 4096, None)?;
    IdentifyController::read_from_bytes(&data)
        .map(Box::new)
        .map_err(|_| Error::BadDeviceData {
            device: shared.target.to_string(),
            what: "short Identify Controller data".into(),
        })
}

fn identify_namespace(shared: &Shared, nsid: u32) -> Result<IdentifyNamespace> {
    let sqe = SubmissionEntry::new(admin_opc::IDENTIFY, nsid).with_cdws(&[cns::NAMESPACE as u32]);
    let (_, data) = admin(
        shared,
        &format!("Identify Namespace {nsid}"),
        sqe,
        4096,
        None,
    )?;
    IdentifyNamespace::read_from_bytes(&data).map_err(|_| Error::BadDeviceData {
        device: shared.target.to_string(),
        what: "short Identify Namespace data".into(),
    })
}

fn identify_namespaces(shared: &Shared, nn: u32) -> Result<Vec<Namespace>> {
    let sqe = SubmissionEntry::new(admin_opc::IDENTIFY, 0).with_cdws(&[cns::ACTIVE_NS_LIST as u32]);
    let (_, list) = admin(shared, "Identify Active Namespace List", sqe, 4096, None)?;
    active_namespaces(&shared.target.to_string(), &list, nn, |nsid| {
        identify_namespace(shared, nsid)
    })
}

fn set_queue_count(shared: &Shared, want: u16) -> Result<u16> {
    let n = u32::from(want.clamp(1, 0xfffe) - 1);
    let sqe = SubmissionEntry::new(admin_opc::SET_FEATURES, 0)
        .with_cdws(&[u32::from(fid::NUMBER_OF_QUEUES), n | n << 16]);
    let (dw0, _) = admin(shared, "Set Features Number of Queues", sqe, 0, None)?;
    let granted = ((dw0 & 0xffff) as u16).min((dw0 >> 16) as u16);
    Ok(granted.saturating_add(1).min(want.max(1)))
}

/// Sends Keep Alive every half KATO from a thread of its own, for as
/// long as the association has a holder; marks it down when one fails.
fn start_keep_alive(shared: &Arc<Shared>) {
    let kato = shared.target.opts.keep_alive;
    if kato.is_zero() {
        return;
    }
    let (association, stop) = (Arc::downgrade(shared), Arc::clone(&shared.stop));
    let period = kato / 2;
    let spawned = std::thread::Builder::new()
        .name("nvme-tcp-keepalive".into())
        .spawn(move || {
            while !stop.wait(period) {
                let Some(shared) = association.upgrade() else {
                    return;
                };
                if let Err(e) = admin(&shared, "Keep Alive", fabrics::keep_alive(), 0, None) {
                    tracing::warn!(target_addr = %shared.target, error = %e, "Keep Alive failed; the association is down");
                    shared.down.store(true, Ordering::SeqCst);
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(target_addr = %shared.target, error = %e, "no keep-alive thread; the target will end the association after its KATO");
    }
}

/// Lists the subsystems the discovery controller at `addr` offers (its
/// Discovery log page), as `nvme discover` does.
pub fn discover(addr: &str, opts: TcpOptions) -> Result<Vec<DiscoveryEntry>> {
    let opts = TcpOptions {
        keep_alive: Duration::ZERO,
        ..opts
    };
    let target = Arc::new(TcpTarget::new(addr, fabrics::DISCOVERY_NQN, opts)?);
    let (queue, _) = admin_queue(&target)?;
    let shared = Shared::new(&target, queue);
    let read = |len: usize, offset: u64| -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        // The admin queue moves at most 4 KiB per command.
        let mut at = 0;
        while at < len {
            let n = (len - at).min(4096);
            let sqe = fabrics::get_log_page(fabrics::LID_DISCOVERY, n as u32, offset + at as u64);
            let (_, part) = admin(&shared, "Get Log Page (Discovery)", sqe, n, None)?;
            out.extend_from_slice(&part);
            at += n;
        }
        Ok(out)
    };
    // Read the header, then the records, then the header again: a
    // generation counter that moved means the log changed under us.
    for _ in 0..3 {
        let head = read(1024, 0)?;
        let h = DiscoveryLogHeader::read_from_bytes(&head).map_err(|_| Error::BadDeviceData {
            device: target.to_string(),
            what: "short Discovery log header".into(),
        })?;
        let records = h.numrec.get().min(MAX_DISCOVERY_RECORDS);
        let body = if records > 0 {
            read(records as usize * 1024, 1024)?
        } else {
            Vec::new()
        };
        let again = read(1024, 0)?;
        let h2 = DiscoveryLogHeader::read_from_bytes(&again).map_err(|_| Error::BadDeviceData {
            device: target.to_string(),
            what: "short Discovery log header".into(),
        })?;
        if h2.genctr.get() != h.genctr.get() {
            continue;
        }
        return Ok(body
            .chunks_exact(1024)
            .filter_map(|c| DiscoveryLogEntry::read_from_bytes(c).ok())
            .map(|e| DiscoveryEntry::from_raw(&e))
            .collect());
    }
    Err(Error::BadDeviceData {
        device: target.to_string(),
        what: "the Discovery log kept changing while it was read".into(),
    })
}

impl crate::view::ControllerView for TcpController {
    type Error = Error;
    type Queue = TcpQueuePair;

    fn name(&self) -> &str {
        &self.name
    }

    fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    fn scope(&self) -> crate::view::NamespaceScope {
        crate::view::NamespaceScope::Controller
    }

    fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    fn max_queue_entries(&self) -> u32 {
        self.cap.max_queue_entries()
    }

    fn io_queues(&self) -> u16 {
        self.io_queues
    }

    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer> {
        TcpController::dma_alloc(self, len)
    }

    fn create_queue(&self, opts: QueueOptions) -> Result<TcpQueuePair> {
        self.create_qpair(opts)
    }
}
