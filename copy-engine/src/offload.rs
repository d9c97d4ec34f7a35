//! Offloads: which leaves pair (on identities the library controls), and
//! the run of one group's batched commands on the destination leaf's copy
//! channel, with fallbacks for what the device did not do and one fresh
//! ROD token for commands whose token had expired.

use std::sync::Arc;

use bdev_stack::{
    CopyOffload, DeviceInfo, LbaRange, OffloadError, OffloadErrorKind, OffloadOutcome,
    OffloadRange, OffloadRequest, OffloadSource, OffloadSubmitError, RodToken,
};
use tracing::warn;

use crate::error::CopyError;
use crate::plan::{CopyCommand, CopyLimits, Piece, batch};
use crate::report::{CopyReport, Method, RefusalReason};
use crate::run::{Job, Run};
use crate::token::{TokenKind, populate_one};

/// How a group of pieces is offloaded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pairing {
    pub(crate) method: Method,
    pub(crate) limits: CopyLimits,
}

/// Whether a fragment with token `kind` can be copied by `dst` itself:
/// the pairing, or why not (`None` when the two have no offload in
/// common at all). Pairs only on identities the library controls.
pub(crate) fn pair(kind: &TokenKind, dst: &DeviceInfo) -> Result<Pairing, Option<RefusalReason>> {
    let mut refused = None;
    for offload in &dst.copy_offloads {
        match (kind, offload) {
            (
                TokenKind::Nvme { controller, nsid },
                CopyOffload::NvmeCopy {
                    controller: dst_controller,
                    nsid: dst_nsid,
                    max_ranges,
                    max_range_blocks,
                    max_command_blocks,
                    ..
                },
            ) => {
                if controller != dst_controller || nsid != dst_nsid {
                    refused = Some(RefusalReason::OtherNamespace);
                    continue;
                }
                if *max_ranges == 0 || *max_range_blocks == 0 || *max_command_blocks == 0 {
                    return Err(Some(RefusalReason::Limits));
                }
                return Ok(Pairing {
                    method: Method::NvmeCopy,
                    limits: CopyLimits {
                        max_ranges: *max_ranges,
                        max_range_blocks: *max_range_blocks,
                        max_command_blocks: *max_command_blocks,
                        contiguous_destination: true,
                        contiguous_source: false,
                    },
                });
            }
            (
                TokenKind::ExtendedCopy {
                    copy_manager,
                    designator_unique,
                    ..
                },
                CopyOffload::ScsiExtendedCopy {
                    copy_manager: dst_manager,
                    designator_unique: dst_unique,
                    max_segments,
                    max_segment_bytes,
                    ..
                },
            ) => {
                if copy_manager != dst_manager {
                    refused = Some(RefusalReason::OtherCopyManager);
                    continue;
                }
                if !designator_unique || !dst_unique {
                    refused = Some(RefusalReason::DesignatorNotUnique);
                    continue;
                }
                return CopyLimits::xcopy(*max_segments, *max_segment_bytes, dst.block_size)
                    .map(|limits| Pairing {
                        method: Method::ExtendedCopy,
                        limits,
                    })
                    .ok_or(Some(RefusalReason::Limits));
            }
            (
                TokenKind::Rod { copy_manager, .. },
                CopyOffload::ScsiRodToken {
                    copy_manager: dst_manager,
                    max_ranges,
                    max_token_blocks,
                    ..
                },
            ) => {
                if copy_manager != dst_manager {
                    refused = Some(RefusalReason::TokenFromOtherCopyManager);
                    continue;
                }
                let descriptors = u16::try_from(*max_ranges).unwrap_or(u16::MAX);
                return CopyLimits::write_using_token(descriptors, *max_token_blocks)
                    .map(|limits| Pairing {
                        method: Method::RodToken,
                        limits,
                    })
                    .ok_or(Some(RefusalReason::Limits));
            }
            _ => {}
        }
    }
    Err(refused)
}

