//! The supervisor: engines started one at a time behind `/health`, restarted with backoff
//! when they crash or when the MPS daemon reports a fault, stopped in reverse order.
//!
//! One task owns every instance (the TEI pattern: state owned by one loop, others talk to
//! it through channels and read a shared snapshot). It listens to two things: its
//! processes' exits, and, under MPS, the daemon's logs ([`fault_watch`] reads them every
//! 250 ms and records each fault in the snapshot at once).
//!
//! # An instance's health
//!
//! ```text
//!            spawn            /health 200
//!   ──────> Starting ───────────────────────> Healthy ──── shutdown ───> Stopped
//!             ^  │ start failed / timed out      │  │
//!             │  v                               │  │ the MPS log names its client
//!    backoff  Restarting <── process exited ─────┘  v  in a fault (sticky error)
//!     ended   ^    ^                             Faulted
//!             │    └──── exited, or killed ─────────┘
//!             │          after the grace period
//!   failures > max_failures at any restart ─────> Failed (given up; reason in the events)
//! ```
//!
//! # Recovery
//!
//! A recovery starts with a process exit or with a fault naming a running client. Its
//! *group* is the instances restarted together:
//!
//! - Time-slicing / CPU: the crashed instance alone (or the instances a fault names), after
//!   a backoff that doubles with each failure (`backoff_initial` .. `backoff_max`).
//! - MPS (`shared_fault`): every instance of the GPU (a deployment has one GPU). A client
//!   fault reaches every client of the server: the innocent one dies with a sticky error
//!   too, and new clients work again only once every affected client has exited
//!   (`testdata/mps/mps-client-fault-h100.log`). So the group gets [`MPS_FAULT_GRACE`] to
//!   exit by itself; faults logged meanwhile join this recovery; then the members still
//!   alive are stopped, and all are restarted in start order, each behind `/health`.
//!
//! Why stop a faulted client that is still alive rather than wait for it: a client with a
//! sticky error can do no more GPU work (every CUDA call fails), yet its process may live
//! on — an HTTP front that still answers `/health` while its GPU worker is dead — and the
//! server recreates its context only once every faulted client has gone. Waiting would
//! leave the whole GPU wedged behind one process; killing it lets the group restart now.
//!
//! A fault counts as one failure for the instance whose client raised it, when the
//! server says which (the H200 capture's driver does: "encountered a fatal GPU error"),
//! else for each instance whose client it names (the H100 capture lists only the sticky
//! clients; a deployment that faults again and again is then given up on as a whole,
//! which is the truth: those engines cannot run there together).
//! A fault whose clients are no longer running (their group was already restarted, say on
//! the culprit's exit) is recorded only. Server failures are recorded only: their clients
//! fail or exit, and that starts a recovery.
//!
//! An instance that fails more than `max_failures` times is given up on, with the reason
//! (its exit and last log lines) in the events; when every instance is given up on, the
//! deployment reports it as fatal.

mod client_owner;
mod fault_watch;
pub mod mps_fault;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::gpu_glue::MpsFaultLog;
use crate::process::{self, ExitInfo, Proc, ProcSpec};
use client_owner::owner;
use fault_watch::{FaultNotice, FaultWatcher};
pub use mps_fault::{FaultedClient, MpsFault, MpsFaultKind};

/// Grace period for the other MPS clients to exit by themselves after a fault. The
/// capture shows both clients gone within 0.9 s of the sticky error.
pub const MPS_FAULT_GRACE: Duration = Duration::from_secs(2);

/// One replica to run.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Replica name (unique).
    pub name: String,
    /// The engine it belongs to.
    pub engine: String,
    /// The model name clients use.
    pub model: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub proc: ProcSpec,
    pub start_timeout: Duration,
    /// Ready only once `/v1/models` also lists this model (vLLM answers `/health` before its
    /// API servers serve the model); `None`: `/health` alone.
    pub ready_model: Option<String>,
}

/// Supervision settings.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    pub max_failures: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub stop_timeout: Duration,
    /// MPS: one crash or fault takes every instance down and all are restarted together.
    pub shared_fault: bool,
}

