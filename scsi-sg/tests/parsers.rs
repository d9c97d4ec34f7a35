//! Parsers of device-provided bytes: known captures through the public API,
//! and property tests that arbitrary bytes give `Ok` or `Err`, never a panic.

use proptest::prelude::*;
use scsi_sg::cdb::{self, Command};
use scsi_sg::sense::{self, SenseFormat};
use scsi_sg::{Capacity16, InquiryData, ParseError, ScsiStatus, Sense, SenseKey};

fn padded<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [b' '; N];
    a[..s.len()].copy_from_slice(s);
    a
}

/// `sg_inq` on a tcm_loop LUN backed by a LIO FILEIO store.
fn lio_fileio_inquiry() -> Vec<u8> {
    let mut v = vec![0x00, 0x00, 0x06, 0x02, 0x1f, 0x18, 0x00, 0x02];
    v.extend_from_slice(b"LIO-ORG ");
    v.extend_from_slice(&padded::<16>(b"FILEIO"));
    v.extend_from_slice(&padded::<4>(b"4.0"));
    v
}

/// `sg_inq` on a QEMU scsi-hd behind virtio-scsi.
fn qemu_harddisk_inquiry() -> Vec<u8> {
    let mut v = vec![0x00, 0x00, 0x05, 0x12, 0x1f, 0x00, 0x00, 0x12];
    v.extend_from_slice(&padded::<8>(b"QEMU"));
    v.extend_from_slice(&padded::<16>(b"QEMU HARDDISK"));
    v.extend_from_slice(b"2.5+");
    v
}

#[test]
fn lio_org_inquiry() {
    let d = InquiryData::parse(&lio_fileio_inquiry()).unwrap();
    assert_eq!(
        (d.vendor.as_str(), d.product.as_str(), d.revision.as_str()),
        ("LIO-ORG", "FILEIO", "4.0")
    );
    assert_eq!(d.peripheral_device_type, 0);
    assert_eq!(d.version, 6);
    assert!(d.third_party_copy);
    assert_eq!(d.tpgs, 1);
    assert!(d.cmdque);
}

#[test]
fn qemu_inquiry() {
    let d = InquiryData::parse(&qemu_harddisk_inquiry()).unwrap();
    assert_eq!(
        (d.vendor.as_str(), d.product.as_str(), d.revision.as_str()),
        ("QEMU", "QEMU HARDDISK", "2.5+")
    );
    assert_eq!(d.version, 5);
    assert!(d.hisup);
    assert!(!d.third_party_copy);
}

#[test]
fn readcap16_131072_blocks_of_512() {
    let raw: [u8; 32] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff, // last LBA 131071
        0x00, 0x00, 0x02, 0x00, // 512
        0x00, 0x00, 0x00, 0x00, // no protection, LBPPBE 0, not provisioned
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let c = Capacity16::parse(&raw).unwrap();
    assert_eq!(c.returned_lba, 131_071);
    assert_eq!(c.block_count(), Some(131_072));
    assert_eq!(c.logical_block_length, 512);
    assert_eq!(c.capacity_bytes(), Some(67_108_864));
    assert!(!c.lbpme && !c.lbprz && !c.prot_en);
    assert_eq!(c.to_bytes(), raw);
}

