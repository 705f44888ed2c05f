//! `scripts/hostile-sweep.py` against real `colocate serve` processes: a qwen3-tiny
//! generator with dummy weights and the all-MiniLM-L6-v2 embedder. Every bad request must
//! get a 4xx with an OpenAI error body (or a valid success), connection abuse must leave
//! the servers answering, and the sweep ends with both alive and the generator's KV
//! accounting whole. The script is Python 3 standard library only.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::workspace_root;

#[test]
fn hostile_sweep_leaves_the_servers_alive_and_whole() {
    let root = workspace_root();

    let (gen, emb) = common::start_tiny_and_minilm();
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let mut child = Command::new("python3")
        .arg(root.join("scripts/hostile-sweep.py"))
        .args(["--gen", &format!("http://127.0.0.1:{}", gen.port)])
        .args(["--embed", &format!("http://127.0.0.1:{}", emb.port)])
        .args(["--budget", "150"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("reopen"))
        .stderr(log.reopen().expect("reopen"))
        .spawn()
        .expect("cannot start python3 scripts/hostile-sweep.py");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
    let failures: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        status.is_some_and(|s| s.success()),
        "hostile sweep failed ({:?}, {:.0}s):\n{}\n\n--- all cases:\n{text}\n--- generator log (tail):\n{}\n--- embedder log (tail):\n{}",
        status,
        t0.elapsed().as_secs_f64(),
        failures.join("\n"),
        tail(&gen.log(), 40),
        tail(&emb.log(), 40)
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
    println!("{text}");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
