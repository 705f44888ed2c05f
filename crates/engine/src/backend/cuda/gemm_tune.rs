//! cuBLASLt for the decode GEMMs: one problem (matmul descriptor and matrix layouts) per
//! (M, N, K, output type), the candidate algorithms cuBLASLt's heuristic offers for it
//! (plus split-K variants of its first few, checked by `cublasLtMatmulAlgoCheck`), each
//! timed with CUDA events over the real weights; [`super::gemm::Gemms`] keeps the fastest.
//!
//! cuBLASLt is opened at run time with `dlopen` (the engine's cudarc build carries cuBLAS
//! and not its `cublaslt` bindings), by the same file names cudarc tries for its other
//! libraries; where it is missing, [`LtApi::get`] is `None` and every GEMM stays on
//! `cublasGemmEx`. Only the dozen entry points used here are bound, with the types and
//! enum values of `cublasLt.h` (CUDA 12/13).

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::OnceLock;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::driver::CudaStream;

use super::device::CudaError;
use super::gemm::OutType;
use super::kernels::DevPtr;

type Status = c_int;
type Opaque = *mut c_void;

/// `cublasLtMatmulAlgo_t`: an opaque algorithm configuration.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LtAlgo {
    data: [u64; 8],
}

/// `cublasLtMatmulHeuristicResult_t`.
#[repr(C)]
#[derive(Clone, Copy)]
struct HeuristicResult {
    algo: LtAlgo,
    workspace_size: usize,
    state: Status,
    waves_count: f32,
    reserved: [c_int; 4],
}

impl Default for HeuristicResult {
    fn default() -> Self {
        Self {
            algo: LtAlgo { data: [0; 8] },
            workspace_size: 0,
            state: 0,
            waves_count: 0.0,
            reserved: [0; 4],
        }
    }
}

// cublasLt.h / library_types.h values.
const CUBLAS_COMPUTE_32F: c_int = 68;
const CUDA_R_32F: c_int = 0;
const CUDA_R_16BF: c_int = 14;
const CUBLAS_OP_N: i32 = 0;
const CUBLAS_OP_T: i32 = 1;
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
const PREF_MAX_WORKSPACE_BYTES: c_int = 1;
const CONFIG_ID: c_int = 0;
const CONFIG_TILE_ID: c_int = 1;
const CONFIG_SPLITK_NUM: c_int = 2;
const CONFIG_REDUCTION_SCHEME: c_int = 3;
const CONFIG_STAGES_ID: c_int = 6;
/// Split-K partial sums reduced out of place in the compute type (fp32), in the
/// workspace; the other schemes add the parts up in the output type (bf16).
const REDUCTION_COMPUTE_TYPE: u32 = 2;

#[cfg_attr(target_os = "linux", link(name = "dl"))]
extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;

/// A symbol's address as the function pointer type `F`.
///
/// # Safety
/// `F` must be a function pointer type matching the symbol's C signature.
unsafe fn fn_ptr<F: Copy>(p: *mut c_void) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size; the caller vouches for the signature.
    unsafe { std::mem::transmute_copy(&p) }
}

