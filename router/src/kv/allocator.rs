//! The block allocator: a free list of KV block ids. It is owned by the scheduler task, the only
//! place that hands blocks out or takes them back, so it needs no locking.

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: u32,
    num_blocks: u32,
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: u32, block_size: u32) -> Self {
        // Reversed so that blocks are handed out from id 0 upward.
        let free = (0..num_blocks).rev().collect();
        Self {
            block_size,
            num_blocks,
            free,
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size as usize)
    }

    /// Takes `n` blocks, or none at all if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, blocks: Vec<u32>) {
        debug_assert!(blocks.iter().all(|b| *b < self.num_blocks));
        self.free.extend(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_all_or_nothing_and_takes_blocks_back() {
        let mut allocator = BlockAllocator::new(4, 16);
        assert_eq!(allocator.blocks_for(17), 2);
        let a = allocator.allocate(3).unwrap();
        assert_eq!(a, vec![2, 1, 0]);
        assert!(allocator.allocate(2).is_none());
        assert_eq!(allocator.num_free(), 1);
        allocator.release(a);
        assert_eq!(allocator.num_free(), 4);
    }
}
