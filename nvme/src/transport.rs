//! The transport seam: what the driver needs from the thing it drives.
//!
//! A [`Transport`] gives register access ([`RegisterAccess`]) and the DMA
//! context buffers come from. The driver ([`crate::Controller`],
//! [`crate::QueuePair`]) is generic over it, so the doorbell write on the
//! hot path is a direct, inlinable call for both the VFIO BAR and the
//! in-process emulator.

use std::sync::Arc;

use crate::dma::DmaContext;
use crate::mmio::RegisterAccess;
use crate::vfio::{Bar, VfioPci};

/// A controller's register window and DMA memory.
pub trait Transport: Send + Sync + 'static {
    /// The register window type.
    type Regs: RegisterAccess + Send + Sync;

    /// The register window.
    fn regs(&self) -> &Self::Regs;

    /// The DMA context buffers for this controller are allocated from.
    fn dma(&self) -> &Arc<DmaContext>;

    /// Human-readable name for errors and logs (a PCI address, "emu#3").
    fn name(&self) -> String;

    /// Highest queue id whose doorbells fit in the register window.
    fn max_doorbell_qid(&self) -> u16;

    /// True once the platform asked for the device back (VFIO's device
    /// request on hot unplug or unbind): the driver then stops the
    /// controller and calls [`Transport::release`].
    fn removal_requested(&self) -> bool;

    /// Hands the device back after the controller was stopped: from then
    /// on the register window reads all ones and takes writes harmlessly,
    /// and nothing of the device is held.
    fn release(&self);
}

impl Transport for VfioPci {
    type Regs = Bar;

    #[inline]
    fn regs(&self) -> &Bar {
        self.bar0()
    }

    fn dma(&self) -> &Arc<DmaContext> {
        self.dma_context()
    }

    fn name(&self) -> String {
        self.address().to_string()
    }

    fn max_doorbell_qid(&self) -> u16 {
        VfioPci::max_doorbell_qid(self)
    }

    fn removal_requested(&self) -> bool {
        VfioPci::removal_requested(self)
    }

    fn release(&self) {
        VfioPci::release(self)
    }
}
