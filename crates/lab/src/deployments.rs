//! Each condition's deployment: the experiment's `[deployment]` (deploy's typed spec, read
//! with the experiment) with the condition applied as typed edits, validated once per
//! distinct deployment (a controlled condition's SLOs relative to solo set when its solo has
//! run, `control_slo`); and the check, before anything runs, that every built-in engine's
//! model folder is there.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use deploy::{DeploymentSpec, EngineKind, MemoryBudget, Sharing, ValidDeployment};

use crate::control_slo::{self, SoloSlo};
use crate::matrix::Condition;
use crate::spec::Experiment;

/// The `colocate up` deployment of `cond`: the template's engines the condition runs, in its
/// order, shared as it says (a solo baseline runs its engine alone, time-sliced), with its
/// SM split and memory split (a split names one value per template engine; copies of an
/// engine each get its value), and an engine run in copies as that many replicas. MPS
/// settings are dropped under other modes, where they are an error. A condition's layout
/// gives an engine its GPUs and TP size (`crate::layout`). Engine priorities and
/// SLOs (the gateway's SLO controller) are kept in a controlled condition and dropped in the
/// others, which are static; a metric the experiment sets relative to solo (`control_slo`)
/// is not in it: [`for_condition_with`] sets it. A template without a name of its own takes
/// the experiment's.
pub fn for_condition(exp: &Experiment, cond: &Condition) -> Result<DeploymentSpec> {
    let template = &exp.deployment;
    let sharing = cond.sharing.deployed();
    let mut engines = Vec::with_capacity(cond.engines.len());
    for name in &cond.engines {
        // splits are per engine of the template, in its order, whichever engines run
        let i = template
            .engines
            .iter()
            .position(|e| &e.name == name)
            .ok_or_else(|| anyhow!("deployment.engines: no engine {name:?}"))?;
        let mut e = template.engines[i].clone();
        // copies of an engine are its replicas, each a tenant of its own
        let copies = cond.copies_of(name);
        if copies > 1 {
            e.replicas = copies;
        }
        if sharing != Sharing::Mps {
            e.sm_percent = None;
        }
        if !cond.control {
            e.priority = deploy::spec::Priority::Normal;
            e.slo = None;
        }
        // the condition's layout: the engine's GPUs and TP size (issue 19)
        if let Some(p) = cond.placements.get(name) {
            e.gpus = Some(p.gpus.clone());
            e.tensor_parallel_size =
                (p.tensor_parallel_size as usize != p.gpus.len()).then_some(p.tensor_parallel_size);
        }
        if let Some(split) = &cond.mps_split {
            let p = split
                .get(i)
                .ok_or_else(|| anyhow!("mps_split: no percentage for engine {name:?}"))?;
            e.sm_percent = Some(*p);
        }
        if let Some(split) = &cond.memory_split {
            let f = split
                .get(i)
                .ok_or_else(|| anyhow!("memory_split: no fraction for engine {name:?}"))?;
            e.memory = Some(MemoryBudget::Fraction(*f));
        }
        engines.push(e);
    }
    let name = if template.name.is_empty() {
        exp.name.clone()
    } else {
        template.name.clone()
    };
    Ok(DeploymentSpec {
        name,
        sharing,
        engines,
        gpu: template.gpu.clone(),
        gpu_name: template.gpu_name.clone(),
        gateway: template.gateway.clone(),
        run_dir: template.run_dir.clone(),
        supervise: template.supervise.clone(),
    })
}

/// [`for_condition`] with the SLOs a controlled condition got from the solo run
/// (`crate::control_slo::resolve`): the deployment it starts.
pub fn for_condition_with(
    exp: &Experiment,
    cond: &Condition,
    slos: &[SoloSlo],
) -> Result<DeploymentSpec> {
    let mut spec = for_condition(exp, cond)?;
    control_slo::apply(&mut spec, slos)?;
    Ok(spec)
}

/// The validated deployments of a run, by deployment key: each distinct deployment is
/// validated once, up front ([`Deployments::check`]) or before its first start
/// ([`Deployments::of`]), and the runner starts what was validated.
#[derive(Debug, Default)]
pub struct Deployments {
    valid: BTreeMap<String, ValidDeployment>,
}

