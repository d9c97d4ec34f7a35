//! The log-structured store over stacks: relocation by offload and by
//! bounce, fallbacks when the device's copy fails, reopening, and the
//! errors a user can provoke.

use std::sync::Arc;

use bdev_stack::{
    BlockDevice, CopyFault, FaultAction, FaultHandle, FaultRule, FaultyDevice, IoErrorKind, IoOp,
    MemCopyLimits, MemDevice, OffloadErrorKind, spec,
};
use log_store::layout::{Geometry, Superblock};
use log_store::{
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

fn mem_with_copy() -> (Arc<dyn BlockDevice>, bdev_stack::CopyFaultHandle) {
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
                Err(GcError::BadLayout { .. })
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
    // Scribble the superblock and it is not a store.
    let mut raw = vec![0u8; 4096];
    raw[100] = 0xff;
    write_block0(&dev, &raw);
    assert!(matches!(
        LogStore::open(Arc::clone(&dev), &o),
        Err(GcError::NotAStore { .. })
    ));
}

/// Writes `raw` (one block) at LBA 0 of `dev`.
fn write_block0(dev: &Arc<dyn BlockDevice>, raw: &[u8]) {
    let mut ch =
        bdev_stack::OwnedChannel::<bdev_stack::HostBuffer>::open(dev.as_ref(), 1).expect("channel");
    let mut buf = bdev_stack::HostBuffer::new(raw.len()).expect("buffer");
    buf.as_mut_slice().copy_from_slice(raw);
    ch.write(0, 1, buf, 0).map_err(|r| r.error).expect("write");
    let mut done = false;
    while !done {
        ch.poll(1, |_, r, _| {
            r.expect("write block 0");
            done = true;
        });
    }
}

/// Runs `f` on a thread of its own; fails unless it answers within five
/// seconds (a hang or a panic fails the test instead of stalling the run).
fn at_once<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(5)) {
        Ok(v) => v,
        Err(e) => panic!("{what}: no answer within 5 s ({e}: hung or panicked)"),
    }
}

#[test]
fn a_superblock_with_a_valid_crc_and_garbage_geometry_is_refused_at_once() {
    let dev: Arc<dyn BlockDevice> = spec::build("mem:4m,bs=4096").expect("mem");
    let o = StoreOptions {
        segment_bytes: 64 << 10,
        ..StoreOptions::default()
    };
    let good = LogStore::plan(&dev, &o).expect("plan");
    type Damage = fn(&mut Geometry);
    let cases: [(&str, Damage); 6] = [
        ("segment_blocks 4398046511104", |g| {
            g.segment_blocks = 1 << 42
        }),
        ("segment_blocks 18446744073709551615", |g| {
            g.segment_blocks = u64::MAX
        }),
        ("data_slots 4294967295", |g| g.data_slots = u32::MAX),
        ("segments 4294967295", |g| g.segments = u32::MAX),
        ("summary_blocks 18446744073709551615", |g| {
            g.summary_blocks = u64::MAX
        }),
        ("logical_blocks 18446744073709551615", |g| {
            g.logical_blocks = u64::MAX
        }),
    ];
    for (what, damage) in cases {
        let mut sb = Superblock {
            geometry: good,
            store_id: 1,
        };
        damage(&mut sb.geometry);
        let mut raw = vec![0u8; 4096];
        // A valid CRC: only the geometry is wrong.
        sb.encode(&mut raw);
        write_block0(&dev, &raw);
        let (d, o) = (Arc::clone(&dev), o.clone());
        let err = at_once(what, move || LogStore::open(d, &o).map(|_| ())).expect_err(what);
        let text = bdev_stack::error_chain(&err);
        assert!(
            matches!(err, GcError::BadSuperblock { .. }),
            "{what}: {text}"
        );
        assert!(
            text.contains(&dev.info().name),
            "{what}: names the device: {text}"
        );
        assert!(
            text.contains(what),
            "{what}: names the field and value: {text}"
        );
        assert!(
            text.contains("format this one again"),
            "{what}: says what to do: {text}"
        );
    }
}

#[test]
fn absurd_segment_sizes_and_fills_are_refused_at_once() {
    let dev: Arc<dyn BlockDevice> = spec::build("mem:4m,bs=4096").expect("mem");
    let segment = |segment_bytes| StoreOptions {
        segment_bytes,
        ..StoreOptions::default()
    };
    let fill = |fill| StoreOptions {
        fill,
        segment_bytes: 64 << 10,
        ..StoreOptions::default()
    };
    let cases = [
        (
            "gc --segment 4194304g",
            segment(4194304 << 30),
            "segment_blocks",
        ),
        (
            "a segment larger than the device",
            segment(8 << 20),
            "segment_blocks",
        ),
        ("the largest segment", segment(!4095), "segment_blocks"),
        ("a segment of one block", segment(4096), "segment_blocks"),
        ("a segment of no blocks", segment(0), "segment size"),
        ("fill 1e300", fill(1e300), "fill"),
        ("fill -1", fill(-1.0), "fill"),
        ("fill inf", fill(f64::INFINITY), "fill"),
        ("fill 1e-300", fill(1e-300), "logical_blocks"),
    ];
    for (what, opts, field) in cases {
        let d = Arc::clone(&dev);
        let err = at_once(what, move || LogStore::format(d, &opts).map(|_| ())).expect_err(what);
        let text = bdev_stack::error_chain(&err);
        assert!(matches!(err, GcError::BadLayout { .. }), "{what}: {text}");
        assert!(
            text.contains(&dev.info().name),
            "{what}: names the device: {text}"
        );
        assert!(text.contains(field), "{what}: names {field}: {text}");
    }
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
