//! The quickstart experiment end to end, as CI runs it: real built-in engines (qwen3-tiny
//! with dummy weights and the real all-MiniLM-L6-v2) on the CPU, shortened windows; then
//! the report's tables and plots, resume after an interruption, re-render and compare.

mod common;

use std::path::Path;

use common::colocate;

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn quickstart_runs_reports_and_resumes() {
    common::fetch_minilm();

    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run_s = run.to_str().unwrap();
    let (ok, out, err) = colocate(&[
        "lab",
        "run",
        "examples/quickstart.toml",
        "--warmup",
        "1s",
        "--duration",
        "4s",
        "--out",
        run_s,
        "--quiet",
    ]);
    assert!(ok, "quickstart failed:\n{out}\n{err}");
    assert!(
        out.contains("| # | condition |"),
        "no headline table printed:\n{out}"
    );
    assert!(out.contains(&format!("report: {run_s}/report.md")), "{out}");

    // results.json: every condition measured, with real figures
    let r = json(&run.join("results.json"));
    assert_eq!(r["schema_version"], 1);
    assert_eq!(r["complete"], true);
    assert!(
        r["experiment"]["deployment"]["engines"].is_array(),
        "full config is recorded"
    );
    assert!(
        r["environment"]["gpu_unavailable"].as_str().is_some()
            || r["environment"]["gpus"]
                .as_array()
                .is_some_and(|g| !g.is_empty())
    );
    let conds = r["conditions"].as_array().unwrap();
    assert_eq!(conds.len(), 5, "{conds:#?}");
    for c in conds {
        assert!(c.get("failed").is_none(), "condition failed: {c:#}");
    }
    let chat_solo = conds[0]["workloads"]["chat"]["throughput"]
        .as_f64()
        .unwrap();
    let vec_solo = conds[1]["workloads"]["vectors"]["throughput"]
        .as_f64()
        .unwrap();
    assert!(
        chat_solo > 0.0 && vec_solo > 0.0,
        "solo throughputs {chat_solo} {vec_solo}"
    );
    // the relative rate was derived from the solo capacity (requests/s at batch 1)
    let rate = conds[2]["resolved_rates"]["vectors"].as_f64().unwrap();
    assert!(
        (rate - 0.5 * vec_solo / 1.0).abs() < 1e-9,
        "rate {rate} vs solo {vec_solo}"
    );
    let co = &conds[3];
    assert_eq!(co["condition"]["sharing"], "timeslice");
    assert!(co["workloads"]["chat"]["throughput"].as_f64().unwrap() > 0.0);
    assert!(co["workloads"]["chat"]["ttft_ms"]["p99"].as_f64().unwrap() > 0.0);

    // the report: tables, efficiency, plots, recommendation
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    for needle in [
        "## Environment",
        "## Headline",
        "## Recommendation",
        "## Conditions",
        "| # | condition |",
        "efficiency",
        "TTFT p99 ms",
        "GPU counters: unavailable",
        "![throughput per condition](throughput.svg)",
        "tradeoff.svg",
        "timeline.svg",
        "## Experiment file",
    ] {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
    for svg in ["throughput.svg", "tradeoff.svg", "timeline.svg"] {
        let s = std::fs::read_to_string(run.join(svg)).unwrap();
        assert!(
            s.contains("<svg") && s.contains("</svg>") && s.len() > 1000,
            "{svg}"
        );
    }
    let analysis = json(&run.join("analysis.json"));
    let eff = analysis["cells"][3]["efficiency"]["mean"].as_f64();
    assert!(
        eff.is_some_and(|e| e > 0.0 && e < 4.0),
        "efficiency of C4: {eff:?}"
    );

    // interrupted after three conditions: resume measures only the rest and keeps those
    let run2 = tmp.path().join("run2");
    std::fs::create_dir(&run2).unwrap();
    let mut cut = r.clone();
    cut["conditions"] = serde_json::Value::Array(conds[..3].to_vec());
    cut["complete"] = serde_json::Value::Bool(false);
    std::fs::write(
        run2.join("results.json"),
        serde_json::to_vec_pretty(&cut).unwrap(),
    )
    .unwrap();
    let run2_s = run2.to_str().unwrap();
    let (ok, out, err) = colocate(&["lab", "run", "--resume", run2_s, "--quiet"]);
    assert!(ok, "resume failed:\n{out}\n{err}");
    let r2 = json(&run2.join("results.json"));
    assert_eq!(r2["complete"], true);
    let conds2 = r2["conditions"].as_array().unwrap();
    assert_eq!(conds2.len(), 5);
    assert_eq!(
        &conds2[..3],
        &conds[..3],
        "finished conditions must be kept as they were"
    );
    assert!(
        conds2[3]["window"][0].as_f64().unwrap() > conds[4]["window"][1].as_f64().unwrap(),
        "C4 was measured again"
    );

    // re-render from results.json and compare the two runs
    std::fs::remove_file(run2.join("report.md")).unwrap();
    let (ok, out, err) = colocate(&["lab", "report", run2_s]);
    assert!(ok, "{out}\n{err}");
    assert!(run2.join("report.md").exists());
    let (ok, out, err) = colocate(&["lab", "compare", run_s, run2_s]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("| condition | workload | quickstart | quickstart | change |"),
        "{out}"
    );
    assert!(
        out.contains("timeslice: chat c=4, vectors c=2 b=1"),
        "{out}"
    );
}
