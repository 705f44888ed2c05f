//! The SLO-control experiments (issue 18): the CPU one and the H200 ones plan their
//! controlled conditions beside the static ones at the same loads, with the load step, and
//! every deployment validates (the controlled ones with the gateway and the priorities, the
//! static ones without priorities).

use std::path::Path;

use lab::matrix::{describe, plan};
use lab::spec::{Experiment, StepAt};

fn load(name: &str) -> Experiment {
    Experiment::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name),
    )
    .unwrap()
}

#[test]
fn slo_examples_plan_controlled_and_static_cells_with_the_step() {
    for (file, controlled, stepped) in [
        ("slo-lab-cpu.toml", 1, 2),
        ("h200-slo-pair-a.toml", 5, 3),
        ("h200-slo-seeds-vllm.toml", 4, 3),
    ] {
        let exp = load(file);
        let planned = plan(&exp);
        let first: Vec<_> = planned.iter().filter(|c| c.repetition == 1).collect();
        let co: Vec<_> = first.iter().filter(|c| !c.is_solo()).collect();
        assert_eq!(
            co.iter().filter(|c| c.control).count(),
            controlled,
            "{file}: {}",
            describe(&exp, &planned)
        );
        assert_eq!(
            co.iter()
                .filter(|c| c.loads["embed"].step.is_some())
                .count(),
            stepped,
            "{file}"
        );
        for c in co.iter().filter(|c| c.control) {
            assert!(c.label.contains(" controlled: "), "{file}: {}", c.label);
            // beside a static cell at the same loads
            assert!(
                co.iter()
                    .any(|s| !s.control && s.loads == c.loads && s.engines == c.engines),
                "{file}: {} has no static twin",
                c.label
            );
        }
        // the step comes in the middle of the window, after a quarter of solo capacity
        let step = co
            .iter()
            .find_map(|c| c.loads["embed"].step)
            .expect("a step");
        assert_eq!(step.at, StepAt::Share(0.5), "{file}");
        // solo baselines at the stepped load too, never controlled
        assert!(first
            .iter()
            .any(|c| c.is_solo() && c.loads.get("embed").is_some_and(|l| l.step.is_some())));
        assert!(first.iter().filter(|c| c.is_solo()).all(|c| !c.control));
        // pair A keeps its absolute SLO (its run is docs/results/2026-12-02-h200-slo/)
        if file != "h200-slo-pair-a.toml" {
            relative_tpot_slo(file, &exp, &planned);
        }
        let mut d = lab::deployments::Deployments::check(&exp, &planned)
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        for c in &co {
            let spec = d.of(&exp, c).unwrap().spec().clone();
            assert!(spec.gateway.is_some(), "{file}");
            let prio: Vec<_> = spec.engines.iter().map(|e| e.priority.name()).collect();
            if c.control {
                assert_eq!(prio, ["latency", "best-effort"], "{file}: {}", c.label);
            } else {
                assert_eq!(prio, ["normal", "normal"], "{file}: {}", c.label);
            }
        }
    }
}

/// The generator's TPOT SLO under the controller is 1.25 x its solo TPOT p99, measured in
/// the same run (`[control_slo.gen]`), not written absolute in its `slo`; the plan says so.
fn relative_tpot_slo(file: &str, exp: &Experiment, planned: &[lab::matrix::Condition]) {
    assert_eq!(exp.control_slo["gen"].tpot_p99, Some(1.25), "{file}");
    let gen = exp
        .deployment
        .engines
        .iter()
        .find(|e| e.name == "gen")
        .unwrap();
    assert_eq!(gen.slo.and_then(|s| s.tpot_p99), None, "{file}");
    assert!(
        gen.slo.and_then(|s| s.ttft_p99).is_some(),
        "{file}: TTFT stays absolute"
    );
    let text = describe(exp, planned);
    assert!(
        text.contains("controlled conditions: gen's SLO tpot_p99 = 1.25 x its solo TPOT p99 at the condition's load, set once that solo baseline has run"),
        "{file}: {text}"
    );
}

