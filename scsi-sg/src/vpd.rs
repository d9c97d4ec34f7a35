//! Vital product data pages (SPC-4 7.8, SBC-3 6.6): the parsers of the
//! pages the probe reads, and builders for a target to return them.
//!
//! Every page starts with the same 4-byte header: PERIPHERAL QUALIFIER and
//! DEVICE TYPE, PAGE CODE, PAGE LENGTH (n - 3, big-endian 16 bits). The
//! parsers check the page code, clamp the page to the bytes received, and
//! return [`ParseError`] on anything that does not fit.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ParseError;

/// Supported VPD pages.
pub const PAGE_SUPPORTED: u8 = 0x00;
/// Unit serial number.
pub const PAGE_UNIT_SERIAL: u8 = 0x80;
/// Device identification.
pub const PAGE_DEVICE_IDENTIFICATION: u8 = 0x83;
/// Third-party copy.
pub const PAGE_THIRD_PARTY_COPY: u8 = 0x8f;
/// Block limits (SBC-3).
pub const PAGE_BLOCK_LIMITS: u8 = 0xb0;
/// Logical block provisioning (SBC-3).
pub const PAGE_LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;

/// The 4-byte header every VPD page starts with.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VpdHeader {
    /// PERIPHERAL QUALIFIER (7..5), PERIPHERAL DEVICE TYPE (4..0).
    pub byte0: u8,
    /// PAGE CODE.
    pub page_code: u8,
    /// PAGE LENGTH (n - 3).
    pub page_length: U16,
}

const _: () = assert!(size_of::<VpdHeader>() == 4);

/// The payload of a VPD page (after the header), clamped to what was
/// received, after checking the page code.
pub fn page_payload<'a>(
    bytes: &'a [u8],
    page: u8,
    what: &'static str,
) -> Result<&'a [u8], ParseError> {
    let (h, rest) = VpdHeader::ref_from_prefix(bytes).map_err(|_| ParseError::Truncated {
        what,
        needed: 4,
        available: bytes.len(),
    })?;
    if h.page_code != page {
        return Err(ParseError::WrongPage {
            what,
            expected: page,
            got: h.page_code,
        });
    }
    let len = usize::from(h.page_length.get()).min(rest.len());
    Ok(rest.get(..len).unwrap_or(rest))
}

/// Wrap `payload` in a VPD header for `page` of a direct-access device.
/// Payloads longer than 65535 bytes are cut to fit the length field.
pub fn build_page(page: u8, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(4 + usize::from(len));
    v.extend_from_slice(&[0, page]);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload.get(..usize::from(len)).unwrap_or(payload));
    v
}

/// Parse the Supported VPD Pages page (0x00): the page codes listed.
pub fn parse_supported_pages(bytes: &[u8]) -> Result<Vec<u8>, ParseError> {
    Ok(page_payload(bytes, PAGE_SUPPORTED, "supported VPD pages")?.to_vec())
}

/// Parse the Unit Serial Number page (0x80): the ASCII serial, trailing
/// spaces and NULs trimmed, non-printable bytes shown as `?`.
pub fn parse_unit_serial(bytes: &[u8]) -> Result<String, ParseError> {
    let p = page_payload(bytes, PAGE_UNIT_SERIAL, "unit serial number VPD page")?;
    let end = p
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    Ok(p.iter()
        .take(end)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect())
}

/// Designator types (SPC-4 table "DESIGNATOR TYPE field").
pub const DESIGNATOR_T10_VENDOR: u8 = 0x1;
/// EUI-64 based designator.
pub const DESIGNATOR_EUI64: u8 = 0x2;
/// NAA designator.
pub const DESIGNATOR_NAA: u8 = 0x3;
/// Relative target port identifier.
pub const DESIGNATOR_RELATIVE_TARGET_PORT: u8 = 0x4;
/// Target port group.
pub const DESIGNATOR_TARGET_PORT_GROUP: u8 = 0x5;
/// SCSI name string.
pub const DESIGNATOR_SCSI_NAME: u8 = 0x8;

