//! The one causal decoder of every decoder family, on [`Backend`] ops: token embedding
//! (plus a learned position table where the family has one), then per layer a pre-norm ->
//! q/k/v -> (per-head q/k RMSNorm) + RoPE -> GQA causal attention -> o_proj -> residual
//! norm -> feed-forward -> residual, a final norm, and a tied or untied `lm_head`. What a
//! family changes is an option decided once in the config
//! ([`crate::model::config::DecoderLayout`]): RMSNorm or LayerNorm, RoPE (scaled or not)
//! or learned positions, q/k norm, biases, a SiLU-gated or a GELU MLP, and a MoE model's
//! sparse blocks ([`super::moe`]). The weights come from the
//! family's loader, which knows its checkpoint names: [`super::qwen3`] for Qwen3,
//! Qwen3-MoE, Qwen2, Llama and Mistral (one naming), [`super::gpt2`] for GPT-2.
//!
//! As a [`Generator`] it runs on the paged KV cache; as an [`Embedder`] (Qwen3-Embedding)
//! it runs dense causal attention, pools the last token and L2-normalises.

use crate::backend::{AttnDims, Backend, Gelu, IndexSource, Init, KvShape, Pooling, StepMeta};
use crate::model::config::{Arch, ModelConfig, NormKind, PositionKind};
use crate::model::moe::SparseMoe;
use crate::model::{gpt2, qwen3, StepBuilder};
use crate::model_api::{Embedder, Generator, ModelInfo, SampleSpec, SeqStep};
use crate::weights::WeightSource;

/// Std of dummy weights (transformers' `initializer_range`).
pub(crate) const DUMMY_STD: f32 = 0.02;

/// Loads one weight by its name without the family's prefix, as `[rows, cols]`, dummy
/// weights filled by the [`Init`].
pub(crate) type GetWeight<'a, T> = dyn Fn(&str, usize, usize, Init) -> anyhow::Result<T> + 'a;

/// A projection `x · wᵀ (+ bias)`.
pub(crate) struct Linear<T> {
    pub weight: T,
    pub bias: Option<T>,
}

impl<T> Linear<T> {
    /// Loads `{prefix}.weight` `[out, inp]` and, with `bias`, `{prefix}.bias`.
    pub(crate) fn load(
        get: &GetWeight<'_, T>,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            weight: get(
                &format!("{prefix}.weight"),
                out,
                inp,
                Init::Normal { std: DUMMY_STD },
            )?,
            bias: if bias {
                Some(get(&format!("{prefix}.bias"), 1, out, Init::Zeros)?)
            } else {
                None
            },
        })
    }

    fn forward<B: Backend<Tensor = T>>(&self, b: &B, x: &T) -> anyhow::Result<T> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// A norm of the layout's kind.
pub(crate) enum Norm<T> {
    Rms(T),
    Layer { weight: T, bias: T },
}

impl<T> Norm<T> {
    /// Loads `{prefix}.weight` (and `{prefix}.bias` for LayerNorm) of `width`.
    pub(crate) fn load(
        get: &GetWeight<'_, T>,
        prefix: &str,
        width: usize,
        kind: NormKind,
    ) -> anyhow::Result<Self> {
        let weight = get(&format!("{prefix}.weight"), 1, width, Init::Ones)?;
        Ok(match kind {
            NormKind::Rms => Norm::Rms(weight),
            NormKind::Layer => Norm::Layer {
                weight,
                bias: get(&format!("{prefix}.bias"), 1, width, Init::Zeros)?,
            },
        })
    }

    fn forward<B: Backend<Tensor = T>>(&self, b: &B, x: &T, eps: f32) -> anyhow::Result<T> {
        match self {
            Norm::Rms(w) => b.rms_norm(x, w, eps),
            Norm::Layer { weight, bias } => b.layer_norm(x, None, weight, bias, eps),
        }
    }

    /// `residual += x`, then the norm of `residual`.
    fn add_forward<B: Backend<Tensor = T>>(
        &self,
        b: &B,
        residual: &mut T,
        x: &T,
        eps: f32,
    ) -> anyhow::Result<T> {
        match self {
            Norm::Rms(w) => b.add_rms_norm(residual, x, w, eps),
            Norm::Layer { weight, bias } => {
                b.add_assign(residual, x)?;
                b.layer_norm(residual, None, weight, bias, eps)
            }
        }
    }
}

/// A SiLU-gated MLP, `down(silu(gate(x)) * up(x))`: the feed-forward of the Llama-style
/// families and each expert of Qwen3-MoE.
pub(crate) struct GatedMlp<T> {
    gate_proj: T,
    up_proj: T,
    down_proj: T,
}

