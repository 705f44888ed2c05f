//! The report's SVG plots (plotters, SVG backend; text is left to the SVG viewer, so no
//! fonts are needed): throughput per condition, the trade-off between tenants normalised
//! to solo (two tenants against each other; with more, each against the others together),
//! and throughput plus GPU counters over time for one condition. The tenants' latency
//! violins are `violins`, the scaling plot `scaling`.
//!
//! Conditions are named `C1`, `C2`, ... on the axes; the report's tables carry the same
//! numbers next to the full labels.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::analysis::{Analysis, CellSummary};
use crate::results::{ConditionResult, COUNTERS};

/// File names of the plots, relative to the run folder.
pub const THROUGHPUT_SVG: &str = "throughput.svg";
/// See [`THROUGHPUT_SVG`].
pub const TRADEOFF_SVG: &str = "tradeoff.svg";
/// See [`THROUGHPUT_SVG`].
pub const TIMELINE_SVG: &str = "timeline.svg";

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Bars of each workload's throughput per condition (mean, with ± sigma; a workload run in
/// copies: its tenants' sum), one panel per workload; solo baselines grey, co-located blue.
pub fn throughput(analysis: &Analysis, workloads: &[String], path: &Path) -> Result<()> {
    let n = analysis.cells.len().max(1);
    let panels = workloads.len().max(1);
    let width = (160 + 48 * n as u32).clamp(640, 2400);
    let root = SVGBackend::new(path, (width, 260 * panels as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels, 1));
    for (area, w) in areas.iter().zip(workloads) {
        let vals: Vec<Option<(f64, f64, bool)>> = analysis
            .cells
            .iter()
            .map(|c| {
                c.totals
                    .get(w)
                    .map(|s| (s.throughput.mean, s.throughput.sigma, c.is_solo()))
            })
            .collect();
        let unit = analysis
            .cells
            .iter()
            .find_map(|c| c.totals.get(w).map(|s| s.unit))
            .unwrap_or("");
        let ymax = vals
            .iter()
            .flatten()
            .map(|(m, s, _)| m + s)
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{w}: throughput per condition ({unit})"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(64)
            .build_cartesian_2d((0..n as i32 - 1).into_segmented(), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => format!("C{}", i + 1),
                _ => String::new(),
            })
            .y_desc(unit)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(i, v)| {
                let (m, _, solo) = (*v)?;
                let color = if solo {
                    RGBColor(150, 150, 150)
                } else {
                    RGBColor(31, 119, 180)
                };
                let i = i as i32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), m),
                    ],
                    color.filled(),
                );
                bar.set_margin(0, 0, 6, 6);
                Some(bar)
            }))
            .map_err(err)?;
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(i, v)| {
                let (m, s, _) = (*v)?;
                (s > 0.0).then(|| {
                    PathElement::new(
                        vec![
                            (SegmentValue::CenterOf(i as i32), m - s),
                            (SegmentValue::CenterOf(i as i32), m + s),
                        ],
                        BLACK.stroke_width(2),
                    )
                })
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// What the trade-off plot shows.
#[derive(Debug, Clone, PartialEq)]
pub enum Tradeoff {
    /// Every co-located condition has these two tenants: one against the other.
    Pair(String, String),
    /// Any other number: each tenant against the others together.
    Many,
}

/// The trade-off plot of a run: the pair when every co-located condition measured the same
/// two tenants (in the experiment's workload order), else each against the others; `None`
/// without a co-located condition of two or more tenants.
pub fn tradeoff_kind(analysis: &Analysis, workloads: &[String]) -> Option<Tradeoff> {
    let sets: Vec<Vec<&String>> = analysis
        .cells
        .iter()
        .filter(|c| !c.is_solo() && c.workloads.len() >= 2)
        .map(|c| c.workloads.keys().collect())
        .collect();
    let first = sets.first()?;
    if first.len() == 2 && sets.iter().all(|s| s == first) {
        let rank = |t: &str| workloads.iter().position(|w| w == t).unwrap_or(usize::MAX);
        let (mut x, mut y) = (first[0].clone(), first[1].clone());
        if rank(&y) < rank(&x) {
            std::mem::swap(&mut x, &mut y);
        }
        return Some(Tradeoff::Pair(x, y));
    }
    Some(Tradeoff::Many)
}

/// Each tenant of each co-located condition as a point: x = its fraction of solo, y = the
/// sum of the other tenants' fractions; colour by the workload it runs. On the red line
/// x + y = 1 the tenants together did what taking turns would.
pub fn tradeoff_many(analysis: &Analysis, path: &Path) -> Result<()> {
    let mut origins: Vec<String> = Vec::new();
    let mut pts: Vec<(usize, usize, f64, f64)> = Vec::new();
    for (i, c) in analysis.cells.iter().enumerate() {
        if c.is_solo() {
            continue;
        }
        let ratios: Option<Vec<(&String, f64)>> = c
            .workloads
            .values()
            .map(|t| t.vs_solo.map(|v| (&t.workload, v)))
            .collect();
        let Some(ratios) = ratios.filter(|r| r.len() >= 2) else {
            continue;
        };
        let total: f64 = ratios.iter().map(|r| r.1).sum();
        for (w, x) in ratios {
            let k = match origins.iter().position(|o| o == w) {
                Some(k) => k,
                None => {
                    origins.push(w.clone());
                    origins.len() - 1
                }
            };
            pts.push((i, k, x, total - x));
        }
    }
    let xmax = pts.iter().map(|p| p.2).fold(1.1f64, f64::max) * 1.05;
    let ymax = pts.iter().map(|p| p.3).fold(1.1f64, f64::max) * 1.05;
    let root = SVGBackend::new(path, (680, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "each tenant against the others together: fractions of solo",
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("the tenant / its solo")
        .y_desc("Σ the others / their solo")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 1.0), (1.0, 0.0)],
            RGBColor(200, 80, 80),
        ))
        .map_err(err)?
        .label("taking turns (efficiency 1.0)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(200, 80, 80)));
    for (k, w) in origins.iter().enumerate() {
        // from the second colour: the first is close to the reference line's red
        let (r, g, b) = Palette99::pick(k + 1).rgb();
        let color = RGBColor(r, g, b);
        chart
            .draw_series(
                pts.iter()
                    .filter(|p| p.1 == k)
                    .map(|p| Circle::new((p.2, p.3), 5, color.filled())),
            )
            .map_err(err)?
            .label(w.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    chart
        .draw_series(pts.iter().map(|&(i, _, x, y)| {
            Text::new(
                format!("C{}", i + 1),
                (x + 0.012 * xmax, y + 0.012 * ymax),
                ("sans-serif", 12),
            )
        }))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Each co-located condition as a point (x = first workload's fraction of solo, y = the
/// second's), with the "taking turns" line x + y = 1 and the ideal (1, 1).
pub fn tradeoff(analysis: &Analysis, pair: (&str, &str), path: &Path) -> Result<()> {
    let pts: Vec<(usize, f64, f64)> = analysis
        .cells
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.is_solo())
        .filter_map(|(i, c)| {
            let x = c.workloads.get(pair.0)?.vs_solo?;
            let y = c.workloads.get(pair.1)?.vs_solo?;
            Some((i, x, y))
        })
        .collect();
    let top = pts.iter().map(|p| p.1.max(p.2)).fold(1.1f64, f64::max) * 1.05;
    let root = SVGBackend::new(path, (640, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} vs {}: fraction of solo throughput", pair.0, pair.1),
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..top, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(format!("{} / solo", pair.0))
        .y_desc(format!("{} / solo", pair.1))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 1.0), (1.0, 0.0)],
            RGBColor(200, 80, 80),
        ))
        .map_err(err)?
        .label("taking turns (efficiency 1.0)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(200, 80, 80)));
    chart
        .draw_series(std::iter::once(Circle::new(
            (1.0, 1.0),
            5,
            RGBColor(60, 160, 60).filled(),
        )))
        .map_err(err)?
        .label("each kept all (2.0)")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RGBColor(60, 160, 60).filled()));
    chart
        .draw_series(
            pts.iter()
                .map(|&(_, x, y)| Circle::new((x, y), 5, RGBColor(31, 119, 180).filled())),
        )
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|&(i, x, y)| {
            Text::new(
                format!("C{}", i + 1),
                (x + 0.015 * top, y + 0.015 * top),
                ("sans-serif", 14),
            )
        }))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// One condition over time: each workload's throughput per second (top), the gateway's SLO
