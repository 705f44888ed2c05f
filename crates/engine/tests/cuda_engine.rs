//! The CUDA models (`model::qwen3_cuda`, `model::encoder_cuda`) against the references, on
//! the GPU.
//!
//! GPU tests are selected by the `gpu-tests` feature: without it (CI, no GPU) they are
//! ignored; with it they run, assert on the GPU, and fail with a "no GPU" message where
//! there is none. On the GPU machine (`scripts/gpu/prepare.sh` builds this binary with
//! the feature; `scripts/gpu/cuda-bench.sh` runs it):
//! - numerics: the CUDA Qwen3 against transformers' float32 reference for the tiny Qwen3
//!   fixture (logits with bf16 tolerances, greedy tokens, embedding cosine), through the
//!   prefill path, the eager decode path and the CUDA-graph decode path; against the CPU
//!   model through the serving loader; the shared sampling rule on GPU logits;
//! - the same for the tiny Llama (no q/k norm, Llama 3 RoPE scaling, tied embeddings),
//!   Qwen2 (no q/k norm, q/k/v biases) and GPT-2 (LayerNorm, learned positions, gelu_new,
//!   biases everywhere, Conv1D weights) fixtures of `testdata/` (made by
//!   `scripts/gpu/make-decoder-fixtures.py`), and their dummy weights (DistilGPT2's too);
//! - the encoders (`encoder_cuda`): the tiny BERT, RoBERTa and DistilBERT fixtures against
//!   transformers (every input in one batch), a random BERT against the CPU model on inputs
//!   of many lengths in one batch (and each alone), the real presets' shapes with dummy
//!   weights;
//! - the flash embedding kernel against the paged one at the real head size;
//! - the kernels' compilation for every preset shape (NVRTC only).
//!
//! The tests without the feature run on every machine and check what holds on every
//! machine: asking for CUDA opens the GPU or says clearly why not, for every family the
//! CUDA models run; what they do not run (an encoder asked to generate, an encoder given
//! to the decoder model) is refused by name before any device is opened. The benchmark is
//! the `cuda_bench` example.

mod common;

use common::argmax;
use std::path::{Path, PathBuf};

use engine::backend::cuda::kernels::compile_source;
use engine::backend::cuda::moe_kernels;
use engine::backend::cuda::CudaOptions;
use engine::backend::sampling::sample_row;
use engine::load::{self, Device, GpuLoadOptions, LoadFormat, LoadOptions, LoadedModel};
use engine::model::config::{Fp8Kept, ModelConfig};
use engine::model::encoder_cuda::CudaEncoder;
use engine::model::qwen3_cuda::CudaQwen3;
use engine::model_api::{Embedder, Generator, SampleSpec, SeqStep, Task};
use engine::weights::WeightSource;

const GREEDY: SampleSpec<'static> = SampleSpec {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
    uniform: 0.0,
    masked: &[],
};

/// The tiny fixtures with transformers references (testdata/NAME).
const QWEN3: &str = "qwen3-tiny";
const LLAMA: &str = "llama-tiny";
const QWEN2: &str = "qwen2-tiny";
const GPT2: &str = "gpt2-tiny";
/// The tiny encoders (references: each input's embedding computed alone).
const ENCODERS: [&str; 3] = ["bert-tiny", "roberta-tiny", "distilbert-tiny"];
/// Qwen3-MoE (8 experts, top 2, layer 1 dense) in f32, and the same model in block FP8
/// (32 x 32 blocks; its reference is transformers on the dequantised weights).
const MOE: &str = "qwen3-moe-tiny";
const MOE_FP8: &str = "qwen3-moe-tiny-fp8";

/// A tiny fixture (`qwen3-tiny`, `llama-tiny`, `qwen2-tiny`, `gpt2-tiny`, ...): the repo's copy (beside this
/// crate, or under the working directory: the GPU machine runs the prebuilt binary from a
/// copy of the repository), the shared one beside the checkout, or the one carried to the
/// GPU machine in `.gpu/`; `$QWEN3_TINY_DIR` names the Qwen3 one.
fn fixture_dir(name: &str) -> PathBuf {
    if name == QWEN3 {
        if let Ok(p) = std::env::var("QWEN3_TINY_DIR") {
            return PathBuf::from(p);
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let places = [
        format!("testdata/{name}"),
        format!("../shared/fixtures/{name}"),
        format!(".gpu/{name}"),
    ];
    for base in [root, PathBuf::from(".")] {
        for p in &places {
            let d = base.join(p);
            if d.join("model.safetensors").is_file() {
                return d;
            }
        }
    }
    panic!("{name} fixture not found (testdata/{name}, ../shared/fixtures/{name} or .gpu/{name})");
}

fn small_opts() -> CudaOptions {
    CudaOptions {
        max_tokens: 256,
        max_seqs: 8,
        max_model_len: 256,
        ..Default::default()
    }
}

/// The CUDA model on GPU 0; a selected GPU test on a machine without one stops here with
/// a message that says so.
fn cuda_model(
    config: &ModelConfig,
    task: Task,
    weights: &WeightSource,
    opts: CudaOptions,
) -> CudaQwen3 {
    let info = load::model_info(
        config,
        task,
        config.eos_token_ids.clone(),
        2,
        Fp8Kept::Experts,
    );
    CudaQwen3::new(0, config, info, weights, opts).unwrap_or_else(|e| {
        panic!("no GPU: this test needs an NVIDIA GPU (feature gpu-tests selects it): {e:#}")
    })
}

fn tiny_config(name: &str) -> ModelConfig {
    ModelConfig::from_file(&fixture_dir(name).join("config.json")).unwrap()
}

fn tiny_weights(name: &str) -> WeightSource {
    WeightSource::open_model(&fixture_dir(name), &tiny_config(name)).unwrap()
}

fn tiny_generator(name: &str) -> CudaQwen3 {
    let mut m = cuda_model(
        &tiny_config(name),
        Task::Generate,
        &tiny_weights(name),
        small_opts(),
    );
    // 20 blocks of 4 per reference prompt (gpt2-tiny has four prompts)
    m.init_kv_cache(128, 4).unwrap();
    m
}

// ---------------------------------------------------------------------------------------
// On every machine.

/// `--device cuda` through the serving loader: on a GPU machine the tiny model loads and
/// the device fixes the KV budget; elsewhere the error names the missing driver.
#[test]
fn asking_for_cuda_opens_the_gpu_or_says_why_not() {
    let opts = LoadOptions {
        model: "preset:qwen3-tiny".into(),
        task: None,
        load_format: LoadFormat::Dummy,
        device: Device::Cuda(0),
        seed: 1,
        tokenizer: None,
        gpu: GpuLoadOptions {
            memory_utilization: 0.05,
            max_model_len: Some(256),
            ..Default::default()
        },
    };
    match load::load(&opts) {
        Ok(l) => {
            let limits = l.device_limits.expect("a CUDA model fixes the KV budget");
            assert!(limits.kv_cache_bytes > 0);
            assert_eq!(limits.max_model_len, 256);
            assert!(matches!(l.model, LoadedModel::Generator(_)));
        }
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("no NVIDIA driver/GPU found") || msg.contains("not available"),
                "{msg}"
            );
            assert!(msg.contains("cuda:0"), "names the device: {msg}");
        }
    }
}

