//! Runs a CUDA model behind the `model_api` seam (`Generator` / `Embedder`): everything a
//! model on this device needs besides its own weights, activations and forward pass. It
//! opens the GPU, compiles the kernels for the model's attention shape, times the model's
//! GEMMs at each decode batch size and keeps the fastest algorithm (`gemm`), builds the
//! RoPE table,
//! packs each step's metadata once (`step`, which also cuts decode steps into the split
//! decode attention's work items), keeps the paged KV cache (`kv_cache`),
//! replays decode steps as CUDA graphs per batch-size bucket (`graphs`), times ops when
//! asked (`profile`), samples non-greedy rows by the shared rule (`backend::sampling`)
//! and runs embedding inputs in chunks that fit the step limits. A model
//! (`model::qwen3_cuda`, the decoders; `model::encoder_cuda`, the encoders) implements
//! [`CudaModel`]: a new architecture is one such file.

use anyhow::{anyhow, bail};

use super::buffer::{self, DevBuf};
use super::device::CudaDevice;
use super::gemm::{GemmSpec, Gemms, TuneRecord};
use super::graphs::{self, DecodeGraphs};
use super::kernels::{DecodeKernel, DecodePartials, DevPtr, Kernels, RopeTable, FLASH_QUERY_TILE};
use super::kv_cache::{KvCache, KvPlace};
use super::lanes::{Lane, Lanes};
use super::profile::{Launcher, Profiler};
use super::step::{CudaOptions, DecodeSplit, PackedStep, StepBuffer, StepLayout};
use crate::backend::sampling::sample_row;
use crate::model::config::{cos_sin, ModelConfig};
use crate::model::StepBuilder;
use crate::model_api::{Embedder, Generator, ModelInfo, SampleSpec, SeqStep, Task};

/// Tokens per block of the embedding path's K/V scratch (paged reference kernel).
const EMBED_BLOCK: usize = 16;
const BLAS_WORKSPACE: usize = 32 << 20;
/// Warps per multiprocessor that a decode step's work items aim at (the split decode
/// kernel runs one warp per work item and KV head; about 16 fit at once).
const DECODE_WARPS_PER_SM: usize = 32;
/// Fewest keys per decode work item by default (`COLOCATE_DECODE_MIN_CHUNK` overrides it,
/// for tests that want the merge path on short contexts).
const DECODE_MIN_CHUNK: usize = 64;
/// Prompt chunks of at least this many tokens attend with the tensor-core flash kernel
/// when `COLOCATE_PREFILL_FLASH_MIN` is unset, where the head size has it; shorter chunks
/// take the 8-query tiles of `prefill_attention`, which waste less of a 64-query tile.
/// On the H200 (2026-12-03) the flash kernel made Qwen3-8B's 4 x 2,048-token prefill 3.3x
/// and its 8,192-token one 7.3x faster than the tiles, and the GPU tests passed with it
/// (`docs/results/2026-12-03-h200-flash-parity/`). 0 turns it off; 1 puts every chunk on
/// it (the GPU tests' second run).
const PREFILL_FLASH_MIN: usize = 16;
/// Bytes per bf16 element.
const BF16: usize = 2;

const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.0,
    masked: &[],
};

/// The RoPE table the kernels read: `(cos, sin)` of `p * inv_freq[i]` for every position
/// `p` below `positions` and pair `i`, from the config's inverse frequencies (the one
/// computation, RoPE scaling included) by the angle rule the CPU backend's table uses
/// ([`cos_sin`]).
fn rope_table(inv_freq: &[f32], positions: usize) -> Vec<[f32; 2]> {
    use rayon::prelude::*;
    let half = inv_freq.len().max(1);
    let mut table = vec![[0f32; 2]; positions * half];
    table.par_chunks_mut(half).enumerate().for_each(|(p, row)| {
        for (cs, &f) in row.iter_mut().zip(inv_freq) {
            let (c, s) = cos_sin(p, f);
            *cs = [c, s];
        }
    });
    table
}

/// One forward pass: the packed step, where K/V go, and how it ends.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    pub step: PackedStep,
    pub layout: StepLayout,
    pub kv: KvPlace,
    /// Embeddings (pooled fp32 rows) rather than logits and argmax.
    pub embed: bool,
}

