//! The leaf: a namespace described from Identify, opening I/O and copy
//! channels over queue pairs of its own.

use std::sync::Arc;

use nvme::spec::{IdentifyNamespace, ONCS_COPY, ONCS_DSM, ONCS_WRITE_ZEROES, ascii_field};
use nvme::tcp::TcpController;
use nvme::{
    BlockQueue, Controller, ControllerView, DmaContext, Namespace, QueueOptions, Transport,
};

use super::channel::NvmeChannel;
use super::copy::NvmeCopyChannel;
use super::dma::NvmeDmaAllocator;
use crate::buffer::DmaAllocator;
use crate::device::{
    Access, BlockDevice, Channel, CopyOffload, DeviceId, DeviceInfo, DeviceKind, LeafFragment,
    SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError};
use crate::identity::{BackingId, OffloadDomain};
use crate::offload::CopyChannel;

/// Source ranges one format-0 Copy command can carry in the queue pair's
/// one descriptor page (4096 / 32).
const COPY_RANGES: u32 = 128;
/// Queue entries at least: the slack lets completion doorbells be batched.
const MIN_QUEUE_ENTRIES: usize = 256;

/// A controller a namespace leaf runs on: over PCIe (VFIO, the emulator)
/// or NVMe/TCP. The leaf's channels drive its queues.
pub trait NvmeHost:
    ControllerView<Error = nvme::Error, Queue: BlockQueue> + Send + Sync + 'static
{
    /// Identify Namespace `nsid`.
    fn identify_namespace(&self, nsid: u32) -> nvme::Result<IdentifyNamespace>;

    /// The DMA context buffers must come from (their IOVAs are what the
    /// controller reads), or `None` when the transport moves host memory
    /// itself.
    fn dma_context(&self) -> Option<&Arc<DmaContext>>;
}

impl<T: Transport> NvmeHost for Controller<T> {
    fn identify_namespace(&self, nsid: u32) -> nvme::Result<IdentifyNamespace> {
        Controller::identify_namespace(self, nsid)
    }

    fn dma_context(&self) -> Option<&Arc<DmaContext>> {
        Some(self.transport().dma())
    }
}

impl NvmeHost for TcpController {
    fn identify_namespace(&self, nsid: u32) -> nvme::Result<IdentifyNamespace> {
        TcpController::identify_namespace(self, nsid)
    }

    fn dma_context(&self) -> Option<&Arc<DmaContext>> {
        None
    }
}

/// A namespace of an NVMe controller as a block device.
pub struct NamespaceLeaf<C: NvmeHost> {
    info: DeviceInfo,
    ctrl: Arc<C>,
    ns: Namespace,
    queue: QueueOptions,
}

/// A namespace of a controller over PCIe (VFIO or the emulator).
pub type NvmeNamespace<T> = NamespaceLeaf<Controller<T>>;
/// A namespace of a controller over NVMe/TCP.
pub type TcpNamespace = NamespaceLeaf<TcpController>;

/// The operations an NVMe namespace supports, from the controller's ONCS
/// and the namespace's DLFEAT.
pub(crate) fn nvme_ops(oncs: u16, dlfeat: u8) -> SupportedOps {
    let mut ops = SupportedOps::READ | SupportedOps::WRITE | SupportedOps::FLUSH;
    if oncs & ONCS_WRITE_ZEROES != 0 {
        ops |= SupportedOps::WRITE_ZEROES;
    }
    // The stack promises zeroes after a deallocate: only where DLFEAT
    // bits 2:0 say deallocated blocks read as zeroes.
    if oncs & ONCS_DSM != 0 && dlfeat & 0x7 == 1 {
        ops |= SupportedOps::DEALLOCATE;
    }
    ops
}

