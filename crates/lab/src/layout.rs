//! Which GPUs each engine uses in a condition, and its tensor parallel size (issue 19).
//!
//! A condition may give any engine of the template other GPUs (`layout.gen = { gpus = [0,
//! 1] }`, and optionally `tensor_parallel_size`), so that the layouts of a two-GPU study are
//! conditions of one experiment: gen alone on GPU 0 beside embed alone on GPU 1, both across
//! both GPUs (MPS or time-sliced), gen across both with embed on one. The override is a
//! typed edit of the template's engine (`deployments::for_condition`), checked here with
//! deploy's own rules (`deploy::topology::engine_problems`: GPUs listed once, TP equal to
//! the GPU count, the model's heads split evenly, no TP for engines without it), the error
//! naming the experiment's field, and again with the whole deployment by `deploy::validate`.
//!
//! Once any condition names a layout, every condition (and every solo baseline) carries the
//! resolved [`Placement`] of each engine it runs: its labels say where each engine ran
//! (`mps default (gen TP2 on GPU 0,1; embed TP1 on GPU 1)`), and each engine's solo
//! baseline is measured in each placement the co-located conditions use, so that *vs solo*
//! compares an engine with itself on the same GPUs.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use deploy::{DeploymentSpec, EngineSpec, GpuSelector};
use serde::{Deserialize, Serialize};

use crate::matrix::Condition;
use crate::spec::Experiment;

/// One engine's layout in a condition, as the experiment file writes it: either field may be
/// left out (the template's GPUs; a TP size equal to the number of GPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutOverride {
    /// The GPUs the engine spans in this condition, by index (`gpus = [0, 1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
    /// Its tensor parallel size (the number of its GPUs; default: that number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_size: Option<u32>,
}

/// Where one engine runs in a condition: its GPUs and its tensor parallel size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Placement {
    /// GPU indices, in the engine's `CUDA_VISIBLE_DEVICES` order.
    pub gpus: Vec<u32>,
    pub tensor_parallel_size: u32,
}

