//! Property tests: under random admits, growth, finishes, cancels and preemptions, no block is
//! leaked or owned twice, reference counts match the holders, eviction never frees a block
//! somebody holds, and the prefix cache's eviction order matches a walk of the whole tree.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

const BLOCK: usize = 2;
const BLOCKS: u32 = 12;
const ANYWHERE: Placement = Placement::NewRun { headroom: 0 };

/// A request as the scheduler would drive it: its tokens, the blocks it holds, how far its
/// blocks are registered in the prefix cache.
struct Sequence {
    tokens: Vec<u32>,
    blocks: Vec<u32>,
    node: NodeId,
    registered: usize,
    sharing: bool,
}

#[derive(Debug, Clone)]
enum Op {
    /// A prompt over a tiny alphabet, so that prefixes collide often.
    Admit(Vec<u32>),
    /// Request `i` generates `n` tokens.
    Grow(usize, usize),
    /// Request `i` finishes, is cancelled or preempted: all the same to the KV manager.
    Leave(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        prop::collection::vec(0u32..3, 1..9).prop_map(Op::Admit),
        (0usize..8, 1usize..4).prop_map(|(i, n)| Op::Grow(i, n)),
        (0usize..8).prop_map(Op::Leave),
    ]
}

/// Registers the full blocks of a sequence, as the scheduler does after each step.
fn register(kv: &mut KvManager, seq: &mut Sequence) {
    while seq.sharing && seq.registered < seq.tokens.len() / BLOCK {
        let i = seq.registered;
        let key = &seq.tokens[i * BLOCK..(i + 1) * BLOCK];
        match kv.register(seq.node, key, seq.blocks[i]) {
            Some(node) => {
                seq.node = node;
                seq.registered += 1;
            }
            None => seq.sharing = false,
        }
    }
}

fn check_invariants(kv: &KvManager, live: &[Sequence]) {
    let mut holders: HashMap<u32, u32> = HashMap::new();
    for seq in live {
        let distinct: HashSet<_> = seq.blocks.iter().collect();
        assert_eq!(
            distinct.len(),
            seq.blocks.len(),
            "a request holds a block twice"
        );
        for block in &seq.blocks {
            *holders.entry(*block).or_default() += 1;
        }
    }
    let free: HashSet<u32> = kv.pool.free.iter().copied().collect();
    assert_eq!(
        free.len(),
        kv.pool.num_free(),
        "a block is on the free list twice"
    );
    for block in 0..BLOCKS {
        let held = holders.get(&block).copied().unwrap_or(0);
        assert_eq!(
            kv.pool.ref_count(block),
            held,
            "block {block} count != holders"
        );
        let cached = kv.cache.as_ref().is_some_and(|c| c.contains_block(block));
        let is_free = free.contains(&block);
        // Every block is in exactly one state: held, cached without holders, or free.
        match (held > 0, cached, is_free) {
            (true, _, false) | (false, true, false) | (false, false, true) => {}
            state => panic!("block {block} is in an impossible state {state:?}"),
        }
    }
    assert_eq!(kv.num_used(), holders.len());
    if let Some(cache) = &kv.cache {
        cache.assert_eviction_order_in_step(|block| kv.pool.ref_count(block));
    }
}

proptest! {
    #[test]
    fn blocks_are_never_leaked_or_shared_wrongly(ops in prop::collection::vec(op(), 1..80)) {
        let mut kv = KvManager::new(BLOCKS, BLOCK as u32, true);
        let mut live: Vec<Sequence> = Vec::new();
        for op in ops {
            match op {
                Op::Admit(tokens) => {
                    let prefix = kv.lookup(&tokens);
                    let needed = kv.blocks_for(tokens.len()) - prefix.blocks.len();
                    // Headroom from the tokens, so that runs land all over the pool.
                    let headroom = tokens.len() as u32 % 5;
                    match kv.allocate(needed, Placement::NewRun { headroom }) {
                        Some(fresh) => {
                            let registered = prefix.blocks.len();
                            let mut blocks = prefix.blocks;
                            blocks.extend(fresh);
                            let mut seq = Sequence {
                                tokens, blocks, node: prefix.node, registered, sharing: true,
                            };
                            register(&mut kv, &mut seq);
                            live.push(seq);
                        }
                        None => kv.release(&prefix.blocks),
                    }
                }
                Op::Grow(i, n) if i < live.len() => {
                    let seq = &mut live[i];
                    let needed = kv.blocks_for(seq.tokens.len() + n) - seq.blocks.len();
                    let placement = match seq.blocks.last() {
                        Some(&last) => Placement::After(last),
                        None => ANYWHERE,
                    };
                    if let Some(fresh) = kv.allocate(needed, placement) {
                        seq.blocks.extend(fresh);
                        seq.tokens.extend(std::iter::repeat_n(1, n));
                        register(&mut kv, seq);
                    }
                }
                Op::Leave(i) if i < live.len() => {
                    let seq = live.swap_remove(i);
                    kv.release(&seq.blocks);
                }
                _ => {}
            }
            check_invariants(&kv, &live);
        }
        for seq in live.drain(..) {
            kv.release(&seq.blocks);
        }
        check_invariants(&kv, &live);
        prop_assert_eq!(kv.num_used(), 0);
        prop_assert_eq!(kv.pool.num_free() + kv.num_cached(), BLOCKS as usize);
        // Everything cached can be evicted once nobody holds it.
        prop_assert!(kv.allocate(BLOCKS as usize, ANYWHERE).is_some());
    }

    #[test]
    fn without_prefix_caching_released_blocks_are_free_at_once(
        sizes in prop::collection::vec(1usize..6, 1..20)
    ) {
        let mut kv = KvManager::new(BLOCKS, BLOCK as u32, false);
        let mut held = Vec::new();
        for n in sizes {
            if let Some(blocks) = kv.allocate(n, ANYWHERE) {
                held.push(blocks);
            }
            prop_assert!(kv.lookup(&[0, 0, 0, 0, 0]).blocks.is_empty());
        }
        for blocks in held {
            kv.release(&blocks);
        }
        prop_assert_eq!(kv.pool.num_free(), BLOCKS as usize);
    }
}

#[test]
fn a_second_request_reuses_the_cached_prefix() {
    let mut kv = KvManager::new(8, 2, true);
    let tokens = vec![5, 6, 7, 8, 9];
    let blocks = kv.allocate(3, ANYWHERE).unwrap();
    let first = kv
        .register(RadixCache::ROOT, &tokens[0..2], blocks[0])
        .unwrap();
    kv.register(first, &tokens[2..4], blocks[1]).unwrap();
    kv.release(&blocks);
    assert_eq!(kv.num_used(), 0);
    assert_eq!(kv.num_cached(), 2);

    let prefix = kv.lookup(&tokens);
    assert_eq!(prefix.blocks, blocks[..2].to_vec());
    // A prompt of exactly two blocks leaves its last block to be computed.
    let again = kv.lookup(&tokens[..4]);
    assert_eq!(again.blocks, blocks[..1].to_vec());
}
