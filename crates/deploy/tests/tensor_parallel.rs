//! Engines across GPUs (issue 19), on the CPU: the plan of a tensor-parallel vLLM pair on
//! two H200s under MPS (command lines and environments, golden), the per-GPU fit, and
//! every validation error's text.

use deploy::gpu_glue::{GpuFacts, MachineGpu};
use deploy::spec::{parse, validate};

const H200: u64 = 143_771 << 20;

/// Two H200s of one host, as NVML lists them.
fn two_h200() -> GpuFacts {
    GpuFacts {
        name: "NVIDIA H200".into(),
        memory_total_bytes: H200,
        machine: (0..2)
            .map(|index| MachineGpu {
                index,
                name: "NVIDIA H200".into(),
                memory_total_bytes: H200,
            })
            .collect(),
    }
}

/// The seeds' pair, both engines across both GPUs.
fn tp2_pair(sharing: &str, gen_memory: &str, embed_memory: &str) -> String {
    format!(
        r#"
        name = "tp2"
        gpu = 0
        sharing = "{sharing}"
        [[engines]]
        name = "gen"
        kind = "vllm"
        vllm_version = "0.26"
        model = "Qwen/Qwen3-30B-A3B-FP8"
        served_model_name = "gen"
        port = 8100
        gpus = [0, 1]
        memory = {gen_memory}
        max_model_len = 4096
        [[engines]]
        name = "embed"
        kind = "vllm"
        vllm_version = "0.26"
        model = "Qwen/Qwen3-Embedding-8B"
        served_model_name = "embed"
        task = "embed"
        port = 8200
        gpus = [0, 1]
        tensor_parallel_size = 2
        memory = {embed_memory}
        "#
    )
}

fn problems(text: &str) -> String {
    match validate(parse(text).unwrap()) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tp2_pair_under_mps_has_per_gpu_limits_and_multicast_off() {
    let spec = validate(parse(&tp2_pair("mps", "0.5", "0.3")).unwrap()).unwrap();
    let p = deploy::plan(&spec, Some(&two_h200())).unwrap();
    assert!(p.fits, "{p}");
    // 0.5 x 143,771 MiB = 71,885 MiB on each GPU; vLLM's fraction against the whole GPU
    // from the limit less the CUDA context: (71,885 - 768) / 143,771 = 0.4946.
    assert_eq!(
        p.engines[0].shell_line(),
        "CUDA_VISIBLE_DEVICES=0,1 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=71885M,1=71885M \
         NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
         vllm serve Qwen/Qwen3-30B-A3B-FP8 --host 127.0.0.1 --port 8100 --served-model-name gen \
         --tensor-parallel-size 2 --max-model-len 4096 --gpu-memory-utilization 0.4946"
    );
    assert_eq!(
        p.engines[1].shell_line(),
        "CUDA_VISIBLE_DEVICES=0,1 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=43131M,1=43131M \
         NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
         vllm serve Qwen/Qwen3-Embedding-8B --host 127.0.0.1 --port 8200 --served-model-name embed \
         --runner pooling --convert embed --tensor-parallel-size 2 --gpu-memory-utilization 0.2946"
    );
    let gen = &p.engines[0];
    assert_eq!(gen.gpus, ["0", "1"]);
    assert_eq!(gen.tensor_parallel_size, 2);
    // Half the FP8 weights on each GPU; 4 KV heads split 2 + 2: half the KV per token.
    let whole = deploy::model::ModelShape::resolve("Qwen/Qwen3-30B-A3B-FP8").unwrap();
    assert_eq!(
        gen.weights_bytes,
        whole
            .weights_bytes(true, 2, engine::model::config::Fp8Kept::All)
            .div_ceil(2)
    );
    assert_eq!(gen.kv_bytes_per_token, 98_304 / 2);
    // Each GPU holds both engines' shares, within its memory; the MPS daemon must see both.
    assert_eq!(p.gpu_indices(), [0, 1]);
    assert_eq!(p.gpus.len(), 2);
    for u in &p.gpus {
        assert_eq!(u.engines.len(), 2, "{u:?}");
        assert!(u.fits);
        assert_eq!(u.memory_bytes, Some(H200));
    }
    let text = p.to_string();
    assert!(text.contains("per GPU of each engine"), "{text}");
    assert!(
        text.contains("engines: gen on 0,1 (TP 2); embed on 0,1 (TP 2)"),
        "{text}"
    );
    assert!(text.contains("GPU 1 NVIDIA H200"), "{text}");
    // The JSON carries the per-GPU table.
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["gpus"][1]["gpu"], "1");
    assert_eq!(json["engines"][0]["tensor_parallel_size"], 2);
}

