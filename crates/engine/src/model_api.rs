//! The seam between the serving side (scheduler, KV block manager, HTTP) and the model side
//! (architectures, backends, weights). The scheduler decides *what* runs in a step; a
//! [`Generator`] or [`Embedder`] runs it on its backend (CPU or CUDA) and owns the KV
//! storage. The scheduler owns the KV *accounting* (which block belongs to whom).
//!
//! Paged KV layout: a sequence's token at position `p` lives in block
//! `block_table[p / block_size]`, slot `block_table[p / block_size] * block_size + p % block_size`.

/// What a model is for, the one task type of the workspace (`colocate serve --task`, a
/// deployment's `task`, the model's own default): `Generate` is a causal LM serving
/// completions and chat; `Embed` gives pooled, L2-normalised sentence embeddings. Written
/// `generate` / `embed` on the command line, in TOML and JSON, and by `Display`.
// The variants carry no doc comments: clap would show them as help of each value.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    #[default]
    Generate,
    Embed,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::Generate => "generate",
            Task::Embed => "embed",
        })
    }
}

/// What the serving side needs to know about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Architecture name, e.g. `qwen3` or `bert`.
    pub architecture: String,
    pub task: Task,
    pub vocab_size: usize,
    /// Longest sequence the model supports (config `max_position_embeddings`).
    pub max_position_embeddings: usize,
    /// Token ids that end generation (from `generation_config.json` / `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// Bytes of K and V for one token over all layers, in the KV cache dtype.
    pub kv_bytes_per_token: usize,
    /// Bytes the weights take on the device.
    pub weight_bytes: usize,
}

/// How to pick the next token of one sequence. `temperature == 0` is greedy.
#[derive(Debug, Clone, Copy)]
pub struct SampleSpec<'a> {
    pub temperature: f32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// A uniform draw in [0, 1) from the request's seeded RNG; the sampler inverts the
    /// filtered distribution's CDF at it, so CPU and GPU agree for the same seed.
    pub uniform: f32,
    /// Token ids that must not be sampled this step (EOS while `min_tokens` is not reached);
    /// a mask that leaves no id is dropped (the rule: `backend::sampling`).
    pub masked: &'a [u32],
}

/// One sequence's share of a step: a prefill chunk or the single decode token.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    /// The tokens to run now (their K/V are written into the cache).
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the KV cache (the position of `tokens[0]`).
    pub start_pos: usize,
    /// KV blocks covering positions `0 .. start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    /// `Some` when a next token is wanted from the last position (last prefill chunk, decode).
    pub sample: Option<SampleSpec<'a>>,
}

/// A causal LM with a paged KV cache.
pub trait Generator: Send {
    fn info(&self) -> &ModelInfo;
    /// Allocates the KV cache; called once before the first step.
    fn init_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()>;
    /// Runs one step over all `seqs` and returns one sampled token for each seq whose
    /// `sample` is `Some`, in order.
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>>;
    /// Like `step`, but returns the full logits of the last position of every seq whose
    /// `sample` is `Some` (tests, numerics checks).
    fn step_logits(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>>;
}

/// An encoder (or decoder used as one) that maps token sequences to embeddings.
pub trait Embedder: Send {
    fn info(&self) -> &ModelInfo;
    /// One L2-normalised embedding per input.
    fn embed(&mut self, inputs: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// The SM partitions its batches can move between while it runs (a CUDA embedder
    /// started with `--sm-partitions`); `None`: it has none.
    fn sm_partitions(&self) -> Option<crate::sm_share::SmPartitions> {
        None
    }
    /// Runs the next batches on the partition for `percent` of the GPU's SMs
    /// ([`crate::sm_share::SmPartitions::pick`]; `None`: all of them) and returns the SMs
    /// they may use. Only an embedder with partitions can.
    fn set_sm_share(&mut self, _percent: Option<u32>) -> anyhow::Result<u32> {
        anyhow::bail!(
            "this engine has no SM partitions (start it with --device cuda --sm-partitions)"
        )
    }
}
