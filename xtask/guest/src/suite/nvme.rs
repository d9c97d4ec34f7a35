//! NVMe through VFIO against QEMU's controller, cross-checked with nvme-cli.

use super::{GuestEnv, GuestTest, Kind};
use crate::reference::ShowRegs;
use crate::setup::NvmeDevice;
use crate::topology::{DEFAULT, NVME_BENCH};
use std::path::Path;
use std::time::Duration;
use ustor_tools::copybench::median;

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "vfio_open_map_bar0_dma_map",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: vfio_open_map_bar0_dma_map,
    },
    GuestTest {
        name: "vfio_regs_match_nvme_show_regs",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: vfio_regs_match_nvme_show_regs,
    },
    GuestTest {
        name: "nvme_identify_matches_nvme_cli",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: nvme_identify_matches_nvme_cli,
    },
    GuestTest {
        name: "nvme_write_read_verify",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(600),
        run: nvme_write_read_verify,
    },
    GuestTest {
        name: "nvme_copy_multi_range_and_limits",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(300),
        run: nvme_copy_multi_range_and_limits,
    },
    GuestTest {
        name: "nvme_lba_out_of_range",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: nvme_lba_out_of_range,
    },
    GuestTest {
        name: "nvme_two_queue_pairs_two_threads",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(300),
        run: nvme_two_queue_pairs_two_threads,
    },
    GuestTest {
        name: "nvme_reset_with_commands_in_flight",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(300),
        run: nvme_reset_with_commands_in_flight,
    },
    GuestTest {
        name: "nvme_reset_under_load",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(300),
        run: nvme_reset_under_load,
    },
    GuestTest {
        name: "nvme_shared_dma_context_two_controllers",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(300),
        run: nvme_shared_dma_context_two_controllers,
    },
    GuestTest {
        name: "nvme_bench_ustor_vs_fio",
        kind: Kind::Bench,
        topology: NVME_BENCH,
        timeout: Duration::from_secs(600),
        run: nvme_bench_ustor_vs_fio,
    },
];

type VfioController = nvme::Controller<nvme::vfio::VfioPci>;

fn bring_up(ctrl: &NvmeDevice) -> Result<VfioController, String> {
    let dev = open_vfio(ctrl)?;
    nvme::Controller::new(dev, nvme::ControllerOptions::default())
        .map_err(|e| format!("{}: bring-up: {e}", ctrl.pci_address))
}

/// Runs a conformance check on every namespace of every controller.
fn each_namespace(
    env: &GuestEnv,
    check: impl Fn(&VfioController, u32) -> nvme::conformance::Check,
) -> Result<(), String> {
    for dev in &env.devices.nvme {
        let ctrl = bring_up(dev)?;
        for ns in ctrl.namespaces().to_vec() {
            check(&ctrl, ns.nsid)
                .map_err(|e| format!("{} ns {}: {e}", dev.pci_address, ns.nsid))?;
            println!(
                "ok {} ns {} ({} B blocks)",
                dev.pci_address, ns.nsid, ns.block_size
            );
        }
    }
    Ok(())
}

fn json_file(dir: &Path, file: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(&read_reference(dir, file)?)
        .map_err(|e| format!("{}: {e}", dir.join(file).display()))
}