#[test]
fn sense_fixed_and_descriptor() {
    // LIO's answer to an unsupported opcode (fixed format).
    let fixed = [
        0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0,
    ];
    let s = Sense::parse(&fixed).unwrap();
    assert_eq!(s.format, SenseFormat::Fixed);
    assert_eq!(s.key, SenseKey::IllegalRequest);
    assert_eq!(s.asc_name(), Some("INVALID COMMAND OPERATION CODE"));

    // UNIT ATTENTION, CAPACITY DATA HAS CHANGED, descriptor format.
    let desc = [0x72, 0x06, 0x2a, 0x09, 0, 0, 0, 0];
    let s = Sense::parse(&desc).unwrap();
    assert_eq!(s.format, SenseFormat::Descriptor);
    assert!(s.is_unit_attention());
    assert_eq!(s.asc_name(), Some("CAPACITY DATA HAS CHANGED"));
    assert_eq!(
        s.to_string(),
        "UNIT ATTENTION: CAPACITY DATA HAS CHANGED (0x2a/0x09)"
    );

    // LBA OUT OF RANGE with the failing LBA in an information descriptor.
    let desc = [
        0x72, 0x05, 0x21, 0x00, 0, 0, 0, 0x0c, 0x00, 0x0a, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0, 0,
    ];
    let s = Sense::parse(&desc).unwrap();
    assert_eq!(s.information, Some(0x2_0000));
    assert_eq!(s.asc_name(), Some("LOGICAL BLOCK ADDRESS OUT OF RANGE"));
}

#[test]
fn status_and_commands() {
    assert_eq!(ScsiStatus::from_byte(0x18), ScsiStatus::ReservationConflict);
    assert_eq!(ScsiStatus::from_byte(0x28).name(), "TASK SET FULL");
    assert_eq!(
        Command::from_cdb(&cdb::read_capacity16(32)).name(),
        "READ CAPACITY(16)"
    );
    assert_eq!(cdb::opcode_name(cdb::INQUIRY), "INQUIRY");
    assert_eq!(cdb::opcode_name(cdb::TEST_UNIT_READY), "TEST UNIT READY");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn inquiry_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        match InquiryData::parse(&bytes) {
            Ok(d) => {
                prop_assert!(bytes.len() >= 36);
                prop_assert!(d.vendor.len() <= 8 && d.product.len() <= 16 && d.revision.len() <= 4);
                prop_assert!(d.tpgs <= 3 && d.peripheral_qualifier <= 7);
            }
            Err(ParseError::Truncated { available, .. }) => prop_assert_eq!(available, bytes.len()),
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn capacity_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        match Capacity16::parse(&bytes) {
            Ok(c) => {
                prop_assert!(bytes.len() >= 32);
                let _ = c.capacity_bytes();
                prop_assert!(c.lowest_aligned_lba < 0x4000);
                // Everything but reserved bits survives a round trip.
                let mut expect = [0u8; 32];
                expect[..16].copy_from_slice(&bytes[..16]);
                expect[12] &= 0x3f;
                prop_assert_eq!(c.to_bytes(), expect);
            }
            Err(_) => prop_assert!(bytes.len() < 32),
        }
    }

    #[test]
    fn sense_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(s) = Sense::parse(&bytes) {
            prop_assert!((0x70..=0x73).contains(&s.response_code));
            let _ = s.to_string();
            let _ = s.field_pointer();
            let _ = Sense::parse(&s.to_fixed()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let _ = sense::descriptors(&bytes).count();
    }

    /// Sense with a valid response code: whatever follows, parsing succeeds.
    #[test]
    fn sense_valid_header_parses(code in 0x70u8..=0x73, valid in any::<bool>(),
                                 rest in proptest::collection::vec(any::<u8>(), 0..260)) {
        let mut bytes = vec![code | if valid { 0x80 } else { 0 }];
        bytes.extend_from_slice(&rest);
        let s = Sense::parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(s.response_code, code);
        prop_assert_eq!(s.deferred, code == 0x71 || code == 0x73);
    }

    /// Fixed-format round trip of the fields `to_fixed` carries.
    #[test]
    fn sense_fixed_round_trip(key in 0u8..16, asc in any::<u8>(), ascq in any::<u8>(),
                              info in proptest::option::of(any::<u32>())) {
        let mut s = Sense::new(SenseKey::from_nibble(key), asc, ascq);
        s.information = info.map(u64::from);
        s.command_specific = Some(0);
        let back = Sense::parse(&s.to_fixed()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, s);
    }

    #[test]
    fn command_from_any_cdb(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        let c = Command::from_cdb(&bytes);
        prop_assert!(!c.name().is_empty());
        let _ = c.to_string();
    }
}
