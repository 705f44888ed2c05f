//! GPU tests: run on the GPU machine (`scripts/gpu/gpu-tests.sh`), ignored elsewhere;
//! selected without a GPU (`--ignored`) each fails first with a "no GPU" message.
//! They need `python3` with PyTorch (override with COLOCATE_PYTHON) for the workload.
//! Run: cargo test -p gpu --test device -- --ignored --nocapture --test-threads=1
use gpu::mps::{procs, ClientLimits, MpsDaemon, MpsEvent};
use gpu::telemetry::Sampler;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Stops a selected GPU test on a machine without a GPU, saying so.
fn require_gpu() {
    if let Err(e) = gpu::info() {
        panic!("no GPU: this test needs an NVIDIA GPU (run it on the GPU machine): {e:#}");
    }
}

fn python() -> String {
    std::env::var("COLOCATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The workload script; found relative to the repository root when the test binary
/// runs on another machine than the one that built it.
fn gemm_script() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gemm_loop.py");
    if built.exists() {
        built
    } else {
        PathBuf::from("crates/gpu/tests/gemm_loop.py")
    }
}

/// Starts the GEMM loop with extra environment; [`tflops`] reads its rate at the end.
fn gemm(secs: f64, env: &[(String, String)]) -> std::process::Child {
    Command::new(python())
        .arg(gemm_script())
        .arg(secs.to_string())
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with torch")
}

fn tflops(out: &Output) -> f64 {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gemm loop failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("tflops "))
        .expect("a tflops line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn short_tmp() -> tempfile::TempDir {
    // Unix socket paths are short: keep the MPS folder under /tmp.
    tempfile::Builder::new()
        .prefix("mps")
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU with MPS"]
fn mps_start_and_stop_leave_no_process() {
    require_gpu();
    let tmp = short_tmp();
    let mut d = MpsDaemon::start(tmp.path()).unwrap();
    let control = d.control_pid().expect("control daemon pid");
    assert!(procs::alive(control));
    // A second daemon on the same folders is refused.
    let err = MpsDaemon::start(tmp.path())
        .expect_err("second start must fail")
        .to_string();
    assert!(err.contains("already serves"), "{err}");
    // A client makes a server appear; status and events see it.
    let env = d.client_env(&ClientLimits::default());
    let out = Command::new(python())
        .args([
            "-c",
            "import torch; x=torch.ones(10,device='cuda'); print('client ok', x.sum().item())",
        ])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = d.status().unwrap();
    println!("status after one client: {status:?}");
    assert_eq!(status.servers.len(), 1, "one server started by the client");
    assert_eq!(status.default_active_thread_percentage, 100.0);
    d.set_default_active_thread_percentage(50).unwrap();
    assert_eq!(d.status().unwrap().default_active_thread_percentage, 50.0);
    let events = d.poll_events().unwrap();
    println!("events: {events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, MpsEvent::ClientConnected { .. })),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, MpsEvent::ServerStarted { .. })),
        "{events:?}"
    );
    let server = status.servers[0].pid;
    d.stop(Duration::from_secs(5)).unwrap();
    assert!(
        !procs::alive(control),
        "control daemon {control} still running"
    );
    assert!(!procs::alive(server), "server {server} still running");
    let left: Vec<_> = procs::daemon_processes()
        .into_iter()
        .filter(|(p, _)| *p == control || *p == server)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    println!("MPS start/stop: control {control} and server {server} gone");
}

#[test]
#[ignore = "needs an NVIDIA GPU with MPS"]
fn mps_drop_quits_the_daemon() {
    require_gpu();
    let tmp = short_tmp();
    let control = {
        let d = MpsDaemon::start(tmp.path()).unwrap();
        d.control_pid().unwrap()
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !procs::alive(control),
        "Drop left the control daemon {control} running"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with MPS and python3 with torch"]
fn mps_thread_percentage_changes_throughput() {
    require_gpu();
    let tmp = short_tmp();
    let d = MpsDaemon::start(tmp.path()).unwrap();
    let env = |pct| {
        d.client_env(&ClientLimits {
            active_thread_percentage: Some(pct),
            ..Default::default()
        })
    };
    // Two clients at once, same kernel, 100% and 25% of the SMs.
    let full = gemm(6.0, &env(100));
    let quarter = gemm(6.0, &env(25));
    let (full, quarter) = (
        full.wait_with_output().unwrap(),
        quarter.wait_with_output().unwrap(),
    );
    let (tf_full, tf_quarter) = (tflops(&full), tflops(&quarter));
    println!("MPS thread percentage: 100% client {tf_full:.1} TFLOP/s, 25% client {tf_quarter:.1} TFLOP/s, ratio {:.2}", tf_full / tf_quarter);
    d.stop(Duration::from_secs(10)).unwrap();
    assert!(
        tf_full > 1.5 * tf_quarter,
        "100% client {tf_full} vs 25% client {tf_quarter}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with GPM (Hopper+) and python3 with torch"]
fn gpm_sm_active_tracks_a_gemm_loop() {
    require_gpu();
    let sampler = Sampler::start(Duration::from_millis(200), Some(vec![0])).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let idle_to = gpu::telemetry::now_unix();
    let child = gemm(8.0, &[]);
    // Let it start (CUDA context, warm-up) before the busy window opens.
    let out = child.wait_with_output().unwrap();
    let tf = tflops(&out);
    let busy_to = gpu::telemetry::now_unix();
    let t = sampler.stop();
    let idle = gpu::telemetry::summarize(&t.samples, idle_to - 2.5, idle_to);
    let busy = gpu::telemetry::summarize(&t.samples, busy_to - 6.5, busy_to - 1.5);
    let (i, b) = (&idle.gpus[0], &busy.gpus[0]);
    println!("idle window: {}", serde_json::to_string(i).unwrap());
    println!(
        "GEMM window ({tf:.0} TFLOP/s): {}",
        serde_json::to_string(b).unwrap()
    );
    println!(
        "sampler cost: {:.4} s CPU over {:.1} s wall at 200 ms ({:.3}% of one core, {:.2} ms per sample)",
        t.sampler_cpu_seconds,
        t.sampler_wall_seconds,
        100.0 * t.sampler_cpu_seconds / t.sampler_wall_seconds,
        1000.0 * t.sampler_cpu_seconds / t.samples.len().max(1) as f64
    );
    assert_eq!(
        b.source,
        Some(gpu::telemetry::CounterSource::Gpm),
        "notes: {:?}",
        t.notes
    );
    let busy_sm = b.sm_active.expect("SM active while busy").mean;
    let idle_sm = i.sm_active.expect("SM active while idle").mean;
    assert!(busy_sm > 80.0, "SM active during GEMM {busy_sm}");
    assert!(idle_sm < 10.0, "SM active idle {idle_sm}");
    assert!(b.tensor_active.expect("tensor active").mean > 20.0);
}

/// Issue 19: every GPU of a machine sampled at once, a GEMM loop on the last one only; each
/// GPU's summary tells them apart and the totals add power up per tick (on the two-GPU
/// machine the idle GPU stays idle and the totals' SM active is the mean of the two).
#[test]
#[ignore = "needs NVIDIA GPUs (two for the per-GPU check) and python3 with torch"]
fn every_gpu_and_their_totals() {
    require_gpu();
    let gpus: Vec<u32> = gpu::info().unwrap().iter().map(|g| g.index).collect();
    let busy = *gpus.last().unwrap();
    let sampler = Sampler::start(Duration::from_millis(200), None).unwrap();
    let child = gemm(8.0, &[("CUDA_VISIBLE_DEVICES".into(), busy.to_string())]);
    let out = child.wait_with_output().unwrap();
    let tf = tflops(&out);
    let end = gpu::telemetry::now_unix();
    let t = sampler.stop();
    let (from, to) = (end - 6.5, end - 1.5);
    let each = gpu::telemetry::summarize(&t.samples, from, to);
    let total = gpu::telemetry::summarize_totals(&t.samples, &gpus, from, to);
    for g in &each.gpus {
        println!("GPU {}: {}", g.gpu, serde_json::to_string(g).unwrap());
    }
    println!(
        "GEMM on GPU {busy} ({tf:.0} TFLOP/s); totals of {:?}: {}",
        gpus,
        serde_json::to_string(&total.stats()).unwrap()
    );
    assert_eq!(each.gpus.len(), gpus.len());
    assert!(total.ticks > 0, "no tick with every GPU: {:?}", t.notes);
    assert_eq!(
        total.partial_ticks, 0,
        "the sampler reads every GPU each tick"
    );
    let b = each.gpus.iter().find(|g| g.gpu == busy).unwrap();
    assert!(b.sm_active.expect("SM active").mean > 80.0, "{b:?}");
    for s in &total.series {
        let sum: f64 = t
            .samples
            .iter()
            .filter(|x| x.t == s.t && gpus.contains(&x.gpu))
            .filter_map(|x| x.power_w)
            .sum();
        assert!((s.power_w.expect("power") - sum).abs() < 1e-6);
    }
    if gpus.len() > 1 {
        let idle = each.gpus.iter().find(|g| g.gpu != busy).unwrap();
        assert!(
            idle.sm_active.expect("SM active").mean < 10.0,
            "the GEMM ran on GPU {busy} only: {idle:?}"
        );
        let mean_sm = each
            .gpus
            .iter()
            .map(|g| g.sm_active.unwrap().mean)
            .sum::<f64>()
            / gpus.len() as f64;
        assert!((total.sm_active.unwrap().mean - mean_sm).abs() < 1.0);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn info_describes_the_gpu() {
    require_gpu();
    let gpus = gpu::info().unwrap();
    println!("{}", serde_json::to_string_pretty(&gpus).unwrap());
    assert!(!gpus.is_empty());
    let g = &gpus[0];
    assert!(g.memory_total_bytes > 1 << 30);
    assert!(g.uuid.starts_with("GPU-"), "{}", g.uuid);
    assert!(g.sm_count.unwrap_or(0) > 0);
    if let Some(spec) = gpu::catalogue::lookup(&g.name) {
        assert_eq!(
            Some(spec.sm_count),
            g.sm_count,
            "catalogue SMs for {}",
            g.name
        );
    }
}
