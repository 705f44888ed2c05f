//! Process checks for the MPS daemon: is a pid alive, which MPS processes run, and the
//! last resort of `stop` (terminate what `quit` left behind).
use anyhow::{bail, Result};
use std::fs;
use std::time::{Duration, Instant};

/// Whether `pid` is a live (non-zombie) process.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name: "123 (name) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// Every running `nvidia-cuda-mps-control` / `nvidia-cuda-mps-server` as (pid, name).
pub fn daemon_processes() -> Vec<(u32, String)> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<(u32, String)> = dir
        .filter_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv0 = cmdline.split(|&b| b == 0).next()?;
            let name = String::from_utf8_lossy(argv0)
                .rsplit('/')
                .next()?
                .to_string();
            (name.starts_with("nvidia-cuda-mps-") && alive(pid)).then_some((pid, name))
        })
        .collect();
    out.sort();
    out
}

/// Waits up to `grace` for every pid to exit; then SIGTERM, and SIGKILL a second later.
/// Fails only if a process survives SIGKILL.
pub fn wait_gone_or_kill(pids: &[u32], grace: Duration) -> Result<()> {
    if wait_gone(pids, grace) {
        return Ok(());
    }
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        for &pid in pids.iter().filter(|&&p| alive(p)) {
            tracing::warn!(pid, "MPS process still running after quit; sending {name}");
            // SAFETY: plain kill(2); the pids are the daemon and servers this handle serves.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
        if wait_gone(pids, Duration::from_secs(2)) {
            return Ok(());
        }
    }
    let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
    bail!("MPS processes {left:?} survived SIGKILL")
}

fn wait_gone(pids: &[u32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_child_is_waited_for_then_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(alive(pid));
        // Reap in the background so the killed child does not linger as a zombie.
        let reaper = std::thread::spawn(move || child.wait());
        wait_gone_or_kill(&[pid], Duration::from_millis(100)).unwrap();
        reaper.join().unwrap().unwrap();
        assert!(!alive(pid));
    }
}
