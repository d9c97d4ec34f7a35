//! The environment NVMe leaves live in: the DMA contexts their buffers are
//! mapped in and the VFIO controllers they have open.
//!
//! One [`NvmeEnvironment`] is one set of DMA domains: every `emu:` leaf
//! opened in it shares its host context, every `nvme:` leaf its VFIO
//! container, as SPDK keeps one per process, so one buffer serves a stripe
//! over several controllers. Two environments share nothing, so two stacks
//! can live in separate IOMMU domains in one process; a buffer of one is
//! refused by the leaves of the other. A [`crate::spec::LeafRegistry`]
//! holds one and opens its `emu:` and `nvme:` leaves in it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

#[cfg(feature = "emu")]
use nvme::Transport;
#[cfg(feature = "emu")]
use nvme::emu::{Backing, EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::vfio::{PciAddress, VfioPci};
use nvme::{Controller, ControllerOptions, DmaContext};

use super::dma::NvmeDmaAllocator;
#[cfg(feature = "emu")]
use super::factory::EmuNamespace;
use super::namespace::NvmeNamespace;
#[cfg(feature = "emu")]
use crate::device::{DeviceId, DeviceKind};
use crate::error::BdevError;

/// The DMA contexts and open controllers a set of NVMe leaves share. A
/// cheap handle: clones share one environment. See the module docs.
#[derive(Clone)]
pub struct NvmeEnvironment {
    shared: Arc<Shared>,
}

struct Shared {
    /// The emulators' host context: no IOMMU, IOVAs resolved in-process.
    emu: Arc<DmaContext>,
    vfio: Mutex<Vfio>,
}

#[derive(Default)]
struct Vfio {
    /// Held weakly: controllers (through their transport), allocators and
    /// buffers hold the container, which closes with the last of them.
    context: Weak<DmaContext>,
    /// Open controllers by PCI address: a device can be opened through
    /// VFIO only once, so every leaf over its namespaces shares it.
    controllers: HashMap<PciAddress, Weak<Controller<VfioPci>>>,
}

impl Default for NvmeEnvironment {
    fn default() -> NvmeEnvironment {
        NvmeEnvironment::new()
    }
}

impl std::fmt::Debug for NvmeEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeEnvironment")
            .field("emu", &self.shared.emu.id())
            .field("vfio", &self.live_vfio_context().map(|c| c.id()))
            .finish()
    }
}

impl NvmeEnvironment {
    /// A fresh environment: a host context of its own for emulated
    /// controllers; a VFIO container of its own, opened with the first
    /// controller.
    pub fn new() -> NvmeEnvironment {
        NvmeEnvironment {
            shared: Arc::new(Shared {
                emu: DmaContext::host(),
                vfio: Mutex::new(Vfio::default()),
            }),
        }
    }

    /// Whether `a` and `b` are one environment (clones of one handle).
    pub fn same(a: &NvmeEnvironment, b: &NvmeEnvironment) -> bool {
        Arc::ptr_eq(&a.shared, &b.shared)
    }

    fn vfio(&self) -> MutexGuard<'_, Vfio> {
        // Each critical section leaves the maps consistent before anything
        // that can panic, so a poisoned lock is taken over.
        self.shared
            .vfio
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The host DMA context of this environment's emulated controllers.
    pub fn emu_context(&self) -> &Arc<DmaContext> {
        &self.shared.emu
    }

    /// Buffers for stacks of this environment's `emu:` leaves.
    pub fn emu_allocator(&self) -> NvmeDmaAllocator {
        NvmeDmaAllocator::new(Arc::clone(&self.shared.emu))
    }

    /// This environment's VFIO container, opened if nothing holds it now.
    /// Buffers can be allocated from it once a controller is open in it.
    ///
    /// Errors: [`BdevError::Nvme`] when `/dev/vfio/vfio` cannot be opened
    /// (the message says why: no module, no permission, no IOMMU).
    pub fn vfio_context(&self) -> Result<Arc<DmaContext>, BdevError> {
        vfio_context(&mut self.vfio(), None)
    }

