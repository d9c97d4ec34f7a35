//! The crate's error types.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cdb::Command;
use crate::sense::{Sense, SenseKey};
use crate::status::ScsiStatus;
use crate::sys;

/// Device-provided bytes that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: need {needed} bytes, got {available}")]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Bytes required.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A VPD page other than the one asked for.
    #[error("{what}: expected page {expected:#04x}, got {got:#04x}")]
    WrongPage {
        /// What was being parsed.
        what: &'static str,
        /// The page code asked for.
        expected: u8,
        /// The page code received.
        got: u8,
    },
    /// A field holds a value the structure does not allow.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being parsed.
        what: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
    /// Sense data with a response code other than 0x70..=0x73.
    #[error("sense data: unsupported response code {response_code:#04x}")]
    UnsupportedSenseFormat {
        /// The RESPONSE CODE field (byte 0, bits 6..0).
        response_code: u8,
    },
}

/// `host_status` for messages: the DID_* name when known.
fn host_name(host_status: u16) -> String {
    match sys::host_status_name(host_status) {
        Some(name) => format!("{name} ({host_status:#04x})"),
        None => format!("{host_status:#04x}"),
    }
}

/// `driver_status` for messages: the DRIVER_* name when known.
fn driver_name(driver_status: u16) -> String {
    match sys::driver_status_name(driver_status) {
        Some(name) => format!("{name} ({driver_status:#04x})"),
        None => format!("{driver_status:#04x}"),
    }
}

