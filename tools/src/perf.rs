//! The `ustor-perf` engine: IOPS and latency of the NVMe driver, in the
//! manner of SPDK's `spdk_nvme_perf`, directly on a queue pair (`emu`,
//! `vfio:` targets) or through the block-device stack's channels (a stack
//! spec such as `stripe(chunk=128k, emu:1g,null, emu:1g,null)`).
//!
//! One thread per queue pair keeps `queue_depth` requests in flight for the
//! run's duration. The hot loop neither allocates nor locks: buffers, the
//! free-buffer stack and the latency histogram are set up before the clock
//! starts. Latency is measured in CPU ticks (the TSC on x86-64, as SPDK
//! does; the OS clock can be expensive, e.g. HPET in a VM), read once per
//! harvested batch and shared with the resubmissions that follow, and
//! converted to time with a calibration over the whole run.
//!
//! ```
//! use std::time::Duration;
//! use ustor_tools::perf::{PerfConfig, Target, Workload, run};
//!
//! let report = run(&PerfConfig {
//!     target: Target::parse("emu").unwrap(),
//!     workload: Workload::RandRead,
//!     duration: Duration::from_millis(100),
//!     ..PerfConfig::default()
//! })
//! .unwrap();
//! assert!(report.ios > 0 && report.errors == 0);
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use bdev_stack::nvme_leaf::dma_allocator_for;
use bdev_stack::{BdevError, BlockDevice, Channel, DmaAllocator, IoRequest};
use hdrhistogram::Histogram;
use nvme::emu::{EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::{Controller, ControllerOptions, DmaContext, QueueOptions, SubmitError, Transport};
use serde::Serialize;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The driver failed (bring-up, queue creation, polling).
    #[error(transparent)]
    Nvme(#[from] nvme::Error),
    /// A submission was refused for a reason other than a full queue.
    #[error("submission refused: {0}")]
    Submit(SubmitError),
    /// A worker thread panicked.
    #[error("worker thread {0} panicked")]
    Panicked(usize),
    /// The stack spec does not build.
    #[error(transparent)]
    Spec(#[from] bdev_stack::spec::SpecError),
    /// The block-device stack failed (channel, buffers).
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// A stack submission was refused as invalid.
    #[error("submission refused: {0}")]
    StackSubmit(bdev_stack::IoError),
}

/// The I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniformly random reads.
    RandRead,
    /// Uniformly random writes.
    RandWrite,
    /// Random mix of reads and writes.
    Mix {
        /// Percentage of reads (0-100).
        read_pct: u8,
    },
}

impl Workload {
    fn random(self) -> bool {
        !matches!(self, Workload::Read | Workload::Write)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workload::Read => write!(f, "read"),
            Workload::Write => write!(f, "write"),
            Workload::RandRead => write!(f, "randread"),
            Workload::RandWrite => write!(f, "randwrite"),
            Workload::Mix { read_pct } => write!(f, "mix (rwmixread={read_pct})"),
        }
    }
}

/// What to benchmark.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Target {
    /// The in-process emulated controller with a null namespace of 4 KiB
    /// blocks (measures driver + emulator overhead).
    Emu {
        /// Inline (doorbell processes) or a thread of its own.
        thread: bool,
        /// Sparse-memory namespace instead of null.
        memory: bool,
    },
    /// A controller bound to vfio-pci.
    Vfio {
        /// PCI address.
        addr: String,
        /// Namespace id.
        nsid: u32,
    },
    /// A block-device stack built from a spec ([`bdev_stack::spec`]),
    /// driven through its channels.
    Stack {
        /// The spec.
        spec: String,
    },
}

