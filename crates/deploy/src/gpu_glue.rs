//! The one place deploy touches the GPU: facts for the plan, the MPS daemon, client env.
//!
//! The `gpu` crate (NVML, MPS control, catalogue) is being written alongside this one;
//! until its `gpu::info`, `gpu::catalogue::lookup` and `gpu::mps::{MpsDaemon, client_env}`
//! land, this module does the same with the driver's own tools (`nvidia-smi`,
//! `nvidia-cuda-mps-control`) so that nothing else in deploy has to change when they do.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context};
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

/// Total memory of a GPU model by name, for planning on a machine without it.
pub fn catalogue_memory(name: &str) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    let n = name.to_ascii_lowercase().replace([' ', '_'], "-");
    // Figures are what the driver reports as total memory (nvidia-smi memory.total).
    let table: &[(&str, u64)] = &[
        ("h200", 143_771 * MIB),
        ("h100-nvl", 95_830 * MIB),
        ("h100", 81_559 * MIB),
        ("a100-80gb", 81_920 * MIB),
        ("a100-40gb", 40_960 * MIB),
        ("a100", 81_920 * MIB),
        ("l40s", 46_068 * MIB),
        ("l4", 23_034 * MIB),
        ("a10g", 23_028 * MIB),
        ("a10", 23_028 * MIB),
        ("t4", 15_360 * MIB),
    ];
    table
        .iter()
        .find(|(k, _)| n.contains(k))
        .map(|(_, b)| *b)
}

/// Looks up the selected GPU on this machine.
pub fn detect(sel: &GpuSelector) -> anyhow::Result<GpuFacts> {
    if sel.is_cpu() {
        bail!("gpu = \"cpu\": no GPU to look up");
    }
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("no NVIDIA driver/GPU found: cannot run nvidia-smi ({e})"))?;
    if !out.status.success() {
        bail!("no NVIDIA driver/GPU found: nvidia-smi exited with {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 4 {
            continue;
        }
        let hit = match sel {
            GpuSelector::Index(i) => f[0] == i.to_string(),
            GpuSelector::Uuid(u) => f[1] == u,
            GpuSelector::Cpu => false,
        };
        if hit {
            let mib: u64 = f[3].parse().context("nvidia-smi memory.total")?;
            return Ok(GpuFacts { name: f[2].to_string(), memory_total_bytes: mib << 20 });
        }
    }
    bail!("GPU {sel} not found on this machine (nvidia-smi lists: {})", text.trim())
}

/// An MPS control daemon with private pipe and log folders.
#[derive(Debug)]
pub struct Mps {
    pub pipe_dir: PathBuf,
    pub log_dir: PathBuf,
    /// `CUDA_VISIBLE_DEVICES` the daemon was started with.
    pub visible: String,
}

impl Mps {
    /// Starts `nvidia-cuda-mps-control -d` for one GPU, its folders under `dir`.
    pub fn start(dir: &Path, visible: &str) -> anyhow::Result<Mps> {
        let pipe_dir = dir.join("pipe");
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&pipe_dir).with_context(|| format!("creating {}", pipe_dir.display()))?;
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let status = std::process::Command::new("nvidia-cuda-mps-control")
            .arg("-d")
            .env("CUDA_MPS_PIPE_DIRECTORY", &pipe_dir)
            .env("CUDA_MPS_LOG_DIRECTORY", &log_dir)
            .env("CUDA_VISIBLE_DEVICES", visible)
            .status()
            .map_err(|e| anyhow::anyhow!("cannot start the MPS daemon (nvidia-cuda-mps-control): {e}"))?;
        if !status.success() {
            bail!(
                "the MPS daemon did not start ({status}); see {}",
                log_dir.join("control.log").display()
            );
        }
        Ok(Mps { pipe_dir, log_dir, visible: visible.to_string() })
    }

    /// The environment every client needs to reach this daemon.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("CUDA_MPS_PIPE_DIRECTORY".into(), self.pipe_dir.display().to_string()),
            ("CUDA_MPS_LOG_DIRECTORY".into(), self.log_dir.display().to_string()),
        ]
    }

    /// Sends `quit` to the daemon and waits for it to go.
    pub fn quit(self) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = std::process::Command::new("nvidia-cuda-mps-control")
            .env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe_dir)
            .env("CUDA_MPS_LOG_DIRECTORY", &self.log_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("running nvidia-cuda-mps-control to quit the daemon")?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("MPS quit failed: {status}");
        }
        Ok(())
    }
}

/// The per-client MPS limits of one engine: SM share and pinned device memory.
pub fn mps_client_limits(sm_percent: Option<u32>, pinned_bytes: Option<u64>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Some(p) = sm_percent {
        env.push(("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(), p.to_string()));
    }
    if let Some(b) = pinned_bytes {
        // The device index is 0: each client sees only its GPU through CUDA_VISIBLE_DEVICES.
        env.push(("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(), format!("0={}M", b >> 20)));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_knows_the_study_gpus() {
        assert_eq!(catalogue_memory("H100-SXM-80GB"), Some(81_559 << 20));
        assert_eq!(catalogue_memory("NVIDIA H200"), Some(143_771 << 20));
        assert_eq!(catalogue_memory("Voodoo 2"), None);
    }

    #[test]
    fn mps_limits_env() {
        assert_eq!(
            mps_client_limits(Some(70), Some(20 << 30)),
            vec![
                ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".to_string(), "70".to_string()),
                ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".to_string(), "0=20480M".to_string()),
            ]
        );
        assert!(mps_client_limits(None, None).is_empty());
    }
}
