//! `colocate lab` from the command line, without running engines: plans, dry-runs and the
//! errors a user can cause.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_colocate"))
        .arg("lab")
        .args(args)
        .current_dir(root())
        .output()
        .expect("run colocate")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn h100_study_dry_run_plans_every_condition() {
    let o = lab(&["run", "examples/h100-gen-embed.toml", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    // 16 co-located + 5 implied solo baselines, 2 repetitions
    assert!(
        out.contains("42 conditions (21 distinct x 2 repetitions)"),
        "{out}"
    );
    assert!(out.contains("mps sm 70/30"), "{out}");
    assert!(out.contains("rate=25%solo"), "{out}");
    assert!(out.contains("estimated time:"), "{out}");
}

#[test]
fn h100_study_pair_b_dry_run_plans_every_condition() {
    let o = lab(&["run", "examples/h100-gen-embed-8b.toml", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("42 conditions (21 distinct x 2 repetitions)"),
        "{out}"
    );
    assert!(out.contains("mem 0.45/0.45"), "{out}");
}

/// The quickstart's embedder, fetched as the other end-to-end tests do.
fn fetch_minilm() {
    let st = Command::new("bash")
        .arg("scripts/fetch-minilm.sh")
        .current_dir(root())
        .status()
        .expect("run fetch-minilm.sh");
    assert!(st.success(), "scripts/fetch-minilm.sh failed");
}

#[test]
fn quickstart_dry_run_with_overrides() {
    fetch_minilm();
    let o = lab(&[
        "run",
        "examples/quickstart.toml",
        "--dry-run",
        "--warmup",
        "1s",
        "--duration",
        "3s",
        "--repetitions",
        "2",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("10 conditions (5 distinct x 2 repetitions), warm-up 1s, window 3s"),
        "{out}"
    );
}

#[test]
fn experiment_file_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("examples/quickstart.toml")).unwrap();
    let cases = [
        (
            good.replace("repetitions = 1", "repetitons = 1"),
            "repetitons",
        ),
        (
            good.replace("engine = \"embed\"", "engine = \"embedder\""),
            "workloads[1] (vectors).engine",
        ),
        (
            good.replace("sharing = [\"timeslice\"]", "sharing = [\"solo\"]"),
            "axes.sharing[0]",
        ),
        (
            good.replace("rate = [\"50% of solo\"]", "rate = [\"half\"]"),
            "bad rate",
        ),
        (
            good.replace("duration = \"4s\"", "duration = \"soon\""),
            "bad duration",
        ),
        (
            good.replace("ttft_p99 = \"2s\"", "ttft_p98 = \"2s\""),
            "ttft_p98",
        ),
    ];
    for (i, (body, needle)) in cases.iter().enumerate() {
        assert_ne!(
            body, &good,
            "case {i}: the edit no longer applies to quickstart.toml"
        );
        let p = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&p, body).unwrap();
        let o = lab(&["run", p.to_str().unwrap(), "--dry-run"]);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "case {i} accepted:\n{out}");
        assert!(err.contains(needle), "case {i}: {needle:?} not in:\n{err}");
        assert!(
            err.contains(&format!("bad{i}.toml")),
            "case {i}: file not named:\n{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // a deployment error is caught by the deploy crate before anything starts
    let p = dir.path().join("baddeploy.toml");
    std::fs::write(&p, good.replace("port = 28102", "port = 28101")).unwrap();
    let o = lab(&["run", p.to_str().unwrap(), "--dry-run"]);
    assert!(!o.status.success());
    let (_, err) = text(&o);
    assert!(err.contains("port"), "{err}");

    let o = lab(&["run", "no/such/file.toml"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("no/such/file.toml"));
}

#[test]
fn report_and_resume_of_missing_runs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for args in [
        vec!["report", d],
        vec!["run", "--resume", d],
        vec!["compare", d, d],
    ] {
        let o = lab(&args);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains("results.json"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn missing_model_folder_fails_before_anything_runs_and_says_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("examples/quickstart.toml")).unwrap();
    let minilm = dir.path().join("models/all-minilm-l6-v2");
    let cases = [
        (
            good.replace("models/all-minilm-l6-v2", minilm.to_str().unwrap()),
            vec![
                "deployment.engines[1] (embed).model",
                "does not exist",
                "run ./scripts/fetch-minilm.sh",
            ],
        ),
        (
            good.replace("models/all-minilm-l6-v2", "no/such/model"),
            vec![
                "deployment.engines[1] (embed).model: \"no/such/model\" does not exist",
                "preset:NAME",
            ],
        ),
    ];
    for (i, (body, needles)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("missing{i}.toml"));
        std::fs::write(&p, body).unwrap();
        let out = dir.path().join(format!("run{i}"));
        for dry in [true, false] {
            let mut args = vec!["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()];
            if dry {
                args.push("--dry-run");
            }
            let t0 = std::time::Instant::now();
            let o = lab(&args);
            let (stdout, err) = text(&o);
            assert!(
                !o.status.success(),
                "case {i} (dry {dry}) accepted:\n{stdout}\n{err}"
            );
            for n in needles {
                assert!(
                    err.contains(n),
                    "case {i} (dry {dry}): {n:?} not in:\n{err}"
                );
            }
            assert!(!err.contains("panicked"), "{err}");
            assert!(!out.exists(), "case {i}: a run folder was created");
            assert!(
                t0.elapsed().as_secs() < 20,
                "case {i}: it ran something first"
            );
        }
    }
}

#[test]
fn a_run_that_measures_no_co_located_condition_fails_and_lists_why() {
    // the embedder's folder exists but its config.json is not a model's: the check up
    // front lets it through, the engine fails to start, every condition with it fails
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken-model");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{}").unwrap();
    let good = std::fs::read_to_string(root().join("examples/quickstart.toml")).unwrap();
    let body = good
        .replace("models/all-minilm-l6-v2", broken.to_str().unwrap())
        .replace("port = 28101", "port = 28171")
        .replace("port = 28102", "port = 28172");
    let p = dir.path().join("broken.toml");
    std::fs::write(&p, body).unwrap();
    let out = dir.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_colocate"))
        .args(["lab", "run", p.to_str().unwrap(), "--out"])
        .arg(&out)
        .args(["--warmup", "0s", "--duration", "1s", "--quiet"])
        .current_dir(root())
        .env("COLOCATE_BIN", env!("CARGO_BIN_EXE_colocate"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run colocate");
    let (stdout, err) = text(&o);
    assert!(!o.status.success(), "accepted:\n{stdout}\n{err}");
    assert!(
        err.contains("no co-located condition could be measured"),
        "{err}"
    );
    // the end lists every failed condition with its reason
    assert!(err.contains("4 of 5 conditions failed:"), "{err}");
    assert!(err.contains("  solo embed: vectors c=2 b=1 #1: "), "{err}");
    assert!(
        err.contains("  timeslice: chat c=4, vectors c=2 b=1 #1: "),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // what was measured is still reported
    assert!(out.join("report.md").exists(), "{stdout}\n{err}");
    assert!(stdout.contains("report: "), "{stdout}");
}

/// A resume may raise a run's repetitions (the dry run lists what is then left: every
/// condition's new repetitions and the ones never measured) but not lower them, and a dry
/// run writes nothing.
#[test]
fn a_resume_raises_the_repetitions_but_never_lowers_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("docs/results/2026-12-01-h200-seeds-vllm/results.json");
    let mut r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    r["experiment"]["repetitions"] = 1.into();
    let measured = r["conditions"].as_array().unwrap().len();
    let file = dir.path().join("results.json");
    let text_before = serde_json::to_string_pretty(&r).unwrap();
    std::fs::write(&file, &text_before).unwrap();
    let d = dir.path().to_str().unwrap();

    let o = lab(&["run", "--resume", d, "--repetitions", "3", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("2 more repetition(s) of every condition"),
        "{err}"
    );
    // 27 conditions x 3, less those measured once
    let left = 27 * 3 - measured;
    assert!(out.contains(&format!("{left} conditions")), "{out}");
    assert!(out.contains("x 3 repetitions"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text_before);

    r["experiment"]["repetitions"] = 2.into();
    std::fs::write(&file, serde_json::to_string_pretty(&r).unwrap()).unwrap();
    let o = lab(&["run", "--resume", d, "--repetitions", "1", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("--repetitions 1: the run has 2") && !err.contains("panicked"),
        "{err}"
    );
}