fn nvme_identify_matches_nvme_cli(env: &GuestEnv) -> Result<(), String> {
    for dev in &env.devices.nvme {
        let addr = &dev.pci_address;
        let ctrl = bring_up(dev)?;
        nvme::conformance::identify_consistent(&ctrl).map_err(|e| format!("{addr}: {e}"))?;
        let j = json_file(&dev.reference_dir, "id-ctrl.json")?;
        let id = ctrl.identify();
        let num = |k: &str| j[k].as_u64();
        let text = |k: &str| j[k].as_str().map(|s| s.trim_end().to_owned());
        ensure_eq!(format!("{addr} vid"), Some(id.vid.get() as u64), num("vid"));
        ensure_eq!(
            format!("{addr} ssvid"),
            Some(id.ssvid.get() as u64),
            num("ssvid")
        );
        ensure_eq!(format!("{addr} sn"), Some(id.serial()), text("sn"));
        ensure_eq!(format!("{addr} mn"), Some(id.model()), text("mn"));
        ensure_eq!(format!("{addr} fr"), Some(id.firmware()), text("fr"));
        ensure_eq!(format!("{addr} mdts"), Some(id.mdts as u64), num("mdts"));
        ensure_eq!(format!("{addr} ver"), Some(id.ver.get() as u64), num("ver"));
        ensure_eq!(
            format!("{addr} oacs"),
            Some(id.oacs.get() as u64),
            num("oacs")
        );
        ensure_eq!(format!("{addr} sqes"), Some(id.sqes as u64), num("sqes"));
        ensure_eq!(format!("{addr} cqes"), Some(id.cqes as u64), num("cqes"));
        ensure_eq!(format!("{addr} nn"), Some(id.nn.get() as u64), num("nn"));
        ensure_eq!(
            format!("{addr} oncs"),
            Some(id.oncs.get() as u64),
            num("oncs")
        );
        ensure_eq!(format!("{addr} vwc"), Some(id.vwc as u64), num("vwc"));
        ensure_eq!(
            format!("{addr} ocfs"),
            Some(id.ocfs.get() as u64),
            num("ocfs")
        );
        ensure_eq!(
            format!("{addr} subnqn"),
            Some(nvme::spec::ascii_field(&id.subnqn)),
            text("subnqn")
        );
        ensure_eq!(
            format!("{addr} namespaces"),
            ctrl.namespaces().len(),
            dev.spec.namespaces.len()
        );
        for ns in ctrl.namespaces() {
            let j = json_file(&dev.reference_dir, &format!("id-ns-{}.json", ns.nsid))?;
            let raw = ctrl
                .identify_namespace(ns.nsid)
                .map_err(|e| format!("{addr}: {e}"))?;
            let what = |f: &str| format!("{addr} ns {} {f}", ns.nsid);
            let num = |k: &str| j[k].as_u64();
            ensure_eq!(what("nsze"), Some(raw.nsze.get()), num("nsze"));
            ensure_eq!(what("ncap"), Some(raw.ncap.get()), num("ncap"));
            ensure_eq!(what("flbas"), Some(raw.flbas as u64), num("flbas"));
            ensure_eq!(what("nlbaf"), Some(raw.nlbaf as u64), num("nlbaf"));
            ensure_eq!(what("dlfeat"), Some(raw.dlfeat as u64), num("dlfeat"));
            ensure_eq!(what("mssrl"), Some(raw.mssrl.get() as u64), num("mssrl"));
            ensure_eq!(what("mcl"), Some(raw.mcl.get() as u64), num("mcl"));
            ensure_eq!(what("msrc"), Some(raw.msrc as u64), num("msrc"));
            let f = raw.lba_format_index();
            ensure_eq!(
                what("lbaf ds"),
                Some(raw.lbaf[f].lbads as u64),
                j["lbafs"][f]["ds"].as_u64()
            );
            ensure_eq!(
                what("block size"),
                ns.block_size as u64,
                1u64 << raw.lbaf[f].lbads
            );
        }
    }
    Ok(())
}

fn nvme_write_read_verify(env: &GuestEnv) -> Result<(), String> {
    // QD 1, 32 and the deepest queue QEMU allows (MQES).
    each_namespace(env, |c, ns| {
        nvme::conformance::write_read_verify(c, ns, &[1, 32, u16::MAX], 0x5eed + ns as u64)
    })
}

fn nvme_copy_multi_range_and_limits(env: &GuestEnv) -> Result<(), String> {
    each_namespace(env, |c, ns| {
        let quirks = nvme::conformance::Quirks::QEMU_7_2;
        nvme::conformance::copy_multi_range(c, ns, 0xc0c0 + ns as u64)?;
        nvme::conformance::copy_over_limits(c, ns, quirks)?;
        nvme::conformance::copy_over_mcl(c, ns, quirks)
    })
}

fn nvme_lba_out_of_range(env: &GuestEnv) -> Result<(), String> {
    each_namespace(env, |c, ns| {
        nvme::conformance::lba_out_of_range(c, ns, nvme::conformance::Quirks::QEMU_7_2)
    })
}

fn nvme_two_queue_pairs_two_threads(env: &GuestEnv) -> Result<(), String> {
    each_namespace(env, nvme::conformance::two_queue_pairs_two_threads)
}

