//! Stacks of any level with on-device metadata: a superblock on every
//! member (see [`crate::MetaLayout`]) so that a stack can be found again
//! from its members, in any order. Mirrors also keep their write-intent
//! bitmap ([`Mirror::create`], [`Mirror::assemble`]); a stripe or concat
//! has no redundancy, so it needs every member.

use std::sync::Arc;

use crate::buffer::DmaAllocator;
use crate::device::{BlockDevice, IoRequest};
use crate::error::BdevError;
use crate::mirror::assemble::{meta_error, names, read_area};
use crate::mirror::intent::run_sync;
use crate::mirror::meta::{
    Level, MemberState, MetaLayout, SUPERBLOCK_BYTES, Superblock, new_array_id,
};
use crate::mirror::{Assembly, Mirror, ResyncNeed};
use crate::slice::Slice;
use crate::split::{Concat, Stripe};

/// Makes `members` a stack of `level` with metadata: for a mirror,
/// `blocks` is the write-intent region (and the initial sync runs before
/// this returns; [`Mirror::create`] lets it run later); for a stripe, the
/// chunk; a concat ignores it. Whatever the members held is lost.
pub fn create(
    level: Level,
    members: Vec<Arc<dyn BlockDevice>>,
    blocks: u64,
    allocator: Arc<dyn DmaAllocator>,
) -> Result<Arc<dyn BlockDevice>, BdevError> {
    if level == Level::Mirror {
        let mirror = Mirror::create(members, blocks, allocator)?;
        mirror.resync_dirty()?.run()?;
        return Ok(Arc::new(mirror));
    }
    if members.is_empty()
        || members.len() > crate::MAX_LEGS
        || (level == Level::Stripe && members.len() < 2)
    {
        return Err(BdevError::TooFewMembers {
            device: "stripe or concat with metadata (at most 32 members)",
            min: if level == Level::Stripe { 2 } else { 1 },
            got: members.len(),
        });
    }
    let chunk = if level == Level::Stripe { blocks } else { 1 };
    let block_size = members[0].info().block_size;
    let smallest = members
        .iter()
        .map(|m| m.info().block_count)
        .min()
        .unwrap_or(0);
    let salt = Arc::new(());
    let array_id = new_array_id(&salt);
    let mut layouts = Vec::with_capacity(members.len());
    for (i, m) in members.iter().enumerate() {
        if m.info().block_size != block_size {
            return Err(BdevError::BlockSizeMismatch {
                device: names(&members),
                member: m.info().name.clone(),
                expected: block_size,
                found: m.info().block_size,
            });
        }
        // A stripe's members hold the same amount; a concat's their own.
        let size = if level == Level::Stripe {
            smallest
        } else {
            m.info().block_count
        };
        let layout =
            MetaLayout::plain(size, block_size, chunk).map_err(|e| meta_error(m.as_ref(), e))?;
        let sb = Superblock {
            level,
            array_id,
            member_index: i as u32,
            member_count: members.len() as u32,
            layout,
            events: 1,
            clean: true,
            states: vec![MemberState::Healthy; members.len()],
            bitmap_crc: crc32fast::hash(&[]),
        };
        write_superblock(m.as_ref(), &sb, &allocator)?;
        layouts.push(layout);
    }
    build(level, &members, &layouts, chunk)
}

fn write_superblock(
    member: &dyn BlockDevice,
    sb: &Superblock,
    allocator: &Arc<dyn DmaAllocator>,
) -> Result<(), BdevError> {
    let mut area = vec![0u8; SUPERBLOCK_BYTES as usize];
    sb.encode(&mut area);
    let mut buffer = allocator.allocate(area.len())?;
    buffer.fill_from(0, &area)?;
    let blocks = SUPERBLOCK_BYTES / u64::from(member.info().block_size);
    let mut channel = member.open_channel(1)?;
    let io = |source| BdevError::Io {
        context: "writing stack metadata",
        source,
    };
    run_sync(
        channel.as_mut(),
        IoRequest::write(0, blocks, buffer.dma_slice(), 0),
    )
    .map_err(io)?;
    run_sync(
        channel.as_mut(),
        IoRequest::no_data(crate::IoOp::Flush, 0, 0, 0),
    )
    .map_err(io)
}

