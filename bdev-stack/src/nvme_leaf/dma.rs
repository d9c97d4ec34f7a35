//! Buffers for NVMe leaves: an allocator over a [`DmaContext`] and its
//! buffers as stack I/O memory.

use std::ptr::NonNull;
use std::sync::Arc;

use nvme::{DmaBuffer, DmaContext};

use super::env::{emu_dma_allocator, vfio_dma_allocator};
use crate::buffer::{DmaAllocator, DmaMemory, DmaSlice};
use crate::device::{BlockDevice, DeviceKind};
use crate::error::BdevError;

/// Allocates buffers from an NVMe [`DmaContext`]: every controller of the
/// context accepts them.
#[derive(Debug, Clone)]
pub struct NvmeDmaAllocator {
    ctx: Arc<DmaContext>,
}

impl NvmeDmaAllocator {
    /// An allocator over `ctx`.
    pub fn new(ctx: Arc<DmaContext>) -> NvmeDmaAllocator {
        NvmeDmaAllocator { ctx }
    }

    /// The context.
    pub fn context(&self) -> &Arc<DmaContext> {
        &self.ctx
    }

    /// A buffer of `len` bytes, typed (for [`crate::OwnedChannel`]).
    pub fn alloc(&self, len: usize) -> Result<NvmeDmaBuffer, BdevError> {
        let buf = self.ctx.alloc(len).map_err(|source| BdevError::Nvme {
            device: "DMA context".into(),
            action: "allocate a DMA buffer",
            source: Box::new(source),
        })?;
        Ok(NvmeDmaBuffer { buf })
    }
}

impl DmaAllocator for NvmeDmaAllocator {
    fn allocate(&self, len: usize) -> Result<Box<dyn DmaMemory>, BdevError> {
        Ok(Box::new(self.alloc(len)?))
    }
}

/// A DMA buffer of an NVMe context as stack I/O memory. Its bytes are only
/// reached by copies (volatile), never by reference: a device may write
/// them.
#[derive(Debug)]
pub struct NvmeDmaBuffer {
    buf: DmaBuffer,
}

impl NvmeDmaBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false: empty buffers cannot be allocated.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Copies bytes out of the buffer at `offset`.
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<(), BdevError> {
        self.buf.read_bytes(offset, dst).map_err(dma_error)
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<(), BdevError> {
        self.buf.write_bytes(offset, src).map_err(dma_error)
    }

    /// The driver's buffer.
    pub fn inner(&self) -> &DmaBuffer {
        &self.buf
    }
}

fn dma_error(source: nvme::Error) -> BdevError {
    BdevError::Nvme {
        device: "DMA buffer".into(),
        action: "access a DMA buffer",
        source: Box::new(source),
    }
}

// SAFETY: the mapping is owned by the `DmaBuffer`, page-aligned, neither
// moved nor freed while it lives, and its IOVA maps exactly it in the
// context's IOMMU domain (or host IOVA table).
unsafe impl DmaMemory for NvmeDmaBuffer {
    fn dma_slice(&mut self) -> DmaSlice {
        let ptr = NonNull::new(self.buf.as_ptr()).unwrap_or(NonNull::dangling());
        // SAFETY: `ptr..ptr + len` is the buffer's own mapping (library
        // memory, never caller stack or heap) and `iova` maps it.
        unsafe { DmaSlice::from_raw_parts(ptr, self.buf.len(), Some(self.buf.iova())) }
    }
}

/// The allocator whose buffers every leaf under `device` accepts: the
/// emulators' context for stacks with `emu:` leaves, the VFIO container for
/// stacks with `nvme:` leaves, host memory when no leaf needs an IOVA.
///
/// Errors: [`BdevError::InvalidParameter`] for a stack that mixes `emu:`
/// and `nvme:` leaves (no one context serves both), and the VFIO
/// container's error.
pub fn dma_allocator_for(
    device: &Arc<dyn BlockDevice>,
) -> Result<Arc<dyn DmaAllocator>, BdevError> {
    fn walk(d: &Arc<dyn BlockDevice>, emu: &mut bool, vfio: &mut bool) {
        let members = d.members();
        let info = d.info();
        if members.is_empty() && info.needs_iova {
            match info.kind {
                DeviceKind::Emulated => *emu = true,
                _ => *vfio = true,
            }
        }
        for m in &members {
            walk(m, emu, vfio);
        }
    }
    let (mut emu, mut vfio) = (false, false);
    walk(device, &mut emu, &mut vfio);
    match (emu, vfio) {
        (true, true) => Err(BdevError::InvalidParameter {
            device: device.info().name.clone(),
            parameter: "leaves",
            reason: "mixes emu: and nvme: leaves; no DMA context serves both".into(),
        }),
        (true, false) => Ok(emu_dma_allocator()),
        (false, true) => vfio_dma_allocator(),
        (false, false) => Ok(Arc::new(crate::buffer::HostAllocator)),
    }
}
