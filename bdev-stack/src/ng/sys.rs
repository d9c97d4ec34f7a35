//! The kernel's NVMe passthrough interface (`include/uapi/linux/nvme_ioctl.h`):
//! the command layout shared by the admin ioctl and `IORING_OP_URING_CMD`,
//! the ioctl numbers, and how completions report NVMe status.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use nvme::NvmeStatus;
use nvme::spec::SubmissionEntry;
use zerocopy::{Immutable, IntoBytes, KnownLayout};

/// `NVME_IOCTL_ID`: the namespace id of the node.
pub(super) const NVME_IOCTL_ID: libc::c_ulong = 0x4E40;
/// `NVME_IOCTL_ADMIN_CMD` (`struct nvme_passthru_cmd`).
pub(super) const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xC048_4E41;
/// `NVME_URING_CMD_IO` (`struct nvme_uring_cmd` in the SQE's command area).
pub(super) const NVME_URING_CMD_IO: u32 = 0xC048_4E80;

/// `struct nvme_passthru_cmd` / `struct nvme_uring_cmd`: 72 bytes, one
/// layout (the last word is the admin ioctl's result, reserved in the
/// io_uring form, whose result comes in the big CQE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable, KnownLayout)]
pub(super) struct PassthruCmd {
    pub opcode: u8,
    pub flags: u8,
    pub rsvd1: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub metadata: u64,
    pub addr: u64,
    pub metadata_len: u32,
    pub data_len: u32,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
    pub timeout_ms: u32,
    pub result: u32,
}

const _: () = {
    assert!(size_of::<PassthruCmd>() == 72);
    assert!(std::mem::offset_of!(PassthruCmd, addr) == 24);
    assert!(std::mem::offset_of!(PassthruCmd, data_len) == 36);
    assert!(std::mem::offset_of!(PassthruCmd, cdw10) == 40);
    assert!(std::mem::offset_of!(PassthruCmd, timeout_ms) == 64);
};

impl PassthruCmd {
    /// The command `sqe` (built by `nvme::cmd`) with its data at `addr`,
    /// `data_len` bytes of host memory: the kernel builds the PRPs.
    pub(super) fn from_sqe(sqe: &SubmissionEntry, addr: u64, data_len: u32) -> PassthruCmd {
        PassthruCmd {
            opcode: sqe.opc,
            flags: 0,
            rsvd1: 0,
            nsid: sqe.nsid.get(),
            cdw2: sqe.cdw2.get(),
            cdw3: sqe.cdw3.get(),
            metadata: 0,
            addr,
            metadata_len: 0,
            data_len,
            cdw10: sqe.cdw10.get(),
            cdw11: sqe.cdw11.get(),
            cdw12: sqe.cdw12.get(),
            cdw13: sqe.cdw13.get(),
            cdw14: sqe.cdw14.get(),
            cdw15: sqe.cdw15.get(),
            // The kernel's default (nvme_core.io_timeout), with its Abort
            // and reset behind it.
            timeout_ms: 0,
            result: 0,
        }
    }

    /// The 80-byte command area of a 128-byte SQE.
    pub(super) fn uring_cmd(&self) -> [u8; 80] {
        let mut area = [0u8; 80];
        area[..72].copy_from_slice(self.as_bytes());
        area
    }

    /// The `IORING_OP_URING_CMD` entry carrying this command to the node
    /// `fd`, with `user_data`; `fixed`: the registered buffer its data
    /// lies in.
    pub(super) fn entry(&self, fd: RawFd, fixed: Option<u16>, user_data: u64) -> squeue::Entry128 {
        opcode::UringCmd80::new(types::Fd(fd), NVME_URING_CMD_IO)
            .cmd(self.uring_cmd())
            .buf_index(fixed)
            .build()
            .user_data(user_data)
    }
}

/// How the kernel completed a passthrough command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Success.
    Done,
    /// The device completed it with an error status.
    Status(NvmeStatus),
    /// The kernel failed it (refused before the device saw it, or
    /// cancelled by a reset: `EINTR`).
    Errno(i32),
}

/// Decodes a completion's result: 0, an NVMe status (the completion's
/// status field shifted right by one), or a negative errno.
pub(super) fn outcome(result: i32) -> Outcome {
    match result {
        0 => Outcome::Done,
        r if r > 0 => Outcome::Status(NvmeStatus::from_field((r as u16) << 1)),
        r => Outcome::Errno(-r),
    }
}

