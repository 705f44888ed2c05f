//! The memory plan: does the deployment fit, and what does each engine's flag say.
//!
//! Per replica: weights (parameters x dtype bytes), KV bytes per token, the tokens its
//! budget leaves room for, the CUDA context and workspace overhead, and the total. The sum
//! is compared with the GPU's memory. Then each budget is translated into the engine's own
//! flag with its own meaning:
//!
//! - vLLM and the built-in engine on CUDA: `--gpu-memory-utilization`, budget / total.
//! - SGLang: `--mem-fraction-static`, a fraction of the memory *free when it starts*, so
//!   budget / (total - budgets of the engines started before it on that GPU).
//! - TEI: `--max-batch-tokens` (what the budget minus weights holds in activations) and
//!   `--max-client-batch-size` (that over a 512-token input).
//! - The built-in engine on CPU: `--kv-cache-memory`, budget minus weights and workspace.
//!
//! Engines without a budget on a GPU share what the budgeted ones leave, equally.
//!
//! An engine across several GPUs (tensor parallelism, [`crate::topology`]) is planned per
//! GPU: weights / TP, the KV heads each GPU holds, and its budget taken from *each* of its
//! GPUs (vLLM's `--gpu-memory-utilization` is per GPU too). The fit is checked per GPU:
//! what every engine places on that GPU against that GPU's memory ([`GpuUse`]).
//!
//! Under MPS an engine with a budget gets it as `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`, which
//! the driver enforces (H200, 2026-11-30: a client limited to 4 GiB allocated 3.25 GiB, then
//! ran out), while `cudaMemGetInfo` reports free = the limit and total = the whole GPU.
//! vLLM sizes itself as `--gpu-memory-utilization` x total and refuses to start when free
//! is less than that, so its fraction is computed against the whole GPU from the limit
//! minus the CUDA context the limit also holds; the plan prints both sides
//! ([`PinnedSizing`]) and reports a sizing that cannot fit its limit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::adapters::{self, CommandInput, MemoryFlag};
use crate::gpu_glue;
pub use crate::gpu_glue::{catalogue_memory, GpuFacts};
use crate::model::ModelShape;
use crate::spec::{EngineKind, EngineSpec, GpuSelector, Sharing, Task, ValidDeployment};
use crate::topology::{self, GpuUse};
use crate::units::human_bytes;
use crate::vllm::{self, VllmVersion};
use engine::model::config::Fp8Kept;

const MIB: u64 = 1 << 20;
/// A CUDA context with cuBLAS loaded: what `nvidia-smi` shows for an idle client.
const CUDA_CONTEXT_BYTES: u64 = 512 * MIB;
/// What an MPS client's pinned limit holds besides what the engine sizes for itself (its
/// CUDA context and allocator slack). Measured on the H200: a client limited to 4 GiB
/// allocated 3.25 GiB before running out of memory.
pub const MPS_CONTEXT_RESERVE_BYTES: u64 = 768 * MIB;
/// vLLM's memory besides weights and KV cache: the activation peak of its profiling run at
/// the default 8k batched tokens, plus CUDA graphs.
const VLLM_WORKSPACE_BYTES: u64 = 1536 * MIB;

/// One replica's share of memory and its command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnginePlan {
    /// Replica name (`gen`, or `gen-0`, `gen-1`, ... with replicas).
    pub name: String,
    /// The engine it is a replica of.
    pub engine: String,
    pub kind: EngineKind,
    pub task: Task,
    pub model: String,
    /// The name clients use in `model`.
    pub served_model_name: String,
    pub port: u16,
    /// `cpu` or `cuda`.
    pub device: String,
    /// The GPUs it runs on, in its `CUDA_VISIBLE_DEVICES` order (empty on the CPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// Workers across `gpus` (1: one GPU).
    #[serde(default = "one")]
    pub tensor_parallel_size: u32,
    /// Weights on each of its GPUs (the whole model at TP = 1). The KV bytes per token,
    /// overhead, total and budget below are per GPU too.
    pub weights_bytes: u64,
    pub kv_bytes_per_token: u64,
    /// Tokens the KV budget holds; `None` when there is no budget (engine default) or no KV.
    pub kv_tokens: Option<u64>,
    pub overhead_bytes: u64,
    /// The budget, or weights + overhead when none is known.
    pub total_bytes: u64,
    /// The budget in bytes, when one applies.
    pub budget_bytes: Option<u64>,
    /// The memory flag as passed, e.g. `--gpu-memory-utilization 0.45`.
    pub memory_flag: String,
    /// argv; argv[0] of a built-in engine is `colocate` (`up` puts the real binary there).
    pub command: Vec<String>,
    /// Environment on top of the parent's (GPU selection, MPS limits, the spec's `env`).
    pub env: Vec<(String, String)>,
    /// Things the reader should know (unknown model, budget too small, ...).
    pub notes: Vec<String>,
    /// vLLM: the version the command line is written for, and how it was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vllm_version: Option<VersionChoice>,
    /// MPS with a budget: the pinned limit beside the engine's own sizing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<PinnedSizing>,
}

/// The vLLM version of a command line and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionChoice {
    pub version: String,
    /// `detected` (asked the launcher), `pinned` (`vllm_version`) or `assumed` (neither:
    /// [`vllm::DEFAULT_VERSION`]).
    pub source: String,
}

/// An engine under an MPS pinned memory limit, as the driver enforces it and as the
/// engine sizes itself (fraction x the total `cudaMemGetInfo` reports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinnedSizing {
    /// `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`, in bytes (whole MiB, as the variable says it).
    pub limit_bytes: u64,
    /// The engine's memory fraction (`--gpu-memory-utilization`).
    pub fraction: f64,
    /// The total the engine multiplies it by: the whole GPU.
    pub gpu_total_bytes: u64,
    /// fraction x total, rounded up as vLLM does.
    pub sizing_bytes: u64,
    /// What the limit holds besides the sizing (CUDA context).
    pub reserve_bytes: u64,
    pub weights_bytes: u64,
    /// Activations and CUDA graphs.
    pub workspace_bytes: u64,
    /// What the sizing leaves for the KV cache (or `kv_cache_memory`).
    pub kv_cache_bytes: u64,
    /// sizing + reserve within the limit.
    pub fits: bool,
}

