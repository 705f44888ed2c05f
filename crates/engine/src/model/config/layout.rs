//! What tells the decoder families apart: the options of the one decoder
//! (`model::decoder`), decided here from the config once, and read by the model loaders
//! and by the parameter count alike. Llama and Mistral are the plain pre-norm RoPE decoder
//! (RMSNorm, SiLU-gated MLP); Qwen2 adds biases to q/k/v; Qwen3 adds per-head q/k RMSNorm
//! (and Qwen3-MoE its sparse blocks, `MoeConfig`); GPT-2 has learned positions,
//! LayerNorm, a GELU MLP and biases everywhere.

use crate::backend::Gelu;

/// A layer's normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm with a weight.
    Rms,
    /// LayerNorm with a weight and a bias.
    Layer,
}

/// How positions enter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// Rotary embeddings on q and k (the config's `rope_theta` and scaling).
    Rope,
    /// A learned table added to the token embeddings (`max_position_embeddings` rows).
    Learned,
}

/// A layer's feed-forward (a MoE model's sparse layers aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// `down(silu(gate(x)) * up(x))`, no biases.
    SiluGated,
    /// `proj(gelu(fc(x)))`, with biases.
    Gelu(Gelu),
}

/// The options of the one decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLayout {
    /// Per-head RMSNorm of q and k before RoPE.
    pub qk_norm: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// A bias on the attention output projection.
    pub o_bias: bool,
    pub norm: NormKind,
    pub positions: PositionKind,
    pub mlp: MlpKind,
}

impl DecoderLayout {
    /// Parameters of one norm of `width`.
    pub fn norm_parameters(&self, width: usize) -> usize {
        match self.norm {
            NormKind::Rms => width,
            NormKind::Layer => 2 * width,
        }
    }
}
