//! The Linux SG v3 interface (`<scsi/sg.h>`): the `sg_io_hdr` ABI, its
//! constants, and the only `unsafe` code of this crate.
//!
//! The `SG_IO` ioctl is accepted by `/dev/sgN` (the sg driver) and by SCSI
//! block devices such as `/dev/sdX` (the block layer's SCSI pass-through).
//! Both take the same `sg_io_hdr` and run the command synchronously: the
//! ioctl returns when the command has completed, failed or timed out.
//!
//! Everything here mirrors the kernel's `include/scsi/sg.h` and
//! `include/scsi/scsi_status.h`; the layout of [`SgIoHdr`] is checked at
//! compile time against the 64-bit Linux ABI.

use std::ffi::{c_int, c_uint, c_ushort, c_void};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use crate::DataTransfer;

pub mod aligned;
pub mod sgq;

/// `SG_IO`: send a command and wait for its completion (`_IO(0x22, 0x85)`).
pub const SG_IO: u32 = 0x2285;
/// `SG_GET_VERSION_NUM`: read the sg driver version, e.g. 30536 for 3.5.36.
pub const SG_GET_VERSION_NUM: u32 = 0x2282;

/// Oldest sg driver version that implements the v3 `sg_io_hdr` interface.
pub const SG_MIN_V3_VERSION: c_int = 30000;

/// `interface_id` of a v3 header: `'S'`.
pub const SG_INTERFACE_ID_ORIG: c_int = b'S' as c_int;

/// No data transfer (e.g. TEST UNIT READY).
pub const SG_DXFER_NONE: c_int = -1;
/// Data goes from the host to the device (e.g. WRITE).
pub const SG_DXFER_TO_DEV: c_int = -2;
/// Data comes from the device to the host (e.g. READ, INQUIRY).
pub const SG_DXFER_FROM_DEV: c_int = -3;
/// Bidirectional-ish transfer (to the device, then from it). Not used here.
pub const SG_DXFER_TO_FROM_DEV: c_int = -4;

/// `info` mask: did anything go wrong (status, host or driver)?
pub const SG_INFO_OK_MASK: c_uint = 0x1;
/// `info & SG_INFO_OK_MASK`: no problem reported.
pub const SG_INFO_OK: c_uint = 0x0;
/// `info & SG_INFO_OK_MASK`: something (status, host, driver) was non-zero.
pub const SG_INFO_CHECK: c_uint = 0x1;
/// `info` mask: how the data was moved.
pub const SG_INFO_DIRECT_IO_MASK: c_uint = 0x6;
/// Data was moved through kernel buffers.
pub const SG_INFO_INDIRECT_IO: c_uint = 0x0;
/// Data was moved by DMA straight to or from the user buffer.
pub const SG_INFO_DIRECT_IO: c_uint = 0x2;
/// Part direct, part indirect.
pub const SG_INFO_MIXED_IO: c_uint = 0x4;

/// `masked_status` (the SCSI status shifted right by one, as in the
/// obsolete `<scsi/scsi.h>` names): GOOD.
pub const GOOD: u8 = 0x00;
/// `masked_status`: CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x01;
/// `masked_status`: CONDITION MET.
pub const CONDITION_GOOD: u8 = 0x02;
/// `masked_status`: BUSY.
pub const BUSY: u8 = 0x04;
/// `masked_status`: INTERMEDIATE (obsolete).
pub const INTERMEDIATE_GOOD: u8 = 0x08;
/// `masked_status`: INTERMEDIATE-CONDITION MET (obsolete).
pub const INTERMEDIATE_C_GOOD: u8 = 0x0a;
/// `masked_status`: RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x0c;
/// `masked_status`: COMMAND TERMINATED (obsolete).
pub const COMMAND_TERMINATED: u8 = 0x11;
/// `masked_status`: TASK SET FULL (formerly QUEUE FULL).
pub const QUEUE_FULL: u8 = 0x14;

