//! The SCSI LUN leaf: a [`BlockDevice`] over a probed logical unit.
//!
//! Two transports:
//!
//! - `sg:` — a LUN behind `/dev/sgN`. Data channels run over
//!   [`SgQueue`] (queued asynchronous sg I/O, several files per LUN): each
//!   channel owns one page-aligned [`AlignedBuf`](scsi_sg::AlignedBuf) per
//!   slot, sized to the leaf's max transfer when it opens, and copies
//!   between the caller's [`DmaSlice`](crate::DmaSlice) and that buffer
//!   (the queued interface owns its buffers while a command is in flight,
//!   so the device never touches caller memory). READ(16)/WRITE(16),
//!   SYNCHRONIZE CACHE(16), WRITE SAME(16) for write zeroes and UNMAP for
//!   deallocate where the LUN's VPD pages say it supports them.
//! - `sgemu:` — a LUN of the in-process
//!   [`EmuTarget`](scsi_sg::emu::EmuTarget), for host tests and machines
//!   without SCSI hardware. Its data channel executes each command
//!   through the same typed commands when it is submitted (like the memory
//!   leaf) and completes it at the next poll.
//!
//! Copy offload ([`ScsiLeaf::open_copy_channel`]) runs EXTENDED COPY(LID1)
//! (identification CSCDs 0xE4 by NAA, block-to-block segments 0x02),
//! POPULATE TOKEN + RECEIVE ROD TOKEN INFORMATION, and WRITE USING TOKEN
//! with OFFSET INTO ROD. Submission only records the command (into storage
//! sized when the channel opens); the command is executed **synchronously
//! inside [`CopyChannel::poll`]**, through `SG_IO` or the emulator: copy
//! commands are few and large, and a copy manager holds the command for
//! the whole copy anyway, so a queued path would buy little.
//!
//! Outcomes follow what the copy engine needs to keep data safe:
//! ILLEGAL REQUEST (the command was not executed) is `NotDone` —
//! `TokenExpired`/`TokenInvalid` for INVALID TOKEN OPERATION (ASC 0x23),
//! `Limits` for too many descriptors, `OutOfRange` for LBA OUT OF RANGE,
//! `Unsupported` otherwise; UNIT ATTENTION, NOT READY and BUSY are
//! `NotDone(NotExecuted)`; COPY ABORTED, medium and hardware errors,
//! timeouts and transport failures leave the destination unknown
//! (`DestinationUnknown`). A failed EXTENDED COPY claims no partial
//! count: LIO has no RECEIVE COPY STATUS for LID1 lists, so it is redone in
//! full. A ROD-token command that ends GOOD is checked with RECEIVE ROD
//! TOKEN INFORMATION under its own list identifier: a short WRITE USING
//! TOKEN is `Partial` at the transfer count, a short ROD gives a token of
//! the blocks it represents (see `copy`).
//!
//! Pairing uses identities the library controls. An `sgemu:` LUN's copy
//! manager is its [`EmuTarget`](scsi_sg::emu::EmuTarget) object
//! ([`OffloadDomain::handle`]), never the target's name; an `sg:` LUN's is
//! its SCSI target nexus (`host:channel:target`, resolved from sysfs).
//! EXTENDED COPY names LUNs by NAA designator, so a leaf marks its
//! designator unique only after checking every other LUN its copy manager
//! reaches (the target's LUNs; the nexus's LUNs in sysfs), and its
//! [`BackingId`] is the designator only then (see `designator`).
//!
//! Layout: this module probes the LUN and describes the leaf; `io` holds
//! the data channels, `copy` the copy channel, `designator` the uniqueness
//! check, `emu` the `sgemu:` factory, and `caller_buf` the only unsafe code
//! (access to a request's buffer).

mod caller_buf;
mod copy;
mod designator;
#[cfg(feature = "emu")]
mod emu;
mod io;

#[cfg(not(feature = "emu"))]
pub use crate::no_emu::SgEmuFactory;
#[cfg(feature = "emu")]
pub use emu::SgEmuFactory;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "emu")]
use scsi_sg::ScsiTransport;
#[cfg(feature = "emu")]
use scsi_sg::emu::EmuLun;
use scsi_sg::tpc::CopyOperatingParameters;
use scsi_sg::vpd::RodLimits;
use scsi_sg::{Identity, ScsiDevice, SgDevice, SgQueue};
use tracing::{debug, info, warn};

