//! Stacks over the real peers: a stripe across two QEMU NVMe controllers,
//! a mirror of an NVMe namespace with a LIO LUN, and copies through the
//! copy engine. After the stack lets go of the devices, the leaves are read
//! back with the kernel's own paths (`dd` on the nvme block device, `sg_dd`
//! on the LUN) and compared with what the stack wrote.

use super::{GuestEnv, GuestTest, Kind};
use crate::setup::{bind_vfio, kernel_namespace, tool_output};
use crate::topology::{HOTPLUG, STACK};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ustor::bdev_stack::spec::LeafRegistry;
use ustor::bdev_stack::{
    BlockDevice, LbaRange, NvmeDmaAllocator, NvmeDmaBuffer, OwnedChannel, SubmitError,
};
use ustor::copy_engine::{CopyEngine, CopyOptions, Method};

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "stack_stripe_over_two_nvme_controllers_matches_dd",
        kind: Kind::Test,
        topology: STACK,
        timeout: Duration::from_secs(120),
        run: stack_stripe_over_two_nvme_controllers_matches_dd,
    },
    GuestTest {
        name: "stack_mirror_of_nvme_and_lio_matches_dd_and_sg_dd",
        kind: Kind::Test,
        topology: STACK,
        timeout: Duration::from_secs(120),
        run: stack_mirror_of_nvme_and_lio_matches_dd_and_sg_dd,
    },
    GuestTest {
        name: "stack_copy_offloads_within_a_namespace_and_bounces_across",
        kind: Kind::Test,
        topology: STACK,
        timeout: Duration::from_secs(120),
        run: stack_copy_offloads_within_a_namespace_and_bounces_across,
    },
    GuestTest {
        name: "stack_copy_into_a_mirror_fails_the_leg_that_fails_and_resyncs",
        kind: Kind::Test,
        topology: STACK,
        timeout: Duration::from_secs(300),
        run: stack_copy_into_a_mirror_fails_the_leg_that_fails_and_resyncs,
    },
    GuestTest {
        name: "stack_hot_removal_degrades_a_mirror_that_keeps_serving",
        kind: Kind::Test,
        topology: HOTPLUG,
        timeout: Duration::from_secs(180),
        run: stack_hot_removal_degrades_a_mirror_that_keeps_serving,
    },
    GuestTest {
        name: "stack_mirror_with_metadata_survives_a_killed_writer",
        kind: Kind::Test,
        topology: STACK,
        timeout: Duration::from_secs(240),
        run: stack_mirror_with_metadata_survives_a_killed_writer,
    },
    GuestTest {
        name: "stack_copy_nvme_to_lio_bounces",
        kind: Kind::Test,
        topology: STACK,
        timeout: Duration::from_secs(120),
        run: stack_copy_nvme_to_lio_bounces,
    },
];

const BS: u64 = 512;
/// Blocks per request and requests in flight for the helpers below.
const REQ_BLOCKS: u64 = 128;
const DEPTH: usize = 16;

fn nvme_addrs(env: &GuestEnv) -> Result<(String, String), String> {
    let [a, b, ..] = env.devices.nvme.as_slice() else {
        return Err("the stack topology needs two NVMe controllers".into());
    };
    Ok((a.pci_address.clone(), b.pci_address.clone()))
}

/// Buffers of the VFIO container `registry`'s `nvme:` leaves are in.
fn allocator(registry: &LeafRegistry) -> Result<NvmeDmaAllocator, String> {
    registry
        .nvme_environment()
        .vfio_allocator()
        .map_err(|e| e.to_string())
}

pub(super) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(11, |d| d.as_nanos() as u64)
}

/// Drains completions until none is outstanding, collecting failures.
fn drain(
    ch: &mut OwnedChannel<NvmeDmaBuffer>,
    in_flight: &mut usize,
    mut each: impl FnMut(u64, Option<NvmeDmaBuffer>),
    failures: &mut Vec<String>,
    all: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        *in_flight -= ch.poll(DEPTH, |ctx, r, buf| match r {
            Ok(()) => each(ctx, buf),
            Err(e) => failures.push(format!("request at {ctx}: {e}")),
        });
        if !all || *in_flight == 0 || Instant::now() > deadline {
            return;
        }
    }
}

