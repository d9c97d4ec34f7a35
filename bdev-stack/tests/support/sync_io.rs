//! Synchronous I/O through the safe channel, for the integration tests of
//! bdev-stack and of the copy engine (which includes this file by path).

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
