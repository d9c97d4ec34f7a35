//! Copy planning: the M:N part of the copy engine, as pure functions.
//!
//! Both stacks map the logical copy space `[0, total)` (in blocks) onto
//! their leaves: the source as one partition, the destination as one
//! partition per copy it must receive (a mirror has one per healthy leg).
//! [`intersect`] cuts the two into [`Piece`]s, each with exactly one source
//! leaf and one destination leaf. [`sort_into_groups`] orders pieces by
//! (source leaf, destination leaf, destination LBA) so each [`Group`] can be
//! offloaded as a unit, and [`batch`] packs a group's pieces into commands
//! within a device's [`CopyLimits`] (NVMe Copy's MSRC/MSSRL/MCL, EXTENDED
//! COPY's segment limits, WRITE USING TOKEN's range descriptors).
//!
//! Overlap is where copies lose data: [`memmove_chunks`] splits a piece
//! whose source and destination overlap on one leaf into chunks that are
//! safe to run one after another, and [`cross_hazards`] finds pieces whose
//! source another piece overwrites, which no command order can be trusted
//! with and the engine must stage through memory.
//!
//! Nothing here touches a device or allocates per piece beyond the output
//! vectors the caller passes in, so the engine can reuse them.

use std::cmp::Ordering;

/// Identifies a leaf device (or, for ROD tokens, a token) within one copy.
pub type LeafId = u32;

/// A run of the logical copy space that lives on one leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Start in the logical copy space, in blocks.
    pub logical: u64,
    /// Length in blocks.
    pub blocks: u64,
    /// The leaf holding it.
    pub leaf: LeafId,
    /// Where on the leaf it starts (for a ROD token: the offset into it).
    pub lba: u64,
}

impl Fragment {
    fn logical_end(&self) -> u64 {
        self.logical + self.blocks
    }
}

/// A run of the copy space with one source leaf and one destination leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Start in the logical copy space, in blocks.
    pub logical: u64,
    /// Length in blocks.
    pub blocks: u64,
    /// Source leaf.
    pub src_leaf: LeafId,
    /// Source start on that leaf.
    pub src_lba: u64,
    /// Destination leaf.
    pub dst_leaf: LeafId,
    /// Destination start on that leaf.
    pub dst_lba: u64,
}

impl Piece {
    /// True when the piece reads and writes overlapping blocks of one leaf.
    pub fn overlaps_itself(&self) -> bool {
        self.src_leaf == self.dst_leaf
            && self.src_lba < self.dst_lba + self.blocks
            && self.dst_lba < self.src_lba + self.blocks
    }
}

/// Why a plan cannot be made. These are bugs in the caller's partitions
/// (the stacks produce them), reported rather than trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The source partition leaves a hole or overlaps itself.
    #[error("source partition is not contiguous at logical block {at}")]
    SourceNotContiguous {
        /// First logical block where it goes wrong.
        at: u64,
    },
    /// A fragment has zero length.
    #[error("empty fragment at logical block {at}")]
    EmptyFragment {
        /// Its logical start.
        at: u64,
    },
    /// A destination fragment lies beyond the source's total length.
    #[error("destination fragment [{start}, {end}) lies beyond the copy's {total} blocks")]
    DestinationOutOfRange {
        /// Fragment start.
        start: u64,
        /// Fragment end.
        end: u64,
        /// Copy length.
        total: u64,
    },
    /// The destination fragments cover less than the copy space.
    #[error("destination partitions cover {covered} blocks, less than the copy's {total}")]
    DestinationCoverage {
        /// Blocks covered by all destination fragments together.
        covered: u64,
        /// Copy length.
        total: u64,
    },
}

/// Checks that `src` is sorted, non-empty per fragment and contiguous from
/// 0; returns the total length.
fn check_source(src: &[Fragment]) -> Result<u64, PlanError> {
    let mut next = 0;
    for f in src {
        if f.blocks == 0 {
            return Err(PlanError::EmptyFragment { at: f.logical });
        }
        if f.logical != next {
            return Err(PlanError::SourceNotContiguous {
                at: next.min(f.logical),
            });
        }
        next = f.logical_end();
    }
    Ok(next)
}

