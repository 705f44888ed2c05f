//! bf16 GEMMs in the row-major layout of Hugging Face `Linear` weights:
//! `y[T, N] = x[T, K] · w[N, K]ᵀ`. In cuBLAS's column-major view that is
//! `yᶜ (N×T) = wᶜᵀ · xᶜ`, i.e. op(A) = T on the weight, no transposes copied.
//!
//! Two paths: `cublasGemmEx` with `CUBLAS_GEMM_DEFAULT` ([`linear`], every shape), and for
//! the decode shapes (M = a decode graph's batch) the cuBLASLt algorithm that was fastest
//! when timed at model load ([`Gemms::tune`], candidates from `gemm_tune`). Both share one
//! fixed workspace, so that GEMMs can be captured into CUDA graphs (nothing allocates).
//! Shapes not tuned (prefill, embeddings, eager mixed steps) stay on `cublasGemmEx`.

use std::collections::HashMap;
use std::time::Instant;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::device::{CudaDevice, CudaError};
use super::gemm_tune::{AlgoInfo, Candidate, LtHandle, LtProblem};
use super::kernels::DevPtr;

/// Output element type of a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutType {
    Bf16,
    F32,
}

/// `y[t, n] = sum_k x[t, k] * w[n, k]` (bf16 in, fp32 accumulate, `out` type out).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    blas: &CudaBlas,
    x: DevPtr,
    w: DevPtr,
    y: DevPtr,
    t: usize,
    n: usize,
    k: usize,
    out: OutType,
) -> Result<(), CudaError> {
    let alpha = 1.0f32;
    let beta = 0.0f32;
    let c_type = match out {
        OutType::Bf16 => cudaDataType_t::CUDA_R_16BF,
        OutType::F32 => cudaDataType_t::CUDA_R_32F,
    };
    // SAFETY: the caller guarantees x, w, y point at buffers of at least t*k, n*k, t*n
    // elements on the handle's device; alpha/beta live across the (host-pointer-mode) call.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            t as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            w as *const std::ffi::c_void,
            cudaDataType_t::CUDA_R_16BF,
            k as i32,
            x as *const std::ffi::c_void,
            cudaDataType_t::CUDA_R_16BF,
            k as i32,
            (&beta) as *const f32 as *const _,
            y as *mut std::ffi::c_void,
            c_type,
            n as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|source| CudaError::Blas {
        what: "GEMM",
        source,
    })
}

/// Gives cuBLAS a fixed workspace (required for graph capture: it must not allocate then).
pub fn set_workspace(blas: &CudaBlas, ptr: DevPtr, bytes: usize) -> Result<(), CudaError> {
    // SAFETY: the workspace buffer outlives the handle's use (owned by the same model).
    let status = unsafe {
        cudarc::cublas::sys::cublasSetWorkspace_v2(
            *blas.handle(),
            ptr as *mut std::ffi::c_void,
            bytes,
        )
    };
    status.result().map_err(|source| CudaError::Blas {
        what: "setting the workspace",
        source,
    })
}

/// Heuristic candidates asked of cuBLASLt per shape (split-K variants come on top).
const HEURISTIC_CANDIDATES: usize = 32;
/// Timed graph launches per candidate (the fastest counts), and about how many µs of
/// work each launch holds.
const TIMED_LAUNCHES: usize = 2;
const GRAPH_US: f64 = 120.0;
/// cuBLASLt replaces `cublasGemmEx` for a shape only when at least this much faster.
const LT_MARGIN: f64 = 0.98;

/// One GEMM of a model, as the tuner needs it: its shape, where its input and output live
/// (buffers of at least `max_m` rows; their contents are overwritten), and every weight of
/// that shape (one per layer): the timed calls rotate through them, so that the weights
/// come from device memory as in a step, not from L2.
#[derive(Debug, Clone)]
pub struct GemmSpec {
    pub op: &'static str,
    pub n: usize,
    pub k: usize,
    pub out: OutType,
    pub x: DevPtr,
    pub y: DevPtr,
    pub max_m: usize,
    pub weights: Vec<DevPtr>,
}

/// What tuning measured for one GEMM at one M.
#[derive(Debug, Clone)]
pub struct TuneRecord {
    pub op: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out: OutType,
    /// µs per call of `cublasGemmEx` (default algorithm).
    pub blas_us: f64,
    /// µs per call of the fastest cuBLASLt candidate, and what it is.
    pub lt_us: Option<f64>,
    pub lt_best: Option<AlgoInfo>,
    /// cuBLASLt candidates timed.
    pub candidates: usize,
    /// The shape runs on cuBLASLt (its best beat `cublasGemmEx` by the margin).
    pub use_lt: bool,
}

impl TuneRecord {
    /// Bytes the GEMM must move: weight, input and output once each.
    pub fn bytes(&self) -> f64 {
        let out = match self.out {
            OutType::Bf16 => 2,
            OutType::F32 => 4,
        };
        (2 * self.n * self.k + 2 * self.m * self.k + out * self.m * self.n) as f64
    }

