//! Helpers shared by the copy engine's integration tests: synchronous I/O,
//! a flat reference model, and per-leaf verification of every replica.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::sync::Arc;

use bdev_stack::{Access, BlockDevice, IoError, LbaRange, find_device};

pub mod scsi;

#[path = "../../../bdev-stack/tests/support/sync_io.rs"]
mod sync_io;
pub use sync_io::SyncIo;

/// A deterministic byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Fills the whole device with a pattern; returns it (the reference).
pub fn fill(device: &Arc<dyn BlockDevice>, seed: u64) -> Vec<u8> {
    let data = pattern(seed, device.info().size_bytes() as usize);
    SyncIo::open(device.as_ref())
        .write(0, &data)
        .expect("fill device");
    data
}

/// Reads the whole device through its root.
pub fn read_all(device: &Arc<dyn BlockDevice>) -> Vec<u8> {
    SyncIo::open(device.as_ref())
        .read(0, device.info().block_count)
        .expect("read device")
}

/// The reference model of a copy: a memmove from the concatenated source
/// ranges to the concatenated destination ranges of one flat array.
pub fn model_copy(reference: &mut [u8], bs: usize, src: &[LbaRange], dst: &[LbaRange]) {
    let mut data = Vec::new();
    for r in src {
        data.extend_from_slice(&reference[r.lba as usize * bs..(r.lba + r.blocks) as usize * bs]);
    }
    let mut at = 0;
    for r in dst {
        let len = r.blocks as usize * bs;
        reference[r.lba as usize * bs..][..len].copy_from_slice(&data[at..at + len]);
        at += len;
    }
}

/// The first block (root LBA) where some replica of `device` differs from
/// `expected`, reading every leaf directly; `skip(leaf, leaf_lba)` excludes
/// blocks a test knows were not copied.
pub fn first_replica_mismatch(
    device: &Arc<dyn BlockDevice>,
    expected: &[u8],
    skip: &dyn Fn(bdev_stack::DeviceId, u64) -> bool,
) -> Option<(u64, bdev_stack::DeviceId, u64)> {
    let bs = device.info().block_size as usize;
    let mut leaves: HashMap<bdev_stack::DeviceId, Vec<u8>> = HashMap::new();
    let mut fragments = Vec::new();
    device
        .map(0, device.info().block_count, Access::Write, &mut fragments)
        .expect("map the whole device");
    for f in &fragments {
        let data = leaves.entry(f.leaf).or_insert_with(|| {
            let leaf = find_device(device, f.leaf).expect("leaf in tree");
            read_all(&leaf)
        });
        for k in 0..f.blocks {
            if skip(f.leaf, f.leaf_lba + k) {
                continue;
            }
            let got = &data[(f.leaf_lba + k) as usize * bs..][..bs];
            let want = &expected[(f.lba + k) as usize * bs..][..bs];
            if got != want {
                return Some((f.lba + k, f.leaf, f.leaf_lba + k));
            }
        }
    }
    None
}

/// Shorthand for a range.
pub fn r(lba: u64, blocks: u64) -> LbaRange {
    LbaRange { lba, blocks }
}

/// A test leaf over a memory leaf that performs I/O late and out of order:
/// requests queue at submission, and each `poll` performs and completes
/// the newest one. It passes the memory leaf's copy offload through. A
/// pipeline that assumes completion order, or that reads what it has
/// already asked to be written, meets it here.
pub struct LazyDevice {
    info: bdev_stack::DeviceInfo,
    inner: Arc<dyn BlockDevice>,
}

impl LazyDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> LazyDevice {
        let mut info = inner.info().clone();
        info.id = bdev_stack::DeviceId::fresh();
        info.name = format!("lazy({})", info.name);
        LazyDevice { info, inner }
    }
}

impl BlockDevice for LazyDevice {
    fn info(&self) -> &bdev_stack::DeviceInfo {
        &self.info
    }

