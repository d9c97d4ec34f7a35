//! The on-device format: a superblock at LBA 0, then fixed-size segments,
//! each ending in two summary areas written in turn.
//!
//! A segment's summary names the logical block and the write stamp of every
//! slot filled so far. Writing the areas in turn means a summary is never
//! overwritten in place: a torn write leaves the previous one whole, so a
//! partly filled segment can be committed again and again (a `sync`, or a
//! cleaning round that appends to the relocation head) with no window in
//! which its earlier slots are unnamed. Every record carries the store's
//! id, its own position and a CRC-32, so stale summaries of an earlier
//! format, a misdirected write or garbage are told apart from the real one.

use crate::GcError;

/// "USTORLFS": the superblock's magic.
const SUPER_MAGIC: u64 = u64::from_le_bytes(*b"USTORLFS");
/// "USTORSEG": a summary's magic.
const SUMMARY_MAGIC: u64 = u64::from_le_bytes(*b"USTORSEG");
/// Format version.
const FORMAT_VERSION: u32 = 2;
/// Bytes of a summary header (entries follow).
pub const SUMMARY_HEADER: usize = 64;
/// Bytes of one summary entry: logical block and stamp.
pub const SUMMARY_ENTRY: usize = 16;
/// Bytes of the encoded superblock (it is padded to a block).
const SUPER_BYTES: usize = 128;
/// Bytes before segment 0: the superblock, padded to 4 KiB so segments
/// stay aligned on devices of any block size.
const SUPER_AREA: u64 = 4096;
/// The largest segment: the writer holds the open segment in memory.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Free segments kept for the cleaner: it needs fresh destinations before
/// it frees its victims.
pub fn reserve_for(segments: u32) -> u32 {
    (segments / 25).max(3)
}

/// A geometry value, asked for or read from a superblock, that the device
/// or the format cannot hold. Each names the field and its value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum GeometryError {
    /// Not a block size the store runs on.
    #[error("block_size {value}: the store needs a power of two of at least 512 bytes")]
    BlockSize {
        /// The block size.
        value: u32,
    },
    /// The superblock was written for another block size.
    #[error(
        "block_size {value}: the device has {device}-byte blocks (formatted on another device, \
         or with another LBA format)"
    )]
    BlockSizeMismatch {
        /// The stored block size.
        value: u32,
        /// The device's.
        device: u32,
    },
    /// A segment size that is not whole blocks.
    #[error("segment size {value} bytes: not a multiple of the {block_size}-byte block")]
    SegmentNotBlocks {
        /// The size asked for.
        value: u64,
        /// The device's block size.
        block_size: u32,
    },
    /// Segments too small to hold data beside their two summary areas.
    #[error(
        "segment_blocks {value}: leaves no room for data beside two summary areas \
         (at least {min} blocks)"
    )]
    SegmentTooSmall {
        /// Blocks per segment.
        value: u64,
        /// The smallest that works.
        min: u64,
    },
    /// Segments larger than the device or the format allows.
    #[error(
        "segment_blocks {value} ({bytes} bytes): at most {max} blocks fit ({device_blocks} \
         blocks on the device, {max_bytes} bytes per segment at most)",
        bytes = u128::from(*.value) * u128::from(*.block_size),
        max_bytes = MAX_SEGMENT_BYTES
    )]
    SegmentTooLarge {
        /// Blocks per segment.
        value: u64,
        /// Block size.
        block_size: u32,
        /// The largest that fits.
        max: u64,
        /// The device's size in blocks.
        device_blocks: u64,
    },
    /// A derived field that is not what the segment size gives.
    #[error("{field} {value}: segments of this size on this device give {expected}")]
    Derived {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What it should be.
        expected: u64,
    },
    /// More segments than the device holds, or than the format counts.
    #[error("segments {value}: at most {max} fit")]
    TooManySegments {
        /// Segments.
        value: u64,
        /// The most that fit.
        max: u64,
    },
    /// Too few segments for the cleaner's reserve, two heads and data.
    #[error(
        "segments {value}: the store needs at least {min} (a reserve for the cleaner, two open \
         segments, one for data)"
    )]
    TooFewSegments {
        /// Segments.
        value: u32,
        /// The fewest that work.
        min: u32,
    },
    /// A fill outside (0, 1).
    #[error("fill {value:?}: not between 0 and 1")]
    Fill {
        /// The fill asked for.
        value: f64,
    },
    /// A logical size the store's slots cannot hold beside its reserve.
    #[error("logical_blocks {value}: the store can hold 1 to {max}")]
    LogicalBlocks {
        /// Logical blocks.
        value: u64,
        /// The most it can hold.
        max: u64,
    },
}

