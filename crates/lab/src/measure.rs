//! The glue to the crates that run and measure, and the only module that knows them:
//! `deploy`'s running deployments (`Deployment::up` of a condition's validated deployment,
//! its endpoints, MPS faults and shutdown), `bench` (drive the load over one window, a
//! workload that names a preset built by bench's own `Preset::workload`) and `gpu`
//! (environment, counters sampled over the same window). Every engine's `/metrics` is
//! scraped over the window too (`engine_metrics::EngineScraper`). The rest of the lab uses
//! deploy's spec types only (`deployments` builds and validates them), so a change in how
//! deployments run or load is measured is absorbed here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::engine_metrics::{EngineMetricsWindow, EngineScraper};
use crate::results::{
    host_environment, CounterStat, Environment, FaultPhase, GpuEnv, GpuWindow, Percentiles,
    PresetUse, WindowFault, WorkloadMetrics,
};
use crate::runner::{Harness, Measurement, ResolvedWorkload};
use crate::spec::{Experiment, Kind};

/// How often each engine's `/metrics` is read while the load runs. A window opens on the
/// last sample before it, so the interval is kept within the warm-up (at least
/// [`ENGINE_SCRAPE_MIN`]) for short windows.
pub const ENGINE_SCRAPE_EVERY: Duration = Duration::from_secs(5);
/// The shortest scrape interval.
pub const ENGINE_SCRAPE_MIN: Duration = Duration::from_millis(500);

/// The scrape interval for a warm-up.
fn scrape_every(warmup: Duration) -> Duration {
    ENGINE_SCRAPE_EVERY.min(warmup.max(ENGINE_SCRAPE_MIN))
}

/// Machine, versions and GPUs (or why there are none).
pub fn environment() -> Environment {
    let mut env = host_environment();
    match gpu::info() {
        Ok(gpus) => {
            env.gpus = gpus
                .into_iter()
                .map(|g| GpuEnv {
                    name: g.name,
                    uuid: g.uuid,
                    memory_bytes: g.memory_total_bytes,
                    driver: g.driver_version,
                    cuda: g.cuda_version,
                })
                .collect()
        }
        Err(e) => env.gpu_unavailable = Some(format!("{e:#}")),
    }
    env
}

/// An engine's address and the model name its requests carry.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    served_model_name: String,
}

/// The real harness: deploy, bench, the GPU sampler and the engines' `/metrics`.
pub struct RealHarness {
    rt: tokio::runtime::Runtime,
    running: Option<deploy::Deployment>,
    endpoints: BTreeMap<String, Endpoint>,
    /// Every replica of the running deployment: (replica name, base URL), scraped.
    replicas: Vec<(String, String)>,
    gpu_index: Option<u32>,
    sampler: std::result::Result<gpu::telemetry::Sampler, String>,
    /// The last MPS fault (by id) of the running deployment already given to a window.
    faults_reported: u64,
}

impl RealHarness {
    /// Starts the runtime, the GPU sampler (or notes why there is none) and a Ctrl-C
    /// handler that sets `cancel`.
    pub fn new(exp: &Experiment, cancel: Arc<AtomicBool>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\ninterrupted: finishing the current window; `lab run --resume` continues"
                );
                cancel.store(true, Ordering::SeqCst);
            }
        });
        let sampler =
            gpu::telemetry::Sampler::start(exp.sample_interval, None).map_err(|e| format!("{e:#}"));
        Ok(RealHarness {
            rt,
            running: None,
            endpoints: BTreeMap::new(),
            replicas: Vec::new(),
            gpu_index: None,
            sampler,
            faults_reported: 0,
        })
    }

    fn gpu_window(&self, w0: f64, w1: f64) -> GpuWindow {
        let sampler = match &self.sampler {
            Ok(s) => s,
            Err(reason) => {
                return GpuWindow {
                    available: false,
                    reason: Some(reason.clone()),
                    ..Default::default()
                }
            }
        };
        let summary = sampler.summarize(w0, w1);
        let g = summary
            .gpus
            .iter()
            .find(|g| Some(g.gpu) == self.gpu_index)
            .or_else(|| summary.gpus.first());
        let Some(g) = g else {
            return GpuWindow {
                available: false,
                reason: Some("no GPU samples in the window".into()),
                ..Default::default()
            };
        };
        let mut counters = BTreeMap::new();
        let conv = |s: &gpu::telemetry::Stat| CounterStat {
            mean: s.mean,
            p50: s.p50,
            max: s.max,
        };
        for (k, v) in [
            ("sm_active", &g.sm_active),
            ("sm_occupancy", &g.sm_occupancy),
            ("tensor_active", &g.tensor_active),
            ("dram_bw", &g.dram_bw),
            ("power_w", &g.power_w),
        ] {
            if let Some(s) = v {
                counters.insert(k.to_string(), conv(s));
            }
        }
        let samples = sampler
            .samples()
            .into_iter()
            .filter(|s| s.gpu == g.gpu && s.t >= w0 && s.t <= w1)
            .map(|s| {
                let mut m = BTreeMap::new();
                for (k, v) in [
                    ("sm_active", s.sm_active),
                    ("sm_occupancy", s.sm_occupancy),
                    ("tensor_active", s.tensor_active),
                    ("dram_bw", s.dram_bw),
                    ("power_w", s.power_w),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_string(), v);
                    }
                }
                (s.t, m)
            })
            .collect();
        let notes = sampler.notes();
        GpuWindow {
            available: true,
            reason: (!notes.is_empty()).then(|| notes.join("; ")),
            counters,
            samples,
            mps_faults: Vec::new(),
        }
    }
}

