//! Throughput of the CUDA model (`model::qwen3_cuda`) without HTTP or the scheduler, in
//! the shapes of the released models with dummy weights: gen (prefill 128 + 128 decode
//! steps, CUDA-graph decode), long (decode steps of 32 sequences at 2,048 and 8,192 tokens
//! of context) and embed (512-token inputs), each followed by a per-op time breakdown from
//! CUDA events. Prints `RESULT` lines; speed is never asserted. Run on the GPU machine by
//! `scripts/gpu/cuda-bench.sh`:
//!
//! `cargo run --release -p engine --example cuda_bench -- [PARTS]`
//! with PARTS a comma-separated subset of `attn,gemm,gen17,embed,gen8,long8,prefill8,moe` (`gen17,embed,gen8`
//! by default; the `COLOCATE_CUDA_BENCH` variable is read when no argument is given).
//! `attn` checks the decode attention kernels on their own against an f64 reference on
//! the host (random Q/K/V, scattered blocks, contexts from 1 to 4,100 keys, split and
//! unsplit work items): `ATTNCHECK` lines give ||out - ref|| / ||ref|| per kernel. `gemm`
//! does the same for every GEMM algorithm the tuner may pick (`GEMMCHECK` lines).
//!
//! First it measures the device's memory bandwidth (a 1 GiB device-to-device copy timed
//! with CUDA events, bytes read plus bytes written); the "% of the bandwidth limit" and
//! the decode-step floors divide by that figure.
//!
//! `CUDA_BENCH_DECODE` picks the decode attention kernel of the gen and long parts: `split`
//! (the engine's default, `decode_attention`), `pipelined` (`decode_attention_pipe`: the
//! same through a shared-memory ring), `paged` (the former one-block-per-token kernel),
//! `both` (paged and split) or `splits` (split and pipelined); `CUDA_BENCH_GEMM` their GEMMs: `tuned` (the
//! algorithm timed fastest at load for each decode shape; off in the engine by default,
//! so the benchmark sets `COLOCATE_GEMM_TUNE=1` for it), `cublas` (`cublasGemmEx`
//! everywhere, the engine's default) or `both`. Each workload runs with every combination on
//! the same loaded model, and the logits of one decode step are compared with the first
//! combination's (`CHECK` lines). After each load, `GEMMTUNE` and `GEMM` lines give what
//! the tuning measured per shape.
//! `prefill8` times Qwen3-8B prompts of 2,048 and 8,192 tokens, whole and in chunks, with
//! the flash prefill and with the 8-query tiles (`RESULT prefill` lines, a `CHECK` of their
//! logits).
//! `gen8-64` is the 8B batch-64 workload of `gen8` alone (for sweeps of
//! `COLOCATE_DECODE_MIN_CHUNK`). `moe` is the gen workload of the seeds' generator,
//! Qwen3-30B-A3B-FP8 (experts kept in FP8), at the batches of `CUDA_BENCH_MOE_BATCHES`
//! (`64,512` by default); its floor counts the experts a step routes to.
//! `CUDA_BENCH_MOE_TILES` (`auto` by default) lists grouped-GEMM tiles to run every MoE step
//! in, e.g. `auto,16x128x64s3w1,64x128x64s4w2` (`moe_kernels::MoeTile` names; `auto` is the
//! engine's pick by rows per expert), one more variant each. `CUDA_BENCH_PROFILE=0` skips
//! the gen workloads' per-op breakdowns. `CUDA_BENCH_PROMPTS=same` gives every sequence of
//! the gen workloads the same prompt, as the seeds' client does: they decode the same
//! tokens, so a mixture of experts routes the whole batch to the same `top_k` experts
//! (named `(one prompt)` in the results, its floor counting those experts only).

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaContext;
use engine::backend::cuda::buffer::{self, DevBuf};
use engine::backend::cuda::gemm::{self, Gemms, OutType};
use engine::backend::cuda::gemm_tune::LtProblem;
use engine::backend::cuda::kernels::{DecodeKernel, DecodePartials, Kernels};
use engine::backend::cuda::moe_kernels::{ExpertFormat, MoeTile};
use engine::backend::cuda::step::{pack, DecodeSplit, StepLayout};
use engine::backend::cuda::{CudaDevice, CudaOptions};
use engine::load::model_info;
use engine::model::config::{Fp8Kept, ModelConfig};
use engine::model::qwen3_cuda::CudaQwen3;
use engine::model::StepBuilder;
use engine::model_api::{Embedder, Generator, SampleSpec, SeqStep, Task};
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
    let info = model_info(
        &config,
        task,
        config.eos_token_ids.clone(),
        2,
        Fp8Kept::Experts,
    );
    let m = CudaQwen3::new(0, &config, info, &WeightSource::Dummy { seed: 0 }, opts)?;
    Ok((m, config))
}

/// Device-to-device copy bandwidth in bytes/s (read + written): the median of 10 copies
/// of 1 GiB between two buffers of random bytes, each timed with CUDA events.
fn measure_bandwidth() -> anyhow::Result<f64> {
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let bytes = 1usize << 30;
    let mut rng = Lcg(3);
    let chunk: Vec<u8> = (0..64usize << 20).map(|_| rng.next(256) as u8).collect();
    let mut src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    for i in 0..bytes / chunk.len() {
        let mut view = src.slice_mut(i * chunk.len()..(i + 1) * chunk.len());
        stream.memcpy_htod(&chunk, &mut view)?;
    }
    let mut ms = Vec::new();
    for i in 0..13 {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(&stream)?;
        stream.memcpy_dtod(&src, &mut dst)?;
        b.record(&stream)?;
        stream.synchronize()?;
        if i >= 3 {
            ms.push(a.elapsed_ms(&b)? as f64);
        }
    }
    ms.sort_by(f64::total_cmp);
    let med = ms[ms.len() / 2];
    let bw = 2.0 * bytes as f64 / (med * 1e-3);
    println!(
        "RESULT bandwidth: device-to-device copy of 1 GiB in {med:.3} ms (median of {}; {:.3}..{:.3}): {:.0} GB/s read + written",
        ms.len(),
        ms[0],
        ms[ms.len() - 1],
        bw / 1e9
    );
    Ok(bw)
}

