//! The BERT family's encoders on the GPU (BERT and MiniLM, RoBERTa, DistilBERT), embed
//! only: the CUDA model beside the portable one (`bert.rs`), reading the same config, the
//! same checkpoint names ([`EncoderNames`]: which tensors a family has, the task models'
//! prefixes, RoBERTa's position offset) and the same weight reader, served by the same
//! executor as the decoders ([`CudaExecutor`]: step packing, chunking of the inputs, the
//! flash attention's query tiles, L2 normalisation of the pooled rows).
//! - weights in bf16, q/k/v fused into one `[3 H, H]` matrix and their biases into one
//!   `[3 H]` vector, so a layer runs 4 GEMMs;
//! - embeddings: word + position (+ token type 0 where the family has types) gathered in
//!   one kernel, then LayerNorm;
//! - per layer (post-norm, the residual stream being each LayerNorm's output in fp32):
//!   qkv GEMM -> q/k/v bias -> bidirectional attention within each sequence (the
//!   tensor-core flash kernel, reading K/V from the projection: no KV cache) -> dense GEMM
//!   -> add (+ bias) + LayerNorm -> intermediate GEMM -> bias + exact (erf) GELU -> output
//!   GEMM -> add (+ bias) + LayerNorm;
//! - the mean over each sequence's tokens in fp32 (sentence-transformers' pooling; the
//!   executor L2-normalises it).
//!
//! The attention needs the tensor-core kernel, whose head size is a multiple of 16 (every
//! released BERT, MiniLM, RoBERTa and DistilBERT: 32 or 64); another is refused by name
//! before any device is opened, as are decoders and `--task generate`.
//!
//! The CPU model is the reference: `tests/cuda_engine.rs` (feature `gpu-tests`) compares
//! this one with transformers' outputs for the tiny BERT, RoBERTa and DistilBERT fixtures,
//! and with the CPU model on a random BERT, inputs of many lengths in one batch.

use anyhow::{anyhow, bail};
use half::bf16;

use crate::backend::cuda::buffer::DevBuf;
use crate::backend::cuda::device::CudaDevice;
use crate::backend::cuda::executor::{CudaExecutor, CudaModel, ForwardCtx, Outputs, Pass};
use crate::backend::cuda::gemm::{GemmSpec, OutType};
use crate::backend::cuda::kernels::{DevPtr, Kernels, NormMode};
use crate::backend::cuda::profile::Launcher;
use crate::backend::cuda::step::CudaOptions;
use crate::backend::Gelu;
use crate::model::config::{Activation, ModelConfig, NormKind};
use crate::model::encoder::EncoderNames;
use crate::model::qwen3_cuda::{dummy_range, DummyFill};
use crate::model_api::{ModelInfo, Task};
use crate::weights::{SafetensorsFiles, WeightSource};

/// Bytes per bf16 element.
const BF16: usize = 2;

/// Every norm of an encoder: LayerNorm, its output replacing the residual stream.
const POST_NORM: NormMode = NormMode {
    kind: NormKind::Layer,
    write_back: true,
};

/// The config's numbers in the form the kernels take.
#[derive(Debug, Clone, Copy)]
struct Dims {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    /// Positions of the table (past the offset rows RoBERTa has before position 0).
    positions: usize,
    /// Rows before position 0 in the stored table (RoBERTa's `pad_token_id + 1`).
    position_offset: usize,
    type_vocab: usize,
    eps: f32,
    gelu: Gelu,
}

impl Dims {
    fn of(c: &ModelConfig) -> Self {
        Self {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            positions: c.max_position_embeddings,
            position_offset: c.position_offset,
            type_vocab: c.type_vocab_size,
            eps: c.norm_eps as f32,
            gelu: match c.activation {
                Activation::Gelu(g) => g,
                Activation::Silu => Gelu::Erf,
            },
        }
    }
}

/// What the CUDA encoder runs: a BERT-family encoder ([`EncoderNames`]) asked to embed,
/// with a head size the tensor-core attention takes. Anything else is an error naming the
/// architecture, before any device is opened.
pub fn cuda_encoder_names(config: &ModelConfig, task: Task) -> anyhow::Result<EncoderNames> {
    let arch = config.arch.name();
    let names = EncoderNames::of(config).ok_or_else(|| {
        anyhow!(
            "--device cuda: the {arch} architecture is a decoder, which the CUDA encoder does not run (the CUDA decoder model does: model::qwen3_cuda)"
        )
    })?;
    if task == Task::Generate {
        bail!("a {arch} encoder cannot generate (use --task embed)");
    }
    let hd = config.head_dim;
    if hd == 0
        || !hd.is_multiple_of(16)
        || config.num_attention_heads * hd != config.hidden_size
        || config.num_key_value_heads != config.num_attention_heads
    {
        bail!(
            "--device cuda: this {arch} encoder has {} heads of {hd} for hidden size {}; the CUDA encoder runs heads of a multiple of 16 that make the hidden size, one K/V head each (use --device cpu)",
            config.num_attention_heads,
            config.hidden_size
        );
    }
    Ok(names)
}

