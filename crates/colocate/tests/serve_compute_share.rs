//! The built-in engine's compute share at run time (issue 18), against a real `colocate
//! serve` embedder: `/admin/compute-share` reads and sets the cap on embedding tokens in
//! the engine at once, refuses bad values with OpenAI errors, and concurrent requests
//! past the cap wait their turn (never more tokens inside than the cap) and all succeed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{metric_value, request, Server};

fn share(s: &Server) -> serde_json::Value {
    let r = s.get("/admin/compute-share");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn the_compute_share_caps_embedding_tokens_in_the_engine_and_moves_at_run_time() {
    let s = Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--task",
        "embed",
        "--load-format",
        "dummy",
        "--served-model-name",
        "emb",
    ]);
    assert_eq!(
        share(&s),
        serde_json::json!({"max_tokens_in_flight": null, "duty_percent": null, "sm_percent": null, "sms": null, "sm_partitions": [], "tokens_in_flight": 0, "waiting": 0})
    );

    // bad settings: 400 with an OpenAI body naming the field; other methods 405
    for bad in [
        r#"{"max_tokens_in_flight": 0}"#,
        r#"{"max_tokens_in_flight": "lots"}"#,
        r#"{"max_tokens": 64}"#,
        r#"{"max_tokens_in_flight": 64"#,
        r#"{"duty_percent": 0}"#,
        r#"{"duty_percent": 150}"#,
        r#"{"sm_percent": 0}"#,
        r#"{}"#,
    ] {
        let r = s.post("/admin/compute-share", bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], 400, "{}", r.text());
    }
    // an SM share on an engine without SM partitions (a CPU engine): 400 naming the flag,
    // and nothing of the body applied
    let r = s.post(
        "/admin/compute-share",
        r#"{"sm_percent": 25, "max_tokens_in_flight": 64}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("--sm-partitions"), "{msg}");
    assert_eq!(r.json()["error"]["param"], "sm_percent", "{}", r.text());
    assert_eq!(share(&s)["max_tokens_in_flight"], serde_json::Value::Null);
    let r = request(s.port, "PUT", "/admin/compute-share", Some("{}")).unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.json()["error"]["message"].is_string());

    let r = s.post("/admin/compute-share", r#"{"max_tokens_in_flight": 64}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["max_tokens_in_flight"], 64);
    let text = s.get("/metrics").text();
    assert_eq!(
        metric_value(&text, "colocate:compute_share_max_tokens_in_flight"),
        Some(64.0),
        "{text}"
    );

    // 8 requests of about 40 tokens at once: at most one inside at a time
    let port = s.port;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut most, mut waited) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = request(port, "GET", "/admin/compute-share", None) {
                    let v = r.json();
                    most = most.max(v["tokens_in_flight"].as_u64().unwrap_or(0));
                    waited = waited.max(v["waiting"].as_u64().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (most, waited)
        })
    };
    let clients: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let body = serde_json::json!({
                    "model": "emb",
                    "input": [format!("{i} the quick brown fox jumps over the lazy dog ").repeat(8)],
                })
                .to_string();
                request(port, "POST", "/v1/embeddings", Some(&body)).unwrap()
            })
        })
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.json()["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .is_empty());
    }
    stop.store(true, Ordering::Relaxed);
    let (most, waited) = watcher.join().unwrap();
    // each request is over 64 tokens: it runs alone, so the cap held at one at a time
    let one = {
        let r = s.post(
            "/v1/embeddings",
            &serde_json::json!({"model": "emb", "input": ["0 the quick brown fox jumps over the lazy dog ".repeat(8)]}).to_string(),
        );
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    assert!(one > 64, "{one}");
    assert!(
        most <= one,
        "{most} tokens inside at once, one request has {one}"
    );
    eprintln!("most tokens inside: {most}, most waiting: {waited}");

    // paced: the duty cycle is set beside the cap, shown in /metrics, and embeddings still
    // come back
    let r = s.post("/admin/compute-share", r#"{"duty_percent": 50}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["duty_percent"], 50);
    assert_eq!(r.json()["max_tokens_in_flight"], 64, "the cap stays");
    let text = s.get("/metrics").text();
    assert_eq!(
        metric_value(&text, "colocate:compute_share_duty_percent"),
        Some(50.0),
        "{text}"
    );
    let r = s.post(
        "/v1/embeddings",
        &serde_json::json!({"model": "emb", "input": ["paced", "twice"]}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 2);

    // lifted: null
    let r = s.post(
        "/admin/compute-share",
        r#"{"max_tokens_in_flight": null, "duty_percent": null}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        share(&s),
        serde_json::json!({"max_tokens_in_flight": null, "duty_percent": null, "sm_percent": null, "sms": null, "sm_partitions": [], "tokens_in_flight": 0, "waiting": 0})
    );
}
