// Kernels of the built-in engine's CUDA backend, compiled at start-up by NVRTC for the
// device's architecture. Storage is bf16, arithmetic and accumulation are fp32. The
// residual stream is kept in fp32 (one buffer per step) so that 28+ layers of adds do not
// round away the small updates. Every kernel has a portable reference in the CPU backend.
//
// Paged KV layout (see runner.rs): K and V caches of one layer are
// [num_blocks * block_size, num_kv_heads, head_dim] bf16; token at slot s lives at row s.
// common.cu (bf16 conversions, warp reductions, the tensor-core MMA) is compiled in front.

// Sum over a block of up to 1024 threads; every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + 31) >> 5;
        float x = lane < nw ? part[lane] : 0.f;
        x = warp_sum(x);
        if (lane == 0) total = x;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// residual[t, :] = table[ids[t], :] in fp32, plus the learned position row
// pos_table[positions[t], :] when pos_table is non-null (GPT-2's wpe, an encoder's position
// table: the host points it at the row of position 0) and a constant row `add_row` when
// non-null (an encoder's token type 0).
extern "C" __global__ void embed_gather(const bf16* __restrict__ table, const int* __restrict__ ids,
                                        float* __restrict__ residual, int hidden,
                                        const bf16* __restrict__ pos_table, const int* __restrict__ positions,
                                        const bf16* __restrict__ add_row) {
    int t = blockIdx.x;
    const bf16* row = table + (size_t)ids[t] * hidden;
    const bf16* prow = pos_table ? pos_table + (size_t)positions[t] * hidden : nullptr;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = bf2f(row[i]);
        if (prow) v += bf2f(prow[i]);
        if (add_row) v += bf2f(add_row[i]);
        residual[(size_t)t * hidden + i] = v;
    }
}

// Two adjacent bf16 values (one 32-bit word) as floats, and back.
__device__ __forceinline__ float2 unpack2(unsigned u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ unsigned pack2(float a, float b) {
    return (unsigned)f2bf(a) | ((unsigned)f2bf(b) << 16);
}

// The norm kernels' mode bits: NORM_LAYER normalises as LayerNorm (mean subtracted, then
// the variance; `nb`, the norm's bias, added when non-null), else as RMSNorm;
// NORM_WRITE_BACK also stores the normalised row (fp32) into the residual stream in place
// of the sum (a post-norm encoder, whose stream is the norm's output).
#define NORM_LAYER 1
#define NORM_WRITE_BACK 2

// RMSNorm or LayerNorm fused with the residual add: if `delta` is non-null, residual +=
// delta (+ dbias, the projection's bias broadcast over the rows, when non-null) (fp32
// stream, bf16 delta); then out = norm(residual) * w (+ nb). One block per row.
// `rows` (optional) maps output row r to input row rows[r] (last-token gather for lm_head
// and pooling); then delta must be null and NORM_WRITE_BACK unset.
// Up to RMS_VEC float4 of a row per thread stay in registers between the reductions and
// the scaling: rows of up to RMS_VEC * 4 * blockDim.x values (8,192 at 256 threads)
// with hidden % 4 == 0 take 16-byte residual and 8-byte bf16 accesses; others the scalar
// loop.
#define RMS_VEC 8
extern "C" __global__ void add_norm(float* __restrict__ residual, const bf16* __restrict__ delta,
                                    const bf16* __restrict__ dbias, const bf16* __restrict__ w,
                                    const bf16* __restrict__ nb, bf16* __restrict__ out,
                                    const int* __restrict__ rows, int hidden, float eps, int mode) {
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    float* x = residual + (size_t)src * hidden;
    const bf16* d = delta ? delta + (size_t)src * hidden : nullptr;
    const bool layer = mode & NORM_LAYER, back = mode & NORM_WRITE_BACK;
    // LayerNorm: the sum, then the centred sum of squares; RMSNorm: the sum of squares.
    float s = 0.f;
    if ((hidden & 3) == 0 && hidden <= RMS_VEC * 4 * (int)blockDim.x) {
        float4 v[RMS_VEC];
#pragma unroll
        for (int j = 0; j < RMS_VEC; j++) {
            const int i = 4 * (threadIdx.x + j * blockDim.x);
            if (i >= hidden) break;
            float4 a = *(const float4*)(x + i);
            if (d) {
                const uint2 dd = *(const uint2*)(d + i);
                float2 d0 = unpack2(dd.x), d1 = unpack2(dd.y);
                if (dbias) {
                    const uint2 bb = *(const uint2*)(dbias + i);
                    const float2 b0 = unpack2(bb.x), b1 = unpack2(bb.y);
                    d0.x += b0.x; d0.y += b0.y; d1.x += b1.x; d1.y += b1.y;
                }
                a.x += d0.x; a.y += d0.y; a.z += d1.x; a.w += d1.y;
                if (!back) *(float4*)(x + i) = a;
            }
            v[j] = a;
            s += layer ? a.x + a.y + a.z + a.w : a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        }
        float mean = 0.f, ss = block_sum(s);
        if (layer) {
            mean = ss / hidden;
            ss = 0.f;
#pragma unroll
            for (int j = 0; j < RMS_VEC; j++) {
                const int i = 4 * (threadIdx.x + j * blockDim.x);
                if (i >= hidden) break;
                const float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, e = v[j].w - mean;
                ss += a * a + b * b + c * c + e * e;
            }
            ss = block_sum(ss);
        }
        const float inv = rsqrtf(ss / hidden + eps);
#pragma unroll
        for (int j = 0; j < RMS_VEC; j++) {
            const int i = 4 * (threadIdx.x + j * blockDim.x);
            if (i >= hidden) break;
            const uint2 ww = *(const uint2*)(w + i);
            const float2 w0 = unpack2(ww.x), w1 = unpack2(ww.y);
            float4 y = make_float4((v[j].x - mean) * inv * w0.x, (v[j].y - mean) * inv * w0.y,
                                   (v[j].z - mean) * inv * w1.x, (v[j].w - mean) * inv * w1.y);
            if (nb) {
                const uint2 bb = *(const uint2*)(nb + i);
                const float2 b0 = unpack2(bb.x), b1 = unpack2(bb.y);
                y.x += b0.x; y.y += b0.y; y.z += b1.x; y.w += b1.y;
            }
            *(uint2*)(out + (size_t)r * hidden + i) = make_uint2(pack2(y.x, y.y), pack2(y.z, y.w));
            if (back) *(float4*)(x + i) = y;
        }
        return;
    }
    // Each thread reads back only the values it wrote.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = x[i];
        if (d) {
            v += bf2f(d[i]);
            if (dbias) v += bf2f(dbias[i]);
            x[i] = v;
        }
        s += layer ? v : v * v;
    }
    float mean = 0.f, ss = block_sum(s);
    if (layer) {
        mean = ss / hidden;
        ss = 0.f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += (x[i] - mean) * (x[i] - mean);
        ss = block_sum(ss);
    }
    const float inv = rsqrtf(ss / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float y = (x[i] - mean) * inv * bf2f(w[i]);
        if (nb) y += bf2f(nb[i]);
        out[(size_t)r * hidden + i] = f2bf(y);
        if (back) x[i] = y;
    }
}