/// The NVMe driver's error for a passthrough completion that failed: the
/// device's status, or what the kernel's errno stands for.
pub(super) fn io_error(outcome: Outcome) -> Option<nvme::IoError> {
    match outcome {
        Outcome::Done => None,
        Outcome::Status(s) => Some(nvme::IoError::Status(s)),
        // Cancelled by a controller reset (after a timeout): the device no
        // longer has it, it may have executed.
        Outcome::Errno(libc::EINTR) => Some(nvme::IoError::Aborted),
        Outcome::Errno(libc::ETIMEDOUT) => Some(nvme::IoError::Timeout),
        Outcome::Errno(libc::ENODEV) => Some(nvme::IoError::Removed),
        // Refused before the device saw it (EINVAL for a namespace id other
        // than the node's, EACCES without the capability), or failed by
        // the kernel: kept as the errno, not guessed into a status.
        Outcome::Errno(errno) => Some(nvme::IoError::Os { errno }),
    }
}

/// Runs an admin command through the node's ioctl, with `data` as its
/// buffer (either direction); returns DW0.
pub(super) fn admin(fd: RawFd, sqe: &SubmissionEntry, data: &mut [u8]) -> Result<u32, AdminError> {
    let mut cmd = PassthruCmd::from_sqe(
        sqe,
        data.as_mut_ptr() as u64,
        u32::try_from(data.len()).unwrap_or(u32::MAX),
    );
    // SAFETY: `cmd` is a valid `nvme_passthru_cmd` naming `data`, which
    // outlives the call; the ioctl completes before it returns.
    let rc = unsafe { libc::ioctl(fd, NVME_IOCTL_ADMIN_CMD as _, &mut cmd as *mut PassthruCmd) };
    match outcome(if rc < 0 { -errno() } else { rc }) {
        Outcome::Done => Ok(cmd.result),
        Outcome::Status(s) => Err(AdminError::Status(s)),
        Outcome::Errno(e) => Err(AdminError::Os(io::Error::from_raw_os_error(e))),
    }
}

/// The namespace id of an NVMe node, or the OS error (ENOTTY: not an NVMe
/// node).
pub(super) fn namespace_id(fd: RawFd) -> io::Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument.
    let rc = unsafe { libc::ioctl(fd, NVME_IOCTL_ID as _) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as u32)
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// A failed admin passthrough.
#[derive(Debug)]
pub(super) enum AdminError {
    /// The controller's status.
    Status(NvmeStatus),
    /// The kernel refused it.
    Os(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme::cmd::{Copy, Prps, Read};

    #[test]
    fn commands_carry_the_builders_dwords() {
        let sqe = Read::new(3, 0x1_0000_0002, 8).build(Prps::NONE);
        let cmd = PassthruCmd::from_sqe(&sqe, 0xdead_b000, 4096);
        assert_eq!((cmd.opcode, cmd.nsid), (0x02, 3));
        assert_eq!((cmd.cdw10, cmd.cdw11, cmd.cdw12), (2, 1, 7));
        let area = cmd.uring_cmd();
        assert_eq!(area[0], 0x02);
        assert_eq!(&area[24..32], &0xdead_b000u64.to_le_bytes());
        assert_eq!(&area[36..40], &4096u32.to_le_bytes());
        let copy = Copy::new(1, 100, 3).build(Prps::NONE);
        let cmd = PassthruCmd::from_sqe(&copy, 0, 96);
        assert_eq!(cmd.opcode, 0x19);
        assert_eq!(cmd.cdw12 & 0xff, 2, "0's based range count");
    }

    #[test]
    fn completion_results_decode() {
        assert_eq!(outcome(0), Outcome::Done);
        // LBA Out of Range with DNR: SC 0x80, SCT 0, DNR bit 14.
        let Outcome::Status(s) = outcome(0x4080) else {
            panic!("status");
        };
        assert!(s.same_code(NvmeStatus::LBA_OUT_OF_RANGE) && s.dnr);
        // Command Size Limit Exceeded: SCT 1, SC 0x83.
        let Outcome::Status(s) = outcome(0x183) else {
            panic!("status");
        };
        assert!(s.same_code(NvmeStatus::CMD_SIZE_LIMIT));
        assert_eq!(outcome(-libc::EINTR), Outcome::Errno(libc::EINTR));
    }

    #[test]
    fn kernel_errors_map_to_typed_io_errors() {
        use nvme::IoError;
        assert_eq!(io_error(outcome(0)), None);
        assert_eq!(
            io_error(outcome(0x4080)).and_then(|e| e.status()),
            Some(NvmeStatus::from_field(0x4080 << 1))
        );
        assert_eq!(io_error(outcome(-libc::EINTR)), Some(IoError::Aborted));
        assert_eq!(io_error(outcome(-libc::ETIMEDOUT)), Some(IoError::Timeout));
        assert_eq!(io_error(outcome(-libc::ENODEV)), Some(IoError::Removed));
        // A refusal stays the kernel's: no made-up NVMe status.
        let refused = io_error(outcome(-libc::EINVAL));
        assert_eq!(
            refused,
            Some(IoError::Os {
                errno: libc::EINVAL
            })
        );
        assert_eq!(refused.and_then(|e| e.status()), None);
    }
}