/// The Llama, Qwen2 and GPT-2 families and the encoders (BERT, RoBERTa, DistilBERT) run on
/// CUDA: through the serving loader (dummy weights of the tiny presets) they load on a GPU
/// machine, a generator with a KV budget, an encoder as an embedder, and elsewhere the
/// error is the missing driver's, not a refusal of the family.
#[test]
fn every_family_on_cuda_opens_the_gpu_or_says_why_not() {
    for preset in [
        "preset:llama-tiny",
        "preset:qwen2-tiny",
        "preset:gpt2-tiny",
        "preset:bert-tiny",
        "preset:roberta-tiny",
        "preset:distilbert-tiny",
    ] {
        let opts = LoadOptions {
            model: preset.into(),
            task: None,
            load_format: LoadFormat::Dummy,
            device: Device::Cuda(0),
            seed: 1,
            tokenizer: None,
            gpu: GpuLoadOptions {
                memory_utilization: 0.05,
                max_model_len: Some(256),
                ..Default::default()
            },
        };
        match load::load(&opts) {
            Ok(l) => {
                let kv = l.device_limits.expect("a CUDA model").kv_cache_bytes;
                match l.model {
                    LoadedModel::Generator(_) => assert!(kv > 0, "{preset}"),
                    LoadedModel::Embedder(_) => {
                        assert!(preset.contains("bert"), "{preset}: an embedder");
                        assert_eq!(kv, 0, "{preset}");
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(
                    !msg.contains("CPU only") && !msg.contains("does not run"),
                    "{preset} refused: {msg}"
                );
                assert!(
                    msg.contains("no NVIDIA driver/GPU found") || msg.contains("not available"),
                    "{preset}: {msg}"
                );
            }
        }
    }
}

/// What the CUDA models do not run is refused by name before any device is opened, so the
/// message is the same with and without a GPU: an encoder asked to generate (through the
/// loader, and by the encoder model itself), an encoder given to the decoder model and a
/// decoder to the encoder model (for callers that skip the loader), and an encoder whose
/// head size the tensor-core attention does not take.
#[test]
fn what_cuda_does_not_run_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 512,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 64}"#;
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let opts = LoadOptions {
        model: dir.path().display().to_string(),
        task: Some(Task::Generate),
        load_format: LoadFormat::Dummy,
        device: Device::Cuda(0),
        seed: 1,
        tokenizer: None,
        gpu: Default::default(),
    };
    let msg = format!("{:#}", load::load(&opts).err().expect("refused"));
    assert!(
        msg.to_lowercase()
            .contains("bert encoder cannot --task generate")
            && msg.contains("--task embed"),
        "{msg}"
    );
    let bert = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    let info = load::model_info(&bert, Task::Embed, vec![], 2, Fp8Kept::Experts);
    let err = CudaQwen3::new(
        0,
        &bert,
        info,
        &WeightSource::Dummy { seed: 0 },
        small_opts(),
    )
    .err()
    .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("the bert architecture is an encoder") && msg.contains("encoder_cuda"),
        "{msg}"
    );
    let encoder = |config: &ModelConfig, task| {
        let info = load::model_info(config, task, vec![], 2, Fp8Kept::Experts);
        let dummy = WeightSource::Dummy { seed: 0 };
        let err = CudaEncoder::new(0, config, info, &dummy, small_opts())
            .err()
            .expect("refused");
        format!("{err:#}")
    };
    let gpt2 = ModelConfig::from_preset("gpt2-tiny").unwrap();
    let msg = encoder(&gpt2, Task::Embed);
    assert!(
        msg.contains("the gpt2 architecture is a decoder") && msg.contains("qwen3_cuda"),
        "{msg}"
    );
    let tiny = ModelConfig::from_preset("bert-tiny").unwrap();
    let msg = encoder(&tiny, Task::Generate);
    assert!(msg.contains("a bert encoder cannot generate"), "{msg}");
    // 4 heads of 8: the tensor-core attention takes head sizes that are multiples of 16.
    let narrow = ModelConfig::from_json(
        &config.replace(r#""num_attention_heads": 2"#, r#""num_attention_heads": 4"#),
    )
    .unwrap();
    let msg = encoder(&narrow, Task::Embed);
    assert!(
        msg.contains("4 heads of 8")
            && msg.contains("multiple of 16")
            && msg.contains("--device cpu"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------
// On the GPU (feature gpu-tests).

struct Item {
    ids: Vec<u32>,
    last_logits: Vec<f32>,
    argmax: Vec<u32>,
    greedy: Vec<u32>,
    embedding: Vec<f32>,
}

/// A fixture's reference.json (`qwen3-tiny` spells its keys `argmax_per_position`,
/// `greedy_8` and `embedding_last_token`; the decoder fixtures `argmax`, `greedy` and
/// `embedding`).
fn reference(name: &str) -> Vec<Item> {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = |it: &serde_json::Value, a: &str, b: &str| -> serde_json::Value {
        it.get(a)
            .or_else(|| it.get(b))
            .unwrap_or_else(|| panic!("{name}: reference item without {a} or {b}"))
            .clone()
    };
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
            argmax: nums(&key(it, "argmax_per_position", "argmax"))
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            greedy: nums(&key(it, "greedy_8", "greedy"))
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            embedding: nums(&key(it, "embedding_last_token", "embedding"))
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

/// bf16 tolerance on logits: max abs error within `frac` of the logits' range (3%:
/// [`logits_tolerance`]), cosine >= 0.999.
fn assert_logits_within(got: &[f32], want: &[f32], what: &str, frac: f32) {
    assert_eq!(got.len(), want.len(), "{what}: vocab");
    let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let max_err = max_abs_diff(got, want);
    let cos = cosine(got, want);
    eprintln!("{what}: max |err| {max_err:.4} (range {range:.3}), cosine {cos:.6}");
    assert!(
        max_err <= frac * range + 0.02,
        "{what}: max |err| {max_err} over range {range}"
    );
    assert!(cos >= 0.999, "{what}: cosine {cos}");
}

/// The max-error fraction of [`assert_logits_within`] for `config`: 3%, or 5% for a
/// mixture of experts, where a router near-tie that bf16 orders differently from the f32
/// reference swaps one expert of one token in one layer (seen on the H200: 3.5% at one
/// step of the FP8 fixture, cosine 0.9992, the steps before and after at 1%).
fn logits_tolerance(config: &ModelConfig) -> f32 {
    if config.moe.is_some() {
        0.05
    } else {
        0.03
    }
}

/// The kernels compile for the shapes the presets use (NVRTC only, no GPU needed).
#[test]
#[cfg_attr(not(feature = "gpu-tests"), ignore = "needs NVRTC (feature gpu-tests)")]
fn cuda_kernels_compile_for_the_preset_shapes() {
    // SAFETY: only probes dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        panic!(
            "no NVRTC: the CUDA runtime compiler could not be loaded (searched: {})",
            cudarc::get_lib_name_candidates("nvrtc").join(", ")
        );
    }
    // (16, 1): the tiny GPT-2 and random BERT; (64, 1): GPT-2, DistilGPT2, BERT-base;
    // (32, 1): all-MiniLM-L6-v2.
    for (d, g) in [
        (128, 2),
        (128, 4),
        (128, 8),
        (16, 2),
        (16, 1),
        (32, 1),
        (64, 1),
        (80, 2),
        (96, 8),
    ] {
        let ptx = match compile_source("sm_90", d, g) {
            Ok(p) => p.to_src(),
            Err(e) => panic!("head_dim {d} group {g}: {e}"),
        };
        // The tensor-core attention exists exactly where the head size allows it.
        let flash = ptx.contains(".entry embed_flash_attention");
        assert_eq!(flash, d % 16 == 0, "head_dim {d}");
        assert_eq!(ptx.contains(".entry prefill_flash_attention"), flash);
        assert_eq!(ptx.contains("mma.sync.aligned.m16n8k16"), flash);
        // The norms, activations and pooling of every layout, at every shape.
        for name in [
            "embed_gather",
            "add_norm",
            "norm_rows_f32",
            "mean_rows_f32",
            "qk_norm_rope_kv",
            "silu_mul",
            "bias_gelu",
            "prefill_attention",
        ] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name}, head_dim {d} group {g}"
            );
        }
    }
    // The MoE kernels, every grouped-GEMM tile of them.
    let ptx = match moe_kernels::compile_source("sm_90") {
        Ok(p) => p.to_src(),
        Err(e) => panic!("moe.cu: {e}"),
    };
    for name in moe_kernels::gemm_kernel_names() {
        assert!(ptx.contains(&format!(".entry {name}(")), "{name}");
    }
    // For reading registers and spills with ptxas: COLOCATE_PTX_DIR=dir keeps the PTX.
    if let Ok(dir) = std::env::var("COLOCATE_PTX_DIR") {
        std::fs::write(format!("{dir}/moe.ptx"), &ptx).unwrap();
        for (d, g) in [(128, 8), (64, 1), (32, 1)] {
            let engine = compile_source("sm_90", d, g).unwrap().to_src();
            std::fs::write(format!("{dir}/engine_{d}_{g}.ptx"), engine).unwrap();
        }
    }
}

