//! A window on another device: blocks `[offset, offset + blocks)` of it as
//! a device of its own, as a member's data area after its metadata.

use std::sync::Arc;

use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, check_map_range,
};
use crate::error::{BdevError, IoError, IoErrorKind};
use crate::hold::WriteHolds;

/// Blocks `[offset, offset + blocks)` of `inner`.
pub struct Slice {
    info: DeviceInfo,
    inner: Arc<dyn BlockDevice>,
    offset: u64,
}

impl Slice {
    /// The window of `blocks` blocks at `offset` of `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>, offset: u64, blocks: u64) -> Result<Slice, BdevError> {
        let outer = inner.info();
        if blocks == 0
            || offset
                .checked_add(blocks)
                .is_none_or(|end| end > outer.block_count)
        {
            return Err(BdevError::InvalidParameter {
                device: outer.name.clone(),
                parameter: "slice",
                reason: format!(
                    "{blocks} blocks at {offset} do not fit its {} blocks",
                    outer.block_count
                ),
            });
        }
        let mut info = outer.clone();
        info.id = DeviceId::fresh();
        info.name = format!("data({})", outer.name);
        info.kind = DeviceKind::Slice;
        info.block_count = blocks;
        info.copy_offloads.clear();
        Ok(Slice {
            info,
            inner,
            offset,
        })
    }

    /// The device the window is on.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

impl BlockDevice for Slice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(SliceChannel {
            info: self.info.clone(),
            inner: self.inner.open_channel(depth)?,
            offset: self.offset,
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        vec![Arc::clone(&self.inner)]
    }

    fn hold_copy_writes(
        &self,
        lba: u64,
        blocks: u64,
        holds: &mut WriteHolds,
    ) -> Result<bool, IoError> {
        check_map_range(&self.info, lba, blocks, Access::Write)?;
        self.inner
            .hold_copy_writes(lba + self.offset, blocks, holds)
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        check_map_range(&self.info, lba, blocks, access)?;
        let first = out.len();
        self.inner.map(lba + self.offset, blocks, access, out)?;
        for f in &mut out[first..] {
            f.lba -= self.offset;
        }
        Ok(())
    }
}

struct SliceChannel {
    info: DeviceInfo,
    inner: Box<dyn Channel>,
    offset: u64,
    _not_sync: NotSync,
}

impl Channel for SliceChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        // The inner device validates the rest; only the window is ours.
        if req.op != IoOp::Flush
            && req
                .lba
                .checked_add(req.blocks)
                .is_none_or(|end| end > self.info.block_count)
        {
            return Err(SubmitError::Invalid(IoError {
                device: self.info.id,
                op: req.op,
                lba: req.lba,
                blocks: req.blocks,
                kind: IoErrorKind::OutOfRange {
                    block_count: self.info.block_count,
                },
            }));
        }
        let moved = IoRequest {
            lba: req.lba + self.offset,
            ..req
        };
        // SAFETY: the caller's contract on the buffer is passed on.
        unsafe { self.inner.submit(moved) }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        // Errors name the inner device's blocks, where they happened.
        self.inner.poll(out)
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
}