// Like add_norm with rows, but fp32 output (pooling: the embedding is read on the host).
extern "C" __global__ void norm_rows_f32(const float* __restrict__ residual, const bf16* __restrict__ w,
                                         const bf16* __restrict__ nb, float* __restrict__ out,
                                         const int* __restrict__ rows, int hidden, float eps, int mode) {
    int r = blockIdx.x;
    const float* x = residual + (size_t)rows[r] * hidden;
    const bool layer = mode & NORM_LAYER;
    float s = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) s += layer ? x[i] : x[i] * x[i];
    float mean = 0.f, ss = block_sum(s);
    if (layer) {
        mean = ss / hidden;
        ss = 0.f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += (x[i] - mean) * (x[i] - mean);
        ss = block_sum(ss);
    }
    const float inv = rsqrtf(ss / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)r * hidden + i] = (x[i] - mean) * inv * bf2f(w[i]) + (nb ? bf2f(nb[i]) : 0.f);
}

// Mean pooling of the embedding path: out[r, :] = the mean of residual rows
// rows[r] - positions[rows[r]] ..= rows[r] in fp32 (each sequence's tokens are consecutive
// rows from position 0, and rows[r] is its last). One block per output row.
extern "C" __global__ void mean_rows_f32(const float* __restrict__ residual, float* __restrict__ out,
                                         const int* __restrict__ rows, const int* __restrict__ positions,
                                         int hidden) {
    const int r = blockIdx.x, last = rows[r], n = positions[last] + 1;
    const float* x = residual + (size_t)(last - n + 1) * hidden;
    const float inv = 1.f / n;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float s = 0.f;
        for (int t = 0; t < n; t++) s += x[(size_t)t * hidden + i];
        out[(size_t)r * hidden + i] = s * inv;
    }
}

// Dims i, i + 1 of x (i even) as floats, plus the bias pair when `b` (the head's bias as
// 32-bit words) is non-null.
__device__ __forceinline__ float2 load2(const bf16* x, const unsigned* b, int i) {
    float2 v = unpack2(*(const unsigned*)(x + i));
    if (b) {
        float2 c = unpack2(b[i / 2]);
        v.x += c.x;
        v.y += c.y;
    }
    return v;
}

// The q/k/v epilogue of the fused projection: the q/k/v bias (when `bias`, [(nq + 2 nkv) * D],
// is non-null), per-head q/k RMSNorm (when qw/kw are non-null) and RoPE (HF non-interleaved:
// pairs (i, i + D/2)), and the KV cache write by slot. qkv is [T, (nq + 2 nkv) * D] from the
// fused projection; q and k are biased, normalised and rotated in place, v biased in place;
// k (rotated) and v are written to the caches at slots[t] (skipped when the slot is
// negative, padding rows of a captured batch, or when kcache is null, the embedding path,
// whose attention reads k and v from qkv). Angles come from the table (cos, sin per
// position and pair, built on the host from the model's inv_freq, RoPE scaling included);
// positions past it are computed from inv_freq directly; without inv_freq (null: learned
// positions, GPT-2 and the encoders) q and k are not rotated. One block per token, one warp
// per head, each lane two adjacent dims of each half (32-bit loads).
extern "C" __global__ void qk_norm_rope_kv(bf16* __restrict__ qkv, const bf16* __restrict__ bias,
                                          const bf16* __restrict__ qw, const bf16* __restrict__ kw,
                                          const int* __restrict__ positions, const int* __restrict__ slots,
                                          bf16* __restrict__ kcache, bf16* __restrict__ vcache,
                                          const float2* __restrict__ rope, int rope_len,
                                          const float* __restrict__ inv_freq, int nq, int nkv, int D,
                                          float eps) {
    int t = blockIdx.x;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int width = (nq + 2 * nkv) * D;
    bf16* row = qkv + (size_t)t * width;
    int ipos = positions[t];
    float pos = (float)ipos;
    int slot = kcache ? slots[t] : -1;
    int half = D / 2;
    for (int h = warp; h < nq + 2 * nkv; h += nwarps) {
        bf16* x = row + h * D;
        const unsigned* b = bias ? (const unsigned*)(bias + h * D) : nullptr;
        if (h >= nq + nkv) {  // v: bias in place (the embedding path reads it), copy to the cache
            unsigned* dst = nullptr;
            if (slot >= 0) dst = (unsigned*)(vcache + ((size_t)slot * nkv + (h - nq - nkv)) * D);
            if (!b && !dst) continue;
            for (int i = lane; i < half; i += 32) {
                unsigned u = ((const unsigned*)x)[i];
                if (b) {
                    float2 v = unpack2(u), c = unpack2(b[i]);
                    u = pack2(v.x + c.x, v.y + c.y);
                    ((unsigned*)x)[i] = u;
                }
                if (dst) dst[i] = u;
            }
            continue;
        }
        // Without q/k norm (w null) the scale is 1 and each lane reads only what it writes.
        const bf16* w = h < nq ? qw : kw;
        float inv = 1.f;
        if (w) {
            float ss = 0.f;
            for (int i = 2 * lane; i < D; i += 64) {
                float2 v = load2(x, b, i);
                ss += v.x * v.x + v.y * v.y;
            }
            inv = rsqrtf(warp_sum(ss) / D + eps);
        }
        unsigned* dst = nullptr;
        if (h >= nq && slot >= 0) dst = (unsigned*)(kcache + ((size_t)slot * nkv + (h - nq)) * D);
        for (int i = 2 * lane; i < half; i += 64) {
            float2 a = load2(x, b, i), bb = load2(x, b, i + half);
            float2 wa = make_float2(1.f, 1.f), wb = wa;
            if (w) {
                wa = unpack2(*(const unsigned*)(w + i));
                wb = unpack2(*(const unsigned*)(w + i + half));
            }
            float a0 = a.x * inv * wa.x, a1 = a.y * inv * wa.y;
            float b0 = bb.x * inv * wb.x, b1 = bb.y * inv * wb.y;
            float c0 = 1.f, s0 = 0.f, c1 = 1.f, s1 = 0.f;  // no RoPE: q and k as they are
            if (!inv_freq) {
            } else if (ipos < rope_len) {
                float2 r0 = rope[(size_t)ipos * half + i], r1 = rope[(size_t)ipos * half + i + 1];
                c0 = r0.x; s0 = r0.y; c1 = r1.x; s1 = r1.y;
            } else {
                sincosf(pos * inv_freq[i], &s0, &c0);
                sincosf(pos * inv_freq[i + 1], &s1, &c1);
            }
            unsigned o1 = pack2(a0 * c0 - b0 * s0, a1 * c1 - b1 * s1);
            unsigned o2 = pack2(b0 * c0 + a0 * s0, b1 * c1 + a1 * s1);
            *(unsigned*)(x + i) = o1;
            *(unsigned*)(x + i + half) = o2;
            if (dst) { dst[i / 2] = o1; dst[(i + half) / 2] = o2; }
        }
    }
}

