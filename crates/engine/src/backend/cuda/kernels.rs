//! The engine's CUDA kernels (`kernels/engine.cu`), compiled once at start-up by NVRTC for
//! the device's architecture, with the model's head size and GQA group as compile-time
//! constants so the attention kernel keeps its per-lane state in registers.
//!
//! Launch helpers take raw device addresses (`u64`): buffers are allocated once and the
//! same addresses are baked into captured CUDA graphs, so there is nothing to borrow-check
//! per launch and no host work beyond the launch itself.

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::device::{CudaDevice, CudaError};
use crate::backend::Gelu;
use crate::model::config::NormKind;

/// `engine.cu` with the helpers it shares with `moe.cu` in front.
const SOURCE: &str = concat!(
    include_str!("kernels/common.cu"),
    include_str!("kernels/engine.cu")
);

/// Query tokens per block of `prefill_attention` (`QT` in engine.cu).
pub const PREFILL_TILE: usize = 8;

/// Device address of a buffer.
pub type DevPtr = u64;

/// Query positions per block of the flash kernels (`FA_BQ` in engine.cu).
pub const FLASH_QUERY_TILE: usize = 64;

/// Dynamic shared memory of the flash kernels for `head_dim`: two stages of a K and a V
/// tile of 64 keys, rows padded by 8 (`FA_BK`, `FA_ROW` and the stages of
/// `flash_attention_tile` in engine.cu).
pub fn flash_smem_bytes(head_dim: usize) -> usize {
    2 * 2 * 64 * (head_dim + 8) * 2
}

/// Warps per block of `decode_attention` (`DA_WARPS` in engine.cu), each on one (work
/// item, KV head).
pub const DECODE_WARPS_PER_BLOCK: usize = 4;

/// Dynamic shared memory of `decode_attention_pipe` for `head_dim`: per warp, a ring of
/// three 16-key tiles of K and of V, rows of `head_dim / 8` 16-byte chunks, padded to 4
/// mod 8 chunks where that is not a multiple of 8 (`DA_STAGES`, `DA_RS` in engine.cu).
pub fn decode_pipe_smem_bytes(head_dim: usize) -> usize {
    let chunks = head_dim / 8;
    let row = if chunks.is_multiple_of(8) {
        chunks
    } else {
        chunks + (4 + 8 - chunks % 8) % 8
    };
    DECODE_WARPS_PER_BLOCK * 3 * 2 * 16 * row * 16
}

/// Where `decode_attention` puts the partial results of tokens split over several work
/// items: fp32 `[items, kv_heads, group, head_dim]` outputs and `[items, kv_heads, group]`
/// (max, sum) pairs, for up to the capacity the buffers were sized for; and one i32
/// counter per (decode slot, KV head), zero between launches (the warp that merges a
/// token resets it).
#[derive(Debug, Clone, Copy)]
pub struct DecodePartials {
    pub o: DevPtr,
    pub ml: DevPtr,
    pub counters: DevPtr,
}

/// The decode attention kernel a decode step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKernel {
    /// `paged_attention`: one block per (token, KV head), warps split the keys (the
    /// former kernel, kept as the reference).
    Paged,
    /// `decode_attention`: split over the context, tensor cores, one warp per work item.
    Split,
    /// `decode_attention_pipe`: the same work and arithmetic, K/V tiles copied by
    /// `cp.async` into shared memory two tiles ahead of the one computed (measured
    /// against `Split` before it becomes the default; `COLOCATE_DECODE_ATTENTION=pipelined`).
    Pipelined,
}

impl DecodeKernel {
    /// Whether the kernel is a split one (work items, partials, merge).
    pub fn is_split(self) -> bool {
        matches!(self, DecodeKernel::Split | DecodeKernel::Pipelined)
    }

    /// The split kernel `COLOCATE_DECODE_ATTENTION` names (`split`, the default, or
    /// `pipelined`); anything else is an error that says what it accepts.
    pub fn split_from_env() -> Result<DecodeKernel, String> {
        match std::env::var("COLOCATE_DECODE_ATTENTION").as_deref() {
            Err(_) | Ok("split") => Ok(DecodeKernel::Split),
            Ok("pipelined") => Ok(DecodeKernel::Pipelined),
            Ok(other) => Err(format!(
                "COLOCATE_DECODE_ATTENTION={other:?}: expected split or pipelined"
            )),
        }
    }
}

