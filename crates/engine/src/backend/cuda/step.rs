//! A step's metadata on the GPU: the varlen layout that [`crate::model::StepBuilder`]
//! builds for every device ([`StepMeta`]), re-laid as the i32 arrays the kernels read
//! (plus what only they need: the sequence of each token, prefill attention tiles, and the
//! padding rows of a captured decode batch, and the work items of the split decode
//! attention), in one device buffer uploaded once per step. The buffer's address never
//! changes, so captured decode graphs replay with only its contents rewritten.

use anyhow::{anyhow, bail};

use super::buffer::DevBuf;
use super::device::CudaDevice;
use super::kernels::{DevPtr, FLASH_QUERY_TILE, PREFILL_TILE};
use crate::backend::StepMeta;

/// Sizes fixed at start-up (they size the scratch buffers and the metadata layout).
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Most tokens in one step (`--max-num-batched-tokens`).
    pub max_tokens: usize,
    /// Most sequences in one step (`--max-num-seqs`).
    pub max_seqs: usize,
    /// Longest sequence (`--max-model-len`).
    pub max_model_len: usize,
    /// Decode batch sizes captured as CUDA graphs (a step pads up to the next bucket;
    /// a larger decode step runs eagerly).
    pub graph_buckets: Vec<usize>,
    /// Confine every kernel to a green context of at least this many SMs
    /// (`--sm-partition`; `backend::cuda::green`).
    pub sm_partition: Option<u32>,
    /// An embedder's green contexts, movable while it runs (`--sm-partitions`;
    /// `backend::cuda::lanes`).
    pub sm_partitions: Vec<u32>,
}

/// The decode graph sizes, within `--max-num-seqs`: up to 512 sequences in steps of 32 past
/// 256, then to 1,024 in steps of 64, so that the seeds' generator decodes through a graph
/// at its 512 and 1,024 concurrent rather than through a thousand eager launches a step
/// (vLLM captures up to 512 by default, `max_cudagraph_capture_size`).
pub const DEFAULT_GRAPH_BUCKETS: [usize; 31] = [
    1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 480,
    512, 576, 640, 704, 768, 832, 896, 960, 1024,
];

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            max_tokens: 8192,
            max_seqs: 256,
            max_model_len: 4096,
            graph_buckets: DEFAULT_GRAPH_BUCKETS.to_vec(),
            sm_partition: None,
            sm_partitions: Vec::new(),
        }
    }
}

/// How decode steps are cut into work items for the split decode attention
/// (`decode_attention` in engine.cu): each token's keys into pieces of one common length,
/// at least `min_chunk` keys and long enough that the step has at most about `items`
/// pieces (a multiple of 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSplit {
    /// Target work items of a step (the kernel's grid is this plus the batch size).
    pub items: usize,
    /// Fewest keys per work item.
    pub min_chunk: usize,
}

impl DecodeSplit {
    /// Keys per work item when a step's tokens see `total_keys` keys in all.
    pub fn chunk(&self, total_keys: usize) -> usize {
        let per = total_keys.div_ceil(self.items.max(1)).div_ceil(16) * 16;
        per.max(self.min_chunk.div_ceil(16) * 16).max(16)
    }
}

