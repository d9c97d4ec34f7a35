//! The engine's EXTENDED COPY and ROD token paths, over a test double of
//! a SCSI copy manager (tests/common/scsi.rs): LUN to LUN through one
//! copy manager offloaded, ROD tokens populated in copy-in and written
//! with OFFSET INTO ROD in copy-out, and invalidated or expired tokens
//! falling back to bounce.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bdev_stack::{BlockDevice, Concat, LbaRange, MemDevice, Stripe};
use common::scsi::{CopyManager, Offers};
use common::{fill, first_replica_mismatch, model_copy, r};
use copy_engine::{CopyEngine, CopyOptions, Method, TokenKind, copy_in};

const BS: u64 = 512;

fn engine() -> CopyEngine {
    CopyEngine::new(CopyOptions {
        bounce_bytes: 64 << 10,
        buffer_bytes: 8 << 10,
        ..CopyOptions::default()
    })
    .expect("engine")
}

const XCOPY: Offers = Offers {
    xcopy: true,
    rod: false,
    max_segments: 4,
    max_token_blocks: 0,
};

const ROD: Offers = Offers {
    xcopy: false,
    rod: true,
    max_segments: 3,
    max_token_blocks: 24,
};

/// Source: a stripe of two LUNs. Destination: a concat of two LUNs and a
/// plain memory leaf.
fn stacks(offers: Offers) -> (CopyManager, Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) {
    let manager = CopyManager::new("tcm_loop:nexus0");
    let src: Arc<dyn BlockDevice> = Arc::new(
        Stripe::new(vec![manager.lun(128, offers), manager.lun(128, offers)], 32).expect("stripe"),
    );
    let plain: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 * BS, 512, 1 << 20).expect("mem"));
    let dst: Arc<dyn BlockDevice> = Arc::new(
        Concat::new(vec![
            manager.lun(100, offers),
            manager.lun(100, offers),
            plain,
        ])
        .expect("concat"),
    );
    (manager, src, dst)
}

/// 150 blocks gathered from three extents, scattered over the concat so
/// that 40 blocks land on the plain leaf (200..210 and 234..264).
fn ranges() -> (Vec<LbaRange>, Vec<LbaRange>) {
    (
        vec![r(3, 70), r(90, 50), r(200, 30)],
        vec![r(20, 60), r(150, 60), r(234, 30)],
    )
}

fn run(offers: Offers, between: impl FnOnce(&CopyManager)) -> copy_engine::CopyReport {
    run_with(offers, |_| {}, between)
}

/// [`run`], with `before` applied to the copy manager before copy-in.
fn run_with(
    offers: Offers,
    before: impl FnOnce(&CopyManager),
    between: impl FnOnce(&CopyManager),
) -> copy_engine::CopyReport {
    let (manager, src, dst) = stacks(offers);
    before(&manager);
    let src_data = fill(&src, 1);
    let mut expected = fill(&dst, 2);
    let (src_ranges, dst_ranges) = ranges();
    let tokens = copy_in(&src, &src_ranges).expect("copy in");
    between(&manager);
    let report = engine()
        .copy_out(&dst, &dst_ranges, &tokens)
        .expect("copy out");
    // The model: gather from the source's bytes into the destination's.
    let mut flat = src_data.clone();
    flat.extend_from_slice(&expected);
    let shifted: Vec<LbaRange> = dst_ranges
        .iter()
        .map(|d| r(d.lba + 256, d.blocks))
        .collect();
    model_copy(&mut flat, BS as usize, &src_ranges, &shifted);
    expected.copy_from_slice(&flat[256 * BS as usize..]);
    assert_eq!(first_replica_mismatch(&dst, &expected, &|_, _| false), None);
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.method(Method::Bounce).bytes % BS, 0);
    report
}

#[test]
fn lun_to_lun_through_one_copy_manager_is_extended_copy() {
    let report = run(XCOPY, |_| {});
    assert_eq!(
        report.method(Method::ExtendedCopy).bytes,
        110 * BS,
        "{report}"
    );
    assert_eq!(
        report.method(Method::Bounce).bytes,
        40 * BS,
        "to the plain leaf"
    );
    assert_eq!(report.fallbacks, 0);
}

#[test]
fn copy_in_populates_rod_tokens_within_the_token_limit() {
    let (_, src, _) = stacks(ROD);
    let tokens = copy_in(&src, &ranges().0).expect("copy in");
    assert!(
        tokens
            .tokens()
            .iter()
            .all(|t| t.blocks <= ROD.max_token_blocks)
    );
    assert!(
        tokens
            .tokens()
            .iter()
            .all(|t| matches!(&t.kind, TokenKind::Rod { token, .. } if token.blocks() == t.blocks))
    );
    assert_eq!(tokens.total_blocks(), 150);
}

#[test]
fn rod_tokens_are_written_with_offsets_into_the_rod() {
    let report = run(ROD, |_| {});
    assert_eq!(report.method(Method::RodToken).bytes, 110 * BS, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, 40 * BS);
    assert_eq!(report.fallbacks, 0);
}

/// Tokens the target dropped between the phases are populated again once
/// and used; tokens that go stale again (below) are bounced.
#[test]
fn invalidated_tokens_are_populated_again_once() {
    let report = run(ROD, CopyManager::invalidate_tokens);
    assert!(report.tokens_repopulated > 0, "{report}");
    assert_eq!(report.method(Method::RodToken).bytes, 110 * BS, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, 40 * BS, "{report}");
}

#[test]
fn expired_tokens_fall_back_to_bounce() {
    let (manager, src, dst) = stacks(ROD);
    manager.set_token_lifetime(Some(Duration::ZERO));
    fill(&src, 1);
    let (src_ranges, dst_ranges) = ranges();
    let tokens = copy_in(&src, &src_ranges).expect("copy in");
    let report = engine()
        .copy_out(&dst, &dst_ranges, &tokens)
        .expect("copy out");
    assert!(report.is_complete());
    assert_eq!(report.method(Method::RodToken).bytes, 0);
    assert_eq!(report.method(Method::Bounce).bytes, 150 * BS);
}

/// A ROD that covers less than asked serves the blocks it covers; the
/// rest gets tokens of its own (before, the whole range was bounced).
#[test]
fn short_rods_serve_what_they_cover() {
    let report = run_with(ROD, |m| m.set_rod_limit(Some(7)), |_| {});
    assert_eq!(report.method(Method::RodToken).bytes, 110 * BS, "{report}");
    assert_eq!(report.method(Method::Bounce).bytes, 40 * BS, "{report}");
}
