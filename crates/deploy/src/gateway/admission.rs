//! Best-effort admission: at most `limit` best-effort requests in flight (the controller
//! moves the limit), the rest waiting in a bounded FIFO queue per tenant, refused with 429
//! beyond the bound or after the time-out.
//!
//! One mutex owns the whole state; nothing awaits under it. A waiting request holds a
//! oneshot receiver; a place is handed over by sending on it under the lock, so a request
//! that gives up (time-out, or its client went away and the handler was dropped) can tell,
//! under the same lock, whether it was handed a place in the meantime, and then takes it
//! or gives it back: no place is ever lost or counted twice.
//!
//! Fairness between best-effort tenants: a free place goes to the waiting tenant with the
//! fewest requests in flight, ties in round-robin order, so tenants that all have work
//! waiting end with equal shares of the limit whoever came first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// Why a best-effort request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its tenant's queue was full.
    QueueFull,
    /// It waited the whole time-out without a place.
    Timeout,
    /// The gateway is shutting down.
    Closed,
}

/// One best-effort tenant's counters, as `/metrics` and `status` show them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub in_flight: u32,
    pub queued: u32,
    pub admitted: u64,
    pub rejected_queue_full: u64,
    pub rejected_timeout: u64,
    /// Sum of the admitted requests' waits, seconds (with `admitted`: the mean wait).
    pub wait_seconds_sum: f64,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<()>,
    since: Instant,
}

#[derive(Default)]
struct TenantQueue {
    waiting: VecDeque<Waiter>,
    stats: QueueStats,
}

struct State {
    limit: u32,
    in_flight: u32,
    tenants: Vec<TenantQueue>,
    /// The tenant the next tie goes to.
    next: usize,
    next_id: u64,
}

/// The admission of every best-effort tenant (indexed 0..n).
pub struct Admission {
    state: Mutex<State>,
    queue_bound: usize,
    queue_timeout: Duration,
}

impl Admission {
    /// `tenants` best-effort tenants, `limit` places to start with, at most `queue_bound`
    /// requests waiting per tenant, each for at most `queue_timeout`.
    pub fn new(tenants: usize, limit: u32, queue_bound: usize, queue_timeout: Duration) -> Self {
        Admission {
            state: Mutex::new(State {
                limit,
                in_flight: 0,
                tenants: (0..tenants).map(|_| TenantQueue::default()).collect(),
                next: 0,
                next_id: 0,
            }),
            queue_bound,
            queue_timeout,
        }
    }

    /// How long a request may wait.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// Sets the limit; waiting requests take the places it frees at once.
    pub fn set_limit(&self, limit: u32) {
        let mut st = self.state.lock();
        st.limit = limit;
        st.hand_out();
    }

    /// `(limit, in flight)`.
    pub fn load(&self) -> (u32, u32) {
        let st = self.state.lock();
        (st.limit, st.in_flight)
    }

    /// Each tenant's counters.
    pub fn stats(&self) -> Vec<QueueStats> {
        let st = self.state.lock();
        st.tenants
            .iter()
            .map(|t| QueueStats {
                queued: t.waiting.len() as u32,
                ..t.stats.clone()
            })
            .collect()
    }

