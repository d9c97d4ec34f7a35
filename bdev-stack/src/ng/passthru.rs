//! The `ng:` leaf as an [`nvme::ControllerView`]: raw NVMe commands on
//! io_uring passthrough, reported with their NVMe status (or the kernel's
//! errno) instead of the stack's error kinds, so that the NVMe
//! conformance checks (`nvme::conformance`) run on the kernel's path to a
//! controller as they run on ours.
//!
//! Buffers come from a host DMA context ([`DmaContext::host`]): host
//! memory, whose address the kernel maps per command (it builds the PRPs).
//! Identify data is the leaf's, read through the admin ioctl when it
//! opened. The kernel owns timeouts, Abort and resets, so
//! `QueueOptions::timeout` is not used; and the node passes on commands
//! for its own namespace only ([`NamespaceScope::Namespace`]).

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, squeue};
use nvme::cmd::{Copy, Prps, Read, Write};
use nvme::spec::{CopyRangeFormat0, IdentifyController, NvmeStatus, SubmissionEntry};
use nvme::{
    Completion, ControllerView, DmaBuffer, DmaContext, DmaContextId, DmaSlice, IoError, IoQueue,
    Namespace, NamespaceScope, QueueOptions, SubmitError,
};
use zerocopy::IntoBytes;

use super::namespace::{COPY_RANGES, NgNamespace};
use super::sys::{self, PassthruCmd};
use crate::device::{BlockDevice, NotSync};
use crate::error::BdevError;
use crate::uring::{MAX_ENTRIES, Ring};

/// An `ng:` leaf's namespace seen as an NVMe controller that serves it:
/// queues of raw passthrough commands on io_uring rings of their own.
pub struct NgPassthru {
    leaf: Arc<NgNamespace>,
    dma: Arc<DmaContext>,
    namespaces: [Namespace; 1],
    max_transfer: usize,
}

impl NgPassthru {
    /// The view of `leaf` (which keeps holding its block device).
    pub fn new(leaf: Arc<NgNamespace>) -> NgPassthru {
        let info = leaf.info();
        let id = leaf.identify_namespace();
        let namespace = Namespace {
            nsid: leaf.nsid(),
            block_size: info.block_size,
            blocks: info.block_count,
            mssrl: id.mssrl.get(),
            mcl: id.mcl.get(),
            msrc: id.msrc,
        };
        let max_transfer = info
            .max_transfer_blocks
            .saturating_mul(u64::from(info.block_size));
        NgPassthru {
            namespaces: [namespace],
            max_transfer: usize::try_from(max_transfer).unwrap_or(usize::MAX),
            dma: DmaContext::host(),
            leaf,
        }
    }

    /// The leaf.
    pub fn leaf(&self) -> &Arc<NgNamespace> {
        &self.leaf
    }
}

impl ControllerView for NgPassthru {
    type Error = BdevError;
    type Queue = NgPassthruQueue;

    fn name(&self) -> &str {
        &self.leaf.info().name
    }

    fn identify(&self) -> &IdentifyController {
        self.leaf.identify_controller()
    }

    fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    fn scope(&self) -> NamespaceScope {
        NamespaceScope::Namespace(self.leaf.nsid())
    }

    fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    fn max_queue_entries(&self) -> u32 {
        MAX_ENTRIES as u32
    }

    fn io_queues(&self) -> u16 {
        // sysfs silent: the namespace serves I/O, so the kernel has one.
        self.leaf.queue_limits().hw_queues.unwrap_or(1)
    }

    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, BdevError> {
        self.dma.alloc(len).map_err(|source| BdevError::Nvme {
            device: self.leaf.info().name.clone(),
            action: "allocating a passthrough buffer",
            source: Box::new(source),
        })
    }

    fn create_queue(&self, opts: QueueOptions) -> Result<NgPassthruQueue, BdevError> {
        NgPassthruQueue::new(
            &self.leaf.info().name,
            Arc::clone(self.leaf.file()),
            self.dma.id(),
            self.max_transfer,
            usize::from(opts.entries),
        )
    }
}

/// A command the kernel has: its request, and the Copy descriptors it
/// may carry (one page's worth, alive until it completes).
struct Cmd {
    req: u32,
    busy: bool,
    descriptors: Box<[CopyRangeFormat0]>,
}

