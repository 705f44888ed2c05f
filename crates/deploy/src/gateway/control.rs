//! Tenant priorities and SLO control: the tenants, their measured latency, the AIMD
//! [`controller`](super::controller) on a tick, and best-effort [`admission`](super::admission).
//!
//! A tenant is what a request names in `model`: the engine(s) serving that model, with the
//! engine's `priority` and `slo`. Each tick (`[gateway.control] interval`) the loop reads
//! every latency tenant's p99 over the window against its objectives, lets the controller
//! decide, and hands the new limit to admission, which releases waiting best-effort
//! requests at once when it rises. Nothing here talks to an engine.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, QueueStats};
use super::controller::{worst, Aimd, Band, Decision, Observation};
use super::slo::{Metric, TenantLatency};
use crate::spec::{ControlSpec, Priority, SloSpec};

/// A tenant as the gateway is told about it.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantSpec {
    /// The engine's name (replicas share it).
    pub name: String,
    /// The model name its requests carry.
    pub model: String,
    pub priority: Priority,
    pub slo: Option<SloSpec>,
    /// Base URLs of its replicas that have the engine lever (`/admin/compute-share`: the
    /// built-in engine's), moved with the limit when `engine_share_tokens` is set.
    pub share_urls: Vec<String>,
}

/// The engine share for a best-effort limit: `limit x per_place` tokens (at least one
/// place's: the engine's cap is at least 1), or no cap (`None`)
/// at the top of the range, where the controller leaves best-effort work alone.
pub fn engine_share(limit: u32, max: u32, per_place: u32) -> Option<u64> {
    (limit < max).then(|| u64::from(limit.max(1)) * u64::from(per_place))
}

/// A lever that loosens as the limit rises: `floor` percent at `min` (and below), up in a
/// line towards 100 at `max`, where it is lifted (`None`: the controller leaves best-effort
/// work alone). Below the top it is never under `floor` (nor 1) and never over `top` (with
/// a floor from 1 to 99, as the spec asks, the line stays under 100 before `max` anyway;
/// `top` bounds any other floor). Both percentage levers use it: the duty cycle
/// ([`engine_duty`]) and the SM share ([`engine_sm`]).
pub fn rising_to_none(limit: u32, min: u32, max: u32, floor: u32, top: u32) -> Option<u32> {
    if limit >= max {
        return None;
    }
    let top = top.clamp(1, 100);
    let above = u64::from(limit.saturating_sub(min));
    let span = u64::from(max - min.min(max)).max(1);
    let d = u64::from(floor) + u64::from(100 - floor.min(100)) * above / span;
    Some((d.min(u64::from(top)) as u32).max(floor.clamp(1, top)))
}

/// The duty cycle for a best-effort limit ([`rising_to_none`]): never 100 below the top,
/// since 100% of the time is no pacing, which only the top lifts.
pub fn engine_duty(limit: u32, min: u32, max: u32, floor: u32) -> Option<u32> {
    rising_to_none(limit, min, max, floor, 99)
}

/// The percentage of the GPU's SMs for a best-effort limit ([`rising_to_none`]), at most
/// 100 (every SM: the engine's whole GPU).
pub fn engine_sm(limit: u32, min: u32, max: u32, floor: u32) -> Option<u32> {
    rising_to_none(limit, min, max, floor, 100)
}

/// One tenant and its live measurements.
pub(crate) struct Tenant {
    pub(crate) spec: TenantSpec,
    latency: Mutex<TenantLatency>,
    /// Its index in [`Admission`] when best-effort.
    best_effort: Option<usize>,
    /// Its requests between arrival and the end of their answers ([`Busy`]).
    in_flight: std::sync::atomic::AtomicUsize,
}

