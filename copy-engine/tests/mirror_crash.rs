//! Copies into a mirror that survive a crash. A child process writes and
//! copies (through the copy engine; file legs offer no offload, so the
//! copies are bounced through the mirror) into a mirror with metadata over
//! two files, and is killed with SIGKILL at a random point; the parent
//! assembles the members the other way round, resyncs what the durable
//! bitmap names, and checks that the legs are equal and that every write
//! and copy acknowledged before the kill reads back.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bdev_stack::{BlockDevice, FileDevice, HostAllocator, MetaLayout, Mirror};
use common::{SyncIo, model_copy, pattern, r};
use copy_engine::{CopyEngine, CopyOptions};

const CHILD: &str = "USTOR_COPY_CRASH_CHILD";
const MEMBER_BLOCKS: u64 = 4096;
const REGION: u64 = 64;
const BS: u32 = 512;

fn members(d: &Path) -> Vec<Arc<dyn BlockDevice>> {
    (0..2)
        .map(|i| {
            let path = d.join(format!("leg{i}"));
            let size = (!path.exists()).then_some(MEMBER_BLOCKS * u64::from(BS));
            Arc::new(FileDevice::open(&path, BS, size).expect("member")) as Arc<dyn BlockDevice>
        })
        .collect()
}

/// One operation of the child, as it prints it: `w lba blocks seed` or
/// `c src dst blocks`.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { lba: u64, blocks: u64, seed: u64 },
    Copy { src: u64, dst: u64, blocks: u64 },
}

impl Op {
    fn parse(line: &str) -> Option<Op> {
        let mut it = line.split_whitespace();
        let kind = it.next()?;
        let v: Vec<u64> = it.filter_map(|w| w.parse().ok()).collect();
        match (kind, v.as_slice()) {
            ("w", [lba, blocks, seed]) => Some(Op::Write {
                lba: *lba,
                blocks: *blocks,
                seed: *seed,
            }),
            ("c", [src, dst, blocks]) => Some(Op::Copy {
                src: *src,
                dst: *dst,
                blocks: *blocks,
            }),
            _ => None,
        }
    }

    fn destination(&self) -> std::ops::Range<u64> {
        match *self {
            Op::Write { lba, blocks, .. } => lba..lba + blocks,
            Op::Copy { dst, blocks, .. } => dst..dst + blocks,
        }
    }
}

/// The child: assembles the mirror, then writes and copies until killed.
/// Each operation is printed as `start ...` before it begins and as
/// `done` once acknowledged (a copy only when its report is complete).
fn child(path: &str) {
    let legs = members(Path::new(path));
    let (mirror, _) = Mirror::assemble(legs.clone(), Arc::new(HostAllocator)).expect("assemble");
    let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
    let blocks = dev.info().block_count;
    let mut io = SyncIo::open(dev.as_ref());
    let mut engine = CopyEngine::new(CopyOptions::default()).expect("engine");
    let mut x = u64::from(std::process::id()) | 1;
    let mut next = |bound: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % bound
    };
    loop {
        let run = 1 + next(48);
        let op = if next(3) == 0 {
            Op::Write {
                lba: next(blocks - run),
                blocks: run,
                seed: next(u64::MAX >> 1),
            }
        } else {
            let src = next(blocks - run);
            let mut dst = next(blocks - run);
            if dst < src + run && src < dst + run {
                dst = (src + run) % (blocks - run);
                if dst < src + run && src < dst + run {
                    continue;
                }
            }
            Op::Copy {
                src,
                dst,
                blocks: run,
            }
        };
        match op {
            Op::Write { lba, blocks, seed } => {
                println!("start w {lba} {blocks} {seed}");
                io.write(lba, &pattern(seed, (blocks * u64::from(BS)) as usize))
                    .expect("write");
            }
            Op::Copy { src, dst, blocks } => {
                println!("start c {src} {dst} {blocks}");
                let report = engine
                    .copy(&dev, &[r(src, blocks)], &dev, &[r(dst, blocks)])
                    .expect("copy");
                assert!(report.is_complete(), "{report:?}");
            }
        }
        println!("done");
    }
}

