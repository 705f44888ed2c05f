//! The scaling experiment's view: what each step of engine copies (1, 2, 3, 4, 10 copies
//! of a small model; 4 small + 1 large) achieved, as the A100 study plotted latency and
//! throughput against the number of models. A series is the co-located conditions that
//! differ only in their copies (same sharing, splits and workloads, so the same label
//! without its `[4 small + 1 large]`); its steps are ordered by engine copies in all. Each
//! workload's solo run is the step of one copy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::analysis::{Analysis, CellSummary, Stat};

/// The scaling plot's file, relative to the run folder.
pub const SCALING_SVG: &str = "scaling.svg";

/// Whether the run asked for copies anywhere.
pub fn applies(a: &Analysis) -> bool {
    a.cells
        .iter()
        .any(|c| c.condition.as_ref().is_some_and(|k| !k.copies.is_empty()))
}

/// One step of a series.
struct Step<'a> {
    index: usize,
    cell: &'a CellSummary,
    instances: u32,
    set: String,
}

/// A label without its copies: `mps default [4 small]: chat c=4` -> `mps default: chat c=4`.
fn series_key(label: &str) -> String {
    match (label.find(" ["), label.find("]")) {
        (Some(a), Some(b)) if b > a => format!("{}{}", &label[..a], &label[b + 1..]),
        _ => label.to_string(),
    }
}

/// The co-located conditions run in copies, by series, each series by engine copies.
fn series(a: &Analysis) -> Vec<(String, Vec<Step<'_>>)> {
    let mut out: Vec<(String, Vec<Step>)> = Vec::new();
    for (index, cell) in a.cells.iter().enumerate() {
        let Some(c) = cell.condition.as_ref().filter(|c| !c.copies.is_empty()) else {
            continue;
        };
        if c.is_solo() || cell.reps_ok == 0 {
            continue;
        }
        let key = series_key(&cell.label);
        let step = Step {
            index,
            cell,
            instances: c.instances(),
            set: crate::matrix::copies_text(&c.engines, &c.copies),
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, steps)) => steps.push(step),
            None => out.push((key, vec![step])),
        }
    }
    for (_, steps) in &mut out {
        steps.sort_by_key(|s| s.instances);
    }
    out
}

fn stat(s: Option<Stat>, decimals: usize) -> String {
    s.map(|s| s.show(decimals)).unwrap_or_else(|| "–".into())
}

/// A workload's figures in one cell: throughput in all (and per copy), median latency
/// (mean over its tenants) and the worst tenant's 99th percentile.
fn workload_cells(cell: &CellSummary, w: &str) -> (String, String) {
    let Some(t) = cell.totals.get(w) else {
        return ("–".into(), "–".into());
    };
    let tenants: Vec<_> = cell
        .workloads
        .values()
        .filter(|s| s.workload == w)
        .collect();
    let thr = if t.tenants > 1 {
        format!(
            "{} {} ({:.1} each)",
            t.throughput.show(1),
            t.unit,
            t.throughput.mean / t.tenants as f64
        )
    } else {
        format!("{} {}", t.throughput.show(1), t.unit)
    };
    let p50: Vec<f64> = tenants
        .iter()
        .filter_map(|s| s.latency.get("latency_p50").map(|l| l.mean))
        .collect();
    let p99 = tenants
        .iter()
        .filter_map(|s| s.latency.get("latency_p99").map(|l| l.mean))
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let lat = match (Stat::of(&p50), p99) {
        (Some(a), Some(b)) => format!("{:.1} / {b:.1}", a.mean),
        _ => "–".into(),
    };
    (thr, lat)
}

