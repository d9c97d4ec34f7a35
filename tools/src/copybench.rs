//! The `ustor-copybench` engine: copies a described workload with the copy
//! engine, offload on and off, and measures each run: throughput, commands
//! per method, host CPU time per GiB (user + system time of the process
//! around the copy), and the engine's [`CopyReport`]. Every run is checked
//! by reading the destination back.
//!
//! The default workload is a garbage collector's relocation on one
//! embedded `emu:` namespace (Copy limits of the VM rig): extents scattered
//! over the first half of the device are gathered, in address order, into
//! one range at the start of the second half.
//!
//! ```
//! use ustor_tools::copybench::{Bench, Workload};
//!
//! let mut bench = Bench::open(&Workload {
//!     src: "emu:8m".into(),
//!     extent_bytes: 64 << 10,
//!     extents: 32,
//!     ..Workload::default()
//! })
//! .unwrap();
//! let offload = bench.run(true, 1).unwrap();
//! let bounce = bench.run(false, 2).unwrap();
//! assert_eq!(offload.offloaded_bytes, 32 * (64 << 10));
//! assert_eq!(bounce.host_bytes, 32 * (64 << 10));
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev_stack::nvme_leaf::dma_allocator_for;
use bdev_stack::{
    BdevError, BlockDevice, DmaAllocator, DmaMemory, LbaRange, OwnedChannel, SubmitError,
};
use copy_engine::{
    CopyEngine, CopyError, CopyOptions, CopyReport, DEFAULT_BOUNCE_BYTES, DEFAULT_BUFFER_BYTES,
    Method,
};
use serde::Serialize;
use tracing::{debug, info};

/// The default source (and destination): one emulated NVMe namespace of
/// 512-byte blocks with the rig's Copy limits (MSRC 15, MSSRL 128, MCL 256).
pub const DEFAULT_SPEC: &str = "emu:128m,bs=512";

/// Errors of a copy benchmark.
#[derive(Debug, thiserror::Error)]
pub enum CopyBenchError {
    /// The workload is unusable.
    #[error("invalid workload: {0}")]
    Config(String),
    /// A stack spec does not build.
    #[error(transparent)]
    Spec(#[from] bdev_stack::spec::SpecError),
    /// The block-device stack failed (channels, buffers).
    #[error(transparent)]
    Bdev(#[from] BdevError),
    /// The copy engine refused the copy.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// Filling the source or reading the destination back failed.
    #[error("{action} {device}: {reason}")]
    Io {
        /// Filling or reading back.
        action: &'static str,
        /// Device name.
        device: String,
        /// What failed.
        reason: String,
    },
    /// The copy left ranges uncopied.
    #[error("copy incomplete ({count} ranges not copied): {report}")]
    Incomplete {
        /// Ranges not copied.
        count: usize,
        /// The report.
        report: String,
    },
    /// The destination read back differs from the source.
    #[error(
        "VERIFY FAILED ({mode}): destination differs from the source at copy byte {offset} \
         (destination LBA {dst_lba}): {differing} of {total} bytes differ"
    )]
    Mismatch {
        /// "offload" or "bounce".
        mode: &'static str,
        /// First differing byte in the logical copy space.
        offset: u64,
        /// The destination LBA holding it.
        dst_lba: u64,
        /// Bytes that differ.
        differing: u64,
        /// Bytes compared.
        total: u64,
    },
    /// getrusage failed.
    #[error("getrusage: {0}")]
    Rusage(std::io::Error),
}

/// What to copy.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Source stack spec.
    pub src: String,
    /// Destination stack spec; `None`: the source device itself.
    pub dst: Option<String>,
    /// Bytes per extent (a multiple of the block size).
    pub extent_bytes: u64,
    /// Extents; they are scattered over the first half of the source.
    pub extents: u64,
    /// Seed for the extent placement and the data pattern.
    pub seed: u64,
    /// Bounce memory in flight.
    pub bounce_bytes: usize,
    /// Bytes per bounce buffer.
    pub buffer_bytes: usize,
    /// Offload commands in flight per destination leaf.
    pub offload_depth: usize,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            src: DEFAULT_SPEC.into(),
            dst: None,
            extent_bytes: 64 << 10,
            extents: 512,
            seed: 0x5eed,
            bounce_bytes: DEFAULT_BOUNCE_BYTES,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            offload_depth: 16,
        }
    }
}