    /// A place for a request of `tenant`: at once when there is one and nobody waits,
    /// else after waiting in the tenant's queue; refused when the queue is full or the
    /// time-out passes. The place is held until the [`Permit`] is dropped.
    pub async fn admit(self: &Arc<Self>, tenant: usize) -> Result<Permit, Refusal> {
        let (id, rx) = {
            let mut st = self.state.lock();
            let Some(t) = st.tenants.get(tenant) else {
                return Err(Refusal::Closed);
            };
            let nobody_waits = st.tenants.iter().all(|t| t.waiting.is_empty());
            if nobody_waits && st.in_flight < st.limit {
                st.take(tenant, Duration::ZERO);
                return Ok(Permit {
                    admission: self.clone(),
                    tenant,
                });
            }
            if t.waiting.len() >= self.queue_bound {
                st.tenants[tenant].stats.rejected_queue_full += 1;
                return Err(Refusal::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_id;
            st.next_id += 1;
            st.tenants[tenant].waiting.push_back(Waiter {
                id,
                tx,
                since: Instant::now(),
            });
            // A place may be free with others waiting (a tenant just gave one back).
            st.hand_out();
            (id, rx)
        };
        let mut waiting = Waiting {
            admission: self.clone(),
            tenant,
            id,
            rx,
            done: false,
        };
        let outcome = tokio::time::timeout(self.queue_timeout, &mut waiting.rx).await;
        waiting.done = true;
        match outcome {
            Ok(Ok(())) => Ok(self.permit(tenant)),
            Ok(Err(_)) => Err(Refusal::Closed),
            Err(_) => {
                if waiting.give_up() {
                    // handed a place just as the time ran out: take it
                    Ok(self.permit(tenant))
                } else {
                    self.state.lock().tenants[tenant].stats.rejected_timeout += 1;
                    Err(Refusal::Timeout)
                }
            }
        }
    }

    /// What a refused request of `tenant` is told to wait (`Retry-After`): the mean wait
    /// of the requests that got a place so far, in whole seconds within 1..=60; 1 when none
    /// has waited yet.
    pub fn retry_after(&self, tenant: usize) -> Duration {
        let st = self.state.lock();
        let mean = st
            .tenants
            .get(tenant)
            .filter(|t| t.stats.admitted > 0)
            .map_or(0.0, |t| t.stats.wait_seconds_sum / t.stats.admitted as f64);
        Duration::from_secs(mean.ceil().clamp(1.0, 60.0) as u64)
    }

    fn permit(self: &Arc<Self>, tenant: usize) -> Permit {
        Permit {
            admission: self.clone(),
            tenant,
        }
    }

    fn release(&self, tenant: usize) {
        let mut st = self.state.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(t) = st.tenants.get_mut(tenant) {
            t.stats.in_flight = t.stats.in_flight.saturating_sub(1);
        }
        st.hand_out();
    }
}

impl State {
    /// Counts a place taken by `tenant` after waiting `waited`.
    fn take(&mut self, tenant: usize, waited: Duration) {
        self.in_flight += 1;
        let s = &mut self.tenants[tenant].stats;
        s.in_flight += 1;
        s.admitted += 1;
        s.wait_seconds_sum += waited.as_secs_f64();
    }

    /// Hands free places to waiting requests: each to the waiting tenant with the fewest
    /// in flight, ties in round-robin order.
    fn hand_out(&mut self) {
        let n = self.tenants.len();
        while self.in_flight < self.limit {
            let pick = (0..n)
                .map(|k| (self.next + k) % n)
                .filter(|&i| !self.tenants[i].waiting.is_empty())
                .min_by_key(|&i| self.tenants[i].stats.in_flight);
            let Some(i) = pick else { return };
            self.next = (i + 1) % n;
            let Some(w) = self.tenants[i].waiting.pop_front() else {
                continue;
            };
            // Sent under the lock: the receiver, if it gives up, looks under the lock too.
            if w.tx.send(()).is_ok() {
                self.take(i, w.since.elapsed());
            }
        }
    }
}

/// A best-effort request's place, given back when dropped (its answer ended or failed).
pub struct Permit {
    admission: Arc<Admission>,
    tenant: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.tenant);
    }
}