    fn open_channel(
        &self,
        depth: usize,
    ) -> Result<Box<dyn bdev_stack::Channel>, bdev_stack::BdevError> {
        Ok(Box::new(LazyChannel {
            id: self.info.id,
            info: self.info.clone(),
            inner: self.inner.open_channel(1)?,
            queue: Vec::with_capacity(depth.max(1)),
            depth: depth.max(1),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        vec![Arc::clone(&self.inner)]
    }

    fn open_copy_channel(
        &self,
        depth: usize,
    ) -> Result<Option<Box<dyn bdev_stack::CopyChannel>>, bdev_stack::BdevError> {
        self.inner.open_copy_channel(depth)
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<bdev_stack::LeafFragment>,
    ) -> Result<(), IoError> {
        let mut inner = Vec::new();
        self.inner.map(lba, blocks, access, &mut inner)?;
        out.extend(inner.into_iter().map(|f| bdev_stack::LeafFragment {
            leaf: self.info.id,
            ..f
        }));
        Ok(())
    }
}

struct LazyChannel {
    id: bdev_stack::DeviceId,
    info: bdev_stack::DeviceInfo,
    inner: Box<dyn bdev_stack::Channel>,
    queue: Vec<bdev_stack::IoRequest>,
    depth: usize,
}

impl bdev_stack::Channel for LazyChannel {
    fn device(&self) -> bdev_stack::DeviceId {
        self.id
    }

    unsafe fn submit(&mut self, req: bdev_stack::IoRequest) -> Result<(), bdev_stack::SubmitError> {
        if self.queue.len() >= self.depth {
            return Err(bdev_stack::SubmitError::Busy);
        }
        self.info
            .validate(&req)
            .map_err(bdev_stack::SubmitError::Invalid)?;
        self.queue.push(req);
        Ok(())
    }

    fn poll(&mut self, out: &mut [bdev_stack::Completion]) -> usize {
        if out.is_empty() {
            return 0;
        }
        let Some(req) = self.queue.pop() else {
            return 0;
        };
        // SAFETY: the caller's promise for `req` holds until its completion,
        // which is returned below, after the inner channel's.
        let submitted = unsafe { self.inner.submit(req) };
        let result = match submitted {
            Ok(()) => {
                let mut done = [bdev_stack::Completion::EMPTY];
                while self.inner.poll(&mut done) == 0 {}
                done[0].result
            }
            Err(bdev_stack::SubmitError::Invalid(e)) => Err(e),
            Err(bdev_stack::SubmitError::Busy) => unreachable!("inner channel idle"),
        };
        out[0] = bdev_stack::Completion {
            ctx: req.ctx,
            result,
        };
        1
    }

    fn outstanding(&self) -> usize {
        self.queue.len()
    }
}

/// Opens `lazy:` leaves: a memory leaf (same body and options as `mem:`)
/// behind a [`LazyDevice`].
pub struct LazyFactory;

impl bdev_stack::spec::LeafFactory for LazyFactory {
    fn open(
        &self,
        spec: &bdev_stack::spec::LeafSpec<'_>,
    ) -> Result<Arc<dyn BlockDevice>, bdev_stack::spec::LeafError> {
        let mut text = format!("mem:{}", spec.body);
        for o in spec.options {
            text += &format!(",{}={}", o.key, o.value);
        }
        let inner = bdev_stack::spec::build(&text)
            .map_err(|e| bdev_stack::spec::LeafError::BadBody(e.to_string()))?;
        Ok(Arc::new(LazyDevice::new(inner)))
    }
}

/// Builds `spec` with `lazy:` leaves available.
pub fn build(spec: &str) -> Arc<dyn BlockDevice> {
    let mut registry = bdev_stack::spec::LeafRegistry::with_defaults();
    registry.register("lazy", Arc::new(LazyFactory));
    registry.build(spec).expect("spec builds")
}

/// A hook run before each request a [`Hooked`] leaf passes on.
pub type SubmitHook = Arc<dyn Fn(&bdev_stack::IoRequest) + Send + Sync>;

/// A test leaf over another that runs a hook before passing each request
/// on (to hold a write back, or slow writes down) and passes copy offloads
/// through; it maps to itself, with an id of its own.
pub struct Hooked {
    info: bdev_stack::DeviceInfo,
    inner: Arc<dyn BlockDevice>,
    hook: SubmitHook,
}

impl Hooked {
    pub fn new(inner: Arc<dyn BlockDevice>, hook: SubmitHook) -> Hooked {
        let mut info = inner.info().clone();
        info.id = bdev_stack::DeviceId::fresh();
        info.name = format!("hooked({})", info.name);
        Hooked { info, inner, hook }
    }
}

struct HookedChannel {
    id: bdev_stack::DeviceId,
    inner: Box<dyn bdev_stack::Channel>,
    hook: SubmitHook,
}

impl BlockDevice for Hooked {
    fn info(&self) -> &bdev_stack::DeviceInfo {
        &self.info
    }

    fn open_channel(
        &self,
        depth: usize,
    ) -> Result<Box<dyn bdev_stack::Channel>, bdev_stack::BdevError> {
        Ok(Box::new(HookedChannel {
            id: self.info.id,
            inner: self.inner.open_channel(depth)?,
            hook: Arc::clone(&self.hook),
        }))
    }

    fn open_copy_channel(
        &self,
        depth: usize,
    ) -> Result<Option<Box<dyn bdev_stack::CopyChannel>>, bdev_stack::BdevError> {
        self.inner.open_copy_channel(depth)
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<bdev_stack::LeafFragment>,
    ) -> Result<(), IoError> {
        let first = out.len();
        self.inner.map(lba, blocks, access, out)?;
        for f in &mut out[first..] {
            f.leaf = self.info.id;
        }
        Ok(())
    }
}

impl bdev_stack::Channel for HookedChannel {
    fn device(&self) -> bdev_stack::DeviceId {
        self.id
    }

    unsafe fn submit(&mut self, req: bdev_stack::IoRequest) -> Result<(), bdev_stack::SubmitError> {
        (self.hook)(&req);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.inner.submit(req) }
    }

    fn poll(&mut self, out: &mut [bdev_stack::Completion]) -> usize {
        self.inner.poll(out)
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
}