/// Prefill (one step for all three prompts of fixture `name` at once), then decode 7
/// tokens each, through the graph path and compared with transformers' greedy
/// continuation.
fn prefill_and_greedy_match_transformers(name: &str) {
    let items = reference(name);
    let mut m = tiny_generator(name);
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
    let tol = logits_tolerance(&tiny_config(name));
    for (i, (it, got)) in items.iter().zip(&logits).enumerate() {
        assert_logits_within(
            got,
            &it.last_logits,
            &format!("{name}: prompt {i} prefill logits"),
            tol,
        );
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
    for (i, ((it, s), prefill)) in items.iter().zip(&seqs).zip(&logits).enumerate() {
        let got = &s[it.ids.len()..];
        eprintln!(
            "{name}: prompt {i}: greedy {got:?} reference {:?}",
            it.greedy
        );
        if got == &it.greedy[..] {
            continue;
        }
        // The one exemption: a first token the reference itself prefers by less than the
        // bf16 error measured on these very logits can flip (each of the two top logits
        // off by up to that error; then the rest diverges too). Every other difference
        // fails.
        let (gap, err) = (
            top2_gap(&it.last_logits),
            max_abs_diff(prefill, &it.last_logits),
        );
        if got[0] != it.greedy[0] && gap <= 2.0 * err {
            eprintln!(
                "{name}: prompt {i}: first token within bf16 error of a tie (reference top-2 gap {gap:.4} <= 2 x logits error {err:.4}): not compared"
            );
            continue;
        }
        // A later token: the same rule on the shared prefix, the CPU model (f32, which
        // matches transformers: tests/numerics.rs and friends) standing in for the
        // reference's logits there, the GPU's from a prefill of the same prefix.
        let j = got
            .iter()
            .zip(&it.greedy)
            .take_while(|(a, b)| a == b)
            .count();
        let prefix = [&it.ids[..], &got[..j]].concat();
        if j > 0 && near_tie(name, &mut m, &prefix, &tables[i], it.greedy[j], got[j]) {
            continue;
        }
        mismatches += 1;
    }
    assert_eq!(
        mismatches, 0,
        "{name}: greedy continuations differ from transformers"
    );
}

/// Whether the GPU's token `got` after `prefix` may differ from the reference's `want`:
/// the CPU model (f32, which matches transformers: tests/numerics.rs and friends) on the
/// same prefix prefers `want` by no more than twice the error of the GPU's logits there
/// (from a prefill of the prefix into `table`), which bf16 may order either way.
fn near_tie(
    name: &str,
    m: &mut CudaQwen3,
    prefix: &[u32],
    table: &[u32],
    want: u32,
    got: u32,
) -> bool {
    let cpu = cpu_logits(name, prefix);
    let gpu = m
        .step_logits(&one(prefix, 0, table, GREEDY))
        .unwrap()
        .remove(0);
    let (gap, err) = (
        cpu[want as usize] - cpu[got as usize],
        max_abs_diff(&gpu, &cpu),
    );
    let tie = gap <= 2.0 * err;
    eprintln!(
        "{name}: after {} tokens: GPU {got}, reference {want}: CPU's gap {gap:.4} {} 2 x logits error {err:.4}{}",
        prefix.len(),
        if tie { "<=" } else { ">" },
        if tie { ": a near-tie, compared up to there" } else { "" }
    );
    tie
}

/// The CPU model's last-position logits for `ids` (fixture `name` through the loader).
fn cpu_logits(name: &str, ids: &[u32]) -> Vec<f32> {
    let opts = LoadOptions {
        model: fixture_dir(name).display().to_string(),
        task: None,
        load_format: LoadFormat::Auto,
        device: Device::Cpu,
        seed: 0,
        tokenizer: None,
        gpu: Default::default(),
    };
    let LoadedModel::Generator(mut g) = load::load(&opts).unwrap().model else {
        panic!("{name}: expected a generator");
    };
    g.init_kv_cache(32, 16).unwrap();
    let table: Vec<u32> = (0..32).collect();
    g.step_logits(&one(ids, 0, &table, GREEDY))
        .unwrap()
        .remove(0)
}

/// Top-1 minus top-2 of `logits`.
fn top2_gap(logits: &[f32]) -> f32 {
    let mut v = logits.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v[0] - v[1]
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Per-position argmax over the longest prompt of fixture `name` (prefill attention at
/// every causal length), checked by asking for logits after each prefix chunk: chunked
/// prefill must agree too, but where the reference's choice is a near-tie ([`near_tie`]).
fn chunked_prefill_argmax_matches(name: &str) {
    let items = reference(name);
    let mut m = tiny_generator(name);
    let it = &items[2];
    let table: Vec<u32> = (0..20).collect();
    let spare: Vec<u32> = (40..60).collect();
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
        // A near-tie's check prefills into other blocks: this run's K/V stay as written.
        if tok == it.argmax[end - 1]
            || near_tie(
                name,
                &mut m,
                &it.ids[..end],
                &spare,
                it.argmax[end - 1],
                tok,
            )
        {
            agree += 1;
        }
        pos = end;
    }
    let chunks = it.ids.len().div_ceil(5);
    eprintln!("{name}: chunked prefill argmax agreement {agree}/{chunks}");
    assert_eq!(agree, chunks, "{name}: chunked prefill argmax");
}

/// Fixture `name` as an embedder: every prompt in one batch, through both attention
/// kernels of the embedding path (tensor-core flash, the default, and the paged prefill
/// kernel), against transformers' last-token embedding.
fn embeddings_match_transformers(name: &str) {
    let items = reference(name);
    let mut m = cuda_model(
        &tiny_config(name),
        Task::Embed,
        &tiny_weights(name),
        small_opts(),
    );
    let inputs: Vec<&[u32]> = items.iter().map(|it| it.ids.as_slice()).collect();
    for flash in [true, false] {
        m.set_embed_flash(flash);
        let got = m.embed(&inputs).unwrap();
        for (i, (g, it)) in got.iter().zip(&items).enumerate() {
            let c = cosine(g, &it.embedding);
            eprintln!("{name}: embedding {i} (flash {flash}): cosine {c:.6}");
            assert!(
                c >= 0.999,
                "{name}: embedding {i} (flash {flash}): cosine {c}"
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_qwen3_matches_transformers() {
    prefill_and_greedy_match_transformers(QWEN3);
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_chunked_prefill_argmax_per_position() {
    chunked_prefill_argmax_matches(QWEN3);
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_embedding_matches_transformers() {
    embeddings_match_transformers(QWEN3);
}

/// The tiny Llama (no q/k norm, Llama 3 RoPE scaling, tied embeddings) against
/// transformers: prefill logits, greedy tokens through the decode graphs, chunked-prefill
/// argmax, embeddings.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_llama_matches_transformers() {
    prefill_and_greedy_match_transformers(LLAMA);
    chunked_prefill_argmax_matches(LLAMA);
    embeddings_match_transformers(LLAMA);
}

/// The tiny Qwen2 (no q/k norm, q/k/v biases) against transformers, as the Llama.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_qwen2_matches_transformers() {
    prefill_and_greedy_match_transformers(QWEN2);
    chunked_prefill_argmax_matches(QWEN2);
    embeddings_match_transformers(QWEN2);
}

/// The tiny GPT-2 (LayerNorm with biases, learned positions, gelu_new, biases on every
/// projection, Conv1D weights read transposed, tied `lm_head`; head size 16, no GQA)
/// against transformers, as the Llama.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_gpt2_matches_transformers() {
    prefill_and_greedy_match_transformers(GPT2);
    chunked_prefill_argmax_matches(GPT2);
    embeddings_match_transformers(GPT2);
}

/// Seeded dummy weights (`--load-format dummy`) of every family the CUDA model runs, with
/// the weights its layout has (q/k norm or not, q/k/v biases, a Llama with
/// `attention_bias`, whose o bias no fixture has, GPT-2's LayerNorms, position table and
/// GELU MLP with biases at the tiny and the real DistilGPT2 shapes): finite logits, the
/// same seed gives the same logits, another seed others.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_dummy_weights_run_for_every_cuda_family() {
    let mut biased = ModelConfig::from_preset("llama-tiny").unwrap();
    biased.attention_bias = true;
    let configs = [
        (
            "qwen3-tiny",
            ModelConfig::from_preset("qwen3-tiny").unwrap(),
        ),
        (
            "llama-tiny",
            ModelConfig::from_preset("llama-tiny").unwrap(),
        ),
        (
            "qwen2-tiny",
            ModelConfig::from_preset("qwen2-tiny").unwrap(),
        ),
        ("llama-tiny with attention_bias", biased),
        ("gpt2-tiny", ModelConfig::from_preset("gpt2-tiny").unwrap()),
        // Head size 64, 12 heads, vocabulary 50,257 (an odd logits row).
        (
            "distilgpt2",
            ModelConfig::from_preset("distilgpt2").unwrap(),
        ),
        (
            "qwen3-moe-tiny",
            ModelConfig::from_preset("qwen3-moe-tiny").unwrap(),
        ),
        ("qwen3-moe-tiny in FP8", tiny_config(MOE_FP8)),
    ];
    for (name, config) in configs {
        let logits = |seed: u64| {
            let mut m = cuda_model(
                &config,
                Task::Generate,
                &WeightSource::Dummy { seed },
                small_opts(),
            );
            m.init_kv_cache(8, 16).unwrap();
            m.step_logits(&one(&[1, 2, 3], 0, &[5], GREEDY))
                .unwrap()
                .remove(0)
        };
        let a = logits(1);
        assert_eq!(a.len(), config.vocab_size, "{name}");
        assert!(a.iter().all(|x| x.is_finite()), "{name}: finite");
        assert_eq!(a, logits(1), "{name}: seeded");
        assert!(cosine(&a, &logits(2)) < 0.99, "{name}: the seed matters");
    }
}

/// The flash kernel at the real head size (128) against the paged kernel, on the
/// Qwen3-Embedding-0.6B shape with dummy weights: lengths around the 64-token tiles,
/// one token, and the full 512, in one padded chunk.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_flash_embedding_matches_paged_kernel() {
    let config = ModelConfig::from_preset("qwen3-embedding-0.6b").unwrap();
    let opts = CudaOptions {
        max_tokens: 4096,
        max_seqs: 16,
        max_model_len: 512,
        graph_buckets: vec![],
        ..Default::default()
    };
    let mut m = cuda_model(&config, Task::Embed, &WeightSource::Dummy { seed: 3 }, opts);
    let mut state = 11u64;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n) as u32
    };
    let lens = [1usize, 5, 63, 64, 65, 130, 512, 300, 17];
    let inputs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| next(150_000)).collect())
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

/// The generators' flash prefill (prompt chunks on tensor cores, K/V from the paged cache)
/// against the 8-query tiles, at the real head size (128) and GQA 2 and 4 (Qwen3-0.6B and
/// 8B shapes, dummy weights): fresh prompts of lengths around the 64-query tiles in one
/// step; a prompt continued in a second chunk (keys from an earlier step); and a step
/// mixing two decode tokens (the split decode kernel; contexts of 101 and 401 keys, cut
/// into several work items) with a fresh chunk (flash), against the same on the tiles.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_flash_prefill_matches_the_tiled_kernel() {
    let opts = eager_opts();
    let mut next = token_gen(7);
    let prompt = |next: &mut dyn FnMut(u64) -> u32, n: usize| -> Vec<u32> {
        (0..n).map(|_| next(150_000)).collect()
    };
    let lens = [1usize, 17, 63, 64, 65, 130, 300];
    let fresh: Vec<Vec<u32>> = lens.iter().map(|&n| prompt(&mut next, n)).collect();
    let long = prompt(&mut next, 400);
    let (x, y) = (prompt(&mut next, 101), prompt(&mut next, 200));
    let z = prompt(&mut next, 1);
    // 64 blocks of 16 tokens per sequence slot.
    let table = |slot: usize| -> Vec<u32> { (0..64).map(|b| (slot * 64 + b) as u32).collect() };
    let tables: Vec<Vec<u32>> = (0..8).map(table).collect();
    for preset in ["qwen3-0.6b", "qwen3-8b"] {
        let config = ModelConfig::from_preset(preset).unwrap();
        let mut m = cuda_model(
            &config,
            Task::Generate,
            &WeightSource::Dummy { seed: 5 },
            opts.clone(),
        );
        m.init_kv_cache(8 * 64, 16).unwrap();
        // flash: long chunks on the flash kernel and one-token sequences of steps with
        // prompts on the split decode kernel; else everything on the 8-query tiles.
        let run = |m: &mut CudaQwen3, flash: bool| -> Vec<Vec<f32>> {
            m.set_prefill_flash(flash.then_some(16));
            m.set_mixed_decode(flash);
            let mut out = Vec::new();
            // Fresh prompts, one step.
            let step: Vec<SeqStep<'_>> = fresh
                .iter()
                .enumerate()
                .map(|(i, p)| SeqStep {
                    tokens: p,
                    start_pos: 0,
                    block_table: &tables[i],
                    sample: Some(GREEDY),
                })
                .collect();
            out.extend(m.step_logits(&step).unwrap());
            // A prompt in two chunks: 150 tokens, then 250 that attend to them.
            m.step_logits(&one(&long[..150], 0, &tables[7], GREEDY))
                .unwrap();
            out.extend(
                m.step_logits(&one(&long[150..], 150, &tables[7], GREEDY))
                    .unwrap(),
            );
            // x's last token and the long prompt's next decoded beside y's fresh
            // 200-token chunk.
            m.step_logits(&one(&x[..100], 0, &tables[0], GREEDY))
                .unwrap();
            let mixed = [
                SeqStep {
                    tokens: &x[100..],
                    start_pos: 100,
                    block_table: &tables[0],
                    sample: Some(GREEDY),
                },
                SeqStep {
                    tokens: &z,
                    start_pos: 400,
                    block_table: &tables[7],
                    sample: Some(GREEDY),
                },
                SeqStep {
                    tokens: &y,
                    start_pos: 0,
                    block_table: &tables[1],
                    sample: Some(GREEDY),
                },
            ];
            out.extend(m.step_logits(&mixed).unwrap());
            out
        };
        let flash = run(&mut m, true);
        let tiled = run(&mut m, false);
        let what = lens
            .iter()
            .map(|n| format!("fresh {n}"))
            .chain(["second chunk of 250 at 150".into()])
            .chain([
                "decode at 100 beside a chunk".into(),
                "decode at 400 beside a chunk".into(),
                "chunk of 200 beside two decodes".into(),
            ]);
        assert_eq!(flash.len(), lens.len() + 4, "{preset}");
        for ((f, t), what) in flash.iter().zip(&tiled).zip(what) {
            let c = cosine(f, t);
            eprintln!("{preset}, {what}: flash vs tiles cosine {c:.6}");
            assert!(f.iter().all(|v| v.is_finite()), "{preset}, {what}: finite");
            assert!(c >= 0.999, "{preset}, {what}: cosine {c}");
        }
    }
}