impl Target {
    /// Parses `emu`, `emu:thread`, `emu:mem`, `emu:mem:thread`,
    /// `vfio:0000:00:04.0[/nsid]`, or else a stack spec (a leaf such as
    /// `emu:1g`, `mem:64m`, `sgemu:1g`, `nvme:0000:00:04.0/1`, or a stack).
    pub fn parse(s: &str) -> Result<Target, PerfError> {
        if let Some(rest) = s.strip_prefix("vfio:") {
            let (addr, nsid) = match rest.split_once('/') {
                Some((a, n)) => (
                    a,
                    n.parse::<u32>()
                        .map_err(|_| PerfError::Config(format!("bad namespace id in {s:?}")))?,
                ),
                None => (rest, 1),
            };
            return Ok(Target::Vfio {
                addr: addr.to_owned(),
                nsid,
            });
        }
        let emu_words = |rest: &str| {
            rest.split(':')
                .all(|word| matches!(word, "thread" | "inline" | "mem" | "null"))
        };
        if s != "emu" && !s.strip_prefix("emu:").is_some_and(emu_words) {
            // Everything else is a stack spec; its parser names what is
            // wrong with it, and where.
            return Ok(Target::Stack { spec: s.to_owned() });
        }
        let (mut thread, mut memory) = (false, false);
        for word in s.split(':').skip(1) {
            match word {
                "thread" => thread = true,
                "inline" => thread = false,
                "mem" => memory = true,
                _ => memory = false,
            }
        }
        Ok(Target::Emu { thread, memory })
    }
}

impl FromStr for Target {
    type Err = PerfError;
    fn from_str(s: &str) -> Result<Target, PerfError> {
        Target::parse(s)
    }
}

/// A benchmark run's parameters.
#[derive(Clone, Debug, Serialize)]
pub struct PerfConfig {
    /// Device.
    pub target: Target,
    /// Pattern.
    pub workload: Workload,
    /// Bytes per I/O (a multiple of the block size).
    pub io_size: usize,
    /// Requests in flight per queue pair.
    pub queue_depth: u16,
    /// Measured time.
    pub duration: Duration,
    /// Threads, one queue pair each.
    pub threads: u16,
    /// Use shadow doorbells when the controller offers them (see
    /// [`nvme::ControllerOptions::shadow_doorbells`]).
    pub shadow_doorbells: bool,
    /// Refill the queue only once this many requests have completed (as
    /// fio's `iodepth_batch_submit`/`iodepth_batch_complete_min`): fewer,
    /// larger doorbell batches. 1 (the default) keeps the queue full.
    pub batch: u16,
    /// Ring the SQ doorbell after every this many submissions of a refill
    /// (see [`nvme::QueuePair::set_sq_doorbell_every`]), so the controller
    /// starts on the first part while the rest is queued; 0 (the default)
    /// rings once per refill. Queue-pair targets only.
    pub sq_doorbell_every: u16,
    /// Stack targets: plain heap buffers instead of the device's own (an
    /// io_uring leaf's registered memory), to compare the two. Not for
    /// devices that need DMA-mapped buffers.
    pub host_buffers: bool,
}

impl Default for PerfConfig {
    fn default() -> Self {
        PerfConfig {
            target: Target::Emu {
                thread: false,
                memory: false,
            },
            workload: Workload::RandRead,
            io_size: 4096,
            queue_depth: 128,
            duration: Duration::from_secs(5),
            threads: 1,
            shadow_doorbells: false,
            batch: 1,
            sq_doorbell_every: 0,
            host_buffers: false,
        }
    }
}

/// The figures of a run.
#[derive(Clone, Debug, Serialize)]
pub struct PerfReport {
    /// The configuration, echoed.
    pub config: PerfConfig,
    /// Device name.
    pub device: String,
    /// Completed I/Os.
    pub ios: u64,
    /// I/Os that completed with an error.
    pub errors: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// Mean latency, microseconds.
    pub mean_us: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Largest latency, microseconds.
    pub max_us: f64,
    /// SQ tail doorbell (MMIO) writes per I/O; `None` through a stack.
    pub sq_doorbells_per_io: Option<f64>,
    /// CQ head doorbell (MMIO) writes per I/O; `None` through a stack.
    pub cq_doorbells_per_io: Option<f64>,
}

