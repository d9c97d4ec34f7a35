//! The crate's commands against the in-process target: conformance checks
//! (shared with the VM tests on LIO), every error path, ROD tokens.

use std::time::Duration;

use scsi_sg::cdb;
use scsi_sg::conformance::{self, pattern};
use scsi_sg::emu::{EmuConfig, EmuLun, EmuTarget, Fault, FaultAction};
use scsi_sg::sense::{Sense, SenseKey};
use scsi_sg::tpc::BlockRange;
use scsi_sg::{DataTransfer, Error, ScsiDevice, ScsiStatus, ScsiTransport, TokenProblem};

const BLOCKS: u64 = 4096;

fn target(config: EmuConfig) -> (EmuTarget, ScsiDevice<EmuLun>, ScsiDevice<EmuLun>) {
    let t = EmuTarget::new("t", config);
    let a = ScsiDevice::probe(t.add_memory_lun(BLOCKS, 512)).unwrap();
    let b = ScsiDevice::probe(t.add_memory_lun(BLOCKS, 512)).unwrap();
    (t, a, b)
}

fn sense_of(e: &Error) -> (SenseKey, u8, u8) {
    let s = e.sense().unwrap_or_else(|| panic!("no sense in {e}"));
    (s.key, s.asc, s.ascq)
}

#[test]
fn probe_reports_identity_limits_and_copy() {
    let (_t, a, b) = target(EmuConfig::default());
    conformance::probe_sane(&a).unwrap();
    let id = a.identity();
    assert_eq!(id.inquiry.vendor, "USTOR");
    assert!(id.inquiry.third_party_copy);
    assert_eq!(a.block_count(), BLOCKS);
    assert_eq!(id.serial.as_deref(), Some("t-0000"));
    assert_ne!(a.identity().naa(), b.identity().naa());
    assert_eq!(id.block_limits.unwrap().max_transfer, 8192);
    assert!(id.provisioning.unwrap().lbpu);
    let x = id.copy.extended_copy.as_ref().unwrap();
    assert_eq!((x.max_cscd_descriptors, x.max_segment_descriptors), (2, 1));
    assert_eq!(
        id.copy
            .rod_tokens
            .as_ref()
            .unwrap()
            .limits
            .default_inactivity_timeout,
        30
    );
    assert_eq!(a.report_luns().unwrap(), vec![0, 1 << 48]);
}

#[test]
fn lio_like_target_has_no_tokens() {
    let (t, a, _b) = target(EmuConfig {
        rod: None,
        ..EmuConfig::default()
    });
    let before = t.command_count();
    conformance::no_rod_tokens(&a).unwrap();
    assert_eq!(t.command_count(), before, "a token command was sent");
    assert!(!a.identity().vpd_pages.contains(&0x8f));
    // Sent raw anyway, the target answers like LIO.
    let p = scsi_sg::tpc::PopulateToken {
        immed: false,
        rod_type: None,
        inactivity_timeout: 0,
        ranges: vec![BlockRange { lba: 0, blocks: 1 }],
    }
    .to_bytes();
    let e = a
        .transport()
        .execute_checked(
            &cdb::populate_token(1, p.len() as u32),
            DataTransfer::ToDevice(&p),
            Duration::from_secs(1),
        )
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x20, 0x00));
}