/// The split decode attention through a shared-memory ring (`decode_attention_pipe`,
/// `DecodeKernel::Pipelined`) gives the logits of the register one (`Split`: the same work
/// items and arithmetic) and agrees with `paged_attention`, at GQA 2, 4 and 8 (Qwen3-0.6B's
/// and 8B's shapes, and 8B's with the 30B-A3B's 4 KV heads; 4 layers, dummy weights):
/// eight sequences of contexts from 1 to 1,000 keys decode one token in one step, the long
/// ones cut into several work items (the merge), eagerly and through a CUDA graph.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_pipelined_decode_attention_matches_the_register_kernel() {
    use engine::backend::cuda::kernels::DecodeKernel;
    let mut next = token_gen(13);
    let lens = [1usize, 15, 16, 17, 130, 300, 640, 1000];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n + 1).map(|_| next(150_000)).collect())
        .collect();
    let table = |slot: usize| -> Vec<u32> { (0..64).map(|b| (slot * 64 + b) as u32).collect() };
    let tables: Vec<Vec<u32>> = (0..8).map(table).collect();
    let four_layers = |preset: &str, kv_heads: usize| {
        let mut c = ModelConfig::from_preset(preset).unwrap();
        c.num_hidden_layers = 4;
        c.num_key_value_heads = kv_heads;
        c
    };
    for (what, config) in [
        ("qwen3-0.6b (GQA 2)", four_layers("qwen3-0.6b", 8)),
        ("qwen3-8b (GQA 4)", four_layers("qwen3-8b", 8)),
        (
            "qwen3-8b with 4 KV heads (GQA 8)",
            four_layers("qwen3-8b", 4),
        ),
    ] {
        for graphs in [false, true] {
            // The prompts, 2,119 tokens, prefill in one step.
            let opts = CudaOptions {
                max_tokens: 2304,
                graph_buckets: if graphs { vec![8] } else { vec![] },
                ..eager_opts()
            };
            let mut m = cuda_model(
                &config,
                Task::Generate,
                &WeightSource::Dummy { seed: 3 },
                opts,
            );
            m.init_kv_cache(8 * 64, 16).unwrap();
            let prefill: Vec<SeqStep<'_>> = prompts
                .iter()
                .zip(&tables)
                .map(|(p, t)| SeqStep {
                    tokens: &p[..p.len() - 1],
                    start_pos: 0,
                    block_table: t,
                    sample: Some(GREEDY),
                })
                .collect();
            m.step_logits(&prefill).unwrap();
            let decode: Vec<SeqStep<'_>> = prompts
                .iter()
                .zip(&tables)
                .map(|(p, t)| SeqStep {
                    tokens: &p[p.len() - 1..],
                    start_pos: p.len() - 1,
                    block_table: t,
                    sample: Some(GREEDY),
                })
                .collect();
            let mut run = |kernel| {
                m.set_decode_kernel(kernel);
                assert_eq!(m.decode_kernel(), kernel);
                m.step_logits(&decode).unwrap()
            };
            let split = run(DecodeKernel::Split);
            let piped = run(DecodeKernel::Pipelined);
            let paged = run(DecodeKernel::Paged);
            for (i, n) in lens.iter().enumerate() {
                let (s, p, r) = (&split[i], &piped[i], &paged[i]);
                assert!(p.iter().all(|v| v.is_finite()), "{what}, context {n}");
                let diff = s
                    .iter()
                    .zip(p)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let (c, cr) = (cosine(s, p), cosine(p, r));
                eprintln!(
                    "{what}, graphs {graphs}, context {n}: pipelined vs split max |diff| {diff:.2e} cosine {c:.6}, vs paged cosine {cr:.6}"
                );
                assert!(c >= 0.99999, "{what}, context {n}: cosine {c}");
                assert_eq!(argmax(s), argmax(p), "{what}, context {n}");
                assert!(cr >= 0.999, "{what}, context {n}: against paged {cr}");
            }
        }
    }
}

/// Prefix caching on the device: a sequence whose table starts with another sequence's
/// blocks (its prompt's first 288 tokens, as `kv::BlockManager::match_prefix` hands them
/// out) and computes only the rest gives the logits of the same prompt computed whole in
/// blocks of its own, alone and in one step beside the first sequence's decode (which
/// writes to its own last block, past the shared ones).
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_shared_prefix_blocks_give_the_whole_prompts_logits() {
    let opts = eager_opts();
    let mut ids = token_gen(11);
    let mut next = || ids(150_000);
    let first: Vec<u32> = (0..300).map(|_| next()).collect();
    // The second prompt: the first's 288 leading tokens (18 blocks of 16), then its own 60.
    let second: Vec<u32> = first[..288]
        .iter()
        .copied()
        .chain((0..60).map(|_| next()))
        .collect();
    let config = ModelConfig::from_preset("qwen3-0.6b").unwrap();
    let mut m = cuda_model(
        &config,
        Task::Generate,
        &WeightSource::Dummy { seed: 9 },
        opts,
    );
    m.init_kv_cache(4 * 64, 16).unwrap();
    let own = |slot: u32| -> Vec<u32> { (0..64).map(|b| slot * 64 + b).collect() };
    let (t_first, t_whole) = (own(0), own(1));
    // The second sequence's table: the first's 18 blocks, then blocks of slot 2.
    let t_shared: Vec<u32> = t_first[..18]
        .iter()
        .copied()
        .chain(own(2))
        .take(64)
        .collect();
    // Reference: the second prompt whole, in blocks of its own.
    let whole = m
        .step_logits(&one(&second, 0, &t_whole, GREEDY))
        .unwrap()
        .remove(0);
    // The first prompt fills its blocks; the second computes only its last 60 tokens.
    m.step_logits(&one(&first, 0, &t_first, GREEDY)).unwrap();
    let cached = m
        .step_logits(&one(&second[288..], 288, &t_shared, GREEDY))
        .unwrap()
        .remove(0);
    let c = cosine(&whole, &cached);
    eprintln!("shared prefix alone: cosine {c:.6}");
    assert!(c >= 0.9995, "shared prefix alone: cosine {c}");
    // Again in one step beside the first sequence's next token (position 300, block 18 of
    // its own table: not shared).
    let extra = [next()];
    let both = [
        SeqStep {
            tokens: &extra,
            start_pos: 300,
            block_table: &t_first,
            sample: Some(GREEDY),
        },
        SeqStep {
            tokens: &second[288..],
            start_pos: 288,
            block_table: &t_shared,
            sample: Some(GREEDY),
        },
    ];
    let out = m.step_logits(&both).unwrap();
    let c = cosine(&whole, &out[1]);
    eprintln!("shared prefix beside a decode: cosine {c:.6}");
    assert!(c >= 0.9995, "shared prefix beside a decode: cosine {c}");
    assert!(out[0].iter().all(|v| v.is_finite()));
}

/// The CUDA encoder for `config` on GPU 0 (see [`cuda_model`]).
fn cuda_encoder(config: &ModelConfig, weights: &WeightSource, opts: CudaOptions) -> CudaEncoder {
    let info = load::model_info(config, Task::Embed, vec![], 2, Fp8Kept::None);
    CudaEncoder::new(0, config, info, weights, opts).unwrap_or_else(|e| {
        panic!("no GPU: this test needs an NVIDIA GPU (feature gpu-tests selects it): {e:#}")
    })
}

/// Each of `inputs` embedded alone by `m`: the same as in `batch` (padding and the other
/// sequences of a batch do not leak into a sequence), within bf16 GEMM reordering.
fn alone_as_in_the_batch(what: &str, m: &mut dyn Embedder, inputs: &[&[u32]], batch: &[Vec<f32>]) {
    for (i, (inp, b)) in inputs.iter().zip(batch).enumerate() {
        let alone = m.embed(&[inp]).unwrap().remove(0);
        let c = cosine(&alone, b);
        assert!(
            c >= 0.9999,
            "{what}: input {i} ({} tokens) alone vs in the batch: cosine {c}",
            inp.len()
        );
    }
}