/// Where everything is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Device block size in bytes.
    pub block_size: u32,
    /// Blocks per segment: data slots, two summary areas, slack.
    pub segment_blocks: u64,
    /// Data slots per segment.
    pub data_slots: u32,
    /// Blocks per summary area.
    pub summary_blocks: u64,
    /// Segments on the device.
    pub segments: u32,
    /// First LBA of segment 0.
    pub first_lba: u64,
    /// Logical blocks the store offers.
    pub logical_blocks: u64,
}

/// The most data slots a segment of `segment_blocks` blocks holds beside
/// two summary areas, and the blocks of one area; (0, _) when none fit.
///
/// With `k` blocks per area a segment holds `min(a(k), b(k))` slots, where
/// `a(k) = (k * block_size - header) / entry` (the entries an area names)
/// grows with `k` and `b(k) = segment_blocks - 2k` (the blocks left) falls,
/// so the best `k` is one of the two integers around their crossing.
fn slots_for(segment_blocks: u64, block_size: u32) -> (u64, u64) {
    // u128: no product of a u64 and these constants overflows.
    let (s, bs) = (u128::from(segment_blocks), u128::from(block_size));
    let (h, e) = (SUMMARY_HEADER as u128, SUMMARY_ENTRY as u128);
    let slots = |k: u128| {
        let named = (k * bs).saturating_sub(h) / e;
        named.min(s.saturating_sub(2 * k))
    };
    let k = ((s * e + h) / (bs + 2 * e)).max(1);
    let best = slots(k).max(slots(k + 1));
    let summary = (h + best * e).div_ceil(bs);
    // Both are at most `segment_blocks`, a u64.
    (best as u64, summary as u64)
}

impl Geometry {
    /// The layout of a store with `segment_blocks`-block segments on a
    /// device of `block_count` blocks of `block_size` bytes, offering
    /// `logical_blocks` (checked by the caller against the reserve).
    ///
    /// Every value is checked against the device before it is used, so a
    /// size read off a disk or typed by a user gives an error at once.
    pub fn new(
        block_size: u32,
        block_count: u64,
        segment_blocks: u64,
        logical_blocks: u64,
    ) -> Result<Geometry, GeometryError> {
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(GeometryError::BlockSize { value: block_size });
        }
        let bs = u64::from(block_size);
        let first_lba = SUPER_AREA.div_ceil(bs);
        let room = block_count.saturating_sub(first_lba);
        let max = room.min(MAX_SEGMENT_BYTES / bs);
        if segment_blocks > max {
            return Err(GeometryError::SegmentTooLarge {
                value: segment_blocks,
                block_size,
                max,
                device_blocks: block_count,
            });
        }
        let (data_slots, summary_blocks) = slots_for(segment_blocks, block_size);
        if data_slots < 2 {
            // Two slots and two one-block areas: four blocks at least.
            return Err(GeometryError::SegmentTooSmall {
                value: segment_blocks,
                min: 4,
            });
        }
        // `segment_blocks` is at least 4 here.
        let segments = room / segment_blocks;
        let segments = u32::try_from(segments).map_err(|_| GeometryError::TooManySegments {
            value: segments,
            max: u64::from(u32::MAX),
        })?;
        let data_slots = u32::try_from(data_slots).map_err(|_| GeometryError::SegmentTooLarge {
            value: segment_blocks,
            block_size,
            max,
            device_blocks: block_count,
        })?;
        Ok(Geometry {
            block_size,
            segment_blocks,
            data_slots,
            summary_blocks,
            segments,
            first_lba,
            logical_blocks,
        })
    }

    /// Blocks of the superblock.
    pub fn super_blocks(&self) -> u64 {
        (SUPER_BYTES as u64).div_ceil(u64::from(self.block_size))
    }

    /// First LBA of `segment`.
    pub fn segment_lba(&self, segment: u32) -> u64 {
        self.first_lba + u64::from(segment) * self.segment_blocks
    }

    /// LBA of slot `slot` of `segment`.
    pub fn slot_lba(&self, segment: u32, slot: u32) -> u64 {
        self.segment_lba(segment) + u64::from(slot)
    }

    /// First LBA of summary area `area` (0 or 1) of `segment`.
    pub fn summary_lba(&self, segment: u32, area: u8) -> u64 {
        self.segment_lba(segment)
            + u64::from(self.data_slots)
            + u64::from(area & 1) * self.summary_blocks
    }

    /// Bytes of one summary area.
    pub fn summary_bytes(&self) -> usize {
        (self.summary_blocks * u64::from(self.block_size)) as usize
    }

    /// All data slots of the store.
    pub fn total_slots(&self) -> u64 {
        u64::from(self.segments) * u64::from(self.data_slots)
    }
}

