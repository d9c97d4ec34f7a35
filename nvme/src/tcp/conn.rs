//! Dialling a controller and the connection's first exchange, ICReq and
//! ICResp, which settles digests, alignment and the H2CData size.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use super::pdu::{CommonHeader, IcReq, IcResp, digest, pdu_type};
use super::{TcpError, TcpTarget};
use crate::Result;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// What ICResp settled for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Params {
    pub(super) header_digest: bool,
    pub(super) data_digest: bool,
    /// Controller PDU data alignment (0's based dwords).
    pub(super) cpda: u8,
    /// Largest H2CData payload.
    pub(super) maxh2cdata: u32,
}

/// Connects to `target` and exchanges ICReq/ICResp; the stream comes back
/// non-blocking, with Nagle off.
pub(super) fn dial(target: &Arc<TcpTarget>) -> Result<(TcpStream, Params)> {
    let opts = &target.opts;
    let io = |source: std::io::Error| TcpError::Dial {
        target: target.to_string(),
        source: Arc::new(source),
    };
    let stream = TcpStream::connect_timeout(&target.addr, opts.connect_timeout).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(opts.connect_timeout))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(opts.connect_timeout))
        .map_err(io)?;
    let want = if opts.header_digest {
        digest::HEADER
    } else {
        0
    } | if opts.data_digest { digest::DATA } else { 0 };
    let mut req = IcReq::new_zeroed();
    req.ch = CommonHeader {
        pdu_type: pdu_type::IC_REQ,
        flags: 0,
        hlen: 128,
        pdo: 0,
        plen: 128.into(),
    };
    req.hpda = 0;
    req.digest = want;
    // One R2T outstanding per command (0's based).
    req.maxr2t = 0.into();
    let mut s = &stream;
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut raw = [0u8; 128];
    s.read_exact(&mut raw[..8]).map_err(io)?;
    let bad = |what: String| TcpError::Protocol {
        target: target.to_string(),
        qid: u16::MAX,
        what,
    };
    let ch = CommonHeader::read_from_bytes(&raw[..8]).map_err(|_| bad("short header".into()))?;
    if ch.pdu_type == pdu_type::C2H_TERM_REQ {
        return Err(
            bad("the controller refused the connection (termination request)".into()).into(),
        );
    }
    if ch.pdu_type != pdu_type::IC_RESP {
        return Err(bad(format!(
            "expected ICResp, got PDU type {:#04x}",
            ch.pdu_type
        ))
        .into());
    }
    ch.check(false, false, 128)
        .map_err(|e| bad(format!("ICResp: {e}")))?;
    s.read_exact(&mut raw[8..]).map_err(io)?;
    let resp = IcResp::read_from_bytes(&raw).map_err(|_| bad("short ICResp".into()))?;
    if resp.pfv.get() != 0 {
        return Err(bad(format!(
            "PDU format version {} (only 0 is defined)",
            resp.pfv.get()
        ))
        .into());
    }
    if resp.digest != want {
        return Err(TcpError::Digests {
            target: target.to_string(),
            asked: want,
            granted: resp.digest,
        }
        .into());
    }
    let maxh2cdata = resp.maxh2cdata.get();
    if maxh2cdata < 4096 || maxh2cdata % 4 != 0 {
        return Err(bad(format!(
            "MAXH2CDATA {maxh2cdata} (at least 4096, in dwords)"
        ))
        .into());
    }
    if resp.cpda > 31 {
        return Err(bad(format!("CPDA {} (at most 31)", resp.cpda)).into());
    }
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    stream.set_nonblocking(true).map_err(io)?;
    Ok((
        stream,
        Params {
            header_digest: want & digest::HEADER != 0,
            data_digest: want & digest::DATA != 0,
            cpda: resp.cpda,
            maxh2cdata,
        },
    ))
}
