//! Random stacks with mirrors, random leg failures, resyncs running on
//! threads of their own at the same time, random copies (one phase or two,
//! with a leg failing between the phases) and writes, and offload commands
//! failing at random: at the end every leg that serves reads equals the
//! flat reference model, and every copy reported complete was.

mod common;

use std::sync::Arc;
use std::thread::JoinHandle;

use std::time::Duration;

use bdev_stack::{
    BlockDevice, Concat, CopyFault, CopyFaultHandle, LbaRange, LegHealth, MemCopyLimits, MemDevice,
    Mirror, ResyncReport, Stripe,
};
use bdev_stack::{IoOp, IoRequest};
use common::scsi::{CopyManager, Offers};
use common::{Hooked, SubmitHook, SyncIo, first_replica_mismatch, model_copy, pattern, read_all};
use copy_engine::{CopyEngine, CopyOptions, copy_in};
use proptest::prelude::*;

const BS: u64 = 512;
const LEG_BLOCKS: u64 = 256;

/// Where a stack's legs come from: memory legs that offload NVMe-style
/// copies within themselves (with fault injection), or LUNs of one copy
/// manager that take EXTENDED COPY from each other, so a copy is offloaded
/// onto every leg of a mirror beside its I/O path.
#[derive(Clone)]
enum Legs {
    Memory,
    Luns(CopyManager),
}

impl Legs {
    fn leg(&self, faults: &mut Vec<CopyFaultHandle>) -> Arc<dyn BlockDevice> {
        match self {
            Legs::Memory => {
                let (leg, fault) = leg();
                faults.push(fault);
                leg
            }
            Legs::Luns(manager) => manager.lun(
                LEG_BLOCKS,
                Offers {
                    xcopy: true,
                    rod: false,
                    max_segments: 3,
                    max_token_blocks: 0,
                },
            ),
        }
    }
}

/// A memory leg that offloads copies within itself, with its fault handle.
fn leg() -> (Arc<dyn BlockDevice>, CopyFaultHandle) {
    let mem = MemDevice::new(LEG_BLOCKS * BS, BS as u32, 1 << 20)
        .expect("mem")
        .with_copy_offload(MemCopyLimits {
            max_ranges: 4,
            max_range_blocks: 32,
            max_command_blocks: 64,
        })
        .expect("offload");
    let faults = mem.copy_faults().expect("faults");
    (Arc::new(mem), faults)
}

struct Stack {
    root: Arc<dyn BlockDevice>,
    mirrors: Vec<Arc<Mirror>>,
    faults: Vec<CopyFaultHandle>,
    legs: Legs,
}

fn mirror(region: u64, legs: &Legs, faults: &mut Vec<CopyFaultHandle>) -> Arc<Mirror> {
    let (a, b) = (legs.leg(faults), legs.leg(faults));
    Arc::new(Mirror::new(vec![a, b], region).expect("mirror"))
}

fn build(shape: u8, luns: bool, region: u64) -> Stack {
    let legs = if luns {
        Legs::Luns(CopyManager::new("property"))
    } else {
        Legs::Memory
    };
    let mut faults = Vec::new();
    let (root, mirrors): (Arc<dyn BlockDevice>, Vec<Arc<Mirror>>) = match shape % 3 {
        0 => {
            let m = mirror(region, &legs, &mut faults);
            (m.clone(), vec![m])
        }
        1 => {
            let m0 = mirror(region, &legs, &mut faults);
            let m1 = mirror(region, &legs, &mut faults);
            let stripe = Stripe::new(vec![m0.clone(), m1.clone()], 24).expect("stripe");
            (Arc::new(stripe), vec![m0, m1])
        }
        _ => {
            let m = mirror(region, &legs, &mut faults);
            let plain = legs.leg(&mut faults);
            let concat = Concat::new(vec![m.clone(), plain]).expect("concat");
            (Arc::new(concat), vec![m])
        }
    };
    Stack {
        root,
        mirrors,
        faults,
        legs,
    }
}

#[derive(Debug, Clone)]
enum Op {
    Copy {
        src: u64,
        dst: u64,
        blocks: u64,
        two_phase: bool,
    },
    Write {
        lba: u64,
        blocks: u64,
        seed: u64,
    },
    /// Fail a leg (if another serves reads) and replace it with a blank
    /// one, resynced on a thread of its own while the next ops run.
    Replace {
        mirror: usize,
        leg: usize,
    },
    /// Make the next offload commands fail, leaving their destination
    /// unknown (redone by bounce).
    FaultCopies {
        leg: usize,
        count: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..1000, 0u64..1000, 1u64..90, any::<bool>())
            .prop_map(|(src, dst, blocks, two_phase)| Op::Copy { src, dst, blocks, two_phase }),
        2 => (0u64..1000, 1u64..60, any::<u64>())
            .prop_map(|(lba, blocks, seed)| Op::Write { lba, blocks, seed }),
        1 => (0usize..2, 0usize..2).prop_map(|(mirror, leg)| Op::Replace { mirror, leg }),
        1 => (0usize..5, 1u8..4).prop_map(|(leg, count)| Op::FaultCopies { leg, count }),
    ]
}