/// One designation descriptor of the Device Identification page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designator {
    /// PROTOCOL IDENTIFIER (meaningful when `piv`).
    pub protocol_id: u8,
    /// CODE SET: 1 binary, 2 ASCII, 3 UTF-8.
    pub code_set: u8,
    /// PIV: the protocol identifier is valid.
    pub piv: bool,
    /// ASSOCIATION: 0 logical unit, 1 target port, 2 target device.
    pub association: u8,
    /// DESIGNATOR TYPE.
    pub designator_type: u8,
    /// The designator bytes.
    pub designator: Vec<u8>,
}

impl Designator {
    /// A binary NAA designator associated with the logical unit.
    pub fn naa(bytes: &[u8]) -> Designator {
        Designator {
            protocol_id: 0,
            code_set: 1,
            piv: false,
            association: 0,
            designator_type: DESIGNATOR_NAA,
            designator: bytes.to_vec(),
        }
    }

    /// Whether this is a binary NAA designator of the logical unit: the
    /// one EXTENDED COPY identification descriptors name.
    pub fn is_lu_naa(&self) -> bool {
        self.designator_type == DESIGNATOR_NAA && self.association == 0 && self.code_set == 1
    }

    /// The designator in the form sg_vpd prints an NAA: `0x` and lowercase
    /// hex digits.
    pub fn hex(&self) -> String {
        let mut s = String::from("0x");
        for b in &self.designator {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    fn to_bytes(&self, out: &mut Vec<u8>) {
        let len = u8::try_from(self.designator.len()).unwrap_or(u8::MAX);
        out.push((self.protocol_id << 4) | (self.code_set & 0x0f));
        out.push(
            (u8::from(self.piv) << 7)
                | ((self.association & 0x03) << 4)
                | (self.designator_type & 0x0f),
        );
        out.push(0);
        out.push(len);
        out.extend_from_slice(
            self.designator
                .get(..usize::from(len))
                .unwrap_or(&self.designator),
        );
    }
}

/// Parse the Device Identification page (0x83) into its designators.
/// A descriptor that runs past the page ends the list with an error.
pub fn parse_device_identification(bytes: &[u8]) -> Result<Vec<Designator>, ParseError> {
    const WHAT: &str = "device identification VPD page";
    let mut rest = page_payload(bytes, PAGE_DEVICE_IDENTIFICATION, WHAT)?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let hdr = rest.get(..4).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 4,
            available: rest.len(),
        })?;
        let (b0, b1, len) = (hdr[0], hdr[1], usize::from(hdr[3]));
        let designator = rest.get(4..4 + len).ok_or(ParseError::Truncated {
            what: WHAT,
            needed: 4 + len,
            available: rest.len(),
        })?;
        out.push(Designator {
            protocol_id: b0 >> 4,
            code_set: b0 & 0x0f,
            piv: b1 & 0x80 != 0,
            association: (b1 >> 4) & 0x03,
            designator_type: b1 & 0x0f,
            designator: designator.to_vec(),
        });
        rest = rest.get(4 + len..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Build a Device Identification page from designators.
pub fn build_device_identification(designators: &[Designator]) -> Vec<u8> {
    let mut payload = Vec::new();
    for d in designators {
        d.to_bytes(&mut payload);
    }
    build_page(PAGE_DEVICE_IDENTIFICATION, &payload)
}

/// Block Limits VPD page (0xB0) as it appears on the wire from byte 4 on
/// (SBC-3 6.6.3; 60 bytes of payload, page length 0x3C).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockLimitsWire {
    /// WSNZ (bit 0).
    pub byte4: u8,
    /// MAXIMUM COMPARE AND WRITE LENGTH (blocks).
    pub max_compare_and_write: u8,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY (blocks).
    pub optimal_granularity: U16,
    /// MAXIMUM TRANSFER LENGTH (blocks; 0 = no limit reported).
    pub max_transfer: U32,
    /// OPTIMAL TRANSFER LENGTH (blocks).
    pub optimal_transfer: U32,
    /// MAXIMUM PREFETCH LENGTH (blocks).
    pub max_prefetch: U32,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_lba_count: U32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: U32,
    /// OPTIMAL UNMAP GRANULARITY.
    pub optimal_unmap_granularity: U32,
    /// UGAVALID (bit 31), UNMAP GRANULARITY ALIGNMENT (30..0).
    pub unmap_alignment: U32,
    /// MAXIMUM WRITE SAME LENGTH.
    pub max_write_same: U64,
    /// SBC-4 atomic fields and reserved bytes (44..64).
    pub _rsvd44: [u8; 20],
}

const _: () = {
    assert!(size_of::<BlockLimitsWire>() == 60);
    assert!(std::mem::offset_of!(BlockLimitsWire, max_transfer) == 4);
    assert!(std::mem::offset_of!(BlockLimitsWire, max_unmap_lba_count) == 16);
    assert!(std::mem::offset_of!(BlockLimitsWire, max_write_same) == 32);
};

/// Decoded Block Limits page. Fields past the bytes the device returned
/// read as 0 (SBC-2 devices return a 16-byte page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockLimits {
    /// MAXIMUM COMPARE AND WRITE LENGTH.
    pub max_compare_and_write: u8,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY.
    pub optimal_granularity: u16,
    /// MAXIMUM TRANSFER LENGTH (blocks; 0 = not reported).
    pub max_transfer: u32,
    /// OPTIMAL TRANSFER LENGTH.
    pub optimal_transfer: u32,
    /// MAXIMUM PREFETCH LENGTH.
    pub max_prefetch: u32,
    /// MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_lba_count: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// OPTIMAL UNMAP GRANULARITY.
    pub optimal_unmap_granularity: u32,
    /// UNMAP GRANULARITY ALIGNMENT, when UGAVALID.
    pub unmap_alignment: Option<u32>,
    /// MAXIMUM WRITE SAME LENGTH.
    pub max_write_same: u64,
}

