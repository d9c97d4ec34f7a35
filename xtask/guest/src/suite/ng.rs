//! The `ng:` leaf on a QEMU controller the kernel keeps: NVMe commands over
//! io_uring passthrough on its generic node, checked against nvme-cli's
//! Identify and `dd` on the block node of the same namespace.

use super::stack::pattern;
use super::{GuestEnv, GuestTest, Kind};
use crate::setup::{bind_vfio, kernel_namespace as kernel_node, tool_output};
use crate::topology::{COPY, FAULTS, GuestDriver, NVME_BENCH};
use nvme::ControllerView;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ustor::bdev_stack::nvme_leaf::dma_allocator_for;
use ustor::bdev_stack::{
    BlockDevice, CopyOffload, DmaMemory, NgNamespace, NgOptions, NgPassthru, OffloadOutcome,
    OffloadRange, OffloadRequest, OffloadSource, OwnedChannel, SubmitError, spec,
};

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "ng_identify_matches_nvme_cli",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(60),
        run: ng_identify_matches_nvme_cli,
    },
    GuestTest {
        name: "ng_write_read_verify_qd1_to_128_and_beyond_mdts",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(300),
        run: ng_write_read_verify,
    },
    GuestTest {
        name: "ng_copy_multi_range_matches_dd",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(120),
        run: ng_copy_multi_range_matches_dd,
    },
    GuestTest {
        name: "ng_conformance_identify_consistent",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(60),
        run: ng_conformance_identify_consistent,
    },
    GuestTest {
        name: "ng_conformance_write_read_verify",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(600),
        run: ng_conformance_write_read_verify,
    },
    GuestTest {
        name: "ng_conformance_copy_multi_range_and_limits",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(300),
        run: ng_conformance_copy_multi_range_and_limits,
    },
    GuestTest {
        name: "ng_conformance_lba_out_of_range",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(120),
        run: ng_conformance_lba_out_of_range,
    },
    GuestTest {
        name: "ng_conformance_two_queues_two_threads",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(300),
        run: ng_conformance_two_queues_two_threads,
    },
    GuestTest {
        name: "ng_gc_store_relocates_by_copy_and_reopens",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(300),
        run: ng_gc_store,
    },
    GuestTest {
        name: "file_leaf_holds_a_block_device_exclusively",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(60),
        run: file_leaf_holds_a_block_device_exclusively,
    },
    GuestTest {
        name: "ng_bench_ustor_vs_fio_uring_cmd",
        kind: Kind::Bench,
        topology: NVME_BENCH,
        timeout: Duration::from_secs(600),
        run: ng_bench_ustor_vs_fio_uring_cmd,
    },
    GuestTest {
        name: "ng_copy_bench_offload_bounce",
        kind: Kind::Bench,
        topology: COPY,
        timeout: Duration::from_secs(600),
        run: ng_copy_bench_offload_bounce,
    },
];

/// The kernel-driven controller with the clean 4 KiB namespace: its
/// generic node, its block node, and nvme-cli's captures.
struct KernelNamespace {
    ng: String,
    block: String,
    reference_dir: std::path::PathBuf,
}

fn kernel_namespace(env: &GuestEnv) -> Result<KernelNamespace, String> {
    let ctrl = env
        .devices
        .nvme
        .iter()
        .find(|c| {
            c.spec.driver == GuestDriver::Kernel
                && c.spec
                    .namespaces
                    .first()
                    .is_some_and(|n| n.block_size == 4096 && n.faults.is_empty())
        })
        .ok_or("the topology has no clean kernel-driven 4 KiB namespace")?;
    let number = ctrl
        .kernel_name
        .strip_prefix("nvme")
        .ok_or_else(|| format!("unexpected controller name {}", ctrl.kernel_name))?;
    let ns = KernelNamespace {
        ng: format!("/dev/ng{number}n1"),
        block: format!("/dev/{}n1", ctrl.kernel_name),
        reference_dir: ctrl.reference_dir.clone(),
    };
    if !Path::new(&ns.ng).exists() {
        return Err(format!("{}: no generic node for {}", ns.ng, ns.block));
    }
    Ok(ns)
}

