//! The state file of a running deployment (`<run>/state.json`), written by `up` after every
//! change and read by `colocate status`. Written to a temporary file and renamed, so a
//! reader never sees half of it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::supervisor::{Event, InstanceStatus, MpsFault};

/// Version of the state file's layout. 2: `mps_faults`, `mps_faults_total`, the
/// `faulted` instance state and the `mps_fault` event kind.
pub const SCHEMA: u32 = 2;
/// How many recent events the file keeps.
const EVENTS_KEPT: usize = 100;

/// What `up` is running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub schema: u32,
    pub name: String,
    /// `starting`, `running`, `stopping`, `stopped`, `failed`.
    pub phase: String,
    /// The `colocate up` process.
    pub up_pid: u32,
    pub run_dir: PathBuf,
    pub started_at: String,
    pub updated_at: String,
    pub gpu: String,
    pub sharing: String,
    pub gateway_url: Option<String>,
    pub instances: Vec<InstanceStatus>,
    /// The most recent events, oldest first.
    pub events: Vec<Event>,
    /// The most recent MPS faults, oldest first (empty without MPS).
    #[serde(default)]
    pub mps_faults: Vec<MpsFault>,
    /// MPS faults seen in all.
    #[serde(default)]
    pub mps_faults_total: u64,
    /// The gateway's SLO controller and tenants, refreshed every second while it runs
    /// (absent without priorities; older readers ignore it, so the schema stays 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_control: Option<crate::gateway::ControlSnapshot>,
}

impl StateFile {
    /// Keeps only the last events.
    pub fn trim_events(&mut self) {
        let n = self.events.len();
        if n > EVENTS_KEPT {
            self.events.drain(..n - EVENTS_KEPT);
        }
    }
}

/// The state file's path in a run folder.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("state.json")
}

/// Writes atomically.
pub fn write(run_dir: &Path, state: &StateFile) -> anyhow::Result<()> {
    let p = path(run_dir);
    let tmp = run_dir.join(".state.json.tmp");
    let text = serde_json::to_string_pretty(state)?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
    Ok(())
}

/// Reads a run folder's state file.
pub fn read(run_dir: &Path) -> anyhow::Result<StateFile> {
    let p = path(run_dir);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "no deployment state at {} (is `colocate up` running there?)",
            p.display()
        )
    })?;
    let state: StateFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a state file", p.display()))?;
    if state.schema > SCHEMA {
        anyhow::bail!(
            "{}: state file schema {} is newer than this colocate reads ({SCHEMA}); use the colocate that runs the deployment",
            p.display(),
            state.schema
        );
    }
    Ok(state)
}

/// A state file of a running MPS deployment with nothing in it, for tests.
#[cfg(test)]
pub(crate) fn sample(schema: u32) -> StateFile {
    StateFile {
        schema,
        name: "t".into(),
        phase: "running".into(),
        up_pid: 1,
        run_dir: PathBuf::from("/tmp/x"),
        started_at: String::new(),
        updated_at: String::new(),
        gpu: "0".into(),
        sharing: "mps".into(),
        gateway_url: None,
        instances: Vec::new(),
        events: Vec::new(),
        mps_faults: Vec::new(),
        mps_faults_total: 0,
        gateway_control: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_1_file_reads_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = serde_json::to_value(sample(1)).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("mps_faults");
        obj.remove("mps_faults_total");
        std::fs::write(path(dir.path()), v.to_string()).unwrap();
        let s = read(dir.path()).unwrap();
        assert!(s.mps_faults.is_empty());

        write(dir.path(), &sample(SCHEMA + 1)).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("newer than this colocate reads"), "{err}");
    }
}
