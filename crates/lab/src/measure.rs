//! The glue to the crates that run and measure, and the only module that knows them:
//! `deploy`'s running deployments (`Deployment::up` of a condition's validated deployment,
//! its endpoints, MPS faults and shutdown), `bench` (drive the load over one window, a
//! workload that names a preset built by bench's own `Preset::workload`) and `gpu`
//! (environment, counters sampled over the same window). Every engine's `/metrics` is
//! scraped over the window too (`engine_metrics::EngineScraper`). The rest of the lab uses
//! deploy's spec types only (`deployments` builds and validates them), so a change in how
//! deployments run or load is measured is absorbed here.
//!
//! Where each workload's requests go: to its engine when it runs once; through the
//! gateway when the workload says `via = "gateway"` (every workload of a controlled
//! condition does) or the template gives the engine `replicas` (one tenant, balanced); to
//! each replica in turn when the condition runs the engine in copies (one tenant per copy,
//! `tenants::copy_name`). Each tenant keeps a bounded sample of its request latencies for
//! the report's distributions and tests. When any goes through the gateway, the gateway's
//! `/metrics` is sampled too (`gateway_metrics`): the SLO controller's timeline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::engine_metrics::{EngineMetricsWindow, EngineScraper};
use crate::gateway_metrics::{GatewayScraper, GatewayWindow};
use crate::results::{
    host_environment, CopyOf, DrainWait, Environment, FaultPhase, GpuEnv, GpuWindow, LatencySample,
    Percentiles, PresetUse, WindowFault, WorkloadMetrics,
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
/// The prompt-text seed of the `window`-th window of a run whose repetition seed is `seed`:
/// distinct for every window (and from `seed` itself).
fn window_prompt_seed(seed: u64, window: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ window.wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

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

/// An engine replica's address and the model name its requests carry.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The replica's name (the engine's when it runs once).
    name: String,
    url: String,
    served_model_name: String,
}

/// One tenant of a window: a workload against one address.
#[derive(Debug, Clone)]
struct Tenant {
    /// The workload as bench runs it (its name is the tenant's).
    workload: ResolvedWorkload,
    /// Where its requests go.
    endpoint: Endpoint,
    /// The engine (or replica) it drives, as results name it.
    engine: String,
    copy_of: Option<CopyOf>,
}

/// The tenants of `workloads` on the running deployment: `replicas` holds each engine's
/// replicas in order, `balanced` the engines whose replicas are one tenant behind the
/// gateway at `gateway`.
fn tenants_of(
    workloads: &[ResolvedWorkload],
    replicas: &BTreeMap<String, Vec<Endpoint>>,
    balanced: &BTreeSet<String>,
    gateway: Option<&str>,
) -> Result<Vec<Tenant>> {
    let mut out = Vec::new();
    for w in workloads {
        let engine = &w.def.engine;
        let reps = replicas
            .get(engine)
            .filter(|r| !r.is_empty())
            .ok_or_else(|| anyhow!("workload {}: engine {engine} is not running", w.def.name))?;
        let via_gateway = w.def.via == Some(crate::spec::Via::Gateway);
        if reps.len() == 1 && !via_gateway {
            out.push(Tenant {
                workload: w.clone(),
                endpoint: reps[0].clone(),
                engine: engine.clone(),
                copy_of: None,
            });
        } else if balanced.contains(engine) || via_gateway {
            let url = gateway.ok_or_else(|| {
                if via_gateway {
                    anyhow!(
                        "workload {} goes through the gateway and the deployment has none",
                        w.def.name
                    )
                } else {
                    anyhow!(
                        "workload {}: engine {engine} has {} replicas and the deployment no gateway to balance them",
                        w.def.name,
                        reps.len()
                    )
                }
            })?;
            out.push(Tenant {
                workload: w.clone(),
                endpoint: Endpoint {
                    name: engine.clone(),
                    url: url.to_string(),
                    served_model_name: reps[0].served_model_name.clone(),
                },
                engine: engine.clone(),
                copy_of: None,
            });
        } else {
            for (i, ep) in reps.iter().enumerate() {
                let mut copy = w.clone();
                copy.def.name = crate::tenants::copy_name(&w.def.name, i as u32);
                out.push(Tenant {
                    workload: copy,
                    endpoint: ep.clone(),
                    engine: ep.name.clone(),
                    copy_of: Some(CopyOf {
                        workload: w.def.name.clone(),
                        index: i as u32,
                    }),
                });
            }
        }
    }
    Ok(out)
}

/// The real harness: deploy, bench, the GPU sampler and the engines' `/metrics`.
pub struct RealHarness {
    rt: tokio::runtime::Runtime,
    running: Option<deploy::Deployment>,
    /// Each engine's replicas, in order, of the running deployment.
    endpoints: BTreeMap<String, Vec<Endpoint>>,
    /// The running deployment's gateway.
    gateway_url: Option<String>,
    /// Engines the template runs as replicas of one tenant (balanced by the gateway);
    /// replicas of the others are copies, a tenant each.
    balanced: BTreeSet<String>,
    /// Every replica of the running deployment: (replica name, base URL), scraped.
    replicas: Vec<(String, String)>,
    /// The running deployment's GPUs, by index (every one is summarised; `per_gpu`).
    gpus: Vec<u32>,
    /// Where its engine replicas run, as `up` planned them.
    placement: Vec<crate::per_gpu::EnginePlacement>,
    sampler: std::result::Result<gpu::telemetry::Sampler, String>,
    /// Cancelled by Ctrl-C with `cancel`: a deployment still starting stops what it started
    /// and fails, and the runner leaves its condition unrecorded (not run).
    start_cancel: CancellationToken,
    /// The last MPS fault (by id) of the running deployment already given to a window.
    faults_reported: u64,
    /// How often the gateway's `/metrics` is read when workloads go through it (the GPU
    /// sampling interval).
    gateway_every: Duration,
    /// This machine's GPUs by UUID, recorded with each condition.
    machine: Vec<String>,
    /// Windows measured so far: each draws its prompts' texts from its own seed.
    windows: u64,
}

impl RealHarness {
    /// Starts the runtime, the GPU sampler (or notes why there is none) and a Ctrl-C
    /// handler that sets `cancel`.
    pub fn new(exp: &Experiment, cancel: Arc<AtomicBool>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let start_cancel = CancellationToken::new();
        let on_signal = start_cancel.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\ninterrupted: finishing the current window; `lab run --resume` continues"
                );
                cancel.store(true, Ordering::SeqCst);
                on_signal.cancel();
            }
        });
        let sampler =
            gpu::telemetry::Sampler::start(exp.sample_interval, None).map_err(|e| format!("{e:#}"));
        Ok(RealHarness {
            rt,
            running: None,
            endpoints: BTreeMap::new(),
            gateway_url: None,
            balanced: exp
                .deployment
                .engines
                .iter()
                .filter(|e| e.replicas > 1)
                .map(|e| e.name.clone())
                .collect(),
            replicas: Vec::new(),
            gpus: Vec::new(),
            placement: Vec::new(),
            sampler,
            start_cancel,
            faults_reported: 0,
            gateway_every: exp.sample_interval,
            machine: gpu::info()
                .map(|g| g.into_iter().map(|g| g.uuid).collect())
                .unwrap_or_default(),
            windows: 0,
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
        crate::per_gpu::window(
            &sampler.samples(),
            &self.gpus,
            w0,
            w1,
            sampler.notes(),
            self.placement.clone(),
        )
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
        step: None,
    };
    (spec, None)
}