/// A projection's weight `[out, in]` and bias `[out]`.
struct Linear {
    w: DevBuf,
    b: DevBuf,
}

impl Linear {
    fn bytes(&self) -> usize {
        self.w.bytes + self.b.bytes
    }
}

/// A LayerNorm's weight and bias.
struct Norm {
    w: DevBuf,
    b: DevBuf,
}

impl Norm {
    fn bytes(&self) -> usize {
        self.w.bytes + self.b.bytes
    }
}

/// One encoder layer, q/k/v fused.
struct LayerWeights {
    /// `[3 H, H]` (q, k, v rows) and its `[3 H]` bias.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

impl LayerWeights {
    fn bytes(&self) -> usize {
        self.qkv.bytes()
            + self.attention_output.bytes()
            + self.attention_norm.bytes()
            + self.intermediate.bytes()
            + self.output.bytes()
            + self.output_norm.bytes()
    }
}

/// The whole encoder's weights on the device.
struct Weights {
    word: DevBuf,
    /// `[positions, H]`, position 0 first (RoBERTa's offset rows not uploaded).
    positions: DevBuf,
    /// Token type 0's row `[H]`; `None` where the family has no types (DistilBERT).
    token_type: Option<DevBuf>,
    embeddings_norm: Norm,
    layers: Vec<LayerWeights>,
}

impl Weights {
    fn bytes(&self) -> usize {
        self.word.bytes
            + self.positions.bytes
            + self.token_type.as_ref().map_or(0, |b| b.bytes)
            + self.embeddings_norm.bytes()
            + self.layers.iter().map(LayerWeights::bytes).sum::<usize>()
    }

    fn load(
        dev: &CudaDevice,
        k: &Kernels,
        d: &Dims,
        names: &EncoderNames,
        src: &WeightSource,
    ) -> anyhow::Result<Self> {
        let w = match src {
            WeightSource::Dummy { seed } => Self::dummy(dev, k, d, names, *seed)?,
            WeightSource::Safetensors(st) => Self::from_safetensors(dev, d, names, st)?,
        };
        dev.stream
            .synchronize()
            .map_err(|e| anyhow!("loading the encoder's weights: {e}"))?;
        Ok(w)
    }

    /// Seeded random weights (`--load-format dummy`): linears, biases and embedding
    /// tables uniform with std 0.02 (HF's initializer range), norm weights at 1 ± 0.05,
    /// filled by a GPU kernel. The same seed gives the same weights (not the CPU's).
    fn dummy(
        dev: &CudaDevice,
        k: &Kernels,
        d: &Dims,
        names: &EncoderNames,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let dummy = DummyFill::new(dev, k, seed);
        let a = dummy_range();
        let fill = |elems: usize, amp: f32, offset: f32| dummy.fill(elems, amp, offset);
        let linear = |out: usize, inp: usize| -> anyhow::Result<Linear> {
            Ok(Linear {
                w: fill(out * inp, a, 0.0)?,
                b: fill(out, a, 0.0)?,
            })
        };
        let (h, i) = (d.hidden, d.inter);
        let norm = || -> anyhow::Result<Norm> {
            Ok(Norm {
                w: fill(h, 0.05, 1.0)?,
                b: fill(h, a, 0.0)?,
            })
        };
        let word = fill(d.vocab * h, a, 0.0)?;
        let positions = fill(d.positions * h, a, 0.0)?;
        let token_type = match names.token_type_embeddings() {
            Some(_) => Some(fill(h, a, 0.0)?),
            None => None,
        };
        let embeddings_norm = norm()?;
        let mut layers = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            layers.push(LayerWeights {
                qkv: linear(3 * h, h)?,
                attention_output: linear(h, h)?,
                attention_norm: norm()?,
                intermediate: linear(i, h)?,
                output: linear(h, i)?,
                output_norm: norm()?,
            });
        }
        Ok(Self {
            word,
            positions,
            token_type,
            embeddings_norm,
            layers,
        })
    }