/// Everything that can go wrong opening an SG device or running a command.
/// Each variant names the device path and, for commands, which command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The path does not exist or no device answers behind it (ENOENT,
    /// ENXIO, ENODEV).
    #[error("{path}: no such device")]
    NoSuchDevice {
        /// Device path.
        path: PathBuf,
    },
    /// EACCES or EPERM opening the device.
    #[error("{path}: permission denied")]
    Permission {
        /// Device path.
        path: PathBuf,
    },
    /// The file opened but does not speak SG v3 (`SG_GET_VERSION_NUM`
    /// failed, or reported a version below 3.0).
    #[error("{path}: not an SG_IO-capable device")]
    NotSgCapable {
        /// Device path.
        path: PathBuf,
        /// Why: the ioctl's error, or the too-old version.
        #[source]
        source: io::Error,
    },
    /// Any other failure of `open(2)`.
    #[error("{path}: cannot open")]
    Open {
        /// Device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A CDB the SG v3 header cannot carry (empty, or over 255 bytes).
    #[error("{path}: {command}: invalid CDB length {len}")]
    InvalidCdb {
        /// Device path.
        path: PathBuf,
        /// The command (as far as the CDB names one).
        command: Command,
        /// CDB length given.
        len: usize,
    },
    /// A data buffer larger than the SG v3 header can describe (u32).
    #[error("{path}: {command}: data transfer of {len} bytes is too large for SG_IO")]
    TransferTooLarge {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// Buffer length given.
        len: usize,
    },
    /// The `SG_IO` ioctl itself failed (EINVAL, ENOMEM, EIO, EINTR, ...):
    /// the command may or may not have reached the device.
    #[error("{path}: {command}: SG_IO failed")]
    Io {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The command did not complete within its timeout (DID_TIME_OUT or
    /// DRIVER_TIMEOUT); the kernel has aborted it.
    #[error("{path}: {command}: timed out after {timeout:?}")]
    Timeout {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The host adapter or transport failed the command (`host_status`
    /// other than DID_OK and DID_TIME_OUT).
    #[error("{path}: {command}: transport failure, host status {}", host_name(*.host_status))]
    HostStatus {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// The DID_* code.
        host_status: u16,
    },
    /// The Linux driver layer failed the command (`driver_status` other
    /// than DRIVER_OK, DRIVER_SENSE and DRIVER_TIMEOUT).
    #[error("{path}: {command}: driver failure, driver status {}", driver_name(*.driver_status))]
    DriverStatus {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// The DRIVER_* code (with SUGGEST_* bits as received).
        driver_status: u16,
    },
    /// The device returned CHECK CONDITION with sense data (from the typed
    /// helpers; [`crate::SgDevice::execute`] reports status as data).
    #[error("{path}: {command}: CHECK CONDITION: {sense}")]
    CheckCondition {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// The decoded sense data.
        sense: Sense,
    },
    /// The device returned a status other than GOOD/CONDITION MET that
    /// carries no usable sense: BUSY, RESERVATION CONFLICT, TASK SET FULL,
    /// ..., or CHECK CONDITION whose sense was missing or undecodable.
    #[error("{path}: {command}: {status}")]
    Status {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// The status.
        status: ScsiStatus,
    },
    /// The logical unit is not a connected direct-access block device.
    #[error(
        "{path}: not a direct-access block device (qualifier {peripheral_qualifier}, type {device_type:#04x})"
    )]
    NotDirectAccess {
        /// Device path.
        path: PathBuf,
        /// PERIPHERAL QUALIFIER.
        peripheral_qualifier: u8,
        /// PERIPHERAL DEVICE TYPE.
        device_type: u8,
    },
    /// Reading completions from, or waiting on, an sg queue failed.
    #[error("{path}: sg queue I/O failed")]
    QueueIo {
        /// Device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The device does not offer a feature (as probed), so no command was
    /// sent.
    #[error("{path}: {what} not supported by the device")]
    Unsupported {
        /// Device path.
        path: PathBuf,
        /// The feature.
        what: &'static str,
    },
    /// A request the library refused before sending it: the range runs
    /// past the capacity, the buffer is not whole blocks, a count does not
    /// fit the CDB.
    #[error("{path}: {command}: invalid request for LBA {lba} + {blocks} blocks: {reason}")]
    InvalidRequest {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// First LBA.
        lba: u64,
        /// Block count.
        blocks: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The copy manager refused a ROD token (ILLEGAL REQUEST, INVALID
    /// TOKEN OPERATION): it expired, was revoked because its source was
    /// written, was deleted, ... No data was moved.
    #[error("{path}: {command}: ROD token refused ({problem:?}): {sense}")]
    Token {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// Why.
        problem: TokenProblem,
        /// The sense data.
        sense: Sense,
    },
    /// The command succeeded but its data could not be decoded (too short
    /// after the residual, or malformed).
    #[error("{path}: {command}: bad response data")]
    Parse {
        /// Device path.
        path: PathBuf,
        /// The command.
        command: Command,
        /// What was wrong.
        #[source]
        source: ParseError,
    },
}

/// Why a copy manager refused a ROD token (ASC 0x23, INVALID TOKEN
/// OPERATION, by ASCQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenProblem {
    /// 0x23/0x00: cause not reportable.
    NotReportable,
    /// 0x23/0x01: unsupported token type.
    UnsupportedType,
    /// 0x23/0x02, 0x03: remote token usage or creation not supported.
    RemoteNotSupported,
    /// 0x23/0x04: token unknown.
    Unknown,
    /// 0x23/0x05: token corrupt.
    Corrupt,
    /// 0x23/0x06: token revoked (e.g. its source was written).
    Revoked,
    /// 0x23/0x07: token expired (inactivity timeout).
    Expired,
    /// 0x23/0x08: token cancelled.
    Cancelled,
    /// 0x23/0x09: token deleted.
    Deleted,
    /// 0x23/0x0A: invalid token length.
    InvalidLength,
    /// Any other ASCQ under ASC 0x23.
    Other(u8),
}

impl TokenProblem {
    /// The problem a sense reports, if it is an INVALID TOKEN OPERATION.
    pub fn from_sense(sense: &Sense) -> Option<TokenProblem> {
        (sense.asc == 0x23).then_some(match sense.ascq {
            0x00 => TokenProblem::NotReportable,
            0x01 => TokenProblem::UnsupportedType,
            0x02 | 0x03 => TokenProblem::RemoteNotSupported,
            0x04 => TokenProblem::Unknown,
            0x05 => TokenProblem::Corrupt,
            0x06 => TokenProblem::Revoked,
            0x07 => TokenProblem::Expired,
            0x08 => TokenProblem::Cancelled,
            0x09 => TokenProblem::Deleted,
            0x0a => TokenProblem::InvalidLength,
            q => TokenProblem::Other(q),
        })
    }
}

impl Error {
    /// The device path the error concerns.
    pub fn path(&self) -> &Path {
        match self {
            Error::NoSuchDevice { path }
            | Error::Permission { path }
            | Error::NotSgCapable { path, .. }
            | Error::Open { path, .. }
            | Error::InvalidCdb { path, .. }
            | Error::TransferTooLarge { path, .. }
            | Error::Io { path, .. }
            | Error::Timeout { path, .. }
            | Error::HostStatus { path, .. }
            | Error::DriverStatus { path, .. }
            | Error::CheckCondition { path, .. }
            | Error::Status { path, .. }
            | Error::Parse { path, .. }
            | Error::NotDirectAccess { path, .. }
            | Error::Unsupported { path, .. }
            | Error::InvalidRequest { path, .. }
            | Error::Token { path, .. }
            | Error::QueueIo { path, .. } => path,
        }
    }

    /// The command the error concerns, if it came from running one.
    pub fn command(&self) -> Option<Command> {
        match self {
            Error::NoSuchDevice { .. }
            | Error::Permission { .. }
            | Error::NotSgCapable { .. }
            | Error::Open { .. }
            | Error::NotDirectAccess { .. }
            | Error::Unsupported { .. }
            | Error::QueueIo { .. } => None,
            Error::InvalidCdb { command, .. }
            | Error::TransferTooLarge { command, .. }
            | Error::Io { command, .. }
            | Error::Timeout { command, .. }
            | Error::HostStatus { command, .. }
            | Error::DriverStatus { command, .. }
            | Error::CheckCondition { command, .. }
            | Error::Status { command, .. }
            | Error::Parse { command, .. }
            | Error::InvalidRequest { command, .. }
            | Error::Token { command, .. } => Some(*command),
        }
    }

    /// The sense data, for [`Error::CheckCondition`].
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            Error::CheckCondition { sense, .. } | Error::Token { sense, .. } => Some(sense),
            _ => None,
        }
    }

    /// CHECK CONDITION with UNIT ATTENTION: the device reports an event
    /// (reset, capacity or parameter change) instead of running the
    /// command; the caller usually retries once it has taken note.
    pub fn is_unit_attention(&self) -> bool {
        self.sense()
            .is_some_and(|s| s.key == SenseKey::UnitAttention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdb;

    #[test]
    fn messages_name_device_and_command() {
        let err = Error::CheckCondition {
            path: PathBuf::from("/dev/sg1"),
            command: Command::from_cdb(&cdb::read_capacity16(32)),
            sense: Sense::new(SenseKey::IllegalRequest, 0x24, 0x00),
        };
        assert_eq!(
            err.to_string(),
            "/dev/sg1: READ CAPACITY(16) [0x9e/0x10]: CHECK CONDITION: \
             ILLEGAL REQUEST: INVALID FIELD IN CDB (0x24/0x00)"
        );
        assert!(!err.is_unit_attention());
        assert_eq!(err.sense().map(|s| s.asc), Some(0x24));

        let err = Error::HostStatus {
            path: PathBuf::from("/dev/sda"),
            command: Command::new(cdb::INQUIRY),
            host_status: sys::DID_NO_CONNECT,
        };
        assert_eq!(
            err.to_string(),
            "/dev/sda: INQUIRY [0x12]: transport failure, host status DID_NO_CONNECT (0x01)"
        );
        assert_eq!(err.command(), Some(Command::new(cdb::INQUIRY)));
    }

    #[test]
    fn error_stays_small() {
        // Keeps Result<_, Error> cheap (and clippy's result_large_err quiet).
        assert!(size_of::<Error>() <= 128, "{}", size_of::<Error>());
    }
}
