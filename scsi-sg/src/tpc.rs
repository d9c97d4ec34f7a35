//! Third-party copy wire formats (SPC-4 6.4, SBC-3 5.x): EXTENDED COPY(LID1)
//! parameter lists with identification CSCD descriptors (0xE4, NAA) and
//! block-to-block segment descriptors (0x02), RECEIVE COPY OPERATING
//! PARAMETERS, RECEIVE COPY STATUS(LID1), and the ROD-token commands
//! POPULATE TOKEN, WRITE USING TOKEN and RECEIVE ROD TOKEN INFORMATION.
//!
//! Layouts checked against Linux `target_core_xcopy.c` (what LIO accepts)
//! and FreeBSD `ctl_tpc.c`. Each format has a builder (what an initiator
//! sends, or a target returns) and a length-checked parser.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ParseError;
use crate::sense::Sense;

/// CSCD descriptor type code: identification descriptor.
pub const CSCD_IDENTIFICATION: u8 = 0xe4;
/// Segment descriptor type code: block device to block device.
pub const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
/// Length of an identification CSCD descriptor.
pub const CSCD_LEN: usize = 32;
/// Length of a block-to-block segment descriptor.
pub const SEGMENT_LEN: usize = 28;
/// Length of the EXTENDED COPY(LID1) parameter list header.
pub const XCOPY_HEADER_LEN: usize = 16;

/// EXTENDED COPY(LID1) parameter list header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XcopyHeaderWire {
    /// LIST IDENTIFIER.
    pub list_id: u8,
    /// STR (5), LIST ID USAGE (4..3), PRIORITY (2..0).
    pub flags: u8,
    /// CSCD DESCRIPTOR LIST LENGTH.
    pub cscd_list_length: U16,
    /// Reserved.
    pub _rsvd4: [u8; 4],
    /// SEGMENT DESCRIPTOR LIST LENGTH.
    pub segment_list_length: U32,
    /// INLINE DATA LENGTH.
    pub inline_data_length: U32,
}

/// Identification CSCD descriptor (0xE4), NAA designator of a block device.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CscdIdWire {
    /// DESCRIPTOR TYPE CODE (0xE4).
    pub descriptor_type: u8,
    /// LU ID TYPE (7..6), NUL (5), PERIPHERAL DEVICE TYPE (4..0).
    pub byte1: u8,
    /// RELATIVE INITIATOR PORT IDENTIFIER.
    pub relative_initiator_port: U16,
    /// CODE SET.
    pub code_set: u8,
    /// ASSOCIATION (5..4), DESIGNATOR TYPE (3..0).
    pub designator_type: u8,
    /// Reserved.
    pub _rsvd6: u8,
    /// DESIGNATOR LENGTH.
    pub designator_length: u8,
    /// DESIGNATOR (20 bytes, zero padded).
    pub designator: [u8; 20],
    /// Device type specific parameters: PAD (2), FIXED (0).
    pub byte28: u8,
    /// DISK BLOCK LENGTH (24 bits).
    pub disk_block_length: [u8; 3],
}

/// Block-to-block segment descriptor (0x02).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentB2bWire {
    /// DESCRIPTOR TYPE CODE (0x02).
    pub descriptor_type: u8,
    /// DC (1), CAT (0).
    pub byte1: u8,
    /// DESCRIPTOR LENGTH (0x0018).
    pub descriptor_length: U16,
    /// SOURCE CSCD DESCRIPTOR ID.
    pub source_index: U16,
    /// DESTINATION CSCD DESCRIPTOR ID.
    pub destination_index: U16,
    /// Reserved.
    pub _rsvd8: [u8; 2],
    /// BLOCK DEVICE NUMBER OF BLOCKS.
    pub blocks: U16,
    /// SOURCE BLOCK DEVICE LOGICAL BLOCK ADDRESS.
    pub source_lba: U64,
    /// DESTINATION BLOCK DEVICE LOGICAL BLOCK ADDRESS.
    pub destination_lba: U64,
}

const _: () = {
    assert!(size_of::<XcopyHeaderWire>() == XCOPY_HEADER_LEN);
    assert!(std::mem::offset_of!(XcopyHeaderWire, segment_list_length) == 8);
    assert!(size_of::<CscdIdWire>() == CSCD_LEN);
    assert!(std::mem::offset_of!(CscdIdWire, designator) == 8);
    assert!(std::mem::offset_of!(CscdIdWire, byte28) == 28);
    assert!(size_of::<SegmentB2bWire>() == SEGMENT_LEN);
    assert!(std::mem::offset_of!(SegmentB2bWire, blocks) == 10);
    assert!(std::mem::offset_of!(SegmentB2bWire, source_lba) == 12);
    assert!(std::mem::offset_of!(SegmentB2bWire, destination_lba) == 20);
};

