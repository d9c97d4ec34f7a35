//! The engine's table of the devices a copy reads and writes: leaves, and
//! the destination root that bounced bytes are written through. Leaves
//! that share a backing (two handles of one file, one namespace opened
//! twice) share one entry, so hazards and overlap are judged on the blocks,
//! not on the objects.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::wait::Pace;
use bdev_stack::{BackingId, BlockDevice, Channel, CopyChannel, DeviceId, find_device};

use crate::error::CopyError;

/// A device taking part in a copy, with the channels the engine opened to
/// it (lazily, kept for the next copy over the same device).
pub(crate) struct Leaf {
    pub(crate) id: DeviceId,
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) backing: BackingId,
    pub(crate) io: Option<Box<dyn Channel>>,
    pub(crate) copy: Option<Box<dyn CopyChannel>>,
    /// True once `copy` was asked for (it may have come back `None`).
    pub(crate) copy_opened: bool,
    /// How fast `copy` got through its commands, for waiting on them.
    pub(crate) copy_pace: Pace,
    /// Taking part in the current copy.
    pub(crate) in_use: bool,
}

impl Leaf {
    fn new(device: Arc<dyn BlockDevice>) -> Leaf {
        Leaf {
            id: device.info().id,
            backing: device.backing(),
            device,
            io: None,
            copy: None,
            copy_opened: false,
            copy_pace: Pace::default(),
            in_use: true,
        }
    }

    pub(crate) fn io(&mut self, depth: usize) -> Result<&mut Box<dyn Channel>, CopyError> {
        if let Some(channel) = self.io.take() {
            return Ok(self.io.insert(channel));
        }
        let channel = self
            .device
            .open_channel(depth)
            .map_err(|source| CopyError::Device {
                device: self.device.info().name.clone(),
                action: "opening an I/O channel for bounce",
                source,
            })?;
        Ok(self.io.insert(channel))
    }
}

/// The devices of the current and recent copies.
#[derive(Default)]
pub(crate) struct Leaves {
    pub(crate) table: Vec<Leaf>,
    index: LeafIndex,
}

impl Leaves {
    /// The table index of a device already entered.
    pub(crate) fn slot(&self, id: u32) -> Result<u32, CopyError> {
        self.index
            .get(&id)
            .copied()
            .ok_or_else(|| CopyError::UnknownLeaf {
                device: "copy plan".into(),
                leaf: DeviceId(id),
            })
    }

    /// The table index of device `id`, found under `root`; a device whose
    /// backing is already in the table shares that entry.
    pub(crate) fn enter(&mut self, root: &Arc<dyn BlockDevice>, id: u32) -> Result<u32, CopyError> {
        if let Some(&i) = self.index.get(&id) {
            self.table[i as usize].in_use = true;
            return Ok(i);
        }
        let device = find_device(root, DeviceId(id)).ok_or_else(|| CopyError::UnknownLeaf {
            device: root.info().name.clone(),
            leaf: DeviceId(id),
        })?;
        let leaf = Leaf::new(device);
        if let Some(i) = self.table.iter().position(|l| l.backing == leaf.backing) {
            self.table[i].in_use = true;
            self.index.insert(id, i as u32);
            return Ok(i as u32);
        }
        let i = self.table.len() as u32;
        self.table.push(leaf);
        self.index.insert(id, i);
        Ok(i)
    }

    /// The id every alias of entry `slot` is planned under.
    pub(crate) fn canonical(&self, slot: u32) -> u32 {
        self.table[slot as usize].id.0
    }

    /// Closes every channel and lets go of every device.
    pub(crate) fn clear(&mut self) {
        self.table.clear();
        self.index.clear();
    }

    /// Marks every entry unused, before a copy.
    pub(crate) fn start_copy(&mut self) {
        for leaf in &mut self.table {
            leaf.in_use = false;
        }
    }

    /// Keeps the entries this copy used, with their channels, for the
    /// next copy; lets go of the others.
    pub(crate) fn keep_used(&mut self) {
        if self.table.iter().all(|leaf| leaf.in_use) {
            self.start_copy();
            return;
        }
        self.table.retain(|leaf| leaf.in_use);
        self.index.clear();
        for (i, leaf) in self.table.iter_mut().enumerate() {
            leaf.in_use = false;
            self.index.insert(leaf.id.0, i as u32);
        }
    }
}

/// Device id to table index. Looked up per fragment and piece, so hashed
/// with one multiplication rather than SipHash: the keys are small device
/// ids handed out by the stack, not attacker-chosen.
type LeafIndex = HashMap<u32, u32, BuildHasherDefault<LeafIdHasher>>;

/// Fibonacci hashing of a `u32` key.
#[derive(Default)]
struct LeafIdHasher(u64);

impl Hasher for LeafIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = (u64::from(id) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
