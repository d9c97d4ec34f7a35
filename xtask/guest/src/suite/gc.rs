//! The garbage-collector benchmark of issue 7 in one boot: the log-structured
//! store of `examples/gc` on a QEMU NVMe namespace through VFIO, its cleaner
//! relocating with NVMe Copy (offload) and through host memory (bounce),
//! the same workload alternated, medians compared.

use super::{GuestEnv, GuestTest, Kind};
use crate::setup::bind_vfio;
use crate::topology::{DEFAULT, GC_BENCH};
use log_store::{LogStore, Policy, RunOptions, RunReport, StoreOptions, Workload, run};
use std::sync::Arc;
use std::time::Duration;
use ustor::bdev_stack::{BlockDevice, spec};
use ustor_tools::copybench::median;

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "gc_store_on_qemu_nvme_relocates_by_copy_and_reopens",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(300),
        run: gc_store_on_qemu_nvme,
    },
    GuestTest {
        name: "gc_bench_offload_bounce",
        kind: Kind::Bench,
        topology: GC_BENCH,
        timeout: Duration::from_secs(900),
        run: gc_bench_offload_bounce,
    },
];

/// The controller with the 4 KiB namespace (the default rig's second: 64
/// MiB; in `gc-bench` 1 GiB; the rig's Copy limits), bound to vfio-pci, as
/// a stack leaf.
fn gc_device(env: &GuestEnv) -> Result<(String, Arc<dyn BlockDevice>), String> {
    let ctrl = env
        .devices
        .nvme
        .iter()
        .find(|c| {
            c.spec
                .namespaces
                .first()
                .is_some_and(|n| n.block_size == 4096)
        })
        .ok_or("the topology has no controller with a 4 KiB namespace")?;
    let addr = ctrl.pci_address.clone();
    bind_vfio(&addr)?;
    let dev = spec::build(&format!("nvme:{addr}/1")).map_err(|e| e.to_string())?;
    Ok((addr, dev))
}

/// A short run of the store on QEMU's controller: the cleaner relocates by
/// NVMe Copy, the store is reopened from its summaries and every block
/// read back.
fn gc_store_on_qemu_nvme(env: &GuestEnv) -> Result<(), String> {
    let (addr, dev) = gc_device(env)?;
    gc_store_run(&addr, &dev, Relocation::Offloaded)
}

/// How a store run's relocations must have gone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Relocation {
    /// All by NVMe Copy (a namespace with Copy).
    Offloaded,
    /// All through host memory (a namespace without Copy).
    Bounced,
}

/// A short run of the store on `dev` (a namespace of 4 KiB blocks, the
/// cleaner asked to offload): every relocation went as `expect` says, the
/// store reopens from its summaries and every block reads back.
pub(super) fn gc_store_run(
    addr: &str,
    dev: &Arc<dyn BlockDevice>,
    expect: Relocation,
) -> Result<(), String> {
    let opts = RunOptions {
        store: StoreOptions {
            segment_bytes: 256 << 10,
            fill: 0.7,
            policy: Policy::CostBenefit,
            offload: true,
        },
        workload: Workload {
            overwrites: 12_000,
            hot_cold: true,
            seed: 11,
        },
        verify: true,
    };
    let r = run(dev, &opts).map_err(|e| format!("gc on {addr}: {e}"))?;
    println!(
        "{} blocks, {} segments cleaned, {} blocks relocated ({} MiB offloaded, {} bounced), \
         WA {:.2}, {:?} verified after reopening",
        r.logical_blocks,
        r.stats.segments_cleaned,
        r.stats.blocks_relocated,
        r.stats.bytes_offloaded >> 20,
        r.stats.bytes_bounced >> 20,
        r.write_amplification,
        r.verified_blocks
    );
    if r.stats.segments_cleaned == 0 {
        return Err("the workload never made the cleaner run".into());
    }
    let relocated = r.stats.blocks_relocated * 4096;
    let (offloaded, bounced) = match expect {
        Relocation::Offloaded => (relocated, 0),
        Relocation::Bounced => (0, relocated),
    };
    if r.stats.bytes_bounced != bounced || r.stats.bytes_offloaded != offloaded {
        return Err(format!(
            "expected {offloaded} bytes offloaded and {bounced} bounced: {} bytes offloaded, {} \
             bounced, {} blocks relocated",
            r.stats.bytes_offloaded, r.stats.bytes_bounced, r.stats.blocks_relocated
        ));
    }
    if r.verified_blocks != Some(r.logical_blocks) {
        return Err(format!(
            "verified {:?} of {}",
            r.verified_blocks, r.logical_blocks
        ));
    }
    Ok(())
}