/// A copy target named by its NAA designator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CscdId {
    /// The NAA designator (8 or 16 bytes; LIO accepts only 16).
    pub naa: Vec<u8>,
    /// Logical block length of the device.
    pub block_len: u32,
}

/// One block-to-block segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index of the source CSCD descriptor.
    pub source: u16,
    /// Index of the destination CSCD descriptor.
    pub destination: u16,
    /// Blocks to copy (in the source's block size).
    pub blocks: u16,
    /// First source LBA.
    pub source_lba: u64,
    /// First destination LBA.
    pub destination_lba: u64,
}

/// An EXTENDED COPY(LID1) parameter list of identification CSCDs and
/// block-to-block segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtendedCopy {
    /// LIST IDENTIFIER (ignored when `no_list_id`).
    pub list_id: u8,
    /// LIST ID USAGE 11b: no list identifier, status not held.
    pub no_list_id: bool,
    /// Copy targets.
    pub cscds: Vec<CscdId>,
    /// Segments.
    pub segments: Vec<Segment>,
}

impl ExtendedCopy {
    /// The parameter list bytes. `None` if a field does not fit its wire
    /// width (designator over 20 bytes, block length over 24 bits, lists
    /// over 64 KiB).
    pub fn to_bytes(&self) -> Option<Vec<u8>> {
        let cscd_len = u16::try_from(self.cscds.len().checked_mul(CSCD_LEN)?).ok()?;
        let seg_len = u32::try_from(self.segments.len().checked_mul(SEGMENT_LEN)?).ok()?;
        let hdr = XcopyHeaderWire {
            list_id: self.list_id,
            flags: if self.no_list_id { 0x18 } else { 0 },
            cscd_list_length: U16::new(cscd_len),
            _rsvd4: [0; 4],
            segment_list_length: U32::new(seg_len),
            inline_data_length: U32::new(0),
        };
        let mut v = hdr.as_bytes().to_vec();
        for c in &self.cscds {
            if c.naa.len() > 20 || c.block_len > 0x00ff_ffff {
                return None;
            }
            let mut designator = [0u8; 20];
            designator.get_mut(..c.naa.len())?.copy_from_slice(&c.naa);
            let [_, b1, b2, b3] = c.block_len.to_be_bytes();
            let w = CscdIdWire {
                descriptor_type: CSCD_IDENTIFICATION,
                byte1: 0x00, // LU ID TYPE 0, NUL 0, PDT 0 (direct access)
                relative_initiator_port: U16::new(0),
                code_set: 0x01,
                designator_type: 0x03, // association LU, NAA
                _rsvd6: 0,
                designator_length: u8::try_from(c.naa.len()).ok()?,
                designator,
                byte28: 0,
                disk_block_length: [b1, b2, b3],
            };
            v.extend_from_slice(w.as_bytes());
        }
        for s in &self.segments {
            let w = SegmentB2bWire {
                descriptor_type: SEGMENT_BLOCK_TO_BLOCK,
                byte1: 0,
                descriptor_length: U16::new(0x18),
                source_index: U16::new(s.source),
                destination_index: U16::new(s.destination),
                _rsvd8: [0; 2],
                blocks: U16::new(s.blocks),
                source_lba: U64::new(s.source_lba),
                destination_lba: U64::new(s.destination_lba),
            };
            v.extend_from_slice(w.as_bytes());
        }
        Some(v)
    }

