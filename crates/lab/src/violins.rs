//! Latency distributions side by side: one violin per tenant (a Gaussian kernel density
//! of its requests' latencies, `kde`, mirrored about the tenant's position), the median as
//! a bar and the 99th percentile as a tick. The A100 study compared equal tenants by their
//! densities; violins put every tenant of a condition, and its workload's solo run, on one
//! axis. Latencies spanning more than a factor of 20 (a small model beside a large one) are
//! drawn on a log scale, the density then taken over log10 of the latency.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::kde::Kde;

/// One violin: a label under it and the latencies (ms) it shows.
#[derive(Debug, Clone)]
pub struct Violin {
    /// The tenant, or `WORKLOAD solo`.
    pub label: String,
    /// Latencies, ms.
    pub sample: Vec<f64>,
    /// Drawn grey: a solo baseline.
    pub solo: bool,
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// How the latency axis maps values: linear, or log10 when they span a wide range.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
}

impl Scale {
    /// The scale for values in `[lo, hi]`.
    fn for_range(lo: f64, hi: f64) -> Scale {
        if lo > 0.0 && hi / lo > 20.0 {
            Scale::Log
        } else {
            Scale::Linear
        }
    }

    fn axis_of(self, v: f64) -> f64 {
        match self {
            Scale::Linear => v,
            Scale::Log => v.log10(),
        }
    }

    fn value_at(self, y: f64) -> f64 {
        match self {
            Scale::Linear => y,
            Scale::Log => 10f64.powf(y),
        }
    }
}

/// A latency as a tick label: more decimals for small values.
fn tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn percentile(sample: &[f64], p: f64) -> f64 {
    let mut s = sample.to_vec();
    s.sort_by(f64::total_cmp);
    bench::metrics::percentile_sorted(&s, p)
}

/// Draws `groups` as violins into an SVG at `path`.
pub fn plot(title: &str, groups: &[Violin], path: &Path) -> Result<()> {
    let values = groups
        .iter()
        .flat_map(|g| g.sample.iter().copied())
        .filter(|v| v.is_finite() && *v >= 0.0);
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        anyhow::bail!("no latencies to draw");
    }
    let scale = Scale::for_range(lo, hi);
    let (alo, ahi) = (scale.axis_of(lo.max(1e-6)), scale.axis_of(hi.max(1e-6)));
    let pad = ((ahi - alo) * 0.06).max(if scale == Scale::Log { 0.05 } else { 0.5 });
    let (ylo, yhi) = (
        if scale == Scale::Linear {
            (alo - pad).max(0.0)
        } else {
            alo - pad
        },
        ahi + pad,
    );
    let n = groups.len();
    let width = (140 + 110 * n as u32).clamp(640, 2400);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            if scale == Scale::Log {
                format!("{title}, log scale")
            } else {
                title.to_string()
            },
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.6f64..(n as f64 - 0.4), ylo..yhi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ms")
        .y_label_formatter(&|y| tick(scale.value_at(*y)))
        .draw()
        .map_err(err)?;
    for (i, g) in groups.iter().enumerate() {
        let x = i as f64;
        let color = if g.solo {
            RGBColor(150, 150, 150)
        } else {
            let (r, gr, b) = Palette99::pick(i).rgb();
            RGBColor(r, gr, b)
        };
        let axis: Vec<f64> = g
            .sample
            .iter()
            .filter(|v| v.is_finite() && (**v > 0.0 || (scale == Scale::Linear && **v == 0.0)))
            .map(|v| scale.axis_of(*v))
            .collect();
        if axis.is_empty() {
            continue;
        }
        match Kde::new(&axis) {
            Some(k) => {
                let (a, b) = axis
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                        (a.min(*v), b.max(*v))
                    });
                let (from, to) = ((a - k.bandwidth()).max(ylo), (b + k.bandwidth()).min(yhi));
                let curve = k.curve(from, to, 96);
                let peak = curve.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-300);
                let half = |d: f64| 0.42 * d / peak;
                let mut outline: Vec<(f64, f64)> =
                    curve.iter().map(|&(y, d)| (x + half(d), y)).collect();
                outline.extend(curve.iter().rev().map(|&(y, d)| (x - half(d), y)));
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        outline,
                        color.mix(0.55).filled(),
                    )))
                    .map_err(err)?;
            }
            None => {
                // one value (or all equal): a flat line where it is
                let y = axis[0];
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x - 0.3, y), (x + 0.3, y)],
                        color.stroke_width(3),
                    )))
                    .map_err(err)?;
            }
        }
        let median = scale.axis_of(percentile(&g.sample, 50.0).max(1e-6));
        let p99 = scale.axis_of(percentile(&g.sample, 99.0).max(1e-6));
        chart
            .draw_series([
                PathElement::new(
                    vec![(x - 0.18, median), (x + 0.18, median)],
                    BLACK.stroke_width(3),
                ),
                PathElement::new(
                    vec![(x - 0.08, p99), (x + 0.08, p99)],
                    BLACK.stroke_width(1),
                ),
            ])
            .map_err(err)?;
        let (px, py) = chart.backend_coord(&(x, ylo));
        root.draw(&Text::new(
            g.label.clone(),
            (px, py + 8),
            ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(center: f64, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| center * (1.0 + 0.2 * ((i as f64 * 0.37).sin())))
            .collect()
    }

    #[test]
    fn draws_one_violin_per_group() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.svg");
        let groups = vec![
            Violin {
                label: "chat solo".into(),
                sample: sample(40.0, 200),
                solo: true,
            },
            Violin {
                label: "chat-0".into(),
                sample: sample(60.0, 200),
                solo: false,
            },
            Violin {
                label: "chat-1".into(),
                sample: vec![55.0],
                solo: false,
            },
        ];
        plot("C3: latency", &groups, &p).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
        for label in ["chat solo", "chat-0", "chat-1", "C3: latency"] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert!(!svg.contains("log scale"));
        assert_eq!(
            svg.matches("<polygon").count(),
            2,
            "one flat line, two densities"
        );
        // a wide range is drawn on a log scale
        let wide = vec![
            Violin {
                label: "small".into(),
                sample: sample(2.0, 100),
                solo: false,
            },
            Violin {
                label: "large".into(),
                sample: sample(900.0, 100),
                solo: false,
            },
        ];
        plot("C4", &wide, &p).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("log scale"));
        // nothing to draw is an error, not a panic
        assert!(plot("x", &[], &p).is_err());
    }

    #[test]
    fn the_scale_follows_the_range() {
        assert_eq!(Scale::for_range(10.0, 150.0), Scale::Linear);
        assert_eq!(Scale::for_range(1.0, 150.0), Scale::Log);
        assert_eq!(Scale::for_range(0.0, 150.0), Scale::Linear);
        assert!((Scale::Log.value_at(Scale::Log.axis_of(37.0)) - 37.0).abs() < 1e-9);
        assert_eq!(tick(1234.5), "1234");
        assert_eq!(tick(12.34), "12.3");
        assert_eq!(tick(0.1234), "0.123");
        assert_eq!(tick(0.0), "0");
    }
}