/// Unix seconds now.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The supervisor's MPS faults newer than `after_id`, as a window keeps them: each placed
/// before the warm-up (which began at `warmup_start`), in it, or in the window (from
/// `window_start`). A fault whose time cannot be read is placed in the window: unclean is
/// the safe guess.
fn window_faults(
    faults: &[deploy::supervisor::MpsFault],
    after_id: u64,
    warmup_start: f64,
    window_start: f64,
) -> Vec<WindowFault> {
    faults
        .iter()
        .filter(|f| f.id > after_id)
        .map(|f| {
            let t = chrono::DateTime::parse_from_rfc3339(&f.at)
                .map(|d| d.timestamp_millis() as f64 / 1000.0)
                .ok();
            let phase = match t {
                Some(t) if t < warmup_start => FaultPhase::BeforeWarmup,
                Some(t) if t < window_start => FaultPhase::Warmup,
                _ => FaultPhase::Window,
            };
            WindowFault {
                t: t.unwrap_or(window_start),
                log_time: f.log_time.clone(),
                phase,
                engines: f.engines().into_iter().map(String::from).collect(),
                message: f.message.clone(),
                action: f.action.clone(),
            }
        })
        .collect()
}

/// The bench workload of `w` against `ep`, and the bench preset it runs as. A preset's
/// workload is bench's own (`Preset::workload`: its API, fixed texts and request shape)
/// with this condition's load and batch, and the experiment's output length.
fn bench_workload(
    w: &ResolvedWorkload,
    ep: &Endpoint,
) -> (bench::WorkloadSpec, Option<bench::spec::Preset>) {
    let load = match (w.rate_per_s, w.load.concurrency) {
        (Some(rate), _) => bench::Load::Open {
            rate,
            burstiness: w.def.burstiness,
            max_concurrency: None,
        },
        (None, c) => bench::Load::Closed {
            concurrency: c.unwrap_or(1) as usize,
        },
    };
    let gen = w.def.kind == Kind::Generate;
    let model = w
        .def
        .model
        .clone()
        .unwrap_or_else(|| ep.served_model_name.clone());
    let output = (gen && w.def.ignore_eos).then_some(bench::LengthDist::Fixed(w.def.output_tokens));
    let batch = if gen {
        1
    } else {
        w.load.batch.unwrap_or(1) as usize
    };
    if let Some(p) = w.def.preset {
        let mut spec = p.workload(&w.def.name, &ep.url, &model, Some(load), Some(batch));
        if gen {
            spec.output = output;
        }
        return (spec, Some(p));
    }
    let spec = bench::WorkloadSpec {
        name: w.def.name.clone(),
        kind: if gen {
            bench::WorkloadKind::Completions
        } else {
            bench::WorkloadKind::Embed
        },
        url: ep.url.clone(),
        model,
        load,
        input: bench::LengthDist::Fixed(w.def.input_tokens),
        output,
        batch,
        input_file: None,
    };
    (spec, None)
}

