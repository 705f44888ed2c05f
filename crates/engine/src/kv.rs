//! Paged KV cache accounting (vLLM's block manager, without prefix sharing).
//!
//! The KV storage itself lives in the [`Generator`](crate::model_api::Generator) on its device;
//! this module only decides which fixed-size block belongs to which sequence. A sequence
//! holds a [`BlockTable`]; growing it takes blocks from the free list, freeing it returns
//! them all. Accounting is exact: `free + held by all tables == total` at every moment,
//! which the tests check under random allocation, cancellation and preemption.

/// The blocks one sequence holds, in position order (`block_table[p / block_size]`).
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
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

/// Hands out and takes back KV blocks of `block_size` tokens.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    /// A stack: the most recently freed block is reused first (warm in cache).
    free: Vec<u32>,
}

impl BlockManager {
    /// A manager of `num_blocks` blocks of `block_size` tokens each.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let num_blocks = num_blocks.min(u32::MAX as usize);
        BlockManager {
            block_size,
            total: num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// All blocks.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks not held by any sequence.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by sequences.
    pub fn num_used(&self) -> usize {
        self.total - self.free.len()
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
        if need > self.free.len() {
            return false;
        }
        let start = self.free.len() - need;
        table.blocks.extend(self.free.drain(start..).rev());
        true
    }

    /// Returns every block of `table` to the free list (cancel, finish, preemption).
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
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
