//! The file leaf: a regular file or block device through `pread`/`pwrite`,
//! opened with `O_DIRECT` so the page cache is not in the path (like SPDK's
//! aio bdev).
//!
//! Execution: `submit` only queues; the I/O runs synchronously inside
//! `poll`. That keeps submission non-blocking as the execution model
//! requires, needs no threads, and keeps completion order simple; the price
//! is that `poll` blocks for the duration of the I/O it performs, and only
//! one request per channel is on the device at a time. io_uring would lift
//! both, and is where this leaf should go when file-backed performance
//! matters; for tests and bounce targets this is enough.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use crate::buffer::{DmaMemory, HostBuffer};
use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::identity::BackingId;

/// Largest transfer of a file device, in bytes.
pub const FILE_MAX_TRANSFER_BYTES: u64 = 1 << 20;

/// A file-backed block device.
pub struct FileDevice {
    info: DeviceInfo,
    file: Arc<File>,
    path: PathBuf,
    direct: bool,
    backing: BackingId,
}

impl FileDevice {
    /// Opens `path` with blocks of `block_size`. With `create_size`, the
    /// file is created if missing (exclusively, owner-only) and extended to
    /// that many bytes, and the path must not be a symbolic link; without,
    /// it must exist (a link to it is fine) and its size (rounded down to
    /// blocks) is the device's. Block devices are held exclusively: a
    /// mounted one is refused. Falls back to buffered I/O, with a warning,
    /// where the filesystem refuses `O_DIRECT` (tmpfs). See
    /// [`backing_store::open_file`].
    pub fn open(
        path: &Path,
        block_size: u32,
        create_size: Option<u64>,
    ) -> Result<FileDevice, BdevError> {
        let name = format!("file:{}", path.display());
        let os = |action, source| BdevError::Os {
            device: name.clone(),
            action,
            source,
        };
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(BdevError::InvalidParameter {
                device: name,
                parameter: "block size",
                reason: format!("{block_size} is not a power of two >= 512"),
            });
        }
        let opened = backing_store::open_file(path, create_size, true)
            .map_err(|e| os("open", e.into_io()))?;
        if !opened.direct {
            warn!(path = %path.display(), "O_DIRECT refused; using buffered I/O");
        }
        let (file, direct) = (opened.file, opened.direct);
        let bytes = device_bytes(&file).map_err(|e| os("size", e))?;
        let backing = file_backing(&file).map_err(|e| os("stat", e))?;
        let block_count = bytes / u64::from(block_size);
        if block_count == 0 {
            return Err(BdevError::InvalidParameter {
                device: name,
                parameter: "size",
                reason: format!("{bytes} bytes is less than one block"),
            });
        }
        Ok(FileDevice {
            info: DeviceInfo {
                id: DeviceId::fresh(),
                name,
                kind: DeviceKind::File,
                block_size,
                block_count,
                max_transfer_blocks: FILE_MAX_TRANSFER_BYTES / u64::from(block_size),
                // O_DIRECT needs buffers aligned to the logical block size.
                buf_align: if direct { block_size as usize } else { 1 },
                needs_iova: false,
                dma_context: None,
                optimal_boundary_blocks: 0,
                ops: SupportedOps::all(),
                copy_offloads: Vec::new(),
            },
            file: Arc::new(file),
            path: path.to_path_buf(),
            direct,
            backing,
        })
    }

    /// True when I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What the file's blocks are: a block device by its device number (two
/// nodes of one disk are one), anything else by file system and inode (two
/// paths or handles of one file are one).
fn file_backing(file: &File) -> std::io::Result<BackingId> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata()?;
    Ok(if meta.file_type().is_block_device() {
        BackingId::File {
            dev: meta.rdev(),
            ino: 0,
        }
    } else {
        BackingId::File {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    })
}

/// Size of a regular file or a block device.
fn device_bytes(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 as their length; seek to the end instead.
    use std::io::{Seek, SeekFrom};
    let mut handle = file;
    let end = handle.seek(SeekFrom::End(0))?;
    handle.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl BlockDevice for FileDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let depth = depth.max(1);
        let zero_bytes = (self.info.max_transfer_blocks * u64::from(self.info.block_size)) as usize;
        Ok(Box::new(FileChannel {
            info: self.info.clone(),
            file: Arc::clone(&self.file),
            pending: VecDeque::with_capacity(depth),
            depth,
            zeroes: HostBuffer::new(zero_bytes)?,
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn backing(&self) -> BackingId {
        self.backing.clone()
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        map_leaf(&self.info, lba, blocks, access, out)
    }
}

struct FileChannel {
    info: DeviceInfo,
    file: Arc<File>,
    pending: VecDeque<IoRequest>,
    depth: usize,
    /// Source of write zeroes: aligned, so it also works under O_DIRECT.
    zeroes: HostBuffer,
    _not_sync: NotSync,
}

impl FileChannel {
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
            IoOp::Deallocate => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                // SAFETY: fd is open; fallocate only reads its arguments.
                let rc = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
                if rc == 0 {
                    return Ok(());
                }
                // Not every filesystem punches holes: zero instead.
                self.write_zeroes(fd, offset, len)
            }
            IoOp::WriteZeroes => self.write_zeroes(fd, offset, len),
        }
    }

    fn write_zeroes(&mut self, fd: i32, offset: u64, len: u64) -> Result<(), IoErrorKind> {
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

impl Channel for FileChannel {
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
            let result = self.perform(&req).map_err(|kind| IoError {
                device: self.info.id,
                op: req.op,
                lba: req.lba,
                blocks: req.blocks,
                kind,
            });
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
