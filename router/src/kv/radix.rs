//! The prefix cache: a radix tree whose edges are full blocks of token ids. A path from the root
//! spells a token prefix, and each node names the KV block that holds its tokens' keys and values,
//! so a new request can start from the longest cached prefix of its tokens.
//!
//! The tree only records which block holds what; who holds a block is the pool's reference
//! count. A node whose block nobody holds is evictable once it has no children (leaves first,
//! least recently used first).

use std::collections::HashMap;

pub type NodeId = usize;

#[derive(Debug)]
struct Node {
    parent: NodeId,
    /// The block's token ids; empty for the root.
    key: Vec<u32>,
    block: u32,
    children: HashMap<Vec<u32>, NodeId>,
    last_used: u64,
}

#[derive(Debug)]
pub struct RadixCache {
    /// Arena of nodes; `None` marks a slot of an evicted node, reused by the next insert.
    nodes: Vec<Option<Node>>,
    vacant: Vec<NodeId>,
    by_block: HashMap<u32, NodeId>,
    clock: u64,
}

impl Default for RadixCache {
    fn default() -> Self {
        let root = Node {
            parent: Self::ROOT,
            key: Vec::new(),
            block: u32::MAX,
            children: HashMap::new(),
            last_used: 0,
        };
        Self {
            nodes: vec![Some(root)],
            vacant: Vec::new(),
            by_block: HashMap::new(),
            clock: 0,
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

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id]
            .as_mut()
            .expect("node ids in use point at live nodes")
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

    /// The blocks of the longest cached prefix of `tokens` made of whole blocks (at most
    /// `max_blocks` of them), and the node where it ends. Marks them as just used.
    pub fn match_prefix(
        &mut self,
        tokens: &[u32],
        block_size: usize,
        max_blocks: usize,
    ) -> (Vec<u32>, NodeId) {
        self.clock += 1;
        let mut node = Self::ROOT;
        let mut blocks = Vec::new();
        for key in tokens.chunks_exact(block_size).take(max_blocks) {
            let Some(&child) = self.node(node).children.get(key) else {
                break;
            };
            let clock = self.clock;
            let child_node = self.node_mut(child);
            child_node.last_used = clock;
            blocks.push(child_node.block);
            node = child;
        }
        (blocks, node)
    }

    /// Records that `block` holds `key` after the prefix ending at `parent`. Returns the node
    /// for it, or `None` if that prefix is already cached in another block (the caller keeps its
    /// block private).
    pub fn insert(&mut self, parent: NodeId, key: &[u32], block: u32) -> Option<NodeId> {
        self.clock += 1;
        let clock = self.clock;
        if let Some(&existing) = self.node(parent).children.get(key) {
            let node = self.node_mut(existing);
            node.last_used = clock;
            return (node.block == block).then_some(existing);
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
        self.node_mut(parent).children.insert(key.to_vec(), id);
        self.by_block.insert(block, id);
        Some(id)
    }

    /// Removes the least recently used leaf whose block has no holder and returns that block.
    pub fn evict_one(&mut self, is_held: impl Fn(u32) -> bool) -> Option<u32> {
        let victim = self
            .nodes
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(id, node)| node.as_ref().map(|n| (id, n)))
            .filter(|(_, n)| n.children.is_empty() && !is_held(n.block))
            .min_by_key(|(_, n)| n.last_used)
            .map(|(id, _)| id)?;
        let node = self.nodes[victim].take()?;
        self.node_mut(node.parent).children.remove(&node.key);
        self.by_block.remove(&node.block);
        self.vacant.push(victim);
        Some(node.block)
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
        cache.match_prefix(&[1, 2], 1, 8);
        // Block 3 is the least recently used leaf, but it is held.
        assert_eq!(cache.evict_one(|b| b == 3), Some(2));
        assert_eq!(cache.evict_one(|b| b == 3), Some(1));
        assert_eq!(cache.evict_one(|b| b == 3), None);
        assert_eq!(cache.evict_one(|_| false), Some(3));
        assert!(cache.is_empty());
    }
}
