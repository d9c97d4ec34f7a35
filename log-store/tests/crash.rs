//! The store survives losing power at any point: runs on an emulated NVMe
//! controller over a file, cut after a random number of I/O commands (what
//! was in flight is lost), reopened over the same file, and checked: every
//! block holds its last durable version or a later one it was written
//! with, never an older one, never garbage; and the store works on.

use std::path::PathBuf;
use std::sync::Arc;

use bdev_stack::BlockDevice;
use bdev_stack::nvme_leaf::EmuNamespace;
use bdev_stack::{NvmeEnvironment, NvmeNamespace};
use log_store::{GcError, LogStore, Policy, StoreOptions, Workload, check_block};
use nvme::emu::EmuController;

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    // Memory-backed where there is one: the runs write a lot.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    Scratch(dir.join(format!("ustor-gc-crash-{}-{name}.img", std::process::id())))
}

/// A controller over `file`, in an environment of its own (the store
/// takes its buffers from the device).
fn device(file: &Scratch, block_size: u32) -> Arc<NvmeNamespace<EmuController>> {
    Arc::new(
        NvmeEnvironment::new()
            .open_emu_namespace(EmuNamespace {
                file: Some(file.0.clone()),
                // 2048 blocks: 127 segments of 16.
                ..EmuNamespace::memory(2048 * u64::from(block_size), block_size)
            })
            .expect("emulated namespace"),
    )
}