impl BlockLimits {
    /// Parse the Block Limits page.
    pub fn parse(bytes: &[u8]) -> Result<BlockLimits, ParseError> {
        let p = page_payload(bytes, PAGE_BLOCK_LIMITS, "block limits VPD page")?;
        if p.len() < 12 {
            return Err(ParseError::Truncated {
                what: "block limits VPD page",
                needed: 16,
                available: p.len() + 4,
            });
        }
        let mut full = [0u8; 60];
        let n = p.len().min(60);
        full[..n].copy_from_slice(&p[..n]);
        let w = BlockLimitsWire::read_from_bytes(&full[..]).map_err(|_| ParseError::Truncated {
            what: "block limits VPD page",
            needed: 64,
            available: bytes.len(),
        })?;
        let ua = w.unmap_alignment.get();
        Ok(BlockLimits {
            max_compare_and_write: w.max_compare_and_write,
            optimal_granularity: w.optimal_granularity.get(),
            max_transfer: w.max_transfer.get(),
            optimal_transfer: w.optimal_transfer.get(),
            max_prefetch: w.max_prefetch.get(),
            max_unmap_lba_count: w.max_unmap_lba_count.get(),
            max_unmap_descriptors: w.max_unmap_descriptors.get(),
            optimal_unmap_granularity: w.optimal_unmap_granularity.get(),
            unmap_alignment: (ua & 0x8000_0000 != 0).then_some(ua & 0x7fff_ffff),
            max_write_same: w.max_write_same.get(),
        })
    }

    /// The page's wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let w = BlockLimitsWire {
            byte4: 0,
            max_compare_and_write: self.max_compare_and_write,
            optimal_granularity: U16::new(self.optimal_granularity),
            max_transfer: U32::new(self.max_transfer),
            optimal_transfer: U32::new(self.optimal_transfer),
            max_prefetch: U32::new(self.max_prefetch),
            max_unmap_lba_count: U32::new(self.max_unmap_lba_count),
            max_unmap_descriptors: U32::new(self.max_unmap_descriptors),
            optimal_unmap_granularity: U32::new(self.optimal_unmap_granularity),
            unmap_alignment: U32::new(
                self.unmap_alignment
                    .map_or(0, |a| 0x8000_0000 | (a & 0x7fff_ffff)),
            ),
            max_write_same: U64::new(self.max_write_same),
            _rsvd44: [0; 20],
        };
        build_page(PAGE_BLOCK_LIMITS, w.as_bytes())
    }
}

