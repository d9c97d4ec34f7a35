//! Registered buffers for the io_uring leaves (`ng:`, `file:`): one
//! mapping per leaf, registered with the ring of every channel the leaf
//! opens after it exists, carved into page-aligned buffers. A request
//! whose buffer lies in it goes as a fixed-buffer command: the kernel maps
//! no pages per I/O.
//!
//! The mapping is registered as [`SEGMENT_BYTES`] segments, one fixed
//! buffer each, and no buffer crosses a segment: Linux 6.1 hands NVMe
//! passthrough the pages from the buffer's start to its fixed buffer's
//! end, and refuses (EINVAL) more than the queue's `max_segments` of them,
//! so one registration of the whole mapping works only for files.
//!
//! The mapping is made when someone first asks the leaf for buffers
//! ([`crate::BlockDevice::host_allocator`], which
//! [`crate::nvme_leaf::dma_allocator_for`] consults), so leaves nobody
//! allocates for pin no memory. Buffers beyond its room come from the
//! heap and go as ordinary commands; a ring that cannot register it (the
//! locked-memory limit) does the same.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use crate::buffer::{DmaAllocator, DmaContextId, DmaMemory, DmaSlice, HostBuffer, PAGE_SIZE};
use crate::error::BdevError;

/// Bytes of a leaf's registered memory.
pub const REGISTERED_BYTES: usize = 16 << 20;
/// Bytes of one registered segment (one fixed buffer): 64 pages, within
/// every NVMe queue's `max_segments`. Larger buffers come from the heap.
pub const SEGMENT_BYTES: usize = 256 << 10;

/// One mapping registered with a leaf's rings.
pub struct RegisteredMemory {
    base: NonNull<u8>,
    len: usize,
    /// Free byte ranges, sorted and coalesced.
    free: Mutex<Vec<Range<usize>>>,
}

// SAFETY: the mapping is owned and lives until drop; the free list is
// behind a mutex; buffers carved from it are owned by one holder each.
unsafe impl Send for RegisteredMemory {}
// SAFETY: as above.
unsafe impl Sync for RegisteredMemory {}

impl RegisteredMemory {
    /// Maps `len` bytes (rounded up to segments) of anonymous memory.
    pub fn new(len: usize) -> Result<Arc<RegisteredMemory>, BdevError> {
        let len = len.max(SEGMENT_BYTES).next_multiple_of(SEGMENT_BYTES);
        // SAFETY: an anonymous private mapping, no fixed address.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(BdevError::OutOfMemory { bytes: len });
        }
        let base = NonNull::new(raw.cast::<u8>()).ok_or(BdevError::OutOfMemory { bytes: len })?;
        Ok(Arc::new(RegisteredMemory {
            base,
            len,
            free: Mutex::new(std::iter::once(0..len).collect()),
        }))
    }

    /// The segments as `iovec`s, for `io_uring_register` (fixed buffer
    /// `i` is segment `i`).
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.len / SEGMENT_BYTES)
            .map(|i| libc::iovec {
                // SAFETY: inside the mapping.
                iov_base: unsafe { self.base.as_ptr().add(i * SEGMENT_BYTES) }.cast(),
                iov_len: SEGMENT_BYTES,
            })
            .collect()
    }

    /// The fixed buffer `slice` lies in, if it lies in one.
    pub(crate) fn fixed_index(&self, slice: &DmaSlice) -> Option<u16> {
        let offset = (slice.host_ptr() as usize).checked_sub(self.base.as_ptr() as usize)?;
        let end = offset.checked_add(slice.len())?;
        if slice.is_empty() || end > self.len {
            return None;
        }
        let segment = offset / SEGMENT_BYTES;
        (segment == (end - 1) / SEGMENT_BYTES)
            .then(|| u16::try_from(segment).ok())
            .flatten()
    }

    fn take(self: &Arc<RegisteredMemory>, len: usize) -> Option<RegisteredBuffer> {
        let want = len.max(1).next_multiple_of(PAGE_SIZE);
        if want > SEGMENT_BYTES {
            return None;
        }
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        // First fit that does not cross a segment.
        let (index, start) = free.iter().enumerate().find_map(|(i, r)| {
            let mut start = r.start;
            if start % SEGMENT_BYTES + want > SEGMENT_BYTES {
                start = start.next_multiple_of(SEGMENT_BYTES);
            }
            (start + want <= r.end).then_some((i, start))
        })?;
        let range = free.remove(index);
        if start + want < range.end {
            free.insert(index, start + want..range.end);
        }
        if range.start < start {
            free.insert(index, range.start..start);
        }
        drop(free);
        // SAFETY: `start..start + want` lies inside the mapping and was
        // free: nobody else holds it.
        let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(start)) };
        // Zeroed, as other I/O memory of the library.
        // SAFETY: as above; the range is ours.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, want) };
        Some(RegisteredBuffer {
            memory: Arc::clone(self),
            ptr,
            len,
            range: start..start + want,
        })
    }

    fn give_back(&self, range: Range<usize>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let at = free.partition_point(|r| r.start < range.start);
        free.insert(at, range);
        // Coalesce with the neighbours.
        if at + 1 < free.len() && free[at].end == free[at + 1].start {
            free[at].end = free[at + 1].end;
            free.remove(at + 1);
        }
        if at > 0 && free[at - 1].end == free[at].start {
            free[at - 1].end = free[at].end;
            free.remove(at);
        }
    }
}

