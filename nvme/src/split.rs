//! Pure request shaping: PRP construction and Copy splitting. No I/O, no
//! allocation; property-tested against simple models.

/// Entries in one PRP list page of 4 KiB.
pub const PRP_LIST_ENTRIES: usize = 512;

/// The PRP entries for a transfer of `len` bytes at the contiguous IOVA
/// `iova`, with memory page size `ps`: returns `(prp1, prp2, list_len)`.
/// When `list_len > 0`, PRP2 is `list_iova` and `list(k, entry)` has been
/// called for `k in 0..list_len` with the entries to store there.
///
/// `None` if `iova` is not dword aligned, `len` is zero, or the list would
/// need more than [`PRP_LIST_ENTRIES`] entries (callers split requests so
/// that it never does).
pub fn build_prps(
    iova: u64,
    len: usize,
    ps: u64,
    list_iova: u64,
    mut list: impl FnMut(usize, u64),
) -> Option<(u64, u64, usize)> {
    if len == 0 || !iova.is_multiple_of(4) || !ps.is_power_of_two() {
        return None;
    }
    let first = (ps - iova % ps).min(len as u64);
    let rem = len as u64 - first;
    let next = iova.checked_add(first)?;
    if rem == 0 {
        return Some((iova, 0, 0));
    }
    if rem <= ps {
        return Some((iova, next, 0));
    }
    let n = rem.div_ceil(ps) as usize;
    if n > PRP_LIST_ENTRIES {
        return None;
    }
    for k in 0..n {
        list(k, next + k as u64 * ps);
    }
    Some((iova, list_iova, n))
}

/// Largest transfer a single list page allows at page size `ps`, for any
/// start offset: the first page may be partial, so 512 list pages plus 0.
pub fn max_prp_transfer(ps: u64) -> u64 {
    PRP_LIST_ENTRIES as u64 * ps
}

/// Copy limits of a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyLimits {
    /// Max source ranges per command (MSRC + 1, also capped by what fits in
    /// one descriptor page).
    pub max_ranges: usize,
    /// Max blocks per source range (MSSRL).
    pub mssrl: u64,
    /// Max blocks per command (MCL).
    pub mcl: u64,
}

/// Splits a copy of source `ranges` (`(slba, blocks)`, in destination
/// order) into Copy commands within `limits`. Stateful, so that the caller
/// writes each command's descriptors straight into DMA memory without
/// allocating.
#[derive(Clone, Debug)]
pub struct CopySplitter<'a> {
    ranges: &'a [(u64, u64)],
    limits: CopyLimits,
    idx: usize,
    done_in_range: u64,
    dest: u64,
}

impl<'a> CopySplitter<'a> {
    /// `None` if a limit is zero (the namespace cannot copy at all).
    pub fn new(ranges: &'a [(u64, u64)], dest: u64, limits: CopyLimits) -> Option<Self> {
        if limits.max_ranges == 0 || limits.mssrl == 0 || limits.mcl == 0 {
            return None;
        }
        Some(CopySplitter {
            ranges,
            limits,
            idx: 0,
            done_in_range: 0,
            dest,
        })
    }

    /// The next command: calls `emit(i, slba, blocks)` per source range
    /// descriptor and returns `(destination slba, descriptors, blocks)`;
    /// `None` when everything is emitted. Empty source ranges are skipped.
    pub fn next_command(
        &mut self,
        mut emit: impl FnMut(usize, u64, u64),
    ) -> Option<(u64, usize, u64)> {
        let mut count = 0usize;
        let mut total = 0u64;
        while self.idx < self.ranges.len()
            && count < self.limits.max_ranges
            && total < self.limits.mcl
        {
            let (slba, blocks) = self.ranges[self.idx];
            let left = blocks - self.done_in_range;
            if left == 0 {
                self.idx += 1;
                self.done_in_range = 0;
                continue;
            }
            let n = left.min(self.limits.mssrl).min(self.limits.mcl - total);
            emit(count, slba + self.done_in_range, n);
            count += 1;
            total += n;
            self.done_in_range += n;
            if self.done_in_range == blocks {
                self.idx += 1;
                self.done_in_range = 0;
            }
        }
        if count == 0 {
            return None;
        }
        let dest = self.dest;
        self.dest += total;
        Some((dest, count, total))
    }

