//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0, section 3.6): the
//! common header, the headers of each PDU type, and the digests.
//!
//! Every header is `#[repr(C)]` with little-endian fields, zerocopy-derived
//! and size-checked at compile time, like [`crate::spec`]. Lengths read
//! from the peer are checked by [`CommonHeader::check`] before anything
//! else looks at the PDU.

use std::mem::size_of;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::spec::{CompletionEntry, SubmissionEntry};

/// PDU types.
pub mod pdu_type {
    /// Initialize Connection Request (host to controller).
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const IC_RESP: u8 = 0x01;
    /// Host to controller terminate connection request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to host terminate connection request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to controller data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to host data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to transfer.
    pub const R2T: u8 = 0x09;
}

/// Header flags.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 1 << 0;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of a command's transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData: the command completed successfully; no response capsule
    /// follows.
    pub const SUCCESS: u8 = 1 << 3;
}

/// ICReq/ICResp digest bits.
pub mod digest {
    /// Header digests on every PDU but ICReq/ICResp.
    pub const HEADER: u8 = 1 << 0;
    /// Data digests on every PDU with data.
    pub const DATA: u8 = 1 << 1;
}

/// Fatal error status of a termination request (figure 28).
pub mod fes {
    /// Invalid PDU header field.
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// PDU sequence error.
    pub const PDU_SEQUENCE: u16 = 0x02;
    /// Header digest error.
    pub const HEADER_DIGEST: u16 = 0x03;
    /// Data transfer out of range.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// Data transfer limit exceeded.
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    /// Unsupported parameter.
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Bytes of a digest (CRC32C).
pub const DIGEST_LEN: usize = 4;
/// The largest header any PDU type has (ICReq/ICResp).
pub const MAX_HLEN: usize = 128;

/// The common header all PDUs start with (8 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CommonHeader {
    /// PDU type.
    pub pdu_type: u8,
    /// Flags.
    pub flags: u8,
    /// Header length (without the digest).
    pub hlen: u8,
    /// PDU data offset: where the data starts (0 without data).
    pub pdo: u8,
    /// Total PDU length: header, digests, padding and data.
    pub plen: U32,
}

/// ICReq (hlen 128).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IcReq {
    /// Common header.
    pub ch: CommonHeader,
    /// PDU format version (0).
    pub pfv: U16,
    /// Host PDU data alignment (0's based dwords).
    pub hpda: u8,
    /// Digests asked for ([`digest`]).
    pub digest: u8,
    /// Maximum outstanding R2Ts per command (0's based).
    pub maxr2t: U32,
    /// Reserved.
    pub _rsvd: [u8; 112],
}

/// ICResp (hlen 128).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IcResp {
    /// Common header.
    pub ch: CommonHeader,
    /// PDU format version (0).
    pub pfv: U16,
    /// Controller PDU data alignment (0's based dwords).
    pub cpda: u8,
    /// Digests granted ([`digest`]).
    pub digest: u8,
    /// Largest H2CData PDU data the controller takes.
    pub maxh2cdata: U32,
    /// Reserved.
    pub _rsvd: [u8; 112],
}

/// CapsuleCmd header (hlen 72): the submission entry; in-capsule data
/// follows at `pdo`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CapsuleCmd {
    /// Common header.
    pub ch: CommonHeader,
    /// The command.
    pub sqe: SubmissionEntry,
}

/// CapsuleResp (hlen 24): the completion entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CapsuleResp {
    /// Common header.
    pub ch: CommonHeader,
    /// The completion.
    pub cqe: CompletionEntry,
}

/// H2CData and C2HData header (hlen 24).
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DataHeader {
    /// Common header.
    pub ch: CommonHeader,
    /// The command's identifier.
    pub cccid: U16,
    /// Transfer tag from the R2T (H2CData); reserved in C2HData.
    pub ttag: U16,
    /// Offset of this PDU's data in the command's data.
    pub datao: U32,
    /// Bytes of data in this PDU.
    pub datal: U32,
    /// Reserved.
    pub _rsvd: [u8; 4],
}

