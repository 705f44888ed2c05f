//! The SLO of a controlled condition relative to the solo run (`[control_slo.<engine>]`).
//!
//! The goal of a study is relative ("TPOT p99 <= 1.25 x solo"), while the gateway's
//! controller needs an absolute objective. The solo baselines run before the co-located
//! conditions (`matrix::plan`), so when a controlled condition comes, each engine of
//! `control_slo` gets, per metric, its factor times the p99 its workloads had solo at the
//! condition's load: the solo the report pairs the condition with for *vs solo*
//! ([`crate::analysis::solo_pairing`]), the mean over that solo's repetitions, and the
//! highest over the engine's workloads when it has several (each measured alone; the gateway
//! sees them together). The values go into the condition's deployment (its
//! `deployment.toml` under the run's `deployments/`, a folder per SLO), its record
//! ([`ConditionResult::control_slo`]), the report and the recommended deployment. A solo
//! that failed or measured nothing fails the controlled condition with the reason.

use std::time::Duration;

use anyhow::{bail, Result};
use deploy::spec::SloSpec;
use deploy::DeploymentSpec;
use serde::{Deserialize, Serialize};

use crate::analysis::solo_pairing;
use crate::matrix::Condition;
use crate::results::{ConditionResult, Results, WorkloadMetrics};
use crate::spec::{streamed, Experiment, WorkloadDef};

/// What a relative metric is set to where no solo has run yet ([`apply_stand_ins`]: the
/// up-front check of every deployment and `--dry-run`): validated, never started.
pub const STAND_IN: Duration = Duration::from_secs(1);

/// One metric of an engine's SLO set from its solo run, as a controlled condition deployed
/// it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoloSlo {
    /// The engine whose SLO it is.
    pub engine: String,
    /// The gateway's metric: `ttft_p99`, `tpot_p99` or `e2el_p99`.
    pub metric: String,
    /// The factor the experiment gives.
    pub factor: f64,
    /// The solo run's p99 in ms: the mean over its repetitions.
    pub solo_ms: f64,
    /// The solo it was taken from: the workload and its load (`gen c=512`), and how many
    /// solo repetitions were averaged.
    pub solo: String,
    /// The SLO deployed: factor x solo, to the microsecond.
    #[serde(with = "units::duration")]
    pub slo: Duration,
}

impl SoloSlo {
    /// `gen SLO tpot_p99 3.5 ms = 1.25 x solo 2.8 ms (gen c=512, 2 solo runs)`.
    pub fn describe(&self) -> String {
        format!(
            "{} SLO {} {} ms = {} x solo {} ms ({})",
            self.engine,
            self.metric,
            ms(self.slo.as_secs_f64() * 1e3),
            self.factor,
            ms(self.solo_ms),
            self.solo
        )
    }
}

/// A millisecond figure with at most three decimals, trailing zeros dropped.
fn ms(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// How reports name a metric.
fn word(metric: &str) -> &'static str {
    match metric {
        "ttft_p99" => "TTFT p99",
        "tpot_p99" => "TPOT p99",
        _ => "E2EL p99",
    }
}

/// The p99 of `metric` a window measured for one workload, ms.
fn p99(metric: &str, m: &WorkloadMetrics) -> Option<f64> {
    let p = match metric {
        "ttft_p99" => m.ttft_ms,
        "tpot_p99" => m.tpot_ms,
        _ => m.latency_ms,
    };
    p.map(|p| p.p99).filter(|v| v.is_finite())
}

/// Whether a solo run of `w` measures `metric` (TTFT and TPOT need streamed generations).
fn measures(w: &WorkloadDef, metric: &str) -> bool {
    metric == "e2el_p99" || streamed(w)
}