/// Decoded Logical Block Provisioning page (0xB2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provisioning {
    /// THRESHOLD EXPONENT.
    pub threshold_exponent: u8,
    /// LBPU: UNMAP supported.
    pub lbpu: bool,
    /// LBPWS: WRITE SAME(16) with UNMAP supported.
    pub lbpws: bool,
    /// LBPWS10: WRITE SAME(10) with UNMAP supported.
    pub lbpws10: bool,
    /// LBPRZ (SBC-3 bit 2 of byte 5): unmapped blocks read as zeros.
    pub lbprz: bool,
    /// ANC_SUP: anchored state supported.
    pub anc_sup: bool,
    /// DP: a provisioning group descriptor follows.
    pub dp: bool,
    /// PROVISIONING TYPE: 0 not reported/full, 1 resource, 2 thin.
    pub provisioning_type: u8,
}

impl Provisioning {
    /// Parse the page.
    pub fn parse(bytes: &[u8]) -> Result<Provisioning, ParseError> {
        const WHAT: &str = "logical block provisioning VPD page";
        let p = page_payload(bytes, PAGE_LOGICAL_BLOCK_PROVISIONING, WHAT)?;
        let &[b4, b5, b6, ..] = p else {
            return Err(ParseError::Truncated {
                what: WHAT,
                needed: 8,
                available: p.len() + 4,
            });
        };
        Ok(Provisioning {
            threshold_exponent: b4,
            lbpu: b5 & 0x80 != 0,
            lbpws: b5 & 0x40 != 0,
            lbpws10: b5 & 0x20 != 0,
            lbprz: b5 & 0x04 != 0,
            anc_sup: b5 & 0x02 != 0,
            dp: b5 & 0x01 != 0,
            provisioning_type: b6 & 0x07,
        })
    }

    /// The page's wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let b5 = (u8::from(self.lbpu) << 7)
            | (u8::from(self.lbpws) << 6)
            | (u8::from(self.lbpws10) << 5)
            | (u8::from(self.lbprz) << 2)
            | (u8::from(self.anc_sup) << 1)
            | u8::from(self.dp);
        build_page(
            PAGE_LOGICAL_BLOCK_PROVISIONING,
            &[
                self.threshold_exponent,
                b5,
                self.provisioning_type & 0x07,
                0,
            ],
        )
    }
}

/// Third-party copy descriptor type: Supported Commands.
pub const TPC_DESC_SUPPORTED_COMMANDS: u16 = 0x0001;
/// Third-party copy descriptor type: Block Device ROD Limits.
pub const TPC_DESC_BLOCK_ROD_LIMITS: u16 = 0x0000;

/// Block Device ROD Limits descriptor (SBC-3), 36 bytes including its
/// 4-byte descriptor header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RodLimitsWire {
    /// THIRD-PARTY COPY DESCRIPTOR TYPE (0x0000).
    pub descriptor_type: U16,
    /// THIRD-PARTY COPY DESCRIPTOR LENGTH (0x0020).
    pub descriptor_length: U16,
    /// Reserved.
    pub _rsvd4: [u8; 6],
    /// MAXIMUM RANGE DESCRIPTORS.
    pub max_range_descriptors: U16,
    /// MAXIMUM INACTIVITY TIMEOUT (seconds).
    pub max_inactivity_timeout: U32,
    /// DEFAULT INACTIVITY TIMEOUT (seconds).
    pub default_inactivity_timeout: U32,
    /// MAXIMUM TOKEN TRANSFER SIZE (blocks).
    pub max_token_transfer_size: U64,
    /// OPTIMAL TRANSFER COUNT (blocks).
    pub optimal_transfer_count: U64,
}

const _: () = {
    assert!(size_of::<RodLimitsWire>() == 36);
    assert!(std::mem::offset_of!(RodLimitsWire, max_range_descriptors) == 10);
    assert!(std::mem::offset_of!(RodLimitsWire, max_inactivity_timeout) == 12);
    assert!(std::mem::offset_of!(RodLimitsWire, max_token_transfer_size) == 20);
    assert!(std::mem::offset_of!(RodLimitsWire, optimal_transfer_count) == 28);
};