impl fmt::Display for PerfReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "{}: {} {} B, qd {}, {} thread(s), {:.1} s{}{}{}",
            self.device,
            c.workload,
            c.io_size,
            c.queue_depth,
            c.threads,
            self.seconds,
            if c.shadow_doorbells {
                ", shadow doorbells"
            } else {
                ""
            },
            if c.batch > 1 {
                format!(", batch {}", c.batch)
            } else {
                String::new()
            },
            if c.sq_doorbell_every > 0 {
                format!(", SQ doorbell every {}", c.sq_doorbell_every)
            } else {
                String::new()
            }
        )?;
        writeln!(
            f,
            "  IOPS {:.0}  MiB/s {:.1}  ios {}  errors {}",
            self.iops, self.mib_per_s, self.ios, self.errors
        )?;
        write!(
            f,
            "  latency us: mean {:.2}  p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            self.mean_us, self.p50_us, self.p99_us, self.p999_us, self.max_us
        )?;
        if let (Some(sq), Some(cq)) = (self.sq_doorbells_per_io, self.cq_doorbells_per_io) {
            write!(f, "\n  doorbell writes per I/O: SQ {sq:.3}  CQ {cq:.3}")?;
        }
        Ok(())
    }
}

/// Parses a bytes-per-I/O size like `4096`, `4k`, `128K`, `1m` (the spec
/// grammar's sizes).
pub fn parse_size(s: &str) -> Result<usize, PerfError> {
    let bytes = bdev_stack::spec::parse_bytes(s.trim())
        .map_err(|e| PerfError::Config(format!("bad size {s:?}: {e}")))?;
    usize::try_from(bytes)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| PerfError::Config(format!("bad size {s:?}: not a positive size")))
}

/// Runs the benchmark on the configured target.
pub fn run(cfg: &PerfConfig) -> Result<PerfReport, PerfError> {
    let opts = ControllerOptions {
        io_queues: cfg.threads.max(1),
        shadow_doorbells: cfg.shadow_doorbells,
        ..ControllerOptions::default()
    };
    match &cfg.target {
        Target::Emu { thread, memory } => {
            let ctx = DmaContext::host();
            let blocks = 1u64 << 28; // 1 TiB of 4 KiB blocks
            let ns = if *memory {
                NamespaceConfig::memory(4096, 1 << 18)
            } else {
                NamespaceConfig::null(4096, blocks)
            };
            let emu = EmuController::new(
                &ctx,
                EmuConfig {
                    mode: if *thread {
                        EmuMode::Thread
                    } else {
                        EmuMode::Inline
                    },
                    mqes: 4095,
                    max_io_queues: cfg.threads.max(1),
                    namespaces: vec![ns],
                    ..EmuConfig::default()
                },
            )?;
            let ctrl = Controller::new(emu, opts)?;
            run_on(&ctrl, 1, cfg)
        }
        Target::Vfio { addr, nsid } => {
            let dev = nvme::vfio::VfioPci::open(addr)?;
            let ctrl = Controller::new(dev, opts)?;
            run_on(&ctrl, *nsid, cfg)
        }
        Target::Stack { spec } => {
            let device = bdev_stack::spec::build(spec)?;
            run_on_stack(&device, cfg)
        }
    }
}

