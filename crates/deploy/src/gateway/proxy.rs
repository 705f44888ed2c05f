//! Forwarding a request to a replica of its model and its answer back.
//!
//! The engine's answer passes through unchanged: status, `Content-Type`, `Cache-Control`
//! and the body as a stream (its own validation errors included). Should the engine die
//! mid-answer, a streamed (SSE) answer ends with an OpenAI error event and `[DONE]`, as
//! vLLM ends a stream that fails, and any other answer is cut; the gateway goes on
//! serving and the worker is left to the health checks and the supervisor.
//!
//! On the way, a best-effort tenant's request first waits for a place in admission
//! ([`super::admission`]; refused with 429 and `Retry-After`), and every answer's timing
//! (first chunk, chunk gaps, end) is recorded for its tenant ([`super::slo`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::admission::{Permit, Refusal};
use super::control::{Busy, Tenant};
use super::request::{error, read_body, routing_model};
use super::routes::no_route;
use super::slo::{ChunkSample, ChunkTimes, Metric};
use super::{Shared, Worker};

/// The route label of requests forwarded on paths outside [`super::routes::FORWARDED`]:
/// one label for all, so that clients cannot grow the metrics without bound by inventing
/// paths.
const OTHER_ROUTE: &str = "other";

/// A request on one of the OpenAI routes.
pub(super) async fn forward(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let route = uri.path().to_string();
    let body = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(answer) => return own_answer(&s, &route, answer),
    };
    let model = match routing_model(&body) {
        Ok(m) => m,
        Err(why) => return own_answer(&s, &route, why.response()),
    };
    dispatch(&s, &route, &model, method, &uri, &headers, body, start).await
}

/// A request on any other path: forwarded when it is a POST whose body names a served
/// model, 404 otherwise.
pub(super) async fn forward_other(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    if method != Method::POST {
        return own_answer(&s, OTHER_ROUTE, no_route(&method, uri.path()));
    }
    let body = match read_body(&headers, body).await {
        Ok(b) => b,
        Err(answer) => return own_answer(&s, OTHER_ROUTE, answer),
    };
    let Ok(model) = routing_model(&body) else {
        return own_answer(&s, OTHER_ROUTE, no_route(&method, uri.path()));
    };
    dispatch(&s, OTHER_ROUTE, &model, method, &uri, &headers, body, start).await
}

/// Counts an answer the gateway gives itself (no engine involved) and returns it.
fn own_answer(s: &Shared, route: &str, answer: Response) -> Response {
    s.record("-", route, false, None);
    answer
}

/// Picks a replica, sends, and retries on another when the engine is down; inference
/// requests have no side effects, so sending one again is safe.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    s: &Arc<Shared>,
    route: &str,
    model: &str,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    start: Instant,
) -> Response {
    if !s.models.iter().any(|m| m == model) {
        return own_answer(
            s,
            route,
            error(
                StatusCode::NOT_FOUND,
                openai::ErrorBody::not_found(format!(
                    "model `{model}` is not served here; served: {}",
                    s.models.join(", ")
                )),
            ),
        );
    }
    let tenant = s.control.tenant_of(model).cloned();
    // Counted in flight from arrival to the end of its answer: the controller tells a
    // tenant with long requests and no finished one yet from an idle one.
    let mut busy = tenant.as_ref().map(|t| t.busy());
    // A best-effort request waits for a place first (held until its answer ends).
    let mut permit = match tenant.as_ref().and_then(|t| t.best_effort()) {
        Some(i) => match s.control.admission.admit(i).await {
            Ok(p) => Some(p),
            Err(why) => {
                let (name, wait) = (
                    tenant.as_ref().map_or("", |t| t.spec.name.as_str()),
                    s.control.admission.retry_after(i),
                );
                return own_answer(
                    s,
                    route,
                    refusal(why, name, wait, s.control.admission.queue_timeout()),
                );
            }
        },
        None => None,
    };
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
            s.policy.pick(model, &refs)
        }) else {
            return own_answer(
                s,
                route,
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    openai::ErrorBody::unavailable(format!(
                        "no healthy replica of model `{model}` right now; retry shortly"
                    )),
                ),
            );
        };
        let Some(&(idx, worker)) = candidates.get(pick) else {
            return own_answer(
                s,
                route,
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    openai::ErrorBody::internal("policy picked no candidate"),
                ),
            );
        };
        let worker = worker.clone();
        worker.outstanding.fetch_add(1, Ordering::Relaxed);
        s.policy.on_start(&worker);
        let mut finish = Finish {
            shared: s.clone(),
            worker: worker.clone(),
            route: route.to_string(),
            start,
            ok: true,
            tenant: None,
            busy: None,
            permit: None,
            times: ChunkTimes::default(),
            measured: false,
            completed: false,
        };
        let target = format!(
            "{}{}",
            worker.spec.url,
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let mut req = s.client.request(method.clone(), target).body(body.clone());
        for name in [header::CONTENT_TYPE, header::ACCEPT, header::AUTHORIZATION] {
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
                for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
                    if let Some(v) = resp.headers().get(name.as_str()) {
                        if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                            out = out.header(name, v);
                        }
                    }
                }
                let sse = resp
                    .headers()
                    .get(header::CONTENT_TYPE.as_str())
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/event-stream"));
                // The place is held until the body ends; only successes are timed.
                finish.permit = permit.take();
                finish.measured = status.is_success();
                finish.tenant = tenant.clone();
                finish.busy = busy.take();
                let body = Passthrough::new(resp.bytes_stream().boxed(), finish, sse).into_body();
                return out.body(body).unwrap_or_else(|e| {
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
                    // answering): take it out and try another replica.
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

/// A best-effort request refused: 429 with `Retry-After` (503 when the gateway is
/// closing), in an OpenAI error body.
fn refusal(why: Refusal, tenant: &str, retry_after: Duration, timeout: Duration) -> Response {
    let secs = retry_after.as_secs().max(1);
    let message = match why {
        Refusal::QueueFull => format!(
            "`{tenant}` is best-effort and throttled to keep the latency engines within their SLOs; its queue is full: retry after {secs} s"
        ),
        Refusal::Timeout => format!(
            "`{tenant}` is best-effort and throttled to keep the latency engines within their SLOs; no place came free within {}: retry after {secs} s",
            ::units::duration::format(timeout)
        ),
        Refusal::Closed => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                openai::ErrorBody::unavailable("the gateway is shutting down"),
            )
        }
    };
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        openai::ErrorBody::new(429, "rate_limit_error", message, None),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// Ends a request's accounting when its response body is dropped (finished or aborted):
/// counters, the tenant's latency samples, and its best-effort place given back.
struct Finish {
    shared: Arc<Shared>,
    worker: Arc<Worker>,
    route: String,
    start: Instant,
    ok: bool,
    tenant: Option<Arc<Tenant>>,
    /// The tenant's count of requests in flight, held until the body ends.
    busy: Option<Busy>,
    /// Dropped with this: the place goes back after the body ended.
    permit: Option<Permit>,
    times: ChunkTimes,
    /// A 2xx answer: its latency is the engine's (not a refusal's).
    measured: bool,
    /// The body ended normally (not cut, not abandoned by the client).
    completed: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.worker.outstanding.fetch_sub(1, Ordering::Relaxed);
        let latency = self.start.elapsed();
        self.shared.policy.on_finish(&self.worker, self.ok, latency);
        self.shared
            .record(&self.worker.spec.name, &self.route, self.ok, Some(latency));
        if let (Some(t), true) = (&self.tenant, self.measured && self.completed && self.ok) {
            t.record(Metric::E2el, self.start, latency);
            if let Some((start, tpot)) = self.times.tpot() {
                t.record(Metric::Tpot, start, tpot);
            }
        }
    }
}

