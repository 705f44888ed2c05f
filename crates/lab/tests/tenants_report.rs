//! Many tenants in the report, from synthetic results (no engines): a scaling run with
//! copies of a small model beside a larger one. The report must show each tenant's
//! percentiles and violins, the fairness between the equal copies (Jain's index and both
//! significance tests, which find the copy that was served slower), the scaling steps, the
//! trade-off of more than two tenants, and the drain and its unfinished responses.

use std::collections::BTreeMap;
use std::path::Path;

use lab::analysis::analyse;
use lab::matrix::plan;
use lab::report::render;
use lab::results::{
    host_environment, ConditionResult, CopyOf, DrainWait, LatencySample, Percentiles, Results,
    WorkloadMetrics, SCHEMA_VERSION,
};
use lab::spec::{Experiment, Kind};

fn example() -> (Experiment, String) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/scaling-cpu.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    (Experiment::parse(&text).unwrap(), text)
}

/// `n` latencies around `center` ms, spread by a deterministic wave.
fn latencies(center: f64, n: usize, phase: f64) -> Vec<f64> {
    (0..n)
        .map(|i| center * (1.0 + 0.15 * ((i as f64 * 0.61 + phase).sin())))
        .collect()
}

fn percentiles(sample: &[f64]) -> Percentiles {
    let mut s = sample.to_vec();
    s.sort_by(f64::total_cmp);
    let p = |q: f64| bench::metrics::percentile_sorted(&s, q);
    Percentiles {
        mean: s.iter().sum::<f64>() / s.len() as f64,
        p50: p(50.0),
        p90: p(90.0),
        p95: p(95.0),
        p99: p(99.0),
    }
}

fn tenant(
    engine: &str,
    kind: Kind,
    throughput: f64,
    sample: Vec<f64>,
    copy: Option<(&str, u32)>,
) -> WorkloadMetrics {
    WorkloadMetrics {
        kind: Some(kind),
        engine: engine.into(),
        throughput,
        requests_per_s: throughput / 32.0,
        completed: sample.len() as u64,
        latency_ms: Some(percentiles(&sample)),
        latency_sample: Some(LatencySample::of(&sample)),
        copy_of: copy.map(|(w, i)| CopyOf {
            workload: w.into(),
            index: i,
        }),
        ..Default::default()
    }
}

/// Solo chat: 1000 tok/s at 20 ms; each of k copies gets 1000/k (copy 1 of every step
/// a little less and 30% slower); vectors alone 200 seq/s at 10 ms, beside four copies
/// 120 seq/s at 14 ms, drained and with two responses cut.
fn synthetic() -> Results {
    let (exp, text) = example();
    let mut conditions = Vec::new();
    for c in plan(&exp) {
        let mut workloads = BTreeMap::new();
        let k = c.copies_of("small");
        if k == 1 && c.is_solo() {
            workloads.insert(
                "chat".to_string(),
                tenant(
                    "small",
                    Kind::Generate,
                    1000.0,
                    latencies(20.0, 300, 0.0),
                    None,
                ),
            );
        } else if k > 1 {
            for i in 0..k {
                let slow = if i == 1 { 1.3 } else { 1.0 };
                let share = if i == 1 { 0.9 } else { 1.0 };
                workloads.insert(
                    format!("chat-{i}"),
                    tenant(
                        &format!("small-{i}"),
                        Kind::Generate,
                        1000.0 / k as f64 * share,
                        latencies(20.0 * k as f64 * slow, 300, i as f64),
                        Some(("chat", i)),
                    ),
                );
            }
        }
        if c.copies_of("large") == 1 {
            let co = !c.is_solo();
            let mut v = tenant(
                "large",
                Kind::Embed,
                if co { 120.0 } else { 200.0 },
                latencies(if co { 14.0 } else { 10.0 }, 400, 0.3),
                None,
            );
            v.drain = Some(DrainWait {
                waited_s: 0.4,
                timeout_s: 0.8,
                timed_out: co,
            });
            v.unfinished = if co { 2 } else { 0 };
            workloads.insert("vectors".to_string(), v);
        }
        conditions.push(ConditionResult {
            failed: None,
            window: Some((1000.0, 1004.0)),
            workloads,
            ..ConditionResult::failed(c, String::new())
        });
    }
    Results {
        schema_version: SCHEMA_VERSION,
        experiment: exp,
        experiment_text: text,
        experiment_path: "examples/scaling-cpu.toml".into(),
        environment: host_environment(),
        started_at: "2026-12-01T00:00:00Z".into(),
        updated_at: "2026-12-01T00:01:00Z".into(),
        complete: true,
        command: "colocate lab run examples/scaling-cpu.toml".into(),
        conditions,
        superseded: Vec::new(),
    }
}

