//! Qwen3 on the GPU: the CUDA fast path behind the same `Generator` / `Embedder` seam as
//! the CPU model (runner.rs). One step = one upload of packed per-step metadata (token ids,
//! positions, KV slots, sequence of each token, block tables, rows to sample), then only
//! kernel launches and GEMMs on one stream, then one download of the sampled ids. There is
//! no host work per layer, and decode steps (every sequence one token) are captured as a
//! CUDA graph per batch-size bucket and replayed (padding rows write no KV: slot -1).
//!
//! Per layer: add+RMSNorm -> qkv GEMM -> q/k norm + RoPE + KV write -> paged attention ->
//! o GEMM -> add+RMSNorm -> gate_up GEMM -> SiLU*up -> down GEMM. The residual stream is
//! fp32; everything else bf16 with fp32 accumulation.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::device::CudaDevice;
use super::gemm::{self, OutType};
use super::kernels::{DevPtr, Kernels, RopeTable, FLASH_QUERY_TILE, PREFILL_TILE};
use super::profile::Profiler;
use super::sampling::sample_row;
use super::shape::Qwen3Shape;
use super::weights::{DevBuf, Weights};
use crate::runner::{Embedder, Generator, ModelInfo, SeqStep, Task};

/// Sizes fixed at start-up (they size the scratch buffers and the metadata layout).
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Most tokens in one step (`--max-num-batched-tokens`).
    pub max_tokens: usize,
    /// Most sequences in one step (`--max-num-seqs`).
    pub max_seqs: usize,
    /// Longest sequence (`--max-model-len`).
    pub max_model_len: usize,
    /// Decode batch sizes captured as CUDA graphs (a step pads up to the next bucket).
    pub graph_buckets: Vec<usize>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            max_tokens: 8192,
            max_seqs: 256,
            max_model_len: 4096,
            graph_buckets: vec![1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256],
        }
    }
}

/// Where the weights come from.
pub enum WeightSource<'a> {
    /// Seeded random weights of the right shapes.
    Dummy { seed: u64 },
    /// A Hugging Face folder.
    Dir(&'a std::path::Path),
}

/// A captured decode graph. CUDA graph execs may be launched from any thread as long as
/// launches do not overlap; the model is used by one thread at a time (`&mut self`).
struct SendGraph(CudaGraph);
// SAFETY: see above; the graph is only launched through `&mut CudaQwen3`.
unsafe impl Send for SendGraph {}

/// Offsets (in i32 elements) of the per-step metadata arrays in one device buffer.
#[derive(Debug, Clone, Copy)]
struct MetaLayout {
    ids: usize,
    pos: usize,
    slots: usize,
    seq_of: usize,
    tile_start: usize,
    tile_len: usize,
    rows: usize,
    tables: usize,
    max_blocks: usize,
}

impl MetaLayout {
    fn new(max_tokens: usize, max_seqs: usize, max_blocks: usize) -> Self {
        let t = max_tokens;
        Self {
            ids: 0,
            pos: t,
            slots: 2 * t,
            seq_of: 3 * t,
            tile_start: 4 * t,
            tile_len: 5 * t,
            rows: 6 * t,
            tables: 6 * t + max_seqs,
            max_blocks,
        }
    }
    fn len(&self, seqs: usize) -> usize {
        self.tables + seqs * self.max_blocks
    }
}

/// Activation scratch, sized for the largest step.
struct Scratch {
    meta: DevBuf,
    residual: DevBuf,
    normed: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    delta: DevBuf,
    gate_up: DevBuf,
    act: DevBuf,
    last: DevBuf,
    logits: DevBuf,
    sampled: DevBuf,
    pooled: DevBuf,
    _blas_workspace: DevBuf,
}

/// The KV cache: all layers' K and V in one allocation.
struct KvCache {
    mem: DevBuf,
    /// Bytes of one layer's K (V follows it).
    layer_bytes: usize,
    block_size: usize,
}

/// Where attention reads and writes K/V in a forward pass.
#[derive(Clone, Copy)]
struct KvPlace {
    base: DevPtr,
    /// Bytes between layers (0: all layers share one scratch, the embedding path).
    layer_stride: usize,
    /// Bytes from a layer's K to its V.
    v_offset: usize,
    block_size: usize,
}

