//! The `nvme-tcp:` initiator against Linux nvmet over TCP on the guest's
//! loopback (a null_blk subsystem and a file subsystem), checked against
//! the kernel's own initiator (`nvme connect`) and nvme-cli on the same
//! subsystems.

use super::gc::{Relocation, gc_store_run};
use super::ng::{dd_read, transfer};
use super::stack::pattern;
use super::{GuestEnv, GuestTest, Kind};
use crate::setup::{NvmetDevice, tool_output};
use crate::topology::TCP;
use nvme::conformance::{self as c, Quirks};
use nvme::tcp::{TcpController, TcpOptions, discover};
use nvme::{IoError, QueueOptions};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use ustor::bdev_stack::spec;

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "tcp_discovery_and_identify_match_nvme_cli",
        kind: Kind::Test,
        topology: TCP,
        timeout: Duration::from_secs(120),
        run: tcp_discovery_and_identify_match_nvme_cli,
    },
    GuestTest {
        name: "tcp_conformance_on_nvmet",
        kind: Kind::Test,
        topology: TCP,
        timeout: Duration::from_secs(600),
        run: tcp_conformance_on_nvmet,
    },
    GuestTest {
        name: "tcp_stripe_over_two_subsystems_matches_the_kernel_initiator",
        kind: Kind::Test,
        topology: TCP,
        timeout: Duration::from_secs(300),
        run: tcp_stripe_over_two_subsystems,
    },
    GuestTest {
        name: "tcp_gc_store_bounces_and_reopens",
        kind: Kind::Test,
        topology: TCP,
        timeout: Duration::from_secs(300),
        run: tcp_gc_store,
    },
    GuestTest {
        name: "tcp_target_going_away_fails_each_request_once_and_reconnects",
        kind: Kind::Test,
        topology: TCP,
        timeout: Duration::from_secs(120),
        run: tcp_target_going_away,
    },
    GuestTest {
        name: "tcp_bench_ustor_vs_kernel_initiator",
        kind: Kind::Bench,
        topology: TCP,
        timeout: Duration::from_secs(900),
        run: tcp_bench_ustor_vs_kernel,
    },
];

const NVMET: &str = "/sys/kernel/config/nvmet";

fn subsystem<'a>(env: &'a GuestEnv, which: &str) -> Result<&'a NvmetDevice, String> {
    env.devices
        .nvmet
        .iter()
        .find(|d| d.nqn.ends_with(which))
        .ok_or_else(|| format!("the topology has no nvmet subsystem `{which}`"))
}

fn connect(d: &NvmetDevice) -> Result<TcpController, String> {
    TcpController::connect(&d.addr, &d.nqn, TcpOptions::default())
        .map_err(|e| ustor::bdev_stack::error_chain(&e))
}