fn nvme_reset_with_commands_in_flight(env: &GuestEnv) -> Result<(), String> {
    each_namespace(env, nvme::conformance::reset_with_commands_in_flight)
}

/// Resets under load on QEMU's controller through VFIO: ten resets while
/// three threads read, write and copy on queue pairs of their own (the
/// check the host tests run on the emulator).
fn nvme_reset_under_load(env: &GuestEnv) -> Result<(), String> {
    let dev = env.devices.nvme.first().ok_or("no NVMe controller")?;
    let ctrl = bring_up(dev)?;
    let summary = nvme::conformance::reset_under_load(&ctrl, 1, 3, 10, Duration::from_millis(50))
        .map_err(|e| format!("{}: {e}", dev.pci_address))?;
    println!(
        "ok {}: {} requests through 10 resets, {} failed by them, {} acknowledged blocks read back",
        dev.pci_address, summary.requests, summary.failed, summary.verified
    );
    Ok(())
}

/// Both controllers in one VFIO container: one DMA buffer is read into
/// from a namespace of the first and written from to a namespace of the
/// second, then read back through the second.
fn nvme_shared_dma_context_two_controllers(env: &GuestEnv) -> Result<(), String> {
    let [a, b] = env.devices.nvme.as_slice() else {
        return Err(format!(
            "topology has {} NVMe controllers; this test needs 2",
            env.devices.nvme.len()
        ));
    };
    let ctx = nvme::DmaContext::vfio().map_err(|e| format!("VFIO container: {e}"))?;
    let open = |d: &NvmeDevice| -> Result<VfioController, String> {
        let dev = nvme::vfio::VfioPci::open_in(&ctx, &d.pci_address)
            .map_err(|e| format!("{}: open in shared context: {e}", d.pci_address))?;
        nvme::Controller::new(dev, nvme::ControllerOptions::default())
            .map_err(|e| format!("{}: bring-up: {e}", d.pci_address))
    };
    let ca = open(a)?;
    let cb = open(b)?;
    let na = ca.namespaces()[0];
    let nb = cb.namespaces()[0];
    let len = 64 * 1024;
    let buf = ctx.alloc(len).map_err(|e| format!("shared buffer: {e}"))?;
    let mut data = vec![0u8; len];
    nvme::conformance::Rng::new(77).fill(&mut data);
    let timeout = Duration::from_secs(30);
    let mut qa = ca
        .create_qpair(nvme::QueueOptions::default())
        .map_err(|e| e.to_string())?;
    let mut qb = cb
        .create_qpair(nvme::QueueOptions::default())
        .map_err(|e| e.to_string())?;
    let run = |q: &mut nvme::QueuePair<nvme::vfio::VfioPci>, what: &str| -> Result<(), String> {
        let done = q.drain(timeout).map_err(|e| format!("{what}: {e}"))?;
        match done.as_slice() {
            [c] if c.result.is_ok() => Ok(()),
            other => Err(format!("{what}: {other:?}")),
        }
    };
    // Seed namespace A with the data through A.
    buf.write_bytes(0, &data).map_err(|e| e.to_string())?;
    qa.write(&na, 0, &buf.as_slice(), 1)
        .map_err(|e| e.to_string())?;
    run(&mut qa, "write A")?;
    // A reads it into the shared buffer; B writes the buffer out.
    buf.fill(0);
    qa.read(&na, 0, &buf.as_slice(), 2)
        .map_err(|e| e.to_string())?;
    run(&mut qa, "read A")?;
    qb.write(&nb, 8, &buf.as_slice(), 3)
        .map_err(|e| e.to_string())?;
    run(&mut qb, "write B")?;
    buf.fill(0);
    qb.read(&nb, 8, &buf.as_slice(), 4)
        .map_err(|e| e.to_string())?;
    run(&mut qb, "read B")?;
    let mut back = vec![0u8; len];
    buf.read_bytes(0, &mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err("data moved A -> shared buffer -> B differs".into());
    }
    println!(
        "ok one buffer at IOVA {:#x} used by {} and {}",
        buf.iova(),
        a.pci_address,
        b.pci_address
    );
    Ok(())
}

