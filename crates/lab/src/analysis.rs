//! From per-repetition results to the report's figures: mean and sigma over repetitions,
//! change against solo, co-location efficiency, SLO checks and the recommendation.
//!
//! Co-location efficiency of a condition = Σ over engines of (co-located throughput /
//! that engine's solo throughput at the same offered load). 2.0 means each engine kept
//! everything it had alone; 1.0 is no better than taking turns on the GPU. An engine with
//! several workloads contributes the mean of its workloads' ratios, and each copy of an
//! engine run in copies is an engine of its own.
//!
//! Per tenant (`tenants`): its latency percentiles, its slowdown against its own solo run
//! (latency over solo latency at the same load; a copy's solo run is its workload's), and
//! per condition the fairness between tenants (`fairness`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::fairness::Fairness;
use crate::matrix::{Condition, LoadLevel};
use crate::results::{ConditionResult, DrainWait, Percentiles, Results, WorkloadMetrics};
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

/// One tenant of one condition (a workload, or one copy of it), over its repetitions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadSummary {
    /// The experiment's workload it runs (its own name, unless it is a copy).
    pub workload: String,
    /// Which copy of that workload, when its engine ran in copies.
    pub copy: Option<u32>,
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
    /// Latency figures (ms) by name: ttft_p50, ttft_p99, tpot_p50, tpot_p99, itl_p50,
    /// latency_mean, latency_p50, latency_p90, latency_p95, latency_p99.
    pub latency: BTreeMap<String, Stat>,
    /// Errors over all repetitions.
    pub errors: u64,
    /// Median latency over the median of its solo run at the same load (1.0: as alone).
    pub slowdown_p50: Option<f64>,
    /// The same for the 99th percentile.
    pub slowdown_p99: Option<f64>,
    /// Its latency samples pooled over the repetitions, ms (densities and tests).
    #[serde(skip)]
    pub sample: Vec<f64>,
    /// Requests those samples were taken from.
    pub sampled_of: u64,
    /// Whole responses never ended (cut at the drain's time-out), over repetitions.
    pub unfinished: u64,
    /// The longest wait after a window for its whole responses, and whether any timed out.
    pub drain: Option<DrainWait>,
}

/// A workload of the experiment in one condition: its tenants together (one, or one per
/// copy when its engine ran in copies).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadTotal {
    /// How many tenants ran it.
    pub tenants: usize,
    /// Unit of the throughput.
    pub unit: &'static str,
    /// Their throughput summed per repetition.
    pub throughput: Stat,
    /// The mean over its tenants of their fraction of solo.
    pub vs_solo: Option<f64>,
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
    /// Per workload of the experiment, its tenants together.
    pub totals: BTreeMap<String, WorkloadTotal>,
    /// Fairness between the tenants (co-located conditions).
    pub fairness: Option<Fairness>,
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
    add("latency_mean", &p(|m| m.latency_ms, |p| p.mean));
    add("latency_p50", &p(|m| m.latency_ms, |p| p.p50));
    add("latency_p90", &p(|m| m.latency_ms, |p| p.p90));
    add("latency_p95", &p(|m| m.latency_ms, |p| p.p95));
    add("latency_p99", &p(|m| m.latency_ms, |p| p.p99));
    out
}

/// The experiment's workload a tenant of `r` runs: its own name, or the workload it copies.
pub fn origin<'a>(tenant: &'a str, m: &'a WorkloadMetrics) -> &'a str {
    m.copy_of.as_ref().map_or(tenant, |c| c.workload.as_str())
}

/// The load a tenant ran in its condition (its workload's), as labels write it, and where
/// its engine ran when the condition says (a solo figure is per placement).
fn load_of(r: &ConditionResult, tenant: &str, m: &WorkloadMetrics) -> String {
    solo_pairing(&r.condition, origin(tenant, m), &m.engine)
}

/// What pairs workload `workload` (on `engine`) of `cond` with its solo baseline: its load
/// in `cond`, as labels write it, and where the engine ran when the condition says. A solo
/// condition with the same text for the workload is its baseline (*vs solo*, and the
/// SLO relative to solo of `crate::control_slo`).
pub fn solo_pairing(cond: &Condition, workload: &str, engine: &str) -> String {
    let load = cond
        .loads
        .get(workload)
        .map(LoadLevel::short)
        .unwrap_or_default();
    load + &crate::layout::solo_key(cond, engine)
}

/// A workload's solo figures at one load: means over the repetitions.
#[derive(Debug, Clone, Copy, Default)]
struct Solo {
    throughput: f64,
    latency_p50: Option<f64>,
    latency_p99: Option<f64>,
}

/// Per (workload, load), the solo figures: the baseline table.
fn solo_means(results: &[ConditionResult]) -> BTreeMap<(String, String), Solo> {
    let mut acc: BTreeMap<(String, String), Vec<&WorkloadMetrics>> = BTreeMap::new();
    for r in results
        .iter()
        .filter(|r| r.condition.is_solo() && r.failed.is_none())
    {
        for (w, m) in &r.workloads {
            let key = (origin(w, m).to_string(), load_of(r, w, m));
            acc.entry(key).or_default().push(m);
        }
    }
    let mean = |v: Vec<f64>| Stat::of(&v).map(|s| s.mean);
    acc.into_iter()
        .filter_map(|(k, ms)| {
            let throughput = mean(ms.iter().map(|m| m.throughput).collect())?;
            let lat = |q: fn(&Percentiles) -> f64| {
                mean(
                    ms.iter()
                        .filter_map(|m| m.latency_ms.as_ref().map(q))
                        .collect(),
                )
            };
            Some((
                k,
                Solo {
                    throughput,
                    latency_p50: lat(|p| p.p50),
                    latency_p99: lat(|p| p.p99),
                },
            ))
        })
        .collect()
}

