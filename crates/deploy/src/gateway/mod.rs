//! The gateway: one OpenAI-compatible endpoint in front of every engine of a deployment.
//!
//! Requests are routed by the body's `model` to the workers (replicas) serving it, balanced
//! by a [`Policy`] (default: least outstanding requests), and the response body is passed
//! through as a stream (server-sent events reach the client chunk by chunk, never buffered).
//! `GET /v1/models` lists every model with a replica ready to take requests (so a client
//! may wait on it for readiness, as on a Kubernetes endpoint list); `GET /metrics` counts
//! requests, errors, in-flight and latency per worker and route, in Prometheus text.
//!
//! Whatever a client sends, the gateway answers with a status and an OpenAI error body and
//! keeps serving: bad bodies are refused before any engine sees them ([`request`]),
//! connections are served within [`http_guard::Limits`], and an engine that dies
//! mid-stream ends that one stream with an error event ([`proxy`]).
//!
//! - [`health`]: workers, their health state machine, the check loop.
//! - [`policy`]: which replica takes a request.
//! - [`stats`]: counters and latency histograms, rendered as Prometheus text.
//! - [`request`]: reading a client's body and the `model` it is routed by.
//! - [`routes`]: the router: the gateway's own routes and the error answers.
//! - [`proxy`]: forwarding to a replica, retries, streaming back.
//!
//! Tenant priorities and SLO control (issue 18): each engine is a tenant (`latency`,
//! `normal` or `best-effort`); the gateway measures every tenant's latency from the
//! traffic it proxies and keeps the latency tenants within their SLOs by limiting the
//! best-effort tenants' requests in flight.
//! - [`slo`]: the live latency of each tenant (TTFT, chunk gaps, whole request; p99 over a
//!   sliding window).
//! - [`controller`]: the AIMD rule that moves the best-effort limit (pure).
//! - [`admission`]: the best-effort limit, a bounded FIFO queue per tenant, 429 beyond.
//! - [`control`]: tenants, the tick that feeds the rule and sets the limit, the snapshot
//!   shown in `/metrics` and `colocate status`.

mod admission;
mod control;
pub(crate) mod controller;
mod health;
mod policy;
mod proxy;
mod request;
mod routes;
mod slo;
mod stats;

pub use admission::QueueStats;
pub use control::{ControlSnapshot, MetricNow, TenantSnapshot, TenantSpec};
pub use health::{Worker, WorkerHealth, WorkerSpec};
pub use policy::{LeastOutstanding, Policy};
pub use request::MAX_BODY_BYTES;
pub use slo::Metric;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use control::Control;
use stats::StatsTable;

use crate::spec::ControlSpec;

/// How long an idle pooled connection to an engine is kept. Below the engines' own idle
/// limit (`http_guard::Limits::header_read_timeout`, 30 s for `colocate serve`) so that
/// the gateway, not the engine, closes it: a request never meets a connection the engine
/// is closing.
const UPSTREAM_POOL_IDLE: Duration = Duration::from_secs(20);

/// What every handler shares.
pub(crate) struct Shared {
    pub(crate) workers: Vec<Arc<Worker>>,
    pub(crate) models: Vec<String>,
    pub(crate) policy: Arc<dyn Policy>,
    pub(crate) client: reqwest::Client,
    pub(crate) stats: Mutex<StatsTable>,
    pub(crate) control: Arc<Control>,
}

