//! What the memory plan needs to know about a model: its shape and dtype.
//!
//! The formulas of dense models (parameters from the architecture, weights = parameters x
//! dtype bytes, KV per token = 2 x layers x kv_heads x head_dim x dtype bytes) live once, in
//! the engine's `ModelConfig`, which reads presets (`preset:qwen3-8b`, mirroring the real
//! Hugging Face configs) and `config.json` folders. This module adds what only planning
//! needs: Hugging Face ids of the presets' models (so `model = "Qwen/Qwen3-8B"` for vLLM
//! plans without the checkpoint on disk), the embedding case (no `lm_head`), an activation
//! estimate for sizing an embedder's batch, and the mixture-of-experts models only external
//! engines serve so far (Qwen3-30B-A3B, FP8 with 128x128 block scales as published).
//!
//! A model folder that does not exist on this machine (`/tmp/vllm-models/qwen3-8b` exists
//! only on the GPU machine) is planned with the known model its folder is named after, and
//! the plan notes it.

use std::path::Path;

use anyhow::bail;
use engine::model::config::{self, Arch, ModelConfig, ModelLocation};
use serde::Deserialize;

/// A model's shape: a dense model the engine reads, or a mixture of experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub kind: ShapeKind,
    /// How the shape was found when it is not what `model` names literally (a folder
    /// missing here, planned with the known model of that name).
    pub note: Option<String>,
}

/// The two families the plan knows.
#[derive(Debug, Clone, PartialEq)]
pub enum ShapeKind {
    Dense(ModelConfig),
    Moe(MoeConfig),
}

/// A Qwen3 mixture-of-experts decoder (`model_type: qwen3_moe`), as far as memory goes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MoeConfig {
    pub vocab_size: u64,
    pub hidden_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub moe_intermediate_size: u64,
    pub num_experts: u64,
    pub num_experts_per_tok: u64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Block-quantized FP8 weights (`quantization_config.quant_method = "fp8"`).
    #[serde(default, rename = "quantization_config")]
    pub quantization: Option<Quantization>,
}

/// `quantization_config` of a block-FP8 checkpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Quantization {
    pub quant_method: String,
    #[serde(default)]
    pub weight_block_size: Option<Vec<u64>>,
}

impl MoeConfig {
    /// Qwen/Qwen3-30B-A3B (bf16) or its FP8 release (128x128 blocks), as published.
    fn qwen3_30b_a3b(fp8: bool) -> MoeConfig {
        MoeConfig {
            vocab_size: 151_936,
            hidden_size: 2048,
            num_hidden_layers: 48,
            num_attention_heads: 32,
            num_key_value_heads: 4,
            head_dim: 128,
            moe_intermediate_size: 768,
            num_experts: 128,
            num_experts_per_tok: 8,
            tie_word_embeddings: false,
            quantization: fp8.then(|| Quantization {
                quant_method: "fp8".into(),
                weight_block_size: Some(vec![128, 128]),
            }),
        }
    }

    /// Elements of the attention projections and experts of all layers: what a block-FP8
    /// checkpoint quantizes (embeddings, `lm_head`, norms and router gates stay bf16).
    fn quantizable_params(&self) -> u64 {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let attention = h * q + 2 * h * kv + q * h;
        let experts = self.num_experts * 3 * h * self.moe_intermediate_size;
        self.num_hidden_layers * (attention + experts)
    }

    /// Everything else: embeddings, norms, router gates (and `lm_head` when asked).
    fn full_precision_params(&self, with_lm_head: bool) -> u64 {
        let h = self.hidden_size;
        let per_layer = 2 * h + 2 * self.head_dim + h * self.num_experts;
        let embed = self.vocab_size * h;
        let head = if with_lm_head && !self.tie_word_embeddings {
            embed
        } else {
            0
        };
        self.num_hidden_layers * per_layer + embed + h + head
    }

