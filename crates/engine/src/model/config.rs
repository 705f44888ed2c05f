//! Model configuration: where `--model` points (a preset or a folder), the config read from
//! a Hugging Face `config.json` or built from a preset that mirrors a released model's
//! config ([`presets`] for the families beyond Qwen3), plus the memory formulas the planner
//! (`deploy`) shares with the engine. The mixture-of-experts keys of `qwen3_moe` are
//! [`moe`]'s, a block-FP8 `quantization_config` is [`fp8`]'s, RoPE scaling is [`rope`]'s,
//! and what tells the decoder families apart ([`DecoderLayout`]) is [`layout`]'s.
//!
//! A decoder whose config slides its attention window (`sliding_window` of Mistral, or of
//! Qwen2/Qwen3 with `use_sliding_window`) is read with `max_position_embeddings` capped
//! at the window: within it, sliding and full attention are the same, so every sequence
//! the engine accepts is computed exactly.

mod fp8;
mod layout;
mod moe;
mod presets;
mod rope;

use std::path::Path;

use anyhow::Context as _;
use serde::Deserialize;

use crate::model_api::Task;

/// Architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Qwen3 dense decoder (`model_type: qwen3`).
    Qwen3,
    /// Qwen3 mixture-of-experts decoder (`model_type: qwen3_moe`, Qwen3-30B-A3B): Qwen3's
    /// attention, a sparse MoE block in place of the MLP (see [`MoeConfig::is_sparse`]).
    Qwen3Moe,
    /// Qwen2 / Qwen2.5 decoder (`model_type: qwen2`): Qwen3 without q/k norm, with q/k/v
    /// biases.
    Qwen2,
    /// Llama decoder (`model_type: llama`: Llama-3.x), RoPE scaled as its config says.
    Llama,
    /// Mistral decoder (`model_type: mistral`): Llama's layers.
    Mistral,
    /// GPT-2 (`model_type: gpt2`, also DistilGPT2): learned positions, LayerNorm, GELU.
    Gpt2,
    /// BERT encoder (`model_type: bert`: BERT, MiniLM).
    Bert,
    /// RoBERTa encoder (`model_type: roberta`): BERT's layers, positions numbered from
    /// `pad_token_id + 1` ([`ModelConfig::position_offset`]).
    Roberta,
    /// DistilBERT encoder (`model_type: distilbert`): BERT's layers under other names, no
    /// token types.
    DistilBert,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Gpt2 => "gpt2",
            Arch::Bert => "bert",
            Arch::Roberta => "roberta",
            Arch::DistilBert => "distilbert",
        }
    }

    /// The `model_type` values read, in this order.
    const ALL: [Arch; 9] = [
        Arch::Qwen3,
        Arch::Qwen3Moe,
        Arch::Qwen2,
        Arch::Llama,
        Arch::Mistral,
        Arch::Gpt2,
        Arch::Bert,
        Arch::Roberta,
        Arch::DistilBert,
    ];

    /// A causal decoder, as opposed to an encoder.
    pub fn is_decoder(self) -> bool {
        !self.is_encoder()
    }

    /// A BERT-family encoder (BERT, RoBERTa, DistilBERT): embeds, never generates.
    pub fn is_encoder(self) -> bool {
        matches!(self, Arch::Bert | Arch::Roberta | Arch::DistilBert)
    }
}

pub use fp8::{Fp8Config, Fp8Kept};
pub use layout::{DecoderLayout, MlpKind, NormKind, PositionKind};
pub use moe::MoeConfig;
pub use rope::{cos_sin, inv_freq, RopeScaling};

use crate::backend::Gelu;

/// The activation of a model's MLP (`hidden_act`, GPT-2's `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` (the gated MLPs of Llama and Qwen).
    Silu,
    /// `gelu` ([`Gelu::Erf`]) or `gelu_new` / `gelu_pytorch_tanh` ([`Gelu::Tanh`]).
    Gelu(Gelu),
}

impl Activation {
    fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu(Gelu::Erf),
            "gelu_new" | "gelu_pytorch_tanh" => Activation::Gelu(Gelu::Tanh),
            other => anyhow::bail!(
                "unsupported activation {other:?} (supported: silu, gelu, gelu_new, gelu_pytorch_tanh)"
            ),
        })
    }
}

