//! Ctrl-C during `colocate lab run`: the window in progress is dropped, every finished
//! condition stays in results.json, no engine is left running, and `--resume` finishes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const EXP: &str = r#"
name = "interrupt"
warmup = "1s"
duration = "2s"
[deployment]
gpu = "cpu"
[[deployment.engines]]
name = "gen"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "generate"
port = 28121
load_format = "dummy"
[[deployment.engines]]
name = "emb"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "embed"
port = 28122
load_format = "dummy"
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 2
input_tokens = 16
output_tokens = 8
[[workloads]]
name = "vec"
engine = "emb"
kind = "embed"
concurrency = 1
batch = 2
input_tokens = 16
[axes]
sharing = ["timeslice"]
[axes.load.chat]
concurrency = [1, 2, 4]
"#;

fn results(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("results.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn port_free(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[test]
fn ctrl_c_keeps_finished_conditions_and_resume_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("interrupt.toml");
    std::fs::write(&exp, EXP).unwrap();
    let run = tmp.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_colocate"))
        .args([
            "lab",
            "run",
            exp.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--quiet",
        ])
        .current_dir(root())
        .env("COLOCATE_BIN", env!("CARGO_BIN_EXE_colocate"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait until two conditions are recorded, then interrupt in the middle of the plan
    let start = Instant::now();
    loop {
        let n = results(&run)
            .map(|r| r["conditions"].as_array().map_or(0, |c| c.len()))
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "lab exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("run incomplete"), "{stdout}");
    assert!(stdout.contains("--resume"), "{stdout}");
    let r = results(&run).unwrap();
    assert_eq!(r["complete"], false);
    let done = r["conditions"].as_array().unwrap().clone();
    assert!(done.len() >= 2 && done.len() < 7, "{} recorded", done.len());
    for c in &done {
        assert!(
            c.get("failed").is_none(),
            "interrupted window recorded as a failure: {c}"
        );
    }
    // no engine left behind
    let t = Instant::now();
    while !(port_free(28121) && port_free(28122)) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "an engine is still listening"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let o = Command::new(env!("CARGO_BIN_EXE_colocate"))
        .args(["lab", "run", "--resume", run.to_str().unwrap(), "--quiet"])
        .current_dir(root())
        .env("COLOCATE_BIN", env!("CARGO_BIN_EXE_colocate"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2 = results(&run).unwrap();
    assert_eq!(r2["complete"], true);
    let all = r2["conditions"].as_array().unwrap();
    // solo gen at c=1,2,4, solo emb, three co-located
    assert_eq!(all.len(), 7);
    assert_eq!(
        &all[..done.len()],
        &done[..],
        "finished conditions kept as they were"
    );
}