/// Weight bytes a decode step reads, as the engine holds them (bf16; a mixture of experts'
/// FP8 experts in FP8): every parameter but the input embedding table (only the batch's
/// rows of it are gathered) unless it doubles as the LM head, and of the experts only those
/// the step routes to, taking the routing of `streams` distinct sequences as uniform (as
/// random weights give): `E (1 - (1 - k/E)^streams)` experts per sparse layer. A batch of
/// one prompt repeated (`CUDA_BENCH_PROMPTS=same`) is one stream: every sequence routes
/// alike.
fn weights_read(c: &ModelConfig, streams: usize) -> f64 {
    let embed = if c.tie_word_embeddings {
        0
    } else {
        c.vocab_size * c.hidden_size
    };
    let mut bytes = (c.resident_weight_bytes(2, Fp8Kept::Experts, true) - embed * 2) as f64;
    if let Some(m) = &c.moe {
        let per_expert =
            (3 * c.hidden_size * m.moe_intermediate_size * ExpertFormat::of(c).bytes_per_weight())
                as f64;
        let e = m.num_experts as f64;
        let touched = e * (1.0 - (1.0 - m.num_experts_per_tok as f64 / e).powi(streams as i32));
        let sparse = (0..c.num_hidden_layers)
            .filter(|&l| c.is_sparse_layer(l))
            .count() as f64;
        bytes -= sparse * (e - touched) * per_expert;
    }
    bytes
}

/// Floor of one decode step: the weights (`streams` distinct sequences routing, see
/// [`weights_read`]) and the K/V of `batch` sequences of `ctx` tokens read once at `bw`
/// bytes/s, in ms.
fn step_floor_ms(c: &ModelConfig, batch: usize, streams: usize, ctx: f64, bw: f64) -> f64 {
    let kv = batch as f64 * ctx * c.kv_bytes_per_token(2) as f64;
    (weights_read(c, streams) + kv) / bw * 1e3
}