/// controller when the window has it (`report_control::limit_panel`), and the GPU counters
/// (bottom; one panel per GPU of a deployment across GPUs), on the window's clock.
pub fn timeline(
    cell: &CellSummary,
    index: usize,
    rep: &ConditionResult,
    path: &Path,
) -> Result<()> {
    let t0 = rep.window.map(|w| w.0).unwrap_or_else(|| {
        rep.workloads
            .values()
            .flat_map(|m| m.timeseries.first().map(|p| p.0))
            .fold(f64::INFINITY, f64::min)
    });
    let t0 = if t0.is_finite() { t0 } else { 0.0 };
    let tmax = rep.window.map(|w| w.1 - w.0).unwrap_or(1.0).max(
        rep.workloads
            .values()
            .flat_map(|m| m.timeseries.last().map(|p| p.0 - t0))
            .fold(1.0, f64::max),
    );
    let control = crate::report_control::has_panel(rep);
    // a deployment across GPUs: one counters panel per GPU (`per_gpu::draw_panels`)
    let gpu_panels = rep.gpu.per_gpu.len().max(1) as u32;
    let height = if control { 900 } else { 620 } + 310 * (gpu_panels - 1);
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(310);
    let (middle, bottom) = if control {
        let (m, b) = bottom.split_vertically(280);
        (Some(m), b)
    } else {
        (None, bottom)
    };
    if let (Some(area), Some(g)) = (&middle, &rep.gateway) {
        let step = crate::report_control::step_time(rep);
        crate::report_control::limit_panel(area, g, t0, tmax, step)?;
    }
    // top: throughput normalised to its own maximum so every workload fits one axis
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "C{}: {} (repetition {}) — throughput per second",
                index + 1,
                cell.label,
                rep.condition.repetition
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..1.1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("fraction of window max")
        .draw()
        .map_err(err)?;
    for (k, (name, m)) in rep.workloads.iter().enumerate() {
        let max = m.timeseries.iter().map(|p| p.1).fold(0.0f64, f64::max);
        if max <= 0.0 {
            continue;
        }
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                // a bin starts at p.0 and lasts a second: draw it at its middle
                m.timeseries.iter().map(|p| (p.0 + 0.5 - t0, p.1 / max)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{name} (peak {max:.1} {})", m.unit()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;

    if rep.gpu.available && rep.gpu.per_gpu.len() > 1 {
        crate::per_gpu::draw_panels(&bottom, rep, t0, tmax)?;
        root.present().map_err(err)?;
        return Ok(());
    }
    if !rep.gpu.available || rep.gpu.samples.is_empty() {
        let reason = rep
            .gpu
            .reason
            .clone()
            .unwrap_or_else(|| "no samples in the window".into());
        // wrap the reason: SVG text does not wrap by itself
        let mut lines = vec![String::from("GPU counters unavailable:")];
        for word in reason.split_whitespace() {
            let last = lines.last_mut().expect("one line");
            if last.len() + word.len() > 90 {
                lines.push(word.to_string());
            } else {
                last.push(' ');
                last.push_str(word);
            }
        }
        for (k, line) in lines.iter().enumerate() {
            bottom
                .draw(&Text::new(
                    line.clone(),
                    (20, 60 + 22 * k as i32),
                    ("sans-serif", 16),
                ))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
        return Ok(());
    }
    let pct: Vec<&str> = COUNTERS
        .iter()
        .map(|c| c.0)
        .filter(|c| *c != "power_w")
        .collect();
    let ymax = rep
        .gpu
        .samples
        .iter()
        .flat_map(|(_, v)| pct.iter().filter_map(|c| v.get(*c).copied()))
        .fold(100.0f64, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption("GPU counters (%)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..tmax, 0f64..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("%")
        .draw()
        .map_err(err)?;
    for (k, c) in pct.iter().enumerate() {
        let series: Vec<(f64, f64)> = rep
            .gpu
            .samples
            .iter()
            .filter_map(|(t, v)| v.get(*c).map(|x| (t - t0, *x)))
            .collect();
        if series.is_empty() {
            continue;
        }
        let color = Palette99::pick(k + 4).to_rgba();
        chart
            .draw_series(LineSeries::new(series, color.stroke_width(2)))
            .map_err(err)?
            .label(c.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
