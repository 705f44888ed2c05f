//! Which GPUs each engine uses, and what tensor parallelism asks of the model and of the
//! machine (issue 19).
//!
//! An engine names its GPUs with `gpus = [0, 1]`; without it the engine runs on the
//! deployment's `gpu`. Its tensor parallel size is the number of its GPUs: vLLM and SGLang
//! run one worker per GPU of `CUDA_VISIBLE_DEVICES`, so a `tensor_parallel_size` that
//! differs from it would leave a GPU idle or ask for one that is not visible, and is
//! refused rather than guessed.
//!
//! The model must split evenly: vLLM refuses attention heads that the TP size does not
//! divide (`ModelConfig.verify_with_parallel_config`: "Total number of attention heads
//! must be divisible by tensor parallel size"), and `QKVParallelLinear`
//! (`vllm/model_executor/layers/linear.py`) splits KV heads when there are at least as
//! many as workers (`kv % tp == 0`) and otherwise gives every worker one KV head,
//! replicated `tp / kv` times (`tp % kv == 0`). The replication is why the KV cache per GPU
//! is not simply the whole cache over TP ([`kv_heads_per_gpu`]).
//!
//! Engines spanning GPUs talk through NCCL, which on NVLink machines may use NVLink
//! multicast (NVLS); on the lent GPU machines multicast can take shared GPUs out of
//! service, so every spanning engine gets the switches that keep it off
//! ([`MULTICAST_OFF`]) and no engine's `env` may turn one on.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::model::ModelShape;
use crate::plan::EnginePlan;
use crate::spec::{DeploymentSpec, EngineKind, EngineSpec, GpuSelector, Sharing};

/// The environment that keeps NVLink multicast off: NCCL's NVLS collectives, PyTorch's
/// symmetric-memory multicast and NVSHMEM's NVLS. Required on the lent GPU machines.
pub const MULTICAST_OFF: [(&str, &str); 3] = [
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
];

/// The GPUs an engine runs on, in its `CUDA_VISIBLE_DEVICES` order: its `gpus`, else the
/// deployment's `gpu`; none on the CPU.
pub fn engine_gpus(spec: &DeploymentSpec, e: &EngineSpec) -> Vec<GpuSelector> {
    match &e.gpus {
        Some(g) => g.iter().map(|i| GpuSelector::Index(*i)).collect(),
        None if spec.gpu.is_cpu() => Vec::new(),
        None => vec![spec.gpu.clone()],
    }
}

/// An engine's tensor parallel size: `tensor_parallel_size`, else the number of its GPUs
/// (1 on the CPU).
pub fn tensor_parallel_size(spec: &DeploymentSpec, e: &EngineSpec) -> u32 {
    e.tensor_parallel_size
        .unwrap_or_else(|| engine_gpus(spec, e).len().max(1) as u32)
}

/// Every GPU some engine of the deployment uses, each once, in index order (UUIDs after).
/// What the MPS daemon must see and the plan's per-GPU table lists.
pub fn deployment_gpus(spec: &DeploymentSpec) -> Vec<GpuSelector> {
    let mut out: Vec<GpuSelector> = Vec::new();
    for e in &spec.engines {
        for g in engine_gpus(spec, e) {
            if !out.contains(&g) {
                out.push(g);
            }
        }
    }
    out.sort_by_key(|g| match g {
        GpuSelector::Index(i) => (0, *i, String::new()),
        other => (1, 0, other.to_string()),
    });
    out
}

