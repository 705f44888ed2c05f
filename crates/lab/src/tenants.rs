//! Tenants: who shares the GPU in a condition, and which of them are equal.
//!
//! A tenant is one workload against one engine. Without copies the tenants of a condition
//! are its workloads, named as in the file. An engine run in several copies (a scaling
//! experiment) is deploy's replicas `NAME-0`, `NAME-1`, ...; each of its workloads then runs
//! once per copy, as tenant `WORKLOAD-i` against replica `NAME-i` ([`copy_name`]). An engine
//! given `replicas` in the template is one tenant whose requests the gateway balances.
//!
//! **Equal tenants.** Two tenants of a condition are equal when:
//! - they run the same workload definition: kind, preset, prompt and output lengths,
//!   `ignore_eos`, burstiness, everything but its name, engine, the model name it sends and
//!   its seed (the seed draws different prompts and arrival times from one distribution);
//! - at the same load level in that condition (concurrency, rate as written, so `50% of
//!   solo` is the same relative load, and batch);
//! - on engines deployed alike in that condition: kind, model, task, weights format,
//!   device, serving limits, arguments, environment, priority and SLO, replicas, and the SM
//!   and memory share the condition gives it, everything but its name, port, served model
//!   name and start-up time-out.
//!
//! So copies of one workload are always equal, and so are two engines of one model given the
//! same load. Between equal tenants any difference in what they got is the sharing's doing:
//! that is where Jain's index and the significance tests are read (`fairness`).

use std::collections::BTreeMap;

use crate::matrix::Condition;
use crate::spec::Experiment;

/// The name of copy `index` (from 0) of a workload, as deploy names the replicas of an
/// engine: `chat-0`, `chat-1`, ...
pub fn copy_name(workload: &str, index: u32) -> String {
    format!("{workload}-{index}")
}

