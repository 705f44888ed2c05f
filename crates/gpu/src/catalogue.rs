//! Published specs of common data-centre GPUs, used where NVML cannot tell (memory
//! bandwidth and peak bf16 throughput set the limits plans and reports compare against).
//! Figures are the vendor's datasheet values (dense, no sparsity), except memory: that is
//! the total the driver reports (nvidia-smi / NVML), which is what budgets are taken from.
use serde::Serialize;

/// One GPU model's datasheet figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSpec {
    /// Canonical name, e.g. "H100 SXM".
    pub name: &'static str,
    /// Device memory in bytes as the driver reports it. The datasheet's "80 GB" of HBM is
    /// 80 GiB less what the driver reserves: 81,559 MiB on the study's H100 80GB HBM3,
    /// where the old 80 x 10^9 figure under-counted by 5 GiB.
    pub memory_bytes: u64,
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Peak DRAM bandwidth in bytes per second.
    pub mem_bandwidth_bytes_per_s: f64,
    /// Peak dense bf16 tensor throughput in TFLOP/s.
    pub bf16_dense_tflops: f64,
}

const MIB: u64 = 1 << 20;

const SPECS: &[GpuSpec] = &[
    GpuSpec {
        name: "H100 SXM",
        memory_bytes: 81559 * MIB,
        sm_count: 132,
        mem_bandwidth_bytes_per_s: 3.35e12,
        bf16_dense_tflops: 989.0,
    },
    GpuSpec {
        name: "H100 PCIe",
        memory_bytes: 81559 * MIB,
        sm_count: 114,
        mem_bandwidth_bytes_per_s: 2.0e12,
        bf16_dense_tflops: 756.0,
    },
    GpuSpec {
        name: "H200",
        memory_bytes: 143771 * MIB,
        sm_count: 132,
        mem_bandwidth_bytes_per_s: 4.8e12,
        bf16_dense_tflops: 989.0,
    },
    GpuSpec {
        name: "A100 40GB",
        memory_bytes: 40960 * MIB,
        sm_count: 108,
        mem_bandwidth_bytes_per_s: 1.555e12,
        bf16_dense_tflops: 312.0,
    },
    GpuSpec {
        name: "A100 80GB",
        memory_bytes: 81920 * MIB,
        sm_count: 108,
        mem_bandwidth_bytes_per_s: 2.039e12,
        bf16_dense_tflops: 312.0,
    },
    GpuSpec {
        name: "L40S",
        memory_bytes: 46068 * MIB,
        sm_count: 142,
        mem_bandwidth_bytes_per_s: 864e9,
        bf16_dense_tflops: 362.0,
    },
    GpuSpec {
        name: "L4",
        memory_bytes: 23034 * MIB,
        sm_count: 58,
        mem_bandwidth_bytes_per_s: 300e9,
        bf16_dense_tflops: 121.0,
    },
    GpuSpec {
        name: "A10",
        memory_bytes: 23028 * MIB,
        sm_count: 72,
        mem_bandwidth_bytes_per_s: 600e9,
        bf16_dense_tflops: 125.0,
    },
];

/// Finds the spec for a GPU name as NVML reports it ("NVIDIA H100 80GB HBM3",
/// "NVIDIA A100-SXM4-40GB", "NVIDIA L40S") or as a person writes it ("H100 PCIe", "a10").
/// Matching is by whole tokens, so "L4" never matches "L40S" and "A10" never "A100".
pub fn lookup(name: &str) -> Option<GpuSpec> {
    let upper = name.to_ascii_uppercase();
    let tokens: Vec<&str> = upper
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .collect();
    let has = |t: &str| tokens.contains(&t);
    let canonical = if has("H100") {
        if has("PCIE") {
            "H100 PCIe"
        } else {
            "H100 SXM"
        }
    } else if has("H200") {
        "H200"
    } else if has("A100") {
        if has("80GB") || has("80") {
            "A100 80GB"
        } else {
            "A100 40GB"
        }
    } else if has("L40S") {
        "L40S"
    } else if has("L4") {
        "L4"
    } else if has("A10") {
        "A10"
    } else {
        return None;
    };
    SPECS.iter().find(|s| s.name == canonical).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_names_map_to_specs() {
        let cases = [
            ("NVIDIA H100 80GB HBM3", "H100 SXM"),
            ("NVIDIA H100 PCIe", "H100 PCIe"),
            ("NVIDIA H200", "H200"),
            ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
            ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
            ("NVIDIA A100 80GB PCIe", "A100 80GB"),
            ("NVIDIA L40S", "L40S"),
            ("NVIDIA L4", "L4"),
            ("NVIDIA A10", "A10"),
            ("a10", "A10"),
        ];
        for (nvml, want) in cases {
            assert_eq!(lookup(nvml).map(|s| s.name), Some(want), "{nvml}");
        }
    }

    #[test]
    fn unknown_and_mig_suffixes() {
        assert!(lookup("NVIDIA GeForce RTX 4090").is_none());
        assert!(lookup("").is_none());
        // A MIG device's name keeps the parent's tokens.
        assert_eq!(
            lookup("NVIDIA H100 80GB HBM3 MIG 1g.10gb")
                .unwrap()
                .sm_count,
            132
        );
    }
}