impl<C: NvmeHost> NamespaceLeaf<C> {
    /// The leaf over namespace `nsid` of `ctrl`, described from Identify.
    ///
    /// Errors: [`BdevError::InvalidParameter`] for a namespace the
    /// controller does not have (the reason lists those it has), and
    /// [`BdevError::Nvme`] when Identify Namespace fails.
    pub fn new(ctrl: Arc<C>, nsid: u32) -> Result<NamespaceLeaf<C>, BdevError> {
        let name = format!("{}/{nsid}", ctrl.name());
        let Some(ns) = ctrl.namespace(nsid) else {
            let have: Vec<String> = ctrl
                .namespaces()
                .iter()
                .map(|n| n.nsid.to_string())
                .collect();
            return Err(BdevError::InvalidParameter {
                device: name,
                parameter: "namespace",
                reason: format!(
                    "no active namespace {nsid} (active: {})",
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            });
        };
        let id_ns = ctrl
            .identify_namespace(nsid)
            .map_err(|source| BdevError::Nvme {
                device: name.clone(),
                action: "Identify Namespace",
                source: Box::new(source),
            })?;
        let ident = ctrl.identify();
        let oncs = ident.oncs.get();
        let ops = nvme_ops(oncs, id_ns.dlfeat);
        let bs = u64::from(ns.block_size);
        let mut copy_offloads = Vec::new();
        if oncs & ONCS_COPY != 0 && ns.mssrl > 0 && ns.mcl > 0 {
            let nqn = ascii_field(&ident.subnqn);
            copy_offloads.push(CopyOffload::NvmeCopy {
                controller: OffloadDomain::handle(&ctrl),
                subsystem: nqn,
                nsid,
                max_ranges: (u32::from(ns.msrc) + 1).min(COPY_RANGES),
                max_range_blocks: u64::from(ns.mssrl),
                max_command_blocks: u64::from(ns.mcl),
            });
        }
        let info = DeviceInfo {
            id: DeviceId::fresh(),
            name,
            kind: DeviceKind::Nvme,
            block_size: ns.block_size,
            block_count: ns.blocks,
            max_transfer_blocks: (ctrl.max_transfer() as u64 / bs).max(1),
            // PRP entries must be dword aligned; NVMe/TCP copies any.
            buf_align: if ctrl.dma_context().is_some() { 4 } else { 1 },
            needs_iova: ctrl.dma_context().is_some(),
            dma_context: ctrl.dma_context().map(|c| c.id()),
            optimal_boundary_blocks: u64::from(id_ns.noiob.get()),
            ops,
            copy_offloads,
        };
        tracing::info!(
            device = %info.name,
            id = %info.id,
            block_size = info.block_size,
            blocks = info.block_count,
            max_transfer_blocks = info.max_transfer_blocks,
            copy = !info.copy_offloads.is_empty(),
            "NVMe namespace leaf ready"
        );
        Ok(NamespaceLeaf {
            info,
            ctrl,
            ns,
            queue: QueueOptions::default(),
        })
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<C> {
        &self.ctrl
    }

    /// The namespace as the driver knows it.
    pub fn namespace(&self) -> Namespace {
        self.ns
    }

    /// An allocator of buffers valid on this controller (and on every
    /// other controller of its DMA context).
    pub fn dma_allocator(&self) -> Option<Arc<dyn DmaAllocator>> {
        self.ctrl
            .dma_context()
            .map(|ctx| Arc::new(NvmeDmaAllocator::new(Arc::clone(ctx))) as Arc<dyn DmaAllocator>)
    }

    #[cfg(feature = "emu")]
    pub(super) fn with_kind(mut self, kind: DeviceKind) -> NamespaceLeaf<C> {
        self.info.kind = kind;
        self
    }

    fn open_qpair(&self, depth: usize) -> Result<C::Queue, BdevError> {
        let entries =
            u16::try_from(depth.saturating_add(1).max(MIN_QUEUE_ENTRIES)).unwrap_or(u16::MAX);
        self.ctrl
            .create_queue(QueueOptions {
                entries,
                ..self.queue
            })
            .map_err(|source| BdevError::Nvme {
                device: self.info.name.clone(),
                action: "create an I/O queue pair",
                source: Box::new(source),
            })
    }
}

impl<C: NvmeHost> BlockDevice for NamespaceLeaf<C> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let qp = self.open_qpair(depth)?;
        let depth = depth.max(1).min(qp.depth());
        Ok(Box::new(NvmeChannel::new(
            self.info.clone(),
            self.ns,
            qp,
            depth,
        )))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn iova_allocator(&self) -> Option<Arc<dyn DmaAllocator>> {
        self.dma_allocator()
    }

    fn backing(&self) -> BackingId {
        BackingId::Namespace {
            controller: OffloadDomain::handle(&self.ctrl),
            nsid: self.ns.nsid,
        }
    }

    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        let Some(CopyOffload::NvmeCopy { max_ranges, .. }) = self.info.copy_offloads.first() else {
            return Ok(None);
        };
        let max_ranges = *max_ranges as usize;
        let qp = self.open_qpair(depth)?;
        let depth = depth.max(1).min(qp.depth());
        Ok(Some(Box::new(NvmeCopyChannel::new(
            self.info.clone(),
            self.ns,
            qp,
            depth,
            max_ranges,
        ))))
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
