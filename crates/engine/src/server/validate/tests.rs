//! Validation without HTTP: the limits one by one, then property tests feeding arbitrary
//! bytes and JSON to every parser (never a panic; a job or a 4xx error body) and valid
//! requests through a serialise/parse round trip.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

const MAX_LEN: usize = 64;
const VOCAB: usize = 300;

fn info(task: Task, architecture: &str) -> ModelInfo {
    ModelInfo {
        architecture: architecture.into(),
        task,
        vocab_size: VOCAB,
        max_position_embeddings: 4096,
        eos_token_ids: vec![256],
        kv_bytes_per_token: 8,
        weight_bytes: 0,
    }
}

/// Runs `f` with a view of a model of `task` / `architecture` served as `m`.
fn with_view<R>(task: Task, architecture: &str, f: impl FnOnce(&ModelView<'_>) -> R) -> R {
    let info = info(task, architecture);
    let tok = Tokenizer::byte_level();
    f(&ModelView {
        served_model_name: "m",
        info: &info,
        max_model_len: MAX_LEN,
        tokenizer: &tok,
    })
}

fn gen(body: Value) -> Checked<GenJob> {
    with_view(Task::Generate, "qwen3", |v| {
        completion(body.to_string().as_bytes(), v)
    })
}

fn chat_req(body: Value) -> Checked<GenJob> {
    with_view(Task::Generate, "qwen3", |v| {
        chat(body.to_string().as_bytes(), v)
    })
}

fn embed(architecture: &str, body: Value) -> Checked<EmbedJob> {
    with_view(Task::Embed, architecture, |v| {
        embedding(body.to_string().as_bytes(), v)
    })
}

/// The error of `r`, checked to be a 400 about `param`.
fn err_400<T: std::fmt::Debug>(r: Checked<T>, param: &str) -> String {
    let e = r.expect_err("expected an error");
    assert_eq!(e.status(), 400, "{e}");
    assert_eq!(e.error.param.as_deref(), Some(param), "{e}");
    e.error.message
}

#[test]
fn max_tokens_past_the_context_is_400_naming_both_numbers() {
    let m = err_400(
        gen(json!({"prompt": "abc", "max_tokens": 1_000_000_000_000_i64})),
        "max_tokens",
    );
    assert!(
        m.contains("1000000000000") && m.contains("64") && m.contains("--max-model-len"),
        "{m}"
    );
    // The room left is fine, one more is not.
    assert_eq!(
        gen(json!({"prompt": "abc", "max_tokens": 61}))
            .unwrap()
            .params
            .max_tokens,
        61
    );
    err_400(
        gen(json!({"prompt": "abc", "max_tokens": 62})),
        "max_tokens",
    );
    assert_eq!(
        gen(json!({"prompt": "abc"})).unwrap().params.max_tokens,
        61,
        "default: the room left"
    );
    let m = err_400(
        chat_req(json!({"messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 100000})),
        "max_completion_tokens",
    );
    assert!(m.contains("100000"), "{m}");
}

#[test]
fn sampling_numbers_out_of_range_are_400() {
    for (body, param) in [
        (json!({"prompt": "a", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "a", "max_tokens": -5}), "max_tokens"),
        (json!({"prompt": "a", "n": 0}), "n"),
        (json!({"prompt": "a", "n": 3}), "n"),
        (json!({"prompt": "a", "top_k": -2}), "top_k"),
        (json!({"prompt": "a", "top_p": 0}), "top_p"),
        (json!({"prompt": "a", "top_p": 1.5}), "top_p"),
        (json!({"prompt": "a", "temperature": -0.1}), "temperature"),
        (json!({"prompt": "a", "temperature": 1e300}), "temperature"),
        (
            json!({"prompt": "a", "max_tokens": 2, "min_tokens": 3}),
            "min_tokens",
        ),
        (json!({"prompt": [1, 2, 300]}), "prompt"),
        (json!({"prompt": "a", "cache_salt": ""}), "cache_salt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "x".repeat(MAX_LEN)}), "prompt"),
    ] {
        err_400(gen(body.clone()), param);
    }
    // Off-range numbers that are still meaningful are accepted and bounded.
    let j = gen(json!({"prompt": "a", "top_k": i64::MAX, "seed": u64::MAX, "n": 1})).unwrap();
    assert_eq!(j.params.top_k, VOCAB);
    assert_eq!(j.params.seed, Some(u64::MAX));
    let j = gen(json!({"prompt": "a", "cache_salt": "tenant-a"})).unwrap();
    assert_eq!(j.params.cache_salt.as_deref(), Some("tenant-a"));
}

#[test]
fn numbers_json_cannot_hold_are_400_not_panics() {
    for body in [
        r#"{"prompt": "a", "temperature": 1e999}"#,
        r#"{"prompt": "a", "max_tokens": 1e12}"#,
        r#"{"prompt": "a", "max_tokens": 99999999999999999999999}"#,
        r#"{"prompt": "a", "seed": -1}"#,
        r#"{"prompt": "a", "n": 4294967296}"#,
        r#"{"prompt": "a", "min_tokens": -1}"#,
        r#"{"prompt": [4294967296]}"#,
        r#"{"prompt": "a", "temperature": NaN}"#,
    ] {
        let e =
            with_view(Task::Generate, "qwen3", |v| completion(body.as_bytes(), v)).expect_err(body);
        assert_eq!(e.status(), 400, "{body}: {e}");
    }
}

#[test]
fn stop_strings_are_bounded() {
    let many: Vec<String> = (0..=MAX_STOP_STRINGS).map(|i| i.to_string()).collect();
    let m = err_400(gen(json!({"prompt": "a", "stop": many})), "stop");
    assert!(m.contains(&MAX_STOP_STRINGS.to_string()), "{m}");
    let long = "s".repeat(MAX_STOP_BYTES + 1);
    err_400(gen(json!({"prompt": "a", "stop": long})), "stop");
    let ok = gen(json!({"prompt": "a", "stop": ["x", ""]})).unwrap();
    assert_eq!(ok.params.stop, vec!["x".to_string()]);
}

#[test]
fn malformed_bodies_are_400() {
    let deep_array = "[".repeat(100_000);
    let deep_content = format!(
        r#"{{"messages": [{{"role": "user", "content": {}"x"{}}}]}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
        br#"{"prompt": "\ud800"}"#.to_vec(),
        deep_array.into_bytes(),
        format!(r#"{{"prompt": {}1{}}}"#, "[".repeat(200), "]".repeat(200)).into_bytes(),
        deep_content.into_bytes(),
    ];
    for b in &bodies {
        let shown = String::from_utf8_lossy(&b[..b.len().min(40)]).into_owned();
        with_view(Task::Generate, "qwen3", |v| {
            assert_eq!(completion(b, v).unwrap_err().status(), 400, "{shown}");
            assert_eq!(chat(b, v).unwrap_err().status(), 400, "{shown}");
        });
        with_view(Task::Embed, "qwen3", |v| {
            assert_eq!(embedding(b, v).unwrap_err().status(), 400, "{shown}");
        });
    }
}

#[test]
fn unknown_fields_are_ignored_and_nulls_are_defaults() {
    let j = gen(
        json!({"prompt": "a", "max_tokens": 2, "logprobs": 1e12, "echo": true,
        "best_of": -4, "stream": null, "model": null}),
    )
    .unwrap();
    assert!(!j.stream);
    assert_eq!(j.params.max_tokens, 2);
}

#[test]
fn model_and_task_are_checked() {
    let e = gen(json!({"model": "other", "prompt": "a"})).unwrap_err();
    assert_eq!(e.status(), 404);
    assert!(embed("qwen3", json!({"input": "a", "model": "m"})).is_ok());
    let m = err_400(
        with_view(Task::Generate, "qwen3", |v| {
            embedding(br#"{"input": "a"}"#, v)
        }),
        "model",
    );
    assert!(m.contains("generation model"), "{m}");
}

#[test]
fn chat_content_parts_other_than_text_are_400() {
    let m = err_400(
        chat_req(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]})),
        "messages",
    );
    assert!(m.contains("image_url"), "{m}");
    let j = chat_req(json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}]}], "max_tokens": 3}))
    .unwrap();
    assert_eq!(j.params.max_tokens, 3);
    err_400(chat_req(json!({"messages": []})), "messages");
}

