//! The decoders on the GPU (Qwen3, Qwen3-MoE, Qwen2/Qwen2.5, Llama, Mistral, GPT-2 and
//! DistilGPT2): the CUDA model beside the portable one (`decoder.rs` with the `qwen3.rs`
//! and `gpt2.rs` loaders), as text-embeddings-inference keeps `flash_qwen3.rs` beside
//! `qwen3.rs`. Same config ([`ModelConfig`]), same family options ([`DecoderLayout`],
//! decided once by [`ModelConfig::layout`]: q/k norm, q/k/v and o biases, RMSNorm or
//! LayerNorm, RoPE or learned positions, a SiLU-gated or a GELU MLP), same weight reader
//! ([`WeightSource`], same parameter names) as the CPU model; the step builder, the
//! sampling rule, the KV cache, the RoPE table (the config's inverse frequencies, scaling
//! included) and the decode graphs come with the executor that runs it ([`CudaExecutor`]).
//! What is this file's own is the device layout and the forward pass:
//! - weights in bf16 with q/k/v fused into one `[(nq + 2 nkv) * D, H]` matrix (and their
//!   biases into one `[(nq + 2 nkv) * D]` vector) and gate/up into one `[2 I, H]` matrix
//!   (a GELU MLP's `fc` alone, `[I, H]`), so a layer runs 4 GEMMs (cuBLAS, or the
//!   cuBLASLt algorithm the executor timed fastest for the decode shape: `gemm_specs`); a
//!   mixture of experts' sparse layers run the block of `moe_cuda` in place of the MLP
//!   (experts in FP8 where the checkpoint has them so); GPT-2's `Conv1D` weights are
//!   stored `[in, out]` and read transposed, `c_attn` being q/k/v fused already;
//! - per layer: add + norm (RMSNorm, or LayerNorm with its bias) -> qkv GEMM -> q/k/v bias +
//!   q/k norm + RoPE + KV write (each of bias, norm and rotation where the layout has it)
//!   -> attention (split decode, paged prefill tiles, or flash for embeddings) -> o GEMM
//!   -> add (+ o bias) + norm -> gate_up GEMM -> SiLU*up (or fc GEMM -> fc bias + GELU)
//!   -> down GEMM (its bias, where it has one, added by the next norm); then the final
//!   norm of the output rows and the LM head + argmax, or the pooled rows. The token
//!   embedding gathers the learned position row too where the layout has one. The
//!   residual stream is fp32; everything else bf16 with fp32 accumulation.
//!
//! An encoder (BERT and kin) has no decoder layout and is refused by [`cuda_layout`]
//! before any device is opened: `encoder_cuda` runs those.
//!
//! The CPU model is the reference: `tests/cuda_engine.rs` (feature `gpu-tests`) compares
//! both with transformers' outputs for the tiny Qwen3, Qwen3-MoE (bf16 and FP8), Llama,
//! Qwen2 and GPT-2 fixtures, and with each other.

use anyhow::{anyhow, bail};
use half::bf16;

use crate::backend::cuda::buffer::DevBuf;
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::executor::{
    CudaExecutor, CudaModel, ForwardCtx, Outputs, Pass, SplitDecodePass,
};
use crate::backend::cuda::gemm::{GemmSpec, OutType};
use crate::backend::cuda::kernels::{DevPtr, Kernels, NormMode};
use crate::backend::cuda::moe_kernels::MoeTile;
use crate::backend::cuda::profile::Launcher;
use crate::backend::cuda::step::CudaOptions;
use crate::model::config::{Arch, DecoderLayout, MlpKind, ModelConfig, NormKind, PositionKind};
use crate::model::moe_cuda::{CudaMoe, MoeStep, SparseLayer};
use crate::model::qwen3::param_names;
use crate::model_api::{ModelInfo, Task};
use crate::weights::{SafetensorsFiles, WeightSource};

/// Bytes per bf16 element.
const BF16: usize = 2;

/// Half-width of the uniform that dummy linear weights are drawn from: 0.02 x sqrt(3), a
/// std of 0.02 (Hugging Face's initializer range).
pub(crate) fn dummy_range() -> f32 {
    0.02f32 * 3f32.sqrt()
}

/// New device buffers of seeded uniform bf16 values, a seed of their own for each in the
/// order they are made: the dummy weights (`--load-format dummy`) of every CUDA model.
pub(crate) struct DummyFill<'a> {
    dev: &'a CudaDevice,
    kernels: &'a Kernels,
    seed: u64,
    made: std::cell::Cell<u64>,
}

impl<'a> DummyFill<'a> {
    pub(crate) fn new(dev: &'a CudaDevice, kernels: &'a Kernels, seed: u64) -> Self {
        Self {
            dev,
            kernels,
            seed,
            made: std::cell::Cell::new(0),
        }
    }

