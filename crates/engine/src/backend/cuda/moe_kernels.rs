//! The mixture-of-experts kernels (`kernels/moe.cu`), compiled at start-up for MoE models
//! only, and the rules their launches share with the buffers they read and write: which
//! grouped-GEMM tile a step uses ([`ExpertFormat::tiles`], [`TileLadder::pick`]), how the expert
//! weights are laid out for them ([`tiled_offset`]) and how long the expert-sorted index is
//! ([`sorted_len`]). Every grid is a function of the step's token
//! count alone, so a decode bucket's launches are captured into its CUDA graph unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::bail;
use cudarc::driver::{CudaFunction, CudaStream, PushKernelArg};
use cudarc::nvrtc::Ptx;

use super::device::{CudaDevice, CudaError};
use super::kernels::{allow_smem, compile_ptx, launch_err, load_module, DevPtr, Kernels};
use crate::model::config::ModelConfig;

const SOURCE: &str = concat!(
    include_str!("kernels/common.cu"),
    include_str!("kernels/moe.cu")
);

/// What moe.cu's source needs appended: one `MOE_GEMM_SET` line per [`COMPILED`] tile, so
/// the kernels compiled are exactly the ones the host can pick.
fn instantiations() -> String {
    COMPILED
        .iter()
        .map(|&(fp8, t)| {
            format!(
                "MOE_GEMM_SET({}, {}, {}, {}, {}, {}, {})\n",
                if fp8 { "fp8" } else { "bf16" },
                t.bm,
                t.bn,
                t.bk,
                t.stages,
                t.warps_m,
                fp8
            )
        })
        .collect()
}

/// Most experts a model may have (`MOE_MAX_EXPERTS` in moe.cu: the router softmax keeps a
/// token's probabilities in one warp's registers).
pub const MAX_EXPERTS: usize = 512;

/// Rows of a weight's row group in the tiled layout.
pub const ROW_GROUP: usize = 32;

/// Where element (`n`, `k`) of an expert's `[rows, cols]` weight lives in the tiled layout
/// the grouped GEMM reads: k-tiles of `bk` columns, each made of the row groups of
/// [`ROW_GROUP`] rows in order, each group `ROW_GROUP x bk` row-major. A GEMM stage (a
/// k-tile of consecutive row groups) is then one contiguous run of memory, not a row
/// segment per row: decode streams whole expert weights, and short strided segments left
/// it at 45% of the bandwidth. Needs `rows % ROW_GROUP == 0` and `cols % bk == 0`.
pub fn tiled_offset(n: usize, k: usize, rows: usize, bk: usize) -> usize {
    ((k / bk * (rows / ROW_GROUP) + n / ROW_GROUP) * ROW_GROUP + n % ROW_GROUP) * bk + k % bk
}

/// A row-major `[rows, cols]` weight in the tiled layout ([`tiled_offset`]).
pub fn tile_weight<T: Copy + Default>(w: &[T], rows: usize, cols: usize, bk: usize) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    for (n, row) in w.chunks_exact(cols).enumerate().take(rows) {
        for (kt, seg) in row.chunks_exact(bk).enumerate() {
            let at = tiled_offset(n, kt * bk, rows, bk);
            out[at..at + bk].copy_from_slice(seg);
        }
    }
    out
}

/// How the experts' weights are stored on the device, which picks the GEMM kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertFormat {
    Bf16,
    /// e4m3 with an fp32 scale per `block` = `[rows, cols]` of each expert's weight (the
    /// checkpoint's `weight_block_size`).
    Fp8 {
        block: [usize; 2],
    },
}

/// One grouped-GEMM tile: `bm` expert rows x `bn` output columns x `bk` of the reduction
/// per step, streamed through `stages` buffers, by `4 * warps_m` warps (`warps_m` over the
/// rows). Named `{bm}x{bn}x{bk}s{stages}w{warps_m}` (moe.cu's kernel names and the
/// benchmark's `CUDA_BENCH_MOE_TILES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MoeTile {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub stages: usize,
    pub warps_m: usize,
}

const fn tile(bm: usize, bn: usize, bk: usize, stages: usize, warps_m: usize) -> MoeTile {
    MoeTile {
        bm,
        bn,
        bk,
        stages,
        warps_m,
    }
}

impl MoeTile {
    /// Threads of a block.
    pub fn threads(&self) -> u32 {
        128 * self.warps_m as u32
    }