/// The kernel initiator's controller and namespace for `d`, connecting
/// it if it is not already (`nvme connect`).
fn kernel_initiator(d: &NvmetDevice, poll_queues: bool) -> Result<(String, String), String> {
    if let Some(found) = kernel_controller(&d.nqn) {
        return Ok(found);
    }
    let (ip, port) = d.addr.rsplit_once(':').ok_or("address without a port")?;
    let mut args = vec!["connect", "-t", "tcp", "-a", ip, "-s", port, "-n", &d.nqn];
    if poll_queues {
        args.push("--nr-poll-queues=1");
    }
    tool_output("nvme", &args)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = kernel_controller(&d.nqn)
            && Path::new(&found.1).exists()
        {
            return Ok(found);
        }
        if Instant::now() > deadline {
            return Err(format!("nvme connect to {} made no block device", d.nqn));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `(/dev/nvmeX, /dev/nvmeYnZ)` of the kernel's controller of `nqn` and
/// its namespace's block device (with native multipath the block device is
/// the subsystem's head, listed in the subsystem's directory; without, the
/// controller's own).
fn kernel_controller(nqn: &str) -> Option<(String, String)> {
    let is_ns = |name: &str| {
        name.strip_prefix("nvme").is_some_and(|rest| {
            let mut parts = rest.split('n');
            matches!((parts.next(), parts.next(), parts.next()),
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty()
                    && a.chars().all(|c| c.is_ascii_digit())
                    && b.chars().all(|c| c.is_ascii_digit()))
        })
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let read = |p: &Path| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let subsystems = Path::new("/sys/class/nvme-subsystem");
    for sub in names(subsystems) {
        let dir = subsystems.join(&sub);
        if read(&dir.join("subsysnqn")).as_deref() != Some(nqn) {
            continue;
        }
        let entries = names(&dir);
        let ctrl = entries.iter().find(|n| {
            n.starts_with("nvme")
                && n[4..].chars().all(|c| c.is_ascii_digit())
                && read(&dir.join(n).join("transport")).as_deref() == Some("tcp")
        })?;
        let ns = entries
            .iter()
            .find(|n| is_ns(n))
            .cloned()
            .or_else(|| names(&dir.join(ctrl)).into_iter().find(|n| is_ns(n)))?;
        return Some((format!("/dev/{ctrl}"), format!("/dev/{ns}")));
    }
    None
}

fn json(program: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = tool_output(program, args)?;
    serde_json::from_str(&out).map_err(|e| format!("{program} {}: {e}: {out}", args.join(" ")))
}

fn tcp_discovery_and_identify_match_nvme_cli(env: &GuestEnv) -> Result<(), String> {
    let d = subsystem(env, "nullb")?;
    let (ip, port) = d.addr.rsplit_once(':').ok_or("address without a port")?;
    let theirs = json(
        "nvme",
        &["discover", "-t", "tcp", "-a", ip, "-s", port, "-o", "json"],
    )?;
    let records = theirs["records"]
        .as_array()
        .ok_or("no records in nvme discover")?;
    let theirs: BTreeSet<(String, String, String)> = records
        .iter()
        .filter(|r| r["subtype"].as_str() == Some("nvme subsystem"))
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").trim().to_owned();
            (s("subnqn"), s("traddr"), s("trsvcid"))
        })
        .collect();
    let ours: BTreeSet<(String, String, String)> = discover(&d.addr, TcpOptions::default())
        .map_err(|e| ustor::bdev_stack::error_chain(&e))?
        .into_iter()
        .filter(|e| e.subtype == 2)
        .map(|e| (e.subnqn, e.traddr, e.trsvcid))
        .collect();
    ensure_eq!("discovery log (NVM subsystems)", ours, theirs);
    ensure_eq!("subsystems listed", ours.len(), env.devices.nvmet.len());

    for d in &env.devices.nvmet {
        let ctrl = connect(d)?;
        let (kctrl, kns) = kernel_initiator(d, false)?;
        let j = json("nvme", &["id-ctrl", &kctrl, "-o", "json"])?;
        let id = ctrl.identify();
        let num = |k: &str| j[k].as_u64();
        let text = |k: &str| j[k].as_str().map(|s| s.trim_end().to_owned());
        ensure_eq!(
            format!("{} vid", d.nqn),
            Some(u64::from(id.vid.get())),
            num("vid")
        );
        ensure_eq!(format!("{} sn", d.nqn), Some(id.serial()), text("sn"));
        ensure_eq!(format!("{} mn", d.nqn), Some(id.model()), text("mn"));
        ensure_eq!(format!("{} fr", d.nqn), Some(id.firmware()), text("fr"));
        ensure_eq!(
            format!("{} mdts", d.nqn),
            Some(u64::from(id.mdts)),
            num("mdts")
        );
        ensure_eq!(
            format!("{} oncs", d.nqn),
            Some(u64::from(id.oncs.get())),
            num("oncs")
        );
        ensure_eq!(
            format!("{} nn", d.nqn),
            Some(u64::from(id.nn.get())),
            num("nn")
        );
        ensure_eq!(
            format!("{} ioccsz", d.nqn),
            Some(u64::from(id.ioccsz.get())),
            num("ioccsz")
        );
        ensure_eq!(
            format!("{} iorcsz", d.nqn),
            Some(u64::from(id.iorcsz.get())),
            num("iorcsz")
        );
        ensure_eq!(
            format!("{} sgls", d.nqn),
            Some(u64::from(id.sgls.get())),
            num("sgls")
        );
        ensure_eq!(
            format!("{} subnqn", d.nqn),
            Some(ustor::nvme::spec::ascii_field(&id.subnqn)),
            text("subnqn")
        );
        if num("cntlid") == Some(u64::from(ctrl.cntlid())) {
            return Err(format!(
                "{}: two hosts' associations share cntlid {}",
                d.nqn,
                ctrl.cntlid()
            ));
        }
        let j = json("nvme", &["id-ns", &kns, "-o", "json"])?;
        let raw = ctrl.identify_namespace(1).map_err(|e| e.to_string())?;
        let ns = ctrl.namespace(1).ok_or("no namespace 1")?;
        ensure_eq!(
            format!("{} nsze", d.nqn),
            Some(raw.nsze.get()),
            j["nsze"].as_u64()
        );
        ensure_eq!(
            format!("{} flbas", d.nqn),
            Some(u64::from(raw.flbas)),
            j["flbas"].as_u64()
        );
        ensure_eq!(format!("{} block size", d.nqn), ns.block_size, d.block_size);
        ensure_eq!(
            format!("{} bytes", d.nqn),
            ns.blocks * u64::from(ns.block_size),
            d.size_bytes
        );
        println!(
            "ok {}: in-capsule data {} bytes, largest transfer {} bytes, {} I/O queues",
            d.nqn,
            ctrl.inline_data(),
            ctrl.max_transfer(),
            ctrl.io_queues()
        );
    }
    Ok(())
}

/// The conformance checks about commands, on both subsystems. Copy limits
/// and multi-range Copy do not apply (nvmet has no Copy: ONCS bit 8 is
/// clear, which `lba_out_of_range` checks is answered Invalid Opcode);
/// resets do not either (a fabrics controller has no PCIe reset).
fn tcp_conformance_on_nvmet(env: &GuestEnv) -> Result<(), String> {
    for d in &env.devices.nvmet {
        let ctrl = connect(d)?;
        let step = |what: &str, r: c::Check| {
            r.map_err(|e| format!("{} {what}: {e}", d.nqn))?;
            println!("ok {} {what}", d.nqn);
            Ok::<(), String>(())
        };
        step("identify_consistent", c::identify_consistent(&ctrl))?;
        step(
            "write_read_verify QD 1, 8, 32, 128",
            c::write_read_verify(&ctrl, 1, &[1, 8, 32, 128], 7),
        )?;
        let quirks = if d.backing_path.starts_with("/dev/") {
            Quirks::NVMET_6_1_BDEV
        } else {
            Quirks::NVMET_6_1_FILE
        };
        step("lba_out_of_range", c::lba_out_of_range(&ctrl, 1, quirks))?;
        step(
            "two_queue_pairs_two_threads",
            c::two_queue_pairs_two_threads(&ctrl, 1),
        )?;
    }
    Ok(())
}

/// A stripe over the two subsystems, written through `nvme-tcp:` leaves,
/// read back through the kernel initiator's block devices chunk by chunk.
fn tcp_stripe_over_two_subsystems(env: &GuestEnv) -> Result<(), String> {
    let (a, b) = (subsystem(env, "nullb")?, subsystem(env, "file")?);
    const CHUNK_BLOCKS: u64 = 16;
    let spec = format!("stripe(chunk={CHUNK_BLOCKS}, {}, {})", a.spec(), b.spec());
    let dev = spec::build(&spec).map_err(|e| ustor::bdev_stack::error_chain(&e))?;
    let bs = u64::from(dev.info().block_size);
    let len: u64 = 8 << 20;
    let data = pattern(41, len as usize);
    // 64 KiB requests, 16 in flight, through the stripe's leaves.
    let extents: Vec<(u64, u64)> = (0..len / 65536)
        .map(|i| (i * 65536 / bs, 65536 / bs))
        .collect();
    let pieces: Vec<Vec<u8>> = data.chunks(65536).map(<[u8]>::to_vec).collect();
    transfer(&dev, 16, &extents, Some(&pieces))?;
    if transfer(&dev, 16, &extents, None)?.concat() != data {
        return Err("stripe read back differs".into());
    }
    let nodes = [kernel_initiator(a, false)?.1, kernel_initiator(b, false)?.1];
    let chunk = CHUNK_BLOCKS * bs;
    for (k, piece) in data.chunks(chunk as usize).enumerate() {
        let k = k as u64;
        let member = (k % 2) as usize;
        let at = (k / 2) * chunk;
        let theirs = dd_read(&nodes[member], at / 4096, chunk / 4096)?;
        if theirs != piece {
            return Err(format!(
                "chunk {k}: {} at byte {at} differs from what the stripe wrote",
                nodes[member]
            ));
        }
    }
    println!(
        "ok {spec}: {} MiB written through nvme-tcp:, every chunk equal on {} and {}",
        len >> 20,
        nodes[0],
        nodes[1]
    );
    Ok(())
}

/// The store on the file subsystem: nvmet has no Copy, so the cleaner
/// bounces every relocation; it reopens whole.
fn tcp_gc_store(env: &GuestEnv) -> Result<(), String> {
    let d = subsystem(env, "file")?;
    let dev = spec::build(&d.spec()).map_err(|e| ustor::bdev_stack::error_chain(&e))?;
    let start = Instant::now();
    gc_store_run(&d.spec(), &dev, Relocation::Bounced)?;
    println!("{}: {:.1} s", d.spec(), start.elapsed().as_secs_f64());
    Ok(())
}

/// Reads run while the subsystem is taken off its port: every request is
/// reported once, those cut off as Disconnected; reconnecting fails with a
/// typed reason while it is off and works once it is back.
fn tcp_target_going_away(env: &GuestEnv) -> Result<(), String> {
    let d = subsystem(env, "nullb")?;
    let link = format!("{NVMET}/ports/1/subsystems/{}", d.nqn);
    let subsys = format!("{NVMET}/subsystems/{}", d.nqn);
    let mut ctrl = connect(d)?;
    let ns = ctrl.namespace(1).ok_or("no namespace 1")?;
    let mut qp = ctrl
        .create_qpair(QueueOptions::default())
        .map_err(|e| e.to_string())?;
    let bufs: Vec<_> = (0..32)
        .map(|_| ctrl.dma_alloc(65536).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let pulled = Arc::new(AtomicBool::new(false));
    let puller = {
        let (link, pulled) = (link.clone(), Arc::clone(&pulled));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let r = std::fs::remove_file(&link);
            pulled.store(true, Ordering::SeqCst);
            r.map_err(|e| format!("removing {link}: {e}"))
        })
    };
    let (mut submitted, mut reported, mut ok, mut cut) = (0u64, 0u64, 0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while qp.outstanding() < bufs.len() && qp.failure().is_none() {
            let b = &bufs[(submitted % bufs.len() as u64) as usize];
            match qp.read(
                &ns,
                (submitted * 128) % (ns.blocks - 128),
                &b.as_slice(),
                submitted,
            ) {
                Ok(()) => submitted += 1,
                Err(_) => break,
            }
        }
        qp.poll(usize::MAX, |c| {
            reported += 1;
            if !seen.insert(c.tag) {
                cut = u64::MAX;
            }
            match c.result {
                Ok(_) => ok += 1,
                Err(IoError::Disconnected) => cut += 1,
                Err(_) => {}
            }
        })
        .map_err(|e| e.to_string())?;
        if qp.failure().is_some() && qp.outstanding() == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the queue never failed after the subsystem left the port ({submitted} submitted, {reported} reported)"
            ));
        }
    }
    puller.join().map_err(|_| "puller panicked")??;
    if cut == u64::MAX {
        return Err("a request was reported twice".into());
    }
    ensure_eq!("requests reported", reported, submitted);
    if reported != ok + cut {
        return Err(format!(
            "{reported} reported: {ok} done, {cut} disconnected, the rest other errors"
        ));
    }
    println!(
        "ok {submitted} reads: {ok} done, {cut} cut off ({})",
        qp.failure().map(|f| f.to_string()).unwrap_or_default()
    );
    match qp.reconnect() {
        Ok(()) => return Err("reconnected while the subsystem is off the port".into()),
        Err(e) => println!(
            "ok reconnect while off: {}",
            ustor::bdev_stack::error_chain(&e)
        ),
    }
    std::os::unix::fs::symlink(&subsys, &link).map_err(|e| format!("relinking {link}: {e}"))?;
    // The old association is gone with the port: the controller reconnects,
    // then a new queue works.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctrl.is_down() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    ctrl.reconnect()
        .map_err(|e| ustor::bdev_stack::error_chain(&e))?;
    let mut qp = ctrl
        .create_qpair(QueueOptions::default())
        .map_err(|e| e.to_string())?;
    let b = &bufs[0];
    qp.read(&ns, 0, &b.as_slice(), 1)
        .map_err(|e| e.to_string())?;
    let done = qp
        .drain(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    ensure_eq!("read after reconnecting", done[0].result.is_ok(), true);
    Ok(())
}

