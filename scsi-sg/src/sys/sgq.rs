//! The sg driver's asynchronous write/read interface, made safe by
//! ownership: [`SgAsyncFd`] owns the CDB, sense and data memory of every
//! command it has written until the matching completion is read back.
//!
//! `write(2)` of an `sg_io_hdr` queues a command (at most
//! [`SG_MAX_QUEUE`] per open file); `read(2)` of an `sg_io_hdr` returns one
//! completed command, identified by the `pack_id` it was written with.
//! The kernel copies the CDB at write time but keeps `sbp` and `dxferp`
//! until the read (and, with direct I/O, DMAs straight into `dxferp`), so
//! those must stay valid and untouched in between.

use std::ffi::{c_int, c_uint, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use super::aligned::AlignedBuf;
use super::{
    SENSE_BUFFER_LEN, SG_DXFER_FROM_DEV, SG_DXFER_NONE, SG_DXFER_TO_DEV, SgIoHdr, SgIoOutput,
};

/// Commands the sg driver queues per open file (`SG_MAX_QUEUE`).
pub const SG_MAX_QUEUE: usize = 16;
/// `SG_FLAG_DIRECT_IO`: DMA to the user buffer when the driver allows it
/// (`/proc/scsi/sg/allow_dio`), else indirect I/O; `info` says which.
pub const SG_FLAG_DIRECT_IO: c_uint = 1;

/// Largest CDB a slot holds.
pub const MAX_CDB_LEN: usize = 32;

/// The data phase of a queued command, with the buffer it owns.
#[derive(Debug)]
pub enum AsyncXfer {
    /// No data.
    None,
    /// The device writes the first `len` bytes of the buffer.
    FromDevice(AlignedBuf, usize),
    /// The device reads the first `len` bytes of the buffer.
    ToDevice(AlignedBuf, usize),
}

impl AsyncXfer {
    fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            AsyncXfer::None => None,
            AsyncXfer::FromDevice(b, _) | AsyncXfer::ToDevice(b, _) => Some(b),
        }
    }
}

struct Slot {
    cdb: [u8; MAX_CDB_LEN],
    sense: [u8; SENSE_BUFFER_LEN],
    buf: Option<AlignedBuf>,
    in_flight: bool,
}

/// One completed command, read back from the driver.
#[derive(Debug)]
pub struct RawCompletion {
    /// Slot the command used (its `pack_id`).
    pub slot: usize,
    /// Status fields.
    pub output: SgIoOutput,
    /// Sense bytes written (clamped).
    pub sense: [u8; SENSE_BUFFER_LEN],
    /// The command's data buffer, given back.
    pub buf: Option<AlignedBuf>,
}

/// An sg file used through write/read, with [`SG_MAX_QUEUE`] slots.
pub struct SgAsyncFd {
    file: File,
    // Boxed once at construction and never resized: the kernel holds
    // pointers into it while commands are in flight.
    slots: Box<[Slot]>,
    in_flight: usize,
}

impl std::fmt::Debug for SgAsyncFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgAsyncFd")
            .field("fd", &self.file.as_raw_fd())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

/// Why a submission was not queued; the buffer comes back.
#[derive(Debug)]
pub enum SubmitRefused {
    /// Every slot of this file is in use, or the driver said EDOM/EAGAIN
    /// (its queue is full).
    Full(AsyncXfer),
    /// The CDB is empty or longer than [`MAX_CDB_LEN`], or `len` exceeds
    /// the buffer.
    Invalid(AsyncXfer),
    /// `write(2)` failed otherwise.
    Io(io::Error, AsyncXfer),
}

impl SgAsyncFd {
    /// Take an open sg file (opened `O_RDWR | O_NONBLOCK`).
    pub fn new(file: File) -> SgAsyncFd {
        let slots = (0..SG_MAX_QUEUE)
            .map(|_| Slot {
                cdb: [0; MAX_CDB_LEN],
                sense: [0; SENSE_BUFFER_LEN],
                buf: None,
                in_flight: false,
            })
            .collect();
        SgAsyncFd {
            file,
            slots,
            in_flight: 0,
        }
    }

