//! DMA memory: one process-wide [`DmaContext`] per IOMMU domain, and
//! [`DmaBuffer`]s allocated from it.
//!
//! A context is the unit of DMA sharing: every controller opened in it (a
//! VFIO container with several groups attached, or in-process emulated
//! controllers) sees every buffer allocated from it at the same IOVA, so one
//! buffer's I/O may be striped over several controllers.
//!
//! - [`DmaContext::vfio`]: a VFIO container. Buffers are pinned and mapped
//!   into the IOMMU while at least one device is attached; when the first
//!   device (re)attaches, live buffers are (re)mapped.
//! - [`DmaContext::host`]: no IOMMU; IOVAs are handed out from a private
//!   space and only the in-process emulator resolves them, through
//!   [`DmaContext::translate`] (a sorted table of the context's allocations).
//!
//! The device may read or write a buffer at any time, so no Rust reference
//! to its bytes is ever made: all access is volatile. Like a `Cell`, a
//! [`DmaBuffer`] is written through `&self` and is `Send` but not `Sync`.
//! [`DmaSlice`] is the `Send + Sync` handle the I/O path keeps while the
//! device owns the bytes: it keeps the memory alive (not unaliased: reading
//! a buffer while a read into it is in flight gives unspecified bytes, never
//! undefined behaviour).
//!
//! An IOVA means something only in its own context: the same number in
//! another context is another buffer. [`DmaContextId`] names a context, and
//! buffers and slices carry theirs ([`DmaBuffer::context_id`],
//! [`DmaSlice::context_id`]), so whoever hands an IOVA to a device can check
//! that it belongs to that device's context with one compare.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::mem::{align_of, size_of};
use std::num::NonZeroUsize;
use std::ptr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::{MmapOptions, MmapRaw};
use vfio_ioctls::VfioContainer;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{Error, Result};
use crate::vfio::{IovaAllocator, IovaRange, sys, vfio_io_error};

/// 2 MiB, the x86 huge page size.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;
/// 4 KiB, the base page size.
pub const BASE_PAGE_SIZE: usize = 4096;

/// Memory the library owns and maps for devices: an anonymous mapping at
/// an IOVA. Shared (by `Arc`) between the owning [`DmaBuffer`], the
/// [`DmaSlice`]s of in-flight I/O and the context's translation table, so
/// it lives as long as anyone may touch it.
pub(crate) struct Region {
    map: MmapRaw,
    iova: u64,
    page_size: usize,
    /// The context's identity tag: held by every region, so the tag (and
    /// with it the [`DmaContextId`]) outlives anything that carries its IOVA.
    tag: Arc<ContextTag>,
}

impl Region {
    /// Mapped length in bytes.
    fn len(&self) -> usize {
        self.map.len()
    }

    /// Pointer to byte `offset` if `offset + len` lies inside the region.
    #[inline]
    pub(crate) fn ptr(&self, offset: usize, len: usize) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        if end > self.map.len() {
            return None;
        }
        // SAFETY: offset ≤ end ≤ mapped length: inside (or one past) the mapping.
        Some(unsafe { self.map.as_mut_ptr().add(offset) })
    }
}

/// Volatile copy out of a region; `false` if out of bounds.
#[cfg(feature = "emu")]
pub(crate) fn region_read(region: &Region, offset: usize, dst: &mut [u8]) -> bool {
    match region.ptr(offset, dst.len()) {
        Some(src) => {
            // SAFETY: `ptr` checked the range lies inside the mapping, which
            // the `Region` keeps alive; `dst` is ordinary memory, distinct.
            unsafe { volatile_copy_from(src, dst) };
            true
        }
        None => false,
    }
}

/// Volatile copy into a region; `false` if out of bounds.
#[cfg(feature = "emu")]
pub(crate) fn region_write(region: &Region, offset: usize, src: &[u8]) -> bool {
    match region.ptr(offset, src.len()) {
        Some(dst) => {
            // SAFETY: as in `region_read`; the bytes are device-shared, so
            // only volatile stores touch them.
            unsafe { volatile_copy_to(src, dst) };
            true
        }
        None => false,
    }
}

/// One volatile 32-bit load at `offset` (4-aligned) of a region.
#[inline]
pub(crate) fn region_read_u32(region: &Region, offset: usize) -> Option<u32> {
    if !offset.is_multiple_of(4) {
        return None;
    }
    let p = region.ptr(offset, 4)?;
    // SAFETY: in bounds (checked by `ptr`) and 4-aligned (the mapping is
    // page-aligned and `offset` is a multiple of 4).
    Some(unsafe { ptr::read_volatile(p.cast::<u32>()) })
}