/// Writes `data` at `lba` of `dev`, DEPTH requests in flight.
fn write_all(
    dev: &dyn BlockDevice,
    alloc: &NvmeDmaAllocator,
    lba: u64,
    data: &[u8],
) -> Result<(), String> {
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(dev, DEPTH).map_err(|e| e.to_string())?;
    let (mut in_flight, mut failures) = (0usize, Vec::new());
    for (i, chunk) in data.chunks((REQ_BLOCKS * BS) as usize).enumerate() {
        let buf = alloc.alloc(chunk.len()).map_err(|e| e.to_string())?;
        buf.write_bytes(0, chunk).map_err(|e| e.to_string())?;
        let at = lba + i as u64 * REQ_BLOCKS;
        let mut pending = Some(buf);
        while let Some(buf) = pending.take() {
            match ch.write(at, chunk.len() as u64 / BS, buf, at) {
                Ok(()) => in_flight += 1,
                Err(r) if r.error == SubmitError::Busy => {
                    pending = r.buf;
                    drain(&mut ch, &mut in_flight, |_, _| {}, &mut failures, false);
                }
                Err(r) => return Err(format!("write at {at}: {}", r.error)),
            }
        }
    }
    drain(&mut ch, &mut in_flight, |_, _| {}, &mut failures, true);
    match (failures.is_empty(), in_flight) {
        (true, 0) => Ok(()),
        (true, n) => Err(format!("{n} writes never completed")),
        (false, _) => Err(failures.join("; ")),
    }
}

/// Reads `blocks` at `lba` of `dev`.
fn read_all(
    dev: &dyn BlockDevice,
    alloc: &NvmeDmaAllocator,
    lba: u64,
    blocks: u64,
) -> Result<Vec<u8>, String> {
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(dev, DEPTH).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; (blocks * BS) as usize];
    let (mut in_flight, mut failures) = (0usize, Vec::new());
    let copy_out =
        |ctx: u64, buf: Option<NvmeDmaBuffer>, out: &mut Vec<u8>, failures: &mut Vec<String>| {
            let Some(buf) = buf else { return };
            let off = ((ctx - lba) * BS) as usize;
            let len = buf.len().min(out.len() - off);
            if let Err(e) = buf.read_bytes(0, &mut out[off..off + len]) {
                failures.push(e.to_string());
            }
        };
    let mut at = lba;
    while at < lba + blocks {
        let n = REQ_BLOCKS.min(lba + blocks - at);
        let mut pending = Some(alloc.alloc((n * BS) as usize).map_err(|e| e.to_string())?);
        while let Some(buf) = pending.take() {
            match ch.read(at, n, buf, at) {
                Ok(()) => in_flight += 1,
                Err(r) if r.error == SubmitError::Busy => {
                    pending = r.buf;
                    let mut done = Vec::new();
                    drain(
                        &mut ch,
                        &mut in_flight,
                        |ctx, b| done.push((ctx, b)),
                        &mut failures,
                        false,
                    );
                    for (ctx, b) in done {
                        copy_out(ctx, b, &mut out, &mut failures);
                    }
                }
                Err(r) => return Err(format!("read at {at}: {}", r.error)),
            }
        }
        at += n;
    }
    let mut done = Vec::new();
    drain(
        &mut ch,
        &mut in_flight,
        |ctx, b| done.push((ctx, b)),
        &mut failures,
        true,
    );
    for (ctx, b) in done {
        copy_out(ctx, b, &mut out, &mut failures);
    }
    if !failures.is_empty() || in_flight != 0 {
        return Err(format!(
            "reads failed ({in_flight} outstanding): {}",
            failures.join("; ")
        ));
    }
    Ok(out)
}

