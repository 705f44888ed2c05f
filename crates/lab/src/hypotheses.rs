//! The verdict on the seeds' hypotheses for a multi-GPU study (issue 19;
//! `gen-embed-mps-colocation-h200.txt` §4): with tensor parallelism across two GPUs, both
//! engines sharing each GPU, the seeds expect
//!
//! 1. higher gen throughput (more bandwidth per model shard),
//! 2. more memory for the KV cache,
//! 3. lower power per GPU (the work split over two GPUs),
//! 4. lower co-location interference.
//!
//! Each co-located condition is judged against the study's baseline (the condition marked
//! `baseline = true`, e.g. gen on GPU 0 beside embed on GPU 1), from the results alone:
//!
//! 1. each generate workload's throughput (its tenants together);
//! 2. the generating engine's KV capacity as `up` planned it (`per_gpu::EnginePlacement::kv_tokens`,
//!    its budget over the KV bytes each GPU holds per token), else the share of its KV cache
//!    in use at the same offered load (its `/metrics` gauge; less in use is more room);
//! 3. the mean over the deployment's GPUs of each GPU's mean power;
//! 4. each workload's loss against its own engine alone on the same GPUs (1 − *vs solo*):
//!    in the baseline each engine has a GPU of its own, so its loss there is the floor.
//!
//! A change counts when it exceeds both 2% of the baseline (2 points for shares) and twice
//! its standard error over the repetitions; otherwise the verdict is *no clear change*. A
//! figure missing on either side gives *data missing*, with what is missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::analysis::{Analysis, CellSummary, Stat};
use crate::results::{ConditionResult, Results};
use crate::spec::Kind;

/// One of the seeds' four hypotheses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Hypothesis {
    GenThroughput,
    KvRoom,
    PowerPerGpu,
    Interference,
}

impl Hypothesis {
    /// All four, in the seeds' order.
    pub const ALL: [Hypothesis; 4] = [
        Hypothesis::GenThroughput,
        Hypothesis::KvRoom,
        Hypothesis::PowerPerGpu,
        Hypothesis::Interference,
    ];

    /// The hypothesis in words.
    pub fn words(self) -> &'static str {
        match self {
            Hypothesis::GenThroughput => "more gen throughput",
            Hypothesis::KvRoom => "more KV cache room",
            Hypothesis::PowerPerGpu => "lower power per GPU",
            Hypothesis::Interference => "less interference",
        }
    }
}

/// What the data says about one hypothesis in one condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Holds,
    DoesNotHold,
    /// The change is within the noise (or under 2%).
    NoClearChange,
    /// A figure is missing on either side.
    Missing,
}

impl Verdict {
    /// The verdict in words.
    pub fn words(self) -> &'static str {
        match self {
            Verdict::Holds => "holds",
            Verdict::DoesNotHold => "does not hold",
            Verdict::NoClearChange => "no clear change",
            Verdict::Missing => "data missing",
        }
    }

    /// Several parts of one hypothesis (e.g. each tenant): any part against it decides;
    /// else any part missing; else holds only when every part holds.
    fn combine(parts: &[Verdict]) -> Verdict {
        if parts.is_empty() {
            Verdict::Missing
        } else if parts.contains(&Verdict::DoesNotHold) {
            Verdict::DoesNotHold
        } else if parts.contains(&Verdict::Missing) {
            Verdict::Missing
        } else if parts.iter().all(|v| *v == Verdict::Holds) {
            Verdict::Holds
        } else {
            Verdict::NoClearChange
        }
    }
}

/// One hypothesis in one condition: the verdict and the figures behind it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub hypothesis: Hypothesis,
    pub verdict: Verdict,
    pub evidence: String,
}

/// Every hypothesis in one condition.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionVerdicts {
    /// The condition's label.
    pub label: String,
    /// Its `C<n>` in the report.
    pub index: usize,
    pub findings: Vec<Finding>,
}

