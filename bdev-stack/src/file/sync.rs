//! The synchronous engine: `submit` queues, `poll` performs each request
//! with `pread`/`pwrite`/`fdatasync`, one at a time. Its [`Zeroing`] also
//! serves the io_uring engine for write zeroes and deallocation.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::buffer::{DmaMemory, HostBuffer};
use crate::device::{
    Channel, Completion, DeviceId, DeviceInfo, IoOp, IoRequest, NotSync, SubmitError,
};
use crate::error::{BdevError, IoErrorKind};

/// Write zeroes and deallocation of a file, performed synchronously.
pub(super) struct Zeroing {
    /// Source of write zeroes: aligned, so it also works under O_DIRECT.
    zeroes: HostBuffer,
}

impl Zeroing {
    pub(super) fn new(info: &DeviceInfo) -> Result<Zeroing, BdevError> {
        let bytes = (info.max_transfer_blocks * u64::from(info.block_size)) as usize;
        Ok(Zeroing {
            zeroes: HostBuffer::new(bytes)?,
        })
    }

    /// Performs a write zeroes or a deallocation of `len` bytes at
    /// `offset`.
    pub(super) fn perform(
        &mut self,
        fd: i32,
        op: IoOp,
        offset: u64,
        len: u64,
    ) -> Result<(), IoErrorKind> {
        if op == IoOp::Deallocate {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fd is open; fallocate only reads its arguments.
            let rc = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
            if rc == 0 {
                return Ok(());
            }
            // Not every file system punches holes: zero instead.
        }
        let zeroes = self.zeroes.dma_slice();
        let mut done = 0;
        while done < len {
            let run = (len - done).min(zeroes.len() as u64);
            transfer(fd, zeroes.host_ptr(), run, offset + done, Direction::Write)?;
            done += run;
        }
        Ok(())
    }
}

/// The synchronous channel.
pub(super) struct SyncChannel {
    info: DeviceInfo,
    file: Arc<File>,
    pending: VecDeque<IoRequest>,
    depth: usize,
    zeroing: Zeroing,
    _not_sync: NotSync,
}

impl SyncChannel {
    pub(super) fn new(
        info: DeviceInfo,
        file: Arc<File>,
        depth: usize,
    ) -> Result<SyncChannel, BdevError> {
        Ok(SyncChannel {
            zeroing: Zeroing::new(&info)?,
            info,
            file,
            pending: VecDeque::with_capacity(depth),
            depth,
            _not_sync: NotSync::default(),
        })
    }

    fn perform(&mut self, req: &IoRequest) -> Result<(), IoErrorKind> {
        let fd = self.file.as_raw_fd();
        let bs = u64::from(self.info.block_size);
        let offset = req.lba * bs;
        let len = req.blocks * bs;
        match req.op {
            IoOp::Flush => {
                // SAFETY: fd is open for the life of self.file.
                check(unsafe { libc::fdatasync(fd) } as isize)?;
                Ok(())
            }
            IoOp::Read => transfer(fd, req.buf.host_ptr(), len, offset, Direction::Read),
            IoOp::Write => transfer(fd, req.buf.host_ptr(), len, offset, Direction::Write),
            IoOp::Deallocate | IoOp::WriteZeroes => self.zeroing.perform(fd, req.op, offset, len),
        }
    }
}

enum Direction {
    Read,
    Write,
}

fn check(rc: isize) -> Result<usize, IoErrorKind> {
    if rc < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(IoErrorKind::Os { errno });
    }
    Ok(rc as usize)
}

/// pread/pwrite the whole run, continuing after short transfers.
fn transfer(
    fd: i32,
    ptr: *mut u8,
    len: u64,
    offset: u64,
    direction: Direction,
) -> Result<(), IoErrorKind> {
    let mut done = 0u64;
    while done < len {
        let remaining = (len - done) as usize;
        let at = (offset + done) as i64;
        // SAFETY: ptr..ptr+len is the request's buffer (validated length),
        // which the submit contract gives this channel until completion.
        let rc = unsafe {
            let p = ptr.add(done as usize);
            match direction {
                Direction::Read => libc::pread(fd, p.cast(), remaining, at),
                Direction::Write => libc::pwrite(fd, p.cast(), remaining, at),
            }
        };
        let n = check(rc)?;
        if n == 0 {
            // Past the end of a file that shrank under us: no data there.
            return Err(IoErrorKind::Medium);
        }
        done += n as u64;
    }
    Ok(())
}

impl Channel for SyncChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.pending.len() >= self.depth {
            return Err(SubmitError::Busy);
        }
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        self.pending.push_back(req);
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(req) = self.pending.pop_front() else {
                break;
            };
            let result = self
                .perform(&req)
                .map_err(|kind| req.error(self.info.id, kind));
            out[n] = Completion {
                ctx: req.ctx,
                result,
            };
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.pending.len()
    }
}