    /// A checkpoint by the family's names ([`EncoderNames`]: with or without the task
    /// model's prefix), shapes checked against the config, converted to bf16 on the host;
    /// q/k/v weights and biases concatenated row-wise before upload; the position table's
    /// rows before position 0 (RoBERTa's) and the token types past type 0 left out.
    fn from_safetensors(
        dev: &CudaDevice,
        d: &Dims,
        names: &EncoderNames,
        st: &SafetensorsFiles,
    ) -> anyhow::Result<Self> {
        let get = |name: &str, suffix: &str, rows: usize, cols: usize| {
            st.bf16(&names.candidates(name, suffix), rows, cols)
        };
        let up = |data: &[bf16]| DevBuf::upload(dev, data);
        let (h, i) = (d.hidden, d.inter);
        let linear = |name: &str, out: usize, inp: usize| -> anyhow::Result<Linear> {
            Ok(Linear {
                w: up(&get(name, ".weight", out, inp)?)?,
                b: up(&get(name, ".bias", 1, out)?)?,
            })
        };
        let norm = |name: &str| -> anyhow::Result<Norm> {
            Ok(Norm {
                w: up(&get(name, ".weight", 1, h)?)?,
                b: up(&get(name, ".bias", 1, h)?)?,
            })
        };
        let word = up(&get(names.word_embeddings(), ".weight", d.vocab, h)?)?;
        let off = d.position_offset;
        let table = get(names.position_embeddings(), ".weight", d.positions + off, h)?;
        let positions = up(&table[off * h..])?;
        let token_type = match names.token_type_embeddings() {
            Some(t) => Some(up(&get(t, ".weight", d.type_vocab, h)?[..h])?),
            None => None,
        };
        let embeddings_norm = norm(names.embeddings_norm())?;
        let mut layers = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let n = names.layer(l);
            let mut qkv = get(&n.query, ".weight", h, h)?;
            qkv.extend(get(&n.key, ".weight", h, h)?);
            qkv.extend(get(&n.value, ".weight", h, h)?);
            let mut qkv_bias = get(&n.query, ".bias", 1, h)?;
            qkv_bias.extend(get(&n.key, ".bias", 1, h)?);
            qkv_bias.extend(get(&n.value, ".bias", 1, h)?);
            layers.push(LayerWeights {
                qkv: Linear {
                    w: up(&qkv)?,
                    b: up(&qkv_bias)?,
                },
                attention_output: linear(&n.attention_output, h, h)?,
                attention_norm: norm(&n.attention_norm)?,
                intermediate: linear(&n.intermediate, i, h)?,
                output: linear(&n.output, h, i)?,
                output_norm: norm(&n.output_norm)?,
            });
        }
        Ok(Self {
            word,
            positions,
            token_type,
            embeddings_norm,
            layers,
        })
    }
}

/// Activation scratch, sized for the largest step.
struct Activations {
    /// The residual stream, fp32: each LayerNorm's output.
    residual: DevBuf,
    /// The stream in bf16 (the GEMMs' input).
    normed: DevBuf,
    qkv: DevBuf,
    attn: DevBuf,
    /// Output of the dense or output GEMM, added to the residual by the next norm.
    delta: DevBuf,
    /// The intermediate GEMM's output, and its GELU.
    inter: DevBuf,
    act: DevBuf,
    /// The mean of each sequence's rows, fp32.
    pooled: DevBuf,
}

impl Activations {
    fn alloc(dev: &CudaDevice, d: &Dims, tokens: usize, seqs: usize) -> anyhow::Result<Self> {
        let (t, h) = (tokens, d.hidden);
        Ok(Self {
            residual: DevBuf::alloc(dev, t * h * 4)?,
            normed: DevBuf::alloc(dev, t * h * BF16)?,
            qkv: DevBuf::alloc(dev, t * 3 * h * BF16)?,
            attn: DevBuf::alloc(dev, t * h * BF16)?,
            delta: DevBuf::alloc(dev, t * h * BF16)?,
            inter: DevBuf::alloc(dev, t * d.inter * BF16)?,
            act: DevBuf::alloc(dev, t * d.inter * BF16)?,
            pooled: DevBuf::alloc(dev, seqs * h * 4)?,
        })
    }

    fn bytes(&self) -> usize {
        [
            &self.residual,
            &self.normed,
            &self.qkv,
            &self.attn,
            &self.delta,
            &self.inter,
            &self.act,
            &self.pooled,
        ]
        .iter()
        .map(|b| b.bytes)
        .sum()
    }
}

/// A BERT-family encoder's weights and activations on the GPU, and its forward pass.
pub struct EncoderCuda {
    d: Dims,
    w: Weights,
    act: Activations,
}

/// A BERT-family encoder (embed) on one GPU, behind the model_api seam.
pub type CudaEncoder = CudaExecutor<EncoderCuda>;