impl Deployments {
    /// Validates every distinct deployment of `conditions` before anything starts, so that a
    /// bad template fails at once (and in `--dry-run`) rather than condition by condition.
    /// The error names the condition, the field and the reason.
    pub fn check(exp: &Experiment, conditions: &[Condition]) -> Result<Deployments> {
        let mut d = Deployments::default();
        for c in conditions {
            d.of(exp, c)?;
        }
        Ok(d)
    }

    /// The validated deployment of `cond`, validated now if it was not yet. A metric set
    /// relative to solo (`control_slo`) has [`control_slo::STAND_IN`] here: the deployment
    /// is checked before any solo has run; the runner starts [`Deployments::resolved`].
    pub fn of(&mut self, exp: &Experiment, cond: &Condition) -> Result<&ValidDeployment> {
        let key = cond.deployment_key();
        if !self.valid.contains_key(&key) {
            let at = || format!("condition {}", cond.label);
            let mut spec = for_condition(exp, cond).with_context(at)?;
            control_slo::apply_stand_ins(exp, cond, &mut spec);
            let valid = deploy::validate(spec)
                .context("deployment")
                .with_context(at)?;
            self.valid.insert(key.clone(), valid);
        }
        Ok(&self.valid[&key])
    }

    /// The validated deployment `cond` starts with the SLOs it got from the solo run
    /// (`slos`, from `control_slo::resolve`; without any, [`Deployments::of`]), by
    /// [`control_slo::start_key`].
    pub fn resolved(
        &mut self,
        exp: &Experiment,
        cond: &Condition,
        slos: &[SoloSlo],
    ) -> Result<&ValidDeployment> {
        if slos.is_empty() {
            return self.of(exp, cond);
        }
        let key = control_slo::start_key(cond, slos);
        if !self.valid.contains_key(&key) {
            let at = || format!("condition {}", cond.label);
            let spec = for_condition_with(exp, cond, slos).with_context(at)?;
            let valid = deploy::validate(spec)
                .context("deployment")
                .with_context(at)?;
            self.valid.insert(key.clone(), valid);
        }
        Ok(&self.valid[&key])
    }
}

