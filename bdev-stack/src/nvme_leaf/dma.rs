//! Buffers for NVMe leaves: an allocator over a [`DmaContext`] and its
//! buffers as stack I/O memory.

use std::ptr::NonNull;
use std::sync::Arc;

use nvme::{DmaBuffer, DmaContext};

use crate::buffer::{DmaAddress, DmaAllocator, DmaContextId, DmaMemory, DmaSlice};
use crate::device::BlockDevice;
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

    fn dma_context(&self) -> Option<DmaContextId> {
        Some(self.ctx.id())
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

    /// The context the buffer is mapped in: only leaves of this context
    /// take it.
    pub fn dma_context(&self) -> DmaContextId {
        self.buf.context_id()
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
        let dma = DmaAddress {
            iova: self.buf.iova(),
            context: self.buf.context_id(),
        };
        // SAFETY: `ptr..ptr + len` is the buffer's own mapping (library
        // memory, never caller stack or heap) and `iova` maps it in the
        // buffer's context.
        unsafe { DmaSlice::from_raw_parts(ptr, self.buf.len(), Some(dma)) }
    }
}

/// The allocator whose buffers every leaf under `device` accepts: that of
/// the DMA context its NVMe leaves share (the host context of the registry
/// that opened its `emu:` leaves, or its VFIO container for `nvme:`
/// leaves), host memory when no leaf needs an IOVA. This is where a stack's
/// buffers should come from: a buffer of another context is refused.
///
/// Errors: [`BdevError::InvalidParameter`] for a stack whose leaves are in
/// different DMA contexts (opened by different registries, or `emu:` with
/// `nvme:` leaves: no one buffer serves both), or with a leaf that needs
/// IOVAs but names no allocator.
pub fn dma_allocator_for(
    device: &Arc<dyn BlockDevice>,
) -> Result<Arc<dyn DmaAllocator>, BdevError> {
    let mut found: Option<(String, Arc<dyn DmaAllocator>)> = None;
    let mut stack = vec![Arc::clone(device)];
    while let Some(d) = stack.pop() {
        let members = d.members();
        let info = d.info();
        if members.is_empty() && info.needs_iova {
            let Some(alloc) = d.iova_allocator() else {
                return Err(BdevError::InvalidParameter {
                    device: info.name.clone(),
                    parameter: "DMA allocator",
                    reason: "the leaf needs DMA-mapped buffers but names no allocator of them"
                        .into(),
                });
            };
            match &found {
                None => found = Some((info.name.clone(), alloc)),
                Some((first, a)) if a.dma_context() != alloc.dma_context() => {
                    return Err(BdevError::InvalidParameter {
                        device: device.info().name.clone(),
                        parameter: "leaves",
                        reason: format!(
                            "{first} and {} are in different DMA contexts, so no buffer \
                             serves both: build the stack with one leaf registry, and do not \
                             mix emu: and nvme: leaves",
                            info.name
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        stack.extend(members);
    }
    if let Some((_, alloc)) = found {
        return Ok(alloc);
    }
    // Host memory serves every leaf; the first leaf with buffers of its
    // own (registered with its rings) gets them.
    let mut stack = vec![Arc::clone(device)];
    while let Some(d) = stack.pop() {
        let members = d.members();
        if members.is_empty()
            && let Some(alloc) = d.host_allocator()
        {
            return Ok(alloc);
        }
        stack.extend(members.into_iter().rev());
    }
    Ok(Arc::new(crate::buffer::HostAllocator))
}
