//! `report.md` and its plots, rendered from results.json alone (so `lab report` can redo
//! it at any time): environment, the workload presets used, a headline table, the MPS
//! faults seen (a measurement taken across a fault restart is not a clean one, and the
//! report says so wherever its figures appear), the recommendation with its `colocate up`
//! file, every condition in detail (workloads, GPU counters and each engine's own
//! `/metrics` over the same window, or why an engine was not scraped), the plots, the
//! experiment file. With several tenants: the fairness between them (`report_tenants`:
//! each tenant's percentiles, slowdown and latency violins per condition), and for a
//! scaling experiment its steps (`scaling`); with controlled conditions, what the gateway's
//! SLO controller did (`report_control`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::analysis::{analyse, Analysis, Stat};
use crate::deployments;
use crate::engine_metrics::{CounterDelta, Dialect, EngineMetricsWindow, GaugeSummary};
use crate::plots;
use crate::report_control;
use crate::report_tenants;
use crate::results::{ConditionResult, Results, WindowFault, COUNTERS};
use crate::scaling;

/// The report file name inside a run folder.
pub const REPORT_FILE: &str = "report.md";
/// The recommended deployment, a runnable `colocate up` file.
pub const RECOMMENDED_FILE: &str = "recommended-deployment.toml";

/// Renders command lines of a deployment (the `deploy` crate's plan); `None` when not
/// available in this build.
pub type CommandLines<'a> = Option<&'a dyn Fn(&deploy::DeploymentSpec) -> Result<String>>;

/// What a render produced.
#[derive(Debug)]
pub struct Rendered {
    /// Path of report.md.
    pub report: PathBuf,
    /// The headline table (markdown).
    pub headline: String,
    /// One line: the recommendation.
    pub recommendation: String,
}

fn cid(i: usize) -> String {
    format!("C{}", i + 1)
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{:+.1}%", (v - 1.0) * 100.0),
        None => "–".into(),
    }
}

/// Marks a condition measured across an MPS fault, wherever its label is shown.
const FAULT_MARK: &str = "⚠ MPS fault";

/// Every MPS fault seen around the repetitions of `label`: (repetition, fault).
fn faults_of<'a>(results: &'a Results, label: &str) -> Vec<(u32, &'a WindowFault)> {
    results
        .conditions
        .iter()
        .filter(|r| r.condition.label == label)
        .flat_map(|r| r.mps_faults().iter().map(|f| (r.condition.repetition, f)))
        .collect()
}

/// The "MPS faults" section: why faulted conditions are not clean, and each fault. Empty
/// when no condition saw one.
fn faults_section(results: &Results, a: &Analysis) -> String {
    let mut rows = String::new();
    let mut touched = 0;
    for (i, c) in a.cells.iter().enumerate() {
        let faults = faults_of(results, &c.label);
        if faults.is_empty() {
            continue;
        }
        touched += 1;
        for (rep, f) in faults {
            let _ = writeln!(
                rows,
                "| {} | {} | {rep} | {} (daemon log {}) | {} | {} | {} |",
                cid(i),
                c.label,
                f.phase.describe(),
                f.log_time,
                if f.engines.is_empty() {
                    "–".to_string()
                } else {
                    f.engines.join(", ")
                },
                f.message.replace('|', "/"),
                f.action.as_deref().unwrap_or("–").replace('|', "/")
            );
        }
    }
    if touched == 0 {
        return String::new();
    }
    let mut out = String::from(
        "## MPS faults

",
    );
    let _ = writeln!(
        out,
        "{touched} condition(s) marked {FAULT_MARK} were measured across an MPS client fault. Under MPS a fault kills every client of the GPU and the supervisor restarts all of them, so those figures include dead engines and a restart: they are not clean measurements. Re-run those conditions before drawing conclusions from them. A fault seen before the warm-up counts too: the engines may still have been restarting when it began.
"
    );
    out.push_str(
        "| # | condition | rep | when | engines | fault | supervisor action |
|---|---|---:|---|---|---|---|
",
    );
    out.push_str(&rows);
    out.push('\n');
    out
}

fn lat(s: Option<&Stat>) -> String {
    s.map(|s| s.show(1)).unwrap_or_else(|| "–".into())
}

