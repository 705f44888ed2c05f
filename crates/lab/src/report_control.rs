//! The report's page for SLO control (issue 18): the controlled conditions beside the static
//! ones at the same loads, what the gateway's controller did in each window (its
//! best-effort limit, decisions, the requests it queued and refused), each workload's
//! throughput before and after a load step, the engine levers it set (compute share, duty
//! cycle, SM share) when it had any, and a timeline per controlled condition with
//! the controller's limit between throughput and the GPU counters (drawn by
//! [`limit_panel`], which `plots::timeline` calls when the window has the controller).

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::analysis::{Analysis, CellSummary};
use crate::gateway_metrics::{ControlSample, GatewayWindow};
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
    // the SLOs set from the solo run (`control_slo`), as each controlled cell ran them
    let mut slos = String::new();
    for &(i, c) in &cells {
        for s in crate::control_slo::recorded(results, &c.label) {
            let _ = writeln!(slos, "- {}: {}", cid(i), s.describe());
        }
    }
    if !slos.is_empty() {
        out.push_str("SLOs set from the solo run (`control_slo`: a factor of the p99 its workload had solo at the same load, the mean over the solo's repetitions):\n\n");
        out.push_str(&slos);
        out.push('\n');
    }
    out.push_str(&levers_table(results, &cells));
    out.push_str(&against_solo(a, &cells));
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

/// One engine lever of the controlled cells: its name, its unit and how a sample reads it.
type Lever = (
    &'static str,
    &'static str,
    fn(&ControlSample) -> Option<f64>,
);

