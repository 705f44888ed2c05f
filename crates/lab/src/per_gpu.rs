//! Every GPU of a condition's deployment (issue 19): each GPU's counters over the window,
//! the deployment's totals over them, and where each engine replica ran.
//!
//! A window's `GpuWindow::counters` and `samples` are the deployment's totals: per sampler
//! tick, power and memory used summed over its GPUs, utilisation, clocks and temperature
//! averaged (`gpu::telemetry::summarize_totals`); for a deployment on one GPU that is the
//! GPU's own figures, as before. `GpuWindow::per_gpu` holds each GPU alone and
//! `GpuWindow::placement` the plan `up` started (each replica's GPUs, TP size, per-GPU
//! budget and the KV tokens that budget holds). Results written before the lab measured
//! every GPU have neither, and read and report as they did: one GPU's counters.
//!
//! The report shows a per-GPU table per condition ([`table`]) and draws each GPU's counters
//! in the timeline plot ([`draw_panels`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::results::{ConditionResult, CounterStat, Results};

/// One GPU of the deployment over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuCounters {
    /// Its index.
    pub gpu: u32,
    /// Samples in the window.
    pub samples: usize,
    /// Where SM active and DRAM came from (`gpm` or `utilization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Per counter (sm_active, sm_occupancy, tensor_active, dram_bw, power_w, temp_c,
    /// sm_clock_mhz, mem_clock_mhz, mem_used_bytes): mean / p50 / max over the window.
    #[serde(default)]
    pub counters: BTreeMap<String, CounterStat>,
    /// Its samples in the window: (Unix seconds, counter -> value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<(f64, BTreeMap<String, f64>)>,
}

/// Where one engine replica ran, as `up` planned it (figures per GPU of the replica).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnginePlacement {
    /// The replica (`gen`, `gen-0`, ...).
    pub replica: String,
    /// The engine it is a replica of.
    pub engine: String,
    /// Its GPUs, as the deployment names them.
    pub gpus: Vec<String>,
    pub tensor_parallel_size: u32,
    /// Weights on each of its GPUs.
    pub weights_bytes: u64,
    /// Its memory budget on each GPU, when one applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// Tokens its KV budget holds (every GPU's share of each token together), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_tokens: Option<u64>,
}

impl EnginePlacement {
    /// The placement of every replica of a plan.
    pub fn of_plan(plan: &deploy::Plan) -> Vec<EnginePlacement> {
        plan.engines
            .iter()
            .map(|e| EnginePlacement {
                replica: e.name.clone(),
                engine: e.engine.clone(),
                gpus: e.gpus.clone(),
                tensor_parallel_size: e.tensor_parallel_size,
                weights_bytes: e.weights_bytes,
                budget_bytes: e.budget_bytes,
                kv_tokens: e.kv_tokens,
            })
            .collect()
    }
}

/// Counters of the per-GPU table, with their headings and how they are shown.
pub const TABLE_COUNTERS: [(&str, &str); 8] = [
    ("sm_active", "SM active %"),
    ("sm_occupancy", "SM occ. %"),
    ("tensor_active", "tensor %"),
    ("dram_bw", "DRAM BW %"),
    ("power_w", "power W"),
    ("mem_used_bytes", "memory GiB"),
    ("sm_clock_mhz", "SM MHz"),
    ("temp_c", "temp °C"),
];

const GIB: f64 = (1u64 << 30) as f64;

/// A counter's value as the table shows it (bytes in GiB).
fn shown(key: &str, v: f64) -> f64 {
    if key == "mem_used_bytes" {
        v / GIB
    } else {
        v
    }
}

