//! Mirrors with on-device metadata: creating one over raw members, and
//! assembling it again from its members, in any order, after a clean or
//! an unclean stop.

use std::sync::Arc;

use tracing::{info, warn};

use super::dirty::DirtyMap;
use super::intent::{IntentLog, run_sync};
use super::meta::{MemberState, MetaError, MetaLayout, SUPERBLOCK_BYTES, Superblock, new_array_id};
use super::{FAILED, Mirror};
use crate::buffer::DmaAllocator;
use crate::device::{BlockDevice, IoRequest};
use crate::error::BdevError;
use crate::slice::Slice;

/// What assembly found, and what the caller has to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembly {
    /// Per member index: the device name, or `None` when it was missing
    /// (its leg starts failed: replace it).
    pub members: Vec<Option<String>>,
    /// The event counter the members agreed on.
    pub events: u64,
    /// How the array was stopped.
    pub was_clean: bool,
    /// What must be resynced before the legs are known equal: run
    /// [`Mirror::resync_dirty`].
    pub resync: ResyncNeed,
}

/// What an assembled mirror must resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncNeed {
    /// Stopped clean: the legs are equal.
    Nothing,
    /// Stopped unclean: the regions the durable bitmap names.
    Regions(Vec<u64>),
    /// The bitmap cannot be trusted (its checksum is wrong): every region.
    Everything,
}

/// A member as assembly read it: superblock, bitmap, device.
type FoundMember = (Superblock, Vec<u8>, Arc<dyn BlockDevice>);

pub(crate) fn meta_error(device: &dyn BlockDevice, source: MetaError) -> BdevError {
    BdevError::Metadata {
        device: device.info().name.clone(),
        source,
    }
}

/// Reads the metadata area of `member`.
pub(crate) fn read_area(
    member: &dyn BlockDevice,
    bytes: u64,
    allocator: &Arc<dyn DmaAllocator>,
) -> Result<Vec<u8>, BdevError> {
    let info = member.info();
    let bs = u64::from(info.block_size);
    let blocks = bytes.div_ceil(bs).min(info.block_count);
    let len =
        usize::try_from(blocks * bs).map_err(|_| BdevError::OutOfMemory { bytes: usize::MAX })?;
    let mut buffer = allocator.allocate(len)?;
    let mut channel = member.open_channel(1)?;
    run_sync(
        channel.as_mut(),
        IoRequest::read(0, blocks, buffer.dma_slice(), 0),
    )
    .map_err(|source| BdevError::Io {
        context: "reading mirror metadata",
        source,
    })?;
    let mut out = vec![0u8; len];
    buffer.copy_to(0, &mut out)?;
    Ok(out)
}

impl Mirror {
    /// Makes `members` (raw devices, one block size) a mirror with metadata:
    /// on each a superblock and a write-intent bitmap of regions of
    /// `region_blocks`, then the data. The mirror's size is the smallest
    /// member's data area. Whatever the members held is lost.
    ///
    /// The legs hold whatever they held before, so, as md does, every
    /// region starts out awaiting the initial sync: the bitmap is written
    /// all set (a crash before the sync finds it again), reads use the
    /// primary leg, and [`Mirror::resync_dirty`] makes the legs equal;
    /// [`Mirror::stop`] refuses until it has. Members known to hold equal
    /// data (zeroed, say) can skip it with [`Mirror::create_assume_clean`].
    pub fn create(
        members: Vec<Arc<dyn BlockDevice>>,
        region_blocks: u64,
        allocator: Arc<dyn DmaAllocator>,
    ) -> Result<Mirror, BdevError> {
        Mirror::create_with(members, region_blocks, allocator, false)
    }

    /// [`Mirror::create`] without the initial sync, as `mdadm
    /// --assume-clean`: only for members whose data areas are already
    /// equal, or reads of never-written blocks may differ leg to leg.
    pub fn create_assume_clean(
        members: Vec<Arc<dyn BlockDevice>>,
        region_blocks: u64,
        allocator: Arc<dyn DmaAllocator>,
    ) -> Result<Mirror, BdevError> {
        Mirror::create_with(members, region_blocks, allocator, true)
    }