/// Query tiles of the embedding path's flash attention: three ints per tile (first token
/// row of the sequence, first query position, sequence length), uploaded per chunk.
struct FlashTiles {
    buf: DevBuf,
    count: usize,
}

/// Qwen3 (generate or embed) on one GPU.
pub struct CudaQwen3 {
    dev: CudaDevice,
    k: Kernels,
    s: Qwen3Shape,
    w: Weights,
    info: ModelInfo,
    opts: CudaOptions,
    scratch: Scratch,
    kv: Option<KvCache>,
    embed_kv: Option<DevBuf>,
    flash: Option<FlashTiles>,
    /// Use the tensor-core flash kernel for embeddings (else the paged prefill kernel).
    embed_flash: bool,
    rope: RopeTable,
    _rope_buf: DevBuf,
    layout: Option<MetaLayout>,
    graphs: HashMap<usize, SendGraph>,
    meta_host: Vec<i32>,
    profiler: Option<Profiler>,
}

const EMBED_BLOCK: usize = 16;
const BLAS_WORKSPACE: usize = 32 << 20;

impl CudaQwen3 {
    /// Opens GPU `ordinal`, compiles the kernels, loads or fills the weights and allocates
    /// the scratch buffers. The KV cache comes later (`init_kv_cache`).
    pub fn new(
        ordinal: usize,
        shape: Qwen3Shape,
        task: Task,
        source: WeightSource<'_>,
        opts: CudaOptions,
    ) -> anyhow::Result<Self> {
        let dev = CudaDevice::open(ordinal)?;
        let s = shape;
        if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                s.heads,
                s.kv_heads
            );
        }
        let k = Kernels::compile(&dev, s.head_dim, s.heads / s.kv_heads)?;
        let w = match source {
            WeightSource::Dummy { seed } => Weights::dummy(&dev, &k, &s, seed)?,
            WeightSource::Dir(dir) => Weights::from_dir(&dev, &s, dir)?,
        };
        let (t, n) = (opts.max_tokens, opts.max_seqs);
        let bf = 2usize;
        let max_blocks_any = opts.max_model_len.div_ceil(1).max(1);
        let meta_len = MetaLayout::new(t, n, max_blocks_any).len(n);
        let scratch = Scratch {
            meta: DevBuf::alloc(&dev, meta_len * 4)?,
            residual: DevBuf::alloc(&dev, t * s.hidden * 4)?,
            normed: DevBuf::alloc(&dev, t * s.hidden * bf)?,
            qkv: DevBuf::alloc(&dev, t * s.qkv_width() * bf)?,
            attn: DevBuf::alloc(&dev, t * s.heads * s.head_dim * bf)?,
            delta: DevBuf::alloc(&dev, t * s.hidden * bf)?,
            gate_up: DevBuf::alloc(&dev, t * 2 * s.inter * bf)?,
            act: DevBuf::alloc(&dev, t * s.inter * bf)?,
            last: DevBuf::alloc(&dev, n * s.hidden * bf)?,
            logits: DevBuf::alloc(&dev, n * s.vocab * 4)?,
            sampled: DevBuf::alloc(&dev, n * 4)?,
            pooled: DevBuf::alloc(&dev, n * s.hidden * 4)?,
            _blas_workspace: DevBuf::alloc(&dev, BLAS_WORKSPACE)?,
        };
        gemm::set_workspace(&dev.blas, scratch._blas_workspace.ptr, BLAS_WORKSPACE)?;
        // SAFETY: the range is the qkv buffer just allocated.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                scratch.qkv.ptr,
                0,
                scratch.qkv.bytes,
                dev.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("clearing scratch: {e}"))?;
        let rope_positions = opts.max_model_len.min(s.max_positions.max(1));
        let rope_buf = DevBuf::alloc(&dev, rope_positions * s.head_dim / 2 * 8)?;
        k.rope_table(rope_buf.ptr, rope_positions, s.rope_theta)?;
        let rope = RopeTable {
            ptr: rope_buf.ptr,
            positions: rope_positions,
        };
        let embed_flash = k.has_flash_attention();
        let info = ModelInfo {
            architecture: "qwen3".to_string(),
            task,
            vocab_size: s.vocab,
            max_position_embeddings: s.max_positions,
            eos_token_ids: s.eos_token_ids.clone(),
            kv_bytes_per_token: s.kv_bytes_per_token(),
            weight_bytes: s.weight_bytes(),
        };
        let meta_host = Vec::with_capacity(meta_len);
        Ok(Self {
            dev,
            k,
            s,
            w,
            info,
            opts,
            scratch,
            kv: None,
            embed_kv: None,
            flash: None,
            embed_flash,
            rope,
            _rope_buf: rope_buf,
            layout: None,
            graphs: HashMap::new(),
            meta_host,
            profiler: None,
        })
    }

    /// Replaces the serving-side description (EOS ids from generation_config.json etc.).
    pub fn set_info(&mut self, info: ModelInfo) {
        self.info = info;
    }

    /// The GPU's name and architecture, e.g. ("NVIDIA H100 80GB HBM3", "sm_90").
    pub fn device_name(&self) -> (&str, &str) {
        (&self.dev.name, &self.dev.arch)
    }

    /// KV blocks that fit when this engine may use `fraction` of the GPU's total memory
    /// (`--gpu-memory-utilization`) for weights, scratch and KV, given what it already
    /// holds; also capped by the memory free right now (another tenant, an MPS limit).
    pub fn kv_blocks_for_fraction(
        &self,
        fraction: f64,
        block_size: usize,
    ) -> anyhow::Result<usize> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            bail!("--gpu-memory-utilization must be in (0, 1], got {fraction}");
        }
        let (free, total) = self.dev.memory_info()?;
        let held = self.w_bytes_held();
        // Graph execs, cuBLAS kernels and module code: a fixed reserve.
        let reserve = 512usize << 20;
        let budget = ((total as f64 * fraction) as usize).saturating_sub(held + reserve);
        let avail = budget.min(free.saturating_sub(reserve));
        let per_block = block_size * self.s.kv_bytes_per_token();
        let blocks = avail / per_block.max(1);
        if blocks == 0 {
            bail!(
                "--gpu-memory-utilization {fraction}: no room for the KV cache ({} MiB of {} MiB held by weights and scratch, {} MiB free)",
                held >> 20,
                total >> 20,
                free >> 20
            );
        }
        Ok(blocks)
    }

    fn w_bytes_held(&self) -> usize {
        let sc = &self.scratch;
        self.s.weight_bytes()
            + [
                &sc.meta,
                &sc.residual,
                &sc.normed,
                &sc.qkv,
                &sc.attn,
                &sc.delta,
                &sc.gate_up,
                &sc.act,
                &sc.last,
                &sc.logits,
                &sc.sampled,
                &sc.pooled,
            ]
            .iter()
            .map(|b| b.bytes)
            .sum::<usize>()
            + BLAS_WORKSPACE
    }

    /// Turns the per-op time breakdown on (eager steps only; graphs are bypassed).
    pub fn set_profiling(&mut self, on: bool) {
        self.profiler = on.then(|| Profiler::new(self.dev.ctx.clone()));
    }

    /// (op, total ms, calls) since profiling was turned on, largest first.
    pub fn profile_report(&self) -> Vec<(&'static str, f64, u64)> {
        self.profiler
            .as_ref()
            .map(Profiler::report)
            .unwrap_or_default()
    }

    fn layout(&self) -> anyhow::Result<MetaLayout> {
        self.layout
            .ok_or_else(|| anyhow!("KV cache not initialised: call init_kv_cache first"))
    }

    /// Fills `meta_host` for a step over `seqs`; returns (tokens, rows sampled, prefill
    /// attention tiles; 0 when every sequence brings one token: the decode kernel runs).
    fn pack_step(
        &mut self,
        seqs: &[SeqStep<'_>],
        pad_to: usize,
        lay: MetaLayout,
        bs: usize,
    ) -> anyhow::Result<(usize, usize, usize)> {
        let t: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let rows_n = pad_to.max(seqs.len());
        if t > self.opts.max_tokens || rows_n > self.opts.max_seqs {
            bail!(
                "step of {t} tokens / {} sequences is over the engine's limits ({} / {})",
                seqs.len(),
                self.opts.max_tokens,
                self.opts.max_seqs
            );
        }
        let m = &mut self.meta_host;
        m.clear();
        m.resize(lay.len(rows_n), 0);
        let mut tok = 0usize;
        let mut r = 0usize;
        let mut tiles = 0usize;
        let prefill = seqs.iter().any(|s| s.tokens.len() > 1);
        for (i, sq) in seqs.iter().enumerate() {
            if prefill {
                let mut c = 0;
                while c < sq.tokens.len() {
                    m[lay.tile_start + tiles] = (tok + c) as i32;
                    m[lay.tile_len + tiles] = (sq.tokens.len() - c).min(PREFILL_TILE) as i32;
                    tiles += 1;
                    c += PREFILL_TILE;
                }
            }
            if sq.block_table.len() > lay.max_blocks {
                bail!(
                    "block table of {} blocks is over the limit {}",
                    sq.block_table.len(),
                    lay.max_blocks
                );
            }
            for (j, &id) in sq.tokens.iter().enumerate() {
                let p = sq.start_pos + j;
                let blk = *sq
                    .block_table
                    .get(p / bs)
                    .ok_or_else(|| anyhow!("position {p} is not covered by the block table"))?;
                m[lay.ids + tok] = id as i32;
                m[lay.pos + tok] = p as i32;
                m[lay.slots + tok] = (blk as usize * bs + p % bs) as i32;
                m[lay.seq_of + tok] = i as i32;
                tok += 1;
            }
            for (b, &blk) in sq.block_table.iter().enumerate() {
                m[lay.tables + i * lay.max_blocks + b] = blk as i32;
            }
            if sq.sample.is_some() {
                m[lay.rows + r] = (tok - 1) as i32;
                r += 1;
            }
        }
        // Padding rows of a captured batch: token 0 at position 0 of an empty table,
        // no KV write.
        for p in seqs.len()..pad_to {
            m[lay.ids + p] = 0;
            m[lay.pos + p] = 0;
            m[lay.slots + p] = -1;
            m[lay.seq_of + p] = p as i32;
            m[lay.rows + p] = p as i32;
        }
        let tokens = if pad_to > 0 { pad_to } else { t };
        let rows = if pad_to > 0 { pad_to } else { r };
        Ok((tokens, rows, tiles))
    }

    fn upload_meta(&self, rows_n: usize, lay: MetaLayout) -> anyhow::Result<()> {
        let n = lay.len(rows_n);
        // SAFETY: meta buffer holds lay.len(max_seqs) >= n i32s.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.scratch.meta.ptr,
                &self.meta_host[..n],
                self.dev.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("uploading step metadata: {e}"))
    }

    /// Enqueues the forward pass over `tokens` tokens; finishes with the `rows` selected
    /// rows either through lm_head + argmax (generate) or normalised in fp32 (embed).
    fn forward(
        &mut self,
        tokens: usize,
        rows: usize,
        tiles: usize,
        kv: KvPlace,
        lay: MetaLayout,
        embed: bool,
    ) -> anyhow::Result<()> {
        let mut prof = self.profiler.take();
        let r = self.forward_inner(tokens, rows, tiles, kv, lay, embed, &mut prof);
        self.profiler = prof;
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        tokens: usize,
        rows: usize,
        tiles: usize,
        kv: KvPlace,
        lay: MetaLayout,
        embed: bool,
        prof: &mut Option<Profiler>,
    ) -> anyhow::Result<()> {
        let (s, k, sc, w) = (&self.s, &self.k, &self.scratch, &self.w);
        let stream = &self.dev.stream;
        let blas = &self.dev.blas;
        let meta = |off: usize| sc.meta.ptr + (off * 4) as u64;
        // The embedding path attends with the flash kernel, which reads K/V from qkv.
        let flash = self.flash.as_ref().filter(|_| embed && self.embed_flash);
        let (h, t) = (s.hidden, tokens);
        macro_rules! op {
            ($name:expr, $e:expr) => {{
                let ev = prof.as_ref().and_then(|p| p.start(stream));
                let res = $e;
                if let Some(p) = prof.as_mut() {
                    p.end($name, ev, stream);
                }
                res?
            }};
        }
        op!(
            "embed",
            k.embed_gather(w.embed.ptr, meta(lay.ids), sc.residual.ptr, t, h)
        );
        for (li, lw) in w.layers.iter().enumerate() {
            let kc = kv.base + (li * kv.layer_stride) as u64;
            let vc = kc + kv.v_offset as u64;
            let delta = if li == 0 { 0 } else { sc.delta.ptr };
            op!(
                "rmsnorm+add",
                k.add_rmsnorm(
                    sc.residual.ptr,
                    delta,
                    lw.input_norm.ptr,
                    sc.normed.ptr,
                    0,
                    t,
                    h,
                    s.eps
                )
            );
            op!(
                "gemm qkv",
                gemm::linear(
                    blas,
                    sc.normed.ptr,
                    lw.qkv.ptr,
                    sc.qkv.ptr,
                    t,
                    s.qkv_width(),
                    h,
                    OutType::Bf16
                )
            );
            op!(
                "qk norm+rope+kv write",
                k.qk_norm_rope_kv(
                    sc.qkv.ptr,
                    lw.q_norm.ptr,
                    lw.k_norm.ptr,
                    meta(lay.pos),
                    meta(lay.slots),
                    if flash.is_some() { 0 } else { kc },
                    vc,
                    &self.rope,
                    t,
                    s.heads,
                    s.kv_heads,
                    s.eps,
                    s.rope_theta
                )
            );
            if let Some(ft) = flash {
                op!(
                    "attention (flash, embed)",
                    k.embed_flash_attention(
                        sc.qkv.ptr,
                        sc.attn.ptr,
                        ft.buf.ptr,
                        ft.count,
                        s.heads,
                        s.kv_heads
                    )
                );
            } else if tiles > 0 {
                op!(
                    "attention (prefill)",
                    k.prefill_attention(
                        sc.qkv.ptr,
                        sc.attn.ptr,
                        kc,
                        vc,
                        meta(lay.tables),
                        lay.max_blocks,
                        meta(lay.seq_of),
                        meta(lay.pos),
                        meta(lay.tile_start),
                        meta(lay.tile_len),
                        tiles,
                        kv.block_size,
                        s.kv_heads
                    )
                );
            } else {
                op!(
                    "attention (decode)",
                    k.paged_attention(
                        sc.qkv.ptr,
                        sc.attn.ptr,
                        kc,
                        vc,
                        meta(lay.tables),
                        lay.max_blocks,
                        meta(lay.seq_of),
                        meta(lay.pos),
                        t,
                        kv.block_size,
                        s.kv_heads
                    )
                );
            }
            op!(
                "gemm o",
                gemm::linear(
                    blas,
                    sc.attn.ptr,
                    lw.o_proj.ptr,
                    sc.delta.ptr,
                    t,
                    h,
                    s.heads * s.head_dim,
                    OutType::Bf16
                )
            );
            op!(
                "rmsnorm+add",
                k.add_rmsnorm(
                    sc.residual.ptr,
                    sc.delta.ptr,
                    lw.post_norm.ptr,
                    sc.normed.ptr,
                    0,
                    t,
                    h,
                    s.eps
                )
            );
            op!(
                "gemm gate_up",
                gemm::linear(
                    blas,
                    sc.normed.ptr,
                    lw.gate_up.ptr,
                    sc.gate_up.ptr,
                    t,
                    2 * s.inter,
                    h,
                    OutType::Bf16
                )
            );
            op!(
                "silu*up",
                k.silu_mul(sc.gate_up.ptr, sc.act.ptr, t, s.inter)
            );
            op!(
                "gemm down",
                gemm::linear(
                    blas,
                    sc.act.ptr,
                    lw.down.ptr,
                    sc.delta.ptr,
                    t,
                    h,
                    s.inter,
                    OutType::Bf16
                )
            );
        }
        if rows == 0 {
            return Ok(());
        }
        // The last layer's MLP output is still to be added: do it for every token (cheap)
        // with no normalisation output needed, then normalise only the selected rows.
        op!(
            "rmsnorm+add",
            k.add_rmsnorm(
                sc.residual.ptr,
                sc.delta.ptr,
                w.norm.ptr,
                sc.normed.ptr,
                0,
                t,
                h,
                s.eps
            )
        );
        if embed {
            op!(
                "pool",
                k.rmsnorm_rows_f32(
                    sc.residual.ptr,
                    w.norm.ptr,
                    sc.pooled.ptr,
                    meta(lay.rows),
                    rows,
                    h,
                    s.eps
                )
            );
        } else {
            op!(
                "rmsnorm rows",
                k.add_rmsnorm(
                    sc.residual.ptr,
                    0,
                    w.norm.ptr,
                    sc.last.ptr,
                    meta(lay.rows),
                    rows,
                    h,
                    s.eps
                )
            );
            op!(
                "gemm lm_head",
                gemm::linear(
                    blas,
                    sc.last.ptr,
                    w.lm_head_ptr(),
                    sc.logits.ptr,
                    rows,
                    s.vocab,
                    h,
                    OutType::F32
                )
            );
            op!(
                "argmax",
                k.argmax_rows(sc.logits.ptr, sc.sampled.ptr, rows, s.vocab)
            );
        }
        Ok(())
    }

    fn kv_place(&self) -> anyhow::Result<KvPlace> {
        let kv = self
            .kv
            .as_ref()
            .ok_or_else(|| anyhow!("KV cache not initialised: call init_kv_cache first"))?;
        Ok(KvPlace {
            base: kv.mem.ptr,
            layer_stride: 2 * kv.layer_bytes,
            v_offset: kv.layer_bytes,
            block_size: kv.block_size,
        })
    }

    /// Makes the context current on the calling thread (the serving thread may not be the
    /// one that loaded the model; raw driver calls need it).
    fn bind(&self) -> anyhow::Result<()> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e}"))
    }

    fn sync(&self) -> anyhow::Result<()> {
        self.dev
            .stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA step failed: {e}"))
    }

    fn bucket_for(&self, n: usize) -> Option<usize> {
        self.opts
            .graph_buckets
            .iter()
            .copied()
            .filter(|&b| b >= n && b <= self.opts.max_seqs)
            .min()
    }

    /// Runs a step: graph replay for pure decode batches, eager otherwise. Leaves the
    /// selected rows' logits and argmax on the device; returns the number of rows.
    fn run_step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<usize> {
        self.bind()?;
        let lay = self.layout()?;
        let place = self.kv_place()?;
        let decode = !seqs.is_empty()
            && seqs
                .iter()
                .all(|s| s.tokens.len() == 1 && s.sample.is_some());
        let bucket = if decode && self.profiler.is_none() {
            self.bucket_for(seqs.len())
        } else {
            None
        };
        if let Some(b) = bucket {
            self.pack_step(seqs, b, lay, place.block_size)?;
            self.upload_meta(b, lay)?;
            if !self.graphs.contains_key(&b) {
                self.capture(b, place, lay)?;
            }
            let g = &self.graphs[&b];
            g.0.launch()
                .map_err(|e| anyhow!("CUDA graph launch: {e}"))?;
            return Ok(seqs.len());
        }
        let (t, rows, tiles) = self.pack_step(seqs, 0, lay, place.block_size)?;
        self.upload_meta(seqs.len(), lay)?;
        self.forward(t, rows, tiles, place, lay, false)?;
        Ok(rows)
    }

    /// Captures the decode forward for bucket `b` (after one eager warm-up run, so that
    /// cuBLAS has picked its kernels) on the engine's own stream.
    fn capture(&mut self, b: usize, place: KvPlace, lay: MetaLayout) -> anyhow::Result<()> {
        self.forward(b, b, 0, place, lay, false)?;
        self.sync()?;
        self.dev
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| anyhow!("CUDA graph capture start: {e}"))?;
        let res = self.forward(b, b, 0, place, lay, false);
        let graph = self.dev.stream.end_capture(CUgraphInstantiate_flags(0));
        res.context("capturing the decode step")?;
        let graph = graph
            .map_err(|e| anyhow!("CUDA graph capture: {e}"))?
            .ok_or_else(|| anyhow!("CUDA graph capture produced an empty graph"))?;
        graph
            .upload()
            .map_err(|e| anyhow!("CUDA graph upload: {e}"))?;
        self.graphs.insert(b, SendGraph(graph));
        Ok(())
    }

    fn download<T: Copy + Default>(&self, ptr: DevPtr, n: usize) -> anyhow::Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        // SAFETY: the caller names a device range of at least n elements.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut v, ptr, self.dev.stream.cu_stream())
        }
        .map_err(|e| anyhow!("copying results from the GPU: {e}"))?;
        self.sync()?;
        Ok(v)
    }

    /// Pre-captures the decode graphs of every bucket (start-up, so the first requests do
    /// not pay for it). Needs the KV cache.
    pub fn capture_all(&mut self) -> anyhow::Result<()> {
        self.bind()?;
        let lay = self.layout()?;
        let place = self.kv_place()?;
        let buckets: Vec<usize> = self
            .opts
            .graph_buckets
            .iter()
            .copied()
            .filter(|&b| b <= self.opts.max_seqs)
            .collect();
        for b in buckets {
            if !self.graphs.contains_key(&b) {
                // Metadata of an all-padding batch: valid addresses, no KV writes.
                self.pack_step(&[], b, lay, place.block_size)?;
                self.upload_meta(b, lay)?;
                self.capture(b, place, lay)?;
            }
        }
        self.sync()
    }
}

