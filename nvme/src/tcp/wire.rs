//! The byte streams of a queue pair: sending queued PDUs with `writev`,
//! receiving into a buffer and taking PDUs apart, completing commands, and
//! failing the connection.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::time::Instant;

use super::TcpError;
use super::pdu::{
    self, CapsuleResp, CommonHeader, DIGEST_LEN, DataHeader, Layout, MAX_HLEN, R2t, TermReq, flags,
    pdu_type,
};
use super::queue::{Data, TcpQueuePair, TxItem};
use crate::driver::{Completion, IoError};
use crate::spec::NvmeStatus;
use zerocopy::{FromBytes, IntoBytes};

/// iovecs one `writev` gathers.
const IOV_BATCH: usize = 48;
/// Receive buffer size, beyond the largest data PDU's header.
const RX_BUF: usize = 256 * 1024;

/// What the receiver is in the middle of.
#[derive(Clone, Copy, Debug)]
enum RxState {
    /// Waiting for a whole header (and, for PDUs without a payload to
    /// stream, the whole PDU).
    Header,
    /// Streaming a C2HData payload into command `cid`.
    Data {
        cid: u16,
        /// Where the next byte goes in the command's data.
        at: usize,
        left: usize,
        crc: u32,
        digest: bool,
        pdu_flags: u8,
    },
}

/// The receive buffer and the parser's state.
pub(super) struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    state: RxState,
}

