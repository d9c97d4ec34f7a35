//! Mirrors that survive a crash. A child process writes into a mirror with
//! metadata over two files and is killed with SIGKILL at a random point
//! (a write may have reached one leg only); the parent assembles the
//! members again, in either order, resyncs what the durable bitmap names,
//! and checks that the legs are equal and that every write acknowledged
//! before the kill reads back. Also: a clean stop needs no resync, and
//! garbage, strangers, duplicates and stale members are typed errors.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bdev_stack::{
    BdevError, BlockDevice, FileDevice, HostAllocator, MemDevice, Mirror, ResyncNeed,
};
use common::{SyncIo, pattern};

const CHILD: &str = "USTOR_MIRROR_CRASH_CHILD";
const MEMBER_BLOCKS: u64 = 4096;
const REGION: u64 = 64;

/// A new mirror with its initial sync done, as a user makes one.
fn create_synced(
    members: Vec<Arc<dyn BlockDevice>>,
    region: u64,
    allocator: Arc<HostAllocator>,
) -> Result<Mirror, BdevError> {
    let mirror = Mirror::create(members, region, allocator)?;
    mirror.resync_dirty()?.run()?;
    Ok(mirror)
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ustor-mirror-crash-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn members(d: &Path, bs: u32, create: bool) -> Vec<Arc<dyn BlockDevice>> {
    (0..2)
        .map(|i| {
            let size = create.then_some(MEMBER_BLOCKS * u64::from(bs));
            Arc::new(FileDevice::open(&d.join(format!("leg{i}")), bs, size).expect("member"))
                as Arc<dyn BlockDevice>
        })
        .collect()
}

/// The child: assembles the mirror and writes fresh blocks until killed,
/// printing `lba seed` once each write is acknowledged.
fn child(spec: &str) {
    let (path, bs) = spec.split_once(',').expect("child spec");
    let bs: u32 = bs.parse().expect("block size");
    let (mirror, _) =
        Mirror::assemble(members(Path::new(path), bs, false), Arc::new(HostAllocator))
            .expect("assemble");
    let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
    let mut io = SyncIo::open(dev.as_ref());
    let blocks = dev.info().block_count;
    let mut lba = 0;
    let mut seed = u64::from(std::process::id());
    loop {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let run = 1 + seed % 7;
        if lba + run > blocks {
            lba = 0;
        }
        io.write(lba, &pattern(seed, (run * u64::from(bs)) as usize))
            .expect("write");
        println!("{lba} {run} {seed}");
        lba += run + seed % 13;
    }
}

fn crash_once(bs: u32, kill_after: Duration, round: usize) {
    let d = dir(&format!("{bs}-{round}"));
    {
        let mirror =
            create_synced(members(&d, bs, true), REGION, Arc::new(HostAllocator)).expect("create");
        mirror.stop().expect("clean stop");
    }
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, format!("{},{bs}", d.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child");
    let child_pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                // The last three words: the test harness may print its own
                // before the child's first line, on the same line.
                let mut it = l.split_whitespace().rev().map(|w| w.parse::<u64>());
                match (it.next(), it.next(), it.next()) {
                    (Some(Ok(c)), Some(Ok(b)), Some(Ok(a))) => Some((a, b, c)),
                    _ => None,
                }
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let acked = reader.join().expect("reader");

    // A new process would do this: assemble (members the other way
    // round), resync what the bitmap names.
    let mut legs = members(&d, bs, false);
    legs.reverse();
    let (mirror, report) = Mirror::assemble(legs, Arc::new(HostAllocator)).expect("assemble");
    assert!(!report.was_clean || acked.is_empty(), "{report:?}");
    mirror
        .resync_dirty()
        .expect("resync")
        .run()
        .expect("resync run");
    let mirror: Arc<dyn BlockDevice> = Arc::new(mirror);
    let blocks = mirror.info().block_count;
    // Every acknowledged write reads back (later writes to the same
    // blocks overwrite earlier ones: check the latest per block).
    let mut latest = std::collections::HashMap::new();
    for &(lba, run, seed) in &acked {
        let data = pattern(seed, (run * u64::from(bs)) as usize);
        for b in 0..run {
            let at = (b * u64::from(bs)) as usize;
            latest.insert(lba + b, data[at..at + bs as usize].to_vec());
        }
    }
    // The one write that may have been in flight at the kill (the child
    // writes one at a time, in a sequence the parent can follow): its
    // blocks may hold it, or what they held, on both legs alike.
    let (mut lba, mut seed) = (0, u64::from(child_pid));
    if let Some(&(l, r, s)) = acked.last() {
        (lba, seed) = (l + r + s % 13, s);
    }
    let next_seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let next_run = 1 + next_seed % 7;
    if lba + next_run > blocks {
        lba = 0;
    }
    let uncertain = lba..lba + next_run;
    let all = SyncIo::open(mirror.as_ref()).read(0, blocks).expect("read");
    for (lba, data) in &latest {
        if uncertain.contains(lba) {
            continue;
        }
        let at = (*lba * u64::from(bs)) as usize;
        assert!(
            all[at..at + bs as usize] == data[..],
            "round {round}: acknowledged block {lba} lost"
        );
    }
    // The legs are equal: each member's data area, read directly.
    let raw: Vec<Vec<u8>> = (0..2)
        .map(|i| std::fs::read(d.join(format!("leg{i}"))).expect("member file"))
        .collect();
    assert!(
        legs_equal_beyond_metadata(&raw, bs),
        "round {round}: legs differ after the resync ({} acknowledged writes)",
        acked.len()
    );
    std::fs::remove_dir_all(&d).ok();
}

/// The data areas are equal (the metadata areas differ in the member
/// index).
fn legs_equal_beyond_metadata(raw: &[Vec<u8>], bs: u32) -> bool {
    let layout = bdev_stack::MetaLayout::new(MEMBER_BLOCKS, bs, REGION).expect("layout");
    let start = (layout.data_offset * u64::from(bs)) as usize;
    raw[0][start..] == raw[1][start..]
}

#[test]
fn child_process_entry() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
    }
}