use crate::device::{
    Access, BlockDevice, Channel, CopyOffload, DeviceId, DeviceInfo, DeviceKind, LeafFragment,
    SupportedOps, map_leaf,
};
use crate::error::{BdevError, IoError};
use crate::identity::{BackingId, OffloadDomain};
use crate::offload::CopyChannel;
use crate::spec::{LeafError, LeafFactory, LeafSpec};

use copy::{ListIds, ScsiCopyChannel};
use designator::{Hctl, Uniqueness};
#[cfg(feature = "emu")]
use io::EmuChannel;
use io::SgChannel;

/// Largest read or write one sg command carries, whatever VPD 0xB0 allows:
/// each channel slot owns a buffer this big.
pub const SG_MAX_TRANSFER_BYTES: u64 = 512 << 10;

/// Longest designator an identification CSCD descriptor holds.
const MAX_DESIGNATOR: usize = 20;

/// The transport under a leaf.
enum Backend {
    /// A LUN through `/dev/sgN`: the probed device for synchronous
    /// commands (copy offload), and the path for the queued data channels.
    Sg {
        lun: Arc<ScsiDevice<SgDevice>>,
        path: PathBuf,
    },
    /// A LUN of the in-process emulated target.
    #[cfg(feature = "emu")]
    Emu { lun: Arc<ScsiDevice<EmuLun>> },
}

/// What the leaf may send for the data operations beyond read and write.
#[derive(Debug, Clone, Copy)]
struct DataCaps {
    /// WRITE SAME(16) blocks per command (0: unlimited by the LUN).
    write_same_max: u64,
    /// UNMAP blocks per command (0: unlimited by the LUN).
    unmap_max: u64,
}

/// A SCSI logical unit as a leaf of the block-device stack.
pub struct ScsiLeaf {
    info: DeviceInfo,
    backend: Backend,
    caps: DataCaps,
    naa: Option<Vec<u8>>,
    /// The LUN by its designator when that was verified unique within its
    /// copy manager, else the leaf itself.
    backing: BackingId,
    /// List identifiers for the copy channels' commands, shared so that
    /// two channels of the leaf never use one at the same time.
    list_ids: Arc<ListIds>,
    xcopy: Option<CopyOperatingParameters>,
    rod: Option<RodLimits>,
}

impl fmt::Debug for ScsiLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScsiLeaf")
            .field("name", &self.info.name)
            .field("id", &self.info.id)
            .field("block_size", &self.info.block_size)
            .field("block_count", &self.info.block_count)
            .field("copy_offloads", &self.info.copy_offloads)
            .finish_non_exhaustive()
    }
}

fn scsi_error(device: &Path, action: &'static str, source: scsi_sg::Error) -> BdevError {
    BdevError::Scsi {
        device: device.display().to_string(),
        action,
        source: Box::new(source),
    }
}

/// The copy manager a leaf's LUN is reached through, and what the leaf
/// verified about its designator there.
struct CopyManagerReach {
    /// Pairing identity: the emulated target's own state, or the SCSI
    /// target nexus the library resolved from sysfs.
    domain: OffloadDomain,
    /// Whether no other LUN reached through it reports this LUN's NAA
    /// designator.
    uniqueness: Uniqueness,
}

impl CopyManagerReach {
    /// Logs why EXTENDED COPY will not name the LUN, when it will not.
    fn explain(&self, leaf: &str, offers_xcopy: bool) {
        let why = match &self.uniqueness {
            Uniqueness::Verified => return,
            Uniqueness::Repeated { other } => format!("{other} reports the same NAA designator"),
            Uniqueness::Unverifiable { reason } => {
                format!("its NAA designator could not be verified unique: {reason}")
            }
        };
        if offers_xcopy {
            warn!(leaf, copy_manager = %self.domain, "EXTENDED COPY will not be used for this LUN: {why}");
        } else {
            debug!(leaf, copy_manager = %self.domain, "designator not verified unique: {why}");
        }
    }
}

