//! `gpu::info()`: a snapshot of every visible GPU, for `colocate gpu info` and for the
//! environment section of results files.
use anyhow::{Context, Result};
use nvml_wrapper::enum_wrappers::device::ComputeMode;
use nvml_wrapper::Device;
use serde::Serialize;

use crate::{mig, mps, nvml};

/// One physical GPU as NVML sees it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// `None` where NVML cannot say (pre-Ampere without MIG attributes).
    pub sm_count: Option<u32>,
    pub driver_version: String,
    /// The highest CUDA version the driver supports, e.g. "13.0".
    pub cuda_version: String,
    /// "default", "exclusive_process", "prohibited" (MPS refuses the last).
    pub compute_mode: String,
    pub mig_enabled: bool,
    pub mig_instances: Vec<MigInstance>,
    /// Whether NVML GPM counters (SM active, occupancy, tensor, DRAM) are available.
    pub gpm_supported: bool,
    /// Whether an MPS control daemon or server process is running on this machine.
    pub mps_running: bool,
}

/// One MIG device (a GPU instance with its compute instance).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MigInstance {
    /// "MIG-..."; what `CUDA_VISIBLE_DEVICES` takes.
    pub uuid: String,
    /// The profile, e.g. "1g.10gb", parsed from the device name.
    pub profile: String,
    pub sm_count: u32,
    pub memory_bytes: u64,
}

/// Every visible GPU; fails with [`crate::NO_GPU`] and the reason when there is none.
pub fn info() -> Result<Vec<GpuInfo>> {
    let nvml = nvml::open()?;
    let driver_version = nvml
        .sys_driver_version()
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let cuda_version = nvml
        .sys_cuda_driver_version()
        .map(nvml::cuda_version_string)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let mps_running = !mps::daemon_processes().is_empty();
    let count = nvml.device_count().context("counting GPUs")?;
    let mut out = Vec::with_capacity(count as usize);
    for index in 0..count {
        let dev = nvml
            .device_by_index(index)
            .with_context(|| format!("opening GPU {index}"))?;
        out.push(describe(
            index,
            &dev,
            &driver_version,
            &cuda_version,
            mps_running,
        )?);
    }
    Ok(out)
}

fn describe(
    index: u32,
    dev: &Device,
    driver: &str,
    cuda: &str,
    mps_running: bool,
) -> Result<GpuInfo> {
    let mem = dev
        .memory_info()
        .with_context(|| format!("reading memory of GPU {index}"))?;
    let mig_enabled = dev.mig_mode().map(|m| m.current == 1).unwrap_or(false);
    Ok(GpuInfo {
        index,
        name: dev.name().unwrap_or_else(|_| "unknown".into()),
        uuid: dev.uuid().unwrap_or_default(),
        memory_total_bytes: mem.total,
        memory_used_bytes: mem.used,
        sm_count: sm_count(dev),
        driver_version: driver.to_string(),
        cuda_version: cuda.to_string(),
        compute_mode: dev
            .compute_mode()
            .map(compute_mode_name)
            .unwrap_or_else(|e| format!("unknown ({e})")),
        mig_enabled,
        mig_instances: if mig_enabled {
            mig::instances_of(dev)
        } else {
            Vec::new()
        },
        gpm_supported: dev.gpm_support().unwrap_or(false),
        mps_running,
    })
}

/// SMs from NVML's device attributes, which the H100's driver answers only for MIG
/// devices (seen on the GPU machine: NotSupported on the whole GPU); else the datasheet
/// figure for a GPU the catalogue knows; else unknown.
fn sm_count(dev: &Device) -> Option<u32> {
    dev.attributes()
        .ok()
        .map(|a| a.multiprocessor_count)
        .filter(|&n| n > 0)
        .or_else(|| {
            dev.name()
                .ok()
                .and_then(|n| crate::catalogue::lookup(&n))
                .map(|s| s.sm_count)
        })
}

/// NVML's compute mode as the snake_case word nvidia-smi's docs use.
pub(crate) fn compute_mode_name(m: ComputeMode) -> String {
    match m {
        ComputeMode::Default => "default",
        ComputeMode::ExclusiveThread => "exclusive_thread",
        ComputeMode::Prohibited => "prohibited",
        ComputeMode::ExclusiveProcess => "exclusive_process",
    }
    .to_string()
}