    /// µs per call of the chosen path.
    pub fn chosen_us(&self) -> f64 {
        match (self.use_lt, self.lt_us) {
            (true, Some(us)) => us,
            _ => self.blas_us,
        }
    }
}

/// A tuned shape: its cuBLASLt problem and the algorithm kept.
struct Plan {
    problem: LtProblem,
    algo: Candidate,
}

/// Environment variable that turns decode-GEMM tuning at load on (`1`, `on` or `true`).
pub const TUNE_ENV: &str = "COLOCATE_GEMM_TUNE";

/// Whether [`TUNE_ENV`] asks for tuning.
fn tune_requested() -> bool {
    std::env::var(TUNE_ENV).is_ok_and(|v| matches!(v.trim(), "1" | "on" | "true"))
}

/// The engine's GEMMs: `cublasGemmEx` everywhere, except the shapes tuned onto cuBLASLt
/// (while `tuned` is on).
///
/// Tuning is off by default: measured on the H200 (docs/results/2026-12-01-h200-gemm/) it
/// gained nothing measurable (Qwen3-8B decode step at batch 64: 6.64 -> 6.61 ms, every
/// workload within about 1%, the decode GEMMs already at 71-95% of the copy bandwidth)
/// and cost 0.4-1.1 s of model load. [`TUNE_ENV`]`=1` turns it on (the `cuda_bench`
/// example sets it for `CUDA_BENCH_GEMM=tuned|both`).
pub struct Gemms {
    lt: Option<LtHandle>,
    workspace: (DevPtr, usize),
    plans: HashMap<(usize, usize, usize, OutType), Plan>,
    use_plans: bool,
    /// [`Self::tune`] times anything (from [`TUNE_ENV`] at creation).
    tune_on: bool,
    records: Vec<TuneRecord>,
    tune_secs: f64,
}

impl Gemms {
    /// Gives cuBLAS the fixed workspace and opens cuBLASLt (when its library loads; else
    /// every GEMM stays on `cublasGemmEx`). Tuning, and so the tuned algorithms, are off
    /// unless [`TUNE_ENV`] turns them on (see the type's comment for why).
    pub fn new(dev: &CudaDevice, workspace: DevPtr, bytes: usize) -> Result<Self, CudaError> {
        set_workspace(&dev.blas, workspace, bytes)?;
        let tune_on = tune_requested();
        let lt = LtHandle::new().unwrap_or_else(|e| {
            tracing::warn!("cuBLASLt unavailable, GEMMs stay on cublasGemmEx: {e}");
            None
        });
        Ok(Self {
            lt,
            workspace: (workspace, bytes),
            plans: HashMap::new(),
            use_plans: tune_on,
            tune_on,
            records: Vec::new(),
            tune_secs: 0.0,
        })
    }

    /// The cuBLASLt handle, when the library loaded.
    pub fn lt(&self) -> Option<&LtHandle> {
        self.lt.as_ref()
    }

    /// The fixed workspace (address, bytes) every GEMM uses.
    pub fn workspace(&self) -> (DevPtr, usize) {
        self.workspace
    }

    /// Uses the tuned cuBLASLt algorithms (`true`; the default when [`TUNE_ENV`] turned
    /// tuning on) or `cublasGemmEx` for every shape (`false`). Without tuning at load
    /// there are no tuned algorithms and `true` changes nothing.
    pub fn set_tuned(&mut self, on: bool) {
        self.use_plans = on;
    }

    pub fn tuned(&self) -> bool {
        self.use_plans
    }

    /// What tuning measured, in the order tuned.
    pub fn records(&self) -> &[TuneRecord] {
        &self.records
    }

    /// Seconds spent tuning.
    pub fn tune_secs(&self) -> f64 {
        self.tune_secs
    }