/// Bandwidth limit of the gen workload: every decode step reads the weights and the KV of
/// every sequence (mean context prompt + gen/2) at the measured bandwidth; prefill at
/// 790 TFLOP/s over the parameters a token uses (a mixture of experts' active ones).
fn gen_limit_tok_s(
    c: &ModelConfig,
    batch: usize,
    streams: usize,
    prompt: usize,
    gen: usize,
    bw: f64,
) -> f64 {
    let step = step_floor_ms(c, batch, streams, (prompt + gen / 2) as f64, bw) * 1e-3;
    let params = c.active_parameters() as f64;
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

/// A decode attention kernel and a GEMM path to run the gen and long workloads with.
#[derive(Clone)]
struct Variant {
    label: String,
    kernel: DecodeKernel,
    /// GEMMs on the algorithms tuned at load (else `cublasGemmEx` everywhere).
    tuned: bool,
    /// A mixture of experts' grouped-GEMM tile for every step (`None`: the engine's pick).
    moe_tile: Option<MoeTile>,
}

/// `CUDA_BENCH_DECODE` (paged, split or both) times `CUDA_BENCH_GEMM` (cublas, tuned or
/// both), former first.
fn variants() -> anyhow::Result<Vec<Variant>> {
    let decode = std::env::var("CUDA_BENCH_DECODE").unwrap_or_else(|_| "split".to_string());
    let kernels: Vec<(&str, DecodeKernel)> = match decode.as_str() {
        "paged" => vec![("paged", DecodeKernel::Paged)],
        "split" => vec![("split", DecodeKernel::Split)],
        "pipelined" => vec![("pipelined", DecodeKernel::Pipelined)],
        "both" => vec![
            ("paged", DecodeKernel::Paged),
            ("split", DecodeKernel::Split),
        ],
        "splits" => vec![
            ("split", DecodeKernel::Split),
            ("pipelined", DecodeKernel::Pipelined),
        ],
        other => {
            anyhow::bail!("CUDA_BENCH_DECODE={other:?}: paged, split, pipelined, both or splits")
        }
    };
    let gemm = std::env::var("CUDA_BENCH_GEMM").unwrap_or_else(|_| "tuned".to_string());
    let gemms: Vec<(&str, bool)> = match gemm.as_str() {
        "cublas" => vec![("cublas", false)],
        "tuned" => vec![("tuned", true)],
        "both" => vec![("cublas", false), ("tuned", true)],
        other => anyhow::bail!("CUDA_BENCH_GEMM={other:?}: cublas, tuned or both"),
    };
    let tiles: Vec<Option<MoeTile>> = std::env::var("CUDA_BENCH_MOE_TILES")
        .unwrap_or_else(|_| "auto".to_string())
        .split(',')
        .map(|t| match t {
            "auto" => Ok(None),
            t => t.parse().map(Some),
        })
        .collect::<anyhow::Result<_>>()?;
    let mut out = Vec::new();
    for (kl, kernel) in &kernels {
        for (gl, tuned) in &gemms {
            for tile in &tiles {
                let tl = tile.map_or(String::new(), |t| format!(", moe {t}"));
                out.push(Variant {
                    label: format!("{kl}, {gl}{tl}"),
                    kernel: *kernel,
                    tuned: *tuned,
                    moe_tile: *tile,
                });
            }
        }
    }
    Ok(out)
}

/// The variants that apply to `config`: MoE tiles only to a mixture of experts.
fn variants_for(variants: &[Variant], config: &ModelConfig) -> Vec<Variant> {
    variants
        .iter()
        .filter(|v| config.moe.is_some() || v.moe_tile.is_none())
        .cloned()
        .collect()
}

/// Whether the gen workloads end each variant with a per-op breakdown (an eager round);
/// `CUDA_BENCH_PROFILE=0` skips it, for sweeps of many variants.
fn profile_wanted() -> bool {
    std::env::var("CUDA_BENCH_PROFILE").map_or(true, |v| v != "0")
}

/// Puts `m` on variant `v` (drops its captured graphs).
fn apply(m: &mut CudaQwen3, v: &Variant) -> anyhow::Result<()> {
    m.set_decode_kernel(v.kernel);
    m.set_gemm_tuned(v.tuned);
    if v.moe_tile.is_some() || m.is_moe() {
        m.set_moe_tile(v.moe_tile)?;
    }
    Ok(())
}

/// What GEMM tuning measured at load: one `GEMMTUNE` line per shape and decode size, and a
/// `GEMM` line for the workload's own batch size (µs per call, and the weight + input +
/// output bytes over that time as % of the measured bandwidth).
fn print_gemms(m: &CudaQwen3, name: &str, batch: usize, bw: f64) {
    let recs = m.gemm_report();
    let pct = |bytes: f64, us: f64| 100.0 * bytes / (us * 1e-6) / bw;
    for r in recs {
        println!(
            "GEMMTUNE {name} {} m {} n {} k {}: cublasGemmEx {:.1} us ({:.0}%), best of {} cuBLASLt candidates {} -> {}",
            r.op,
            r.m,
            r.n,
            r.k,
            r.blas_us,
            pct(r.bytes(), r.blas_us),
            r.candidates,
            match (r.lt_us, r.lt_best) {
                (Some(us), Some(info)) => format!("{us:.1} us ({:.0}%) [{info}]", pct(r.bytes(), us)),
                _ => "none".to_string(),
            },
            if r.use_lt { "cuBLASLt" } else { "cublasGemmEx" }
        );
    }
    let at: Vec<String> = recs
        .iter()
        .filter(|r| r.m == batch)
        .map(|r| {
            format!(
                "{} {:.1} -> {:.1} us ({:.0}% -> {:.0}%)",
                r.op,
                r.blas_us,
                r.chosen_us(),
                pct(r.bytes(), r.blas_us),
                pct(r.bytes(), r.chosen_us())
            )
        })
        .collect();
    let on_lt = recs.iter().filter(|r| r.use_lt).count();
    println!(
        "GEMM {name} m {batch}, cublasGemmEx -> tuned, % of the measured bandwidth: {}; tuned in {:.2} s, {on_lt} of {} shapes on cuBLASLt",
        if at.is_empty() { "not tuned".to_string() } else { at.join(", ") },
        m.gemm_tune_secs(),
        recs.len()
    );
}

/// One step that prefills prompts `range` whole, each in its own block table.
fn prompt_steps<'a>(
    prompts: &'a [Vec<u32>],
    tables: &'a [Vec<u32>],
    range: std::ops::Range<usize>,
) -> Vec<SeqStep<'a>> {
    range
        .map(|k| SeqStep {
            tokens: &prompts[k],
            start_pos: 0,
            block_table: &tables[k],
            sample: Some(GREEDY),
        })
        .collect()
}

/// Prefills every prompt (chunked to the step limit); returns each one's next token.
fn prefill(
    m: &mut CudaQwen3,
    prompts: &[Vec<u32>],
    tables: &[Vec<u32>],
    max_tokens: usize,
) -> anyhow::Result<Vec<u32>> {
    let mut last = vec![0u32; prompts.len()];
    let mut i = 0;
    while i < prompts.len() {
        let mut j = i;
        let mut toks = 0;
        while j < prompts.len() && toks + prompts[j].len() <= max_tokens {
            toks += prompts[j].len();
            j += 1;
        }
        let out = m.step(&prompt_steps(prompts, tables, i..j))?;
        last[i..j].copy_from_slice(&out);
        i = j;
    }
    Ok(last)
}

/// One decode step of every sequence at position `pos`.
fn decode_steps<'a>(toks: &'a [[u32; 1]], tables: &'a [Vec<u32>], pos: usize) -> Vec<SeqStep<'a>> {
    toks.iter()
        .zip(tables)
        .map(|(t, tb)| SeqStep {
            tokens: t,
            start_pos: pos,
            block_table: tb,
            sample: Some(GREEDY),
        })
        .collect()
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
    let mut last = prefill(m, prompts, tables, max_tokens)?;
    let prefill = t0.elapsed().as_secs_f64();
    let plen = prompts[0].len();
    for g in 1..gen {
        let toks: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
        last = m.step(&decode_steps(&toks, tables, plen + g - 1))?;
    }
    Ok((t0.elapsed().as_secs_f64(), prefill))
}

/// Prints the per-op breakdown; returns the decode attention's total ms (kernel + merge).
fn print_profile(m: &CudaQwen3, label: &str) -> f64 {
    let rep = m.profile_report();
    let total: f64 = rep.iter().map(|r| r.1).sum();
    println!("breakdown {label}: total GPU {total:.1} ms (eager, CUDA events per op)");
    let mut attn = 0.0;
    for (name, ms, calls) in rep {
        println!(
            "  {name:<24} {ms:>9.2} ms {:>5.1}%  {calls} calls",
            100.0 * ms / total.max(1e-9)
        );
        if name.starts_with("attention (decode") {
            attn += ms;
        }
    }
    attn
}

