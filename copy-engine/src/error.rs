//! The copy engine's errors: everything that stops a copy before or while
//! it is planned. Failures of single I/Os during a copy do not stop it:
//! they are listed in the report ([`crate::NotCopied`]).

use bdev_stack::{BdevError, DeviceId, IoError};

use crate::plan::PlanError;

/// Why a copy could not be made. Every variant is raised before any byte
/// moves, except [`CopyError::Device`] for a channel that would not open
/// mid-copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A range runs past the end of its device (or overflows).
    #[error("{device}: range {lba}+{blocks} runs past the end ({block_count} blocks)")]
    RangePastEnd {
        /// The device's name.
        device: String,
        /// First block of the range.
        lba: u64,
        /// Blocks in the range.
        blocks: u64,
        /// The device's size in blocks.
        block_count: u64,
    },
    /// The source and destination range lists cover different lengths.
    #[error(
        "source ranges on {source_name} total {src_blocks} blocks, destination ranges on {destination} {dst_blocks}"
    )]
    LengthMismatch {
        /// The source device's name.
        source_name: String,
        /// Blocks in the source ranges.
        src_blocks: u64,
        /// The destination device's name.
        destination: String,
        /// Blocks in the destination ranges.
        dst_blocks: u64,
    },
    /// The two devices have different block sizes.
    #[error(
        "block sizes differ: {source_name} has {src_block_size}-byte blocks, {destination} {dst_block_size}-byte"
    )]
    BlockSizeMismatch {
        /// The source device's name.
        source_name: String,
        /// Its block size.
        src_block_size: u32,
        /// The destination device's name.
        destination: String,
        /// Its block size.
        dst_block_size: u32,
    },
    /// A resync kept a region of the destination for longer than the copy
    /// waits; nothing was copied. Try again once the resync has moved on.
    #[error(
        "{device}: a resync held a destination region for {waited:?}; nothing copied, try again"
    )]
    DestinationBusy {
        /// The destination.
        device: String,
        /// How long the copy waited.
        waited: std::time::Duration,
    },
    /// Two destination ranges overlap: which one's data would win is not
    /// defined, so it is refused.
    #[error(
        "{device}: destination ranges {first_lba}+{first_blocks} and {second_lba}+{second_blocks} overlap"
    )]
    DestinationOverlap {
        /// The destination's name.
        device: String,
        /// Start of one range.
        first_lba: u64,
        /// Its length.
        first_blocks: u64,
        /// Start of the other.
        second_lba: u64,
        /// Its length.
        second_blocks: u64,
    },
    /// The stack refused to map a range onto its leaves (e.g. a mirror
    /// with no healthy leg).
    #[error("{device}: cannot map range {lba}+{blocks} onto its leaves")]
    Map {
        /// The device's name.
        device: String,
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u64,
        /// The stack's error.
        #[source]
        source: IoError,
    },
    /// A mapping named a leaf that is not in the device's tree.
    #[error("{device}: mapping names leaf {leaf}, which is not in its tree")]
    UnknownLeaf {
        /// The device mapped.
        device: String,
        /// The leaf.
        leaf: DeviceId,
    },
    /// The two partitions do not fit together (a stack bug, reported).
    #[error("planning the copy")]
    Plan(#[from] PlanError),
    /// Pieces that read what others write must be staged through memory,
    /// and they need more than the bounce budget.
    #[error(
        "overlapping pieces need {needed_buffers} staging buffers of {buffer_bytes} bytes; the bounce budget gives {budget_buffers}"
    )]
    StagingTooLarge {
        /// Buffers needed.
        needed_buffers: usize,
        /// Bytes per buffer.
        buffer_bytes: usize,
        /// Buffers the budget allows.
        budget_buffers: usize,
    },
    /// The engine's options are unusable.
    #[error("invalid copy options: {reason}")]
    InvalidOptions {
        /// Why.
        reason: String,
    },
    /// A device would not open a channel or give buffers.
    #[error("{device}: {action}")]
    Device {
        /// The device's name.
        device: String,
        /// What was being done.
        action: &'static str,
        /// The stack's error.
        #[source]
        source: BdevError,
    },
    /// The tokens were made for a different copy length or block size than
    /// their source reports now.
    #[error("source tokens do not tile their {total_blocks}-block copy space")]
    BadTokens {
        /// The tokens' claimed length.
        total_blocks: u64,
    },
}
