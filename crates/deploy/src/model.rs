//! What the memory plan needs to know about a model: its shape and dtype.
//!
//! The formulas (parameters from the architecture, weights = parameters x dtype bytes,
//! KV per token = 2 x layers x kv_heads x head_dim x dtype bytes) live once, in the
//! engine's `ModelConfig`, which reads presets (`preset:qwen3-8b`, mirroring the real
//! Hugging Face configs) and `config.json` folders. This module adds what only planning
//! needs: Hugging Face ids of the presets' models (so `model = "Qwen/Qwen3-8B"` for vLLM
//! plans without the checkpoint on disk), the embedding case (no `lm_head`), and an
//! activation estimate for sizing an embedder's batch.

use std::path::Path;

use anyhow::bail;
use engine::model::config::{self, Arch, ModelConfig};

/// A model's shape, as the engine reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub config: ModelConfig,
}

/// The preset whose shape a Hugging Face id has (`Qwen/Qwen3-8B` -> `qwen3-8b`).
fn preset_for_hf_id(id: &str) -> Option<&'static str> {
    let lower = id.to_ascii_lowercase();
    let name = lower.strip_prefix("qwen/")?;
    config::preset_names().iter().copied().find(|p| *p == name)
}

impl ModelShape {
    /// Resolves `model` as written in a deployment: `preset:NAME`, a folder (or file)
    /// holding `config.json`, or a Hugging Face id of a preset's model.
    pub fn resolve(model: &str) -> anyhow::Result<ModelShape> {
        if let Some(name) = model.strip_prefix("preset:") {
            return Ok(ModelShape {
                config: ModelConfig::from_preset(name)?,
            });
        }
        let p = Path::new(model);
        let cfg = if p.is_dir() {
            p.join("config.json")
        } else {
            p.to_path_buf()
        };
        if cfg.is_file() {
            return Ok(ModelShape {
                config: ModelConfig::from_file(&cfg)?,
            });
        }
        if let Some(name) = preset_for_hf_id(model) {
            return Ok(ModelShape {
                config: ModelConfig::from_preset(name)?,
            });
        }
        bail!("cannot find the model's config: `{model}` is not a preset, a folder with config.json, or a known Hugging Face id")
    }

    /// Bytes per element of the checkpoint as stored.
    pub fn dtype_bytes(&self) -> u64 {
        self.config.stored_dtype_bytes as u64
    }

    /// Parameter count; `with_lm_head = false` for an embedding model, which pools hidden
    /// states and never loads an untied `lm_head`.
    pub fn parameters(&self, with_lm_head: bool) -> u64 {
        let c = &self.config;
        let mut p = c.num_parameters() as u64;
        if !with_lm_head && c.arch == Arch::Qwen3 && !c.tie_word_embeddings {
            p -= (c.vocab_size * c.hidden_size) as u64;
        }
        p
    }

    /// Bytes of weights at `dtype_bytes` per parameter.
    pub fn weights_bytes(&self, with_lm_head: bool, dtype_bytes: u64) -> u64 {
        self.parameters(with_lm_head) * dtype_bytes
    }

    /// KV cache bytes per token (0 for an encoder).
    pub fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        self.config.kv_bytes_per_token(dtype_bytes as usize) as u64
    }

    /// Rough activation bytes per token in flight in one forward pass (hidden states,
    /// q/k/v, MLP intermediate), used to size an embedder's batch from its budget.
    pub fn activation_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        let c = &self.config;
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        ((4 * c.hidden_size + q + 2 * kv + 2 * c.intermediate_size) as u64) * dtype_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_8b_by_hf_id() {
        let m = ModelShape::resolve("Qwen/Qwen3-8B").unwrap();
        let p = m.parameters(true) as f64 / 1e9;
        assert!((8.1..8.3).contains(&p), "{p}");
        // 36 layers x 8 kv heads x 128 x 2 (K,V) x 2 bytes = 147,456 bytes per token.
        assert_eq!(m.kv_bytes_per_token(2), 147_456);
        // The embedder of the same shape drops the untied lm_head (151,665 x 4,096).
        let e = ModelShape::resolve("preset:qwen3-embedding-8b").unwrap();
        assert_eq!(e.parameters(true) - e.parameters(false), 151_665 * 4096);
    }

    #[test]
    fn minilm_from_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = r#"{"model_type":"bert","hidden_size":384,"intermediate_size":1536,
            "num_hidden_layers":6,"num_attention_heads":12,"vocab_size":30522,
            "max_position_embeddings":512,"type_vocab_size":2}"#;
        std::fs::write(dir.path().join("config.json"), cfg).unwrap();
        let m = ModelShape::resolve(dir.path().to_str().unwrap()).unwrap();
        let p = m.parameters(false) as f64 / 1e6;
        assert!((22.5..23.0).contains(&p), "{p}");
        assert_eq!(m.kv_bytes_per_token(4), 0);
    }

    #[test]
    fn unknown_model_is_a_clear_error() {
        let e = ModelShape::resolve("preset:qwen9").unwrap_err().to_string();
        assert!(e.contains("qwen3-tiny"), "{e}");
        let e = ModelShape::resolve("someone/some-model")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot find the model's config"), "{e}");
    }
}
