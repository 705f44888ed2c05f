//! Qwen3 weights on the GPU in bf16, in the layout the CUDA forward wants: q/k/v fused into
//! one `[(nq + 2 nkv) * D, H]` matrix and gate/up into one `[2 I, H]` matrix, so a layer
//! runs 4 GEMMs. Either seeded dummy values filled on the GPU (`--load-format dummy`, any
//! size at memory speed) or a Hugging Face safetensors folder converted to bf16 on the host.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;

use super::device::CudaDevice;
use super::kernels::{DevPtr, Kernels};
use super::shape::Qwen3Shape;

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
        // SAFETY: the buffer is at least as large as `data`; pageable copies complete
        // before returning.
        unsafe { cudarc::driver::result::memcpy_htod_async(buf.ptr, data, dev.stream.cu_stream()) }
            .map_err(|e| anyhow!("copying weights to the GPU: {e}"))?;
        Ok(buf)
    }
}

/// One decoder layer.
pub struct LayerWeights {
    pub input_norm: DevBuf,
    pub qkv: DevBuf,
    pub q_norm: DevBuf,
    pub k_norm: DevBuf,
    pub o_proj: DevBuf,
    pub post_norm: DevBuf,
    pub gate_up: DevBuf,
    pub down: DevBuf,
}

/// The whole model.
pub struct Weights {
    pub embed: DevBuf,
    pub layers: Vec<LayerWeights>,
    pub norm: DevBuf,
    /// `None` when tied to `embed`.
    pub lm_head: Option<DevBuf>,
}

impl Weights {
    /// The `lm_head` matrix address (the embedding when tied).
    pub fn lm_head_ptr(&self) -> DevPtr {
        self.lm_head.as_ref().unwrap_or(&self.embed).ptr
    }

    /// Seeded random weights: linear layers uniform with std 0.02 (HF's initializer range),
    /// norms at 1 ± 0.05. Filled by a GPU kernel; the same seed gives the same weights.
    pub fn dummy(dev: &CudaDevice, k: &Kernels, s: &Qwen3Shape, seed: u64) -> anyhow::Result<Self> {
        let mut n = 0u64;
        let mut next_seed = || {
            n += 1;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
                .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        };
        let a = 0.02f32 * 3f32.sqrt();
        let mut fill = |elems: usize, amp: f32, offset: f32| -> anyhow::Result<DevBuf> {
            let b = DevBuf::alloc(dev, elems * 2)?;
            k.fill_uniform(b.ptr, elems, next_seed(), amp, offset)?;
            Ok(b)
        };
        let (h, d) = (s.hidden, s.head_dim);
        let embed = fill(s.vocab * h, a, 0.0)?;
        let mut layers = Vec::with_capacity(s.layers);
        for _ in 0..s.layers {
            layers.push(LayerWeights {
                input_norm: fill(h, 0.05, 1.0)?,
                qkv: fill(s.qkv_width() * h, a, 0.0)?,
                q_norm: fill(d, 0.05, 1.0)?,
                k_norm: fill(d, 0.05, 1.0)?,
                o_proj: fill(h * s.heads * d, a, 0.0)?,
                post_norm: fill(h, 0.05, 1.0)?,
                gate_up: fill(2 * s.inter * h, a, 0.0)?,
                down: fill(h * s.inter, a, 0.0)?,
            });
        }
        let norm = fill(h, 0.05, 1.0)?;
        let lm_head = if s.tie_embeddings {
            None
        } else {
            Some(fill(s.vocab * h, a, 0.0)?)
        };
        dev.stream
            .synchronize()
            .map_err(|e| anyhow!("filling dummy weights: {e}"))?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Loads a Hugging Face folder (`model.safetensors` or the shards its index names).
    pub fn from_dir(dev: &CudaDevice, s: &Qwen3Shape, dir: &Path) -> anyhow::Result<Self> {
        let files = safetensors_files(dir)?;
        let maps: Vec<memmap2::Mmap> = files
            .iter()
            .map(|f| {
                let file =
                    std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
                // SAFETY: read-only map of a file we do not modify.
                unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("mapping {}", f.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut tensors = HashMap::new();
        for (m, f) in maps.iter().zip(&files) {
            let st = safetensors::SafeTensors::deserialize(m)
                .with_context(|| format!("parsing {}", f.display()))?;
            for (name, view) in st.tensors() {
                tensors.insert(
                    name.to_string(),
                    to_bf16(&view).with_context(|| format!("tensor {name} in {}", f.display()))?,
                );
            }
        }
        let get = |name: &str| -> anyhow::Result<&Vec<bf16>> {
            tensors
                .get(name)
                .ok_or_else(|| anyhow!("weights in {}: missing tensor `{name}`", dir.display()))
        };
        let up = |data: &[bf16]| DevBuf::upload(dev, data);
        let cat = |names: &[String]| -> anyhow::Result<DevBuf> {
            let mut v = Vec::new();
            for n in names {
                v.extend_from_slice(get(n)?);
            }
            up(&v)
        };
        let embed = up(get("model.embed_tokens.weight")?)?;
        let mut layers = Vec::with_capacity(s.layers);
        for i in 0..s.layers {
            let p = format!("model.layers.{i}");
            layers.push(LayerWeights {
                input_norm: up(get(&format!("{p}.input_layernorm.weight"))?)?,
                qkv: cat(&[
                    format!("{p}.self_attn.q_proj.weight"),
                    format!("{p}.self_attn.k_proj.weight"),
                    format!("{p}.self_attn.v_proj.weight"),
                ])?,
                q_norm: up(get(&format!("{p}.self_attn.q_norm.weight"))?)?,
                k_norm: up(get(&format!("{p}.self_attn.k_norm.weight"))?)?,
                o_proj: up(get(&format!("{p}.self_attn.o_proj.weight"))?)?,
                post_norm: up(get(&format!("{p}.post_attention_layernorm.weight"))?)?,
                gate_up: cat(&[
                    format!("{p}.mlp.gate_proj.weight"),
                    format!("{p}.mlp.up_proj.weight"),
                ])?,
                down: up(get(&format!("{p}.mlp.down_proj.weight"))?)?,
            });
        }
        let norm = up(get("model.norm.weight")?)?;
        let lm_head = match (s.tie_embeddings, tensors.get("lm_head.weight")) {
            (false, Some(w)) => Some(up(w)?),
            (false, None) => bail!(
                "weights in {}: missing tensor `lm_head.weight` (untied)",
                dir.display()
            ),
            (true, _) => None,
        };
        dev.stream
            .synchronize()
            .map_err(|e| anyhow!("uploading weights: {e}"))?;
        Ok(Self {
            embed,
            layers,
            norm,
            lm_head,
        })
    }
}

fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("no model.safetensors and no readable {}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{}: no `weight_map`", index.display()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn to_bf16(view: &safetensors::tensor::TensorView<'_>) -> anyhow::Result<Vec<bf16>> {
    use safetensors::Dtype;
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        other => bail!("unsupported dtype {other:?}"),
    })
}