/// An engine's response body on its way to the client. Owns the request's [`Finish`], so
/// the request counts as finished when the body is done or dropped (client gone).
struct Passthrough {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    finish: Finish,
    sse: bool,
    /// The last two bytes passed on (an SSE event ends with a blank line).
    tail: [u8; 2],
    ended: bool,
}

impl Passthrough {
    fn new(
        upstream: BoxStream<'static, reqwest::Result<Bytes>>,
        finish: Finish,
        sse: bool,
    ) -> Self {
        Passthrough {
            upstream,
            finish,
            sse,
            tail: *b"\n\n",
            ended: false,
        }
    }

    fn into_body(self) -> Body {
        Body::from_stream(futures::stream::unfold(self, |mut p| async move {
            let item = p.next_item().await?;
            Some((item, p))
        }))
    }

    async fn next_item(&mut self) -> Option<reqwest::Result<Bytes>> {
        if self.ended {
            return None;
        }
        let Some(item) = self.upstream.next().await else {
            self.finish.completed = true;
            return None;
        };
        match item {
            Ok(chunk) => {
                if !chunk.is_empty() && self.sse {
                    let now = Instant::now();
                    let sample = self.finish.times.chunk(now);
                    if let (Some(t), true) = (&self.finish.tenant, self.finish.measured) {
                        match sample {
                            ChunkSample::First => {
                                t.record(Metric::Ttft, self.finish.start, now - self.finish.start)
                            }
                            ChunkSample::Tpot { start, tpot } => {
                                t.record(Metric::Tpot, start, tpot)
                            }
                            ChunkSample::None => {}
                        }
                    }
                }
                match chunk.len() {
                    0 => {}
                    1 => self.tail = [self.tail[1], chunk[0]],
                    n => self.tail = [chunk[n - 2], chunk[n - 1]],
                }
                Some(Ok(chunk))
            }
            Err(e) => {
                self.finish.ok = false;
                self.ended = true;
                tracing::warn!(
                    engine = %self.finish.worker.spec.name,
                    "gateway: the engine's answer broke off: {e}"
                );
                if self.sse {
                    Some(Ok(error_event(
                        &self.finish.worker.spec.name,
                        &e,
                        &self.tail == b"\n\n",
                    )))
                } else {
                    Some(Err(e))
                }
            }
        }
    }
}

/// The end of a stream whose engine failed: a blank line to close a half-sent event, an
/// OpenAI error event (the `openai` client raises it as an `APIError`), then `[DONE]`.
fn error_event(engine: &str, e: &reqwest::Error, at_boundary: bool) -> Bytes {
    let body = openai::ErrorBody::new(
        502,
        "bad_gateway",
        format!("the engine `{engine}` broke off the stream: {e}"),
        None,
    );
    let json = serde_json::to_string(&body).unwrap_or_else(|_| "{}".into());
    let lead = if at_boundary { "" } else { "\n\n" };
    Bytes::from(format!("{lead}data: {json}\n\ndata: [DONE]\n\n"))
}