/// The SLOs relative to solo of controlled condition `cond`, from the solo baselines in
/// `done` (the conditions recorded so far); none for a condition that is not controlled.
/// An error, naming the key and the solo, when a solo failed, has not run, or measured
/// none of the metric.
pub fn resolve(
    exp: &Experiment,
    cond: &Condition,
    done: &[ConditionResult],
) -> Result<Vec<SoloSlo>> {
    let mut out = Vec::new();
    if !cond.control {
        return Ok(out);
    }
    for (engine, rel) in &exp.control_slo {
        if !cond.engines.contains(engine) {
            continue;
        }
        for (metric, factor) in rel.factors() {
            let at = format!("control_slo.{engine}.{metric}");
            let what = word(metric);
            let workloads: Vec<&WorkloadDef> = exp
                .workloads
                .iter()
                .filter(|w| &w.engine == engine && cond.loads.contains_key(&w.name))
                .filter(|w| measures(w, metric))
                .collect();
            if workloads.is_empty() {
                bail!("{at}: engine {engine} runs no workload in this condition whose solo run measures its {what}");
            }
            // the highest over the engine's workloads
            let mut worst: Option<(f64, String)> = None;
            for w in workloads {
                let key = solo_pairing(cond, &w.name, engine);
                let solos: Vec<&ConditionResult> = done
                    .iter()
                    .filter(|r| r.condition.is_solo() && r.condition.engines.contains(engine))
                    .filter(|r| r.condition.loads.contains_key(&w.name))
                    .filter(|r| solo_pairing(&r.condition, &w.name, engine) == key)
                    .collect();
                let values: Vec<f64> = solos
                    .iter()
                    .filter(|r| r.failed.is_none())
                    .filter_map(|r| p99(metric, r.workloads.get(&w.name)?))
                    .collect();
                let load = format!("{} {}", w.name, key);
                if values.is_empty() {
                    let why = match solos.iter().find_map(|r| r.failed.as_deref()) {
                        Some(reason) => format!("its solo baseline failed ({reason})"),
                        None if solos.is_empty() => "its solo baseline has not run (solo baselines run before the co-located conditions; with --only, select it too)".to_string(),
                        None => format!("its solo baseline measured no {what}"),
                    };
                    bail!(
                        "{at}: no solo {what} of {load} to set engine {engine}'s SLO from: {why}"
                    );
                }
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let n = values.len();
                let text = format!("{load}, {n} solo run{}", if n == 1 { "" } else { "s" });
                if worst.as_ref().is_none_or(|(v, _)| mean > *v) {
                    worst = Some((mean, text));
                }
            }
            let (solo_ms, solo) = worst.expect("one workload at least");
            let slo = Duration::from_micros((factor * solo_ms * 1e3).round().max(0.0) as u64);
            if slo.is_zero() {
                bail!(
                    "{at}: the solo {what} of {solo} is {} ms: {factor} x it is no objective",
                    ms(solo_ms)
                );
            }
            out.push(SoloSlo {
                engine: engine.clone(),
                metric: metric.to_string(),
                factor,
                solo_ms,
                solo,
                slo,
            });
        }
    }
    Ok(out)
}

fn set(slo: &mut SloSpec, metric: &str, d: Duration) -> Result<()> {
    match slo.objective_mut(metric) {
        Some(m) => *m = Some(d),
        None => bail!("control_slo: unknown metric {metric:?}"),
    }
    Ok(())
}

/// Sets the SLOs of `slos` in a condition's deployment.
pub fn apply(spec: &mut DeploymentSpec, slos: &[SoloSlo]) -> Result<()> {
    for s in slos {
        let Some(e) = spec.engines.iter_mut().find(|e| e.name == s.engine) else {
            bail!(
                "control_slo.{}: engine {} is not in the condition's deployment",
                s.engine,
                s.engine
            );
        };
        set(e.slo.get_or_insert_with(SloSpec::default), &s.metric, s.slo)?;
    }
    Ok(())
}

/// Sets [`STAND_IN`] for every metric relative to solo of controlled condition `cond`, so
/// that its deployment can be validated before any solo has run.
pub fn apply_stand_ins(exp: &Experiment, cond: &Condition, spec: &mut DeploymentSpec) {
    if !cond.control {
        return;
    }
    for e in spec.engines.iter_mut() {
        if let Some(rel) = exp.control_slo.get(&e.name) {
            for (metric, _) in rel.factors() {
                let _ = set(e.slo.get_or_insert_with(SloSpec::default), metric, STAND_IN);
            }
        }
    }
}

