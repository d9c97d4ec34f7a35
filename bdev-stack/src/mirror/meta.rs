//! On-device metadata of a mirror, as md keeps it: on every member a
//! superblock (array id, geometry, member index and count, per-member
//! state, an event counter, clean or dirty, a CRC) and the write-intent
//! bitmap (one bit per region), then the data.
//!
//! ```text
//! member:  | superblock (4 KiB) | bitmap (4 KiB pages) | data ...
//! ```
//!
//! Everything read from a device is untrusted: the superblock is checked
//! (magic, version, CRC, every field against the member it was read from)
//! before any of it is used, and garbage is a typed error.

use std::sync::Arc;

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::MAX_LEGS;

/// Bytes reserved for the superblock at the start of a member.
pub const SUPERBLOCK_BYTES: u64 = 4096;
const MAGIC: [u8; 8] = *b"USTORMD1";
const VERSION: u32 = 1;
/// RAID levels as md numbers them: 1 mirror, 0 stripe, -1 linear (concat).
const LEVEL_MIRROR: u32 = 1;
const LEVEL_STRIPE: u32 = 0;
const LEVEL_CONCAT: u32 = u32::MAX;

/// What kind of stack the members form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Every member holds every block; the layout's `region_blocks` is the
    /// write-intent region.
    Mirror,
    /// Members interleaved in chunks of the layout's `region_blocks`.
    Stripe,
    /// Members end to end.
    Concat,
}

/// A member's state as the superblock records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Holds every block.
    Healthy,
    /// Failed: takes no I/O until replaced.
    Failed,
    /// Being resynced; `done` blocks copied.
    Resyncing {
        /// Blocks copied so far.
        done: u64,
    },
}

/// The superblock as it lies on the device (NVMe-style little-endian
/// fields, reserved bytes named by offset).
#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct RawSuperblock {
    magic: [u8; 8],
    version: U32,
    level: U32,
    array_id: [u8; 16],
    member_index: U32,
    member_count: U32,
    block_size: U32,
    clean: U32,
    region_blocks: U64,
    data_offset: U64,
    data_blocks: U64,
    events: U64,
    bitmap_bytes: U64,
    bitmap_crc: U32,
    _rsvd92: [u8; 4],
    states: [u8; 32],
    resync_done: [U64; 32],
    _rsvd384: [u8; 124],
    crc: U32,
}

const _: () = {
    assert!(size_of::<RawSuperblock>() == 512);
    assert!(std::mem::offset_of!(RawSuperblock, states) == 96);
    assert!(std::mem::offset_of!(RawSuperblock, crc) == 508);
};

/// Where things are on a member, from its size, block size and region
/// size; computed in closed form with checked arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLayout {
    /// Bytes per block.
    pub block_size: u32,
    /// Blocks per write-intent region.
    pub region_blocks: u64,
    /// Bytes of the bitmap area (whole 4 KiB pages).
    pub bitmap_bytes: u64,
    /// First data block on the member.
    pub data_offset: u64,
    /// Data blocks (the mirror's size).
    pub data_blocks: u64,
}

/// Why metadata could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// No superblock of ours: the device was not made a member (or was
    /// overwritten).
    #[error(
        "no mirror superblock (magic {found:02x?}); create the array first, or name the right device"
    )]
    NotAMember {
        /// The bytes found where the magic should be.
        found: [u8; 8],
    },
    /// The superblock's checksum does not match: it is damaged.
    #[error(
        "superblock checksum {found:#010x} does not match {computed:#010x}: the superblock is damaged"
    )]
    BadChecksum {
        /// Stored.
        found: u32,
        /// Computed.
        computed: u32,
    },
    /// A field holds a value this member cannot have.
    #[error("superblock field {field} is {value}: {why}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it cannot be.
        why: &'static str,
    },
    /// The member is too small for the metadata and one region of data.
    #[error(
        "{blocks} blocks of {block_size} bytes leave no room for the metadata and one region of data"
    )]
    TooSmall {
        /// The member's blocks.
        blocks: u64,
        /// Its block size.
        block_size: u32,
    },
}