impl EnginePlan {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The command line with its environment, ready to paste into a shell.
    pub fn shell_line(&self) -> String {
        adapters::shell_line(&self.env, &self.command)
    }
}

/// The plan of a whole deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// `cpu`, a GPU index or a UUID.
    pub gpu: String,
    pub gpu_name: Option<String>,
    pub sharing: Sharing,
    /// Replicas in start order.
    pub engines: Vec<EnginePlan>,
    /// The GPU's total memory; `None` on the CPU or when unknown.
    pub gpu_memory_bytes: Option<u64>,
    /// Sum of every replica's total.
    pub total_bytes: u64,
    /// Everything fits: each budget holds its weights and overhead, and the sum fits the GPU.
    pub fits: bool,
    /// Why it does not fit, when it does not.
    pub problems: Vec<String>,
    /// What each GPU of the deployment holds (every engine's share on it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuUse>,
}

fn one() -> u32 {
    1
}

impl Plan {
    /// The machine indices of the GPUs the deployment uses (what the MPS daemon must see:
    /// `gpu_glue::Mps::start_seeing`); GPUs named by UUID are left out.
    pub fn gpu_indices(&self) -> Vec<u32> {
        self.gpus
            .iter()
            .filter_map(|u| u.gpu.parse().ok())
            .collect()
    }
}

/// Bytes per weight/KV element an engine uses.
/// The machine index of a GPU named by index (a UUID has none here).
fn index_of(g: &GpuSelector) -> Option<u32> {
    match g {
        GpuSelector::Index(i) => Some(*i),
        _ => None,
    }
}

fn dtype_bytes(kind: EngineKind, device: &str, model: Option<&ModelShape>) -> u64 {
    match (kind, device) {
        // The built-in CPU backend computes in f32.
        (EngineKind::Builtin, "cpu") => 4,
        (EngineKind::Builtin, _) => 2,
        _ => model.map(|m| m.dtype_bytes()).unwrap_or(2),
    }
}

/// What an engine keeps in FP8 of a block-FP8 checkpoint: vLLM and SGLang compute in FP8;
/// the built-in engine as its loader decides for the device (`Device::fp8_kept`).
fn fp8_kept(kind: EngineKind, device: &str) -> Fp8Kept {
    use engine::load::Device;
    match (kind, device) {
        (EngineKind::Builtin, "cpu") => Device::Cpu.fp8_kept(),
        (EngineKind::Builtin, _) => Device::Cuda(0).fp8_kept(),
        _ => Fp8Kept::All,
    }
}

/// CUDA context plus the engine's workspace (activations at its default batch, CUDA graphs).
fn overhead_bytes(kind: EngineKind, device: &str) -> u64 {
    if device == "cpu" {
        // No context; the built-in engine's scratch buffers.
        return 16 * MIB;
    }
    CUDA_CONTEXT_BYTES
        + match kind {
            EngineKind::Builtin => 256 * MIB,
            // vLLM and SGLang: activation peak at 8k batched tokens plus CUDA graphs.
            EngineKind::Vllm | EngineKind::Sglang => 1536 * MIB,
            EngineKind::Tei => 256 * MIB,
            EngineKind::Command => 0,
        }
}

/// Plans a validated deployment. `gpu`: the GPU's facts if known (from `gpu::info`);
/// otherwise the catalogue entry named by `gpu_name`, or unknown. vLLM command lines are
/// written for the pinned `vllm_version`, else [`vllm::DEFAULT_VERSION`] (`up` plans with
/// the installed version instead: [`vllm::plan_checked`]). Whether the budgets, weights and
/// KV caches fit the GPU's memory is answered here (`fits`, `problems`), not by validation.
pub fn plan(deployment: &ValidDeployment, gpu: Option<&GpuFacts>) -> anyhow::Result<Plan> {
    plan_with(deployment, gpu, &BTreeMap::new())
}

/// The vLLM version of an engine's command line: detected, else pinned, else assumed.
fn vllm_version_of(
    e: &EngineSpec,
    detected: &BTreeMap<String, VllmVersion>,
) -> (VllmVersion, &'static str) {
    if let Some(v) = detected.get(&e.name) {
        return (*v, "detected");
    }
    match e.vllm_version.as_deref().map(VllmVersion::parse) {
        Some(Ok(v)) => (v, "pinned"),
        _ => (vllm::DEFAULT_VERSION, "assumed"),
    }
}

