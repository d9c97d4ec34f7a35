//! An NVMe/TCP queue pair: one TCP connection, polled, non-blocking.
//!
//! The same shape as the PCIe [`crate::QueuePair`]: submission stages
//! commands and never blocks or allocates; [`TcpQueuePair::ring`] hands
//! what is staged to the socket in as few `writev` calls as it can (the
//! batched doorbell); [`TcpQueuePair::poll`] sends, receives and reports a
//! bounded number of completions. Command slots (CID, descriptor page, PDU
//! header) are sized when the queue connects.
//!
//! Data moves by copy between the socket and the caller's memory, so a
//! buffer is the caller's again the moment its command is reported: once a
//! connection is closed nothing reaches the memory of its commands. Reads
//! come as C2HData; writes go in the capsule when the controller takes
//! them there (IOCCSZ), else in H2CData PDUs as the controller's R2Ts ask.
//!
//! A connection that fails (reset, closed, a malformed PDU or digest, a
//! termination request, a command past its timeout) completes everything
//! outstanding once, with [`IoError::Disconnected`] (or
//! [`IoError::Timeout`] for the command that timed out): the command may
//! have executed. Nothing more is sent until [`TcpQueuePair::reconnect`].

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{self, Params};
use super::fabrics::{self, ConnectData, SglDescriptor};
use super::pdu::{self, CapsuleCmd, CommonHeader, flags, pdu_type};
use super::{TcpError, TcpTarget};
use crate::cmd::{self, Prps};
use crate::driver::{Completion, IoError, Namespace, QueueOptions, SubmitError};
use crate::spec::{CopyRangeFormat0, DsmRange, NvmeStatus, SubmissionEntry};
use crate::{DmaSlice, Error, Result};
use zerocopy::IntoBytes;

/// Bytes of each slot's descriptor page (Copy ranges, DSM ranges, Connect
/// data).
pub(super) const DESC_PAGE: usize = 4096;
/// Bytes of a slot's PDU header buffer: the largest header with its digest
/// and the padding a controller's CPDA can ask for.
pub(super) const HDR_BUF: usize = 72 + 4 + 128;

/// Which way a command's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Data {
    None,
    /// Controller to host (C2HData into `ptr`).
    ToHost,
    /// Host to controller, in the capsule.
    InCapsule,
    /// Host to controller, by R2T and H2CData.
    ByR2t,
}

/// One command identifier's state.
pub(super) struct Slot {
    pub(super) busy: bool,
    /// Completed while a PDU of it was still being sent: freed when that
    /// PDU is out (a PDU cannot be cut short on the stream).
    pub(super) zombie: bool,
    /// A zombie's result, reported when its PDU is out.
    pub(super) held: Option<(std::result::Result<u32, IoError>, u32)>,
    pub(super) req: u16,
    pub(super) data: Data,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    /// Bytes received (C2H) or sent (H2C) so far.
    pub(super) xfer: usize,
    /// End of the current R2T's window, and its transfer tag.
    pub(super) r2t_end: usize,
    pub(super) ttag: u16,
    /// Whether a PDU of this command sits in the send queue.
    pub(super) queued: bool,
    pub(super) hdr: [u8; HDR_BUF],
    pub(super) ddgst: [u8; 4],
    pub(super) desc: Box<[u8; DESC_PAGE]>,
    /// When the command's capsule was handed to the socket; a capsule
    /// still waiting is stamped by the first timeout check that sees it.
    pub(super) sent_at: Option<Instant>,
}

/// One caller request (several commands when split).
#[derive(Default)]
pub(super) struct Req {
    pub(super) busy: bool,
    pub(super) tag: u64,
    pub(super) remaining: u16,
    pub(super) error: Option<IoError>,
    pub(super) dw0: u32,
    pub(super) dw1: u32,
    pub(super) keep: Option<DmaSlice>,
    /// A command of the queue's own: its completion waits in `finished`
    /// for [`TcpQueuePair::take_internal`], never in `done`.
    pub(super) internal: bool,
    pub(super) finished: Option<(Completion, u32)>,
}