#[test]
fn a_mirror_killed_mid_write_assembles_resyncs_and_keeps_every_acknowledged_write() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut round = 0;
    for bs in [512u32, 4096] {
        for _ in 0..10 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            crash_once(bs, Duration::from_millis(20 + rng % 200), round);
            round += 1;
        }
    }
}

#[test]
fn a_clean_stop_needs_no_resync_and_members_come_in_any_order() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let d = dir("clean");
    let data = pattern(3, 100 * 512);
    {
        let mirror: Arc<dyn BlockDevice> = Arc::new(
            create_synced(members(&d, 512, true), REGION, Arc::new(HostAllocator)).expect("create"),
        );
        SyncIo::open(mirror.as_ref())
            .write(10, &data)
            .expect("write");
    }
    // Unclean (no stop): the written regions are named.
    let mut legs = members(&d, 512, false);
    legs.reverse();
    let (mirror, report) = Mirror::assemble(legs, Arc::new(HostAllocator)).expect("assemble");
    match &report.resync {
        ResyncNeed::Regions(r) => assert_eq!(r, &vec![0, 1], "{report:?}"),
        other => panic!("{other:?}"),
    }
    mirror.resync_dirty().expect("resync").run().expect("run");
    mirror.stop().expect("stop");
    drop(mirror);
    let (mirror, report) =
        Mirror::assemble(members(&d, 512, false), Arc::new(HostAllocator)).expect("assemble");
    assert_eq!(report.resync, ResyncNeed::Nothing);
    assert!(report.was_clean);
    let mirror: Arc<dyn BlockDevice> = Arc::new(mirror);
    assert!(SyncIo::open(mirror.as_ref()).read(10, 100).expect("read") == data);
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn strangers_duplicates_stale_members_and_garbage_are_typed_errors() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let mem = || {
        Arc::new(MemDevice::new(MEMBER_BLOCKS * 512, 512, 1 << 20).expect("mem"))
            as Arc<dyn BlockDevice>
    };
    let (a, b, c, e) = (mem(), mem(), mem(), mem());
    let one =
        create_synced(vec![a.clone(), b.clone()], REGION, Arc::new(HostAllocator)).expect("create");
    one.stop().expect("stop");
    let other =
        create_synced(vec![c.clone(), e.clone()], REGION, Arc::new(HostAllocator)).expect("create");
    other.stop().expect("stop");
    let assemble =
        |devs: Vec<Arc<dyn BlockDevice>>| Mirror::assemble(devs, Arc::new(HostAllocator));
    assert!(matches!(
        assemble(vec![a.clone(), c.clone()]),
        Err(BdevError::Assembly { .. })
    ));
    assert!(matches!(
        assemble(vec![a.clone(), a.clone()]),
        Err(BdevError::Assembly { .. })
    ));
    assert!(matches!(
        assemble(vec![mem()]),
        Err(BdevError::Metadata { .. })
    ));
    // A missing member: degraded, serving.
    let (degraded, report) = assemble(vec![b.clone()]).expect("degraded assembly");
    assert_eq!(report.members[0], None);
    assert!(degraded.health().is_degraded());
    // The member that went on alone has the higher event count: the other
    // is stale now.
    let degraded: Arc<dyn BlockDevice> = Arc::new(degraded);
    SyncIo::open(degraded.as_ref())
        .write(0, &pattern(1, 512))
        .expect("write");
    drop(degraded);
    match assemble(vec![a.clone(), b.clone()]) {
        Err(BdevError::Assembly { reason, .. }) => assert!(reason.contains("stale"), "{reason}"),
        other => panic!("a stale member was taken: {:?}", other.map(|(_, r)| r)),
    }
}

