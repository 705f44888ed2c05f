//! Engines across two GPUs from the command line (issue 19), without a GPU: the plan of
//! the two-H200 deployment (per-GPU table, vLLM TP=2 command lines under MPS per-GPU
//! limits, the JSON's per-GPU table) and the experiment's dry run.

mod common;

use common::colocate;

#[test]
fn two_gpu_deployment_plans_per_gpu_with_tp2_command_lines() {
    let (ok, out, err) = colocate(&["plan", "examples/deploy-h200x2-tp2.toml"]);
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("deployment `h200x2-tp2` on GPUs 0, 1 (memory per GPU below), sharing: mps"),
        "{out}"
    );
    assert!(out.contains("per GPU of each engine"), "{out}");
    assert!(out.contains("GPU 0 H200"), "{out}");
    assert!(out.contains("GPU 1 H200"), "{out}");
    assert!(
        out.contains("engines: gen on 0,1 (TP 2); embed on 0,1 (TP 2)"),
        "{out}"
    );
    assert!(out.contains("all GPUs: fits"), "{out}");

    let (ok, out, err) = colocate(&["plan", "examples/deploy-h200x2-tp2.toml", "--json"]);
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
         --host 127.0.0.1 --port 8100 --served-model-name gen --tensor-parallel-size 2 \
         --load-format dummy --max-model-len 4096 --max-num-seqs 512 \
         --gpu-memory-utilization 0.4946"
    );
    assert!(
        line(1).contains("--runner pooling --convert embed --tensor-parallel-size 2"),
        "{}",
        line(1)
    );
    let env: Vec<(String, String)> = v["engines"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv[0].as_str().unwrap().to_string(),
                kv[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
    assert_eq!(get("CUDA_VISIBLE_DEVICES"), Some("0,1"));
    assert_eq!(
        get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"),
        Some("0=71885M,1=71885M")
    );
    assert_eq!(get("NCCL_NVLS_ENABLE"), Some("0"));
    assert_eq!(get("TORCH_SYMM_MEM_DISABLE_MULTICAST"), Some("1"));
    assert_eq!(get("NVSHMEM_DISABLE_NVLS"), Some("1"));
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[1]["engines"].as_array().unwrap().len(), 2);
    assert_eq!(gpus[1]["fits"], true);
}

#[test]
fn two_gpu_experiment_dry_run_plans_its_conditions() {
    let (ok, out, err) = colocate(&["lab", "run", "examples/h200x2-tp2.toml", "--dry-run"]);
    assert!(ok, "{out}\n{err}");
    // the four layouts, each engine's TP size and GPUs in the condition's label
    for layout in [
        "timeslice (gen TP1 on GPU 0; embed TP1 on GPU 1)",
        "mps default (gen TP2 on GPU 0,1; embed TP2 on GPU 0,1)",
        "timeslice (gen TP2 on GPU 0,1; embed TP2 on GPU 0,1)",
        "mps default (gen TP2 on GPU 0,1; embed TP1 on GPU 1)",
        "solo gen (TP2 on GPU 0,1)",
        "solo embed (TP1 on GPU 1)",
    ] {
        assert!(out.contains(layout), "{layout} missing:\n{out}");
    }
    assert!(out.contains("GPUs used: 0, 1"), "{out}");
}
