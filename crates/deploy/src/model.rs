//! What the memory plan needs to know about a model: its shape and dtype.
//!
//! Read from a preset name (`preset:qwen3-8b`, mirroring the real Hugging Face configs) or
//! from a folder's `config.json`. The formulas live here once: parameters from the
//! architecture, weights = parameters x dtype bytes, KV per token =
//! 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.
//!
//! When the engine crate exposes `engine::model::config::ModelConfig`, this module should
//! delegate to it; until then it reads the same fields itself.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The architecture family, which decides how parameters are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Qwen3 dense decoder (also Qwen3-Embedding).
    Qwen3,
    /// BERT encoder (all-MiniLM-L6-v2): no KV cache.
    Bert,
}

/// The fields of a Hugging Face `config.json` the plan uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub arch: Arch,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    /// BERT only.
    pub max_position_embeddings: u64,
    /// BERT only.
    pub type_vocab_size: u64,
    /// Bytes per parameter of the checkpoint's dtype (2 for bf16/fp16, 4 for fp32).
    pub dtype_bytes: u64,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: u64,
    intermediate_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    num_key_value_heads: Option<u64>,
    head_dim: Option<u64>,
    vocab_size: u64,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<u64>,
    type_vocab_size: Option<u64>,
    torch_dtype: Option<String>,
}

#[allow(clippy::too_many_arguments)]
const fn qwen3(
    hidden: u64,
    inter: u64,
    layers: u64,
    heads: u64,
    kv: u64,
    head_dim: u64,
    vocab: u64,
    tie: bool,
) -> ModelShape {
    ModelShape {
        arch: Arch::Qwen3,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        vocab_size: vocab,
        tie_word_embeddings: tie,
        max_position_embeddings: 40960,
        type_vocab_size: 0,
        dtype_bytes: 2,
    }
}

/// The presets of the built-in engine (the real Hugging Face configs; `qwen3-tiny` for tests).
pub fn preset(name: &str) -> Option<ModelShape> {
    Some(match name {
        "qwen3-tiny" => qwen3(64, 128, 2, 4, 2, 16, 512, true),
        "qwen3-0.6b" => qwen3(1024, 3072, 28, 16, 8, 128, 151_936, true),
        "qwen3-1.7b" => qwen3(2048, 6144, 28, 16, 8, 128, 151_936, true),
        "qwen3-4b" => qwen3(2560, 9728, 36, 32, 8, 128, 151_936, true),
        "qwen3-8b" => qwen3(4096, 12288, 36, 32, 8, 128, 151_936, false),
        "qwen3-embedding-0.6b" => qwen3(1024, 3072, 28, 16, 8, 128, 151_669, true),
        "qwen3-embedding-8b" => qwen3(4096, 12288, 36, 32, 8, 128, 151_665, false),
        _ => return None,
    })
}

/// The names `preset` knows.
pub const PRESETS: &[&str] = &[
    "qwen3-tiny",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-embedding-0.6b",
    "qwen3-embedding-8b",
];

/// Hugging Face ids of the presets' real models, so `model = "Qwen/Qwen3-8B"` (for vLLM)
/// plans without the checkpoint on disk.
fn preset_for_hf_id(id: &str) -> Option<ModelShape> {
    let lower = id.to_ascii_lowercase();
    let name = lower.strip_prefix("qwen/")?;
    preset(name)
}

