//! A queue pair's ring: SQ and CQ memory, indices and phase, and its
//! doorbells (MMIO, or the shadow doorbell pages with EventIdx).

use super::*;

/// A submission/completion queue pair's ring state.
pub(super) struct Ring {
    pub(super) qid: u16,
    pub(super) entries: u16,
    pub(super) sq: DmaBuffer,
    pub(super) cq: DmaBuffer,
    pub(super) sq_tail: u16,
    pub(super) sq_head: u16,
    pub(super) cq_head: u16,
    pub(super) phase: bool,
    pub(super) sq_db: usize,
    pub(super) cq_db: usize,
    pub(super) unrung: bool,
    /// Shadow doorbells, when the controller supports them.
    pub(super) dbbuf: Option<RingDbBuf>,
    /// Last SQ tail and CQ head published (shadow or MMIO).
    pub(super) sq_published: u16,
    pub(super) cq_published: u16,
    /// Doorbell register (MMIO) writes so far.
    pub(super) doorbell_writes: DoorbellWrites,
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
pub(super) struct RingDbBuf {
    pub(super) shadow: Arc<Region>,
    pub(super) eventidx: Arc<Region>,
    pub(super) sq_off: usize,
    pub(super) cq_off: usize,
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
    pub(super) fn new<T: Transport>(t: &T, qid: u16, entries: u16) -> Result<Ring> {
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
    pub(super) fn clear(&mut self) {
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
    pub(super) fn attach_dbbuf(&mut self, shadow: Arc<Region>, eventidx: Arc<Region>, fresh: bool) {
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
    pub(super) fn publish<R: RegisterAccess>(
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
    pub(super) fn cq_unpublished(&self) -> usize {
        let e = self.entries as usize;
        (self.cq_head as usize + e - self.cq_published as usize) % e
    }

    /// Publishes the CQ head after consuming entries.
    #[inline]
    pub(super) fn ring_cq<R: RegisterAccess>(&mut self, regs: &R) {
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
    pub(super) fn push(&mut self, sqe: &SubmissionEntry) {
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
    pub(super) fn ring<R: RegisterAccess>(&mut self, regs: &R) {
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
    pub(super) fn peek(&self) -> Option<(u32, u16, u16, u16)> {
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
    pub(super) fn advance(&mut self) {
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

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
