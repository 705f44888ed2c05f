//! The gateway: one OpenAI-compatible endpoint in front of every engine of a deployment.
//!
//! Requests are routed by the body's `model` to the workers (replicas) serving it, balanced
//! by a [`Policy`] (default: least outstanding requests), and the response body is passed
//! through as a stream (server-sent events reach the client chunk by chunk, never buffered).
//! `GET /v1/models` lists every model with a replica ready to take requests (so a client
//! may wait on it for readiness, as on a Kubernetes endpoint list); `GET /metrics` counts requests, errors,
//! in-flight and latency per worker and route, in Prometheus text.
//!
//! # Worker health state machine
//!
//! ```text
//!             check ok                      2 failed checks in a row,
//!   Unknown ----------> Healthy ----------> or a refused connection,  ----> Unhealthy
//!      |                   ^                or the supervisor says down        |
//!      | check failed      |                                                   |
//!      +-------------------|---------------------------------------------------+
//!                          +--------- check ok (and the supervisor says up) ---+
//! ```
//!
//! A worker receives requests only while `Healthy` *and* available (the supervisor's view:
//! its process is up and passed `/health` after the last start). The supervisor's word
//! takes a worker out at once when its process dies, before the next check would notice;
//! the checks catch what the supervisor cannot see (a hung engine).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// How often every worker's `/health` is checked.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Failed checks in a row that take a healthy worker out.
const FAILS_TO_EJECT: u32 = 2;
/// Latency histogram bounds in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A worker as the gateway is told about it.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Replica name (unique), e.g. `gen-0`.
    pub name: String,
    /// The model name it serves.
    pub model: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

/// Health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Unknown,
    Healthy,
    Unhealthy,
}

/// One worker and its live counters.
#[derive(Debug)]
pub struct Worker {
    pub spec: WorkerSpec,
    health: Mutex<Health>,
    fails: AtomicU32,
    available: AtomicBool,
    outstanding: AtomicU64,
}

impl Worker {
    fn new(spec: WorkerSpec) -> Worker {
        Worker {
            spec,
            health: Mutex::new(Health::Unknown),
            fails: AtomicU32::new(0),
            available: AtomicBool::new(true),
            outstanding: AtomicU64::new(0),
        }
    }

    /// Requests sent to this worker and not yet finished.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Current health.
    pub fn health(&self) -> Health {
        *self.health.lock()
    }

    /// True when it may receive requests.
    pub fn routable(&self) -> bool {
        self.available.load(Ordering::Relaxed) && self.health() == Health::Healthy
    }

    fn check_ok(&self) {
        self.fails.store(0, Ordering::Relaxed);
        *self.health.lock() = Health::Healthy;
    }

    fn check_failed(&self, hard: bool) {
        let n = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        let mut h = self.health.lock();
        if hard || n >= FAILS_TO_EJECT || *h == Health::Unknown {
            *h = Health::Unhealthy;
        }
    }
}

/// Chooses the worker for a request. Hooks have no-op defaults so a policy implements only
/// what it needs (priorities and SLO control between tenants plug in here later).
pub trait Policy: Send + Sync {
    /// Index into `candidates` (all routable, all serving the request's model), or `None`
    /// to refuse with 503.
    fn pick(&self, model: &str, candidates: &[&Worker]) -> Option<usize>;
    /// A request was sent to `worker`.
    fn on_start(&self, _worker: &Worker) {}
    /// A request to `worker` ended (body fully passed through, or failed).
    fn on_finish(&self, _worker: &Worker, _ok: bool, _latency: Duration) {}
}

/// Least outstanding requests; ties go to the first (start order), which keeps a lone
/// client on one replica.
#[derive(Debug, Default)]
pub struct LeastOutstanding;

impl Policy for LeastOutstanding {
    fn pick(&self, _model: &str, candidates: &[&Worker]) -> Option<usize> {
        candidates
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.outstanding())
            .map(|(i, _)| i)
    }
}

#[derive(Debug, Default, Clone)]
struct RouteStats {
    requests: u64,
    errors: u64,
    latency_sum: f64,
    buckets: Vec<u64>,
}

impl RouteStats {
    fn record(&mut self, ok: bool, latency: Option<Duration>) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        if let Some(l) = latency {
            let s = l.as_secs_f64();
            self.latency_sum += s;
            if self.buckets.is_empty() {
                self.buckets = vec![0; BUCKETS.len()];
            }
            for (b, bound) in self.buckets.iter_mut().zip(BUCKETS) {
                if s <= *bound {
                    *b += 1;
                }
            }
        }
    }
}

