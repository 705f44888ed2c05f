//! Serving limits: the flags as given (`--max-num-seqs`, `--max-num-batched-tokens`,
//! `--max-model-len`, `--kv-cache-memory`, `--block-size`, `--gpu-memory-utilization`),
//! their defaults (decided here only: the worker's scheduler and the CUDA step buffers both
//! read them) and their resolution against the loaded model.

use crate::model_api::{ModelInfo, Task};

/// Most sequences in one step (embed: inputs per batch) when `--max-num-seqs` is not
/// given; a generator's is also capped by its token budget.
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
/// Token budget of one generation step when `--max-num-batched-tokens` is not given.
pub const DEFAULT_GENERATE_BATCHED_TOKENS: usize = 2048;
/// Tokens of one embedding batch when `--max-num-batched-tokens` is not given.
pub const DEFAULT_EMBED_BATCHED_TOKENS: usize = 16_384;
/// Tokens per KV block (`--block-size`).
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// Fraction of the GPU's memory for weights, KV cache and workspace
/// (`--gpu-memory-utilization`).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// `--max-num-batched-tokens` as served: the flag or the task's default; an embedding batch
/// always holds one input of `max_model_len` tokens.
pub fn max_num_batched_tokens(task: Task, flag: Option<usize>, max_model_len: usize) -> usize {
    match task {
        Task::Embed => flag
            .unwrap_or(DEFAULT_EMBED_BATCHED_TOKENS)
            .max(max_model_len),
        Task::Generate => flag.unwrap_or(DEFAULT_GENERATE_BATCHED_TOKENS),
    }
}

/// The most sequences one step can hold: `--max-num-seqs` or its default. The resolved
/// limit never exceeds it, so the CUDA step buffers are sized with it.
pub fn max_num_seqs_bound(flag: Option<usize>) -> usize {
    flag.unwrap_or(DEFAULT_MAX_NUM_SEQS)
}

/// Serving limits, as given on the command line (`None` = derive a default).
#[derive(Debug, Clone)]
pub struct LimitFlags {
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_model_len: Option<usize>,
    /// KV cache budget in bytes.
    pub kv_cache_memory: u64,
    pub block_size: usize,
    /// Reuse the KV blocks of prompt prefixes computed before (`kv::BlockManager`).
    pub prefix_caching: bool,
}

/// The limits the engine serves with: the flags resolved against the loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServingLimits {
    pub num_blocks: usize,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