/// [`plan`] with the vLLM versions `up` found installed, by engine name.
pub fn plan_with(
    deployment: &ValidDeployment,
    gpu: Option<&GpuFacts>,
    detected: &BTreeMap<String, VllmVersion>,
) -> anyhow::Result<Plan> {
    let spec = deployment.spec();
    let on_cpu = spec.gpu.is_cpu();
    let facts: Option<GpuFacts> = if on_cpu {
        None
    } else {
        gpu.cloned().or_else(|| {
            spec.gpu_name
                .as_deref()
                .and_then(|n| gpu_glue::catalogue_memory(n).map(|b| GpuFacts::of_model(n, b)))
        })
    };
    if let Some(f) = &facts {
        let machine: Vec<(u32, String)> = f
            .machine
            .iter()
            .map(|g| (g.index, g.name.clone()))
            .collect();
        topology::missing_gpus(spec, &machine).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let total_mem = facts.as_ref().map(|f| f.memory_total_bytes);
    let mut problems = Vec::new();
    let gpu_list = topology::deployment_gpus(spec);
    let several = gpu_list.len() > 1;
    let mem_of = |g: &GpuSelector| facts.as_ref().map(|f| f.memory_of(index_of(g)));
    // An engine's memory is that of its smallest GPU: its budget is taken from each.
    let engine_mem = |e: &EngineSpec| -> Option<u64> {
        let gpus = topology::engine_gpus(spec, e);
        let mems: Option<Vec<u64>> = gpus.iter().map(mem_of).collect();
        mems.and_then(|m| m.into_iter().min())
    };
    let gpu_name = |g: &GpuSelector| -> String {
        let f = facts.as_ref();
        f.and_then(|f| f.machine.iter().find(|m| Some(m.index) == index_of(g)))
            .map(|m| m.name.clone())
            .or_else(|| f.map(|f| f.name.clone()))
            .unwrap_or_default()
    };
    let on_gpu = |g: &GpuSelector| {
        if several {
            format!("GPU {g}: ")
        } else {
            String::new()
        }
    };

    // Budgets in bytes per GPU of each replica; engines without one share what is left
    // (on a known GPU), on each of their GPUs.
    let mut budgets: Vec<Option<u64>> = Vec::new();
    let mut budgeted: BTreeMap<String, u64> = BTreeMap::new();
    let mut unbudgeted: BTreeMap<String, u64> = BTreeMap::new();
    for e in &spec.engines {
        let gpus = topology::engine_gpus(spec, e);
        for _ in 0..e.replicas.max(1) {
            let b = e.memory.and_then(|m| m.bytes(engine_mem(e)));
            for g in &gpus {
                match b {
                    Some(b) => *budgeted.entry(g.to_string()).or_default() += b,
                    None if spec.sharing != Sharing::Mig => {
                        *unbudgeted.entry(g.to_string()).or_default() += 1
                    }
                    None => {}
                }
            }
            budgets.push(b);
        }
    }
    // The budgets the file gives, against each GPU's memory (every mode: MIG slices are
    // parts of it too).
    let mut over_budget: BTreeSet<String> = BTreeSet::new();
    for g in &gpu_list {
        let b = budgeted.get(&g.to_string()).copied().unwrap_or(0);
        if let Some(t) = mem_of(g).filter(|t| b > *t) {
            problems.push(format!(
                "{}budgets over 100%: {} of {} on {}",
                on_gpu(g),
                human_bytes(b),
                human_bytes(t),
                gpu_name(g)
            ));
            over_budget.insert(g.to_string());
        }
    }
    let mut idx = 0;
    for e in &spec.engines {
        let gpus = topology::engine_gpus(spec, e);
        let share = gpus
            .iter()
            .map(|g| {
                let key = g.to_string();
                let left = mem_of(g)?.saturating_sub(budgeted.get(&key).copied().unwrap_or(0));
                Some(left / unbudgeted.get(&key).copied().unwrap_or(1).max(1))
            })
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().min());
        for _ in 0..e.replicas.max(1) {
            if budgets[idx].is_none() && spec.sharing != Sharing::Mig {
                budgets[idx] = share;
            }
            idx += 1;
        }
    }

    let mut engines = Vec::new();
    // What the engines started so far placed on each GPU (SGLang sizes from what is free).
    let mut placed: BTreeMap<String, u64> = BTreeMap::new();
    let mut idx = 0;
    for e in &spec.engines {
        let gpus = topology::engine_gpus(spec, e);
        let tp = topology::tensor_parallel_size(spec, e);
        let total_mem = engine_mem(e);
        let device =
            e.device
                .clone()
                .unwrap_or_else(|| if on_cpu { "cpu".into() } else { "cuda".into() });
        let shape = if e.kind == EngineKind::Command && e.model.is_empty() {
            Err(anyhow::anyhow!("no model"))
        } else {
            ModelShape::resolve(&e.model)
        };
        let mut notes = Vec::new();
        if let Err(err) = &shape {
            notes.push(format!("weights unknown: {err}"));
        }
        let shape = shape.ok();
        if let Some(n) = shape.as_ref().and_then(|m| m.note.clone()) {
            notes.push(n);
        }
        if e.gpus.is_some() && facts.as_ref().is_none_or(|f| f.machine.is_empty()) {
            notes.push(format!(
                "gpus {} not checked against a machine: planned for a GPU model, each GPU taken to be one",
                topology::cuda_visible_devices(&gpus).unwrap_or_default()
            ));
        }
        let dt = dtype_bytes(e.kind, &device, shape.as_ref());
        let kept = fp8_kept(e.kind, &device);
        // Per GPU: the weights split TP ways, and the KV heads each GPU holds.
        let weights = shape
            .as_ref()
            .map(|m| m.weights_bytes(e.task == Task::Generate, dt, kept))
            .unwrap_or(0)
            .div_ceil(tp as u64);
        let kv_per_token = match (&shape, e.task) {
            (Some(m), Task::Generate) => topology::kv_bytes_per_token_per_gpu(m, dt, tp),
            _ => 0,
        };
        let overhead = overhead_bytes(e.kind, &device);

        let (version, version_source) = vllm_version_of(e, detected);
        let version_choice = (e.kind == EngineKind::Vllm).then(|| VersionChoice {
            version: version.to_string(),
            source: version_source.to_string(),
        });
        if e.kind == EngineKind::Vllm {
            if version_source == "assumed" {
                notes.push(format!(
                    "vllm_version not set: command line for vLLM {version}; `up` asks the launcher"
                ));
            }
            notes.extend(version_limits(e, version));
        }

        let started_before = gpus
            .iter()
            .map(|g| placed.get(&g.to_string()).copied().unwrap_or(0))
            .max()
            .unwrap_or(0);
        for (inst, port) in e.instances() {
            let budget = budgets[idx];
            idx += 1;
            let explicit = e.memory.is_some();
            let pinned_limit = (spec.sharing == Sharing::Mps && explicit)
                .then_some(budget)
                .flatten()
                .map(|b| b / MIB * MIB);
            let pinned = match (e.kind, pinned_limit, total_mem) {
                (EngineKind::Vllm, Some(l), Some(t)) => {
                    Some(vllm_pinned_sizing(l, t, weights, e.kv_cache_memory))
                }
                _ => None,
            };
            let overhead = if pinned.is_some() {
                MPS_CONTEXT_RESERVE_BYTES + VLLM_WORKSPACE_BYTES
            } else {
                overhead
            };
            if let Some(p) = &pinned {
                if !p.fits {
                    problems.push(format!(
                        "{inst}: vLLM sizes itself {} x {} = {} (weights {} + workspace {} + KV {}), which with the CUDA context ({}) exceeds its pinned limit {}",
                        adapters::fraction(p.fraction),
                        human_bytes(p.gpu_total_bytes),
                        human_bytes(p.sizing_bytes),
                        human_bytes(p.weights_bytes),
                        human_bytes(p.workspace_bytes),
                        human_bytes(p.kv_cache_bytes),
                        human_bytes(p.reserve_bytes),
                        human_bytes(p.limit_bytes)
                    ));
                }
            }
            let free_for_kv = match &pinned {
                Some(p) => Some(p.kv_cache_bytes),
                None => budget.map(|b| b.saturating_sub(weights + overhead)),
            };
            if let Some(b) = budget {
                if b < weights + overhead {
                    problems.push(format!(
                        "{inst}: budget {} is smaller than weights {} + overhead {}",
                        human_bytes(b),
                        human_bytes(weights),
                        human_bytes(overhead)
                    ));
                }
            }
            let kv_tokens = match (free_for_kv, kv_per_token) {
                (Some(f), k) if k > 0 => Some(f / k),
                _ => None,
            };
            if let (Some(t), Some(len)) = (kv_tokens, e.max_model_len) {
                if t < len as u64 && matches!(e.kind, EngineKind::Vllm | EngineKind::Builtin) {
                    problems.push(format!(
                        "{inst}: the KV cache holds {t} tokens, fewer than max_model_len {len}: the engine refuses to start"
                    ));
                }
            }
            let memory = match &pinned {
                Some(p) => MemoryFlag::GpuMemoryUtilization(p.fraction),
                None => memory_flag(
                    e.kind,
                    &device,
                    e.task,
                    budget,
                    explicit,
                    total_mem,
                    started_before,
                    free_for_kv,
                    shape.as_ref(),
                    dt,
                    &mut notes,
                ),
            };
            let cmd = adapters::command_line(&CommandInput {
                engine: e,
                port,
                device: &device,
                memory,
                colocate_bin: "colocate",
                vllm_version: version,
                tensor_parallel_size: tp,
            });
            let mut env = Vec::new();
            match spec.sharing {
                Sharing::Mig => {
                    if let Some(m) = &e.mig_device {
                        env.push(("CUDA_VISIBLE_DEVICES".to_string(), m.clone()));
                    }
                }
                _ => {
                    if let Some(v) = topology::cuda_visible_devices(&gpus) {
                        env.push(("CUDA_VISIBLE_DEVICES".to_string(), v));
                    }
                }
            }
            if spec.sharing == Sharing::Mps {
                let pinned = if explicit { budget } else { None };
                env.extend(gpu_glue::mps_client_limits(
                    e.sm_percent,
                    pinned,
                    gpus.len(),
                ));
            }
            if gpus.len() > 1 || tp > 1 {
                env.extend(
                    topology::MULTICAST_OFF
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                );
            }
            env.extend(adapters::engine_env(e, version));
            for (k, v) in &e.env {
                // A switch the file repeats at its required value is said once.
                if !env.iter().any(|(ek, ev)| ek == k && ev == v) {
                    env.push((k.clone(), v.clone()));
                }
            }
            let total = budget.unwrap_or(weights + overhead);
            engines.push(EnginePlan {
                name: inst,
                engine: e.name.clone(),
                kind: e.kind,
                task: e.task,
                model: e.model.clone(),
                served_model_name: e.served_name().to_string(),
                port,
                device: device.clone(),
                gpus: gpus.iter().map(|g| g.to_string()).collect(),
                tensor_parallel_size: tp,
                weights_bytes: weights,
                kv_bytes_per_token: kv_per_token,
                kv_tokens,
                overhead_bytes: overhead,
                total_bytes: total,
                budget_bytes: budget,
                memory_flag: memory_flag_text(memory),
                command: cmd,
                env,
                notes: notes.clone(),
                vllm_version: version_choice.clone(),
                pinned,
            });
        }
        let per_replica = engines
            .last()
            .map(|p: &EnginePlan| p.total_bytes)
            .unwrap_or(0);
        for g in &gpus {
            *placed.entry(g.to_string()).or_default() += per_replica * e.replicas.max(1) as u64;
        }
    }
    // Every GPU's share of every engine, against that GPU's memory.
    let uses: Vec<GpuUse> = gpu_list
        .iter()
        .map(|g| {
            GpuUse::of(
                g,
                (!gpu_name(g).is_empty()).then(|| gpu_name(g)),
                mem_of(g),
                &engines,
            )
        })
        .collect();
    for u in &uses {
        if let Some(t) = u.memory_bytes {
            if spec.sharing != Sharing::Mig && u.total_bytes > t && !over_budget.contains(&u.gpu) {
                problems.push(if several {
                    format!(
                        "GPU {}: the engines need {} but it has {}",
                        u.gpu,
                        human_bytes(u.total_bytes),
                        human_bytes(t)
                    )
                } else {
                    format!(
                        "the engines need {} but the GPU has {}",
                        human_bytes(u.total_bytes),
                        human_bytes(t)
                    )
                });
            }
        }
    }
    let total_bytes: u64 = engines
        .iter()
        .map(|e| e.total_bytes * e.gpus.len().max(1) as u64)
        .sum();
    Ok(Plan {
        name: spec.name.clone(),
        gpu: spec.gpu.to_string(),
        gpu_name: facts.as_ref().map(|f| f.name.clone()),
        sharing: spec.sharing,
        engines,
        gpu_memory_bytes: total_mem,
        total_bytes,
        fits: problems.is_empty(),
        problems,
        gpus: uses,
    })
}