#[test]
fn read_write_verify_and_errors() {
    let (_t, a, _b) = target(EmuConfig::default());
    conformance::write_read_verify(&a, 100, 64, 1).unwrap();
    conformance::write_read_verify(&a, BLOCKS - 8, 8, 2).unwrap();
    conformance::error_paths(&a).unwrap();
    // Buffer not whole blocks.
    assert!(matches!(
        a.write(0, &[0u8; 100], false),
        Err(Error::InvalidRequest { .. })
    ));
    // Raw WRITE(16) past the end.
    let e = a
        .transport()
        .execute_checked(
            &cdb::write16(BLOCKS, 1, false),
            DataTransfer::ToDevice(&[0u8; 512]),
            Duration::from_secs(1),
        )
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x21, 0x00));
    // Bad READ CAPACITY service action.
    let mut buf = [0u8; 32];
    let mut c = cdb::read_capacity16(32);
    c[1] = 0x1f;
    let o = a
        .transport()
        .execute(
            &c,
            DataTransfer::FromDevice(&mut buf),
            Duration::from_secs(1),
        )
        .unwrap();
    let s = o.sense().unwrap().unwrap();
    assert_eq!((s.asc, s.field_pointer().unwrap().byte), (0x24, 1));
    // Unknown VPD page.
    let e = scsi_sg::vpd_page(a.transport(), 0xc7, Duration::from_secs(1)).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x24, 0x00));
}

#[test]
fn unmap_and_write_same() {
    let (_t, a, _b) = target(EmuConfig::default());
    a.write(10, &pattern(3, 512 * 4), false).unwrap();
    a.unmap(&[(10, 2)]).unwrap();
    let mut back = vec![0u8; 512 * 4];
    a.read(10, &mut back).unwrap();
    assert!(back[..1024].iter().all(|&b| b == 0));
    assert_eq!(back[1024..], pattern(3, 2048)[1024..]);
    a.write_same(20, 3, &[0xab; 512], false).unwrap();
    a.read(20, &mut back[..1536]).unwrap();
    assert!(back[..1536].iter().all(|&b| b == 0xab));
    a.write_same(20, 3, &[0; 512], true).unwrap();
    a.read(20, &mut back[..1536]).unwrap();
    assert!(back[..1536].iter().all(|&b| b == 0));
    // UNMAP with non-zero data is refused; UNMAP out of range too.
    assert_eq!(
        sense_of(&a.write_same(20, 1, &[1; 512], true).unwrap_err()),
        (SenseKey::IllegalRequest, 0x24, 0x00)
    );
    let p = cdb::unmap_parameters(&[(BLOCKS, 1)]).unwrap();
    let e = a
        .transport()
        .execute_checked(
            &cdb::unmap(p.len() as u16),
            DataTransfer::ToDevice(&p),
            Duration::from_secs(1),
        )
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x21, 0x00));
}

#[test]
fn extended_copy_conformance_and_splitting() {
    let (t, a, b) = target(EmuConfig::default());
    conformance::extended_copy(&a, &b, 0, 100, 300, 7).unwrap();
    // Same LUN, a copy that needs several commands (64 KiB segments).
    let t2 = EmuTarget::new(
        "small",
        EmuConfig {
            copy: scsi_sg::tpc::CopyOperatingParameters {
                max_segment_length: 64 << 10,
                ..scsi_sg::tpc::CopyOperatingParameters::lio()
            },
            ..EmuConfig::default()
        },
    );
    let c = ScsiDevice::probe(t2.add_memory_lun(BLOCKS, 512)).unwrap();
    c.write(0, &pattern(9, 512 * 300), false).unwrap();
    assert_eq!(c.copy_to(0, &c, 1000, 300).unwrap(), 3);
    let mut back = vec![0u8; 512 * 300];
    c.read(1000, &mut back).unwrap();
    assert_eq!(back, pattern(9, 512 * 300));
    // Overlapping ranges on one LUN, both directions: memmove semantics.
    let data = pattern(21, 512 * 100);
    c.write(2000, &data, false).unwrap();
    assert_eq!(c.copy_to(2000, &c, 2030, 100).unwrap(), 4);
    let mut back = vec![0u8; 512 * 100];
    c.read(2030, &mut back).unwrap();
    assert!(back == data, "overlapping copy upwards corrupted the data");
    assert_eq!(c.copy_to(2030, &c, 2010, 100).unwrap(), 5);
    c.read(2010, &mut back).unwrap();
    assert!(
        back == data,
        "overlapping copy downwards corrupted the data"
    );
    // A LUN of another target is not reachable from this copy manager.
    let e = a.copy_to(0, &c, 0, 1).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::CopyAborted, 0x0d, 0x02));
    // Destination range past the end is refused before sending.
    let before = t.command_count();
    assert!(matches!(
        a.copy_to(0, &b, BLOCKS - 1, 2),
        Err(Error::InvalidRequest { .. })
    ));
    assert_eq!(t.command_count(), before);
}