/// The decode attention's time per step and the bandwidth of its K/V reads.
fn print_attention(label: &str, ms: f64, steps: usize, kv_bytes: f64, bw: f64) {
    let per_step = ms / steps as f64;
    let rate = kv_bytes / (ms * 1e-3);
    println!(
        "ATTN {label}: decode attention {per_step:.3} ms/step (eager), K/V {:.2} GB/step read at {:.0} GB/s = {:.1}% of the measured bandwidth",
        kv_bytes / steps as f64 / 1e9,
        rate / 1e9,
        100.0 * rate / bw
    );
}

/// Compares the logits of two runs of one step, row by row.
fn compare_logits(label: &str, reference: &str, a: &[Vec<f32>], b: &[Vec<f32>]) {
    let (mut max_diff, mut range, mut min_cos, mut agree) = (0f32, 0f32, 1f64, 0usize);
    for (x, y) in a.iter().zip(b) {
        let (mut dot, mut nx, mut ny) = (0f64, 0f64, 0f64);
        let (mut ax, mut ay) = (0usize, 0usize);
        for (i, (&p, &q)) in x.iter().zip(y).enumerate() {
            max_diff = max_diff.max((p - q).abs());
            range = range.max(p.abs()).max(q.abs());
            dot += p as f64 * q as f64;
            nx += p as f64 * p as f64;
            ny += q as f64 * q as f64;
            if p > x[ax] {
                ax = i;
            }
            if q > y[ay] {
                ay = i;
            }
        }
        min_cos = min_cos.min(dot / (nx.sqrt() * ny.sqrt()).max(1e-30));
        agree += usize::from(ax == ay);
    }
    let ok = max_diff.is_finite() && min_cos > 0.999;
    println!(
        "CHECK {label}: vs {reference}, logits over {} rows: max |diff| {max_diff:.4} (largest |logit| {range:.3}), min cosine {min_cos:.6}, argmax agree {agree}/{}{}",
        a.len(),
        a.len(),
        if ok { "" } else { "  << MISMATCH" }
    );
}

/// The logits of one decode step at `pos` with each variant after the first, compared with
/// the first's (each run rewrites the same K/V at the same slots).
fn check_variants(
    m: &mut CudaQwen3,
    variants: &[Variant],
    toks: &[[u32; 1]],
    tables: &[Vec<u32>],
    pos: usize,
    label: &str,
) -> anyhow::Result<()> {
    let (first, rest) = variants.split_first().expect("at least one variant");
    apply(m, first)?;
    let reference = m.step_logits(&decode_steps(toks, tables, pos))?;
    for v in rest {
        apply(m, v)?;
        let got = m.step_logits(&decode_steps(toks, tables, pos))?;
        compare_logits(
            &format!("{label} [{}]", v.label),
            &first.label,
            &got,
            &reference,
        );
    }
    Ok(())
}

/// Random bf16 bits, uniform in [-a, a).
fn rand_bf16(rng: &mut Lcg, n: usize, a: f32) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let u = rng.next(1 << 24) as f32 / (1 << 24) as f32;
            half::bf16::from_f32(a * (2.0 * u - 1.0)).to_bits()
        })
        .collect()
}