/// Runs the benchmark through the channels of a block device (one per
/// thread), with buffers from [`dma_allocator_for`] the device.
pub fn run_on_stack(
    device: &Arc<dyn BlockDevice>,
    cfg: &PerfConfig,
) -> Result<PerfReport, PerfError> {
    let info = device.info();
    let bs = info.block_size as usize;
    if cfg.io_size == 0 || !cfg.io_size.is_multiple_of(bs) {
        return Err(PerfError::Config(format!(
            "I/O size {} is not a multiple of the {bs}-byte block",
            cfg.io_size
        )));
    }
    if (cfg.io_size / bs) as u64 > info.max_transfer_blocks {
        return Err(PerfError::Config(format!(
            "I/O size {} is above the device's largest transfer of {} blocks",
            cfg.io_size, info.max_transfer_blocks
        )));
    }
    check_common(cfg)?;
    let alloc: Arc<dyn bdev_stack::DmaAllocator> = if cfg.host_buffers {
        if info.needs_iova {
            return Err(PerfError::Config(format!(
                "--host-buffers: {} needs DMA-mapped buffers",
                info.name
            )));
        }
        Arc::new(bdev_stack::HostAllocator)
    } else {
        dma_allocator_for(device)?
    };
    let results: Vec<Result<ThreadResult, PerfError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..cfg.threads)
            .map(|t| {
                let alloc = Arc::clone(&alloc);
                sc.spawn(move || stack_worker(device.as_ref(), alloc.as_ref(), cfg, t))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or(Err(PerfError::Panicked(i))))
            .collect()
    });
    report(info.name.clone(), cfg, results)
}

fn check_common(cfg: &PerfConfig) -> Result<(), PerfError> {
    if cfg.queue_depth == 0 || cfg.threads == 0 {
        return Err(PerfError::Config(
            "queue depth and threads must be ≥ 1".into(),
        ));
    }
    if let Workload::Mix { read_pct } = cfg.workload
        && read_pct > 100
    {
        return Err(PerfError::Config("rwmixread above 100".into()));
    }
    Ok(())
}

struct ThreadResult {
    ios: u64,
    errors: u64,
    /// Latencies in ticks.
    hist: Histogram<u64>,
    elapsed: Duration,
    ticks: u64,
    /// Doorbell writes during the measured time (queue-pair runs only).
    doorbells: Option<nvme::DoorbellWrites>,
}

/// A cheap monotonic tick counter.
mod ticks {
    /// The time-stamp counter.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn now(_base: std::time::Instant) -> u64 {
        // SAFETY: RDTSC has no preconditions on x86-64: it reads the
        // time-stamp counter and touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// Nanoseconds since `base` where there is no TSC.
    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub fn now(base: std::time::Instant) -> u64 {
        base.elapsed().as_nanos() as u64
    }
}

/// Runs the benchmark on namespace `nsid` of an already brought-up
/// controller.
pub fn run_on<T: Transport>(
    ctrl: &Controller<T>,
    nsid: u32,
    cfg: &PerfConfig,
) -> Result<PerfReport, PerfError> {
    let ns = ctrl
        .namespace(nsid)
        .ok_or_else(|| PerfError::Config(format!("{}: no namespace {nsid}", ctrl.name())))?;
    if cfg.io_size == 0 || !cfg.io_size.is_multiple_of(ns.block_size as usize) {
        return Err(PerfError::Config(format!(
            "I/O size {} is not a multiple of the {}-byte block",
            cfg.io_size, ns.block_size
        )));
    }
    check_common(cfg)?;
    if cfg.threads > ctrl.io_queues() {
        return Err(PerfError::Config(format!(
            "{} threads but the controller granted {} I/O queues",
            cfg.threads,
            ctrl.io_queues()
        )));
    }
    let results: Vec<Result<ThreadResult, PerfError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..cfg.threads)
            .map(|t| sc.spawn(move || worker(ctrl, ns, cfg, t)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or(Err(PerfError::Panicked(i))))
            .collect()
    });
    report(ctrl.name().to_owned(), cfg, results)
}

