//! Per-kernel time breakdown from CUDA events: each op of an eager step is bracketed by a
//! pair of timing events; totals per op name are summed after the step completes. Only
//! used when asked for (benchmarks): it adds two event records per op.

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::device::CudaError;

/// Collects op timings over many steps.
pub struct Profiler {
    ctx: Arc<CudaContext>,
    pending: Vec<(&'static str, CudaEvent, CudaEvent)>,
    /// name -> (total ms, calls)
    totals: BTreeMap<&'static str, (f64, u64)>,
}

impl Profiler {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Self {
            ctx,
            pending: Vec::new(),
            totals: BTreeMap::new(),
        }
    }

    /// Records the start of op `name` on `stream`; returns the start event to close with `end`.
    pub fn start(&self, stream: &CudaStream) -> Option<CudaEvent> {
        let e = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ok()?;
        e.record(stream).ok()?;
        Some(e)
    }

    /// Closes an op started with `start`.
    pub fn end(&mut self, name: &'static str, start: Option<CudaEvent>, stream: &CudaStream) {
        let Some(start) = start else { return };
        if let Ok(end) = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
            if end.record(stream).is_ok() {
                self.pending.push((name, start, end));
            }
        }
    }

    /// Folds the finished events into the totals (call after the stream is synchronised).
    pub fn collect(&mut self) {
        for (name, s, e) in self.pending.drain(..) {
            if let Ok(ms) = s.elapsed_ms(&e) {
                let t = self.totals.entry(name).or_insert((0.0, 0));
                t.0 += ms as f64;
                t.1 += 1;
            }
        }
    }

    /// (name, total ms, calls), largest first.
    pub fn report(&self) -> Vec<(&'static str, f64, u64)> {
        let mut v: Vec<_> = self
            .totals
            .iter()
            .map(|(n, (ms, c))| (*n, *ms, *c))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}

/// Enqueues a forward pass's ops, each bracketed by timing events when profiling is on.
pub struct Launcher<'a> {
    stream: &'a CudaStream,
    profiler: &'a mut Option<Profiler>,
}

impl<'a> Launcher<'a> {
    pub fn new(stream: &'a CudaStream, profiler: &'a mut Option<Profiler>) -> Self {
        Self { stream, profiler }
    }

    /// Enqueues one op (`launch` issues its kernel or GEMM) under `name`.
    pub fn op(
        &mut self,
        name: &'static str,
        launch: impl FnOnce() -> Result<(), CudaError>,
    ) -> anyhow::Result<()> {
        let ev = self.profiler.as_ref().and_then(|p| p.start(self.stream));
        let res = launch();
        if let Some(p) = self.profiler.as_mut() {
            p.end(name, ev, self.stream);
        }
        res?;
        Ok(())
    }
}
