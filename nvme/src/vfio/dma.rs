//! DMA memory: anonymous, pinned, IOMMU-mapped buffers with an RAII owner.
//!
//! The device may read or write a [`DmaBuffer`] at any time while it is
//! mapped, so the buffer never hands out Rust references to its bytes: all
//! access is through volatile copies and volatile typed reads and writes
//! (see the safety contract of `VfioContainer::vfio_dma_map`).
//!
//! Like a `Cell`, a buffer is written through `&self` and is `Send` but not
//! `Sync`: one thread at a time uses it (the SPDK model, where a buffer
//! belongs to the thread that owns the queue pair), so CPU-side accesses
//! never race each other. Ordering against the device (fences before
//! doorbells) is the queue code's job.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use memmap2::{MmapOptions, MmapRaw};
use vfio_ioctls::VfioContainer;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::iova::IovaAllocator;
use super::{sys, vfio_io_error};
use crate::error::{Error, Result};

/// 2 MiB, the x86 huge page size.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;
/// 4 KiB, the base page size.
pub const BASE_PAGE_SIZE: usize = 4096;

/// The IOMMU domain (VFIO container) and its IOVA allocator, shared by the
/// device and every buffer mapped into it. Buffers hold it by `Arc`, so
/// they can be unmapped on drop even if they outlive the device handle.
pub(crate) struct DmaContext {
    container: Arc<VfioContainer>,
    iova: Mutex<IovaAllocator>,
    /// Set when the device handle is closing: its group leaves the
    /// container, and the kernel drops every mapping with it.
    detached: AtomicBool,
}

impl DmaContext {
    pub(crate) fn new(container: Arc<VfioContainer>, iova: IovaAllocator) -> DmaContext {
        DmaContext {
            container,
            iova: Mutex::new(iova),
            detached: AtomicBool::new(false),
        }
    }

    /// Records that the device is going away: the kernel tears down the
    /// IOMMU domain with the last group, so buffers dropped later have
    /// nothing left to unmap.
    pub(crate) fn mark_detached(&self) {
        self.detached.store(true, Ordering::Release);
    }

