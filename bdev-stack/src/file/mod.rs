//! The file leaf: a regular file or block device, opened with `O_DIRECT`
//! so the page cache is not in the path (like SPDK's aio and uring bdevs).
//!
//! Two engines run a channel's requests:
//! - [`FileEngine::Uring`]: each channel owns an io_uring ring; reads,
//!   writes and flushes are pushed on submission and handed to the kernel
//!   in one `io_uring_enter` at the next poll, many in flight, completions
//!   reaped without blocking ([`uring`]).
//! - [`FileEngine::Sync`]: `submit` queues and `poll` runs each request
//!   with `pread`/`pwrite`, one at a time, blocking for its duration
//!   ([`sync`]): where io_uring is refused (a container's seccomp filter,
//!   `kernel.io_uring_disabled`).
//!
//! [`FileEngine::Auto`], the default, takes io_uring where the kernel
//! gives it and falls back, with a warning, where it does not. Write
//! zeroes and deallocation run synchronously inside `poll` on either
//! engine (rare operations, not the data path); submission never blocks.

mod sync;
mod uring;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{cqueue, squeue};
use tracing::warn;

use crate::buffer::DmaAllocator;
use crate::device::{
    Access, BlockDevice, Channel, DeviceId, DeviceInfo, DeviceKind, LeafFragment, SupportedOps,
    map_leaf,
};
use crate::error::{BdevError, IoError};
use crate::identity::BackingId;
use crate::registered::{LazyRegistered, RegisteredAllocator};
use sync::SyncChannel;
use uring::UringChannel;

/// Largest transfer of a file device, in bytes.
pub const FILE_MAX_TRANSFER_BYTES: u64 = 1 << 20;

/// How a file leaf's channels run their requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileEngine {
    /// io_uring where the kernel gives it, else synchronous (with a
    /// warning).
    Auto,
    /// io_uring, or a typed error ([`BdevError::IoUringUnavailable`]).
    Uring,
    /// `pread`/`pwrite` inside `poll`, one request at a time.
    Sync,
}

/// A file-backed block device.
pub struct FileDevice {
    info: DeviceInfo,
    file: Arc<File>,
    path: PathBuf,
    direct: bool,
    backing: BackingId,
    /// The engine decided at open: `Uring` or `Sync`.
    engine: FileEngine,
    registered: LazyRegistered,
}

impl FileDevice {
    /// Opens `path` with blocks of `block_size`. With `create_size`, the
    /// file is created if missing (exclusively, owner-only) and extended to
    /// that many bytes, and the path must not be a symbolic link; without,
    /// it must exist (a link to it is fine) and its size (rounded down to
    /// blocks) is the device's. Block devices are held exclusively: a
    /// mounted one is refused. Falls back to buffered I/O, with a warning,
    /// where the filesystem refuses `O_DIRECT` (tmpfs). See
    /// [`backing_store::open_file`]. Channels run on io_uring where the
    /// kernel gives it ([`FileEngine::Auto`]).
    pub fn open(
        path: &Path,
        block_size: u32,
        create_size: Option<u64>,
    ) -> Result<FileDevice, BdevError> {
        FileDevice::open_with(path, block_size, create_size, FileEngine::Auto)
    }

    /// [`FileDevice::open`] with the engine chosen: [`FileEngine::Uring`]
    /// fails with [`BdevError::IoUringUnavailable`] (saying what to do)
    /// where the kernel refuses io_uring.
    pub fn open_with(
        path: &Path,
        block_size: u32,
        create_size: Option<u64>,
        engine: FileEngine,
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
        FileDevice {
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
            engine: FileEngine::Sync,
            registered: LazyRegistered::default(),
        }
        .with_engine(engine)
    }

    /// Settles the engine: io_uring is probed with a ring of one entry.
    fn with_engine(mut self, engine: FileEngine) -> Result<FileDevice, BdevError> {
        if engine == FileEngine::Sync {
            return Ok(self);
        }
        let probe =
            crate::uring::Ring::<squeue::Entry, cqueue::Entry>::new(&self.info.name, 1, 1, false);
        self.engine = match (probe, engine) {
            (Ok(_), _) => FileEngine::Uring,
            (Err(e), FileEngine::Uring) => return Err(e),
            (Err(e), _) => {
                warn!(device = %self.info.name, error = %crate::error_chain(&e), "io_uring refused; requests run one at a time with pread/pwrite");
                FileEngine::Sync
            }
        };
        Ok(self)
    }

    /// The engine the channels run on: [`FileEngine::Uring`] or
    /// [`FileEngine::Sync`].
    pub fn engine(&self) -> FileEngine {
        self.engine
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
        let (info, file) = (self.info.clone(), Arc::clone(&self.file));
        Ok(match self.engine {
            FileEngine::Sync => Box::new(SyncChannel::new(info, file, depth)?),
            _ => Box::new(UringChannel::new(info, file, depth, self.registered.get())?),
        })
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn host_allocator(&self) -> Option<Arc<dyn DmaAllocator>> {
        if self.engine != FileEngine::Uring {
            return None;
        }
        let memory = self.registered.get_or_map().ok()?;
        Some(Arc::new(RegisteredAllocator::new(memory)))
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
