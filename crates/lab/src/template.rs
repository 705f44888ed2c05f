//! The deployment of one condition: the experiment's `[deployment]` template with the
//! condition applied (which engines, sharing mode, SM split, memory split).
//!
//! It stays TOML so that the lab does not duplicate the deployment schema of the `deploy`
//! crate: `deploy` validates the result, and the recommended condition's deployment is
//! written out as a runnable `colocate up` file from exactly this table.
//! Field names follow `deploy::DeploymentSpec`: `sharing`, `engines[].sm_percent`,
//! `engines[].memory`.

use anyhow::{bail, Result};

use crate::matrix::Condition;
use crate::spec::Experiment;

/// The `colocate up` deployment of `cond`.
pub fn for_condition(exp: &Experiment, cond: &Condition) -> Result<toml::Table> {
    let mut d = exp.deployment.clone();
    let all = d
        .get("engines")
        .and_then(|e| e.as_array())
        .cloned()
        .unwrap_or_default();
    let mut engines = Vec::new();
    for name in &cond.engines {
        let Some(e) = all
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
        else {
            bail!("deployment.engines: no engine {name:?}");
        };
        engines.push(e.clone());
    }
    let sharing = if cond.is_solo() {
        "timeslice"
    } else {
        cond.sharing.as_str()
    };
    d.insert("sharing".into(), toml::Value::String(sharing.into()));
    if !d.contains_key("name") {
        d.insert("name".into(), toml::Value::String(exp.name.clone()));
    }
    for (i, e) in engines.iter_mut().enumerate() {
        let Some(t) = e.as_table_mut() else {
            bail!("deployment.engines[{i}]: not a table");
        };
        if sharing != "mps" {
            // MPS settings are an error under other modes
            t.remove("sm_percent");
        }
        if let Some(split) = &cond.mps_split {
            t.insert("sm_percent".into(), toml::Value::Integer(split[i] as i64));
        }
        if let Some(mem) = &cond.memory_split {
            t.insert("memory".into(), toml::Value::Float(mem[i]));
        }
    }
    d.insert("engines".into(), toml::Value::Array(engines));
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::plan;

    #[test]
    fn applies_the_condition() {
        let exp = Experiment::parse(
            r#"
name = "t"
warmup = "1s"
duration = "1s"
[deployment]
sharing = "mps"
[[deployment.engines]]
name = "gen"
sm_percent = 90
memory = 0.9
[[deployment.engines]]
name = "emb"
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 1
[axes]
sharing = ["mps"]
mps_default = false
mps_split = [[70, 30]]
memory_split = [[0.5, 0.3]]
"#,
        )
        .unwrap();
        let p = plan(&exp);
        let solo = for_condition(&exp, &p[0]).unwrap();
        assert_eq!(solo["sharing"].as_str(), Some("timeslice"));
        let engines = solo["engines"].as_array().unwrap();
        assert_eq!(engines.len(), 1);
        assert!(engines[0].get("sm_percent").is_none());
        assert_eq!(engines[0]["memory"].as_float(), Some(0.9));
        let co = p.iter().find(|c| !c.is_solo()).unwrap();
        let d = for_condition(&exp, co).unwrap();
        assert_eq!(d["sharing"].as_str(), Some("mps"));
        let e = d["engines"].as_array().unwrap();
        assert_eq!(e[0]["sm_percent"].as_integer(), Some(70));
        assert_eq!(e[1]["sm_percent"].as_integer(), Some(30));
        assert_eq!(e[1]["memory"].as_float(), Some(0.3));
        assert_eq!(d["name"].as_str(), Some("t"));
    }
}