/// The presets bench ran, by workload, as results keep them.
fn presets_used(r: &bench::BenchResults) -> BTreeMap<String, PresetUse> {
    r.workloads
        .iter()
        .filter_map(|w| {
            let p = w.preset?;
            Some((
                w.name.clone(),
                PresetUse {
                    preset: p.name().to_string(),
                    streamed: w.streamed,
                    note: p.note().to_string(),
                },
            ))
        })
        .collect()
}

fn percentiles(s: &bench::Stats) -> Option<Percentiles> {
    if s.count == 0 {
        return None;
    }
    let p = |k: &str| s.percentiles.get(k).copied().unwrap_or(f64::NAN);
    Some(Percentiles {
        mean: s.mean,
        p50: s.median,
        p90: p("p90"),
        p95: p("p95"),
        p99: p("p99"),
    })
}

fn metrics(r: &bench::WorkloadResult, engine: &str) -> WorkloadMetrics {
    let mut m = WorkloadMetrics {
        engine: engine.to_string(),
        completed: r.requests_completed,
        errors: r.errors.clone(),
        timeseries: r.timeseries.iter().map(|p| (p.t, p.throughput)).collect(),
        ..Default::default()
    };
    if let Some(g) = &r.gen {
        m.kind = Some(Kind::Generate);
        m.throughput = g.output_throughput;
        m.requests_per_s = g.request_throughput;
        m.tokens_per_s = g.total_token_throughput;
        m.ttft_ms = percentiles(&g.ttft_ms);
        m.tpot_ms = percentiles(&g.tpot_ms);
        m.itl_ms = percentiles(&g.itl_ms);
        m.latency_ms = percentiles(&g.e2el_ms);
    }
    if let Some(e) = &r.embed {
        m.kind = Some(Kind::Embed);
        m.throughput = e.seq_throughput;
        m.requests_per_s = e.request_throughput;
        m.tokens_per_s = e.token_throughput;
        m.latency_ms = percentiles(&e.latency_ms);
    }
    m
}

fn live_line(p: &bench::Progress) -> String {
    let ws: Vec<String> = p
        .workloads
        .iter()
        .map(|w| {
            let unit = if w.kind.is_some_and(|k| k.is_gen()) {
                "tok/s"
            } else {
                "seq/s"
            };
            format!(
                "{} {:.1} {unit} ({} done, {} err)",
                w.name, w.throughput, w.completed, w.errors
            )
        })
        .collect();
    format!("{:?} {:.0}s  {}", p.phase, p.elapsed, ws.join(", "))
}

impl Harness for RealHarness {
    fn up(&mut self, deployment: &deploy::ValidDeployment, run_dir: &Path) -> Result<()> {
        self.down();
        self.gpu_index = match deployment.spec().gpu {
            deploy::GpuSelector::Index(i) => Some(i),
            _ => None,
        };
        let opts = deploy::UpOptions {
            run_dir: run_dir.to_path_buf(),
            engine_bin: None, // COLOCATE_BIN, else this executable
            // engine output goes to the logs in run_dir; the console has the progress bar
            quiet: true,
        };
        let d = self.rt.block_on(deploy::Deployment::up(deployment, opts))?;
        // workloads go straight to their engine (first replica), not through the gateway;
        // every replica's /metrics is scraped
        self.replicas = d
            .plan()
            .engines
            .iter()
            .map(|e| (e.name.clone(), e.url()))
            .collect();
        for e in &d.plan().engines {
            self.endpoints
                .entry(e.engine.clone())
                .or_insert_with(|| Endpoint {
                    url: e.url(),
                    served_model_name: e.served_model_name.clone(),
                });
        }
        self.running = Some(d);
        self.faults_reported = 0;
        Ok(())
    }