fn open_vfio(ctrl: &NvmeDevice) -> Result<nvme::vfio::VfioPci, String> {
    nvme::vfio::VfioPci::open(&ctrl.pci_address)
        .map_err(|e| format!("opening {} through VFIO: {e}", ctrl.pci_address))
}

fn vfio_open_map_bar0_dma_map(env: &GuestEnv) -> Result<(), String> {
    for ctrl in &env.devices.nvme {
        let addr = &ctrl.pci_address;
        let dev = open_vfio(ctrl)?;
        let command = dev
            .pci_command()
            .map_err(|e| format!("{addr}: reading the PCI command register: {e}"))?;
        // Bit 1: memory space enable; bit 2: bus master enable.
        if command & 0b110 != 0b110 {
            return Err(format!(
                "{addr}: PCI command {command:#06x} lacks memory/bus-master enable"
            ));
        }
        let cap = dev.cap();
        if !cap.css_nvm() {
            return Err(format!(
                "{addr}: CAP {:#x} does not offer the NVM command set",
                cap.0
            ));
        }
        if cap.mpsmin() > cap.mpsmax() {
            return Err(format!("{addr}: CAP {:#x} has MPSMIN > MPSMAX", cap.0));
        }
        println!("{addr}: CAP {:#018x} VS {}", cap.0, dev.version());

        // Keep every buffer alive to the end: a dropped one gives its IOVA
        // back, and the next may legitimately reuse it.
        let mut buffers = Vec::new();
        let mut ranges = Vec::new();
        for len in [4096usize, 2 << 20, 4096] {
            let buf = dev
                .dma_alloc(len)
                .map_err(|e| format!("{addr}: DMA-mapping {len} bytes: {e}"))?;
            let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            buf.write_bytes(0, &pattern)
                .map_err(|e| format!("{addr}: writing the DMA buffer: {e}"))?;
            let mut back = vec![0u8; len];
            buf.read_bytes(0, &mut back)
                .map_err(|e| format!("{addr}: reading the DMA buffer: {e}"))?;
            if back != pattern {
                return Err(format!(
                    "{addr}: DMA buffer of {len} bytes did not read back"
                ));
            }
            if buf.iova() % 4096 != 0 {
                return Err(format!(
                    "{addr}: IOVA {:#x} is not page aligned",
                    buf.iova()
                ));
            }
            println!("{addr}: mapped {len} bytes at IOVA {:#x}", buf.iova());
            ranges.push((buf.iova(), len as u64));
            buffers.push(buf);
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            if pair[0].0 + pair[0].1 > pair[1].0 {
                return Err(format!("{addr}: live DMA mappings overlap: {ranges:x?}"));
            }
        }
        let iommu = dev.iova_ranges();
        for (iova, len) in &ranges {
            if !iommu
                .iter()
                .any(|r| r.start() <= *iova && iova + len <= r.end())
            {
                return Err(format!(
                    "{addr}: IOVA {iova:#x}+{len:#x} lies outside the IOMMU's ranges {iommu:x?}"
                ));
            }
        }
        drop(buffers);
    }
    Ok(())
}

fn read_reference(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(file))
        .map_err(|e| format!("reading reference {}: {e}", dir.join(file).display()))
}

fn vfio_regs_match_nvme_show_regs(env: &GuestEnv) -> Result<(), String> {
    for ctrl in &env.devices.nvme {
        let addr = &ctrl.pci_address;
        let reference = ShowRegs::parse(
            &read_reference(&ctrl.reference_dir, "show-regs.txt")?,
            &read_reference(&ctrl.reference_dir, "show-regs-human.txt")?,
        )
        .map_err(|e| format!("{addr}: {e}"))?;
        let dev = open_vfio(ctrl)?;
        let cap = dev.cap();
        let vs = dev.version();
        ensure_eq!(format!("{addr} CAP"), cap.0, reference.cap);
        ensure_eq!(
            format!("{addr} CAP.MQES (entries)"),
            cap.max_queue_entries() as u64,
            reference.mqes_decoded
        );
        ensure_eq!(
            format!("{addr} CAP.DSTRD (bytes)"),
            cap.doorbell_stride() as u64,
            reference.doorbell_stride_bytes
        );
        ensure_eq!(format!("{addr} VS"), vs.0, reference.version);
        ensure_eq!(
            format!("{addr} VS (major.minor)"),
            format!("{}.{}", vs.major(), vs.minor()),
            reference.spec_version
        );
    }
    Ok(())
}

