//! CUDA backend tests. The GPU ones are `#[ignore]`d (CI has no GPU) and run on the GPU
//! machine by `scripts/gpu/cuda-bench.sh`:
//! - numerics: the CUDA Qwen3 path against transformers' float32 reference for the tiny
//!   Qwen3 fixture (logits with bf16 tolerances, greedy tokens, embedding cosine), through
//!   the prefill path, the eager decode path and the CUDA-graph decode path;
//! - the benchmark (`cuda_bench`): gen and embed throughput in the shapes, with a
//!   per-kernel time breakdown from CUDA events.
//!
//! Without a GPU, only the error path runs: asking for CUDA is a clear error.

use std::path::PathBuf;
use std::time::Instant;

use engine::backend::cuda::{CudaOptions, CudaQwen3, Qwen3Shape, WeightSource};
use engine::runner::{Embedder, Generator, SampleSpec, SeqStep, Task};

const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.0,
    masked: &[],
};

/// The tiny Qwen3 fixture: the repo's copy, the shared one beside the checkout, or the one
/// carried to the GPU machine in `.gpu-g/`.
fn fixture_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for p in [
        "testdata/qwen3-tiny",
        "../shared/fixtures/qwen3-tiny",
        ".gpu-g/qwen3-tiny",
    ] {
        let d = root.join(p);
        if d.join("model.safetensors").is_file() {
            return d;
        }
    }
    if let Ok(p) = std::env::var("QWEN3_TINY_DIR") {
        return PathBuf::from(p);
    }
    panic!("qwen3-tiny fixture not found (testdata/qwen3-tiny, ../shared/fixtures/qwen3-tiny, .gpu-g/qwen3-tiny or $QWEN3_TINY_DIR)");
}

#[test]
fn asking_for_cuda_without_a_gpu_is_a_clear_error() {
    let shape = Qwen3Shape::named("qwen3-0.6b").unwrap();
    match CudaQwen3::new(
        0,
        shape,
        Task::Generate,
        WeightSource::Dummy { seed: 1 },
        small_opts(),
    ) {
        Ok(m) => eprintln!("GPU present: {:?}", m.device_name()),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("no NVIDIA driver/GPU found") || msg.contains("not available"),
                "{msg}"
            );
        }
    }
}

fn small_opts() -> CudaOptions {
    CudaOptions {
        max_tokens: 256,
        max_seqs: 8,
        max_model_len: 256,
        ..Default::default()
    }
}

struct Item {
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    argmax: Vec<u32>,
    greedy: Vec<u32>,
    embedding: Vec<f32>,
}

fn reference() -> Vec<Item> {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let nums = |x: &serde_json::Value| -> Vec<f64> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_f64().unwrap())
            .collect()
    };
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| Item {
            ids: nums(&it["input_ids"])
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            last_logits: nums(&it["last_logits"])
                .into_iter()
                .map(|x| x as f32)
                .collect(),
            argmax: nums(&it["argmax_per_position"])
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            greedy: nums(&it["greedy_8"])
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            embedding: nums(&it["embedding_last_token"])
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// bf16 tolerance on logits: max abs error within 3% of the logits' range, cosine >= 0.999.
fn assert_logits_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: vocab");
    let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let cos = cosine(got, want);
    eprintln!("{what}: max |err| {max_err:.4} (range {range:.3}), cosine {cos:.6}");
    assert!(
        max_err <= 0.03 * range + 0.02,
        "{what}: max |err| {max_err} over range {range}"
    );
    assert!(cos >= 0.999, "{what}: cosine {cos}");
}

fn tiny_generator() -> CudaQwen3 {
    let dir = fixture_dir();
    let shape = Qwen3Shape::from_dir(&dir).unwrap();
    let mut m = CudaQwen3::new(
        0,
        shape,
        Task::Generate,
        WeightSource::Dir(&dir),
        small_opts(),
    )
    .unwrap();
    m.init_kv_cache(64, 4).unwrap();
    m
}

