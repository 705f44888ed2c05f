//! SLO control in the lab, end to end on the CPU (issue 18), with real built-in engines:
//! examples/slo-lab-cpu.toml, a latency generator beside a best-effort embedder that steps
//! from 25% of its solo capacity to saturating mid-window, time-sliced, static and under the
//! gateway's controller. The generator's SLO is made one no request can meet, so that the
//! controller must cut the best-effort limit whatever the machine's speed: the test asserts
//! what the run recorded (the controlled window went through the gateway, its timeline
//! holds the limit falling to its floor, the flood after the step was queued and refused
//! with 429, the static window went straight to the engines), never a latency or a rate.

mod common;

use std::path::Path;
use std::time::Instant;

use common::{colocate, workspace_root};

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn a_controlled_condition_runs_through_the_gateway_and_records_the_controller() {
    let example =
        std::fs::read_to_string(workspace_root().join("examples/slo-lab-cpu.toml")).unwrap();
    // an objective no request meets: the controller decreases on every fresh sample; the
    // TPOT objective stays the example's, 1.25 x the generator's solo TPOT p99
    let text = example.replace(
        "slo = { ttft_p99 = \"25ms\" }",
        "slo = { ttft_p99 = \"1us\" }",
    );
    assert_ne!(text, example, "the example's SLO line changed");
    assert!(text.contains("[control_slo.gen]\ntpot_p99 = 1.25\n"));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("slo-lab-cpu.toml");
    std::fs::write(&file, &text).unwrap();
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
    for c in conds {
        assert!(c.get("failed").is_none(), "condition failed: {c:#}");
    }
    let find = |control: bool| {
        conds
            .iter()
            .find(|c| {
                c["condition"]["sharing"] == "timeslice"
                    && c["condition"].get("control").is_some_and(|v| v == true) == control
            })
            .unwrap_or_else(|| panic!("no co-located condition with control = {control}"))
    };
    let (fixed, ctl) = (find(false), find(true));
    assert!(ctl["condition"]["label"]
        .as_str()
        .unwrap()
        .contains("timeslice controlled: "));
    // the step, resolved: 25% of the solo capacity first, 32 in flight after
    let step = &ctl["condition"]["loads"]["embed"]["step"];
    assert_eq!(step["at"], "50%", "{step:#}");
    assert_eq!(step["concurrency"], 32, "{step:#}");
    assert!(ctl["resolved_rates"]["embed"].as_f64().unwrap() > 0.0);

    // the static window went straight to the engines: no gateway, no controller
    assert!(fixed.get("gateway").is_none(), "{:#}", fixed["gateway"]);

    // the TPOT SLO set from the generator's solo run, recorded with the condition and in the
    // deployment it started (the run's deployments/ folder)
    assert!(fixed.get("control_slo").is_none(), "{fixed:#}");
    let set = ctl["control_slo"].as_array().expect("control_slo recorded");
    assert_eq!(set.len(), 1, "{set:#?}");
    let s = &set[0];
    assert_eq!(
        (&s["engine"], &s["metric"]),
        (&"gen".into(), &"tpot_p99".into())
    );
    assert_eq!(s["factor"].as_f64(), Some(1.25));
    let solo_ms = s["solo_ms"].as_f64().unwrap();
    let solo_tpot = conds
        .iter()
        .find(|c| c["condition"]["sharing"] == "solo" && c["workloads"].get("gen").is_some())
        .and_then(|c| c["workloads"]["gen"]["tpot_ms"]["p99"].as_f64())
        .expect("the generator's solo TPOT p99");
    assert!(
        (solo_ms - solo_tpot).abs() < 1e-9,
        "{s:#} vs solo {solo_tpot}"
    );
    assert!(
        s["solo"]
            .as_str()
            .unwrap()
            .starts_with("gen c=2, 1 solo run"),
        "{s:#}"
    );
    let slo_text = s["slo"].as_str().unwrap().to_string();
    let slo = serde_json::from_value::<lab::control_slo::SoloSlo>(s.clone())
        .unwrap()
        .slo;
    assert!(
        (slo.as_secs_f64() * 1e3 - 1.25 * solo_ms).abs() < 1e-3,
        "{slo_text} is not 1.25 x {solo_ms} ms"
    );
    let toml_of = |dir: &std::path::Path| {
        std::fs::read_to_string(dir.join("deployment.toml")).unwrap_or_default()
    };
    let written: Vec<(String, String)> = std::fs::read_dir(run.join("deployments"))
        .unwrap()
        .map(|d| {
            let d = d.unwrap().path();
            (
                d.file_name().unwrap().to_string_lossy().into_owned(),
                toml_of(&d),
            )
        })
        .collect();
    let (name, deployed) = written
        .iter()
        .find(|(n, _)| n.contains("controlled"))
        .unwrap_or_else(|| panic!("no controlled deployment in {written:?}"));
    assert!(name.contains("slo_gen_tpot_p99_"), "{name}");
    assert!(
        deployed.contains(&format!("tpot_p99 = \"{slo_text}\""))
            && deployed.contains("ttft_p99 = \"1us\""),
        "{name}: {deployed}"
    );

    // the controlled one through the gateway, whose controller is in the results
    let g = &ctl["gateway"];
    assert_eq!(g["url"], "http://127.0.0.1:28491", "{g:#}");
    let samples = g["samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "{g:#}");
    let limits: Vec<f64> = samples
        .iter()
        .map(|s| s["limit"].as_f64().unwrap())
        .collect();
    let s = &g["summary"];
    // the limit starts at max_best_effort and falls to min_best_effort: the recorded
    // samples and the decisions say so
    let first_limit = limits[0];
    assert!(first_limit <= 16.0, "{limits:?}");
    assert_eq!(s["limit_min"].as_f64().unwrap(), 1.0, "{s:#} {limits:?}");
    assert!(limits.contains(&1.0), "{limits:?}");
    assert!(
        s["decreases"].as_f64().unwrap() + decreases_before(samples) >= 1.0,
        "{s:#}"
    );
    let pressure = s["pressure_max"].as_f64().unwrap();
    assert!(pressure > 1.0, "an objective of 1 µs is missed: {pressure}");
    // the flood after the step: more than the one place and its queue of 16 at once, so
    // the gateway queued and refused (429); bench counted the refusals as errors
    assert!(s["rejected"].as_f64().unwrap() > 0.0, "{s:#}");
    assert!(s["queued_max"].as_f64().unwrap() > 0.0, "{s:#}");
    let embed = &ctl["workloads"]["embed"];
    let errors: u64 = embed["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(errors > 0, "{embed:#}");
    assert!(embed["completed"].as_u64().unwrap() > 0, "{embed:#}");
    // the generator went through the gateway, unthrottled
    let gen = &ctl["workloads"]["gen"];
    assert!(gen["completed"].as_u64().unwrap() > 0, "{gen:#}");
    assert!(gen["errors"].as_object().unwrap().values().all(|v| v == 0));

    // the report: the controlled row beside the static one, the step, the timeline
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    let a = json(&run.join("analysis.json"));
    let cells = a["cells"].as_array().unwrap();
    let ci = cells
        .iter()
        .position(|c| c["label"] == ctl["condition"]["label"])
        .unwrap();
    let si = cells
        .iter()
        .position(|c| c["label"] == fixed["condition"]["label"])
        .unwrap();
    for needle in [
        "## SLO control".to_string(),
        format!(
            "| C{} | {} |",
            ci + 1,
            ctl["condition"]["label"].as_str().unwrap()
        ),
        format!("| C{} (", si + 1),
        "Load steps:".to_string(),
        format!("| C{} | controller's limit |", ci + 1),
        format!("| C{} | efficiency | |", ci + 1),
        "| # | workload | throughput of solo | TPOT p99 / solo | latency p99 / solo |".to_string(),
        format!("| C{} | gen |", ci + 1),
        format!("![C{} over time](timeline-C{}.svg)", ci + 1, ci + 1),
        "Controller SLO set from the solo run (`control_slo`): gen SLO tpot_p99 ".to_string(),
        format!("- C{}: gen SLO tpot_p99 ", ci + 1),
    ] {
        assert!(md.contains(&needle), "report lacks {needle:?}:\n{md}");
    }
    let svg = std::fs::read_to_string(run.join(format!("timeline-C{}.svg", ci + 1))).unwrap();
    for label in ["gateway SLO controller", "limit", "waiting", "load step"] {
        assert!(svg.contains(label), "{label} not in the timeline");
    }
}

/// Decreases counted before the window opened (the controller acts from the warm-up on):
/// the first sample's counter.
fn decreases_before(samples: &[serde_json::Value]) -> f64 {
    samples[0]["decreases"].as_f64().unwrap_or(0.0)
}