    fn create_with(
        members: Vec<Arc<dyn BlockDevice>>,
        region_blocks: u64,
        allocator: Arc<dyn DmaAllocator>,
        assume_clean: bool,
    ) -> Result<Mirror, BdevError> {
        if members.len() < 2 || members.len() > super::MAX_LEGS {
            return Err(BdevError::TooFewMembers {
                device: "mirror (at most 32 legs)",
                min: 2,
                got: members.len(),
            });
        }
        let smallest = members
            .iter()
            .min_by_key(|m| m.info().block_count)
            .map(Arc::clone)
            .ok_or(BdevError::TooFewMembers {
                device: "mirror",
                min: 2,
                got: 0,
            })?;
        let block_size = smallest.info().block_size;
        let layout = MetaLayout::new(smallest.info().block_count, block_size, region_blocks)
            .map_err(|e| meta_error(smallest.as_ref(), e))?;
        let salt = Arc::new(());
        let sb = Superblock {
            level: super::meta::Level::Mirror,
            array_id: new_array_id(&salt),
            member_index: 0,
            member_count: members.len() as u32,
            layout,
            events: 1,
            clean: assume_clean,
            states: vec![MemberState::Healthy; members.len()],
            bitmap_crc: 0,
        };
        // Every member's own geometry must place the data where the
        // smallest's does (same block size, bitmap of the same size).
        for m in &members {
            let own = MetaLayout::new(m.info().block_count, m.info().block_size, region_blocks)
                .map_err(|e| meta_error(m.as_ref(), e))?;
            if own.data_offset != layout.data_offset || m.info().block_size != block_size {
                return Err(BdevError::InvalidParameter {
                    device: m.info().name.clone(),
                    parameter: "member",
                    reason: "its size or block size gives another metadata layout than the others; use members of one size".into(),
                });
            }
        }
        let dirty = Arc::new(DirtyMap::new(layout.data_blocks, region_blocks)?);
        let mut bits = vec![0u8; layout.bitmap_bytes as usize];
        if !assume_clean {
            for r in 0..dirty.region_count() {
                if let Some(b) = bits.get_mut((r / 8) as usize) {
                    *b |= 1 << (r % 8);
                }
                dirty.mark_suspect(r);
            }
        }
        let name = format!("mirror-md({})", names(&members));
        let log = Arc::new(IntentLog::new(name, members.clone(), sb, bits, &allocator)?);
        let failed = log.write_all_members();
        if failed != 0 {
            return Err(BdevError::MirrorState {
                device: names(&members),
                reason: format!("writing the metadata failed on members {failed:#b}"),
            });
        }
        let mirror = Mirror::over_members(&members, &layout, dirty, log)?;
        mirror.set_allocator(allocator);
        info!(mirror = %mirror.info.name, blocks = layout.data_blocks, assume_clean, "mirror created with metadata");
        Ok(mirror)
    }