    /// The VFIO container if a controller, allocator or buffer still holds
    /// it; `None` once the last of them is gone (the container is closed).
    pub fn live_vfio_context(&self) -> Option<Arc<DmaContext>> {
        self.vfio().context.upgrade()
    }

    /// Buffers for stacks of this environment's `nvme:` leaves.
    ///
    /// Errors: as [`NvmeEnvironment::vfio_context`].
    pub fn vfio_allocator(&self) -> Result<NvmeDmaAllocator, BdevError> {
        Ok(NvmeDmaAllocator::new(self.vfio_context()?))
    }

    /// The controller at `addr` (`DDDD:BB:DD.F`, bound to vfio-pci), opened
    /// in this environment's container and brought up on first use; shared
    /// by every leaf over its namespaces while any of them lives.
    ///
    /// Errors: [`BdevError::InvalidParameter`] for an address that does
    /// not parse; [`BdevError::Nvme`] when the device cannot be opened (in
    /// use by another environment's container, not bound to vfio-pci) or
    /// brought up.
    pub fn vfio_controller(&self, addr: &str) -> Result<Arc<Controller<VfioPci>>, BdevError> {
        let pci: PciAddress = addr.parse().map_err(|e| BdevError::InvalidParameter {
            device: addr.to_string(),
            parameter: "PCI address",
            reason: format!("{e}"),
        })?;
        let mut vfio = self.vfio();
        if let Some(ctrl) = vfio.controllers.get(&pci).and_then(Weak::upgrade) {
            return Ok(ctrl);
        }
        let ctx = vfio_context(&mut vfio, Some(pci))?;
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
        vfio.controllers.retain(|_, w| w.strong_count() > 0);
        vfio.controllers.insert(pci, Arc::downgrade(&ctrl));
        Ok(ctrl)
    }

    /// Opens namespace `nsid` of the controller at PCI address `addr`
    /// (bound to vfio-pci) as a leaf, in this environment's container.
    ///
    /// Errors: as [`NvmeEnvironment::vfio_controller`], and
    /// [`NvmeNamespace::new`]'s.
    pub fn open_vfio_namespace(
        &self,
        addr: &str,
        nsid: u32,
    ) -> Result<NvmeNamespace<VfioPci>, BdevError> {
        NvmeNamespace::new(self.vfio_controller(addr)?, nsid)
    }

    /// Opens an in-process emulated controller with one namespace, in this
    /// environment's host context, as a leaf.
    ///
    /// Errors: [`BdevError::InvalidParameter`] for a block size other than
    /// 512 or 4096, a size that is not a non-zero multiple of it, or a null
    /// namespace with a file; [`BdevError::Nvme`] when the emulator cannot
    /// be made or brought up (a backing file that cannot be opened).
    #[cfg(feature = "emu")]
    pub fn open_emu_namespace(
        &self,
        cfg: EmuNamespace,
    ) -> Result<NvmeNamespace<EmuController>, BdevError> {
        let bs = u64::from(cfg.block_size);
        let invalid = |parameter, reason: String| BdevError::InvalidParameter {
            device: "emu".into(),
            parameter,
            reason,
        };
        if cfg.block_size != 512 && cfg.block_size != 4096 {
            return Err(invalid(
                "block size",
                format!(
                    "{}: emulated namespaces have 512 or 4096-byte blocks",
                    cfg.block_size
                ),
            ));
        }
        if cfg.size == 0 || !cfg.size.is_multiple_of(bs) {
            return Err(invalid(
                "size",
                format!("{} is not a non-zero multiple of {bs}", cfg.size),
            ));
        }
        let blocks = cfg.size / bs;
        let mut ns = match (&cfg.file, cfg.null) {
            (Some(_), true) => {
                return Err(invalid(
                    "backing",
                    "a null namespace keeps no data, so it takes no file".into(),
                ));
            }
            (None, true) => NamespaceConfig::null(cfg.block_size, blocks),
            (file, false) => NamespaceConfig {
                backing: file.clone().map_or(Backing::Memory, Backing::File),
                ..NamespaceConfig::memory(cfg.block_size, blocks)
            },
        };
        (ns.msrc, ns.mssrl, ns.mcl) = cfg.copy;
        let id = DeviceId::fresh();
        let emu = EmuController::new(
            &self.shared.emu,
            EmuConfig {
                serial: format!("EMU{:05}", id.0),
                mqes: 4095,
                namespaces: vec![ns],
                mode: if cfg.threaded {
                    EmuMode::Thread
                } else {
                    EmuMode::Inline
                },
                ..EmuConfig::default()
            },
        )
        .map_err(|source| BdevError::Nvme {
            device: "emu".into(),
            action: "create the emulated controller",
            source: Box::new(source),
        })?;
        let name = emu.name();
        let ctrl = Controller::new(emu, ControllerOptions::default()).map_err(|source| {
            BdevError::Nvme {
                device: name,
                action: "bring the emulated controller up",
                source: Box::new(source),
            }
        })?;
        Ok(NvmeNamespace::new(Arc::new(ctrl), 1)?.with_kind(DeviceKind::Emulated))
    }
}

