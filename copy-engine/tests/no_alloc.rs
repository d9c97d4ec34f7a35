//! The copy engine's steady state allocates nothing per piece: a counting
//! global allocator watches a warmed-up engine copy 1024 scattered extents,
//! bounced and offloaded, and finds a handful of allocations per copy (the
//! per-copy set-up: channels, hazard sweep), not one per piece.

mod common;

use bdev_stack::{LbaRange, spec};
use copy_engine::{CopyEngine, CopyOptions, Method, copy_in};

#[path = "../../bdev-stack/tests/support/counting.rs"]
mod counting;

use counting::{CountingAllocator, counted};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const PIECES: u64 = 1024;

#[test]
fn copies_allocate_per_copy_not_per_piece() {
    for (leaf, method) in [
        ("mem:4m", Method::Bounce),
        ("mem:4m,copy=nvme", Method::NvmeCopy),
    ] {
        let dev = spec::build(&format!("stripe(chunk=16, {leaf}, {leaf})")).expect("spec");
        // Every chunk of the memory leaves written once, so the leaves
        // themselves allocate nothing during the copy.
        common::fill(&dev, 1);
        // Gather 1024 scattered 4-block extents into one run.
        let src: Vec<LbaRange> = (0..PIECES)
            .map(|i| LbaRange {
                lba: i * 7,
                blocks: 4,
            })
            .collect();
        let dst = [LbaRange {
            lba: 8192,
            blocks: 4 * PIECES,
        }];
        let tokens = copy_in(&dev, &src).expect("tokens");
        let mut engine = CopyEngine::new(CopyOptions {
            bounce_bytes: 64 << 10,
            buffer_bytes: 8 << 10,
            ..CopyOptions::default()
        })
        .expect("engine");
        engine.copy_out(&dev, &dst, &tokens).expect("warm-up copy");
        let (report, allocations) = counted(|| engine.copy_out(&dev, &dst, &tokens));
        let report = report.expect("copy");
        assert!(report.is_complete());
        // Pieces meeting on one leaf are offloaded where it can; the rest
        // (and everything on plain leaves) bounced.
        assert!(report.method(method).pieces >= PIECES / 4, "{report}");
        let pieces: u64 = Method::ALL.iter().map(|m| report.method(*m).pieces).sum();
        assert!(pieces >= PIECES, "{report}");
        assert!(
            allocations < 64,
            "{leaf}: {allocations} allocations for {PIECES} pieces"
        );
    }
}
