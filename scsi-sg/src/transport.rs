//! The transport seam: one trait that runs a CDB with a data transfer and
//! a timeout and reports the outcome, status and sense as data.
//!
//! [`crate::SgDevice`] implements it with `SG_IO`; the emulated target
//! ([`crate::emu`]) implements it in process. The typed commands of
//! [`crate::ScsiDevice`] and the shared conformance checks
//! ([`crate::conformance`]) are generic over it, so the same code runs on
//! both.

use std::path::Path;
use std::time::Duration;

use tracing::debug;

use crate::device::check_outcome;
use crate::{CommandOutcome, DataTransfer, Error};

/// Something that runs SCSI commands on one logical unit.
pub trait ScsiTransport {
    /// A name for the device in errors and logs (a device path, or
    /// `emu:<target>/<lun>`).
    fn path(&self) -> &Path;

    /// Run one command. Transport failures are errors; the SCSI status,
    /// including CHECK CONDITION with its sense, is data in the outcome.
    fn execute(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error>;

    /// Run one command and turn any failing status into an error (see
    /// [`crate::SgDevice::execute_checked`]).
    fn execute_checked(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        let outcome = self.execute(cdb, data, timeout)?;
        check_outcome(self.path(), outcome)
    }

    /// [`execute_checked`](Self::execute_checked), retried once after a
    /// UNIT ATTENTION (the command was not executed and the condition is
    /// now cleared).
    fn execute_checked_retrying_unit_attention(
        &self,
        cdb: &[u8],
        mut data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        match self.execute_checked(cdb, data.reborrow(), timeout) {
            Err(e) if e.is_unit_attention() => {
                debug!(path = %self.path().display(), error = %e, "retrying after UNIT ATTENTION");
                self.execute_checked(cdb, data, timeout)
            }
            other => other,
        }
    }
}

impl<T: ScsiTransport + ?Sized> ScsiTransport for &T {
    fn path(&self) -> &Path {
        (**self).path()
    }

    fn execute(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        (**self).execute(cdb, data, timeout)
    }
}
