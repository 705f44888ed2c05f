//! Hostile input against the gateway in front of real engine processes
//! (`tests/fake_engine.py`): every bad request gets its status and an OpenAI error body,
//! the engine's own error answers pass through unchanged, an engine dying mid-stream ends
//! that stream with an error event, and through all of it the gateway keeps serving.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deploy::supervisor::InstanceState;
use deploy::{
    Deployment, DeploymentSpec, EngineKind, EngineSpec, GatewaySpec, SuperviseSpec, UpOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAKE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_engine.py");

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn fake(name: &str, model: &str) -> EngineSpec {
    EngineSpec {
        name: name.into(),
        kind: EngineKind::Command,
        model: model.into(),
        port: free_port(),
        replicas: 1,
        command: Some(vec![
            "python3".into(),
            FAKE.into(),
            "{port}".into(),
            "{name}".into(),
        ]),
        env: BTreeMap::new(),
        start_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn spec(engines: Vec<EngineSpec>) -> DeploymentSpec {
    DeploymentSpec {
        name: "hostile".into(),
        engines,
        gateway: Some(GatewaySpec {
            address: format!("127.0.0.1:{}", free_port()),
            drain_timeout: Duration::from_secs(5),
            ..Default::default()
        }),
        supervise: SuperviseSpec {
            max_failures: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(3),
        },
        ..Default::default()
    }
}

async fn up(engines: Vec<EngineSpec>) -> (Deployment, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let opts = UpOptions {
        run_dir: dir.path().join("run"),
        engine_bin: None,
        quiet: true,
        ..Default::default()
    };
    let d = Deployment::up(&deploy::validate(spec(engines)).unwrap(), opts)
        .await
        .unwrap();
    (d, dir)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs raw bytes; returns status, content type and body.
async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, String, String) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

/// Asserts an OpenAI error body with `code` = `status` and a message containing `says`.
fn assert_error(status: u16, body: &str, want: u16, says: &str) {
    assert_eq!(status, want, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["error"]["code"], want, "{body}");
    assert!(v["error"]["type"].is_string(), "{body}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(says), "`{msg}` does not say `{says}`");
}

/// Sends `head` on a raw connection and reads the answer's status and body (the gateway's
/// own answers carry a Content-Length).
async fn raw(addr: &str, head: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_an_openai_error_and_the_gateway_keeps_serving() {
    let (d, _dir) = up(vec![fake("a", "model-a")]).await;
    let gw = d.gateway_url().unwrap();
    let addr = gw.trim_start_matches("http://").to_string();
    let url = format!("{gw}/v1/completions");
    let engine = d.status()[0].url.clone();

    let (st, _, body) = post(&url, "{\"model\": \"model-a\", ").await;
    assert_error(st, &body, 400, "not valid JSON");
    let (st, _, body) = post(&url, b"{\"model\": \"model-a\xff\"}".to_vec()).await;
    assert_error(st, &body, 400, "not valid UTF-8");
    let (st, _, body) = post(&url, "").await;
    assert_error(st, &body, 400, "empty");
    let (st, _, body) = post(&url, "[1, 2]").await;
    assert_error(st, &body, 400, "must be a JSON object");
    let (st, _, body) = post(&url, r#"{"prompt": "x"}"#).await;
    assert_error(st, &body, 400, "`model` is required");
    let (st, _, body) = post(&url, r#"{"model": 7, "prompt": "x"}"#).await;
    assert_error(st, &body, 400, "`model` must be a string, got a number");
    let (st, _, body) = post(&url, r#"{"model": "nope", "prompt": "x"}"#).await;
    assert_error(st, &body, 404, "served: model-a");
    let deep = format!(
        "{{\"model\":\"model-a\",\"prompt\":{}1{}}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let (st, _, body) = post(&url, deep).await;
    assert_error(st, &body, 400, "recursion limit");

    // Over the body limit: 413 naming it, whether declared up front (answered at once to
    // a client waiting on `Expect: 100-continue`, after the body otherwise) or found while
    // reading a chunked body; the client reads the answer, not a reset.
    let limit = deploy::gateway::MAX_BODY_BYTES;
    let (st, body) = raw(
        &addr,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            limit + 1
        ),
    )
    .await;
    assert_error(st, &body, 413, &format!("limit of {limit} bytes"));
    let big = format!(
        "{{\"model\":\"model-a\",\"prompt\":\"{}\"}}",
        "x".repeat(limit)
    );
    let (st, _, body) = post(&url, big.clone()).await;
    assert_error(st, &body, 413, &format!("limit of {limit} bytes"));
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(1 << 16)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let (st, _, body) = post(&url, reqwest::Body::wrap_stream(stream)).await;
    assert_error(st, &body, 413, &format!("limit of {limit} bytes"));

    // Wrong methods and unknown routes: JSON too.
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    let (st, body) = (r.status().as_u16(), r.text().await.unwrap());
    assert_error(st, &body, 405, "not allowed");
    let (st, _, body) = post(&format!("{gw}/v1/models"), "{}").await;
    assert_error(st, &body, 405, "not allowed");
    let r = client().get(format!("{gw}/nope")).send().await.unwrap();
    let (st, body) = (r.status().as_u16(), r.text().await.unwrap());
    assert_error(st, &body, 404, "no route GET /nope");
    let (st, _, body) = post(&format!("{gw}/nope"), "garbage").await;
    assert_error(st, &body, 404, "no route POST /nope");

    // The engine's own validation answer passes through unchanged.
    let bad = r#"{"model": "model-a", "prompt": "x", "max_tokens": -1}"#;
    let direct = post(&format!("{engine}/v1/completions"), bad).await;
    let via = post(&url, bad).await;
    assert_eq!(direct.0, 400);
    assert_eq!(via, direct);

    // Still serving; the gateway's own refusals are counted under bounded route labels.
    let (st, _, body) = post(&url, r#"{"model": "model-a", "prompt": "hi"}"#).await;
    assert_eq!(st, 200, "{body}");
    for p in ["/x1", "/x2", "/x3"] {
        post(
            &format!("{gw}{p}"),
            r#"{"model": "model-a", "prompt": "hi"}"#,
        )
        .await;
    }
    let metrics = client()
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"colocate_gateway_requests_total{engine="a",route="other"} 3"#),
        "{metrics}"
    );
    assert!(!metrics.contains("/x1"), "{metrics}");
    assert_eq!(d.status()[0].restarts, 0);
    d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_dying_mid_stream_ends_the_stream_with_an_error_event() {
    let (d, _dir) = up(vec![fake("a", "model-a")]).await;
    let gw = d.gateway_url().unwrap();
    let url = format!("{gw}/v1/completions");

    let (st, ct, body) = post(
        &url,
        r#"{"model": "model-a", "prompt": "die", "stream": true}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(ct, "text/event-stream");
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or(e))
        .collect();
    assert_eq!(events.len(), 4, "{body:?}");
    assert!(events[0].contains("says die #0") && events[1].contains("says die #1"));
    let err: serde_json::Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(err["error"]["code"], 502, "{body}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("engine `a` broke off the stream"),
        "{body}"
    );
    assert_eq!(events[3], "[DONE]");

    // The gateway goes on: the engine comes back and is served again.
    let t0 = Instant::now();
    loop {
        let (st, _, body) = post(&url, r#"{"model": "model-a", "prompt": "hi"}"#).await;
        assert!(st == 200 || st == 503, "{st} {body}");
        if st == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = d.status();
    assert_eq!(s[0].restarts, 1);
    assert_eq!(s[0].state, InstanceState::Healthy);
    d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_do_not_lock_the_gateway() {
    let (d, _dir) = up(vec![fake("a", "model-a")]).await;
    let gw = d.gateway_url().unwrap();
    let addr = gw.trim_start_matches("http://").to_string();
    // Hundreds of connections that say nothing, and some that trickle a head.
    let _ = http_guard::raise_fd_limit();
    let n = (http_guard::limits::fd_soft_limit().saturating_sub(400) / 4).min(500);
    let mut idle = Vec::new();
    for _ in 0..n {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    for s in idle.iter_mut().take(20) {
        s.write_all(b"POST /v1/completions HTTP/1.1\r\nHo")
            .await
            .unwrap();
    }
    let t0 = Instant::now();
    let (st, _, body) = post(
        &format!("{gw}/v1/completions"),
        r#"{"model": "model-a", "prompt": "hi"}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(idle);
    d.shutdown().await.unwrap();
}