    /// Dynamic shared memory of a block: `stages` x (activations `bm x (bk + 8)` in 16-bit,
    /// weights `bn x (bk * bytes + 16)`), moe.cu's `NST * STAGE` (which traps when a launch
    /// gives less).
    pub fn smem_bytes(&self, fp8: bool) -> usize {
        let wb = if fp8 { 1 } else { 2 };
        self.stages * (self.bm * (self.bk + 8) * 2 + self.bn * (self.bk * wb + 16))
    }
}

impl std::fmt::Display for MoeTile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}x{}x{}s{}w{}",
            self.bm, self.bn, self.bk, self.stages, self.warps_m
        )
    }
}

impl std::str::FromStr for MoeTile {
    type Err = anyhow::Error;

    /// `{bm}x{bn}x{bk}s{stages}w{warps_m}`, e.g. `64x128x64s4w2`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!("MoE tile {s:?}: expected BMxBNxBKsSTAGESwWARPS, e.g. 64x128x64s4w2")
        };
        let (dims, rest) = s.split_once('s').ok_or_else(bad)?;
        let (stages, warps) = rest.split_once('w').ok_or_else(bad)?;
        let n: Vec<usize> = dims
            .split('x')
            .map(|v| v.parse().map_err(|_| bad()))
            .collect::<anyhow::Result<_>>()?;
        let [bm, bn, bk] = n[..] else {
            return Err(bad());
        };
        let num = |v: &str| v.parse::<usize>().map_err(|_| bad());
        Ok(tile(bm, bn, bk, num(stages)?, num(warps)?))
    }
}

/// The grouped GEMMs moe.cu is compiled with (one `MOE_GEMM_SET` line each, appended by
/// [`instantiations`]): (FP8 weights, tile), each for gate/up and for down; the tiles
/// [`ExpertFormat::tiles`] picks. Others swept on the H200 (2026-12-02, `scripts/gpu/moe-tiles.sh`:
/// two row warps, 3-5 stages, 32 rows, W8A8 on FP8 MMAs) were not faster
/// (docs/bench/cuda-moe.md); add one here to sweep it again. The FP8 32-row tile, swept
/// again after the kernel lost its per-k-tile bookkeeping (2026-12-03), won from 16 to 32
/// rows per expert and is the middle of the FP8 ladder.
const COMPILED: [(bool, MoeTile); 9] = [
    (false, tile(16, 128, 64, 2, 1)),
    (false, tile(64, 64, 64, 2, 1)),
    (false, tile(16, 32, 32, 2, 1)),
    (false, tile(64, 32, 32, 2, 1)),
    (true, tile(16, 128, 64, 3, 1)),
    (true, tile(64, 128, 64, 2, 1)),
    (true, tile(16, 32, 32, 3, 1)),
    (true, tile(64, 32, 32, 3, 1)),
    (true, tile(32, 128, 64, 3, 1)),
];

/// Every compiled tile for FP8 (`fp8`) or bf16 experts.
pub fn compiled_tiles(fp8: bool) -> impl Iterator<Item = MoeTile> {
    COMPILED
        .iter()
        .filter(move |&&(f, _)| f == fp8)
        .map(|&(_, t)| t)
}

/// The names of every grouped GEMM kernel moe.cu compiles.
pub fn gemm_kernel_names() -> Vec<String> {
    COMPILED
        .iter()
        .flat_map(|&(fp8, t)| [false, true].map(|down| gemm_name(fp8, t, down)))
        .collect()
}

/// The kernel name of a grouped GEMM: `moe_gemm_{up,down}_{bf16,fp8}_{tile}`.
fn gemm_name(fp8: bool, t: MoeTile, down: bool) -> String {
    format!(
        "moe_gemm_{}_{}_{t}",
        if down { "down" } else { "up" },
        if fp8 { "fp8" } else { "bf16" },
    )
}

/// The grouped-GEMM tiles of one expert storage, shortest blocks first, each with the most
/// rows per expert it is picked for: short blocks pad little when experts get few rows
/// (decode), tall ones re-read each expert's weights fewer times when they get many
/// (prefill). [`ExpertFormat::tiles`] builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileLadder(Vec<(MoeTile, usize)>);

impl TileLadder {
    /// The tile for a step of `tokens` tokens choosing `top_k` of `experts` experts, when
    /// nothing is known of its routing: by the mean rows per expert.
    pub fn pick(&self, tokens: usize, top_k: usize, experts: usize) -> MoeTile {
        self.pick_rows((tokens * top_k) as f64 / experts.max(1) as f64)
    }

