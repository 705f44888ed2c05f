//! Hostile input through the gateway of `colocate up` to real built-in engines on the CPU
//! (a tiny Qwen3 generator and embedder, dummy weights): the engines' own error answers
//! reach the client unchanged (status and body), the gateway's own refusals are OpenAI
//! errors, a generator killed mid-stream ends that stream with an error event, and the
//! gateway and the other engine go on serving.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::free_port;
use common::up::Up;

/// `colocate up` and where its engines and gateway listen.
struct Deployed {
    process: Up,
    gen: String,
    embed: String,
    gw: String,
}

fn start_up(dir: &Path) -> Deployed {
    let (gen_port, embed_port, gw_port) = (free_port(), free_port(), free_port());
    let file = dir.join("deploy.toml");
    std::fs::write(
        &file,
        format!(
            r#"
name = "hostile"
gpu = "cpu"
[gateway]
address = "127.0.0.1:{gw_port}"
drain_timeout = "5s"
[supervise]
max_failures = 5
backoff_initial = "200ms"
stop_timeout = "5s"
[[engines]]
name = "gen"
model = "preset:qwen3-tiny"
served_model_name = "tiny-gen"
load_format = "dummy"
port = {gen_port}
memory = "64MiB"
start_timeout = "120s"
[[engines]]
name = "embed"
model = "preset:qwen3-tiny"
served_model_name = "tiny-embed"
task = "embed"
load_format = "dummy"
port = {embed_port}
start_timeout = "120s"
"#
        ),
    )
    .unwrap();
    Deployed {
        process: Up::start(&file, dir.join("run"), Duration::from_secs(180)),
        gen: format!("http://127.0.0.1:{gen_port}"),
        embed: format!("http://127.0.0.1:{embed_port}"),
        gw: format!("http://127.0.0.1:{gw_port}"),
    }
}

fn client() -> reqwest::Client {
    common::up::client(Duration::from_secs(60))
}

/// POSTs raw bytes: status, content type, body.
async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, String, String) {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), ct, r.text().await.unwrap())
}

fn error_code(body: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    v["error"]["code"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_bad_input_passes_engine_errors_and_survives_a_mid_stream_kill() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(dir.path());
    let (gw, gen, embed) = (up.gw.clone(), up.gen.clone(), up.embed.clone());

    // The engines' own validation: the same status and body directly and via the gateway.
    let engine_faults = [
        (
            "/v1/completions",
            r#"{"model":"tiny-gen","prompt":"x","max_tokens":-1}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"tiny-gen","prompt":"x","temperature":"hot"}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"tiny-gen","prompt":"x","max_tokens":1000000000000}"#,
        ),
        ("/v1/completions", r#"{"model":"tiny-gen"}"#),
        (
            "/v1/chat/completions",
            r#"{"model":"tiny-gen","messages":"hi"}"#,
        ),
        ("/v1/embeddings", r#"{"model":"tiny-embed","input":[]}"#),
        (
            "/v1/embeddings",
            r#"{"model":"tiny-embed","input":{"a":1}}"#,
        ),
    ];
    for (path, body) in engine_faults {
        let engine = if path == "/v1/embeddings" {
            &embed
        } else {
            &gen
        };
        let direct = post(&format!("{engine}{path}"), body).await;
        let via = post(&format!("{gw}{path}"), body).await;
        assert!((400..500).contains(&direct.0), "{path} {body}: {direct:?}");
        assert_eq!(via, direct, "{path} {body}");
        assert_eq!(error_code(&via.2), direct.0, "{}", via.2);
    }

    // The gateway's own refusals, before any engine sees the request.
    let url = format!("{gw}/v1/completions");
    for (body, want) in [
        (b"{\"model\":\"tiny-gen\",".to_vec(), 400),
        (b"{\"model\":\"tiny-gen\xc3\x28\"}".to_vec(), 400),
        (br#"{"model":["tiny-gen"]}"#.to_vec(), 400),
        (br#"{"model":"tiny-genx","prompt":"x"}"#.to_vec(), 404),
        (
            format!(
                "{{\"model\":\"tiny-gen\",\"prompt\":{}0{}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes(),
            400,
        ),
    ] {
        let (st, _, text) = post(&url, body).await;
        assert_eq!(st, want, "{text}");
        assert_eq!(error_code(&text), want, "{text}");
    }
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(error_code(&r.text().await.unwrap()), 405);

    // A generator killed mid-stream: that stream ends with an error event and [DONE]. The
    // tiny model is fast, so the kill may come after the end: try a few times.
    let mut broke_off = false;
    for _ in 0..3 {
        wait_ready(&gw, "tiny-gen").await;
        let mut r = client()
            .post(&url)
            .json(&serde_json::json!({
                "model": "tiny-gen", "prompt": "a", "max_tokens": 480,
                "ignore_eos": true, "stream": true,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut text = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).into_owned();
        let pid = up.process.state().unwrap()["instances"][0]["pid"]
            .as_u64()
            .unwrap();
        // SAFETY: plain kill(2) on the engine process `up` started for this test.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        while let Some(c) = r.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&c));
        }
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        if text.contains("broke off the stream") {
            assert!(text.contains("\"code\":502"), "{text}");
            broke_off = true;
            break;
        }
    }
    assert!(broke_off, "three streams ended before the kill");

    // The embedder never noticed; the generator comes back behind the same gateway.
    let (st, _, text) = post(
        &format!("{gw}/v1/embeddings"),
        r#"{"model":"tiny-embed","input":"still here"}"#,
    )
    .await;
    assert_eq!(st, 200, "{text}");
    wait_ready(&gw, "tiny-gen").await;
    let (st, _, text) = post(&url, r#"{"model":"tiny-gen","prompt":"hi","max_tokens":3}"#).await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(
        up.process.state().unwrap()["instances"][1]["restarts"],
        0,
        "the embedder was restarted"
    );
}

/// Waits until `/v1/models` lists `model` (its engine is up and routable).
async fn wait_ready(gw: &str, model: &str) {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client().get(format!("{gw}/v1/models")).send().await {
            if r.text()
                .await
                .unwrap_or_default()
                .contains(&format!("\"{model}\""))
            {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{model} never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
