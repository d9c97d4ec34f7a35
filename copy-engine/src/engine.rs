//! The copy engine: its options, its buffers and scratch kept across
//! copies, and the entry points. The planning run is in `run`, offloads in
//! `offload`, the bounce path in `bounce`.

use std::sync::Arc;

use crate::wait::{Wait, Waiter};
use bdev_stack::{BlockDevice, DmaAllocator, HostAllocator, LbaRange};

use crate::bounce::Bouncer;
use crate::error::CopyError;
use crate::leaves::Leaves;
use crate::report::CopyReport;
use crate::run::{Run, Scratch};
use crate::token::{SourceTokens, check_ranges, copy_in, copy_in_checked};

/// Default bytes of bounce memory in flight (8 MiB).
pub const DEFAULT_BOUNCE_BYTES: usize = 8 << 20;

/// Default size of one bounce buffer (1 MiB).
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 20;

/// How a [`CopyEngine`] works.
#[derive(Clone)]
pub struct CopyOptions {
    /// Bounce memory in flight, in bytes: the buffers, allocated once.
    pub bounce_bytes: usize,
    /// Bytes per bounce buffer (and so per bounce read and write).
    pub buffer_bytes: usize,
    /// Use device offloads where the leaves allow (off: bounce everything,
    /// for comparisons).
    pub offload: bool,
    /// Offload commands in flight per destination leaf.
    pub offload_depth: usize,
    /// Where bounce buffers come from: a driver's DMA allocator when leaves
    /// need DMA-mapped memory.
    pub allocator: Arc<dyn DmaAllocator>,
    /// How to wait while only offload commands are in flight.
    pub offload_wait: OffloadWait,
}

/// How the engine waits for offload commands. An offloaded copy keeps the
/// device busy for far longer than a read or write, and the point of
/// offloading is to give the host its CPU back, so by default the engine
/// sleeps instead of spinning while nothing completes: with
/// [`Wait::Paced`](crate::wait::Wait::Paced) each leaf's pace on Copy
/// commands (time per block) is kept with its channel across copies.
pub type OffloadWait = Wait;

impl Default for CopyOptions {
    fn default() -> CopyOptions {
        CopyOptions {
            bounce_bytes: DEFAULT_BOUNCE_BYTES,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            offload: true,
            offload_depth: 16,
            allocator: Arc::new(HostAllocator),
            offload_wait: OffloadWait::default(),
        }
    }
}

impl std::fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("bounce_bytes", &self.bounce_bytes)
            .field("buffer_bytes", &self.buffer_bytes)
            .field("offload", &self.offload)
            .field("offload_depth", &self.offload_depth)
            .field("offload_wait", &self.offload_wait)
            .finish_non_exhaustive()
    }
}

/// The copy engine: options, bounce buffers and planning vectors, kept
/// across copies so the steady state allocates nothing per piece.
///
/// The channels (queue pairs) a copy opens to its leaves stay open for the
/// next copy, as an SPDK application keeps its queue pairs: opening one
/// costs admin commands and DMA mappings, more CPU than an offloaded copy
/// itself. Leaves a copy does not use are let go of after it, all of them
/// after a copy with failures (a channel may be broken), and
/// [`CopyEngine::close_channels`] lets go at once.
pub struct CopyEngine {
    options: CopyOptions,
    bouncer: Bouncer,
    leaves: Leaves,
    scratch: Scratch,
    /// Waits for offload commands (holds the timer of
    /// [`OffloadWait::Paced`]), made on first use.
    waiter: Option<Waiter>,
}

impl std::fmt::Debug for CopyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyEngine")
            .field("options", &self.options)
            .field("buffers", &self.bouncer.buffer_count())
            .finish_non_exhaustive()
    }
}

impl CopyEngine {
    /// An engine with `options`; allocates its bounce buffers now.
    pub fn new(options: CopyOptions) -> Result<CopyEngine, CopyError> {
        if options.buffer_bytes == 0 || options.bounce_bytes < options.buffer_bytes {
            return Err(CopyError::InvalidOptions {
                reason: format!(
                    "bounce budget of {} bytes cannot hold one {}-byte buffer",
                    options.bounce_bytes, options.buffer_bytes
                ),
            });
        }
        let count = options.bounce_bytes / options.buffer_bytes;
        let mut buffers = Vec::with_capacity(count);
        for _ in 0..count {
            buffers.push(
                options
                    .allocator
                    .allocate(options.buffer_bytes)
                    .map_err(|source| CopyError::Device {
                        device: "bounce allocator".into(),
                        action: "allocating bounce buffers",
                        source,
                    })?,
            );
        }
        Ok(CopyEngine {
            bouncer: Bouncer::new(buffers, options.buffer_bytes),
            options,
            leaves: Leaves::default(),
            scratch: Scratch::default(),
            waiter: None,
        })
    }

