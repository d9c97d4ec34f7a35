//! The NVM commands a queue pair submits: reads and writes split at the
//! transfer limit with PRP lists, flush, write zeroes, deallocate, Copy
//! split to the namespace's limits, and passthrough.

use super::*;
use crate::cmd::{self, Prps};
use crate::spec::DsmRange;
use qpair::Reserved;

/// Which way a read or write moves data.
#[derive(Clone, Copy)]
pub(super) enum Direction {
    Read,
    Write,
}

impl<T: Transport> QueuePair<T> {
    /// True when `buf`'s IOVA is one this controller's DMA context gave:
    /// the same IOVA in another context is another buffer.
    #[inline]
    fn owns(&self, buf: &DmaSlice) -> bool {
        buf.context_id() == self.shared.transport.dma().id()
    }

    /// A read or write of `len` bytes at `iova`; `keep` holds the memory
    /// alive while the device owns it, when the caller handed one over.
    pub(super) fn rw(
        &mut self,
        dir: Direction,
        ns: &Namespace,
        lba: u64,
        (iova, len): (u64, usize),
        keep: Option<&DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if keep.is_some_and(|b| !self.owns(b)) {
            return Err(SubmitError::Invalid(
                "buffer of another DMA context: allocate it from this controller's",
            ));
        }
        let shift = ns.shift();
        if len == 0 || len & (ns.block_size as usize - 1) != 0 {
            return Err(SubmitError::Invalid(
                "length is not a multiple of the block size",
            ));
        }
        if !iova.is_multiple_of(4) {
            return Err(SubmitError::Invalid("buffer is not dword aligned"));
        }
        let blocks = (len >> shift) as u64;
        if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        // Split at multiples of the block size no larger than max_transfer;
        // the first page may be partial, so leave room for it in the list.
        let chunk = (self.max_transfer >> shift << shift).max(ns.block_size as usize);
        let parts = len.div_ceil(chunk);
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, keep.cloned());
        let base_iova = iova;
        let mut off = 0usize;
        while off < len {
            let n = chunk.min(len - off);
            let iova = base_iova + off as u64;
            let slot = self.reserve();
            let pool = &self.pool;
            let page = slot.page;
            let prps = split::build_prps(iova, n, PAGE_SIZE, slot.page_iova, |k, e| {
                let _ = pool.write_u64(page + 8 * k, e);
            });
            let Some((prp1, prp2, _)) = prps else {
                // Unreachable: the buffer is dword aligned and each part is
                // at most max_transfer ≤ one PRP list page. Should it ever
                // happen, the part is failed, never sent malformed, and the
                // request is still reported exactly once.
                self.unreserve(slot);
                let r = &mut self.reqs[req as usize];
                r.error = Some(IoError::Status(NvmeStatus::INVALID_FIELD));
                r.remaining -= 1;
                if r.remaining == 0 {
                    r.aborted = true;
                    self.aborted_pending += 1;
                }
                off += n;
                continue;
            };
            let blocks = (n >> shift) as u32;
            let slba = lba + (off >> shift) as u64;
            let prps = Prps { prp1, prp2 };
            let sqe = match dir {
                Direction::Read => cmd::Read::new(ns.nsid, slba, blocks).build(prps),
                Direction::Write => cmd::Write::new(ns.nsid, slba, blocks).build(prps),
            };
            self.push_reserved(req, slot, sqe);
            off += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes (a multiple of the block size) at `lba` into
    /// `buf`. Staged: call [`QueuePair::ring`] or [`QueuePair::poll`].
    #[inline]
    pub fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(
            Direction::Read,
            ns,
            lba,
            (buf.iova(), buf.len()),
            Some(buf),
            tag,
        )
    }

    /// Reads `len` bytes (a multiple of the block size) at `lba` into the
    /// DMA memory at `iova`, which the caller keeps alive: for layers that
    /// describe buffers by address (the block-device stack). Staged like
    /// [`QueuePair::read`].
    ///
    /// # Safety
    ///
    /// `iova..iova + len` must be memory of this controller's
    /// [`DmaContext`](crate::DmaContext) that stays allocated, and that
    /// nobody else reads or writes, until this request's completion has
    /// been reported by [`QueuePair::poll`] (or the queue pair dropped).
    #[inline]
    pub unsafe fn read_iova(
        &mut self,
        ns: &Namespace,
        lba: u64,
        iova: u64,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(Direction::Read, ns, lba, (iova, len), None, tag)
    }

    /// Writes `len` bytes at `iova` to `lba`. Staged like
    /// [`QueuePair::read`].
    ///
    /// # Safety
    ///
    /// `iova..iova + len` must be memory of this controller's
    /// [`DmaContext`](crate::DmaContext) that stays allocated, and that
    /// nobody writes, until this request's completion has been reported by
    /// [`QueuePair::poll`] (or the queue pair dropped).
    #[inline]
    pub unsafe fn write_iova(
        &mut self,
        ns: &Namespace,
        lba: u64,
        iova: u64,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(Direction::Write, ns, lba, (iova, len), None, tag)
    }

