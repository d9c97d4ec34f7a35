//! Queued asynchronous I/O on one LUN through the sg driver's write/read
//! interface: many commands in flight from one thread, completions
//! harvested by [`SgQueue::poll`].
//!
//! The sg driver queues at most 16 commands per open file, so a queue
//! opens the sg node several times for deeper queues and spreads
//! submissions over the files. Submission never blocks and never
//! allocates: a full queue is [`RejectReason::QueueFull`], with the
//! buffer handed back. Data buffers are [`AlignedBuf`]s the queue owns
//! while the command is in flight (direct I/O when the driver allows it).
//!
//! `SgQueue` is `Send` but not `Sync`: one thread owns it, as in SPDK.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::debug;

use crate::cdb::Command;
use crate::device::timeout_millis;
use crate::sys::aligned::AlignedBuf;
use crate::sys::sgq::{self, AsyncXfer, SG_MAX_QUEUE, SgAsyncFd, SubmitRefused};
use crate::sys::{self, SENSE_BUFFER_LEN};
use crate::{CommandOutcome, Error};

/// Character-device major number of the sg driver (`SCSI_GENERIC_MAJOR`).
pub const SCSI_GENERIC_MAJOR: u64 = 21;

/// Why a submission was not queued.
#[derive(Debug)]
pub enum RejectReason {
    /// Every file's queue is full: poll for completions and resubmit.
    QueueFull,
    /// The CDB is empty or over 32 bytes, or the length exceeds the buffer.
    Invalid,
    /// `write(2)` failed.
    Io(io::Error),
}

/// A refused submission: why, and the data phase (with its buffer) back.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub reason: RejectReason,
    /// The transfer as given.
    pub xfer: AsyncXfer,
}

/// One finished command.
#[derive(Debug)]
pub struct Completion {
    /// The caller's tag from [`SgQueue::submit`].
    pub tag: u64,
    /// The outcome (status and sense as data), or a transport failure
    /// (timeout, host or driver status).
    pub result: Result<CommandOutcome, Error>,
    /// The command's buffer, given back.
    pub buf: Option<AlignedBuf>,
}

#[derive(Clone, Copy)]
struct Pending {
    tag: u64,
    command: Command,
    requested: usize,
    timeout: Duration,
}

/// A queue of commands in flight on one sg node.
#[derive(Debug)]
pub struct SgQueue {
    path: PathBuf,
    fds: Vec<SgAsyncFd>,
    pending: Vec<Option<Pending>>,
    next: usize,
    in_flight: usize,
    direct_io: bool,
    // Send but not Sync.
    _not_sync: PhantomData<Cell<()>>,
}

// One thread owns a queue: it may move between threads, never be shared.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<SgQueue>();
};

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({}, {})", self.tag, self.command)
    }
}

