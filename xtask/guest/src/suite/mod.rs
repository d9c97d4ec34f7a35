//! The guest tests: each runs in its own process inside the VM, against the
//! devices setup prepared, and returns `Err` with a reason on failure.
//!
//! Tests are grouped by what they exercise, one module each; [`all`] lists
//! them in the order they run. Benchmarks use the same machinery with
//! [`Kind::Bench`]: `cargo xtask vmtest` skips them, `cargo xtask vmbench`
//! runs them and shows their output.

use crate::runner::RunConfig;
use crate::setup::Devices;
use std::time::Duration;

/// Checks `$ours == $theirs`, printing the value when equal and returning
/// an error naming both when not.
macro_rules! ensure_eq {
    ($what:expr, $ours:expr, $theirs:expr) => {{
        let (ours, theirs) = (&$ours, &$theirs);
        if ours != theirs {
            return Err(format!(
                "{}: ours {:?}, reference {:?}",
                $what, ours, theirs
            ));
        }
        println!("ok {}: {:?}", $what, ours);
    }};
}

mod copybench;
mod gc;
mod mirrorbench;
mod ng;
mod nvme;
mod rig;
mod scsi;
mod stack;
mod tcp;

/// What a guest test sees: the run configuration and the devices found.
pub struct GuestEnv {
    /// What the host asked for.
    pub config: RunConfig,
    /// What setup found.
    pub devices: Devices,
}

impl GuestEnv {
    /// Loads the configuration and device map written before the test ran.
    pub fn load() -> Result<GuestEnv, String> {
        Ok(GuestEnv {
            config: RunConfig::load()?,
            devices: Devices::load()?,
        })
    }
}

/// Whether an entry is a pass/fail test or a benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Run by `cargo xtask vmtest`.
    Test,
    /// Run by `cargo xtask vmbench`; prints figures, fails only when it
    /// cannot measure.
    Bench,
}

/// One guest test.
pub struct GuestTest {
    /// Unique name, used for filtering and reporting.
    pub name: &'static str,
    /// The topology it needs.
    pub topology: &'static str,
    /// Test or benchmark.
    pub kind: Kind,
    /// Wall-time bound; past it the runner kills the test.
    pub timeout: Duration,
    /// The test body.
    pub run: fn(&GuestEnv) -> Result<(), String>,
}

/// Every guest test and benchmark, in the order they run.
pub fn all() -> impl Iterator<Item = &'static GuestTest> {
    rig::TESTS
        .iter()
        .chain(nvme::TESTS)
        .chain(scsi::TESTS)
        .chain(stack::TESTS)
        .chain(copybench::TESTS)
        .chain(mirrorbench::TESTS)
        .chain(gc::TESTS)
        .chain(ng::TESTS)
        .chain(tcp::TESTS)
}

/// Looks a test up by name.
pub fn find(name: &str) -> Option<&'static GuestTest> {
    all().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_topologies_known() {
        let mut names: Vec<_> = all().map(|t| t.name).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
        for t in all() {
            assert!(
                crate::topology::Topology::named(t.topology).is_some(),
                "{}",
                t.name
            );
            assert!(!t.name.contains(char::is_whitespace));
        }
    }
}
