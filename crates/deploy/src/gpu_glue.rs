//! The one place deploy touches the GPU: facts for the plan, the MPS daemon, client env.
//!
//! Everything goes through the `gpu` crate (NVML, MPS control, catalogue); this module only
//! adapts its answers to what the plan and the supervisor need, so the rest of deploy
//! never names a `gpu` type.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::spec::GpuSelector;

/// What the plan needs to know about the GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuFacts {
    /// Marketing name (`NVIDIA H100 80GB HBM3`) or the catalogue key.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Every GPU of this machine as NVML lists it (index, name, total memory), so that an
    /// engine's `gpus` can be checked and planned against each GPU's own memory; empty when
    /// the facts come from the catalogue (the machine is not this one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machine: Vec<MachineGpu>,
}

/// One GPU of the machine, as NVML numbers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineGpu {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
}

impl GpuFacts {
    /// Facts of a GPU model from the catalogue: no machine behind them.
    pub fn of_model(name: &str, memory_total_bytes: u64) -> GpuFacts {
        GpuFacts {
            name: name.to_string(),
            memory_total_bytes,
            machine: Vec::new(),
        }
    }

    /// Total memory of GPU `index` of the machine; the selected GPU's when the machine is
    /// not known (the catalogue: every GPU taken to be that model).
    pub fn memory_of(&self, index: Option<u32>) -> u64 {
        index
            .and_then(|i| self.machine.iter().find(|g| g.index == i))
            .map(|g| g.memory_total_bytes)
            .unwrap_or(self.memory_total_bytes)
    }
}

/// Total memory of a GPU model by name (the `gpu` crate's catalogue), for planning on a
/// machine without it.
pub fn catalogue_memory(name: &str) -> Option<u64> {
    gpu::catalogue::lookup(name).map(|s| s.memory_bytes)
}

