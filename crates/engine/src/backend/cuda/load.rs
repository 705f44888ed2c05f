//! The entry point `load.rs` calls for `--device cuda`: builds the CUDA Qwen3 fast path
//! from the same `ModelConfig` the CPU path uses, and turns `--gpu-memory-utilization`
//! into a KV-cache byte budget for the worker (which then sizes its block manager exactly
//! as it does with `--kv-cache-memory` on CPU).

use std::path::Path;

use anyhow::bail;

use super::qwen3::{CudaOptions, CudaQwen3, WeightSource};
use super::shape::Qwen3Shape;
use crate::load::LoadedModel;
use crate::model::config::{Arch, ModelConfig};
use crate::runner::{ModelInfo, Task};

impl Qwen3Shape {
    /// The CUDA path's view of a Qwen3 `ModelConfig`.
    pub fn from_model_config(c: &ModelConfig) -> Self {
        Self {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            eps: c.norm_eps as f32,
            rope_theta: c.rope_theta as f32,
            tie_embeddings: c.tie_word_embeddings,
            max_positions: c.max_position_embeddings,
            eos_token_ids: c.eos_token_ids.clone(),
        }
    }
}

/// A model loaded on the GPU, and the KV-cache bytes `--gpu-memory-utilization` leaves.
pub struct CudaLoaded {
    pub model: LoadedModel,
    /// Bytes the KV cache may take (0 for an embedder): pass as the worker's KV budget.
    pub kv_cache_bytes: u64,
}

/// Loads `config` on GPU `ordinal`. `weights_dir` is `None` for dummy weights (`seed`).
/// `info` is the `ModelInfo` load.rs built (its KV/weight sizes should use 2-byte bf16).
/// `opts` must cover the worker's limits (max tokens per step, max seqs, max model len).
#[allow(clippy::too_many_arguments)]
pub fn load(
    ordinal: usize,
    config: &ModelConfig,
    weights_dir: Option<&Path>,
    seed: u64,
    info: ModelInfo,
    opts: CudaOptions,
    gpu_memory_utilization: f64,
    block_size: usize,
) -> anyhow::Result<CudaLoaded> {
    if config.arch != Arch::Qwen3 {
        bail!(
            "--device cuda: only Qwen3 models run on the CUDA backend so far ({} does not); use --device cpu",
            config.arch.name()
        );
    }
    let shape = Qwen3Shape::from_model_config(config);
    let source = match weights_dir {
        Some(d) => WeightSource::Dir(d),
        None => WeightSource::Dummy { seed },
    };
    let mut m = CudaQwen3::new(ordinal, shape.clone(), info.task, source, opts)?;
    m.set_info(info.clone());
    Ok(match info.task {
        Task::Generate => {
            let blocks = m.kv_blocks_for_fraction(gpu_memory_utilization, block_size)?;
            CudaLoaded {
                kv_cache_bytes: (blocks * block_size * shape.kv_bytes_per_token()) as u64,
                model: LoadedModel::Generator(Box::new(m)),
            }
        }
        Task::Embed => CudaLoaded {
            kv_cache_bytes: 0,
            model: LoadedModel::Embedder(Box::new(m)),
        },
    })
}
