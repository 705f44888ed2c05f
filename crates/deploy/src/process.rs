//! One engine process: started in its own process group with a parent-death signal, its
//! output copied to a log file (and, prefixed, to the console), stopped with SIGTERM then
//! SIGKILL to the whole group.
//!
//! Why both: the process group lets `stop` reach the engine's own children (vLLM's
//! workers); `PR_SET_PDEATHSIG` makes the kernel kill the engine when `up` dies without a
//! chance to clean up (SIGKILL), so no path leaves an orphan holding GPU memory or a port.
//! The parent-death signal fires when the *thread* that forked exits, so processes are
//! spawned from runtime worker threads, which live as long as the deployment.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// How many of the last output lines are kept for error messages.
const TAIL_LINES: usize = 30;

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    /// Prefix of console lines and name in messages.
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Output is appended here.
    pub log_path: PathBuf,
    /// Copy output lines to stderr, prefixed with `[name]`.
    pub console: bool,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// `exit status: 1`, `signal: 9 (SIGKILL)`, ...
    pub description: String,
    pub success: bool,
}

impl ExitInfo {
    fn from_status(s: ExitStatus) -> ExitInfo {
        use std::os::unix::process::ExitStatusExt;
        let description = match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| "?".into());
                format!("killed by signal {sig} ({name})")
            }
            _ => s.to_string(),
        };
        ExitInfo {
            description,
            success: s.success(),
        }
    }
}

/// A running (or ended) process.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    exited: watch::Receiver<Option<ExitInfo>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Set once `stop` has killed the whole group; until then dropping the handle does.
    group_stopped: std::sync::atomic::AtomicBool,
}

/// Starts a process. Fails with a clear message when the program cannot be run.
pub fn spawn(spec: &ProcSpec) -> anyhow::Result<Proc> {
    let (prog, args) = spec
        .argv
        .split_first()
        .with_context(|| format!("{}: empty command line", spec.name))?;
    if let Some(parent) = spec.log_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_path)
        .with_context(|| format!("opening the log {}", spec.log_path.display()))?;
    let log = Arc::new(Mutex::new(log));
    {
        let mut f = log.lock();
        let _ = writeln!(
            f,
            "=== {} starting: {}",
            chrono::Utc::now().to_rfc3339(),
            crate::adapters::shell_line(&spec.env, &spec.argv)
        );
    }

    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: cannot start `{prog}`: {e}", spec.name))?;
    let pid = child.id().context("the child has no pid")?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(
            out,
            spec.name.clone(),
            log.clone(),
            tail.clone(),
            spec.console,
        )));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(
            err,
            spec.name.clone(),
            log.clone(),
            tail.clone(),
            spec.console,
        )));
    }
    let (tx, rx) = watch::channel(None);
    let log2 = log.clone();
    tokio::spawn(async move {
        let info = match child.wait().await {
            Ok(s) => ExitInfo::from_status(s),
            Err(e) => ExitInfo {
                description: format!("wait failed: {e}"),
                success: false,
            },
        };
        // Let the pumps drain what the process wrote before it went.
        for p in pumps {
            let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
        }
        let _ = writeln!(
            log2.lock(),
            "=== {} exited: {}",
            chrono::Utc::now().to_rfc3339(),
            info.description
        );
        let _ = tx.send(Some(info));
    });
    Ok(Proc {
        name: spec.name.clone(),
        pid,
        exited: rx,
        tail,
        group_stopped: std::sync::atomic::AtomicBool::new(false),
    })
}

async fn pump<R: AsyncRead + Unpin>(
    r: R,
    name: String,
    log: Arc<Mutex<std::fs::File>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    console: bool,
) {
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                let _ = writeln!(log.lock(), "{line}");
                if console {
                    eprintln!("[{name}] {line}");
                }
                let mut t = tail.lock();
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line.to_string());
            }
        }
    }
}

impl Proc {
    /// How it ended, once it has.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.exited.borrow().clone()
    }

    /// A receiver that yields once the process has exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exited.clone()
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exited.clone();
        loop {
            if let Some(i) = rx.borrow_and_update().clone() {
                return i;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone().unwrap_or(ExitInfo {
                    description: "lost".into(),
                    success: false,
                });
            }
        }
    }

    /// The last lines it printed, for error messages.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let t = self.tail.lock();
        t.iter().skip(t.len().saturating_sub(n)).cloned().collect()
    }

    /// SIGTERM to the process group; SIGKILL to the group after `timeout`. Returns how it
    /// ended. Also kills what is left of the group (children that outlived the leader).
    pub async fn stop(&self, timeout: Duration) -> ExitInfo {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let pg = Pid::from_raw(self.pid as i32);
        if self.exit_info().is_none() {
            let _ = killpg(pg, Signal::SIGTERM);
            if let Ok(i) = tokio::time::timeout(timeout, self.wait()).await {
                let _ = killpg(pg, Signal::SIGKILL);
                self.group_stopped
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                return i;
            }
            tracing::warn!(engine = %self.name, "did not stop within {timeout:?} of SIGTERM: SIGKILL");
        }
        let _ = killpg(pg, Signal::SIGKILL);
        self.group_stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wait().await
    }
}

