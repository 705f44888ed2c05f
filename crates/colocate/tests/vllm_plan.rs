//! vLLM engines from the command line, without vLLM: the seeds' study plans (`lab run
//! --dry-run`), the recommended deployment's command lines for vLLM 0.26, the memory plan
//! under MPS pinned limits, and the seed workloads of `bench`.

mod common;

use common::{colocate, workspace_root};

#[test]
fn seeds_study_dry_run_plans_every_condition() {
    let (ok, out, err) = colocate(&["lab", "run", "examples/h200-seeds-vllm.toml", "--dry-run"]);
    assert!(ok, "{out}\n{err}");
    // 15 co-located + 12 implied solo baselines, 3 repetitions
    assert!(
        out.contains("81 conditions (27 distinct x 3 repetitions)"),
        "{out}"
    );
    assert!(out.contains("mps sm 48/45 mem 0.471/0.471"), "{out}");
    assert!(
        out.contains("mps sm 90/10: embed c=32 b=64, gen c=512"),
        "{out}"
    );
    assert!(out.contains("timeslice mem 0.65/0.15"), "{out}");
    assert!(out.contains("start-up estimate 2m 30s"), "{out}");
}

/// The seeds' recommended pair, as `up` would start it on the GPU machine.
#[test]
fn recommended_deployment_has_vllm_026_command_lines() {
    let (ok, out, err) = colocate(&["plan", "examples/deploy-h200-vllm.toml", "--json"]);
    assert!(ok, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let line = |i: usize| {
        v["engines"][i]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line(0),
        "python3 -m vllm.entrypoints.cli.main serve /tmp/vllm-models/qwen3-30b-a3b-fp8 \
         --host 127.0.0.1 --port 8100 --served-model-name gen --load-format dummy \
         --max-model-len 4096 --max-num-seqs 512 --gpu-memory-utilization 0.5"
    );
    assert!(
        line(1).contains("--runner pooling --convert embed") && !line(1).contains("--task"),
        "{}",
        line(1)
    );
    assert_eq!(v["engines"][0]["vllm_version"]["source"], "pinned");
    let env = v["engines"][0]["env"].as_array().unwrap();
    for (k, want) in [
        ("PYTHONPATH", "/tmp/site"),
        ("VLLM_USE_FLASHINFER_SAMPLER", "0"),
        ("VLLM_USE_DEEP_GEMM", "0"),
    ] {
        assert!(
            env.iter().any(|p| p[0] == k && p[1] == want),
            "{k}={want} not in {env:?}"
        );
    }
}

/// Under MPS the pinned limit and vLLM's fraction of the whole GPU agree, and the plan
/// shows both; a fixed KV cache the limit cannot hold is refused.
#[test]
fn the_pair_under_mps_shows_limit_and_sizing() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mps.toml");
    let base =
        std::fs::read_to_string(workspace_root().join("examples/deploy-h200-vllm.toml")).unwrap();
    std::fs::write(
        &f,
        base.replace("sharing = \"timeslice\"", "sharing = \"mps\""),
    )
    .unwrap();
    let (ok, out, err) = colocate(&["plan", f.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("MPS pinned limits and each engine's own sizing"),
        "{out}"
    );
    assert!(
        out.contains("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=71885M"),
        "{out}"
    );
    assert!(out.contains("--gpu-memory-utilization 0.4946"), "{out}");
    assert!(
        out.contains("gen: limit 70.2 GiB >= vLLM 0.4946 x 140.4 GiB"),
        "{out}"
    );

    let too_big = base
        .replace("sharing = \"timeslice\"", "sharing = \"mps\"")
        .replace(
            "max_model_len = 4096",
            "max_model_len = 4096\nkv_cache_memory = \"60GiB\"",
        );
    std::fs::write(&f, too_big).unwrap();
    let (ok, out, err) = colocate(&["plan", f.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("exceeds its pinned limit 70.2 GiB"), "{out}");
    assert!(err.contains("does not fit"), "{err}");
}

/// Mistakes in the vLLM fields name the file, the field and the reason.
#[test]
fn vllm_field_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let base =
        std::fs::read_to_string(workspace_root().join("examples/deploy-h200-vllm.toml")).unwrap();
    for (name, from, to, want) in [
        (
            "version",
            "vllm_version = \"0.26\"",
            "vllm_version = \"newest\"",
            "engines[0].vllm_version: `newest` is not a vLLM version",
        ),
        (
            "task-in-args",
            "max_model_len = 512",
            "max_model_len = 512\nargs = [\"--task\", \"embed\"]",
            "engines[1].args: --task is colocate's to set",
        ),
        (
            "launcher-on-builtin",
            "kind = \"vllm\"\nvllm_version = \"0.26\"\nlauncher",
            "kind = \"builtin\"\nlauncher",
            "engines[0].launcher: only kind = \"vllm\" takes launcher",
        ),
    ] {
        let f = dir.path().join(format!("{name}.toml"));
        std::fs::write(&f, base.replacen(from, to, 1)).unwrap();
        let (ok, _, err) = colocate(&["plan", f.to_str().unwrap()]);
        assert!(!ok, "{name}: accepted");
        assert!(err.contains(f.to_str().unwrap()), "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
}

/// The seed workloads name themselves; with nothing listening, bench fails before the
/// warm-up and says which endpoint.
#[test]
fn bench_takes_the_seed_presets() {
    let (ok, out, err) = colocate(&[
        "bench",
        "--workload",
        "seed-gen:url=http://127.0.0.1:9,model=gen,concurrency=512",
        "--workload",
        "seed-embed:url=http://127.0.0.1:9,model=embed,batch=8,concurrency=64",
    ]);
    assert!(!ok, "{out}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (ok, _, err) = colocate(&[
        "bench",
        "--workload",
        "seed-gen:url=http://h:1,model=m,input=9",
    ]);
    assert!(!ok, "{err}");
    assert!(err.contains("sends its own fixed text"), "{err}");
}
