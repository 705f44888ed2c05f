//! Opening a GPU: the driver, cuBLAS and NVRTC are loaded at run time (cudarc's dynamic
//! loading), so the binary builds and runs on machines without CUDA. cudarc panics when a
//! library is missing; we look for each one first and turn its absence into an error that
//! names the file names searched, before cudarc ever touches it.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream};

use super::green::SmPartition;

/// Why the CUDA backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no NVIDIA driver/GPU found: the CUDA library `{lib}` could not be loaded (searched: {searched}); \
         install the NVIDIA driver / CUDA toolkit or add its folder to LD_LIBRARY_PATH"
    )]
    MissingLibrary { lib: &'static str, searched: String },
    #[error("CUDA device {ordinal} not available: {source}")]
    NoDevice {
        ordinal: usize,
        source: cudarc::driver::DriverError,
    },
    #[error("CUDA driver call failed ({what}): {source}")]
    Driver {
        what: &'static str,
        source: cudarc::driver::DriverError,
    },
    #[error("cuBLAS failed ({what}): {source:?}")]
    Blas {
        what: &'static str,
        source: cudarc::cublas::result::CublasError,
    },
    #[error("NVRTC could not compile the engine kernels for {arch}: {message}")]
    Compile { arch: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

/// A library the backend needs, and the function telling whether it can be loaded.
struct NeededLib {
    name: &'static str,
    present: unsafe fn() -> bool,
}

const NEEDED: [NeededLib; 3] = [
    NeededLib {
        name: "cuda",
        present: cudarc::driver::sys::is_culib_present,
    },
    NeededLib {
        name: "cublas",
        present: cudarc::cublas::sys::is_culib_present,
    },
    NeededLib {
        name: "nvrtc",
        present: cudarc::nvrtc::sys::is_culib_present,
    },
];

/// Checks that the driver, cuBLAS and NVRTC can be loaded; the error names the first one
/// missing and every file name tried for it.
pub fn check_libraries() -> Result<(), CudaError> {
    for lib in &NEEDED {
        // SAFETY: only tries dlopen on candidate names; loads nothing into cudarc's state.
        if !unsafe { (lib.present)() } {
            return Err(CudaError::MissingLibrary {
                lib: lib.name,
                searched: cudarc::get_lib_name_candidates(lib.name).join(", "),
            });
        }
    }
    Ok(())
}

/// One GPU opened for the engine: context, the stream every kernel and GEMM runs on,
/// and a cuBLAS handle bound to that stream.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// SMs of the green context the kernels are confined to (`--sm-partition`), if any.
    pub partition: Option<u32>,
    /// e.g. `sm_90`.
    pub arch: String,
    pub name: String,
    pub total_memory: usize,
}

impl CudaDevice {
    /// Opens device `ordinal`. Uses a non-default stream and turns cudarc's per-buffer
    /// event tracking off: CUDA graph capture fails on the default stream and, with event
    /// tracking on, with "stream capture isolation" (seen on the H100). The engine orders
    /// all its work on this one stream, so the tracking is not needed.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        Self::open_with(ordinal, None)
    }

    /// [`Self::open`], with every kernel of this device confined to a partition of at
    /// least `sm_partition` SMs (a green context, [`SmPartition`]) when given.
    pub fn open_with(ordinal: usize, sm_partition: Option<u32>) -> Result<Self, CudaError> {
        check_libraries()?;
        let primary =
            CudaContext::new(ordinal).map_err(|source| CudaError::NoDevice { ordinal, source })?;
        let (ctx, partition) = match sm_partition {
            None => (primary, None),
            Some(want) => {
                let p = SmPartition::create(ordinal, &primary, want)?;
                tracing::info!(
                    "cuda:{ordinal}: kernels confined to a green context of {} SMs (asked {want})",
                    p.sms
                );
                (p.ctx.clone(), Some(p.sms))
            }
        };
        // SAFETY: called before any buffer or stream of this context exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|source| CudaError::Driver {
            what: "creating a stream",
            source,
        })?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|source| CudaError::Driver {
                what: "reading the compute capability",
                source,
            })?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let total_memory = ctx.total_mem().map_err(|source| CudaError::Driver {
            what: "reading the memory size",
            source,
        })?;
        let blas = CudaBlas::new(stream.clone()).map_err(|source| CudaError::Blas {
            what: "creating a handle",
            source,
        })?;
        Ok(Self {
            ctx,
            stream,
            blas,
            partition,
            arch: format!("sm_{major}{minor}"),
            name,
            total_memory,
        })
    }

    /// Multiprocessors the kernels may use: the partition's, else the device's.
    pub fn sm_count(&self) -> Result<usize, CudaError> {
        if let Some(p) = self.partition {
            return Ok(p as usize);
        }
        let n = self
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|source| CudaError::Driver {
                what: "reading the multiprocessor count",
                source,
            })?;
        Ok(n.max(1) as usize)
    }

    /// Free and total device memory in bytes, as the driver sees them now.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.mem_get_info().map_err(|source| CudaError::Driver {
            what: "reading free memory",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the NVIDIA driver (CI, this dev box) opening a device must be
    /// a clear error naming what was searched, never a panic. On a GPU machine it opens.
    #[test]
    fn open_without_driver_is_a_clear_error() {
        match CudaDevice::open(0) {
            Ok(dev) => assert!(dev.arch.starts_with("sm_")),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("no NVIDIA driver/GPU found") || msg.contains("not available"),
                    "{msg}"
                );
                if let CudaError::MissingLibrary { searched, .. } = &e {
                    assert!(searched.contains(".so"), "{msg}");
                }
            }
        }
    }
}
