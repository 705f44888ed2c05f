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

#[test]
fn quickstart_dry_run_with_overrides() {
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
            good.replace("duration = \"10s\"", "duration = \"soon\""),
            "bad duration",
        ),
        (
            good.replace("ttft_p99 = \"2s\"", "ttft_p98 = \"2s\""),
            "ttft_p98",
        ),
    ];
    for (i, (body, needle)) in cases.iter().enumerate() {
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
    std::fs::write(&p, good.replace("port = 38102", "port = 38101")).unwrap();
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