/// Query tiles of the embedding path's flash attention: three ints per tile (first token
/// row of the sequence, first query position, sequence length), uploaded per chunk.
pub struct FlashTiles {
    pub buf: DevBuf,
    pub count: usize,
}

/// What a forward pass may use besides the model's own buffers.
pub struct ForwardCtx<'a> {
    pub dev: &'a CudaDevice,
    pub kernels: &'a Kernels,
    /// The step's metadata on the device (`StepLayout` offsets via `pass.layout`).
    pub step: &'a StepBuffer,
    pub rope: &'a RopeTable,
    /// The flash kernel's query tiles when this pass (an embedding pass) attends with it.
    pub flash: Option<&'a FlashTiles>,
    /// The split decode attention's buffers and kernel; `None`: decode steps use the
    /// one-block-per-token `paged_attention` (shapes without the split kernel, or chosen).
    pub decode: Option<SplitDecodePass>,
    /// The GEMMs (`cublasGemmEx`, or the algorithm tuned for the shape).
    pub gemm: &'a Gemms,
}

/// How a pass runs the split decode attention: where its partial results go, and whether
/// through the shared-memory ring ([`DecodeKernel::Pipelined`]) or registers (`Split`).
#[derive(Debug, Clone, Copy)]
pub struct SplitDecodePass {
    pub parts: DecodePartials,
    pub pipelined: bool,
}

/// Where a model leaves a pass's results, one row per output row of the step.
#[derive(Debug, Clone, Copy)]
pub struct Outputs {
    /// fp32 logits, `[rows, vocab]` (generate).
    pub logits: DevPtr,
    /// i32 argmax of each logits row (generate).
    pub argmax: DevPtr,
    /// fp32 pooled vector of each output row (a sequence), before L2 normalisation
    /// (embed).
    pub pooled: DevPtr,
}

/// A model on the CUDA path: its weights and activations, and its forward pass.
pub trait CudaModel: Send {
    /// Enqueues the forward pass over `pass.step.tokens` token rows, ending with the
    /// output rows' logits and argmax (generate) or pooled rows (embed) at [`Outputs`].
    /// Enqueue only: the same calls are captured into decode graphs.
    fn enqueue_forward(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        pass: &Pass,
    ) -> anyhow::Result<()>;
    /// Device bytes of weights and activations.
    fn bytes_held(&self) -> usize;
    /// Names what a decode graph of `tokens` rows launches beyond its size, where that
    /// follows what earlier steps saw (a mixture of experts' tile, by how its routing
    /// spread): the executor keeps a graph per name. 0 for a model that always launches
    /// the same.
    fn graph_variant(&self, _tokens: usize) -> u64 {
        0
    }
    /// After a decode graph of `tokens` rows, `live` of them sequences and the rest
    /// padding, has been launched: reads back what [`Self::graph_variant`] follows
    /// (waiting for the step). Nothing by default.
    fn after_decode(
        &mut self,
        _dev: &CudaDevice,
        _tokens: usize,
        _live: usize,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    fn outputs(&self) -> Outputs;
    /// The GEMMs of a generate pass that the executor tunes at each decode batch size:
    /// shapes, the activation buffers they read and write, and their weights.
    fn gemm_specs(&self) -> Vec<GemmSpec>;
}

/// The config's numbers the executor itself needs.
#[derive(Debug, Clone, Copy)]
struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    /// K (or V) values per token per layer.
    kv_width: usize,
    /// Positions the model has (`max_position_embeddings`: a learned table's rows).
    max_positions: usize,
}

