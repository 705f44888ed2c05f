//! From per-repetition results to the report's figures: mean and sigma over repetitions,
//! change against solo, co-location efficiency, SLO checks and the recommendation.
//!
//! Co-location efficiency of a condition = Σ over engines of (co-located throughput /
//! that engine's solo throughput at the same offered load). 2.0 means each engine kept
//! everything it had alone; 1.0 is no better than taking turns on the GPU. An engine with
//! several workloads contributes the mean of its workloads' ratios.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::matrix::{Condition, LoadLevel};
use crate::results::{ConditionResult, Percentiles, Results, WorkloadMetrics};
use crate::spec::{Experiment, Kind, WorkloadObjectives};

/// Mean and sample standard deviation over repetitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 with one value).
    pub sigma: f64,
    /// Number of values.
    pub n: usize,
}

impl Stat {
    /// Mean and sample sigma of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let sigma = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Stat { mean, sigma, n })
    }

    /// `12.3 ± 0.4` (sigma only with several repetitions).
    pub fn show(&self, decimals: usize) -> String {
        if self.n > 1 {
            format!("{:.*} ± {:.*}", decimals, self.mean, decimals, self.sigma)
        } else {
            format!("{:.*}", decimals, self.mean)
        }
    }
}

/// Co-location efficiency: Σ over engines of co-located / solo throughput.
/// `None` when an engine has no (or a zero) solo figure.
pub fn efficiency(colocated: &BTreeMap<String, f64>, solo: &BTreeMap<String, f64>) -> Option<f64> {
    if colocated.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for (engine, co) in colocated {
        let s = *solo.get(engine)?;
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        sum += co / s;
    }
    Some(sum)
}

/// One workload of one condition, over its repetitions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadSummary {
    /// generate or embed.
    pub kind: Option<Kind>,
    /// Engine.
    pub engine: String,
    /// Unit of the throughput.
    pub unit: &'static str,
    /// Headline throughput.
    pub throughput: Stat,
    /// Requests/s.
    pub requests_per_s: Stat,
    /// Mean throughput over that engine's solo mean at the same load.
    pub vs_solo: Option<f64>,
    /// Latency figures (ms) by name: ttft_p50, ttft_p99, tpot_p50, tpot_p99, latency_p50, latency_p99, itl_p50.
    pub latency: BTreeMap<String, Stat>,
    /// Errors over all repetitions.
    pub errors: u64,
}

/// One condition over its repetitions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CellSummary {
    /// The condition's label.
    pub label: String,
    /// The condition (first repetition).
    pub condition: Option<Condition>,
    /// Repetitions measured.
    pub reps_ok: usize,
    /// Failure reasons of failed repetitions.
    pub failures: Vec<String>,
    /// Per workload.
    pub workloads: BTreeMap<String, WorkloadSummary>,
    /// Per GPU counter: mean over repetitions of the window mean.
    pub gpu: BTreeMap<String, Stat>,
    /// Why counters are missing, when they are.
    pub gpu_unavailable: Option<String>,
    /// Co-location efficiency (co-located conditions only).
    pub efficiency: Option<Stat>,
    /// SLO misses (empty: all met, or no SLOs).
    pub slo_misses: Vec<String>,
}

impl CellSummary {
    /// Whether this is a solo baseline.
    pub fn is_solo(&self) -> bool {
        self.condition.as_ref().is_some_and(|c| c.is_solo())
    }
}

/// The recommendation, or why there is none.
#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    /// Label of the chosen condition, if any.
    pub label: Option<String>,
    /// Its efficiency.
    pub efficiency: Option<f64>,
    /// One paragraph: why this one (or why none).
    pub reason: String,
}

/// Everything the report shows, computed once from results.json.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// Cells in plan order.
    pub cells: Vec<CellSummary>,
    /// The recommendation.
    pub recommendation: Recommendation,
}

fn latency_stats(metrics: &[&WorkloadMetrics]) -> BTreeMap<String, Stat> {
    let mut out = BTreeMap::new();
    let mut add = |name: &str, get: &dyn Fn(&WorkloadMetrics) -> Option<f64>| {
        let v: Vec<f64> = metrics.iter().filter_map(|m| get(m)).collect();
        if let Some(s) = Stat::of(&v) {
            out.insert(name.to_string(), s);
        }
    };
    let p = |f: fn(&WorkloadMetrics) -> Option<Percentiles>, q: fn(&Percentiles) -> f64| {
        move |m: &WorkloadMetrics| f(m).map(|p| q(&p))
    };
    add("ttft_p50", &p(|m| m.ttft_ms, |p| p.p50));
    add("ttft_p99", &p(|m| m.ttft_ms, |p| p.p99));
    add("tpot_p50", &p(|m| m.tpot_ms, |p| p.p50));
    add("tpot_p99", &p(|m| m.tpot_ms, |p| p.p99));
    add("itl_p50", &p(|m| m.itl_ms, |p| p.p50));
    add("latency_p50", &p(|m| m.latency_ms, |p| p.p50));
    add("latency_p99", &p(|m| m.latency_ms, |p| p.p99));
    out
}