impl Shared {
    /// Counts one answer for `worker` (or `-` for the gateway's own) on `route`.
    pub(crate) fn record(&self, worker: &str, route: &str, ok: bool, latency: Option<Duration>) {
        self.stats.lock().record(worker, route, ok, latency);
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    checker: tokio::task::JoinHandle<()>,
    controller: Option<tokio::task::JoinHandle<()>>,
    drain_timeout: Duration,
}

impl Gateway {
    /// Listens on `address` and starts health checks. `models`: the served model names
    /// to expose (empty: every worker's). `tenants`: each served model's priority and SLO
    /// (a model not listed is `normal`); when one is `latency` or `best-effort`, the SLO
    /// controller runs with the settings of `control`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        address: &str,
        workers: Vec<WorkerSpec>,
        models: &[String],
        policy: Arc<dyn Policy>,
        drain_timeout: Duration,
        tenants: Vec<TenantSpec>,
        control: ControlSpec,
    ) -> anyhow::Result<Gateway> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("gateway: cannot listen on {address}"))?;
        let addr = listener.local_addr()?;
        let mut served: Vec<String> = Vec::new();
        for w in &workers {
            if (models.is_empty() || models.contains(&w.model)) && !served.contains(&w.model) {
                served.push(w.model.clone());
            }
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_idle_timeout(UPSTREAM_POOL_IDLE)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .context("gateway: HTTP client")?;
        let shared = Arc::new(Shared {
            workers: workers
                .into_iter()
                .filter(|w| served.contains(&w.model))
                .map(|w| Arc::new(Worker::new(w)))
                .collect(),
            models: served,
            policy,
            client,
            stats: Mutex::new(StatsTable::default()),
            control: Arc::new(Control::new(tenants, control)),
        });
        let cancel = CancellationToken::new();
        // Every client connection may hold one to an engine: two descriptors each.
        if let Err(e) = http_guard::raise_fd_limit() {
            tracing::debug!("gateway: cannot raise the open-files limit: {e}");
        }
        let limits = http_guard::Limits::from_fd_limit(2);
        let server = http_guard::Server::new(listener, routes::router(shared.clone()), limits);
        let stop = cancel.clone();
        let server = tokio::spawn(server.serve(async move { stop.cancelled().await }));
        let checker = tokio::spawn(health::check_loop(shared.clone(), cancel.clone()));
        let controller = shared.control.active().then(|| {
            tokio::spawn(control::tick_loop(
                shared.control.clone(),
                shared.client.clone(),
                cancel.clone(),
            ))
        });
        Ok(Gateway {
            shared,
            addr,
            cancel,
            server,
            checker,
            controller,
            drain_timeout,
        })
    }

    /// The SLO controller and the tenants now (`None` when no engine has a priority).
    pub fn control(&self) -> Option<ControlSnapshot> {
        self.shared
            .control
            .active()
            .then(|| self.shared.control.snapshot())
    }

    /// A callback form of [`Gateway::control`], for the state file's writer.
    pub fn control_source(&self) -> impl Fn() -> Option<ControlSnapshot> + Send + Sync + 'static {
        let control = self.shared.control.clone();
        move || control.active().then(|| control.snapshot())
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The supervisor's word on a worker: down takes it out at once; up puts it back as
    /// healthy (it has just answered `/health`).
    pub fn set_available(&self, name: &str, up: bool) {
        health::set_available(&self.shared, name, up);
    }

    /// A callback form of [`Gateway::set_available`] for the supervisor.
    pub fn availability_sink(&self) -> impl Fn(&str, bool) + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |name: &str, up: bool| health::set_available(&shared, name, up)
    }

    /// Each worker's name, health and outstanding requests.
    pub fn workers(&self) -> Vec<(String, WorkerHealth, u64)> {
        self.shared
            .workers
            .iter()
            .map(|w| {
                (
                    w.spec.name.clone(),
                    if w.routable() {
                        WorkerHealth::Healthy
                    } else {
                        w.health()
                    },
                    w.outstanding(),
                )
            })
            .collect()
    }

    /// Stops accepting, lets in-flight requests finish within the drain timeout, then
    /// stops.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.checker.abort();
        if let Some(c) = self.controller {
            c.abort();
        }
        let mut server = self.server;
        if tokio::time::timeout(self.drain_timeout, &mut server)
            .await
            .is_err()
        {
            tracing::warn!(
                "gateway: in-flight requests did not finish within {:?}; closing them",
                self.drain_timeout
            );
            server.abort();
        }
    }
}