/// Classes of equal tenants of `cond` among `tenants` (tenant name -> the workload it
/// runs), each with two or more members, in name order; with the words that say what the
/// members of each share. Tenants whose workload or engine is unknown are left out.
pub fn equal_classes(
    exp: &Experiment,
    cond: &Condition,
    tenants: &BTreeMap<String, String>,
) -> Vec<(Vec<String>, String)> {
    let deployed = crate::deployments::for_condition(exp, cond).ok();
    let mut classes: BTreeMap<String, (Vec<String>, String)> = BTreeMap::new();
    for (tenant, workload) in tenants {
        let Some(def) = exp.workload(workload) else {
            continue;
        };
        let Some(load) = cond.loads.get(workload) else {
            continue;
        };
        let engine = deployed
            .as_ref()
            .and_then(|d| d.engines.iter().find(|e| e.name == def.engine))
            .or_else(|| exp.deployment.engines.iter().find(|e| e.name == def.engine));
        let Some(engine) = engine else { continue };
        let template_replicas = exp
            .deployment
            .engines
            .iter()
            .find(|e| e.name == def.engine)
            .map(|e| e.replicas)
            .unwrap_or(1);
        let mut e = engine.clone();
        e.name.clear();
        e.port = 0;
        e.served_model_name = None;
        e.start_timeout = std::time::Duration::ZERO;
        // copies are replicas of one engine, each a tenant of its own: one copy each
        e.replicas = template_replicas;
        let mut w = def.clone();
        w.name.clear();
        w.engine.clear();
        w.model = None;
        w.seed = None;
        let key = format!(
            "{}|{}|{}",
            serde_json::to_string(&e).unwrap_or_default(),
            serde_json::to_string(&w).unwrap_or_default(),
            serde_json::to_string(load).unwrap_or_default()
        );
        let words = format!(
            "{} on {} ({}), {}",
            crate::spec::kind_word(def.kind),
            engine.model,
            engine.kind,
            load.short()
        );
        let entry = classes.entry(key).or_insert_with(|| (Vec::new(), words));
        entry.0.push(tenant.clone());
    }
    let mut out: Vec<(Vec<String>, String)> = classes
        .into_values()
        .filter(|(members, _)| members.len() >= 2)
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::plan;

    const EXP: &str = r#"
name = "t"
warmup = "1s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "small"
model = "preset:qwen3-tiny"
port = 18100
[[deployment.engines]]
name = "twin"
model = "preset:qwen3-tiny"
port = 18200
[[deployment.engines]]
name = "emb"
model = "preset:qwen3-tiny"
task = "embed"
port = 18300
[[workloads]]
name = "a"
engine = "small"
kind = "generate"
concurrency = 2
[[workloads]]
name = "b"
engine = "twin"
kind = "generate"
concurrency = 2
seed = 7
[[workloads]]
name = "v"
engine = "emb"
kind = "embed"
concurrency = 2
[axes]
copies = { small = [2] }
[axes.load.b]
concurrency = [2, 4]
"#;

    fn tenants(names: &[(&str, &str)]) -> BTreeMap<String, String> {
        names
            .iter()
            .map(|(t, w)| (t.to_string(), w.to_string()))
            .collect()
    }

    #[test]
    fn copies_and_twins_at_one_load_are_equal() {
        let exp = Experiment::parse(EXP).unwrap();
        let p = plan(&exp);
        let co: Vec<_> = p.iter().filter(|c| !c.is_solo()).collect();
        assert_eq!(co.len(), 2, "{co:#?}");
        let ts = tenants(&[("a-0", "a"), ("a-1", "a"), ("b", "b"), ("v", "v")]);
        // b at c=2: the same as each copy of a (its own engine of the same model, another seed)
        let at2 = co
            .iter()
            .find(|c| c.loads["b"].concurrency == Some(2))
            .unwrap();
        let classes = equal_classes(&exp, at2, &ts);
        assert_eq!(classes.len(), 1, "{classes:?}");
        assert_eq!(classes[0].0, vec!["a-0", "a-1", "b"]);
        assert!(
            classes[0].1.contains("generate on preset:qwen3-tiny"),
            "{}",
            classes[0].1
        );
        // at c=4 it is not
        let at4 = co
            .iter()
            .find(|c| c.loads["b"].concurrency == Some(4))
            .unwrap();
        let classes = equal_classes(&exp, at4, &ts);
        assert_eq!(classes[0].0, vec!["a-0", "a-1"]);
        // a different output length makes another workload
        let other =
            Experiment::parse(&EXP.replace("seed = 7", "seed = 7\noutput_tokens = 64")).unwrap();
        let classes = equal_classes(&other, at2, &ts);
        assert_eq!(classes[0].0, vec!["a-0", "a-1"]);
    }

    #[test]
    fn a_different_sm_share_is_not_equal() {
        let exp = Experiment::parse(&format!(
            "{}\n",
            EXP.replace("[axes]\ncopies = { small = [2] }\n[axes.load.b]\nconcurrency = [2, 4]\n", "")
                .replace("[deployment]\n", "[deployment]\ngpu = 0\n")
                + "[[conditions]]\nsharing = \"mps\"\nmps_split = [50, 30, 20]\n[[conditions]]\nsharing = \"mps\"\nmps_split = [40, 40, 20]\n"
        ))
        .unwrap();
        let p = plan(&exp);
        let ts = tenants(&[("a", "a"), ("b", "b"), ("v", "v")]);
        let uneven = p
            .iter()
            .find(|c| c.mps_split == Some(vec![50, 30, 20]))
            .unwrap();
        assert!(equal_classes(&exp, uneven, &ts).is_empty());
        let even = p
            .iter()
            .find(|c| c.mps_split == Some(vec![40, 40, 20]))
            .unwrap();
        assert_eq!(equal_classes(&exp, even, &ts)[0].0, vec!["a", "b"]);
    }

    #[test]
    fn copy_names_follow_deploys_replicas() {
        assert_eq!(copy_name("chat", 0), "chat-0");
        assert_eq!(copy_name("chat", 9), "chat-9");
    }
}