/// Cuts the source partition against every destination fragment.
///
/// `src` must be sorted by logical start and cover `[0, total)` exactly.
/// `dst` may hold several layers (one per replica), in any order: the
/// first covers `[0, total)`, the others may cover parts of it (a mirror
/// under one member of a concat). That every block is covered is the
/// caller's to know (the engine checks replica 0); this checks the total. Pieces are appended to `out` in the order of
/// `dst`, and within a fragment by logical start.
pub fn intersect(
    src: &[Fragment],
    dst: &[Fragment],
    out: &mut Vec<Piece>,
) -> Result<(), PlanError> {
    let total = check_source(src)?;
    let mut covered: u64 = 0;
    for d in dst {
        if d.blocks == 0 {
            return Err(PlanError::EmptyFragment { at: d.logical });
        }
        let end = d
            .logical
            .checked_add(d.blocks)
            .filter(|&e| e <= total)
            .ok_or(PlanError::DestinationOutOfRange {
                start: d.logical,
                end: d.logical.saturating_add(d.blocks),
                total,
            })?;
        covered += d.blocks;
        // First source fragment that ends after the destination starts.
        let mut i = src.partition_point(|s| s.logical_end() <= d.logical);
        let mut at = d.logical;
        while at < end {
            let s = &src[i];
            let stop = end.min(s.logical_end());
            out.push(Piece {
                logical: at,
                blocks: stop - at,
                src_leaf: s.leaf,
                src_lba: s.lba + (at - s.logical),
                dst_leaf: d.leaf,
                dst_lba: d.lba + (at - d.logical),
            });
            at = stop;
            i += 1;
        }
    }
    // A cheap consistency check: at least one layer covers the whole
    // space. Further layers may be partial (a mirror under one member of a
    // concat adds a replica for that member's blocks only).
    if covered < total {
        return Err(PlanError::DestinationCoverage { covered, total });
    }
    Ok(())
}

/// Pieces that share a source leaf and a destination leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group<'a> {
    /// Source leaf.
    pub src_leaf: LeafId,
    /// Destination leaf.
    pub dst_leaf: LeafId,
    /// The pieces, by destination LBA.
    pub pieces: &'a [Piece],
}

fn group_order(a: &Piece, b: &Piece) -> Ordering {
    (a.src_leaf, a.dst_leaf, a.dst_lba, a.src_lba)
        .cmp(&(b.src_leaf, b.dst_leaf, b.dst_lba, b.src_lba))
}

/// Sorts `pieces` by (source leaf, destination leaf, destination LBA) and
/// returns the groups, borrowing from it.
pub fn sort_into_groups(pieces: &mut [Piece]) -> impl Iterator<Item = Group<'_>> {
    pieces.sort_unstable_by(group_order);
    let pieces: &[Piece] = pieces;
    pieces
        .chunk_by(|a, b| a.src_leaf == b.src_leaf && a.dst_leaf == b.dst_leaf)
        .map(|chunk| Group {
            src_leaf: chunk[0].src_leaf,
            dst_leaf: chunk[0].dst_leaf,
            pieces: chunk,
        })
}

/// What one offload command can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyLimits {
    /// Source ranges (NVMe) or segments (EXTENDED COPY) or range
    /// descriptors (WRITE USING TOKEN) per command.
    pub max_ranges: u32,
    /// Blocks in one range.
    pub max_range_blocks: u64,
    /// Blocks in one command.
    pub max_command_blocks: u64,
    /// All ranges of a command must continue one another at the
    /// destination (NVMe Copy has one destination LBA per command).
    pub contiguous_destination: bool,
    /// All ranges of a command must continue one another at the source (a
    /// WRITE USING TOKEN reads its ROD sequentially from one offset).
    pub contiguous_source: bool,
}

impl CopyLimits {
    /// NVMe Copy within a namespace, from Identify Namespace: MSSRL (blocks
    /// per range), MCL (blocks per command), MSRC (ranges, 0's based).
    /// `None` when a limit of 0 makes Copy unusable (QEMU's default).
    pub fn nvme(mssrl: u16, mcl: u32, msrc: u8) -> Option<CopyLimits> {
        (mssrl > 0 && mcl > 0).then_some(CopyLimits {
            max_ranges: u32::from(msrc) + 1,
            max_range_blocks: u64::from(mssrl),
            max_command_blocks: u64::from(mcl),
            contiguous_destination: true,
            contiguous_source: false,
        })
    }

