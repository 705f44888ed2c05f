//! The MPS control daemon with private folders, driven through its control pipe.
//!
//! Why private folders: a daemon on the default `/tmp/nvidia-mps` would capture every
//! CUDA program on the machine; with `CUDA_MPS_PIPE_DIRECTORY` under the run's folder only
//! the engines we give [`MpsDaemon::client_env`] become clients, and the run's logs stay
//! with the run.
//!
//! Lifecycle: [`MpsDaemon::start`] owns the daemon and quits it in [`MpsDaemon::stop`] or,
//! failing that, in `Drop` (best effort, never panics). [`MpsDaemon::attach`] finds a
//! daemon another process started (for `colocate gpu mps status/stop`) and never quits it
//! on drop. [`MpsDaemon::detach`] hands an owned daemon over to a later `mps stop`.
mod control;
mod env;
mod log_watch;
mod parse;
pub mod procs;

pub use env::{as_shell_exports, ClientLimits};
pub use log_watch::MpsLogWatch;
pub use parse::{
    cuda_mps_error_name, parse_log_line, parse_percentage, parse_pid_list, LogLine, LogParser,
    LoggedEvent, MpsEvent,
};
pub use procs::daemon_processes;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use control::Control;

/// The pid file the control daemon writes into its pipe folder.
const PID_FILE: &str = "nvidia-cuda-mps-control.pid";
/// Longest path a Unix socket may have (sun_path, including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// What the daemon reports through its control pipe.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MpsStatus {
    pub pipe_dir: PathBuf,
    pub control_pid: Option<u32>,
    pub servers: Vec<MpsServer>,
    pub default_active_thread_percentage: f64,
}

/// One MPS server (one per user) and its client processes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MpsServer {
    pub pid: u32,
    pub clients: Vec<u32>,
}

/// A handle on one MPS control daemon serving `<dir>/pipe` and logging to `<dir>/log`.
#[derive(Debug)]
pub struct MpsDaemon {
    pipe: PathBuf,
    log: PathBuf,
    control: Control,
    /// Quit the daemon on drop (true for `start`, false for `attach` and after `detach`).
    owned: bool,
    stopped: bool,
    logs: MpsLogWatch,
}