impl Generator for CudaQwen3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn init_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        if block_size == 0 || num_blocks == 0 {
            bail!("KV cache needs at least one block of at least one token");
        }
        let s = &self.s;
        let layer_bytes = num_blocks * block_size * s.kv_heads * s.head_dim * 2;
        let mem = DevBuf::alloc(&self.dev, 2 * layer_bytes * s.layers).with_context(|| {
            format!("allocating the KV cache ({num_blocks} blocks of {block_size} tokens)")
        })?;
        self.graphs.clear();
        self.kv = Some(KvCache {
            mem,
            layer_bytes,
            block_size,
        });
        let max_blocks = self.opts.max_model_len.div_ceil(block_size);
        self.layout = Some(MetaLayout::new(
            self.opts.max_tokens,
            self.opts.max_seqs,
            max_blocks,
        ));
        Ok(())
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>> {
        let rows = self.run_step(seqs)?;
        let ids: Vec<i32> = self.download(self.scratch.sampled.ptr, rows)?;
        let mut out = Vec::with_capacity(rows);
        let mut r = 0;
        for sq in seqs {
            let Some(spec) = sq.sample else { continue };
            // The GPU's argmax stands unless it picked a masked id (EOS before min_tokens):
            // only then, or when sampling with a temperature, is the row read back.
            let greedy = spec.temperature <= 0.0 && !spec.masked.contains(&(ids[r] as u32));
            if greedy {
                out.push(ids[r] as u32);
            } else {
                let v = self.s.vocab;
                let row: Vec<f32> =
                    self.download(self.scratch.logits.ptr + (r * v * 4) as u64, v)?;
                out.push(sample_row(&row, &spec));
            }
            r += 1;
        }
        Ok(out)
    }

    fn step_logits(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let rows = self.run_step(seqs)?;
        let n = seqs.iter().filter(|s| s.sample.is_some()).count();
        let v = self.s.vocab;
        let all: Vec<f32> = self.download(self.scratch.logits.ptr, rows * v)?;
        Ok(all.chunks(v).take(n).map(<[f32]>::to_vec).collect())
    }
}