impl ScsiLeaf {
    /// Opens and probes the LUN behind the sg node `path` (`/dev/sgN`).
    ///
    /// Errors are [`BdevError::Scsi`] with the typed SCSI error: no such
    /// device, no permission, not an sg character device (a `/dev/sdX`
    /// path is refused: the queued interface needs the sg node), not a
    /// direct-access device.
    pub fn open_sg(path: impl AsRef<Path>) -> Result<ScsiLeaf, BdevError> {
        let path = path.as_ref();
        // Opening a queue checks the node is an sg character device; the
        // queue itself is not kept.
        drop(SgQueue::open(path, 1).map_err(|e| scsi_error(path, "opening the sg node", e))?);
        let lun = ScsiDevice::open(path).map_err(|e| scsi_error(path, "probing the LUN", e))?;
        let sysfs = Path::new("/sys");
        let reach = match Hctl::of_sg_node(sysfs, path) {
            Some(hctl) => CopyManagerReach {
                domain: OffloadDomain::address(&hctl.nexus()),
                uniqueness: match lun.identity().naa() {
                    Some(naa) => designator::sysfs(sysfs, hctl, naa),
                    None => Uniqueness::no_designator(),
                },
            },
            None => CopyManagerReach {
                domain: OffloadDomain::address(&format!("scsi-lun:{}", path.display())),
                uniqueness: Uniqueness::Unverifiable {
                    reason: format!("sysfs names no SCSI nexus for {}", path.display()),
                },
            },
        };
        let name = format!("sg:{}", path.display());
        ScsiLeaf::build(
            name,
            DeviceKind::Scsi,
            reach,
            lun.identity().clone(),
            SG_MAX_TRANSFER_BYTES,
            Backend::Sg {
                lun: Arc::new(lun),
                path: path.to_path_buf(),
            },
        )
    }

    /// A leaf over LUN `lun` of an emulated target. The target is the
    /// LUN's copy manager: EXTENDED COPY and ROD tokens pass only between
    /// LUNs of one [`EmuTarget`](scsi_sg::emu::EmuTarget) (one target
    /// object, whatever the targets are named).
    #[cfg(feature = "emu")]
    pub fn from_emu(lun: EmuLun) -> Result<ScsiLeaf, BdevError> {
        let path = lun.path().to_path_buf();
        let handle = lun.clone();
        let lun = ScsiDevice::probe(lun).map_err(|e| scsi_error(&path, "probing the LUN", e))?;
        let reach = CopyManagerReach {
            domain: OffloadDomain::handle(handle.target().state()),
            uniqueness: match lun.identity().naa() {
                Some(naa) => designator::emulated(&handle, naa),
                None => Uniqueness::no_designator(),
            },
        };
        ScsiLeaf::build(
            format!("sgemu:{}", path.display()),
            DeviceKind::Emulated,
            reach,
            lun.identity().clone(),
            1 << 20,
            Backend::Emu { lun: Arc::new(lun) },
        )
    }

