//! Opening NVML with one clear error when there is no driver or no GPU.
use anyhow::{anyhow, Result};
use nvml_wrapper::Nvml;

/// The start of every error caused by a missing driver or GPU, so callers (the lab) can
/// record counters as unavailable with the reason instead of failing.
pub const NO_GPU: &str = "no NVIDIA driver or GPU found";

/// Loads `libnvidia-ml.so.1` and initialises it; fails with [`NO_GPU`] and the
/// underlying reason when the library is missing, the driver is not loaded, or no
/// device is visible.
pub(crate) fn open() -> Result<Nvml> {
    let nvml =
        Nvml::init().map_err(|e| anyhow!("{NO_GPU}: NVML could not be initialised ({e})"))?;
    let count = nvml
        .device_count()
        .map_err(|e| anyhow!("{NO_GPU}: NVML could not count devices ({e})"))?;
    if count == 0 {
        return Err(anyhow!(
            "{NO_GPU}: the driver is loaded but reports 0 devices"
        ));
    }
    Ok(nvml)
}

/// Human-readable CUDA version from NVML's integer form (12080 -> "12.8").
pub(crate) fn cuda_version_string(v: i32) -> String {
    format!(
        "{}.{}",
        nvml_wrapper::cuda_driver_version_major(v),
        nvml_wrapper::cuda_driver_version_minor(v)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_versions_render_like_nvidia_smi() {
        assert_eq!(cuda_version_string(13000), "13.0");
        assert_eq!(cuda_version_string(12080), "12.8");
    }
}
