//! Numerics of the model side against Hugging Face references (`testdata/`, copied from
//! the shared fixtures: transformers for a tiny Qwen3, sentence-transformers for
//! all-MiniLM-L6-v2), and self-consistency of paged attention across chunkings and
//! scattered block tables. Everything goes through `engine::load::load`, the same path
//! as `colocate serve`.

mod common;

use std::path::PathBuf;

use common::*;
use engine::load::{load, LoadFormat};
use engine::model_api::{Generator, SampleSpec, SeqStep, Task};

fn tiny_dir() -> String {
    root().join("testdata/qwen3-tiny").display().to_string()
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = b.iter().map(|y| y * y).sum::<f32>().sqrt();
    diff / norm
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn qwen3_tiny_matches_transformers() {
    let r = reference(&fixture("qwen3-tiny"));
    let loaded = load(&opts(tiny_dir(), Some(Task::Generate), LoadFormat::Auto)).unwrap();
    assert_eq!(loaded.info.eos_token_ids, vec![2]);
    assert_eq!(loaded.info.vocab_size, 512);
    // 2 layers * 2 kv heads * 16 * (K, V) * 4 bytes
    assert_eq!(loaded.info.kv_bytes_per_token, 2 * 2 * 16 * 2 * 4);
    let mut g = generator(loaded);
    g.init_kv_cache(61, 4).unwrap();
    for item in r["items"].as_array().unwrap() {
        let ids = u32s(&item["input_ids"]);
        let table = scattered_table(ids.len().div_ceil(4) + 2, 3, 61);

        // Whole prompt in one prefill: last-position logits.
        let seq = SeqStep {
            tokens: &ids,
            start_pos: 0,
            block_table: &table,
            sample: Some(GREEDY),
        };
        let logits = g.step_logits(&[seq]).unwrap().remove(0);
        let want = f32s(&item["last_logits"]);
        let err = rel_err(&logits, &want);
        eprintln!(
            "qwen3-tiny prompt of {} tokens: last-logits rel err {err:.2e}",
            ids.len()
        );
        assert!(
            err < 1e-4,
            "prompt of {} tokens: logits rel err {err}",
            ids.len()
        );

        // Token by token through the decode path: the argmax at every position.
        let want = u32s(&item["argmax_per_position"]);
        assert_argmax_per_position(&mut *g, &ids, &table, &want, "qwen3-tiny");

        // Greedy generation: prefill samples the first token, decode the rest.
        let want_tokens = u32s(&item["greedy_8"]);
        let got = greedy_tokens(&mut *g, &ids, want_tokens.len());
        assert_eq!(got, want_tokens, "greedy tokens");
    }
}

#[test]
fn qwen3_tiny_embedding_matches_transformers() {
    let r = reference(&fixture("qwen3-tiny"));
    let mut e = embedder(load(&opts(tiny_dir(), Some(Task::Embed), LoadFormat::Auto)).unwrap());
    let items = r["items"].as_array().unwrap();
    let inputs: Vec<Vec<u32>> = items.iter().map(|i| u32s(&i["input_ids"])).collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    // All prompts in one batch: packing must not mix sequences.
    let got = e.embed(&refs).unwrap();
    for (item, emb) in items.iter().zip(&got) {
        let want = f32s(&item["embedding_last_token"]);
        assert!(
            rel_err(emb, &want) < 1e-4,
            "embedding rel err {}",
            rel_err(emb, &want)
        );
        assert!(cosine(emb, &want) > 0.99999);
    }
}

#[test]
fn paged_attention_is_independent_of_chunking_and_block_layout() {
    let mut g = generator(load(&opts("preset:qwen3-tiny", None, LoadFormat::Dummy)).unwrap());
    g.init_kv_cache(97, 4).unwrap();
    let ids: Vec<u32> = (0..37u32).map(|i| (i * 31 + 5) % 256).collect();
    let whole = chunked_logits(&mut *g, &ids, &[37], &scattered_table(10, 1, 97));
    let chunks = chunked_logits(&mut *g, &ids, &[5, 7, 13, 12], &scattered_table(10, 40, 97));
    let mut singles = vec![1; 37];
    singles[0] = 3;
    singles.truncate(35);
    let decode = chunked_logits(&mut *g, &ids, &singles, &scattered_table(10, 77, 97));
    assert!(
        rel_err(&chunks, &whole) < 1e-5,
        "chunked vs whole {}",
        rel_err(&chunks, &whole)
    );
    assert!(
        rel_err(&decode, &whole) < 1e-5,
        "token by token vs whole {}",
        rel_err(&decode, &whole)
    );

    // Two sequences in one step (one prefill chunk with prior context, one decode token)
    // give the same logits as each alone.
    let (batched, other_batched, other_alone) = two_in_one_step(&mut *g, &ids);
    assert!(rel_err(&batched, &whole) < 1e-5);
    assert!(rel_err(&other_batched, &other_alone) < 1e-5);
}

#[test]
fn dummy_weights_are_seeded() {
    let logits = |seed: u64| {
        let mut o = opts("preset:qwen3-tiny", None, LoadFormat::Dummy);
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
    assert_eq!(logits(1), logits(1));
    assert!(rel_err(&logits(1), &logits(2)) > 0.1);
}

#[test]
fn bad_steps_are_errors_not_panics() {
    let mut g = generator(load(&opts("preset:qwen3-tiny", None, LoadFormat::Dummy)).unwrap());
    let seq = SeqStep {
        tokens: &[1, 2],
        start_pos: 0,
        block_table: &[0],
        sample: Some(GREEDY),
    };
    assert!(g
        .step(&[seq])
        .unwrap_err()
        .to_string()
        .contains("init_kv_cache"));
    g.init_kv_cache(4, 4).unwrap();
    let bad_token = SeqStep {
        tokens: &[100_000],
        start_pos: 0,
        block_table: &[0],
        sample: Some(GREEDY),
    };
    assert!(g
        .step(&[bad_token])
        .unwrap_err()
        .to_string()
        .contains("token id"));
    let short_table = SeqStep {
        tokens: &[1; 9],
        start_pos: 0,
        block_table: &[0, 1],
        sample: Some(GREEDY),
    };
    assert!(g.step(&[short_table]).is_err());
    let bad_block = SeqStep {
        tokens: &[1],
        start_pos: 0,
        block_table: &[9],
        sample: Some(GREEDY),
    };
    assert!(g
        .step(&[bad_block])
        .unwrap_err()
        .to_string()
        .contains("block id"));
}

#[test]
fn load_errors_name_the_path_or_flag() {
    let err = load(&opts("/nonexistent/model", None, LoadFormat::Auto))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("/nonexistent/model"), "{err:#}");
    let err = load(&opts("preset:qwen3-99b", None, LoadFormat::Dummy))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("qwen3-tiny"),
        "lists presets: {err:#}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = load(&opts(dir.path().to_str().unwrap(), None, LoadFormat::Auto))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
    // Config fine but no weights: the message says so and names the folder.
    std::fs::copy(
        root().join("testdata/qwen3-tiny/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load(&opts(dir.path().to_str().unwrap(), None, LoadFormat::Auto))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("model.safetensors"), "{err:#}");
    // ... and the same folder loads with dummy weights.
    assert!(load(&opts(dir.path().to_str().unwrap(), None, LoadFormat::Dummy)).is_ok());
}

/// `--tokenizer` gives a preset (no files) a real tokenizer: prompts are counted as the real
/// model counts them, and the preset keeps its own end-of-sequence ids; a tokenizer larger
/// than the model's vocabulary is refused by the flag's name.
#[test]
fn the_tokenizer_flag_gives_a_preset_real_prompt_lengths() {
    let bytes = load(&opts("preset:qwen3-tiny", None, LoadFormat::Dummy)).unwrap();
    assert!(bytes.tokenizer.is_byte_level());
    let mut o = opts("preset:qwen3-tiny", None, LoadFormat::Dummy);
    o.tokenizer = Some(root().join("testdata/gpt2-tiny"));
    let real = load(&o).unwrap();
    assert!(!real.tokenizer.is_byte_level());
    let text = "hello world, hello world";
    let (n_real, n_bytes) = (
        real.tokenizer.encode(text, false).unwrap().len(),
        bytes.tokenizer.encode(text, false).unwrap().len(),
    );
    assert!(n_real < n_bytes, "{n_real} tokens against {n_bytes} bytes");
    let preset = engine::model::config::ModelConfig::from_preset("qwen3-tiny").unwrap();
    assert_eq!(real.info.eos_token_ids, preset.eos_token_ids);

    // 600 words: more ids than qwen3-tiny's 512.
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..600).map(|i| (format!("w{i}"), i.into())).collect();
    let big = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), big.to_string()).unwrap();
    o.tokenizer = Some(dir.path().to_path_buf());
    let err = format!("{:#}", load(&o).err().unwrap());
    assert!(
        err.starts_with("--tokenizer ") && err.contains("600 tokens") && err.contains("512"),
        "{err}"
    );
}

/// A BERT-family fixture (`testdata/{bert,roberta,distilbert}-tiny`, made by transformers:
/// scripts/gpu/make-encoder-fixtures.py): every input in one batch, each embedding against
/// the one transformers computed for that input alone.
fn encoder_matches_transformers(name: &str, arch: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let loaded = load(&opts(&dir, None, LoadFormat::Auto)).unwrap();
    assert_eq!(loaded.info.task, Task::Embed);
    assert_eq!(loaded.info.architecture, arch);
    let mut e = embedder(loaded);
    let items = r["items"].as_array().unwrap();
    let inputs: Vec<Vec<u32>> = items.iter().map(|i| u32s(&i["input_ids"])).collect();
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let got = e.embed(&refs).unwrap();
    assert_eq!(got.len(), items.len());
    for (item, emb) in items.iter().zip(&got) {
        let want = f32s(&item["embedding"]);
        let err = rel_err(emb, &want);
        assert!(err < 1e-4, "{name}: embedding rel err {err}");
    }
}

#[test]
fn bert_tiny_matches_transformers() {
    encoder_matches_transformers("bert-tiny", "bert");
}

/// RoBERTa's positions start at pad_token_id + 1: a table read from row 0 fails this.
#[test]
fn roberta_tiny_matches_transformers() {
    encoder_matches_transformers("roberta-tiny", "roberta");
}

/// DistilBERT's names and its missing token types.
#[test]
fn distilbert_tiny_matches_transformers() {
    encoder_matches_transformers("distilbert-tiny", "distilbert");
}

fn fetch_minilm() -> PathBuf {
    let status = std::process::Command::new("bash")
        .arg("scripts/fetch-minilm.sh")
        .current_dir(root())
        .status()
        .expect("run scripts/fetch-minilm.sh");
    assert!(status.success(), "scripts/fetch-minilm.sh failed");
    root().join("models/all-minilm-l6-v2")
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = fetch_minilm();
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/minilm-reference.json")).unwrap(),
    )
    .unwrap();
    let loaded = load(&opts(dir.to_str().unwrap(), None, LoadFormat::Auto)).unwrap();
    assert_eq!(loaded.info.task, Task::Embed);
    assert_eq!(loaded.info.kv_bytes_per_token, 0);
    let tok = loaded.tokenizer.clone();
    let mut e = embedder(loaded);
    let items = r["items"].as_array().unwrap();
    let mut inputs = Vec::new();
    for item in items {
        let ids = tok.encode(item["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(ids, u32s(&item["input_ids"]), "ids of {:?}", item["text"]);
        inputs.push(ids);
    }
    // The reference describes its input as "token repeated 400 times".
    assert_eq!(r["truncation"]["text"], "token repeated 400 times");
    let long = tok.encode(&vec!["token"; 400].join(" "), true).unwrap();
    assert_eq!(
        long.len(),
        r["max_seq_length"].as_u64().unwrap() as usize,
        "truncated to max_seq_length"
    );
    assert_eq!(*long.last().unwrap(), 102, "[SEP] kept after truncation");
    inputs.push(long);
    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
    let got = e.embed(&refs).unwrap();
    let mut wants: Vec<Vec<f32>> = items.iter().map(|i| f32s(&i["embedding"])).collect();
    wants.push(f32s(&r["truncation"]["embedding"]));
    for (n, (g, w)) in got.iter().zip(&wants).enumerate() {
        let c = cosine(g, w);
        eprintln!(
            "minilm input {n} ({} tokens): cosine {c:.7}",
            inputs[n].len()
        );
        assert!(c >= 0.9999, "input {n}: cosine {c}");
    }
}

#[test]
fn generator_sampling_follows_the_logits() {
    let mut g = generator(load(&opts("preset:qwen3-tiny", None, LoadFormat::Dummy)).unwrap());
    g.init_kv_cache(16, 8).unwrap();
    let ids: Vec<u32> = b"the quick brown fox"
        .iter()
        .map(|&b| u32::from(b))
        .collect();
    let run = |g: &mut Box<dyn Generator>, spec: SampleSpec<'_>| {
        let seq = SeqStep {
            tokens: &ids,
            start_pos: 0,
            block_table: &[3, 9, 1],
            sample: Some(spec),
        };
        g.step(&[seq]).unwrap()[0]
    };
    let seq = SeqStep {
        tokens: &ids,
        start_pos: 0,
        block_table: &[3, 9, 1],
        sample: Some(GREEDY),
    };
    let logits = g.step_logits(&[seq]).unwrap().remove(0);
    let best = argmax(&logits);
    assert_eq!(run(&mut g, GREEDY), best, "greedy = argmax");
    // Masking the argmax picks the runner-up.
    let mut without = logits.clone();
    without[best as usize] = f32::NEG_INFINITY;
    let masked = [best];
    assert_eq!(
        run(
            &mut g,
            SampleSpec {
                masked: &masked,
                ..GREEDY
            }
        ),
        argmax(&without)
    );
    let hot = SampleSpec {
        temperature: 5.0,
        top_p: 1.0,
        top_k: 0,
        uniform: 0.0,
        masked: &masked,
    };
    for i in 0..20 {
        let spec = SampleSpec {
            uniform: i as f32 / 20.0,
            ..hot
        };
        let t = run(&mut g, spec);
        assert_ne!(t, best, "masked id chosen");
        assert_eq!(t, run(&mut g, spec), "same uniform, same token");
    }
    assert_eq!(
        run(&mut g, SampleSpec { top_k: 1, ..hot }),
        argmax(&without),
        "top_k 1 = greedy"
    );
}

/// The sampling rule's all-masked case through the generator: a mask of every id is
/// dropped, so the step neither fails nor changes the token (greedy and sampled alike).
#[test]
fn a_mask_of_every_id_is_dropped() {
    let mut g = generator(load(&opts("preset:qwen3-tiny", None, LoadFormat::Dummy)).unwrap());
    g.init_kv_cache(16, 8).unwrap();
    let ids: Vec<u32> = b"every id masked".iter().map(|&b| u32::from(b)).collect();
    let everything: Vec<u32> = (0..512).collect();
    let mut run = |spec: SampleSpec<'_>| {
        let seq = SeqStep {
            tokens: &ids,
            start_pos: 0,
            block_table: &[2, 5],
            sample: Some(spec),
        };
        g.step(&[seq]).unwrap()[0]
    };
    let hot = SampleSpec {
        temperature: 1.2,
        top_p: 0.95,
        top_k: 50,
        uniform: 0.0,
        masked: &[],
    };
    for spec in [
        GREEDY,
        hot,
        SampleSpec {
            uniform: 0.7,
            ..hot
        },
    ] {
        let all = SampleSpec {
            masked: &everything,
            ..spec
        };
        assert_eq!(run(all), run(spec), "{spec:?}");
    }
}

