//! A minimal OpenAI-compatible server (hyper) that streams as fast as it is told to; test
//! support, included by path in `tests/against_mock.rs` and `examples/client_bench.rs`.
//!
//! It exists for two jobs where a real engine would get in the way: measuring the client
//! itself (how many chunks/s one client core handles, `examples/client_bench.rs`), and
//! testing the client's fault handling (injected 503s and broken streams). Token counts
//! follow simple, known tokenizers so calibration can be checked: gen prompts count one
//! token per byte plus a chat template of `CHAT_OVERHEAD` tokens; embed inputs count one
//! token per word plus 2 ([CLS]/[SEP]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Tokens the mock adds to every chat prompt (a chat template).
pub const CHAT_OVERHEAD: u64 = 5;

/// How the mock behaves.
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Pause between two streamed tokens of one request (zero: as fast as possible).
    pub token_delay: Duration,
    /// Pause before answering an embeddings request.
    pub embed_delay: Duration,
    /// Embedding dimension (384 = MiniLM).
    pub embed_dim: usize,
    /// Answer every Nth request with a 503 (0 = never).
    pub fail_every: u64,
    /// Cut every Nth stream halfway with a transport error (0 = never).
    pub break_every: u64,
    /// Tokens generated when a request gives no `max_tokens`.
    pub default_max_tokens: u64,
    /// Never answer the Nth request (counting every request, probes included; 0 = none):
    /// a request that hangs.
    pub stall_nth: u64,
}

/// A running mock server; stops when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    /// Generated tokens so far (the mock's "generation_tokens_total").
    pub generated: Arc<AtomicU64>,
    /// Gen requests answered with one JSON body (`stream` false or absent).
    pub unstreamed: Arc<AtomicU64>,
    /// The first [`KEPT_BODIES`] request bodies of gen and embed requests, as received.
    pub bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

/// How many request bodies the mock keeps for a test to look at.
const KEPT_BODIES: usize = 32;

impl MockServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct State {
    opts: MockOptions,
    count: AtomicU64,
    generated: Arc<AtomicU64>,
    unstreamed: Arc<AtomicU64>,
    bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    content_chat: Bytes,
    content_completion: Bytes,
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: impl Into<Bytes>, ctype: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"message": msg, "type": "mock_error", "param": null, "code": status.as_u16()}});
    full(status, body.to_string(), "application/json")
}

/// Starts the mock on `127.0.0.1:port` (0 = any free port) in the current runtime.
pub async fn start(port: u16, opts: MockOptions) -> anyhow::Result<MockServer> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let generated = Arc::new(AtomicU64::new(0));
    let unstreamed = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut opts = opts;
    if opts.embed_dim == 0 {
        opts.embed_dim = 384;
    }
    if opts.default_max_tokens == 0 {
        opts.default_max_tokens = 16;
    }
    let state = Arc::new(State {
        opts,
        count: AtomicU64::new(0),
        generated: generated.clone(),
        unstreamed: unstreamed.clone(),
        bodies: bodies.clone(),
        content_chat: Bytes::from_static(
            b"data: {\"id\":\"mock\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n",
        ),
        content_completion: Bytes::from_static(
            b"data: {\"id\":\"mock\",\"object\":\"text_completion\",\"created\":0,\"model\":\"mock\",\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":null}]}\n\n",
        ),
    });
    let stop2 = stop.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = stop2.cancelled() => break,
            };
            let _ = sock.set_nodelay(true);
            let state = state.clone();
            let stop3 = stop2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop3.cancelled() => {}
                }
            });
        }
    });
    Ok(MockServer {
        addr,
        stop,
        generated,
        unstreamed,
        bodies,
    })
}

