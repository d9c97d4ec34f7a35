//! The copy engine over the SCSI LUN leaf on emulated targets: EXTENDED
//! COPY between LUNs of one target, ROD tokens (POPULATE TOKEN in copy-in,
//! WRITE USING TOKEN with OFFSET INTO ROD in copy-out), a token that
//! expires between the phases, and LUNs of different targets, which have
//! no copy manager in common and are bounced.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bdev_stack::spec::LeafRegistry;
use bdev_stack::{BlockDevice, LbaRange, SgEmuFactory};
use common::{fill, first_replica_mismatch, r};
use copy_engine::{CopyEngine, CopyOptions, CopyReport, Method, RefusalReason, TokenKind, copy_in};

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

/// What the destination must hold after copying `src_ranges` of the
/// source (whose bytes are `src_data`) to `dst_ranges` of the destination
/// (whose bytes were `dst_data`).
fn model(
    src_data: &[u8],
    dst_data: &[u8],
    src_ranges: &[LbaRange],
    dst_ranges: &[LbaRange],
) -> Vec<u8> {
    let mut moved = Vec::new();
    for s in src_ranges {
        moved.extend_from_slice(&src_data[s.lba as usize * BS..(s.lba + s.blocks) as usize * BS]);
    }
    let mut expected = dst_data.to_vec();
    let mut at = 0;
    for d in dst_ranges {
        let len = d.blocks as usize * BS;
        expected[d.lba as usize * BS..][..len].copy_from_slice(&moved[at..at + len]);
        at += len;
    }
    expected
}

/// Source extents and a differently shaped destination (a gather into
/// two destination extents), 300 blocks in all.
fn ranges() -> (Vec<LbaRange>, Vec<LbaRange>) {
    (
        vec![r(5, 120), r(300, 100), r(700, 80)],
        vec![r(40, 170), r(600, 130)],
    )
}

/// Copies with the two phases apart, running `between` in the middle;
/// checks every replica of the destination against the model.
fn run(
    src: &Arc<dyn BlockDevice>,
    dst: &Arc<dyn BlockDevice>,
    between: impl FnOnce(),
) -> CopyReport {
    let src_data = fill(src, 1);
    let dst_data = fill(dst, 2);
    let (src_ranges, dst_ranges) = ranges();
    let tokens = copy_in(src, &src_ranges).expect("copy in");
    between();
    let report = engine()
        .copy_out(dst, &dst_ranges, &tokens)
        .expect("copy out");
    let expected = model(&src_data, &dst_data, &src_ranges, &dst_ranges);
    assert_eq!(
        first_replica_mismatch(dst, &expected, &|_, _| false),
        None,
        "{report}"
    );
    assert!(report.is_complete(), "{report}");
    report
}

const TOTAL: u64 = 300 * BS as u64;

#[test]
fn luns_of_one_target_copy_by_extended_copy() {
    let (registry, _) = registry();
    let src = registry
        .build("concat(sgemu:256k,target=a, sgemu:256k,target=a)")
        .expect("source");
    let dst = registry
        .build("stripe(chunk=32k, sgemu:512k,target=a, sgemu:512k,target=a)")
        .expect("destination");
    let tokens = copy_in(&src, &ranges().0).expect("copy in");
    assert!(
        tokens
            .tokens()
            .iter()
            .all(|t| matches!(t.kind, TokenKind::ExtendedCopy { .. })),
        "every source fragment is an EXTENDED COPY token"
    );
    let report = run(&src, &dst, || {});
    assert_eq!(report.method(Method::ExtendedCopy).bytes, TOTAL, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, 0, "{report}");
    assert_eq!(report.fallbacks, 0);
    assert!(report.method(Method::ExtendedCopy).commands > 0);
}

#[test]
fn luns_of_different_targets_are_bounced() {
    let (registry, _) = registry();
    let src = registry
        .build("concat(sgemu:256k,target=a, sgemu:256k,target=a)")
        .expect("source");
    let dst = registry
        .build("concat(sgemu:512k,target=b, sgemu:512k,target=b)")
        .expect("destination");
    let report = run(&src, &dst, || {});
    assert_eq!(report.method(Method::ExtendedCopy).bytes, 0, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, TOTAL, "{report}");
}

#[test]
fn a_destination_across_targets_offloads_only_where_it_can() {
    let (registry, _) = registry();
    let src = registry
        .build("concat(sgemu:256k,target=a, sgemu:256k,target=a)")
        .expect("source");
    // Destination blocks 0..512 are on target a, 512..1024 on target b:
    // the first destination extent (40..210) offloads, the second
    // (600..730) bounces.
    let dst = registry
        .build("concat(sgemu:256k,target=a, sgemu:256k,target=b)")
        .expect("destination");
    let report = run(&src, &dst, || {});
    assert_eq!(
        report.method(Method::ExtendedCopy).bytes,
        170 * BS as u64,
        "{report}"
    );
    assert_eq!(
        report.method(Method::Bounce).bytes,
        130 * BS as u64,
        "{report}"
    );
}

#[test]
fn rod_tokens_carry_the_copy_on_a_target_with_rod() {
    let (registry, _) = registry();
    let src = registry
        .build("concat(sgemu:256k,target=r,xcopy=off,rod=on, sgemu:256k,target=r,xcopy=off,rod=on)")
        .expect("source");
    let dst = registry
        .build("sgemu:1m,target=r,xcopy=off,rod=on")
        .expect("destination");
    let tokens = copy_in(&src, &ranges().0).expect("copy in");
    assert!(
        tokens
            .tokens()
            .iter()
            .all(|t| matches!(t.kind, TokenKind::Rod { .. })),
        "every source fragment has a ROD token"
    );
    let report = run(&src, &dst, || {});
    assert_eq!(report.method(Method::RodToken).bytes, TOTAL, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, 0, "{report}");
    assert_eq!(report.fallbacks, 0);
}

/// A token that expired between the phases is populated again once, and
/// the copy goes on by WRITE USING TOKEN with the new one.
#[test]
fn a_token_that_expires_between_the_phases_is_populated_again() {
    let (registry, factory) = registry();
    let src = registry
        .build("sgemu:512k,target=e,xcopy=off,rod=on")
        .expect("source");
    let dst = registry
        .build("sgemu:1m,target=e,xcopy=off,rod=on")
        .expect("destination");
    let target = factory.target("e").expect("target");
    let report = run(&src, &dst, || {
        // Past the tokens' inactivity timeout on the target's clock.
        target.advance_clock(Duration::from_secs(3600));
    });
    assert!(report.tokens_repopulated > 0, "{report}");
    assert_eq!(report.method(Method::RodToken).bytes, TOTAL, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, 0, "{report}");
}

/// WRITE USING TOKEN goes only to a LUN of the copy manager that made
/// the token: another target's LUN is not even asked; the report says why.
#[test]
fn a_token_of_another_target_is_bounced_with_the_reason() {
    let (registry, _) = registry();
    let src = registry
        .build("sgemu:512k,target=p,xcopy=off,rod=on")
        .expect("source");
    let dst = registry
        .build("sgemu:1m,target=q,xcopy=off,rod=on")
        .expect("destination");
    let report = run(&src, &dst, || {});
    assert_eq!(report.method(Method::RodToken).bytes, 0, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, TOTAL, "{report}");
    assert_eq!(report.fallbacks, 0, "{report}");
    assert!(
        report
            .refused
            .iter()
            .any(|r| r.reason == RefusalReason::TokenFromOtherCopyManager),
        "{report}"
    );
}
