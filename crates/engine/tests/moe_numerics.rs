//! Qwen3-MoE on the CPU against transformers (issue 17): the tiny MoE fixtures of
//! `testdata/qwen3-moe-tiny` (float32) and `testdata/qwen3-moe-tiny-fp8` (block-FP8, its
//! reference computed by transformers from the dequantised weights), made by
//! `scripts/gpu/make-moe-fixture.py`: 3 layers (layer 1 dense), 8 experts, top 2. Last-token
//! logits within 1e-4 relative (max abs diff / max abs), the argmax at every position
//! through the decode path, 8 greedy tokens, the pooled embedding; the FP8 load against a
//! dequantisation by hand; and the errors a user's folder can cause. Everything goes
//! through `engine::load::load`, the same path as `colocate serve`.

mod common;

use std::path::Path;

use common::*;

use engine::backend::cpu::CpuBackend;
use engine::backend::{Backend, Init};
use engine::load::{load, Device, LoadFormat, LoadOptions};
use engine::model::config::ModelConfig;
use engine::model_api::{SeqStep, Task};
use engine::weights::WeightSource;

/// Every reference check of one fixture folder as a generator: last-token logits of the
/// whole prompt in one prefill, the argmax at every position token by token, and 8 greedy
/// tokens. Returns the worst last-logits relative difference.
fn matches_transformers(dir: &Path) -> f32 {
    let r = reference(dir);
    let loaded = load(&opts(dir, Some(Task::Generate), LoadFormat::Auto)).unwrap();
    assert_eq!(loaded.info.architecture, "qwen3_moe");
    assert_eq!(loaded.info.eos_token_ids, vec![2]);
    // 3 layers x 2 kv heads x 16 x (K, V) x 4 bytes: experts add no KV.
    assert_eq!(loaded.info.kv_bytes_per_token, 3 * 2 * 16 * 2 * 4);
    let mut g = generator(loaded);
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
        let err = max_rel(&logits, &f32s(&item["last_logits"]));
        eprintln!(
            "{}: prompt of {} tokens, last-logits max rel diff {err:.2e}",
            dir.display(),
            ids.len()
        );
        assert!(err < 1e-4, "prompt of {} tokens: {err}", ids.len());
        worst = worst.max(err);

        assert_argmax_per_position(&mut *g, &ids, &table, &u32s(&item["argmax"]), "moe");
        let want_tokens = u32s(&item["greedy"]);
        let got = greedy_tokens(&mut *g, &ids, want_tokens.len());
        assert_eq!(got, want_tokens, "greedy tokens");
    }
    worst
}

/// All prompts embedded in one batch (last-token pooling, L2-normalised).
fn embeds_as_transformers(dir: &Path) {
    let r = reference(dir);
    let mut e = embedder(load(&opts(dir, Some(Task::Embed), LoadFormat::Auto)).unwrap());
    let items = r["items"].as_array().unwrap();
    let inputs: Vec<Vec<u32>> = items.iter().map(|i| u32s(&i["input_ids"])).collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    for (item, emb) in items.iter().zip(e.embed(&refs).unwrap()) {
        let err = max_rel(&emb, &f32s(&item["embedding"]));
        assert!(
            err < 1e-4,
            "{}: embedding max rel diff {err}",
            dir.display()
        );
    }
}

#[test]
fn qwen3_moe_tiny_matches_transformers() {
    let worst = matches_transformers(&fixture("qwen3-moe-tiny"));
    eprintln!("qwen3-moe-tiny: worst last-logits max rel diff {worst:.2e}");
}

#[test]
fn qwen3_moe_tiny_fp8_matches_transformers_on_its_dequantised_weights() {
    let worst = matches_transformers(&fixture("qwen3-moe-tiny-fp8"));
    eprintln!("qwen3-moe-tiny-fp8: worst last-logits max rel diff {worst:.2e}");
}

#[test]
fn qwen3_moe_tiny_embeddings_match_transformers() {
    embeds_as_transformers(&fixture("qwen3-moe-tiny"));
    embeds_as_transformers(&fixture("qwen3-moe-tiny-fp8"));
}