/// Per workload, the mean solo throughput for (workload, load): the baseline table.
fn solo_means(results: &[ConditionResult]) -> BTreeMap<(String, String), f64> {
    let mut acc: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in results
        .iter()
        .filter(|r| r.condition.is_solo() && r.failed.is_none())
    {
        for (w, m) in &r.workloads {
            let load = r
                .condition
                .loads
                .get(w)
                .map(LoadLevel::short)
                .unwrap_or_default();
            acc.entry((w.clone(), load)).or_default().push(m.throughput);
        }
    }
    acc.into_iter()
        .filter_map(|(k, v)| Stat::of(&v).map(|s| (k, s.mean)))
        .collect()
}

/// Per engine ratios co-located / solo for one repetition.
fn engine_ratios(
    r: &ConditionResult,
    solo: &BTreeMap<(String, String), f64>,
) -> Option<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let mut ratios: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (w, m) in &r.workloads {
        let load = r
            .condition
            .loads
            .get(w)
            .map(LoadLevel::short)
            .unwrap_or_default();
        let s = *solo.get(&(w.clone(), load))?;
        if s <= 0.0 {
            return None;
        }
        ratios
            .entry(m.engine.clone())
            .or_default()
            .push(m.throughput / s);
    }
    let co: BTreeMap<String, f64> = ratios
        .into_iter()
        .map(|(e, v)| (e, v.iter().sum::<f64>() / v.len() as f64))
        .collect();
    let ones = co.keys().map(|e| (e.clone(), 1.0)).collect();
    Some((co, ones))
}

/// Checks a cell's workloads against the experiment's SLOs; returns the misses.
pub fn slo_misses(slos: &BTreeMap<String, WorkloadObjectives>, cell: &CellSummary) -> Vec<String> {
    let mut misses = Vec::new();
    for (w, slo) in slos {
        let Some(ws) = cell.workloads.get(w) else {
            continue; // workload not active in this condition
        };
        let checks: [(&str, Option<std::time::Duration>); 6] = [
            ("ttft_p99", slo.ttft_p99),
            ("ttft_p50", slo.ttft_p50),
            ("tpot_p99", slo.tpot_p99),
            ("tpot_p50", slo.tpot_p50),
            ("latency_p99", slo.latency_p99),
            ("latency_p50", slo.latency_p50),
        ];
        for (name, limit) in checks {
            let Some(limit) = limit else { continue };
            let limit_ms = limit.as_secs_f64() * 1000.0;
            match ws.latency.get(name) {
                Some(s) if s.mean <= limit_ms => {}
                Some(s) => misses.push(format!("{w} {name} {:.1} ms > {limit_ms:.1} ms", s.mean)),
                // No successful request ended in the window: far too slow, or failing.
                None => misses.push(format!("{w} {name}: no request finished in the window")),
            }
        }
        if let Some(f) = slo.min_fraction_of_solo {
            match ws.vs_solo {
                Some(v) if v >= f => {}
                Some(v) => misses.push(format!(
                    "{w} kept {:.0}% of solo < {:.0}%",
                    v * 100.0,
                    f * 100.0
                )),
                None if cell.is_solo() => {}
                None => misses.push(format!("{w} has no solo baseline")),
            }
        }
    }
    misses
}

/// The recommendation rule: among co-located conditions with every repetition measured
/// and every SLO met, the one with the highest mean efficiency.
pub fn recommend(cells: &[CellSummary]) -> Recommendation {
    let candidates: Vec<&CellSummary> = cells
        .iter()
        .filter(|c| {
            !c.is_solo() && c.reps_ok > 0 && c.failures.is_empty() && c.efficiency.is_some()
        })
        .collect();
    let best = candidates
        .iter()
        .filter(|c| c.slo_misses.is_empty())
        .max_by(|a, b| {
            let (ea, eb) = (a.efficiency.unwrap().mean, b.efficiency.unwrap().mean);
            ea.total_cmp(&eb)
        });
    match best {
        Some(c) => {
            let e = c.efficiency.unwrap();
            let verdict = if e.mean > 1.0 {
                "co-locating beats taking turns"
            } else {
                "even the best co-location is no better than taking turns; prefer separate GPUs or time-multiplexing if the GPU is needed elsewhere"
            };
            Recommendation {
                label: Some(c.label.clone()),
                efficiency: Some(e.mean),
                reason: format!(
                    "`{}` has the highest co-location efficiency ({}) among the {} co-located conditions that meet every SLO; {verdict}.",
                    c.label,
                    e.show(2),
                    candidates.iter().filter(|c| c.slo_misses.is_empty()).count()
                ),
            }
        }
        None if candidates.is_empty() => Recommendation {
            label: None,
            efficiency: None,
            reason: "no co-located condition was measured successfully (with its solo baselines), so there is nothing to recommend.".into(),
        },
        None => {
            let closest = candidates
                .iter()
                .min_by_key(|c| c.slo_misses.len())
                .map(|c| format!(" Closest: `{}` ({})", c.label, c.slo_misses.join("; ")))
                .unwrap_or_default();
            Recommendation {
                label: None,
                efficiency: None,
                reason: format!(
                    "no co-located condition meets the SLOs; run the engines on separate GPUs or relax the SLOs.{closest}"
                ),
            }
        }
    }
}