impl<T> GatedMlp<T> {
    /// Loads `{prefix}.{gate,up,down}_proj.weight` of width `inter`.
    pub(crate) fn load(
        get: &GetWeight<'_, T>,
        prefix: &str,
        hidden: usize,
        inter: usize,
        init: Init,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            gate_proj: get(&format!("{prefix}.gate_proj.weight"), inter, hidden, init)?,
            up_proj: get(&format!("{prefix}.up_proj.weight"), inter, hidden, init)?,
            down_proj: get(&format!("{prefix}.down_proj.weight"), hidden, inter, init)?,
        })
    }

    pub(crate) fn forward<B: Backend<Tensor = T>>(&self, b: &B, x: &T) -> anyhow::Result<T> {
        let gate = b.linear(x, &self.gate_proj, None)?;
        let up = b.linear(x, &self.up_proj, None)?;
        b.linear(&b.silu_mul(&gate, &up)?, &self.down_proj, None)
    }
}

/// A layer's feed-forward.
pub(crate) enum Mlp<T> {
    Gated(GatedMlp<T>),
    Sparse(SparseMoe<T>),
    /// `proj(gelu(fc(x)))` (GPT-2's `c_fc`, `c_proj`).
    Gelu {
        fc: Linear<T>,
        proj: Linear<T>,
        kind: Gelu,
    },
}

impl<T> Mlp<T> {
    fn forward<B: Backend<Tensor = T>>(&self, b: &B, x: &T) -> anyhow::Result<T> {
        match self {
            Mlp::Gated(m) => m.forward(b, x),
            Mlp::Sparse(m) => m.forward(b, x),
            Mlp::Gelu { fc, proj, kind } => proj.forward(b, &b.gelu(&fc.forward(b, x)?, *kind)?),
        }
    }
}

/// One layer's weights.
pub(crate) struct Layer<T> {
    pub input_layernorm: Norm<T>,
    pub q_proj: Linear<T>,
    pub k_proj: Linear<T>,
    pub v_proj: Linear<T>,
    pub o_proj: Linear<T>,
    /// Per-head RMSNorm weights `[1, head_dim]` (Qwen3).
    pub q_norm: Option<T>,
    pub k_norm: Option<T>,
    pub post_attention_layernorm: Norm<T>,
    pub mlp: Mlp<T>,
}

/// A decoder's weights as a family's loader hands them over.
pub(crate) struct DecoderWeights<T> {
    pub embed_tokens: T,
    /// The learned position table `[max_positions, hidden]` (GPT-2's `wpe`); `None` for
    /// RoPE models.
    pub embed_positions: Option<T>,
    pub layers: Vec<Layer<T>>,
    pub norm: Norm<T>,
    /// `None` when tied to `embed_tokens` (or not loaded, for embedders).
    pub lm_head: Option<T>,
}

/// The weights and shapes of a decoder on a backend.
pub struct Decoder<B: Backend> {
    backend: B,
    w: DecoderWeights<B::Tensor>,
    /// The RoPE table (`None` for learned positions).
    rope: Option<B::Tensor>,
    dims: AttnDims,
    eps: f32,
    vocab: usize,
    max_positions: usize,
}

impl<B: Backend> Decoder<B> {
    /// Loads the weights through the family's loader; `with_lm_head` is false for
    /// embedders.
    pub fn load(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        with_lm_head: bool,
    ) -> anyhow::Result<Self> {
        let layout = cfg
            .layout()
            .ok_or_else(|| anyhow::anyhow!("{} is not a decoder", cfg.arch.name()))?;
        let w = match cfg.arch {
            Arch::Gpt2 => gpt2::load(&backend, cfg, &layout, src, with_lm_head)?,
            _ => qwen3::load(&backend, cfg, &layout, src, with_lm_head)?,
        };
        let rope = match layout.positions {
            PositionKind::Learned => None,
            PositionKind::Rope => {
                Some(backend.rope_table(&cfg.rope_inv_freq(), cfg.max_position_embeddings)?)
            }
        };
        Ok(Self {
            backend,
            w,
            rope,
            dims: AttnDims {
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            eps: cfg.norm_eps as f32,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape {
            num_layers: self.w.layers.len(),
            num_blocks,
            block_size,
            num_kv_heads: self.dims.num_kv_heads,
            head_dim: self.dims.head_dim,
        }
    }

    /// Runs all layers and the final norm: `[tokens, hidden]`. With a KV cache, attention
    /// is paged (this step's K/V are written first); without, dense causal per sequence.
    pub fn forward(
        &self,
        step: &B::Step,
        mut kv: Option<&mut B::KvCache>,
    ) -> anyhow::Result<B::Tensor> {
        let b = &self.backend;
        let w = &self.w;
        let scale = 1.0 / (self.dims.head_dim as f32).sqrt();
        let mut residual = b.embedding(&w.embed_tokens, step, IndexSource::Tokens)?;
        if let Some(wpe) = &w.embed_positions {
            b.add_assign(
                &mut residual,
                &b.embedding(wpe, step, IndexSource::Positions)?,
            )?;
        }
        let mut h = w.layers[0]
            .input_layernorm
            .forward(b, &residual, self.eps)?;
        let last = w.layers.len() - 1;
        for (l, layer) in w.layers.iter().enumerate() {
            let mut q = layer.q_proj.forward(b, &h)?;
            let mut k = layer.k_proj.forward(b, &h)?;
            let v = layer.v_proj.forward(b, &h)?;
            if let Some(rope) = &self.rope {
                b.qk_norm_rope(
                    &mut q,
                    &mut k,
                    layer.q_norm.as_ref(),
                    layer.k_norm.as_ref(),
                    self.eps,
                    rope,
                    self.dims,
                    step,
                )?;
            }
            let attn = match kv.as_deref_mut() {
                Some(cache) => {
                    b.kv_write(cache, l, &k, &v, step)?;
                    b.paged_attention(&q, cache, l, self.dims, scale, step)?
                }
                None => b.varlen_attention(&q, &k, &v, self.dims, scale, true, step)?,
            };
            let o = layer.o_proj.forward(b, &attn)?;
            let h2 = layer
                .post_attention_layernorm
                .add_forward(b, &mut residual, &o, self.eps)?;
            let mlp = layer.mlp.forward(b, &h2)?;
            let next_norm = if l == last {
                &w.norm
            } else {
                &w.layers[l + 1].input_layernorm
            };
            h = next_norm.add_forward(b, &mut residual, &mlp, self.eps)?;
        }
        Ok(h)
    }

    /// Logits of the step's sample rows: `[sample_rows, vocab]`.
    pub fn logits(&self, hidden: &B::Tensor, step: &B::Step) -> anyhow::Result<B::Tensor> {
        let rows = self.backend.gather_sample_rows(hidden, step)?;
        self.backend.linear(
            &rows,
            self.w.lm_head.as_ref().unwrap_or(&self.w.embed_tokens),
            None,
        )
    }
}

/// A decoder as a causal LM over the paged KV cache.
pub struct DecoderGenerator<B: Backend> {
    model: Decoder<B>,
    kv: Option<(B::KvCache, KvShape)>,
    builder: StepBuilder,
    info: ModelInfo,
}

impl<B: Backend> DecoderGenerator<B> {
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        info: ModelInfo,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            model: Decoder::load(backend, cfg, src, true)?,
            kv: None,
            builder: StepBuilder::default(),
            info,
        })
    }

