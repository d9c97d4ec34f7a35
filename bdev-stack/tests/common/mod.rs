//! Helpers shared by the integration tests: synchronous I/O through the
//! safe channel, and reading a leaf fragment back directly.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use bdev_stack::BlockDevice;

#[path = "../support/sync_io.rs"]
mod sync_io;
pub use sync_io::SyncIo;

/// Reads `blocks` blocks at `lba` of `device`.
pub fn read_device(device: &Arc<dyn BlockDevice>, lba: u64, blocks: u64) -> Vec<u8> {
    SyncIo::open(device.as_ref())
        .read(lba, blocks)
        .expect("read back")
}

/// A deterministic byte pattern for writes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
