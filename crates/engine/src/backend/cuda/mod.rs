//! The CUDA backend: bf16 weights and activations with fp32 accumulation, GEMMs in cuBLAS,
//! everything else in kernels compiled at start-up by NVRTC for the device (see
//! `kernels/engine.cu`), decode steps captured as CUDA graphs per batch-size bucket.
//!
//! The driver, cuBLAS and NVRTC are loaded at run time (cudarc `dynamic-loading`): the
//! engine builds and its CPU path runs on machines without CUDA, and asking for the GPU
//! there is a clear error naming the libraries searched (`device::check_libraries`).
//!
//! Design ported from vLLM's paged attention (block tables, slot mapping, per-bucket
//! graphs) and candle's "compile kernels at start-up" pattern; the CPU backend is every
//! kernel's reference (tests in `crates/engine/tests/cuda_*.rs`, run on the GPU machine).

pub mod device;
pub mod gemm;
pub mod kernels;
pub mod load;
pub mod profile;
pub mod qwen3;
pub mod sampling;
pub mod shape;
pub mod weights;

pub use device::{check_libraries, CudaDevice, CudaError};
pub use load::{load, CudaLoaded};
pub use qwen3::{CudaOptions, CudaQwen3, WeightSource};
pub use shape::Qwen3Shape;
