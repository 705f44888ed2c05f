//! The report's tenant pages: per condition, each tenant's latency percentiles, its
//! slowdown against its solo run and its distribution (a violin per tenant beside its solo
//! run's); the fairness between tenants (Jain's index, the significance tests between equal
//! tenants); and the drain after the window with what it left unfinished. The numbers come
//! from `analysis` and `fairness`; this module only writes them.

use std::fmt::Write as _;
use std::path::Path;

use crate::analysis::{Analysis, CellSummary, Stat, WorkloadSummary};
use crate::fairness::{Fairness, PairTest, ALPHA};
use crate::matrix::LoadLevel;
use crate::violins::{self, Violin};

/// The file of condition `i`'s violins, relative to the run folder.
pub fn violin_file(i: usize) -> String {
    format!("latency-C{}.svg", i + 1)
}

/// Whether the report has tenant distributions to show: some tenant kept a latency sample.
pub fn has_samples(a: &Analysis) -> bool {
    a.cells
        .iter()
        .flat_map(|c| c.workloads.values())
        .any(|t| !t.sample.is_empty())
}

fn ratio(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}×")).unwrap_or_else(|| "–".into())
}

fn ms(s: Option<&Stat>) -> String {
    s.map(|s| s.show(1)).unwrap_or_else(|| "–".into())
}

fn p_value(p: Option<f64>) -> String {
    match p {
        Some(p) if p < 1e-4 => format!("{p:.1e}"),
        Some(p) => format!("{p:.3}"),
        None => "–".into(),
    }
}

/// The most pairs of one class listed in a condition's detail; beyond, the most different.
const PAIRS_LISTED: usize = 10;

/// Tenants as a list, shortened past four: `chat-0, chat-1, ... chat-9 (10)`.
fn members(names: &[String]) -> String {
    match names {
        [first, second, .., last] if names.len() > 4 => {
            format!("{first}, {second}, ... {last} ({})", names.len())
        }
        _ => names.join(", "),
    }
}

/// The smaller p-value of a pair's two tests (1 when neither is defined).
fn min_p(p: &PairTest) -> f64 {
    let w = p.welch.map_or(1.0, |t| t.p);
    let u = p.mann_whitney.map_or(1.0, |t| t.p);
    w.min(u)
}