#[test]
fn a_mirror_with_metadata_assembles_from_a_spec() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let d = dir("spec");
    let data = pattern(9, 64 * 512);
    {
        let mirror: Arc<dyn BlockDevice> = Arc::new(
            create_synced(members(&d, 512, true), REGION, Arc::new(HostAllocator)).expect("create"),
        );
        SyncIo::open(mirror.as_ref())
            .write(100, &data)
            .expect("write");
    }
    let spec = format!(
        "assemble(file:{}, file:{})",
        d.join("leg1").display(),
        d.join("leg0").display()
    );
    let dev = bdev_stack::spec::build(&spec).expect("assemble through the spec");
    assert!(SyncIo::open(dev.as_ref()).read(100, 64).expect("read") == data);
    let bad = bdev_stack::spec::build(&format!(
        "assemble(file:{}, mem:2m)",
        d.join("leg0").display()
    ));
    assert!(bad.is_err(), "a device without metadata joined the array");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_new_mirror_over_unequal_members_syncs_before_it_stops_clean() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let mem = || {
        Arc::new(MemDevice::new(MEMBER_BLOCKS * 512, 512, 1 << 20).expect("mem"))
            as Arc<dyn BlockDevice>
    };
    let (a, b) = (mem(), mem());
    // The members held different things before they became a mirror.
    let whole = (MEMBER_BLOCKS * 512) as usize;
    SyncIo::open(a.as_ref())
        .write(0, &pattern(1, whole))
        .expect("old data");
    SyncIo::open(b.as_ref())
        .write(0, &pattern(2, whole))
        .expect("old data");
    let regions;
    {
        let mirror = Mirror::create(vec![a.clone(), b.clone()], REGION, Arc::new(HostAllocator))
            .expect("create");
        regions = mirror.dirty_map().region_count();
        assert_eq!(mirror.dirty_map().dirty_regions().len() as u64, regions);
        assert!(
            matches!(mirror.stop(), Err(BdevError::MirrorState { .. })),
            "a mirror whose legs differ stopped clean"
        );
        // Until the sync, every read of a block gives the same data.
        let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
        let mut io = SyncIo::open(dev.as_ref());
        let first = io.read(0, 64).expect("read");
        for _ in 0..8 {
            assert_eq!(io.read(0, 64).expect("read"), first);
        }
        // Dropped before the sync ran, as a crash would.
    }
    let (mirror, report) =
        Mirror::assemble(vec![b.clone(), a.clone()], Arc::new(HostAllocator)).expect("assemble");
    assert!(!report.was_clean);
    assert_eq!(
        report.resync,
        ResyncNeed::Regions((0..regions).collect()),
        "the initial sync was forgotten"
    );
    mirror
        .resync_dirty()
        .expect("resync")
        .run()
        .expect("resync");
    let check = mirror.check(false, |_, _| {}).expect("check");
    assert!(check.mismatched.is_empty(), "{check:?}");
    mirror.stop().expect("clean stop after the sync");
    drop(mirror);
    let (_, report) =
        Mirror::assemble(vec![a, b], Arc::new(HostAllocator)).expect("assemble again");
    assert_eq!(report.resync, ResyncNeed::Nothing);
}
