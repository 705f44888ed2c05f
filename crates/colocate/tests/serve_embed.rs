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
    common::fetch_minilm();
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
    // MiniLM was not trained for truncation: `dimensions` is refused (vLLM's rule), while
    // base64 (the openai client's default) works.
    let r = s.post("/v1/embeddings", r#"{"input": "x", "dimensions": 128}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("matryoshka"), "{}", r.text());
    let v = s
        .post(
            "/v1/embeddings",
            &json!({"input": texts[1], "encoding_format": "base64"}).to_string(),
        )
        .json();
    let b64 = floats_of_base64(v["data"][0]["embedding"].as_str().unwrap());
    assert_eq!(b64.len(), 384);
    assert!(cosine(&b64, &got[1]) > 0.99999);
}

/// The f32 values of base64 (standard alphabet, padded) little-endian bytes, as the
/// openai client decodes them (`np.frombuffer(base64.b64decode(s), dtype="float32")`).
fn floats_of_base64(s: &str) -> Vec<f64> {
    let sextet = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut bytes = vec![];
    for quad in s.as_bytes().chunks(4) {
        let data: Vec<u8> = quad.iter().copied().filter(|&c| c != b'=').collect();
        let n = data.iter().fold(0u32, |n, &c| (n << 6) | sextet(c)) << (6 * (4 - data.len()));
        bytes.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..data.len() - 1]);
    }
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect()
}

#[test]
fn base64_and_dimensions_as_the_openai_client_sends_them() {
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--task",
        "embed",
        "--load-format",
        "dummy",
    ]);
    let full = embeddings(
        &s.post("/v1/embeddings", r#"{"input": ["alpha", "beta"]}"#)
            .json(),
    );
    assert_eq!(full[0].len(), 64, "qwen3-tiny's hidden size");
    // The official client's default request.
    let r = s.post(
        "/v1/embeddings",
        r#"{"input": ["alpha", "beta"], "model": "preset:qwen3-tiny", "encoding_format": "base64"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        let got = floats_of_base64(d["embedding"].as_str().expect("a base64 string"));
        assert_eq!(got.len(), 64);
        for (a, b) in got.iter().zip(&full[i]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
    assert_eq!(v["usage"]["prompt_tokens"], 9);
    // Matryoshka: the first 16 values, re-normalised.
    let r = s.post(
        "/v1/embeddings",
        r#"{"input": ["alpha", "beta"], "dimensions": 16}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let cut = embeddings(&r.json());
    for (c, f) in cut.iter().zip(&full) {
        assert_eq!(c.len(), 16);
        let norm: f64 = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert!(cosine(c, &f[..16]) > 0.99999);
    }
    let r = s.post(
        "/v1/embeddings",
        r#"{"input": "a", "dimensions": 8, "encoding_format": "base64"}"#,
    );
    assert_eq!(
        floats_of_base64(r.json()["data"][0]["embedding"].as_str().unwrap()).len(),
        8
    );
    for bad in [0, -1, 65] {
        let r = s.post(
            "/v1/embeddings",
            &json!({"input": "a", "dimensions": bad}).to_string(),
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], "dimensions");
    }
    assert_eq!(
        s.post("/v1/embeddings", r#"{"input": "a"}"#).status,
        200,
        "still serving"
    );
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
