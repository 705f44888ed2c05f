//! The seeds' H200 study (`examples/h200-seeds-vllm.toml`) names the seed clients as
//! presets, and its plan still holds: every condition, every deployment valid.

use std::path::Path;

use lab::matrix::{describe, plan};
use lab::spec::{Experiment, Kind, Preset};

fn example() -> Experiment {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/h200-seeds-vllm.toml");
    Experiment::load(&p).unwrap()
}

#[test]
fn the_seed_workloads_are_the_presets() {
    let exp = example();
    let gen = exp.workload("gen").unwrap();
    assert_eq!(gen.preset, Some(Preset::SeedGen));
    assert_eq!(gen.kind, Kind::Generate);
    assert_eq!((gen.input_tokens, gen.output_tokens), (30, 512));
    assert!(
        gen.ignore_eos,
        "random weights: every request makes 512 tokens"
    );
    assert_eq!(gen.concurrency, Some(512));
    let embed = exp.workload("embed").unwrap();
    assert_eq!(embed.preset, Some(Preset::SeedEmbed));
    assert_eq!(embed.kind, Kind::Embed);
    assert_eq!((embed.concurrency, embed.batch), (Some(128), Some(32)));
    // whole responses: the file's SLOs judge what is defined
    for slo in exp.slo.values() {
        assert!(slo.ttft_p99.is_none() && slo.tpot_p99.is_none());
    }
}

#[test]
fn the_plan_still_holds() {
    let exp = example();
    let planned = plan(&exp);
    // 15 co-located + 12 implied solo baselines, 3 repetitions
    assert_eq!(planned.len(), 81);
    let text = describe(&exp, &planned);
    assert!(
        text.contains("mps sm 90/10: embed c=32 b=64, gen c=512"),
        "{text}"
    );
    assert!(text.contains("estimated time:"), "{text}");
    lab::deployments::Deployments::check(&exp, &planned).unwrap();
}
