//! Block-wise FP8 checkpoints (`quantization_config` with `quant_method: "fp8"`, as
//! Qwen3-30B-A3B-FP8 is published): linear weights stored as e4m3 with a float32
//! `weight_scale_inv` per `weight_block_size` block, the modules of
//! `modules_to_not_convert` (router gates, norms, `lm_head`) left in bf16, activations
//! quantised dynamically per token group by engines that compute in FP8 (vLLM). How the
//! weights are read is `crate::weights`'s business; this is the config and its byte count.

use serde::Deserialize;

/// A block-FP8 checkpoint's quantisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Config {
    /// `weight_block_size`: `[rows, cols]` of a weight that share one scale.
    pub block: [usize; 2],
    /// Modules (dotted names without `.weight`) left unquantised.
    pub modules_to_not_convert: Vec<String>,
}

impl Fp8Config {
    /// Whether the linear `module` (e.g. `model.layers.0.self_attn.q_proj`) is stored in
    /// FP8: unless it, or a module containing it, is listed in `modules_to_not_convert`.
    pub fn converts(&self, module: &str) -> bool {
        !self.modules_to_not_convert.iter().any(|m| {
            module == m || (module.starts_with(m.as_str()) && module[m.len()..].starts_with('.'))
        })
    }

    /// Bytes of a quantised `[rows, cols]` weight: one per element plus an f32 scale per
    /// (possibly partial) block.
    pub fn quantised_bytes(&self, rows: usize, cols: usize) -> usize {
        let [br, bc] = self.block;
        rows * cols + rows.div_ceil(br) * cols.div_ceil(bc) * 4
    }
}

/// Which of a block-FP8 checkpoint's quantised linears a device keeps in FP8 (the others
/// it holds dequantised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Kept {
    /// None: the built-in engine's CPU path dequantises everything at load.
    None,
    /// All of them: vLLM and SGLang compute in FP8.
    All,
    /// A mixture-of-experts model's experts (`.mlp.experts.`): the built-in engine's CUDA
    /// path, whose other GEMMs are bf16.
    Experts,
}

impl Fp8Kept {
    /// Whether the linear `module` stays in FP8 when its checkpoint stores it so.
    pub fn keeps(self, module: &str) -> bool {
        match self {
            Fp8Kept::None => false,
            Fp8Kept::All => true,
            Fp8Kept::Experts => module.contains(".mlp.experts."),
        }
    }
}

/// `quantization_config` as written by transformers' `FineGrainedFP8Config` (and the
/// published Qwen3 FP8 checkpoints).
#[derive(Deserialize)]
pub(super) struct RawQuantization {
    quant_method: Option<String>,
    fmt: Option<String>,
    activation_scheme: Option<String>,
    weight_block_size: Option<Vec<usize>>,
    #[serde(alias = "ignored_layers")]
    modules_to_not_convert: Option<Vec<String>>,
}

impl RawQuantization {
    /// The checked config. Errors name the field and what is supported.
    pub(super) fn resolve(self) -> anyhow::Result<Fp8Config> {
        let method = self.quant_method.unwrap_or_default();
        if method != "fp8" {
            anyhow::bail!(
                "quantization_config.quant_method {method:?} is not supported (only \"fp8\", block-wise)"
            );
        }
        if let Some(fmt) = self.fmt.as_deref() {
            if fmt != "e4m3" {
                anyhow::bail!("quantization_config.fmt {fmt:?} is not supported (only \"e4m3\")");
            }
        }
        if let Some(scheme) = self.activation_scheme.as_deref() {
            if scheme != "dynamic" {
                anyhow::bail!(
                    "quantization_config.activation_scheme {scheme:?} is not supported (only \"dynamic\")"
                );
            }
        }
        let block = match self.weight_block_size.as_deref() {
            Some(&[r, c]) if r > 0 && c > 0 => [r, c],
            Some(other) => anyhow::bail!(
                "quantization_config.weight_block_size {other:?} must be two sizes > 0, [rows, cols]"
            ),
            None => anyhow::bail!(
                "quantization_config.weight_block_size is missing: only block-wise FP8 is supported, not per-tensor scales"
            ),
        };
        Ok(Fp8Config {
            block,
            modules_to_not_convert: self.modules_to_not_convert.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> anyhow::Result<Fp8Config> {
        serde_json::from_str::<RawQuantization>(json)?.resolve()
    }

    #[test]
    fn reads_the_published_format() {
        let q = parse(
            r#"{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8",
                "weight_block_size":[128,128],"modules_to_not_convert":["lm_head","model.layers.0.mlp.gate"]}"#,
        )
        .unwrap();
        assert_eq!(q.block, [128, 128]);
        assert!(!q.converts("lm_head"));
        assert!(!q.converts("model.layers.0.mlp.gate"));
        // A listed module's name as a prefix of another module is not that module.
        assert!(q.converts("model.layers.0.mlp.gate_proj"));
        assert!(q.converts("model.layers.0.mlp.experts.3.up_proj"));
        assert!(q.converts("model.layers.1.mlp.gate"));
        // A listed parent covers its children.
        let q = parse(r#"{"quant_method":"fp8","weight_block_size":[2,3],"ignored_layers":["model.layers.1.mlp"]}"#).unwrap();
        assert!(!q.converts("model.layers.1.mlp.experts.0.down_proj"));
        assert!(q.converts("model.layers.10.mlp.experts.0.down_proj"));
        // 5 x 7 in 2 x 3 blocks: 3 x 3 scales.
        assert_eq!(q.quantised_bytes(5, 7), 35 + 9 * 4);
    }

    #[test]
    fn unsupported_settings_are_named() {
        for (json, field) in [
            (r#"{"quant_method":"awq"}"#, "quant_method"),
            (
                r#"{"quant_method":"fp8","fmt":"e5m2","weight_block_size":[1,1]}"#,
                "fmt",
            ),
            (
                r#"{"quant_method":"fp8","activation_scheme":"static","weight_block_size":[1,1]}"#,
                "activation_scheme",
            ),
            (r#"{"quant_method":"fp8"}"#, "weight_block_size is missing"),
            (
                r#"{"quant_method":"fp8","weight_block_size":[128]}"#,
                "weight_block_size [128]",
            ),
            (
                r#"{"quant_method":"fp8","weight_block_size":[0,128]}"#,
                "weight_block_size [0, 128]",
            ),
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(field), "{json}: {err}");
        }
    }
}