/// What one method did in a run.
#[derive(Clone, Debug, Serialize)]
pub struct MethodFigures {
    /// The method (`nvme-copy`, `xcopy`, `rod-token`, `bounce`, `staged`).
    pub method: String,
    /// Pieces moved.
    pub pieces: u64,
    /// Commands (offload commands, or bounce writes).
    pub commands: u64,
    /// Bytes written to destination leaves.
    pub bytes: u64,
}

/// The figures of one copy.
#[derive(Clone, Debug, Serialize)]
pub struct RunFigures {
    /// Offload allowed.
    pub offload: bool,
    /// Run number (for the data pattern).
    pub round: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Wall seconds of the copy (both phases).
    pub seconds: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// User CPU seconds of the process during the copy.
    pub cpu_user_s: f64,
    /// System CPU seconds of the process during the copy.
    pub cpu_sys_s: f64,
    /// (user + system) CPU seconds per GiB copied.
    pub cpu_s_per_gib: f64,
    /// Per method, those that did anything.
    pub methods: Vec<MethodFigures>,
    /// Offload commands that failed and were bounced.
    pub fallbacks: u64,
    /// Bytes moved by device offloads.
    pub offloaded_bytes: u64,
    /// Bytes moved through host memory.
    pub host_bytes: u64,
    /// True once the destination was read back equal to the source.
    pub verified: bool,
    /// The engine's report, as text.
    pub report: String,
}

impl RunFigures {
    /// Commands of `method` (0 when it did nothing).
    pub fn commands(&self, method: Method) -> u64 {
        let name = method.to_string();
        self.methods
            .iter()
            .find(|m| m.method == name)
            .map_or(0, |m| m.commands)
    }
}

impl fmt::Display for RunFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} (round {}): {} bytes in {:.4} s: {:.1} MiB/s, CPU {:.4} s/GiB (user {:.4} s, sys {:.4} s){}",
            if self.offload { "offload" } else { "bounce" },
            self.round,
            self.bytes,
            self.seconds,
            self.mib_per_s,
            self.cpu_s_per_gib,
            self.cpu_user_s,
            self.cpu_sys_s,
            if self.verified {
                ", destination verified"
            } else {
                ""
            }
        )?;
        for m in &self.methods {
            writeln!(
                f,
                "  {:<10} commands {:>8} pieces {:>8} bytes {:>12}",
                m.method, m.commands, m.pieces, m.bytes
            )?;
        }
        for line in self.report.lines() {
            writeln!(f, "  | {line}")?;
        }
        Ok(())
    }
}

/// CPU time of a process (or of its waited-for children).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTime {
    /// User time.
    pub user: Duration,
    /// System time.
    pub sys: Duration,
}

impl CpuTime {
    /// User + system.
    pub fn total(&self) -> Duration {
        self.user + self.sys
    }

    /// `self - earlier`, saturating.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            sys: self.sys.saturating_sub(earlier.sys),
        }
    }
}

/// Whose CPU time [`cpu_time`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuOf {
    /// This process, all threads (`RUSAGE_SELF`).
    Process,
    /// Children that terminated and were waited for (`RUSAGE_CHILDREN`).
    Children,
}

/// CPU time from `getrusage`.
pub fn cpu_time(of: CpuOf) -> Result<CpuTime, CopyBenchError> {
    sys::rusage(match of {
        CpuOf::Process => libc::RUSAGE_SELF,
        CpuOf::Children => libc::RUSAGE_CHILDREN,
    })
    .map_err(CopyBenchError::Rusage)
}

mod sys {
    use super::CpuTime;
    use std::mem::MaybeUninit;
    use std::time::Duration;

    fn duration(tv: libc::timeval) -> Duration {
        Duration::new(
            u64::try_from(tv.tv_sec).unwrap_or(0),
            u32::try_from(tv.tv_usec).unwrap_or(0).min(999_999) * 1000,
        )
    }

    pub(super) fn rusage(who: libc::c_int) -> std::io::Result<CpuTime> {
        let mut ru = MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `ru` is a writable rusage we own; getrusage writes at
        // most one rusage through the pointer.
        let rc = unsafe { libc::getrusage(who, ru.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: zero is a valid rusage (plain integers) and getrusage
        // succeeded in filling it.
        let ru = unsafe { ru.assume_init() };
        Ok(CpuTime {
            user: duration(ru.ru_utime),
            sys: duration(ru.ru_stime),
        })
    }
}

/// A workload set up on its devices, ready to run copies.
pub struct Bench {
    workload: Workload,
    src: Arc<dyn BlockDevice>,
    dst: Arc<dyn BlockDevice>,
    src_ranges: Vec<LbaRange>,
    dst_ranges: Vec<LbaRange>,
    block_size: u64,
    /// Buffers both stacks take: for filling, reading back and bouncing.
    allocator: Arc<dyn DmaAllocator>,
    /// One engine per mode (bounce, offload), kept across runs as an
    /// application keeps its engine: buffers and channels are set up by
    /// the first run of a mode, and each run measures the copy alone.
    engines: [Option<CopyEngine>; 2],
}

impl fmt::Debug for Bench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bench")
            .field("workload", &self.workload)
            .field("src", &self.src.info().name)
            .field("dst", &self.dst.info().name)
            .finish_non_exhaustive()
    }
}