/// Looks up the selected GPU on this machine (NVML through the `gpu` crate).
pub fn detect(sel: &GpuSelector) -> anyhow::Result<GpuFacts> {
    let gpus = match sel {
        GpuSelector::Cpu => bail!("gpu = \"cpu\": no GPU to look up"),
        _ => gpu::info()?,
    };
    let found = gpus.iter().find(|g| match sel {
        GpuSelector::Index(i) => g.index == *i,
        GpuSelector::Uuid(u) => &g.uuid == u,
        GpuSelector::Cpu => false,
    });
    match found {
        Some(g) => Ok(GpuFacts {
            name: g.name.clone(),
            memory_total_bytes: g.memory_total_bytes,
            machine: gpus
                .iter()
                .map(|g| MachineGpu {
                    index: g.index,
                    name: g.name.clone(),
                    memory_total_bytes: g.memory_total_bytes,
                })
                .collect(),
        }),
        None => bail!(
            "GPU {sel} not found on this machine (it has: {})",
            gpus.iter()
                .map(|g| format!("{} {} {}", g.index, g.uuid, g.name))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// An MPS control daemon with private pipe and log folders under the run folder.
#[derive(Debug)]
pub struct Mps {
    daemon: gpu::mps::MpsDaemon,
}

impl Mps {
    /// Starts the daemon with its folders under `dir`. The daemon inherits this
    /// process's environment unchecked; [`Mps::start_seeing`] checks that it sees the
    /// deployment's GPUs.
    pub fn start(dir: &Path) -> anyhow::Result<Mps> {
        Ok(Mps {
            daemon: gpu::mps::MpsDaemon::start(dir)?,
        })
    }

    /// Starts the daemon, first checking that it will see `gpus` (the deployment's GPU
    /// indices, e.g. both GPUs of a tensor-parallel engine) under their own numbers. The
    /// daemon inherits `CUDA_VISIBLE_DEVICES` from this process, and a daemon started
    /// under it renumbers the devices for its clients (NVIDIA's MPS guide: with "0,2" a
    /// client sees devices 0 and 1), so the engines' `CUDA_VISIBLE_DEVICES`, written with
    /// the machine's indices, would name other GPUs or none. Unset, the daemon sees every
    /// GPU of the machine.
    pub fn start_seeing(dir: &Path, gpus: &[u32]) -> anyhow::Result<Mps> {
        let inherited = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        if let Err(why) = daemon_sees(inherited.as_deref(), gpus) {
            bail!("{why}");
        }
        Self::start(dir)
    }

    /// The environment of one client: the daemon's folders and this engine's limits.
    pub fn client_env(
        &self,
        sm_percent: Option<u32>,
        pinned_bytes: Option<u64>,
    ) -> Vec<(String, String)> {
        self.daemon.client_env(&limits(sm_percent, pinned_bytes))
    }

    /// A follower of this daemon's logs for the supervisor, from their start.
    pub fn fault_log(&self) -> MpsFaultLog {
        MpsFaultLog {
            watch: self.daemon.log_watch(),
        }
    }

    /// Quits the daemon, giving clients `drain` to go first.
    pub fn quit(self, drain: Duration) -> anyhow::Result<()> {
        self.daemon.stop(drain)
    }
}

/// What the MPS logs say that the supervisor acts on; clients coming and going are not
/// its business (it sees its own processes exit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MpsNotice {
    /// The server named this client process in a fault: as having a sticky error set
    /// (every client of the server is named, the innocent ones too) or, with `culprit`,
    /// as the one whose work raised it.
    ClientFault {
        /// The daemon's timestamp, verbatim (local time, no zone).
        log_time: String,
        /// The MPS server that logged it.
        server: u32,
        pid: Option<u32>,
        culprit: bool,
        message: String,
    },
    /// The server failed or refused work (a non-zero exit, not-ready, too many clients).
    ServerFailed { log_time: String, message: String },
}

/// Follows one MPS daemon's `control.log` and `server.log` for faults.
#[derive(Debug)]
pub struct MpsFaultLog {
    watch: gpu::mps::MpsLogWatch,
}

impl MpsFaultLog {
    /// Follows the logs in `dir` (a daemon's `CUDA_MPS_LOG_DIRECTORY`) with no daemon at
    /// hand: a daemon someone else runs, or a test writing captured log text there.
    pub fn for_log_dir(dir: &Path) -> MpsFaultLog {
        MpsFaultLog {
            watch: gpu::mps::MpsLogWatch::new(dir),
        }
    }

    /// The folder followed.
    pub fn dir(&self) -> &Path {
        self.watch.dir()
    }

    /// Faults and server failures logged since the last poll, in log order.
    pub fn poll(&mut self) -> anyhow::Result<Vec<MpsNotice>> {
        use gpu::mps::MpsEvent;
        Ok(self
            .watch
            .poll()?
            .into_iter()
            .filter_map(|e| match e.event {
                MpsEvent::ClientFault {
                    pid,
                    culprit,
                    message,
                } => Some(MpsNotice::ClientFault {
                    log_time: e.log_time,
                    server: e.logged_by,
                    pid,
                    culprit,
                    message,
                }),
                MpsEvent::ServerFailed { message } => Some(MpsNotice::ServerFailed {
                    log_time: e.log_time,
                    message,
                }),
                _ => None,
            })
            .collect())
    }
}

/// Whether an MPS daemon started under `inherited` (this process's
/// `CUDA_VISIBLE_DEVICES`) sees each of `gpus` under its own index: unset, or a list that
/// starts `0,1,2,...` and reaches every one of them, renumbers nothing.
pub fn daemon_sees(inherited: Option<&str>, gpus: &[u32]) -> Result<(), String> {
    let Some(v) = inherited.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let listed: Vec<&str> = v.split(',').map(str::trim).collect();
    let identity = listed
        .iter()
        .enumerate()
        .all(|(k, d)| d.parse::<usize>() == Ok(k));
    let hidden: Vec<String> = gpus
        .iter()
        .filter(|g| **g as usize >= listed.len())
        .map(|g| g.to_string())
        .collect();
    if identity && hidden.is_empty() {
        return Ok(());
    }
    let why = if identity {
        format!("hides GPU {} from it", hidden.join(", "))
    } else {
        "renumbers the GPUs for its clients (the first listed becomes 0), so the engines' CUDA_VISIBLE_DEVICES would name other GPUs".to_string()
    };
    Err(format!(
        "CUDA_VISIBLE_DEVICES={v} is set where colocate runs: the MPS daemon inherits it, which {why}; unset it (engines are given their GPUs one by one)"
    ))
}

fn limits(sm_percent: Option<u32>, pinned_bytes: Option<u64>) -> gpu::mps::ClientLimits {
    limits_on(sm_percent, pinned_bytes, 1)
}

/// Limits for a client that sees `devices` GPUs: the pinned limit for each of them, by
/// the ordinal the client sees (its `CUDA_VISIBLE_DEVICES` renumbers them 0, 1, ...).
fn limits_on(
    sm_percent: Option<u32>,
    pinned_bytes: Option<u64>,
    devices: usize,
) -> gpu::mps::ClientLimits {
    gpu::mps::ClientLimits {
        active_thread_percentage: sm_percent,
        pinned_device_mem_limit: pinned_bytes
            .map(|b| (0..devices.max(1)).map(|d| (d.to_string(), b)).collect())
            .unwrap_or_default(),
    }
}

/// The per-client MPS limits of one engine as environment (without the daemon's folders,
/// which exist only once `up` started it): SM share, and pinned device memory on each of
/// the `devices` GPUs it sees (the same limit per GPU: a budget is per GPU).
pub fn mps_client_limits(
    sm_percent: Option<u32>,
    pinned_bytes: Option<u64>,
    devices: usize,
) -> Vec<(String, String)> {
    limits_on(sm_percent, pinned_bytes, devices).env()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_knows_the_study_gpus() {
        // what the driver reports (81,559 MiB on the study's H100), not 80 x 10^9
        assert_eq!(catalogue_memory("H100 SXM"), Some(81_559 << 20));
        assert_eq!(catalogue_memory("NVIDIA H200"), Some(143_771 << 20));
        assert_eq!(catalogue_memory("Voodoo 2"), None);
    }

    #[test]
    fn the_fault_log_gives_only_faults_with_their_time_and_server() {
        let capture = include_str!("../../../testdata/mps/mps-client-fault-h100.log");
        let dir = tempfile::tempdir().unwrap();
        let server_log: String = capture
            .lines()
            .skip_while(|l| *l != "== server.log")
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.path().join("server.log"), server_log).unwrap();
        let mut log = MpsFaultLog::for_log_dir(dir.path());
        let notices = log.poll().unwrap();
        assert_eq!(notices.len(), 2, "{notices:?}");
        for (n, pid) in notices.iter().zip([563, 562]) {
            match n {
                MpsNotice::ClientFault {
                    log_time,
                    server,
                    pid: p,
                    culprit,
                    ..
                } => {
                    assert_eq!(log_time, "2026-11-23 20:10:31.616");
                    assert_eq!(*server, 597);
                    assert_eq!(*p, Some(pid));
                    assert!(!culprit, "the H100 log names no culprit");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(log.poll().unwrap().is_empty());
    }

    #[test]
    fn mps_limits_env() {
        assert_eq!(
            mps_client_limits(Some(70), Some(20 << 30), 1),
            vec![
                (
                    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".to_string(),
                    "70".to_string()
                ),
                (
                    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".to_string(),
                    "0=20480M".to_string()
                ),
            ]
        );
        assert!(mps_client_limits(None, None, 2).is_empty());
        // Two GPUs: the client's ordinals 0 and 1, whatever the machine's indices.
        assert_eq!(
            mps_client_limits(None, Some(60 << 30), 2),
            vec![(
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".to_string(),
                "0=61440M,1=61440M".to_string()
            )]
        );
    }

    #[test]
    fn the_daemon_must_see_the_gpus_unrenumbered() {
        assert!(daemon_sees(None, &[0, 1]).is_ok());
        assert!(daemon_sees(Some(""), &[3]).is_ok());
        assert!(daemon_sees(Some("0,1"), &[0, 1]).is_ok());
        let e = daemon_sees(Some("0"), &[0, 1]).unwrap_err();
        assert!(
            e.contains("CUDA_VISIBLE_DEVICES=0 is set") && e.contains("hides GPU 1"),
            "{e}"
        );
        let e = daemon_sees(Some("1"), &[1]).unwrap_err();
        assert!(
            e.contains("renumbers the GPUs") && e.contains("unset it"),
            "{e}"
        );
        assert!(daemon_sees(Some("GPU-abc"), &[]).is_err());
    }
}
