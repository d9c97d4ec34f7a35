//! The store on a mirror with metadata survives its process being killed:
//! a child process runs the store over `assemble(file, file)` (writes,
//! syncs, cleaning) and is killed with SIGKILL at a random point, with
//! writes possibly on one leg only; the parent assembles the members again
//! (the other way round), resyncs what the durable bitmap names, reopens
//! the store, and checks every block holds its last durable version or a
//! later one it was written with; the legs are equal.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bdev_stack::{BlockDevice, FileDevice, HostAllocator, MetaLayout, Mirror};
use log_store::{LogStore, Policy, StoreOptions, Workload};

const CHILD: &str = "USTOR_STORE_MIRROR_CHILD";
const BS: u32 = 4096;
const MEMBER_BLOCKS: u64 = 2048;
const REGION: u64 = 64;

fn members(d: &Path, create: bool) -> Vec<Arc<dyn BlockDevice>> {
    (0..2)
        .map(|i| {
            let size = create.then_some(MEMBER_BLOCKS * u64::from(BS));
            Arc::new(FileDevice::open(&d.join(format!("leg{i}")), BS, size).expect("member"))
                as Arc<dyn BlockDevice>
        })
        .collect()
}

fn options() -> StoreOptions {
    StoreOptions {
        segment_bytes: 16 * u64::from(BS),
        fill: 0.6,
        policy: Policy::Greedy,
        offload: true,
    }
}

fn assemble(d: &Path, reversed: bool) -> Mirror {
    let mut legs = members(d, false);
    if reversed {
        legs.reverse();
    }
    Mirror::assemble(legs, Arc::new(HostAllocator))
        .expect("assemble")
        .0
}

/// The child: opens the store on the assembled mirror and writes at
/// random until killed, printing `w LBN VERSION STAMP` after each write
/// and `s DURABLE` after each sync.
fn child(path: &str) {
    let dev: Arc<dyn BlockDevice> = Arc::new(assemble(Path::new(path), false));
    let mut store = LogStore::open(dev, &options()).expect("open");
    let n = store.logical_blocks();
    let mut block = vec![0u8; store.block_size()];
    let mut versions = vec![0u64; n as usize];
    let mut x = u64::from(std::process::id()) | 1;
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let lbn = x % n;
        versions[lbn as usize] += 1;
        Workload::content(lbn, versions[lbn as usize], &mut block);
        let stamp = store.write(lbn, &block).expect("write");
        println!("w {lbn} {} {stamp}", versions[lbn as usize]);
        if x % 50 == 0 {
            store.sync().expect("sync");
            println!("s {}", store.durable_stamp());
        }
    }
}

fn round(d: &Path, kill_after: Duration) {
    {
        let mirror =
            Mirror::create(members(d, true), REGION, Arc::new(HostAllocator)).expect("create");
        mirror
            .resync_dirty()
            .expect("initial sync")
            .run()
            .expect("initial sync");
        let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
        drop(LogStore::format(Arc::clone(&dev), &options()).expect("format"));
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
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let lines = reader.join().expect("reader");
    assert!(
        lines.iter().any(|l| l.starts_with("w ")),
        "the child wrote nothing before the kill"
    );

    // History per block: (stamp, version); the durable stamp at the kill.
    let mut history: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut durable = 0;
    for line in &lines {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["w", lbn, version, stamp] => {
                let (lbn, version, stamp): (usize, u64, u64) = (
                    lbn.parse().expect("lbn"),
                    version.parse().expect("v"),
                    stamp.parse().expect("s"),
                );
                if history.len() <= lbn {
                    history.resize(lbn + 1, Vec::new());
                }
                history[lbn].push((stamp, version));
            }
            ["s", stamp] => durable = stamp.parse().expect("durable"),
            _ => {}
        }
    }

    let assembled = assemble(d, true);
    assembled
        .resync_dirty()
        .expect("resync")
        .run()
        .expect("resync run");
    let dev: Arc<dyn BlockDevice> = Arc::new(assembled);
    let mut store = LogStore::open(dev, &options()).expect("reopen after the kill");
    let bs = store.block_size();
    let (mut block, mut scratch) = (vec![0u8; bs], vec![0u8; bs]);
    for lbn in 0..store.logical_blocks() {
        store.read(lbn, &mut block).expect("read");
        let h = history.get(lbn as usize).cloned().unwrap_or_default();
        let floor = h
            .iter()
            .rev()
            .find(|&&(s, _)| s < durable)
            .map_or(0, |&(_, v)| v);
        // A write after the last line read may have landed too.
        let newest = h.last().map_or(0, |&(_, v)| v) + 1;
        let found = if block.iter().all(|&b| b == 0) {
            0
        } else {
            Workload::version_of(lbn, &block, &mut scratch).expect("a version of this block")
        };
        assert!(
            found >= floor && found <= newest,
            "block {lbn}: version {found}, durable {floor}, newest {newest} ({} lines)",
            lines.len()
        );
    }
    drop(store);
    let layout = MetaLayout::new(MEMBER_BLOCKS, BS, REGION).expect("layout");
    let start = (layout.data_offset * u64::from(BS)) as usize;
    let raw: Vec<Vec<u8>> = (0..2)
        .map(|i| std::fs::read(d.join(format!("leg{i}"))).expect("member"))
        .collect();
    assert!(
        raw[0][start..] == raw[1][start..],
        "legs differ after the resync"
    );
}

#[test]
fn child_process_entry() {
    if let Ok(path) = std::env::var(CHILD) {
        child(&path);
    }
}

#[test]
fn the_store_on_a_mirror_survives_its_process_being_killed() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let base = std::env::temp_dir().join(format!("ustor-store-mirror-{}", std::process::id()));
    let mut x = 0x5eed_0003u64;
    for i in 0..8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let d: PathBuf = base.join(format!("round{i}"));
        std::fs::create_dir_all(&d).expect("dir");
        round(&d, Duration::from_millis(100 + x % 400));
    }
    std::fs::remove_dir_all(&base).ok();
}
