//! Qwen3 decoders, a port of transformers' `modeling_qwen3.py` and `modeling_qwen3_moe.py`
//! onto [`Backend`] ops: embedding, per layer RMSNorm -> q/k/v -> per-head q/k RMSNorm +
//! RoPE -> GQA causal attention -> o_proj -> residual RMSNorm -> feed-forward, final norm,
//! tied or untied `lm_head`. The two architectures differ only in the feed-forward
//! ([`Mlp`]): dense Qwen3 (Qwen3-0.6B ... 8B, Qwen3-Embedding) has a SiLU-gated MLP in every
//! layer; Qwen3-MoE (Qwen3-30B-A3B) has the sparse block of [`super::moe`] in its sparse
//! layers and the dense MLP in `mlp_only_layers`. Field names mirror the Hugging Face
//! parameter names. As a [`Generator`] it runs on the paged KV cache; as an [`Embedder`]
//! (Qwen3-Embedding) it runs dense causal attention, pools the last token and
//! L2-normalises.

use crate::backend::{AttnDims, Backend, Init, KvShape, Pooling, StepMeta};
use crate::model::config::ModelConfig;
use crate::model::moe::SparseMoe;
use crate::model::StepBuilder;
use crate::model_api::{Embedder, Generator, ModelInfo, SampleSpec, SeqStep};
use crate::weights::WeightSource;

/// Std of dummy weights (transformers' `initializer_range`).
const DUMMY_STD: f32 = 0.02;

/// Loads one weight by its name without the `model.` prefix, as `[rows, cols]`, dummy
/// weights filled by the [`Init`].
pub(crate) type GetWeight<'a, T> = dyn Fn(&str, usize, usize, Init) -> anyhow::Result<T> + 'a;

/// A SiLU-gated MLP, `down(silu(gate(x)) * up(x))`: Qwen3's feed-forward and each expert
/// of Qwen3-MoE.
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
enum Mlp<T> {
    Dense(GatedMlp<T>),
    Sparse(SparseMoe<T>),
}

impl<T> Mlp<T> {
    fn forward<B: Backend<Tensor = T>>(&self, b: &B, x: &T) -> anyhow::Result<T> {
        match self {
            Mlp::Dense(m) => m.forward(b, x),
            Mlp::Sparse(m) => m.forward(b, x),
        }
    }
}

struct Layer<T> {
    input_layernorm: T,
    q_proj: T,
    k_proj: T,
    v_proj: T,
    o_proj: T,
    q_norm: T,
    k_norm: T,
    post_attention_layernorm: T,
    mlp: Mlp<T>,
}

/// The weights and shapes of a Qwen3 (dense or MoE) model on a backend.
pub struct Qwen3<B: Backend> {
    backend: B,
    embed_tokens: B::Tensor,
    layers: Vec<Layer<B::Tensor>>,
    norm: B::Tensor,
    /// `None` when tied to `embed_tokens` (or not loaded, for embedders).
    lm_head: Option<B::Tensor>,
    rope: B::Tensor,
    dims: AttnDims,
    eps: f32,
    vocab: usize,
    max_positions: usize,
}

/// The names a parameter may have: checkpoints saved as `Qwen3ForCausalLM` prefix
/// `model.`; `Qwen3Model` (Qwen3-Embedding) does not. Shared with `qwen3_cuda`.
pub(crate) fn param_names(name: &str) -> [String; 2] {
    [format!("model.{name}"), name.to_string()]
}

