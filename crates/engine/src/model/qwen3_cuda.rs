//! Qwen3 on the GPU: the CUDA model beside the portable one (`qwen3.rs`), as
//! text-embeddings-inference keeps `flash_qwen3.rs` beside `qwen3.rs`. Same config
//! ([`ModelConfig`]), same weight reader ([`WeightSource`], same parameter names), same step
//! builder ([`StepBuilder`]) and same sampling rule ([`sample_row`]) as the CPU model; what
//! is its own is the device layout and the forward pass:
//! - weights in bf16 with q/k/v fused into one `[(nq + 2 nkv) * D, H]` matrix and gate/up
//!   into one `[2 I, H]` matrix, so a layer runs 4 GEMMs (cuBLAS);
//! - one step = one upload of the packed step metadata (`backend::cuda::step`), then only
//!   kernel launches and GEMMs on one stream, then one download of the sampled ids. No
//!   host work per layer; decode steps (every sequence one token) are captured as a CUDA
//!   graph per batch-size bucket and replayed (`backend::cuda::graphs`).
//!
//! Per layer: add+RMSNorm -> qkv GEMM -> q/k norm + RoPE + KV write -> paged attention ->
//! o GEMM -> add+RMSNorm -> gate_up GEMM -> SiLU*up -> down GEMM. The residual stream is
//! fp32; everything else bf16 with fp32 accumulation. Greedy rows are picked on the GPU;
//! rows the sampling rule must see (a temperature, a masked argmax) are read back.
//!
//! The CPU model is the reference: `tests/cuda_engine.rs` (feature `gpu-tests`) compares
//! both with transformers' outputs for the tiny Qwen3 fixture.

use anyhow::{anyhow, bail};
use half::bf16;

use crate::backend::cuda::buffer::{self, DevBuf};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::gemm::{self, OutType};
use crate::backend::cuda::graphs::{self, DecodeGraphs};
use crate::backend::cuda::kernels::{DevPtr, Kernels, RopeTable, FLASH_QUERY_TILE};
use crate::backend::cuda::kv_cache::{KvCache, KvPlace};
use crate::backend::cuda::profile::{Launcher, Profiler};
use crate::backend::cuda::step::{CudaOptions, PackedStep, StepBuffer, StepLayout};
use crate::backend::sampling::sample_row;
use crate::model::config::{Arch, ModelConfig};
use crate::model::qwen3::param_names;
use crate::model::StepBuilder;
use crate::runner::{Embedder, Generator, ModelInfo, SampleSpec, SeqStep, Task};
use crate::weights::{SafetensorsFiles, WeightSource};

/// Tokens per block of the embedding path's K/V scratch (paged reference kernel).
const EMBED_BLOCK: usize = 16;
const BLAS_WORKSPACE: usize = 32 << 20;
/// Bytes per bf16 element.
const BF16: usize = 2;

const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.0,
    masked: &[],
};

/// The config's numbers in the form the kernels take.
#[derive(Debug, Clone, Copy)]
struct Dims {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    rope_theta: f32,
    max_positions: usize,
}