/// R2T (hlen 24): the controller asks for a part of a command's data.
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct R2t {
    /// Common header.
    pub ch: CommonHeader,
    /// The command's identifier.
    pub cccid: U16,
    /// Transfer tag to quote in the H2CData PDUs.
    pub ttag: U16,
    /// Offset of the requested data.
    pub r2to: U32,
    /// Bytes requested.
    pub r2tl: U32,
    /// Reserved.
    pub _rsvd: [u8; 4],
}

/// H2CTermReq / C2HTermReq header (hlen 24); the offending header follows
/// as data.
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TermReq {
    /// Common header.
    pub ch: CommonHeader,
    /// Fatal error status ([`fes`]).
    pub fes: U16,
    /// Fatal error information (the offending field's byte offset).
    pub fei: U32,
    /// Reserved.
    pub _rsvd: [u8; 10],
}

impl TermReq {
    /// A termination request of `pdu_type` (H2C or C2H) with status `fes`
    /// and no copy of the offending header.
    pub fn new(pdu_type: u8, fes: u16) -> TermReq {
        TermReq {
            ch: CommonHeader {
                pdu_type,
                flags: 0,
                hlen: 24,
                pdo: 0,
                plen: 24u32.into(),
            },
            fes: fes.into(),
            fei: 0.into(),
            _rsvd: [0; 10],
        }
    }
}

const _: () = {
    assert!(size_of::<CommonHeader>() == 8);
    assert!(size_of::<IcReq>() == 128);
    assert!(size_of::<IcResp>() == 128);
    assert!(size_of::<CapsuleCmd>() == 72);
    assert!(size_of::<CapsuleResp>() == 24);
    assert!(size_of::<DataHeader>() == 24);
    assert!(size_of::<R2t>() == 24);
    assert!(size_of::<TermReq>() == 24);
};

/// The header length each PDU type must have, or `None` for an unknown
/// type.
pub fn header_len(pdu_type: u8) -> Option<usize> {
    Some(match pdu_type {
        pdu_type::IC_REQ | pdu_type::IC_RESP => 128,
        pdu_type::CAPSULE_CMD => size_of::<CapsuleCmd>(),
        pdu_type::CAPSULE_RESP
        | pdu_type::H2C_DATA
        | pdu_type::C2H_DATA
        | pdu_type::R2T
        | pdu_type::H2C_TERM_REQ
        | pdu_type::C2H_TERM_REQ => 24,
        _ => return None,
    })
}

/// Why a PDU header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The type is not one the transport defines.
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    /// HLEN is not the type's header length.
    #[error("PDU type {pdu_type:#04x} with header length {hlen} (expected {expected})")]
    HeaderLength {
        /// The type.
        pdu_type: u8,
        /// HLEN as received.
        hlen: u8,
        /// What the type requires.
        expected: usize,
    },
    /// PLEN, PDO and the digests do not fit together.
    #[error(
        "PDU type {pdu_type:#04x}: PLEN {plen} and PDO {pdo} do not fit its header and digests"
    )]
    Length {
        /// The type.
        pdu_type: u8,
        /// PLEN as received.
        plen: u32,
        /// PDO as received.
        pdo: u8,
    },
    /// PLEN is over what this side accepts.
    #[error("PDU of {plen} bytes is larger than the {limit} this queue accepts")]
    TooLong {
        /// PLEN as received.
        plen: u32,
        /// The limit.
        limit: u32,
    },
    /// The header digest does not match.
    #[error("header digest mismatch on PDU type {0:#04x}")]
    HeaderDigest(u8),
    /// The data digest does not match.
    #[error("data digest mismatch on PDU type {0:#04x}")]
    DataDigest(u8),
}

impl PduError {
    /// The termination status a receiver sends for this error.
    pub fn fes(self) -> u16 {
        match self {
            PduError::HeaderDigest(_) => fes::HEADER_DIGEST,
            PduError::TooLong { .. } => fes::DATA_LIMIT_EXCEEDED,
            PduError::DataDigest(_) => fes::INVALID_HEADER_FIELD,
            _ => fes::INVALID_HEADER_FIELD,
        }
    }
}