/// e4m3fn by its definition, written apart from the engine's table.
fn e4m3(b: u8) -> f32 {
    let (e, m) = (i32::from((b >> 3) & 0xf), f32::from(b & 7));
    let mag = if e == 0 {
        m / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    if b & 0x80 != 0 {
        -mag
    } else {
        mag
    }
}

/// Every FP8 tensor of the fixture, loaded as the model loads it, equals its e4m3 values
/// times its block's `weight_scale_inv`, computed here; and it is the float32 checkpoint's
/// weight up to e4m3 rounding (3 mantissa bits: within 1/16 of the block's largest value).
#[test]
fn fp8_load_is_the_dequantised_checkpoint() {
    use safetensors::{Dtype, SafeTensors};
    let dir = fixture("qwen3-moe-tiny-fp8");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let [br, bc] = config.fp8.as_ref().unwrap().block;
    let src = WeightSource::open_model(&dir, &config).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32_bytes = std::fs::read(fixture("qwen3-moe-tiny").join("model.safetensors")).unwrap();
    let original = SafeTensors::deserialize(&f32_bytes).unwrap();
    let floats = |data: &[u8]| -> Vec<f32> {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let b = CpuBackend::new();
    let mut checked = 0;
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F8_E4M3 {
            continue;
        }
        let (rows, cols) = (view.shape()[0], view.shape()[1]);
        let scale = st.tensor(&format!("{name}_scale_inv")).unwrap();
        assert_eq!(scale.shape(), [rows.div_ceil(br), cols.div_ceil(bc)]);
        let scale = floats(scale.data());
        let want: Vec<f32> = view
            .data()
            .iter()
            .enumerate()
            .map(|(i, &q)| e4m3(q) * scale[(i / cols / br) * cols.div_ceil(bc) + (i % cols) / bc])
            .collect();
        let t = src
            .get(&b, std::slice::from_ref(&name), rows, cols, Init::Zeros)
            .unwrap();
        let got = b.to_host(&t).unwrap();
        assert_eq!(got, want, "{name}");
        let orig = floats(original.tensor(&name).unwrap().data());
        let amax = orig.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(&orig)
            .fold(0f32, |m, (a, o)| m.max((a - o).abs()));
        assert!(err <= amax / 16.0, "{name}: {err} against amax {amax}");
        checked += 1;
    }
    // 3 layers x 4 attention projections + 2 sparse layers x 8 experts x 3 + 3 dense.
    assert_eq!(checked, 3 * 4 + 2 * 8 * 3 + 3);
}

/// Routing is per token: the same logits whether a prompt comes whole, in chunks, or
/// beside another sequence in one step (the experts then serve tokens of both).
#[test]
fn moe_steps_are_independent_of_chunking_and_batching() {
    let o = LoadOptions {
        model: "preset:qwen3-moe-tiny".into(),
        ..opts(Path::new(""), None, LoadFormat::Dummy)
    };
    let mut g = generator(load(&o).unwrap());
    g.init_kv_cache(97, 4).unwrap();
    let ids: Vec<u32> = (0..37u32).map(|i| (i * 31 + 5) % 256).collect();
    let whole = chunked_logits(&mut *g, &ids, &[37], &scattered_table(10, 1, 97));
    let chunks = chunked_logits(&mut *g, &ids, &[5, 7, 13, 12], &scattered_table(10, 40, 97));
    assert!(max_rel(&chunks, &whole) < 1e-5);
    let (batched, other_batched, other_alone) = two_in_one_step(&mut *g, &ids);
    assert!(max_rel(&batched, &whole) < 1e-5);
    assert!(max_rel(&other_batched, &other_alone) < 1e-5);
}

/// `--load-format dummy` with an FP8 config: random weights of the right shapes (the
/// dummy path never sees FP8), and the preset loads the same way.
#[test]
fn fp8_config_loads_with_dummy_weights() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("qwen3-moe-tiny-fp8").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut g = generator(load(&opts(dir.path(), None, LoadFormat::Dummy)).unwrap());
    g.init_kv_cache(8, 8).unwrap();
    let seq = SeqStep {
        tokens: &[3, 1, 4, 1, 5],
        start_pos: 0,
        block_table: &[2],
        sample: Some(GREEDY),
    };
    let l = g.step_logits(&[seq]).unwrap().remove(0);
    assert_eq!(l.len(), 512);
    assert!(l.iter().all(|x| x.is_finite()));
}

/// What a user's folder or flags can get wrong is an error that says what, never a panic.
#[test]
fn moe_errors_name_the_problem() {
    // MoE and FP8 on CUDA are no longer refused by name: a GPU machine loads them
    // (tests/cuda_engine.rs), one without a GPU says that.
    for name in ["qwen3-moe-tiny", "qwen3-moe-tiny-fp8"] {
        let mut o = opts(fixture(name), None, LoadFormat::Auto);
        o.device = Device::Cuda(0);
        if let Err(e) = load(&o) {
            let err = format!("{e:#}");
            assert!(
                !err.contains("CPU only") && (err.contains("NVIDIA") || err.contains("cuda")),
                "{err}"
            );
        }
    }

    // An FP8 checkpoint missing one scale tensor.
    use safetensors::{tensor::TensorView, SafeTensors};
    let src = fixture("qwen3-moe-tiny-fp8");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dropped = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv";
    let write = |dir: &Path, skip: &str, config: &str| {
        std::fs::write(dir.join("config.json"), config).unwrap();
        let views = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != skip)
            .map(|(n, v)| {
                (
                    n,
                    TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).unwrap(),
                )
            });
        safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
    };
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), dropped, &config);
    let err = format!(
        "{:#}",
        load(&opts(dir.path(), None, LoadFormat::Auto))
            .err()
            .unwrap()
    );
    assert!(err.contains(dropped) && err.contains("is not in"), "{err}");

    // FP8 tensors but no quantization_config to say their block size.
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    let mut plain = v.clone();
    plain.as_object_mut().unwrap().remove("quantization_config");
    write(dir.path(), "", &plain.to_string());
    let err = format!(
        "{:#}",
        load(&opts(dir.path(), None, LoadFormat::Auto))
            .err()
            .unwrap()
    );
    assert!(err.contains("no quantization_config"), "{err}");

    // A block size the scales do not fit.
    let mut wrong = v.clone();
    wrong["quantization_config"]["weight_block_size"] = serde_json::json!([16, 16]);
    write(dir.path(), "", &wrong.to_string());
    let err = format!(
        "{:#}",
        load(&opts(dir.path(), None, LoadFormat::Auto))
            .err()
            .unwrap()
    );
    assert!(err.contains("weight_scale_inv: shape"), "{err}");

    // A bad MoE field in config.json.
    let mut bad = v;
    bad["num_experts_per_tok"] = serde_json::json!(9);
    std::fs::write(dir.path().join("config.json"), bad.to_string()).unwrap();
    let err = format!(
        "{:#}",
        load(&opts(dir.path(), None, LoadFormat::Auto))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("num_experts_per_tok 9") && err.contains("config.json"),
        "{err}"
    );
}
