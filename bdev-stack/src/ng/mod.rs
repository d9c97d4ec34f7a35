//! The `ng:` leaf: an NVMe namespace the kernel keeps, driven through its
//! generic character device (`/dev/ngXnY`) with NVMe commands carried by
//! io_uring passthrough (`IORING_OP_URING_CMD`, 128-byte submission and
//! 32-byte completion entries; Linux 5.19 and later).
//!
//! For users who cannot hand a drive to VFIO (the root file system lives
//! on it, other programs use it, there is no IOMMU), and the only way to
//! send NVMe Copy to a namespace the kernel owns: Linux has no block-layer
//! copy offload.
//!
//! - Opening reads Identify Controller and Identify Namespace through the
//!   admin passthrough ioctl, and the kernel's queue limits from sysfs
//!   (`/sys/block/nvmeXnY/queue`): the largest transfer is the smallest of
//!   MDTS, `max_hw_sectors_kb` and `max_segments` pages.
//! - Each channel owns a ring (one per thread, like a queue pair): Read,
//!   Write, Flush, Write Zeroes and Dataset Management are built by
//!   `nvme::cmd` and pushed on submission, handed to the kernel in one
//!   `io_uring_enter` at the next poll; completions are reaped without
//!   blocking. Nothing is allocated per I/O. Completions come by
//!   interrupt; with `poll=on` the I/O rings poll the device instead
//!   (IOPOLL, on the kernel's poll queues, `nvme.poll_queues=N`): for
//!   callers that poll without sleeping, like `ustor-perf`. A polled ring
//!   completes nothing between polls, so a caller that sleeps while it
//!   waits (the copy engine, the log-structured store) is slowed by it:
//!   the store's test workload took 54-66 s polled, 2 s by interrupt.
//!   Copy channels always take interrupts.
//! - With `registered=on`, buffers from the leaf's allocator lie in memory
//!   registered with its rings: fixed-buffer commands. Off by default: on
//!   Linux 6.1 they were slower than ordinary passthrough (QD 32 on QEMU,
//!   one boot: 65 K against 125 K IOPS).
//! - With ONCS Copy and non-zero MSSRL and MCL the leaf advertises
//!   [`CopyOffload::NvmeCopy`](crate::CopyOffload::NvmeCopy) within the
//!   namespace, paired on the node itself (its device number), and opens
//!   copy channels that send one format-0 Copy per request within MSRC,
//!   MSSRL and MCL.
//! - The kernel owns the commands' timeouts (Abort, then a controller
//!   reset) and completes a command only once the device has let go of it;
//!   a command cancelled by a reset completes as aborted (`EINTR`), its
//!   destination unknown. A channel dropped with commands in flight waits
//!   for them.
//! - [`NgPassthru`] shows the namespace as an [`nvme::ControllerView`]:
//!   queues of raw commands reported with their NVMe status (or the
//!   kernel's errno), on which the NVMe conformance checks run.
//! - Passthrough needs CAP_SYS_ADMIN before Linux 6.2; the namespace must be
//!   formatted without metadata or protection information.
//!
//! Spec leaf: `ng:/dev/ngXnY[,poll=on|off][,registered=on|off]` (both
//! off by default).

mod channel;
mod copy;
mod namespace;
mod passthru;
mod sys;

use std::path::Path;
use std::sync::Arc;

pub use namespace::{NgNamespace, NgOptions, QueueLimits};
pub use passthru::{NgPassthru, NgPassthruQueue};

use crate::device::BlockDevice;
use crate::spec::{LeafError, LeafFactory, LeafSpec};

/// Opens `ng:/dev/ngXnY[,poll=on|off][,registered=on|off]` leaves.
pub(crate) struct NgFactory;

impl LeafFactory for NgFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        let mut options = NgOptions::default();
        for option in spec.options {
            let flag = match option.key {
                "poll" => &mut options.poll,
                "registered" => &mut options.registered_buffers,
                key => {
                    return Err(LeafError::BadOption {
                        key: key.to_string(),
                        reason: "ng: takes poll=on|off and registered=on|off".into(),
                    });
                }
            };
            *flag = match option.value {
                "on" => true,
                "off" => false,
                other => {
                    return Err(LeafError::BadOption {
                        key: option.key.to_string(),
                        reason: format!("`{other}`: on or off"),
                    });
                }
            };
        }
        if spec.body.is_empty() {
            return Err(LeafError::BadBody(
                "expected the generic node's path, e.g. ng:/dev/ng0n1".into(),
            ));
        }
        Ok(Arc::new(NgNamespace::open(Path::new(spec.body), options)?))
    }
}
