//! The caller's buffer of a data request, reached while a channel holds
//! the request under [`Channel::submit`](crate::device::Channel::submit)'s
//! contract. The SCSI leaf's only unsafe code.
//!
//! Each function requires that `req` was accepted by `submit` and that its
//! completion has not been returned yet: the contract then makes
//! `req.buf` valid for `req.buf.len()` bytes, distinct from the channel's
//! own memory, and left alone by the caller until the completion.

use crate::device::IoRequest;

/// Runs `f` on the caller's buffer, to read from it (a write's data).
///
/// # Safety
/// See the module documentation.
pub(super) unsafe fn with_bytes<R>(req: &IoRequest, f: impl FnOnce(&[u8]) -> R) -> R {
    // SAFETY: the caller guarantees the submit contract holds for
    // req.buf; nobody writes it while the request is in flight.
    let bytes = unsafe { std::slice::from_raw_parts(req.buf.host_ptr(), req.buf.len()) };
    f(bytes)
}

/// Runs `f` on the caller's buffer, to fill it (a read's data).
///
/// # Safety
/// See the module documentation.
pub(super) unsafe fn with_bytes_mut<R>(req: &IoRequest, f: impl FnOnce(&mut [u8]) -> R) -> R {
    // SAFETY: the caller guarantees the submit contract holds for
    // req.buf; the channel is its only user until completion, and this is
    // the only slice made of it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(req.buf.host_ptr(), req.buf.len()) };
    f(bytes)
}
