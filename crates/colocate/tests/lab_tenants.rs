//! Many tenants end to end on the CPU (issue 20), with real built-in engines: a small model
//! in two copies (each copy a tenant of its own, driven directly) beside a second engine
//! run as two replicas of one tenant behind the gateway. Three tenants, four engine
//! processes; the report must carry each tenant's distribution and the fairness between
//! the two equal copies. And the scaling example's plan, without running it.

mod common;

use std::path::Path;
use std::time::Instant;

use common::colocate;

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

const EXP: &str = r#"
name = "tenants"
warmup = "1s"
duration = "3s"
startup_estimate = "2s"
[deployment]
gpu = "cpu"
sharing = "timeslice"
[deployment.gateway]
address = "127.0.0.1:28391"
[[deployment.engines]]
name = "small"
kind = "builtin"
model = "preset:qwen3-tiny"
served_model_name = "qwen3-tiny"
port = 28381
load_format = "dummy"
start_timeout = "60s"
[[deployment.engines]]
name = "pool"
kind = "builtin"
model = "preset:qwen3-tiny"
served_model_name = "pool"
port = 28385
replicas = 2
load_format = "dummy"
start_timeout = "60s"
[[workloads]]
name = "chat"
engine = "small"
kind = "generate"
concurrency = 2
input_tokens = 32
output_tokens = 16
[[workloads]]
name = "pooled"
engine = "pool"
kind = "generate"
concurrency = 4
input_tokens = 32
output_tokens = 16
[[conditions]]
sharing = "timeslice"
copies = { small = 2 }
"#;

#[test]
fn three_tenants_report_distributions_and_fairness() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tenants.toml");
    std::fs::write(&file, EXP).unwrap();
    let run = tmp.path().join("run");
    let started = Instant::now();
    let (ok, out, err) = colocate(&[
        "lab",
        "run",
        file.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    eprintln!("lab run took {:.1} s", started.elapsed().as_secs_f64());
    assert!(ok, "lab run failed:\n{out}\n{err}");

    let r = json(&run.join("results.json"));
    assert_eq!(r["complete"], true);
    let conds = r["conditions"].as_array().unwrap();
    // solo small, solo pool (two replicas behind the gateway), then 2 small + 1 pool
    assert_eq!(conds.len(), 3, "{conds:#?}");
    for c in conds {
        assert!(c.get("failed").is_none(), "condition failed: {c:#}");
    }
    let co = &conds[2];
    assert_eq!(co["condition"]["copies"]["small"], 2, "{co:#}");
    let tenants: Vec<&String> = co["workloads"].as_object().unwrap().keys().collect();
    assert_eq!(tenants, ["chat-0", "chat-1", "pooled"], "{co:#}");
    for t in ["chat-0", "chat-1"] {
        let w = &co["workloads"][t];
        assert_eq!(w["copy_of"]["workload"], "chat", "{w:#}");
        assert_eq!(w["engine"], format!("small-{}", &t[5..]), "{w:#}");
    }
    assert!(co["workloads"]["pooled"].get("copy_of").is_none());
    for t in &tenants {
        let w = &co["workloads"][t.as_str()];
        assert!(w["throughput"].as_f64().unwrap() > 0.0, "{t}: {w:#}");
        let sample = w["latency_sample"]["ms"].as_array().unwrap();
        assert!(!sample.is_empty(), "{t}: no latency sample");
        assert!(
            w["latency_sample"]["of"].as_u64().unwrap() >= sample.len() as u64,
            "{t}"
        );
    }
    // the pool's requests went through the gateway to both replicas
    let pool_tokens: Vec<f64> = co["engine_metrics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["engine"].as_str().is_some_and(|e| e.starts_with("pool-")))
        .map(|m| m["generation_tokens"]["increase"].as_f64().unwrap_or(0.0))
        .collect();
    assert_eq!(pool_tokens.len(), 2, "{:#}", co["engine_metrics"]);
    assert!(
        pool_tokens.iter().all(|t| *t > 0.0),
        "both replicas served: {pool_tokens:?}"
    );

    // the analysis: the copies are equal tenants, the pool is not one of them
    let a = json(&run.join("analysis.json"));
    let f = &a["cells"][2]["fairness"];
    let classes = f["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 1, "{f:#}");
    assert_eq!(
        classes[0]["tenants"],
        serde_json::json!(["chat-0", "chat-1"])
    );
    let jain = classes[0]["jain"]["mean"].as_f64().unwrap();
    assert!(jain > 0.5 && jain <= 1.0 + 1e-12, "{jain}");
    let pair = &classes[0]["pairs"][0];
    for test in ["welch", "mann_whitney"] {
        let p = pair[test]["p"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{test}: {pair:#}");
    }
    let jv = f["jain_vs_solo"].as_f64().unwrap();
    assert!(jv > 0.3 && jv <= 1.0 + 1e-12, "{jv}");
    for t in ["chat-0", "chat-1", "pooled"] {
        let s = &a["cells"][2]["workloads"][t];
        assert!(s["slowdown_p50"].as_f64().unwrap() > 0.0, "{t}: {s:#}");
        assert!(
            s["latency"]["latency_p90"]["mean"].as_f64().is_some(),
            "{t}"
        );
    }

    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    for needle in [
        "## Fairness",
        "| C3 | timeslice [2 small + 1 pool]: chat c=2, pooled c=4 | 3 |",
        "| tenant | workload | engine | latency mean ms | p50 | p90 | p95 | p99 |",
        "| chat-1 | chat | small-1 |",
        "| pooled | pooled | pool |",
        "Equal tenants chat-0, chat-1 (generate on preset:qwen3-tiny (builtin), c=2)",
        "| chat-0 vs chat-1 |",
        "![C3 latency per tenant](latency-C3.svg)",
        "each tenant's fraction of its solo throughput against the others' together",
        "## Scaling",
    ] {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
    for svg in ["latency-C3.svg", "tradeoff.svg", "scaling.svg"] {
        let s = std::fs::read_to_string(run.join(svg)).unwrap();
        assert!(s.contains("</svg>") && s.len() > 1000, "{svg}");
    }
    let violins = std::fs::read_to_string(run.join("latency-C3.svg")).unwrap();
    for label in ["chat solo", "pooled solo", "chat-0", "chat-1", "pooled"] {
        assert!(violins.contains(label), "{label} not in the violins");
    }
}

/// The scaling example plans 2, 3, 4 and 10 copies and 4 small + 1 large, counts every
/// copy's start-up and the embedder's drain in its estimate, and says so.
#[test]
fn scaling_example_dry_run() {
    common::fetch_minilm();
    let (ok, out, err) = colocate(&["lab", "run", "examples/scaling-cpu.toml", "--dry-run"]);
    assert!(ok, "{out}\n{err}");
    for needle in [
        "7 conditions (7 distinct x 1 repetitions)",
        "timeslice [10 small]: chat c=2 #1",
        "timeslice [4 small + 1 large]: chat c=2, vectors c=2 b=4 #1",
        "per engine copy per deployment",
        "a drain of 1s after each of the 2 windows with whole responses (vectors: about one E2EL, taken as the warm-up; set drain_estimate to change it)",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
}
