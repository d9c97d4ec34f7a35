//! The guest runner: runs as the VM's payload after init has mounted the
//! file systems and loaded the modules. It captures reference output from
//! the kernel's view of the devices, hands the NVMe controllers to vfio-pci,
//! builds the LIO LUNs, then runs each selected test in a child process
//! with a wall-time bound, reporting over the console in the line protocol.

use crate::protocol::{Event, Outcome};
use crate::setup;
use crate::suite::{self, GuestTest};
use crate::supervise::{Ended, supervise};
use crate::topology::Topology;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the host puts the run configuration in the initramfs.
pub const RUN_CONFIG_PATH: &str = "/etc/ustor/run.json";

/// What the host asks one boot to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunConfig {
    /// The topology this VM was booted with.
    pub topology: Topology,
    /// Names of the tests to run, in order.
    pub tests: Vec<String>,
}

impl RunConfig {
    /// Reads the run configuration the host packed into the initramfs.
    pub fn load() -> Result<RunConfig, String> {
        let text = std::fs::read_to_string(RUN_CONFIG_PATH)
            .map_err(|e| format!("reading {RUN_CONFIG_PATH}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("parsing {RUN_CONFIG_PATH}: {e}"))
    }
}

fn emit(event: &Event) {
    let mut out = std::io::stdout().lock();
    // The console is the only channel to the host; if it fails there is
    // nobody left to tell.
    let _ = writeln!(out, "{}", event.to_line());
    let _ = out.flush();
}

/// Sets the rig up and runs the configured tests. Returns true when every
/// test passed.
pub fn run() -> bool {
    let config = match RunConfig::load() {
        Ok(c) => c,
        Err(reason) => {
            emit(&Event::SetupFailed { reason });
            return false;
        }
    };
    let selected: Result<Vec<&GuestTest>, String> = config
        .tests
        .iter()
        .map(|name| suite::find(name).ok_or_else(|| format!("no guest test named {name}")))
        .collect();
    let selected = match selected {
        Ok(s) => s,
        Err(reason) => {
            emit(&Event::SetupFailed { reason });
            return false;
        }
    };
    let setup_started = Instant::now();
    match setup::prepare(&config.topology) {
        Ok(devices) => {
            eprintln!(
                "ustor-guest: rig ready in {} ms: {} NVMe, {} LIO, {} virtio-scsi",
                setup_started.elapsed().as_millis(),
                devices.nvme.len(),
                devices.lio.len(),
                devices.virtio.len()
            );
            if let Err(reason) = devices.save() {
                emit(&Event::SetupFailed { reason });
                return false;
            }
        }
        Err(reason) => {
            emit(&Event::SetupFailed { reason });
            return false;
        }
    }

    emit(&Event::SuiteStart {
        count: selected.len(),
    });
    let (mut passed, mut failed) = (0, 0);
    for test in selected {
        emit(&Event::TestStart {
            name: test.name.to_string(),
        });
        let started = Instant::now();
        let outcome = run_one(test);
        let millis = started.elapsed().as_millis() as u64;
        if outcome == Outcome::Pass {
            passed += 1;
        } else {
            failed += 1;
        }
        emit(&Event::TestEnd {
            name: test.name.to_string(),
            outcome,
            millis,
        });
    }
    emit(&Event::SuiteEnd { passed, failed });
    failed == 0
}

fn spawn_test(test: &GuestTest) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg("exec")
        .arg(test.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// Runs one test in a child process, bounded by the test's timeout.
fn run_one(test: &GuestTest) -> Outcome {
    let child = match spawn_test(test) {
        Ok(c) => c,
        Err(e) => return Outcome::Fail(format!("could not start the test process: {e}")),
    };
    let mut tail: Vec<String> = Vec::new();
    let ended = supervise(child, test.timeout, |line| {
        emit(&Event::Output {
            name: test.name.to_string(),
            line: line.clone(),
        });
        if !line.trim().is_empty() {
            tail.push(line);
            if tail.len() > 3 {
                tail.remove(0);
            }
        }
    });
    match ended {
        Err(e) => Outcome::Fail(format!("supervising the test process: {e}")),
        Ok(Ended::Killed) => Outcome::Timeout,
        Ok(Ended::Exited(status)) if status.success() => Outcome::Pass,
        Ok(Ended::Exited(status)) => {
            let code = status.code().map_or_else(
                || "killed by a signal".to_string(),
                |c| format!("exit code {c}"),
            );
            Outcome::Fail(format!("{code}: {}", tail.join(" / ")))
        }
    }
}

/// Runs one test in this process (the child side of [`run_one`]).
pub fn exec(name: &str) -> bool {
    let Some(test) = suite::find(name) else {
        eprintln!("error: no guest test named {name}");
        return false;
    };
    let env = match suite::GuestEnv::load() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("error: {e}");
            return false;
        }
    };
    match (test.run)(&env) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("error: {e}");
            false
        }
    }
}

/// Polls `ready` every 50 ms until it holds or `timeout` passes.
pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
