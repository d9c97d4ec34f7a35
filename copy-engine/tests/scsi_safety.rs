//! Copy safety over the SCSI LUN leaf on emulated targets: EXTENDED COPY
//! pairs only LUNs of one copy manager whose designators were verified
//! unique, and ROD-token commands are reported as far as the copy manager
//! says they went (RECEIVE ROD TOKEN INFORMATION), the rest bounced.

mod common;

use std::sync::Arc;

use bdev_stack::spec::LeafRegistry;
use bdev_stack::{BlockDevice, CopyOffload, LbaRange, ScsiLeaf, SgEmuFactory};
use common::{fill, r, read_all};
use copy_engine::{CopyEngine, CopyOptions, CopyReport, Method, RefusalReason};
use scsi_sg::cdb;
use scsi_sg::emu::{EmuConfig, EmuTarget, Fault, FaultAction};

const BS: usize = 512;

fn registry() -> (LeafRegistry, Arc<SgEmuFactory>) {
    let factory = Arc::new(SgEmuFactory::new());
    let mut registry = LeafRegistry::with_defaults();
    registry.register("sgemu", factory.clone());
    (registry, factory)
}

fn engine() -> CopyEngine {
    CopyEngine::new(CopyOptions {
        bounce_bytes: 64 << 10,
        buffer_bytes: 8 << 10,
        ..CopyOptions::default()
    })
    .expect("engine")
}

/// Copies `src_ranges` of `src` to `dst_ranges` of `dst` with
/// [`CopyEngine::copy`], then reads both devices back: the source must be
/// unchanged and the destination must hold what the model says.
fn copy_and_check(
    src: &Arc<dyn BlockDevice>,
    src_ranges: &[LbaRange],
    dst: &Arc<dyn BlockDevice>,
    dst_ranges: &[LbaRange],
) -> CopyReport {
    let src_data = fill(src, 11);
    let dst_data = fill(dst, 12);
    let report = engine()
        .copy(src, src_ranges, dst, dst_ranges)
        .expect("copy");
    // The source's bytes gathered from its ranges, scattered over the
    // destination's own bytes at its ranges.
    let mut expected = dst_data.clone();
    let mut gathered = Vec::new();
    for s in src_ranges {
        gathered
            .extend_from_slice(&src_data[s.lba as usize * BS..(s.lba + s.blocks) as usize * BS]);
    }
    let mut at = 0;
    for d in dst_ranges {
        let len = d.blocks as usize * BS;
        expected[d.lba as usize * BS..][..len].copy_from_slice(&gathered[at..at + len]);
        at += len;
    }
    assert!(read_all(src) == src_data, "the source changed: {report}");
    let got = read_all(dst);
    let first_bad = got
        .chunks(BS)
        .zip(expected.chunks(BS))
        .position(|(g, e)| g != e);
    assert_eq!(first_bad, None, "destination block differs: {report}");
    assert!(report.is_complete(), "{report}");
    report
}

fn refused(report: &CopyReport, reason: RefusalReason) -> bool {
    report.refused.iter().any(|r| r.reason == reason)
}

/// Two emulated targets given one name (in two registries, so two
/// factories) are two copy managers: their LUNs are never paired for
/// EXTENDED COPY, whatever their names and designators say. Paired, the
/// copy would run on the destination's target, which resolves the source
/// designator to one of its own LUNs (LIO's CVE-2020-28374, in small).
#[test]
fn targets_with_one_name_are_two_copy_managers() {
    let (first, _) = registry();
    let (second, _) = registry();
    let src = first.build("sgemu:256k,target=a").expect("source");
    let dst = second.build("sgemu:256k,target=a").expect("destination");
    let report = copy_and_check(&src, &[r(10, 100)], &dst, &[r(200, 100)]);
    assert_eq!(report.method(Method::ExtendedCopy).bytes, 0, "{report}");
    assert_eq!(
        report.method(Method::Bounce).bytes,
        100 * BS as u64,
        "{report}"
    );
    assert!(
        refused(&report, RefusalReason::OtherCopyManager),
        "{report}"
    );
}

/// The same for targets without a name: each registry's factory numbers
/// its anonymous targets from one.
#[test]
fn anonymous_targets_of_two_registries_are_two_copy_managers() {
    let (first, _) = registry();
    let (second, _) = registry();
    let src = first.build("sgemu:256k").expect("source");
    let dst = second.build("sgemu:256k").expect("destination");
    let report = copy_and_check(&src, &[r(0, 64), r(300, 36)], &dst, &[r(100, 100)]);
    assert_eq!(report.method(Method::ExtendedCopy).bytes, 0, "{report}");
    assert!(
        refused(&report, RefusalReason::OtherCopyManager),
        "{report}"
    );
}