    /// `y[t, n] = x[t, k] · w[n, k]ᵀ`: the tuned algorithm of this shape if there is one
    /// (and tuning is on), else `cublasGemmEx`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        dev: &CudaDevice,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        t: usize,
        n: usize,
        k: usize,
        out: OutType,
    ) -> Result<(), CudaError> {
        if self.use_plans {
            if let (Some(lt), Some(p)) = (&self.lt, self.plans.get(&(t, n, k, out))) {
                return p
                    .problem
                    .run(lt, &p.algo.algo, x, w, y, self.workspace, &dev.stream);
            }
        }
        linear(&dev.blas, x, w, y, t, n, k, out)
    }

    /// Times `cublasGemmEx` and every cuBLASLt candidate for each spec at each M of `ms`
    /// (those within the spec's `max_m`) and keeps the fastest. The specs' `x` buffers
    /// should hold data like a step's (not zeros); their `y` buffers are overwritten.
    /// Needs the device's context current and no stream capture under way. Does nothing
    /// unless [`TUNE_ENV`] turned tuning on.
    pub fn tune(
        &mut self,
        dev: &CudaDevice,
        specs: &[GemmSpec],
        ms: &[usize],
    ) -> anyhow::Result<()> {
        if !self.tune_on {
            return Ok(());
        }
        let Some(lt) = self.lt.take() else {
            return Ok(());
        };
        let t0 = Instant::now();
        let r = self.tune_with(dev, &lt, specs, ms);
        self.lt = Some(lt);
        self.tune_secs += t0.elapsed().as_secs_f64();
        r
    }

    fn tune_with(
        &mut self,
        dev: &CudaDevice,
        lt: &LtHandle,
        specs: &[GemmSpec],
        ms: &[usize],
    ) -> anyhow::Result<()> {
        let mut ms: Vec<usize> = ms.iter().copied().filter(|&m| m > 0).collect();
        ms.sort_unstable();
        ms.dedup();
        let stream = &dev.stream;
        let mut cursor = 0usize;
        for spec in specs.iter().filter(|s| !s.weights.is_empty()) {
            for &m in ms.iter().filter(|&&m| m <= spec.max_m) {
                let key = (m, spec.n, spec.k, spec.out);
                if self.plans.contains_key(&key)
                    || self.records.iter().any(|r| (r.m, r.n, r.k, r.out) == key)
                {
                    continue;
                }
                let wbytes = 2 * spec.n * spec.k;
                let blas_us = time_us(dev, &spec.weights, wbytes, &mut cursor, |w| {
                    linear(&dev.blas, spec.x, w, spec.y, m, spec.n, spec.k, spec.out)
                })?
                .ok_or_else(|| anyhow::anyhow!("cublasGemmEx failed for {} at M {m}", spec.op))?;
                let problem = LtProblem::new(lt, m, spec.n, spec.k, spec.out)?;
                let cands = problem
                    .candidates(lt, self.workspace.1, HEURISTIC_CANDIDATES)
                    .unwrap_or_else(|e| {
                        tracing::debug!("no cuBLASLt candidates for {} at M {m}: {e}", spec.op);
                        Vec::new()
                    });
                let mut best: Option<(f64, Candidate)> = None;
                for c in &cands {
                    let us = time_us(dev, &spec.weights, wbytes, &mut cursor, |w| {
                        problem.run(lt, &c.algo, spec.x, w, spec.y, self.workspace, stream)
                    })?;
                    if let Some(us) = us {
                        if best.is_none_or(|(b, _)| us < b) {
                            best = Some((us, *c));
                        }
                    }
                }
                let use_lt = best.is_some_and(|(us, _)| us < blas_us * LT_MARGIN);
                self.records.push(TuneRecord {
                    op: spec.op,
                    m,
                    n: spec.n,
                    k: spec.k,
                    out: spec.out,
                    blas_us,
                    lt_us: best.map(|b| b.0),
                    lt_best: best.map(|b| b.1.info),
                    candidates: cands.len(),
                    use_lt,
                });
                if let (true, Some((_, algo))) = (use_lt, best) {
                    self.plans.insert(key, Plan { problem, algo });
                }
            }
        }
        Ok(())
    }
}

/// µs per call of `run`, as a decode graph would replay it: one eager warm-up call (which
/// also loads its kernel), then a CUDA graph of a few calls (rotating through `weights`
/// from `cursor`, enough calls for about [`GRAPH_US`] of work by the weight bytes at
/// 3.5 TB/s), launched [`TIMED_LAUNCHES`] times between CUDA events; the fastest launch
/// counts. Host launch overhead is left out, as in the engine's decode graphs. `None` when
/// a call is refused or does not capture.
fn time_us(
    dev: &CudaDevice,
    weights: &[DevPtr],
    weight_bytes: usize,
    cursor: &mut usize,
    mut run: impl FnMut(DevPtr) -> Result<(), CudaError>,
) -> anyhow::Result<Option<f64>> {
    let mut next = || {
        *cursor += 1;
        weights[*cursor % weights.len()]
    };
    if run(next()).is_err() {
        return Ok(None);
    }
    let est_us = weight_bytes as f64 / 3.5e12 * 1e6;
    let calls = ((GRAPH_US / est_us.max(0.1)).round() as usize).clamp(2, 8);
    let stream = &dev.stream;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)?;
    let mut ok = true;
    for _ in 0..calls {
        if run(next()).is_err() {
            ok = false;
            break;
        }
    }
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    let graph = match (ok, graph) {
        (true, Ok(Some(g))) => g,
        _ => {
            stream.synchronize()?;
            return Ok(None);
        }
    };
    graph.upload()?;
    let mut best = f64::MAX;
    for _ in 0..TIMED_LAUNCHES {
        let a = dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(stream)?;
        graph.launch()?;
        b.record(stream)?;
        b.synchronize()?;
        best = best.min(a.elapsed_ms(&b)? as f64 * 1e3 / calls as f64);
    }
    Ok(Some(best))
}
