//! A workload on a store: fill every logical block, overwrite at random,
//! commit, reopen (rebuilding the map from the summaries), verify; and what
//! the cleaner did meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_stack::BlockDevice;

use crate::store::thread_cpu_time;
use crate::{CleanStats, GcError, LogStore, StoreOptions};

/// What to write.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Workload {
    /// Random block overwrites after the fill.
    pub overwrites: u64,
    /// 80 % of the overwrites go to 20 % of the blocks (otherwise
    /// uniform): where cost-benefit beats greedy.
    pub hot_cold: bool,
    /// Seed of the overwrite sequence: the same seed, the same workload.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            overwrites: 0,
            hot_cold: false,
            seed: 1,
        }
    }
}

impl Workload {
    /// The bytes of version `version` of logical block `lbn`: the block
    /// number and version, then bytes derived from both.
    pub fn content(lbn: u64, version: u64, out: &mut [u8]) {
        let mut x = (lbn.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
            | 1;
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let word = match i {
                0 => lbn,
                1 => version,
                _ => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                }
            };
            chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        }
    }

    /// The version `data` holds of `lbn`, when it is exactly one.
    pub fn version_of(lbn: u64, data: &[u8], scratch: &mut [u8]) -> Result<u64, String> {
        let word = |i: usize| {
            data.get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        if word(0) != lbn {
            return Err(format!("holds logical block {}'s header", word(0)));
        }
        let version = word(1);
        Workload::content(lbn, version, scratch);
        match data.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
            None => Ok(version),
            Some(at) => Err(format!("version {version}'s bytes differ from byte {at}")),
        }
    }
}

/// Checks that `data` is version `version` of `lbn` (0: never written,
/// all zeros).
pub fn check_block(lbn: u64, version: u64, data: &[u8], scratch: &mut [u8]) -> Result<(), GcError> {
    if version == 0 {
        return match data.iter().position(|&b| b != 0) {
            None => Ok(()),
            Some(at) => Err(GcError::Verify {
                lbn,
                reason: format!("never written, but byte {at} is not zero"),
            }),
        };
    }
    match Workload::version_of(lbn, data, scratch) {
        Ok(v) if v == version => Ok(()),
        Ok(v) => Err(GcError::Verify {
            lbn,
            reason: format!("holds version {v}, expected {version}"),
        }),
        Err(reason) => Err(GcError::Verify {
            lbn,
            reason: format!("expected version {version}: {reason}"),
        }),
    }
}

/// A run: the store's options, the workload, and whether to verify.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Format and cleaner options.
    pub store: StoreOptions,
    /// What to write.
    pub workload: Workload,
    /// After the run, reopen the store and check every block.
    pub verify: bool,
}

/// Where a run is, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// "fill", "overwrite" or "verify".
    pub phase: &'static str,
    /// Blocks done in this phase.
    pub done: u64,
    /// Blocks in this phase.
    pub total: u64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct RunReport {
    /// The device.
    pub device: String,
    /// "offload" or "bounce".
    pub mode: &'static str,
    /// The victim policy.
    pub policy: String,
    /// Logical blocks of the store.
    pub logical_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Segments, and data slots per segment.
    pub segments: u32,
    /// Data slots per segment.
    pub segment_slots: u32,
    /// The workload.
    pub workload: Workload,
    /// Writer and cleaner counters over the whole run.
    pub stats: CleanStats,
    /// (user + relocated) / user blocks over the overwrite phase.
    pub write_amplification: f64,
    /// Relocated MiB per second of relocation wall time.
    pub relocation_mib_s: f64,
    /// Cleaning thread CPU seconds per relocated GiB.
    pub relocation_cpu_s_per_gib: f64,
    /// Wall time of the whole run (fill, overwrites, commit).
    pub wall: Duration,
    /// CPU time of the running thread over the same.
    pub cpu: Duration,
    /// Blocks checked after reopening, when verifying.
    pub verified_blocks: Option<u64>,
}

/// Offload and bounce runs of one workload, side by side.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CompareReport {
    /// With device copy.
    pub offload: RunReport,
    /// Through host memory.
    pub bounce: RunReport,
    /// Relocation throughput, offload over bounce.
    pub throughput_ratio: f64,
    /// Relocation CPU per GiB, offload over bounce.
    pub cpu_ratio: f64,
}

/// Formats `dev` and runs the workload.
pub fn run(dev: &Arc<dyn BlockDevice>, opts: &RunOptions) -> Result<RunReport, GcError> {
    run_with_progress(dev, opts, &mut |_| {})
}