    /// How many commands the whole copy takes.
    pub fn count_commands(&self) -> usize {
        let mut s = self.clone();
        let mut n = 0;
        while s.next_command(|_, _, _| {}).is_some() {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u64 = 4096;

    #[test]
    fn prp_cases() {
        let none = |_: usize, _: u64| panic!("no list expected");
        assert_eq!(
            build_prps(0x10000, 4096, PS, 0xdead000, none),
            Some((0x10000, 0, 0))
        );
        assert_eq!(
            build_prps(0x10200, 512, PS, 0xdead000, none),
            Some((0x10200, 0, 0))
        );
        assert_eq!(
            build_prps(0x10200, 4096, PS, 0xdead000, none),
            Some((0x10200, 0x11000, 0))
        );
        assert_eq!(
            build_prps(0x10000, 8192, PS, 0xdead000, none),
            Some((0x10000, 0x11000, 0))
        );
        let mut got = Vec::new();
        let r = build_prps(0x10000, 3 * 4096, PS, 0xdead000, |k, e| got.push((k, e)));
        assert_eq!(r, Some((0x10000, 0xdead000, 2)));
        assert_eq!(got, vec![(0, 0x11000), (1, 0x12000)]);
        assert_eq!(
            build_prps(0x10002, 512, PS, 0, none),
            None,
            "not dword aligned"
        );
        assert_eq!(build_prps(0x10000, 0, PS, 0, none), None);
        assert!(build_prps(0x10000, 513 * 4096 + 1, PS, 0, |_, _| {}).is_none());
        assert!(build_prps(0x10000, 513 * 4096, PS, 0, |_, _| {}).is_some());
    }

    proptest! {
        /// The PRPs describe exactly `[iova, iova + len)`: walking them the
        /// way the device does yields contiguous segments covering it.
        #[test]
        fn prps_cover_the_buffer(page in 16u64..1 << 20, off in 0u64..1024, len in 1usize..(600 * 4096)) {
            let iova = page * PS + off * 4;
            let mut list = vec![0u64; PRP_LIST_ENTRIES];
            let r = build_prps(iova, len, PS, 0x1000, |k, e| list[k] = e);
            let pages_after_first = (len as u64).saturating_sub(PS - iova % PS).div_ceil(PS);
            if pages_after_first > PRP_LIST_ENTRIES as u64 {
                prop_assert!(r.is_none());
                return Ok(());
            }
            let (p1, p2, n) = r.expect("fits");
            prop_assert_eq!(p1, iova);
            // Device-side walk (NVMe Base 4.1.1).
            let mut segs = Vec::new();
            let first = (PS - p1 % PS).min(len as u64);
            segs.push((p1, first));
            let mut rem = len as u64 - first;
            if rem > 0 && rem <= PS {
                prop_assert_eq!(n, 0);
                prop_assert_eq!(p2 % PS, 0);
                segs.push((p2, rem));
                rem = 0;
            }
            for e in list.iter().take(n) {
                prop_assert_eq!(e % PS, 0);
                let s = rem.min(PS);
                segs.push((*e, s));
                rem -= s;
            }
            prop_assert_eq!(rem, 0);
            let mut at = iova;
            for (s, l) in segs {
                prop_assert_eq!(s, at);
                at += l;
            }
            prop_assert_eq!(at, iova + len as u64);
        }

        /// Splitting keeps every limit and reproduces the source sequence
        /// with a contiguous destination.
        #[test]
        fn copy_split_respects_limits(
            ranges in proptest::collection::vec((0u64..1 << 30, 0u64..700), 0..40),
            max_ranges in 1usize..20, mssrl in 1u64..300, mcl in 1u64..600, dest in 0u64..1 << 30,
        ) {
            let limits = CopyLimits { max_ranges, mssrl, mcl };
            let mut sp = CopySplitter::new(&ranges, dest, limits).expect("limits non-zero");
            let expected_cmds = sp.count_commands();
            let mut flat: Vec<(u64, u64)> = Vec::new();
            let mut next_dest = dest;
            let mut cmds = 0;
            loop {
                let mut descs = Vec::new();
                let Some((d, count, total)) = sp.next_command(|i, s, n| descs.push((i, s, n))) else { break };
                cmds += 1;
                prop_assert_eq!(d, next_dest);
                prop_assert!(count >= 1 && count <= max_ranges);
                prop_assert_eq!(descs.len(), count);
                prop_assert!(total <= mcl);
                prop_assert_eq!(descs.iter().map(|x| x.2).sum::<u64>(), total);
                for (k, (i, s, n)) in descs.into_iter().enumerate() {
                    prop_assert_eq!(i, k);
                    prop_assert!(n >= 1 && n <= mssrl);
                    // Merge with the previous piece if contiguous in the source.
                    match flat.last_mut() {
                        Some(last) if last.0 + last.1 == s => last.1 += n,
                        _ => flat.push((s, n)),
                    }
                }
                next_dest += total;
            }
            prop_assert_eq!(cmds, expected_cmds);
            // Model: the non-empty source ranges, merged the same way.
            let mut model: Vec<(u64, u64)> = Vec::new();
            for &(s, n) in ranges.iter().filter(|r| r.1 > 0) {
                match model.last_mut() {
                    Some(last) if last.0 + last.1 == s => last.1 += n,
                    _ => model.push((s, n)),
                }
            }
            prop_assert_eq!(flat, model);
            prop_assert_eq!(next_dest - dest, ranges.iter().map(|r| r.1).sum::<u64>());
        }
    }

    #[test]
    fn zero_limits_refused() {
        let r = [(0u64, 1u64)];
        for l in [
            CopyLimits {
                max_ranges: 0,
                mssrl: 1,
                mcl: 1,
            },
            CopyLimits {
                max_ranges: 1,
                mssrl: 0,
                mcl: 1,
            },
            CopyLimits {
                max_ranges: 1,
                mssrl: 1,
                mcl: 0,
            },
        ] {
            assert!(CopySplitter::new(&r, 0, l).is_none());
        }
    }
}
