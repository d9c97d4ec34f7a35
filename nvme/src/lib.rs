//! Polled-mode NVMe over VFIO.
//!
//! # Architecture
//!
//! The driver runs in user space, SPDK style: it owns the controller through
//! VFIO, talks to it by MMIO on BAR0 and by DMA into memory it allocated
//! itself, and polls for completions instead of taking interrupts.
//!
//! ```text
//!   driver (controller bring-up, queue pairs, namespaces)   [later]
//!      |  generic over R: RegisterAccess          | DMA buffers (IOVA)
//!      v                                          v
//!   mmio::RegisterAccess  <-- regs (offsets, CAP/VS/CC/CSTS/AQA decoding)
//!      |                                          |
//!   vfio::Bar (mmap'ed BAR0)               vfio::DmaBuffer (pinned,
//!      |                                    IOMMU-mapped at an IOVA from
//!   vfio::VfioPci (container, group,        vfio::IovaAllocator)
//!   device fd, PCI config space)
//! ```
//!
//! - [`regs`]: register offsets and decoders (NVMe Base Specification,
//!   "Controller Properties"). Pure, untrusted-input-safe, no I/O.
//! - [`RegisterAccess`]: the one register path between the driver and a
//!   transport; the VFIO BAR implements it (and the in-process emulated
//!   controller will). The driver is generic over it, not `dyn`.
//! - [`vfio`]: the VFIO/PCI transport. [`vfio::VfioPci::open`] checks sysfs,
//!   opens the container, group and device, enables memory space and bus
//!   mastering, maps BAR0 and learns which IOVAs the IOMMU translates.
//!   [`vfio::VfioPci::dma_alloc`] hands out [`vfio::DmaBuffer`]s: anonymous
//!   memory (2 MiB huge pages when available), pinned and mapped into the
//!   IOMMU, unmapped on drop, and only ever accessed by volatile copies.
//! - [`Error`]: one error enum for the crate, with the device, path or range
//!   each failure concerns, and the fix for set-up errors.
//!
//! `unsafe` lives in `vfio::sys` (ioctls and syscalls), the BAR's volatile
//! accessors and the DMA buffer's volatile accessors; each block carries a
//! `// SAFETY:` comment.
//!
//! # Example
//!
//! On a machine (or the test VM) with an NVMe controller bound to vfio-pci:
//!
//! ```no_run
//! use nvme::RegisterAccess;
//! use nvme::vfio::VfioPci;
//!
//! # fn main() -> Result<(), nvme::Error> {
//! let ctrl = VfioPci::open("0000:00:04.0")?;
//! let cap = ctrl.cap();
//! println!("NVMe {} MQES={} DSTRD={}", ctrl.version(), cap.mqes(), cap.dstrd());
//! println!("CSTS: {:?}", ctrl.bar0().csts());
//!
//! let buf = ctrl.dma_alloc(4096)?;
//! buf.write_bytes(0, b"hello")?;
//! println!("buffer at IOVA {:#x}", buf.iova());
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod error;
pub mod mmio;
pub mod regs;
pub mod vfio;

pub use error::{Error, Result};
pub use mmio::RegisterAccess;