/// The decode attention kernels on their own against an f64 reference: one decode token
/// per context length, blocks of 16 slots scattered over the cache, random Q, K and V.
/// Each kernel's output is poisoned (NaN) first, so an element it does not write fails.
fn attention_check() -> anyhow::Result<()> {
    let dev = CudaDevice::open(0)?;
    let ctxs = [1usize, 15, 16, 17, 33, 200, 1000, 4100];
    let (d, nkv, bs) = (128usize, 8usize, 16usize);
    for group in [4usize, 2] {
        let k = Kernels::compile(&dev, d, group)?;
        let (nq, t) = (nkv * group, ctxs.len());
        let width = (nq + 2 * nkv) * d;
        let mut rng = Lcg(77 + group as u64);
        // Blocks handed out in a scrambled order.
        let per: Vec<usize> = ctxs.iter().map(|c| c.div_ceil(bs)).collect();
        let total_blocks: usize = per.iter().sum();
        let mut order: Vec<u32> = (0..total_blocks as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.next(i + 1) as usize);
        }
        let mut next = 0;
        let tables: Vec<Vec<u32>> = per
            .iter()
            .map(|&n| {
                next += n;
                order[next - n..next].to_vec()
            })
            .collect();
        let slots = total_blocks * bs;
        let qkv = rand_bf16(&mut rng, t * width, 3.0);
        let kc = rand_bf16(&mut rng, slots * nkv * d, 1.0);
        let vc = rand_bf16(&mut rng, slots * nkv * d, 1.0);
        let f = |x: u16| half::bf16::from_bits(x).to_f64();
        // f64 reference.
        let scale = 1.0 / (d as f64).sqrt();
        let mut want = vec![0f64; t * nq * d];
        for (ti, &ctx) in ctxs.iter().enumerate() {
            for h in 0..nq {
                let kvh = h / group;
                let q = &qkv[ti * width + h * d..ti * width + (h + 1) * d];
                let slot = |j: usize| tables[ti][j / bs] as usize * bs + j % bs;
                let sc: Vec<f64> = (0..ctx)
                    .map(|j| {
                        let kr = &kc[(slot(j) * nkv + kvh) * d..][..d];
                        q.iter().zip(kr).map(|(&a, &b)| f(a) * f(b)).sum::<f64>() * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let p: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                let l: f64 = p.iter().sum();
                let o = &mut want[(ti * nq + h) * d..][..d];
                for (j, pj) in p.iter().enumerate() {
                    let vr = &vc[(slot(j) * nkv + kvh) * d..][..d];
                    for (x, &v) in o.iter_mut().zip(vr) {
                        *x += pj / l * f(v);
                    }
                }
            }
        }
        let qkv_d = DevBuf::upload(&dev, &qkv)?;
        let kc_d = DevBuf::upload(&dev, &kc)?;
        let vc_d = DevBuf::upload(&dev, &vc)?;
        let out = DevBuf::alloc(&dev, t * nq * d * 2)?;
        let poison = vec![0xffffu16; t * nq * d];
        let toks = vec![[1u32]; t];
        let seqs: Vec<SeqStep<'_>> = ctxs
            .iter()
            .enumerate()
            .map(|(i, &c)| SeqStep {
                tokens: &toks[i],
                start_pos: c - 1,
                block_table: &tables[i],
                sample: Some(GREEDY),
            })
            .collect();
        let opts = CudaOptions {
            max_tokens: 64,
            max_seqs: 16,
            max_model_len: 4224,
            ..Default::default()
        };
        let max_blocks = opts.max_model_len.div_ceil(bs);
        for (what, kernel, split) in [
            (
                "paged",
                DecodeKernel::Paged,
                DecodeSplit {
                    items: 64,
                    min_chunk: 16,
                },
            ),
            (
                "split, items of 16+ keys",
                DecodeKernel::Split,
                DecodeSplit {
                    items: 64,
                    min_chunk: 16,
                },
            ),
            (
                "split, one item per token",
                DecodeKernel::Split,
                DecodeSplit {
                    items: 1,
                    min_chunk: 8192,
                },
            ),
            (
                "split, 528 items (the H200's)",
                DecodeKernel::Split,
                DecodeSplit {
                    items: 528,
                    min_chunk: 64,
                },
            ),
            (
                "pipelined, items of 16+ keys",
                DecodeKernel::Pipelined,
                DecodeSplit {
                    items: 64,
                    min_chunk: 16,
                },
            ),
            (
                "pipelined, 528 items (the H200's)",
                DecodeKernel::Pipelined,
                DecodeSplit {
                    items: 528,
                    min_chunk: 64,
                },
            ),
        ] {
            let lay = StepLayout::new(opts.max_tokens, opts.max_seqs, max_blocks, split);
            let mut builder = StepBuilder::default();
            let meta = builder.paged(&seqs, &[], bs, total_blocks, 2)?;
            let mut m = Vec::new();
            let packed = pack(&mut m, &meta, 0, lay, &opts)?;
            let meta_d = DevBuf::upload(&dev, &m)?;
            let at = |off: usize| meta_d.ptr + (off * 4) as u64;
            let cap = lay.items_cap(t);
            let o_bytes = cap * nq * d * 4;
            let ml_bytes = cap * nq * 8;
            let parts_d = DevBuf::upload(
                &dev,
                &vec![0u8; o_bytes + ml_bytes + opts.max_seqs * nkv * 4],
            )?;
            let parts = DecodePartials {
                o: parts_d.ptr,
                ml: parts_d.ptr + o_bytes as u64,
                counters: parts_d.ptr + (o_bytes + ml_bytes) as u64,
            };
            // Twice: the second run also checks that the merge counters were reset.
            for run in 0..2 {
                // SAFETY: `out` holds t * nq * d bf16.
                unsafe {
                    cudarc::driver::result::memcpy_htod_async(
                        out.ptr,
                        &poison,
                        dev.stream.cu_stream(),
                    )
                }?;
                match kernel {
                    DecodeKernel::Paged => k.paged_attention(
                        qkv_d.ptr,
                        out.ptr,
                        kc_d.ptr,
                        vc_d.ptr,
                        at(lay.tables),
                        lay.max_blocks,
                        at(lay.seq_of),
                        at(lay.pos),
                        t,
                        bs,
                        nkv,
                    )?,
                    DecodeKernel::Split | DecodeKernel::Pipelined => k.decode_attention(
                        kernel == DecodeKernel::Pipelined,
                        qkv_d.ptr,
                        out.ptr,
                        kc_d.ptr,
                        vc_d.ptr,
                        at(lay.tables),
                        lay.max_blocks,
                        at(lay.seq_of),
                        at(lay.work),
                        at(lay.item_first),
                        at(lay.dec_rows),
                        parts,
                        t,
                        cap,
                        bs,
                        nkv,
                    )?,
                }
                let got: Vec<u16> = buffer::download(&dev, out.ptr, t * nq * d)?;
                let (mut num, mut den, mut max_err) = (0f64, 0f64, 0f64);
                for (&g, &w) in got.iter().zip(&want) {
                    let e = f(g) - w;
                    num += e * e;
                    den += w * w;
                    max_err = max_err.max(e.abs());
                }
                let rel = (num / den).sqrt();
                let ok = rel.is_finite() && rel < 4e-3;
                println!(
                    "ATTNCHECK d {d} group {group} kv heads {nkv}, contexts {ctxs:?}: {what} ({} work items), run {run}: ||out - ref|| / ||ref|| = {rel:.2e}, max |err| {max_err:.2e}{}",
                    packed.items,
                    if ok { "" } else { "  << FAIL" }
                );
            }
        }
    }
    Ok(())
}

/// Every GEMM algorithm the tuner may pick, on its own, against an f64 reference on the
/// host: Qwen3-8B's five GEMM shapes at M = 1, 16, 64 and 256 (the LM head at 1 and 64),
/// random bf16 inputs and weights, the output poisoned (NaN) before each run. Each
/// `GEMMCHECK` line gives, over `cublasGemmEx` and every cuBLASLt candidate,
/// the worst ||y - ref|| / ||ref|| on 256 sampled outputs and the outputs left unwritten
/// or not finite over the whole matrix.
fn gemm_check() -> anyhow::Result<()> {
    let dev = CudaDevice::open(0)?;
    let kernels = Kernels::compile(&dev, 128, 4)?;
    let ws = DevBuf::alloc(&dev, 32 << 20)?;
    let gemms = Gemms::new(&dev, ws.ptr, ws.bytes)?;
    let Some(lt) = gemms.lt() else {
        println!("GEMMCHECK: cuBLASLt did not load; only cublasGemmEx runs");
        return Ok(());
    };
    let c = ModelConfig::from_preset("qwen3-8b")?;
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let shapes = [
        ("qkv", q + 2 * kv, h, OutType::Bf16),
        ("o", h, q, OutType::Bf16),
        ("gate_up", 2 * c.intermediate_size, h, OutType::Bf16),
        ("down", h, c.intermediate_size, OutType::Bf16),
        ("lm_head", c.vocab_size, h, OutType::F32),
    ];
    let mut rng = Lcg(99);
    let stream = dev.stream.cu_stream();
    for (si, &(op, n, k, out)) in shapes.iter().enumerate() {
        let w = DevBuf::alloc(&dev, n * k * 2)?;
        kernels.fill_uniform(w.ptr, n * k, 1000 + si as u64, 0.05, 0.0)?;
        let ms: &[usize] = if op == "lm_head" {
            &[1, 64]
        } else {
            &[1, 16, 64, 256]
        };
        for &m in ms {
            let x = DevBuf::alloc(&dev, m * k * 2)?;
            kernels.fill_uniform(x.ptr, m * k, 2000 + (si * 1000 + m) as u64, 1.0, 0.0)?;
            let out_bytes = if out == OutType::F32 { 4 } else { 2 };
            let y = DevBuf::alloc(&dev, m * n * out_bytes)?;
            let xh: Vec<u16> = buffer::download(&dev, x.ptr, m * k)?;
            let f = |b: u16| half::bf16::from_bits(b).to_f64();
            // Sampled outputs and their f64 reference.
            let samples: Vec<(usize, usize, f64)> = (0..256)
                .map(|_| {
                    let (t, j) = (rng.next(m) as usize, rng.next(n) as usize);
                    let wr: Vec<u16> = buffer::download(&dev, w.ptr + (j * k * 2) as u64, k)?;
                    let r = (0..k).map(|i| f(xh[t * k + i]) * f(wr[i])).sum::<f64>();
                    Ok((t, j, r))
                })
                .collect::<anyhow::Result<_>>()?;
            let problem = LtProblem::new(lt, m, n, k, out)?;
            let cands = problem.candidates(lt, ws.bytes, 32)?;
            let (mut worst, mut worst_what, mut bad_total) = (0f64, String::new(), 0usize);
            for i in 0..=cands.len() {
                // SAFETY: y holds m * n * out_bytes bytes.
                unsafe { cudarc::driver::result::memset_d8_async(y.ptr, 0xff, y.bytes, stream) }?;
                let what = if i == 0 {
                    gemm::linear(&dev.blas, x.ptr, w.ptr, y.ptr, m, n, k, out)?;
                    "cublasGemmEx".to_string()
                } else {
                    let cand = &cands[i - 1];
                    problem.run(
                        lt,
                        &cand.algo,
                        x.ptr,
                        w.ptr,
                        y.ptr,
                        gemms.workspace(),
                        &dev.stream,
                    )?;
                    cand.info.to_string()
                };
                let got: Vec<f64> = if out == OutType::F32 {
                    buffer::download::<f32>(&dev, y.ptr, m * n)?
                        .into_iter()
                        .map(f64::from)
                        .collect()
                } else {
                    buffer::download::<u16>(&dev, y.ptr, m * n)?
                        .into_iter()
                        .map(f)
                        .collect()
                };
                let bad = got.iter().filter(|v| !v.is_finite()).count();
                let (mut num, mut den) = (0f64, 0f64);
                for &(t, j, r) in &samples {
                    let e = got[t * n + j] - r;
                    num += e * e;
                    den += r * r;
                }
                let rel = (num / den).sqrt();
                bad_total += bad;
                if worst.is_finite() && (rel.is_nan() || rel > worst) {
                    worst = rel;
                    worst_what = what;
                }
            }
            let limit = if out == OutType::F32 { 1e-4 } else { 8e-3 };
            let ok = bad_total == 0 && worst.is_finite() && worst < limit;
            println!(
                "GEMMCHECK {op} m {m} n {n} k {k}: cublasGemmEx + {} cuBLASLt candidates, worst ||y - ref|| / ||ref|| = {worst:.2e} ({worst_what}), {bad_total} outputs unwritten or not finite{}",
                cands.len(),
                if ok { "" } else { "  << FAIL" }
            );
        }
    }
    Ok(())
}

fn bench_gen(
    name: &str,
    batch: usize,
    rounds: usize,
    variants: &[Variant],
    bw: f64,
) -> anyhow::Result<()> {
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
    let load_s = t.elapsed().as_secs_f64();
    print_gemms(&m, name, batch, bw);
    let mut rng = Lcg(42);
    // `CUDA_BENCH_PROMPTS=same`: one prompt for every sequence, as the seeds' client sends
    // it, so every sequence decodes the same tokens and a mixture of experts routes them
    // all to the same experts (the served seeds workload); else each its own.
    let same = std::env::var("CUDA_BENCH_PROMPTS").is_ok_and(|v| v == "same");
    let first: Vec<u32> = (0..prompt).map(|_| rng.next(150_000)).collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            if same || i == 0 {
                first.clone()
            } else {
                (0..prompt).map(|_| rng.next(150_000)).collect()
            }
        })
        .collect();
    let streams = if same { 1 } else { batch };
    let name = &if same {
        format!("{name} (one prompt)")
    } else {
        name.to_string()
    };
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let variants = &variants_for(variants, &config);
    let limit = gen_limit_tok_s(&config, batch, streams, prompt, gen, bw);
    let floor = step_floor_ms(&config, batch, streams, (prompt + gen / 2) as f64, bw);
    // K/V bytes the decode attention reads in one round (contexts prompt + 1 .. prompt + gen - 1).
    let kv_round: f64 = (1..gen)
        .map(|g| (batch * (prompt + g) * config.kv_bytes_per_token(2)) as f64)
        .sum();
    for v in variants {
        apply(&mut m, v)?;
        let t = Instant::now();
        m.capture_all()?;
        let capture_s = t.elapsed().as_secs_f64();
        gen_round(&mut m, &prompts, &tables, gen, max_tokens)?; // warm-up
        let mut total = 0.0;
        let mut pre = 0.0;
        for _ in 0..rounds {
            let (t, p) = gen_round(&mut m, &prompts, &tables, gen, max_tokens)?;
            total += t;
            pre += p;
        }
        let tok_s = (rounds * batch * gen) as f64 / total;
        let step_ms = (total - pre) / (rounds * (gen - 1)) as f64 * 1e3;
        // A mixture of experts: the rows per expert a routed row saw in the last step,
        // by which the engine's own pick chose its tile.
        let seen = m
            .moe_rows_seen(batch)
            .map_or(String::new(), |r| format!(", {r:.1} rows per expert seen"));
        println!(
            "RESULT gen {name} batch {batch} [{}]: {tok_s:.0} tok/s ({:.1}% of the {limit:.0} tok/s bandwidth limit); prefill {:.1} ms/round, decode step {step_ms:.2} ms (graph{seen}) = {:.2}x the {floor:.2} ms floor (weights + KV over the measured bandwidth); load {load_s:.1} s (GEMM tuning {:.1} s), capture {capture_s:.1} s",
            v.label,
            100.0 * tok_s / limit,
            pre / rounds as f64 * 1e3,
            step_ms / floor,
            m.gemm_tune_secs()
        );
        if !profile_wanted() {
            continue;
        }
        m.set_profiling(true);
        gen_round(&mut m, &prompts, &tables, gen, max_tokens)?;
        m.collect_profile();
        let label = format!("gen {name} batch {batch} [{}]", v.label);
        let attn = print_profile(&m, &format!("{label}, one round"));
        print_attention(&label, attn, gen - 1, kv_round, bw);
        m.set_profiling(false);
    }
    if variants.len() > 1 {
        let last = prefill(&mut m, &prompts, &tables, max_tokens)?;
        let toks: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
        check_variants(
            &mut m,
            variants,
            &toks,
            &tables,
            prompt + gen / 2,
            &format!("gen {name} batch {batch}"),
        )?;
    }
    Ok(())
}