#[test]
fn rod_token_copy_with_offset() {
    let (_t, a, b) = target(EmuConfig::default());
    let src = pattern(11, 512 * 64);
    a.write(0, &src, false).unwrap();
    let token = a
        .populate_token(
            7,
            &[
                BlockRange { lba: 0, blocks: 32 },
                BlockRange {
                    lba: 32,
                    blocks: 32,
                },
            ],
            0,
        )
        .unwrap();
    let info = a.receive_rod_token_information(7).unwrap();
    assert_eq!(info.transfer_count, 64);
    assert_eq!(info.transfer_count_units, 0xf1);
    b.write_using_token(
        8,
        &token,
        16,
        &[BlockRange {
            lba: 100,
            blocks: 40,
        }],
        false,
    )
    .unwrap();
    let mut back = vec![0u8; 512 * 40];
    b.read(100, &mut back).unwrap();
    assert_eq!(back, src[512 * 16..512 * 56]);
    let w = b.receive_rod_token_information(8).unwrap();
    assert_eq!((w.copy_operation_status, w.transfer_count), (1, 40));
    // Offset past the ROD.
    let e = b
        .write_using_token(9, &token, 64, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x26, 0x00));
    // DEL_TKN: usable this once, then deleted.
    b.write_using_token(9, &token, 0, &[BlockRange { lba: 0, blocks: 1 }], true)
        .unwrap();
    let e = b
        .write_using_token(9, &token, 0, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Token {
                problem: TokenProblem::Deleted,
                ..
            }
        ),
        "{e}"
    );
    // Unknown list identifier for RRTI.
    let e = a.receive_rod_token_information(0xdead).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x24, 0x00));
}

#[test]
fn rod_token_expired_gives_typed_error_not_data() {
    let (t, a, b) = target(EmuConfig::default());
    a.write(0, &pattern(1, 512 * 8), false).unwrap();
    b.write(0, &[0xee; 512 * 8], false).unwrap();
    let token = a
        .populate_token(1, &[BlockRange { lba: 0, blocks: 8 }], 5)
        .unwrap();
    t.advance_clock(Duration::from_secs(6));
    let e = b
        .write_using_token(2, &token, 0, &[BlockRange { lba: 0, blocks: 8 }], false)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Token {
                problem: TokenProblem::Expired,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x23, 0x07));
    let mut back = vec![0u8; 512 * 8];
    b.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0xee), "destination was written");
    // Use within the timeout keeps it alive.
    let token = a
        .populate_token(3, &[BlockRange { lba: 0, blocks: 8 }], 5)
        .unwrap();
    t.advance_clock(Duration::from_secs(4));
    b.write_using_token(4, &token, 0, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap();
    t.advance_clock(Duration::from_secs(4));
    b.write_using_token(4, &token, 0, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap();
    // Timeout over the device's maximum is refused.
    let e = a
        .populate_token(5, &[BlockRange { lba: 0, blocks: 8 }], 100_000)
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x26, 0x00));
}