impl ModelShape {
    /// Resolves `model` as written in a deployment: `preset:NAME`, a known Hugging Face id,
    /// or a folder holding `config.json`.
    pub fn resolve(model: &str) -> anyhow::Result<ModelShape> {
        if let Some(name) = model.strip_prefix("preset:") {
            return preset(name).with_context(|| {
                format!("unknown preset `{name}`; presets: {}", PRESETS.join(", "))
            });
        }
        let dir = Path::new(model);
        let cfg = if dir.is_dir() {
            dir.join("config.json")
        } else {
            dir.to_path_buf()
        };
        if cfg.is_file() {
            return Self::from_config_file(&cfg);
        }
        if let Some(shape) = preset_for_hf_id(model) {
            return Ok(shape);
        }
        bail!("cannot find the model's config: `{model}` is not a preset, a folder with config.json, or a known Hugging Face id")
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_config_file(path: &Path) -> anyhow::Result<ModelShape> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?;
        Self::from_config_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses the text of a `config.json`.
    pub fn from_config_json(text: &str) -> anyhow::Result<ModelShape> {
        let raw: RawConfig = serde_json::from_str(text).context("not a model config.json")?;
        let arch = match raw.model_type.as_deref() {
            Some("bert") => Arch::Bert,
            Some("qwen3") | Some("qwen2") | Some("llama") | None => Arch::Qwen3,
            Some(other) => bail!("model_type `{other}` is not supported by the memory plan"),
        };
        let dtype_bytes = match raw.torch_dtype.as_deref() {
            Some("float32") => 4,
            Some("float16") | Some("bfloat16") => 2,
            None => match arch {
                Arch::Bert => 4,
                Arch::Qwen3 => 2,
            },
            Some(other) => bail!("torch_dtype `{other}` is not supported"),
        };
        let heads = raw.num_attention_heads.max(1);
        Ok(ModelShape {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads),
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(arch == Arch::Bert),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(512),
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            dtype_bytes,
        })
    }

    /// Parameter count. `with_lm_head`: an embedding model does not load `lm_head`.
    pub fn parameters(&self, with_lm_head: bool) -> u64 {
        let h = self.hidden_size;
        let i = self.intermediate_size;
        let l = self.num_hidden_layers;
        match self.arch {
            Arch::Qwen3 => {
                let q = self.num_attention_heads * self.head_dim;
                let kv = self.num_key_value_heads * self.head_dim;
                let attn = h * q + 2 * h * kv + q * h + 2 * self.head_dim; // q,k,v,o + q/k norms
                let mlp = 3 * h * i; // gate, up, down
                let norms = 2 * h;
                let embed = self.vocab_size * h;
                let head = if with_lm_head && !self.tie_word_embeddings {
                    self.vocab_size * h
                } else {
                    0
                };
                embed + l * (attn + mlp + norms) + h + head
            }
            Arch::Bert => {
                let embed = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
                let attn = 4 * (h * h + h) + 2 * h;
                let mlp = h * i + i + i * h + h + 2 * h;
                embed + l * (attn + mlp)
            }
        }
    }

    /// Bytes of weights at `dtype_bytes` per parameter.
    pub fn weights_bytes(&self, with_lm_head: bool, dtype_bytes: u64) -> u64 {
        self.parameters(with_lm_head) * dtype_bytes
    }

    /// KV cache bytes per token: 2 x layers x kv_heads x head_dim x dtype bytes (0 for an
    /// encoder, which keeps no cache).
    pub fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        match self.arch {
            Arch::Qwen3 => 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes,
            Arch::Bert => 0,
        }
    }

    /// Rough activation bytes per token in flight in one forward pass (hidden states,
    /// q/k/v, MLP intermediate), used to size an embedder's batch from its budget.
    pub fn activation_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        (4 * self.hidden_size + q + 2 * kv + 2 * self.intermediate_size) * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_8b_has_eight_billion_parameters() {
        let m = preset("qwen3-8b").unwrap();
        let p = m.parameters(true) as f64 / 1e9;
        assert!((8.1..8.3).contains(&p), "{p}");
        // 36 layers x 8 kv heads x 128 x 2 (K,V) x 2 bytes = 147,456 bytes per token.
        assert_eq!(m.kv_bytes_per_token(2), 147_456);
    }

    #[test]
    fn qwen3_0_6b_tied() {
        let m = preset("qwen3-0.6b").unwrap();
        let p = m.parameters(true) as f64 / 1e9;
        assert!((0.59..0.61).contains(&p), "{p}");
    }

    #[test]
    fn minilm_from_config() {
        let cfg = r#"{"model_type":"bert","hidden_size":384,"intermediate_size":1536,
            "num_hidden_layers":6,"num_attention_heads":12,"vocab_size":30522,
            "max_position_embeddings":512,"type_vocab_size":2}"#;
        let m = ModelShape::from_config_json(cfg).unwrap();
        let p = m.parameters(false) as f64 / 1e6;
        assert!((22.5..23.0).contains(&p), "{p}");
        assert_eq!(m.kv_bytes_per_token(4), 0);
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let e = ModelShape::resolve("preset:qwen9").unwrap_err().to_string();
        assert!(e.contains("qwen3-tiny"), "{e}");
    }
}