/// One of a tenant's requests in flight, counted until this drops (the answer ended or
/// the client went away).
pub(crate) struct Busy(Arc<Tenant>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tenant {
    /// Records a sample of `metric` for a request that reached the gateway at `start`.
    pub(crate) fn record(&self, metric: Metric, start: Instant, value: Duration) {
        self.latency
            .lock()
            .push(metric, start, Instant::now(), value);
    }

    /// Counts a request of this tenant in flight until the guard drops.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Its place in admission, when it is best-effort.
    pub(crate) fn best_effort(&self) -> Option<usize> {
        self.best_effort
    }
}

/// The controller's counters.
#[derive(Default)]
struct Decisions {
    increase: AtomicU64,
    decrease: AtomicU64,
    hold: AtomicU64,
}

/// Tenants, admission and the controller's state, shared by the handlers and the tick.
pub(crate) struct Control {
    tenants: Vec<Arc<Tenant>>,
    pub(crate) admission: Arc<Admission>,
    aimd: Mutex<AimdState>,
    decisions: Decisions,
    spec: ControlSpec,
    /// The engine share last sent to best-effort engines (-1: none, or no cap).
    engine_share: std::sync::atomic::AtomicI64,
    /// The duty cycle last sent to best-effort engines, in percent (-1: none).
    engine_duty: std::sync::atomic::AtomicI64,
    /// The percentage of the GPU's SMs last sent to best-effort engines (-1: none).
    engine_sm: std::sync::atomic::AtomicI64,
    /// Lever POSTs to engines that failed (refused, or not answered).
    lever_errors: AtomicU64,
    /// The (engine URL, lever) pairs whose failure was logged at warn level already: a
    /// refusal is said once per engine, not every time the limit moves.
    lever_warned: Mutex<std::collections::HashSet<(String, &'static str)>>,
}

struct AimdState {
    aimd: Aimd,
    /// When the limit last changed: requests sent before it saw another limit.
    last_change: Option<Instant>,
    /// The last tick's worst pressure over the whole window.
    pressure: Option<f64>,
}

impl Control {
    /// The tenants of a deployment and the controller's settings.
    pub(crate) fn new(tenants: Vec<TenantSpec>, spec: ControlSpec) -> Control {
        let mut n_be = 0;
        let tenants: Vec<Arc<Tenant>> = tenants
            .into_iter()
            .map(|t| {
                let best_effort = (t.priority == Priority::BestEffort).then(|| {
                    n_be += 1;
                    n_be - 1
                });
                Arc::new(Tenant {
                    spec: t,
                    latency: Mutex::new(TenantLatency::default()),
                    best_effort,
                    in_flight: Default::default(),
                })
            })
            .collect();
        let aimd = Aimd::new(spec.min_best_effort, spec.max_best_effort).with_band(Band {
            increase_below: spec.increase_below,
            decrease_above: spec.decrease_above,
        });
        let admission = Arc::new(Admission::new(
            n_be,
            aimd.limit(),
            spec.queue as usize,
            spec.queue_timeout,
        ));
        Control {
            tenants,
            admission,
            aimd: Mutex::new(AimdState {
                aimd,
                last_change: None,
                pressure: None,
            }),
            decisions: Decisions::default(),
            spec,
            engine_share: std::sync::atomic::AtomicI64::new(-1),
            engine_duty: std::sync::atomic::AtomicI64::new(-1),
            engine_sm: std::sync::atomic::AtomicI64::new(-1),
            lever_errors: AtomicU64::new(0),
            lever_warned: Mutex::new(Default::default()),
        }
    }

    /// The tenant whose requests name `model`.
    pub(crate) fn tenant_of(&self, model: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| t.spec.model == model)
    }

    /// True when some tenant has a priority to enforce (a latency or best-effort one).
    pub(crate) fn active(&self) -> bool {
        self.tenants
            .iter()
            .any(|t| t.spec.priority != Priority::Normal)
    }

    /// One tick: prune the windows, observe, decide, set the limit.
    pub(crate) fn tick(&self, now: Instant) -> Decision {
        let mut st = self.aimd.lock();
        let since = st.last_change;
        let views: Vec<(Option<f64>, Option<f64>, bool)> = self
            .tenants
            .iter()
            .filter(|t| t.spec.priority == Priority::Latency)
            .filter_map(|t| {
                let slo = t.spec.slo?;
                let mut lat = t.latency.lock();
                lat.prune(now, self.spec.window);
                let busy = t.in_flight.load(Ordering::Relaxed) > 0;
                Some((
                    pressure(&lat, &slo, since),
                    pressure(&lat, &slo, None),
                    busy,
                ))
            })
            .collect();
        // the others' windows are pruned too, for what /metrics shows
        for t in &self.tenants {
            if t.spec.priority != Priority::Latency {
                t.latency.lock().prune(now, self.spec.window);
            }
        }
        let obs = Observation {
            fresh: worst(views.iter().map(|v| v.0)),
            window: worst(views.iter().map(|v| v.1)),
            busy: views.iter().any(|v| v.2),
        };
        st.pressure = obs.window;
        let before = st.aimd.limit();
        let decision = st.aimd.step(obs);
        if st.aimd.limit() != before {
            st.last_change = Some(now);
        }
        let counter = match decision {
            Decision::Increase => &self.decisions.increase,
            Decision::Decrease => &self.decisions.decrease,
            Decision::Hold => &self.decisions.hold,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let limit = st.aimd.limit();
        drop(st);
        if decision != Decision::Hold {
            tracing::debug!(limit, "gateway control: {}", decision.name());
        }
        self.admission.set_limit(limit);
        decision
    }

    /// What `/metrics` and `colocate status` show.
    pub fn snapshot(&self) -> ControlSnapshot {
        let (limit, in_flight) = self.admission.load();
        let st = self.aimd.lock();
        let (min, max) = st.aimd.bounds();
        let pressure = st.pressure;
        drop(st);
        let queues = self.admission.stats();
        let tenants = self
            .tenants
            .iter()
            .map(|t| {
                let lat = t.latency.lock();
                let measured = Metric::ALL
                    .into_iter()
                    .filter_map(|m| {
                        let s = lat.series(m);
                        (!s.is_empty()).then(|| MetricNow {
                            metric: m,
                            p99_seconds: s.p99_since(None).unwrap_or(0.0),
                            samples: s.len() as u64,
                            slo_seconds: t.spec.slo.and_then(|slo| objective(&slo, m)),
                        })
                    })
                    .collect();
                TenantSnapshot {
                    name: t.spec.name.clone(),
                    model: t.spec.model.clone(),
                    priority: t.spec.priority,
                    slo: t.spec.slo,
                    latency: measured,
                    queue: t.best_effort.and_then(|i| queues.get(i).cloned()),
                }
            })
            .collect();
        ControlSnapshot {
            limit,
            min,
            max,
            in_flight,
            pressure,
            decisions_increase: self.decisions.increase.load(Ordering::Relaxed),
            decisions_decrease: self.decisions.decrease.load(Ordering::Relaxed),
            decisions_hold: self.decisions.hold.load(Ordering::Relaxed),
            window_seconds: self.spec.window.as_secs_f64(),
            tenants,
            engine_share_tokens: u64::try_from(self.engine_share.load(Ordering::Relaxed)).ok(),
            engine_duty_percent: u32::try_from(self.engine_duty.load(Ordering::Relaxed)).ok(),
            engine_sm_percent: u32::try_from(self.engine_sm.load(Ordering::Relaxed)).ok(),
            engine_lever_errors: self.lever_errors.load(Ordering::Relaxed),
        }
    }
}

/// An SLO's objective for `metric`, in seconds.
fn objective(slo: &SloSpec, metric: Metric) -> Option<f64> {
    match metric {
        Metric::Ttft => slo.ttft_p99,
        Metric::Tpot => slo.tpot_p99,
        Metric::E2el => slo.e2el_p99,
    }
    .map(|d| d.as_secs_f64())
}

/// A latency tenant's worst p99 over objective among the requests in the window sent at
/// or after `since` (`None`: every request in the window); `None` without a sample.
fn pressure(lat: &TenantLatency, slo: &SloSpec, since: Option<Instant>) -> Option<f64> {
    worst(Metric::ALL.into_iter().map(|m| {
        let target = objective(slo, m).filter(|t| *t > 0.0)?;
        Some(lat.series(m).p99_since(since)? / target)
    }))
}

/// Runs [`Control::tick`] every `interval` until cancelled; with `engine_share_tokens`,
/// `engine_duty_floor` or `engine_sm_floor`, also sets each best-effort built-in engine's
/// compute share (its token cap, its duty cycle, its SM partition) whenever what the limit
/// asks for changes (and once at the start, so a restart of the gateway starts clean).
///
/// The token cap and the duty cycle go in one `POST /admin/compute-share`, the SM share in
/// a POST of its own: an engine without SM partitions (any CPU engine, a CUDA engine started
/// without `--sm-partitions`) refuses it with 400, and must not lose the other two with it.
pub(crate) async fn tick_loop(
    control: Arc<Control>,
    client: reqwest::Client,
    cancel: CancellationToken,
) {
    let mut every = tokio::time::interval(control.spec.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pushed_share: Option<(Option<u64>, Option<u32>)> = None;
    let mut pushed_sm: Option<Option<u32>> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => { control.tick(Instant::now()); }
        }
        let spec = &control.spec;
        let (limit, _) = control.admission.load();
        let (min, max) = (spec.min_best_effort, spec.max_best_effort);
        if spec.engine_share_tokens.is_some() || spec.engine_duty_floor.is_some() {
            let share = spec
                .engine_share_tokens
                .and_then(|per| engine_share(limit, max, per));
            let duty = spec
                .engine_duty_floor
                .and_then(|floor| engine_duty(limit, min, max, floor));
            if pushed_share != Some((share, duty)) {
                pushed_share = Some((share, duty));
                control
                    .engine_share
                    .store(share.map_or(-1, |s| s as i64), Ordering::Relaxed);
                control
                    .engine_duty
                    .store(duty.map_or(-1, i64::from), Ordering::Relaxed);
                // Only the levers configured: the other stays as the engine has it.
                let mut body = serde_json::Map::new();
                if spec.engine_share_tokens.is_some() {
                    body.insert("max_tokens_in_flight".into(), serde_json::json!(share));
                }
                if spec.engine_duty_floor.is_some() {
                    body.insert("duty_percent".into(), serde_json::json!(duty));
                }
                post_lever(&control, &client, "compute share", body.into());
            }
        }
        if let Some(floor) = spec.engine_sm_floor {
            let sm = engine_sm(limit, min, max, floor);
            if pushed_sm != Some(sm) {
                pushed_sm = Some(sm);
                control
                    .engine_sm
                    .store(sm.map_or(-1, i64::from), Ordering::Relaxed);
                post_lever(
                    &control,
                    &client,
                    "SM share",
                    serde_json::json!({ "sm_percent": sm }),
                );
            }
        }
    }
}

/// Posts `body` to `/admin/compute-share` of every best-effort built-in replica, without
/// waiting for the answers (a slow engine must not hold the controller up). A failure
/// counts in `lever_errors`; the first of each engine and lever is a warning, the rest
/// debug lines.
fn post_lever(
    control: &Arc<Control>,
    client: &reqwest::Client,
    lever: &'static str,
    body: serde_json::Value,
) {
    for t in &control.tenants {
        if t.spec.priority != Priority::BestEffort {
            continue;
        }
        for url in &t.spec.share_urls {
            let req = client
                .post(format!("{url}/admin/compute-share"))
                .json(&body);
            let (url, control) = (url.clone(), control.clone());
            tokio::spawn(async move {
                let why = match req.send().await {
                    Ok(r) if r.status().is_success() => return,
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        let message = serde_json::from_str::<serde_json::Value>(&text)
                            .ok()
                            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                            .unwrap_or_else(|| text.chars().take(200).collect());
                        format!("answered {status}: {message}")
                    }
                    Err(e) => format!("not set: {e}"),
                };
                control.lever_errors.fetch_add(1, Ordering::Relaxed);
                let first = control.lever_warned.lock().insert((url.clone(), lever));
                if first {
                    tracing::warn!(
                        "{url}: {lever} {why} (said once per engine; colocate_gateway_engine_lever_errors_total counts them all)"
                    );
                } else {
                    tracing::debug!("{url}: {lever} {why}");
                }
            });
        }
    }
}

