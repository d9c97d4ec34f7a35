//! The conformance suite, shared by both test tiers: host tests run it on
//! [`crate::emu`], the VM tests on QEMU's controller through VFIO and
//! through the kernel's io_uring passthrough. The checks about commands
//! and their status are generic over [`ControllerView`] (one check for
//! every host); the reset checks need PCIe's [`Controller`]. Each returns
//! `Err` with a reason.
//!
//! The checks write to the namespace they are given: use scratch devices.

use std::time::Duration;

use crate::dma::DmaBuffer;
use crate::driver::{Completion, Controller, IoError, Namespace, QueueOptions, SubmitError};
use crate::spec::{NvmeStatus, SubmissionEntry, nvm_opc};
use crate::transport::Transport;
use crate::view::{ControllerView, IoQueue, NamespaceScope};

/// A check's outcome.
pub type Check = Result<(), String>;

/// Known deviations of a controller from the specification, so that one
/// suite states exactly what each implementation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quirks {
    /// Whether Copy enforces MCL (QEMU 7.2 does not).
    pub enforces_mcl: bool,
    /// Whether errors Copy finds per source range (a range over MSSRL, a
    /// range or the destination out of the namespace) come back as
    /// Internal Error. QEMU 7.2 detects them while copying and then lets
    /// `nvme_aio_err` overwrite the status with Internal Error; errors
    /// found before the copy starts (MSRC) keep their status.
    pub copy_range_errors_internal: bool,
    /// The status of a read that runs past the last LBA: LBA Out of Range
    /// by the specification. Linux nvmet (6.1) does not check the range
    /// itself: its block-device backend passes on the block layer's
    /// failure as Internal Error, its file backend answers Capacity
    /// Exceeded.
    pub read_past_end: NvmeStatus,
}

impl Quirks {
    /// A controller that follows the specification (the emulator).
    pub const SPEC: Quirks = Quirks {
        enforces_mcl: true,
        copy_range_errors_internal: false,
        read_past_end: NvmeStatus::LBA_OUT_OF_RANGE,
    };
    /// QEMU 7.2's NVMe controller.
    pub const QEMU_7_2: Quirks = Quirks {
        enforces_mcl: false,
        copy_range_errors_internal: true,
        read_past_end: NvmeStatus::LBA_OUT_OF_RANGE,
    };
    /// Linux nvmet 6.1 over a block device (it has no Copy, so the Copy
    /// quirks do not arise).
    pub const NVMET_6_1_BDEV: Quirks = Quirks {
        enforces_mcl: true,
        copy_range_errors_internal: false,
        read_past_end: NvmeStatus::INTERNAL_ERROR,
    };
    /// Linux nvmet 6.1 over a file.
    pub const NVMET_6_1_FILE: Quirks = Quirks {
        enforces_mcl: true,
        copy_range_errors_internal: false,
        read_past_end: NvmeStatus::generic(0x81),
    };

    fn copy_range_status(self, spec: NvmeStatus) -> NvmeStatus {
        if self.copy_range_errors_internal {
            NvmeStatus::INTERNAL_ERROR
        } else {
            spec
        }
    }
}

const DRAIN: Duration = Duration::from_secs(60);

/// Deterministic xorshift64* for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (a zero seed is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn ns_of<C: ControllerView>(ctrl: &C, nsid: u32) -> Result<Namespace, String> {
    ctrl.namespace(nsid)
        .ok_or_else(|| format!("{}: no active namespace {nsid}", ctrl.name()))
}

fn alloc<C: ControllerView>(ctrl: &C, len: usize) -> Result<DmaBuffer, String> {
    ctrl.dma_alloc(len)
        .map_err(|e| format!("allocating {len} bytes of DMA memory: {e}"))
}

fn qpair<C: ControllerView>(ctrl: &C, entries: u16) -> Result<C::Queue, String> {
    ctrl.create_queue(QueueOptions {
        entries,
        timeout: Some(Duration::from_secs(30)),
        ..QueueOptions::default()
    })
    .map_err(|e| format!("creating a queue pair of {entries} entries: {e}"))
}

