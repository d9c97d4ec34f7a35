//! The line protocol the guest runner speaks over the serial console.
//!
//! Every event is one line that starts with [`MARK`], so the host can pick
//! them out of kernel messages and test output sharing the console. Names
//! and reasons are written on one line each (newlines are escaped).

/// Prefix of every protocol line.
pub const MARK: &str = "@@ustor";

/// A guest test's output line that starts with this asks the host to act
/// on the VM (the rest of the line: `device_del nvmeN`, unplugging that
/// controller through QEMU's monitor).
pub const HOST_REQUEST: &str = "host-request: ";

/// How one guest test ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The test returned success.
    Pass,
    /// The test reported a failure (or panicked); the reason says why.
    Fail(String),
    /// The test ran past its wall-time bound and was killed.
    Timeout,
}

/// One protocol event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The runner has set the devices up and starts `count` tests.
    SuiteStart {
        /// Number of tests it is about to run.
        count: usize,
    },
    /// The runner could not set the rig up; no test will run.
    SetupFailed {
        /// What went wrong.
        reason: String,
    },
    /// A test starts.
    TestStart {
        /// Test name.
        name: String,
    },
    /// A line the test printed.
    Output {
        /// Test name.
        name: String,
        /// The line.
        line: String,
    },
    /// A test ended.
    TestEnd {
        /// Test name.
        name: String,
        /// How it ended.
        outcome: Outcome,
        /// Wall time in milliseconds.
        millis: u64,
    },
    /// Every test has ended.
    SuiteEnd {
        /// Tests that passed.
        passed: usize,
        /// Tests that failed or timed out.
        failed: usize,
    },
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Event {
    /// The console line for this event (without the trailing newline).
    pub fn to_line(&self) -> String {
        match self {
            Event::SuiteStart { count } => format!("{MARK} suite-start {count}"),
            Event::SetupFailed { reason } => format!("{MARK} setup-failed {}", escape(reason)),
            Event::TestStart { name } => format!("{MARK} test-start {name}"),
            Event::Output { name, line } => format!("{MARK} out {name} {}", escape(line)),
            Event::TestEnd {
                name,
                outcome,
                millis,
            } => match outcome {
                Outcome::Pass => format!("{MARK} test-end {name} pass {millis}"),
                Outcome::Timeout => format!("{MARK} test-end {name} timeout {millis}"),
                Outcome::Fail(reason) => {
                    format!("{MARK} test-end {name} fail {millis} {}", escape(reason))
                }
            },
            Event::SuiteEnd { passed, failed } => {
                format!("{MARK} suite-end {passed} {failed}")
            }
        }
    }

    /// Parses a console line. Anything before [`MARK`] on the line (a
    /// kernel message that was cut off, say) is ignored; a line without the
    /// mark, or a malformed event, gives `None`.
    pub fn parse(line: &str) -> Option<Event> {
        let start = line.find(MARK)?;
        let rest = line[start + MARK.len()..].trim_end_matches(['\r', '\n']);
        let rest = rest.strip_prefix(' ')?;
        let (kind, args) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "suite-start" => Some(Event::SuiteStart {
                count: args.trim().parse().ok()?,
            }),
            "setup-failed" => Some(Event::SetupFailed {
                reason: unescape(args),
            }),
            "test-start" => Some(Event::TestStart {
                name: non_empty(args.trim())?,
            }),
            "out" => {
                let (name, text) = args.split_once(' ').unwrap_or((args, ""));
                Some(Event::Output {
                    name: non_empty(name)?,
                    line: unescape(text),
                })
            }
            "test-end" => {
                let mut parts = args.splitn(4, ' ');
                let name = non_empty(parts.next()?)?;
                let verdict = parts.next()?;
                let millis = parts.next()?.parse().ok()?;
                let outcome = match verdict {
                    "pass" => Outcome::Pass,
                    "timeout" => Outcome::Timeout,
                    "fail" => Outcome::Fail(unescape(parts.next().unwrap_or(""))),
                    _ => return None,
                };
                Some(Event::TestEnd {
                    name,
                    outcome,
                    millis,
                })
            }
            "suite-end" => {
                let (p, f) = args.trim().split_once(' ')?;
                Some(Event::SuiteEnd {
                    passed: p.parse().ok()?,
                    failed: f.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty() && !s.contains(char::is_whitespace)).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips() {
        let events = [
            Event::SuiteStart { count: 3 },
            Event::SetupFailed {
                reason: "no vfio\nmodule".into(),
            },
            Event::TestStart { name: "a_b".into() },
            Event::Output {
                name: "a_b".into(),
                line: "x \\ y".into(),
            },
            Event::TestEnd {
                name: "a_b".into(),
                outcome: Outcome::Pass,
                millis: 12,
            },
            Event::TestEnd {
                name: "a_b".into(),
                outcome: Outcome::Fail("CAP differs:\n 1 vs 2".into()),
                millis: 5,
            },
            Event::TestEnd {
                name: "a_b".into(),
                outcome: Outcome::Timeout,
                millis: 60000,
            },
            Event::SuiteEnd {
                passed: 2,
                failed: 1,
            },
        ];
        for e in events {
            assert_eq!(Event::parse(&e.to_line()), Some(e.clone()), "{e:?}");
        }
    }

    #[test]
    fn kernel_noise_before_the_mark_is_ignored() {
        let line = "[    3.1] random: crng init done@@ustor test-start t1\r";
        assert_eq!(
            Event::parse(line),
            Some(Event::TestStart { name: "t1".into() })
        );
    }

    #[test]
    fn malformed_lines_are_not_events() {
        for line in [
            "",
            "@@ustor",
            "@@ustorx test-start a",
            "@@ustor test-start ",
            "@@ustor test-end a maybe 3",
            "@@ustor test-end a pass notanumber",
            "@@ustor suite-end 1",
            "@@ustor what 1 2",
        ] {
            assert_eq!(Event::parse(line), None, "{line:?}");
        }
    }
}