/// Aggregates a run: cells in plan order, efficiency, SLOs, recommendation.
pub fn analyse(results: &Results) -> Analysis {
    let exp: &Experiment = &results.experiment;
    let solo = solo_means(&results.conditions);
    // group by label, keeping first-seen order (plan order)
    let mut order: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, Vec<&ConditionResult>> = BTreeMap::new();
    for plan_c in crate::matrix::plan(exp) {
        if !order.contains(&plan_c.label) {
            order.push(plan_c.label.clone());
        }
    }
    for r in &results.conditions {
        if !order.contains(&r.condition.label) {
            order.push(r.condition.label.clone());
        }
        groups.entry(r.condition.label.clone()).or_default().push(r);
    }
    let mut cells = Vec::new();
    for label in order {
        let Some(reps) = groups.get(&label) else {
            continue;
        };
        let ok: Vec<&ConditionResult> = reps
            .iter()
            .copied()
            .filter(|r| r.failed.is_none())
            .collect();
        let mut cell = CellSummary {
            label: label.clone(),
            condition: reps.first().map(|r| r.condition.clone()),
            reps_ok: ok.len(),
            failures: reps.iter().filter_map(|r| r.failed.clone()).collect(),
            ..Default::default()
        };
        let names: Vec<String> =
            ok.iter()
                .flat_map(|r| r.workloads.keys().cloned())
                .fold(Vec::new(), |mut v, n| {
                    if !v.contains(&n) {
                        v.push(n);
                    }
                    v
                });
        for w in names {
            let ms: Vec<&WorkloadMetrics> = ok.iter().filter_map(|r| r.workloads.get(&w)).collect();
            let first = ms[0];
            let tp: Vec<f64> = ms.iter().map(|m| m.throughput).collect();
            let rq: Vec<f64> = ms.iter().map(|m| m.requests_per_s).collect();
            let load = cell
                .condition
                .as_ref()
                .and_then(|c| c.loads.get(&w))
                .map(LoadLevel::short)
                .unwrap_or_default();
            let thr = Stat::of(&tp).unwrap_or_default();
            let vs_solo = solo
                .get(&(w.clone(), load))
                .filter(|s| **s > 0.0)
                .map(|s| thr.mean / s);
            cell.workloads.insert(
                w.clone(),
                WorkloadSummary {
                    kind: first.kind,
                    engine: first.engine.clone(),
                    unit: first.unit(),
                    throughput: thr,
                    requests_per_s: Stat::of(&rq).unwrap_or_default(),
                    vs_solo,
                    latency: latency_stats(&ms),
                    errors: ms.iter().map(|m| m.errors.values().sum::<u64>()).sum(),
                },
            );
        }
        for (key, _) in crate::results::COUNTERS {
            let v: Vec<f64> = ok
                .iter()
                .filter(|r| r.gpu.available)
                .filter_map(|r| r.gpu.counters.get(key).map(|c| c.mean))
                .collect();
            if let Some(s) = Stat::of(&v) {
                cell.gpu.insert(key.to_string(), s);
            }
        }
        cell.gpu_unavailable = ok.iter().find_map(|r| r.gpu.reason.clone());
        if !cell.is_solo() {
            let effs: Vec<f64> = ok
                .iter()
                .filter_map(|r| engine_ratios(r, &solo))
                .filter_map(|(co, ones)| efficiency(&co, &ones))
                .collect();
            cell.efficiency = Stat::of(&effs);
        }
        cell.slo_misses = slo_misses(&exp.slo, &cell);
        cells.push(cell);
    }
    let recommendation = recommend(&cells);
    Analysis {
        cells,
        recommendation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::ConditionSharing;

    fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn efficiency_arithmetic() {
        let solo = m(&[("gen", 1000.0), ("emb", 200.0)]);
        // each kept everything: 2.0
        assert_eq!(
            efficiency(&m(&[("gen", 1000.0), ("emb", 200.0)]), &solo),
            Some(2.0)
        );
        // taking turns: half each, 1.0
        assert_eq!(
            efficiency(&m(&[("gen", 500.0), ("emb", 100.0)]), &solo),
            Some(1.0)
        );
        // seeds' MPS case: gen -2.4%, emb -29%
        let e = efficiency(&m(&[("gen", 976.0), ("emb", 142.0)]), &solo).unwrap();
        assert!((e - (0.976 + 0.71)).abs() < 1e-9, "{e}");
        // missing or zero baseline: no figure rather than a wrong one
        assert_eq!(efficiency(&m(&[("gen", 1.0), ("x", 1.0)]), &solo), None);
        assert_eq!(efficiency(&m(&[("gen", 1.0)]), &m(&[("gen", 0.0)])), None);
        assert_eq!(efficiency(&BTreeMap::new(), &solo), None);
    }

    #[test]
    fn stat_mean_sigma() {
        let s = Stat::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.mean, 2.0);
        assert!((s.sigma - 1.0).abs() < 1e-12);
        assert_eq!(Stat::of(&[5.0]).unwrap().sigma, 0.0);
        assert!(Stat::of(&[]).is_none());
        assert_eq!(Stat::of(&[1.0, 3.0]).unwrap().show(1), "2.0 ± 1.4");
    }

    fn cell(
        label: &str,
        solo: bool,
        eff: Option<f64>,
        misses: &[&str],
        failures: usize,
    ) -> CellSummary {
        CellSummary {
            label: label.into(),
            condition: Some(Condition {
                label: label.into(),
                repetition: 1,
                sharing: if solo {
                    ConditionSharing::Solo
                } else {
                    ConditionSharing::Shared(deploy::Sharing::Mps)
                },
                engines: vec![],
                mps_split: None,
                memory_split: None,
                loads: BTreeMap::new(),
            }),
            reps_ok: 1,
            failures: vec!["boom".to_string(); failures],
            efficiency: eff.map(|e| Stat {
                mean: e,
                sigma: 0.0,
                n: 1,
            }),
            slo_misses: misses.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn recommendation_rule() {
        let cells = vec![
            cell("solo", true, None, &[], 0),
            cell("a", false, Some(1.9), &["chat ttft_p99 900 ms > 500 ms"], 0), // best but misses SLO
            cell("b", false, Some(1.4), &[], 0),
            cell("c", false, Some(1.6), &[], 1), // a repetition failed
            cell("d", false, Some(1.2), &[], 0),
        ];
        let r = recommend(&cells);
        assert_eq!(r.label.as_deref(), Some("b"));
        assert_eq!(r.efficiency, Some(1.4));
        assert!(r.reason.contains("beats taking turns"));

        let r = recommend(&cells[..2]);
        assert_eq!(r.label, None);
        assert!(
            r.reason.contains("no co-located condition meets the SLOs"),
            "{}",
            r.reason
        );
        assert!(r.reason.contains("Closest: `a`"), "{}", r.reason);

        let r = recommend(&[cell("d", false, Some(0.8), &[], 0)]);
        assert!(r.reason.contains("no better than taking turns"));
        assert!(recommend(&[]).label.is_none());
    }

    #[test]
    fn slo_checks() {
        let mut c = cell("a", false, Some(1.5), &[], 0);
        let mut ws = WorkloadSummary::default();
        ws.latency.insert(
            "ttft_p99".into(),
            Stat {
                mean: 120.0,
                sigma: 0.0,
                n: 1,
            },
        );
        ws.vs_solo = Some(0.7);
        c.workloads.insert("chat".into(), ws);
        let mut slos = BTreeMap::new();
        slos.insert(
            "chat".to_string(),
            WorkloadObjectives {
                ttft_p99: Some(std::time::Duration::from_millis(100)),
                tpot_p99: Some(std::time::Duration::from_millis(100)),
                min_fraction_of_solo: Some(0.8),
                ..Default::default()
            },
        );
        let misses = slo_misses(&slos, &c);
        assert_eq!(misses.len(), 3, "{misses:?}");
        assert!(misses[0].contains("ttft_p99 120.0 ms > 100.0 ms"));
        assert!(misses[1].contains("tpot_p99: no request finished in the window"));
        assert!(misses[2].contains("kept 70% of solo"));
        slos.get_mut("chat").unwrap().ttft_p99 = Some(std::time::Duration::from_millis(200));
        slos.get_mut("chat").unwrap().tpot_p99 = None;
        slos.get_mut("chat").unwrap().min_fraction_of_solo = Some(0.5);
        assert!(slo_misses(&slos, &c).is_empty());
    }
}