// out[t, i] = gelu(x[t, i] + bias[i]) (the bias when non-null: the fc projection's), the
// exact form 0.5 x (1 + erf(x / sqrt 2)) or, with `tanh_form`, 0.5 x (1 + tanh(sqrt(2 / pi)
// (x + 0.044715 x^3))) (GPT-2's gelu_new). Two adjacent outputs per thread (32-bit loads
// and stores; width is even).
extern "C" __global__ void bias_gelu(const bf16* __restrict__ x, const bf16* __restrict__ bias,
                                     bf16* __restrict__ out, int width, int total, int tanh_form) {
    int idx = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    float2 v = unpack2(*(const unsigned*)(x + idx));
    if (bias) {
        float2 b = unpack2(*(const unsigned*)(bias + idx % width));
        v.x += b.x;
        v.y += b.y;
    }
    float g0, g1;
    if (tanh_form) {
        const float k = 0.7978845608028654f;
        g0 = 0.5f * v.x * (1.f + tanhf(k * (v.x + 0.044715f * v.x * v.x * v.x)));
        g1 = 0.5f * v.y * (1.f + tanhf(k * (v.y + 0.044715f * v.y * v.y * v.y)));
    } else {
        g0 = 0.5f * v.x * (1.f + erff(v.x * 0.7071067811865476f));
        g1 = 0.5f * v.y * (1.f + erff(v.y * 0.7071067811865476f));
    }
    *(unsigned*)(out + idx) = pack2(g0, g1);
}

// out[t, i] = silu(gu[t, i]) * gu[t, I + i]  (gate and up from one fused projection).
// Two adjacent outputs per thread (32-bit loads and stores; I is even).
extern "C" __global__ void silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int inter, int total) {
    int idx = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    float2 o = silu_mul_pair(gu, inter, idx);
    *(unsigned*)(out + idx) = (unsigned)f2bf(o.x) | ((unsigned)f2bf(o.y) << 16);
}

// Paged causal attention for prefill chunks and decode alike. Query token t of sequence
// seq_of[t] at position positions[t] attends to keys 0..=positions[t] of that sequence,
// found through its block table row. One block per (token, kv head); the GQA group of
// query heads shares each K/V row read. Warps split the keys; each lane holds E = D/32
// dims (HEAD_DIM and GQA are compile-time constants set per model at start-up, so the
// per-lane arrays live in registers); online softmax per warp, merged across warps at the end.
#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GQA
#define GQA 2
#endif
#define ATT_E ((HEAD_DIM + 31) / 32)
extern "C" __global__ void paged_attention(const bf16* __restrict__ qkv, bf16* __restrict__ out,
                                          const bf16* __restrict__ kcache, const bf16* __restrict__ vcache,
                                          const int* __restrict__ block_tables, int max_blocks,
                                          const int* __restrict__ seq_of, const int* __restrict__ positions,
                                          int block_size, int nkv, float scale) {
    const int D = HEAD_DIM, G = GQA, E = ATT_E;
    int nq = nkv * G;
    int t = blockIdx.x, kvh = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int width = (nq + 2 * nkv) * D;
    const int* table = block_tables + (size_t)seq_of[t] * max_blocks;
    int ctx = positions[t] + 1;
    int d0 = lane * E;
    bool active = d0 < D;

    float q[G][E], acc[G][E], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const bf16* qp = qkv + (size_t)t * width + (kvh * G + g) * D;
#pragma unroll
        for (int e = 0; e < E; e++) {
            q[g][e] = active ? bf2f(qp[d0 + e]) * scale : 0.f;
            acc[g][e] = 0.f;
        }
        m[g] = -1e30f; l[g] = 0.f;
    }
    for (int j = warp; j < ctx; j += nwarps) {
        int slot = table[j / block_size] * block_size + (j % block_size);
        const bf16* kp = kcache + ((size_t)slot * nkv + kvh) * D + d0;
        const bf16* vp = vcache + ((size_t)slot * nkv + kvh) * D + d0;
        float k[E], v[E];
#pragma unroll
        for (int e = 0; e < E; e++) {
            k[e] = active ? bf2f(kp[e]) : 0.f;
            v[e] = active ? bf2f(vp[e]) : 0.f;
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < E; e++) s += q[g][e] * k[e];
            s = warp_sum(s);
            float mn = fmaxf(m[g], s);
            float corr = __expf(m[g] - mn), p = __expf(s - mn);
            l[g] = l[g] * corr + p;
#pragma unroll
            for (int e = 0; e < E; e++) acc[g][e] = acc[g][e] * corr + p * v[e];
            m[g] = mn;
        }
    }
    // Merge the warps' partial softmax states through shared memory.
    extern __shared__ float sh[];  // [nwarps][G][D + 2]
    const int stride = D + 2;
#pragma unroll
    for (int g = 0; g < G; g++) {
        float* p = sh + (warp * G + g) * stride;
#pragma unroll
        for (int e = 0; e < E; e++) if (active) p[d0 + e] = acc[g][e];
        if (lane == 0) { p[D] = m[g]; p[D + 1] = l[g]; }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
        int g = idx / D, d = idx - g * D;
        float mx = -1e30f;
        for (int w = 0; w < nwarps; w++) mx = fmaxf(mx, sh[(w * G + g) * stride + D]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < nwarps; w++) {
            const float* p = sh + (w * G + g) * stride;
            float c = __expf(p[D] - mx);
            num += p[d] * c;
            den += p[D + 1] * c;
        }
        out[(size_t)t * nq * D + (kvh * G + g) * D + d] = f2bf(den > 0.f ? num / den : 0.f);
    }
}