/// Where a PDU's parts lie, from its checked common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Header length.
    pub hlen: usize,
    /// Whether a header digest follows the header.
    pub header_digest: bool,
    /// Offset of the data (0: no data).
    pub pdo: usize,
    /// Bytes of data.
    pub data_len: usize,
    /// Whether a data digest follows the data.
    pub data_digest: bool,
    /// Total length.
    pub plen: usize,
}

impl CommonHeader {
    /// Checks the header of a received PDU against its type's layout and
    /// the digests negotiated on the connection (`header_digest`,
    /// `data_digest`: ICReq and ICResp never carry digests), and says where
    /// its parts lie. `max_plen` bounds PLEN.
    pub fn check(
        &self,
        header_digest: bool,
        data_digest: bool,
        max_plen: u32,
    ) -> Result<Layout, PduError> {
        let t = self.pdu_type;
        let expected = header_len(t).ok_or(PduError::UnknownType(t))?;
        if usize::from(self.hlen) != expected {
            return Err(PduError::HeaderLength {
                pdu_type: t,
                hlen: self.hlen,
                expected,
            });
        }
        let plen = self.plen.get();
        if plen > max_plen {
            return Err(PduError::TooLong {
                plen,
                limit: max_plen,
            });
        }
        let bad_length = PduError::Length {
            pdu_type: t,
            plen,
            pdo: self.pdo,
        };
        let ic = matches!(t, pdu_type::IC_REQ | pdu_type::IC_RESP);
        // Termination requests carry no digests, whatever was negotiated:
        // the connection they end may be the one whose digests failed.
        let term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
        let hdgst = !ic && !term && header_digest;
        if !ic && !term && (self.flags & flags::HDGSTF != 0) != hdgst {
            return Err(bad_length);
        }
        let header_end = expected + if hdgst { DIGEST_LEN } else { 0 };
        let plen = plen as usize;
        let may_carry_data = matches!(
            t,
            pdu_type::CAPSULE_CMD
                | pdu_type::H2C_DATA
                | pdu_type::C2H_DATA
                | pdu_type::H2C_TERM_REQ
                | pdu_type::C2H_TERM_REQ
        );
        if plen == header_end && (self.pdo == 0 || !may_carry_data) {
            return Ok(Layout {
                hlen: expected,
                header_digest: hdgst,
                pdo: 0,
                data_len: 0,
                data_digest: false,
                plen,
            });
        }
        if !may_carry_data || plen < header_end {
            return Err(bad_length);
        }
        // Term requests carry the offending header raw, without digests or
        // a PDO of their own.
        let pdo = if term {
            header_end
        } else {
            usize::from(self.pdo)
        };
        let ddgst = !term && data_digest;
        if (!term && self.flags & flags::DDGSTF != 0) != ddgst {
            return Err(bad_length);
        }
        let tail = if ddgst { DIGEST_LEN } else { 0 };
        if pdo < header_end || pdo + tail > plen {
            return Err(bad_length);
        }
        let data_len = plen - pdo - tail;
        if data_len == 0 {
            return Err(bad_length);
        }
        Ok(Layout {
            hlen: expected,
            header_digest: hdgst,
            pdo,
            data_len,
            data_digest: ddgst,
            plen,
        })
    }
}

