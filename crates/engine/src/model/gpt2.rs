//! GPT-2's checkpoint names, a port of transformers' `modeling_gpt2.py` onto the one
//! decoder ([`super::decoder`]): `wte` and the learned positions `wpe`, per layer `ln_1`
//! -> `attn.c_attn` (q, k and v fused) -> `attn.c_proj` -> `ln_2` -> `mlp.c_fc` -> GELU ->
//! `mlp.c_proj`, then `ln_f`; LayerNorms and biases everywhere, `lm_head` tied to `wte`.
//! GPT-2's projections are `Conv1D`s, stored `[in, out]` (the transpose of a Linear's):
//! they are read transposed, and `c_attn` split into q, k and v
//! ([`WeightSource::get_conv1d`]). Checkpoints saved from `GPT2LMHeadModel` prefix
//! `transformer.`; the original uploads do not: both load. DistilGPT2 is GPT-2 with 6
//! layers.

use crate::backend::Backend;
use crate::model::config::{DecoderLayout, MlpKind, ModelConfig};
use crate::model::decoder::{DecoderWeights, Layer, Linear, Mlp, Norm, DUMMY_STD};
use crate::weights::WeightSource;

use crate::backend::Init;

fn names(name: &str) -> [String; 2] {
    [format!("transformer.{name}"), name.to_string()]
}

/// Loads a GPT-2 checkpoint (or dummy weights of its shapes); `with_lm_head` is false for
/// embedders.
pub(crate) fn load<B: Backend>(
    backend: &B,
    cfg: &ModelConfig,
    layout: &DecoderLayout,
    src: &WeightSource,
    with_lm_head: bool,
) -> anyhow::Result<DecoderWeights<B::Tensor>> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    if cfg.num_key_value_heads != cfg.num_attention_heads
        || cfg.num_attention_heads * cfg.head_dim != h
    {
        anyhow::bail!(
            "gpt2: {} heads of {} do not make hidden size {h}",
            cfg.num_attention_heads,
            cfg.head_dim
        );
    }
    let MlpKind::Gelu(gelu) = layout.mlp else {
        anyhow::bail!("gpt2: the MLP is a GELU one");
    };
    let normal = Init::Normal { std: DUMMY_STD };
    let get = |name: &str, r, c, init| src.get(backend, &names(name), r, c, init);
    // A Conv1D `{prefix}` of `inp` -> `out` features as `parts` Linears, with their biases.
    let conv1d = |prefix: &str, inp: usize, out: usize, parts: usize| {
        let weights = src.get_conv1d(
            backend,
            &names(&format!("{prefix}.weight")),
            inp,
            out,
            parts,
            normal,
        )?;
        let biases = src.get_split(
            backend,
            &names(&format!("{prefix}.bias")),
            out,
            parts,
            Init::Zeros,
        )?;
        anyhow::Ok(
            weights
                .into_iter()
                .zip(biases)
                .map(|(weight, bias)| Linear {
                    weight,
                    bias: Some(bias),
                })
                .collect::<Vec<_>>(),
        )
    };
    let one = |prefix: &str, inp, out| -> anyhow::Result<Linear<B::Tensor>> {
        Ok(conv1d(prefix, inp, out, 1)?.remove(0))
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        let [q_proj, k_proj, v_proj]: [Linear<B::Tensor>; 3] =
            conv1d(&p("attn.c_attn"), h, 3 * h, 3)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("c_attn splits into three"))?;
        layers.push(Layer {
            input_layernorm: Norm::load(&get, &p("ln_1"), h, layout.norm)?,
            q_proj,
            k_proj,
            v_proj,
            o_proj: one(&p("attn.c_proj"), h, h)?,
            q_norm: None,
            k_norm: None,
            post_attention_layernorm: Norm::load(&get, &p("ln_2"), h, layout.norm)?,
            mlp: Mlp::Gelu {
                fc: one(&p("mlp.c_fc"), h, i)?,
                proj: one(&p("mlp.c_proj"), i, h)?,
                kind: gelu,
            },
        });
    }
    let lm_head = if with_lm_head && !cfg.tie_word_embeddings {
        Some(src.get(
            backend,
            &["lm_head.weight".to_string()],
            cfg.vocab_size,
            h,
            normal,
        )?)
    } else {
        None
    };
    Ok(DecoderWeights {
        embed_tokens: get("wte.weight", cfg.vocab_size, h, normal)?,
        embed_positions: Some(get("wpe.weight", cfg.max_position_embeddings, h, normal)?),
        layers,
        norm: Norm::load(&get, "ln_f", h, layout.norm)?,
        lm_head,
    })
}
