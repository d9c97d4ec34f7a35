//! Copies through stacks are never reported done when they are not, and
//! never go around a layer: a resync under a copy, a mirror source whose
//! leg failed between the phases, two handles of one file, a layer that transforms data, and a mirror of
//! offload-capable legs.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev_stack::{
    Access, BdevError, BlockDevice, Channel, Completion, DeviceId, DeviceInfo, FaultAction,
    FaultRule, FaultyDevice, FileDevice, IoError, IoErrorKind, IoOp, IoRequest, LeafFragment,
    LegHealth, MemDevice, Mirror, SubmitError,
};
use common::{Hooked, SubmitHook, fill, model_copy, r, read_all};
use copy_engine::{CopyEngine, CopyOptions, Method, copy_in};

const BS: u64 = 512;

fn mem(blocks: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(blocks * BS, BS as u32, 1 << 20).expect("mem"))
}

fn engine() -> CopyEngine {
    CopyEngine::new(CopyOptions {
        bounce_bytes: 64 << 10,
        buffer_bytes: 8 << 10,
        ..CopyOptions::default()
    })
    .expect("engine")
}

/// Issue scenario 2: a copy into a mirror while a replaced leg is being
/// resynced must not land between the resync's read of a region and its
/// write. Here every leg takes EXTENDED COPY, so the copy is offloaded on
/// both legs, beside the mirror's own I/O path; before, it landed while
/// the resync held the region's old bytes, and the rebuilt leg ended
/// "healthy" but stale.
#[test]
fn a_copy_waits_for_a_resync_that_holds_its_region() {
    use common::scsi::{CopyManager, Offers};
    let manager = CopyManager::new("resync");
    let offers = Offers {
        xcopy: true,
        rod: false,
        max_segments: 4,
        max_token_blocks: 0,
    };
    let blocks = 256;
    let primary = manager.lun(blocks, offers);
    let mirror =
        Arc::new(Mirror::new(vec![Arc::clone(&primary), manager.lun(blocks, offers)], 64).unwrap());
    let dev: Arc<dyn BlockDevice> = mirror.clone();
    let mut expected = fill(&dev, 1);
    mirror.fail_leg(1).expect("fail leg 1");
    // The new leg's first write (the resync's, of region 0) waits at the
    // gate, after the resync has read the region from the primary.
    let fresh = manager.lun(blocks, offers);
    let arrived = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let hook: SubmitHook = {
        let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
        Arc::new(move |req: &IoRequest| {
            if req.op == IoOp::Write && req.lba == 0 && !release.load(Ordering::Acquire) {
                arrived.store(true, Ordering::Release);
                while !release.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let gated: Arc<dyn BlockDevice> = Arc::new(Hooked::new(Arc::clone(&fresh), hook));
    let resync = mirror.replace_leg(1, gated).expect("replace");
    let resync_thread = std::thread::spawn(move || resync.run());
    while !arrived.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let src = manager.lun(64, offers);
    let src_data = fill(&src, 3);
    let copy_done = Arc::new(AtomicBool::new(false));
    let copy_thread = {
        let (src, dev, copy_done) = (Arc::clone(&src), Arc::clone(&dev), Arc::clone(&copy_done));
        std::thread::spawn(move || {
            let report = engine()
                .copy(&src, &[r(0, 64)], &dev, &[r(10, 64)])
                .expect("copy");
            copy_done.store(true, Ordering::Release);
            report
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !copy_done.load(Ordering::Acquire),
        "the copy wrote a region the resync holds"
    );
    release.store(true, Ordering::Release);
    resync_thread.join().unwrap().expect("resync");
    let report = copy_thread.join().unwrap();
    assert!(report.is_complete(), "{report}");
    assert_eq!(
        report.method(Method::ExtendedCopy).bytes,
        2 * 64 * BS,
        "{report}"
    );
    expected[10 * BS as usize..74 * BS as usize].copy_from_slice(&src_data);
    assert!(!mirror.health().is_degraded());
    assert!(read_all(&fresh) == expected, "the rebuilt leg is stale");
    assert!(read_all(&primary) == expected);
}

/// Issue scenario 3: tokens of a mirror source name the leg that served
/// reads at copy-in; if that leg fails before copy-out, copy-out reads the
/// leg that holds the data now (before, it copied the failed leg's stale
/// blocks and reported success).
#[test]
fn copy_out_reads_a_healthy_leg_when_the_token_leg_failed() {
    let (faulty, faults) = FaultyDevice::new(mem(256));
    let leg0: Arc<dyn BlockDevice> = Arc::new(faulty);
    let leg1 = mem(256);
    let mirror = Arc::new(Mirror::new(vec![leg0, Arc::clone(&leg1)], 64).unwrap());
    let source: Arc<dyn BlockDevice> = mirror.clone();
    fill(&source, 1);
    let tokens = copy_in(&source, &[r(0, 128)]).expect("copy in");
    // Leg 0 fails a write; from now on only leg 1 has the new blocks.
    faults.add(FaultRule {
        op: IoOp::Write,
        range: 0..256,
        action: FaultAction::Fail(IoErrorKind::Medium),
    });
    let newer = fill(&source, 2);
    assert_eq!(mirror.health().legs[0], LegHealth::Failed);
    let dst = mem(256);
    let report = engine()
        .copy_out(&dst, &[r(0, 128)], &tokens)
        .expect("copy out");
    assert!(report.is_complete(), "{report}");
    assert!(
        read_all(&dst)[..128 * BS as usize] == newer[..128 * BS as usize],
        "copied the failed leg's stale blocks"
    );
}

fn temp_file(name: &str, blocks: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ustor-stack-safety-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    FileDevice::open(&path, BS as u32, Some(blocks * BS)).expect("file");
    path
}

/// Issue scenario 6: two handles of one file are one set of blocks. A
/// forward copy between overlapping ranges of them must be done in memmove
/// order (before, the engine saw two devices and a pipelined bounce read
/// blocks it had already overwritten).
#[test]
fn two_handles_of_one_file_are_seen_to_overlap() {
    let path = temp_file("one-file", 512);
    let a: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&path, BS as u32, None).expect("first handle"));
    let b: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&path, BS as u32, None).expect("second handle"));
    assert_eq!(a.backing(), b.backing());
    assert_ne!(a.info().id, b.info().id);
    let mut reference = fill(&a, 5);
    // One 8 KiB buffer at a time would overrun a forward copy by 16 blocks
    // if the overlap went unseen.
    let report = engine()
        .copy(&a, &[r(0, 300)], &b, &[r(16, 300)])
        .expect("copy");
    assert!(report.is_complete(), "{report}");
    model_copy(&mut reference, BS as usize, &[r(0, 300)], &[r(16, 300)]);
    assert!(
        read_all(&a) == reference,
        "overlapping copy corrupted the file"
    );
    std::fs::remove_file(&path).ok();
}

/// A layer that transforms data (here: inverts every byte) maps to itself,
/// so the engine never offloads under it and writes through its channel.
struct Inverting {
    info: DeviceInfo,
    inner: Arc<dyn BlockDevice>,
}

struct InvertingChannel {
    id: DeviceId,
    inner: Box<dyn Channel>,
    reads: Mutex<Vec<(u64, bdev_stack::DmaSlice)>>,
}

impl BlockDevice for Inverting {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        Ok(Box::new(InvertingChannel {
            id: self.info.id,
            inner: self.inner.open_channel(depth)?,
            reads: Mutex::new(Vec::new()),
        }))
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        vec![Arc::clone(&self.inner)]
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        _: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        out.push(LeafFragment {
            lba,
            blocks,
            leaf: self.info.id,
            leaf_lba: lba,
            replica: 0,
        });
        Ok(())
    }
}

fn invert(buf: &bdev_stack::DmaSlice) {
    // SAFETY: the test owns the buffer while it is not with a device:
    // before a write is submitted and after a read completed.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.host_ptr(), buf.len()) };
    for b in bytes {
        *b = !*b;
    }
}

impl Channel for InvertingChannel {
    fn device(&self) -> DeviceId {
        self.id
    }

    unsafe fn submit(&mut self, req: IoRequest) -> Result<(), SubmitError> {
        if req.op == IoOp::Write {
            // The write's buffer is ours until its completion: invert a
            // copy would be cleaner; the test never reuses it meanwhile.
            invert(&req.buf);
        }
        // SAFETY: passed on unchanged.
        let result = unsafe { self.inner.submit(req) };
        if req.op == IoOp::Read && result.is_ok() {
            self.reads.lock().unwrap().push((req.ctx, req.buf));
        }
        result
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let n = self.inner.poll(out);
        let mut reads = self.reads.lock().unwrap();
        for c in &out[..n] {
            if let Some(at) = reads.iter().position(|(ctx, _)| *ctx == c.ctx) {
                let (_, buf) = reads.swap_remove(at);
                invert(&buf);
            }
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
}

#[test]
fn a_layer_that_transforms_data_is_written_through_never_offloaded_under() {
    let inner: Arc<dyn BlockDevice> = bdev_stack::spec::build("mem:256k,copy=nvme").unwrap();
    let mut info = inner.info().clone();
    info.id = DeviceId::fresh();
    info.copy_offloads.clear();
    let layer: Arc<dyn BlockDevice> = Arc::new(Inverting {
        info,
        inner: Arc::clone(&inner),
    });
    let mut reference = fill(&layer, 9);
    let report = engine()
        .copy(&layer, &[r(0, 64)], &layer, &[r(256, 64)])
        .expect("copy");
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.offloaded_bytes(), 0, "{report}");
    model_copy(&mut reference, BS as usize, &[r(0, 64)], &[r(256, 64)]);
    assert!(read_all(&layer) == reference);
}

/// A copy into a two-leg mirror of offload-capable LUNs offloads on both
/// legs, and the report shows the commands per leg.
#[test]
fn a_mirror_of_offload_capable_legs_offloads_on_every_leg() {
    use common::scsi::{CopyManager, Offers};
    let manager = CopyManager::new("m");
    let offers = Offers {
        xcopy: true,
        rod: false,
        max_segments: 4,
        max_token_blocks: 0,
    };
    let src = manager.lun(512, offers);
    let (a, b) = (manager.lun(512, offers), manager.lun(512, offers));
    let mirror: Arc<dyn BlockDevice> =
        Arc::new(Mirror::new(vec![Arc::clone(&a), Arc::clone(&b)], 64).unwrap());
    let data = fill(&src, 4);
    let report = engine()
        .copy(&src, &[r(0, 200)], &mirror, &[r(100, 200)])
        .expect("copy");
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.host_bytes(), 0, "{report}");
    for leg in [&a, &b] {
        let per_leg = report
            .per_leaf
            .iter()
            .find(|l| l.leaf == leg.info().id)
            .unwrap_or_else(|| panic!("no commands on {}\n{report}", leg.info().name));
        assert_eq!(per_leg.method, Method::ExtendedCopy);
        assert!(per_leg.commands > 0);
        assert_eq!(per_leg.bytes, 200 * BS);
        assert!(read_all(leg)[100 * BS as usize..300 * BS as usize] == data[..200 * BS as usize]);
    }
}