#[test]
fn embedding_inputs_are_bounded() {
    let many = vec!["a"; MAX_EMBEDDING_INPUTS + 1];
    let m = err_400(embed("qwen3", json!({"input": many})), "input");
    assert!(m.contains("2048"), "{m}");
    let j = embed("qwen3", json!({"input": vec!["a"; MAX_EMBEDDING_INPUTS]})).unwrap();
    assert_eq!(j.inputs.len(), MAX_EMBEDDING_INPUTS);
    err_400(embed("qwen3", json!({"input": [[1, 2], [300]]})), "input");
    err_400(embed("qwen3", json!({"input": [[1], []]})), "input");
    err_400(embed("qwen3", json!({"input": ""})), "input");
    err_400(embed("qwen3", json!({"input": []})), "input");
    err_400(
        embed("qwen3", json!({"input": "x".repeat(MAX_LEN + 1)})),
        "input",
    );
    err_400(
        embed("qwen3", json!({"input": "a", "encoding_format": "bytes"})),
        "encoding_format",
    );
}

#[test]
fn dimensions_only_for_matryoshka_models() {
    let m = err_400(
        embed("bert", json!({"input": "a", "dimensions": 8})),
        "dimensions",
    );
    assert!(m.contains("matryoshka"), "{m}");
    err_400(
        embed("qwen3", json!({"input": "a", "dimensions": 0})),
        "dimensions",
    );
    err_400(
        embed("qwen3", json!({"input": "a", "dimensions": -3})),
        "dimensions",
    );
    let j = embed(
        "qwen3",
        json!({"input": "a", "dimensions": 2, "encoding_format": "base64"}),
    )
    .unwrap();
    assert_eq!(j.dimensions, Some(2));
    assert_eq!(j.format, EncodingFormat::Base64);
}