// Prefill attention (flash-attention style on CUDA cores): one block per (tile of up to
// QT consecutive query tokens of one sequence, kv head), one warp per query token. The
// block streams its sequence's keys in tiles of 32 through shared memory, so each K/V row
// is read once per tile instead of once per query; within a tile each lane scores one key
// (lane-per-key dot products, no shuffles), then P·V with the lane owning E output dims.
// tile_start/tile_len come from the host (tiles never cross sequences).
#define QT 8
#define KT 32
// The block's queries in fp32, pre-scaled, where they fit in the 48 KiB of static shared
// memory beside the K/V tile; else (GQA 8 at head size 128: Qwen3-30B-A3B) in bf16 as
// stored, the scale applied to each score.
#define PA_SQ_F32 (QT * GQA * HEAD_DIM * 4 + KT * (2 * HEAD_DIM + 2) * 2 <= 48 * 1024)
extern "C" __global__ void prefill_attention(const bf16* __restrict__ qkv, bf16* __restrict__ out,
                                            const bf16* __restrict__ kcache, const bf16* __restrict__ vcache,
                                            const int* __restrict__ block_tables, int max_blocks,
                                            const int* __restrict__ seq_of, const int* __restrict__ positions,
                                            const int* __restrict__ tile_start, const int* __restrict__ tile_len,
                                            int block_size, int nkv, float scale) {
    const int D = HEAD_DIM, G = GQA, E = ATT_E;
    int nq = nkv * G;
    int kvh = blockIdx.y;
    int t0 = tile_start[blockIdx.x], n = tile_len[blockIdx.x];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int width = (nq + 2 * nkv) * D;
    const int* table = block_tables + (size_t)seq_of[t0] * max_blocks;
    int max_ctx = positions[t0 + n - 1] + 1;
    bool active = warp < n;
    int t = t0 + (active ? warp : 0);
    int my_ctx = positions[t] + 1;
    int d0 = lane * E;
    bool dact = d0 < D;

#if PA_SQ_F32
    __shared__ float sq[QT][GQA][HEAD_DIM];
#else
    __shared__ bf16 sq[QT][GQA][HEAD_DIM];
#endif
    // K rows padded by one pair: conflict-free lane-per-row reads.
    __shared__ bf16 sk[KT][HEAD_DIM + 2];
    __shared__ bf16 sv[KT][HEAD_DIM];
    if (active) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            const bf16* qp = qkv + (size_t)t * width + (kvh * G + g) * D;
#if PA_SQ_F32
            for (int d = lane; d < D; d += 32) sq[warp][g][d] = bf2f(qp[d]) * scale;
#else
            for (int d = lane; d < D; d += 32) sq[warp][g][d] = qp[d];
#endif
        }
    }
    float acc[GQA][ATT_E], m[GQA], l[GQA];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -1e30f; l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) acc[g][e] = 0.f;
    }
    for (int kt = 0; kt < max_ctx; kt += KT) {
        __syncthreads();
        // Cooperative tile load: rows kt .. kt+KT of K and V (as 32-bit pairs).
        const int pairs = D / 2;
        for (int idx = threadIdx.x; idx < KT * pairs; idx += blockDim.x) {
            int r = idx / pairs, c = idx - r * pairs;
            int j = kt + r;
            unsigned kvk = 0, kvv = 0;
            if (j < max_ctx) {
                int slot = table[j / block_size] * block_size + (j % block_size);
                size_t off = ((size_t)slot * nkv + kvh) * D + 2 * c;
                kvk = *(const unsigned*)(kcache + off);
                kvv = *(const unsigned*)(vcache + off);
            }
            *(unsigned*)(&sk[r][2 * c]) = kvk;
            *(unsigned*)(&sv[r][2 * c]) = kvv;
        }
        __syncthreads();
        if (!active || kt >= my_ctx) continue;
        int j = kt + lane;
        bool valid = j < my_ctx;
#pragma unroll
        for (int g = 0; g < G; g++) {
            float s = 0.f;
#if PA_SQ_F32
            const float* qv = sq[warp][g];
#pragma unroll 8
            for (int d = 0; d < D; d += 2) {
                unsigned kk = *(const unsigned*)(&sk[lane][d]);
                s += qv[d] * __uint_as_float(kk << 16) + qv[d + 1] * __uint_as_float(kk & 0xffff0000u);
            }
#else
            const bf16* qv = sq[warp][g];
#pragma unroll 8
            for (int d = 0; d < D; d += 2) {
                unsigned kk = *(const unsigned*)(&sk[lane][d]), qq = *(const unsigned*)(&qv[d]);
                s += __uint_as_float(qq << 16) * __uint_as_float(kk << 16) +
                     __uint_as_float(qq & 0xffff0000u) * __uint_as_float(kk & 0xffff0000u);
            }
            s *= scale;
#endif
            s = valid ? s : -1e30f;
            float mn = fmaxf(m[g], warp_max(s));
            float corr = __expf(m[g] - mn);
            float p = valid ? __expf(s - mn) : 0.f;
            l[g] = l[g] * corr + warp_sum(p);
#pragma unroll
            for (int e = 0; e < E; e++) acc[g][e] *= corr;
            int lim = min(KT, my_ctx - kt);
            for (int jj = 0; jj < lim; jj++) {
                float pj = __shfl_sync(0xffffffff, p, jj);
#pragma unroll
                for (int e = 0; e < E; e++) if (dact) acc[g][e] += pj * bf2f(sv[jj][d0 + e]);
            }
            m[g] = mn;
        }
    }
    if (!active) return;
#pragma unroll
    for (int g = 0; g < G; g++) {
        float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
#pragma unroll
        for (int e = 0; e < E; e++)
            if (dact) out[(size_t)t * nq * D + (kvh * G + g) * D + d0 + e] = f2bf(acc[g][e] * inv);
    }
}

