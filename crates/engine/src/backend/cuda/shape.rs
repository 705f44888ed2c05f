//! The Qwen3 hyper-parameters the CUDA path needs, read from a Hugging Face `config.json`
//! (both the released configs' top-level `rope_theta` and transformers 5's
//! `rope_parameters.rope_theta`).

use anyhow::{anyhow, Context};
use serde_json::Value;

/// Shape of a dense Qwen3 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Shape {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub rope_theta: f32,
    pub tie_embeddings: bool,
    pub max_positions: usize,
    pub eos_token_ids: Vec<u32>,
}

fn usize_field(v: &Value, key: &str) -> anyhow::Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| anyhow!("config.json: missing or non-integer `{key}`"))
}

impl Qwen3Shape {
    /// Reads the shape from a parsed `config.json`.
    pub fn from_config(v: &Value) -> anyhow::Result<Self> {
        let hidden = usize_field(v, "hidden_size")?;
        let heads = usize_field(v, "num_attention_heads")?;
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden / heads.max(1));
        let rope_theta = v
            .get("rope_theta")
            .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(1_000_000.0) as f32;
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            vocab: usize_field(v, "vocab_size")?,
            hidden,
            inter: usize_field(v, "intermediate_size")?,
            layers: usize_field(v, "num_hidden_layers")?,
            heads,
            kv_heads: usize_field(v, "num_key_value_heads").unwrap_or(heads),
            head_dim,
            eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope_theta,
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_positions: usize_field(v, "max_position_embeddings").unwrap_or(40_960),
            eos_token_ids,
        })
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &std::path::Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_config(&v).with_context(|| format!("in {}", path.display()))
    }

    /// Width of the fused q/k/v projection output.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Bytes of bf16 K and V for one token over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * 2
    }

    /// Bytes of the bf16 weights.
    pub fn weight_bytes(&self) -> usize {
        let per_layer = self.qkv_width() * self.hidden
            + self.heads * self.head_dim * self.hidden
            + 3 * self.inter * self.hidden
            + 2 * self.hidden
            + 2 * self.head_dim;
        let embed = self.vocab * self.hidden * if self.tie_embeddings { 1 } else { 2 };
        2 * (self.layers * per_layer + embed + self.hidden)
    }

    /// The shapes the benchmarks use (the real Hugging Face configs' numbers).
    pub fn named(name: &str) -> Option<Self> {
        let mk = |vocab, hidden, inter, layers, heads, kv, tie| Qwen3Shape {
            vocab,
            hidden,
            inter,
            layers,
            heads,
            kv_heads: kv,
            head_dim: 128,
            eps: 1e-6,
            rope_theta: 1_000_000.0,
            tie_embeddings: tie,
            max_positions: 40_960,
            eos_token_ids: vec![151_645, 151_643],
        };
        match name {
            "qwen3-0.6b" => Some(mk(151_936, 1024, 3072, 28, 16, 8, true)),
            "qwen3-1.7b" => Some(mk(151_936, 2048, 6144, 28, 16, 8, true)),
            "qwen3-4b" => Some(mk(151_936, 2560, 9728, 36, 32, 8, true)),
            "qwen3-8b" => Some(mk(151_936, 4096, 12_288, 36, 32, 8, false)),
            "qwen3-embedding-0.6b" => Some(mk(151_669, 1024, 3072, 28, 16, 8, true)),
            "qwen3-embedding-8b" => Some(mk(151_665, 4096, 12_288, 36, 32, 8, false)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_transformers5_rope_parameters() {
        let v: Value = serde_json::json!({
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rope_parameters": {"rope_theta": 10000.0}, "eos_token_id": 2, "tie_word_embeddings": false
        });
        let s = Qwen3Shape::from_config(&v).unwrap();
        assert_eq!(s.rope_theta, 10000.0);
        assert_eq!(s.qkv_width(), (4 + 4) * 16);
        assert_eq!(s.eos_token_ids, vec![2]);
    }

    #[test]
    fn missing_field_names_it() {
        let err = Qwen3Shape::from_config(
            &serde_json::json!({"hidden_size": 8, "num_attention_heads": 2}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }

    #[test]
    fn qwen3_1_7b_weights_match_the_baselines_readme() {
        // 3.44 GB of bf16 weights (shared/baselines/README.md).
        let gb = Qwen3Shape::named("qwen3-1.7b").unwrap().weight_bytes() as f64 / 1e9;
        assert!((gb - 3.44).abs() < 0.05, "{gb}");
    }
}
