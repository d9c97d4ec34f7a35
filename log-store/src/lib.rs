//! A log-structured block store and its garbage collector, on any block
//! device stack: the engine of `examples/gc`.
//!
//! # The store
//! - The device is a superblock and fixed-size segments. The writer
//!   appends blocks to the open segment; a segment is committed by writing
//!   its filled slots, a flush, its summary (the logical block and write
//!   stamp of every slot, a sequence number, a CRC) and a flush. The two
//!   summary areas at a segment's end are written in turn, so a commit
//!   never destroys the previous one (see [`layout`]).
//! - The logical-to-physical map lives in memory and is rebuilt from the
//!   summaries when the store is opened: for each logical block the copy
//!   with the highest stamp wins, ties (a block and its relocated copy) go
//!   to the later summary. A write is durable once a commit that holds it
//!   completes ([`LogStore::sync`], or the segment filling up).
//! - The cleaner ([`LogStore::clean`]) runs when free segments run low,
//!   between user segments (so every block it treats as dead has been
//!   superseded durably): it picks victims by [`Policy`], relocates their
//!   live slots with the copy engine in one gather to the relocation head,
//!   flushes, writes the destination summaries, and frees the victims only
//!   once a later flush (the next round's, or the next commit's) has made
//!   those summaries durable: one flush per round, not two.
//!
//! [`run`] drives a workload (fill, then overwrites) and reports what the
//! cleaner did; [`Workload::content`] derives each block's bytes from its
//! logical block number and version so any read can be checked.
//!
//! Everything read off the device is untrusted: the superblock's geometry
//! is checked against the device before any of it is used
//! ([`GcError::BadSuperblock`]), as are the options of a format
//! ([`GcError::BadLayout`]). The `serde` feature serializes the reports.

#![warn(missing_docs)]

pub mod io;
pub mod layout;
mod policy;
mod run;
mod store;

pub use layout::GeometryError;
pub use policy::Policy;
pub use run::{
    CompareReport, Progress, RunOptions, RunReport, Workload, check_block, compare, run,
    run_with_progress,
};
pub use store::{CleanStats, LogStore, StoreOptions};

use bdev_stack::{BdevError, IoError};
use copy_engine::CopyError;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A bad option or a request the store cannot take.
    #[error("{0}")]
    Config(String),
    /// The device holds no store this build can open.
    #[error("{device}: not a store: {reason}")]
    NotAStore {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
    /// The options ask for a layout the device cannot hold.
    #[error(
        "{device}: no store can be laid out with these options: choose a segment size and \
         fill the device can hold"
    )]
    BadLayout {
        /// The device.
        device: String,
        /// The field at fault.
        #[source]
        source: GeometryError,
    },
    /// The superblock carries a valid checksum but a geometry the device
    /// cannot hold: damaged, or written for another device.
    #[error(
        "{device}: the superblock's geometry does not fit this device: open the device the \
         store was formatted on, or format this one again (its contents are lost)"
    )]
    BadSuperblock {
        /// The device.
        device: String,
        /// The field at fault.
        #[source]
        source: GeometryError,
    },
    /// A logical block past the store's end.
    #[error("logical block {lbn} is past the store's {logical_blocks} blocks")]
    OutOfRange {
        /// The block asked for.
        lbn: u64,
        /// The store's size in blocks.
        logical_blocks: u64,
    },
    /// A device or allocator failed outside I/O.
    #[error("{device}: {action}: {source}")]
    Device {
        /// The device.
        device: String,
        /// What the store was doing.
        action: &'static str,
        /// The error.
        #[source]
        source: BdevError,
    },
    /// An I/O failed.
    #[error("{device}: {source}")]
    Io {
        /// The store's device.
        device: String,
        /// The failed I/O.
        #[source]
        source: IoError,
    },
    /// Requests did not complete in time.
    #[error("{device}: {outstanding} requests did not complete within 30 s")]
    Timeout {
        /// The device.
        device: String,
        /// Requests still in flight.
        outstanding: usize,
    },
    /// The copy engine refused the relocation.
    #[error("relocation: {0}")]
    Copy(#[from] CopyError),
    /// Some relocated ranges were not copied: the victims are kept.
    #[error("relocation left {count} ranges uncopied: {report}")]
    Relocation {
        /// Ranges not copied.
        count: usize,
        /// The copy report.
        report: String,
    },
    /// Every segment is full of live data: nothing to clean.
    #[error(
        "no space: {free} free segments and no segment with enough dead slots to reclaim \
         (the store is fuller than its reserve allows)"
    )]
    NoSpace {
        /// Free segments.
        free: u32,
    },
    /// A summary names a block the store does not have: not our data.
    #[error("{device}: summary of segment {segment} names logical block {lbn} of {logical_blocks}")]
    BadSummary {
        /// The device.
        device: String,
        /// The segment.
        segment: u32,
        /// The block it names.
        lbn: u64,
        /// The store's size.
        logical_blocks: u64,
    },
    /// A block read back differs from what was written.
    #[error("logical block {lbn}: {reason}")]
    Verify {
        /// The block.
        lbn: u64,
        /// What differs.
        reason: String,
    },
}
