//! The leaf: an NVMe namespace the kernel keeps, opened through its
//! generic character device and described from Identify.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvme::spec::{
    IdentifyController, IdentifyNamespace, ONCS_COPY, SubmissionEntry, admin_opc, ascii_field, cns,
};
use zerocopy::FromBytes;

use super::channel::NgChannel;
use super::copy::NgCopyChannel;
use super::sys::{self, AdminError};
use crate::buffer::DmaAllocator;
use crate::device::{
    Access, BlockDevice, Channel, CopyOffload, DeviceId, DeviceInfo, DeviceKind, LeafFragment,
    map_leaf,
};
use crate::error::{BdevError, IoError};
use crate::identity::{BackingId, OffloadDomain};
use crate::offload::CopyChannel;
use crate::registered::{LazyRegistered, RegisteredAllocator};

/// Source ranges one Copy command carries at most: one 4 KiB page of
/// format-0 descriptors.
pub(super) const COPY_RANGES: u32 = 128;
/// The page size the kernel maps passthrough buffers in.
const PAGE: u64 = 4096;
/// The largest transfer assumed when sysfs says nothing (the kernel's own
/// default for a controller without MDTS is larger).
const FALLBACK_MAX_TRANSFER: u64 = 128 * 1024;

/// What the kernel says about the namespace's queue (sysfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLimits {
    /// `max_hw_sectors_kb` in bytes.
    pub max_hw_bytes: Option<u64>,
    /// `max_segments`: one page each for an unregistered buffer.
    pub max_segments: Option<u64>,
    /// `io_poll`: the controller has poll queues (`nvme.poll_queues`).
    pub poll_queues: bool,
    /// The block device's number (`dev`), the same blocks as this node.
    pub block_dev: Option<u64>,
    /// The block device's name (`nvmeXnY`).
    pub block_name: Option<String>,
    /// The kernel's hardware queues to the controller (`mq/*`), which
    /// passthrough commands go through.
    pub hw_queues: Option<u16>,
}

/// How an `ng:` leaf runs its channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NgOptions {
    /// I/O channels poll the device for completions (IORING_SETUP_IOPOLL,
    /// on the kernel's poll queues): for callers that poll without
    /// sleeping, since a polled ring completes nothing between polls.
    pub poll: bool,
    /// The leaf's allocator hands out buffers registered with its rings
    /// (fixed-buffer commands). Off by default: on Linux 6.1 a fixed-buffer
    /// passthrough was slower than an ordinary one (QD 32 on QEMU: 65 K
    /// against 125 K IOPS in one boot).
    pub registered_buffers: bool,
}

/// A namespace through its NVMe generic character device (`/dev/ngXnY`),
/// driven with NVMe commands over io_uring passthrough.
pub struct NgNamespace {
    info: DeviceInfo,
    file: Arc<File>,
    path: PathBuf,
    nsid: u32,
    polled: bool,
    limits: QueueLimits,
    copy_limits: Option<(u32, u64, u64)>,
    backing: BackingId,
    /// The namespace's block device, held exclusively (`O_EXCL`) so that
    /// nothing mounts it while this leaf writes.
    _claim: Option<File>,
    identify: Box<(IdentifyController, IdentifyNamespace)>,
    registered: LazyRegistered,
    registered_buffers: bool,
}

fn problem(path: &Path, problem: impl Into<String>, source: Option<io::Error>) -> BdevError {
    BdevError::Passthrough {
        device: format!("ng:{}", path.display()),
        problem: problem.into(),
        source,
    }
}

const FIND_NODE: &str = "`nvme list -v` shows each namespace's generic node /dev/ngXnY";
const NEED_ADMIN: &str = "NVMe passthrough needs CAP_SYS_ADMIN before Linux 6.2 (and write \
                          access to the node after): run as root or grant the capability";

