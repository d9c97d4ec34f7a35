//! The engines of ustor's command-line tools, kept out of the library
//! crates so their users do not pull clap, hdrhistogram or serde:
//! - [`perf`]: `ustor-perf`, IOPS and latency in the manner of
//!   `spdk_nvme_perf`;
//! - [`copybench`]: `ustor-copybench`, a relocation by copy offload against
//!   the same through host memory.
//!
//! The binaries are in `src/bin`; the guest of the VM rig runs the engines
//! directly.
#![warn(missing_docs)]

pub mod copybench;
pub mod perf;

pub use bdev_stack::error_chain;