// Attention of the embedding path on tensor cores (flash-attention 2 style, bf16
// mma.sync m16n8k16 with fp32 accumulation): causal (the decoders), or bidirectional over
// the whole sequence when `causal` is 0 (the encoders). Each sequence's tokens are
// consecutive rows of qkv (k already normed and rotated in place) and start at position 0,
// so K/V are read straight from qkv: no cache write, no score matrix in memory. One block per (tile of 64
// query positions of one sequence, query head), 4 warps of 16 query rows; keys stream
// through shared memory in tiles of 64, two tiles in flight (cp.async: the next tile loads
// while this one is computed, FlashAttention-2's pipeline); online softmax in registers. Tiles come from the
// host: tiles[3 * b] = first token row of the sequence, [3b + 1] = first query position,
// [3b + 2] = sequence length. Needs HEAD_DIM % 16 == 0.
#if HEAD_DIM % 16 == 0
#define FA_BQ 64
#define FA_BK 64
#define FA_PAD 8
// Dynamic shared memory of the flash kernels: two stages (the main loop alternates them,
// `it & 1`) of a K tile and a V tile, rows padded so that ldmatrix's eight 16-byte rows
// fall in distinct banks (`flash_smem_bytes` in kernels.rs).
#define FA_ROW (HEAD_DIM + FA_PAD)
#define FA_TILE_ELEMS (FA_BK * FA_ROW)
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
// 16 bytes global -> shared without a register round trip; zeros when !valid (keys past
// the context: their V rows must be 0, not stale, since 0 * NaN would poison the sums).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// Scores of one warp's 16 rows x FA_BK keys: scaled to base 2, then (MASK) -inf where a
// key lies past the row (causal) or past the context; the rows' maxima (of this lane's
// columns). Only a tile on the diagonal or at the context's end needs the mask: the
// others skip its per-element comparisons (issue-bound kernel, 2026-12-03).
template <bool MASK>
__device__ __forceinline__ void fa_scale_mask(float (&sc)[FA_BK / 8][4], float scale_log2, bool diag, int k0,
                                              int row0, int ctx, int g, int tg, float& mx0, float& mx1) {
    const float NEG = __int_as_float(0xff800000);
#pragma unroll
    for (int n = 0; n < FA_BK / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float v = sc[n][e] * scale_log2;
            if (MASK) {
                int key = k0 + n * 8 + 2 * tg + (e & 1);
                int row = row0 + g + (e >> 1) * 8;
                if (diag && key > row) v = NEG;
                if (key >= ctx) v = NEG;
            }
            sc[n][e] = v;
        }
        mx0 = fmaxf(mx0, fmaxf(sc[n][0], sc[n][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[n][2], sc[n][3]));
    }
}
// One block's work, shared by the two entry points below. PAGED = false: K/V of the
// sequence's `len` tokens are rows s0.. of qkv and the sequence starts at position 0 (p0 =
// 0). PAGED = true: the rows s0.. of qkv are a chunk of `len` tokens at positions p0..,
// and every key 0 .. p0 + len - 1 (the chunk's own included: qk_norm_rope_kv wrote them)
// is read from the paged cache through `table`.
template <bool PAGED>
__device__ __forceinline__ void flash_attention_tile(
    const bf16* __restrict__ qkv, bf16* __restrict__ out, const bf16* __restrict__ kcache,
    const bf16* __restrict__ vcache, const int* __restrict__ table, int block_size, int s0, int q0,
    int len, int p0, int nkv, float scale_log2, int causal) {
    const int D = HEAD_DIM, G = GQA, KC = HEAD_DIM / 16, ND = HEAD_DIM / 8;
    const int nq = nkv * G, width = (nq + 2 * nkv) * D;
    const int h = blockIdx.y, kvh = h / G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    const int qr = q0 + warp * 16;  // this warp's first query position
    extern __shared__ __align__(16) bf16 fa_smem[];
    // Stage s: K tile at fa_smem + 2 s FA_TILE_ELEMS, V tile right after it; row r, column c
    // at r * FA_ROW + c.
    const float NEG = __int_as_float(0xff800000);
    // Q fragments (A operand, row-major 16 x 16 per chunk); rows past the sequence read
    // its last row and are never written out.
    unsigned qf[KC][4];
    {
        int r0 = min(qr + g, len - 1), r1 = min(qr + g + 8, len - 1);
        const bf16* p0 = qkv + (size_t)(s0 + r0) * width + h * D + 2 * tg;
        const bf16* p1 = qkv + (size_t)(s0 + r1) * width + h * D + 2 * tg;
#pragma unroll
        for (int c = 0; c < KC; c++) {
            qf[c][0] = *(const unsigned*)(p0 + 16 * c);
            qf[c][1] = *(const unsigned*)(p1 + 16 * c);
            qf[c][2] = *(const unsigned*)(p0 + 16 * c + 8);
            qf[c][3] = *(const unsigned*)(p1 + 16 * c + 8);
        }
    }
    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = NEG, m1 = NEG, l0 = 0.f, l1 = 0.f;
    // Keys 0 .. kend - 1 of the context; query row r sits at position p0 + r.
    const int ctx = p0 + len;
    const int kend = causal ? min(p0 + q0 + FA_BQ, ctx) : ctx;
    const bool warp_live = qr < len;
    // Loads the K/V tile of keys k0 .. k0 + FA_BK - 1 into stage st (one cp.async group).
    auto load_tile = [&](int k0, int st) {
        bf16* sk = fa_smem + 2 * st * FA_TILE_ELEMS;
        bf16* sv = sk + FA_TILE_ELEMS;
        const int vecs = D / 8;  // 16-byte vectors per row
#pragma unroll 1
        for (int idx = threadIdx.x; idx < FA_BK * vecs; idx += blockDim.x) {
            int r = idx / vecs, c = (idx - r * vecs) * 8;
            int j = k0 + r;
            bool valid = j < ctx;
            const bf16 *ks, *vs;
            if (PAGED) {
                size_t off = valid ? ((size_t)(table[j / block_size] * block_size + j % block_size) * nkv + kvh) * D + c : 0;
                ks = kcache + off;
                vs = vcache + off;
            } else {
                ks = qkv + (size_t)(s0 + (valid ? j : 0)) * width + (nq + kvh) * D + c;
                vs = ks + nkv * D;
            }
            cp_async16(sk + r * FA_ROW + c, ks, valid);
            cp_async16(sv + r * FA_ROW + c, vs, valid);
        }
        cp_async_commit();
    };
    const int ntiles = (kend + FA_BK - 1) / FA_BK;
    load_tile(0, 0);
    for (int it = 0; it < ntiles; it++) {
        const int k0 = it * FA_BK, st = it & 1;
        // The next tile goes into the other stage, which the previous iteration finished
        // reading before its closing barrier; then wait for this tile's group only.
        if (it + 1 < ntiles) {
            load_tile(k0 + FA_BK, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* sk = fa_smem + 2 * st * FA_TILE_ELEMS;
        const bf16* sv = sk + FA_TILE_ELEMS;
        // Warps whose rows all precede the tile (causal) or lie past the chunk skip it.
        if (warp_live && !(causal && k0 > p0 + qr + 15)) {
            // S = Q K^T for this warp's 16 rows and the tile's 64 keys; ldmatrix (not
            // transposed) gives the B fragments of two 16-dim chunks of 8 keys at once.
            float sc[FA_BK / 8][4];
#pragma unroll
            for (int n = 0; n < FA_BK / 8; n++) {
                sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
                for (int c = 0; c < KC; c += 2) {
                    unsigned r0, r1, r2, r3;
                    if (c + 1 < KC) {
                        const bf16* src = sk + (n * 8 + (lane & 7)) * FA_ROW + 16 * c + 8 * (lane >> 3);
                        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                                     : "r"(smem_addr(src)));
                        mma_bf16(sc[n], qf[c], r0, r1);
                        mma_bf16(sc[n], qf[c + 1], r2, r3);
                    } else {
                        const bf16* src = sk + (n * 8 + (lane & 7)) * FA_ROW + 16 * c + 8 * ((lane >> 3) & 1);
                        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                                     : "=r"(r0), "=r"(r1)
                                     : "r"(smem_addr(src)));
                        mma_bf16(sc[n], qf[c], r0, r1);
                    }
                }
            }
            // Scale, causal (where it is) and length mask, online softmax (rows g and g + 8 of the warp).
            float mx0 = NEG, mx1 = NEG;
            const bool diag = causal && k0 + FA_BK > p0 + qr;
            if (diag || k0 + FA_BK > ctx)
                fa_scale_mask<true>(sc, scale_log2, diag, k0, p0 + qr, ctx, g, tg, mx0, mx1);
            else
                fa_scale_mask<false>(sc, scale_log2, diag, k0, p0 + qr, ctx, g, tg, mx0, mx1);
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
            float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            // A row with every key masked so far keeps max -inf: subtract 0 instead (p = 0).
            float b0 = n0 == NEG ? 0.f : n0, b1 = n1 == NEG ? 0.f : n1;
            float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);
            m0 = n0; m1 = n1;
            float ps0 = 0.f, ps1 = 0.f;
            unsigned pa[FA_BK / 16][4];
#pragma unroll
            for (int n = 0; n < FA_BK / 8; n++) {
                float p0 = exp2f(sc[n][0] - b0), p1 = exp2f(sc[n][1] - b0);
                float p2 = exp2f(sc[n][2] - b1), p3 = exp2f(sc[n][3] - b1);
                ps0 += p0 + p1; ps1 += p2 + p3;
                // C fragment of key tiles 2c and 2c+1 = A fragment of key chunk c.
                pa[n / 2][(n & 1) * 2] = pack_bf16x2(p0, p1);
                pa[n / 2][(n & 1) * 2 + 1] = pack_bf16x2(p2, p3);
            }
            l0 = l0 * c0 + ps0; l1 = l1 * c1 + ps1;
            // Once the rows' maxima settle (most tiles of a long prompt), c0 = c1 = 1 exactly
            // in every lane: the warp skips rescaling its accumulators (the same values).
            if (__any_sync(0xffffffff, c0 != 1.f || c1 != 1.f)) {
#pragma unroll
                for (int n = 0; n < ND; n++) { o[n][0] *= c0; o[n][1] *= c0; o[n][2] *= c1; o[n][3] *= c1; }
            }
            // O += P V: V rows (keys) are the k dimension; ldmatrix.trans gives B fragments.
#pragma unroll
            for (int c = 0; c < FA_BK / 16; c++) {
                const int mi = lane >> 3, ri = lane & 7;
#pragma unroll
                for (int n = 0; n < ND; n += 2) {
                    const bf16* src = sv + (c * 16 + (mi & 1) * 8 + ri) * FA_ROW + (n + (mi >> 1)) * 8;
                    unsigned r0, r1, r2, r3;
                    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                                 : "r"(smem_addr(src)));
                    mma_bf16(o[n], pa[c], r0, r1);
                    mma_bf16(o[n + 1], pa[c], r2, r3);
                }
            }
        }
        __syncthreads();
    }
    if (!warp_live) return;
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    int r0 = qr + g, r1 = qr + g + 8;
#pragma unroll
    for (int n = 0; n < ND; n++) {
        int col = h * D + n * 8 + 2 * tg;
        if (r0 < len) *(unsigned*)(out + (size_t)(s0 + r0) * nq * D + col) = pack_bf16x2(o[n][0] * i0, o[n][1] * i0);
        if (r1 < len) *(unsigned*)(out + (size_t)(s0 + r1) * nq * D + col) = pack_bf16x2(o[n][2] * i1, o[n][3] * i1);
    }
}
extern "C" __global__ void __launch_bounds__(128, FA_MIN_BLOCKS) embed_flash_attention(
    const bf16* __restrict__ qkv, bf16* __restrict__ out, const int* __restrict__ tiles, int nkv,
    float scale_log2, int causal) {
    const int* t = tiles + 3 * blockIdx.x;
    flash_attention_tile<false>(qkv, out, nullptr, nullptr, nullptr, 1, t[0], t[1], t[2], 0, nkv, scale_log2,
                                causal);
}
// The generators' prefill on tensor cores: causal attention of prompt chunks whose keys
// are in the paged cache (a chunk that continues a sequence attends to what earlier steps
// wrote). Tiles come from the step metadata, five ints each: first token row of the
// chunk, first query of the tile within the chunk, the chunk's length, the position of its
// first token, and its sequence (row of block_tables).
extern "C" __global__ void __launch_bounds__(128, FA_MIN_BLOCKS) prefill_flash_attention(
    const bf16* __restrict__ qkv, bf16* __restrict__ out, const bf16* __restrict__ kcache,
    const bf16* __restrict__ vcache, const int* __restrict__ block_tables, int max_blocks,
    const int* __restrict__ tiles, int block_size, int nkv, float scale_log2) {
    const int* t = tiles + 5 * blockIdx.x;
    flash_attention_tile<true>(qkv, out, kcache, vcache, block_tables + (size_t)t[4] * max_blocks, block_size,
                               t[0], t[1], t[2], t[3], nkv, scale_log2, 1);
}

