//! Waiting for commands that take long (an offloaded copy, a flush, a
//! write the device queues behind others) without spinning a core and
//! without reading the clock while the device works.
//!
//! A polling thread that sleeps pays for each sleep: a clock read and a
//! timer programmed on the way in. In a VM both can be emulated device
//! accesses that wait for the hypervisor, which is busy emulating the
//! very device being waited on. [`Waiter`] with [`Wait::Paced`] therefore
//! learns how long the device takes ([`Pace`]), arms a one-shot timer
//! ([`Alarm`]) for that long *before* the doorbell (while the device is
//! still idle), and after the doorbell only blocks on it.
//!
//! The caller's loop:
//!
//! ```
//! use std::time::Duration;
//! use copy_engine::wait::{Wait, Waiter};
//!
//! let mut waiter = Waiter::new(Wait::default());
//! let mut in_flight = 8u64; // blocks (or any unit of work) just submitted
//! waiter.submitted(in_flight);
//! while in_flight > 0 {
//!     // poll the channel here (it rings the doorbell); say one unit completes
//!     let completed = 1;
//!     in_flight -= 1;
//!     waiter.after_poll(completed, false, in_flight);
//! }
//! assert!(waiter.pace().known());
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How a polling thread waits while nothing completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Poll without pause: the lowest latency, a whole core while waiting.
    Spin,
    /// Poll; after a poll that completed nothing, sleep, doubling the pause
    /// from 16 µs up to `max`, back to the start on any completion.
    Backoff {
        /// The longest pause.
        max: Duration,
    },
    /// Sleep once for as long as the device needs for the work in flight,
    /// at the pace it kept on earlier work of the kind (the caller keeps
    /// the [`Pace`]), then in eighths of that until it completes. The
    /// wake-up is armed before the doorbell, so once the device works the
    /// thread only blocks: clock reads and timer programming can be dear
    /// while a device (or a hypervisor emulating one) is busy. Until the
    /// pace is known, as `Backoff` up to 2 ms.
    Paced {
        /// The longest single sleep.
        max: Duration,
    },
}

impl Default for Wait {
    fn default() -> Wait {
        // The cap only bounds how late a badly learnt pace can make us.
        Wait::Paced {
            max: Duration::from_millis(100),
        }
    }
}

/// The first pause of a backoff.
const FIRST_PAUSE: Duration = Duration::from_micros(16);
/// The longest pause of the backoff while the pace is unknown: well under
/// one Copy command of a few hundred KiB, so with several commands queued
/// the device never waits for us.
const UNKNOWN_PACE_MAX_PAUSE: Duration = Duration::from_millis(2);

/// A one-shot timer armed before the doorbell and waited on after it:
/// arming reads the clock and programs the timer while the device is idle,
/// waiting is one blocking read.
#[derive(Debug)]
pub struct Alarm {
    fd: OwnedFd,
}

impl Alarm {
    /// A new timer (a Linux timerfd); `None` if the system refuses one,
    /// and then waits sleep instead.
    pub fn new() -> Option<Alarm> {
        // SAFETY: plain system call; a non-negative result is a new file
        // descriptor that we then own.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        // SAFETY: `fd` was just created and nobody else owns it.
        (fd >= 0).then(|| Alarm {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Arms the timer to go off once, `after` from now; false if it could
    /// not be armed (then it must not be waited on).
    pub fn arm(&self, after: Duration) -> bool {
        // A zero time would disarm it instead.
        let after = after.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `fd` is our timerfd; `spec` is a valid itimerspec and the
        // old value is not asked for.
        unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) == 0 }
    }

    /// Blocks until the armed timer has gone off.
    pub fn wait(&self) {
        let mut expirations = [0u8; 8];
        loop {
            // SAFETY: reads at most 8 bytes into our 8-byte buffer.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        }
    }
}

/// A device's pace on one kind of work: nanoseconds per unit in flight
/// (blocks of a Copy, requests of a flush: the caller's choice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    ns_per_unit: u64,
}

impl Pace {
    /// Whether anything was learnt yet.
    pub fn known(&self) -> bool {
        self.ns_per_unit > 0
    }

    /// The time `units` take at this pace.
    pub fn time_for(&self, units: u64) -> Duration {
        Duration::from_nanos(self.ns_per_unit.saturating_mul(units))
    }
}

/// Waiting for one batch of work after another, as [`Wait`] says. The
/// caller keeps one per thread (it holds the timer) and sets the pace of
/// the device and kind of work before each batch.
#[derive(Debug)]
pub struct Waiter {
    wait: Wait,
    alarm: Option<Alarm>,
    pace: Pace,
    /// The next pause when not waiting on the alarm.
    pause: Duration,
    /// The alarm is armed for the units handed over at `since`.
    armed: bool,
    /// When the units now in flight were handed over, how many, how many
    /// sleeps since, and whether every completion since was a success.
    since: Option<Instant>,
    units: u64,
    sleeps: u32,
    clean: bool,
}

impl Waiter {
    /// A waiter, with its timer if `wait` is paced; the pace is unknown.
    pub fn new(wait: Wait) -> Waiter {
        Waiter {
            wait,
            alarm: match wait {
                Wait::Paced { .. } => Alarm::new(),
                _ => None,
            },
            pace: Pace::default(),
            pause: FIRST_PAUSE,
            armed: false,
            since: None,
            units: 0,
            sleeps: 0,
            clean: true,
        }
    }