impl Embedder for CudaQwen3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Last-token pooling after the final norm, L2-normalised (Qwen3-Embedding). Inputs
    /// are run in chunks that fit the step limits; K/V live in a one-layer scratch reused
    /// by every layer, since nothing is decoded afterwards.
    fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.bind()?;
        let bs = EMBED_BLOCK;
        let max_blocks = self.opts.max_model_len.div_ceil(bs);
        let lay = MetaLayout::new(self.opts.max_tokens, self.opts.max_seqs, max_blocks);
        let slots_needed = self.opts.max_tokens + self.opts.max_seqs * bs;
        let layer_bytes = slots_needed * self.s.kv_heads * self.s.head_dim * 2;
        // K/V scratch only for the paged kernel: the flash kernel reads them from qkv.
        if self.embed_kv.is_none() && !self.embed_flash {
            self.embed_kv = Some(DevBuf::alloc(&self.dev, 2 * layer_bytes)?);
        }
        let place = KvPlace {
            base: self.embed_kv.as_ref().map(|b| b.ptr).unwrap_or(0),
            layer_stride: 0,
            v_offset: layer_bytes,
            block_size: bs,
        };
        let mut out = Vec::with_capacity(inputs.len());
        let mut i = 0;
        while i < inputs.len() {
            // Greedy chunk by tokens and sequences.
            let mut j = i;
            let mut toks = 0;
            while j < inputs.len()
                && j - i < self.opts.max_seqs
                && toks + inputs[j].len() <= self.opts.max_tokens
            {
                if inputs[j].is_empty() {
                    bail!("input {j} is empty");
                }
                if inputs[j].len() > self.opts.max_model_len {
                    bail!(
                        "input {j} has {} tokens, over the limit {}",
                        inputs[j].len(),
                        self.opts.max_model_len
                    );
                }
                toks += inputs[j].len();
                j += 1;
            }
            if j == i {
                bail!(
                    "input {i} has {} tokens, over the step limit {}",
                    inputs[i].len(),
                    self.opts.max_tokens
                );
            }
            // Each sequence gets its own run of blocks in the scratch.
            let mut tables: Vec<Vec<u32>> = Vec::with_capacity(j - i);
            let mut next_block = 0u32;
            for inp in &inputs[i..j] {
                let nb = inp.len().div_ceil(bs) as u32;
                tables.push((next_block..next_block + nb).collect());
                next_block += nb;
            }
            let seqs: Vec<SeqStep<'_>> = inputs[i..j]
                .iter()
                .zip(&tables)
                .map(|(inp, tb)| SeqStep {
                    tokens: inp,
                    start_pos: 0,
                    block_table: tb,
                    sample: Some(crate::runner::SampleSpec {
                        temperature: 0.0,
                        top_p: 1.0,
                        top_k: 0,
                        uniform: 0.0,
                        masked: &[],
                    }),
                })
                .collect();
            let (t, rows, tiles) = self.pack_step(&seqs, 0, lay, bs)?;
            self.upload_meta(seqs.len(), lay)?;
            let lens: Vec<usize> = inputs[i..j].iter().map(|x| x.len()).collect();
            self.prepare_flash(&lens)?;
            self.forward(t, rows, tiles, place, lay, true)?;
            let pooled: Vec<f32> = self.download(self.scratch.pooled.ptr, rows * self.s.hidden)?;
            if let Some(p) = self.profiler.as_mut() {
                p.collect();
            }
            for row in pooled.chunks(self.s.hidden) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                out.push(row.iter().map(|x| x / norm).collect());
            }
            i = j;
        }
        Ok(out)
    }
}