// Decode attention on tensor cores, split over the context (flash-decoding). The host
// cuts every decode slot's keys 0..=pos into work items of at most `chunk` keys
// (`work[3i..3i+3]` = slot, first key, keys; the items of slot s are
// item_first[s] .. item_first[s + 1], their total is item_first[slots]; a padding row
// has one item of no keys), sized so that a step has about as many items as the GPU holds
// warps, whatever the batch and context. Slot s is token row dec_rows[s]: every row of a
// decode step, or the one-token sequences of a step that also carries prompt chunks. One
// warp per (item, kv head), warp w of the grid on item w / nkv and head w % nkv, four warps
// per block, no shared memory, GQA <= 8: the group's query heads are the 8 columns of
// mma.m16n8k16 (columns >= GQA are zero).
// Scores are computed transposed, S^T = K Q^T, 16 keys per step: K streams from the paged
// cache straight into A fragments (lane (r, tg) loads keys r and r + 8 of the step as
// 16-byte vectors, chunk 4 cc + tg of the row, 8 dims; that is an A fragment for a
// permutation of the head dims, which Q's B fragment follows: the dot product does not
// care). Online softmax per head in registers (exp2, scores scaled by log2 e / sqrt D).
// Then O^T += V^T P^T: P^T's C fragments and V's 8x8 bf16 blocks are transposed in
// registers with movmatrix into B and A fragments. (Loading the next 16 keys before this
// step's arithmetic was tried: 190 registers instead of 126, and slower at every size.)
// A token with a single item writes its bf16 output directly. The others write fp32
// partials (unnormalised o, and m, l per head); the last of a token's warps to finish
// (a counter per (token, kv head), reset by that warp for the next launch) merges them.
#if GQA <= 8
#define DA_WARPS 4
#define DA_NCC ((HEAD_DIM + 31) / 32)
__device__ __forceinline__ unsigned movm_trans(unsigned x) {
    unsigned y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}
__device__ __forceinline__ unsigned u4_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
// K and V of keys k0 + r and k0 + 8 + r (zeros past `end`), this lane's chunks.
__device__ __forceinline__ void da_load(uint4 (&kf)[2][DA_NCC], uint4 (&vf)[2][DA_NCC], const bf16* __restrict__ kcache,
                                        const bf16* __restrict__ vcache, const int* __restrict__ table, int k0,
                                        int end, int r, int tg, int block_size, int nkv, int kvh) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int tt = 0; tt < 2; tt++) {
        const int j = k0 + 8 * tt + r;
        const bool ok = j < end;
        size_t base = 0;
        if (ok) base = ((size_t)(table[j / block_size] * block_size + j % block_size) * nkv + kvh) * HEAD_DIM;
#pragma unroll
        for (int cc = 0; cc < DA_NCC; cc++) {
            const int ci = 4 * cc + tg;
            kf[tt][cc] = (ok && ci < HEAD_DIM / 8) ? *(const uint4*)(kcache + base + 8 * ci) : zero;
            vf[tt][cc] = (ok && ci < HEAD_DIM / 8) ? *(const uint4*)(vcache + base + 8 * ci) : zero;
        }
    }
}
// The running state of one warp's (item, KV head): the O^T accumulators (o[cc][j] rows
// are dims 8 (4 cc + r / 2) + 4 j + (r & 1) (+ 2 for rows 8..15), columns heads 2 tg,
// 2 tg + 1) and the online softmax of heads 2 tg (a) and 2 tg + 1 (b); l is this lane's
// share until da_finish sums it.
struct DaAcc {
    float o[DA_NCC][2][4];
    float ma, mb, la, lb;
};
// Q^T as B fragments (head r of the group, zero past GQA; this lane's chunks) and an empty
// accumulator.
__device__ __forceinline__ void da_start(uint4 (&qb)[DA_NCC], DaAcc& acc, const bf16* __restrict__ qkv, int t,
                                         int nkv, int kvh, int r, int tg) {
    const int NCH = HEAD_DIM / 8, width = (nkv * GQA + 2 * nkv) * HEAD_DIM;
    const bf16* qrow = qkv + (size_t)t * width + (size_t)(kvh * GQA + r) * HEAD_DIM;
#pragma unroll
    for (int cc = 0; cc < DA_NCC; cc++) {
        const int ci = 4 * cc + tg;
        qb[cc] = (r < GQA && ci < NCH) ? *(const uint4*)(qrow + 8 * ci) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int cc = 0; cc < DA_NCC; cc++)
#pragma unroll
        for (int j = 0; j < 2; j++) acc.o[cc][j][0] = acc.o[cc][j][1] = acc.o[cc][j][2] = acc.o[cc][j][3] = 0.f;
    acc.ma = acc.mb = __int_as_float(0xff800000);
    acc.la = acc.lb = 0.f;
}
// The 16 keys k0 .. k0 + 15 (K and V fragments as da_load gives them; keys at or past
// `end` are masked) into the accumulator.
__device__ __forceinline__ void da_tile(DaAcc& acc, const uint4 (&kf)[2][DA_NCC], const uint4 (&vf)[2][DA_NCC],
                                        const uint4 (&qb)[DA_NCC], int k0, int end, int r, float scale_log2) {
    const float NEG = __int_as_float(0xff800000);
    // S^T (16 keys x 8 heads): s[0], s[1] = key k0 + r, heads 2 tg, 2 tg + 1; s[2], s[3] = key k0 + 8 + r.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int cc = 0; cc < DA_NCC; cc++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            unsigned a[4] = {u4_word(kf[0][cc], 2 * h), u4_word(kf[1][cc], 2 * h), u4_word(kf[0][cc], 2 * h + 1),
                             u4_word(kf[1][cc], 2 * h + 1)};
            mma_bf16(s, a, u4_word(qb[cc], 2 * h), u4_word(qb[cc], 2 * h + 1));
        }
    const bool v0 = k0 + r < end, v1 = k0 + 8 + r < end;
    s[0] = v0 ? s[0] * scale_log2 : NEG;
    s[1] = v0 ? s[1] * scale_log2 : NEG;
    s[2] = v1 ? s[2] * scale_log2 : NEG;
    s[3] = v1 ? s[3] * scale_log2 : NEG;
    float xa = fmaxf(s[0], s[2]), xb = fmaxf(s[1], s[3]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        xa = fmaxf(xa, __shfl_xor_sync(0xffffffff, xa, off));
        xb = fmaxf(xb, __shfl_xor_sync(0xffffffff, xb, off));
    }
    // Key k0 is always inside the item, so the new maxima are finite.
    const float na = fmaxf(acc.ma, xa), nb = fmaxf(acc.mb, xb);
    const float ca = exp2f(acc.ma - na), cb = exp2f(acc.mb - nb);
    acc.ma = na; acc.mb = nb;
    const float p0 = exp2f(s[0] - na), p1 = exp2f(s[1] - nb), p2 = exp2f(s[2] - na), p3 = exp2f(s[3] - nb);
    acc.la = acc.la * ca + p0 + p2;
    acc.lb = acc.lb * cb + p1 + p3;
    // P^T as B fragments (keys x heads): transpose the 8x8 C blocks.
    const unsigned pb0 = movm_trans(pack_bf16x2(p0, p1));
    const unsigned pb1 = movm_trans(pack_bf16x2(p2, p3));