/// Decode at long contexts: `batch` sequences whose first `ctx` positions hold random K/V
/// (no prefill is run; the prompt-heavy prefill itself is not timed here), then `steps`
/// decode steps from position `ctx` on, through the decode graphs.
fn bench_long(
    name: &str,
    batch: usize,
    ctx: usize,
    steps: usize,
    variants: &[Variant],
    bw: f64,
) -> anyhow::Result<()> {
    let gen = 128usize;
    let bs = 16;
    let opts = CudaOptions {
        max_tokens: 2048,
        max_seqs: batch.max(8),
        max_model_len: ctx + gen,
        ..Default::default()
    };
    let t = Instant::now();
    let (mut m, config) = model(name, Task::Generate, opts)?;
    let per_seq = (ctx + gen).div_ceil(bs);
    m.init_kv_cache(batch * per_seq, bs)?;
    m.fill_kv_cache_uniform(11, 1.0)?;
    let load_s = t.elapsed().as_secs_f64();
    print_gemms(&m, name, batch, bw);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let mut rng = Lcg(5);
    let toks: Vec<[u32; 1]> = (0..batch).map(|_| [rng.next(150_000)]).collect();
    let variants = &variants_for(variants, &config);
    let floor = step_floor_ms(&config, batch, batch, (ctx + steps / 2) as f64, bw);
    let kv_step = |pos: usize| (batch * (pos + 1) * config.kv_bytes_per_token(2)) as f64;
    for v in variants {
        apply(&mut m, v)?;
        let t = Instant::now();
        m.capture_all()?;
        let capture_s = t.elapsed().as_secs_f64();
        for s in 0..3 {
            m.step(&decode_steps(&toks, &tables, ctx + s))?;
        }
        let t = Instant::now();
        for s in 0..steps {
            m.step(&decode_steps(&toks, &tables, ctx + s))?;
        }
        let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!(
            "RESULT long {name} batch {batch} context {ctx} [{}]: decode step {step_ms:.2} ms (graph), {:.0} tok/s = {:.2}x the {floor:.2} ms floor (weights + KV over the measured bandwidth); load+fill {load_s:.1} s, capture {capture_s:.1} s",
            v.label,
            batch as f64 * 1e3 / step_ms,
            step_ms / floor
        );
        let prof_steps = 4;
        m.set_profiling(true);
        for s in 0..prof_steps {
            m.step(&decode_steps(&toks, &tables, ctx + s))?;
            m.collect_profile();
        }
        let label = format!("long {name} batch {batch} context {ctx} [{}]", v.label);
        let attn = print_profile(&m, &format!("{label}, {prof_steps} decode steps"));
        let kv: f64 = (0..prof_steps).map(|s| kv_step(ctx + s)).sum();
        print_attention(&label, attn, prof_steps, kv, bw);
        m.set_profiling(false);
    }
    if variants.len() > 1 {
        check_variants(
            &mut m,
            variants,
            &toks,
            &tables,
            ctx + steps,
            &format!("long {name} batch {batch} context {ctx}"),
        )?;
    }
    Ok(())
}

