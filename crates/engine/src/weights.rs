//! The one weight reader of every device: a Hugging Face folder's safetensors (one file or
//! sharded with `model.safetensors.index.json`), memory-mapped, each tensor found by name
//! and checked against the config's shape, handed over in its stored dtype (to a
//! [`Backend`] by [`WeightSource::get`], to the CUDA model through
//! [`SafetensorsFiles::bf16`] and [`SafetensorsFiles::fp8`]); or seeded dummy weights that
//! the device generates itself. Block-FP8 tensors (e4m3 with a `weight_scale_inv`, see
//! [`fp8`]) reach a [`Backend`] dequantised to f32 at load: the portable path computes in
//! f32. The CUDA path takes a mixture-of-experts model's experts in FP8 as stored, and every
//! other weight in bf16 (dequantised first when stored in FP8).

pub mod fp8;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use memmap2::Mmap;

use crate::backend::{Backend, DType, Init};
use crate::model::config::ModelConfig;

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
    /// `quantization_config.weight_block_size` of a block-FP8 checkpoint.
    fp8_block: Option<[usize; 2]>,
}

struct TensorLoc {
    file: usize,
    dtype: Stored,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A tensor's dtype in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    Float(DType),
    /// e4m3fn, one byte, with a `weight_scale_inv` tensor beside it.
    F8E4M3,
    /// Anything else (integer buffers such as BERT's `position_ids`, other FP8 kinds):
    /// kept so that asking for one as a weight names its dtype.
    Other(safetensors::Dtype),
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
                    safetensors::Dtype::F32 => Stored::Float(DType::F32),
                    safetensors::Dtype::F16 => Stored::Float(DType::F16),
                    safetensors::Dtype::BF16 => Stored::Float(DType::BF16),
                    safetensors::Dtype::F8_E4M3 => Stored::F8E4M3,
                    other => Stored::Other(other),
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
            fp8_block: None,
        }))
    }

    /// Opens `dir`'s safetensors for the model of `config`: as [`WeightSource::open_dir`],
    /// knowing the block size of a block-FP8 checkpoint's scales.
    pub fn open_model(dir: &Path, config: &ModelConfig) -> anyhow::Result<Self> {
        let mut src = Self::open_dir(dir)?;
        if let WeightSource::Safetensors(st) = &mut src {
            st.fp8_block = config.fp8.as_ref().map(|q| q.block);
        }
        Ok(src)
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
                let (name, loc) = st.find(names, rows, cols)?;
                match loc.dtype {
                    Stored::F8E4M3 => {
                        b.upload_f32(rows, cols, &st.dequantised(name, loc, rows, cols)?)
                    }
                    _ => {
                        let t = st.stored(name, loc)?;
                        b.upload(t.dtype, rows, cols, t.bytes)
                    }
                }
            }
        }
    }

    /// Rows `skip..rows` of a `[rows, cols]` tensor: RoBERTa's position table past the
    /// rows before position 0. Dummy weights make the `rows - skip` rows directly.
    pub fn get_rows_after<B: Backend>(
        &self,
        b: &B,
        names: &[String],
        (rows, skip): (usize, usize),
        cols: usize,
        init: Init,
    ) -> anyhow::Result<B::Tensor> {
        match self {
            _ if skip == 0 => self.get(b, names, rows, cols, init),
            WeightSource::Dummy { seed } => {
                b.dummy(rows - skip, cols, init, seed_for(*seed, &names[0]))
            }
            WeightSource::Safetensors(st) => {
                let (name, loc) = st.find(names, rows, cols)?;
                let w = st.stored(name, loc)?.to_f32();
                b.upload_f32(rows - skip, cols, &w[skip * cols..])
            }
        }
    }

    /// A `Conv1D` weight (GPT-2's projections), stored `[inp, out]`, the transpose of a
    /// Linear's, as `parts` Linear weights `[out / parts, inp]`: the output features cut in
    /// `parts` equal runs (`c_attn`'s q, k and v), each transposed. Dummy weights seed each
    /// part from the first name and the part's index.
    pub fn get_conv1d<B: Backend>(
        &self,
        b: &B,
        names: &[String],
        inp: usize,
        out: usize,
        parts: usize,
        init: Init,
    ) -> anyhow::Result<Vec<B::Tensor>> {
        let part = split_width(&names[0], out, parts)?;
        match self {
            WeightSource::Dummy { seed } => (0..parts)
                .map(|p| b.dummy(part, inp, init, part_seed(*seed, &names[0], p, parts)))
                .collect(),
            WeightSource::Safetensors(st) => {
                let (name, loc) = st.find(names, inp, out)?;
                let w = st.stored(name, loc)?.to_f32();
                (0..parts)
                    .map(|p| {
                        let mut t = Vec::with_capacity(part * inp);
                        for o in p * part..(p + 1) * part {
                            t.extend((0..inp).map(|i| w[i * out + o]));
                        }
                        b.upload_f32(part, inp, &t)
                    })
                    .collect()
            }
        }
    }

    /// A 1-D tensor of `n` elements as `parts` rows `[1, n / parts]` (`c_attn`'s bias
    /// into q, k and v), seeded as [`WeightSource::get_conv1d`]'s parts.
    pub fn get_split<B: Backend>(
        &self,
        b: &B,
        names: &[String],
        n: usize,
        parts: usize,
        init: Init,
    ) -> anyhow::Result<Vec<B::Tensor>> {
        let part = split_width(&names[0], n, parts)?;
        match self {
            WeightSource::Dummy { seed } => (0..parts)
                .map(|p| b.dummy(1, part, init, part_seed(*seed, &names[0], p, parts)))
                .collect(),
            WeightSource::Safetensors(st) => {
                let (name, loc) = st.find(names, 1, n)?;
                let v = st.stored(name, loc)?.to_f32();
                v.chunks_exact(part)
                    .map(|c| b.upload_f32(1, part, c))
                    .collect()
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

/// A block-FP8 weight as stored: e4m3 bytes, row-major, and an f32 scale per `block`
/// (`[ceil(rows / br), ceil(cols / bc)]`, row-major).
pub struct Fp8Weight<'a> {
    pub bytes: &'a [u8],
    pub scales: Vec<f32>,
    pub block: [usize; 2],
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

    /// The values as f32 (exact for every stored float dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes;
        match self.dtype {
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

impl SafetensorsFiles {
    /// The first of `names` that exists, with its shape checked against `[rows, cols]`.
    fn find<'s>(
        &'s self,
        names: &'s [String],
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<(&'s str, &'s TensorLoc)> {
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
        Ok((name, loc))
    }

    /// A float tensor's bytes; other dtypes are an error naming the tensor.
    fn stored(&self, name: &str, loc: &TensorLoc) -> anyhow::Result<StoredTensor<'_>> {
        let dtype = match loc.dtype {
            Stored::Float(d) => d,
            Stored::F8E4M3 => {
                anyhow::bail!("tensor {name} is FP8 (e4m3) where a float tensor is read")
            }
            Stored::Other(d) => {
                anyhow::bail!(
                    "tensor {name} has dtype {d:?}, which is not a supported weight dtype"
                )
            }
        };
        Ok(StoredTensor {
            dtype,
            bytes: &self.files[loc.file].1[loc.start..loc.end],
        })
    }

    /// An e4m3 weight times its `<name>_scale_inv` blocks, as f32 (see [`fp8`]).
    fn dequantised(
        &self,
        name: &str,
        loc: &TensorLoc,
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<Vec<f32>> {
        let w = self.fp8_parts(name, loc, rows, cols)?;
        fp8::dequantise(w.bytes, rows, cols, &w.scales, w.block)
            .with_context(|| format!("tensor {name}"))
    }

    /// An e4m3 weight's bytes and its `<name>_scale_inv` blocks, shapes checked.
    fn fp8_parts(
        &self,
        name: &str,
        loc: &TensorLoc,
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<Fp8Weight<'_>> {
        let block = self.fp8_block.with_context(|| {
            format!(
                "tensor {name} is FP8 (e4m3) but config.json has no quantization_config with weight_block_size"
            )
        })?;
        let scale_name = format!("{name}_scale_inv");
        let (sr, sc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
        let scales = match self.tensors.get(&scale_name) {
            Some(l) if l.shape == [sr, sc] => self.stored(&scale_name, l)?.to_f32(),
            Some(l) => anyhow::bail!(
                "tensor {scale_name}: shape {:?}, expected [{sr}, {sc}] for a [{rows}, {cols}] weight in {block:?} blocks",
                l.shape
            ),
            None => anyhow::bail!(
                "tensor {name} is FP8 (e4m3) but {scale_name} is not in {}",
                self.describe()
            ),
        };
        Ok(Fp8Weight {
            bytes: &self.files[loc.file].1[loc.start..loc.end],
            scales,
            block,
        })
    }

    /// The first of `names` as a `[rows, cols]` weight in bf16 (the CUDA path's dtype): a
    /// float tensor rounded to nearest, a block-FP8 one dequantised first.
    pub fn bf16(
        &self,
        names: &[String],
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<Vec<half::bf16>> {
        let (name, loc) = self.find(names, rows, cols)?;
        match loc.dtype {
            Stored::F8E4M3 => Ok(self
                .dequantised(name, loc, rows, cols)?
                .into_iter()
                .map(half::bf16::from_f32)
                .collect()),
            _ => Ok(self.stored(name, loc)?.to_bf16()),
        }
    }

    /// The first of `names` as a block-FP8 `[rows, cols]` weight as stored (the CUDA path
    /// keeps experts so): its e4m3 bytes, checked to hold no NaN, and its scales. A float
    /// tensor is an error naming it.
    pub fn fp8(&self, names: &[String], rows: usize, cols: usize) -> anyhow::Result<Fp8Weight<'_>> {
        let (name, loc) = self.find(names, rows, cols)?;
        if loc.dtype != Stored::F8E4M3 {
            anyhow::bail!(
                "tensor {name} is not FP8 (e4m3) while the checkpoint's other experts are"
            );
        }
        let w = self.fp8_parts(name, loc, rows, cols)?;
        fp8::check_finite(w.bytes).with_context(|| format!("tensor {name}"))?;
        Ok(w)
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

/// The width of each of `parts` equal runs of `n` features.
fn split_width(name: &str, n: usize, parts: usize) -> anyhow::Result<usize> {
    if parts == 0 || !n.is_multiple_of(parts) {
        anyhow::bail!("tensor {name}: {n} features do not split into {parts} equal parts");
    }
    Ok(n / parts)
}

/// A part's seed: the whole tensor's (as [`WeightSource::get`] seeds it) when it is not
/// split, else the name with the part's index.
fn part_seed(seed: u64, name: &str, part: usize, parts: usize) -> u64 {
    if parts == 1 {
        seed_for(seed, name)
    } else {
        seed_for(seed, &format!("{name}#{part}"))
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
