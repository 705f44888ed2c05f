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
