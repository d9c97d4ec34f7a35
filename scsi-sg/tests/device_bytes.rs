//! Every parser of the new device-provided formats (VPD pages, copy
//! operating parameters, copy status, ROD token information, ROD tokens,
//! EXTENDED COPY and token parameter lists, REPORT LUNS) fed random bytes:
//! `Ok` or `Err`, never a panic. Also random bytes behind a valid header,
//! which reach deeper than pure noise.

use proptest::prelude::*;
use scsi_sg::tpc::{
    CopyOperatingParameters, CopyStatusLid1, ExtendedCopy, PopulateToken, RodToken,
    RodTokenInformation, WriteUsingToken,
};
use scsi_sg::vpd::{self, BlockLimits, Provisioning, ThirdPartyCopy};

fn with_header(page: u8, body: &[u8], claimed: u16) -> Vec<u8> {
    let mut v = vec![0, page];
    v.extend_from_slice(&claimed.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn all_parsers(b: &[u8]) {
    let _ = vpd::parse_supported_pages(b);
    let _ = vpd::parse_unit_serial(b);
    let _ = vpd::parse_device_identification(b);
    let _ = BlockLimits::parse(b);
    let _ = Provisioning::parse(b);
    let _ = ThirdPartyCopy::parse(b);
    let _ = CopyOperatingParameters::parse(b);
    let _ = CopyStatusLid1::parse(b);
    let _ = RodTokenInformation::parse(b);
    let _ = RodToken::parse(b);
    let _ = ExtendedCopy::parse(b);
    let _ = PopulateToken::parse(b);
    let _ = WriteUsingToken::parse(b);
    let _ = scsi_sg::parse_report_luns(b);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..1200)) {
        all_parsers(&b);
    }

    #[test]
    fn random_vpd_bodies_never_panic(
        page in prop::sample::select(vec![0x00u8, 0x80, 0x83, 0x8f, 0xb0, 0xb2]),
        body in proptest::collection::vec(any::<u8>(), 0..300),
        claimed in any::<u16>(),
    ) {
        all_parsers(&with_header(page, &body, claimed));
    }

    #[test]
    fn rrti_with_random_lengths(
        sense_len in any::<u8>(),
        tail in proptest::collection::vec(any::<u8>(), 0..700),
        avail in any::<u32>(),
    ) {
        let mut v = vec![0u8; 32];
        v[0..4].copy_from_slice(&avail.to_be_bytes());
        v[13] = sense_len;
        v.extend_from_slice(&tail);
        let _ = RodTokenInformation::parse(&v);
    }

    #[test]
    fn xcopy_with_random_lengths(
        cscd_len in any::<u16>(),
        seg_len in any::<u32>(),
        tail in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut v = vec![0u8; 16];
        v[2..4].copy_from_slice(&cscd_len.to_be_bytes());
        v[8..12].copy_from_slice(&seg_len.to_be_bytes());
        v.extend_from_slice(&tail);
        let _ = ExtendedCopy::parse(&v);
    }
}

#[test]
fn designator_longer_than_page_is_error() {
    let page = with_header(0x83, &[0x01, 0x03, 0x00, 0x10, 1, 2, 3], 7);
    assert!(vpd::parse_device_identification(&page).is_err());
    // PAGE LENGTH claims more than received: clamped, then the short
    // descriptor is an error, not a read past the end.
    let page = with_header(0x83, &[0x01, 0x03, 0x00, 0x02, 1, 2], 400);
    assert_eq!(
        vpd::parse_device_identification(&page).unwrap()[0].designator,
        vec![1, 2]
    );
}