fn prompt_bytes(v: &serde_json::Value) -> u64 {
    if let Some(p) = v["prompt"].as_str() {
        return p.len() as u64;
    }
    v["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| x["content"].as_str().map_or(0, str::len) as u64)
                .sum::<u64>()
                + CHAT_OVERHEAD
        })
        .unwrap_or(0)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/health" => return full(StatusCode::OK, "", "text/plain"),
        "/v1/models" => {
            return full(
                StatusCode::OK,
                r#"{"object":"list","data":[{"id":"mock","object":"model"}]}"#,
                "application/json",
            )
        }
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => {}
        _ => return error(StatusCode::NOT_FOUND, "no such route"),
    }
    let Ok(body) = req.into_body().collect().await else {
        return error(StatusCode::BAD_REQUEST, "unreadable body");
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return error(StatusCode::BAD_REQUEST, "malformed JSON");
    };
    if let Ok(mut kept) = state.bodies.lock() {
        if kept.len() < KEPT_BODIES {
            kept.push(v.clone());
        }
    }
    let n = state.count.fetch_add(1, Relaxed) + 1;
    if state.opts.fail_every > 0 && n.is_multiple_of(state.opts.fail_every) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "injected failure");
    }
    if n == state.opts.stall_nth {
        // Dropped with its connection, when the client gives up or the server stops.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return error(StatusCode::GATEWAY_TIMEOUT, "stalled");
    }
    if path == "/v1/embeddings" {
        return embed(&state, &v).await;
    }
    let chat = path == "/v1/chat/completions";
    let prompt_tokens = prompt_bytes(&v);
    let max_tokens = v["max_tokens"]
        .as_u64()
        .unwrap_or(state.opts.default_max_tokens);
    if !v["stream"].as_bool().unwrap_or(false) {
        // The whole answer at once, after the time its tokens take; `generated` counts
        // each token when its time comes, as an engine's generated-tokens counter does.
        state.unstreamed.fetch_add(1, Relaxed);
        if state.opts.token_delay.is_zero() {
            state.generated.fetch_add(max_tokens, Relaxed);
        } else {
            let start = tokio::time::Instant::now();
            for i in 1..=max_tokens {
                tokio::time::sleep_until(start + state.opts.token_delay * i as u32).await;
                state.generated.fetch_add(1, Relaxed);
            }
        }
        let body = serde_json::json!({
            "id": "mock", "object": if chat { "chat.completion" } else { "text_completion" }, "model": "mock",
            "choices": [{"index": 0, "text": "a".repeat(max_tokens as usize), "message": {"role": "assistant", "content": "a".repeat(max_tokens as usize)}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens, "total_tokens": prompt_tokens + max_tokens}
        });
        return full(StatusCode::OK, body.to_string(), "application/json");
    }
    let content = if chat {
        state.content_chat.clone()
    } else {
        state.content_completion.clone()
    };
    let usage = Bytes::from(format!(
        "data: {{\"id\":\"mock\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt_tokens},\"completion_tokens\":{max_tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        prompt_tokens + max_tokens
    ));
    let break_at = (state.opts.break_every > 0 && n.is_multiple_of(state.opts.break_every))
        .then_some(max_tokens / 2);
    let delay = state.opts.token_delay;
    let st = state.clone();
    // States: i < max_tokens: a content chunk; i == max_tokens: usage + [DONE]; then end.
    let stream = futures::stream::unfold(0u64, move |i| {
        let (content, usage, st) = (content.clone(), usage.clone(), st.clone());
        async move {
            if Some(i) == break_at {
                return Some((
                    Err(std::io::Error::other("injected broken stream")),
                    u64::MAX,
                ));
            }
            if i > max_tokens {
                return None;
            }
            if i == max_tokens {
                return Some((Ok(Frame::data(usage)), i + 1));
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            st.generated.fetch_add(1, Relaxed);
            Some((Ok(Frame::data(content)), i + 1))
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    r
}

async fn embed(state: &State, v: &serde_json::Value) -> Response<Body> {
    let inputs: Vec<&str> = match &v["input"] {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or a list of strings",
            )
        }
    };
    if !state.opts.embed_delay.is_zero() {
        tokio::time::sleep(state.opts.embed_delay).await;
    }
    let tokens: u64 = inputs
        .iter()
        .map(|s| s.split_whitespace().count() as u64 + 2)
        .sum();
    let mut out = String::with_capacity(inputs.len() * state.opts.embed_dim * 8 + 128);
    out.push_str(r#"{"object":"list","data":["#);
    for i in 0..inputs.len() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"object":"embedding","index":{i},"embedding":["#
        ));
        for d in 0..state.opts.embed_dim {
            if d > 0 {
                out.push(',');
            }
            out.push_str("0.051");
        }
        out.push_str("]}");
    }
    out.push_str(&format!(
        r#"],"model":"mock","usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}"#
    ));
    full(StatusCode::OK, out, "application/json")
}
