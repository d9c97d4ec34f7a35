//! Sparse byte storage.
//!
//! A device of any size costs nothing until it is written: bytes live in
//! 64 KiB chunks allocated on first write and kept in a map keyed by chunk
//! number, so memory follows what was written, not what was declared
//! (a `mem:4000t` device is as cheap to open as `mem:1m`). Reads of
//! unwritten bytes return zeroes; zeroing a whole chunk may give it back,
//! like deallocation on a thin device.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Bytes per chunk.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// An access past the end of the storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange {
    /// First byte asked for.
    pub offset: u64,
    /// Bytes asked for.
    pub len: u64,
    /// Bytes the storage holds.
    pub size: u64,
}

impl std::fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes at byte {} run past the end of {} bytes",
            self.len, self.offset, self.size
        )
    }
}

impl std::error::Error for OutOfRange {}

/// Chunk numbers are dense small integers: a multiplicative hash spreads
/// them over the table for a fraction of SipHash's cost, and nothing here
/// is keyed by untrusted input an attacker could aim at one bucket.
#[derive(Default)]
struct ChunkHasher(u64);

impl Hasher for ChunkHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Sparse storage of a fixed size.
pub struct SparseMemory {
    size: u64,
    chunks: HashMap<u64, Box<[u8]>, BuildHasherDefault<ChunkHasher>>,
}

impl SparseMemory {
    /// Storage of `size` bytes, all zero, none allocated.
    pub fn new(size: u64) -> SparseMemory {
        SparseMemory {
            size,
            chunks: HashMap::default(),
        }
    }

    /// Bytes the storage holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of chunks allocated so far.
    pub fn resident_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_BYTES as u64
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), OutOfRange> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Splits `offset..offset + len` at chunk boundaries: (chunk number,
    /// offset within it, bytes, bytes before this run).
    fn runs(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done == len {
                return None;
            }
            let at = offset + done as u64;
            let within = (at % CHUNK_BYTES as u64) as usize;
            let run = (CHUNK_BYTES - within).min(len - done);
            let item = (at / CHUNK_BYTES as u64, within, run, done);
            done += run;
            Some(item)
        })
    }

    /// Copies the bytes at `offset` into `dst`.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), OutOfRange> {
        self.check(offset, dst.len())?;
        for (chunk, within, run, done) in Self::runs(offset, dst.len()) {
            let out = &mut dst[done..done + run];
            match self.chunks.get(&chunk) {
                Some(bytes) => out.copy_from_slice(&bytes[within..within + run]),
                None => out.fill(0),
            }
        }
        Ok(())
    }

    /// Copies `src` to `offset`, allocating the chunks it touches.
    pub fn write(&mut self, offset: u64, src: &[u8]) -> Result<(), OutOfRange> {
        self.check(offset, src.len())?;
        for (chunk, within, run, done) in Self::runs(offset, src.len()) {
            let bytes = self
                .chunks
                .entry(chunk)
                .or_insert_with(|| vec![0u8; CHUNK_BYTES].into_boxed_slice());
            bytes[within..within + run].copy_from_slice(&src[done..done + run]);
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`. With `release`, chunks covered
    /// entirely are given back rather than filled (they read as zeroes
    /// either way); nothing is allocated.
    pub fn zero(&mut self, offset: u64, len: u64, release: bool) -> Result<(), OutOfRange> {
        let Ok(len) = usize::try_from(len) else {
            return Err(OutOfRange {
                offset,
                len,
                size: self.size,
            });
        };
        self.check(offset, len)?;
        for (chunk, within, run, _) in Self::runs(offset, len) {
            if release && run == CHUNK_BYTES {
                self.chunks.remove(&chunk);
            } else if let Some(bytes) = self.chunks.get_mut(&chunk) {
                bytes[within..within + run].fill(0);
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for SparseMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseMemory")
            .field("size", &self.size)
            .field("resident_bytes", &self.resident_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_huge_size_costs_nothing_until_written() {
        let mut memory = SparseMemory::new(4000 << 40);
        assert_eq!(memory.resident_bytes(), 0);
        let at = (4000u64 << 40) - 4096;
        memory.write(at, &[0xa5; 4096]).unwrap();
        let mut back = [0u8; 8192];
        memory.read(at - 4096, &mut back).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 0xa5));
        assert_eq!(memory.resident_bytes(), CHUNK_BYTES as u64);
    }

    #[test]
    fn accesses_past_the_end_are_refused_without_overflow() {
        let mut memory = SparseMemory::new(1 << 20);
        let mut buf = [0u8; 512];
        assert!(memory.read((1 << 20) - 511, &mut buf).is_err());
        assert!(memory.write(u64::MAX - 10, &buf).is_err());
        assert!(memory.zero(1, u64::MAX, false).is_err());
        assert_eq!(memory.resident_bytes(), 0);
        assert!(memory.read((1 << 20) - 512, &mut buf).is_ok());
    }

    #[test]
    fn release_gives_back_only_whole_chunks() {
        let mut memory = SparseMemory::new(4 * CHUNK_BYTES as u64);
        memory.write(0, &vec![1u8; 3 * CHUNK_BYTES]).unwrap();
        memory
            .zero(CHUNK_BYTES as u64 / 2, 2 * CHUNK_BYTES as u64, true)
            .unwrap();
        // The middle chunk went back; the two half-zeroed ones stay.
        assert_eq!(memory.resident_bytes(), 2 * CHUNK_BYTES as u64);
        let mut back = vec![9u8; 3 * CHUNK_BYTES];
        memory.read(0, &mut back).unwrap();
        let half = CHUNK_BYTES / 2;
        assert!(back[..half].iter().all(|&b| b == 1));
        assert!(back[half..half + 2 * CHUNK_BYTES].iter().all(|&b| b == 0));
        assert!(back[half + 2 * CHUNK_BYTES..].iter().all(|&b| b == 1));
    }

    proptest! {
        /// Against a flat model: any mix of writes and zeroes reads back
        /// the same.
        #[test]
        fn reads_match_a_flat_model(
            ops in proptest::collection::vec(
                (0u64..300_000, 1usize..140_000, any::<u8>(), 0u8..3), 1..20)
        ) {
            const SIZE: usize = 400_000;
            let mut memory = SparseMemory::new(SIZE as u64);
            let mut model = vec![0u8; SIZE];
            for (offset, len, byte, kind) in ops {
                let end = (offset as usize + len).min(SIZE);
                let len = end - offset as usize;
                match kind {
                    0 => {
                        memory.write(offset, &vec![byte; len]).unwrap();
                        model[offset as usize..end].fill(byte);
                    }
                    _ => {
                        memory.zero(offset, len as u64, kind == 2).unwrap();
                        model[offset as usize..end].fill(0);
                    }
                }
            }
            let mut back = vec![0u8; SIZE];
            memory.read(0, &mut back).unwrap();
            prop_assert!(back == model);
        }
    }
}
