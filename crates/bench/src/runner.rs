//! One benchmark run: pre-flight, the load drivers (closed and open loop), the window,
//! and the reduction of request records to results.
//!
//! Timeline: pre-flight (every endpoint probed and calibrated; an unreachable one fails the
//! run here, before any load) -> load starts at `started_at` -> warm-up -> the measurement
//! window `[w0, w1)` (by time, or until `max_requests` requests completed in it) ->
//! [drain] -> stop: no new requests, in-flight ones are cut and keep what they streamed ->
//! statistics over the requests sent before `w1`.
//! The load runs without a pause across the window edges, so a request straddling an edge
//! contributes the tokens that arrived inside (see `metrics`).
//!
//! The drain: a workload whose responses come whole (gen not streamed, and every embed
//! workload) counts each response's tokens or sequences over its lifetime, so a request in
//! flight at `w1` has its share only once it has ended. When the run has such a workload, it waits after `w1`
//! ([`Phase::Draining`]) until every whole response sent before `w1` has ended, bounded by
//! [`drain_timeout`], with every workload's load still running (closed loops keep sending,
//! open loops keep arriving), so the engines and their co-located neighbours stay under the
//! window's load; then it stops, cutting what is in flight, and drops every request sent
//! at or after `w1`. Streamed workloads are measured as without it: their chunks are timed,
//! and their figures only count what came before `w1`. Latency and request counts keep
//! their rule (requests that ended inside the window). An interruption cuts at once, drain
//! or not.
//!
//! A workload that names a [`Preset`] runs as the seed study's client did: the preset's
//! fixed texts (`Preset::prompt_source`), and gen requests sent whole when the preset does
//! not stream (`unstreamed`): its results then carry `streamed: false`, and no TTFT, TPOT
//! or ITL.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::arrivals::{Arrivals, Schedule};
use crate::client::{
    calibrate, embed_body, gen_body, make_client, run_embed, run_gen, until_stopped, Clock,
};
use crate::metrics::{embed_stats, errors_in, gen_stats, timeseries, RequestRecord};
use crate::prompt::{read_lines, request_rng, Calibration, PromptSource};
use crate::results::{BenchResults, WorkloadResult, SCHEMA_VERSION};
use crate::spec::{BenchSpec, Load, Preset, WorkloadKind, WorkloadSpec};
use crate::unstreamed::run_gen_unstreamed;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Preflight,
    Warmup,
    Measuring,
    /// After the window: waiting for the whole responses in flight at its end.
    Draining,
    Finishing,
    Done,
}

/// Live figures of one workload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkloadProgress {
    pub name: String,
    pub kind: Option<WorkloadKind>,
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
    pub in_flight: u64,
    /// Output tokens/s (gen) or sequences/s (embed) since the previous update.
    pub throughput: f64,
}

/// Live state of a run, published about four times a second.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    /// Seconds since the load started.
    pub elapsed: f64,
    /// Seconds of the warm-up, and of the window when it is set by time.
    pub warmup: f64,
    pub duration: Option<f64>,
    pub workloads: Vec<WorkloadProgress>,
    /// While draining: what is left of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainProgress>,
}

/// Where a drain is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainProgress {
    /// Whole responses sent before the window's end and still in flight.
    pub left: u64,
    /// Seconds since the window's end, and the time-out.
    pub elapsed: f64,
    pub timeout: f64,
}

/// The most a drain waits, whatever the E2EL seen.
pub const DRAIN_TIMEOUT_MAX: Duration = Duration::from_secs(300);

/// How long to wait after the window for the whole responses in flight at its end: twice
/// the longest E2EL of a whole response seen by then (those in flight were sent before the
/// end under the same load, so they need about one E2EL at most), at most
/// [`DRAIN_TIMEOUT_MAX`], which is also the wait when none has ended yet.
pub fn drain_timeout(longest_e2el: Option<f64>) -> Duration {
    match longest_e2el {
        Some(e) if e.is_finite() && e > 0.0 => {
            Duration::from_secs_f64(2.0 * e).min(DRAIN_TIMEOUT_MAX)
        }
        _ => DRAIN_TIMEOUT_MAX,
    }
}