    /// Runs a step; returns the logits of the sample rows (None when no seq samples) and
    /// the prepared step (for the sampler).
    fn run(
        &mut self,
        seqs: &[SeqStep<'_>],
        samples: &[SampleSpec<'_>],
    ) -> anyhow::Result<Option<(B::Tensor, B::Step)>> {
        let (cache, shape) = self
            .kv
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("init_kv_cache must be called before the first step"))?;
        if seqs.is_empty() {
            return Ok(None);
        }
        let meta: StepMeta<'_> = self.builder.paged(
            seqs,
            samples,
            shape.block_size,
            shape.num_blocks,
            self.model.vocab,
        )?;
        if let Some(&p) = meta.positions.iter().max() {
            if p as usize >= self.model.max_positions {
                anyhow::bail!(
                    "position {p} exceeds max_position_embeddings {}",
                    self.model.max_positions
                );
            }
        }
        let want = !meta.sample_rows.is_empty();
        let step = self.model.backend.prepare_step(&meta)?;
        let hidden = self.model.forward(&step, Some(cache))?;
        if !want {
            return Ok(None);
        }
        Ok(Some((self.model.logits(&hidden, &step)?, step)))
    }
}

impl<B: Backend> Generator for DecoderGenerator<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn init_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        if num_blocks == 0 || block_size == 0 {
            anyhow::bail!("KV cache needs at least one block of at least one token");
        }
        let shape = self.model.kv_shape(num_blocks, block_size);
        self.kv = Some((self.model.backend.alloc_kv_cache(shape)?, shape));
        Ok(())
    }

    fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>> {
        let samples: Vec<SampleSpec<'_>> = seqs.iter().filter_map(|s| s.sample).collect();
        match self.run(seqs, &samples)? {
            Some((logits, step)) => self.model.backend.sample(&logits, &step),
            None => Ok(Vec::new()),
        }
    }

    fn step_logits(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        match self.run(seqs, &[])? {
            Some((logits, _)) => {
                let (_, vocab) = self.model.backend.shape(&logits);
                Ok(self
                    .model
                    .backend
                    .to_host(&logits)?
                    .chunks(vocab)
                    .map(<[f32]>::to_vec)
                    .collect())
            }
            None => Ok(Vec::new()),
        }
    }
}

/// A decoder as an embedder (Qwen3-Embedding): last-token pooling, L2 normalisation.
pub struct DecoderEmbedder<B: Backend> {
    model: Decoder<B>,
    builder: StepBuilder,
    info: ModelInfo,
}

impl<B: Backend> DecoderEmbedder<B> {
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        info: ModelInfo,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            model: Decoder::load(backend, cfg, src, false)?,
            builder: StepBuilder::default(),
            info,
        })
    }
}

impl<B: Backend> Embedder for DecoderEmbedder<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let meta = self
            .builder
            .dense(inputs, self.model.vocab, self.model.max_positions)?;
        let b = &self.model.backend;
        let step = b.prepare_step(&meta)?;
        let hidden = self.model.forward(&step, None)?;
        let pooled = b.l2_normalize(&b.pool(&hidden, Pooling::Last, &step)?)?;
        let (_, cols) = b.shape(&pooled);
        Ok(b.to_host(&pooled)?
            .chunks(cols)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