/// The tiny BERT, RoBERTa (positions from pad_token_id + 1, one token type) and DistilBERT
/// (its own names, no token types) fixtures on the CUDA encoder: every input in one batch
/// (lengths 5, 17, 33 and 1: the bidirectional flash kernel, one tile and a partial one),
/// each against transformers' embedding of that input alone (mean pooling, L2
/// normalisation), and each embedded alone as in the batch.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_encoders_match_transformers() {
    for name in ENCODERS {
        let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let nums = |x: &serde_json::Value| -> Vec<f64> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_f64().unwrap())
                .collect()
        };
        let items = v["items"].as_array().unwrap();
        let inputs: Vec<Vec<u32>> = items
            .iter()
            .map(|it| {
                nums(&it["input_ids"])
                    .into_iter()
                    .map(|x| x as u32)
                    .collect()
            })
            .collect();
        let wants: Vec<Vec<f32>> = items
            .iter()
            .map(|it| {
                nums(&it["embedding"])
                    .into_iter()
                    .map(|x| x as f32)
                    .collect()
            })
            .collect();
        let mut m = cuda_encoder(&tiny_config(name), &tiny_weights(name), small_opts());
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        let got = m.embed(&refs).unwrap();
        assert_eq!(got.len(), wants.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&wants).enumerate() {
            let c = cosine(g, w);
            let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            eprintln!(
                "{name}: input {i} ({} tokens): cosine {c:.6}",
                inputs[i].len()
            );
            assert!(c >= 0.999, "{name}: input {i}: cosine {c}");
            assert!((norm - 1.0).abs() < 1e-3, "{name}: input {i}: norm {norm}");
        }
        alone_as_in_the_batch(name, &mut m, &refs, &got);
    }
}

/// Writes a random BERT checkpoint (hidden 128 in 4 heads of 32, all-MiniLM-L6-v2's head
/// size; 2 layers; 256 positions) to `dir`, its tensors under the task model's `bert.`
/// prefix, in f32, with weights large enough that attention and every input matter.
fn write_random_bert(dir: &Path) {
    use safetensors::tensor::Dtype;
    let (h, inter, vocab, positions, types) = (128, 256, 512, 256, 2);
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": h,
        "intermediate_size": inter, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": vocab, "max_position_embeddings": positions, "type_vocab_size": types,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 5u64;
    let mut tensors: Vec<RawTensor> = Vec::new();
    let mut put = |name: &str, shape: Vec<usize>, amp: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| (offset + amp * (2.0 * next_uniform(&mut state) - 1.0)).to_le_bytes())
            .collect();
        tensors.push((format!("bert.{name}"), Dtype::F32, shape, bytes));
    };
    put(
        "embeddings.word_embeddings.weight",
        vec![vocab, h],
        0.5,
        0.0,
    );
    put(
        "embeddings.position_embeddings.weight",
        vec![positions, h],
        0.2,
        0.0,
    );
    put(
        "embeddings.token_type_embeddings.weight",
        vec![types, h],
        0.2,
        0.0,
    );
    let mut norms = vec!["embeddings.LayerNorm".to_string()];
    for l in 0..2 {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp, amp) in [
            ("attention.self.query", h, h, 0.15),
            ("attention.self.key", h, h, 0.15),
            ("attention.self.value", h, h, 0.15),
            ("attention.output.dense", h, h, 0.15),
            ("intermediate.dense", inter, h, 0.15),
            ("output.dense", h, inter, 0.1),
        ] {
            put(&format!("{p}.{name}.weight"), vec![out, inp], amp, 0.0);
            put(&format!("{p}.{name}.bias"), vec![out], 0.1, 0.0);
        }
        norms.push(format!("{p}.attention.output.LayerNorm"));
        norms.push(format!("{p}.output.LayerNorm"));
    }
    for name in norms {
        put(&format!("{name}.weight"), vec![h], 0.1, 1.0);
        put(&format!("{name}.bias"), vec![h], 0.05, 0.0);
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors);
}

/// A random BERT on both devices through the serving loader: inputs of 1 to 200 tokens (on
/// both sides of the flash kernel's 64-row tiles) in one batch, each CUDA embedding the
/// CPU's within bf16 tolerance (whole, and less the inputs' mean), and each embedded alone
/// as in the batch; different inputs give different embeddings (the weights make the test
/// tell them apart).
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_and_cpu_encoders_agree_on_a_random_bert() {
    let tmp = tempfile::tempdir().unwrap();
    write_random_bert(tmp.path());
    let on = |device| LoadOptions {
        model: tmp.path().display().to_string(),
        task: None,
        load_format: LoadFormat::Auto,
        device,
        seed: 0,
        tokenizer: None,
        gpu: GpuLoadOptions {
            max_model_len: Some(256),
            ..Default::default()
        },
    };
    let embedder = |device| match load::load(&on(device)) {
        Ok(l) => match l.model {
            LoadedModel::Embedder(e) => e,
            LoadedModel::Generator(_) => panic!("a BERT embeds"),
        },
        Err(e) => panic!("no GPU: this test needs an NVIDIA GPU: {e:#}"),
    };
    let lens = [1usize, 5, 63, 64, 65, 130, 17, 200, 2];
    let inputs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(s, &n)| {
            (0..n)
                .map(|i| ((i * 31 + s * 97) % 509 + 3) as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let want = embedder(Device::Cpu).embed(&refs).unwrap();
    let mut gpu = embedder(Device::Cuda(0));
    let got = gpu.embed(&refs).unwrap();
    assert_eq!(got.len(), want.len());
    // Mean pooling makes long inputs' embeddings alike (0.9 to 0.99 apart on the CPU): the
    // part that tells them apart, each less the inputs' mean, is compared too (between
    // different inputs at most 0.89 on the CPU).
    let mean: Vec<f32> = (0..want[0].len())
        .map(|k| want.iter().map(|v| v[k]).sum::<f32>() / want.len() as f32)
        .collect();
    let centred = |v: &[f32]| -> Vec<f32> { v.iter().zip(&mean).map(|(a, b)| a - b).collect() };
    for ((g, w), n) in got.iter().zip(&want).zip(lens) {
        let (c, cc) = (cosine(g, w), cosine(&centred(g), &centred(w)));
        eprintln!("random BERT, {n} tokens: CUDA vs CPU cosine {c:.6}, centred {cc:.5}");
        assert!(c >= 0.999, "{n} tokens: CUDA vs CPU cosine {c}");
        assert!(cc >= 0.99, "{n} tokens: CUDA vs CPU centred cosine {cc}");
    }
    assert!(
        cosine(&want[2], &want[3]) < 0.99 && cosine(&want[0], &want[8]) < 0.99,
        "the random BERT tells inputs apart"
    );
    alone_as_in_the_batch("random BERT", gpu.as_mut(), &refs, &got);
}

/// The released encoders' shapes with dummy weights (all-MiniLM-L6-v2 through the serving
/// loader, BERT-base, RoBERTa-base and DistilBERT-base directly): unit-norm, finite
/// embeddings, the same seed the same ones, another seed others.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_encoder_presets_run_with_dummy_weights() {
    let inputs: [&[u32]; 3] = [&[101, 2023, 2003, 102], &[101, 7592, 102], &[5; 300]];
    let opts = LoadOptions {
        model: "preset:all-minilm-l6-v2".into(),
        task: None,
        load_format: LoadFormat::Dummy,
        device: Device::Cuda(0),
        seed: 1,
        tokenizer: None,
        gpu: GpuLoadOptions {
            max_model_len: Some(512),
            ..Default::default()
        },
    };
    let LoadedModel::Embedder(mut e) = load::load(&opts)
        .unwrap_or_else(|e| panic!("no GPU: this test needs an NVIDIA GPU: {e:#}"))
        .model
    else {
        panic!("all-minilm-l6-v2 embeds");
    };
    let minilm = e.embed(&inputs).unwrap();
    assert_eq!(minilm[0].len(), 384);
    for name in [
        "bert-base-uncased",
        "roberta-base",
        "distilbert-base-uncased",
    ] {
        let config = ModelConfig::from_preset(name).unwrap();
        let embed = |seed| {
            let opts = CudaOptions {
                max_tokens: 1024,
                max_model_len: 512,
                ..small_opts()
            };
            let mut m = cuda_encoder(&config, &WeightSource::Dummy { seed }, opts);
            m.embed(&inputs).unwrap()
        };
        let a = embed(1);
        for (i, v) in a.iter().enumerate() {
            assert_eq!(v.len(), config.hidden_size, "{name}");
            assert!(v.iter().all(|x| x.is_finite()), "{name}: input {i} finite");
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "{name}: input {i}: norm {norm}");
        }
        assert_eq!(a, embed(1), "{name}: seeded");
        assert!(
            cosine(&a[0], &embed(2)[0]) < 0.99,
            "{name}: the seed matters"
        );
    }
    for v in &minilm {
        assert!(v.iter().all(|x| x.is_finite()), "all-minilm-l6-v2: finite");
    }
}