/// What every request task shares.
struct Shared {
    clock: Clock,
    seed: u64,
    /// Seeds the prompts' texts when set (`BenchSpec::prompt_seed`).
    prompt_seed: Option<u64>,
    /// Cancelled at the end of the run: no new requests, in-flight ones are cut.
    stop: CancellationToken,
    w0: f64,
    max_requests: Option<u64>,
    in_window: AtomicU64,
    closed: Notify,
    /// Told whenever a whole (non-streamed) request ends, for the drain.
    whole_ended: Notify,
}

/// One workload's driver state.
struct WorkloadState {
    idx: usize,
    spec: WorkloadSpec,
    /// The seed study's client this workload runs as: its fixed texts, and whole
    /// (non-streamed) responses where the preset says so.
    preset: Option<Preset>,
    endpoint: String,
    client: reqwest::Client,
    source: PromptSource,
    records: Mutex<Vec<RequestRecord>>,
    next_req: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    /// Content chunks or output tokens (gen) or sequences (embed) received, for live
    /// progress.
    units: AtomicU64,
    /// Whole (non-streamed) requests in flight: request index -> a time at or before its
    /// send (taken just before it), for the drain.
    whole_in_flight: Mutex<BTreeMap<u64, f64>>,
}

impl WorkloadState {
    /// Whether gen requests are streamed (every workload but a preset that says not).
    fn streams(&self) -> bool {
        self.preset.is_none_or(|p| p.streams())
    }

    /// A workload whose responses come whole (gen not streamed, every embed): its counts
    /// spread each response over its lifetime, so the runner drains it after the window.
    fn whole(&self) -> bool {
        !self.spec.kind.is_gen() || !self.streams()
    }

    /// Runs one whole request, registered in [`Self::whole_in_flight`] from before its
    /// send (the request's own send time is taken after) so that a request sent before the
    /// window's end is always waited for.
    async fn whole_request(
        &self,
        sh: &Shared,
        i: u64,
        request: impl Future<Output = bool>,
    ) -> bool {
        if let Ok(mut m) = self.whole_in_flight.lock() {
            m.insert(i, sh.clock.now());
        }
        let finished = request.await;
        if let Ok(mut m) = self.whole_in_flight.lock() {
            m.remove(&i);
        }
        sh.whole_ended.notify_one();
        finished
    }

    /// Whole requests in flight that were sent before `t`.
    fn whole_in_flight_before(&self, t: f64) -> u64 {
        self.whole_in_flight
            .lock()
            .map(|m| m.values().filter(|&&s| s < t).count() as u64)
            .unwrap_or(0)
    }

    /// The longest E2EL of the successful requests recorded so far.
    fn longest_e2el(&self) -> Option<f64> {
        let recs = self.records.lock().ok()?;
        recs.iter()
            .filter(|r| r.success)
            .filter_map(|r| r.e2el())
            .max_by(f64::total_cmp)
    }
}

