//! An SM partition for the whole engine: a CUDA green context of some of the GPU's SMs,
//! made at start (`--sm-partition N`) so that every kernel the engine launches runs on
//! those SMs and no others, while another process beside it (an MPS client without a
//! thread limit, or alone) keeps every SM. Measured on the H200 (2026-12-02,
//! `docs/design/green-contexts.md`): green contexts confine kernels inside an MPS client
//! without `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, and cannot be made with it.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::CudaContext;

use super::device::CudaError;

/// The context of a green context of `sms` SMs (the request rounded up to the device's
/// granularity). Held for the process's life: cudarc would destroy a non-primary context
/// with `cuCtxDestroy`, which must not run on a green context, so it is never dropped.
pub struct SmPartition {
    pub sms: u32,
    pub ctx: Arc<CudaContext>,
}

fn check(r: CUresult, what: &'static str) -> Result<(), CudaError> {
    r.result()
        .map_err(|source| CudaError::Driver { what, source })
}

impl SmPartition {
    /// A green context of at least `want` SMs of device `ordinal` (whose primary context
    /// `primary` is open). Fails with the driver's reason when the device cannot be split
    /// so, e.g. inside an MPS client with a thread limit, or above the SMs it has.
    pub fn create(
        ordinal: usize,
        primary: &Arc<CudaContext>,
        want: u32,
    ) -> Result<Self, CudaError> {
        primary
            .bind_to_thread()
            .map_err(|source| CudaError::Driver {
                what: "making the primary context current",
                source,
            })?;
        // SAFETY: driver calls on zeroed out-structs and handles made here; the device is
        // the primary context's.
        unsafe {
            let mut version = 0;
            check(
                sys::cuDriverGetVersion(&mut version),
                "reading the driver version",
            )?;
            if version < 12040 {
                return Err(CudaError::Unsupported(format!(
                    "--sm-partition needs green contexts (CUDA 12.4 driver API); this driver has {version}"
                )));
            }
            let dev = primary.cu_device();
            let mut full: sys::CUdevResource = std::mem::zeroed();
            check(
                sys::cuDeviceGetDevResource(
                    dev,
                    &mut full,
                    sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
                ),
                "reading the device's SMs",
            )?;
            let have = full.__bindgen_anon_1.sm.smCount;
            if want > have {
                return Err(CudaError::Unsupported(format!(
                    "--sm-partition {want}: this GPU (or this MPS client) has {have} SMs"
                )));
            }
            let mut group: sys::CUdevResource = std::mem::zeroed();
            let mut rest: sys::CUdevResource = std::mem::zeroed();
            let mut groups = 1u32;
            let split = sys::cuDevSmResourceSplitByCount(
                &mut group,
                &mut groups,
                &full,
                &mut rest,
                0,
                want,
            );
            if split != CUresult::CUDA_SUCCESS || groups != 1 {
                let mps = std::env::var("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE").is_ok();
                return Err(CudaError::Unsupported(format!(
                    "--sm-partition {want}: the driver cannot split {have} SMs so ({split:?}){}",
                    if mps {
                        "; inside an MPS client with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE set no split succeeds (leave the thread limit unset)"
                    } else {
                        ""
                    }
                )));
            }
            let mut desc = std::ptr::null_mut();
            check(
                sys::cuDevResourceGenerateDesc(&mut desc, &mut group, 1),
                "describing the SM partition",
            )?;
            let mut green = std::ptr::null_mut();
            check(
                sys::cuGreenCtxCreate(
                    &mut green,
                    desc,
                    dev,
                    sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32,
                ),
                "creating the green context",
            )?;
            let mut raw = std::ptr::null_mut();
            check(
                sys::cuCtxFromGreenCtx(&mut raw, green),
                "opening the green context",
            )?;
            let ctx = CudaContext::from_raw_context(ordinal, dev, raw).map_err(|source| {
                CudaError::Driver {
                    what: "wrapping the green context",
                    source,
                }
            })?;
            // Never destroyed through cudarc (see the type's doc).
            std::mem::forget(ctx.clone());
            Ok(Self {
                sms: group.__bindgen_anon_1.sm.smCount,
                ctx,
            })
        }
    }
}