impl LimitFlags {
    /// Sizes the KV cache (`--kv-cache-memory / (block_size * kv_bytes_per_token)` blocks)
    /// and checks the limits against it: a generator must be able to hold one sequence of
    /// `max_model_len` tokens, so a too-small budget is an error naming both flags.
    pub fn resolve(&self, info: &ModelInfo) -> anyhow::Result<ServingLimits> {
        let max_pos = info.max_position_embeddings;
        if info.task == Task::Embed {
            let max_model_len = self.max_model_len.unwrap_or(max_pos);
            if max_model_len > max_pos {
                anyhow::bail!("--max-model-len {max_model_len} is longer than the model's max_position_embeddings ({max_pos})");
            }
            return Ok(ServingLimits {
                num_blocks: 0,
                max_model_len,
                max_num_seqs: max_num_seqs_bound(self.max_num_seqs),
                max_num_batched_tokens: max_num_batched_tokens(
                    Task::Embed,
                    self.max_num_batched_tokens,
                    max_model_len,
                ),
            });
        }
        let per_block =
            (self.block_size as u64).saturating_mul(info.kv_bytes_per_token.max(1) as u64);
        let num_blocks = (self.kv_cache_memory / per_block) as usize;
        let capacity = num_blocks * self.block_size;
        if capacity == 0 {
            anyhow::bail!(
                "--kv-cache-memory {} bytes holds no KV block ({} bytes per block of {} tokens at {} bytes per token); raise --kv-cache-memory",
                self.kv_cache_memory, per_block, self.block_size, info.kv_bytes_per_token
            );
        }
        let max_model_len = match self.max_model_len {
            Some(m) if m > max_pos => anyhow::bail!(
                "--max-model-len {m} is longer than the model's max_position_embeddings ({max_pos})"
            ),
            Some(m) if m > capacity => anyhow::bail!(
                "--max-model-len {m} does not fit the KV cache: --kv-cache-memory {} bytes holds {capacity} tokens; raise --kv-cache-memory or lower --max-model-len",
                self.kv_cache_memory
            ),
            Some(m) => m,
            None => {
                if capacity < max_pos {
                    tracing::warn!(
                        "--kv-cache-memory holds {capacity} tokens, fewer than the model's {max_pos}: serving with --max-model-len {capacity}"
                    );
                }
                max_pos.min(capacity)
            }
        };
        // Every running sequence needs at least one token of the step budget to decode.
        let max_num_batched_tokens =
            max_num_batched_tokens(Task::Generate, self.max_num_batched_tokens, max_model_len);
        let max_num_seqs = match self.max_num_seqs {
            Some(s) if s > max_num_batched_tokens => anyhow::bail!(
                "--max-num-seqs {s} is larger than --max-num-batched-tokens {max_num_batched_tokens}: every running sequence needs a token of the step budget"
            ),
            Some(s) => s,
            None => max_num_seqs_bound(None).min(max_num_batched_tokens),
        };
        Ok(ServingLimits {
            num_blocks,
            max_model_len,
            max_num_seqs,
            max_num_batched_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(task: Task) -> ModelInfo {
        ModelInfo {
            architecture: "x".into(),
            task,
            vocab_size: 10,
            max_position_embeddings: 4096,
            eos_token_ids: vec![],
            kv_bytes_per_token: 1000,
            weight_bytes: 0,
        }
    }

    fn limits(kv: u64, mml: Option<usize>) -> LimitFlags {
        LimitFlags {
            max_num_seqs: None,
            max_num_batched_tokens: None,
            max_model_len: mml,
            kv_cache_memory: kv,
            block_size: 16,
            prefix_caching: true,
        }
    }

    #[test]
    fn blocks_from_budget_and_max_model_len_defaults() {
        let r = limits(16_000 * 100 + 5, None)
            .resolve(&info(Task::Generate))
            .unwrap();
        assert_eq!(r.num_blocks, 100);
        assert_eq!(r.max_model_len, 1600, "capped by the KV capacity");
        let r = limits(16_000 * 1000, None)
            .resolve(&info(Task::Generate))
            .unwrap();
        assert_eq!(r.max_model_len, 4096);
    }

    #[test]
    fn too_small_budgets_name_the_flags() {
        let e = limits(100, None)
            .resolve(&info(Task::Generate))
            .unwrap_err();
        assert!(e.to_string().contains("--kv-cache-memory"), "{e}");
        let e = limits(16_000 * 10, Some(1000))
            .resolve(&info(Task::Generate))
            .unwrap_err();
        assert!(e.to_string().contains("--max-model-len 1000"), "{e}");
        let e = limits(1 << 40, Some(5000))
            .resolve(&info(Task::Generate))
            .unwrap_err();
        assert!(e.to_string().contains("max_position_embeddings"), "{e}");
        let mut l = limits(1 << 30, None);
        l.max_num_batched_tokens = Some(8);
        assert_eq!(l.resolve(&info(Task::Generate)).unwrap().max_num_seqs, 8);
        l.max_num_seqs = Some(9);
        let e = l.resolve(&info(Task::Generate)).unwrap_err();
        assert!(e.to_string().contains("--max-num-seqs 9"), "{e}");
    }

    /// An embedder's batch holds one input of `max_model_len` tokens; its defaults are the
    /// embedding ones.
    #[test]
    fn embed_defaults() {
        let r = limits(0, None).resolve(&info(Task::Embed)).unwrap();
        assert_eq!(r.num_blocks, 0);
        assert_eq!(r.max_num_batched_tokens, DEFAULT_EMBED_BATCHED_TOKENS);
        assert_eq!(r.max_num_seqs, DEFAULT_MAX_NUM_SEQS);
        let mut l = limits(0, None);
        l.max_num_batched_tokens = Some(100);
        assert_eq!(
            l.resolve(&info(Task::Embed))
                .unwrap()
                .max_num_batched_tokens,
            4096
        );
    }
}
