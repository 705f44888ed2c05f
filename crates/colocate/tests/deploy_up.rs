//! `colocate up` / `colocate status` end to end with built-in engines on the CPU: two
//! engines (a tiny Qwen3 generator and embedder, dummy weights) behind the gateway; an
//! engine killed with SIGKILL comes back while the gateway answers 503 for it; streamed
//! answers through the gateway equal direct ones; SIGTERM (and even SIGKILL) to `up`
//! leaves no engine running.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::up::{state, Up};
use common::{free_port, BIN};

/// `colocate up` and the ports of its engines and gateway.
struct Deployed {
    process: Up,
    gen_port: u16,
    embed_port: u16,
    gw_port: u16,
}

fn write_deployment(dir: &Path) -> (PathBuf, u16, u16, u16) {
    let (gen_port, embed_port, gw_port) = (free_port(), free_port(), free_port());
    let text = format!(
        r#"
name = "e2e"
gpu = "cpu"
[gateway]
address = "127.0.0.1:{gw_port}"
drain_timeout = "5s"
[supervise]
max_failures = 3
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
    );
    let f = dir.join("deploy.toml");
    std::fs::write(&f, text).unwrap();
    (f, gen_port, embed_port, gw_port)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_up(dir: &Path) -> Deployed {
    let (file, gen_port, embed_port, gw_port) = write_deployment(dir);
    Deployed {
        process: Up::start(&file, dir.join("run"), Duration::from_secs(180)),
        gen_port,
        embed_port,
        gw_port,
    }
}

fn pids(run_dir: &Path) -> Vec<u32> {
    state(run_dir).unwrap()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["pid"].as_u64().map(|p| p as u32))
        .collect()
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a pid we started.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn client() -> reqwest::Client {
    common::up::client(Duration::from_secs(30))
}

/// The generated text of an SSE completion stream, chunk by chunk.
fn sse_texts(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .flat_map(|v| {
            v["choices"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|c| c["text"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

async fn stream_completion(base: &str) -> Vec<String> {
    let body = serde_json::json!({
        "model": "tiny-gen", "prompt": "The quick brown fox", "max_tokens": 12,
        "temperature": 0, "ignore_eos": true, "stream": true,
    });
    let r = client()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    sse_texts(&r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_both_models_survives_a_kill_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_up(dir.path());
    let gw = format!("http://127.0.0.1:{}", up.gw_port);
    let c = client();

    let models: serde_json::Value = c
        .get(format!("{gw}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["tiny-gen", "tiny-embed"]);

    let r = c
        .post(format!("{gw}/v1/completions"))
        .json(&serde_json::json!({"model": "tiny-gen", "prompt": "Hello", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    let r = c
        .post(format!("{gw}/v1/embeddings"))
        .json(&serde_json::json!({"model": "tiny-embed", "input": ["one", "two"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
    assert!(!v["data"][0]["embedding"].as_array().unwrap().is_empty());

    // Streamed through the gateway = streamed directly (greedy decoding).
    let direct = stream_completion(&format!("http://127.0.0.1:{}", up.gen_port)).await;
    let via = stream_completion(&gw).await;
    assert!(direct.len() >= 2, "{direct:?}");
    assert_eq!(via, direct);

    // `colocate status` shows both, running and healthy.
    let out = Command::new(BIN)
        .args(["status", up.process.run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("deployment `e2e`: running"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("gen ") && l.contains("running") && l.contains(" ok ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("gateway: http://127.0.0.1:{}", up.gw_port)),
        "{text}"
    );

    // kill -9 the generator: the gateway answers 503 (OpenAI error) or, once it is back,
    // 200 — nothing else — and the embedder is untouched.
    let before = pids(&up.process.run_dir);
    let gen_pid = before[0];
    signal(gen_pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut saw = Vec::new();
    loop {
        let r = c
            .post(format!("{gw}/v1/completions"))
            .json(&serde_json::json!({"model": "tiny-gen", "prompt": "x", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!(st == 200 || st == 503, "{st}: {body}");
        if st == 503 {
            assert!(body.contains("service_unavailable_error"), "{body}");
        }
        saw.push(st);
        let s = state(&up.process.run_dir).unwrap();
        if st == 200 && s["instances"][0]["restarts"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "generator never came back: {saw:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = state(&up.process.run_dir).unwrap();
    assert_eq!(
        s["instances"][1]["restarts"], 0,
        "the embedder was restarted too: {s}"
    );
    let after = pids(&up.process.run_dir);
    assert_ne!(after[0], gen_pid);
    assert_eq!(after[1], before[1]);
    assert!(!alive(gen_pid));

    // SIGTERM to `up`: it exits cleanly and no engine is left.
    signal(up.process.child.id(), libc::SIGTERM);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = up.process.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "`up` did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for p in before.iter().chain(after.iter()) {
        assert!(!alive(*p), "engine {p} survived `up`");
    }
    assert_eq!(state(&up.process.run_dir).unwrap()["phase"], "stopped");
    // Logs per engine, with what the engine printed.
    assert!(up.process.run_dir.join("logs/gen.log").exists());
    assert!(up.process.run_dir.join("logs/embed.log").exists());
}

#[test]
fn sigkill_of_up_takes_the_engines_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = start_up(dir.path());
    let engines = pids(&up.process.run_dir);
    assert_eq!(engines.len(), 2);
    up.process.child.kill().unwrap(); // SIGKILL: no chance to clean up
    up.process.child.wait().unwrap();
    wait_until("engines to die with `up`", Duration::from_secs(10), || {
        engines.iter().all(|p| !alive(*p))
    });
    // `status` says the deployment is gone rather than pretending.
    let out = Command::new(BIN)
        .args(["status", up.process.run_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("it was killed"), "{text}");
    let _ = (up.embed_port, up.gen_port);
}