/// What a leaf says of its EXTENDED COPY designator's uniqueness.
fn designator_unique(leaf: &Arc<dyn BlockDevice>) -> Option<bool> {
    leaf.info().copy_offloads.iter().find_map(|o| match o {
        CopyOffload::ScsiExtendedCopy {
            designator_unique, ..
        } => Some(*designator_unique),
        _ => None,
    })
}

/// A LUN whose designator another LUN of its target also reports (as LIO's
/// truncated serials give) is not verified unique: EXTENDED COPY naming it
/// could read the other LUN, so it is bounced, and the report says why.
#[test]
fn a_repeated_designator_is_never_named_by_extended_copy() {
    let target = EmuTarget::new("dup", EmuConfig::default());
    let first = target.add_memory_lun(512, 512);
    let naa = target.lun_designator(first.index()).expect("designator");
    let twin = target.add_memory_lun_with_designator(512, 512, naa);
    let other = target.add_memory_lun(512, 512);
    let fourth = target.add_memory_lun(512, 512);
    let leaf = |lun| -> Arc<dyn BlockDevice> { Arc::new(ScsiLeaf::from_emu(lun).expect("leaf")) };
    let (first, twin, other, fourth) = (leaf(first), leaf(twin), leaf(other), leaf(fourth));
    assert_eq!(designator_unique(&first), Some(false));
    assert_eq!(designator_unique(&twin), Some(false));
    assert_eq!(designator_unique(&other), Some(true));
    // The first LUN holds other bytes than its twin: a copy that named the
    // twin's designator would read them.
    fill(&first, 99);
    let report = copy_and_check(&twin, &[r(0, 50), r(100, 30)], &other, &[r(300, 80)]);
    assert_eq!(report.method(Method::ExtendedCopy).bytes, 0, "{report}");
    assert!(
        refused(&report, RefusalReason::DesignatorNotUnique),
        "{report}"
    );
    // Between verified LUNs of the target, EXTENDED COPY is still used.
    let report = copy_and_check(&other, &[r(0, 40)], &fourth, &[r(200, 40)]);
    assert_eq!(
        report.method(Method::ExtendedCopy).bytes,
        40 * BS as u64,
        "{report}"
    );
}

/// A ROD-token stack on one target.
fn rod_stacks() -> (
    Arc<SgEmuFactory>,
    Arc<dyn BlockDevice>,
    Arc<dyn BlockDevice>,
) {
    let (registry, factory) = registry();
    let src = registry
        .build("sgemu:512k,target=r,xcopy=off,rod=on")
        .expect("source");
    let dst = registry
        .build("sgemu:1m,target=r,xcopy=off,rod=on")
        .expect("destination");
    (factory, src, dst)
}

fn short(service_action: u8, blocks: u64) -> Fault {
    Fault {
        lun: None,
        opcode: cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(u16::from(service_action)),
        action: FaultAction::ShortTransfer { blocks },
        count: 1,
    }
}

/// A WRITE USING TOKEN that ends GOOD while RECEIVE ROD TOKEN INFORMATION
/// counts fewer blocks written is partial: the blocks it wrote count as
/// offloaded, the rest are bounced, and the data is right.
#[test]
fn a_short_write_using_token_is_partial_and_the_rest_bounced() {
    let (factory, src, dst) = rod_stacks();
    factory
        .target("r")
        .expect("target")
        .inject_fault(short(cdb::TPC_OUT_WRITE_USING_TOKEN, 7));
    let report = copy_and_check(&src, &[r(5, 120), r(300, 100)], &dst, &[r(40, 220)]);
    assert!(report.fallbacks > 0, "{report}");
    let rod = report.method(Method::RodToken).bytes;
    let bounced = report.method(Method::Bounce).bytes;
    // One WRITE USING TOKEN per source range's token (120 and 100
    // blocks); the first wrote 7 blocks, which count as offloaded, and its
    // other 113 were bounced.
    assert_eq!(rod, (7 + 100) * BS as u64, "{report}");
    assert_eq!(bounced, 113 * BS as u64, "{report}");
}

/// A POPULATE TOKEN whose ROD covers less than asked is not taken as
/// whole: the copy is still right and complete.
#[test]
fn a_short_populate_token_leaves_the_copy_right() {
    let (factory, src, dst) = rod_stacks();
    factory
        .target("r")
        .expect("target")
        .inject_fault(short(cdb::TPC_OUT_POPULATE_TOKEN, 9));
    let report = copy_and_check(&src, &[r(5, 120), r(300, 100)], &dst, &[r(40, 220)]);
    assert_eq!(
        report.method(Method::RodToken).bytes + report.method(Method::Bounce).bytes,
        220 * BS as u64,
        "{report}"
    );
}