    /// The next buffer's seed (for fills of other kinds, such as FP8 experts).
    pub(crate) fn next_seed(&self) -> u64 {
        self.made.set(self.made.get() + 1);
        self.seed
            .wrapping_mul(0x2545_F491_4F6C_DD1D)
            .wrapping_add(self.made.get().wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// `elems` values uniform in `offset ± amp`.
    pub(crate) fn fill(&self, elems: usize, amp: f32, offset: f32) -> anyhow::Result<DevBuf> {
        let seed = self.next_seed();
        let b = DevBuf::alloc(self.dev, elems * BF16)?;
        self.kernels.fill_uniform(b.ptr, elems, seed, amp, offset)?;
        Ok(b)
    }
}

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
    /// Rows of the learned position table (GPT-2's `wpe`).
    positions: usize,
    eps: f32,
    /// Width of a dense MLP's first GEMM: gate and up (`2 I`), or a GELU MLP's `fc` (`I`).
    up_width: usize,
}

impl Dims {
    fn of(c: &ModelConfig, layout: &DecoderLayout) -> Self {
        Self {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            positions: c.max_position_embeddings,
            eps: c.norm_eps as f32,
            up_width: match layout.mlp {
                MlpKind::SiluGated => 2 * c.intermediate_size,
                MlpKind::Gelu(_) => c.intermediate_size,
            },
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

/// What the CUDA model runs: every decoder, with the options of its layout (Qwen3,
/// Qwen3-MoE, Qwen2, Llama, Mistral, GPT-2: which family has which option is the config's
/// [`ModelConfig::layout`]). An encoder has none and is an error naming the architecture
/// and the model that runs it, before any device is opened.
pub fn cuda_layout(config: &ModelConfig) -> anyhow::Result<DecoderLayout> {
    config.layout().ok_or_else(|| {
        anyhow!(
            "--device cuda: the {} architecture is an encoder, which the CUDA decoder model does not run (the CUDA encoder does: model::encoder_cuda, --task embed)",
            config.arch.name()
        )
    })
}

/// A norm's weight, and its bias for a LayerNorm.
struct NormWeights {
    w: DevBuf,
    b: Option<DevBuf>,
}

impl NormWeights {
    fn bias(&self) -> DevPtr {
        ptr_or_null(&self.b)
    }

    fn bytes(&self) -> usize {
        self.w.bytes + self.b.as_ref().map_or(0, |b| b.bytes)
    }
}

/// One decoder layer, in the fused layout; `None` where the layout has no such weight.
struct LayerWeights {
    input_norm: NormWeights,
    qkv: DevBuf,
    /// The q, k and v biases concatenated, `[(nq + 2 nkv) * D]`.
    qkv_bias: Option<DevBuf>,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    o_proj: DevBuf,
    o_bias: Option<DevBuf>,
    post_norm: NormWeights,
    mlp: Mlp,
}

impl LayerWeights {
    /// The bias of the MLP's last projection (GPT-2's `mlp.c_proj`), added to the
    /// residual by the next norm; 0 for none.
    fn down_bias(&self) -> DevPtr {
        match &self.mlp {
            Mlp::Dense { down_bias, .. } => ptr_or_null(down_bias),
            Mlp::Sparse(_) => 0,
        }
    }
}

/// A layer's MLP: dense (gate and up fused into one `[2 I, H]` matrix, or a GELU MLP's
/// `fc` `[I, H]`; the biases of a GELU MLP), or a mixture of experts' sparse block.
#[allow(clippy::large_enum_variant)] // one per layer
enum Mlp {
    Dense {
        up: DevBuf,
        up_bias: Option<DevBuf>,
        down: DevBuf,
        down_bias: Option<DevBuf>,
    },
    Sparse(Box<SparseLayer>),
}

impl Mlp {
    fn bytes(&self) -> usize {
        match self {
            Mlp::Dense {
                up,
                up_bias,
                down,
                down_bias,
            } => {
                up.bytes
                    + down.bytes
                    + [up_bias, down_bias]
                        .iter()
                        .map(|b| b.as_ref().map_or(0, |b| b.bytes))
                        .sum::<usize>()
            }
            Mlp::Sparse(s) => s.bytes(),
        }
    }
}

/// A weight's address, 0 (what the kernels read as "none") when absent.
fn ptr_or_null(b: &Option<DevBuf>) -> DevPtr {
    b.as_ref().map_or(0, |b| b.ptr)
}

/// The whole model's weights on the device.
struct Weights {
    embed: DevBuf,
    /// The learned position table (GPT-2's `wpe`); `None` for RoPE models.
    embed_positions: Option<DevBuf>,
    layers: Vec<LayerWeights>,
    norm: NormWeights,
    /// `None` when tied to `embed`, or not loaded (embedders).
    lm_head: Option<DevBuf>,
}

impl Weights {
    /// Loads from `src` the weights `layout` has (the sparse layers' from `moe`'s), by the
    /// checkpoint naming of `arch` (GPT-2's, or the Qwen3 lineage's); `with_lm_head` is
    /// false for embedders.
    #[allow(clippy::too_many_arguments)]
    fn load(
        dev: &CudaDevice,
        k: &Kernels,
        d: &Dims,
        layout: &DecoderLayout,
        arch: Arch,
        moe: Option<&CudaMoe>,
        tied: bool,
        src: &WeightSource,
        with_lm_head: bool,
    ) -> anyhow::Result<Self> {
        let lm_head = with_lm_head && !tied;
        match src {
            WeightSource::Dummy { seed } => Self::dummy(dev, k, d, layout, moe, *seed, lm_head),
            WeightSource::Safetensors(st) if arch == Arch::Gpt2 => {
                Self::from_gpt2_safetensors(dev, d, st, lm_head)
            }
            WeightSource::Safetensors(st) => {
                Self::from_safetensors(dev, d, layout, moe, st, lm_head)
            }
        }
    }

    /// The `lm_head` matrix address (the embedding when tied).
    fn lm_head_ptr(&self) -> DevPtr {
        self.lm_head.as_ref().unwrap_or(&self.embed).ptr
    }

    /// The learned position table's address (0 for RoPE models).
    fn positions_ptr(&self) -> DevPtr {
        ptr_or_null(&self.embed_positions)
    }

    /// Device bytes held.
    fn bytes(&self) -> usize {
        let layer = |l: &LayerWeights| {
            [
                Some(&l.qkv),
                l.qkv_bias.as_ref(),
                l.q_norm.as_ref(),
                l.k_norm.as_ref(),
                Some(&l.o_proj),
                l.o_bias.as_ref(),
            ]
            .iter()
            .flatten()
            .map(|b| b.bytes)
            .sum::<usize>()
                + l.input_norm.bytes()
                + l.post_norm.bytes()
                + l.mlp.bytes()
        };
        self.embed.bytes
            + self.embed_positions.as_ref().map_or(0, |b| b.bytes)
            + self.layers.iter().map(layer).sum::<usize>()
            + self.norm.bytes()
            + self.lm_head.as_ref().map_or(0, |b| b.bytes)
    }

    /// Seeded random weights (`--load-format dummy`) of the weights `layout` has, filled by
    /// a GPU kernel at memory speed: linear layers, biases (norms' included) and position
    /// tables uniform with std 0.02 (HF's initializer range), norm weights at 1 ± 0.05. The
    /// same seed gives the same weights (not the CPU backend's values).
    fn dummy(
        dev: &CudaDevice,
        k: &Kernels,
        d: &Dims,
        layout: &DecoderLayout,
        moe: Option<&CudaMoe>,
        seed: u64,
        lm_head: bool,
    ) -> anyhow::Result<Self> {
        let dummy = DummyFill::new(dev, k, seed);
        let a = dummy_range();
        let fill = |elems: usize, amp: f32, offset: f32| dummy.fill(elems, amp, offset);
        let bias = |on: bool, elems: usize| on.then(|| fill(elems, a, 0.0)).transpose();
        let layer_norm = layout.norm == NormKind::Layer;
        let norm = |h: usize| -> anyhow::Result<NormWeights> {
            Ok(NormWeights {
                w: fill(h, 0.05, 1.0)?,
                b: bias(layer_norm, h)?,
            })
        };
        let (h, hd) = (d.hidden, d.head_dim);
        let embed = fill(d.vocab * h, a, 0.0)?;
        let embed_positions = bias(layout.positions == PositionKind::Learned, d.positions * h)?;
        let gelu = matches!(layout.mlp, MlpKind::Gelu(_));
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let input_norm = norm(h)?;
            let qkv = fill(d.qkv_width() * h, a, 0.0)?;
            let qkv_bias = bias(layout.qkv_bias, d.qkv_width())?;
            let (q_norm, k_norm) = match layout.qk_norm {
                true => (Some(fill(hd, 0.05, 1.0)?), Some(fill(hd, 0.05, 1.0)?)),
                false => (None, None),
            };
            let o_proj = fill(h * d.q_width(), a, 0.0)?;
            let o_bias = bias(layout.o_bias, h)?;
            let post_norm = norm(h)?;
            let mlp = match moe.filter(|m| m.is_sparse(l)) {
                Some(m) => Mlp::Sparse(Box::new(m.dummy_layer(
                    dev,
                    &|n| fill(n, a, 0.0),
                    || dummy.next_seed(),
                )?)),
                None => Mlp::Dense {
                    up: fill(d.up_width * h, a, 0.0)?,
                    up_bias: bias(gelu, d.up_width)?,
                    down: fill(h * d.inter, a, 0.0)?,
                    down_bias: bias(gelu, h)?,
                },
            };
            layers.push(LayerWeights {
                input_norm,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj,
                o_bias,
                post_norm,
                mlp,
            });
        }
        let norm = norm(h)?;
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
            embed_positions,
            layers,
            norm,
            lm_head,
        })
    }

