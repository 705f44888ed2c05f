// Kernels of the built-in engine's CUDA backend, compiled at start-up by NVRTC for the
// device's architecture. Storage is bf16, arithmetic and accumulation are fp32. The
// residual stream is kept in fp32 (one buffer per step) so that 28+ layers of adds do not
// round away the small updates. Every kernel has a portable reference in the CPU backend.
//
// Paged KV layout (see runner.rs): K and V caches of one layer are
// [num_blocks * block_size, num_kv_heads, head_dim] bf16; token at slot s lives at row s.
// bf16 is handled as raw 16-bit storage with our own conversions (round to nearest even,
// as cuda_bf16.h does), so compilation needs no CUDA headers on the machine: NVRTC alone.
typedef unsigned short bf16;

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

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

// out[t, :] = table[ids[t], :] (bf16), residual[t, :] = same in fp32.
extern "C" __global__ void embed_gather(const bf16* __restrict__ table, const int* __restrict__ ids,
                                        float* __restrict__ residual, int hidden) {
    int t = blockIdx.x;
    const bf16* row = table + (size_t)ids[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        residual[(size_t)t * hidden + i] = bf2f(row[i]);
}

// RMSNorm fused with the residual add: if `delta` is non-null, residual += delta (fp32
// stream, bf16 delta); then out = rmsnorm(residual) * w. One block per row.
// `rows` (optional) maps output row r to input row rows[r] (last-token gather for lm_head
// and pooling); then delta must be null.
extern "C" __global__ void add_rmsnorm(float* __restrict__ residual, const bf16* __restrict__ delta,
                                       const bf16* __restrict__ w, bf16* __restrict__ out,
                                       const int* __restrict__ rows, int hidden, float eps) {
    int r = blockIdx.x;
    int src = rows ? rows[r] : r;
    float* x = residual + (size_t)src * hidden;
    const bf16* d = delta ? delta + (size_t)src * hidden : nullptr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = x[i];
        if (d) { v += bf2f(d[i]); x[i] = v; }
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)r * hidden + i] = f2bf(x[i] * inv * bf2f(w[i]));
}