    /// The file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Commands written and not yet read back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queue one command in a free slot; returns the slot index. Never
    /// blocks (the file is non-blocking) and never allocates.
    pub fn submit(
        &mut self,
        cdb: &[u8],
        xfer: AsyncXfer,
        timeout_ms: u32,
        direct_io: bool,
    ) -> Result<usize, SubmitRefused> {
        let Ok(cmd_len) = u8::try_from(cdb.len()) else {
            return Err(SubmitRefused::Invalid(xfer));
        };
        if cdb.is_empty() || cdb.len() > MAX_CDB_LEN {
            return Err(SubmitRefused::Invalid(xfer));
        }
        let Some(index) = self.slots.iter().position(|s| !s.in_flight) else {
            return Err(SubmitRefused::Full(xfer));
        };
        let (direction, len, mut buf) = match xfer {
            AsyncXfer::None => (SG_DXFER_NONE, 0, None),
            AsyncXfer::FromDevice(b, len) => (SG_DXFER_FROM_DEV, len, Some(b)),
            AsyncXfer::ToDevice(b, len) => (SG_DXFER_TO_DEV, len, Some(b)),
        };
        let rebuild = |buf: Option<AlignedBuf>| match (direction, buf) {
            (SG_DXFER_FROM_DEV, Some(b)) => AsyncXfer::FromDevice(b, len),
            (SG_DXFER_TO_DEV, Some(b)) => AsyncXfer::ToDevice(b, len),
            _ => AsyncXfer::None,
        };
        let Ok(dxfer_len) = c_uint::try_from(len) else {
            return Err(SubmitRefused::Invalid(rebuild(buf)));
        };
        if buf.as_ref().is_some_and(|b| len > b.len()) {
            return Err(SubmitRefused::Invalid(rebuild(buf)));
        }
        let dxferp = buf
            .as_mut()
            .map_or(ptr::null_mut(), |b| b.as_mut_ptr().cast::<c_void>());
        let Some(slot) = self.slots.get_mut(index) else {
            return Err(SubmitRefused::Full(rebuild(buf)));
        };
        slot.cdb[..cdb.len()].copy_from_slice(cdb);
        let hdr = SgIoHdr {
            dxfer_direction: direction,
            cmd_len,
            mx_sb_len: u8::try_from(SENSE_BUFFER_LEN).unwrap_or(u8::MAX),
            dxfer_len,
            dxferp,
            cmdp: slot.cdb.as_ptr(),
            sbp: slot.sense.as_mut_ptr(),
            timeout: timeout_ms,
            flags: if direct_io && dxfer_len > 0 {
                SG_FLAG_DIRECT_IO
            } else {
                0
            },
            pack_id: c_int::try_from(index).unwrap_or(0),
            ..SgIoHdr::empty()
        };
        // SAFETY: write(2) reads size_of::<SgIoHdr>() bytes from `hdr`, a
        // live local. The sg driver copies the CDB (`cmdp`, cmd_len <= 32
        // bytes inside the slot) during the call, and keeps `sbp` (252
        // bytes in the slot) and `dxferp` (dxfer_len <= buffer length bytes
        // of the AlignedBuf) until the completion is read. Both stay valid
        // and unaliased until then: the slot lives in a boxed slice that is
        // never reallocated, is marked in flight below so it is not reused,
        // and the buffer is moved into the slot and handed back only by
        // `reap` (or leaked by `Drop` if the completion cannot be read).
        let rc = unsafe {
            libc::write(
                self.file.as_raw_fd(),
                ptr::from_ref(&hdr).cast::<c_void>(),
                size_of::<SgIoHdr>(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EDOM | libc::EAGAIN | libc::EBUSY) => SubmitRefused::Full(rebuild(buf)),
                _ => SubmitRefused::Io(err, rebuild(buf)),
            });
        }
        slot.buf = buf;
        slot.in_flight = true;
        self.in_flight += 1;
        Ok(index)
    }

    /// Read back one completed command, if any (never blocks unless the
    /// file was made blocking).
    pub fn reap(&mut self) -> io::Result<Option<RawCompletion>> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let mut hdr = SgIoHdr {
            // -1: take whichever command completed first.
            pack_id: -1,
            ..SgIoHdr::empty()
        };
        // SAFETY: read(2) writes at most size_of::<SgIoHdr>() bytes into
        // `hdr`, a live, writable local of that size. While completing the
        // command the driver writes sense bytes through the `sbp` and data
        // through the `dxferp` given at submission, which the slot still
        // owns (see `submit`).
        let rc = unsafe {
            libc::read(
                self.file.as_raw_fd(),
                ptr::from_mut(&mut hdr).cast::<c_void>(),
                size_of::<SgIoHdr>(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(err),
            };
        }
        let index = usize::try_from(hdr.pack_id).unwrap_or(usize::MAX);
        let Some(slot) = self.slots.get_mut(index).filter(|s| s.in_flight) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sg returned unknown pack_id {}", hdr.pack_id),
            ));
        };
        slot.in_flight = false;
        self.in_flight -= 1;
        let n = usize::from(hdr.sb_len_wr).min(SENSE_BUFFER_LEN);
        let mut sense = [0u8; SENSE_BUFFER_LEN];
        sense[..n].copy_from_slice(&slot.sense[..n]);
        Ok(Some(RawCompletion {
            slot: index,
            output: SgIoOutput {
                status: hdr.status,
                masked_status: hdr.masked_status,
                msg_status: hdr.msg_status,
                sb_len_wr: hdr.sb_len_wr,
                host_status: hdr.host_status,
                driver_status: hdr.driver_status,
                resid: hdr.resid,
                duration_ms: hdr.duration,
                info: hdr.info,
            },
            sense,
            buf: slot.buf.take(),
        }))
    }

    /// Wait up to `timeout_ms` for the file to have a completion ready
    /// (`poll(2)` for POLLIN); `Ok(false)` on timeout.
    pub fn wait_readable(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live, writable pollfd, count 1.
        let rc = unsafe { libc::poll(ptr::from_mut(&mut pfd), 1, timeout_ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc > 0)
    }
}