/// vLLM under a pinned limit `limit` on a GPU of `total` bytes: the fraction that keeps
/// fraction x total plus the CUDA context within the limit (4 decimals, rounded down, so
/// the printed flag never asks for more), and what that leaves for the KV cache.
pub fn vllm_pinned_sizing(
    limit: u64,
    total: u64,
    weights: u64,
    kv_cache_memory: Option<u64>,
) -> PinnedSizing {
    let available = limit.saturating_sub(MPS_CONTEXT_RESERVE_BYTES);
    let fraction = ((available as f64 / total as f64) * 1e4).floor() / 1e4;
    let sizing = (fraction * total as f64).ceil() as u64;
    let kv = match kv_cache_memory {
        Some(k) => k,
        None => sizing.saturating_sub(weights + VLLM_WORKSPACE_BYTES),
    };
    let used = (weights + VLLM_WORKSPACE_BYTES + kv).max(sizing);
    PinnedSizing {
        limit_bytes: limit,
        fraction,
        gpu_total_bytes: total,
        sizing_bytes: sizing,
        reserve_bytes: MPS_CONTEXT_RESERVE_BYTES,
        weights_bytes: weights,
        workspace_bytes: VLLM_WORKSPACE_BYTES,
        kv_cache_bytes: kv,
        fits: fraction > 0.0 && kv > 0 && used + MPS_CONTEXT_RESERVE_BYTES <= limit,
    }
}

