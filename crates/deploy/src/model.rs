//! What the memory plan needs to know about a model: its shape and dtype.
//!
//! The formulas (parameters from the architecture, every expert of a mixture of experts
//! resident; weights = parameters x dtype bytes, a block-FP8 checkpoint's quantised linears
//! at one byte plus an f32 scale per block where the engine keeps them so; KV per token =
//! 2 x layers x kv_heads x head_dim x dtype bytes) live once, in the engine's
//! `ModelConfig`, which reads presets (`preset:qwen3-8b`, `preset:qwen3-30b-a3b-fp8`,
//! `preset:llama-3.2-3b`, `preset:qwen2.5-7b`, `preset:gpt2`..., mirroring the real Hugging
//! Face configs) and `config.json` folders (`qwen3`, `qwen3_moe`, `qwen2`, `llama`,
//! `mistral`, `gpt2`, `bert`, `roberta`, `distilbert`). This module adds what only planning needs: Hugging Face ids
//! of the presets' models (so `model = "Qwen/Qwen3-8B"` or
//! `"meta-llama/Llama-3.2-3B-Instruct"` for vLLM plans without the checkpoint on disk; base
//! and `-Instruct` releases have the same shapes), the embedding case (no `lm_head`), and an
//! activation estimate for sizing an embedder's batch.
//!
//! A model folder that does not exist on this machine (`/tmp/vllm-models/qwen3-8b` exists
//! only on the GPU machine) is planned with the known model its folder is named after, and
//! the plan notes it.

use std::path::Path;

use anyhow::bail;
use engine::model::config::{self, Fp8Kept, ModelConfig, ModelLocation};

/// A model's shape, as the engine reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub config: ModelConfig,
    /// How the shape was found when it is not what `model` names literally (a folder
    /// missing here, planned with the known model of that name).
    pub note: Option<String>,
}

/// The organisations whose Hugging Face ids name presets' models.
const ORGS: [&str; 8] = [
    "qwen/",
    "meta-llama/",
    "mistralai/",
    "openai-community/",
    "distilbert/",
    "google-bert/",
    "facebookai/",
    "sentence-transformers/",
];

/// The preset a Hugging Face id or bare name names (`Qwen/Qwen3-8B` -> `qwen3-8b`,
/// `qwen3-30b-a3b-fp8`, `meta-llama/Llama-3.2-3B-Instruct` -> `llama-3.2-3b`,
/// `mistralai/Mistral-7B-Instruct-v0.3` -> `mistral-7b`, `openai-community/gpt2`).
fn known_by_name(name: &str) -> Option<ModelConfig> {
    let lower = name.to_ascii_lowercase();
    let bare = ORGS
        .iter()
        .find_map(|o| lower.strip_prefix(o))
        .unwrap_or(&lower);
    let bare = match bare {
        "mistral-7b-v0.3" | "mistral-7b-instruct-v0.3" => "mistral-7b",
        other => other.strip_suffix("-instruct").unwrap_or(other),
    };
    let preset = config::preset_names().iter().find(|p| **p == bare)?;
    ModelConfig::from_preset(preset).ok()
}

impl ModelShape {
    fn plain(config: ModelConfig) -> ModelShape {
        ModelShape { config, note: None }
    }

    /// Resolves `model` as written in a deployment: `preset:NAME`, a folder (or file)
    /// holding `config.json`, a Hugging Face id of a known model, or a folder missing here
    /// that is named after a known model.
    pub fn resolve(model: &str) -> anyhow::Result<ModelShape> {
        let (p, cfg) = match ModelLocation::of(model) {
            ModelLocation::Preset(name) => {
                return Ok(ModelShape::plain(ModelConfig::from_preset(name)?))
            }
            ModelLocation::Folder(dir) => (dir, dir.join("config.json")),
            ModelLocation::Elsewhere(m) => (Path::new(m), Path::new(m).to_path_buf()),
        };
        if cfg.is_file() {
            return Ok(ModelShape::plain(ModelConfig::from_file(&cfg)?));
        }
        if let Some(c) = known_by_name(model) {
            return Ok(ModelShape::plain(c));
        }
        if p.is_absolute() || model.starts_with('.') {
            let folder = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(config) = known_by_name(folder) {
                return Ok(ModelShape {
                    config,
                    note: Some(format!(
                        "{model} is not on this machine: planned with the shape of {folder}"
                    )),
                });
            }
        }
        bail!("cannot find the model's config: `{model}` is not a preset, a folder with config.json, or a known Hugging Face id")
    }

    /// Bytes per element of the checkpoint as stored (the unquantized part of an FP8 one).
    pub fn dtype_bytes(&self) -> u64 {
        self.config.stored_dtype_bytes as u64
    }

    /// Whether the model is a mixture of experts.
    pub fn is_moe(&self) -> bool {
        self.config.moe.is_some()
    }

    /// Parameter count (all experts); `with_lm_head = false` for an embedding model, which
    /// pools hidden states and never loads an untied `lm_head`.
    pub fn parameters(&self, with_lm_head: bool) -> u64 {
        let head = if with_lm_head {
            0
        } else {
            self.config.lm_head_parameters()
        };
        (self.config.num_parameters() - head) as u64
    }

    /// Bytes of weights at `dtype_bytes` per parameter, except a block-FP8 checkpoint's
    /// quantised linears that `kept` keeps in FP8, at one byte plus an f32 scale per block.
    pub fn weights_bytes(&self, with_lm_head: bool, dtype_bytes: u64, kept: Fp8Kept) -> u64 {
        self.config
            .resident_weight_bytes(dtype_bytes as usize, kept, with_lm_head) as u64
    }