    /// The options.
    pub fn options(&self) -> &CopyOptions {
        &self.options
    }

    /// Phase 1: see [`copy_in`].
    pub fn copy_in(
        &mut self,
        source: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
    ) -> Result<SourceTokens, CopyError> {
        copy_in(source, ranges)
    }

    /// Both phases: copies `src_ranges` of `src` (concatenated) to
    /// `dst_ranges` of `dst` (concatenated); the lists may differ in shape
    /// when their totals match.
    pub fn copy(
        &mut self,
        src: &Arc<dyn BlockDevice>,
        src_ranges: &[LbaRange],
        dst: &Arc<dyn BlockDevice>,
        dst_ranges: &[LbaRange],
    ) -> Result<CopyReport, CopyError> {
        let total = check_ranges(src.as_ref(), src_ranges)?;
        check_destination(dst, dst_ranges, src, total)?;
        let tokens = copy_in_checked(src, src_ranges, total)?;
        self.copy_out_checked(dst, dst_ranges, &tokens, true)
    }

    /// Closes the channels kept open from earlier copies and lets go of
    /// their devices.
    pub fn close_channels(&mut self) {
        self.leaves.clear();
    }

    /// Phase 2: copies the bytes `tokens` describe to `ranges` of `dest`
    /// (concatenated). Errors come before any byte moves; failures of
    /// single I/Os are in the report's `not_copied`.
    ///
    /// Every layer of the destination takes part: the engine holds the
    /// range in each mirror's write intent for the whole copy (waiting
    /// while a resync copies a region of it; [`CopyError::DestinationBusy`]
    /// if that lasts past a bound), offloads only onto leaves the stack
    /// maps the range to, and writes every bounced byte through `dest`'s
    /// own channel. A mirror source is looked at again: tokens naming a
    /// leg that no longer serves reads are replaced by the leg that does.
    pub fn copy_out(
        &mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        tokens: &SourceTokens,
    ) -> Result<CopyReport, CopyError> {
        self.copy_out_checked(dest, ranges, tokens, false)
    }

    /// [`CopyEngine::copy_out`]; `checked`: the destination ranges were
    /// checked against the tokens already.
    fn copy_out_checked(
        &mut self,
        dest: &Arc<dyn BlockDevice>,
        ranges: &[LbaRange],
        tokens: &SourceTokens,
        checked: bool,
    ) -> Result<CopyReport, CopyError> {
        self.leaves.start_copy();
        if !checked {
            check_destination(dest, ranges, &tokens.source, tokens.total_blocks)?;
        }
        let waiter = self
            .waiter
            .get_or_insert_with(|| Waiter::new(self.options.offload_wait));
        let result = Run {
            options: &self.options,
            leaves: &mut self.leaves,
            bouncer: &mut self.bouncer,
            waiter,
            scratch: &mut self.scratch,
        }
        .copy_out(dest, ranges, tokens);
        // Whatever happened, nothing is in flight now: let the stack's
        // regions go.
        self.scratch.holds.release();
        match &result {
            Ok(report) if report.not_copied.is_empty() && report.fallbacks == 0 => {
                self.leaves.keep_used()
            }
            _ => self.close_channels(),
        }
        result
    }
}