fn json_file(dir: &Path, file: &str) -> Result<serde_json::Value, String> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn open(ns: &KernelNamespace, options: NgOptions) -> Result<NgNamespace, String> {
    NgNamespace::open(Path::new(&ns.ng), options).map_err(|e| ustor::bdev_stack::error_chain(&e))
}

fn polled(poll: bool) -> NgOptions {
    NgOptions {
        poll,
        ..NgOptions::default()
    }
}

fn ng_identify_matches_nvme_cli(env: &GuestEnv) -> Result<(), String> {
    let ns = kernel_namespace(env)?;
    ensure_eq!(
        format!("{} by default: interrupts", ns.ng),
        open(&ns, polled(false))?.is_polled(),
        false
    );
    let leaf = open(&ns, polled(true))?;
    ensure_eq!(
        format!("{} poll=on: polled (nvme.poll_queues=1)", ns.ng),
        leaf.is_polled(),
        true
    );
    // The leaf holds the block device: no second leaf, no mount, no
    // exclusive opener writes under it.
    for other in [format!("ng:{}", ns.ng), format!("file:{}", ns.block)] {
        match spec::build(&other) {
            Ok(_) => return Err(format!("{other} opened while ng: holds {}", ns.block)),
            Err(e) => {
                let chain = ustor::bdev_stack::error_chain(&e);
                if !chain.contains("in use") {
                    return Err(format!("{other}: not the in-use error: {chain}"));
                }
                println!("ok {other} refused while held: in use");
            }
        }
    }
    let j = json_file(&ns.reference_dir, "id-ctrl.json")?;
    let id = leaf.identify_controller();
    let num = |k: &str| j[k].as_u64();
    let text = |k: &str| j[k].as_str().map(|s| s.trim_end().to_owned());
    ensure_eq!("vid", Some(u64::from(id.vid.get())), num("vid"));
    ensure_eq!("sn", Some(id.serial()), text("sn"));
    ensure_eq!("mn", Some(id.model()), text("mn"));
    ensure_eq!("mdts", Some(u64::from(id.mdts)), num("mdts"));
    ensure_eq!("oncs", Some(u64::from(id.oncs.get())), num("oncs"));
    ensure_eq!(
        "subnqn",
        Some(ustor::nvme::spec::ascii_field(&id.subnqn)),
        text("subnqn")
    );
    let j = json_file(&ns.reference_dir, "id-ns-1.json")?;
    let raw = leaf.identify_namespace();
    let num = |k: &str| j[k].as_u64();
    ensure_eq!("nsid", leaf.nsid(), 1);
    ensure_eq!("nsze", Some(raw.nsze.get()), num("nsze"));
    ensure_eq!("flbas", Some(u64::from(raw.flbas)), num("flbas"));
    ensure_eq!("mssrl", Some(u64::from(raw.mssrl.get())), num("mssrl"));
    ensure_eq!("mcl", Some(u64::from(raw.mcl.get())), num("mcl"));
    ensure_eq!("msrc", Some(u64::from(raw.msrc)), num("msrc"));
    let info = leaf.info();
    ensure_eq!("block size", info.block_size, 4096);
    ensure_eq!("block count", Some(info.block_count), num("nsze"));
    // The kernel's limit, which the leaf takes as its largest transfer.
    let kb = std::fs::read_to_string(format!(
        "/sys/block/{}/queue/max_hw_sectors_kb",
        ns.block.trim_start_matches("/dev/")
    ))
    .map_err(|e| e.to_string())?;
    let kb: u64 = kb
        .trim()
        .parse()
        .map_err(|e| format!("max_hw_sectors_kb: {e}"))?;
    if info.max_transfer_blocks * 4 > kb || info.max_transfer_blocks == 0 {
        return Err(format!(
            "largest transfer {} blocks, kernel's max_hw_sectors_kb {kb}",
            info.max_transfer_blocks
        ));
    }
    println!(
        "ok largest transfer: {} blocks (kernel: {kb} KiB)",
        info.max_transfer_blocks
    );
    match info.copy_offloads.first() {
        Some(CopyOffload::NvmeCopy {
            max_ranges,
            max_range_blocks,
            max_command_blocks,
            nsid,
            ..
        }) => {
            ensure_eq!(
                "copy ranges",
                u64::from(*max_ranges),
                u64::from(raw.msrc) + 1
            );
            ensure_eq!(
                "copy range blocks",
                *max_range_blocks,
                u64::from(raw.mssrl.get())
            );
            ensure_eq!("copy blocks", *max_command_blocks, u64::from(raw.mcl.get()));
            ensure_eq!("copy nsid", *nsid, 1);
        }
        other => return Err(format!("NVMe Copy not advertised: {other:?}")),
    }
    Ok(())
}