/// Fails a leg of `mirror` if another serves reads, replaces it with a
/// blank leg, and starts the resync on a thread.
fn replace(mirror: &Arc<Mirror>, legs: &Legs, leg: usize) -> Option<JoinHandle<ResyncReport>> {
    let health = mirror.health();
    let others_readable = health
        .legs
        .iter()
        .enumerate()
        .any(|(i, h)| i != leg && *h == LegHealth::Healthy);
    if !others_readable || health.legs[leg] != LegHealth::Healthy {
        return None;
    }
    mirror.fail_leg(leg).expect("fail");
    // Its writes take a millisecond to start, so the resync's read of a
    // region and its write are far apart and the ops that run meanwhile
    // land between them.
    let slow: SubmitHook = Arc::new(|req: &IoRequest| {
        if req.op == IoOp::Write {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let fresh: Arc<dyn BlockDevice> = Arc::new(Hooked::new(legs.leg(&mut Vec::new()), slow));
    let resync = mirror.replace_leg(leg, fresh).expect("replace");
    Some(std::thread::spawn(move || resync.run().expect("resync")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mirrors_stay_equal_to_the_model_under_failures_resyncs_and_copies(
        shape in 0u8..3,
        luns in any::<bool>(),
        region in prop::sample::select(vec![8u64, 16, 64]),
        ops in prop::collection::vec(op(), 1..14),
        buffer_blocks in 2usize..24,
    ) {
        let stack = build(shape, luns, region);
        let dev = &stack.root;
        let count = dev.info().block_count;
        let mut reference = pattern(shape as u64 + 1, (count * BS) as usize);
        SyncIo::open(dev.as_ref()).write(0, &reference).expect("fill");
        let mut engine = CopyEngine::new(CopyOptions {
            bounce_bytes: 64 * buffer_blocks * BS as usize,
            buffer_bytes: buffer_blocks * BS as usize,
            ..CopyOptions::default()
        }).expect("engine");
        let mut resyncs = Vec::new();
        for op in &ops {
            match *op {
                Op::Copy { src, dst, blocks, two_phase } => {
                    let blocks = blocks.min(count / 2);
                    let src = LbaRange { lba: src % (count - blocks), blocks };
                    let dst = LbaRange { lba: dst % (count - blocks), blocks };
                    let report = if two_phase {
                        let tokens = copy_in(dev, &[src]).expect("copy in");
                        // A leg that served the tokens' reads may fail now.
                        if let Some(handle) = replace(&stack.mirrors[0], &stack.legs, 0) {
                            resyncs.push(handle);
                        }
                        engine.copy_out(dev, &[dst], &tokens)
                    } else {
                        engine.copy(dev, &[src], dev, &[dst])
                    };
                    match report {
                        Ok(report) => {
                            prop_assert!(report.is_complete(), "{}", report);
                            model_copy(&mut reference, BS as usize, &[src], &[dst]);
                        }
                        Err(copy_engine::CopyError::StagingTooLarge { .. }) => {}
                        Err(e) => prop_assert!(false, "copy failed: {e}"),
                    }
                }
                Op::Write { lba, blocks, seed } => {
                    let blocks = blocks.min(count);
                    let lba = lba % (count - blocks + 1);
                    let data = pattern(seed, (blocks * BS) as usize);
                    SyncIo::open(dev.as_ref()).write(lba, &data).expect("write");
                    reference[(lba * BS) as usize..][..data.len()].copy_from_slice(&data);
                }
                Op::Replace { mirror, leg } => {
                    let mirror = &stack.mirrors[mirror % stack.mirrors.len()];
                    if let Some(handle) = replace(mirror, &stack.legs, leg) {
                        resyncs.push(handle);
                    }
                }
                Op::FaultCopies { leg, count } => {
                    let Some(faults) = stack.faults.get(leg % stack.faults.len().max(1)) else {
                        continue;
                    };
                    for _ in 0..count {
                        faults.push(if count % 2 == 0 {
                            CopyFault::DestinationUnknown
                        } else {
                            CopyFault::Partial { ranges: 1 }
                        });
                    }
                }
            }
        }
        for handle in resyncs {
            handle.join().expect("resync thread");
        }
        prop_assert!(read_all(dev) == reference, "the stack reads other than the model");
        // Every leg that serves reads (the first replica check maps every
        // leg that takes writes: after the resyncs, the healthy ones).
        for m in &stack.mirrors {
            prop_assert!(!m.health().is_degraded(), "{:?}", m.health());
        }
        prop_assert_eq!(first_replica_mismatch(dev, &reference, &|_, _| false), None);
    }
}