/// The GPU window of a deployment on `gpus` over `[w0, w1]` from the sampler's samples:
/// totals in `counters` and `samples`, each GPU in `per_gpu`. Without GPU indices (a
/// deployment that names its GPU by UUID) the first GPU sampled stands for it. `notes` are
/// the sampler's (fallbacks, failing counters).
#[cfg(feature = "measure")]
pub fn window(
    samples: &[gpu::telemetry::Sample],
    gpus: &[u32],
    w0: f64,
    w1: f64,
    notes: Vec<String>,
    placement: Vec<EnginePlacement>,
) -> crate::results::GpuWindow {
    use gpu::telemetry::{summarize, summarize_totals, Stat};
    let conv = |s: &Stat| CounterStat {
        mean: s.mean,
        p50: s.p50,
        max: s.max,
    };
    let summary = summarize(samples, w0, w1);
    let mut set: Vec<u32> = gpus.to_vec();
    if set.is_empty() {
        set.extend(summary.gpus.first().map(|g| g.gpu));
    }
    let per_gpu: Vec<GpuCounters> = summary
        .gpus
        .iter()
        .filter(|g| set.contains(&g.gpu) && g.samples > 0)
        .map(|g| GpuCounters {
            gpu: g.gpu,
            samples: g.samples,
            source: g.source.map(|s| s.as_str().to_string()),
            counters: g
                .stats()
                .iter()
                .map(|(k, s)| (k.to_string(), conv(s)))
                .collect(),
            series: samples
                .iter()
                .filter(|s| s.gpu == g.gpu && s.t >= w0 && s.t <= w1)
                .map(|s| {
                    let m = s.values().into_iter().map(|(k, v)| (k.to_string(), v));
                    (s.t, m.collect())
                })
                .collect(),
        })
        .collect();
    let totals = summarize_totals(samples, &set, w0, w1);
    let mut notes = notes;
    let missing: Vec<String> = set
        .iter()
        .filter(|g| !per_gpu.iter().any(|p| p.gpu == **g))
        .map(|g| g.to_string())
        .collect();
    if !missing.is_empty() && !per_gpu.is_empty() {
        notes.push(format!(
            "no samples of GPU {} in the window: the totals are missing",
            missing.join(", ")
        ));
    }
    if totals.partial_ticks > 0 && totals.ticks > 0 {
        notes.push(format!(
            "{} sampler tick(s) missed a GPU of the deployment and are left out of its totals",
            totals.partial_ticks
        ));
    }
    if totals.ticks == 0 {
        return crate::results::GpuWindow {
            available: false,
            reason: Some(if notes.is_empty() {
                "no GPU samples in the window".into()
            } else {
                format!("no GPU samples in the window; {}", notes.join("; "))
            }),
            gpus: set,
            per_gpu,
            placement,
            ..Default::default()
        };
    }
    crate::results::GpuWindow {
        available: true,
        reason: (!notes.is_empty()).then(|| notes.join("; ")),
        counters: totals
            .stats()
            .iter()
            .map(|(k, s)| (k.to_string(), conv(s)))
            .collect(),
        samples: totals
            .series
            .iter()
            .map(|s| {
                let m = s.values().into_iter().map(|(k, v)| (k.to_string(), v));
                (s.t, m.collect())
            })
            .collect(),
        mps_faults: Vec::new(),
        gpus: set,
        per_gpu,
        placement,
    }
}

/// Mean and sigma over repetitions, as `12.3 ± 0.4` (sigma only with several).
fn show(values: &[f64], decimals: usize) -> String {
    match crate::analysis::Stat::of(values) {
        Some(s) => s.show(decimals),
        None => "–".into(),
    }
}

/// The measured repetitions of a condition that recorded several GPUs.
fn multi_gpu_reps<'a>(results: &'a Results, label: &str) -> Vec<&'a ConditionResult> {
    results
        .conditions
        .iter()
        .filter(|r| r.condition.label == label && r.failed.is_none() && r.gpu.available)
        .filter(|r| r.gpu.per_gpu.len() > 1)
        .collect()
}

