//! `colocate gpu` end to end. On any machine every subcommand gives a plain answer (the
//! no-GPU message and exit 1 without a GPU), never a panic; the ignored test runs the real
//! round trip with MPS on the GPU machine (scripts/gpu/gpu-tests.sh, `--include-ignored`),
//! and fails with a "no GPU" message where there is none.
use std::process::{Command, Output};

/// The binary under test; COLOCATE_BIN overrides it where the test binary was built
/// elsewhere (the GPU machine runs binaries carried from the build machine).
fn colocate(args: &[&str]) -> Output {
    let bin = std::env::var("COLOCATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_colocate").to_string());
    Command::new(bin)
        .args(args)
        .output()
        .expect("running colocate")
}

/// Alive and not a zombie: a daemon that exited may stay a zombie until its parent
/// (here the container's init) reaps it.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|dead| !dead)
}

/// Every `colocate gpu` subcommand gives a plain answer on any machine, never a panic.
/// Without a GPU (CI) each fails with the no-GPU message and exit 1; with one (the GPU
/// machine runs this too, `--include-ignored`) the read-only ones succeed and the MPS ones
/// refuse a folder with no daemon. Which case applies is what `gpu info` says.
#[test]
fn every_gpu_subcommand_answers_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let csv = tmp.path().join("x.csv");
    let csv = csv.to_str().unwrap();
    let info = colocate(&["gpu", "info"]);
    if !info.status.success() {
        let cases: Vec<Vec<&str>> = vec![
            vec!["gpu", "info"],
            vec!["gpu", "info", "--json"],
            vec!["gpu", "monitor", "--duration", "1s"],
            vec!["gpu", "monitor", "--out", csv, "--duration", "1s"],
            vec!["gpu", "mps", "start", "--dir", dir],
            vec!["gpu", "mps", "status", "--dir", dir],
            vec!["gpu", "mps", "stop", "--dir", dir],
            vec!["gpu", "mig", "list"],
        ];
        for args in cases {
            let out = colocate(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains("no NVIDIA driver or GPU found"),
                "{args:?}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
        return;
    }
    for args in [
        vec!["gpu", "info", "--json"],
        vec![
            "gpu",
            "monitor",
            "--interval",
            "250ms",
            "--duration",
            "1s",
            "--out",
            csv,
        ],
        vec!["gpu", "mig", "list"],
    ] {
        let out = colocate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let rows = std::fs::read_to_string(csv).unwrap().lines().count();
    assert!(rows >= 2, "monitor wrote {rows} lines");
    for args in [
        vec!["gpu", "mps", "status", "--dir", dir],
        vec!["gpu", "mps", "stop", "--dir", dir],
    ] {
        let out = colocate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}: says why");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn bad_arguments_are_named() {
    let out = colocate(&["gpu", "monitor", "--interval", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--interval"), "{stderr}");
}

#[test]
#[ignore = "needs an NVIDIA GPU with MPS"]
fn cli_round_trip_on_the_gpu() {
    let out = colocate(&["gpu", "info", "--json"]);
    assert!(
        out.status.success(),
        "no GPU: this test needs an NVIDIA GPU with MPS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{}", serde_json::to_string_pretty(&info).unwrap());
    assert!(info[0]["memory_total_bytes"].as_u64().unwrap() > 0);

    let tmp = tempfile::Builder::new()
        .prefix("mpscli")
        .tempdir_in("/tmp")
        .unwrap();
    let csv = tmp.path().join("t.csv");
    let out = colocate(&[
        "gpu",
        "monitor",
        "--interval",
        "250ms",
        "--duration",
        "2s",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.lines().count() >= 5, "{text}");
    println!("monitor: {}", String::from_utf8_lossy(&out.stderr));

    let dir = tmp.path().join("mps");
    let dir = dir.to_str().unwrap();
    let out = colocate(&[
        "gpu",
        "mps",
        "start",
        "--dir",
        dir,
        "--active-thread-percentage",
        "40",
        "--pinned-mem",
        "0=8GiB",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE='40'"),
        "{stdout}"
    );
    assert!(
        stdout.contains("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT='0=8192M'"),
        "{stdout}"
    );
    let pid: u32 = std::fs::read_to_string(format!("{dir}/pipe/nvidia-cuda-mps-control.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    let again = colocate(&["gpu", "mps", "start", "--dir", dir]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already serves"));
    let out = colocate(&["gpu", "mps", "status", "--dir", dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("status: {}", String::from_utf8_lossy(&out.stdout));
    let out = colocate(&["gpu", "mps", "stop", "--dir", dir, "--drain", "2s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid), "daemon {pid} left running");
    let out = colocate(&["gpu", "mps", "status", "--dir", dir]);
    assert_eq!(out.status.code(), Some(1));
}