    /// Parse a parameter list (what a copy manager receives). Unsupported
    /// descriptor types are [`XcopyParseError`]s that say which sense a
    /// target should return.
    pub fn parse(bytes: &[u8]) -> Result<ExtendedCopy, XcopyParseError> {
        let (h, rest) =
            XcopyHeaderWire::ref_from_prefix(bytes).map_err(|_| XcopyParseError::Truncated)?;
        let cscd_len = usize::from(h.cscd_list_length.get());
        let seg_len =
            usize::try_from(h.segment_list_length.get()).map_err(|_| XcopyParseError::Truncated)?;
        if h.inline_data_length.get() != 0 {
            return Err(XcopyParseError::InlineData);
        }
        let cscd_bytes = rest.get(..cscd_len).ok_or(XcopyParseError::Truncated)?;
        let seg_bytes = rest
            .get(cscd_len..cscd_len.saturating_add(seg_len))
            .ok_or(XcopyParseError::Truncated)?;
        if !cscd_len.is_multiple_of(CSCD_LEN) {
            return Err(XcopyParseError::BadCscdListLength);
        }
        let mut cscds = Vec::new();
        for (i, d) in cscd_bytes.chunks_exact(CSCD_LEN).enumerate() {
            let w = CscdIdWire::read_from_bytes(d).map_err(|_| XcopyParseError::Truncated)?;
            if w.descriptor_type != CSCD_IDENTIFICATION {
                return Err(XcopyParseError::UnsupportedCscd {
                    index: i,
                    code: w.descriptor_type,
                });
            }
            let len = usize::from(w.designator_length);
            if w.designator_type & 0x0f != 0x03 || w.code_set & 0x0f != 1 || len > 20 {
                return Err(XcopyParseError::BadDesignator { index: i });
            }
            let [b1, b2, b3] = w.disk_block_length;
            cscds.push(CscdId {
                naa: w.designator.get(..len).unwrap_or(&[]).to_vec(),
                block_len: u32::from_be_bytes([0, b1, b2, b3]),
            });
        }
        let mut segments = Vec::new();
        let mut rest = seg_bytes;
        let mut index = 0;
        while !rest.is_empty() {
            let code = rest.first().copied().unwrap_or(0);
            if code != SEGMENT_BLOCK_TO_BLOCK {
                return Err(XcopyParseError::UnsupportedSegment { index, code });
            }
            let (w, tail) =
                SegmentB2bWire::read_from_prefix(rest).map_err(|_| XcopyParseError::Truncated)?;
            if w.descriptor_length.get() != 0x18 {
                return Err(XcopyParseError::BadSegmentLength { index });
            }
            segments.push(Segment {
                source: w.source_index.get(),
                destination: w.destination_index.get(),
                blocks: w.blocks.get(),
                source_lba: w.source_lba.get(),
                destination_lba: w.destination_lba.get(),
            });
            rest = tail;
            index += 1;
        }
        Ok(ExtendedCopy {
            list_id: h.list_id,
            no_list_id: (h.flags >> 3) & 0x03 == 0x03,
            cscds,
            segments,
        })
    }
}

/// Why an EXTENDED COPY parameter list was refused (target side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XcopyParseError {
    /// Lists longer than the parameter data.
    #[error("parameter list truncated")]
    Truncated,
    /// CSCD list length not a multiple of 32.
    #[error("CSCD descriptor list length not a multiple of 32")]
    BadCscdListLength,
    /// Inline data is not supported.
    #[error("inline data not supported")]
    InlineData,
    /// A CSCD descriptor type other than 0xE4.
    #[error("CSCD descriptor {index}: unsupported type {code:#04x}")]
    UnsupportedCscd {
        /// Index of the descriptor.
        index: usize,
        /// Its type code.
        code: u8,
    },
    /// An identification descriptor that is not a binary NAA.
    #[error("CSCD descriptor {index}: not a binary NAA designator")]
    BadDesignator {
        /// Index of the descriptor.
        index: usize,
    },
    /// A segment type other than block-to-block.
    #[error("segment descriptor {index}: unsupported type {code:#04x}")]
    UnsupportedSegment {
        /// Index of the segment.
        index: usize,
        /// Its type code.
        code: u8,
    },
    /// A block-to-block segment whose DESCRIPTOR LENGTH is not 0x18.
    #[error("segment descriptor {index}: bad descriptor length")]
    BadSegmentLength {
        /// Index of the segment.
        index: usize,
    },
}

/// RECEIVE COPY OPERATING PARAMETERS response (SPC-4 6.18.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOperatingParameters {
    /// SNLID: supports "no list identifier".
    pub snlid: bool,
    /// MAXIMUM CSCD DESCRIPTOR COUNT.
    pub max_cscd_descriptors: u16,
    /// MAXIMUM SEGMENT DESCRIPTOR COUNT.
    pub max_segment_descriptors: u16,
    /// MAXIMUM DESCRIPTOR LIST LENGTH (bytes).
    pub max_descriptor_list_length: u32,
    /// MAXIMUM SEGMENT LENGTH (bytes).
    pub max_segment_length: u32,
    /// MAXIMUM INLINE DATA LENGTH.
    pub max_inline_data_length: u32,
    /// HELD DATA LIMIT.
    pub held_data_limit: u32,
    /// MAXIMUM STREAM DEVICE TRANSFER SIZE.
    pub max_stream_transfer: u32,
    /// TOTAL CONCURRENT COPIES.
    pub total_concurrent_copies: u16,
    /// MAXIMUM CONCURRENT COPIES.
    pub max_concurrent_copies: u8,
    /// DATA SEGMENT GRANULARITY (log2).
    pub data_segment_granularity_log2: u8,
    /// INLINE DATA GRANULARITY (log2).
    pub inline_data_granularity_log2: u8,
    /// HELD DATA GRANULARITY (log2).
    pub held_data_granularity_log2: u8,
    /// The implemented descriptor type codes.
    pub descriptor_codes: Vec<u8>,
}

