//! The decoder families of issue 20 on the CPU against transformers: the tiny fixtures
//! `testdata/llama-tiny` (Llama 3 RoPE scaling, tied embeddings), `testdata/qwen2-tiny`
//! (q/k/v biases) and `testdata/gpt2-tiny` (learned positions, LayerNorm, gelu_new, fused
//! Conv1D `c_attn`, its own BPE tokenizer), float32, made by
//! `scripts/gpu/make-decoder-fixtures.py`. For each: last-token logits within 1e-4
//! relative (max abs diff / max abs), the argmax at every position through the decode
//! path, 8 greedy tokens, the pooled embedding, and paged attention with two sequences in
//! one step; the fixture configs read as the tiny presets; Llama without its RoPE scaling
//! is measurably off (the check sees the scaling); and `--device cuda` runs Llama, Qwen2
//! and Mistral (their numerics on the GPU: `tests/cuda_engine.rs`) and names GPT-2, which
//! it does not run. Everything goes through `engine::load::load`, the same
//! path as `colocate serve`.

mod common;

use std::path::Path;

use common::*;

use engine::load::{load, Device, LoadFormat};
use engine::model::config::ModelConfig;
use engine::model_api::{SeqStep, Task};

const FIXTURES: [(&str, &str); 3] = [
    ("llama-tiny", "llama"),
    ("qwen2-tiny", "qwen2"),
    ("gpt2-tiny", "gpt2"),
];

/// The last-token logits of every reference prompt in one prefill each, from the model in
/// `dir`; returns the worst max-rel difference.
fn last_logits_error(dir: &Path) -> f32 {
    let r = reference(dir);
    let mut g = generator(load(&opts(dir, Some(Task::Generate), LoadFormat::Auto)).unwrap());
    g.init_kv_cache(61, 4).unwrap();
    let mut worst = 0f32;
    for item in r["items"].as_array().unwrap() {
        let ids = u32s(&item["input_ids"]);
        let table = scattered_table(ids.len().div_ceil(4) + 2, 3, 61);
        let seq = SeqStep {
            tokens: &ids,
            start_pos: 0,
            block_table: &table,
            sample: Some(GREEDY),
        };
        let logits = g.step_logits(&[seq]).unwrap().remove(0);
        worst = worst.max(max_rel(&logits, &f32s(&item["last_logits"])));
    }
    worst
}

/// Every reference check of one fixture as a generator: last-token logits of the whole
/// prompt in one prefill, the argmax at every position token by token, 8 greedy tokens.
/// Returns the worst last-logits difference.
fn matches_transformers(name: &str, arch: &str) -> f32 {
    let dir = fixture(name);
    let r = reference(&dir);
    let loaded = load(&opts(&dir, Some(Task::Generate), LoadFormat::Auto)).unwrap();
    assert_eq!(loaded.info.architecture, arch);
    assert_eq!(loaded.info.eos_token_ids, vec![2]);
    assert_eq!(loaded.info.vocab_size, 512);
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    // 2 layers x KV heads x 16 x (K, V) x 4 bytes.
    assert_eq!(
        loaded.info.kv_bytes_per_token,
        2 * config.num_key_value_heads * 16 * 2 * 4
    );
    let mut g = generator(loaded);
    g.init_kv_cache(61, 4).unwrap();
    for item in r["items"].as_array().unwrap() {
        let ids = u32s(&item["input_ids"]);
        let table = scattered_table(ids.len().div_ceil(4) + 2, 3, 61);
        assert_argmax_per_position(&mut *g, &ids, &table, &u32s(&item["argmax"]), name);
        let want_tokens = u32s(&item["greedy"]);
        let got = greedy_tokens(&mut *g, &ids, want_tokens.len());
        assert_eq!(got, want_tokens, "{name}: greedy tokens");
    }
    let worst = last_logits_error(&dir);
    eprintln!("{name}: worst last-logits max rel diff {worst:.2e}");
    assert!(worst < 1e-4, "{name}: last logits max rel diff {worst}");
    worst
}

#[test]
fn llama_tiny_matches_transformers() {
    matches_transformers("llama-tiny", "llama");
}

#[test]
fn qwen2_tiny_matches_transformers() {
    matches_transformers("qwen2-tiny", "qwen2");
}

#[test]
fn gpt2_tiny_matches_transformers() {
    matches_transformers("gpt2-tiny", "gpt2");
}

/// All prompts embedded in one batch (last-token pooling, L2-normalised), every family.
#[test]
fn embeddings_match_transformers() {
    for (name, _) in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        let mut e = embedder(load(&opts(&dir, Some(Task::Embed), LoadFormat::Auto)).unwrap());
        let items = r["items"].as_array().unwrap();
        let inputs: Vec<Vec<u32>> = items.iter().map(|i| u32s(&i["input_ids"])).collect();
        let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
        for (item, emb) in items.iter().zip(e.embed(&refs).unwrap()) {
            let err = max_rel(&emb, &f32s(&item["embedding"]));
            assert!(err < 1e-4, "{name}: embedding max rel diff {err}");
        }
    }
}

