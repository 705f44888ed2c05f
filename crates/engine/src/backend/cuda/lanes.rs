//! An embedder's SM partitions, movable while it runs (`--sm-partitions`, issue 18): one
//! CUDA green context per size, made at start, each with what a forward pass launches on
//! (a stream, a cuBLAS handle with its own workspace, the kernels loaded there). The
//! model's weights and activations stay where they were allocated: green contexts share
//! the primary context's memory. Between batches the executor picks a lane
//! ([`crate::sm_share::SmPartitions::pick`]); a batch ends with a synchronous copy to the
//! host, so the lane it ran on is idle when the next batch starts on another.
//!
//! Only the embedding path moves: a generator's steps and captured CUDA graphs stay on
//! the device's own stream (`--sm-partition` confines a whole engine instead).

use super::buffer::DevBuf;
use super::device::CudaDevice;
use super::gemm::Gemms;
use super::kernels::Kernels;
use crate::sm_share::SmPartitions;

/// What a forward pass needs to run on one partition.
pub struct Lane {
    pub dev: CudaDevice,
    pub kernels: Kernels,
    pub gemm: Gemms,
    _workspace: DevBuf,
}

/// The partitions and the one the next batch runs on (`None`: the whole GPU, the
/// device's own stream).
pub struct Lanes {
    lanes: Vec<Lane>,
    parts: SmPartitions,
    active: Option<usize>,
}

impl Lanes {
    /// A lane of at least each of `wants` SMs of GPU `ordinal` (the driver rounds up;
    /// sizes that round alike, or reach the whole GPU, make one lane or none), whose
    /// kernels are compiled for `head_dim` and `group` as the main device's are. `main`
    /// is the engine's device; its queued work is finished first.
    pub fn open(
        ordinal: usize,
        main: &CudaDevice,
        wants: &[u32],
        head_dim: usize,
        group: usize,
        workspace_bytes: usize,
    ) -> anyhow::Result<Self> {
        let total = main.sm_count()? as u32;
        let mut lanes: Vec<Lane> = Vec::new();
        let mut sorted = wants.to_vec();
        sorted.sort_unstable();
        for want in sorted {
            if want >= total {
                continue;
            }
            let dev = CudaDevice::open_with(ordinal, Some(want))
                .map_err(|e| anyhow::anyhow!("--sm-partitions: a partition of {want} SMs: {e}"))?;
            let sms = dev.partition.unwrap_or(want);
            if sms >= total || lanes.iter().any(|l| l.dev.partition == Some(sms)) {
                continue;
            }
            let kernels = Kernels::compile(&dev, head_dim, group)?;
            let workspace = DevBuf::alloc(&dev, workspace_bytes)?;
            let gemm = Gemms::new(&dev, workspace.ptr, workspace_bytes)?;
            lanes.push(Lane {
                dev,
                kernels,
                gemm,
                _workspace: workspace,
            });
        }
        for l in &lanes {
            super::buffer::synchronize(&l.dev)?;
        }
        super::buffer::synchronize(main)?;
        let parts = SmPartitions::new(total, lanes.iter().filter_map(|l| l.dev.partition));
        // `SmPartitions` sorts and dedups; the lanes were made in ascending order with
        // no repeats, so index i of one is index i of the other.
        debug_assert_eq!(
            parts.sizes,
            lanes
                .iter()
                .filter_map(|l| l.dev.partition)
                .collect::<Vec<_>>()
        );
        tracing::info!(
            "cuda:{ordinal}: embedding batches can move between green contexts of {:?} of {total} SMs",
            parts.sizes
        );
        Ok(Self {
            lanes,
            parts,
            active: None,
        })
    }

    pub fn partitions(&self) -> &SmPartitions {
        &self.parts
    }

    /// Runs the next batches on the lane for `percent` of the SMs; returns its SMs.
    pub fn set(&mut self, percent: Option<u32>) -> u32 {
        self.active = self.parts.pick(percent);
        self.parts.sms(self.active)
    }

    /// The lane of the next batch (`None`: the device's own stream).
    pub fn active(&self) -> Option<&Lane> {
        self.active.and_then(|i| self.lanes.get(i))
    }
}