fn build(
    level: Level,
    members: &[Arc<dyn BlockDevice>],
    layouts: &[MetaLayout],
    chunk: u64,
) -> Result<Arc<dyn BlockDevice>, BdevError> {
    let slices = members
        .iter()
        .zip(layouts)
        .map(|(m, l)| {
            Slice::new(Arc::clone(m), l.data_offset, l.data_blocks)
                .map(|s| Arc::new(s) as Arc<dyn BlockDevice>)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match level {
        Level::Stripe => Arc::new(Stripe::new(slices, chunk)?),
        _ => Arc::new(Concat::new(slices)?),
    })
}

/// Reads and checks the superblock of one member, without assembling:
/// which stack it belongs to, at what level, and where.
pub fn read_superblock(
    device: &dyn BlockDevice,
    allocator: &Arc<dyn DmaAllocator>,
) -> Result<Superblock, BdevError> {
    let info = device.info();
    let head = read_area(device, SUPERBLOCK_BYTES, allocator)?;
    Superblock::decode(&head, info.block_count, info.block_size).map_err(|e| meta_error(device, e))
}

/// Assembles the stack whose members `devices` are, in any order: a
/// mirror (see [`Mirror::assemble`]), or a stripe or concat, which needs
/// every member. Strangers, duplicates and missing members of a stripe or
/// concat are typed errors.
pub fn assemble(
    devices: Vec<Arc<dyn BlockDevice>>,
    allocator: Arc<dyn DmaAllocator>,
) -> Result<(Arc<dyn BlockDevice>, Assembly), BdevError> {
    let Some(first) = devices.first() else {
        return Err(BdevError::TooFewMembers {
            device: "assemble",
            min: 1,
            got: 0,
        });
    };
    let sb = read_superblock(first.as_ref(), &allocator)?;
    if sb.level == Level::Mirror {
        let (mirror, report) = Mirror::assemble(devices, allocator)?;
        return Ok((Arc::new(mirror), report));
    }
    let mut slots: Vec<Option<(Superblock, Arc<dyn BlockDevice>)>> =
        (0..sb.member_count).map(|_| None).collect();
    for device in &devices {
        let info = device.info();
        let own = read_superblock(device.as_ref(), &allocator)?;
        if own.array_id != sb.array_id
            || own.level != sb.level
            || own.member_count != sb.member_count
        {
            return Err(BdevError::Assembly {
                device: info.name.clone(),
                reason: "is a member of another stack: leave it out".into(),
            });
        }
        match slots.get_mut(own.member_index as usize) {
            Some(slot @ None) => *slot = Some((own, Arc::clone(device))),
            _ => {
                return Err(BdevError::Assembly {
                    device: info.name.clone(),
                    reason: format!(
                        "member {} is named twice: name each member once",
                        own.member_index
                    ),
                });
            }
        }
    }
    if let Some(missing) = slots.iter().position(Option::is_none) {
        return Err(BdevError::Assembly {
            device: names(&devices),
            reason: format!(
                "member {missing} is missing: a stripe or concat has no copy of its blocks; name every member"
            ),
        });
    }
    let found: Vec<(Superblock, Arc<dyn BlockDevice>)> = slots.into_iter().flatten().collect();
    let members: Vec<Arc<dyn BlockDevice>> = found.iter().map(|(_, d)| Arc::clone(d)).collect();
    let layouts: Vec<MetaLayout> = found.iter().map(|(s, _)| s.layout).collect();
    let stack = build(sb.level, &members, &layouts, sb.layout.region_blocks)?;
    let report = Assembly {
        members: members
            .iter()
            .map(|m| Some(m.info().name.clone()))
            .collect(),
        events: found.iter().map(|(s, _)| s.events).max().unwrap_or(0),
        was_clean: true,
        resync: ResyncNeed::Nothing,
    };
    Ok((stack, report))
}