/// `host_status`: no error.
pub const DID_OK: u16 = 0x00;
/// `host_status`: could not connect before timeout.
pub const DID_NO_CONNECT: u16 = 0x01;
/// `host_status`: bus stayed busy through the time-out period.
pub const DID_BUS_BUSY: u16 = 0x02;
/// `host_status`: the command timed out.
pub const DID_TIME_OUT: u16 = 0x03;
/// `host_status`: bad target.
pub const DID_BAD_TARGET: u16 = 0x04;
/// `host_status`: the command was aborted.
pub const DID_ABORT: u16 = 0x05;
/// `host_status`: parity error.
pub const DID_PARITY: u16 = 0x06;
/// `host_status`: internal error of the host adapter.
pub const DID_ERROR: u16 = 0x07;
/// `host_status`: reset by somebody.
pub const DID_RESET: u16 = 0x08;
/// `host_status`: unexpected interrupt.
pub const DID_BAD_INTR: u16 = 0x09;
/// `host_status`: forced command past the mid-layer.
pub const DID_PASSTHROUGH: u16 = 0x0a;
/// `host_status`: the low-level driver wants a retry.
pub const DID_SOFT_ERROR: u16 = 0x0b;
/// `host_status`: retry without decrementing the retry count.
pub const DID_IMM_RETRY: u16 = 0x0c;
/// `host_status`: requeue the command.
pub const DID_REQUEUE: u16 = 0x0d;
/// `host_status`: transport disrupted; retry after a while.
pub const DID_TRANSPORT_DISRUPTED: u16 = 0x0e;
/// `host_status`: transport class fast-failed the command.
pub const DID_TRANSPORT_FAILFAST: u16 = 0x0f;
/// `host_status`: permanent target failure; do not retry.
pub const DID_TARGET_FAILURE: u16 = 0x10;
/// `host_status`: permanent nexus failure; do not retry on this path.
pub const DID_NEXUS_FAILURE: u16 = 0x11;
/// `host_status`: space allocation failed on the device.
pub const DID_ALLOC_FAILURE: u16 = 0x12;
/// `host_status`: medium error.
pub const DID_MEDIUM_ERROR: u16 = 0x13;
/// `host_status`: transport marginal errors.
pub const DID_TRANSPORT_MARGINAL: u16 = 0x14;

/// `driver_status & DRIVER_STATUS_MASK`: no error.
pub const DRIVER_OK: u16 = 0x00;
/// `driver_status`: busy.
pub const DRIVER_BUSY: u16 = 0x01;
/// `driver_status`: soft error.
pub const DRIVER_SOFT: u16 = 0x02;
/// `driver_status`: medium error.
pub const DRIVER_MEDIA: u16 = 0x03;
/// `driver_status`: driver error.
pub const DRIVER_ERROR: u16 = 0x04;
/// `driver_status`: invalid request.
pub const DRIVER_INVALID: u16 = 0x05;
/// `driver_status`: the command timed out.
pub const DRIVER_TIMEOUT: u16 = 0x06;
/// `driver_status`: hard error.
pub const DRIVER_HARD: u16 = 0x07;
/// `driver_status`: sense data was written (goes with CHECK CONDITION).
pub const DRIVER_SENSE: u16 = 0x08;
/// Mask of the driver code in `driver_status`; the high nibble holds the
/// obsolete `SUGGEST_*` hints.
pub const DRIVER_STATUS_MASK: u16 = 0x0f;

/// Largest sense buffer this crate hands to the kernel (SPC: 252 bytes is
/// the most a device can return; Linux itself keeps at most 96).
pub const SENSE_BUFFER_LEN: usize = 252;

/// Name of a `host_status` value (`DID_*`), if it is one Linux defines.
pub fn host_status_name(host_status: u16) -> Option<&'static str> {
    Some(match host_status {
        DID_OK => "DID_OK",
        DID_NO_CONNECT => "DID_NO_CONNECT",
        DID_BUS_BUSY => "DID_BUS_BUSY",
        DID_TIME_OUT => "DID_TIME_OUT",
        DID_BAD_TARGET => "DID_BAD_TARGET",
        DID_ABORT => "DID_ABORT",
        DID_PARITY => "DID_PARITY",
        DID_ERROR => "DID_ERROR",
        DID_RESET => "DID_RESET",
        DID_BAD_INTR => "DID_BAD_INTR",
        DID_PASSTHROUGH => "DID_PASSTHROUGH",
        DID_SOFT_ERROR => "DID_SOFT_ERROR",
        DID_IMM_RETRY => "DID_IMM_RETRY",
        DID_REQUEUE => "DID_REQUEUE",
        DID_TRANSPORT_DISRUPTED => "DID_TRANSPORT_DISRUPTED",
        DID_TRANSPORT_FAILFAST => "DID_TRANSPORT_FAILFAST",
        DID_TARGET_FAILURE => "DID_TARGET_FAILURE",
        DID_NEXUS_FAILURE => "DID_NEXUS_FAILURE",
        DID_ALLOC_FAILURE => "DID_ALLOC_FAILURE",
        DID_MEDIUM_ERROR => "DID_MEDIUM_ERROR",
        DID_TRANSPORT_MARGINAL => "DID_TRANSPORT_MARGINAL",
        _ => return None,
    })
}