    /// A Hugging Face checkpoint of the Qwen3 naming through the shared reader (names with
    /// or without the `model.` prefix, shapes checked against the config), converted to
    /// bf16 on the host one tensor at a time (dequantised first where stored in FP8); q/k/v
    /// (and their biases) and gate/up concatenated row-wise before upload. Biases and q/k
    /// norms are read where `layout` has them; sparse layers' routers and experts by `moe`.
    fn from_safetensors(
        dev: &CudaDevice,
        d: &Dims,
        layout: &DecoderLayout,
        moe: Option<&CudaMoe>,
        st: &SafetensorsFiles,
        lm_head: bool,
    ) -> anyhow::Result<Self> {
        if layout.norm != NormKind::Rms
            || layout.positions != PositionKind::Rope
            || layout.mlp != MlpKind::SiluGated
        {
            bail!("the Qwen3 naming's decoders are RMSNorm, RoPE and SiLU-gated");
        }
        let get = |name: &str, rows: usize, cols: usize| -> anyhow::Result<Vec<bf16>> {
            st.bf16(&param_names(name), rows, cols)
        };
        let up = |data: &[bf16]| DevBuf::upload(dev, data);
        let rms = |name: &str, h: usize| -> anyhow::Result<NormWeights> {
            Ok(NormWeights {
                w: up(&get(name, 1, h)?)?,
                b: None,
            })
        };
        let (h, i, hd) = (d.hidden, d.inter, d.head_dim);
        let (q, kv) = (d.q_width(), d.kv_width());
        let embed = up(&get("embed_tokens.weight", d.vocab, h)?)?;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = |s: &str| format!("layers.{l}.{s}.weight");
            let pb = |s: &str| format!("layers.{l}.{s}.bias");
            let input_norm = rms(&p("input_layernorm"), h)?;
            let mut qkv = get(&p("self_attn.q_proj"), q, h)?;
            qkv.extend(get(&p("self_attn.k_proj"), kv, h)?);
            qkv.extend(get(&p("self_attn.v_proj"), kv, h)?);
            let qkv = up(&qkv)?;
            let qkv_bias = if layout.qkv_bias {
                let mut b = get(&pb("self_attn.q_proj"), 1, q)?;
                b.extend(get(&pb("self_attn.k_proj"), 1, kv)?);
                b.extend(get(&pb("self_attn.v_proj"), 1, kv)?);
                Some(up(&b)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if layout.qk_norm {
                (
                    Some(up(&get(&p("self_attn.q_norm"), 1, hd)?)?),
                    Some(up(&get(&p("self_attn.k_norm"), 1, hd)?)?),
                )
            } else {
                (None, None)
            };
            let o_proj = up(&get(&p("self_attn.o_proj"), h, q)?)?;
            let o_bias = if layout.o_bias {
                Some(up(&get(&pb("self_attn.o_proj"), 1, h)?)?)
            } else {
                None
            };
            let post_norm = rms(&p("post_attention_layernorm"), h)?;
            let mlp = match moe.filter(|m| m.is_sparse(l)) {
                Some(m) => Mlp::Sparse(Box::new(m.layer_from_safetensors(dev, st, l)?)),
                None => {
                    let mut gate_up = get(&p("mlp.gate_proj"), i, h)?;
                    gate_up.extend(get(&p("mlp.up_proj"), i, h)?);
                    Mlp::Dense {
                        up: up(&gate_up)?,
                        up_bias: None,
                        down: up(&get(&p("mlp.down_proj"), h, i)?)?,
                        down_bias: None,
                    }
                }
            };
            layers.push(LayerWeights {
                input_norm,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj,
                o_bias,
                post_norm,
                mlp,
            });
        }
        let norm = rms("norm.weight", h)?;
        let lm_head = untied_lm_head(dev, d, st, lm_head)?;
        Ok(Self {
            embed,
            embed_positions: None,
            layers,
            norm,
            lm_head,
        })
    }

    /// A GPT-2 checkpoint by the names the CPU loader reads (`model::gpt2`: with or without
    /// the `transformer.` prefix): `wte`, `wpe`, per layer `ln_1`, `attn.c_attn`,
    /// `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, then `ln_f`, LayerNorms and
    /// biases everywhere. The `Conv1D` weights are stored `[in, out]` and transposed here
    /// (exact in bf16); `c_attn`'s output features are q, k and v in that order, so its
    /// transpose is the fused `[3 H, H]` q/k/v matrix and its bias the fused bias.
    fn from_gpt2_safetensors(
        dev: &CudaDevice,
        d: &Dims,
        st: &SafetensorsFiles,
        lm_head: bool,
    ) -> anyhow::Result<Self> {
        let names = |name: &str| [format!("transformer.{name}"), name.to_string()];
        let get = |name: &str, rows: usize, cols: usize| st.bf16(&names(name), rows, cols);
        let up = |data: &[bf16]| DevBuf::upload(dev, data);
        let (h, i) = (d.hidden, d.inter);
        if d.kv_heads != d.heads || d.q_width() != h {
            bail!(
                "gpt2: {} heads of {} do not make hidden size {h}",
                d.heads,
                d.head_dim
            );
        }
        let norm = |prefix: &str| -> anyhow::Result<NormWeights> {
            Ok(NormWeights {
                w: up(&get(&format!("{prefix}.weight"), 1, h)?)?,
                b: Some(up(&get(&format!("{prefix}.bias"), 1, h)?)?),
            })
        };
        // A Conv1D of `inp` -> `out` features as a Linear's `[out, inp]`, and its bias.
        let conv1d = |prefix: &str, inp: usize, out: usize| -> anyhow::Result<(DevBuf, DevBuf)> {
            let w = get(&format!("{prefix}.weight"), inp, out)?;
            let mut t = Vec::with_capacity(w.len());
            for o in 0..out {
                t.extend((0..inp).map(|r| w[r * out + o]));
            }
            Ok((up(&t)?, up(&get(&format!("{prefix}.bias"), 1, out)?)?))
        };
        let embed = up(&get("wte.weight", d.vocab, h)?)?;
        let embed_positions = Some(up(&get("wpe.weight", d.positions, h)?)?);
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = |s: &str| format!("h.{l}.{s}");
            let (qkv, qkv_bias) = conv1d(&p("attn.c_attn"), h, 3 * h)?;
            let (o_proj, o_bias) = conv1d(&p("attn.c_proj"), h, h)?;
            let (fc, fc_bias) = conv1d(&p("mlp.c_fc"), h, i)?;
            let (proj, proj_bias) = conv1d(&p("mlp.c_proj"), i, h)?;
            layers.push(LayerWeights {
                input_norm: norm(&p("ln_1"))?,
                qkv,
                qkv_bias: Some(qkv_bias),
                q_norm: None,
                k_norm: None,
                o_proj,
                o_bias: Some(o_bias),
                post_norm: norm(&p("ln_2"))?,
                mlp: Mlp::Dense {
                    up: fc,
                    up_bias: Some(fc_bias),
                    down: proj,
                    down_bias: Some(proj_bias),
                },
            });
        }
        let norm = norm("ln_f")?;
        let lm_head = untied_lm_head(dev, d, st, lm_head)?;
        Ok(Self {
            embed,
            embed_positions,
            layers,
            norm,
            lm_head,
        })
    }
}

/// The checkpoint's own `lm_head` (`None` when the model ties it to the embeddings or
/// embeds), then the wait for every upload a loader queued: the end of both decoder loaders.
fn untied_lm_head(
    dev: &CudaDevice,
    d: &Dims,
    st: &SafetensorsFiles,
    lm_head: bool,
) -> anyhow::Result<Option<DevBuf>> {
    let head = if lm_head {
        let w = st.bf16(&["lm_head.weight".to_string()], d.vocab, d.hidden)?;
        Some(DevBuf::upload(dev, &w)?)
    } else {
        None
    };
    dev.stream
        .synchronize()
        .map_err(|e| anyhow!("uploading weights: {e}"))?;
    Ok(head)
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
    /// The dense MLP's first GEMM's output, gate and up or `fc` (empty when every layer
    /// is sparse).
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
    /// Scratch for steps of `tokens` tokens and `seqs` output rows; `dense` when some layer
    /// has the dense MLP.
    fn alloc(
        dev: &CudaDevice,
        d: &Dims,
        tokens: usize,
        seqs: usize,
        dense: bool,
    ) -> anyhow::Result<Self> {
        let (t, n) = (tokens, seqs);
        let (inter, up_width) = if dense { (d.inter, d.up_width) } else { (0, 0) };
        let act = Self {
            residual: DevBuf::alloc(dev, t * d.hidden * 4)?,
            normed: DevBuf::alloc(dev, t * d.hidden * BF16)?,
            qkv: DevBuf::alloc(dev, t * d.qkv_width() * BF16)?,
            attn: DevBuf::alloc(dev, t * d.q_width() * BF16)?,
            delta: DevBuf::alloc(dev, t * d.hidden * BF16)?,
            gate_up: DevBuf::alloc(dev, t * up_width * BF16)?,
            act: DevBuf::alloc(dev, t * inter * BF16)?,
            last: DevBuf::alloc(dev, n * d.hidden * BF16)?,
            logits: DevBuf::alloc(dev, n * d.vocab * 4)?,
            sampled: DevBuf::alloc(dev, n * 4)?,
            pooled: DevBuf::alloc(dev, n * d.hidden * 4)?,
        };
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
        Ok(act)
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

/// A decoder's weights and activations on the GPU (Qwen3, Qwen3-MoE, Qwen2, Llama,
/// Mistral, GPT-2: the name is the first family's), and its forward pass.
pub struct Qwen3Cuda {
    d: Dims,
    /// The family's options ([`cuda_layout`]), read by the forward pass.
    layout: DecoderLayout,
    w: Weights,
    act: Activations,
    /// The sparse blocks of a mixture of experts.
    moe: Option<CudaMoe>,
}

/// A decoder (generate or embed) on one GPU, behind the model_api seam.
pub type CudaQwen3 = CudaExecutor<Qwen3Cuda>;

impl CudaQwen3 {
    /// Opens GPU `ordinal` and loads `config`'s model from `weights` (no `lm_head` for an
    /// embedder), with scratch sized by `opts`. `info.task` picks generate or embed. A
    /// model the CUDA path does not compute ([`cuda_layout`]) is refused before the GPU is
    /// opened.
    pub fn new(
        ordinal: usize,
        config: &ModelConfig,
        info: ModelInfo,
        weights: &WeightSource,
        opts: CudaOptions,
    ) -> anyhow::Result<Self> {
        let layout = cuda_layout(config)?;
        let generate = info.task == Task::Generate;
        let d = Dims::of(config, &layout);
        let tied = config.tie_word_embeddings;
        let arch = config.arch;
        CudaExecutor::open(ordinal, config, info, opts, |dev, k, opts| {
            let moe = CudaMoe::new(dev, config, opts.max_tokens)?;
            let dense = (0..d.layers).any(|l| !config.is_sparse_layer(l));
            let w = Weights::load(
                dev,
                k,
                &d,
                &layout,
                arch,
                moe.as_ref(),
                tied,
                weights,
                generate,
            )?;
            Ok(Qwen3Cuda {
                d,
                layout,
                w,
                act: Activations::alloc(dev, &d, opts.max_tokens, opts.max_seqs, dense)?,
                moe,
            })
        })
    }

    /// Whether the model has sparse (mixture-of-experts) blocks.
    pub fn is_moe(&self) -> bool {
        self.model().moe.is_some()
    }

    /// Runs a mixture of experts' grouped GEMMs in one tile at every step (`None`: the
    /// engine's choice by rows per expert); for the benchmark's sweeps. Drops captured
    /// graphs. A dense model, or a tile its experts cannot take, is an error.
    pub fn set_moe_tile(&mut self, tile: Option<MoeTile>) -> anyhow::Result<()> {
        let moe = self
            .model_mut()
            .moe
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("not a mixture of experts: no MoE tile to set"))?;
        moe.set_tile(tile)?;
        self.drop_graphs();
        Ok(())
    }

    /// The rows per expert a routed row saw in the last decode step (graph) of `batch`
    /// rows (`moe_kernels::rows_seen`), by which the next one picks its tile; `None` for a
    /// dense model or before such a step.
    pub fn moe_rows_seen(&self, batch: usize) -> Option<f64> {
        self.model().moe.as_ref()?.rows_seen(batch)
    }
}

impl CudaModel for Qwen3Cuda {
    fn enqueue_forward(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
    ) -> anyhow::Result<()> {
        self.embed_tokens(cx, ops, p)?;
        for layer in 0..self.w.layers.len() {
            self.attention(cx, ops, p, layer)?;
            self.mlp(cx, ops, p, layer)?;
        }
        if p.step.rows == 0 {
            return Ok(());
        }
        self.final_norm(cx, ops, p)?;
        if p.embed {
            self.pool(cx, ops, p)
        } else {
            self.lm_head_argmax(cx, ops, p)
        }
    }

    fn bytes_held(&self) -> usize {
        self.w.bytes() + self.act.bytes() + self.moe.as_ref().map_or(0, CudaMoe::scratch_bytes)
    }

    fn graph_variant(&self, tokens: usize) -> u64 {
        self.moe.as_ref().map_or(0, |m| m.graph_variant(tokens))
    }

    fn after_decode(&mut self, dev: &CudaDevice, tokens: usize, live: usize) -> anyhow::Result<()> {
        match &mut self.moe {
            Some(m) => m.observe(dev, tokens, live),
            None => Ok(()),
        }
    }

    fn outputs(&self) -> Outputs {
        Outputs {
            logits: self.act.logits.ptr,
            argmax: self.act.sampled.ptr,
            pooled: self.act.pooled.ptr,
        }
    }

    fn gemm_specs(&self) -> Vec<GemmSpec> {
        let (d, a, w) = (&self.d, &self.act, &self.w);
        let tokens = a.normed.bytes / (d.hidden * BF16);
        let rows = a.last.bytes / (d.hidden * BF16);
        let each = |f: fn(&LayerWeights) -> DevPtr| w.layers.iter().map(f).collect::<Vec<_>>();
        // The dense MLPs' and the routers' weights (each empty for a model without them:
        // the tuner skips those).
        let dense = |down: bool| {
            w.layers
                .iter()
                .filter_map(|l| match &l.mlp {
                    Mlp::Dense { up, down: d, .. } => Some(if down { d.ptr } else { up.ptr }),
                    Mlp::Sparse(_) => None,
                })
                .collect::<Vec<_>>()
        };
        let spec = |op, n, k, x: &DevBuf, y: &DevBuf, weights| GemmSpec {
            op,
            n,
            k,
            out: OutType::Bf16,
            x: x.ptr,
            y: y.ptr,
            max_m: tokens,
            weights,
        };
        let mut specs = vec![
            spec(
                "qkv",
                d.qkv_width(),
                d.hidden,
                &a.normed,
                &a.qkv,
                each(|l| l.qkv.ptr),
            ),
            spec(
                "o",
                d.hidden,
                d.q_width(),
                &a.attn,
                &a.delta,
                each(|l| l.o_proj.ptr),
            ),
            spec(
                "gate_up",
                d.up_width,
                d.hidden,
                &a.normed,
                &a.gate_up,
                dense(false),
            ),
            spec("down", d.hidden, d.inter, &a.act, &a.delta, dense(true)),
            GemmSpec {
                op: "lm_head",
                n: d.vocab,
                k: d.hidden,
                out: OutType::F32,
                x: a.last.ptr,
                y: a.logits.ptr,
                max_m: rows,
                weights: vec![w.lm_head_ptr()],
            },
        ];
        if let Some(m) = &self.moe {
            let (n, k, logits) = m.router_gemm();
            specs.push(GemmSpec {
                op: "router",
                n,
                k,
                out: OutType::F32,
                x: a.normed.ptr,
                y: logits,
                max_m: tokens,
                weights: w
                    .layers
                    .iter()
                    .filter_map(|l| match &l.mlp {
                        Mlp::Sparse(s) => Some(s.router_ptr()),
                        Mlp::Dense { .. } => None,
                    })
                    .collect(),
            });
        }
        specs
    }
}

impl Qwen3Cuda {
    /// How every norm of this model normalises (the stream keeps the sums: pre-norm).
    fn norm_mode(&self) -> NormMode {
        NormMode::pre(self.layout.norm)
    }

    /// Gathers the token embeddings into the residual stream, with the learned position
    /// rows where the layout has them.
    fn embed_tokens(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
    ) -> anyhow::Result<()> {
        let (k, a) = (cx.kernels, &self.act);
        let ids = cx.step.ptr(p.layout.ids);
        let pos = cx.step.ptr(p.layout.pos);
        ops.op("embed", || {
            k.embed_gather(
                self.w.embed.ptr,
                ids,
                a.residual.ptr,
                p.step.tokens,
                self.d.hidden,
                self.w.positions_ptr(),
                pos,
                0,
            )
        })
    }

    /// The attention half of `layer`: residual add (of the previous layer's MLP output and
    /// its bias, where it has one) and the input norm, the fused qkv GEMM, q/k/v bias, q/k
    /// norm and RoPE (each where the layout has it) and the KV write, attention (flash for
    /// embeddings; flash over the paged cache for long prompt chunks and 8-query prefill
    /// tiles for the rest of a prefill step; or the split decode kernel, else the
    /// one-block-per-token paged kernel), the o GEMM into `delta`.
    fn attention(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
        layer: usize,
    ) -> anyhow::Result<()> {
        let (d, k, a, lw) = (&self.d, cx.kernels, &self.act, &self.w.layers[layer]);
        let meta = |off: usize| cx.step.ptr(off);
        let (lay, t, h) = (p.layout, p.step.tokens, d.hidden);
        // The embedding path attends with the flash kernel, which reads K/V from qkv.
        let flash = cx.flash;
        let (kc, vc) = (p.kv.k(layer), p.kv.v(layer));
        let (delta, delta_bias) = match layer {
            0 => (0, 0),
            l => (a.delta.ptr, self.w.layers[l - 1].down_bias()),
        };
        ops.op("norm+add", || {
            k.add_norm(
                a.residual.ptr,
                delta,
                delta_bias,
                lw.input_norm.w.ptr,
                lw.input_norm.bias(),
                a.normed.ptr,
                0,
                t,
                h,
                d.eps,
                self.norm_mode(),
            )
        })?;
        ops.op("gemm qkv", || {
            cx.gemm.linear(
                cx.dev,
                a.normed.ptr,
                lw.qkv.ptr,
                a.qkv.ptr,
                t,
                d.qkv_width(),
                h,
                OutType::Bf16,
            )
        })?;
        let rope = (self.layout.positions == PositionKind::Rope).then_some(cx.rope);
        // Split decode attention over the step's decode slots' work items; the last warp
        // of a split token merges its pieces.
        let split_decode = |ops: &mut Launcher<'_>, sd: SplitDecodePass, name| {
            ops.op(name, || {
                k.decode_attention(
                    sd.pipelined,
                    a.qkv.ptr,
                    a.attn.ptr,
                    kc,
                    vc,
                    meta(lay.tables),
                    lay.max_blocks,
                    meta(lay.seq_of),
                    meta(lay.work),
                    meta(lay.item_first),
                    meta(lay.dec_rows),
                    sd.parts,
                    p.step.slots,
                    lay.items_cap(p.step.slots),
                    p.kv.block_size,
                    d.kv_heads,
                )
            })
        };
        ops.op("qk norm+rope+kv write", || {
            k.qk_norm_rope_kv(
                a.qkv.ptr,
                ptr_or_null(&lw.qkv_bias),
                ptr_or_null(&lw.q_norm),
                ptr_or_null(&lw.k_norm),
                meta(lay.pos),
                meta(lay.slots),
                if flash.is_some() { 0 } else { kc },
                vc,
                rope,
                t,
                d.heads,
                d.kv_heads,
                d.eps,
            )
        })?;
        if let Some(ft) = flash {
            ops.op("attention (flash, embed)", || {
                k.embed_flash_attention(
                    a.qkv.ptr, a.attn.ptr, ft.buf.ptr, ft.count, d.heads, d.kv_heads, true,
                )
            })?;
        } else if !p.step.is_decode() {
            // Prompt chunks long enough for the flash kernel, the one-token sequences on
            // the split decode kernel (`StepLayout::mixed_decode`) and the rest of the
            // step's tokens (short chunks) write disjoint rows of `attn`.
            if p.step.items > 0 {
                let sd = cx.decode.ok_or_else(|| {
                    anyhow!("decode slots in a step without the split decode kernel")
                })?;
                split_decode(ops, sd, "attention (decode, mixed)")?;
            }
            if p.step.flash_tiles > 0 {
                ops.op("attention (flash, prefill)", || {
                    k.prefill_flash_attention(
                        a.qkv.ptr,
                        a.attn.ptr,
                        kc,
                        vc,
                        meta(lay.tables),
                        lay.max_blocks,
                        meta(lay.flash),
                        p.step.flash_tiles,
                        p.kv.block_size,
                        d.heads,
                        d.kv_heads,
                    )
                })?;
            }
            if p.step.tiles > 0 {
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
            }
        } else if let Some(sd) = cx.decode {
            split_decode(ops, sd, "attention (decode)")?;
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
            cx.gemm.linear(
                cx.dev,
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

    /// The MLP half of `layer`: residual add (of the attention output and the o bias, where
    /// the layout has one) + post-attention norm, then the dense MLP (the fused gate/up
    /// GEMM and SiLU(gate) * up, or the fc GEMM and GELU of it plus its bias; the down
    /// GEMM) or the sparse block, into `delta`.
    fn mlp(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
        layer: usize,
    ) -> anyhow::Result<()> {
        let (d, k, a, lw) = (&self.d, cx.kernels, &self.act, &self.w.layers[layer]);
        let (t, h) = (p.step.tokens, d.hidden);
        ops.op("norm+add", || {
            k.add_norm(
                a.residual.ptr,
                a.delta.ptr,
                ptr_or_null(&lw.o_bias),
                lw.post_norm.w.ptr,
                lw.post_norm.bias(),
                a.normed.ptr,
                0,
                t,
                h,
                d.eps,
                self.norm_mode(),
            )
        })?;
        let (up, up_bias, down) = match (&lw.mlp, &self.moe) {
            (
                Mlp::Dense {
                    up, up_bias, down, ..
                },
                _,
            ) => (up, up_bias, down),
            (Mlp::Sparse(sw), Some(moe)) => {
                let decode = p.step.is_decode() && !p.embed;
                let step = MoeStep {
                    layer,
                    tokens: t,
                    decode,
                    slots: decode.then(|| cx.step.ptr(p.layout.slots)),
                };
                return moe.forward(cx, ops, sw, a.normed.ptr, a.delta.ptr, step);
            }
            (Mlp::Sparse(_), None) => bail!("layer {layer} is sparse in a dense model"),
        };
        ops.op("gemm gate_up", || {
            cx.gemm.linear(
                cx.dev,
                a.normed.ptr,
                up.ptr,
                a.gate_up.ptr,
                t,
                d.up_width,
                h,
                OutType::Bf16,
            )
        })?;
        match self.layout.mlp {
            MlpKind::SiluGated => ops.op("silu*up", || {
                k.silu_mul(a.gate_up.ptr, a.act.ptr, t, d.inter)
            })?,
            MlpKind::Gelu(kind) => ops.op("bias+gelu", || {
                k.bias_gelu(
                    a.gate_up.ptr,
                    ptr_or_null(up_bias),
                    a.act.ptr,
                    t,
                    d.inter,
                    kind,
                )
            })?,
        }
        ops.op("gemm down", || {
            cx.gemm.linear(
                cx.dev,
                a.act.ptr,
                down.ptr,
                a.delta.ptr,
                t,
                h,
                d.inter,
                OutType::Bf16,
            )
        })
    }

    /// Adds the last layer's MLP output (and its bias) to the residual for every token
    /// (cheap; its normalised output is not used): the output rows are normalised next.
    fn final_norm(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
    ) -> anyhow::Result<()> {
        let (d, k, a) = (&self.d, cx.kernels, &self.act);
        let last = self.w.layers.last().map_or(0, LayerWeights::down_bias);
        ops.op("norm+add", || {
            k.add_norm(
                a.residual.ptr,
                a.delta.ptr,
                last,
                self.w.norm.w.ptr,
                self.w.norm.bias(),
                a.normed.ptr,
                0,
                p.step.tokens,
                d.hidden,
                d.eps,
                self.norm_mode(),
            )
        })
    }

    /// Embeddings: the final norm of each output row, in fp32, into `pooled`.
    fn pool(&self, cx: &ForwardCtx<'_>, ops: &mut Launcher<'_>, p: &Pass) -> anyhow::Result<()> {
        let (d, k, a) = (&self.d, cx.kernels, &self.act);
        let rows = cx.step.ptr(p.layout.rows);
        ops.op("pool", || {
            k.norm_rows_f32(
                a.residual.ptr,
                self.w.norm.w.ptr,
                self.w.norm.bias(),
                a.pooled.ptr,
                rows,
                p.step.rows,
                d.hidden,
                d.eps,
                self.layout.norm,
            )
        })
    }

    /// Generation: the final norm of each output row, the LM head (fp32 logits) and the
    /// argmax of each row.
    fn lm_head_argmax(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
    ) -> anyhow::Result<()> {
        let (d, k, a) = (&self.d, cx.kernels, &self.act);
        let (rows, n) = (cx.step.ptr(p.layout.rows), p.step.rows);
        ops.op("norm rows", || {
            k.add_norm(
                a.residual.ptr,
                0,
                0,
                self.w.norm.w.ptr,
                self.w.norm.bias(),
                a.last.ptr,
                rows,
                n,
                d.hidden,
                d.eps,
                self.norm_mode(),
            )
        })?;
        ops.op("gemm lm_head", || {
            cx.gemm.linear(
                cx.dev,
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
}