/// One volatile 32-bit store at `offset` (4-aligned) of a region.
#[inline]
pub(crate) fn region_write_u32(region: &Region, offset: usize, value: u32) -> bool {
    if !offset.is_multiple_of(4) {
        return false;
    }
    match region.ptr(offset, 4) {
        Some(p) => {
            // SAFETY: in bounds and aligned, as in `region_read_u32`.
            unsafe { ptr::write_volatile(p.cast::<u32>(), value) };
            true
        }
        None => false,
    }
}

/// One volatile 64-bit store at `offset` (8-aligned) of a region.
#[inline]
#[cfg(feature = "emu")]
pub(crate) fn region_write_u64(region: &Region, offset: usize, value: u64) -> bool {
    if !offset.is_multiple_of(8) {
        return false;
    }
    match region.ptr(offset, 8) {
        Some(p) => {
            // SAFETY: in bounds (checked) and 8-aligned (page-aligned base).
            unsafe { ptr::write_volatile(p.cast::<u64>(), value) };
            true
        }
        None => false,
    }
}

/// One volatile 64-bit load at `offset` (8-aligned) of a region.
#[inline]
#[cfg(feature = "emu")]
pub(crate) fn region_read_u64(region: &Region, offset: usize) -> Option<u64> {
    if !offset.is_multiple_of(8) {
        return None;
    }
    let p = region.ptr(offset, 8)?;
    // SAFETY: in bounds (checked) and 8-aligned (page-aligned base).
    Some(unsafe { ptr::read_volatile(p.cast::<u64>()) })
}

/// The allocation whose address is a context's [`DmaContextId`]. The
/// context and each of its regions hold it, so no other context can get
/// the same address while anything that names this one is alive.
struct ContextTag {
    // Never read: a zero-sized tag could share its address with another
    // allocation's, a byte cannot.
    _byte: u8,
}

/// Identity of a [`DmaContext`]: two live contexts (or buffers and slices
/// of them) never have the same one. A small `Copy` value, so the I/O path
/// compares it without touching the context.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DmaContextId(NonZeroUsize);

impl DmaContextId {
    fn of(tag: &Arc<ContextTag>) -> DmaContextId {
        // An `Arc`'s pointer is never null; MIN only satisfies the type.
        DmaContextId(NonZeroUsize::new(Arc::as_ptr(tag) as usize).unwrap_or(NonZeroUsize::MIN))
    }
}

impl fmt::Debug for DmaContextId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaContextId({:#x})", self.0)
    }
}

impl fmt::Display for DmaContextId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DMA context {:#x}", self.0)
    }
}

enum Backend {
    Host,
    Vfio(Arc<VfioContainer>),
}

struct State {
    /// Live regions, sorted by IOVA (disjoint).
    regions: Vec<Arc<Region>>,
    /// VFIO devices attached to the container (the IOMMU domain exists
    /// and holds our mappings only while this is non-zero).
    devices: usize,
    /// `None` for VFIO until the first device attaches (the IOVA ranges
    /// are only known once a group sets the IOMMU type).
    iova: Option<IovaAllocator>,
}

/// An IOMMU domain and the DMA memory allocated in it. See the module docs.
pub struct DmaContext {
    backend: Backend,
    state: RwLock<State>,
    tag: Arc<ContextTag>,
}

/// IOVA space of a host context: it never reaches an IOMMU, so any range
/// works; this one keeps page 0 unused, like the VFIO allocator.
const HOST_IOVA_SPACE: IovaRange = IovaAllocator::FALLBACK_RANGE;

impl DmaContext {
    /// A context without an IOMMU, for in-process emulated controllers.
    pub fn host() -> Arc<DmaContext> {
        let iova = IovaAllocator::new(&[HOST_IOVA_SPACE], BASE_PAGE_SIZE as u64).ok();
        Arc::new(DmaContext {
            backend: Backend::Host,
            state: RwLock::new(State {
                regions: Vec::new(),
                devices: 0,
                iova,
            }),
            tag: Arc::new(ContextTag { _byte: 0 }),
        })
    }

    /// A VFIO container (`/dev/vfio/vfio`) to open controllers in with
    /// [`crate::vfio::VfioPci::open_in`].
    pub fn vfio() -> Result<Arc<DmaContext>> {
        let container =
            VfioContainer::new(None).map_err(crate::vfio::map_container_error_public)?;
        Ok(Self::with_container(Arc::new(container)))
    }

