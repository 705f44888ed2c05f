//! `colocate plan`: golden outputs for the example deployments, and configuration errors
//! that name the file, the field and the reason (and never panic).
//!
//! Regenerate the goldens after an intended change with `UPDATE_GOLDEN=1 cargo test -p
//! colocate --test deploy_plan`, and review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_colocate"))
        .arg("plan")
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_plans_match_their_goldens() {
    let examples = [
        "deploy-cpu",
        "deploy-h100-vllm-mps",
        "deploy-h200-vllm",
        "deploy-h100-mixed",
        "up-h100-gen-embed",
        "up-h100-gen-embed-8b",
    ];
    for name in examples {
        let file = format!("examples/{name}.toml");
        let (ok, stdout, stderr) = plan(&[&file]);
        assert!(ok, "{file}: {stderr}");
        let golden = root().join(format!("crates/deploy/tests/golden/plan-{name}.txt"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &stdout).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", golden.display()));
        assert_eq!(stdout, want, "{file}: plan output changed");
    }
}

#[test]
fn plan_json_has_every_engine_command() {
    let (ok, stdout, stderr) = plan(&["examples/deploy-h100-vllm-mps.toml", "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let engines = v["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2);
    assert_eq!(engines[0]["command"][0], "vllm");
    assert_eq!(v["fits"], true);
}

#[test]
fn a_deployment_that_does_not_fit_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big.toml");
    std::fs::write(
        &f,
        r#"
gpu = 0
gpu_name = "L4"
[[engines]]
name = "gen"
kind = "vllm"
model = "Qwen/Qwen3-8B"
port = 8001
memory = 0.6
"#,
    )
    .unwrap();
    let (ok, stdout, stderr) = plan(&[f.to_str().unwrap()]);
    assert!(!ok);
    assert!(stdout.contains("DOES NOT FIT"), "{stdout}");
    assert!(stdout.contains("smaller than weights"), "{stdout}");
    assert!(stderr.contains("does not fit"), "{stderr}");
}

#[test]
fn config_errors_name_file_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let engine = |extra: &str| {
        format!(
            "[[engines]]\nname = \"gen\"\nmodel = \"preset:qwen3-tiny\"\nport = 8101\n{extra}\n"
        )
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("unknown-key", format!("gpu = \"cpu\"\n{}", engine("prot = 9")), vec!["unknown field `prot`", "line"]),
        (
            "missing-model",
            "gpu = \"cpu\"\n[[engines]]\nname = \"gen\"\nport = 8101\n".into(),
            vec!["engines[0].model", "missing"],
        ),
        (
            "over-100",
            format!(
                "gpu = 0\n{}[[engines]]\nname = \"b\"\nmodel = \"preset:qwen3-tiny\"\nport = 8102\nmemory = \"60%\"\n",
                engine("memory = 0.5")
            ),
            vec!["engines[*].memory", "budgets over 100%", "110.0%"],
        ),
        (
            "port-clash",
            format!(
                "gpu = \"cpu\"\n{}[[engines]]\nname = \"b\"\nmodel = \"preset:qwen3-tiny\"\nport = 8100\nreplicas = 2\n",
                engine("")
            ),
            vec!["engines[1].port", "port 8101 clashes with gen"],
        ),
        (
            "sm-with-timeslice",
            format!("gpu = 0\nsharing = \"timeslice\"\n{}", engine("sm_percent = 50")),
            vec!["engines[0].sm_percent", "needs sharing = \"mps\""],
        ),
        (
            "mps-on-cpu",
            format!("gpu = \"cpu\"\nsharing = \"mps\"\n{}", engine("")),
            vec!["sharing", "needs a GPU"],
        ),
        ("bad-budget", format!("gpu = 0\n{}", engine("memory = \"lots\"")), vec!["memory", "not a size"]),
        ("not-toml", "gpu = [".into(), vec!["TOML parse error"]),
    ];
    for (name, text, wants) in cases {
        let f = dir.path().join(format!("{name}.toml"));
        std::fs::write(&f, text).unwrap();
        let (ok, _, stderr) = plan(&[f.to_str().unwrap()]);
        assert!(!ok, "{name}: accepted");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(
            stderr.contains(f.to_str().unwrap()),
            "{name}: no file name in: {stderr}"
        );
        for w in wants {
            assert!(stderr.contains(w), "{name}: `{w}` not in: {stderr}");
        }
    }
    let (ok, _, stderr) = plan(&["/no/such/deploy.toml"]);
    assert!(!ok);
    assert!(
        stderr.contains("/no/such/deploy.toml: cannot read"),
        "{stderr}"
    );
}
