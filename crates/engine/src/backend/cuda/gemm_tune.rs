//! cuBLASLt for the decode GEMMs: one problem (matmul descriptor and matrix layouts) per
//! (M, N, K, output type), the candidate algorithms cuBLASLt's heuristic offers for it
//! (plus split-K variants of its first few, checked by `cublasLtMatmulAlgoCheck`), each
//! timed with CUDA events over the real weights; [`super::gemm::Gemms`] keeps the fastest.
//!
//! Bindings: cudarc's `cublaslt` (`result` where it has the call, `sys` for the
//! heuristic's list, `AlgoCheck` and the algorithm attributes). With cudarc's dynamic
//! loading a missing library would panic at the first call, so [`lt_available`] checks
//! first that the library loads and has every entry point used here; where it does not,
//! [`LtHandle::new`] is `None` and every GEMM stays on `cublasGemmEx`.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::CudaStream;

use super::device::CudaError;
use super::gemm::OutType;
use super::kernels::DevPtr;

/// `cublasLtMatmulAlgo_t`: an opaque algorithm configuration.
pub type LtAlgo = sys::cublasLtMatmulAlgo_t;
type HeuristicResult = sys::cublasLtMatmulHeuristicResult_t;
use sys::cublasLtMatmulAlgoConfigAttributes_t as Config;

/// Split-K partial sums reduced out of place in the compute type (fp32), in the
/// workspace; the other schemes add the parts up in the output type (bf16).
const REDUCTION_COMPUTE_TYPE: u32 =
    sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;

/// The cuBLASLt entry points used here (cudarc's `sys` loads each on first call and
/// panics where one is missing).
const SYMBOLS: [&str; 15] = [
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmul",
    "cublasLtMatmulAlgoCheck",
    "cublasLtMatmulAlgoConfigSetAttribute",
    "cublasLtMatmulAlgoConfigGetAttribute",
];

/// Whether cuBLASLt loads (by cudarc's file names) with every entry point used here;
/// checked once.
pub fn lt_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: loading the library runs its initialisers only; `culib` is called only
        // once `is_culib_present` found a file that loads, so it does not panic.
        unsafe {
            sys::is_culib_present()
                && SYMBOLS.iter().all(|name| {
                    sys::culib()
                        .get::<unsafe extern "C" fn()>(name.as_bytes())
                        .is_ok()
                })
        }
    })
}

/// A cuBLASLt status (same values as cuBLAS's) as the backend's error.
fn check(r: Result<(), lt::CublasError>, what: &'static str) -> Result<(), CudaError> {
    use cublasStatus_t::*;
    use sys::cublasStatus_t as L;
    let Err(lt::CublasError(status)) = r else {
        return Ok(());
    };
    let s = match status {
        L::CUBLAS_STATUS_NOT_INITIALIZED => CUBLAS_STATUS_NOT_INITIALIZED,
        L::CUBLAS_STATUS_ALLOC_FAILED => CUBLAS_STATUS_ALLOC_FAILED,
        L::CUBLAS_STATUS_INVALID_VALUE => CUBLAS_STATUS_INVALID_VALUE,
        L::CUBLAS_STATUS_ARCH_MISMATCH => CUBLAS_STATUS_ARCH_MISMATCH,
        L::CUBLAS_STATUS_MAPPING_ERROR => CUBLAS_STATUS_MAPPING_ERROR,
        L::CUBLAS_STATUS_EXECUTION_FAILED => CUBLAS_STATUS_EXECUTION_FAILED,
        L::CUBLAS_STATUS_NOT_SUPPORTED => CUBLAS_STATUS_NOT_SUPPORTED,
        L::CUBLAS_STATUS_LICENSE_ERROR => CUBLAS_STATUS_LICENSE_ERROR,
        _ => CUBLAS_STATUS_INTERNAL_ERROR,
    };
    Err(CudaError::Blas {
        what,
        source: CublasError(s),
    })
}

/// An empty heuristic result (all zero, a valid bit pattern of the C struct).
fn empty_result() -> HeuristicResult {
    // SAFETY: plain C data; zero is CUBLAS_STATUS_SUCCESS for `state`.
    unsafe { std::mem::zeroed() }
}

/// A cuBLASLt handle (one per engine device).
pub struct LtHandle {
    h: sys::cublasLtHandle_t,
}

// SAFETY: the handle is used by its owner (one executor, one thread at a time).
unsafe impl Send for LtHandle {}

impl LtHandle {
    /// Creates a handle on the current context; `None` without cuBLASLt.
    pub fn new() -> Result<Option<Self>, CudaError> {
        if !lt_available() {
            return Ok(None);
        }
        match lt::create_handle() {
            Ok(h) => Ok(Some(Self { h })),
            Err(e) => check(Err(e), "cublasLtCreate").map(|()| None),
        }
    }
}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.h) };
    }
}