    pub(crate) fn with_container(container: Arc<VfioContainer>) -> Arc<DmaContext> {
        Arc::new(DmaContext {
            backend: Backend::Vfio(container),
            state: RwLock::new(State {
                regions: Vec::new(),
                devices: 0,
                iova: None,
            }),
            tag: Arc::new(ContextTag { _byte: 0 }),
        })
    }

    /// The VFIO container, if this is a VFIO context.
    pub(crate) fn container(&self) -> Option<&Arc<VfioContainer>> {
        match &self.backend {
            Backend::Vfio(c) => Some(c),
            Backend::Host => None,
        }
    }

    /// This context's identity, which its buffers and slices carry.
    pub fn id(&self) -> DmaContextId {
        DmaContextId::of(&self.tag)
    }

    /// Whether this is a host (emulator-only) context.
    pub fn is_host(&self) -> bool {
        matches!(self.backend, Backend::Host)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Every critical section leaves the state consistent before it can
        // panic, so a poisoned lock is taken over.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The usable IOVA ranges (empty for VFIO before a device attaches).
    pub fn iova_ranges(&self) -> Vec<IovaRange> {
        self.read()
            .iova
            .as_ref()
            .map(|a| a.ranges().to_vec())
            .unwrap_or_default()
    }

    /// A VFIO device joined the container; `ranges`/`granule` are what the
    /// IOMMU reports now. The first device creates the allocator and maps
    /// any live buffers; later ones narrow the allocator to the ranges every
    /// device can reach.
    pub(crate) fn attach(&self, ranges: &[IovaRange], granule: u64) -> Result<()> {
        let mut st = self.write();
        match st.iova.as_mut() {
            None => st.iova = Some(IovaAllocator::new(ranges, granule)?),
            Some(a) => a.restrict(ranges)?,
        }
        if st.devices == 0
            && let Backend::Vfio(c) = &self.backend
        {
            for r in &st.regions {
                // SAFETY: the region is an anonymous mapping owned by the
                // `Region` (kept alive by the table until unmapped), only
                // accessed through raw pointers, as `vfio_dma_map` requires.
                unsafe { c.vfio_dma_map(r.iova, r.len(), r.map.as_mut_ptr()) }.map_err(|e| {
                    Error::Vfio {
                        op: "VFIO_IOMMU_MAP_DMA (re-map on attach)",
                        target: format!("IOVA {:#x}+{:#x}", r.iova, r.len()),
                        source: vfio_io_error(e),
                    }
                })?;
            }
        }
        st.devices += 1;
        Ok(())
    }

    /// A VFIO device is leaving; with the last one the kernel drops the
    /// IOMMU domain and every mapping in it.
    pub(crate) fn detach(&self) {
        let mut st = self.write();
        st.devices = st.devices.saturating_sub(1);
    }

    /// Allocates a zeroed DMA buffer of `len` bytes, mapped for every device
    /// of the context.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DmaBuffer> {
        if len == 0 {
            return Err(Error::InvalidArgument("DMA buffer of zero bytes"));
        }
        let (map, page_size) = anon_memory(len)?;
        let mapped = map.len();
        let base = map.as_mut_ptr();
        if let Backend::Vfio(_) = self.backend {
            // VFIO pins the pages anyway; failure (RLIMIT_MEMLOCK) is tolerable.
            if let Err(e) = map.lock() {
                tracing::warn!(len = mapped, error = %e, "mlock of DMA buffer failed; continuing");
            }
            if let Err(e) = sys::dontfork(base, mapped) {
                tracing::warn!(len = mapped, error = %e, "MADV_DONTFORK on DMA buffer failed");
            }
        }
        let mut st = self.write();
        let Some(alloc) = st.iova.as_mut() else {
            return Err(Error::InvalidArgument(
                "DMA context has no device attached yet: open a controller in it first",
            ));
        };
        let granule = alloc.granule();
        if !(base as u64).is_multiple_of(granule) || !(mapped as u64).is_multiple_of(granule) {
            return Err(Error::InvalidArgument(
                "IOMMU page size is larger than the DMA buffer's page size",
            ));
        }
        let iova = alloc.alloc(mapped as u64, page_size as u64)?;
        if let (Backend::Vfio(c), true) = (&self.backend, st.devices > 0) {
            // SAFETY: `base..base + mapped` is an anonymous mapping the new
            // region owns exclusively, alive until after the unmap in
            // `DmaBuffer::drop`. No Rust reference to it is ever created:
            // every access is through raw pointers with volatile operations,
            // as the contract of `vfio_dma_map` requires.
            if let Err(e) = unsafe { c.vfio_dma_map(iova, mapped, base) } {
                if let Some(a) = st.iova.as_mut() {
                    a.free(iova);
                }
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
        }
        let region = Arc::new(Region {
            map,
            iova,
            page_size,
            tag: Arc::clone(&self.tag),
        });
        let at = st.regions.partition_point(|r| r.iova < iova);
        st.regions.insert(at, Arc::clone(&region));
        drop(st);
        tracing::debug!(iova, len, mapped, page_size, "DMA buffer allocated");
        Ok(DmaBuffer {
            region,
            len,
            ctx: Arc::clone(self),
            _not_sync: PhantomData,
        })
    }

    fn release(&self, region: &Arc<Region>) {
        let mut st = self.write();
        if let Ok(i) = st.regions.binary_search_by_key(&region.iova, |r| r.iova) {
            st.regions.remove(i);
        }
        let mut free_iova = true;
        if let (Backend::Vfio(c), true) = (&self.backend, st.devices > 0)
            && let Err(e) = c.vfio_dma_unmap(region.iova, region.len())
        {
            // The IOVA stays reserved: reusing it would make the next map
            // fail (or alias). The kernel keeps the pages pinned until the
            // container goes away, so freeing our mapping is still safe.
            tracing::warn!(
                iova = region.iova,
                len = region.len(),
                error = %e,
                "VFIO_IOMMU_UNMAP_DMA failed; leaking the IOVA range"
            );
            free_iova = false;
        }
        if free_iova && let Some(a) = st.iova.as_mut() {
            a.free(region.iova);
        }
    }

    /// Resolves `len` bytes at `iova` to the region holding them and the
    /// offset inside it: what an IOMMU does for a device. `None` if the
    /// range is not entirely inside one live allocation.
    #[cfg(feature = "emu")]
    pub(crate) fn translate(&self, iova: u64, len: usize) -> Option<(Arc<Region>, usize)> {
        let st = self.read();
        let i = st
            .regions
            .partition_point(|r| r.iova <= iova)
            .checked_sub(1)?;
        let r = &st.regions[i];
        let off = usize::try_from(iova - r.iova).ok()?;
        r.ptr(off, len)?;
        Some((Arc::clone(r), off))
    }

    /// Copies `dst.len()` bytes at `iova` out of DMA memory (volatile), as
    /// a device's read would; `false` if the range is not mapped.
    #[cfg(feature = "emu")]
    pub(crate) fn device_read(&self, iova: u64, dst: &mut [u8]) -> bool {
        let Some((region, off)) = self.translate(iova, dst.len()) else {
            return false;
        };
        region_read(&region, off, dst)
    }

    /// Copies `src` into DMA memory at `iova` (volatile), as a device's
    /// write would; `false` if the range is not mapped.
    #[cfg(feature = "emu")]
    pub(crate) fn device_write(&self, iova: u64, src: &[u8]) -> bool {
        let Some((region, off)) = self.translate(iova, src.len()) else {
            return false;
        };
        region_write(&region, off, src)
    }

    /// Number of live buffers.
    pub fn live_buffers(&self) -> usize {
        self.read().regions.len()
    }
}

impl fmt::Debug for DmaContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.read();
        f.debug_struct("DmaContext")
            .field("host", &self.is_host())
            .field("devices", &st.devices)
            .field("buffers", &st.regions.len())
            .finish()
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

/// A DMA buffer: memory owned by the library, mapped for every device of
/// its [`DmaContext`] at [`DmaBuffer::iova`]. Unmapped and freed on drop
/// (the memory itself lives on while an in-flight [`DmaSlice`] holds it).
///
/// `Send`, not `Sync` (writes go through `&self`, like a `Cell`):
///
/// ```compile_fail
/// fn sync<T: Sync>() {}
/// sync::<nvme::DmaBuffer>();
/// ```
pub struct DmaBuffer {
    region: Arc<Region>,
    len: usize,
    ctx: Arc<DmaContext>,
    /// Writes go through `&self`: `!Sync` keeps them on one thread.
    _not_sync: PhantomData<Cell<()>>,
}

/// A byte range of a DMA buffer, handed to the I/O path: it keeps the
/// memory alive while the device owns it. `Send + Sync`; it gives no access
/// to the bytes, only their IOVA.
#[derive(Clone)]
pub struct DmaSlice {
    region: Arc<Region>,
    offset: usize,
    len: usize,
}

impl DmaSlice {
    /// IOVA of the first byte.
    #[inline]
    pub fn iova(&self) -> u64 {
        self.region.iova + self.offset as u64
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The context whose IOVA space [`DmaSlice::iova`] is in: a device of
    /// any other context must not be given it.
    #[inline]
    pub fn context_id(&self) -> DmaContextId {
        DmaContextId::of(&self.region.tag)
    }

    /// Whether the slice is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of the first byte, for transports that hand host
    /// memory to the operating system rather than an IOVA to a device (a
    /// kernel's NVMe passthrough builds its own PRPs or SGLs from it; NVMe/TCP
    /// copies the data to and from its sockets). Only
    /// raw access is sound, as for [`DmaBuffer::as_ptr`].
    #[inline]
    pub fn host_ptr(&self) -> *mut u8 {
        self.region.map.as_mut_ptr().wrapping_add(self.offset)
    }

    /// The sub-slice `[offset, offset + len)` of this slice.
    pub fn sub(&self, offset: usize, len: usize) -> Option<DmaSlice> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| DmaSlice {
            region: Arc::clone(&self.region),
            offset: self.offset + offset,
            len,
        })
    }
}