/// Sums the threads' figures.
fn report(
    device: String,
    cfg: &PerfConfig,
    results: Vec<Result<ThreadResult, PerfError>>,
) -> Result<PerfReport, PerfError> {
    let mut hist = new_histogram()?;
    let (mut ios, mut errors, mut elapsed) = (0u64, 0u64, Duration::ZERO);
    let (mut ticks, mut nanos) = (0u128, 0u128);
    let mut doorbells = Some(nvme::DoorbellWrites::default());
    for r in results {
        let r = r?;
        doorbells = doorbells
            .zip(r.doorbells)
            .map(|(a, b)| nvme::DoorbellWrites {
                sq: a.sq + b.sq,
                cq: a.cq + b.cq,
            });
        ios += r.ios;
        errors += r.errors;
        elapsed = elapsed.max(r.elapsed);
        ticks += r.ticks as u128;
        nanos += r.elapsed.as_nanos();
        hist.add(&r.hist)
            .map_err(|e| PerfError::Config(format!("histogram: {e}")))?;
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    // Ticks to microseconds, calibrated over the run.
    let us_per_tick = if ticks == 0 {
        0.0
    } else {
        nanos as f64 / ticks as f64 / 1000.0
    };
    let us = |t: u64| t as f64 * us_per_tick;
    Ok(PerfReport {
        config: cfg.clone(),
        device,
        ios,
        errors,
        seconds: secs,
        iops: ios as f64 / secs,
        mib_per_s: ios as f64 * cfg.io_size as f64 / secs / (1024.0 * 1024.0),
        mean_us: hist.mean() * us_per_tick,
        p50_us: us(hist.value_at_quantile(0.50)),
        p99_us: us(hist.value_at_quantile(0.99)),
        p999_us: us(hist.value_at_quantile(0.999)),
        max_us: us(hist.max()),
        sq_doorbells_per_io: doorbells.map(|d| d.sq as f64 / ios.max(1) as f64),
        cq_doorbells_per_io: doorbells.map(|d| d.cq as f64 / ios.max(1) as f64),
    })
}

fn new_histogram() -> Result<Histogram<u64>, PerfError> {
    // Up to 60 s at 10 GHz ticks.
    Histogram::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| PerfError::Config(format!("histogram: {e}")))
}

/// xorshift64*: cheap and good enough for picking LBAs.
struct Rng(u64);

impl Rng {
    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Picks each I/O's block and direction for a workload: one generator for
/// every target, so runs on a queue pair and on a stack are comparable.
struct Picker {
    rng: Rng,
    seq: u64,
    slots: u64,
    blocks_per_io: u64,
    workload: Workload,
}

impl Picker {
    /// `block_count` blocks of which each I/O covers `blocks_per_io`;
    /// sequential workloads start each thread at its share of the device.
    fn new(cfg: &PerfConfig, thread: u16, block_count: u64, blocks_per_io: u64) -> Picker {
        let slots = (block_count / blocks_per_io.max(1)).max(1);
        Picker {
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ ((u64::from(thread) + 1) * 0x1234_5678_9abc)),
            seq: (u64::from(thread) * slots / cfg.threads.max(1) as u64) % slots,
            slots,
            blocks_per_io,
            workload: cfg.workload,
        }
    }

    /// The next I/O: its first block, and whether it reads.
    #[inline]
    fn next(&mut self) -> (u64, bool) {
        let slot = if self.workload.random() {
            self.rng.next() % self.slots
        } else {
            self.seq = (self.seq + 1) % self.slots;
            self.seq
        };
        let read = match self.workload {
            Workload::Read | Workload::RandRead => true,
            Workload::Write | Workload::RandWrite => false,
            Workload::Mix { read_pct } => (self.rng.next() % 100) < u64::from(read_pct),
        };
        (slot * self.blocks_per_io, read)
    }
}

