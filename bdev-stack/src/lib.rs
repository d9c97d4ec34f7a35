//! The block-device stack: one abstraction over NVMe namespaces, SCSI LUNs,
//! memory and files, and the virtual devices (concat, stripe, mirror) built
//! from them.
//!
//! # Architecture
//!
//! - [`BlockDevice`] describes a device ([`DeviceInfo`]: block size and
//!   count, max transfer, alignment, optimal boundary, supported ops, copy
//!   offloads), maps logical ranges onto leaves for the copy engine
//!   ([`BlockDevice::map`]), and opens per-thread [`Channel`]s.
//! - A [`Channel`] (`Send`, not `Sync`) takes [`IoRequest`]s without
//!   blocking or allocating (a full queue is [`SubmitError::Busy`]) and
//!   returns [`Completion`]s, with the caller's context, from a bounded
//!   [`Channel::poll`]. [`OwnedChannel`] is its safe face, which holds
//!   buffers while devices own them.
//! - Buffers are described by [`DmaSlice`] (host pointer, length, optional
//!   IOVA with the DMA context it is valid in) over library-owned memory
//!   ([`DmaMemory`], [`HostBuffer`]). NVMe leaves take buffers of their
//!   own context only: get them from
//!   [`nvme_leaf::dma_allocator_for`]`(&stack)`.
//! - Copy offload: a leaf that can copy opens a [`CopyChannel`] (NVMe Copy,
//!   EXTENDED COPY, WRITE USING TOKEN all fit its [`OffloadRequest`]);
//!   [`MemDevice::with_copy_offload`] gives a memory leaf an NVMe-Copy-like
//!   one, with fault injection, for host tests of the copy engine.
//! - Leaves: [`MemDevice`], [`FileDevice`], [`NvmeNamespace`] (a queue pair
//!   per channel, over VFIO or the emulated controller; see [`nvme_leaf`]),
//!   and [`FaultyDevice`] for tests; leaves plug in through
//!   [`spec::LeafRegistry`].
//! - Virtual devices: [`Concat`] and [`Stripe`] (one generic splitter,
//!   [`SplitDevice`]) and [`Mirror`].
//! - [`spec::build`] makes a stack from a spec string.
//!
//! # Example
//!
//! ```
//! use bdev_stack::{HostBuffer, OwnedChannel, spec};
//!
//! let dev = spec::build("mirror(stripe(chunk=8k, mem:1m, mem:1m), mem:2m)")?;
//! let mut ch = OwnedChannel::<HostBuffer>::open(dev.as_ref(), 4)?;
//! let mut buf = HostBuffer::new(64 * 512)?;
//! buf.as_mut_slice().fill(0xab);
//! ch.write(10, 64, buf, 1).map_err(|r| r.error)?;
//! let mut done = Vec::new();
//! while done.is_empty() {
//!     ch.poll(8, |ctx, result, buf| done.push((ctx, result, buf)));
//! }
//! assert_eq!(done[0].0, 1);
//! assert!(done[0].1.is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod buffer;
mod device;
mod error;
mod fault;
mod file;
mod hold;
mod identity;
mod mem;
mod mirror;
pub mod ng;
#[cfg(not(feature = "emu"))]
mod no_emu;
pub mod nvme_leaf;
mod offload;
mod owned;
mod pool;
mod registered;
mod scsi_leaf;
mod slice;
pub mod spec;
mod split;
pub mod stack_meta;
mod uring;

pub use buffer::{
    DmaAddress, DmaAllocator, DmaContextId, DmaMemory, DmaSlice, HostAllocator, HostBuffer,
    PAGE_SIZE,
};
pub use device::{
    Access, BlockDevice, Channel, Completion, CopyOffload, DeviceId, DeviceInfo, DeviceKind, IoOp,
    IoRequest, LeafFragment, SubmitError, SupportedOps, find_device,
};
pub use error::{BdevError, IoError, IoErrorKind, error_chain};
pub use fault::{FaultAction, FaultHandle, FaultRule, FaultyDevice};
pub use file::{FILE_MAX_TRANSFER_BYTES, FileDevice, FileEngine};
pub use hold::WriteHolds;
pub use identity::{BackingId, OffloadDomain};
pub use mem::{
    CopyFault, CopyFaultHandle, DEFAULT_MEM_MAX_TRANSFER_BYTES, MemCopyLimits, MemDevice,
};
pub use mirror::meta::{Level, MemberState, MetaError, MetaLayout, Superblock};
pub use mirror::{
    Assembly, CheckReport, DEFAULT_REGION_BYTES, DirtyMap, LegHealth, MAX_LEGS, Mirror,
    MirrorHealth, Resync, ResyncNeed, ResyncReport, ResyncStep,
};
pub use ng::{NgNamespace, NgOptions, NgPassthru, NgPassthruQueue};
pub use nvme_leaf::{NvmeDmaAllocator, NvmeDmaBuffer, NvmeEnvironment, NvmeNamespace};
pub use offload::{
    CopyChannel, DeviceStatus, LbaRange, OffloadCompletion, OffloadError, OffloadErrorKind,
    OffloadOutcome, OffloadRange, OffloadRequest, OffloadSource, OffloadSubmitError, RodToken,
};
pub use owned::{OwnedChannel, Rejected};
pub use registered::{REGISTERED_BYTES, RegisteredAllocator, RegisteredBuffer, RegisteredMemory};
pub use scsi_leaf::{SG_MAX_TRANSFER_BYTES, ScsiLeaf, SgEmuFactory, SgFactory};
pub use slice::Slice;
pub use split::{Concat, ConcatLayout, Layout, SplitDevice, Stripe, StripeLayout};
