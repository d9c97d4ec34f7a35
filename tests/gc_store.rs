//! The log-structured store over stacks: relocation by offload and by
//! bounce, fallbacks when the device's copy fails, reopening, and the
//! errors a user can provoke.

use std::sync::Arc;

use ustor::bdev_stack::{
    BlockDevice, CopyFault, FaultAction, FaultHandle, FaultRule, FaultyDevice, IoErrorKind, IoOp,
    MemCopyLimits, MemDevice, OffloadErrorKind, spec,
};
use ustor::gc::{
    GcError, LogStore, Policy, RunOptions, StoreOptions, Workload, check_block, compare, run,
};

fn opts(offload: bool) -> RunOptions {
    RunOptions {
        store: StoreOptions {
            segment_bytes: 64 << 10,
            fill: 0.75,
            policy: Policy::Greedy,
            offload,
        },
        workload: Workload {
            overwrites: 6000,
            hot_cold: false,
            seed: 3,
        },
        verify: true,
    }
}

fn mem_with_copy() -> (Arc<dyn BlockDevice>, ustor::bdev_stack::CopyFaultHandle) {
    let dev = MemDevice::new(8 << 20, 4096, 1 << 20)
        .and_then(|d| d.with_copy_offload(MemCopyLimits::default()))
        .expect("memory leaf with copy");
    let faults = dev.copy_faults().expect("copy faults");
    (Arc::new(dev), faults)
}

#[test]
fn offload_relocates_by_device_copy_and_bounce_through_the_host() {
    let (dev, faults) = mem_with_copy();
    let c = compare(&dev, &opts(true), &mut |_, _| {}).expect("compare");
    let (o, b) = (&c.offload, &c.bounce);
    assert_eq!(o.verified_blocks, Some(o.logical_blocks));
    assert_eq!(b.verified_blocks, Some(b.logical_blocks));
    assert!(o.stats.blocks_relocated > 0, "{o:?}");
    // The same workload and policy relocate the same blocks either way.
    assert_eq!(o.stats.blocks_relocated, b.stats.blocks_relocated);
    assert_eq!(o.stats.segments_cleaned, b.stats.segments_cleaned);
    let bytes = o.stats.blocks_relocated * 4096;
    assert_eq!((o.stats.bytes_offloaded, o.stats.bytes_bounced), (bytes, 0));
    assert_eq!((b.stats.bytes_offloaded, b.stats.bytes_bounced), (0, bytes));
    assert!(faults.commands() > 0);
    assert!(o.write_amplification > 1.0 && o.write_amplification < 10.0);
}

#[test]
fn failed_offloads_fall_back_and_lose_nothing() {
    for fault in [
        CopyFault::Clean(OffloadErrorKind::Unsupported),
        CopyFault::DestinationUnknown,
        CopyFault::Partial { ranges: 1 },
    ] {
        let (dev, faults) = mem_with_copy();
        faults.set_every(Some(fault));
        let r = run(&dev, &opts(true)).unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(r.verified_blocks, Some(r.logical_blocks), "{fault:?}");
        assert!(faults.injected() > 0, "{fault:?} never injected");
        assert!(r.stats.bytes_bounced > 0, "{fault:?}: nothing fell back");
    }
}

#[test]
fn stripe_offloads_within_a_leaf_and_bounces_across() {
    let dev = spec::build("stripe(chunk=32k, mem:8m,bs=4096,copy=nvme, mem:8m,bs=4096,copy=nvme)")
        .expect("stripe");
    let r = run(&dev, &opts(true)).expect("run");
    assert_eq!(r.verified_blocks, Some(r.logical_blocks));
    assert!(r.stats.bytes_offloaded > 0, "{:?}", r.stats);
    assert!(r.stats.bytes_bounced > 0, "{:?}", r.stats);
}

#[test]
fn cost_benefit_beats_greedy_on_hot_and_cold_data() {
    let dev: Arc<dyn BlockDevice> = spec::build("mem:16m,bs=4096").expect("mem");
    let mut o = opts(false);
    o.workload = Workload {
        overwrites: 30_000,
        hot_cold: true,
        seed: 5,
    };
    o.verify = false;
    let greedy = run(&dev, &o).expect("greedy");
    o.store.policy = Policy::CostBenefit;
    let cb = run(&dev, &o).expect("cost-benefit");
    assert!(
        cb.write_amplification < greedy.write_amplification,
        "cost-benefit {} vs greedy {}",
        cb.write_amplification,
        greedy.write_amplification
    );
}