/// The per-GPU table of a condition (markdown): each GPU of its deployment and the
/// engine replicas on it, then the deployment's totals; mean over the window, mean ± sigma
/// over repetitions. Empty when no repetition recorded more than one GPU (a deployment on
/// one GPU, whose counters table says it all, or results from before the lab measured
/// every GPU).
pub fn table(results: &Results, label: &str) -> String {
    let reps = multi_gpu_reps(results, label);
    if reps.is_empty() {
        return String::new();
    }
    let mut gpus: Vec<u32> = reps
        .iter()
        .flat_map(|r| r.gpu.per_gpu.iter().map(|g| g.gpu))
        .collect();
    gpus.sort_unstable();
    gpus.dedup();
    let columns: Vec<(&str, &str)> = TABLE_COUNTERS
        .into_iter()
        .filter(|(k, _)| {
            reps.iter().any(|r| {
                r.gpu.counters.contains_key(*k)
                    || r.gpu.per_gpu.iter().any(|g| g.counters.contains_key(*k))
            })
        })
        .collect();
    let mut out = String::from(
        "Per GPU (mean over the window; mean ± sigma over repetitions). *all* is the deployment's: power and memory summed over its GPUs, the rest averaged (the table above).\n\n| GPU | engines on it |",
    );
    for (_, head) in &columns {
        let _ = write!(out, " {head} |");
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---:|".repeat(columns.len()));
    out.push('\n');
    let on = |g: u32| -> String {
        let key = g.to_string();
        let mut names: Vec<String> = Vec::new();
        for p in reps.iter().flat_map(|r| &r.gpu.placement) {
            if p.gpus.contains(&key) {
                let n = if p.tensor_parallel_size > 1 {
                    format!("{} (TP{})", p.replica, p.tensor_parallel_size)
                } else {
                    p.replica.clone()
                };
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        if names.is_empty() {
            "–".into()
        } else {
            names.join(", ")
        }
    };
    for g in &gpus {
        let _ = write!(out, "| {g} | {} |", on(*g));
        for (k, _) in &columns {
            let v: Vec<f64> = reps
                .iter()
                .filter_map(|r| r.gpu.per_gpu.iter().find(|x| x.gpu == *g))
                .filter_map(|x| x.counters.get(*k).map(|c| shown(k, c.mean)))
                .collect();
            let _ = write!(out, " {} |", show(&v, 1));
        }
        out.push('\n');
    }
    out.push_str("| all | |");
    for (k, _) in &columns {
        let v: Vec<f64> = reps
            .iter()
            .filter_map(|r| r.gpu.counters.get(*k).map(|c| shown(k, c.mean)))
            .collect();
        let _ = write!(out, " {} |", show(&v, 1));
    }
    out.push_str("\n\n");
    out
}

/// Mean over repetitions of each GPU's mean power, per GPU, and their mean: the power per
/// GPU of a condition; `None` without per-GPU power.
pub fn power_per_gpu(reps: &[&ConditionResult]) -> Option<(Vec<f64>, BTreeMap<u32, f64>)> {
    let mut per_rep = Vec::new();
    let mut by_gpu: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for r in reps.iter().filter(|r| r.failed.is_none()) {
        let p: Vec<(u32, f64)> = r
            .gpu
            .per_gpu
            .iter()
            .filter_map(|g| g.counters.get("power_w").map(|c| (g.gpu, c.mean)))
            .collect();
        if p.is_empty() || p.len() < r.gpu.per_gpu.len() {
            continue;
        }
        per_rep.push(p.iter().map(|(_, w)| w).sum::<f64>() / p.len() as f64);
        for (g, w) in p {
            by_gpu.entry(g).or_default().push(w);
        }
    }
    if per_rep.is_empty() {
        return None;
    }
    let means = by_gpu
        .into_iter()
        .map(|(g, v)| (g, v.iter().sum::<f64>() / v.len() as f64))
        .collect();
    Some((per_rep, means))
}

/// Draws each GPU's utilisation counters (%) over the window in a panel of its own, into
/// `area` (the lower part of the timeline plot), with its mean power in the caption.
pub fn draw_panels(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rep: &ConditionResult,
    t0: f64,
    tmax: f64,
) -> anyhow::Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    let pct = ["sm_active", "sm_occupancy", "tensor_active", "dram_bw"];
    let gpus = &rep.gpu.per_gpu;
    let panels = area.split_evenly((gpus.len().max(1), 1));
    for (panel, g) in panels.iter().zip(gpus) {
        let ymax = g
            .series
            .iter()
            .flat_map(|(_, v)| pct.iter().filter_map(|c| v.get(*c).copied()))
            .fold(100.0f64, f64::max);
        let power = g
            .counters
            .get("power_w")
            .map(|p| format!(", {:.0} W", p.mean))
            .unwrap_or_default();
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("GPU {}: counters (%){power}", g.gpu),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("s")
            .y_desc("%")
            .draw()
            .map_err(|e| err(&e))?;
        for (k, c) in pct.iter().enumerate() {
            let series: Vec<(f64, f64)> = g
                .series
                .iter()
                .filter_map(|(t, v)| v.get(*c).map(|x| (t - t0, *x)))
                .collect();
            if series.is_empty() {
                continue;
            }
            let color = Palette99::pick(k + 4).to_rgba();
            chart
                .draw_series(LineSeries::new(series, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(c.to_string())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn stat(mean: f64) -> CounterStat {
        CounterStat {
            mean,
            p50: mean,
            max: mean,
        }
    }

    /// A GPU's counters as the lab records them.
    pub(crate) fn gpu(g: u32, sm: f64, power: f64, mem_gib: f64) -> GpuCounters {
        GpuCounters {
            gpu: g,
            samples: 2,
            source: Some("gpm".into()),
            counters: BTreeMap::from([
                ("sm_active".to_string(), stat(sm)),
                ("power_w".to_string(), stat(power)),
                ("mem_used_bytes".to_string(), stat(mem_gib * GIB)),
            ]),
            series: vec![
                (100.0, BTreeMap::from([("sm_active".to_string(), sm)])),
                (101.0, BTreeMap::from([("sm_active".to_string(), sm)])),
            ],
        }
    }

    /// The report of a two-GPU study: the per-GPU table with the replicas on each GPU and
    /// the deployment's totals, the hypotheses, and a timeline panel per GPU.
    #[test]
    fn the_report_shows_every_gpu() {
        let mut results = crate::hypotheses::tests::study_results();
        for r in &mut results.conditions {
            // the totals as measure writes them: power summed, utilisation averaged
            let sum: f64 = r
                .gpu
                .per_gpu
                .iter()
                .map(|g| g.counters["power_w"].mean)
                .sum();
            r.gpu.counters.insert("power_w".into(), stat(sum));
            r.gpu.counters.insert("sm_active".into(), stat(50.0));
        }
        let dir = tempfile::tempdir().unwrap();
        let r = crate::report::render(&results, dir.path(), None).unwrap();
        let report = std::fs::read_to_string(&r.report).unwrap();
        assert!(report.contains("Per GPU (mean over the window"), "{report}");
        assert!(
            report.contains("| GPU | engines on it | SM active % | power W | memory GiB |"),
            "{report}"
        );
        // both TP2 under MPS: both replicas on each GPU, 395 and 400 W, 795 W in all
        assert!(
            report
                .contains("| 0 | embed (TP2), gen (TP2) | 50.0 ± 0.0 | 395.0 ± 0.0 | 60.0 ± 0.0 |"),
            "{report}"
        );
        assert!(
            report.contains("| all | | 50.0 ± 0.0 | 795.0 ± 0.0 |"),
            "{report}"
        );
        // the baseline: one engine per GPU
        assert!(
            report.contains("| 1 | embed | 50.0 ± 0.0 | 340.0 ± 0.0 |"),
            "{report}"
        );
        assert!(report.contains("## Hypotheses"), "{report}");
        let svg = std::fs::read_to_string(dir.path().join(crate::plots::TIMELINE_SVG)).unwrap();
        assert!(svg.contains("GPU 0: counters (%)"), "one panel per GPU");
        assert!(svg.contains("GPU 1: counters (%)"));
        // a deployment on one GPU: no per-GPU table
        let solo = results
            .conditions
            .iter()
            .find(|r| r.condition.is_solo() && r.gpu.per_gpu.len() == 1)
            .unwrap();
        assert!(table(&results, &solo.condition.label).is_empty());
    }

    #[test]
    fn power_per_gpu_is_the_mean_of_the_gpus() {
        let mut r = crate::results::ConditionResult::failed(
            crate::matrix::plan(
                &crate::spec::Experiment::parse(crate::hypotheses::tests::STUDY).unwrap(),
            )
            .remove(0),
            String::new(),
        );
        r.failed = None;
        r.gpu.available = true;
        r.gpu.per_gpu = vec![gpu(0, 80.0, 500.0, 70.0), gpu(1, 20.0, 300.0, 40.0)];
        let (per_rep, by_gpu) = power_per_gpu(&[&r]).unwrap();
        assert_eq!(per_rep, vec![400.0]);
        assert_eq!(by_gpu[&1], 300.0);
        // a GPU without power: that repetition does not count
        r.gpu.per_gpu[1].counters.remove("power_w");
        assert!(power_per_gpu(&[&r]).is_none());
    }
}
