//! Workers (engine replicas) and their health as the gateway sees it.
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

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// How often every worker's `/health` is checked.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Failed checks in a row that take a healthy worker out.
const FAILS_TO_EJECT: u32 = 2;

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

/// A worker's health as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerHealth {
    Unknown,
    Healthy,
    Unhealthy,
}

/// One worker and its live counters.
#[derive(Debug)]
pub struct Worker {
    pub spec: WorkerSpec,
    health: Mutex<WorkerHealth>,
    fails: AtomicU32,
    pub(super) available: AtomicBool,
    pub(super) outstanding: AtomicU64,
}

impl Worker {
    pub(super) fn new(spec: WorkerSpec) -> Worker {
        Worker {
            spec,
            health: Mutex::new(WorkerHealth::Unknown),
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
    pub fn health(&self) -> WorkerHealth {
        *self.health.lock()
    }

    /// True when it may receive requests.
    pub fn routable(&self) -> bool {
        self.available.load(Ordering::Relaxed) && self.health() == WorkerHealth::Healthy
    }

    pub(super) fn check_ok(&self) {
        self.fails.store(0, Ordering::Relaxed);
        *self.health.lock() = WorkerHealth::Healthy;
    }

    pub(super) fn check_failed(&self, hard: bool) {
        let n = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        let mut h = self.health.lock();
        if hard || n >= FAILS_TO_EJECT || *h == WorkerHealth::Unknown {
            *h = WorkerHealth::Unhealthy;
        }
    }
}

/// The supervisor's word on the workers named `name`.
pub(super) fn set_available(shared: &Shared, name: &str, up: bool) {
    for w in shared.workers.iter().filter(|w| w.spec.name == name) {
        w.available.store(up, Ordering::Relaxed);
        if up {
            w.check_ok();
        } else {
            w.check_failed(true);
        }
    }
}

/// The models (in configuration order) with at least one routable replica: a model whose
/// engines are still starting would only answer 503.
pub(super) fn ready_models<'a>(models: &'a [String], workers: &[Arc<Worker>]) -> Vec<&'a str> {
    models
        .iter()
        .filter(|m| workers.iter().any(|w| &w.spec.model == *m && w.routable()))
        .map(String::as_str)
        .collect()
}

/// Checks every worker's `/health` each [`CHECK_INTERVAL`] until cancelled.
pub(super) async fn check_loop(shared: Arc<Shared>, cancel: CancellationToken) {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn worker(name: &str, outstanding: u64) -> Worker {
        let w = Worker::new(WorkerSpec {
            name: name.into(),
            model: "m".into(),
            url: String::new(),
        });
        w.outstanding.store(outstanding, Ordering::Relaxed);
        w
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
        assert_eq!(w.health(), WorkerHealth::Unknown);
        w.check_ok();
        assert!(w.routable());
        w.check_failed(false); // one soft failure: still in
        assert!(w.routable());
        w.check_failed(false); // two in a row: out
        assert_eq!(w.health(), WorkerHealth::Unhealthy);
        w.check_ok();
        assert!(w.routable());
        w.check_failed(true); // refused connection: out at once
        assert!(!w.routable());
        w.check_ok();
        w.available.store(false, Ordering::Relaxed); // the supervisor says down
        assert!(!w.routable());
    }
}