/// The guest's busy and total CPU jiffies (`/proc/stat`).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// `ustor-perf` on `spec`: IOPS, the guest's busy CPU share and the part
/// of it that was not ours (the target's).
fn ustor_tcp_iops(spec: &str, qd: u16) -> Result<(f64, f64, f64), String> {
    use ustor_tools::copybench::{CpuOf, cpu_time};
    let (busy0, total0) = cpu_jiffies();
    let own0 = cpu_time(CpuOf::Process).map_err(|e| e.to_string())?;
    let target = ustor_tools::perf::Target::Stack {
        spec: spec.to_owned(),
    };
    let r = super::nvme::ustor_randread(target, qd, 0)?;
    let own = cpu_time(CpuOf::Process)
        .map_err(|e| e.to_string())?
        .since(&own0)
        .total()
        .as_secs_f64();
    let (busy1, total1) = cpu_jiffies();
    // USER_HZ: /proc/stat counts in hundredths of a second.
    let hz = 100.0;
    let busy = (busy1 - busy0) as f64 / hz;
    let wall = (total1 - total0) as f64 / hz;
    Ok((
        r.iops,
        busy / wall.max(1e-9),
        (busy - own).max(0.0) / busy.max(1e-9),
    ))
}

fn fio_kernel_iops(node: &str, qd: u16) -> Result<f64, String> {
    super::nvme::fio_iops(node, qd, super::nvme::FioSetup::Reference)
}

