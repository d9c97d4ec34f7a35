//! Phase 1, copy in: the source stack's leaves and, per leaf fragment, a
//! token that says where the bytes are and how they may be moved.

use std::sync::Arc;

use bdev_stack::{
    Access, BlockDevice, CopyChannel, CopyOffload, DeviceId, DeviceKind, LbaRange, LeafFragment,
    OffloadCompletion, OffloadDomain, OffloadOutcome, OffloadSubmitError, RodToken, find_device,
};
use tracing::{debug, warn};

use crate::error::CopyError;

/// How the bytes of one source fragment may be moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// Only by reading them (bounce).
    Plain,
    /// An NVMe namespace: NVMe Copy to any destination in the same
    /// namespace.
    Nvme {
        /// The opened controller.
        controller: OffloadDomain,
        /// Namespace id.
        nsid: u32,
    },
    /// A SCSI LUN reachable by a copy manager: EXTENDED COPY to LUNs of the
    /// same copy manager.
    ExtendedCopy {
        /// The LUN's NAA designator (VPD 0x83).
        naa: Arc<[u8]>,
        /// The copy manager that reaches the LUN.
        copy_manager: OffloadDomain,
        /// The designator was verified unique within the copy manager.
        designator_unique: bool,
    },
    /// A ROD token made by POPULATE TOKEN over this fragment: WRITE USING
    /// TOKEN to a LUN that accepts it.
    Rod {
        /// The token.
        token: RodToken,
        /// The copy manager that made it: only its LUNs take it.
        copy_manager: OffloadDomain,
    },
}

/// One source fragment's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceToken {
    /// Start in the logical copy space, in blocks.
    pub logical: u64,
    /// Length in blocks.
    pub blocks: u64,
    /// The leaf holding the bytes.
    pub leaf: DeviceId,
    /// Where on the leaf.
    pub leaf_lba: u64,
    /// How they may be moved.
    pub kind: TokenKind,
}

/// The result of [`copy_in`]: the source and one token per leaf fragment,
/// in logical order, tiling `[0, total_blocks)`.
#[derive(Debug, Clone)]
pub struct SourceTokens {
    pub(crate) source: Arc<dyn BlockDevice>,
    pub(crate) tokens: Vec<SourceToken>,
    pub(crate) total_blocks: u64,
    /// (logical start, source LBA) per source range, for reading a block
    /// again through the source itself.
    pub(crate) starts: Vec<(u64, u64)>,
    /// The source has a mirror: a failed leaf read is retried through the
    /// source, which tries its other legs.
    pub(crate) has_mirror: bool,
}

impl SourceTokens {
    /// The source device.
    pub fn source(&self) -> &Arc<dyn BlockDevice> {
        &self.source
    }

    /// The tokens, in logical order.
    pub fn tokens(&self) -> &[SourceToken] {
        &self.tokens
    }

    /// Blocks in the logical copy space.
    pub fn total_blocks(&self) -> u64 {
        self.total_blocks
    }

    /// Index of the token holding logical block `logical`.
    pub(crate) fn token_at(&self, logical: u64) -> usize {
        self.tokens
            .partition_point(|t| t.logical + t.blocks <= logical)
            .min(self.tokens.len().saturating_sub(1))
    }
}

/// Checks `ranges` against `device`; returns their total length.
pub(crate) fn check_ranges(
    device: &dyn BlockDevice,
    ranges: &[LbaRange],
) -> Result<u64, CopyError> {
    let info = device.info();
    let mut total: u64 = 0;
    for r in ranges {
        let past_end = || CopyError::RangePastEnd {
            device: info.name.clone(),
            lba: r.lba,
            blocks: r.blocks,
            block_count: info.block_count,
        };
        match r.lba.checked_add(r.blocks) {
            Some(end) if end <= info.block_count => {}
            _ => return Err(past_end()),
        }
        total = total.checked_add(r.blocks).ok_or_else(past_end)?;
    }
    Ok(total)
}

