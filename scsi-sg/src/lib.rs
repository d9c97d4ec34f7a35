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
//! - [`vpd`] and [`tpc`] — VPD pages (0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB2)
//!   and third-party copy formats (EXTENDED COPY(LID1) with 0xE4/0x02
//!   descriptors, RECEIVE COPY OPERATING PARAMETERS, POPULATE TOKEN, WRITE
//!   USING TOKEN, RECEIVE ROD TOKEN INFORMATION, ROD tokens): builders and
//!   length-checked parsers.
//! - [`ScsiTransport`] — the seam: run a CDB with a data transfer and a
//!   timeout, status and sense as data. [`SgDevice`] implements it with
//!   `SG_IO`, [`emu::EmuLun`] with the in-process target.
//! - [`ScsiDevice`] — a probed LUN over any transport: identity, capacity,
//!   limits, copy capabilities (UNIT ATTENTION retried once), and typed
//!   commands (READ/WRITE(16), SYNCHRONIZE CACHE, UNMAP, WRITE SAME,
//!   REPORT LUNS, EXTENDED COPY, ROD tokens).
//! - [`SgQueue`] — queued asynchronous I/O through the sg driver's
//!   write/read interface: several files per LUN, submissions that never
//!   block ([`RejectReason::QueueFull`] is a value), completions by
//!   [`SgQueue::poll`], page-aligned [`AlignedBuf`]s for direct I/O.
//! - [`emu`] — the emulated target; [`conformance`] — checks run against
//!   both the emulator (host tests) and LIO (VM tests).

//! # Example
//!
//! On the emulated target (the same code runs on `ScsiDevice::open("/dev/sg1")`):
//!
//! ```
//! use scsi_sg::emu::{EmuConfig, EmuTarget};
//! use scsi_sg::ScsiDevice;
//!
//! # fn main() -> Result<(), scsi_sg::Error> {
//! let target = EmuTarget::new("doc", EmuConfig::default());
//! let src = ScsiDevice::probe(target.add_memory_lun(1024, 512))?;
//! let dst = ScsiDevice::probe(target.add_memory_lun(1024, 512))?;
//! src.write(0, &[0xab; 4096], false)?;
//! src.copy_to(0, &dst, 100, 8)?; // EXTENDED COPY(LID1)
//! let mut back = [0u8; 4096];
//! dst.read(100, &mut back)?;
//! assert_eq!(back, [0xab; 4096]);
//! # Ok(())
//! # }
//! ```
//!
//! Through SG_IO:
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
#[cfg(feature = "emu")]
pub mod conformance;
mod device;
#[cfg(feature = "emu")]
pub mod emu;
mod error;
pub mod inquiry;
mod lun;
mod queue;
pub mod sense;
pub mod status;
pub mod sys;
pub mod tpc;
mod transport;
pub mod vpd;

pub use capacity::Capacity16;
pub use device::{CommandOutcome, DEFAULT_TIMEOUT, DataTransfer, SgDevice, check_outcome};
pub use error::{Error, ParseError, TokenProblem};
pub use inquiry::InquiryData;
pub use lun::{CopyCapabilities, Identity, RodSupport, ScsiDevice, parse_report_luns, vpd_page};
pub use queue::{Completion, RejectReason, Rejected, SCSI_GENERIC_MAJOR, SgQueue};
pub use sense::{Sense, SenseKey};
pub use status::ScsiStatus;
pub use sys::aligned::AlignedBuf;
pub use sys::sgq::AsyncXfer;
pub use transport::ScsiTransport;