/// Prefill (one step for all three prompts at once), then decode 7 tokens each, through
/// the graph path and compared with transformers' greedy continuation.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_tiny_qwen3_matches_transformers() {
    let items = reference();
    let mut m = tiny_generator();
    // Disjoint block tables: prompt i owns blocks 20*i ..
    let tables: Vec<Vec<u32>> = (0..items.len())
        .map(|i| (20 * i as u32..20 * i as u32 + 20).collect())
        .collect();
    let steps: Vec<SeqStep<'_>> = items
        .iter()
        .zip(&tables)
        .map(|(it, tb)| SeqStep {
            tokens: &it.ids,
            start_pos: 0,
            block_table: tb,
            sample: Some(GREEDY),
        })
        .collect();
    let logits = m.step_logits(&steps).unwrap();
    for (i, (it, got)) in items.iter().zip(&logits).enumerate() {
        assert_logits_close(got, &it.last_logits, &format!("prompt {i} prefill logits"));
    }
    // Greedy continuation through decode steps (graph replay, bucket 4 padded from 3).
    let mut seqs: Vec<Vec<u32>> = items.iter().map(|it| it.ids.clone()).collect();
    let first = m.step(&steps).unwrap();
    // The first step above re-wrote the same K/V (same slots, same values): harmless.
    for (s, t) in seqs.iter_mut().zip(&first) {
        s.push(*t);
    }
    for _ in 1..8 {
        let last: Vec<[u32; 1]> = seqs.iter().map(|s| [*s.last().unwrap()]).collect();
        let steps: Vec<SeqStep<'_>> = seqs
            .iter()
            .zip(&tables)
            .zip(&last)
            .map(|((s, tb), l)| SeqStep {
                tokens: l,
                start_pos: s.len() - 1,
                block_table: tb,
                sample: Some(GREEDY),
            })
            .collect();
        let next = m.step(&steps).unwrap();
        for (s, t) in seqs.iter_mut().zip(&next) {
            s.push(*t);
        }
    }
    let mut mismatches = 0;
    for (i, (it, s)) in items.iter().zip(&seqs).enumerate() {
        let got = &s[it.ids.len()..];
        eprintln!("prompt {i}: greedy {got:?} reference {:?}", it.greedy);
        if got != &it.greedy[..] {
            mismatches += 1;
        }
    }
    assert_eq!(
        mismatches, 0,
        "greedy continuations differ from transformers"
    );
}

/// Per-position argmax over a whole prompt (prefill attention at every causal length),
/// checked by asking for logits after each prefix chunk: chunked prefill must agree too.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_tiny_chunked_prefill_argmax_per_position() {
    let items = reference();
    let mut m = tiny_generator();
    let it = &items[2];
    let table: Vec<u32> = (0..20).collect();
    let mut agree = 0;
    // Chunks of 5 tokens, each asking for the last position's logits.
    let mut pos = 0;
    while pos < it.ids.len() {
        let end = (pos + 5).min(it.ids.len());
        let step = [SeqStep {
            tokens: &it.ids[pos..end],
            start_pos: pos,
            block_table: &table,
            sample: Some(GREEDY),
        }];
        let tok = m.step(&step).unwrap()[0];
        if tok == it.argmax[end - 1] {
            agree += 1;
        }
        pos = end;
    }
    let chunks = it.ids.len().div_ceil(5);
    eprintln!("chunked prefill argmax agreement {agree}/{chunks}");
    assert_eq!(agree, chunks);
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_tiny_embedding_matches_transformers() {
    let items = reference();
    let dir = fixture_dir();
    let shape = Qwen3Shape::from_dir(&dir).unwrap();
    let mut m =
        CudaQwen3::new(0, shape, Task::Embed, WeightSource::Dir(&dir), small_opts()).unwrap();
    let inputs: Vec<&[u32]> = items.iter().map(|it| it.ids.as_slice()).collect();
    // Both attention kernels of the embedding path: tensor-core flash (the default) and
    // the paged prefill kernel.
    for flash in [true, false] {
        m.set_embed_flash(flash);
        let got = m.embed(&inputs).unwrap();
        for (i, (g, it)) in got.iter().zip(&items).enumerate() {
            let c = cosine(g, &it.embedding);
            eprintln!("embedding {i} (flash {flash}): cosine {c:.6}");
            assert!(c >= 0.999, "embedding {i} (flash {flash}): cosine {c}");
        }
    }
}

/// The flash kernel at the real head size (128) against the paged kernel, on the
/// Qwen3-Embedding-0.6B shape with dummy weights: lengths around the 64-token tiles,
/// one token, and the full 512, in one padded chunk.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cuda_flash_embedding_matches_paged_kernel() {
    let shape = Qwen3Shape::named("qwen3-embedding-0.6b").unwrap();
    let opts = CudaOptions {
        max_tokens: 4096,
        max_seqs: 16,
        max_model_len: 512,
        graph_buckets: vec![],
    };
    let mut m =
        CudaQwen3::new(0, shape, Task::Embed, WeightSource::Dummy { seed: 3 }, opts).unwrap();
    let mut rng = Lcg(11);
    let lens = [1usize, 5, 63, 64, 65, 130, 512, 300, 17];
    let inputs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| rng.next(150_000)).collect())
        .collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    m.set_embed_flash(true);
    let flash = m.embed(&refs).unwrap();
    m.set_embed_flash(false);
    let paged = m.embed(&refs).unwrap();
    for ((f, p), n) in flash.iter().zip(&paged).zip(lens) {
        let c = cosine(f, p);
        eprintln!("length {n}: flash vs paged cosine {c:.6}");
        assert!(c >= 0.999, "length {n}: cosine {c}");
    }
}