/// The superblock: the geometry and the store's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The layout.
    pub geometry: Geometry,
    /// Random at format time: summaries of any other store are stale.
    pub store_id: u64,
}

impl Superblock {
    /// Encodes into `out` (a block or more; the rest is zeroed).
    pub fn encode(&self, out: &mut [u8]) {
        out.fill(0);
        let g = &self.geometry;
        let mut w = Writer::new(out);
        w.u64(SUPER_MAGIC);
        w.u32(FORMAT_VERSION);
        w.u32(g.block_size);
        w.u64(g.segment_blocks);
        w.u32(g.data_slots);
        w.u32(g.segments);
        w.u64(g.summary_blocks);
        w.u64(g.first_lba);
        w.u64(g.logical_blocks);
        w.u64(self.store_id);
        let crc = crc32fast::hash(&out[..SUPER_BYTES - 4]);
        out[SUPER_BYTES - 4..SUPER_BYTES].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks a superblock read from `device` with
    /// `block_size`-byte blocks and `block_count` blocks.
    pub fn decode(
        raw: &[u8],
        device: &str,
        block_size: u32,
        block_count: u64,
    ) -> Result<Superblock, GcError> {
        let bad = |reason: String| GcError::NotAStore {
            device: device.to_string(),
            reason,
        };
        if raw.len() < SUPER_BYTES {
            return Err(bad(format!("superblock read of {} bytes", raw.len())));
        }
        let mut r = Reader::new(raw);
        if r.u64() != SUPER_MAGIC {
            return Err(bad("no store superblock at LBA 0 (format it first)".into()));
        }
        let crc = u32::from_le_bytes(
            raw[SUPER_BYTES - 4..SUPER_BYTES]
                .try_into()
                .unwrap_or([0; 4]),
        );
        if crc != crc32fast::hash(&raw[..SUPER_BYTES - 4]) {
            return Err(bad("superblock checksum mismatch".into()));
        }
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        let stored_bs = r.u32();
        let segment_blocks = r.u64();
        let data_slots = r.u32();
        let segments = r.u32();
        let summary_blocks = r.u64();
        let first_lba = r.u64();
        let logical_blocks = r.u64();
        let store_id = r.u64();
        let stored = Geometry {
            block_size: stored_bs,
            segment_blocks,
            data_slots,
            summary_blocks,
            segments,
            first_lba,
            logical_blocks,
        };
        stored
            .check(block_size, block_count)
            .map_err(|source| GcError::BadSuperblock {
                device: device.to_string(),
                source,
            })?;
        Ok(Superblock {
            geometry: stored,
            store_id,
        })
    }
}

impl Geometry {
    /// Checks a geometry read from a device of `block_count` blocks of
    /// `block_size` bytes: every field is what this build derives from the
    /// segment size, or fits the device, before any is used.
    fn check(&self, block_size: u32, block_count: u64) -> Result<(), GeometryError> {
        if self.block_size != block_size {
            return Err(GeometryError::BlockSizeMismatch {
                value: self.block_size,
                device: block_size,
            });
        }
        let expected = Geometry::new(
            block_size,
            block_count,
            self.segment_blocks,
            self.logical_blocks,
        )?;
        for (field, value, want) in [
            (
                "data_slots",
                u64::from(self.data_slots),
                u64::from(expected.data_slots),
            ),
            (
                "summary_blocks",
                self.summary_blocks,
                expected.summary_blocks,
            ),
            ("first_lba", self.first_lba, expected.first_lba),
        ] {
            if value != want {
                return Err(GeometryError::Derived {
                    field,
                    value,
                    expected: want,
                });
            }
        }
        // The device may have grown since the format, never shrunk.
        if self.segments > expected.segments {
            return Err(GeometryError::TooManySegments {
                value: u64::from(self.segments),
                max: u64::from(expected.segments),
            });
        }
        let min = reserve_for(self.segments) + 3;
        if self.segments < min {
            return Err(GeometryError::TooFewSegments {
                value: self.segments,
                min,
            });
        }
        let max = self.usable_slots().saturating_sub(1);
        if self.logical_blocks == 0 || self.logical_blocks > max {
            return Err(GeometryError::LogicalBlocks {
                value: self.logical_blocks,
                max,
            });
        }
        Ok(())
    }

