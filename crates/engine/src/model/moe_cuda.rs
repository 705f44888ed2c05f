//! Qwen3-MoE's sparse block on the GPU, beside the portable one (`model::moe`, the
//! numerics reference), as vLLM's fused MoE runs it: the router GEMM (cuBLAS, fp32
//! logits), the top-k softmax and the grouping of each token's choices by expert on the
//! device (`moe_kernels`), one grouped GEMM for every expert's gate/up and one for down
//! (the router weight applied in fp32), and the sum of each token's expert outputs. Nothing
//! goes to the host, so decode steps are captured into CUDA graphs as the dense model's.
//!
//! The experts of a block-FP8 checkpoint (Qwen3-30B-A3B-FP8) stay in FP8 as stored, one
//! byte per weight plus a scale per block, and the GEMMs convert them exactly to f16 as
//! they read them (W8A16, the activations in f16 rather than quantised to FP8): decode
//! reads each expert's weights once per step, so keeping half the bytes is what makes it
//! fast. The layer's other weights (attention, router, norms) are bf16, dequantised at
//! load when stored in FP8.

use std::collections::HashMap;

use anyhow::anyhow;

use crate::backend::cuda::buffer::{self, DevBuf};
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::executor::ForwardCtx;
use crate::backend::cuda::gemm::OutType;
use crate::backend::cuda::kernels::DevPtr;
use crate::backend::cuda::moe_kernels::{
    compiled_tiles, rows_seen, sorted_len, tile_weight, ExpertFormat, GroupedGemm, MoeKernels,
    MoeTile, Routing, TileLadder, MAX_EXPERTS,
};
use crate::backend::cuda::profile::Launcher;
use crate::model::config::ModelConfig;
use crate::model::qwen3::param_names;
use crate::model::qwen3_cuda::dummy_range;
use crate::weights::SafetensorsFiles;

const BF16: usize = 2;

/// The sparse block's numbers.
#[derive(Debug, Clone, Copy)]
struct MoeDims {
    experts: usize,
    top_k: usize,
    /// One expert's MLP width (`moe_intermediate_size`).
    inter: usize,
    hidden: usize,
    renormalise: bool,
}

/// One sparse layer's weights: the router `[E, H]` bf16, the experts' gate and up stacked
/// as `w13` `[E, 2I, H]` (gate rows first, as the dense path's gate_up) and down as `w2`
/// `[E, H, I]`, in bf16 or in FP8 with their block scales (`[E, 2I/br, H/bc]`,
/// `[E, H/br, I/bc]`).
pub(crate) struct SparseLayer {
    router: DevBuf,
    w13: DevBuf,
    w13_scales: Option<DevBuf>,
    w2: DevBuf,
    w2_scales: Option<DevBuf>,
}

impl SparseLayer {
    /// Device bytes held.
    pub(crate) fn bytes(&self) -> usize {
        [
            Some(&self.router),
            Some(&self.w13),
            self.w13_scales.as_ref(),
            Some(&self.w2),
            self.w2_scales.as_ref(),
        ]
        .iter()
        .flatten()
        .map(|b| b.bytes)
        .sum()
    }

    /// The router's weight (tuned as a GEMM of its own).
    pub(crate) fn router_ptr(&self) -> DevPtr {
        self.router.ptr
    }
}

/// The routing and expert activations of one step, sized for the largest.
struct Scratch {
    /// `[T, E]` fp32 router logits.
    logits: DevBuf,
    ids: DevBuf,
    weights: DevBuf,
    sorted: DevBuf,
    block_expert: DevBuf,
    post_pad: DevBuf,
    /// One u64: the experts' row counts squared, summed over a step's sparse layers.
    sq_sum: DevBuf,
    /// `[T * k, max(2I, H)]` bf16: gate/up output, then (once `act` has consumed it) the
    /// down output.
    inter: DevBuf,
    /// `[T * k, I]`: SiLU(gate) * up (f16 for FP8 experts, else bf16).
    act: DevBuf,
    /// `[T, H]` f16: the input in f16 for FP8 experts (unused otherwise).
    x16: DevBuf,
}