/// Per engine ratios co-located / solo for one repetition.
fn engine_ratios(
    r: &ConditionResult,
    solo: &BTreeMap<(String, String), Solo>,
) -> Option<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let mut ratios: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (w, m) in &r.workloads {
        let key = (origin(w, m).to_string(), load_of(r, w, m));
        let s = solo.get(&key)?.throughput;
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

/// Per workload of the experiment, its tenants of one condition together: throughput
/// summed in each repetition, the mean of their fractions of solo.
fn totals(
    reps: &[&ConditionResult],
    tenants: &BTreeMap<String, WorkloadSummary>,
) -> BTreeMap<String, WorkloadTotal> {
    let mut out: BTreeMap<String, WorkloadTotal> = BTreeMap::new();
    let mut members: BTreeMap<&str, Vec<(&String, &WorkloadSummary)>> = BTreeMap::new();
    for (name, t) in tenants {
        members
            .entry(t.workload.as_str())
            .or_default()
            .push((name, t));
    }
    for (w, ts) in members {
        let sums: Vec<f64> = reps
            .iter()
            .filter(|r| ts.iter().any(|(n, _)| r.workloads.contains_key(*n)))
            .map(|r| {
                ts.iter()
                    .filter_map(|(n, _)| r.workloads.get(*n))
                    .map(|m| m.throughput)
                    .sum()
            })
            .collect();
        let ratios: Option<Vec<f64>> = ts.iter().map(|(_, t)| t.vs_solo).collect();
        out.insert(
            w.to_string(),
            WorkloadTotal {
                tenants: ts.len(),
                unit: ts[0].1.unit,
                throughput: Stat::of(&sums).unwrap_or_default(),
                vs_solo: ratios
                    .filter(|r| !r.is_empty())
                    .map(|r| r.iter().sum::<f64>() / r.len() as f64),
            },
        );
    }
    out
}

/// Checks a cell's tenants against the experiment's SLOs (each copy of a workload against
/// the workload's); returns the misses.
pub fn slo_misses(slos: &BTreeMap<String, WorkloadObjectives>, cell: &CellSummary) -> Vec<String> {
    let mut misses = Vec::new();
    for (workload, slo) in slos {
        // no tenant: the workload is not active in this condition
        let tenants = cell
            .workloads
            .iter()
            .filter(|(name, t)| *name == workload || t.workload == *workload);
        for (w, ws) in tenants {
            tenant_slo_misses(&mut misses, w, ws, slo, cell.is_solo());
        }
    }
    misses
}

fn tenant_slo_misses(
    misses: &mut Vec<String>,
    w: &str,
    ws: &WorkloadSummary,
    slo: &WorkloadObjectives,
    solo: bool,
) {
    {
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
                None if solo => {}
                None => misses.push(format!("{w} has no solo baseline")),
            }
        }
    }
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
            let with: Vec<(&ConditionResult, &WorkloadMetrics)> = ok
                .iter()
                .filter_map(|r| r.workloads.get(&w).map(|m| (*r, m)))
                .collect();
            let ms: Vec<&WorkloadMetrics> = with.iter().map(|(_, m)| *m).collect();
            let (r0, first) = with[0];
            let tp: Vec<f64> = ms.iter().map(|m| m.throughput).collect();
            let rq: Vec<f64> = ms.iter().map(|m| m.requests_per_s).collect();
            let base = solo.get(&(origin(&w, first).to_string(), load_of(r0, &w, first)));
            let thr = Stat::of(&tp).unwrap_or_default();
            let latency = latency_stats(&ms);
            let slowdown = |key: &str, solo: Option<f64>| {
                let co = latency.get(key)?.mean;
                solo.filter(|s| *s > 0.0).map(|s| co / s)
            };
            let sample: Vec<f64> = ms
                .iter()
                .filter_map(|m| m.latency_sample.as_ref())
                .flat_map(|s| s.ms.iter().copied())
                .collect();
            let drain = ms.iter().filter_map(|m| m.drain).reduce(|a, b| DrainWait {
                waited_s: a.waited_s.max(b.waited_s),
                timeout_s: a.timeout_s.max(b.timeout_s),
                timed_out: a.timed_out || b.timed_out,
            });
            cell.workloads.insert(
                w.clone(),
                WorkloadSummary {
                    workload: origin(&w, first).to_string(),
                    copy: first.copy_of.as_ref().map(|c| c.index),
                    kind: first.kind,
                    engine: first.engine.clone(),
                    unit: first.unit(),
                    throughput: thr,
                    requests_per_s: Stat::of(&rq).unwrap_or_default(),
                    vs_solo: base
                        .filter(|s| s.throughput > 0.0)
                        .map(|s| thr.mean / s.throughput),
                    slowdown_p50: slowdown("latency_p50", base.and_then(|s| s.latency_p50)),
                    slowdown_p99: slowdown("latency_p99", base.and_then(|s| s.latency_p99)),
                    errors: ms.iter().map(|m| m.errors.values().sum::<u64>()).sum(),
                    sampled_of: ms
                        .iter()
                        .filter_map(|m| m.latency_sample.as_ref())
                        .map(|s| s.of)
                        .sum(),
                    sample,
                    unfinished: ms.iter().map(|m| m.unfinished).sum(),
                    drain,
                    latency,
                },
            );
        }
        cell.totals = totals(&ok, &cell.workloads);
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
            if let Some(cond) = &cell.condition {
                if !ok.is_empty() {
                    cell.fairness = Some(crate::fairness::assess(exp, cond, &ok, &cell.workloads));
                }
            }
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
                copies: BTreeMap::new(),
                control: false,
                placements: BTreeMap::new(),
                baseline: false,
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
