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

use crate::gc::GcError;

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

impl Geometry {
    /// The layout of a store with `segment_blocks`-block segments on a
    /// device of `block_count` blocks of `block_size` bytes, offering
    /// `logical_blocks` (checked by the caller against the reserve).
    pub fn new(
        block_size: u32,
        block_count: u64,
        segment_blocks: u64,
        logical_blocks: u64,
    ) -> Result<Geometry, GcError> {
        let bs = u64::from(block_size);
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(GcError::Config(format!(
                "{block_size}-byte blocks: the store needs a power of two of at least 512"
            )));
        }
        let summary_blocks_for =
            |slots: u64| (SUMMARY_HEADER as u64 + slots * SUMMARY_ENTRY as u64).div_ceil(bs);
        // The most data slots that leave room for two summary areas.
        let mut data_slots = segment_blocks.saturating_sub(2);
        while data_slots > 0 && data_slots + 2 * summary_blocks_for(data_slots) > segment_blocks {
            data_slots -= 1;
        }
        if data_slots < 2 {
            return Err(GcError::Config(format!(
                "{segment_blocks}-block segments leave no room for data beside two summaries"
            )));
        }
        let first_lba = (SUPER_BYTES as u64).div_ceil(bs).max(4096u64.div_ceil(bs));
        let segments = block_count.saturating_sub(first_lba) / segment_blocks;
        let segments = u32::try_from(segments).map_err(|_| {
            GcError::Config(format!("{segments} segments: more than the format counts"))
        })?;
        Ok(Geometry {
            block_size,
            segment_blocks,
            data_slots: u32::try_from(data_slots)
                .map_err(|_| GcError::Config(format!("{segment_blocks}-block segments")))?,
            summary_blocks: summary_blocks_for(data_slots),
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
        if stored_bs != block_size {
            return Err(bad(format!(
                "formatted with {stored_bs}-byte blocks, the device has {block_size}-byte blocks"
            )));
        }
        // The geometry must be the one this build derives, and fit.
        let expected = Geometry::new(block_size, block_count, segment_blocks, logical_blocks)
            .map_err(|e| bad(format!("superblock geometry: {e}")))?;
        let stored = Geometry {
            block_size,
            segment_blocks,
            data_slots,
            summary_blocks,
            segments,
            first_lba,
            logical_blocks,
        };
        if stored.data_slots != expected.data_slots
            || stored.summary_blocks != expected.summary_blocks
            || stored.first_lba != expected.first_lba
            || stored.segments > expected.segments
            || stored.segments == 0
            || logical_blocks >= stored.total_slots()
        {
            return Err(bad(format!(
                "superblock geometry {stored:?} does not fit the device ({block_count} blocks)"
            )));
        }
        Ok(Superblock {
            geometry: stored,
            store_id,
        })
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
            Err(GcError::NotAStore { .. })
        ));
        assert!(Superblock::decode(&raw, "d", 4096, 1000).is_err());
        raw[20] ^= 1;
        assert!(Superblock::decode(&raw, "d", 4096, 4096).is_err());
        assert!(Superblock::decode(&[0u8; 4096], "d", 4096, 4096).is_err());
        assert!(Superblock::decode(&[0u8; 10], "d", 4096, 4096).is_err());
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
