//! An open SG device and synchronous command execution over `SG_IO`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, trace, warn};

use crate::cdb::{self, Command};
use crate::sense::{Sense, SenseKey};
use crate::status::ScsiStatus;
use crate::sys::{self, SENSE_BUFFER_LEN};
use crate::{Capacity16, Error, InquiryData, ParseError};

/// Timeout the typed helpers use unless [`SgDevice::set_timeout`] changes it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The data phase of a command and the buffer it uses.
#[derive(Debug)]
pub enum DataTransfer<'a> {
    /// No data phase (TEST UNIT READY, START STOP UNIT, ...).
    None,
    /// Data-in: the device writes into the buffer (READ, INQUIRY, ...).
    FromDevice(&'a mut [u8]),
    /// Data-out: the device reads from the buffer (WRITE, EXTENDED COPY
    /// parameter lists, ...).
    ToDevice(&'a [u8]),
}

impl DataTransfer<'_> {
    /// Length of the buffer (0 for `None`).
    pub fn len(&self) -> usize {
        match self {
            DataTransfer::None => 0,
            DataTransfer::FromDevice(b) => b.len(),
            DataTransfer::ToDevice(b) => b.len(),
        }
    }

    /// Whether no bytes are to move.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same buffer, borrowed again for one more submission.
    pub fn reborrow(&mut self) -> DataTransfer<'_> {
        match self {
            DataTransfer::None => DataTransfer::None,
            DataTransfer::FromDevice(b) => DataTransfer::FromDevice(b),
            DataTransfer::ToDevice(b) => DataTransfer::ToDevice(b),
        }
    }
}

/// What the kernel and the device said about one command that made it
/// through the transport. The SCSI status is data here: CHECK CONDITION is
/// an `Ok` outcome with sense bytes.
#[derive(Clone)]
pub struct CommandOutcome {
    /// The command that ran.
    pub command: Command,
    /// SCSI status.
    pub status: ScsiStatus,
    /// `host_status` (DID_OK for every outcome `execute` returns).
    pub host_status: u16,
    /// `driver_status`: DRIVER_OK, or DRIVER_SENSE with CHECK CONDITION.
    pub driver_status: u16,
    /// Residual as the kernel reported it: requested minus transferred.
    pub resid: i32,
    /// How long the command took, as measured by the kernel.
    pub duration: Duration,
    /// `SG_INFO_*` bits.
    pub info: u32,
    requested: usize,
    sense: [u8; SENSE_BUFFER_LEN],
    sense_len: u8,
}

impl CommandOutcome {
    /// An outcome as a transport other than SG_IO (the emulated target)
    /// reports it: status, bytes requested and moved, sense (at most
    /// [`SENSE_BUFFER_LEN`] bytes are kept).
    pub fn from_parts(
        command: Command,
        status: ScsiStatus,
        requested: usize,
        transferred: usize,
        sense: &[u8],
    ) -> CommandOutcome {
        let mut buf = [0u8; SENSE_BUFFER_LEN];
        let n = sense.len().min(SENSE_BUFFER_LEN);
        buf[..n].copy_from_slice(&sense[..n]);
        let resid = requested.saturating_sub(transferred);
        CommandOutcome {
            command,
            status,
            host_status: sys::DID_OK,
            driver_status: if n > 0 {
                sys::DRIVER_SENSE
            } else {
                sys::DRIVER_OK
            },
            resid: i32::try_from(resid).unwrap_or(i32::MAX),
            duration: Duration::ZERO,
            info: 0,
            requested,
            sense: buf,
            sense_len: u8::try_from(n).unwrap_or(u8::MAX),
        }
    }

    /// An outcome from the sg driver's output fields (after the transport
    /// checks: host and driver status are OK or DRIVER_SENSE).
    pub(crate) fn from_sg(
        command: Command,
        out: &sys::SgIoOutput,
        requested: usize,
        sense: &[u8; SENSE_BUFFER_LEN],
    ) -> CommandOutcome {
        CommandOutcome {
            command,
            status: ScsiStatus::from_byte(out.status),
            host_status: out.host_status,
            driver_status: out.driver_status,
            resid: out.resid,
            duration: Duration::from_millis(u64::from(out.duration_ms)),
            info: out.info,
            requested,
            sense: *sense,
            sense_len: out
                .sb_len_wr
                .min(u8::try_from(SENSE_BUFFER_LEN).unwrap_or(u8::MAX)),
        }
    }

    /// Bytes of data the command asked to move.
    pub fn requested(&self) -> usize {
        self.requested
    }

    /// Bytes actually moved: requested minus the residual, with a residual
    /// outside `0..=requested` (a driver bug) clamped.
    pub fn transferred(&self) -> usize {
        let resid = usize::try_from(self.resid).unwrap_or(0);
        self.requested.saturating_sub(resid)
    }

