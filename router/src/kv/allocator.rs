//! Reference-counted KV blocks. A block is free, or held by one or more requests (shared prefix
//! blocks have several holders), or, at count zero, kept by the prefix cache until evicted.

#[derive(Debug)]
pub struct BlockPool {
    ref_counts: Vec<u32>,
    pub(super) free: Vec<u32>,
    /// Blocks with at least one holder.
    held: usize,
}

impl BlockPool {
    pub fn new(num_blocks: u32) -> Self {
        Self {
            ref_counts: vec![0; num_blocks as usize],
            // Reversed so that blocks are handed out from id 0 upward.
            free: (0..num_blocks).rev().collect(),
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

    /// Takes `n` free blocks with one holder each, or none at all if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut blocks = self.free.split_off(self.free.len() - n);
        // The stack's top is its end: reversed, a fresh pool hands out ascending runs, which a
        // sequence's attention then reads as one forward stream.
        blocks.reverse();
        for block in &blocks {
            self.ref_counts[*block as usize] = 1;
        }
        self.held += n;
        Some(blocks)
    }

    /// Adds a holder to a block that is in use or cached.
    pub fn retain(&mut self, block: u32) {
        let count = &mut self.ref_counts[block as usize];
        if *count == 0 {
            self.held += 1;
        }
        *count += 1;
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
        self.free.push(block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_all_or_nothing_and_counts_holders() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a, vec![0, 1, 2], "a fresh pool hands out ascending runs");
        assert!(pool.allocate(2).is_none());
        pool.retain(a[0]);
        assert!(!pool.release(a[0]));
        assert!(pool.release(a[0]));
        pool.free(a[0]);
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.num_held(), 2);
    }
}