// ---------------------------------------------------------------------------------------
// Benchmark (prints a table; speed is never asserted).

/// Memory-bandwidth limit of the gen workload as in shared/baselines/README.md: every
/// decode step reads all weights and the KV of every sequence (average context
/// prompt + gen/2) at 3.0 TB/s; prefill at 790 TFLOP/s.
fn gen_limit_tok_s(s: &Qwen3Shape, batch: usize, prompt: usize, gen: usize) -> f64 {
    let w = s.weight_bytes() as f64;
    let kv = (batch * (prompt + gen / 2) * s.kv_bytes_per_token()) as f64;
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
) -> (f64, f64) {
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
        let out = m.step(&steps).unwrap();
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
        last = m.step(&steps).unwrap();
    }
    (t0.elapsed().as_secs_f64(), prefill)
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

fn bench_gen(model: &str, batch: usize, rounds: usize) {
    let (prompt, gen) = (128usize, 128usize);
    let shape = Qwen3Shape::named(model).unwrap();
    let max_tokens = 8192;
    let opts = CudaOptions {
        max_tokens,
        max_seqs: batch.max(8),
        max_model_len: 512,
        ..Default::default()
    };
    let t = Instant::now();
    let mut m = CudaQwen3::new(
        0,
        shape.clone(),
        Task::Generate,
        WeightSource::Dummy { seed: 0 },
        opts,
    )
    .unwrap();
    let bs = 16;
    let per_seq = (prompt + gen).div_ceil(bs);
    m.init_kv_cache(batch * per_seq, bs).unwrap();
    m.capture_all().unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let mut rng = Lcg(42);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..prompt).map(|_| rng.next(150_000)).collect())
        .collect();
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    gen_round(&mut m, &prompts, &tables, gen, max_tokens); // warm-up
    let mut total = 0.0;
    let mut prefill = 0.0;
    for _ in 0..rounds {
        let (t, p) = gen_round(&mut m, &prompts, &tables, gen, max_tokens);
        total += t;
        prefill += p;
    }
    let tok_s = (rounds * batch * gen) as f64 / total;
    let decode_step_ms = (total - prefill) / (rounds * (gen - 1)) as f64 * 1e3;
    let limit = gen_limit_tok_s(&shape, batch, prompt, gen);
    println!(
        "RESULT gen {model} batch {batch}: {tok_s:.0} tok/s ({:.1}% of the {limit:.0} tok/s bandwidth limit); prefill {:.1} ms/round, decode step {decode_step_ms:.2} ms (graph); load+capture {load_s:.1} s",
        100.0 * tok_s / limit,
        prefill / rounds as f64 * 1e3
    );
    m.set_profiling(true);
    gen_round(&mut m, &prompts, &tables, gen, max_tokens);
    m.collect_profile();
    print_profile(&m, &format!("gen {model} batch {batch}, one round"));
}

fn bench_embed(model: &str, batch: usize, len: usize, secs: f64) {
    let shape = Qwen3Shape::named(model).unwrap();
    let opts = CudaOptions {
        max_tokens: batch * len,
        max_seqs: batch,
        max_model_len: len,
        graph_buckets: vec![],
    };
    let mut m =
        CudaQwen3::new(0, shape, Task::Embed, WeightSource::Dummy { seed: 0 }, opts).unwrap();
    let mut rng = Lcg(7);
    let inputs: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..len).map(|_| rng.next(150_000)).collect())
        .collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    m.embed(&refs).unwrap();
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < secs {
        m.embed(&refs).unwrap();
        n += batch;
    }
    let seq_s = n as f64 / t.elapsed().as_secs_f64();
    println!("RESULT embed {model} {len} tokens batch {batch}: {seq_s:.0} seq/s");
    m.set_profiling(true);
    m.embed(&refs).unwrap();
    print_profile(&m, &format!("embed {model} batch {batch}, one batch"));
}

/// `COLOCATE_CUDA_BENCH` selects parts: `gen17`, `gen8`, `embed` (comma-separated; all by default).
#[test]
#[ignore = "needs an NVIDIA GPU; a benchmark"]
fn cuda_bench() {
    let which =
        std::env::var("COLOCATE_CUDA_BENCH").unwrap_or_else(|_| "gen17,embed,gen8".to_string());
    for part in which.split(',') {
        match part {
            "gen17" => {
                bench_gen("qwen3-1.7b", 64, 3);
                bench_gen("qwen3-1.7b", 256, 2);
            }
            "gen8" => {
                bench_gen("qwen3-8b", 64, 2);
                bench_gen("qwen3-8b", 256, 1);
            }
            "embed" => bench_embed("qwen3-embedding-0.6b", 64, 512, 5.0),
            other => panic!("unknown bench part {other}"),
        }
    }
}