/// Fixed part of the RCOP response (44 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RcopWire {
    /// AVAILABLE DATA (n - 3).
    pub available_data: U32,
    /// SNLID (bit 0).
    pub byte4: u8,
    /// Reserved.
    pub _rsvd5: [u8; 3],
    /// MAXIMUM CSCD DESCRIPTOR COUNT.
    pub max_cscd: U16,
    /// MAXIMUM SEGMENT DESCRIPTOR COUNT.
    pub max_segments: U16,
    /// MAXIMUM DESCRIPTOR LIST LENGTH.
    pub max_list_length: U32,
    /// MAXIMUM SEGMENT LENGTH.
    pub max_segment_length: U32,
    /// MAXIMUM INLINE DATA LENGTH.
    pub max_inline: U32,
    /// HELD DATA LIMIT.
    pub held_data_limit: U32,
    /// MAXIMUM STREAM DEVICE TRANSFER SIZE.
    pub max_stream: U32,
    /// Reserved.
    pub _rsvd32: [u8; 2],
    /// TOTAL CONCURRENT COPIES.
    pub total_concurrent: U16,
    /// MAXIMUM CONCURRENT COPIES.
    pub max_concurrent: u8,
    /// DATA SEGMENT GRANULARITY.
    pub data_gran: u8,
    /// INLINE DATA GRANULARITY.
    pub inline_gran: u8,
    /// HELD DATA GRANULARITY.
    pub held_gran: u8,
    /// Reserved.
    pub _rsvd40: [u8; 3],
    /// IMPLEMENTED DESCRIPTOR LIST LENGTH.
    pub implemented_length: u8,
}

const _: () = {
    assert!(size_of::<RcopWire>() == 44);
    assert!(std::mem::offset_of!(RcopWire, max_cscd) == 8);
    assert!(std::mem::offset_of!(RcopWire, max_segment_length) == 16);
    assert!(std::mem::offset_of!(RcopWire, total_concurrent) == 34);
    assert!(std::mem::offset_of!(RcopWire, max_concurrent) == 36);
    assert!(std::mem::offset_of!(RcopWire, implemented_length) == 43);
};

impl CopyOperatingParameters {
    /// LIO 6.1's copy manager (target_core_xcopy.c): 2 CSCDs, 1 segment,
    /// 1024-byte list, 256 MiB segments, codes 0x02 and 0xE4.
    pub fn lio() -> CopyOperatingParameters {
        CopyOperatingParameters {
            snlid: true,
            max_cscd_descriptors: 2,
            max_segment_descriptors: 1,
            max_descriptor_list_length: 1024,
            max_segment_length: 256 << 20,
            max_inline_data_length: 0,
            held_data_limit: 0,
            max_stream_transfer: 0,
            total_concurrent_copies: 1,
            max_concurrent_copies: 1,
            data_segment_granularity_log2: 9,
            inline_data_granularity_log2: 9,
            held_data_granularity_log2: 9,
            descriptor_codes: vec![SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION],
        }
    }

    /// Parse the response.
    pub fn parse(bytes: &[u8]) -> Result<CopyOperatingParameters, ParseError> {
        const WHAT: &str = "copy operating parameters";
        let (w, rest) = RcopWire::ref_from_prefix(bytes).map_err(|_| ParseError::Truncated {
            what: WHAT,
            needed: 44,
            available: bytes.len(),
        })?;
        let n = usize::from(w.implemented_length);
        let codes = rest.get(..n).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 44 + n,
            available: bytes.len(),
        })?;
        Ok(CopyOperatingParameters {
            snlid: w.byte4 & 1 != 0,
            max_cscd_descriptors: w.max_cscd.get(),
            max_segment_descriptors: w.max_segments.get(),
            max_descriptor_list_length: w.max_list_length.get(),
            max_segment_length: w.max_segment_length.get(),
            max_inline_data_length: w.max_inline.get(),
            held_data_limit: w.held_data_limit.get(),
            max_stream_transfer: w.max_stream.get(),
            total_concurrent_copies: w.total_concurrent.get(),
            max_concurrent_copies: w.max_concurrent,
            data_segment_granularity_log2: w.data_gran,
            inline_data_granularity_log2: w.inline_gran,
            held_data_granularity_log2: w.held_gran,
            descriptor_codes: codes.to_vec(),
        })
    }

    /// The response bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = u8::try_from(self.descriptor_codes.len()).unwrap_or(u8::MAX);
        let w = RcopWire {
            available_data: U32::new(40 + u32::from(n)),
            byte4: u8::from(self.snlid),
            _rsvd5: [0; 3],
            max_cscd: U16::new(self.max_cscd_descriptors),
            max_segments: U16::new(self.max_segment_descriptors),
            max_list_length: U32::new(self.max_descriptor_list_length),
            max_segment_length: U32::new(self.max_segment_length),
            max_inline: U32::new(self.max_inline_data_length),
            held_data_limit: U32::new(self.held_data_limit),
            max_stream: U32::new(self.max_stream_transfer),
            _rsvd32: [0; 2],
            total_concurrent: U16::new(self.total_concurrent_copies),
            max_concurrent: self.max_concurrent_copies,
            data_gran: self.data_segment_granularity_log2,
            inline_gran: self.inline_data_granularity_log2,
            held_gran: self.held_data_granularity_log2,
            _rsvd40: [0; 3],
            implemented_length: n,
        };
        let mut v = w.as_bytes().to_vec();
        v.extend_from_slice(self.descriptor_codes.get(..usize::from(n)).unwrap_or(&[]));
        v
    }

    /// Whether both descriptor codes a block-to-block NAA copy needs are
    /// implemented.
    pub fn supports_block_to_block_naa(&self) -> bool {
        self.descriptor_codes.contains(&SEGMENT_BLOCK_TO_BLOCK)
            && self.descriptor_codes.contains(&CSCD_IDENTIFICATION)
    }
}

