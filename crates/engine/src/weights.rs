//! The one weight reader of every device: a Hugging Face folder's safetensors (one file or
//! sharded with `model.safetensors.index.json`), memory-mapped, each tensor found by name
//! and checked against the config's shape, handed over in its stored dtype (to a
//! [`Backend`] by [`WeightSource::get`], to the CUDA model through
//! [`SafetensorsFiles::tensor`]); or seeded dummy weights that the device generates itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use memmap2::Mmap;

use crate::backend::{Backend, DType, Init};

/// Where a model's weights come from.
pub enum WeightSource {
    Safetensors(SafetensorsFiles),
    /// `--load-format dummy`: every tensor seeded from `seed` and its name.
    Dummy {
        seed: u64,
    },
}

/// Memory-mapped safetensors files and where each tensor lives.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorLoc>,
}

struct TensorLoc {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl WeightSource {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> anyhow::Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("invalid {}", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no weight_map object", index.display()))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            anyhow::bail!(
                "{}: no model.safetensors or model.safetensors.index.json (use --load-format dummy for random weights)",
                dir.display()
            );
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for path in names {
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the file is opened read-only; like every safetensors loader we rely on
            // it not being truncated while the engine runs.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot mmap {}", path.display()))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    anyhow::anyhow!("{}: invalid safetensors header: {e:?}", path.display())
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    // Integer buffers (e.g. BERT's position_ids) are not weights.
                    _ => continue,
                };
                let (s, e) = info.data_offsets;
                tensors.insert(
                    name.clone(),
                    TensorLoc {
                        file: files.len(),
                        dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(WeightSource::Safetensors(SafetensorsFiles {
            files,
            tensors,
        }))
    }

    /// Loads the first of `names` that exists as a `[rows, cols]` tensor (1-D tensors
    /// are `[1, n]`). Several names cover checkpoints saved with or without a prefix
    /// (`bert.`, `model.`). Dummy weights use the first name for the seed.
    pub fn get<B: Backend>(
        &self,
        b: &B,
        names: &[String],
        rows: usize,
        cols: usize,
        init: Init,
    ) -> anyhow::Result<B::Tensor> {
        match self {
            WeightSource::Dummy { seed } => b.dummy(rows, cols, init, seed_for(*seed, &names[0])),
            WeightSource::Safetensors(st) => {
                let t = st.tensor(names, rows, cols)?;
                b.upload(t.dtype, rows, cols, t.bytes)
            }
        }
    }

    /// Whether any of `names` exists (optional tensors such as a checkpoint's `lm_head`).
    /// Dummy sources have every tensor.
    pub fn has(&self, names: &[String]) -> bool {
        match self {
            WeightSource::Dummy { .. } => true,
            WeightSource::Safetensors(st) => names.iter().any(|n| st.tensors.contains_key(n)),
        }
    }
}

/// One stored tensor: its bytes in the mapped file, little-endian `dtype`, row-major.
#[derive(Debug, Clone, Copy)]
pub struct StoredTensor<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
}

impl StoredTensor<'_> {
    /// The values as bf16 (the CUDA path's weight dtype): bf16 as stored, f16 and f32
    /// rounded to nearest.
    pub fn to_bf16(&self) -> Vec<half::bf16> {
        let b = self.bytes;
        match self.dtype {
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
                .collect(),
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        }
    }
}

impl SafetensorsFiles {
    /// The first of `names` that exists, checked to be a `[rows, cols]` tensor (a 1-D
    /// tensor of `cols` elements when `rows == 1`).
    pub fn tensor(
        &self,
        names: &[String],
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<StoredTensor<'_>> {
        let (name, loc) = names
            .iter()
            .find_map(|n| self.tensors.get(n).map(|l| (n, l)))
            .with_context(|| format!("tensor {} not found in {}", names[0], self.describe()))?;
        let (r, c) = match loc.shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => anyhow::bail!("tensor {name}: expected 1-D or 2-D, found shape {other:?}"),
        };
        if (r, c) != (rows, cols) && !(rows == 1 && r * c == cols) {
            anyhow::bail!(
                "tensor {name}: shape {:?} does not match config ({rows}, {cols})",
                loc.shape
            );
        }
        Ok(StoredTensor {
            dtype: loc.dtype,
            bytes: &self.files[loc.file].1[loc.start..loc.end],
        })
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        files.join(", ")
    }
}

/// FNV-1a of the name mixed with the seed: each tensor gets its own stream.
fn seed_for(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in name.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