    /// The sense bytes the device returned (empty if none).
    pub fn sense_bytes(&self) -> &[u8] {
        let len = usize::from(self.sense_len).min(SENSE_BUFFER_LEN);
        self.sense.get(..len).unwrap_or(&[])
    }

    /// The sense data, decoded; `None` if there was none.
    pub fn sense(&self) -> Option<Result<Sense, ParseError>> {
        let bytes = self.sense_bytes();
        (!bytes.is_empty()).then(|| Sense::parse(bytes))
    }
}

impl fmt::Debug for CommandOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandOutcome")
            .field("command", &self.command)
            .field("status", &self.status)
            .field("host_status", &self.host_status)
            .field("driver_status", &self.driver_status)
            .field("resid", &self.resid)
            .field("duration", &self.duration)
            .field("info", &self.info)
            .field("requested", &self.requested)
            .field("sense", &self.sense_bytes())
            .finish()
    }
}

/// An open SCSI device reachable through `SG_IO`: `/dev/sgN` or a SCSI
/// block device such as `/dev/sdX`.
///
/// Commands run synchronously: [`execute`](Self::execute) returns when the
/// device has completed the command or the kernel has given up on it.
#[derive(Debug)]
pub struct SgDevice {
    file: File,
    path: PathBuf,
    sg_version: u32,
    timeout: Duration,
}

fn map_open_error(path: &Path, source: io::Error) -> Error {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => Error::NoSuchDevice { path },
        Some(libc::EACCES | libc::EPERM) => Error::Permission { path },
        _ => Error::Open { path, source },
    }
}

impl SgDevice {
    /// Open a device read-write (what every command, including writes and
    /// EXTENDED COPY, needs on `/dev/sdX`).
    ///
    /// The file is opened `O_RDWR | O_NONBLOCK | O_CLOEXEC`: `O_NONBLOCK`
    /// keeps `open` from waiting for media or an exclusive holder; `SG_IO`
    /// is synchronous regardless.
    pub fn open(path: impl AsRef<Path>) -> Result<SgDevice, Error> {
        Self::open_with(path.as_ref(), true)
    }