/// Submits with `submit`, polling while the queue is full.
fn submit_retry<Q: IoQueue>(
    qp: &mut Q,
    done: &mut Vec<Completion>,
    mut submit: impl FnMut(&mut Q) -> Result<(), SubmitError>,
) -> Check {
    let start = std::time::Instant::now();
    loop {
        match submit(qp) {
            Ok(()) => return Ok(()),
            Err(SubmitError::QueueFull) => {
                qp.poll(usize::MAX, |c| done.push(c))
                    .map_err(|e| format!("poll: {e}"))?;
                if start.elapsed() > DRAIN {
                    return Err("queue stayed full for 60 s".into());
                }
            }
            Err(e) => return Err(format!("submit: {e}")),
        }
    }
}

fn drain<Q: IoQueue>(qp: &mut Q, done: &mut Vec<Completion>) -> Check {
    let more = qp.drain(DRAIN).map_err(|e| format!("drain: {e}"))?;
    done.extend(more);
    Ok(())
}

fn all_ok(what: &str, done: &[Completion], expected: usize) -> Check {
    if done.len() != expected {
        return Err(format!(
            "{what}: {} completions, expected {expected}",
            done.len()
        ));
    }
    if let Some(c) = done.iter().find(|c| c.result.is_err()) {
        return Err(format!("{what}: request {} failed: {:?}", c.tag, c.result));
    }
    Ok(())
}

/// Identify data is consistent: namespaces with sane block sizes and Copy
/// limits, MDTS-derived transfer size, granted queues.
pub fn identify_consistent<C: ControllerView>(ctrl: &C) -> Check {
    let id = ctrl.identify();
    if ctrl.namespaces().is_empty() {
        return Err("no active namespaces".into());
    }
    if id.nn.get() < ctrl.namespaces().len() as u32 {
        return Err(format!(
            "NN {} below {} active namespaces",
            id.nn.get(),
            ctrl.namespaces().len()
        ));
    }
    if id.sqes & 0xf > 6 || id.cqes & 0xf > 4 {
        return Err(format!(
            "SQES {:#x} / CQES {:#x} exclude 64/16-byte entries",
            id.sqes, id.cqes
        ));
    }
    for ns in ctrl.namespaces() {
        if !matches!(ns.block_size, 512 | 4096) || ns.blocks == 0 {
            return Err(format!(
                "namespace {}: {} blocks of {} bytes",
                ns.nsid, ns.blocks, ns.block_size
            ));
        }
    }
    if ctrl.max_transfer() < 4096 || ctrl.io_queues() == 0 {
        return Err(format!(
            "max transfer {} / {} I/O queues",
            ctrl.max_transfer(),
            ctrl.io_queues()
        ));
    }
    Ok(())
}

/// Writes random data then reads it back, at each queue depth in `depths`
/// (capped by the largest queue) and each size from one block to beyond
/// the maximum transfer (so requests are split), verifying every byte.
pub fn write_read_verify<C: ControllerView>(
    ctrl: &C,
    nsid: u32,
    depths: &[u16],
    seed: u64,
) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let bs = ns.block_size as usize;
    let mut rng = Rng::new(seed);
    let sizes = [
        bs,
        2 * bs,
        4096 + bs,
        64 * 1024,
        ctrl.max_transfer(),
        2 * ctrl.max_transfer() + bs,
    ];
    let entries = ctrl.max_queue_entries().min(u16::MAX as u32) as u16;
    for &qd in depths {
        let qd = qd.clamp(1, entries.saturating_sub(1).max(1));
        // Room for qd requests, or for one request split in three.
        let mut qp = qpair(ctrl, (qd + 1).max(4))?;
        for &size in &sizes {
            let size = size.div_ceil(bs) * bs;
            let blocks = (size / bs) as u64;
            if blocks > ns.blocks {
                continue;
            }
            // As many requests as the depth, within 4 MiB and the namespace.
            let n = (qd as usize)
                .min((4 << 20) / size)
                .min((ns.blocks / blocks) as usize)
                .max(1);
            let wbuf = alloc(ctrl, n * size)?;
            let rbuf = alloc(ctrl, n * size)?;
            let mut data = vec![0u8; n * size];
            rng.fill(&mut data);
            wbuf.write_bytes(0, &data).map_err(|e| e.to_string())?;
            rbuf.fill(0xA5);
            let span = ns.blocks / blocks; // slots of `blocks` each
            let base = rng.next_u64() % (span - n as u64 + 1);
            let lba = |i: usize| (base + i as u64) * blocks;
            let mut done = Vec::new();
            for i in 0..n {
                let s = wbuf.slice(i * size, size).ok_or("slice")?;
                submit_retry(&mut qp, &mut done, |q| q.write(&ns, lba(i), &s, i as u64))?;
            }
            drain(&mut qp, &mut done)?;
            all_ok(&format!("qd {qd} write {n}×{size}"), &done, n)?;
            done.clear();
            for i in 0..n {
                let s = rbuf.slice(i * size, size).ok_or("slice")?;
                submit_retry(&mut qp, &mut done, |q| q.read(&ns, lba(i), &s, i as u64))?;
            }
            drain(&mut qp, &mut done)?;
            all_ok(&format!("qd {qd} read {n}×{size}"), &done, n)?;
            let mut back = vec![0u8; n * size];
            rbuf.read_bytes(0, &mut back).map_err(|e| e.to_string())?;
            if let Some(p) = back.iter().zip(&data).position(|(a, b)| a != b) {
                return Err(format!(
                    "qd {qd}, {n} requests of {size} bytes: byte {p} (request {}, LBA {}) differs",
                    p / size,
                    lba(p / size)
                ));
            }
        }
    }
    Ok(())
}