#[test]
fn rod_token_revoked_when_source_overwritten() {
    let (_t, a, b) = target(EmuConfig::default());
    a.write(0, &pattern(1, 512 * 16), false).unwrap();
    let token = a
        .populate_token(1, &[BlockRange { lba: 4, blocks: 8 }], 0)
        .unwrap();
    // A write outside the token's ranges leaves it valid.
    a.write(12, &[1u8; 512], false).unwrap();
    b.write_using_token(2, &token, 0, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap();
    // A write into them revokes it.
    a.write(11, &[2u8; 512], false).unwrap();
    b.write(50, &[0x77; 512 * 8], false).unwrap();
    let e = b
        .write_using_token(2, &token, 0, &[BlockRange { lba: 50, blocks: 8 }], false)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Token {
                problem: TokenProblem::Revoked,
                ..
            }
        ),
        "{e}"
    );
    let mut back = vec![0u8; 512 * 8];
    b.read(50, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0x77), "stale data written");
    // UNMAP of a source block revokes too.
    let token = a
        .populate_token(3, &[BlockRange { lba: 0, blocks: 2 }], 0)
        .unwrap();
    a.unmap(&[(1, 1)]).unwrap();
    let e = b
        .write_using_token(4, &token, 0, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap_err();
    assert!(matches!(
        e,
        Error::Token {
            problem: TokenProblem::Revoked,
            ..
        }
    ));
}

#[test]
fn rod_token_tampered_or_unknown() {
    let (_t, a, b) = target(EmuConfig::default());
    let token = a
        .populate_token(1, &[BlockRange { lba: 0, blocks: 2 }], 0)
        .unwrap();
    let mut bad = token.clone();
    bad.0[20] ^= 1;
    let e = b
        .write_using_token(2, &bad, 0, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Token {
                problem: TokenProblem::Corrupt,
                ..
            }
        ),
        "{e}"
    );
    let mut other_type = token.clone();
    other_type.0[0..4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let e = b
        .write_using_token(
            2,
            &other_type,
            0,
            &[BlockRange { lba: 0, blocks: 1 }],
            false,
        )
        .unwrap_err();
    assert!(matches!(
        e,
        Error::Token {
            problem: TokenProblem::UnsupportedType,
            ..
        }
    ));
    // Range descriptors over the device's maximum.
    let many = vec![BlockRange { lba: 0, blocks: 1 }; 9];
    let e = a.populate_token(5, &many, 0).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x26, 0x00));
}

#[test]
fn unit_attention_retried_once_by_probe_and_reported_by_tur() {
    let t = EmuTarget::new("ua", EmuConfig::default());
    let lun = t.add_memory_lun(64, 512);
    t.raise_unit_attention(0, None);
    // INQUIRY does not consume it; READ CAPACITY does, and is retried.
    let dev = ScsiDevice::probe(lun.clone()).unwrap();
    assert_eq!(dev.block_count(), 64);
    t.raise_unit_attention(0, Some(Sense::new(SenseKey::UnitAttention, 0x2a, 0x09)));
    let e = lun
        .execute_checked(
            &cdb::test_unit_ready(),
            DataTransfer::None,
            Duration::from_secs(1),
        )
        .unwrap_err();
    assert!(e.is_unit_attention());
    assert!(e.to_string().contains("CAPACITY DATA HAS CHANGED"), "{e}");
    lun.execute_checked(
        &cdb::test_unit_ready(),
        DataTransfer::None,
        Duration::from_secs(1),
    )
    .unwrap();
}

#[test]
fn injected_faults() {
    let t = EmuTarget::new("f", EmuConfig::default());
    let dev = ScsiDevice::probe(t.add_memory_lun(64, 512)).unwrap();
    t.inject_fault(Fault {
        lun: Some(0),
        opcode: cdb::READ_16,
        service_action: None,
        action: FaultAction::Sense(Sense::new(SenseKey::MediumError, 0x11, 0x00)),
        count: 1,
    });
    let mut buf = [0u8; 512];
    let e = dev.read(0, &mut buf).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::MediumError, 0x11, 0x00));
    dev.read(0, &mut buf).unwrap();
    t.inject_fault(Fault {
        lun: None,
        opcode: cdb::WRITE_16,
        service_action: None,
        action: FaultAction::Status(ScsiStatus::TaskSetFull),
        count: 1,
    });
    assert!(matches!(
        dev.write(0, &buf, false),
        Err(Error::Status {
            status: ScsiStatus::TaskSetFull,
            ..
        })
    ));
    t.inject_fault(Fault {
        lun: None,
        opcode: cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(0),
        action: FaultAction::Timeout,
        count: 1,
    });
    assert!(matches!(
        dev.copy_to(0, &dev, 10, 1),
        Err(Error::Timeout { .. })
    ));
    // Faults during the probe: a BUSY READ CAPACITY fails it cleanly.
    let t2 = EmuTarget::new("f2", EmuConfig::default());
    let lun = t2.add_memory_lun(64, 512);
    t2.inject_fault(Fault {
        lun: None,
        opcode: cdb::SERVICE_ACTION_IN_16,
        service_action: Some(0x10),
        action: FaultAction::Status(ScsiStatus::Busy),
        count: 1,
    });
    assert!(matches!(
        ScsiDevice::probe(lun),
        Err(Error::Status {
            status: ScsiStatus::Busy,
            ..
        })
    ));
}