/// Time-sliced: no MPS limits, the fraction is the budget, the switches stay.
#[test]
fn tp2_time_sliced_keeps_the_budget_as_the_fraction() {
    let spec = validate(parse(&tp2_pair("timeslice", "0.5", "0.3")).unwrap()).unwrap();
    let p = deploy::plan(&spec, Some(&two_h200())).unwrap();
    assert!(p.fits, "{p}");
    assert_eq!(
        p.engines[0].shell_line(),
        "CUDA_VISIBLE_DEVICES=0,1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
         NVSHMEM_DISABLE_NVLS=1 vllm serve Qwen/Qwen3-30B-A3B-FP8 --host 127.0.0.1 --port 8100 \
         --served-model-name gen --tensor-parallel-size 2 --max-model-len 4096 \
         --gpu-memory-utilization 0.5"
    );
}

/// Qwen3-30B-A3B in bf16 (61 GB of weights) in a 50 GiB budget beside the 8B embedder:
/// on one GPU the budget cannot hold the weights; across two, half the weights on each
/// GPU, it does. Then the sum per GPU: what one GPU holds is not excused by another's room.
#[test]
fn fits_on_two_gpus_but_not_on_one() {
    let text = |gpus: &str| {
        format!(
            r#"
            gpu = 0
            [[engines]]
            name = "gen"
            kind = "vllm"
            model = "Qwen/Qwen3-30B-A3B"
            port = 8100
            memory = "50GiB"
            {gpus}
            [[engines]]
            name = "embed"
            kind = "vllm"
            model = "Qwen/Qwen3-Embedding-8B"
            task = "embed"
            port = 8200
            memory = "20GiB"
            {gpus}
            "#
        )
    };
    let one = validate(parse(&text("")).unwrap()).unwrap();
    let p = deploy::plan(&one, Some(&two_h200())).unwrap();
    assert!(!p.fits, "{p}");
    assert!(
        p.problems
            .iter()
            .any(|x| x.contains("gen: budget 50.0 GiB is smaller than weights")),
        "{:?}",
        p.problems
    );
    let two = validate(parse(&text("gpus = [0, 1]")).unwrap()).unwrap();
    let p = deploy::plan(&two, Some(&two_h200())).unwrap();
    assert!(p.fits, "{p}");
    assert!(p.engines[0].weights_bytes < 50 << 30);

    // The sum per GPU: three engines of 60 GiB each fit two GPUs only when spread.
    let crowded = r#"
        gpu = 0
        [[engines]]
        name = "a"
        kind = "vllm"
        model = "Qwen/Qwen3-8B"
        port = 8100
        memory = "60GiB"
        gpus = [0, 1]
        [[engines]]
        name = "b"
        kind = "vllm"
        model = "Qwen/Qwen3-8B"
        port = 8200
        memory = "60GiB"
        gpus = [0, 1]
        [[engines]]
        name = "c"
        kind = "vllm"
        model = "Qwen/Qwen3-8B"
        port = 8300
        memory = "60GiB"
        gpus = [1]
        "#;
    let p = deploy::plan(
        &validate(parse(crowded).unwrap()).unwrap(),
        Some(&two_h200()),
    )
    .unwrap();
    assert!(!p.fits);
    assert_eq!(
        p.problems,
        ["GPU 1: budgets over 100%: 180.0 GiB of 140.4 GiB on NVIDIA H200"],
        "{p}"
    );
    assert!(p.gpus[0].fits && !p.gpus[1].fits);
    assert!(p.to_string().contains("DOES NOT FIT"));
}

