//! `ustor-stack`: stacks with on-device metadata from the command line, as
//! mdadm manages md arrays.
//!
//! ```text
//! ustor-stack create [--level mirror|stripe|concat] [--region 1m] [--chunk 64k] [--assume-clean] DEV ...
//!                                                make the members a stack (their data is lost)
//! ustor-stack assemble [--no-resync] DEV ...     assemble, resync what an unclean stop left, stop clean
//! ustor-stack show [--json] DEV ...              level, members, states, events, dirty regions
//! ustor-stack replace --leg N NEW DEV ...        put NEW in place of failed leg N, rebuild it
//! ustor-stack check [--repair] [--json] DEV ...  compare the legs; with --repair make them equal
//! ustor-stack discover [--json] nvme-tcp:ADDR:PORT
//!                                                the subsystems an NVMe/TCP discovery controller lists
//! ```
//!
//! DEV is a leaf spec (`file:/path`, `nvme:0000:00:04.0/1`, `sg:/dev/sg1`,
//! ...), members in any order.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use bdev_stack::spec::{LeafRegistry, members_allocator, parse_bytes};
use bdev_stack::{
    Assembly, BlockDevice, LegHealth, Level, MemberState, Mirror, Resync, ResyncNeed, stack_meta,
};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ustor_tools::error_chain;

