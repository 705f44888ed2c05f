//! The checkpoint names of Qwen3 and its relatives, a port of transformers'
//! `modeling_qwen3.py`, `modeling_qwen3_moe.py`, `modeling_qwen2.py`, `modeling_llama.py`
//! and `modeling_mistral.py` onto the one decoder ([`super::decoder`]): they share one
//! naming (`model.embed_tokens`, `model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
//! post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head`), and
//! differ in what the config's [`DecoderLayout`] says: Qwen3's `self_attn.{q,k}_norm`,
//! Qwen2's q/k/v biases (and `attention_bias` of Llama and Qwen3: q/k/v/o), Qwen3-MoE's
//! sparse blocks in its sparse layers (`mlp.gate`, `mlp.experts.E.*`, see
//! [`super::moe`]); Llama and Mistral are the plain case. RoPE and its scaling are the
//! decoder's, from the config.

use crate::backend::{Backend, Init};
use crate::model::config::{DecoderLayout, ModelConfig};
use crate::model::decoder::{DecoderWeights, GatedMlp, Layer, Linear, Mlp, Norm, DUMMY_STD};
use crate::model::moe::SparseMoe;
use crate::weights::WeightSource;

/// The names a parameter may have: checkpoints saved as `*ForCausalLM` prefix `model.`;
/// `Qwen3Model` (Qwen3-Embedding) does not. Shared with `qwen3_cuda`.
pub(crate) fn param_names(name: &str) -> [String; 2] {
    [format!("model.{name}"), name.to_string()]
}

/// Loads the weights of a Qwen3 / Qwen3-MoE / Qwen2 / Llama / Mistral checkpoint (or dummy
/// ones of its shapes); `with_lm_head` is false for embedders.
pub(crate) fn load<B: Backend>(
    backend: &B,
    cfg: &ModelConfig,
    layout: &DecoderLayout,
    src: &WeightSource,
    with_lm_head: bool,
) -> anyhow::Result<DecoderWeights<B::Tensor>> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv, hd) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.head_dim,
    );
    let normal = Init::Normal { std: DUMMY_STD };
    let get = |name: &str, r, c, init| src.get(backend, &param_names(name), r, c, init);
    let rms = layout.norm;
    let embed_tokens = get("embed_tokens.weight", cfg.vocab_size, h, normal)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("layers.{l}.{s}");
        let mlp = match &cfg.moe {
            Some(moe) if moe.is_sparse(l) => Mlp::Sparse(SparseMoe::load(&get, l, h, moe, normal)?),
            _ => Mlp::Gated(GatedMlp::load(&get, &p("mlp"), h, i, normal)?),
        };
        let qk_norm = |s: &str| -> anyhow::Result<_> {
            match layout.qk_norm {
                true => Ok(Some(get(
                    &p(&format!("self_attn.{s}.weight")),
                    1,
                    hd,
                    Init::Ones,
                )?)),
                false => Ok(None),
            }
        };
        layers.push(Layer {
            input_layernorm: Norm::load(&get, &p("input_layernorm"), h, rms)?,
            q_proj: Linear::load(&get, &p("self_attn.q_proj"), q, h, layout.qkv_bias)?,
            k_proj: Linear::load(&get, &p("self_attn.k_proj"), kv, h, layout.qkv_bias)?,
            v_proj: Linear::load(&get, &p("self_attn.v_proj"), kv, h, layout.qkv_bias)?,
            o_proj: Linear::load(&get, &p("self_attn.o_proj"), h, q, layout.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            post_attention_layernorm: Norm::load(&get, &p("post_attention_layernorm"), h, rms)?,
            mlp,
        });
    }
    let norm = Norm::load(&get, "norm", h, rms)?;
    let head_names = ["lm_head.weight".to_string()];
    let lm_head = if with_lm_head && !cfg.tie_word_embeddings {
        Some(src.get(backend, &head_names, cfg.vocab_size, h, normal)?)
    } else {
        None
    };
    Ok(DecoderWeights {
        embed_tokens,
        embed_positions: None,
        layers,
        norm,
        lm_head,
    })
}