/// RECEIVE COPY STATUS(LID1) response (SPC-4 6.18.2): 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyStatusLid1 {
    /// HDD: held data discarded.
    pub held_data_discarded: bool,
    /// COPY MANAGER STATUS: 0 in progress, 1 done OK, 2 done with error.
    pub status: u8,
    /// SEGMENTS PROCESSED.
    pub segments_processed: u16,
    /// TRANSFER COUNT UNITS (0 bytes, 1 KiB, 2 MiB, ...).
    pub transfer_count_units: u8,
    /// TRANSFER COUNT.
    pub transfer_count: u32,
}

impl CopyStatusLid1 {
    /// Parse the response.
    pub fn parse(bytes: &[u8]) -> Result<CopyStatusLid1, ParseError> {
        let b: [u8; 12] =
            bytes
                .get(..12)
                .and_then(|b| b.try_into().ok())
                .ok_or(ParseError::Truncated {
                    what: "copy status (LID1)",
                    needed: 12,
                    available: bytes.len(),
                })?;
        Ok(CopyStatusLid1 {
            held_data_discarded: b[4] & 0x80 != 0,
            status: b[4] & 0x7f,
            segments_processed: u16::from_be_bytes([b[5], b[6]]),
            transfer_count_units: b[7],
            transfer_count: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    /// The response bytes.
    pub fn to_bytes(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[3] = 8;
        b[4] = (u8::from(self.held_data_discarded) << 7) | (self.status & 0x7f);
        b[5..7].copy_from_slice(&self.segments_processed.to_be_bytes());
        b[7] = self.transfer_count_units;
        b[8..12].copy_from_slice(&self.transfer_count.to_be_bytes());
        b
    }
}

/// Length of a ROD token.
pub const ROD_TOKEN_LEN: usize = 512;
/// ROD type: access upon reference.
pub const ROD_TYPE_ACCESS_UPON_REFERENCE: u32 = 0x0001_0000;
/// ROD type: point in time copy, default.
pub const ROD_TYPE_PIT_DEFAULT: u32 = 0x0080_0000;
/// ROD type: block device zero ROD.
pub const ROD_TYPE_BLOCK_ZERO: u32 = 0xffff_0001;

/// A 512-byte ROD token as the copy manager made it: opaque apart from its
/// ROD TYPE (bytes 0..4) and ROD TOKEN LENGTH (6..8, 0x01F8).
#[derive(Clone, PartialEq, Eq)]
pub struct RodToken(pub [u8; ROD_TOKEN_LEN]);

impl std::fmt::Debug for RodToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RodToken(type {:#010x})", self.rod_type())
    }
}

impl RodToken {
    /// Parse and check a token: 512 bytes with ROD TOKEN LENGTH 0x01F8.
    pub fn parse(bytes: &[u8]) -> Result<RodToken, ParseError> {
        let b: [u8; ROD_TOKEN_LEN] = bytes
            .get(..ROD_TOKEN_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(ParseError::Truncated {
                what: "ROD token",
                needed: ROD_TOKEN_LEN,
                available: bytes.len(),
            })?;
        if u16::from_be_bytes([b[6], b[7]]) != 0x01f8 {
            return Err(ParseError::Invalid {
                what: "ROD token",
                reason: "ROD TOKEN LENGTH is not 0x01F8",
            });
        }
        Ok(RodToken(b))
    }

    /// ROD TYPE.
    pub fn rod_type(&self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

/// A block device range descriptor (SBC-3): LBA and block count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// First LBA.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u32,
}

fn push_ranges(v: &mut Vec<u8>, ranges: &[BlockRange]) {
    for r in ranges {
        v.extend_from_slice(&r.lba.to_be_bytes());
        v.extend_from_slice(&r.blocks.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
}

fn parse_ranges(
    bytes: &[u8],
    at: usize,
    list_len: usize,
    what: &'static str,
) -> Result<Vec<BlockRange>, ParseError> {
    if !list_len.is_multiple_of(16) {
        return Err(ParseError::Invalid {
            what,
            reason: "range descriptor list length not a multiple of 16",
        });
    }
    let list = bytes
        .get(at..at.saturating_add(list_len))
        .ok_or(ParseError::Truncated {
            what,
            needed: at.saturating_add(list_len),
            available: bytes.len(),
        })?;
    Ok(list
        .chunks_exact(16)
        .map(|d| BlockRange {
            lba: u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]),
            blocks: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
        })
        .collect())
}

/// POPULATE TOKEN parameter data (SBC-3 5.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopulateToken {
    /// IMMED.
    pub immed: bool,
    /// ROD TYPE, when RTV is set; `None` lets the copy manager choose.
    pub rod_type: Option<u32>,
    /// INACTIVITY TIMEOUT in seconds (0: the default).
    pub inactivity_timeout: u32,
    /// The source ranges.
    pub ranges: Vec<BlockRange>,
}

impl PopulateToken {
    /// The parameter data bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let list_len = self.ranges.len() * 16;
        let mut v = vec![0u8; 16];
        let data_len = u16::try_from(14 + list_len).unwrap_or(u16::MAX);
        v[0..2].copy_from_slice(&data_len.to_be_bytes());
        v[2] = u8::from(self.immed) | if self.rod_type.is_some() { 0x02 } else { 0 };
        v[4..8].copy_from_slice(&self.inactivity_timeout.to_be_bytes());
        v[8..12].copy_from_slice(&self.rod_type.unwrap_or(0).to_be_bytes());
        v[14..16].copy_from_slice(&u16::try_from(list_len).unwrap_or(u16::MAX).to_be_bytes());
        push_ranges(&mut v, &self.ranges);
        v
    }

    /// Parse parameter data.
    pub fn parse(bytes: &[u8]) -> Result<PopulateToken, ParseError> {
        const WHAT: &str = "POPULATE TOKEN parameters";
        let h = bytes.get(..16).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 16,
            available: bytes.len(),
        })?;
        let list_len = usize::from(u16::from_be_bytes([h[14], h[15]]));
        Ok(PopulateToken {
            immed: h[2] & 0x01 != 0,
            rod_type: (h[2] & 0x02 != 0).then(|| u32::from_be_bytes([h[8], h[9], h[10], h[11]])),
            inactivity_timeout: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            ranges: parse_ranges(bytes, 16, list_len, WHAT)?,
        })
    }
}

/// WRITE USING TOKEN parameter data (SBC-3 5.48).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteUsingToken {
    /// IMMED.
    pub immed: bool,
    /// DEL_TKN: the token may be deleted once this command is done.
    pub del_tkn: bool,
    /// OFFSET INTO ROD, in blocks.
    pub offset_into_rod: u64,
    /// The token.
    pub token: RodToken,
    /// The destination ranges.
    pub ranges: Vec<BlockRange>,
}