    /// Writes `buf` at `lba`. Staged like [`QueuePair::read`].
    #[inline]
    pub fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.rw(
            Direction::Write,
            ns,
            lba,
            (buf.iova(), buf.len()),
            Some(buf),
            tag,
        )
    }

    /// Flushes the namespace's volatile write cache.
    pub fn flush(&mut self, ns: &Namespace, tag: u64) -> std::result::Result<(), SubmitError> {
        self.check_submit(1)?;
        let req = self.alloc_req(tag, 1, None);
        self.push_cmd(req, cmd::Flush::new(ns.nsid).build());
        Ok(())
    }

    /// Writes zeroes to `blocks` blocks at `lba` (split at 65536 blocks).
    pub fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let (parts, commands) = ns.write_zeroes_commands(lba, blocks)?;
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, None);
        for sqe in commands {
            self.push_cmd(req, sqe);
        }
        Ok(())
    }

    /// Deallocates (trims) `ranges` of `(lba, blocks)`: one Dataset
    /// Management command, at most 256 ranges of at most 2^32 - 1 blocks.
    pub fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u32)],
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(SubmitError::Invalid("deallocate takes 1 to 256 ranges"));
        }
        if ranges
            .iter()
            .any(|&(l, n)| l.checked_add(n as u64).is_none_or(|e| e > ns.blocks))
        {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        self.check_submit(1)?;
        let slot = self.reserve();
        for (i, &(slba, blocks)) in ranges.iter().enumerate() {
            let range = DsmRange {
                cattr: 0.into(),
                nlb: blocks.into(),
                slba: slba.into(),
            };
            let _ = self
                .pool
                .write(slot.page + size_of::<DsmRange>() * i, range);
        }
        let req = self.alloc_req(tag, 1, None);
        let sqe =
            cmd::Deallocate::new(ns.nsid, ranges.len() as u32).build(Prps::single(slot.page_iova));
        self.push_reserved(req, slot, sqe);
        Ok(())
    }

    /// Copies source `ranges` of `(lba, blocks)`, concatenated, to `dest`
    /// within the namespace, split into as many Copy commands (format 0) as
    /// MSRC, MSSRL and MCL require; completes once.
    pub fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        let splitter = ns.copy_splitter(ranges, dest)?;
        let parts = splitter.count_commands();
        self.check_submit(parts)?;
        let req = self.alloc_req(tag, parts as u16, None);
        let mut sp = splitter;
        // One slot per command the splitter counted, no more: a slot taken
        // from an empty free list would alias CID 0.
        for _ in 0..parts {
            let slot = self.reserve();
            let pool = &self.pool;
            let page = slot.page;
            let Some((dest, count, _)) = sp.next_command(|i, slba, n| {
                write_copy_desc(pool, page + 32 * i, slba, n);
            }) else {
                self.unreserve(slot);
                break;
            };
            self.push_copy(req, ns, slot, dest, count);
        }
        Ok(())
    }

    /// Sends exactly one Copy command (format 0) with these source ranges
    /// and no splitting: the device enforces its limits (Command Size Limit
    /// Exceeded when they are exceeded). At most 128 ranges, each at most
    /// 65536 blocks.
    pub fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        Namespace::check_single_copy(ranges)?;
        self.check_submit(1)?;
        let slot = self.reserve();
        for (i, &(slba, n)) in ranges.iter().enumerate() {
            write_copy_desc(&self.pool, slot.page + 32 * i, slba, n);
        }
        let req = self.alloc_req(tag, 1, None);
        self.push_copy(req, ns, slot, dest, ranges.len());
        Ok(())
    }

    /// Passthrough: sends `sqe` as given except for the CID and, when
    /// `buf` is given, PRP1/PRP2 describing it (at most
    /// [`QueuePair::max_transfer`] bytes). No other check: the device
    /// judges the command.
    pub fn submit_raw(
        &mut self,
        mut sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> std::result::Result<(), SubmitError> {
        if buf.is_some_and(|b| !self.owns(b)) {
            return Err(SubmitError::Invalid(
                "buffer of another DMA context: allocate it from this controller's",
            ));
        }
        if let Some(b) = buf
            && (b.is_empty() || b.len() > self.max_transfer || b.iova() % 4 != 0)
        {
            return Err(SubmitError::Invalid(
                "raw buffer empty, misaligned or beyond max transfer",
            ));
        }
        self.check_submit(1)?;
        let slot = self.reserve();
        if let Some(b) = buf {
            let pool = &self.pool;
            let page = slot.page;
            let Some((p1, p2, _)) =
                split::build_prps(b.iova(), b.len(), PAGE_SIZE, slot.page_iova, |k, e| {
                    let _ = pool.write_u64(page + 8 * k, e);
                })
            else {
                self.unreserve(slot);
                return Err(SubmitError::Invalid("raw buffer does not fit one PRP list"));
            };
            sqe.prp1 = p1.into();
            sqe.prp2 = p2.into();
        }
        let req = self.alloc_req(tag, 1, buf.cloned());
        self.push_reserved(req, slot, sqe);
        Ok(())
    }

    pub(super) fn push_copy(
        &mut self,
        req: u16,
        ns: &Namespace,
        slot: Reserved,
        dest: u64,
        count: usize,
    ) {
        let sqe = cmd::Copy::new(ns.nsid, dest, count as u32).build(Prps::single(slot.page_iova));
        self.push_reserved(req, slot, sqe);
    }
}

pub(super) fn write_copy_desc(pool: &DmaBuffer, at: usize, slba: u64, blocks: u64) {
    let d = CopyRangeFormat0 {
        slba: slba.into(),
        nlb: ((blocks - 1) as u16).into(),
        ..Default::default()
    };
    let _ = pool.write(at, d);
}