/// The cuBLASLt entry points used here.
pub struct LtApi {
    create: unsafe extern "C" fn(*mut Opaque) -> Status,
    destroy: unsafe extern "C" fn(Opaque) -> Status,
    desc_create: unsafe extern "C" fn(*mut Opaque, c_int, c_int) -> Status,
    desc_destroy: unsafe extern "C" fn(Opaque) -> Status,
    desc_set: unsafe extern "C" fn(Opaque, c_int, *const c_void, usize) -> Status,
    layout_create: unsafe extern "C" fn(*mut Opaque, c_int, u64, u64, i64) -> Status,
    layout_destroy: unsafe extern "C" fn(Opaque) -> Status,
    pref_create: unsafe extern "C" fn(*mut Opaque) -> Status,
    pref_destroy: unsafe extern "C" fn(Opaque) -> Status,
    pref_set: unsafe extern "C" fn(Opaque, c_int, *const c_void, usize) -> Status,
    #[allow(clippy::type_complexity)]
    heuristic: unsafe extern "C" fn(
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        c_int,
        *mut HeuristicResult,
        *mut c_int,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    matmul: unsafe extern "C" fn(
        Opaque,
        Opaque,
        *const c_void,
        *const c_void,
        Opaque,
        *const c_void,
        Opaque,
        *const c_void,
        *const c_void,
        Opaque,
        *mut c_void,
        Opaque,
        *const LtAlgo,
        *mut c_void,
        usize,
        *mut c_void,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    algo_check: unsafe extern "C" fn(
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        Opaque,
        *const LtAlgo,
        *mut HeuristicResult,
    ) -> Status,
    config_set: unsafe extern "C" fn(*mut LtAlgo, c_int, *const c_void, usize) -> Status,
    config_get:
        unsafe extern "C" fn(*const LtAlgo, c_int, *mut c_void, usize, *mut usize) -> Status,
}

/// Turns a cuBLASLt status into the backend's error.
fn check(status: Status, what: &'static str) -> Result<(), CudaError> {
    use cublasStatus_t::*;
    let s = match status {
        0 => return Ok(()),
        1 => CUBLAS_STATUS_NOT_INITIALIZED,
        3 => CUBLAS_STATUS_ALLOC_FAILED,
        7 => CUBLAS_STATUS_INVALID_VALUE,
        8 => CUBLAS_STATUS_ARCH_MISMATCH,
        11 => CUBLAS_STATUS_MAPPING_ERROR,
        13 => CUBLAS_STATUS_EXECUTION_FAILED,
        15 => CUBLAS_STATUS_NOT_SUPPORTED,
        16 => CUBLAS_STATUS_LICENSE_ERROR,
        _ => CUBLAS_STATUS_INTERNAL_ERROR,
    };
    Err(CudaError::Blas {
        what,
        source: CublasError(s),
    })
}

impl LtApi {
    /// The library, loaded on first use; `None` where no candidate file name loads or a
    /// symbol is missing.
    pub fn get() -> Option<&'static LtApi> {
        static API: OnceLock<Option<LtApi>> = OnceLock::new();
        API.get_or_init(Self::load).as_ref()
    }

    fn load() -> Option<LtApi> {
        let lib = cudarc::get_lib_name_candidates("cublasLt")
            .into_iter()
            .find_map(|name| {
                let c = CString::new(name).ok()?;
                // SAFETY: dlopen with a NUL-terminated name; the handle is never closed.
                let h = unsafe { dlopen(c.as_ptr(), RTLD_NOW) };
                (!h.is_null()).then_some(h)
            })?;
        let sym = |name: &str| -> Option<*mut c_void> {
            let c = CString::new(name).ok()?;
            // SAFETY: lib is a live handle from dlopen.
            let p = unsafe { dlsym(lib, c.as_ptr()) };
            (!p.is_null()).then_some(p)
        };
        macro_rules! f {
            ($name:literal) => {
                // SAFETY: the symbol is cuBLASLt's function of that name, whose C
                // signature is the field's type (cublasLt.h).
                unsafe { fn_ptr(sym($name)?) }
            };
        }
        Some(LtApi {
            create: f!("cublasLtCreate"),
            destroy: f!("cublasLtDestroy"),
            desc_create: f!("cublasLtMatmulDescCreate"),
            desc_destroy: f!("cublasLtMatmulDescDestroy"),
            desc_set: f!("cublasLtMatmulDescSetAttribute"),
            layout_create: f!("cublasLtMatrixLayoutCreate"),
            layout_destroy: f!("cublasLtMatrixLayoutDestroy"),
            pref_create: f!("cublasLtMatmulPreferenceCreate"),
            pref_destroy: f!("cublasLtMatmulPreferenceDestroy"),
            pref_set: f!("cublasLtMatmulPreferenceSetAttribute"),
            heuristic: f!("cublasLtMatmulAlgoGetHeuristic"),
            matmul: f!("cublasLtMatmul"),
            algo_check: f!("cublasLtMatmulAlgoCheck"),
            config_set: f!("cublasLtMatmulAlgoConfigSetAttribute"),
            config_get: f!("cublasLtMatmulAlgoConfigGetAttribute"),
        })
    }
}

/// A cuBLASLt handle (one per engine device).
pub struct LtHandle {
    api: &'static LtApi,
    h: Opaque,
}

// SAFETY: the handle is used by its owner (one executor, one thread at a time).
unsafe impl Send for LtHandle {}

impl LtHandle {
    /// Creates a handle on the current context; `None` without cuBLASLt.
    pub fn new() -> Result<Option<Self>, CudaError> {
        let Some(api) = LtApi::get() else {
            return Ok(None);
        };
        let mut h: Opaque = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { (api.create)(&mut h) }, "cublasLtCreate")?;
        Ok(Some(Self { api, h }))
    }
}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtCreate, destroyed once.
        unsafe { (self.api.destroy)(self.h) };
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
    api: &'static LtApi,
    desc: Opaque,
    a: Opaque,
    b: Opaque,
    d: Opaque,
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
                    (self.api.layout_destroy)(l);
                }
            }
            if !self.desc.is_null() {
                (self.api.desc_destroy)(self.desc);
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
        let api = lt.api;
        let mut p = Self {
            api,
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            m,
            n,
            k,
            out,
        };
        let d_type = match out {
            OutType::Bf16 => CUDA_R_16BF,
            OutType::F32 => CUDA_R_32F,
        };
        let (m_, n_, k_) = (m as u64, n as u64, k as u64);
        // SAFETY: out-pointers to fields; attribute buffers are i32 of the stated size.
        unsafe {
            check(
                (api.desc_create)(&mut p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                "cublasLtMatmulDescCreate",
            )?;
            let (ta, tb) = (CUBLAS_OP_T, CUBLAS_OP_N);
            check(
                (api.desc_set)(p.desc, DESC_TRANSA, (&ta as *const i32).cast(), 4),
                "matmul desc TRANSA",
            )?;
            check(
                (api.desc_set)(p.desc, DESC_TRANSB, (&tb as *const i32).cast(), 4),
                "matmul desc TRANSB",
            )?;
            check(
                (api.layout_create)(&mut p.a, CUDA_R_16BF, k_, n_, k as i64),
                "layout A",
            )?;
            check(
                (api.layout_create)(&mut p.b, CUDA_R_16BF, k_, m_, k as i64),
                "layout B",
            )?;
            check(
                (api.layout_create)(&mut p.d, d_type, n_, m_, n as i64),
                "layout D",
            )?;
        }
        Ok(p)
    }

    fn info(&self, algo: &LtAlgo, workspace: usize) -> AlgoInfo {
        let get = |attr: c_int, bytes: usize| -> u64 {
            let mut v = 0u64;
            let mut written = 0usize;
            // SAFETY: v has room for 8 bytes; the attribute is at most that wide.
            let s = unsafe {
                (self.api.config_get)(algo, attr, (&mut v as *mut u64).cast(), bytes, &mut written)
            };
            if s == 0 {
                v
            } else {
                0
            }
        };
        AlgoInfo {
            id: get(CONFIG_ID, 4) as u32 as i32,
            tile: get(CONFIG_TILE_ID, 4) as u32,
            split_k: get(CONFIG_SPLITK_NUM, 4) as u32,
            reduction: get(CONFIG_REDUCTION_SCHEME, 4) as u32,
            stages: get(CONFIG_STAGES_ID, 4) as u32,
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
        let api = self.api;
        let mut pref: Opaque = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; destroyed below.
        check(
            unsafe { (api.pref_create)(&mut pref) },
            "cublasLtMatmulPreferenceCreate",
        )?;
        let ws = workspace as u64;
        let mut results = vec![HeuristicResult::default(); want.max(1)];
        let mut count: c_int = 0;
        // SAFETY: pref is live; results has room for `want` entries.
        let r = unsafe {
            check(
                (api.pref_set)(
                    pref,
                    PREF_MAX_WORKSPACE_BYTES,
                    (&ws as *const u64).cast(),
                    8,
                ),
                "preference MAX_WORKSPACE_BYTES",
            )
            .and_then(|()| {
                check(
                    (api.heuristic)(
                        lt.h,
                        self.desc,
                        self.a,
                        self.b,
                        self.d,
                        self.d,
                        pref,
                        results.len() as c_int,
                        results.as_mut_ptr(),
                        &mut count,
                    ),
                    "cublasLtMatmulAlgoGetHeuristic",
                )
            })
        };
        // SAFETY: created above.
        unsafe { (api.pref_destroy)(pref) };
        r?;
        let mut out: Vec<Candidate> = Vec::new();
        for res in &results[..(count.max(0) as usize).min(results.len())] {
            if res.state != 0 || res.workspace_size > workspace {
                continue;
            }
            let info = self.info(&res.algo, res.workspace_size);
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
        let api = self.api;
        let mut algo = *base;
        // SAFETY: algo is a local copy; u32 attributes of 4 bytes.
        let set = unsafe {
            (api.config_set)(
                &mut algo,
                CONFIG_SPLITK_NUM,
                (&parts as *const u32).cast(),
                4,
            ) == 0
                && (api.config_set)(
                    &mut algo,
                    CONFIG_REDUCTION_SCHEME,
                    (&REDUCTION_COMPUTE_TYPE as *const u32).cast(),
                    4,
                ) == 0
        };
        if !set {
            return None;
        }
        let mut res = HeuristicResult::default();
        // SAFETY: the descriptors are live; res is a local out-value.
        let s = unsafe {
            (api.algo_check)(
                lt.h, self.desc, self.a, self.b, self.d, self.d, &algo, &mut res,
            )
        };
        if s != 0 || res.state != 0 || res.workspace_size > workspace {
            return None;
        }
        let info = self.info(&algo, res.workspace_size);
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
                (self.api.matmul)(
                    lt.h,
                    self.desc,
                    (&alpha as *const f32).cast(),
                    w as *const c_void,
                    self.a,
                    x as *const c_void,
                    self.b,
                    (&beta as *const f32).cast(),
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