/// The serving loader on both devices, same folder: the CUDA model's logits for `prompt`
/// are the CPU model's within bf16 tolerance, and greedy decoding agrees token for token.
fn cuda_and_cpu_agree(dir: &Path, prompt: &[u32]) {
    let what = dir.display().to_string();
    let on = |device| LoadOptions {
        model: what.clone(),
        task: None,
        load_format: LoadFormat::Auto,
        device,
        seed: 0,
        tokenizer: None,
        gpu: GpuLoadOptions {
            memory_utilization: 0.05,
            max_model_len: Some(256),
            ..Default::default()
        },
    };
    let generator = |device| match load::load(&on(device)) {
        Ok(l) => match l.model {
            LoadedModel::Generator(g) => g,
            LoadedModel::Embedder(_) => panic!("expected a generator"),
        },
        Err(e) => panic!("no GPU: this test needs an NVIDIA GPU: {e:#}"),
    };
    let mut cpu = generator(Device::Cpu);
    let mut gpu = generator(Device::Cuda(0));
    cpu.init_kv_cache(32, 16).unwrap();
    gpu.init_kv_cache(32, 16).unwrap();
    // as many blocks as the model's length allows (gpt2-tiny: 128 positions, 8 blocks)
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let blocks = 256.min(config.max_position_embeddings) / 16;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut ids = prompt.to_vec();
    let prompt = one(&ids, 0, &table, GREEDY);
    let mut want = cpu.step_logits(&prompt).unwrap().remove(0);
    let mut got = gpu.step_logits(&prompt).unwrap().remove(0);
    let tol = logits_tolerance(&config);
    assert_logits_within(
        &got,
        &want,
        &format!("{what}: prompt logits, CUDA vs CPU"),
        tol,
    );
    // Then decode steps, greedy, token for token: the same token, or a near-tie in the CPU's
    // logits (the two tokens closer than twice the step's measured error, which bf16 may
    // order either way), after which the sequences part and the comparison ends.
    for _ in 0..7 {
        let (c, g) = (argmax(&want), argmax(&got));
        if c != g {
            let gap = want[c as usize] - want[g as usize];
            let err = max_abs_diff(&got, &want);
            assert!(
                gap <= 2.0 * err,
                "{what}: greedy token after {} tokens: CPU {c}, CUDA {g}, CPU's gap {gap:.4} > 2 x error {err:.4}",
                ids.len()
            );
            eprintln!(
                "{what}: a near-tie after {} tokens (CPU {c}, CUDA {g}, gap {gap:.4}, error {err:.4}): compared up to here",
                ids.len()
            );
            return;
        }
        ids.push(c);
        let step = one(&ids[ids.len() - 1..], ids.len() - 1, &table, GREEDY);
        want = cpu.step_logits(&step).unwrap().remove(0);
        got = gpu.step_logits(&step).unwrap().remove(0);
        assert_logits_within(
            &got,
            &want,
            &format!("{what}: logits after {} tokens", ids.len()),
            tol,
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_and_cpu_models_agree_through_the_loader() {
    for name in [QWEN3, LLAMA, QWEN2, GPT2, MOE, MOE_FP8] {
        cuda_and_cpu_agree(&fixture_dir(name), &reference(name)[1].ids);
    }
}

/// A Llama with `attention_bias` (biases on q, k, v and o: no fixture has them): the tiny
/// Llama's weights with seeded biases added, written to a folder, on both devices through
/// the loader.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_and_cpu_agree_for_llama_with_attention_bias() {
    use safetensors::tensor::Dtype;
    let src = fixture_dir(LLAMA);
    let tmp = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["attention_bias"] = serde_json::json!(true);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, Dtype::F32, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let c = ModelConfig::from_file(&src.join("config.json")).unwrap();
    let (h, q, kv) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let mut state = 7u64;
    let mut bias = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| (0.2 * (next_uniform(&mut state) - 0.5)).to_le_bytes())
            .collect()
    };
    for l in 0..c.num_hidden_layers {
        for (proj, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)] {
            let name = format!("model.layers.{l}.self_attn.{proj}.bias");
            tensors.push((name, Dtype::F32, vec![n], bias(n)));
        }
    }
    write_safetensors(&tmp.path().join("model.safetensors"), &tensors);
    cuda_and_cpu_agree(tmp.path(), &reference(LLAMA)[1].ids);
}

/// The tiny Qwen3-MoE against transformers, in f32 (experts in bf16 on the GPU) and in
/// block FP8 (experts kept in FP8, 32 x 32 blocks): prefill logits, greedy tokens through
/// the decode graphs, chunked-prefill argmax.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_moe_matches_transformers() {
    for name in [MOE, MOE_FP8] {
        prefill_and_greedy_match_transformers(name);
        chunked_prefill_argmax_matches(name);
    }
}

/// A random Qwen3-MoE checkpoint at shapes that take the wide grouped-GEMM tiles (hidden
/// 256, experts of 128, 16 experts, top 4, FP8 blocks of 128 x 128 with a different scale
/// per block), written once in block FP8 and once in f32 with the same values: on both
/// devices through the loader, a 120-token prompt (more than 24 rows per expert: the
/// 64-row blocks) and decode steps (16-row blocks).
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_and_cpu_agree_for_a_moe_at_the_wide_tiles() {
    let prompt: Vec<u32> = (0..120).map(|i| (i * 37 % 500 + 3) as u32).collect();
    for fp8 in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        write_random_moe(tmp.path(), fp8);
        cuda_and_cpu_agree(tmp.path(), &prompt);
    }
}

/// The FP8 experts (kept in FP8, W8A16 grouped GEMMs) against the same checkpoint's experts
/// dequantised to bf16 at load (the bf16 grouped GEMMs), both on the GPU: prefill logits
/// within bf16 rounding of the weights, for the tiny FP8 fixture (32 x 32 blocks) and a
/// random checkpoint in 128 x 128 blocks (a 120-token prompt and a 5-token one: both row
/// blocks).
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_fp8_experts_match_their_dequantised_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    write_random_moe(tmp.path(), true);
    let long: Vec<u32> = (0..120).map(|i| (i * 37 % 500 + 3) as u32).collect();
    let fixture: Vec<Vec<u32>> = reference(MOE_FP8).into_iter().map(|it| it.ids).collect();
    let cases = [
        (fixture_dir(MOE_FP8), fixture),
        (tmp.path().to_path_buf(), vec![long, vec![5, 6, 7, 8, 9]]),
    ];
    for (dir, prompts) in cases {
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = WeightSource::open_model(&dir, &config).unwrap();
        let mut dequantised = config.clone();
        if let Some(q) = dequantised.fp8.as_mut() {
            q.modules_to_not_convert
                .push("model.layers.0.mlp.experts".into());
        }
        let logits = |c: &ModelConfig| -> Vec<Vec<f32>> {
            let mut m = cuda_model(c, Task::Generate, &weights, small_opts());
            m.init_kv_cache(64, 16).unwrap();
            let table: Vec<u32> = (0..16).collect();
            prompts
                .iter()
                .map(|p| m.step_logits(&one(p, 0, &table, GREEDY)).unwrap().remove(0))
                .collect()
        };
        for (i, (fp8, bf16)) in logits(&config).iter().zip(logits(&dequantised)).enumerate() {
            assert_logits_within(
                fp8,
                &bf16,
                &format!(
                    "{}: prompt {i}, FP8 experts vs dequantised bf16",
                    dir.display()
                ),
                0.03,
            );
        }
    }
}

/// `--sm-partition`: the tiny model in a green context of 16 SMs gives the logits it gives
/// on the whole GPU, and a partition larger than the GPU is an error naming the flag.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn an_sm_partition_gives_the_same_logits() {
    let ids: Vec<u32> = (0..9).map(|i| (i * 13 % 200 + 3) as u32).collect();
    let table: Vec<u32> = (0..16).collect();
    let dir = fixture_dir(QWEN3);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = WeightSource::open_model(&dir, &config).unwrap();
    let logits = |sm_partition| {
        let opts = CudaOptions {
            sm_partition,
            ..small_opts()
        };
        let mut m = cuda_model(&config, Task::Generate, &weights, opts);
        m.init_kv_cache(64, 16).unwrap();
        m.step_logits(&one(&ids, 0, &table, GREEDY))
            .unwrap()
            .remove(0)
    };
    let whole = logits(None);
    let part = logits(Some(16));
    assert_eq!(whole, part, "the same kernels on fewer SMs");
    let info = load::model_info(&config, Task::Generate, vec![], 2, Fp8Kept::None);
    let opts = CudaOptions {
        sm_partition: Some(100_000),
        ..small_opts()
    };
    let err = CudaQwen3::new(0, &config, info, &weights, opts)
        .err()
        .expect("a partition larger than the GPU");
    assert!(format!("{err:#}").contains("--sm-partition"), "{err:#}");
}

/// Every grouped-GEMM tile the random MoE's experts can take (FP8 and bf16), forced for
/// every step, gives the logits of the engine's own pick: a 120-token prompt (many rows
/// per expert) and a 5-token one (few), within float rounding.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn every_moe_tile_gives_the_same_logits() {
    let long: Vec<u32> = (0..120).map(|i| (i * 37 % 500 + 3) as u32).collect();
    let prompts = [long, vec![5, 6, 7, 8, 9]];
    for fp8 in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        write_random_moe(tmp.path(), fp8);
        let config = ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
        let weights = WeightSource::open_model(tmp.path(), &config).unwrap();
        let mut m = cuda_model(&config, Task::Generate, &weights, small_opts());
        m.init_kv_cache(64, 16).unwrap();
        let table: Vec<u32> = (0..16).collect();
        let logits = |m: &mut CudaQwen3| -> Vec<Vec<f32>> {
            prompts
                .iter()
                .map(|p| m.step_logits(&one(p, 0, &table, GREEDY)).unwrap().remove(0))
                .collect()
        };
        let auto = logits(&mut m);
        let mut tried = 0;
        for tile in moe_kernels::compiled_tiles(fp8) {
            if m.set_moe_tile(Some(tile)).is_err() {
                continue; // another depth or FP8 block
            }
            tried += 1;
            for (i, (got, want)) in logits(&mut m).iter().zip(&auto).enumerate() {
                assert_logits_within(
                    got,
                    want,
                    &format!("fp8 {fp8}, tile {tile}, prompt {i}"),
                    0.002,
                );
            }
        }
        assert!(
            tried >= 2,
            "fp8 {fp8}: only {tried} tiles fit the random MoE"
        );
        m.set_moe_tile(None).unwrap();
    }
}