fn has_mirror(device: &dyn BlockDevice) -> bool {
    device.info().kind == DeviceKind::Mirror
        || device.members().iter().any(|m| has_mirror(m.as_ref()))
}

/// What a leaf's advertised offloads make of its fragments, before any
/// ROD token is populated.
pub(crate) fn kind_of(offloads: &[CopyOffload]) -> TokenKind {
    // An identity-only token costs nothing to make; prefer those.
    for offload in offloads {
        if let CopyOffload::NvmeCopy {
            controller, nsid, ..
        } = offload
        {
            return TokenKind::Nvme {
                controller: controller.clone(),
                nsid: *nsid,
            };
        }
    }
    for offload in offloads {
        if let CopyOffload::ScsiExtendedCopy {
            naa,
            copy_manager,
            designator_unique,
            ..
        } = offload
        {
            return TokenKind::ExtendedCopy {
                naa: Arc::from(naa.as_slice()),
                copy_manager: copy_manager.clone(),
                designator_unique: *designator_unique,
            };
        }
    }
    TokenKind::Plain
}

/// Phase 1: maps `ranges` of `source` (concatenated, they are the logical
/// copy space) onto its leaves and makes one token per leaf fragment. A
/// mirror source gives one healthy leg. A LUN that offers only ROD tokens
/// gets POPULATE TOKEN per fragment, split at its token size limit; where
/// that fails, the fragment gets a plain token.
pub fn copy_in(
    source: &Arc<dyn BlockDevice>,
    ranges: &[LbaRange],
) -> Result<SourceTokens, CopyError> {
    let total_blocks = check_ranges(source.as_ref(), ranges)?;
    copy_in_checked(source, ranges, total_blocks)
}

/// [`copy_in`] of ranges [`check_ranges`] passed, totalling `total_blocks`.
pub(crate) fn copy_in_checked(
    source: &Arc<dyn BlockDevice>,
    ranges: &[LbaRange],
    total_blocks: u64,
) -> Result<SourceTokens, CopyError> {
    let name = &source.info().name;
    let mut fragments: Vec<LeafFragment> = Vec::new();
    let mut tokens = Vec::new();
    // Per leaf, found once: the device, what its fragments' tokens are,
    // and its ROD token limit. Token kinds are shared (Arc) by every
    // token of the leaf, so a token costs no allocation of its own.
    struct SourceLeaf {
        id: DeviceId,
        device: Arc<dyn BlockDevice>,
        kind: TokenKind,
        rod: Option<(u64, OffloadDomain)>,
    }
    let mut leaves: Vec<SourceLeaf> = Vec::new();
    let mut logical = 0;
    let mut starts = Vec::with_capacity(ranges.len());
    for r in ranges {
        starts.push((logical, r.lba));
        fragments.clear();
        source
            .map(r.lba, r.blocks, Access::Read, &mut fragments)
            .map_err(|e| CopyError::Map {
                device: name.clone(),
                lba: r.lba,
                blocks: r.blocks,
                source: e,
            })?;
        for f in &fragments {
            let at = match leaves.iter().position(|l| l.id == f.leaf) {
                Some(at) => at,
                None => {
                    let device =
                        find_device(source, f.leaf).ok_or_else(|| CopyError::UnknownLeaf {
                            device: name.clone(),
                            leaf: f.leaf,
                        })?;
                    let offloads = &device.info().copy_offloads;
                    let kind = kind_of(offloads);
                    let rod = offloads.iter().find_map(|o| match o {
                        CopyOffload::ScsiRodToken {
                            max_token_blocks,
                            copy_manager,
                            ..
                        } => Some((*max_token_blocks, copy_manager.clone())),
                        _ => None,
                    });
                    leaves.push(SourceLeaf {
                        id: f.leaf,
                        device,
                        kind,
                        rod,
                    });
                    leaves.len() - 1
                }
            };
            let leaf = &leaves[at];
            let token_logical = logical + (f.lba - r.lba);
            match (&leaf.kind, &leaf.rod) {
                (TokenKind::Plain, Some((max_token_blocks, copy_manager))) => populate(
                    leaf.device.as_ref(),
                    f,
                    token_logical,
                    (*max_token_blocks, copy_manager),
                    &mut tokens,
                )?,
                (kind, _) => tokens.push(SourceToken {
                    logical: token_logical,
                    blocks: f.blocks,
                    leaf: f.leaf,
                    leaf_lba: f.leaf_lba,
                    kind: kind.clone(),
                }),
            }
        }
        logical += r.blocks;
    }
    debug!(source = %name, blocks = total_blocks, tokens = tokens.len(), "copy in");
    Ok(SourceTokens {
        source: Arc::clone(source),
        tokens,
        total_blocks,
        starts,
        has_mirror: has_mirror(source.as_ref()),
    })
}