    fn build(
        name: String,
        kind: DeviceKind,
        reach: CopyManagerReach,
        identity: Identity,
        max_transfer_bytes: u64,
        backend: Backend,
    ) -> Result<ScsiLeaf, BdevError> {
        let block_size = identity.capacity.logical_block_length;
        let invalid = |parameter, reason: String| BdevError::InvalidParameter {
            device: name.clone(),
            parameter,
            reason,
        };
        if block_size == 0 || !block_size.is_power_of_two() {
            return Err(invalid(
                "block size",
                format!("the LUN reports {block_size}-byte blocks"),
            ));
        }
        let block_count = identity
            .capacity
            .block_count()
            .ok_or_else(|| invalid("capacity", "READ CAPACITY(16) gave no size".into()))?;
        let mut max_transfer_blocks = (max_transfer_bytes / u64::from(block_size)).max(1);
        let limits = identity.block_limits;
        if let Some(l) = limits
            && l.max_transfer > 0
        {
            max_transfer_blocks = max_transfer_blocks.min(u64::from(l.max_transfer));
        }
        let mut ops = SupportedOps::READ | SupportedOps::WRITE | SupportedOps::FLUSH;
        let provisioning = identity.provisioning;
        // WRITE SAME of a zero block writes zeroes whether or not the LUN
        // is thin; LIO and the emulator take it. Limited by VPD 0xB0.
        let write_same_max = limits.map_or(0, |l| l.max_write_same);
        if limits.is_some() {
            ops |= SupportedOps::WRITE_ZEROES;
        }
        // Deallocate must read back as zeroes (the stack's contract): only
        // a LUN that takes UNMAP and reads unmapped blocks as zeroes.
        let unmap_max = limits.map_or(0, |l| u64::from(l.max_unmap_lba_count));
        if provisioning.is_some_and(|p| p.lbpu && p.lbprz) && unmap_max > 0 {
            ops |= SupportedOps::DEALLOCATE;
        }
        let naa = identity.naa().map(<[u8]>::to_vec);
        let mut copy_offloads = Vec::new();
        let xcopy = match (&naa, identity.copy.extended_copy.clone()) {
            (Some(naa), Some(p)) if naa.len() <= MAX_DESIGNATOR && p.max_cscd_descriptors >= 2 => {
                copy_offloads.push(CopyOffload::ScsiExtendedCopy {
                    naa: naa.clone(),
                    copy_manager: reach.domain.clone(),
                    designator_unique: reach.uniqueness.is_verified(),
                    max_segments: p.max_segment_descriptors,
                    max_segment_bytes: u64::from(p.max_segment_length),
                });
                Some(p)
            }
            _ => None,
        };
        let rod = match (&naa, identity.copy.rod_tokens.as_ref()) {
            (Some(naa), Some(r)) if r.limits.max_range_descriptors > 0 => {
                copy_offloads.push(CopyOffload::ScsiRodToken {
                    naa: naa.clone(),
                    // A token names its ROD by the copy manager's own
                    // reference, not by designator: no uniqueness needed.
                    copy_manager: reach.domain.clone(),
                    max_ranges: u32::from(r.limits.max_range_descriptors),
                    // A ROD token counts blocks; 0 means no stated limit.
                    max_token_blocks: r.limits.max_token_transfer_size,
                });
                Some(r.limits)
            }
            _ => None,
        };
        let info = DeviceInfo {
            id: DeviceId::fresh(),
            name,
            kind,
            block_size,
            block_count,
            max_transfer_blocks,
            // Data passes through the channel's own aligned buffers.
            buf_align: 1,
            needs_iova: false,
            dma_context: None,
            optimal_boundary_blocks: limits.map_or(0, |l| u64::from(l.optimal_transfer)),
            ops,
            copy_offloads,
        };
        reach.explain(&info.name, xcopy.is_some());
        info!(
            leaf = %info.name,
            id = %info.id,
            block_size,
            block_count,
            max_transfer_blocks,
            xcopy = xcopy.is_some(),
            rod = rod.is_some(),
            copy_manager = %reach.domain,
            designator_unique = reach.uniqueness.is_verified(),
            "SCSI leaf ready"
        );
        Ok(ScsiLeaf {
            backend,
            caps: DataCaps {
                write_same_max,
                unmap_max,
            },
            backing: match (&naa, reach.uniqueness.is_verified()) {
                (Some(naa), true) => BackingId::Lun {
                    copy_manager: reach.domain,
                    designator: Arc::from(naa.as_slice()),
                },
                _ => BackingId::Device(info.id),
            },
            list_ids: Arc::new(ListIds::new(info.id)),
            info,
            naa,
            xcopy,
            rod,
        })
    }

    /// What the probe learned about the LUN.
    pub fn identity(&self) -> &Identity {
        match &self.backend {
            Backend::Sg { lun, .. } => lun.identity(),
            #[cfg(feature = "emu")]
            Backend::Emu { lun } => lun.identity(),
        }
    }
}

impl BlockDevice for ScsiLeaf {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let depth = depth.max(1);
        match &self.backend {
            #[cfg(feature = "emu")]
            Backend::Emu { lun } => Ok(Box::new(EmuChannel::new(self, lun, depth))),
            Backend::Sg { path, .. } => SgChannel::open(&self.info, self.caps, path, depth)
                .map(|c| Box::new(c) as Box<dyn Channel>),
        }
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn backing(&self) -> BackingId {
        self.backing.clone()
    }

    fn open_copy_channel(&self, depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        if self.info.copy_offloads.is_empty() {
            return Ok(None);
        }
        Ok(Some(match &self.backend {
            Backend::Sg { lun, .. } => Box::new(ScsiCopyChannel::new(self, lun, depth)),
            #[cfg(feature = "emu")]
            Backend::Emu { lun } => Box::new(ScsiCopyChannel::new(self, lun, depth)),
        }))
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

/// Opens `sg:/dev/sgN` leaves: the LUN through [`SgQueue`].
#[derive(Debug, Default)]
pub struct SgFactory;

impl LeafFactory for SgFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        if let Some(option) = spec.options.first() {
            return Err(LeafError::BadOption {
                key: option.key.to_string(),
                reason: "sg: takes no options".into(),
            });
        }
        if !spec.body.starts_with('/') {
            return Err(LeafError::BadBody(format!(
                "`{}` is not a device path (e.g. sg:/dev/sg1)",
                spec.body
            )));
        }
        Ok(Arc::new(ScsiLeaf::open_sg(spec.body)?))
    }
}
