//! I/O buffers: library-owned, page-aligned memory described by host
//! pointer, length and, when a DMA context mapped it, a device address:
//! the IOVA and the context it is valid in ([`DmaAddress`]).
//!
//! [`DmaSlice`] is the descriptor every channel takes: it is what an NVMe
//! leaf turns into PRPs (from [`DmaSlice::iova`], after checking
//! [`DmaSlice::dma_context`] is its controller's) and what a SCSI or file
//! leaf hands to `SG_IO`/`pread` for direct I/O (from [`DmaSlice::host_ptr`]).
//! It is `Copy` and carries no lifetime, so splitting a request into
//! children is pointer arithmetic; the promise that the memory lives and is
//! not touched while a device owns it is made once, by the caller of
//! [`crate::Channel::submit`], or by the type system in
//! [`crate::OwnedChannel`].
//!
//! [`DmaMemory`] is the small trait a driver's DMA buffer implements to be
//! usable here; [`HostBuffer`] is the host-memory one (no IOVA) that memory
//! and file leaves need.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

pub use nvme::DmaContextId;

use crate::error::BdevError;

/// Alignment of [`HostBuffer`]s: a page, which satisfies `O_DIRECT` on every
/// Linux filesystem and NVMe's PRP rules for the first entry.
pub const PAGE_SIZE: usize = 4096;

/// Where a device finds memory: an IOVA, and the DMA context (IOMMU
/// domain, or the emulators' table) it means something in. The same IOVA
/// in another context is another buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAddress {
    /// The I/O virtual address of the first byte.
    pub iova: u64,
    /// The context that maps it.
    pub context: DmaContextId,
}

/// Describes a run of I/O memory: host pointer, length and optional device
/// address ([`DmaAddress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSlice {
    ptr: NonNull<u8>,
    len: usize,
    dma: Option<DmaAddress>,
}

// The I/O path copies slices around by value: keep one at four words (the
// context id's niche keeps the `Option` free).
const _: () = assert!(std::mem::size_of::<DmaSlice>() == 32);

// SAFETY: a DmaSlice is a description (address, length), not access. Whoever
// dereferences it does so under the contract of `Channel::submit`, which
// holds whichever thread the request travels to.
unsafe impl Send for DmaSlice {}

impl DmaSlice {
    /// The descriptor for operations that move no data (flush, write
    /// zeroes, deallocate).
    pub const EMPTY: DmaSlice = DmaSlice {
        ptr: NonNull::dangling(),
        len: 0,
        dma: None,
    };

    /// Describes `len` bytes at `ptr`, mapped for devices at `dma` if given.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be one allocation owned by the library's buffer
    /// type (not caller stack or heap a device must never see), and `dma`,
    /// when given, must map exactly that memory in that context.
    pub unsafe fn from_raw_parts(
        ptr: NonNull<u8>,
        len: usize,
        dma: Option<DmaAddress>,
    ) -> DmaSlice {
        DmaSlice { ptr, len, dma }
    }

    /// Host address of the first byte.
    pub fn host_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length slice.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device address of the first byte, when the memory is DMA-mapped.
    /// Valid only for devices of [`DmaSlice::dma_context`].
    pub fn iova(&self) -> Option<u64> {
        self.dma.map(|d| d.iova)
    }

    /// The DMA context the IOVA belongs to, when the memory is DMA-mapped.
    pub fn dma_context(&self) -> Option<DmaContextId> {
        self.dma.map(|d| d.context)
    }

    /// IOVA and context together.
    pub fn dma_address(&self) -> Option<DmaAddress> {
        self.dma
    }

    /// The sub-run `[offset, offset + len)`, or `None` if it does not fit.
    pub fn sub(&self, offset: usize, len: usize) -> Option<DmaSlice> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset <= self.len, so the result stays inside (or one
        // past the end of) the same allocation, and is therefore non-null.
        let ptr = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset)) };
        Some(DmaSlice {
            ptr,
            len,
            dma: self.dma.map(|d| DmaAddress {
                iova: d.iova + offset as u64,
                context: d.context,
            }),
        })
    }
}

