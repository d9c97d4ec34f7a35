//! Standard INQUIRY data (SPC-4, "Standard INQUIRY data").

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ParseError;

/// The first 36 bytes of standard INQUIRY data, the part every device must
/// return. Bit fields are decoded by [`InquiryData`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct StdInquiryWire {
    /// PERIPHERAL QUALIFIER (7..5), PERIPHERAL DEVICE TYPE (4..0).
    pub byte0: u8,
    /// RMB (7), LU_CONG (6).
    pub byte1: u8,
    /// VERSION.
    pub version: u8,
    /// NORMACA (5), HISUP (4), RESPONSE DATA FORMAT (3..0).
    pub byte3: u8,
    /// ADDITIONAL LENGTH (n - 4).
    pub additional_length: u8,
    /// SCCS (7), ACC (6), TPGS (5..4), 3PC (3), PROTECT (0).
    pub byte5: u8,
    /// ENCSERV (6), MULTIP (4).
    pub byte6: u8,
    /// CMDQUE (1).
    pub byte7: u8,
    /// T10 VENDOR IDENTIFICATION.
    pub vendor: [u8; 8],
    /// PRODUCT IDENTIFICATION.
    pub product: [u8; 16],
    /// PRODUCT REVISION LEVEL.
    pub revision: [u8; 4],
}

const _: () = {
    assert!(size_of::<StdInquiryWire>() == 36);
    assert!(std::mem::offset_of!(StdInquiryWire, vendor) == 8);
    assert!(std::mem::offset_of!(StdInquiryWire, product) == 16);
    assert!(std::mem::offset_of!(StdInquiryWire, revision) == 32);
};

/// Decoded standard INQUIRY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InquiryData {
    /// PERIPHERAL QUALIFIER: 0 connected, 1 not connected, 3 no LUN here.
    pub peripheral_qualifier: u8,
    /// PERIPHERAL DEVICE TYPE: 0x00 direct access block, 0x05 CD/DVD, ...
    pub peripheral_device_type: u8,
    /// RMB: removable medium.
    pub removable: bool,
    /// LU_CONG: the logical unit is a member of a conglomerate.
    pub lu_cong: bool,
    /// VERSION: claimed standard (0x05 SPC-3, 0x06 SPC-4, 0x07 SPC-5).
    pub version: u8,
    /// NORMACA: supports NACA in CONTROL.
    pub normaca: bool,
    /// HISUP: hierarchical LUN addressing.
    pub hisup: bool,
    /// RESPONSE DATA FORMAT: 2 for every current device.
    pub response_data_format: u8,
    /// ADDITIONAL LENGTH as reported (total length is this + 5).
    pub additional_length: u8,
    /// SCCS: embedded storage array controller.
    pub sccs: bool,
    /// ACC: access controls coordinator.
    pub acc: bool,
    /// TPGS: target port group support (0 none, 1 implicit ALUA, 2
    /// explicit, 3 both).
    pub tpgs: u8,
    /// 3PC: supports third-party copy (EXTENDED COPY and friends).
    pub third_party_copy: bool,
    /// PROTECT: supports protection information.
    pub protect: bool,
    /// ENCSERV: embedded enclosure services.
    pub encserv: bool,
    /// MULTIP: multi-port device.
    pub multip: bool,
    /// CMDQUE: supports command queuing.
    pub cmdque: bool,
    /// T10 vendor identification, trailing spaces (and NULs) trimmed.
    pub vendor: String,
    /// Product identification, trimmed like `vendor`.
    pub product: String,
    /// Product revision level, trimmed like `vendor`.
    pub revision: String,
    /// The raw vendor bytes as received.
    pub vendor_raw: [u8; 8],
    /// The raw product bytes as received.
    pub product_raw: [u8; 16],
    /// The raw revision bytes as received.
    pub revision_raw: [u8; 4],
}

/// ASCII identification field to a String: trailing spaces and NULs
/// trimmed; bytes outside printable ASCII (which SPC forbids here) shown as
/// `?` so a confused device cannot inject control characters into logs.
fn ascii_field(raw: &[u8]) -> String {
    let end = raw
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    raw.iter()
        .take(end)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

impl InquiryData {
    /// Bytes of standard INQUIRY data every device must return.
    pub const MIN_LEN: usize = 36;

    /// Parse standard INQUIRY data: the bytes the device actually
    /// transferred (allocation length minus residual). Fewer than 36 bytes
    /// is an error. A smaller ADDITIONAL LENGTH is recorded but does not
    /// fail the parse: the 36 bytes were transferred, and some devices
    /// under-report it.
    pub fn parse(bytes: &[u8]) -> Result<InquiryData, ParseError> {
        let (w, _) =
            StdInquiryWire::read_from_prefix(bytes).map_err(|_| ParseError::Truncated {
                what: "standard INQUIRY data",
                needed: Self::MIN_LEN,
                available: bytes.len(),
            })?;
        Ok(InquiryData {
            peripheral_qualifier: w.byte0 >> 5,
            peripheral_device_type: w.byte0 & 0x1f,
            removable: w.byte1 & 0x80 != 0,
            lu_cong: w.byte1 & 0x40 != 0,
            version: w.version,
            normaca: w.byte3 & 0x20 != 0,
            hisup: w.byte3 & 0x10 != 0,
            response_data_format: w.byte3 & 0x0f,
            additional_length: w.additional_length,
            sccs: w.byte5 & 0x80 != 0,
            acc: w.byte5 & 0x40 != 0,
            tpgs: (w.byte5 >> 4) & 0x03,
            third_party_copy: w.byte5 & 0x08 != 0,
            protect: w.byte5 & 0x01 != 0,
            encserv: w.byte6 & 0x40 != 0,
            multip: w.byte6 & 0x10 != 0,
            cmdque: w.byte7 & 0x02 != 0,
            vendor: ascii_field(&w.vendor),
            product: ascii_field(&w.product),
            revision: ascii_field(&w.revision),
            vendor_raw: w.vendor,
            product_raw: w.product,
            revision_raw: w.revision,
        })
    }

    /// Name of the peripheral device type, e.g. "direct access block device".
    pub fn peripheral_device_type_name(&self) -> &'static str {
        peripheral_device_type_name(self.peripheral_device_type)
    }

    /// The LUN is present and connected (qualifier 0).
    pub fn is_connected(&self) -> bool {
        self.peripheral_qualifier == 0
    }
}