/// POPULATE TOKEN over fragment `f` of `leaf`, one token per
/// `max_token_blocks`; plain tokens where the leaf refuses.
fn populate(
    leaf: &dyn BlockDevice,
    f: &LeafFragment,
    logical: u64,
    (max_token_blocks, copy_manager): (u64, &OffloadDomain),
    tokens: &mut Vec<SourceToken>,
) -> Result<(), CopyError> {
    let device_error = |source| CopyError::Device {
        device: leaf.info().name.clone(),
        action: "opening a copy channel for POPULATE TOKEN",
        source,
    };
    let mut channel: Option<Box<dyn CopyChannel>> =
        leaf.open_copy_channel(1).map_err(device_error)?;
    let step = if max_token_blocks == 0 {
        f.blocks
    } else {
        max_token_blocks
    };
    let mut done = 0;
    let mut completions: Vec<OffloadCompletion> = Vec::with_capacity(1);
    while done < f.blocks {
        let blocks = (f.blocks - done).min(step);
        let range = LbaRange {
            lba: f.leaf_lba + done,
            blocks,
        };
        let token = match channel.as_mut() {
            Some(ch) => populate_one(ch.as_mut(), range, &mut completions),
            None => None,
        };
        // A ROD may cover less than asked (the device says how much): the
        // token serves that prefix, and the rest is populated again.
        let (kind, blocks) = match token {
            Some(token) => {
                let covered = token.blocks().min(blocks);
                if covered < blocks {
                    debug!(
                        leaf = %leaf.info().name,
                        asked = blocks,
                        covered,
                        "ROD token covers less than asked"
                    );
                }
                (
                    TokenKind::Rod {
                        token,
                        copy_manager: copy_manager.clone(),
                    },
                    covered,
                )
            }
            None => {
                warn!(leaf = %leaf.info().name, lba = range.lba, blocks, "POPULATE TOKEN failed; the range will be bounced");
                (TokenKind::Plain, blocks)
            }
        };
        tokens.push(SourceToken {
            logical: logical + done,
            blocks,
            leaf: f.leaf,
            leaf_lba: range.lba,
            kind,
        });
        done += blocks;
    }
    // Nothing outstanding is left: every populate was waited for.
    channel.take();
    Ok(())
}

/// One POPULATE TOKEN, waited for by polling.
pub(crate) fn populate_one(
    channel: &mut dyn CopyChannel,
    range: LbaRange,
    completions: &mut Vec<OffloadCompletion>,
) -> Option<RodToken> {
    loop {
        match channel.submit_populate(&[range], 0) {
            Ok(()) => break,
            Err(OffloadSubmitError::Busy) => {
                completions.clear();
                channel.poll(completions, 1);
            }
            Err(OffloadSubmitError::Invalid(e)) => {
                warn!(error = %e, "POPULATE TOKEN refused");
                return None;
            }
        }
    }
    loop {
        completions.clear();
        if channel.poll(completions, 1) == 1 {
            break;
        }
        std::hint::spin_loop();
    }
    match completions.pop().map(|c| c.outcome) {
        // A token for no blocks serves nothing.
        Some(OffloadOutcome::Token(token)) if token.blocks() > 0 => Some(token),
        Some(other) => {
            debug!(outcome = ?other, "POPULATE TOKEN not done");
            None
        }
        None => None,
    }
}
