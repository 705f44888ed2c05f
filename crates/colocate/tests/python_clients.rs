//! The official `openai` Python client against real `colocate serve` processes (a
//! qwen3-tiny generator with dummy weights and the all-MiniLM-L6-v2 embedder):
//! completions, chat plain and streamed, embeddings with the client's defaults (base64),
//! and its error types on bad input. The client lives in `.venv`, installed by
//! `scripts/setup-python.sh` (which `scripts/test.sh` runs first); without it this test
//! fails and says so.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::workspace_root;

#[test]
fn openai_python_client_works_against_colocate_serve() {
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    let has_client = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success());
    assert!(
        has_client,
        "the openai Python client is not installed in {}: run ./scripts/setup-python.sh \
         (./scripts/test.sh runs it before the tests)",
        root.join(".venv").display()
    );

    let (gen, emb) = common::start_tiny_and_minilm();
    let out = run_with_timeout(
        Command::new(&python)
            .arg(root.join("crates/colocate/tests/py/openai_clients.py"))
            .args(["--gen", &format!("http://127.0.0.1:{}", gen.port)])
            .args(["--gen-model", "tiny"])
            .args(["--embed", &format!("http://127.0.0.1:{}", emb.port)])
            .args(["--embed-model", "minilm"]),
        Duration::from_secs(120),
    );
    let (ok, text) = out;
    assert!(
        ok,
        "openai client checks failed:\n{text}\n--- generator log:\n{}\n--- embedder log:\n{}",
        gen.log(),
        emb.log()
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
    println!("{text}");
}

/// Runs `cmd` with stdout and stderr into one file; kills it after `timeout`. Returns
/// whether it exited 0, and what it printed.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = cmd
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("reopen"))
        .stderr(log.reopen().expect("reopen"))
        .spawn()
        .expect("cannot start python");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = std::fs::read_to_string(log.path()).unwrap_or_default();
    if status.is_none() {
        text.push_str(&format!("\n(killed after {timeout:?})"));
    }
    (status.is_some_and(|s| s.success()), text)
}
