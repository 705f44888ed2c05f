//! Turns `--model` / `--task` / `--load-format` / `--device` into a ready model: reads the
//! config (file or preset), the tokenizer, the weights (safetensors or dummy), and builds
//! the architecture's model for the chosen device: on the CPU the portable models
//! (`model::decoder` for every decoder family: Qwen3 dense and MoE, Qwen2, Llama, Mistral,
//! GPT-2; `model::bert`) on [`CpuBackend`], FP8 checkpoints dequantised at load; on CUDA
//! the CUDA models (`model::qwen3_cuda`: every decoder family in bf16, a mixture of
//! experts' FP8 experts kept in FP8; `model::encoder_cuda`: the BERT family's encoders),
//! from the same config and weight source.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaOptions;
use crate::backend::Backend;
use crate::limits::{self, LimitFlags};
use crate::model::config::{preset_names, Fp8Kept, ModelConfig, ModelLocation};
use crate::model::{bert, decoder};
#[cfg(feature = "cuda")]
use crate::model::{encoder_cuda::CudaEncoder, qwen3_cuda::CudaQwen3};
use crate::model_api::{Embedder, Generator, ModelInfo, Task};
use crate::tokenizer::{self, Tokenizer};
use crate::weights::WeightSource;

/// Where weights come from.
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
pub enum LoadFormat {
    /// Safetensors from the model folder; a preset (which has no files) gets dummy weights.
    #[default]
    Auto,
    /// Seeded random weights of the model's real shapes.
    Dummy,
}

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device index.
    Cuda(usize),
}

impl Device {
    /// What a block-FP8 checkpoint keeps in FP8 on this device: the CPU computes in f32 and
    /// dequantises everything at load; CUDA keeps a mixture of experts' experts (its grouped
    /// GEMMs read FP8) and dequantises the rest to bf16.
    pub fn fp8_kept(self) -> Fp8Kept {
        match self {
            Device::Cpu => Fp8Kept::None,
            Device::Cuda(_) => Fp8Kept::Experts,
        }
    }
}

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `preset:NAME` or a Hugging Face folder path.
    pub model: String,
    /// `None`: the model's own task (BERT and Qwen3-Embedding embed, Qwen3 generates).
    pub task: Option<Task>,
    pub load_format: LoadFormat,
    pub device: Device,
    /// Seed of dummy weights.
    pub seed: u64,
    /// `--tokenizer`: a `tokenizer.json` or a folder with one, instead of the model
    /// folder's (a preset has none and falls back to one token per byte).
    pub tokenizer: Option<PathBuf>,
    /// Sizing of the CUDA path (ignored on the CPU).
    pub gpu: GpuLoadOptions,
}

/// What the CUDA path must be sized for: the serving limits as given on the command line
/// (`None` = the defaults of [`crate::limits`], which the worker derives too) and the
/// memory fraction it may use.
#[derive(Debug, Clone)]
pub struct GpuLoadOptions {
    /// `--gpu-memory-utilization`: fraction of the GPU's total memory for weights, KV and workspace.
    pub memory_utilization: f64,
    pub block_size: usize,
    pub max_num_batched_tokens: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub max_model_len: Option<usize>,
    /// `--sm-partition`: confine the engine's kernels to this many SMs (a green context).
    pub sm_partition: Option<u32>,
    /// `--sm-partitions`: an embedder's green contexts, movable while it runs.
    pub sm_partitions: Vec<u32>,
}

impl GpuLoadOptions {
    /// The CUDA sizing of the limits the worker is given.
    pub fn new(memory_utilization: f64, limits: &LimitFlags) -> Self {
        Self {
            memory_utilization,
            block_size: limits.block_size,
            max_num_batched_tokens: limits.max_num_batched_tokens,
            max_num_seqs: limits.max_num_seqs,
            max_model_len: limits.max_model_len,
            sm_partition: None,
            sm_partitions: Vec::new(),
        }
    }
}

