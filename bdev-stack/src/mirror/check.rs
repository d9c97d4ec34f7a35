//! Scrub, as md's `sync_action=check`: compare the legs of a mirror region
//! by region, each region locked against writes while it is read, and
//! report the regions whose legs differ; with repair, mark them suspect so
//! a resync copies the primary's blocks over the others.

use std::sync::Arc;

use super::intent::run_sync;
use super::{HEALTHY, Mirror};
use crate::device::IoRequest;
use crate::error::BdevError;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Regions compared.
    pub regions: u64,
    /// Regions whose legs differ.
    pub mismatched: Vec<u64>,
    /// Regions marked for the resync (with repair).
    pub marked: u64,
}

impl Mirror {
    /// Compares every healthy leg against the primary, region by region,
    /// each region held against writes while it is read (I/O goes on
    /// elsewhere). `progress` hears (regions done, regions in all). With
    /// `repair`, mismatched regions are marked suspect: run
    /// [`Mirror::resync_dirty`] to make the legs equal.
    pub fn check(
        &self,
        repair: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<CheckReport, BdevError> {
        let shared = Arc::clone(&self.shared);
        let legs = shared.legs().clone();
        let healthy: Vec<usize> = (0..legs.len())
            .filter(|&l| shared.state(l) == HEALTHY)
            .collect();
        if healthy.len() < 2 {
            return Err(self.state_error(format!(
                "{} healthy leg(s): nothing to compare",
                healthy.len()
            )));
        }
        let region_blocks = shared.dirty.region_blocks;
        let chunk = healthy
            .iter()
            .map(|&l| legs[l].info().max_transfer_blocks)
            .min()
            .unwrap_or(1)
            .min(region_blocks)
            .max(1);
        let bs = u64::from(shared.block_size);
        let bytes = usize::try_from(chunk * bs)
            .map_err(|_| BdevError::OutOfMemory { bytes: usize::MAX })?;
        let allocator = shared.allocator();
        let mut channels = Vec::with_capacity(healthy.len());
        let mut buffers = Vec::with_capacity(healthy.len());
        for &l in &healthy {
            channels.push(legs[l].open_channel(1)?);
            buffers.push(allocator.allocate(bytes)?);
        }
        let mut first = vec![0u8; bytes];
        let mut other = vec![0u8; bytes];
        let total = shared.dirty.region_count();
        let mut report = CheckReport {
            regions: total,
            ..CheckReport::default()
        };
        for region in 0..total {
            while !shared.dirty.try_lock(region) {
                std::thread::yield_now();
            }
            let start = region * region_blocks;
            let end = (start + region_blocks).min(shared.block_count);
            let mut lba = start;
            let mut differs = false;
            let result = (|| -> Result<(), BdevError> {
                while lba < end && !differs {
                    let blocks = (end - lba).min(chunk);
                    let len = (blocks * bs) as usize;
                    for (i, (channel, buffer)) in
                        channels.iter_mut().zip(buffers.iter_mut()).enumerate()
                    {
                        let buf = buffer.dma_slice();
                        let Some(buf) = buf.sub(0, len) else {
                            return Err(BdevError::OutOfMemory { bytes: len });
                        };
                        run_sync(channel.as_mut(), IoRequest::read(lba, blocks, buf, 0)).map_err(
                            |source| BdevError::Io {
                                context: "check: reading a leg",
                                source,
                            },
                        )?;
                        if i == 0 {
                            buffer.copy_to(0, &mut first[..len])?;
                        } else {
                            buffer.copy_to(0, &mut other[..len])?;
                            differs |= first[..len] != other[..len];
                        }
                    }
                    lba += blocks;
                }
                Ok(())
            })();
            shared.dirty.unlock(region, false);
            result?;
            if differs {
                report.mismatched.push(region);
                if repair {
                    shared.dirty.mark_suspect(region);
                    report.marked += 1;
                }
            }
            progress(region + 1, total);
        }
        Ok(report)
    }
}