/// [`run`], calling `progress` every few hundred blocks.
pub fn run_with_progress(
    dev: &Arc<dyn BlockDevice>,
    opts: &RunOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<RunReport, GcError> {
    let t0 = Instant::now();
    let cpu0 = thread_cpu_time();
    let mut store = LogStore::format(Arc::clone(dev), &opts.store)?;
    let n = store.logical_blocks();
    let bs = store.block_size();
    let mut versions = vec![0u64; n as usize];
    let mut block = vec![0u8; bs];
    const STEP: u64 = 256;

    for lbn in 0..n {
        versions[lbn as usize] = 1;
        Workload::content(lbn, 1, &mut block);
        store.write(lbn, &block)?;
        if lbn % STEP == 0 {
            progress(Progress {
                phase: "fill",
                done: lbn,
                total: n,
            });
        }
    }
    let after_fill = store.stats().clone();
    let mut pick = Picker::new(&opts.workload, n);
    for i in 0..opts.workload.overwrites {
        let lbn = pick.next();
        let v = &mut versions[lbn as usize];
        *v += 1;
        Workload::content(lbn, *v, &mut block);
        store.write(lbn, &block)?;
        if i % STEP == 0 {
            progress(Progress {
                phase: "overwrite",
                done: i,
                total: opts.workload.overwrites,
            });
        }
    }
    store.sync()?;
    let wall = t0.elapsed();
    let cpu = thread_cpu_time().saturating_sub(cpu0);
    let stats = store.stats().clone();
    let geo = *store.geometry();
    let name = dev.info().name.clone();

    let verified_blocks = if opts.verify {
        drop(store);
        let mut store = LogStore::open(Arc::clone(dev), &opts.store)?;
        Some(verify(&mut store, &versions, progress)?)
    } else {
        None
    };

    let user = stats.user_blocks - after_fill.user_blocks;
    let relocated = stats.blocks_relocated - after_fill.blocks_relocated;
    let relocated_bytes = (stats.blocks_relocated * bs as u64) as f64;
    let secs = stats.relocation_wall.as_secs_f64();
    Ok(RunReport {
        device: name,
        mode: if opts.store.offload {
            "offload"
        } else {
            "bounce"
        },
        policy: opts.store.policy.to_string(),
        logical_blocks: n,
        block_size: geo.block_size,
        segments: geo.segments,
        segment_slots: geo.data_slots,
        workload: opts.workload.clone(),
        write_amplification: if user > 0 {
            (user + relocated) as f64 / user as f64
        } else {
            1.0
        },
        relocation_mib_s: if secs > 0.0 {
            relocated_bytes / (1 << 20) as f64 / secs
        } else {
            0.0
        },
        relocation_cpu_s_per_gib: if relocated_bytes > 0.0 {
            stats.relocation_cpu.as_secs_f64() / (relocated_bytes / (1u64 << 30) as f64)
        } else {
            0.0
        },
        stats,
        wall,
        cpu,
        verified_blocks,
    })
}

/// Reads every logical block back and checks it is the latest version.
fn verify(
    store: &mut LogStore,
    versions: &[u64],
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, GcError> {
    const BATCH: usize = 256;
    let bs = store.block_size();
    let mut buf = vec![0u8; BATCH * bs];
    let mut scratch = vec![0u8; bs];
    let total = versions.len() as u64;
    let mut lbns = Vec::with_capacity(BATCH);
    for first in (0..total).step_by(BATCH) {
        lbns.clear();
        lbns.extend(first..(first + BATCH as u64).min(total));
        let out = &mut buf[..lbns.len() * bs];
        store.read_many(&lbns, out)?;
        for (i, &lbn) in lbns.iter().enumerate() {
            check_block(
                lbn,
                versions[lbn as usize],
                &out[i * bs..(i + 1) * bs],
                &mut scratch,
            )?;
        }
        progress(Progress {
            phase: "verify",
            done: first,
            total,
        });
    }
    Ok(total)
}

/// Runs the workload with offload, then again (reformatted, same seed)
/// with bounce.
pub fn compare(
    dev: &Arc<dyn BlockDevice>,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&'static str, Progress),
) -> Result<CompareReport, GcError> {
    let mut with = opts.clone();
    with.store.offload = true;
    let offload = run_with_progress(dev, &with, &mut |p| progress("offload", p))?;
    with.store.offload = false;
    let bounce = run_with_progress(dev, &with, &mut |p| progress("bounce", p))?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(CompareReport {
        throughput_ratio: ratio(offload.relocation_mib_s, bounce.relocation_mib_s),
        cpu_ratio: ratio(
            offload.relocation_cpu_s_per_gib,
            bounce.relocation_cpu_s_per_gib,
        ),
        offload,
        bounce,
    })
}

/// The overwrite sequence: uniform, or 80 % to the first 20 % of blocks.
struct Picker {
    x: u64,
    blocks: u64,
    hot_blocks: u64,
    hot_cold: bool,
}

impl Picker {
    fn new(w: &Workload, blocks: u64) -> Picker {
        Picker {
            x: w.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
            blocks,
            hot_blocks: (blocks / 5).max(1),
            hot_cold: w.hot_cold,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }

    fn next(&mut self) -> u64 {
        let r = self.next_u64();
        if !self.hot_cold {
            return r % self.blocks;
        }
        if r % 10 < 8 {
            self.next_u64() % self.hot_blocks
        } else {
            self.hot_blocks + self.next_u64() % (self.blocks - self.hot_blocks).max(1)
        }
        .min(self.blocks - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_names_its_block_and_version() {
        let mut a = vec![0u8; 4096];
        let mut scratch = vec![0u8; 4096];
        Workload::content(77, 3, &mut a);
        assert_eq!(Workload::version_of(77, &a, &mut scratch), Ok(3));
        assert!(check_block(77, 3, &a, &mut scratch).is_ok());
        assert!(check_block(77, 4, &a, &mut scratch).is_err());
        assert!(check_block(78, 3, &a, &mut scratch).is_err());
        a[1000] ^= 1;
        assert!(Workload::version_of(77, &a, &mut scratch).is_err());
        assert!(check_block(5, 0, &[0u8; 512], &mut scratch[..512]).is_ok());
        assert!(check_block(5, 0, &[1u8; 512], &mut scratch[..512]).is_err());
    }

    #[test]
    fn hot_cold_sends_most_writes_to_a_fifth() {
        let w = Workload {
            overwrites: 0,
            hot_cold: true,
            seed: 9,
        };
        let mut p = Picker::new(&w, 1000);
        let hot = (0..10_000).filter(|_| p.next() < 200).count();
        assert!((7_500..8_500).contains(&hot), "{hot}");
        let mut u = Picker::new(&Workload::default(), 1000);
        assert!((0..10_000).all(|_| u.next() < 1000));
    }
}