impl<B: Backend> Qwen3<B> {
    /// Loads the weights; `with_lm_head` is false for embedders.
    pub fn load(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        with_lm_head: bool,
    ) -> anyhow::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv, hd) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
            cfg.head_dim,
        );
        let normal = Init::Normal { std: DUMMY_STD };
        let get = |name: &str, r, c, init| src.get(&backend, &param_names(name), r, c, init);
        let embed_tokens = get("embed_tokens.weight", cfg.vocab_size, h, normal)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = |s: &str| format!("layers.{l}.{s}.weight");
            let mlp = match &cfg.moe {
                Some(moe) if moe.is_sparse(l) => {
                    Mlp::Sparse(SparseMoe::load(&get, l, h, moe, normal)?)
                }
                _ => Mlp::Dense(GatedMlp::load(
                    &get,
                    &format!("layers.{l}.mlp"),
                    h,
                    i,
                    normal,
                )?),
            };
            layers.push(Layer {
                input_layernorm: get(&p("input_layernorm"), 1, h, Init::Ones)?,
                q_proj: get(&p("self_attn.q_proj"), q, h, normal)?,
                k_proj: get(&p("self_attn.k_proj"), kv, h, normal)?,
                v_proj: get(&p("self_attn.v_proj"), kv, h, normal)?,
                o_proj: get(&p("self_attn.o_proj"), h, q, normal)?,
                q_norm: get(&p("self_attn.q_norm"), 1, hd, Init::Ones)?,
                k_norm: get(&p("self_attn.k_norm"), 1, hd, Init::Ones)?,
                post_attention_layernorm: get(&p("post_attention_layernorm"), 1, h, Init::Ones)?,
                mlp,
            });
        }
        let norm = get("norm.weight", 1, h, Init::Ones)?;
        let head_names = ["lm_head.weight".to_string()];
        let lm_head = if with_lm_head && !cfg.tie_word_embeddings {
            Some(src.get(&backend, &head_names, cfg.vocab_size, h, normal)?)
        } else {
            None
        };
        let rope = backend.rope_table(hd, cfg.rope_theta, cfg.max_position_embeddings)?;
        Ok(Self {
            backend,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            dims: AttnDims {
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: hd,
            },
            eps: cfg.norm_eps as f32,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn kv_shape(&self, num_blocks: usize, block_size: usize) -> KvShape {
        KvShape {
            num_layers: self.layers.len(),
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
        let scale = 1.0 / (self.dims.head_dim as f32).sqrt();
        let mut residual = b.embedding(
            &self.embed_tokens,
            step,
            crate::backend::IndexSource::Tokens,
        )?;
        let mut h = b.rms_norm(&residual, &self.layers[0].input_layernorm, self.eps)?;
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let mut q = b.linear(&h, &layer.q_proj, None)?;
            let mut k = b.linear(&h, &layer.k_proj, None)?;
            let v = b.linear(&h, &layer.v_proj, None)?;
            b.qk_norm_rope(
                &mut q,
                &mut k,
                Some(&layer.q_norm),
                Some(&layer.k_norm),
                self.eps,
                &self.rope,
                self.dims,
                step,
            )?;
            let attn = match kv.as_deref_mut() {
                Some(cache) => {
                    b.kv_write(cache, l, &k, &v, step)?;
                    b.paged_attention(&q, cache, l, self.dims, scale, step)?
                }
                None => b.varlen_attention(&q, &k, &v, self.dims, scale, true, step)?,
            };
            let o = b.linear(&attn, &layer.o_proj, None)?;
            let h2 =
                b.add_rms_norm(&mut residual, &o, &layer.post_attention_layernorm, self.eps)?;
            let mlp = layer.mlp.forward(b, &h2)?;
            let next_norm = if l == last {
                &self.norm
            } else {
                &self.layers[l + 1].input_layernorm
            };
            h = b.add_rms_norm(&mut residual, &mlp, next_norm, self.eps)?;
        }
        Ok(h)
    }

    /// Logits of the step's sample rows: `[sample_rows, vocab]`.
    pub fn logits(&self, hidden: &B::Tensor, step: &B::Step) -> anyhow::Result<B::Tensor> {
        let rows = self.backend.gather_sample_rows(hidden, step)?;
        self.backend.linear(
            &rows,
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens),
            None,
        )
    }
}

/// Qwen3 as a causal LM over the paged KV cache.
pub struct Qwen3Generator<B: Backend> {
    model: Qwen3<B>,
    kv: Option<(B::KvCache, KvShape)>,
    builder: StepBuilder,
    info: ModelInfo,
}

impl<B: Backend> Qwen3Generator<B> {
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        info: ModelInfo,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            model: Qwen3::load(backend, cfg, src, true)?,
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

impl<B: Backend> Generator for Qwen3Generator<B> {
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

/// Qwen3 as an embedder (Qwen3-Embedding): last-token pooling, L2 normalisation.
pub struct Qwen3Embedder<B: Backend> {
    model: Qwen3<B>,
    builder: StepBuilder,
    info: ModelInfo,
}

impl<B: Backend> Qwen3Embedder<B> {
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        info: ModelInfo,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            model: Qwen3::load(backend, cfg, src, false)?,
            builder: StepBuilder::default(),
            info,
        })
    }
}

impl<B: Backend> Embedder for Qwen3Embedder<B> {
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