    /// Data slots beyond the cleaner's reserve and the two open segments:
    /// what the store may offer.
    pub fn usable_slots(&self) -> u64 {
        let reserve = reserve_for(self.segments);
        u64::from(self.segments.saturating_sub(reserve + 2)) * u64::from(self.data_slots)
    }
}

/// One slot of a summary: which logical block it holds and the stamp of
/// the write that made it (kept when the cleaner moves it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The logical block.
    pub lbn: u64,
    /// Global write order of the user write that produced this content.
    pub stamp: u64,
}

/// A segment's summary: its filled slots, in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The segment it describes.
    pub segment: u32,
    /// Which area it was read from or is for (0 or 1).
    pub area: u8,
    /// Store-wide commit order: a later summary of anything is larger.
    pub seq: u64,
    /// Filled slots.
    pub entries: Vec<Entry>,
}

/// The CRC of a segment's entries so far, carried from one commit of the
/// segment to the next: a segment's entries only ever grow, so each is
/// summed once, not once per commit (the relocation head is committed
/// after every cleaning round while it fills).
#[derive(Debug, Clone, Default)]
pub struct EntriesCrc {
    entries: usize,
    hasher: crc32fast::Hasher,
}

impl EntriesCrc {
    /// Starts over (the segment was freed).
    pub fn reset(&mut self) {
        *self = EntriesCrc::default();
    }
}

impl Summary {
    /// Encodes into `out` (one area; the rest is zeroed).
    pub fn encode(&self, store_id: u64, out: &mut [u8]) -> Result<(), GcError> {
        Summary::encode_parts(
            self.segment,
            self.area,
            self.seq,
            &self.entries,
            store_id,
            &mut EntriesCrc::default(),
            out,
        )
    }

    /// Encodes the summary of `segment` for `area` with `seq` and
    /// `entries` into `out`, straight from the caller's entries. `crc` is
    /// the segment's: it must have seen no entries but a prefix of these
    /// (the same segment since its last reset).
    pub fn encode_parts(
        segment: u32,
        area: u8,
        seq: u64,
        entries: &[Entry],
        store_id: u64,
        crc: &mut EntriesCrc,
        out: &mut [u8],
    ) -> Result<(), GcError> {
        let need = SUMMARY_HEADER + entries.len() * SUMMARY_ENTRY;
        if need > out.len() {
            return Err(GcError::Config(format!(
                "summary of {} entries needs {need} bytes, the area has {}",
                entries.len(),
                out.len()
            )));
        }
        let (header, rest) = out.split_at_mut(SUMMARY_HEADER);
        header.fill(0);
        let mut w = Writer::new(header);
        w.u64(SUMMARY_MAGIC);
        w.u64(store_id);
        w.u32(segment);
        w.u32(u32::from(area));
        w.u64(seq);
        w.u32(entries.len() as u32);
        // The CRC sits last in the header (written below) and covers every
        // entry, then the header before it.
        let (body, tail) = rest.split_at_mut(entries.len() * SUMMARY_ENTRY);
        for (raw, e) in body.chunks_exact_mut(SUMMARY_ENTRY).zip(entries) {
            raw[..8].copy_from_slice(&e.lbn.to_le_bytes());
            raw[8..].copy_from_slice(&e.stamp.to_le_bytes());
        }
        tail.fill(0);
        if crc.entries > entries.len() {
            crc.reset();
        }
        crc.hasher.update(&body[crc.entries * SUMMARY_ENTRY..]);
        crc.entries = entries.len();
        let mut whole = crc.hasher.clone();
        whole.update(&out[..SUMMARY_HEADER - 4]);
        let sum = whole.finalize();
        out[SUMMARY_HEADER - 4..SUMMARY_HEADER].copy_from_slice(&sum.to_le_bytes());
        Ok(())
    }

