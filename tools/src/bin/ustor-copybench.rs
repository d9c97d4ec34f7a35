//! `ustor-copybench`: the copy engine on a described workload, offload on
//! and off: throughput, commands per method, host CPU time per GiB and the
//! engine's report; every run's destination is read back and compared.
//!
//! ```text
//! ustor-copybench                                   # GC relocation on an emulated namespace, both modes
//! ustor-copybench -o 64k -n 384 --src nvme:0000:00:04.0/1 --rounds 3
//! ustor-copybench --src 'sgemu:64m,target=t' --dst 'sgemu:64m,target=t,xcopy=on' --only bounce --json
//! ```

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use ustor_tools::copybench::{Bench, DEFAULT_SPEC, RunFigures, Summary, Workload, summarize};
use ustor_tools::perf::parse_size;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Device offloads allowed.
    Offload,
    /// Everything through host memory.
    Bounce,
}

/// Benchmark the copy engine, offload against bounce.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark the ustor copy engine: offload against bounce"
)]
struct Args {
    /// Bytes per extent (4k, 64k, 1m).
    #[arg(short = 'o', long, default_value = "64k", value_parser = parse_bytes)]
    extent_size: u64,
    /// Extents, scattered over the first half of the source and gathered
    /// into one range at the start of the destination's second half.
    #[arg(short = 'n', long, default_value_t = 512)]
    extents: u64,
    /// Source stack spec.
    #[arg(long, default_value = DEFAULT_SPEC)]
    src: String,
    /// Destination stack spec (default: the source device itself).
    #[arg(long)]
    dst: Option<String>,
    /// Run offload and bounce, alternating (the default).
    #[arg(long, conflicts_with = "only")]
    compare: bool,
    /// Run one mode only.
    #[arg(long, value_enum)]
    only: Option<Mode>,
    /// Rounds (each runs every selected mode once; the order alternates).
    #[arg(short = 'r', long, default_value_t = 1)]
    rounds: u64,
    /// Bounce memory in flight.
    #[arg(long, default_value = "8m", value_parser = parse_bytes)]
    bounce_bytes: u64,
    /// Bytes per bounce buffer.
    #[arg(long, default_value = "1m", value_parser = parse_bytes)]
    buffer_bytes: u64,
    /// Offload commands in flight per destination leaf.
    #[arg(long, default_value_t = 16)]
    offload_depth: usize,
    /// Seed for extent placement and data.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Print the runs and summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s).map(|n| n as u64).map_err(|e| e.to_string())
}

#[derive(serde::Serialize)]
struct JsonOut<'a> {
    workload: &'a Workload,
    src_device: String,
    dst_device: String,
    runs: &'a [RunFigures],
    summary: Summary,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.rounds == 0 {
        eprintln!("ustor-copybench: --rounds must be at least 1");
        return ExitCode::from(2);
    }
    let workload = Workload {
        src: args.src.clone(),
        dst: args.dst.clone(),
        extent_bytes: args.extent_size,
        extents: args.extents,
        seed: args.seed,
        bounce_bytes: args.bounce_bytes as usize,
        buffer_bytes: args.buffer_bytes as usize,
        offload_depth: args.offload_depth,
    };
    let mut bench = match Bench::open(&workload) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ustor-copybench: {}", ustor_tools::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let (src_name, dst_name) = bench.device_names();
    if !args.json {
        println!(
            "workload: {} extents of {} B ({} B) scattered over the first half of {src_name}, \
             gathered at LBA {} of {dst_name}",
            workload.extents,
            workload.extent_bytes,
            bench.bytes(),
            bench.dst_ranges().first().map_or(0, |r| r.lba)
        );
    }
    let modes: Vec<bool> = match args.only {
        Some(Mode::Offload) => vec![true],
        Some(Mode::Bounce) => vec![false],
        None => vec![true, false],
    };
    // One unmeasured run per mode sets its engine up (buffers, and the
    // channels the engine keeps open), so every measured run is a steady
    // state copy.
    for &offload in &modes {
        if let Err(e) = bench.run(offload, 0) {
            eprintln!("ustor-copybench: warm-up: {}", ustor_tools::error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        let mut order = modes.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for offload in order {
            match bench.run(offload, round) {
                Ok(r) => {
                    if !args.json {
                        print!("{r}");
                    }
                    runs.push(r);
                }
                Err(e) => {
                    eprintln!(
                        "ustor-copybench: round {round}: {}",
                        ustor_tools::error_chain(&e)
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let summary = summarize(&runs);
    if args.json {
        let out = JsonOut {
            workload: &workload,
            src_device: src_name,
            dst_device: dst_name,
            runs: &runs,
            summary,
        };
        match serde_json::to_string_pretty(&out) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("ustor-copybench: JSON: {}", ustor_tools::error_chain(&e));
                return ExitCode::FAILURE;
            }
        }
    } else {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "median over {} round(s): offload {} MiB/s, {} CPU s/GiB; bounce {} MiB/s, {} CPU s/GiB",
            args.rounds,
            f(summary.offload_mib_per_s),
            f(summary.offload_cpu_s_per_gib),
            f(summary.bounce_mib_per_s),
            f(summary.bounce_cpu_s_per_gib)
        );
        if let (Some(t), Some(c)) = (summary.throughput_ratio, summary.cpu_ratio) {
            println!("offload/bounce: throughput={t:.2} cpu={c:.3}");
        }
    }
    ExitCode::SUCCESS
}