/// One metric of a tenant over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricNow {
    pub metric: Metric,
    pub p99_seconds: f64,
    pub samples: u64,
    /// The tenant's objective for it, when it has one.
    pub slo_seconds: Option<f64>,
}

/// One tenant now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSnapshot {
    pub name: String,
    pub model: String,
    pub priority: Priority,
    pub slo: Option<SloSpec>,
    /// Each metric with samples in the window.
    pub latency: Vec<MetricNow>,
    /// Best-effort tenants: the queue and its counters.
    pub queue: Option<QueueStats>,
}

/// The controller and every tenant now: what `colocate status` shows (kept in the state
/// file) and `/metrics` renders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlSnapshot {
    /// Best-effort requests allowed in flight, and its bounds.
    pub limit: u32,
    pub min: u32,
    pub max: u32,
    /// Best-effort requests in flight.
    pub in_flight: u32,
    /// The last tick's worst p99 / objective over the window among latency tenants (none:
    /// no latency traffic).
    pub pressure: Option<f64>,
    pub decisions_increase: u64,
    pub decisions_decrease: u64,
    pub decisions_hold: u64,
    pub window_seconds: f64,
    pub tenants: Vec<TenantSnapshot>,
    /// The compute share last sent to the best-effort built-in engines, in tokens (none:
    /// no cap, or no `engine_share_tokens`).
    #[serde(default)]
    pub engine_share_tokens: Option<u64>,
    /// The duty cycle last sent to them, in percent (none: no pacing, or no
    /// `engine_duty_floor`).
    #[serde(default)]
    pub engine_duty_percent: Option<u32>,
    /// The percentage of the GPU's SMs last sent to them (none: the whole GPU, or no
    /// `engine_sm_floor`).
    #[serde(default)]
    pub engine_sm_percent: Option<u32>,
    /// Lever POSTs to best-effort engines that failed so far (refused, e.g. the SM share by
    /// an engine without partitions, or not answered).
    #[serde(default)]
    pub engine_lever_errors: u64,
}

