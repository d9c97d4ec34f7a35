//! `gc`: a log-structured block store on any device stack, its cleaner
//! relocating live blocks with the copy engine, and a report of what that
//! cost.
//!
//! ```text
//! cargo run --release --example gc                       # embedded emulated NVMe
//! cargo run --release --example gc -- --compare          # offload vs bounce
//! cargo run --release --example gc -- --dev 'stripe(chunk=64k, emu:128m,bs=4096, emu:128m,bs=4096)'
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use log_store::{
    CompareReport, Policy, Progress, RunOptions, RunReport, StoreOptions, Workload, compare,
    run_with_progress,
};
use ustor::bdev_stack::{BlockDevice, error_chain, spec};

/// The device used when no `--dev` is given: an emulated NVMe controller
/// with Copy, inside the process (a doorbell write runs the command, so
/// the device's own work counts as host CPU; add `,thread` to give it a
/// thread of its own, as a drive works beside the host).
const EMBEDDED: &str = "emu:256m,bs=4096";

#[derive(Parser, Debug)]
#[command(
    name = "gc",
    about = "Runs a log-structured store and its garbage collector on a block device stack"
)]
struct Args {
    /// Device stack spec (see the README); default: an embedded emulated
    /// NVMe namespace with Copy (`emu:256m,bs=4096`).
    #[arg(long)]
    dev: Option<String>,
    /// Victim selection: greedy or cost-benefit.
    #[arg(long, default_value = "greedy")]
    policy: Policy,
    /// Logical size as a fraction of the data slots.
    #[arg(long, default_value_t = 0.8)]
    fill: f64,
    /// Random block overwrites after the fill (default: twice the logical
    /// blocks).
    #[arg(long)]
    overwrites: Option<u64>,
    /// Segment size, e.g. 1m or 256k.
    #[arg(long, default_value = "1m", value_parser = spec::parse_bytes)]
    segment: u64,
    /// Send 80 % of the overwrites to 20 % of the blocks.
    #[arg(long)]
    hot_cold: bool,
    /// Seed of the overwrite sequence.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Relocate through host memory only (no device copy).
    #[arg(long)]
    no_offload: bool,
    /// Run with offload, then with bounce, and print both.
    #[arg(long)]
    compare: bool,
    /// After the run, reopen the store (rebuilding its map from the
    /// summaries) and check every block.
    #[arg(long)]
    verify: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gc: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let spec = args.dev.as_deref().unwrap_or(EMBEDDED);
    let dev: Arc<dyn BlockDevice> = spec::build(spec)?;
    let store = StoreOptions {
        segment_bytes: args.segment,
        fill: args.fill,
        policy: args.policy,
        offload: !args.no_offload,
    };
    // Twice the logical blocks unless told: the size comes from the format.
    let overwrites = match args.overwrites {
        Some(n) => n,
        None => 2 * log_store::LogStore::plan(&dev, &store)?.logical_blocks,
    };
    let opts = RunOptions {
        store,
        workload: Workload {
            overwrites,
            hot_cold: args.hot_cold,
            seed: args.seed,
        },
        verify: args.verify,
    };
    let bar = progress_bar(args.json);
    let show = |mode: &str, p: Progress| {
        bar.set_length(p.total.max(1));
        bar.set_position(p.done);
        bar.set_message(format!("{mode} {}", p.phase));
    };
    if args.compare {
        let report = compare(&dev, &opts, &mut |mode, p| show(mode, p))?;
        bar.finish_and_clear();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_compare(&report);
        }
    } else {
        let mode = if opts.store.offload {
            "offload"
        } else {
            "bounce"
        };
        let report = run_with_progress(&dev, &opts, &mut |p| show(mode, p))?;
        bar.finish_and_clear();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&report);
        }
    }
    Ok(())
}

fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len} blocks")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// The rows both reports print: label and value per run.
fn rows(r: &RunReport) -> Vec<(&'static str, String)> {
    let s = &r.stats;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    vec![
        ("user blocks written", s.user_blocks.to_string()),
        ("segments cleaned", s.segments_cleaned.to_string()),
        ("cleaning rounds", s.rounds.to_string()),
        ("blocks relocated", s.blocks_relocated.to_string()),
        (
            "write amplification",
            format!("{:.2}", r.write_amplification),
        ),
        ("bytes offloaded", mib(s.bytes_offloaded)),
        ("bytes bounced", mib(s.bytes_bounced)),
        ("copy commands / I/Os", s.copy_commands.to_string()),
        ("relocation time", secs(s.relocation_wall)),
        (
            "relocation throughput",
            format!("{:.1} MiB/s", r.relocation_mib_s),
        ),
        (
            "relocation CPU",
            format!(
                "{} ({:.3} s/GiB)",
                secs(s.relocation_cpu),
                r.relocation_cpu_s_per_gib
            ),
        ),
        ("wall time", secs(r.wall)),
        ("host CPU time", secs(r.cpu)),
        (
            "verified",
            r.verified_blocks
                .map_or("no (--verify)".into(), |n| format!("{n} blocks, all equal")),
        ),
    ]
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn header(r: &RunReport) {
    println!(
        "gc on {}: {} logical blocks of {} B in {} segments of {} slots, policy {}, {} overwrites{}",
        r.device,
        r.logical_blocks,
        r.block_size,
        r.segments,
        r.segment_slots,
        r.policy,
        r.workload.overwrites,
        if r.workload.hot_cold {
            " (80/20 hot/cold)"
        } else {
            " (uniform)"
        }
    );
}

fn print_report(r: &RunReport) {
    header(r);
    println!("relocation by {}", r.mode);
    for (label, value) in rows(r) {
        println!("  {label:<24} {value}");
    }
}

fn print_compare(c: &CompareReport) {
    header(&c.offload);
    println!("  {:<24} {:>24} {:>24}", "", "offload", "bounce");
    for ((label, a), (_, b)) in rows(&c.offload).into_iter().zip(rows(&c.bounce)) {
        println!("  {label:<24} {a:>24} {b:>24}");
    }
    println!(
        "gc offload/bounce: throughput={:.2} cpu={:.3}",
        c.throughput_ratio, c.cpu_ratio
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the command line on a thread of its own; fails unless it
    /// answers within five seconds.
    fn gc(args: &[&str]) -> Result<(), String> {
        let parsed = Args::try_parse_from(["gc"].iter().chain(args)).map_err(|e| e.to_string())?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(real_main(&parsed).map_err(|e| error_chain(e.as_ref())));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("gc {args:?}: no answer within 5 s ({e})"))
    }

    #[test]
    fn absurd_sizes_are_refused_at_once_with_the_cause() {
        let dev = ["--dev", "mem:4m,bs=4096"];
        for (arg, value, says) in [
            ("--segment", "4194304g", "segment_blocks 1099511627776"),
            ("--segment", "8m", "segment_blocks 2048"),
            ("--segment", "99999999999g", "more bytes than 64 bits count"),
            ("--fill", "1e300", "fill 1e300"),
        ] {
            let err = gc(&[&dev[..], &[arg, value]].concat()).expect_err(value);
            assert!(err.contains(says), "{arg} {value}: {err}");
        }
        let err = gc(&[&dev[..], &["--segment", "4194304g"]].concat()).expect_err("huge");
        assert!(err.starts_with("mem"), "names the device: {err}");
        assert!(
            err.contains("choose a segment size"),
            "says what to do: {err}"
        );
    }
}