    fn measure(
        &mut self,
        workloads: &[ResolvedWorkload],
        warmup: Duration,
        duration: Duration,
        live: &dyn Fn(String),
        cancel: &AtomicBool,
    ) -> Result<Measurement> {
        let mut spec = bench::BenchSpec::new(Vec::new());
        for w in workloads {
            let ep = self.endpoints.get(&w.def.engine).ok_or_else(|| {
                anyhow!(
                    "workload {}: engine {} is not running",
                    w.def.name,
                    w.def.engine
                )
            })?;
            let (ws, preset) = bench_workload(w, ep);
            spec.push_workload(ws, preset);
        }
        spec.warmup = warmup;
        spec.duration = Some(duration);
        // The repetition's seed: the runner sets it on every workload of the window.
        spec.seed = workloads.iter().find_map(|w| w.def.seed).unwrap_or(0);
        let token = CancellationToken::new();
        // The engines' own counters from before the warm-up to the window's end. A scraper
        // that cannot start leaves every engine "not scraped", never the condition failed.
        let scraper = EngineScraper::start(self.rt.handle(), &self.replicas, scrape_every(warmup))
            .map_err(|e| format!("{e:#}"));
        let warmup_start = unix_now();
        let (tx, mut rx) = tokio::sync::watch::channel(bench::Progress::default());
        let result = self.rt.block_on(async {
            let fut = bench::run(&spec, Some(tx), token.clone());
            tokio::pin!(fut);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    r = &mut fut => break r,
                    changed = rx.changed() => {
                        if changed.is_ok() {
                            live(live_line(&rx.borrow()));
                        }
                    }
                    _ = tick.tick() => {
                        if cancel.load(Ordering::SeqCst) {
                            token.cancel();
                        }
                    }
                }
            }
        })?;
        let (w0, w1) = result.window;
        let engine_metrics = match &scraper {
            Ok(s) => {
                let windows = self.rt.block_on(s.window(w0, w1));
                s.stop();
                windows
            }
            Err(why) => self
                .replicas
                .iter()
                .map(|(name, url)| {
                    EngineMetricsWindow::unscraped(name, url, format!("no scraper: {why}"))
                })
                .collect(),
        };
        for w in &engine_metrics {
            if let Some(why) = w.not_scraped() {
                live(format!("{}: /metrics not scraped: {why}", w.engine));
            }
        }
        let mut out = Measurement {
            window: (w0, w1),
            interrupted: result.interrupted,
            gpu: self.gpu_window(w0, w1),
            engine_metrics,
            presets: presets_used(&result),
            ..Default::default()
        };
        if let Some(d) = &self.running {
            // Read now, as the window closes: a fault logged in its last moment is in.
            let faults = d.mps_faults();
            out.gpu.mps_faults = window_faults(&faults, self.faults_reported, warmup_start, w0);
            self.faults_reported = faults
                .iter()
                .map(|f| f.id)
                .max()
                .unwrap_or(0)
                .max(self.faults_reported);
            for f in &out.gpu.mps_faults {
                live(format!(
                    "MPS fault {} ({}): {}",
                    f.phase.describe(),
                    f.engines.join(", "),
                    f.message
                ));
            }
        }
        for r in &result.workloads {
            let engine = workloads
                .iter()
                .find(|w| w.def.name == r.name)
                .map(|w| w.def.engine.clone())
                .unwrap_or_default();
            out.workloads.insert(r.name.clone(), metrics(r, &engine));
        }
        Ok(out)
    }

    fn down(&mut self) {
        if let Some(d) = self.running.take() {
            if let Err(e) = self.rt.block_on(d.shutdown()) {
                tracing::warn!("deployment shutdown: {e:#}");
            }
        }
        self.endpoints.clear();
        self.replicas.clear();
    }
}