/// Name of a PERIPHERAL DEVICE TYPE (SPC-4 table "Peripheral device type").
pub fn peripheral_device_type_name(pdt: u8) -> &'static str {
    match pdt {
        0x00 => "direct access block device",
        0x01 => "sequential access device",
        0x02 => "printer device",
        0x03 => "processor device",
        0x04 => "write once device",
        0x05 => "CD/DVD device",
        0x07 => "optical memory device",
        0x08 => "media changer device",
        0x0c => "storage array controller device",
        0x0d => "enclosure services device",
        0x0e => "simplified direct access device",
        0x0f => "optical card reader/writer device",
        0x11 => "object-based storage device",
        0x12 => "automation/drive interface",
        0x14 => "host managed zoned block device",
        0x1e => "well known logical unit",
        0x1f => "unknown or no device type",
        _ => "reserved device type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pad<const N: usize>(s: &[u8], fill: u8) -> [u8; N] {
        let mut a = [fill; N];
        a[..s.len()].copy_from_slice(s);
        a
    }

    /// LIO FILEIO LUN through tcm_loop: SPC-4, implicit ALUA (TPGS=1), 3PC,
    /// CMDQUE, additional length 31 (target_core_spc.c).
    pub(crate) fn lio_fileio() -> Vec<u8> {
        let mut v = vec![0x00, 0x00, 0x06, 0x02, 31, 0x18, 0x00, 0x02];
        v.extend_from_slice(b"LIO-ORG ");
        v.extend_from_slice(&pad::<16>(b"FILEIO", b' '));
        v.extend_from_slice(&pad::<4>(b"4.0", b' '));
        v
    }

    /// QEMU scsi-hd: SPC-3, HISUP, format 2, sync+CMDQUE, revision NUL
    /// padded (hw/scsi/scsi-disk.c), 96-byte allocation.
    pub(crate) fn qemu_harddisk() -> Vec<u8> {
        let mut v = vec![0x00, 0x00, 0x05, 0x12, 91, 0x00, 0x00, 0x12];
        v.extend_from_slice(&pad::<8>(b"QEMU", b' '));
        v.extend_from_slice(&pad::<16>(b"QEMU HARDDISK", b' '));
        v.extend_from_slice(&pad::<4>(b"2.5+", 0));
        v.resize(96, 0);
        v
    }

    #[test]
    fn lio_org_fileio() {
        let d = InquiryData::parse(&lio_fileio()).unwrap();
        assert_eq!(d.peripheral_qualifier, 0);
        assert_eq!(d.peripheral_device_type, 0);
        assert_eq!(
            d.peripheral_device_type_name(),
            "direct access block device"
        );
        assert!(!d.removable);
        assert_eq!(d.version, 6);
        assert_eq!(d.response_data_format, 2);
        assert!(!d.hisup && !d.normaca);
        assert_eq!(d.additional_length, 31);
        assert_eq!(d.tpgs, 1);
        assert!(d.third_party_copy);
        assert!(!d.protect && !d.sccs && !d.acc);
        assert!(d.cmdque);
        assert_eq!(d.vendor, "LIO-ORG");
        assert_eq!(d.product, "FILEIO");
        assert_eq!(d.revision, "4.0");
        assert_eq!(&d.vendor_raw, b"LIO-ORG ");
        assert_eq!(&d.product_raw, b"FILEIO          ");
    }

    #[test]
    fn qemu_hd() {
        let d = InquiryData::parse(&qemu_harddisk()).unwrap();
        assert!(d.is_connected());
        assert_eq!(d.version, 5);
        assert!(d.hisup);
        assert_eq!(d.response_data_format, 2);
        assert_eq!(d.additional_length, 91);
        assert_eq!(d.tpgs, 0);
        assert!(!d.third_party_copy);
        assert!(d.cmdque);
        assert_eq!(d.vendor, "QEMU");
        assert_eq!(d.product, "QEMU HARDDISK");
        assert_eq!(d.revision, "2.5+");
    }

    #[test]
    fn short_is_error() {
        let v = lio_fileio();
        for n in 0..36 {
            assert_eq!(
                InquiryData::parse(&v[..n]),
                Err(ParseError::Truncated {
                    what: "standard INQUIRY data",
                    needed: 36,
                    available: n
                })
            );
        }
    }

    #[test]
    fn qualifier_and_odd_bytes() {
        let mut v = lio_fileio();
        v[0] = 0x7f; // PQ 3, PDT 0x1f: no LUN here
        v[8] = 0x07; // control character in vendor
        let d = InquiryData::parse(&v).unwrap();
        assert_eq!(d.peripheral_qualifier, 3);
        assert_eq!(d.peripheral_device_type, 0x1f);
        assert!(!d.is_connected());
        assert_eq!(d.vendor, "?IO-ORG");
        assert_eq!(ascii_field(b"    "), "");
        assert_eq!(ascii_field(b" A B"), " A B");
    }
}