/// The RoPE cos/sin table on the device: `(cos, sin)` fp32 pairs, `head_dim / 2` per
/// position, built on the host from the model's inverse frequencies (its RoPE scaling
/// included; see the executor).
#[derive(Clone, Copy)]
pub struct RopeTable {
    pub ptr: DevPtr,
    /// Positions covered; later ones are computed in the kernel from `inv_freq`.
    pub positions: usize,
    /// The `head_dim / 2` fp32 inverse frequencies.
    pub inv_freq: DevPtr,
}

/// How a norm kernel normalises a row: RMSNorm or LayerNorm (the layout's [`NormKind`]),
/// and whether the normalised row replaces the residual stream (a post-norm encoder, whose
/// stream is each norm's output) or the stream keeps the sum (the pre-norm decoders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormMode {
    pub kind: NormKind,
    pub write_back: bool,
}

impl NormMode {
    /// A pre-norm decoder's norm of `kind`: the stream keeps the sum.
    pub fn pre(kind: NormKind) -> Self {
        Self {
            kind,
            write_back: false,
        }
    }

    /// The mode bits `engine.cu` reads (`NORM_LAYER`, `NORM_WRITE_BACK`).
    fn bits(self) -> i32 {
        i32::from(self.kind == NormKind::Layer) | (i32::from(self.write_back) << 1)
    }
}

/// The compiled kernel set of one model shape.
pub struct Kernels {
    stream: Arc<CudaStream>,
    embed_gather: CudaFunction,
    add_norm: CudaFunction,
    norm_rows_f32: CudaFunction,
    mean_rows_f32: CudaFunction,
    qk_norm_rope_kv: CudaFunction,
    silu_mul: CudaFunction,
    bias_gelu: CudaFunction,
    paged_attention: CudaFunction,
    prefill_attention: CudaFunction,
    /// Present when the head size is a multiple of 16 (the tensor-core tile).
    flash: Option<FlashAttention>,
    /// Split decode attention: present when the head size is a multiple of 16 and the
    /// GQA group at most 8 (the tensor-core tile's columns).
    decode_attention: Option<SplitDecode>,
    argmax_rows: CudaFunction,
    fill_uniform: CudaFunction,
    head_dim: usize,
    group: usize,
}

/// The two entry points of the split decode attention: K/V through registers
/// (`decode_attention`) or through a shared-memory ring (`decode_attention_pipe`).
struct SplitDecode {
    registers: CudaFunction,
    pipelined: CudaFunction,
    /// Dynamic shared memory of `pipelined` ([`decode_pipe_smem_bytes`]).
    pipe_smem: u32,
}

/// The two entry points of the tensor-core attention (`flash_attention_tile` in
/// engine.cu): K/V read from the projection (embeddings), or from the paged cache (the
/// generators' prefill chunks).
struct FlashAttention {
    embed: CudaFunction,
    prefill: CudaFunction,
    /// Dynamic shared memory of either ([`flash_smem_bytes`]).
    smem: u32,
}

/// Include folders tried for `cuda_bf16.h` (NVRTC also ships built-in copies in CUDA 12+).
fn include_paths() -> Vec<String> {
    let mut v = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            v.push(format!("{p}/include"));
        }
    }
    v.push("/usr/local/cuda/include".to_string());
    v.dedup();
    v.into_iter()
        .filter(|p| std::path::Path::new(p).is_dir())
        .collect()
}

pub(super) fn launch_err(source: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver {
        what: "kernel launch",
        source,
    }
}

/// Compiles `source` (named `name` in errors) to PTX for `arch` (e.g. `sm_90`) with
/// `options` besides the architecture. Needs only NVRTC, no GPU.
pub(super) fn compile_ptx(
    arch: &str,
    name: &str,
    source: &str,
    options: Vec<String>,
) -> Result<Ptx, CudaError> {
    let opts = CompileOptions {
        include_paths: include_paths(),
        options: [vec![format!("--gpu-architecture={arch}")], options].concat(),
        name: Some(name.to_string()),
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| CudaError::Compile {
        arch: arch.to_string(),
        message: e.to_string(),
    })
}