/// Runs the benchmark. `cancel` ends it early (Ctrl-C): the results then cover the window
/// up to the cut and say `interrupted`. Fails before any load if an endpoint is unreachable.
pub async fn run(
    spec: &BenchSpec,
    progress: Option<watch::Sender<Progress>>,
    cancel: CancellationToken,
) -> anyhow::Result<BenchResults> {
    let mut spec = spec.clone();
    spec.fill_names();
    spec.validate()?;
    let clock = Clock::new();

    // One connection pool per endpoint origin.
    let mut clients: BTreeMap<String, reqwest::Client> = BTreeMap::new();
    for w in &spec.workloads {
        if let std::collections::btree_map::Entry::Vacant(e) = clients.entry(w.origin()) {
            e.insert(make_client()?);
        }
    }
    let client_of = |w: &WorkloadSpec| clients[&w.origin()].clone();

    // Pre-flight: every endpoint answers, prompts are calibrated.
    let calibs = futures::future::try_join_all(spec.workloads.iter().map(|w| {
        let c = client_of(w);
        async move { calibrate(&c, w, spec.seed).await }
    }));
    let calibs: Vec<Calibration> = tokio::select! {
        r = calibs => r?,
        _ = cancel.cancelled() => anyhow::bail!("interrupted before the warm-up"),
    };
    let mut states = Vec::new();
    for (idx, (w, cal)) in spec.workloads.iter().zip(&calibs).enumerate() {
        let preset = spec.preset_of(w);
        let min_input = match w.input {
            crate::spec::LengthDist::Fixed(n) => n,
            crate::spec::LengthDist::Uniform { min, .. } => min,
        };
        if w.input_file.is_none()
            && preset.is_none()
            && (min_input as f64) < cal.overhead_tokens + 1.0
        {
            tracing::warn!(
                "workload {}: the server adds about {:.0} tokens to every prompt (e.g. a chat template), so input={} cannot be met; prompts will be longer",
                w.name,
                cal.overhead_tokens,
                min_input
            );
        }
        let source = match (preset, &w.input_file) {
            (Some(p), _) => p.prompt_source(),
            (None, Some(p)) => PromptSource::Lines(Arc::new(
                read_lines(p).with_context(|| format!("workload {}", w.name))?,
            )),
            (None, None) => PromptSource::Random(*cal),
        };
        states.push(Arc::new(WorkloadState {
            idx,
            spec: w.clone(),
            preset,
            endpoint: w.endpoint(),
            client: client_of(w),
            source,
            records: Mutex::new(Vec::new()),
            next_req: AtomicU64::new(0),
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            units: AtomicU64::new(0),
            whole_in_flight: Mutex::new(BTreeMap::new()),
        }));
    }

    let started_at = clock.now();
    let w0 = started_at + spec.warmup.as_secs_f64();
    let planned_end = spec.duration.map(|d| w0 + d.as_secs_f64());
    let shared = Arc::new(Shared {
        clock,
        seed: spec.seed,
        prompt_seed: spec.prompt_seed,
        stop: CancellationToken::new(),
        w0,
        max_requests: spec.max_requests,
        in_window: AtomicU64::new(0),
        closed: Notify::new(),
        whole_ended: Notify::new(),
    });
    let mut drivers = JoinSet::new();
    for ws in &states {
        // a load step: the workload's own load until it, the step's load from it
        let step_at = ws.spec.step.as_ref().map(|s| w0 + s.at.as_secs_f64());
        let load = ws.spec.load.clone();
        spawn_driver(&mut drivers, ws, &shared, load, (started_at, step_at), 0)?;
        if let (Some(step), Some(at)) = (&ws.spec.step, step_at) {
            spawn_driver(&mut drivers, ws, &shared, step.load.clone(), (at, None), 1)?;
        }
    }

    // Wait for the end of the window, publishing progress.
    let mut prog = Progress {
        phase: Phase::Warmup,
        warmup: spec.warmup.as_secs_f64(),
        duration: spec.duration.map(|d| d.as_secs_f64()),
        workloads: states
            .iter()
            .map(|s| WorkloadProgress {
                name: s.spec.name.clone(),
                kind: Some(s.spec.kind),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut live = Live {
        last_units: vec![0; states.len()],
        last_t: clock.now(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let end_sleep = planned_end.map(|e| clock.instant_at(e));
    let far = std::time::Instant::now() + Duration::from_secs(365 * 86400);
    let mut interrupted = false;
    let mut closed_by_count = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => { interrupted = true; break; }
            _ = shared.closed.notified(), if shared.max_requests.is_some() => { closed_by_count = true; break; }
            _ = tokio::time::sleep_until(end_sleep.unwrap_or(far).into()), if end_sleep.is_some() => break,
        }
        let now = live.refresh(&mut prog, &states, &clock, started_at);
        prog.phase = if now < w0 {
            Phase::Warmup
        } else {
            Phase::Measuring
        };
        if let Some(tx) = &progress {
            let _ = tx.send(prog.clone());
        }
    }
    let now = clock.now();
    // The window's end where it is known now (by count: the max-th completion, found in
    // the records once every task has reported).
    let known_w1 = if closed_by_count {
        None
    } else if interrupted {
        Some(now.max(w0))
    } else {
        Some(planned_end.unwrap_or(now))
    };

    // Drain: wait for the whole responses sent before the window's end (by count, before
    // now: a superset), the load still running.
    let mut drain = None;
    let whole: Vec<&Arc<WorkloadState>> = states.iter().filter(|s| s.whole()).collect();
    if !interrupted && !whole.is_empty() {
        let bound = known_w1.unwrap_or(now);
        let timeout = drain_timeout(
            whole
                .iter()
                .filter_map(|s| s.longest_e2el())
                .max_by(f64::total_cmp),
        );
        let deadline = std::time::Instant::now() + timeout;
        let left = || -> u64 { whole.iter().map(|s| s.whole_in_flight_before(bound)).sum() };
        let mut timed_out = false;
        let mut publish = true;
        loop {
            let n = left();
            if publish {
                let t = live.refresh(&mut prog, &states, &clock, started_at);
                prog.phase = Phase::Draining;
                prog.drain = Some(DrainProgress {
                    left: n,
                    elapsed: (t - bound).max(0.0),
                    timeout: timeout.as_secs_f64(),
                });
                if let Some(tx) = &progress {
                    let _ = tx.send(prog.clone());
                }
            }
            if n == 0 {
                break;
            }
            tokio::select! {
                _ = tick.tick() => publish = true,
                _ = shared.whole_ended.notified() => publish = false,
                _ = tokio::time::sleep_until(deadline.into()) => { timed_out = true; break; }
                _ = cancel.cancelled() => { interrupted = true; break; }
            }
        }
        if timed_out {
            tracing::warn!(
                "drain: {} whole responses sent before the window's end still in flight after {:.1} s; cut, their tokens are missing",
                left(),
                timeout.as_secs_f64()
            );
        }
        drain = Some(crate::results::Drain {
            ended: clock.now(),
            timeout_s: timeout.as_secs_f64(),
            timed_out,
        });
        prog.drain = None;
    }

    // Stop: cut in-flight requests (they keep what they streamed) and collect.
    shared.stop.cancel();
    prog.phase = Phase::Finishing;
    if let Some(tx) = &progress {
        let _ = tx.send(prog.clone());
    }
    while let Some(r) = drivers.join_next().await {
        if let Err(e) = r {
            if e.is_panic() {
                anyhow::bail!("a load driver panicked: {e}");
            }
        }
    }
    let mut all: Vec<Vec<RequestRecord>> = Vec::new();
    for s in &states {
        all.push(std::mem::take(
            &mut *s
                .records
                .lock()
                .map_err(|_| anyhow::anyhow!("records lock poisoned"))?,
        ));
    }
    let w1 = known_w1.unwrap_or_else(|| {
        // Exactly `max_requests` completions in the window: it closes just after the
        // max-th completion in time (tasks may report completions out of order), 1 µs
        // after it or halfway to the next one if that came sooner (an f64 Unix time
        // resolves about 0.24 µs; completions at the same instant all count).
        let mut ends: Vec<f64> = all
            .iter()
            .flatten()
            .filter(|r| r.success && r.end >= w0)
            .map(|r| r.end)
            .collect();
        ends.sort_by(f64::total_cmp);
        let k = spec.max_requests.unwrap_or(1).max(1) as usize;
        match (ends.get(k - 1), ends.get(k)) {
            (Some(&last), Some(&next)) if next > last => last + ((next - last) / 2.0).min(1e-6),
            (Some(&last), _) => last + 1e-6,
            (None, _) => now + 1e-6,
        }
    });
    // Requests sent after the window's end (while draining) count for nothing.
    for recs in &mut all {
        recs.retain(|r| r.sent < w1);
    }
    let window = (w0.min(w1), w1);

    let mut results = BenchResults {
        schema_version: SCHEMA_VERSION,
        spec: spec.clone(),
        started_at,
        window,
        interrupted,
        drain,
        workloads: Vec::new(),
        requests: Vec::new(),
    };
    let (a, b) = window;
    for ((s, cal), recs) in states.iter().zip(calibs).zip(all) {
        let gen = s.spec.kind.is_gen();
        results.workloads.push(WorkloadResult {
            name: s.spec.name.clone(),
            kind: s.spec.kind,
            requests_completed: recs
                .iter()
                .filter(|r| r.success && r.end >= a && r.end < b)
                .count() as u64,
            errors: errors_in(&recs, a, b),
            unfinished: if gen && !s.streams() {
                recs.iter()
                    .filter(|r| !r.success && r.error.is_none())
                    .count() as u64
            } else {
                0
            },
            gen: gen.then(|| gen_stats(&recs, a, b, &spec.percentiles, spec.slo.as_ref())),
            embed: (!gen).then(|| embed_stats(&recs, a, b, &spec.percentiles)),
            timeseries: timeseries(&recs, gen, a, b),
            calibration: cal,
            requests_sent: recs.len() as u64,
            preset: s.preset,
            streamed: !gen || s.streams(),
        });
        if spec.record_requests {
            results.requests.extend(recs);
        }
    }
    results.requests.sort_by(|x, y| x.sent.total_cmp(&y.sent));
    prog.phase = Phase::Done;
    if let Some(tx) = &progress {
        let _ = tx.send(prog);
    }
    Ok(results)
}

/// What the live progress figures are computed against.
struct Live {
    last_units: Vec<u64>,
    last_t: f64,
}

impl Live {
    /// Updates the elapsed time and every workload's live figures; returns now.
    fn refresh(
        &mut self,
        prog: &mut Progress,
        states: &[Arc<WorkloadState>],
        clock: &Clock,
        started_at: f64,
    ) -> f64 {
        let now = clock.now();
        let dt = (now - self.last_t).max(1e-6);
        self.last_t = now;
        prog.elapsed = now - started_at;
        for ((p, s), last) in prog
            .workloads
            .iter_mut()
            .zip(states)
            .zip(self.last_units.iter_mut())
        {
            let units = s.units.load(Relaxed);
            p.throughput = (units - *last) as f64 / dt;
            *last = units;
            p.sent = s.next_req.load(Relaxed);
            p.completed = s.done.load(Relaxed);
            p.errors = s.errors.load(Relaxed);
            p.in_flight = s.in_flight.load(Relaxed);
        }
        now
    }
}

/// Starts the closed- or open-loop driver of one workload's `load` over `(from, until)`
/// on the run's clock (`until` = `None`: to the end of the run). A closed loop's slots start
/// at `from` and start no request at or after `until`; an open loop's arrivals fall in
/// between. `part` numbers the loads of one workload (0, and 1 after a load step), so that
/// each draws arrivals of its own.
fn spawn_driver(
    set: &mut JoinSet<()>,
    ws: &Arc<WorkloadState>,
    sh: &Arc<Shared>,
    load: Load,
    (from, until): (f64, Option<f64>),
    part: u64,
) -> anyhow::Result<()> {
    match load {
        Load::Closed { concurrency } => {
            for _ in 0..concurrency {
                let (ws, sh) = (ws.clone(), sh.clone());
                set.spawn(async move {
                    if sh.clock.now() < from {
                        tokio::select! {
                            _ = tokio::time::sleep_until(sh.clock.instant_at(from).into()) => {}
                            _ = sh.stop.cancelled() => return,
                        }
                    }
                    while !sh.stop.is_cancelled() && until.is_none_or(|u| sh.clock.now() < u) {
                        if !one_request(&ws, &sh, None).await {
                            // A failing endpoint (503 when its queue is full, refused
                            // connections) would otherwise be hammered in a tight loop that
                            // steals CPU from the engines on the same machine.
                            tokio::select! {
                                _ = tokio::time::sleep(ERROR_BACKOFF) => {}
                                _ = sh.stop.cancelled() => {}
                            }
                        }
                    }
                });
            }
        }
        Load::Open {
            rate,
            burstiness,
            max_concurrency,
        } => {
            let seed = request_rng(sh.seed, ws.idx, u64::MAX - part).next_u64_seed();
            let schedule = Schedule::new(Arrivals::new(rate, burstiness, seed)?, from, until);
            let sem = max_concurrency.map(|n| Arc::new(Semaphore::new(n)));
            let (ws, sh) = (ws.clone(), sh.clone());
            set.spawn(async move {
                let mut tasks = JoinSet::new();
                for t in schedule {
                    let at = sh.clock.instant_at(t);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = sh.stop.cancelled() => break,
                    }
                    let permit = match &sem {
                        Some(s) => tokio::select! {
                            p = s.clone().acquire_owned() => match p { Ok(p) => Some(p), Err(_) => break },
                            _ = sh.stop.cancelled() => break,
                        },
                        None => None,
                    };
                    let (ws, sh) = (ws.clone(), sh.clone());
                    tasks.spawn(async move {
                        one_request(&ws, &sh, Some(t)).await;
                        drop(permit);
                    });
                    while tasks.try_join_next().is_some() {}
                }
                while tasks.join_next().await.is_some() {}
            });
        }
    }
    Ok(())
}

trait SeedFromRng {
    fn next_u64_seed(self) -> u64;
}

impl SeedFromRng for rand::rngs::StdRng {
    fn next_u64_seed(mut self) -> u64 {
        rand::RngCore::next_u64(&mut self)
    }
}

/// Pause of a closed-loop slot after a failed request.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Builds, sends and records one request; false when it failed.
async fn one_request(ws: &WorkloadState, sh: &Shared, scheduled: Option<f64>) -> bool {
    let i = ws.next_req.fetch_add(1, Relaxed);
    let mut rng = request_rng(sh.seed, ws.idx, i);
    // The texts' own stream, where the spec separates it from lengths and arrivals.
    let mut text_rng = sh.prompt_seed.map(|s| request_rng(s, ws.idx, i));
    let w = &ws.spec;
    let mut rec = RequestRecord {
        workload: ws.idx,
        sequences: w.batch as u32,
        prompt_tokens_estimated: true,
        ..Default::default()
    };
    ws.in_flight.fetch_add(1, Relaxed);
    let finished = if w.kind.is_gen() {
        let tokens = w.input.sample(&mut rng);
        let (prompt, est) = ws
            .source
            .prompt(text_rng.as_mut().unwrap_or(&mut rng), tokens);
        let output = w.output.map(|o| o.sample(&mut rng));
        rec.prompt_tokens = Some(est);
        let stream = ws.streams();
        let body = gen_body(w.kind, &w.model, prompt, output, stream);
        if stream {
            let on_content = || {
                ws.units.fetch_add(1, Relaxed);
            };
            until_stopped(
                run_gen(
                    &ws.client,
                    &ws.endpoint,
                    body,
                    &sh.clock,
                    &mut rec,
                    &on_content,
                ),
                &sh.stop,
            )
            .await
        } else {
            let on_tokens = |n: u64| {
                ws.units.fetch_add(n, Relaxed);
            };
            ws.whole_request(
                sh,
                i,
                until_stopped(
                    run_gen_unstreamed(
                        &ws.client,
                        &ws.endpoint,
                        body,
                        &sh.clock,
                        &mut rec,
                        &on_tokens,
                    ),
                    &sh.stop,
                ),
            )
            .await
        }
    } else {
        let mut est = 0;
        let inputs: Vec<String> = (0..w.batch)
            .map(|i| {
                let tokens = w.input.sample(&mut rng);
                let (p, e) = ws
                    .source
                    .prompt_at(text_rng.as_mut().unwrap_or(&mut rng), tokens, i);
                est += e;
                p
            })
            .collect();
        rec.prompt_tokens = Some(est);
        let body = embed_body(&w.model, inputs);
        ws.whole_request(
            sh,
            i,
            until_stopped(
                run_embed(&ws.client, &ws.endpoint, body, w.batch, &sh.clock, &mut rec),
                &sh.stop,
            ),
        )
        .await
    };
    ws.in_flight.fetch_sub(1, Relaxed);
    if !finished {
        // Cut at the end of the run: keeps its chunks, counts in no latency statistic.
        rec.end = sh.clock.now();
        if rec.sent == 0.0 {
            return true;
        }
    }
    rec.scheduled = scheduled.unwrap_or(rec.sent).min(rec.sent);
    if rec.success {
        ws.done.fetch_add(1, Relaxed);
        if !w.kind.is_gen() {
            ws.units.fetch_add(rec.sequences as u64, Relaxed);
        }
        if let Some(max) = sh.max_requests {
            if rec.end >= sh.w0 && sh.in_window.fetch_add(1, Relaxed) + 1 == max {
                sh.closed.notify_one();
            }
        }
    } else if rec.error.is_some() {
        ws.errors.fetch_add(1, Relaxed);
    }
    let ok = rec.error.is_none();
    if let Ok(mut v) = ws.records.lock() {
        v.push(rec);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_waits_twice_the_longest_e2el_at_most_five_minutes() {
        // The H200 runs: E2EL ~10.5 s at 512, ~25.6 s at 1,024.
        assert_eq!(drain_timeout(Some(10.5)), Duration::from_secs(21));
        assert_eq!(drain_timeout(Some(25.5)), Duration::from_secs(51));
        assert_eq!(drain_timeout(Some(200.0)), DRAIN_TIMEOUT_MAX);
        assert_eq!(DRAIN_TIMEOUT_MAX, Duration::from_secs(300));
        // Nothing ended before the window's end: the cap.
        assert_eq!(drain_timeout(None), DRAIN_TIMEOUT_MAX);
        assert_eq!(drain_timeout(Some(f64::NAN)), DRAIN_TIMEOUT_MAX);
    }
}
