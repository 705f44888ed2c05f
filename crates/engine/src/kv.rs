//! Paged KV cache accounting (vLLM's block manager, with automatic prefix caching).
//!
//! The KV storage itself lives in the [`Generator`](crate::model_api::Generator) on its device;
//! this module only decides which fixed-size block belongs to which sequence. A sequence
//! holds a [`BlockTable`]; growing it takes blocks from the free list, freeing it returns
//! them all.
//!
//! **Prefix caching** (on unless [`BlockManager::with_prefix_caching`] says off): once a block's
//! tokens are all computed, [`BlockManager::commit`] files it under a hash of its tokens
//! and of every token before it (a chain, as vLLM's block hashes). A new sequence first
//! takes the longest run of filed blocks its tokens match ([`BlockManager::match_prefix`])
//! and computes only the rest. Filed blocks are shared read-only (a sequence writes only at
//! positions past its matched prefix, which are in blocks of its own), counted by
//! reference; when the last holder lets go, a filed block stays in the cache, free to be
//! taken back by a match, until a new allocation needs it (least recently freed first).
//! Accounting is exact: free (unfiled or cached) + blocks held by at least one table ==
//! total at every moment, which the tests check under random allocation, sharing,
//! cancellation and preemption.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

/// The blocks one sequence holds, in position order (`block_table[p / block_size]`).
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    /// Leading blocks already filed or matched (their chain hash is `last_hash`).
    hashed: usize,
    last_hash: u64,
}

