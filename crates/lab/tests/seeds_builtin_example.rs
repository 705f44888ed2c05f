//! The seeds' study with the built-in engine generating (`examples/h200-seeds-builtin.toml`)
//! keeps the vLLM study's clients and embedder, so the two reports compare like for like.

use std::path::Path;

use lab::matrix::{describe, plan};
use lab::spec::Experiment;

fn load(name: &str) -> Experiment {
    Experiment::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name),
    )
    .unwrap()
}

#[test]
fn same_clients_and_embedder_as_the_vllm_study_with_the_builtin_generator() {
    let builtin = load("h200-seeds-builtin.toml");
    let vllm = load("h200-seeds-vllm.toml");
    for w in ["gen", "embed"] {
        assert_eq!(builtin.workload(w), vllm.workload(w), "workload {w}");
    }
    let engine = |e: &Experiment, n: &str| {
        e.deployment
            .engines
            .iter()
            .find(|x| x.name == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(engine(&builtin, "embed"), engine(&vllm, "embed"));
    let gen = engine(&builtin, "gen");
    assert_eq!(gen.kind, deploy::EngineKind::Builtin);
    assert_eq!(gen.model, "preset:qwen3-30b-a3b-fp8");
    // The preset counts prompts with the tokenizer of the folder vLLM serves the same model
    // from, so both generators see the seeds' prompt as the same 32 tokens.
    let vllm_gen = engine(&vllm, "gen");
    assert_eq!(gen.tokenizer.as_deref(), Some(vllm_gen.model.as_str()));
    let planned = plan(&builtin);
    // 7 co-located + implied solos (gen at 1024 and 512, embed at 64x8, 128x32, 32x64), 3 reps
    assert_eq!(
        planned.len(),
        3 * (7 + 5),
        "{}",
        describe(&builtin, &planned)
    );
    lab::deployments::Deployments::check(&builtin, &planned).unwrap();
}
