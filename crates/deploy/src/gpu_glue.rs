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
    /// Starts the daemon with its folders under `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Mps> {
        Ok(Mps {
            daemon: gpu::mps::MpsDaemon::start(dir)?,
        })
    }

    /// The environment of one client: the daemon's folders and this engine's limits.
    pub fn client_env(
        &self,
        sm_percent: Option<u32>,
        pinned_bytes: Option<u64>,
    ) -> Vec<(String, String)> {
        self.daemon.client_env(&limits(sm_percent, pinned_bytes))
    }

    /// Client faults the daemon's logs reported since the last call (for the supervisor's
    /// "why did everything die" message).
    pub fn poll_faults(&mut self) -> Vec<String> {
        match self.daemon.poll_events() {
            Ok(ev) => ev.into_iter().map(|e| format!("{e:?}")).collect(),
            Err(e) => vec![format!("cannot read the MPS logs: {e}")],
        }
    }

    /// Quits the daemon, giving clients `drain` to go first.
    pub fn quit(self, drain: Duration) -> anyhow::Result<()> {
        self.daemon.stop(drain)
    }
}

fn limits(sm_percent: Option<u32>, pinned_bytes: Option<u64>) -> gpu::mps::ClientLimits {
    gpu::mps::ClientLimits {
        active_thread_percentage: sm_percent,
        // Device 0: each client sees only its GPU through CUDA_VISIBLE_DEVICES.
        pinned_device_mem_limit: pinned_bytes
            .map(|b| vec![("0".to_string(), b)])
            .unwrap_or_default(),
    }
}

/// The per-client MPS limits of one engine as environment (without the daemon's folders,
/// which exist only once `up` started it): SM share and pinned device memory.
pub fn mps_client_limits(
    sm_percent: Option<u32>,
    pinned_bytes: Option<u64>,
) -> Vec<(String, String)> {
    let l = limits(sm_percent, pinned_bytes);
    let mut env = Vec::new();
    if let Some(p) = l.active_thread_percentage {
        env.push(("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(), p.to_string()));
    }
    if !l.pinned_device_mem_limit.is_empty() {
        env.push((
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(),
            gpu::mps::pinned_limit_value(&l.pinned_device_mem_limit),
        ));
    }
    env
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
    fn mps_limits_env() {
        assert_eq!(
            mps_client_limits(Some(70), Some(20 << 30)),
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
        assert!(mps_client_limits(None, None).is_empty());
    }
}
