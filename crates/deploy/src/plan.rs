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

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::adapters::{self, CommandInput, MemoryFlag};
use crate::gpu_glue;
pub use crate::gpu_glue::{catalogue_memory, GpuFacts};
use crate::model::ModelShape;
use crate::spec::{DeploymentSpec, EngineKind, Sharing, Task};
use crate::units::human_bytes;

const MIB: u64 = 1 << 20;
/// A CUDA context with cuBLAS loaded: what `nvidia-smi` shows for an idle client.
const CUDA_CONTEXT_BYTES: u64 = 512 * MIB;

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
}

/// Bytes per weight/KV element an engine uses.
fn dtype_bytes(kind: EngineKind, device: &str, model: Option<&ModelShape>) -> u64 {
    match (kind, device) {
        // The built-in CPU backend computes in f32.
        (EngineKind::Builtin, "cpu") => 4,
        (EngineKind::Builtin, _) => 2,
        _ => model.map(|m| m.dtype_bytes()).unwrap_or(2),
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

/// Plans a deployment. `gpu`: the GPU's facts if known (from `gpu::info`); otherwise the
/// catalogue entry named by `gpu_name`, or unknown.
pub fn plan(spec: &DeploymentSpec, gpu: Option<&GpuFacts>) -> anyhow::Result<Plan> {
    crate::spec::validate(spec)?;
    let on_cpu = spec.gpu.is_cpu();
    let facts: Option<GpuFacts> = if on_cpu {
        None
    } else {
        gpu.cloned().or_else(|| {
            spec.gpu_name.as_deref().and_then(|n| {
                gpu_glue::catalogue_memory(n).map(|b| GpuFacts {
                    name: n.to_string(),
                    memory_total_bytes: b,
                })
            })
        })
    };
    let total_mem = facts.as_ref().map(|f| f.memory_total_bytes);
    let mut problems = Vec::new();

    // Budgets in bytes; engines without one share what is left (on a known GPU).
    let mut budgets: Vec<Option<u64>> = Vec::new();
    let mut budgeted: u64 = 0;
    let mut unbudgeted = 0u64;
    for e in &spec.engines {
        for _ in 0..e.replicas.max(1) {
            let b = e.memory.and_then(|m| m.bytes(total_mem));
            if let Some(b) = b {
                budgeted += b;
            } else if !on_cpu && spec.sharing != Sharing::Mig {
                unbudgeted += 1;
            }
            budgets.push(b);
        }
    }
    if let (Some(t), true) = (total_mem, unbudgeted > 0) {
        let share = t.saturating_sub(budgeted) / unbudgeted;
        for b in budgets.iter_mut().filter(|b| b.is_none()) {
            *b = Some(share);
        }
    }

    let mut engines = Vec::new();
    let mut started_before: u64 = 0;
    let mut idx = 0;
    for e in &spec.engines {
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
        let dt = dtype_bytes(e.kind, &device, shape.as_ref());
        let weights = shape
            .as_ref()
            .map(|m| m.weights_bytes(e.task == Task::Generate, dt))
            .unwrap_or(0);
        let kv_per_token = match (&shape, e.task) {
            (Some(m), Task::Generate) => m.kv_bytes_per_token(dt),
            _ => 0,
        };
        let overhead = overhead_bytes(e.kind, &device);

        for (inst, port) in e.instances() {
            let budget = budgets[idx];
            idx += 1;
            let explicit = e.memory.is_some();
            let free_for_kv = budget.map(|b| b.saturating_sub(weights + overhead));
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
            let memory = memory_flag(
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
            );
            let cmd = adapters::command_line(&CommandInput {
                engine: e,
                port,
                device: &device,
                memory,
                colocate_bin: "colocate",
            });
            let mut env = Vec::new();
            match spec.sharing {
                Sharing::Mig => {
                    if let Some(m) = &e.mig_device {
                        env.push(("CUDA_VISIBLE_DEVICES".to_string(), m.clone()));
                    }
                }
                _ => {
                    if let Some(v) = spec.gpu.cuda_visible_devices() {
                        env.push(("CUDA_VISIBLE_DEVICES".to_string(), v));
                    }
                }
            }
            if spec.sharing == Sharing::Mps {
                let pinned = if explicit { budget } else { None };
                env.extend(gpu_glue::mps_client_limits(e.sm_percent, pinned));
            }
            env.extend(e.env.iter().map(|(k, v)| (k.clone(), v.clone())));
            let total = budget.unwrap_or(weights + overhead);
            started_before += total;
            engines.push(EnginePlan {
                name: inst,
                engine: e.name.clone(),
                kind: e.kind,
                task: e.task,
                model: e.model.clone(),
                served_model_name: e.served_name().to_string(),
                port,
                device: device.clone(),
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
            });
        }
    }
    let total_bytes: u64 = engines.iter().map(|e| e.total_bytes).sum();
    if let Some(t) = total_mem {
        if spec.sharing != Sharing::Mig && total_bytes > t {
            problems.push(format!(
                "the engines need {} but the GPU has {}",
                human_bytes(total_bytes),
                human_bytes(t)
            ));
        }
    }
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
    })
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
            (Some(n), Some(m)) => format!("GPU {} ({n}, {})", self.gpu, human_bytes(m)),
            _ => format!("GPU {} (memory: unknown)", self.gpu),
        };
        writeln!(
            f,
            "deployment `{}` on {gpu}, sharing: {}",
            self.name, self.sharing
        )?;
        writeln!(f)?;
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
        let sum = match self.gpu_memory_bytes {
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
    use crate::spec::{parse, EngineSpec, GpuSelector, MemoryBudget};

    fn h100() -> GpuFacts {
        GpuFacts {
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 81_559 << 20,
        }
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
        let p = plan(&spec, Some(&h100())).unwrap();
        assert!(p.fits, "{p}");
        assert_eq!(
            p.engines[0].shell_line(),
            "CUDA_VISIBLE_DEVICES=0 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=70 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=44857M \
             vllm serve Qwen/Qwen3-8B --host 127.0.0.1 --port 8001 --served-model-name Qwen/Qwen3-8B \
             --gpu-memory-utilization 0.55"
        );
        assert_eq!(
            p.engines[1].shell_line(),
            "CUDA_VISIBLE_DEVICES=0 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=30 CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=28545M \
             vllm serve Qwen/Qwen3-Embedding-8B --host 127.0.0.1 --port 8002 \
             --served-model-name Qwen/Qwen3-Embedding-8B --task embed --gpu-memory-utilization 0.35"
        );
        // Qwen3-8B: embed 622,329,856 + 36 layers x 192,946,432 + norm 4,096 + lm_head
        // 622,329,856 = 8,190,735,360 params, x 2 bytes (bf16).
        assert_eq!(p.engines[0].weights_bytes, 16_381_470_720);
        assert_eq!(p.engines[0].kv_bytes_per_token, 147_456);
        let budget = (81_559u64 << 20) as f64 * 0.55;
        let expect_tokens = (budget as u64 - 16_381_470_720 - (2048 << 20)) / 147_456;
        assert_eq!(p.engines[0].kv_tokens, Some(expect_tokens));
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
        let p = plan(&spec, Some(&h100())).unwrap();
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
        let p = plan(&spec, Some(&h100())).unwrap();
        assert!(!p.fits);
        assert!(
            p.problems[0].contains("smaller than weights"),
            "{:?}",
            p.problems
        );
        assert!(p.to_string().contains("DOES NOT FIT"));
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
        let p = plan(&spec, None).unwrap();
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
        let p = plan(&spec, Some(&h100())).unwrap();
        assert_eq!(p.engines.len(), 2);
        assert_eq!(p.engines[0].name, "a-0");
        assert_eq!(p.engines[1].port, 9001);
        assert_eq!(p.engines[0].memory_flag, "--gpu-memory-utilization 0.5");
    }
}