/// `CUDA_VISIBLE_DEVICES` of an engine: its GPUs joined by commas (`"0,1"`).
pub fn cuda_visible_devices(gpus: &[GpuSelector]) -> Option<String> {
    let parts: Vec<String> = gpus
        .iter()
        .filter_map(GpuSelector::cuda_visible_devices)
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// KV heads each worker holds at tensor parallel size `tp`: `kv / tp`, or one replicated
/// head when there are fewer KV heads than workers (vLLM's `QKVParallelLinear`).
pub fn kv_heads_per_gpu(kv_heads: usize, tp: u32) -> usize {
    let tp = tp.max(1) as usize;
    if kv_heads >= tp {
        kv_heads / tp
    } else {
        1
    }
}

/// KV cache bytes per token on each GPU of an engine at tensor parallel size `tp`: the
/// KV heads that GPU holds x head_dim x layers x 2 (K and V) x dtype bytes.
pub fn kv_bytes_per_token_per_gpu(shape: &ModelShape, dtype_bytes: u64, tp: u32) -> u64 {
    let kv = shape.config.num_key_value_heads;
    let whole = shape.kv_bytes_per_token(dtype_bytes);
    if kv == 0 || tp <= 1 {
        return whole;
    }
    whole / kv as u64 * kv_heads_per_gpu(kv, tp) as u64
}

/// What one engine replica places on one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuShare {
    /// The replica (`gen`, `gen-0`, ...).
    pub engine: String,
    /// Its total on this GPU (budget, or weights + overhead).
    pub bytes: u64,
}

/// One GPU of a deployment: what every engine places on it, against its memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuUse {
    /// The GPU as the deployment names it (an index or a UUID).
    pub gpu: String,
    pub name: Option<String>,
    /// Its total memory; `None` when unknown.
    pub memory_bytes: Option<u64>,
    pub engines: Vec<GpuShare>,
    pub total_bytes: u64,
    /// The sum is within its memory (true when the memory is unknown).
    pub fits: bool,
}

impl GpuUse {
    /// GPU `gpu`'s use by the planned replicas that run on it.
    pub fn of(
        gpu: &GpuSelector,
        name: Option<String>,
        memory_bytes: Option<u64>,
        plans: &[EnginePlan],
    ) -> GpuUse {
        let key = gpu.to_string();
        let engines: Vec<GpuShare> = plans
            .iter()
            .filter(|p| p.gpus.contains(&key))
            .map(|p| GpuShare {
                engine: p.name.clone(),
                bytes: p.total_bytes,
            })
            .collect();
        let total_bytes = engines.iter().map(|s| s.bytes).sum();
        GpuUse {
            gpu: key,
            name,
            memory_bytes,
            engines,
            total_bytes,
            fits: memory_bytes.is_none_or(|m| total_bytes <= m),
        }
    }
}

/// The per-GPU table of a plan: each GPU, its memory, every replica's share and the sum;
/// then which GPUs each engine spans.
pub fn write_gpu_table(
    f: &mut std::fmt::Formatter<'_>,
    uses: &[GpuUse],
    plans: &[EnginePlan],
) -> std::fmt::Result {
    use crate::units::human_bytes;
    let rows: Vec<[String; 4]> = uses
        .iter()
        .map(|u| {
            let shares = u
                .engines
                .iter()
                .map(|s| format!("{} {}", s.engine, human_bytes(s.bytes)))
                .collect::<Vec<_>>()
                .join(", ");
            let (memory, sum) = match u.memory_bytes {
                Some(m) => (
                    human_bytes(m),
                    format!(
                        "{} ({:.1}%) {}",
                        human_bytes(u.total_bytes),
                        u.total_bytes as f64 / m as f64 * 100.0,
                        if u.fits { "fits" } else { "DOES NOT FIT" }
                    ),
                ),
                None => ("unknown".to_string(), human_bytes(u.total_bytes)),
            };
            let name = u.name.clone().unwrap_or_default();
            [
                format!("GPU {} {name}", u.gpu).trim_end().to_string(),
                memory,
                shares,
                sum,
            ]
        })
        .collect();
    let header = ["gpu", "memory", "engines", "sum"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line = r
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        writeln!(f, "{}", line.trim_end())?;
    }
    let spans: Vec<String> = plans
        .iter()
        .filter(|p| !p.gpus.is_empty())
        .map(|p| {
            format!(
                "{} on {} (TP {})",
                p.name,
                p.gpus.join(","),
                p.tensor_parallel_size
            )
        })
        .collect();
    writeln!(f, "engines: {}", spans.join("; "))
}

