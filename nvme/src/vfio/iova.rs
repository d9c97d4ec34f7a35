//! IOVA (I/O virtual address) allocation inside the ranges the IOMMU
//! translates.
//!
//! An IOMMU translates only part of the 64-bit space (QEMU's intel-iommu:
//! 39 bits by default) and reserves holes in it (the x86 MSI window at
//! 0xfee00000). VFIO reports the usable ranges in the IOVA-range capability
//! of VFIO_IOMMU_GET_INFO; [`IovaAllocator`] hands out page-aligned IOVAs only
//! inside them. It is first-fit over a coalescing free list, so freed ranges
//! are reused and address space does not leak. Allocation happens at set-up
//! time, not on the I/O path, so the linear scan is fine.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A half-open range `[start, end)` of I/O virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    start: u64,
    end: u64,
}

impl IovaRange {
    /// `[start, end)`; `None` if empty.
    pub const fn new(start: u64, end: u64) -> Option<IovaRange> {
        if start < end {
            Some(IovaRange { start, end })
        } else {
            None
        }
    }

    /// From VFIO's inclusive form `[start, last]`. The top byte of a range
    /// ending at `u64::MAX` is dropped (allocations are page-aligned anyway).
    pub const fn from_inclusive(start: u64, last: u64) -> Option<IovaRange> {
        IovaRange::new(start, last.saturating_add(1))
    }

    /// First address.
    pub const fn start(self) -> u64 {
        self.start
    }

    /// One past the last address.
    pub const fn end(self) -> u64 {
        self.end
    }

    /// Length in bytes.
    pub const fn len(self) -> u64 {
        self.end - self.start
    }

    /// Always false: ranges are never empty.
    pub const fn is_empty(self) -> bool {
        false
    }
}

/// Allocator of page-aligned IOVA ranges.
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    granule: u64,
    ranges: Vec<IovaRange>,
    /// Free extents, start -> end (exclusive); disjoint, never adjacent.
    free: BTreeMap<u64, u64>,
    /// Live allocations, start -> length.
    allocated: BTreeMap<u64, u64>,
}

impl IovaAllocator {
    /// Lowest IOVA ever handed out: keeping page 0 and its neighbours
    /// unmapped turns a zero or tiny DMA address (a driver bug) into an IOMMU
    /// fault instead of silent corruption.
    pub const MIN_IOVA: u64 = 0x1_0000;

    /// Used when the kernel does not report IOVA ranges: QEMU intel-iommu's
    /// default 39-bit space. Real IOMMUs translate at least this much.
    pub const FALLBACK_RANGE: IovaRange = IovaRange {
        start: Self::MIN_IOVA,
        end: 1 << 39,
    };

    /// An allocator over `ranges` (in any order, possibly overlapping),
    /// allocating in multiples of `granule` bytes (the IOMMU's smallest page
    /// size: a power of two, at least 4096). Addresses below
    /// [`Self::MIN_IOVA`] are never used.
    pub fn new(ranges: &[IovaRange], granule: u64) -> Result<IovaAllocator> {
        if !granule.is_power_of_two() || granule < 4096 {
            return Err(Error::InvalidArgument(
                "IOVA granule must be a power of two of at least 4096",
            ));
        }
        let mut clipped: Vec<IovaRange> = ranges
            .iter()
            .filter_map(|r| {
                let start = align_up(r.start.max(Self::MIN_IOVA), granule)?;
                let end = r.end & !(granule - 1);
                IovaRange::new(start, end)
            })
            .collect();
        clipped.sort();
        let mut merged: Vec<IovaRange> = Vec::with_capacity(clipped.len());
        for r in clipped {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        if merged.is_empty() {
            return Err(Error::NoIovaRange);
        }
        Ok(IovaAllocator {
            granule,
            free: merged.iter().map(|r| (r.start, r.end)).collect(),
            ranges: merged,
            allocated: BTreeMap::new(),
        })
    }

    /// The usable ranges, sorted, merged, clipped and granule-aligned.
    pub fn ranges(&self) -> &[IovaRange] {
        &self.ranges
    }

    /// Allocation granule in bytes.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(s, e)| e - s).sum()
    }

