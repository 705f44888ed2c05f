//! MIG: listing instances and mapping an engine onto one. Creating or destroying MIG
//! instances is out of scope: it changes the GPU for everyone, and the project never
//! does it in tests or examples.
use anyhow::{bail, Result};
use nvml_wrapper::Device;

use crate::{info, MigInstance};

/// MIG devices of one physical GPU (an empty list when MIG is off or unreadable).
pub(crate) fn instances_of(dev: &Device) -> Vec<MigInstance> {
    let max = dev.mig_device_count().unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..max {
        // Unused slots answer NotFound: skip them.
        let Ok(mig) = dev.mig_device_by_index(i) else {
            continue;
        };
        let name = mig.name().unwrap_or_default();
        out.push(MigInstance {
            uuid: mig.uuid().unwrap_or_default(),
            profile: profile_from_name(&name),
            sm_count: mig
                .attributes()
                .map(|a| a.multiprocessor_count)
                .unwrap_or(0),
            memory_bytes: mig.memory_info().map(|m| m.total).unwrap_or(0),
        });
    }
    out
}

/// Every MIG instance on the machine with its parent GPU's index.
pub fn list() -> Result<Vec<(u32, MigInstance)>> {
    Ok(info()?
        .into_iter()
        .flat_map(|g| g.mig_instances.into_iter().map(move |m| (g.index, m)))
        .collect())
}

/// The profile part of a MIG device name: "NVIDIA H100 80GB HBM3 MIG 1g.10gb" -> "1g.10gb".
pub fn profile_from_name(name: &str) -> String {
    match name.rsplit_once(" MIG ") {
        Some((_, p)) => p.trim().to_string(),
        None => name.trim().to_string(),
    }
}

/// The environment that pins a child process (an engine) to one MIG device.
pub fn visible_devices_env(mig_uuid: &str) -> Result<Vec<(String, String)>> {
    if !mig_uuid.starts_with("MIG-") {
        bail!("'{mig_uuid}' is not a MIG device UUID (expected 'MIG-...'; see `colocate gpu mig list`)");
    }
    Ok(vec![(
        "CUDA_VISIBLE_DEVICES".to_string(),
        mig_uuid.to_string(),
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_come_from_the_device_name() {
        assert_eq!(
            profile_from_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb"),
            "1g.10gb"
        );
        assert_eq!(
            profile_from_name("NVIDIA A100-SXM4-40GB MIG 3g.20gb"),
            "3g.20gb"
        );
        assert_eq!(profile_from_name("odd"), "odd");
    }

    #[test]
    fn only_mig_uuids_map_to_an_environment() {
        let env = visible_devices_env("MIG-4f7c-aa").unwrap();
        assert_eq!(
            env,
            vec![("CUDA_VISIBLE_DEVICES".into(), "MIG-4f7c-aa".into())]
        );
        let err = visible_devices_env("GPU-acf5").unwrap_err().to_string();
        assert!(err.contains("not a MIG device UUID"), "{err}");
    }
}
