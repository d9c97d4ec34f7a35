//! Random stacks (spec strings over memory leaves, some offload-capable)
//! and random gather/scatter range lists, against a flat reference model:
//! every replica ends equal to the model, and the report shows offload for
//! exactly the blocks whose source and destination leaves can copy between
//! themselves (here: the same offload-capable leaf), bounce for the rest.
//! Some leaves complete I/O late and out of order ([`common::LazyDevice`]).

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use bdev_stack::{Access, BlockDevice, DeviceId, LbaRange, LeafFragment, find_device};
use common::{fill, first_replica_mismatch, model_copy};
use copy_engine::{CopyEngine, CopyOptions, Method};
use proptest::prelude::*;

const BS: u64 = 512;

#[derive(Debug, Clone)]
enum Shape {
    Mem {
        blocks: u64,
        max_blocks: u64,
        /// (msrc, mssrl, mcl) for an offload-capable leaf.
        copy: Option<(u8, u64, u64)>,
        /// Behind a [`common::LazyDevice`]: I/O late and out of order.
        lazy: bool,
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

impl Shape {
    fn spec(&self) -> String {
        let list = |members: &[Shape]| {
            members
                .iter()
                .map(Shape::spec)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Shape::Mem {
                blocks,
                max_blocks,
                copy,
                lazy,
            } => {
                let kind = if *lazy { "lazy" } else { "mem" };
                let mut s = format!("{kind}:{},max={}", blocks * BS, max_blocks * BS);
                if let Some((msrc, mssrl, mcl)) = copy {
                    s += &format!(",copy=nvme,msrc={msrc},mssrl={mssrl},mcl={mcl}");
                }
                s
            }
            Shape::Concat(members) => format!("concat({})", list(members)),
            Shape::Stripe { chunk, members } => format!("stripe(chunk={chunk}, {})", list(members)),
            Shape::Mirror { region, legs } => format!("mirror(region={region}, {})", list(legs)),
        }
    }
}

fn shape() -> impl Strategy<Value = Shape> {
    let copy = prop_oneof![
        1 => Just(None),
        2 => (0u8..6, 1u64..40, 1u64..80).prop_map(Some),
    ];
    let leaf = (32u64..160, 1u64..64, copy, prop::bool::weighted(0.3)).prop_map(
        |(blocks, max_blocks, copy, lazy)| Shape::Mem {
            blocks,
            max_blocks,
            copy,
            lazy,
        },
    );
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(Shape::Concat),
            (1u64..24, prop::collection::vec(inner.clone(), 2..4))
                .prop_map(|(chunk, members)| Shape::Stripe { chunk, members }),
            (1u64..40, prop::collection::vec(inner, 2..3))
                .prop_map(|(region, legs)| Shape::Mirror { region, legs }),
        ]
    })
}

/// Cuts `[start, start + len)` into ranges at `cuts` (fractions), then
/// spreads them apart by `gaps`, keeping the whole inside `limit` blocks.
fn ranges(len: u64, cuts: &[u64], gaps: &[u64], start: u64) -> Vec<LbaRange> {
    let mut bounds: Vec<u64> = cuts.iter().map(|c| c % len).filter(|&c| c > 0).collect();
    bounds.extend([0, len]);
    bounds.sort_unstable();
    bounds.dedup();
    let mut at = start;
    bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let r = LbaRange {
                lba: at,
                blocks: w[1] - w[0],
            };
            at += r.blocks + gaps.get(i).copied().unwrap_or(0);
            r
        })
        .collect()
}

fn span(ranges: &[LbaRange]) -> u64 {
    ranges.last().map_or(0, |r| r.lba + r.blocks) - ranges.first().map_or(0, |r| r.lba)
}

/// Where each logical block lives: per block, (leaf, leaf LBA) of the
/// source and of every destination replica, from the stacks' mappings.
fn one_block(device: &Arc<dyn BlockDevice>, lba: u64, access: Access) -> Vec<(DeviceId, u64)> {
    let mut out: Vec<LeafFragment> = Vec::new();
    device.map(lba, 1, access, &mut out).expect("map block");
    out.iter().map(|f| (f.leaf, f.leaf_lba)).collect()
}