    /// KV cache bytes per token (0 for an encoder; experts add none).
    pub fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        self.config.kv_bytes_per_token(dtype_bytes as usize) as u64
    }

    /// Rough activation bytes per token in flight in one forward pass (hidden states,
    /// q/k/v, MLP intermediate: a MoE token's is its active experts'), used to size an
    /// embedder's batch from its budget.
    pub fn activation_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        let c = &self.config;
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let mlp = match &c.moe {
            Some(m) => 2 * m.moe_intermediate_size * m.num_experts_per_tok,
            None => 2 * c.intermediate_size,
        };
        ((4 * c.hidden_size + q + 2 * kv + mlp) as u64) * dtype_bytes
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

    /// The A100 study's and the blog's models by their Hugging Face ids: weights and KV as
    /// the engine's presets count them.
    #[test]
    fn issue_20_models_by_hf_id() {
        for (id, preset) in [
            ("meta-llama/Llama-3.2-3B-Instruct", "llama-3.2-3b"),
            ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
            ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
            ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
            ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
            ("openai-community/gpt2", "gpt2"),
            ("distilbert/distilgpt2", "distilgpt2"),
            ("/no/such/dir/qwen2.5-3b-instruct", "qwen2.5-3b"),
            (
                "distilbert/distilbert-base-uncased",
                "distilbert-base-uncased",
            ),
            ("FacebookAI/roberta-base", "roberta-base"),
            ("distilbert/distilroberta-base", "distilroberta-base"),
            ("google-bert/bert-base-uncased", "bert-base-uncased"),
            ("sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2"),
        ] {
            let m = ModelShape::resolve(id).unwrap();
            let p = ModelShape::resolve(&format!("preset:{preset}")).unwrap();
            assert_eq!(m.config, p.config, "{id}");
        }
        // Llama-3.2-3B: 3.21 B parameters, tied; 28 layers x 8 kv heads x 128 x 2 x 2 bytes.
        let m = ModelShape::resolve("meta-llama/Llama-3.2-3B-Instruct").unwrap();
        assert_eq!(m.parameters(true), 3_212_749_824);
        assert_eq!(m.kv_bytes_per_token(2), 114_688);
        // DistilGPT2 (82 M parameters) in 16-bit.
        let d = ModelShape::resolve("distilgpt2").unwrap();
        assert_eq!(d.weights_bytes(true, 2, Fp8Kept::None), 2 * 81_912_576);
        assert!(ModelShape::resolve("mistralai/Mistral-7B-v0.9").is_err());
    }

    /// Qwen3-30B-A3B: 30.5 B parameters (the model card), 3.3 B active; FP8 weights about
    /// 31 GB (the seeds' "~30 GB"); KV 48 layers x 4 heads x 128 x 2 x 2 bytes per token.
    #[test]
    fn qwen3_30b_a3b_fp8_as_published() {
        let m = ModelShape::resolve("Qwen/Qwen3-30B-A3B-FP8").unwrap();
        let p = m.parameters(true) as f64 / 1e9;
        assert!((30.4..30.6).contains(&p), "{p}");
        let w = m.weights_bytes(true, m.dtype_bytes(), Fp8Kept::All) as f64 / 1e9;
        assert!((31.0..31.3).contains(&w), "{w} GB");
        assert_eq!(m.kv_bytes_per_token(2), 98_304);
        // Dequantised (the built-in engine on the CPU, f32): every parameter at 4 bytes.
        let f32s = m.weights_bytes(true, 4, Fp8Kept::None) as f64 / 1e9;
        assert!((122.0..122.3).contains(&f32s), "{f32s} GB");
        let bf16 = ModelShape::resolve("Qwen/Qwen3-30B-A3B").unwrap();
        assert!(bf16.is_moe());
        let w16 = bf16.weights_bytes(true, 2, Fp8Kept::All) as f64 / 1e9;
        assert!((60.9..61.2).contains(&w16), "{w16} GB");
    }

    /// The carried model folder (config.json as published) reads the same as the built-in
    /// numbers; a folder missing here falls back to its name, with a note.
    #[test]
    fn moe_folder_and_missing_folder() {
        let carried = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/vllm/models/qwen3-30b-a3b-fp8");
        if carried.is_dir() {
            let from_folder = ModelShape::resolve(carried.to_str().unwrap()).unwrap();
            let by_id = ModelShape::resolve("Qwen/Qwen3-30B-A3B-FP8").unwrap();
            assert_eq!(
                from_folder.weights_bytes(true, 2, Fp8Kept::All),
                by_id.weights_bytes(true, 2, Fp8Kept::All)
            );
            assert_eq!(from_folder.kv_bytes_per_token(2), 98_304);
        }
        let m = ModelShape::resolve("/no/such/dir/qwen3-30b-a3b-fp8").unwrap();
        assert!(m.is_moe());
        assert!(m.note.unwrap().contains("not on this machine"));
        let d = ModelShape::resolve("/no/such/dir/qwen3-embedding-8b").unwrap();
        assert!(!d.is_moe());
    }

    #[test]
    fn unknown_model_is_a_clear_error() {
        let e = ModelShape::resolve("preset:qwen9").unwrap_err().to_string();
        assert!(e.contains("qwen3-tiny"), "{e}");
        let e = ModelShape::resolve("someone/some-model")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot find the model's config"), "{e}");
        let e = ModelShape::resolve("/no/such/dir/mystery-model")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot find the model's config"), "{e}");
    }
}
