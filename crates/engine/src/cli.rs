//! Command-line arguments of `colocate serve` (vLLM's flag names where the meaning is the
//! same) and the function that runs it.

use crate::limits;
use crate::load::LoadFormat;

/// Arguments of `colocate serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// `preset:NAME` (qwen3-0.6b ... qwen3-8b, qwen3-embedding-8b, qwen3-30b-a3b,
    /// llama-3.2-1b, llama-3.2-3b, mistral-7b, qwen2.5-0.5b ... qwen2.5-7b, gpt2, distilgpt2,
    /// and the tiny test ones) or a Hugging Face model folder (config.json, *.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    pub model: String,
    /// The tokenizer: a `tokenizer.json` or a folder with one (default: the model
    /// folder's). A preset ships none and counts one token per byte of text; give it the
    /// real model's tokenizer to see the prompt lengths a real deployment sees.
    #[arg(long)]
    pub tokenizer: Option<std::path::PathBuf>,
    /// What to serve: `generate` (completions, chat) or `embed` (embeddings). Default: the
    /// model's own task.
    #[arg(long, value_enum)]
    pub task: Option<crate::model_api::Task>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: crate::load::Device,
    /// `auto`: weights from the folder (presets get dummy weights); `dummy`: seeded random
    /// weights of the real shapes.
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// Name clients use in `model` (default: the --model string).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most sequences in one step (embed: inputs per batch). Default 256.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_seqs: Option<u64>,
    /// Token budget of one step (prefill chunks plus decodes; embed: tokens per batch).
    /// Default 2048 (embed: 16384).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_batched_tokens: Option<u64>,
    /// Longest prompt plus output. Default: the model's, capped by what the KV cache holds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_model_len: Option<u64>,
    /// KV cache budget in bytes on the CPU: `12GiB` (1024^n), `12GB` (1000^n), or as vLLM
    /// reads a bare letter: `512M` = 512 MiB, `512m` = 512*10^6.
    #[arg(long, default_value = "1Gi", value_parser = units::bytes::parse)]
    pub kv_cache_memory: u64,
    /// Fraction of the GPU's memory for weights, KV cache and workspace (CUDA backend).
    #[arg(long, default_value_t = limits::DEFAULT_GPU_MEMORY_UTILIZATION, value_parser = parse_fraction)]
    pub gpu_memory_utilization: f64,
    /// Run every kernel of the engine on this many of the GPU's SMs, no others: a CUDA
    /// green context, rounded up to the device's granularity (8 on Hopper); the rest stay
    /// free for engines beside it (`--device cuda`; not inside an MPS client with
    /// CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set, where the driver cannot split the SMs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "sm_partitions")]
    pub sm_partition: Option<u32>,
    /// An embedder's SM partitions, movable while it runs: CUDA green contexts of these
    /// many SMs (comma-separated, e.g. `16,32,64`; rounded up as for --sm-partition) made at
    /// start, between which `POST /admin/compute-share {"sm_percent": 25}` moves its
    /// batches (the smallest with at least that share of the SMs; the whole GPU without
    /// one). The gateway's `engine_sm_floor` moves it with the SLO controller
    /// (`--device cuda`, `--task embed`).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    pub sm_partitions: Vec<u32>,
    /// Requests accepted but not yet running; beyond it the server answers 503.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Seed of dummy weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Reuse the KV blocks of prompt prefixes computed before (automatic prefix caching,
    /// on by default as in vLLM; whole blocks of identical leading tokens).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Compute every prompt from its first token.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Tokens per KV block.
    #[arg(long, default_value_t = limits::DEFAULT_BLOCK_SIZE as u64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub block_size: u64,
}

fn parse_device(s: &str) -> Result<crate::load::Device, String> {
    use crate::load::Device;
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("expected cpu, cuda or cuda:N, got {s:?}")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .parse()
        .map_err(|_| format!("expected a number in (0, 1], got {s:?}"))?;
    if f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err(format!("expected a number in (0, 1], got {s:?}"))
    }
}

/// Runs `colocate serve` until Ctrl-C / SIGTERM, or fails when the model cannot be loaded
/// or the port cannot be bound.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::lifecycle::run(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_memory_reads_sizes_as_vllm_does() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let kv = |v: &str| {
            Serve::try_parse_from(["serve", "--model", "m", "--kv-cache-memory", v])
                .map(|s| s.args.kv_cache_memory)
        };
        assert_eq!(kv("1Gi").unwrap(), 1 << 30);
        assert_eq!(kv("512M").unwrap(), 512 << 20);
        assert_eq!(kv("512m").unwrap(), 512_000_000);
        assert!(kv("12 parsecs").is_err());
        assert!(kv("-5").is_err());
    }

    #[test]
    fn devices() {
        assert_eq!(
            parse_device("cuda:1").unwrap(),
            crate::load::Device::Cuda(1)
        );
        assert!(parse_device("tpu").is_err());
    }
}