#[test]
fn the_example_plans_its_steps() {
    let (exp, _) = example();
    let p = plan(&exp);
    let labels: Vec<&str> = p.iter().map(|c| c.label.as_str()).collect();
    assert_eq!(p.len(), 7, "{labels:#?}");
    assert!(
        labels.contains(&"timeslice [10 small]: chat c=2"),
        "{labels:#?}"
    );
    assert!(
        labels.contains(&"timeslice [4 small + 1 large]: chat c=2, vectors c=2 b=4"),
        "{labels:#?}"
    );
    // every step's deployment is valid (ports 28301.. for the copies, not the embedder's)
    lab::deployments::Deployments::check(&exp, &p).unwrap();
}

#[test]
fn fairness_and_scaling_are_reported() {
    let results = synthetic();
    let a = analyse(&results);
    // the 4 + 1 step: efficiency = 4 x 0.25 (copy 1: 0.225) + 0.6
    let mixed = a
        .cells
        .iter()
        .find(|c| c.label.starts_with("timeslice [4 small + 1 large]"))
        .unwrap();
    assert!((mixed.efficiency.unwrap().mean - (0.975 + 0.6)).abs() < 1e-9);
    assert_eq!(mixed.totals["chat"].tenants, 4);
    assert!((mixed.totals["chat"].throughput.mean - 975.0).abs() < 1e-9);
    let f = mixed.fairness.as_ref().unwrap();
    // the copies are equal tenants; the embedder is not one of them
    assert_eq!(f.classes.len(), 1);
    assert_eq!(
        f.classes[0].tenants,
        vec!["chat-0", "chat-1", "chat-2", "chat-3"]
    );
    // Jain of (250, 225, 250, 250)
    let x = [250.0f64, 225.0, 250.0, 250.0];
    let want = x.iter().sum::<f64>().powi(2) / (4.0 * x.iter().map(|v| v * v).sum::<f64>());
    assert!((f.classes[0].jain.unwrap().mean - want).abs() < 1e-12);
    // the slower copy differs from each other copy by both tests; the others do not
    for p in &f.classes[0].pairs {
        let involves_slow = p.a == "chat-1" || p.b == "chat-1";
        assert_eq!(p.significant(), involves_slow, "{p:?}");
        if involves_slow {
            assert!(
                p.welch.unwrap().p < 1e-6 && p.mann_whitney.unwrap().p < 1e-6,
                "{p:?}"
            );
        }
    }
    // slowdowns against the workloads alone: 4 x 20 ms over 20 ms, 14 over 10
    let chat0 = &mixed.workloads["chat-0"];
    assert!((chat0.slowdown_p50.unwrap() - 4.0).abs() < 0.2, "{chat0:?}");
    assert!((mixed.workloads["vectors"].slowdown_p50.unwrap() - 1.4).abs() < 0.05);

    let dir = tempfile::tempdir().unwrap();
    let r = render(&results, dir.path(), None).unwrap();
    let md = std::fs::read_to_string(&r.report).unwrap();
    for needle in [
        "## Fairness",
        "| # | condition | tenants | Jain (vs solo) | worst slowdown p50 | equal tenants: Jain | significant pairs |",
        "chat-0, chat-1, chat-2, chat-3: 0.998",
        "3 of 6",
        "## Scaling",
        "| C7 | timeslice: chat c=2, vectors c=2 b=4 | 4 small + 1 large | 5 |",
        "975.0 tok/s (243.8 each)",
        "scaling.svg",
        "each tenant's fraction of its solo throughput against the others' together",
        "| tenant | workload | engine | latency mean ms | p50 | p90 | p95 | p99 | slowdown p50 | slowdown p99 | sampled |",
        "| chat-3 | chat | small-3 |",
        "Equal tenants chat-0, chat-1, chat-2, chat-3 (generate on preset:qwen3-tiny (builtin), c=2)",
        "| chat-0 vs chat-1 | 300 / 300 |",
        "**significant**",
        "not significant",
        "![C7 latency per tenant](latency-C7.svg)",
        "Drain: the run waited up to 0.4 s after the window for the whole responses of vectors still in flight and hit its time-out (0.8 s): some were cut.",
        "Unfinished whole responses (sent before the window's end, cut by the drain's time-out: their tokens are missing, so these throughputs are underestimates): vectors 2.",
        "(time-out 0.8 s, not reached)",
        "975.0 tok/s (4 copies) | -75.6% each |",
        // ten copies: the class shortened, 45 pairs, the ten most different listed
        "chat-0, chat-1, ... chat-9 (10): 0.999",
        "45 pairs, 9 significant; the 10 most different:",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    }
    for f in [
        "latency-C1.svg",
        "latency-C7.svg",
        "scaling.svg",
        "tradeoff.svg",
    ] {
        let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 1000, "{f}");
    }
    let violins = std::fs::read_to_string(dir.path().join("latency-C7.svg")).unwrap();
    for label in ["chat solo", "vectors solo", "chat-3", "vectors"] {
        assert!(violins.contains(label), "{label} not in the violins");
    }
}