/// Offsets (in i32 elements) of the per-step metadata arrays in the step buffer.
#[derive(Debug, Clone, Copy)]
pub struct StepLayout {
    /// Token id per token row.
    pub ids: usize,
    /// Position per token row.
    pub pos: usize,
    /// KV cache slot per token row (-1: no write, padding).
    pub slots: usize,
    /// Sequence (row of `tables`) per token row.
    pub seq_of: usize,
    /// First token row of each prefill attention tile.
    pub tile_start: usize,
    /// Query tokens of each prefill attention tile.
    pub tile_len: usize,
    /// Token rows whose output is wanted (logits or pooled), in order.
    pub rows: usize,
    /// Flash prefill tiles, five i32 each: first token row of the chunk, first query of
    /// the tile in the chunk, chunk length, position of the chunk's first token, sequence
    /// (`FLASH_QUERY_TILE` queries a tile; `flash_cap` of them at most).
    pub flash: usize,
    /// Prompt chunks of at least this many tokens attend with the tensor-core flash kernel
    /// (`prefill_flash_attention`), the others with the 8-query `prefill_attention`
    /// tiles; 0: every chunk with the latter (a head size without the flash kernel).
    pub flash_min_chunk: usize,
    /// Decode work items, three i32 each: decode slot, first key, keys
    /// (`split.items + max_seqs` of them at most).
    pub work: usize,
    /// First work item of each decode slot, `max_seqs + 1` entries: slot s owns items
    /// `item_first[s] .. item_first[s + 1]`, and `item_first[slots]` is the count.
    pub item_first: usize,
    /// Token row of each decode slot, `max_seqs` entries: every row of a decode step in
    /// order, or the one-token sequences of a prefill step (`mixed_decode`).
    pub dec_rows: usize,
    /// Whether a prefill step's one-token sequences (decodes beside prompt chunks) attend
    /// with the split decode kernel, not with the 8-query tiles: only where the executor
    /// runs that kernel.
    pub mixed_decode: bool,
    /// Block table per sequence, `max_blocks` wide.
    pub tables: usize,
    pub max_blocks: usize,
    pub split: DecodeSplit,
}

impl StepLayout {
    pub fn new(max_tokens: usize, max_seqs: usize, max_blocks: usize, split: DecodeSplit) -> Self {
        let t = max_tokens;
        let flash = 6 * t + max_seqs;
        let work = flash + 5 * Self::flash_cap(t, max_seqs);
        let item_first = work + 3 * (split.items + max_seqs);
        let dec_rows = item_first + max_seqs + 1;
        Self {
            ids: 0,
            pos: t,
            slots: 2 * t,
            seq_of: 3 * t,
            tile_start: 4 * t,
            tile_len: 5 * t,
            rows: 6 * t,
            flash,
            flash_min_chunk: 0,
            work,
            item_first,
            dec_rows,
            mixed_decode: false,
            tables: dec_rows + max_seqs,
            max_blocks,
            split,
        }
    }

    /// This layout with prompt chunks of at least `min` tokens on the flash kernel (0:
    /// none).
    pub fn with_flash_prefill(mut self, min: usize) -> Self {
        self.flash_min_chunk = min;
        self
    }

    /// This layout with a prefill step's one-token sequences on the split decode kernel
    /// (`on`) or on the 8-query tiles.
    pub fn with_mixed_decode(mut self, on: bool) -> Self {
        self.mixed_decode = on;
        self
    }

    /// The most flash prefill tiles a step can have: every chunk's queries in tiles of
    /// `FLASH_QUERY_TILE`, one partial tile per sequence at most.
    pub fn flash_cap(max_tokens: usize, max_seqs: usize) -> usize {
        max_tokens.div_ceil(FLASH_QUERY_TILE) + max_seqs
    }

    /// Work items the split decode kernel is launched for with `slots` decode slots (the
    /// most a step of that many can have).
    pub fn items_cap(&self, slots: usize) -> usize {
        self.split.items + slots
    }

    /// i32 elements used by a step of `seqs` sequences (block table rows).
    pub fn len(&self, seqs: usize) -> usize {
        self.tables + seqs * self.max_blocks
    }
}

/// What a packed step holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedStep {
    /// Token rows the forward runs over (the bucket size for a padded decode batch).
    pub tokens: usize,
    /// Output rows (sampled or pooled).
    pub rows: usize,
    /// Prefill attention tiles; 0 when every sequence brings one token (decode kernel).
    pub tiles: usize,
    /// Flash prefill tiles (`StepLayout::flash`); a step with either kind of tile is a
    /// prefill step.
    pub flash_tiles: usize,
    /// Decode slots: the token rows the split decode kernel attends for (every row of a
    /// decode step, padding included; a prefill step's one-token sequences with
    /// `mixed_decode`, else none).
    pub slots: usize,
    /// Decode work items of those slots.
    pub items: usize,
}

