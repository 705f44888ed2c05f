//! The report's page for SLO control (issue 18): the controlled conditions beside the static
//! ones at the same loads, what the gateway's controller did in each window (its
//! best-effort limit, decisions, the requests it queued and refused), each workload's
//! throughput before and after a load step, and a timeline per controlled condition with
//! the controller's limit between throughput and the GPU counters (drawn by
//! [`limit_panel`], which `plots::timeline` calls when the window has the controller).

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::analysis::{Analysis, CellSummary};
use crate::gateway_metrics::GatewayWindow;
use crate::matrix::Condition;
use crate::plots;
use crate::results::{ConditionResult, Results};

/// The timeline of controlled condition `C<i+1>`, relative to the run folder.
pub fn timeline_file(i: usize) -> String {
    format!("timeline-C{}.svg", i + 1)
}

fn cid(i: usize) -> String {
    format!("C{}", i + 1)
}

/// Whether a cell ran under the controller.
fn controlled(c: &CellSummary) -> bool {
    c.condition.as_ref().is_some_and(|c| c.control)
}

/// The static co-located cell with the best efficiency among those with the same engines and
/// loads as `of` (the same offered load, without the controller).
fn best_static<'a>(a: &'a Analysis, of: &Condition) -> Option<(usize, &'a CellSummary, f64)> {
    a.cells
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.is_solo() && !controlled(c))
        .filter(|(_, c)| {
            c.condition
                .as_ref()
                .is_some_and(|s| s.loads == of.loads && s.engines == of.engines)
        })
        .filter_map(|(i, c)| Some((i, c, c.efficiency?.mean)))
        .max_by(|x, y| x.2.total_cmp(&y.2))
}

/// The measured repetitions of a label.
fn measured<'a>(results: &'a Results, label: &str) -> Vec<&'a ConditionResult> {
    results
        .conditions
        .iter()
        .filter(|r| r.condition.label == label && r.failed.is_none())
        .collect()
}

/// When the load step of `r` came (Unix seconds), if a workload of it has one.
pub fn step_time(r: &ConditionResult) -> Option<f64> {
    let (w0, w1) = r.window?;
    let window = std::time::Duration::from_secs_f64((w1 - w0).max(0.0));
    r.condition
        .loads
        .values()
        .find_map(|l| l.step)
        .map(|s| w0 + s.at.resolve(window).as_secs_f64())
}

/// The mean of a per-second series over the bins that start in `[a, b)`.
fn mean_in(series: &[(f64, f64)], a: f64, b: f64) -> Option<f64> {
    let v: Vec<f64> = series
        .iter()
        .filter(|p| p.0 >= a && p.0 + 1.0 <= b + 1e-9)
        .map(|p| p.1)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "–".into())
}

/// Mean over the repetitions that have a value.
fn mean(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The section, empty when no condition ran under the controller. Draws each controlled
/// condition's timeline into `run_dir`.
pub fn section(results: &Results, a: &Analysis, run_dir: &Path) -> String {
    let cells: Vec<(usize, &CellSummary)> = a
        .cells
        .iter()
        .enumerate()
        .filter(|(_, c)| controlled(c))
        .collect();
    if cells.is_empty() {
        return String::new();
    }
    let mut out = String::from("## SLO control\n\n");
    out.push_str("Controlled conditions run the gateway's SLO controller over their sharing mode: the template's engine priorities and SLOs, every workload through the gateway, which limits the best-effort engines' requests in flight to keep the latency engines' p99 within their SLO (queueing the rest, refusing with 429 beyond its queue). Each is set beside the best static condition at the same loads; the controller's figures are read from the gateway's `/metrics` over the window (limit: best-effort requests allowed in flight; 429s: refused; means over repetitions).\n\n");
    out.push_str("| # | condition | efficiency | best static at the same loads | vs static | limit mean (min–max) | limit at the end | decreases | 429s | queued at most | pressure at most |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for &(i, c) in &cells {
        let reps = measured(results, &c.label);
        let sums: Vec<_> = reps
            .iter()
            .filter_map(|r| r.gateway.as_ref()?.summary.as_ref())
            .collect();
        let avg = |f: fn(&crate::gateway_metrics::ControlSummary) -> f64| {
            mean(sums.iter().map(|s| Some(f(s))))
        };
        let eff = c.efficiency.map(|e| e.mean);
        let best = c.condition.as_ref().and_then(|cond| best_static(a, cond));
        let (best_text, delta) = match best {
            Some((j, _, e)) => (
                format!("{} ({e:.2})", cid(j)),
                eff.map(|x| format!("{:+.2}", x - e)),
            ),
            None => ("–".into(), None),
        };
        let limit = match (
            avg(|s| s.limit_mean),
            avg(|s| s.limit_min),
            avg(|s| s.limit_max),
        ) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:.1} ({lo:.0}–{hi:.0})"),
            _ => "not read".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {best_text} | {} | {limit} | {} | {} | {} | {} | {} |",
            cid(i),
            c.label,
            num(eff, 2),
            delta.unwrap_or_else(|| "–".into()),
            num(avg(|s| s.limit_end), 0),
            num(avg(|s| s.decreases), 0),
            num(avg(|s| s.rejected), 0),
            num(avg(|s| s.queued_max), 0),
            num(mean(sums.iter().map(|s| s.pressure_max)), 2),
        );
    }
    out.push('\n');
    for &(i, c) in &cells {
        for r in measured(results, &c.label) {
            for n in r.gateway.iter().flat_map(|g| &g.notes) {
                let _ = writeln!(
                    out,
                    "- {} repetition {}: gateway: {n}",
                    cid(i),
                    r.condition.repetition
                );
            }
        }
    }
    out.push_str(&steps_table(results, a));
    for &(i, c) in &cells {
        let Some(rep) = measured(results, &c.label).into_iter().next() else {
            continue;
        };
        let file = timeline_file(i);
        match plots::timeline(c, i, rep, &run_dir.join(&file)) {
            Ok(()) => {
                let _ = writeln!(
                    out,
                    "{} over time (throughput per second, the controller's limit, GPU counters):\n\n![{} over time]({file})\n",
                    cid(i),
                    cid(i)
                );
            }
            Err(e) => {
                let _ = writeln!(out, "- plot failed: {} timeline: {e:#}\n", cid(i));
            }
        }
    }
    out
}

