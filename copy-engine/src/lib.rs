//! The two-phase copy engine: `copy_in` turns source ranges into per-leaf
//! source tokens, `copy_out` pairs them with the destination's pieces and
//! offloads each pair to the devices where they can take it, bouncing through
//! host memory only where it must.
//!
//! # Architecture
//!
//! - [`copy_in`] maps the source ranges (concatenated: the logical copy
//!   space) onto the source's leaves; each leaf fragment gets a
//!   [`SourceToken`] whose [`TokenKind`] says how its bytes may move: NVMe
//!   namespace identity, EXTENDED COPY designator and copy manager, a ROD
//!   token from POPULATE TOKEN, or plain.
//! - [`CopyEngine::copy_out`] maps the destination ranges (every mirror leg
//!   that takes writes), intersects the two partitions ([`plan`]), stages
//!   pieces that read what others write (all reads, then all writes),
//!   copies pieces whose source and destination overlap on one leaf in
//!   memmove order, offloads each group of pieces whose two leaves can copy
//!   between themselves through the destination leaf's
//!   [`bdev_stack::CopyChannel`] (batched within the device's limits), and
//!   bounces the rest through a fixed set of buffers, pipelined. Offloads
//!   that fail are bounced (their unfinished part, or all of a command that
//!   left its destination unknown).
//! - The [`CopyReport`] gives per [`Method`] the pieces, commands and
//!   bytes, the wall time, and every range that could not be copied.
//!
//! # Example
//!
//! ```
//! use bdev_stack::{LbaRange, spec};
//! use copy_engine::{CopyEngine, CopyOptions, Method};
//!
//! // Two offload-capable memory leaves in a stripe.
//! let dev = spec::build("stripe(chunk=64, mem:1m,copy=nvme, mem:1m,copy=nvme)")?;
//! let mut engine = CopyEngine::new(CopyOptions::default())?;
//! // Gather two extents (chunks 0 and 5: one per leaf) into one (chunks 16
//! // and 17): each leaf copies its share within itself.
//! let src = [LbaRange { lba: 0, blocks: 64 }, LbaRange { lba: 320, blocks: 64 }];
//! let dst = [LbaRange { lba: 1024, blocks: 128 }];
//! let report = engine.copy(&dev, &src, &dev, &dst)?;
//! assert!(report.is_complete());
//! assert_eq!(report.method(Method::NvmeCopy).bytes, 128 * 512);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod bounce;
mod engine;
mod error;
mod leaves;
mod offload;
pub mod plan;
mod report;
mod run;
mod token;
pub mod wait;

pub use engine::{
    CopyEngine, CopyOptions, DEFAULT_BOUNCE_BYTES, DEFAULT_BUFFER_BYTES, OffloadWait, copy,
    copy_out,
};
pub use error::CopyError;
pub use report::{
    CopyFailure, CopyReport, LeafOffload, Method, MethodStats, NotCopied, OffloadRefused,
    RefusalReason,
};
pub use token::{SourceToken, SourceTokens, TokenKind, copy_in};