fn logical_blocks(ranges: &[LbaRange]) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|r| r.lba..r.lba + r.blocks)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Source and destination ranges apart on one stack: every block whose
    /// source and destination replica sit on the same offload-capable leaf
    /// is offloaded, every other one bounced, none staged.
    #[test]
    fn disjoint_copies_offload_exactly_where_leaves_allow(
        shape in shape(),
        len_frac in 1u64..100,
        src_cuts in prop::collection::vec(0u64..1000, 0..5),
        dst_cuts in prop::collection::vec(0u64..1000, 0..5),
        src_gaps in prop::collection::vec(0u64..6, 5),
        dst_gaps in prop::collection::vec(0u64..6, 5),
        offload in prop::bool::weighted(0.85),
        buffer_blocks in 1usize..24,
    ) {
        let dev = common::build(&shape.spec());
        let count = dev.info().block_count;
        // Source in the first half, destination in the second.
        let half = count / 2;
        let len = (half.saturating_sub(12) * len_frac / 100).max(1);
        let src = ranges(len, &src_cuts, &src_gaps, 0);
        let dst = ranges(len, &dst_cuts, &dst_gaps, half);
        prop_assume!(span(&src) <= half && half + span(&dst) <= count);

        let mut reference = fill(&dev, len_frac);
        let mut engine = CopyEngine::new(CopyOptions {
            bounce_bytes: 64 * buffer_blocks * BS as usize,
            buffer_bytes: buffer_blocks * BS as usize,
            offload,
            ..CopyOptions::default()
        }).expect("engine");
        let report = engine.copy(&dev, &src, &dev, &dst).expect("copy");
        model_copy(&mut reference, BS as usize, &src, &dst);
        prop_assert_eq!(first_replica_mismatch(&dev, &reference, &|_, _| false), None);
        prop_assert!(report.is_complete(), "{}", report);

        // The expected split, block by block, from the stack's mappings.
        let capable: HashSet<DeviceId> = {
            let mut ids = HashSet::new();
            let mut frags = Vec::new();
            dev.map(0, count, Access::Write, &mut frags).expect("map");
            for f in frags {
                let leaf = find_device(&dev, f.leaf).expect("leaf");
                if !leaf.info().copy_offloads.is_empty() { ids.insert(f.leaf); }
            }
            ids
        };
        // Offloads count per destination leaf; bounced bytes are written
        // once through the destination, which fans them out to its legs.
        let (mut off, mut bounce_leaf, mut bounce) = (0u64, 0u64, 0u64);
        for (s, d) in logical_blocks(&src).into_iter().zip(logical_blocks(&dst)) {
            let from = one_block(&dev, s, Access::Read);
            prop_assert_eq!(from.len(), 1);
            let mut bounced = false;
            for to in one_block(&dev, d, Access::Write) {
                if offload && to.0 == from[0].0 && capable.contains(&to.0) {
                    off += 1
                } else {
                    bounce_leaf += 1;
                    bounced = true;
                }
            }
            bounce += u64::from(bounced);
        }
        prop_assert_eq!(report.method(Method::NvmeCopy).bytes, off * BS);
        prop_assert_eq!(report.method(Method::Bounce).bytes, bounce * BS);
        prop_assert_eq!(report.method(Method::Staged).bytes, 0);
        prop_assert_eq!(report.bytes_expected, (off + bounce_leaf) * BS);
        prop_assert_eq!(report.fallbacks, 0);
    }

    /// Ranges anywhere, overlapping as they fall: every replica equals the
    /// model's memmove, or the copy is refused for staging beyond budget
    /// with nothing changed.
    #[test]
    fn overlapping_copies_equal_memmove(
        shape in shape(),
        len_frac in 1u64..100,
        src_start in 0u64..1000,
        dst_start in 0u64..1000,
        src_cuts in prop::collection::vec(0u64..1000, 0..5),
        dst_cuts in prop::collection::vec(0u64..1000, 0..5),
        src_gaps in prop::collection::vec(0u64..6, 5),
        dst_gaps in prop::collection::vec(0u64..6, 5),
        buffer_blocks in 1usize..24,
    ) {
        let dev = common::build(&shape.spec());
        let count = dev.info().block_count;
        let len = (count.saturating_sub(12) * len_frac / 100).max(1);
        let src0 = ranges(len, &src_cuts, &src_gaps, 0);
        let dst0 = ranges(len, &dst_cuts, &dst_gaps, 0);
        let src_room = count - span(&src0).min(count);
        let dst_room = count - span(&dst0).min(count);
        prop_assume!(span(&src0) <= count && span(&dst0) <= count);
        let shift = |rs: Vec<LbaRange>, by: u64| -> Vec<LbaRange> {
            rs.into_iter().map(|r| LbaRange { lba: r.lba + by, blocks: r.blocks }).collect()
        };
        let src = shift(src0, src_start % (src_room + 1));
        let dst = shift(dst0, dst_start % (dst_room + 1));

        let mut reference = fill(&dev, len_frac + 1);
        let before = reference.clone();
        let mut engine = CopyEngine::new(CopyOptions {
            bounce_bytes: 256 * buffer_blocks * BS as usize,
            buffer_bytes: buffer_blocks * BS as usize,
            ..CopyOptions::default()
        }).expect("engine");
        match engine.copy(&dev, &src, &dev, &dst) {
            Ok(report) => {
                model_copy(&mut reference, BS as usize, &src, &dst);
                prop_assert_eq!(first_replica_mismatch(&dev, &reference, &|_, _| false), None);
                prop_assert!(report.is_complete(), "{}", report);
                // Equal without mirrors; a mirror's legs take one bounced
                // write each.
                prop_assert!(report.offloaded_bytes() + report.host_bytes() <= report.bytes_expected);
                prop_assert!(report.offloaded_bytes() + report.host_bytes() > 0 || report.bytes_expected == 0);
            }
            Err(copy_engine::CopyError::StagingTooLarge { .. }) => {
                prop_assert_eq!(first_replica_mismatch(&dev, &before, &|_, _| false), None);
            }
            Err(e) => prop_assert!(false, "unexpected error: {e}"),
        }
    }
}
