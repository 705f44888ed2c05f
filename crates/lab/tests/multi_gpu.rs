//! Issue 19 on the CPU: the two-H200 study's four layouts as one lab file (its dry-run plan
//! lists every condition with each engine's GPUs and TP size, and every deployment is
//! valid), and a results file written before the lab measured every GPU still reads and
//! reports as it did.

use std::path::{Path, PathBuf};

use lab::matrix::{describe, plan};
use lab::results::Results;
use lab::spec::Experiment;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn example() -> Experiment {
    Experiment::load(&root().join("examples/h200x2-tp2.toml")).unwrap()
}

#[test]
fn the_four_layouts_are_one_plan() {
    let exp = example();
    let planned = plan(&exp);
    let co: Vec<&str> = planned
        .iter()
        .filter(|c| !c.is_solo() && c.repetition == 1)
        .map(|c| c.label.as_str())
        .collect();
    let load = "embed c=128 b=32, gen c=512";
    assert_eq!(
        co,
        vec![
            format!("timeslice (gen TP1 on GPU 0; embed TP1 on GPU 1): {load}"),
            format!("mps default (gen TP2 on GPU 0,1; embed TP2 on GPU 0,1): {load}"),
            format!("timeslice (gen TP2 on GPU 0,1; embed TP2 on GPU 0,1): {load}"),
            format!("mps default (gen TP2 on GPU 0,1; embed TP1 on GPU 1): {load}"),
        ]
    );
    let baseline: Vec<&str> = planned
        .iter()
        .filter(|c| c.baseline && c.repetition == 1)
        .map(|c| c.label.as_str())
        .collect();
    assert_eq!(baseline, vec![co[0]]);
    // each engine alone in each placement it has: gen on 0 and on 0,1; embed on 1 and 0,1
    let mut solo: Vec<&str> = planned
        .iter()
        .filter(|c| c.is_solo() && c.repetition == 1)
        .map(|c| c.label.as_str())
        .collect();
    solo.sort();
    assert_eq!(
        solo,
        vec![
            "solo embed (TP1 on GPU 1): embed c=128 b=32",
            "solo embed (TP2 on GPU 0,1): embed c=128 b=32",
            "solo gen (TP1 on GPU 0): gen c=512",
            "solo gen (TP2 on GPU 0,1): gen c=512",
        ]
    );
    assert_eq!(planned.len(), 8 * exp.repetitions as usize);
    let text = describe(&exp, &planned);
    assert!(
        text.contains(
            "mps default (gen TP2 on GPU 0,1; embed TP1 on GPU 1): embed c=128 b=32, gen c=512 #1"
        ),
        "{text}"
    );
    // every deployment is valid: TP2 of both models, per-GPU budgets under MPS
    let mut d = lab::deployments::Deployments::check(&exp, &planned).unwrap();
    let shared = planned
        .iter()
        .find(|c| {
            c.label
                .starts_with("mps default (gen TP2 on GPU 0,1; embed TP1")
        })
        .unwrap();
    let spec = d.of(&exp, shared).unwrap().spec().clone();
    assert_eq!(spec.engines[0].gpus, Some(vec![0, 1]));
    assert_eq!(spec.engines[1].gpus, Some(vec![1]));
    let plan = deploy::plan(&deploy::validate(spec).unwrap(), None).unwrap();
    assert_eq!(plan.engines[0].tensor_parallel_size, 2);
    assert_eq!(plan.engines[1].tensor_parallel_size, 1);
    assert!(plan.fits, "{plan}");
    // and the machine check: a one-GPU machine cannot hold it
    let one = vec![(0, "NVIDIA H200".to_string())];
    let e = lab::layout::check_machine(&exp, &planned, &one)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conditions[0].layout.embed.gpus: GPU 1 is not on this machine (it has 1: 0 NVIDIA H200)"),
        "{e}"
    );
    assert_eq!(lab::layout::gpus_used(&planned), vec![0, 1]);
}

/// A results file from before issue 19 (the H200 seeds study's first slices, one GPU, no
/// per-GPU data; kept in testdata/results/ as docs/results had it on 2026-12-01) still
/// loads and renders: the counters table as before, no per-GPU table, no hypotheses.
#[test]
fn an_old_results_file_reads_and_reports() {
    let path = root().join("testdata/results/h200-seeds-vllm-before-issue-19.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("per_gpu") && !text.contains("placements"));
    let results = Results::load(&path).unwrap();
    let measured: Vec<_> = results
        .conditions
        .iter()
        .filter(|r| r.failed.is_none())
        .collect();
    assert!(!measured.is_empty());
    for r in &measured {
        assert!(r.gpu.per_gpu.is_empty() && r.gpu.gpus.is_empty());
        assert!(r.condition.placements.is_empty() && !r.condition.baseline);
    }
    assert!(measured[0].gpu.counters.contains_key("sm_active"));
    let dir = tempfile::tempdir().unwrap();
    let r = lab::report::render(&results, dir.path(), None).unwrap();
    let report = std::fs::read_to_string(&r.report).unwrap();
    assert!(
        report.contains("| GPU counter | mean over window |"),
        "{report}"
    );
    assert!(report.contains("| SM active % |"), "{report}");
    assert!(!report.contains("Per GPU ("), "{report}");
    assert!(!report.contains("## Hypotheses"), "{report}");
}
