//! SCSI over the Linux SG_IO interface.
//!
//! # Architecture
//!
//! The crate is layered from the wire up; each layer depends only on the
//! ones below it:
//!
//! - [`sys`] — the Linux SG v3 ABI: `struct sg_io_hdr` (layout checked at
//!   compile time), the `SG_*`/`DID_*`/`DRIVER_*` constants, and safe
//!   wrappers around the `SG_IO` and `SG_GET_VERSION_NUM` ioctls. All of
//!   the crate's `unsafe` lives here.
//! - [`cdb`] — command descriptor blocks: opcode and service-action
//!   constants, [`cdb::Command`] (which command a CDB is, by name), and
//!   builders returning fixed-size arrays.
//! - Parsers of device-provided bytes — [`InquiryData`], [`Capacity16`],
//!   [`Sense`] — and [`ScsiStatus`]. Device bytes are untrusted: every
//!   parser is length-checked and returns [`ParseError`] rather than
//!   panicking.
//! - [`SgDevice`] — an open `/dev/sgN` or `/dev/sdX`.
//!   [`SgDevice::execute`] runs any CDB and reports the SCSI status and
//!   sense as data ([`CommandOutcome`]); transport failures (ioctl errors,
//!   timeouts, host and driver status) are typed [`Error`]s.
//!   [`SgDevice::execute_checked`] additionally turns CHECK CONDITION and
//!   other failing statuses into errors; the typed commands
//!   ([`SgDevice::inquiry`], [`SgDevice::read_capacity16`],
//!   [`SgDevice::test_unit_ready`]) are built on it.
//!
//! Later layers (VPD pages, READ/WRITE, EXTENDED COPY, ROD tokens, the
//! queued asynchronous path and the in-process emulated target) build on
//! the same CDB builders, parsers and error type.
//!
//! # Example
//!
//! ```no_run
//! use scsi_sg::SgDevice;
//!
//! # fn main() -> Result<(), scsi_sg::Error> {
//! let dev = SgDevice::open("/dev/sg0")?;
//! let inq = dev.inquiry()?;
//! let cap = dev.read_capacity16()?;
//! tracing::info!(
//!     vendor = %inq.vendor,
//!     product = %inq.product,
//!     blocks = ?cap.block_count(),
//!     block_len = cap.logical_block_length,
//!     "probed"
//! );
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod capacity;
pub mod cdb;
mod device;
mod error;
pub mod inquiry;
pub mod sense;
pub mod status;
pub mod sys;

pub use capacity::Capacity16;
pub use device::{CommandOutcome, DEFAULT_TIMEOUT, DataTransfer, SgDevice};
pub use error::{Error, ParseError};
pub use inquiry::InquiryData;
pub use sense::{Sense, SenseKey};
pub use status::ScsiStatus;