/// The headline table: one row per condition, each workload's throughput and change
/// against solo (a workload run in copies: its tenants' sum and their mean change), the
/// efficiency, Jain's index over the tenants (when the run has co-located conditions) and
/// the SLO verdict.
pub fn headline(results: &Results, a: &Analysis) -> String {
    let names: Vec<String> = results
        .experiment
        .workloads
        .iter()
        .map(|w| w.name.clone())
        .collect();
    let mut s = String::from("| # | condition |");
    for w in &names {
        let _ = write!(s, " {w} | vs solo |");
    }
    let jain = a.cells.iter().any(|c| c.fairness.is_some());
    s.push_str(if jain {
        " efficiency | Jain | SLOs |\n|---|---|"
    } else {
        " efficiency | SLOs |\n|---|---|"
    });
    for _ in &names {
        s.push_str("---:|---:|");
    }
    s.push_str(if jain {
        "---:|---:|---|\n"
    } else {
        "---:|---|\n"
    });
    for (i, c) in a.cells.iter().enumerate() {
        let mark = if faults_of(results, &c.label).is_empty() {
            String::new()
        } else {
            format!(" {FAULT_MARK}")
        };
        let _ = write!(s, "| {} | {}{mark} |", cid(i), c.label);
        for w in &names {
            match c.totals.get(w) {
                Some(ws) => {
                    let _ = write!(
                        s,
                        " {} {}{} | {} |",
                        ws.throughput.show(1),
                        ws.unit,
                        if ws.tenants > 1 {
                            format!(" ({} copies)", ws.tenants)
                        } else {
                            String::new()
                        },
                        if c.is_solo() {
                            "solo".into()
                        } else if ws.tenants > 1 {
                            format!("{} each", pct(ws.vs_solo))
                        } else {
                            pct(ws.vs_solo)
                        }
                    );
                }
                None => s.push_str(" | |"),
            }
        }
        let mut eff = c
            .efficiency
            .map(|e| e.show(2))
            .unwrap_or_else(|| "–".into());
        if jain {
            let j = c
                .fairness
                .as_ref()
                .and_then(|f| f.jain_vs_solo)
                .map(|j| format!("{j:.3}"))
                .unwrap_or_else(|| "–".into());
            eff = format!("{eff} | {j}");
        }
        let slo = if !c.failures.is_empty() && c.reps_ok == 0 {
            format!("failed: {}", c.failures[0].replace('|', "/"))
        } else if results.experiment.slo.is_empty() {
            "–".into()
        } else if c.slo_misses.is_empty() {
            "met".into()
        } else {
            format!("missed: {}", c.slo_misses.join("; "))
        };
        let _ = writeln!(s, " {eff} | {slo} |");
    }
    s
}

/// The measured repetitions of a condition.
fn measured<'a>(results: &'a Results, label: &str) -> Vec<&'a ConditionResult> {
    results
        .conditions
        .iter()
        .filter(|r| r.condition.label == label && r.failed.is_none())
        .collect()
}

/// The "Workload presets" section: which workloads ran as a seed study's client, with
/// bench's note on their figures. Empty when none did.
fn presets_section(results: &Results) -> String {
    let mut out = String::new();
    for w in &results.experiment.workloads {
        let Some(p) = w.preset else { continue };
        let recorded = results
            .conditions
            .iter()
            .find_map(|c| c.presets.get(&w.name));
        let note = recorded
            .map(|u| u.note.clone())
            .unwrap_or_else(|| "not measured yet".into());
        let _ = writeln!(out, "- `{}` ({}): preset {p}. {note}", w.name, w.engine);
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "## Workload presets

{out}
"
    )
}

/// The engines' own counters over the window (each engine's `/metrics`), beside the GPU's:
/// one row per engine, mean ± sigma over the repetitions; an engine that could not be
/// scraped says why, and the condition's other figures stand.
fn engine_metrics_table(out: &mut String, results: &Results, label: &str) {
    let reps = measured(results, label);
    let mut engines: Vec<&str> = Vec::new();
    for w in reps.iter().flat_map(|r| &r.engine_metrics) {
        if !engines.contains(&w.engine.as_str()) {
            engines.push(&w.engine);
        }
    }
    if engines.is_empty() {
        return;
    }
    out.push_str("| engine (`/metrics`) | names | requests running | requests waiting | KV cache % | prompt tok/s | prefix-cache hits % | generated tok/s | embedded seq/s |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut notes = Vec::new();
    for e in engines {
        let windows: Vec<(u32, &EngineMetricsWindow)> = reps
            .iter()
            .flat_map(|r| {
                r.engine_metrics
                    .iter()
                    .filter(move |w| w.engine == e)
                    .map(move |w| (r.condition.repetition, w))
            })
            .collect();
        let mut scraped = Vec::new();
        for (rep, w) in &windows {
            match w.not_scraped() {
                Some(why) => notes.push(format!("{e}, repetition {rep}: not scraped ({why})")),
                None => {
                    scraped.push(*w);
                    notes.extend(
                        w.notes
                            .iter()
                            .map(|n| format!("{e}, repetition {rep}: {n}")),
                    );
                }
            }
        }
        if scraped.is_empty() {
            let _ = writeln!(out, "| {e} | not scraped | – | – | – | – | – | – | – |");
            continue;
        }
        let names = match scraped.iter().find_map(|w| w.dialect) {
            Some(Dialect::Vllm) => "vLLM",
            Some(Dialect::Builtin) => "built-in",
            None => "unknown",
        };
        // (pick, scale, decimals): the KV cache in % with two decimals, a fraction of a
        // percent being common on a large GPU
        let gauge = |pick: fn(&EngineMetricsWindow) -> Option<&GaugeSummary>,
                     scale: f64,
                     decimals: usize| {
            let gs: Vec<&GaugeSummary> = scraped.iter().filter_map(|w| pick(w)).collect();
            let means: Vec<f64> = gs.iter().map(|g| g.mean * scale).collect();
            match Stat::of(&means) {
                Some(s) => format!(
                    "{} (max {:.*})",
                    s.show(decimals),
                    decimals,
                    gs.iter().map(|g| g.max * scale).fold(f64::MIN, f64::max)
                ),
                None => "–".into(),
            }
        };
        let rate = |pick: fn(&EngineMetricsWindow) -> Option<&CounterDelta>| {
            let rates: Vec<f64> = scraped
                .iter()
                .filter_map(|w| pick(w))
                .map(|c| c.per_s)
                .collect();
            Stat::of(&rates)
                .map(|s| s.show(1))
                .unwrap_or_else(|| "–".into())
        };
        let hits: Vec<f64> = scraped
            .iter()
            .filter_map(|w| w.prefix_hit_percent())
            .collect();
        let hits = Stat::of(&hits)
            .map(|s| s.show(1))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            out,
            "| {e} | {names} | {} | {} | {} | {} | {hits} | {} | {} |",
            gauge(|w| w.requests_running.as_ref(), 1.0, 1),
            gauge(|w| w.requests_waiting.as_ref(), 1.0, 1),
            gauge(|w| w.kv_cache_usage.as_ref(), 100.0, 2),
            rate(|w| w.prompt_tokens.as_ref()),
            rate(|w| w.generation_tokens.as_ref()),
            rate(|w| w.embedded_sequences.as_ref()),
        );
    }
    out.push('\n');
    for n in &notes {
        let _ = writeln!(out, "- {}", n.replace('|', "/"));
    }
    if !notes.is_empty() {
        out.push('\n');
    }
}