/// Rewrites the tiny Qwen3 as two shards with an index, the second shard in bf16 (and
/// one tensor in f16): the loader must follow the index and convert dtypes.
#[test]
fn sharded_mixed_dtype_checkpoint_loads() {
    use safetensors::{tensor::TensorView, Dtype, SafeTensors};
    let src = root().join("testdata/qwen3-tiny");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    let convert = |name: &str, data: &[u8]| -> (Dtype, Vec<u8>) {
        let floats = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        if name.contains("q_proj") {
            (
                Dtype::F16,
                floats
                    .flat_map(|x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
            )
        } else {
            (
                Dtype::BF16,
                floats
                    .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            )
        }
    };
    for (file, part, reduce) in [
        ("model-00001-of-00002.safetensors", first, false),
        ("model-00002-of-00002.safetensors", second, true),
    ] {
        let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|n| {
                let t = st.tensor(n).unwrap();
                let (dtype, data) = if reduce {
                    convert(n, t.data())
                } else {
                    (Dtype::F32, t.data().to_vec())
                };
                (n.clone(), dtype, t.shape().to_vec(), data)
            })
            .collect();
        let views = owned
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
        safetensors::serialize_to_file(views, &None, &dir.path().join(file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let logits_of = |model: &str| {
        let mut g = generator(load(&opts(model, None, LoadFormat::Auto)).unwrap());
        g.init_kv_cache(8, 8).unwrap();
        let seq = SeqStep {
            tokens: &[3, 1, 4, 1, 5, 9, 2, 6],
            start_pos: 0,
            block_table: &[2],
            sample: Some(GREEDY),
        };
        g.step_logits(&[seq]).unwrap().remove(0)
    };
    let full = logits_of(&tiny_dir());
    let sharded = logits_of(dir.path().to_str().unwrap());
    let err = rel_err(&sharded, &full);
    // bf16 keeps 8 bits of mantissa: close to f32, but not identical (so conversion ran).
    assert!(
        err > 1e-6 && err < 3e-2,
        "sharded bf16/f16 vs f32 rel err {err}"
    );
}
