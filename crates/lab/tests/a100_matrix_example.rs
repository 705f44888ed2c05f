//! The A100 multi-tenancy study's matrix on the H200 (issue 20,
//! `examples/h200-a100-matrix.toml`): every model alone and beside a copy of itself, the
//! study's mixed sets, DistilGPT2 at 1, 2, 3, 4 and 10 copies, at batch 8 x 128, and every
//! deployment validates.

use std::collections::BTreeMap;
use std::path::Path;

use lab::matrix::{describe, plan};
use lab::spec::Experiment;

#[test]
fn the_studys_categories_at_batch_8_of_128_tokens() {
    let exp = Experiment::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/h200-a100-matrix.toml"),
    )
    .unwrap();
    let planned = plan(&exp);
    let text = describe(&exp, &planned);
    let engines: Vec<&str> = exp
        .deployment
        .engines
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(engines, ["gpt2", "dbert", "roberta", "llama", "mistral"]);
    // the study's load: 8 sequences of 128 tokens per iteration, one iteration at a time
    for w in &exp.workloads {
        assert_eq!(w.input_tokens, 128, "{}", w.name);
        let per_iteration = w.batch.unwrap_or(1) * w.concurrency.unwrap();
        assert_eq!(per_iteration, 8, "{}", w.name);
    }
    let sets: Vec<BTreeMap<String, u32>> = planned
        .iter()
        .map(|c| {
            c.engines
                .iter()
                .map(|e| (e.clone(), c.copies_of(e)))
                .collect()
        })
        .collect();
    let has = |want: &[(&str, u32)]| {
        let want: BTreeMap<String, u32> = want.iter().map(|(e, n)| (e.to_string(), *n)).collect();
        sets.contains(&want)
    };
    for e in &engines {
        assert!(has(&[(e, 1)]), "{e} alone\n{text}");
        assert!(has(&[(e, 2)]), "{e} pair\n{text}");
    }
    for n in [3, 4, 10] {
        assert!(has(&[("gpt2", n)]), "{n} copies\n{text}");
    }
    assert!(has(&[("dbert", 1), ("roberta", 1)]), "{text}");
    assert!(has(&[("gpt2", 1), ("llama", 1), ("mistral", 1)]), "{text}");
    assert!(
        has(&engines.iter().map(|e| (*e, 1)).collect::<Vec<_>>()),
        "{text}"
    );
    assert!(has(&[("dbert", 4), ("mistral", 1)]), "{text}");
    assert_eq!(planned.len(), 5 + 5 + 4 + 3, "{text}");
    assert!(planned
        .iter()
        .filter(|c| !c.is_solo())
        .all(|c| c.label.starts_with("mps")));
    lab::deployments::Deployments::check(&exp, &planned).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The same matrix with a serving load (`examples/h200-a100-matrix-serving.toml`): the same
/// co-located sets, every co-located tenant open-loop at half its solo requests/s (its
/// solo capacity measured first at the study's closed-loop load), and every deployment
/// validates.
#[test]
fn the_serving_reading_is_the_same_sets_at_half_their_solo_rate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let closed = Experiment::load(&root.join("h200-a100-matrix.toml")).unwrap();
    let open = Experiment::load(&root.join("h200-a100-matrix-serving.toml")).unwrap();
    let sets = |e: &Experiment| {
        plan(e)
            .iter()
            .filter(|c| !c.is_solo())
            .map(|c| c.copies.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(sets(&closed), sets(&open));
    let planned = plan(&open);
    for c in planned.iter().filter(|c| !c.is_solo()) {
        assert!(!c.loads.is_empty(), "{}", c.label);
        for (w, l) in &c.loads {
            assert_eq!(
                l.rate,
                Some(lab::spec::Rate::OfSolo(50.0)),
                "{}: {w}",
                c.label
            );
        }
    }
    // each engine's capacity (closed loop, the study's load) before its half-rate solo
    for e in ["gpt2", "dbert", "roberta", "llama", "mistral"] {
        let solos: Vec<_> = planned
            .iter()
            .filter(|c| c.is_solo() && c.engines == [e.to_string()])
            .collect();
        assert_eq!(solos.len(), 2, "{e}");
        assert!(solos[0].loads[e].concurrency.is_some() && solos[0].loads[e].rate.is_none());
        assert_eq!(solos[1].loads[e].rate, Some(lab::spec::Rate::OfSolo(50.0)));
    }
    lab::deployments::Deployments::check(&open, &planned).unwrap_or_else(|e| panic!("{e:#}"));
}