    /// EXTENDED COPY (LID1) block-to-block segments: the copy manager's
    /// maximum segment count and segment length in bytes (RECEIVE COPY
    /// OPERATING PARAMETERS), and the 16-bit block count of a 0x02 segment.
    pub fn xcopy(max_segments: u16, max_segment_bytes: u64, block_size: u32) -> Option<CopyLimits> {
        let per_segment =
            (max_segment_bytes / u64::from(block_size.max(1))).min(u64::from(u16::MAX));
        (max_segments > 0 && per_segment > 0).then_some(CopyLimits {
            max_ranges: u32::from(max_segments),
            max_range_blocks: per_segment,
            max_command_blocks: per_segment * u64::from(max_segments),
            contiguous_destination: false,
            contiguous_source: false,
        })
    }

    /// WRITE USING TOKEN: range descriptors per command (VPD 0x8F) and the
    /// maximum token transfer size in blocks (0 = no limit reported).
    pub fn write_using_token(
        max_range_descriptors: u16,
        max_transfer_blocks: u64,
    ) -> Option<CopyLimits> {
        let max = if max_transfer_blocks == 0 {
            u64::from(u32::MAX)
        } else {
            max_transfer_blocks
        };
        (max_range_descriptors > 0).then_some(CopyLimits {
            max_ranges: u32::from(max_range_descriptors),
            // A block device range descriptor counts blocks in 32 bits.
            max_range_blocks: max.min(u64::from(u32::MAX)),
            max_command_blocks: max,
            contiguous_destination: false,
            contiguous_source: true,
        })
    }
}

/// One source range of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRange {
    /// Source start (LBA, or offset into a ROD).
    pub src_lba: u64,
    /// Destination start.
    pub dst_lba: u64,
    /// Length in blocks.
    pub blocks: u64,
}

/// One command: `range_count` ranges starting at `first_range` in the
/// ranges vector [`batch`] filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyCommand {
    /// Index of its first range.
    pub first_range: usize,
    /// Number of ranges.
    pub range_count: usize,
    /// Blocks it copies.
    pub blocks: u64,
}

/// Packs `pieces` (in the order given) into commands within `limits`,
/// splitting pieces longer than a range may be. Appends to `ranges` and
/// `commands`.
pub fn batch(
    pieces: &[Piece],
    limits: &CopyLimits,
    ranges: &mut Vec<CopyRange>,
    commands: &mut Vec<CopyCommand>,
) {
    let range_cap = limits
        .max_range_blocks
        .min(limits.max_command_blocks)
        .max(1);
    let max_ranges = limits.max_ranges.max(1) as usize;
    let mut open: Option<CopyCommand> = None;
    for p in pieces {
        let mut done = 0;
        while done < p.blocks {
            let blocks = (p.blocks - done).min(range_cap);
            let range = CopyRange {
                src_lba: p.src_lba + done,
                dst_lba: p.dst_lba + done,
                blocks,
            };
            done += blocks;
            if let Some(cmd) = open.as_mut() {
                let last = ranges[cmd.first_range + cmd.range_count - 1];
                let fits = cmd.range_count < max_ranges
                    && cmd.blocks + blocks <= limits.max_command_blocks
                    && (!limits.contiguous_destination
                        || last.dst_lba + last.blocks == range.dst_lba)
                    && (!limits.contiguous_source || last.src_lba + last.blocks == range.src_lba);
                if fits {
                    ranges.push(range);
                    cmd.range_count += 1;
                    cmd.blocks += blocks;
                    continue;
                }
                commands.push(*cmd);
            }
            open = Some(CopyCommand {
                first_range: ranges.len(),
                range_count: 1,
                blocks,
            });
            ranges.push(range);
        }
    }
    if let Some(cmd) = open {
        commands.push(cmd);
    }
}