#[test]
fn a_gpu_the_machine_lacks_is_an_error_and_the_catalogue_cannot_tell() {
    let text = tp2_pair("mps", "0.5", "0.3").replace("gpus = [0, 1]", "gpus = [0, 2]");
    let spec = validate(parse(&text).unwrap()).unwrap();
    let e = deploy::plan(&spec, Some(&two_h200()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "engines[0].gpus: GPU 2 is not on this machine (it has 2: 0 NVIDIA H200; 1 NVIDIA H200)"
        ),
        "{e}"
    );
    // Planned for a GPU model from the catalogue: the machine is unknown, nothing to check.
    let mut s = spec.into_spec();
    s.gpu_name = Some("H200".into());
    let p = deploy::plan(&validate(s).unwrap(), None).unwrap();
    let listed: Vec<&str> = p.gpus.iter().map(|u| u.gpu.as_str()).collect();
    assert_eq!(listed, ["0", "2"]);
    assert!(
        p.engines[0]
            .notes
            .iter()
            .any(|n| n.contains("gpus 0,2 not checked against a machine")),
        "{:?}",
        p.engines[0].notes
    );
}

#[test]
fn fractions_add_up_per_gpu() {
    // 0.9 on GPU 0 and 0.9 on GPU 1 is fine; 0.5 + 0.6 on GPU 1 is not.
    let text = |b_gpus: &str| {
        format!(
            "gpu = 0\n[[engines]]\nname = \"a\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 1\nmemory = 0.9\n\
             [[engines]]\nname = \"b\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 2\nmemory = 0.9\ngpus = {b_gpus}\n"
        )
    };
    assert_eq!(problems(&text("[1]")), "");
    assert_eq!(
        problems(&text("[0, 1]")),
        "engines[*].memory: budgets over 100% on GPU 0: the engines' memory fractions (times replicas) add up to 180.0%"
    );
}

#[test]
fn every_validation_error_names_the_field_and_the_reason() {
    let engine = |extra: &str| {
        format!(
            "gpu = 0\nsharing = \"timeslice\"\n[[engines]]\nname = \"g\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 8100\n{extra}\n"
        )
    };
    let cases: &[(&str, &str)] = &[
        (
            "gpus = []",
            "engines[0].gpus: empty: name the engine's GPUs, e.g. gpus = [0, 1]",
        ),
        ("gpus = [0, 1, 0]", "engines[0].gpus: GPU 0 is listed twice"),
        (
            "gpus = [0, 1]\ntensor_parallel_size = 4",
            "engines[0].tensor_parallel_size: 4 but gpus lists 2: it must equal the number of the engine's GPUs",
        ),
        (
            "tensor_parallel_size = 2",
            "engines[0].tensor_parallel_size: 2 but the engine runs on 1 (the deployment's gpu = 0)",
        ),
        (
            "gpus = [0, 1]\ntensor_parallel_size = 0",
            "engines[0].tensor_parallel_size: must be at least 1",
        ),
        (
            "gpus = [0, 1, 2]",
            "engines[0].tensor_parallel_size: 3 does not divide the model's 32 attention heads",
        ),
        (
            "gpus = [0, 1]\nargs = [\"-tp\", \"2\"]",
            "engines[0].args: -tp is colocate's to set (from gpus and tensor_parallel_size)",
        ),
        (
            "gpus = [0, 1]\nenv = { CUDA_VISIBLE_DEVICES = \"3,4\" }",
            "engines[0].env: CUDA_VISIBLE_DEVICES is colocate's to set (from gpus)",
        ),
        (
            "gpus = [0, 1]\nenv = { NCCL_NVLS_ENABLE = \"1\" }",
            "engines[0].env: NCCL_NVLS_ENABLE=1: NVLink multicast stays off on these machines",
        ),
        (
            "env = { TORCH_SYMM_MEM_DISABLE_MULTICAST = \"0\" }",
            "engines[0].env: TORCH_SYMM_MEM_DISABLE_MULTICAST=0: NVLink multicast stays off",
        ),
    ];
    for (extra, want) in cases {
        let got = problems(&engine(extra));
        assert!(got.contains(want), "{extra}:\n{got}\nwants: {want}");
    }
    // The switches at their required values are accepted.
    assert_eq!(
        problems(&engine(
            "gpus = [0, 1]\nenv = { NCCL_NVLS_ENABLE = \"0\", NVSHMEM_DISABLE_NVLS = \"1\" }"
        )),
        ""
    );

    let builtin = "gpu = 0\n[[engines]]\nname = \"g\"\nmodel = \"preset:qwen3-8b\"\nport = 8100\ngpus = [0, 1]\n";
    let got = problems(builtin);
    assert!(
        got.contains("engines[0].tensor_parallel_size: 2: the built-in engine has no tensor parallelism yet (planned in issue 19)"),
        "{got}"
    );
    let mig = "gpu = 0\nsharing = \"mig\"\n[[engines]]\nname = \"g\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 8100\nmig_device = \"MIG-abc\"\ngpus = [0, 1]\n";
    let got = problems(mig);
    assert!(
        got.contains("engines[0].gpus: not supported with sharing = \"mig\""),
        "{got}"
    );
    let cpu = "gpu = \"cpu\"\n[[engines]]\nname = \"g\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 8100\ngpus = [0]\n";
    let got = problems(cpu);
    assert!(
        got.contains("engines[0].gpus: the deployment runs on the CPU"),
        "{got}"
    );
}

