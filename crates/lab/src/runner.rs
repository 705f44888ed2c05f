//! Runs a plan: one condition after the other, recording each as it finishes.
//!
//! The runner owns the order and the bookkeeping (deployment reuse, failure recording,
//! resume, `% of solo` rates and SLOs, progress); the actual work (start engines, drive load,
//! sample the GPU) is behind [`Harness`], whose real implementation is `measure` — the
//! one module that knows the `deploy`, `bench` and `gpu` crates.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Result};
use deploy::ValidDeployment;

use crate::deployments::Deployments;
use crate::engine_metrics::EngineMetricsWindow;
use crate::gateway_metrics::GatewayWindow;
use crate::matrix::{plan, Condition, LoadLevel};
use crate::results::{ConditionResult, GpuWindow, PresetUse, Results, WorkloadMetrics};
use crate::spec::{Experiment, Kind, Rate, Via, WorkloadDef};

/// A workload ready to run in one condition.
#[derive(Debug, Clone)]
pub struct ResolvedWorkload {
    /// Its definition.
    pub def: WorkloadDef,
    /// The load of this condition (a step's `% of solo` rate resolved to requests/s).
    pub load: LoadLevel,
    /// Open loop: requests/s after resolving `% of solo`.
    pub rate_per_s: Option<f64>,
}

/// What one window measured.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    /// Unix seconds of the window.
    pub window: (f64, f64),
    /// Per workload.
    pub workloads: BTreeMap<String, WorkloadMetrics>,
    /// GPU counters over the same window.
    pub gpu: GpuWindow,
    /// Every engine's own `/metrics` over the same window (or why it was not scraped).
    pub engine_metrics: Vec<EngineMetricsWindow>,
    /// Workloads that ran as a bench preset.
    pub presets: BTreeMap<String, PresetUse>,
    /// The gateway's SLO controller over the window, when workloads went through it.
    pub gateway: Option<GatewayWindow>,
    /// True when the window was cut short by Ctrl-C (the result is then not kept).
    pub interrupted: bool,
}

/// Does the real work of a condition. Calls come in the order `up`, `measure`*, `down`.
pub trait Harness {
    /// Brings up `deployment` (the condition's, validated) in `run_dir`; the previous
    /// deployment has been taken down.
    fn up(&mut self, deployment: &ValidDeployment, run_dir: &Path) -> Result<()>;
    /// Warms up, then measures `workloads` and the GPU over one window.
    fn measure(
        &mut self,
        workloads: &[ResolvedWorkload],
        warmup: Duration,
        duration: Duration,
        live: &dyn Fn(String),
        cancel: &AtomicBool,
    ) -> Result<Measurement>;
    /// Stops whatever `up` started (idempotent).
    fn down(&mut self);
    /// The UUIDs of this machine's GPUs, recorded with every condition measured here (a
    /// run resumed elsewhere then says which rows came from which machine).
    fn gpu_uuids(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Resolves the open-loop rate of `w` under `load`: absolute as written, or a percentage
/// of the requests/s the engine achieved solo at the workload's base load.
pub fn resolve_rate(
    w: &WorkloadDef,
    load: &LoadLevel,
    done: &[ConditionResult],
) -> Result<Option<f64>> {
    match load.rate {
        None => Ok(None),
        Some(Rate::PerSecond(r)) => Ok(Some(r)),
        Some(Rate::OfSolo(pct)) => {
            let base = LoadLevel::base(w);
            let caps: Vec<f64> = done
                .iter()
                .filter(|r| r.failed.is_none() && r.condition.is_solo())
                .filter(|r| r.condition.loads.get(&w.name) == Some(&base))
                .filter_map(|r| r.workloads.get(&w.name))
                .map(|m| match w.kind {
                    // capacity in inputs/s, converted to requests at this batch size
                    Kind::Embed => m.throughput / load.batch.unwrap_or(1).max(1) as f64,
                    Kind::Generate => m.requests_per_s,
                })
                .collect();
            if caps.is_empty() {
                return Err(anyhow!(
                    "\"{pct}% of solo\" for {}: its solo capacity ({} solo at {}) was not measured",
                    w.name,
                    w.engine,
                    base.short()
                ));
            }
            let cap = caps.iter().sum::<f64>() / caps.len() as f64;
            if cap <= 0.0 {
                return Err(anyhow!(
                    "solo capacity of {} was zero; cannot derive \"{pct}% of solo\"",
                    w.name
                ));
            }
            Ok(Some(cap * pct / 100.0))
        }
    }
}

/// `load` with its step's `% of solo` rate resolved to requests/s (as [`resolve_rate`]).
pub fn resolve_step(
    w: &WorkloadDef,
    load: &LoadLevel,
    done: &[ConditionResult],
) -> Result<LoadLevel> {
    let mut out = *load;
    if let Some(step) = out.step.as_mut() {
        let at_step = LoadLevel {
            concurrency: None,
            rate: step.rate,
            batch: load.batch,
            step: None,
        };
        if let Some(r) = resolve_rate(w, &at_step, done)? {
            step.rate = Some(Rate::PerSecond(r));
        }
    }
    Ok(out)
}

/// The key of a workload's rate after its load step in `resolved_rates`.
pub fn step_rate_key(workload: &str) -> String {
    format!("{workload} after the step")
}

/// Progress display: a bar over conditions with the live figures of the current one.
pub struct ProgressView {
    bar: indicatif::ProgressBar,
}

impl ProgressView {
    /// A bar of `total` conditions, `done` already finished; hidden when `quiet`.
    pub fn new(total: usize, done: usize, quiet: bool) -> Self {
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total as u64)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} conditions  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_position(done as u64);
        ProgressView { bar }
    }
}

