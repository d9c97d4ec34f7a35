//! Judges a VM run from its console output: which tests passed, failed or
//! timed out, and whether the run as a whole went wrong (a guest panic, a
//! setup failure, a boot that never reached the runner, a hung VM).

use std::collections::BTreeMap;
use ustor_guest::protocol::{Event, Outcome};

/// How the QEMU process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// QEMU exited by itself (the guest powered off or rebooted).
    Exited(Option<i32>),
    /// The host killed QEMU at the run's deadline.
    KilledAtDeadline {
        /// The deadline, in seconds.
        after_secs: u64,
    },
}

/// One test's result as the host sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed.
    Pass,
    /// Failed, with the reason.
    Fail(String),
    /// Killed by the guest runner at its wall-time bound.
    Timeout,
    /// Started but never ended (the VM died or hung during it).
    Interrupted,
    /// Never started.
    NotRun,
}

impl Verdict {
    /// True only for a pass.
    pub fn passed(&self) -> bool {
        *self == Verdict::Pass
    }
}

/// The judgement of a whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Every expected test with its verdict, in the expected order.
    pub results: Vec<(String, Verdict, Option<u64>)>,
    /// Problems with the run itself; any of them fails the run.
    pub problems: Vec<String>,
    /// Output lines of each test, for showing failures.
    pub output: BTreeMap<String, Vec<String>>,
}

impl RunReport {
    /// Number of passed tests.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|(_, v, _)| v.passed()).count()
    }

    /// Number of tests that did not pass.
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    /// True when every expected test passed and the run had no problem.
    pub fn success(&self) -> bool {
        self.failed() == 0 && self.problems.is_empty()
    }
}

/// Signs of a guest kernel panic or oops on the console.
const PANIC_MARKERS: &[&str] = &[
    "Kernel panic - not syncing",
    "BUG: kernel NULL pointer dereference",
    "general protection fault",
    "Oops: ",
];

/// Streaming judge: feed it console lines as they arrive.
#[derive(Debug)]
pub struct ConsoleJudge {
    expected: Vec<String>,
    verdicts: BTreeMap<String, (Verdict, Option<u64>)>,
    running: Option<String>,
    output: BTreeMap<String, Vec<String>>,
    problems: Vec<String>,
    suite_started: bool,
    suite_ended: bool,
    panicked: bool,
}

impl ConsoleJudge {
    /// A judge expecting these tests, in this order.
    pub fn new(expected: Vec<String>) -> ConsoleJudge {
        ConsoleJudge {
            expected,
            verdicts: BTreeMap::new(),
            running: None,
            output: BTreeMap::new(),
            problems: Vec::new(),
            suite_started: false,
            suite_ended: false,
            panicked: false,
        }
    }

    /// Takes one console line; returns the event it carried, if any.
    pub fn feed(&mut self, line: &str) -> Option<Event> {
        let marker = PANIC_MARKERS.iter().find(|m| line.contains(*m));
        if let (false, Some(marker)) = (self.panicked, marker) {
            self.panicked = true;
            let during = self
                .running
                .as_deref()
                .map(|t| format!(" during {t}"))
                .unwrap_or_default();
            let detail = line[line.find(marker).unwrap_or(0)..].trim().to_string();
            self.problems
                .push(format!("guest kernel panic{during}: {detail}"));
        }
        let event = Event::parse(line)?;
        match &event {
            Event::SuiteStart { count } => {
                self.suite_started = true;
                if *count != self.expected.len() {
                    self.problems.push(format!(
                        "the guest set out to run {count} tests, the host asked for {}",
                        self.expected.len()
                    ));
                }
            }
            Event::SetupFailed { reason } => {
                self.problems.push(format!("guest setup failed: {reason}"));
            }
            Event::TestStart { name } => {
                self.running = Some(name.clone());
            }
            Event::Output { name, line } => {
                self.output
                    .entry(name.clone())
                    .or_default()
                    .push(line.clone());
            }
            Event::TestEnd {
                name,
                outcome,
                millis,
            } => {
                if self.running.as_deref() == Some(name) {
                    self.running = None;
                }
                let verdict = match outcome {
                    Outcome::Pass => Verdict::Pass,
                    Outcome::Fail(reason) => Verdict::Fail(reason.clone()),
                    Outcome::Timeout => Verdict::Timeout,
                };
                if !self.expected.contains(name) {
                    self.problems.push(format!(
                        "the guest reported a test nobody asked for: {name}"
                    ));
                }
                self.verdicts.insert(name.clone(), (verdict, Some(*millis)));
            }
            Event::SuiteEnd { passed, failed } => {
                self.suite_ended = true;
                let ours = self.verdicts.values().filter(|(v, _)| v.passed()).count();
                if *passed != ours || passed + failed != self.verdicts.len() {
                    self.problems.push(format!(
                        "the guest's tally ({passed} passed, {failed} failed) disagrees with \
                         the results it reported"
                    ));
                }
            }
        }
        Some(event)
    }

