//! The seed studies' clients (bench presets) and the engines' own counters, end to end on
//! the CPU: `colocate bench` with `seed-gen` / `seed-embed` against real `colocate serve`
//! processes (qwen3-tiny, dummy weights), and a `colocate lab` run whose workloads name the
//! presets and whose every window carries each engine's `/metrics`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{free_port, run_colocate, workspace_root, Server, BIN};

fn tiny(task: &str, name: &str) -> Server {
    Server::start(&[
        "--model",
        "preset:qwen3-tiny",
        "--load-format",
        "dummy",
        "--task",
        task,
        "--served-model-name",
        name,
    ])
}

fn json(p: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// `seed-gen` sends whole (non-streamed) chat requests of the fixed prompt and reads the
/// tokens from each response's usage: no TTFT, TPOT or ITL, and the table and the JSON say
/// so; `seed-embed` sends batches of the numbered sentences. The note is said once.
#[test]
fn bench_runs_the_seed_presets_against_the_builtin_engine() {
    let gen = tiny("generate", "gen");
    let emb = tiny("embed", "emb");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("seeds.json");
    let before = gen.metric("colocate:generation_tokens_total");
    let o = run_colocate(
        &[
            "bench",
            "-w",
            &format!(
                "seed-gen:url=http://127.0.0.1:{},model=gen,concurrency=4,output=16",
                gen.port
            ),
            "-w",
            &format!(
                "seed-embed:url=http://127.0.0.1:{},model=emb,concurrency=2,batch=4",
                emb.port
            ),
            "--warmup",
            "1s",
            "--duration",
            "3s",
            "--out",
            out.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stderr.matches("note (gen0): seed-gen:").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("ignore_eos"), "{stderr}");
    assert!(stdout.contains("gen0 (Chat, preset seed-gen)"), "{stdout}");
    assert!(stdout.contains("TTFT, TPOT and ITL undefined"), "{stdout}");
    assert!(!stdout.contains("TTFT (ms)"), "{stdout}");

    let r = json(&out);
    assert_eq!(r["spec"]["presets"]["gen0"], "seed-gen");
    assert_eq!(r["spec"]["presets"]["embed1"], "seed-embed");
    let w = &r["workloads"][0];
    assert_eq!(w["streamed"], false, "{w}");
    assert_eq!(w["preset"], "seed-gen");
    assert!(w["errors"].as_object().unwrap().is_empty(), "{w}");
    let g = &w["gen"];
    let completed = g["completed"].as_u64().unwrap();
    assert!(completed > 0, "{g}");
    assert_eq!(g["ttft_ms"]["count"], 0, "{g}");
    assert_eq!(g["tpot_ms"]["count"], 0, "{g}");
    assert_eq!(g["itl_ms"]["count"], 0, "{g}");
    assert_eq!(g["e2el_ms"]["count"].as_u64(), Some(completed), "{g}");
    // ignore_eos: every request made exactly its 16 tokens, by the server's own usage
    assert_eq!(g["mean_output_tokens"], 16.0, "{g}");
    // the fixed essay prompt with the chat template: the same count every time
    let prompt = g["mean_prompt_tokens"].as_f64().unwrap();
    assert!(prompt > 30.0 && prompt.fract() == 0.0, "{g}");
    assert!(g["input_tokens"].as_f64().unwrap() > 0.0, "{g}");
    // the engine made at least what the window counted
    let made = gen.metric("colocate:generation_tokens_total") - before;
    assert!(
        made >= g["output_tokens"].as_f64().unwrap(),
        "engine {made} vs {g}"
    );
    let e = &r["workloads"][1];
    assert_eq!(e["preset"], "seed-embed");
    // every batch counts over its lifetime (the window's share of it)
    let seqs = e["embed"]["sequences"].as_f64().unwrap();
    assert!(seqs > 0.0, "{e}");
    assert!(e["errors"].as_object().unwrap().is_empty(), "{e}");
    // the numbered sentences are one fixed length each: the same tokens per sequence
    let per_seq = e["embed"]["mean_tokens_per_seq"].as_f64().unwrap();
    assert!(per_seq > 20.0, "{e}");
}

/// A lab run whose workloads are the presets: every window records the presets used and
/// each engine's own counters (built-in names), and the report shows them beside the GPU
/// counters.
#[test]
fn lab_windows_carry_presets_and_engine_metrics() {
    let (gen_port, emb_port) = (free_port(), free_port());
    let exp = format!(
        r#"
name = "seed-presets"
warmup = "1s"
duration = "2s"
startup_estimate = "2s"
[deployment]
gpu = "cpu"
[[deployment.engines]]
name = "gen"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "generate"
port = {gen_port}
load_format = "dummy"
[[deployment.engines]]
name = "emb"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "embed"
port = {emb_port}
load_format = "dummy"
[[workloads]]
name = "chat"
engine = "gen"
preset = "seed-gen"
concurrency = 2
output_tokens = 8
[[workloads]]
name = "vec"
engine = "emb"
preset = "seed-embed"
concurrency = 1
batch = 4
[axes]
sharing = ["timeslice"]
[slo.chat]
latency_p99 = "30s"
"#
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("seeds.toml");
    std::fs::write(&file, exp).unwrap();
    let run = tmp.path().join("run");
    let o = Command::new(BIN)
        .args(["lab", "run", file.to_str().unwrap(), "--out"])
        .arg(&run)
        .arg("--quiet")
        .current_dir(workspace_root())
        .env("COLOCATE_BIN", BIN)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("workload chat runs preset seed-gen: "),
        "{stderr}"
    );

    let r = json(&run.join("results.json"));
    assert_eq!(r["complete"], true);
    assert_eq!(r["experiment"]["workloads"][0]["preset"], "seed-gen");
    let conds = r["conditions"].as_array().unwrap();
    // solo gen, solo emb, together
    assert_eq!(conds.len(), 3);
    for c in conds {
        let id = c["condition"]["label"].as_str().unwrap_or("?");
        assert!(c.get("failed").is_none(), "{id}: {c}");
        let engines: Vec<&str> = c["condition"]["engines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let windows = c["engine_metrics"].as_array().unwrap();
        let scraped: Vec<&str> = windows
            .iter()
            .map(|w| w["engine"].as_str().unwrap())
            .collect();
        assert_eq!(scraped, engines, "{id}");
        for w in windows {
            assert_eq!(w["dialect"], "builtin", "{id}: {w}");
            assert!(w["samples"].as_u64().unwrap() >= 2, "{id}: {w}");
            assert!(w["requests_running"]["metric"].is_string(), "{id}: {w}");
            if w["engine"] == "gen" {
                // The KV gauge is read (its value at the sample instants depends on the
                // engine's duty cycle: requests of 8 tokens on a loaded machine may all fall
                // between samples); the counters below prove the work.
                assert_eq!(
                    w["kv_cache_usage"]["metric"], "colocate:kv_cache_usage_perc",
                    "{id}: {w}"
                );
                assert!(
                    w["kv_cache_usage"]["max"]
                        .as_f64()
                        .is_some_and(|m| m >= 0.0),
                    "{id}: {w}"
                );
                assert!(
                    w["generation_tokens"]["increase"].as_f64().unwrap() > 0.0,
                    "{id}: {w}"
                );
                assert!(
                    w["prompt_tokens"]["per_s"].as_f64().unwrap() > 0.0,
                    "{id}: {w}"
                );
            } else {
                assert!(
                    w["embedded_sequences"]["increase"].as_f64().unwrap() > 0.0,
                    "{id}: {w}"
                );
            }
        }
        if let Some(chat) = c["workloads"].get("chat") {
            assert_eq!(c["presets"]["chat"]["preset"], "seed-gen", "{id}");
            assert_eq!(c["presets"]["chat"]["streamed"], false, "{id}");
            assert!(chat.get("ttft_ms").is_none(), "{id}: {chat}");
            assert!(
                chat["latency_ms"]["p50"].as_f64().unwrap() > 0.0,
                "{id}: {chat}"
            );
        }
        if c["workloads"].get("vec").is_some() {
            assert_eq!(c["presets"]["vec"]["preset"], "seed-embed", "{id}");
        }
    }
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    for needle in [
        "## Workload presets",
        "- `chat` (gen): preset seed-gen. seed-gen:",
        "chat ran as preset seed-gen, not streamed",
        "| engine (`/metrics`) | names |",
        "| gen | built-in |",
        "| emb | built-in |",
    ] {
        assert!(md.contains(needle), "missing {needle} in\n{md}");
    }
    assert!(
        !md.contains("| not scraped") && !md.contains(": not scraped ("),
        "{md}"
    );
    // the engines are gone with the run
    for port in [gen_port, emb_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still served"
        );
    }
}