impl Drop for RealHarness {
    fn drop(&mut self) {
        self.down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploy::supervisor::{FaultedClient, MpsFault, MpsFaultKind};

    fn fault(id: u64, at: &str) -> MpsFault {
        MpsFault {
            id,
            at: at.into(),
            log_time: "2026-11-23 20:10:31.616".into(),
            kind: MpsFaultKind::ClientFault,
            clients: vec![
                FaultedClient {
                    pid: 10,
                    engine: Some("gen".into()),
                    culprit: false,
                },
                FaultedClient {
                    pid: 11,
                    engine: Some("embed".into()),
                    culprit: false,
                },
            ],
            message: "sticky error set on client process 10, 11".into(),
            action: Some("every engine of the GPU (gen, embed) restarted".into()),
        }
    }

    fn resolved(exp: &Experiment, name: &str, load: crate::matrix::LoadLevel) -> ResolvedWorkload {
        ResolvedWorkload {
            def: exp.workload(name).unwrap().clone(),
            load,
            rate_per_s: None,
        }
    }

    #[test]
    fn a_preset_workload_is_built_by_bench() {
        let exp = Experiment::parse(
            r#"
name = "p"
warmup = "1s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "gen"
[[deployment.engines]]
name = "emb"
[[workloads]]
name = "g"
engine = "gen"
preset = "seed-gen"
output_tokens = 16
[[workloads]]
name = "e"
engine = "emb"
preset = "seed-embed"
[[workloads]]
name = "plain"
engine = "gen"
kind = "generate"
concurrency = 2
"#,
        )
        .unwrap();
        let ep = Endpoint {
            url: "http://127.0.0.1:8100".into(),
            served_model_name: "qwen".into(),
        };
        let base = |n: &str| crate::matrix::LoadLevel::base(exp.workload(n).unwrap());
        let (g, p) = bench_workload(&resolved(&exp, "g", base("g")), &ep);
        assert_eq!(p, Some(bench::spec::Preset::SeedGen));
        // the seeds' chat API and fixed prompt, the file's output length with ignore_eos
        assert_eq!(g.kind, bench::WorkloadKind::Chat);
        assert_eq!(g.input, bench::LengthDist::Fixed(30));
        assert_eq!(g.output, Some(bench::LengthDist::Fixed(16)));
        assert_eq!(g.load, bench::Load::Closed { concurrency: 512 });
        assert_eq!((g.name.as_str(), g.model.as_str()), ("g", "qwen"));
        // this condition's load and batch
        let load = crate::matrix::LoadLevel {
            concurrency: Some(32),
            rate: None,
            batch: Some(64),
        };
        let (e, p) = bench_workload(&resolved(&exp, "e", load), &ep);
        assert_eq!(p, Some(bench::spec::Preset::SeedEmbed));
        assert_eq!(e.kind, bench::WorkloadKind::Embed);
        assert_eq!((e.batch, e.input), (64, bench::LengthDist::Fixed(25)));
        assert_eq!(e.load, bench::Load::Closed { concurrency: 32 });
        let (plain, p) = bench_workload(&resolved(&exp, "plain", base("plain")), &ep);
        assert_eq!(p, None);
        assert_eq!(plain.kind, bench::WorkloadKind::Completions);
        // the spec bench runs: presets recorded by workload, valid
        let mut spec = bench::BenchSpec::new(Vec::new());
        for (w, p) in [
            (g, Some(bench::spec::Preset::SeedGen)),
            (e, Some(bench::spec::Preset::SeedEmbed)),
            (plain, None),
        ] {
            spec.push_workload(w, p);
        }
        spec.duration = Some(Duration::from_secs(1));
        spec.validate().unwrap();
        assert_eq!(spec.presets.len(), 2);
        assert_eq!(
            spec.preset_of(&spec.workloads[0]),
            Some(bench::spec::Preset::SeedGen)
        );
        assert_eq!(spec.workloads[2].name, "plain");
    }

    #[test]
    fn engines_are_scraped_within_the_warmup() {
        assert_eq!(
            scrape_every(Duration::from_secs(30)),
            Duration::from_secs(5)
        );
        assert_eq!(scrape_every(Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(scrape_every(Duration::ZERO), Duration::from_millis(500));
    }

    #[test]
    fn faults_are_placed_around_the_window_and_given_once() {
        // 1_000_000_000 s = 2001-09-09T01:46:40Z
        let faults = vec![
            fault(1, "2001-09-09T01:46:30Z"),
            fault(2, "2001-09-09T01:46:35Z"),
            fault(3, "2001-09-09T01:46:39.5Z"),
            fault(4, "2001-09-09T01:46:45+00:00"),
            fault(5, "not a time"),
        ];
        let w = window_faults(&faults, 1, 1_000_000_000.0 - 2.0, 1_000_000_001.0);
        let phases: Vec<FaultPhase> = w.iter().map(|f| f.phase).collect();
        assert_eq!(
            phases,
            vec![
                FaultPhase::BeforeWarmup,
                FaultPhase::Warmup,
                FaultPhase::Window,
                FaultPhase::Window
            ]
        );
        assert_eq!(w[1].t, 999_999_999.5);
        assert_eq!(w[0].engines, vec!["gen", "embed"]);
        assert!(w[0].action.as_deref().unwrap().contains("restarted"));
        assert!(window_faults(&faults, 5, 0.0, 0.0).is_empty());
    }
}
