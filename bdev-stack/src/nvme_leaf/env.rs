//! The DMA contexts and open controllers NVMe leaves share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use nvme::vfio::VfioPci;
use nvme::{Controller, ControllerOptions, DmaContext};

use super::dma::NvmeDmaAllocator;
use crate::buffer::DmaAllocator;
use crate::error::BdevError;

/// The host DMA context every `emu:` leaf of the process uses (one, so a
/// buffer serves a stack over several emulated controllers).
pub fn emu_dma_context() -> Arc<DmaContext> {
    static CTX: OnceLock<Arc<DmaContext>> = OnceLock::new();
    Arc::clone(CTX.get_or_init(DmaContext::host))
}

/// Buffers for stacks of `emu:` leaves.
pub fn emu_dma_allocator() -> Arc<dyn DmaAllocator> {
    Arc::new(NvmeDmaAllocator::new(emu_dma_context()))
}

/// The VFIO container every `nvme:` leaf of the process joins (one, like
/// SPDK's, so a buffer serves a stripe over several controllers). Created
/// on first use; buffers can be allocated once a controller is open in it.
pub fn vfio_dma_context() -> Result<Arc<DmaContext>, BdevError> {
    static CTX: Mutex<Option<Arc<DmaContext>>> = Mutex::new(None);
    let mut ctx = CTX.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(c) = ctx.as_ref() {
        return Ok(Arc::clone(c));
    }
    let c = DmaContext::vfio().map_err(|source| BdevError::Nvme {
        device: "VFIO container".into(),
        action: "open /dev/vfio/vfio",
        source: Box::new(source),
    })?;
    *ctx = Some(Arc::clone(&c));
    Ok(c)
}

/// Buffers for stacks of `nvme:` leaves.
pub fn vfio_dma_allocator() -> Result<Arc<dyn DmaAllocator>, BdevError> {
    Ok(Arc::new(NvmeDmaAllocator::new(vfio_dma_context()?)))
}

/// The controller at `addr`, opened in the process's VFIO container and
/// brought up on first use; shared by every leaf over its namespaces (a
/// device can be opened through VFIO only once).
pub fn vfio_controller(addr: &str) -> Result<Arc<Controller<VfioPci>>, BdevError> {
    static OPEN: Mutex<Option<HashMap<String, Weak<Controller<VfioPci>>>>> = Mutex::new(None);
    let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    let map = open.get_or_insert_with(HashMap::new);
    if let Some(ctrl) = map.get(addr).and_then(Weak::upgrade) {
        return Ok(ctrl);
    }
    let ctx = vfio_dma_context()?;
    let nvme_err = |action, source| BdevError::Nvme {
        device: addr.to_string(),
        action,
        source: Box::new(source),
    };
    let dev = VfioPci::open_in(&ctx, addr).map_err(|e| nvme_err("open through VFIO", e))?;
    let ctrl = Arc::new(
        Controller::new(dev, ControllerOptions::default())
            .map_err(|e| nvme_err("bring the controller up", e))?,
    );
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(addr.to_string(), Arc::downgrade(&ctrl));
    Ok(ctrl)
}