/// Checks block sizes, the destination ranges, and that lengths match;
/// returns the total.
fn check_destination(
    dst: &Arc<dyn BlockDevice>,
    ranges: &[LbaRange],
    src: &Arc<dyn BlockDevice>,
    src_blocks: u64,
) -> Result<u64, CopyError> {
    let (si, di) = (src.info(), dst.info());
    if si.block_size != di.block_size {
        return Err(CopyError::BlockSizeMismatch {
            source_name: si.name.clone(),
            src_block_size: si.block_size,
            destination: di.name.clone(),
            dst_block_size: di.block_size,
        });
    }
    let total = check_ranges(dst.as_ref(), ranges)?;
    if total != src_blocks {
        return Err(CopyError::LengthMismatch {
            source_name: si.name.clone(),
            src_blocks,
            destination: di.name.clone(),
            dst_blocks: total,
        });
    }
    let mut sorted: Vec<&LbaRange> = ranges.iter().filter(|r| r.blocks > 0).collect();
    sorted.sort_unstable_by_key(|r| r.lba);
    for w in sorted.windows(2) {
        if w[0].lba + w[0].blocks > w[1].lba {
            return Err(CopyError::DestinationOverlap {
                device: di.name.clone(),
                first_lba: w[0].lba,
                first_blocks: w[0].blocks,
                second_lba: w[1].lba,
                second_blocks: w[1].blocks,
            });
        }
    }
    Ok(total)
}

/// Phase 2 with a default engine (allocates its bounce buffers): see
/// [`CopyEngine::copy_out`].
pub fn copy_out(
    dest: &Arc<dyn BlockDevice>,
    ranges: &[LbaRange],
    tokens: &SourceTokens,
) -> Result<CopyReport, CopyError> {
    CopyEngine::new(CopyOptions::default())?.copy_out(dest, ranges, tokens)
}

/// Both phases with a default engine: see [`CopyEngine::copy`].
pub fn copy(
    src: &Arc<dyn BlockDevice>,
    src_ranges: &[LbaRange],
    dst: &Arc<dyn BlockDevice>,
    dst_ranges: &[LbaRange],
) -> Result<CopyReport, CopyError> {
    CopyEngine::new(CopyOptions::default())?.copy(src, src_ranges, dst, dst_ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdev_stack::{
        Access, BdevError, Channel, CopyChannel, DeviceId, DeviceInfo, IoError, LeafFragment,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A memory leaf that counts the channels opened to it.
    struct Counting {
        info: DeviceInfo,
        inner: Arc<dyn BlockDevice>,
        opened: AtomicUsize,
    }

    impl Counting {
        fn new() -> Arc<Counting> {
            let inner = bdev_stack::spec::build("mem:1m,copy=nvme").unwrap();
            let mut info = inner.info().clone();
            info.id = DeviceId::fresh();
            Arc::new(Counting {
                info,
                inner,
                opened: AtomicUsize::new(0),
            })
        }
    }

    impl BlockDevice for Counting {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }

        fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.inner.open_channel(depth)
        }

        fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
            Vec::new()
        }

        fn open_copy_channel(
            &self,
            depth: usize,
        ) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
            self.opened.fetch_add(1, Ordering::Relaxed);
            self.inner.open_copy_channel(depth)
        }

        fn map(
            &self,
            lba: u64,
            blocks: u64,
            access: Access,
            out: &mut Vec<LeafFragment>,
        ) -> Result<(), IoError> {
            let first = out.len();
            self.inner.map(lba, blocks, access, out)?;
            for f in &mut out[first..] {
                f.leaf = self.info.id;
            }
            Ok(())
        }
    }

    #[test]
    fn channels_stay_open_for_the_next_copy_over_the_same_leaves() {
        for offload in [true, false] {
            let mut engine = CopyEngine::new(CopyOptions {
                offload,
                ..CopyOptions::default()
            })
            .unwrap();
            let (a, b) = (Counting::new(), Counting::new());
            let (dev_a, dev_b): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) =
                (a.clone(), b.clone());
            let src = [LbaRange { lba: 0, blocks: 64 }];
            let dst = [LbaRange {
                lba: 512,
                blocks: 64,
            }];
            for _ in 0..3 {
                assert!(
                    engine
                        .copy(&dev_a, &src, &dev_a, &dst)
                        .unwrap()
                        .is_complete()
                );
            }
            assert_eq!(a.opened.load(Ordering::Relaxed), 1, "offload {offload}");
            // A copy over other leaves lets the first ones go.
            assert!(
                engine
                    .copy(&dev_b, &src, &dev_b, &dst)
                    .unwrap()
                    .is_complete()
            );
            drop(dev_a);
            assert_eq!(Arc::strong_count(&a), 1, "offload {offload}");
            engine.close_channels();
            drop(dev_b);
            assert_eq!(Arc::strong_count(&b), 1, "offload {offload}");
        }
    }
}
