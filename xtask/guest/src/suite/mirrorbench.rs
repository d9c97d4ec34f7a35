//! The durable write-intent bitmap's cost on real devices: random 4 KiB
//! writes at QD 32 on a two-leg mirror over the stack topology's two QEMU
//! NVMe namespaces (one per controller), with metadata (a region's bit is
//! written and flushed on both members before its first write) and
//! without, alternating rounds in one boot. The plain mirror writes the
//! same data area (past the metadata), so both see the same blocks.

use super::{GuestEnv, GuestTest, Kind};
use crate::setup::bind_vfio;
use crate::topology::STACK;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ustor::bdev_stack::spec::{LeafRegistry, members_allocator};
use ustor::bdev_stack::{
    BlockDevice, Channel, Completion, DmaAllocator, IoRequest, MetaLayout, Mirror,
};

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[GuestTest {
    name: "mirror_bench_durable_bitmap",
    kind: Kind::Bench,
    topology: STACK,
    timeout: Duration::from_secs(300),
    run: mirror_bench_durable_bitmap,
}];

const QD: usize = 32;
const ROUND: Duration = Duration::from_secs(3);
const ROUNDS: usize = 5;
/// Write-intent regions of 1 MiB.
const REGION_BYTES: u64 = 1 << 20;

/// Random 4 KiB writes at QD 32 for `ROUND` on `dev`, in the `span` blocks
/// from `base`; returns IOPS.
fn write_round(
    dev: &dyn BlockDevice,
    allocator: &Arc<dyn DmaAllocator>,
    base: u64,
    span: u64,
    seed: u64,
) -> Result<f64, String> {
    let bs = u64::from(dev.info().block_size);
    let per_io = 4096 / bs;
    let mut bufs = (0..QD)
        .map(|_| allocator.allocate(4096).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let slices: Vec<_> = bufs.iter_mut().map(|b| b.dma_slice()).collect();
    let mut ch = dev.open_channel(QD).map_err(|e| e.to_string())?;
    let mut done = vec![Completion::EMPTY; QD];
    let slots = span / per_io;
    let mut x = seed | 1;
    let mut next_lba = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        base + (x % slots) * per_io
    };
    let submit = |ch: &mut Box<dyn Channel>, lba: u64, slot: usize| {
        // SAFETY: the buffers outlive the channel's requests (all are
        // reaped before this function returns) and nothing else touches
        // them while in flight.
        unsafe { ch.submit(IoRequest::write(lba, per_io, slices[slot], slot as u64)) }
            .map_err(|e| format!("submit: {e:?}"))
    };
    for slot in 0..QD {
        submit(&mut ch, next_lba(), slot)?;
    }
    let start = Instant::now();
    let mut completed = 0u64;
    let mut in_flight = QD;
    while in_flight > 0 {
        let n = ch.poll(&mut done);
        for c in &done[..n] {
            c.result.map_err(|e| format!("write: {e}"))?;
            completed += 1;
            if start.elapsed() < ROUND {
                submit(&mut ch, next_lba(), c.ctx as usize)?;
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(completed as f64 / start.elapsed().as_secs_f64())
}

fn mirror_bench_durable_bitmap(env: &GuestEnv) -> Result<(), String> {
    let [a, b, ..] = env.devices.nvme.as_slice() else {
        return Err("the stack topology needs two NVMe controllers".into());
    };
    let (a, b) = (a.pci_address.clone(), b.pci_address.clone());
    bind_vfio(&a)?;
    bind_vfio(&b)?;
    let registry = LeafRegistry::with_defaults();
    let members: Vec<Arc<dyn BlockDevice>> = [format!("nvme:{a}/1"), format!("nvme:{b}/1")]
        .iter()
        .map(|s| registry.build(s).map_err(|e| format!("{s}: {e}")))
        .collect::<Result<_, _>>()?;
    let info = members[0].info().clone();
    let bs = u64::from(info.block_size);
    let region = REGION_BYTES / bs;
    let layout =
        MetaLayout::new(info.block_count, info.block_size, region).map_err(|e| e.to_string())?;
    let allocator = members_allocator(&members);
    // The namespaces are written from scratch here: equal after the first
    // round of each, and the bench reads nothing.
    let with = Mirror::create_assume_clean(members.clone(), region, Arc::clone(&allocator))
        .map_err(|e| e.to_string())?;
    let without = Mirror::new(members, region).map_err(|e| e.to_string())?;
    let span = layout.data_blocks;
    let (mut with_iops, mut without_iops) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let seed = 0x9e37_79b9 + round as u64;
        without_iops.push(write_round(
            &without,
            &allocator,
            layout.data_offset,
            span,
            seed,
        )?);
        with_iops.push(write_round(&with, &allocator, 0, span, seed)?);
        println!(
            "round {round}: without metadata {:.0} IOPS, with durable bitmap {:.0} IOPS",
            without_iops[round], with_iops[round]
        );
    }
    with.stop().map_err(|e| e.to_string())?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (w, wo) = (median(&mut with_iops), median(&mut without_iops));
    println!(
        "mirror with/without durable bitmap (4 KiB random writes, QD {QD}, regions of {} KiB): iops={w:.0}/{wo:.0} ratio={:.2}",
        REGION_BYTES >> 10,
        w / wo
    );
    Ok(())
}