/// A PDU waiting to be sent: its header is in the slot's `hdr`.
#[derive(Clone, Copy, Debug)]
pub(super) struct TxItem {
    pub(super) cid: u16,
    pub(super) hdr_len: u16,
    pub(super) data_off: usize,
    pub(super) data_len: usize,
    pub(super) digest: bool,
    pub(super) sent: usize,
    /// A command capsule: its timeout counts from when it is first handed
    /// to the socket.
    pub(super) capsule: bool,
}

/// An NVMe/TCP queue pair (admin queue 0 or an I/O queue). `Send`, not
/// `Sync`: one thread owns it.
pub struct TcpQueuePair {
    pub(super) target: Arc<TcpTarget>,
    pub(super) stream: Option<TcpStream>,
    pub(super) params: Params,
    pub(super) qid: u16,
    pub(super) cntlid: u16,
    pub(super) entries: u16,
    pub(super) kato_ms: u32,
    pub(super) max_transfer: usize,
    /// In-capsule data this queue's capsules may carry.
    pub(super) inline_max: usize,
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u16>,
    pub(super) reqs: Vec<Req>,
    pub(super) free_reqs: Vec<u16>,
    pub(super) outstanding: usize,
    pub(super) tx: VecDeque<TxItem>,
    pub(super) rx: super::wire::RxBuf,
    /// Reported requests, with dword 1 of their last response (Property
    /// Get returns its upper half there).
    pub(super) done: VecDeque<(Completion, u32)>,
    /// Gives the queue id back to its controller.
    pub(super) on_drop: Option<Box<dyn FnOnce(u16) + Send>>,
    /// Why the connection is down, when it is.
    pub(super) failure: Option<TcpError>,
    pub(super) timeout: Option<Duration>,
    pub(super) last_timeout_check: Instant,
    /// Polls since the clock was last read for the timeout check.
    pub(super) polls: u32,
}

// SAFETY: the raw pointers in slots point at memory the caller handed over
// with the command (kept alive by `Req::keep` or the caller's promise in
// the unsafe submission functions) or at the slot's own descriptor page;
// the queue pair is used from one thread at a time.
unsafe impl Send for TcpQueuePair {}

impl TcpQueuePair {
    /// Dials `target`, exchanges ICReq/ICResp and sends Fabrics Connect
    /// for queue `qid` of controller `cntlid` (or [`fabrics::DYNAMIC_CNTLID`]
    /// on the admin queue). Returns the queue and the controller id the
    /// Connect response granted.
    pub(super) fn connect(
        target: &Arc<TcpTarget>,
        qid: u16,
        cntlid: u16,
        opts: QueueOptions,
        kato_ms: u32,
        inline_max: usize,
        max_transfer: usize,
    ) -> Result<TcpQueuePair> {
        if opts.entries < 2 {
            return Err(Error::InvalidArgument("a queue needs at least 2 entries"));
        }
        let (stream, params) = conn::dial(target)?;
        let depth = usize::from(opts.entries - 1).min(usize::from(u16::MAX));
        let now = Instant::now();
        let slots = (0..depth)
            .map(|_| Slot {
                busy: false,
                zombie: false,
                held: None,
                req: 0,
                data: Data::None,
                ptr: std::ptr::null_mut(),
                len: 0,
                xfer: 0,
                r2t_end: 0,
                ttag: 0,
                queued: false,
                hdr: [0; HDR_BUF],
                ddgst: [0; 4],
                desc: Box::new([0; DESC_PAGE]),
                sent_at: None,
            })
            .collect();
        let mut qp = TcpQueuePair {
            target: Arc::clone(target),
            stream: Some(stream),
            params,
            qid,
            cntlid,
            entries: opts.entries,
            kato_ms,
            max_transfer,
            inline_max,
            slots,
            free: (0..depth as u16).rev().collect(),
            reqs: (0..depth).map(|_| Req::default()).collect(),
            free_reqs: (0..depth as u16).rev().collect(),
            outstanding: 0,
            tx: VecDeque::with_capacity(depth * 2),
            rx: super::wire::RxBuf::new(max_transfer),
            done: VecDeque::with_capacity(depth),
            on_drop: None,
            failure: None,
            timeout: opts.timeout,
            last_timeout_check: now,
            polls: 0,
        };
        qp.fabrics_connect()?;
        Ok(qp)
    }