/// A decode step reads back how its routing spread (the rows per expert a routed row saw,
/// summed by `moe_align` on the device), and the next step of that size picks its tile by
/// it: 32 copies of one token send every row to the same 4 of 16 experts, 32 rows each,
/// where the mean (8) would keep the short tile; the graph of the taller tile gives the
/// same logits. A batch padded to the graph's size leaves its padding rows unrouted.
/// Distinct tokens spread, and see fewer.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn skewed_routing_moves_the_next_decode_step_to_a_taller_tile() {
    let tmp = tempfile::tempdir().unwrap();
    write_random_moe(tmp.path(), true);
    let config = ModelConfig::from_file(&tmp.path().join("config.json")).unwrap();
    let weights = WeightSource::open_model(tmp.path(), &config).unwrap();
    let batch = 32;
    let opts = CudaOptions {
        max_tokens: 256,
        max_seqs: batch,
        max_model_len: 64,
        graph_buckets: vec![batch],
        ..Default::default()
    };
    let mut m = cuda_model(&config, Task::Generate, &weights, opts);
    m.init_kv_cache(batch * 4, 16).unwrap();
    let tables: Vec<Vec<u32>> = (0..batch as u32).map(|i| vec![4 * i]).collect();
    let step = |m: &mut CudaQwen3, tokens: &[[u32; 1]]| -> Vec<Vec<f32>> {
        let seqs: Vec<SeqStep<'_>> = tokens
            .iter()
            .zip(&tables)
            .map(|(t, table)| SeqStep {
                tokens: t,
                start_pos: 0,
                block_table: table,
                sample: Some(GREEDY),
            })
            .collect();
        m.step_logits(&seqs).unwrap()
    };
    let same = vec![[7u32]; batch];
    assert_eq!(m.moe_rows_seen(batch), None, "before any decode step");
    let first = step(&mut m, &same); // the mean's tile (16 rows)
    assert_eq!(m.moe_rows_seen(batch), Some(batch as f64));
    let second = step(&mut m, &same); // the 64-row tile's graph
    assert_eq!(m.moe_rows_seen(batch), Some(batch as f64));
    for (i, (got, want)) in second.iter().zip(&first).enumerate() {
        assert_logits_within(got, want, &format!("row {i}, taller tile"), 0.002);
    }
    // 30 sequences in the graph of 32: the two padding rows route nowhere, so every routed
    // row still sees the 30 rows of its experts, and the live rows' logits stand
    let padded = step(&mut m, &same[..batch - 2]);
    assert_eq!(padded.len(), batch - 2);
    assert_eq!(m.moe_rows_seen(batch), Some((batch - 2) as f64));
    for (i, got) in padded.iter().enumerate() {
        assert_logits_within(got, &first[i], &format!("row {i}, padded batch"), 0.002);
    }
    let spread: Vec<[u32; 1]> = (0..batch as u32).map(|i| [3 + 13 * i]).collect();
    step(&mut m, &spread);
    let seen = m.moe_rows_seen(batch).unwrap();
    // 32 tokens x top 4 over 16 experts: at least the mean, 8; below 32, where every row's
    // experts are alike
    assert!(
        (8.0..32.0).contains(&seen),
        "distinct tokens saw {seen} rows per expert"
    );
}

/// Writes a random Qwen3-MoE checkpoint (2 sparse layers) to `dir`: its linears in block
/// FP8 (e4m3 bytes, no NaN, one scale per 128 x 128 block) when `fp8`, else the same
/// values in f32; embeddings, norms, routers and `lm_head` in f32.
fn write_random_moe(dir: &Path, fp8: bool) {
    use safetensors::tensor::Dtype;
    let (h, heads, kv_heads, hd, e, inter, vocab) = (256, 4, 2, 64, 16, 128, 512);
    let mut config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": h, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hd,
        "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": false, "hidden_act": "silu",
        "num_experts": e, "num_experts_per_tok": 4, "moe_intermediate_size": inter,
        "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "bos_token_id": 1, "eos_token_id": 2,
    });
    if fp8 {
        config["quantization_config"] = serde_json::json!({
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
        });
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut state = 11u64;
    let mut uniform = move || next_uniform(&mut state);
    let mut tensors: Vec<RawTensor> = Vec::new();
    let mut float = |name: String, shape: Vec<usize>, v: Vec<f32>| {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, Dtype::F32, shape, bytes));
    };
    let mut plain = |n: usize, amp: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|_| offset + amp * (2.0 * uniform() - 1.0))
            .collect()
    };
    let mut linears: Vec<(String, usize, usize)> = Vec::new();
    float(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        plain(vocab * h, 0.5, 0.0),
    );
    float("model.norm.weight".into(), vec![h], plain(h, 0.05, 1.0));
    float(
        "lm_head.weight".into(),
        vec![vocab, h],
        plain(vocab * h, 0.05, 0.0),
    );
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            float(format!("{p}.{n}.weight"), vec![h], plain(h, 0.05, 1.0));
        }
        for n in ["q_norm", "k_norm"] {
            float(
                format!("{p}.self_attn.{n}.weight"),
                vec![hd],
                plain(hd, 0.05, 1.0),
            );
        }
        float(
            format!("{p}.mlp.gate.weight"),
            vec![e, h],
            plain(e * h, 0.1, 0.0),
        );
        for (n, rows, cols) in [
            ("q_proj", heads * hd, h),
            ("k_proj", kv_heads * hd, h),
            ("v_proj", kv_heads * hd, h),
            ("o_proj", h, heads * hd),
        ] {
            linears.push((format!("{p}.self_attn.{n}"), rows, cols));
        }
        for x in 0..e {
            for (n, rows, cols) in [
                ("gate_proj", inter, h),
                ("up_proj", inter, h),
                ("down_proj", h, inter),
            ] {
                linears.push((format!("{p}.mlp.experts.{x}.{n}"), rows, cols));
            }
        }
    }
    for (name, rows, cols) in linears {
        // e4m3 bytes with NaN codes moved to their neighbour; a scale per block so that the
        // weights have a std of about 0.03, each block a different one.
        let q: Vec<u8> = (0..rows * cols)
            .map(|_| {
                let b = (uniform() * 256.0) as u8;
                if b & 0x7f == 0x7f {
                    b ^ 1
                } else {
                    b
                }
            })
            .collect();
        let blocks = [rows.div_ceil(128), cols.div_ceil(128)];
        let scales: Vec<f32> = (0..blocks[0] * blocks[1])
            .map(|_| (0.5 + uniform()) * 2.5e-4)
            .collect();
        if fp8 {
            tensors.push((
                format!("{name}.weight"),
                Dtype::F8_E4M3,
                vec![rows, cols],
                q,
            ));
            let bytes = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((
                format!("{name}.weight_scale_inv"),
                Dtype::F32,
                blocks.to_vec(),
                bytes,
            ));
        } else {
            let w = engine::weights::fp8::dequantise(&q, rows, cols, &scales, [128, 128]).unwrap();
            let bytes = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((
                format!("{name}.weight"),
                Dtype::F32,
                vec![rows, cols],
                bytes,
            ));
        }
    }
    write_safetensors(&dir.join("model.safetensors"), &tensors);
}

/// A tensor to write: name, dtype, shape and little-endian bytes.
type RawTensor = (String, safetensors::tensor::Dtype, Vec<usize>, Vec<u8>);

/// Writes `tensors` as one safetensors file at `path`.
fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, data)| {
            let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap();
            (n.clone(), v)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

/// The next uniform in [0, 1) of a 64-bit LCG (reproducible test data).
fn next_uniform(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 40) as f32 / (1u64 << 24) as f32
}

/// The seeds' generator at its real shapes with dummy weights (`preset:qwen3-30b-a3b-fp8`:
/// 48 layers, 128 experts in FP8): it loads, holds the experts in FP8 (the bytes the plan
/// counts, plus scratch), and gives finite logits through a prefill and a decode graph.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_qwen3_30b_a3b_fp8_preset_runs_with_fp8_experts() {
    let config = ModelConfig::from_preset("qwen3-30b-a3b-fp8").unwrap();
    let mut m = cuda_model(
        &config,
        Task::Generate,
        &WeightSource::Dummy { seed: 3 },
        small_opts(),
    );
    let weights = config.resident_weight_bytes(2, Fp8Kept::Experts, true);
    let held = m.bytes_held();
    eprintln!(
        "qwen3-30b-a3b-fp8: {:.2} GB held, {:.2} GB of weights planned",
        held as f64 / 1e9,
        weights as f64 / 1e9
    );
    assert!(
        held >= weights && held - weights < 1 << 30,
        "{held} vs {weights}"
    );
    m.init_kv_cache(64, 16).unwrap();
    let table: Vec<u32> = (0..16).collect();
    let prompt: Vec<u32> = (0..40).map(|i| i * 7 + 1).collect();
    let a = m
        .step_logits(&one(&prompt, 0, &table, GREEDY))
        .unwrap()
        .remove(0);
    assert!(a.iter().all(|x| x.is_finite()), "prefill logits finite");
    let next = argmax(&a);
    let b = m
        .step_logits(&one(&[next], prompt.len(), &table, GREEDY))
        .unwrap()
        .remove(0);
    assert!(b.iter().all(|x| x.is_finite()), "decode logits finite");
    assert!(cosine(&a, &b) < 0.9999, "the decode step sees a new token");
}

/// Eager steps (no CUDA graphs) of up to 1,024 tokens and 8 sequences: the prefill tests'.
fn eager_opts() -> CudaOptions {
    CudaOptions {
        max_tokens: 1024,
        max_seqs: 8,
        max_model_len: 1024,
        graph_buckets: vec![],
        ..Default::default()
    }
}