/// Name of the driver code in a `driver_status` value (`DRIVER_*`), if it is
/// one Linux defines. The `SUGGEST_*` high nibble is ignored.
pub fn driver_status_name(driver_status: u16) -> Option<&'static str> {
    Some(match driver_status & DRIVER_STATUS_MASK {
        DRIVER_OK => "DRIVER_OK",
        DRIVER_BUSY => "DRIVER_BUSY",
        DRIVER_SOFT => "DRIVER_SOFT",
        DRIVER_MEDIA => "DRIVER_MEDIA",
        DRIVER_ERROR => "DRIVER_ERROR",
        DRIVER_INVALID => "DRIVER_INVALID",
        DRIVER_TIMEOUT => "DRIVER_TIMEOUT",
        DRIVER_HARD => "DRIVER_HARD",
        DRIVER_SENSE => "DRIVER_SENSE",
        _ => return None,
    })
}

/// `struct sg_io_hdr` from `<scsi/sg.h>` (the SG v3 interface).
///
/// Field names follow the kernel's. The pointers are raw because the kernel
/// reads and writes through them during the ioctl; build headers with
/// [`sg_io`], which ties them to borrowed buffers for exactly that call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SgIoHdr {
    /// `'S'` for the v3 interface.
    pub interface_id: c_int,
    /// One of the `SG_DXFER_*` values.
    pub dxfer_direction: c_int,
    /// Length of the CDB at `cmdp`.
    pub cmd_len: u8,
    /// Capacity of the sense buffer at `sbp`.
    pub mx_sb_len: u8,
    /// 0: `dxferp` is a plain buffer, not an iovec array.
    pub iovec_count: c_ushort,
    /// Byte count of the data transfer.
    pub dxfer_len: c_uint,
    /// Data buffer (or iovec array when `iovec_count != 0`).
    pub dxferp: *mut c_void,
    /// The CDB.
    pub cmdp: *const u8,
    /// Sense buffer, written on CHECK CONDITION.
    pub sbp: *mut u8,
    /// Timeout in milliseconds (0: the kernel's default).
    pub timeout: c_uint,
    /// `SG_FLAG_*` bits; 0 for plain indirect I/O.
    pub flags: c_uint,
    /// Caller tag for the asynchronous write/read interface.
    pub pack_id: c_int,
    /// Caller pointer, returned untouched.
    pub usr_ptr: *mut c_void,
    /// Out: SCSI status byte.
    pub status: u8,
    /// Out: `(status >> 1) & 0x7f`.
    pub masked_status: u8,
    /// Out: messaging-level status (SPI only).
    pub msg_status: u8,
    /// Out: bytes actually written to `sbp`.
    pub sb_len_wr: u8,
    /// Out: `DID_*` host adapter status.
    pub host_status: c_ushort,
    /// Out: `DRIVER_*` status.
    pub driver_status: c_ushort,
    /// Out: `dxfer_len` minus the bytes actually transferred.
    pub resid: c_int,
    /// Out: time the command took, in milliseconds.
    pub duration: c_uint,
    /// Out: `SG_INFO_*` bits.
    pub info: c_uint,
}

impl SgIoHdr {
    /// A v3 header with no command, no buffers, and every field the driver
    /// fills in zeroed; callers set what their call needs with struct update
    /// syntax.
    pub const fn empty() -> SgIoHdr {
        SgIoHdr {
            interface_id: SG_INTERFACE_ID_ORIG,
            dxfer_direction: SG_DXFER_NONE,
            cmd_len: 0,
            mx_sb_len: 0,
            iovec_count: 0,
            dxfer_len: 0,
            dxferp: ptr::null_mut(),
            cmdp: ptr::null(),
            sbp: ptr::null_mut(),
            timeout: 0,
            flags: 0,
            pack_id: 0,
            usr_ptr: ptr::null_mut(),
            status: 0,
            masked_status: 0,
            msg_status: 0,
            sb_len_wr: 0,
            host_status: 0,
            driver_status: 0,
            resid: 0,
            duration: 0,
            info: 0,
        }
    }
}