/// Block Device ROD Limits: what POPULATE TOKEN / WRITE USING TOKEN accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RodLimits {
    /// MAXIMUM RANGE DESCRIPTORS per token command.
    pub max_range_descriptors: u16,
    /// MAXIMUM INACTIVITY TIMEOUT (seconds).
    pub max_inactivity_timeout: u32,
    /// DEFAULT INACTIVITY TIMEOUT (seconds).
    pub default_inactivity_timeout: u32,
    /// MAXIMUM TOKEN TRANSFER SIZE (blocks).
    pub max_token_transfer_size: u64,
    /// OPTIMAL TRANSFER COUNT (blocks).
    pub optimal_transfer_count: u64,
}

/// Decoded Third-party Copy page (0x8F): the descriptors this crate uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThirdPartyCopy {
    /// The Block Device ROD Limits descriptor, if present.
    pub rod_limits: Option<RodLimits>,
    /// (operation code, service actions) from the Supported Commands
    /// descriptor.
    pub supported_commands: Vec<(u8, Vec<u8>)>,
    /// Every descriptor type present, in order.
    pub descriptor_types: Vec<u16>,
}

impl ThirdPartyCopy {
    /// Whether the Supported Commands descriptor lists `opcode`/`sa`.
    pub fn supports(&self, opcode: u8, service_action: u8) -> bool {
        self.supported_commands
            .iter()
            .any(|(op, sas)| *op == opcode && sas.contains(&service_action))
    }