/// Runs writes (with `data`) or reads of `extents` (lba, blocks) on `dev`,
/// `depth` in flight, with buffers from the stack's allocator (for an
/// io_uring leaf: its registered memory, fixed-buffer commands); returns
/// what reads read, in extent order.
pub(super) fn transfer(
    dev: &Arc<dyn BlockDevice>,
    depth: usize,
    extents: &[(u64, u64)],
    data: Option<&[Vec<u8>]>,
) -> Result<Vec<Vec<u8>>, String> {
    let bs = u64::from(dev.info().block_size);
    let alloc = dma_allocator_for(dev).map_err(|e| e.to_string())?;
    let mut ch =
        OwnedChannel::<Box<dyn DmaMemory>>::open(&**dev, depth).map_err(|e| e.to_string())?;
    let mut results = vec![Vec::new(); extents.len()];
    let mut failures = Vec::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < extents.len() || ch.outstanding() > 0 {
        while next < extents.len() && ch.outstanding() < depth {
            let (lba, blocks) = extents[next];
            let mut buf = alloc
                .allocate((blocks * bs) as usize)
                .map_err(|e| e.to_string())?;
            let submitted = match data {
                Some(d) => {
                    buf.fill_from(0, &d[next]).map_err(|e| e.to_string())?;
                    ch.write(lba, blocks, buf, next as u64)
                }
                None => ch.read(lba, blocks, buf, next as u64),
            };
            match submitted {
                Ok(()) => next += 1,
                Err(r) if r.error == SubmitError::Busy => break,
                Err(r) => return Err(format!("extent {lba}+{blocks}: {}", r.error)),
            }
        }
        ch.poll(depth, |ctx, result, buf| match (result, buf) {
            (Ok(()), Some(mut buf)) => {
                let mut bytes = vec![0u8; extents[ctx as usize].1 as usize * bs as usize];
                match buf.copy_to(0, &mut bytes) {
                    Ok(()) => results[ctx as usize] = bytes,
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (Ok(()), None) => {}
            (Err(e), _) => failures.push(format!("extent {ctx}: {e}")),
        });
        if Instant::now() > deadline {
            return Err(format!("{} requests never completed", ch.outstanding()));
        }
    }
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(results)
}

/// Reads `blocks` 4 KiB blocks at `lba` of the block node with `dd`
/// (O_DIRECT): what the kernel's own path sees.
pub(super) fn dd_read(node: &str, lba: u64, blocks: u64) -> Result<Vec<u8>, String> {
    let out = format!("/run/ustor/ng-dd-{}-{lba}.bin", std::process::id());
    tool_output(
        "dd",
        &[
            &format!("if={node}"),
            &format!("of={out}"),
            "bs=4096",
            &format!("skip={lba}"),
            &format!("count={blocks}"),
            "iflag=direct",
        ],
    )?;
    let bytes = std::fs::read(&out).map_err(|e| format!("{out}: {e}"))?;
    std::fs::remove_file(&out).map_err(|e| format!("{out}: {e}"))?;
    Ok(bytes)
}

fn ng_write_read_verify(env: &GuestEnv) -> Result<(), String> {
    let ns = kernel_namespace(env)?;
    for (poll, registered_buffers) in [(false, false), (true, false), (false, true)] {
        write_read_verify(
            &ns,
            NgOptions {
                poll,
                registered_buffers,
            },
        )?;
    }
    Ok(())
}

/// Writes and reads at QD 1 to 128 through `ng:` as `options` say,
/// checked against `dd`; then beyond the largest transfer through a stack.
fn write_read_verify(ns: &KernelNamespace, options: NgOptions) -> Result<(), String> {
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mode = format!(
        "poll={} registered={}",
        on_off(options.poll),
        on_off(options.registered_buffers)
    );
    let leaf: Arc<dyn BlockDevice> = Arc::new(open(ns, options)?);
    let max = leaf.info().max_transfer_blocks;
    // QD 1 to 128, each in a 2048-block region of its own, requests back
    // to back: mostly small (so 128 are in flight), every eighth up to
    // the largest transfer.
    for (i, depth) in [1usize, 8, 32, 128].into_iter().enumerate() {
        let base = i as u64 * 2048;
        let mut extents = Vec::new();
        let (mut at, mut k) = (base, 0u64);
        while at < base + 2048 {
            let limit = if k % 8 == 0 { max } else { max.min(16) };
            let blocks = (1 + (k * 7919) % limit).min(base + 2048 - at);
            extents.push((at, blocks));
            at += blocks;
            k += 1;
        }
        let data: Vec<Vec<u8>> = extents
            .iter()
            .map(|&(lba, blocks)| pattern(lba ^ (depth as u64) << 32, (blocks * 4096) as usize))
            .collect();
        transfer(&leaf, depth, &extents, Some(&data))?;
        let back = transfer(&leaf, depth, &extents, None)?;
        if back != data {
            return Err(format!(
                "QD {depth}: read back differs from what was written"
            ));
        }
        let expected: Vec<u8> = data.concat();
        if dd_read(&ns.block, base, 2048)? != expected {
            return Err(format!("QD {depth}: dd on {} reads other data", ns.block));
        }
        println!(
            "ok {mode} QD {depth}: {} requests of 1..={max} blocks written, read back, equal \
             to dd",
            extents.len()
        );
    }
    // Beyond the largest transfer: a stack over the leaf splits (the leaf
    // goes first: one ng: leaf holds the namespace at a time).
    drop(leaf);
    let stacked = spec::build(&format!(
        "concat(ng:{},poll={},registered={})",
        ns.ng,
        on_off(options.poll),
        on_off(options.registered_buffers)
    ))
    .map_err(|e| e.to_string())?;
    let blocks = (max * 4 + 3).min(4096);
    let lba = 8192;
    let data = vec![pattern(0xbeef, (blocks * 4096) as usize)];
    transfer(&stacked, 4, &[(lba, blocks)], Some(&data))?;
    if transfer(&stacked, 4, &[(lba, blocks)], None)? != data {
        return Err(format!("{blocks} blocks through concat: read back differs"));
    }
    if dd_read(&ns.block, lba, blocks)? != data[0] {
        return Err(format!(
            "{blocks} blocks through concat: dd reads other data"
        ));
    }
    println!(
        "ok {blocks} blocks ({}x the largest transfer) as one request through a stack",
        blocks / max
    );
    Ok(())
}

fn ng_copy_multi_range_matches_dd(env: &GuestEnv) -> Result<(), String> {
    let ns = kernel_namespace(env)?;
    let leaf: Arc<dyn BlockDevice> = Arc::new(open(&ns, NgOptions::default())?);
    // Four scattered sources, one contiguous destination.
    let sources = [(10_000u64, 16u64), (10_100, 8), (10_050, 32), (10_400, 1)];
    let data: Vec<Vec<u8>> = sources
        .iter()
        .map(|&(lba, blocks)| pattern(lba * 31, (blocks * 4096) as usize))
        .collect();
    transfer(&leaf, 4, &sources, Some(&data))?;
    let dst = 12_000u64;
    let mut ranges = Vec::new();
    let mut at = dst;
    for &(src, blocks) in &sources {
        ranges.push(OffloadRange {
            src,
            dst: at,
            blocks,
        });
        at += blocks;
    }
    let mut ch = leaf
        .open_copy_channel(2)
        .map_err(|e| e.to_string())?
        .ok_or("no copy channel")?;
    ch.submit_copy(&OffloadRequest {
        source: OffloadSource::SameDevice,
        ranges: &ranges,
        ctx: 7,
    })
    .map_err(|e| format!("Copy refused: {e:?}"))?;
    let mut done = Vec::with_capacity(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.is_empty() {
        ch.poll(&mut done, 2);
        if Instant::now() > deadline {
            return Err("the Copy never completed".into());
        }
    }
    match &done[0].outcome {
        OffloadOutcome::Done => {}
        other => return Err(format!("Copy: {other:?}")),
    }
    let copied = dd_read(&ns.block, dst, at - dst)?;
    if copied != data.concat() {
        return Err("dd reads other data at the Copy's destination".into());
    }
    println!(
        "ok a Copy of {} ranges ({} blocks) reads back equal with dd",
        ranges.len(),
        at - dst
    );
    // More ranges than MSRC + 1 allows: refused by the leaf, nothing sent.
    let many: Vec<OffloadRange> = (0..17)
        .map(|i| OffloadRange {
            src: 10_000 + i,
            dst: 14_000 + i,
            blocks: 1,
        })
        .collect();
    match ch.submit_copy(&OffloadRequest {
        source: OffloadSource::SameDevice,
        ranges: &many,
        ctx: 8,
    }) {
        Err(e) => println!("ok 17 ranges refused: {e:?}"),
        Ok(()) => return Err("a Copy of 17 ranges (MSRC 15) was taken".into()),
    }
    Ok(())
}

/// The NVMe conformance checks on the kernel-driven namespace, through
/// `ng:` passthrough (the same functions the VFIO tests run). QEMU 7.2's
/// controller is under the kernel here too: `Quirks::QEMU_7_2`. The checks
/// that do not apply: `reset_with_commands_in_flight` and
/// `reset_under_load` (the controller and its resets are the kernel's: a
/// passthrough host cannot reset it, and a reset through `/dev/nvmeX`
/// would test the kernel's recovery, not ours), and whatever is about
/// registers, doorbells or queue creation (the kernel's).
fn conformance(
    env: &GuestEnv,
    check: impl FnOnce(&NgPassthru, u32) -> nvme::conformance::Check,
) -> Result<(), String> {
    let ns = kernel_namespace(env)?;
    let view = NgPassthru::new(Arc::new(open(&ns, NgOptions::default())?));
    let nsid = view.leaf().nsid();
    check(&view, nsid).map_err(|e| format!("{} ns {nsid}: {e}", ns.ng))?;
    println!(
        "ok {} ns {nsid}: largest transfer {} bytes, {} kernel I/O queues",
        ns.ng,
        view.max_transfer(),
        view.io_queues()
    );
    Ok(())
}

fn ng_conformance_identify_consistent(env: &GuestEnv) -> Result<(), String> {
    conformance(env, |v, _| nvme::conformance::identify_consistent(v))
}

fn ng_conformance_write_read_verify(env: &GuestEnv) -> Result<(), String> {
    conformance(env, |v, ns| {
        nvme::conformance::write_read_verify(v, ns, &[1, 32, 128], 0x5eed + u64::from(ns))
    })
}

fn ng_conformance_copy_multi_range_and_limits(env: &GuestEnv) -> Result<(), String> {
    conformance(env, |v, ns| {
        let quirks = nvme::conformance::Quirks::QEMU_7_2;
        nvme::conformance::copy_multi_range(v, ns, 0xc0c0 + u64::from(ns))?;
        nvme::conformance::copy_over_limits(v, ns, quirks)?;
        nvme::conformance::copy_over_mcl(v, ns, quirks)
    })
}

fn ng_conformance_lba_out_of_range(env: &GuestEnv) -> Result<(), String> {
    conformance(env, |v, ns| {
        nvme::conformance::lba_out_of_range(v, ns, nvme::conformance::Quirks::QEMU_7_2)?;
        // The check expects this of a namespace-scoped host: say so.
        println!(
            "ok a read naming namespace 0xfffffff0 was refused by the kernel with EINVAL \
             (the node passes on only namespace {ns}); the device's LBA Out of Range came back \
             as the NVMe status"
        );
        Ok(())
    })
}

fn ng_conformance_two_queues_two_threads(env: &GuestEnv) -> Result<(), String> {
    conformance(env, nvme::conformance::two_queue_pairs_two_threads)
}

fn ng_gc_store(env: &GuestEnv) -> Result<(), String> {
    let ns = kernel_namespace(env)?;
    // Completions by interrupt (the default): with poll=on the same run
    // took 54-66 s instead of 2, as the store sleeps between polls and a
    // polled ring completes nothing meanwhile.
    let spec = format!("ng:{}", ns.ng);
    let dev = spec::build(&spec).map_err(|e| e.to_string())?;
    let start = Instant::now();
    super::gc::gc_store_run(&spec, &dev, super::gc::Relocation::Offloaded)?;
    println!("{spec}: {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// The generic node of the block node `/dev/nvmeXnY`.
fn generic_node(block: &str) -> Result<String, String> {
    block
        .strip_prefix("/dev/nvme")
        .map(|rest| format!("/dev/ng{rest}"))
        .ok_or_else(|| format!("{block} is not an NVMe block node"))
}

/// fio's io_uring_cmd engine on the generic node, at its strongest the
/// kernel allows: polled (`--hipri`), registered buffers and file.
fn fio_uring_cmd_iops(ng: &str, qd: u16) -> Result<f64, String> {
    let args: Vec<String> = vec![
        "--name=randread".into(),
        format!("--filename={ng}"),
        "--ioengine=io_uring_cmd".into(),
        "--cmd_type=nvme".into(),
        "--hipri".into(),
        "--fixedbufs".into(),
        "--registerfiles".into(),
        "--rw=randread".into(),
        "--bs=4k".into(),
        format!("--iodepth={qd}"),
        "--numjobs=1".into(),
        format!("--runtime={}", super::nvme::BENCH_SECONDS),
        "--time_based".into(),
        "--output-format=json".into(),
    ];
    super::nvme::run_fio(&args)
}

/// ustor-perf on `ng:...,poll=on`; `registered`: with the leaf's
/// registered buffers.
fn ustor_ng_iops(ng: &str, qd: u16, registered: bool) -> Result<f64, String> {
    let spec = format!(
        "ng:{ng},poll=on,registered={}",
        if registered { "on" } else { "off" }
    );
    let target = ustor_tools::perf::Target::Stack { spec };
    Ok(super::nvme::ustor_randread(target, qd, 0)?.iops)
}

/// ustor-perf on `ng:` against fio's io_uring_cmd engine on the same
/// namespace (the null-backed controller, left to the kernel), one boot,
/// 4 KiB random reads at QD 1 and 32, alternated; median ratios.
fn ng_bench_ustor_vs_fio_uring_cmd(env: &GuestEnv) -> Result<(), String> {
    let addr = env
        .devices
        .nvme
        .first()
        .ok_or("topology has no NVMe controller")?
        .pci_address
        .clone();
    let mut ratios: [Vec<f64>; 2] = Default::default();
    let result = (|| -> Result<(), String> {
        let ng = generic_node(&kernel_node(&addr)?)?;
        println!("{ng}: ustor-perf on ng:{ng},poll=on (nvme.poll_queues=1), fio --hipri");
        for round in 1..=super::nvme::BENCH_ROUNDS {
            for (i, qd) in [1u16, 32].into_iter().enumerate() {
                // Alternate which runs first.
                let (ours, fio) = if round % 2 == 1 {
                    let o = ustor_ng_iops(&ng, qd, false)?;
                    (o, fio_uring_cmd_iops(&ng, qd)?)
                } else {
                    let f = fio_uring_cmd_iops(&ng, qd)?;
                    (ustor_ng_iops(&ng, qd, false)?, f)
                };
                // For information: the same with registered buffers.
                let registered = ustor_ng_iops(&ng, qd, true)?;
                ratios[i].push(ours / fio);
                println!(
                    "round {round} qd{qd}: ustor ng: {ours:.0} IOPS (registered buffers \
                     {registered:.0}), \
                     fio io_uring_cmd {fio:.0} IOPS, ratio {:.2}",
                    ours / fio
                );
            }
        }
        Ok(())
    })();
    let rebound = bind_vfio(&addr);
    result?;
    rebound?;
    let [r1, r32] = &mut ratios;
    println!(
        "ustor-ng/fio-uring-cmd iops ratio: qd1={:.2} qd32={:.2}",
        ustor_tools::copybench::median(r1),
        ustor_tools::copybench::median(r32)
    );
    Ok(())
}

/// The copy bench's relocation (384 extents of 64 KiB scattered, gathered)
/// within one namespace through `ng:`: NVMe Copy by passthrough against the
/// bounce path, alternated; medians of throughput and CPU per GiB.
fn ng_copy_bench_offload_bounce(env: &GuestEnv) -> Result<(), String> {
    use ustor_tools::copybench::{Bench, Workload, median};
    let addr = env
        .devices
        .nvme
        .get(1)
        .ok_or("the copy topology needs two NVMe controllers")?
        .pci_address
        .clone();
    // Per I/O completion mode (interrupts, polled) and method (offload,
    // bounce): MiB/s and CPU s/GiB of each round.
    let mut tput: [[Vec<f64>; 2]; 2] = Default::default();
    let mut cpu: [[Vec<f64>; 2]; 2] = Default::default();
    let result = (|| -> Result<(), String> {
        let ng = generic_node(&kernel_node(&addr)?)?;
        // One mode at a time: an ng: leaf holds its namespace.
        for (m, spec) in [format!("ng:{ng}"), format!("ng:{ng},poll=on")]
            .into_iter()
            .enumerate()
        {
            let mut bench = Bench::open(&Workload {
                src: spec,
                extent_bytes: 64 << 10,
                extents: 384,
                ..Workload::default()
            })
            .map_err(|e| ustor::bdev_stack::error_chain(&e))?;
            for offload in [true, false] {
                bench.run(offload, 0).map_err(|e| e.to_string())?;
            }
            for round in 1..=5u64 {
                let order = if round % 2 == 1 {
                    [true, false]
                } else {
                    [false, true]
                };
                for offload in order {
                    let r = bench.run(offload, round).map_err(|e| e.to_string())?;
                    let i = usize::from(!offload);
                    tput[m][i].push(r.mib_per_s);
                    cpu[m][i].push(r.cpu_s_per_gib);
                    println!(
                        "round {round} {} {:<7} {:>8.1} MiB/s  CPU {:>8.4} s/GiB, {}, read back \
                         equal",
                        ["interrupts", "polled I/O"][m],
                        if offload { "offload" } else { "bounce" },
                        r.mib_per_s,
                        r.cpu_s_per_gib,
                        super::copybench::commands(&r)
                    );
                }
            }
        }
        Ok(())
    })();
    let rebound = bind_vfio(&addr);
    result?;
    rebound?;
    let ratios = super::copybench::ratios;
    println!(
        "for information, poll=on (bounce on polled rings): offload/bounce throughput={:.2} \
         cpu={:.3}",
        median(&ratios(&tput[1][0], &tput[1][1])),
        median(&ratios(&cpu[1][0], &cpu[1][1]))
    );
    println!(
        "ng offload/bounce: throughput={:.2} cpu={:.3}",
        median(&ratios(&tput[0][0], &tput[0][1])),
        median(&ratios(&cpu[0][0], &cpu[0][1]))
    );
    Ok(())
}

/// A `file:` leaf over a block device holds it exclusively (`O_EXCL`):
/// a second exclusive user (another leaf, a mount) is refused with the
/// typed "in use" error while the first lives, and welcome after; and it
/// runs on io_uring.
fn file_leaf_holds_a_block_device_exclusively(env: &GuestEnv) -> Result<(), String> {
    let ns = kernel_namespace(env)?;
    let spec_text = format!("file:{},bs=4096", ns.block);
    let first = spec::build(&spec_text).map_err(|e| e.to_string())?;
    ensure_eq!("block count", first.info().block_count, 16384);
    match spec::build(&spec_text) {
        Ok(_) => return Err(format!("{}: opened twice exclusively", ns.block)),
        Err(e) => {
            let chain = ustor::bdev_stack::error_chain(&e);
            if !chain.contains("is in use") || !chain.contains("Device or resource busy") {
                return Err(format!("not the typed in-use error: {chain}"));
            }
            println!("ok second exclusive open refused: {chain}");
        }
    }
    let leaf = ustor::bdev_stack::FileDevice::open(Path::new(&ns.block), 4096, None);
    if leaf.is_ok() {
        return Err("a FileDevice opened the held block device".into());
    }
    // Writes through the first, on io_uring, read by dd.
    let data = vec![pattern(0xfeed, 8 * 4096)];
    transfer(&first, 4, &[(15_000, 8)], Some(&data))?;
    if dd_read(&ns.block, 15_000, 8)? != data[0] {
        return Err("dd reads other data than the file leaf wrote".into());
    }
    drop(first);
    let again = ustor::bdev_stack::FileDevice::open(Path::new(&ns.block), 4096, None)
        .map_err(|e| format!("after the first closed: {e}"))?;
    ensure_eq!(
        "engine",
        again.engine(),
        ustor::bdev_stack::FileEngine::Uring
    );
    Ok(())
}
