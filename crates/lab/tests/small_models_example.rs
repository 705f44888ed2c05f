//! The small-models blog's study on the H200 (issue 20, `examples/h200-small-models-mps.toml`):
//! every co-located condition is two copies of one Qwen2.5 engine under MPS, at half its
//! workload's concurrency and at all of it, so that the implied solo baselines hold one
//! engine alone at the whole concurrency (the blog's comparison: the same clients on one
//! engine or on two), and every deployment validates (two copies of a 7B fit).

use std::collections::BTreeSet;
use std::path::Path;

use deploy::model::ModelShape;
use lab::matrix::{describe, plan};
use lab::spec::Experiment;

#[test]
fn two_copies_of_each_model_and_shape_under_mps_beside_one_alone() {
    let exp = Experiment::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/h200-small-models-mps.toml"),
    )
    .unwrap();
    let planned = plan(&exp);
    let text = describe(&exp, &planned);
    let (solo, co): (Vec<_>, Vec<_>) = planned.iter().partition(|c| c.is_solo());
    assert_eq!(co.len(), 16, "{text}");
    let mut pairs = BTreeSet::new();
    for c in &co {
        let two: Vec<_> = c.copies.iter().filter(|(_, n)| **n > 0).collect();
        assert_eq!(two.len(), 1, "{}: one engine, in copies", c.label);
        let (engine, n) = two[0];
        assert_eq!(*n, 2, "{}", c.label);
        assert!(c.label.starts_with("mps default"), "{}", c.label);
        let load = c.loads[engine.as_str()].concurrency.expect("closed loop");
        pairs.insert((engine.clone(), load));
    }
    // per engine: half and whole of its workload's concurrency
    for w in &exp.workloads {
        let whole = w.concurrency.expect("closed loop");
        assert!(pairs.contains(&(w.engine.clone(), whole / 2)), "{}", w.name);
        assert!(pairs.contains(&(w.engine.clone(), whole)), "{}", w.name);
        // one engine alone at the whole concurrency: what two copies at half are set against
        assert!(
            solo.iter().any(|s| s.engines == [w.engine.clone()]
                && s.loads[w.name.as_str()].concurrency == Some(whole)),
            "{text}"
        );
    }
    lab::deployments::Deployments::check(&exp, &planned).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The same study with vLLM engines (`examples/h200-small-models-mps-vllm.toml`): the same
/// plan, condition for condition, every engine a vLLM server of the Qwen2.5 folder that
/// `scripts/gpu/vllm-small-models.sh` makes from `scripts/gpu/vllm-models/` (whose configs
/// read as the built-in engine's presets of the same name), and every deployment validates.
#[test]
fn the_vllm_study_is_the_same_plan_on_vllm_engines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let builtin = Experiment::load(&root.join("examples/h200-small-models-mps.toml")).unwrap();
    let vllm = Experiment::load(&root.join("examples/h200-small-models-mps-vllm.toml")).unwrap();
    let ids = |e: &Experiment| plan(e).iter().map(|c| c.id()).collect::<Vec<_>>();
    assert_eq!(ids(&builtin), ids(&vllm));
    assert_eq!(builtin.workloads.len(), vllm.workloads.len());
    for (b, v) in builtin
        .deployment
        .engines
        .iter()
        .zip(&vllm.deployment.engines)
    {
        assert_eq!(v.kind, deploy::spec::EngineKind::Vllm, "{}", v.name);
        let preset = b.model.strip_prefix("preset:").unwrap();
        assert_eq!(v.model, format!("/tmp/vllm-models/{preset}"));
        let folder = root.join("scripts/gpu/vllm-models").join(preset);
        let mut file = ModelShape::resolve(folder.to_str().unwrap())
            .unwrap()
            .config;
        let want = ModelShape::resolve(&format!("preset:{preset}"))
            .unwrap()
            .config;
        file.eos_token_ids = want.eos_token_ids.clone();
        assert_eq!(file, want, "{preset}");
        assert_eq!(
            (v.memory, v.max_model_len, v.served_model_name.clone()),
            (b.memory, b.max_model_len, b.served_model_name.clone())
        );
    }
    let planned = plan(&vllm);
    lab::deployments::Deployments::check(&vllm, &planned).unwrap_or_else(|e| panic!("{e:#}"));
}
