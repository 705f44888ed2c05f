//! Decode steps as CUDA graphs, one per batch-size bucket (vLLM's design): a decode batch
//! pads up to the next bucket, its metadata is rewritten in the step buffer, and the
//! bucket's graph is replayed; padding rows write no KV (and a mixture of experts routes
//! them to no expert). A model whose kernels follow what earlier steps saw (a mixture of
//! experts' tile) names a variant, and each bucket keeps a graph per variant it has used.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

/// A captured decode graph. CUDA graph execs may be launched from any thread as long as
/// launches do not overlap; the model that owns it is used by one thread at a time
/// (`&mut self`).
pub struct DecodeGraph(CudaGraph);
// SAFETY: see above; the graph is only launched through its owner's `&mut self`.
unsafe impl Send for DecodeGraph {}

/// Captures what `enqueue` puts on `stream` as a graph, instantiated and uploaded. The
/// caller runs `enqueue` once eagerly before (so that cuBLAS has picked its kernels).
pub fn capture(
    stream: &Arc<CudaStream>,
    enqueue: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<DecodeGraph> {
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| anyhow!("CUDA graph capture start: {e}"))?;
    let res = enqueue();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    res.context("capturing the decode step")?;
    let graph = graph
        .map_err(|e| anyhow!("CUDA graph capture: {e}"))?
        .ok_or_else(|| anyhow!("CUDA graph capture produced an empty graph"))?;
    graph
        .upload()
        .map_err(|e| anyhow!("CUDA graph upload: {e}"))?;
    Ok(DecodeGraph(graph))
}

/// The buckets and the graphs captured so far, by bucket and variant.
pub struct DecodeGraphs {
    /// Batch sizes that get a graph, in the configured order (none above `max_seqs`).
    buckets: Vec<usize>,
    graphs: HashMap<(usize, u64), DecodeGraph>,
}

impl DecodeGraphs {
    pub fn new(buckets: &[usize], max_seqs: usize) -> Self {
        Self {
            buckets: buckets.iter().copied().filter(|&b| b <= max_seqs).collect(),
            graphs: HashMap::new(),
        }
    }

    /// The smallest bucket that holds `n` sequences.
    pub fn bucket_for(&self, n: usize) -> Option<usize> {
        self.buckets.iter().copied().filter(|&b| b >= n).min()
    }

    pub fn buckets(&self) -> &[usize] {
        &self.buckets
    }

    pub fn has(&self, bucket: usize, variant: u64) -> bool {
        self.graphs.contains_key(&(bucket, variant))
    }

    pub fn insert(&mut self, bucket: usize, variant: u64, graph: DecodeGraph) {
        self.graphs.insert((bucket, variant), graph);
    }

    /// Replays the graph of `bucket` and `variant` on the stream it was captured on.
    pub fn launch(&self, bucket: usize, variant: u64) -> anyhow::Result<()> {
        let g = self.graphs.get(&(bucket, variant)).ok_or_else(|| {
            anyhow!("no decode graph captured for batch {bucket} (variant {variant})")
        })?;
        g.0.launch().map_err(|e| anyhow!("CUDA graph launch: {e}"))
    }

    /// Drops every graph (their addresses are stale once the KV cache is reallocated).
    pub fn clear(&mut self) {
        self.graphs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_pads_to_the_smallest_bucket_within_max_seqs() {
        let g = DecodeGraphs::new(&[1, 2, 4, 8, 16, 24], 16);
        assert_eq!(g.buckets(), &[1, 2, 4, 8, 16]);
        assert_eq!(g.bucket_for(1), Some(1));
        assert_eq!(g.bucket_for(3), Some(4));
        assert_eq!(g.bucket_for(9), Some(16));
        assert_eq!(g.bucket_for(17), None);
        assert_eq!(DecodeGraphs::new(&[], 8).bucket_for(1), None);
    }

    #[test]
    fn the_default_buckets_reach_1024_sequences() {
        let b = crate::backend::cuda::step::DEFAULT_GRAPH_BUCKETS;
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        let g = DecodeGraphs::new(&b, 1024);
        assert_eq!(g.bucket_for(512), Some(512));
        assert_eq!(g.bucket_for(257), Some(288));
        assert_eq!(g.bucket_for(500), Some(512));
        assert_eq!(g.bucket_for(513), Some(576));
        assert_eq!(g.bucket_for(1024), Some(1024));
        assert_eq!(g.bucket_for(1025), None);
        // at most 32 padding rows from 257 to 512, 64 above
        assert!((257..=512).all(|n| g.bucket_for(n).unwrap() - n < 32));
        assert!((513..=1024).all(|n| g.bucket_for(n).unwrap() - n < 64));
        // within --max-num-seqs
        assert_eq!(DecodeGraphs::new(&b, 300).buckets().last(), Some(&288));
    }
}