    fn fp8_block(&self) -> Option<u64> {
        let q = self.quantization.as_ref()?;
        if q.quant_method != "fp8" {
            return None;
        }
        let b = q.weight_block_size.as_deref().unwrap_or(&[128, 128]);
        Some(b.iter().product::<u64>().max(1))
    }
}

/// Planning-only models the engine has no preset for: (name, Hugging Face id, FP8).
const MOE_MODELS: &[(&str, &str, bool)] = &[
    ("qwen3-30b-a3b", "qwen/qwen3-30b-a3b", false),
    ("qwen3-30b-a3b-fp8", "qwen/qwen3-30b-a3b-fp8", true),
];

/// The preset whose shape a Hugging Face id has (`Qwen/Qwen3-8B` -> `qwen3-8b`).
fn preset_for_hf_id(id: &str) -> Option<&'static str> {
    let lower = id.to_ascii_lowercase();
    let name = lower.strip_prefix("qwen/")?;
    config::preset_names().iter().copied().find(|p| *p == name)
}

/// A known model by Hugging Face id or bare name (`qwen3-30b-a3b-fp8`).
fn known_by_name(name: &str) -> Option<ShapeKind> {
    let lower = name.to_ascii_lowercase();
    if let Some(p) = config::preset_names().iter().find(|p| **p == lower) {
        return ModelConfig::from_preset(p).ok().map(ShapeKind::Dense);
    }
    if let Some(p) = preset_for_hf_id(&lower) {
        return ModelConfig::from_preset(p).ok().map(ShapeKind::Dense);
    }
    MOE_MODELS
        .iter()
        .find(|(n, id, _)| *n == lower || *id == lower)
        .map(|(_, _, fp8)| ShapeKind::Moe(MoeConfig::qwen3_30b_a3b(*fp8)))
}

/// Reads a `config.json`: a MoE model here, everything else through the engine.
fn from_config_file(path: &Path) -> anyhow::Result<ShapeKind> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
    if v["model_type"].as_str() == Some("qwen3_moe") {
        let m: MoeConfig = serde_json::from_value(v)
            .map_err(|e| anyhow::anyhow!("{}: not a qwen3_moe config: {e}", path.display()))?;
        return Ok(ShapeKind::Moe(m));
    }
    Ok(ShapeKind::Dense(ModelConfig::from_file(path)?))
}

impl ModelShape {
    fn plain(kind: ShapeKind) -> ModelShape {
        ModelShape { kind, note: None }
    }