/// The load step of `w` as bench runs it, in a window of `window`: its time after the
/// window opens, and its load (a `% of solo` rate was resolved by the runner).
fn bench_step(w: &ResolvedWorkload, window: Duration) -> Option<bench::spec::LoadStep> {
    let step = w.load.step?;
    let load = match (step.concurrency, step.rate) {
        (Some(c), _) => bench::Load::Closed {
            concurrency: c as usize,
        },
        (None, Some(crate::spec::Rate::PerSecond(rate))) => bench::Load::Open {
            rate,
            burstiness: w.def.burstiness,
            max_concurrency: None,
        },
        // validated: one of the two, and the runner resolves relative rates
        _ => return None,
    };
    Some(bench::spec::LoadStep {
        at: step.at.resolve(window),
        load,
    })
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

/// The presets by the experiment's workload: a copy's entry under the workload it copies.
fn by_workload(
    presets: BTreeMap<String, PresetUse>,
    tenants: &[Tenant],
) -> BTreeMap<String, PresetUse> {
    presets
        .into_iter()
        .map(|(name, used)| {
            let origin = tenants
                .iter()
                .find(|t| t.workload.def.name == name)
                .and_then(|t| t.copy_of.as_ref())
                .map_or(name, |c| c.workload.clone());
            (origin, used)
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

/// Each workload's request latencies (ms) in the window, in the order the requests ended:
/// the requests bench's latency figures count (ended successfully inside the window); E2EL
/// for generate, the request for embed.
fn latencies(r: &bench::BenchResults) -> BTreeMap<String, Vec<f64>> {
    let (w0, w1) = r.window;
    let mut ended: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for q in r.requests.iter().filter(|q| q.in_latency_set(w0, w1)) {
        let gen = r
            .spec
            .workloads
            .get(q.workload)
            .is_some_and(|w| w.kind.is_gen());
        let latency = if gen { q.e2el() } else { Some(q.end - q.sent) };
        if let Some(l) = latency {
            ended.entry(q.workload).or_default().push((q.end, l * 1e3));
        }
    }
    ended
        .into_iter()
        .filter_map(|(i, mut v)| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            let name = r.spec.workloads.get(i)?.name.clone();
            Some((name, v.into_iter().map(|(_, l)| l).collect()))
        })
        .collect()
}

/// What the run's drain was to a workload whose responses come whole (every embed, a gen
/// workload not streamed); `None` for the others or when the run did not drain.
fn drain_of(r: &bench::BenchResults, w: &bench::WorkloadResult) -> Option<DrainWait> {
    let whole = !w.kind.is_gen() || !w.streamed;
    let d = r.drain.as_ref().filter(|_| whole)?;
    Some(DrainWait {
        waited_s: (d.ended - r.window.1).max(0.0),
        timeout_s: d.timeout_s,
        timed_out: d.timed_out,
    })
}

fn metrics(r: &bench::WorkloadResult, engine: &str) -> WorkloadMetrics {
    let mut m = WorkloadMetrics {
        engine: engine.to_string(),
        completed: r.requests_completed,
        errors: r.errors.clone(),
        timeseries: r.timeseries.iter().map(|p| (p.t, p.throughput)).collect(),
        unfinished: r.unfinished,
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
    fn gpu_uuids(&self) -> Vec<String> {
        self.machine.clone()
    }

    fn up(&mut self, deployment: &deploy::ValidDeployment, run_dir: &Path) -> Result<()> {
        self.down();
        // every GPU of the deployment is measured (issue 19); one named by UUID: the first
        self.gpus = deploy::topology::deployment_gpus(deployment.spec())
            .into_iter()
            .filter_map(|g| match g {
                deploy::GpuSelector::Index(i) => Some(i),
                _ => None,
            })
            .collect();
        let opts = deploy::UpOptions {
            run_dir: run_dir.to_path_buf(),
            engine_bin: None, // COLOCATE_BIN, else this executable
            // engine output goes to the logs in run_dir; the console has the progress bar
            quiet: true,
            start_cancel: self.start_cancel.clone(),
        };
        let d = self.rt.block_on(deploy::Deployment::up(deployment, opts))?;
        // workloads go straight to their engine, to each copy, or through the gateway to
        // replicas of one tenant (`tenants_of`); every replica's /metrics is scraped
        self.replicas = d
            .plan()
            .engines
            .iter()
            .map(|e| (e.name.clone(), e.url()))
            .collect();
        for e in &d.plan().engines {
            self.endpoints
                .entry(e.engine.clone())
                .or_default()
                .push(Endpoint {
                    name: e.name.clone(),
                    url: e.url(),
                    served_model_name: e.served_model_name.clone(),
                });
        }
        self.gateway_url = d.gateway_url();
        self.placement = crate::per_gpu::EnginePlacement::of_plan(d.plan());
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
        let tenants = tenants_of(
            workloads,
            &self.endpoints,
            &self.balanced,
            self.gateway_url.as_deref(),
        )?;
        let mut spec = bench::BenchSpec::new(Vec::new());
        for t in &tenants {
            let (mut ws, preset) = bench_workload(&t.workload, &t.endpoint);
            ws.step = bench_step(&t.workload, duration);
            spec.push_workload(ws, preset);
        }
        spec.warmup = warmup;
        spec.duration = Some(duration);
        // every request, for each tenant's latency sample
        spec.record_requests = true;
        // The repetition's seed: the runner sets it on every workload of the window.
        spec.seed = workloads.iter().find_map(|w| w.def.seed).unwrap_or(0);
        // Lengths and arrivals stay the repetition's, the texts are this window's own:
        // engines kept running from one condition to the next (vLLM's and the built-in
        // engine's prefix caches) must not find an earlier window's prompts cached, which
        // would make a later condition look faster than the baseline it is compared with.
        self.windows += 1;
        spec.prompt_seed = Some(window_prompt_seed(spec.seed, self.windows));
        let token = CancellationToken::new();
        // The engines' own counters from before the warm-up to the window's end. A scraper
        // that cannot start leaves every engine "not scraped", never the condition failed.
        let scraper = EngineScraper::start(self.rt.handle(), &self.replicas, scrape_every(warmup))
            .map_err(|e| format!("{e:#}"));
        // The gateway's controller, when workloads go through the gateway.
        let gateway = self
            .gateway_url
            .as_deref()
            .filter(|g| tenants.iter().any(|t| t.endpoint.url.as_str() == *g));
        let gateway_scraper = gateway.map(|g| {
            (
                g.to_string(),
                GatewayScraper::start(self.rt.handle(), g, self.gateway_every)
                    .map_err(|e| format!("{e:#}")),
            )
        });
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
        let gateway = gateway_scraper.map(|(url, s)| match s {
            Ok(s) => self.rt.block_on(s.window(w0, w1)),
            Err(why) => GatewayWindow {
                url,
                notes: vec![format!("not scraped: {why}")],
                ..Default::default()
            },
        });
        let mut out = Measurement {
            window: (w0, w1),
            interrupted: result.interrupted,
            gpu: self.gpu_window(w0, w1),
            engine_metrics,
            presets: by_workload(presets_used(&result), &tenants),
            gateway,
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
        let mut samples = latencies(&result);
        for r in &result.workloads {
            let tenant = tenants.iter().find(|t| t.workload.def.name == r.name);
            let mut m = metrics(r, tenant.map(|t| t.engine.as_str()).unwrap_or_default());
            m.copy_of = tenant.and_then(|t| t.copy_of.clone());
            m.drain = drain_of(&result, r);
            m.latency_sample = samples.remove(&r.name).map(|v| LatencySample::of(&v));
            out.workloads.insert(r.name.clone(), m);
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
        self.gateway_url = None;
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
            name: "gen".into(),
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
            step: None,
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

    fn ep(name: &str, port: u16) -> Endpoint {
        Endpoint {
            name: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            served_model_name: "m".into(),
        }
    }

    /// A workload goes to its engine when it runs once, through the gateway to replicas of
    /// one tenant, and to each copy as a tenant of its own.
    #[test]
    fn tenants_follow_copies_and_replicas() {
        let exp = Experiment::parse(
            r#"
name = "t"
warmup = "1s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "one"
[[deployment.engines]]
name = "small"
[[deployment.engines]]
name = "pool"
[[workloads]]
name = "a"
engine = "one"
kind = "generate"
concurrency = 1
[[workloads]]
name = "b"
engine = "small"
kind = "generate"
concurrency = 1
[[workloads]]
name = "c"
engine = "pool"
kind = "embed"
concurrency = 1
"#,
        )
        .unwrap();
        let ws: Vec<ResolvedWorkload> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                resolved(
                    &exp,
                    n,
                    crate::matrix::LoadLevel::base(exp.workload(n).unwrap()),
                )
            })
            .collect();
        let replicas: BTreeMap<String, Vec<Endpoint>> = [
            ("one", vec![ep("one", 1)]),
            ("small", vec![ep("small-0", 2), ep("small-1", 3)]),
            ("pool", vec![ep("pool-0", 4), ep("pool-1", 5)]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let balanced: BTreeSet<String> = ["pool".to_string()].into();
        let ts = tenants_of(&ws, &replicas, &balanced, Some("http://127.0.0.1:9")).unwrap();
        let got: Vec<(&str, &str, &str)> = ts
            .iter()
            .map(|t| {
                (
                    t.workload.def.name.as_str(),
                    t.endpoint.url.as_str(),
                    t.engine.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "http://127.0.0.1:1", "one"),
                ("b-0", "http://127.0.0.1:2", "small-0"),
                ("b-1", "http://127.0.0.1:3", "small-1"),
                ("c", "http://127.0.0.1:9", "pool"),
            ]
        );
        assert_eq!(
            ts[2].copy_of,
            Some(CopyOf {
                workload: "b".into(),
                index: 1
            })
        );
        assert!(ts[3].copy_of.is_none());
        let e = tenants_of(&ws, &replicas, &balanced, None).unwrap_err();
        assert!(
            format!("{e:#}").contains("no gateway to balance them"),
            "{e:#}"
        );
        let e = tenants_of(&ws, &BTreeMap::new(), &balanced, None).unwrap_err();
        assert!(
            format!("{e:#}").contains("workload a: engine one is not running"),
            "{e:#}"
        );
    }
}
