//! The environment an MPS client (an engine) needs, built as plain values the
//! supervisor applies to a child process.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Per-client limits. `None` / empty leave the daemon's defaults in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientLimits {
    /// `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`: the share of SMs this client may use (1-100).
    pub active_thread_percentage: Option<u32>,
    /// `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`: per device (index as the client sees it, or a
    /// UUID) the most device memory this client may allocate, in bytes.
    pub pinned_device_mem_limit: Vec<(String, u64)>,
}

impl ClientLimits {
    /// Rejects values MPS would reject or silently ignore.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.active_thread_percentage {
            if !(1..=100).contains(&p) {
                bail!("active thread percentage must be between 1 and 100, got {p}");
            }
        }
        for (dev, bytes) in &self.pinned_device_mem_limit {
            let dev_ok = !dev.is_empty()
                && (dev.chars().all(|c| c.is_ascii_digit())
                    || dev.starts_with("GPU-")
                    || dev.starts_with("MIG-"));
            if !dev_ok {
                bail!(
                    "pinned memory limit: device '{dev}' is neither an index nor a GPU-/MIG- UUID"
                );
            }
            if *bytes < 1 << 20 {
                bail!("pinned memory limit for device {dev} is {bytes} bytes; it must be at least 1 MiB");
            }
        }
        Ok(())
    }

    /// The limits' variables alone, without the daemon's folders (a plan shows them before
    /// any daemon runs); empty for the defaults.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(p) = self.active_thread_percentage {
            env.push((
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".to_string(),
                p.to_string(),
            ));
        }
        if !self.pinned_device_mem_limit.is_empty() {
            env.push((
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".to_string(),
                pinned_limit_value(&self.pinned_device_mem_limit),
            ));
        }
        env
    }
}

/// The variables for one client: the daemon's folders plus the limits.
pub fn client_env(pipe_dir: &Path, log_dir: &Path, limits: &ClientLimits) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "CUDA_MPS_PIPE_DIRECTORY".to_string(),
            pipe_dir.display().to_string(),
        ),
        (
            "CUDA_MPS_LOG_DIRECTORY".to_string(),
            log_dir.display().to_string(),
        ),
    ];
    env.extend(limits.env());
    env
}

/// "0=2048M,GPU-ab12=512M": MPS takes sizes with an M or G suffix; bytes are rounded
/// down to whole MiB so the limit is never above what the caller asked for.
fn pinned_limit_value(limits: &[(String, u64)]) -> String {
    limits
        .iter()
        .map(|(dev, bytes)| format!("{dev}={}M", bytes >> 20))
        .collect::<Vec<_>>()
        .join(",")
}

/// Shell `export` lines for humans (`colocate gpu mps start` prints them).
pub fn as_shell_exports(env: &[(String, String)]) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}='{}'", v.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_carries_folders_and_limits() {
        let limits = ClientLimits {
            active_thread_percentage: Some(30),
            pinned_device_mem_limit: vec![
                ("0".into(), 20 << 30),
                ("GPU-acf5e404".into(), (512 << 20) + 7),
            ],
        };
        limits.validate().unwrap();
        let env = client_env(Path::new("/r/mps/pipe"), Path::new("/r/mps/log"), &limits);
        assert_eq!(
            env,
            vec![
                ("CUDA_MPS_PIPE_DIRECTORY".into(), "/r/mps/pipe".into()),
                ("CUDA_MPS_LOG_DIRECTORY".into(), "/r/mps/log".into()),
                ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(), "30".into()),
                (
                    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(),
                    "0=20480M,GPU-acf5e404=512M".into()
                ),
            ]
        );
    }

    #[test]
    fn defaults_add_only_the_folders() {
        let env = client_env(Path::new("p"), Path::new("l"), &ClientLimits::default());
        assert_eq!(env.len(), 2);
        assert!(ClientLimits::default().env().is_empty());
    }

    #[test]
    fn bad_limits_are_refused_with_the_reason() {
        let bad_pct = ClientLimits {
            active_thread_percentage: Some(0),
            ..Default::default()
        };
        assert!(bad_pct
            .validate()
            .unwrap_err()
            .to_string()
            .contains("between 1 and 100"));
        let bad_dev = ClientLimits {
            pinned_device_mem_limit: vec![("gpu0".into(), 1 << 30)],
            ..Default::default()
        };
        assert!(bad_dev
            .validate()
            .unwrap_err()
            .to_string()
            .contains("'gpu0'"));
        let tiny = ClientLimits {
            pinned_device_mem_limit: vec![("0".into(), 10)],
            ..Default::default()
        };
        assert!(tiny.validate().is_err());
    }

    #[test]
    fn shell_exports_quote_values() {
        let s = as_shell_exports(&[("A".into(), "it's".into())]);
        assert_eq!(s, "export A='it'\\''s'");
    }
}
