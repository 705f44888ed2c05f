//! `Deployment::up` and `shutdown`: the API the lab and `colocate up` use.
//!
//! Order of things, and why:
//! 1. plan the validated deployment (one that does not fit is refused before anything
//!    runs);
//! 2. the gateway binds its address first, so a port in use fails in a second, not after
//!    minutes of engine start-up;
//! 3. the MPS daemon, when asked, with private folders under the run folder;
//! 4. engines one at a time, each only after the previous answers `/health` (several
//!    engines starting together mis-measure each other's free memory); under MPS the
//!    supervisor follows the daemon's logs for client faults from then on.
//!
//! Shutdown reverses it: the gateway stops accepting and drains, engines stop in reverse
//! order (SIGTERM, then SIGKILL), the MPS daemon quits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, LeastOutstanding, TenantSpec, WorkerSpec};
use crate::gpu_glue::{self, Mps, MpsFaultLog};
use crate::plan::Plan;
use crate::process::{log_path, ProcSpec};
use crate::spec::{EngineKind, Sharing, ValidDeployment};
use crate::state::{self, StateFile};
use crate::supervisor::{
    Event, InstanceSpec, InstanceStatus, MpsFault, SuperviseOptions, Supervisor,
};

/// How to run a deployment.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    /// Logs and `state.json` go here.
    pub run_dir: PathBuf,
    /// The `colocate` binary for built-in engines; default: `$COLOCATE_BIN`, else this
    /// executable.
    pub engine_bin: Option<PathBuf>,
    /// Do not copy engine output to the console.
    pub quiet: bool,
    /// Cancels the start: engines already started are stopped, the MPS daemon quit, and
    /// `up` fails with "cancelled while starting". It has no effect once `up` returned
    /// (stopping a running deployment is [`Deployment::down`]).
    pub start_cancel: CancellationToken,
}

/// One engine replica as a client reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEndpoint {
    /// Replica name.
    pub engine: String,
    /// Served model name.
    pub model: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

/// A running deployment.
pub struct Deployment {
    plan: Plan,
    run_dir: PathBuf,
    supervisor: Supervisor,
    gateway: Option<Gateway>,
    gateway_url: Option<String>,
    mps: Option<Mps>,
    state: Arc<Mutex<StateFile>>,
    stop_timeout: Duration,
    /// Copies the gateway's control snapshot into the state file every second.
    control_writer: Option<tokio::task::JoinHandle<()>>,
}

/// Each engine as the gateway's tenant: the model its requests name, its priority and SLO
/// (validation made engines serving one model agree on both).
fn tenants(spec: &crate::spec::DeploymentSpec) -> Vec<TenantSpec> {
    let mut out: Vec<TenantSpec> = Vec::new();
    for e in &spec.engines {
        match out.iter_mut().find(|t| t.model == e.served_name()) {
            Some(t) => {
                t.name.push('+');
                t.name.push_str(&e.name);
            }
            None => out.push(TenantSpec {
                name: e.name.clone(),
                model: e.served_name().to_string(),
                priority: e.priority,
                slo: e.slo,
                share_urls: Vec::new(),
            }),
        }
        // The built-in engine has the compute-share lever; other kinds do not.
        if e.kind == EngineKind::Builtin {
            if let Some(t) = out.iter_mut().find(|t| t.model == e.served_name()) {
                t.share_urls.extend(
                    e.instances()
                        .into_iter()
                        .map(|(_, port)| format!("http://127.0.0.1:{port}")),
                );
            }
        }
    }
    out
}

/// How often `colocate status`'s view of the SLO controller is refreshed.
const CONTROL_STATE_EVERY: Duration = Duration::from_secs(1);

/// Writes the gateway's control snapshot into the state file every
/// [`CONTROL_STATE_EVERY`] until aborted.
async fn write_control(
    source: impl Fn() -> Option<crate::gateway::ControlSnapshot>,
    state: Arc<Mutex<StateFile>>,
    run_dir: PathBuf,
) {
    let mut every = tokio::time::interval(CONTROL_STATE_EVERY);
    loop {
        every.tick().await;
        let mut s = state.lock();
        s.gateway_control = source();
        if let Err(e) = state::write(&run_dir, &s) {
            tracing::warn!("state file: {e:#}");
        }
    }
}