/// Where an instance is in its life (the state machine is in the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Healthy,
    /// Named in an MPS fault: its GPU context is dead; out of the gateway, waiting for the
    /// rest of its group to go down before the restart.
    Faulted,
    /// Crashed (or stopped because another MPS client crashed), waiting to restart.
    Restarting,
    /// Given up after too many failures.
    Failed,
    Stopped,
}

/// What `colocate status` shows per instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    pub engine: String,
    pub model: String,
    pub url: String,
    pub pid: Option<u32>,
    pub state: InstanceState,
    pub restarts: u32,
    pub failures: u32,
    pub last_exit: Option<String>,
    pub log: PathBuf,
}

/// Something that happened to an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 time.
    pub at: String,
    pub instance: String,
    pub kind: EventKind,
    pub message: String,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Crashed,
    /// The MPS daemon's log named this instance's client in a fault.
    MpsFault,
    /// Stopped because another client of the same MPS daemon crashed or faulted.
    StoppedForFault,
    Restarted,
    GaveUp,
    Stopped,
}

/// Everything shared with readers (the deployment, the state file).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub instances: Vec<InstanceStatus>,
    pub events: Vec<Event>,
    /// The most recent MPS faults, oldest first.
    pub mps_faults: Vec<MpsFault>,
    /// MPS faults seen in all (the list keeps only the recent ones).
    pub mps_faults_total: u64,
    /// Every (pid, instance index) spawned, to name clients that have exited already.
    pid_history: Vec<(u32, usize)>,
}

/// Called with (instance name, available) when the supervisor knows an instance is up or
/// down, so the gateway takes it out at once instead of at its next health check.
pub type AvailabilitySink = Arc<dyn Fn(&str, bool) + Send + Sync>;
/// Called after every change of the snapshot (writes the state file).
pub type ChangeSink = Arc<dyn Fn(&Snapshot) + Send + Sync>;

/// The running supervisor.
pub struct Supervisor {
    snapshot: Arc<Mutex<Snapshot>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    fatal: watch::Receiver<Option<String>>,
    faults: Option<(Arc<FaultWatcher>, tokio::task::JoinHandle<()>)>,
}

struct Instance {
    spec: InstanceSpec,
    proc: Option<Proc>,
    /// Bumped each spawn so stale exit notices are ignored.
    generation: u64,
}

struct Core {
    instances: Vec<Instance>,
    opts: SuperviseOptions,
    snapshot: Arc<Mutex<Snapshot>>,
    on_change: ChangeSink,
    availability: AvailabilitySink,
    exit_tx: mpsc::UnboundedSender<(usize, u64, ExitInfo)>,
    /// MPS faults from the log watcher (none without MPS).
    faults: Option<mpsc::UnboundedReceiver<FaultNotice>>,
    /// The watcher itself, to read the logs at once before deciding who is hit.
    watcher: Option<Arc<FaultWatcher>>,
    cancel: CancellationToken,
}

/// Why starting one instance failed.
#[derive(Debug)]
enum StartError {
    Cancelled,
    Failed(String),
}

/// What the loop waits for.
enum Input {
    Exit(usize, u64, ExitInfo),
    Fault(FaultNotice),
    Stop,
}

