//! The block-device stack: one abstraction over NVMe namespaces, SCSI LUNs,
//! memory and files, and the virtual devices (concat, stripe, mirror) built
//! from them.
//!
//! The stack sits above the drivers: it depends on [`nvme`] and [`scsi_sg`],
//! which know nothing of it. Its devices arrive with the block-device issue;
//! this crate is the place they live.
#![warn(missing_docs)]