/// Prompt-heavy prefill (issue 16's 2,048 + 128 and 8,192 + 128 points): fresh prompts
/// of `len` tokens, as many as fit one 8,192-token step, and the same prompts continued
/// in chunks of `chunk` tokens (each chunk's keys partly from earlier steps), timed with
/// the flash prefill (chunks of 16 tokens and more on tensor cores) and with the 8-query
/// tiles on the same loaded model; the last rows' logits of the two are compared.
fn bench_prefill(name: &str, len: usize, chunk: usize) -> anyhow::Result<()> {
    let max_tokens = 8192usize;
    let batch = (max_tokens / len).max(1);
    let bs = 16;
    let opts = CudaOptions {
        max_tokens,
        max_seqs: batch.max(8),
        max_model_len: len + 128,
        graph_buckets: vec![],
        ..Default::default()
    };
    let (mut m, config) = model(name, Task::Generate, opts)?;
    let per_seq = (len + 128).div_ceil(bs);
    m.init_kv_cache(batch * per_seq, bs)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    let mut rng = Lcg(13);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..len).map(|_| rng.next(150_000)).collect())
        .collect();
    // Causal attention FLOPs of the prompts (QK^T and PV) beside the weights'.
    let params = weights_read(&config, 1) / 2.0;
    let (d, heads, layers) = (
        config.head_dim as f64,
        config.num_attention_heads as f64,
        config.num_hidden_layers as f64,
    );
    let flops =
        batch as f64 * (2.0 * params * len as f64 + 2.0 * d * heads * layers * (len * len) as f64);
    let mut logits = Vec::new();
    for (label, flash) in [("flash", Some(16)), ("tiles", None)] {
        m.set_prefill_flash(flash);
        let whole = |m: &mut CudaQwen3| m.step_logits(&prompt_steps(&prompts, &tables, 0..batch));
        whole(&mut m)?;
        let t = Instant::now();
        let out = whole(&mut m)?;
        let whole_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        for c in (0..len).step_by(chunk) {
            let steps: Vec<SeqStep<'_>> = (0..batch)
                .map(|k| SeqStep {
                    tokens: &prompts[k][c..(c + chunk).min(len)],
                    start_pos: c,
                    block_table: &tables[k],
                    sample: Some(GREEDY),
                })
                .collect();
            m.step(&steps)?;
        }
        let chunked_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "RESULT prefill {name} {batch} x {len} tokens [{label}]: one step {whole_ms:.1} ms ({:.0} tok/s, {:.0} TFLOP/s with causal attention); in chunks of {chunk}: {chunked_ms:.1} ms",
            (batch * len) as f64 * 1e3 / whole_ms,
            flops / whole_ms / 1e9,
        );
        m.set_profiling(true);
        whole(&mut m)?;
        print_profile(
            &m,
            &format!("prefill {name} {batch} x {len} [{label}], one step"),
        );
        m.set_profiling(false);
        logits.push(out);
    }
    compare_logits(
        &format!("prefill {name} {batch} x {len}"),
        "flash",
        &logits[0],
        &logits[1],
    );
    Ok(())
}

