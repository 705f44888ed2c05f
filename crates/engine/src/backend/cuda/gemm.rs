//! bf16 GEMMs through cuBLAS (`cublasGemmEx`, fp32 compute), in the row-major layout of
//! Hugging Face `Linear` weights: `y[T, N] = x[T, K] · w[N, K]ᵀ`. In cuBLAS's column-major
//! view that is `yᶜ (N×T) = wᶜᵀ · xᶜ`, i.e. op(A) = T on the weight, no transposes copied.
//! cuBLAS is given a fixed workspace so that GEMMs can be captured into CUDA graphs.

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::cublas::CudaBlas;

use super::device::CudaError;
use super::kernels::DevPtr;

/// Output element type of a GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
