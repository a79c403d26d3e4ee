//! KV cache memory as the router sees it: block ids on the shards, handed to requests as their
//! sequences grow, shared between requests through the prefix cache, and taken back when they
//! finish. The scheduler task owns the one `KvManager`, so no lock guards it.

mod allocator;
mod radix;

pub use allocator::{BlockPool, Placement};
pub use radix::{NodeId, RadixCache};

/// A cached prefix a request starts from: blocks it now holds and the tree node they end at.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPrefix {
    pub blocks: Vec<u32>,
    pub node: NodeId,
}

impl CachedPrefix {
    /// Nothing cached: start from the first token.
    pub fn none() -> Self {
        Self {
            blocks: Vec::new(),
            node: RadixCache::ROOT,
        }
    }
}

#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    /// `None` when prefix caching is off.
    cache: Option<RadixCache>,
    block_size: usize,
}

impl KvManager {
    pub fn new(num_blocks: u32, block_size: u32, prefix_caching: bool) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            cache: prefix_caching.then(RadixCache::default),
            block_size: block_size as usize,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// Blocks held by at least one request (cached blocks nobody holds do not count).
    pub fn num_used(&self) -> usize {
        self.pool.num_held()
    }

    /// Blocks in the prefix cache.
    pub fn num_cached(&self) -> usize {
        self.cache.as_ref().map_or(0, RadixCache::len)
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest cached prefix of `tokens`, now held by the caller. At least one token is left
    /// out: the shard must run the last token to sample the next one.
    pub fn lookup(&mut self, tokens: &[u32]) -> CachedPrefix {
        let Some(cache) = self.cache.as_mut() else {
            return CachedPrefix::none();
        };
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let (blocks, node) = cache.match_prefix(tokens, self.block_size, max_blocks);
        for &block in &blocks {
            if self.pool.retain(block) {
                cache.set_held(block, true);
            }
        }
        CachedPrefix { blocks, node }
    }

    /// Takes `n` blocks, evicting cached blocks nobody holds if needed; all or nothing.
    pub fn allocate(&mut self, n: usize, placement: Placement) -> Option<Vec<u32>> {
        self.make_free(n);
        self.pool.allocate(n, placement)
    }

    /// Takes as many of `n` blocks as can be had.
    pub fn allocate_up_to(&mut self, n: usize, placement: Placement) -> Vec<u32> {
        self.make_free(n);
        let available = n.min(self.pool.num_free());
        self.pool.allocate(available, placement).unwrap_or_default()
    }

    /// Evicts unheld cached blocks until `n` are free or nothing more can be evicted.
    fn make_free(&mut self, n: usize) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        while self.pool.num_free() < n {
            match cache.evict_one() {
                Some(block) => self.pool.free(block),
                None => break,
            }
        }
    }

    /// Drops the caller's hold on `blocks`; blocks nobody holds and the cache does not keep are
    /// free again.
    pub fn release(&mut self, blocks: &[u32]) {
        for &block in blocks {
            if !self.pool.release(block) {
                continue;
            }
            match self.cache.as_mut() {
                Some(cache) if cache.contains_block(block) => cache.set_held(block, false),
                _ => self.pool.free(block),
            }
        }
    }

    /// Records that `block`, held by the caller, holds the full block of tokens `key` after the
    /// prefix ending at `parent`. Returns the new end of the prefix, or `None` if the prefix is
    /// cached elsewhere or caching is off.
    pub fn register(&mut self, parent: NodeId, key: &[u32], block: u32) -> Option<NodeId> {
        debug_assert_eq!(key.len(), self.block_size);
        debug_assert!(
            self.pool.ref_count(block) > 0,
            "block {block} registered unheld"
        );
        self.cache.as_mut()?.insert(parent, key, block)
    }
}

#[cfg(test)]
mod tests;
