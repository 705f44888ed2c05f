//! The CPU backend: f32 everywhere, the numerics reference for every other backend.
//! GEMMs go through the `gemm` crate (multithreaded with rayon); attention and norms are
//! plain loops parallelised with rayon across tokens and heads; sampling is the shared
//! host rule (`sampling`), one row per rayon task.

use rand::{Rng as _, SeedableRng as _};
use rand_distr::Distribution as _;
use rayon::prelude::*;

use super::{AttnDims, Backend, DType, Gelu, IndexSource, Init, KvShape, Pooling, StepMeta};
use crate::model::config::cos_sin;
use crate::model_api::SampleSpec;

/// A row-major `[rows, cols]` f32 matrix in host memory. Activation buffers come from
/// and go back to a per-thread pool, so a warm decode loop does not call the allocator
/// (large `Vec`s would otherwise be mmap'd and page-faulted afresh every step).
#[derive(Debug, PartialEq)]
pub struct CpuTensor {
    pub(super) data: Vec<f32>,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

/// Buffers kept per thread; beyond this, dropped buffers are freed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `n` floats with unspecified (but initialised) contents: the smallest
/// pooled buffer that fits, else a fresh one.
fn take(n: usize) -> Vec<f32> {
    let pooled = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let best = p
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= n)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        best.map(|i| p.swap_remove(i))
    });
    let mut v = pooled.unwrap_or_default();
    v.resize(n, 0.0);
    v.truncate(n);
    v
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.data);
        if v.capacity() > 0 {
            POOL.with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    if p.len() < POOL_MAX {
                        p.push(v);
                    }
                }
            });
        }
    }
}

impl Clone for CpuTensor {
    fn clone(&self) -> Self {
        let mut data = take(self.data.len());
        data.copy_from_slice(&self.data);
        Self {
            data,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

impl CpuTensor {
    pub(super) fn zeros(rows: usize, cols: usize) -> Self {
        let mut data = take(rows * cols);
        data.fill(0.0);
        Self { data, rows, cols }
    }
    /// Contents unspecified: for ops that overwrite every element.
    pub(super) fn uninit(rows: usize, cols: usize) -> Self {
        Self {
            data: take(rows * cols),
            rows,
            cols,
        }
    }
    pub(super) fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// K and V of all layers: `[layer][slot][kv_head][head_dim]`, slot = block * block_size + offset.
#[derive(Debug)]
pub struct CpuKvCache {
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) shape: KvShape,
}

impl CpuKvCache {
    /// Floats per token per layer.
    pub(super) fn token_width(&self) -> usize {
        self.shape.num_kv_heads * self.shape.head_dim
    }
    /// Floats per layer.
    pub(super) fn layer_width(&self) -> usize {
        self.shape.num_blocks * self.shape.block_size * self.token_width()
    }
}

/// One sequence's sampling parameters, owned.
#[derive(Debug, Clone)]
pub(super) struct CpuSample {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub uniform: f32,
    pub masked: Vec<u32>,
}

impl CpuSample {
    fn spec(&self) -> SampleSpec<'_> {
        SampleSpec {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            uniform: self.uniform,
            masked: &self.masked,
        }
    }
}

/// A step's metadata, owned (the CPU's "device copy").
#[derive(Debug, Clone, Default)]
pub struct CpuStep {
    pub(super) tokens: Vec<u32>,
    pub(super) positions: Vec<u32>,
    pub(super) seq_starts: Vec<u32>,
    /// Sequence of each token.
    pub(super) token_seq: Vec<u32>,
    pub(super) block_tables: Vec<u32>,
    pub(super) max_blocks_per_seq: usize,
    pub(super) block_size: usize,
    pub(super) slot_mapping: Vec<u32>,
    pub(super) sample_rows: Vec<u32>,
    pub(super) samples: Vec<CpuSample>,
}

/// The CPU device.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

fn check_same(a: &CpuTensor, b: &CpuTensor, op: &str) -> anyhow::Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        anyhow::bail!(
            "{op}: shape ({}, {}) vs ({}, {})",
            a.rows,
            a.cols,
            b.rows,
            b.cols
        );
    }
    Ok(())
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// Rows per rayon task for cheap row-wise ops: small batches stay on one thread.
const ROWS_PER_TASK: usize = 16;

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type KvCache = CpuKvCache;
    type Step = CpuStep;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn compute_dtype_bytes(&self) -> usize {
        4
    }