impl MetaLayout {
    /// The layout on a member of `blocks` blocks of `block_size` bytes with
    /// regions of `region_blocks`.
    pub fn new(blocks: u64, block_size: u32, region_blocks: u64) -> Result<MetaLayout, MetaError> {
        let bs = u64::from(block_size);
        let too_small = MetaError::TooSmall { blocks, block_size };
        if bs == 0 || !bs.is_power_of_two() || region_blocks == 0 {
            return Err(MetaError::BadField {
                field: if bs == 0 || !bs.is_power_of_two() {
                    "block_size"
                } else {
                    "region_blocks"
                },
                value: if region_blocks == 0 { 0 } else { bs },
                why: "must be a non-zero power of two (block size) or non-zero (region)",
            });
        }
        // The bitmap covers every region of the whole member (a slight
        // overestimate: simpler, and independent of the data offset).
        let regions = blocks.div_ceil(region_blocks);
        let bitmap_bytes = regions
            .div_ceil(8)
            .div_ceil(4096)
            .checked_mul(4096)
            .ok_or(too_small.clone())?;
        let meta_bytes = SUPERBLOCK_BYTES
            .checked_add(bitmap_bytes)
            .ok_or(too_small.clone())?;
        let data_offset = meta_bytes.div_ceil(bs);
        let data_blocks = blocks.checked_sub(data_offset).ok_or(too_small.clone())?;
        if data_blocks < region_blocks.min(blocks) || data_blocks == 0 {
            return Err(too_small);
        }
        Ok(MetaLayout {
            block_size,
            region_blocks,
            bitmap_bytes,
            data_offset,
            data_blocks,
        })
    }

    /// The layout of a stripe or concat member: the superblock, no bitmap,
    /// then the data; `chunk_blocks` is a stripe's chunk (1 for a concat).
    pub fn plain(blocks: u64, block_size: u32, chunk_blocks: u64) -> Result<MetaLayout, MetaError> {
        let bs = u64::from(block_size);
        if bs == 0 || !bs.is_power_of_two() || chunk_blocks == 0 {
            return Err(MetaError::BadField {
                field: if chunk_blocks == 0 {
                    "region_blocks"
                } else {
                    "block_size"
                },
                value: if chunk_blocks == 0 { 0 } else { bs },
                why: "must be non-zero (chunk) or a power of two (block size)",
            });
        }
        let data_offset = SUPERBLOCK_BYTES.div_ceil(bs);
        let data_blocks = blocks
            .checked_sub(data_offset)
            .filter(|&d| d > 0)
            .ok_or(MetaError::TooSmall { blocks, block_size })?;
        Ok(MetaLayout {
            block_size,
            region_blocks: chunk_blocks,
            bitmap_bytes: 0,
            data_offset,
            data_blocks,
        })
    }

    /// Regions of the data area.
    pub fn regions(&self) -> u64 {
        self.data_blocks.div_ceil(self.region_blocks)
    }

    /// Bytes of superblock and bitmap together.
    pub fn meta_bytes(&self) -> u64 {
        SUPERBLOCK_BYTES + self.bitmap_bytes
    }
}

/// What the superblock says, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The kind of stack.
    pub level: Level,
    /// Which array.
    pub array_id: [u8; 16],
    /// This member's index.
    pub member_index: u32,
    /// Members of the array.
    pub member_count: u32,
    /// Geometry.
    pub layout: MetaLayout,
    /// Bumped on every change of the array's state (clean to dirty and
    /// back, a member failing): the member with the highest count has the
    /// latest word.
    pub events: u64,
    /// Every write reached every member, and the bitmap is empty.
    pub clean: bool,
    /// Per member, as of `events`.
    pub states: Vec<MemberState>,
    /// CRC-32 of the bitmap area as written with this superblock.
    pub bitmap_crc: u32,
}

