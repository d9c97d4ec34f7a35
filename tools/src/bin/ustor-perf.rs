//! `ustor-perf`: IOPS and latency of the userspace NVMe driver, like
//! SPDK's `spdk_nvme_perf`.
//!
//! ```text
//! ustor-perf -w randread -o 4k -q 128 -t 5                   # emulated null namespace
//! ustor-perf -w randread -q 32 --target vfio:0000:00:04.0/1  # a controller bound to vfio-pci
//! ustor-perf -q 128 --target 'stripe(chunk=128k, emu:1g,null, emu:1g,null)'  # a stack
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ustor_tools::perf::{PerfConfig, Target, Workload, parse_size, run};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
    Mix,
}

/// Benchmark the ustor NVMe driver.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// I/O pattern.
    #[arg(short = 'w', long, value_enum, default_value = "randread")]
    workload: Pattern,
    /// Percentage of reads for `mix`.
    #[arg(short = 'M', long, default_value_t = 70)]
    rwmixread: u8,
    /// Bytes per I/O (4096, 4k, 128k, 1m).
    #[arg(short = 'o', long, default_value = "4k", value_parser = parse_io_size)]
    io_size: usize,
    /// Requests in flight per queue pair.
    #[arg(short = 'q', long, default_value_t = 128)]
    queue_depth: u16,
    /// Seconds to run (fractions allowed).
    #[arg(short = 't', long, default_value_t = 5.0)]
    time: f64,
    /// Threads, one I/O queue pair each.
    #[arg(short = 'j', long, default_value_t = 1)]
    threads: u16,
    /// `emu[:mem][:thread]` (default: null namespace, inline),
    /// `vfio:DDDD:BB:DD.F[/nsid]`, or a block-device stack spec, e.g.
    /// `stripe(chunk=128k, emu:1g,null, emu:1g,null)` or
    /// `nvme:0000:00:04.0/1` (driven through the stack's channels).
    #[arg(long, default_value = "emu")]
    target: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Use shadow doorbells (Doorbell Buffer Config) if the controller
    /// offers them.
    #[arg(long)]
    shadow_doorbells: bool,
    /// Refill the queue only once this many requests completed (fio's
    /// iodepth_batch_submit); 1 keeps it full.
    #[arg(long, default_value_t = 1)]
    batch: u16,
    /// Ring the SQ doorbell after every N submissions of a refill, so the
    /// controller starts on the first part while the rest is queued
    /// (0: once per refill). Queue-pair targets (emu, vfio:) only.
    #[arg(long, default_value_t = 0)]
    sq_doorbell_every: u16,
    /// Stack targets: plain heap buffers instead of the device's own (an
    /// io_uring leaf's registered buffers), to compare the two.
    #[arg(long)]
    host_buffers: bool,
}

fn parse_io_size(s: &str) -> Result<usize, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let target = match Target::parse(&args.target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ustor-perf: {}", ustor_tools::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    // A run of up to a year; beyond that (or NaN, or not positive) the
    // number is a mistake, and `Duration` could not hold some of them.
    const MAX_SECONDS: f64 = 366.0 * 24.0 * 3600.0;
    let duration = match Duration::try_from_secs_f64(args.time) {
        Ok(d) if args.time > 0.0 && args.time <= MAX_SECONDS => d,
        _ => {
            eprintln!(
                "ustor-perf: --time {}: give a positive number of seconds, at most {MAX_SECONDS}",
                args.time
            );
            return ExitCode::from(2);
        }
    };
    let workload = match args.workload {
        Pattern::Read => Workload::Read,
        Pattern::Write => Workload::Write,
        Pattern::Randread => Workload::RandRead,
        Pattern::Randwrite => Workload::RandWrite,
        Pattern::Mix => Workload::Mix {
            read_pct: args.rwmixread,
        },
    };
    let cfg = PerfConfig {
        target,
        workload,
        io_size: args.io_size,
        queue_depth: args.queue_depth,
        duration,
        threads: args.threads,
        shadow_doorbells: args.shadow_doorbells,
        batch: args.batch,
        sq_doorbell_every: args.sq_doorbell_every,
        host_buffers: args.host_buffers,
    };
    match run(&cfg) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("ustor-perf: JSON: {}", ustor_tools::error_chain(&e));
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{report}");
            }
            if report.errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ustor-perf: {}", ustor_tools::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