/// The binary that runs built-in engines.
fn engine_bin(opts: &UpOptions) -> anyhow::Result<PathBuf> {
    if let Some(p) = &opts.engine_bin {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("COLOCATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe()
        .context("finding the colocate binary for built-in engines (set COLOCATE_BIN)")
}

/// The MPS daemon's folder: `<run>/mps`, or, where that is too deep for the daemon's Unix
/// socket (a lab condition's long folder name under a deep run folder), a short folder in
/// the system's temporary folder named after the run folder, which `<run>/mps` then links
/// to: the logs are found from the run folder either way.
fn mps_dir(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = run_dir.join("mps");
    if gpu::mps::socket_fits(&dir) {
        return Ok(dir);
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    run_dir.hash(&mut h);
    let short = std::env::temp_dir().join(format!("colocate-mps-{:016x}", h.finish()));
    if !gpu::mps::socket_fits(&short) {
        bail!(
            "the MPS folder {} is too deep for the daemon's socket, and so is {}",
            dir.display(),
            short.display()
        );
    }
    std::fs::create_dir_all(&short)
        .with_context(|| format!("creating the MPS folder {}", short.display()))?;
    if std::fs::symlink_metadata(&dir).is_err() {
        std::os::unix::fs::symlink(&short, &dir)
            .with_context(|| format!("linking {} to {}", dir.display(), short.display()))?;
    }
    tracing::info!(
        "MPS folder {} (linked from {}: the run folder is too deep for a Unix socket)",
        short.display(),
        dir.display()
    );
    Ok(short)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

impl Deployment {
    /// Brings a deployment up (see the module doc for the order). On failure everything
    /// started so far is stopped again and the error says what failed and why.
    pub async fn up(deployment: &ValidDeployment, opts: UpOptions) -> anyhow::Result<Deployment> {
        Self::start(deployment, opts, None).await
    }

    /// [`Deployment::up`], following the MPS logs in `log_dir` (`control.log`,
    /// `server.log`) instead of those of the daemon `up` starts, and supervising the
    /// engines as clients of one MPS server (a fault restarts them all) whatever the
    /// spec's `sharing`. For a daemon someone else runs (the engines' `env` names its
    /// pipe) and for tests, which write captured log text there; a daemon is still
    /// started only for `sharing = "mps"`.
    pub async fn up_with_mps_logs(
        deployment: &ValidDeployment,
        opts: UpOptions,
        log_dir: &Path,
    ) -> anyhow::Result<Deployment> {
        Self::start(deployment, opts, Some(absolute(log_dir)?)).await
    }

    async fn start(
        deployment: &ValidDeployment,
        opts: UpOptions,
        mps_log_dir: Option<PathBuf>,
    ) -> anyhow::Result<Deployment> {
        let spec = deployment.spec();
        let run_dir = absolute(&opts.run_dir)?;
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating the run folder {}", run_dir.display()))?;
        let facts = if spec.gpu.is_cpu() {
            None
        } else {
            Some(
                gpu_glue::detect(&spec.gpu)
                    .with_context(|| format!("gpu = {}: cannot run here", spec.gpu))?,
            )
        };
        // vLLM engines: the installed version's command lines, every flag checked against it.
        let plan = crate::vllm::plan_checked(deployment, facts.as_ref()).await?;
        if !plan.fits {
            bail!(
                "the deployment does not fit:\n  {}",
                plan.problems.join("\n  ")
            );
        }
        std::fs::write(run_dir.join("plan.txt"), plan.to_string()).ok();
        if let Ok(text) = toml::to_string_pretty(spec) {
            std::fs::write(run_dir.join("deployment.toml"), text).ok();
        }
        let bin = engine_bin(&opts)?;

        let state = Arc::new(Mutex::new(StateFile {
            schema: state::SCHEMA,
            name: spec.name.clone(),
            phase: "starting".into(),
            up_pid: std::process::id(),
            run_dir: run_dir.clone(),
            started_at: chrono::Utc::now().to_rfc3339(),
            updated_at: chrono::Utc::now().to_rfc3339(),
            gpu: spec.gpu.to_string(),
            sharing: spec.sharing.to_string(),
            gateway_url: None,
            instances: Vec::new(),
            events: Vec::new(),
            mps_faults: Vec::new(),
            mps_faults_total: 0,
            gateway_control: None,
        }));

        // The gateway first: a port in use fails now.
        let gateway = match &spec.gateway {
            Some(g) => {
                let workers = plan
                    .engines
                    .iter()
                    .map(|e| WorkerSpec {
                        name: e.name.clone(),
                        model: e.served_model_name.clone(),
                        url: e.url(),
                    })
                    .collect();
                Some(
                    Gateway::start(
                        &g.address,
                        workers,
                        &g.models,
                        Arc::new(LeastOutstanding),
                        g.drain_timeout,
                        tenants(spec),
                        g.control.clone(),
                    )
                    .await?,
                )
            }
            None => None,
        };
        let gateway_url = gateway.as_ref().map(|g| g.url());
        state.lock().gateway_url = gateway_url.clone();
        let control_writer = gateway.as_ref().filter(|g| g.control().is_some()).map(|g| {
            tokio::spawn(write_control(
                g.control_source(),
                state.clone(),
                run_dir.clone(),
            ))
        });

        let mps = if spec.sharing == Sharing::Mps {
            let dir = mps_dir(&run_dir)?;
            // The daemon must see every GPU of the deployment under its own number.
            let gpus = plan.gpu_indices();
            match tokio::task::spawn_blocking(move || Mps::start_seeing(&dir, &gpus)).await? {
                Ok(m) => Some(m),
                Err(e) => {
                    if let Some(w) = &control_writer {
                        w.abort();
                    }
                    if let Some(g) = gateway {
                        g.shutdown().await;
                    }
                    return Err(e.context("starting the MPS daemon"));
                }
            }
        } else {
            None
        };

        let instances: Vec<InstanceSpec> = plan
            .engines
            .iter()
            .zip(
                spec.engines
                    .iter()
                    .flat_map(|e| std::iter::repeat_n(e, e.replicas.max(1) as usize)),
            )
            .map(|(p, e)| {
                let mut argv = p.command.clone();
                if p.kind == EngineKind::Builtin {
                    argv[0] = bin.display().to_string();
                }
                let mut env = p.env.clone();
                if let Some(m) = &mps {
                    // The daemon's folders; the limits are already in the plan's env.
                    env.extend(m.client_env(None, None));
                }
                InstanceSpec {
                    name: p.name.clone(),
                    engine: p.engine.clone(),
                    model: p.served_model_name.clone(),
                    url: p.url(),
                    proc: ProcSpec {
                        name: p.name.clone(),
                        argv,
                        env,
                        log_path: log_path(&run_dir, &p.name),
                        console: !opts.quiet,
                    },
                    start_timeout: e.start_timeout,
                    ready_model: crate::adapters::ready_needs_model_listing(e.kind)
                        .then(|| p.served_model_name.clone()),
                }
            })
            .collect();

        let writer_state = state.clone();
        let writer_dir = run_dir.clone();
        let on_change = Arc::new(move |snap: &crate::supervisor::Snapshot| {
            let mut s = writer_state.lock();
            s.instances = snap.instances.clone();
            s.events = snap.events.clone();
            s.mps_faults = snap.mps_faults.clone();
            s.mps_faults_total = snap.mps_faults_total;
            s.trim_events();
            s.updated_at = chrono::Utc::now().to_rfc3339();
            if let Err(e) = state::write(&writer_dir, &s) {
                tracing::warn!("state file: {e:#}");
            }
        });
        let availability: crate::supervisor::AvailabilitySink = match &gateway {
            Some(g) => Arc::new(g.availability_sink()),
            None => Arc::new(|_: &str, _: bool| {}),
        };
        let opts_sup = SuperviseOptions {
            max_failures: spec.supervise.max_failures,
            backoff_initial: spec.supervise.backoff_initial,
            backoff_max: spec.supervise.backoff_max,
            stop_timeout: spec.supervise.stop_timeout,
            shared_fault: spec.sharing == Sharing::Mps || mps_log_dir.is_some(),
        };
        let fault_log = match (&mps_log_dir, &mps) {
            (Some(dir), _) => Some(MpsFaultLog::for_log_dir(dir)),
            (None, Some(m)) => Some(m.fault_log()),
            (None, None) => None,
        };
        // The supervisor's own token lives as long as the deployment; the caller's
        // `start_cancel` reaches it only while the engines start.
        let sup_cancel = CancellationToken::new();
        let start_guard = tokio::spawn({
            let (user, sup) = (opts.start_cancel.clone(), sup_cancel.clone());
            async move {
                user.cancelled().await;
                sup.cancel();
            }
        });
        let started = Supervisor::start(
            instances,
            opts_sup,
            on_change,
            availability,
            sup_cancel,
            fault_log,
        )
        .await;
        start_guard.abort();
        let supervisor = match started {
            Ok(s) => s,
            Err(e) => {
                if let Some(w) = &control_writer {
                    w.abort();
                }
                if let Some(g) = gateway {
                    g.shutdown().await;
                }
                if let Some(m) = mps {
                    let _ =
                        tokio::task::spawn_blocking(move || m.quit(Duration::from_secs(5))).await;
                }
                let mut s = state.lock();
                s.phase = "failed".into();
                let _ = state::write(&run_dir, &s);
                return Err(e);
            }
        };
        {
            let mut s = state.lock();
            s.phase = "running".into();
            s.instances = supervisor.instances();
            let _ = state::write(&run_dir, &s);
        }
        Ok(Deployment {
            plan,
            run_dir,
            supervisor,
            gateway,
            gateway_url,
            mps,
            state,
            stop_timeout: spec.supervise.stop_timeout,
            control_writer,
        })
    }

    /// Every replica's endpoint, in start order.
    pub fn endpoints(&self) -> Vec<ReplicaEndpoint> {
        self.plan
            .engines
            .iter()
            .map(|e| ReplicaEndpoint {
                engine: e.name.clone(),
                model: e.served_model_name.clone(),
                url: e.url(),
            })
            .collect()
    }

    /// The gateway's `http://HOST:PORT`, when the deployment has one.
    pub fn gateway_url(&self) -> Option<String> {
        self.gateway_url.clone()
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The run folder (logs, `state.json`, `plan.txt`).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Everything that happened so far: starts, crashes, restarts, give-ups.
    pub fn events(&self) -> Vec<Event> {
        self.supervisor.events()
    }

    /// Each replica's current status (pid, state, restarts).
    pub fn status(&self) -> Vec<InstanceStatus> {
        self.supervisor.instances()
    }

    /// The MPS faults seen so far (the most recent ones), including any the daemon logged
    /// just now: empty without MPS.
    pub fn mps_faults(&self) -> Vec<MpsFault> {
        self.supervisor.mps_faults()
    }

    /// Resolves with a reason when the supervisor gave up on every engine.
    pub async fn failed(&self) -> String {
        let mut rx = self.supervisor.fatal();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Gateway drains, engines stop in reverse order, MPS quits.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(w) = &self.control_writer {
            w.abort();
        }
        {
            let mut s = self.state.lock();
            s.phase = "stopping".into();
            let _ = state::write(&self.run_dir, &s);
        }
        if let Some(g) = self.gateway {
            g.shutdown().await;
        }
        self.supervisor.shutdown().await;
        let mut result = Ok(());
        if let Some(m) = self.mps {
            let drain = self.stop_timeout;
            result = tokio::task::spawn_blocking(move || m.quit(drain))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r.context("quitting the MPS daemon"));
        }
        let mut s = self.state.lock();
        s.phase = "stopped".into();
        s.updated_at = chrono::Utc::now().to_rfc3339();
        let _ = state::write(&self.run_dir, &s);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder too deep for the daemon's socket gets a short MPS folder that its
    /// `mps` links to; a shallow one keeps `<run>/mps`.
    #[test]
    fn a_deep_run_folder_gets_a_short_linked_mps_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let shallow = tmp.path().join("run");
        assert_eq!(mps_dir(&shallow).unwrap(), shallow.join("mps"));
        let deep = tmp
            .path()
            .join("deployments")
            .join("mps_default_1_gpt2_1_dbert_1_roberta_1_llama_1_mistral_and_more");
        std::fs::create_dir_all(&deep).unwrap();
        assert!(!gpu::mps::socket_fits(&deep.join("mps")));
        let dir = mps_dir(&deep).unwrap();
        assert!(gpu::mps::socket_fits(&dir), "{}", dir.display());
        assert_eq!(std::fs::read_link(deep.join("mps")).unwrap(), dir);
        // the same run folder finds the same folder again
        assert_eq!(mps_dir(&deep).unwrap(), dir);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
