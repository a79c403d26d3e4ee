//! The prefix cache: a radix tree whose edges are full blocks of token ids. A path from the root
//! spells a token prefix, and each node names the KV block that holds its tokens' keys and values,
//! so a new request can start from the longest cached prefix of its tokens.
//!
//! The tree records which block holds what; who holds a block is the pool's reference count,
//! of which the tree keeps one bit per node (held or not), told by the `KvManager`. A node whose
//! block nobody holds is evictable once it has no children (leaves first, least recently used
//! first). The evictable nodes are kept ordered by last use, so finding the next victim does not
//! walk the tree.

use std::collections::{BTreeSet, HashMap};

pub type NodeId = usize;

#[derive(Debug)]
struct Node {
    parent: NodeId,
    /// The block's token ids; empty for the root.
    key: Vec<u32>,
    block: u32,
    children: HashMap<Vec<u32>, NodeId>,
    last_used: u64,
    /// Whether at least one request holds the block.
    held: bool,
}

#[derive(Debug)]
pub struct RadixCache {
    /// Arena of nodes; `None` marks a slot of an evicted node, reused by the next insert.
    nodes: Vec<Option<Node>>,
    vacant: Vec<NodeId>,
    by_block: HashMap<u32, NodeId>,
    clock: u64,
    /// The unheld leaves other than the root, by (last use, id): the eviction order.
    evictable: BTreeSet<(u64, NodeId)>,
}

impl Default for RadixCache {
    fn default() -> Self {
        let root = Node {
            parent: Self::ROOT,
            key: Vec::new(),
            block: u32::MAX,
            children: HashMap::new(),
            last_used: 0,
            held: true,
        };
        Self {
            nodes: vec![Some(root)],
            vacant: Vec::new(),
            by_block: HashMap::new(),
            clock: 0,
            evictable: BTreeSet::new(),
        }
    }
}