/// Rounds of the kernel-vs-ustor comparison (alternated in one boot).
pub(super) const BENCH_ROUNDS: usize = 3;
/// Seconds per measured run.
pub(super) const BENCH_SECONDS: u64 = 5;
/// ustor-perf's `--sq-doorbell-every` at QD 32: the refill of 32 goes to
/// the controller in two doorbells of 16, so QEMU starts on the first half
/// while the second is queued (about 425 K against 360 K IOPS with one
/// doorbell per refill, measured in one boot; no gain at QD 16, a loss at
/// QD 64 and 128, where the batches are already long).
const QD32_SQ_DOORBELL_EVERY: u16 = 16;

/// How fio is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FioSetup {
    /// As the target was set: io_uring with polled completions
    /// (`--hipri`, the nvme driver's poll queue), direct I/O.
    Reference,
    /// At its strongest on the kernel's polled path: also registered
    /// buffers and file, no clock reads of its own, and past QD 1 batched
    /// submission and reaping, which save most of the system calls per
    /// I/O (run with the queue's I/O accounting off).
    Tuned,
}

pub(super) fn fio_iops(node: &str, qd: u16, setup: FioSetup) -> Result<f64, String> {
    let mut args = vec![
        "--name=randread".to_string(),
        format!("--filename={node}"),
        "--ioengine=io_uring".into(),
        "--hipri".into(),
        "--direct=1".into(),
        "--rw=randread".into(),
        "--bs=4k".into(),
        format!("--iodepth={qd}"),
        "--numjobs=1".into(),
        format!("--runtime={BENCH_SECONDS}"),
        "--time_based".into(),
        "--output-format=json".into(),
    ];
    if setup == FioSetup::Tuned {
        args.extend([
            "--fixedbufs".into(),
            "--registerfiles".into(),
            "--nonvectored=1".into(),
            "--gtod_reduce=1".into(),
        ]);
        if qd > 1 {
            args.extend([
                format!("--iodepth_batch_submit={}", qd / 2),
                format!("--iodepth_batch_complete_min={}", (qd / 4).max(1)),
                format!("--iodepth_batch_complete_max={qd}"),
            ]);
        }
    }
    run_fio(&args)
}

/// Runs fio with `args` (a JSON-output read job) and returns its read IOPS.
pub(super) fn run_fio(args: &[String]) -> Result<f64, String> {
    let out = std::process::Command::new("fio")
        .args(args)
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON object.
    let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}: {text}"))?;
    if v["jobs"][0]["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio reported an I/O error: {text}"));
    }
    v["jobs"][0]["read"]["iops"]
        .as_f64()
        .ok_or_else(|| format!("fio JSON without jobs[0].read.iops: {text}"))
}

/// Turns the block layer's I/O accounting off for `node`: two clock reads
/// and counter updates per request that ustor does not pay either.
fn without_io_stats(node: &str) -> Result<(), String> {
    let name = node.trim_start_matches("/dev/");
    let path = format!("/sys/block/{name}/queue/iostats");
    std::fs::write(&path, "0").map_err(|e| format!("writing {path}: {e}"))
}

/// `ustor-perf`: 4 KiB random reads on `target` at `qd` from one thread
/// for [`BENCH_SECONDS`]; printed, and an error on any failed I/O.
pub(super) fn ustor_randread(
    target: ustor_tools::perf::Target,
    qd: u16,
    sq_doorbell_every: u16,
) -> Result<ustor_tools::perf::PerfReport, String> {
    let what = format!("{target:?}");
    let cfg = ustor_tools::perf::PerfConfig {
        target,
        workload: ustor_tools::perf::Workload::RandRead,
        io_size: 4096,
        queue_depth: qd,
        duration: Duration::from_secs(BENCH_SECONDS),
        threads: 1,
        shadow_doorbells: false,
        batch: 1,
        sq_doorbell_every,
        host_buffers: false,
    };
    let r = ustor_tools::perf::run(&cfg).map_err(|e| format!("ustor-perf on {what}: {e}"))?;
    if r.errors > 0 {
        return Err(format!("ustor-perf on {what}: {} I/O errors", r.errors));
    }
    println!("{r}");
    Ok(r)
}

