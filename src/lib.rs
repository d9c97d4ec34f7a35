//! ustor: userspace storage drivers in the SPDK mould.
//!
//! This facade re-exports the member crates:
//! - [`nvme`]: polled-mode NVMe over VFIO, and an in-process controller;
//! - [`scsi_sg`]: SCSI over the Linux SG_IO interface, and an in-process target;
//! - [`bdev_stack`]: the block-device abstraction and its virtual devices;
//! - [`copy_engine`]: the two-phase, token-based copy engine.
//!
//! The log-structured store of `examples/gc` is the `log-store` crate; the
//! command-line tools (`ustor-perf`, `ustor-copybench`) are in
//! `ustor-tools`.
#![warn(missing_docs)]

pub use bdev_stack;
pub use copy_engine;
pub use nvme;
pub use scsi_sg;