impl PackedStep {
    /// Every sequence brings one token (no prefill tiles of either kind).
    pub fn is_decode(&self) -> bool {
        self.tiles == 0 && self.flash_tiles == 0
    }
}

/// Packs `meta` into `m` in `lay`'s layout. `pad_to > 0` pads a decode batch to that many rows
/// (token 0 at position 0, no KV write, each its own sequence and output row).
pub fn pack(
    m: &mut Vec<i32>,
    meta: &StepMeta<'_>,
    pad_to: usize,
    lay: StepLayout,
    opts: &CudaOptions,
) -> anyhow::Result<PackedStep> {
    let (t, n) = (meta.num_tokens(), meta.num_seqs());
    let rows_n = pad_to.max(n);
    if t > opts.max_tokens || rows_n > opts.max_seqs {
        bail!(
            "step of {t} tokens / {n} sequences is over the engine's limits ({} / {})",
            opts.max_tokens,
            opts.max_seqs
        );
    }
    if meta.max_blocks_per_seq > lay.max_blocks {
        bail!(
            "block table of {} blocks is over the limit {}",
            meta.max_blocks_per_seq,
            lay.max_blocks
        );
    }
    m.clear();
    m.resize(lay.len(rows_n), 0);
    let seq = |i: usize| meta.seq_starts[i] as usize..meta.seq_starts[i + 1] as usize;
    let prefill = (0..n).any(|i| seq(i).len() > 1);
    let (mut tiles, mut flash_tiles, mut slots) = (0usize, 0usize, 0usize);
    for i in 0..n {
        let rows = seq(i);
        // A decode step's rows, and a prefill step's one-token sequences where the split
        // kernel takes them, are decode slots (their work items follow below).
        if !prefill || (lay.mixed_decode && rows.len() == 1) {
            m[lay.dec_rows + slots] = rows.start as i32;
            slots += 1;
        } else if flash_chunk(meta, rows.clone(), lay.flash_min_chunk) {
            let p0 = meta.positions[rows.start] as i32;
            for q0 in (0..rows.len()).step_by(FLASH_QUERY_TILE) {
                let f = lay.flash + 5 * flash_tiles;
                m[f..f + 5].copy_from_slice(&[
                    rows.start as i32,
                    q0 as i32,
                    rows.len() as i32,
                    p0,
                    i as i32,
                ]);
                flash_tiles += 1;
            }
        } else {
            let mut c = 0;
            while c < rows.len() {
                m[lay.tile_start + tiles] = (rows.start + c) as i32;
                m[lay.tile_len + tiles] = (rows.len() - c).min(PREFILL_TILE) as i32;
                tiles += 1;
                c += PREFILL_TILE;
            }
        }
        for tok in rows {
            m[lay.ids + tok] = meta.tokens[tok] as i32;
            m[lay.pos + tok] = meta.positions[tok] as i32;
            m[lay.slots + tok] = meta.slot_mapping[tok] as i32;
            m[lay.seq_of + tok] = i as i32;
        }
        let mb = meta.max_blocks_per_seq;
        let table = &meta.block_tables[i * mb..(i + 1) * mb];
        let row = lay.tables + i * lay.max_blocks;
        for (dst, &blk) in m[row..row + mb].iter_mut().zip(table) {
            *dst = blk as i32;
        }
    }
    for (r, &row) in meta.sample_rows.iter().enumerate() {
        m[lay.rows + r] = row as i32;
    }
    for p in n..pad_to {
        m[lay.ids + p] = 0;
        m[lay.pos + p] = 0;
        m[lay.slots + p] = -1;
        m[lay.seq_of + p] = p as i32;
        m[lay.rows + p] = p as i32;
        // Its own decode slot (a decode step's slots are its rows).
        m[lay.dec_rows + p] = p as i32;
    }
    // Decode slots: each one's keys 0..=pos cut into work items of one common length; a
    // padding row (a slot of its own) gets one item of no keys (the kernel writes zeros).
    let ctx_of = |m: &[i32], s: usize| meta.positions[m[lay.dec_rows + s] as usize] as usize + 1;
    let total: usize = (0..slots).map(|s| ctx_of(m, s)).sum();
    let chunk = lay.split.chunk(total);
    let padded = if prefill { slots } else { pad_to.max(t) };
    // sum(ceil(ctx / chunk)) <= total / chunk + slots <= split.items + slots, plus the
    // padding: more would be a bug here, and would run into the arrays after `work`.
    let cap = lay.items_cap(padded);
    let mut items = 0usize;
    for s in 0..padded {
        m[lay.item_first + s] = items as i32;
        let ctx = if s < slots { ctx_of(m, s) } else { 0 };
        let mut k0 = 0;
        loop {
            if items == cap {
                bail!("decode step of {padded} slots cut into more work items than the {cap} the kernel is launched for");
            }
            let w = lay.work + 3 * items;
            m[w..w + 3].copy_from_slice(&[s as i32, k0 as i32, chunk.min(ctx - k0) as i32]);
            items += 1;
            k0 += chunk;
            if k0 >= ctx {
                break;
            }
        }
    }
    m[lay.item_first + padded] = items as i32;
    Ok(if pad_to > 0 {
        PackedStep {
            tokens: pad_to,
            rows: pad_to,
            tiles,
            flash_tiles,
            slots: padded,
            items,
        }
    } else {
        PackedStep {
            tokens: t,
            rows: meta.sample_rows.len(),
            tiles,
            flash_tiles,
            slots: padded,
            items,
        }
    })
}