#[test]
fn shaping_truncates_renormalises_and_encodes() {
    let job = |format, dimensions| EmbedJob {
        inputs: vec![],
        format,
        dimensions,
    };
    let v = vec![vec![0.6, 0.0, 0.8], vec![0.0, 0.0, 1.0]];
    let out = shape_embeddings(v.clone(), &job(EncodingFormat::Float, Some(1))).unwrap();
    assert_eq!(out[0].embedding.to_floats().unwrap(), vec![1.0]);
    assert_eq!(
        out[1].embedding.to_floats().unwrap(),
        vec![0.0],
        "zero stays zero"
    );
    assert_eq!(out[1].index, 1);
    let out = shape_embeddings(v.clone(), &job(EncodingFormat::Base64, None)).unwrap();
    assert!(matches!(
        out[0].embedding,
        openai::EmbeddingVector::Base64(_)
    ));
    assert_eq!(out[0].embedding.to_floats().unwrap(), v[0]);
    let e = shape_embeddings(v, &job(EncodingFormat::Float, Some(4))).unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.error.message.contains('3'), "{e}");
}

/// Any JSON value, nested a few levels, with the keys the parsers look at made likely.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        (0u32..400).prop_map(Value::from),
    ];
    let keys = prop_oneof![
        Just("prompt".to_string()),
        Just("messages".to_string()),
        Just("input".to_string()),
        Just("role".to_string()),
        Just("content".to_string()),
        Just("type".to_string()),
        Just("text".to_string()),
        Just("max_tokens".to_string()),
        Just("min_tokens".to_string()),
        Just("n".to_string()),
        Just("top_k".to_string()),
        Just("top_p".to_string()),
        Just("temperature".to_string()),
        Just("stop".to_string()),
        Just("dimensions".to_string()),
        Just("encoding_format".to_string()),
        Just("model".to_string()),
        any::<String>(),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Feeds `body` to every parser (as generator and as embedder) and checks the outcome:
/// a job within the limits, or a 4xx error body with a message.
fn check_all_parsers(body: &[u8]) {
    with_view(Task::Generate, "qwen3", |v| {
        for r in [completion(body, v), chat(body, v)] {
            match r {
                Ok(j) => {
                    assert!(!j.prompt.is_empty());
                    assert!(j.prompt.len() + j.params.max_tokens <= MAX_LEN);
                    assert!(j.params.min_tokens <= j.params.max_tokens);
                    assert!(j.prompt.iter().all(|&t| (t as usize) < VOCAB));
                }
                Err(e) => check_error(&e),
            }
        }
    });
    for arch in ["qwen3", "bert"] {
        with_view(Task::Embed, arch, |v| match embedding(body, v) {
            Ok(j) => {
                assert!(!j.inputs.is_empty() && j.inputs.len() <= MAX_EMBEDDING_INPUTS);
                assert!(j.inputs.iter().all(|i| !i.is_empty() && i.len() <= MAX_LEN));
            }
            Err(e) => check_error(&e),
        });
    }
}

fn check_error(e: &ErrorBody) {
    assert!(matches!(e.status(), 400 | 404), "{e}");
    assert!(!e.error.message.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        check_all_parsers(&body);
    }

    #[test]
    fn arbitrary_json_never_panics(v in any_json()) {
        check_all_parsers(v.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_request_objects_never_panic(
        prompt in any_json(),
        max_tokens in any::<i64>(),
        top_k in any::<i64>(),
        n in any::<u32>(),
        temperature in any::<f32>(),
        top_p in any::<f32>(),
        min_tokens in any::<u32>(),
        dimensions in any::<i64>(),
    ) {
        let body = json!({
            "prompt": prompt, "input": prompt, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "top_k": top_k, "n": n, "temperature": temperature,
            "top_p": top_p, "min_tokens": min_tokens, "dimensions": dimensions,
        });
        check_all_parsers(body.to_string().as_bytes());
    }

    #[test]
    fn valid_completion_requests_round_trip_and_validate(
        prompt in prop::collection::vec(0u32..VOCAB as u32, 1..32),
        max_tokens in 1i64..=32,
        temperature in 0.0f32..2.0,
        top_k in -1i64..1000,
        seed in any::<u64>(),
        stop in prop::collection::vec(any::<String>(), 0..4),
        stream in any::<bool>(),
    ) {
        let req = openai::CompletionRequest {
            prompt: Input::Tokens(prompt.clone()),
            max_tokens: Some(max_tokens),
            temperature: Some(temperature),
            top_k: Some(top_k),
            seed: Some(seed),
            stop: Some(openai::Stop::Many(stop)),
            stream,
            ..Default::default()
        };
        let bytes = serde_json::to_vec(&req).unwrap();
        let back: openai::CompletionRequest = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&back, &req);
        let job = with_view(Task::Generate, "qwen3", |v| completion(&bytes, v));
        let job = job.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(job.prompt, prompt);
        prop_assert_eq!(job.params.max_tokens, max_tokens as usize);
        prop_assert_eq!(job.params.seed, Some(seed));
        prop_assert_eq!(job.stream, stream);
    }

    #[test]
    fn valid_embedding_requests_round_trip_and_validate(
        inputs in prop::collection::vec(prop::collection::vec(0u32..VOCAB as u32, 1..16), 1..8),
        base64 in any::<bool>(),
    ) {
        let mut req = openai::EmbeddingRequest::new("m", Input::TokenLists(inputs.clone()));
        req.encoding_format = Some(if base64 { "base64" } else { "float" }.into());
        let bytes = serde_json::to_vec(&req).unwrap();
        let back: openai::EmbeddingRequest = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(&back, &req);
        let job = with_view(Task::Embed, "bert", |v| embedding(&bytes, v));
        let job = job.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(job.inputs, inputs);
        let format = if base64 { EncodingFormat::Base64 } else { EncodingFormat::Float };
        prop_assert_eq!(job.format, format);
    }
}