/// Conditions with a load step: each workload's throughput before and after it, and the
/// controller's mean limit in each part (means over repetitions).
fn steps_table(results: &Results, a: &Analysis) -> String {
    let mut out = String::new();
    for (i, c) in a.cells.iter().enumerate() {
        let reps = measured(results, &c.label);
        let Some(step) = reps.first().and_then(|r| step_time(r)) else {
            continue;
        };
        if out.is_empty() {
            out.push_str("Load steps: each workload's throughput per second before and after the step (the step's second left out), and the controller's mean limit in each part.\n\n| # | workload | before the step | after the step | change |\n|---|---|---:|---:|---:|\n");
        }
        let offset = step - reps[0].window.map_or(0.0, |w| w.0);
        let parts = |r: &ConditionResult, series: &[(f64, f64)]| {
            let (w0, w1) = r.window.unwrap_or_default();
            let s = w0 + offset;
            (mean_in(series, w0, s), mean_in(series, s + 1.0, w1))
        };
        for (w, m0) in &reps[0].workloads {
            let (b, f): (Vec<_>, Vec<_>) = reps
                .iter()
                .filter_map(|r| r.workloads.get(w).map(|m| parts(r, &m.timeseries)))
                .unzip();
            let (b, f) = (mean(b.into_iter()), mean(f.into_iter()));
            let change = match (b, f) {
                (Some(b), Some(f)) if b > 0.0 => format!("{:+.0}%", (f / b - 1.0) * 100.0),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {w} | {} {u} | {} {u} | {change} |",
                cid(i),
                num(b, 1),
                num(f, 1),
                u = m0.unit()
            );
        }
        let limits = |before: bool| {
            mean(reps.iter().map(|r| {
                let g = r.gateway.as_ref()?;
                let (w0, w1) = r.window?;
                let s = w0 + offset;
                if before {
                    g.mean_limit(w0, s)
                } else {
                    g.mean_limit(s, w1 + 1e-9)
                }
            }))
        };
        if let (Some(b), Some(f)) = (limits(true), limits(false)) {
            let _ = writeln!(
                out,
                "| {} | controller's limit | {b:.1} | {f:.1} | {:+.1} |",
                cid(i),
                f - b
            );
        }
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// One line of the controller's panel: its name, what it reads, its colour and width.
type Line = (
    &'static str,
    fn(&crate::gateway_metrics::ControlSample) -> f64,
    RGBColor,
    u32,
);

/// The controller's panel of a timeline: its best-effort limit, the best-effort requests in
/// flight and waiting, on the window's clock (`t0` its start, `tmax` its length), with the
/// load step marked when there is one.
pub fn limit_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    g: &GatewayWindow,
    t0: f64,
    tmax: f64,
    step: Option<f64>,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plot: {e}");
    let ymax = g
        .samples
        .iter()
        .map(|s| s.limit.max(s.in_flight).max(s.queued))
        .fold(1.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "gateway SLO controller: best-effort requests",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("requests")
        .draw()
        .map_err(err)?;
    let series: [Line; 3] = [
        ("limit", |s| s.limit, RGBColor(214, 39, 40), 3),
        ("in flight", |s| s.in_flight, RGBColor(31, 119, 180), 1),
        ("waiting", |s| s.queued, RGBColor(255, 127, 14), 1),
    ];
    for (name, f, color, width) in series {
        chart
            .draw_series(LineSeries::new(
                // the samples at the window's edges may lie just outside it
                g.samples
                    .iter()
                    .map(|s| ((s.t - t0).clamp(0.0, tmax), f(s))),
                color.stroke_width(width),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if let Some(s) = step {
        let x = s - t0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, ymax)],
                BLACK.stroke_width(1),
            )))
            .map_err(err)?
            .label("load step")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Whether a repetition's timeline gets the controller's panel.
pub fn has_panel(rep: &ConditionResult) -> bool {
    rep.gateway.as_ref().is_some_and(|g| !g.samples.is_empty())
}
