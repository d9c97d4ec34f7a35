//! Random stacks of random shapes, fed random I/O sequences with several
//! requests in flight, must read back exactly what a flat reference array
//! says; and their leaf mappings must point at bytes that agree with it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bdev_stack::{
    Access, BlockDevice, Concat, FaultAction, FaultRule, FaultyDevice, FileDevice, FileEngine,
    HostBuffer, IoErrorKind, IoOp, MemDevice, Mirror, OwnedChannel, Stripe, find_device,
};
use common::{pattern, read_device};
use proptest::prelude::*;

const BS: usize = 512;

#[derive(Debug, Clone)]
enum Shape {
    Mem {
        blocks: u64,
        max_blocks: u64,
    },
    /// An O_DIRECT file leaf (buffered where the filesystem refuses).
    File {
        blocks: u64,
    },
    Concat(Vec<Shape>),
    Stripe {
        chunk: u64,
        members: Vec<Shape>,
    },
    Mirror {
        region: u64,
        legs: Vec<Shape>,
    },
}

/// Faults for the first leg of every mirror: reads of one range fail, and
/// writes of another (failing the leg). The other legs never fault, so the
/// mirror must hide all of it.
#[derive(Debug, Clone, Copy)]
struct LegFaults {
    read: (u64, u64),
    write: Option<(u64, u64)>,
}

fn shape() -> impl Strategy<Value = Shape> {
    let mem =
        (16u64..200, 1u64..48).prop_map(|(blocks, max_blocks)| Shape::Mem { blocks, max_blocks });
    let file = (16u64..200).prop_map(|blocks| Shape::File { blocks });
    let leaf = prop_oneof![4 => mem, 1 => file];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(Shape::Concat),
            (1u64..24, prop::collection::vec(inner.clone(), 2..4))
                .prop_map(|(chunk, members)| Shape::Stripe { chunk, members }),
            (1u64..40, prop::collection::vec(inner, 2..4))
                .prop_map(|(region, legs)| Shape::Mirror { region, legs }),
        ]
    })
}

fn build(shape: &Shape) -> Arc<dyn BlockDevice> {
    build_with(shape, None)
}

fn build_with(shape: &Shape, faults: Option<LegFaults>) -> Arc<dyn BlockDevice> {
    let build = |s: &Shape| build_with(s, faults);
    match shape {
        Shape::Mem { blocks, max_blocks } => Arc::new(
            MemDevice::new(blocks * BS as u64, BS as u32, max_blocks * BS as u64).expect("mem"),
        ),
        Shape::File { blocks } => {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("property-{}-{n}.img", std::process::id()));
            let _ = std::fs::remove_file(&path);
            // Both engines: io_uring and pread/pwrite, alternately.
            let engine = if n.is_multiple_of(2) {
                FileEngine::Uring
            } else {
                FileEngine::Sync
            };
            let device = FileDevice::open_with(&path, BS as u32, Some(blocks * BS as u64), engine)
                .expect("file");
            // The open descriptor keeps the file; the name is not needed.
            std::fs::remove_file(&path).expect("unlink");
            Arc::new(device)
        }
        Shape::Concat(members) => {
            Arc::new(Concat::new(members.iter().map(build).collect()).expect("concat"))
        }
        Shape::Stripe { chunk, members } => {
            let members: Vec<_> = members.iter().map(build).collect();
            let smallest = members
                .iter()
                .map(|m| m.info().block_count)
                .min()
                .unwrap_or(1);
            Arc::new(Stripe::new(members, (*chunk).min(smallest)).expect("stripe"))
        }
        Shape::Mirror { region, legs } => {
            let mut legs: Vec<_> = legs.iter().map(build).collect();
            if let Some(f) = faults {
                let (leg, handle) = FaultyDevice::new(legs[0].clone());
                let fail = FaultAction::Fail(IoErrorKind::Medium);
                handle.add(FaultRule {
                    op: IoOp::Read,
                    range: f.read.0..f.read.0 + f.read.1,
                    action: fail,
                });
                if let Some((start, len)) = f.write {
                    handle.add(FaultRule {
                        op: IoOp::Write,
                        range: start..start + len,
                        action: fail,
                    });
                }
                legs[0] = Arc::new(leg);
            }
            Arc::new(Mirror::new(legs, *region).expect("mirror"))
        }
    }
}

#[derive(Debug, Clone)]
struct Op {
    kind: u8,
    start: u64,
    len: u64,
    seed: u64,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (0u8..10, any::<u64>(), 1u64..300, any::<u64>()).prop_map(|(kind, start, len, seed)| Op {
            kind,
            start,
            len,
            seed,
        }),
        1..40,
    )
}

struct InFlight {
    lba: u64,
    blocks: u64,
    modifies: bool,
    expected: Option<Vec<u8>>,
}