fn write_pattern<C: ControllerView, Q: IoQueue>(
    qp: &mut Q,
    ctrl: &C,
    ns: &Namespace,
    lba: u64,
    data: &[u8],
) -> Check {
    let buf = alloc(ctrl, data.len())?;
    buf.write_bytes(0, data).map_err(|e| e.to_string())?;
    let mut done = Vec::new();
    let bs = ns.block_size as usize;
    let chunk = (ctrl.max_transfer() / bs) * bs;
    for (i, off) in (0..data.len()).step_by(chunk).enumerate() {
        let n = chunk.min(data.len() - off);
        let s = buf.slice(off, n).ok_or("slice")?;
        submit_retry(qp, &mut done, |q| {
            q.write(ns, lba + (off / bs) as u64, &s, i as u64)
        })?;
    }
    drain(qp, &mut done)?;
    let expect = data.len().div_ceil(chunk);
    all_ok("pattern write", &done, expect)
}

fn read_back<C: ControllerView, Q: IoQueue>(
    qp: &mut Q,
    ctrl: &C,
    ns: &Namespace,
    lba: u64,
    len: usize,
) -> Result<Vec<u8>, String> {
    let buf = alloc(ctrl, len)?;
    let mut done = Vec::new();
    let s = buf.as_slice();
    submit_retry(qp, &mut done, |q| q.read(ns, lba, &s, 0))?;
    drain(qp, &mut done)?;
    all_ok("read back", &done, 1)?;
    let mut out = vec![0u8; len];
    buf.read_bytes(0, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Copy with several source ranges (one longer than MSSRL, more ranges
/// than MSRC allows and more blocks than MCL in total, so the driver must
/// split), verified by reading the destination back; plus one unsplit
/// Copy within the limits.
pub fn copy_multi_range<C: ControllerView>(ctrl: &C, nsid: u32, seed: u64) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let bs = ns.block_size as u64;
    let lim = ns.copy_limits();
    if lim.mssrl == 0 || lim.mcl == 0 {
        return Err(format!(
            "namespace {nsid} reports MSSRL {} MCL {}: cannot copy",
            lim.mssrl, lim.mcl
        ));
    }
    let mut rng = Rng::new(seed);
    let mut qp = qpair(ctrl, 64)?;
    // Source area [0, src_blocks), destination area after it.
    let n_ranges = lim.max_ranges + 3;
    let mut ranges = Vec::new();
    let mut at = 0u64;
    for i in 0..n_ranges {
        let len = if i == 1 {
            lim.mssrl + 5
        } else {
            1 + rng.next_u64() % 8
        };
        ranges.push((at + 1, len)); // gaps of one block between ranges
        at += len + 1;
    }
    let src_blocks = at;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    if total <= lim.mcl {
        // Make the total exceed MCL with one more long range.
        let extra = lim.mcl - total + 1;
        ranges.push((src_blocks + 1, extra));
    }
    let src_blocks = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0) + 1;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let dest = src_blocks.div_ceil(8) * 8 + 8;
    if dest + total > ns.blocks {
        return Err(format!("namespace {nsid} too small for the copy test"));
    }
    let mut src = vec![0u8; (src_blocks * bs) as usize];
    rng.fill(&mut src);
    write_pattern(&mut qp, ctrl, &ns, 0, &src)?;
    let mut done = Vec::new();
    submit_retry(&mut qp, &mut done, |q| q.copy(&ns, &ranges, dest, 7))?;
    drain(&mut qp, &mut done)?;
    all_ok("split copy", &done, 1)?;
    let got = read_back(&mut qp, ctrl, &ns, dest, (total * bs) as usize)?;
    let mut expect = Vec::new();
    for &(l, n) in &ranges {
        expect.extend_from_slice(&src[(l * bs) as usize..((l + n) * bs) as usize]);
    }
    if let Some(p) = got.iter().zip(&expect).position(|(a, b)| a != b) {
        return Err(format!("split copy: destination byte {p} differs"));
    }
    // One unsplit command, within every limit.
    let small = [(ranges[0].0, 1u64), (ranges[2].0, 2), (ranges[3].0, 1)];
    let dest2 = dest + total + 8;
    done.clear();
    submit_retry(&mut qp, &mut done, |q| q.copy_single(&ns, &small, dest2, 8))?;
    drain(&mut qp, &mut done)?;
    all_ok("single copy", &done, 1)?;
    let got = read_back(&mut qp, ctrl, &ns, dest2, (4 * bs) as usize)?;
    let mut expect = Vec::new();
    for &(l, n) in &small {
        expect.extend_from_slice(&src[(l * bs) as usize..((l + n) * bs) as usize]);
    }
    if got != expect {
        return Err("single copy: destination differs".into());
    }
    Ok(())
}

fn single_status<Q: IoQueue>(
    qp: &mut Q,
    submit: impl FnMut(&mut Q) -> Result<(), SubmitError>,
) -> Result<Result<u32, IoError>, String> {
    let mut done = Vec::new();
    submit_retry(qp, &mut done, submit)?;
    drain(qp, &mut done)?;
    match done.as_slice() {
        [c] => Ok(c.result),
        other => Err(format!("{} completions for one request", other.len())),
    }
}

fn expect_status(what: &str, got: Result<u32, IoError>, want: NvmeStatus) -> Check {
    match got {
        Err(IoError::Status(s)) if s.same_code(want) => Ok(()),
        other => Err(format!("{what}: expected {want}, got {other:?}")),
    }
}

/// One Copy command over MSRC (too many ranges) and one over MSSRL (a
/// range too long) each fail with Command Size Limit Exceeded (the second
/// with the status `quirks` predict), and nothing is written.
pub fn copy_over_limits<C: ControllerView>(ctrl: &C, nsid: u32, quirks: Quirks) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let mut qp = qpair(ctrl, 16)?;
    let too_many: Vec<(u64, u64)> = (0..ns.msrc as u64 + 2).map(|i| (2 * i, 1)).collect();
    let dest = 4 * too_many.len() as u64;
    let r = single_status(&mut qp, |q| q.copy_single(&ns, &too_many, dest, 1))?;
    expect_status("Copy with MSRC + 2 ranges", r, NvmeStatus::CMD_SIZE_LIMIT)?;
    let long = [(0u64, ns.mssrl as u64 + 1)];
    let r = single_status(&mut qp, |q| {
        q.copy_single(&ns, &long, ns.mssrl as u64 + 8, 2)
    })?;
    expect_status(
        "Copy of MSSRL + 1 blocks",
        r,
        quirks.copy_range_status(NvmeStatus::CMD_SIZE_LIMIT),
    )?;
    Ok(())
}