impl ControlSnapshot {
    /// Prometheus text.
    pub(crate) fn render(&self, out: &mut String) {
        let gauge = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        };
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        gauge(
            out,
            "colocate_gateway_best_effort_limit",
            "Best-effort requests the SLO controller allows in flight.",
        );
        let _ = writeln!(out, "colocate_gateway_best_effort_limit {}", self.limit);
        gauge(
            out,
            "colocate_gateway_engine_share_tokens",
            "The compute share (embedding tokens in flight) set in best-effort built-in engines (-1: no cap).",
        );
        let _ = writeln!(
            out,
            "colocate_gateway_engine_share_tokens {}",
            self.engine_share_tokens.map_or(-1, |t| t as i64)
        );
        gauge(
            out,
            "colocate_gateway_engine_duty_percent",
            "The duty cycle (percent of the time) set in best-effort built-in engines (-1: no pacing).",
        );
        let _ = writeln!(
            out,
            "colocate_gateway_engine_duty_percent {}",
            self.engine_duty_percent.map_or(-1, i64::from)
        );
        gauge(
            out,
            "colocate_gateway_engine_sm_percent",
            "The percentage of the GPU's SMs set in best-effort built-in engines (-1: the whole GPU).",
        );
        let _ = writeln!(
            out,
            "colocate_gateway_engine_sm_percent {}",
            self.engine_sm_percent.map_or(-1, i64::from)
        );
        counter(
            out,
            "colocate_gateway_engine_lever_errors_total",
            "Engine lever POSTs (/admin/compute-share) to best-effort built-in engines that were refused or not answered.",
        );
        let _ = writeln!(
            out,
            "colocate_gateway_engine_lever_errors_total {}",
            self.engine_lever_errors
        );
        gauge(
            out,
            "colocate_gateway_best_effort_in_flight",
            "Best-effort requests in flight.",
        );
        let _ = writeln!(
            out,
            "colocate_gateway_best_effort_in_flight {}",
            self.in_flight
        );
        gauge(
            out,
            "colocate_gateway_slo_pressure",
            "The latency tenants' worst p99 over its objective at the last tick (1 = at the SLO; NaN without latency traffic).",
        );
        let _ = writeln!(
            out,
            "colocate_gateway_slo_pressure {}",
            self.pressure.map_or("NaN".to_string(), |p| p.to_string())
        );
        counter(
            out,
            "colocate_gateway_controller_decisions_total",
            "The SLO controller's ticks by decision.",
        );
        for (d, n) in [
            ("increase", self.decisions_increase),
            ("decrease", self.decisions_decrease),
            ("hold", self.decisions_hold),
        ] {
            let _ = writeln!(
                out,
                "colocate_gateway_controller_decisions_total{{decision=\"{d}\"}} {n}"
            );
        }
        gauge(
            out,
            "colocate_gateway_tenant_latency_p99_seconds",
            "Each tenant's p99 latency over the controller's window, measured by the gateway.",
        );
        for t in &self.tenants {
            for m in &t.latency {
                let _ = writeln!(
                    out,
                    "colocate_gateway_tenant_latency_p99_seconds{{tenant=\"{}\",metric=\"{}\"}} {}",
                    t.name,
                    m.metric.name(),
                    m.p99_seconds
                );
            }
        }
        gauge(
            out,
            "colocate_gateway_tenant_slo_seconds",
            "Each tenant's p99 objective.",
        );
        for t in &self.tenants {
            for (name, d) in t.slo.map(|s| s.objectives()).unwrap_or_default() {
                let metric = name.trim_end_matches("_p99");
                let _ = writeln!(
                    out,
                    "colocate_gateway_tenant_slo_seconds{{tenant=\"{}\",metric=\"{metric}\"}} {}",
                    t.name,
                    d.as_secs_f64()
                );
            }
        }
        let queues: Vec<(&str, &QueueStats)> = self
            .tenants
            .iter()
            .filter_map(|t| t.queue.as_ref().map(|q| (t.name.as_str(), q)))
            .collect();
        gauge(
            out,
            "colocate_gateway_queue_depth",
            "Best-effort requests waiting for a place, per tenant.",
        );
        for (t, q) in &queues {
            let _ = writeln!(
                out,
                "colocate_gateway_queue_depth{{tenant=\"{t}\"}} {}",
                q.queued
            );
        }
        gauge(
            out,
            "colocate_gateway_tenant_in_flight",
            "Best-effort requests in flight, per tenant.",
        );
        for (t, q) in &queues {
            let _ = writeln!(
                out,
                "colocate_gateway_tenant_in_flight{{tenant=\"{t}\"}} {}",
                q.in_flight
            );
        }
        counter(
            out,
            "colocate_gateway_admitted_total",
            "Best-effort requests given a place, per tenant.",
        );
        for (t, q) in &queues {
            let _ = writeln!(
                out,
                "colocate_gateway_admitted_total{{tenant=\"{t}\"}} {}",
                q.admitted
            );
        }
        counter(
            out,
            "colocate_gateway_queue_wait_seconds_total",
            "Time admitted best-effort requests waited for their place, per tenant.",
        );
        for (t, q) in &queues {
            let _ = writeln!(
                out,
                "colocate_gateway_queue_wait_seconds_total{{tenant=\"{t}\"}} {}",
                q.wait_seconds_sum
            );
        }
        counter(
            out,
            "colocate_gateway_rejected_total",
            "Best-effort requests refused with 429, per tenant and reason.",
        );
        for (t, q) in &queues {
            for (why, n) in [
                ("queue_full", q.rejected_queue_full),
                ("timeout", q.rejected_timeout),
            ] {
                let _ = writeln!(
                    out,
                    "colocate_gateway_rejected_total{{tenant=\"{t}\",reason=\"{why}\"}} {n}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ControlSpec {
        ControlSpec {
            min_best_effort: 0,
            max_best_effort: 8,
            window: Duration::from_secs(5),
            ..ControlSpec::default()
        }
    }

    fn tenants() -> Vec<TenantSpec> {
        vec![
            TenantSpec {
                name: "gen".into(),
                model: "g".into(),
                priority: Priority::Latency,
                slo: Some(SloSpec {
                    ttft_p99: Some(Duration::from_millis(100)),
                    ..SloSpec::default()
                }),
                share_urls: vec![],
            },
            TenantSpec {
                name: "embed".into(),
                model: "e".into(),
                priority: Priority::BestEffort,
                slo: None,
                share_urls: vec![],
            },
        ]
    }

    #[test]
    fn ticks_follow_the_latency_tenant() {
        let c = Control::new(tenants(), spec());
        assert!(c.active());
        let t0 = Instant::now();
        assert_eq!(c.tick(t0), Decision::Increase); // idle: at max already
        assert_eq!(c.admission.load().0, 8);
        let gen = c.tenant_of("g").unwrap().clone();
        assert!(c.tenant_of("e").unwrap().best_effort().is_some());
        gen.record(Metric::Ttft, t0, Duration::from_millis(200));
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(c.tick(t1), Decision::Decrease);
        assert_eq!(c.admission.load().0, 4);
        // the slow sample is from before the decrease: no second decrease
        assert_eq!(c.tick(t1 + Duration::from_millis(200)), Decision::Hold);
        // a request sent after the decrease (start > t1), fast; the window still holds
        // the slow one: hold
        gen.latency.lock().push(
            Metric::Ttft,
            t1 + Duration::from_millis(250),
            t1 + Duration::from_millis(260),
            Duration::from_millis(10),
        );
        assert_eq!(c.tick(t1 + Duration::from_millis(400)), Decision::Hold);
        assert_eq!(c.admission.load().0, 4);
        let snap = c.snapshot();
        assert_eq!((snap.limit, snap.min, snap.max), (4, 0, 8));
        assert_eq!(snap.decisions_decrease, 1);
        assert_eq!(snap.tenants[0].latency[0].samples, 2);
        assert_eq!(snap.tenants[0].latency[0].slo_seconds, Some(0.1));
        let mut text = String::new();
        snap.render(&mut text);
        for line in [
            "colocate_gateway_best_effort_limit 4\n",
            "colocate_gateway_controller_decisions_total{decision=\"decrease\"} 1\n",
            "colocate_gateway_tenant_slo_seconds{tenant=\"gen\",metric=\"ttft\"} 0.1\n",
            "colocate_gateway_queue_depth{tenant=\"embed\"} 0\n",
            "colocate_gateway_rejected_total{tenant=\"embed\",reason=\"timeout\"} 0\n",
            "colocate_gateway_engine_sm_percent -1\n",
            "colocate_gateway_engine_lever_errors_total 0\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // the window forgets, but a latency request is in flight (longer than the
        // window): not idle, the limit holds
        let busy = gen.busy();
        assert_eq!(c.tick(t1 + Duration::from_secs(30)), Decision::Hold);
        assert_eq!(c.admission.load().0, 4);
        // it ended (no sample: say it failed): idle, the limit grows
        drop(busy);
        assert_eq!(c.tick(t1 + Duration::from_secs(31)), Decision::Increase);
        assert_eq!(c.admission.load().0, 5);
        assert!(c.snapshot().tenants[0].latency.is_empty());
    }

    #[test]
    fn the_duty_cycle_rises_with_the_limit_and_is_lifted_at_the_top() {
        assert_eq!(engine_duty(32, 1, 32, 20), None);
        assert_eq!(engine_duty(1, 1, 32, 20), Some(20));
        assert_eq!(engine_duty(0, 1, 32, 20), Some(20), "below min: the floor");
        // halfway up the range, halfway from the floor to 100
        assert_eq!(engine_duty(16, 1, 31, 20), Some(20 + 80 * 15 / 30));
        assert_eq!(engine_duty(31, 1, 32, 20), Some(97));
        // never 100 (that is no pacing) below the top, never 0
        assert_eq!(engine_duty(63, 0, 64, 99), Some(99));
        assert_eq!(engine_duty(0, 0, 1, 1), Some(1));
        assert_eq!(engine_duty(5, 5, 5, 30), None);
    }

    #[test]
    fn the_sm_share_rises_with_the_limit_to_the_whole_gpu() {
        // (limit, min, max, floor, want)
        for (limit, min, max, floor, want) in [
            (32, 1, 32, 12, None),
            (40, 1, 32, 12, None),
            (1, 1, 32, 12, Some(12)),
            (0, 1, 32, 12, Some(12)),
            (16, 1, 31, 12, Some(12 + 88 * 15 / 30)),
            (31, 1, 32, 12, Some(97)),
            // the line stays under 100 below the top
            (63, 0, 64, 99, Some(99)),
            (31, 0, 32, 99, Some(99)),
            // a floor out of the spec's range is bounded by the top: 100 (every SM)
            (10, 0, 64, 150, Some(100)),
            (0, 0, 1, 1, Some(1)),
            (5, 5, 5, 30, None),
        ] {
            assert_eq!(
                engine_sm(limit, min, max, floor),
                want,
                "limit {limit} in {min}..={max}, floor {floor}"
            );
        }
        // the same rule as the duty cycle's, with another top
        assert_eq!(engine_duty(10, 0, 64, 150), Some(99));
        assert_eq!(engine_sm(20, 1, 32, 25), rising_to_none(20, 1, 32, 25, 100));
    }

    proptest::proptest! {
        /// For any floor and range: the floor at (and below) `min`, none at (and above)
        /// `max`, never below the floor or above the top in between, and never lower for
        /// a higher limit (none, the whole GPU or no pacing, counting as the most).
        #[test]
        fn the_rising_lever_is_monotone_from_its_floor_to_none(
            min in 0u32..80,
            span in 0u32..80,
            floor in 1u32..=99,
            top in proptest::sample::select(vec![99u32, 100]),
        ) {
            let max = min + span;
            let rank = |v: Option<u32>| v.unwrap_or(u32::MAX);
            let mut before = 0;
            for limit in 0..=max + 2 {
                let v = rising_to_none(limit, min, max, floor, top);
                if limit >= max {
                    proptest::prop_assert_eq!(v, None);
                } else {
                    let p = v.unwrap();
                    proptest::prop_assert!(p >= floor && p <= top, "{} at {}", p, limit);
                    if limit <= min {
                        proptest::prop_assert_eq!(p, floor);
                    }
                }
                proptest::prop_assert!(rank(v) >= before, "{:?} at {}", v, limit);
                before = rank(v);
            }
        }
    }

    /// The levers against an engine that has the compute share but no SM partitions (as
    /// the CPU engine): the token cap and duty cycle arrive in their own POST, the SM
    /// share is refused with 400 in its own, the refusals are counted (and warned about
    /// once per engine), and each lever is posted again only when the limit moves it.
    #[tokio::test]
    async fn a_refused_sm_share_costs_the_other_levers_nothing() {
        use axum::routing::post;
        let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let app = axum::Router::new().route(
            "/admin/compute-share",
            post({
                let got = got.clone();
                move |axum::Json(v): axum::Json<serde_json::Value>| {
                    let got = got.clone();
                    async move {
                        let refuse = v.get("sm_percent").is_some();
                        got.lock().push(v);
                        if refuse {
                            (
                                axum::http::StatusCode::BAD_REQUEST,
                                axum::Json(serde_json::json!({"error": {
                                    "message": "start the engine with --sm-partitions",
                                    "type": "invalid_request_error", "code": 400}})),
                            )
                        } else {
                            (
                                axum::http::StatusCode::OK,
                                axum::Json(serde_json::json!({})),
                            )
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut ts = tenants();
        ts[1].share_urls = vec![url.clone()];
        let c = Arc::new(Control::new(
            ts,
            ControlSpec {
                interval: Duration::from_millis(20),
                engine_share_tokens: Some(16),
                engine_duty_floor: Some(20),
                engine_sm_floor: Some(12),
                ..spec()
            },
        ));
        let cancel = CancellationToken::new();
        let ticks = tokio::spawn(tick_loop(
            c.clone(),
            reqwest::Client::builder().no_proxy().build().unwrap(),
            cancel.clone(),
        ));
        let wait_for = |n: usize| {
            let got = got.clone();
            async move {
                for _ in 0..200 {
                    if got.lock().len() >= n {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        // At the start, at the top: everything lifted, once, in two POSTs.
        wait_for(2).await;
        {
            let got = got.lock();
            assert_eq!(got.len(), 2, "{got:?}");
            assert!(got.contains(
                &serde_json::json!({"max_tokens_in_flight": null, "duty_percent": null})
            ));
            assert!(got.contains(&serde_json::json!({"sm_percent": null})));
        }
        let snap = c.snapshot();
        assert_eq!(snap.engine_sm_percent, None);
        assert_eq!(snap.engine_lever_errors, 1);
        // A slow latency request: the limit halves (8 -> 4), every lever moves.
        c.tenant_of("g")
            .unwrap()
            .record(Metric::Ttft, Instant::now(), Duration::from_millis(500));
        wait_for(4).await;
        let snap = c.snapshot();
        assert_eq!(snap.limit, 4);
        let sm = engine_sm(4, 0, 8, 12);
        assert_eq!(sm, Some(12 + 88 * 4 / 8));
        assert_eq!(snap.engine_sm_percent, sm);
        assert_eq!(snap.engine_share_tokens, Some(64));
        assert_eq!(snap.engine_duty_percent, engine_duty(4, 0, 8, 20));
        {
            let got = got.lock();
            assert_eq!(got.len(), 4, "posted only when the limit moved: {got:?}");
            assert!(got.contains(&serde_json::json!({"sm_percent": sm})));
            assert!(got.contains(&serde_json::json!({
                "max_tokens_in_flight": 64, "duty_percent": engine_duty(4, 0, 8, 20)
            })));
        }
        assert_eq!(
            snap.engine_lever_errors, 2,
            "both SM POSTs refused, no other"
        );
        assert_eq!(c.lever_warned.lock().len(), 1, "one warning for the engine");
        let mut text = String::new();
        snap.render(&mut text);
        assert!(text.contains(&format!(
            "colocate_gateway_engine_sm_percent {}\n",
            sm.unwrap()
        )));
        assert!(text.contains("colocate_gateway_engine_lever_errors_total 2\n"));
        cancel.cancel();
        ticks.await.unwrap();
    }

    #[test]
    fn the_engine_share_follows_the_limit_and_is_lifted_at_the_top() {
        assert_eq!(engine_share(64, 64, 512), None);
        assert_eq!(engine_share(8, 64, 512), Some(4096));
        // at 0 the gateway admits no best-effort request; the engine keeps a valid cap
        assert_eq!(engine_share(0, 64, 512), Some(512));
        assert_eq!(
            engine_share(u32::MAX - 1, u32::MAX, u32::MAX),
            Some(18446744060824649730)
        );
    }

    #[test]
    fn without_priorities_nothing_is_controlled() {
        let plain = vec![TenantSpec {
            name: "a".into(),
            model: "a".into(),
            priority: Priority::Normal,
            slo: None,
            share_urls: vec![],
        }];
        assert!(!Control::new(plain, spec()).active());
    }
}