/// The fields of a model config the engine uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// RMSNorm eps (Qwen3, Qwen2, Llama, Mistral) or LayerNorm eps (BERT, GPT-2).
    pub norm_eps: f64,
    pub rope_theta: f64,
    /// RoPE scaling (`None`: the default RoPE); see [`ModelConfig::rope_inv_freq`].
    pub rope_scaling: Option<RopeScaling>,
    /// `attention_bias` of Llama and Qwen3: biases on q/k/v/o (Qwen2 and GPT-2 have theirs
    /// by architecture; [`ModelConfig::layout`] decides).
    pub attention_bias: bool,
    /// The MLP's activation.
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    /// BERT token types.
    pub type_vocab_size: usize,
    /// Rows of the position table before position 0: RoBERTa's `pad_token_id + 1` (its
    /// table has `max_position_embeddings + position_offset` rows); 0 for the others.
    pub position_offset: usize,
    /// End-of-sequence ids from `config.json` (`generation_config.json` overrides at load).
    pub eos_token_ids: Vec<u32>,
    /// Bytes per weight element as stored (bf16 = 2, f32 = 4).
    pub stored_dtype_bytes: usize,
    /// The task this model is for when `--task` is not given.
    pub default_task: Task,
    /// The experts of a `qwen3_moe` model (`None` for dense models).
    pub moe: Option<MoeConfig>,
    /// A block-FP8 checkpoint's `quantization_config` (`None`: weights stored as floats).
    pub fp8: Option<Fp8Config>,
}

/// Presets (`preset:NAME`) with the configs of the released models: Qwen3's here, the
/// other families' in [`presets`].
const PRESETS: &[&str] = &[
    "qwen3-tiny",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-embedding-0.6b",
    "qwen3-embedding-8b",
    "qwen3-moe-tiny",
    "qwen3-30b-a3b",
    "qwen3-30b-a3b-fp8",
    "llama-tiny",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "mistral-7b",
    "qwen2-tiny",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "gpt2-tiny",
    "gpt2",
    "distilgpt2",
    "bert-tiny",
    "bert-base-uncased",
    "all-minilm-l6-v2",
    "roberta-tiny",
    "roberta-base",
    "distilroberta-base",
    "distilbert-tiny",
    "distilbert-base-uncased",
];

/// Names accepted after `preset:`.
pub fn preset_names() -> &'static [&'static str] {
    PRESETS
}

/// What a `--model` string names: the one reading of it, for the engine's loader and
/// deploy's memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelLocation<'a> {
    /// `preset:NAME` ([`ModelConfig::from_preset`]): a config without files.
    Preset(&'a str),
    /// A folder on this machine: `config.json`, weights, tokenizer.
    Folder(&'a Path),
    /// Anything else: a file, a Hugging Face id, a folder that is not on this machine.
    Elsewhere(&'a str),
}

impl<'a> ModelLocation<'a> {
    /// Reads `model` as written after `--model` or in a deployment's `model`.
    pub fn of(model: &'a str) -> Self {
        if let Some(name) = model.strip_prefix("preset:") {
            return ModelLocation::Preset(name);
        }
        let path = Path::new(model);
        if path.is_dir() {
            ModelLocation::Folder(path)
        } else {
            ModelLocation::Elsewhere(model)
        }
    }
}

/// Raw `config.json` fields (both transformers 4 and 5 spellings, and GPT-2's own names).
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    /// GPT-2's `n_embd`, DistilBERT's `dim`.
    #[serde(alias = "n_embd", alias = "dim")]
    hidden_size: usize,
    /// GPT-2's `n_inner` (null: 4 x hidden), DistilBERT's `hidden_dim`.
    #[serde(alias = "n_inner", alias = "hidden_dim")]
    intermediate_size: Option<usize>,
    #[serde(alias = "n_layer", alias = "n_layers")]
    num_hidden_layers: usize,
    #[serde(alias = "n_head", alias = "n_heads")]
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: usize,
    rms_norm_eps: Option<f64>,
    #[serde(alias = "layer_norm_epsilon")]
    layer_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<rope::RawRope>,
    rope_scaling: Option<rope::RawRope>,
    tie_word_embeddings: Option<bool>,
    type_vocab_size: Option<usize>,
    eos_token_id: Option<EosIds>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    /// GPT-2's `activation_function`, DistilBERT's `activation`.
    #[serde(alias = "activation_function", alias = "activation")]
    hidden_act: Option<String>,
    /// RoBERTa numbers positions from `pad_token_id + 1`.
    pad_token_id: Option<usize>,
    /// DistilBERT's fixed sinusoidal position table (not supported: every released
    /// DistilBERT learned its positions).
    sinusoidal_pos_embds: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    #[serde(flatten)]
    moe: moe::RawMoe,
    quantization_config: Option<fp8::RawQuantization>,
}

/// `eos_token_id` is an int or a list in HF configs.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

impl EosIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            EosIds::One(i) => vec![i],
            EosIds::Many(v) => v,
        }
    }
}