/// A Copy totalling more than MCL blocks fails with Command Size Limit
/// Exceeded where `quirks.enforces_mcl`; elsewhere it must succeed.
pub fn copy_over_mcl<C: ControllerView>(ctrl: &C, nsid: u32, quirks: Quirks) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let mut qp = qpair(ctrl, 16)?;
    let per = ns.mssrl as u64;
    let n = (ns.mcl as u64 / per.max(1)) + 1;
    if n > ns.msrc as u64 + 1 {
        return Err("limits leave no way to exceed MCL alone".into());
    }
    let ranges: Vec<(u64, u64)> = (0..n).map(|i| (i * per, per)).collect();
    let r = single_status(&mut qp, |q| q.copy_single(&ns, &ranges, n * per + 8, 1))?;
    if quirks.enforces_mcl {
        expect_status("Copy over MCL", r, NvmeStatus::CMD_SIZE_LIMIT)
    } else {
        r.map(|_| ())
            .map_err(|e| format!("Copy over MCL on a controller that does not enforce it: {e}"))
    }
}

/// A read past the end of the namespace (sent raw, bypassing the driver's
/// own check) and a Copy whose destination is past the end both fail with
/// LBA Out of Range; the driver refuses the same read before sending it. A
/// read naming an inactive namespace fails with Invalid Namespace, or,
/// where the view's queues may name only their own namespace
/// ([`NamespaceScope::Namespace`]), is refused by the host with EINVAL
/// before the device sees it.
pub fn lba_out_of_range<C: ControllerView>(ctrl: &C, nsid: u32, quirks: Quirks) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let mut qp = qpair(ctrl, 16)?;
    let buf = alloc(ctrl, ns.block_size as usize * 2)?;
    let s = buf.as_slice();
    match qp.read(&ns, ns.blocks - 1, &s, 0) {
        Err(SubmitError::Invalid(_)) => {}
        other => return Err(format!("driver accepted a read past the end: {other:?}")),
    }
    let last = ns.blocks - 1;
    let sqe = SubmissionEntry::new(nvm_opc::READ, ns.nsid).with_cdws(&[
        last as u32,
        (last >> 32) as u32,
        1,
    ]);
    let r = single_status(&mut qp, |q| q.submit_raw(sqe, Some(&s), 1))?;
    expect_status("read of 2 blocks at the last LBA", r, quirks.read_past_end)?;
    let r = single_status(&mut qp, |q| q.copy_single(&ns, &[(0, 1)], ns.blocks, 2))?;
    if ctrl.identify().oncs.get() & crate::spec::ONCS_COPY != 0 {
        expect_status(
            "Copy to LBA NSZE",
            r,
            quirks.copy_range_status(NvmeStatus::LBA_OUT_OF_RANGE),
        )?;
    } else {
        // Without Copy in ONCS the opcode itself is refused.
        expect_status(
            "Copy on a controller without Copy",
            r,
            NvmeStatus::INVALID_OPCODE,
        )?;
    }
    let sqe = SubmissionEntry::new(nvm_opc::READ, 0xffff_fff0).with_cdws(&[0, 0, 0]);
    let r = single_status(&mut qp, |q| q.submit_raw(sqe, Some(&s), 3))?;
    match ctrl.scope() {
        NamespaceScope::Controller => expect_status(
            "read of an inactive namespace",
            r,
            NvmeStatus::INVALID_NAMESPACE,
        ),
        NamespaceScope::Namespace(own) => match r {
            Err(IoError::Os {
                errno: libc::EINVAL,
            }) => Ok(()),
            other => Err(format!(
                "read naming namespace {:#x} on a host scoped to namespace {own}: expected \
                 the host to refuse it with EINVAL, got {other:?}",
                0xffff_fff0u32
            )),
        },
    }
}

