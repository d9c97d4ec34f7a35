//! ustor: userspace storage drivers in the SPDK mould.
//!
//! This facade re-exports the member crates:
//! - [`nvme`]: polled-mode NVMe over VFIO, and an in-process controller;
//! - [`scsi_sg`]: SCSI over the Linux SG_IO interface, and an in-process target;
//! - [`bdev_stack`]: the block-device abstraction and its virtual devices;
//! - [`copy_engine`]: the two-phase, token-based copy engine;
//! - [`gc`]: a log-structured block store and its cleaner (`examples/gc`).
#![warn(missing_docs)]

pub use bdev_stack;
pub use copy_engine;
pub use nvme;
pub mod copybench;
pub mod gc;
pub mod perf;
pub use scsi_sg;
