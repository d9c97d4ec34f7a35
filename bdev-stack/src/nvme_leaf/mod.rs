//! The NVMe namespace leaf: a [`BlockDevice`] over one namespace of an
//! [`nvme::Controller`], generic over its transport (VFIO or the in-process
//! emulator), so the I/O path inside the leaf is statically dispatched down
//! to the doorbell write.
//!
//! - Each [`Channel`](crate::Channel) owns one I/O queue pair (created when
//!   the channel opens); submission validates, stages the command with PRPs
//!   built from the request's [`DmaSlice::iova`](crate::DmaSlice::iova) and
//!   returns; `poll` rings and harvests. Per-request state lives in a slab
//!   sized at open: nothing is allocated per I/O.
//! - Buffers must carry IOVAs of the controller's [`DmaContext`]
//!   ([`DeviceInfo::needs_iova`](crate::DeviceInfo::needs_iova)); a buffer
//!   of another context is refused at submission with
//!   [`IoErrorKind::WrongDmaContext`](crate::IoErrorKind::WrongDmaContext),
//!   before anything reaches the device. Allocate them with
//!   [`dma_allocator_for`] over the stack, or from
//!   [`NvmeNamespace::dma_allocator`] (an [`NvmeDmaAllocator`]).
//! - The description comes from Identify: block size and count, MDTS as the
//!   largest transfer, NOIOB as the optimal boundary, ONCS for write zeroes,
//!   deallocate (advertised when DLFEAT says deallocated blocks read as
//!   zeroes) and Copy. With Copy and non-zero MSRC/MSSRL/MCL the leaf
//!   advertises [`CopyOffload::NvmeCopy`](crate::CopyOffload::NvmeCopy) and
//!   opens [`CopyChannel`](crate::CopyChannel)s that send one Copy command
//!   per [`OffloadRequest`](crate::OffloadRequest).
//!
//! Spec leaves (registered in [`crate::spec::LeafRegistry::with_defaults`]):
//! `emu:SIZE[,bs=512|4096][,null][,msrc=N,mssrl=N,mcl=N][,file=PATH][,thread]` opens an
//! in-process emulated controller with one namespace; `nvme:DDDD:BB:DD.F/NSID`
//! opens a namespace of a controller bound to vfio-pci. Both are opened in
//! the registry's [`NvmeEnvironment`]: all `emu:` leaves of one registry
//! share its host DMA context and all `nvme:` leaves its VFIO container, so
//! one buffer serves a stripe over several controllers. Another registry
//! has another environment, with contexts of its own. `emu:` and `nvme:`
//! leaves never share a context: a stack mixing them has no buffer both
//! accept.
//!
//! [`BlockDevice`]: crate::BlockDevice
//! [`DmaContext`]: nvme::DmaContext

mod channel;
mod copy;
mod dma;
mod env;
mod factory;
mod namespace;
mod tcp;

#[cfg(not(feature = "emu"))]
pub(crate) use crate::no_emu::EmuFactory;
pub(crate) use channel::io_kind;
pub(crate) use copy::{CopyLimits, check_copy, failed_copy};
pub use dma::{NvmeDmaAllocator, NvmeDmaBuffer, dma_allocator_for};
pub use env::NvmeEnvironment;
#[cfg(feature = "emu")]
pub(crate) use factory::EmuFactory;
#[cfg(feature = "emu")]
pub use factory::EmuNamespace;
pub(crate) use factory::NvmeFactory;
pub(crate) use namespace::nvme_ops;
pub use namespace::{NamespaceLeaf, NvmeHost, NvmeNamespace, TcpNamespace};
pub(crate) use tcp::TcpFactory;

#[cfg(test)]
mod tests {
    use super::channel::NvmeChannel;
    use super::copy::NvmeCopyChannel;
    use super::*;
    use nvme::emu::EmuController;
    use nvme::vfio::VfioPci;

    #[test]
    fn channels_are_send() {
        fn send<T: Send>() {}
        send::<NvmeChannel<nvme::QueuePair<EmuController>>>();
        send::<NvmeCopyChannel<nvme::QueuePair<VfioPci>>>();
        send::<NvmeChannel<nvme::tcp::TcpQueuePair>>();
        send::<NvmeDmaBuffer>();
    }
}
