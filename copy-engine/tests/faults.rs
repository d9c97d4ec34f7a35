//! Offload failures and a failing mirror leg: data equal to the reference
//! model, or the report names exactly what was not copied.

mod common;

use std::sync::Arc;

use bdev_stack::{
    BlockDevice, CopyFault, CopyFaultHandle, FaultAction, FaultRule, FaultyDevice, IoErrorKind,
    IoOp, LegHealth, MemCopyLimits, MemDevice, Mirror, OffloadErrorKind,
};
use common::{fill, model_copy, r, read_all};
use copy_engine::{CopyEngine, CopyFailure, CopyOptions, Method};

const BS: u64 = 512;

fn offload_leaf(blocks: u64, limits: MemCopyLimits) -> (Arc<dyn BlockDevice>, CopyFaultHandle) {
    let mem = MemDevice::new(blocks * BS, BS as u32, 1 << 20)
        .expect("mem")
        .with_copy_offload(limits)
        .expect("offload");
    let faults = mem.copy_faults().expect("offload-capable leaf has faults");
    (Arc::new(mem), faults)
}

fn engine() -> CopyEngine {
    CopyEngine::new(CopyOptions {
        bounce_bytes: 64 << 10,
        buffer_bytes: 8 << 10,
        ..CopyOptions::default()
    })
    .expect("engine")
}

/// Limits that make one command of each of the three source ranges below.
fn limits() -> MemCopyLimits {
    MemCopyLimits {
        max_ranges: 4,
        max_range_blocks: 64,
        max_command_blocks: 256,
    }
}

/// Gathers three extents (3 ranges, one command) into one, on one leaf.
fn gather(
    dev: &Arc<dyn BlockDevice>,
    engine: &mut CopyEngine,
) -> (copy_engine::CopyReport, Vec<u8>) {
    let mut reference = fill(dev, 7);
    let src = [r(0, 20), r(100, 30), r(200, 10)];
    let dst = [r(400, 60)];
    let report = engine.copy(dev, &src, dev, &dst).expect("copy");
    model_copy(&mut reference, BS as usize, &src, &dst);
    (report, reference)
}

#[test]
fn offload_without_faults_is_one_command() {
    let (dev, faults) = offload_leaf(512, limits());
    let (report, reference) = gather(&dev, &mut engine());
    assert_eq!(read_all(&dev), reference);
    assert!(report.is_complete());
    let nvme = report.method(Method::NvmeCopy);
    assert_eq!((nvme.commands, nvme.bytes), (1, 60 * BS));
    assert_eq!(report.host_bytes(), 0);
    assert_eq!(faults.commands(), 1);
}

#[test]
fn clean_failures_fall_back_to_bounce() {
    for kind in [
        OffloadErrorKind::NotExecuted,
        OffloadErrorKind::Unsupported,
        OffloadErrorKind::TokenExpired,
        OffloadErrorKind::TokenInvalid,
    ] {
        let (dev, faults) = offload_leaf(512, limits());
        faults.push(CopyFault::Clean(kind));
        let (report, reference) = gather(&dev, &mut engine());
        assert_eq!(read_all(&dev), reference, "{kind:?}");
        assert!(report.is_complete());
        assert_eq!(report.fallbacks, 1);
        assert_eq!(report.method(Method::NvmeCopy).bytes, 0);
        assert_eq!(report.method(Method::Bounce).bytes, 60 * BS);
        assert_eq!(faults.injected(), 1);
    }
}

#[test]
fn partial_completion_bounces_only_the_rest() {
    let (dev, faults) = offload_leaf(512, limits());
    // Ranges 0 (20 blocks) done; range 1 scribbled on and reported.
    faults.push(CopyFault::Partial { ranges: 1 });
    let (report, reference) = gather(&dev, &mut engine());
    assert_eq!(read_all(&dev), reference);
    assert!(report.is_complete());
    assert_eq!(report.fallbacks, 1);
    assert_eq!(report.method(Method::NvmeCopy).bytes, 20 * BS);
    assert_eq!(report.method(Method::Bounce).bytes, 40 * BS);
}

#[test]
fn unknown_destination_is_redone_by_bounce() {
    let (dev, faults) = offload_leaf(512, limits());
    faults.push(CopyFault::DestinationUnknown);
    let (report, reference) = gather(&dev, &mut engine());
    assert_eq!(read_all(&dev), reference);
    assert!(report.is_complete());
    assert_eq!(report.fallbacks, 1);
    assert_eq!(report.method(Method::NvmeCopy).bytes, 0);
    assert_eq!(report.method(Method::Bounce).bytes, 60 * BS);
}

#[test]
fn every_command_failing_still_copies_everything() {
    let (dev, faults) = offload_leaf(
        2048,
        MemCopyLimits {
            max_ranges: 2,
            max_range_blocks: 8,
            max_command_blocks: 16,
        },
    );
    faults.set_every(Some(CopyFault::Partial { ranges: 1 }));
    let mut reference = fill(&dev, 3);
    let src = [r(0, 300), r(700, 33)];
    let dst = [r(1000, 333)];
    let report = engine().copy(&dev, &src, &dev, &dst).expect("copy");
    model_copy(&mut reference, BS as usize, &src, &dst);
    assert_eq!(read_all(&dev), reference);
    assert!(report.is_complete());
    let offloaded = report.method(Method::NvmeCopy).bytes;
    assert!(offloaded > 0 && offloaded < 333 * BS);
    assert_eq!(offloaded + report.method(Method::Bounce).bytes, 333 * BS);
    assert_eq!(report.fallbacks, faults.injected());
}