    /// Resolves `model` as written in a deployment: `preset:NAME`, a folder (or file)
    /// holding `config.json`, a Hugging Face id of a known model, or a folder missing here
    /// that is named after a known model.
    pub fn resolve(model: &str) -> anyhow::Result<ModelShape> {
        let (p, cfg) = match ModelLocation::of(model) {
            ModelLocation::Preset(name) => {
                return Ok(ModelShape::plain(ShapeKind::Dense(
                    ModelConfig::from_preset(name)?,
                )))
            }
            ModelLocation::Folder(dir) => (dir, dir.join("config.json")),
            ModelLocation::Elsewhere(m) => (Path::new(m), Path::new(m).to_path_buf()),
        };
        if cfg.is_file() {
            return Ok(ModelShape::plain(from_config_file(&cfg)?));
        }
        if let Some(kind) = known_by_name(model) {
            return Ok(ModelShape::plain(kind));
        }
        if p.is_absolute() || model.starts_with('.') {
            let folder = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(kind) = known_by_name(folder) {
                return Ok(ModelShape {
                    kind,
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
        match &self.kind {
            ShapeKind::Dense(c) => c.stored_dtype_bytes as u64,
            ShapeKind::Moe(_) => 2,
        }
    }

    /// Parameter count; `with_lm_head = false` for an embedding model, which pools hidden
    /// states and never loads an untied `lm_head`.
    pub fn parameters(&self, with_lm_head: bool) -> u64 {
        match &self.kind {
            ShapeKind::Dense(c) => {
                let mut p = c.num_parameters() as u64;
                if !with_lm_head && c.arch == Arch::Qwen3 && !c.tie_word_embeddings {
                    p -= (c.vocab_size * c.hidden_size) as u64;
                }
                p
            }
            ShapeKind::Moe(m) => m.quantizable_params() + m.full_precision_params(with_lm_head),
        }
    }

    /// Bytes of weights at `dtype_bytes` per parameter (block-FP8 parts at one byte plus
    /// an f32 scale per block).
    pub fn weights_bytes(&self, with_lm_head: bool, dtype_bytes: u64) -> u64 {
        match &self.kind {
            ShapeKind::Dense(_) => self.parameters(with_lm_head) * dtype_bytes,
            ShapeKind::Moe(m) => {
                let q = m.quantizable_params();
                let quantized = match m.fp8_block() {
                    Some(block) => q + q.div_ceil(block) * 4,
                    None => q * dtype_bytes,
                };
                quantized + m.full_precision_params(with_lm_head) * dtype_bytes
            }
        }
    }

    /// KV cache bytes per token (0 for an encoder).
    pub fn kv_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        match &self.kind {
            ShapeKind::Dense(c) => c.kv_bytes_per_token(dtype_bytes as usize) as u64,
            ShapeKind::Moe(m) => {
                2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * dtype_bytes
            }
        }
    }

    /// Rough activation bytes per token in flight in one forward pass (hidden states,
    /// q/k/v, MLP intermediate), used to size an embedder's batch from its budget.
    pub fn activation_bytes_per_token(&self, dtype_bytes: u64) -> u64 {
        match &self.kind {
            ShapeKind::Dense(c) => {
                let q = c.num_attention_heads * c.head_dim;
                let kv = c.num_key_value_heads * c.head_dim;
                ((4 * c.hidden_size + q + 2 * kv + 2 * c.intermediate_size) as u64) * dtype_bytes
            }
            ShapeKind::Moe(m) => {
                let q = m.num_attention_heads * m.head_dim;
                let kv = m.num_key_value_heads * m.head_dim;
                let mlp = 2 * m.moe_intermediate_size * m.num_experts_per_tok;
                (4 * m.hidden_size + q + 2 * kv + mlp) * dtype_bytes
            }
        }
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

    /// Qwen3-30B-A3B: 30.5 B parameters (the model card), 3.3 B active; FP8 weights about
    /// 31 GB (the seeds' "~30 GB"); KV 48 layers x 4 heads x 128 x 2 x 2 bytes per token.
    #[test]
    fn qwen3_30b_a3b_fp8_as_published() {
        let m = ModelShape::resolve("Qwen/Qwen3-30B-A3B-FP8").unwrap();
        let p = m.parameters(true) as f64 / 1e9;
        assert!((30.4..30.6).contains(&p), "{p}");
        let w = m.weights_bytes(true, m.dtype_bytes()) as f64 / 1e9;
        assert!((31.0..31.3).contains(&w), "{w} GB");
        assert_eq!(m.kv_bytes_per_token(2), 98_304);
        let bf16 = ModelShape::resolve("Qwen/Qwen3-30B-A3B").unwrap();
        let w16 = bf16.weights_bytes(true, 2) as f64 / 1e9;
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
                from_folder.weights_bytes(true, 2),
                by_id.weights_bytes(true, 2)
            );
            assert_eq!(from_folder.kv_bytes_per_token(2), 98_304);
        }
        let m = ModelShape::resolve("/no/such/dir/qwen3-30b-a3b-fp8").unwrap();
        assert!(matches!(m.kind, ShapeKind::Moe(_)));
        assert!(m.note.unwrap().contains("not on this machine"));
        let d = ModelShape::resolve("/no/such/dir/qwen3-embedding-8b").unwrap();
        assert!(matches!(d.kind, ShapeKind::Dense(_)));
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