/// `ustor-perf` on `nvme-tcp:` against fio (io_uring, polled) on the
/// kernel initiator's block device of the same nvmet subsystem, one boot,
/// 4 KiB random reads at QD 1 and 32, alternated; median ratios, and the
/// share of the guest's busy CPU the target (everything but ustor-perf)
/// took during our runs.
fn tcp_bench_ustor_vs_kernel(env: &GuestEnv) -> Result<(), String> {
    use ustor_tools::copybench::median;
    let d = subsystem(env, "nullb")?;
    let (_, node) = kernel_initiator(d, true)?;
    let spec = d.spec();
    println!("{spec} against fio --hipri on {node} (nvme connect --nr-poll-queues=1)");
    let mut ratios: [Vec<f64>; 2] = Default::default();
    let mut target_share = Vec::new();
    for round in 1..=super::nvme::BENCH_ROUNDS {
        for (i, qd) in [1u16, 32].into_iter().enumerate() {
            let ((ours, busy, target), fio) = if round % 2 == 1 {
                let o = ustor_tcp_iops(&spec, qd)?;
                (o, fio_kernel_iops(&node, qd)?)
            } else {
                let f = fio_kernel_iops(&node, qd)?;
                (ustor_tcp_iops(&spec, qd)?, f)
            };
            ratios[i].push(ours / fio);
            target_share.push(target);
            println!(
                "round {round} qd{qd}: ustor nvme-tcp {ours:.0} IOPS (guest CPU busy {:.0} %, \
                 target's share {:.0} %), kernel nvme-tcp + fio {fio:.0} IOPS, ratio {:.2}",
                busy * 100.0,
                target * 100.0,
                ours / fio
            );
        }
    }
    println!(
        "target's share of the guest's busy CPU during ustor runs: median {:.0} %",
        median(&target_share) * 100.0
    );
    let [r1, r32] = &mut ratios;
    println!(
        "ustor-tcp/kernel-tcp iops ratio: qd1={:.2} qd32={:.2}",
        median(r1),
        median(r32)
    );
    Ok(())
}