fn crash_once(kill_after: Duration, round: usize) {
    let d = std::env::temp_dir().join(format!("ustor-copy-crash-{}-{round}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    {
        // Fresh files read zeros on both legs: the model starts there.
        let legs = members(&d);
        let allocator = Arc::new(HostAllocator);
        let mirror = Mirror::create_assume_clean(legs, REGION, allocator).expect("create");
        mirror.stop().expect("clean stop");
    }
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, d.display().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        // (operation, acknowledged)
        let mut ops: Vec<(Op, bool)> = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The test harness may print its own words before the
            // child's first line, on the same line.
            if let Some(op) = line
                .find("start ")
                .and_then(|at| Op::parse(&line[at + "start ".len()..]))
            {
                ops.push((op, false));
            } else if line.ends_with("done")
                && let Some(last) = ops.last_mut()
            {
                last.1 = true;
            }
        }
        ops
    });
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let ops = reader.join().expect("reader");

    let mut legs = members(&d);
    legs.reverse();
    let allocator = Arc::new(HostAllocator);
    let (mirror, report) = Mirror::assemble(legs, allocator).expect("assemble");
    assert!(!report.was_clean || ops.is_empty(), "{report:?}");
    mirror
        .resync_dirty()
        .expect("resync")
        .run()
        .expect("resync run");
    let mirror: Arc<dyn BlockDevice> = Arc::new(mirror);
    let blocks = mirror.info().block_count;
    let bs = BS as usize;
    // The model: every acknowledged operation, in order. The one that was
    // in flight at the kill leaves its destination uncertain.
    let mut model = vec![0u8; blocks as usize * bs];
    let mut uncertain = 0..0;
    for (op, acked) in &ops {
        if !acked {
            uncertain = op.destination();
            break;
        }
        match *op {
            Op::Write { lba, blocks, seed } => {
                let at = lba as usize * bs;
                model[at..at + blocks as usize * bs]
                    .copy_from_slice(&pattern(seed, blocks as usize * bs));
            }
            Op::Copy { src, dst, blocks } => {
                model_copy(&mut model, bs, &[r(src, blocks)], &[r(dst, blocks)]);
            }
        }
    }
    let now = SyncIo::open(mirror.as_ref()).read(0, blocks).expect("read");
    for b in (0..blocks).filter(|b| !uncertain.contains(b)) {
        let at = b as usize * bs;
        assert!(
            now[at..at + bs] == model[at..at + bs],
            "round {round}: block {b} lost after {} operations",
            ops.len()
        );
    }
    let layout = MetaLayout::new(MEMBER_BLOCKS, BS, REGION).expect("layout");
    let start = (layout.data_offset * u64::from(BS)) as usize;
    let raw: Vec<Vec<u8>> = (0..2)
        .map(|i| std::fs::read(d.join(format!("leg{i}"))).expect("member file"))
        .collect();
    assert!(
        raw[0][start..] == raw[1][start..],
        "round {round}: legs differ after the resync"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn child_process_entry() {
    if let Ok(path) = std::env::var(CHILD) {
        child(&path);
    }
}

#[test]
fn a_mirror_killed_mid_copy_assembles_resyncs_and_keeps_every_acknowledged_copy() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let mut x = 0x5eed_c0b1u64;
    for round in 0..12 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        crash_once(Duration::from_millis(40 + (x >> 33) % 260), round);
    }
}

/// An offloaded copy writes the legs beside the mirror's channel (here
/// EXTENDED COPY on each of two LUNs behind one copy manager): the
/// destination's regions are in the durable bitmap all the same, so a
/// crash during the offload resyncs them.
#[test]
fn an_offloaded_copy_into_a_mirror_marks_its_regions_on_the_members() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let registry = bdev_stack::spec::LeafRegistry::with_defaults();
    let legs: Vec<Arc<dyn BlockDevice>> = (0..2)
        .map(|_| registry.build("sgemu:2m,target=tpc").expect("leg"))
        .collect();
    {
        let mirror = Mirror::create_assume_clean(legs.clone(), REGION, Arc::new(HostAllocator))
            .expect("create");
        mirror.stop().expect("clean stop");
    }
    let (mirror, _) = Mirror::assemble(legs.clone(), Arc::new(HostAllocator)).expect("assemble");
    let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
    let report = CopyEngine::new(CopyOptions::default())
        .expect("engine")
        .copy(&dev, &[r(0, 64)], &dev, &[r(10 * REGION, 64)])
        .expect("copy");
    assert!(report.is_complete(), "{report:?}");
    // EXTENDED COPY on each leg (one copy manager): nothing goes
    // through the mirror's channel.
    assert_eq!(
        report.per_leaf.len(),
        2,
        "the copy was not offloaded on both legs: {report:?}"
    );
    // The process dies here, before the bits are cleared.
    drop(dev);
    let (_, report) = Mirror::assemble(legs, Arc::new(HostAllocator)).expect("assemble again");
    match report.resync {
        bdev_stack::ResyncNeed::Regions(regions) => {
            assert!(
                regions.contains(&10),
                "copy destination not marked: {regions:?}"
            )
        }
        other => panic!("an offloaded copy left the bitmap {other:?}"),
    }
}