/// The key of the deployment a condition starts: its deployment key, with the SLOs set from
/// solo, so that another SLO is another start (and another folder under `deployments/`).
pub fn start_key(cond: &Condition, slos: &[SoloSlo]) -> String {
    let mut key = cond.deployment_key();
    if !slos.is_empty() {
        key.push_str(" slo");
        for s in slos {
            let v = ms(s.slo.as_secs_f64() * 1e3);
            key.push_str(&format!(" {} {} {v}ms", s.engine, s.metric));
        }
    }
    key
}

/// The same in the plan, before anything is measured: the deployment key with what the SLOs
/// relative to solo depend on, the loads of their engines' workloads (a controlled condition
/// at another such load starts its deployment anew).
pub fn plan_key(exp: &Experiment, cond: &Condition) -> String {
    let mut key = cond.deployment_key();
    if cond.control && !exp.control_slo.is_empty() {
        let loads: Vec<String> = cond
            .loads
            .iter()
            .filter(|(w, _)| {
                exp.workload(w)
                    .is_some_and(|d| exp.control_slo.contains_key(&d.engine))
            })
            .map(|(w, _)| solo_pairing(cond, w, &exp.workload(w).expect("known").engine))
            .collect();
        key.push_str(&format!(" slo from solo at {}", loads.join(", ")));
    }
    key
}

/// The plan's lines on the SLOs relative to solo (`--dry-run`): which engine's metric is
/// set from which solo once it has run, and the metrics given absolute beside them. Empty
/// when no planned condition is controlled or the experiment has none.
pub fn plan_lines(exp: &Experiment, plan: &[Condition]) -> Vec<String> {
    if !plan.iter().any(|c| c.control) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (engine, rel) in &exp.control_slo {
        let relative: Vec<String> = rel
            .factors()
            .into_iter()
            .map(|(metric, f)| format!("{metric} = {f} x its solo {}", word(metric)))
            .collect();
        let absolute: Vec<String> = exp
            .deployment
            .engines
            .iter()
            .find(|e| &e.name == engine)
            .and_then(|e| e.slo)
            .map(|s| s.objectives())
            .unwrap_or_default()
            .into_iter()
            .map(|(m, d)| format!("; {m} = {} as written", humantime::format_duration(d)))
            .collect();
        out.push(format!(
            "controlled conditions: {engine}'s SLO {} at the condition's load, set once that solo baseline has run (solo baselines run first; --dry-run validates the deployments with a stand-in){}",
            relative.join(", "),
            absolute.concat()
        ));
    }
    out
}