/// Copies `blocks` from `src` to `dst` (device, first block); prints the
/// report and fails unless it is complete.
fn copy_complete(
    engine: &mut CopyEngine,
    (src, src_lba): (&Arc<dyn BlockDevice>, u64),
    (dst, dst_lba): (&Arc<dyn BlockDevice>, u64),
    blocks: u64,
) -> Result<ustor::copy_engine::CopyReport, String> {
    let report = engine
        .copy(
            src,
            &[LbaRange {
                lba: src_lba,
                blocks,
            }],
            dst,
            &[LbaRange {
                lba: dst_lba,
                blocks,
            }],
        )
        .map_err(|e| e.to_string())?;
    println!("{report}");
    if !report.is_complete() {
        return Err(format!("copy incomplete: {report}"));
    }
    Ok(report)
}

/// The sg node of LIO LUN `index`.
fn lio_lun(env: &GuestEnv, index: usize) -> Result<String, String> {
    Ok(env
        .devices
        .lio
        .get(index)
        .ok_or_else(|| format!("the topology needs LIO LUN {index}"))?
        .sg_path
        .display()
        .to_string())
}

/// Reads `count` 512-byte blocks at `skip` of `input` with the reference
/// tool `tool` (`dd` with O_DIRECT on a block device, `sg_dd` on sg).
fn reference_read(tool: &str, input: &str, skip: u64, count: u64) -> Result<Vec<u8>, String> {
    let out = format!("/run/ustor/ref-read-{}-{skip}.bin", std::process::id());
    let mut args = vec![
        format!("if={input}"),
        format!("of={out}"),
        "bs=512".to_string(),
        format!("skip={skip}"),
        format!("count={count}"),
    ];
    if tool == "dd" {
        args.push("iflag=direct".to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tool_output(tool, &args)?;
    let bytes = std::fs::read(&out).map_err(|e| format!("reading {out}: {e}"))?;
    std::fs::remove_file(&out).map_err(|e| format!("removing {out}: {e}"))?;
    Ok(bytes)
}

/// Leaves the controllers with vfio-pci for the tests after this one.
fn back_to_vfio(addrs: &[&str]) -> Result<(), String> {
    addrs.iter().try_for_each(|a| bind_vfio(a))
}

fn stack_stripe_over_two_nvme_controllers_matches_dd(env: &GuestEnv) -> Result<(), String> {
    let (a, b) = nvme_addrs(env)?;
    back_to_vfio(&[&a, &b])?;
    // 128 blocks a chunk; start off a chunk boundary so both ends are cut.
    let chunk = 128u64;
    let (lba, blocks) = (1000u64, 8192u64);
    let data = pattern(seed(), (blocks * BS) as usize);
    {
        let registry = LeafRegistry::with_defaults();
        let dev = registry
            .build(&format!("stripe(chunk=64k, nvme:{a}/1, nvme:{b}/1)"))
            .map_err(|e| e.to_string())?;
        let alloc = allocator(&registry)?;
        write_all(dev.as_ref(), &alloc, lba, &data)?;
        let back = read_all(dev.as_ref(), &alloc, lba, blocks)?;
        if back != data {
            return Err("the stripe read back differs from what was written".into());
        }
        println!("ok {blocks} blocks at {lba} through stripe(nvme:{a}/1, nvme:{b}/1) read back");
    }
    // The stack has let go; ask the kernel driver what landed where.
    let nodes = [kernel_namespace(&a)?, kernel_namespace(&b)?];
    let result = (|| {
        for (leg, node) in nodes.iter().enumerate() {
            let mut checked = 0;
            let mut logical = lba;
            while logical < lba + blocks {
                let stripe_index = logical / chunk;
                let end = ((stripe_index + 1) * chunk).min(lba + blocks);
                if stripe_index % 2 == leg as u64 {
                    let leaf_lba = (stripe_index / 2) * chunk + logical % chunk;
                    let got = reference_read("dd", node, leaf_lba, end - logical)?;
                    let at = ((logical - lba) * BS) as usize;
                    if got != data[at..at + got.len()] {
                        return Err(format!(
                            "{node} blocks {leaf_lba}..{} differ from stripe blocks {logical}..{end}",
                            leaf_lba + end - logical
                        ));
                    }
                    checked += end - logical;
                }
                logical = end;
            }
            println!("ok {node}: {checked} blocks equal what the stripe put there (dd)");
        }
        Ok(())
    })();
    back_to_vfio(&[&a, &b])?;
    result
}

fn stack_mirror_of_nvme_and_lio_matches_dd_and_sg_dd(env: &GuestEnv) -> Result<(), String> {
    let (a, _) = nvme_addrs(env)?;
    let lun = lio_lun(env, 0)?;
    back_to_vfio(&[&a])?;
    let (lba, blocks) = (4096u64 + 3, 3000u64);
    let data = pattern(seed(), (blocks * BS) as usize);
    {
        let registry = LeafRegistry::with_defaults();
        let dev = registry
            .build(&format!("mirror(nvme:{a}/1, sg:{lun})"))
            .map_err(|e| e.to_string())?;
        let alloc = allocator(&registry)?;
        write_all(dev.as_ref(), &alloc, lba, &data)?;
        if read_all(dev.as_ref(), &alloc, lba, blocks)? != data {
            return Err("the mirror read back differs from what was written".into());
        }
        println!("ok {blocks} blocks at {lba} through mirror(nvme:{a}/1, sg:{lun}) read back");
    }
    let lio = reference_read("sg_dd", &lun, lba, blocks)?;
    let node = kernel_namespace(&a)?;
    let nvme = reference_read("dd", &node, lba, blocks);
    back_to_vfio(&[&a])?;
    let nvme = nvme?;
    if lio != data {
        return Err(format!("{lun} (sg_dd) differs from what the mirror wrote"));
    }
    println!("ok {lun}: the mirror's blocks, by sg_dd");
    if nvme != data {
        return Err(format!("{node} (dd) differs from what the mirror wrote"));
    }
    println!("ok {node}: the mirror's blocks, by dd");
    Ok(())
}

fn stack_copy_offloads_within_a_namespace_and_bounces_across(env: &GuestEnv) -> Result<(), String> {
    let (a, b) = nvme_addrs(env)?;
    back_to_vfio(&[&a, &b])?;
    let registry = LeafRegistry::with_defaults();
    let dev: Arc<dyn BlockDevice> = registry
        .build(&format!("concat(nvme:{a}/1, nvme:{b}/1)"))
        .map_err(|e| e.to_string())?;
    let boundary = dev
        .members()
        .first()
        .map(|m| m.info().block_count)
        .ok_or("concat without members")?;
    let alloc = allocator(&registry)?;
    // Source: 2048 blocks on the first namespace; destination: 1024 blocks
    // on the same namespace, then 1024 on the other controller's.
    let blocks = 2048u64;
    let src_lba = 10_000u64;
    let dst_lba = boundary - blocks / 2;
    let data = pattern(seed(), (blocks * BS) as usize);
    write_all(dev.as_ref(), &alloc, src_lba, &data)?;
    let options = CopyOptions {
        allocator: Arc::new(allocator(&registry)?),
        ..CopyOptions::default()
    };
    let mut engine = CopyEngine::new(options).map_err(|e| e.to_string())?;
    let report = copy_complete(&mut engine, (&dev, src_lba), (&dev, dst_lba), blocks)?;
    let half = blocks / 2 * BS;
    let offloaded = report.method(Method::NvmeCopy).bytes;
    let bounced = report.method(Method::Bounce).bytes;
    if offloaded != half || bounced != half {
        return Err(format!(
            "expected {half} bytes by NVMe Copy (same namespace) and {half} bounced \
             (across controllers), got {offloaded} and {bounced}"
        ));
    }
    if read_all(dev.as_ref(), &alloc, dst_lba, blocks)? != data {
        return Err("the destination does not hold the source's bytes".into());
    }
    println!("ok {blocks} blocks copied: half by NVMe Copy, half bounced, read back equal");
    Ok(())
}

/// A copy into mirror(QEMU namespace, LIO LUN) during which the LUN leg
/// fails its writes (the stack's fault injector over the real sg leaf):
/// the mirror fails that leg, the copy is complete on the namespace, and
/// reads return the new data. The other LIO LUN then replaces the leg and
/// is resynced; `dd` on the namespace and `sg_dd` on the new LUN show the
/// copy on both.
fn stack_copy_into_a_mirror_fails_the_leg_that_fails_and_resyncs(
    env: &GuestEnv,
) -> Result<(), String> {
    use ustor::bdev_stack::{FaultyDevice, LegHealth, Mirror};
    let (a, _) = nvme_addrs(env)?;
    let (lun0, lun1) = (lio_lun(env, 0)?, lio_lun(env, 1)?);
    back_to_vfio(&[&a])?;
    let (src_lba, dst_lba, blocks) = (20_000u64, 4096u64 + 5, 2048u64);
    let data = pattern(seed(), (blocks * BS) as usize);
    {
        let registry = LeafRegistry::with_defaults();
        let build = |spec: &str| registry.build(spec).map_err(|e| e.to_string());
        let namespace = build(&format!("nvme:{a}/1"))?;
        let (faulty, faults) = FaultyDevice::new(build(&format!("sg:{lun0}"))?);
        let mirror = Arc::new(
            Mirror::new(vec![Arc::clone(&namespace), Arc::new(faulty)], 2048)
                .map_err(|e| e.to_string())?,
        );
        mirror.set_allocator(Arc::new(allocator(&registry)?));
        let dev: Arc<dyn BlockDevice> = mirror.clone();
        let alloc = allocator(&registry)?;
        write_all(namespace.as_ref(), &alloc, src_lba, &data)?;
        // The LUN fails the fourth request from now: in the middle of the
        // copy's writes.
        faults.fail_nth(4);
        let mut engine = CopyEngine::new(CopyOptions {
            allocator: Arc::new(allocator(&registry)?),
            buffer_bytes: 64 << 10,
            ..CopyOptions::default()
        })
        .map_err(|e| e.to_string())?;
        let report = copy_complete(&mut engine, (&namespace, src_lba), (&dev, dst_lba), blocks)?;
        if faults.injected() == 0 {
            return Err("the LUN leg never failed: the test did not test".into());
        }
        let health = mirror.health();
        if health.legs != [LegHealth::Healthy, LegHealth::Failed] {
            return Err(format!(
                "the LUN leg failed a copy write but the mirror shows {health:?}"
            ));
        }
        if report.method(Method::NvmeCopy).bytes == 0 {
            return Err(format!("the namespace leg was not offloaded: {report}"));
        }
        if read_all(dev.as_ref(), &alloc, dst_lba, blocks)? != data {
            return Err("the degraded mirror does not return the copy".into());
        }
        println!(
            "ok the LUN leg failed during the copy; the mirror is degraded and returns the copy"
        );
        engine.close_channels();
        let resync = mirror
            .replace_leg(1, build(&format!("sg:{lun1}"))?)
            .map_err(|e| e.to_string())?;
        let report = resync.run().map_err(|e| e.to_string())?;
        if mirror.health().is_degraded() {
            return Err(format!(
                "still degraded after the resync: {:?}",
                mirror.health()
            ));
        }
        println!(
            "ok {lun1} replaced the failed leg: {} blocks resynced",
            report.blocks
        );
    }
    let lio = reference_read("sg_dd", &lun1, dst_lba, blocks)?;
    let node = kernel_namespace(&a)?;
    let nvme = reference_read("dd", &node, dst_lba, blocks);
    back_to_vfio(&[&a])?;
    if lio != data {
        return Err(format!(
            "{lun1} (sg_dd) differs from the copy after the resync"
        ));
    }
    if nvme? != data {
        return Err(format!("{node} (dd) differs from the copy"));
    }
    println!("ok both legs hold the copy: {node} by dd, {lun1} by sg_dd");
    Ok(())
}

fn stack_copy_nvme_to_lio_bounces(env: &GuestEnv) -> Result<(), String> {
    let (a, _) = nvme_addrs(env)?;
    let lun = lio_lun(env, 1)?;
    back_to_vfio(&[&a])?;
    let registry = LeafRegistry::with_defaults();
    let src = registry
        .build(&format!("nvme:{a}/1"))
        .map_err(|e| e.to_string())?;
    let dst = registry
        .build(&format!("sg:{lun}"))
        .map_err(|e| e.to_string())?;
    let alloc = allocator(&registry)?;
    let (from, to, blocks) = (30_000u64, 50_000u64, 3000u64);
    let data = pattern(seed(), (blocks * BS) as usize);
    write_all(src.as_ref(), &alloc, from, &data)?;
    let options = CopyOptions {
        allocator: Arc::new(allocator(&registry)?),
        ..CopyOptions::default()
    };
    let mut engine = CopyEngine::new(options).map_err(|e| e.to_string())?;
    let report = engine
        .copy(
            &src,
            &[LbaRange { lba: from, blocks }],
            &dst,
            &[LbaRange { lba: to, blocks }],
        )
        .map_err(|e| e.to_string())?;
    println!("{report}");
    let bounced = report.method(Method::Bounce).bytes;
    if !report.is_complete() || bounced != blocks * BS {
        return Err(format!(
            "expected all {} bytes bounced (NVMe and SCSI share no copy path): {report}",
            blocks * BS
        ));
    }
    drop((src, dst));
    if reference_read("sg_dd", &lun, to, blocks)? != data {
        return Err(format!("{lun} (sg_dd) does not hold the namespace's bytes"));
    }
    println!("ok {blocks} blocks nvme:{a}/1@{from} -> {lun}@{to} bounced, sg_dd agrees");
    Ok(())
}

/// Hot removal: while a mirror over both controllers serves I/O, the host
/// unplugs the second (`device_del` on QEMU's monitor; it sits behind a
/// hot-pluggable root port). The guest kernel asks for the device back
/// through VFIO's device request; the driver stops the controller and
/// releases it, so the unplug completes (the device leaves sysfs); the
/// mirror fails that leg and keeps serving from the other; every block
/// written before, during and after reads back.
fn stack_hot_removal_degrades_a_mirror_that_keeps_serving(env: &GuestEnv) -> Result<(), String> {
    use ustor::bdev_stack::{LegHealth, Mirror};
    let [a, b] = env.devices.nvme.as_slice() else {
        return Err("the hotplug topology has two NVMe controllers".into());
    };
    let (a, b) = (&a.pci_address, &b.pci_address);
    let registry = LeafRegistry::with_defaults();
    let build = |spec: &str| registry.build(spec).map_err(|e| e.to_string());
    let mirror = Arc::new(
        Mirror::new(
            vec![
                build(&format!("nvme:{a}/1"))?,
                build(&format!("nvme:{b}/1"))?,
            ],
            2048,
        )
        .map_err(|e| e.to_string())?,
    );
    mirror.set_allocator(Arc::new(allocator(&registry)?));
    let dev: Arc<dyn BlockDevice> = mirror.clone();
    let alloc = allocator(&registry)?;
    let chunk = 256u64;
    let chunks = dev.info().block_count / chunk;
    let mut latest: Vec<Option<Vec<u8>>> = vec![None; chunks as usize];
    let write_chunk = |i: u64, latest: &mut Vec<Option<Vec<u8>>>| -> Result<(), String> {
        let at = i % chunks;
        let data = pattern(seed() ^ i, (chunk * BS) as usize);
        write_all(dev.as_ref(), &alloc, at * chunk, &data)?;
        if read_all(dev.as_ref(), &alloc, at * chunk, chunk)? != data {
            return Err(format!("chunk {at} read back differs"));
        }
        latest[at as usize] = Some(data);
        Ok(())
    };
    write_chunk(0, &mut latest)?;
    println!("{}device_del nvme1", crate::protocol::HOST_REQUEST);
    let sysfs = format!("/sys/bus/pci/devices/{b}");
    let started = Instant::now();
    let mut i = 1;
    loop {
        write_chunk(i, &mut latest)
            .map_err(|e| format!("I/O during the removal (chunk {i}): {e}"))?;
        i += 1;
        let failed = mirror.health().legs.get(1) == Some(&LegHealth::Failed);
        if failed && !Path::new(&sysfs).exists() {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "after {:?}: mirror {:?}, {sysfs} {}",
                started.elapsed(),
                mirror.health(),
                if Path::new(&sysfs).exists() {
                    "still present"
                } else {
                    "gone"
                }
            ));
        }
    }
    println!(
        "ok {b} unplugged after {:.1} s and {i} chunks of I/O; the mirror failed that leg",
        started.elapsed().as_secs_f64()
    );
    for _ in 0..20 {
        write_chunk(i, &mut latest)?;
        i += 1;
    }
    for (at, data) in latest.iter().enumerate() {
        if let Some(data) = data
            && read_all(dev.as_ref(), &alloc, at as u64 * chunk, chunk)? != *data
        {
            return Err(format!("chunk {at} lost"));
        }
    }
    println!("ok the degraded mirror serves on {a}: {i} chunks written, all read back");
    Ok(())
}