/// The pacing study (issue 18): the embedder saturating under MPS, static beside
/// controlled, with both engine levers of the controller set (the compute share and the
/// duty cycle at the floor), and its deployments validate.
#[test]
fn the_pacing_example_plans_a_static_and_a_controlled_cell_with_both_levers() {
    let file = "h200-slo-pacing.toml";
    let exp = load(file);
    let planned = plan(&exp);
    let first: Vec<_> = planned.iter().filter(|c| c.repetition == 1).collect();
    let co: Vec<_> = first.iter().filter(|c| !c.is_solo()).collect();
    assert_eq!(co.len(), 2, "{}", describe(&exp, &planned));
    assert_eq!(co.iter().filter(|c| c.control).count(), 1);
    assert_eq!(first.iter().filter(|c| c.is_solo()).count(), 2);
    let mut d = lab::deployments::Deployments::check(&exp, &planned)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    let controlled = co.iter().find(|c| c.control).unwrap();
    let spec = d.of(&exp, controlled).unwrap().spec().clone();
    let control = spec.gateway.unwrap().control;
    assert_eq!(control.engine_duty_floor, Some(25));
    assert_eq!(control.engine_share_tokens, Some(2048));
}

/// The SM-partition study (issue 18): the embedder started on 64 SMs (`--sm-partition`)
/// beside the generator under MPS with default limits, solo and together, and its
/// deployments validate.
#[test]
fn the_green_example_starts_the_embedder_on_an_sm_partition() {
    let file = "h200-slo-green.toml";
    let exp = load(file);
    let planned = plan(&exp);
    let first: Vec<_> = planned.iter().filter(|c| c.repetition == 1).collect();
    assert_eq!(first.len(), 3, "{}", describe(&exp, &planned));
    let mut d = lab::deployments::Deployments::check(&exp, &planned)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    let pair = first.iter().find(|c| !c.is_solo()).unwrap();
    let spec = d.of(&exp, pair).unwrap().spec().clone();
    let embed = spec.engines.iter().find(|e| e.name == "embed").unwrap();
    assert_eq!(embed.args, ["--sm-partition", "64"]);
    assert!(
        spec.engines.iter().all(|e| e.sm_percent.is_none()),
        "green contexts need MPS without a thread limit"
    );
}

/// The SM partition under control (issue 18's third lever): the embedder started with its
/// partitions (`--sm-partitions`) under MPS with default limits, the controller moving its
/// SM share (`engine_sm_floor`) with the embedder saturating, at 25% and 50% of solo and
/// through the load step, beside one static condition with the embedder saturating; its
/// deployments validate.
#[test]
fn the_green_controlled_example_moves_the_sm_share_with_the_limit() {
    let file = "h200-slo-green-controlled.toml";
    let exp = load(file);
    let planned = plan(&exp);
    let first: Vec<_> = planned.iter().filter(|c| c.repetition == 1).collect();
    let co: Vec<_> = first.iter().filter(|c| !c.is_solo()).collect();
    assert_eq!(co.len(), 5, "{}", describe(&exp, &planned));
    assert_eq!(co.iter().filter(|c| c.control).count(), 4);
    let stepped: Vec<_> = co
        .iter()
        .filter_map(|c| c.loads["embed"].step.map(|s| (c.control, s)))
        .collect();
    assert_eq!(stepped.len(), 1, "{file}");
    assert!(stepped[0].0, "the step runs under the controller");
    assert_eq!(stepped[0].1.at, StepAt::Share(0.5));
    // the static one: saturating, as the controlled one without a rate
    let fixed = co.iter().find(|c| !c.control).unwrap();
    assert!(co
        .iter()
        .any(|c| c.control && c.loads == fixed.loads && c.engines == fixed.engines));
    assert!(first.iter().filter(|c| c.is_solo()).all(|c| !c.control));
    relative_tpot_slo(file, &exp, &planned);
    let mut d = lab::deployments::Deployments::check(&exp, &planned)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"));
    for c in &co {
        let spec = d.of(&exp, c).unwrap().spec().clone();
        assert!(
            spec.engines.iter().all(|e| e.sm_percent.is_none()),
            "green contexts need MPS without a thread limit"
        );
        let embed = spec.engines.iter().find(|e| e.name == "embed").unwrap();
        assert_eq!(embed.args, ["--sm-partitions", "16,32,48,64,96"]);
        let prio: Vec<_> = spec.engines.iter().map(|e| e.priority.name()).collect();
        if c.control {
            assert_eq!(prio, ["latency", "best-effort"], "{file}: {}", c.label);
            let control = spec.gateway.unwrap().control;
            assert_eq!(control.engine_sm_floor, Some(12));
            assert_eq!(control.engine_duty_floor, None);
            assert_eq!(control.engine_share_tokens, None);
            assert_eq!((control.min_best_effort, control.max_best_effort), (1, 32));
        } else {
            assert_eq!(prio, ["normal", "normal"], "{file}: {}", c.label);
        }
    }
}