/// Loads compiled kernels on `dev`; the function returned finds one by name.
pub(super) fn load_module(
    dev: &CudaDevice,
    ptx: Ptx,
) -> Result<impl Fn(&str) -> Result<CudaFunction, CudaError>, CudaError> {
    let module = dev
        .ctx
        .load_module(ptx)
        .map_err(|source| CudaError::Driver {
            what: "loading the compiled kernels",
            source,
        })?;
    Ok(move |name: &str| {
        module
            .load_function(name)
            .map_err(|source| CudaError::Driver {
                what: "finding a kernel",
                source,
            })
    })
}

/// `func` allowed `bytes` of dynamic shared memory: above 48 KiB a kernel must be.
pub(super) fn allow_smem(func: CudaFunction, bytes: usize) -> Result<CudaFunction, CudaError> {
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map(|_| func)
    .map_err(|source| CudaError::Driver {
        what: "allowing a kernel its shared memory",
        source,
    })
}

/// Blocks per multiprocessor the flash kernels' registers are capped for
/// (`__launch_bounds__`' second argument, `FA_MIN_BLOCKS` in engine.cu) unless
/// `COLOCATE_FLASH_MIN_BLOCKS` says otherwise: 3 keeps the 168 registers of the kernel
/// before its pipeline (12 warps a multiprocessor), at 48 bytes of spills for head size
/// 128; 2 lets it keep everything in 179 registers (8 warps).
const FLASH_MIN_BLOCKS: usize = 3;

