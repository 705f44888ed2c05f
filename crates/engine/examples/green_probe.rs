//! Do CUDA green contexts confine a kernel to their SMs on this machine, and inside an MPS
//! client? (issue 18's third lever, `docs/design/green-contexts.md`.) For each SM count
//! asked (the arguments, default `16 32 66`), it splits the device's SMs with
//! `cuDevSmResourceSplitByCount`, makes a green context of the group and a stream on it,
//! and launches a kernel of many long-running blocks there: each block records the SM it
//! ran on (`%smid`). The same kernel on an ordinary stream of the primary context is the
//! reference. Prints one `GREEN` line per run: SMs in the group, distinct SMs the kernel
//! used, and its time. Run it alone, and inside an MPS client (with and without
//! `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`): `scripts/gpu/green-probe.sh`.
//!
//! `cargo run --release -p engine --example green_probe -- [SMS...]`

use std::collections::BTreeSet;
use std::ffi::CString;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use cudarc::driver::sys::{self, CUresult};
use cudarc::nvrtc::compile_ptx;

/// Each block spins for about `spin` clock cycles (so that blocks overlap and spread over
/// every SM they may use), then writes its SM id.
const KERNEL: &str = r#"
extern "C" __global__ void where_am_i(int* out, long long spin) {
    long long t0 = clock64();
    while (clock64() - t0 < spin) { }
    if (threadIdx.x == 0) {
        unsigned s;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
        out[blockIdx.x] = (int)s;
    }
}
"#;

const BLOCKS: u32 = 4096;
const SPIN: i64 = 200_000;

fn ok(r: CUresult, what: &str) -> anyhow::Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        bail!("{what}: {r:?}")
    }
}

/// Loads the kernel into the current context and runs it on `stream`: the distinct SMs
/// its blocks ran on, and the seconds it took.
unsafe fn run_on(stream: sys::CUstream, ptx: &CString) -> anyhow::Result<(usize, f64)> {
    let mut module = std::ptr::null_mut();
    ok(
        sys::cuModuleLoadData(&mut module, ptx.as_ptr().cast()),
        "cuModuleLoadData",
    )?;
    let name = CString::new("where_am_i")?;
    let mut func = std::ptr::null_mut();
    ok(
        sys::cuModuleGetFunction(&mut func, module, name.as_ptr()),
        "cuModuleGetFunction",
    )?;
    let mut out: sys::CUdeviceptr = 0;
    ok(
        sys::cuMemAlloc_v2(&mut out, BLOCKS as usize * 4),
        "cuMemAlloc",
    )?;
    let spin = SPIN;
    let mut args = [
        (&mut out as *mut sys::CUdeviceptr).cast::<std::ffi::c_void>(),
        (&spin as *const i64).cast_mut().cast::<std::ffi::c_void>(),
    ];
    let t = Instant::now();
    ok(
        sys::cuLaunchKernel(
            func,
            BLOCKS,
            1,
            1,
            32,
            1,
            1,
            0,
            stream,
            args.as_mut_ptr(),
            std::ptr::null_mut(),
        ),
        "cuLaunchKernel",
    )?;
    ok(sys::cuStreamSynchronize(stream), "cuStreamSynchronize")?;
    let secs = t.elapsed().as_secs_f64();
    let mut host = vec![0i32; BLOCKS as usize];
    ok(
        sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), out, host.len() * 4),
        "cuMemcpyDtoH",
    )?;
    ok(sys::cuMemFree_v2(out), "cuMemFree")?;
    ok(sys::cuModuleUnload(module), "cuModuleUnload")?;
    let sms: BTreeSet<i32> = host.into_iter().collect();
    Ok((sms.len(), secs))
}