/// A request: one or more commands, reported once.
struct Req {
    tag: u64,
    /// Commands not yet completed.
    remaining: u32,
    /// The first failure among them.
    error: Option<IoError>,
    /// Keeps the data buffer alive while the kernel may touch it.
    keep: Option<DmaSlice>,
}

/// A queue of passthrough commands on one io_uring ring, owned by one
/// thread. Requests split at the largest transfer (reads, writes) or at
/// the Copy limits complete once, with their first error. Nothing is
/// allocated per request: commands, requests and completions waiting to
/// be reported live in tables sized at creation.
pub struct NgPassthruQueue {
    name: String,
    file: Arc<File>,
    dma: DmaContextId,
    max_transfer: usize,
    ring: Ring<squeue::Entry128, cqueue::Entry32>,
    cmds: Vec<Cmd>,
    free_cmds: Vec<u32>,
    reqs: Vec<Req>,
    free_reqs: Vec<u32>,
    /// Finished, not yet handed to a `poll` caller.
    ready: VecDeque<Completion>,
    /// Requests taken and not yet handed to a `poll` caller.
    outstanding: usize,
    _not_sync: NotSync,
}

impl NgPassthruQueue {
    /// A queue of `entries` commands (and as many requests) on `file`,
    /// taking buffers of the DMA context `dma` only.
    pub(super) fn new(
        name: &str,
        file: Arc<File>,
        dma: DmaContextId,
        max_transfer: usize,
        entries: usize,
    ) -> Result<NgPassthruQueue, BdevError> {
        let entries = entries.clamp(1, MAX_ENTRIES);
        // Completions by interrupt: the checks wait, they do not race.
        let ring = Ring::new(name, entries, entries, false)?;
        Ok(NgPassthruQueue {
            name: name.to_string(),
            file,
            dma,
            max_transfer,
            ring,
            cmds: (0..entries)
                .map(|_| Cmd {
                    req: 0,
                    busy: false,
                    descriptors: vec![CopyRangeFormat0::default(); COPY_RANGES as usize]
                        .into_boxed_slice(),
                })
                .collect(),
            free_cmds: (0..entries as u32).rev().collect(),
            reqs: (0..entries)
                .map(|_| Req {
                    tag: 0,
                    remaining: 0,
                    error: None,
                    keep: None,
                })
                .collect(),
            free_reqs: (0..entries as u32).rev().collect(),
            ready: VecDeque::with_capacity(entries),
            outstanding: 0,
            _not_sync: NotSync::default(),
        })
    }

    /// Requests taken and not yet reported.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Takes a request of `parts` commands, with room for all of them in
    /// the ring.
    fn begin(
        &mut self,
        parts: usize,
        tag: u64,
        keep: Option<&DmaSlice>,
    ) -> Result<u32, SubmitError> {
        if parts == 0 {
            return Err(SubmitError::Invalid("empty request"));
        }
        if parts > self.cmds.len() {
            return Err(SubmitError::Invalid(
                "request needs more commands than the queue has entries",
            ));
        }
        if self.free_cmds.len() < parts || !self.ring.reserve(parts) {
            return Err(SubmitError::QueueFull);
        }
        let Some(req) = self.free_reqs.pop() else {
            return Err(SubmitError::QueueFull);
        };
        self.reqs[req as usize] = Req {
            tag,
            remaining: parts as u32,
            error: None,
            keep: keep.cloned(),
        };
        self.outstanding += 1;
        Ok(req)
    }

    /// A free command slot; `begin` made sure there is one per part.
    fn take_cmd(&mut self) -> Option<u32> {
        self.free_cmds.pop()
    }

    /// Pushes `sqe` as command `cmd` of request `req`, data at
    /// `addr..addr + len`; a part that cannot be sent fails its request
    /// (never left waiting for a completion that will not come).
    ///
    /// # Safety
    /// `addr..addr + len` must stay valid until the command completes.
    unsafe fn push(&mut self, req: u32, cmd: u32, sqe: &SubmissionEntry, (addr, len): (u64, u32)) {
        let entry = PassthruCmd::from_sqe(sqe, addr, len).entry(
            self.file.as_raw_fd(),
            None,
            u64::from(cmd),
        );
        if let Some(c) = self.cmds.get_mut(cmd as usize) {
            c.req = req;
            c.busy = true;
        }
        // SAFETY: the caller keeps the data valid; the file lives in self,
        // and the ring is drained before either goes.
        if !unsafe { self.ring.push(&entry) } {
            // Unreachable: `begin` reserved the room.
            self.unsent(req, cmd, IoError::Os { errno: libc::EBUSY });
        }
    }