#[test]
fn file_backed_lun() {
    let path = std::env::temp_dir().join(format!("scsi-sg-emu-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(512 * 128).unwrap();
    let t = EmuTarget::new("file", EmuConfig::default());
    let dev = ScsiDevice::probe(t.add_file_lun(f, 512).unwrap()).unwrap();
    assert_eq!(dev.block_count(), 128);
    conformance::write_read_verify(&dev, 3, 10, 5).unwrap();
    let m = ScsiDevice::probe(t.add_memory_lun(128, 512)).unwrap();
    conformance::extended_copy(&dev, &m, 0, 0, 16, 6).unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn copy_status_held_for_a_list_id() {
    use scsi_sg::tpc::{CscdId, ExtendedCopy, Segment};
    let (_t, a, b) = target(EmuConfig::default());
    a.write(0, &pattern(4, 512 * 4), false).unwrap();
    let id = |d: &ScsiDevice<EmuLun>| CscdId {
        naa: d.identity().naa().unwrap().to_vec(),
        block_len: 512,
    };
    a.extended_copy(&ExtendedCopy {
        list_id: 42,
        no_list_id: false,
        cscds: vec![id(&a), id(&b)],
        segments: vec![Segment {
            source: 0,
            destination: 1,
            blocks: 4,
            source_lba: 0,
            destination_lba: 8,
        }],
    })
    .unwrap();
    let s = a.receive_copy_status(42).unwrap();
    assert_eq!(
        (s.status, s.segments_processed, s.transfer_count),
        (1, 1, 2)
    );
    let e = a.receive_copy_status(43).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x24, 0x00));
    // A copy whose segment runs past the destination: COPY ABORTED, LBA
    // OUT OF RANGE.
    let e = a
        .extended_copy(&ExtendedCopy {
            list_id: 0,
            no_list_id: true,
            cscds: vec![id(&a), id(&b)],
            segments: vec![Segment {
                source: 0,
                destination: 1,
                blocks: 4,
                source_lba: 0,
                destination_lba: BLOCKS - 2,
            }],
        })
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::CopyAborted, 0x21, 0x00));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any CDB and parameter data: the target answers (status and
        /// sense as data) and never panics.
        #[test]
        fn random_cdbs_never_panic(
            cdb in proptest::collection::vec(any::<u8>(), 1..32),
            data in proptest::collection::vec(any::<u8>(), 0..1200),
            out in any::<bool>(),
            alloc in 0usize..2048,
        ) {
            let t = EmuTarget::new("fuzz", EmuConfig::default());
            let lun = t.add_memory_lun(64, 512);
            t.add_memory_lun(64, 512);
            let r = if out {
                lun.execute(&cdb, DataTransfer::ToDevice(&data), Duration::from_secs(1))
            } else {
                let mut buf = vec![0u8; alloc];
                lun.execute(&cdb, DataTransfer::FromDevice(&mut buf), Duration::from_secs(1))
            };
            let o = r.unwrap();
            prop_assert!(o.transferred() <= o.requested());
            if o.status == ScsiStatus::CheckCondition {
                prop_assert!(o.sense().is_some_and(|s| s.is_ok()));
            }
        }

        /// Writes, UNMAPs and EXTENDED COPYs on two LUNs agree with a flat
        /// byte-array model.
        #[test]
        fn matches_flat_model(ops in proptest::collection::vec(
            (0u8..3, 0u64..60, 0u64..60, 1u64..5, any::<u8>(), any::<bool>()), 1..30)
        ) {
            let (_t, a, b) = target(EmuConfig::default());
            let mut model = [vec![0u8; (BLOCKS * 512) as usize], vec![0u8; (BLOCKS * 512) as usize]];
            let devs = [&a, &b];
            for (kind, x, y, n, fill, which) in ops {
                let (si, di) = if which { (0, 1) } else { (1, 0) };
                let len = (n * 512) as usize;
                match kind {
                    0 => {
                        devs[si].write(x, &vec![fill; len], false).unwrap();
                        model[si][(x * 512) as usize..][..len].fill(fill);
                    }
                    1 => {
                        devs[si].unmap(&[(x, n as u32)]).unwrap();
                        model[si][(x * 512) as usize..][..len].fill(0);
                    }
                    _ => {
                        devs[si].copy_to(x, devs[di], y, n).unwrap();
                        let src = model[si][(x * 512) as usize..][..len].to_vec();
                        model[di][(y * 512) as usize..][..len].copy_from_slice(&src);
                    }
                }
            }
            for (i, d) in devs.iter().enumerate() {
                let mut back = vec![0u8; 64 * 512];
                d.read(0, &mut back).unwrap();
                prop_assert_eq!(&back[..], &model[i][..64 * 512]);
            }
        }
    }
}