impl Placement {
    /// `TP2 on GPU 0,1`.
    pub fn text(&self) -> String {
        format!(
            "TP{} on GPU {}",
            self.tensor_parallel_size,
            self.gpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    }
}

/// Whether any condition of the experiment names a layout.
pub fn uses_layouts(exp: &Experiment) -> bool {
    exp.conditions
        .iter()
        .flatten()
        .any(|c| !c.layout.is_empty())
}

/// The template's engine `name` with `o` applied: `gpus` replaced, and the TP size the
/// override gives (else the template's when the GPUs are the template's, else none: the
/// number of GPUs).
pub fn apply(e: &EngineSpec, o: &LayoutOverride) -> EngineSpec {
    let mut e = e.clone();
    if let Some(g) = &o.gpus {
        e.gpus = Some(g.clone());
        e.tensor_parallel_size = None;
    }
    if let Some(tp) = o.tensor_parallel_size {
        e.tensor_parallel_size = Some(tp);
    }
    e
}

/// Where engine `e` of `template` runs: its GPUs by index (its `gpus`, else the
/// deployment's `gpu` when that is an index) and its TP size; `None` on the CPU or a GPU
/// named by UUID (nothing to say by index).
pub fn placement_of(template: &DeploymentSpec, e: &EngineSpec) -> Option<Placement> {
    let gpus: Vec<u32> = match &e.gpus {
        Some(g) => g.clone(),
        None => match &template.gpu {
            GpuSelector::Index(i) => vec![*i],
            _ => return None,
        },
    };
    Some(Placement {
        tensor_parallel_size: e.tensor_parallel_size.unwrap_or(gpus.len().max(1) as u32),
        gpus,
    })
}

/// The placement of every engine of `engines` under the overrides `layout` (empty when the
/// experiment names no layout at all).
pub fn resolve(
    exp: &Experiment,
    engines: &[String],
    layout: &BTreeMap<String, LayoutOverride>,
) -> BTreeMap<String, Placement> {
    if !uses_layouts(exp) {
        return BTreeMap::new();
    }
    engines
        .iter()
        .filter_map(|name| {
            let e = exp.deployment.engines.iter().find(|e| &e.name == name)?;
            let e = match layout.get(name) {
                Some(o) => apply(e, o),
                None => e.clone(),
            };
            placement_of(&exp.deployment, &e).map(|p| (name.clone(), p))
        })
        .collect()
}

/// The label part of a condition's placements: ` (gen TP2 on GPU 0,1; embed TP1 on GPU 1)`,
/// or ` (TP2 on GPU 0,1)` for a solo baseline; empty without placements.
pub fn label_text(
    engines: &[String],
    placements: &BTreeMap<String, Placement>,
    solo: bool,
) -> String {
    let parts: Vec<String> = engines
        .iter()
        .filter_map(|e| {
            placements.get(e).map(|p| {
                if solo {
                    p.text()
                } else {
                    format!("{e} {}", p.text())
                }
            })
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

/// The key that keeps solo figures of one engine apart by placement: its placement's text,
/// or empty (a tenant's engine is its replica's name for a copy: `gen-1` is engine `gen`).
pub fn solo_key(c: &Condition, engine: &str) -> String {
    let p = c.placements.get(engine).or_else(|| {
        engine
            .rsplit_once('-')
            .and_then(|(base, _)| c.placements.get(base))
    });
    p.map(|p| format!(" @{}", p.text())).unwrap_or_default()
}

/// Checks `conditions[].layout` and `conditions[].baseline`: engines that exist, a
/// non-empty override, deploy's rules for the GPUs and TP size of the overridden engine
/// under the condition's sharing, at most one baseline. Errors name the field.
pub fn validate(exp: &Experiment) -> Result<()> {
    let names = exp.engines();
    let mut baseline: Option<usize> = None;
    for (i, c) in exp.conditions.iter().flatten().enumerate() {
        if c.baseline {
            if let Some(j) = baseline {
                bail!("conditions[{i}].baseline: conditions[{j}] is the baseline already; mark one condition");
            }
            baseline = Some(i);
        }
        for (name, o) in &c.layout {
            let at = format!("conditions[{i}].layout.{name}");
            let Some(k) = names.iter().position(|n| n == name) else {
                bail!(
                    "{at}: no engine {name:?} in deployment.engines (have: {})",
                    names.join(", ")
                );
            };
            if o.gpus.is_none() && o.tensor_parallel_size.is_none() {
                bail!("{at}: give gpus (e.g. gpus = [0, 1]) or tensor_parallel_size");
            }
            let e = apply(&exp.deployment.engines[k], o);
            let spec = DeploymentSpec {
                sharing: c.sharing,
                engines: vec![e.clone()],
                ..exp.deployment.clone()
            };
            let problems = deploy::topology::engine_problems(&spec, &e);
            if let Some((field, why)) = problems.first() {
                let field = match *field {
                    "gpus" | "tensor_parallel_size" => format!("{at}.{field}"),
                    other => format!("{at}: deployment.engines[{k}] ({name}).{other}"),
                };
                bail!("{field}: {why}");
            }
        }
    }
    match baseline {
        Some(i) if exp.conditions.iter().flatten().count() == 1 => {
            bail!("conditions[{i}].baseline: the only condition; a baseline is compared with the others")
        }
        _ => Ok(()),
    }
}

/// The GPUs of an environment as (index, name), in NVML's index order (empty without GPUs).
pub fn machine_of(env: &crate::results::Environment) -> Vec<(u32, String)> {
    env.gpus
        .iter()
        .enumerate()
        .map(|(i, g)| (i as u32, g.name.clone()))
        .collect()
}

/// Checks, before anything starts, that every GPU the `conditions` place an engine on is on
/// this machine (`machine`: index and name of each GPU found; empty when none was, and then
/// nothing is checked: starting the deployment says why). The error names the experiment's
/// field that placed the engine there.
pub fn check_machine(
    exp: &Experiment,
    conditions: &[Condition],
    machine: &[(u32, String)],
) -> Result<()> {
    if machine.is_empty() {
        return Ok(());
    }
    let has = format!(
        "it has {}: {}",
        machine.len(),
        machine
            .iter()
            .map(|(i, n)| format!("{i} {n}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let mut problems: Vec<String> = Vec::new();
    let mut add = |p: String| {
        if !problems.contains(&p) {
            problems.push(p);
        }
    };
    for c in conditions {
        for (name, p) in &c.placements {
            for g in &p.gpus {
                if machine.iter().any(|(i, _)| i == g) {
                    continue;
                }
                add(format!(
                    "{}: GPU {g} is not on this machine ({has})",
                    source_of(exp, name, p)
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// The field of the experiment that places engine `name` at `p`: the first condition whose
/// override resolves to it, else the template's engine (`gpus`) or deployment (`gpu`).
fn source_of(exp: &Experiment, name: &str, p: &Placement) -> String {
    let k = exp.deployment.engines.iter().position(|e| e.name == name);
    for (i, c) in exp.conditions.iter().flatten().enumerate() {
        let (Some(o), Some(k)) = (c.layout.get(name), k) else {
            continue;
        };
        let e = apply(&exp.deployment.engines[k], o);
        if placement_of(&exp.deployment, &e).as_ref() == Some(p) {
            return format!("conditions[{i}].layout.{name}.gpus");
        }
    }
    match k {
        Some(k) if exp.deployment.engines[k].gpus.is_some() => {
            format!("deployment.engines[{k}] ({name}).gpus")
        }
        _ => "deployment.gpu".to_string(),
    }
}

/// Whether `placements` put every engine on GPUs of its own (no GPU runs two engines): the
/// layout of a baseline that shares nothing.
pub fn shares_no_gpu(placements: &BTreeMap<String, Placement>) -> bool {
    let mut seen: Vec<u32> = Vec::new();
    for p in placements.values() {
        for g in &p.gpus {
            if seen.contains(g) {
                return false;
            }
        }
        seen.extend(p.gpus.iter().copied());
    }
    true
}

/// The GPU indices a plan uses, in order (the dry run's `GPUs:` line).
pub fn gpus_used(conditions: &[Condition]) -> Vec<u32> {
    let mut v: Vec<u32> = conditions
        .iter()
        .flat_map(|c| c.placements.values().flat_map(|p| p.gpus.iter().copied()))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
warmup = "1s"
duration = "2s"
[deployment]
gpu = 0
[[deployment.engines]]
name = "gen"
kind = "vllm"
model = "Qwen/Qwen3-8B"
port = 18100
memory = 0.5
[[deployment.engines]]
name = "emb"
kind = "vllm"
model = "Qwen/Qwen3-Embedding-8B"
task = "embed"
port = 18200
memory = 0.3
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 4
[[workloads]]
name = "vec"
engine = "emb"
kind = "embed"
concurrency = 2
batch = 8
"#;

    fn err(conditions: &str) -> String {
        format!(
            "{:#}",
            Experiment::parse(&format!("{BASE}{conditions}")).unwrap_err()
        )
    }

    #[test]
    fn placements_resolve_from_the_template_and_the_override() {
        let exp = Experiment::parse(&format!(
            "{BASE}[[conditions]]\nsharing = \"mps\"\nlayout.gen = {{ gpus = [0, 1] }}\n"
        ))
        .unwrap();
        let engines = exp.engines();
        let c = &exp.conditions.as_ref().unwrap()[0];
        let p = resolve(&exp, &engines, &c.layout);
        assert_eq!(
            p["gen"],
            Placement {
                gpus: vec![0, 1],
                tensor_parallel_size: 2
            }
        );
        assert_eq!(p["emb"].gpus, vec![0], "the deployment's gpu");
        assert_eq!(
            label_text(&engines, &p, false),
            " (gen TP2 on GPU 0,1; emb TP1 on GPU 0)"
        );
        assert_eq!(label_text(&engines[..1], &p, true), " (TP2 on GPU 0,1)");
        assert!(!shares_no_gpu(&p));
        let apart = BTreeMap::from([
            (
                "a".to_string(),
                Placement {
                    gpus: vec![0],
                    tensor_parallel_size: 1,
                },
            ),
            (
                "b".to_string(),
                Placement {
                    gpus: vec![1],
                    tensor_parallel_size: 1,
                },
            ),
        ]);
        assert!(shares_no_gpu(&apart));
        // without layouts anywhere, no placement (labels as before)
        let plain = Experiment::parse(BASE).unwrap();
        assert!(resolve(&plain, &engines, &BTreeMap::new()).is_empty());
        // a TP size given with the template's GPUs keeps them
        let o = LayoutOverride {
            gpus: None,
            tensor_parallel_size: Some(1),
        };
        let e = apply(&exp.deployment.engines[0], &o);
        assert_eq!(e.gpus, None);
        assert_eq!(e.tensor_parallel_size, Some(1));
    }

    /// Errors name the experiment's field and give deploy's reason.
    #[test]
    fn layout_errors_name_the_field() {
        let m = err("[[conditions]]\nsharing = \"mps\"\nlayout.nope = { gpus = [1] }\n");
        assert!(
            m.contains("conditions[0].layout.nope: no engine \"nope\" in deployment.engines (have: gen, emb)"),
            "{m}"
        );
        let m = err("[[conditions]]\nsharing = \"mps\"\nlayout.gen = {}\n");
        assert!(m.contains("conditions[0].layout.gen: give gpus"), "{m}");
        let m = err("[[conditions]]\nsharing = \"mps\"\nlayout.gen = { gpu = [1] }\n");
        assert!(m.contains("unknown field `gpu`"), "{m}");
        let m = err("[[conditions]]\nsharing = \"mps\"\nlayout.gen = { gpus = [0, 1, 0] }\n");
        assert!(
            m.contains("conditions[0].layout.gen.gpus: GPU 0 is listed twice"),
            "{m}"
        );
        let m = err(
            "[[conditions]]\nsharing = \"mps\"\nlayout.gen = { gpus = [0, 1], tensor_parallel_size = 4 }\n",
        );
        assert!(
            m.contains("conditions[0].layout.gen.tensor_parallel_size: 4 but gpus lists 2"),
            "{m}"
        );
        // Qwen3-8B has 32 attention heads and 8 KV heads: 3 GPUs divide neither
        let m = err("[[conditions]]\nsharing = \"mps\"\nlayout.gen = { gpus = [0, 1, 2] }\n");
        assert!(
            m.contains("conditions[0].layout.gen.tensor_parallel_size: 3 does not divide the model's 32 attention heads"),
            "{m}"
        );
        let m = err("[[conditions]]\nsharing = \"mig\"\nlayout.gen = { gpus = [0, 1] }\n");
        assert!(
            m.contains("conditions[0].layout.gen.gpus: not supported with sharing = \"mig\""),
            "{m}"
        );
        let cpu = BASE.replace("gpu = 0", "gpu = \"cpu\"");
        let m = format!(
            "{:#}",
            Experiment::parse(&format!(
                "{cpu}[[conditions]]\nsharing = \"timeslice\"\nlayout.gen = {{ gpus = [1] }}\n"
            ))
            .unwrap_err()
        );
        assert!(
            m.contains("conditions[0].layout.gen.gpus: the deployment runs on the CPU"),
            "{m}"
        );
        let m = err("[[conditions]]\nsharing = \"mps\"\nbaseline = true\n[[conditions]]\nsharing = \"timeslice\"\nbaseline = true\n");
        assert!(
            m.contains("conditions[1].baseline: conditions[0] is the baseline already"),
            "{m}"
        );
        let m = err("[[conditions]]\nsharing = \"mps\"\nbaseline = true\n");
        assert!(
            m.contains("conditions[0].baseline: the only condition"),
            "{m}"
        );
    }

    /// A GPU the machine lacks is refused before anything starts, with the field that put
    /// the engine there; an unknown machine checks nothing.
    #[test]
    fn gpus_the_machine_lacks_are_named() {
        let exp = Experiment::parse(&format!(
            "{BASE}[[conditions]]\nsharing = \"mps\"\nlayout.gen = {{ gpus = [0, 1] }}\nlayout.emb = {{ gpus = [2] }}\n"
        ))
        .unwrap();
        let planned = crate::matrix::plan(&exp);
        let one = vec![(0, "NVIDIA H200".to_string())];
        let m = check_machine(&exp, &planned, &one).unwrap_err().to_string();
        assert!(
            m.contains("conditions[0].layout.gen.gpus: GPU 1 is not on this machine (it has 1: 0 NVIDIA H200)"),
            "{m}"
        );
        assert!(
            m.contains("conditions[0].layout.emb.gpus: GPU 2 is not on this machine"),
            "{m}"
        );
        assert_eq!(m.lines().count(), 2, "each problem once: {m}");
        let two = vec![(0, "H200".to_string()), (1, "H200".to_string())];
        let m = check_machine(&exp, &planned, &two).unwrap_err().to_string();
        assert!(
            !m.contains("GPU 1 is not") && m.contains("GPU 2 is not"),
            "{m}"
        );
        check_machine(&exp, &planned, &[]).unwrap();
        assert_eq!(gpus_used(&planned), vec![0, 1, 2]);
        // the template's GPU: named as the deployment's
        let e2 = Experiment::parse(&format!(
            "{}[[conditions]]\nsharing = \"mps\"\nlayout.gen = {{ gpus = [0] }}\n",
            BASE.replace("gpu = 0", "gpu = 3")
        ))
        .unwrap();
        let m = check_machine(&e2, &crate::matrix::plan(&e2), &two)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("deployment.gpu: GPU 3 is not on this machine"),
            "{m}"
        );
    }
}