/// A prefill chunk with prior context and another sequence's decode token in one step
/// give each one's logits alone (learned positions and biases included).
#[test]
fn two_sequences_in_one_step_are_independent() {
    for (name, _) in FIXTURES {
        let mut g = generator(load(&opts(fixture(name), None, LoadFormat::Auto)).unwrap());
        g.init_kv_cache(97, 4).unwrap();
        let ids: Vec<u32> = (0..37u32).map(|i| (i * 31 + 5) % 512).collect();
        let whole = chunked_logits(&mut *g, &ids, &[37], &scattered_table(10, 1, 97));
        let chunks = chunked_logits(&mut *g, &ids, &[5, 19, 13], &scattered_table(10, 40, 97));
        assert!(max_rel(&chunks, &whole) < 1e-5, "{name}: chunked");
        let (batched, other_batched, other_alone) = two_in_one_step(&mut *g, &ids);
        assert!(max_rel(&batched, &whole) < 1e-5, "{name}: batched");
        assert!(
            max_rel(&other_batched, &other_alone) < 1e-5,
            "{name}: the other sequence"
        );
    }
}

/// The fixtures' config.json (transformers 5 spellings: `rope_parameters`, GPT-2's
/// `n_embd`...) read as the tiny presets, EOS aside (a preset speaks the byte-level
/// tokenizer).
#[test]
fn fixture_configs_are_the_tiny_presets() {
    for (name, _) in FIXTURES {
        let mut c = ModelConfig::from_file(&fixture(name).join("config.json")).unwrap();
        assert_eq!(c.eos_token_ids, vec![2]);
        c.eos_token_ids = vec![engine::tokenizer::BYTE_LEVEL_EOS];
        assert_eq!(c, ModelConfig::from_preset(name).unwrap(), "{name}");
    }
}

/// The same Llama weights read without their `rope_parameters` scaling miss the reference
/// by far more than the tolerance: the numerics check sees the Llama 3 scaling.
#[test]
fn llama_without_its_rope_scaling_is_off() {
    let dir = fixture("llama-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    for f in ["model.safetensors", "reference.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let err = last_logits_error(tmp.path());
    assert!(err > 1e-3, "unscaled RoPE is only {err} off");
}

/// `--device cuda` runs the Llama, Qwen2, Mistral and GPT-2 families: no refusal (on a
/// machine without a GPU the error is the missing driver's).
#[test]
fn cuda_runs_every_decoder_family() {
    let on_cuda = |model: &Path, format| {
        let mut o = opts(model, None, format);
        o.device = Device::Cuda(0);
        o.gpu.memory_utilization = 0.05;
        o.gpu.max_model_len = Some(256);
        load(&o)
    };
    // A tiny Mistral (sliding window) beside the Llama and Qwen2 fixtures.
    let tmp = tempfile::tempdir().unwrap();
    let mistral = r#"{"model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "sliding_window": 4096}"#;
    std::fs::write(tmp.path().join("config.json"), mistral).unwrap();
    for (dir, format) in [
        (fixture("llama-tiny"), LoadFormat::Auto),
        (fixture("qwen2-tiny"), LoadFormat::Auto),
        (fixture("gpt2-tiny"), LoadFormat::Auto),
        (tmp.path().to_path_buf(), LoadFormat::Dummy),
    ] {
        if let Err(e) = on_cuda(&dir, format) {
            let err = format!("{e:#}");
            assert!(!err.contains("does not run"), "{}: {err}", dir.display());
            assert!(
                err.contains("no NVIDIA driver/GPU found") || err.contains("not available"),
                "{}: {err}",
                dir.display()
            );
        }
    }
}

/// The tiny presets run with seeded dummy weights (`--load-format dummy`), as the real
/// ones do on a bigger machine.
#[test]
fn tiny_presets_run_with_dummy_weights() {
    for (name, _) in FIXTURES {
        let logits = |seed: u64| {
            let mut o = opts(Path::new(""), None, LoadFormat::Dummy);
            o.model = format!("preset:{name}");
            o.seed = seed;
            let mut g = generator(load(&o).unwrap());
            g.init_kv_cache(8, 16).unwrap();
            let seq = SeqStep {
                tokens: &[1, 2, 3],
                start_pos: 0,
                block_table: &[5],
                sample: Some(GREEDY),
            };
            g.step_logits(&[seq]).unwrap().remove(0)
        };
        let a = logits(1);
        assert_eq!(a.len(), 512);
        assert!(a.iter().all(|x| x.is_finite()));
        assert_eq!(a, logits(1), "{name}: seeded");
        assert!(max_rel(&a, &logits(2)) > 0.1, "{name}: seed matters");
    }
}