impl Supervisor {
    /// Starts every instance in order, each after the previous answers `/health`. On a
    /// failure the started ones are stopped and the error says which engine failed, how,
    /// and what it printed last. With `mps_faults`, the MPS daemon's logs are followed
    /// from now on and faults handled as the module doc says.
    pub async fn start(
        specs: Vec<InstanceSpec>,
        opts: SuperviseOptions,
        on_change: ChangeSink,
        availability: AvailabilitySink,
        cancel: CancellationToken,
        mps_faults: Option<MpsFaultLog>,
    ) -> anyhow::Result<Supervisor> {
        let snapshot = Arc::new(Mutex::new(Snapshot {
            instances: specs
                .iter()
                .map(|s| InstanceStatus {
                    name: s.name.clone(),
                    engine: s.engine.clone(),
                    model: s.model.clone(),
                    url: s.url.clone(),
                    pid: None,
                    state: InstanceState::Starting,
                    restarts: 0,
                    failures: 0,
                    last_exit: None,
                    log: s.proc.log_path.clone(),
                })
                .collect(),
            ..Default::default()
        }));
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        // The watcher runs from the first engine's start: a fault while later engines
        // start is recorded, and handled once they all run.
        let watch_cancel = cancel.child_token();
        let (faults, fault_rx) = match mps_faults {
            Some(log) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let w = Arc::new(FaultWatcher::new(
                    log,
                    snapshot.clone(),
                    on_change.clone(),
                    tx,
                ));
                let task = tokio::spawn(w.clone().run(watch_cancel.clone()));
                (Some((w, task)), Some(rx))
            }
            None => (None, None),
        };
        let mut core = Core {
            instances: specs
                .into_iter()
                .map(|spec| Instance {
                    spec,
                    proc: None,
                    generation: 0,
                })
                .collect(),
            opts,
            snapshot: snapshot.clone(),
            on_change,
            availability,
            exit_tx,
            faults: fault_rx,
            watcher: faults.as_ref().map(|(w, _)| w.clone()),
            cancel: cancel.clone(),
        };
        for i in 0..core.instances.len() {
            match core.start_one(i).await {
                Ok(()) => core.event(i, EventKind::Started, "healthy".into()),
                Err(e) => {
                    core.stop_all().await;
                    for j in i..core.instances.len() {
                        core.set(j, |s| s.state = InstanceState::Stopped);
                    }
                    watch_cancel.cancel();
                    if let Some((_, task)) = faults {
                        let _ = task.await;
                    }
                    match e {
                        StartError::Cancelled => bail!("cancelled while starting"),
                        StartError::Failed(msg) => bail!("{msg}"),
                    }
                }
            }
        }
        let (fatal_tx, fatal) = watch::channel(None);
        let task = tokio::spawn(core.run(exit_rx, fatal_tx));
        Ok(Supervisor {
            snapshot,
            cancel,
            task,
            fatal,
            faults,
        })
    }

    /// Current status of every instance.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        self.snapshot.lock().instances.clone()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.snapshot.lock().events.clone()
    }

    /// The MPS faults seen (the most recent ones), after reading what the daemon logged
    /// up to now: a caller closing a measurement window sees every fault logged in it.
    /// Reads the log files in place (small appends; call it outside async code or accept
    /// a short block).
    pub fn mps_faults(&self) -> Vec<MpsFault> {
        if let Some((w, _)) = &self.faults {
            w.poll_once();
        }
        self.snapshot.lock().mps_faults.clone()
    }

    /// Resolves with a reason once the supervisor has given up on every instance.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }

    /// Stops every instance in reverse start order and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        if let Some((_, task)) = self.faults {
            let _ = task.await;
        }
    }
}

