//! Presets of the decoder families beyond Qwen3, mirroring the released models'
//! `config.json` (and `generation_config.json`'s EOS ids), plus the tiny ones the test
//! fixtures are (`testdata/{llama,qwen2,gpt2}-tiny`, made by
//! `scripts/gpu/make-decoder-fixtures.py`; a preset's EOS is the byte-level tokenizer's).
//!
//! - Llama-3.2-1B/3B (`meta-llama/Llama-3.2-{1B,3B}-Instruct`, the A100 study's 3B):
//!   Llama 3 RoPE scaling (factor 32, low 1, high 4, original 8192 positions), tied
//!   embeddings, EOS `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`.
//! - Mistral-7B (`mistralai/Mistral-7B-Instruct-v0.3`: vocab 32768, no sliding window;
//!   the study's v0.2 differs only in its 32000-token vocab).
//! - Qwen2.5-0.5B ... 7B (`Qwen/Qwen2.5-*-Instruct`, the blog's family: 32768 positions;
//!   the base 1.5B and 7B declare 131072, same shapes).
//! - GPT-2 and DistilGPT2 (`openai-community/gpt2`, `distilbert/distilgpt2`: 12 and 6
//!   layers; their checkpoints are float32 but the config names no dtype, read as 16-bit
//!   as vLLM serves them).
//! - The BERT family's encoders (the A100 study's DistilBERT and RoBERTa, and the
//!   sentence-transformers MiniLM): `bert-base-uncased`, `all-minilm-l6-v2`,
//!   `roberta-base`, `distilroberta-base`, `distilbert-base-uncased`, and the tiny ones of
//!   `testdata/{bert,roberta,distilbert}-tiny` (scripts/gpu/make-encoder-fixtures.py).

use super::{Activation, Arch, ModelConfig, RopeScaling};
use crate::backend::Gelu;
use crate::model_api::Task;

/// One preset's fields.
struct Shape {
    arch: Arch,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    max_positions: usize,
    eps: f64,
    theta: f64,
    scaling: Option<RopeScaling>,
    tied: bool,
    eos: &'static [u32],
}

const LLAMA_3_ROPE: RopeScaling = RopeScaling::Llama3 {
    factor: 32.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

/// The fixture's: frequencies in all three bands within a few dozen positions.
const TINY_LLAMA_ROPE: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 64,
};

const LLAMA_3_EOS: &[u32] = &[128_001, 128_008, 128_009];
const QWEN2_EOS: &[u32] = &[151_645, 151_643];

#[rustfmt::skip]
fn shape(name: &str) -> Option<Shape> {
    use Arch::*;
    let s = |arch, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, max_positions,
             eps, theta, scaling, tied, eos| Shape {
        arch, hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, max_positions,
        eps, theta, scaling, tied, eos,
    };
    let tiny: &[u32] = &[crate::tokenizer::BYTE_LEVEL_EOS];
    Some(match name {
        //                  hidden  inter   layers heads kv hd   vocab    positions eps   theta
        "llama-tiny" => s(Llama, 64, 128, 2, 4, 2, 16, 512, 512, 1e-5, 10_000.0,
            Some(TINY_LLAMA_ROPE), true, tiny),
        "llama-3.2-1b" => s(Llama, 2048, 8192, 16, 32, 8, 64, 128_256, 131_072, 1e-5, 500_000.0,
            Some(LLAMA_3_ROPE), true, LLAMA_3_EOS),
        "llama-3.2-3b" => s(Llama, 3072, 8192, 28, 24, 8, 128, 128_256, 131_072, 1e-5, 500_000.0,
            Some(LLAMA_3_ROPE), true, LLAMA_3_EOS),
        "mistral-7b" => s(Mistral, 4096, 14_336, 32, 32, 8, 128, 32_768, 32_768, 1e-5,
            1_000_000.0, None, false, &[2]),
        "qwen2-tiny" => s(Qwen2, 64, 128, 2, 4, 2, 16, 512, 512, 1e-6, 1_000_000.0, None, false,
            tiny),
        "qwen2.5-0.5b" => s(Qwen2, 896, 4864, 24, 14, 2, 64, 151_936, 32_768, 1e-6, 1_000_000.0,
            None, true, QWEN2_EOS),
        "qwen2.5-1.5b" => s(Qwen2, 1536, 8960, 28, 12, 2, 128, 151_936, 32_768, 1e-6,
            1_000_000.0, None, true, QWEN2_EOS),
        "qwen2.5-3b" => s(Qwen2, 2048, 11_008, 36, 16, 2, 128, 151_936, 32_768, 1e-6,
            1_000_000.0, None, true, QWEN2_EOS),
        "qwen2.5-7b" => s(Qwen2, 3584, 18_944, 28, 28, 4, 128, 152_064, 32_768, 1e-6,
            1_000_000.0, None, false, QWEN2_EOS),
        "gpt2-tiny" => s(Gpt2, 64, 256, 2, 4, 4, 16, 512, 128, 1e-5, 10_000.0, None, true, tiny),
        "gpt2" => s(Gpt2, 768, 3072, 12, 12, 12, 64, 50_257, 1024, 1e-5, 10_000.0, None, true,
            &[50_256]),
        "distilgpt2" => s(Gpt2, 768, 3072, 6, 12, 12, 64, 50_257, 1024, 1e-5, 10_000.0, None,
            true, &[50_256]),
        _ => return None,
    })
}

