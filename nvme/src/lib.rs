//! Polled-mode NVMe over VFIO.
#![warn(missing_docs)]