#[derive(Parser)]
#[command(
    name = "ustor-stack",
    about = "Mirrors with on-device metadata, as mdadm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Makes the members a stack with metadata (whatever they held is lost).
    Create {
        /// The stack's level.
        #[arg(long, value_enum, default_value_t = LevelArg::Mirror)]
        level: LevelArg,
        /// A mirror's write-intent region (a multiple of the block size).
        #[arg(long, default_value = "1m")]
        region: String,
        /// A stripe's chunk (a multiple of the block size).
        #[arg(long, default_value = "64k")]
        chunk: String,
        /// Skip a mirror's initial sync: only for members whose data is
        /// already equal (zeroed, say), or reads may differ leg to leg.
        #[arg(long)]
        assume_clean: bool,
        /// The members, as leaf specs.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Assembles the mirror from its members, resyncs what an unclean stop
    /// left uncertain, and stops it clean.
    Assemble {
        /// Only report what assembly finds; resync nothing.
        #[arg(long)]
        no_resync: bool,
        /// The members, in any order.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Shows the array the members form, without changing it.
    Show {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The members, in any order.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Puts a new member in place of a failed leg and rebuilds it.
    Replace {
        /// The failed leg's index.
        #[arg(long)]
        leg: usize,
        /// The new member, as a leaf spec (its data is lost).
        new: String,
        /// The array's present members, in any order.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Compares the legs region by region; with --repair, resyncs the
    /// regions that differ from the primary.
    Check {
        /// Make mismatched regions equal (the primary's blocks win).
        #[arg(long)]
        repair: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The members, in any order.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Lists the subsystems an NVMe/TCP discovery controller offers (its
    /// Discovery log page), as leaf specs to open them with.
    Discover {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Host NQN to connect as (default: /etc/nvme/hostnqn).
        #[arg(long)]
        hostnqn: Option<String>,
        /// `nvme-tcp:ADDR:PORT` (discovery controllers listen on 8009 by
        /// convention, nvmet on its ports' numbers).
        target: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LevelArg {
    Mirror,
    Stripe,
    Concat,
}

type Failure = Box<dyn std::error::Error>;

/// `text` as a whole number of `block_size` blocks, or an error naming `flag`.
fn blocks_of(flag: &str, text: &str, block_size: u32) -> Result<u64, Failure> {
    let bytes = parse_bytes(text).map_err(|e| format!("{flag}: {e}"))?;
    if bytes == 0 || !bytes.is_multiple_of(u64::from(block_size)) {
        return Err(format!(
            "{flag} {text}: not a non-zero multiple of the {block_size}-byte block"
        )
        .into());
    }
    Ok(bytes / u64::from(block_size))
}

/// The level the members say they form (the first member's superblock).
fn level_of(devices: &[Arc<dyn BlockDevice>]) -> Result<Level, Failure> {
    let first = devices.first().ok_or("no members named")?;
    let allocator = members_allocator(devices);
    Ok(stack_meta::read_superblock(first.as_ref(), &allocator)?.level)
}

/// Shows a stripe or concat (no redundancy, so no states or regions).
fn show_plain(
    specs: &[String],
    devices: Vec<Arc<dyn BlockDevice>>,
    json: bool,
) -> Result<(), Failure> {
    let allocator = members_allocator(&devices);
    let sb = stack_meta::read_superblock(devices[0].as_ref(), &allocator)?;
    let (stack, report) = stack_meta::assemble(devices, allocator)?;
    let info = stack.info();
    let level = if sb.level == Level::Stripe {
        "stripe"
    } else {
        "concat"
    };
    let array_id: String = sb.array_id.iter().map(|b| format!("{b:02x}")).collect();
    let members: Vec<String> = report.members.iter().flatten().cloned().collect();
    if json {
        let out = serde_json::json!({
            "level": level,
            "array_id": array_id,
            "blocks": info.block_count,
            "block_size": info.block_size,
            "chunk_blocks": (sb.level == Level::Stripe).then_some(sb.layout.region_blocks),
            "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{level} {array_id}: {} blocks of {} bytes over {} members{}",
        info.block_count,
        info.block_size,
        specs.len(),
        if sb.level == Level::Stripe {
            format!(", chunks of {} blocks", sb.layout.region_blocks)
        } else {
            String::new()
        }
    );
    for (i, name) in members.iter().enumerate() {
        println!("  member {i}: {name}");
    }
    Ok(())
}

fn open(registry: &LeafRegistry, specs: &[String]) -> Result<Vec<Arc<dyn BlockDevice>>, Failure> {
    specs
        .iter()
        .map(|s| {
            registry
                .build(s)
                .map_err(|e| format!("opening member {s}: {}", error_chain(&e)).into())
        })
        .collect()
}

fn assemble(members: Vec<Arc<dyn BlockDevice>>) -> Result<(Mirror, Assembly), Failure> {
    let allocator = members_allocator(&members);
    Ok(Mirror::assemble(members, allocator)?)
}

/// A progress bar on a terminal, nothing elsewhere.
fn bar(what: &str, total: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total).with_message(what.to_string());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} regions") {
        bar.set_style(style);
    }
    Some(bar)
}

fn run_resync(what: &str, mut resync: Resync, regions: u64) -> Result<u64, Failure> {
    let progress = bar(what, regions);
    loop {
        match resync.step()? {
            bdev_stack::ResyncStep::Finished => break,
            bdev_stack::ResyncStep::Waiting => std::thread::yield_now(),
            bdev_stack::ResyncStep::Copied { region } => {
                if let Some(p) = &progress {
                    p.set_position(region + 1);
                }
            }
        }
    }
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    Ok(resync.report().blocks)
}

fn state_name(state: &MemberState) -> String {
    match state {
        MemberState::Healthy => "healthy".into(),
        MemberState::Failed => "failed".into(),
        MemberState::Resyncing { done } => format!("resyncing ({done} blocks done)"),
    }
}

fn show(mirror: &Mirror, report: &Assembly, json: bool) -> Result<(), Failure> {
    let sb = mirror.superblock().ok_or("the mirror has no metadata")?;
    let health = mirror.health();
    let dirty: Vec<u64> = match &report.resync {
        ResyncNeed::Nothing => Vec::new(),
        ResyncNeed::Regions(r) => r.clone(),
        ResyncNeed::Everything => {
            (0..sb.layout.data_blocks.div_ceil(sb.layout.region_blocks)).collect()
        }
    };
    let legs: Vec<String> = health
        .legs
        .iter()
        .map(|l| match l {
            LegHealth::Healthy => "healthy".to_string(),
            LegHealth::Failed => "failed".to_string(),
            LegHealth::Resyncing {
                done_blocks,
                total_blocks,
            } => format!("resyncing {done_blocks}/{total_blocks}"),
        })
        .collect();
    if json {
        let members: Vec<serde_json::Value> = report
            .members
            .iter()
            .zip(&sb.states)
            .zip(&legs)
            .enumerate()
            .map(|(i, ((device, state), leg))| {
                serde_json::json!({
                    "index": i,
                    "device": device,
                    "recorded_state": state_name(state),
                    "state": leg,
                })
            })
            .collect();
        let out = serde_json::json!({
            "array_id": sb.array_id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "events": sb.events,
            "clean": report.was_clean,
            "blocks": sb.layout.data_blocks,
            "block_size": sb.layout.block_size,
            "region_blocks": sb.layout.region_blocks,
            "members": members,
            "dirty_regions": dirty,
            "bitmap_trusted": report.resync != ResyncNeed::Everything,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "mirror {}: {} blocks of {} bytes, regions of {} blocks, events {}, {}",
        sb.array_id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        sb.layout.data_blocks,
        sb.layout.block_size,
        sb.layout.region_blocks,
        sb.events,
        if report.was_clean {
            "clean"
        } else {
            "dirty (unclean stop)"
        }
    );
    for (i, (device, leg)) in report.members.iter().zip(&legs).enumerate() {
        println!(
            "  member {i}: {:<40} {leg}",
            device.as_deref().unwrap_or("(missing)")
        );
    }
    match &report.resync {
        ResyncNeed::Nothing => println!("  nothing to resync"),
        ResyncNeed::Regions(r) => println!("  {} dirty region(s) to resync: {r:?}", r.len()),
        ResyncNeed::Everything => {
            println!("  the bitmap cannot be trusted: every region will be resynced")
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let registry = LeafRegistry::with_defaults();
    match cli.command {
        Command::Discover {
            json,
            hostnqn,
            target,
        } => discover(&target, hostnqn, json)?,
        Command::Create {
            level,
            region,
            chunk,
            assume_clean,
            members,
        } => {
            let devices = open(&registry, &members)?;
            let bs = devices[0].info().block_size;
            let allocator = members_allocator(&devices);
            let (name, blocks) = match level {
                LevelArg::Mirror => {
                    let region = blocks_of("--region", &region, bs)?;
                    let mirror = if assume_clean {
                        Mirror::create_assume_clean(devices, region, allocator)?
                    } else {
                        let mirror = Mirror::create(devices, region, allocator)?;
                        let regions = mirror.dirty_map().region_count();
                        run_resync("initial sync", mirror.resync_dirty()?, regions)?;
                        mirror
                    };
                    mirror.stop()?;
                    ("mirror", mirror.info().block_count)
                }
                LevelArg::Stripe => {
                    let chunk = blocks_of("--chunk", &chunk, bs)?;
                    let stack = stack_meta::create(Level::Stripe, devices, chunk, allocator)?;
                    ("stripe", stack.info().block_count)
                }
                LevelArg::Concat => {
                    let stack = stack_meta::create(Level::Concat, devices, 1, allocator)?;
                    ("concat", stack.info().block_count)
                }
            };
            println!(
                "created a {name} of {blocks} blocks of {bs} bytes over {} members",
                members.len()
            );
        }
        Command::Assemble { no_resync, members } => {
            let devices = open(&registry, &members)?;
            if level_of(&devices)? != Level::Mirror {
                // Nothing to resync without redundancy: assembling checks
                // that every member is there and belongs.
                return show_plain(&members, devices, false);
            }
            let (mirror, report) = assemble(devices)?;
            show(&mirror, &report, false)?;
            if !no_resync && report.resync != ResyncNeed::Nothing {
                let regions = mirror.dirty_map().region_count();
                let blocks = run_resync("resync", mirror.resync_dirty()?, regions)?;
                println!("resynced {blocks} blocks");
            }
            if !no_resync {
                mirror.stop()?;
                println!("stopped clean");
            }
        }
        Command::Show { json, members } => {
            let devices = open(&registry, &members)?;
            if level_of(&devices)? != Level::Mirror {
                return show_plain(&members, devices, json);
            }
            let (mirror, report) = assemble(devices)?;
            show(&mirror, &report, json)?;
        }
        Command::Replace { leg, new, members } => {
            let (mirror, report) = assemble(open(&registry, &members)?)?;
            if report.resync != ResyncNeed::Nothing {
                let regions = mirror.dirty_map().region_count();
                run_resync("resync", mirror.resync_dirty()?, regions)?;
            }
            let device = open(&registry, std::slice::from_ref(&new))?.remove(0);
            let regions = mirror.dirty_map().region_count();
            let blocks = run_resync("rebuild", mirror.replace_leg(leg, device)?, regions)?;
            mirror.stop()?;
            println!("leg {leg} rebuilt on {new}: {blocks} blocks copied; stopped clean");
        }
        Command::Check {
            repair,
            json,
            members,
        } => {
            let (mirror, report) = assemble(open(&registry, &members)?)?;
            if report.resync != ResyncNeed::Nothing {
                return Err(
                    "the array was not stopped clean: assemble it first (it resyncs), then check"
                        .into(),
                );
            }
            let regions = mirror.dirty_map().region_count();
            let progress = bar("check", regions);
            let found = mirror.check(repair, |done, _| {
                if let Some(p) = &progress {
                    p.set_position(done);
                }
            })?;
            if let Some(p) = progress {
                p.finish_and_clear();
            }
            if repair && !found.mismatched.is_empty() {
                run_resync("repair", mirror.resync_dirty()?, regions)?;
                mirror.stop()?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "regions": found.regions,
                        "mismatched": found.mismatched,
                        "repaired": repair && !found.mismatched.is_empty(),
                    })
                );
            } else {
                println!(
                    "checked {} regions: {} mismatched {:?}{}",
                    found.regions,
                    found.mismatched.len(),
                    found.mismatched,
                    if repair && !found.mismatched.is_empty() {
                        "; repaired"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(())
}

/// `ustor-stack discover`.
fn discover(
    target: &str,
    hostnqn: Option<String>,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let addr = target.strip_prefix("nvme-tcp:").ok_or_else(|| {
        format!("`{target}`: give the discovery controller as nvme-tcp:ADDR:PORT")
    })?;
    let mut opts = nvme::tcp::TcpOptions::default();
    if let Some(nqn) = hostnqn {
        opts.host_nqn = nqn;
    }
    let entries = nvme::tcp::discover(addr, opts)?;
    if json {
        let records: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "subtype": e.subtype_name(),
                    "subnqn": e.subnqn,
                    "traddr": e.traddr,
                    "trsvcid": e.trsvcid,
                    "portid": e.portid,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "records": records }));
        return Ok(());
    }
    for e in &entries {
        if e.subtype == 2 {
            println!("nvme-tcp:{}:{}/{}/NSID", e.traddr, e.trsvcid, e.subnqn);
        } else {
            println!(
                "({}) {} at {}:{}",
                e.subtype_name(),
                e.subnqn,
                e.traddr,
                e.trsvcid
            );
        }
    }
    if entries.is_empty() {
        println!("{target} lists no subsystems for this host");
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ustor-stack: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