impl Default for GpuLoadOptions {
    fn default() -> Self {
        Self {
            memory_utilization: limits::DEFAULT_GPU_MEMORY_UTILIZATION,
            block_size: limits::DEFAULT_BLOCK_SIZE,
            max_num_batched_tokens: None,
            max_num_seqs: None,
            max_model_len: None,
            sm_partition: None,
            sm_partitions: Vec::new(),
        }
    }
}

/// What a device-resident model fixes for the worker: the KV bytes its memory budget left,
/// and the longest sequence its step buffers were sized for.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    pub kv_cache_bytes: u64,
    pub max_model_len: usize,
}

/// A loaded model, by task.
pub enum LoadedModel {
    Generator(Box<dyn Generator>),
    Embedder(Box<dyn Embedder>),
}

/// A loaded model with its tokenizer and description.
pub struct Loaded {
    pub model: LoadedModel,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    /// `Some` on CUDA: replaces `--kv-cache-memory` and caps `--max-model-len`.
    pub device_limits: Option<DeviceLimits>,
}

/// The config of `--model` and the folder its files are in (`None` for a preset).
fn resolve(model: &str) -> anyhow::Result<(ModelConfig, Option<PathBuf>)> {
    match ModelLocation::of(model) {
        ModelLocation::Preset(name) => Ok((ModelConfig::from_preset(name)?, None)),
        ModelLocation::Folder(dir) => Ok((
            ModelConfig::from_file(&dir.join("config.json"))?,
            Some(dir.to_path_buf()),
        )),
        ModelLocation::Elsewhere(_) => anyhow::bail!(
            "--model {model:?}: not a folder (expected a Hugging Face model folder or preset:NAME with NAME one of {})",
            preset_names().join(", ")
        ),
    }
}

/// `generation_config.json`'s `eos_token_id`, when the folder has one.
fn generation_eos(dir: &Path) -> anyhow::Result<Option<Vec<u32>>> {
    #[derive(serde::Deserialize)]
    struct Gen {
        eos_token_id: Option<crate::model::config::EosIds>,
    }
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let gen: Gen =
        serde_json::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
    Ok(gen.eos_token_id.map(|e| e.into_vec()))
}

/// sentence-transformers' `max_seq_length`, when the folder has one.
fn sentence_max_seq_length(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("max_seq_length")?.as_u64().map(|n| n as usize)
}