#pragma unroll
    for (int cc = 0; cc < DA_NCC; cc++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float* o = acc.o[cc][j];
            o[0] *= ca; o[1] *= cb; o[2] *= ca; o[3] *= cb;
            // V^T as A fragments (dims x keys): words 2 j (rows 0..7) and 2 j + 1 (rows 8..15).
            unsigned a[4] = {movm_trans(u4_word(vf[0][cc], 2 * j)), movm_trans(u4_word(vf[0][cc], 2 * j + 1)),
                             movm_trans(u4_word(vf[1][cc], 2 * j)), movm_trans(u4_word(vf[1][cc], 2 * j + 1))};
            mma_bf16(o, a, pb0, pb1);
        }
}
// The warp's result: a token with a single item writes its bf16 output directly; the
// others write fp32 partials (unnormalised o, and m, l per head), and the last of a
// token's warps to finish (a counter per (token, kv head), reset by that warp for the next
// launch) merges them.
__device__ __forceinline__ void da_finish(DaAcc& acc, bf16* __restrict__ out, const int* __restrict__ work,
                                          float* __restrict__ part_o, float2* __restrict__ part_ml,
                                          int* __restrict__ counters, int item, int kvh, int nkv, int t, int first,
                                          int count, int lane, int r, int tg) {
    const int D = HEAD_DIM, G = GQA, NCH = HEAD_DIM / 8, nq = nkv * G;
    const float NEG = __int_as_float(0xff800000);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        acc.la += __shfl_xor_sync(0xffffffff, acc.la, off);
        acc.lb += __shfl_xor_sync(0xffffffff, acc.lb, off);
    }
    // This lane's outputs: heads 2 tg + e, dims 8 ci + 4 j + 2 w + (r & 1), ci = 4 cc + r / 2.
#pragma unroll
    for (int e = 0; e < 2; e++) {
        const int g = 2 * tg + e;
        if (g >= G) continue;
        const float l = e ? acc.lb : acc.la, m = e ? acc.mb : acc.ma;
        const size_t row = ((size_t)item * nkv + kvh) * G + g;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        bf16* dst = out + (size_t)t * nq * D + (size_t)(kvh * G + g) * D;
#pragma unroll
        for (int cc = 0; cc < DA_NCC; cc++) {
            const int ci = 4 * cc + (r >> 1);
            if (ci >= NCH) continue;
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int w = 0; w < 2; w++) {
                    const int d = 8 * ci + 4 * j + 2 * w + (r & 1);
                    const float v = acc.o[cc][j][2 * w + e];
                    if (count == 1) dst[d] = f2bf(v * inv);
                    else part_o[row * D + d] = v;
                }
        }
        if (count != 1 && r == 0) part_ml[row] = make_float2(m, l);
    }
    if (count == 1) return;
    // Split token: the last of its warps to get here merges the partials (log-sum-exp in
    // base 2). Release: every lane's partials, then one counter increment; acquire: the
    // last warp fences before reading the others' partials past L1.
    __threadfence();
    __syncwarp();
    int prev = 0;
    const int slot = work[3 * item];
    if (lane == 0) prev = atomicAdd(counters + slot * nkv + kvh, 1);
    prev = __shfl_sync(0xffffffff, prev, 0);
    if (prev != count - 1) return;
    __threadfence();
    // Lanes over (head, 4 dims) slots, items in order with a running maximum: each item's
    // loads (every slot's m, l and o) are independent of the previous item's sums, so a
    // merge costs about one round trip per item, not one per item and head.
    constexpr int Q4 = HEAD_DIM / 4, SLOTS = (G * Q4 + 31) / 32;
    float4 num[SLOTS];
    float den[SLOTS], mx[SLOTS];
#pragma unroll
    for (int q = 0; q < SLOTS; q++) {
        num[q] = make_float4(0.f, 0.f, 0.f, 0.f);
        den[q] = 0.f;
        mx[q] = NEG;
    }
#pragma unroll 2
    for (int i = 0; i < count; i++) {
        const size_t base = ((size_t)(first + i) * nkv + kvh) * G;
#pragma unroll
        for (int q = 0; q < SLOTS; q++) {
            const int sl = lane + 32 * q;
            if (sl >= G * Q4) continue;
            const size_t row = base + sl / Q4;
            const float2 ml = __ldcg(part_ml + row);
            const float4 v = __ldcg((const float4*)(part_o + row * D) + sl % Q4);
            // Every item has a key, so ml.x and the new maximum are finite.
            const float nm = fmaxf(mx[q], ml.x), c = exp2f(mx[q] - nm), w = exp2f(ml.x - nm);
            num[q].x = num[q].x * c + w * v.x;
            num[q].y = num[q].y * c + w * v.y;
            num[q].z = num[q].z * c + w * v.z;
            num[q].w = num[q].w * c + w * v.w;
            den[q] = den[q] * c + w * ml.y;
            mx[q] = nm;
        }
    }
#pragma unroll
    for (int q = 0; q < SLOTS; q++) {
        const int sl = lane + 32 * q;
        if (sl >= G * Q4) continue;
        const int g = sl / Q4, d4 = sl % Q4;
        const float inv = den[q] > 0.f ? 1.f / den[q] : 0.f;
        uint2 packed = make_uint2(pack_bf16x2(num[q].x * inv, num[q].y * inv), pack_bf16x2(num[q].z * inv, num[q].w * inv));
        *(uint2*)(out + (size_t)t * nq * D + (size_t)(kvh * G + g) * D + 4 * d4) = packed;
    }
    if (lane == 0) counters[slot * nkv + kvh] = 0;
}
// The kernels' common arguments, as both entry points take them.
#define DA_PARAMS                                                                                                     \
    const bf16 *__restrict__ qkv, bf16 *__restrict__ out, const bf16 *__restrict__ kcache,                          \
        const bf16 *__restrict__ vcache, const int *__restrict__ block_tables, int max_blocks,                      \
        const int *__restrict__ seq_of, const int *__restrict__ work, const int *__restrict__ item_first,           \
        const int *__restrict__ dec_rows, float *__restrict__ part_o, float2 *__restrict__ part_ml,                 \
        int *__restrict__ counters, int slots, int block_size, int nkv, float scale_log2