    /// The tile for `rows` rows per expert: the first whose limit they stay within, else
    /// the tallest.
    pub fn pick_rows(&self, rows: f64) -> MoeTile {
        self.0
            .iter()
            .find(|&&(_, up_to)| rows <= up_to as f64)
            .or(self.0.last())
            .map(|&(t, _)| t)
            .expect("a ladder has a tile")
    }

    /// Where `tile` stands in the ladder, shortest first (`None`: not one of its tiles).
    pub fn position(&self, tile: MoeTile) -> Option<usize> {
        self.0.iter().position(|&(t, _)| t == tile)
    }

    /// Every tile of the ladder, shortest first.
    pub fn tiles(&self) -> impl Iterator<Item = MoeTile> + '_ {
        self.0.iter().map(|&(t, _)| t)
    }

    /// The reduction depth all its tiles share (the weights' tiled layout, [`tiled_offset`]).
    pub fn depth(&self) -> usize {
        self.0[0].0.bk
    }
}

/// Rows per expert as a routed row sees them: `sq_sum` (the sum over experts of their row
/// counts squared, over a step's sparse layers, as `moe_align` gathers it) over `choices`
/// (the sum of the counts: tokens x top_k x sparse layers). The mean rows per expert, plus
/// about one, where routing spreads evenly (random weights, mixed prompts); the whole batch
/// where every row picks the same experts (one prompt repeated: the seeds' client), for
/// which the ladder's limits, set by the mean, would pick too short a tile.
pub fn rows_seen(sq_sum: u64, choices: usize) -> f64 {
    sq_sum as f64 / choices.max(1) as f64
}

/// Entries of the expert-sorted index for `tokens` tokens at `bm` rows per block: every
/// choice, plus each expert's padding to a whole block, rounded up to a whole block.
pub fn sorted_len(tokens: usize, top_k: usize, experts: usize, bm: usize) -> usize {
    (tokens * top_k + experts * (bm - 1)).div_ceil(bm) * bm
}

impl ExpertFormat {
    /// How `config`'s experts are held on the device: in FP8 as stored when its
    /// `quantization_config` quantises them, else in bf16.
    pub fn of(config: &ModelConfig) -> Self {
        match &config.fp8 {
            Some(q) if q.converts("model.layers.0.mlp.experts.0.gate_proj") => {
                ExpertFormat::Fp8 { block: q.block }
            }
            _ => ExpertFormat::Bf16,
        }
    }

    /// Bytes of one expert weight (its block scales aside).
    pub fn bytes_per_weight(&self) -> usize {
        match self {
            ExpertFormat::Bf16 => 2,
            ExpertFormat::Fp8 { .. } => 1,
        }
    }

    /// Whether tile `t` lies inside one scale block of this storage (a block's scale is
    /// applied once per k-tile): always for bf16.
    pub fn fits(&self, t: MoeTile) -> bool {
        match *self {
            ExpertFormat::Fp8 { block: [br, bc] } => br % t.bn == 0 && bc % t.bk == 0,
            ExpertFormat::Bf16 => true,
        }
    }

