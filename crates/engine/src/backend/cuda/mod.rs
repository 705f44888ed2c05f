//! The CUDA backend: bf16 weights and activations with fp32 accumulation, GEMMs in cuBLAS
//! (the decode shapes on the cuBLASLt algorithms timed fastest at load), everything else
//! in kernels compiled at start-up by NVRTC for the device (see `kernels/engine.cu`),
//! decode steps captured as CUDA graphs per batch-size bucket. This folder is the device
//! (`device`, `green`, `lanes`, `buffer`, `kernels`, `gemm`, `gemm_tune`, `kv_cache`, `step`, `graphs`,
//! `profile`) and the `executor` that runs any CUDA model behind the `model_api` seam;
//! the models themselves live beside the portable ones (`model::qwen3_cuda`).
//!
//! The driver, cuBLAS and NVRTC are loaded at run time (cudarc `dynamic-loading`; cuBLASLt
//! by `dlopen` in `gemm_tune`, optional): the engine builds and its CPU path runs on
//! machines without CUDA, and asking for the GPU there is a clear error naming the
//! libraries searched (`device::check_libraries`).
//!
//! Design ported from vLLM's paged attention (block tables, slot mapping, per-bucket
//! graphs) and candle's "compile kernels at start-up" pattern; the CPU backend is every
//! kernel's reference (`tests/cuda_engine.rs`, feature `gpu-tests`, run on the GPU machine).

pub mod buffer;
pub mod device;
pub mod executor;
pub mod gemm;
pub mod gemm_tune;
pub mod graphs;
pub mod green;
pub mod kernels;
pub mod kv_cache;
pub mod lanes;
pub mod moe_kernels;
pub mod profile;
pub mod step;

pub use device::{check_libraries, CudaDevice, CudaError};
pub use step::CudaOptions;