impl Scratch {
    fn bytes(&self) -> usize {
        [
            &self.logits,
            &self.ids,
            &self.weights,
            &self.sorted,
            &self.block_expert,
            &self.post_pad,
            &self.sq_sum,
            &self.inter,
            &self.act,
            &self.x16,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum()
    }

    fn routing(&self) -> Routing {
        Routing {
            ids: self.ids.ptr,
            weights: self.weights.ptr,
            sorted: self.sorted.ptr,
            block_expert: self.block_expert.ptr,
            post_pad: self.post_pad.ptr,
            sq_sum: self.sq_sum.ptr,
            slots: 0,
        }
    }
}

/// Which step a sparse block runs in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MoeStep {
    /// The layer (the first sparse one starts the step's sum of counts squared).
    pub layer: usize,
    /// Token rows.
    pub tokens: usize,
    /// A decode step (every sequence one token): its tile follows the routing that the
    /// last decode step of this size saw.
    pub decode: bool,
    /// The step's KV slot per token row, where a decode graph's padding rows hold -1:
    /// they route to no expert (`Routing::slots`). `None`: every row routes.
    pub slots: Option<DevPtr>,
}

/// A mixture-of-experts model's sparse blocks on the device: their kernels, the expert
/// storage and tiles, which layers are sparse, and the step scratch.
pub(crate) struct CudaMoe {
    d: MoeDims,
    format: ExpertFormat,
    /// The tiles a step picks from by its rows per expert.
    tiles: TileLadder,
    /// One tile for every step instead (`set_tile`: the benchmark's sweeps).
    forced: Option<MoeTile>,
    sparse: Vec<bool>,
    /// The first sparse layer (its `moe_align` starts the step's sum of counts squared).
    first_sparse: Option<usize>,
    /// Rows per expert a routed row saw ([`rows_seen`]) in the last decode step of each
    /// graph size: the next step of that size picks its tile by them, since a batch's
    /// routing changes slowly from one step to the next while the mean rows per expert
    /// misjudges skewed routing (one prompt repeated sends the whole batch to the same
    /// experts: on the H200, 17.40 ms a step at batch 512 in the 64-row tile against 19.17
    /// in the 32-row one that the mean picks; docs/bench/cuda-moe.md, session 18).
    seen: HashMap<usize, f64>,
    kernels: MoeKernels,
    scratch: Scratch,
}

impl CudaMoe {
    /// The sparse blocks of `config` (`None` for a dense model), with scratch for steps of
    /// up to `max_tokens` tokens. The experts are kept in FP8 when the checkpoint's
    /// `quantization_config` quantises them, else in bf16. Shapes the kernels cannot take
    /// are an error naming the reason.
    pub(crate) fn new(
        dev: &CudaDevice,
        config: &ModelConfig,
        max_tokens: usize,
    ) -> anyhow::Result<Option<Self>> {
        let Some(m) = &config.moe else {
            return Ok(None);
        };
        let d = MoeDims {
            experts: m.num_experts,
            top_k: m.num_experts_per_tok,
            inter: m.moe_intermediate_size,
            hidden: config.hidden_size,
            renormalise: m.norm_topk_prob,
        };
        if d.experts > MAX_EXPERTS || d.top_k == 0 || d.top_k > d.experts {
            anyhow::bail!(
                "--device cuda: top-{} of {} experts (the CUDA MoE kernels take up to {MAX_EXPERTS} experts)",
                d.top_k,
                d.experts
            );
        }
        let format = ExpertFormat::of(config);
        let tiles = format.tiles(d.hidden, d.inter)?;
        let kernels = MoeKernels::compile(dev)?;
        let (t, k, e) = (max_tokens.max(1), d.top_k, d.experts);
        let i32s = |n: usize| DevBuf::alloc(dev, n * 4);
        // The sorted index of the tallest tile any step may take, the block list of the
        // shortest.
        let fp8 = matches!(format, ExpertFormat::Fp8 { .. });
        let bms = || compiled_tiles(fp8).map(|t| t.bm);
        let (bm_max, bm_min) = (bms().max().unwrap_or(64), bms().min().unwrap_or(16));
        let scratch = Scratch {
            logits: i32s(t * e)?,
            ids: i32s(t * k)?,
            weights: i32s(t * k)?,
            sorted: i32s(sorted_len(t, k, e, bm_max))?,
            block_expert: i32s(sorted_len(t, k, e, bm_min) / bm_min)?,
            post_pad: i32s(1)?,
            sq_sum: DevBuf::alloc(dev, 8)?,
            inter: DevBuf::alloc(dev, t * k * (2 * d.inter).max(d.hidden) * BF16)?,
            act: DevBuf::alloc(dev, t * k * d.inter * BF16)?,
            x16: DevBuf::alloc(
                dev,
                match format {
                    ExpertFormat::Fp8 { .. } => t * d.hidden * BF16,
                    ExpertFormat::Bf16 => 0,
                },
            )?,
        };
        let sparse: Vec<bool> = (0..config.num_hidden_layers)
            .map(|l| config.is_sparse_layer(l))
            .collect();
        Ok(Some(Self {
            d,
            format,
            tiles,
            forced: None,
            first_sparse: sparse.iter().position(|&s| s),
            sparse,
            seen: HashMap::new(),
            kernels,
            scratch,
        }))
    }

