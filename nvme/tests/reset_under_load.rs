//! Reset under load, as SPDK's reset test does: controller resets, again
//! and again, while three threads run reads, writes and Copies on queue
//! pairs of their own. Every request completes exactly once, with success
//! or a clear status; every acknowledged write (and Copy) reads back
//! afterwards; a read that succeeds returns the data.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nvme::emu::{EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::{
    Controller, ControllerOptions, DmaBuffer, DmaContext, IoError, QueueOptions, SubmitError,
};

const BS: usize = 512;
const THREADS: u64 = 3;
/// Blocks each thread owns.
const SPAN: u64 = 20_000;

fn emu(mode: EmuMode) -> Controller<EmuController> {
    let mut ns = NamespaceConfig::memory(512, THREADS * SPAN);
    (ns.msrc, ns.mssrl, ns.mcl) = (15, 128, 256);
    let cfg = EmuConfig {
        mode,
        mqes: 255,
        namespaces: vec![ns],
        ..EmuConfig::default()
    };
    let emu = EmuController::new(&DmaContext::host(), cfg).expect("emulator");
    Controller::new(emu, ControllerOptions::default()).expect("controller")
}

fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// A write of `seed`'s pattern to a fresh block.
    Write { lba: u64, seed: u64 },
    /// A read of a block whose pattern is known.
    Read { lba: u64, seed: u64 },
    /// A Copy of a known block to a fresh one.
    Copy { src: u64, dst: u64, seed: u64 },
}

/// What one worker did: the blocks it may rely on (acknowledged writes and
/// Copies, by their pattern's seed) and its counts.
struct Outcome {
    acknowledged: HashMap<u64, u64>,
    submitted: u64,
    completed: u64,
    failed: u64,
}

fn worker(ctrl: Controller<EmuController>, thread: u64, stop: Arc<AtomicBool>) -> Outcome {
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 32,
            ..QueueOptions::default()
        })
        .expect("qp");
    let base = thread * SPAN;
    let mut next = base;
    let bufs: Vec<DmaBuffer> = (0..8).map(|_| ctrl.dma_alloc(BS).expect("buf")).collect();
    let mut out = Outcome {
        acknowledged: HashMap::new(),
        submitted: 0,
        completed: 0,
        failed: 0,
    };
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) && next + 16 < base + SPAN {
        round += 1;
        let known: Vec<(u64, u64)> = out.acknowledged.iter().map(|(&l, &s)| (l, s)).collect();
        let mut ops = Vec::new();
        for i in 0..8u64 {
            let seed = thread << 40 | round << 8 | i;
            let op = match (
                i % 3,
                known.get((round * 7 + i) as usize % known.len().max(1)),
            ) {
                (1, Some(&(lba, seed))) => Op::Read { lba, seed },
                (2, Some(&(src, seed))) => {
                    next += 1;
                    Op::Copy {
                        src,
                        dst: next - 1,
                        seed,
                    }
                }
                _ => {
                    next += 1;
                    Op::Write {
                        lba: next - 1,
                        seed,
                    }
                }
            };
            ops.push(op);
        }
        // Submit, retrying while full or while the queue is re-created.
        for (tag, op) in ops.iter().enumerate() {
            let buf = &bufs[tag];
            if let Op::Write { seed, .. } = op {
                buf.write_bytes(0, &pattern(*seed)).expect("fill");
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let result = match *op {
                    Op::Write { lba, .. } => qp.write(&ns, lba, &buf.as_slice(), tag as u64),
                    Op::Read { lba, .. } => qp.read(&ns, lba, &buf.as_slice(), tag as u64),
                    Op::Copy { src, dst, .. } => qp.copy(&ns, &[(src, 1)], dst, tag as u64),
                };
                match result {
                    Ok(()) => break,
                    Err(SubmitError::QueueFull) | Err(SubmitError::Invalid(_)) => {
                        assert!(Instant::now() < deadline, "thread {thread}: cannot submit");
                        let _ = qp.poll(0, |_| {});
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("thread {thread}: {e}"),
                }
            }
            out.submitted += 1;
        }
        // Every request completes exactly once.
        let mut seen = [0u32; 8];
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.iter().filter(|&&n| n > 0).count() < ops.len() {
            assert!(
                Instant::now() < deadline,
                "thread {thread}: a request never completed"
            );
            let mut done = Vec::new();
            if qp.poll(16, |c| done.push(c)).is_err() {
                std::thread::yield_now();
            }
            for c in done {
                let tag = c.tag as usize;
                seen[tag] += 1;
                assert_eq!(seen[tag], 1, "thread {thread}: tag {tag} completed twice");
                out.completed += 1;
                match (ops[tag], c.result) {
                    (Op::Write { lba, seed }, Ok(_)) | (Op::Copy { dst: lba, seed, .. }, Ok(_)) => {
                        out.acknowledged.insert(lba, seed);
                    }
                    (Op::Read { seed, .. }, Ok(_)) => {
                        let mut got = vec![0u8; BS];
                        bufs[tag].read_bytes(0, &mut got).expect("read back");
                        assert!(
                            got == pattern(seed),
                            "thread {thread}: a read returned other data"
                        );
                    }
                    (_, Err(IoError::Aborted | IoError::Timeout)) => out.failed += 1,
                    (op, Err(e)) => panic!("thread {thread}: {op:?} failed unclearly: {e}"),
                }
            }
        }
    }
    out
}

#[test]
fn resets_under_load_lose_no_request_and_no_acknowledged_write() {
    for mode in [EmuMode::Inline, EmuMode::Thread] {
        let ctrl = emu(mode);
        let stop = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (ctrl, stop) = (ctrl.clone(), Arc::clone(&stop));
                std::thread::spawn(move || worker(ctrl, t, stop))
            })
            .collect();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(5));
            ctrl.reset().expect("reset");
            resets.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let outcomes: Vec<Outcome> = workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect();
        let (submitted, completed, failed) = outcomes.iter().fold((0, 0, 0), |a, o| {
            (a.0 + o.submitted, a.1 + o.completed, a.2 + o.failed)
        });
        assert_eq!(submitted, completed, "{mode:?}");
        assert!(submitted > 0 && resets.load(Ordering::Relaxed) == 20);
        // Every acknowledged write and Copy reads back.
        let ns = ctrl.namespace(1).expect("ns");
        let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
        let buf = ctrl.dma_alloc(BS).expect("buf");
        let mut checked = 0;
        for o in &outcomes {
            for (&lba, &seed) in &o.acknowledged {
                qp.read(&ns, lba, &buf.as_slice(), lba).expect("submit");
                let done = qp.drain(Duration::from_secs(5)).expect("drain");
                assert_eq!(done[0].result, Ok(0));
                let mut got = vec![0u8; BS];
                buf.read_bytes(0, &mut got).expect("read back");
                assert!(
                    got == pattern(seed),
                    "{mode:?}: acknowledged block {lba} lost"
                );
                checked += 1;
            }
        }
        assert!(checked > 0);
        eprintln!(
            "{mode:?}: {submitted} requests over 20 resets, {failed} failed by them, {checked} acknowledged blocks read back"
        );
    }
}
