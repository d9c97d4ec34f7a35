//! The controller handle: bring-up, identification, queue counts, reset
//! and shutdown, and the state its queue pairs share with it.

use super::*;

/// Controller state shared by the [`Controller`] handle and its queue pairs.
pub(super) struct Shared<T: Transport> {
    pub(super) transport: T,
    pub(super) name: String,
    pub(super) cap: regs::Cap,
    pub(super) admin: Mutex<AdminQueue>,
    /// Incremented by each reset; queue pairs compare it with theirs.
    pub(super) generation: AtomicU64,
    pub(super) qids: Mutex<Vec<bool>>,
    pub(super) granted: u16,
    pub(super) ident: Box<IdentifyController>,
    pub(super) namespaces: Vec<Namespace>,
    pub(super) max_transfer: usize,
    pub(super) opts: ControllerOptions,
    pub(super) failed: AtomicBool,
    /// The controller is gone (see [`Error::DeviceRemoved`]).
    pub(super) removed: AtomicBool,
    /// Shadow doorbell and EventIdx pages, once configured.
    pub(super) dbbuf: Option<(Arc<Region>, Arc<Region>)>,
}

/// An NVMe controller, brought up and identified. Cheap to share: queue
/// pairs keep it alive. Dropping the last handle (and every queue pair)
/// shuts the controller down (CC.SHN).
pub struct Controller<T: Transport> {
    shared: Arc<Shared<T>>,
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
                removed: AtomicBool::new(false),
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
        active_namespaces(&self.shared.name, &data, nn, |nsid| {
            self.identify_namespace(nsid)
        })
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
        self.shared.reset()
    }
}

impl<T: Transport> Shared<T> {
    /// [`Controller::reset`]; also used by a queue pair whose queues could
    /// not be deleted.
    pub(super) fn reset(&self) -> Result<()> {
        let s = self;
        let in_use: Vec<u16> = s
            .lock_qids()
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, used)| **used)
            .filter_map(|(qid, _)| u16::try_from(qid).ok())
            .collect();
        // The admin lock is held throughout: a queue pair that notices the
        // reset re-creates its queues only once the controller is back.
        let mut admin = s.lock_admin();
        // Bump first: a queue pair racing with us stops trusting its ring.
        s.generation.fetch_add(1, Ordering::SeqCst);
        // A controller that still answers has its I/O queues deleted first,
        // as Linux's nvme_dev_disable does: deletion ends what they hold
        // in an orderly way (status Aborted, SQ Deletion) before CC.EN
        // 1 -> 0. One that does not answer is just disabled.
        if !s.failed.load(Ordering::SeqCst) && !s.transport.regs().csts().contains(regs::Csts::CFS)
        {
            for qid in in_use {
                let sq = crate::cmd::DeleteIoSq::new(qid).build();
                let cq = crate::cmd::DeleteIoCq::new(qid).build();
                let deleted = s
                    .admin_locked(&mut admin, &format!("Delete I/O SQ {qid}"), sq, 0, None)
                    .and_then(|_| {
                        s.admin_locked(&mut admin, &format!("Delete I/O CQ {qid}"), cq, 0, None)
                    });
                if let Err(error) = deleted {
                    tracing::warn!(device = %s.name, qid, %error, "deleting queues before the reset failed; disabling");
                    break;
                }
            }
        }
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
