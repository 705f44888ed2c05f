//! `colocate serve --task embed` end to end: all-MiniLM-L6-v2 (real weights, fetched by
//! scripts/fetch-minilm.sh) against sentence-transformers' reference embeddings, and
//! qwen3-tiny as an embedder under concurrent batched load.

mod common;

use common::{workspace_root, Server};
use serde_json::{json, Value};

fn embeddings(v: &Value) -> Vec<Vec<f64>> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            assert_eq!(d["object"], "embedding");
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers_over_http() {
    let root = workspace_root();
    let st = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-minilm.sh"))
        .current_dir(&root)
        .status()
        .expect("cannot run scripts/fetch-minilm.sh");
    assert!(st.success(), "scripts/fetch-minilm.sh failed");
    let s = Server::start(&[
        "--model",
        "models/all-minilm-l6-v2",
        "--task",
        "embed",
        "--served-model-name",
        "minilm",
    ]);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("testdata/minilm-reference.json")).unwrap(),
    )
    .unwrap();
    let items = reference["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    let r = s.post(
        "/v1/embeddings",
        &json!({"model": "minilm", "input": texts}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let got = embeddings(&v);
    assert_eq!(got.len(), items.len());
    let mut ids = 0;
    for (g, item) in got.iter().zip(items) {
        let want: Vec<f64> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(g.len(), 384);
        let c = cosine(g, &want);
        assert!(c >= 0.9999, "{:?}: cosine {c}", item["text"]);
        ids += item["input_ids"].as_array().unwrap().len();
    }
    assert_eq!(
        v["usage"]["prompt_tokens"], ids,
        "usage counts every input token"
    );
    assert_eq!(v["model"], "minilm");

    // Token ids in, same vector out.
    let first_ids = &items[0]["input_ids"];
    let v = s
        .post("/v1/embeddings", &json!({"input": [first_ids]}).to_string())
        .json();
    let c = cosine(&embeddings(&v)[0], &got[0]);
    assert!(c > 0.99999, "{c}");
    // Single string.
    let v = s
        .post("/v1/embeddings", &json!({"input": texts[1]}).to_string())
        .json();
    assert!(cosine(&embeddings(&v)[0], &got[1]) > 0.99999);
    // A generation request to an embedder is a 400.
    let r = s.post("/v1/completions", r#"{"prompt": "x"}"#);
    assert_eq!(r.status, 400);
}

#[test]
fn qwen3_tiny_embedder_batches_concurrent_requests_consistently() {
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--task",
        "embed",
        "--load-format",
        "dummy",
        "--max-num-batched-tokens",
        "64",
    ]);
    let texts: Vec<String> = (0..12)
        .map(|i| format!("sentence number {i} {}", "z".repeat(i)))
        .collect();
    // Each alone.
    let alone: Vec<Vec<f64>> = texts
        .iter()
        .map(|t| {
            embeddings(
                &s.post("/v1/embeddings", &json!({"input": t}).to_string())
                    .json(),
            )[0]
            .clone()
        })
        .collect();
    for e in &alone {
        let norm: f64 = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "L2-normalised: {norm}");
    }
    // All in one request (several batches of at most 64 tokens) and from parallel clients.
    let v = s
        .post("/v1/embeddings", &json!({"input": texts}).to_string())
        .json();
    let together = embeddings(&v);
    let port = s.port;
    let handles: Vec<_> = texts
        .iter()
        .cloned()
        .map(|t| {
            std::thread::spawn(move || {
                let r = common::request(
                    port,
                    "POST",
                    "/v1/embeddings",
                    Some(&json!({"input": [t, "extra"]}).to_string()),
                )
                .unwrap();
                assert_eq!(r.status, 200);
                embeddings(&r.json())[0].clone()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let parallel = h.join().unwrap();
        assert!(cosine(&parallel, &alone[i]) > 0.9999);
        assert!(cosine(&together[i], &alone[i]) > 0.9999);
    }
    assert!(
        cosine(&alone[0], &alone[5]) < 0.9999,
        "different inputs differ"
    );
    assert!(s.metric("colocate:embedding_sequences_total") >= 12.0 * 4.0);
}