    /// Decodes summary area `area` of `segment`; `None` for anything that
    /// is not a whole, current summary of this store for exactly that place
    /// (never written, torn, stale, misplaced, garbage).
    pub fn decode(
        raw: &[u8],
        store_id: u64,
        segment: u32,
        area: u8,
        data_slots: u32,
    ) -> Option<Summary> {
        if raw.len() < SUMMARY_HEADER {
            return None;
        }
        let mut r = Reader::new(raw);
        if r.u64() != SUMMARY_MAGIC || r.u64() != store_id {
            return None;
        }
        let (seg, ar, seq, count) = (r.u32(), r.u32(), r.u64(), r.u32());
        if seg != segment || ar != u32::from(area) || count > data_slots {
            return None;
        }
        let count = count as usize;
        if SUMMARY_HEADER + count * SUMMARY_ENTRY > raw.len() {
            return None;
        }
        let crc = u32::from_le_bytes(raw[SUMMARY_HEADER - 4..SUMMARY_HEADER].try_into().ok()?);
        if crc != summary_crc(raw, count) {
            return None;
        }
        let mut r = Reader::new(&raw[SUMMARY_HEADER..]);
        let entries = (0..count)
            .map(|_| Entry {
                lbn: r.u64(),
                stamp: r.u64(),
            })
            .collect();
        Some(Summary {
            segment,
            area,
            seq,
            entries,
        })
    }
}

/// The CRC of a summary: its entries, then its header up to the CRC (the
/// entries first, so a segment's running sum carries across commits).
fn summary_crc(raw: &[u8], count: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[SUMMARY_HEADER..SUMMARY_HEADER + count * SUMMARY_ENTRY]);
    h.update(&raw[..SUMMARY_HEADER - 4]);
    h.finalize()
}