    /// Parse the page. Descriptors this crate does not model are skipped;
    /// one running past the page is an error.
    pub fn parse(bytes: &[u8]) -> Result<ThirdPartyCopy, ParseError> {
        const WHAT: &str = "third-party copy VPD page";
        let mut rest = page_payload(bytes, PAGE_THIRD_PARTY_COPY, WHAT)?;
        let mut out = ThirdPartyCopy::default();
        while !rest.is_empty() {
            let &[t0, t1, l0, l1, ..] = rest else {
                return Err(ParseError::Truncated {
                    what: WHAT,
                    needed: 4,
                    available: rest.len(),
                });
            };
            let kind = u16::from_be_bytes([t0, t1]);
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            let desc = rest.get(..4 + len).ok_or(ParseError::Truncated {
                what: WHAT,
                needed: 4 + len,
                available: rest.len(),
            })?;
            out.descriptor_types.push(kind);
            match kind {
                TPC_DESC_BLOCK_ROD_LIMITS => {
                    let (w, _) = RodLimitsWire::read_from_prefix(desc).map_err(|_| {
                        ParseError::Truncated {
                            what: "block device ROD limits descriptor",
                            needed: 36,
                            available: desc.len(),
                        }
                    })?;
                    out.rod_limits = Some(RodLimits {
                        max_range_descriptors: w.max_range_descriptors.get(),
                        max_inactivity_timeout: w.max_inactivity_timeout.get(),
                        default_inactivity_timeout: w.default_inactivity_timeout.get(),
                        max_token_transfer_size: w.max_token_transfer_size.get(),
                        optimal_transfer_count: w.optimal_transfer_count.get(),
                    });
                }
                TPC_DESC_SUPPORTED_COMMANDS => {
                    let list_len = usize::from(desc.get(4).copied().unwrap_or(0));
                    let mut list = desc.get(5..5 + list_len).ok_or(ParseError::Truncated {
                        what: "supported commands descriptor",
                        needed: 5 + list_len,
                        available: desc.len(),
                    })?;
                    while let [op, n, tail @ ..] = list {
                        let sas = tail.get(..usize::from(*n)).ok_or(ParseError::Truncated {
                            what: "supported commands descriptor",
                            needed: usize::from(*n),
                            available: tail.len(),
                        })?;
                        out.supported_commands.push((*op, sas.to_vec()));
                        list = tail.get(usize::from(*n)..).unwrap_or(&[]);
                    }
                    if !list.is_empty() {
                        return Err(ParseError::Truncated {
                            what: "supported commands descriptor",
                            needed: 2,
                            available: list.len(),
                        });
                    }
                }
                _ => {}
            }
            rest = rest.get(4 + len..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// The page's wire form: a Supported Commands descriptor (padded to a
    /// multiple of 4) when any commands are listed, then the ROD limits.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        if !self.supported_commands.is_empty() {
            let mut list = Vec::new();
            for (op, sas) in &self.supported_commands {
                list.push(*op);
                list.push(u8::try_from(sas.len()).unwrap_or(0));
                list.extend_from_slice(sas);
            }
            let mut body = vec![u8::try_from(list.len()).unwrap_or(0)];
            body.extend_from_slice(&list);
            while !body.len().is_multiple_of(4) {
                body.push(0);
            }
            payload.extend_from_slice(&TPC_DESC_SUPPORTED_COMMANDS.to_be_bytes());
            payload.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
            payload.extend_from_slice(&body);
        }
        if let Some(l) = self.rod_limits {
            let w = RodLimitsWire {
                descriptor_type: U16::new(TPC_DESC_BLOCK_ROD_LIMITS),
                descriptor_length: U16::new(32),
                _rsvd4: [0; 6],
                max_range_descriptors: U16::new(l.max_range_descriptors),
                max_inactivity_timeout: U32::new(l.max_inactivity_timeout),
                default_inactivity_timeout: U32::new(l.default_inactivity_timeout),
                max_token_transfer_size: U64::new(l.max_token_transfer_size),
                optimal_transfer_count: U64::new(l.optimal_transfer_count),
            };
            payload.extend_from_slice(w.as_bytes());
        }
        build_page(PAGE_THIRD_PARTY_COPY, &payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_limits_round_trip_and_short_pages() {
        let bl = BlockLimits {
            max_transfer: 8192,
            optimal_transfer: 8192,
            max_unmap_lba_count: 8192,
            max_unmap_descriptors: 1,
            unmap_alignment: Some(0),
            max_write_same: 0xffff,
            ..BlockLimits::default()
        };
        let bytes = bl.to_bytes();
        assert_eq!(bytes.len(), 64);
        assert_eq!(&bytes[..4], &[0, 0xb0, 0, 0x3c]);
        assert_eq!(BlockLimits::parse(&bytes), Ok(bl));
        // SBC-2 16-byte page: later fields read as 0.
        let mut short = bytes[..16].to_vec();
        short[3] = 12;
        let p = BlockLimits::parse(&short).unwrap();
        assert_eq!(p.max_transfer, 8192);
        assert_eq!(p.max_unmap_lba_count, 0);
        assert!(BlockLimits::parse(&bytes[..10]).is_err());
        assert!(matches!(
            BlockLimits::parse(&Provisioning::default().to_bytes()),
            Err(ParseError::WrongPage { .. })
        ));
    }

    #[test]
    fn designators() {
        let naa = [
            0x60, 0x01, 0x40, 0x50, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        let mut t10 = Designator::naa(b"LIO-ORG FILEIO");
        t10.designator_type = DESIGNATOR_T10_VENDOR;
        t10.code_set = 2;
        let page = build_device_identification(&[Designator::naa(&naa), t10.clone()]);
        let ds = parse_device_identification(&page).unwrap();
        assert_eq!(ds.len(), 2);
        assert!(ds[0].is_lu_naa());
        assert_eq!(ds[0].designator, naa);
        assert_eq!(
            ds[0].hex(),
            "0x60014050010203040506070809 0a0b0c".replace(' ', "")
        );
        assert_eq!(ds[1], t10);
        // A descriptor claiming more than the page holds.
        let mut bad = page.clone();
        bad[7] = 200;
        assert!(parse_device_identification(&bad).is_err());
    }

    #[test]
    fn third_party_copy_page() {
        let t = ThirdPartyCopy {
            rod_limits: Some(RodLimits {
                max_range_descriptors: 8,
                max_inactivity_timeout: 60,
                default_inactivity_timeout: 30,
                max_token_transfer_size: 1 << 20,
                optimal_transfer_count: 2048,
            }),
            supported_commands: vec![(0x83, vec![0x10, 0x11]), (0x84, vec![0x07])],
            descriptor_types: vec![1, 0],
        };
        let b = t.to_bytes();
        let p = ThirdPartyCopy::parse(&b).unwrap();
        assert_eq!(p, t);
        assert!(p.supports(0x83, 0x11));
        assert!(!p.supports(0x83, 0x00));
        assert_eq!(
            parse_supported_pages(&build_page(0, &[0, 0x80, 0x83])).unwrap(),
            vec![0, 0x80, 0x83]
        );
        assert_eq!(
            parse_unit_serial(&build_page(0x80, b"abc  \0")).unwrap(),
            "abc"
        );
    }
}
