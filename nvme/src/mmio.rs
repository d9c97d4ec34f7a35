//! The one register path between the driver and a transport.
//!
//! The driver reads and writes controller registers and doorbells only
//! through [`RegisterAccess`]. The VFIO transport implements it on the
//! mmap'ed BAR0 ([`crate::vfio::Bar`]); the in-process emulated controller
//! implements it on its register file. The driver is generic over it, so the
//! hot path (doorbell writes) is a direct, inlinable call, not a `dyn` one.

use std::sync::Arc;

use crate::regs;

/// Volatile access to a controller's register window, by byte offset.
///
/// # Contract for implementors
///
/// - Each call is exactly one access of the stated width to the device
///   (volatile: never merged, split, elided or reordered with other register
///   accesses by the compiler).
/// - `offset` must be naturally aligned for the width and the access must lie
///   inside [`RegisterAccess::window_len`]. Offsets come from the driver's own
///   constants, or from doorbell offsets the driver has checked against
///   `window_len` when it created the queue, so a bad offset is a driver bug:
///   implementations `debug_assert!` on it and, in release builds, ignore the
///   write and return all ones for the read (what a PCI read of a missing
///   register returns). They never touch memory outside the window.
pub trait RegisterAccess {
    /// Size of the register window in bytes (registers plus doorbells).
    fn window_len(&self) -> usize;
    /// Reads a 32-bit register.
    fn read32(&self, offset: usize) -> u32;
    /// Writes a 32-bit register.
    fn write32(&self, offset: usize, value: u32);
    /// Reads a 64-bit register as one 64-bit access.
    fn read64(&self, offset: usize) -> u64;
    /// Writes a 64-bit register as one 64-bit access.
    fn write64(&self, offset: usize, value: u64);

    /// Whether a naturally aligned access of `width` bytes at `offset` lies
    /// inside the window.
    #[inline]
    fn in_window(&self, offset: usize, width: usize) -> bool {
        offset.is_multiple_of(width)
            && offset
                .checked_add(width)
                .is_some_and(|end| end <= self.window_len())
    }

    /// Reads CAP.
    #[inline]
    fn cap(&self) -> regs::Cap {
        regs::Cap(self.read64(regs::CAP))
    }

    /// Reads VS.
    #[inline]
    fn version(&self) -> regs::Version {
        regs::Version(self.read32(regs::VS))
    }

    /// Reads CC.
    #[inline]
    fn cc(&self) -> regs::Cc {
        regs::Cc(self.read32(regs::CC))
    }

    /// Reads CSTS, keeping reserved bits.
    #[inline]
    fn csts(&self) -> regs::Csts {
        regs::Csts::from_bits_retain(self.read32(regs::CSTS))
    }
}

impl<T: RegisterAccess + ?Sized> RegisterAccess for &T {
    #[inline]
    fn window_len(&self) -> usize {
        (**self).window_len()
    }
    #[inline]
    fn read32(&self, offset: usize) -> u32 {
        (**self).read32(offset)
    }
    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        (**self).write32(offset, value)
    }
    #[inline]
    fn read64(&self, offset: usize) -> u64 {
        (**self).read64(offset)
    }
    #[inline]
    fn write64(&self, offset: usize, value: u64) {
        (**self).write64(offset, value)
    }
}

impl<T: RegisterAccess + ?Sized> RegisterAccess for Arc<T> {
    #[inline]
    fn window_len(&self) -> usize {
        (**self).window_len()
    }
    #[inline]
    fn read32(&self, offset: usize) -> u32 {
        (**self).read32(offset)
    }
    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        (**self).write32(offset, value)
    }
    #[inline]
    fn read64(&self, offset: usize) -> u64 {
        (**self).read64(offset)
    }
    #[inline]
    fn write64(&self, offset: usize, value: u64) {
        (**self).write64(offset, value)
    }
}

/// Highest queue id whose SQ tail and CQ head doorbells both fit in a
/// register window of `window_len` bytes with doorbell stride `stride`;
/// `None` if not even the admin queue's (qid 0) fit.
pub fn max_doorbell_qid(window_len: usize, stride: usize) -> Option<u16> {
    if stride == 0 {
        return None;
    }
    let room = window_len.checked_sub(regs::DOORBELL_BASE)?;
    // Queue `q` needs doorbells up to cq_head(q) + 4 = BASE + (2q+1)·stride + 4.
    let pairs = room.checked_sub(4)? / stride; // = 2q + 1 at most
    if pairs == 0 {
        return None;
    }
    Some(u16::try_from((pairs - 1) / 2).unwrap_or(u16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_qid_for_qemu_bar() {
        // QEMU: 16 KiB BAR0, stride 4.
        let q = max_doorbell_qid(16 * 1024, 4).expect("fits");
        assert_eq!(q, 1535);
        assert!(regs::cq_head_doorbell(q, 4) + 4 <= 16 * 1024);
        assert!(regs::cq_head_doorbell(q + 1, 4) + 4 > 16 * 1024);
    }

    #[test]
    fn max_qid_edges() {
        assert_eq!(max_doorbell_qid(0x1000, 4), None);
        assert_eq!(max_doorbell_qid(0x1007, 4), None);
        assert_eq!(max_doorbell_qid(0x1008, 4), Some(0));
        assert_eq!(max_doorbell_qid(0x1010, 4), Some(1));
        assert_eq!(max_doorbell_qid(0x2000, 0), None);
        // Huge stride: only the admin queue fits.
        assert_eq!(
            max_doorbell_qid(0x1000 + 128 * 1024 + 4, 128 * 1024),
            Some(0)
        );
        assert_eq!(max_doorbell_qid(usize::MAX, 4), Some(u16::MAX));
        for (len, stride) in [(0x4000, 4), (0x4000, 16), (0x10_0000, 1024), (0x3000, 8)] {
            let q = max_doorbell_qid(len, stride).expect("fits");
            assert!(regs::cq_head_doorbell(q, stride) + 4 <= len);
            if q < u16::MAX {
                assert!(regs::cq_head_doorbell(q + 1, stride) + 4 > len);
            }
        }
    }
}