// Like add_rmsnorm with rows, but fp32 output (pooling: the embedding is read on the host).
extern "C" __global__ void rmsnorm_rows_f32(const float* __restrict__ residual, const bf16* __restrict__ w,
                                            float* __restrict__ out, const int* __restrict__ rows,
                                            int hidden, float eps) {
    int r = blockIdx.x;
    const float* x = residual + (size_t)rows[r] * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += x[i] * x[i];
    float inv = rsqrtf(block_sum(ss) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        out[(size_t)r * hidden + i] = x[i] * inv * bf2f(w[i]);
}

// Per-head q/k RMSNorm fused with RoPE (HF non-interleaved: pairs (i, i + D/2)) and the KV
// cache write by slot. qkv is [T, (nq + 2 nkv) * D] from the fused projection; q is
// rotated in place, k (rotated) and v are written to the caches at slots[t] (skipped when
// the slot is negative: padding rows of a captured batch). One block per token, one warp
// per head.
extern "C" __global__ void qk_norm_rope_kv(bf16* __restrict__ qkv, const bf16* __restrict__ qw,
                                          const bf16* __restrict__ kw, const int* __restrict__ positions,
                                          const int* __restrict__ slots, bf16* __restrict__ kcache,
                                          bf16* __restrict__ vcache, int nq, int nkv, int D, float eps,
                                          float theta) {
    int t = blockIdx.x;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    int width = (nq + 2 * nkv) * D;
    bf16* row = qkv + (size_t)t * width;
    float pos = (float)positions[t];
    int slot = slots[t];
    int half = D / 2;
    for (int h = warp; h < nq + 2 * nkv; h += nwarps) {
        bf16* x = row + h * D;
        if (h >= nq + nkv) {  // v: copy to the cache
            if (slot >= 0) {
                bf16* dst = vcache + ((size_t)slot * nkv + (h - nq - nkv)) * D;
                for (int i = lane; i < D; i += 32) dst[i] = x[i];
            }
            continue;
        }
        const bf16* w = h < nq ? qw : kw;
        float ss = 0.f;
        for (int i = lane; i < D; i += 32) { float v = bf2f(x[i]); ss += v * v; }
        float inv = rsqrtf(warp_sum(ss) / D + eps);
        bf16* dst = nullptr;
        if (h >= nq && slot >= 0) dst = kcache + ((size_t)slot * nkv + (h - nq)) * D;
        for (int i = lane; i < half; i += 32) {
            float a = bf2f(x[i]) * inv * bf2f(w[i]);
            float b = bf2f(x[i + half]) * inv * bf2f(w[i + half]);
            float freq = powf(theta, -2.0f * (float)i / (float)D);
            float s, c;
            sincosf(pos * freq, &s, &c);
            bf16 o1 = f2bf(a * c - b * s);
            bf16 o2 = f2bf(b * c + a * s);
            // q and k are rotated in place (the dense embedding attention reads k from
            // here); k also goes to the paged cache.
            x[i] = o1; x[i + half] = o2;
            if (dst) { dst[i] = o1; dst[i + half] = o2; }
        }
    }
}

// out[t, i] = silu(gu[t, i]) * gu[t, I + i]  (gate and up from one fused projection).
extern "C" __global__ void silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int inter, int total) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int t = idx / inter, i = idx - t * inter;
    float g = bf2f(gu[(size_t)t * 2 * inter + i]);
    float u = bf2f(gu[(size_t)t * 2 * inter + inter + i]);
    out[idx] = f2bf(g / (1.f + __expf(-g)) * u);
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
extern "C" __global__ void prefill_attention(const bf16* __restrict__ qkv, bf16* __restrict__ out,
                                            const bf16* __restrict__ kcache, const bf16* __restrict__ vcache,
                                            const int* __restrict__ block_tables, int max_blocks,
                                            const int* __restrict__ seq_of, const int* __restrict__ positions,
                                            const int* __restrict__ tile_start, const int* __restrict__ tile_len,
                                            int block_size, int nkv, float scale) {
    const int D = HEAD_DIM, G = GQA, E = ATT_E;
    const int KS = D + 2;  // padded K row (bf16 elements): conflict-free lane-per-row reads
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

    __shared__ float sq[QT][GQA][HEAD_DIM];
    __shared__ bf16 sk[KT][HEAD_DIM + 2];
    __shared__ bf16 sv[KT][HEAD_DIM];
    if (active) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            const bf16* qp = qkv + (size_t)t * width + (kvh * G + g) * D;
            for (int d = lane; d < D; d += 32) sq[warp][g][d] = bf2f(qp[d]) * scale;
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
            const float* qv = sq[warp][g];
#pragma unroll 8
            for (int d = 0; d < D; d += 2) {
                unsigned kk = *(const unsigned*)(&sk[lane][d]);
                s += qv[d] * __uint_as_float(kk << 16) + qv[d + 1] * __uint_as_float(kk & 0xffff0000u);
            }
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

// Causal softmax of dense attention scores (embedding path): S is [rows, L] fp32 where
// row r is query q = r % L of one (sequence, head); P[r, j] = softmax_j<=q(S * scale) in
// bf16, 0 for j > q. One warp per row.
extern "C" __global__ void causal_softmax(const float* __restrict__ S, bf16* __restrict__ P, int L, int rows,
                                         float scale) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    int q = r % L;
    const float* s = S + (size_t)r * L;
    bf16* p = P + (size_t)r * L;
    float mx = -1e30f;
    for (int j = lane; j <= q; j += 32) mx = fmaxf(mx, s[j] * scale);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int j = lane; j <= q; j += 32) sum += __expf(s[j] * scale - mx);
    float inv = 1.f / warp_sum(sum);
    for (int j = lane; j < L; j += 32) p[j] = f2bf(j <= q ? __expf(s[j] * scale - mx) * inv : 0.f);
}

// attn[t, :] = O[seq_of[t] * L + positions[t], :] (rows of width w bf16): packs the padded
// per-sequence attention output back into the step's token rows.
extern "C" __global__ void gather_padded_rows(const bf16* __restrict__ O, bf16* __restrict__ attn,
                                             const int* __restrict__ seq_of, const int* __restrict__ positions,
                                             int L, int w) {
    int t = blockIdx.x;
    const bf16* src = O + ((size_t)seq_of[t] * L + positions[t]) * w;
    for (int i = threadIdx.x; i < w; i += blockDim.x) attn[(size_t)t * w + i] = src[i];
}

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
        unsigned long long z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = f2bf(offset + a * (2.f * u - 1.f));
    }
}