/// `lab run --only TEXT`: the conditions whose id contains one of the texts (all when
/// none is given), so that one call measures a part of a plan and a later one the rest.
#[derive(Debug, Clone, Default)]
pub struct Only(pub Vec<String>);

impl Only {
    pub fn selects(&self, c: &Condition) -> bool {
        let id = c.id();
        self.0.is_empty() || self.0.iter().any(|t| id.contains(t.as_str()))
    }
}

/// Runs every planned condition not yet in `results` (of those `only` selects), saving
/// `results` into `run_dir` after each one. Returns when the plan is done or `cancel` is
/// set. `deployments` holds those validated up front; the others are validated before
/// their first start.
pub fn run(
    results: &mut Results,
    run_dir: &Path,
    harness: &mut dyn Harness,
    deployments: &mut Deployments,
    cancel: &AtomicBool,
    view: &ProgressView,
    only: &Only,
) -> Result<()> {
    let exp: Experiment = results.experiment.clone();
    let planned = plan(&exp);
    let mut current: Option<String> = None;
    let mut up_failed: BTreeMap<String, String> = BTreeMap::new();
    for cond in &planned {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        if results.find(&cond.id()).is_some() || !only.selects(cond) {
            continue;
        }
        view.bar.set_message(cond.id());
        let record = run_one(
            &exp,
            cond,
            run_dir,
            harness,
            deployments,
            cancel,
            view,
            &mut current,
            &mut up_failed,
            &results.conditions,
        );
        match record {
            None => break, // interrupted: not recorded, resume redoes it
            Some(r) => {
                if let Some(reason) = &r.failed {
                    view.bar
                        .println(format!("condition {} failed: {reason}", cond.id()));
                }
                results.conditions.push(r);
                results.updated_at = now_rfc3339();
                results.complete = planned.iter().all(|c| results.find(&c.id()).is_some());
                results.save(run_dir)?;
                view.bar.inc(1);
            }
        }
    }
    harness.down();
    view.bar.finish_and_clear();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    exp: &Experiment,
    cond: &Condition,
    run_dir: &Path,
    harness: &mut dyn Harness,
    deployments: &mut Deployments,
    cancel: &AtomicBool,
    view: &ProgressView,
    current: &mut Option<String>,
    up_failed: &mut BTreeMap<String, String>,
    done: &[ConditionResult],
) -> Option<ConditionResult> {
    // workloads and rates first: a missing solo capacity fails before any start-up
    let mut workloads = Vec::new();
    for (name, load) in &cond.loads {
        let Some(def) = exp.workload(name) else {
            return Some(ConditionResult::failed(
                cond.clone(),
                format!("no workload {name}"),
            ));
        };
        // Repetition r draws prompts and arrivals from seed + r - 1: repetitions sample
        // different arrivals (so their spread is real), while the conditions of one
        // repetition, solo baselines included, share theirs.
        let mut def = def.clone();
        def.seed = Some(def.seed.unwrap_or(0) + u64::from(cond.repetition.saturating_sub(1)));
        // the SLO controller sees only what goes through the gateway
        if cond.control {
            def.via = Some(Via::Gateway);
        }
        match resolve_rate(&def, load, done).and_then(|r| Ok((r, resolve_step(&def, load, done)?)))
        {
            Ok((rate_per_s, load)) => workloads.push(ResolvedWorkload {
                def,
                load,
                rate_per_s,
            }),
            Err(e) => return Some(ConditionResult::failed(cond.clone(), format!("{e:#}"))),
        }
    }
    // a controlled condition's SLOs relative to solo, from the solo baselines run before it
    let slos = match crate::control_slo::resolve(exp, cond, done) {
        Ok(s) => s,
        Err(e) => return Some(ConditionResult::failed(cond.clone(), format!("{e:#}"))),
    };
    let key = crate::control_slo::start_key(cond, &slos);
    if let Some(reason) = up_failed.get(&key) {
        return Some(ConditionResult::failed(cond.clone(), reason.clone()));
    }
    if current.as_ref() != Some(&key) {
        harness.down();
        *current = None;
        let deployment = match deployments.resolved(exp, cond, &slos) {
            Ok(d) => d,
            Err(e) => {
                // not valid: neither is it for the next condition on it
                let reason = format!("{e:#}");
                up_failed.insert(key, reason.clone());
                return Some(ConditionResult::failed(cond.clone(), reason));
            }
        };
        let dir = run_dir.join("deployments").join(sanitize(&key));
        view.bar.set_message(format!(
            "{}: starting {}",
            cond.id(),
            cond.engines.join(", ")
        ));
        if let Err(e) = harness.up(deployment, &dir) {
            harness.down();
            if cancel.load(Ordering::SeqCst) {
                // interrupted while starting: not run, resume starts it again
                return None;
            }
            let reason = format!("deployment did not come up: {e:#}");
            up_failed.insert(key, reason.clone());
            return Some(ConditionResult::failed(cond.clone(), reason));
        }
        *current = Some(key);
    }
    let id = cond.id();
    let live = |s: String| view.bar.set_message(format!("{id}: {s}"));
    match harness.measure(&workloads, exp.warmup, exp.duration, &live, cancel) {
        Ok(m) if m.interrupted || cancel.load(Ordering::SeqCst) => None,
        Ok(m) => Some(ConditionResult {
            condition: cond.clone(),
            failed: None,
            window: Some(m.window),
            resolved_rates: workloads
                .iter()
                .filter_map(|w| w.rate_per_s.map(|r| (w.def.name.clone(), r)))
                .chain(workloads.iter().filter_map(|w| match w.load.step?.rate? {
                    Rate::PerSecond(r) => Some((step_rate_key(&w.def.name), r)),
                    Rate::OfSolo(_) => None,
                }))
                .collect(),
            workloads: m.workloads,
            gpu: m.gpu,
            engine_metrics: m.engine_metrics,
            presets: m.presets,
            gateway: m.gateway,
            gpu_uuids: harness.gpu_uuids(),
            control_slo: slos,
        }),
        Err(e) => {
            // the engines may be broken: start afresh for the next condition
            harness.down();
            *current = None;
            if cancel.load(Ordering::SeqCst) {
                return None;
            }
            Some(ConditionResult::failed(cond.clone(), format!("{e:#}")))
        }
    }
}