fn main() -> anyhow::Result<()> {
    let asked: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().map_err(|_| anyhow!("{a:?}: an SM count")))
        .collect::<anyhow::Result<_>>()?;
    let asked = if asked.is_empty() {
        vec![16, 32, 66]
    } else {
        asked
    };
    let mps = std::env::var("CUDA_MPS_PIPE_DIRECTORY").is_ok();
    let pct = std::env::var("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE").unwrap_or_else(|_| "-".into());
    let label = format!(
        "mps {}, active thread % {pct}",
        if mps { "on" } else { "off" }
    );
    let ptx = compile_ptx(KERNEL).context("compiling the probe kernel")?;
    let ptx = CString::new(ptx.to_src())?;
    // SAFETY: plain driver calls on handles this function creates and checks.
    unsafe {
        // Missing green-context symbols would panic inside cudarc: ask the driver first.
        let mut version = 0;
        ok(sys::cuInit(0), "cuInit")?;
        ok(sys::cuDriverGetVersion(&mut version), "cuDriverGetVersion")?;
        if version < 12050 {
            bail!("driver API {version}: green-context streams need 12.5");
        }
        let mut dev = 0;
        ok(sys::cuDeviceGet(&mut dev, 0), "cuDeviceGet")?;
        let mut primary = std::ptr::null_mut();
        ok(
            sys::cuDevicePrimaryCtxRetain(&mut primary, dev),
            "cuDevicePrimaryCtxRetain",
        )?;
        ok(sys::cuCtxSetCurrent(primary), "cuCtxSetCurrent")?;
        let mut stream = std::ptr::null_mut();
        ok(
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            ),
            "cuStreamCreate",
        )?;
        let (used, secs) = run_on(stream, &ptx)?;
        println!(
            "GREEN [{label}] primary context: {BLOCKS} blocks ran on {used} distinct SMs in {:.1} ms",
            secs * 1e3
        );
        let mut full: sys::CUdevResource = std::mem::zeroed();
        ok(
            sys::cuDeviceGetDevResource(
                dev,
                &mut full,
                sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
            ),
            "cuDeviceGetDevResource",
        )?;
        let sm = full.__bindgen_anon_1.sm;
        println!(
            "GREEN [{label}] device resource: {} SMs, min partition {}, alignment {}",
            sm.smCount, sm.minSmPartitionSize, sm.smCoscheduledAlignment
        );
        for &want in &asked {
            let mut group: sys::CUdevResource = std::mem::zeroed();
            let mut rest: sys::CUdevResource = std::mem::zeroed();
            let mut groups = 1u32;
            let r = sys::cuDevSmResourceSplitByCount(
                &mut group,
                &mut groups,
                &full,
                &mut rest,
                0,
                want,
            );
            if r != CUresult::CUDA_SUCCESS {
                println!("GREEN [{label}] asked {want} SMs: split failed: {r:?}");
                continue;
            }
            let mut desc = std::ptr::null_mut();
            ok(
                sys::cuDevResourceGenerateDesc(&mut desc, &mut group, 1),
                "cuDevResourceGenerateDesc",
            )?;
            let mut green = std::ptr::null_mut();
            let r = sys::cuGreenCtxCreate(
                &mut green,
                desc,
                dev,
                sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32,
            );
            if r != CUresult::CUDA_SUCCESS {
                println!("GREEN [{label}] asked {want} SMs: cuGreenCtxCreate failed: {r:?}");
                continue;
            }
            let mut gctx = std::ptr::null_mut();
            ok(
                sys::cuCtxFromGreenCtx(&mut gctx, green),
                "cuCtxFromGreenCtx",
            )?;
            ok(sys::cuCtxSetCurrent(gctx), "cuCtxSetCurrent (green)")?;
            let mut gstream = std::ptr::null_mut();
            ok(
                sys::cuGreenCtxStreamCreate(
                    &mut gstream,
                    green,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                    0,
                ),
                "cuGreenCtxStreamCreate",
            )?;
            let (used, secs) = run_on(gstream, &ptx)?;
            println!(
                "GREEN [{label}] asked {want} SMs, group of {}: {BLOCKS} blocks ran on {used} distinct SMs in {:.1} ms (cuGreenCtxStreamCreate)",
                group.__bindgen_anon_1.sm.smCount,
                secs * 1e3
            );
            ok(sys::cuStreamDestroy_v2(gstream), "cuStreamDestroy")?;
            // The engine's way (`--sm-partition`): an ordinary stream made while the green
            // context's CUcontext is current.
            let mut cstream = std::ptr::null_mut();
            ok(
                sys::cuStreamCreate(
                    &mut cstream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                ),
                "cuStreamCreate (green current)",
            )?;
            let (used, secs) = run_on(cstream, &ptx)?;
            println!(
                "GREEN [{label}] asked {want} SMs, group of {}: {BLOCKS} blocks ran on {used} distinct SMs in {:.1} ms (cuStreamCreate in the green context)",
                group.__bindgen_anon_1.sm.smCount,
                secs * 1e3
            );
            ok(sys::cuStreamDestroy_v2(cstream), "cuStreamDestroy")?;
            ok(sys::cuCtxSetCurrent(primary), "cuCtxSetCurrent (primary)")?;
            ok(sys::cuGreenCtxDestroy(green), "cuGreenCtxDestroy")?;
        }
        ok(sys::cuStreamDestroy_v2(stream), "cuStreamDestroy")?;
        ok(
            sys::cuDevicePrimaryCtxRelease_v2(dev),
            "cuDevicePrimaryCtxRelease",
        )?;
    }
    Ok(())
}
