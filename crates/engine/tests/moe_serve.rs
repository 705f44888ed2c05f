//! `colocate serve --model testdata/qwen3-moe-tiny` in process (issue 17): the engine
//! thread, the routes and a plain HTTP/1.1 request, as `lifecycle` wires them; the greedy
//! completion of a fixture prompt is transformers' greedy tokens, decoded.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use engine::limits::LimitFlags;
use engine::load::{Device, LoadFormat, LoadOptions};
use engine::metrics::Metrics;
use engine::scheduler::Admission;
use engine::server::{router, AppState};
use engine::tokenizer::Tokenizer;
use engine::worker::{self, EngineState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/qwen3-moe-tiny")
}

/// One request on a fresh connection; the response's status and body.
async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

#[test]
fn serves_greedy_completions_of_the_moe_fixture() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
            .unwrap();
    let item = &reference["items"][0];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let load = LoadOptions {
            model: fixture().display().to_string(),
            task: None,
            load_format: LoadFormat::Auto,
            device: Device::Cpu,
            seed: 0,
            gpu: Default::default(),
        };
        let limits = LimitFlags {
            max_num_seqs: None,
            max_num_batched_tokens: None,
            max_model_len: None,
            kv_cache_memory: 16 << 20,
            block_size: 16,
        };
        let metrics = Arc::new(Metrics::default());
        let admission = Arc::new(Admission::new(64));
        let mut health = worker::spawn(load, limits, metrics.clone(), admission.clone()).unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match &*health.borrow_and_update() {
                    EngineState::Ready(_) => return Ok(()),
                    EngineState::Failed(e) => return Err(e.clone()),
                    EngineState::Loading => {}
                }
                health.changed().await.unwrap();
            }
        })
        .await
        .expect("loads within 60 s");
        ready.expect("the MoE fixture loads");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AppState {
            served_model_name: "moe".into(),
            health,
            metrics,
            admission,
        });
        tokio::spawn(async move { axum::serve(listener, router(state)).await });

        let body = serde_json::json!({
            "model": "moe", "prompt": item["input_ids"], "max_tokens": 8, "temperature": 0,
        });
        let (status, text) = post(addr, "/v1/completions", &body.to_string()).await;
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
        let greedy: Vec<u32> = item["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let want = Tokenizer::byte_level().decode(&greedy).unwrap();
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), want, "{v}");
    });
}