impl Dims {
    fn of(c: &ModelConfig) -> Self {
        Self {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            max_positions: c.max_position_embeddings,
        }
    }

    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of the fused q/k/v projection output.
    fn qkv_width(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

/// One decoder layer, in the fused layout.
struct LayerWeights {
    input_norm: DevBuf,
    qkv: DevBuf,
    q_norm: DevBuf,
    k_norm: DevBuf,
    o_proj: DevBuf,
    post_norm: DevBuf,
    gate_up: DevBuf,
    down: DevBuf,
}

/// The whole model's weights on the device.
struct Weights {
    embed: DevBuf,
    layers: Vec<LayerWeights>,
    norm: DevBuf,
    /// `None` when tied to `embed`, or not loaded (embedders).
    lm_head: Option<DevBuf>,
}

impl Weights {
    /// Loads from `src`; `with_lm_head` is false for embedders.
    fn load(
        dev: &CudaDevice,
        k: &Kernels,
        d: &Dims,
        tied: bool,
        src: &WeightSource,
        with_lm_head: bool,
    ) -> anyhow::Result<Self> {
        let lm_head = with_lm_head && !tied;
        match src {
            WeightSource::Dummy { seed } => Self::dummy(dev, k, d, *seed, lm_head),
            WeightSource::Safetensors(st) => Self::from_safetensors(dev, d, st, lm_head),
        }
    }

    /// The `lm_head` matrix address (the embedding when tied).
    fn lm_head_ptr(&self) -> DevPtr {
        self.lm_head.as_ref().unwrap_or(&self.embed).ptr
    }

    /// Device bytes held.
    fn bytes(&self) -> usize {
        let layer = |l: &LayerWeights| {
            [
                &l.input_norm,
                &l.qkv,
                &l.q_norm,
                &l.k_norm,
                &l.o_proj,
                &l.post_norm,
                &l.gate_up,
                &l.down,
            ]
            .iter()
            .map(|b| b.bytes)
            .sum::<usize>()
        };
        self.embed.bytes
            + self.layers.iter().map(layer).sum::<usize>()
            + self.norm.bytes
            + self.lm_head.as_ref().map_or(0, |b| b.bytes)
    }

    /// Seeded random weights (`--load-format dummy`), filled by a GPU kernel at memory
    /// speed: linear layers uniform with std 0.02 (HF's initializer range), norms at
    /// 1 ± 0.05. The same seed gives the same weights (not the CPU backend's values).
    fn dummy(
        dev: &CudaDevice,
        k: &Kernels,
        d: &Dims,
        seed: u64,
        lm_head: bool,
    ) -> anyhow::Result<Self> {
        let mut n = 0u64;
        let mut next_seed = || {
            n += 1;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
                .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        let a = 0.02f32 * 3f32.sqrt();
        let mut fill = |elems: usize, amp: f32, offset: f32| -> anyhow::Result<DevBuf> {
            let b = DevBuf::alloc(dev, elems * BF16)?;
            k.fill_uniform(b.ptr, elems, next_seed(), amp, offset)?;
            Ok(b)
        };
        let (h, hd) = (d.hidden, d.head_dim);
        let embed = fill(d.vocab * h, a, 0.0)?;
        let mut layers = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            layers.push(LayerWeights {
                input_norm: fill(h, 0.05, 1.0)?,
                qkv: fill(d.qkv_width() * h, a, 0.0)?,
                q_norm: fill(hd, 0.05, 1.0)?,
                k_norm: fill(hd, 0.05, 1.0)?,
                o_proj: fill(h * d.q_width(), a, 0.0)?,
                post_norm: fill(h, 0.05, 1.0)?,
                gate_up: fill(2 * d.inter * h, a, 0.0)?,
                down: fill(h * d.inter, a, 0.0)?,
            });
        }
        let norm = fill(h, 0.05, 1.0)?;
        let lm_head = if lm_head {
            Some(fill(d.vocab * h, a, 0.0)?)
        } else {
            None
        };
        dev.stream
            .synchronize()
            .map_err(|e| anyhow!("filling dummy weights: {e}"))?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// A Hugging Face checkpoint through the shared reader (names with or without the
    /// `model.` prefix, shapes checked against the config), converted to bf16 on the host
    /// one tensor at a time; q/k/v and gate/up concatenated row-wise before upload.
    fn from_safetensors(
        dev: &CudaDevice,
        d: &Dims,
        st: &SafetensorsFiles,
        lm_head: bool,
    ) -> anyhow::Result<Self> {
        let get = |name: &str, rows: usize, cols: usize| -> anyhow::Result<Vec<bf16>> {
            Ok(st.tensor(&param_names(name), rows, cols)?.to_bf16())
        };
        let up = |data: &[bf16]| DevBuf::upload(dev, data);
        let (h, i, hd) = (d.hidden, d.inter, d.head_dim);
        let (q, kv) = (d.q_width(), d.kv_width());
        let embed = up(&get("embed_tokens.weight", d.vocab, h)?)?;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = |s: &str| format!("layers.{l}.{s}.weight");
            let input_norm = up(&get(&p("input_layernorm"), 1, h)?)?;
            let mut qkv = get(&p("self_attn.q_proj"), q, h)?;
            qkv.extend(get(&p("self_attn.k_proj"), kv, h)?);
            qkv.extend(get(&p("self_attn.v_proj"), kv, h)?);
            let qkv = up(&qkv)?;
            let q_norm = up(&get(&p("self_attn.q_norm"), 1, hd)?)?;
            let k_norm = up(&get(&p("self_attn.k_norm"), 1, hd)?)?;
            let o_proj = up(&get(&p("self_attn.o_proj"), h, q)?)?;
            let post_norm = up(&get(&p("post_attention_layernorm"), 1, h)?)?;
            let mut gate_up = get(&p("mlp.gate_proj"), i, h)?;
            gate_up.extend(get(&p("mlp.up_proj"), i, h)?);
            let gate_up = up(&gate_up)?;
            let down = up(&get(&p("mlp.down_proj"), h, i)?)?;
            layers.push(LayerWeights {
                input_norm,
                qkv,
                q_norm,
                k_norm,
                o_proj,
                post_norm,
                gate_up,
                down,
            });
        }
        let norm = up(&get("norm.weight", 1, h)?)?;
        let lm_head = if lm_head {
            let w = st.tensor(&["lm_head.weight".to_string()], d.vocab, h)?;
            Some(up(&w.to_bf16())?)
        } else {
            None
        };
        dev.stream
            .synchronize()
            .map_err(|e| anyhow!("uploading weights: {e}"))?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

/// Activation scratch, sized for the largest step.
struct Activations {
    /// The residual stream, fp32.
    residual: DevBuf,
    normed: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    /// Output of the last projection (o or down), added to the residual by the next norm.
    delta: DevBuf,
    gate_up: DevBuf,
    act: DevBuf,
    /// Normalised output rows (the LM head's input).
    last: DevBuf,
    logits: DevBuf,
    /// Argmax id per output row.
    sampled: DevBuf,
    /// Normalised output rows in fp32 (embeddings).
    pooled: DevBuf,
}

impl Activations {
    fn alloc(dev: &CudaDevice, d: &Dims, tokens: usize, seqs: usize) -> anyhow::Result<Self> {
        let (t, n) = (tokens, seqs);
        Ok(Self {
            residual: DevBuf::alloc(dev, t * d.hidden * 4)?,
            normed: DevBuf::alloc(dev, t * d.hidden * BF16)?,
            qkv: DevBuf::alloc(dev, t * d.qkv_width() * BF16)?,
            attn: DevBuf::alloc(dev, t * d.q_width() * BF16)?,
            delta: DevBuf::alloc(dev, t * d.hidden * BF16)?,
            gate_up: DevBuf::alloc(dev, t * 2 * d.inter * BF16)?,
            act: DevBuf::alloc(dev, t * d.inter * BF16)?,
            last: DevBuf::alloc(dev, n * d.hidden * BF16)?,
            logits: DevBuf::alloc(dev, n * d.vocab * 4)?,
            sampled: DevBuf::alloc(dev, n * 4)?,
            pooled: DevBuf::alloc(dev, n * d.hidden * 4)?,
        })
    }

    fn bytes(&self) -> usize {
        [
            &self.residual,
            &self.normed,
            &self.qkv,
            &self.attn,
            &self.delta,
            &self.gate_up,
            &self.act,
            &self.last,
            &self.logits,
            &self.sampled,
            &self.pooled,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum()
    }
}

/// Query tiles of the embedding path's flash attention: three ints per tile (first token
/// row of the sequence, first query position, sequence length), uploaded per chunk.
struct FlashTiles {
    buf: DevBuf,
    count: usize,
}

/// One forward pass: the packed step, where K/V go, and how it ends.
#[derive(Debug, Clone, Copy)]
struct Pass {
    step: PackedStep,
    layout: StepLayout,
    kv: KvPlace,
    /// Embeddings (pooled fp32 rows) rather than logits and argmax.
    embed: bool,
}

/// Qwen3 (generate or embed) on one GPU.
pub struct CudaQwen3 {
    dev: CudaDevice,
    k: Kernels,
    d: Dims,
    w: Weights,
    info: ModelInfo,
    opts: CudaOptions,
    act: Activations,
    _blas_workspace: DevBuf,
    builder: StepBuilder,
    step: StepBuffer,
    /// The generator's KV cache and its step layout (`init_kv_cache`).
    kv: Option<(KvCache, StepLayout)>,
    /// The embedding path's one-layer K/V scratch (paged reference kernel only).
    embed_kv: Option<DevBuf>,
    flash: Option<FlashTiles>,
    /// Use the tensor-core flash kernel for embeddings (else the paged prefill kernel).
    embed_flash: bool,
    rope: RopeTable,
    _rope_buf: DevBuf,
    graphs: DecodeGraphs,
    profiler: Option<Profiler>,
}

impl CudaQwen3 {
    /// Opens GPU `ordinal`, compiles the kernels, loads or fills the weights (no
    /// `lm_head` for an embedder) and allocates the scratch buffers. `info.task` picks
    /// generate or embed; the KV cache comes later (`init_kv_cache`).
    pub fn new(
        ordinal: usize,
        config: &ModelConfig,
        info: ModelInfo,
        weights: &WeightSource,
        opts: CudaOptions,
    ) -> anyhow::Result<Self> {
        if config.arch != Arch::Qwen3 {
            bail!(
                "--device cuda: only Qwen3 models run on the CUDA backend so far ({} does not); use --device cpu",
                config.arch.name()
            );
        }
        let dev = CudaDevice::open(ordinal)?;
        let d = Dims::of(config);
        if d.kv_heads == 0 || !d.heads.is_multiple_of(d.kv_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                d.heads,
                d.kv_heads
            );
        }
        let k = Kernels::compile(&dev, d.head_dim, d.heads / d.kv_heads)?;
        let generate = info.task == Task::Generate;
        let w = Weights::load(&dev, &k, &d, config.tie_word_embeddings, weights, generate)?;
        let step = StepBuffer::alloc(&dev, &opts)?;
        let act = Activations::alloc(&dev, &d, opts.max_tokens, opts.max_seqs)?;
        let blas_workspace = DevBuf::alloc(&dev, BLAS_WORKSPACE)?;
        gemm::set_workspace(&dev.blas, blas_workspace.ptr, BLAS_WORKSPACE)?;
        // SAFETY: the range is the qkv buffer just allocated.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                act.qkv.ptr,
                0,
                act.qkv.bytes,
                dev.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("clearing scratch: {e}"))?;
        let rope_positions = opts.max_model_len.min(d.max_positions.max(1));
        let rope_buf = DevBuf::alloc(&dev, rope_positions * d.head_dim / 2 * 8)?;
        k.rope_table(rope_buf.ptr, rope_positions, d.rope_theta)?;
        let rope = RopeTable {
            ptr: rope_buf.ptr,
            positions: rope_positions,
        };
        let embed_flash = k.has_flash_attention();
        let graphs = DecodeGraphs::new(&opts.graph_buckets, opts.max_seqs);
        Ok(Self {
            dev,
            k,
            d,
            w,
            info,
            opts,
            act,
            _blas_workspace: blas_workspace,
            builder: StepBuilder::default(),
            step,
            kv: None,
            embed_kv: None,
            flash: None,
            embed_flash,
            rope,
            _rope_buf: rope_buf,
            graphs,
            profiler: None,
        })
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
        let held = self.bytes_held();
        // Graph execs, cuBLAS kernels and module code: a fixed reserve.
        let reserve = 512usize << 20;
        let budget = ((total as f64 * fraction) as usize).saturating_sub(held + reserve);
        let avail = budget.min(free.saturating_sub(reserve));
        let per_block = block_size * self.kv_bytes_per_token();
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

    /// Bytes of bf16 K and V for one token over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.d.layers * self.d.kv_width() * BF16
    }

    /// Weights, step metadata, activations and the cuBLAS workspace.
    fn bytes_held(&self) -> usize {
        self.w.bytes() + self.step.bytes() + self.act.bytes() + BLAS_WORKSPACE
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

    /// Folds profiled op times of finished steps into the report (after a step returned).
    pub fn collect_profile(&mut self) {
        if let Some(p) = self.profiler.as_mut() {
            p.collect();
        }
    }

    /// Chooses the embedding attention kernel: the tensor-core flash kernel (default where
    /// the head size allows it) or the paged prefill kernel (the reference for tests).
    pub fn set_embed_flash(&mut self, on: bool) {
        self.embed_flash = on && self.k.has_flash_attention();
    }

    /// Pre-captures the decode graphs of every bucket (start-up, so the first requests do
    /// not pay for it). Needs the KV cache.
    pub fn capture_all(&mut self) -> anyhow::Result<()> {
        self.bind()?;
        let (place, lay, num_blocks) = self.kv_cache()?;
        for b in self.graphs.buckets().to_vec() {
            if !self.graphs.has(b) {
                // Metadata of an all-padding batch: valid addresses, no KV writes.
                let meta =
                    self.builder
                        .paged(&[], &[], place.block_size, num_blocks, self.d.vocab)?;
                self.step.pack(&meta, b, lay, &self.opts)?;
                self.step.upload(&self.dev, b, lay)?;
                self.capture(b, place, lay)?;
            }
        }
        buffer::synchronize(&self.dev)
    }

    /// Where the KV cache is, the generator's step layout and the number of blocks.
    fn kv_cache(&self) -> anyhow::Result<(KvPlace, StepLayout, usize)> {
        let (kv, lay) = self
            .kv
            .as_ref()
            .ok_or_else(|| anyhow!("KV cache not initialised: call init_kv_cache first"))?;
        Ok((kv.place(), *lay, kv.num_blocks()))
    }

    /// Makes the context current on the calling thread (the serving thread may not be the
    /// one that loaded the model; raw driver calls need it).
    fn bind(&self) -> anyhow::Result<()> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e}"))
    }

    /// Runs a step: graph replay for pure decode batches, eager otherwise. Leaves the
    /// selected rows' logits and argmax on the device; returns the number of rows.
    fn run_step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<usize> {
        self.bind()?;
        let (place, lay, num_blocks) = self.kv_cache()?;
        let decode = !seqs.is_empty()
            && seqs
                .iter()
                .all(|s| s.tokens.len() == 1 && s.sample.is_some());
        let bucket = if decode && self.profiler.is_none() {
            self.graphs.bucket_for(seqs.len())
        } else {
            None
        };
        let meta = self
            .builder
            .paged(seqs, &[], place.block_size, num_blocks, self.d.vocab)?;
        if let Some(b) = bucket {
            self.step.pack(&meta, b, lay, &self.opts)?;
            self.step.upload(&self.dev, b, lay)?;
            if !self.graphs.has(b) {
                self.capture(b, place, lay)?;
            }
            self.graphs.launch(b)?;
            return Ok(seqs.len());
        }
        let packed = self.step.pack(&meta, 0, lay, &self.opts)?;
        self.step.upload(&self.dev, seqs.len(), lay)?;
        self.forward(Pass {
            step: packed,
            layout: lay,
            kv: place,
            embed: false,
        })?;
        Ok(packed.rows)
    }

    /// Captures the decode forward for bucket `b` (after one eager warm-up run, so that
    /// cuBLAS has picked its kernels) on the engine's own stream.
    fn capture(&mut self, b: usize, kv: KvPlace, layout: StepLayout) -> anyhow::Result<()> {
        let pass = Pass {
            step: PackedStep {
                tokens: b,
                rows: b,
                tiles: 0,
            },
            layout,
            kv,
            embed: false,
        };
        self.forward(pass)?;
        buffer::synchronize(&self.dev)?;
        let stream = self.dev.stream.clone();
        let graph = graphs::capture(&stream, || self.forward(pass))?;
        self.graphs.insert(b, graph);
        Ok(())
    }

    /// Enqueues the forward pass over the step's tokens; finishes with its output rows
    /// either through lm_head + argmax (generate) or normalised in fp32 (embed).
    fn forward(&mut self, pass: Pass) -> anyhow::Result<()> {
        let mut prof = self.profiler.take();
        let r = self.enqueue_forward(pass, &mut prof);
        self.profiler = prof;
        r
    }

    fn enqueue_forward(&self, p: Pass, prof: &mut Option<Profiler>) -> anyhow::Result<()> {
        let mut ops = Launcher::new(&self.dev.stream, prof);
        self.embed_tokens(&mut ops, &p)?;
        for layer in 0..self.w.layers.len() {
            self.attention(&mut ops, &p, layer)?;
            self.mlp(&mut ops, &p, layer)?;
        }
        if p.step.rows == 0 {
            return Ok(());
        }
        self.final_norm(&mut ops, &p)?;
        if p.embed {
            self.pool(&mut ops, &p)
        } else {
            self.lm_head_argmax(&mut ops, &p)
        }
    }

    /// Gathers the token embeddings into the residual stream.
    fn embed_tokens(&self, ops: &mut Launcher<'_>, p: &Pass) -> anyhow::Result<()> {
        let (k, a) = (&self.k, &self.act);
        let ids = self.step.ptr(p.layout.ids);
        ops.op("embed", || {
            k.embed_gather(
                self.w.embed.ptr,
                ids,
                a.residual.ptr,
                p.step.tokens,
                self.d.hidden,
            )
        })
    }

    /// The attention half of `layer`: residual add (of the previous layer's MLP output) +
    /// input RMSNorm, the fused qkv GEMM, q/k norm + RoPE + KV write, attention (flash for
    /// embeddings, prefill tiles, or the decode kernel), the o GEMM into `delta`.
    fn attention(&self, ops: &mut Launcher<'_>, p: &Pass, layer: usize) -> anyhow::Result<()> {
        let (d, k, a, lw) = (&self.d, &self.k, &self.act, &self.w.layers[layer]);
        let blas = &self.dev.blas;
        let meta = |off: usize| self.step.ptr(off);
        let (lay, t, h) = (p.layout, p.step.tokens, d.hidden);
        // The embedding path attends with the flash kernel, which reads K/V from qkv.
        let flash = self.flash.as_ref().filter(|_| p.embed && self.embed_flash);
        let (kc, vc) = (p.kv.k(layer), p.kv.v(layer));
        let delta = if layer == 0 { 0 } else { a.delta.ptr };
        ops.op("rmsnorm+add", || {
            k.add_rmsnorm(
                a.residual.ptr,
                delta,
                lw.input_norm.ptr,
                a.normed.ptr,
                0,
                t,
                h,
                d.eps,
            )
        })?;
        ops.op("gemm qkv", || {
            gemm::linear(
                blas,
                a.normed.ptr,
                lw.qkv.ptr,
                a.qkv.ptr,
                t,
                d.qkv_width(),
                h,
                OutType::Bf16,
            )
        })?;
        ops.op("qk norm+rope+kv write", || {
            k.qk_norm_rope_kv(
                a.qkv.ptr,
                lw.q_norm.ptr,
                lw.k_norm.ptr,
                meta(lay.pos),
                meta(lay.slots),
                if flash.is_some() { 0 } else { kc },
                vc,
                &self.rope,
                t,
                d.heads,
                d.kv_heads,
                d.eps,
                d.rope_theta,
            )
        })?;
        if let Some(ft) = flash {
            ops.op("attention (flash, embed)", || {
                k.embed_flash_attention(
                    a.qkv.ptr, a.attn.ptr, ft.buf.ptr, ft.count, d.heads, d.kv_heads,
                )
            })?;
        } else if p.step.tiles > 0 {
            ops.op("attention (prefill)", || {
                k.prefill_attention(
                    a.qkv.ptr,
                    a.attn.ptr,
                    kc,
                    vc,
                    meta(lay.tables),
                    lay.max_blocks,
                    meta(lay.seq_of),
                    meta(lay.pos),
                    meta(lay.tile_start),
                    meta(lay.tile_len),
                    p.step.tiles,
                    p.kv.block_size,
                    d.kv_heads,
                )
            })?;
        } else {
            ops.op("attention (decode)", || {
                k.paged_attention(
                    a.qkv.ptr,
                    a.attn.ptr,
                    kc,
                    vc,
                    meta(lay.tables),
                    lay.max_blocks,
                    meta(lay.seq_of),
                    meta(lay.pos),
                    t,
                    p.kv.block_size,
                    d.kv_heads,
                )
            })?;
        }
        ops.op("gemm o", || {
            gemm::linear(
                blas,
                a.attn.ptr,
                lw.o_proj.ptr,
                a.delta.ptr,
                t,
                h,
                d.q_width(),
                OutType::Bf16,
            )
        })
    }

    /// The MLP half of `layer`: residual add (of the attention output) + post-attention
    /// RMSNorm, the fused gate/up GEMM, SiLU(gate) * up, the down GEMM into `delta`.
    fn mlp(&self, ops: &mut Launcher<'_>, p: &Pass, layer: usize) -> anyhow::Result<()> {
        let (d, k, a, lw) = (&self.d, &self.k, &self.act, &self.w.layers[layer]);
        let blas = &self.dev.blas;
        let (t, h) = (p.step.tokens, d.hidden);
        ops.op("rmsnorm+add", || {
            k.add_rmsnorm(
                a.residual.ptr,
                a.delta.ptr,
                lw.post_norm.ptr,
                a.normed.ptr,
                0,
                t,
                h,
                d.eps,
            )
        })?;
        ops.op("gemm gate_up", || {
            gemm::linear(
                blas,
                a.normed.ptr,
                lw.gate_up.ptr,
                a.gate_up.ptr,
                t,
                2 * d.inter,
                h,
                OutType::Bf16,
            )
        })?;
        ops.op("silu*up", || {
            k.silu_mul(a.gate_up.ptr, a.act.ptr, t, d.inter)
        })?;
        ops.op("gemm down", || {
            gemm::linear(
                blas,
                a.act.ptr,
                lw.down.ptr,
                a.delta.ptr,
                t,
                h,
                d.inter,
                OutType::Bf16,
            )
        })
    }

    /// Adds the last layer's MLP output to the residual for every token (cheap; its
    /// normalised output is not used): the output rows are normalised next.
    fn final_norm(&self, ops: &mut Launcher<'_>, p: &Pass) -> anyhow::Result<()> {
        let (d, k, a) = (&self.d, &self.k, &self.act);
        ops.op("rmsnorm+add", || {
            k.add_rmsnorm(
                a.residual.ptr,
                a.delta.ptr,
                self.w.norm.ptr,
                a.normed.ptr,
                0,
                p.step.tokens,
                d.hidden,
                d.eps,
            )
        })
    }

    /// Embeddings: the final RMSNorm of each output row, in fp32, into `pooled`.
    fn pool(&self, ops: &mut Launcher<'_>, p: &Pass) -> anyhow::Result<()> {
        let (d, k, a) = (&self.d, &self.k, &self.act);
        let rows = self.step.ptr(p.layout.rows);
        ops.op("pool", || {
            k.rmsnorm_rows_f32(
                a.residual.ptr,
                self.w.norm.ptr,
                a.pooled.ptr,
                rows,
                p.step.rows,
                d.hidden,
                d.eps,
            )
        })
    }

    /// Generation: the final RMSNorm of each output row, the LM head (fp32 logits) and
    /// the argmax of each row.
    fn lm_head_argmax(&self, ops: &mut Launcher<'_>, p: &Pass) -> anyhow::Result<()> {
        let (d, k, a) = (&self.d, &self.k, &self.act);
        let blas = &self.dev.blas;
        let (rows, n) = (self.step.ptr(p.layout.rows), p.step.rows);
        ops.op("rmsnorm rows", || {
            k.add_rmsnorm(
                a.residual.ptr,
                0,
                self.w.norm.ptr,
                a.last.ptr,
                rows,
                n,
                d.hidden,
                d.eps,
            )
        })?;
        ops.op("gemm lm_head", || {
            gemm::linear(
                blas,
                a.last.ptr,
                self.w.lm_head_ptr(),
                a.logits.ptr,
                n,
                d.vocab,
                d.hidden,
                OutType::F32,
            )
        })?;
        ops.op("argmax", || {
            k.argmax_rows(a.logits.ptr, a.sampled.ptr, n, d.vocab)
        })
    }

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
}

impl Generator for CudaQwen3 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn init_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        if block_size == 0 || num_blocks == 0 {
            bail!("KV cache needs at least one block of at least one token");
        }
        let d = self.d;
        let kv = KvCache::alloc(&self.dev, d.layers, d.kv_width(), num_blocks, block_size)?;
        self.graphs.clear();
        let max_blocks = self.opts.max_model_len.div_ceil(block_size);
        let layout = StepLayout::new(self.opts.max_tokens, self.opts.max_seqs, max_blocks);
        self.kv = Some((kv, layout));
        Ok(())
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>> {
        if seqs.is_empty() {
            self.kv_cache()?;
            return Ok(Vec::new());
        }
        let rows = self.run_step(seqs)?;
        let ids: Vec<i32> = buffer::download(&self.dev, self.act.sampled.ptr, rows)?;
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
                let v = self.d.vocab;
                let row: Vec<f32> =
                    buffer::download(&self.dev, self.act.logits.ptr + (r * v * 4) as u64, v)?;
                out.push(sample_row(&row, &spec)?);
            }
            r += 1;
        }
        Ok(out)
    }

    fn step_logits(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            self.kv_cache()?;
            return Ok(Vec::new());
        }
        let rows = self.run_step(seqs)?;
        let n = seqs.iter().filter(|s| s.sample.is_some()).count();
        let v = self.d.vocab;
        let all: Vec<f32> = buffer::download(&self.dev, self.act.logits.ptr, rows * v)?;
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
        let lay = StepLayout::new(self.opts.max_tokens, self.opts.max_seqs, max_blocks);
        let slots_needed = self.opts.max_tokens + self.opts.max_seqs * bs;
        let layer_bytes = slots_needed * self.d.kv_width() * BF16;
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
                    sample: Some(GREEDY),
                })
                .collect();
            let meta = self
                .builder
                .paged(&seqs, &[], bs, slots_needed / bs, self.d.vocab)?;
            let packed = self.step.pack(&meta, 0, lay, &self.opts)?;
            self.step.upload(&self.dev, seqs.len(), lay)?;
            let lens: Vec<usize> = inputs[i..j].iter().map(|x| x.len()).collect();
            self.prepare_flash(&lens)?;
            self.forward(Pass {
                step: packed,
                layout: lay,
                kv: place,
                embed: true,
            })?;
            let hidden = self.d.hidden;
            let pooled: Vec<f32> =
                buffer::download(&self.dev, self.act.pooled.ptr, packed.rows * hidden)?;
            self.collect_profile();
            for row in pooled.chunks(hidden) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                out.push(row.iter().map(|x| x / norm).collect());
            }
            i = j;
        }
        Ok(out)
    }
}