    /// Open a device read-only. The kernel then lets through only commands
    /// that cannot modify the medium (INQUIRY, READ CAPACITY, READ, ...);
    /// enough for probing, and it works for unprivileged users who may read
    /// but not write the device node.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<SgDevice, Error> {
        Self::open_with(path.as_ref(), false)
    }

    fn open_with(path: &Path, write: bool) -> Result<SgDevice, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| map_open_error(path, e))?;
        let version = sys::get_version_num(file.as_fd()).map_err(|source| {
            debug!(path = %path.display(), error = %source, "SG_GET_VERSION_NUM failed");
            Error::NotSgCapable {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let sg_version = match u32::try_from(version) {
            Ok(v) if version >= sys::SG_MIN_V3_VERSION => v,
            _ => {
                return Err(Error::NotSgCapable {
                    path: path.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("sg driver version {version} predates the v3 interface (30000)"),
                    ),
                });
            }
        };
        debug!(path = %path.display(), sg_version, write, "opened SG device");
        Ok(SgDevice {
            file,
            path: path.to_path_buf(),
            sg_version,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sg driver version (`SG_GET_VERSION_NUM`), e.g. 30536.
    pub fn sg_version(&self) -> u32 {
        self.sg_version
    }

    /// Timeout used by the typed helpers ([`DEFAULT_TIMEOUT`] initially).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Change the timeout used by the typed helpers.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Run one command and report what happened.
    ///
    /// Transport failures are errors: the ioctl failing, a timeout, a
    /// non-zero `host_status`, or a `driver_status` other than DRIVER_OK /
    /// DRIVER_SENSE. The SCSI status, including CHECK CONDITION and its
    /// sense bytes, is returned as data in [`CommandOutcome`].
    ///
    /// `timeout` is rounded up to whole milliseconds and saturates at
    /// `u32::MAX` ms; `Duration::ZERO` selects the kernel's default.
    pub fn execute(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        let command = Command::from_cdb(cdb);
        if cdb.is_empty() || cdb.len() > usize::from(u8::MAX) {
            return Err(Error::InvalidCdb {
                path: self.path.clone(),
                command,
                len: cdb.len(),
            });
        }
        let requested = data.len();
        if u32::try_from(requested).is_err() {
            return Err(Error::TransferTooLarge {
                path: self.path.clone(),
                command,
                len: requested,
            });
        }
        let timeout_ms = timeout_millis(timeout);
        let mut sense = [0u8; SENSE_BUFFER_LEN];

        let out = sys::sg_io(self.file.as_fd(), cdb, data, &mut sense, timeout_ms).map_err(
            |source| {
                debug!(path = %self.path.display(), %command, error = %source, "SG_IO ioctl failed");
                Error::Io {
                    path: self.path.clone(),
                    command,
                    source,
                }
            },
        )?;
        trace!(
            path = %self.path.display(),
            %command,
            status = out.status,
            host_status = out.host_status,
            driver_status = out.driver_status,
            resid = out.resid,
            duration_ms = out.duration_ms,
            "SG_IO completed"
        );

        let driver_code = out.driver_status & sys::DRIVER_STATUS_MASK;
        if out.host_status == sys::DID_TIME_OUT || driver_code == sys::DRIVER_TIMEOUT {
            debug!(path = %self.path.display(), %command, ?timeout, "command timed out");
            return Err(Error::Timeout {
                path: self.path.clone(),
                command,
                timeout,
            });
        }
        if out.host_status != sys::DID_OK {
            debug!(path = %self.path.display(), %command, host_status = out.host_status, "host status");
            return Err(Error::HostStatus {
                path: self.path.clone(),
                command,
                host_status: out.host_status,
            });
        }
        if driver_code != sys::DRIVER_OK && driver_code != sys::DRIVER_SENSE {
            debug!(path = %self.path.display(), %command, driver_status = out.driver_status, "driver status");
            return Err(Error::DriverStatus {
                path: self.path.clone(),
                command,
                driver_status: out.driver_status,
            });
        }
        if out.resid < 0 || usize::try_from(out.resid).is_ok_and(|r| r > requested) {
            warn!(
                path = %self.path.display(), %command, resid = out.resid, requested,
                "residual out of range; clamping"
            );
        }

        let sense_len = out
            .sb_len_wr
            .min(u8::try_from(SENSE_BUFFER_LEN).unwrap_or(u8::MAX));
        Ok(CommandOutcome {
            command,
            status: ScsiStatus::from_byte(out.status),
            host_status: out.host_status,
            driver_status: out.driver_status,
            resid: out.resid,
            duration: Duration::from_millis(u64::from(out.duration_ms)),
            info: out.info,
            requested,
            sense,
            sense_len,
        })
    }

    /// Run one command and turn any status but success into an error: the
    /// building block of the typed commands.
    ///
    /// GOOD and CONDITION MET succeed. CHECK CONDITION with sense key
    /// RECOVERED ERROR, NO SENSE or COMPLETED also succeeds (the command
    /// did its work; the outcome still carries the sense), as sg3_utils
    /// treats them. Any other CHECK CONDITION becomes
    /// [`Error::CheckCondition`]; other statuses, and CHECK CONDITION
    /// without decodable sense, become [`Error::Status`].
    pub fn execute_checked(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        let outcome = self.execute(cdb, data, timeout)?;
        check_outcome(&self.path, outcome)
    }

    /// [`execute_checked`](Self::execute_checked), retried once when the
    /// device answers UNIT ATTENTION. A unit attention (after a reset, a
    /// capacity change, a LUN inventory change) means the command was not
    /// executed and the condition is now cleared, so the retry is safe; a
    /// second one in a row is returned as the error.
    pub fn execute_checked_retrying_unit_attention(
        &self,
        cdb: &[u8],
        mut data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        match self.execute_checked(cdb, data.reborrow(), timeout) {
            Err(e) if e.is_unit_attention() => {
                debug!(path = %self.path.display(), error = %e, "retrying after UNIT ATTENTION");
                self.execute_checked(cdb, data, timeout)
            }
            other => other,
        }
    }

    /// INQUIRY for the standard data (36-byte allocation, as sg_inq and the
    /// Linux SCSI scan use first).
    pub fn inquiry(&self) -> Result<InquiryData, Error> {
        let cdb = cdb::inquiry(false, 0, cdb::STANDARD_INQUIRY_LEN);
        let mut buf = [0u8; cdb::STANDARD_INQUIRY_LEN as usize];
        let outcome = self.execute_checked_retrying_unit_attention(
            &cdb,
            DataTransfer::FromDevice(&mut buf),
            self.timeout,
        )?;
        let got = buf.get(..outcome.transferred()).unwrap_or(&[]);
        InquiryData::parse(got).map_err(|source| Error::Parse {
            path: self.path.clone(),
            command: outcome.command,
            source,
        })
    }

    /// READ CAPACITY(16).
    pub fn read_capacity16(&self) -> Result<Capacity16, Error> {
        let cdb = cdb::read_capacity16(cdb::READ_CAPACITY_16_LEN);
        let mut buf = [0u8; Capacity16::LEN];
        let outcome = self.execute_checked_retrying_unit_attention(
            &cdb,
            DataTransfer::FromDevice(&mut buf),
            self.timeout,
        )?;
        let got = buf.get(..outcome.transferred()).unwrap_or(&[]);
        Capacity16::parse(got).map_err(|source| Error::Parse {
            path: self.path.clone(),
            command: outcome.command,
            source,
        })
    }

    /// TEST UNIT READY: `Ok(())` when the logical unit can accept medium
    /// access commands; NOT READY, or UNIT ATTENTION, come back as
    /// [`Error::CheckCondition`]. Unlike the data commands it does not
    /// retry a unit attention: reporting it is its job.
    pub fn test_unit_ready(&self) -> Result<(), Error> {
        self.execute_checked(&cdb::test_unit_ready(), DataTransfer::None, self.timeout)
            .map(drop)
    }
}

/// Turn an outcome whose status is not success into an error, as
/// [`SgDevice::execute_checked`] documents: GOOD, CONDITION MET and CHECK
/// CONDITION with RECOVERED ERROR / NO SENSE / COMPLETED pass; any other
/// CHECK CONDITION is [`Error::CheckCondition`]; other statuses, and CHECK
/// CONDITION without decodable sense, are [`Error::Status`].
pub fn check_outcome(path: &Path, outcome: CommandOutcome) -> Result<CommandOutcome, Error> {
    match outcome.status {
        ScsiStatus::Good | ScsiStatus::ConditionMet => Ok(outcome),
        ScsiStatus::CheckCondition => match outcome.sense() {
            Some(Ok(sense)) => match sense.key {
                SenseKey::RecoveredError | SenseKey::NoSense | SenseKey::Completed => {
                    debug!(path = %path.display(), command = %outcome.command, %sense,
                        "command completed with informational sense");
                    Ok(outcome)
                }
                _ => {
                    debug!(path = %path.display(), command = %outcome.command, %sense,
                        "CHECK CONDITION");
                    Err(Error::CheckCondition {
                        path: path.to_path_buf(),
                        command: outcome.command,
                        sense,
                    })
                }
            },
            other => {
                warn!(path = %path.display(), command = %outcome.command,
                    sense = ?outcome.sense_bytes(), error = ?other.and_then(Result::err),
                    "CHECK CONDITION without usable sense data");
                Err(Error::Status {
                    path: path.to_path_buf(),
                    command: outcome.command,
                    status: outcome.status,
                })
            }
        },
        status => Err(Error::Status {
            path: path.to_path_buf(),
            command: outcome.command,
            status,
        }),
    }
}

impl crate::transport::ScsiTransport for SgDevice {
    fn path(&self) -> &Path {
        &self.path
    }

    fn execute(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        SgDevice::execute(self, cdb, data, timeout)
    }
}

impl AsFd for SgDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Duration to the header's millisecond timeout: rounded up so a short
/// non-zero timeout never becomes 0 (= kernel default), saturating.
pub(crate) fn timeout_millis(timeout: Duration) -> u32 {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_rounding() {
        assert_eq!(timeout_millis(Duration::ZERO), 0);
        assert_eq!(timeout_millis(Duration::from_nanos(1)), 1);
        assert_eq!(timeout_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(timeout_millis(DEFAULT_TIMEOUT), 30_000);
        assert_eq!(timeout_millis(Duration::MAX), u32::MAX);
    }

    fn outcome(resid: i32, requested: usize) -> CommandOutcome {
        CommandOutcome {
            command: Command::new(cdb::INQUIRY),
            status: ScsiStatus::Good,
            host_status: 0,
            driver_status: 0,
            resid,
            duration: Duration::ZERO,
            info: 0,
            requested,
            sense: [0; SENSE_BUFFER_LEN],
            sense_len: 0,
        }
    }

    #[test]
    fn transferred_clamps_residual() {
        assert_eq!(outcome(0, 36).transferred(), 36);
        assert_eq!(outcome(4, 36).transferred(), 32);
        assert_eq!(outcome(100, 36).transferred(), 0);
        assert_eq!(outcome(-5, 36).transferred(), 36);
        assert!(outcome(0, 36).sense().is_none());
    }

    #[test]
    fn sense_bytes_bounded() {
        let mut o = outcome(0, 0);
        o.sense[..3].copy_from_slice(&[0x70, 0, 0x06]);
        o.sense_len = 3;
        assert_eq!(o.sense_bytes(), &[0x70, 0, 0x06]);
        assert_eq!(o.sense().unwrap().unwrap().key, SenseKey::UnitAttention);
        o.sense_len = u8::MAX;
        assert_eq!(o.sense_bytes().len(), SENSE_BUFFER_LEN);
    }
}
