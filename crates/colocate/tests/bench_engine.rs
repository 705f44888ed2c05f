//! `colocate bench` end to end: the real binary against real `colocate serve` processes
//! (qwen3-tiny, dummy weights, CPU). Kept to a few seconds each.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_colocate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// GET over HTTP/1.1 by hand: (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A `colocate serve` process, killed on drop.
struct Engine {
    child: Child,
    port: u16,
}

impl Engine {
    fn start(task: &str, name: &str) -> Engine {
        let port = free_port();
        let child = Command::new(BIN)
            .args([
                "serve",
                "--model",
                "preset:qwen3-tiny",
                "--load-format",
                "dummy",
                "--task",
                task,
            ])
            .args(["--served-model-name", name, "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start colocate serve");
        let mut e = Engine { child, port };
        let t = Instant::now();
        loop {
            if let Some((200, _)) = get(port, "/health") {
                return e;
            }
            if let Ok(Some(st)) = e.child.try_wait() {
                panic!("colocate serve exited early: {st}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "engine not healthy after 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A Prometheus counter of this engine (summed over its label sets).
    fn counter(&self, name: &str) -> Option<f64> {
        let (_, body) = get(self.port, "/metrics")?;
        let mut total = None;
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line.rsplit_once(' ')?;
            let metric = key.split('{').next().unwrap_or(key);
            if metric == name {
                *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        total
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrapes a counter every 50 ms in a thread: (unix time, value).
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(port: u16, name: &'static str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s2, o2) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let e = Engine {
                child: Command::new("true").spawn().unwrap(),
                port,
            };
            while !s2.load(Ordering::SeqCst) {
                let t0 = unix_now();
                if let Some(v) = e.counter(name) {
                    let t1 = unix_now();
                    o2.lock().unwrap().push(((t0 + t1) / 2.0, v));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples.lock().unwrap().clone()
    }
}

/// The counter at `t`, linearly interpolated between scrapes.
fn at(samples: &[(f64, f64)], t: f64) -> f64 {
    let i = samples.partition_point(|s| s.0 <= t);
    assert!(i > 0 && i < samples.len(), "time {t} outside the scrapes");
    let (a, b) = (samples[i - 1], samples[i]);
    a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0)
}

fn bench(args: &[String], out: &std::path::Path) -> serde_json::Value {
    let o = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("cannot run colocate bench");
    assert!(
        o.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("TTFT (ms)") || table.contains("sequences/s"),
        "{table}"
    );
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn window_throughput_agrees_with_the_engine_counter() {
    let e = Engine::start("generate", "qwen");
    let dir = tempfile::tempdir().unwrap();
    let sampler = Sampler::start(e.port, "colocate:generation_tokens_total");
    std::thread::sleep(Duration::from_millis(200));
    let r = bench(
        &[
            "--workload".into(),
            format!(
                "gen:url={},model=qwen,concurrency=8,input=128,output=48",
                e.url()
            ),
            "--warmup".into(),
            "1s".into(),
            "--duration".into(),
            "4s".into(),
            "--requests-out".into(),
            dir.path().join("req.jsonl").display().to_string(),
        ],
        &dir.path().join("r.json"),
    );
    std::thread::sleep(Duration::from_millis(200));
    let samples = sampler.finish();
    let (w0, w1) = (
        r["window"][0].as_f64().unwrap(),
        r["window"][1].as_f64().unwrap(),
    );
    let served = at(&samples, w1) - at(&samples, w0);
    let g = &r["workloads"][0]["gen"];
    let counted = g["output_tokens"].as_f64().unwrap();
    eprintln!(
        "window {:.2} s: bench counted {counted:.1} output tokens, engine counter {served:.1}",
        w1 - w0
    );
    assert!(served > 50.0, "the engine generated only {served} tokens");
    let rel = (counted - served).abs() / served;
    assert!(
        rel < 0.05,
        "bench counted {counted} tokens in the window, the engine {served}"
    );
    // Fixed output length (ignore_eos + min_tokens) and calibrated prompts.
    assert_eq!(g["mean_output_tokens"].as_f64().unwrap(), 48.0);
    let p = g["mean_prompt_tokens"].as_f64().unwrap();
    assert!((p - 128.0).abs() <= 2.0, "prompt tokens {p}");
    assert_eq!(r["interrupted"], false);
    assert!(r["workloads"][0]["errors"].as_object().unwrap().is_empty());
    let lines = std::fs::read_to_string(dir.path().join("req.jsonl")).unwrap();
    assert!(lines.lines().count() >= g["completed"].as_u64().unwrap() as usize);
}

#[test]
fn two_workloads_against_two_engines_at_once() {
    let gen = Engine::start("generate", "gen");
    let emb = Engine::start("embed", "emb");
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
warmup = "1s"
duration = "3s"
seed = 3
[[workload]]
name = "g"
kind = "completions"
url = "{}"
model = "gen"
load = {{ mode = "closed", concurrency = 4 }}
input = 16
output = 32
[[workload]]
name = "e"
kind = "embed"
url = "{}"
model = "emb"
load = {{ mode = "closed", concurrency = 2 }}
input = 32
batch = 4
"#,
        gen.url(),
        emb.url()
    );
    let cfg = dir.path().join("bench.toml");
    std::fs::write(&cfg, toml).unwrap();
    let r = bench(
        &["--config".into(), cfg.display().to_string()],
        &dir.path().join("r.json"),
    );
    let w = r["workloads"].as_array().unwrap();
    assert_eq!(w.len(), 2);
    assert!(w[0]["gen"]["output_throughput"].as_f64().unwrap() > 0.0);
    let e = &w[1]["embed"];
    assert!(e["seq_throughput"].as_f64().unwrap() > 0.0);
    // Batches of 4, each spread over its lifetime: the window's share, which the
    // per-second series adds up to.
    let seqs = e["sequences"].as_f64().unwrap();
    let series: f64 = w[1]["timeseries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["throughput"].as_f64().unwrap())
        .sum();
    assert!(
        seqs > 0.0 && (series - seqs).abs() < 1e-6 * seqs,
        "{seqs} vs {series}"
    );
    // Byte-level tokenizer: 32-token inputs are 32 tokens (plus any special token).
    let tps = e["mean_tokens_per_seq"].as_f64().unwrap();
    assert!((tps - 32.0).abs() <= 2.0, "{tps}");
    // Both measured over the same window, with a per-second series each.
    assert_eq!(w[0]["timeseries"].as_array().unwrap().len(), 3);
    assert_eq!(w[1]["timeseries"].as_array().unwrap().len(), 3);
}

#[test]
fn unreachable_endpoint_fails_fast_with_the_url() {
    let port = free_port();
    let t = Instant::now();
    let o = Command::new(BIN)
        .args(["bench", "--workload"])
        .arg(format!(
            "gen:url=http://127.0.0.1:{port},model=m,concurrency=4"
        ))
        .args(["--warmup", "30s", "--duration", "60s"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("http://127.0.0.1:{port}")) && err.contains("unreachable"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_reported_not_panicked() {
    for (args, want) in [
        (vec!["bench", "--duration", "5s"], "no workload"),
        (
            vec!["bench", "--workload", "gen:url=http://x,model=m"],
            "concurrency",
        ),
        (
            vec![
                "bench",
                "--workload",
                "gen:url=http://x,model=m,concurrency=1",
            ],
            "duration",
        ),
        (
            vec![
                "bench",
                "--config",
                "/nonexistent/b.toml",
                "--duration",
                "1s",
            ],
            "/nonexistent/b.toml",
        ),
        (
            vec![
                "bench",
                "--workload",
                "gen:url=http://x,model=m,concurrency=1",
                "--duration",
                "1s",
                "--slo",
                "ttft=soon",
            ],
            "ttft",
        ),
    ] {
        let o = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn ctrl_c_writes_results_marked_interrupted() {
    let e = Engine::start("generate", "qwen");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.json");
    let mut child = Command::new(BIN)
        .args(["bench", "--workload"])
        .arg(format!(
            "gen:url={},model=qwen,concurrency=4,input=16,output=32",
            e.url()
        ))
        .args(["--warmup", "500ms", "--duration", "60s", "--out"])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["interrupted"], true);
    let len = r["window"][1].as_f64().unwrap() - r["window"][0].as_f64().unwrap();
    assert!(len > 0.5 && len < 10.0, "{len}");
    assert!(r["workloads"][0]["gen"]["output_tokens"].as_f64().unwrap() > 0.0);
}