/// The "Fairness" section: one row per co-located condition. Empty when no co-located
/// condition has fairness figures.
pub fn fairness_section(a: &Analysis) -> String {
    let rows: Vec<(usize, &CellSummary, &Fairness)> = a
        .cells
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.fairness.as_ref().map(|f| (i, c, f)))
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from("## Fairness\n\n");
    out.push_str(&format!("A tenant is one workload against one engine (each copy of an engine run in copies is one). *Jain (vs solo)* is Jain's index over every tenant's throughput as a fraction of its solo throughput: 1 when all kept the same share of what they had alone, 1/n when one kept everything. *Slowdown* is a tenant's median latency over its solo run's at the same load; the worst one is named. Equal tenants run the same workload at the same load on engines deployed alike (the full rule is in the lab's `tenants` module); between them, *Jain (equal)* is over their throughputs, and every pair's latencies are tested with Welch's t-test and the Mann-Whitney U test (two-sided, samples pooled over repetitions; *significant* at p < {ALPHA} by either).\n\n"));
    out.push_str("| # | condition | tenants | Jain (vs solo) | worst slowdown p50 | equal tenants: Jain | significant pairs |\n|---|---|---:|---:|---|---|---:|\n");
    for (i, c, f) in rows {
        let worst = c
            .workloads
            .iter()
            .filter_map(|(n, t)| t.slowdown_p50.map(|s| (n, s)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(n, s)| format!("{s:.2}× ({n})"))
            .unwrap_or_else(|| "–".into());
        let equal = if f.classes.is_empty() {
            "none".to_string()
        } else {
            f.classes
                .iter()
                .map(|k| {
                    format!(
                        "{}: {}",
                        members(&k.tenants),
                        k.jain.map(|j| j.show(3)).unwrap_or_else(|| "–".into())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let pairs: usize = f.classes.iter().map(|k| k.pairs.len()).sum();
        let _ = writeln!(
            out,
            "| C{} | {} | {} | {} | {worst} | {equal} | {} |",
            i + 1,
            c.label,
            c.workloads.len(),
            f.jain_vs_solo
                .map(|j| format!("{j:.3}"))
                .unwrap_or_else(|| "–".into()),
            if pairs == 0 {
                "–".to_string()
            } else {
                format!("{} of {pairs}", f.significant_pairs())
            }
        );
    }
    out.push('\n');
    out
}

/// The solo run's summary of `workload` at `load`, if measured.
fn solo_of<'a>(a: &'a Analysis, workload: &str, load: &LoadLevel) -> Option<&'a WorkloadSummary> {
    a.cells
        .iter()
        .filter(|c| c.is_solo())
        .filter(|c| {
            c.condition
                .as_ref()
                .and_then(|k| k.loads.get(workload))
                .is_some_and(|l| l == load)
        })
        .find_map(|c| c.workloads.get(workload))
}

/// A condition's tenants: latency percentiles and slowdowns, equal tenants and their tests,
/// the drain, and the violins (written into `run_dir`; a failed plot is named in the text).
pub fn tenant_detail(out: &mut String, a: &Analysis, i: usize, run_dir: &Path) {
    let c = &a.cells[i];
    if c.workloads.is_empty() {
        return;
    }
    drain_lines(out, c);
    out.push_str("| tenant | workload | engine | latency mean ms | p50 | p90 | p95 | p99 | slowdown p50 | slowdown p99 | sampled |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, t) in &c.workloads {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.workload,
            t.engine,
            ms(t.latency.get("latency_mean")),
            ms(t.latency.get("latency_p50")),
            ms(t.latency.get("latency_p90")),
            ms(t.latency.get("latency_p95")),
            ms(t.latency.get("latency_p99")),
            if c.is_solo() {
                "solo".into()
            } else {
                ratio(t.slowdown_p50)
            },
            if c.is_solo() {
                "solo".into()
            } else {
                ratio(t.slowdown_p99)
            },
            if t.sample.is_empty() {
                "–".to_string()
            } else {
                format!("{} of {}", t.sample.len(), t.sampled_of)
            }
        );
    }
    out.push('\n');
    if let Some(f) = &c.fairness {
        fairness_detail(out, f);
    }
    match violins_of(a, i, run_dir) {
        Ok(file) => {
            let _ = writeln!(
                out,
                "Latency per tenant (each violin is the density of its requests' latencies, the bar its median; grey: the workload alone at the same load):\n\n![C{} latency per tenant]({file})\n",
                i + 1
            );
        }
        Err(why) => {
            let _ = writeln!(out, "Latency distributions: {why}.\n");
        }
    }
}

fn fairness_detail(out: &mut String, f: &Fairness) {
    if let Some(j) = f.jain_vs_solo {
        let _ = writeln!(
            out,
            "Jain's index over the tenants' fractions of solo: **{j:.3}**.\n"
        );
    }
    for k in &f.classes {
        let _ = writeln!(
            out,
            "Equal tenants {} ({}): Jain's index of their throughputs {}.\n",
            k.tenants.join(", "),
            k.shared,
            k.jain.map(|j| j.show(3)).unwrap_or_else(|| "–".into())
        );
        if k.pairs.is_empty() {
            out.push_str("No latency samples to test.\n\n");
            continue;
        }
        let mut listed: Vec<&PairTest> = k.pairs.iter().collect();
        if listed.len() > PAIRS_LISTED {
            listed.sort_by(|a, b| min_p(a).total_cmp(&min_p(b)));
            listed.truncate(PAIRS_LISTED);
            let _ = writeln!(
                out,
                "{} pairs, {} significant; the {PAIRS_LISTED} most different:\n",
                k.pairs.len(),
                k.pairs.iter().filter(|p| p.significant()).count()
            );
        }
        out.push_str("| pair | n | median ms | Welch t | p | Mann-Whitney U | p | |\n|---|---:|---:|---:|---:|---:|---:|---|\n");
        for p in listed {
            pair_row(out, p);
        }
        out.push('\n');
    }
}

fn pair_row(out: &mut String, p: &PairTest) {
    let _ = writeln!(
        out,
        "| {} vs {} | {} / {} | {:.1} / {:.1} | {} | {} | {} | {} | {} |",
        p.a,
        p.b,
        p.n.0,
        p.n.1,
        p.median_ms.0,
        p.median_ms.1,
        p.welch
            .map(|w| format!("{:.2}", w.t))
            .unwrap_or_else(|| "–".into()),
        p_value(p.welch.map(|w| w.p)),
        p.mann_whitney
            .map(|u| format!("{:.1}", u.u))
            .unwrap_or_else(|| "–".into()),
        p_value(p.mann_whitney.map(|u| u.p)),
        if p.significant() {
            "**significant**"
        } else {
            "not significant"
        }
    );
}

/// The drain after the window and the whole responses it left unfinished, where present.
fn drain_lines(out: &mut String, c: &CellSummary) {
    let drained: Vec<(&String, &WorkloadSummary)> = c
        .workloads
        .iter()
        .filter(|(_, t)| t.drain.is_some())
        .collect();
    if let Some(d) = drained.iter().filter_map(|(_, t)| t.drain).reduce(|a, b| {
        if b.waited_s > a.waited_s {
            b
        } else {
            a
        }
    }) {
        let names: Vec<&str> = drained.iter().map(|(n, _)| n.as_str()).collect();
        let _ = writeln!(
            out,
            "Drain: the run waited up to {:.1} s after the window for the whole responses of {} still in flight{}.\n",
            d.waited_s,
            names.join(", "),
            if drained.iter().any(|(_, t)| t.drain.is_some_and(|d| d.timed_out)) {
                format!(" and hit its time-out ({:.1} s): some were cut", d.timeout_s)
            } else {
                format!(" (time-out {:.1} s, not reached)", d.timeout_s)
            }
        );
    }
    let cut: Vec<String> = c
        .workloads
        .iter()
        .filter(|(_, t)| t.unfinished > 0)
        .map(|(n, t)| format!("{n} {}", t.unfinished))
        .collect();
    if !cut.is_empty() {
        let _ = writeln!(
            out,
            "Unfinished whole responses (sent before the window's end, cut by the drain's time-out: their tokens are missing, so these throughputs are underestimates): {}.\n",
            cut.join(", ")
        );
    }
}

/// Draws condition `i`'s violins (each workload's solo run first, in grey, then each of
/// its tenants) into `run_dir`: the file's name, or why there is none.
fn violins_of(a: &Analysis, i: usize, run_dir: &Path) -> Result<String, String> {
    let c = &a.cells[i];
    let mut groups: Vec<Violin> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for t in c.workloads.values() {
        if c.is_solo() || seen.contains(&t.workload.as_str()) {
            continue;
        }
        seen.push(&t.workload);
        let load = c.condition.as_ref().and_then(|k| k.loads.get(&t.workload));
        if let Some(s) = load.and_then(|l| solo_of(a, &t.workload, l)) {
            if !s.sample.is_empty() {
                groups.push(Violin {
                    label: format!("{} solo", t.workload),
                    sample: s.sample.clone(),
                    solo: true,
                });
            }
        }
    }
    for (name, t) in &c.workloads {
        if !t.sample.is_empty() {
            groups.push(Violin {
                label: name.clone(),
                sample: t.sample.clone(),
                solo: c.is_solo(),
            });
        }
    }
    if groups.is_empty() {
        return Err(
            "no latency samples were kept (results written before the lab kept them)".into(),
        );
    }
    let file = violin_file(i);
    let title = format!("C{}: request latency per tenant (ms)", i + 1);
    violins::plot(&title, &groups, &run_dir.join(&file))
        .map(|()| file)
        .map_err(|e| format!("plot failed: {e:#}"))
}