/// Two queues driven from two threads at once, each writing and verifying
/// its own area.
pub fn two_queue_pairs_two_threads<C: ControllerView>(ctrl: &C, nsid: u32) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let half = ns.blocks / 2;
    let results: Vec<Check> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2u64)
            .map(|t| {
                sc.spawn(move || -> Check {
                    let mut qp = qpair(ctrl, 64)?;
                    let bs = ns.block_size as usize;
                    let mut rng = Rng::new(0xfeed + t);
                    for round in 0..8u64 {
                        let blocks = 16u64;
                        let lba = t * half + round * blocks;
                        let mut data = vec![0u8; blocks as usize * bs];
                        rng.fill(&mut data);
                        write_pattern(&mut qp, ctrl, &ns, lba, &data)?;
                        let back = read_back(&mut qp, ctrl, &ns, lba, data.len())?;
                        if back != data {
                            return Err(format!("thread {t} round {round}: data differs"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    results.into_iter().collect()
}

/// Reset with commands in flight: every request is reported exactly once
/// (done or aborted), and the queue pair works afterwards.
pub fn reset_with_commands_in_flight<T: Transport>(ctrl: &Controller<T>, nsid: u32) -> Check {
    let ns = ns_of(ctrl, nsid)?;
    let mut qp = qpair(ctrl, 128)?;
    let bs = ns.block_size as usize;
    let n = 100usize;
    let buf = alloc(ctrl, n * bs)?;
    let mut done = Vec::new();
    for i in 0..n {
        let s = buf.slice(i * bs, bs).ok_or("slice")?;
        submit_retry(&mut qp, &mut done, |q| q.read(&ns, i as u64, &s, i as u64))?;
    }
    qp.ring();
    ctrl.reset().map_err(|e| format!("reset: {e}"))?;
    drain(&mut qp, &mut done)?;
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort();
    tags.dedup();
    if tags.len() != n || done.len() != n {
        return Err(format!(
            "{} completions for {n} requests ({} distinct)",
            done.len(),
            tags.len()
        ));
    }
    if let Some(c) = done
        .iter()
        .find(|c| !matches!(c.result, Ok(_) | Err(IoError::Aborted)))
    {
        return Err(format!("request {}: {:?}", c.tag, c.result));
    }
    let aborted = done
        .iter()
        .filter(|c| c.result == Err(IoError::Aborted))
        .count();
    tracing::info!(
        aborted,
        completed = n - aborted,
        "reset with commands in flight"
    );
    let mut data = vec![0u8; 8 * bs];
    Rng::new(99).fill(&mut data);
    write_pattern(&mut qp, ctrl, &ns, 1000, &data)?;
    if read_back(&mut qp, ctrl, &ns, 1000, data.len())? != data {
        return Err("after reset: data differs".into());
    }
    Ok(())
}

/// What [`reset_under_load`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetLoad {
    /// Requests submitted (each completed exactly once).
    pub requests: u64,
    /// Requests failed by the resets (aborted, or timed out).
    pub failed: u64,
    /// Acknowledged writes and Copies read back afterwards.
    pub verified: u64,
}

#[derive(Clone, Copy, Debug)]
enum LoadOp {
    Write { lba: u64, seed: u64 },
    Read { lba: u64, seed: u64 },
    Copy { src: u64, dst: u64, seed: u64 },
}

/// Resets under load, as SPDK's reset test: `resets` controller resets,
/// `interval` apart, while `threads` threads run writes (each to a block of
/// its own, never rewritten), reads of acknowledged blocks and Copies of
/// them to fresh blocks, on queue pairs of their own. Every request must
/// complete exactly once, with success or Aborted/Timeout; a read that
/// succeeds returns the data; every acknowledged write and Copy reads back
/// afterwards.
pub fn reset_under_load<T: Transport>(
    ctrl: &Controller<T>,
    nsid: u32,
    threads: u64,
    resets: u32,
    interval: Duration,
) -> Result<ResetLoad, String> {
    let ns = ns_of(ctrl, nsid)?;
    let span = ns.blocks / threads.max(1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (ctrl, stop) = (ctrl.clone(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || load_worker(&ctrl, &ns, t * span, span, &stop))
        })
        .collect();
    let mut reset_error = None;
    for _ in 0..resets {
        std::thread::sleep(interval);
        if let Err(e) = ctrl.reset() {
            reset_error = Some(format!("reset: {e}"));
            break;
        }
    }
    std::thread::sleep(interval * 4);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut summary = ResetLoad::default();
    let mut acknowledged = Vec::new();
    for w in workers {
        let (requests, failed, acked) = w
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
        summary.requests += requests;
        summary.failed += failed;
        acknowledged.extend(acked);
    }
    if let Some(e) = reset_error {
        return Err(e);
    }
    let mut qp = qpair(ctrl, 64)?;
    let bs = ns.block_size as usize;
    for (lba, seed) in acknowledged {
        let got = read_back(&mut qp, ctrl, &ns, lba, bs)?;
        if got != load_pattern(seed, bs) {
            return Err(format!("acknowledged block {lba} lost after the resets"));
        }
        summary.verified += 1;
    }
    if summary.requests == 0 || summary.verified == 0 {
        return Err(format!("no load ran: {summary:?}"));
    }
    Ok(summary)
}

fn load_pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng::new(seed).fill(&mut data);
    data
}

/// One load thread of [`reset_under_load`]: requests, failures, and the
/// acknowledged blocks with their patterns' seeds.
type LoadResult = Result<(u64, u64, Vec<(u64, u64)>), String>;

fn load_worker<T: Transport>(
    ctrl: &Controller<T>,
    ns: &Namespace,
    base: u64,
    span: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> LoadResult {
    const BATCH: usize = 8;
    let bs = ns.block_size as usize;
    let mut qp = qpair(ctrl, 32)?;
    let bufs: Vec<DmaBuffer> = (0..BATCH)
        .map(|_| alloc(ctrl, bs))
        .collect::<Result<_, _>>()?;
    let (mut requests, mut failed) = (0u64, 0u64);
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut next = base;
    let mut round = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && next + 2 * BATCH as u64 <= base + span
    {
        round += 1;
        let mut ops = Vec::with_capacity(BATCH);
        for i in 0..BATCH as u64 {
            let known = acked
                .get((round * 7 + i) as usize % acked.len().max(1))
                .copied();
            let op = match (i % 3, known) {
                (1, Some((lba, seed))) => LoadOp::Read { lba, seed },
                (2, Some((src, seed))) => {
                    next += 1;
                    LoadOp::Copy {
                        src,
                        dst: next - 1,
                        seed,
                    }
                }
                _ => {
                    next += 1;
                    LoadOp::Write {
                        lba: next - 1,
                        seed: base << 20 | round << 4 | i,
                    }
                }
            };
            ops.push(op);
        }
        let mut done = Vec::new();
        for (tag, op) in ops.iter().enumerate() {
            let buf = bufs[tag].as_slice();
            if let LoadOp::Write { seed, .. } = op {
                bufs[tag]
                    .write_bytes(0, &load_pattern(*seed, bs))
                    .map_err(|e| e.to_string())?;
            }
            let deadline = std::time::Instant::now() + DRAIN;
            loop {
                let r = match *op {
                    LoadOp::Write { lba, .. } => qp.write(ns, lba, &buf, tag as u64),
                    LoadOp::Read { lba, .. } => qp.read(ns, lba, &buf, tag as u64),
                    LoadOp::Copy { src, dst, .. } => qp.copy(ns, &[(src, 1)], dst, tag as u64),
                };
                match r {
                    Ok(()) => break,
                    // Full, or the queue being re-created after a reset.
                    Err(SubmitError::QueueFull | SubmitError::Invalid(_))
                        if std::time::Instant::now() < deadline =>
                    {
                        let _ = qp.poll(BATCH, |c| done.push(c));
                        std::thread::yield_now();
                    }
                    Err(e) => return Err(format!("submit: {e}")),
                }
            }
            requests += 1;
        }
        let deadline = std::time::Instant::now() + DRAIN;
        while done.len() < ops.len() {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{} of {} requests never completed",
                    ops.len() - done.len(),
                    ops.len()
                ));
            }
            if qp.poll(BATCH, |c| done.push(c)).is_err() {
                std::thread::yield_now();
            }
        }
        let mut seen = [false; BATCH];
        for c in &done {
            let tag = usize::try_from(c.tag)
                .ok()
                .filter(|&t| t < ops.len())
                .ok_or("unknown tag")?;
            if std::mem::replace(&mut seen[tag], true) {
                return Err(format!("request {tag} completed twice"));
            }
            match (ops[tag], c.result) {
                (LoadOp::Write { lba, seed }, Ok(_))
                | (LoadOp::Copy { dst: lba, seed, .. }, Ok(_)) => acked.push((lba, seed)),
                (LoadOp::Read { seed, lba }, Ok(_)) => {
                    let mut got = vec![0u8; bs];
                    bufs[tag]
                        .read_bytes(0, &mut got)
                        .map_err(|e| e.to_string())?;
                    if got != load_pattern(seed, bs) {
                        return Err(format!("a read of block {lba} returned other data"));
                    }
                }
                (_, Err(IoError::Aborted | IoError::Timeout)) => failed += 1,
                (op, Err(e)) => return Err(format!("{op:?}: {e}")),
            }
        }
    }
    Ok((requests, failed, acked))
}