/// An encoder preset's fields; positions as usable (RoBERTa's table has 2 rows more).
struct EncoderShape(Arch, usize, usize, usize, usize, usize, usize, usize, f64);

/// (arch, hidden, intermediate, layers, heads, vocab, positions, token types, eps)
#[rustfmt::skip]
fn encoder(name: &str) -> Option<EncoderShape> {
    use Arch::*;
    let s = EncoderShape;
    Some(match name {
        "bert-tiny" => s(Bert, 64, 128, 2, 4, 512, 64, 2, 1e-12),
        "bert-base-uncased" => s(Bert, 768, 3072, 12, 12, 30_522, 512, 2, 1e-12),
        "all-minilm-l6-v2" => s(Bert, 384, 1536, 6, 12, 30_522, 512, 2, 1e-12),
        "roberta-tiny" => s(Roberta, 64, 128, 2, 4, 512, 64, 1, 1e-5),
        "roberta-base" => s(Roberta, 768, 3072, 12, 12, 50_265, 512, 1, 1e-5),
        "distilroberta-base" => s(Roberta, 768, 3072, 6, 12, 50_265, 512, 1, 1e-5),
        "distilbert-tiny" => s(DistilBert, 64, 128, 2, 4, 512, 64, 0, 1e-12),
        "distilbert-base-uncased" => s(DistilBert, 768, 3072, 6, 12, 30_522, 512, 0, 1e-12),
        _ => return None,
    })
}

/// The config of preset `name` of these families (`None`: not one of theirs).
pub(super) fn other(name: &str) -> Option<anyhow::Result<ModelConfig>> {
    if let Some(EncoderShape(arch, h, i, layers, heads, vocab, positions, types, eps)) =
        encoder(name)
    {
        return Some(Ok(ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: h / heads,
            max_position_embeddings: positions,
            norm_eps: eps,
            rope_theta: 10_000.0,
            rope_scaling: None,
            attention_bias: false,
            activation: Activation::Gelu(Gelu::Erf),
            tie_word_embeddings: true,
            type_vocab_size: types,
            position_offset: if arch == Arch::Roberta { 2 } else { 0 },
            eos_token_ids: Vec::new(),
            stored_dtype_bytes: if name.ends_with("-tiny") { 4 } else { 2 },
            default_task: Task::Embed,
            moe: None,
            fp8: None,
        }));
    }
    let s = shape(name)?;
    let tiny = name.ends_with("-tiny");
    Some(Ok(ModelConfig {
        arch: s.arch,
        vocab_size: s.vocab,
        hidden_size: s.hidden,
        intermediate_size: s.intermediate,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        num_key_value_heads: s.kv_heads,
        head_dim: s.head_dim,
        max_position_embeddings: s.max_positions,
        norm_eps: s.eps,
        rope_theta: s.theta,
        rope_scaling: s.scaling,
        attention_bias: false,
        activation: if s.arch == Arch::Gpt2 {
            Activation::Gelu(Gelu::Tanh)
        } else {
            Activation::Silu
        },
        tie_word_embeddings: s.tied,
        type_vocab_size: 0,
        position_offset: 0,
        eos_token_ids: s.eos.to_vec(),
        stored_dtype_bytes: if tiny { 4 } else { 2 },
        default_task: Task::Generate,
        moe: None,
        fp8: None,
    }))
}