/// Library-owned I/O memory that a channel can read from or write to.
///
/// # Safety
/// Implementors promise that [`DmaMemory::dma_slice`] describes memory they
/// own for as long as they live, page-aligned, that is not freed or moved
/// while the value exists, and whose IOVA (if any) maps exactly that memory.
pub unsafe trait DmaMemory: Send {
    /// Describes the whole buffer.
    fn dma_slice(&mut self) -> DmaSlice;

    /// Copies `src` into the buffer at byte `offset`.
    ///
    /// Errors: [`BdevError::InvalidParameter`] when it does not fit.
    fn fill_from(&mut self, offset: usize, src: &[u8]) -> Result<(), BdevError> {
        let slice = self.dma_slice();
        let dst = slice
            .sub(offset, src.len())
            .ok_or_else(|| out_of_buffer(offset, src.len(), slice.len()))?;
        // SAFETY: the implementor owns `slice`'s memory for as long as it
        // lives; `&mut self` means no request holds it (a channel owns a
        // buffer while the device does), and `dst` lies inside it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.host_ptr(), src.len()) };
        Ok(())
    }

    /// Copies bytes of the buffer from `offset` into `dst`.
    ///
    /// Errors: [`BdevError::InvalidParameter`] when it does not fit.
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), BdevError> {
        let slice = self.dma_slice();
        let src = slice
            .sub(offset, dst.len())
            .ok_or_else(|| out_of_buffer(offset, dst.len(), slice.len()))?;
        // SAFETY: as in `fill_from`: owned memory no device is using, and
        // `src` lies inside it.
        unsafe { std::ptr::copy_nonoverlapping(src.host_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

fn out_of_buffer(offset: usize, len: usize, buffer: usize) -> BdevError {
    BdevError::InvalidParameter {
        device: "I/O buffer".into(),
        parameter: "range",
        reason: format!("{len} bytes at offset {offset} do not fit a {buffer}-byte buffer"),
    }
}

/// Page-aligned, zero-initialised host memory, without a device mapping.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: HostBuffer uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only hands out `&[u8]`, like a Box<[u8]>.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Allocates `len` zeroed bytes aligned to [`PAGE_SIZE`].
    pub fn new(len: usize) -> Result<HostBuffer, BdevError> {
        let alloc_len = len.max(1).next_multiple_of(PAGE_SIZE);
        let layout = Layout::from_size_align(alloc_len, PAGE_SIZE)
            .map_err(|_| BdevError::OutOfMemory { bytes: len })?;
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(BdevError::OutOfMemory { bytes: len })?;
        Ok(HostBuffer { ptr, len, layout })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes. Not to be called while a device owns the buffer, which the
    /// borrow rules ensure when it was submitted through
    /// [`crate::OwnedChannel`].
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len initialised
        // bytes, borrowed shared for the lifetime of &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

// SAFETY: the allocation is owned, page-aligned and lives until drop.
unsafe impl DmaMemory for HostBuffer {
    fn dma_slice(&mut self) -> DmaSlice {
        DmaSlice {
            ptr: self.ptr,
            len: self.len,
            dma: None,
        }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .finish()
    }
}

/// Where the library gets I/O memory for its own requests (mirror resync,
/// copy bounce buffers). A driver's DMA context implements it so that
/// buffers carry IOVAs its devices accept; [`HostAllocator`] gives host
/// memory, enough for memory and file leaves.
pub trait DmaAllocator: Send + Sync {
    /// `len` bytes of page-aligned I/O memory.
    fn allocate(&self, len: usize) -> Result<Box<dyn DmaMemory>, BdevError>;

    /// The DMA context the buffers are mapped in; `None` for host memory
    /// without an IOVA.
    fn dma_context(&self) -> Option<DmaContextId>;
}

/// Allocates [`HostBuffer`]s.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostAllocator;

impl DmaAllocator for HostAllocator {
    fn allocate(&self, len: usize) -> Result<Box<dyn DmaMemory>, BdevError> {
        Ok(Box::new(HostBuffer::new(len)?))
    }

    fn dma_context(&self) -> Option<DmaContextId> {
        None
    }
}

// SAFETY: a Box moves the pointer, not the memory; the boxed value keeps
// its promise.
unsafe impl DmaMemory for Box<dyn DmaMemory> {
    fn dma_slice(&mut self) -> DmaSlice {
        (**self).dma_slice()
    }
}