    /// Sends Connect and waits for its response; sets `cntlid`.
    fn fabrics_connect(&mut self) -> Result<()> {
        let t = &self.target;
        let data = ConnectData::new(t.host_id, self.cntlid, &t.subnqn, &t.host_nqn);
        // I/O queues ask for SQ flow control off: never more commands are
        // outstanding than the queue holds, and reads then complete in
        // their last C2HData PDU. A controller that refuses the attribute
        // gets Connect again without it.
        let mut cattr = if self.qid > 0 {
            fabrics::CATTR_DISABLE_SQ_FLOW
        } else {
            0
        };
        let c = loop {
            let sqe = fabrics::connect(self.qid, self.entries, self.kato_ms, cattr);
            let (c, _) = self.admin_like(sqe, AdminData::Out(data.as_bytes()), "Connect")?;
            let refused_cattr = matches!(c.result, Err(IoError::Status(s))
                if s.same_code(NvmeStatus::specific(0x82).dnr()))
                && c.dw0 >> 16 == fabrics::CATTR_OFFSET;
            if cattr != 0 && refused_cattr {
                cattr = 0;
                continue;
            }
            break c;
        };
        match c.result {
            Ok(dw0) => {
                if self.qid == 0 {
                    self.cntlid = dw0 as u16;
                }
                Ok(())
            }
            Err(e) => Err(Error::from(TcpError::Connect {
                target: self.target.to_string(),
                qid: self.qid,
                reason: connect_failure(e, c.dw0),
                status: e.status(),
            })),
        }
    }

    /// Stages a set-up or admin command of the queue's own (Connect,
    /// properties, Identify, Keep Alive). Its completion never goes to
    /// [`TcpQueuePair::poll`]'s caller: [`TcpQueuePair::take_internal`]
    /// collects it by the request index returned.
    pub(super) fn submit_internal(
        &mut self,
        sqe: SubmissionEntry,
        data: AdminData<'_>,
    ) -> Result<u16> {
        let (ptr, len, dir) = match data {
            AdminData::None => (std::ptr::null_mut(), 0, Data::None),
            AdminData::In(ptr, len) => (ptr, len, Data::ToHost),
            AdminData::Out(bytes) => {
                if bytes.len() > DESC_PAGE {
                    return Err(Error::InvalidArgument("admin data over 4 KiB"));
                }
                (std::ptr::null_mut(), bytes.len(), Data::InCapsule)
            }
        };
        self.check_submit(1).map_err(|e| match e {
            SubmitError::Disconnected => Error::from(self.down_error()),
            _ => Error::InvalidArgument("admin queue full"),
        })?;
        let req = self.alloc_req(0, 1, None);
        self.reqs[req as usize].internal = true;
        let cid = self.take_slot();
        if let AdminData::Out(bytes) = data {
            self.slots[cid as usize].desc[..bytes.len()].copy_from_slice(bytes);
        }
        let ptr = if dir == Data::InCapsule {
            self.slots[cid as usize].desc.as_mut_ptr()
        } else {
            ptr
        };
        self.stage(req, cid, sqe, dir, ptr, len);
        Ok(req)
    }

    /// The completion of internal request `req`, once it is in; the
    /// request is freed then.
    pub(super) fn take_internal(&mut self, req: u16) -> Option<(Completion, u32)> {
        let r = self.reqs.get_mut(usize::from(req))?;
        let done = r.finished.take()?;
        r.internal = false;
        self.free_reqs.push(req);
        Some(done)
    }

    /// Why the connection is down, as an error.
    pub(super) fn down_error(&self) -> TcpError {
        self.failure.clone().unwrap_or(TcpError::Closed {
            target: self.target.to_string(),
            qid: self.qid,
        })
    }