fn condition_detail(out: &mut String, i: usize, a: &Analysis, results: &Results, run_dir: &Path) {
    let c = &a.cells[i];
    let _ = writeln!(out, "### {} — {}\n", cid(i), c.label);
    let reps = results.experiment.repetitions;
    let _ = write!(out, "Repetitions measured: {}/{reps}", c.reps_ok);
    if let Some(e) = c.efficiency {
        let _ = write!(out, "; co-location efficiency **{}**", e.show(2));
    }
    out.push_str(".\n\n");
    for f in &c.failures {
        let _ = writeln!(out, "- failed: {f}");
    }
    if !c.failures.is_empty() {
        out.push('\n');
    }
    let faults = faults_of(results, &c.label);
    if !faults.is_empty() {
        let _ = writeln!(
            out,
            "{FAULT_MARK}: not a clean measurement ({} fault(s); see *MPS faults*):\n",
            faults.len()
        );
        for (rep, f) in faults {
            let _ = writeln!(
                out,
                "- repetition {rep}, {}: {} ({})",
                f.phase.describe(),
                f.message,
                if f.engines.is_empty() {
                    "no engine named".to_string()
                } else {
                    f.engines.join(", ")
                }
            );
        }
        out.push('\n');
    }
    let rates: Vec<String> = results
        .conditions
        .iter()
        .filter(|r| r.condition.label == c.label)
        .flat_map(|r| {
            r.resolved_rates
                .iter()
                .map(|(w, v)| format!("{w} {v:.2} req/s"))
        })
        .collect();
    if !rates.is_empty() {
        let _ = writeln!(out, "Open-loop rates used: {}.\n", rates.join(", "));
    }
    let slos: Vec<String> = crate::control_slo::recorded(results, &c.label)
        .iter()
        .map(|s| s.describe())
        .collect();
    if !slos.is_empty() {
        let _ = writeln!(
            out,
            "Controller SLO set from the solo run (`control_slo`): {}.\n",
            slos.join("; ")
        );
    }
    if c.workloads.is_empty() {
        return;
    }
    out.push_str("| workload | engine | throughput | req/s | vs solo | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | ITL p50 ms | latency p50 ms | latency p99 ms | errors |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (w, s) in &c.workloads {
        let _ = writeln!(
            out,
            "| {w} | {} | {} {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.engine,
            s.throughput.show(1),
            s.unit,
            s.requests_per_s.show(2),
            if c.is_solo() {
                "solo".into()
            } else {
                pct(s.vs_solo)
            },
            lat(s.latency.get("ttft_p50")),
            lat(s.latency.get("ttft_p99")),
            lat(s.latency.get("tpot_p50")),
            lat(s.latency.get("tpot_p99")),
            lat(s.latency.get("itl_p50")),
            lat(s.latency.get("latency_p50")),
            lat(s.latency.get("latency_p99")),
            s.errors
        );
    }
    out.push('\n');
    let mut whole: Vec<(String, String)> = Vec::new();
    for r in measured(results, &c.label) {
        for (w, u) in &r.presets {
            let item = (w.clone(), u.preset.clone());
            if !u.streamed && !whole.contains(&item) {
                whole.push(item);
            }
        }
    }
    for (w, p) in whole {
        let _ = writeln!(
            out,
            "{w} ran as preset {p}, not streamed: TTFT, TPOT and ITL are undefined (–), its latency is the whole request.\n"
        );
    }
    if c.gpu.is_empty() {
        let _ = writeln!(
            out,
            "GPU counters: unavailable ({}).\n",
            c.gpu_unavailable.as_deref().unwrap_or("not sampled")
        );
    } else {
        out.push_str("| GPU counter | mean over window |\n|---|---:|\n");
        for (key, head) in COUNTERS {
            if let Some(s) = c.gpu.get(key) {
                let _ = writeln!(out, "| {head} | {} |", s.show(1));
            }
        }
        out.push('\n');
        out.push_str(&crate::per_gpu::table(results, &c.label));
    }
    engine_metrics_table(out, results, &c.label);
    report_tenants::tenant_detail(out, a, i, run_dir);
    if !c.slo_misses.is_empty() {
        let _ = writeln!(out, "SLO misses: {}.\n", c.slo_misses.join("; "));
    }
}