    /// The tiles of this storage ([`TileLadder`]) for experts with `[inter, hidden]` gate/up
    /// and `[hidden, inter]` down weights, all of one depth `bk` (the weights' tiled layout,
    /// [`tiled_offset`]): 64 where the shapes (and FP8 blocks) allow, else 32. An FP8 tile
    /// must lie inside one scale block ([`Self::fits`]), and gate and up (concatenated) must
    /// each be whole blocks; shapes the kernels cannot take are an error naming the reason.
    ///
    /// FP8 in 128 x 128 blocks (Qwen3-30B-A3B-FP8) climbs three tiles, as the H200 sweep of
    /// 2026-12-03 ranked them (docs/bench/cuda-moe.md; decode steps of the 30B at 4, 16 and
    /// 32 rows per expert, prefill steps of 8,192 tokens at 512): 16 x 128 up to 12 rows per
    /// expert (13.00 ms against 13.08 for 32 rows at 4), 32 x 128 up to 48 (16.27 against
    /// 18.68 ms at 16, 24.17 against 25.34 for 64 rows at 32), 64 x 128 above (186 against
    /// 203 ms a prefill round). The limits 12 and 48 lie between measured points (48: where
    /// the 32-row tile needs two blocks for most experts, re-reading their weights, and the
    /// 64-row tile pads a quarter). bf16 keeps 16 x 128 up to 24 rows per expert, then
    /// 64 x 64; 16/64 x 32 x 32 where the shapes or FP8 blocks are multiples of 32 only (the
    /// tiny test checkpoints).
    pub fn tiles(&self, hidden: usize, inter: usize) -> anyhow::Result<TileLadder> {
        if !hidden.is_multiple_of(32) || !inter.is_multiple_of(32) {
            bail!("the CUDA MoE kernels need hidden_size ({hidden}) and moe_intermediate_size ({inter}) to be multiples of 32");
        }
        let two = |few, many| TileLadder(vec![(few, 24), (many, usize::MAX)]);
        let narrow = |s| two(tile(16, 32, 32, s, 1), tile(64, 32, 32, s, 1));
        let deep = hidden.is_multiple_of(64) && inter.is_multiple_of(64);
        match *self {
            ExpertFormat::Bf16 if deep => Ok(two(tile(16, 128, 64, 2, 1), tile(64, 64, 64, 2, 1))),
            ExpertFormat::Bf16 => Ok(narrow(2)),
            ExpertFormat::Fp8 { block: [br, bc] } => {
                if !inter.is_multiple_of(br) {
                    bail!("FP8 blocks of {br} rows do not divide moe_intermediate_size {inter}: gate and up would share a block");
                }
                if deep && br.is_multiple_of(128) && bc.is_multiple_of(64) {
                    Ok(TileLadder(vec![
                        (tile(16, 128, 64, 3, 1), 12),
                        (tile(32, 128, 64, 3, 1), 48),
                        (tile(64, 128, 64, 2, 1), usize::MAX),
                    ]))
                } else if br.is_multiple_of(32) && bc.is_multiple_of(32) {
                    Ok(narrow(3))
                } else {
                    bail!("FP8 weight_block_size [{br}, {bc}]: the CUDA MoE kernels take blocks whose sides are multiples of 32")
                }
            }
        }
    }
}

/// Where one step's routing lives on the device (written by `topk_softmax` and `align`,
/// read by the GEMMs).
#[derive(Debug, Clone, Copy)]
pub struct Routing {
    /// `[tokens * top_k]` i32 expert ids.
    pub ids: DevPtr,
    /// `[tokens * top_k]` f32 router weights.
    pub weights: DevPtr,
    /// Expert-sorted flat choice indices ([`sorted_len`] of them).
    pub sorted: DevPtr,
    /// The expert of each block of `bm` sorted entries.
    pub block_expert: DevPtr,
    /// One i32: sorted entries in use (padding included).
    pub post_pad: DevPtr,
    /// One u64: the experts' row counts squared, summed over the step's sparse layers
    /// ([`rows_seen`]); 0: not gathered.
    pub sq_sum: DevPtr,
    /// The step's KV slot per token row, where -1 marks a decode graph's padding row,
    /// which then routes to no expert; 0: every row routes.
    pub slots: DevPtr,
}

/// One grouped GEMM: `rows` choices against the experts' `[n, k]` weights at `w` (and
/// their FP8 scales), reading `a` and writing `out`.
#[derive(Debug, Clone, Copy)]
pub struct GroupedGemm {
    pub a: DevPtr,
    pub w: DevPtr,
    /// FP8 scales, 0 for bf16 weights.
    pub scales: DevPtr,
    pub out: DevPtr,
    pub n: usize,
    pub k: usize,
    /// Gate/up (`a` row = token) or down (`a` row = choice, output times its weight).
    pub down: bool,
}

/// The compiled MoE kernels.
pub struct MoeKernels {
    stream: Arc<CudaStream>,
    topk_softmax: CudaFunction,
    align: CudaFunction,
    sum: CudaFunction,
    to_f16: CudaFunction,
    silu_mul_f16: CudaFunction,
    fill_e4m3: CudaFunction,
    fill_f32: CudaFunction,
    /// By (FP8 weights, tile, down): [`COMPILED`].
    gemms: HashMap<(bool, MoeTile, bool), CudaFunction>,
}

/// Compiles `kernels/moe.cu` to PTX for `arch` (e.g. `sm_90`), without fast math: the
/// router softmax picks experts, and a flipped near-tie would change a token's experts.
/// Needs only NVRTC, no GPU.
pub fn compile_source(arch: &str) -> Result<Ptx, CudaError> {
    compile_ptx(
        arch,
        "moe.cu",
        &format!("{SOURCE}{}", instantiations()),
        Vec::new(),
    )
}

