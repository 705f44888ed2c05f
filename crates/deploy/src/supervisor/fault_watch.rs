//! The task that follows the MPS daemon's logs while a deployment runs: each fault is
//! recorded at once (so `status` and the lab see it even while the supervisor is busy
//! restarting) and handed to the supervisor's loop, which decides what to do.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client_owner::owner;
use super::mps_fault::{group, FaultedClient, LoggedFault, MpsFault, MpsFaultKind};
use super::{ChangeSink, Snapshot};
use crate::gpu_glue::MpsFaultLog;

/// How often the logs are read. The server logs a fault before its clients exit, and the
/// supervisor waits [`super::MPS_FAULT_GRACE`] for them, so a few polls fit in between.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// How many faults the snapshot keeps (the total is counted apart).
const FAULTS_KEPT: usize = 100;

/// A fault for the supervisor's loop: which record, which client pids.
#[derive(Debug, Clone)]
pub struct FaultNotice {
    pub id: u64,
    pub kind: MpsFaultKind,
    pub pids: Vec<u32>,
    /// The client the server says raised it, when it says so.
    pub culprit: Option<u32>,
}

/// Reads the logs, records faults in the snapshot, tells the supervisor.
pub struct FaultWatcher {
    /// The log and the last fault read (a sticky list may span two polls).
    log: Mutex<(MpsFaultLog, Option<(LoggedFault, u64)>)>,
    snapshot: Arc<Mutex<Snapshot>>,
    on_change: ChangeSink,
    to_core: mpsc::UnboundedSender<FaultNotice>,
    /// Said once: a log that cannot be read is worth one warning, not one per poll.
    warned: Mutex<bool>,
}

impl FaultWatcher {
    pub fn new(
        log: MpsFaultLog,
        snapshot: Arc<Mutex<Snapshot>>,
        on_change: ChangeSink,
        to_core: mpsc::UnboundedSender<FaultNotice>,
    ) -> FaultWatcher {
        FaultWatcher {
            log: Mutex::new((log, None)),
            snapshot,
            on_change,
            to_core,
            warned: Mutex::new(false),
        }
    }

    /// Reads what was logged since the last poll and records it. Returns how many new
    /// faults (or continuations of the last one) it found.
    pub fn poll_once(&self) -> usize {
        let mut guard = self.log.lock();
        let (log, last) = &mut *guard;
        let notices = match log.poll() {
            Ok(n) => n,
            Err(e) => {
                let mut warned = self.warned.lock();
                if !*warned {
                    tracing::warn!(
                        "cannot read the MPS logs in {}: {e:#}; faults go unseen until it can",
                        log.dir().display()
                    );
                    *warned = true;
                }
                return 0;
            }
        };
        let faults = group(notices);
        let found = faults.len();
        for f in faults {
            let id = match last.as_mut() {
                Some((prev, id)) if prev.continued_by(&f) => {
                    let id = *id;
                    let new_pids: Vec<u32> = f
                        .pids
                        .iter()
                        .copied()
                        .filter(|p| !prev.pids.contains(p))
                        .collect();
                    prev.absorb(f);
                    self.record(prev, id);
                    if !new_pids.is_empty() {
                        self.notify(id, prev, new_pids);
                    }
                    continue;
                }
                _ => self.next_id(),
            };
            self.record(&f, id);
            self.notify(id, &f, f.pids.clone());
            *last = Some((f, id));
        }
        found
    }

    /// Polls every [`POLL_EVERY`] until cancelled, then once more (a fault logged as the
    /// deployment stops still reaches the state file).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let me = self.clone();
            if tokio::task::spawn_blocking(move || me.poll_once())
                .await
                .is_err()
            {
                tracing::warn!("the MPS log poll panicked; fault watching stops");
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.poll_once()).await;
    }

    fn next_id(&self) -> u64 {
        self.snapshot.lock().mps_faults_total + 1
    }

    /// Adds fault `id` to the snapshot, or updates it, naming the engines of its clients.
    fn record(&self, f: &LoggedFault, id: u64) {
        let mut s = self.snapshot.lock();
        let clients: Vec<FaultedClient> = f
            .pids
            .iter()
            .map(|&pid| FaultedClient {
                pid,
                engine: engine_of(&s, pid),
                culprit: f.culprit == Some(pid),
            })
            .collect();
        if let Some(rec) = s.mps_faults.iter_mut().find(|r| r.id == id) {
            rec.clients = clients;
            rec.message = f.message.clone();
        } else {
            let engines: Vec<&str> = clients.iter().filter_map(|c| c.engine.as_deref()).collect();
            tracing::warn!(
                engines = ?engines,
                log_time = %f.log_time,
                "MPS fault #{id}: {}",
                f.message
            );
            s.mps_faults.push(MpsFault {
                id,
                at: chrono::Utc::now().to_rfc3339(),
                log_time: f.log_time.clone(),
                kind: f.kind,
                clients,
                message: f.message.clone(),
                action: None,
            });
            s.mps_faults_total = s.mps_faults_total.max(id);
            let n = s.mps_faults.len();
            if n > FAULTS_KEPT {
                s.mps_faults.drain(..n - FAULTS_KEPT);
            }
        }
        (self.on_change)(&s);
    }

    fn notify(&self, id: u64, f: &LoggedFault, pids: Vec<u32>) {
        // The loop is gone once the supervisor stops: the record is all that matters then.
        let _ = self.to_core.send(FaultNotice {
            id,
            kind: f.kind,
            pids,
            culprit: f.culprit,
        });
    }
}

/// The engine of a client pid: a running engine's process or descendant, else a pid an
/// engine had before (a client that has exited already).
fn engine_of(s: &Snapshot, pid: u32) -> Option<String> {
    let running: Vec<(usize, u32)> = s
        .instances
        .iter()
        .enumerate()
        .filter_map(|(i, st)| st.pid.map(|p| (i, p)))
        .collect();
    if let Some(i) = owner(pid, &running) {
        return Some(s.instances[i].name.clone());
    }
    s.pid_history
        .iter()
        .find(|(p, _)| *p == pid)
        .map(|(_, i)| s.instances[*i].name.clone())
}