impl Superblock {
    /// Encodes into `out` (at least [`SUPERBLOCK_BYTES`]).
    pub fn encode(&self, out: &mut [u8]) {
        let mut raw = RawSuperblock::new_zeroed_struct();
        raw.magic = MAGIC;
        raw.version = VERSION.into();
        raw.level = match self.level {
            Level::Mirror => LEVEL_MIRROR,
            Level::Stripe => LEVEL_STRIPE,
            Level::Concat => LEVEL_CONCAT,
        }
        .into();
        raw.array_id = self.array_id;
        raw.member_index = self.member_index.into();
        raw.member_count = self.member_count.into();
        raw.block_size = self.layout.block_size.into();
        raw.clean = u32::from(self.clean).into();
        raw.region_blocks = self.layout.region_blocks.into();
        raw.data_offset = self.layout.data_offset.into();
        raw.data_blocks = self.layout.data_blocks.into();
        raw.events = self.events.into();
        raw.bitmap_bytes = self.layout.bitmap_bytes.into();
        raw.bitmap_crc = self.bitmap_crc.into();
        for (i, state) in self.states.iter().enumerate().take(MAX_LEGS) {
            let (code, done) = match state {
                MemberState::Healthy => (0, 0),
                MemberState::Failed => (1, 0),
                MemberState::Resyncing { done } => (2, *done),
            };
            raw.states[i] = code;
            raw.resync_done[i] = done.into();
        }
        raw.crc = 0.into();
        let crc = crc32fast::hash(raw.as_bytes());
        raw.crc = crc.into();
        out[..SUPERBLOCK_BYTES as usize].fill(0);
        out[..size_of::<RawSuperblock>()].copy_from_slice(raw.as_bytes());
    }

    /// Decodes and checks a superblock read from a member of
    /// `member_blocks` blocks of `block_size` bytes.
    pub fn decode(
        bytes: &[u8],
        member_blocks: u64,
        block_size: u32,
    ) -> Result<Superblock, MetaError> {
        let (mut raw, _) =
            RawSuperblock::read_from_prefix(bytes).map_err(|_| MetaError::BadField {
                field: "length",
                value: bytes.len() as u64,
                why: "shorter than a superblock",
            })?;
        if raw.magic != MAGIC {
            return Err(MetaError::NotAMember { found: raw.magic });
        }
        let found = raw.crc.get();
        raw.crc = 0.into();
        let computed = crc32fast::hash(raw.as_bytes());
        if found != computed {
            return Err(MetaError::BadChecksum { found, computed });
        }
        let bad = |field, value: u64, why| Err(MetaError::BadField { field, value, why });
        if raw.version.get() != VERSION {
            return bad(
                "version",
                raw.version.get().into(),
                "not a version this library reads",
            );
        }
        let level = match raw.level.get() {
            LEVEL_MIRROR => Level::Mirror,
            LEVEL_STRIPE => Level::Stripe,
            LEVEL_CONCAT => Level::Concat,
            other => return bad("level", other.into(), "not a mirror, stripe or concat"),
        };
        let count = raw.member_count.get();
        let min = if level == Level::Concat { 1 } else { 2 };
        if !(min..=MAX_LEGS as u32).contains(&count) {
            return bad(
                "member_count",
                count.into(),
                "a stack has 2 to 32 members (a concat 1 to 32)",
            );
        }
        let index = raw.member_index.get();
        if index >= count {
            return bad("member_index", index.into(), "not below the member count");
        }
        if raw.block_size.get() != block_size {
            return bad(
                "block_size",
                raw.block_size.get().into(),
                "differs from the device's block size",
            );
        }
        // The geometry must be what this member's size gives: a size read
        // off the disk is never used to compute anything by itself.
        let layout = match level {
            Level::Mirror => MetaLayout::new(member_blocks, block_size, raw.region_blocks.get())?,
            _ => MetaLayout::plain(member_blocks, block_size, raw.region_blocks.get())?,
        };
        let recorded = (
            raw.data_offset.get(),
            raw.data_blocks.get(),
            raw.bitmap_bytes.get(),
        );
        if recorded.0 != layout.data_offset || recorded.2 != layout.bitmap_bytes {
            return bad(
                "data_offset",
                recorded.0,
                "does not match the member's geometry",
            );
        }
        if recorded.1 > layout.data_blocks {
            return bad("data_blocks", recorded.1, "more than the member holds");
        }
        let layout = MetaLayout {
            data_blocks: recorded.1,
            ..layout
        };
        let mut states = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            states.push(match raw.states[i] {
                0 => MemberState::Healthy,
                1 => MemberState::Failed,
                2 => MemberState::Resyncing {
                    done: raw.resync_done[i].get().min(layout.data_blocks),
                },
                other => return bad("states", other.into(), "not a member state"),
            });
        }
        Ok(Superblock {
            level,
            array_id: raw.array_id,
            member_index: index,
            member_count: count,
            layout,
            events: raw.events.get(),
            clean: raw.clean.get() != 0,
            states,
            bitmap_crc: raw.bitmap_crc.get(),
        })
    }
}

