//! The deployment of one condition: the experiment's `[deployment]` template with the
//! condition applied (which engines, sharing mode, SM split, memory split).
//!
//! It stays TOML so that the lab does not duplicate the deployment schema of the `deploy`
//! crate: `deploy` validates the result, and the recommended condition's deployment is
//! written out as a runnable `colocate up` file from exactly this table.
//! Field names follow `deploy::DeploymentSpec`: `sharing`, `engines[].sm_percent`,
//! `engines[].memory`.

use std::path::Path;

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

/// Checks, before anything starts, that every built-in engine the `conditions` deploy
/// names a model it can load: `preset:NAME` or an existing Hugging Face folder (relative
/// paths are taken from the working directory, as the engines are started there). External
/// engines (vLLM, SGLang, TEI, commands) take hub ids and are not checked. The error names
/// each field and what to do; the MiniLM folder of the quickstart gets its fetch script.
pub fn check_models(exp: &Experiment, conditions: &[Condition]) -> Result<()> {
    let engines = exp
        .deployment
        .get("engines")
        .and_then(|e| e.as_array())
        .cloned()
        .unwrap_or_default();
    let mut problems = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        let Some(t) = e.as_table() else { continue };
        let name = t.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        if !conditions
            .iter()
            .any(|c| c.engines.iter().any(|n| n == name))
        {
            continue;
        }
        let kind = t.get("kind").and_then(|k| k.as_str()).unwrap_or("builtin");
        let Some(model) = t.get("model").and_then(|m| m.as_str()) else {
            continue; // a missing model is the deploy crate's error
        };
        if kind != "builtin" || model.starts_with("preset:") || model.trim().is_empty() {
            continue;
        }
        if let Some(reason) = model_folder_problem(Path::new(model)) {
            problems.push(format!(
                "deployment.engines[{i}] ({name}).model: {model:?} {reason}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// Why `dir` cannot be loaded by the built-in engine, or `None` when it looks loadable.
fn model_folder_problem(dir: &Path) -> Option<String> {
    let looks_like_minilm = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.eq_ignore_ascii_case("all-minilm-l6-v2"));
    let fix = if looks_like_minilm {
        "; run ./scripts/fetch-minilm.sh to fetch all-MiniLM-L6-v2 into models/all-minilm-l6-v2"
    } else {
        "; the built-in engine takes a Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or preset:NAME"
    };
    if !dir.exists() {
        return Some(format!("does not exist{fix}"));
    }
    if !dir.is_dir() {
        return Some(format!("is not a folder{fix}"));
    }
    if !dir.join("config.json").is_file() {
        return Some(format!("has no config.json{fix}"));
    }
    None
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

    fn with_models(gen: &str, gen_kind: &str, emb: &str) -> Experiment {
        Experiment::parse(&format!(
            r#"
name = "t"
warmup = "1s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "gen"
kind = "{gen_kind}"
model = "{gen}"
[[deployment.engines]]
name = "emb"
model = "{emb}"
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 1
"#
        ))
        .unwrap()
    }

    #[test]
    fn missing_model_folders_are_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::create_dir(&good).unwrap();
        std::fs::write(good.join("config.json"), "{}").unwrap();
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let minilm = dir.path().join("models/all-minilm-l6-v2");
        let good = good.to_str().unwrap();

        // presets, loadable folders and hub ids of external engines pass
        for exp in [
            with_models("preset:qwen3-tiny", "builtin", good),
            with_models("Qwen/Qwen3-8B", "vllm", "preset:qwen3-tiny"),
        ] {
            check_models(&exp, &plan(&exp)).unwrap();
        }

        let exp = with_models("preset:qwen3-tiny", "builtin", minilm.to_str().unwrap());
        let e = check_models(&exp, &plan(&exp)).unwrap_err().to_string();
        assert!(e.contains("deployment.engines[1] (emb).model"), "{e}");
        assert!(e.contains("does not exist"), "{e}");
        assert!(e.contains("run ./scripts/fetch-minilm.sh"), "{e}");

        let exp = with_models("Qwen/Qwen3-8B", "builtin", empty.to_str().unwrap());
        let e = check_models(&exp, &plan(&exp)).unwrap_err().to_string();
        assert!(
            e.contains("deployment.engines[0] (gen).model: \"Qwen/Qwen3-8B\" does not exist"),
            "{e}"
        );
        assert!(e.contains("deployment.engines[1] (emb).model"), "{e}");
        assert!(e.contains("has no config.json"), "{e}");
        assert!(e.contains("preset:NAME"), "{e}");
        assert!(!e.contains("fetch-minilm"), "{e}");

        // only the engines of the given conditions are checked
        let solo_gen: Vec<_> = plan(&exp)
            .into_iter()
            .filter(|c| c.engines == ["gen"])
            .collect();
        assert!(!solo_gen.is_empty());
        let e = check_models(&exp, &solo_gen).unwrap_err().to_string();
        assert!(e.contains("(gen)") && !e.contains("(emb)"), "{e}");
        check_models(&exp, &[]).unwrap();
    }
}
