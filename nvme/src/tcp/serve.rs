//! The emulated controller served over NVMe/TCP, for host tests and the
//! no-hardware default: a listener on loopback that speaks the controller
//! side of the transport (ICResp, Connect, properties, capsules, R2T,
//! C2HData, digests, Keep Alive) and runs each command on an
//! [`EmuController`] through the PCIe driver, so commands behave exactly
//! as the emulator (and QEMU) make them behave.
//!
//! One thread per connection, one command at a time per connection:
//! this is a conformance peer, not a fast target. Faults can be injected
//! ([`ServeFault`]) to test how the initiator takes a target going wrong.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::fabrics::{
    self, ConnectData, DiscoveryLogEntry, DiscoveryLogHeader, SglDescriptor, fctype,
};
use super::pdu::{
    self, CapsuleCmd, CapsuleResp, CommonHeader, DIGEST_LEN, DataHeader, IcReq, IcResp, R2t,
    TermReq, digest, flags, pdu_type,
};
use crate::emu::{EmuConfig, EmuController};
use crate::regs::{self, Cc, Csts};
use crate::spec::{
    CompletionEntry, IdentifyController, NvmeStatus, SubmissionEntry, admin_opc, cns, fid,
};
use crate::{Controller, ControllerOptions, DmaContext, Error, QueueOptions, QueuePair, Result};

/// Largest H2CData payload this target takes.
const MAXH2CDATA: u32 = 32 * 1024;

/// A fault the target commits once, on the next command it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeFault {
    /// Flip a bit of the next C2HData's data digest (or its data when
    /// digests are off).
    CorruptData,
    /// Send the next response or read data PDU with a wrong header length.
    GarbleHeader,
    /// Close the connection instead of answering the next I/O command
    /// (after executing it).
    DropAfterExecute,
    /// Close the connection on receiving the next I/O command (before
    /// executing it).
    DropBeforeExecute,
    /// Answer the next I/O command this late.
    Delay(Duration),
    /// Send the next read's data at the wrong offset.
    WrongOffset,
    /// Stop answering Keep Alive (the host's keep-alive then fails).
    IgnoreKeepAlive,
}

/// What to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The subsystem NQN.
    pub subnqn: String,
    /// The emulated controller behind it.
    pub emu: EmuConfig,
    /// In-capsule data I/O queues take (IOCCSZ is this plus 64 bytes).
    pub inline_data: u32,
    /// Largest C2HData payload; longer reads come in several PDUs.
    pub c2h_chunk: usize,
    /// Refuse a host's request to turn SQ flow control off (Connect
    /// Invalid Parameters on CATTR), as a controller without it does: reads
    /// then end with a response capsule after their data.
    pub refuse_sq_flow_off: bool,
    /// Host NQNs allowed; empty allows any.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            subnqn: "nqn.2026-01.io.ustor:emu".into(),
            emu: EmuConfig::default(),
            inline_data: 8192,
            c2h_chunk: 16 * 1024,
            refuse_sq_flow_off: false,
            allowed_hosts: Vec::new(),
        }
    }
}

struct Association {
    cc: Cc,
    kato_ms: u32,
    last_keep_alive: Instant,
    /// Connections of this association, closed together when it dies.
    streams: Vec<TcpStream>,
    /// I/O queue ids connected, or closed and not yet torn down.
    qids: std::collections::HashSet<u16>,
}

/// How long a closed I/O queue's id stays taken, as Linux nvmet tears a
/// queue down in a work item after its connection closes.
const QUEUE_TEARDOWN: Duration = Duration::from_millis(30);

struct State {
    cfg: ServeConfig,
    ctrl: Controller<EmuController>,
    associations: Mutex<HashMap<u16, Association>>,
    next_cntlid: Mutex<u16>,
    faults: Mutex<Vec<ServeFault>>,
    stop: AtomicBool,
    commands: AtomicU64,
    addr: SocketAddr,
}

impl State {
    fn assocs(&self) -> MutexGuard<'_, HashMap<u16, Association>> {
        self.associations.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_fault(&self, f: impl Fn(&ServeFault) -> bool) -> Option<ServeFault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let i = faults.iter().position(f)?;
        Some(faults.remove(i))
    }
}