impl SgQueue {
    /// Open `path` (an sg node, `/dev/sgN`) `files` times (1..=16), for up
    /// to `16 * files` commands in flight.
    pub fn open(path: impl AsRef<Path>, files: usize) -> Result<SgQueue, Error> {
        let path = path.as_ref();
        let files = files.clamp(1, sgq::MAX_WAIT_FDS);
        let mut fds = Vec::with_capacity(files);
        for _ in 0..files {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
                .map_err(|source| match source.raw_os_error() {
                    Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => Error::NoSuchDevice {
                        path: path.to_path_buf(),
                    },
                    Some(libc::EACCES | libc::EPERM) => Error::Permission {
                        path: path.to_path_buf(),
                    },
                    _ => Error::Open {
                        path: path.to_path_buf(),
                        source,
                    },
                })?;
            // Only the sg driver has the write/read interface. A SCSI block
            // device answers SG_GET_VERSION_NUM too, but write(2) on it
            // writes the header to the medium: refuse anything that is
            // not an sg character device.
            let meta = file.metadata().map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
            let rdev = meta.rdev();
            let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
            if !meta.file_type().is_char_device() || major != SCSI_GENERIC_MAJOR {
                return Err(Error::NotSgCapable {
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::Unsupported,
                        "not an sg character device (major 21); the queued interface needs /dev/sgN",
                    ),
                });
            }
            match sys::get_version_num(std::os::fd::AsFd::as_fd(&file)) {
                Ok(v) if v >= sys::SG_MIN_V3_VERSION => {}
                Ok(v) => {
                    return Err(Error::NotSgCapable {
                        path: path.to_path_buf(),
                        source: io::Error::new(
                            io::ErrorKind::Unsupported,
                            format!("sg driver version {v} predates the v3 interface"),
                        ),
                    });
                }
                Err(source) => {
                    return Err(Error::NotSgCapable {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
            fds.push(SgAsyncFd::new(file));
        }
        debug!(path = %path.display(), files, "opened sg queue");
        Ok(SgQueue {
            path: path.to_path_buf(),
            pending: vec![None; files * SG_MAX_QUEUE],
            fds,
            next: 0,
            in_flight: 0,
            direct_io: true,
            _not_sync: PhantomData,
        })
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Most commands the queue holds at once.
    pub fn capacity(&self) -> usize {
        self.fds.len() * SG_MAX_QUEUE
    }

    /// Commands submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Ask for direct I/O (default on; the driver falls back to indirect
    /// I/O unless `/proc/scsi/sg/allow_dio` is 1).
    pub fn set_direct_io(&mut self, on: bool) {
        self.direct_io = on;
    }

    /// Queue one command. Never blocks, never allocates.
    pub fn submit(
        &mut self,
        tag: u64,
        cdb: &[u8],
        xfer: AsyncXfer,
        timeout: Duration,
    ) -> Result<(), Rejected> {
        let requested = match &xfer {
            AsyncXfer::None => 0,
            AsyncXfer::FromDevice(_, n) | AsyncXfer::ToDevice(_, n) => *n,
        };
        let n = self.fds.len();
        let mut xfer = xfer;
        for i in 0..n {
            let fi = (self.next + i) % n;
            let Some(fd) = self.fds.get_mut(fi) else {
                continue;
            };
            if fd.in_flight() >= SG_MAX_QUEUE {
                continue;
            }
            match fd.submit(cdb, xfer, timeout_millis(timeout), self.direct_io) {
                Ok(slot) => {
                    if let Some(p) = self.pending.get_mut(fi * SG_MAX_QUEUE + slot) {
                        *p = Some(Pending {
                            tag,
                            command: Command::from_cdb(cdb),
                            requested,
                            timeout,
                        });
                    }
                    self.in_flight += 1;
                    self.next = (fi + 1) % n;
                    return Ok(());
                }
                Err(SubmitRefused::Full(x)) => xfer = x,
                Err(SubmitRefused::Invalid(x)) => {
                    return Err(Rejected {
                        reason: RejectReason::Invalid,
                        xfer: x,
                    });
                }
                Err(SubmitRefused::Io(e, x)) => {
                    return Err(Rejected {
                        reason: RejectReason::Io(e),
                        xfer: x,
                    });
                }
            }
        }
        Err(Rejected {
            reason: RejectReason::QueueFull,
            xfer,
        })
    }

    /// Harvest up to `max` completions, calling `f` for each; returns how
    /// many. Never blocks.
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Completion)) -> Result<usize, Error> {
        let mut done = 0;
        let n = self.fds.len();
        for fi in 0..n {
            while done < max {
                let Some(fd) = self.fds.get_mut(fi) else {
                    break;
                };
                if fd.in_flight() == 0 {
                    break;
                }
                let raw = fd.reap().map_err(|source| Error::QueueIo {
                    path: self.path.clone(),
                    source,
                })?;
                let Some(raw) = raw else { break };
                let Some(p) = self
                    .pending
                    .get_mut(fi * SG_MAX_QUEUE + raw.slot)
                    .and_then(Option::take)
                else {
                    continue;
                };
                self.in_flight = self.in_flight.saturating_sub(1);
                let result = self.classify(&p, &raw.output, &raw.sense);
                f(Completion {
                    tag: p.tag,
                    result,
                    buf: raw.buf,
                });
                done += 1;
            }
        }
        Ok(done)
    }

    /// Sleep until a completion is ready or `timeout` passes (`poll(2)`):
    /// for callers that would rather not spin.
    pub fn wait(&self, timeout: Duration) -> Result<bool, Error> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        sgq::wait_any(&self.fds, ms).map_err(|source| Error::QueueIo {
            path: self.path.clone(),
            source,
        })
    }

    fn classify(
        &self,
        p: &Pending,
        out: &sys::SgIoOutput,
        sense: &[u8; SENSE_BUFFER_LEN],
    ) -> Result<CommandOutcome, Error> {
        let driver = out.driver_status & sys::DRIVER_STATUS_MASK;
        if out.host_status == sys::DID_TIME_OUT || driver == sys::DRIVER_TIMEOUT {
            return Err(Error::Timeout {
                path: self.path.clone(),
                command: p.command,
                timeout: p.timeout,
            });
        }
        if out.host_status != sys::DID_OK {
            return Err(Error::HostStatus {
                path: self.path.clone(),
                command: p.command,
                host_status: out.host_status,
            });
        }
        if driver != sys::DRIVER_OK && driver != sys::DRIVER_SENSE {
            return Err(Error::DriverStatus {
                path: self.path.clone(),
                command: p.command,
                driver_status: out.driver_status,
            });
        }
        Ok(CommandOutcome::from_sg(p.command, out, p.requested, sense))
    }
}