/// Loads a model. Errors name the file or flag and the reason.
pub fn load(opts: &LoadOptions) -> anyhow::Result<Loaded> {
    let (config, dir) = resolve(&opts.model)?;
    let task = opts.task.unwrap_or(config.default_task);
    if config.arch.is_encoder() && task == Task::Generate {
        anyhow::bail!(
            "--model {}: a {} encoder cannot --task generate (use --task embed)",
            opts.model,
            config.arch.name()
        );
    }

    let source = match (&dir, opts.load_format) {
        (Some(dir), LoadFormat::Auto) => WeightSource::open_model(dir, &config)?,
        (_, LoadFormat::Dummy) | (None, LoadFormat::Auto) => {
            WeightSource::Dummy { seed: opts.seed }
        }
    };

    // Encoders truncate like sentence-transformers; generators check prompt lengths instead.
    let truncate_to = (!config.arch.is_decoder()).then(|| {
        dir.as_deref()
            .and_then(sentence_max_seq_length)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings)
    });
    let tok = match (&opts.tokenizer, &dir) {
        (Some(flag), _) => Some(tokenizer::load_flag(flag, truncate_to)?),
        (None, Some(d)) => tokenizer::load_dir(d, truncate_to)?,
        (None, None) => None,
    };
    let tokenizer = tok.unwrap_or_else(|| {
        tracing::warn!(
            "--model {}: no tokenizer.json, so one token per byte of text (a prompt is \
             several times longer than with the model's own tokenizer); --tokenizer names one",
            opts.model
        );
        Tokenizer::byte_level()
    });

    let mut eos = config.eos_token_ids.clone();
    if let Some(d) = &dir {
        if let Some(e) = generation_eos(d)? {
            eos = e;
        }
    }
    // A preset's dummy model speaks the byte-level tokenizer; a folder keeps its own EOS.
    if tokenizer.is_byte_level() && dir.is_none() {
        eos = vec![tokenizer::BYTE_LEVEL_EOS];
    }
    if tokenizer.vocab_size() > config.vocab_size && !tokenizer.is_byte_level() {
        let whose = match &opts.tokenizer {
            Some(flag) => format!("--tokenizer {}", flag.display()),
            None => format!("--model {}: its tokenizer", opts.model),
        };
        anyhow::bail!(
            "{whose} has {} tokens but the model's vocab_size is {}",
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    if tokenizer.is_byte_level() && config.vocab_size < tokenizer.vocab_size() {
        anyhow::bail!(
            "--model {}: no tokenizer.json and vocab_size {} is too small for the byte-level tokenizer ({} ids)",
            opts.model,
            config.vocab_size,
            tokenizer.vocab_size()
        );
    }

    if let Device::Cuda(ordinal) = opts.device {
        return load_cuda(opts, ordinal, &config, &source, task, eos, tokenizer);
    }
    let backend = CpuBackend::new();
    let info = model_info(
        &config,
        task,
        eos,
        backend.compute_dtype_bytes(),
        Device::Cpu.fp8_kept(),
    );
    if let Some(avail) = mem_available_bytes() {
        if info.weight_bytes > avail {
            anyhow::bail!(
                "--model {}: its weights need {:.1} GiB as f32 on the CPU but only {:.1} GiB of memory is available",
                opts.model,
                info.weight_bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    let model = build(backend, &config, &source, info.clone())
        .with_context(|| format!("loading weights of {}", opts.model))?;
    Ok(Loaded {
        model,
        tokenizer,
        info,
        device_limits: None,
    })
}

/// The CUDA model (`model::qwen3_cuda` for a decoder, `model::encoder_cuda` for an
/// encoder): bf16 weights (FP8 experts kept in FP8), fused
/// kernels, graph-captured decode. Its step buffers are sized from the same limits (and defaults, [`crate::limits`])
/// the worker uses;
/// `--gpu-memory-utilization` becomes the KV-cache byte budget the worker sizes its block
/// manager with, as it does with `--kv-cache-memory` on the CPU.
#[cfg(feature = "cuda")]
fn load_cuda(
    opts: &LoadOptions,
    ordinal: usize,
    config: &ModelConfig,
    source: &WeightSource,
    task: Task,
    eos: Vec<u32>,
    tokenizer: Tokenizer,
) -> anyhow::Result<Loaded> {
    const BF16: usize = 2;
    let info = model_info(config, task, eos, BF16, Device::Cuda(ordinal).fp8_kept());
    let g = &opts.gpu;
    let defaults = CudaOptions::default();
    let max_model_len = g
        .max_model_len
        .unwrap_or(defaults.max_model_len)
        .min(config.max_position_embeddings);
    let max_tokens = limits::max_num_batched_tokens(task, g.max_num_batched_tokens, max_model_len);
    let cuda_opts = CudaOptions {
        max_tokens: max_tokens.max(1),
        max_seqs: limits::max_num_seqs_bound(g.max_num_seqs).max(1),
        max_model_len,
        sm_partition: g.sm_partition,
        sm_partitions: g.sm_partitions.clone(),
        ..defaults
    };
    let loading = || format!("loading {} on cuda:{ordinal}", opts.model);
    if !g.sm_partitions.is_empty() && (task != Task::Embed || config.moe.is_some()) {
        anyhow::bail!(
            "--sm-partitions is a lever of dense embedders (--task embed): a generator's steps \
             and CUDA graphs stay on one set of SMs (--sm-partition confines a generator)"
        );
    }
    if config.arch.is_encoder() {
        let m = CudaEncoder::new(ordinal, config, info.clone(), source, cuda_opts)
            .with_context(loading)?;
        return Ok(Loaded {
            model: LoadedModel::Embedder(Box::new(m)),
            tokenizer,
            info,
            device_limits: Some(DeviceLimits {
                kv_cache_bytes: 0,
                max_model_len,
            }),
        });
    }
    let m =
        CudaQwen3::new(ordinal, config, info.clone(), source, cuda_opts).with_context(loading)?;
    let (model, kv_cache_bytes) = match task {
        Task::Generate => {
            let blocks = m
                .kv_blocks_for_fraction(g.memory_utilization, g.block_size)
                .with_context(loading)?;
            let bytes = (blocks * g.block_size * m.kv_bytes_per_token()) as u64;
            (LoadedModel::Generator(Box::new(m)), bytes)
        }
        Task::Embed => (LoadedModel::Embedder(Box::new(m)), 0),
    };
    Ok(Loaded {
        model,
        tokenizer,
        info,
        device_limits: Some(DeviceLimits {
            kv_cache_bytes,
            max_model_len,
        }),
    })
}

/// A build without the `cuda` feature (the quickstart's CPU build) has no CUDA model.
#[cfg(not(feature = "cuda"))]
fn load_cuda(
    opts: &LoadOptions,
    ordinal: usize,
    _config: &ModelConfig,
    _source: &WeightSource,
    _task: Task,
    _eos: Vec<u32>,
    _tokenizer: Tokenizer,
) -> anyhow::Result<Loaded> {
    anyhow::bail!(
        "cannot load {} on cuda:{ordinal}: this colocate was built without its `cuda` feature \
         (the quickstart's CPU build); build it with `cargo build --release -p colocate`",
        opts.model
    )
}

/// What the serving side is told about `config` loaded for `task`, with activations and
/// KV cache of `dtype_bytes` per element and `kept` of an FP8 checkpoint in FP8.
pub fn model_info(
    config: &ModelConfig,
    task: Task,
    eos: Vec<u32>,
    dtype_bytes: usize,
    kept: Fp8Kept,
) -> ModelInfo {
    ModelInfo {
        architecture: config.arch.name().to_string(),
        task,
        vocab_size: config.vocab_size,
        max_position_embeddings: config.max_position_embeddings,
        eos_token_ids: eos,
        kv_bytes_per_token: if task == Task::Generate {
            config.kv_bytes_per_token(dtype_bytes)
        } else {
            0
        },
        weight_bytes: loaded_weight_bytes(config, task, dtype_bytes, kept),
    }
}

/// Weight bytes actually loaded: an embedder never loads an untied `lm_head`; of an FP8
/// checkpoint, `kept` stays in FP8 and the rest is held dequantised.
fn loaded_weight_bytes(
    config: &ModelConfig,
    task: Task,
    dtype_bytes: usize,
    kept: Fp8Kept,
) -> usize {
    config.resident_weight_bytes(dtype_bytes, kept, task == Task::Generate)
}

/// `MemAvailable` from `/proc/meminfo` (Linux); `None` elsewhere.
fn mem_available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Builds the portable model of the architecture on an op-trait backend.
pub fn build<B: Backend>(
    backend: B,
    config: &ModelConfig,
    source: &WeightSource,
    info: ModelInfo,
) -> anyhow::Result<LoadedModel> {
    Ok(match (config.arch, info.task) {
        (a, Task::Embed) if a.is_encoder() => {
            LoadedModel::Embedder(Box::new(bert::Bert::new(backend, config, source, info)?))
        }
        (a, Task::Generate) if a.is_encoder() => {
            anyhow::bail!("a {} encoder cannot generate", a.name())
        }
        (_, Task::Generate) => LoadedModel::Generator(Box::new(decoder::DecoderGenerator::new(
            backend, config, source, info,
        )?)),
        (_, Task::Embed) => LoadedModel::Embedder(Box::new(decoder::DecoderEmbedder::new(
            backend, config, source, info,
        )?)),
    })
}