#[test]
fn offload_off_bounces_everything() {
    let (dev, faults) = offload_leaf(512, limits());
    let mut engine = CopyEngine::new(CopyOptions {
        offload: false,
        ..CopyOptions::default()
    })
    .expect("engine");
    let (report, reference) = gather(&dev, &mut engine);
    assert_eq!(read_all(&dev), reference);
    assert_eq!(report.method(Method::Bounce).bytes, 60 * BS);
    assert_eq!(faults.commands(), 0);
}

/// A mirror leg that fails the copy's writes is failed, as for an
/// ordinary write: the copy is complete on the healthy leg, and every read
/// of the mirror returns the new data (before, the leg stayed "healthy"
/// with stale blocks and reads alternated between old and new).
#[test]
fn a_mirror_leg_that_fails_a_copy_write_is_failed_and_the_copy_completes() {
    let src: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(256 * BS, BS as u32, 1 << 20).expect("mem"));
    let good: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(256 * BS, BS as u32, 1 << 20).expect("mem"));
    let (faulty, handle) = FaultyDevice::new(Arc::new(
        MemDevice::new(256 * BS, BS as u32, 1 << 20).expect("mem"),
    ));
    let faulty: Arc<dyn BlockDevice> = Arc::new(faulty);
    let mirror = Arc::new(Mirror::new(vec![Arc::clone(&good), faulty], 64).expect("mirror"));
    let mirror_dev: Arc<dyn BlockDevice> = mirror.clone();
    let src_data = fill(&src, 11);
    let mut expected = fill(&mirror_dev, 12);
    handle.add(FaultRule {
        op: IoOp::Write,
        range: 40..50,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    let report = engine()
        .copy(&src, &[r(0, 100)], &mirror_dev, &[r(20, 100)])
        .expect("copy");
    expected[20 * BS as usize..120 * BS as usize].copy_from_slice(&src_data[..100 * BS as usize]);
    assert!(report.is_complete(), "{report}");
    assert_eq!(
        mirror.health().legs,
        vec![LegHealth::Healthy, LegHealth::Failed],
        "the leg that failed a copy write is failed"
    );
    // Reads spread over the readable legs: every one sees the new data.
    for _ in 0..4 {
        assert!(
            read_all(&mirror_dev) == expected,
            "a read returned stale data"
        );
    }
    assert!(read_all(&good) == expected);
}

/// A source read that fails names the destination range once, on the
/// destination the caller gave (every layer of it was to get the bytes).
#[test]
fn a_failing_source_read_is_named_once_on_the_destination() {
    let (faulty, handle) = FaultyDevice::new(Arc::new(
        MemDevice::new(128 * BS, BS as u32, 1 << 20).expect("mem"),
    ));
    let src: Arc<dyn BlockDevice> = Arc::new(faulty);
    let dst = bdev_stack::spec::build("mirror(region=32, mem:64k, mem:64k)").expect("spec");
    fill(&src, 1);
    handle.add(FaultRule {
        op: IoOp::Read,
        range: 10..11,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    let report = engine()
        .copy(&src, &[r(0, 64)], &dst, &[r(0, 64)])
        .expect("copy");
    assert_eq!(report.not_copied.len(), 1, "{report}");
    let n = report.not_copied[0];
    assert_eq!(n.dst_leaf, dst.info().id);
    assert!(matches!(n.failure, CopyFailure::Read(_)));
    assert!(n.logical <= 10 && 10 < n.logical + n.blocks);
}

#[test]
fn a_failing_mirror_source_leg_is_read_from_another_leg() {
    let (faulty, handle) = FaultyDevice::new(Arc::new(
        MemDevice::new(256 * BS, BS as u32, 1 << 20).expect("mem"),
    ));
    let good: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(256 * BS, BS as u32, 1 << 20).expect("mem"));
    // The failing leg first: it is the primary the mapping reads.
    let mirror = Arc::new(Mirror::new(vec![Arc::new(faulty), good], 64).expect("mirror"));
    let src: Arc<dyn BlockDevice> = Arc::clone(&mirror) as Arc<dyn BlockDevice>;
    let dst: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(256 * BS, BS as u32, 1 << 20).expect("mem"));
    let src_data = fill(&src, 21);
    let mut expected = fill(&dst, 22);
    handle.add(FaultRule {
        op: IoOp::Read,
        range: 30..35,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    let report = engine()
        .copy(&src, &[r(0, 100)], &dst, &[r(50, 100)])
        .expect("copy");
    expected[50 * BS as usize..150 * BS as usize].copy_from_slice(&src_data[..100 * BS as usize]);
    assert!(report.is_complete(), "{report}");
    assert_eq!(read_all(&dst), expected);
    assert!(handle.injected() > 0, "the primary leg was read and failed");
}
