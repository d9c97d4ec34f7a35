//! Overlap safety: a piece overlapping itself on one leaf runs in memmove
//! order (offloaded or bounced); pieces that read what others write are
//! staged through memory, or refused before any byte moves when they
//! cannot fit the budget.

mod common;

use std::sync::Arc;

use bdev_stack::{BlockDevice, MemCopyLimits, MemDevice, spec};
use common::{fill, model_copy, r, read_all};
use copy_engine::{CopyEngine, CopyError, CopyOptions, Method};

const BS: usize = 512;

fn engine(bounce_bytes: usize, buffer_bytes: usize) -> CopyEngine {
    CopyEngine::new(CopyOptions {
        bounce_bytes,
        buffer_bytes,
        ..CopyOptions::default()
    })
    .expect("engine")
}

fn offload_leaf(limits: MemCopyLimits) -> Arc<dyn BlockDevice> {
    Arc::new(
        MemDevice::new(512 * BS as u64, BS as u32, 1 << 20)
            .expect("mem")
            .with_copy_offload(limits)
            .expect("offload"),
    )
}

#[test]
fn overlapping_offload_within_a_leaf_runs_in_memmove_order() {
    // The leaf copies front to back in 64 KiB steps: given the whole
    // overlapping range in one command, it would smear its first blocks.
    let limits = MemCopyLimits {
        max_ranges: 16,
        max_range_blocks: 256,
        max_command_blocks: 256,
    };
    for (src, dst) in [(0u64, 10u64), (10, 0), (5, 200), (200, 5)] {
        let dev = offload_leaf(limits);
        let mut reference = fill(&dev, src * 31 + dst);
        let report = engine(1 << 20, 64 << 10)
            .copy(&dev, &[r(src, 250)], &dev, &[r(dst, 250)])
            .expect("copy");
        model_copy(&mut reference, BS, &[r(src, 250)], &[r(dst, 250)]);
        assert_eq!(read_all(&dev), reference, "{src} -> {dst}");
        assert!(report.is_complete());
        assert_eq!(report.method(Method::NvmeCopy).bytes, 250 * BS as u64);
        assert_eq!(report.host_bytes(), 0);
    }
}

#[test]
fn overlapping_bounce_within_a_leaf_runs_in_memmove_order() {
    for (src, dst) in [(0u64, 3u64), (3, 0), (0, 100), (100, 0)] {
        let dev = spec::build("mem:256k").expect("spec");
        let mut reference = fill(&dev, src + 7 * dst);
        // 16-block buffers, several in flight: a careless pipeline would
        // read blocks it already wrote.
        let report = engine(64 << 10, 8 << 10)
            .copy(&dev, &[r(src, 300)], &dev, &[r(dst, 300)])
            .expect("copy");
        model_copy(&mut reference, BS, &[r(src, 300)], &[r(dst, 300)]);
        assert_eq!(read_all(&dev), reference, "{src} -> {dst}");
        assert_eq!(report.method(Method::Bounce).bytes, 300 * BS as u64);
        assert_eq!(report.method(Method::Staged).bytes, 0);
    }
}

#[test]
fn a_copy_onto_itself_moves_nothing() {
    let dev = spec::build("mem:64k,copy=nvme").expect("spec");
    let reference = fill(&dev, 5);
    let report = engine(1 << 20, 64 << 10)
        .copy(&dev, &[r(10, 20)], &dev, &[r(10, 20)])
        .expect("copy");
    assert_eq!(read_all(&dev), reference);
    assert_eq!(report.bytes_expected, 0);
    assert_eq!(report.offloaded_bytes() + report.host_bytes(), 0);
}

/// Source pieces read what other pieces write: [20,36) -> [8,24) and
/// [0,16) -> [24,40). Run one after the other, in either order, the second
/// would read bytes the first wrote.
fn crossing() -> ([bdev_stack::LbaRange; 2], [bdev_stack::LbaRange; 1]) {
    ([r(20, 16), r(0, 16)], [r(8, 32)])
}

#[test]
fn cross_hazards_are_staged_through_memory() {
    // The lazy leaf performs the newest request first: a write let out
    // before every staged read completed would overtake the older reads.
    for spec_text in [
        "mem:64k",
        "mem:64k,copy=nvme",
        "concat(mem:16k, mem:48k)",
        "lazy:64k",
        "concat(lazy:16k, lazy:48k)",
    ] {
        let dev = common::build(spec_text);
        let mut reference = fill(&dev, 9);
        let (src, dst) = crossing();
        let report = engine(64 << 10, 4 << 10)
            .copy(&dev, &src, &dev, &dst)
            .expect("copy");
        model_copy(&mut reference, BS, &src, &dst);
        assert_eq!(read_all(&dev), reference, "{spec_text}");
        assert_eq!(
            report.method(Method::Staged).bytes,
            32 * BS as u64,
            "{spec_text}"
        );
        assert_eq!(report.offloaded_bytes(), 0);
    }
}

#[test]
fn copy_within_a_mirror_stages_what_legs_share() {
    // Source reads the primary leg; the destination writes both: the
    // primary's pieces cross the reads, so they are staged.
    let dev = spec::build("mirror(region=16, mem:64k,copy=nvme, mem:64k)").expect("spec");
    let mut reference = fill(&dev, 4);
    let (src, dst) = crossing();
    let report = engine(64 << 10, 4 << 10)
        .copy(&dev, &src, &dev, &dst)
        .expect("copy");
    model_copy(&mut reference, BS, &src, &dst);
    assert_eq!(
        common::first_replica_mismatch(&dev, &reference, &|_, _| false),
        None
    );
    assert!(report.is_complete());
    // Staged through the mirror once: it writes both legs.
    assert_eq!(report.host_bytes(), 32 * BS as u64);
    assert_eq!(report.bytes_expected, 2 * 32 * BS as u64);
}

#[test]
fn hazards_beyond_the_budget_are_refused_before_any_byte_moves() {
    let dev = spec::build("mem:64k").expect("spec");
    let reference = fill(&dev, 2);
    let (src, dst) = crossing();
    // One 4 KiB buffer (8 blocks): 32 staged blocks need four.
    let error = engine(4 << 10, 4 << 10)
        .copy(&dev, &src, &dev, &dst)
        .expect_err("cannot stage");
    assert!(
        matches!(
            error,
            CopyError::StagingTooLarge {
                needed_buffers: 4,
                budget_buffers: 1,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(read_all(&dev), reference);
}