    /// Fails the part `cmd` of `req`, which was never sent.
    fn unsent(&mut self, req: u32, cmd: u32, error: IoError) {
        if let Some(c) = self.cmds.get_mut(cmd as usize) {
            c.busy = false;
            self.free_cmds.push(cmd);
        }
        if let Some(c) = finish(&mut self.reqs, &mut self.free_reqs, req, Some(error), 0) {
            self.ready.push_back(c);
        }
    }

    fn owns(&self, buf: &DmaSlice) -> bool {
        buf.context_id() == self.dma
    }

    fn rw(
        &mut self,
        write: bool,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError> {
        if !self.owns(buf) {
            return Err(SubmitError::Invalid(
                "buffer of another DMA context: allocate it with this view's dma_alloc",
            ));
        }
        let bs = ns.block_size as usize;
        let len = buf.len();
        if bs == 0 || len == 0 || !len.is_multiple_of(bs) {
            return Err(SubmitError::Invalid(
                "length is not a multiple of the block size",
            ));
        }
        let addr = buf.host_ptr() as u64;
        if !addr.is_multiple_of(4) {
            return Err(SubmitError::Invalid("buffer is not dword aligned"));
        }
        let blocks = (len / bs) as u64;
        if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(SubmitError::Invalid("LBA range beyond the namespace"));
        }
        let chunk = (self.max_transfer / bs * bs).clamp(bs, u32::MAX as usize / bs * bs);
        let req = self.begin(len.div_ceil(chunk), tag, Some(buf))?;
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            let slba = lba + (off / bs) as u64;
            let nlb = (n / bs) as u32;
            let sqe = if write {
                Write::new(ns.nsid, slba, nlb).build(Prps::NONE)
            } else {
                Read::new(ns.nsid, slba, nlb).build(Prps::NONE)
            };
            let Some(cmd) = self.take_cmd() else { break };
            // SAFETY: the request holds `buf` (Req::keep) until its last
            // command completed.
            unsafe { self.push(req, cmd, &sqe, (addr + off as u64, n as u32)) };
            off += n;
        }
        Ok(())
    }

    /// Fills command `cmd`'s descriptors by `fill` and pushes a Copy of
    /// `count` of them to `dest`.
    fn push_copy(&mut self, req: u32, cmd: u32, nsid: u32, dest: u64, count: usize) {
        let Some(c) = self.cmds.get(cmd as usize) else {
            return;
        };
        let bytes = c.descriptors[..count.min(c.descriptors.len())].as_bytes();
        let data = (bytes.as_ptr() as u64, bytes.len() as u32);
        let sqe = Copy::new(nsid, dest, count as u32).build(Prps::NONE);
        // SAFETY: the descriptors live in the command slot, which is not
        // reused before the command completes (nor dropped: the ring is
        // drained first).
        unsafe { self.push(req, cmd, &sqe, data) };
    }
}

/// Writes one format-0 source range descriptor.
fn descriptor(slot: Option<&mut CopyRangeFormat0>, slba: u64, blocks: u64) {
    if let Some(d) = slot {
        *d = CopyRangeFormat0 {
            slba: slba.into(),
            nlb: (blocks.saturating_sub(1) as u16).into(),
            ..CopyRangeFormat0::default()
        };
    }
}

/// Counts one finished command of request `index`; the request's
/// completion once it was the last.
fn finish(
    reqs: &mut [Req],
    free_reqs: &mut Vec<u32>,
    index: u32,
    error: Option<IoError>,
    dw0: u32,
) -> Option<Completion> {
    let r = reqs.get_mut(index as usize)?;
    if r.remaining == 0 {
        return None;
    }
    r.remaining -= 1;
    if r.error.is_none() {
        r.error = error;
    }
    if r.remaining > 0 {
        return None;
    }
    r.keep = None;
    free_reqs.push(index);
    Some(Completion {
        tag: r.tag,
        result: r.error.map_or(Ok(dw0), Err),
        dw0,
    })
}

impl IoQueue for NgPassthruQueue {
    type Error = BdevError;