/// Set in the writer process of
/// [`stack_mirror_with_metadata_survives_a_killed_writer`].
const MD_WRITER: &str = "USTOR_MD_WRITER";
/// Blocks of the mirror the writer writes in (wrapping).
const MD_SPAN: u64 = 4096;

fn md_members(
    registry: &LeafRegistry,
    a: &str,
    lun: &str,
) -> Result<Vec<Arc<dyn BlockDevice>>, String> {
    [format!("nvme:{a}/1"), format!("sg:{lun}")]
        .iter()
        .map(|s| registry.build(s).map_err(|e| e.to_string()))
        .collect()
}

/// The writer: assembles the mirror and writes fresh runs until killed,
/// printing `lba blocks seed` once each write is acknowledged.
fn md_writer(a: &str, lun: &str) -> Result<(), String> {
    use ustor::bdev_stack::Mirror;
    use ustor::bdev_stack::spec::members_allocator;
    let registry = LeafRegistry::with_defaults();
    let members = md_members(&registry, a, lun)?;
    let (mirror, _) = Mirror::assemble(members.clone(), members_allocator(&members))
        .map_err(|e| e.to_string())?;
    let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
    let alloc = allocator(&registry)?;
    let mut seed = u64::from(std::process::id());
    let mut lba = 0;
    loop {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let run = 1 + seed % 64;
        if lba + run > MD_SPAN {
            lba = 0;
        }
        write_all(
            dev.as_ref(),
            &alloc,
            lba,
            &pattern(seed, (run * BS) as usize),
        )?;
        println!("{lba} {run} {seed}");
        lba += run + seed % 13;
    }
}