impl CudaEncoder {
    /// Opens GPU `ordinal` and loads `config`'s encoder from `weights`, with scratch sized
    /// by `opts`. What the CUDA encoder does not run ([`cuda_encoder_names`]: a decoder,
    /// `info.task` generate, a head size the tensor-core attention does not take) is
    /// refused before the GPU is opened.
    pub fn new(
        ordinal: usize,
        config: &ModelConfig,
        info: ModelInfo,
        weights: &WeightSource,
        opts: CudaOptions,
    ) -> anyhow::Result<Self> {
        let names = cuda_encoder_names(config, info.task)?;
        let d = Dims::of(config);
        CudaExecutor::open(ordinal, config, info, opts, |dev, k, opts| {
            Ok(EncoderCuda {
                d,
                w: Weights::load(dev, k, &d, &names, weights)?,
                act: Activations::alloc(dev, &d, opts.max_tokens, opts.max_seqs)?,
            })
        })
    }
}

impl CudaModel for EncoderCuda {
    fn enqueue_forward(
        &self,
        cx: &ForwardCtx<'_>,
        ops: &mut Launcher<'_>,
        p: &Pass,
    ) -> anyhow::Result<()> {
        if !p.embed {
            bail!("an encoder only embeds");
        }
        let Some(ft) = cx.flash else {
            bail!("the CUDA encoder attends with the flash kernel only (set_embed_flash(true))");
        };
        let (d, k, a, w) = (&self.d, cx.kernels, &self.act, &self.w);
        let (t, h) = (p.step.tokens, d.hidden);
        let pos = cx.step.ptr(p.layout.pos);
        let linear = |x: &DevBuf, l: &Linear, y: &DevBuf, n: usize, kk: usize| {
            cx.gemm
                .linear(cx.dev, x.ptr, l.w.ptr, y.ptr, t, n, kk, OutType::Bf16)
        };
        // The residual (+ delta + bias, where given) through LayerNorm `n`, into the stream
        // (fp32) and `normed` (bf16).
        let add_norm = |delta: DevPtr, bias: DevPtr, n: &Norm| {
            k.add_norm(
                a.residual.ptr,
                delta,
                bias,
                n.w.ptr,
                n.b.ptr,
                a.normed.ptr,
                0,
                t,
                h,
                d.eps,
                POST_NORM,
            )
        };
        ops.op("embed", || {
            k.embed_gather(
                w.word.ptr,
                cx.step.ptr(p.layout.ids),
                a.residual.ptr,
                t,
                h,
                w.positions.ptr,
                pos,
                w.token_type.as_ref().map_or(0, |b| b.ptr),
            )
        })?;
        ops.op("norm", || add_norm(0, 0, &w.embeddings_norm))?;
        for lw in &w.layers {
            ops.op("gemm qkv", || linear(&a.normed, &lw.qkv, &a.qkv, 3 * h, h))?;
            ops.op("qkv bias", || {
                k.qk_norm_rope_kv(
                    a.qkv.ptr,
                    lw.qkv.b.ptr,
                    0,
                    0,
                    pos,
                    cx.step.ptr(p.layout.slots),
                    0,
                    0,
                    None,
                    t,
                    d.heads,
                    d.heads,
                    d.eps,
                )
            })?;
            ops.op("attention (flash, bidirectional)", || {
                k.embed_flash_attention(
                    a.qkv.ptr, a.attn.ptr, ft.buf.ptr, ft.count, d.heads, d.heads, false,
                )
            })?;
            ops.op("gemm o", || {
                linear(&a.attn, &lw.attention_output, &a.delta, h, h)
            })?;
            ops.op("norm+add", || {
                add_norm(a.delta.ptr, lw.attention_output.b.ptr, &lw.attention_norm)
            })?;
            ops.op("gemm intermediate", || {
                linear(&a.normed, &lw.intermediate, &a.inter, d.inter, h)
            })?;
            ops.op("bias+gelu", || {
                k.bias_gelu(
                    a.inter.ptr,
                    lw.intermediate.b.ptr,
                    a.act.ptr,
                    t,
                    d.inter,
                    d.gelu,
                )
            })?;
            ops.op("gemm output", || {
                linear(&a.act, &lw.output, &a.delta, h, d.inter)
            })?;
            ops.op("norm+add", || {
                add_norm(a.delta.ptr, lw.output.b.ptr, &lw.output_norm)
            })?;
        }
        if p.step.rows == 0 {
            return Ok(());
        }
        ops.op("pool (mean)", || {
            k.mean_rows_f32(
                a.residual.ptr,
                a.pooled.ptr,
                cx.step.ptr(p.layout.rows),
                pos,
                p.step.rows,
                h,
            )
        })
    }

    fn bytes_held(&self) -> usize {
        self.w.bytes() + self.act.bytes()
    }

    fn outputs(&self) -> Outputs {
        Outputs {
            logits: 0,
            argmax: 0,
            pooled: self.act.pooled.ptr,
        }
    }

    /// None: an encoder's passes are embedding passes, which are not tuned.
    fn gemm_specs(&self) -> Vec<GemmSpec> {
        Vec::new()
    }
}