    fn submit_raw(
        &mut self,
        sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let data = match buf {
            None => (0, 0),
            Some(b) if !self.owns(b) => {
                return Err(SubmitError::Invalid(
                    "buffer of another DMA context: allocate it with this view's dma_alloc",
                ));
            }
            Some(b) => match u32::try_from(b.len()) {
                Ok(len) if len > 0 => (b.host_ptr() as u64, len),
                _ => return Err(SubmitError::Invalid("raw buffer empty or over 4 GiB")),
            },
        };
        let req = self.begin(1, tag, buf)?;
        if let Some(cmd) = self.take_cmd() {
            // SAFETY: the request holds `buf` until the command completes.
            unsafe { self.push(req, cmd, &sqe, data) };
        }
        Ok(())
    }

    fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError> {
        self.rw(false, ns, lba, buf, tag)
    }

    fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError> {
        self.rw(true, ns, lba, buf, tag)
    }

    fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let mut splitter = ns.copy_splitter(ranges, dest)?;
        let parts = splitter.count_commands();
        let req = self.begin(parts, tag, None)?;
        for _ in 0..parts {
            let Some(cmd) = self.take_cmd() else { break };
            let Some(c) = self.cmds.get_mut(cmd as usize) else {
                break;
            };
            let slots = &mut c.descriptors;
            let next = splitter.next_command(|i, slba, n| descriptor(slots.get_mut(i), slba, n));
            match next {
                Some((dest, count, _)) => self.push_copy(req, cmd, ns.nsid, dest, count),
                // Unreachable (the splitter counted these commands); the
                // request still completes, failed, never hangs.
                None => self.unsent(req, cmd, IoError::Status(NvmeStatus::INVALID_FIELD)),
            }
        }
        Ok(())
    }

    fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        Namespace::check_single_copy(ranges)?;
        let req = self.begin(1, tag, None)?;
        let Some(cmd) = self.take_cmd() else {
            return Ok(());
        };
        if let Some(c) = self.cmds.get_mut(cmd as usize) {
            for (slot, &(slba, n)) in c.descriptors.iter_mut().zip(ranges) {
                descriptor(Some(slot), slba, n);
            }
        }
        self.push_copy(req, cmd, ns.nsid, dest, ranges.len());
        Ok(())
    }

    fn poll(
        &mut self,
        max: usize,
        mut on_done: impl FnMut(Completion),
    ) -> Result<usize, BdevError> {
        let mut n = 0;
        while n < max {
            let Some(c) = self.ready.pop_front() else {
                break;
            };
            on_done(c);
            n += 1;
        }
        if n == max {
            self.outstanding -= n;
            return Ok(n);
        }
        let (cmds, free_cmds) = (&mut self.cmds, &mut self.free_cmds);
        let (reqs, free_reqs, ready) = (&mut self.reqs, &mut self.free_reqs, &mut self.ready);
        self.ring.reap(usize::MAX, |user_data, result, cqe| {
            let Some(cmd) = usize::try_from(user_data)
                .ok()
                .and_then(|i| cmds.get_mut(i))
                .filter(|c| c.busy)
            else {
                // Not a command of ours in flight: ignored.
                return;
            };
            cmd.busy = false;
            free_cmds.push(user_data as u32);
            let error = sys::io_error(sys::outcome(result));
            // The big CQE's first word is the command's result (DW0).
            let dw0 = cqe.big_cqe()[0] as u32;
            if let Some(c) = finish(reqs, free_reqs, cmd.req, error, dw0) {
                if n < max {
                    on_done(c);
                    n += 1;
                } else {
                    // One per request at most: the queue never grows.
                    ready.push_back(c);
                }
            }
        });
        self.outstanding -= n;
        Ok(n)
    }

    fn drain(&mut self, timeout: Duration) -> Result<Vec<Completion>, BdevError> {
        let start = Instant::now();
        let mut out = Vec::new();
        while self.outstanding > 0 {
            self.poll(usize::MAX, |c| out.push(c))?;
            if self.outstanding == 0 {
                break;
            }
            if start.elapsed() > timeout {
                return Err(BdevError::Passthrough {
                    device: self.name.clone(),
                    problem: format!(
                        "{} requests did not complete within {} ms; the kernel times them \
                         out itself (nvme_core.io_timeout), aborting and resetting the \
                         controller",
                        self.outstanding,
                        timeout.as_millis()
                    ),
                    source: None,
                });
            }
            std::thread::yield_now();
        }
        Ok(out)
    }
}

