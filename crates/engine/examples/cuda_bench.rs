//! Throughput of the CUDA model (`model::qwen3_cuda`) without HTTP or the scheduler, in
//! the shapes of the released models with dummy weights: gen (prefill 128 + 128 decode
//! steps, CUDA-graph decode) and embed (512-token inputs), each followed by a per-op time
//! breakdown from CUDA events. Prints `RESULT` lines; speed is never asserted. Run on the
//! GPU machine by `scripts/gpu/cuda-bench.sh`:
//!
//! `cargo run --release -p engine --example cuda_bench -- [PARTS]`
//! with PARTS a comma-separated subset of `gen17,embed,gen8` (all by default; the
//! `COLOCATE_CUDA_BENCH` variable is read when no argument is given).

use std::time::Instant;

use engine::backend::cuda::CudaOptions;
use engine::load::model_info;
use engine::model::config::ModelConfig;
use engine::model::qwen3_cuda::CudaQwen3;
use engine::runner::{Embedder, Generator, SampleSpec, SeqStep, Task};
use engine::weights::WeightSource;

const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.0,
    masked: &[],
};

/// The CUDA model of preset `name` with dummy weights on GPU 0.
fn model(name: &str, task: Task, opts: CudaOptions) -> anyhow::Result<(CudaQwen3, ModelConfig)> {
    let config = ModelConfig::from_preset(name)?;
    let info = model_info(&config, task, config.eos_token_ids.clone(), 2);
    let m = CudaQwen3::new(0, &config, info, &WeightSource::Dummy { seed: 0 }, opts)?;
    Ok((m, config))
}

/// Memory-bandwidth limit of the gen workload as in shared/baselines/README.md: every
/// decode step reads all weights and the KV of every sequence (average context
/// prompt + gen/2) at 3.0 TB/s; prefill at 790 TFLOP/s.
fn gen_limit_tok_s(c: &ModelConfig, batch: usize, prompt: usize, gen: usize) -> f64 {
    let w = c.weight_bytes(2) as f64;
    let kv = (batch * (prompt + gen / 2) * c.kv_bytes_per_token(2)) as f64;
    let step = (w + kv) / 3.0e12;
    let params = w / 2.0;
    let prefill = 2.0 * params * (batch * prompt) as f64 / 790e12;
    (batch * gen) as f64 / (gen as f64 * step + prefill)
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as u32
    }
}

/// One round: prefill every prompt (chunked to the step limit), then `gen - 1` decode steps.
fn gen_round(
    m: &mut CudaQwen3,
    prompts: &[Vec<u32>],
    tables: &[Vec<u32>],
    gen: usize,
    max_tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut last = vec![0u32; prompts.len()];
    let mut i = 0;
    while i < prompts.len() {
        let mut j = i;
        let mut toks = 0;
        while j < prompts.len() && toks + prompts[j].len() <= max_tokens {
            toks += prompts[j].len();
            j += 1;
        }
        let steps: Vec<SeqStep<'_>> = (i..j)
            .map(|k| SeqStep {
                tokens: &prompts[k],
                start_pos: 0,
                block_table: &tables[k],
                sample: Some(GREEDY),
            })
            .collect();
        let out = m.step(&steps)?;
        last[i..j].copy_from_slice(&out);
        i = j;
    }
    let prefill = t0.elapsed().as_secs_f64();
    let plen = prompts[0].len();
    for g in 1..gen {
        let toks: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
        let steps: Vec<SeqStep<'_>> = toks
            .iter()
            .zip(tables)
            .map(|(t, tb)| SeqStep {
                tokens: t,
                start_pos: plen + g - 1,
                block_table: tb,
                sample: Some(GREEDY),
            })
            .collect();
        last = m.step(&steps)?;
    }
    Ok((t0.elapsed().as_secs_f64(), prefill))
}

