//! A real `colocate up` process for end-to-end tests of the supervisor and the gateway:
//! started on a deployment file, waited for until its state file says `running`, killed on
//! drop (its engines die with it), and an HTTP client that ignores proxies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BIN;

/// A running `colocate up`, killed on drop so a failed assertion leaves no engine behind.
pub struct Up {
    pub child: Child,
    pub run_dir: PathBuf,
}

impl Up {
    /// Runs `colocate up FILE --run-dir RUN_DIR --quiet` and waits up to `timeout` for the
    /// `running` phase; panics (naming the logs) if `up` exits first or never gets there.
    pub fn start(file: &Path, run_dir: PathBuf, timeout: Duration) -> Up {
        let child = Command::new(BIN)
            .args(["up", file.to_str().unwrap(), "--run-dir"])
            .arg(&run_dir)
            .arg("--quiet")
            .env("COLOCATE_BIN", BIN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start colocate up");
        let mut up = Up { child, run_dir };
        let t0 = Instant::now();
        while !up.state().is_some_and(|s| s["phase"] == "running") {
            if let Ok(Some(st)) = up.child.try_wait() {
                panic!(
                    "`colocate up` exited early: {st}; logs in {}",
                    up.run_dir.display()
                );
            }
            assert!(
                t0.elapsed() < timeout,
                "`up` not running after {timeout:?}; logs in {}",
                up.run_dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        up
    }

    /// The deployment's state file, if it is there and whole.
    pub fn state(&self) -> Option<serde_json::Value> {
        state(&self.run_dir)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `RUN_DIR/state.json`, if it is there and whole.
pub fn state(run_dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// An HTTP client that ignores proxy settings, with a whole-request time-out.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}