impl Drop for RegisteredMemory {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length; every buffer holds an
        // Arc, and every ring that registered it holds one too, so nothing
        // uses it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A buffer carved from a [`RegisteredMemory`].
pub struct RegisteredBuffer {
    memory: Arc<RegisteredMemory>,
    ptr: NonNull<u8>,
    len: usize,
    range: Range<usize>,
}

// SAFETY: the buffer uniquely owns its range of the mapping.
unsafe impl Send for RegisteredBuffer {}

// SAFETY: page-aligned memory owned until drop, never moved.
unsafe impl DmaMemory for RegisteredBuffer {
    fn dma_slice(&mut self) -> DmaSlice {
        // SAFETY: the library's memory, exactly this buffer's bytes.
        unsafe { DmaSlice::from_raw_parts(self.ptr, self.len, None) }
    }
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        self.memory.give_back(self.range.clone());
    }
}

/// Buffers from a leaf's registered memory, from the heap when it is full.
pub struct RegisteredAllocator {
    memory: Arc<RegisteredMemory>,
}

impl RegisteredAllocator {
    pub(crate) fn new(memory: Arc<RegisteredMemory>) -> RegisteredAllocator {
        RegisteredAllocator { memory }
    }
}

impl DmaAllocator for RegisteredAllocator {
    fn allocate(&self, len: usize) -> Result<Box<dyn DmaMemory>, BdevError> {
        match self.memory.take(len) {
            Some(buffer) => Ok(Box::new(buffer)),
            None => Ok(Box::new(HostBuffer::new(len)?)),
        }
    }

    fn dma_context(&self) -> Option<DmaContextId> {
        None
    }
}

/// A leaf's registered memory, made on first use.
#[derive(Default)]
pub(crate) struct LazyRegistered(std::sync::OnceLock<Arc<RegisteredMemory>>);

impl LazyRegistered {
    /// The memory, mapped now if it was not.
    pub(crate) fn get_or_map(&self) -> Result<Arc<RegisteredMemory>, BdevError> {
        if let Some(memory) = self.0.get() {
            return Ok(Arc::clone(memory));
        }
        let memory = RegisteredMemory::new(REGISTERED_BYTES)?;
        Ok(Arc::clone(self.0.get_or_init(|| memory)))
    }

    /// The memory if it was mapped.
    pub(crate) fn get(&self) -> Option<Arc<RegisteredMemory>> {
        self.0.get().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_stay_within_a_segment_and_are_given_back_coalesced() {
        let memory = RegisteredMemory::new(2 * SEGMENT_BYTES).expect("map");
        assert_eq!(memory.iovecs().len(), 2);
        let alloc = RegisteredAllocator::new(Arc::clone(&memory));
        let mut a = alloc.allocate(SEGMENT_BYTES - PAGE_SIZE).expect("a");
        assert_eq!(memory.fixed_index(&a.dma_slice()), Some(0));
        // Two pages do not fit the page left in segment 0: segment 1.
        let mut b = alloc.allocate(2 * PAGE_SIZE).expect("b");
        assert_eq!(memory.fixed_index(&b.dma_slice()), Some(1));
        // One page does.
        let mut c = alloc.allocate(PAGE_SIZE).expect("c");
        assert_eq!(memory.fixed_index(&c.dma_slice()), Some(0));
        // Larger than a segment: from the heap.
        let mut big = alloc.allocate(SEGMENT_BYTES + PAGE_SIZE).expect("big");
        assert_eq!(memory.fixed_index(&big.dma_slice()), None);
        drop(a);
        drop(b);
        drop(c);
        // Coalesced back: a whole segment fits again, twice.
        let mut d = alloc.allocate(SEGMENT_BYTES).expect("d");
        let mut e = alloc.allocate(SEGMENT_BYTES).expect("e");
        assert!(memory.fixed_index(&d.dma_slice()).is_some());
        assert!(memory.fixed_index(&e.dma_slice()).is_some());
        let mut bytes = [1u8; 16];
        d.copy_to(0, &mut bytes).expect("read");
        assert_eq!(bytes, [0u8; 16], "zeroed");
    }
}