    /// Runs every step's grouped GEMMs in `tile` (`None`: the tile the ladder picks). A
    /// tile must be compiled for this storage, of its depth, and inside one FP8 block.
    pub(crate) fn set_tile(&mut self, tile: Option<MoeTile>) -> anyhow::Result<()> {
        if let Some(t) = tile {
            let fp8 = matches!(self.format, ExpertFormat::Fp8 { .. });
            let fits = self.format.fits(t);
            if !compiled_tiles(fp8).any(|c| c == t) || t.bk != self.tiles.depth() || !fits {
                anyhow::bail!(
                    "MoE tile {t} does not fit these experts ({:?}, depth {}); compiled: {}",
                    self.format,
                    self.tiles.depth(),
                    compiled_tiles(fp8)
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        self.forced = tile;
        Ok(())
    }

    /// The tile of a step of `tokens` rows: the forced one, else, for a decode step, the
    /// ladder's pick by the rows per expert the last decode step of this size saw, else by
    /// the mean (prompt tokens spread over the experts whatever the batch's decode does).
    pub(crate) fn tile_for(&self, tokens: usize, decode: bool) -> MoeTile {
        let (k, e) = (self.d.top_k, self.d.experts);
        let seen = self.seen.get(&tokens).filter(|_| decode);
        self.forced.unwrap_or_else(|| match seen {
            Some(&rows) => self.tiles.pick_rows(rows),
            None => self.tiles.pick(tokens, k, e),
        })
    }

    /// Names the kernels a decode graph of `tokens` rows launches beyond its size (its
    /// tile's place in the ladder), so that a graph is kept per tile.
    pub(crate) fn graph_variant(&self, tokens: usize) -> u64 {
        let tile = self.tile_for(tokens, true);
        self.tiles.position(tile).map_or(u64::MAX, |p| p as u64)
    }

    /// After a decode step of `tokens` rows (`live` of them sequences, the rest padding,
    /// which routes nowhere) has been enqueued: waits for it and reads back the rows per
    /// expert its routing gave a row, for the next step of that size.
    pub(crate) fn observe(
        &mut self,
        dev: &CudaDevice,
        tokens: usize,
        live: usize,
    ) -> anyhow::Result<()> {
        let layers = self.sparse.iter().filter(|&&s| s).count();
        if layers == 0 || live == 0 {
            return Ok(());
        }
        let sq: Vec<u64> = buffer::download(dev, self.scratch.sq_sum.ptr, 1)?;
        let choices = live * self.d.top_k * layers;
        self.seen.insert(tokens, rows_seen(sq[0], choices));
        Ok(())
    }

    /// The rows per expert the last decode step of `tokens` rows saw, once one has run.
    pub(crate) fn rows_seen(&self, tokens: usize) -> Option<f64> {
        self.seen.get(&tokens).copied()
    }

    /// Whether `layer` has the sparse block (else the dense MLP).
    pub(crate) fn is_sparse(&self, layer: usize) -> bool {
        self.sparse.get(layer).copied().unwrap_or(false)
    }

    /// Device bytes of the step scratch.
    pub(crate) fn scratch_bytes(&self) -> usize {
        self.scratch.bytes()
    }

    /// Seeded random weights of one sparse layer (`--load-format dummy`), as the dense
    /// model's: `linear` fills a bf16 weight of that many elements as the dense model fills
    /// its linears (uniform in +-[`dummy_range`]); FP8 experts are e4m3 of a uniform with
    /// every block's scale set so that the weight has the same range.
    pub(crate) fn dummy_layer(
        &self,
        dev: &CudaDevice,
        linear: &dyn Fn(usize) -> anyhow::Result<DevBuf>,
        mut next_seed: impl FnMut() -> u64,
    ) -> anyhow::Result<SparseLayer> {
        let d = &self.d;
        let router = linear(d.experts * d.hidden)?;
        let mut experts = |rows: usize, cols: usize| -> anyhow::Result<(DevBuf, Option<DevBuf>)> {
            let elems = d.experts * rows * cols;
            match self.format {
                ExpertFormat::Bf16 => Ok((linear(elems)?, None)),
                ExpertFormat::Fp8 { block: [br, bc] } => {
                    let w = DevBuf::alloc(dev, elems)?;
                    self.kernels.fill_e4m3_uniform(w.ptr, elems, next_seed())?;
                    let n = d.experts * rows.div_ceil(br) * cols.div_ceil(bc);
                    let s = DevBuf::alloc(dev, n * 4)?;
                    self.kernels.fill_f32(s.ptr, n, dummy_range() / 448.0)?;
                    Ok((w, Some(s)))
                }
            }
        };
        let (w13, w13_scales) = experts(2 * d.inter, d.hidden)?;
        let (w2, w2_scales) = experts(d.hidden, d.inter)?;
        Ok(SparseLayer {
            router,
            w13,
            w13_scales,
            w2,
            w2_scales,
        })
    }

    /// Sparse layer `layer` of a Hugging Face checkpoint: the router in bf16, each expert's
    /// gate, up and down copied into the stacked device weights one expert at a time (the
    /// host holds one expert's weights at a time), in FP8 as stored or in bf16, in the
    /// grouped GEMM's tiled layout (`moe_kernels::tiled_offset`).
    pub(crate) fn layer_from_safetensors(
        &self,
        dev: &CudaDevice,
        st: &SafetensorsFiles,
        layer: usize,
    ) -> anyhow::Result<SparseLayer> {
        let d = &self.d;
        let (h, i, e_n) = (d.hidden, d.inter, d.experts);
        let p = format!("layers.{layer}.mlp");
        let router = DevBuf::upload(
            dev,
            &st.bf16(&param_names(&format!("{p}.gate.weight")), e_n, h)?,
        )?;
        let name = |e: usize, w: &str| param_names(&format!("{p}.experts.{e}.{w}.weight"));
        let bk = self.tiles.depth();
        let elem = self.format.bytes_per_weight();
        let w13 = DevBuf::alloc(dev, e_n * 2 * i * h * elem)?;
        let w2 = DevBuf::alloc(dev, e_n * h * i * elem)?;
        let mut s13 = Vec::new();
        let mut s2 = Vec::new();
        // Expert e: gate and up stacked as one [2I, H] weight, down [H, I], each in the
        // grouped GEMM's tiled layout at e times its size.
        for e in 0..e_n {
            let (at13, at2) = (e * 2 * i * h * elem, e * h * i * elem);
            match self.format {
                ExpertFormat::Bf16 => {
                    let mut gu = st.bf16(&name(e, "gate_proj"), i, h)?;
                    gu.extend(st.bf16(&name(e, "up_proj"), i, h)?);
                    w13.write_at(dev, at13, &tile_weight(&gu, 2 * i, h, bk))?;
                    let down = st.bf16(&name(e, "down_proj"), h, i)?;
                    w2.write_at(dev, at2, &tile_weight(&down, h, i, bk))?;
                }
                ExpertFormat::Fp8 { .. } => {
                    let (g, u) = (
                        st.fp8(&name(e, "gate_proj"), i, h)?,
                        st.fp8(&name(e, "up_proj"), i, h)?,
                    );
                    let gu = [g.bytes, u.bytes].concat();
                    w13.write_at(dev, at13, &tile_weight(&gu, 2 * i, h, bk))?;
                    s13.extend(g.scales);
                    s13.extend(u.scales);
                    let down = st.fp8(&name(e, "down_proj"), h, i)?;
                    w2.write_at(dev, at2, &tile_weight(down.bytes, h, i, bk))?;
                    s2.extend(down.scales);
                }
            }
        }
        let scales = |s: Vec<f32>| -> anyhow::Result<Option<DevBuf>> {
            match self.format {
                ExpertFormat::Bf16 => Ok(None),
                ExpertFormat::Fp8 { .. } => Ok(Some(DevBuf::upload(dev, &s)?)),
            }
        };
        let weights = SparseLayer {
            router,
            w13,
            w13_scales: scales(s13)?,
            w2,
            w2_scales: scales(s2)?,
        };
        dev.stream
            .synchronize()
            .map_err(|e| anyhow!("uploading layer {layer}'s experts: {e}"))?;
        Ok(weights)
    }

    /// The sparse block over the step's token rows of the normed hidden state `x`
    /// (`[T, H]` bf16), its output into `out` (`[T, H]` bf16, added to the residual by the
    /// next norm).
    pub(crate) fn forward(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        w: &SparseLayer,
        x: DevPtr,
        out: DevPtr,
        step: MoeStep,
    ) -> anyhow::Result<()> {
        let (d, s, mk) = (&self.d, &self.scratch, &self.kernels);
        let (t, k, e) = (step.tokens, d.top_k, d.experts);
        let tile = self.tile_for(t, step.decode);
        let first = self.first_sparse == Some(step.layer);
        let r = Routing {
            slots: step.slots.unwrap_or(0),
            ..s.routing()
        };
        let scales = |b: &Option<DevBuf>| b.as_ref().map_or(0, |b| b.ptr);
        ops.op("gemm router", || {
            cx.gemm.linear(
                cx.dev,
                x,
                w.router.ptr,
                s.logits.ptr,
                t,
                e,
                d.hidden,
                OutType::F32,
            )
        })?;
        ops.op("moe route", || {
            mk.topk_softmax(s.logits.ptr, &r, t, e, k, d.renormalise)
        })?;
        ops.op("moe align", || mk.align(&r, t, k, e, tile.bm, first))?;
        let fp8 = matches!(self.format, ExpertFormat::Fp8 { .. });
        // FP8 experts take f16 activations (see moe.cu's moe_gemm).
        let x = if fp8 {
            ops.op("moe to f16", || mk.to_f16(x, s.x16.ptr, t * d.hidden))?;
            s.x16.ptr
        } else {
            x
        };
        let up = GroupedGemm {
            a: x,
            w: w.w13.ptr,
            scales: scales(&w.w13_scales),
            out: s.inter.ptr,
            n: 2 * d.inter,
            k: d.hidden,
            down: false,
        };
        ops.op("moe gemm gate_up", || {
            mk.gemm(&up, &r, self.format, tile, t, k, e)
        })?;
        ops.op("silu*up", || {
            if fp8 {
                mk.silu_mul_f16(s.inter.ptr, s.act.ptr, t * k, d.inter)
            } else {
                cx.kernels.silu_mul(s.inter.ptr, s.act.ptr, t * k, d.inter)
            }
        })?;
        let down = GroupedGemm {
            a: s.act.ptr,
            w: w.w2.ptr,
            scales: scales(&w.w2_scales),
            out: s.inter.ptr,
            n: d.hidden,
            k: d.inter,
            down: true,
        };
        ops.op("moe gemm down", || {
            mk.gemm(&down, &r, self.format, tile, t, k, e)
        })?;
        ops.op("moe sum", || mk.sum(s.inter.ptr, out, &r, t, d.hidden, k))
    }

    /// The router GEMM's shape (`n`, `k`) and its output buffer, for tuning.
    pub(crate) fn router_gemm(&self) -> (usize, usize, DevPtr) {
        (self.d.experts, self.d.hidden, self.scratch.logits.ptr)
    }
}
