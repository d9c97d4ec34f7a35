//! The copy engine's steady state allocates nothing per piece: a counting
//! global allocator watches a warmed-up engine copy 1024 scattered extents,
//! bounced and offloaded, and finds a handful of allocations per copy (the
//! per-copy set-up: channels, hazard sweep), not one per piece.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use bdev_stack::{LbaRange, spec};
use copy_engine::{CopyEngine, CopyOptions, Method, copy_in};

struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const PIECES: u64 = 1024;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCATIONS.load(Ordering::Relaxed))
}

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