/// What an algorithm is, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgoInfo {
    pub id: i32,
    /// `cublasLtMatmulTile_t` value.
    pub tile: u32,
    pub split_k: u32,
    pub reduction: u32,
    /// `cublasLtMatmulStages_t` value.
    pub stages: u32,
    /// Workspace bytes it needs.
    pub workspace: usize,
}

impl std::fmt::Display for AlgoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuBLASLt algo {} tile {} stages {} split-k {}",
            self.id, self.tile, self.stages, self.split_k
        )?;
        if self.split_k > 1 {
            write!(f, " (reduction {})", self.reduction)?;
        }
        Ok(())
    }
}

/// One candidate algorithm of a problem.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub algo: LtAlgo,
    pub info: AlgoInfo,
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` in cuBLASLt's column-major view (as in `gemm::linear`):
/// D (n×m) = op_T(A = w as k×n) · B (= x as k×m), bf16 in, fp32 compute and scale.
pub struct LtProblem {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out: OutType,
}

// SAFETY: descriptors are plain host objects, used by their owner one thread at a time.
unsafe impl Send for LtProblem {}

impl Drop for LtProblem {
    fn drop(&mut self) {
        // SAFETY: each was created once by the matching create call (null ones skipped).
        unsafe {
            for l in [self.a, self.b, self.d] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

impl LtProblem {
    pub fn new(
        lt: &LtHandle,
        m: usize,
        n: usize,
        k: usize,
        out: OutType,
    ) -> Result<Self, CudaError> {
        // The handle's existence vouches that the library loaded with every entry point.
        let _ = lt;
        let mut p = Self {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            m,
            n,
            k,
            out,
        };
        use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
        let d_type = match out {
            OutType::Bf16 => CUDA_R_16BF,
            OutType::F32 => CUDA_R_32F,
        };
        let (m_, n_, k_) = (m as u64, n as u64, k as u64);
        p.desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(|e| check(Err(e), "cublasLtMatmulDescCreate").unwrap_err())?;
        let (ta, tb) = (
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32,
            cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32,
        );
        use sys::cublasLtMatmulDescAttributes_t::{
            CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB,
        };
        // SAFETY: desc is live; the attribute buffers are the int32 `cublasOperation_t` values.
        unsafe {
            check(
                lt::set_matmul_desc_attribute(
                    p.desc,
                    CUBLASLT_MATMUL_DESC_TRANSA,
                    (&ta as *const i32).cast(),
                    std::mem::size_of_val(&ta),
                ),
                "matmul desc TRANSA",
            )?;
            check(
                lt::set_matmul_desc_attribute(
                    p.desc,
                    CUBLASLT_MATMUL_DESC_TRANSB,
                    (&tb as *const i32).cast(),
                    std::mem::size_of_val(&tb),
                ),
                "matmul desc TRANSB",
            )?;
        }
        let layout = |ty, rows, cols, ld: usize, what| {
            lt::create_matrix_layout(ty, rows, cols, ld as i64)
                .map_err(|e| check(Err(e), what).unwrap_err())
        };
        p.a = layout(CUDA_R_16BF, k_, n_, k, "layout A")?;
        p.b = layout(CUDA_R_16BF, k_, m_, k, "layout B")?;
        p.d = layout(d_type, n_, m_, n, "layout D")?;
        Ok(p)
    }

    fn info(&self, algo: &LtAlgo, workspace: usize) -> AlgoInfo {
        let get = |attr: Config| -> u32 {
            let mut v = 0u32;
            let mut written = 0usize;
            // SAFETY: v has room for the 4-byte attributes read here.
            let s = unsafe {
                sys::cublasLtMatmulAlgoConfigGetAttribute(
                    algo,
                    attr,
                    (&mut v as *mut u32).cast(),
                    4,
                    &mut written,
                )
            };
            if s == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                v
            } else {
                0
            }
        };
        AlgoInfo {
            id: get(Config::CUBLASLT_ALGO_CONFIG_ID) as i32,
            tile: get(Config::CUBLASLT_ALGO_CONFIG_TILE_ID),
            split_k: get(Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
            reduction: get(Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
            stages: get(Config::CUBLASLT_ALGO_CONFIG_STAGES_ID),
            workspace,
        }
    }

    /// The heuristic's candidates that fit `workspace` bytes (at most `want`), then split-K
    /// variants (2, 4, 8, 16 parts, reduced in fp32) of its first few unsplit ones that
    /// `cublasLtMatmulAlgoCheck` accepts. Split algorithms that would add their parts up
    /// in the output type (bf16) get the fp32 reduction instead, or are left out.
    pub fn candidates(
        &self,
        lt: &LtHandle,
        workspace: usize,
        want: usize,
    ) -> Result<Vec<Candidate>, CudaError> {
        let pref = lt::create_matmul_pref()
            .map_err(|e| check(Err(e), "cublasLtMatmulPreferenceCreate").unwrap_err())?;
        let ws = workspace as u64;
        let mut results = vec![empty_result(); want.max(1)];
        let mut count: std::ffi::c_int = 0;
        // SAFETY: pref is live; results has room for `want` entries.
        let r = unsafe {
            check(
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws as *const u64).cast(),
                    8,
                ),
                "preference MAX_WORKSPACE_BYTES",
            )
            .and_then(|()| {
                check(
                    sys::cublasLtMatmulAlgoGetHeuristic(
                        lt.h,
                        self.desc,
                        self.a,
                        self.b,
                        self.d,
                        self.d,
                        pref,
                        results.len() as std::ffi::c_int,
                        results.as_mut_ptr(),
                        &mut count,
                    )
                    .result(),
                    "cublasLtMatmulAlgoGetHeuristic",
                )
            })
        };
        // SAFETY: created above.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        r?;
        let mut out: Vec<Candidate> = Vec::new();
        for res in &results[..(count.max(0) as usize).min(results.len())] {
            if res.state != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                || res.workspaceSize > workspace
            {
                continue;
            }
            let info = self.info(&res.algo, res.workspaceSize);
            let cand = if info.split_k > 1 && info.reduction != REDUCTION_COMPUTE_TYPE {
                // Split parts added up in bf16: the same split reduced in fp32 instead.
                self.split_variant(lt, &res.algo, info.split_k, workspace)
            } else {
                Some(Candidate {
                    algo: res.algo,
                    info,
                })
            };
            if let Some(c) = cand {
                if !out.iter().any(|o| o.algo == c.algo) {
                    out.push(c);
                }
            }
        }
        let unsplit: Vec<LtAlgo> = out
            .iter()
            .filter(|c| c.info.split_k <= 1)
            .take(4)
            .map(|c| c.algo)
            .collect();
        for base in unsplit {
            for parts in [2u32, 4, 8, 16] {
                if self.k / (parts as usize) < 256 {
                    break;
                }
                if let Some(c) = self.split_variant(lt, &base, parts, workspace) {
                    if !out.iter().any(|o| o.algo == c.algo) {
                        out.push(c);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `base` with its K dimension split in `parts`, the parts reduced in fp32 in the
    /// workspace, if `cublasLtMatmulAlgoCheck` accepts it within `workspace` bytes.
    fn split_variant(
        &self,
        lt: &LtHandle,
        base: &LtAlgo,
        parts: u32,
        workspace: usize,
    ) -> Option<Candidate> {
        let mut algo = *base;
        let ok = sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        // SAFETY: algo is a local copy; u32 attributes of 4 bytes.
        let set = unsafe {
            sys::cublasLtMatmulAlgoConfigSetAttribute(
                &mut algo,
                Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                (&parts as *const u32).cast(),
                4,
            ) == ok
                && sys::cublasLtMatmulAlgoConfigSetAttribute(
                    &mut algo,
                    Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                    (&REDUCTION_COMPUTE_TYPE as *const u32).cast(),
                    4,
                ) == ok
        };
        if !set {
            return None;
        }
        let mut res = empty_result();
        // SAFETY: the descriptors are live; res is a local out-value.
        let s = unsafe {
            sys::cublasLtMatmulAlgoCheck(
                lt.h, self.desc, self.a, self.b, self.d, self.d, &algo, &mut res,
            )
        };
        if s != ok || res.state != ok || res.workspaceSize > workspace {
            return None;
        }
        let info = self.info(&algo, res.workspaceSize);
        (info.split_k == parts && info.reduction == REDUCTION_COMPUTE_TYPE)
            .then_some(Candidate { algo, info })
    }

    /// Enqueues `y = x · wᵀ` with `algo` on `stream`, using the fixed `workspace`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        lt: &LtHandle,
        algo: &LtAlgo,
        x: DevPtr,
        w: DevPtr,
        y: DevPtr,
        workspace: (DevPtr, usize),
        stream: &CudaStream,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the caller guarantees x, w, y hold m*k, n*k, m*n elements on the
        // handle's device and the workspace is at least workspace.1 bytes; alpha and beta
        // live across the (host pointer mode) call.
        check(
            unsafe {
                lt::matmul(
                    lt.h,
                    self.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    w as *const c_void,
                    self.a,
                    x as *const c_void,
                    self.b,
                    y as *const c_void,
                    self.d,
                    y as *mut c_void,
                    self.d,
                    algo,
                    workspace.0 as *mut c_void,
                    workspace.1,
                    stream.cu_stream().cast(),
                )
            },
            "cublasLtMatmul",
        )
    }
}
