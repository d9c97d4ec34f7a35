//! The two-phase copy engine: `copy_in` turns source ranges into per-leaf
//! source tokens, `copy_out` pairs them with the destination's pieces and
//! offloads each pair to the devices where they can take it, bouncing through
//! host memory only where it must.
//!
//! It sits above [`bdev_stack`]. [`plan`] holds the M:N planning: partition
//! intersection, grouping by leaf pair, batching within device limits, and
//! the overlap rules that keep data safe.
#![warn(missing_docs)]

pub mod plan;