fn as_dyn(ns: &Arc<NvmeNamespace<EmuController>>) -> Arc<dyn BlockDevice> {
    Arc::clone(ns) as Arc<dyn BlockDevice>
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Per logical block, every (stamp, version) written, oldest first.
type History = Vec<Vec<(u64, u64)>>;

fn options(policy: Policy, block_size: u32) -> StoreOptions {
    StoreOptions {
        segment_bytes: 16 * u64::from(block_size),
        fill: 0.6,
        policy,
        offload: true,
    }
}

/// Writes until the power fails or `writes` are done; returns the durable
/// stamp when it stopped and whether it was stopped.
fn drive(
    store: &mut LogStore,
    history: &mut History,
    rng: &mut Rng,
    writes: u64,
) -> (u64, Option<GcError>) {
    let n = store.logical_blocks();
    let mut block = vec![0u8; store.block_size()];
    for _ in 0..writes {
        let lbn = rng.below(n);
        let h = &mut history[lbn as usize];
        let version = h.last().map_or(1, |&(_, v)| v + 1);
        Workload::content(lbn, version, &mut block);
        match store.write(lbn, &block) {
            Ok(stamp) => h.push((stamp, version)),
            Err(e) => {
                // Its stamp is unknown but later than any durable one:
                // record it as possibly present.
                h.push((u64::MAX, version));
                return (store.durable_stamp(), Some(e));
            }
        }
        if rng.below(100) == 0
            && let Err(e) = store.sync()
        {
            return (store.durable_stamp(), Some(e));
        }
    }
    match store.sync() {
        Ok(()) => (store.durable_stamp(), None),
        Err(e) => (store.durable_stamp(), Some(e)),
    }
}

/// Checks every block against what may have survived: its newest version
/// with a stamp below `durable`, or any later one. Returns what each holds.
fn check_recovered(
    store: &mut LogStore,
    history: &History,
    durable: u64,
) -> Result<Vec<u64>, String> {
    let bs = store.block_size();
    let mut block = vec![0u8; bs];
    let mut scratch = vec![0u8; bs];
    let mut found_versions = Vec::with_capacity(history.len());
    for (lbn, h) in history.iter().enumerate() {
        let lbn = lbn as u64;
        store
            .read(lbn, &mut block)
            .map_err(|e| format!("reading {lbn}: {e}"))?;
        let floor = h
            .iter()
            .rev()
            .find(|&&(stamp, _)| stamp < durable)
            .map_or(0, |&(_, v)| v);
        let newest = h.last().map_or(0, |&(_, v)| v);
        let found = if block.iter().all(|&b| b == 0) {
            0
        } else {
            Workload::version_of(lbn, &block, &mut scratch)
                .map_err(|e| format!("logical block {lbn}: {e}"))?
        };
        if found < floor || found > newest {
            return Err(format!(
                "logical block {lbn}: version {found} found, durable was {floor}, newest {newest}"
            ));
        }
        found_versions.push(found);
    }
    Ok(found_versions)
}

fn crash_and_recover(iterations: u64, block_size: u32, seed: u64) {
    let file = scratch(&format!("{block_size}-{seed}"));
    let mut rng = Rng(seed | 1);
    let mut crashed = 0;
    let mut cleaned = 0;
    for i in 0..iterations {
        let _ = std::fs::remove_file(&file.0);
        let policy = if i % 2 == 0 {
            Policy::Greedy
        } else {
            Policy::CostBenefit
        };
        let opts = options(policy, block_size);
        // Format and open with the power on, then arm a cut somewhere in
        // the run (a run of 4000 writes takes about 2000 commands).
        let cut = 1 + rng.below(1500);
        drop(LogStore::format(as_dyn(&device(&file, block_size)), &opts).expect("format"));
        let ns = device(&file, block_size);
        let mut store = LogStore::open(as_dyn(&ns), &opts).expect("open the fresh store");
        ns.controller().transport().power_cut_after(cut);
        drop(ns);
        let mut history: History = vec![Vec::new(); store.logical_blocks() as usize];
        let (durable, stopped) = drive(&mut store, &mut history, &mut rng, 4000);
        cleaned += store.stats().segments_cleaned;
        if let Some(e) = &stopped {
            crashed += 1;
            assert!(
                matches!(
                    e,
                    GcError::Io { .. } | GcError::Relocation { .. } | GcError::Copy(_)
                ),
                "iteration {i}: the power cut surfaced as {e}"
            );
        }
        drop(store);

        // Power back: reopen over the same file and check.
        let mut store = LogStore::open(as_dyn(&device(&file, block_size)), &opts)
            .unwrap_or_else(|e| panic!("iteration {i} (cut after {cut}): reopen: {e}"));
        let found = check_recovered(&mut store, &history, durable).unwrap_or_else(|e| {
            panic!("iteration {i} (cut after {cut}, durable stamp {durable}): {e}")
        });

        // It works on: more writes, a sync, a reopen, every block exact.
        let mut history: History = found
            .iter()
            .map(|&v| if v == 0 { Vec::new() } else { vec![(0, v)] })
            .collect();
        let (_, stopped) = drive(&mut store, &mut history, &mut rng, 500);
        assert!(
            stopped.is_none(),
            "iteration {i}: after recovery: {stopped:?}"
        );
        drop(store);
        let mut store =
            LogStore::open(as_dyn(&device(&file, block_size)), &opts).expect("second reopen");
        let mut block = vec![0u8; store.block_size()];
        let mut scratch = vec![0u8; store.block_size()];
        for (lbn, h) in history.iter().enumerate() {
            store.read(lbn as u64, &mut block).expect("read");
            let want = h.last().map_or(0, |&(_, v)| v);
            check_block(lbn as u64, want, &block, &mut scratch)
                .unwrap_or_else(|e| panic!("iteration {i}: after recovery and more writes: {e}"));
        }
        drop(store);
    }
    assert!(
        crashed * 4 >= iterations * 3,
        "only {crashed} of {iterations} runs reached their power cut"
    );
    assert!(cleaned > 0, "no run got as far as cleaning");
}

#[test]
fn power_cut_at_random_points_4k_blocks() {
    crash_and_recover(30, 4096, 0x5eed_0001);
}

#[test]
fn power_cut_at_random_points_512_byte_blocks() {
    crash_and_recover(20, 512, 0x5eed_0002);
}