/// The judgement of a study: its baseline and each co-located condition's verdicts.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    /// The baseline's label, when one is marked.
    pub baseline: Option<String>,
    /// Why nothing could be judged, when nothing could.
    pub missing: Option<String>,
    pub conditions: Vec<ConditionVerdicts>,
}

/// Which way a figure moved against the baseline, beyond the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Up,
    Down,
    Flat,
}

/// Whether `c` differs from `b` by more than `floor` (absolute) and twice the standard
/// error of the difference of the means.
fn change(c: Stat, b: Stat, floor: f64) -> Change {
    let d = c.mean - b.mean;
    let se = (c.sigma.powi(2) / c.n.max(1) as f64 + b.sigma.powi(2) / b.n.max(1) as f64).sqrt();
    if d.abs() <= floor.max(2.0 * se) {
        Change::Flat
    } else if d > 0.0 {
        Change::Up
    } else {
        Change::Down
    }
}

/// `+12.3%` of `b`.
fn rel(c: f64, b: f64) -> String {
    if b.abs() < 1e-12 {
        return "–".into();
    }
    format!("{:+.1}%", (c / b - 1.0) * 100.0)
}

/// The measured repetitions of a condition.
fn reps<'a>(results: &'a Results, label: &str) -> Vec<&'a ConditionResult> {
    results
        .conditions
        .iter()
        .filter(|r| r.condition.label == label && r.failed.is_none())
        .collect()
}

/// Engines that serve a generate workload.
fn gen_engines(results: &Results) -> Vec<String> {
    let mut v: Vec<String> = results
        .experiment
        .workloads
        .iter()
        .filter(|w| w.kind == Kind::Generate)
        .map(|w| w.engine.clone())
        .collect();
    v.dedup();
    v
}

fn gen_throughput(results: &Results, c: &CellSummary, b: &CellSummary) -> Finding {
    let mut parts = Vec::new();
    let mut words = Vec::new();
    for w in results
        .experiment
        .workloads
        .iter()
        .filter(|w| w.kind == Kind::Generate)
    {
        match (c.totals.get(&w.name), b.totals.get(&w.name)) {
            (Some(ct), Some(bt)) if ct.throughput.n > 0 && bt.throughput.n > 0 => {
                let (cs, bs) = (ct.throughput, bt.throughput);
                parts.push(match change(cs, bs, 0.02 * bs.mean.abs()) {
                    Change::Up => Verdict::Holds,
                    Change::Down => Verdict::DoesNotHold,
                    Change::Flat => Verdict::NoClearChange,
                });
                words.push(format!(
                    "{} {} vs {} {} ({})",
                    w.name,
                    cs.show(0),
                    bs.show(0),
                    ct.unit,
                    rel(cs.mean, bs.mean)
                ));
            }
            _ => {
                parts.push(Verdict::Missing);
                words.push(format!("{}: not measured in both", w.name));
            }
        }
    }
    if parts.is_empty() {
        words.push("no generate workload".into());
    }
    Finding {
        hypothesis: Hypothesis::GenThroughput,
        verdict: Verdict::combine(&parts),
        evidence: words.join("; "),
    }
}

/// The KV tokens an engine's replicas hold together, as planned (mean over repetitions).
fn kv_tokens(reps: &[&ConditionResult], engine: &str) -> Option<f64> {
    let v: Vec<f64> = reps
        .iter()
        .filter_map(|r| {
            let mine: Vec<Option<u64>> = r
                .gpu
                .placement
                .iter()
                .filter(|p| p.engine == engine)
                .map(|p| p.kv_tokens)
                .collect();
            if mine.is_empty() {
                return None;
            }
            mine.into_iter()
                .collect::<Option<Vec<u64>>>()
                .map(|k| k.iter().sum::<u64>() as f64)
        })
        .collect();
    Stat::of(&v).map(|s| s.mean)
}

