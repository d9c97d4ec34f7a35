//! The admin queue: enabling and disabling the controller, one admin
//! command at a time under its lock, and the queue-management commands.

use super::*;
use crate::cmd;

pub(super) struct AdminQueue {
    pub(super) ring: Ring,
    pub(super) buf: DmaBuffer,
    pub(super) cid: u16,
    /// Owners of the shadow doorbell and EventIdx pages.
    pub(super) dbbuf_pages: Option<(DmaBuffer, DmaBuffer)>,
}

pub(super) fn wait_until<R: RegisterAccess>(
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

pub(super) fn disable<T: Transport>(t: &T, name: &str, cap: regs::Cap) -> Result<()> {
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

pub(super) fn enable<T: Transport>(
    t: &T,
    name: &str,
    cap: regs::Cap,
    admin: &AdminQueue,
) -> Result<()> {
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

impl<T: Transport> Shared<T> {
    pub(super) fn lock_admin(&self) -> MutexGuard<'_, AdminQueue> {
        // The admin queue is left consistent before anything can panic.
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn check_fatal(&self) -> Result<()> {
        if !self.removed.load(Ordering::Acquire) && self.transport.removal_requested() {
            self.stop_and_release();
        }
        if self.removed.load(Ordering::Acquire) {
            return Err(Error::DeviceRemoved {
                device: self.name.clone(),
            });
        }
        let csts = self.transport.regs().csts();
        if csts.bits() == u32::MAX {
            // No controller reads CSTS as all ones: the device is gone.
            if !self.removed.swap(true, Ordering::SeqCst) {
                tracing::error!(device = %self.name, "controller removed: registers read all ones");
            }
            return Err(Error::DeviceRemoved {
                device: self.name.clone(),
            });
        }
        if csts.contains(Csts::CFS) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(Error::ControllerFatal {
                device: self.name.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn admin(
        &self,
        what: &str,
        sqe: SubmissionEntry,
        data: usize,
        to_device: Option<&[u8]>,
    ) -> Result<(u32, Vec<u8>)> {
        let mut q = self.lock_admin();
        self.admin_locked(&mut q, what, sqe, data, to_device)
    }

    pub(super) fn admin_locked(
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

    /// Creates `ring`'s CQ and SQ under one hold of the admin queue, so
    /// no reset falls between them; returns the reset generation they
    /// belong to.
    /// The platform wants the device back: nothing more is sent, the
    /// controller is disabled (CC.EN = 0: it stops fetching commands and
    /// moving data, bounded by CAP.TO) and the device released. Queue
    /// pairs then fail what they hold with [`IoError::Removed`].
    pub(super) fn stop_and_release(&self) {
        if self.removed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(device = %self.name, "removal requested: stopping the controller and releasing it");
        if let Err(error) = disable(&self.transport, &self.name, self.cap) {
            tracing::warn!(device = %self.name, %error, "the controller did not stop cleanly before its release");
        }
        self.transport.release();
    }

    pub(super) fn create_queues(&self, ring: &Ring) -> Result<u64> {
        let mut q = self.lock_admin();
        let generation = self.generation.load(Ordering::SeqCst);
        let qid = ring.qid;
        let cq = cmd::CreateIoCq::new(qid, ring.entries, ring.cq.iova()).build();
        self.admin_locked(&mut q, &format!("Create I/O CQ {qid}"), cq, 0, None)?;
        let sq = cmd::CreateIoSq::new(qid, ring.entries, qid, ring.sq.iova()).build();
        if let Err(e) = self.admin_locked(&mut q, &format!("Create I/O SQ {qid}"), sq, 0, None) {
            let del = cmd::DeleteIoCq::new(qid).build();
            let _ = self.admin_locked(&mut q, &format!("Delete I/O CQ {qid}"), del, 0, None);
            return Err(e);
        }
        Ok(generation)
    }

    pub(super) fn delete_queues(&self, qid: u16) -> Result<()> {
        let sq = cmd::DeleteIoSq::new(qid).build();
        self.admin(&format!("Delete I/O SQ {qid}"), sq, 0, None)?;
        let cq = cmd::DeleteIoCq::new(qid).build();
        self.admin(&format!("Delete I/O CQ {qid}"), cq, 0, None)?;
        Ok(())
    }

    /// Sends Doorbell Buffer Config with the shadow doorbell and EventIdx
    /// pages (allocated on first use) and attaches the admin ring to them.
    pub(super) fn configure_dbbuf(&self, q: &mut AdminQueue) -> Result<(Arc<Region>, Arc<Region>)> {
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

    pub(super) fn lock_qids(&self) -> MutexGuard<'_, Vec<bool>> {
        self.qids.lock().unwrap_or_else(|e| e.into_inner())
    }
}