    /// The allocator. Its operations leave it consistent even if a holder
    /// panicked, so a poisoned lock is simply taken over.
    pub(crate) fn iova(&self) -> MutexGuard<'_, IovaAllocator> {
        self.iova.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a buffer of `len` bytes is worth huge pages: whole multiples of
/// 2 MiB, or large enough (≥ 8 MiB) that rounding up wastes under 25 %.
fn wants_huge_pages(len: usize) -> bool {
    len.is_multiple_of(HUGE_PAGE_SIZE) || len >= 4 * HUGE_PAGE_SIZE
}

/// Anonymous, zeroed, prefaulted memory of at least `len` bytes, on 2 MiB
/// huge pages when [`wants_huge_pages`] and the system has some free, else on
/// 4 KiB pages. Returns the mapping and its page size.
fn anon_memory(len: usize) -> Result<(MmapRaw, usize)> {
    if wants_huge_pages(len)
        && let Some(huge_len) = len.checked_next_multiple_of(HUGE_PAGE_SIZE)
    {
        match MmapOptions::new()
            .len(huge_len)
            .huge(Some(21))
            .populate()
            .map_anon()
        {
            Ok(m) => return Ok((MmapRaw::from(m), HUGE_PAGE_SIZE)),
            Err(e) => tracing::debug!(
                len,
                error = %e,
                "no 2 MiB huge pages for DMA buffer; using 4 KiB pages"
            ),
        }
    }
    let small_len = len
        .checked_next_multiple_of(BASE_PAGE_SIZE)
        .ok_or(Error::InvalidArgument("DMA buffer length overflows"))?;
    let m = MmapOptions::new()
        .len(small_len)
        .populate()
        .map_anon()
        .map_err(|source| Error::DmaAlloc { len, source })?;
    Ok((MmapRaw::from(m), BASE_PAGE_SIZE))
}

/// A DMA buffer: memory owned by the library, pinned, and mapped into the
/// device's IOMMU domain at [`DmaBuffer::iova`]. Unmapped from the IOMMU
/// and freed on drop.
///
/// `Send`, not `Sync` (writes go through `&self`, like a `Cell`):
///
/// ```compile_fail
/// fn sync<T: Sync>() {}
/// sync::<nvme::vfio::DmaBuffer>();
/// ```
pub struct DmaBuffer {
    map: MmapRaw,
    len: usize,
    page_size: usize,
    iova: u64,
    ctx: Arc<DmaContext>,
    /// Writes go through `&self`: `!Sync` keeps them on one thread.
    _not_sync: PhantomData<Cell<()>>,
}

impl DmaBuffer {
    pub(crate) fn new(ctx: &Arc<DmaContext>, len: usize) -> Result<DmaBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument("DMA buffer of zero bytes"));
        }
        let (map, page_size) = anon_memory(len)?;
        let mapped = map.len();
        let base = map.as_mut_ptr();

        // VFIO pins the pages anyway; locking also keeps them out of swap
        // accounting surprises. Failure (RLIMIT_MEMLOCK) is tolerable.
        if let Err(e) = map.lock() {
            tracing::warn!(len = mapped, error = %e, "mlock of DMA buffer failed; continuing");
        }
        if let Err(e) = sys::dontfork(base, mapped) {
            tracing::warn!(len = mapped, error = %e, "MADV_DONTFORK on DMA buffer failed");
        }

        let granule = ctx.iova().granule();
        if !(base as u64).is_multiple_of(granule) || !(mapped as u64).is_multiple_of(granule) {
            return Err(Error::InvalidArgument(
                "IOMMU page size is larger than the DMA buffer's page size",
            ));
        }
        let iova = ctx.iova().alloc(mapped as u64, page_size as u64)?;

        // SAFETY: `base..base + mapped` is an anonymous mapping this buffer
        // owns exclusively (`map`), alive until after the unmap in `drop`.
        // No Rust reference to it exists or is ever created: every access
        // goes through raw pointers with volatile operations, as the
        // contract of `vfio_dma_map` requires.
        let mapped_ok = unsafe { ctx.container.vfio_dma_map(iova, mapped, base) };
        if let Err(e) = mapped_ok {
            ctx.iova().free(iova);
            let source = vfio_io_error(e);
            if source.raw_os_error() == Some(libc::ENOMEM) {
                return Err(Error::MemlockLimit {
                    len: mapped,
                    source,
                });
            }
            return Err(Error::Vfio {
                op: "VFIO_IOMMU_MAP_DMA",
                target: format!("IOVA {iova:#x}+{mapped:#x}"),
                source,
            });
        }
        tracing::debug!(iova, len, mapped, page_size, "DMA buffer mapped");
        Ok(DmaBuffer {
            map,
            len,
            page_size,
            iova,
            ctx: Arc::clone(ctx),
            _not_sync: PhantomData,
        })
    }

    /// The I/O virtual address of byte 0, for the device.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The IOVA of byte `offset`, or `None` past the end.
    pub fn iova_at(&self, offset: usize) -> Option<u64> {
        (offset < self.len).then(|| self.iova + offset as u64)
    }

    /// Usable length in bytes (what was asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length buffers cannot be allocated.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Length actually mapped (rounded up to [`DmaBuffer::page_size`]).
    pub fn mapped_len(&self) -> usize {
        self.map.len()
    }

    /// Page size backing the buffer: 4 KiB or 2 MiB. Physically contiguous
    /// runs are at least this long and aligned to it.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Raw pointer to byte 0. Only raw/volatile access is sound: never make
    /// a reference to this memory, the device may write it at any time.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset ≤ end ≤ len ≤ mapped length, so the result
                // stays inside (or one past) the mapping.
                Ok(unsafe { self.as_ptr().add(offset) })
            }
            _ => Err(Error::DmaOutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    fn check_aligned<T>(&self, offset: usize) -> Result<*mut u8> {
        let p = self.check(offset, size_of::<T>())?;
        // The mapping is page-aligned, so offset alignment is address alignment.
        if !offset.is_multiple_of(align_of::<T>()) {
            return Err(Error::DmaMisaligned {
                offset,
                align: align_of::<T>(),
            });
        }
        Ok(p)
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer (volatile).
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = self.check(offset, dst.len())?;
        // SAFETY: `check` proved `src..src + dst.len()` is inside the mapping;
        // `dst` is a distinct, exclusively borrowed slice of that length.
        unsafe { volatile_copy_from(src, dst) };
        Ok(())
    }

    /// Copies `src` into the buffer at `offset` (volatile).
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
        let dst = self.check(offset, src.len())?;
        // SAFETY: `check` proved `dst..dst + src.len()` is inside the mapping;
        // the buffer is `!Sync`, so no other thread accesses it meanwhile,
        // and `src` (ordinary memory) cannot overlap the DMA mapping.
        unsafe { volatile_copy_to(src, dst) };
        Ok(())
    }

    /// Sets every usable byte to `byte` (volatile).
    pub fn fill(&self, byte: u8) {
        let p = self.as_ptr();
        let word = u64::from_ne_bytes([byte; 8]);
        let words = self.len / 8;
        for i in 0..words {
            // SAFETY: the mapping is page-aligned and `i * 8 + 8 ≤ len`, so
            // the u64 is aligned and in bounds; `!Sync` keeps it on one thread.
            unsafe { ptr::write_volatile(p.add(i * 8).cast::<u64>(), word) };
        }
        for i in words * 8..self.len {
            // SAFETY: `i < len`, in bounds.
            unsafe { ptr::write_volatile(p.add(i), byte) };
        }
    }

    /// Reads a `T` at `offset` (naturally aligned) with one volatile read.
    pub fn read<T: FromBytes>(&self, offset: usize) -> Result<T> {
        let p = self.check_aligned::<T>(offset)?;
        // SAFETY: in bounds and aligned for `T` (checked above); `T:
        // FromBytes` makes any bit pattern the device left there a valid `T`.
        Ok(unsafe { ptr::read_volatile(p.cast::<T>()) })
    }

    /// Writes `value` at `offset` (naturally aligned) with one volatile write.
    pub fn write<T: IntoBytes + Immutable>(&self, offset: usize, value: T) -> Result<()> {
        let p = self.check_aligned::<T>(offset)?;
        // SAFETY: in bounds and aligned for `T` (checked above); `!Sync`
        // keeps CPU-side accesses on one thread; `T: IntoBytes` has no
        // padding, so the device reads initialized bytes only.
        unsafe { ptr::write_volatile(p.cast::<T>(), value) };
        Ok(())
    }

    /// Reads a native-endian `u32` at an aligned `offset`.
    pub fn read_u32(&self, offset: usize) -> Result<u32> {
        self.read(offset)
    }

    /// Writes a native-endian `u32` at an aligned `offset`.
    pub fn write_u32(&self, offset: usize, value: u32) -> Result<()> {
        self.write(offset, value)
    }

    /// Reads a native-endian `u64` at an aligned `offset`.
    pub fn read_u64(&self, offset: usize) -> Result<u64> {
        self.read(offset)
    }

    /// Writes a native-endian `u64` at an aligned `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) -> Result<()> {
        self.write(offset, value)
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let mapped = self.map.len();
        if self.ctx.detached.load(Ordering::Acquire) {
            // The domain died with the device: mappings and pins are gone.
            tracing::debug!(iova = self.iova, "DMA buffer dropped after its device");
            return;
        }
        match self.ctx.container.vfio_dma_unmap(self.iova, mapped) {
            Ok(()) => {
                if self.ctx.iova().free(self.iova).is_none() {
                    tracing::warn!(iova = self.iova, "DMA buffer's IOVA was not allocated");
                }
            }
            Err(e) => {
                // The IOVA stays reserved: reusing it would make the next map
                // fail (or alias). The pages stay pinned by the kernel until
                // the container goes away, so freeing our mapping below is
                // still memory-safe.
                tracing::warn!(
                    iova = self.iova,
                    len = mapped,
                    error = %e,
                    "VFIO_IOMMU_UNMAP_DMA failed; leaking the IOVA range"
                );
            }
        }
        // `self.map` is munmap'ed when the fields drop, after the unmap.
    }
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("mapped_len", &self.map.len())
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// Volatile copy from device-shared memory into `dst`, 8 bytes at a time
/// where `src` is aligned.
///
/// # Safety
///
/// `src..src + dst.len()` must be valid for reads and not overlap `dst`.
pub(crate) unsafe fn volatile_copy_from(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let head = src.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: i < n, in bounds per the caller's contract.
        dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: `src + i` is 8-aligned (past the head) and `i + 8 ≤ n`.
        let w = unsafe { ptr::read_volatile(src.add(i).cast::<u64>()) };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        dst[i] = unsafe { ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Volatile copy of `src` into device-shared memory, 8 bytes at a time
/// where `dst` is aligned.
///
/// # Safety
///
/// `dst..dst + src.len()` must be valid for writes and not overlap `src`.
pub(crate) unsafe fn volatile_copy_to(src: &[u8], dst: *mut u8) {
    let n = src.len();
    let head = dst.align_offset(8).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: i < n, in bounds per the caller's contract.
        unsafe { ptr::write_volatile(dst.add(i), src[i]) };
        i += 1;
    }
    while i + 8 <= n {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        // SAFETY: `dst + i` is 8-aligned (past the head) and `i + 8 ≤ n`.
        unsafe { ptr::write_volatile(dst.add(i).cast::<u64>(), u64::from_ne_bytes(w)) };
        i += 8;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { ptr::write_volatile(dst.add(i), src[i]) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_policy() {
        assert!(!wants_huge_pages(4096));
        assert!(!wants_huge_pages(HUGE_PAGE_SIZE + 4096));
        assert!(wants_huge_pages(HUGE_PAGE_SIZE));
        assert!(wants_huge_pages(3 * HUGE_PAGE_SIZE));
        assert!(wants_huge_pages(4 * HUGE_PAGE_SIZE + 1));
    }

    #[test]
    fn anon_memory_rounds_up() {
        let (m, page) = anon_memory(100).expect("4 KiB pages");
        assert_eq!((m.len(), page), (4096, BASE_PAGE_SIZE));
        // Huge pages may or may not be available here; either way it works.
        let (m, page) = anon_memory(HUGE_PAGE_SIZE).expect("memory");
        assert_eq!(m.len() % page, 0);
        assert!(m.len() >= HUGE_PAGE_SIZE);
    }

    #[test]
    fn volatile_copies_all_alignments() {
        let mut backing = vec![0u64; 16];
        let base = backing.as_mut_ptr().cast::<u8>();
        let pattern: Vec<u8> = (0u8..100).collect();
        for off in 0..9 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 64, 100 - 9] {
                // SAFETY: off + len ≤ 9 + 91 = 100 ≤ 128 bytes of `backing`;
                // `pattern` and `out` are separate allocations.
                unsafe { volatile_copy_to(&pattern[..len], base.add(off)) };
                let mut out = vec![0xAAu8; len];
                // SAFETY: as above.
                unsafe { volatile_copy_from(base.add(off), &mut out) };
                assert_eq!(out, pattern[..len], "off {off} len {len}");
            }
        }
    }
}