impl Run<'_> {
    /// Offloads `pieces` (sorted by destination LBA, or by token and
    /// destination LBA for ROD tokens) from leaf `src` to leaf `dst`.
    /// Whatever the device does not do is queued for bounce.
    pub(crate) fn offload(
        &mut self,
        pieces: &[Piece],
        src: u32,
        dst: u32,
        pairing: Pairing,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let commands = &mut self.scratch.commands;
        commands.ranges.clear();
        commands.list.clear();
        commands.token.clear();
        // Batch per run of pieces on one token (all of them, but for ROD).
        let tokens = job.tokens;
        for run in pieces.chunk_by(|a, b| {
            pairing.method != Method::RodToken
                || tokens.token_at(a.logical) == tokens.token_at(b.logical)
        }) {
            batch(
                run,
                &pairing.limits,
                &mut commands.ranges,
                &mut commands.list,
            );
            commands
                .token
                .resize(commands.list.len(), tokens.token_at(run[0].logical));
        }
        self.run_commands(pieces, src, dst, pairing, job)?;
        if !self.scratch.commands.stale.is_empty() {
            self.retry_with_fresh_tokens(pieces, src, dst, job)?;
        }
        Ok(())
    }

    /// The offload request for command `i`, into the scratch's range list.
    fn request<'a>(
        commands: &'a mut crate::run::Commands,
        i: usize,
        method: Method,
        job: &'a Job<'_>,
        rod: Option<&'a RodToken>,
        src_block_size: u32,
    ) -> OffloadRequest<'a> {
        let cmd = commands.list[i];
        let token = &job.tokens.tokens[commands.token[i]];
        commands.offload_ranges.clear();
        for r in &commands.ranges[cmd.first_range..cmd.first_range + cmd.range_count] {
            let src = match method {
                // Offset into the ROD, which starts at the token's first
                // block.
                Method::RodToken => r.src_lba - token.leaf_lba,
                _ => r.src_lba,
            };
            commands.offload_ranges.push(OffloadRange {
                src,
                dst: r.dst_lba,
                blocks: r.blocks,
            });
        }
        let source = match (&method, &token.kind) {
            (Method::RodToken, TokenKind::Rod { token, .. }) => {
                OffloadSource::RodToken(rod.unwrap_or(token))
            }
            (Method::ExtendedCopy, TokenKind::ExtendedCopy { naa, .. }) => {
                OffloadSource::Designator {
                    naa,
                    block_size: src_block_size,
                }
            }
            _ => OffloadSource::SameDevice,
        };
        OffloadRequest {
            source,
            ranges: &commands.offload_ranges,
            ctx: i as u64,
        }
    }

    /// Submits the batched commands and handles their completions.
    fn run_commands(
        &mut self,
        pieces: &[Piece],
        src: u32,
        dst: u32,
        pairing: Pairing,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let depth = self.options.offload_depth.max(1);
        self.scratch.commands.stale.clear();
        let leaf = &mut self.leaves.table[dst as usize];
        if !leaf.copy_opened {
            leaf.copy_opened = true;
            leaf.copy =
                leaf.device
                    .open_copy_channel(depth)
                    .map_err(|source| CopyError::Device {
                        device: leaf.device.info().name.clone(),
                        action: "opening a copy channel",
                        source,
                    })?;
        }
        let Some(mut channel) = leaf.copy.take() else {
            // Advertised but no channel: bounce all of it.
            warn!(leaf = %leaf.device.info().name, "offload advertised but no copy channel; bouncing");
            for p in pieces {
                self.scratch.bounce.push((p.logical, p.blocks));
            }
            return Ok(());
        };
        let dst_id = leaf.id;
        let src_block_size = self.leaves.table[src as usize].device.info().block_size;
        let mut next = 0;
        self.waiter
            .set_pace(self.leaves.table[dst as usize].copy_pace);
        let mut in_flight = 0u64;
        self.scratch.commands.done.clear();
        self.scratch.commands.done.reserve(depth);
        while next < self.scratch.commands.list.len() || channel.outstanding() > 0 {
            let mut handed_over = false;
            while next < self.scratch.commands.list.len() {
                let cmd = self.scratch.commands.list[next];
                let req = Self::request(
                    &mut self.scratch.commands,
                    next,
                    pairing.method,
                    job,
                    None,
                    src_block_size,
                );
                match channel.submit_copy(&req) {
                    Ok(()) => {
                        next += 1;
                        in_flight += cmd.blocks;
                        handed_over = true;
                    }
                    Err(OffloadSubmitError::Busy) => break,
                    Err(OffloadSubmitError::Invalid(e)) => {
                        warn!(error = %e, "offload refused; bouncing its ranges");
                        job.report.fallbacks += 1;
                        self.fall_back(pieces, &cmd, 0);
                        next += 1;
                    }
                }
            }
            if handed_over {
                self.waiter.submitted(in_flight);
            }
            let done = &mut self.scratch.commands.done;
            done.clear();
            let completed = channel.poll(done, depth);
            let mut failed = false;
            for c in done.iter() {
                failed |= !matches!(c.outcome, OffloadOutcome::Done);
                if let Some(cmd) = usize::try_from(c.ctx)
                    .ok()
                    .and_then(|i| self.scratch.commands.list.get(i))
                {
                    in_flight = in_flight.saturating_sub(cmd.blocks);
                }
            }
            self.waiter.after_poll(completed, failed, in_flight);
            let done = std::mem::take(&mut self.scratch.commands.done);
            for c in &done {
                let index = usize::try_from(c.ctx).ok();
                let Some(cmd) = index
                    .and_then(|i| self.scratch.commands.list.get(i))
                    .copied()
                else {
                    warn!(
                        ctx = c.ctx,
                        "offload completion for an unknown command; ignored"
                    );
                    continue;
                };
                self.complete(
                    pieces,
                    index.unwrap_or(0),
                    &cmd,
                    &c.outcome,
                    pairing.method,
                    dst_id,
                    job,
                );
            }
            self.scratch.commands.done = done;
        }
        let leaf = &mut self.leaves.table[dst as usize];
        leaf.copy = Some(channel);
        leaf.copy_pace = self.waiter.pace();
        Ok(())
    }

    /// Books what became of command `index` (`cmd`): counted where done,
    /// queued for bounce where not, kept for a fresh token where its ROD
    /// token had gone stale.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        pieces: &[Piece],
        index: usize,
        cmd: &CopyCommand,
        outcome: &OffloadOutcome,
        method: Method,
        dst: bdev_stack::DeviceId,
        job: &mut Job<'_>,
    ) {
        let ranges =
            &self.scratch.commands.ranges[cmd.first_range..cmd.first_range + cmd.range_count];
        let count = |report: &mut CopyReport, blocks: u64, whole_ranges: u64| {
            let bytes = blocks * job.block_size;
            let s = report.method_mut(method);
            s.commands += 1;
            s.bytes += bytes;
            s.pieces += whole_ranges;
            report.leaf_offload(dst, method, bytes);
        };
        match outcome {
            OffloadOutcome::Done => count(&mut job.report, cmd.blocks, ranges.len() as u64),
            OffloadOutcome::Partial { blocks_done, error } => {
                // Device data: never trust it past the command.
                let done_blocks = (*blocks_done).min(cmd.blocks);
                let mut whole = 0;
                let mut acc = 0;
                for r in ranges {
                    if acc + r.blocks <= done_blocks {
                        whole += 1;
                    }
                    acc += r.blocks;
                }
                log_fallback(error, "partially done");
                job.report.fallbacks += 1;
                if done_blocks > 0 {
                    count(&mut job.report, done_blocks, whole);
                }
                self.fall_back(pieces, cmd, done_blocks);
            }
            OffloadOutcome::NotDone(error)
                if method == Method::RodToken
                    && matches!(
                        error.kind,
                        OffloadErrorKind::TokenExpired | OffloadErrorKind::TokenInvalid
                    ) =>
            {
                // Nothing written: worth one fresh token before bouncing.
                self.scratch.commands.stale.push(index);
            }
            OffloadOutcome::NotDone(error) => {
                log_fallback(error, "not done");
                job.report.fallbacks += 1;
                self.fall_back(pieces, cmd, 0);
            }
            OffloadOutcome::DestinationUnknown(error) => {
                log_fallback(error, "destination unknown; redoing by bounce");
                job.report.fallbacks += 1;
                self.fall_back(pieces, cmd, 0);
            }
            OffloadOutcome::Token(_) => {
                warn!("copy command completed with a token; treating its destination as unknown");
                job.report.fallbacks += 1;
                self.fall_back(pieces, cmd, 0);
            }
        }
    }

    /// Commands refused for an expired or invalidated ROD token: populate
    /// the token's range again once, and send each command again with the
    /// new token; what still fails is bounced.
    fn retry_with_fresh_tokens(
        &mut self,
        pieces: &[Piece],
        src: u32,
        dst: u32,
        job: &mut Job<'_>,
    ) -> Result<(), CopyError> {
        let stale = std::mem::take(&mut self.scratch.commands.stale);
        let source = Arc::clone(&self.leaves.table[src as usize].device);
        let mut populate_channel =
            source
                .open_copy_channel(1)
                .map_err(|source_error| CopyError::Device {
                    device: source.info().name.clone(),
                    action: "opening a copy channel for POPULATE TOKEN",
                    source: source_error,
                })?;
        let mut fresh: Vec<(usize, Option<RodToken>)> = Vec::new();
        for &index in &stale {
            let cmd = self.scratch.commands.list[index];
            let token_index = self.scratch.commands.token[index];
            let rod = match fresh.iter().find(|(t, _)| *t == token_index) {
                Some((_, rod)) => rod.clone(),
                None => {
                    let token = &job.tokens.tokens[token_index];
                    let range = LbaRange {
                        lba: token.leaf_lba,
                        blocks: token.blocks,
                    };
                    let mut completions = Vec::with_capacity(1);
                    let rod = populate_channel
                        .as_mut()
                        .and_then(|ch| populate_one(ch.as_mut(), range, &mut completions))
                        // The new ROD must cover the old one's blocks, as
                        // the offsets into it were planned on them.
                        .filter(|rod| rod.blocks() >= token.blocks);
                    if rod.is_some() {
                        job.report.tokens_repopulated += 1;
                    }
                    fresh.push((token_index, rod.clone()));
                    rod
                }
            };
            let outcome = match &rod {
                Some(rod) => self.send_once(index, rod, dst, job),
                None => None,
            };
            match outcome {
                Some(outcome) => {
                    if matches!(outcome, OffloadOutcome::NotDone(_)) {
                        // Stale twice: bounce it.
                        job.report.fallbacks += 1;
                        self.fall_back(pieces, &cmd, 0);
                    } else {
                        let dst_id = self.leaves.table[dst as usize].id;
                        self.complete(pieces, index, &cmd, &outcome, Method::RodToken, dst_id, job);
                    }
                }
                None => {
                    warn!("ROD token stale and could not be populated again; bouncing");
                    job.report.fallbacks += 1;
                    self.fall_back(pieces, &cmd, 0);
                }
            }
        }
        self.scratch.commands.stale = stale;
        self.scratch.commands.stale.clear();
        Ok(())
    }

    /// Sends command `index` with `rod` and waits for it; `None` when it
    /// could not be submitted.
    fn send_once(
        &mut self,
        index: usize,
        rod: &RodToken,
        dst: u32,
        job: &Job<'_>,
    ) -> Option<OffloadOutcome> {
        let leaf = &mut self.leaves.table[dst as usize];
        let channel = leaf.copy.as_mut()?;
        let req = Self::request(
            &mut self.scratch.commands,
            index,
            Method::RodToken,
            job,
            Some(rod),
            0,
        );
        loop {
            match channel.submit_copy(&req) {
                Ok(()) => break,
                Err(OffloadSubmitError::Busy) => {
                    let mut drain = Vec::with_capacity(1);
                    channel.poll(&mut drain, 1);
                }
                Err(OffloadSubmitError::Invalid(_)) => return None,
            }
        }
        let mut done = Vec::with_capacity(1);
        loop {
            if channel.poll(&mut done, 1) == 1 {
                return done.pop().map(|c| c.outcome);
            }
            std::hint::spin_loop();
        }
    }

    /// Queues for bounce the part of `cmd` after its first `done_blocks`
    /// blocks.
    fn fall_back(&mut self, pieces: &[Piece], cmd: &CopyCommand, done_blocks: u64) {
        let mut skip = done_blocks;
        let commands = &self.scratch.commands;
        for r in &commands.ranges[cmd.first_range..cmd.first_range + cmd.range_count] {
            if skip >= r.blocks {
                skip -= r.blocks;
                continue;
            }
            let (dst_lba, blocks) = (r.dst_lba + skip, r.blocks - skip);
            skip = 0;
            // The logical block of this destination block: the piece that
            // holds it (pieces of one destination leaf never overlap there).
            if let Some(p) = pieces
                .iter()
                .find(|p| p.dst_lba <= dst_lba && dst_lba < p.dst_lba + p.blocks)
            {
                self.scratch
                    .bounce
                    .push((p.logical + (dst_lba - p.dst_lba), blocks));
            }
        }
    }
}

fn log_fallback(error: &OffloadError, what: &str) {
    warn!(%error, "offload {what}; bouncing its ranges");
}