/// Renders report.md, the plots and the recommended deployment into `run_dir`.
pub fn render(results: &Results, run_dir: &Path, commands: CommandLines<'_>) -> Result<Rendered> {
    let a = analyse(results);
    let exp = &results.experiment;
    let mut out = String::new();
    let _ = writeln!(out, "# {}: co-location report\n", exp.name);
    if !exp.description.is_empty() {
        let _ = writeln!(out, "{}\n", exp.description.trim());
    }
    let done = results.conditions.len();
    let planned = crate::matrix::plan(exp).len();
    let _ = writeln!(
        out,
        "Run started {}, last updated {}; {done}/{planned} conditions finished{}. Command: `{}`.\n",
        results.started_at,
        results.updated_at,
        if results.complete {
            ""
        } else {
            " (incomplete: `colocate lab run --resume` continues it)"
        },
        results.command
    );

    out.push_str("## Environment\n\n");
    let env = &results.environment;
    let _ = writeln!(out, "- host: {} ({}, {} CPUs)", env.host, env.os, env.cpus);
    let _ = writeln!(out, "- colocate {}", env.colocate_version);
    if env.gpus.is_empty() {
        let _ = writeln!(
            out,
            "- GPU: none ({})",
            env.gpu_unavailable.as_deref().unwrap_or("not detected")
        );
    }
    for g in &env.gpus {
        let _ = writeln!(
            out,
            "- GPU: {} ({}), {:.1} GiB, driver {}, CUDA {}",
            g.name,
            g.uuid,
            g.memory_bytes as f64 / (1u64 << 30) as f64,
            g.driver,
            g.cuda
        );
    }
    out.push_str(&machines_lines(results, &a));
    let _ = writeln!(
        out,
        "- windows: warm-up {}, measurement {}, {} repetition(s); experiment file `{}` (at the end)\n",
        humantime::format_duration(exp.warmup),
        humantime::format_duration(exp.duration),
        exp.repetitions,
        results.experiment_path
    );

    out.push_str(&presets_section(results));

    out.push_str("## Headline\n\n");
    out.push_str("Throughput is output tokens/s for generate workloads and sequences/s for embed workloads (mean ± sigma over repetitions). *vs solo* is the change against the same engine alone at the same offered load. Co-location efficiency = Σ over engines of co-located / solo throughput: 2.0 means each engine kept everything it had alone, 1.0 is no better than taking turns.\n\n");
    let head = headline(results, &a);
    out.push_str(&head);
    out.push('\n');
    out.push_str(&faults_section(results, &a));
    out.push_str(&report_tenants::fairness_section(&a));
    out.push_str(&crate::hypotheses::section(results, &a));

    out.push_str("## Recommendation\n\n");
    let _ = writeln!(out, "{}\n", a.recommendation.reason);
    if let Some(l) = &a.recommendation.label {
        if !faults_of(results, l).is_empty() {
            let _ = writeln!(
                out,
                "{FAULT_MARK}: the recommended condition was measured across an MPS fault (see *MPS faults*); re-run it before relying on this recommendation. Faults under MPS take every engine of the GPU down.\n"
            );
        }
    }
    let rec_cell = a
        .recommendation
        .label
        .as_ref()
        .and_then(|l| a.cells.iter().position(|c| &c.label == l));
    if let Some(i) = rec_cell {
        let cond = a.cells[i]
            .condition
            .clone()
            .context("recommended cell without condition")?;
        // the SLOs it ran with, those set from the solo run as the absolute values used
        let slos: Vec<crate::control_slo::SoloSlo> =
            crate::control_slo::recorded(results, &cond.label)
                .into_iter()
                .cloned()
                .collect();
        let mut first: Vec<crate::control_slo::SoloSlo> = Vec::new();
        for s in slos {
            if !first
                .iter()
                .any(|f| f.engine == s.engine && f.metric == s.metric)
            {
                first.push(s);
            }
        }
        let deployment = deployments::for_condition_with(exp, &cond, &first)?;
        let text = deployment
            .to_toml()
            .context("cannot write the deployment as TOML")?;
        let mut header = format!(
            "# Recommended by `colocate lab` ({}, {}): {}\n# Run it with: colocate up {RECOMMENDED_FILE}\n",
            exp.name, results.updated_at, cond.label
        );
        for s in &first {
            let _ = writeln!(header, "# {} (control_slo)", s.describe());
        }
        std::fs::write(run_dir.join(RECOMMENDED_FILE), format!("{header}{text}")).with_context(
            || format!("cannot write {}", run_dir.join(RECOMMENDED_FILE).display()),
        )?;
        let _ = writeln!(
            out,
            "Deployment ({}, run with `colocate up {RECOMMENDED_FILE}`):\n\n```toml\n{text}```\n",
            cid(i)
        );
        if let Some(cmds) = commands {
            match cmds(&deployment) {
                Ok(c) => {
                    let _ = writeln!(
                        out,
                        "Engine command lines (`colocate plan`):\n\n```\n{}\n```\n",
                        c.trim_end()
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "Engine command lines: not available ({e:#}).\n");
                }
            }
        }
    }

    out.push_str("## Plots\n\n");
    let names: Vec<String> = exp.workloads.iter().map(|w| w.name.clone()).collect();
    let mut plot_errors = Vec::new();
    match plots::throughput(&a, &names, &run_dir.join(plots::THROUGHPUT_SVG)) {
        Ok(()) => {
            let _ = writeln!(out, "Throughput per condition (grey: solo baselines):\n\n![throughput per condition]({})\n", plots::THROUGHPUT_SVG);
        }
        Err(e) => plot_errors.push(format!("throughput: {e:#}")),
    }
    match plots::tradeoff_kind(&a, &names) {
        Some(plots::Tradeoff::Pair(x, y)) => {
            match plots::tradeoff(&a, (&x, &y), &run_dir.join(plots::TRADEOFF_SVG)) {
                Ok(()) => {
                    let _ = writeln!(out, "Trade-off, each normalised to its solo throughput (points above the red line beat taking turns):\n\n![{x} vs {y}]({})\n", plots::TRADEOFF_SVG);
                }
                Err(e) => plot_errors.push(format!("trade-off: {e:#}")),
            }
        }
        Some(plots::Tradeoff::Many) => {
            match plots::tradeoff_many(&a, &run_dir.join(plots::TRADEOFF_SVG)) {
                Ok(()) => {
                    let _ = writeln!(out, "Trade-off with more than two tenants: each tenant's fraction of its solo throughput against the others' together, per co-located condition (points above the red line beat taking turns):\n\n![each tenant against the others]({})\n", plots::TRADEOFF_SVG);
                }
                Err(e) => plot_errors.push(format!("trade-off: {e:#}")),
            }
        }
        None => {}
    }
    if let Some((i, rep)) = timeline_choice(results, &a) {
        match plots::timeline(&a.cells[i], i, rep, &run_dir.join(plots::TIMELINE_SVG)) {
            Ok(()) => {
                let _ = writeln!(out, "{} over time (throughput per second and GPU counters):\n\n![{} over time]({})\n", cid(i), cid(i), plots::TIMELINE_SVG);
            }
            Err(e) => plot_errors.push(format!("timeline: {e:#}")),
        }
    }
    for e in &plot_errors {
        let _ = writeln!(out, "- plot failed: {e}");
    }
    out.push('\n');
    out.push_str(&scaling::section(&a, &names, run_dir));
    out.push_str(&report_control::section(results, &a, run_dir));

    out.push_str("## Conditions\n\n");
    if results
        .conditions
        .iter()
        .any(|c| !c.engine_metrics.is_empty())
    {
        out.push_str("Beside the GPU counters, each engine's own counters from its Prometheus `/metrics` over the same window (vLLM's names or the built-in engine's): requests running and waiting and the KV cache in use are gauges (mean over the window, and its max), prompt tokens, generated tokens and embedded sequences are counter rates; mean ± sigma over the repetitions. An engine that could not be scraped is *not scraped*, with the reason below its table.\n\n");
    }
    if report_tenants::has_samples(&a) {
        out.push_str("Each condition's tenants: request latency percentiles (E2EL for generate, the request for embed; mean over repetitions, ms), the slowdown against the tenant's workload alone at the same load, and the fairness between equal tenants (see *Fairness*); the violins are drawn from a sample of each tenant's requests (every one up to 1,000 per window).\n\n");
    }
    for i in 0..a.cells.len() {
        condition_detail(&mut out, i, &a, results, run_dir);
    }

    out.push_str("## Experiment file\n\n```toml\n");
    out.push_str(results.experiment_text.trim_end());
    out.push_str("\n```\n");

    let report = run_dir.join(REPORT_FILE);
    std::fs::write(&report, out).with_context(|| format!("cannot write {}", report.display()))?;
    std::fs::write(
        run_dir.join("analysis.json"),
        serde_json::to_vec_pretty(&a).unwrap_or_default(),
    )
    .ok();
    Ok(Rendered {
        report,
        headline: head,
        recommendation: a.recommendation.reason.clone(),
    })
}