/// Designators come from the target's identity, not its name: two targets
/// given one name report different designators, and EXTENDED COPY on one
/// cannot name a LUN of the other.
#[test]
fn targets_with_one_name_report_different_designators() {
    let first = EmuTarget::new("same", EmuConfig::default());
    let second = EmuTarget::new("same", EmuConfig::default());
    let a = ScsiDevice::probe(first.add_memory_lun(BLOCKS, 512)).unwrap();
    let b = ScsiDevice::probe(second.add_memory_lun(BLOCKS, 512)).unwrap();
    assert_ne!(a.identity().naa(), b.identity().naa());
    assert_eq!(a.identity().naa().map(<[u8]>::len), Some(16));
    assert_eq!(
        first.lun_designator(0).as_ref().map(|d| &d[..]),
        a.identity().naa()
    );
    assert!(!std::sync::Arc::ptr_eq(first.state(), second.state()));
    assert!(std::sync::Arc::ptr_eq(first.state(), first.clone().state()));
    b.write(0, &[0x5a; 512], false).unwrap();
    let e = a.copy_to(0, &b, 0, 1).unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::CopyAborted, 0x0d, 0x02));
    let mut back = [0u8; 512];
    b.read(0, &mut back).unwrap();
    assert!(
        back.iter().all(|&x| x == 0x5a),
        "the other target's LUN was written"
    );
}

/// A LUN added with another LUN's designator reports it: the target then
/// resolves EXTENDED COPY's identification descriptor to the first LUN
/// that has it, as a target with repeated designators would.
#[test]
fn a_repeated_designator_is_reported_as_given() {
    let t = EmuTarget::new("dup", EmuConfig::default());
    let a = ScsiDevice::probe(t.add_memory_lun(BLOCKS, 512)).unwrap();
    let naa = t.lun_designator(0).unwrap();
    let twin = ScsiDevice::probe(t.add_memory_lun_with_designator(BLOCKS, 512, naa)).unwrap();
    assert_eq!(a.identity().naa(), twin.identity().naa());
    assert_eq!(t.lun_count(), 2);
}

