//! The paged KV cache on the GPU (bf16, all layers' K and V in one allocation) and the
//! address arithmetic the attention kernels are given: a layer's K, its V, the block size.

use anyhow::Context as _;

use super::buffer::DevBuf;
use super::device::CudaDevice;
use super::kernels::DevPtr;

/// Bytes per K or V element.
const BF16: usize = 2;

/// The KV cache: per layer, K of every slot, then V of every slot; a slot is
/// `block * block_size + offset` and holds `kv_heads * head_dim` values.
pub struct KvCache {
    mem: DevBuf,
    /// Bytes of one layer's K (V follows it).
    layer_bytes: usize,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for `layers` layers.
    pub fn alloc(
        dev: &CudaDevice,
        layers: usize,
        kv_width: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> anyhow::Result<Self> {
        let layer_bytes = num_blocks * block_size * kv_width * BF16;
        let mem = DevBuf::alloc(dev, 2 * layer_bytes * layers).with_context(|| {
            format!("allocating the KV cache ({num_blocks} blocks of {block_size} tokens)")
        })?;
        Ok(Self {
            mem,
            layer_bytes,
            block_size,
            num_blocks,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The whole allocation: address and bytes.
    pub fn memory(&self) -> (DevPtr, usize) {
        (self.mem.ptr, self.mem.bytes)
    }

    /// Where attention reads and writes K/V of each layer.
    pub fn place(&self) -> KvPlace {
        KvPlace {
            base: self.mem.ptr,
            layer_stride: 2 * self.layer_bytes,
            v_offset: self.layer_bytes,
            block_size: self.block_size,
        }
    }
}

/// Where attention reads and writes K/V in a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct KvPlace {
    pub base: DevPtr,
    /// Bytes between layers (0: all layers share one scratch, the embedding path).
    pub layer_stride: usize,
    /// Bytes from a layer's K to its V.
    pub v_offset: usize,
    pub block_size: usize,
}

impl KvPlace {
    /// K of `layer`.
    pub fn k(&self, layer: usize) -> DevPtr {
        self.base + (layer * self.layer_stride) as u64
    }

    /// V of `layer`.
    pub fn v(&self, layer: usize) -> DevPtr {
        self.k(layer) + self.v_offset as u64
    }
}