/// The container `vfio` holds, or a new one if nothing holds it now;
/// `for_controller` is the controller it is opened for, named in the
/// error's hint.
fn vfio_context(
    vfio: &mut Vfio,
    for_controller: Option<PciAddress>,
) -> Result<Arc<DmaContext>, BdevError> {
    if let Some(ctx) = vfio.context.upgrade() {
        return Ok(ctx);
    }
    let ctx = DmaContext::vfio().map_err(|source| {
        let source = match source {
            nvme::Error::VfioUnavailable {
                path,
                addr: None,
                source,
            } => nvme::Error::VfioUnavailable {
                path,
                addr: for_controller,
                source,
            },
            other => other,
        };
        BdevError::Nvme {
            device: for_controller.map_or_else(|| "VFIO".to_owned(), |a| a.to_string()),
            action: "open the VFIO container /dev/vfio/vfio",
            source: Box::new(source),
        }
    })?;
    vfio.context = Arc::downgrade(&ctx);
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vfio_context_is_held_only_by_its_users() {
        let env = NvmeEnvironment::new();
        assert!(env.live_vfio_context().is_none(), "nothing opened yet");
        // What a controller does to the container, with a host context in
        // its place (this host may have no VFIO): hold it strongly while
        // the environment holds it weakly.
        let user = DmaContext::host();
        env.vfio().context = Arc::downgrade(&user);
        let again = env.vfio_context().expect("held, so no new container");
        assert!(Arc::ptr_eq(&again, &user));
        let buffer = env.vfio_allocator().expect("held").alloc(4096);
        drop((user, again));
        // A buffer (through its allocator's context) is a user too.
        assert!(buffer.is_ok());
        assert!(env.live_vfio_context().is_some());
        drop(buffer);
        assert!(env.live_vfio_context().is_none(), "last user gone");
    }

    #[test]
    fn a_real_vfio_container_closes_with_its_last_user() {
        let env = NvmeEnvironment::new();
        match env.vfio_context() {
            Ok(ctx) => {
                let id = ctx.id();
                assert_eq!(env.live_vfio_context().map(|c| c.id()), Some(id));
                drop(ctx);
                assert!(env.live_vfio_context().is_none());
            }
            Err(e) => eprintln!("SKIPPED: no VFIO container on this host: {e}"),
        }
    }

    #[test]
    fn environments_share_nothing() {
        let (a, b) = (NvmeEnvironment::new(), NvmeEnvironment::new());
        assert!(NvmeEnvironment::same(&a, &a.clone()));
        assert!(!NvmeEnvironment::same(&a, &b));
        assert_ne!(a.emu_context().id(), b.emu_context().id());
    }
}