/// The condition shown over time: `timeline_condition` (a label or `C<n>`), else the
/// recommended one, else the first co-located one measured.
fn timeline_choice<'a>(
    results: &'a Results,
    a: &Analysis,
) -> Option<(usize, &'a crate::results::ConditionResult)> {
    let wanted = results.experiment.timeline_condition.as_ref();
    let by_name = wanted.and_then(|w| {
        a.cells
            .iter()
            .enumerate()
            .position(|(i, c)| &c.label == w || &cid(i) == w)
    });
    let idx = by_name
        .or_else(|| {
            a.recommendation
                .label
                .as_ref()
                .and_then(|l| a.cells.iter().position(|c| &c.label == l))
        })
        .or_else(|| a.cells.iter().position(|c| !c.is_solo() && c.reps_ok > 0))
        .or_else(|| a.cells.iter().position(|c| c.reps_ok > 0))?;
    let label = &a.cells[idx].label;
    let rep = results
        .conditions
        .iter()
        .find(|r| &r.condition.label == label && r.failed.is_none())?;
    Some((idx, rep))
}

/// A side-by-side table of two runs: per condition label present in both, each
/// workload's throughput and the efficiency.
pub fn compare(a: &Results, b: &Results) -> String {
    let aa = analyse(a);
    let bb = analyse(b);
    let mut s = format!(
        "| condition | workload | {} | {} | change |\n|---|---|---:|---:|---:|\n",
        a.experiment.name, b.experiment.name
    );
    let mut only = Vec::new();
    for ca in &aa.cells {
        let Some(cb) = bb.cells.iter().find(|c| c.label == ca.label) else {
            only.push(format!("only in {}: {}", a.experiment.name, ca.label));
            continue;
        };
        for (w, wa) in &ca.workloads {
            let Some(wb) = cb.workloads.get(w) else {
                continue;
            };
            let ch = if wa.throughput.mean > 0.0 {
                format!(
                    "{:+.1}%",
                    (wb.throughput.mean / wa.throughput.mean - 1.0) * 100.0
                )
            } else {
                "–".into()
            };
            let _ = writeln!(
                s,
                "| {} | {w} | {} {} | {} {} | {ch} |",
                ca.label,
                wa.throughput.show(1),
                wa.unit,
                wb.throughput.show(1),
                wb.unit
            );
        }
        if let (Some(ea), Some(eb)) = (ca.efficiency, cb.efficiency) {
            let _ = writeln!(
                s,
                "| {} | efficiency | {} | {} | {:+.2} |",
                ca.label,
                ea.show(2),
                eb.show(2),
                eb.mean - ea.mean
            );
        }
    }
    for cb in &bb.cells {
        if !aa.cells.iter().any(|c| c.label == cb.label) {
            only.push(format!("only in {}: {}", b.experiment.name, cb.label));
        }
    }
    for o in only {
        let _ = writeln!(s, "\n{o}");
    }
    s
}