/// Compiles `kernels/engine.cu` to PTX for `arch` (e.g. `sm_90`) with the attention
/// shape baked in. Needs only NVRTC, no GPU.
pub fn compile_source(arch: &str, head_dim: usize, group: usize) -> Result<Ptx, CudaError> {
    let min_blocks = std::env::var("COLOCATE_FLASH_MIN_BLOCKS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| (1..=8).contains(&n))
        .unwrap_or(FLASH_MIN_BLOCKS);
    compile_ptx(
        arch,
        "engine.cu",
        SOURCE,
        vec![
            format!("-DHEAD_DIM={head_dim}"),
            format!("-DGQA={group}"),
            format!("-DFA_MIN_BLOCKS={min_blocks}"),
            "--use_fast_math".to_string(),
        ],
    )
}

impl Kernels {
    /// Compiles the kernels for `dev`'s architecture and a model with `head_dim` and
    /// `group` query heads per KV head. Takes about 100 ms.
    pub fn compile(dev: &CudaDevice, head_dim: usize, group: usize) -> Result<Self, CudaError> {
        if head_dim > 256 || !head_dim.is_multiple_of(4) || group == 0 || group > 16 {
            return Err(CudaError::Compile {
                arch: dev.arch.clone(),
                message: format!("unsupported attention shape: head_dim {head_dim}, group {group}"),
            });
        }
        let f = load_module(dev, compile_source(&dev.arch, head_dim, group)?)?;
        Ok(Self {
            stream: dev.stream.clone(),
            embed_gather: f("embed_gather")?,
            add_norm: f("add_norm")?,
            norm_rows_f32: f("norm_rows_f32")?,
            mean_rows_f32: f("mean_rows_f32")?,
            qk_norm_rope_kv: f("qk_norm_rope_kv")?,
            silu_mul: f("silu_mul")?,
            bias_gelu: f("bias_gelu")?,
            paged_attention: f("paged_attention")?,
            prefill_attention: f("prefill_attention")?,
            flash: if head_dim.is_multiple_of(16) {
                let smem = flash_smem_bytes(head_dim);
                Some(FlashAttention {
                    embed: allow_smem(f("embed_flash_attention")?, smem)?,
                    prefill: allow_smem(f("prefill_flash_attention")?, smem)?,
                    smem: smem as u32,
                })
            } else {
                None
            },
            decode_attention: if head_dim.is_multiple_of(16) && group <= 8 {
                let smem = decode_pipe_smem_bytes(head_dim);
                Some(SplitDecode {
                    registers: f("decode_attention")?,
                    pipelined: allow_smem(f("decode_attention_pipe")?, smem)?,
                    pipe_smem: smem as u32,
                })
            } else {
                None
            },
            argmax_rows: f("argmax_rows")?,
            fill_uniform: f("fill_uniform")?,
            head_dim,
            group,
        })
    }

    pub(super) fn cfg(grid: (u32, u32), block: u32, smem: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem,
        }
    }

    /// residual[t] = table[ids[t]] in fp32, plus `positions`' rows of `pos_table` (the row
    /// of position 0 first; 0 for none: RoPE models) and the row `add_row` (0 for none: an
    /// encoder's token type 0).
    #[allow(clippy::too_many_arguments)]
    pub fn embed_gather(
        &self,
        table: DevPtr,
        ids: DevPtr,
        residual: DevPtr,
        rows: usize,
        hidden: usize,
        pos_table: DevPtr,
        positions: DevPtr,
        add_row: DevPtr,
    ) -> Result<(), CudaError> {
        let h = hidden as i32;
        let mut b = self.stream.launch_builder(&self.embed_gather);
        b.arg(&table)
            .arg(&ids)
            .arg(&residual)
            .arg(&h)
            .arg(&pos_table)
            .arg(&positions)
            .arg(&add_row);
        unsafe { b.launch(Self::cfg((rows as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// residual += delta (when `delta != 0`) + `delta_bias` (a `[hidden]` bias broadcast
    /// over the rows, when not 0: the bias of the projection that produced `delta`);
    /// out = norm(residual) * w (+ `norm_bias` when not 0), RMSNorm or LayerNorm as `mode`
    /// says, which also says whether the normalised row replaces the residual. With
    /// `rows != 0`, output row r normalises input row rows[r] (and `delta` must be 0, the
    /// residual kept).
    #[allow(clippy::too_many_arguments)]
    pub fn add_norm(
        &self,
        residual: DevPtr,
        delta: DevPtr,
        delta_bias: DevPtr,
        w: DevPtr,
        norm_bias: DevPtr,
        out: DevPtr,
        rows_map: DevPtr,
        rows: usize,
        hidden: usize,
        eps: f32,
        mode: NormMode,
    ) -> Result<(), CudaError> {
        let (h, m) = (hidden as i32, mode.bits());
        let mut b = self.stream.launch_builder(&self.add_norm);
        b.arg(&residual)
            .arg(&delta)
            .arg(&delta_bias)
            .arg(&w)
            .arg(&norm_bias)
            .arg(&out)
            .arg(&rows_map)
            .arg(&h)
            .arg(&eps)
            .arg(&m);
        unsafe { b.launch(Self::cfg((rows as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// out[r] = norm(residual[rows[r]]) * w (+ `norm_bias` when not 0) in fp32, RMSNorm or
    /// LayerNorm as `kind` says (last-token pooling).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_rows_f32(
        &self,
        residual: DevPtr,
        w: DevPtr,
        norm_bias: DevPtr,
        out: DevPtr,
        rows_map: DevPtr,
        rows: usize,
        hidden: usize,
        eps: f32,
        kind: NormKind,
    ) -> Result<(), CudaError> {
        let (h, m) = (hidden as i32, NormMode::pre(kind).bits());
        let mut b = self.stream.launch_builder(&self.norm_rows_f32);
        b.arg(&residual)
            .arg(&w)
            .arg(&norm_bias)
            .arg(&out)
            .arg(&rows_map)
            .arg(&h)
            .arg(&eps)
            .arg(&m);
        unsafe { b.launch(Self::cfg((rows as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// out[r] = the mean of residual rows `rows_map[r] - positions[rows_map[r]] ..=
    /// rows_map[r]` in fp32 (mean pooling of the embedding path, whose sequences start at
    /// position 0 and end at their row of `rows_map`).
    pub fn mean_rows_f32(
        &self,
        residual: DevPtr,
        out: DevPtr,
        rows_map: DevPtr,
        positions: DevPtr,
        rows: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        let h = hidden as i32;
        let mut b = self.stream.launch_builder(&self.mean_rows_f32);
        b.arg(&residual)
            .arg(&out)
            .arg(&rows_map)
            .arg(&positions)
            .arg(&h);
        unsafe { b.launch(Self::cfg((rows as u32, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// The epilogue of the fused q/k/v projection, in place on `qkv`: the q/k/v bias
    /// (`bias`, `[(nq + 2 nkv) * head_dim]`; 0 for none), per-head q/k RMSNorm with `qw` /
    /// `kw` (0 for none: the families without q/k norm), RoPE from `rope` (`None`: learned
    /// positions, no rotation); K/V written to the caches by slot (not at all when
    /// `kcache` is 0).
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope_kv(
        &self,
        qkv: DevPtr,
        bias: DevPtr,
        qw: DevPtr,
        kw: DevPtr,
        positions: DevPtr,
        slots: DevPtr,
        kcache: DevPtr,
        vcache: DevPtr,
        rope: Option<&RopeTable>,
        tokens: usize,
        nq: usize,
        nkv: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (nq_, nkv_, d) = (nq as i32, nkv as i32, self.head_dim as i32);
        let none = RopeTable {
            ptr: 0,
            positions: 0,
            inv_freq: 0,
        };
        let rope = rope.unwrap_or(&none);
        let rope_len = rope.positions as i32;
        let warps = (nq + 2 * nkv).min(32) as u32;
        let mut b = self.stream.launch_builder(&self.qk_norm_rope_kv);
        b.arg(&qkv)
            .arg(&bias)
            .arg(&qw)
            .arg(&kw)
            .arg(&positions)
            .arg(&slots)
            .arg(&kcache)
            .arg(&vcache)
            .arg(&rope.ptr)
            .arg(&rope_len)
            .arg(&rope.inv_freq);
        b.arg(&nq_).arg(&nkv_).arg(&d).arg(&eps);
        unsafe { b.launch(Self::cfg((tokens as u32, 1), warps * 32, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// out = silu(gate) * up from the fused [T, 2I] projection.
    pub fn silu_mul(
        &self,
        gu: DevPtr,
        out: DevPtr,
        tokens: usize,
        inter: usize,
    ) -> Result<(), CudaError> {
        let total = tokens * inter;
        let (i, n) = (inter as i32, total as i32);
        let mut b = self.stream.launch_builder(&self.silu_mul);
        b.arg(&gu).arg(&out).arg(&i).arg(&n);
        let blocks = total.div_ceil(2 * 256) as u32;
        unsafe { b.launch(Self::cfg((blocks, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// out = gelu(x + bias) over `[tokens, width]` (`bias` `[width]`, 0 for none), in the
    /// form `kind` says.
    pub fn bias_gelu(
        &self,
        x: DevPtr,
        bias: DevPtr,
        out: DevPtr,
        tokens: usize,
        width: usize,
        kind: Gelu,
    ) -> Result<(), CudaError> {
        let total = tokens * width;
        let (w, n, tanh) = (width as i32, total as i32, i32::from(kind == Gelu::Tanh));
        let mut b = self.stream.launch_builder(&self.bias_gelu);
        b.arg(&x).arg(&bias).arg(&out).arg(&w).arg(&n).arg(&tanh);
        let blocks = total.div_ceil(2 * 256) as u32;
        unsafe { b.launch(Self::cfg((blocks, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// Paged causal attention for every token of the step (prefill and decode alike): one
    /// block per (token, KV head). Decode steps use [`Self::decode_attention`] where it
    /// exists; this one stays as the reference the benchmark compares with.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        qkv: DevPtr,
        out: DevPtr,
        kcache: DevPtr,
        vcache: DevPtr,
        block_tables: DevPtr,
        max_blocks: usize,
        seq_of: DevPtr,
        positions: DevPtr,
        tokens: usize,
        block_size: usize,
        nkv: usize,
    ) -> Result<(), CudaError> {
        let warps: u32 = 8;
        let smem = warps as usize * self.group * (self.head_dim + 2) * 4;
        let scale = 1.0f32 / (self.head_dim as f32).sqrt();
        let (mb, bs, nkv_) = (max_blocks as i32, block_size as i32, nkv as i32);
        let mut b = self.stream.launch_builder(&self.paged_attention);
        b.arg(&qkv)
            .arg(&out)
            .arg(&kcache)
            .arg(&vcache)
            .arg(&block_tables)
            .arg(&mb);
        b.arg(&seq_of)
            .arg(&positions)
            .arg(&bs)
            .arg(&nkv_)
            .arg(&scale);
        unsafe {
            b.launch(Self::cfg(
                (tokens as u32, nkv as u32),
                warps * 32,
                smem as u32,
            ))
        }
        .map(|_| ())
        .map_err(launch_err)
    }

    /// Tiled prefill attention: `tiles` tiles of up to 8 query tokens of one sequence each
    /// (`tile_start`/`tile_len` from the step metadata).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        qkv: DevPtr,
        out: DevPtr,
        kcache: DevPtr,
        vcache: DevPtr,
        block_tables: DevPtr,
        max_blocks: usize,
        seq_of: DevPtr,
        positions: DevPtr,
        tile_start: DevPtr,
        tile_len: DevPtr,
        tiles: usize,
        block_size: usize,
        nkv: usize,
    ) -> Result<(), CudaError> {
        let scale = 1.0f32 / (self.head_dim as f32).sqrt();
        let (mb, bs, nkv_) = (max_blocks as i32, block_size as i32, nkv as i32);
        let mut b = self.stream.launch_builder(&self.prefill_attention);
        b.arg(&qkv)
            .arg(&out)
            .arg(&kcache)
            .arg(&vcache)
            .arg(&block_tables)
            .arg(&mb);
        b.arg(&seq_of)
            .arg(&positions)
            .arg(&tile_start)
            .arg(&tile_len)
            .arg(&bs)
            .arg(&nkv_)
            .arg(&scale);
        unsafe {
            b.launch(Self::cfg(
                (tiles as u32, nkv as u32),
                PREFILL_TILE as u32 * 32,
                0,
            ))
        }
        .map(|_| ())
        .map_err(launch_err)
    }

    /// Whether the split decode attention (`decode_attention`) exists for this shape.
    pub fn has_decode_attention(&self) -> bool {
        self.decode_attention.is_some()
    }

    /// Split decode attention for `slots` decode tokens (one per sequence) of a step:
    /// one warp per (work item, KV head) over `items_cap` work items (the step's own count
    /// is on the device, in `item_first[slots]`; slot s is token row `dec_rows[s]`); the
    /// last warp of a split token merges its partial results. The launch shape depends
    /// only on `slots` and `items_cap`, so it can be captured. `pipelined` picks
    /// `decode_attention_pipe` ([`DecodeKernel::Pipelined`]).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        pipelined: bool,
        qkv: DevPtr,
        out: DevPtr,
        kcache: DevPtr,
        vcache: DevPtr,
        block_tables: DevPtr,
        max_blocks: usize,
        seq_of: DevPtr,
        work: DevPtr,
        item_first: DevPtr,
        dec_rows: DevPtr,
        part: DecodePartials,
        slots: usize,
        items_cap: usize,
        block_size: usize,
        nkv: usize,
    ) -> Result<(), CudaError> {
        let split = self
            .decode_attention
            .as_ref()
            .ok_or_else(|| CudaError::Compile {
                arch: String::new(),
                message: format!(
                    "no split decode attention for head_dim {} group {}",
                    self.head_dim, self.group
                ),
            })?;
        let (f, smem) = if pipelined {
            (&split.pipelined, split.pipe_smem)
        } else {
            (&split.registers, 0)
        };
        let scale_log2 = std::f32::consts::LOG2_E / (self.head_dim as f32).sqrt();
        let (mb, t, bs, nkv_) = (
            max_blocks as i32,
            slots as i32,
            block_size as i32,
            nkv as i32,
        );
        let mut b = self.stream.launch_builder(f);
        b.arg(&qkv)
            .arg(&out)
            .arg(&kcache)
            .arg(&vcache)
            .arg(&block_tables)
            .arg(&mb)
            .arg(&seq_of)
            .arg(&work)
            .arg(&item_first)
            .arg(&dec_rows);
        b.arg(&part.o)
            .arg(&part.ml)
            .arg(&part.counters)
            .arg(&t)
            .arg(&bs)
            .arg(&nkv_)
            .arg(&scale_log2);
        // One warp per (item, KV head), the heads of an item adjacent (engine.cu).
        let blocks = (items_cap * nkv).div_ceil(DECODE_WARPS_PER_BLOCK).max(1) as u32;
        unsafe {
            b.launch(Self::cfg(
                (blocks, 1),
                DECODE_WARPS_PER_BLOCK as u32 * 32,
                smem,
            ))
        }
        .map(|_| ())
        .map_err(launch_err)
    }

    /// Whether the flash kernels (`embed_flash_attention`, `prefill_flash_attention`)
    /// exist for this head size.
    pub fn has_flash_attention(&self) -> bool {
        self.flash.is_some()
    }

    fn flash(&self) -> Result<&FlashAttention, CudaError> {
        self.flash.as_ref().ok_or_else(|| CudaError::Compile {
            arch: String::new(),
            message: format!("no flash attention for head_dim {}", self.head_dim),
        })
    }

    /// Tensor-core attention of the embedding path over `tiles` query tiles (`tiles_meta`:
    /// three ints per tile, see engine.cu), causal (decoders) or bidirectional within each
    /// sequence (encoders); K/V are read from `qkv`.
    #[allow(clippy::too_many_arguments)]
    pub fn embed_flash_attention(
        &self,
        qkv: DevPtr,
        out: DevPtr,
        tiles_meta: DevPtr,
        tiles: usize,
        nq: usize,
        nkv: usize,
        causal: bool,
    ) -> Result<(), CudaError> {
        let fa = self.flash()?;
        let f = &fa.embed;
        let scale_log2 = std::f32::consts::LOG2_E / (self.head_dim as f32).sqrt();
        let (nkv_, causal) = (nkv as i32, i32::from(causal));
        let mut b = self.stream.launch_builder(f);
        b.arg(&qkv)
            .arg(&out)
            .arg(&tiles_meta)
            .arg(&nkv_)
            .arg(&scale_log2)
            .arg(&causal);
        unsafe { b.launch(Self::cfg((tiles as u32, nq as u32), 128, fa.smem)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// Tensor-core causal attention of a step's prompt chunks over the paged cache (the
    /// chunks' own K/V already written there): `tiles` tiles of up to 64 queries, five ints
    /// each at `tiles_meta` (`StepLayout::flash`).
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_flash_attention(
        &self,
        qkv: DevPtr,
        out: DevPtr,
        kcache: DevPtr,
        vcache: DevPtr,
        block_tables: DevPtr,
        max_blocks: usize,
        tiles_meta: DevPtr,
        tiles: usize,
        block_size: usize,
        nq: usize,
        nkv: usize,
    ) -> Result<(), CudaError> {
        let fa = self.flash()?;
        let f = &fa.prefill;
        let scale_log2 = std::f32::consts::LOG2_E / (self.head_dim as f32).sqrt();
        let (mb, bs, nkv_) = (max_blocks as i32, block_size as i32, nkv as i32);
        let mut b = self.stream.launch_builder(f);
        b.arg(&qkv)
            .arg(&out)
            .arg(&kcache)
            .arg(&vcache)
            .arg(&block_tables)
            .arg(&mb)
            .arg(&tiles_meta)
            .arg(&bs)
            .arg(&nkv_)
            .arg(&scale_log2);
        unsafe { b.launch(Self::cfg((tiles as u32, nq as u32), 128, fa.smem)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// out[r] = argmax(logits[r]) over fp32 logits.
    pub fn argmax_rows(
        &self,
        logits: DevPtr,
        out: DevPtr,
        rows: usize,
        vocab: usize,
    ) -> Result<(), CudaError> {
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(&self.argmax_rows);
        b.arg(&logits).arg(&out).arg(&v);
        unsafe { b.launch(Self::cfg((rows as u32, 1), 1024, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }

    /// Fills `n` bf16 values with offset + uniform(-a, a) from `seed` (dummy weights).
    pub fn fill_uniform(
        &self,
        out: DevPtr,
        n: usize,
        seed: u64,
        a: f32,
        offset: f32,
    ) -> Result<(), CudaError> {
        let n_ = n as u64;
        let mut b = self.stream.launch_builder(&self.fill_uniform);
        b.arg(&out).arg(&n_).arg(&seed).arg(&a).arg(&offset);
        let blocks = n.div_ceil(256).min(65_536) as u32;
        unsafe { b.launch(Self::cfg((blocks, 1), 256, 0)) }
            .map(|_| ())
            .map_err(launch_err)
    }
}
