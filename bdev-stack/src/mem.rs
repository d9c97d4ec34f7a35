//! The memory leaf: a sparse RAM disk. Chunks are allocated on first write
//! and read as zeroes until then, so a 64 GiB test device costs only what
//! is written. I/O happens during `submit` (a memory copy does not block)
//! and completes at the next `poll`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError};

/// Bytes per lazily allocated chunk.
const CHUNK_BYTES: u64 = 64 * 1024;

/// Largest transfer a memory device takes by default, in bytes (1 MiB, a
/// common NVMe MDTS).
pub const DEFAULT_MEM_MAX_TRANSFER_BYTES: u64 = 1 << 20;

/// Chunks by index; `None` reads as zeroes.
type ChunkTable = Mutex<Vec<Option<Box<[u8]>>>>;

/// A sparse memory block device.
pub struct MemDevice {
    info: DeviceInfo,
    chunks: Arc<ChunkTable>,
}

impl MemDevice {
    /// A device of `size_bytes` (a multiple of `block_size`) in blocks of
    /// `block_size` bytes, taking at most `max_transfer_bytes` per request.
    pub fn new(
        size_bytes: u64,
        block_size: u32,
        max_transfer_bytes: u64,
    ) -> Result<MemDevice, BdevError> {
        let id = DeviceId::fresh();
        let name = format!("mem{}", id.0);
        let invalid = |parameter, reason: String| BdevError::InvalidParameter {
            device: name.clone(),
            parameter,
            reason,
        };
        if block_size < 512 || !block_size.is_power_of_two() || u64::from(block_size) > CHUNK_BYTES
        {
            return Err(invalid(
                "block size",
                format!("{block_size} is not a power of two in 512..=65536"),
            ));
        }
        let bs = u64::from(block_size);
        if size_bytes == 0 || !size_bytes.is_multiple_of(bs) {
            return Err(invalid(
                "size",
                format!("{size_bytes} is not a non-zero multiple of {block_size}"),
            ));
        }
        if max_transfer_bytes < bs {
            return Err(invalid(
                "max transfer",
                format!("{max_transfer_bytes} is smaller than one block"),
            ));
        }
        let chunk_count = usize::try_from(size_bytes.div_ceil(CHUNK_BYTES))
            .map_err(|_| invalid("size", format!("{size_bytes} too large for this host")))?;
        let mut chunks = Vec::new();
        chunks.resize_with(chunk_count, || None);
        Ok(MemDevice {
            info: DeviceInfo {
                id,
                name,
                kind: DeviceKind::Memory,
                block_size,
                block_count: size_bytes / bs,
                max_transfer_blocks: max_transfer_bytes / bs,
                buf_align: 1,
                needs_iova: false,
                optimal_boundary_blocks: 0,
                ops: SupportedOps::all(),
                copy_offloads: Vec::new(),
            },
            chunks: Arc::new(Mutex::new(chunks)),
        })
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(MemChannel {
            info: self.info.clone(),
            chunks: Arc::clone(&self.chunks),
            done: VecDeque::with_capacity(depth.max(1)),
            depth: depth.max(1),
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
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

struct MemChannel {
    info: DeviceInfo,
    chunks: Arc<ChunkTable>,
    done: VecDeque<Completion>,
    depth: usize,
    _not_sync: NotSync,
}

/// What to do with each byte run of a request.
enum Transfer {
    /// Device to buffer.
    Read(*mut u8),
    /// Buffer to device.
    Write(*const u8),
    /// Zeroes to the device; `release` frees chunks it covers entirely.
    Zero { release: bool },
}

impl MemChannel {
    fn lock(&self) -> MutexGuard<'_, Vec<Option<Box<[u8]>>>> {
        // A panic elsewhere while holding the lock leaves bytes, not broken
        // invariants: the chunk table stays valid, so carry on.
        self.chunks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the request's bytes. Caller has validated the request.
    fn perform(&self, req: &IoRequest) {
        let transfer = match req.op {
            IoOp::Flush => return,
            IoOp::Read => Transfer::Read(req.buf.host_ptr()),
            IoOp::Write => Transfer::Write(req.buf.host_ptr()),
            IoOp::WriteZeroes => Transfer::Zero { release: false },
            // Deallocation gives whole chunks back, like a thin device.
            IoOp::Deallocate => Transfer::Zero { release: true },
        };
        let bs = u64::from(self.info.block_size);
        let mut offset = req.lba * bs;
        let end = offset + req.blocks * bs;
        let mut done = 0usize;
        let mut chunks = self.lock();
        while offset < end {
            let index = (offset / CHUNK_BYTES) as usize;
            let within = (offset % CHUNK_BYTES) as usize;
            let run = (CHUNK_BYTES - within as u64).min(end - offset) as usize;
            let Some(slot) = chunks.get_mut(index) else {
                return; // validated: unreachable, and harmless if not
            };
            match transfer {
                Transfer::Read(dst) => match slot {
                    // SAFETY: validate() checked the buffer holds the whole
                    // transfer; the submit contract makes it ours to write.
                    Some(chunk) => unsafe {
                        std::ptr::copy_nonoverlapping(chunk[within..].as_ptr(), dst.add(done), run)
                    },
                    // SAFETY: as above.
                    None => unsafe { std::ptr::write_bytes(dst.add(done), 0, run) },
                },
                Transfer::Write(src) => {
                    let chunk = slot
                        .get_or_insert_with(|| vec![0u8; CHUNK_BYTES as usize].into_boxed_slice());
                    // SAFETY: the buffer holds the whole transfer and the
                    // submit contract keeps it unchanged until completion.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.add(done),
                            chunk[within..].as_mut_ptr(),
                            run,
                        )
                    }
                }
                Transfer::Zero { release } => {
                    if release && run == CHUNK_BYTES as usize {
                        *slot = None;
                    } else if let Some(chunk) = slot {
                        chunk[within..within + run].fill(0);
                    }
                }
            }
            offset += run as u64;
            done += run;
        }
    }
}

impl Channel for MemChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.done.len() >= self.depth {
            return Err(SubmitError::Busy);
        }
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        self.perform(&req);
        self.done.push_back(Completion {
            ctx: req.ctx,
            result: Ok(()),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(completion) = self.done.pop_front() else {
                break;
            };
            out[n] = completion;
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}