/// The engine levers the controller set in the best-effort built-in engines: per controlled
/// cell, each lever's mean, least and most over the samples in the windows where it was set,
/// and how often it was lifted. Only the levers set somewhere (the deployment template's
/// `engine_*` settings); empty when none was.
fn levers_table(results: &Results, cells: &[(usize, &CellSummary)]) -> String {
    const LEVERS: [Lever; 3] = [
        ("compute share", " tokens", |s| s.engine_share_tokens),
        ("duty cycle", "%", |s| s.engine_duty_percent),
        ("SM share", "%", |s| s.engine_sm_percent),
    ];
    let samples: Vec<(usize, Vec<&ControlSample>)> = cells
        .iter()
        .map(|&(i, c)| {
            let s = measured(results, &c.label)
                .into_iter()
                .filter_map(|r| {
                    let g = r.gateway.as_ref()?;
                    let (w0, w1) = r.window.unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
                    Some(g.samples.iter().filter(move |s| s.t >= w0 && s.t <= w1))
                })
                .flatten()
                .collect();
            (i, s)
        })
        .collect();
    let used: Vec<&Lever> = LEVERS
        .iter()
        .filter(|(_, _, f)| {
            samples
                .iter()
                .any(|(_, s)| s.iter().any(|s| f(s).is_some()))
        })
        .collect();
    if used.is_empty() {
        return String::new();
    }
    let mut out = String::from("The engine levers the controller set in the best-effort built-in engines over the windows (mean, least–most while set; lifted: no cap, no pacing, the whole GPU):\n\n| # |");
    for (name, _, _) in &used {
        let _ = write!(out, " {name} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(used.len()));
    out.push('\n');
    for (i, s) in &samples {
        let _ = write!(out, "| {} |", cid(*i));
        for (_, unit, f) in &used {
            let _ = write!(out, " {} |", lever_text(s.iter().map(|s| f(s)), unit));
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

/// A lever over samples (`None`: lifted at that sample): "mean (least–most)" while set, and
/// the share of the samples it was lifted at.
fn lever_text(v: impl Iterator<Item = Option<f64>>, unit: &str) -> String {
    let v: Vec<Option<f64>> = v.collect();
    let set: Vec<f64> = v.iter().flatten().copied().collect();
    if set.is_empty() {
        return if v.is_empty() { "–" } else { "lifted" }.into();
    }
    let mean = set.iter().sum::<f64>() / set.len() as f64;
    let lo = set.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = set.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lifted = v.len() - set.len();
    let lifted = if lifted > 0 {
        format!(
            ", lifted at {:.0}% of samples",
            100.0 * lifted as f64 / v.len() as f64
        )
    } else {
        String::new()
    };
    format!("{mean:.0}{unit} ({lo:.0}–{hi:.0}){lifted}")
}

/// Each workload of the controlled cells and of their best static twins against its solo
/// run at the same load: throughput, TPOT p99 and request latency p99 (issue 18's goal reads
/// from it: the generator's share of solo and TPOT, the embedder's share).
fn against_solo(a: &Analysis, cells: &[(usize, &CellSummary)]) -> String {
    let mut rows: Vec<usize> = Vec::new();
    for &(i, c) in cells {
        rows.push(i);
        if let Some((j, _, _)) = c.condition.as_ref().and_then(|cond| best_static(a, cond)) {
            if !rows.contains(&j) {
                rows.push(j);
            }
        }
    }
    let mut out = String::from("Each workload against its solo run at the same load, in the controlled conditions and their best static twins:\n\n| # | workload | throughput of solo | TPOT p99 / solo | latency p99 / solo |\n|---|---|---:|---:|---:|\n");
    for i in rows {
        let c = &a.cells[i];
        for (w, ws) in &c.workloads {
            let tpot = c.condition.as_ref().and_then(|cond| {
                let solo = solo_of(a, cond, &ws.workload)?
                    .workloads
                    .get(&ws.workload)?;
                ratio(
                    ws.latency.get("tpot_p99").map(|s| s.mean),
                    solo.latency.get("tpot_p99").map(|s| s.mean),
                )
            });
            let times =
                |r: Option<f64>| r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "–".into());
            let _ = writeln!(
                out,
                "| {} | {w} | {} | {} | {} |",
                cid(i),
                pct(ws.vs_solo),
                times(tpot),
                times(ws.slowdown_p99)
            );
        }
    }
    out.push('\n');
    out
}

/// A workload's mean throughput per second before and after the step, over the measured
/// repetitions of `label` (the step's own second left out): `offset` is the step's time
/// after the window opens.
fn phases(results: &Results, label: &str, w: &str, offset: f64) -> (Option<f64>, Option<f64>) {
    let (b, f): (Vec<_>, Vec<_>) = measured(results, label)
        .iter()
        .filter_map(|r| {
            let m = r.workloads.get(w)?;
            let (w0, w1) = r.window?;
            let s = w0 + offset;
            Some((
                mean_in(&m.timeseries, w0, s),
                mean_in(&m.timeseries, s + 1.0, w1),
            ))
        })
        .unzip();
    (mean(b.into_iter()), mean(f.into_iter()))
}

/// The solo cell of workload `w` at the load it has in `cond`.
fn solo_of<'a>(a: &'a Analysis, cond: &Condition, w: &str) -> Option<&'a CellSummary> {
    let load = cond.loads.get(w)?;
    a.cells.iter().find(|c| {
        c.is_solo()
            && c.reps_ok > 0
            && c.condition
                .as_ref()
                .is_some_and(|s| s.loads.get(w) == Some(load))
    })
}

fn ratio(x: Option<f64>, solo: Option<f64>) -> Option<f64> {
    match (x, solo) {
        (Some(x), Some(s)) if s > 0.0 => Some(x / s),
        _ => None,
    }
}

fn pct(r: Option<f64>) -> String {
    r.map(|r| format!("{:.0}%", r * 100.0))
        .unwrap_or_else(|| "–".into())
}

/// Conditions with a load step: each workload's throughput before and after the step and
/// against its solo run's same part (the solo baseline steps alike), the co-location
/// efficiency of each part, and the controller's mean limit in each part (means over
/// repetitions).
fn steps_table(results: &Results, a: &Analysis) -> String {
    let mut out = String::new();
    for (i, c) in a.cells.iter().enumerate() {
        let reps = measured(results, &c.label);
        let (Some(step), Some(cond)) = (
            reps.first().and_then(|r| step_time(r)),
            c.condition.as_ref(),
        ) else {
            continue;
        };
        if out.is_empty() {
            out.push_str("Load steps: each workload's throughput per second before and after the step (the step's second left out), as a share of its solo run's same part (the solo baseline steps alike); the efficiency of each part (Σ over engines of the share of solo); and the controller's mean limit in each part.\n\n| # | workload | before the step | of solo | after the step | of solo | change |\n|---|---|---:|---:|---:|---:|---:|\n");
        }
        let offset = step - reps[0].window.map_or(0.0, |w| w.0);
        // per engine, its workloads' shares of solo in each part
        let mut shares: std::collections::BTreeMap<&str, (Vec<f64>, Vec<f64>)> =
            std::collections::BTreeMap::new();
        for (w, m0) in &reps[0].workloads {
            let (b, f) = phases(results, &c.label, w, offset);
            let (sb, sf) = if c.is_solo() {
                (None, None)
            } else {
                solo_of(a, cond, w)
                    .map(|s| phases(results, &s.label, w, offset))
                    .unwrap_or_default()
            };
            let (rb, rf) = (ratio(b, sb), ratio(f, sf));
            let e = shares.entry(m0.engine.as_str()).or_default();
            e.0.extend(rb);
            e.1.extend(rf);
            let change = match (b, f) {
                (Some(b), Some(f)) if b > 0.0 => format!("{:+.0}%", (f / b - 1.0) * 100.0),
                _ => "–".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {w} | {} {u} | {} | {} {u} | {} | {change} |",
                cid(i),
                num(b, 1),
                if c.is_solo() { "solo".into() } else { pct(rb) },
                num(f, 1),
                if c.is_solo() { "solo".into() } else { pct(rf) },
                u = m0.unit()
            );
        }
        if !c.is_solo() {
            let eff = |before: bool| -> Option<f64> {
                shares
                    .values()
                    .map(|(b, f)| {
                        let v = if before { b } else { f };
                        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                    })
                    .sum()
            };
            let (eb, ef) = (eff(true), eff(false));
            let _ = writeln!(
                out,
                "| {} | efficiency | | {} | | {} | |",
                cid(i),
                num(eb, 2),
                num(ef, 2)
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
                "| {} | controller's limit | {b:.1} | | {f:.1} | | {:+.1} |",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lever_reads_as_its_mean_and_range_while_set() {
        let v = [Some(12.0), Some(56.0), None, Some(100.0)];
        assert_eq!(
            lever_text(v.into_iter(), "%"),
            "56% (12–100), lifted at 25% of samples"
        );
        assert_eq!(
            lever_text([Some(2048.0)].into_iter(), " tokens"),
            "2048 tokens (2048–2048)"
        );
        assert_eq!(lever_text([None, None].into_iter(), "%"), "lifted");
        assert_eq!(lever_text(std::iter::empty(), "%"), "–");
    }

    /// The levers' table shows the levers set (here the SM share and the compute share,
    /// not the duty cycle), over the samples inside the window only.
    #[test]
    fn the_levers_table_has_the_levers_set_in_the_window() {
        const EXP: &str = r#"
name = "r"
warmup = "0s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "gen"
[[workloads]]
name = "g"
engine = "gen"
preset = "seed-gen"
"#;
        let exp = crate::spec::Experiment::parse(EXP).unwrap();
        let cond = crate::matrix::plan(&exp).remove(0);
        let at = |t: f64, sm: Option<f64>| ControlSample {
            t,
            limit: 4.0,
            engine_share_tokens: Some(8192.0),
            engine_sm_percent: sm,
            ..Default::default()
        };
        let c = ConditionResult {
            failed: None,
            window: Some((10.0, 20.0)),
            gateway: Some(GatewayWindow {
                samples: vec![
                    at(9.0, Some(1.0)), // before the window: not counted
                    at(10.0, Some(12.0)),
                    at(15.0, Some(56.0)),
                    at(20.0, None),
                ],
                ..Default::default()
            }),
            ..ConditionResult::failed(cond.clone(), String::new())
        };
        let results = Results {
            schema_version: crate::results::SCHEMA_VERSION,
            experiment: exp,
            experiment_text: EXP.into(),
            experiment_path: "r.toml".into(),
            environment: crate::results::host_environment(),
            started_at: String::new(),
            updated_at: String::new(),
            complete: true,
            command: "test".into(),
            conditions: vec![c],
            superseded: Vec::new(),
        };
        let cell = CellSummary {
            label: cond.label.clone(),
            condition: Some(cond),
            ..Default::default()
        };
        let table = levers_table(&results, &[(2, &cell)]);
        assert!(
            table.contains("| # | compute share | SM share |\n"),
            "{table}"
        );
        assert!(
            table.contains(
                "| C3 | 8192 tokens (8192–8192) | 34% (12–56), lifted at 33% of samples |\n"
            ),
            "{table}"
        );
        // no lever set: no table
        let mut bare = results.clone();
        bare.conditions[0].gateway = Some(GatewayWindow {
            samples: vec![ControlSample {
                t: 15.0,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(levers_table(&bare, &[(2, &cell)]), "");
    }
}
