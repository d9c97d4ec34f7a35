//! SCSI over the Linux SG_IO interface.
#![warn(missing_docs)]