impl fmt::Debug for DmaSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaSlice({:#x}+{:#x})", self.iova(), self.len)
    }
}

impl DmaBuffer {
    /// The I/O virtual address of byte 0, for the device.
    pub fn iova(&self) -> u64 {
        self.region.iova
    }

    /// The IOVA of byte `offset`, or `None` past the end.
    pub fn iova_at(&self, offset: usize) -> Option<u64> {
        (offset < self.len).then(|| self.region.iova + offset as u64)
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
        self.region.len()
    }

    /// Page size backing the buffer: 4 KiB or 2 MiB. Physically contiguous
    /// runs are at least this long and aligned to it.
    pub fn page_size(&self) -> usize {
        self.region.page_size
    }

    /// The context the buffer belongs to.
    pub fn context(&self) -> &Arc<DmaContext> {
        &self.ctx
    }

    /// The identity of [`DmaBuffer::context`], for one-compare checks.
    #[inline]
    pub fn context_id(&self) -> DmaContextId {
        DmaContextId::of(&self.region.tag)
    }

    /// The whole buffer as a [`DmaSlice`].
    pub fn as_slice(&self) -> DmaSlice {
        DmaSlice {
            region: Arc::clone(&self.region),
            offset: 0,
            len: self.len,
        }
    }

    /// `[offset, offset + len)` as a [`DmaSlice`]; `None` if out of bounds.
    pub fn slice(&self, offset: usize, len: usize) -> Option<DmaSlice> {
        self.as_slice().sub(offset, len)
    }