/// The next fault notice, or never when there is no MPS log to follow.
async fn next_fault(rx: &mut Option<mpsc::UnboundedReceiver<FaultNotice>>) -> Option<FaultNotice> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Core {
    fn changed(&self) {
        let s = self.snapshot.lock();
        (self.on_change)(&s);
    }

    fn event(&self, i: usize, kind: EventKind, message: String) {
        let name = self.instances[i].spec.name.clone();
        match kind {
            EventKind::Crashed | EventKind::GaveUp | EventKind::MpsFault => {
                tracing::warn!(engine = %name, "{message}")
            }
            _ => tracing::info!(engine = %name, "{message}"),
        }
        self.snapshot.lock().events.push(Event {
            at: chrono::Utc::now().to_rfc3339(),
            instance: name,
            kind,
            message,
        });
        self.changed();
    }

    fn set(&self, i: usize, f: impl FnOnce(&mut InstanceStatus)) {
        f(&mut self.snapshot.lock().instances[i]);
        self.changed();
    }

    fn state(&self, i: usize) -> InstanceState {
        self.snapshot.lock().instances[i].state
    }

    fn failures(&self, i: usize) -> u32 {
        self.snapshot.lock().instances[i].failures
    }

    /// Sets what the supervisor did about fault `id`, unless an earlier decision stands.
    fn fault_action(&self, id: u64, action: String) {
        self.update_fault_action(id, |a| {
            a.get_or_insert(action);
        });
    }

    fn update_fault_action(&self, id: u64, f: impl FnOnce(&mut Option<String>)) {
        let mut s = self.snapshot.lock();
        if let Some(rec) = s.mps_faults.iter_mut().find(|r| r.id == id) {
            f(&mut rec.action);
        }
        (self.on_change)(&s);
    }

    /// Who recovers together: under MPS every instance not given up on (one GPU per
    /// deployment), otherwise the crashed and the faulted ones.
    fn group(&self, charged: &BTreeSet<usize>, named: &BTreeSet<usize>) -> Vec<usize> {
        (0..self.instances.len())
            .filter(|&j| self.state(j) != InstanceState::Failed)
            .filter(|j| self.opts.shared_fault || charged.contains(j) || named.contains(j))
            .collect()
    }

    /// (index, pid) of every instance with a process (running, or exited unnoticed yet).
    fn running_pids(&self) -> Vec<(usize, u32)> {
        self.instances
            .iter()
            .enumerate()
            .filter_map(|(i, inst)| inst.proc.as_ref().map(|p| (i, p.pid)))
            .collect()
    }

    /// Spawns instance `i` and waits for `/health`.
    async fn start_one(&mut self, i: usize) -> Result<(), StartError> {
        let spec = self.instances[i].spec.clone();
        self.set(i, |s| {
            s.state = InstanceState::Starting;
            s.pid = None;
        });
        let proc = process::spawn(&spec.proc).map_err(|e| StartError::Failed(format!("{e:#}")))?;
        let pid = proc.pid;
        let inst = &mut self.instances[i];
        inst.generation += 1;
        let generation = inst.generation;
        let mut exited = proc.exit_watch();
        let tx = self.exit_tx.clone();
        tokio::spawn(async move {
            loop {
                if let Some(info) = exited.borrow_and_update().clone() {
                    let _ = tx.send((i, generation, info));
                    return;
                }
                if exited.changed().await.is_err() {
                    return;
                }
            }
        });
        inst.proc = Some(proc);
        {
            let mut s = self.snapshot.lock();
            s.pid_history.push((pid, i));
            s.instances[i].pid = Some(pid);
        }
        self.changed();
        let Some(proc) = self.instances[i].proc.as_ref() else {
            return Err(StartError::Failed("the process vanished".into()));
        };
        match wait_healthy(
            &spec.url,
            spec.ready_model.as_deref(),
            spec.start_timeout,
            proc,
            &self.cancel,
        )
        .await
        {
            Ok(()) => {
                self.set(i, |s| s.state = InstanceState::Healthy);
                (self.availability)(&spec.name, true);
                Ok(())
            }
            Err(StartError::Cancelled) => Err(StartError::Cancelled),
            Err(StartError::Failed(why)) => {
                let tail = proc.tail(15);
                let _ = proc.stop(self.opts.stop_timeout).await;
                let log = spec.proc.log_path.display();
                let mut msg = format!("engine `{}` did not start: {why} (log: {log})", spec.name);
                if !tail.is_empty() {
                    msg.push_str("\nlast lines:\n  ");
                    msg.push_str(&tail.join("\n  "));
                }
                self.set(i, |s| s.last_exit = Some(why.clone()));
                Err(StartError::Failed(msg))
            }
        }
    }

    async fn stop_one(&mut self, i: usize) -> Option<ExitInfo> {
        let proc = self.instances[i].proc.take()?;
        (self.availability)(&self.instances[i].spec.name, false);
        Some(proc.stop(self.opts.stop_timeout).await)
    }

    async fn stop_all(&mut self) {
        for i in (0..self.instances.len()).rev() {
            if let Some(info) = self.stop_one(i).await {
                self.set(i, |s| {
                    s.state = InstanceState::Stopped;
                    s.pid = None;
                });
                self.event(
                    i,
                    EventKind::Stopped,
                    format!("stopped ({})", info.description),
                );
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        (self.opts.backoff_initial * factor).min(self.opts.backoff_max)
    }

    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn run(
        mut self,
        mut exits: mpsc::UnboundedReceiver<(usize, u64, ExitInfo)>,
        fatal: watch::Sender<Option<String>>,
    ) {
        loop {
            let input = tokio::select! {
                _ = self.cancel.cancelled() => Input::Stop,
                m = exits.recv() => match m {
                    Some((i, g, info)) => Input::Exit(i, g, info),
                    None => Input::Stop,
                },
                Some(f) = next_fault(&mut self.faults) => Input::Fault(f),
            };
            let go_on = match input {
                Input::Stop => break,
                Input::Exit(i, generation, info) => {
                    if generation != self.instances[i].generation
                        || self.instances[i].proc.is_none()
                    {
                        continue; // a process we stopped on purpose, or an older one
                    }
                    let pid = self.instances[i].proc.as_ref().map(|p| p.pid);
                    self.record_crash(i, info);
                    self.recover(Some((i, pid)), None).await
                }
                Input::Fault(f) => self.handle_fault(f).await,
            };
            if !go_on {
                break;
            }
            let all_failed = self
                .snapshot
                .lock()
                .instances
                .iter()
                .all(|s| s.state == InstanceState::Failed);
            if all_failed {
                let why = self
                    .snapshot
                    .lock()
                    .events
                    .iter()
                    .filter(|e| e.kind == EventKind::GaveUp)
                    .map(|e| format!("{}: {}", e.instance, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = fatal.send(Some(format!("every engine failed: {why}")));
            }
        }
        self.stop_all().await;
    }

    /// Records that instance `i` exited on its own, and takes it out of the gateway.
    fn record_crash(&mut self, i: usize, info: ExitInfo) {
        let name = self.instances[i].spec.name.clone();
        let tail = self.instances[i]
            .proc
            .as_ref()
            .map(|p| p.tail(5))
            .unwrap_or_default();
        self.instances[i].proc = None;
        (self.availability)(&name, false);
        self.set(i, |s| {
            s.failures += 1;
            s.state = InstanceState::Restarting;
            s.pid = None;
            s.last_exit = Some(info.description.clone());
        });
        let mut msg = format!("exited unexpectedly: {}", info.description);
        if !tail.is_empty() {
            msg.push_str(&format!(" (last lines: {})", tail.join(" | ")));
        }
        self.event(i, EventKind::Crashed, msg);
    }

    /// A fault read from the MPS logs: recovers the instances it names that still run;
    /// a fault naming none of them (they were restarted already) is recorded only.
    async fn handle_fault(&mut self, f: FaultNotice) -> bool {
        if f.kind == MpsFaultKind::ServerFailed {
            self.fault_action(
                f.id,
                "recorded: a server failure; its clients' exits start any restart".into(),
            );
            return true;
        }
        let running = self.running_pids();
        if !f.pids.iter().any(|&p| owner(p, &running).is_some()) {
            self.fault_action(
                f.id,
                "recorded: no running engine is among its clients (already restarted)".into(),
            );
            return true;
        }
        self.recover(None, Some(f)).await
    }

    /// Marks the instances of `members` (index, pid) whose client `f` names as faulted:
    /// out of the gateway, and charged one failure (once per recovery): the one that
    /// raised the fault when the server says which, else each one named.
    fn mark_faulted(
        &mut self,
        f: &FaultNotice,
        members: &[(usize, u32)],
        charged: &mut BTreeSet<usize>,
    ) -> Vec<usize> {
        let mut hit: Vec<usize> = f.pids.iter().filter_map(|&p| owner(p, members)).collect();
        hit.sort_unstable();
        hit.dedup();
        let (log_time, message) = {
            let s = self.snapshot.lock();
            s.mps_faults
                .iter()
                .find(|r| r.id == f.id)
                .map(|r| (r.log_time.clone(), r.message.clone()))
                .unwrap_or_default()
        };
        let culprit = f.culprit.and_then(|c| owner(c, members));
        for &j in &hit {
            let first = culprit.is_none_or(|c| c == j) && charged.insert(j);
            let alive = self.instances[j].proc.is_some();
            (self.availability)(&self.instances[j].spec.name, false);
            self.set(j, |s| {
                if first {
                    s.failures += 1;
                }
                s.state = InstanceState::Faulted;
                s.last_exit = Some(format!("MPS fault #{}: {message}", f.id));
            });
            self.event(
                j,
                EventKind::MpsFault,
                format!(
                    "MPS fault #{} (logged {log_time}): {message}{}{}",
                    f.id,
                    if culprit == Some(j) {
                        " (its own work raised it)"
                    } else {
                        ""
                    },
                    if alive { "" } else { " (already exited)" }
                ),
            );
        }
        hit
    }

    /// Takes a group down and brings it back (see the module doc). `crashed` is the
    /// instance whose exit started it (index, its pid), `fault` the fault that did.
    /// Returns false when cancelled.
    async fn recover(
        &mut self,
        crashed: Option<(usize, Option<u32>)>,
        fault: Option<FaultNotice>,
    ) -> bool {
        // Everyone that can be hit, with the pid it had when this began.
        let mut members: Vec<(usize, u32)> = self.running_pids();
        if let Some((i, Some(pid))) = crashed {
            members.push((i, pid));
        }
        let mut charged: BTreeSet<usize> = crashed.iter().map(|(i, _)| *i).collect();
        let mut faults: Vec<u64> = Vec::new();
        let mut named: BTreeSet<usize> = BTreeSet::new();
        if let Some(f) = &fault {
            named.extend(self.mark_faulted(f, &members, &mut charged));
            faults.push(f.id);
        }
        let group = self.group(&charged, &named);

        // Give the group time to exit by itself, taking in the faults logged meanwhile.
        if group.iter().any(|&j| self.instances[j].proc.is_some()) {
            let deadline =
                tokio::time::Instant::now() + MPS_FAULT_GRACE.min(self.opts.stop_timeout);
            while tokio::time::Instant::now() < deadline
                && group.iter().any(|&j| {
                    self.instances[j]
                        .proc
                        .as_ref()
                        .is_some_and(|p| p.exit_info().is_none())
                })
            {
                if !self.sleep(Duration::from_millis(50)).await {
                    return false;
                }
            }
        }
        if let Some(w) = self.watcher.clone() {
            // Whatever was logged by now joins this recovery, not a later one.
            let _ = tokio::task::spawn_blocking(move || w.poll_once()).await;
        }
        while let Some(f) = self.faults.as_mut().and_then(|rx| rx.try_recv().ok()) {
            if f.kind == MpsFaultKind::ServerFailed {
                self.fault_action(f.id, "recorded during a restart".into());
                continue;
            }
            let hit = self.mark_faulted(&f, &members, &mut charged);
            if hit.is_empty() {
                self.fault_action(
                    f.id,
                    "recorded: no running engine is among its clients (already restarted)".into(),
                );
            } else {
                named.extend(hit);
                faults.push(f.id);
            }
        }
        let group = self.group(&charged, &named);
        let names: Vec<String> = group
            .iter()
            .map(|&j| self.instances[j].spec.name.clone())
            .collect();
        let whom = if self.opts.shared_fault {
            format!("every engine of the GPU ({})", names.join(", "))
        } else {
            names.join(", ")
        };
        for id in &faults {
            self.fault_action(*id, format!("restarting {whom}"));
        }

        // Stop whoever is left.
        let cause = match (&crashed, faults.first()) {
            (_, Some(id)) => format!("MPS fault #{id}"),
            (Some((i, _)), None) => format!("`{}` crashed under MPS", self.instances[*i].spec.name),
            (None, None) => "a fault".to_string(),
        };
        for &j in &group {
            if crashed.is_some_and(|(i, _)| i == j) {
                self.set(j, |s| s.state = InstanceState::Restarting);
                continue;
            }
            let died_alone = self.instances[j].proc.as_ref().and_then(|p| p.exit_info());
            if let Some(info) = self.stop_one(j).await {
                let how = match died_alone {
                    Some(d) => format!("exited with {cause} ({})", d.description),
                    None if named.contains(&j) => format!(
                        "stopped: its MPS client cannot go on after {cause}, and the server recovers only once every client is gone ({})",
                        info.description
                    ),
                    None => format!("stopped after {cause} ({})", info.description),
                };
                self.set(j, |s| {
                    if s.state != InstanceState::Faulted {
                        s.last_exit = Some(info.description.clone());
                    }
                    s.state = InstanceState::Restarting;
                    s.pid = None;
                });
                self.event(j, EventKind::StoppedForFault, how);
            } else {
                self.set(j, |s| s.state = InstanceState::Restarting);
            }
        }
        let done = self.restart(&group, &charged).await;
        let gave_up: Vec<&str> = group
            .iter()
            .filter(|&&j| self.state(j) == InstanceState::Failed)
            .map(|&j| self.instances[j].spec.name.as_str())
            .collect();
        let outcome = match (done, gave_up.is_empty()) {
            (false, _) => format!("restart of {whom} cut short by the shutdown"),
            (true, true) => format!("{whom} restarted"),
            (true, false) => format!(
                "{whom} restarted but {} (given up on: see the events)",
                gave_up.join(", ")
            ),
        };
        for id in &faults {
            self.update_fault_action(*id, |a| *a = Some(outcome.clone()));
        }
        done
    }

    /// Starts `group` again in start order, after the backoff of the most failed of
    /// `charged`; a start that fails is retried after its own backoff, up to
    /// `max_failures`. Returns false when cancelled.
    async fn restart(&mut self, group: &[usize], charged: &BTreeSet<usize>) -> bool {
        let delay = charged
            .iter()
            .map(|&j| self.backoff(self.failures(j)))
            .max()
            .unwrap_or(Duration::ZERO);
        if !self.sleep(delay).await {
            return false;
        }
        for &j in group {
            let mut waited = delay;
            loop {
                let failures = self.failures(j);
                if failures > self.opts.max_failures {
                    let last = self.snapshot.lock().instances[j]
                        .last_exit
                        .clone()
                        .unwrap_or_default();
                    self.set(j, |s| s.state = InstanceState::Failed);
                    self.event(
                        j,
                        EventKind::GaveUp,
                        format!(
                            "gave up after {failures} failures (max_failures = {}); last: {last}; log: {}",
                            self.opts.max_failures,
                            self.instances[j].spec.proc.log_path.display()
                        ),
                    );
                    break;
                }
                match self.start_one(j).await {
                    Ok(()) => {
                        self.set(j, |s| s.restarts += 1);
                        self.event(
                            j,
                            EventKind::Restarted,
                            format!("restarted after {waited:?} and healthy"),
                        );
                        break;
                    }
                    Err(StartError::Cancelled) => return false,
                    Err(StartError::Failed(msg)) => {
                        self.instances[j].proc = None;
                        self.set(j, |s| {
                            s.failures += 1;
                            s.state = InstanceState::Restarting;
                        });
                        self.event(j, EventKind::Crashed, msg);
                        waited = self.backoff(self.failures(j));
                        if !self.sleep(waited).await {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }
}

/// Polls `GET url/health` until 200, the process exits, the timeout passes or we are
/// cancelled.
/// True when no listing is asked for, or `GET {url}/v1/models` lists `model`.
async fn lists_model(client: &reqwest::Client, url: &str, model: Option<&str>) -> bool {
    let Some(model) = model else {
        return true;
    };
    match client.get(format!("{url}/v1/models")).send().await {
        Ok(r) if r.status().is_success() => r
            .bytes()
            .await
            .is_ok_and(|b| crate::adapters::models_list_has(&b, model)),
        _ => false,
    }
}

async fn wait_healthy(
    url: &str,
    ready_model: Option<&str>,
    timeout: Duration,
    proc: &Proc,
    cancel: &CancellationToken,
) -> Result<(), StartError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| StartError::Failed(format!("http client: {e}")))?;
    let health = format!("{url}/health");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut exited = proc.exit_watch();
    loop {
        if let Some(info) = exited.borrow_and_update().clone() {
            return Err(StartError::Failed(format!(
                "it exited before answering /health ({})",
                info.description
            )));
        }
        if let Ok(r) = client.get(&health).send().await {
            if r.status().is_success() && lists_model(&client, url, ready_model).await {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let listing = ready_model
                .map(|m| format!(" and `{m}` listed by {url}/v1/models"))
                .unwrap_or_default();
            return Err(StartError::Failed(format!(
                "no 200 from {health}{listing} within {} (start_timeout)",
                humantime::format_duration(timeout)
            )));
        }
        tokio::select! {
            _ = cancel.cancelled() => return Err(StartError::Cancelled),
            _ = exited.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
