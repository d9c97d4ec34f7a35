//! The io_uring ring the `ng:` and `file:` leaves' channels own: one per
//! channel (per thread, like an NVMe queue pair), entries pushed on
//! submission and handed to the kernel in one `io_uring_enter` at the next
//! poll (a batched doorbell), completions reaped without blocking.
//!
//! The kernel owns the per-command timeouts of what it executes (NVMe
//! passthrough: Abort, then reset, as for its own I/O), and completes every
//! command once the device can no longer touch its memory; a ring is torn
//! down only after its commands completed, so no caller's buffer is handed
//! back early.

use std::io;

use io_uring::{IoUring, cqueue, squeue};

use crate::error::BdevError;
use crate::registered::RegisteredMemory;

/// What to do about an `io_uring_setup` failure, by its errno.
pub(crate) fn setup_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ENOSYS) => {
            "this kernel has no io_uring, or a seccomp filter (a container runtime's) blocks it: \
             allow io_uring_setup, io_uring_enter and io_uring_register"
        }
        Some(libc::EPERM) => {
            "io_uring is disabled for this process: set sysctl kernel.io_uring_disabled=0 \
             (or 1 with this user in kernel.io_uring_group)"
        }
        Some(libc::EINVAL) => {
            "the kernel does not offer the ring asked for (NVMe passthrough needs 128-byte \
             entries, Linux 5.19 or later)"
        }
        Some(libc::ENOMEM) => "not enough locked memory for the ring: raise `ulimit -l`",
        _ => "see the OS error",
    }
}

/// The most submission entries a ring is given.
pub(crate) const MAX_ENTRIES: usize = 4096;

/// A ring with its bookkeeping: entries pushed but not yet handed to the
/// kernel, and commands the kernel has.
pub(crate) struct Ring<S: squeue::EntryMarker, C: cqueue::EntryMarker> {
    ring: IoUring<S, C>,
    /// Pushed, not yet submitted.
    queued: usize,
    /// Submitted, not yet reaped.
    in_flight: usize,
}

impl<S: squeue::EntryMarker, C: cqueue::EntryMarker> Ring<S, C> {
    /// A ring of at least `entries` submission entries and room for
    /// `commands` completions (every command the channel can have in
    /// flight, so the kernel never has to hold one back in memory it
    /// allocates); with `iopoll`, completions are polled from the device
    /// (IORING_SETUP_IOPOLL).
    pub(crate) fn new(
        device: &str,
        entries: usize,
        commands: usize,
        iopoll: bool,
    ) -> Result<Self, BdevError> {
        let entries = u32::try_from(entries.clamp(1, MAX_ENTRIES).next_power_of_two())
            .unwrap_or(MAX_ENTRIES as u32);
        let completions = u32::try_from(commands.clamp(1, 1 << 16).next_power_of_two())
            .unwrap_or(1 << 16)
            .max(entries * 2);
        let mut builder = IoUring::<S, C>::builder();
        if iopoll {
            builder.setup_iopoll();
        }
        builder.setup_cqsize(completions);
        let ring = builder
            .build(entries)
            .map_err(|source| BdevError::IoUringUnavailable {
                device: device.to_string(),
                hint: setup_hint(&source),
                source,
            })?;
        Ok(Ring {
            ring,
            queued: 0,
            in_flight: 0,
        })
    }

    /// Pushes `entry`, handing queued entries to the kernel first if the
    /// submission queue is full. False when it stays full (the kernel has
    /// not consumed them: try again after a poll).
    ///
    /// # Safety
    /// Every buffer and descriptor `entry` names must stay valid until its
    /// completion has been reaped.
    pub(crate) unsafe fn push(&mut self, entry: &S) -> bool {
        if self.ring.submission().is_full() {
            let _ = self.enter();
        }
        // SAFETY: the caller keeps what the entry names valid until it
        // completes.
        match unsafe { self.ring.submission().push(entry) } {
            Ok(()) => {
                self.queued += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Registers `memory`'s segments as fixed buffers; false (with a note)
    /// where the kernel refuses, e.g. past the locked-memory limit:
    /// commands then go without them.
    pub(crate) fn register(&mut self, device: &str, memory: &RegisteredMemory) -> bool {
        let iovecs = memory.iovecs();
        // SAFETY: the caller keeps `memory` alive as long as the ring.
        match unsafe { self.ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(device, error = %e, "registered buffers refused (raise `ulimit -l`); buffers are mapped per command");
                false
            }
        }
    }

    /// Makes room for `n` entries in the submission queue, handing queued
    /// ones to the kernel if needed; false when there is not (poll, then
    /// try again).
    pub(crate) fn reserve(&mut self, n: usize) -> bool {
        let room = |ring: &mut IoUring<S, C>| {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if room(&mut self.ring) < n {
            let _ = self.enter();
        }
        room(&mut self.ring) >= n
    }

    /// Hands queued entries to the kernel and, for a polled ring, has it
    /// poll the device; never waits. Errors the kernel returns for
    /// transient reasons (full completion queue, signal) leave the entries
    /// queued for the next call.
    fn enter(&mut self) -> bool {
        if self.queued == 0 && self.in_flight == 0 {
            return true;
        }
        let result = self.ring.submit();
        self.entered(result)
    }

    /// Accounts what an `io_uring_enter` handed to the kernel; false on an
    /// error.
    fn entered(&mut self, result: std::io::Result<usize>) -> bool {
        match result {
            Ok(submitted) => {
                let submitted = submitted.min(self.queued);
                self.queued -= submitted;
                self.in_flight += submitted;
                true
            }
            Err(e) => {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) {
                    tracing::warn!(error = %e, "io_uring_enter failed; retrying at the next poll");
                }
                false
            }
        }
    }

    /// Submits what is queued, then hands up to `max` completions to
    /// `each` (user data, result, the whole entry); returns how many.
    pub(crate) fn reap(&mut self, max: usize, mut each: impl FnMut(u64, i32, &C)) -> usize {
        let _ = self.enter();
        let mut n = 0;
        for cqe in self.ring.completion().take(max) {
            let result = Into::<cqueue::Entry>::into(cqe.clone()).result();
            each(cqe.user_data(), result, &cqe);
            n += 1;
        }
        self.in_flight = self.in_flight.saturating_sub(n);
        n
    }

    /// Commands pushed or submitted and not yet reaped.
    pub(crate) fn outstanding(&self) -> usize {
        self.queued + self.in_flight
    }

    /// Submits what is queued and waits until every command completed,
    /// handing each to `each`: for channels that are dropped with
    /// commands in flight, whose buffers the device may still touch.
    pub(crate) fn drain(&mut self, mut each: impl FnMut(u64, i32, &C)) {
        while self.outstanding() > 0 {
            if self.reap(usize::MAX, &mut each) > 0 {
                continue;
            }
            let waited = self.ring.submit_and_wait(1);
            if !self.entered(waited) {
                // The buffers may still be in use: never give up, but do
                // not spin on a kernel that keeps refusing.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