/// A request in a queue. Dropped before it ends (the client went away and the handler
/// with it), it leaves the queue, or gives back the place it was handed meanwhile.
struct Waiting {
    admission: Arc<Admission>,
    tenant: usize,
    id: u64,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Waiting {
    /// Leaves the queue; true when it was too late: a place was handed over already.
    fn give_up(&mut self) -> bool {
        let mut st = self.admission.state.lock();
        let q = &mut st.tenants[self.tenant].waiting;
        if let Some(pos) = q.iter().position(|w| w.id == self.id) {
            q.remove(pos);
            return false;
        }
        // Not in the queue: popped by hand_out, which sent under the lock we hold.
        self.rx.try_recv().is_ok()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.done && self.give_up() {
            self.admission.release(self.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(tenants: usize, limit: u32, bound: usize, timeout_ms: u64) -> Arc<Admission> {
        Arc::new(Admission::new(
            tenants,
            limit,
            bound,
            Duration::from_millis(timeout_ms),
        ))
    }

    #[tokio::test]
    async fn places_within_the_limit_then_a_queue_then_429() {
        let a = adm(1, 2, 1, 50);
        let p1 = a.admit(0).await.unwrap();
        let _p2 = a.admit(0).await.unwrap();
        assert_eq!(a.load(), (2, 2));
        // third waits, fourth finds the queue full
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit(0).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(a.stats()[0].queued, 1);
        assert_eq!(a.admit(0).await.err(), Some(Refusal::QueueFull));
        // a place is given back: the waiter gets it
        drop(p1);
        let p3 = waiter.await.unwrap().unwrap();
        // nobody gives one back now: time-out
        assert_eq!(a.admit(0).await.err(), Some(Refusal::Timeout));
        let s = &a.stats()[0];
        assert_eq!(s.rejected_queue_full, 1);
        assert_eq!(s.rejected_timeout, 1);
        assert_eq!(s.admitted, 3);
        assert_eq!(s.queued, 0);
        assert_eq!(a.load(), (2, 2));
        drop(p3);
        assert_eq!(a.load(), (2, 1));
    }

    #[tokio::test]
    async fn raising_the_limit_releases_waiters_at_once() {
        let a = adm(1, 0, 8, 5_000);
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let p = a.admit(0).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                p.is_ok()
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(a.stats()[0].queued, 3);
        a.set_limit(3);
        assert_eq!(a.load(), (3, 3));
        for t in tasks {
            assert!(t.await.unwrap());
        }
        assert_eq!(a.load(), (3, 0));
    }

    #[tokio::test]
    async fn a_client_that_goes_away_leaves_no_place_taken() {
        let a = adm(1, 0, 8, 5_000);
        let a2 = a.clone();
        let t = tokio::spawn(async move { a2.admit(0).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        t.abort();
        let _ = t.await;
        assert_eq!(a.stats()[0].queued, 0);
        a.set_limit(1);
        assert_eq!(a.load(), (1, 0));
        // handed a place and dropped before it looked: the place comes back
        let a2 = a.clone();
        a.set_limit(0);
        let t = tokio::spawn(async move { a2.admit(0).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        {
            let mut st = a.state.lock();
            st.limit = 1;
            st.hand_out(); // sent, not yet received
        }
        t.abort();
        let _ = t.await;
        assert_eq!(a.load().1, 0);
    }

    #[tokio::test]
    async fn waiting_tenants_share_the_limit_equally() {
        // tenant 0 holds every place before tenant 1 shows up; as places come back they go
        // to tenant 1 until both hold half.
        let a = adm(2, 4, 100, 5_000);
        let mut held0 = Vec::new();
        for _ in 0..4 {
            held0.push(a.admit(0).await.unwrap());
        }
        let mut waiters = Vec::new();
        for tenant in [0, 0, 0, 1, 1, 1] {
            let a = a.clone();
            waiters.push(tokio::spawn(async move { a.admit(tenant).await.ok() }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        held0.truncate(2); // two of tenant 0's come back
        tokio::time::sleep(Duration::from_millis(10)).await;
        let s = a.stats();
        assert_eq!((s[0].in_flight, s[1].in_flight), (2, 2), "{s:?}");
        assert_eq!((s[0].queued, s[1].queued), (3, 1));
        drop(held0);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let s = a.stats();
        assert_eq!((s[0].in_flight, s[1].in_flight), (2, 2), "{s:?}");
        for w in waiters {
            w.abort();
        }
    }
}
