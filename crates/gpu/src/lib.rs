//! The `gpu` crate: everything `colocate` needs to know about and do with an NVIDIA GPU.
//!
//! - [`info()`]: what GPUs there are (name, memory, SMs, compute mode, MIG, GPM, MPS);
//! - [`telemetry`]: a background sampler of NVML GPM counters (the DCGM 1002-1005
//!   equivalents the seed studies used) with window summaries for the lab;
//! - [`mps`]: the MPS control daemon with private folders, client environments, status,
//!   fault events parsed from its logs, and a stop that never leaves a daemon behind;
//! - [`mig`]: listing MIG instances and the environment that maps an engine onto one;
//! - [`catalogue`]: published specs of common data-centre GPUs (for plans and limits).
//!
//! NVML is loaded at run time (`libnvidia-ml.so.1`), so this crate builds and its unit
//! tests pass on machines without a driver; there every call that needs the GPU returns
//! an error starting with [`NO_GPU`].
pub mod catalogue;
pub mod cli;
mod info;
pub mod mig;
pub mod mps;
mod nvml;
pub mod telemetry;

pub use info::{info, GpuInfo, MigInstance};
pub use nvml::NO_GPU;