const ROUNDS: usize = 3;

/// The store with 4 MiB segments on the 1 GiB namespace: 255 segments, as
/// the embedded default has with 1 MiB ones on 256 MiB (the same write
/// amplification), while each cleaning round's fixed costs (a flush, the
/// summaries' write, the copy's set-up and wait) spread over four times
/// the blocks.
fn gc_bench_offload_bounce(env: &GuestEnv) -> Result<(), String> {
    let (addr, dev) = gc_device(env)?;
    let store = StoreOptions {
        segment_bytes: 4 << 20,
        fill: 0.8,
        policy: Policy::Greedy,
        offload: true,
    };
    let logical = LogStore::plan(&dev, &store)
        .map_err(|e| e.to_string())?
        .logical_blocks;
    let opts = RunOptions {
        store,
        workload: Workload {
            overwrites: 2 * logical,
            hot_cold: false,
            seed: 7,
        },
        verify: false,
    };
    println!(
        "workload: store on {} ({addr}, vfio-pci), {} MiB segments, fill 0.8 = {logical} blocks \
         of 4 KiB, {} uniform overwrites, greedy cleaner; {ROUNDS} rounds of offload and bounce \
         alternated (first round verified by reopening the store and reading every block back)",
        dev.info().name,
        opts.store.segment_bytes >> 20,
        opts.workload.overwrites
    );
    let mut tput: [Vec<f64>; 2] = Default::default();
    let mut cpu: [Vec<f64>; 2] = Default::default();
    let mut last: [Option<RunReport>; 2] = Default::default();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for offload in order {
            let mut o = opts.clone();
            o.store.offload = offload;
            o.verify = round == 0;
            let r = run(&dev, &o).map_err(|e| format!("gc run (offload {offload}): {e}"))?;
            if r.verified_blocks.is_some() {
                println!(
                    "round {round} {}: every block verified after reopening",
                    r.mode
                );
            }
            let i = usize::from(!offload);
            println!(
                "round {round} {:<7} relocated {:>7} blocks in {:>4} rounds, {:>8.1} MiB/s, \
                 CPU {:.4} s/GiB (copy {:.3} s of {:.3} s CPU, {:.3} s of {:.3} s wall), WA {:.2}, \
                 offloaded {} MiB, bounced {} MiB, {} commands, wall {:.2} s",
                r.mode,
                r.stats.blocks_relocated,
                r.stats.rounds,
                r.relocation_mib_s,
                r.relocation_cpu_s_per_gib,
                r.stats.copy_cpu.as_secs_f64(),
                r.stats.relocation_cpu.as_secs_f64(),
                r.stats.copy_wall.as_secs_f64(),
                r.stats.relocation_wall.as_secs_f64(),
                r.write_amplification,
                r.stats.bytes_offloaded >> 20,
                r.stats.bytes_bounced >> 20,
                r.stats.copy_commands,
                r.wall.as_secs_f64()
            );
            tput[i].push(r.relocation_mib_s);
            cpu[i].push(r.relocation_cpu_s_per_gib);
            last[i] = Some(r);
        }
    }
    if let [Some(o), Some(b)] = &last
        && (o.stats.bytes_offloaded == 0 || b.stats.bytes_offloaded != 0)
    {
        return Err(format!(
            "offload run offloaded {} bytes, bounce run {}: the modes did not hold",
            o.stats.bytes_offloaded, b.stats.bytes_offloaded
        ));
    }
    println!(
        "medians: offload {:.1} MiB/s {:.4} s/GiB, bounce {:.1} MiB/s {:.4} s/GiB",
        median(&tput[0]),
        median(&cpu[0]),
        median(&tput[1]),
        median(&cpu[1])
    );
    let ratio =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    println!(
        "gc offload/bounce: throughput={:.2} cpu={:.3}",
        median(&ratio(&tput[0], &tput[1])),
        median(&ratio(&cpu[0], &cpu[1]))
    );
    Ok(())
}
