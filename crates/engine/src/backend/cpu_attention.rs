//! CPU attention: one rayon task per (token, head), softmax in f32 with the running max
//! subtracted, scratch reused per worker thread. The reference the CUDA kernels are
//! tested against.

use rayon::prelude::*;

use super::cpu::{CpuKvCache, CpuStep, CpuTensor};
use super::AttnDims;

/// Softmax-weighted sum of `n` values: `scores` holds the raw dot products.
fn attend(scores: &mut [f32], out: &mut [f32], value: impl Fn(usize) -> *const f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    let inv = 1.0 / sum;
    let hd = out.len();
    for (j, &w) in scores.iter().enumerate() {
        // SAFETY: `value(j)` points at `hd` valid floats (checked by the callers' bounds).
        let v = unsafe { std::slice::from_raw_parts(value(j), hd) };
        let w = w * inv;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn check(q: &CpuTensor, dims: AttnDims, step: &CpuStep) -> anyhow::Result<()> {
    if q.cols != dims.num_heads * dims.head_dim || q.rows != step.tokens.len() {
        anyhow::bail!(
            "attention: q shape ({}, {}) does not match the step/head layout",
            q.rows,
            q.cols
        );
    }
    if dims.num_kv_heads == 0 || !dims.num_heads.is_multiple_of(dims.num_kv_heads) {
        anyhow::bail!(
            "attention: {} heads over {} KV heads",
            dims.num_heads,
            dims.num_kv_heads
        );
    }
    Ok(())
}

/// Causal attention through the paged cache (prefill chunks and decode alike).
pub(super) fn paged(
    q: &CpuTensor,
    cache: &CpuKvCache,
    layer: usize,
    dims: AttnDims,
    scale: f32,
    step: &CpuStep,
) -> anyhow::Result<CpuTensor> {
    check(q, dims, step)?;
    let (hd, nh) = (dims.head_dim, dims.num_heads);
    let group = nh / dims.num_kv_heads;
    let bs = step.block_size;
    let width = cache.token_width();
    let slots = cache.shape.num_blocks * cache.shape.block_size;
    if bs != cache.shape.block_size
        || width != dims.num_kv_heads * hd
        || layer >= cache.shape.num_layers
    {
        anyhow::bail!("paged_attention: step/cache layout mismatch");
    }
    // Validate every block id the step can touch once, so the hot loop needs no checks.
    for (t, &p) in step.positions.iter().enumerate() {
        let s = step.token_seq[t] as usize;
        let nblocks = p as usize / bs + 1;
        if nblocks > step.max_blocks_per_seq {
            anyhow::bail!("paged_attention: position {p} beyond the block table");
        }
        let row =
            &step.block_tables[s * step.max_blocks_per_seq..s * step.max_blocks_per_seq + nblocks];
        if row.iter().any(|&b| (b as usize + 1) * bs > slots) {
            anyhow::bail!("paged_attention: block id out of range");
        }
    }
    let base = layer * cache.layer_width();
    let mut out = CpuTensor::uninit(q.rows, q.cols);
    out.data.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (i, o)| {
            let (t, h) = (i / nh, i % nh);
            let kvh = h / group;
            let s = step.token_seq[t] as usize;
            let ctx = step.positions[t] as usize + 1;
            let table = &step.block_tables[s * step.max_blocks_per_seq..];
            let slot = |j: usize| table[j / bs] as usize * bs + j % bs;
            let qh = &q.row(t)[h * hd..(h + 1) * hd];
            scores.clear();
            scores.extend((0..ctx).map(|j| {
                let off = base + slot(j) * width + kvh * hd;
                dot(qh, &cache.k[off..off + hd]) * scale
            }));
            attend(scores, o, |j| {
                cache.v[base + slot(j) * width + kvh * hd..].as_ptr()
            });
        },
    );
    Ok(out)
}

/// Attention within each packed sequence, from K/V tensors (no cache).
pub(super) fn varlen(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    dims: AttnDims,
    scale: f32,
    causal: bool,
    step: &CpuStep,
) -> anyhow::Result<CpuTensor> {
    check(q, dims, step)?;
    let (hd, nh) = (dims.head_dim, dims.num_heads);
    let group = nh / dims.num_kv_heads;
    let width = dims.num_kv_heads * hd;
    if k.cols != width || v.cols != width || k.rows != q.rows || v.rows != q.rows {
        anyhow::bail!("varlen_attention: K/V shape does not match q");
    }
    let mut out = CpuTensor::uninit(q.rows, q.cols);
    out.data.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (i, o)| {
            let (t, h) = (i / nh, i % nh);
            let kvh = h / group;
            let s = step.token_seq[t] as usize;
            let start = step.seq_starts[s] as usize;
            let end = if causal {
                t + 1
            } else {
                step.seq_starts[s + 1] as usize
            };
            let qh = &q.row(t)[h * hd..(h + 1) * hd];
            scores.clear();
            scores
                .extend((start..end).map(|j| dot(qh, &k.row(j)[kvh * hd..(kvh + 1) * hd]) * scale));
            attend(scores, o, |j| v.row(start + j)[kvh * hd..].as_ptr());
        },
    );
    Ok(out)
}
