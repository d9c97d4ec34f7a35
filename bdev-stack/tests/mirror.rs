//! Mirror faults: read and write errors on one leg, leg replacement with a
//! resync under live I/O, and an unclean stop that resyncs only what the
//! dirty map recorded.

mod common;

use std::sync::Arc;
use std::thread;

use bdev_stack::{
    BdevError, BlockDevice, FaultAction, FaultRule, FaultyDevice, IoErrorKind, IoOp, LegHealth,
    MemDevice, Mirror,
};
use common::{SyncIo, pattern, read_device};

const BS: u64 = 512;

fn mem(blocks: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(blocks * BS, BS as u32, 64 * 1024).expect("mem"))
}

fn faulty(inner: Arc<dyn BlockDevice>) -> (Arc<dyn BlockDevice>, bdev_stack::FaultHandle) {
    let (device, handle) = FaultyDevice::new(inner);
    (Arc::new(device), handle)
}

#[test]
fn read_error_on_one_leg_is_retried_on_another_and_invisible() {
    let (leg0, faults) = faulty(mem(256));
    let leg1 = mem(256);
    let mirror = Arc::new(Mirror::new(vec![leg0, leg1], 32).expect("mirror"));
    let device: Arc<dyn BlockDevice> = mirror.clone();
    let data = pattern(1, 256 * BS as usize);
    let mut io = SyncIo::open(device.as_ref());
    io.write(0, &data).expect("write");

    faults.add(FaultRule {
        op: IoOp::Read,
        range: 0..256,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    // Round-robin reads land on the failing leg about half the time (fewer
    // errors than the limit that fails a leg).
    for lba in (0..128).step_by(8) {
        let got = io
            .read(lba, 8)
            .expect("read succeeds through the other leg");
        assert_eq!(got, data[(lba * BS) as usize..((lba + 8) * BS) as usize]);
    }
    let health = mirror.health();
    assert!(faults.injected() > 0, "the fault was never hit");
    assert_eq!(health.read_retries, faults.injected());
    // Below the limit, a read error does not fail the leg: the blocks are
    // rewritten from the other leg.
    assert!(!health.is_degraded(), "{health:?}");
    assert_eq!(health.read_repairs, faults.injected());
}

#[test]
fn read_error_on_every_leg_reaches_the_caller() {
    let (leg0, faults0) = faulty(mem(64));
    let (leg1, faults1) = faulty(mem(64));
    let device: Arc<dyn BlockDevice> = Arc::new(Mirror::new(vec![leg0, leg1], 16).expect("mirror"));
    for faults in [&faults0, &faults1] {
        faults.add(FaultRule {
            op: IoOp::Read,
            range: 10..11,
            action: FaultAction::Fail(IoErrorKind::Medium),
        });
    }
    let mut io = SyncIo::open(device.as_ref());
    let error = io.read(8, 4).expect_err("no leg can read block 10");
    assert_eq!(error.kind, IoErrorKind::Medium);
    assert_eq!(error.op, IoOp::Read);
    assert!(io.read(16, 4).is_ok(), "the neighbourhood reads fine");
}

#[test]
fn write_error_on_one_leg_fails_the_leg_and_the_write_succeeds() {
    let (leg0, faults) = faulty(mem(128));
    let leg1 = mem(128);
    let mirror = Arc::new(Mirror::new(vec![leg0.clone(), leg1.clone()], 16).expect("mirror"));
    let device: Arc<dyn BlockDevice> = mirror.clone();
    let mut io = SyncIo::open(device.as_ref());
    let first = pattern(2, 128 * BS as usize);
    io.write(0, &first).expect("write");

    faults.add(FaultRule {
        op: IoOp::Write,
        range: 40..41,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    let second = pattern(3, 32 * BS as usize);
    io.write(32, &second).expect("one leg took it: success");
    let health = mirror.health();
    assert_eq!(health.legs, vec![LegHealth::Failed, LegHealth::Healthy]);
    assert!(health.is_degraded());

    let mut expected = first.clone();
    expected[(32 * BS) as usize..(64 * BS) as usize].copy_from_slice(&second);
    assert_eq!(io.read(0, 128).expect("read"), expected);
    assert_eq!(read_device(&leg1, 0, 128), expected);
    // The failed leg gets no more writes.
    faults.clear();
    io.write(100, &pattern(4, BS as usize)).expect("write");
    assert_eq!(
        read_device(&leg0, 100, 1),
        first[(100 * BS) as usize..(101 * BS) as usize]
    );
}

#[test]
fn write_error_on_every_leg_fails_the_write() {
    let (leg0, faults0) = faulty(mem(64));
    let (leg1, faults1) = faulty(mem(64));
    let mirror = Arc::new(Mirror::new(vec![leg0, leg1], 16).expect("mirror"));
    let device: Arc<dyn BlockDevice> = mirror.clone();
    for faults in [&faults0, &faults1] {
        faults.add(FaultRule {
            op: IoOp::Write,
            range: 0..64,
            action: FaultAction::Fail(IoErrorKind::Medium),
        });
    }
    let mut io = SyncIo::open(device.as_ref());
    let error = io
        .write(0, &pattern(5, 4 * BS as usize))
        .expect_err("no leg took it");
    assert_eq!(error.op, IoOp::Write);
    assert_eq!(mirror.health().legs, vec![LegHealth::Failed; 2]);
    let error = io
        .write(8, &pattern(6, BS as usize))
        .expect_err("mirror is dead");
    assert_eq!(error.kind, IoErrorKind::NoHealthyLeg);
}

#[test]
fn replacing_a_leg_only_works_for_a_failed_leg_with_matching_blocks() {
    let mirror = Mirror::new(vec![mem(64), mem(64)], 16).expect("mirror");
    assert!(matches!(
        mirror.replace_leg(1, mem(64)),
        Err(BdevError::MirrorState { .. })
    ));
    assert!(matches!(
        mirror.replace_leg(7, mem(64)),
        Err(BdevError::MirrorState { .. })
    ));
}

#[test]
fn replaced_leg_resyncs_in_the_background_while_io_continues() {
    const BLOCKS: u64 = 64 * 1024; // 32 MiB
    let leg0 = mem(BLOCKS);
    let (leg1, faults) = faulty(mem(BLOCKS));
    let mirror = Arc::new(Mirror::new(vec![leg0.clone(), leg1], 128).expect("mirror"));
    let device: Arc<dyn BlockDevice> = mirror.clone();
    let mut reference = pattern(7, (BLOCKS * BS) as usize);
    let mut io = SyncIo::open(device.as_ref());
    io.write(0, &reference).expect("fill");

    faults.add(FaultRule {
        op: IoOp::Write,
        range: 0..BLOCKS,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    io.write(0, &reference[..BS as usize])
        .expect("degraded write");
    assert_eq!(mirror.health().legs[1], LegHealth::Failed);

    let fresh = mem(BLOCKS);
    let resync = mirror.replace_leg(1, fresh.clone()).expect("replace");
    assert!(matches!(
        mirror.health().legs[1],
        LegHealth::Resyncing { .. }
    ));
    let resync_thread = thread::spawn(move || resync.run());

    // Write and read all over the device until the resync is done.
    let mut writes_during_resync = 0u64;
    let mut seed = 100;
    while !resync_thread.is_finished() {
        seed += 1;
        let lba = (seed * 7919) % (BLOCKS - 64);
        let data = pattern(seed, 64 * BS as usize);
        io.write(lba, &data).expect("write during resync");
        reference[(lba * BS) as usize..((lba + 64) * BS) as usize].copy_from_slice(&data);
        let check = (seed * 104_729) % (BLOCKS - 8);
        assert_eq!(
            io.read(check, 8).expect("read during resync"),
            reference[(check * BS) as usize..((check + 8) * BS) as usize]
        );
        writes_during_resync += 1;
    }
    let report = resync_thread
        .join()
        .expect("resync thread")
        .expect("resync");
    assert_eq!(report.blocks, BLOCKS);
    assert!(writes_during_resync > 0, "no I/O overlapped the resync");
    assert!(!mirror.health().is_degraded(), "{:?}", mirror.health());
    assert!(read_device(&leg0, 0, BLOCKS) == reference, "leg 0 differs");
    assert!(
        read_device(&fresh, 0, BLOCKS) == reference,
        "new leg differs"
    );
}

#[test]
fn unclean_stop_resyncs_only_the_dirty_regions_and_the_legs_end_equal() {
    const BLOCKS: u64 = 256;
    const REGION: u64 = 16;
    let leg0 = mem(BLOCKS);
    let leg1 = mem(BLOCKS);
    let (held_leg1, faults) = faulty(leg1.clone());
    let first = pattern(8, (BLOCKS * BS) as usize);
    let mirror = Mirror::new(vec![leg0.clone(), held_leg1], REGION).expect("mirror");
    let dirty = mirror.dirty_map();
    let device: Arc<dyn BlockDevice> = Arc::new(mirror);
    let mut io = SyncIo::open(device.as_ref());
    io.write(0, &first).expect("fill");
    assert!(
        dirty.dirty_regions().is_empty(),
        "completed writes leave no dirty region"
    );

    // Leg 1 stops answering writes in region 3; the write there never
    // completes. A write in region 7 completes on both legs.
    faults.add(FaultRule {
        op: IoOp::Write,
        range: 3 * REGION..4 * REGION,
        action: FaultAction::Hold,
    });
    let in_flight = pattern(9, (4 * BS) as usize);
    let buf = {
        let mut b = bdev_stack::HostBuffer::new(in_flight.len()).expect("buffer");
        b.as_mut_slice().copy_from_slice(&in_flight);
        b
    };
    io.ch
        .write(3 * REGION + 2, 4, buf, 1)
        .map_err(|r| r.error)
        .expect("submit");
    io.write(7 * REGION, &pattern(10, (2 * BS) as usize))
        .expect("completes");
    // Let leg 0 finish its half of the held write.
    io.ch
        .poll(8, |_, _, _| panic!("the held write cannot complete"));
    assert_eq!(dirty.dirty_regions(), vec![3]);

    // Crash: everything goes away without completing.
    drop(io);
    drop(device);
    // A region the log says is clean, made to differ behind the mirror's
    // back: a resync that copied more than the dirty regions would fix it.
    SyncIo::open(leg1.as_ref())
        .write(10 * REGION, &pattern(11, BS as usize))
        .expect("direct write");

    let mirror = Mirror::with_dirty_map(vec![leg0.clone(), leg1.clone()], dirty.clone())
        .expect("reassemble");
    assert_eq!(mirror.health().suspect_regions, 1);
    let report = mirror.resync_dirty().expect("resync").run().expect("run");
    assert_eq!(report.regions, 1);
    assert_eq!(report.blocks, REGION);
    assert_eq!(mirror.health().suspect_regions, 0);
    assert!(dirty.dirty_regions().is_empty());
    let region = |dev: &Arc<dyn BlockDevice>, r: u64| read_device(dev, r * REGION, REGION);
    assert_eq!(
        region(&leg0, 3),
        region(&leg1, 3),
        "dirty region equal after resync"
    );
    assert_ne!(
        region(&leg0, 10),
        region(&leg1, 10),
        "clean region was not resynced"
    );
    for r in (0..BLOCKS / REGION).filter(|&r| r != 10) {
        assert_eq!(region(&leg0, r), region(&leg1, r), "region {r}");
    }
}

#[test]
fn mirror_legs_must_share_a_block_size() {
    let small: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20, 512, 1 << 16).expect("mem"));
    let large: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(1 << 20, 4096, 1 << 16).expect("mem"));
    let large_name = large.info().name.clone();
    match Mirror::new(vec![small, large], 16) {
        Err(BdevError::BlockSizeMismatch {
            member,
            expected,
            found,
            ..
        }) => {
            assert_eq!((member, expected, found), (large_name, 512, 4096));
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("built a mirror of mixed block sizes"),
    }
}

/// md's read repair: a read that fails on one leg and succeeds on another
/// writes the good data back to the failing leg; a leg that keeps failing
/// reads is failed.
#[test]
fn a_read_error_is_repaired_from_another_leg_and_a_failing_leg_is_failed() {
    use bdev_stack::{FaultAction, FaultRule, FaultyDevice, IoErrorKind, IoOp, LegHealth};
    let good = mem(1024);
    let (faulty, faults) = FaultyDevice::new(mem(1024));
    let faulty: Arc<dyn BlockDevice> = Arc::new(faulty);
    let mirror = Arc::new(Mirror::new(vec![good.clone(), faulty.clone()], 64).expect("mirror"));
    let dev: Arc<dyn BlockDevice> = mirror.clone();
    let data = pattern(5, 1024 * 512);
    SyncIo::open(dev.as_ref()).write(0, &data).expect("write");
    // The faulty leg's copy of block 7 goes bad, and its next read fails.
    SyncIo::open(faulty.as_ref())
        .write(7, &vec![0xee; 512])
        .expect("corrupt");
    faults.fail_nth(1);
    let mut io = SyncIo::open(dev.as_ref());
    for _ in 0..4 {
        assert!(io.read(7, 1).expect("read") == data[7 * 512..8 * 512]);
    }
    assert_eq!(mirror.health().read_repairs, 1, "{:?}", mirror.health());
    assert!(
        SyncIo::open(faulty.as_ref()).read(7, 1).expect("read") == data[7 * 512..8 * 512],
        "the failing leg was not repaired"
    );
    assert_eq!(mirror.health().legs[1], LegHealth::Healthy);
    // A leg that keeps failing reads is failed.
    faults.add(FaultRule {
        op: IoOp::Read,
        range: 0..1024,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    for i in 0..64 {
        assert!(io.read(i, 1).expect("read") == data[i as usize * 512..(i as usize + 1) * 512]);
    }
    assert_eq!(mirror.health().legs[1], LegHealth::Failed);
}

/// Scrub: a check finds the region whose legs differ; with repair and a
/// resync they are equal again.
#[test]
fn check_reports_mismatched_regions_and_repair_makes_the_legs_equal() {
    let (a, b) = (mem(1024), mem(1024));
    let mirror = Arc::new(Mirror::new(vec![a.clone(), b.clone()], 64).expect("mirror"));
    let dev: Arc<dyn BlockDevice> = mirror.clone();
    SyncIo::open(dev.as_ref())
        .write(0, &pattern(8, 1024 * 512))
        .expect("write");
    assert_eq!(
        mirror.check(false, |_, _| {}).expect("check").mismatched,
        Vec::<u64>::new()
    );
    SyncIo::open(b.as_ref())
        .write(200, &vec![0x11; 512])
        .expect("corrupt one leg");
    let mut seen = 0;
    let report = mirror
        .check(false, |done, total| seen = done.max(seen).min(total))
        .expect("check");
    assert_eq!(report.mismatched, vec![3], "{report:?}");
    assert_eq!(seen, 16);
    let report = mirror.check(true, |_, _| {}).expect("check and mark");
    assert_eq!(report.marked, 1);
    mirror.resync_dirty().expect("resync").run().expect("run");
    assert_eq!(
        mirror.check(false, |_, _| {}).expect("check").mismatched,
        Vec::<u64>::new()
    );
    assert!(read_device(&a, 0, 1024) == read_device(&b, 0, 1024));
}