/// Token ids below `n` from a linear congruential generator seeded with `seed` (Knuth's
/// MMIX constants): the same prompts on every run, without a dependency.
fn token_gen(seed: u64) -> impl FnMut(u64) -> u32 {
    let mut state = seed;
    move |n| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n) as u32
    }
}

/// One sequence's step.
fn one<'a>(
    tokens: &'a [u32],
    start_pos: usize,
    block_table: &'a [u32],
    spec: SampleSpec<'a>,
) -> [SeqStep<'a>; 1] {
    [SeqStep {
        tokens,
        start_pos,
        block_table,
        sample: Some(spec),
    }]
}

/// Rows that are not plain greedy are read back and sampled by the shared rule: the same
/// token as the rule gives on the step's logits, masked ids avoided, and a mask of every
/// id dropped (the GPU's argmax stands).
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_sampling_follows_the_shared_rule() {
    let items = reference(QWEN3);
    let mut m = tiny_generator(QWEN3);
    let table: Vec<u32> = (0..20).collect();
    let ids = &items[0].ids;
    let logits = m
        .step_logits(&one(ids, 0, &table, GREEDY))
        .unwrap()
        .remove(0);
    let best = sample_row(&logits, &GREEDY).unwrap();
    let run = |m: &mut CudaQwen3, spec| m.step(&one(ids, 0, &table, spec)).unwrap()[0];
    assert_eq!(run(&mut m, GREEDY), best, "greedy on the GPU");
    let masked = [best];
    let masked = &masked[..];
    let everything: Vec<u32> = (0..512).collect();
    let everything = &everything[..];
    let specs = [
        SampleSpec { masked, ..GREEDY },
        SampleSpec {
            masked: everything,
            ..GREEDY
        },
        SampleSpec {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            uniform: 0.37,
            masked: &[],
        },
        SampleSpec {
            temperature: 1.5,
            top_p: 1.0,
            top_k: 0,
            uniform: 0.91,
            masked,
        },
        SampleSpec {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            uniform: 0.5,
            masked: everything,
        },
    ];
    for spec in specs {
        let got = run(&mut m, spec);
        let want = sample_row(&logits, &spec).unwrap();
        assert_eq!(got, want, "{spec:?}");
        if spec.masked.len() == 1 {
            assert_ne!(got, best, "masked id chosen");
        }
    }
    let all_masked = SampleSpec {
        masked: everything,
        ..GREEDY
    };
    assert_eq!(
        run(&mut m, all_masked),
        best,
        "a mask of every id is dropped"
    );
}

/// Sampling with a temperature on the CUDA path is the shared host rule for the same seed:
/// six sequences of the tiny Qwen3 in one batch (the reference prompts, each in its own
/// blocks), each with its own spec (temperature 0.7 or 1.3, top-k and top-p on and off, one
/// greedy row among them) and its own seeded RNG drawing one uniform a step as the
/// scheduler does, run a prefill and 5 decode steps (the decode-graph path); at every step
/// each token `step` returns is `sample_row` on the same step's logits (`step_logits` on the
/// same batch) with the same spec, and the sequences go on with those tokens. Then one
/// prompt's row at temperature 1.3, drawn with 16 seeds' uniforms, follows the rule at each
/// and gives at least two distinct tokens (the GPU path does not fall back to its argmax).
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_seeded_temperature_sampling_matches_the_host_rule() {
    use rand::{Rng, SeedableRng};
    let seeded = |seed: u64| rand::rngs::StdRng::seed_from_u64(seed);
    let items = reference(QWEN3);
    let mut m = tiny_generator(QWEN3);
    // (temperature, top_p, top_k, seed) of each row; row i runs prompt i % 3 in blocks
    // 20 * i .. 20 * i + 20 (the generator has 128 blocks of 4 tokens).
    let rows: [(f32, f32, usize, u64); 6] = [
        (0.7, 1.0, 0, 11),
        (1.3, 1.0, 0, 12),
        (0.0, 1.0, 0, 13),
        (0.7, 0.9, 40, 14),
        (1.3, 0.8, 0, 15),
        (1.3, 1.0, 64, 16),
    ];
    let tables: Vec<Vec<u32>> = (0..rows.len() as u32)
        .map(|i| (20 * i..20 * i + 20).collect())
        .collect();
    let mut seqs: Vec<Vec<u32>> = (0..rows.len())
        .map(|i| items[i % items.len()].ids.clone())
        .collect();
    let mut rngs: Vec<_> = rows.iter().map(|r| seeded(r.3)).collect();
    let spec = |(temperature, top_p, top_k, _): (f32, f32, usize, u64), uniform| SampleSpec {
        temperature,
        top_p,
        top_k,
        uniform,
        masked: &[],
    };
    let mut off_argmax = 0;
    for step in 0..6 {
        // One uniform per sampling sequence and step, from its seeded RNG (the scheduler's).
        let specs: Vec<SampleSpec<'_>> = rows
            .iter()
            .zip(rngs.iter_mut())
            .map(|(&r, rng)| spec(r, rng.gen::<f32>()))
            .collect();
        let got = {
            let steps: Vec<SeqStep<'_>> = seqs
                .iter()
                .zip(&tables)
                .zip(&specs)
                .map(|((s, tb), sp)| {
                    let start = if step == 0 { 0 } else { s.len() - 1 };
                    SeqStep {
                        tokens: &s[start..],
                        start_pos: start,
                        block_table: tb,
                        sample: Some(*sp),
                    }
                })
                .collect();
            let logits = m.step_logits(&steps).unwrap();
            assert_eq!(logits.len(), rows.len(), "step {step}: logits rows");
            let got = m.step(&steps).unwrap();
            assert_eq!(got.len(), rows.len(), "step {step}: sampled rows");
            for (i, ((l, sp), &t)) in logits.iter().zip(&specs).zip(&got).enumerate() {
                let want = sample_row(l, sp).unwrap();
                assert_eq!(t, want, "step {step}, row {i}: {sp:?}");
                if sp.temperature > 0.0 && t != argmax(l) {
                    off_argmax += 1;
                }
            }
            got
        };
        eprintln!("step {step}: sampled {got:?}");
        for (s, t) in seqs.iter_mut().zip(got) {
            s.push(t);
        }
    }
    eprintln!("{off_argmax} of 30 tempered tokens are not their row's argmax");
    // One row, many draws: prompt 1 in the spare blocks 120 .. 128, at temperature 1.3.
    let ids = &items[1].ids;
    let table: Vec<u32> = (120..128).collect();
    let logits = m
        .step_logits(&one(ids, 0, &table, GREEDY))
        .unwrap()
        .remove(0);
    let mut seen = std::collections::BTreeSet::new();
    for seed in 100..116 {
        let sp = spec((1.3, 1.0, 0, seed), seeded(seed).gen::<f32>());
        let got = m.step(&one(ids, 0, &table, sp)).unwrap()[0];
        assert_eq!(
            got,
            sample_row(&logits, &sp).unwrap(),
            "seed {seed}: {sp:?}"
        );
        seen.insert(got);
    }
    eprintln!(
        "16 draws at temperature 1.3: {} distinct tokens (argmax {})",
        seen.len(),
        argmax(&logits)
    );
    assert!(
        seen.len() >= 2,
        "16 draws at temperature 1.3 all gave {seen:?}: the row was not sampled"
    );
}

/// `--sm-partitions`: an embedder moves its batches between green contexts while it runs
/// and gives the same vectors on each (the tiny Qwen3 as an embedder, and the tiny BERT);
/// the SMs it reports follow the share. The time of a larger batch on each partition is
/// printed (not asserted: speed belongs to benchmarks) to show the confinement in the log.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn sm_partitions_move_embeddings_at_run_time() {
    let inputs: Vec<Vec<u32>> = [5usize, 17, 33, 1, 64]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 13 % 200 + 3) as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let big: Vec<Vec<u32>> = (0..8)
        .map(|s| (0..48).map(|i| ((i * 7 + s) % 200 + 3) as u32).collect())
        .collect();
    let big: Vec<&[u32]> = big.iter().map(Vec::as_slice).collect();
    let opts = || CudaOptions {
        sm_partitions: vec![32, 16, 16],
        ..small_opts()
    };
    let check = |what: &str, m: &mut dyn Embedder| {
        let parts = m.sm_partitions().expect("partitions were asked for");
        assert_eq!(parts.sizes, vec![16, 32], "{what}: sorted, one of each");
        let whole = m.embed(&refs).unwrap();
        for (share, sms) in [
            (Some(10), 16),
            (Some(20), 32),
            (None, parts.total),
            (Some(1), 16),
        ] {
            assert_eq!(m.set_sm_share(share).unwrap(), sms, "{what}: {share:?}");
            let got = m.embed(&refs).unwrap();
            for (i, (g, w)) in got.iter().zip(&whole).enumerate() {
                let c = cosine(g, w);
                assert!(c >= 0.9999, "{what}: input {i} on {sms} SMs: cosine {c}");
            }
            m.embed(&big).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..5 {
                m.embed(&big).unwrap();
            }
            eprintln!(
                "{what}: 8 x 48 tokens on {sms} of {} SMs: {:.2} ms a batch",
                parts.total,
                t.elapsed().as_secs_f64() * 200.0
            );
        }
    };
    let dir = fixture_dir(QWEN3);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = WeightSource::open_model(&dir, &config).unwrap();
    let mut m = cuda_model(&config, Task::Embed, &weights, opts());
    check("qwen3-tiny", &mut m);
    let dir = fixture_dir("bert-tiny");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = WeightSource::open_model(&dir, &config).unwrap();
    let mut e = cuda_encoder(&config, &weights, opts());
    check("bert-tiny", &mut e);
}