/// The SLOs set from solo in the measured repetitions of condition `label`, each distinct
/// one once, in the order recorded.
pub fn recorded<'a>(results: &'a Results, label: &str) -> Vec<&'a SoloSlo> {
    let mut out: Vec<&SoloSlo> = Vec::new();
    for r in results
        .conditions
        .iter()
        .filter(|r| r.condition.label == label && r.failed.is_none())
    {
        for s in &r.control_slo {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::plan;
    use crate::results::Percentiles;

    /// A latency generator with a relative TPOT SLO and an absolute TTFT one, a best-effort
    /// embedder, two loads of the generator, one controlled and one static cell at each.
    pub(crate) const EXP: &str = r#"
name = "t"
warmup = "1s"
duration = "2s"
repetitions = 2
[deployment]
sharing = "timeslice"
[deployment.gateway]
address = "127.0.0.1:18999"
[[deployment.engines]]
name = "gen"
model = "preset:qwen3-tiny"
port = 18100
served_model_name = "g"
priority = "latency"
slo = { ttft_p99 = "2s" }
[[deployment.engines]]
name = "emb"
model = "preset:qwen3-tiny"
task = "embed"
port = 18200
served_model_name = "e"
priority = "best-effort"
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 4
[[workloads]]
name = "vec"
engine = "emb"
kind = "embed"
concurrency = 2
batch = 8
[axes]
sharing = ["mps"]
mps_default = true
control = [false, true]
[axes.load.chat]
concurrency = [4, 8]
[control_slo.gen]
tpot_p99 = 1.25
"#;

    fn pct(p99: f64) -> Percentiles {
        Percentiles {
            p99,
            ..Default::default()
        }
    }

    /// A measured solo of `cond` whose chat TPOT p99 is `tpot` (ms), or a failed one.
    fn solo(cond: &Condition, tpot: Option<f64>, failed: Option<&str>) -> ConditionResult {
        let mut r = ConditionResult::failed(cond.clone(), failed.unwrap_or("").into());
        if failed.is_none() {
            r.failed = None;
            r.workloads.insert(
                "chat".into(),
                WorkloadMetrics {
                    engine: "gen".into(),
                    tpot_ms: tpot.map(pct),
                    latency_ms: Some(pct(900.0)),
                    ..Default::default()
                },
            );
        }
        r
    }

    fn solos_of_gen(p: &[Condition], c: u32) -> Vec<&Condition> {
        p.iter()
            .filter(|x| x.is_solo() && x.engines == ["gen"])
            .filter(|x| x.loads["chat"].concurrency == Some(c))
            .collect()
    }

    fn controlled_at(p: &[Condition], c: u32) -> &Condition {
        p.iter()
            .find(|x| x.control && x.loads["chat"].concurrency == Some(c))
            .unwrap()
    }

    /// factor x the mean over the solo's repetitions of the p99, from the solo at the
    /// controlled condition's own load; nothing for a static condition.
    #[test]
    fn the_slo_is_the_factor_of_the_solo_at_the_same_load() {
        let exp = Experiment::parse(EXP).unwrap();
        let p = plan(&exp);
        let (four, eight) = (solos_of_gen(&p, 4), solos_of_gen(&p, 8));
        assert_eq!((four.len(), eight.len()), (2, 2), "two repetitions each");
        let done = vec![
            solo(four[0], Some(2.6), None),
            solo(four[1], Some(3.0), None),
            solo(eight[0], Some(5.0), None),
            solo(eight[1], Some(7.0), None),
        ];
        let s = resolve(&exp, controlled_at(&p, 4), &done).unwrap();
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(
            (s[0].engine.as_str(), s[0].metric.as_str()),
            ("gen", "tpot_p99")
        );
        assert!((s[0].solo_ms - 2.8).abs() < 1e-9, "{s:?}");
        assert_eq!(s[0].slo, Duration::from_micros(3500));
        assert_eq!(s[0].solo, "chat c=4, 2 solo runs");
        assert_eq!(
            s[0].describe(),
            "gen SLO tpot_p99 3.5 ms = 1.25 x solo 2.8 ms (chat c=4, 2 solo runs)"
        );
        let s8 = resolve(&exp, controlled_at(&p, 8), &done).unwrap();
        assert_eq!(s8[0].slo, Duration::from_micros(7500));
        // a static condition keeps no SLO at all
        let fixed = p.iter().find(|x| !x.is_solo() && !x.control).unwrap();
        assert!(resolve(&exp, fixed, &done).unwrap().is_empty());
        // the deployment key tells the two SLOs apart, and the plan knows it beforehand
        assert_ne!(
            start_key(controlled_at(&p, 4), &s),
            start_key(controlled_at(&p, 8), &s8)
        );
        assert!(start_key(controlled_at(&p, 4), &s).ends_with(" slo gen tpot_p99 3.5ms"));
        assert_ne!(
            plan_key(&exp, controlled_at(&p, 4)),
            plan_key(&exp, controlled_at(&p, 8))
        );
        assert_eq!(plan_key(&exp, fixed), fixed.deployment_key());
        // e2el from the request latency; the highest of an engine's workloads
        let exp2 = Experiment::parse(&EXP.replace("tpot_p99 = 1.25", "e2el_p99 = 2")).unwrap();
        let s = resolve(&exp2, controlled_at(&p, 4), &done).unwrap();
        assert_eq!(s[0].slo, Duration::from_millis(1800));
    }

    /// A solo that failed, did not run or measured none of the metric: an error that names
    /// the key, the solo and why.
    #[test]
    fn a_missing_solo_is_an_error_with_the_reason() {
        let exp = Experiment::parse(EXP).unwrap();
        let p = plan(&exp);
        let four = solos_of_gen(&p, 4);
        let ctl = controlled_at(&p, 4);
        let e = format!("{:#}", resolve(&exp, ctl, &[]).unwrap_err());
        assert!(
            e.contains("control_slo.gen.tpot_p99: no solo TPOT p99 of chat c=4 to set engine gen's SLO from: its solo baseline has not run"),
            "{e}"
        );
        let done = vec![solo(
            four[0],
            None,
            Some("deployment did not come up: boom"),
        )];
        let e = format!("{:#}", resolve(&exp, ctl, &done).unwrap_err());
        assert!(
            e.contains("its solo baseline failed (deployment did not come up: boom)"),
            "{e}"
        );
        let done = vec![solo(four[0], None, None)];
        let e = format!("{:#}", resolve(&exp, ctl, &done).unwrap_err());
        assert!(e.contains("its solo baseline measured no TPOT p99"), "{e}");
        // one repetition measured is enough (the other failed)
        let done = vec![
            solo(four[0], Some(2.0), None),
            solo(four[1], None, Some("x")),
        ];
        let s = resolve(&exp, ctl, &done).unwrap();
        assert_eq!(
            (s[0].slo, s[0].solo.as_str()),
            (Duration::from_micros(2500), "chat c=4, 1 solo run")
        );
        // the solo at another load does not stand in
        let eight = solos_of_gen(&p, 8);
        let done = vec![solo(eight[0], Some(2.0), None)];
        assert!(resolve(&exp, ctl, &done).is_err());
    }

    /// Applied to the deployment: the relative metric beside the absolute one; the stand-in
    /// where no solo has run.
    #[test]
    fn applied_beside_the_absolute_metrics() {
        let exp = Experiment::parse(EXP).unwrap();
        let p = plan(&exp);
        let ctl = controlled_at(&p, 4);
        let s = SoloSlo {
            engine: "gen".into(),
            metric: "tpot_p99".into(),
            factor: 1.25,
            solo_ms: 2.8,
            solo: "chat c=4, 2 solo runs".into(),
            slo: Duration::from_micros(3500),
        };
        let d =
            crate::deployments::for_condition_with(&exp, ctl, std::slice::from_ref(&s)).unwrap();
        let slo = d.engines[0].slo.unwrap();
        assert_eq!(slo.tpot_p99, Some(Duration::from_micros(3500)));
        assert_eq!(slo.ttft_p99, Some(Duration::from_secs(2)));
        assert!(d.engines[1].slo.is_none());
        let text = d.to_toml().unwrap();
        assert!(text.contains("tpot_p99 = \"3ms 500us\""), "{text}");
        let mut stand = crate::deployments::for_condition(&exp, ctl).unwrap();
        assert_eq!(stand.engines[0].slo.unwrap().tpot_p99, None);
        apply_stand_ins(&exp, ctl, &mut stand);
        assert_eq!(stand.engines[0].slo.unwrap().tpot_p99, Some(STAND_IN));
        // results.json keeps it
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"slo\":\"3ms 500us\""), "{json}");
        assert_eq!(serde_json::from_str::<SoloSlo>(&json).unwrap(), s);
        // the plan says it will be set from the solo
        let lines = plan_lines(&exp, &p);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("controlled conditions: gen's SLO tpot_p99 = 1.25 x its solo TPOT p99 at the condition's load, set once that solo baseline has run (")
                && lines[0].ends_with("; ttft_p99 = 2s as written"),
            "{lines:?}"
        );
        let statics: Vec<Condition> = p.iter().filter(|c| !c.control).cloned().collect();
        assert!(plan_lines(&exp, &statics).is_empty());
        // the dry run: the line, and a start per SLO (solo gen, solo emb, static, and the
        // controlled cell at each of the generator's loads)
        let text = crate::matrix::describe(&exp, &p);
        assert!(text.contains(&lines[0]), "{text}");
        assert_eq!(text.matches(" up  ").count(), 5, "{text}");
    }
}
