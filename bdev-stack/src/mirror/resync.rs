//! Resync: copying regions from a source leg into a replaced leg, or the
//! regions an unclean stop left suspect into the other healthy legs, one
//! region at a time under the write-intent map's lock.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::intent::run_sync;
use super::{HEALTHY, RESYNCING, Shared};
use crate::buffer::DmaMemory;
use crate::device::{Channel, IoRequest};
use crate::error::BdevError;

pub(super) enum ResyncMode {
    /// Copy every region into a replaced leg.
    Rebuild { target: usize },
    /// Copy suspect regions to every other healthy leg.
    Dirty,
}

/// What one [`Resync::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Copied one region.
    Copied {
        /// The region.
        region: u64,
    },
    /// The next region has writes in flight; step again later.
    Waiting,
    /// Nothing left; the legs are in sync.
    Finished,
}

/// What a resync did, in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncReport {
    /// Regions copied.
    pub regions: u64,
    /// Blocks copied (per target leg).
    pub blocks: u64,
}

/// A background resync: copies regions from a source leg to target legs,
/// one region at a time, holding each against concurrent writes while it is
/// copied. Drive it with [`Resync::step`] from a polling loop or with
/// [`Resync::run`] on a thread of its own; I/O on the mirror continues
/// meanwhile.
pub struct Resync {
    shared: Arc<Shared>,
    mode: ResyncMode,
    source: Box<dyn Channel>,
    targets: Vec<(usize, Box<dyn Channel>)>,
    buffer: Box<dyn DmaMemory>,
    chunk_blocks: u64,
    next_region: u64,
    report: ResyncReport,
    finished: bool,
}

impl Resync {
    pub(super) fn new(
        shared: Arc<Shared>,
        source_leg: usize,
        mode: ResyncMode,
    ) -> Result<Resync, BdevError> {
        let legs = shared.legs().clone();
        let target_legs: Vec<usize> = match mode {
            ResyncMode::Rebuild { target } => vec![target],
            ResyncMode::Dirty => (0..legs.len())
                .filter(|&l| l != source_leg && shared.state(l) == HEALTHY)
                .collect(),
        };
        let source = legs[source_leg].open_channel(1)?;
        let mut targets = Vec::with_capacity(target_legs.len());
        for &leg in &target_legs {
            targets.push((leg, legs[leg].open_channel(1)?));
        }
        let max_transfer = target_legs
            .iter()
            .chain(std::iter::once(&source_leg))
            .map(|&l| legs[l].info().max_transfer_blocks)
            .min()
            .unwrap_or(1);
        let chunk_blocks = shared.dirty.region_blocks.min(max_transfer).max(1);
        let bytes = usize::try_from(chunk_blocks * u64::from(shared.block_size))
            .map_err(|_| BdevError::OutOfMemory { bytes: usize::MAX })?;
        Ok(Resync {
            buffer: shared.allocator().allocate(bytes)?,
            shared,
            mode,
            source,
            targets,
            chunk_blocks,
            next_region: 0,
            report: ResyncReport::default(),
            finished: false,
        })
    }

    /// Copies the next region, if its writes have drained.
    pub fn step(&mut self) -> Result<ResyncStep, BdevError> {
        if self.finished {
            return Ok(ResyncStep::Finished);
        }
        let dirty = Arc::clone(&self.shared.dirty);
        if let ResyncMode::Dirty = self.mode {
            while self.next_region < dirty.region_count() && !dirty.is_suspect(self.next_region) {
                self.next_region += 1;
            }
        }
        if self.next_region >= dirty.region_count() {
            self.finish();
            return Ok(ResyncStep::Finished);
        }
        if let ResyncMode::Rebuild { target } = self.mode
            && self.shared.state(target) != RESYNCING
        {
            return Err(BdevError::MirrorState {
                device: self.shared.name.clone(),
                reason: format!("leg {target} failed during its resync"),
            });
        }
        let region = self.next_region;
        if !dirty.try_lock(region) {
            return Ok(ResyncStep::Waiting);
        }
        let copied = self.copy_region(region);
        dirty.unlock(
            region,
            copied.is_ok() && matches!(self.mode, ResyncMode::Dirty),
        );
        let blocks = copied?;
        self.next_region += 1;
        self.report.regions += 1;
        self.report.blocks += blocks;
        if let ResyncMode::Rebuild { target } = self.mode {
            self.shared.resync_done[target].fetch_add(blocks, Ordering::AcqRel);
        }
        Ok(ResyncStep::Copied { region })
    }

    /// Steps until finished, yielding the thread while a region is busy.
    pub fn run(mut self) -> Result<ResyncReport, BdevError> {
        loop {
            match self.step()? {
                ResyncStep::Finished => return Ok(self.report),
                ResyncStep::Waiting => std::thread::yield_now(),
                ResyncStep::Copied { .. } => {}
            }
        }
    }

    /// What has been copied so far.
    pub fn report(&self) -> ResyncReport {
        self.report
    }

    fn finish(&mut self) {
        self.finished = true;
        if let ResyncMode::Rebuild { target } = self.mode
            && self.shared.health[target]
                .compare_exchange(RESYNCING, HEALTHY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            info!(mirror = %self.shared.name, leg = target, "resync finished; leg healthy");
            if let Some(log) = &self.shared.intent {
                let failed = log.leg_healthy(target, self.shared.writable());
                if failed != 0 {
                    warn!(mirror = %self.shared.name, failed, "recording the healthy leg failed on some members");
                }
            }
        }
        self.shared.settle_intent();
    }

    fn copy_region(&mut self, region: u64) -> Result<u64, BdevError> {
        let region_blocks = self.shared.dirty.region_blocks;
        let start = region * region_blocks;
        let end = (start + region_blocks).min(self.shared.block_count);
        let bs = u64::from(self.shared.block_size);
        let mut lba = start;
        while lba < end {
            let blocks = (end - lba).min(self.chunk_blocks);
            let buf = self
                .buffer
                .dma_slice()
                .sub(0, (blocks * bs) as usize)
                .ok_or(BdevError::OutOfMemory {
                    bytes: (blocks * bs) as usize,
                })?;
            run_sync(self.source.as_mut(), IoRequest::read(lba, blocks, buf, 0)).map_err(
                |source| BdevError::Io {
                    context: "resync: reading the source leg",
                    source,
                },
            )?;
            for (leg, target) in &mut self.targets {
                if let Err(error) = run_sync(target.as_mut(), IoRequest::write(lba, blocks, buf, 0))
                {
                    self.shared.fail_leg(*leg, &error);
                    return Err(BdevError::Io {
                        context: "resync: writing a target leg",
                        source: error,
                    });
                }
            }
            lba += blocks;
        }
        Ok(end - start)
    }
}