/// A WRITE USING TOKEN hit by a short transfer ends GOOD having written
/// only the first blocks; RECEIVE ROD TOKEN INFORMATION says how many.
#[test]
fn a_short_write_using_token_ends_good_with_a_smaller_transfer_count() {
    let (t, a, b) = target(EmuConfig::default());
    let src = pattern(31, 512 * 32);
    a.write(0, &src, false).unwrap();
    b.write(0, &[0xee; 512 * 32], false).unwrap();
    let token = a
        .populate_token(1, &[BlockRange { lba: 0, blocks: 32 }], 0)
        .unwrap();
    t.inject_fault(Fault {
        lun: Some(1),
        opcode: cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(u16::from(cdb::TPC_OUT_WRITE_USING_TOKEN)),
        action: FaultAction::ShortTransfer { blocks: 10 },
        count: 1,
    });
    b.write_using_token(2, &token, 0, &[BlockRange { lba: 0, blocks: 32 }], false)
        .unwrap();
    let info = b.receive_rod_token_information(2).unwrap();
    assert_eq!(info.transfer_count_blocks(), Some(10));
    assert_eq!(info.copy_operation_status, 0x03);
    assert!(info.completed());
    let mut back = vec![0u8; 512 * 32];
    b.read(0, &mut back).unwrap();
    assert_eq!(back[..512 * 10], src[..512 * 10]);
    assert!(
        back[512 * 10..].iter().all(|&x| x == 0xee),
        "wrote past the count"
    );
}

/// A POPULATE TOKEN hit by a short transfer makes a token for the first
/// blocks of its ranges only, and says so in the transfer count.
#[test]
fn a_short_populate_token_represents_the_first_blocks() {
    let (t, a, b) = target(EmuConfig::default());
    let src = pattern(32, 512 * 64);
    a.write(0, &src, false).unwrap();
    t.inject_fault(Fault {
        lun: Some(0),
        opcode: cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(u16::from(cdb::TPC_OUT_POPULATE_TOKEN)),
        action: FaultAction::ShortTransfer { blocks: 20 },
        count: 1,
    });
    let info = a
        .populate_token_information(
            3,
            &[
                BlockRange { lba: 0, blocks: 16 },
                BlockRange {
                    lba: 40,
                    blocks: 16,
                },
            ],
            0,
        )
        .unwrap();
    assert_eq!(info.transfer_count_blocks(), Some(20));
    let token = info.token.unwrap();
    // The ROD is 16 blocks from 0, then 4 from 40: an offset past it is
    // refused, and the last block it has is block 43.
    let e = b
        .write_using_token(4, &token, 20, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x26, 0x00));
    b.write_using_token(5, &token, 19, &[BlockRange { lba: 0, blocks: 1 }], false)
        .unwrap();
    let mut back = vec![0u8; 512];
    b.read(0, &mut back).unwrap();
    assert_eq!(back, src[512 * 43..512 * 44]);
}

#[test]
fn a_huge_lun_costs_what_is_written_and_bounds_each_command() {
    // 4000 TiB declared: stored sparsely, usable at both ends.
    let t = EmuTarget::new("huge", EmuConfig::default());
    let blocks = (4000u64 << 40) / 512;
    let lun = ScsiDevice::probe(t.add_memory_lun(blocks, 512)).unwrap();
    assert_eq!(lun.block_count(), blocks);
    conformance::write_read_verify(&lun, blocks - 64, 64, 7).unwrap();
    // A READ longer than Block Limits' MAXIMUM TRANSFER LENGTH (8192) is
    // refused, as real targets refuse it, instead of answering with 2 TiB.
    let mut buf = [0u8; 512];
    let e = lun
        .transport()
        .execute_checked(
            &cdb::read16(0, u32::MAX, false),
            DataTransfer::FromDevice(&mut buf),
            Duration::from_secs(1),
        )
        .unwrap_err();
    assert_eq!(sense_of(&e), (SenseKey::IllegalRequest, 0x24, 0x00));
    assert_eq!(
        lun.identity().block_limits.unwrap().max_transfer,
        8192,
        "the limit the target refuses by is the one it advertises"
    );
}
