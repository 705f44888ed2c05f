//! Talking to `nvidia-cuda-mps-control`: starting the daemon (`-d`) and sending one UI
//! command on stdin per invocation, the way NVIDIA documents it (`echo quit | ...`).
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = "nvidia-cuda-mps-control";
/// A UI command answers in milliseconds; a daemon that does not answer in this long is
/// wedged, and waiting longer would hang `status` and `stop`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub(super) struct Control {
    bin: PathBuf,
    pipe: PathBuf,
    log: PathBuf,
}

impl Control {
    pub(super) fn new(pipe: &Path, log: &Path) -> Result<Self> {
        Ok(Self {
            bin: find_on_path(BIN)?,
            pipe: pipe.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe)
            .env("CUDA_MPS_LOG_DIRECTORY", &self.log);
        c
    }

    /// `nvidia-cuda-mps-control -d`: forks the daemon and returns.
    pub(super) fn start_daemon(&self) -> Result<()> {
        let out = self
            .command()
            .arg("-d")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} -d", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} -d failed ({}): {}{}",
                self.bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Sends one command and returns the reply (stdout).
    pub(super) fn send(&self, cmd: &str) -> Result<String> {
        let mut child = self
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A daemon that already exited closes the pipe early: the reply says why.
            let _ = writeln!(stdin, "{cmd}");
        }
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(r) => r.with_context(|| format!("waiting for the reply to '{cmd}'"))?,
            Err(_) => {
                // SAFETY: kill(2) on the pid of our own child, which the thread still waits for.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                bail!("the MPS control daemon did not answer '{cmd}' within {REPLY_TIMEOUT:?}");
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "'{cmd}' to the MPS control daemon failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

/// The first executable `name` on PATH.
fn find_on_path(name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if let Ok(m) = p.metadata() {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    bail!("{name} not found on PATH: it ships with the NVIDIA driver (is the driver installed?)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_and_names_missing_ones() {
        assert!(find_on_path("sh").is_ok());
        let err = find_on_path("no-such-program-colocate")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-program-colocate not found on PATH"),
            "{err}"
        );
    }
}
