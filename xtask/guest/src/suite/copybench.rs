//! The copy benchmark of issue 6 in one boot: a garbage collector's
//! relocation within one QEMU NVMe namespace by the copy engine, NVMe Copy
//! offload against the pipelined bounce path, and the bounce path against
//! `dd bs=1M iflag=direct oflag=direct` copying as many bytes on the kernel
//! nvme driver.
//!
//! The rig's namespaces are 64 MiB, so the relocation is 24 MiB of 64 KiB
//! extents, scattered over the first half and gathered at 32 MiB (the
//! issue's 64 MiB does not fit twice in one namespace; the ratios are what
//! count). The first controller stays with vfio-pci for ustor; the second,
//! identical one is rebound to the kernel nvme driver for dd, so the rounds
//! alternate without rebinding a controller the process has open.

use super::{GuestEnv, GuestTest, Kind};
use crate::setup::{bind_vfio, kernel_namespace};
use crate::topology::COPY;
use std::process::Command;
use std::time::{Duration, Instant};
use ustor_tools::copybench::{Bench, CpuOf, Workload, cpu_time, median};

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[GuestTest {
    name: "copy_bench_offload_bounce_dd",
    kind: Kind::Bench,
    topology: COPY,
    timeout: Duration::from_secs(300),
    run: copy_bench_offload_bounce_dd,
}];

const MIB: u64 = 1 << 20;
const EXTENT_BYTES: u64 = 64 << 10;
/// 24 MiB of extents.
const EXTENTS: u64 = 384;
/// Where dd's source and destination regions start, in MiB.
const DD_SRC_MIB: u64 = 0;
const DD_DST_MIB: u64 = 32;
const ROUNDS: u64 = 7;

/// Runs `dd` and returns its wall seconds and CPU seconds (user + system,
/// from the RUSAGE_CHILDREN delta around waiting for it).
fn timed_dd(args: &[String]) -> Result<(f64, f64), String> {
    let cpu0 = cpu_time(CpuOf::Children).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let out = Command::new("dd")
        .args(args)
        .output()
        .map_err(|e| format!("running dd: {e}"))?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_time(CpuOf::Children)
        .map_err(|e| e.to_string())?
        .since(&cpu0);
    if !out.status.success() {
        return Err(format!(
            "dd {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((wall, cpu.total().as_secs_f64()))
}

#[derive(Clone, Copy, Debug)]
enum Path3 {
    Dd,
    Offload,
    Bounce,
}

fn copy_bench_offload_bounce_dd(env: &GuestEnv) -> Result<(), String> {
    let [a, b, ..] = env.devices.nvme.as_slice() else {
        return Err("the stack topology needs two NVMe controllers".into());
    };
    let (a, b) = (a.pci_address.clone(), b.pci_address.clone());
    bind_vfio(&a)?;
    let node = kernel_namespace(&b)?;
    let bytes = EXTENT_BYTES * EXTENTS;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    // Per round: MiB/s and CPU s/GiB of each path.
    let mut tput: [Vec<f64>; 3] = Default::default();
    let mut cpu: [Vec<f64>; 3] = Default::default();
    let result = (|| -> Result<(), String> {
        let mut bench = Bench::open(&Workload {
            src: format!("nvme:{a}/1"),
            extent_bytes: EXTENT_BYTES,
            extents: EXTENTS,
            ..Workload::default()
        })
        .map_err(|e| e.to_string())?;
        let (name, _) = bench.device_names();
        println!(
            "workload: {} MiB in {EXTENTS} extents of {} KiB, scattered over the first 32 MiB of \
             {name} ({a}, vfio-pci) and gathered at 32 MiB (namespaces are 64 MiB, so 24 MiB \
             rather than the issue's 64 MiB); dd moves the same {} MiB as bs=1M direct I/O \
             within {node} ({b}, kernel nvme driver, identical QEMU controller)",
            bytes / MIB,
            EXTENT_BYTES >> 10,
            bytes / MIB
        );
        // Give dd's source region real data once (not a hole in the
        // backing file).
        timed_dd(&[
            "if=/dev/urandom".into(),
            format!("of={node}"),
            "bs=1M".into(),
            format!("count={}", bytes / MIB),
            format!("seek={DD_SRC_MIB}"),
            "oflag=direct".into(),
        ])?;
        let dd_args = vec![
            format!("if={node}"),
            format!("of={node}"),
            "bs=1M".to_string(),
            "iflag=direct".to_string(),
            "oflag=direct".to_string(),
            format!("skip={DD_SRC_MIB}"),
            format!("seek={DD_DST_MIB}"),
            format!("count={}", bytes / MIB),
        ];
        // Warm-up, not counted: the first write to a region of a QEMU
        // namespace allocates its backing-file blocks on the host.
        timed_dd(&dd_args)?;
        // Each mode's first run also sets its engine up (bounce buffers, and
        // the channels it keeps open across runs, as an application would).
        for offload in [true, false] {
            bench.run(offload, 0).map_err(|e| e.to_string())?;
        }
        println!("warm-up done (dd, offload, bounce once each; not counted)");
        let paths = [Path3::Dd, Path3::Offload, Path3::Bounce];
        for round in 1..=ROUNDS {
            // Rotate the order so no path always runs first.
            let mut order = paths;
            order.rotate_left((round as usize - 1) % 3);
            for p in order {
                let (i, mib_s, cpu_gib, detail) = match p {
                    Path3::Dd => {
                        let (wall, c) = timed_dd(&dd_args)?;
                        (0, bytes as f64 / MIB as f64 / wall, c / gib, String::new())
                    }
                    Path3::Offload | Path3::Bounce => {
                        let offload = matches!(p, Path3::Offload);
                        let r = bench.run(offload, round).map_err(|e| e.to_string())?;
                        let cmds = commands(&r);
                        (
                            if offload { 1 } else { 2 },
                            r.mib_per_s,
                            r.cpu_s_per_gib,
                            format!(", {cmds}, read back equal"),
                        )
                    }
                };
                tput[i].push(mib_s);
                cpu[i].push(cpu_gib);
                println!(
                    "round {round} {:<7} {mib_s:>8.1} MiB/s  CPU {cpu_gib:>8.4} s/GiB{detail}",
                    format!("{p:?}").to_lowercase()
                );
            }
        }
        Ok(())
    })();
    // Leave both controllers where the rig expects them.
    let rebound = bind_vfio(&b);
    result?;
    rebound?;
    let names = ["dd", "offload", "bounce"];
    for i in 0..3 {
        println!(
            "median {:<7} {:>8.1} MiB/s  CPU {:>8.4} s/GiB",
            names[i],
            median(&tput[i]),
            median(&cpu[i])
        );
    }
    println!(
        "offload/bounce: throughput={:.2} cpu={:.3} bounce/dd: throughput={:.2}",
        median(&ratios(&tput[1], &tput[2])),
        median(&ratios(&cpu[1], &cpu[2])),
        median(&ratios(&tput[2], &tput[0]))
    );
    Ok(())
}

/// The commands each method of a run sent, e.g. `nvme-copy 24 cmds`.
pub(super) fn commands(r: &ustor_tools::copybench::RunFigures) -> String {
    r.methods
        .iter()
        .map(|m| format!("{} {} cmds", m.method, m.commands))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `x[i] / y[i]`, NaN where `y[i]` is not positive.
pub(super) fn ratios(x: &[f64], y: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(y)
        .map(|(x, y)| if *y > 0.0 { x / y } else { f64::NAN })
        .collect()
}