/// The "Scaling" section: the solo steps, then each series step by step, with the plot.
/// Empty when the run asked for no copies.
pub fn section(a: &Analysis, workloads: &[String], run_dir: &Path) -> String {
    if !applies(a) {
        return String::new();
    }
    let mut out = String::from("## Scaling\n\n");
    out.push_str("Each step runs some engines in several copies, each copy a tenant of its own with its workloads' load; a series is the conditions that differ only in their copies, and each workload's solo run is its step of one copy. Throughput is the tenants' sum (and the mean per copy); latency is the tenants' median (mean over them) / the worst tenant's 99th percentile, ms; efficiency and Jain's index as in the headline and *Fairness*; the GPU counters are window means.\n\n");
    let mut head = String::from("| # | series | engines | copies |");
    let mut rule = String::from("|---|---|---|---:|");
    for w in workloads {
        let _ = write!(head, " {w} throughput | {w} p50 / p99 ms |");
        rule.push_str("---:|---:|");
    }
    head.push_str(" efficiency | Jain (vs solo) | SM active % | DRAM BW % | power W |");
    rule.push_str("---:|---:|---:|---:|---:|");
    let _ = writeln!(out, "{head}\n{rule}");
    let row = |out: &mut String, i: usize, cell: &CellSummary, series: &str, set: &str, n: u32| {
        let _ = write!(out, "| C{} | {series} | {set} | {n} |", i + 1);
        for w in workloads {
            let (thr, lat) = workload_cells(cell, w);
            let _ = write!(out, " {thr} | {lat} |");
        }
        let _ = writeln!(
            out,
            " {} | {} | {} | {} | {} |",
            stat(cell.efficiency, 2),
            cell.fairness
                .as_ref()
                .and_then(|f| f.jain_vs_solo)
                .map(|j| format!("{j:.3}"))
                .unwrap_or_else(|| "–".into()),
            stat(cell.gpu.get("sm_active").copied(), 1),
            stat(cell.gpu.get("dram_bw").copied(), 1),
            stat(cell.gpu.get("power_w").copied(), 0),
        );
    };
    for (i, cell) in a.cells.iter().enumerate() {
        let Some(c) = cell.condition.as_ref().filter(|c| c.is_solo()) else {
            continue;
        };
        if cell.reps_ok == 0 {
            continue;
        }
        row(
            &mut out,
            i,
            cell,
            "solo",
            &format!("1 {}", c.engines.join(" + ")),
            1,
        );
    }
    let all = series(a);
    for (key, steps) in &all {
        for s in steps {
            row(&mut out, s.index, s.cell, key, &s.set, s.instances);
        }
    }
    out.push('\n');
    match plot(&all, &run_dir.join(SCALING_SVG)) {
        Ok(()) => {
            let _ = writeln!(out, "Efficiency (Σ over tenants of their fraction of solo; 1.0 is taking turns) and the tenants' median slowdown against engine copies in all, one line per series:\n\n![scaling]({SCALING_SVG})\n");
        }
        Err(e) => {
            let _ = writeln!(out, "- plot failed: scaling: {e:#}\n");
        }
    }
    out
}

/// The mean over a cell's tenants of their median-latency slowdown.
fn mean_slowdown(cell: &CellSummary) -> Option<f64> {
    let v: Vec<f64> = cell
        .workloads
        .values()
        .filter_map(|t| t.slowdown_p50)
        .collect();
    Stat::of(&v).map(|s| s.mean)
}

/// Efficiency (top) and mean median slowdown (bottom) against engine copies, per series.
fn plot(series: &[(String, Vec<Step<'_>>)], path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    let xmax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|s| s.instances))
        .max()
        .unwrap_or(2)
        .max(2) as f64;
    let points = |f: &dyn Fn(&CellSummary) -> Option<f64>| -> Vec<Vec<(f64, f64, usize)>> {
        series
            .iter()
            .map(|(_, steps)| {
                steps
                    .iter()
                    .filter_map(|s| f(s.cell).map(|v| (s.instances as f64, v, s.index)))
                    .collect()
            })
            .collect()
    };
    let eff = points(&|c| c.efficiency.map(|e| e.mean));
    let slow = points(&mean_slowdown);
    let root = SVGBackend::new(path, (900, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(340);
    type Panel<'a, 'b> = (
        &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
        &'a Vec<Vec<(f64, f64, usize)>>,
        &'a str,
        f64,
    );
    let panels: [Panel; 2] = [
        (&top, &eff, "efficiency (Σ fraction of solo)", 1.0),
        (&bottom, &slow, "median slowdown (mean over tenants)", 1.0),
    ];
    let mut labels: BTreeMap<usize, String> = BTreeMap::new();
    for (k, (key, _)) in series.iter().enumerate() {
        let mut l = key.clone();
        if l.len() > 60 {
            l.truncate(57);
            l.push_str("...");
        }
        labels.insert(k, l);
    }
    for (area, pts, desc, reference) in panels {
        let ymax = pts.iter().flatten().map(|p| p.1).fold(reference, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(desc, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(0.5f64..xmax + 0.5, 0f64..ymax)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("engine copies in all")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                vec![(0.5, reference), (xmax + 0.5, reference)],
                RGBColor(200, 80, 80),
            ))
            .map_err(|e| err(&e))?;
        for (k, line) in pts.iter().enumerate() {
            if line.is_empty() {
                continue;
            }
            // from the second colour: the first is close to the reference line's red
            let (r, g, b) = Palette99::pick(k + 1).rgb();
            let color = RGBColor(r, g, b);
            chart
                .draw_series(LineSeries::new(
                    line.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(labels.get(&k).cloned().unwrap_or_default())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(
                    line.iter()
                        .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
            chart
                .draw_series(line.iter().map(|p| {
                    Text::new(
                        format!("C{}", p.2 + 1),
                        (p.0 + 0.08, p.1),
                        ("sans-serif", 12),
                    )
                }))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_the_label_without_its_copies() {
        assert_eq!(
            series_key("mps default [4 small + 1 large]: chat c=4, vec c=2"),
            "mps default: chat c=4, vec c=2"
        );
        assert_eq!(series_key("timeslice: chat c=4"), "timeslice: chat c=4");
    }
}
