//! Commands and their status, whatever carries them: the seam between the
//! checks that are about NVMe commands ([`crate::conformance`]) and the
//! ways a host sends them.
//!
//! [`ControllerView`] is what a host knows of a controller (Identify data,
//! its namespaces, buffers it can transfer, queues it can open) and
//! [`IoQueue`] one queue of commands (submit, poll, drain). Neither names
//! PRPs, IOVAs, doorbells or registers: [`Controller`] and [`QueuePair`]
//! implement them over PCIe (VFIO, the emulator), and so can a transport
//! that hands commands to a kernel (io_uring passthrough on a generic
//! node) or sends capsules with their data (NVMe/TCP). What only PCIe
//! has (resets, doorbells, CAP) stays on [`Controller`].

use std::time::Duration;

use crate::dma::{DmaBuffer, DmaSlice};
use crate::driver::{Completion, Controller, Namespace, QueueOptions, QueuePair, SubmitError};
use crate::spec::{IdentifyController, SubmissionEntry};
use crate::transport::Transport;

/// Which namespaces a view's queues may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespaceScope {
    /// Any namespace id goes to the controller, which judges it (Invalid
    /// Namespace or Format for one that is not active).
    Controller,
    /// Only this namespace: the host refuses a command naming another one
    /// before the controller sees it ([`IoError::Os`](crate::IoError::Os)),
    /// as a kernel's generic node (`/dev/ngXnY`) does.
    Namespace(u32),
}

/// A controller as a host that sends it commands sees it.
///
/// `Sync`: queues are created and driven on several threads at once, one
/// queue per thread.
pub trait ControllerView: Sync {
    /// Set-up, allocation and polling errors (typed per transport).
    type Error: std::error::Error + Send + Sync + 'static;
    /// The queue [`ControllerView::create_queue`] makes.
    type Queue: IoQueue<Error = Self::Error>;

    /// The name used in errors.
    fn name(&self) -> &str;

    /// Identify Controller data.
    fn identify(&self) -> &IdentifyController;

    /// The namespaces this view serves, in NSID order.
    fn namespaces(&self) -> &[Namespace];

    /// The namespace `nsid`, if this view serves it.
    fn namespace(&self, nsid: u32) -> Option<Namespace> {
        self.namespaces().iter().find(|n| n.nsid == nsid).copied()
    }

    /// Which namespaces commands may name.
    fn scope(&self) -> NamespaceScope;

    /// Largest transfer of one command, in bytes.
    fn max_transfer(&self) -> usize;

    /// Entries of the largest queue [`ControllerView::create_queue`] makes.
    fn max_queue_entries(&self) -> u32;

    /// I/O queues the controller granted this host.
    fn io_queues(&self) -> u16;

    /// A buffer the queues can transfer.
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, Self::Error>;

    /// A new I/O queue (`opts.entries` deep; transports whose host owns
    /// the command timeouts ignore `opts.timeout`).
    fn create_queue(&self, opts: QueueOptions) -> Result<Self::Queue, Self::Error>;
}

/// One queue of commands, owned by one thread. Submissions are staged
/// until the next [`IoQueue::poll`]; every request is reported exactly
/// once, by tag, with its [`NvmeStatus`](crate::NvmeStatus) or the
/// [`IoError`](crate::IoError) that stood in for one.
pub trait IoQueue: Send {
    /// Polling errors (typed per transport).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends `sqe` as given (the queue sets what its transport owns: the
    /// command id, the data pointer), with `buf` as its data. No other
    /// check: the device, or the host's transport, judges the command.
    fn submit_raw(
        &mut self,
        sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Reads `buf.len()` bytes (a multiple of the block size) at `lba`,
    /// split at the largest transfer; completes once.
    fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Writes `buf` at `lba`, split like [`IoQueue::read`].
    fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Copies source `ranges` of `(lba, blocks)`, concatenated, to `dest`
    /// within the namespace, split into as many Copy commands as MSRC,
    /// MSSRL and MCL require; completes once.
    fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Sends exactly one Copy command (format 0) with these source ranges,
    /// unsplit: the device enforces its limits. At most 128 ranges, each
    /// at most 65536 blocks.
    fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Hands staged commands over, then reports up to `max` finished
    /// requests to `on_done`; returns how many.
    fn poll(&mut self, max: usize, on_done: impl FnMut(Completion)) -> Result<usize, Self::Error>;

    /// Polls until every outstanding request is reported or `timeout`
    /// passes; returns the completions.
    fn drain(&mut self, timeout: Duration) -> Result<Vec<Completion>, Self::Error>;
}

impl<T: Transport> ControllerView for Controller<T> {
    type Error = crate::Error;
    type Queue = QueuePair<T>;

    fn name(&self) -> &str {
        Controller::name(self)
    }

    fn identify(&self) -> &IdentifyController {
        Controller::identify(self)
    }

