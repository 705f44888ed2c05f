//! The BERT family's encoder (BERT, all-MiniLM-L6-v2 and kin, RoBERTa, DistilBERT), a port
//! of transformers' `modeling_bert.py` onto [`Backend`] ops, with sentence-transformers'
//! mean pooling and L2 normalisation; the families' names are [`EncoderNames`].
//! Embeddings (word + absolute position + token type 0 where the family has types) ->
//! LayerNorm, then per layer
//! bidirectional attention -> dense -> Add&LayerNorm -> GELU MLP -> Add&LayerNorm.
//! Checkpoints saved from `BertModel` have no `bert.` prefix; from `BertFor*` they do:
//! both load.

use crate::backend::{AttnDims, Backend, Gelu, IndexSource, Init, Pooling};
use crate::model::config::ModelConfig;
use crate::model::encoder::EncoderNames;
use crate::model::StepBuilder;
use crate::model_api::{Embedder, ModelInfo};
use crate::weights::WeightSource;

const DUMMY_STD: f32 = 0.02;

struct Linear<T> {
    weight: T,
    bias: T,
}

struct Norm<T> {
    weight: T,
    bias: T,
}

struct Layer<T> {
    query: Linear<T>,
    key: Linear<T>,
    value: Linear<T>,
    attention_output: Linear<T>,
    attention_norm: Norm<T>,
    intermediate: Linear<T>,
    output: Linear<T>,
    output_norm: Norm<T>,
}

/// A BERT sentence embedder.
pub struct Bert<B: Backend> {
    backend: B,
    word_embeddings: B::Tensor,
    position_embeddings: B::Tensor,
    /// `None`: DistilBERT has no token types.
    token_type_embeddings: Option<B::Tensor>,
    embeddings_norm: Norm<B::Tensor>,
    layers: Vec<Layer<B::Tensor>>,
    dims: AttnDims,
    eps: f32,
    vocab: usize,
    max_positions: usize,
    builder: StepBuilder,
    info: ModelInfo,
}

impl<B: Backend> Bert<B> {
    pub fn new(
        backend: B,
        cfg: &ModelConfig,
        src: &WeightSource,
        info: ModelInfo,
    ) -> anyhow::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let names = EncoderNames::of(cfg)
            .ok_or_else(|| anyhow::anyhow!("{} is not a BERT-family encoder", cfg.arch.name()))?;
        let normal = Init::Normal { std: DUMMY_STD };
        let get = |name: &str, suffix: &str, r, c, init| {
            src.get(&backend, &names.candidates(name, suffix), r, c, init)
        };
        let linear = |name: &str, out, inp| -> anyhow::Result<Linear<B::Tensor>> {
            Ok(Linear {
                weight: get(name, ".weight", out, inp, normal)?,
                bias: get(name, ".bias", 1, out, Init::Zeros)?,
            })
        };
        let norm = |name: &str| -> anyhow::Result<Norm<B::Tensor>> {
            Ok(Norm {
                weight: get(name, ".weight", 1, h, Init::Ones)?,
                bias: get(name, ".bias", 1, h, Init::Zeros)?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = names.layer(l);
            layers.push(Layer {
                query: linear(&n.query, h, h)?,
                key: linear(&n.key, h, h)?,
                value: linear(&n.value, h, h)?,
                attention_output: linear(&n.attention_output, h, h)?,
                attention_norm: norm(&n.attention_norm)?,
                intermediate: linear(&n.intermediate, i, h)?,
                output: linear(&n.output, h, i)?,
                output_norm: norm(&n.output_norm)?,
            });
        }
        let offset = cfg.position_offset;
        Ok(Self {
            word_embeddings: get(
                names.word_embeddings(),
                ".weight",
                cfg.vocab_size,
                h,
                normal,
            )?,
            position_embeddings: src.get_rows_after(
                &backend,
                &names.candidates(names.position_embeddings(), ".weight"),
                (cfg.max_position_embeddings + offset, offset),
                h,
                normal,
            )?,
            token_type_embeddings: names
                .token_type_embeddings()
                .map(|t| get(t, ".weight", cfg.type_vocab_size, h, normal))
                .transpose()?,
            embeddings_norm: norm(names.embeddings_norm())?,
            layers,
            dims: AttnDims {
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_attention_heads,
                head_dim: cfg.head_dim,
            },
            eps: cfg.norm_eps as f32,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            builder: StepBuilder::default(),
            info,
            backend,
        })
    }
}

impl<B: Backend> Embedder for Bert<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let meta = self.builder.dense(inputs, self.vocab, self.max_positions)?;
        let b = &self.backend;
        let step = b.prepare_step(&meta)?;
        let mut x = b.embedding(&self.word_embeddings, &step, IndexSource::Tokens)?;
        b.add_assign(
            &mut x,
            &b.embedding(&self.position_embeddings, &step, IndexSource::Positions)?,
        )?;
        if let Some(types) = &self.token_type_embeddings {
            b.add_assign(&mut x, &b.embedding(types, &step, IndexSource::Zero)?)?;
        }
        let n = &self.embeddings_norm;
        let mut x = b.layer_norm(&x, None, &n.weight, &n.bias, self.eps)?;
        let scale = 1.0 / (self.dims.head_dim as f32).sqrt();
        for layer in &self.layers {
            let lin = |x: &B::Tensor, l: &Linear<B::Tensor>| b.linear(x, &l.weight, Some(&l.bias));
            let (q, k, v) = (
                lin(&x, &layer.query)?,
                lin(&x, &layer.key)?,
                lin(&x, &layer.value)?,
            );
            let attn = b.varlen_attention(&q, &k, &v, self.dims, scale, false, &step)?;
            let o = lin(&attn, &layer.attention_output)?;
            let an = &layer.attention_norm;
            x = b.layer_norm(&o, Some(&x), &an.weight, &an.bias, self.eps)?;
            let mid = b.gelu(&lin(&x, &layer.intermediate)?, Gelu::Erf)?;
            let out = lin(&mid, &layer.output)?;
            let on = &layer.output_norm;
            x = b.layer_norm(&out, Some(&x), &on.weight, &on.bias, self.eps)?;
        }
        let pooled = b.l2_normalize(&b.pool(&x, Pooling::Mean, &step)?)?;
        let (_, cols) = b.shape(&pooled);
        Ok(b.to_host(&pooled)?
            .chunks(cols)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