/// A folder name from a label.
pub fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("__") {
        out = out.replace("__", "_");
    }
    out.trim_matches('_').to_string()
}

/// The current time, RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{host_environment, SCHEMA_VERSION};
    use std::cell::RefCell;
    use std::rc::Rc;

    const EXP: &str = r#"
name = "t"
warmup = "0s"
duration = "1s"
repetitions = 2
[deployment]
gpu = 0
[[deployment.engines]]
name = "gen"
model = "preset:qwen3-tiny"
port = 1
[[deployment.engines]]
name = "emb"
model = "preset:qwen3-tiny"
task = "embed"
port = 2
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
batch = 4
[axes]
sharing = ["timeslice", "mps"]
mps_default = false
mps_split = [[60, 40]]
[axes.load.vec]
rate = ["50% of solo"]
"#;

    /// Records the calls; produces figures derived from the load so rates can be checked.
    #[derive(Default)]
    struct Log {
        ups: Vec<String>,
        measured: Vec<Vec<(String, Option<f64>)>>,
        /// Seeds of the workloads of every measured window.
        seeds: Vec<Vec<Option<u64>>>,
        fail_up_with_mps: bool,
        cancel_after: Option<usize>,
        /// Ctrl-C arrives while the n-th deployment starts: `up` sets the flag and fails as
        /// a cancelled start does.
        interrupt_up: Option<(usize, std::sync::Arc<AtomicBool>)>,
        /// The gen engine's SLO and the folder of every deployment started.
        slos: Vec<Option<deploy::spec::SloSpec>>,
        dirs: Vec<std::path::PathBuf>,
        /// Generate windows measure no TPOT.
        no_tpot: bool,
    }
    struct Fake(Rc<RefCell<Log>>);

    impl Harness for Fake {
        fn gpu_uuids(&self) -> Vec<String> {
            vec!["GPU-fake".into()]
        }
        fn up(&mut self, d: &ValidDeployment, dir: &Path) -> Result<()> {
            let mut log = self.0.borrow_mut();
            let sharing = d.spec().sharing;
            let n = d.spec().engines.len();
            log.ups.push(format!("{sharing}/{n}"));
            let gen = d.spec().engines.iter().find(|e| e.name == "gen");
            log.slos.push(gen.and_then(|e| e.slo));
            log.dirs.push(dir.to_path_buf());
            if let Some((nth, flag)) = &log.interrupt_up {
                if *nth == log.ups.len() {
                    flag.store(true, Ordering::SeqCst);
                    anyhow::bail!("cancelled while starting");
                }
            }
            if log.fail_up_with_mps && sharing == deploy::Sharing::Mps {
                anyhow::bail!("MPS daemon refused");
            }
            Ok(())
        }
        fn measure(
            &mut self,
            ws: &[ResolvedWorkload],
            _w: Duration,
            _d: Duration,
            _live: &dyn Fn(String),
            cancel: &AtomicBool,
        ) -> Result<Measurement> {
            let mut log = self.0.borrow_mut();
            log.seeds.push(ws.iter().map(|w| w.def.seed).collect());
            log.measured.push(
                ws.iter()
                    .map(|w| (w.def.name.clone(), w.rate_per_s))
                    .collect(),
            );
            if log.cancel_after == Some(log.measured.len()) {
                cancel.store(true, Ordering::SeqCst);
                return Ok(Measurement {
                    interrupted: true,
                    ..Default::default()
                });
            }
            let mut m = Measurement::default();
            for w in ws {
                m.engine_metrics.push(EngineMetricsWindow::unscraped(
                    &w.def.engine,
                    "http://fake",
                    format!("{} in the fake", w.def.engine),
                ));
                let (thr, rps) = match w.def.kind {
                    // through the gateway (controlled) a little more, so that it is chosen
                    Kind::Generate if w.def.via == Some(Via::Gateway) => (1100.0, 10.0),
                    Kind::Generate => (1000.0, 10.0),
                    Kind::Embed => (w.rate_per_s.map(|r| r * 4.0).unwrap_or(80.0), 20.0),
                };
                // TPOT p99 half a millisecond per request in flight
                let tpot = (w.def.kind == Kind::Generate && !log.no_tpot).then(|| {
                    crate::results::Percentiles {
                        p99: f64::from(w.load.concurrency.unwrap_or(1)) * 0.5,
                        ..Default::default()
                    }
                });
                m.workloads.insert(
                    w.def.name.clone(),
                    WorkloadMetrics {
                        kind: Some(w.def.kind),
                        engine: w.def.engine.clone(),
                        throughput: thr,
                        requests_per_s: rps,
                        tpot_ms: tpot,
                        ..Default::default()
                    },
                );
            }
            Ok(m)
        }
        fn down(&mut self) {}
    }

    fn fresh(exp: &Experiment) -> Results {
        Results {
            schema_version: SCHEMA_VERSION,
            experiment: exp.clone(),
            experiment_text: EXP.into(),
            experiment_path: "t.toml".into(),
            environment: host_environment(),
            started_at: now_rfc3339(),
            updated_at: now_rfc3339(),
            complete: false,
            command: "test".into(),
            conditions: vec![],
            superseded: Vec::new(),
        }
    }

    #[test]
    fn runs_reuses_deployments_and_resolves_relative_rates() {
        let exp = Experiment::parse(EXP).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Rc::new(RefCell::new(Log::default()));
        let mut results = fresh(&exp);
        let view = ProgressView::new(0, 0, true);
        // validated up front, as `lab run` does
        let mut deployments = Deployments::check(&exp, &plan(&exp)).unwrap();
        run(
            &mut results,
            dir.path(),
            &mut Fake(log.clone()),
            &mut deployments,
            &AtomicBool::new(false),
            &view,
            &Only::default(),
        )
        .unwrap();
        let planned = plan(&exp);
        assert_eq!(results.conditions.len(), planned.len());
        assert!(results.complete);
        // solo gen, solo emb (base + 50%), timeslice, mps 60/40: one start-up each
        assert_eq!(
            log.borrow().ups,
            vec!["timeslice/1", "timeslice/1", "timeslice/2", "mps/2"]
        );
        // 50% of solo: emb solo throughput 80 inputs/s at batch 4 = 20 req/s -> 10 req/s
        let rates: Vec<Option<f64>> = log
            .borrow()
            .measured
            .iter()
            .flatten()
            .filter(|(n, _)| n == "vec")
            .map(|(_, r)| *r)
            .collect();
        assert_eq!(rates[0], None);
        assert!(rates[2..].iter().all(|r| *r == Some(10.0)), "{rates:?}");
        // repetition r measures with seed r - 1 (no seed in the file): every window of one
        // repetition shares its arrivals, the two repetitions differ
        let seeds = log.borrow().seeds.clone();
        assert_eq!(seeds.len(), planned.len());
        for (cond, window) in planned.iter().zip(&seeds) {
            let want = Some(u64::from(cond.repetition) - 1);
            assert!(
                window.iter().all(|s| *s == want),
                "{}: {window:?}",
                cond.id()
            );
        }
        assert!(planned.iter().any(|c| c.repetition == 2));
        // the engines' metrics of each window go with it
        for c in &results.conditions {
            let engines: Vec<&str> = c.engine_metrics.iter().map(|w| w.engine.as_str()).collect();
            assert_eq!(engines, c.condition.engines, "{}", c.condition.id());
        }
        // written to disk and readable
        let back = Results::load(dir.path()).unwrap();
        assert_eq!(back, results);
        // efficiency from these figures: gen kept all (1.0) + emb same as its solo at 50% (1.0)
        let a = crate::analysis::analyse(&back);
        let ts = a
            .cells
            .iter()
            .find(|c| c.label.starts_with("timeslice"))
            .unwrap();
        assert!((ts.efficiency.unwrap().mean - 2.0).abs() < 1e-9);
    }

    #[test]
    fn failed_deployment_is_recorded_and_the_run_goes_on() {
        let exp = Experiment::parse(EXP).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Rc::new(RefCell::new(Log {
            fail_up_with_mps: true,
            ..Default::default()
        }));
        let mut results = fresh(&exp);
        run(
            &mut results,
            dir.path(),
            &mut Fake(log.clone()),
            &mut Deployments::default(),
            &AtomicBool::new(false),
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        let failed: Vec<_> = results
            .conditions
            .iter()
            .filter(|c| c.failed.is_some())
            .collect();
        assert_eq!(failed.len(), 2); // the mps condition, both repetitions
        assert!(failed[0]
            .failed
            .as_ref()
            .unwrap()
            .contains("MPS daemon refused"));
        // tried once, not once per repetition
        assert_eq!(
            log.borrow()
                .ups
                .iter()
                .filter(|u| u.starts_with("mps"))
                .count(),
            1
        );
        assert!(results.complete);
    }

    /// A deployment that is not valid (here the co-located one: both engines on one port)
    /// fails its conditions with the field named, is tried once and never started; the
    /// solo baselines run.
    #[test]
    fn an_invalid_deployment_fails_its_conditions_and_the_run_goes_on() {
        let exp = Experiment::parse(&EXP.replace("port = 2", "port = 1")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Rc::new(RefCell::new(Log::default()));
        let mut results = fresh(&exp);
        run(
            &mut results,
            dir.path(),
            &mut Fake(log.clone()),
            &mut Deployments::default(),
            &AtomicBool::new(false),
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        assert_eq!(log.borrow().ups, vec!["timeslice/1", "timeslice/1"]);
        let failed: Vec<&ConditionResult> = results
            .conditions
            .iter()
            .filter(|c| c.failed.is_some())
            .collect();
        assert_eq!(
            failed.len(),
            4,
            "timeslice and mps 60/40, two repetitions each"
        );
        for c in failed {
            assert!(!c.condition.is_solo());
            let why = c.failed.as_deref().unwrap();
            assert!(
                why.contains(&format!("condition {}", c.condition.label))
                    && why.contains("engines[1].port: port 1 clashes with gen"),
                "{why}"
            );
        }
        assert!(results.complete);
    }

    /// Ctrl-C while a deployment starts (vLLM takes minutes): its conditions are not run,
    /// not failed, so a plain resume measures them.
    #[test]
    fn an_interrupted_start_is_not_run_and_resume_measures_it() {
        let exp = Experiment::parse(EXP).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let log = Rc::new(RefCell::new(Log {
            interrupt_up: Some((2, flag.clone())),
            ..Default::default()
        }));
        let mut results = fresh(&exp);
        run(
            &mut results,
            dir.path(),
            &mut Fake(log.clone()),
            &mut Deployments::default(),
            &flag,
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        let on_disk = Results::load(dir.path()).unwrap();
        assert!(!on_disk.complete);
        assert!(!on_disk.conditions.is_empty());
        assert!(
            on_disk.conditions.iter().all(|c| c.failed.is_none()),
            "nothing is recorded as failed"
        );
        let mut resumed = Results::load(dir.path()).unwrap();
        run(
            &mut resumed,
            dir.path(),
            &mut Fake(Rc::new(RefCell::new(Log::default()))),
            &mut Deployments::default(),
            &AtomicBool::new(false),
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        assert!(resumed.complete);
        assert_eq!(resumed.conditions.len(), plan(&exp).len());
        assert!(resumed.conditions.iter().all(|c| c.failed.is_none()));
    }

    /// `--only` measures the selected part of the plan; a later run without it measures
    /// the rest and nothing twice.
    #[test]
    fn only_measures_a_part_and_resume_the_rest() {
        let exp = Experiment::parse(EXP).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let all = plan(&exp);
        let pick = all[0].id();
        let mut results = fresh(&exp);
        let log = Rc::new(RefCell::new(Log::default()));
        let go = |results: &mut Results, log: &Rc<RefCell<Log>>, only: Only| {
            run(
                results,
                dir.path(),
                &mut Fake(log.clone()),
                &mut Deployments::default(),
                &AtomicBool::new(false),
                &ProgressView::new(0, 0, true),
                &only,
            )
            .unwrap()
        };
        go(&mut results, &log, Only(vec![pick.clone()]));
        let ids: Vec<String> = results
            .conditions
            .iter()
            .map(|c| c.condition.id())
            .collect();
        assert_eq!(ids, vec![pick.clone()]);
        assert!(!results.complete);
        // each measured condition names the machine's GPUs
        assert_eq!(
            results.conditions[0].gpu_uuids,
            vec!["GPU-fake".to_string()]
        );
        let log2 = Rc::new(RefCell::new(Log::default()));
        go(&mut results, &log2, Only::default());
        assert!(results.complete);
        assert_eq!(log2.borrow().measured.len(), all.len() - 1);
    }

    #[test]
    fn resume_after_interruption_loses_nothing() {
        let exp = Experiment::parse(EXP).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Rc::new(RefCell::new(Log {
            cancel_after: Some(5),
            ..Default::default()
        }));
        let mut results = fresh(&exp);
        let cancel = AtomicBool::new(false);
        run(
            &mut results,
            dir.path(),
            &mut Fake(log.clone()),
            &mut Deployments::default(),
            &cancel,
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        let on_disk = Results::load(dir.path()).unwrap();
        assert_eq!(
            on_disk.conditions.len(),
            4,
            "the interrupted 5th is not recorded"
        );
        assert!(!on_disk.complete);
        let first_four: Vec<String> = on_disk
            .conditions
            .iter()
            .map(|c| c.condition.id())
            .collect();

        // resume from the file alone
        let mut resumed = Results::load(dir.path()).unwrap();
        let log2 = Rc::new(RefCell::new(Log::default()));
        run(
            &mut resumed,
            dir.path(),
            &mut Fake(log2.clone()),
            &mut Deployments::default(),
            &AtomicBool::new(false),
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        let total = plan(&exp).len();
        assert_eq!(resumed.conditions.len(), total);
        assert!(resumed.complete);
        assert_eq!(
            log2.borrow().measured.len(),
            total - 4,
            "finished conditions are not measured again"
        );
        let ids: Vec<String> = resumed
            .conditions
            .iter()
            .map(|c| c.condition.id())
            .collect();
        assert_eq!(&ids[..4], &first_four[..]);
        // and the earlier figures are kept as they were
        assert_eq!(&resumed.conditions[..4], &on_disk.conditions[..]);
    }

    /// A generator whose TPOT SLO is 1.25 x solo, controlled and static at two loads.
    const CONTROLLED: &str = r#"
name = "t"
warmup = "0s"
duration = "1s"
repetitions = 2
[deployment]
gpu = 0
[deployment.gateway]
address = "127.0.0.1:3"
[[deployment.engines]]
name = "gen"
model = "preset:qwen3-tiny"
port = 1
served_model_name = "g"
priority = "latency"
slo = { ttft_p99 = "2s" }
[[deployment.engines]]
name = "emb"
model = "preset:qwen3-tiny"
task = "embed"
port = 2
served_model_name = "e"
priority = "best-effort"
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
batch = 4
[axes]
sharing = ["mps"]
mps_default = true
control = [false, true]
[axes.load.chat]
concurrency = [4, 8]
[control_slo.gen]
tpot_p99 = 1.25
"#;

    fn run_controlled(log: &Rc<RefCell<Log>>, dir: &Path) -> Results {
        let exp = Experiment::parse(CONTROLLED).unwrap();
        let mut results = fresh(&exp);
        let mut deployments = Deployments::check(&exp, &plan(&exp)).unwrap();
        run(
            &mut results,
            dir,
            &mut Fake(log.clone()),
            &mut deployments,
            &AtomicBool::new(false),
            &ProgressView::new(0, 0, true),
            &Only::default(),
        )
        .unwrap();
        results
    }

    /// The solo baselines run first; each controlled condition's deployment starts with
    /// 1.25 x the generator's solo TPOT p99 at its own load (the absolute TTFT kept), in a
    /// folder of its own, the value recorded with the condition and shown in the report and
    /// the recommended deployment; static conditions start without SLOs.
    #[test]
    fn a_controlled_condition_deploys_the_slo_relative_to_its_solo() {
        let dir = tempfile::tempdir().unwrap();
        let log = Rc::new(RefCell::new(Log::default()));
        let results = run_controlled(&log, dir.path());
        assert!(results.complete);
        assert!(results.conditions.iter().all(|c| c.failed.is_none()));
        let log = log.borrow();
        // solo gen (both loads), solo emb, static, controlled at c=4, controlled at c=8
        assert_eq!(
            log.ups,
            vec!["timeslice/1", "timeslice/1", "mps/2", "mps/2", "mps/2"]
        );
        assert_eq!(&log.slos[..3], &[None, None, None]);
        let ms = |us: u64| Some(Duration::from_micros(us));
        for (slo, tpot) in log.slos[3..].iter().zip([2500, 5000]) {
            let slo = slo.unwrap();
            assert_eq!(slo.tpot_p99, ms(tpot), "{slo:?}");
            assert_eq!(slo.ttft_p99, Some(Duration::from_secs(2)));
        }
        let names: Vec<String> = log.dirs[3..]
            .iter()
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "mps_default_controlled_slo_gen_tpot_p99_2.5ms",
                "mps_default_controlled_slo_gen_tpot_p99_5ms"
            ]
        );
        // recorded with every repetition of the controlled conditions, none elsewhere
        for c in &results.conditions {
            if !c.condition.control {
                assert!(c.control_slo.is_empty(), "{}", c.condition.id());
                continue;
            }
            assert_eq!(c.control_slo.len(), 1);
            let s = &c.control_slo[0];
            let load = c.condition.loads["chat"].concurrency.unwrap();
            assert_eq!(s.solo, format!("chat c={load}, 2 solo runs"));
            assert_eq!(s.slo, Duration::from_micros(u64::from(load) * 625));
        }
        let back = Results::load(dir.path()).unwrap();
        assert_eq!(back, results);
        // the report says it; the recommended (controlled) deployment carries the value
        crate::report::render(&results, dir.path(), None).unwrap();
        let md = std::fs::read_to_string(dir.path().join(crate::report::REPORT_FILE)).unwrap();
        for needle in [
            "Controller SLO set from the solo run (`control_slo`): gen SLO tpot_p99 2.5 ms = 1.25 x solo 2 ms (chat c=4, 2 solo runs).",
            "SLOs set from the solo run (`control_slo`",
            "gen SLO tpot_p99 5 ms = 1.25 x solo 4 ms (chat c=8, 2 solo runs)",
        ] {
            assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
        }
        let rec =
            std::fs::read_to_string(dir.path().join(crate::report::RECOMMENDED_FILE)).unwrap();
        assert!(rec.contains("controlled"), "{rec}");
        assert!(
            rec.contains("tpot_p99 = \"2ms 500us\"") || rec.contains("tpot_p99 = \"5ms\""),
            "{rec}"
        );
        assert!(rec.contains("# gen SLO tpot_p99 "), "{rec}");
    }

    /// A solo that measured no TPOT: the controlled conditions fail with the reason (no
    /// start), the others run.
    #[test]
    fn a_controlled_condition_without_its_solo_metric_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let log = Rc::new(RefCell::new(Log {
            no_tpot: true,
            ..Default::default()
        }));
        let results = run_controlled(&log, dir.path());
        assert!(results.complete);
        assert_eq!(
            log.borrow().ups,
            vec!["timeslice/1", "timeslice/1", "mps/2"]
        );
        let failed: Vec<&ConditionResult> = results
            .conditions
            .iter()
            .filter(|c| c.failed.is_some())
            .collect();
        assert_eq!(failed.len(), 4, "two loads, two repetitions");
        for c in failed {
            assert!(c.condition.control);
            let why = c.failed.as_deref().unwrap();
            assert!(
                why.contains("control_slo.gen.tpot_p99: no solo TPOT p99 of chat c=")
                    && why.contains("its solo baseline measured no TPOT p99"),
                "{why}"
            );
        }
    }

    #[test]
    fn relative_rate_without_capacity_fails_clearly() {
        let exp = Experiment::parse(EXP).unwrap();
        let w = exp.workload("vec").unwrap();
        let load = LoadLevel {
            rate: Some(Rate::OfSolo(50.0)),
            concurrency: None,
            batch: Some(4),
            step: None,
        };
        let e = resolve_rate(w, &load, &[]).unwrap_err();
        assert!(format!("{e}").contains("solo capacity"), "{e}");
    }
}