/// Why a model cannot be split `tp` ways, with vLLM's rule; `None` when it can.
pub fn head_split_problem(shape: &ModelShape, tp: u32) -> Option<String> {
    let c = &shape.config;
    let tp_us = tp as usize;
    if tp <= 1 {
        return None;
    }
    if !c.num_attention_heads.is_multiple_of(tp_us) {
        return Some(format!(
            "{tp} does not divide the model's {} attention heads: each GPU holds an equal share of the heads (vLLM refuses it); use a divisor of {}",
            c.num_attention_heads, c.num_attention_heads
        ));
    }
    let kv = c.num_key_value_heads;
    if kv > 0 && !kv.is_multiple_of(tp_us) && !tp_us.is_multiple_of(kv) {
        return Some(format!(
            "the model's {kv} KV heads and {tp} GPUs: vLLM splits KV heads evenly (KV heads divisible by the size) or replicates them (the size divisible by the KV heads), and neither holds"
        ));
    }
    None
}

/// Problems with one engine's `gpus` and `tensor_parallel_size`, and with multicast
/// switches in its `env`, each as (field, reason). Model shapes are read only when TP > 1
/// and the model resolves here; a model that does not is planned with a note instead.
pub fn engine_problems(spec: &DeploymentSpec, e: &EngineSpec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(gpus) = &e.gpus {
        if gpus.is_empty() {
            out.push((
                "gpus",
                "empty: name the engine's GPUs, e.g. gpus = [0, 1], or leave gpus out to use the deployment's gpu".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for g in gpus {
            if !seen.insert(*g) {
                out.push(("gpus", format!("GPU {g} is listed twice")));
            }
        }
        if spec.gpu.is_cpu() {
            out.push((
                "gpus",
                "the deployment runs on the CPU (gpu = \"cpu\"): set the deployment's gpu (e.g. gpu = 0), the default for engines without gpus".into(),
            ));
        }
        if spec.sharing == Sharing::Mig {
            out.push((
                "gpus",
                "not supported with sharing = \"mig\": a MIG engine runs on its one mig_device; use sharing = \"timeslice\" or \"mps\" for an engine across GPUs".into(),
            ));
        }
        if e.env.contains_key("CUDA_VISIBLE_DEVICES") {
            out.push((
                "env",
                "CUDA_VISIBLE_DEVICES is colocate's to set (from gpus): remove it from env".into(),
            ));
        }
    }
    let n_gpus = engine_gpus(spec, e).len().max(1) as u32;
    match e.tensor_parallel_size {
        Some(0) => out.push(("tensor_parallel_size", "must be at least 1".into())),
        Some(tp) if tp != n_gpus && !(e.gpus.as_ref().is_some_and(|g| g.is_empty())) => {
            let has = match &e.gpus {
                Some(_) => format!("gpus lists {n_gpus}"),
                None => format!("the engine runs on 1 (the deployment's gpu = {})", spec.gpu),
            };
            out.push((
                "tensor_parallel_size",
                format!(
                    "{tp} but {has}: it must equal the number of the engine's GPUs (one worker per GPU); name them with gpus = [...] or leave tensor_parallel_size out"
                ),
            ));
        }
        _ => {}
    }
    let tp = tensor_parallel_size(spec, e);
    if tp > 1 {
        match e.kind {
            EngineKind::Builtin => out.push((
                "tensor_parallel_size",
                format!(
                    "{tp}: the built-in engine has no tensor parallelism yet (planned in issue 19): run it on one GPU, or use kind = \"vllm\""
                ),
            )),
            EngineKind::Tei => out.push((
                "tensor_parallel_size",
                format!("{tp}: TEI has no tensor parallelism: run it on one GPU"),
            )),
            EngineKind::Vllm | EngineKind::Sglang | EngineKind::Command => {}
        }
        let modelled = matches!(e.kind, EngineKind::Vllm | EngineKind::Sglang);
        if modelled {
            if let Some(why) = ModelShape::resolve(&e.model)
                .ok()
                .and_then(|m| head_split_problem(&m, tp))
            {
                out.push(("tensor_parallel_size", why));
            }
        }
    }
    for (k, off) in MULTICAST_OFF {
        if let Some(v) = e.env.get(k) {
            if v != off {
                out.push((
                    "env",
                    format!(
                        "{k}={v}: NVLink multicast stays off on these machines ({k}={off}; it can take shared GPUs out of service): remove it from env"
                    ),
                ));
            }
        }
    }
    if matches!(e.kind, EngineKind::Vllm | EngineKind::Sglang) {
        let own = match e.kind {
            EngineKind::Vllm => ["--tensor-parallel-size", "-tp"],
            _ => ["--tp-size", "--tp"],
        };
        for flag in crate::vllm::flags_in(&e.args) {
            if own.contains(&flag.as_str()) {
                out.push((
                    "args",
                    format!("{flag} is colocate's to set (from gpus and tensor_parallel_size): remove it from args"),
                ));
            }
        }
    }
    out
}

/// Fractions of GPU memory per GPU: an engine's `memory = 0.5` takes half of *each* of its
/// GPUs (as vLLM's `--gpu-memory-utilization` does), so budgets add up per GPU.
pub fn fraction_problems(spec: &DeploymentSpec) -> Vec<(String, String)> {
    let gpus = deployment_gpus(spec);
    let several = gpus.len() > 1;
    let mut out = Vec::new();
    for g in &gpus {
        let sum: f64 = spec
            .engines
            .iter()
            .filter(|e| engine_gpus(spec, e).contains(g))
            .filter_map(|e| match e.memory {
                Some(crate::spec::MemoryBudget::Fraction(f)) => Some(f * e.replicas.max(1) as f64),
                _ => None,
            })
            .sum();
        if sum > 1.0 + 1e-9 {
            let on = if several {
                format!(" on GPU {g}")
            } else {
                String::new()
            };
            out.push((
                "engines[*].memory".to_string(),
                format!(
                    "budgets over 100%{on}: the engines' memory fractions (times replicas) add up to {:.1}%",
                    sum * 100.0
                ),
            ));
        }
    }
    out
}

/// Where an engine's GPUs are missing on this machine: `machine` lists the indices NVML
/// reports (empty: unknown, nothing is checked). The error names the engine's field.
pub fn missing_gpus(spec: &DeploymentSpec, machine: &[(u32, String)]) -> Result<(), String> {
    if machine.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    for (i, e) in spec.engines.iter().enumerate() {
        let Some(gpus) = &e.gpus else { continue };
        for g in gpus {
            if !machine.iter().any(|(m, _)| m == g) {
                problems.push(format!(
                    "engines[{i}].gpus: GPU {g} is not on this machine (it has {}: {})",
                    machine.len(),
                    machine
                        .iter()
                        .map(|(m, n)| format!("{m} {n}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse;

    fn spec(engines: &str) -> DeploymentSpec {
        parse(&format!("gpu = 0\nsharing = \"mps\"\n{engines}")).unwrap()
    }

    #[test]
    fn kv_heads_split_or_replicate() {
        assert_eq!(kv_heads_per_gpu(8, 2), 4);
        assert_eq!(kv_heads_per_gpu(4, 4), 1);
        assert_eq!(kv_heads_per_gpu(4, 8), 1);
        assert_eq!(kv_heads_per_gpu(8, 1), 8);
    }

    #[test]
    fn gpus_default_to_the_deployments_and_sort() {
        let s = spec(
            "[[engines]]\nname = \"a\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 1\ngpus = [1, 0]\n\
             [[engines]]\nname = \"b\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 2\n",
        );
        assert_eq!(tensor_parallel_size(&s, &s.engines[0]), 2);
        assert_eq!(tensor_parallel_size(&s, &s.engines[1]), 1);
        assert_eq!(
            cuda_visible_devices(&engine_gpus(&s, &s.engines[0])).as_deref(),
            Some("1,0")
        );
        assert_eq!(
            deployment_gpus(&s),
            vec![GpuSelector::Index(0), GpuSelector::Index(1)]
        );
    }

    #[test]
    fn missing_gpus_are_named() {
        let s = spec(
            "[[engines]]\nname = \"a\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 1\ngpus = [0, 2]\n",
        );
        let machine = vec![
            (0, "NVIDIA H200".to_string()),
            (1, "NVIDIA H200".to_string()),
        ];
        let e = missing_gpus(&s, &machine).unwrap_err();
        assert_eq!(
            e,
            "engines[0].gpus: GPU 2 is not on this machine (it has 2: 0 NVIDIA H200; 1 NVIDIA H200)"
        );
        assert!(missing_gpus(&s, &[]).is_ok());
    }
}
