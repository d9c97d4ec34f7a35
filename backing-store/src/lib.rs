//! What the in-process devices keep their blocks in (the emulated NVMe
//! controller, the emulated SCSI target, the `mem:` and `file:` leaves):
//! - [`SparseMemory`]: bytes allocated as they are written, so a device's
//!   declared size costs nothing;
//! - [`open_file`]: a backing file or block device opened safely (created
//!   exclusively and owner-only, never through a planted symbolic link,
//!   block devices held exclusively).

mod file;
mod memory;

pub use file::{FileOpenError, OpenedFile, open_file};
pub use memory::{CHUNK_BYTES, OutOfRange, SparseMemory};