/// Runs the guest's `ustor-stack` tool; its stdout, or an error with its
/// stderr (the whole error chain).
fn ustor_stack(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("/bin/ustor-stack")
        .args(args)
        .output()
        .map_err(|e| format!("running ustor-stack: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ustor-stack {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A mirror with metadata over a QEMU namespace and a LIO LUN: a writer
/// process is killed with SIGKILL mid-write; `ustor-stack` (a new process)
/// shows the dirty regions, assembles the members (the other way round)
/// and resyncs them, `ustor-stack check` finds no mismatch, and every
/// acknowledged write reads back;
/// afterwards `dd` on the namespace and `sg_dd` on the LUN read the same
/// data area.
fn stack_mirror_with_metadata_survives_a_killed_writer(env: &GuestEnv) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    use ustor::bdev_stack::spec::members_allocator;
    use ustor::bdev_stack::{MetaLayout, Mirror, ResyncNeed};
    let (a, _) = nvme_addrs(env)?;
    let lun = lio_lun(env, 0)?;
    back_to_vfio(&[&a])?;
    if std::env::var(MD_WRITER).is_ok() {
        return md_writer(&a, &lun);
    }
    let region = 256;
    let layout = {
        let registry = LeafRegistry::with_defaults();
        let members = md_members(&registry, &a, &lun)?;
        let info = members[0].info().clone();
        let mirror = Mirror::create(members.clone(), region, members_allocator(&members))
            .map_err(|e| e.to_string())?;
        // The legs hold what earlier tests left: the initial sync makes
        // them equal.
        mirror
            .resync_dirty()
            .map_err(|e| e.to_string())?
            .run()
            .map_err(|e| e.to_string())?;
        mirror.stop().map_err(|e| e.to_string())?;
        MetaLayout::new(info.block_count, info.block_size, region).map_err(|e| e.to_string())?
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args([
            "exec",
            "stack_mirror_with_metadata_survives_a_killed_writer",
        ])
        .env(MD_WRITER, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the writer: {e}"))?;
    let child_pid = child.id();
    let stdout = child.stdout.take().ok_or("writer stdout")?;
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let v: Vec<u64> = l
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect();
                (v.len() == 3).then(|| (v[0], v[1], v[2]))
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().map_err(|e| format!("SIGKILL: {e}"))?;
    let _ = child.wait();
    let acked = reader.join().map_err(|_| "reader thread")?;
    if acked.is_empty() {
        return Err("the writer acknowledged nothing before the kill".into());
    }
    // A new process, as an administrator would: `ustor-stack` shows the
    // unclean array, assembles it (members the other way round) and
    // resyncs the bitmap's dirty regions, then checks the legs.
    let (nvme_spec, lun_spec) = (format!("nvme:{a}/1"), format!("sg:{lun}"));
    let shown: serde_json::Value =
        serde_json::from_str(&ustor_stack(&["show", "--json", &lun_spec, &nvme_spec])?)
            .map_err(|e| format!("ustor-stack show --json: {e}"))?;
    let dirty = shown["dirty_regions"].as_array().map_or(0, Vec::len);
    if shown["clean"] != false || dirty == 0 {
        return Err(format!("a killed writer left the array clean: {shown}"));
    }
    let assembled = ustor_stack(&["assemble", &lun_spec, &nvme_spec])?;
    if !assembled.contains("resynced") || !assembled.contains("stopped clean") {
        return Err(format!("ustor-stack assemble did not resync: {assembled}"));
    }
    println!("ok ustor-stack assemble resynced {dirty} dirty region(s)");
    let checked: serde_json::Value =
        serde_json::from_str(&ustor_stack(&["check", "--json", &nvme_spec, &lun_spec])?)
            .map_err(|e| format!("ustor-stack check --json: {e}"))?;
    if checked["mismatched"]
        .as_array()
        .is_none_or(|m| !m.is_empty())
        || checked["regions"] == 0
    {
        return Err(format!("legs differ after the resync: {checked}"));
    }
    println!("ok ustor-stack check: {checked}");
    {
        let registry = LeafRegistry::with_defaults();
        let members = md_members(&registry, &a, &lun)?;
        let (mirror, report) = Mirror::assemble(members.clone(), members_allocator(&members))
            .map_err(|e| e.to_string())?;
        if !report.was_clean || report.resync != ResyncNeed::Nothing {
            return Err(format!(
                "ustor-stack assemble did not stop the array clean: {report:?}"
            ));
        }
        // The one write in flight at the kill may or may not be there.
        let last = acked[acked.len() - 1];
        let mut seed = last.2;
        let mut lba = last.0 + last.1 + last.2 % 13;
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let run = 1 + seed % 64;
        if lba + run > MD_SPAN {
            lba = 0;
        }
        let uncertain = lba..lba + run;
        let dev: Arc<dyn BlockDevice> = Arc::new(mirror);
        let alloc = allocator(&registry)?;
        let now = read_all(dev.as_ref(), &alloc, 0, MD_SPAN)?;
        let mut latest = std::collections::HashMap::new();
        for &(l, r, s) in &acked {
            let data = pattern(s, (r * BS) as usize);
            for b in 0..r {
                latest.insert(
                    l + b,
                    data[(b * BS) as usize..((b + 1) * BS) as usize].to_vec(),
                );
            }
        }
        for (b, data) in &latest {
            if !uncertain.contains(b)
                && now[(*b * BS) as usize..((*b + 1) * BS) as usize] != data[..]
            {
                return Err(format!("acknowledged block {b} lost"));
            }
        }
        println!(
            "ok {} acknowledged writes read back; no mismatch; pid {child_pid} killed",
            acked.len()
        );
    }
    let lio = reference_read("sg_dd", &lun, layout.data_offset, MD_SPAN)?;
    let node = kernel_namespace(&a)?;
    let nvme = reference_read("dd", &node, layout.data_offset, MD_SPAN);
    back_to_vfio(&[&a])?;
    if nvme? != lio {
        return Err("dd (namespace) and sg_dd (LUN) read different data areas".into());
    }
    println!("ok dd and sg_dd agree on the data area");
    Ok(())
}
