//! The accept loop and the per-connection task: a semaphore permit per connection (taken
//! before `accept`, so that beyond the cap connections wait in the kernel's backlog), one
//! hyper HTTP/1.1 connection per task with the head timeout, the body deadline around every
//! request, and hyper-util's graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;

use crate::accept::{is_connection_error, Backoff};
use crate::body_deadline::{timeout_response, DeadlineBody};
use crate::Limits;

/// An axum [`Router`] served on a bound listener within [`Limits`].
///
/// HTTP/1.1 only, as uvicorn (vLLM's server) and nginx's upstreams speak it: every OpenAI
/// client uses it, and leaving out cleartext HTTP/2 leaves out its own abuse surface
/// (stream floods, rapid reset) and an unbounded wait for the protocol preface.
pub struct Server {
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stats: ConnectionStats,
}

/// Live counters of a [`Server`], cheap to clone; for metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    open: AtomicUsize,
    peak: AtomicUsize,
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
}

impl ConnectionStats {
    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }
    /// The most connections served at once so far.
    pub fn peak_connections(&self) -> usize {
        self.0.peak.load(Ordering::Relaxed)
    }
    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.0.accepted.load(Ordering::Relaxed)
    }
    /// Failed `accept` calls other than a peer giving up (EMFILE and the like).
    pub fn accept_errors(&self) -> u64 {
        self.0.accept_errors.load(Ordering::Relaxed)
    }
    /// Connections closed because a request head did not arrive in time (or an idle
    /// keep-alive connection ran out its time).
    pub fn header_timeouts(&self) -> u64 {
        self.0.header_timeouts.load(Ordering::Relaxed)
    }
    /// Requests answered 408 because their body did not arrive in time.
    pub fn body_timeouts(&self) -> u64 {
        self.0.body_timeouts.load(Ordering::Relaxed)
    }
}

/// One connection's place under the cap: frees the semaphore permit and the gauge on drop,
/// however the connection task ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: ConnectionStats,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, stats: &ConnectionStats) -> Slot {
        let open = stats.0.open.fetch_add(1, Ordering::Relaxed) + 1;
        stats.0.peak.fetch_max(open, Ordering::Relaxed);
        stats.0.accepted.fetch_add(1, Ordering::Relaxed);
        Slot {
            _permit: permit,
            stats: stats.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    /// A server for `app` on `listener` (already bound, so that a port in use fails
    /// before anything else starts).
    pub fn new(listener: TcpListener, app: Router, limits: Limits) -> Server {
        Server {
            listener,
            app,
            limits,
            stats: ConnectionStats::default(),
        }
    }

    /// Its live counters.
    pub fn stats(&self) -> ConnectionStats {
        self.stats.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, closes idle connections,
    /// lets in-flight requests finish (as `axum::serve(..).with_graceful_shutdown` does)
    /// and returns. Accept errors never end it. Dropping the future (aborting its task)
    /// closes every connection at once: the way out when a drain takes too long.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let Server {
            listener,
            app,
            limits,
            stats,
        } = self;
        let max = limits.max_connections.max(1);
        let slots = Arc::new(Semaphore::new(max));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .keep_alive(true);
        let graceful = GracefulShutdown::new();
        // The connection tasks: aborted with the set if this future is dropped.
        let mut connections = tokio::task::JoinSet::new();
        let mut backoff = Backoff::default();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break, // the semaphore is never closed
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                r = listener.accept() => r,
            };
            let tcp = match accepted {
                Ok((tcp, _peer)) => {
                    backoff.succeeded();
                    tcp
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    stats.0.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff.failed();
                    if backoff.first_failure() {
                        tracing::warn!(
                            "cannot accept connections: {e}; retrying with back-off \
                             (raise the open-files limit, `ulimit -n`, if this is EMFILE)"
                        );
                    }
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            // Token-sized SSE writes must leave at once: without TCP_NODELAY, Nagle's
            // algorithm holds them until the client's (delayed, up to 40 ms) ACK.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY: {e}");
            }
            let slot = Slot::new(permit, &stats);
            let app = app.clone();
            let body_limit = limits.body_read_timeout;
            let req_stats = stats.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                handle(app.clone(), req, body_limit, req_stats.clone())
            });
            let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
            let conn_stats = stats.clone();
            while connections.try_join_next().is_some() {} // reap the finished
            connections.spawn(async move {
                let _slot = slot;
                if let Err(e) = conn.await {
                    if e.is_timeout() {
                        conn_stats.0.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!("connection closed: {e}");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    }
}

/// One request: its body under the deadline, the app, and a 408 in place of the app's
/// answer when the deadline cut the body.
async fn handle(
    app: Router,
    req: Request<Incoming>,
    body_limit: Duration,
    stats: ConnectionStats,
) -> Result<Response, Infallible> {
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|b| axum::body::Body::new(DeadlineBody::new(b, body_limit, expired.clone())));
    let resp = app.oneshot(req).await?;
    if expired.load(Ordering::Relaxed) {
        stats.0.body_timeouts.fetch_add(1, Ordering::Relaxed);
        return Ok(timeout_response(body_limit));
    }
    Ok(resp)
}
