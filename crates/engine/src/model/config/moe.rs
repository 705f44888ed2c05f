//! The mixture-of-experts part of a `qwen3_moe` config (transformers' `Qwen3MoeConfig`):
//! how many experts, how many a token uses, their width, and which layers are sparse.

use serde::Deserialize;

/// Which layers route through experts and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoeConfig {
    /// Experts of a sparse layer (128 in Qwen3-30B-A3B).
    pub num_experts: usize,
    /// Experts each token uses (top-k of the router's softmax; 8 in Qwen3-30B-A3B).
    pub num_experts_per_tok: usize,
    /// Width of one expert's SiLU-gated MLP.
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to 1 (Qwen3-MoE: true; transformers'
    /// default when the key is absent: false).
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is sparse (counting from 1).
    pub decoder_sparse_step: usize,
    /// Layers that keep a dense MLP of `intermediate_size` whatever the step says.
    pub mlp_only_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether `layer` (from 0) is a sparse MoE layer: transformers' `Qwen3MoeDecoderLayer`
    /// rule, `layer not in mlp_only_layers and num_experts > 0 and (layer + 1) %
    /// decoder_sparse_step == 0`; any other layer has the dense MLP.
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// The `config.json` keys of a MoE model (absent for dense ones).
#[derive(Deserialize, Default)]
pub(super) struct RawMoe {
    /// transformers 5 writes `num_local_experts`.
    #[serde(alias = "num_local_experts")]
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

impl RawMoe {
    /// The checked MoE config of a `qwen3_moe` model with `layers` layers. Errors name the
    /// field and why.
    pub(super) fn resolve(self, layers: usize) -> anyhow::Result<MoeConfig> {
        let need = |v: Option<usize>, field: &str| {
            v.ok_or_else(|| anyhow::anyhow!("{field} is missing (a qwen3_moe config needs it)"))
        };
        let m = MoeConfig {
            num_experts: need(self.num_experts, "num_experts")?,
            num_experts_per_tok: need(self.num_experts_per_tok, "num_experts_per_tok")?,
            moe_intermediate_size: need(self.moe_intermediate_size, "moe_intermediate_size")?,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
            decoder_sparse_step: self.decoder_sparse_step.unwrap_or(1),
            mlp_only_layers: self.mlp_only_layers.unwrap_or_default(),
        };
        if m.decoder_sparse_step == 0 {
            anyhow::bail!("decoder_sparse_step must be at least 1 (every n-th layer is sparse)");
        }
        if (0..layers).any(|l| m.is_sparse(l)) {
            if m.num_experts_per_tok == 0 || m.num_experts_per_tok > m.num_experts {
                anyhow::bail!(
                    "num_experts_per_tok {} must be between 1 and num_experts {}",
                    m.num_experts_per_tok,
                    m.num_experts
                );
            }
            if m.moe_intermediate_size == 0 {
                anyhow::bail!("moe_intermediate_size must be > 0");
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(step: usize, only: Vec<usize>) -> RawMoe {
        RawMoe {
            num_experts: Some(8),
            num_experts_per_tok: Some(2),
            moe_intermediate_size: Some(32),
            norm_topk_prob: Some(true),
            decoder_sparse_step: Some(step),
            mlp_only_layers: Some(only),
        }
    }

    #[test]
    fn sparse_layers_follow_transformers() {
        let m = raw(1, vec![1]).resolve(3).unwrap();
        let sparse: Vec<bool> = (0..3).map(|l| m.is_sparse(l)).collect();
        assert_eq!(sparse, [true, false, true]);
        // Every second layer, counting from 1: layers 1, 3, 5 (from 0) are sparse.
        let m = raw(2, vec![]).resolve(6).unwrap();
        let sparse: Vec<usize> = (0..6).filter(|&l| m.is_sparse(l)).collect();
        assert_eq!(sparse, [1, 3, 5]);
        // No experts: every layer dense, and top-k is not checked.
        let mut r = raw(1, vec![]);
        r.num_experts = Some(0);
        let m = r.resolve(4).unwrap();
        assert!((0..4).all(|l| !m.is_sparse(l)));
    }

    #[test]
    fn bad_fields_are_named() {
        let err = raw(0, vec![]).resolve(2).unwrap_err().to_string();
        assert!(err.contains("decoder_sparse_step"), "{err}");
        let mut r = raw(1, vec![]);
        r.num_experts_per_tok = Some(9);
        let err = r.resolve(2).unwrap_err().to_string();
        assert!(err.contains("num_experts_per_tok 9"), "{err}");
        let mut r = raw(1, vec![]);
        r.moe_intermediate_size = None;
        let err = r.resolve(2).unwrap_err().to_string();
        assert!(err.contains("moe_intermediate_size is missing"), "{err}");
        let mut r = raw(1, vec![]);
        r.moe_intermediate_size = Some(0);
        let err = r.resolve(2).unwrap_err().to_string();
        assert!(err.contains("moe_intermediate_size must be > 0"), "{err}");
    }
}