impl WriteUsingToken {
    /// The parameter data bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let list_len = self.ranges.len() * 16;
        let mut v = vec![0u8; 536];
        let data_len = u16::try_from(534 + list_len).unwrap_or(u16::MAX);
        v[0..2].copy_from_slice(&data_len.to_be_bytes());
        v[2] = u8::from(self.immed) | if self.del_tkn { 0x02 } else { 0 };
        v[8..16].copy_from_slice(&self.offset_into_rod.to_be_bytes());
        v[16..528].copy_from_slice(&self.token.0);
        v[534..536].copy_from_slice(&u16::try_from(list_len).unwrap_or(u16::MAX).to_be_bytes());
        push_ranges(&mut v, &self.ranges);
        v
    }

    /// Parse parameter data.
    pub fn parse(bytes: &[u8]) -> Result<WriteUsingToken, ParseError> {
        const WHAT: &str = "WRITE USING TOKEN parameters";
        let h = bytes.get(..536).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 536,
            available: bytes.len(),
        })?;
        let mut off = [0u8; 8];
        off.copy_from_slice(&h[8..16]);
        let list_len = usize::from(u16::from_be_bytes([h[534], h[535]]));
        Ok(WriteUsingToken {
            immed: h[2] & 0x01 != 0,
            del_tkn: h[2] & 0x02 != 0,
            offset_into_rod: u64::from_be_bytes(off),
            token: RodToken::parse(&h[16..528])?,
            ranges: parse_ranges(bytes, 536, list_len, WHAT)?,
        })
    }
}

/// TRANSFER COUNT UNITS of RECEIVE ROD TOKEN INFORMATION: logical blocks
/// (SPC-4 table "TRANSFER COUNT UNITS field"; FreeBSD CTL answers in it).
pub const TRANSFER_COUNT_UNITS_BLOCKS: u8 = 0xf1;

/// COPY OPERATION STATUS: the operation completed without errors.
pub const COPY_STATUS_COMPLETED: u8 = 0x01;