fn print_profile(m: &CudaQwen3, label: &str) {
    let rep = m.profile_report();
    let total: f64 = rep.iter().map(|r| r.1).sum();
    println!("breakdown {label}: total GPU {total:.1} ms (eager, CUDA events per op)");
    for (name, ms, calls) in rep {
        println!(
            "  {name:<24} {ms:>9.2} ms {:>5.1}%  {calls} calls",
            100.0 * ms / total.max(1e-9)
        );
    }
}

fn bench_gen(name: &str, batch: usize, rounds: usize) -> anyhow::Result<()> {
    let (prompt, gen) = (128usize, 128usize);
    let max_tokens = 8192;
    let opts = CudaOptions {
        max_tokens,
        max_seqs: batch.max(8),
        max_model_len: 512,
        ..Default::default()
    };
    let t = Instant::now();
    let (mut m, config) = model(name, Task::Generate, opts)?;
    let bs = 16;
    let per_seq = (prompt + gen).div_ceil(bs);
    m.init_kv_cache(batch * per_seq, bs)?;
    m.capture_all()?;
    let load_s = t.elapsed().as_secs_f64();
    let mut rng = Lcg(42);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..prompt).map(|_| rng.next(150_000)).collect())
        .collect();
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    gen_round(&mut m, &prompts, &tables, gen, max_tokens)?; // warm-up
    let mut total = 0.0;
    let mut prefill = 0.0;
    for _ in 0..rounds {
        let (t, p) = gen_round(&mut m, &prompts, &tables, gen, max_tokens)?;
        total += t;
        prefill += p;
    }
    let tok_s = (rounds * batch * gen) as f64 / total;
    let decode_step_ms = (total - prefill) / (rounds * (gen - 1)) as f64 * 1e3;
    let limit = gen_limit_tok_s(&config, batch, prompt, gen);
    println!(
        "RESULT gen {name} batch {batch}: {tok_s:.0} tok/s ({:.1}% of the {limit:.0} tok/s bandwidth limit); prefill {:.1} ms/round, decode step {decode_step_ms:.2} ms (graph); load+capture {load_s:.1} s",
        100.0 * tok_s / limit,
        prefill / rounds as f64 * 1e3
    );
    m.set_profiling(true);
    gen_round(&mut m, &prompts, &tables, gen, max_tokens)?;
    m.collect_profile();
    print_profile(&m, &format!("gen {name} batch {batch}, one round"));
    Ok(())
}

fn bench_embed(name: &str, batch: usize, len: usize, secs: f64) -> anyhow::Result<()> {
    let opts = CudaOptions {
        max_tokens: batch * len,
        max_seqs: batch,
        max_model_len: len,
        graph_buckets: vec![],
    };
    let (mut m, _) = model(name, Task::Embed, opts)?;
    let mut rng = Lcg(7);
    let inputs: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..len).map(|_| rng.next(150_000)).collect())
        .collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    m.embed(&refs)?;
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < secs {
        m.embed(&refs)?;
        n += batch;
    }
    let seq_s = n as f64 / t.elapsed().as_secs_f64();
    println!("RESULT embed {name} {len} tokens batch {batch}: {seq_s:.0} seq/s");
    m.set_profiling(true);
    m.embed(&refs)?;
    print_profile(&m, &format!("embed {name} batch {batch}, one batch"));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let parts = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("COLOCATE_CUDA_BENCH").ok())
        .unwrap_or_else(|| "gen17,embed,gen8".to_string());
    for part in parts.split(',') {
        match part {
            "gen17" => {
                bench_gen("qwen3-1.7b", 64, 3)?;
                bench_gen("qwen3-1.7b", 256, 2)?;
            }
            "gen8" => {
                bench_gen("qwen3-8b", 64, 2)?;
                bench_gen("qwen3-8b", 256, 1)?;
            }
            "embed" => bench_embed("qwen3-embedding-0.6b", 64, 512, 5.0)?,
            other => anyhow::bail!("unknown bench part {other:?} (gen17, embed, gen8)"),
        }
    }
    Ok(())
}