    /// Allocates `len` bytes (rounded up to the granule) at an address
    /// aligned to `align` (a power of two; the granule if smaller). Returns
    /// the start; [`Error::IovaExhausted`] if no free range fits.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidArgument("IOVA allocation of zero bytes"));
        }
        if !align.is_power_of_two() {
            return Err(Error::InvalidArgument(
                "IOVA alignment must be a power of two",
            ));
        }
        let align = align.max(self.granule);
        let exhausted = Error::IovaExhausted { len, align };
        let Some(len) = align_up(len, self.granule) else {
            return Err(exhausted);
        };
        let found = self.free.iter().find_map(|(&s, &e)| {
            let a = align_up(s, align)?;
            let end = a.checked_add(len)?;
            (end <= e).then_some((s, e, a, end))
        });
        let Some((s, e, a, end)) = found else {
            return Err(exhausted);
        };
        self.free.remove(&s);
        if s < a {
            self.free.insert(s, a);
        }
        if end < e {
            self.free.insert(end, e);
        }
        self.allocated.insert(a, len);
        Ok(a)
    }

    /// Narrows the allocator to what `ranges` also allow (a second device
    /// joined the IOMMU domain). Fails, changing nothing, if a live
    /// allocation lies outside the new ranges.
    pub fn restrict(&mut self, ranges: &[IovaRange]) -> Result<()> {
        let other = IovaAllocator::new(ranges, self.granule)?;
        let inside =
            |s: u64, e: u64, set: &[IovaRange]| set.iter().any(|r| s >= r.start && e <= r.end);
        for (&s, &l) in &self.allocated {
            if !inside(s, s + l, &other.ranges) {
                return Err(Error::IovaExhausted {
                    len: l,
                    align: self.granule,
                });
            }
        }
        let mut merged = Vec::new();
        for a in &self.ranges {
            for b in &other.ranges {
                if let Some(r) = IovaRange::new(a.start.max(b.start), a.end.min(b.end)) {
                    merged.push(r);
                }
            }
        }
        if merged.is_empty() {
            return Err(Error::NoIovaRange);
        }
        merged.sort();
        let mut free = BTreeMap::new();
        for r in &merged {
            let mut cur = r.start;
            for (&s, &l) in self.allocated.range(r.start..r.end) {
                if s > cur {
                    free.insert(cur, s);
                }
                cur = cur.max(s + l);
            }
            if cur < r.end {
                free.insert(cur, r.end);
            }
        }
        self.ranges = merged;
        self.free = free;
        Ok(())
    }

    /// Frees the allocation that starts at `iova`; returns its length, or
    /// `None` (and changes nothing) if there is no such allocation.
    pub fn free(&mut self, iova: u64) -> Option<u64> {
        let len = self.allocated.remove(&iova)?;
        let mut start = iova;
        let mut end = iova + len;
        // Coalesce with the free extent just before and just after.
        if let Some((&ps, &pe)) = self.free.range(..start).next_back()
            && pe == start
        {
            self.free.remove(&ps);
            start = ps;
        }
        if let Some(ne) = self.free.remove(&end) {
            end = ne;
        }
        self.free.insert(start, end);
        Some(len)
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: u64 = 4096;

    fn r(start: u64, end: u64) -> IovaRange {
        IovaRange::new(start, end).expect("non-empty")
    }

    fn inside(a: &IovaAllocator, start: u64, len: u64) -> bool {
        a.ranges()
            .iter()
            .any(|r| start >= r.start() && start + len <= r.end())
    }

    #[test]
    fn normalizes_ranges() {
        let a = IovaAllocator::new(
            &[
                r(0xfef0_0000, 1 << 39),
                r(0, 0xfee0_0000),
                r(0x1000, 0x2_0000),
            ],
            PAGE,
        )
        .expect("ranges");
        assert_eq!(
            a.ranges(),
            &[
                r(IovaAllocator::MIN_IOVA, 0xfee0_0000),
                r(0xfef0_0000, 1 << 39)
            ]
        );
        assert!(matches!(
            IovaAllocator::new(&[r(0, 0x8000)], PAGE),
            Err(Error::NoIovaRange)
        ));
        assert!(IovaAllocator::new(&[], PAGE).is_err());
        assert!(IovaAllocator::new(&[r(0, 1 << 39)], 1000).is_err());
        assert!(IovaAllocator::new(&[r(0, 1 << 39)], 2048).is_err());
    }

    #[test]
    fn allocations_are_aligned_inside_and_disjoint() {
        let mut a =
            IovaAllocator::new(&[r(0, 0xfee0_0000), r(0xfef0_0000, 1 << 39)], PAGE).expect("ok");
        let x = a.alloc(1, 1).expect("alloc");
        assert_eq!(x, IovaAllocator::MIN_IOVA);
        let y = a.alloc(2 << 20, 2 << 20).expect("alloc");
        assert_eq!(y % (2 << 20), 0);
        assert!(y >= x + PAGE);
        // Spanning the MSI hole is impossible: a request that does not fit
        // below it lands above it.
        let big = a.alloc(0xfee0_0000, PAGE).expect("alloc");
        assert!(big >= 0xfef0_0000 && inside(&a, big, 0xfee0_0000));
    }

    #[test]
    fn freed_ranges_are_reused_and_coalesced() {
        let mut a = IovaAllocator::new(&[r(0, 0x10_0000)], PAGE).expect("ok");
        let total = a.free_bytes();
        let p: Vec<u64> = (0..4)
            .map(|_| a.alloc(PAGE, PAGE).expect("alloc"))
            .collect();
        assert_eq!(a.free(p[1]), Some(PAGE));
        assert_eq!(a.alloc(PAGE, PAGE).expect("alloc"), p[1]);
        assert_eq!(a.free(p[1]), Some(PAGE));
        assert_eq!(a.free(p[1]), None, "double free is refused");
        assert_eq!(a.free(p[2]), Some(PAGE));
        // p[1] and p[2] coalesced: a 2-page allocation fits there.
        assert_eq!(a.alloc(2 * PAGE, PAGE).expect("alloc"), p[1]);
        for q in [p[0], p[1], p[3]] {
            assert!(a.free(q).is_some());
        }
        assert_eq!(a.free_bytes(), total);
        assert_eq!(a.free.len(), 1, "fully coalesced");
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = IovaAllocator::new(&[r(0x1_0000, 0x1_4000)], PAGE).expect("ok");
        assert!(a.alloc(0x4000, PAGE).is_ok());
        assert!(matches!(
            a.alloc(PAGE, PAGE),
            Err(Error::IovaExhausted { .. })
        ));
        assert!(matches!(
            a.alloc(u64::MAX, PAGE),
            Err(Error::IovaExhausted { .. })
        ));
        assert!(a.alloc(0, PAGE).is_err());
        assert!(a.alloc(PAGE, 3).is_err());
    }

    #[test]
    fn restrict_narrows_and_keeps_live() {
        let mut a = IovaAllocator::new(&[r(0, 0x10_0000)], PAGE).expect("ok");
        let x = a.alloc(PAGE, PAGE).expect("alloc");
        a.restrict(&[r(0, 0x8_0000)]).expect("narrow");
        assert_eq!(a.ranges(), &[r(IovaAllocator::MIN_IOVA, 0x8_0000)]);
        assert_eq!(a.free_bytes(), 0x8_0000 - IovaAllocator::MIN_IOVA - PAGE);
        assert!(a.free(x).is_some());
        let y = a.alloc(0x4_0000, PAGE).expect("alloc");
        assert!(
            a.restrict(&[r(0x20_0000, 0x30_0000)]).is_err(),
            "live outside"
        );
        assert!(inside(&a, y, 0x4_0000));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64, u32),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..0x20_0000, 12u32..22).prop_map(|(l, a)| Op::Alloc(l, a)),
            any::<usize>().prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut a = IovaAllocator::new(
                &[r(0, 0x40_0000), r(0x80_0000, 0x100_0000), r(0x200_0000, 0x210_0000)],
                PAGE,
            ).expect("ok");
            let total = a.free_bytes();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(len, align_bits) => {
                        let align = 1u64 << align_bits;
                        if let Ok(s) = a.alloc(len, align) {
                            let rl = len.div_ceil(PAGE) * PAGE;
                            prop_assert_eq!(s % align, 0);
                            prop_assert!(inside(&a, s, rl));
                            for &(ls, ll) in &live {
                                prop_assert!(s + rl <= ls || ls + ll <= s, "overlap");
                            }
                            live.push((s, rl));
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (s, l) = live.swap_remove(i % live.len());
                        prop_assert_eq!(a.free(s), Some(l));
                    }
                    Op::Free(_) => {}
                }
                let used: u64 = live.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(a.free_bytes() + used, total);
            }
        }
    }
}
