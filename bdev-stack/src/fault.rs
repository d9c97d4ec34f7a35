//! A wrapper that injects faults, for tests of everything above a leaf:
//! fail reads or writes on given ranges, fail the Nth operation, or hold
//! writes forever (a device that stopped answering, or a crash in flight).
//!
//! Rules live behind a shared handle ([`FaultHandle`]) so a test can change
//! them while I/O runs. To the stack the wrapper is a leaf: mapping stops
//! here, because its I/O must pass through it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use crate::device::{
    Access, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, DeviceKind, IoOp, IoRequest,
    LeafFragment, NotSync, SubmitError, map_leaf,
};
use crate::error::{BdevError, IoError, IoErrorKind};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete with this error, without touching the device.
    Fail(IoErrorKind),
    /// Never complete (the request stays outstanding).
    Hold,
}

/// One fault rule: requests of `op` overlapping `range` get `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// The operation it applies to.
    pub op: IoOp,
    /// Blocks it applies to.
    pub range: Range<u64>,
    /// What happens.
    pub action: FaultAction,
}

#[derive(Debug, Default)]
struct FaultState {
    rules: Vec<FaultRule>,
    /// Fail the operation whose 1-based sequence number this is.
    fail_nth: Option<u64>,
    seen: u64,
    injected: u64,
}

/// Shared control of a [`FaultyDevice`]'s rules.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    state: Arc<Mutex<FaultState>>,
}

impl FaultHandle {
    fn with<T>(&self, f: impl FnOnce(&mut FaultState) -> T) -> T {
        // Rules are plain data: a poisoned lock still holds valid rules.
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds a rule.
    pub fn add(&self, rule: FaultRule) {
        self.with(|s| s.rules.push(rule));
    }

    /// Fails the `n`th operation from now (1 = the next), whatever it is.
    pub fn fail_nth(&self, n: u64) {
        self.with(|s| s.fail_nth = Some(s.seen + n));
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.with(|s| {
            s.rules.clear();
            s.fail_nth = None;
        });
    }

    /// How many requests got a fault so far.
    pub fn injected(&self) -> u64 {
        self.with(|s| s.injected)
    }

    fn decide(&self, req: &IoRequest) -> Option<FaultAction> {
        self.with(|s| {
            s.seen += 1;
            let action = if s.fail_nth == Some(s.seen) {
                Some(FaultAction::Fail(IoErrorKind::Medium))
            } else {
                let end = req.lba.saturating_add(req.blocks);
                s.rules
                    .iter()
                    // A flush names no blocks: it concerns the whole device.
                    .find(|r| {
                        r.op == req.op
                            && (req.op == IoOp::Flush
                                || (r.range.start < end && req.lba < r.range.end))
                    })
                    .map(|r| r.action)
            };
            if action.is_some() {
                s.injected += 1;
            }
            action
        })
    }
}

/// A device that passes I/O to another, except where rules say to fail.
pub struct FaultyDevice {
    info: DeviceInfo,
    inner: Arc<dyn BlockDevice>,
    handle: FaultHandle,
}

impl FaultyDevice {
    /// Wraps `inner`; returns the device and the handle to its rules.
    pub fn new(inner: Arc<dyn BlockDevice>) -> (FaultyDevice, FaultHandle) {
        let mut info = inner.info().clone();
        info.id = DeviceId::fresh();
        info.name = format!("faulty({})", info.name);
        info.kind = DeviceKind::FaultInjector;
        info.copy_offloads.clear();
        let handle = FaultHandle::default();
        (
            FaultyDevice {
                info,
                inner,
                handle: handle.clone(),
            },
            handle,
        )
    }
}

impl BlockDevice for FaultyDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        let depth = depth.max(1);
        Ok(Box::new(FaultyChannel {
            info: self.info.clone(),
            inner: self.inner.open_channel(depth)?,
            handle: self.handle.clone(),
            failed: VecDeque::with_capacity(depth),
            held: 0,
            depth,
            _not_sync: NotSync::default(),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        vec![Arc::clone(&self.inner)]
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

struct FaultyChannel {
    info: DeviceInfo,
    inner: Box<dyn Channel>,
    handle: FaultHandle,
    failed: VecDeque<Completion>,
    held: usize,
    depth: usize,
    _not_sync: NotSync,
}

impl Channel for FaultyChannel {
    fn device(&self) -> DeviceId {
        self.info.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if self.failed.len() + self.held + self.inner.outstanding() >= self.depth {
            return Err(SubmitError::Busy);
        }
        self.info.validate(&req).map_err(SubmitError::Invalid)?;
        match self.handle.decide(&req) {
            Some(FaultAction::Fail(kind)) => {
                self.failed.push_back(Completion {
                    ctx: req.ctx,
                    result: Err(req.error(self.info.id, kind)),
                });
                Ok(())
            }
            Some(FaultAction::Hold) => {
                self.held += 1;
                Ok(())
            }
            // SAFETY: the same request under the same contract our caller
            // accepted.
            None => unsafe { self.inner.submit(req) },
        }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = crate::device::drain_completions(&mut self.failed, out);
        n + self.inner.poll(&mut out[n..])
    }

    fn outstanding(&self) -> usize {
        self.failed.len() + self.held + self.inner.outstanding()
    }
}