/// Which machine measured which conditions, when a resumed run spans several (the GPUs'
/// UUIDs each condition recorded): *vs solo* then may compare rows of two machines. Empty
/// when every condition was measured on one machine, or none recorded it.
pub(crate) fn machines_lines(results: &Results, a: &Analysis) -> String {
    // by the report's numbering: the cells, in plan order
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, cell) in a.cells.iter().enumerate() {
        for c in results
            .conditions
            .iter()
            .filter(|c| c.condition.label == cell.label && c.failed.is_none())
        {
            let key = c.gpu_uuids.join(", ");
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) if !v.contains(&(i + 1)) => v.push(i + 1),
                Some(_) => {}
                None => groups.push((key, vec![i + 1])),
            }
        }
    }
    if groups.len() < 2 {
        return String::new();
    }
    let mut out = String::from(
        "- **measured on more than one machine** (a resumed run): *vs solo* compares rows of different GPUs where a condition and its baseline differ here\n",
    );
    for (key, rows) in groups {
        let rows: Vec<String> = rows.iter().map(|r| format!("C{r}")).collect();
        let on = if key.is_empty() {
            "a GPU not recorded (results written before the lab recorded it)".to_string()
        } else {
            key
        };
        let _ = writeln!(out, "  - {}: {on}", rows.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run resumed on another machine says which rows came from which GPU; one machine
    /// (or none recorded) says nothing.
    #[test]
    fn rows_of_two_machines_are_named() {
        let mut r = synthetic();
        let lines = |r: &Results| machines_lines(r, &crate::analysis::analyse(r));
        assert_eq!(lines(&r), "");
        for c in r.conditions.iter_mut() {
            c.gpu_uuids = vec!["GPU-a".into()];
        }
        assert_eq!(lines(&r), "");
        // the last cell's records on another GPU, the first's not recorded
        let cells = crate::analysis::analyse(&r).cells;
        let (first, last) = (cells[0].label.clone(), cells[cells.len() - 1].label.clone());
        for c in r.conditions.iter_mut() {
            if c.condition.label == last {
                c.gpu_uuids = vec!["GPU-b".into()];
            } else if c.condition.label == first {
                c.gpu_uuids.clear();
            }
        }
        let n = cells.len();
        // a retried condition is recorded last whatever its place in the plan: the lines
        // number rows as the report does
        let k = r
            .conditions
            .iter()
            .position(|c| c.condition.label == last)
            .unwrap();
        let moved = r.conditions.remove(k);
        r.conditions.insert(0, moved);
        let text = lines(&r);
        assert!(text.contains("more than one machine"), "{text}");
        assert!(text.contains(&format!("C{n}: GPU-b")), "{text}");
        assert!(text.contains("C1: a GPU not recorded"), "{text}");
        assert!(text.contains("C2, "), "{text}");
    }
    use crate::matrix::{plan, ConditionSharing};
    use crate::results::{
        host_environment, ConditionResult, CounterStat, GpuWindow, WorkloadMetrics, SCHEMA_VERSION,
    };
    use crate::spec::{Experiment, Kind};
    use std::collections::BTreeMap;

    const EXP: &str = r#"
name = "r"
warmup = "0s"
duration = "2s"
repetitions = 2
[deployment]
[[deployment.engines]]
name = "gen"
kind = "builtin"
model = "preset:qwen3-tiny"
port = 18100
[[deployment.engines]]
name = "emb"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "embed"
port = 18200
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
[axes]
sharing = ["timeslice", "mps"]
mps_default = false
mps_split = [[50, 50]]
[slo.chat]
ttft_p99 = "100ms"
"#;

    /// Synthetic results: mps keeps more than timeslice; timeslice misses the TTFT SLO.
    fn synthetic() -> Results {
        let exp = Experiment::parse(EXP).unwrap();
        let mut conditions = Vec::new();
        for (k, c) in plan(&exp).into_iter().enumerate() {
            let jitter = if c.repetition == 1 { 1.0 } else { 1.02 };
            let (fg, fe, ttft) = match c.sharing {
                ConditionSharing::Solo => (1.0, 1.0, 50.0),
                ConditionSharing::Shared(deploy::Sharing::Timeslice) => (0.6, 0.5, 150.0),
                ConditionSharing::Shared(_) => (0.9, 0.7, 80.0),
            };
            let mut workloads = BTreeMap::new();
            for w in c.loads.keys() {
                let (kind, engine, base) = if w == "chat" {
                    (Kind::Generate, "gen", 1000.0 * fg)
                } else {
                    (Kind::Embed, "emb", 200.0 * fe)
                };
                let t0 = 1000.0 + k as f64 * 10.0;
                workloads.insert(
                    w.clone(),
                    WorkloadMetrics {
                        kind: Some(kind),
                        engine: engine.into(),
                        throughput: base * jitter,
                        requests_per_s: base / 100.0,
                        completed: 10,
                        ttft_ms: (kind == Kind::Generate).then_some(crate::results::Percentiles {
                            mean: ttft,
                            p50: ttft,
                            p90: ttft,
                            p95: ttft,
                            p99: ttft,
                        }),
                        latency_ms: Some(crate::results::Percentiles {
                            mean: 200.0,
                            p50: 200.0,
                            p90: 250.0,
                            p95: 260.0,
                            p99: 300.0,
                        }),
                        timeseries: vec![(t0, base), (t0 + 1.0, base * 0.9)],
                        ..Default::default()
                    },
                );
            }
            let mut counters = BTreeMap::new();
            counters.insert(
                "sm_active".to_string(),
                CounterStat {
                    mean: 40.0,
                    p50: 41.0,
                    max: 60.0,
                },
            );
            let samples = vec![(
                1000.0 + k as f64 * 10.0,
                BTreeMap::from([("sm_active".to_string(), 40.0)]),
            )];
            conditions.push(ConditionResult {
                condition: c,
                failed: None,
                window: Some((1000.0 + k as f64 * 10.0, 1002.0 + k as f64 * 10.0)),
                resolved_rates: BTreeMap::new(),
                workloads,
                gpu: GpuWindow {
                    available: true,
                    reason: None,
                    counters,
                    samples,
                    ..Default::default()
                },
                engine_metrics: Vec::new(),
                presets: BTreeMap::new(),
                gateway: None,
                gpu_uuids: Vec::new(),
                control_slo: Vec::new(),
            });
        }
        Results {
            schema_version: SCHEMA_VERSION,
            experiment: exp,
            experiment_text: EXP.into(),
            experiment_path: "r.toml".into(),
            environment: host_environment(),
            started_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:01:00Z".into(),
            complete: true,
            command: "colocate lab run r.toml".into(),
            conditions,
            superseded: Vec::new(),
        }
    }

    #[test]
    fn renders_tables_plots_and_recommendation() {
        let results = synthetic();
        let dir = tempfile::tempdir().unwrap();
        let cmds = |d: &deploy::DeploymentSpec| -> Result<String> {
            Ok(format!("{} engines", d.engines.len()))
        };
        let r = render(&results, dir.path(), Some(&cmds)).unwrap();
        let md = std::fs::read_to_string(&r.report).unwrap();
        for needle in [
            "## Environment",
            "## Headline",
            "## Recommendation",
            "## Conditions",
            "| # | condition |",
            "TTFT p99 ms",
            "SM active %",
            "throughput.svg",
            "tradeoff.svg",
            "timeline.svg",
            "```toml",
            "2 engines",
        ] {
            assert!(md.contains(needle), "missing {needle} in\n{md}");
        }
        // mps 50/50 keeps 0.9 + 0.7 = 1.6 (mean over reps, solo is also jittered); timeslice misses the SLO
        assert!(
            r.recommendation.contains("mps sm 50/50"),
            "{}",
            r.recommendation
        );
        assert!(
            r.headline
                .contains("missed: chat ttft_p99 150.0 ms > 100.0 ms"),
            "{}",
            r.headline
        );
        assert!(r.headline.contains("1.60"), "{}", r.headline);
        for f in ["throughput.svg", "tradeoff.svg", "timeline.svg"] {
            let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}");
            assert!(svg.len() > 1000, "{f} is nearly empty");
        }
        let rec = std::fs::read_to_string(dir.path().join(RECOMMENDED_FILE)).unwrap();
        let t: toml::Table = toml::from_str(&rec).unwrap();
        assert_eq!(t["sharing"].as_str(), Some("mps"));
        assert_eq!(
            t["engines"].as_array().unwrap()[0]["sm_percent"].as_integer(),
            Some(50)
        );
    }

    #[test]
    fn a_condition_measured_across_an_mps_fault_is_marked() {
        use crate::results::{FaultPhase, WindowFault};
        let mut results = synthetic();
        let dir = tempfile::tempdir().unwrap();
        let clean = render(&results, dir.path(), None).unwrap();
        let md = std::fs::read_to_string(&clean.report).unwrap();
        assert!(!md.contains(FAULT_MARK), "{md}");
        assert!(!md.contains("## MPS faults"));

        let faulted = results
            .conditions
            .iter_mut()
            .find(|c| {
                c.condition.sharing.deployed() == deploy::Sharing::Mps
                    && c.condition.repetition == 2
            })
            .unwrap();
        let label = faulted.condition.label.clone();
        faulted.gpu.mps_faults.push(WindowFault {
            t: 1001.0,
            log_time: "2026-11-23 20:10:31.616".into(),
            phase: FaultPhase::Window,
            engines: vec!["gen".into(), "emb".into()],
            message: "sticky error set on client process 563, 562 (MPS server 597)".into(),
            action: Some("every engine of the GPU (gen, emb) restarted".into()),
        });
        assert!(faulted.fault_touched());
        // It survives results.json.
        let text = serde_json::to_string(&results).unwrap();
        let back: Results = serde_json::from_str(&text).unwrap();
        assert_eq!(back, results);

        let r = render(&results, dir.path(), None).unwrap();
        let md = std::fs::read_to_string(&r.report).unwrap();
        let row = r
            .headline
            .lines()
            .find(|l| l.contains(&label))
            .unwrap()
            .to_string();
        assert!(row.contains(FAULT_MARK), "{}", r.headline);
        assert_eq!(r.headline.matches(FAULT_MARK).count(), 1, "{}", r.headline);
        for needle in [
            "## MPS faults",
            "not clean measurements",
            "| 2 | in the window (daemon log 2026-11-23 20:10:31.616) | gen, emb | sticky error set on client process 563, 562 (MPS server 597) | every engine of the GPU (gen, emb) restarted |",
            "not a clean measurement (1 fault(s)",
            "- repetition 2, in the window: sticky error set",
            // mps 50/50 is still the recommendation: the report warns about it
            "the recommended condition was measured across an MPS fault",
        ] {
            assert!(md.contains(needle), "missing {needle} in\n{md}");
        }
    }

    /// Each engine's `/metrics` beside the GPU counters, over the repetitions; an engine
    /// that was not scraped says why; a workload sent whole says what it lacks.
    #[test]
    fn engine_metrics_and_presets_are_shown() {
        use crate::engine_metrics::{CounterDelta, Dialect, EngineMetricsWindow, GaugeSummary};
        use crate::results::PresetUse;
        use crate::spec::Preset;
        let mut results = synthetic();
        results.experiment.workloads[0].preset = Some(Preset::SeedGen);
        let gauge = |metric: &str, mean: f64, max: f64| GaugeSummary {
            metric: metric.into(),
            start: mean,
            end: mean,
            mean,
            max,
        };
        let counter = |metric: &str, per_s: f64| CounterDelta {
            metric: metric.into(),
            increase: per_s * 2.0,
            per_s,
        };
        for c in &mut results.conditions {
            let rep = c.condition.repetition as f64;
            let mps = c.condition.sharing.deployed() == deploy::Sharing::Mps;
            for e in c.condition.engines.clone() {
                let w = if e == "gen" {
                    EngineMetricsWindow {
                        engine: e,
                        url: "http://127.0.0.1:18100".into(),
                        dialect: Some(Dialect::Builtin),
                        samples: 3,
                        span_s: 2.0,
                        requests_running: Some(gauge("colocate:num_requests_running", 3.0, 4.0)),
                        requests_waiting: Some(gauge("colocate:num_requests_waiting", 0.0, 1.0)),
                        kv_cache_usage: Some(gauge("colocate:kv_cache_usage_perc", 0.5, 0.75)),
                        generation_tokens: Some(counter(
                            "colocate:generation_tokens_total",
                            100.0 * rep,
                        )),
                        // 25% of the prompt tokens looked up were cached
                        prefix_cache_queries: Some(counter(
                            "colocate:prefix_cache_queries_total",
                            400.0,
                        )),
                        prefix_cache_hits: Some(counter("colocate:prefix_cache_hits_total", 100.0)),
                        ..Default::default()
                    }
                } else if mps || rep == 2.0 {
                    EngineMetricsWindow::unscraped(
                        &e,
                        "http://127.0.0.1:18200",
                        "http://127.0.0.1:18200/metrics: HTTP 404 Not Found".into(),
                    )
                } else {
                    EngineMetricsWindow {
                        engine: e,
                        url: "http://127.0.0.1:18200".into(),
                        dialect: Some(Dialect::Builtin),
                        samples: 2,
                        span_s: 2.0,
                        embedded_sequences: Some(counter(
                            "colocate:embedding_sequences_total",
                            20.0,
                        )),
                        ..Default::default()
                    }
                };
                c.engine_metrics.push(w);
            }
            if c.workloads.contains_key("chat") {
                c.presets.insert(
                    "chat".into(),
                    PresetUse {
                        preset: "seed-gen".into(),
                        streamed: false,
                        note: "seed-gen: the seeds' generator client, not streamed".into(),
                    },
                );
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let r = render(&results, dir.path(), None).unwrap();
        let md = std::fs::read_to_string(&r.report).unwrap();
        for needle in [
            "## Workload presets\n\n- `chat` (gen): preset seed-gen. seed-gen: the seeds' generator client, not streamed\n",
            "chat ran as preset seed-gen, not streamed: TTFT, TPOT and ITL are undefined",
            "each engine's own counters from its Prometheus `/metrics`",
            "| engine (`/metrics`) | names | requests running |",
            // two repetitions at 100 and 200 generated tok/s
            "| gen | built-in | 3.0 ± 0.0 (max 4.0) | 0.0 ± 0.0 (max 1.0) | 50.00 ± 0.00 (max 75.00) | – | 25.0 ± 0.0 | 150.0 ± 70.7 | – |",
            // scraped in one repetition of the time-sliced condition
            "| emb | built-in | – | – | – | – | – | – | 20.0 |",
            "- emb, repetition 2: not scraped (http://127.0.0.1:18200/metrics: HTTP 404 Not Found)",
            // never under MPS: the row says so, the condition stands
            "| emb | not scraped | – | – | – | – | – | – | – |",
        ] {
            assert!(md.contains(needle), "missing {needle} in\n{md}");
        }
        assert!(
            r.recommendation.contains("mps sm 50/50"),
            "{}",
            r.recommendation
        );
        // a report of results written before engines were scraped has no such table
        let plain = render(&synthetic(), dir.path(), None).unwrap();
        let md = std::fs::read_to_string(&plain.report).unwrap();
        assert!(!md.contains("engine (`/metrics`)") && !md.contains("## Workload presets"));
    }

    #[test]
    fn compare_two_runs() {
        let a = synthetic();
        let mut b = synthetic();
        b.experiment.name = "r2".into();
        for c in &mut b.conditions {
            for m in c.workloads.values_mut() {
                m.throughput *= 1.1;
            }
        }
        let t = compare(&a, &b);
        assert!(t.contains("| r | r2 | change |"), "{t}");
        assert!(t.contains("+10.0%"), "{t}");
    }
}