// This warp's (item, KV head) and the item's token, keys and table. KV heads vary fastest
// over the warps: the heads of one work item run side by side and read each key's row of
// every head (nkv * D contiguous elements) at about the same time, as vLLM's grid (heads,
// sequences) does, rather than each head's slice of it in a different wave. The slot is
// read again where it is needed, so that it holds no register in the loop.
#define DA_WARP_SETUP                                                                                                 \
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, tg = lane & 3;                         \
    const int wid = blockIdx.x * DA_WARPS + warp, item = wid / nkv, kvh = wid - item * nkv;                          \
    if (item >= item_first[slots]) return;                                                                            \
    const int start = work[3 * item + 1], end = start + work[3 * item + 2];                                           \
    const int t = dec_rows[work[3 * item]];                                                                           \
    const int first = item_first[work[3 * item]], count = item_first[work[3 * item] + 1] - first;                    \
    const int* table = block_tables + (size_t)seq_of[t] * max_blocks;
// Four blocks resident (at most 128 registers): the merge's per-slot sums must not cost
// the main loop a block. Each tile's K and V go from memory straight into registers.
extern "C" __global__ void __launch_bounds__(DA_WARPS * 32, 4) decode_attention(DA_PARAMS) {
    DA_WARP_SETUP
    uint4 qb[DA_NCC];
    DaAcc acc;
    da_start(qb, acc, qkv, t, nkv, kvh, r, tg);
    for (int k0 = start; k0 < end; k0 += 16) {
        uint4 kf[2][DA_NCC], vf[2][DA_NCC];
        da_load(kf, vf, kcache, vcache, table, k0, end, r, tg, block_size, nkv, kvh);
        da_tile(acc, kf, vf, qb, k0, end, r, scale_log2);
    }
    da_finish(acc, out, work, part_o, part_ml, counters, item, kvh, nkv, t, first, count, lane, r, tg);
}
// decode_attention with the K/V tiles copied by cp.async into a ring of DA_STAGES tiles
// per warp in dynamic shared memory (`decode_pipe_smem_bytes` in kernels.rs), so that a
// warp has the next DA_STAGES - 1 tiles in flight while it computes one, and no
// registers hold loads in flight. A tile is 16 keys' rows of K, then of V, DA_RS 16-byte
// chunks a row: the fragment reads (lanes (r, tg): chunk 4 cc + tg of keys r, r + 8) must
// put keys r and r + 1 in different bank halves, so chunks swap halves on odd keys where a
// row is a multiple of 8 chunks (da_swz), and rows are padded to 4 mod 8 chunks otherwise.
#define DA_STAGES 3
#define DA_NCH (HEAD_DIM / 8)
#define DA_RS (DA_NCH % 8 == 0 ? DA_NCH : DA_NCH + ((4 - DA_NCH % 8) & 7))
#define DA_TILE_U4 (16 * DA_RS)
__device__ __forceinline__ int da_swz(int key, int ch) { return DA_NCH % 8 == 0 ? ch ^ ((key & 1) << 2) : ch; }
extern "C" __global__ void __launch_bounds__(DA_WARPS * 32, 2) decode_attention_pipe(DA_PARAMS) {
    DA_WARP_SETUP
    uint4 qb[DA_NCC];
    DaAcc acc;
    da_start(qb, acc, qkv, t, nkv, kvh, r, tg);
    extern __shared__ uint4 da_ring[];
    uint4* ring = da_ring + (size_t)warp * DA_STAGES * 2 * DA_TILE_U4;
    const int tiles = (end - start + 15) / 16;
    // Tile i into stage i % DA_STAGES: K rows then V rows, consecutive lanes on
    // consecutive chunks of a key (coalesced). Keys past the item copy nothing and read
    // zeros (cp_async16). Past the last tile the group is empty, which keeps the count of
    // groups the wait leaves pending the same on every iteration.
    auto issue = [&](int i) {
        if (i < tiles) {
            uint4* ks = ring + (i % DA_STAGES) * 2 * DA_TILE_U4;
            const int k0 = start + 16 * i;
            for (int idx = lane; idx < 16 * DA_NCH; idx += 32) {
                const int key = idx / DA_NCH, ch = idx - key * DA_NCH, j = k0 + key;
                const bool ok = j < end;
                size_t at = 0;
                if (ok) at = ((size_t)(table[j / block_size] * block_size + j % block_size) * nkv + kvh) * HEAD_DIM + 8 * ch;
                const int p = key * DA_RS + da_swz(key, ch);
                cp_async16(ks + p, kcache + at, ok);
                cp_async16(ks + DA_TILE_U4 + p, vcache + at, ok);
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < DA_STAGES - 1; i++) issue(i);
    for (int i = 0; i < tiles; i++) {
        issue(i + DA_STAGES - 1);
        cp_async_wait<DA_STAGES - 1>();
        __syncwarp();  // the other lanes' copies of tile i are visible
        const uint4* ks = ring + (i % DA_STAGES) * 2 * DA_TILE_U4;
        uint4 kf[2][DA_NCC], vf[2][DA_NCC];
#pragma unroll
        for (int tt = 0; tt < 2; tt++)
#pragma unroll
            for (int cc = 0; cc < DA_NCC; cc++) {
                const int key = 8 * tt + r, ci = 4 * cc + tg;
                const bool in = ci < DA_NCH;
                kf[tt][cc] = in ? ks[key * DA_RS + da_swz(key, ci)] : make_uint4(0, 0, 0, 0);
                vf[tt][cc] = in ? ks[DA_TILE_U4 + key * DA_RS + da_swz(key, ci)] : make_uint4(0, 0, 0, 0);
            }
        __syncwarp();  // every lane has read stage i % DA_STAGES before the next issue refills it
        da_tile(acc, kf, vf, qb, start + 16 * i, end, r, scale_log2);
    }
    cp_async_wait<0>();
    da_finish(acc, out, work, part_o, part_ml, counters, item, kvh, nkv, t, first, count, lane, r, tg);
}
#endif
#endif

// Greedy sampling: out[r] = argmax(logits[r, :]) (fp32 logits); ties go to the lowest id,
// as on the CPU. One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int* __restrict__ out, int vocab) {
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float best = __int_as_float(0xff800000);
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = x[i];
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffff, best, o);
        int oi = __shfl_xor_sync(0xffffffff, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        int nw = blockDim.x >> 5;
        for (int w = 1; w < nw; w++)
            if (sv[w] > best || (sv[w] == best && si[w] < bi)) { best = sv[w]; bi = si[w]; }
        out[blockIdx.x] = bi;
    }
}

// Seeded dummy weights: a counter-based hash (splitmix64) per element gives a uniform in
// [-a, a), so any model shape fills at memory speed without host work or transfers.
extern "C" __global__ void fill_uniform(bf16* __restrict__ out, unsigned long long n, unsigned long long seed,
                                       float a, float offset) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        float u = uniform01(seed, i);
        out[i] = f2bf(offset + a * (2.f * u - 1.f));
    }
}