    fn namespaces(&self) -> &[Namespace] {
        Controller::namespaces(self)
    }

    fn namespace(&self, nsid: u32) -> Option<Namespace> {
        Controller::namespace(self, nsid)
    }

    fn scope(&self) -> NamespaceScope {
        NamespaceScope::Controller
    }

    fn max_transfer(&self) -> usize {
        Controller::max_transfer(self)
    }

    fn max_queue_entries(&self) -> u32 {
        self.cap().max_queue_entries()
    }

    fn io_queues(&self) -> u16 {
        Controller::io_queues(self)
    }

    fn dma_alloc(&self, len: usize) -> crate::Result<DmaBuffer> {
        Controller::dma_alloc(self, len)
    }

    fn create_queue(&self, opts: QueueOptions) -> crate::Result<QueuePair<T>> {
        self.create_qpair(opts)
    }
}

impl<T: Transport> IoQueue for QueuePair<T> {
    type Error = crate::Error;

    fn submit_raw(
        &mut self,
        sqe: SubmissionEntry,
        buf: Option<&DmaSlice>,
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::submit_raw(self, sqe, buf, tag)
    }

    fn read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::read(self, ns, lba, buf, tag)
    }

    fn write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaSlice,
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::write(self, ns, lba, buf, tag)
    }

    fn copy(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::copy(self, ns, ranges, dest, tag)
    }

    fn copy_single(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u64)],
        dest: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::copy_single(self, ns, ranges, dest, tag)
    }

    fn poll(&mut self, max: usize, on_done: impl FnMut(Completion)) -> crate::Result<usize> {
        QueuePair::poll(self, max, on_done)
    }

    fn drain(&mut self, timeout: Duration) -> crate::Result<Vec<Completion>> {
        QueuePair::drain(self, timeout)
    }
}

/// Where a request's data lies, for [`BlockQueue`]: each transport takes
/// what it moves data with (PCIe the IOVA, NVMe/TCP the host address).
#[derive(Clone, Copy, Debug)]
pub struct DataRef {
    /// The IOVA of the first byte in the controller's DMA context, when
    /// the memory has one.
    pub iova: Option<u64>,
    /// The host address of the first byte.
    pub host: *mut u8,
    /// Bytes.
    pub len: usize,
}

/// What a block-device leaf drives beyond [`IoQueue`]: data by address
/// (the leaf's callers own their buffers), and the commands without data
/// checks of their own.
pub trait BlockQueue: IoQueue<Error = crate::Error> {
    /// Commands the queue can have outstanding.
    fn depth(&self) -> usize;

    /// Reads `data.len` bytes at `lba` into `data`.
    ///
    /// # Safety
    /// The memory must stay valid, and untouched by anyone else, until the
    /// request is reported (or the queue dropped); where the transport
    /// needs an IOVA, `data.iova` must be one of its controller's context.
    unsafe fn read_data(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: DataRef,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Writes `data` at `lba`.
    ///
    /// # Safety
    /// As for [`BlockQueue::read_data`]; the memory is only read.
    unsafe fn write_data(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: DataRef,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// Flush.
    fn flush(&mut self, ns: &Namespace, tag: u64) -> Result<(), SubmitError>;

    /// Write Zeroes of `blocks` at `lba`, split at 65 536 blocks.
    fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u64,
        tag: u64,
    ) -> Result<(), SubmitError>;

    /// One Dataset Management (deallocate) command over `ranges`.
    fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u32)],
        tag: u64,
    ) -> Result<(), SubmitError>;
}

impl<T: Transport> BlockQueue for QueuePair<T> {
    fn depth(&self) -> usize {
        QueuePair::depth(self)
    }

    unsafe fn read_data(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: DataRef,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let Some(iova) = data.iova else {
            return Err(SubmitError::Invalid("buffer has no IOVA"));
        };
        // SAFETY: the caller's promise.
        unsafe { self.read_iova(ns, lba, iova, data.len, tag) }
    }

    unsafe fn write_data(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: DataRef,
        tag: u64,
    ) -> Result<(), SubmitError> {
        let Some(iova) = data.iova else {
            return Err(SubmitError::Invalid("buffer has no IOVA"));
        };
        // SAFETY: the caller's promise.
        unsafe { self.write_iova(ns, lba, iova, data.len, tag) }
    }

    fn flush(&mut self, ns: &Namespace, tag: u64) -> Result<(), SubmitError> {
        QueuePair::flush(self, ns, tag)
    }

    fn write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u64,
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::write_zeroes(self, ns, lba, blocks, tag)
    }

    fn deallocate(
        &mut self,
        ns: &Namespace,
        ranges: &[(u64, u32)],
        tag: u64,
    ) -> Result<(), SubmitError> {
        QueuePair::deallocate(self, ns, ranges, tag)
    }
}