impl NgNamespace {
    /// Opens `path`, an NVMe generic character device, as `options` say
    /// ([`NgOptions`]). Copy channels always take interrupts (a Copy is
    /// long, and the copy engine sleeps while it runs).
    ///
    /// Errors ([`BdevError::Passthrough`], saying what to do): no such
    /// node, no permission, not an NVMe generic character device, Identify
    /// refused, a namespace format the leaf cannot use (metadata or
    /// protection information per block), polling asked for where the
    /// kernel has no poll queues.
    pub fn open(path: &Path, options: NgOptions) -> Result<NgNamespace, BdevError> {
        let poll = options.poll;
        let meta = std::fs::metadata(path).map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::NotFound => format!("no such node: {FIND_NODE}"),
                io::ErrorKind::PermissionDenied => format!("no permission: {NEED_ADMIN}"),
                _ => "cannot stat".to_string(),
            };
            problem(path, hint, Some(e))
        })?;
        if !meta.file_type().is_char_device() {
            return Err(problem(
                path,
                format!(
                    "not a character device: name the namespace's generic node, not its \
                     block device or a file ({FIND_NODE})"
                ),
                None,
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    format!("no permission to open: {NEED_ADMIN}")
                } else {
                    "cannot open".to_string()
                };
                problem(path, hint, Some(e))
            })?;
        // What was opened, not what the path names now.
        let meta = file
            .metadata()
            .map_err(|e| problem(path, "cannot stat the open node", Some(e)))?;
        if !meta.file_type().is_char_device() {
            return Err(problem(
                path,
                "changed under us: no longer a character device",
                None,
            ));
        }
        let fd = file.as_raw_fd();
        let nsid = sys::namespace_id(fd).map_err(|e| {
            problem(
                path,
                format!("not an NVMe generic character device ({FIND_NODE})"),
                Some(e),
            )
        })?;
        let admin_failed = |what: &str, e: AdminError| match e {
            AdminError::Status(s) => problem(path, format!("{what} failed: {s}"), None),
            AdminError::Os(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
                problem(path, format!("{what} refused: {NEED_ADMIN}"), Some(e))
            }
            AdminError::Os(e) => problem(path, format!("{what} failed"), Some(e)),
        };
        let mut page = vec![0u8; 4096];
        let identify = |cns: u8, nsid: u32, page: &mut [u8]| {
            let sqe = SubmissionEntry::new(admin_opc::IDENTIFY, nsid).with_cdws(&[u32::from(cns)]);
            sys::admin(fd, &sqe, page)
        };
        identify(cns::CONTROLLER, 0, &mut page)
            .map_err(|e| admin_failed("Identify Controller", e))?;
        let ctrl = IdentifyController::read_from_bytes(&page[..size_of::<IdentifyController>()])
            .map_err(|_| problem(path, "Identify Controller: short data", None))?;
        page.fill(0);
        identify(cns::NAMESPACE, nsid, &mut page)
            .map_err(|e| admin_failed("Identify Namespace", e))?;
        let ns = IdentifyNamespace::read_from_bytes(&page[..])
            .map_err(|_| problem(path, "Identify Namespace: short data", None))?;
        let format = ns.lba_format_index();
        let Some(block_size) = ns.block_size() else {
            return Err(problem(
                path,
                format!(
                    "Identify Namespace names LBA format {format}, which it does not list \
                     with a block size of 512 B to 64 KiB"
                ),
                None,
            ));
        };
        let metadata = ns.lbaf[format].ms.get();
        if metadata != 0 || ns.dps & 0x7 != 0 {
            return Err(problem(
                path,
                format!(
                    "namespace {nsid} is formatted with LBA format {format}: {block_size}-byte \
                     blocks with {metadata} bytes of metadata each (protection type {}); the \
                     ng: leaf moves data only: format the namespace with an LBA format without \
                     metadata (`nvme format --lbaf=N`)",
                    ns.dps & 0x7
                ),
                None,
            ));
        }
        let blocks = ns.nsze.get();
        if blocks == 0 {
            return Err(problem(
                path,
                format!("namespace {nsid} has no blocks"),
                None,
            ));
        }
        let limits = queue_limits(&meta);
        let claim = claim_block_device(path, limits.block_name.as_deref())?;
        if poll && !limits.poll_queues {
            return Err(problem(
                path,
                "polling asked for, but the kernel has no poll queues for this controller: \
                 load nvme with poll_queues=N (kernel command line nvme.poll_queues=N when \
                 the driver is built in), or leave poll out",
                None,
            ));
        }
        let polled = poll;
        let bs = u64::from(block_size);
        let mdts_bytes = match ctrl.mdts {
            // The kernel's controller page is 4 KiB (CAP.MPSMIN permitting).
            0 => u64::MAX,
            m => PAGE.checked_shl(u32::from(m)).unwrap_or(u64::MAX),
        };
        let max_bytes = limits
            .max_hw_bytes
            .unwrap_or(FALLBACK_MAX_TRANSFER)
            .min(mdts_bytes)
            // An unregistered buffer's pages are one segment each, and a
            // buffer that does not start on a page spans one more.
            .min(limits.max_segments.map_or(u64::MAX, |s| {
                s.saturating_sub(1).max(1).saturating_mul(PAGE)
            }));
        let oncs = ctrl.oncs.get();
        let ops = crate::nvme_leaf::nvme_ops(oncs, ns.dlfeat);
        let rdev = meta.rdev();
        let name = format!("ng:{}", path.display());
        let mut copy_offloads = Vec::new();
        let mut copy_limits = None;
        let (mssrl, mcl) = (u64::from(ns.mssrl.get()), u64::from(ns.mcl.get()));
        if oncs & ONCS_COPY != 0 && mssrl > 0 && mcl > 0 {
            let max_ranges = (u32::from(ns.msrc) + 1).min(COPY_RANGES);
            copy_limits = Some((max_ranges, mssrl, mcl));
            copy_offloads.push(CopyOffload::NvmeCopy {
                // The node itself: Copy stays within the namespace it names,
                // and a node is one namespace whoever reported what.
                controller: OffloadDomain::address(&format!(
                    "nvme-generic:{}:{}",
                    libc::major(rdev),
                    libc::minor(rdev)
                )),
                subsystem: ascii_field(&ctrl.subnqn),
                nsid,
                max_ranges,
                max_range_blocks: mssrl,
                max_command_blocks: mcl,
            });
        }
        // The blocks are the block device's: `file:/dev/nvmeXnY` and this
        // leaf overlap.
        let backing = BackingId::File {
            dev: limits.block_dev.unwrap_or(rdev),
            ino: 0,
        };
        let info = DeviceInfo {
            id: DeviceId::fresh(),
            name,
            kind: DeviceKind::Nvme,
            block_size,
            block_count: blocks,
            max_transfer_blocks: (max_bytes / bs).max(1),
            // The kernel maps passthrough buffers at dword alignment.
            buf_align: 4,
            needs_iova: false,
            dma_context: None,
            optimal_boundary_blocks: u64::from(ns.noiob.get()),
            ops,
            copy_offloads,
        };
        tracing::info!(
            device = %info.name,
            nsid,
            block_size,
            blocks,
            max_transfer_blocks = info.max_transfer_blocks,
            polled,
            copy = copy_limits.is_some(),
            "NVMe passthrough leaf ready"
        );
        Ok(NgNamespace {
            info,
            file: Arc::new(file),
            path: path.to_path_buf(),
            nsid,
            polled,
            limits,
            copy_limits,
            backing,
            _claim: claim,
            identify: Box::new((ctrl, ns)),
            registered: LazyRegistered::default(),
            registered_buffers: options.registered_buffers,
        })
    }

    /// The node opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Namespace id.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// True when channels poll the device for completions (IOPOLL).
    pub fn is_polled(&self) -> bool {
        self.polled
    }

    /// Identify Controller, as read when the leaf opened.
    pub fn identify_controller(&self) -> &IdentifyController {
        &self.identify.0
    }

    /// Identify Namespace, as read when the leaf opened.
    pub fn identify_namespace(&self) -> &IdentifyNamespace {
        &self.identify.1
    }

    /// What the kernel reported about the namespace's queue.
    pub fn queue_limits(&self) -> &QueueLimits {
        &self.limits
    }

    /// The open node, for the raw passthrough queues.
    pub(super) fn file(&self) -> &Arc<File> {
        &self.file
    }
}

