//! Fixed-capacity pools for per-request state, sized when a channel opens
//! so the I/O path never allocates.

/// A slab of `T` with a free list: `take` and `put` are O(1) and allocate
/// nothing.
pub(crate) struct Slab<T> {
    items: Vec<T>,
    free: Vec<u32>,
}

impl<T: Default> Slab<T> {
    /// A slab of `capacity` default items, all free.
    pub(crate) fn new(capacity: usize) -> Slab<T> {
        let mut items = Vec::with_capacity(capacity);
        items.resize_with(capacity, T::default);
        // Hand out low indices first: easier to read in traces.
        let free = (0..capacity as u32).rev().collect();
        Slab { items, free }
    }
}

impl<T> Slab<T> {
    /// Hands the entries queued in `done` back to the caller as
    /// completions into `out` from `n` on (`finish` makes each one's
    /// completion and clears it), freeing them; returns the new count.
    pub(crate) fn emit(
        &mut self,
        done: &mut std::collections::VecDeque<u32>,
        out: &mut [crate::device::Completion],
        mut n: usize,
        finish: impl Fn(&mut T) -> crate::device::Completion,
    ) -> usize {
        while n < out.len() {
            let Some(slot) = done.pop_front() else {
                break;
            };
            out[n] = finish(self.at(slot));
            self.put(slot);
            n += 1;
        }
        n
    }

    /// A free slot's index, or `None` when all are in use.
    pub(crate) fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns a slot. The free list has room: it held every index once.
    pub(crate) fn put(&mut self, index: u32) {
        debug_assert!(self.free.len() < self.items.len());
        self.free.push(index);
    }

    /// Slots free.
    pub(crate) fn available(&self) -> usize {
        self.free.len()
    }

    /// Slots in use.
    pub(crate) fn in_use(&self) -> usize {
        self.items.len() - self.free.len()
    }

    /// The item at `index`, if `index` is in range (indices come back from
    /// member devices inside contexts, so they are checked, not trusted).
    pub(crate) fn get_mut(&mut self, index: u64) -> Option<&mut T> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.items.get_mut(i))
    }

    /// The item at a slot index this channel handed out itself.
    pub(crate) fn at(&mut self, index: u32) -> &mut T {
        &mut self.items[index as usize]
    }
}