/// COPY OPERATION STATUS: the operation completed with residual data
/// (fewer blocks moved or represented than the ranges asked for).
pub const COPY_STATUS_COMPLETED_WITH_RESIDUAL: u8 = 0x03;

/// RECEIVE ROD TOKEN INFORMATION response (SPC-4 6.18.7, SBC-3 table for
/// POPULATE TOKEN / WRITE USING TOKEN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RodTokenInformation {
    /// RESPONSE TO SERVICE ACTION (0x10 or 0x11).
    pub response_to_service_action: u8,
    /// COPY OPERATION STATUS: 0x01 completed OK, 0x02 completed with
    /// error, 0x03 completed with residual, 0x10/0x11 in progress, 0x60
    /// terminated.
    pub copy_operation_status: u8,
    /// OPERATION COUNTER.
    pub operation_counter: u16,
    /// EXTENDED COPY COMPLETION STATUS (a SCSI status byte).
    pub completion_status: u8,
    /// TRANSFER COUNT UNITS (0xF1: blocks).
    pub transfer_count_units: u8,
    /// TRANSFER COUNT.
    pub transfer_count: u64,
    /// SEGMENTS PROCESSED.
    pub segments_processed: u16,
    /// Sense data, when the copy failed and the copy manager kept it.
    pub sense: Option<Sense>,
    /// The ROD token (after POPULATE TOKEN).
    pub token: Option<RodToken>,
}

impl RodTokenInformation {
    /// The TRANSFER COUNT in logical blocks, when the copy manager counted
    /// in blocks; `None` for any other unit (bytes, KiB, ...), which a
    /// caller must not convert by guessing.
    pub fn transfer_count_blocks(&self) -> Option<u64> {
        (self.transfer_count_units == TRANSFER_COUNT_UNITS_BLOCKS).then_some(self.transfer_count)
    }

    /// Whether COPY OPERATION STATUS says the command finished (with or
    /// without residual data) rather than failed, was aborted or is still
    /// running.
    pub fn completed(&self) -> bool {
        matches!(
            self.copy_operation_status,
            COPY_STATUS_COMPLETED | COPY_STATUS_COMPLETED_WITH_RESIDUAL
        )
    }