fn worker<T: Transport>(
    ctrl: &Controller<T>,
    ns: nvme::Namespace,
    cfg: &PerfConfig,
    thread: u16,
) -> Result<ThreadResult, PerfError> {
    let qd = cfg.queue_depth as usize;
    // Like spdk_nvme_perf, queues of at least 256 entries whatever the
    // depth: the slack lets completion doorbells be batched.
    let entries = u16::try_from((qd + 1).max(256))
        .map_err(|_| PerfError::Config("queue depth above 65534".into()))?;
    let mut qp = ctrl.create_qpair(QueueOptions {
        entries,
        timeout: None,
        ..QueueOptions::default()
    })?;
    qp.set_sq_doorbell_every(cfg.sq_doorbell_every);
    let qd = qd.min(qp.depth());
    let buf = ctrl.dma_alloc(qd * cfg.io_size)?;
    buf.fill(0x5A);
    let slices: Vec<nvme::DmaSlice> = (0..qd)
        .map(|i| buf.slice(i * cfg.io_size, cfg.io_size))
        .collect::<Option<_>>()
        .ok_or_else(|| PerfError::Config("buffer slicing".into()))?;
    let mut free: Vec<u16> = (0..qd as u16).collect();
    let refill_at = (cfg.batch.max(1) as usize).min(qd);
    let base = Instant::now();
    let mut started = vec![0u64; qd];
    let mut hist = new_histogram()?;
    let blocks_per_io = (cfg.io_size / ns.block_size as usize) as u64;
    let mut picker = Picker::new(cfg, thread, ns.blocks, blocks_per_io);
    let (mut ios, mut errors) = (0u64, 0u64);
    let doorbells_before = qp.doorbell_writes();
    let start = Instant::now();
    let start_ticks = ticks::now(base);
    let end = start + cfg.duration;
    // One clock read per harvested batch, shared by its completions and
    // by the submissions that refill the queue right after (in a VM the
    // clock can be costly, so an idle poll never reads it).
    let mut now = start_ticks;
    let mut iter = 0u32;
    loop {
        if free.len() >= refill_at {
            while let Some(&slot) = free.last() {
                let (lba, read) = picker.next();
                let s = &slices[slot as usize];
                let r = if read {
                    qp.read(&ns, lba, s, slot as u64)
                } else {
                    qp.write(&ns, lba, s, slot as u64)
                };
                match r {
                    Ok(()) => {
                        free.pop();
                        started[slot as usize] = now;
                    }
                    Err(SubmitError::QueueFull) => break,
                    Err(e) => return Err(PerfError::Submit(e)),
                }
            }
        }
        let mut stamp: Option<u64> = None;
        qp.poll(qd, |c| {
            let t = *stamp.get_or_insert_with(|| ticks::now(base));
            let slot = c.tag as usize;
            let lat = t.saturating_sub(started[slot]);
            hist.saturating_record(lat.max(1));
            if c.result.is_err() {
                errors += 1;
            }
            ios += 1;
            free.push(c.tag as u16);
        })?;
        match stamp {
            Some(t) => {
                now = t;
                iter = iter.wrapping_add(1);
                if iter.is_multiple_of(64) && Instant::now() >= end {
                    break;
                }
            }
            None => {
                // Idle poll: look at the clock now and then only.
                iter = iter.wrapping_add(1);
                if iter.is_multiple_of(1024) && Instant::now() >= end {
                    break;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let run_ticks = ticks::now(base).saturating_sub(start_ticks);
    let doorbells_after = qp.doorbell_writes();
    // Let the in-flight requests finish (not counted).
    qp.drain(Duration::from_secs(30))?;
    Ok(ThreadResult {
        ios,
        errors,
        hist,
        elapsed,
        ticks: run_ticks,
        doorbells: Some(nvme::DoorbellWrites {
            sq: doorbells_after.sq - doorbells_before.sq,
            cq: doorbells_after.cq - doorbells_before.cq,
        }),
    })
}

/// The request loop of [`worker`], through a block-device channel.
fn stack_worker(
    device: &dyn BlockDevice,
    alloc: &dyn DmaAllocator,
    cfg: &PerfConfig,
    thread: u16,
) -> Result<ThreadResult, PerfError> {
    let qd = cfg.queue_depth as usize;
    let info = device.info();
    let mut ch = device.open_channel(qd)?;
    let mut buffers = (0..qd)
        .map(|_| alloc.allocate(cfg.io_size))
        .collect::<Result<Vec<_>, _>>()?;
    let slices: Vec<bdev_stack::DmaSlice> = buffers.iter_mut().map(|b| b.dma_slice()).collect();
    let mut completions = vec![bdev_stack::Completion::EMPTY; qd];
    let mut free: Vec<u16> = (0..qd as u16).collect();
    let refill_at = (cfg.batch.max(1) as usize).min(qd);
    let base = Instant::now();
    let mut started = vec![0u64; qd];
    let mut hist = new_histogram()?;
    let blocks_per_io = (cfg.io_size / info.block_size as usize) as u64;
    let mut picker = Picker::new(cfg, thread, info.block_count, blocks_per_io);
    let (mut ios, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let start_ticks = ticks::now(base);
    let end = start + cfg.duration;
    let mut now = start_ticks;
    let mut iter = 0u32;
    loop {
        if free.len() >= refill_at {
            while let Some(&slot) = free.last() {
                let (lba, read) = picker.next();
                let buf = slices[slot as usize];
                let req = if read {
                    IoRequest::read(lba, blocks_per_io, buf, slot as u64)
                } else {
                    IoRequest::write(lba, blocks_per_io, buf, slot as u64)
                };
                // SAFETY: buffer `slot` is owned by `buffers`, which outlives
                // the channel's use of it (the loop drains before returning),
                // and is not touched until its completion frees the slot.
                match unsafe { ch.submit(req) } {
                    Ok(()) => {
                        free.pop();
                        started[slot as usize] = now;
                    }
                    Err(bdev_stack::SubmitError::Busy) => break,
                    Err(bdev_stack::SubmitError::Invalid(e)) => {
                        drain_channel(ch.as_mut(), &mut completions);
                        return Err(PerfError::StackSubmit(e));
                    }
                }
            }
        }
        let n = ch.poll(&mut completions);
        if n > 0 {
            let t = ticks::now(base);
            for c in &completions[..n] {
                let slot = c.ctx as usize;
                hist.saturating_record(t.saturating_sub(started[slot]).max(1));
                if c.result.is_err() {
                    errors += 1;
                }
                ios += 1;
                free.push(c.ctx as u16);
            }
            now = t;
            iter = iter.wrapping_add(1);
            if iter.is_multiple_of(64) && Instant::now() >= end {
                break;
            }
        } else {
            iter = iter.wrapping_add(1);
            if iter.is_multiple_of(1024) && Instant::now() >= end {
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    let run_ticks = ticks::now(base).saturating_sub(start_ticks);
    // Let the in-flight requests finish (not counted): the buffers must
    // outlive them.
    drain_channel(ch.as_mut(), &mut completions);
    drop(buffers);
    Ok(ThreadResult {
        ios,
        errors,
        hist,
        elapsed,
        ticks: run_ticks,
        doorbells: None,
    })
}

/// Polls until the channel holds nothing (every accepted request
/// completes: the leaves own the timeouts).
fn drain_channel(ch: &mut dyn Channel, completions: &mut [bdev_stack::Completion]) {
    while ch.outstanding() > 0 {
        ch.poll(completions);
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("emu").expect("ok"),
            Target::Emu {
                thread: false,
                memory: false
            }
        );
        assert_eq!(
            Target::parse("emu:mem:thread").expect("ok"),
            Target::Emu {
                thread: true,
                memory: true
            }
        );
        assert_eq!(
            Target::parse("vfio:0000:00:04.0/2").expect("ok"),
            Target::Vfio {
                addr: "0000:00:04.0".into(),
                nsid: 2
            }
        );
        assert_eq!(
            Target::parse("vfio:0000:00:05.0").expect("ok"),
            Target::Vfio {
                addr: "0000:00:05.0".into(),
                nsid: 1
            }
        );
        assert!(Target::parse("vfio:0000:00:05.0/x").is_err());
        for spec in [
            // Not the benchmark's own forms: the spec parser judges them.
            "emu:bogus",
            "nvme0",
            "sgemu:1g",
            "stripe(chunk=128k, emu:1g,null, emu:1g,null)",
            "emu:1g,null",
            "emu:64m",
            "mem:64m",
            "nvme:0000:00:04.0/1",
        ] {
            assert_eq!(
                Target::parse(spec).expect("stack"),
                Target::Stack { spec: spec.into() }
            );
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").expect("ok"), 4096);
        assert_eq!(parse_size("4k").expect("ok"), 4096);
        assert_eq!(parse_size("1M").expect("ok"), 1 << 20);
        assert!(parse_size("0").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999999999m").is_err());
    }

    #[test]
    fn every_workload_runs_on_emu() {
        for workload in [
            Workload::Read,
            Workload::Write,
            Workload::RandRead,
            Workload::RandWrite,
            Workload::Mix { read_pct: 70 },
        ] {
            let r = run(&PerfConfig {
                workload,
                target: Target::parse("emu:mem").expect("target"),
                queue_depth: 8,
                threads: 2,
                duration: Duration::from_millis(50),
                ..PerfConfig::default()
            })
            .expect("run");
            assert!(r.ios > 0 && r.errors == 0, "{r}");
            assert!(r.p50_us <= r.p99_us && r.p99_us <= r.p999_us && r.p999_us <= r.max_us);
            let j = serde_json::to_value(&r).expect("json");
            assert!(j["iops"].as_f64().is_some_and(|v| v > 0.0));
        }
    }

    #[test]
    fn sq_doorbell_every_splits_the_refill() {
        let sq_per_io = |every: u16| {
            let r = run(&PerfConfig {
                queue_depth: 16,
                duration: Duration::from_millis(50),
                sq_doorbell_every: every,
                ..PerfConfig::default()
            })
            .expect("run");
            assert!(r.ios > 0 && r.errors == 0, "{r}");
            if every > 0 {
                assert!(r.to_string().contains("SQ doorbell every"), "{r}");
            }
            r.sq_doorbells_per_io
                .expect("queue-pair run counts doorbells")
        };
        // Inline emulator: each refill is the whole depth, 16 commands.
        let whole = sq_per_io(0);
        let split = sq_per_io(4);
        assert!(whole < 0.1, "one doorbell per refill of 16: {whole}");
        assert!(
            (0.24..=0.3).contains(&split),
            "one per 4 submissions: {split}"
        );
    }

    #[test]
    fn stacks_run_through_their_channels() {
        for (spec, workload) in [
            (
                "stripe(chunk=16k, emu:64m,bs=4096, emu:64m,bs=4096)",
                Workload::RandWrite,
            ),
            (
                "mirror(emu:16m,bs=4096, mem:16m,bs=4096)",
                Workload::Mix { read_pct: 50 },
            ),
            ("emu:1g,bs=4096,null", Workload::RandRead),
        ] {
            let r = run(&PerfConfig {
                workload,
                target: Target::parse(spec).expect("target"),
                queue_depth: 16,
                threads: 2,
                duration: Duration::from_millis(50),
                ..PerfConfig::default()
            })
            .expect("run");
            assert!(r.ios > 0 && r.errors == 0, "{spec}: {r}");
        }
        // A bad spec, and I/O larger than a bare leaf takes, are refused.
        let bad = |target: &str, io_size: usize| {
            run(&PerfConfig {
                target: Target::parse(target).expect("target"),
                io_size,
                duration: Duration::from_millis(10),
                ..PerfConfig::default()
            })
            .is_err()
        };
        assert!(bad("stripe(chunk=8, emu:1m)", 4096));
        assert!(bad("emu:1m,bs=4096", 4 << 20));
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = |cfg: PerfConfig| matches!(run(&cfg), Err(PerfError::Config(_)));
        assert!(bad(PerfConfig {
            io_size: 1000,
            ..PerfConfig::default()
        }));
        assert!(bad(PerfConfig {
            queue_depth: 0,
            ..PerfConfig::default()
        }));
        assert!(bad(PerfConfig {
            workload: Workload::Mix { read_pct: 101 },
            duration: Duration::from_millis(10),
            ..PerfConfig::default()
        }));
    }
}