/// CRC32C of `bytes`, as the digests carry it (little-endian on the wire).
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// CRC32C continued over `bytes`.
#[inline]
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// The PDO for a PDU with data sent to a peer that asked for `pda`
/// (0's based dwords) alignment: the header, its digest, then padding.
pub fn data_offset(hlen: usize, header_digest: bool, pda: u8) -> usize {
    let end = hlen + if header_digest { DIGEST_LEN } else { 0 };
    let align = (usize::from(pda) + 1) * 4;
    end.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(pdu_type: u8, flags: u8, hlen: u8, pdo: u8, plen: u32) -> CommonHeader {
        CommonHeader {
            pdu_type,
            flags,
            hlen,
            pdo,
            plen: plen.into(),
        }
    }

    #[test]
    fn crc32c_matches_the_iscsi_check_value() {
        // RFC 3720 B.4: 32 bytes of zeroes.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(
            crc32c_append(crc32c(b"1234"), b"56789"),
            crc32c(b"123456789")
        );
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn layouts_of_well_formed_pdus() {
        let resp = ch(pdu_type::CAPSULE_RESP, 0, 24, 0, 24);
        let l = resp.check(false, false, 1 << 20).expect("valid");
        assert_eq!((l.pdo, l.data_len, l.plen), (0, 0, 24));
        let resp = ch(pdu_type::CAPSULE_RESP, flags::HDGSTF, 24, 0, 28);
        assert!(resp.check(true, false, 1 << 20).is_ok());
        let c2h = ch(
            pdu_type::C2H_DATA,
            flags::HDGSTF | flags::DDGSTF | flags::LAST_PDU,
            24,
            28,
            28 + 4096 + 4,
        );
        let l = c2h.check(true, true, 1 << 20).expect("valid");
        assert_eq!((l.pdo, l.data_len), (28, 4096));
        assert!(l.header_digest && l.data_digest);
        let cmd = ch(pdu_type::CAPSULE_CMD, 0, 72, 72, 72 + 1024);
        assert_eq!(
            cmd.check(false, false, 1 << 20).expect("valid").data_len,
            1024
        );
        let ic = ch(pdu_type::IC_RESP, 0, 128, 0, 128);
        assert!(ic.check(true, true, 1 << 20).is_ok());
        // A termination request has no digest even where digests are on.
        let term = ch(pdu_type::C2H_TERM_REQ, 0, 24, 0, 24);
        assert_eq!(term.check(true, true, 1 << 20).expect("valid").plen, 24);
        let term = ch(pdu_type::C2H_TERM_REQ, 0, 24, 0, 24 + 72);
        assert_eq!(term.check(true, true, 1 << 20).expect("valid").data_len, 72);
    }

    #[test]
    fn malformed_headers_are_refused_by_name() {
        assert_eq!(
            ch(0x42, 0, 24, 0, 24).check(false, false, 1 << 20),
            Err(PduError::UnknownType(0x42))
        );
        assert!(matches!(
            ch(pdu_type::CAPSULE_RESP, 0, 20, 0, 24).check(false, false, 1 << 20),
            Err(PduError::HeaderLength { .. })
        ));
        // PLEN shorter than the header.
        assert!(matches!(
            ch(pdu_type::C2H_DATA, 0, 24, 24, 16).check(false, false, 1 << 20),
            Err(PduError::Length { .. })
        ));
        // PDO inside the header.
        assert!(matches!(
            ch(pdu_type::C2H_DATA, 0, 24, 8, 4096).check(false, false, 1 << 20),
            Err(PduError::Length { .. })
        ));
        // A response with data.
        assert!(matches!(
            ch(pdu_type::CAPSULE_RESP, 0, 24, 24, 64).check(false, false, 1 << 20),
            Err(PduError::Length { .. })
        ));
        // Digest flag not as negotiated.
        assert!(matches!(
            ch(pdu_type::CAPSULE_RESP, 0, 24, 0, 24).check(true, false, 1 << 20),
            Err(PduError::Length { .. })
        ));
        assert!(matches!(
            ch(pdu_type::C2H_DATA, 0, 24, 24, u32::MAX).check(false, false, 1 << 20),
            Err(PduError::TooLong { .. })
        ));
    }

    #[test]
    fn data_offsets_honour_the_peers_alignment() {
        assert_eq!(data_offset(72, false, 0), 72);
        assert_eq!(data_offset(72, true, 0), 76);
        assert_eq!(data_offset(24, true, 7), 32);
        assert_eq!(data_offset(24, false, 31), 128);
    }
}