impl MoeKernels {
    /// Compiles moe.cu for `dev`'s architecture ([`compile_source`]) and loads it.
    pub fn compile(dev: &CudaDevice) -> Result<Self, CudaError> {
        let f = load_module(dev, compile_source(&dev.arch)?)?;
        let mut gemms = HashMap::new();
        for (fp8, t) in COMPILED {
            for down in [false, true] {
                let func = allow_smem(f(&gemm_name(fp8, t, down))?, t.smem_bytes(fp8))?;
                gemms.insert((fp8, t, down), func);
            }
        }
        Ok(Self {
            stream: dev.stream.clone(),
            topk_softmax: f("moe_topk_softmax")?,
            align: f("moe_align")?,
            sum: f("moe_sum")?,
            to_f16: f("moe_to_f16")?,
            silu_mul_f16: f("moe_silu_mul_f16")?,
            fill_e4m3: f("fill_e4m3_uniform")?,
            fill_f32: f("fill_f32")?,
            gemms,
        })
    }

    /// Routes `tokens` rows of fp32 `logits` (`[tokens, experts]`): the top `top_k`
    /// experts by softmax probability, renormalised when `renormalise`.
    pub fn topk_softmax(
        &self,
        logits: DevPtr,
        r: &Routing,
        tokens: usize,
        experts: usize,
        top_k: usize,
        renormalise: bool,
    ) -> Result<(), CudaError> {
        let (t, e, k, rn) = (
            tokens as i32,
            experts as i32,
            top_k as i32,
            renormalise as i32,
        );
        let mut b = self.stream.launch_builder(&self.topk_softmax);
        b.arg(&logits)
            .arg(&r.ids)
            .arg(&r.weights)
            .arg(&t)
            .arg(&e)
            .arg(&k)
            .arg(&rn)
            .arg(&r.slots);
        unsafe { b.launch(Kernels::cfg((tokens.div_ceil(4) as u32, 1), 128, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// Groups the `tokens * top_k` choices by expert in blocks of `bm` rows, and adds the
    /// counts squared to `r.sq_sum` (stores them when `first`: the step's first sparse
    /// layer).
    #[allow(clippy::too_many_arguments)]
    pub fn align(
        &self,
        r: &Routing,
        tokens: usize,
        top_k: usize,
        experts: usize,
        bm: usize,
        first: bool,
    ) -> Result<(), CudaError> {
        let cap = sorted_len(tokens, top_k, experts, bm) as i32;
        let (n, e, bm_) = ((tokens * top_k) as i32, experts as i32, bm as i32);
        let first = first as i32;
        let mut b = self.stream.launch_builder(&self.align);
        b.arg(&r.ids)
            .arg(&n)
            .arg(&e)
            .arg(&bm_)
            .arg(&cap)
            .arg(&r.sorted)
            .arg(&r.block_expert)
            .arg(&r.post_pad)
            .arg(&r.sq_sum)
            .arg(&first);
        let smem = ((3 * experts + 1) * 4) as u32;
        unsafe { b.launch(Kernels::cfg((1, 1), 1024, smem)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// One grouped GEMM over the routed choices of `tokens` tokens, in `tile`'s blocks
    /// (`tile.bm` must be the `bm` the routing was aligned with).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        g: &GroupedGemm,
        r: &Routing,
        format: ExpertFormat,
        tile: MoeTile,
        tokens: usize,
        top_k: usize,
        experts: usize,
    ) -> Result<(), CudaError> {
        let fp8 = matches!(format, ExpertFormat::Fp8 { .. });
        let func = &self.gemms[&(fp8, tile, g.down)];
        let [bn, bk] = match format {
            ExpertFormat::Bf16 => [tile.bn, tile.bk],
            ExpertFormat::Fp8 { block } => block,
        };
        let (rows, k_, n, kk) = (
            (tokens * top_k) as i32,
            top_k as i32,
            g.n as i32,
            g.k as i32,
        );
        let (bn, bk) = (bn as i32, bk as i32);
        let mut b = self.stream.launch_builder(func);
        b.arg(&g.a)
            .arg(&g.w)
            .arg(&g.scales)
            .arg(&g.out)
            .arg(&r.sorted)
            .arg(&r.block_expert)
            .arg(&r.post_pad)
            .arg(&r.weights)
            .arg(&rows)
            .arg(&k_)
            .arg(&n)
            .arg(&kk)
            .arg(&bn)
            .arg(&bk);
        let grid = (
            (sorted_len(tokens, top_k, experts, tile.bm) / tile.bm) as u32,
            g.n.div_ceil(tile.bn) as u32,
        );
        let smem = tile.smem_bytes(fp8) as u32;
        unsafe { b.launch(Kernels::cfg(grid, tile.threads(), smem)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// `out[t] = sum_j y[t * top_k + j]` (`[tokens, hidden]` bf16); zeros for a row that
    /// routed nowhere (`r.slots`).
    pub fn sum(
        &self,
        y: DevPtr,
        out: DevPtr,
        r: &Routing,
        tokens: usize,
        hidden: usize,
        top_k: usize,
    ) -> Result<(), CudaError> {
        let (h, k) = (hidden as i32, top_k as i32);
        let mut b = self.stream.launch_builder(&self.sum);
        b.arg(&y).arg(&out).arg(&h).arg(&k).arg(&r.ids);
        unsafe { b.launch(Kernels::cfg((tokens as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// `n` bf16 values (even) to f16 (the FP8 GEMMs' activations), each row's pairs in the
    /// order the grouped GEMM's ldmatrix reads (moe.cu's `f16_pair_slot`).
    pub fn to_f16(&self, x: DevPtr, out: DevPtr, n: usize) -> Result<(), CudaError> {
        let n_ = n as i32;
        let mut b = self.stream.launch_builder(&self.to_f16);
        b.arg(&x).arg(&out).arg(&n_);
        unsafe { b.launch(Kernels::cfg(((n / 2).div_ceil(256) as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// SiLU(gate) * up of `rows` gate/up rows (`[rows, 2 inter]` bf16) into f16 `[rows,
    /// inter]` (the FP8 down GEMM's activations, pairs in `f16_pair_slot` order).
    pub fn silu_mul_f16(
        &self,
        gu: DevPtr,
        out: DevPtr,
        rows: usize,
        inter: usize,
    ) -> Result<(), CudaError> {
        let total = rows * inter;
        let (i, n) = (inter as i32, total as i32);
        let mut b = self.stream.launch_builder(&self.silu_mul_f16);
        b.arg(&gu).arg(&out).arg(&i).arg(&n);
        unsafe { b.launch(Kernels::cfg(((total / 2).div_ceil(256) as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// `n` seeded e4m3 bytes of a uniform in [-448, 448) (dummy FP8 weights).
    pub fn fill_e4m3_uniform(&self, out: DevPtr, n: usize, seed: u64) -> Result<(), CudaError> {
        let n_ = n as u64;
        let mut b = self.stream.launch_builder(&self.fill_e4m3);
        b.arg(&out).arg(&n_).arg(&seed);
        let blocks = n.div_ceil(256).min(65_536) as u32;
        unsafe { b.launch(Kernels::cfg((blocks, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// `n` fp32 values of `v`.
    pub fn fill_f32(&self, out: DevPtr, n: usize, v: f32) -> Result<(), CudaError> {
        let n_ = n as u64;
        let mut b = self.stream.launch_builder(&self.fill_f32);
        b.arg(&out).arg(&n_).arg(&v);
        unsafe { b.launch(Kernels::cfg((n.div_ceil(256) as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_follow_the_weight_storage() {
        let t = |s: &str| s.parse::<MoeTile>().unwrap();
        // Qwen3-30B-A3B: bf16, or FP8 in 128 x 128 blocks, take the wide tiles.
        let names = |l: TileLadder| l.tiles().map(|t| t.to_string()).collect::<Vec<_>>();
        let bf16 = ExpertFormat::Bf16;
        assert_eq!(
            names(bf16.tiles(2048, 768).unwrap()),
            ["16x128x64s2w1", "64x64x64s2w1"]
        );
        let fp8 = ExpertFormat::Fp8 { block: [128, 128] };
        assert_eq!(
            names(fp8.tiles(2048, 768).unwrap()),
            ["16x128x64s3w1", "32x128x64s3w1", "64x128x64s2w1"]
        );
        // The tiny FP8 fixture's 32 x 32 blocks.
        let small = ExpertFormat::Fp8 { block: [32, 32] };
        assert_eq!(
            names(small.tiles(64, 32).unwrap()),
            ["16x32x32s3w1", "64x32x32s3w1"]
        );
        // Every tile's BN divides the block rows and BK the block columns.
        for f in [fp8, small] {
            let ExpertFormat::Fp8 { block } = f else {
                unreachable!()
            };
            for tile in f.tiles(2048, 768).unwrap().tiles() {
                assert_eq!(block[0] % tile.bn, 0);
                assert_eq!(block[1] % tile.bk, 0);
                assert!(f.fits(tile));
            }
        }
        let err = ExpertFormat::Fp8 { block: [48, 48] }
            .tiles(96, 96)
            .unwrap_err();
        assert!(err.to_string().contains("multiples of 32"), "{err}");
        let err = ExpertFormat::Fp8 { block: [128, 128] }
            .tiles(2048, 64)
            .unwrap_err();
        assert!(err.to_string().contains("gate and up"), "{err}");
        assert!(ExpertFormat::Bf16.tiles(2048, 760).is_err());
        // bf16 experts of 32 (the tiny fixture) take the narrow tiles; both tiles of a
        // storage have one depth, the tiled layout's.
        assert_eq!(bf16.tiles(64, 32).unwrap().pick(1, 2, 4), t("16x32x32s2w1"));
        for f in [bf16, fp8, small] {
            for (h, i) in [(2048, 768), (64, 32), (256, 128)] {
                if let Ok(ladder) = f.tiles(h, i) {
                    let bk = ladder.depth();
                    assert!(ladder.tiles().all(|t| t.bk == bk), "{f:?} {h} {i}");
                    assert!(h % bk == 0 && i % bk == 0);
                    // shortest blocks first
                    let bms: Vec<usize> = ladder.tiles().map(|t| t.bm).collect();
                    assert!(bms.windows(2).all(|w| w[0] < w[1]), "{bms:?}");
                }
            }
        }
    }

    /// The tiled layout is a permutation, and a GEMM stage (a k-tile of consecutive row
    /// groups) is one contiguous run.
    #[test]
    fn the_tiled_layout_makes_each_stage_contiguous() {
        let (rows, cols, bk) = (96, 128, 32);
        let mut seen = vec![false; rows * cols];
        for n in 0..rows {
            for k in 0..cols {
                let at = tiled_offset(n, k, rows, bk);
                assert!(!seen[at], "({n}, {k}) collides");
                seen[at] = true;
            }
        }
        // Rows 32..96 of k-tile 2: one run of 64 x 32.
        let start = tiled_offset(32, 64, rows, bk);
        for n in 32..96 {
            for k in 64..96 {
                assert_eq!(
                    tiled_offset(n, k, rows, bk),
                    start + (n - 32) * bk + (k - 64)
                );
            }
        }
        let w: Vec<u32> = (0..(rows * cols) as u32).collect();
        let t = tile_weight(&w, rows, cols, bk);
        for n in 0..rows {
            for k in 0..cols {
                assert_eq!(t[tiled_offset(n, k, rows, bk)], w[n * cols + k]);
            }
        }
    }

    /// Every tile a storage can be given is one moe.cu compiles, and the names are the
    /// kernels' (checked against the PTX on the GPU machine by
    /// `cuda_kernels_compile_for_the_preset_shapes`).
    #[test]
    fn every_tile_chosen_is_compiled() {
        let formats = [
            ExpertFormat::Bf16,
            ExpertFormat::Fp8 { block: [128, 128] },
            ExpertFormat::Fp8 { block: [32, 32] },
            ExpertFormat::Fp8 { block: [64, 64] },
        ];
        for f in formats {
            for (h, i) in [(2048, 768), (64, 32), (256, 128), (96, 64)] {
                let Ok(ladder) = f.tiles(h, i) else { continue };
                let fp8 = matches!(f, ExpertFormat::Fp8 { .. });
                for t in ladder.tiles() {
                    assert!(COMPILED.contains(&(fp8, t)), "{f:?} {h} {i}: {t:?}");
                }
            }
        }
        assert_eq!(
            gemm_name(true, tile(16, 128, 64, 3, 1), true),
            "moe_gemm_down_fp8_16x128x64s3w1"
        );
        // moe.cu gets one instantiation per compiled tile, in the macro's argument order.
        let inst = instantiations();
        assert_eq!(inst.lines().count(), COMPILED.len());
        assert!(inst.contains("MOE_GEMM_SET(fp8, 64, 128, 64, 2, 1, true)\n"));
    }

    #[test]
    fn tiles_print_and_parse_by_name_and_size_their_shared_memory() {
        for (fp8, t) in COMPILED {
            assert_eq!(t.to_string().parse::<MoeTile>().unwrap(), t);
            assert_eq!(t.bm % (16 * t.warps_m), 0, "{t}: whole MMA rows per warp");
            // Two blocks must fit a multiprocessor (227 KiB on sm_90).
            assert!(2 * t.smem_bytes(fp8) <= 227 * 1024, "{t}");
        }
        // moe.cu's STAGE for 64 x 128 x 64 in FP8: A 64 x 72 halves, W 128 x 80 bytes.
        assert_eq!(
            tile(64, 128, 64, 4, 2).smem_bytes(true),
            4 * (64 * 72 * 2 + 128 * 80)
        );
        assert_eq!(tile(64, 128, 64, 4, 2).threads(), 256);
        for bad in ["64x128x64", "64x128s4w2", "axbxcs1w1", "64x128x64s4"] {
            let err = bad.parse::<MoeTile>().unwrap_err().to_string();
            assert!(err.contains("BMxBNxBK"), "{bad}: {err}");
        }
    }

    #[test]
    fn decode_steps_take_short_blocks_and_prefill_long_ones() {
        // 128 experts, top 8: rows per expert = tokens / 16.
        let bm = |f: ExpertFormat, tokens| f.tiles(2048, 768).unwrap().pick(tokens, 8, 128).bm;
        let fp8 = ExpertFormat::Fp8 { block: [128, 128] };
        // FP8: 16 rows up to 12 per expert, 32 up to 48, then 64
        for (tokens, rows) in [(1, 16), (64, 16), (192, 16), (193, 32), (512, 32)] {
            assert_eq!(bm(fp8, tokens), rows, "{tokens} tokens");
        }
        for (tokens, rows) in [(768, 32), (769, 64), (8192, 64), (usize::MAX / 8, 64)] {
            assert_eq!(bm(fp8, tokens), rows, "{tokens} tokens");
        }
        // bf16: 16 rows up to 24 per expert, then 64
        let bf16 = ExpertFormat::Bf16;
        for (tokens, rows) in [(1, 16), (384, 16), (385, 64), (8192, 64)] {
            assert_eq!(bm(bf16, tokens), rows, "{tokens} tokens");
        }
    }

    /// The rows a routed row sees decide the tile when routing is known: the mean where it
    /// spreads, the whole batch where every row picks the same experts.
    #[test]
    fn routing_that_piles_rows_on_few_experts_takes_taller_tiles() {
        let ladder = ExpertFormat::Fp8 { block: [128, 128] }
            .tiles(2048, 768)
            .unwrap();
        let (k, e, layers) = (8usize, 128usize, 48usize);
        // Experts' row counts of one layer -> rows seen over `layers` such layers.
        let seen = |counts: &[usize]| {
            let sq: u64 = counts.iter().map(|&c| (c * c) as u64).sum();
            let n: usize = counts.iter().sum();
            rows_seen(sq * layers as u64, n * layers)
        };
        for batch in [1usize, 64, 512] {
            // one prompt repeated: the batch on k experts
            let same = seen(&vec![batch; k]);
            assert_eq!(same, batch as f64, "batch {batch}");
            // evenly spread: the mean rows per expert
            if (batch * k).is_multiple_of(e) {
                let even = seen(&vec![batch * k / e; e]);
                assert_eq!(even, (batch * k / e) as f64);
                assert_eq!(ladder.pick_rows(even), ladder.pick(batch, k, e));
            }
        }
        // the seeds' client at 64 and 512: the 64-row tile, where the mean picks 16 and 32
        assert_eq!(ladder.pick(64, k, e).bm, 16);
        assert_eq!(ladder.pick_rows(seen(&[64; 8])).bm, 64);
        assert_eq!(ladder.pick(512, k, e).bm, 32);
        assert_eq!(ladder.pick_rows(seen(&[512; 8])).bm, 64);
        // a limit is inclusive, and no rows at all take the shortest tile
        assert_eq!(ladder.pick_rows(12.0).bm, 16);
        assert_eq!(ladder.pick_rows(12.5).bm, 32);
        assert_eq!(ladder.pick_rows(0.0).bm, 16);
        assert_eq!(rows_seen(0, 0), 0.0);
        assert_eq!(ladder.position(ladder.pick_rows(1e9)), Some(2));
    }

    /// The sorted index holds every choice plus the worst-case padding (each expert one
    /// block short of full), in whole blocks.
    #[test]
    fn the_sorted_index_covers_the_worst_padding() {
        assert_eq!(
            sorted_len(1, 8, 128, 16),
            (8 + 128 * 15_usize).div_ceil(16) * 16
        );
        for (tokens, k, e, bm) in [(1, 2, 8, 16), (7, 2, 8, 64), (512, 8, 128, 64)] {
            let len = sorted_len(tokens, k, e, bm);
            assert_eq!(len % bm, 0);
            // Worst case: every expert has a partial block.
            let n = tokens * k;
            let worst: usize = (0..e)
                .map(|i| n / e + usize::from(i < n % e))
                .map(|c| c.div_ceil(bm) * bm)
                .sum();
            assert!(len >= worst, "{tokens} {k} {e} {bm}: {len} < {worst}");
        }
    }
}