impl Drop for SgAsyncFd {
    fn drop(&mut self) {
        // The kernel may still write into in-flight slots and buffers:
        // drain them (each command has a timeout, so this ends). If that
        // fails, leak the memory rather than free what the device may DMA
        // into.
        while self.in_flight > 0 {
            match self.wait_readable(1000).and_then(|_| self.reap()) {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, in_flight = self.in_flight,
                        "cannot drain sg queue; leaking its buffers");
                    let slots = std::mem::take(&mut self.slots);
                    std::mem::forget(slots);
                    return;
                }
            }
        }
    }
}

impl From<AsyncXfer> for Option<AlignedBuf> {
    fn from(x: AsyncXfer) -> Self {
        x.into_buf()
    }
}

/// Most files [`wait_any`] watches at once.
pub const MAX_WAIT_FDS: usize = 16;

/// Wait up to `timeout_ms` until any of `fds` (at most [`MAX_WAIT_FDS`],
/// the rest are ignored) with commands in flight has a completion ready.
pub fn wait_any(fds: &[SgAsyncFd], timeout_ms: i32) -> io::Result<bool> {
    let mut set = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; MAX_WAIT_FDS];
    let mut n = 0;
    for f in fds.iter().filter(|f| f.in_flight > 0).take(MAX_WAIT_FDS) {
        if let Some(p) = set.get_mut(n) {
            p.fd = f.file.as_raw_fd();
            p.events = libc::POLLIN;
            n += 1;
        }
    }
    if n == 0 {
        return Ok(false);
    }
    let count = libc::nfds_t::try_from(n).unwrap_or(0);
    // SAFETY: `set` is a live, writable array of at least `n` pollfds.
    let rc = unsafe { libc::poll(set.as_mut_ptr(), count, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc > 0)
}
