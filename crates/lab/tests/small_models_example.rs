//! The small-models blog's study on the H200 (issue 20, `examples/h200-small-models-mps.toml`):
//! every co-located condition is two copies of one Qwen2.5 engine under MPS, at half its
//! workload's concurrency and at all of it, so that the implied solo baselines hold one
//! engine alone at the whole concurrency (the blog's comparison: the same clients on one
//! engine or on two), and every deployment validates (two copies of a 7B fit). The context
//! sweep (0.5B and 1.5B decode-heavy at 128 to 8,192 prompt tokens) is a part of the plan
//! of its own (`--only q05c`, `--only q15c`), every prompt and its output fit
//! `max_model_len`, and every copy's KV cache holds its whole load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use deploy::model::ModelShape;
use lab::deployments::Deployments;
use lab::matrix::{describe, plan};
use lab::runner::Only;
use lab::spec::Experiment;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(file: &str) -> Experiment {
    Experiment::load(&root().join("examples").join(file)).unwrap()
}

/// The workload (one per engine, of the same name) of `engine`.
fn workload<'a>(exp: &'a Experiment, engine: &str) -> &'a lab::spec::WorkloadDef {
    let w: Vec<_> = exp
        .workloads
        .iter()
        .filter(|w| w.engine == engine)
        .collect();
    assert_eq!(w.len(), 1, "{engine}: one workload");
    assert_eq!(w[0].name, engine);
    w[0]
}

