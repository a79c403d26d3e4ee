//! KV cache memory as the router sees it: block ids on the shards, handed out to requests.

mod allocator;

pub use allocator::BlockAllocator;
