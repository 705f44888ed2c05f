//! `colocate serve --model testdata/gpt2-tiny` (and `llama-tiny`, `qwen3-moe-tiny`) in
//! process (issues 20 and 17): the engine thread, the routes and a plain HTTP/1.1 request,
//! as `lifecycle` wires them. GPT-2's completion of a text prompt goes through its own
//! tokenizer.json both ways and is transformers' greedy continuation, decoded by the same
//! tokenizer in Python; Llama's and the MoE's completions of token-id prompts are
//! transformers' greedy tokens.

mod common;

use std::sync::Arc;
use std::time::Duration;

use engine::limits::LimitFlags;
use engine::load::{Device, LoadFormat, LoadOptions};
use engine::metrics::Metrics;
use engine::scheduler::Admission;
use engine::server::{router, AppState, ComputeShare};
use engine::tokenizer::Tokenizer;
use engine::worker::{self, EngineState};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::{fixture, reference, u32s};

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

/// Starts the engine on the fixture `name` and its routes on a free loopback port.
async fn serve(name: &str) -> std::net::SocketAddr {
    serve_with(name, 16).await.0
}

/// `serve` with KV blocks of `block_size` tokens; also the engine's metrics.
async fn serve_with(name: &str, block_size: usize) -> (std::net::SocketAddr, Arc<Metrics>) {
    let load = LoadOptions {
        model: fixture(name).display().to_string(),
        task: None,
        load_format: LoadFormat::Auto,
        device: Device::Cpu,
        seed: 0,
        tokenizer: None,
        gpu: Default::default(),
    };
    let limits = LimitFlags {
        max_num_seqs: None,
        max_num_batched_tokens: None,
        max_model_len: None,
        kv_cache_memory: 16 << 20,
        block_size,
        prefix_caching: true,
    };
    let metrics = Arc::new(Metrics::default());
    let admission = Arc::new(Admission::new(64));
    let share = Arc::new(ComputeShare::default());
    let mut health = worker::spawn(
        load,
        limits,
        metrics.clone(),
        admission.clone(),
        share.clone(),
    )
    .unwrap();
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
    ready.unwrap_or_else(|e| panic!("{name} loads: {e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(AppState {
        served_model_name: name.into(),
        health,
        metrics: metrics.clone(),
        admission,
        share,
    });
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    (addr, metrics)
}

/// A greedy completion of 8 tokens: the response's text.
async fn complete(addr: std::net::SocketAddr, model: &str, prompt: serde_json::Value) -> String {
    complete_n(addr, model, prompt, 8).await
}

/// A greedy completion of `n` tokens: the response's text.
async fn complete_n(
    addr: std::net::SocketAddr,
    model: &str,
    prompt: serde_json::Value,
    n: usize,
) -> String {
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
    });
    let (status, text) = post(addr, "/v1/completions", &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], n, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Prefix caching (on by default) reuses K/V and changes no token: Llama's 33-token prompt
/// sent twice, then extended by the first four tokens of its own greedy continuation, gives
/// transformers' greedy tokens each time, and the engine counts the tokens it did not
/// compute again (blocks of 4 tokens: 32 of the repeat, 36 of the extension, whose ninth
/// block the first request filled while it decoded).
#[test]
fn prefix_caching_reuses_blocks_and_keeps_transformers_tokens() {
    use std::sync::atomic::Ordering::Relaxed;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reference(&fixture("llama-tiny"));
        let item = &r["items"][2];
        let ids = u32s(&item["input_ids"]);
        let greedy = u32s(&item["greedy"]);
        assert_eq!(ids.len(), 33);
        let text = |t: &[u32]| Tokenizer::byte_level().decode(t).unwrap();
        let (addr, metrics) = serve_with("llama-tiny", 4).await;
        let hits = || metrics.prefix_cache_hits.load(Relaxed);
        let first = complete(addr, "llama-tiny", item["input_ids"].clone()).await;
        assert_eq!(hits(), 0);
        let want = text(&greedy);
        let want = want.trim_end_matches('\u{FFFD}');
        assert_eq!(first, want);
        let again = complete(addr, "llama-tiny", item["input_ids"].clone()).await;
        assert_eq!(again, first);
        assert_eq!(hits(), 32);
        let longer: Vec<u32> = ids.iter().chain(&greedy[..4]).copied().collect();
        let rest = complete_n(addr, "llama-tiny", serde_json::json!(longer), 4).await;
        assert_eq!(hits(), 32 + 36);
        // The continuation's text, byte-level: the whole greedy text less its first four
        // tokens' bytes (a character split across the cut shows up in neither alone).
        let head = text(&greedy[..4]);
        let whole = text(&greedy);
        assert!(
            whole.ends_with(rest.trim_end_matches('\u{FFFD}')) && !rest.is_empty(),
            "{rest:?} is not the tail of {whole:?} after {head:?}"
        );
        assert_eq!(metrics.prefix_cache_queries.load(Relaxed), 33 + 33 + 37);
    });
}

#[test]
fn serves_greedy_completions_of_gpt2_and_llama() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // GPT-2: text in, text out, through the fixture's tokenizer.json.
        let r = reference(&fixture("gpt2-tiny"));
        let item = r["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i.get("prompt").is_some())
            .expect("a text item");
        let tok = Tokenizer::from_file(&fixture("gpt2-tiny").join("tokenizer.json"), None).unwrap();
        let prompt = item["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(prompt, true).unwrap(), u32s(&item["input_ids"]));
        let addr = serve("gpt2-tiny").await;
        let text = complete(addr, "gpt2-tiny", prompt.into()).await;
        assert_eq!(text, tok.decode(&u32s(&item["greedy"])).unwrap());
        assert_eq!(text, item["greedy_text"].as_str().unwrap());

        // Llama: token ids in, the byte-level tokenizer's text of transformers' tokens out,
        // less a character split at the end (random tokens: a lone UTF-8 lead byte), which
        // the detokenizer holds back as vLLM's does (`detok`).
        let r = reference(&fixture("llama-tiny"));
        let item = &r["items"][1];
        let addr = serve("llama-tiny").await;
        let text = complete(addr, "llama-tiny", item["input_ids"].clone()).await;
        let want = Tokenizer::byte_level()
            .decode(&u32s(&item["greedy"]))
            .unwrap();
        assert_eq!(text, want.trim_end_matches('\u{FFFD}'));
        assert!(text.chars().count() >= 6, "{text:?}");
    });
}

#[test]
fn serves_greedy_completions_of_the_moe_fixture() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reference(&fixture("qwen3-moe-tiny"));
        let item = &r["items"][0];
        let addr = serve("qwen3-moe-tiny").await;
        let text = complete(addr, "qwen3-moe-tiny", item["input_ids"].clone()).await;
        let want = Tokenizer::byte_level()
            .decode(&u32s(&item["greedy"]))
            .unwrap();
        assert_eq!(text, want);
    });
}
