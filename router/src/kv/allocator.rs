//! Reference-counted KV blocks. A block is free, or held by one or more requests (shared prefix
//! blocks have several holders), or, at count zero, kept by the prefix cache until evicted.
//!
//! Where a free block is taken from matters on CPU: attention reads each sequence's blocks in
//! order, and a sequence whose blocks lie back to back streams from memory far faster than one
//! whose blocks are scattered (the hardware prefetchers follow runs of addresses). So the pool
//! places blocks (`Placement`): a sequence grows into the block after its last one when that is
//! free, and a new sequence starts its run at a cursor that leaves room after it for the growth
//! the request expects. Placement is only a preference: any free block serves when the
//! preferred one is taken, and nothing is reserved.

use std::collections::BTreeSet;

/// Where the blocks of an allocation should preferably go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A new run (a new sequence): at the cursor, which then moves on by `headroom` blocks past
    /// the run so that the sequence can grow in place.
    NewRun { headroom: u32 },
    /// Continuing the run that ends with this block (a growing sequence).
    After(u32),
}

#[derive(Debug)]
pub struct BlockPool {
    ref_counts: Vec<u32>,
    pub(super) free: BTreeSet<u32>,
    /// Where the next new run starts looking for free blocks.
    cursor: u32,
    /// Blocks with at least one holder.
    held: usize,
}

impl BlockPool {
    pub fn new(num_blocks: u32) -> Self {
        Self {
            ref_counts: vec![0; num_blocks as usize],
            free: (0..num_blocks).collect(),
            cursor: 0,
            held: 0,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_held(&self) -> usize {
        self.held
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Takes `n` free blocks with one holder each, placed as `placement` prefers, or none at all
    /// if fewer are free.
    pub fn allocate(&mut self, n: usize, placement: Placement) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        let mut previous = match placement {
            Placement::After(block) => Some(block),
            Placement::NewRun { .. } => None,
        };
        while blocks.len() < n {
            let next = previous
                .and_then(|b| b.checked_add(1))
                .filter(|b| self.free.contains(b));
            let block = match next {
                Some(block) => block,
                None => self.first_free_from_cursor(),
            };
            self.free.remove(&block);
            self.ref_counts[block as usize] = 1;
            blocks.push(block);
            previous = Some(block);
        }
        if let (Placement::NewRun { headroom }, Some(&last)) = (placement, blocks.last()) {
            self.cursor = last.saturating_add(1).saturating_add(headroom);
        }
        self.held += n;
        Some(blocks)
    }

    /// The first free block at or after the cursor, wrapping around; the pool must have one.
    fn first_free_from_cursor(&self) -> u32 {
        let after = self.free.range(self.cursor..).next();
        *after
            .or_else(|| self.free.iter().next())
            .expect("the caller checked that enough blocks are free")
    }

    /// Adds a holder to a block that is in use or cached; returns true when it is the first.
    pub fn retain(&mut self, block: u32) -> bool {
        let count = &mut self.ref_counts[block as usize];
        let first = *count == 0;
        if first {
            self.held += 1;
        }
        *count += 1;
        first
    }

    /// Drops a holder; returns true when that was the last one.
    pub fn release(&mut self, block: u32) -> bool {
        let count = &mut self.ref_counts[block as usize];
        debug_assert!(*count > 0, "block {block} released more often than held");
        *count = count.saturating_sub(1);
        let last = *count == 0;
        if last {
            self.held -= 1;
        }
        last
    }

    /// Returns an unheld block to the free list.
    pub fn free(&mut self, block: u32) {
        debug_assert_eq!(self.ref_counts[block as usize], 0);
        self.free.insert(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_all_or_nothing_and_counts_holders() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3, Placement::NewRun { headroom: 0 }).unwrap();
        assert_eq!(a, vec![0, 1, 2], "a fresh pool hands out ascending runs");
        assert!(pool.allocate(2, Placement::After(2)).is_none());
        assert!(!pool.retain(a[0]), "the block already had a holder");
        assert!(!pool.release(a[0]));
        assert!(pool.release(a[0]));
        pool.free(a[0]);
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.num_held(), 2);
    }

    #[test]
    fn sequences_grow_in_place_behind_the_headroom_of_new_runs() {
        let mut pool = BlockPool::new(32);
        let first = pool.allocate(2, Placement::NewRun { headroom: 3 }).unwrap();
        let second = pool.allocate(2, Placement::NewRun { headroom: 3 }).unwrap();
        assert_eq!((first.clone(), second.clone()), (vec![0, 1], vec![5, 6]));
        // Both grow by three blocks, interleaved as lockstep decodes would: each stays a run.
        let mut ends = [first[1], second[1]];
        for _ in 0..3 {
            for end in &mut ends {
                assert_eq!(
                    pool.allocate(1, Placement::After(*end)).unwrap(),
                    vec![*end + 1]
                );
                *end += 1;
            }
        }
        assert_eq!(ends, [4, 9]);
        // The fourth growth block of the first run is the second run's start: taken, so any
        // free block serves (the cursor's).
        assert_eq!(pool.allocate(1, Placement::After(4)).unwrap(), vec![10]);
    }
}