impl BlockTable {
    /// The block ids, as the model's `SeqStep::block_table` wants them.
    pub fn ids(&self) -> &[u32] {
        &self.blocks
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when no block is held.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The chain hash of a block: its tokens and, through `parent`, every token before it.
/// SipHash under `keys`, drawn at random per process: a client cannot compute offline a
/// prompt whose block collides with another tenant's and so read that tenant's cached K/V
/// (the attack vLLM's `--prefix-caching-hash-algo sha256` answers).
fn block_hash(keys: &RandomState, parent: u64, tokens: &[u32]) -> u64 {
    let mut h = keys.build_hasher();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Hands out and takes back KV blocks of `block_size` tokens.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    /// Free blocks holding nothing reusable. A stack: the most recently freed block is
    /// reused first (warm in cache).
    free: Vec<u32>,
    /// Tables holding each block.
    refs: Vec<u32>,
    prefix_caching: bool,
    /// Filed blocks by chain hash, and each filed block's hash.
    filed: HashMap<u64, u32>,
    hash_of: Vec<Option<u64>>,
    /// Filed blocks no table holds, by when they were freed (taken oldest first when the
    /// free stack is empty); `freed_at` finds a block's entry when a match takes it back.
    cached: BTreeMap<u64, u32>,
    freed_at: Vec<u64>,
    clock: u64,
    hash_keys: RandomState,
}

impl BlockManager {
    /// A manager of `num_blocks` blocks of `block_size` tokens each, with prefix caching.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let num_blocks = num_blocks.min(u32::MAX as usize);
        BlockManager {
            block_size,
            total: num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix_caching: true,
            filed: HashMap::new(),
            hash_of: vec![None; num_blocks],
            cached: BTreeMap::new(),
            freed_at: vec![0; num_blocks],
            clock: 0,
            hash_keys: RandomState::new(),
        }
    }

    /// The same manager with prefix caching on or off; off, nothing is filed and nothing
    /// matched (`--no-enable-prefix-caching`).
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    /// Whether blocks are filed and matched.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not held by any sequence (cached ones included: an allocation may take them).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    /// Blocks held by sequences.
    pub fn num_used(&self) -> usize {
        self.total - self.num_free()
    }

    /// Filed blocks that no sequence holds: kept for a future match.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Extra blocks `table` needs to cover `tokens` tokens.
    pub fn extra_blocks(&self, table: &BlockTable, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(table.len())
    }

    /// Grows `table` to cover `tokens` tokens. All or nothing: returns false and takes no
    /// block when there are not enough free ones.
    pub fn grow(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let need = self.extra_blocks(table, tokens);
        if need > self.num_free() {
            return false;
        }
        for _ in 0..need {
            let b = match self.free.pop() {
                Some(b) => b,
                None => self.evict_oldest(),
            };
            self.refs[b as usize] = 1;
            table.blocks.push(b);
        }
        true
    }

    /// Takes the least recently freed cached block out of the cache for reuse.
    fn evict_oldest(&mut self) -> u32 {
        let (_, b) = self
            .cached
            .pop_first()
            .expect("num_free counted a cached block");
        if let Some(h) = self.hash_of[b as usize].take() {
            self.filed.remove(&h);
        }
        b
    }

    /// Returns every block of `table` (cancel, finish, preemption): a block no other table
    /// holds becomes free, or stays cached when it is filed.
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.hash_of[b as usize].is_some() {
                self.clock += 1;
                self.freed_at[b as usize] = self.clock;
                self.cached.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
        table.hashed = 0;
        table.last_hash = 0;
    }

    /// For an empty `table`: takes the filed blocks that hold the longest prefix of
    /// `tokens[..max_tokens]` in whole blocks, and returns how many tokens they hold (0
    /// without prefix caching). The caller keeps at least one token to compute, so that
    /// the step has logits to sample from (vLLM's rule): `max_tokens < tokens.len()`.
    ///
    /// Blocks are shared only between sequences of the same `salt` (vLLM's `cache_salt`):
    /// it roots the chain of hashes, which `commit` then continues.
    pub fn match_prefix(
        &mut self,
        table: &mut BlockTable,
        tokens: &[u32],
        max_tokens: usize,
        salt: Option<&str>,
    ) -> usize {
        debug_assert!(table.is_empty(), "matching into a table that holds blocks");
        if !self.prefix_caching || !table.is_empty() {
            return 0;
        }
        let mut parent = salt.map_or(0, |s| self.hash_keys.hash_one(s));
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(self.block_size) {
            let h = block_hash(&self.hash_keys, parent, chunk);
            let Some(&b) = self.filed.get(&h) else { break };
            if self.refs[b as usize] == 0 {
                self.cached.remove(&self.freed_at[b as usize]);
            }
            self.refs[b as usize] += 1;
            table.blocks.push(b);
            parent = h;
        }
        table.hashed = table.blocks.len();
        table.last_hash = parent;
        table.hashed * self.block_size
    }

    /// Files every block of `table` that `computed` tokens (of `tokens`, the sequence's
    /// prompt and output) fill and that is not filed yet, so that later sequences can match
    /// it. A block whose hash is already filed (the same tokens computed twice at once)
    /// stays private to this table: one copy per hash is filed (vLLM keeps them all, so
    /// that a burst of identical prompts stays matchable after the filed copy is evicted;
    /// here the others become matchable again only when recomputed).
    pub fn commit(&mut self, table: &mut BlockTable, tokens: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let full = (computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        while table.hashed < full {
            let i = table.hashed;
            let h = block_hash(
                &self.hash_keys,
                table.last_hash,
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            let b = table.blocks[i];
            if self.hash_of[b as usize].is_none() && !self.filed.contains_key(&h) {
                self.filed.insert(h, b);
                self.hash_of[b as usize] = Some(h);
            }
            table.hashed += 1;
            table.last_hash = h;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn grow_is_all_or_nothing() {
        let mut m = BlockManager::new(4, 16);
        let mut a = BlockTable::default();
        assert!(m.grow(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(m.grow(&mut a, 32), "still two blocks");
        assert_eq!(m.num_free(), 2);
        let mut b = BlockTable::default();
        assert!(!m.grow(&mut b, 3 * 16));
        assert_eq!(b.len(), 0);
        assert_eq!(m.num_free(), 2);
        assert!(m.grow(&mut b, 2 * 16));
        assert_eq!(m.num_free(), 0);
        m.release(&mut a);
        m.release(&mut b);
        assert_eq!(m.num_free(), 4);
    }

    #[test]
    fn blocks_are_never_shared() {
        let mut m = BlockManager::new(64, 4);
        let mut tables: Vec<BlockTable> = (0..8).map(|_| BlockTable::default()).collect();
        for (i, t) in tables.iter_mut().enumerate() {
            assert!(m.grow(t, 4 * (i + 1)));
        }
        let mut all: Vec<u32> = tables.iter().flat_map(|t| t.ids().to_vec()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(n + m.num_free(), 64);
    }

    #[test]
    fn a_second_sequence_takes_the_filed_prefix() {
        let mut m = BlockManager::new(16, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        assert_eq!(
            m.match_prefix(&mut a, &prompt, 9, None),
            0,
            "nothing filed yet"
        );
        assert!(m.grow(&mut a, 10));
        m.commit(&mut a, &prompt, 10);
        // Two whole blocks (8 tokens) are filed; the third is not full.
        let mut b = BlockTable::default();
        assert_eq!(m.match_prefix(&mut b, &prompt, 9, None), 8);
        assert_eq!(b.ids(), &a.ids()[..2]);
        assert!(m.grow(&mut b, 10));
        assert_ne!(b.ids()[2], a.ids()[2], "the partial block is private");
        assert_eq!(m.num_used(), 4);
        // A prompt that differs in its second block shares only the first.
        let mut other = prompt.clone();
        other[5] = 99;
        let mut c = BlockTable::default();
        assert_eq!(m.match_prefix(&mut c, &other, 9, None), 4);
        m.release(&mut c);
        // Keeping one token to compute: a 8-token prompt matches one block, not two.
        let mut d = BlockTable::default();
        assert_eq!(m.match_prefix(&mut d, &prompt[..8], 7, None), 4);
        m.release(&mut d);
        m.release(&mut a);
        m.release(&mut b);
        assert_eq!(m.num_free(), 16);
        assert_eq!(m.num_cached(), 2, "the filed blocks stay cached");
        let mut e = BlockTable::default();
        assert_eq!(
            m.match_prefix(&mut e, &prompt, 9, None),
            8,
            "taken back from the cache"
        );
        assert_eq!(m.num_cached(), 0);
        m.release(&mut e);
    }

    #[test]
    fn blocks_are_shared_only_within_one_salt() {
        let mut m = BlockManager::new(16, 4);
        let p: Vec<u32> = (0..9).collect();
        let mut a = BlockTable::default();
        assert_eq!(m.match_prefix(&mut a, &p, 8, Some("a")), 0);
        assert!(m.grow(&mut a, 9));
        m.commit(&mut a, &p, 9);
        for (salt, want) in [(Some("a"), 8), (Some("b"), 0), (None, 0)] {
            let mut t = BlockTable::default();
            assert_eq!(m.match_prefix(&mut t, &p, 8, salt), want, "{salt:?}");
            m.release(&mut t);
        }
        m.release(&mut a);
    }

    #[test]
    fn cached_blocks_are_reused_when_free_ones_run_out() {
        let mut m = BlockManager::new(4, 2);
        let p: Vec<u32> = vec![1, 2, 3, 4];
        let mut a = BlockTable::default();
        assert!(m.grow(&mut a, 4));
        m.commit(&mut a, &p, 4);
        m.release(&mut a);
        assert_eq!((m.num_free(), m.num_cached()), (4, 2));
        // Four blocks for another sequence: the two free ones, then the cached ones.
        let mut b = BlockTable::default();
        assert!(m.grow(&mut b, 8));
        assert_eq!(m.num_cached(), 0);
        let mut c = BlockTable::default();
        assert_eq!(
            m.match_prefix(&mut c, &p, 3, None),
            0,
            "the evicted blocks are unfiled"
        );
        m.release(&mut b);
        assert_eq!(m.num_free(), 4);
    }

    #[test]
    fn without_prefix_caching_nothing_is_matched() {
        let mut m = BlockManager::new(8, 2).with_prefix_caching(false);
        let p: Vec<u32> = vec![1, 2, 3, 4, 5];
        let mut a = BlockTable::default();
        assert!(m.grow(&mut a, 5));
        m.commit(&mut a, &p, 5);
        let mut b = BlockTable::default();
        assert_eq!(m.match_prefix(&mut b, &p, 4, None), 0);
        m.release(&mut a);
        assert_eq!((m.num_free(), m.num_cached()), (8, 0));
    }

    /// Random requests arriving (often with a prompt another one has), matching filed
    /// prefixes, growing token by token and filing what they fill, being cancelled or
    /// preempted (newest first) when blocks run out: accounting stays exact (free plus
    /// blocks held by some table is the total, each block's count is its holders), and a
    /// block a sequence writes to is never held by another.
    #[test]
    fn random_workload_with_sharing_keeps_exact_accounting() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let bs = 4;
        let mut m = BlockManager::new(60, bs);
        // (table, tokens, computed)
        let mut running: Vec<(BlockTable, Vec<u32>, usize)> = Vec::new();
        let prompts: Vec<Vec<u32>> = (0..4)
            .map(|k| {
                (0..rng.gen_range(5..30))
                    .map(|i| (k * 100 + i) as u32)
                    .collect()
            })
            .collect();
        let (mut hits, mut preemptions) = (0, 0);
        for _ in 0..20_000 {
            match rng.gen_range(0..10) {
                0 | 1 => {
                    let mut toks = prompts[rng.gen_range(0..prompts.len())].clone();
                    let cut = rng.gen_range(1..=toks.len());
                    toks.truncate(cut);
                    let mut t = BlockTable::default();
                    let salt = [None, Some("tenant")][rng.gen_range(0..2)];
                    let hit = m.match_prefix(&mut t, &toks, toks.len() - 1, salt);
                    hits += hit;
                    if m.grow(&mut t, toks.len()) {
                        m.commit(&mut t, &toks, toks.len());
                        let n = toks.len();
                        running.push((t, toks, n));
                    } else {
                        m.release(&mut t);
                    }
                }
                2 if !running.is_empty() => {
                    let i = rng.gen_range(0..running.len());
                    let (mut t, _, _) = running.swap_remove(i);
                    m.release(&mut t);
                }
                _ if !running.is_empty() => {
                    let i = rng.gen_range(0..running.len());
                    let want = running[i].2 + 1;
                    while !m.grow(&mut running[i].0, want) {
                        let (mut t, _, _) = running.pop().unwrap();
                        m.release(&mut t);
                        preemptions += 1;
                        if i >= running.len() {
                            break;
                        }
                    }
                    if i < running.len() {
                        let (t, toks, computed) = &mut running[i];
                        toks.push(rng.gen_range(0..1000));
                        *computed = want;
                        m.commit(t, toks, want);
                    }
                }
                _ => {}
            }
            let mut holders = vec![0u32; m.total()];
            for (t, _, _) in &running {
                for &b in t.ids() {
                    holders[b as usize] += 1;
                }
            }
            let held = holders.iter().filter(|&&h| h > 0).count();
            assert_eq!(held + m.num_free(), m.total());
            assert_eq!(holders, m.refs);
            for (t, toks, computed) in &running {
                assert_eq!(t.len(), m.blocks_for(*computed));
                assert!(toks.len() >= *computed);
                // The block holding the next write is this table's alone.
                if computed % bs != 0 {
                    assert_eq!(holders[t.ids()[computed / bs] as usize], 1);
                }
            }
        }
        assert!(hits > 0 && preemptions > 0);
        for (mut t, _, _) in running.drain(..) {
            m.release(&mut t);
        }
        assert_eq!(m.num_free(), m.total());
    }

    /// Random requests arriving, growing token by token, being cancelled or preempted
    /// (newest first) when blocks run out: accounting stays exact and ends with all free.
    #[test]
    fn random_workload_keeps_exact_accounting() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut m = BlockManager::new(50, 8);
        // (table, tokens)
        let mut running: Vec<(BlockTable, usize)> = Vec::new();
        let mut preemptions = 0;
        let mut cancels = 0;
        for _ in 0..20_000 {
            match rng.gen_range(0..10) {
                0 | 1 => {
                    let mut t = BlockTable::default();
                    let len = rng.gen_range(1..60);
                    if m.grow(&mut t, len) {
                        running.push((t, len));
                    }
                }
                2 if !running.is_empty() => {
                    let i = rng.gen_range(0..running.len());
                    let (mut t, _) = running.swap_remove(i);
                    m.release(&mut t);
                    cancels += 1;
                }
                _ if !running.is_empty() => {
                    let i = rng.gen_range(0..running.len());
                    let want = running[i].1 + 1;
                    while !m.grow(&mut running[i].0, want) {
                        // Preempt the newest; possibly the one growing itself.
                        let (mut t, _) = running.pop().unwrap();
                        m.release(&mut t);
                        preemptions += 1;
                        if i >= running.len() {
                            break;
                        }
                    }
                    if i < running.len() {
                        running[i].1 = want;
                    }
                }
                _ => {}
            }
            let held: usize = running.iter().map(|(t, _)| t.len()).sum();
            assert_eq!(held + m.num_free(), m.total());
            for (t, len) in &running {
                assert_eq!(t.len(), m.blocks_for(*len));
            }
        }
        assert!(preemptions > 0 && cancels > 0);
        for (mut t, _) in running.drain(..) {
            m.release(&mut t);
        }
        assert_eq!(m.num_free(), m.total());
    }
}
