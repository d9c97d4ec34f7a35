//! Helpers shared by the integration tests: synchronous I/O through the
//! safe channel, and reading a leaf fragment back directly.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use bdev_stack::{BlockDevice, HostBuffer, IoError, IoOp, OwnedChannel};

/// Synchronous I/O on a device, for tests.
pub struct SyncIo {
    pub ch: OwnedChannel<HostBuffer>,
    pub block_size: usize,
    pub max_blocks: u64,
}

impl SyncIo {
    pub fn open(device: &dyn BlockDevice) -> SyncIo {
        SyncIo {
            ch: OwnedChannel::open(device, 8).expect("open channel"),
            block_size: device.info().block_size as usize,
            max_blocks: device.info().max_transfer_blocks,
        }
    }

    fn wait(&mut self) -> (Result<(), IoError>, Option<HostBuffer>) {
        let mut result = None;
        while result.is_none() {
            self.ch.poll(1, |_, r, buf| result = Some((r, buf)));
        }
        result.expect("loop ends with a result")
    }

    pub fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), IoError> {
        let blocks = (data.len() / self.block_size) as u64;
        let mut done = 0;
        while done < blocks {
            let run = (blocks - done).min(self.max_blocks);
            let bytes = &data[done as usize * self.block_size..][..run as usize * self.block_size];
            let mut buf = HostBuffer::new(bytes.len()).expect("buffer");
            buf.as_mut_slice().copy_from_slice(bytes);
            self.ch
                .write(lba + done, run, buf, 0)
                .map_err(|r| r.error)
                .expect("submit");
            self.wait().0?;
            done += run;
        }
        Ok(())
    }

    pub fn read(&mut self, lba: u64, blocks: u64) -> Result<Vec<u8>, IoError> {
        let mut out = Vec::with_capacity(blocks as usize * self.block_size);
        let mut done = 0;
        while done < blocks {
            let run = (blocks - done).min(self.max_blocks);
            let buf = HostBuffer::new(run as usize * self.block_size).expect("buffer");
            self.ch
                .read(lba + done, run, buf, 0)
                .map_err(|r| r.error)
                .expect("submit");
            let (result, buf) = self.wait();
            result?;
            out.extend_from_slice(buf.expect("buffer back").as_slice());
            done += run;
        }
        Ok(out)
    }

    pub fn op(&mut self, op: IoOp, lba: u64, blocks: u64) -> Result<(), IoError> {
        self.ch
            .submit(op, lba, blocks, None, 0)
            .map_err(|r| r.error)
            .expect("submit");
        self.wait().0
    }
}

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