/// The command line of every engine of a deployment (`colocate plan`'s output, for a GPU
/// the catalogue knows by the deployment's `gpu_name`).
pub fn command_lines(spec: &DeploymentSpec) -> Result<String> {
    let valid = deploy::validate(spec.clone()).context("deployment")?;
    let plan = deploy::plan(&valid, None)?;
    Ok(plan
        .engines
        .iter()
        .map(|e| format!("# {}\n{}", e.name, e.shell_line()))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Checks, before anything starts, that every built-in engine the `conditions` deploy
/// names a model it can load: `preset:NAME` or an existing Hugging Face folder (relative
/// paths are taken from the working directory, as the engines are started there). External
/// engines (vLLM, SGLang, TEI, commands) take hub ids and are not checked. The error names
/// each field and what to do; the MiniLM folder of the quickstart gets its fetch script.
pub fn check_models(exp: &Experiment, conditions: &[Condition]) -> Result<()> {
    let mut problems = Vec::new();
    for (i, e) in exp.deployment.engines.iter().enumerate() {
        if !conditions.iter().any(|c| c.engines.contains(&e.name)) {
            continue;
        }
        let model = e.model.as_str();
        if e.kind != EngineKind::Builtin || model.starts_with("preset:") || model.trim().is_empty()
        {
            continue; // a missing model is the deploy crate's error
        }
        if let Some(reason) = model_folder_problem(Path::new(model)) {
            problems.push(format!(
                "deployment.engines[{i}] ({}).model: {model:?} {reason}",
                e.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Why `dir` cannot be loaded by the built-in engine, or `None` when it looks loadable.
fn model_folder_problem(dir: &Path) -> Option<String> {
    let looks_like_minilm = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.eq_ignore_ascii_case("all-minilm-l6-v2"));
    let fix = if looks_like_minilm {
        "; run ./scripts/fetch-minilm.sh to fetch all-MiniLM-L6-v2 into models/all-minilm-l6-v2"
    } else {
        "; the built-in engine takes a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or preset:NAME"
    };
    if !dir.exists() {
        return Some(format!("does not exist{fix}"));
    }
    if !dir.is_dir() {
        return Some(format!("is not a folder{fix}"));
    }
    if !dir.join("config.json").is_file() {
        return Some(format!("has no config.json{fix}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::plan;

    const TWO: &str = r#"
name = "t"
warmup = "1s"
duration = "1s"
[deployment]
gpu = 0
sharing = "mps"
[[deployment.engines]]
name = "gen"
model = "preset:qwen3-tiny"
port = 18100
sm_percent = 90
memory = 0.6
[[deployment.engines]]
name = "emb"
model = "preset:qwen3-tiny"
task = "embed"
port = 18200
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 1
[axes]
sharing = ["mps", "timeslice"]
mps_default = false
mps_split = [[70, 30]]
memory_split = [[0.5, 0.3]]
"#;

    #[test]
    fn applies_the_condition() {
        let exp = Experiment::parse(TWO).unwrap();
        let p = plan(&exp);
        let solo = for_condition(&exp, &p[0]).unwrap();
        assert_eq!(solo.sharing, Sharing::Timeslice);
        assert_eq!(solo.engines.len(), 1);
        assert_eq!(
            solo.engines[0].sm_percent, None,
            "MPS settings go without MPS"
        );
        assert_eq!(solo.engines[0].memory, Some(MemoryBudget::Fraction(0.6)));
        assert_eq!(
            solo.name, "t",
            "the experiment's name without one of its own"
        );
        let co = p.iter().find(|c| !c.is_solo()).unwrap();
        let d = for_condition(&exp, co).unwrap();
        assert_eq!(d.sharing, Sharing::Mps);
        let sm: Vec<_> = d.engines.iter().map(|e| e.sm_percent).collect();
        assert_eq!(sm, vec![Some(70), Some(30)]);
        assert_eq!(d.engines[1].memory, Some(MemoryBudget::Fraction(0.3)));
        // the rest is the template's
        assert_eq!(d.gpu, deploy::GpuSelector::Index(0));
        assert_eq!(d.engines[1].task, deploy::Task::Embed);
        let ts = p
            .iter()
            .find(|c| c.sharing.deployed() == Sharing::Timeslice && !c.is_solo())
            .unwrap();
        let d = for_condition(&exp, ts).unwrap();
        assert!(d.engines.iter().all(|e| e.sm_percent.is_none()));
        // a name of its own is kept
        let named = Experiment::parse(&TWO.replace("gpu = 0", "gpu = 0\nname = \"pair\"")).unwrap();
        assert_eq!(for_condition(&named, &p[0]).unwrap().name, "pair");
    }

    /// Each distinct deployment is validated once, up front; a bad one is named with its
    /// condition and field before anything starts.
    #[test]
    fn every_deployment_is_validated_once_up_front() {
        let exp = Experiment::parse(TWO).unwrap();
        let p = plan(&exp);
        let mut d = Deployments::check(&exp, &p).unwrap();
        let keys: std::collections::BTreeSet<String> =
            p.iter().map(|c| c.deployment_key()).collect();
        assert_eq!(d.valid.len(), keys.len());
        let co = p.iter().find(|c| !c.is_solo()).unwrap();
        assert_eq!(d.of(&exp, co).unwrap().spec().sharing, Sharing::Mps);
        assert_eq!(d.valid.len(), keys.len(), "nothing validated again");

        let clash = Experiment::parse(&TWO.replace("port = 18200", "port = 18100")).unwrap();
        let e = format!(
            "{:#}",
            Deployments::check(&clash, &plan(&clash)).unwrap_err()
        );
        assert!(
            e.contains("condition mps sm 70/30 mem 0.5/0.3")
                && e.contains("deployment: engines[1].port: port 18100 clashes with gen"),
            "{e}"
        );
        let cpu = Experiment::parse(&TWO.replace("gpu = 0", "gpu = \"cpu\"")).unwrap();
        let e = format!("{:#}", Deployments::check(&cpu, &plan(&cpu)).unwrap_err());
        assert!(
            e.contains("condition solo gen: chat c=1: deployment: engines[0].memory: a fraction of GPU memory with gpu = \"cpu\""),
            "{e}"
        );
    }

    fn with_models(gen: &str, gen_kind: &str, emb: &str) -> Experiment {
        Experiment::parse(&format!(
            r#"
name = "t"
warmup = "1s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "gen"
kind = "{gen_kind}"
model = "{gen}"
[[deployment.engines]]
name = "emb"
model = "{emb}"
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 1
"#
        ))
        .unwrap()
    }

    #[test]
    fn missing_model_folders_are_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::create_dir(&good).unwrap();
        std::fs::write(good.join("config.json"), "{}").unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let minilm = dir.path().join("models/all-minilm-l6-v2");
        let good = good.to_str().unwrap();

        // presets, loadable folders and hub ids of external engines pass
        for exp in [
            with_models("preset:qwen3-tiny", "builtin", good),
            with_models("Qwen/Qwen3-8B", "vllm", "preset:qwen3-tiny"),
        ] {
            check_models(&exp, &plan(&exp)).unwrap();
        }

        let exp = with_models("preset:qwen3-tiny", "builtin", minilm.to_str().unwrap());
        let e = check_models(&exp, &plan(&exp)).unwrap_err().to_string();
        assert!(e.contains("deployment.engines[1] (emb).model"), "{e}");
        assert!(e.contains("does not exist"), "{e}");
        assert!(e.contains("run ./scripts/fetch-minilm.sh"), "{e}");

        let exp = with_models("Qwen/Qwen3-8B", "builtin", empty.to_str().unwrap());
        let e = check_models(&exp, &plan(&exp)).unwrap_err().to_string();
        assert!(
            e.contains("deployment.engines[0] (gen).model: \"Qwen/Qwen3-8B\" does not exist"),
            "{e}"
        );
        assert!(e.contains("deployment.engines[1] (emb).model"), "{e}");
        assert!(e.contains("has no config.json"), "{e}");
        assert!(e.contains("preset:NAME"), "{e}");
        assert!(!e.contains("fetch-minilm"), "{e}");

        // only the engines of the given conditions are checked
        let solo_gen: Vec<_> = plan(&exp)
            .into_iter()
            .filter(|c| c.engines == ["gen"])
            .collect();
        assert!(!solo_gen.is_empty());
        let e = check_models(&exp, &solo_gen).unwrap_err().to_string();
        assert!(e.contains("(gen)") && !e.contains("(emb)"), "{e}");
        check_models(&exp, &[]).unwrap();
    }

    /// Copies of an engine are its replicas (deploy names them `NAME-0`, ... on `port + i`);
    /// a split gives each copy its engine's value, by the template's order.
    #[test]
    fn copies_are_replicas() {
        let exp = Experiment::parse(&TWO.replace(
            "[axes]\nsharing = [\"mps\", \"timeslice\"]\nmps_default = false\nmps_split = [[70, 30]]\nmemory_split = [[0.5, 0.3]]\n",
            "[[conditions]]\nsharing = \"mps\"\nmps_split = [20, 60]\nmemory_split = [0.1, 0.5]\ncopies = { gen = 3 }\n[[conditions]]\nsharing = \"mps\"\nmps_split = [20, 60]\nmemory_split = [0.3, 0.5]\ncopies = { gen = 2, emb = 0 }\n",
        ))
        .unwrap();
        let p = plan(&exp);
        let three = p.iter().find(|c| c.copies_of("gen") == 3).unwrap();
        let d = for_condition(&exp, three).unwrap();
        assert_eq!(d.engines.len(), 2);
        assert_eq!(d.engines[0].replicas, 3);
        assert_eq!(d.engines[0].instances()[2], ("gen-2".to_string(), 18102));
        assert_eq!(d.engines[0].sm_percent, Some(20));
        assert_eq!(d.engines[1].replicas, 1);
        assert_eq!(d.engines[1].sm_percent, Some(60));
        let valid = Deployments::check(&exp, &p).unwrap();
        assert_eq!(
            valid.valid.len(),
            3,
            "gen solo (emb has no workload), two steps"
        );
        // deploy counts each copy's memory: the template's 0.6 twice is over the GPU
        let over = Experiment::parse(&TWO.replace(
            "[axes]\nsharing = [\"mps\", \"timeslice\"]\nmps_default = false\nmps_split = [[70, 30]]\nmemory_split = [[0.5, 0.3]]\n",
            "[[conditions]]\nsharing = \"mps\"\ncopies = { gen = 2, emb = 0 }\n",
        ))
        .unwrap();
        let e = format!("{:#}", Deployments::check(&over, &plan(&over)).unwrap_err());
        assert!(
            e.contains("condition mps default [2 gen]: chat c=1") && e.contains("times replicas"),
            "{e}"
        );
        // the embedder left out: the split is still read by the template's order
        let two = p.iter().find(|c| c.copies_of("gen") == 2).unwrap();
        let d = for_condition(&exp, two).unwrap();
        assert_eq!(d.engines.len(), 1);
        assert_eq!(
            (d.engines[0].replicas, d.engines[0].sm_percent),
            (2, Some(20))
        );
    }
}