/// A small xorshift generator (placement and data; no crypto here).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// `count` distinct slots of `slots`, ascending.
fn scatter(slots: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut rng = XorShift::new(seed);
    if slots <= 1 << 22 {
        // Partial Fisher-Yates over every slot.
        let mut all: Vec<u64> = (0..slots).collect();
        for i in 0..count as usize {
            let j = i + rng.below(slots - i as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(count as usize);
        all.sort_unstable();
        all
    } else {
        // One slot at a random place in each of `count` equal strides.
        let stride = slots / count;
        (0..count).map(|i| i * stride + rng.below(stride)).collect()
    }
}

/// The bytes a round writes to the source (fresh per round, so a stale
/// destination cannot pass verification).
fn pattern(seed: u64, round: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift::new(seed ^ round.wrapping_mul(0x1000_0000_01b3));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

impl Bench {
    /// Builds the stacks (through one leaf registry, so `sgemu:` LUNs
    /// naming one target share its copy manager) and places the extents.
    pub fn open(workload: &Workload) -> Result<Bench, CopyBenchError> {
        let registry = bdev_stack::spec::LeafRegistry::with_defaults();
        let build = |spec: &str| registry.build(spec).map_err(CopyBenchError::from);
        let src = build(&workload.src)?;
        let dst = match workload.dst.as_deref() {
            None => Arc::clone(&src),
            Some(d) if d == workload.src => Arc::clone(&src),
            Some(d) => build(d)?,
        };
        Bench::with_devices(workload, src, dst)
    }

    /// A bench over devices already built (`workload.src` and `dst` are
    /// then only labels).
    pub fn with_devices(
        workload: &Workload,
        src: Arc<dyn BlockDevice>,
        dst: Arc<dyn BlockDevice>,
    ) -> Result<Bench, CopyBenchError> {
        let (si, di) = (src.info(), dst.info());
        if si.block_size != di.block_size {
            return Err(CopyBenchError::Config(format!(
                "{} has {}-byte blocks, {} has {}-byte blocks",
                si.name, si.block_size, di.name, di.block_size
            )));
        }
        let bs = u64::from(si.block_size);
        if workload.extent_bytes == 0 || !workload.extent_bytes.is_multiple_of(bs) {
            return Err(CopyBenchError::Config(format!(
                "extent size {} is not a positive multiple of the {bs}-byte block",
                workload.extent_bytes
            )));
        }
        if workload.extents == 0 {
            return Err(CopyBenchError::Config("no extents to copy".into()));
        }
        let extent_blocks = workload.extent_bytes / bs;
        let slots = (si.block_count / 2) / extent_blocks;
        if workload.extents > slots {
            return Err(CopyBenchError::Config(format!(
                "{} extents of {} bytes do not fit in the first half of {} ({} bytes: {slots} extents)",
                workload.extents,
                workload.extent_bytes,
                si.name,
                si.size_bytes()
            )));
        }
        let total = workload.extents * extent_blocks;
        let dst_lba = di.block_count / 2;
        if dst_lba + total > di.block_count {
            return Err(CopyBenchError::Config(format!(
                "{} bytes do not fit in the second half of {} ({} bytes)",
                total * bs,
                di.name,
                di.size_bytes()
            )));
        }
        let src_ranges: Vec<LbaRange> = scatter(slots, workload.extents, workload.seed)
            .into_iter()
            .map(|s| LbaRange {
                lba: s * extent_blocks,
                blocks: extent_blocks,
            })
            .collect();
        let dst_ranges = vec![LbaRange {
            lba: dst_lba,
            blocks: total,
        }];
        let allocator = dma_allocator_for(&src)?;
        let dst_allocator = dma_allocator_for(&dst)?;
        let allocator = match (allocator.dma_context(), dst_allocator.dma_context()) {
            (Some(a), Some(b)) if a != b => {
                return Err(CopyBenchError::Config(format!(
                    "{} and {} are in different DMA contexts, so no buffer serves both: \
                     build them with one leaf registry, and do not mix emu: and nvme: leaves",
                    si.name, di.name
                )));
            }
            (None, Some(_)) => dst_allocator,
            _ => allocator,
        };
        info!(
            src = %si.name,
            dst = %di.name,
            extents = workload.extents,
            extent_bytes = workload.extent_bytes,
            dst_lba,
            "copy bench workload placed"
        );
        Ok(Bench {
            workload: workload.clone(),
            src,
            dst,
            src_ranges,
            dst_ranges,
            block_size: bs,
            allocator,
            engines: [None, None],
        })
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Source and destination device names.
    pub fn device_names(&self) -> (String, String) {
        (self.src.info().name.clone(), self.dst.info().name.clone())
    }

    /// The source extents.
    pub fn src_ranges(&self) -> &[LbaRange] {
        &self.src_ranges
    }

    /// The destination ranges.
    pub fn dst_ranges(&self) -> &[LbaRange] {
        &self.dst_ranges
    }

    /// Bytes one copy moves.
    pub fn bytes(&self) -> u64 {
        self.workload.extents * self.workload.extent_bytes
    }

    /// One copy: fills the source extents with this round's pattern, copies
    /// with offload allowed or not (timing the copy and the process's CPU
    /// time around it), and reads the destination back. The first run of
    /// each mode also sets its engine up (buffers; channels as the copy
    /// opens them): warm each mode up before measuring.
    pub fn run(&mut self, offload: bool, round: u64) -> Result<RunFigures, CopyBenchError> {
        let len = usize::try_from(self.bytes())
            .map_err(|_| CopyBenchError::Config("workload too large for memory".into()))?;
        let mut data = pattern(self.workload.seed, round, len);
        self.transfer(true, &mut data)?;
        let engine = match &mut self.engines[usize::from(offload)] {
            Some(engine) => engine,
            slot => slot.insert(CopyEngine::new(CopyOptions {
                bounce_bytes: self.workload.bounce_bytes,
                buffer_bytes: self.workload.buffer_bytes,
                offload,
                offload_depth: self.workload.offload_depth,
                allocator: Arc::clone(&self.allocator),
                ..CopyOptions::default()
            })?),
        };
        debug!(offload, round, "copy starts");
        let cpu0 = cpu_time(CpuOf::Process)?;
        let t0 = Instant::now();
        let report = engine.copy(&self.src, &self.src_ranges, &self.dst, &self.dst_ranges)?;
        let wall = t0.elapsed();
        let cpu = cpu_time(CpuOf::Process)?.since(&cpu0);
        if !report.is_complete() {
            return Err(CopyBenchError::Incomplete {
                count: report.not_copied.len(),
                report: report.to_string(),
            });
        }
        let mut back = vec![0u8; len];
        self.transfer(false, &mut back)?;
        if back != data {
            let offset = back
                .iter()
                .zip(&data)
                .position(|(a, b)| a != b)
                .unwrap_or(0) as u64;
            let differing = back.iter().zip(&data).filter(|(a, b)| a != b).count() as u64;
            return Err(CopyBenchError::Mismatch {
                mode: if offload { "offload" } else { "bounce" },
                offset,
                dst_lba: self.dst_ranges[0].lba + offset / self.block_size,
                differing,
                total: len as u64,
            });
        }
        Ok(figures(offload, round, self.bytes(), wall, cpu, &report))
    }

    /// Writes `data` to the source extents, or reads the destination into
    /// it.
    fn transfer(&self, write: bool, data: &mut [u8]) -> Result<(), CopyBenchError> {
        let (dev, ranges, action) = if write {
            (&self.src, &self.src_ranges, "filling")
        } else {
            (&self.dst, &self.dst_ranges, "reading back")
        };
        let io = Transfer {
            dev: dev.as_ref(),
            ranges,
            block_size: self.block_size,
            write,
            action,
        };
        io.run(
            data,
            |len| self.allocator.allocate(len),
            |b, src| b.fill_from(0, src),
            |b, dst| b.copy_to(0, dst),
        )
    }
}

fn figures(
    offload: bool,
    round: u64,
    bytes: u64,
    wall: Duration,
    cpu: CpuTime,
    report: &CopyReport,
) -> RunFigures {
    let secs = wall.as_secs_f64().max(1e-9);
    let gib = bytes as f64 / f64::from(1u32 << 30);
    RunFigures {
        offload,
        round,
        bytes,
        seconds: secs,
        mib_per_s: bytes as f64 / f64::from(1u32 << 20) / secs,
        cpu_user_s: cpu.user.as_secs_f64(),
        cpu_sys_s: cpu.sys.as_secs_f64(),
        cpu_s_per_gib: if gib > 0.0 {
            cpu.total().as_secs_f64() / gib
        } else {
            0.0
        },
        methods: Method::ALL
            .iter()
            .filter_map(|&m| {
                let s = report.method(m);
                (s.pieces + s.commands + s.bytes > 0).then(|| MethodFigures {
                    method: m.to_string(),
                    pieces: s.pieces,
                    commands: s.commands,
                    bytes: s.bytes,
                })
            })
            .collect(),
        fallbacks: report.fallbacks,
        offloaded_bytes: report.offloaded_bytes(),
        host_bytes: report.host_bytes(),
        verified: true,
        report: report.to_string(),
    }
}

/// Requests in flight when filling and reading back.
const IO_DEPTH: usize = 16;
/// Largest fill/read-back request.
const IO_BYTES: u64 = 128 << 10;

/// One pass of plain I/O over a range list (not measured).
struct Transfer<'a> {
    dev: &'a dyn BlockDevice,
    ranges: &'a [LbaRange],
    block_size: u64,
    write: bool,
    action: &'static str,
}

impl Transfer<'_> {
    fn error(&self, reason: impl fmt::Display) -> CopyBenchError {
        CopyBenchError::Io {
            action: self.action,
            device: self.dev.info().name.clone(),
            reason: reason.to_string(),
        }
    }

    /// Runs the pass with buffers of type `B`: `alloc` makes one, `load`
    /// fills one from bytes, `store` copies one's start out.
    fn run<B: DmaMemory>(
        &self,
        data: &mut [u8],
        alloc: impl Fn(usize) -> Result<B, BdevError>,
        load: impl Fn(&mut B, &[u8]) -> Result<(), BdevError>,
        store: impl Fn(&mut B, &mut [u8]) -> Result<(), BdevError>,
    ) -> Result<(), CopyBenchError> {
        let bs = self.block_size;
        let max_blocks = (IO_BYTES / bs)
            .min(self.dev.info().max_transfer_blocks)
            .max(1);
        // (lba, blocks, byte offset in `data`) per request.
        let mut requests = Vec::new();
        let mut offset = 0u64;
        for r in self.ranges {
            let mut done = 0;
            while done < r.blocks {
                let n = max_blocks.min(r.blocks - done);
                requests.push((r.lba + done, n, offset));
                offset += n * bs;
                done += n;
            }
        }
        let buf_bytes = usize::try_from(max_blocks * bs).map_err(|e| self.error(e))?;
        let mut free = Vec::with_capacity(IO_DEPTH);
        for _ in 0..IO_DEPTH {
            free.push(alloc(buf_bytes)?);
        }
        let mut ch = OwnedChannel::<B>::open(self.dev, IO_DEPTH)?;
        let mut failures: Vec<String> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let harvest = |ch: &mut OwnedChannel<B>,
                       free: &mut Vec<B>,
                       data: &mut [u8],
                       failures: &mut Vec<String>| {
            ch.poll(IO_DEPTH, |i, result, buf| {
                let Some(&(lba, n, off)) = requests.get(i as usize) else {
                    failures.push(format!("completion for unknown request {i}"));
                    return;
                };
                if let Err(e) = result {
                    failures.push(format!("{lba}+{n}: {e}"));
                }
                let Some(mut buf) = buf else { return };
                if !self.write
                    && let Some(out) = data.get_mut(off as usize..(off + n * bs) as usize)
                    && let Err(e) = store(&mut buf, out)
                {
                    failures.push(e.to_string());
                }
                free.push(buf);
            })
        };
        for (i, &(lba, n, off)) in requests.iter().enumerate() {
            let mut buf = loop {
                if let Some(b) = free.pop() {
                    break b;
                }
                harvest(&mut ch, &mut free, data, &mut failures);
                if Instant::now() > deadline {
                    return Err(self.error("requests did not complete in 120 s"));
                }
            };
            if self.write {
                let src = data
                    .get(off as usize..(off + n * bs) as usize)
                    .ok_or_else(|| self.error("request past the data"))?;
                load(&mut buf, src)?;
            }
            let mut pending = Some(buf);
            while let Some(buf) = pending.take() {
                let submitted = if self.write {
                    ch.write(lba, n, buf, i as u64)
                } else {
                    ch.read(lba, n, buf, i as u64)
                };
                match submitted {
                    Ok(()) => {}
                    Err(r) if r.error == SubmitError::Busy => {
                        pending = r.buf;
                        harvest(&mut ch, &mut free, data, &mut failures);
                        if Instant::now() > deadline {
                            return Err(self.error("requests did not complete in 120 s"));
                        }
                    }
                    Err(r) => return Err(self.error(format!("{lba}+{n}: {}", r.error))),
                }
            }
        }
        while ch.outstanding() > 0 {
            harvest(&mut ch, &mut free, data, &mut failures);
            if Instant::now() > deadline {
                return Err(self.error("requests did not complete in 120 s"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(self.error(failures.join("; ")))
        }
    }
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median figures of the runs of each mode and their ratios.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Median MiB/s with offload.
    pub offload_mib_per_s: Option<f64>,
    /// Median MiB/s bounced.
    pub bounce_mib_per_s: Option<f64>,
    /// Median CPU s/GiB with offload.
    pub offload_cpu_s_per_gib: Option<f64>,
    /// Median CPU s/GiB bounced.
    pub bounce_cpu_s_per_gib: Option<f64>,
    /// Offload / bounce throughput.
    pub throughput_ratio: Option<f64>,
    /// Offload / bounce CPU per GiB.
    pub cpu_ratio: Option<f64>,
}

/// Summarises runs of either mode.
pub fn summarize(runs: &[RunFigures]) -> Summary {
    let med = |offload: bool, f: fn(&RunFigures) -> f64| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.offload == offload)
            .map(f)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let (ot, bt) = (med(true, |r| r.mib_per_s), med(false, |r| r.mib_per_s));
    let (oc, bc) = (
        med(true, |r| r.cpu_s_per_gib),
        med(false, |r| r.cpu_s_per_gib),
    );
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    Summary {
        offload_mib_per_s: ot,
        bounce_mib_per_s: bt,
        offload_cpu_s_per_gib: oc,
        bounce_cpu_s_per_gib: bc,
        throughput_ratio: ratio(ot, bt),
        cpu_ratio: ratio(oc, bc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_gives_distinct_sorted_slots() {
        let s = scatter(512, 384, 7);
        assert_eq!(s.len(), 384);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|&x| x < 512));
        let big = scatter(1 << 30, 1000, 7);
        assert!(big.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn emu_relocation_offloads_and_bounces_and_verifies() {
        let mut bench = Bench::open(&Workload {
            src: "emu:4m".into(),
            extent_bytes: 16 << 10,
            extents: 64,
            ..Workload::default()
        })
        .unwrap();
        let on = bench.run(true, 1).unwrap();
        assert_eq!(on.offloaded_bytes, bench.bytes());
        assert!(on.commands(Method::NvmeCopy) > 0);
        let off = bench.run(false, 2).unwrap();
        assert_eq!(off.host_bytes, bench.bytes());
        assert_eq!(off.commands(Method::NvmeCopy), 0);
        let s = summarize(&[on, off]);
        assert!(s.throughput_ratio.is_some() && s.cpu_ratio.is_some());
    }

    #[test]
    fn mem_and_sgemu_stacks_run() {
        for (src, dst) in [
            (
                "stripe(chunk=64k, mem:2m,copy=nvme, mem:2m,copy=nvme)",
                None,
            ),
            ("sgemu:2m,target=t", Some("sgemu:4m,target=t")),
            ("sgemu:2m,target=a", Some("sgemu:2m,target=b")),
        ] {
            let mut bench = Bench::open(&Workload {
                src: src.into(),
                dst: dst.map(String::from),
                extent_bytes: 8 << 10,
                extents: 16,
                ..Workload::default()
            })
            .unwrap();
            for offload in [true, false] {
                let r = bench.run(offload, 3).unwrap();
                assert!(r.verified, "{src}");
            }
        }
    }

    #[test]
    fn workloads_that_do_not_fit_are_refused() {
        let too_many = Bench::open(&Workload {
            src: "emu:1m".into(),
            extent_bytes: 64 << 10,
            extents: 9,
            ..Workload::default()
        });
        assert!(matches!(too_many, Err(CopyBenchError::Config(_))));
        let odd = Bench::open(&Workload {
            src: "emu:1m".into(),
            extent_bytes: 1000,
            extents: 1,
            ..Workload::default()
        });
        assert!(matches!(odd, Err(CopyBenchError::Config(_))));
    }
}