/// vLLM's KV-head rule on a model whose heads split but whose KV heads neither split nor
/// replicate evenly: 12 heads, 4 KV heads, 6 GPUs.
#[test]
fn kv_heads_that_neither_split_nor_replicate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/qwen3-tiny/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny).unwrap()).unwrap();
    cfg["num_attention_heads"] = 12.into();
    cfg["num_key_value_heads"] = 4.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    deploy::model::ModelShape::resolve(dir.path().to_str().unwrap()).unwrap();
    let text = format!(
        "gpu = 0\n[[engines]]\nname = \"g\"\nkind = \"vllm\"\nmodel = \"{}\"\nport = 8100\ngpus = [0, 1, 2, 3, 4, 5]\n",
        dir.path().display()
    );
    let got = problems(&text);
    assert!(
        got.contains("engines[0].tensor_parallel_size: the model's 4 KV heads and 6 GPUs"),
        "{got}"
    );
    // 4 KV heads on 2 GPUs split; on 8 (with 8 heads) each GPU holds one replicated head.
    cfg["num_attention_heads"] = 8.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let eight = text.replace(
        "gpus = [0, 1, 2, 3, 4, 5]",
        "gpus = [0, 1, 2, 3, 4, 5, 6, 7]",
    );
    assert_eq!(problems(&eight), "");
}

/// SGLang spells it `--tp-size`; TEI has none; a spec with gpus writes back as it reads.
#[test]
fn sglang_tp_size_tei_refusal_and_round_trip() {
    let text = r#"
        gpu = 0
        [[engines]]
        name = "s"
        kind = "sglang"
        model = "Qwen/Qwen3-8B"
        port = 8100
        gpus = [0, 1]
        memory = 0.5
        "#;
    let spec = parse(text).unwrap();
    let p = deploy::plan(&validate(spec.clone()).unwrap(), Some(&two_h200())).unwrap();
    let line = p.engines[0].command.join(" ");
    assert!(line.contains("--tp-size 2"), "{line}");
    assert!(!line.contains("--tensor-parallel-size"), "{line}");
    let back = parse(&spec.to_toml().unwrap()).unwrap();
    assert_eq!(back, spec);
    assert!(spec.to_toml().unwrap().contains("gpus = ["));

    let tei = text
        .replace("kind = \"sglang\"", "kind = \"tei\"\ntask = \"embed\"")
        .replace("memory = 0.5", "");
    let got = problems(&tei);
    assert!(
        got.contains("engines[0].tensor_parallel_size: 2: TEI has no tensor parallelism"),
        "{got}"
    );
}