/// Little-endian writer over a byte buffer the caller sized.
struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut [u8]) -> Writer<'a> {
        Writer { out, pos: 0 }
    }

    fn put(&mut self, bytes: &[u8]) {
        self.out[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }

    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

/// Little-endian reader; reads past the end give zeros (callers check
/// lengths first, so this only keeps garbage from panicking).
struct Reader<'a> {
    raw: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(raw: &'a [u8]) -> Reader<'a> {
        Reader { raw, pos: 0 }
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        if let Some(s) = self.raw.get(self.pos..self.pos + N) {
            b.copy_from_slice(s);
        }
        self.pos += N;
        b
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry::new(4096, 4096, 64, 2000).unwrap()
    }

    #[test]
    fn geometry_leaves_room_for_two_summaries() {
        let g = geometry();
        assert_eq!(g.data_slots, 62);
        assert_eq!(g.summary_blocks, 1);
        assert_eq!(g.first_lba, 1);
        assert_eq!(g.segments, 63);
        assert_eq!(g.summary_lba(0, 1), 1 + 62 + 1);
        let small = Geometry::new(512, 1 << 15, 2048, 0).unwrap();
        assert!(
            u64::from(small.data_slots) + 2 * small.summary_blocks <= 2048,
            "{small:?}"
        );
        assert!(
            SUMMARY_HEADER as u64 + u64::from(small.data_slots) * 16 <= small.summary_blocks * 512
        );
        assert!(Geometry::new(4096, 4096, 2, 0).is_err());
        assert!(Geometry::new(1000, 4096, 64, 0).is_err());
    }

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            geometry: geometry(),
            store_id: 0x1234_5678_9abc,
        };
        let mut raw = vec![0u8; 4096];
        sb.encode(&mut raw);
        assert_eq!(Superblock::decode(&raw, "d", 4096, 4096).unwrap(), sb);
        // Another block size, a smaller device, a flipped bit: errors.
        assert!(matches!(
            Superblock::decode(&raw, "d", 512, 4096 * 8),
            Err(GcError::BadSuperblock {
                source: GeometryError::BlockSizeMismatch {
                    value: 4096,
                    device: 512
                },
                ..
            })
        ));
        assert!(Superblock::decode(&raw, "d", 4096, 1000).is_err());
        raw[20] ^= 1;
        assert!(Superblock::decode(&raw, "d", 4096, 4096).is_err());
        assert!(Superblock::decode(&[0u8; 4096], "d", 4096, 4096).is_err());
        assert!(Superblock::decode(&[0u8; 10], "d", 4096, 4096).is_err());
    }

    /// The slot count by the search the closed form replaces.
    fn slots_by_search(segment_blocks: u64, block_size: u32) -> (u64, u64) {
        let bs = u64::from(block_size);
        let summary = |n: u64| (SUMMARY_HEADER as u64 + n * SUMMARY_ENTRY as u64).div_ceil(bs);
        let mut n = segment_blocks.saturating_sub(2);
        while n > 0 && n + 2 * summary(n) > segment_blocks {
            n -= 1;
        }
        (n, summary(n))
    }

    #[test]
    fn the_closed_form_slot_count_is_the_searched_one() {
        for bs in [512u32, 1024, 4096, 65536] {
            let sizes = (0..3000u64).chain((1..200).map(|i| i * 4099 + 17));
            for segment_blocks in sizes {
                let (n, summary) = slots_for(segment_blocks, bs);
                let (want, want_summary) = slots_by_search(segment_blocks, bs);
                assert_eq!(n, want, "{segment_blocks} blocks of {bs}");
                if n > 0 {
                    assert_eq!(summary, want_summary, "{segment_blocks} blocks of {bs}");
                }
            }
        }
        // Sizes no search finishes: answered at once, without overflow.
        for segment_blocks in [1 << 40, 1 << 62, u64::MAX] {
            let (n, summary) = slots_for(segment_blocks, 512);
            assert!(n + 2 * summary <= segment_blocks && n > segment_blocks / 2);
        }
    }

    /// Runs `f` on a thread of its own and fails unless it answers within
    /// five seconds (a hang or a panic fails the test, not the run).
    fn at_once<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(v) => v,
            Err(e) => panic!("no answer within 5 s ({e}: hung or panicked)"),
        }
    }

    #[test]
    fn garbage_geometry_with_a_valid_crc_is_a_typed_error_at_once() {
        type Damage = fn(&mut Geometry);
        let cases: [(&str, &str, Damage); 17] = [
            ("segment_blocks", "4398046511104", |g| {
                g.segment_blocks = 1 << 42
            }),
            ("segment_blocks", "4611686018427387904", |g| {
                g.segment_blocks = 1 << 62
            }),
            ("segment_blocks", "18446744073709551615", |g| {
                g.segment_blocks = u64::MAX
            }),
            ("segment_blocks", "4097", |g| g.segment_blocks = 4097),
            ("segment_blocks", "3", |g| g.segment_blocks = 3),
            ("segment_blocks", "0", |g| g.segment_blocks = 0),
            ("data_slots", "4294967295", |g| g.data_slots = u32::MAX),
            ("data_slots", "0", |g| g.data_slots = 0),
            ("summary_blocks", "18446744073709551615", |g| {
                g.summary_blocks = u64::MAX
            }),
            ("first_lba", "18446744073709551615", |g| {
                g.first_lba = u64::MAX
            }),
            ("segments", "4294967295", |g| g.segments = u32::MAX),
            ("segments", "0", |g| g.segments = 0),
            ("logical_blocks", "18446744073709551615", |g| {
                g.logical_blocks = u64::MAX
            }),
            ("logical_blocks", "0", |g| g.logical_blocks = 0),
            ("logical_blocks", "3906", |g| g.logical_blocks = 62 * 63),
            ("block_size", "4294967295", |g| g.block_size = u32::MAX),
            ("block_size", "0", |g| g.block_size = 0),
        ];
        for (field, value, damage) in cases {
            let mut sb = Superblock {
                geometry: geometry(),
                store_id: 7,
            };
            damage(&mut sb.geometry);
            let mut raw = vec![0u8; 4096];
            sb.encode(&mut raw);
            let what = format!("{field} {value}");
            let err =
                at_once(move || Superblock::decode(&raw, "dev0", 4096, 4096)).expect_err(&what);
            let GcError::BadSuperblock { device, source } = &err else {
                panic!("{what}: {err:?}");
            };
            assert_eq!(device, "dev0", "{what}");
            assert!(err.to_string().contains("dev0"), "{what}: {err}");
            assert!(
                source.to_string().starts_with(&what),
                "{what}: the cause names the field and value: {source}"
            );
        }
    }

    #[test]
    fn segment_sizes_past_the_device_or_the_format_are_refused_at_once() {
        for (blocks, device) in [
            (1u64 << 40, 1u64 << 20),
            (1 << 62, u64::MAX),
            (u64::MAX, 1 << 40),
        ] {
            let e = at_once(move || Geometry::new(512, device, blocks, 0)).expect_err("too large");
            assert!(
                matches!(e, GeometryError::SegmentTooLarge { value, .. } if value == blocks),
                "{e}"
            );
        }
        // The largest segment works; one block more does not.
        let max = MAX_SEGMENT_BYTES / 4096;
        assert!(Geometry::new(4096, max * 100, max, 0).is_ok());
        assert!(Geometry::new(4096, max * 100, max + 1, 0).is_err());
        // So many segments the format cannot count them.
        assert!(matches!(
            Geometry::new(512, u64::MAX, 4, 0),
            Err(GeometryError::TooManySegments { .. })
        ));
    }

    #[test]
    fn summary_round_trips_and_rejects_stale_torn_misplaced() {
        let s = Summary {
            segment: 7,
            area: 1,
            seq: 99,
            entries: (0..62)
                .map(|i| Entry {
                    lbn: i * 3,
                    stamp: 1000 + i,
                })
                .collect(),
        };
        let mut raw = vec![0u8; 4096];
        s.encode(42, &mut raw).unwrap();
        assert_eq!(Summary::decode(&raw, 42, 7, 1, 62), Some(s.clone()));
        assert_eq!(Summary::decode(&raw, 43, 7, 1, 62), None, "other store");
        assert_eq!(Summary::decode(&raw, 42, 8, 1, 62), None, "misplaced");
        assert_eq!(Summary::decode(&raw, 42, 7, 0, 62), None, "other area");
        assert_eq!(
            Summary::decode(&raw, 42, 7, 1, 10),
            None,
            "too many entries"
        );
        let mut torn = raw.clone();
        torn[SUMMARY_HEADER + 5 * 16 + 3] ^= 0x80;
        assert_eq!(Summary::decode(&torn, 42, 7, 1, 62), None, "torn");
        assert_eq!(Summary::decode(&raw[..100], 42, 7, 1, 62), None, "short");
        let too_many = Summary {
            entries: vec![Entry { lbn: 0, stamp: 0 }; 300],
            ..s
        };
        assert!(too_many.encode(42, &mut raw).is_err());
    }

    #[test]
    fn a_carried_entries_crc_encodes_what_a_fresh_one_does() {
        let entries: Vec<Entry> = (0..300)
            .map(|i| Entry {
                lbn: i * 7 + 1,
                stamp: 1000 + i,
            })
            .collect();
        let mut carried = EntriesCrc::default();
        let (mut a, mut b) = (vec![0u8; 8192], vec![0u8; 8192]);
        // Commits of a growing segment, then of a reused one (fewer).
        for n in [1, 2, 60, 61, 299, 300, 5] {
            Summary::encode_parts(3, 1, n as u64, &entries[..n], 42, &mut carried, &mut a).unwrap();
            let fresh = Summary {
                segment: 3,
                area: 1,
                seq: n as u64,
                entries: entries[..n].to_vec(),
            };
            fresh.encode(42, &mut b).unwrap();
            assert_eq!(a, b, "{n} entries");
            assert_eq!(Summary::decode(&a, 42, 3, 1, 300), Some(fresh));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut raw = vec![0u8; 4096];
        for round in 0..2000 {
            for b in raw.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if round % 2 == 0 {
                raw[..8].copy_from_slice(&SUMMARY_MAGIC.to_le_bytes());
                raw[8..16].copy_from_slice(&5u64.to_le_bytes());
            }
            assert_eq!(Summary::decode(&raw, 5, 0, 0, 62), None);
            let _ = Superblock::decode(&raw, "d", 4096, 4096);
        }
    }
}
