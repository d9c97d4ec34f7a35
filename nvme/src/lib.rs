//! Polled-mode NVMe: a userspace driver over VFIO, and an in-process
//! emulated controller that follows the specification.
//!
//! # Architecture
//!
//! The driver runs in user space, SPDK style: it owns the controller, talks
//! to it by MMIO on BAR0 and by DMA into memory it allocated itself, and
//! polls for completions instead of taking interrupts.
//!
//! ```text
//!   Controller<T> (bring-up, admin, identify, reset, shutdown)
//!   QueuePair<T>  (one per thread: submit / ring / poll, CID slots,
//!      |           PRP-list pool, request splitting)
//!      |  generic over T: Transport = RegisterAccess + DmaContext
//!      v
//!   vfio::VfioPci (BAR0 mmap, IOMMU)     emu::EmuController (registers,
//!      |                                    queues in host memory, PRPs)
//!   DmaContext: one IOMMU domain (VFIO container) or host IOVA space;
//!   every controller of a context sees every DmaBuffer of it.
//! ```
//!
//! - [`spec`]: wire structures (SQE, CQE, Identify, log pages, Copy
//!   descriptors), opcodes, [`NvmeStatus`] with names. [`regs`]: registers.
//! - [`Transport`]: the seam. [`vfio::VfioPci`] and [`emu::EmuController`]
//!   implement it; the I/O path is generic over it, not `dyn`.
//! - [`Controller`] / [`QueuePair`]: the driver. Submission never blocks or
//!   allocates ([`SubmitError::QueueFull`] is a value), doorbells are
//!   batched, `poll` is bounded, every device-supplied value is checked.
//! - [`dma`]: [`DmaContext`], [`DmaBuffer`] (RAII, volatile access only),
//!   [`DmaSlice`] (keeps memory alive while the device owns it).
//! - [`view`]: [`ControllerView`] / [`IoQueue`], commands and their
//!   status without PRPs, IOVAs or doorbells; [`Controller`] /
//!   [`QueuePair`] implement them, and so can other hosts (the block-device
//!   stack's io_uring passthrough).
//! - [`conformance`]: checks run on the emulator (host tests) and on
//!   QEMU's controller (VM tests): the command checks over any
//!   [`ControllerView`], the reset checks over [`Controller`].
//!
//! `unsafe` lives in `vfio::sys` (ioctls and syscalls), the BAR's volatile
//! accessors and [`dma`]'s volatile accessors; each block carries a
//! `// SAFETY:` comment.
//!
//! # Example
//!
//! Write and read back a block on the emulated controller (on hardware,
//! replace the transport with `nvme::vfio::VfioPci::open("0000:00:04.0")?`):
//!
//! ```
//! use std::time::Duration;
//! use nvme::emu::{EmuConfig, EmuController};
//! use nvme::{Controller, ControllerOptions, DmaContext, QueueOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ctx = DmaContext::host();
//! let emu = EmuController::new(&ctx, EmuConfig::default())?;
//! let ctrl = Controller::new(emu, ControllerOptions::default())?;
//! let ns = ctrl.namespace(1).ok_or("no namespace 1")?;
//! let mut qp = ctrl.create_qpair(QueueOptions::default())?;
//!
//! let buf = ctrl.dma_alloc(4096)?;
//! buf.write_bytes(0, b"hello")?;
//! qp.write(&ns, 8, &buf.as_slice(), 1)?; // staged: the device has not read it yet
//! for c in qp.drain(Duration::from_secs(1))? {
//!     c.result?; // rung, completed: the buffer is ours again
//! }
//! let back = ctrl.dma_alloc(4096)?;
//! qp.read(&ns, 8, &back.as_slice(), 2)?;
//! qp.read(&ns, 8, &back.as_slice(), 3)?; // two reads, one doorbell write
//! for c in qp.drain(Duration::from_secs(1))? {
//!     c.result?;
//! }
//! let mut got = [0u8; 5];
//! back.read_bytes(0, &mut got)?;
//! assert_eq!(&got, b"hello");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod cmd;
#[cfg(feature = "emu")]
pub mod conformance;
pub mod dma;
mod driver;
#[cfg(feature = "emu")]
pub mod emu;
mod error;
pub mod mmio;
pub mod regs;
pub mod spec;
pub mod split;
pub mod tcp;
mod transport;
pub mod vfio;
pub mod view;

pub use dma::{DmaBuffer, DmaContext, DmaContextId, DmaSlice};
pub use driver::{
    Completion, Controller, ControllerOptions, DoorbellWrites, IoError, Namespace, PAGE_SIZE,
    QueueOptions, QueuePair, SubmitError,
};
pub use error::{Error, Result};
pub use mmio::RegisterAccess;
pub use spec::NvmeStatus;
pub use transport::Transport;
pub use view::{BlockQueue, ControllerView, DataRef, IoQueue, NamespaceScope};
