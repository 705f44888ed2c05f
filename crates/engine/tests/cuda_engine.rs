//! The CUDA model (`model::qwen3_cuda`) against the references, on the GPU.
//!
//! GPU tests are selected by the `gpu-tests` feature: without it (CI, no GPU) they are
//! ignored; with it they run, assert on the GPU, and fail with a "no GPU" message where
//! there is none. On the GPU machine (`scripts/gpu/prepare.sh` builds this binary with
//! the feature; `scripts/gpu/cuda-bench.sh` runs it):
//! - numerics: the CUDA Qwen3 against transformers' float32 reference for the tiny Qwen3
//!   fixture (logits with bf16 tolerances, greedy tokens, embedding cosine), through the
//!   prefill path, the eager decode path and the CUDA-graph decode path; against the CPU
//!   model through the serving loader; the shared sampling rule on GPU logits;
//! - the flash embedding kernel against the paged one at the real head size;
//! - the kernels' compilation for every preset shape (NVRTC only).
//!
//! The tests without the feature run on every machine and check what holds on every
//! machine: asking for CUDA opens the GPU or says clearly why not. The benchmark is the
//! `cuda_bench` example.

use std::path::PathBuf;

use engine::backend::cuda::kernels::compile_source;
use engine::backend::cuda::CudaOptions;
use engine::backend::sampling::sample_row;
use engine::load::{self, Device, GpuLoadOptions, LoadFormat, LoadOptions, LoadedModel};
use engine::model::config::ModelConfig;
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

/// The tiny Qwen3 fixture: the repo's copy, the shared one beside the checkout, or the one
/// carried to the GPU machine in `.gpu/`.
fn fixture_dir() -> PathBuf {
    if let Ok(p) = std::env::var("QWEN3_TINY_DIR") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for p in [
        "testdata/qwen3-tiny",
        "../shared/fixtures/qwen3-tiny",
        ".gpu/qwen3-tiny",
    ] {
        let d = root.join(p);
        if d.join("model.safetensors").is_file() {
            return d;
        }
    }
    panic!("qwen3-tiny fixture not found (testdata/qwen3-tiny, ../shared/fixtures/qwen3-tiny, .gpu/qwen3-tiny or $QWEN3_TINY_DIR)");
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
    let info = load::model_info(config, task, config.eos_token_ids.clone(), 2);
    CudaQwen3::new(0, config, info, weights, opts).unwrap_or_else(|e| {
        panic!("no GPU: this test needs an NVIDIA GPU (feature gpu-tests selects it): {e:#}")
    })
}

fn tiny_config() -> ModelConfig {
    ModelConfig::from_file(&fixture_dir().join("config.json")).unwrap()
}

fn tiny_weights() -> WeightSource {
    WeightSource::open_dir(&fixture_dir()).unwrap()
}

fn tiny_generator() -> CudaQwen3 {
    let mut m = cuda_model(
        &tiny_config(),
        Task::Generate,
        &tiny_weights(),
        small_opts(),
    );
    m.init_kv_cache(64, 4).unwrap();
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

/// An architecture without a CUDA model is refused before any device is opened, so the
/// message is the same with and without a GPU.
#[test]
fn bert_on_cuda_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 512,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 64}"#;
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let opts = LoadOptions {
        model: dir.path().display().to_string(),
        task: None,
        load_format: LoadFormat::Dummy,
        device: Device::Cuda(0),
        seed: 1,
        gpu: Default::default(),
    };
    let msg = format!("{:#}", load::load(&opts).err().expect("refused"));
    assert!(msg.contains("only Qwen3") && msg.contains("bert"), "{msg}");
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
    for (d, g) in [(128, 2), (128, 4), (16, 2), (64, 1), (80, 2), (96, 8)] {
        let ptx = match compile_source("sm_90", d, g) {
            Ok(p) => p.to_src(),
            Err(e) => panic!("head_dim {d} group {g}: {e}"),
        };
        // The tensor-core attention exists exactly where the head size allows it.
        let flash = ptx.contains(".entry embed_flash_attention");
        assert_eq!(flash, d % 16 == 0, "head_dim {d}");
        assert_eq!(ptx.contains("mma.sync.aligned.m16n8k16"), flash);
    }
}

/// Prefill (one step for all three prompts at once), then decode 7 tokens each, through
/// the graph path and compared with transformers' greedy continuation.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
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
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
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
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_tiny_embedding_matches_transformers() {
    let items = reference();
    let mut m = cuda_model(&tiny_config(), Task::Embed, &tiny_weights(), small_opts());
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

/// The serving loader on both devices, same folder: the CUDA model's logits are the CPU
/// model's within bf16 tolerance, and greedy decoding agrees token for token.
#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs an NVIDIA GPU (feature gpu-tests)"
)]
fn cuda_and_cpu_models_agree_through_the_loader() {
    let dir = fixture_dir().display().to_string();
    let on = |device| LoadOptions {
        model: dir.clone(),
        task: None,
        load_format: LoadFormat::Auto,
        device,
        seed: 0,
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
    let items = reference();
    let table: Vec<u32> = (0..16).collect();
    let mut ids = items[1].ids.clone();
    let prompt = one(&ids, 0, &table, GREEDY);
    let want = cpu.step_logits(&prompt).unwrap().remove(0);
    let got = gpu.step_logits(&prompt).unwrap().remove(0);
    assert_logits_close(&got, &want, "prompt logits, CUDA vs CPU");
    // The prompt again (same K/V rewritten), then decode steps.
    let (mut c, mut g) = (cpu.step(&prompt).unwrap(), gpu.step(&prompt).unwrap());
    for _ in 0..6 {
        assert_eq!(c, g, "greedy token after {} tokens", ids.len());
        ids.push(c[0]);
        let step = one(&ids[ids.len() - 1..], ids.len() - 1, &table, GREEDY);
        (c, g) = (cpu.step(&step).unwrap(), gpu.step(&step).unwrap());
    }
    assert_eq!(c, g, "greedy token after {} tokens", ids.len());
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
    let items = reference();
    let mut m = tiny_generator();
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
