//! Which replica takes a request.

use std::time::Duration;

use super::Worker;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::health::tests::worker;

    #[test]
    fn least_outstanding_picks_the_idlest_first_on_ties() {
        let (a, b, c) = (worker("a", 3), worker("b", 1), worker("c", 1));
        assert_eq!(LeastOutstanding.pick("m", &[&a, &b, &c]), Some(1));
        assert_eq!(LeastOutstanding.pick("m", &[]), None);
    }
}