/// Splits a piece whose source and destination overlap on one leaf into
/// chunks that run safely one after another, in memmove order: each chunk's
/// own source and destination are disjoint (so a device may process it in
/// any internal order), and no chunk reads blocks an earlier chunk wrote.
/// `max_chunk` bounds the chunk length. A piece that does not overlap
/// itself comes back whole; one whose source and destination coincide
/// needs no copy and gives no chunks.
pub fn memmove_chunks(piece: &Piece, max_chunk: u64, out: &mut Vec<Piece>) {
    if !piece.overlaps_itself() {
        out.push(*piece);
        return;
    }
    if piece.src_lba == piece.dst_lba {
        return;
    }
    let distance = piece.src_lba.abs_diff(piece.dst_lba);
    let chunk = distance.min(max_chunk.max(1));
    let count = piece.blocks.div_ceil(chunk);
    let make = |index: u64| {
        let start = index * chunk;
        let blocks = chunk.min(piece.blocks - start);
        Piece {
            logical: piece.logical + start,
            blocks,
            src_lba: piece.src_lba + start,
            dst_lba: piece.dst_lba + start,
            ..*piece
        }
    };
    if piece.dst_lba < piece.src_lba {
        // Moving down: front to back, like memmove.
        out.extend((0..count).map(make));
    } else {
        // Moving up: back to front.
        out.extend((0..count).rev().map(make));
    }
}