impl Drop for NgPassthruQueue {
    fn drop(&mut self) {
        // The kernel may still read or write buffers and descriptors of
        // commands in flight: wait for their completions.
        self.ring.drain(|_, _, _| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue on a regular file, which takes no passthrough commands: the
    /// kernel fails every command (EOPNOTSUPP) without a device, so the
    /// queue's own logic (validation, splitting, one completion per
    /// request, the errno kept as such) runs on any host.
    fn null_queue(
        entries: usize,
        max_transfer: usize,
    ) -> Option<(NgPassthruQueue, Arc<DmaContext>)> {
        let path = std::env::temp_dir().join(format!(
            "ustor-ng-passthru-{}-{entries}",
            std::process::id()
        ));
        let file = File::create(&path).expect("scratch file");
        let _ = std::fs::remove_file(&path);
        let file = Arc::new(file);
        let dma = DmaContext::host();
        match NgPassthruQueue::new("null", file, dma.id(), max_transfer, entries) {
            Ok(q) => Some((q, dma)),
            Err(e) => {
                eprintln!("SKIPPED: io_uring with 128-byte entries unavailable here: {e}");
                None
            }
        }
    }

    const NS: Namespace = Namespace {
        nsid: 1,
        block_size: 4096,
        blocks: 1024,
        mssrl: 4,
        mcl: 8,
        msrc: 1,
    };

    #[test]
    fn split_requests_complete_once_with_the_kernels_errno() {
        let Some((mut q, dma)) = null_queue(8, 8192) else {
            return;
        };
        let buf = dma.alloc(5 * 4096).expect("buffer");
        // Three commands (8 KiB each at most), one completion.
        q.write(&NS, 10, &buf.as_slice(), 1).expect("write");
        // Two source ranges of 6 blocks each, MSSRL 4 and MCL 8: three Copies.
        q.copy(&NS, &[(0, 6), (100, 6)], 500, 2).expect("copy");
        q.copy_single(&NS, &[(0, 1)], 600, 3).expect("copy single");
        q.submit_raw(
            SubmissionEntry::new(nvme::spec::nvm_opc::READ, 1),
            Some(&buf.slice(0, 4096).expect("slice")),
            4,
        )
        .expect("raw");
        let mut done = q.drain(Duration::from_secs(10)).expect("drain");
        done.sort_by_key(|c| c.tag);
        let refused = Err(IoError::Os {
            errno: libc::EOPNOTSUPP,
        });
        assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(done.iter().all(|c| c.result == refused), "{done:?}");
        assert_eq!((q.outstanding(), q.free_cmds.len()), (0, 8));
    }

    #[test]
    fn malformed_requests_are_refused_before_the_kernel() {
        let Some((mut q, dma)) = null_queue(4, 8192) else {
            return;
        };
        let buf = dma.alloc(8192).expect("buffer");
        let s = buf.as_slice();
        let invalid = |r: Result<(), SubmitError>| matches!(r, Err(SubmitError::Invalid(_)));
        assert!(invalid(q.read(&NS, NS.blocks - 1, &s, 0)), "past the end");
        let odd = buf.slice(0, 100).expect("slice");
        assert!(invalid(q.read(&NS, 0, &odd, 0)), "partial block");
        let other = DmaContext::host().alloc(4096).expect("buffer");
        assert!(
            invalid(q.read(&NS, 0, &other.as_slice(), 0)),
            "other context"
        );
        // Five 8 KiB commands for a queue of four entries.
        let big = dma.alloc(10 * 4096).expect("buffer");
        assert!(
            invalid(q.write(&NS, 0, &big.as_slice(), 0)),
            "too many parts"
        );
        assert!(invalid(q.copy_single(&NS, &[(0, 0)], 10, 0)), "empty range");
        assert!(
            invalid(q.copy(&NS, &[(0, 1)], NS.blocks, 0)),
            "destination past the end"
        );
        assert_eq!(q.outstanding(), 0);
        // Four entries: the fifth request waits for a poll.
        for tag in 0..4 {
            q.read(&NS, tag * 2, &s, tag).expect("read");
        }
        assert_eq!(q.read(&NS, 0, &s, 9), Err(SubmitError::QueueFull));
        assert_eq!(q.drain(Duration::from_secs(10)).expect("drain").len(), 4);
        q.read(&NS, 0, &s, 9).expect("room again");
        assert_eq!(q.drain(Duration::from_secs(10)).expect("drain").len(), 1);
    }
}
