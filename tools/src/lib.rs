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

/// `e` and its causes, one a line: the tools print the whole chain, as a
/// cause names the value at fault and an error what to do about it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str("\n  caused by: ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