/// Indices of pieces caught in an overlap between different pieces: piece
/// `j` reads blocks that piece `i` (≠ `j`) writes on the same leaf. Both
/// are reported; their order cannot be left to devices, so the engine
/// stages them through memory. Overlap of a piece with itself is not
/// reported here (see [`memmove_chunks`]). The result is sorted.
pub fn cross_hazards(pieces: &[Piece]) -> Vec<usize> {
    // (leaf, start, end, piece, is_write), swept per leaf by start. Reads
    // and writes each come in a few sorted runs (a gather's sources per
    // source segment, its destination in order), which a stable sort
    // merges in close to linear time: keep the runs whole.
    let mut spans: Vec<(LeafId, u64, u64, usize, bool)> = Vec::with_capacity(pieces.len() * 2);
    for (i, p) in pieces.iter().enumerate() {
        spans.push((p.src_leaf, p.src_lba, p.src_lba + p.blocks, i, false));
    }
    for (i, p) in pieces.iter().enumerate() {
        spans.push((p.dst_leaf, p.dst_lba, p.dst_lba + p.blocks, i, true));
    }
    spans.sort_by_key(|s| (s.0, s.1));
    let mut flagged = vec![false; pieces.len()];
    // Active spans of the current leaf, swept by start; pruned by end.
    let mut active: Vec<(u64, usize, bool)> = Vec::new();
    let mut leaf = None;
    for &(l, start, end, idx, write) in &spans {
        if leaf != Some(l) {
            active.clear();
            leaf = Some(l);
        }
        active.retain(|&(e, _, _)| e > start);
        for &(_, other, other_write) in &active {
            if other != idx && write != other_write {
                flagged[idx] = true;
                flagged[other] = true;
            }
        }
        active.push((end, idx, write));
    }
    flagged
        .iter()
        .enumerate()
        .filter_map(|(i, &f)| f.then_some(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frag(logical: u64, blocks: u64, leaf: LeafId, lba: u64) -> Fragment {
        Fragment {
            logical,
            blocks,
            leaf,
            lba,
        }
    }

    #[test]
    fn stripe_source_against_concat_destination() {
        // Source: stripe of two leaves, chunk 4; destination: concat 6 + 6.
        let src = [frag(0, 4, 0, 0), frag(4, 4, 1, 0), frag(8, 4, 0, 4)];
        let dst = [frag(0, 6, 2, 100), frag(6, 6, 3, 0)];
        let mut pieces = Vec::new();
        intersect(&src, &dst, &mut pieces).unwrap();
        assert_eq!(
            pieces,
            [
                Piece {
                    logical: 0,
                    blocks: 4,
                    src_leaf: 0,
                    src_lba: 0,
                    dst_leaf: 2,
                    dst_lba: 100
                },
                Piece {
                    logical: 4,
                    blocks: 2,
                    src_leaf: 1,
                    src_lba: 0,
                    dst_leaf: 2,
                    dst_lba: 104
                },
                Piece {
                    logical: 6,
                    blocks: 2,
                    src_leaf: 1,
                    src_lba: 2,
                    dst_leaf: 3,
                    dst_lba: 0
                },
                Piece {
                    logical: 8,
                    blocks: 4,
                    src_leaf: 0,
                    src_lba: 4,
                    dst_leaf: 3,
                    dst_lba: 2
                },
            ]
        );
    }

    #[test]
    fn bad_partitions_are_errors() {
        let mut out = Vec::new();
        let gap = [frag(0, 4, 0, 0), frag(5, 4, 0, 4)];
        assert_eq!(
            intersect(&gap, &[frag(0, 9, 1, 0)], &mut out),
            Err(PlanError::SourceNotContiguous { at: 4 })
        );
        let src = [frag(0, 8, 0, 0)];
        assert!(matches!(
            intersect(&src, &[frag(4, 8, 1, 0)], &mut out),
            Err(PlanError::DestinationOutOfRange { .. })
        ));
        assert!(matches!(
            intersect(&src, &[frag(0, 4, 1, 0)], &mut out),
            Err(PlanError::DestinationCoverage {
                covered: 4,
                total: 8
            })
        ));
        assert_eq!(
            intersect(&src, &[frag(0, 0, 1, 0)], &mut out),
            Err(PlanError::EmptyFragment { at: 0 })
        );
        assert!(intersect(&src, &[frag(u64::MAX, 2, 1, 0)], &mut out).is_err());
    }

    #[test]
    fn nvme_batching_respects_msrc_mssrl_mcl_and_destination_contiguity() {
        let limits = CopyLimits::nvme(128, 256, 1).unwrap(); // 2 ranges
        let pieces = [
            Piece {
                logical: 0,
                blocks: 300,
                src_leaf: 0,
                src_lba: 1000,
                dst_leaf: 0,
                dst_lba: 0,
            },
            // Not contiguous at the destination: a new command.
            Piece {
                logical: 300,
                blocks: 10,
                src_leaf: 0,
                src_lba: 5000,
                dst_leaf: 0,
                dst_lba: 400,
            },
        ];
        let (mut ranges, mut cmds) = (Vec::new(), Vec::new());
        batch(&pieces, &limits, &mut ranges, &mut cmds);
        let shape: Vec<(usize, u64)> = cmds.iter().map(|c| (c.range_count, c.blocks)).collect();
        assert_eq!(shape, [(2, 256), (1, 44), (1, 10)]);
        assert_eq!(
            ranges[2],
            CopyRange {
                src_lba: 1256,
                dst_lba: 256,
                blocks: 44
            }
        );
        assert!(
            CopyLimits::nvme(0, 0, 0).is_none(),
            "QEMU's default limits forbid Copy"
        );
    }

    #[test]
    fn xcopy_limits_follow_lio() {
        // LIO: 1 segment, 256 MiB per segment, but a 0x02 segment counts
        // blocks in 16 bits.
        let l = CopyLimits::xcopy(1, 256 << 20, 512).unwrap();
        assert_eq!((l.max_ranges, l.max_range_blocks), (1, 65535));
    }

    #[test]
    fn memmove_chunks_run_in_a_safe_order() {
        let up = Piece {
            logical: 0,
            blocks: 10,
            src_leaf: 0,
            src_lba: 0,
            dst_leaf: 0,
            dst_lba: 3,
        };
        let mut out = Vec::new();
        memmove_chunks(&up, 64, &mut out);
        let starts: Vec<u64> = out.iter().map(|p| p.src_lba).collect();
        assert_eq!(starts, [9, 6, 3, 0]);
        out.clear();
        memmove_chunks(&Piece { dst_lba: 0, ..up }, 64, &mut out);
        assert!(out.is_empty(), "a copy onto itself is a no-op");
    }

    /// A leaf-addressed model: leaves are byte arrays (one byte a block).
    fn leaves_with(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|l| (0..len).map(|b| (l * 31 + b * 7) as u8).collect())
            .collect()
    }

    /// Runs pieces one at a time, each reading before writing.
    fn apply(leaves: &mut [Vec<u8>], pieces: &[Piece]) {
        for p in pieces {
            let data: Vec<u8> = leaves[p.src_leaf as usize]
                [p.src_lba as usize..(p.src_lba + p.blocks) as usize]
                .to_vec();
            leaves[p.dst_leaf as usize][p.dst_lba as usize..(p.dst_lba + p.blocks) as usize]
                .copy_from_slice(&data);
        }
    }

    /// Random partition of [0, total) over `leaves` leaves of `leaf_len`.
    fn partition(total: u64, cuts: &[u64], leaf_ids: &[LeafId], lbas: &[u64]) -> Vec<Fragment> {
        let mut bounds: Vec<u64> = cuts.iter().map(|c| c % total).filter(|&c| c > 0).collect();
        bounds.push(0);
        bounds.push(total);
        bounds.sort_unstable();
        bounds.dedup();
        bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                frag(
                    w[0],
                    w[1] - w[0],
                    leaf_ids[i % leaf_ids.len()],
                    lbas[i % lbas.len()],
                )
            })
            .collect()
    }

    proptest! {
        #[test]
        fn pieces_follow_both_partitions_exactly(
            total in 1u64..200,
            src_cuts in prop::collection::vec(0u64..1000, 0..12),
            dst_cuts in prop::collection::vec(0u64..1000, 0..12),
            layers in 1usize..3,
            src_lbas in prop::collection::vec(0u64..1000, 1..5),
            dst_lbas in prop::collection::vec(0u64..1000, 1..5),
        ) {
            let src = partition(total, &src_cuts, &[0, 1, 2], &src_lbas);
            let mut dst = Vec::new();
            for layer in 0..layers {
                dst.extend(partition(total, &dst_cuts, &[10 + layer as u32 * 2, 11 + layer as u32 * 2], &dst_lbas));
            }
            let mut pieces = Vec::new();
            intersect(&src, &dst, &mut pieces).unwrap();
            // Each logical block appears once per layer, with the source and
            // destination addresses the two partitions give it.
            let locate = |parts: &[Fragment], leafset: &dyn Fn(LeafId) -> bool, b: u64| {
                parts.iter().find(|f| leafset(f.leaf) && f.logical <= b && b < f.logical + f.blocks)
                    .map(|f| (f.leaf, f.lba + b - f.logical))
            };
            let mut seen = std::collections::HashMap::new();
            for p in &pieces {
                prop_assert!(p.blocks > 0);
                for k in 0..p.blocks {
                    let b = p.logical + k;
                    prop_assert_eq!(locate(&src, &|_| true, b), Some((p.src_leaf, p.src_lba + k)));
                    let layer_of = |l: LeafId| (l - 10) / 2;
                    let layer = layer_of(p.dst_leaf);
                    prop_assert_eq!(
                        locate(&dst, &|l| layer_of(l) == layer, b),
                        Some((p.dst_leaf, p.dst_lba + k))
                    );
                    *seen.entry((layer, b)).or_insert(0) += 1;
                }
            }
            prop_assert_eq!(seen.len() as u64, total * layers as u64);
            prop_assert!(seen.values().all(|&n| n == 1));

            // Groups partition the pieces by leaf pair.
            let n = pieces.len();
            let mut count = 0;
            for g in sort_into_groups(&mut pieces) {
                prop_assert!(g.pieces.iter().all(|p| p.src_leaf == g.src_leaf && p.dst_leaf == g.dst_leaf));
                count += g.pieces.len();
            }
            prop_assert_eq!(count, n);
        }

        #[test]
        fn batches_cover_their_pieces_within_limits(
            lens in prop::collection::vec(1u64..600, 1..20),
            gaps in prop::collection::vec(0u64..3, 20),
            mssrl in 1u16..300,
            mcl in 1u32..700,
            msrc in 0u8..8,
            tokenish in any::<bool>(),
        ) {
            let mut pieces = Vec::new();
            let (mut s, mut d) = (0u64, 0u64);
            for (i, len) in lens.iter().enumerate() {
                pieces.push(Piece { logical: 0, blocks: *len, src_leaf: 0, src_lba: s, dst_leaf: 1, dst_lba: d });
                s += len + gaps[i] * 1000;
                d += len + gaps[(i + 7) % gaps.len()];
            }
            let limits = if tokenish {
                CopyLimits::write_using_token(u16::from(msrc) + 1, u64::from(mcl)).unwrap()
            } else {
                CopyLimits::nvme(mssrl, mcl, msrc).unwrap()
            };
            let (mut ranges, mut cmds) = (Vec::new(), Vec::new());
            batch(&pieces, &limits, &mut ranges, &mut cmds);
            // Ranges, in order, are exactly the pieces.
            let mut flat = Vec::new();
            for p in &pieces { for k in 0..p.blocks { flat.push((p.src_lba + k, p.dst_lba + k)); } }
            let mut got = Vec::new();
            for r in &ranges { for k in 0..r.blocks { got.push((r.src_lba + k, r.dst_lba + k)); } }
            prop_assert_eq!(got, flat);
            // Commands tile the ranges and keep every limit.
            let mut next = 0;
            for c in &cmds {
                prop_assert_eq!(c.first_range, next);
                next += c.range_count;
                let rs = &ranges[c.first_range..c.first_range + c.range_count];
                prop_assert!(c.range_count as u32 <= limits.max_ranges);
                prop_assert!(c.blocks <= limits.max_command_blocks);
                prop_assert_eq!(rs.iter().map(|r| r.blocks).sum::<u64>(), c.blocks);
                for r in rs { prop_assert!(r.blocks <= limits.max_range_blocks); }
                for w in rs.windows(2) {
                    if limits.contiguous_destination { prop_assert_eq!(w[0].dst_lba + w[0].blocks, w[1].dst_lba); }
                    if limits.contiguous_source { prop_assert_eq!(w[0].src_lba + w[0].blocks, w[1].src_lba); }
                }
            }
            prop_assert_eq!(next, ranges.len());
        }

        #[test]
        fn memmove_chunks_equal_memmove(
            src in 0u64..64, dst in 0u64..64, blocks in 1u64..64, max_chunk in 1u64..80,
        ) {
            let piece = Piece { logical: 0, blocks, src_leaf: 0, src_lba: src, dst_leaf: 0, dst_lba: dst };
            let mut leaves = leaves_with(1, 128);
            let mut expected = leaves[0].clone();
            expected.copy_within(src as usize..(src + blocks) as usize, dst as usize);
            let mut chunks = Vec::new();
            memmove_chunks(&piece, max_chunk, &mut chunks);
            for c in &chunks {
                prop_assert!(!c.overlaps_itself() || c.src_lba == c.dst_lba);
                // Only overlapping pieces are cut; others come back whole.
                prop_assert!(c.blocks <= max_chunk || !piece.overlaps_itself());
            }
            apply(&mut leaves, &chunks);
            prop_assert_eq!(&leaves[0], &expected);
        }

        #[test]
        fn cross_hazards_match_brute_force(
            raw in prop::collection::vec((0u32..2, 0u64..50, 0u32..2, 0u64..50, 1u64..10), 1..12),
        ) {
            let pieces: Vec<Piece> = raw.iter().map(|&(sl, s, dl, d, n)| Piece {
                logical: 0, blocks: n, src_leaf: sl, src_lba: s, dst_leaf: dl, dst_lba: d,
            }).collect();
            let mut expected = Vec::new();
            for (j, r) in pieces.iter().enumerate() {
                let hit = pieces.iter().enumerate().any(|(i, w)| {
                    let writes_what_j_reads = i != j && w.dst_leaf == r.src_leaf
                        && w.dst_lba < r.src_lba + r.blocks && r.src_lba < w.dst_lba + w.blocks;
                    let reads_what_j_writes = i != j && w.src_leaf == r.dst_leaf
                        && w.src_lba < r.dst_lba + r.blocks && r.dst_lba < w.src_lba + w.blocks;
                    writes_what_j_reads || reads_what_j_writes
                });
                if hit { expected.push(j); }
            }
            prop_assert_eq!(cross_hazards(&pieces), expected);
        }
    }
}