    /// Waits for internal request `req` until `deadline`, polling; on
    /// timeout the connection is failed (nothing more arrives for it) and
    /// the wait is an error. A completion that stands for the connection's
    /// failure comes back as that failure.
    pub(super) fn wait_internal(
        &mut self,
        req: u16,
        deadline: Instant,
        what: &str,
    ) -> Option<Result<(Completion, u32)>> {
        self.poll_once();
        if let Some((c, dw1)) = self.take_internal(req) {
            if c.result == Err(IoError::Disconnected) {
                return Some(Err(Error::from(self.down_error())));
            }
            return Some(Ok((c, dw1)));
        }
        if Instant::now() > deadline {
            let waited_ms = self.target.opts.admin_timeout.as_millis() as u64;
            self.fail(TcpError::Timeout {
                target: self.target.to_string(),
                qid: self.qid,
            });
            let _ = self.take_internal(req);
            return Some(Err(Error::AdminTimeout {
                device: self.target.to_string(),
                command: what.to_owned(),
                waited_ms,
            }));
        }
        None
    }

    /// Sends one command with its data and waits for it (set-up, and
    /// admin commands from the thread that holds the queue).
    pub(super) fn admin_like(
        &mut self,
        sqe: SubmissionEntry,
        data: AdminData<'_>,
        what: &str,
    ) -> Result<(Completion, u32)> {
        let req = self.submit_internal(sqe, data)?;
        let deadline = Instant::now() + self.target.opts.admin_timeout;
        loop {
            if let Some(r) = self.wait_internal(req, deadline, what) {
                return r;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands this queue can have outstanding.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Requests outstanding (submitted, not yet reported).
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Command slots free.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Largest transfer of one command, in bytes.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// In-capsule data a write may carry on this queue.
    pub fn inline_data(&self) -> usize {
        self.inline_max
    }

    /// Whether the header and data digests are on.
    pub fn digests(&self) -> (bool, bool) {
        (self.params.header_digest, self.params.data_digest)
    }

    /// Why the connection is down, if it is.
    pub fn failure(&self) -> Option<&TcpError> {
        self.failure.as_ref()
    }

    pub(super) fn check_submit(&self, commands: usize) -> std::result::Result<(), SubmitError> {
        if self.failure.is_some() {
            return Err(SubmitError::Disconnected);
        }
        if commands > self.slots.len() {
            return Err(SubmitError::Invalid(
                "request needs more commands than the queue holds",
            ));
        }
        if self.free.len() < commands || self.free_reqs.is_empty() {
            return Err(SubmitError::QueueFull);
        }
        Ok(())
    }

    pub(super) fn alloc_req(&mut self, tag: u64, parts: u16, keep: Option<DmaSlice>) -> u16 {
        let r = self.free_reqs.pop().unwrap_or(0);
        self.reqs[r as usize] = Req {
            busy: true,
            tag,
            remaining: parts,
            error: None,
            dw0: 0,
            dw1: 0,
            keep,
            internal: false,
            finished: None,
        };
        self.outstanding += 1;
        r
    }

    pub(super) fn take_slot(&mut self) -> u16 {
        self.free.pop().unwrap_or(0)
    }

    /// Builds the capsule of `sqe` (CID `cid`) with its data descriptor
    /// and queues it for sending.
    pub(super) fn stage(
        &mut self,
        req: u16,
        cid: u16,
        mut sqe: SubmissionEntry,
        dir: Data,
        ptr: *mut u8,
        len: usize,
    ) {
        sqe.cid = cid.into();
        let in_capsule = dir == Data::InCapsule;
        let sgl = if in_capsule {
            SglDescriptor::in_capsule(len as u32)
        } else {
            SglDescriptor::transport(len as u32)
        };
        sgl.apply(&mut sqe);
        let hd = self.params.header_digest;
        let dd = self.params.data_digest && in_capsule && len > 0;
        let hlen = size_of::<CapsuleCmd>();
        let data_len = if in_capsule { len } else { 0 };
        let pdo = if data_len > 0 {
            pdu::data_offset(hlen, hd, self.params.cpda)
        } else {
            0
        };
        let header_end = hlen + if hd { pdu::DIGEST_LEN } else { 0 };
        let plen = if data_len > 0 {
            pdo + data_len + if dd { pdu::DIGEST_LEN } else { 0 }
        } else {
            header_end
        };
        let capsule = CapsuleCmd {
            ch: CommonHeader {
                pdu_type: pdu_type::CAPSULE_CMD,
                flags: if hd { flags::HDGSTF } else { 0 } | if dd { flags::DDGSTF } else { 0 },
                hlen: hlen as u8,
                pdo: pdo as u8,
                plen: (plen as u32).into(),
            },
            sqe,
        };
        let slot = &mut self.slots[cid as usize];
        slot.busy = true;
        slot.zombie = false;
        slot.req = req;
        slot.data = dir;
        slot.ptr = ptr;
        slot.len = len;
        slot.xfer = if in_capsule { len } else { 0 };
        slot.r2t_end = 0;
        slot.ttag = 0;
        slot.sent_at = None;
        slot.hdr[..hlen].copy_from_slice(capsule.as_bytes());
        let mut hdr_len = hlen;
        if hd {
            let crc = pdu::crc32c(&slot.hdr[..hlen]);
            slot.hdr[hlen..hlen + 4].copy_from_slice(&crc.to_le_bytes());
            hdr_len += 4;
        }
        if data_len > 0 {
            slot.hdr[hdr_len..pdo].fill(0);
            hdr_len = pdo;
        }
        if dd {
            // SAFETY: ptr/len is the command's data, alive and not written
            // by anyone while the command is outstanding.
            let data = unsafe { std::slice::from_raw_parts(ptr, len) };
            slot.ddgst = pdu::crc32c(data).to_le_bytes();
        }
        slot.queued = true;
        self.tx.push_back(TxItem {
            cid,
            hdr_len: hdr_len as u16,
            data_off: 0,
            data_len,
            digest: dd,
            sent: 0,
            capsule: true,
        });
    }

    /// Stages one data command on `len` bytes at `ptr`.
    fn stage_rw(&mut self, req: u16, sqe: SubmissionEntry, write: bool, ptr: *mut u8, len: usize) {
        let cid = self.take_slot();
        let dir = match (write, len) {
            (_, 0) => Data::None,
            (false, _) => Data::ToHost,
            (true, n) if n <= self.inline_max => Data::InCapsule,
            (true, _) => Data::ByR2t,
        };
        self.stage(req, cid, sqe, dir, ptr, len);
    }

    /// A read or write of `len` bytes at `ptr`, split at the transfer
    /// limit.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay valid, and (for a read) unread and
    /// unwritten by anything else, until the request is reported.
    unsafe fn rw(
        &mut self,
        write: bool,
        ns: &Namespace,
        lba: u64,
        (ptr, len): (*mut u8, usize),
        keep: Option<DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let bs = ns.block_size as usize;
        if len == 0 || !len.is_multiple_of(bs) {
            return Err(SubmitError::Invalid(
                "length is not a multiple of the block size",
            ));
        }
        let blocks = (len / bs) as u64;
        if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        let chunk = (self.max_transfer / bs * bs).clamp(bs, 65536 * bs);
        let parts = len.div_ceil(chunk);
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, keep);
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            let slba = lba + (off / bs) as u64;
            let nlb = (n / bs) as u32;
            let sqe = if write {
                cmd::Write::new(ns.nsid, slba, nlb).build(Prps::NONE)
            } else {
                cmd::Read::new(ns.nsid, slba, nlb).build(Prps::NONE)
            };
            // SAFETY: within the caller's range.
            let p = unsafe { ptr.add(off) };
            self.stage_rw(req, sqe, write, p, n);
            off += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes (a multiple of the block size) at `lba` into
    /// `buf`. Staged: call [`TcpQueuePair::ring`] or [`TcpQueuePair::poll`].
    pub fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        // SAFETY: the slice keeps its memory alive until the request is
        // reported; DmaSlice gives no other access to it.
        unsafe {
            self.rw(
                false,
                ns,
                lba,
                (buf.host_ptr(), buf.len()),
                Some(buf.clone()),
                tag,
            )
        }
    }

    /// Writes `buf` at `lba`.
    pub fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        // SAFETY: as for `read`.
        unsafe {
            self.rw(
                true,
                ns,
                lba,
                (buf.host_ptr(), buf.len()),
                Some(buf.clone()),
                tag,
            )
        }
    }

    /// Reads into `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The memory must stay valid and untouched by anything else until the
    /// request is reported.
    pub unsafe fn read_raw(
        &mut self,
        ns: &Namespace,
        lba: u64,
        ptr: *mut u8,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        // SAFETY: the caller's promise.
        unsafe { self.rw(false, ns, lba, (ptr, len), None, tag) }
    }

    /// Writes `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The memory must stay valid and unwritten until the request is
    /// reported.
    pub unsafe fn write_raw(
        &mut self,
        ns: &Namespace,
        lba: u64,
        ptr: *const u8,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        // SAFETY: the caller's promise; the queue only reads a write's data.
        unsafe { self.rw(true, ns, lba, (ptr.cast_mut(), len), None, tag) }
    }

    /// Flush.
    pub fn flush(&mut self, ns: &Namespace, tag: u64) -> std::result::Result<(), SubmitError> {
        self.check_submit(1)?;
        let req = self.alloc_req(tag, 1, None);
        let sqe = cmd::Flush::new(ns.nsid).build();
        self.stage_rw(req, sqe, false, std::ptr::null_mut(), 0);
        Ok(())
    }

    /// Write Zeroes of `blocks` at `lba`, split at 65 536 blocks.
    pub fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let (parts, commands) = ns.write_zeroes_commands(lba, blocks)?;
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, None);
        for sqe in commands {
            self.stage_rw(req, sqe, false, std::ptr::null_mut(), 0);
        }
        Ok(())
    }

    /// Deallocates `ranges` of `(lba, blocks)`: one Dataset Management
    /// command, at most 256 ranges.
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
            .any(|&(l, n)| l.checked_add(u64::from(n)).is_none_or(|e| e > ns.blocks))
        {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        self.check_submit(1)?;
        let req = self.alloc_req(tag, 1, None);
        let cid = self.take_slot();
        let size = size_of::<DsmRange>();
        let desc = &mut self.slots[cid as usize].desc;
        for (i, &(slba, nlb)) in ranges.iter().enumerate() {
            let r = DsmRange {
                cattr: 0.into(),
                nlb: nlb.into(),
                slba: slba.into(),
            };
            desc[i * size..(i + 1) * size].copy_from_slice(r.as_bytes());
        }
        let len = ranges.len() * size;
        let ptr = desc.as_mut_ptr();
        let sqe = cmd::Deallocate::new(ns.nsid, ranges.len() as u32).build(Prps::NONE);
        let dir = self.write_dir(len);
        self.stage(req, cid, sqe, dir, ptr, len);
        Ok(())
    }

    fn write_dir(&self, len: usize) -> Data {
        if len <= self.inline_max {
            Data::InCapsule
        } else {
            Data::ByR2t
        }
    }

    /// Copies source `ranges` of `(lba, blocks)`, concatenated, to `dest`
    /// within the namespace, split into as many Copy commands (format 0)
    /// as MSRC, MSSRL and MCL require; completes once.
    pub fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let splitter = ns.copy_splitter(ranges, dest)?;
        let parts = splitter.count_commands();
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, None);
        let mut sp = splitter;
        for _ in 0..parts {
            let cid = self.take_slot();
            let desc = &mut self.slots[cid as usize].desc;
            let Some((dest, count, _)) = sp.next_command(|i, slba, n| {
                write_copy_desc(&mut desc[..], i, slba, n);
            }) else {
                self.free.push(cid);
                break;
            };
            self.stage_copy(req, ns, cid, dest, count);
        }
        Ok(())
    }

    /// Sends exactly one Copy command (format 0) with these source ranges
    /// and no splitting: the controller enforces its limits. At most 128
    /// ranges of 1 to 65536 blocks.
    pub fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        Namespace::check_single_copy(ranges)?;
        self.check_submit(1)?;
        let req = self.alloc_req(tag, 1, None);
        let cid = self.take_slot();
        for (i, &(slba, n)) in ranges.iter().enumerate() {
            write_copy_desc(&mut self.slots[cid as usize].desc[..], i, slba, n);
        }
        self.stage_copy(req, ns, cid, dest, ranges.len());
        Ok(())
    }

    fn stage_copy(&mut self, req: u16, ns: &Namespace, cid: u16, dest: u64, count: usize) {
        let len = count * size_of::<CopyRangeFormat0>();
        let ptr = self.slots[cid as usize].desc.as_mut_ptr();
        let sqe = cmd::Copy::new(ns.nsid, dest, count as u32).build(Prps::NONE);
        let dir = self.write_dir(len);
        self.stage(req, cid, sqe, dir, ptr, len);
    }

    /// Passthrough: sends `sqe` as given except for the CID and the data
    /// descriptor, which describes `buf`. The opcode's data direction
    /// (bits 1:0) says which way the data moves. No other check: the
    /// controller judges the command.
    pub fn submit_raw(
        &mut self,
        sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if buf.is_some_and(|b| b.is_empty() || b.len() > self.max_transfer) {
            return Err(SubmitError::Invalid(
                "raw buffer empty or beyond max transfer",
            ));
        }
        let to_controller = match (sqe.opc & 0b11, buf.is_some()) {
            (_, false) => false,
            (0b01, true) => true,
            (0b10, true) => false,
            _ => {
                return Err(SubmitError::Invalid(
                    "the opcode moves no data one way (bits 1:0 are 00 or 11)",
                ));
            }
        };
        self.check_submit(1)?;
        let req = self.alloc_req(tag, 1, buf.cloned());
        match buf {
            None => self.stage_rw(req, sqe, false, std::ptr::null_mut(), 0),
            Some(b) => self.stage_rw(req, sqe, to_controller, b.host_ptr(), b.len()),
        }
        Ok(())
    }

    /// Hands what is staged to the socket (as much as it takes now).
    pub fn ring(&mut self) {
        self.flush_tx();
    }

    /// Sends, receives and reports at most `max` completed requests to
    /// `on_done`; returns how many. Never blocks.
    pub fn poll(&mut self, max: usize, mut on_done: impl FnMut(Completion)) -> Result<usize> {
        self.poll_once();
        let mut n = 0;
        while n < max {
            let Some((c, _)) = self.done.pop_front() else {
                break;
            };
            on_done(c);
            n += 1;
        }
        Ok(n)
    }

    /// Polls until nothing is outstanding; `Err` after `timeout`.
    pub fn drain(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        let start = Instant::now();
        let mut out = Vec::new();
        while self.outstanding > 0 || !self.done.is_empty() {
            self.poll(usize::MAX, |c| out.push(c))?;
            if self.outstanding == 0 {
                break;
            }
            if start.elapsed() > timeout {
                return Err(Error::ControllerTimeout {
                    device: self.target.to_string(),
                    what: "outstanding I/O to complete",
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
        Ok(out)
    }

    /// Dials again and connects this queue anew after a failure. Commands
    /// of the old connection were all reported when it failed. The
    /// controller may still be tearing the old queue down (Command
    /// Sequence Error): that is waited out for up to a second.
    pub fn reconnect(&mut self) -> Result<()> {
        if self.failure.is_none() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            match self.reconnect_once() {
                Err(Error::Tcp(e)) if attempt < 40 && e.queue_still_held() => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(25));
                }
                other => return other,
            }
        }
    }

    fn reconnect_once(&mut self) -> Result<()> {
        let (stream, params) = conn::dial(&self.target)?;
        self.stream = Some(stream);
        self.params = params;
        self.failure = None;
        self.tx.clear();
        self.rx.reset();
        for s in &mut self.slots {
            s.queued = false;
            s.zombie = false;
        }
        if let Err(e) = self.fabrics_connect() {
            if self.failure.is_none() {
                self.fail(TcpError::Closed {
                    target: self.target.to_string(),
                    qid: self.qid,
                });
            }
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for TcpQueuePair {
    fn drop(&mut self) {
        // Closing the socket is enough: the controller ends the queue (or,
        // on the admin queue, the association), and nothing of ours is
        // reachable through it afterwards.
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(give_back) = self.on_drop.take() {
            give_back(self.qid);
        }
    }
}

impl std::fmt::Debug for TcpQueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpQueuePair")
            .field("target", &self.target.to_string())
            .field("qid", &self.qid)
            .field("depth", &self.slots.len())
            .finish()
    }
}

/// Data of a set-up or admin command.
pub(super) enum AdminData<'a> {
    None,
    /// Into `len` bytes at the pointer.
    In(*mut u8, usize),
    /// These bytes, sent in the capsule.
    Out(&'a [u8]),
}

fn write_copy_desc(desc: &mut [u8], i: usize, slba: u64, blocks: u64) {
    let d = CopyRangeFormat0 {
        slba: slba.into(),
        nlb: ((blocks - 1) as u16).into(),
        ..Default::default()
    };
    let size = size_of::<CopyRangeFormat0>();
    desc[i * size..(i + 1) * size].copy_from_slice(d.as_bytes());
}

/// A Connect failure in words (NVMe Base 2.0, figure 575).
fn connect_failure(e: IoError, dw0: u32) -> String {
    let IoError::Status(s) = e else {
        return e.to_string();
    };
    if s.sct != crate::spec::sct::COMMAND_SPECIFIC {
        return s.to_string();
    }
    match s.sc {
        0x80 => "incompatible format".to_owned(),
        0x81 => "controller busy (a queue with this id is already connected)".to_owned(),
        0x82 => {
            let (iattr, ipo) = (dw0 & 0xFF, dw0 >> 16);
            let field = match (iattr & 1, ipo) {
                (1, 256) => "the subsystem NQN (no such subsystem on this port)",
                (1, 512) => "the host NQN",
                (1, 16) => "the controller id",
                (1, _) => "the connect data",
                (_, 42) => "the queue id",
                (_, 44) => "the queue size",
                _ => "the command",
            };
            format!("invalid parameter: {field}")
        }
        0x83 => "restart discovery".to_owned(),
        0x84 => "invalid host: this host is not allowed on the subsystem (add its NQN to the subsystem's allowed hosts)".to_owned(),
        _ => NvmeStatus::to_string(&s),
    }
}

impl crate::view::IoQueue for TcpQueuePair {
    type Error = Error;

    fn submit_raw(
        &mut self,
        sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::submit_raw(self, sqe, buf, tag)
    }

    fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::read(self, ns, lba, buf, tag)
    }

    fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::write(self, ns, lba, buf, tag)
    }

    fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::copy(self, ns, ranges, dest, tag)
    }

    fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::copy_single(self, ns, ranges, dest, tag)
    }

    fn poll(&mut self, max: usize, on_done: impl FnMut(Completion)) -> Result<usize> {
        TcpQueuePair::poll(self, max, on_done)
    }

    fn drain(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        TcpQueuePair::drain(self, timeout)
    }
}

impl crate::view::BlockQueue for TcpQueuePair {
    fn depth(&self) -> usize {
        TcpQueuePair::depth(self)
    }

    unsafe fn read_data(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: crate::view::DataRef,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        // SAFETY: the caller's promise.
        unsafe { self.read_raw(ns, lba, data.host, data.len, tag) }
    }

    unsafe fn write_data(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: crate::view::DataRef,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        // SAFETY: the caller's promise.
        unsafe { self.write_raw(ns, lba, data.host, data.len, tag) }
    }

    fn flush(&mut self, ns: &Namespace, tag: u64) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::flush(self, ns, tag)
    }

    fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::write_zeroes(self, ns, lba, blocks, tag)
    }

    fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u32)],
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        TcpQueuePair::deallocate(self, ns, ranges, tag)
    }
}