impl CudaQwen3 {
    /// Uploads the flash-attention query tiles of a chunk of fresh sequences with these
    /// lengths, packed back to back in the step's token rows.
    fn prepare_flash(&mut self, lens: &[usize]) -> anyhow::Result<()> {
        if !self.embed_flash {
            return Ok(());
        }
        let mut tiles: Vec<i32> = Vec::new();
        let mut start = 0usize;
        for &len in lens {
            for q0 in (0..len).step_by(FLASH_QUERY_TILE) {
                tiles.extend([start as i32, q0 as i32, len as i32]);
            }
            start += len;
        }
        let count = tiles.len() / 3;
        if self
            .flash
            .as_ref()
            .is_none_or(|f| f.buf.bytes < tiles.len() * 4)
        {
            let most = self.opts.max_tokens.div_ceil(FLASH_QUERY_TILE) + self.opts.max_seqs;
            let bytes = (3 * most * 4).max(tiles.len() * 4);
            self.flash = Some(FlashTiles {
                buf: DevBuf::alloc(&self.dev, bytes)?,
                count: 0,
            });
        }
        let ft = self
            .flash
            .as_mut()
            .ok_or_else(|| anyhow!("flash attention tiles"))?;
        ft.count = count;
        // SAFETY: the buffer holds at least tiles.len() i32.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                ft.buf.ptr,
                &tiles,
                self.dev.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("uploading attention tiles: {e}"))?;
        Ok(())
    }

    /// Chooses the embedding attention kernel: the tensor-core flash kernel (default where
    /// the head size allows it) or the paged prefill kernel (the reference for tests).
    pub fn set_embed_flash(&mut self, on: bool) {
        self.embed_flash = on && self.k.has_flash_attention();
    }

    /// Folds profiled op times of finished steps into the report (after a step returned).
    pub fn collect_profile(&mut self) {
        if let Some(p) = self.profiler.as_mut() {
            p.collect();
        }
    }
}