#[test]
fn a_synced_store_reopens_with_every_block() {
    let dev: Arc<dyn BlockDevice> = spec::build("mem:4m,bs=512").expect("mem");
    let o = StoreOptions {
        segment_bytes: 8 << 10,
        fill: 0.5,
        ..StoreOptions::default()
    };
    let mut store = LogStore::format(Arc::clone(&dev), &o).expect("format");
    let n = store.logical_blocks();
    let mut block = vec![0u8; 512];
    for lbn in (0..n).step_by(3) {
        Workload::content(lbn, 1, &mut block);
        store.write(lbn, &block).expect("write");
    }
    // Written but not committed: readable now, gone after a reopen.
    Workload::content(1, 1, &mut block);
    store.sync().expect("sync");
    store.write(1, &block).expect("write");
    assert!(store.read(1, &mut block).expect("read"));
    drop(store);
    let mut store = LogStore::open(Arc::clone(&dev), &o).expect("open");
    let mut scratch = vec![0u8; 512];
    for lbn in 0..n {
        let written = store.read(lbn, &mut block).expect("read");
        let version = u64::from(lbn % 3 == 0);
        assert_eq!(written, version == 1, "block {lbn}");
        check_block(lbn, version, &block, &mut scratch).expect("content");
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let dev: Arc<dyn BlockDevice> = spec::build("mem:4m,bs=4096").expect("mem");
    let o = StoreOptions {
        segment_bytes: 64 << 10,
        ..StoreOptions::default()
    };
    // Nothing formatted yet.
    assert!(matches!(
        LogStore::open(Arc::clone(&dev), &o),
        Err(GcError::NotAStore { .. })
    ));
    for (bad, what) in [
        (
            StoreOptions {
                fill: 0.99,
                ..o.clone()
            },
            "fill past the reserve",
        ),
        (
            StoreOptions {
                fill: 0.0,
                ..o.clone()
            },
            "zero fill",
        ),
        (
            StoreOptions {
                fill: f64::NAN,
                ..o.clone()
            },
            "NaN fill",
        ),
        (
            StoreOptions {
                segment_bytes: 1000,
                ..o.clone()
            },
            "partial blocks",
        ),
        (
            StoreOptions {
                segment_bytes: 4096,
                ..o.clone()
            },
            "no room for summaries",
        ),
    ] {
        assert!(
            matches!(
                LogStore::format(Arc::clone(&dev), &bad),
                Err(GcError::Config(_))
            ),
            "{what}"
        );
    }
    let mut store = LogStore::format(Arc::clone(&dev), &o).expect("format");
    let n = store.logical_blocks();
    let block = vec![0u8; 4096];
    assert!(matches!(
        store.write(n, &block),
        Err(GcError::OutOfRange { lbn, logical_blocks }) if lbn == n && logical_blocks == n
    ));
    assert!(matches!(
        store.write(0, &block[..512]),
        Err(GcError::Config(_))
    ));
    let mut out = vec![0u8; 4096];
    assert!(matches!(
        store.read(u64::MAX, &mut out),
        Err(GcError::OutOfRange { .. })
    ));
    assert!(!store.read(0, &mut out).expect("unwritten block"));
    drop(store);
    // A store formatted on 4 KiB blocks is not one on 512-byte blocks:
    // scribble the superblock and it is not a store either.
    let mut raw = vec![0u8; 4096];
    let mut ch =
        ustor::bdev_stack::OwnedChannel::<ustor::bdev_stack::HostBuffer>::open(dev.as_ref(), 1)
            .expect("channel");
    let mut buf = ustor::bdev_stack::HostBuffer::new(4096).expect("buffer");
    raw[100] = 0xff;
    buf.as_mut_slice().copy_from_slice(&raw);
    ch.write(0, 1, buf, 0).map_err(|r| r.error).expect("write");
    let mut done = false;
    while !done {
        ch.poll(1, |_, r, _| {
            r.expect("scribble");
            done = true;
        });
    }
    assert!(matches!(
        LogStore::open(Arc::clone(&dev), &o),
        Err(GcError::NotAStore { .. })
    ));
}

/// A 4 MiB memory device of 4 KiB blocks behind fault injection, and
/// options for a small store on it.
fn faulty_store_device() -> (Arc<dyn BlockDevice>, FaultHandle, StoreOptions) {
    let mem: Arc<dyn BlockDevice> = spec::build("mem:4m,bs=4096").expect("mem");
    let (faulty, faults) = FaultyDevice::new(mem);
    let o = StoreOptions {
        segment_bytes: 64 << 10,
        fill: 0.5,
        ..StoreOptions::default()
    };
    (Arc::new(faulty), faults, o)
}

#[test]
fn a_failed_flush_or_write_fails_the_commit_and_keeps_the_last_one() {
    let (dev, faults, o) = faulty_store_device();
    let mut store = LogStore::format(Arc::clone(&dev), &o).expect("format");
    let mut block = vec![0u8; 4096];
    Workload::content(5, 1, &mut block);
    store.write(5, &block).expect("write");
    store.sync().expect("first commit");
    for op in [IoOp::Flush, IoOp::Write] {
        faults.add(FaultRule {
            op,
            range: 0..u64::MAX,
            action: FaultAction::Fail(IoErrorKind::Medium),
        });
        Workload::content(5, 2, &mut block);
        store.write(5, &block).expect("buffered");
        assert!(
            matches!(store.sync(), Err(GcError::Io { .. })),
            "a failed {op} must fail the commit"
        );
        faults.clear();
    }
    drop(store);
    // The first commit is what a reopen finds.
    let mut store = LogStore::open(Arc::clone(&dev), &o).expect("open");
    let mut scratch = vec![0u8; 4096];
    store.read(5, &mut block).expect("read");
    let v = Workload::version_of(5, &block, &mut scratch).expect("a version");
    assert!(v == 1 || v == 2, "version {v}");
}

#[test]
fn a_failed_relocation_summary_strands_its_victims_and_loses_nothing() {
    let (dev, faults, o) = faulty_store_device();
    let mut store = LogStore::format(Arc::clone(&dev), &o).expect("format");
    let n = store.logical_blocks();
    let mut block = vec![0u8; 4096];
    // Every block twice: the first versions leave segments half dead.
    let mut version = vec![0u64; n as usize];
    for round in 1..=2 {
        for lbn in (0..n).filter(|l| round == 1 || l % 2 == 0) {
            Workload::content(lbn, round, &mut block);
            store.write(lbn, &block).expect("write");
            version[lbn as usize] = round;
        }
    }
    store.sync().expect("sync");
    // Summary writes fail from now on; data writes and copies do not.
    let g = *store.geometry();
    for s in 0..g.segments {
        let lba = g.summary_lba(s, 0);
        faults.add(FaultRule {
            op: IoOp::Write,
            range: lba..lba + 2 * g.summary_blocks,
            action: FaultAction::Fail(IoErrorKind::Medium),
        });
    }
    let free = store.free_segments();
    let cleaned = store
        .clean(free + 2)
        .and_then(|()| store.sync())
        .expect_err("the summary write failed");
    assert!(matches!(cleaned, GcError::Io { .. }), "{cleaned}");
    // Still readable in this session, wherever the blocks now are.
    let mut scratch = vec![0u8; 4096];
    for lbn in 0..n {
        assert!(store.read(lbn, &mut block).expect("read"));
        check_block(lbn, version[lbn as usize], &block, &mut scratch).expect("content");
    }
    faults.clear();
    // The store goes on (cleaning reuses segments, but not those victims).
    for lbn in (0..n).filter(|l| l % 3 == 0) {
        Workload::content(lbn, 3, &mut block);
        store.write(lbn, &block).expect("write after the failure");
        version[lbn as usize] = 3;
    }
    store.sync().expect("sync after the failure");
    drop(store);
    // The victims kept what their summaries name: a reopen finds it all.
    let mut store = LogStore::open(Arc::clone(&dev), &o).expect("open");
    for lbn in 0..n {
        assert!(store.read(lbn, &mut block).expect("read"));
        check_block(lbn, version[lbn as usize], &block, &mut scratch).expect("content");
    }
}