/// The kernel's limits for the namespace behind a generic node, from
/// sysfs: `ngXnY`'s block device `nvmeXnY`.
fn queue_limits(meta: &std::fs::Metadata) -> QueueLimits {
    let rdev = meta.rdev();
    let node = PathBuf::from(format!(
        "/sys/dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let block_name = std::fs::canonicalize(&node)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .and_then(|n| n.strip_prefix("ng").map(|rest| format!("nvme{rest}")));
    let block = block_name
        .as_ref()
        .map(|n| PathBuf::from("/sys/block").join(n));
    let read = |name: &str| -> Option<String> {
        let path = block.as_ref()?.join(name);
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let number = |name: &str| read(name).and_then(|s| s.parse::<u64>().ok());
    let hw_queues = block
        .as_ref()
        .and_then(|b| std::fs::read_dir(b.join("mq")).ok())
        .map(|dir| dir.filter(|e| e.is_ok()).count())
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&n| n > 0);
    QueueLimits {
        hw_queues,
        max_hw_bytes: number("queue/max_hw_sectors_kb").map(|kb| kb.saturating_mul(1024)),
        max_segments: number("queue/max_segments"),
        poll_queues: number("queue/io_poll") == Some(1),
        block_dev: read("dev").and_then(|s| {
            let (major, minor) = s.split_once(':')?;
            Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
        }),
        block_name,
    }
}

/// Holds the namespace's block device exclusively, as the kernel lets one
/// holder do: a mounted file system on it (or on a partition) makes this
/// fail, and nothing can mount it while the claim lives. Readers such as
/// `dd` are not held off.
fn claim_block_device(path: &Path, block_name: Option<&str>) -> Result<Option<File>, BdevError> {
    let Some(name) = block_name else {
        tracing::warn!(path = %path.display(), "no block device found for this node; it is not held against mounts");
        return Ok(None);
    };
    let node = PathBuf::from("/dev").join(name);
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(&node)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(problem(
            path,
            format!(
                "its block device {} is in use (a mounted file system, or held exclusively by \
                 another program or another ng: leaf): unmount it or stop its other user",
                node.display()
            ),
            Some(e),
        )),
        Err(e) => {
            tracing::warn!(path = %path.display(), node = %node.display(), error = %e, "cannot hold the block device against mounts");
            Ok(None)
        }
    }
}

impl BlockDevice for NgNamespace {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(NgChannel::new(
            self.info.clone(),
            Arc::clone(&self.file),
            self.nsid,
            depth.max(1),
            self.polled,
            self.registered.get(),
        )?))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn backing(&self) -> BackingId {
        self.backing.clone()
    }

    fn host_allocator(&self) -> Option<Arc<dyn DmaAllocator>> {
        if !self.registered_buffers {
            return None;
        }
        let memory = self.registered.get_or_map().ok()?;
        Some(Arc::new(RegisteredAllocator::new(memory)))
    }

    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        let Some(limits) = self.copy_limits else {
            return Ok(None);
        };
        Ok(Some(Box::new(NgCopyChannel::new(
            self.info.clone(),
            Arc::clone(&self.file),
            self.nsid,
            depth.max(1),
            limits,
        )?)))
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        map_leaf(&self.info, lba, blocks, access, out)
    }
}
