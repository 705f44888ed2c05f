//! The supervisor: engines started one at a time behind `/health`, restarted with backoff
//! when they crash, stopped in reverse order.
//!
//! One task owns every instance (the TEI pattern: state owned by one loop, others talk to
//! it through channels and read a shared snapshot). Crash handling:
//!
//! - Time-slicing / CPU: the crashed instance alone is restarted after a backoff that
//!   doubles with each failure (`backoff_initial` .. `backoff_max`).
//! - MPS (`shared_fault`): a client fault reaches every client of the GPU (the innocent
//!   client dies with a sticky error, and new clients work again only once every affected
//!   client has exited: `../shared/captures/README.md`). So when one instance dies, every
//!   other instance gets a short grace period to die by itself, is then stopped, and all
//!   are restarted in start order, each behind `/health`.
//! - An instance that fails more than `max_failures` times is given up on, with the
//!   reason (its exit and last log lines) in the events; when every instance is given up
//!   on, the deployment reports it as fatal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::process::{self, ExitInfo, Proc, ProcSpec};

/// Grace period for the other MPS clients to exit by themselves after a fault.
const MPS_FAULT_GRACE: Duration = Duration::from_secs(2);

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
}

/// Supervision settings.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    pub max_failures: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub stop_timeout: Duration,
    /// MPS: one crash takes every instance down and all are restarted together.
    pub shared_fault: bool,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Starting,
    Healthy,
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
    /// Stopped because another client of the same MPS daemon crashed.
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
    cancel: CancellationToken,
}

/// Why starting one instance failed.
#[derive(Debug)]
enum StartError {
    Cancelled,
    Failed(String),
}

impl Supervisor {
    /// Starts every instance in order, each after the previous answers `/health`. On a
    /// failure the started ones are stopped and the error says which engine failed, how,
    /// and what it printed last.
    pub async fn start(
        specs: Vec<InstanceSpec>,
        opts: SuperviseOptions,
        on_change: ChangeSink,
        availability: AvailabilitySink,
        cancel: CancellationToken,
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
            events: Vec::new(),
        }));
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
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

    /// Resolves with a reason once the supervisor has given up on every instance.
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.clone()
    }

    /// Stops every instance in reverse start order and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
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
            EventKind::Crashed | EventKind::GaveUp => tracing::warn!(engine = %name, "{message}"),
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
        self.set(i, |s| s.pid = Some(pid));
        let proc = self.instances[i].proc.as_ref().expect("just set");
        match wait_healthy(&spec.url, spec.start_timeout, proc, &self.cancel).await {
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
            let (i, generation, info) = tokio::select! {
                _ = self.cancel.cancelled() => break,
                m = exits.recv() => match m { Some(m) => m, None => break },
            };
            if generation != self.instances[i].generation || self.instances[i].proc.is_none() {
                continue; // a process we stopped on purpose, or an older one
            }
            if !self.handle_crash(i, info).await {
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

    /// Records a crash of instance `i` and restarts what must be restarted. Returns false
    /// when cancelled.
    async fn handle_crash(&mut self, i: usize, info: ExitInfo) -> bool {
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

        // Which instances go down with it.
        let mut group = vec![i];
        if self.opts.shared_fault {
            // Give the fault time to reach the other clients, then stop those still up.
            if !self
                .sleep(MPS_FAULT_GRACE.min(self.opts.stop_timeout))
                .await
            {
                return false;
            }
            for j in 0..self.instances.len() {
                if j == i || self.state(j) == InstanceState::Failed {
                    continue;
                }
                group.push(j);
                let died_alone = self.instances[j].proc.as_ref().and_then(|p| p.exit_info());
                if let Some(info) = self.stop_one(j).await {
                    let how = match died_alone {
                        Some(d) => format!("exited with the MPS fault ({})", d.description),
                        None => format!(
                            "stopped after `{name}` crashed under MPS ({})",
                            info.description
                        ),
                    };
                    self.set(j, |s| {
                        s.state = InstanceState::Restarting;
                        s.pid = None;
                        s.last_exit = Some(info.description.clone());
                    });
                    self.event(j, EventKind::StoppedForFault, how);
                }
            }
            group.sort_unstable();
        }

        for j in group {
            loop {
                let failures = self.snapshot.lock().instances[j].failures;
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
                let delay = if j == i {
                    self.backoff(failures)
                } else {
                    Duration::ZERO
                };
                if !self.sleep(delay).await {
                    return false;
                }
                match self.start_one(j).await {
                    Ok(()) => {
                        self.set(j, |s| s.restarts += 1);
                        self.event(
                            j,
                            EventKind::Restarted,
                            format!("restarted after {delay:?} and healthy"),
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
                    }
                }
            }
        }
        true
    }
}

/// Polls `GET url/health` until 200, the process exits, the timeout passes or we are
/// cancelled.
async fn wait_healthy(
    url: &str,
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
            if r.status().is_success() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::Failed(format!(
                "no 200 from {health} within {} (start_timeout)",
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