impl RxBuf {
    pub(super) fn new(_max_transfer: usize) -> RxBuf {
        RxBuf {
            buf: vec![0u8; RX_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            state: RxState::Header,
        }
    }

    pub(super) fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.state = RxState::Header;
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

/// The largest PDU the receiver takes whole (everything but C2HData,
/// whose payload streams).
const MAX_WHOLE_PDU: u32 = 4096;

impl TcpQueuePair {
    /// One round of sending and receiving, and the timeout check.
    pub(super) fn poll_once(&mut self) {
        if self.failure.is_some() {
            return;
        }
        self.flush_tx();
        self.receive();
        if self.outstanding > 0 && self.timeout.is_some() {
            self.check_timeouts();
        }
    }

    fn check_timeouts(&mut self) {
        let Some(limit) = self.timeout else { return };
        // A clock read every 16 polls, a scan at most every few
        // milliseconds, as the PCIe queue pair does.
        self.polls = self.polls.wrapping_add(1);
        if !self.polls.is_multiple_of(16) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last_timeout_check).as_millis() < 5 {
            return;
        }
        self.last_timeout_check = now;
        let mut expired: Option<u16> = None;
        for (cid, s) in self.slots.iter_mut().enumerate() {
            if !s.busy {
                continue;
            }
            let since = *s.sent_at.get_or_insert(now);
            if expired.is_none() && now.duration_since(since) > limit {
                expired = Some(cid as u16);
            }
        }
        if let Some(cid) = expired {
            // A zombie (answered, its PDU stuck in a socket the target no
            // longer reads) keeps its answer; `fail` reports it.
            let slot = &self.slots[cid as usize];
            if !slot.zombie {
                self.reqs[slot.req as usize].error = Some(IoError::Timeout);
            }
            self.fail(TcpError::Timeout {
                target: self.target.to_string(),
                qid: self.qid,
            });
        }
    }

    /// Writes queued PDUs until the socket takes no more.
    pub(super) fn flush_tx(&mut self) {
        // One clock read per flush stamps the capsules it hands over.
        let mut now: Option<Instant> = None;
        while !self.tx.is_empty() && self.failure.is_none() {
            let mut iov: [libc::iovec; IOV_BATCH] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOV_BATCH];
            let mut n = 0;
            for item in self.tx.iter() {
                if n + 3 > IOV_BATCH {
                    break;
                }
                if item.capsule && item.sent == 0 {
                    self.slots[item.cid as usize].sent_at =
                        Some(*now.get_or_insert_with(Instant::now));
                }
                let slot = &self.slots[item.cid as usize];
                let mut skip = item.sent;
                let hdr = &slot.hdr[..item.hdr_len as usize];
                // SAFETY: data_off..+data_len lies in the command's data,
                // valid while the command is outstanding (or the slot is a
                // zombie whose PDU is still going out; the request's memory
                // is held until then, see `complete_slot`).
                let data = unsafe { slot.ptr.add(item.data_off) };
                let parts: [(*const u8, usize); 3] = [
                    (hdr.as_ptr(), hdr.len()),
                    (data, item.data_len),
                    (
                        slot.ddgst.as_ptr(),
                        if item.digest { DIGEST_LEN } else { 0 },
                    ),
                ];
                for (p, len) in parts {
                    if skip >= len {
                        skip -= len;
                        continue;
                    }
                    // SAFETY: within the part.
                    iov[n] = libc::iovec {
                        iov_base: unsafe { p.add(skip) }.cast_mut().cast(),
                        iov_len: len - skip,
                    };
                    skip = 0;
                    n += 1;
                }
            }
            let Some(fd) = self.stream.as_ref().map(|s| s.as_raw_fd()) else {
                return;
            };
            // SAFETY: iov[..n] describes live memory (above); writev only
            // reads it.
            let wrote = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
            if wrote < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => return,
                    ErrorKind::Interrupted => continue,
                    _ => {
                        self.fail(TcpError::Io {
                            target: self.target.to_string(),
                            qid: self.qid,
                            source: std::sync::Arc::new(e),
                        });
                        return;
                    }
                }
            }
            self.advance_tx(wrote as usize);
        }
    }

    /// Marks `n` bytes of the queue's front as sent.
    fn advance_tx(&mut self, mut n: usize) {
        while n > 0 {
            let Some(item) = self.tx.front_mut() else {
                return;
            };
            let total = item.hdr_len as usize + item.data_len + if item.digest { 4 } else { 0 };
            let take = n.min(total - item.sent);
            item.sent += take;
            n -= take;
            if item.sent == total {
                let done = *item;
                self.tx.pop_front();
                self.pdu_sent(done);
            }
        }
    }

    /// A PDU went out whole: queue the next H2CData of its R2T, or free a
    /// zombie.
    fn pdu_sent(&mut self, item: TxItem) {
        let cid = item.cid as usize;
        self.slots[cid].queued = false;
        if self.slots[cid].zombie {
            self.bury(item.cid);
            return;
        }
        let s = &self.slots[cid];
        if s.data == Data::ByR2t && s.xfer < s.r2t_end {
            self.queue_h2c(item.cid);
        }
    }

    /// Queues the next H2CData PDU of command `cid`'s current R2T.
    fn queue_h2c(&mut self, cid: u16) {
        let hd = self.params.header_digest;
        let dd = self.params.data_digest;
        let cpda = self.params.cpda;
        let maxh2c = self.params.maxh2cdata as usize;
        let slot = &mut self.slots[cid as usize];
        let off = slot.xfer;
        let len = (slot.r2t_end - off).min(maxh2c);
        let last = off + len == slot.r2t_end;
        let hlen = size_of::<DataHeader>();
        let pdo = pdu::data_offset(hlen, hd, cpda);
        let plen = pdo + len + if dd { DIGEST_LEN } else { 0 };
        let h = DataHeader {
            ch: CommonHeader {
                pdu_type: pdu_type::H2C_DATA,
                flags: if hd { flags::HDGSTF } else { 0 }
                    | if dd { flags::DDGSTF } else { 0 }
                    | if last { flags::LAST_PDU } else { 0 },
                hlen: hlen as u8,
                pdo: pdo as u8,
                plen: (plen as u32).into(),
            },
            cccid: cid.into(),
            ttag: slot.ttag.into(),
            datao: (off as u32).into(),
            datal: (len as u32).into(),
            _rsvd: [0; 4],
        };
        slot.hdr[..hlen].copy_from_slice(h.as_bytes());
        if hd {
            let crc = pdu::crc32c(&slot.hdr[..hlen]);
            slot.hdr[hlen..hlen + 4].copy_from_slice(&crc.to_le_bytes());
        }
        let start = hlen + if hd { DIGEST_LEN } else { 0 };
        slot.hdr[start..pdo].fill(0);
        if dd {
            // SAFETY: within the command's data, alive while outstanding.
            let data = unsafe { std::slice::from_raw_parts(slot.ptr.add(off), len) };
            slot.ddgst = pdu::crc32c(data).to_le_bytes();
        }
        slot.xfer += len;
        slot.queued = true;
        self.tx.push_back(TxItem {
            cid,
            hdr_len: pdo as u16,
            data_off: off,
            data_len: len,
            digest: dd,
            sent: 0,
            capsule: false,
        });
    }

    /// Reads what the socket has and handles every whole PDU in it.
    fn receive(&mut self) {
        loop {
            if self.failure.is_some() {
                return;
            }
            if self.rx.start == self.rx.end {
                self.rx.start = 0;
                self.rx.end = 0;
            } else if self.rx.buf.len() - self.rx.end < MAX_WHOLE_PDU as usize + MAX_HLEN {
                let (s, e) = (self.rx.start, self.rx.end);
                self.rx.buf.copy_within(s..e, 0);
                self.rx.start = 0;
                self.rx.end = e - s;
            }
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            let end = self.rx.end;
            let room = self.rx.buf.len() - end;
            match stream.read(&mut self.rx.buf[end..]) {
                Ok(0) => {
                    self.fail(TcpError::Closed {
                        target: self.target.to_string(),
                        qid: self.qid,
                    });
                    return;
                }
                Ok(n) => {
                    self.rx.end += n;
                    self.parse();
                    if n < room {
                        // The socket had less than the room: it is empty,
                        // and asking again would only cost a system call.
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.fail(TcpError::Io {
                        target: self.target.to_string(),
                        qid: self.qid,
                        source: std::sync::Arc::new(e),
                    });
                    return;
                }
            }
        }
    }

    /// Takes apart the PDUs in the buffer.
    fn parse(&mut self) {
        while self.failure.is_none() {
            match self.rx.state {
                RxState::Data {
                    cid,
                    at,
                    left,
                    crc,
                    digest,
                    pdu_flags,
                } => {
                    let avail = self.rx.end - self.rx.start;
                    if left > 0 {
                        let n = left.min(avail);
                        if n == 0 {
                            return;
                        }
                        let src = &self.rx.buf[self.rx.start..self.rx.start + n];
                        let crc = if digest {
                            pdu::crc32c_append(crc, src)
                        } else {
                            crc
                        };
                        let slot = &self.slots[cid as usize];
                        // SAFETY: `at + n` is within the command's data
                        // (checked against its length when the header
                        // came); the memory is the caller's until the
                        // command is reported, and nothing else writes it.
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), slot.ptr.add(at), n) };
                        self.rx.start += n;
                        self.rx.state = RxState::Data {
                            cid,
                            at: at + n,
                            left: left - n,
                            crc,
                            digest,
                            pdu_flags,
                        };
                        continue;
                    }
                    if digest {
                        if avail < DIGEST_LEN {
                            return;
                        }
                        let got =
                            u32::from_le_bytes(self.rx.avail()[..4].try_into().unwrap_or_default());
                        self.rx.start += DIGEST_LEN;
                        if got != crc {
                            self.protocol_error(pdu::PduError::DataDigest(pdu_type::C2H_DATA));
                            return;
                        }
                    }
                    self.rx.state = RxState::Header;
                    self.c2h_done(cid, at, pdu_flags);
                }
                RxState::Header => {
                    if !self.parse_header() {
                        return;
                    }
                }
            }
        }
    }

    /// Handles the PDU at the buffer's start if enough of it is there;
    /// false when more bytes are needed.
    fn parse_header(&mut self) -> bool {
        let avail = self.rx.avail();
        if avail.len() < size_of::<CommonHeader>() {
            return false;
        }
        let Ok((ch, _)) = CommonHeader::read_from_prefix(avail) else {
            return false;
        };
        let max = if ch.pdu_type == pdu_type::C2H_DATA {
            u32::MAX
        } else {
            MAX_WHOLE_PDU
        };
        let layout = match ch.check(self.params.header_digest, self.params.data_digest, max) {
            Ok(l) => l,
            Err(e) => {
                self.protocol_error(e);
                return false;
            }
        };
        let header_end = layout.hlen + if layout.header_digest { DIGEST_LEN } else { 0 };
        let need = if ch.pdu_type == pdu_type::C2H_DATA {
            layout.pdo.max(header_end)
        } else {
            layout.plen
        };
        if avail.len() < need {
            return false;
        }
        if layout.header_digest {
            let want = pdu::crc32c(&avail[..layout.hlen]);
            let got = u32::from_le_bytes(
                avail[layout.hlen..layout.hlen + 4]
                    .try_into()
                    .unwrap_or_default(),
            );
            if want != got {
                self.protocol_error(pdu::PduError::HeaderDigest(ch.pdu_type));
                return false;
            }
        }
        let mut hdr = [0u8; MAX_HLEN];
        hdr[..layout.hlen].copy_from_slice(&avail[..layout.hlen]);
        self.rx.start += need;
        match ch.pdu_type {
            pdu_type::CAPSULE_RESP => self.on_response(&hdr),
            pdu_type::C2H_DATA => self.on_c2h(&hdr, layout),
            pdu_type::R2T => self.on_r2t(&hdr),
            pdu_type::C2H_TERM_REQ => {
                let t = TermReq::read_from_prefix(&hdr)
                    .map(|(t, _)| t)
                    .unwrap_or_default();
                self.fail(TcpError::Terminated {
                    target: self.target.to_string(),
                    qid: self.qid,
                    fes: t.fes.get(),
                });
            }
            other => self.unexpected(other),
        }
        true
    }

    fn unexpected(&mut self, pdu: u8) {
        self.fail(TcpError::Protocol {
            target: self.target.to_string(),
            qid: self.qid,
            what: format!("unexpected PDU type {pdu:#04x} from the controller"),
        });
    }

    /// The busy, non-zombie slot of a CID the controller named, or a
    /// protocol failure.
    fn live_cid(&mut self, cid: u16, pdu: &str) -> Option<u16> {
        match self.slots.get(cid as usize) {
            Some(s) if s.busy && !s.zombie => Some(cid),
            _ => {
                self.fail(TcpError::Protocol {
                    target: self.target.to_string(),
                    qid: self.qid,
                    what: format!("{pdu} for command id {cid}, which is not outstanding"),
                });
                None
            }
        }
    }

    fn on_response(&mut self, hdr: &[u8]) {
        let Ok((r, _)) = CapsuleResp::read_from_prefix(hdr) else {
            return;
        };
        let Some(cid) = self.live_cid(r.cqe.cid.get(), "response") else {
            return;
        };
        let status = NvmeStatus::from_field(r.cqe.status.get());
        let slot = &self.slots[cid as usize];
        // Success is believed only with every byte moved: a read short of
        // data, or a write whose data the controller did not all take, is
        // not done.
        let short = match slot.data {
            Data::ToHost | Data::ByR2t => slot.xfer < slot.len,
            _ => false,
        };
        let result = if !status.is_success() {
            Err(IoError::Status(status))
        } else if short {
            Err(IoError::Status(NvmeStatus::DATA_TRANSFER_ERROR))
        } else {
            Ok(r.cqe.dw0.get())
        };
        let req = self.slots[cid as usize].req as usize;
        self.reqs[req].dw1 = r.cqe.dw1.get();
        self.complete_slot(cid, result, r.cqe.dw0.get());
    }

    fn on_c2h(&mut self, hdr: &[u8], layout: Layout) {
        let Ok((d, _)) = DataHeader::read_from_prefix(hdr) else {
            return;
        };
        let Some(cid) = self.live_cid(d.cccid.get(), "C2HData") else {
            return;
        };
        let slot = &self.slots[cid as usize];
        let (off, len) = (d.datao.get() as usize, d.datal.get() as usize);
        let in_order = slot.data == Data::ToHost && off == slot.xfer;
        if !in_order || len != layout.data_len || off + len > slot.len {
            let what = format!(
                "C2HData for command id {cid}: {len} bytes at offset {off} (PDU data {}), \
                 where {} of {} bytes were received",
                layout.data_len, slot.xfer, slot.len
            );
            self.fail(TcpError::Protocol {
                target: self.target.to_string(),
                qid: self.qid,
                what,
            });
            return;
        }
        if d.ch.flags & flags::SUCCESS != 0 && d.ch.flags & flags::LAST_PDU == 0 {
            self.protocol_error(pdu::PduError::Length {
                pdu_type: pdu_type::C2H_DATA,
                plen: d.ch.plen.get(),
                pdo: d.ch.pdo,
            });
            return;
        }
        self.rx.state = RxState::Data {
            cid,
            at: off,
            left: len,
            crc: 0,
            digest: layout.data_digest,
            pdu_flags: d.ch.flags,
        };
    }

    fn c2h_done(&mut self, cid: u16, at: usize, pdu_flags: u8) {
        self.slots[cid as usize].xfer = at;
        if pdu_flags & flags::SUCCESS != 0 {
            let short = at < self.slots[cid as usize].len;
            let result = if short {
                Err(IoError::Status(NvmeStatus::DATA_TRANSFER_ERROR))
            } else {
                Ok(0)
            };
            self.complete_slot(cid, result, 0);
        }
    }

    fn on_r2t(&mut self, hdr: &[u8]) {
        let Ok((r, _)) = R2t::read_from_prefix(hdr) else {
            return;
        };
        let Some(cid) = self.live_cid(r.cccid.get(), "R2T") else {
            return;
        };
        let slot = &mut self.slots[cid as usize];
        let (off, len) = (r.r2to.get() as usize, r.r2tl.get() as usize);
        if slot.data != Data::ByR2t
            || slot.queued
            || off != slot.xfer
            || len == 0
            || off + len > slot.len
        {
            let what = format!(
                "R2T for command id {cid}: {len} bytes at offset {off}, where {} of {} bytes were sent",
                slot.xfer, slot.len
            );
            self.fail(TcpError::Protocol {
                target: self.target.to_string(),
                qid: self.qid,
                what,
            });
            return;
        }
        slot.ttag = r.ttag.get();
        slot.r2t_end = off + len;
        self.queue_h2c(cid);
    }

    /// Completes one command of its request; reports the request when its
    /// last command is in.
    fn complete_slot(&mut self, cid: u16, result: Result<u32, IoError>, dw0: u32) {
        let req = self.slots[cid as usize].req as usize;
        if self.slots[cid as usize].queued {
            // A PDU of it waits to be sent (the controller failed the
            // command early). One not yet started is dropped; one partly
            // on the wire must go out whole, and it reads the caller's
            // memory: the command is reported only once it is out.
            let started = self.tx.iter().any(|t| t.cid == cid && t.sent > 0);
            if started {
                let slot = &mut self.slots[cid as usize];
                slot.zombie = true;
                slot.held = Some((result, dw0));
                return;
            }
            self.tx.retain(|t| t.cid != cid);
        }
        self.release_slot(cid);
        self.finish_part(req, result, dw0);
    }

    /// Reports a zombie's held result and frees its slot.
    fn bury(&mut self, cid: u16) {
        let slot = &mut self.slots[cid as usize];
        let req = slot.req as usize;
        let held = slot.held.take();
        self.release_slot(cid);
        if let Some((result, dw0)) = held {
            self.finish_part(req, result, dw0);
        }
    }

    fn finish_part(&mut self, req: usize, result: Result<u32, IoError>, dw0: u32) {
        let r = &mut self.reqs[req];
        if !r.busy {
            return;
        }
        match result {
            Ok(v) => r.dw0 = v,
            Err(e) => {
                if r.error.is_none() {
                    r.error = Some(e);
                    r.dw0 = dw0;
                }
            }
        }
        r.remaining = r.remaining.saturating_sub(1);
        if r.remaining == 0 {
            r.busy = false;
            r.keep = None;
            let c = Completion {
                tag: r.tag,
                result: match r.error {
                    Some(e) => Err(e),
                    None => Ok(r.dw0),
                },
                dw0: r.dw0,
            };
            self.outstanding -= 1;
            if r.internal {
                // Its waiter takes it, and frees the request then.
                r.finished = Some((c, r.dw1));
            } else {
                self.free_reqs.push(req as u16);
                self.done.push_back((c, r.dw1));
            }
        }
    }

    pub(super) fn release_slot(&mut self, cid: u16) {
        let s = &mut self.slots[cid as usize];
        s.busy = false;
        s.zombie = false;
        s.queued = false;
        s.ptr = std::ptr::null_mut();
        self.free.push(cid);
    }

    /// A malformed PDU: tell the controller why (H2CTermReq), then fail.
    fn protocol_error(&mut self, e: pdu::PduError) {
        self.send_term(e.fes());
        self.fail(TcpError::Pdu {
            target: self.target.to_string(),
            qid: self.qid,
            error: e,
        });
    }

    fn send_term(&mut self, fes: u16) {
        // Bytes written now would land inside a PDU half on the wire (the
        // target could take them as a write's data): then only close.
        if self.tx.front().is_some_and(|t| t.sent > 0) {
            return;
        }
        let t = TermReq::new(pdu_type::H2C_TERM_REQ, fes);
        if let Some(s) = self.stream.as_mut() {
            // Best effort on a connection that is being torn down.
            let _ = std::io::Write::write(s, t.as_bytes());
        }
    }

    /// Closes the connection and completes everything outstanding once:
    /// with the error a part already has (a timeout), else `Disconnected`.
    pub(super) fn fail(&mut self, why: TcpError) {
        if self.failure.is_some() {
            return;
        }
        tracing::warn!(target_addr = %self.target, qid = self.qid, error = %why, "NVMe/TCP queue failed");
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.failure = Some(why);
        self.tx.clear();
        self.rx.reset();
        for cid in 0..self.slots.len() {
            let s = &self.slots[cid];
            if !s.busy {
                continue;
            }
            if s.zombie {
                // The controller answered it; that answer stands.
                self.bury(cid as u16);
                continue;
            }
            let req = s.req as usize;
            self.release_slot(cid as u16);
            self.finish_part(req, Err(IoError::Disconnected), 0);
        }
    }
}
