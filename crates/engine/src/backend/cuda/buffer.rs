//! Device memory of the CUDA path: one allocation per buffer, kept for the model's life so
//! that its address can be baked into captured CUDA graphs; host <-> device copies on the
//! engine's stream.

use anyhow::anyhow;
use cudarc::driver::{CudaSlice, DevicePtr};

use super::device::CudaDevice;
use super::kernels::DevPtr;

/// One device buffer and its address.
pub struct DevBuf {
    _mem: CudaSlice<u8>,
    pub ptr: DevPtr,
    pub bytes: usize,
}

impl DevBuf {
    /// Allocates `bytes` (uninitialised) on the device's stream.
    pub fn alloc(dev: &CudaDevice, bytes: usize) -> anyhow::Result<Self> {
        let bytes = bytes.max(16);
        // SAFETY: every buffer is written before it is read (weights filled/uploaded,
        // activations produced by the step that reads them).
        let mem: CudaSlice<u8> = unsafe { dev.stream.alloc(bytes) }
            .map_err(|e| anyhow!("CUDA out of memory allocating {} MiB: {e}", bytes >> 20))?;
        let ptr = mem.device_ptr(&dev.stream).0;
        Ok(Self {
            _mem: mem,
            ptr,
            bytes,
        })
    }

    /// Allocates and copies `data` in.
    pub fn upload<T: Copy>(dev: &CudaDevice, data: &[T]) -> anyhow::Result<Self> {
        let buf = Self::alloc(dev, std::mem::size_of_val(data))?;
        buf.write_at(dev, 0, data)?;
        Ok(buf)
    }

    /// Copies `data` in at byte `offset` (a piece of a weight assembled on the device, such
    /// as one expert of a layer's stacked experts).
    pub fn write_at<T: Copy>(
        &self,
        dev: &CudaDevice,
        offset: usize,
        data: &[T],
    ) -> anyhow::Result<()> {
        let n = std::mem::size_of_val(data);
        if offset + n > self.bytes {
            anyhow::bail!(
                "writing {n} bytes at {offset} into a buffer of {}",
                self.bytes
            );
        }
        // SAFETY: the range is inside the buffer (checked); pageable copies have read
        // `data` when they return.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                self.ptr + offset as u64,
                data,
                dev.stream.cu_stream(),
            )
        }
        .map_err(|e| anyhow!("copying weights to the GPU: {e}"))
    }
}

/// Copies `n` elements at `ptr` to the host, after the stream's queued work.
pub fn download<T: Copy + Default>(
    dev: &CudaDevice,
    ptr: DevPtr,
    n: usize,
) -> anyhow::Result<Vec<T>> {
    let mut v = vec![T::default(); n];
    // SAFETY: the caller names a device range of at least n elements.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut v, ptr, dev.stream.cu_stream()) }
        .map_err(|e| anyhow!("copying results from the GPU: {e}"))?;
    synchronize(dev)?;
    Ok(v)
}

/// Waits for the stream's queued work; a failed kernel surfaces here.
pub fn synchronize(dev: &CudaDevice) -> anyhow::Result<()> {
    dev.stream
        .synchronize()
        .map_err(|e| anyhow!("CUDA step failed: {e}"))
}