fn ustor_iops(addr: &str, qd: u16, sq_doorbell_every: u16) -> Result<f64, String> {
    let target = ustor_tools::perf::Target::Vfio {
        addr: addr.to_owned(),
        nsid: 1,
    };
    Ok(ustor_randread(target, qd, sq_doorbell_every)?.iops)
}

/// fio (kernel nvme driver, io_uring, polled) against ustor-perf (VFIO) on
/// the same controller in one boot, 4 KiB random reads at QD 1 and 32,
/// alternated; ends with the median ratios. The namespace has no host I/O
/// behind it (see [`NVME_BENCH`]), so the figures are those of the two
/// drivers and of QEMU's controller model.
fn nvme_bench_ustor_vs_fio(env: &GuestEnv) -> Result<(), String> {
    let dev = env
        .devices
        .nvme
        .first()
        .ok_or("topology has no NVMe controller")?;
    let addr = dev.pci_address.as_str();
    let clock =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    let oacs = json_file(&dev.reference_dir, "id-ctrl.json")
        .ok()
        .and_then(|j| j["oacs"].as_u64())
        .unwrap_or(0);
    println!(
        "guest clocksource {}; {addr} OACS {oacs:#x} (shadow doorbells {})",
        clock.trim(),
        if oacs & 0x100 != 0 {
            "offered"
        } else {
            "not offered"
        }
    );
    // Per fio setup (reference, tuned) and depth (1, 32): ustor / fio.
    let mut ratios: [[Vec<f64>; 2]; 2] = Default::default();
    let result = (|| -> Result<(), String> {
        for round in 1..=BENCH_ROUNDS {
            let node = crate::setup::kernel_namespace(addr)?;
            let mut fio = [[0f64; 2]; 2];
            for (s, setup) in [FioSetup::Reference, FioSetup::Tuned]
                .into_iter()
                .enumerate()
            {
                if setup == FioSetup::Tuned {
                    without_io_stats(&node)?;
                }
                for (i, qd) in [1u16, 32].into_iter().enumerate() {
                    fio[s][i] = fio_iops(&node, qd, setup)?;
                }
            }
            crate::setup::bind_vfio(addr)?;
            let ours = [
                ustor_iops(addr, 1, 0)?,
                ustor_iops(addr, 32, QD32_SQ_DOORBELL_EVERY)?,
            ];
            // For information: QD 32 with one doorbell per refill.
            let whole = ustor_iops(addr, 32, 0)?;
            println!("round {round} qd32 one SQ doorbell per refill: ustor {whole:.0} IOPS");
            for (i, qd) in [1, 32].iter().enumerate() {
                for s in 0..2 {
                    ratios[s][i].push(ours[i] / fio[s][i]);
                }
                println!(
                    "round {round} qd{qd}: ustor {:.0} IOPS ({addr}); fio {:.0} IOPS as referenced, \
                     {:.0} tuned ({node}); ratios {:.2} and {:.2}",
                    ours[i],
                    fio[0][i],
                    fio[1][i],
                    ours[i] / fio[0][i],
                    ours[i] / fio[1][i]
                );
            }
        }
        // For information: does depth beyond 32 still scale? (If not, the
        // emulated controller, not the driver, is the limit.)
        let deep = ustor_iops(addr, 128, 0)?;
        println!("ustor qd128: {deep:.0} IOPS");
        Ok(())
    })();
    // Leave the controller where the rig expects it, whatever happened.
    let rebound = crate::setup::bind_vfio(addr);
    result?;
    rebound?;
    let [[r1, r32], [t1, t32]] = &mut ratios;
    println!(
        "ustor/fio-tuned iops ratio: qd1={:.2} qd32={:.2} (fio with registered buffers and \
         file, batched submit and reap, no I/O accounting)",
        median(t1),
        median(t32)
    );
    println!(
        "ustor/fio iops ratio: qd1={:.2} qd32={:.2}",
        median(r1),
        median(r32)
    );
    Ok(())
}