/// The share of an engine's KV cache in use over the window (its replicas' mean), over
/// repetitions.
fn kv_in_use(reps: &[&ConditionResult], engine: &str) -> Option<Stat> {
    let v: Vec<f64> = reps
        .iter()
        .filter_map(|r| {
            let u: Vec<f64> = r
                .engine_metrics
                .iter()
                .filter(|m| {
                    m.engine == engine
                        || m.engine
                            .strip_prefix(engine)
                            .is_some_and(|rest| rest.starts_with('-'))
                })
                .filter_map(|m| m.kv_cache_usage.as_ref().map(|g| g.mean))
                .collect();
            (!u.is_empty()).then(|| u.iter().sum::<f64>() / u.len() as f64)
        })
        .collect();
    Stat::of(&v)
}

/// Whether the two conditions offer `engine`'s workloads the same load.
fn same_load(results: &Results, c: &ConditionResult, b: &ConditionResult, engine: &str) -> bool {
    results
        .experiment
        .workloads
        .iter()
        .filter(|w| w.engine == engine)
        .all(|w| c.condition.loads.get(&w.name) == b.condition.loads.get(&w.name))
}

fn tokens(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else {
        format!("{:.0}k", n / 1e3)
    }
}

fn kv_room(results: &Results, c: &[&ConditionResult], b: &[&ConditionResult]) -> Finding {
    let mut parts = Vec::new();
    let mut words = Vec::new();
    for e in gen_engines(results) {
        let use_c = kv_in_use(c, &e);
        let use_b = kv_in_use(b, &e);
        let comparable = match (c.first(), b.first()) {
            (Some(x), Some(y)) => same_load(results, x, y, &e),
            _ => false,
        };
        let in_use = match (use_c, use_b) {
            (Some(uc), Some(ub)) => Some((
                uc,
                ub,
                format!(
                    "KV in use {:.0}% vs {:.0}%{}",
                    uc.mean * 100.0,
                    ub.mean * 100.0,
                    if comparable {
                        " at the same load"
                    } else {
                        " (at different loads)"
                    }
                ),
            )),
            _ => None,
        };
        match (kv_tokens(c, &e), kv_tokens(b, &e)) {
            (Some(kc), Some(kb)) if kb > 0.0 => {
                let ratio = kc / kb;
                parts.push(if ratio > 1.02 {
                    Verdict::Holds
                } else if ratio < 0.98 {
                    Verdict::DoesNotHold
                } else {
                    Verdict::NoClearChange
                });
                let mut w = format!(
                    "{e}: KV capacity {} vs {} tokens ({ratio:.2}x, planned from its budget)",
                    tokens(kc),
                    tokens(kb)
                );
                if let Some((_, _, u)) = &in_use {
                    let _ = write!(w, "; {u}");
                }
                words.push(w);
            }
            _ => match in_use {
                Some((uc, ub, u)) if comparable => {
                    parts.push(match change(uc, ub, 0.02) {
                        Change::Down => Verdict::Holds,
                        Change::Up => Verdict::DoesNotHold,
                        Change::Flat => Verdict::NoClearChange,
                    });
                    words.push(format!(
                        "{e}: {u} (no planned capacity: the engine's default budget or an unknown model)"
                    ));
                }
                _ => {
                    parts.push(Verdict::Missing);
                    words.push(format!("{e}: neither a planned KV capacity in both conditions nor its /metrics KV gauge at the same load"));
                }
            },
        }
    }
    if words.is_empty() {
        words.push("no generating engine".into());
    }
    Finding {
        hypothesis: Hypothesis::KvRoom,
        verdict: Verdict::combine(&parts),
        evidence: words.join("; "),
    }
}