/// A handle dropped without `stop` (the supervisor lets go of an engine that exited on its
/// own) takes what is left of its group with it: a vLLM API server that died can leave its
/// engine core running, holding GPU memory the restarted engine needs. The group id stays
/// reserved while any member lives, so this reaches only the engine's own processes.
impl Drop for Proc {
    fn drop(&mut self) {
        if !self.group_stopped.load(std::sync::atomic::Ordering::SeqCst) {
            use nix::sys::signal::{killpg, Signal};
            let _ = killpg(nix::unistd::Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

/// True while a process with this pid exists (and is not a zombie we could see).
pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
    match stat {
        Ok(s) => !s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Path of a log inside a run folder.
pub fn log_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("logs").join(format!("{name}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, argv: &[&str]) -> ProcSpec {
        ProcSpec {
            name: "t".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("GREETING".into(), "hello".into())],
            log_path: dir.join("t.log"),
            console: false,
        }
    }

    #[tokio::test]
    async fn logs_output_and_exit() {
        let dir = tempfile::tempdir().unwrap();
        let p = spawn(&spec(
            dir.path(),
            &["sh", "-c", "echo $GREETING; echo oops >&2; exit 3"],
        ))
        .unwrap();
        let info = p.wait().await;
        assert_eq!(info.description, "exit status 3");
        assert!(!info.success);
        let log = std::fs::read_to_string(dir.path().join("t.log")).unwrap();
        assert!(
            log.contains("hello") && log.contains("oops") && log.contains("exited: exit status 3"),
            "{log}"
        );
        let tail = p.tail(5);
        assert!(tail.contains(&"hello".to_string()), "{tail:?}");
    }

    #[tokio::test]
    async fn stop_reaches_the_whole_group_and_escalates() {
        let dir = tempfile::tempdir().unwrap();
        // The shell ignores SIGTERM and has a child: stop must SIGKILL both.
        let pidfile = dir.path().join("child.pid");
        let script = format!(
            "trap '' TERM; sleep 600 & echo $! > {}; wait",
            pidfile.display()
        );
        let p = spawn(&spec(dir.path(), &["sh", "-c", &script])).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            assert!(std::time::Instant::now() < deadline, "child never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let child: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(child));
        let info = p.stop(Duration::from_millis(300)).await;
        assert!(info.description.contains("SIGKILL"), "{}", info.description);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(child) {
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {child} survived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `path` holds a pid and returns it.
    async fn read_pid(path: &Path) -> u32 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(t) = std::fs::read_to_string(path) {
                if let Ok(pid) = t.trim().parse() {
                    return pid;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never written",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// vLLM's shape: the API server (the leader) exits at SIGTERM while its engine core
    /// ignores it, and a worker has a child of its own. `stop` returns when the leader is
    /// gone, and nothing of the group may be left: the stuck child and the grandchild too.
    #[tokio::test]
    async fn stop_leaves_nothing_of_a_vllm_like_group() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let script = format!(
            "(trap '' TERM; exec sleep 600) & echo $! > {d}/core.pid
             sh -c 'sleep 600 & echo $! > {d}/grandchild.pid; wait' & echo $! > {d}/worker.pid
             trap 'exit 0' TERM
             wait"
        );
        let p = spawn(&spec(dir.path(), &["sh", "-c", &script])).unwrap();
        let mut pids = vec![p.pid];
        for f in ["core.pid", "worker.pid", "grandchild.pid"] {
            pids.push(read_pid(&dir.path().join(f)).await);
        }
        for pid in &pids {
            assert!(alive(*pid), "{pid} not running before stop");
        }
        let info = p.stop(Duration::from_secs(5)).await;
        assert_eq!(
            info.description, "exit status 0",
            "the leader exits on SIGTERM"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        for pid in &pids[1..] {
            while alive(*pid) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{pid} of the group survived stop"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// The leader exits on its own (a crashed API server) and leaves a child that ignores
    /// SIGTERM (an engine core): letting go of the handle kills the child.
    #[tokio::test]
    async fn dropping_a_crashed_engine_kills_what_it_left() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let script = format!(
            "(trap '' TERM; exec sleep 600) & echo $! > {d}/core.pid
             exit 3"
        );
        let p = spawn(&spec(dir.path(), &["sh", "-c", &script])).unwrap();
        let core = read_pid(&dir.path().join("core.pid")).await;
        assert_eq!(p.wait().await.description, "exit status 3");
        assert!(
            alive(core),
            "the child outlives its leader until the handle goes"
        );
        drop(p);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(core) {
            assert!(
                std::time::Instant::now() < deadline,
                "{core} survived the handle"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn missing_program_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = spawn(&spec(dir.path(), &["/no/such/engine"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot start `/no/such/engine`"), "{e}");
    }
}