impl RadixCache {
    pub const ROOT: NodeId = 0;

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id]
            .as_ref()
            .expect("node ids in use point at live nodes")
    }

    fn is_evictable(&self, id: NodeId) -> bool {
        let node = self.node(id);
        id != Self::ROOT && !node.held && node.children.is_empty()
    }

    /// Changes a node through `change` and keeps its place in the eviction order in step: every
    /// change to a node's last use, hold or children goes through here.
    fn update(&mut self, id: NodeId, change: impl FnOnce(&mut Node)) {
        let node = self.nodes[id]
            .as_mut()
            .expect("node ids in use point at live nodes");
        self.evictable.remove(&(node.last_used, id));
        change(node);
        let last_used = node.last_used;
        if self.is_evictable(id) {
            self.evictable.insert((last_used, id));
        }
    }

    /// Cached blocks.
    pub fn len(&self) -> usize {
        self.by_block.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_block.is_empty()
    }

    pub fn contains_block(&self, block: u32) -> bool {
        self.by_block.contains_key(&block)
    }

    /// Records whether any request holds `block` (a no-op for a block the cache does not keep).
    /// Only unheld blocks can be evicted.
    pub fn set_held(&mut self, block: u32, held: bool) {
        if let Some(&id) = self.by_block.get(&block) {
            self.update(id, |node| node.held = held);
        }
    }

    /// The blocks of the longest cached prefix of `tokens` made of whole blocks (at most
    /// `max_blocks` of them), and the node where it ends. Marks them as just used.
    pub fn match_prefix(
        &mut self,
        tokens: &[u32],
        block_size: usize,
        max_blocks: usize,
    ) -> (Vec<u32>, NodeId) {
        self.clock += 1;
        let clock = self.clock;
        let mut node = Self::ROOT;
        let mut blocks = Vec::new();
        for key in tokens.chunks_exact(block_size).take(max_blocks) {
            let Some(&child) = self.node(node).children.get(key) else {
                break;
            };
            self.update(child, |n| n.last_used = clock);
            blocks.push(self.node(child).block);
            node = child;
        }
        (blocks, node)
    }

    /// Records that `block`, which the caller holds, holds `key` after the prefix ending at
    /// `parent`. Returns the node for it, or `None` if that prefix is already cached in another
    /// block (the caller keeps its block private).
    pub fn insert(&mut self, parent: NodeId, key: &[u32], block: u32) -> Option<NodeId> {
        self.clock += 1;
        let clock = self.clock;
        if let Some(&existing) = self.node(parent).children.get(key) {
            self.update(existing, |n| n.last_used = clock);
            return (self.node(existing).block == block).then_some(existing);
        }
        if self.by_block.contains_key(&block) {
            return None;
        }
        let node = Node {
            parent,
            key: key.to_vec(),
            block,
            children: HashMap::new(),
            last_used: clock,
            held: true,
        };
        let id = match self.vacant.pop() {
            Some(id) => {
                self.nodes[id] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        };
        self.update(parent, |n| {
            n.children.insert(key.to_vec(), id);
        });
        self.by_block.insert(block, id);
        Some(id)
    }

    /// Removes the least recently used leaf whose block has no holder and returns that block.
    pub fn evict_one(&mut self) -> Option<u32> {
        let (_, victim) = self.evictable.pop_first()?;
        let node = self.nodes[victim].take().expect("evictable nodes are live");
        // The parent may become an evictable leaf itself.
        self.update(node.parent, |parent| {
            parent.children.remove(&node.key);
        });
        self.by_block.remove(&node.block);
        self.vacant.push(victim);
        Some(node.block)
    }

    /// Checks the eviction order against a walk of the whole tree, and each node's hold bit
    /// against the pool's reference counts.
    #[cfg(test)]
    pub(super) fn assert_eviction_order_in_step(&self, ref_count: impl Fn(u32) -> u32) {
        let mut expected = BTreeSet::new();
        for (id, node) in self.nodes.iter().enumerate().skip(1) {
            let Some(node) = node else { continue };
            assert_eq!(
                node.held,
                ref_count(node.block) > 0,
                "node {id} (block {}) has a stale hold bit",
                node.block
            );
            if !node.held && node.children.is_empty() {
                expected.insert((node.last_used, id));
            }
        }
        assert_eq!(
            self.evictable, expected,
            "the eviction order is out of step"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_longest_prefix_of_whole_blocks() {
        let mut cache = RadixCache::default();
        let a = cache.insert(RadixCache::ROOT, &[1, 2], 10).unwrap();
        let b = cache.insert(a, &[3, 4], 11).unwrap();
        assert_eq!(
            cache.match_prefix(&[1, 2, 3, 4, 5], 2, 8),
            (vec![10, 11], b)
        );
        assert_eq!(cache.match_prefix(&[1, 2, 3, 9], 2, 8), (vec![10], a));
        assert_eq!(cache.match_prefix(&[1, 2, 3, 4], 2, 1), (vec![10], a));
        assert_eq!(
            cache.match_prefix(&[7, 7], 2, 8),
            (vec![], RadixCache::ROOT)
        );
    }

    #[test]
    fn a_prefix_cached_in_another_block_is_not_inserted_twice() {
        let mut cache = RadixCache::default();
        let a = cache.insert(RadixCache::ROOT, &[1, 2], 10).unwrap();
        assert_eq!(cache.insert(RadixCache::ROOT, &[1, 2], 10), Some(a));
        assert_eq!(cache.insert(RadixCache::ROOT, &[1, 2], 12), None);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn evicts_unheld_leaves_least_recently_used_first() {
        let mut cache = RadixCache::default();
        let a = cache.insert(RadixCache::ROOT, &[1], 1).unwrap();
        cache.insert(a, &[2], 2).unwrap();
        cache.insert(RadixCache::ROOT, &[3], 3).unwrap();
        assert_eq!(cache.evict_one(), None, "inserted blocks are held");
        cache.set_held(1, false);
        cache.set_held(2, false);
        cache.match_prefix(&[1, 2], 1, 8);
        // Block 3 is the least recently used leaf, but it is held.
        assert_eq!(cache.evict_one(), Some(2));
        // Its parent is a leaf now.
        assert_eq!(cache.evict_one(), Some(1));
        assert_eq!(cache.evict_one(), None);
        cache.set_held(3, false);
        assert_eq!(cache.evict_one(), Some(3));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_leaf_that_gains_a_child_or_a_holder_is_not_evicted() {
        let mut cache = RadixCache::default();
        let a = cache.insert(RadixCache::ROOT, &[1], 1).unwrap();
        cache.insert(RadixCache::ROOT, &[2], 2).unwrap();
        cache.set_held(1, false);
        cache.set_held(2, false);
        // Block 1 is the least recently used leaf until it gets a (held) child.
        cache.insert(a, &[3], 3).unwrap();
        cache.set_held(2, true);
        assert_eq!(cache.evict_one(), None);
        cache.set_held(2, false);
        cache.set_held(3, false);
        // Using block 2 again puts it behind block 3.
        cache.match_prefix(&[2], 1, 8);
        assert_eq!(cache.evict_one(), Some(3));
        assert_eq!(cache.evict_one(), Some(1));
        assert_eq!(cache.evict_one(), Some(2));
    }
}