#[test]
fn two_copies_of_each_model_and_shape_under_mps_beside_one_alone() {
    let exp = load("h200-small-models-mps.toml");
    let planned = plan(&exp);
    let text = describe(&exp, &planned);
    let (solo, co): (Vec<_>, Vec<_>) = planned.iter().partition(|c| c.is_solo());
    // 8 engines of the size study + 8 of the context sweep, two loads each
    assert_eq!(exp.deployment.engines.len(), 16, "{text}");
    assert_eq!(co.len(), 32, "{text}");
    assert_eq!(solo.len(), 32, "{text}");
    let mut pairs = BTreeSet::new();
    for c in &co {
        let two: Vec<_> = c.copies.iter().filter(|(_, n)| **n > 0).collect();
        assert_eq!(two.len(), 1, "{}: one engine, in copies", c.label);
        let (engine, n) = two[0];
        assert_eq!(*n, 2, "{}", c.label);
        // every other engine is named with 0 (one not named would run once beside them)
        assert_eq!(c.engines, std::slice::from_ref(engine), "{}", c.label);
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
    // a second copy takes the next port: no two engines' copies share one
    let mut ports = BTreeSet::new();
    for e in &exp.deployment.engines {
        assert!(ports.insert(e.port), "{}: port {}", e.name, e.port);
        assert!(ports.insert(e.port + 1), "{}: port {}", e.name, e.port + 1);
    }
    Deployments::check(&exp, &planned).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Issue 20's "contexts 128 to 8k": Qwen2.5-0.5B and 1.5B decode-heavy (256 output tokens,
/// concurrency 64) at 128 (`q05d`, `q15d`), 1,024, 2,048, 4,096 and 8,192 prompt tokens,
/// each context an engine `q05c1k` .. `q15c8k` whose conditions `--only q05c` / `--only
/// q15c` pick (with their solo baselines) and nothing else.
#[test]
fn the_context_sweep_covers_128_to_8k_for_the_two_smallest_models() {
    let exp = load("h200-small-models-mps.toml");
    let planned = plan(&exp);
    for (short, preset) in [
        ("q05", "preset:qwen2.5-0.5b"),
        ("q15", "preset:qwen2.5-1.5b"),
    ] {
        let mut engines = vec![format!("{short}d")];
        engines.extend(["1k", "2k", "4k", "8k"].map(|k| format!("{short}c{k}")));
        let contexts: Vec<u32> = engines
            .iter()
            .map(|name| {
                let e = exp
                    .deployment
                    .engines
                    .iter()
                    .find(|e| &e.name == name)
                    .unwrap_or_else(|| panic!("no engine {name}"));
                assert_eq!(e.model, preset, "{name}");
                let w = workload(&exp, name);
                assert_eq!(
                    (w.output_tokens, w.concurrency, w.ignore_eos),
                    (256, Some(64), true),
                    "{name}: decode-heavy, as the 128-token point"
                );
                w.input_tokens
            })
            .collect();
        assert_eq!(contexts, [128, 1024, 2048, 4096, 8192], "{short}");

        let only = Only(vec![format!("{short}c")]);
        let picked: Vec<_> = planned.iter().filter(|c| only.selects(c)).collect();
        // 4 engines x (two copies at 32 and 64 + one alone at 32 and 64)
        assert_eq!(picked.len(), 16, "{short}c");
        for c in &picked {
            assert_eq!(c.engines.len(), 1, "{}", c.label);
            assert!(engines[1..].contains(&c.engines[0]), "{}", c.label);
        }
        let sweep_conditions = planned
            .iter()
            .filter(|c| engines[1..].contains(&c.engines[0]))
            .count();
        assert_eq!(sweep_conditions, picked.len(), "{short}c picks all of them");
    }
}

/// Every workload's prompt and output fit its engine's `max_model_len` (the 8k engines
/// raise it), and in every deployment each copy's KV cache (deploy's plan of the H200 at
/// `memory = 0.45`) holds its whole load: concurrency x (prompt + output) tokens.
fn every_load_fits(exp: &Experiment) {
    let planned = plan(exp);
    for w in &exp.workloads {
        let e = exp
            .deployment
            .engines
            .iter()
            .find(|e| e.name == w.engine)
            .unwrap();
        let len = e.max_model_len.expect("max_model_len");
        assert!(w.input_tokens + w.output_tokens <= len, "{}: {len}", w.name);
        // the client's estimate of a BPE tokenizer may run a little long: room for it
        if w.input_tokens >= 8192 {
            assert!(len >= w.input_tokens + w.output_tokens + 256, "{}", w.name);
        }
    }
    let mut deployments = Deployments::default();
    for c in &planned {
        let valid = deployments.of(exp, c).unwrap_or_else(|e| panic!("{e:#}"));
        let p = deploy::plan(valid, None).unwrap();
        assert!(p.fits, "{}: {:?}", c.label, p.problems);
        let engine = &c.engines[0];
        assert_eq!(p.engines.len() as u32, c.copies_of(engine), "{}", c.label);
        let w = workload(exp, engine);
        let tokens = c.loads[w.name.as_str()].concurrency.unwrap() as u64
            * (w.input_tokens + w.output_tokens) as u64;
        for copy in &p.engines {
            let held = copy.kv_tokens.expect("a KV budget");
            assert!(
                held >= tokens,
                "{}: {} holds {held} KV tokens, its load needs {tokens}",
                c.label,
                copy.name
            );
        }
    }
}

#[test]
fn every_prompt_fits_max_model_len_and_every_load_the_kv_cache() {
    every_load_fits(&load("h200-small-models-mps.toml"));
    every_load_fits(&load("h200-small-models-mps-vllm.toml"));
}

/// The same study with vLLM engines (`examples/h200-small-models-mps-vllm.toml`): the same
/// plan, condition for condition, every engine a vLLM server of the Qwen2.5 folder that
/// `scripts/gpu/vllm-small-models.sh` makes from `scripts/gpu/vllm-models/` (whose configs
/// read as the built-in engine's presets of the same name), and every deployment validates.
#[test]
fn the_vllm_study_is_the_same_plan_on_vllm_engines() {
    let root = root();
    let builtin = load("h200-small-models-mps.toml");
    let vllm = load("h200-small-models-mps-vllm.toml");
    let ids = |e: &Experiment| plan(e).iter().map(|c| c.id()).collect::<Vec<_>>();
    assert_eq!(ids(&builtin), ids(&vllm));
    assert_eq!(builtin.workloads, vllm.workloads);
    assert_eq!(
        builtin.deployment.engines.len(),
        vllm.deployment.engines.len()
    );
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
            (v.name.clone(), v.port, v.memory, v.max_model_len),
            (b.name.clone(), b.port, b.memory, b.max_model_len)
        );
        assert_eq!(v.served_model_name, b.served_model_name);
    }
    let planned = plan(&vllm);
    Deployments::check(&vllm, &planned).unwrap_or_else(|e| panic!("{e:#}"));
}
