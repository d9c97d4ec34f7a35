//! `cargo xtask`: the project's test rig.
//!
//! - `cargo xtask vmtest [FILTER]`: provision the host, build the guest
//!   programs, boot QEMU once per topology the selected tests need, and
//!   report each guest test's result.
//! - `cargo xtask vmbench [FILTER]`: the same for the guest benchmarks,
//!   showing their output as it comes.
//! - `cargo xtask ci`: formatting, clippy, host tests, then `vmtest`.

mod console;
mod initramfs;
mod provision;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use ustor_guest::runner::RunConfig;
use ustor_guest::suite::{self, GuestTest, Kind};
use ustor_guest::topology::Topology;

/// The rig's error: a message meant for the person running it.
#[derive(Debug)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn msg(m: impl Into<String>) -> Error {
        Error(m.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error(e.to_string())
    }
}

/// Result of the rig's steps.
pub type Result<T> = std::result::Result<T, Error>;

/// Runs a command, failing with its exit status when it does not succeed.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| Error::msg(format!("running {:?}: {e}", cmd.get_program())))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::msg(format!("{cmd:?} failed ({status})")))
    }
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` when set), which also
/// holds the rig's cache and work files.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Time QEMU gets to boot and set the devices up before the first test.
const BOOT_BUDGET: Duration = Duration::from_secs(240);

/// Boots the VM rig and runs the guest entries of `kind` whose names
/// contain `filter`: tests for `vmtest`, benchmarks for `vmbench`.
fn vm_run(kind: Kind, filter: Option<&str>) -> Result<bool> {
    let root = workspace_root();
    let target = target_dir(&root);
    let vm_dir = target.join("vmtest");
    let cache = vm_dir.join("cache");
    let work = vm_dir.join("work");
    std::fs::create_dir_all(&cache)?;
    std::fs::create_dir_all(&work)?;

    let label = match kind {
        Kind::Test => "vmtest",
        Kind::Bench => "vmbench",
    };
    let of_kind = || suite::all().filter(|t| t.kind == kind);
    let selected: Vec<&GuestTest> = of_kind()
        .filter(|t| filter.is_none_or(|f| t.name.contains(f)))
        .collect();
    if selected.is_empty() {
        return Err(Error::msg(format!(
            "no guest {label} entry matches {:?}; there are: {}",
            filter.unwrap_or(""),
            of_kind().map(|t| t.name).collect::<Vec<_>>().join(", ")
        )));
    }

    let t0 = Instant::now();
    let kernel = provision::provision(&cache)?;
    println!(
        "{label}: provisioned in {:.1} s (kernel {})",
        t0.elapsed().as_secs_f64(),
        kernel.release
    );

    let t1 = Instant::now();
    let guest = initramfs::build_guest(&root, &target.join("guest"))?;
    let base = initramfs::build_base(&work, &kernel, &guest)?;
    println!(
        "{label}: guest programs and initramfs built in {:.1} s",
        t1.elapsed().as_secs_f64()
    );

    // One boot per topology, in the order tests first ask for them.
    let mut topologies: Vec<&str> = Vec::new();
    for t in &selected {
        if !topologies.contains(&t.topology) {
            topologies.push(t.topology);
        }
    }
    let mut reports = Vec::new();
    for name in topologies {
        let topology =
            Topology::named(name).ok_or_else(|| Error::msg(format!("no topology named {name}")))?;
        let tests: Vec<&GuestTest> = selected
            .iter()
            .copied()
            .filter(|t| t.topology == name)
            .collect();
        let config = RunConfig {
            topology: topology.clone(),
            tests: tests.iter().map(|t| t.name.to_string()).collect(),
        };
        let json = serde_json::to_string_pretty(&config)
            .map_err(|e| Error::msg(format!("serializing the run config: {e}")))?;
        let cfg = initramfs::build_config(&work, name, &json)?;
        let initrd = work.join(format!("initrd-{name}.cpio"));
        initramfs::combine(&base, &cfg, &initrd)?;
        let run_dir = work.join(format!("run-{name}"));
        let args = qemu::qemu_args(&topology, &run_dir, &kernel.image, &initrd)?;
        let test_time: Duration = tests
            .iter()
            .map(|t| t.timeout + Duration::from_secs(5))
            .sum();
        let boot = qemu::Boot {
            tests: config.tests.clone(),
            deadline: BOOT_BUDGET + test_time,
            console_log: vm_dir.join(format!("console-{name}.log")),
            monitor: qemu::monitor_socket(&run_dir),
            show_output: kind == Kind::Bench,
        };
        println!(
            "{label}: booting topology '{name}' ({} tests; console in {})",
            tests.len(),
            boot.console_log.display()
        );
        let t2 = Instant::now();
        let report = qemu::run_vm(&boot, &args)?;
        println!(
            "{label}: topology '{name}' done in {:.1} s",
            t2.elapsed().as_secs_f64()
        );
        reports.push((name, report));
    }

    let (mut passed, mut failed) = (0, 0);
    for (name, report) in &reports {
        for (test, verdict, _) in &report.results {
            if !verdict.passed() {
                println!("\n---- {test} ({name}): {verdict:?}");
                for line in report.output.get(test).into_iter().flatten() {
                    println!("  | {line}");
                }
            }
        }
        for problem in &report.problems {
            println!("\n{label}: topology '{name}': {problem}");
        }
        passed += report.passed();
        failed += report.failed();
        if report.failed() == 0 && !report.success() {
            // A broken run with every result in still fails as a whole.
            failed += 1;
        }
    }
    println!("\n{label}: whole run {:.1} s", t0.elapsed().as_secs_f64());
    println!("{label}: {passed} passed, {failed} failed");
    Ok(failed == 0)
}

fn ci() -> Result<bool> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = workspace_root();
    let steps: [&[&str]; 3] = [
        &["fmt", "--all", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace"],
    ];
    for step in steps {
        println!("ci: cargo {}", step.join(" "));
        let status = Command::new(&cargo)
            .args(step)
            .current_dir(&root)
            .status()
            .map_err(|e| Error::msg(format!("running cargo: {e}")))?;
        if !status.success() {
            println!("ci: cargo {} failed ({status})", step.join(" "));
            return Ok(false);
        }
    }
    println!("ci: cargo xtask vmtest");
    vm_run(Kind::Test, None)
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: cargo xtask vmtest [FILTER]   boot the VM rig and run the guest tests\n\
         \x20      cargo xtask vmbench [FILTER]  boot the VM rig and run the guest benchmarks\n\
         \x20      cargo xtask ci                fmt, clippy, host tests, then vmtest"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["vmtest"] => vm_run(Kind::Test, None),
        ["vmtest", filter] => vm_run(Kind::Test, Some(filter)),
        ["vmbench"] => vm_run(Kind::Bench, None),
        ["vmbench", filter] => vm_run(Kind::Bench, Some(filter)),
        ["ci"] => ci(),
        _ => return usage(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