impl MpsDaemon {
    /// Starts a control daemon with private `pipe/` and `log/` under `dir`. Refuses when a
    /// daemon already serves those folders, when no GPU is visible, or when a GPU's
    /// compute mode forbids contexts.
    pub fn start(dir: &Path) -> Result<Self> {
        let (pipe, log) = prepare_dirs(dir)?;
        if let Some(pid) = live_daemon_pid(&pipe) {
            bail!(
                "an MPS control daemon (pid {pid}) already serves {}; stop it first with `colocate gpu mps stop --dir {}`",
                pipe.display(),
                dir.display()
            );
        }
        check_compute_modes()?;
        let control = Control::new(&pipe, &log)?;
        control.start_daemon()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while live_daemon_pid(&pipe).is_none() {
            if Instant::now() > deadline {
                bail!(
                    "nvidia-cuda-mps-control -d returned but no daemon came up within 10 s; see {}",
                    log.join("control.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(pipe = %pipe.display(), pid = ?live_daemon_pid(&pipe), "MPS control daemon started");
        Ok(Self::handle(pipe, log, control, true))
    }

    /// Finds the daemon serving `<dir>/pipe` (started by another process).
    pub fn attach(dir: &Path) -> Result<Self> {
        let pipe = absolute(dir)?.join("pipe");
        let log = absolute(dir)?.join("log");
        if live_daemon_pid(&pipe).is_none() {
            bail!(
                "no MPS control daemon serves {} (start one with `colocate gpu mps start --dir {}`)",
                pipe.display(),
                dir.display()
            );
        }
        let control = Control::new(&pipe, &log)?;
        Ok(Self::handle(pipe, log, control, false))
    }

    fn handle(pipe: PathBuf, log: PathBuf, control: Control, owned: bool) -> Self {
        let logs = MpsLogWatch::new(&log);
        Self {
            pipe,
            log,
            control,
            owned,
            stopped: false,
            logs,
        }
    }

    /// The folder clients find the daemon by (`CUDA_MPS_PIPE_DIRECTORY`).
    pub fn pipe_dir(&self) -> &Path {
        &self.pipe
    }

    /// The folder of `control.log` and `server.log` (`CUDA_MPS_LOG_DIRECTORY`).
    pub fn log_dir(&self) -> &Path {
        &self.log
    }

    /// The control daemon's pid, from the pid file it writes, while it is alive.
    pub fn control_pid(&self) -> Option<u32> {
        live_daemon_pid(&self.pipe)
    }

    /// The environment a client (an engine) needs to use this daemon with these limits.
    /// Limits are not validated here; call [`ClientLimits::validate`] where they are read.
    pub fn client_env(&self, limits: &ClientLimits) -> Vec<(String, String)> {
        env::client_env(&self.pipe, &self.log, limits)
    }

    /// Servers, their clients and the default thread percentage, read through the pipe.
    pub fn status(&self) -> Result<MpsStatus> {
        let servers = parse_pid_list(&self.control.send("get_server_list")?)?;
        let mut out = Vec::with_capacity(servers.len());
        for pid in servers {
            let clients = parse_pid_list(&self.control.send(&format!("get_client_list {pid}"))?)?;
            out.push(MpsServer { pid, clients });
        }
        let pct = parse_percentage(&self.control.send("get_default_active_thread_percentage")?)?;
        Ok(MpsStatus {
            pipe_dir: self.pipe.clone(),
            control_pid: self.control_pid(),
            servers: out,
            default_active_thread_percentage: pct,
        })
    }

    /// Sets the thread percentage new servers (and so their clients) get by default.
    pub fn set_default_active_thread_percentage(&self, pct: u32) -> Result<()> {
        if !(1..=100).contains(&pct) {
            bail!("active thread percentage must be between 1 and 100, got {pct}");
        }
        let reply = self
            .control
            .send(&format!("set_default_active_thread_percentage {pct}"))?;
        let now = parse_percentage(&self.control.send("get_default_active_thread_percentage")?)
            .with_context(|| {
                format!(
                    "after set_default_active_thread_percentage (reply '{}')",
                    reply.trim()
                )
            })?;
        if (now - pct as f64).abs() > 0.5 {
            bail!("the daemon kept {now}% after set_default_active_thread_percentage {pct} (reply '{}')", reply.trim());
        }
        Ok(())
    }

    /// Events (faults, failed servers, clients coming and going) logged since the last poll.
    pub fn poll_events(&mut self) -> Result<Vec<MpsEvent>> {
        Ok(self.logs.poll()?.into_iter().map(|e| e.event).collect())
    }

    /// A watcher of this daemon's logs, from their start, independent of this handle's own
    /// polls (a supervisor's task follows faults while this handle stays with its owner).
    pub fn log_watch(&self) -> MpsLogWatch {
        MpsLogWatch::new(&self.log)
    }

    /// Lets the daemon outlive this handle (the CLI's `mps start`; `mps stop` ends it).
    pub fn detach(mut self) {
        self.owned = false;
    }

    /// Waits up to `drain` for clients to exit, then quits the daemon and makes sure no
    /// control or server process is left (terminating them if `quit` does not).
    pub fn stop(mut self, drain: Duration) -> Result<()> {
        self.stopped = true;
        self.stop_inner(drain)
    }

    fn stop_inner(&mut self, drain: Duration) -> Result<()> {
        let Some(control_pid) = self.control_pid() else {
            return Ok(()); // already gone
        };
        let deadline = Instant::now() + drain;
        let mut servers: Vec<u32> = Vec::new();
        loop {
            match self.status() {
                Ok(s) => {
                    servers = s.servers.iter().map(|s| s.pid).collect();
                    let clients: usize = s.servers.iter().map(|s| s.clients.len()).sum();
                    if clients == 0 {
                        break;
                    }
                    if Instant::now() >= deadline {
                        tracing::warn!(
                            clients,
                            "MPS clients still running after the drain timeout; quitting anyway"
                        );
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("MPS status during stop failed: {e:#}");
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Err(e) = self.control.send("quit") {
            tracing::warn!("MPS quit command failed: {e:#}");
        }
        let mut pids = servers;
        pids.push(control_pid);
        procs::wait_gone_or_kill(&pids, Duration::from_secs(10))?;
        let _ = fs::remove_file(self.pipe.join(PID_FILE));
        tracing::info!(pipe = %self.pipe.display(), "MPS control daemon stopped");
        Ok(())
    }
}

impl Drop for MpsDaemon {
    fn drop(&mut self) {
        if self.owned && !self.stopped {
            self.stopped = true;
            if let Err(e) = self.stop_inner(Duration::ZERO) {
                tracing::error!(
                    "could not quit the MPS daemon of {}: {e:#}",
                    self.pipe.display()
                );
            }
        }
    }
}

fn absolute(dir: &Path) -> Result<PathBuf> {
    if dir.is_absolute() {
        Ok(dir.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("reading the current directory")?
            .join(dir))
    }
}

/// The longest socket the control daemon makes in its pipe folder. Seen on the H200
/// (driver 580): a daemon whose `pipe/control` path was 98 bytes logged that socket and
/// exited 1, while 91-byte ones ran; the daemon's privileged control socket beside it,
/// 11 bytes longer, is what passes 107 there.
const LONGEST_SOCKET: &str = "control_privileged";

/// The longest socket path the daemon makes under `dir`.
fn socket_len(dir: &Path) -> usize {
    dir.join("pipe").join(LONGEST_SOCKET).as_os_str().len()
}

/// Whether the daemon's sockets under `dir` (`<dir>/pipe/...`) fit a Unix socket address.
pub fn socket_fits(dir: &Path) -> bool {
    socket_len(dir) <= MAX_SOCKET_PATH
}

/// Creates `<dir>/pipe` (mode 0700: the pipe is a door into every client's GPU work) and
/// `<dir>/log`, and checks the socket path fits a Unix socket address.
fn prepare_dirs(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let root = absolute(dir)?;
    let pipe = root.join("pipe");
    let log = root.join("log");
    let sock_len = socket_len(&root);
    if sock_len > MAX_SOCKET_PATH {
        bail!(
            "MPS folder {} is too deep: its sockets' paths would be up to {sock_len} bytes ({}), over the {MAX_SOCKET_PATH} a Unix socket allows; use a shorter --dir",
            root.display(),
            pipe.join(LONGEST_SOCKET).display()
        );
    }
    for d in [&pipe, &log] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    fs::set_permissions(&pipe, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", pipe.display()))?;
    Ok((pipe, log))
}

/// The daemon's pid from its pid file, if that process is alive.
fn live_daemon_pid(pipe: &Path) -> Option<u32> {
    let text = fs::read_to_string(pipe.join(PID_FILE)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    procs::alive(pid).then_some(pid)
}

/// MPS needs compute mode default or exclusive-process on every GPU it may serve.
fn check_compute_modes() -> Result<()> {
    let gpus = crate::info()?;
    for g in gpus {
        if g.compute_mode == "prohibited" || g.compute_mode == "exclusive_thread" {
            bail!(
                "GPU {} ({}) is in compute mode '{}', which forbids MPS; colocate never changes compute modes (an admin can with `nvidia-smi -i {} -c DEFAULT`)",
                g.index, g.name, g.compute_mode, g.index
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_made_private_and_socket_length_is_checked() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let (pipe, log) = prepare_dirs(tmp.path()).unwrap();
        assert!(log.is_dir());
        assert_eq!(
            fs::metadata(&pipe).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let deep = tmp.path().join("x".repeat(120));
        let err = prepare_dirs(&deep).unwrap_err().to_string();
        assert!(err.contains("too deep"), "{err}");
    }

    /// The H200's daemons: with `pipe/control` at 91 bytes they ran, at 98 one exited.
    #[test]
    fn sockets_fit_as_the_daemon_found() {
        let root = |control_len: usize| PathBuf::from(format!("/{}", "a".repeat(control_len - 14)));
        assert_eq!(root(91).join("pipe/control").as_os_str().len(), 91);
        assert!(socket_fits(&root(91)));
        assert!(!socket_fits(&root(98)));
    }

    #[test]
    fn attach_without_a_daemon_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let err = MpsDaemon::attach(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("no MPS control daemon serves"), "{err}");
    }

    #[test]
    fn a_stale_pid_file_is_no_daemon() {
        let tmp = tempfile::tempdir().unwrap();
        let (pipe, _) = prepare_dirs(tmp.path()).unwrap();
        // pid_max is at most 2^22 on Linux, so this pid cannot exist.
        fs::write(pipe.join(PID_FILE), "4194305\n").unwrap();
        assert_eq!(live_daemon_pid(&pipe), None);
        fs::write(pipe.join(PID_FILE), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(live_daemon_pid(&pipe), Some(std::process::id()));
    }
}