fn dtype_bytes(name: Option<&str>) -> usize {
    match name {
        Some("float32") => 4,
        _ => 2,
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`. Errors name the file and the problem.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = Arch::ALL
            .into_iter()
            .find(|a| a.name() == model_type)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unsupported model_type {model_type:?} (architectures {:?}); supported: {}",
                    raw.architectures,
                    Arch::ALL.map(Arch::name).join(", ")
                )
            })?;
        if raw.num_attention_heads == 0 || raw.num_hidden_layers == 0 || raw.hidden_size == 0 {
            anyhow::bail!("hidden_size, num_hidden_layers and num_attention_heads must be > 0");
        }
        let intermediate_size = match (raw.intermediate_size, arch) {
            (Some(i), _) => i,
            (None, Arch::Gpt2) => 4 * raw.hidden_size,
            (None, _) => anyhow::bail!("intermediate_size is missing"),
        };
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        let num_kv = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv == 0 || !raw.num_attention_heads.is_multiple_of(num_kv) {
            anyhow::bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv}",
                raw.num_attention_heads
            );
        }
        let activation = match (raw.hidden_act.as_deref(), arch) {
            (Some(a), _) => Activation::parse(a)?,
            (None, a) if a.is_encoder() => Activation::Gelu(Gelu::Erf),
            (None, Arch::Gpt2) => Activation::Gelu(Gelu::Tanh),
            (None, _) => Activation::Silu,
        };
        match (arch, activation) {
            (a, Activation::Gelu(Gelu::Erf)) if a.is_encoder() => {}
            (Arch::Gpt2, Activation::Gelu(_)) => {}
            (a, _) if a.is_encoder() || a == Arch::Gpt2 => anyhow::bail!(
                "unsupported {} activation {:?} (only gelu{})",
                arch.name(),
                raw.hidden_act.as_deref().unwrap_or_default(),
                if arch == Arch::Gpt2 { ", gelu_new" } else { "" }
            ),
            (_, Activation::Silu) => {}
            (_, Activation::Gelu(_)) => anyhow::bail!(
                "unsupported {} hidden_act {:?} (only silu)",
                arch.name(),
                raw.hidden_act.as_deref().unwrap_or_default()
            ),
        }
        if raw.mlp_bias == Some(true) {
            anyhow::bail!("mlp_bias: MLP biases of {} are not supported", arch.name());
        }
        if arch == Arch::Gpt2
            && (raw.scale_attn_weights == Some(false)
                || raw.scale_attn_by_inverse_layer_idx == Some(true))
        {
            anyhow::bail!(
                "GPT-2 attention scaling other than 1/sqrt(head_dim) (scale_attn_weights false or scale_attn_by_inverse_layer_idx true) is not supported"
            );
        }
        let rope_theta = raw
            .rope_theta
            .or(raw.rope_parameters.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref()) {
            Some(r) if arch.is_decoder() && arch != Arch::Gpt2 => r.scaling()?,
            _ => None,
        };
        let window = match arch {
            Arch::Mistral => raw.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe if raw.use_sliding_window == Some(true) => {
                raw.sliding_window
            }
            _ => None,
        };
        let max_position_embeddings = window.map_or(raw.max_position_embeddings, |w| {
            w.clamp(1, raw.max_position_embeddings)
        });
        // A decoder saved as its bare model (`Qwen3Model`: Qwen3-Embedding) embeds; one
        // with an LM head (`*ForCausalLM`, GPT-2's `GPT2LMHeadModel`) generates.
        let is_embedding = raw
            .architectures
            .iter()
            .any(|a| a.ends_with("Model") && !a.ends_with("LMHeadModel") && arch.is_decoder());
        let default_task = if arch.is_encoder() || is_embedding {
            Task::Embed
        } else {
            Task::Generate
        };
        let moe = match arch {
            Arch::Qwen3Moe => Some(raw.moe.resolve(raw.num_hidden_layers)?),
            _ => None,
        };
        let fp8 = match raw.quantization_config {
            Some(_) if !matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) => {
                anyhow::bail!("quantization_config: FP8 checkpoints are supported for qwen3 and qwen3_moe only")
            }
            Some(q) => Some(q.resolve()?),
            None => None,
        };
        if raw.sinusoidal_pos_embds == Some(true) {
            anyhow::bail!("sinusoidal_pos_embds: DistilBERT's fixed sinusoidal positions are not supported (only learned ones)");
        }
        // RoBERTa's positions start past the padding id; the usable ones are those after.
        let position_offset = match arch {
            Arch::Roberta => raw.pad_token_id.unwrap_or(1) + 1,
            _ => 0,
        };
        let Some(max_position_embeddings) = max_position_embeddings
            .checked_sub(position_offset)
            .filter(|&n| n > 0)
        else {
            anyhow::bail!(
                "max_position_embeddings {max_position_embeddings} leaves no position after RoBERTa's offset of pad_token_id + 1 = {position_offset}"
            );
        };
        let layer_norm = arch.is_encoder() || arch == Arch::Gpt2;
        Ok(Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: num_kv,
            head_dim,
            max_position_embeddings,
            norm_eps: match (arch, layer_norm) {
                (Arch::Gpt2, _) => raw.layer_norm_eps.unwrap_or(1e-5),
                (_, true) => raw.layer_norm_eps.unwrap_or(1e-12),
                (_, false) => raw.rms_norm_eps.unwrap_or(1e-6),
            },
            rope_theta,
            rope_scaling,
            attention_bias: raw.attention_bias.unwrap_or(false),
            activation,
            // transformers' default ties (PretrainedConfig); the decoders' own configs
            // default to untied.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(layer_norm),
            // Token types are BERT's; a decoder has none (as its presets say).
            type_vocab_size: match arch {
                Arch::Bert | Arch::Roberta => raw.type_vocab_size.unwrap_or(2),
                _ => 0,
            },
            position_offset,
            eos_token_ids: raw.eos_token_id.map(EosIds::into_vec).unwrap_or_default(),
            stored_dtype_bytes: dtype_bytes(raw.torch_dtype.as_deref().or(raw.dtype.as_deref())),
            default_task,
            moe,
            fp8,
        })
    }

    /// The config of a preset (see [`preset_names`]); `name` without the `preset:` prefix.
    pub fn from_preset(name: &str) -> anyhow::Result<Self> {
        // (hidden, intermediate, layers, heads, kv heads, vocab, max positions, tied, task)
        let (h, i, l, nh, nkv, vocab, max_pos, tied, task) = match name {
            "qwen3-tiny" => (64, 128, 2, 4, 2, 512, 4096, false, Task::Generate),
            "qwen3-moe-tiny" => (64, 128, 3, 4, 2, 512, 4096, false, Task::Generate),
            "qwen3-0.6b" => (1024, 3072, 28, 16, 8, 151_936, 40_960, true, Task::Generate),
            "qwen3-1.7b" => (2048, 6144, 28, 16, 8, 151_936, 40_960, true, Task::Generate),
            "qwen3-4b" => (2560, 9728, 36, 32, 8, 151_936, 40_960, true, Task::Generate),
            "qwen3-8b" => (
                4096,
                12_288,
                36,
                32,
                8,
                151_936,
                40_960,
                false,
                Task::Generate,
            ),
            "qwen3-embedding-0.6b" => (1024, 3072, 28, 16, 8, 151_669, 32_768, true, Task::Embed),
            "qwen3-embedding-8b" => (4096, 12_288, 36, 32, 8, 151_665, 40_960, false, Task::Embed),
            "qwen3-30b-a3b" | "qwen3-30b-a3b-fp8" => (
                2048,
                6144,
                48,
                32,
                4,
                151_936,
                40_960,
                false,
                Task::Generate,
            ),
            other => {
                return presets::other(other).unwrap_or_else(|| {
                    anyhow::bail!("unknown preset {other:?}; presets: {}", PRESETS.join(", "))
                })
            }
        };
        let tiny = name.ends_with("-tiny");
        let moe = match name {
            // The test fixture's shape (scripts/gpu/make-moe-fixture.py): layer 1 dense.
            "qwen3-moe-tiny" => Some(MoeConfig {
                num_experts: 8,
                num_experts_per_tok: 2,
                moe_intermediate_size: 32,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![1],
            }),
            // Qwen/Qwen3-30B-A3B's config.json (../shared/vllm/models/qwen3-30b-a3b-fp8).
            "qwen3-30b-a3b" | "qwen3-30b-a3b-fp8" => Some(MoeConfig {
                num_experts: 128,
                num_experts_per_tok: 8,
                moe_intermediate_size: 768,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: Vec::new(),
            }),
            _ => None,
        };
        // Qwen/Qwen3-30B-A3B-FP8's quantization_config: every layer's norms and router
        // gate, and lm_head, stay bf16.
        let fp8 = (name == "qwen3-30b-a3b-fp8").then(|| Fp8Config {
            block: [128, 128],
            modules_to_not_convert: std::iter::once("lm_head".to_string())
                .chain((0..l).flat_map(|n| {
                    ["input_layernorm", "mlp.gate", "post_attention_layernorm"]
                        .map(|m| format!("model.layers.{n}.{m}"))
                }))
                .collect(),
        });
        Ok(Self {
            arch: if moe.is_some() {
                Arch::Qwen3Moe
            } else {
                Arch::Qwen3
            },
            vocab_size: vocab,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: nh,
            num_key_value_heads: nkv,
            head_dim: if tiny { 16 } else { 128 },
            max_position_embeddings: max_pos,
            norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: None,
            attention_bias: false,
            activation: Activation::Silu,
            tie_word_embeddings: tied,
            type_vocab_size: 0,
            position_offset: 0,
            eos_token_ids: if tiny {
                vec![crate::tokenizer::BYTE_LEVEL_EOS]
            } else {
                vec![151_645, 151_643]
            },
            stored_dtype_bytes: if tiny { 4 } else { 2 },
            default_task: task,
            moe,
            fp8,
        })
    }

    /// Whether decoder layer `layer` has a sparse MoE block instead of the dense MLP.
    pub fn is_sparse_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.is_sparse(layer))
    }

    /// Number of parameters the engine loads (BERT's unused pooler excluded); a MoE model
    /// counts every expert (all are resident).
    pub fn num_parameters(&self) -> usize {
        self.parameters(false)
    }

    /// Parameters one token uses: a MoE layer's `num_experts_per_tok` experts instead of
    /// all (Qwen3-30B-A3B: 3.3 B of 30.5 B); the total for dense models.
    pub fn active_parameters(&self) -> usize {
        self.parameters(true)
    }

    fn parameters(&self, active: bool) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let Some(lay) = self.layout() else {
            // The BERT family.
            let positions = self.max_position_embeddings + self.position_offset;
            let emb = (v + positions + self.type_vocab_size) * h + 2 * h;
            let per_layer = 4 * (h * h + h) + 2 * (2 * h) + (h * i + i) + (i * h + h);
            return emb + self.num_hidden_layers * per_layer;
        };
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attention = h * q
            + 2 * h * kv
            + q * h
            + if lay.qkv_bias { q + 2 * kv } else { 0 }
            + if lay.o_bias { h } else { 0 }
            + if lay.qk_norm { 2 * self.head_dim } else { 0 }
            + 2 * lay.norm_parameters(h);
        let dense = match lay.mlp {
            MlpKind::SiluGated => 3 * h * i,
            MlpKind::Gelu(_) => 2 * h * i + i + h,
        };
        let mlps: usize = (0..self.num_hidden_layers)
            .map(|l| match &self.moe {
                Some(m) if m.is_sparse(l) => {
                    let experts = if active {
                        m.num_experts_per_tok
                    } else {
                        m.num_experts
                    };
                    h * m.num_experts + experts * 3 * h * m.moe_intermediate_size
                }
                _ => dense,
            })
            .sum();
        let positions = match lay.positions {
            PositionKind::Rope => 0,
            PositionKind::Learned => self.max_position_embeddings * h,
        };
        v * h
            + positions
            + self.num_hidden_layers * attention
            + mlps
            + lay.norm_parameters(h)
            + self.lm_head_parameters()
    }

    /// The decoder's options (`None` for encoders): the one place where the families'
    /// differences are decided.
    pub fn layout(&self) -> Option<DecoderLayout> {
        let rope = |qk_norm, qkv_bias, o_bias| DecoderLayout {
            qk_norm,
            qkv_bias,
            o_bias,
            norm: NormKind::Rms,
            positions: PositionKind::Rope,
            mlp: MlpKind::SiluGated,
        };
        let bias = self.attention_bias;
        match self.arch {
            Arch::Qwen3 | Arch::Qwen3Moe => Some(rope(true, bias, bias)),
            Arch::Llama => Some(rope(false, bias, bias)),
            Arch::Mistral => Some(rope(false, false, false)),
            Arch::Qwen2 => Some(rope(false, true, false)),
            Arch::Gpt2 => Some(DecoderLayout {
                qk_norm: false,
                qkv_bias: true,
                o_bias: true,
                norm: NormKind::Layer,
                positions: PositionKind::Learned,
                mlp: MlpKind::Gelu(match self.activation {
                    Activation::Gelu(g) => g,
                    Activation::Silu => Gelu::Tanh,
                }),
            }),
            Arch::Bert | Arch::Roberta | Arch::DistilBert => None,
        }
    }

    /// The `head_dim / 2` RoPE inverse frequencies of this model (its `rope_theta` and
    /// scaling), from which every device builds its table.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        inv_freq(self.head_dim, self.rope_theta, self.rope_scaling.as_ref())
    }

    /// Parameters of an untied `lm_head` (0 when tied, and for encoders).
    pub fn lm_head_parameters(&self) -> usize {
        if self.arch.is_decoder() && !self.tie_word_embeddings {
            self.vocab_size * self.hidden_size
        } else {
            0
        }
    }

    /// Bytes the weights take with `dtype_bytes` per element (what the CPU holds: it
    /// dequantises FP8 at load).
    pub fn weight_bytes(&self, dtype_bytes: usize) -> usize {
        self.resident_weight_bytes(dtype_bytes, Fp8Kept::None, true)
    }

    /// Bytes of the weights a device holds: every parameter at `dtype_bytes`, except the
    /// block-FP8 checkpoint's quantised linears that `kept` keeps in FP8, at one byte plus an
    /// f32 scale per block (as vLLM holds them); without `lm_head` unless `with_lm_head` (an
    /// embedder never loads an untied one).
    pub fn resident_weight_bytes(
        &self,
        dtype_bytes: usize,
        kept: Fp8Kept,
        with_lm_head: bool,
    ) -> usize {
        let mut bytes = self.num_parameters() * dtype_bytes;
        if !with_lm_head {
            bytes -= self.lm_head_parameters() * dtype_bytes;
        }
        if let Some(q) = &self.fp8 {
            for (module, rows, cols) in self.linear_modules(with_lm_head) {
                if q.converts(&module) && kept.keeps(&module) {
                    bytes = bytes - rows * cols * dtype_bytes + q.quantised_bytes(rows, cols);
                }
            }
        }
        bytes
    }

    /// Every linear layer of a Qwen3 decoder as `(module name, rows, cols)` (checkpoint
    /// names: what `quantization_config.modules_to_not_convert` lists); empty for the other
    /// architectures, whose FP8 checkpoints are not read.
    fn linear_modules(&self, with_lm_head: bool) -> Vec<(String, usize, usize)> {
        if !matches!(self.arch, Arch::Qwen3 | Arch::Qwen3Moe) {
            return Vec::new();
        }
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut out = Vec::new();
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, rows, cols) in [
                ("q_proj", q, h),
                ("k_proj", kv, h),
                ("v_proj", kv, h),
                ("o_proj", h, q),
            ] {
                out.push((format!("{p}.self_attn.{name}"), rows, cols));
            }
            match &self.moe {
                Some(m) if m.is_sparse(l) => {
                    out.push((format!("{p}.mlp.gate"), m.num_experts, h));
                    let mi = m.moe_intermediate_size;
                    for e in 0..m.num_experts {
                        for (name, rows, cols) in [
                            ("gate_proj", mi, h),
                            ("up_proj", mi, h),
                            ("down_proj", h, mi),
                        ] {
                            out.push((format!("{p}.mlp.experts.{e}.{name}"), rows, cols));
                        }
                    }
                }
                _ => {
                    let i = self.intermediate_size;
                    for (name, rows, cols) in
                        [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
                    {
                        out.push((format!("{p}.mlp.{name}"), rows, cols));
                    }
                }
            }
        }
        if with_lm_head && self.lm_head_parameters() > 0 {
            out.push(("lm_head".to_string(), self.vocab_size, h));
        }
        out
    }

    /// Bytes of K and V for one token over all layers with `dtype_bytes` per element
    /// (0 for encoders, which keep no KV cache). The same for MoE models: experts hold no KV.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        if self.arch.is_decoder() {
            2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_string_is_a_preset_a_folder_or_elsewhere() {
        assert_eq!(
            ModelLocation::of("preset:qwen3-tiny"),
            ModelLocation::Preset("qwen3-tiny")
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        assert_eq!(ModelLocation::of(d), ModelLocation::Folder(dir.path()));
        for other in ["Qwen/Qwen3-8B", "/no/such/dir/qwen3-8b"] {
            assert_eq!(ModelLocation::of(other), ModelLocation::Elsewhere(other));
        }
    }

    #[test]
    fn presets_have_the_published_sizes() {
        // Parameter counts published on the model cards (incl. embeddings): 0.6B, 1.7B, 4.0B, 8.2B.
        let billions = |n: &str| ModelConfig::from_preset(n).unwrap().num_parameters() as f64 / 1e9;
        assert!(
            (billions("qwen3-0.6b") - 0.596).abs() < 0.01,
            "{}",
            billions("qwen3-0.6b")
        );
        assert!(
            (billions("qwen3-1.7b") - 1.72).abs() < 0.02,
            "{}",
            billions("qwen3-1.7b")
        );
        assert!(
            (billions("qwen3-4b") - 4.02).abs() < 0.03,
            "{}",
            billions("qwen3-4b")
        );
        assert!(
            (billions("qwen3-8b") - 8.19).abs() < 0.03,
            "{}",
            billions("qwen3-8b")
        );
        // Qwen3-8B bf16 KV: 36 layers * 8 kv heads * 128 * 2 (K,V) * 2 bytes = 147456 bytes/token.
        assert_eq!(
            ModelConfig::from_preset("qwen3-8b")
                .unwrap()
                .kv_bytes_per_token(2),
            147_456
        );
        // Qwen3-1.7B in bf16: 3.44 GB (shared/baselines/README.md), what the CUDA model loads.
        let gb = ModelConfig::from_preset("qwen3-1.7b")
            .unwrap()
            .weight_bytes(2) as f64
            / 1e9;
        assert!((gb - 3.44).abs() < 0.05, "{gb}");
        // Qwen3-30B-A3B: 30.5 B parameters, 3.3 B active (the model card); all 128 experts
        // resident: 61 GB in bf16, about 31 GB as published in FP8 (128 x 128 blocks).
        let moe = ModelConfig::from_preset("qwen3-30b-a3b").unwrap();
        let total = moe.num_parameters() as f64 / 1e9;
        let active = moe.active_parameters() as f64 / 1e9;
        assert!((total - 30.53).abs() < 0.05, "{total}");
        assert!((active - 3.35).abs() < 0.05, "{active}");
        let gb = |b: usize| b as f64 / 1e9;
        assert!((gb(moe.weight_bytes(2)) - 61.06).abs() < 0.1);
        let fp8 = ModelConfig::from_preset("qwen3-30b-a3b-fp8").unwrap();
        assert_eq!(fp8.num_parameters(), moe.num_parameters());
        let kept = gb(fp8.resident_weight_bytes(2, Fp8Kept::All, true));
        assert!((31.0..31.3).contains(&kept), "{kept} GB");
        // The CUDA engine keeps only the experts in FP8: the attention's q/k/v/o add their
        // bf16 half (48 x (4096 + 512 + 512) x 2048 + 48 x 2048 x 4096 = 906 M weights at one
        // more byte, less their scales).
        let experts = gb(fp8.resident_weight_bytes(2, Fp8Kept::Experts, true));
        assert!((31.9..32.2).contains(&experts), "{experts} GB");
        assert!((experts - kept - 0.906).abs() < 0.01, "{}", experts - kept);
        // Without keeping FP8 (the CPU dequantises) it is the bf16 size; a model without a
        // quantization_config is the same either way.
        assert_eq!(
            fp8.resident_weight_bytes(2, Fp8Kept::None, true),
            moe.weight_bytes(2)
        );
        assert_eq!(
            moe.resident_weight_bytes(2, Fp8Kept::All, true),
            moe.weight_bytes(2)
        );
        // KV: 48 layers x 4 kv heads x 128 x (K, V) x 2 bytes, experts add none.
        assert_eq!(moe.kv_bytes_per_token(2), 98_304);
        // An embedder drops the untied lm_head: 151,936 x 2,048, quantised or not.
        assert_eq!(
            fp8.resident_weight_bytes(2, Fp8Kept::All, true)
                - fp8.resident_weight_bytes(2, Fp8Kept::All, false),
            151_936 * 2048 * 2
        );
        assert!(ModelConfig::from_preset("nope").is_err());
        for n in preset_names() {
            ModelConfig::from_preset(n).unwrap();
        }
    }

    #[test]
    fn reads_rope_theta_in_both_spellings() {
        let base = r#""model_type":"qwen3","vocab_size":8,"hidden_size":4,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":2,"max_position_embeddings":16"#;
        let top = ModelConfig::from_json(&format!("{{{base},\"rope_theta\":5.0}}")).unwrap();
        assert_eq!(top.rope_theta, 5.0);
        let nested = ModelConfig::from_json(&format!(
            "{{{base},\"rope_parameters\":{{\"rope_theta\":7.0}}}}"
        ))
        .unwrap();
        assert_eq!(nested.rope_theta, 7.0);
        let err = ModelConfig::from_json(&format!("{{{}}}", base.replace("qwen3", "falcon")))
            .unwrap_err();
        assert!(err.to_string().contains("falcon"), "{err}");
        let err = ModelConfig::from_json(r#"{"model_type":"qwen3","hidden_size":8}"#).unwrap_err();
        assert!(
            err.to_string().contains("vocab_size"),
            "names the field: {err}"
        );
    }

    /// The published Qwen3-30B-A3B-FP8 config.json (carried in ../shared when present)
    /// reads as the preset, EOS aside (generation_config.json has both ids).
    #[test]
    fn reads_the_published_moe_config() {
        let carried = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/vllm/models/qwen3-30b-a3b-fp8/config.json");
        if carried.is_file() {
            let mut c = ModelConfig::from_file(&carried).unwrap();
            assert_eq!(c.eos_token_ids, vec![151_645]);
            c.eos_token_ids = vec![151_645, 151_643];
            assert_eq!(c, ModelConfig::from_preset("qwen3-30b-a3b-fp8").unwrap());
        }
        let tiny = r#"{"model_type":"qwen3_moe","architectures":["Qwen3MoeForCausalLM"],
            "vocab_size":512,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":3,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "max_position_embeddings":4096,"rope_theta":1000000.0,"eos_token_id":2,
            "dtype":"float32","num_local_experts":8,"num_experts_per_tok":2,"norm_topk_prob":true,
            "moe_intermediate_size":32,"decoder_sparse_step":1,"mlp_only_layers":[1]}"#;
        let c = ModelConfig::from_json(tiny).unwrap();
        assert_eq!(c.arch, Arch::Qwen3Moe);
        assert_eq!(c.default_task, Task::Generate);
        assert_eq!(
            (0..3).map(|l| c.is_sparse_layer(l)).collect::<Vec<_>>(),
            [true, false, true]
        );
        let mut preset = ModelConfig::from_preset("qwen3-moe-tiny").unwrap();
        preset.eos_token_ids = vec![2];
        assert_eq!(c, preset);
        // Errors name the field.
        // transformers 5's num_local_experts is num_experts; without either, an error.
        let err = ModelConfig::from_json(&tiny.replace(r#""num_local_experts":8,"#, ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_experts is missing"), "{err}");
        let bad_quant = tiny.replace(
            r#""dtype""#,
            r#""quantization_config":{"quant_method":"gptq"},"dtype""#,
        );
        let err = ModelConfig::from_json(&bad_quant).unwrap_err().to_string();
        assert!(err.contains("quant_method \"gptq\""), "{err}");
    }

    /// Parameter counts of the released checkpoints (as transformers counts them, a tied
    /// head once) and their KV bytes per bf16 token.
    #[test]
    fn decoder_presets_have_the_published_sizes() {
        let c = |n: &str| ModelConfig::from_preset(n).unwrap();
        for (name, params, kv) in [
            ("llama-3.2-1b", 1_235_814_400, 2 * 16 * 8 * 64 * 2),
            ("llama-3.2-3b", 3_212_749_824, 2 * 28 * 8 * 128 * 2),
            ("mistral-7b", 7_248_023_552, 2 * 32 * 8 * 128 * 2),
            ("qwen2.5-0.5b", 494_032_768, 2 * 24 * 2 * 64 * 2),
            ("qwen2.5-1.5b", 1_543_714_304, 2 * 28 * 2 * 128 * 2),
            ("qwen2.5-3b", 3_085_938_688, 2 * 36 * 2 * 128 * 2),
            ("qwen2.5-7b", 7_615_616_512, 2 * 28 * 4 * 128 * 2),
            ("gpt2", 124_439_808, 2 * 12 * 12 * 64 * 2),
            ("distilgpt2", 81_912_576, 2 * 6 * 12 * 64 * 2),
        ] {
            assert_eq!(c(name).num_parameters(), params, "{name}");
            assert_eq!(c(name).active_parameters(), params, "{name}");
            assert_eq!(c(name).kv_bytes_per_token(2), kv, "{name}");
            assert_eq!(c(name).weight_bytes(2), 2 * params, "{name}");
        }
        // An embedder never loads an untied head; a tied one is the embeddings.
        let m = c("mistral-7b");
        assert_eq!(
            m.resident_weight_bytes(2, Fp8Kept::None, true)
                - m.resident_weight_bytes(2, Fp8Kept::None, false),
            32_768 * 4096 * 2
        );
        assert_eq!(c("llama-3.2-1b").lm_head_parameters(), 0);
    }

    /// The published config.json of a model of each family reads as its preset, EOS
    /// aside where the preset has generation_config.json's list.
    #[test]
    fn reads_the_published_decoder_configs() {
        let llama = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0,
            "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256}"#;
        assert_eq!(
            ModelConfig::from_json(llama).unwrap(),
            ModelConfig::from_preset("llama-3.2-1b").unwrap()
        );
        let mistral = r#"{"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
            "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mistral",
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
            "vocab_size": 32768}"#;
        assert_eq!(
            ModelConfig::from_json(mistral).unwrap(),
            ModelConfig::from_preset("mistral-7b").unwrap()
        );
        let qwen2 = r#"{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
            "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
            "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
            "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16", "use_cache": true,
            "use_sliding_window": false, "vocab_size": 152064}"#;
        let mut c = ModelConfig::from_json(qwen2).unwrap();
        assert_eq!(c.eos_token_ids, vec![151_645]);
        c.eos_token_ids = vec![151_645, 151_643];
        assert_eq!(c, ModelConfig::from_preset("qwen2.5-7b").unwrap());
        let gpt2 = r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1,
            "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
            "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
            "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
            "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
            "summary_type": "cls_index", "summary_use_proj": true,
            "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
            "vocab_size": 50257}"#;
        assert_eq!(
            ModelConfig::from_json(gpt2).unwrap(),
            ModelConfig::from_preset("gpt2").unwrap()
        );
        assert_eq!(
            ModelConfig::from_json(&gpt2.replace(r#""n_layer": 12"#, r#""n_layer": 6"#)).unwrap(),
            ModelConfig::from_preset("distilgpt2").unwrap()
        );

        // A sliding window caps the positions where it applies.
        let window = |text: &str| {
            ModelConfig::from_json(text)
                .unwrap()
                .max_position_embeddings
        };
        assert_eq!(window(&mistral.replace("null", "4096")), 4096);
        assert_eq!(window(qwen2), 32_768);
        let sliding = qwen2
            .replace(
                r#""use_sliding_window": false"#,
                r#""use_sliding_window": true"#,
            )
            .replace("131072", "4096");
        assert_eq!(window(&sliding), 4096);

        // Llama's attention_bias puts biases on q, k, v and o.
        let biased = ModelConfig::from_json(
            &llama.replace(r#""attention_bias": false"#, r#""attention_bias": true"#),
        )
        .unwrap();
        let layout = biased.layout().unwrap();
        assert!(layout.qkv_bias && layout.o_bias && !layout.qk_norm);
        assert_eq!(
            biased.num_parameters() - ModelConfig::from_json(llama).unwrap().num_parameters(),
            16 * (2048 + 2 * 512 + 2048)
        );

        // What is not computed is an error naming it.
        for (text, named) in [
            (
                llama.replace(r#""mlp_bias": false"#, r#""mlp_bias": true"#),
                "mlp_bias",
            ),
            (llama.replace(r#""llama3""#, r#""yarn""#), "yarn"),
            (llama.replace(r#""silu""#, r#""gelu""#), "hidden_act"),
            (gpt2.replace("gelu_new", "relu"), "relu"),
            (
                gpt2.replace(
                    r#""n_ctx""#,
                    r#""scale_attn_by_inverse_layer_idx": true, "n_ctx""#,
                ),
                "scale_attn_by_inverse_layer_idx",
            ),
            (
                mistral.replace(
                    r#""hidden_size": 4096"#,
                    r#""hidden_size": 4096, "quantization_config": {"quant_method": "fp8"}"#,
                ),
                "FP8",
            ),
        ] {
            let err = format!("{:#}", ModelConfig::from_json(&text).unwrap_err());
            assert!(err.contains(named), "{named}: {err}");
        }
    }
}