struct Shared {
    workers: Vec<Arc<Worker>>,
    models: Vec<String>,
    policy: Arc<dyn Policy>,
    client: reqwest::Client,
    /// (worker or "-" for the gateway's own answers, route) -> stats.
    stats: Mutex<BTreeMap<(String, String), RouteStats>>,
}

impl Shared {
    fn record(&self, worker: &str, route: &str, ok: bool, latency: Option<Duration>) {
        self.stats
            .lock()
            .entry((worker.to_string(), route.to_string()))
            .or_default()
            .record(ok, latency);
    }
}

/// A running gateway.
pub struct Gateway {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    checker: tokio::task::JoinHandle<()>,
    drain_timeout: Duration,
}

impl Gateway {
    /// Listens on `address` and starts health checks. `models`: the served model names
    /// to expose (empty: every worker's).
    pub async fn start(
        address: &str,
        workers: Vec<WorkerSpec>,
        models: &[String],
        policy: Arc<dyn Policy>,
        drain_timeout: Duration,
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
            .pool_idle_timeout(Duration::from_secs(30))
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
            stats: Mutex::new(BTreeMap::new()),
        });
        let cancel = CancellationToken::new();
        let app = Router::new()
            .route("/v1/models", get(list_models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(proxy)
            .with_state(shared.clone());
        let stop = cancel.clone();
        let server = tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!("gateway: {e}");
            }
        });
        let checker = tokio::spawn(check_loop(shared.clone(), cancel.clone()));
        Ok(Gateway {
            shared,
            addr,
            cancel,
            server,
            checker,
            drain_timeout,
        })
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The supervisor's word on a worker: down takes it out at once; up puts it back as
    /// healthy (it has just answered `/health`).
    pub fn set_available(&self, name: &str, up: bool) {
        set_available(&self.shared, name, up);
    }

    /// A callback form of [`Gateway::set_available`] for the supervisor.
    pub fn availability_sink(&self) -> impl Fn(&str, bool) + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |name: &str, up: bool| set_available(&shared, name, up)
    }

    /// Each worker's name, health and outstanding requests.
    pub fn workers(&self) -> Vec<(String, Health, u64)> {
        self.shared
            .workers
            .iter()
            .map(|w| {
                (
                    w.spec.name.clone(),
                    if w.routable() {
                        Health::Healthy
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

fn set_available(shared: &Shared, name: &str, up: bool) {
    for w in shared.workers.iter().filter(|w| w.spec.name == name) {
        w.available.store(up, Ordering::Relaxed);
        if up {
            w.check_ok();
        } else {
            w.check_failed(true);
        }
    }
}

async fn check_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("gateway health checks disabled: {e}");
            return;
        }
    };
    loop {
        let checks = shared.workers.iter().map(|w| {
            let client = client.clone();
            let w = w.clone();
            async move {
                match client.get(format!("{}/health", w.spec.url)).send().await {
                    Ok(r) if r.status().is_success() => w.check_ok(),
                    Ok(_) => w.check_failed(false),
                    Err(e) => w.check_failed(e.is_connect()),
                }
            }
        });
        futures::future::join_all(checks).await;
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}

fn error(status: StatusCode, body: openai::ErrorBody) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn list_models(State(s): State<Arc<Shared>>) -> Response {
    let cards = ready_models(&s.models, &s.workers)
        .into_iter()
        .map(|m| openai::ModelCard::new(m.to_string(), None))
        .collect();
    axum::Json(openai::ModelList::new(cards)).into_response()
}

/// The models (in configuration order) with at least one routable replica: a model whose
/// engines are still starting would only answer 503.
fn ready_models<'a>(models: &'a [String], workers: &[Arc<Worker>]) -> Vec<&'a str> {
    models
        .iter()
        .filter(|m| workers.iter().any(|w| &w.spec.model == *m && w.routable()))
        .map(String::as_str)
        .collect()
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    let workers: serde_json::Map<String, serde_json::Value> = s
        .workers
        .iter()
        .map(|w| (w.spec.name.clone(), serde_json::Value::Bool(w.routable())))
        .collect();
    let any = s.workers.iter().any(|w| w.routable());
    let status = if any {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({ "workers": workers })),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut out = String::new();
    let stats = s.stats.lock().clone();
    let lbl = |w: &str, r: &str| format!("engine=\"{w}\",route=\"{r}\"");
    out.push_str("# HELP colocate_gateway_requests_total Requests the gateway answered, per engine and route.\n");
    out.push_str("# TYPE colocate_gateway_requests_total counter\n");
    for ((w, r), st) in &stats {
        out.push_str(&format!(
            "colocate_gateway_requests_total{{{}}} {}\n",
            lbl(w, r),
            st.requests
        ));
    }
    out.push_str("# HELP colocate_gateway_errors_total Requests that failed (upstream error, 5xx, no replica).\n");
    out.push_str("# TYPE colocate_gateway_errors_total counter\n");
    for ((w, r), st) in &stats {
        out.push_str(&format!(
            "colocate_gateway_errors_total{{{}}} {}\n",
            lbl(w, r),
            st.errors
        ));
    }
    out.push_str("# HELP colocate_gateway_request_duration_seconds Time from receiving a request to the end of its response body.\n");
    out.push_str("# TYPE colocate_gateway_request_duration_seconds histogram\n");
    for ((w, r), st) in &stats {
        if st.buckets.is_empty() {
            continue;
        }
        let l = lbl(w, r);
        for (b, bound) in st.buckets.iter().zip(BUCKETS) {
            out.push_str(&format!(
                "colocate_gateway_request_duration_seconds_bucket{{{l},le=\"{bound}\"}} {b}\n"
            ));
        }
        let count: u64 = st.requests;
        out.push_str(&format!(
            "colocate_gateway_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {count}\n"
        ));
        out.push_str(&format!(
            "colocate_gateway_request_duration_seconds_sum{{{l}}} {}\n",
            st.latency_sum
        ));
        out.push_str(&format!(
            "colocate_gateway_request_duration_seconds_count{{{l}}} {count}\n"
        ));
    }
    out.push_str("# HELP colocate_gateway_in_flight Requests being served, per engine.\n");
    out.push_str("# TYPE colocate_gateway_in_flight gauge\n");
    for w in &s.workers {
        out.push_str(&format!(
            "colocate_gateway_in_flight{{engine=\"{}\"}} {}\n",
            w.spec.name,
            w.outstanding()
        ));
    }
    out.push_str("# HELP colocate_gateway_engine_healthy 1 while the engine receives requests.\n");
    out.push_str("# TYPE colocate_gateway_engine_healthy gauge\n");
    for w in &s.workers {
        out.push_str(&format!(
            "colocate_gateway_engine_healthy{{engine=\"{}\"}} {}\n",
            w.spec.name,
            u8::from(w.routable())
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// Ends a request's accounting when its response body is dropped (finished or aborted).
struct Finish {
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    route: String,
    start: Instant,
    ok: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.worker.outstanding.fetch_sub(1, Ordering::Relaxed);
        let latency = self.start.elapsed();
        self.shared.policy.on_finish(&self.worker, self.ok, latency);
        self.shared
            .record(&self.worker.spec.name, &self.route, self.ok, Some(latency));
    }
}

async fn proxy(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let route = uri.path().to_string();
    let start = Instant::now();
    if method != Method::POST {
        s.record("-", &route, false, None);
        return error(
            StatusCode::NOT_FOUND,
            openai::ErrorBody::new(
                404,
                "not_found_error",
                format!("no route {method} {route}"),
                None,
            ),
        );
    }
    let model = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => match v.get("model").and_then(|m| m.as_str()) {
            Some(m) => m.to_string(),
            None => {
                s.record("-", &route, false, None);
                return error(
                    StatusCode::BAD_REQUEST,
                    openai::ErrorBody::invalid_request(
                        "`model` is required: the gateway routes by it",
                        Some("model"),
                    ),
                );
            }
        },
        Err(e) => {
            s.record("-", &route, false, None);
            return error(
                StatusCode::BAD_REQUEST,
                openai::ErrorBody::invalid_request(format!("body is not JSON: {e}"), None),
            );
        }
    };
    if !s.models.contains(&model) {
        s.record("-", &route, false, None);
        return error(
            StatusCode::NOT_FOUND,
            openai::ErrorBody::not_found(format!(
                "model `{model}` is not served here; served: {}",
                s.models.join(", ")
            )),
        );
    }
    let mut tried: Vec<usize> = Vec::new();
    let mut soft_failed: Vec<usize> = Vec::new();
    loop {
        let candidates: Vec<(usize, &Arc<Worker>)> = s
            .workers
            .iter()
            .enumerate()
            .filter(|(i, w)| w.spec.model == model && w.routable() && !tried.contains(i))
            .collect();
        let refs: Vec<&Worker> = candidates.iter().map(|(_, w)| w.as_ref()).collect();
        let Some(pick) = (if refs.is_empty() {
            None
        } else {
            s.policy.pick(&model, &refs)
        }) else {
            s.record("-", &route, false, None);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                openai::ErrorBody::unavailable(format!(
                    "no healthy replica of model `{model}` right now; retry shortly"
                )),
            );
        };
        let Some(&(idx, worker)) = candidates.get(pick) else {
            s.record("-", &route, false, None);
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                openai::ErrorBody::internal("policy picked no candidate"),
            );
        };
        let worker = worker.clone();
        worker.outstanding.fetch_add(1, Ordering::Relaxed);
        s.policy.on_start(&worker);
        let mut finish = Finish {
            shared: s.clone(),
            worker: worker.clone(),
            route: route.clone(),
            start,
            ok: true,
        };
        let target = format!(
            "{}{}",
            worker.spec.url,
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let mut req = s.client.request(method.clone(), target).body(body.clone());
        for name in [
            axum::http::header::CONTENT_TYPE,
            axum::http::header::ACCEPT,
            axum::http::header::AUTHORIZATION,
        ] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v.clone());
            }
        }
        match req.send().await {
            Ok(resp) => {
                let status =
                    StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                finish.ok = !status.is_server_error();
                let mut out = Response::builder().status(status);
                for name in [
                    axum::http::header::CONTENT_TYPE,
                    axum::http::header::CACHE_CONTROL,
                ] {
                    if let Some(v) = resp.headers().get(name.as_str()) {
                        if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                            out = out.header(name, v);
                        }
                    }
                }
                // The closure owns `finish` (the whole value, not just the field), so the
                // request counts as finished when the body stream is done or dropped.
                let stream = resp.bytes_stream().map(move |chunk| {
                    let f = &mut finish;
                    if chunk.is_err() {
                        f.ok = false;
                    }
                    chunk
                });
                return out.body(Body::from_stream(stream)).unwrap_or_else(|e| {
                    error(
                        StatusCode::BAD_GATEWAY,
                        openai::ErrorBody::new(502, "bad_gateway", e.to_string(), None),
                    )
                });
            }
            Err(e) => {
                finish.ok = false;
                drop(finish);
                if e.is_connect() || soft_failed.contains(&idx) {
                    // The engine is down (refused, or closed the connection twice without
                    // answering): take it out and try another replica. Inference requests
                    // have no side effects, so sending one again is safe.
                    worker.check_failed(true);
                    tried.push(idx);
                    tracing::warn!(engine = %worker.spec.name, "gateway: request failed, taken out: {e}");
                } else {
                    // Most likely a pooled connection the engine closed when it died or
                    // restarted: once more, with a fresh connection.
                    soft_failed.push(idx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, outstanding: u64) -> Worker {
        let w = Worker::new(WorkerSpec {
            name: name.into(),
            model: "m".into(),
            url: String::new(),
        });
        w.outstanding.store(outstanding, Ordering::Relaxed);
        w
    }

    #[test]
    fn least_outstanding_picks_the_idlest_first_on_ties() {
        let (a, b, c) = (worker("a", 3), worker("b", 1), worker("c", 1));
        assert_eq!(LeastOutstanding.pick("m", &[&a, &b, &c]), Some(1));
        assert_eq!(LeastOutstanding.pick("m", &[]), None);
    }

    #[test]
    fn only_models_with_a_routable_replica_are_listed() {
        let models = vec!["m".to_string(), "e".to_string()];
        let (m0, m1) = (Arc::new(worker("m-0", 0)), Arc::new(worker("m-1", 0)));
        let e0 = Arc::new(Worker::new(WorkerSpec {
            name: "e-0".into(),
            model: "e".into(),
            url: String::new(),
        }));
        let workers = vec![m0.clone(), m1.clone(), e0.clone()];
        assert!(ready_models(&models, &workers).is_empty()); // all still starting
        m1.check_ok();
        assert_eq!(ready_models(&models, &workers), vec!["m"]);
        e0.check_ok();
        assert_eq!(ready_models(&models, &workers), vec!["m", "e"]);
        e0.available.store(false, Ordering::Relaxed); // its engine died
        assert_eq!(ready_models(&models, &workers), vec!["m"]);
    }

    #[test]
    fn health_state_machine() {
        let w = worker("a", 0);
        assert_eq!(w.health(), Health::Unknown);
        w.check_ok();
        assert!(w.routable());
        w.check_failed(false); // one soft failure: still in
        assert!(w.routable());
        w.check_failed(false); // two in a row: out
        assert_eq!(w.health(), Health::Unhealthy);
        w.check_ok();
        assert!(w.routable());
        w.check_failed(true); // refused connection: out at once
        assert!(!w.routable());
        w.check_ok();
        w.available.store(false, Ordering::Relaxed); // the supervisor says down
        assert!(!w.routable());
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut st = RouteStats::default();
        st.record(true, Some(Duration::from_millis(30)));
        st.record(false, Some(Duration::from_secs(3)));
        assert_eq!(st.requests, 2);
        assert_eq!(st.errors, 1);
        let le_005 = BUCKETS.iter().position(|b| *b == 0.05).unwrap();
        assert_eq!(st.buckets[le_005], 1);
        assert_eq!(*st.buckets.last().unwrap(), 2);
    }
}