    /// Closes the run: how QEMU ended decides what missing results mean.
    pub fn finish(mut self, exit: VmExit) -> RunReport {
        match &exit {
            VmExit::KilledAtDeadline { after_secs } => {
                let during = self
                    .running
                    .as_deref()
                    .map(|t| format!(" during {t}"))
                    .unwrap_or_default();
                self.problems.push(format!(
                    "the VM did not finish within {after_secs} s and was killed{during}"
                ));
            }
            VmExit::Exited(code) if !self.suite_ended && !self.panicked => {
                let stage = if self.suite_started {
                    "before the suite ended"
                } else {
                    "before the test runner started"
                };
                // No code: QEMU died of a signal.
                let how = match code {
                    Some(c) => format!("QEMU exit status {c}"),
                    None => "QEMU killed by a signal".to_string(),
                };
                self.problems
                    .push(format!("the VM stopped {stage} ({how})"));
            }
            VmExit::Exited(_) => {}
        }
        let mut results = Vec::new();
        for name in &self.expected {
            let (verdict, millis) = match self.verdicts.remove(name) {
                Some(v) => v,
                None if self.running.as_deref() == Some(name.as_str()) => {
                    (Verdict::Interrupted, None)
                }
                None => (Verdict::NotRun, None),
            };
            results.push((name.clone(), verdict, millis));
        }
        RunReport {
            results,
            problems: self.problems,
            output: self.output,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Judges a whole recorded console at once.
    fn judge(expected: &[&str], console: &str, exit: VmExit) -> RunReport {
        let mut judge = ConsoleJudge::new(expected.iter().map(|s| s.to_string()).collect());
        for line in console.lines() {
            judge.feed(line);
        }
        judge.finish(exit)
    }

    const EXPECTED: &[&str] = &[
        "rig_devices_match_topology",
        "vfio_open_map_bar0_dma_map",
        "vfio_regs_match_nvme_show_regs",
        "sg_inquiry_matches_sg_inq",
        "sg_readcap16_matches_sg_readcap",
    ];

    fn recorded(name: &str) -> String {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn a_clean_run_passes() {
        let report = judge(EXPECTED, &recorded("pass.log"), VmExit::Exited(Some(0)));
        assert_eq!(report.problems, Vec::<String>::new());
        assert_eq!(report.passed(), EXPECTED.len());
        assert!(report.success());
    }

    #[test]
    fn a_failing_test_fails_the_run() {
        let report = judge(EXPECTED, &recorded("fail.log"), VmExit::Exited(Some(0)));
        assert!(!report.success());
        assert_eq!(report.failed(), 1);
        let (name, verdict, _) = report.results.iter().find(|(_, v, _)| !v.passed()).unwrap();
        assert_eq!(name, "vfio_regs_match_nvme_show_regs");
        assert!(
            matches!(verdict, Verdict::Fail(r) if r.contains("CAP")),
            "{verdict:?}"
        );
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    #[test]
    fn a_guest_panic_fails_the_run() {
        let report = judge(EXPECTED, &recorded("panic.log"), VmExit::Exited(Some(0)));
        assert!(!report.success());
        assert!(
            report.problems.iter().any(|p| p.contains("kernel panic")),
            "{:?}",
            report.problems
        );
        // The test that was running when the kernel died is not a pass, and
        // the ones after it never ran.
        assert!(
            report
                .results
                .iter()
                .any(|(_, v, _)| *v == Verdict::Interrupted)
        );
        assert!(report.results.iter().any(|(_, v, _)| *v == Verdict::NotRun));
    }

    #[test]
    fn a_guest_test_timeout_fails_the_run() {
        let report = judge(EXPECTED, &recorded("timeout.log"), VmExit::Exited(Some(0)));
        assert!(!report.success());
        assert!(
            report
                .results
                .iter()
                .any(|(_, v, _)| *v == Verdict::Timeout)
        );
    }

    #[test]
    fn a_hung_vm_fails_the_run() {
        // The console stops in the middle of a test and the host kills QEMU.
        let console = recorded("pass.log");
        let cut: String = console
            .lines()
            .take_while(|l| !l.contains("test-end vfio_regs_match_nvme_show_regs"))
            .map(|l| format!("{l}\n"))
            .collect();
        let report = judge(EXPECTED, &cut, VmExit::KilledAtDeadline { after_secs: 600 });
        assert!(!report.success());
        assert!(report.problems.iter().any(|p| p.contains("600 s")));
        assert!(
            report
                .results
                .iter()
                .any(|(_, v, _)| *v == Verdict::Interrupted)
        );
    }

    #[test]
    fn a_vm_that_never_reaches_the_runner_fails() {
        let report = judge(
            EXPECTED,
            "SeaBIOS\nBooting from ROM..\n",
            VmExit::Exited(Some(0)),
        );
        assert!(!report.success());
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("before the test runner"))
        );
        assert_eq!(report.passed(), 0);
    }

    #[test]
    fn a_setup_failure_fails_the_run() {
        let console = "@@ustor setup-failed no PCI device at 0000:00:04.0\n";
        let report = judge(EXPECTED, console, VmExit::Exited(Some(0)));
        assert!(!report.success());
        assert!(report.problems.iter().any(|p| p.contains("0000:00:04.0")));
    }

    #[test]
    fn a_missing_result_is_not_a_pass() {
        let console: String = recorded("pass.log")
            .lines()
            .filter(|l| !l.contains("test-end sg_readcap16_matches_sg_readcap"))
            .map(|l| format!("{l}\n"))
            .collect();
        let report = judge(EXPECTED, &console, VmExit::Exited(Some(0)));
        assert!(!report.success());
    }
}