// Layout of `sg_io_hdr` on 64-bit Linux (x86_64, aarch64, ...): the pointers
// are 8-byte aligned, so there is padding after `dxfer_len`/`pack_id` and at
// the end. `pahole` on x86_64 shows exactly these offsets and size 88.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<SgIoHdr>() == 88);
    assert!(offset_of!(SgIoHdr, interface_id) == 0);
    assert!(offset_of!(SgIoHdr, dxfer_direction) == 4);
    assert!(offset_of!(SgIoHdr, cmd_len) == 8);
    assert!(offset_of!(SgIoHdr, mx_sb_len) == 9);
    assert!(offset_of!(SgIoHdr, iovec_count) == 10);
    assert!(offset_of!(SgIoHdr, dxfer_len) == 12);
    assert!(offset_of!(SgIoHdr, dxferp) == 16);
    assert!(offset_of!(SgIoHdr, cmdp) == 24);
    assert!(offset_of!(SgIoHdr, sbp) == 32);
    assert!(offset_of!(SgIoHdr, timeout) == 40);
    assert!(offset_of!(SgIoHdr, flags) == 44);
    assert!(offset_of!(SgIoHdr, pack_id) == 48);
    assert!(offset_of!(SgIoHdr, usr_ptr) == 56);
    assert!(offset_of!(SgIoHdr, status) == 64);
    assert!(offset_of!(SgIoHdr, masked_status) == 65);
    assert!(offset_of!(SgIoHdr, msg_status) == 66);
    assert!(offset_of!(SgIoHdr, sb_len_wr) == 67);
    assert!(offset_of!(SgIoHdr, host_status) == 68);
    assert!(offset_of!(SgIoHdr, driver_status) == 70);
    assert!(offset_of!(SgIoHdr, resid) == 72);
    assert!(offset_of!(SgIoHdr, duration) == 76);
    assert!(offset_of!(SgIoHdr, info) == 80);
};

// The 32-bit ABI (i386, arm): 4-byte pointers, no padding, size 64.
#[cfg(target_pointer_width = "32")]
const _: () = {
    assert!(size_of::<SgIoHdr>() == 64);
    assert!(offset_of!(SgIoHdr, dxferp) == 16);
    assert!(offset_of!(SgIoHdr, pack_id) == 36);
    assert!(offset_of!(SgIoHdr, usr_ptr) == 40);
    assert!(offset_of!(SgIoHdr, status) == 44);
    assert!(offset_of!(SgIoHdr, info) == 60);
};

/// The output half of an [`SgIoHdr`] after a completed `SG_IO`: plain
/// values, no pointers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgIoOutput {
    /// SCSI status byte.
    pub status: u8,
    /// `(status >> 1) & 0x7f`.
    pub masked_status: u8,
    /// Messaging-level status.
    pub msg_status: u8,
    /// Sense bytes written, as reported by the kernel (not yet clamped to
    /// the buffer).
    pub sb_len_wr: u8,
    /// `DID_*` host status.
    pub host_status: u16,
    /// `DRIVER_*` driver status.
    pub driver_status: u16,
    /// Residual byte count as reported (may be out of range on buggy
    /// drivers; clamp before use).
    pub resid: i32,
    /// Duration in milliseconds.
    pub duration_ms: u32,
    /// `SG_INFO_*` bits.
    pub info: u32,
}