/// A running target. Stops (closing every connection) when dropped.
pub struct TcpServer {
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Serves `cfg` on an ephemeral loopback port.
    pub fn start(cfg: ServeConfig) -> Result<TcpServer> {
        let ctx = DmaContext::host();
        let emu = EmuController::new(&ctx, cfg.emu.clone())?;
        let ctrl = Controller::new(emu, ControllerOptions::default())?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::BackingFile {
            path: "127.0.0.1:0".into(),
            source: e,
        })?;
        let addr = listener.local_addr().map_err(|e| Error::BackingFile {
            path: "127.0.0.1:0".into(),
            source: e,
        })?;
        let state = Arc::new(State {
            cfg,
            ctrl,
            associations: Mutex::new(HashMap::new()),
            next_cntlid: Mutex::new(1),
            faults: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            commands: AtomicU64::new(0),
            addr,
        });
        let st = Arc::clone(&state);
        let accept = std::thread::Builder::new()
            .name("nvme-tcp-serve".into())
            .spawn(move || accept_loop(listener, st))
            .map_err(|e| Error::BackingFile {
                path: "accept thread".into(),
                source: e,
            })?;
        Ok(TcpServer {
            state,
            accept: Some(accept),
        })
    }

    /// The listening address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// The served subsystem's NQN.
    pub fn subnqn(&self) -> &str {
        &self.state.cfg.subnqn
    }

    /// The emulated controller behind the target (to read its media).
    pub fn backend(&self) -> &Controller<EmuController> {
        &self.state.ctrl
    }

    /// Queues a fault.
    pub fn inject(&self, fault: ServeFault) {
        self.state
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fault);
    }

    /// Closes every connection now (the target going away mid-I/O).
    pub fn reset_connections(&self) {
        for a in self.state.assocs().values_mut() {
            for s in a.streams.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// I/O commands executed so far.
    pub fn commands(&self) -> u64 {
        self.state.commands.load(Ordering::SeqCst)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.reset_connections();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.state.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, st: Arc<State>) {
    for conn in listener.incoming() {
        if st.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let st = Arc::clone(&st);
        let _ = std::thread::Builder::new()
            .name("nvme-tcp-conn".into())
            .spawn(move || {
                let mut c = Conn::new(stream, st);
                if let Err(why) = c.run() {
                    tracing::debug!(why, "served connection ended");
                }
                c.close();
            });
    }
}

/// One connection (one queue).
struct Conn {
    stream: TcpStream,
    st: Arc<State>,
    hd: bool,
    dd: bool,
    qid: u16,
    cntlid: Option<u16>,
    sqsize: u16,
    sqhd: u16,
    qp: Option<QueuePair<EmuController>>,
    /// The host turned SQ flow control off: no SQ heads, reads complete
    /// with the C2HData SUCCESS flag.
    sq_flow_off: bool,
    /// Capsules that came while a command's data was being collected.
    pending: std::collections::VecDeque<(SubmissionEntry, Vec<u8>)>,
}

type Served<T> = std::result::Result<T, String>;

impl Conn {
    fn new(stream: TcpStream, st: Arc<State>) -> Conn {
        Conn {
            stream,
            st,
            hd: false,
            dd: false,
            qid: 0,
            cntlid: None,
            sqsize: 0,
            sqhd: 0,
            qp: None,
            sq_flow_off: false,
            pending: std::collections::VecDeque::new(),
        }
    }

    fn close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if self.qid > 0
            && let Some(id) = self.cntlid
        {
            let (st, qid) = (Arc::clone(&self.st), self.qid);
            let _ = std::thread::Builder::new()
                .name("nvme-tcp-teardown".into())
                .spawn(move || {
                    std::thread::sleep(QUEUE_TEARDOWN);
                    if let Some(a) = st.assocs().get_mut(&id) {
                        a.qids.remove(&qid);
                    }
                });
        }
        if self.qid == 0
            && let Some(id) = self.cntlid
        {
            // The admin queue is the association: its end ends the rest.
            if let Some(a) = self.st.assocs().remove(&id) {
                for s in a.streams {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }

    fn run(&mut self) -> Served<()> {
        let _ = self.stream.set_nodelay(true);
        self.handshake()?;
        loop {
            if self.st.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.check_keep_alive()?;
            if let Some((sqe, data)) = self.pending.pop_front() {
                self.command(sqe, data)?;
                continue;
            }
            let (ch, hdr, data) = self.read_pdu(Some(Duration::from_millis(100)))?;
            let Some(ch) = ch else { continue };
            match ch.pdu_type {
                pdu_type::CAPSULE_CMD => {
                    let (cmd, _) =
                        CapsuleCmd::read_from_prefix(&hdr).map_err(|_| "short capsule")?;
                    self.command(cmd.sqe, data)?;
                }
                pdu_type::H2C_TERM_REQ => return Err("host terminated the connection".into()),
                t => {
                    self.term(pdu::fes::PDU_SEQUENCE);
                    return Err(format!("unexpected PDU {t:#x}"));
                }
            }
        }
    }

    fn check_keep_alive(&self) -> Served<()> {
        let (Some(id), 0) = (self.cntlid, self.qid) else {
            return Ok(());
        };
        let assocs = self.st.assocs();
        let Some(a) = assocs.get(&id) else {
            return Err("association gone".into());
        };
        if a.kato_ms > 0
            && a.last_keep_alive.elapsed() > Duration::from_millis(u64::from(a.kato_ms))
        {
            return Err("keep-alive timeout".into());
        }
        Ok(())
    }

    fn handshake(&mut self) -> Served<()> {
        let mut raw = [0u8; 128];
        self.stream
            .read_exact(&mut raw)
            .map_err(|e| e.to_string())?;
        let req = IcReq::read_from_bytes(&raw).map_err(|_| "short ICReq")?;
        if req.ch.pdu_type != pdu_type::IC_REQ || req.ch.check(false, false, 128).is_err() {
            self.term(pdu::fes::INVALID_HEADER_FIELD);
            return Err("bad ICReq".into());
        }
        self.hd = req.digest & digest::HEADER != 0;
        self.dd = req.digest & digest::DATA != 0;
        let mut resp = IcResp::new_zeroed();
        resp.ch = CommonHeader {
            pdu_type: pdu_type::IC_RESP,
            flags: 0,
            hlen: 128,
            pdo: 0,
            plen: 128.into(),
        };
        resp.digest = req.digest & (digest::HEADER | digest::DATA);
        resp.maxh2cdata = MAXH2CDATA.into();
        self.stream
            .write_all(resp.as_bytes())
            .map_err(|e| e.to_string())
    }

    /// Reads one PDU: its header (checked, digest verified) and data
    /// (digest verified). `None` when `wait` passed with nothing.
    #[allow(clippy::type_complexity)]
    fn read_pdu(
        &mut self,
        wait: Option<Duration>,
    ) -> Served<(Option<CommonHeader>, Vec<u8>, Vec<u8>)> {
        let mut ch_raw = [0u8; 8];
        self.stream
            .set_read_timeout(wait)
            .map_err(|e| e.to_string())?;
        match self.stream.read(&mut ch_raw[..1]) {
            Ok(0) => return Err("closed".into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok((None, Vec::new(), Vec::new()));
            }
            Err(e) => return Err(e.to_string()),
        }
        self.stream
            .set_read_timeout(None)
            .map_err(|e| e.to_string())?;
        self.stream
            .read_exact(&mut ch_raw[1..])
            .map_err(|e| e.to_string())?;
        let ch = CommonHeader::read_from_bytes(&ch_raw).map_err(|_| "short header")?;
        let layout = match ch.check(self.hd, self.dd, 1 << 24) {
            Ok(l) => l,
            Err(e) => {
                self.term(e.fes());
                return Err(e.to_string());
            }
        };
        let mut rest = vec![0u8; layout.plen - 8];
        self.stream
            .read_exact(&mut rest)
            .map_err(|e| e.to_string())?;
        let mut whole = ch_raw.to_vec();
        whole.extend_from_slice(&rest);
        if layout.header_digest {
            let want = pdu::crc32c(&whole[..layout.hlen]);
            let got = u32::from_le_bytes(
                whole[layout.hlen..layout.hlen + 4]
                    .try_into()
                    .unwrap_or_default(),
            );
            if want != got {
                self.term(pdu::fes::HEADER_DIGEST);
                return Err("header digest".into());
            }
        }
        let hdr = whole[..layout.hlen].to_vec();
        let data = if layout.data_len > 0 {
            let d = whole[layout.pdo..layout.pdo + layout.data_len].to_vec();
            if layout.data_digest {
                let at = layout.pdo + layout.data_len;
                let got = u32::from_le_bytes(whole[at..at + 4].try_into().unwrap_or_default());
                if got != pdu::crc32c(&d) {
                    // A data digest error fails the command, not the
                    // connection (NVMe/TCP 1.0, 3.5.1).
                    return Ok((Some(ch), hdr, Vec::from(&b"\0BAD-DIGEST"[..])));
                }
            }
            d
        } else {
            Vec::new()
        };
        Ok((Some(ch), hdr, data))
    }

    fn send(&mut self, pdu_type: u8, flags_in: u8, header: &[u8], data: &[u8]) -> Served<()> {
        let hlen = header.len();
        let hd = self.hd;
        let dd = self.dd && !data.is_empty();
        let pdo = if data.is_empty() {
            0
        } else {
            pdu::data_offset(hlen, hd, 0)
        };
        let header_end = hlen + if hd { DIGEST_LEN } else { 0 };
        let plen = if data.is_empty() {
            header_end
        } else {
            pdo + data.len() + if dd { DIGEST_LEN } else { 0 }
        };
        let mut out = Vec::with_capacity(plen);
        out.extend_from_slice(header);
        let ch = CommonHeader {
            pdu_type,
            flags: flags_in
                | if hd { flags::HDGSTF } else { 0 }
                | if dd { flags::DDGSTF } else { 0 },
            hlen: hlen as u8,
            pdo: pdo as u8,
            plen: (plen as u32).into(),
        };
        out[..8].copy_from_slice(ch.as_bytes());
        if hd {
            let crc = pdu::crc32c(&out[..hlen]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out.resize(pdo.max(out.len()), 0);
        out.extend_from_slice(data);
        if dd {
            let mut crc = pdu::crc32c(data);
            if pdu_type == pdu_type::C2H_DATA
                && self
                    .st
                    .take_fault(|f| *f == ServeFault::CorruptData)
                    .is_some()
            {
                crc ^= 1;
            }
            out.extend_from_slice(&crc.to_le_bytes());
        } else if pdu_type == pdu_type::C2H_DATA
            && !data.is_empty()
            && self
                .st
                .take_fault(|f| *f == ServeFault::CorruptData)
                .is_some()
        {
            let last = out.len() - 1;
            out[last] ^= 1;
        }
        if matches!(pdu_type, pdu_type::CAPSULE_RESP | pdu_type::C2H_DATA)
            && self
                .st
                .take_fault(|f| *f == ServeFault::GarbleHeader)
                .is_some()
        {
            out[2] = 20;
        }
        self.stream.write_all(&out).map_err(|e| e.to_string())
    }

    fn term(&mut self, fes: u16) {
        let t = TermReq::new(pdu_type::C2H_TERM_REQ, fes);
        let _ = self.stream.write_all(t.as_bytes());
    }

    fn respond(&mut self, cid: u16, status: NvmeStatus, dw0: u32, dw1: u32) -> Served<()> {
        self.sqhd = if self.sq_flow_off {
            0xFFFF
        } else if self.sqsize > 0 {
            (self.sqhd + 1) % (self.sqsize + 1)
        } else {
            0
        };
        let r = CapsuleResp {
            ch: CommonHeader::default(),
            cqe: CompletionEntry {
                dw0: dw0.into(),
                dw1: dw1.into(),
                sqhd: self.sqhd.into(),
                sqid: self.qid.into(),
                cid: cid.into(),
                status: status.to_field(false).into(),
            },
        };
        self.send(pdu_type::CAPSULE_RESP, 0, r.as_bytes(), &[])
    }

    /// Sends `data` as C2HData PDUs; the last with SUCCESS when `success`.
    fn send_c2h(&mut self, cid: u16, data: &[u8], success: bool) -> Served<()> {
        let chunk = self.st.cfg.c2h_chunk.max(4);
        let wrong = self
            .st
            .take_fault(|f| *f == ServeFault::WrongOffset)
            .is_some();
        let mut off = 0;
        while off < data.len() {
            let n = chunk.min(data.len() - off);
            let last = off + n == data.len();
            let h = DataHeader {
                ch: CommonHeader::default(),
                cccid: cid.into(),
                ttag: 0.into(),
                datao: ((off + if wrong { 512 } else { 0 }) as u32).into(),
                datal: (n as u32).into(),
                _rsvd: [0; 4],
            };
            let fl = if last { flags::LAST_PDU } else { 0 }
                | if last && success { flags::SUCCESS } else { 0 };
            self.send(pdu_type::C2H_DATA, fl, h.as_bytes(), &data[off..off + n])?;
            off += n;
        }
        Ok(())
    }

    /// Asks for and collects `len` bytes of a command's data.
    fn collect_h2c(&mut self, cid: u16, len: usize) -> Served<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        let ttag = cid ^ 0x5A5A;
        let r = R2t {
            ch: CommonHeader::default(),
            cccid: cid.into(),
            ttag: ttag.into(),
            r2to: 0.into(),
            r2tl: (len as u32).into(),
            _rsvd: [0; 4],
        };
        self.send(pdu_type::R2T, 0, r.as_bytes(), &[])?;
        while got < len {
            let (ch, hdr, data) = self.read_pdu(None)?;
            let ch = ch.ok_or("no data")?;
            if ch.pdu_type == pdu_type::CAPSULE_CMD {
                // The host pipelines: take the command after this one.
                let (cmd, _) = CapsuleCmd::read_from_prefix(&hdr).map_err(|_| "short capsule")?;
                self.pending.push_back((cmd.sqe, data));
                continue;
            }
            if ch.pdu_type != pdu_type::H2C_DATA {
                self.term(pdu::fes::PDU_SEQUENCE);
                return Err(format!("expected H2CData, got {:#x}", ch.pdu_type));
            }
            let (d, _) = DataHeader::read_from_prefix(&hdr).map_err(|_| "short H2CData")?;
            let (off, n) = (d.datao.get() as usize, d.datal.get() as usize);
            if d.cccid.get() != cid
                || d.ttag.get() != ttag
                || off != got
                || n != data.len()
                || off + n > len
                || n > MAXH2CDATA as usize
            {
                self.term(pdu::fes::DATA_OUT_OF_RANGE);
                return Err(format!(
                    "H2CData {n} bytes at {off} for cid {}",
                    d.cccid.get()
                ));
            }
            let last = ch.flags & flags::LAST_PDU != 0;
            if last != (off + n == len) {
                self.term(pdu::fes::PDU_SEQUENCE);
                return Err("LAST_PDU flag misplaced".into());
            }
            buf[off..off + n].copy_from_slice(&data);
            got += n;
        }
        Ok(buf)
    }

    fn command(&mut self, sqe: SubmissionEntry, capsule_data: Vec<u8>) -> Served<()> {
        let cid = sqe.cid.get();
        if capsule_data.as_slice() == b"\0BAD-DIGEST" {
            return self.respond(cid, NvmeStatus::DATA_TRANSFER_ERROR, 0, 0);
        }
        let sgl = SglDescriptor::of(&sqe);
        let len = sgl.length.get() as usize;
        if let Some(ft) = fabrics::fctype_of(&sqe) {
            return self.fabrics_command(sqe, ft, capsule_data);
        }
        if self.cntlid.is_none() {
            return self.respond(cid, NvmeStatus::generic(0x0C).dnr(), 0, 0);
        }
        if sqe.flags & 0xC0 != fabrics::PSDT_SGL {
            return self.respond(cid, NvmeStatus::INVALID_FIELD, 0, 0);
        }
        let to_ctrl = sqe.opc & 1 != 0;
        let to_host = sqe.opc & 2 != 0;
        let in_capsule = sgl.sgl_type == SglDescriptor::IN_CAPSULE;
        if in_capsule && (!to_ctrl || len != capsule_data.len() || len > self.inline_limit()) {
            return self.respond(cid, NvmeStatus::generic(0x0D).dnr(), 0, 0);
        }
        if !in_capsule && sgl.sgl_type != SglDescriptor::TRANSPORT {
            return self.respond(cid, NvmeStatus::generic(0x11).dnr(), 0, 0);
        }
        let data_out = if to_ctrl && len > 0 {
            if in_capsule {
                capsule_data
            } else {
                self.collect_h2c(cid, len)?
            }
        } else {
            Vec::new()
        };
        if self.qid == 0 {
            return self.admin_command(sqe, len, data_out, to_host);
        }
        self.io_command(sqe, len, data_out, to_host)
    }

    fn inline_limit(&self) -> usize {
        if self.qid == 0 {
            8192
        } else {
            self.st.cfg.inline_data as usize
        }
    }

    fn fabrics_command(&mut self, sqe: SubmissionEntry, ft: u8, data: Vec<u8>) -> Served<()> {
        let cid = sqe.cid.get();
        match ft {
            fctype::CONNECT => self.connect(sqe, data),
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if self.qid == 0 => {
                let Some(id) = self.cntlid else {
                    return self.respond(cid, NvmeStatus::generic(0x0C).dnr(), 0, 0);
                };
                let offset = sqe.cdw11.get() as usize;
                let cap = self.st.ctrl.cap();
                let mut assocs = self.st.assocs();
                let Some(a) = assocs.get_mut(&id) else {
                    return Err("association gone".into());
                };
                let value: Option<u64> = if ft == fctype::PROPERTY_GET {
                    match offset {
                        regs::CAP => Some(cap.0),
                        regs::VS => Some(0x0002_0000),
                        regs::CC => Some(u64::from(a.cc.0)),
                        regs::CSTS => {
                            let mut csts = Csts::empty();
                            if a.cc.en() {
                                csts |= Csts::RDY;
                            }
                            let mut v = csts.bits();
                            if a.cc.shn() != 0 {
                                v |= 2 << 2;
                            }
                            Some(u64::from(v))
                        }
                        _ => None,
                    }
                } else if offset == regs::CC {
                    a.cc = Cc(sqe.cdw12.get());
                    Some(0)
                } else {
                    None
                };
                drop(assocs);
                match value {
                    Some(v) => self.respond(cid, NvmeStatus::SUCCESS, v as u32, (v >> 32) as u32),
                    None => self.respond(cid, NvmeStatus::INVALID_FIELD, 0, 0),
                }
            }
            _ => self.respond(cid, NvmeStatus::INVALID_OPCODE, 0, 0),
        }
    }

    fn connect(&mut self, sqe: SubmissionEntry, data: Vec<u8>) -> Served<()> {
        let cid = sqe.cid.get();
        let invalid = |ipo: u32, iattr: u32| (NvmeStatus::specific(0x82).dnr(), iattr | ipo << 16);
        let Ok(cd) = ConnectData::read_from_bytes(&data) else {
            let (s, dw0) = invalid(0, 0);
            return self.respond(cid, s, dw0, 0);
        };
        let qid = (sqe.cdw10.get() >> 16) as u16;
        let sqsize = sqe.cdw11.get() as u16;
        let cattr = (sqe.cdw11.get() >> 16) as u8;
        if cattr & fabrics::CATTR_DISABLE_SQ_FLOW != 0 && self.st.cfg.refuse_sq_flow_off {
            let (s, dw0) = invalid(fabrics::CATTR_OFFSET, 0);
            return self.respond(cid, s, dw0, 0);
        }
        let kato = sqe.cdw12.get();
        let discovery = cd.subsystem() == fabrics::DISCOVERY_NQN;
        if !discovery && cd.subsystem() != self.st.cfg.subnqn {
            let (s, dw0) = invalid(256, 1);
            return self.respond(cid, s, dw0, 0);
        }
        let allowed = &self.st.cfg.allowed_hosts;
        if !allowed.is_empty() && !allowed.contains(&cd.host()) {
            return self.respond(cid, NvmeStatus::specific(0x84).dnr(), 0, 0);
        }
        if sqsize == 0 || (qid > 0 && sqsize > self.st.ctrl.cap().mqes()) {
            let (s, dw0) = invalid(44, 0);
            return self.respond(cid, s, dw0, 0);
        }
        let stream = self.stream.try_clone().map_err(|e| e.to_string())?;
        let cntlid = if qid == 0 {
            let id = {
                let mut next = self
                    .st
                    .next_cntlid
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let id = *next;
                *next = next.wrapping_add(1).max(1);
                id
            };
            self.st.assocs().insert(
                id,
                Association {
                    cc: Cc(0),
                    kato_ms: kato,
                    last_keep_alive: Instant::now(),
                    streams: vec![stream],
                    qids: std::collections::HashSet::new(),
                },
            );
            id
        } else {
            let id = cd.cntlid.get();
            let mut assocs = self.st.assocs();
            let Some(a) = assocs.get_mut(&id) else {
                drop(assocs);
                let (s, dw0) = invalid(16, 1);
                return self.respond(cid, s, dw0, 0);
            };
            if !a.cc.en() || !a.qids.insert(qid) {
                // Not enabled, or the id is taken (still being torn down):
                // Command Sequence Error, as nvmet answers.
                drop(assocs);
                return self.respond(cid, NvmeStatus::generic(0x0C).dnr(), 0, 0);
            }
            a.streams.push(stream);
            drop(assocs);
            let qp = self
                .st
                .ctrl
                .create_qpair(QueueOptions {
                    entries: sqsize.saturating_add(1).max(2),
                    ..QueueOptions::default()
                })
                .map_err(|e| e.to_string());
            match qp {
                Ok(qp) => self.qp = Some(qp),
                Err(_) => {
                    let (s, dw0) = invalid(42, 0);
                    return self.respond(cid, s, dw0, 0);
                }
            }
            id
        };
        self.qid = qid;
        self.cntlid = Some(cntlid);
        self.sqsize = sqsize;
        self.sq_flow_off = cattr & fabrics::CATTR_DISABLE_SQ_FLOW != 0;
        self.respond(cid, NvmeStatus::SUCCESS, u32::from(cntlid), 0)
    }

    fn admin_command(
        &mut self,
        sqe: SubmissionEntry,
        len: usize,
        data_out: Vec<u8>,
        to_host: bool,
    ) -> Served<()> {
        let cid = sqe.cid.get();
        let id = self.cntlid.unwrap_or(0);
        match sqe.opc {
            fabrics::KEEP_ALIVE_OPC => {
                if self
                    .st
                    .take_fault(|f| *f == ServeFault::IgnoreKeepAlive)
                    .is_some()
                {
                    // Never answered: the host's Keep Alive times out.
                    return Ok(());
                }
                if let Some(a) = self.st.assocs().get_mut(&id) {
                    a.last_keep_alive = Instant::now();
                }
                return self.respond(cid, NvmeStatus::SUCCESS, 0, 0);
            }
            admin_opc::GET_LOG_PAGE if (sqe.cdw10.get() & 0xFF) as u8 == fabrics::LID_DISCOVERY => {
                let log = self.discovery_log();
                let offset = u64::from(sqe.cdw12.get()) | u64::from(sqe.cdw13.get()) << 32;
                let mut out = vec![0u8; len];
                let start = (offset as usize).min(log.len());
                let n = (log.len() - start).min(len);
                out[..n].copy_from_slice(&log[start..start + n]);
                return self.finish(cid, Ok((0, out)), to_host);
            }
            admin_opc::SET_FEATURES if (sqe.cdw10.get() & 0xFF) as u8 == fid::NUMBER_OF_QUEUES => {
                let granted = u32::from(self.st.ctrl.io_queues().saturating_sub(1));
                let want = sqe.cdw11.get();
                let nsq = (want & 0xFFFF).min(granted);
                let ncq = (want >> 16).min(granted);
                return self.respond(cid, NvmeStatus::SUCCESS, nsq | ncq << 16, 0);
            }
            _ => {}
        }
        let what = format!("admin opcode {:#x}", sqe.opc);
        let to_device = (!data_out.is_empty()).then_some(data_out.as_slice());
        let result = self
            .st
            .ctrl
            .admin(&what, sqe, if to_host { len } else { 0 }, to_device);
        let result = match result {
            Ok((dw0, mut data)) => {
                let identify_ctrl = sqe.opc == admin_opc::IDENTIFY
                    && (sqe.cdw10.get() & 0xFF) as u8 == cns::CONTROLLER;
                if identify_ctrl {
                    self.patch_identify(&mut data, id);
                }
                Ok((dw0, data))
            }
            Err(Error::AdminCommand { status, .. }) => Err(status),
            Err(e) => return Err(e.to_string()),
        };
        self.finish(cid, result, to_host)
    }

    /// What a fabrics controller reports beyond the PCIe one behind it.
    fn patch_identify(&self, data: &mut [u8], cntlid: u16) {
        let Ok(mut id) = IdentifyController::read_from_bytes(data) else {
            return;
        };
        id.cntlid = cntlid.into();
        id.subnqn = [0; 256];
        let nqn = self.st.cfg.subnqn.as_bytes();
        let n = nqn.len().min(fabrics::NQN_MAX);
        id.subnqn[..n].copy_from_slice(&nqn[..n]);
        id.ioccsz = ((self.st.cfg.inline_data + 64) / 16).into();
        id.iorcsz = 1.into();
        id.icdoff = 0.into();
        id.msdbd = 1;
        id.cntrltype = 1;
        // SGLs supported, with the keyed/transport data block kinds.
        id.sgls = (1 | 1 << 2 | 1 << 20).into();
        data.copy_from_slice(id.as_bytes());
    }

    fn discovery_log(&self) -> Vec<u8> {
        let mut h = DiscoveryLogHeader::new_zeroed();
        h.genctr = 1.into();
        h.numrec = 1.into();
        let mut e = DiscoveryLogEntry::new_zeroed();
        e.trtype = fabrics::TRTYPE_TCP;
        e.adrfam = 1;
        e.subtype = 2;
        e.portid = 1.into();
        e.cntlid = fabrics::DYNAMIC_CNTLID.into();
        e.asqsz = 32.into();
        let put = |dst: &mut [u8], s: &str| {
            let n = s.len().min(dst.len());
            dst[..n].copy_from_slice(&s.as_bytes()[..n]);
        };
        put(&mut e.trsvcid, &self.st.addr.port().to_string());
        put(&mut e.traddr, &self.st.addr.ip().to_string());
        put(&mut e.subnqn, &self.st.cfg.subnqn);
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(e.as_bytes());
        out
    }

    fn finish(
        &mut self,
        cid: u16,
        result: std::result::Result<(u32, Vec<u8>), NvmeStatus>,
        to_host: bool,
    ) -> Served<()> {
        match result {
            Ok((dw0, data)) => {
                if to_host && !data.is_empty() {
                    let success = self.sq_flow_off && dw0 == 0;
                    self.send_c2h(cid, &data, success)?;
                    if success {
                        return Ok(());
                    }
                }
                self.respond(cid, NvmeStatus::SUCCESS, dw0, 0)
            }
            Err(status) => self.respond(cid, status, 0, 0),
        }
    }

    fn io_command(
        &mut self,
        sqe: SubmissionEntry,
        len: usize,
        data_out: Vec<u8>,
        to_host: bool,
    ) -> Served<()> {
        let cid = sqe.cid.get();
        if self
            .st
            .take_fault(|f| *f == ServeFault::DropBeforeExecute)
            .is_some()
        {
            return Err("dropped (fault)".into());
        }
        if let Some(ServeFault::Delay(d)) =
            self.st.take_fault(|f| matches!(f, ServeFault::Delay(_)))
        {
            std::thread::sleep(d);
        }
        self.st.commands.fetch_add(1, Ordering::SeqCst);
        let Some(qp) = self.qp.as_mut() else {
            return self.respond(cid, NvmeStatus::generic(0x0C).dnr(), 0, 0);
        };
        let buf = if len > 0 {
            let b = self.st.ctrl.dma_alloc(len).map_err(|e| e.to_string())?;
            if !data_out.is_empty() {
                b.write_bytes(0, &data_out).map_err(|e| e.to_string())?;
            }
            Some(b)
        } else {
            None
        };
        let mut raw = sqe;
        raw.flags &= !0xC0;
        raw.prp1 = 0.into();
        raw.prp2 = 0.into();
        let slice = buf.as_ref().map(|b| b.as_slice());
        let result = match qp.submit_raw(raw, slice.as_ref(), u64::from(cid)) {
            Ok(()) => match qp.drain(Duration::from_secs(30)) {
                Ok(done) => done.first().map_or(Err(NvmeStatus::INTERNAL_ERROR), |c| {
                    c.result
                        .map_err(|e| e.status().unwrap_or(NvmeStatus::INTERNAL_ERROR))
                        .map(|dw0| (dw0, c.dw0))
                }),
                Err(e) => return Err(e.to_string()),
            },
            Err(_) => Err(NvmeStatus::INVALID_FIELD),
        };
        if self
            .st
            .take_fault(|f| *f == ServeFault::DropAfterExecute)
            .is_some()
        {
            return Err("dropped after executing (fault)".into());
        }
        match result {
            Ok((dw0, _)) => {
                let mut data = Vec::new();
                if to_host && let Some(b) = &buf {
                    data = vec![0u8; len];
                    b.read_bytes(0, &mut data).map_err(|e| e.to_string())?;
                }
                self.finish(cid, Ok((dw0, data)), to_host)
            }
            Err(status) => self.respond(cid, status, 0, 0),
        }
    }
}