fn power(c: &[&ConditionResult], b: &[&ConditionResult]) -> Finding {
    let of = |reps: &[&ConditionResult]| {
        crate::per_gpu::power_per_gpu(reps).and_then(|(v, g)| Stat::of(&v).map(|s| (s, g)))
    };
    let gpus = |g: &BTreeMap<u32, f64>| {
        g.iter()
            .map(|(k, w)| format!("GPU {k} {w:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (of(c), of(b)) {
        (Some((cs, cg)), Some((bs, bg))) => Finding {
            hypothesis: Hypothesis::PowerPerGpu,
            verdict: match change(cs, bs, 0.02 * bs.mean.abs()) {
                Change::Down => Verdict::Holds,
                Change::Up => Verdict::DoesNotHold,
                Change::Flat => Verdict::NoClearChange,
            },
            evidence: format!(
                "{} W per GPU ({}) vs {} W ({}) ({})",
                cs.show(0),
                gpus(&cg),
                bs.show(0),
                gpus(&bg),
                rel(cs.mean, bs.mean)
            ),
        },
        (c, b) => Finding {
            hypothesis: Hypothesis::PowerPerGpu,
            verdict: Verdict::Missing,
            evidence: format!(
                "no per-GPU power in {} (GPU counters unavailable, or results from before the lab measured every GPU)",
                match (c.is_none(), b.is_none()) {
                    (true, true) => "either condition",
                    (true, false) => "this condition",
                    _ => "the baseline",
                }
            ),
        },
    }
}

fn interference(c: &CellSummary, b: &CellSummary) -> Finding {
    let mut parts = Vec::new();
    let mut words = Vec::new();
    for (w, ct) in &c.totals {
        let bt = b.totals.get(w);
        match (ct.vs_solo, bt.and_then(|t| t.vs_solo)) {
            (Some(cv), Some(bv)) => {
                let (lc, lb) = (1.0 - cv, 1.0 - bv);
                parts.push(if lc < lb - 0.02 {
                    Verdict::Holds
                } else if lc > lb + 0.02 {
                    Verdict::DoesNotHold
                } else {
                    Verdict::NoClearChange
                });
                words.push(format!(
                    "{w} lost {:.1}% vs {:.1}% of its solo throughput",
                    lc * 100.0,
                    lb * 100.0
                ));
            }
            _ => {
                parts.push(Verdict::Missing);
                words.push(format!(
                    "{w}: no solo baseline on the same GPUs in {}",
                    if ct.vs_solo.is_none() {
                        "this condition"
                    } else {
                        "the baseline"
                    }
                ));
            }
        }
    }
    if words.is_empty() {
        words.push("no workload measured".into());
    }
    Finding {
        hypothesis: Hypothesis::Interference,
        verdict: Verdict::combine(&parts),
        evidence: words.join("; "),
    }
}

/// Judges every co-located condition against the baseline; `None` when the study marks
/// no baseline and names no layouts (not a multi-GPU study: the report says nothing).
pub fn judge(results: &Results, a: &Analysis) -> Option<Judgement> {
    let exp = &results.experiment;
    let marked = a
        .cells
        .iter()
        .find(|c| c.condition.as_ref().is_some_and(|c| c.baseline))
        .map(|c| c.label.clone())
        .or_else(|| {
            // not yet measured: the plan says which it is
            crate::matrix::plan(exp)
                .into_iter()
                .find(|c| c.baseline)
                .map(|c| c.label)
        });
    if marked.is_none() && !crate::layout::uses_layouts(exp) {
        return None;
    }
    let Some(base_label) = marked else {
        return Some(Judgement {
            baseline: None,
            missing: Some("no condition is marked `baseline = true`: there is nothing to judge the hypotheses against".into()),
            conditions: Vec::new(),
        });
    };
    let base_cell = a.cells.iter().find(|c| c.label == base_label);
    let base_reps = reps(results, &base_label);
    let Some(base_cell) = base_cell.filter(|_| !base_reps.is_empty()) else {
        return Some(Judgement {
            baseline: Some(base_label),
            missing: Some(
                "the baseline has no measured repetition yet: every verdict waits for it".into(),
            ),
            conditions: Vec::new(),
        });
    };
    let mut conditions = Vec::new();
    for (i, c) in a.cells.iter().enumerate() {
        if c.is_solo() || c.label == base_label {
            continue;
        }
        let cr = reps(results, &c.label);
        let findings = if cr.is_empty() {
            Hypothesis::ALL
                .iter()
                .map(|h| Finding {
                    hypothesis: *h,
                    verdict: Verdict::Missing,
                    evidence: "no measured repetition".into(),
                })
                .collect()
        } else {
            vec![
                gen_throughput(results, c, base_cell),
                kv_room(results, &cr, &base_reps),
                power(&cr, &base_reps),
                interference(c, base_cell),
            ]
        };
        conditions.push(ConditionVerdicts {
            label: c.label.clone(),
            index: i,
            findings,
        });
    }
    Some(Judgement {
        baseline: Some(base_label),
        missing: None,
        conditions,
    })
}

/// The report's section: each condition's verdicts with their figures, and per hypothesis
/// where it holds. Empty for a study that is not multi-GPU (no baseline, no layouts).
pub fn section(results: &Results, a: &Analysis) -> String {
    let Some(j) = judge(results, a) else {
        return String::new();
    };
    let mut out = String::from("## Hypotheses\n\n");
    out.push_str("The seeds' hypotheses for tensor parallelism across GPUs (`gen-embed-mps-colocation-h200.txt` §4): more gen throughput, more KV cache room, lower power per GPU, less interference; each co-located condition against the baseline. Gen throughput: each generate workload's. KV room: the generating engine's KV capacity as planned from its budget (else the share of its KV cache in use at the same load). Power: the mean over the deployment's GPUs of each GPU's mean power. Interference: each workload's loss against its engine alone on the same GPUs. A change counts when it exceeds 2% of the baseline (2 points for shares) and twice its standard error over repetitions.\n\n");
    if let Some(b) = &j.baseline {
        let _ = writeln!(out, "Baseline: `{b}`.\n");
    }
    if let Some(m) = &j.missing {
        let _ = writeln!(out, "**Data missing**: {m}.\n");
        return out;
    }
    if j.conditions.is_empty() {
        out.push_str(
            "**Data missing**: no co-located condition besides the baseline was measured.\n\n",
        );
        return out;
    }
    out.push_str("| condition |");
    for h in Hypothesis::ALL {
        let _ = write!(out, " {} |", h.words());
    }
    out.push_str("\n|---|---|---|---|---|\n");
    for c in &j.conditions {
        let _ = write!(out, "| C{} |", c.index + 1);
        for f in &c.findings {
            let _ = write!(out, " **{}**: {} |", f.verdict.words(), f.evidence);
        }
        out.push('\n');
    }
    out.push('\n');
    for h in Hypothesis::ALL {
        let mut by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for c in &j.conditions {
            if let Some(f) = c.findings.iter().find(|f| f.hypothesis == h) {
                by.entry(f.verdict.words())
                    .or_default()
                    .push(format!("C{}", c.index + 1));
            }
        }
        let parts: Vec<String> = [
            Verdict::Holds,
            Verdict::DoesNotHold,
            Verdict::NoClearChange,
            Verdict::Missing,
        ]
        .iter()
        .filter_map(|v| {
            by.get(v.words())
                .map(|cs| format!("{} in {}", v.words(), cs.join(", ")))
        })
        .collect();
        let _ = writeln!(out, "- *{}*: {}.", h.words(), parts.join("; "));
    }
    out.push('\n');
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine_metrics::{EngineMetricsWindow, GaugeSummary};
    use crate::matrix::plan;
    use crate::per_gpu::EnginePlacement;
    use crate::results::{host_environment, ConditionResult, WorkloadMetrics, SCHEMA_VERSION};
    use crate::spec::Experiment;

    /// The issue's four layouts on two GPUs, vLLM engines (their TP is checked by deploy).
    pub(crate) const STUDY: &str = r#"
name = "tp"
warmup = "1s"
duration = "2s"
repetitions = 2
[deployment]
gpu = 0
[[deployment.engines]]
name = "gen"
kind = "vllm"
model = "Qwen/Qwen3-8B"
port = 18100
memory = 0.5
[[deployment.engines]]
name = "embed"
kind = "vllm"
model = "Qwen/Qwen3-Embedding-8B"
task = "embed"
port = 18200
memory = 0.3
[[workloads]]
name = "gen"
engine = "gen"
kind = "generate"
concurrency = 64
[[workloads]]
name = "embed"
engine = "embed"
kind = "embed"
concurrency = 16
batch = 8
[[conditions]]
sharing = "timeslice"
baseline = true
layout.gen = { gpus = [0] }
layout.embed = { gpus = [1] }
[[conditions]]
sharing = "mps"
layout.gen = { gpus = [0, 1] }
layout.embed = { gpus = [0, 1] }
[[conditions]]
sharing = "timeslice"
layout.gen = { gpus = [0, 1] }
layout.embed = { gpus = [0, 1] }
[[conditions]]
sharing = "mps"
layout.gen = { gpus = [0, 1] }
layout.embed = { gpus = [1] }
"#;

    /// What each kind of condition "measured": gen throughput by gen's placement and
    /// sharing, embed's, per-GPU power, KV in use.
    fn figures(c: &crate::matrix::Condition) -> (f64, f64, [f64; 2], f64) {
        let gen_tp2 = c.placements.get("gen").is_some_and(|p| p.gpus.len() == 2);
        let emb_tp2 = c.placements.get("embed").is_some_and(|p| p.gpus.len() == 2);
        let alone = c.is_solo();
        let mps = c.sharing.deployed() == deploy::Sharing::Mps;
        let gen = match (gen_tp2, alone) {
            (false, _) => 1000.0,
            (true, true) => 1800.0,
            (true, false) if mps => 1700.0,
            (true, false) => 1500.0,
        };
        let embed = match (emb_tp2, alone) {
            (false, true) => 300.0,
            (false, false) => 290.0,
            (true, true) => 500.0,
            (true, false) => 250.0,
        };
        let power = if c.is_solo() {
            [450.0, 80.0]
        } else if c.baseline {
            [460.0, 340.0]
        } else {
            [395.0, 400.0]
        };
        let kv = if gen_tp2 { 0.30 } else { 0.95 };
        (gen, embed, power, kv)
    }

    /// A hand-made results set of the study: per-GPU power, planned KV, engine metrics.
    pub(crate) fn study_results() -> Results {
        let exp = Experiment::parse(STUDY).unwrap();
        let mut conditions = Vec::new();
        for c in plan(&exp) {
            let (gen, embed, power, kv) = figures(&c);
            let jitter = if c.repetition == 1 { 1.0 } else { 1.01 };
            let mut workloads = BTreeMap::new();
            for w in c.loads.keys() {
                let (kind, v) = if w == "gen" {
                    (Kind::Generate, gen)
                } else {
                    (Kind::Embed, embed)
                };
                workloads.insert(
                    w.clone(),
                    WorkloadMetrics {
                        kind: Some(kind),
                        engine: w.clone(),
                        throughput: v * jitter,
                        requests_per_s: v / 100.0,
                        completed: 10,
                        ..Default::default()
                    },
                );
            }
            let mut r = ConditionResult::failed(c.clone(), String::new());
            r.failed = None;
            r.window = Some((100.0, 102.0));
            r.workloads = workloads;
            r.gpu.available = true;
            let used: Vec<u32> = crate::layout::gpus_used(std::slice::from_ref(&c));
            r.gpu.gpus = used.clone();
            r.gpu.per_gpu = used
                .iter()
                .map(|g| crate::per_gpu::tests::gpu(*g, 50.0, power[*g as usize], 60.0))
                .collect();
            r.gpu.placement = c
                .placements
                .iter()
                .map(|(e, p)| EnginePlacement {
                    replica: e.clone(),
                    engine: e.clone(),
                    gpus: p.gpus.iter().map(u32::to_string).collect(),
                    tensor_parallel_size: p.tensor_parallel_size,
                    weights_bytes: 16 << 30,
                    budget_bytes: Some(70 << 30),
                    kv_tokens: Some(if p.gpus.len() == 2 { 900_000 } else { 350_000 }),
                })
                .collect();
            if c.engines.contains(&"gen".to_string()) {
                r.engine_metrics.push(EngineMetricsWindow {
                    engine: "gen".into(),
                    samples: 3,
                    kv_cache_usage: Some(GaugeSummary {
                        metric: "vllm:kv_cache_usage_perc".into(),
                        start: kv,
                        end: kv,
                        mean: kv,
                        max: kv,
                    }),
                    ..Default::default()
                });
            }
            conditions.push(r);
        }
        Results {
            schema_version: SCHEMA_VERSION,
            experiment: exp,
            experiment_text: STUDY.into(),
            experiment_path: "tp.toml".into(),
            environment: host_environment(),
            started_at: "2026-12-01T00:00:00Z".into(),
            updated_at: "2026-12-01T00:01:00Z".into(),
            complete: true,
            command: "colocate lab run tp.toml".into(),
            conditions,
            superseded: Vec::new(),
        }
    }

    fn verdicts(j: &Judgement, label_has: &str) -> Vec<Verdict> {
        j.conditions
            .iter()
            .find(|c| c.label.contains(label_has))
            .unwrap_or_else(|| panic!("no condition with {label_has}: {j:#?}"))
            .findings
            .iter()
            .map(|f| f.verdict)
            .collect()
    }

    #[test]
    fn verdicts_from_a_hand_made_study() {
        let results = study_results();
        let a = crate::analysis::analyse(&results);
        let j = judge(&results, &a).unwrap();
        let base = j.baseline.clone().unwrap();
        assert!(
            base.starts_with("timeslice (gen TP1 on GPU 0; embed TP1 on GPU 1)"),
            "{base}"
        );
        assert_eq!(j.conditions.len(), 3, "{j:#?}");
        use Verdict::*;
        // both TP2 under MPS: gen 1700 vs 1000, KV 900k vs 350k, power 397.5 vs 400 W per
        // GPU, gen loses 5.6% of its TP2 solo (1800) against 0 in the baseline: more
        let mps = verdicts(&j, "mps default (gen TP2 on GPU 0,1; embed TP2");
        assert_eq!(
            mps,
            vec![Holds, Holds, NoClearChange, DoesNotHold],
            "{j:#?}"
        );
        // time-sliced: the same but gen 1500
        let ts = verdicts(&j, "timeslice (gen TP2 on GPU 0,1; embed TP2");
        assert_eq!(ts, vec![Holds, Holds, NoClearChange, DoesNotHold]);
        // embed alone on GPU 1 beside gen TP2: embed 290 vs 300 solo, as in the baseline
        let one = verdicts(&j, "embed TP1 on GPU 1): ");
        assert_eq!(one[0], Holds);
        let f = &j.conditions[2].findings;
        assert!(
            f[1].evidence
                .contains("KV capacity 900k vs 350k tokens (2.57x"),
            "{}",
            f[1].evidence
        );
        assert!(f[1]
            .evidence
            .contains("KV in use 30% vs 95% at the same load"));
        assert!(
            f[2].evidence
                .contains("398 ± 0 W per GPU (GPU 0 395, GPU 1 400) vs 400 ± 0 W"),
            "{}",
            f[2].evidence
        );
        assert!(
            f[3].evidence.contains("gen lost 5.6% vs 0.0%"),
            "{}",
            f[3].evidence
        );

        let text = section(&results, &a);
        assert!(text.starts_with("## Hypotheses"), "{text}");
        assert!(text.contains("| C"), "{text}");
        assert!(
            text.contains("- *more gen throughput*: holds in C"),
            "{text}"
        );
        assert!(
            text.contains("- *less interference*: does not hold in"),
            "{text}"
        );
    }

    /// Lower power per GPU holds when the shared layout draws clearly less per GPU.
    #[test]
    fn power_and_kv_by_their_rules() {
        let mut results = study_results();
        for r in results
            .conditions
            .iter_mut()
            .filter(|r| r.condition.label.starts_with("mps default"))
        {
            for g in &mut r.gpu.per_gpu {
                g.counters.get_mut("power_w").unwrap().mean = 300.0;
            }
            // no planned capacity: judged by the KV gauge at the same load
            for p in &mut r.gpu.placement {
                p.kv_tokens = None;
            }
        }
        let a = crate::analysis::analyse(&results);
        let j = judge(&results, &a).unwrap();
        let mps = verdicts(&j, "mps default (gen TP2 on GPU 0,1; embed TP2");
        assert_eq!(mps[2], Verdict::Holds);
        assert_eq!(mps[1], Verdict::Holds);
        let f = &j
            .conditions
            .iter()
            .find(|c| c.label.starts_with("mps default"))
            .unwrap()
            .findings[1];
        assert!(f.evidence.contains("no planned capacity"), "{}", f.evidence);
    }

    /// Missing figures are said plainly: no per-GPU data (old results), no KV figures, no
    /// baseline measured, no baseline marked.
    #[test]
    fn missing_data_is_said() {
        let mut results = study_results();
        for r in &mut results.conditions {
            r.gpu.per_gpu.clear();
            r.gpu.placement.clear();
            r.engine_metrics.clear();
        }
        let a = crate::analysis::analyse(&results);
        let j = judge(&results, &a).unwrap();
        for c in &j.conditions {
            assert_eq!(c.findings[1].verdict, Verdict::Missing);
            assert_eq!(c.findings[2].verdict, Verdict::Missing);
            assert!(c.findings[2]
                .evidence
                .contains("no per-GPU power in either condition"));
        }
        let text = section(&results, &a);
        assert!(
            text.contains("- *lower power per GPU*: data missing in C"),
            "{text}"
        );

        // the baseline failed
        let mut failed = study_results();
        for r in failed
            .conditions
            .iter_mut()
            .filter(|r| r.condition.baseline)
        {
            r.failed = Some("boom".into());
        }
        let a = crate::analysis::analyse(&failed);
        let text = section(&failed, &a);
        assert!(
            text.contains("**Data missing**: the baseline has no measured repetition yet"),
            "{text}"
        );

        // layouts without a baseline mark
        let mut unmarked = study_results();
        let no_mark = STUDY.replace("baseline = true\n", "");
        unmarked.experiment = Experiment::parse(&no_mark).unwrap();
        for r in &mut unmarked.conditions {
            r.condition.baseline = false;
        }
        let a = crate::analysis::analyse(&unmarked);
        let text = section(&unmarked, &a);
        assert!(
            text.contains("no condition is marked `baseline = true`"),
            "{text}"
        );

        // not a multi-GPU study: nothing
        let mut plain = study_results();
        let head = STUDY.split("[[conditions]]").next().unwrap();
        plain.experiment =
            Experiment::parse(&format!("{head}[axes]\nsharing = [\"mps\"]\n")).unwrap();
        for r in &mut plain.conditions {
            r.condition.baseline = false;
        }
        let a = crate::analysis::analyse(&plain);
        assert!(section(&plain, &a).is_empty());
    }
}