fn invalid_input(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `ioctl(fd, SG_GET_VERSION_NUM, &mut version)`.
///
/// Fails with `ENOTTY` (or `EINVAL`) on anything that does not speak SG.
pub fn get_version_num(fd: BorrowedFd<'_>) -> io::Result<c_int> {
    let mut version: c_int = 0;
    // SAFETY: `fd` is a live descriptor for the duration of the call (the
    // BorrowedFd guarantees it). Request codes 0x22xx are reserved to
    // <scsi/sg.h> (Documentation/userspace-api/ioctl/ioctl-number.rst), so a
    // driver either implements SG_GET_VERSION_NUM, which stores exactly one
    // int through the pointer, or rejects it with ENOTTY/EINVAL. The pointer
    // is to a live, aligned, writable c_int on our stack.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            SG_GET_VERSION_NUM as libc::Ioctl,
            ptr::from_mut(&mut version),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(version)
}

/// Run one SCSI command synchronously with `SG_IO`.
///
/// `cdb` must be 1..=255 bytes and the data buffer at most `u32::MAX` bytes,
/// or this fails with `InvalidInput` before reaching the kernel. At most
/// `min(sense.len(), 255)` sense bytes are written. `timeout_ms == 0` asks
/// the kernel for its default timeout.
///
/// An `Ok` result means the ioctl itself succeeded; the command's SCSI,
/// host and driver status are in the returned [`SgIoOutput`].
pub fn sg_io(
    fd: BorrowedFd<'_>,
    cdb: &[u8],
    data: DataTransfer<'_>,
    sense: &mut [u8],
    timeout_ms: u32,
) -> io::Result<SgIoOutput> {
    let cmd_len =
        u8::try_from(cdb.len()).map_err(|_| invalid_input("CDB longer than 255 bytes"))?;
    if cmd_len == 0 {
        return Err(invalid_input("empty CDB"));
    }
    let (dxfer_direction, dxferp, dxfer_len): (c_int, *mut c_void, usize) = match data {
        DataTransfer::None => (SG_DXFER_NONE, ptr::null_mut(), 0),
        DataTransfer::FromDevice(buf) => (
            SG_DXFER_FROM_DEV,
            buf.as_mut_ptr().cast::<c_void>(),
            buf.len(),
        ),
        // The kernel only reads through `dxferp` for SG_DXFER_TO_DEV; the
        // header's field is `void *` regardless of direction.
        DataTransfer::ToDevice(buf) => (
            SG_DXFER_TO_DEV,
            buf.as_ptr().cast_mut().cast::<c_void>(),
            buf.len(),
        ),
    };
    let dxfer_len = c_uint::try_from(dxfer_len)
        .map_err(|_| invalid_input("data transfer longer than u32::MAX bytes"))?;
    let mx_sb_len = u8::try_from(sense.len()).unwrap_or(u8::MAX);

    let mut hdr = SgIoHdr {
        dxfer_direction,
        cmd_len,
        mx_sb_len,
        dxfer_len,
        dxferp,
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: timeout_ms,
        ..SgIoHdr::empty()
    };

    // SAFETY: `fd` is live for the call. 0x22xx request codes are reserved to
    // <scsi/sg.h>; a driver that does not implement SG_IO fails with ENOTTY
    // without touching memory. For SG_IO the kernel reads the header
    // (`hdr`, live and writable on our stack), reads `cmd_len` bytes at
    // `cmdp` (== cdb.len(), borrowed for the whole call), writes at most
    // `mx_sb_len` (<= sense.len()) bytes at `sbp` (exclusively borrowed),
    // and moves at most `dxfer_len` (== buffer length) bytes at `dxferp`:
    // written only for FROM_DEV, where the buffer is borrowed `&mut`, and
    // only read for TO_DEV/NONE. `iovec_count == 0` so `dxferp` is a flat
    // buffer, and `flags == 0` (no mmap or direct-I/O tricks). SG_IO is
    // synchronous: the kernel is done with every pointer when it returns,
    // so no access outlives these borrows.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            SG_IO as libc::Ioctl,
            ptr::from_mut(&mut hdr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SgIoOutput {
        status: hdr.status,
        masked_status: hdr.masked_status,
        msg_status: hdr.msg_status,
        sb_len_wr: hdr.sb_len_wr,
        host_status: hdr.host_status,
        driver_status: hdr.driver_status,
        resid: hdr.resid,
        duration_ms: hdr.duration,
        info: hdr.info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(host_status_name(DID_TIME_OUT), Some("DID_TIME_OUT"));
        assert_eq!(host_status_name(0xff), None);
        assert_eq!(driver_status_name(0x28), Some("DRIVER_SENSE"));
        assert_eq!(driver_status_name(DRIVER_TIMEOUT), Some("DRIVER_TIMEOUT"));
    }
}