    /// The shared region (for handles that outlive `&self` borrows, like
    /// the shadow doorbell pages every queue pair writes its own slots of).
    pub(crate) fn region(&self) -> Arc<Region> {
        Arc::clone(&self.region)
    }

    /// Raw pointer to byte 0. Only raw/volatile access is sound: never make
    /// a reference to this memory, the device may write it at any time.
    pub fn as_ptr(&self) -> *mut u8 {
        self.region.map.as_mut_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                self.region.ptr(offset, len).ok_or(Error::DmaOutOfBounds {
                    offset,
                    len,
                    size: self.len,
                })
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
        // the buffer is `!Sync`, so no other thread writes it through this
        // handle, and `src` (ordinary memory) cannot overlap the DMA mapping.
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
            // the u64 is aligned and in bounds.
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
        // SAFETY: in bounds and aligned for `T` (checked above); `T:
        // IntoBytes` has no padding, so the device reads initialized bytes.
        unsafe { ptr::write_volatile(p.cast::<T>(), value) };
        Ok(())
    }

    /// Writes `words` at an 8-aligned `offset` as that many volatile
    /// 64-bit stores (queue entries: a fixed number of full-width stores,
    /// whatever the compiler would make of an unaligned aggregate copy).
    #[inline]
    pub fn write_u64s(&self, offset: usize, words: &[u64]) -> Result<()> {
        let p = self.check(offset, words.len() * 8)?;
        if !offset.is_multiple_of(8) {
            return Err(Error::DmaMisaligned { offset, align: 8 });
        }
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `check` proved `offset .. offset + 8 * len` is inside
            // the mapping; the base is page-aligned and `offset` 8-aligned,
            // so each u64 is aligned.
            unsafe { ptr::write_volatile(p.add(8 * i).cast::<u64>(), *w) };
        }
        Ok(())
    }

    /// One volatile load of a native-endian `u32` at a 4-aligned `offset`;
    /// `None` out of bounds or misaligned (the hot path's form of
    /// [`DmaBuffer::read_u32`], without an error to build and drop).
    #[inline]
    pub(crate) fn load_u32(&self, offset: usize) -> Option<u32> {
        if offset.checked_add(4)? > self.len {
            return None;
        }
        region_read_u32(&self.region, offset)
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
        self.ctx.release(&self.region);
    }
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &format_args!("{:#x}", self.region.iova))
            .field("len", &self.len)
            .field("mapped_len", &self.region.len())
            .field("page_size", &self.region.page_size)
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
    fn host_context_allocates_translates_and_releases() {
        let ctx = DmaContext::host();
        let a = ctx.alloc(100).expect("alloc");
        let b = ctx.alloc(3 * 4096).expect("alloc");
        assert_eq!(ctx.live_buffers(), 2);
        assert_eq!(a.len(), 100);
        assert_eq!(a.mapped_len(), 4096);
        assert!(a.iova() + 4096 <= b.iova() || b.iova() + 3 * 4096 <= a.iova());
        b.write_u64s(8, &[1, 2, 3]).expect("aligned");
        assert!(matches!(
            b.write_u64s(4, &[1]),
            Err(Error::DmaMisaligned { .. })
        ));
        assert!(matches!(
            a.write_u64s(96, &[1, 2]),
            Err(Error::DmaOutOfBounds { .. })
        ));
        assert!(matches!(a.read_u32(100), Err(Error::DmaOutOfBounds { .. })));
        assert!(matches!(a.read_u32(2), Err(Error::DmaMisaligned { .. })));
        // The device's view: the same bytes at the IOVA, nothing past it.
        let mut w = [0u8; 8];
        assert!(ctx.device_read(b.iova() + 16, &mut w));
        assert_eq!(u64::from_ne_bytes(w), 2);
        assert!(ctx.device_write(b.iova() + 4096, b"dev"));
        let mut back = [0u8; 3];
        b.read_bytes(4096, &mut back).expect("read");
        assert_eq!(&back, b"dev");
        assert!(
            !ctx.device_read(b.iova() + 3 * 4096 - 4, &mut w),
            "crosses the end"
        );
        assert!(!ctx.device_read(0x1000, &mut w), "never allocated");
        // Slices keep memory alive but not the mapping.
        let s = b.slice(4096, 4096).expect("slice");
        assert!(b.slice(4096, 3 * 4096).is_none());
        assert_eq!((b.context_id(), s.context_id()), (ctx.id(), ctx.id()));
        let iova = b.iova();
        drop(b);
        assert_eq!(ctx.live_buffers(), 1);
        assert_eq!(s.iova(), iova + 4096);
        assert!(!ctx.device_read(iova, &mut w), "unmapped once dropped");
        assert!(matches!(ctx.alloc(0), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn contexts_have_distinct_ids_while_anything_names_them() {
        let a = DmaContext::host();
        let b = DmaContext::host();
        assert_ne!(a.id(), b.id());
        let (ba, bb) = (a.alloc(4096).expect("alloc"), b.alloc(4096).expect("alloc"));
        // Two fresh host contexts hand out the same first IOVA: only the
        // context tells the buffers apart.
        assert_eq!(ba.iova(), bb.iova());
        assert_ne!(ba.context_id(), bb.context_id());
        // A slice that outlives its buffer and context still names it, and
        // no new context can take that name meanwhile.
        let s = ba.as_slice();
        let id = a.id();
        drop((ba, a));
        let c = DmaContext::host();
        assert_eq!(s.context_id(), id);
        assert_ne!(c.id(), id);
    }

    #[test]
    fn vfio_context_refuses_alloc_before_a_device() {
        // Only where /dev/vfio/vfio exists; elsewhere creating one fails
        // with a typed error, which is what the other branch checks.
        match DmaContext::vfio() {
            Ok(ctx) => assert!(matches!(ctx.alloc(4096), Err(Error::InvalidArgument(_)))),
            Err(e) => assert!(
                matches!(
                    e,
                    Error::VfioUnavailable { .. }
                        | Error::Permission { .. }
                        | Error::NoType1Iommu { .. }
                ),
                "{e:?}"
            ),
        }
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