impl RawSuperblock {
    fn new_zeroed_struct() -> RawSuperblock {
        <RawSuperblock as zerocopy::FromZeros>::new_zeroed()
    }
}

/// A fresh array id: from the clock, the process and an address, hashed;
/// unique enough to tell arrays apart (not a secret).
pub fn new_array_id(salt: &Arc<()>) -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut id = [0u8; 16];
    for (i, chunk) in id.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.write_usize(Arc::as_ptr(salt) as usize);
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        let layout = MetaLayout::new(1 << 20, 512, 2048).expect("layout");
        Superblock {
            level: Level::Mirror,
            array_id: [7; 16],
            member_index: 1,
            member_count: 2,
            layout,
            events: 42,
            clean: false,
            states: vec![MemberState::Healthy, MemberState::Resyncing { done: 4096 }],
            bitmap_crc: 0xdead_beef,
        }
    }

    #[test]
    fn a_superblock_round_trips() {
        let mut buf = vec![0u8; 4096];
        sb().encode(&mut buf);
        assert_eq!(Superblock::decode(&buf, 1 << 20, 512), Ok(sb()));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            Superblock::decode(&buf, 1 << 20, 512),
            Err(MetaError::NotAMember { .. })
        ));
        sb().encode(&mut buf);
        buf[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&buf, 1 << 20, 512),
            Err(MetaError::BadChecksum { .. })
        ));
        // A valid CRC over an absurd geometry: refused, at once.
        let mut huge = sb();
        huge.layout.region_blocks = u64::MAX;
        huge.encode(&mut buf);
        assert!(Superblock::decode(&buf, 1 << 20, 512).is_err());
        let mut other_size = vec![0u8; 4096];
        sb().encode(&mut other_size);
        assert!(matches!(
            Superblock::decode(&other_size, 1 << 19, 512),
            Err(MetaError::BadField { .. })
        ));
        assert!(matches!(
            Superblock::decode(&other_size, 1 << 20, 4096),
            Err(MetaError::BadField {
                field: "block_size",
                ..
            })
        ));
    }

    #[test]
    fn the_layout_leaves_room_for_metadata_and_refuses_tiny_members() {
        let l = MetaLayout::new(1 << 20, 512, 2048).expect("layout");
        assert_eq!(l.bitmap_bytes, 4096);
        assert_eq!(l.data_offset, 16);
        assert_eq!(l.data_blocks, (1 << 20) - 16);
        assert!(MetaLayout::new(8, 512, 2048).is_err());
        // Absurd sizes are computed in closed form, without overflow.
        let huge = MetaLayout::new(u64::MAX, 4096, 1).expect("closed form");
        assert_eq!(huge.data_offset + huge.data_blocks, u64::MAX);
        assert!(MetaLayout::new(u64::MAX, 512, 0).is_err());
    }
}