/// Whether the chunk of `rows` attends with the flash kernel: at least `min` tokens (0:
/// never) at consecutive positions, as the kernel puts query row r at the chunk's first
/// position + r.
fn flash_chunk(meta: &StepMeta<'_>, rows: std::ops::Range<usize>, min: usize) -> bool {
    min > 0
        && rows.len() >= min
        && meta.positions[rows.clone()]
            .windows(2)
            .all(|w| w[1] == w[0] + 1)
}

/// The step metadata buffer: packed on the host, uploaded once per step.
pub struct StepBuffer {
    host: Vec<i32>,
    dev: DevBuf,
}

impl StepBuffer {
    /// Sized for the largest layout `opts` and `split` allow (blocks of one token).
    pub fn alloc(dev: &CudaDevice, opts: &CudaOptions, split: DecodeSplit) -> anyhow::Result<Self> {
        let n = opts.max_seqs;
        let max_blocks_any = opts.max_model_len.max(1);
        let len = StepLayout::new(opts.max_tokens, n, max_blocks_any, split).len(n);
        Ok(Self {
            host: Vec::with_capacity(len),
            dev: DevBuf::alloc(dev, len * 4)?,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.dev.bytes
    }

    /// Device address of the array at `offset` (a [`StepLayout`] field).
    pub fn ptr(&self, offset: usize) -> DevPtr {
        self.dev.ptr + (offset * 4) as u64
    }

    /// Packs `meta` into the host copy (see [`pack`]).
    pub fn pack(
        &mut self,
        meta: &StepMeta<'_>,
        pad_to: usize,
        lay: StepLayout,
        opts: &CudaOptions,
    ) -> anyhow::Result<PackedStep> {
        pack(&mut self.host, meta, pad_to, lay, opts)
    }

    /// Copies the packed metadata of `rows_n` sequences to the device (stream-ordered).
    pub fn upload(&self, dev: &CudaDevice, rows_n: usize, lay: StepLayout) -> anyhow::Result<()> {
        let n = lay.len(rows_n);
        if n > self.host.len() {
            bail!("step metadata of {n} values but {} packed", self.host.len());
        }
        // SAFETY: the device buffer holds the largest layout's length >= n i32s.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.dev.ptr,
                &self.host[..n],
                dev.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("uploading step metadata: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StepBuilder;
    use crate::model_api::{SampleSpec, SeqStep};

    const GREEDY: SampleSpec<'static> = SampleSpec {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        uniform: 0.0,
        masked: &[],
    };

    const SPLIT: DecodeSplit = DecodeSplit {
        items: 8,
        min_chunk: 16,
    };

    fn opts() -> CudaOptions {
        CudaOptions {
            max_tokens: 32,
            max_seqs: 4,
            max_model_len: 64,
            graph_buckets: vec![1, 2, 4],
            sm_partition: None,
            sm_partitions: Vec::new(),
        }
    }

    /// A prefill step of two sequences (one continuing a cached prefix), laid out as the
    /// kernels read it: ids, positions, slots through the block table, tiles of
    /// `PREFILL_TILE` query tokens, output rows, block tables at the layout's width.
    #[test]
    fn a_prefill_step_packs_tokens_slots_tiles_and_tables() {
        let a: Vec<u32> = (1..=10).collect();
        let b = [7u32, 8, 9];
        let seqs = [
            SeqStep {
                tokens: &a,
                start_pos: 0,
                block_table: &[5, 2, 9],
                sample: Some(GREEDY),
            },
            SeqStep {
                tokens: &b,
                start_pos: 4,
                block_table: &[1, 3],
                sample: None,
            },
        ];
        let mut builder = StepBuilder::default();
        let meta = builder.paged(&seqs, &[], 4, 16, 100).unwrap();
        let lay = StepLayout::new(32, 4, 16, SPLIT);
        let mut m = Vec::new();
        let packed = pack(&mut m, &meta, 0, lay, &opts()).unwrap();
        assert_eq!(
            packed,
            PackedStep {
                tokens: 13,
                rows: 1,
                tiles: 3,
                flash_tiles: 0,
                slots: 0,
                items: 0
            }
        );
        assert_eq!(m.len(), lay.len(2));
        let at = |off: usize, n: usize| m[off..off + n].to_vec();
        assert_eq!(at(lay.ids, 13), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 7, 8, 9]);
        assert_eq!(at(lay.pos, 13), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4, 5, 6]);
        // Seq 0: positions 0..10 in blocks 5, 2, 9; seq 1: positions 4..7 in block 3.
        assert_eq!(
            at(lay.slots, 13),
            [20, 21, 22, 23, 8, 9, 10, 11, 36, 37, 12, 13, 14]
        );
        assert_eq!(at(lay.seq_of, 13), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(at(lay.tile_start, 3), [0, 8, 10]);
        assert_eq!(at(lay.tile_len, 3), [8, 2, 3]);
        assert_eq!(at(lay.rows, 1), [9]);
        assert_eq!(at(lay.tables, 3), [5, 2, 9]);
        assert_eq!(at(lay.tables + lay.max_blocks, 3), [1, 3, 0]);
    }

    /// With the flash prefill on, a chunk of at least the minimum goes to flash tiles of
    /// `FLASH_QUERY_TILE` queries (its row, first query, length, first position and
    /// sequence), while a decode token and a shorter chunk of the same step keep the
    /// 8-query tiles; the same step with the flash prefill off has no flash tile.
    #[test]
    fn long_chunks_get_flash_tiles_and_the_rest_keep_prefill_tiles() {
        let long: Vec<u32> = (0..150).collect();
        let short = [1u32, 2, 3];
        let one = [9u32];
        let table: Vec<u32> = (0..40).collect();
        let seqs = [
            SeqStep {
                tokens: &one,
                start_pos: 20,
                block_table: &table[..6],
                sample: Some(GREEDY),
            },
            SeqStep {
                tokens: &long,
                start_pos: 30,
                block_table: &table,
                sample: Some(GREEDY),
            },
            SeqStep {
                tokens: &short,
                start_pos: 0,
                block_table: &table[..1],
                sample: None,
            },
        ];
        let mut builder = StepBuilder::default();
        let meta = builder.paged(&seqs, &[], 8, 64, 1000).unwrap();
        let o = prompt_step_opts();
        let lay = StepLayout::new(256, 4, 40, SPLIT).with_flash_prefill(16);
        let mut m = Vec::new();
        let packed = pack(&mut m, &meta, 0, lay, &o).unwrap();
        assert_eq!(
            (packed.tokens, packed.tiles, packed.flash_tiles),
            (154, 2, 3)
        );
        // The decode token (row 0) and the 3-token chunk (rows 151..154) keep 8-query tiles.
        assert_eq!(at_m(&m, lay.tile_start, 2), [0, 151]);
        assert_eq!(at_m(&m, lay.tile_len, 2), [1, 3]);
        // The 150-token chunk at positions 30.. of sequence 1 starts at row 1: 64 + 64 + 22.
        assert_eq!(
            at_m(&m, lay.flash, 15),
            [1, 0, 150, 30, 1, 1, 64, 150, 30, 1, 1, 128, 150, 30, 1]
        );
        assert!(packed.flash_tiles <= StepLayout::flash_cap(256, 4));
        let off = pack(&mut m, &meta, 0, lay.with_flash_prefill(0), &o).unwrap();
        assert_eq!((off.tiles, off.flash_tiles), (2 + 150usize.div_ceil(8), 0));

        // With the split decode kernel taking the step's one-token sequences, the decode
        // token (row 0, position 20: 21 keys) is decode slot 0 with work items of its own;
        // the chunks keep their tiles.
        let mixed = lay.with_mixed_decode(true);
        let packed = pack(&mut m, &meta, 0, mixed, &o).unwrap();
        assert_eq!((packed.tiles, packed.flash_tiles, packed.slots), (1, 3, 1));
        assert_eq!(at_m(&m, mixed.tile_start, 1), [151]);
        assert_eq!(m[mixed.dec_rows], 0);
        // 21 keys over 8 items: chunks of 16, so two items.
        assert_eq!(packed.items, 2);
        assert_eq!(at_m(&m, mixed.item_first, 2), [0, 2]);
        assert_eq!(at_m(&m, mixed.work, 6), [0, 0, 16, 0, 16, 5]);
    }

    fn at_m(m: &[i32], off: usize, n: usize) -> Vec<i32> {
        m[off..off + n].to_vec()
    }

    /// The options of the steps that carry prompt chunks beside one-token sequences.
    fn prompt_step_opts() -> CudaOptions {
        CudaOptions {
            max_tokens: 256,
            max_seqs: 4,
            max_model_len: 320,
            ..opts()
        }
    }

    /// A prefill step whose one-token sequences sit between prompt chunks: each decode
    /// slot names its own token row, so the decode kernel reads and writes the right rows
    /// while the tiles take the chunks.
    #[test]
    fn decode_slots_of_a_prefill_step_name_their_rows() {
        let a: Vec<u32> = (0..20).collect();
        let b: Vec<u32> = (0..5).collect();
        let (x, y) = ([7u32], [8u32]);
        let table: Vec<u32> = (0..40).collect();
        let step = |tokens, start_pos| SeqStep {
            tokens,
            start_pos,
            block_table: &table,
            sample: Some(GREEDY),
        };
        let seqs = [step(&a, 0), step(&x, 40), step(&b, 3), step(&y, 99)];
        let mut builder = StepBuilder::default();
        let meta = builder.paged(&seqs, &[], 8, 64, 1000).unwrap();
        let o = prompt_step_opts();
        let lay = StepLayout::new(256, 4, 40, SPLIT)
            .with_flash_prefill(16)
            .with_mixed_decode(true);
        let mut m = Vec::new();
        let packed = pack(&mut m, &meta, 0, lay, &o).unwrap();
        // Rows: a 0..20, x 20, b 21..26, y 26.
        assert_eq!(packed.slots, 2);
        assert_eq!(at_m(&m, lay.dec_rows, 2), [20, 26]);
        assert_eq!((packed.flash_tiles, packed.tiles), (1, 1));
        assert_eq!(at_m(&m, lay.tile_start, 1), [21]);
        // 41 + 100 keys over 8 items: chunks of 32; x in 2 items, y in 4.
        assert_eq!(at_m(&m, lay.item_first, 3), [0, 2, 6]);
        assert_eq!(packed.items, 6);
        let work: Vec<i32> = at_m(&m, lay.work, 18);
        assert_eq!(
            work,
            [0, 0, 32, 0, 32, 9, 1, 0, 32, 1, 32, 32, 1, 64, 32, 1, 96, 4]
        );
        assert!(packed.items <= lay.items_cap(packed.slots));
    }

    /// The flash tiles' region never runs into the decode work items: the most tiles a
    /// step can make (every sequence's chunk cut into 64-query tiles) fit `flash_cap`.
    #[test]
    fn the_flash_region_holds_the_most_tiles_a_step_makes() {
        for (t, n) in [(8192usize, 256usize), (256, 4), (100, 7)] {
            let lay = StepLayout::new(t, n, 16, SPLIT);
            // n chunks sharing t tokens: at most t / 64 + n tiles.
            let worst: usize = (0..n)
                .map(|i| (t / n + usize::from(i < t % n)).div_ceil(FLASH_QUERY_TILE))
                .sum();
            assert!(worst <= StepLayout::flash_cap(t, n), "{t} tokens, {n} seqs");
            assert_eq!(lay.work - lay.flash, 5 * StepLayout::flash_cap(t, n));
            assert!(lay.flash >= lay.rows + n);
        }
    }

    /// A decode batch of three padded to the bucket of four: no tiles (the decode kernel),
    /// the padding row writes no KV and is its own sequence and output row.
    #[test]
    fn a_decode_batch_pads_to_its_bucket() {
        let toks = [[11u32], [12], [13]];
        let tables = [[0u32, 1], [2, 3], [4, 5]];
        let seqs: Vec<SeqStep<'_>> = toks
            .iter()
            .zip(&tables)
            .map(|(t, tb)| SeqStep {
                tokens: t,
                start_pos: 5,
                block_table: tb,
                sample: Some(GREEDY),
            })
            .collect();
        let mut builder = StepBuilder::default();
        let meta = builder.paged(&seqs, &[], 4, 8, 100).unwrap();
        let lay = StepLayout::new(32, 4, 16, SPLIT);
        let mut m = Vec::new();
        let packed = pack(&mut m, &meta, 4, lay, &opts()).unwrap();
        assert_eq!(
            packed,
            PackedStep {
                tokens: 4,
                rows: 4,
                tiles: 0,
                flash_tiles: 0,
                slots: 4,
                items: 4
            }
        );
        assert_eq!(m.len(), lay.len(4));
        let at = |off: usize| m[off..off + 4].to_vec();
        assert_eq!(at(lay.ids), [11, 12, 13, 0]);
        assert_eq!(at(lay.pos), [5, 5, 5, 0]);
        assert_eq!(at(lay.slots), [5, 13, 21, -1]);
        assert_eq!(at(lay.seq_of), [0, 1, 2, 3]);
        assert_eq!(at(lay.rows), [0, 1, 2, 3]);
        assert_eq!(at(lay.dec_rows), [0, 1, 2, 3]);
        // Six keys each: one work item per token (chunk 16); the padding row one of none.
        assert_eq!(m[lay.item_first..lay.item_first + 5], [0, 1, 2, 3, 4]);
        assert_eq!(
            m[lay.work..lay.work + 12],
            [0, 0, 6, 1, 0, 6, 2, 0, 6, 3, 0, 0]
        );
    }

    /// Long contexts are cut into pieces of one length, a multiple of 16, so that the step
    /// has about `split.items` of them; every key is covered once, in order.
    #[test]
    fn decode_work_items_cover_each_context_in_even_pieces() {
        let toks = [[1u32], [2], [3]];
        let tables: Vec<Vec<u32>> = (0..3).map(|i| (i * 12..i * 12 + 12).collect()).collect();
        let starts = [99usize, 40, 0];
        let seqs: Vec<SeqStep<'_>> = toks
            .iter()
            .zip(&tables)
            .zip(starts)
            .map(|((t, tb), s)| SeqStep {
                tokens: t,
                start_pos: s,
                block_table: tb,
                sample: Some(GREEDY),
            })
            .collect();
        let mut builder = StepBuilder::default();
        let meta = builder.paged(&seqs, &[], 16, 64, 100).unwrap();
        let lay = StepLayout::new(32, 4, 16, SPLIT);
        // 100 + 41 + 1 = 142 keys over 8 items: chunks of 18 -> 32 keys.
        assert_eq!(SPLIT.chunk(142), 32);
        let mut m = Vec::new();
        let packed = pack(&mut m, &meta, 0, lay, &opts()).unwrap();
        assert_eq!(packed.items, 4 + 2 + 1);
        assert!(packed.items <= lay.items_cap(3));
        assert_eq!(m[lay.item_first..lay.item_first + 4], [0, 4, 6, 7]);
        let work: Vec<[i32; 3]> = m[lay.work..lay.work + 3 * 7]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        assert_eq!(
            work,
            [
                [0, 0, 32],
                [0, 32, 32],
                [0, 64, 32],
                [0, 96, 4],
                [1, 0, 32],
                [1, 32, 9],
                [2, 0, 1]
            ]
        );
        // A prefill step has no work items.
        let prompt: Vec<u32> = (1..=5).collect();
        let one = [SeqStep {
            tokens: &prompt,
            start_pos: 0,
            block_table: &tables[0],
            sample: Some(GREEDY),
        }];
        let meta = builder.paged(&one, &[], 16, 64, 100).unwrap();
        assert_eq!(pack(&mut m, &meta, 0, lay, &opts()).unwrap().items, 0);
    }

    #[test]
    fn the_decode_chunk_is_a_multiple_of_16_and_bounds_the_item_count() {
        let split = DecodeSplit {
            items: 512,
            min_chunk: 64,
        };
        assert_eq!(split.chunk(64 * 192), 64);
        assert_eq!(split.chunk(256 * 192), 96);
        assert_eq!(split.chunk(32 * 8192), 512);
        assert_eq!(
            DecodeSplit {
                items: 0,
                min_chunk: 0
            }
            .chunk(10),
            16
        );
        // total / chunk <= items, so n contexts adding up to `total` make at most
        // items + n pieces (one partial piece each).
        for total in [1usize, 17, 999, 65_537, 1 << 20] {
            let c = split.chunk(total);
            assert_eq!(c % 16, 0);
            assert!(total.div_ceil(c) <= split.items, "{total}: chunk {c}");
        }
    }

    #[test]
    fn steps_over_the_limits_are_errors() {
        let long: Vec<u32> = vec![1; 33];
        let table: Vec<u32> = (0..9).collect();
        let seqs = [SeqStep {
            tokens: &long,
            start_pos: 0,
            block_table: &table,
            sample: None,
        }];
        let mut builder = StepBuilder::default();
        let meta = builder.paged(&seqs, &[], 4, 16, 100).unwrap();
        let mut m = Vec::new();
        let err = pack(&mut m, &meta, 0, StepLayout::new(32, 4, 16, SPLIT), &opts()).unwrap_err();
        assert!(
            err.to_string().contains("over the engine's limits"),
            "{err}"
        );
        let wide = CudaOptions {
            max_tokens: 64,
            ..opts()
        };
        let err = pack(&mut m, &meta, 0, StepLayout::new(64, 4, 8, SPLIT), &wide).unwrap_err();
        assert!(err.to_string().contains("block table"), "{err}");
        let one = [SeqStep {
            tokens: &long[..1],
            start_pos: 0,
            block_table: &table[..1],
            sample: Some(GREEDY),
        }];
        let meta = builder.paged(&one, &[], 4, 16, 100).unwrap();
        let err = pack(&mut m, &meta, 8, StepLayout::new(32, 4, 16, SPLIT), &opts()).unwrap_err();
        assert!(
            err.to_string().contains("over the engine's limits"),
            "{err}"
        );
    }
}