    fn upload(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> anyhow::Result<CpuTensor> {
        let n = rows * cols;
        if bytes.len() != n * dtype.size() {
            anyhow::bail!("upload: {} bytes for {n} {dtype:?} elements", bytes.len());
        }
        let data: Vec<f32> = match dtype {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        };
        Ok(CpuTensor { data, rows, cols })
    }

    fn upload_f32(&self, rows: usize, cols: usize, data: &[f32]) -> anyhow::Result<CpuTensor> {
        if data.len() != rows * cols {
            anyhow::bail!("upload_f32: {} values for ({rows}, {cols})", data.len());
        }
        Ok(CpuTensor {
            data: data.to_vec(),
            rows,
            cols,
        })
    }

    fn dummy(&self, rows: usize, cols: usize, init: Init, seed: u64) -> anyhow::Result<CpuTensor> {
        let mut t = CpuTensor::zeros(rows, cols);
        match init {
            Init::Zeros => {}
            Init::Ones => t.data.fill(1.0),
            Init::Normal { std } => {
                let normal = rand_distr::Normal::new(0.0f32, std)
                    .map_err(|e| anyhow::anyhow!("dummy weight std {std}: {e}"))?;
                // Fixed-size chunks, each with its own stream: the same values whatever the
                // thread count.
                t.data
                    .par_chunks_mut(1 << 16)
                    .enumerate()
                    .for_each(|(i, chunk)| {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(
                            seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        );
                        let _: u32 = rng.gen();
                        for v in chunk.iter_mut() {
                            *v = normal.sample(&mut rng);
                        }
                    });
            }
        }
        Ok(t)
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn to_host(&self, t: &CpuTensor) -> anyhow::Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn alloc_kv_cache(&self, shape: KvShape) -> anyhow::Result<CpuKvCache> {
        let n = shape
            .num_layers
            .checked_mul(shape.num_blocks)
            .and_then(|n| n.checked_mul(shape.block_size))
            .and_then(|n| n.checked_mul(shape.num_kv_heads * shape.head_dim))
            .ok_or_else(|| anyhow::anyhow!("KV cache size overflows"))?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        k.try_reserve_exact(n)
            .and_then(|_| v.try_reserve_exact(n))
            .map_err(|_| anyhow::anyhow!("cannot allocate a KV cache of {} bytes", 8 * n))?;
        k.resize(n, 0.0);
        v.resize(n, 0.0);
        Ok(CpuKvCache { k, v, shape })
    }

    fn rope_table(&self, inv_freq: &[f32], max_positions: usize) -> anyhow::Result<CpuTensor> {
        let half = inv_freq.len();
        let mut t = CpuTensor::zeros(max_positions, 2 * half);
        t.data
            .par_chunks_mut(2 * half)
            .enumerate()
            .for_each(|(p, row)| {
                for (i, &f) in inv_freq.iter().enumerate() {
                    (row[i], row[half + i]) = cos_sin(p, f);
                }
            });
        Ok(t)
    }

    fn prepare_step(&self, m: &StepMeta<'_>) -> anyhow::Result<CpuStep> {
        let mut token_seq = Vec::with_capacity(m.tokens.len());
        for s in 0..m.num_seqs() {
            let n = m.seq_starts[s + 1].saturating_sub(m.seq_starts[s]);
            token_seq.extend(std::iter::repeat_n(s as u32, n as usize));
        }
        if token_seq.len() != m.tokens.len() || m.positions.len() != m.tokens.len() {
            anyhow::bail!(
                "step metadata: sequence boundaries do not match {} tokens",
                m.tokens.len()
            );
        }
        if m.samples.len() > m.sample_rows.len() {
            anyhow::bail!("step metadata: more sampling specs than sample rows");
        }
        Ok(CpuStep {
            tokens: m.tokens.to_vec(),
            positions: m.positions.to_vec(),
            seq_starts: m.seq_starts.to_vec(),
            token_seq,
            block_tables: m.block_tables.to_vec(),
            max_blocks_per_seq: m.max_blocks_per_seq,
            block_size: m.block_size,
            slot_mapping: m.slot_mapping.to_vec(),
            sample_rows: m.sample_rows.to_vec(),
            samples: m
                .samples
                .iter()
                .map(|s| CpuSample {
                    temperature: s.temperature,
                    top_p: s.top_p,
                    top_k: s.top_k,
                    uniform: s.uniform,
                    masked: s.masked.to_vec(),
                })
                .collect(),
        })
    }

    fn embedding(
        &self,
        table: &CpuTensor,
        step: &CpuStep,
        source: IndexSource,
    ) -> anyhow::Result<CpuTensor> {
        let n = step.tokens.len();
        let mut out = CpuTensor::uninit(n, table.cols);
        for t in 0..n {
            let idx = match source {
                IndexSource::Tokens => step.tokens[t] as usize,
                IndexSource::Positions => step.positions[t] as usize,
                IndexSource::Zero => 0,
            };
            if idx >= table.rows {
                anyhow::bail!("embedding index {idx} out of range ({} rows)", table.rows);
            }
            out.data[t * table.cols..(t + 1) * table.cols].copy_from_slice(table.row(idx));
        }
        Ok(out)
    }

    fn linear(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
    ) -> anyhow::Result<CpuTensor> {
        if x.cols != w.cols {
            anyhow::bail!(
                "linear: input has {} features, weight expects {}",
                x.cols,
                w.cols
            );
        }
        let (m, n, k) = (x.rows, w.rows, x.cols);
        let mut out = CpuTensor::uninit(m, n);
        if let Some(b) = bias {
            if b.data.len() != n {
                anyhow::bail!("linear: bias of {} for {n} outputs", b.data.len());
            }
            for row in out.data.chunks_exact_mut(n) {
                row.copy_from_slice(&b.data);
            }
        }
        if m == 0 {
            return Ok(out);
        }
        let threads = rayon::current_num_threads();
        let par = if m * n * k < 1 << 16 || threads == 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        // SAFETY: dst is m x n row-major (col stride 1, row stride n); lhs is x, m x k
        // row-major; rhs is wᵀ, k x n, read from w (n x k row-major): element (kk, j) at
        // j * k + kk, so column stride k and row stride 1. All buffers have those sizes.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.data.as_mut_ptr(),
                1,
                n as isize,
                bias.is_some(),
                x.data.as_ptr(),
                1,
                k as isize,
                w.data.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> anyhow::Result<CpuTensor> {
        if w.data.len() != x.cols {
            anyhow::bail!(
                "rms_norm: weight of {} for {} features",
                w.data.len(),
                x.cols
            );
        }
        let mut out = CpuTensor::uninit(x.rows, x.cols);
        out.data
            .par_chunks_mut(x.cols * ROWS_PER_TASK)
            .zip(x.data.par_chunks(x.cols * ROWS_PER_TASK))
            .for_each(|(o, xi)| {
                for (orow, xrow) in o.chunks_exact_mut(x.cols).zip(xi.chunks_exact(x.cols)) {
                    rms_norm_row(xrow, &w.data, eps, orow);
                }
            });
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: &CpuTensor,
        w: &CpuTensor,
        eps: f32,
    ) -> anyhow::Result<CpuTensor> {
        check_same(residual, x, "add_rms_norm")?;
        self.add_assign(residual, x)?;
        self.rms_norm(residual, w, eps)
    }

    fn qk_norm_rope(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        q_norm: Option<&CpuTensor>,
        k_norm: Option<&CpuTensor>,
        eps: f32,
        rope: &CpuTensor,
        dims: AttnDims,
        step: &CpuStep,
    ) -> anyhow::Result<()> {
        let hd = dims.head_dim;
        if q.cols != dims.num_heads * hd || k.cols != dims.num_kv_heads * hd || rope.cols != hd {
            anyhow::bail!("qk_norm_rope: q/k/rope widths do not match the head layout");
        }
        if let Some(&p) = step.positions.iter().find(|&&p| p as usize >= rope.rows) {
            anyhow::bail!(
                "position {p} beyond the RoPE table ({} positions)",
                rope.rows
            );
        }
        let apply = |t: &mut CpuTensor, norm: Option<&CpuTensor>| {
            let cols = t.cols;
            t.data
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(row, x)| {
                    let table = rope.row(step.positions[row] as usize);
                    let (cos, sin) = table.split_at(hd / 2);
                    let mut tmp = [0f32; 512];
                    for head in x.chunks_exact_mut(hd) {
                        if let Some(w) = norm {
                            tmp[..hd].copy_from_slice(head);
                            rms_norm_row(&tmp[..hd], &w.data, eps, head);
                        }
                        let (x1, x2) = head.split_at_mut(hd / 2);
                        for i in 0..hd / 2 {
                            let (a, b) = (x1[i], x2[i]);
                            x1[i] = a * cos[i] - b * sin[i];
                            x2[i] = b * cos[i] + a * sin[i];
                        }
                    }
                });
        };
        if hd > 512 || !hd.is_multiple_of(2) {
            anyhow::bail!("qk_norm_rope: head_dim {hd} unsupported (even, <= 512)");
        }
        apply(q, q_norm);
        apply(k, k_norm);
        Ok(())
    }

    fn zeros(&self, rows: usize, cols: usize) -> anyhow::Result<CpuTensor> {
        Ok(CpuTensor::zeros(rows, cols))
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> anyhow::Result<CpuTensor> {
        let mut out = CpuTensor::uninit(rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols.max(1)).zip(rows) {
            if r as usize >= x.rows {
                anyhow::bail!("gather_rows: row {r} out of range ({} rows)", x.rows);
            }
            dst.copy_from_slice(x.row(r as usize));
        }
        Ok(out)
    }

    fn scatter_add_rows(
        &self,
        out: &mut CpuTensor,
        x: &CpuTensor,
        rows: &[u32],
        weights: &[f32],
    ) -> anyhow::Result<()> {
        if x.cols != out.cols || x.rows != rows.len() || weights.len() != rows.len() {
            anyhow::bail!(
                "scatter_add_rows: {} rows of {} into width {} with {} targets and {} weights",
                x.rows,
                x.cols,
                out.cols,
                rows.len(),
                weights.len()
            );
        }
        let cols = out.cols;
        for (i, (&r, &w)) in rows.iter().zip(weights).enumerate() {
            if r as usize >= out.rows {
                anyhow::bail!("scatter_add_rows: row {r} out of range ({} rows)", out.rows);
            }
            let dst = &mut out.data[r as usize * cols..(r as usize + 1) * cols];
            for (d, &v) in dst.iter_mut().zip(x.row(i)) {
                *d += w * v;
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> anyhow::Result<CpuTensor> {
        check_same(gate, up, "silu_mul")?;
        let mut out = gate.clone();
        out.data
            .par_chunks_mut(1 << 12)
            .zip(up.data.par_chunks(1 << 12))
            .for_each(|(o, u)| {
                for (g, &u) in o.iter_mut().zip(u) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            });
        Ok(out)
    }

    fn gelu(&self, x: &CpuTensor, kind: Gelu) -> anyhow::Result<CpuTensor> {
        // sqrt(2 / pi) as transformers' `math.sqrt(2.0 / math.pi)`, rounded to f32.
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        let mut out = x.clone();
        out.data.par_chunks_mut(1 << 12).for_each(|o| {
            for v in o {
                *v = match kind {
                    Gelu::Erf => {
                        0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2))
                    }
                    Gelu::Tanh => {
                        let x = *v;
                        0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
                    }
                };
            }
        });
        Ok(out)
    }

    fn add_assign(&self, a: &mut CpuTensor, b: &CpuTensor) -> anyhow::Result<()> {
        check_same(a, b, "add")?;
        a.data
            .par_chunks_mut(1 << 12)
            .zip(b.data.par_chunks(1 << 12))
            .for_each(|(a, b)| {
                for (x, &y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            });
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        residual: Option<&CpuTensor>,
        w: &CpuTensor,
        b: &CpuTensor,
        eps: f32,
    ) -> anyhow::Result<CpuTensor> {
        if let Some(r) = residual {
            check_same(x, r, "layer_norm")?;
        }
        if w.data.len() != x.cols || b.data.len() != x.cols {
            anyhow::bail!(
                "layer_norm: weight/bias width does not match {} features",
                x.cols
            );
        }
        let cols = x.cols;
        let mut out = x.clone();
        out.data
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| {
                if let Some(res) = residual {
                    for (v, &s) in row.iter_mut().zip(res.row(r)) {
                        *v += s;
                    }
                }
                let mean = row.iter().sum::<f32>() / cols as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for ((v, &g), &bb) in row.iter_mut().zip(&w.data).zip(&b.data) {
                    *v = (*v - mean) * inv * g + bb;
                }
            });
        Ok(out)
    }

    fn kv_write(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        step: &CpuStep,
    ) -> anyhow::Result<()> {
        let width = cache.token_width();
        if k.cols != width
            || v.cols != width
            || k.rows != step.slot_mapping.len()
            || v.rows != k.rows
        {
            anyhow::bail!("kv_write: K/V shape does not match the cache or the slot mapping");
        }
        if layer >= cache.shape.num_layers {
            anyhow::bail!("kv_write: layer {layer} out of range");
        }
        let slots = cache.shape.num_blocks * cache.shape.block_size;
        let base = layer * cache.layer_width();
        for (t, &slot) in step.slot_mapping.iter().enumerate() {
            if slot as usize >= slots {
                anyhow::bail!("kv_write: slot {slot} out of range ({slots} slots)");
            }
            let off = base + slot as usize * width;
            cache.k[off..off + width].copy_from_slice(k.row(t));
            cache.v[off..off + width].copy_from_slice(v.row(t));
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        dims: AttnDims,
        scale: f32,
        step: &CpuStep,
    ) -> anyhow::Result<CpuTensor> {
        super::cpu_attention::paged(q, cache, layer, dims, scale, step)
    }

    fn varlen_attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        dims: AttnDims,
        scale: f32,
        causal: bool,
        step: &CpuStep,
    ) -> anyhow::Result<CpuTensor> {
        super::cpu_attention::varlen(q, k, v, dims, scale, causal, step)
    }

    fn pool(&self, x: &CpuTensor, pooling: Pooling, step: &CpuStep) -> anyhow::Result<CpuTensor> {
        let seqs = step.seq_starts.len().saturating_sub(1);
        let mut out = CpuTensor::zeros(seqs, x.cols);
        for s in 0..seqs {
            let (a, b) = (step.seq_starts[s] as usize, step.seq_starts[s + 1] as usize);
            if b <= a || b > x.rows {
                anyhow::bail!(
                    "pool: sequence {s} rows {a}..{b} invalid for {} rows",
                    x.rows
                );
            }
            let o = &mut out.data[s * x.cols..(s + 1) * x.cols];
            match pooling {
                Pooling::Last => o.copy_from_slice(x.row(b - 1)),
                Pooling::Mean => {
                    for r in a..b {
                        for (acc, &v) in o.iter_mut().zip(x.row(r)) {
                            *acc += v;
                        }
                    }
                    let inv = 1.0 / (b - a) as f32;
                    o.iter_mut().for_each(|v| *v *= inv);
                }
            }
        }
        Ok(out)
    }

    fn gather_sample_rows(&self, x: &CpuTensor, step: &CpuStep) -> anyhow::Result<CpuTensor> {
        let mut out = CpuTensor::uninit(step.sample_rows.len(), x.cols);
        for (i, &r) in step.sample_rows.iter().enumerate() {
            if r as usize >= x.rows {
                anyhow::bail!("sample row {r} out of range ({} rows)", x.rows);
            }
            out.data[i * x.cols..(i + 1) * x.cols].copy_from_slice(x.row(r as usize));
        }
        Ok(out)
    }

    fn l2_normalize(&self, x: &CpuTensor) -> anyhow::Result<CpuTensor> {
        let mut out = x.clone();
        let cols = x.cols.max(1);
        for row in out.data.chunks_exact_mut(cols) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(out)
    }

    fn sample(&self, logits: &CpuTensor, step: &CpuStep) -> anyhow::Result<Vec<u32>> {
        if step.samples.len() != logits.rows {
            anyhow::bail!(
                "sample: {} logit rows for {} sampling specs",
                logits.rows,
                step.samples.len()
            );
        }
        (0..logits.rows)
            .into_par_iter()
            .map(|r| super::sampling::sample_row(logits.row(r), &step.samples[r].spec()))
            .collect()
    }
}