/// A CUDA model on one GPU, serving steps (generate) or embeddings (embed).
pub struct CudaExecutor<M> {
    dev: CudaDevice,
    kernels: Kernels,
    model: M,
    shape: Shape,
    info: ModelInfo,
    opts: CudaOptions,
    _blas_workspace: DevBuf,
    gemm: Gemms,
    builder: StepBuilder,
    step: StepBuffer,
    /// The generator's KV cache and its step layout (`init_kv_cache`).
    kv: Option<(KvCache, StepLayout)>,
    /// The embedding path's one-layer K/V scratch (paged reference kernel only).
    embed_kv: Option<DevBuf>,
    /// How decode steps are cut into work items, and the split kernel's partial results
    /// and counters (absent where the kernel does not exist for the attention shape).
    split: DecodeSplit,
    decode_parts: Option<(DevBuf, DecodePartials)>,
    /// The decode attention kernel of decode steps.
    decode_kernel: DecodeKernel,
    /// A prefill step's one-token sequences (decodes beside prompt chunks) attend with the
    /// split decode kernel when it is the decode kernel (`StepLayout::mixed_decode`); else
    /// with the 8-query tiles. On the H200 (2026-12-03, Qwen3-8B served with 2,048- and
    /// 8,192-token prompts) steps with prompts took 26 and 87 ms longer than their prompt
    /// tokens alone predicted: the tiles read each decode token's context with one warp.
    mixed_decode: bool,
    flash: Option<FlashTiles>,
    /// Use the tensor-core flash kernel for embeddings (else the paged prefill kernel).
    embed_flash: bool,
    /// A generator's prompt chunks of at least this many tokens use the flash kernel over
    /// the paged cache (0: none; `StepLayout::flash_min_chunk`).
    prefill_flash_min: usize,
    rope: RopeTable,
    /// The RoPE table and its inverse frequencies.
    _rope_bufs: [DevBuf; 2],
    graphs: DecodeGraphs,
    profiler: Option<Profiler>,
    /// An embedder's SM partitions (`--sm-partitions`): embedding passes run on the
    /// active one.
    lanes: Option<Lanes>,
}