    /// Parse the response.
    pub fn parse(bytes: &[u8]) -> Result<RodTokenInformation, ParseError> {
        const WHAT: &str = "ROD token information";
        let h = bytes.get(..32).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 32,
            available: bytes.len(),
        })?;
        let available = usize::try_from(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
            .unwrap_or(usize::MAX)
            .saturating_add(4);
        let data = bytes.get(..available.min(bytes.len())).unwrap_or(bytes);
        let sense_len = usize::from(h[13]);
        let sense_bytes = data.get(32..32 + sense_len).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 32 + sense_len,
            available: data.len(),
        })?;
        let sense = if sense_len == 0 {
            None
        } else {
            Some(Sense::parse(sense_bytes)?)
        };
        let at = 32 + sense_len;
        let token = match data.get(at..at + 4) {
            None => None,
            Some(l) => {
                let len = usize::try_from(u32::from_be_bytes([l[0], l[1], l[2], l[3]]))
                    .unwrap_or(usize::MAX);
                if len == 0 {
                    None
                } else {
                    // 2 reserved bytes, then the token.
                    let t = data.get(at + 6..).ok_or(ParseError::Truncated {
                        what: WHAT,
                        needed: at + 6 + ROD_TOKEN_LEN,
                        available: data.len(),
                    })?;
                    Some(RodToken::parse(t)?)
                }
            }
        };
        let mut tc = [0u8; 8];
        tc.copy_from_slice(&h[16..24]);
        Ok(RodTokenInformation {
            response_to_service_action: h[4] & 0x1f,
            copy_operation_status: h[5] & 0x7f,
            operation_counter: u16::from_be_bytes([h[6], h[7]]),
            completion_status: h[12],
            transfer_count_units: h[15],
            transfer_count: u64::from_be_bytes(tc),
            segments_processed: u16::from_be_bytes([h[24], h[25]]),
            sense,
            token,
        })
    }

    /// The response bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; 32];
        v[4] = self.response_to_service_action & 0x1f;
        v[5] = self.copy_operation_status & 0x7f;
        v[6..8].copy_from_slice(&self.operation_counter.to_be_bytes());
        v[12] = self.completion_status;
        v[15] = self.transfer_count_units;
        v[16..24].copy_from_slice(&self.transfer_count.to_be_bytes());
        v[24..26].copy_from_slice(&self.segments_processed.to_be_bytes());
        if let Some(s) = &self.sense {
            let fixed = s.to_fixed();
            v[13] = 18;
            v[14] = 18;
            v.extend_from_slice(&fixed);
        }
        match &self.token {
            Some(t) => {
                v.extend_from_slice(&(2 + ROD_TOKEN_LEN as u32).to_be_bytes());
                v.extend_from_slice(&[0, 0]);
                v.extend_from_slice(&t.0);
            }
            None => v.extend_from_slice(&[0; 4]),
        }
        let avail = u32::try_from(v.len() - 4).unwrap_or(u32::MAX);
        v[0..4].copy_from_slice(&avail.to_be_bytes());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::SenseKey;

    fn naa(tag: u8) -> Vec<u8> {
        let mut v = vec![0x60, 0x01, 0x40, 0x5f, 0x12, 0x34, 0x56, 0x78];
        v.extend_from_slice(&[tag; 8]);
        v
    }

    #[test]
    fn xcopy_layout_matches_lio() {
        let x = ExtendedCopy {
            list_id: 0,
            no_list_id: true,
            cscds: vec![
                CscdId {
                    naa: naa(1),
                    block_len: 512,
                },
                CscdId {
                    naa: naa(2),
                    block_len: 512,
                },
            ],
            segments: vec![Segment {
                source: 0,
                destination: 1,
                blocks: 128,
                source_lba: 0x1000,
                destination_lba: 0x2000,
            }],
        };
        let b = x.to_bytes().unwrap();
        assert_eq!(b.len(), 16 + 64 + 28);
        assert_eq!(b[1], 0x18);
        assert_eq!(&b[2..4], &[0, 64]);
        assert_eq!(&b[8..12], &[0, 0, 0, 28]);
        // first CSCD
        assert_eq!(b[16], 0xe4);
        assert_eq!(b[20], 0x01);
        assert_eq!(b[21], 0x03);
        assert_eq!(b[23], 16);
        assert_eq!(&b[24..40], naa(1).as_slice());
        assert_eq!(&b[45..48], &[0, 2, 0]);
        // segment
        let s = &b[80..];
        assert_eq!(&s[..4], &[0x02, 0, 0, 0x18]);
        assert_eq!(&s[4..8], &[0, 0, 0, 1]);
        assert_eq!(&s[10..12], &[0, 128]);
        assert_eq!(&s[12..20], &0x1000u64.to_be_bytes());
        assert_eq!(&s[20..28], &0x2000u64.to_be_bytes());
        assert_eq!(ExtendedCopy::parse(&b), Ok(x));
        let mut bad = b.clone();
        bad[80] = 0x0a;
        assert_eq!(
            ExtendedCopy::parse(&bad),
            Err(XcopyParseError::UnsupportedSegment {
                index: 0,
                code: 0x0a
            })
        );
    }

    #[test]
    fn rcop_round_trip() {
        let l = CopyOperatingParameters::lio();
        let b = l.to_bytes();
        assert_eq!(b.len(), 46);
        assert_eq!(&b[..4], &[0, 0, 0, 42]);
        assert_eq!(b[43], 2);
        assert_eq!(&b[44..], &[0x02, 0xe4]);
        assert_eq!(CopyOperatingParameters::parse(&b), Ok(l));
        assert!(CopyOperatingParameters::parse(&b[..45]).is_err());
    }

    #[test]
    fn token_params_round_trip() {
        let mut t = [0u8; 512];
        t[0..4].copy_from_slice(&ROD_TYPE_PIT_DEFAULT.to_be_bytes());
        t[6..8].copy_from_slice(&0x01f8u16.to_be_bytes());
        let token = RodToken::parse(&t).unwrap();
        let pt = PopulateToken {
            immed: false,
            rod_type: None,
            inactivity_timeout: 10,
            ranges: vec![BlockRange { lba: 5, blocks: 7 }],
        };
        assert_eq!(PopulateToken::parse(&pt.to_bytes()), Ok(pt));
        let wut = WriteUsingToken {
            immed: false,
            del_tkn: true,
            offset_into_rod: 3,
            token: token.clone(),
            ranges: vec![BlockRange { lba: 9, blocks: 2 }],
        };
        let b = wut.to_bytes();
        assert_eq!(b.len(), 552);
        assert_eq!(WriteUsingToken::parse(&b), Ok(wut));
        let info = RodTokenInformation {
            response_to_service_action: 0x10,
            copy_operation_status: 1,
            operation_counter: 0,
            completion_status: 0,
            transfer_count_units: 0xf1,
            transfer_count: 7,
            segments_processed: 0,
            sense: Some(Sense {
                // Fixed format always carries the command-specific field.
                command_specific: Some(0),
                ..Sense::new(SenseKey::CopyAborted, 0x0d, 0x01)
            }),
            token: Some(token),
        };
        assert_eq!(RodTokenInformation::parse(&info.to_bytes()), Ok(info));
        t[7] = 0;
        assert!(RodToken::parse(&t).is_err());
    }
}
