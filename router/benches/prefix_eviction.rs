//! Admission into a full prefix cache: every new request has to evict cached blocks before it
//! gets its own. Fills a 20,000-block pool with the cached prompts of many conversations that
//! share system prompts and earlier turns, then times admissions that each evict.
//!
//! Run with `cargo bench -p sluice-router --bench prefix_eviction`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sluice_router::kv::{KvManager, Placement};

const NUM_BLOCKS: u32 = 20_000;
const BLOCK_SIZE: usize = 16;
const SYSTEM_PROMPTS: usize = 64;
const SYSTEM_PROMPT_BLOCKS: usize = 8;
/// Requests that keep holding their blocks while later ones are admitted.
const RUNNING: usize = 32;
const ADMISSIONS: usize = 500;
const ROUNDS: usize = 3;

/// A small deterministic generator (SplitMix64), so every run sees the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % 32_000) as u32).collect()
    }
}

/// Prompts shaped like chat traffic: a shared system prompt, then either a new first turn or a
/// follow-up that repeats an earlier conversation and adds a turn.
struct Workload {
    rng: Rng,
    system_prompts: Vec<Vec<u32>>,
    conversations: Vec<Vec<u32>>,
}

impl Workload {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let system_prompts = (0..SYSTEM_PROMPTS)
            .map(|_| rng.tokens(SYSTEM_PROMPT_BLOCKS * BLOCK_SIZE))
            .collect();
        Self {
            rng,
            system_prompts,
            conversations: Vec::new(),
        }
    }

    fn next_prompt(&mut self) -> Vec<u32> {
        let follow_up = !self.conversations.is_empty() && self.rng.below(10) < 3;
        let mut tokens = if follow_up {
            let i = self.rng.below(self.conversations.len());
            self.conversations[i].clone()
        } else {
            self.system_prompts[self.rng.below(SYSTEM_PROMPTS)].clone()
        };
        let turn = (2 + self.rng.below(12)) * BLOCK_SIZE + self.rng.below(BLOCK_SIZE);
        tokens.extend(self.rng.tokens(turn));
        if tokens.len() < 64 * BLOCK_SIZE {
            if self.conversations.len() < 4_096 {
                self.conversations.push(tokens.clone());
            } else {
                let i = self.rng.below(self.conversations.len());
                self.conversations[i] = tokens.clone();
            }
        }
        tokens
    }
}

/// Free blocks of a pool whose blocks nobody holds.
fn num_free(kv: &KvManager) -> usize {
    kv.num_blocks() - kv.num_used() - kv.num_cached()
}

/// Admits one request as the scheduler does (cached prefix, fresh blocks, registration of its
/// full blocks) and returns the blocks it holds and how many blocks had to be evicted.
fn admit(kv: &mut KvManager, tokens: &[u32]) -> (Vec<u32>, usize) {
    let prefix = kv.lookup(tokens);
    let needed = kv.blocks_for(tokens.len()) - prefix.blocks.len();
    let cached_before = kv.num_cached();
    let fresh = kv
        .allocate(needed, Placement::NewRun { headroom: 0 })
        .expect("unheld cached blocks can always be evicted");
    // Allocation only ever takes blocks out of the cache.
    let evicted = cached_before - kv.num_cached();
    let mut node = prefix.node;
    let cached = prefix.blocks.len();
    let mut blocks = prefix.blocks;
    blocks.extend(fresh);
    for (i, key) in tokens.chunks_exact(BLOCK_SIZE).enumerate().skip(cached) {
        match kv.register(node, key, blocks[i]) {
            Some(next) => node = next,
            None => break,
        }
    }
    (blocks, evicted)
}

/// A pool whose every block is cached and unheld.
fn full_cache(workload: &mut Workload) -> KvManager {
    let mut kv = KvManager::new(NUM_BLOCKS, BLOCK_SIZE as u32, true);
    loop {
        let tokens = workload.next_prompt();
        if kv.blocks_for(tokens.len()) > num_free(&kv) {
            break;
        }
        let (blocks, _) = admit(&mut kv, &tokens);
        kv.release(&blocks);
    }
    // Tops the pool up with one-block prompts of their own.
    while num_free(&kv) > 0 {
        let tokens = workload.rng.tokens(BLOCK_SIZE);
        let (blocks, _) = admit(&mut kv, &tokens);
        kv.release(&blocks);
    }
    assert_eq!(kv.num_cached(), NUM_BLOCKS as usize);
    assert_eq!(kv.num_used(), 0);
    kv
}

struct Round {
    elapsed: Duration,
    evicted: usize,
}

fn run_round(seed: u64) -> Round {
    let mut workload = Workload::new(seed);
    let mut kv = full_cache(&mut workload);
    let prompts: Vec<Vec<u32>> = (0..ADMISSIONS).map(|_| workload.next_prompt()).collect();
    let mut running: VecDeque<Vec<u32>> = VecDeque::new();
    let mut evicted = 0;
    let start = Instant::now();
    for tokens in &prompts {
        let (blocks, n) = admit(&mut kv, tokens);
        evicted += n;
        running.push_back(blocks);
        if running.len() > RUNNING {
            if let Some(done) = running.pop_front() {
                kv.release(&done);
            }
        }
    }
    let elapsed = start.elapsed();
    std::hint::black_box(&kv);
    Round { elapsed, evicted }
}

fn main() {
    println!(
        "prefix_eviction: {NUM_BLOCKS} blocks of {BLOCK_SIZE} tokens, full of cached prompts; \
         {ADMISSIONS} admissions with {RUNNING} requests running"
    );
    let mut rounds: Vec<Round> = (0..ROUNDS).map(|r| run_round(r as u64 + 1)).collect();
    for (i, round) in rounds.iter().enumerate() {
        println!(
            "round {i}: {:.3} s, {} blocks evicted, {:.2} us per admission, {:.3} us per evicted block",
            round.elapsed.as_secs_f64(),
            round.evicted,
            round.elapsed.as_secs_f64() * 1e6 / ADMISSIONS as f64,
            round.elapsed.as_secs_f64() * 1e6 / round.evicted as f64,
        );
    }
    rounds.sort_by_key(|r| r.elapsed);
    let median = &rounds[ROUNDS / 2];
    println!(
        "median: {:.2} us per admission, {:.3} us per evicted block",
        median.elapsed.as_secs_f64() * 1e6 / ADMISSIONS as f64,
        median.elapsed.as_secs_f64() * 1e6 / median.evicted as f64,
    );
}