/// Settings the chosen vLLM version cannot express, as notes of the plan.
fn version_limits(e: &EngineSpec, v: VllmVersion) -> Vec<String> {
    let mut out = Vec::new();
    if e.kv_cache_memory.is_some() && v < vllm::KV_CACHE_MEMORY_BYTES_SINCE {
        out.push(format!(
            "kv_cache_memory needs vLLM >= {} (--kv-cache-memory-bytes); left out for {v}",
            vllm::KV_CACHE_MEMORY_BYTES_SINCE
        ));
    }
    if e.api_server_count.is_some() && v < vllm::API_SERVER_COUNT_SINCE {
        out.push(format!(
            "api_server_count needs vLLM >= {} (--api-server-count); left out for {v}",
            vllm::API_SERVER_COUNT_SINCE
        ));
    }
    if e.attention_backend.is_some() && v < vllm::ATTENTION_BACKEND_FLAG_SINCE {
        out.push(format!(
            "vLLM {v} has no --attention-backend: set through VLLM_ATTENTION_BACKEND"
        ));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn memory_flag(
    kind: EngineKind,
    device: &str,
    task: Task,
    budget: Option<u64>,
    explicit: bool,
    total_mem: Option<u64>,
    started_before: u64,
    free_for_kv: Option<u64>,
    shape: Option<&ModelShape>,
    dt: u64,
    notes: &mut Vec<String>,
) -> MemoryFlag {
    let Some(budget) = budget else {
        return MemoryFlag::None;
    };
    match kind {
        EngineKind::Builtin if device == "cpu" => {
            if explicit && task == Task::Generate {
                MemoryFlag::KvCacheMemory(free_for_kv.unwrap_or(0).max(MIB))
            } else {
                MemoryFlag::None
            }
        }
        EngineKind::Builtin | EngineKind::Vllm => match total_mem {
            Some(t) => MemoryFlag::GpuMemoryUtilization(budget as f64 / t as f64),
            None => {
                notes.push("GPU memory unknown: no --gpu-memory-utilization".into());
                MemoryFlag::None
            }
        },
        EngineKind::Sglang => match total_mem {
            Some(t) => {
                let free = t.saturating_sub(started_before).max(1);
                MemoryFlag::MemFractionStatic((budget as f64 / free as f64).min(1.0))
            }
            None => {
                notes.push("GPU memory unknown: no --mem-fraction-static".into());
                MemoryFlag::None
            }
        },
        EngineKind::Tei => {
            let per_token = shape.map(|m| m.activation_bytes_per_token(dt)).unwrap_or(0);
            if per_token == 0 {
                return MemoryFlag::None;
            }
            let tokens = free_for_kv.unwrap_or(0) / per_token;
            // TEI wants a multiple of its 512-token default input; at least one input.
            let max_batch_tokens = (tokens / 512 * 512).clamp(512, 131_072);
            MemoryFlag::TeiBatch {
                max_batch_tokens,
                max_client_batch_size: (max_batch_tokens / 512).clamp(1, 512),
            }
        }
        EngineKind::Command => MemoryFlag::None,
    }
}

fn memory_flag_text(m: MemoryFlag) -> String {
    match m {
        MemoryFlag::None => "-".into(),
        MemoryFlag::GpuMemoryUtilization(f) => {
            format!("--gpu-memory-utilization {}", adapters::fraction(f))
        }
        MemoryFlag::MemFractionStatic(f) => {
            format!("--mem-fraction-static {}", adapters::fraction(f))
        }
        MemoryFlag::TeiBatch {
            max_batch_tokens,
            max_client_batch_size,
        } => {
            format!("--max-batch-tokens {max_batch_tokens} --max-client-batch-size {max_client_batch_size}")
        }
        MemoryFlag::KvCacheMemory(b) => format!("--kv-cache-memory {b}"),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gpu = match (&self.gpu_name, self.gpu_memory_bytes) {
            _ if self.gpu == "cpu" => "CPU (memory: unknown)".to_string(),
            _ if self.gpus.len() > 1 => format!(
                "GPUs {} (memory per GPU below)",
                self.gpus
                    .iter()
                    .map(|u| u.gpu.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (Some(n), Some(m)) => format!("GPU {} ({n}, {})", self.gpu, human_bytes(m)),
            _ => format!("GPU {} (memory: unknown)", self.gpu),
        };
        writeln!(
            f,
            "deployment `{}` on {gpu}, sharing: {}",
            self.name, self.sharing
        )?;
        writeln!(f)?;
        let spans = self.gpus.len() > 1 || self.engines.iter().any(|e| e.gpus.len() > 1);
        if spans {
            writeln!(
                f,
                "per GPU of each engine (weights / TP, the KV heads each GPU holds, the budget on each of its GPUs):"
            )?;
        }
        let header = [
            "engine",
            "kind",
            "model",
            "weights",
            "KV/token",
            "KV tokens",
            "overhead",
            "total",
            "memory flag",
        ];
        let rows: Vec<[String; 9]> = self
            .engines
            .iter()
            .map(|e| {
                [
                    e.name.clone(),
                    e.kind.to_string(),
                    e.model.clone(),
                    human_bytes(e.weights_bytes),
                    if e.kv_bytes_per_token > 0 {
                        human_bytes(e.kv_bytes_per_token)
                    } else {
                        "-".into()
                    },
                    e.kv_tokens
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "-".into()),
                    human_bytes(e.overhead_bytes),
                    human_bytes(e.total_bytes),
                    e.memory_flag.clone(),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.len());
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r.iter()) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(widths.iter())
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        writeln!(f, "{}", line(&header.map(String::from)))?;
        for r in &rows {
            writeln!(f, "{}", line(r))?;
        }
        if spans {
            writeln!(f)?;
            topology::write_gpu_table(f, &self.gpus, &self.engines)?;
        }
        let sum = match self.gpu_memory_bytes {
            _ if spans => "all GPUs".to_string(),
            Some(m) => format!(
                "sum: {} of {} ({:.1}%)",
                human_bytes(self.total_bytes),
                human_bytes(m),
                self.total_bytes as f64 / m as f64 * 100.0
            ),
            None => format!(
                "sum: {} (device memory unknown)",
                human_bytes(self.total_bytes)
            ),
        };
        writeln!(
            f,
            "{sum}: {}",
            if self.fits { "fits" } else { "DOES NOT FIT" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        for e in &self.engines {
            for n in &e.notes {
                writeln!(f, "  note ({}): {n}", e.name)?;
            }
        }
        let pinned: Vec<(&EnginePlan, &PinnedSizing)> = self
            .engines
            .iter()
            .filter_map(|e| e.pinned.as_ref().map(|p| (e, p)))
            .collect();
        if !pinned.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "MPS pinned limits and each engine's own sizing (under MPS cudaMemGetInfo reports free = the limit, total = the whole GPU):"
            )?;
            for (e, p) in pinned {
                writeln!(
                    f,
                    "  {}: limit {} {} vLLM {} x {} = {} (weights {} + workspace {} + KV {}) + CUDA context {}",
                    e.name,
                    human_bytes(p.limit_bytes),
                    if p.fits { ">=" } else { "<" },
                    adapters::fraction(p.fraction),
                    human_bytes(p.gpu_total_bytes),
                    human_bytes(p.sizing_bytes),
                    human_bytes(p.weights_bytes),
                    human_bytes(p.workspace_bytes),
                    human_bytes(p.kv_cache_bytes),
                    human_bytes(p.reserve_bytes),
                )?;
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "commands, in start order (each after the previous answers /health):"
        )?;
        for e in &self.engines {
            writeln!(f, "{}", e.shell_line())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{parse, validate, DeploymentSpec, EngineSpec, GpuSelector, MemoryBudget};

    /// The seeds' FP8 MoE generator weighs what each engine holds of it: vLLM keeps every
    /// quantised linear in FP8 (~31 GB), the built-in CUDA engine its experts (the
    /// attention dequantised to bf16: ~32 GB), the built-in CPU engine nothing (f32).
    #[test]
    fn an_fp8_moe_weighs_what_each_engine_keeps_in_fp8() {
        let model = crate::model::ModelShape::resolve("preset:qwen3-30b-a3b-fp8").unwrap();
        let gb = |kind, device| {
            let dt = dtype_bytes(kind, device, Some(&model));
            model.weights_bytes(true, dt, fp8_kept(kind, device)) as f64 / 1e9
        };
        let vllm = gb(EngineKind::Vllm, "cuda");
        let builtin = gb(EngineKind::Builtin, "cuda");
        let cpu = gb(EngineKind::Builtin, "cpu");
        assert!((31.0..31.3).contains(&vllm), "{vllm}");
        assert!((32.0..32.3).contains(&builtin), "{builtin}");
        assert!((122.0..122.3).contains(&cpu), "{cpu}");
    }

    fn valid(spec: &DeploymentSpec) -> ValidDeployment {
        validate(spec.clone()).unwrap()
    }

    fn h100() -> GpuFacts {
        GpuFacts::of_model("NVIDIA H100 80GB HBM3", 81_559 << 20)
    }

    #[test]
    fn vllm_pair_like_the_seeds() {
        let spec = parse(
            r#"
            name = "gen-embed"
            gpu = 0
            sharing = "mps"
            [[engines]]
            name = "gen"
            kind = "vllm"
            model = "Qwen/Qwen3-8B"
            port = 8001
            memory = 0.55
            sm_percent = 70
            [[engines]]
            name = "embed"
            kind = "vllm"
            model = "Qwen/Qwen3-Embedding-8B"
            task = "embed"
            port = 8002
            memory = 0.35
            sm_percent = 30
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), Some(&h100())).unwrap();
        assert!(p.fits, "{p}");
        // Under the pinned limit vLLM's fraction is taken against the whole GPU from the
        // limit less the CUDA context: (44,857 - 768) MiB / 81,559 MiB = 0.54058 -> 0.5405.
        assert_eq!(
            p.engines[0].shell_line(),
            "CUDA_VISIBLE_DEVICES=0 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=70 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=44857M \
             vllm serve Qwen/Qwen3-8B --host 127.0.0.1 --port 8001 --served-model-name Qwen/Qwen3-8B \
             --gpu-memory-utilization 0.5405"
        );
        assert_eq!(
            p.engines[1].shell_line(),
            "CUDA_VISIBLE_DEVICES=0 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=28545M \
             vllm serve Qwen/Qwen3-Embedding-8B --host 127.0.0.1 --port 8002 \
             --served-model-name Qwen/Qwen3-Embedding-8B --runner pooling --convert embed \
             --gpu-memory-utilization 0.3405"
        );
        // Qwen3-8B: embed 622,329,856 + 36 layers x 192,946,432 + norm 4,096 + lm_head
        // 622,329,856 = 8,190,735,360 params, x 2 bytes (bf16).
        assert_eq!(p.engines[0].weights_bytes, 16_381_470_720);
        assert_eq!(p.engines[0].kv_bytes_per_token, 147_456);
        let total = 81_559u64 << 20;
        let sizing = (0.5405 * total as f64).ceil() as u64;
        let pinned = p.engines[0].pinned.as_ref().unwrap();
        assert_eq!(pinned.limit_bytes, 44_857 << 20);
        assert_eq!(pinned.sizing_bytes, sizing);
        assert!(sizing + MPS_CONTEXT_RESERVE_BYTES <= pinned.limit_bytes);
        let kv = sizing - 16_381_470_720 - (1536 << 20);
        assert_eq!(pinned.kv_cache_bytes, kv);
        assert_eq!(p.engines[0].kv_tokens, Some(kv / 147_456));
        // The plan shows both sides of every pinned engine.
        let text = p.to_string();
        assert!(
            text.contains("gen: limit 43.8 GiB >= vLLM 0.5405 x 79.6 GiB = 43.0 GiB (weights 15.3 GiB + workspace 1.5 GiB + KV 26.3 GiB) + CUDA context 768.0 MiB"),
            "{text}"
        );
    }

    fn h200() -> GpuFacts {
        GpuFacts::of_model("NVIDIA H200", 143_771 << 20)
    }

    /// The seeds' pair on the H200 under MPS at 50/30: each limit holds what vLLM sizes.
    #[test]
    fn seeds_pair_under_pinned_limits_on_the_h200() {
        let spec = parse(
            r#"
            gpu = 0
            sharing = "mps"
            [[engines]]
            name = "gen"
            kind = "vllm"
            model = "Qwen/Qwen3-30B-A3B-FP8"
            port = 8100
            memory = 0.5
            max_model_len = 4096
            max_num_seqs = 512
            [[engines]]
            name = "embed"
            kind = "vllm"
            model = "Qwen/Qwen3-Embedding-8B"
            task = "embed"
            port = 8200
            memory = 0.3
            max_model_len = 512
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), Some(&h200())).unwrap();
        assert!(p.fits, "{p}");
        for e in &p.engines {
            let pin = e.pinned.as_ref().unwrap();
            assert!(pin.fits);
            assert!(
                pin.sizing_bytes + pin.reserve_bytes <= pin.limit_bytes,
                "{e:?}"
            );
            // The printed flag is the fraction the sizing used.
            assert_eq!(
                e.memory_flag,
                format!(
                    "--gpu-memory-utilization {}",
                    adapters::fraction(pin.fraction)
                )
            );
        }
        // 0.5 x 143,771 MiB = 71,885 MiB; less 768 MiB, over the whole GPU: 0.4946.
        assert_eq!(p.engines[0].pinned.as_ref().unwrap().fraction, 0.4946);
        assert!(p.engines[0].kv_tokens.unwrap() > 300_000);
        assert!(p.engines[1]
            .command
            .join(" ")
            .contains("--max-model-len 512"));
    }

    /// A fixed KV cache bigger than the limit leaves room for is refused, saying both sides.
    #[test]
    fn a_sizing_beyond_the_pinned_limit_does_not_fit() {
        let spec = parse(
            r#"
            gpu = 0
            sharing = "mps"
            [[engines]]
            name = "gen"
            kind = "vllm"
            model = "Qwen/Qwen3-8B"
            port = 8001
            memory = "24GiB"
            kv_cache_memory = "16GiB"
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), Some(&h200())).unwrap();
        assert!(!p.fits);
        assert!(
            p.problems[0].contains("exceeds its pinned limit 24.0 GiB")
                && p.problems[0].contains("KV 16.0 GiB"),
            "{:?}",
            p.problems
        );
        assert!(p.to_string().contains("gen: limit 24.0 GiB < vLLM"), "{p}");
        // 6 GiB of KV fits: the flag is there too.
        let mut ok = spec.clone();
        ok.engines[0].kv_cache_memory = Some(6 << 30);
        let p = plan(&valid(&ok), Some(&h200())).unwrap();
        assert!(p.fits, "{p}");
        assert!(p.engines[0]
            .command
            .join(" ")
            .contains("--kv-cache-memory-bytes 6442450944"));
    }

    /// Time-sliced engines keep the fraction of their budget (no limit to agree with).
    #[test]
    fn without_mps_the_fraction_is_the_budget() {
        let spec = parse(
            r#"
            gpu = 0
            [[engines]]
            name = "gen"
            kind = "vllm"
            model = "Qwen/Qwen3-30B-A3B-FP8"
            port = 8100
            memory = 0.5
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), Some(&h200())).unwrap();
        assert_eq!(p.engines[0].memory_flag, "--gpu-memory-utilization 0.5");
        assert!(p.engines[0].pinned.is_none());
        assert!(p.engines[0]
            .env
            .iter()
            .all(|(k, _)| k != "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"));
    }

    #[test]
    fn a_kv_cache_shorter_than_max_model_len_is_refused() {
        let spec = parse(
            r#"
            gpu = 0
            [[engines]]
            name = "gen"
            kind = "vllm"
            model = "Qwen/Qwen3-8B"
            port = 8001
            memory = "17GiB"
            max_model_len = 32768
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), Some(&h200())).unwrap();
        assert!(!p.fits);
        assert!(
            p.problems
                .iter()
                .any(|x| x.contains("fewer than max_model_len 32768")),
            "{:?}",
            p.problems
        );
    }

    #[test]
    fn the_vllm_version_shapes_the_line_and_is_noted() {
        let text = |pin: &str| {
            format!(
                "gpu = 0\n[[engines]]\nname = \"e\"\nkind = \"vllm\"\nmodel = \"Qwen/Qwen3-Embedding-8B\"\ntask = \"embed\"\nport = 8200\n{pin}\nkv_cache_memory = \"1GiB\"\n"
            )
        };
        let p = plan(&valid(&parse(&text("")).unwrap()), Some(&h200())).unwrap();
        let v = p.engines[0].vllm_version.as_ref().unwrap();
        assert_eq!(
            (v.version.as_str(), v.source.as_str()),
            ("0.26.0", "assumed")
        );
        assert!(p
            .to_string()
            .contains("vllm_version not set: command line for vLLM 0.26.0"));
        let p = plan(
            &valid(&parse(&text("vllm_version = \"0.10\"")).unwrap()),
            Some(&h200()),
        )
        .unwrap();
        let e = &p.engines[0];
        assert_eq!(e.vllm_version.as_ref().unwrap().source, "pinned");
        assert!(e.command.join(" ").contains("--task embed"));
        assert!(!e.command.join(" ").contains("--kv-cache-memory-bytes"));
        assert!(
            e.notes
                .iter()
                .any(|n| n.contains("kv_cache_memory needs vLLM >= 0.11.0")),
            "{:?}",
            e.notes
        );
        let detected = BTreeMap::from([("e".to_string(), VllmVersion::new(0, 15, 1))]);
        let p = plan_with(&valid(&parse(&text("")).unwrap()), Some(&h200()), &detected).unwrap();
        let e = &p.engines[0];
        assert_eq!(e.vllm_version.as_ref().unwrap().source, "detected");
        assert!(e
            .command
            .join(" ")
            .contains("--runner pooling --convert embed"));
    }

    #[test]
    fn sglang_fraction_depends_on_start_order() {
        let mut spec = DeploymentSpec {
            gpu: GpuSelector::Index(0),
            ..Default::default()
        };
        for (i, (name, frac)) in [("a", 0.5), ("b", 0.25)].iter().enumerate() {
            spec.engines.push(EngineSpec {
                name: name.to_string(),
                kind: EngineKind::Sglang,
                model: "preset:qwen3-0.6b".into(),
                port: 9000 + i as u16,
                memory: Some(MemoryBudget::Fraction(*frac)),
                ..Default::default()
            });
        }
        let p = plan(&valid(&spec), Some(&h100())).unwrap();
        // First: half of an empty GPU. Second: a quarter of the total is half of the half left.
        assert_eq!(p.engines[0].memory_flag, "--mem-fraction-static 0.5");
        assert_eq!(p.engines[1].memory_flag, "--mem-fraction-static 0.5");
    }

    #[test]
    fn does_not_fit_says_why() {
        let spec = parse(
            r#"
            gpu = 0
            [[engines]]
            name = "big"
            kind = "vllm"
            model = "Qwen/Qwen3-8B"
            port = 8001
            memory = "10GiB"
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), Some(&h100())).unwrap();
        assert!(!p.fits);
        assert!(
            p.problems[0].contains("smaller than weights"),
            "{:?}",
            p.problems
        );
        assert!(p.to_string().contains("DOES NOT FIT"));
    }

    /// Budgets beyond the GPU's memory are the plan's finding: validation does not know
    /// the GPU. Said once, as the budgets, not again as the engines' total.
    #[test]
    fn budgets_beyond_the_gpu_do_not_fit() {
        let spec = parse(
            r#"
            gpu = 0
            gpu_name = "H100"
            [[engines]]
            name = "a"
            kind = "vllm"
            model = "Qwen/Qwen3-8B"
            port = 8001
            memory = "60GiB"
            [[engines]]
            name = "b"
            kind = "vllm"
            model = "Qwen/Qwen3-8B"
            port = 8002
            memory = "40GiB"
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), None).unwrap();
        assert!(!p.fits);
        assert_eq!(
            p.problems,
            vec!["budgets over 100%: 100.0 GiB of 79.6 GiB on H100".to_string()],
            "{p}"
        );
        let mut within = spec.clone();
        within.engines[0].memory = Some(MemoryBudget::Bytes(30 << 30));
        assert!(plan(&valid(&within), None).unwrap().fits);
    }

    #[test]
    fn cpu_builtin_gets_kv_cache_memory() {
        let spec = parse(
            r#"
            gpu = "cpu"
            [[engines]]
            name = "gen"
            model = "preset:qwen3-tiny"
            load_format = "dummy"
            port = 8101
            memory = "128MiB"
            "#,
        )
        .unwrap();
        let p = plan(&valid(&spec), None).unwrap();
        let e = &p.engines[0];
        assert_eq!(e.device, "cpu");
        let kv = (128 << 20) - e.weights_bytes - e.overhead_bytes;
        assert_eq!(e.memory_flag, format!("--kv-cache-memory {kv}"));
        assert_eq!(e.kv_tokens, Some(kv / e.kv_bytes_per_token));
        assert!(e.env.is_empty());
        assert!(p.fits);
    }

    #[test]
    fn unbudgeted_engines_share_the_rest() {
        let mut spec = DeploymentSpec {
            gpu: GpuSelector::Index(0),
            ..Default::default()
        };
        spec.engines.push(EngineSpec {
            name: "a".into(),
            kind: EngineKind::Vllm,
            model: "preset:qwen3-0.6b".into(),
            port: 9000,
            replicas: 2,
            ..Default::default()
        });
        let p = plan(&valid(&spec), Some(&h100())).unwrap();
        assert_eq!(p.engines.len(), 2);
        assert_eq!(p.engines[0].name, "a-0");
        assert_eq!(p.engines[1].port, 9001);
        assert_eq!(p.engines[0].memory_flag, "--gpu-memory-utilization 0.5");
    }
}