/// Runs `ops` with up to 6 in flight, never overlapping a modification
/// with anything else in flight (the stack, like NVMe, does not order
/// overlapping requests).
fn run(device: &Arc<dyn BlockDevice>, ops: &[Op]) -> Result<Vec<u8>, TestCaseError> {
    let blocks_total = device.info().block_count;
    let mut reference = vec![0u8; blocks_total as usize * BS];
    let mut ch = OwnedChannel::<HostBuffer>::open(device.as_ref(), 6).expect("channel");
    let mut inflight: Vec<Option<InFlight>> = (0..6).map(|_| None).collect();
    let mut failures = Vec::new();
    let mut drain_until = |ch: &mut OwnedChannel<HostBuffer>,
                           inflight: &mut Vec<Option<InFlight>>,
                           done: &dyn Fn(&[Option<InFlight>]) -> bool| {
        while !done(inflight) {
            ch.poll(8, |ctx, result, buf| {
                let entry = inflight[ctx as usize].take().expect("known ctx");
                if let Err(e) = result {
                    failures.push(format!("{e}"));
                }
                if let (Some(expected), Some(buf)) = (entry.expected, buf)
                    && buf.as_slice()[..expected.len()] != expected[..]
                {
                    failures.push(format!(
                        "read of {}+{} differs from the reference",
                        entry.lba, entry.blocks
                    ));
                }
            });
        }
    };
    for op in ops {
        let lba = op.start % blocks_total;
        // A bare leaf at the top does not split: respect its limit.
        let blocks = op
            .len
            .min(blocks_total - lba)
            .min(device.info().max_transfer_blocks);
        let io_op = match op.kind {
            0..=3 => IoOp::Write,
            4..=6 => IoOp::Read,
            7 => IoOp::WriteZeroes,
            8 => IoOp::Deallocate,
            _ => IoOp::Flush,
        };
        let modifies = io_op.modifies();
        let conflicts = |list: &[Option<InFlight>]| {
            list.iter()
                .flatten()
                .any(|f| (modifies || f.modifies) && f.lba < lba + blocks && lba < f.lba + f.blocks)
        };
        drain_until(&mut ch, &mut inflight, &|list| !conflicts(list));
        drain_until(&mut ch, &mut inflight, &|list| {
            list.iter().any(Option::is_none)
        });
        let slot = inflight
            .iter()
            .position(Option::is_none)
            .expect("a free slot");
        let range = lba as usize * BS..(lba + blocks) as usize * BS;
        let (buf, expected) = match io_op {
            IoOp::Write => {
                let data = pattern(op.seed, range.len());
                reference[range.clone()].copy_from_slice(&data);
                let mut buf = HostBuffer::new(data.len()).expect("buffer");
                buf.as_mut_slice().copy_from_slice(&data);
                (Some(buf), None)
            }
            IoOp::Read => (
                Some(HostBuffer::new(range.len()).expect("buffer")),
                Some(reference[range.clone()].to_vec()),
            ),
            IoOp::WriteZeroes | IoOp::Deallocate => {
                reference[range.clone()].fill(0);
                (None, None)
            }
            IoOp::Flush => (None, None),
        };
        inflight[slot] = Some(InFlight {
            lba,
            blocks,
            modifies,
            expected,
        });
        ch.submit(io_op, lba, blocks, buf, slot as u64)
            .map_err(|r| r.error)
            .expect("a free slot means the channel has room");
    }
    drain_until(&mut ch, &mut inflight, &|list| {
        list.iter().all(Option::is_none)
    });
    prop_assert!(failures.is_empty(), "{failures:?}");
    Ok(reference)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_stacks_read_back_the_reference(shape in shape(), ops in ops()) {
        let device = build(&shape);
        let reference = run(&device, &ops)?;
        let total = device.info().block_count;
        prop_assert!(read_device(&device, 0, total) == reference, "full read-back differs");
    }

    #[test]
    fn mirrors_hide_faults_of_their_first_leg(
        shape in shape(),
        ops in ops(),
        read in (0u64..200, 1u64..100),
        write in prop::option::of((0u64..200, 1u64..50)),
    ) {
        let device = build_with(&shape, Some(LegFaults { read, write }));
        let reference = run(&device, &ops)?;
        let total = device.info().block_count;
        prop_assert!(read_device(&device, 0, total) == reference, "full read-back differs");
    }

    #[test]
    fn leaf_mappings_point_at_the_reference_bytes(shape in shape(), ops in ops(), lo in any::<u64>(), len in 1u64..400) {
        let device = build(&shape);
        let reference = run(&device, &ops)?;
        let total = device.info().block_count;
        let lba = lo % total;
        let blocks = len.min(total - lba);
        for access in [Access::Read, Access::Write] {
            let mut fragments = Vec::new();
            device.map(lba, blocks, access, &mut fragments).expect("map");
            // Each replica is a partition of part of the range; replica 0
            // (and, for reads, the only one) covers all of it.
            let replicas = fragments.iter().map(|f| f.replica).max().unwrap_or(0);
            for replica in 0..=replicas {
                let mut parts: Vec<_> = fragments.iter().filter(|f| f.replica == replica).collect();
                parts.sort_by_key(|f| f.lba);
                for pair in parts.windows(2) {
                    prop_assert!(pair[0].lba + pair[0].blocks <= pair[1].lba, "replica {replica} overlaps itself");
                }
                if replica == 0 {
                    prop_assert_eq!(parts.iter().map(|f| f.blocks).sum::<u64>(), blocks);
                }
            }
            for fragment in &fragments {
                let leaf = find_device(&device, fragment.leaf).expect("fragment names a leaf of the stack");
                prop_assert!(leaf.members().is_empty(), "fragment names a virtual device");
                let bytes = read_device(&leaf, fragment.leaf_lba, fragment.blocks);
                let at = fragment.lba as usize * BS;
                prop_assert!(bytes == reference[at..at + bytes.len()], "{access:?} fragment {fragment:?} differs");
            }
        }
    }
}