    /// Assembles the mirror whose members `devices` are (in any order, some
    /// may be missing): reads and checks every superblock, refuses members
    /// of another array, duplicates and stale members (a lower event
    /// count than the others: they missed writes), starts degraded without
    /// missing members, and marks for resync what an unclean stop left
    /// uncertain: the regions of the durable bitmap, or everything when
    /// the bitmap cannot be trusted. Reads of those regions use the
    /// primary leg until [`Mirror::resync_dirty`] has run.
    pub fn assemble(
        devices: Vec<Arc<dyn BlockDevice>>,
        allocator: Arc<dyn DmaAllocator>,
    ) -> Result<(Mirror, Assembly), BdevError> {
        let mut found: Vec<FoundMember> = Vec::new();
        for device in &devices {
            let info = device.info();
            let head = read_area(device.as_ref(), SUPERBLOCK_BYTES, &allocator)?;
            let sb = Superblock::decode(&head, info.block_count, info.block_size)
                .map_err(|e| meta_error(device.as_ref(), e))?;
            let area = read_area(device.as_ref(), sb.layout.meta_bytes(), &allocator)?;
            let bits = area
                .get(SUPERBLOCK_BYTES as usize..sb.layout.meta_bytes() as usize)
                .unwrap_or(&[])
                .to_vec();
            found.push((sb, bits, Arc::clone(device)));
        }
        let Some((first, _, _)) = found.first() else {
            return Err(BdevError::TooFewMembers {
                device: "assemble",
                min: 1,
                got: 0,
            });
        };
        let (array_id, count, layout) = (first.array_id, first.member_count, first.layout);
        let events = found.iter().map(|(sb, _, _)| sb.events).max().unwrap_or(0);
        let mut slots: Vec<Option<FoundMember>> = (0..count).map(|_| None).collect();
        for (sb, bits, device) in found {
            let name = device.info().name.clone();
            if sb.level != super::meta::Level::Mirror {
                return Err(BdevError::Assembly {
                    device: name,
                    reason: "is a member of a stripe or concat, not a mirror: assemble it as a stack (assemble(...) in a spec)".into(),
                });
            }
            if sb.array_id != array_id
                || sb.member_count != count
                || sb.layout.region_blocks != layout.region_blocks
            {
                return Err(BdevError::Assembly {
                    device: name,
                    reason: "is a member of another array: leave it out".into(),
                });
            }
            if sb.events < events {
                return Err(BdevError::Assembly {
                    device: name,
                    reason: format!(
                        "is stale (events {} against {events}): it missed writes; assemble without it, then replace it with itself",
                        sb.events
                    ),
                });
            }
            let index = sb.member_index as usize;
            match slots.get_mut(index) {
                Some(slot @ None) => *slot = Some((sb, bits, device)),
                _ => {
                    return Err(BdevError::Assembly {
                        device: name,
                        reason: format!("member {index} is named twice: name each member once"),
                    });
                }
            }
        }
        // The freshest superblock's word on member states and cleanliness.
        let Some((latest, _, _)) = slots.iter().flatten().next() else {
            return Err(BdevError::Assembly {
                device: "assemble".into(),
                reason: "no member found".into(),
            });
        };
        let latest = latest.clone();
        let mut bits = vec![0u8; layout.bitmap_bytes as usize];
        let mut trusted = true;
        for (sb, member_bits, _) in slots.iter().flatten() {
            if member_bits.len() != bits.len() || crc32fast::hash(member_bits) != sb.bitmap_crc {
                trusted = false;
                continue;
            }
            // Any member's bit counts: the union is safe.
            for (b, m) in bits.iter_mut().zip(member_bits) {
                *b |= m;
            }
        }
        let dirty = Arc::new(DirtyMap::new(layout.data_blocks, layout.region_blocks)?);
        let resync = if latest.clean && trusted {
            ResyncNeed::Nothing
        } else if trusted {
            let regions: Vec<u64> = (0..dirty.region_count())
                .filter(|&r| {
                    bits.get((r / 8) as usize)
                        .is_some_and(|b| b & (1 << (r % 8)) != 0)
                })
                .collect();
            ResyncNeed::Regions(regions)
        } else {
            warn!("the write-intent bitmap cannot be trusted: every region will be resynced");
            ResyncNeed::Everything
        };
        match &resync {
            ResyncNeed::Nothing => {}
            ResyncNeed::Regions(regions) => regions.iter().for_each(|&r| dirty.mark_suspect(r)),
            ResyncNeed::Everything => (0..dirty.region_count()).for_each(|r| dirty.mark_suspect(r)),
        }
        // Missing members: a placeholder of the right size, failed.
        let members: Vec<Arc<dyn BlockDevice>> = slots
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some((_, _, d)) => Ok(Arc::clone(d)),
                None => Missing::new(i, &layout).map(|m| Arc::new(m) as Arc<dyn BlockDevice>),
            })
            .collect::<Result<_, _>>()?;
        let report = Assembly {
            members: slots
                .iter()
                .map(|s| s.as_ref().map(|(_, _, d)| d.info().name.clone()))
                .collect(),
            events,
            was_clean: latest.clean,
            resync,
        };
        let mut sb = latest;
        for (i, s) in slots.iter().enumerate() {
            if s.is_none() {
                sb.states[i] = MemberState::Failed;
            }
        }
        let name = format!("mirror-md({})", names(&members));
        let log = Arc::new(IntentLog::new(
            name,
            members.clone(),
            sb.clone(),
            bits,
            &allocator,
        )?);
        let mirror = Mirror::over_members(&members, &layout, dirty, log)?;
        for (leg, state) in sb.states.iter().enumerate() {
            let code = match state {
                MemberState::Healthy => continue,
                MemberState::Failed => FAILED,
                // A rebuild that did not finish starts over as failed:
                // replace the member (with itself) to rebuild it.
                MemberState::Resyncing { .. } => FAILED,
            };
            mirror.shared.health[leg].store(code, std::sync::atomic::Ordering::Release);
        }
        mirror.set_allocator(allocator);
        info!(mirror = %mirror.info.name, ?report, "mirror assembled");
        Ok((mirror, report))
    }

    fn over_members(
        members: &[Arc<dyn BlockDevice>],
        layout: &MetaLayout,
        dirty: Arc<DirtyMap>,
        log: Arc<IntentLog>,
    ) -> Result<Mirror, BdevError> {
        let legs = members
            .iter()
            .map(|m| {
                Slice::new(Arc::clone(m), layout.data_offset, layout.data_blocks)
                    .map(|s| Arc::new(s) as Arc<dyn BlockDevice>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Mirror::with_parts(legs, dirty, Some(log))
    }

    /// A clean stop of a mirror with metadata: once no write is in flight
    /// and no region awaits a resync, the bitmap is cleared and the array
    /// marked clean on every member, so the next assembly resyncs
    /// nothing. Keeps working after (the next write marks it dirty again).
    pub fn stop(&self) -> Result<(), BdevError> {
        match &self.shared.intent {
            Some(log) => log.stop_clean(self.shared.writable(), &self.shared.dirty),
            None => Ok(()),
        }
    }

    /// The superblock as the members hold it, for a mirror with metadata.
    pub fn superblock(&self) -> Option<Superblock> {
        self.shared.intent.as_ref().map(|log| log.superblock())
    }
}

pub(crate) fn names(members: &[Arc<dyn BlockDevice>]) -> String {
    members
        .iter()
        .map(|m| m.info().name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A member assembly did not find: the right size, every I/O fails.
struct Missing {
    info: crate::device::DeviceInfo,
}

impl Missing {
    fn new(index: usize, layout: &MetaLayout) -> Result<Missing, BdevError> {
        let blocks = layout
            .data_offset
            .checked_add(layout.data_blocks)
            .ok_or(BdevError::OutOfMemory { bytes: usize::MAX })?;
        Ok(Missing {
            info: crate::device::DeviceInfo {
                id: crate::device::DeviceId::fresh(),
                name: format!("missing-member-{index}"),
                kind: crate::device::DeviceKind::Memory,
                block_size: layout.block_size,
                block_count: blocks,
                max_transfer_blocks: u64::MAX,
                buf_align: 1,
                needs_iova: false,
                dma_context: None,
                optimal_boundary_blocks: 0,
                ops: crate::device::SupportedOps::all(),
                copy_offloads: Vec::new(),
            },
        })
    }
}

impl BlockDevice for Missing {
    fn info(&self) -> &crate::device::DeviceInfo {
        &self.info
    }

    fn open_channel(&self, _depth: usize) -> Result<Box<dyn crate::device::Channel>, BdevError> {
        Err(BdevError::MirrorState {
            device: self.info.name.clone(),
            reason: "the member is missing: replace it".into(),
        })
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: crate::device::Access,
        out: &mut Vec<crate::device::LeafFragment>,
    ) -> Result<(), crate::error::IoError> {
        crate::device::map_leaf(&self.info, lba, blocks, access, out)
    }
}