    /// How it waits.
    pub fn wait(&self) -> Wait {
        self.wait
    }

    /// The pace as learnt so far, for the caller to keep.
    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// Starts from `pace` (learnt earlier on the same device and kind of
    /// work, or the default: unknown) for the next batch.
    pub fn set_pace(&mut self, pace: Pace) {
        self.pace = pace;
        self.since = None;
        self.armed = false;
    }

    /// Called after submitting, before the poll that rings the doorbell,
    /// with the units now in flight.
    pub fn submitted(&mut self, in_flight: u64) {
        let Wait::Paced { max } = self.wait else {
            return;
        };
        self.since = Some(Instant::now());
        self.units = in_flight;
        self.sleeps = 0;
        self.clean = true;
        self.armed = false;
        if self.pace.known() {
            let expected = self.pace.time_for(in_flight).min(max);
            self.pause = (expected / 8).max(FIRST_PAUSE);
            self.armed = self.alarm.as_ref().is_some_and(|a| a.arm(expected));
        }
    }

    /// Called after each poll with the completions it gave (`failed`: some
    /// were not successes) and the units still in flight; sleeps if the
    /// poll found nothing. Returns whether it slept.
    pub fn after_poll(&mut self, completed: usize, failed: bool, in_flight: u64) -> bool {
        match self.wait {
            Wait::Spin => false,
            Wait::Backoff { max } => {
                if completed > 0 {
                    self.pause = FIRST_PAUSE;
                    false
                } else {
                    std::thread::sleep(self.pause);
                    self.pause = (self.pause * 2).min(max.max(FIRST_PAUSE));
                    true
                }
            }
            Wait::Paced { max } => {
                self.clean &= !failed;
                if in_flight == 0 {
                    self.learn();
                    return false;
                }
                if completed > 0 {
                    return false;
                }
                self.sleeps += 1;
                if std::mem::take(&mut self.armed)
                    && let Some(alarm) = &self.alarm
                {
                    alarm.wait();
                    return true;
                }
                std::thread::sleep(self.pause.min(max));
                if !self.pace.known() {
                    self.pause = (self.pause * 2).min(UNKNOWN_PACE_MAX_PAUSE);
                }
                true
            }
        }
    }

    /// Everything handed over at `since` completed: learn the pace. A
    /// first sleep that found it all done may have been longer than
    /// needed, so the pace is tightened a little; otherwise the time seen
    /// (late by at most one pause) is the new pace.
    fn learn(&mut self) {
        let Some(since) = self.since.take() else {
            return;
        };
        if !self.clean || self.units == 0 {
            return;
        }
        if self.pace.known() && self.sleeps <= 1 {
            self.pace.ns_per_unit -= self.pace.ns_per_unit / 32;
        } else {
            let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.pace.ns_per_unit = (ns / self.units).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_goes_off_after_its_time_and_never_hangs_on_zero() {
        let alarm = Alarm::new().expect("timerfd");
        let t = Instant::now();
        assert!(alarm.arm(Duration::from_millis(2)));
        alarm.wait();
        assert!(t.elapsed() >= Duration::from_millis(2));
        // A zero time would disarm the timer and block the wait forever.
        assert!(alarm.arm(Duration::ZERO));
        alarm.wait();
    }

    #[test]
    fn paced_wait_learns_the_pace_then_sleeps_once_per_batch() {
        let mut waiter = Waiter::new(Wait::default());
        // Unknown pace: backoff pauses until the batch completes.
        waiter.submitted(1000);
        assert!(waiter.after_poll(0, false, 1000));
        std::thread::sleep(Duration::from_millis(3));
        assert!(!waiter.after_poll(1, false, 0));
        let learnt = waiter.pace();
        assert!(learnt.known());
        assert!(learnt.time_for(1000) >= Duration::from_millis(3));
        // Known pace: one armed sleep of about the learnt time.
        let t = Instant::now();
        waiter.submitted(1000);
        assert!(waiter.after_poll(0, false, 1000));
        assert!(t.elapsed() >= learnt.time_for(1000));
        assert_eq!(waiter.sleeps, 1);
        // Done after that one sleep: the pace tightens a little.
        waiter.after_poll(1, false, 0);
        assert!(waiter.pace().ns_per_unit < learnt.ns_per_unit);
        // A failed batch teaches nothing.
        let before = waiter.pace();
        waiter.submitted(1000);
        waiter.after_poll(1, true, 0);
        assert_eq!(waiter.pace(), before);
    }

    #[test]
    fn paced_wait_sleeps_no_longer_than_its_cap() {
        let mut waiter = Waiter::new(Wait::Paced {
            max: Duration::from_millis(1),
        });
        waiter.set_pace(Pace {
            ns_per_unit: 1_000_000,
        });
        let t = Instant::now();
        waiter.submitted(10_000);
        waiter.after_poll(0, false, 10_000);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn spin_never_sleeps_and_backoff_sleeps_only_when_idle() {
        let mut spin = Waiter::new(Wait::Spin);
        spin.submitted(4);
        assert!(!spin.after_poll(0, false, 4));
        let mut backoff = Waiter::new(Wait::Backoff {
            max: Duration::from_micros(64),
        });
        assert!(backoff.after_poll(0, false, 4));
        assert!(!backoff.after_poll(2, false, 2));
    }
}