impl<M: CudaModel> CudaExecutor<M> {
    /// Opens GPU `ordinal`, compiles the kernels for `config`'s attention shape, lets
    /// `load` put the model's weights and activations on the device, then allocates the
    /// step buffer and the cuBLAS workspace and builds the RoPE table. `info.task` picks
    /// generate or embed; a generator's GEMMs are tuned for its decode graph sizes
    /// ([`Self::tune_gemms`]); the KV cache comes later (`init_kv_cache`).
    pub fn open(
        ordinal: usize,
        config: &ModelConfig,
        info: ModelInfo,
        opts: CudaOptions,
        load: impl FnOnce(&CudaDevice, &Kernels, &CudaOptions) -> anyhow::Result<M>,
    ) -> anyhow::Result<Self> {
        let dev = CudaDevice::open_with(ordinal, opts.sm_partition)?;
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            );
        }
        let head_dim = config.head_dim;
        let kernels = Kernels::compile(&dev, head_dim, heads / kv_heads)?;
        let model = load(&dev, &kernels, &opts)?;
        let sms = dev.sm_count()?;
        let min_chunk = std::env::var("COLOCATE_DECODE_MIN_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DECODE_MIN_CHUNK);
        let split = DecodeSplit {
            items: (sms * DECODE_WARPS_PER_SM).div_ceil(kv_heads),
            min_chunk,
        };
        let decode_parts = if kernels.has_decode_attention() {
            // [items, heads, head_dim] fp32 outputs, [items, heads] (max, sum) pairs, then
            // one i32 counter per (token row, KV head), zeroed once here.
            let cap = split.items + opts.max_seqs;
            let o_bytes = cap * heads * head_dim * 4;
            let ml_bytes = cap * heads * 8;
            let counter_bytes = opts.max_seqs * kv_heads * 4;
            let buf = DevBuf::alloc(&dev, o_bytes + ml_bytes + counter_bytes)?;
            let counters = buf.ptr + (o_bytes + ml_bytes) as u64;
            // SAFETY: the range lies inside the buffer just allocated.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    counters,
                    0,
                    counter_bytes,
                    dev.stream.cu_stream(),
                )
            }
            .map_err(|e| anyhow!("clearing the decode counters: {e}"))?;
            let parts = DecodePartials {
                o: buf.ptr,
                ml: buf.ptr + o_bytes as u64,
                counters,
            };
            Some((buf, parts))
        } else {
            None
        };
        let step = StepBuffer::alloc(&dev, &opts, split)?;
        let blas_workspace = DevBuf::alloc(&dev, BLAS_WORKSPACE)?;
        let gemm = Gemms::new(&dev, blas_workspace.ptr, BLAS_WORKSPACE)?;
        let lanes = if opts.sm_partitions.is_empty() {
            None
        } else {
            Some(Lanes::open(
                ordinal,
                &dev,
                &opts.sm_partitions,
                head_dim,
                heads / kv_heads,
                BLAS_WORKSPACE,
            )?)
        };
        let rope_positions = opts
            .max_model_len
            .min(config.max_position_embeddings.max(1));
        let inv_freq = config.rope_inv_freq();
        let rope_buf = DevBuf::upload(&dev, &rope_table(&inv_freq, rope_positions))?;
        let inv_freq_buf = DevBuf::upload(&dev, &inv_freq)?;
        let rope = RopeTable {
            ptr: rope_buf.ptr,
            positions: rope_positions,
            inv_freq: inv_freq_buf.ptr,
        };
        let embed_flash = kernels.has_flash_attention();
        let prefill_flash_min = if embed_flash {
            std::env::var("COLOCATE_PREFILL_FLASH_MIN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(PREFILL_FLASH_MIN)
        } else {
            0
        };
        let graphs = DecodeGraphs::new(&opts.graph_buckets, opts.max_seqs);
        let generate = info.task == Task::Generate;
        let mut ex = Self {
            dev,
            kernels,
            model,
            shape: Shape {
                vocab: config.vocab_size,
                hidden: config.hidden_size,
                layers: config.num_hidden_layers,
                kv_width: kv_heads * head_dim,
                max_positions: config.max_position_embeddings,
            },
            info,
            opts,
            _blas_workspace: blas_workspace,
            gemm,
            builder: StepBuilder::default(),
            step,
            kv: None,
            embed_kv: None,
            split,
            decode_kernel: if decode_parts.is_some() {
                DecodeKernel::split_from_env().map_err(anyhow::Error::msg)?
            } else {
                DecodeKernel::Paged
            },
            decode_parts,
            mixed_decode: true,
            flash: None,
            embed_flash,
            prefill_flash_min,
            rope,
            _rope_bufs: [rope_buf, inv_freq_buf],
            graphs,
            profiler: None,
            lanes,
        };
        if generate {
            ex.tune_gemms()?;
        }
        Ok(ex)
    }

    /// Times the model's GEMMs at every decode graph size (`cublasGemmEx` and cuBLASLt's
    /// candidates, over the real weights) and keeps the fastest for each. A failure to
    /// tune leaves the shapes it had not reached on `cublasGemmEx`.
    pub fn tune_gemms(&mut self) -> anyhow::Result<()> {
        self.bind()?;
        let ms: Vec<usize> = self
            .graphs
            .buckets()
            .iter()
            .copied()
            .filter(|&b| b <= self.opts.max_tokens)
            .collect();
        let specs = self.model.gemm_specs();
        // Step-like inputs: seeded uniform values rather than whatever the buffers hold.
        for (i, s) in specs.iter().enumerate() {
            let rows = ms
                .iter()
                .copied()
                .filter(|&m| m <= s.max_m)
                .max()
                .unwrap_or(0);
            if rows > 0 {
                self.kernels
                    .fill_uniform(s.x, rows * s.k, 0x5eed + i as u64, 1.0, 0.0)?;
            }
        }
        if let Err(e) = self.gemm.tune(&self.dev, &specs, &ms) {
            tracing::warn!("GEMM tuning stopped, the rest stays on cublasGemmEx: {e:#}");
        }
        buffer::synchronize(&self.dev)?;
        if !self.gemm.records().is_empty() {
            let on_lt = self.gemm.records().iter().filter(|r| r.use_lt).count();
            tracing::info!(
                "GEMMs tuned in {:.2} s: {on_lt} of {} decode shapes on cuBLASLt",
                self.gemm.tune_secs(),
                self.gemm.records().len()
            );
        }
        Ok(())
    }

    /// Uses the tuned GEMM algorithms (`true`; only when tuning ran, `COLOCATE_GEMM_TUNE=1`)
    /// or `cublasGemmEx` everywhere (`false`, the default path, for comparisons). Drops
    /// captured graphs.
    pub fn set_gemm_tuned(&mut self, on: bool) {
        self.gemm.set_tuned(on);
        self.graphs.clear();
    }

    /// What GEMM tuning measured (one record per shape and decode batch size).
    pub fn gemm_report(&self) -> &[TuneRecord] {
        self.gemm.records()
    }

    /// Seconds spent tuning GEMMs.
    pub fn gemm_tune_secs(&self) -> f64 {
        self.gemm.tune_secs()
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
        2 * self.shape.layers * self.shape.kv_width * BF16
    }

    /// Device bytes held: weights, step metadata, activations, decode partials and the
    /// cuBLAS workspace.
    pub fn bytes_held(&self) -> usize {
        let parts = self.decode_parts.as_ref().map_or(0, |(b, _)| b.bytes);
        self.model.bytes_held() + self.step.bytes() + parts + BLAS_WORKSPACE
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

    /// Chooses the decode attention kernel: a split tensor-core kernel (the default
    /// where the attention shape allows it, `Split` unless `COLOCATE_DECODE_ATTENTION`
    /// says `pipelined`; shapes without it keep `Paged`) or `paged_attention`, one block
    /// per token and KV head (the reference the benchmark compares with). Drops captured
    /// graphs.
    pub fn set_decode_kernel(&mut self, kernel: DecodeKernel) {
        self.decode_kernel = if self.decode_parts.is_some() {
            kernel
        } else {
            DecodeKernel::Paged
        };
        self.relayout();
        self.graphs.clear();
    }

    /// Chooses how a prefill step's one-token sequences attend: with the split decode
    /// kernel (`on`, the default, where it is the decode kernel) or with the 8-query
    /// tiles (the reference for tests).
    pub fn set_mixed_decode(&mut self, on: bool) {
        self.mixed_decode = on;
        self.relayout();
    }

    /// The step layout's attention choices, from the executor's.
    fn relayout(&mut self) {
        let mixed = self.mixed_decode && self.decode_kernel.is_split();
        let min = self.prefill_flash_min;
        if let Some((_, lay)) = self.kv.as_mut() {
            *lay = lay.with_flash_prefill(min).with_mixed_decode(mixed);
        }
    }

    /// The model, to change how it runs; the caller drops captured graphs
    /// ([`Self::drop_graphs`]) when that changes what a step launches.
    pub(crate) fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// The model.
    pub(crate) fn model(&self) -> &M {
        &self.model
    }

    /// Forgets captured decode graphs (recaptured by [`Self::capture_all`] or on use).
    pub(crate) fn drop_graphs(&mut self) {
        self.graphs.clear();
    }

    /// The decode attention kernel of decode steps.
    pub fn decode_kernel(&self) -> DecodeKernel {
        self.decode_kernel
    }

    /// Fills the whole KV cache with seeded uniform values in [-a, a) (benchmarks that
    /// decode at long contexts without running their prefill first).
    pub fn fill_kv_cache_uniform(&mut self, seed: u64, a: f32) -> anyhow::Result<()> {
        self.bind()?;
        let (kv, _) = self
            .kv
            .as_ref()
            .ok_or_else(|| anyhow!("KV cache not initialised: call init_kv_cache first"))?;
        let (ptr, bytes) = kv.memory();
        self.kernels.fill_uniform(ptr, bytes / BF16, seed, a, 0.0)?;
        buffer::synchronize(&self.dev)
    }

    /// Chooses the embedding attention kernel: the tensor-core flash kernel (default where
    /// the head size allows it) or the paged prefill kernel (the reference for tests).
    pub fn set_embed_flash(&mut self, on: bool) {
        self.embed_flash = on && self.kernels.has_flash_attention();
    }

    /// Chooses a generator's prefill attention: prompt chunks of at least `min` tokens
    /// on the tensor-core flash kernel (where the head size has it), the rest on the
    /// 8-query tiles; `None` puts every chunk on the latter (the reference for tests).
    pub fn set_prefill_flash(&mut self, min: Option<usize>) {
        let min = min
            .filter(|_| self.kernels.has_flash_attention())
            .unwrap_or(0);
        self.prefill_flash_min = min;
        self.relayout();
    }

    /// Pre-captures the decode graphs of every bucket (start-up, so the first requests do
    /// not pay for it). Needs the KV cache.
    pub fn capture_all(&mut self) -> anyhow::Result<()> {
        self.bind()?;
        let (place, lay, num_blocks) = self.kv_cache()?;
        for b in self.graphs.buckets().to_vec() {
            let v = self.model.graph_variant(b);
            if !self.graphs.has(b, v) {
                // Metadata of an all-padding batch: valid addresses, no KV writes.
                let meta =
                    self.builder
                        .paged(&[], &[], place.block_size, num_blocks, self.shape.vocab)?;
                self.step.pack(&meta, b, lay, &self.opts)?;
                self.step.upload(&self.dev, b, lay)?;
                self.capture(b, v, place, lay)?;
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

    /// The SM partition embedding passes run on now (`None`: the engine's own device).
    fn embed_lane(&self) -> Option<&Lane> {
        self.lanes.as_ref().and_then(Lanes::active)
    }

    /// The device embedding passes run on: the active SM partition's, else the engine's.
    fn embed_dev(&self) -> &CudaDevice {
        self.embed_lane().map_or(&self.dev, |l| &l.dev)
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
            .paged(seqs, &[], place.block_size, num_blocks, self.shape.vocab)?;
        // As the CPU model: a position past the model's is an error, not a read past a
        // learned position table.
        if let Some(&p) = meta.positions.iter().max() {
            if p as usize >= self.shape.max_positions {
                bail!(
                    "position {p} exceeds max_position_embeddings {}",
                    self.shape.max_positions
                );
            }
        }
        if let Some(b) = bucket {
            self.step.pack(&meta, b, lay, &self.opts)?;
            self.step.upload(&self.dev, b, lay)?;
            let v = self.model.graph_variant(b);
            if !self.graphs.has(b, v) {
                self.capture(b, v, place, lay)?;
            }
            self.graphs.launch(b, v)?;
            self.model.after_decode(&self.dev, b, seqs.len())?;
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

    /// Captures the decode forward for bucket `b` as variant `v` (after one eager warm-up
    /// run, so that cuBLAS has picked its kernels) on the engine's own stream.
    fn capture(&mut self, b: usize, v: u64, kv: KvPlace, layout: StepLayout) -> anyhow::Result<()> {
        let pass = Pass {
            step: PackedStep {
                tokens: b,
                rows: b,
                tiles: 0,
                flash_tiles: 0,
                slots: b,
                items: 0,
            },
            layout,
            kv,
            embed: false,
        };
        self.forward(pass)?;
        buffer::synchronize(&self.dev)?;
        let stream = self.dev.stream.clone();
        let graph = graphs::capture(&stream, || self.forward(pass))?;
        self.graphs.insert(b, v, graph);
        Ok(())
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
        let ptr = ft.buf.ptr;
        // SAFETY: the buffer holds at least tiles.len() i32.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                ptr,
                &tiles,
                self.embed_dev().stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("uploading attention tiles: {e}"))?;
        Ok(())
    }

    /// Enqueues the model's forward pass, its ops timed when profiling is on; an
    /// embedding pass on the active SM partition when there is one.
    fn forward(&mut self, pass: Pass) -> anyhow::Result<()> {
        let mut prof = self.profiler.take();
        let flash = self
            .flash
            .as_ref()
            .filter(|_| pass.embed && self.embed_flash);
        let lane = self.embed_lane().filter(|_| pass.embed);
        let (dev, kernels, gemm) = match lane {
            Some(l) => (&l.dev, &l.kernels, &l.gemm),
            None => (&self.dev, &self.kernels, &self.gemm),
        };
        let cx = ForwardCtx {
            dev,
            kernels,
            step: &self.step,
            rope: &self.rope,
            flash,
            decode: self
                .decode_parts
                .as_ref()
                .filter(|_| self.decode_kernel.is_split())
                .map(|&(_, parts)| SplitDecodePass {
                    parts,
                    pipelined: self.decode_kernel == DecodeKernel::Pipelined,
                }),
            gemm,
        };
        let mut ops = Launcher::new(&dev.stream, &mut prof);
        let r = self.model.enqueue_forward(&cx, &mut ops, &pass);
        self.profiler = prof;
        r
    }
}

impl<M: CudaModel> Generator for CudaExecutor<M> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn init_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        if block_size == 0 || num_blocks == 0 {
            bail!("KV cache needs at least one block of at least one token");
        }
        let shape = self.shape;
        let kv = KvCache::alloc(
            &self.dev,
            shape.layers,
            shape.kv_width,
            num_blocks,
            block_size,
        )?;
        self.graphs.clear();
        let max_blocks = self.opts.max_model_len.div_ceil(block_size);
        let layout = StepLayout::new(
            self.opts.max_tokens,
            self.opts.max_seqs,
            max_blocks,
            self.split,
        );
        self.kv = Some((kv, layout));
        self.relayout();
        Ok(())
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>> {
        if seqs.is_empty() {
            self.kv_cache()?;
            return Ok(Vec::new());
        }
        let rows = self.run_step(seqs)?;
        let ids: Vec<i32> = buffer::download(&self.dev, self.model.outputs().argmax, rows)?;
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
                let v = self.shape.vocab;
                let row: Vec<f32> = buffer::download(
                    &self.dev,
                    self.model.outputs().logits + (r * v * 4) as u64,
                    v,
                )?;
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
        let v = self.shape.vocab;
        let all: Vec<f32> = buffer::download(&self.dev, self.model.outputs().logits, rows * v)?;
        Ok(all.chunks(v).take(n).map(<[f32]>::to_vec).collect())
    }
}

impl<M: CudaModel> Embedder for CudaExecutor<M> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's pooled rows (a decoder's last token after the final norm:
    /// Qwen3-Embedding; an encoder's mean over its tokens), L2-normalised here. Inputs are
    /// run in chunks that fit the step limits, each sequence's output row its last token's;
    /// K/V live in a one-layer scratch reused by every layer (the paged kernel only; the
    /// flash kernel reads them from the projection), since nothing is decoded afterwards.
    fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.bind()?;
        let bs = EMBED_BLOCK;
        let max_blocks = self.opts.max_model_len.div_ceil(bs);
        let lay = StepLayout::new(
            self.opts.max_tokens,
            self.opts.max_seqs,
            max_blocks,
            self.split,
        );
        let slots_needed = self.opts.max_tokens + self.opts.max_seqs * bs;
        let layer_bytes = slots_needed * self.shape.kv_width * BF16;
        // K/V scratch only for the paged kernel: the flash kernel reads them from qkv.
        if self.embed_kv.is_none() && !self.embed_flash {
            self.embed_kv = Some(DevBuf::alloc(&self.dev, 2 * layer_bytes)?);
        }
        if self.embed_flash && self.flash.is_none() {
            // The most tiles a chunk can have, allocated before a partition's context
            // becomes current (allocations are ordered on the engine's own stream).
            let most = self.opts.max_tokens.div_ceil(FLASH_QUERY_TILE) + self.opts.max_seqs;
            self.flash = Some(FlashTiles {
                buf: DevBuf::alloc(&self.dev, 3 * most * 4)?,
                count: 0,
            });
        }
        if self.embed_lane().is_some() {
            buffer::synchronize(&self.dev)?;
            self.embed_dev()
                .ctx
                .bind_to_thread()
                .map_err(|e| anyhow!("binding the SM partition's context: {e}"))?;
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
                let limit = self.opts.max_model_len.min(self.shape.max_positions);
                if inputs[j].len() > limit {
                    bail!(
                        "input {j} has {} tokens, over the limit {limit}",
                        inputs[j].len()
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
                .paged(&seqs, &[], bs, slots_needed / bs, self.shape.vocab)?;
            let packed = self.step.pack(&meta, 0, lay, &self.opts)?;
            self.step.upload(self.embed_dev(), seqs.len(), lay)?;
            let lens: Vec<usize> = inputs[i..j].iter().map(|x| x.len()).collect();
            self.prepare_flash(&lens)?;
            self.forward(Pass {
                step: packed,
                layout: lay,
                kv: place,
                embed: true,
            })?;
            let hidden = self.shape.hidden;
            let pooled: Vec<f32> = buffer::download(
                self.embed_dev(),
                self.model.outputs().pooled,
                packed.rows * hidden,
            )?;
            self.collect_profile();
            for row in pooled.chunks(hidden) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                out.push(row.iter().map(|x| x / norm).collect());
            }
            i = j;
        }
        Ok(out)
    }

    fn sm_partitions(&self) -> Option<crate::sm_share::SmPartitions> {
        self.lanes.as_ref().map(|l| l.partitions().clone())
    }

    fn set_sm_share(&mut self, percent: Option<u32>) -> anyhow::Result<u32> {
        match self.lanes.as_mut() {
            Some(l) => Ok(l.set(percent)),
            None => bail!("this engine has no SM partitions (start it with --sm-partitions)"),
        }
    }
}