fn bench_embed(name: &str, batch: usize, len: usize, secs: f64) -> anyhow::Result<()> {
    let opts = CudaOptions {
        max_tokens: batch * len,
        max_seqs: batch,
        max_model_len: len,
        graph_buckets: vec![],
        ..Default::default()
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
    let vs = variants()?;
    if vs.iter().any(|v| v.tuned) {
        // The engine tunes its decode GEMMs at load only when asked (off by default);
        // set before any model loads, while this process has one thread.
        std::env::set_var("COLOCATE_GEMM_TUNE", "1");
    }
    let bw = measure_bandwidth().unwrap_or_else(|e| {
        println!("RESULT bandwidth: not measured ({e:#}); using 4.3 TB/s (KINDS.md, H200)");
        4.3e12
    });
    for part in parts.split(',') {
        match part {
            "gen17" => {
                bench_gen("qwen3-1.7b", 64, 3, &vs, bw)?;
                bench_gen("qwen3-1.7b", 256, 2, &vs, bw)?;
            }
            "gen8" => {
                bench_gen("qwen3-8b", 64, 2, &vs, bw)?;
                bench_gen("qwen3-8b", 256, 1, &vs, bw)?;
            }
            "gen8-64" => bench_gen("qwen3-8b", 64, 2, &vs, bw)?,
            "moe" => {
                let batches = std::env::var("CUDA_BENCH_MOE_BATCHES")
                    .unwrap_or_else(|_| "64,512".to_string());
                for b in batches.split(',') {
                    let b: usize = b.parse().map_err(|_| {
                        anyhow::anyhow!("CUDA_BENCH_MOE_BATCHES: {b:?} is not a batch size")
                    })?;
                    bench_gen("qwen3-30b-a3b-fp8", b, if b <= 64 { 2 } else { 1 }, &vs, bw)?;
                }
            }
            "long8" => {
                bench_long("qwen3-8b", 32, 2048, 32, &vs, bw)?;
                bench_long("qwen3-8b", 32, 8192, 32, &vs, bw)?;
            }
            "prefill8" => {
                bench_prefill("qwen3-8b", 2048, 512)?;
                bench_prefill("qwen3-8b", 8192, 2048)?;
            }
            "embed" => bench_embed("qwen3-embedding-0.6b", 64, 512, 5.0)?,
            "attn" => attention_check()?,
            "gemm" => gemm_check()?,
            other => {
                anyhow::bail!(
                    "unknown bench part {other:?} (attn, gemm, gen17, embed, gen8, gen8-64, long8, prefill8, moe)"
                )
            }
        }
    }
    Ok(())
}
