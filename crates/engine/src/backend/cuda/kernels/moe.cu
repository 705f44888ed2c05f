// Kernels of Qwen3-MoE's sparse block (transformers' Qwen3MoeSparseMoeBlock, vLLM's fused
// MoE), compiled by NVRTC with common.cu in front, for mixture-of-experts models only.
// The routing never leaves the device, so a decode step with them is captured into a CUDA
// graph like a dense one: the grids are sized for the worst case of a step's token count,
// and blocks past the padded work return at once.
//
// Per sparse layer: router GEMM (cuBLAS, fp32 logits) -> moe_topk_softmax -> moe_align ->
// moe_gemm (gate/up) -> silu_mul -> moe_gemm (down, times the router weight) -> moe_sum;
// FP8 experts take f16 activations: moe_to_f16 before gate/up, moe_silu_mul_f16 for SiLU.
// Flat index s = t * top_k + j names token t's j-th expert choice; expert rows are grouped
// by moe_align into blocks of BM rows of one expert (padded with the sentinel n = T * k).

#define MOE_MAX_EXPERTS 512
#define MOE_EPL (MOE_MAX_EXPERTS / 32)

// One warp per token: softmax of the router logits in fp32, the top k probabilities in k
// rounds of a warp arg-max (ties to the lower expert id, as the CPU's Routing::of_logits),
// divided by their sum when renorm (norm_topk_prob). ids/w: [tokens, k]. A row whose KV
// slot is -1 (slots not null: a decode graph's padding) routes nowhere: ids -1, weights 0,
// so that moe_align leaves it out and no GEMM computes it.
extern "C" __global__ void moe_topk_softmax(const float* __restrict__ logits, int* __restrict__ ids,
                                            float* __restrict__ w, int tokens, int experts, int k,
                                            int renorm, const int* __restrict__ slots) {
    int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (t >= tokens) return;
    if (slots && slots[t] < 0) {
        for (int j = lane; j < k; j += 32) {
            ids[t * k + j] = -1;
            w[t * k + j] = 0.f;
        }
        return;
    }
    const float* row = logits + (size_t)t * experts;
    float p[MOE_EPL];
    float mx = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < MOE_EPL; i++) {
        int e = i * 32 + lane;
        p[i] = e < experts ? row[e] : -__int_as_float(0x7f800000);
        mx = fmaxf(mx, p[i]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < MOE_EPL; i++) {
        p[i] = i * 32 + lane < experts ? expf(p[i] - mx) : 0.f;
        sum += p[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < MOE_EPL; i++) p[i] = i * 32 + lane < experts ? p[i] / sum : -1.f;
    float chosen = 0.f;
    for (int j = 0; j < k; j++) {
        float best = -1.f;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < MOE_EPL; i++)
            if (p[i] > best) { best = p[i]; bi = i * 32 + lane; }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ob = __shfl_xor_sync(0xffffffff, best, o);
            int oi = __shfl_xor_sync(0xffffffff, bi, o);
            if (ob > best || (ob == best && oi < bi)) { best = ob; bi = oi; }
        }
        if (lane == 0) {
            ids[t * k + j] = bi;
            w[t * k + j] = best;
        }
        chosen += best;
#pragma unroll
        for (int i = 0; i < MOE_EPL; i++)
            if (i * 32 + lane == bi) p[i] = -1.f;
    }
    if (renorm && lane == 0)
        for (int j = 0; j < k; j++) w[t * k + j] = w[t * k + j] / chosen;
}

// One block: groups the n = T * k flat choices by expert. Each expert's run is padded to a
// multiple of bm; sorted[cap] holds the flat indices (sentinel n in the padding and past
// the end), block_expert[cap / bm] the expert of each bm-row block (-1 past the end),
// post_pad[0] the padded total. Order within an expert is that of the atomics: no sum
// crosses rows, so results do not depend on it. Shared memory: 3 * experts + 1 ints.
// The atomics are one per warp and expert: a batch of one prompt repeated
// (the seeds' client) routes every token to the same k experts, and one atomic per choice
// would queue the whole block on k counters. blockDim.x must be a multiple of 32.
// sq_sum (when not null) gathers the sum over experts of count^2 across a step's sparse
// layers: the first stores it, the others add (kernels of one stream run in order). The
// host divides it by the choices to learn how many rows per expert a row sees, and picks
// the next step's tile by that (moe_kernels::rows_seen).
extern "C" __global__ void moe_align(const int* __restrict__ ids, int n, int experts, int bm, int cap,
                                     int* __restrict__ sorted, int* __restrict__ block_expert,
                                     int* __restrict__ post_pad, unsigned long long* __restrict__ sq_sum,
                                     int first) {
    extern __shared__ int sh[];
    int* count = sh;
    int* off = sh + experts;
    int* cur = off + experts + 1;
    for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x, e = i < n ? ids[i] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        if (e >= 0 && lane == __ffs(peers) - 1) atomicAdd(&count[e], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        unsigned long long sq = 0;
        for (int e = 0; e < experts; e++) {
            off[e] = acc;
            acc += (count[e] + bm - 1) / bm * bm;
            sq += (unsigned long long)count[e] * (unsigned long long)count[e];
        }
        off[experts] = acc;
        post_pad[0] = acc;
        if (sq_sum) *sq_sum = first ? sq : *sq_sum + sq;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < cap; i += blockDim.x) sorted[i] = n;
    for (int b = threadIdx.x; b < cap / bm; b += blockDim.x) {
        int start = b * bm, e = -1;
        if (start < off[experts]) {
            // The last expert whose run starts at or before `start` (empty runs skipped).
            int lo = 0, hi = experts - 1;
            while (lo < hi) {
                int mid = (lo + hi + 1) >> 1;
                if (off[mid] <= start) lo = mid; else hi = mid - 1;
            }
            e = lo;
        }
        block_expert[b] = e;
    }
    for (int e = threadIdx.x; e < experts; e += blockDim.x) cur[e] = off[e];
    __syncthreads();
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x, e = i < n ? ids[i] : -1;
        // The lanes choosing expert e take consecutive places: one atomic by the first.
        const unsigned peers = __match_any_sync(0xffffffffu, e);
        const int leader = __ffs(peers) - 1;
        int at = 0;
        if (e >= 0 && lane == leader) at = atomicAdd(&cur[e], __popc(peers));
        at = __shfl_sync(0xffffffffu, at, leader);
        if (e >= 0) sorted[at + __popc(peers & ((1u << lane) - 1))] = i;
    }
}

// 4 e4m3 (a 4-byte read) -> the f16x2 of bytes 0-1 (the low byte to the low half) and of
// bytes 2-3, exactly: one instruction each on sm_89+. The halves are split by mov (register
// halves), so the high one needs no shift before its conversion.
__device__ __forceinline__ void e4m3x4_to_f16x2x2(unsigned x, unsigned& lo, unsigned& hi) {
    asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
        : "=r"(lo), "=r"(hi)
        : "r"(x));
}
// Two floats -> f16x2 (lo in the low half), clamped to f16's finite range.
__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) {
    const float m = 65504.f;
    lo = fminf(fmaxf(lo, -m), m);
    hi = fminf(fmaxf(hi, -m), m);
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 16 bytes global -> shared (at shared-window address `dst`) without registers; when
// !valid no byte is read and the 16 are zero-filled.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// Four 8x8 b16 matrices from shared-window address `sa` (ldmatrix .x4).
__device__ __forceinline__ void ldsm_x4(unsigned sa, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(sa));
}
// D = A B on tensor cores (mma_f16 with a zero accumulator): the first k of an FP8 scale
// block writes its partial sums instead of zeroing them and adding.
__device__ __forceinline__ void mma_f16_fresh(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The grouped expert GEMM: block (mb, nb) computes rows mb*BM.. of the sorted choices
// against columns nb*BN.. of its expert's weight W[e] [N, K] (a Linear's, stored tiled in
// k-tiles of BK and row groups of 32: N % 32 == 0 and K % BK == 0, checked by the host).
// A row of a choice s is a[s / top_k] (gate/up: the token's normed hidden state) or a[s]
// (down: the choice's activation); the output row is out[s], times the router weight w[s]
// when DOWN. bf16 weights take bf16 activations. FP8: W is e4m3 with fp32 scales per
// [bn, bk] block ([E, N/bn, K/bk]), the activations f16 (moe_to_f16, moe_silu_mul_f16:
// more mantissa than bf16, and e4m3 converts to f16 exactly in one instruction), the MMA in
// f16 with fp32 accumulation; a tile lies in one block (BN | bn, BK | bk, checked by the
// host), so the partial sum of a scale block's k-tiles takes its scale once, in fp32 (W8A16:
// no activation quantisation). FP8 tiles read k in a permuted order, the same for A and W
// (MMA k 2t, 2t+1, 2t+8, 2t+9 at stored k 4t .. 4t+3), so a lane's B fragment is one
// 4-byte read and two conversions; the f16 activations are stored in that order
// (f16_pair_slot), so ldmatrix loads their A fragments. Tiles stream global -> shared
// memory by cp.async through NST stages in dynamic shared memory (the host sizes it: MoeTile::smem_bytes;
// the weights as stored: decode is bound by their stream, so FP8 halves it). 4 * WM warps:
// four side by side over the columns, WM over the rows (BM / WM rows each), so every
// weight is converted WM times per block; WM = 2 halves the accumulators of a tall tile.
template <int BM, int BN, int BK, int NST, int WM, bool FP8, bool DOWN>
__device__ __forceinline__ void moe_gemm(const bf16* __restrict__ a, const void* __restrict__ wv,
                                         const float* __restrict__ scales, bf16* __restrict__ out,
                                         const int* __restrict__ sorted, const int* __restrict__ block_expert,
                                         const int* __restrict__ post_pad, const float* __restrict__ topk_w,
                                         int n_rows, int top_k, int N, int K, int bn, int bk) {
    constexpr int THREADS = 128 * WM;
    constexpr int WB = FP8 ? 1 : 2;      // bytes per weight
    constexpr int AS = BK + 8;           // A row stride, elements (conflict-free ldmatrix / fragments)
    constexpr int WS = BK * WB + 16;     // W row stride, bytes (conflict-free fragments)
    constexpr int A_BYTES = BM * AS * 2;
    constexpr int STAGE = A_BYTES + BN * WS;
    constexpr int RM = BM / WM;          // rows per warp
    constexpr int MT = RM / 16;
    constexpr int WCOLS = BN / 4;
    constexpr int NT = WCOLS / 8;
    constexpr int A_CH = BM * BK / 8;    // 16-byte chunks per stage
    constexpr int W_CPR = BK * WB / 16;  // 16-byte chunks per weight row
    constexpr int W_CH = BN * W_CPR;
    static_assert(RM % 16 == 0, "each warp takes whole 16-row MMA tiles");
    extern __shared__ __align__(16) unsigned char sm[];
    __shared__ int arow[BM];

    const int mb = blockIdx.x;
    if (mb * BM >= post_pad[0]) return;
    {
        // A launch with less shared memory than NST stages would overrun it.
        unsigned dyn;
        asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
        if (dyn < (unsigned)(NST * STAGE)) __trap();
    }
    const int e = block_expert[mb];
    const int n0 = blockIdx.y * BN;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tg = lane & 3;
    const int wc = warp & 3, r0w = (warp >> 2) * RM;
    for (int r = tid; r < BM; r += THREADS) {
        int s = sorted[mb * BM + r];
        arow[r] = s < n_rows ? (DOWN ? s : s / top_k) : -1;
    }
    __syncthreads();

    const unsigned char* wexp = (const unsigned char*)wv + (size_t)e * N * K * WB;
    const int kb = (K + bk - 1) / bk;
    const float* sc = FP8 ? scales + ((size_t)e * ((N + bn - 1) / bn) + n0 / bn) * kb : nullptr;
    const int nk = K / BK;  // K % BK == 0 (checked by the host)
    // Each thread's cp.async chunks, worked out once: the copy's address arithmetic per
    // k-tile was most of the instructions issued (Nsight Compute, 2026-12-03: 4.5 integer
    // multiply-adds per MMA, issue-bound). Chunk i of a thread is chunk tid + i * THREADS;
    // its shared destination and (for W) its source step by constants, A's source row is
    // gathered once into an element offset; each k-tile then adds BK to A's offsets and
    // N * BK weights to W's pointer (tiled storage, moe_kernels::tiled_offset, puts weight
    // row n of k-tile kt at (kt * N + n) * BK). A chunk outside the rows (a padding row of A,
    // a weight row past N) copies 0 bytes and zero-fills (cp_async16): its address is never
    // read, so it is left as computed (A's is row 0's, inside `a`), without a select per copy.
    constexpr int A_PER = (A_CH + THREADS - 1) / THREADS;
    constexpr int W_PER = (W_CH + THREADS - 1) / THREADS;
    constexpr int A_RSTEP = THREADS / (BK / 8);  // rows between a thread's A chunks
    constexpr int W_RSTEP = THREADS / W_CPR;     // weight rows between its W chunks
    static_assert(THREADS % (BK / 8) == 0 && THREADS % W_CPR == 0, "chunks keep their column");
    unsigned a_off[A_PER];
    bool a_ok[A_PER];
    const int a_r0 = tid / (BK / 8), a_kc = (tid % (BK / 8)) * 8;
#pragma unroll
    for (int i = 0; i < A_PER; i++) {
        const int r = a_r0 + i * A_RSTEP;
        const int row = (r < BM && tid + i * THREADS < A_CH) ? arow[r] : -1;
        a_ok[i] = row >= 0;
        a_off[i] = a_ok[i] ? (unsigned)row * (unsigned)K + a_kc : 0u;
    }
    // Shared memory by its shared-window address: the stage base plus per-thread offsets
    // worked out here, so a k-tile adds no address arithmetic of its own.
    unsigned sm_sa = (unsigned)__cvta_generic_to_shared(sm);
    unsigned a_dst = (a_r0 * AS + a_kc) * 2;
    const int w_n0 = tid / W_CPR, w_cb = (tid % W_CPR) * 16;
    bool w_ok[W_PER];
#pragma unroll
    for (int i = 0; i < W_PER; i++) w_ok[i] = n0 + w_n0 + i * W_RSTEP < N;
    const size_t w_kstep = (size_t)N * BK * WB;
    unsigned w_dst = A_BYTES + w_n0 * WS + w_cb;
    // The k-tile the next issue() loads: calls come in k-tile order, one each.
    const unsigned char* w_next = wexp + (size_t)(n0 + w_n0) * BK * WB + w_cb;
    unsigned a_k = 0;
    auto issue = [&](int stage) {
        const unsigned st = sm_sa + stage * STAGE;
#pragma unroll
        for (int i = 0; i < A_PER; i++) {
            if (A_CH % THREADS != 0 && tid + i * THREADS >= A_CH) break;
            cp_async16(st + a_dst + i * A_RSTEP * AS * 2, a + a_off[i] + a_k, a_ok[i]);
        }
#pragma unroll
        for (int i = 0; i < W_PER; i++) {
            if (W_CH % THREADS != 0 && tid + i * THREADS >= W_CH) break;
            cp_async16(st + w_dst + i * W_RSTEP * WS, w_next + (size_t)i * W_RSTEP * BK * WB, w_ok[i]);
        }
        w_next += w_kstep;
        a_k += BK;
    };

    float acc[MT][NT][4];
    float part[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[m][j][q] = 0.f;

#pragma unroll
    for (int s = 0; s < NST - 1; s++) {
        if (s < nk) issue(s);
        cp_async_commit();
    }
    // FP8: the k-tiles of one scale block (bk / BK of them) sum into `part`, which takes
    // the block's scale once; the block's first k-tile writes `part` (mma_f16_fresh) rather
    // than zeroing it after the scale. The next block's scale is loaded a block ahead.
    const int kpb = FP8 ? bk / BK : 1;
    int kin = 0, sb = 0;
    float scale = FP8 ? sc[0] : 1.f;
    int stage = 0, next = NST - 1;  // the stage read now, the stage issued next
    // ldmatrix offsets in a stage (FP8): A, the four 8x8 blocks (rows +0/+8, columns +0/+8)
    // of tile m in fragment order (the f16 activations are stored permuted, f16_pair_slot,
    // so these are the k of the permuted order, register for register, with no moves); B,
    // for whole groups of four column tiles, the 4-byte reads of (row g of tile j, bytes
    // kk + 4 tg ..) of four tiles at once.
    constexpr bool B_LDSM = FP8 && NT % 4 == 0;
    // Tile m's A offset is a_ld + m * 16 rows, group q's B offset b_ld + q * 32 rows.
    unsigned a_ld = ((r0w + (lane & 7) + ((lane >> 3) & 1) * 8) * AS + (lane >> 4) * 8) * 2;
    unsigned b_ld = A_BYTES + (wc * WCOLS + (lane >> 3) * 8 + (lane & 7)) * WS;
    // Opaque to ptxas, which otherwise works these out again from %tid (and the window
    // base from %cgactaid) in every k-tile rather than keep five registers.
    asm volatile("" : "+r"(sm_sa), "+r"(a_dst), "+r"(w_dst), "+r"(a_ld), "+r"(b_ld));
    // One k-tile; `fresh` (the first k-tile of an FP8 scale block) is a literal at both call
    // sites, so the inlined copies are specialised and its test costs nothing.
    auto ktile = [&](int kt, bool fresh) {
        cp_async_wait<NST - 2>();
        __syncthreads();
        if (kt + NST - 1 < nk) issue(next);
        cp_async_commit();
        next = next + 1 == NST ? 0 : next + 1;
        const unsigned st = sm_sa + stage * STAGE, st_a = st + a_ld, st_b = st + b_ld;
        const bf16* as = (const bf16*)(sm + stage * STAGE);
        const unsigned char* ws = sm + stage * STAGE + A_BYTES;
        stage = stage + 1 == NST ? 0 : stage + 1;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[MT][4];
#pragma unroll
            for (int m = 0; m < MT; m++) {
                if constexpr (FP8) {
                    ldsm_x4(st_a + (m * 16 * AS + kk) * 2, af[m][0], af[m][1], af[m][2], af[m][3]);
                } else {
                    const bf16* r0 = as + (r0w + m * 16 + g) * AS + kk + 2 * tg;
                    af[m][0] = *(const unsigned*)r0;
                    af[m][1] = *(const unsigned*)(r0 + 8 * AS);
                    af[m][2] = *(const unsigned*)(r0 + 8);
                    af[m][3] = *(const unsigned*)(r0 + 8 * AS + 8);
                }
            }
            unsigned bx[B_LDSM ? NT : 1];
            if constexpr (B_LDSM) {
#pragma unroll
                for (int q = 0; q < NT / 4; q++)
                    ldsm_x4(st_b + q * 32 * WS + kk, bx[4 * q], bx[4 * q + 1], bx[4 * q + 2], bx[4 * q + 3]);
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const unsigned char* wr = ws + (wc * WCOLS + j * 8 + g) * WS;
                if constexpr (FP8) {
                    unsigned x;
                    if constexpr (B_LDSM) x = bx[j];
                    else x = *(const unsigned*)(wr + kk + 4 * tg);
                    unsigned b0, b1;
                    e4m3x4_to_f16x2x2(x, b0, b1);
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        if (fresh && kk == 0) mma_f16_fresh(part[m][j], af[m], b0, b1);
                        else mma_f16(part[m][j], af[m], b0, b1);
                    }
                } else {
                    const unsigned char* wk = wr + (kk + 2 * tg) * 2;
                    unsigned b0 = *(const unsigned*)wk, b1 = *(const unsigned*)(wk + 16);
#pragma unroll
                    for (int m = 0; m < MT; m++) mma_bf16(acc[m][j], af[m], b0, b1);
                }
            }
        }
        if constexpr (FP8) {
            if (++kin == kpb || kt + 1 == nk) {
#pragma unroll
                for (int m = 0; m < MT; m++)
#pragma unroll
                    for (int j = 0; j < NT; j++)
#pragma unroll
                        for (int q = 0; q < 4; q++) acc[m][j][q] += part[m][j][q] * scale;
                kin = 0;
                if (++sb < kb) scale = sc[sb];
            }
        }
    };
    for (int kt = 0; kt < nk; kt++) {
        if (FP8 && kin == 0) ktile(kt, true);
        else ktile(kt, false);
    }
    cp_async_wait<0>();

#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int s = sorted[mb * BM + r0w + m * 16 + g + 8 * h];
            if (s >= n_rows) continue;
            float f = DOWN ? topk_w[s] : 1.f;
#pragma unroll
            for (int j = 0; j < NT; j++) {
                int col = n0 + wc * WCOLS + j * 8 + 2 * tg;
                if (col < N)
                    *(unsigned*)(out + (size_t)s * N + col) =
                        pack_bf16x2(acc[m][j][2 * h] * f, acc[m][j][2 * h + 1] * f);
            }
        }
    }
}

// Launch bounds by row warps: one warp row leaves ptxas free (fewer registers than with a
// minimum of one block); two ask for two resident blocks (at most 128 registers).
#define MOE_LB_1 __launch_bounds__(128)
#define MOE_LB_2 __launch_bounds__(256, 2)
#define MOE_GEMM(name, BM, BN, BK, NST, WM, FP8, DOWN)                                                 \
    extern "C" __global__ void MOE_LB_##WM                                                            \
        name(const bf16* a, const void* w, const float* scales, bf16* out, const int* sorted,         \
             const int* block_expert, const int* post_pad, const float* topk_w, int n_rows, int top_k, \
             int N, int K, int bn, int bk) {                                                          \
        moe_gemm<BM, BN, BK, NST, WM, FP8, DOWN>(a, w, scales, out, sorted, block_expert, post_pad,   \
                                                 topk_w, n_rows, top_k, N, K, bn, bk);                \
    }
// Tiles (BM x BN x BK, stages, row warps) are the list moe_kernels::COMPILED names (why
// those: ExpertFormat::tiles), each instantiated for gate/up and down:
// moe_gemm_{up,down}_{bf16,fp8}_{BM}x{BN}x{BK}s{NST}w{WM}.
#define MOE_GEMM_SET(kind, BM, BN, BK, NST, WM, FP8)                                     \
    MOE_GEMM(moe_gemm_up_##kind##_##BM##x##BN##x##BK##s##NST##w##WM, BM, BN, BK, NST, WM, FP8, false) \
    MOE_GEMM(moe_gemm_down_##kind##_##BM##x##BN##x##BK##s##NST##w##WM, BM, BN, BK, NST, WM, FP8, true)

// Where the FP8 GEMMs' f16 activations keep pair i (elements 2i, 2i + 1) of a row: within
// each 16 elements, the pairs of k 4t, 4t + 1 first (t = 0..3), then those of 4t + 2, 4t + 3.
// ldmatrix then hands a lane the k 4tg.. of its B fragment's 4-byte FP8 read (moe_gemm), in
// the registers mma takes. Rows are multiples of 32 long (checked by the host), so the
// groups of a flat index are those of its row.
__device__ __forceinline__ int f16_pair_slot(int i) {
    const int j = i & 7;
    return (i & ~7) | ((j & 1) << 2) | (j >> 1);
}

// in (bf16) -> out (f16, clamped to its finite range, pairs at f16_pair_slot), n even: the
// FP8 gate/up GEMM's activations.
extern "C" __global__ void moe_to_f16(const bf16* __restrict__ in, unsigned* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (2 * i >= n) return;
    unsigned v = *(const unsigned*)(in + 2 * i);
    out[f16_pair_slot(i)] = pack_f16x2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// silu_mul (engine.cu) with f16 output (pairs at f16_pair_slot): SiLU(gate) * up of each
// choice's gate/up row, the FP8 down GEMM's activations.
extern "C" __global__ void moe_silu_mul_f16(const bf16* __restrict__ gu, unsigned* __restrict__ out, int inter,
                                            int total) {
    int idx = 2 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (idx >= total) return;
    float2 o = silu_mul_pair(gu, inter, idx);
    out[f16_pair_slot(idx / 2)] = pack_f16x2(o.x, o.y);
}

// out[t] = sum over j of y[t * k + j], in fp32 in j order (the block's output, which the
// next add_rmsnorm adds to the residual).
extern "C" __global__ void moe_sum(const bf16* __restrict__ y, bf16* __restrict__ out, int hidden, int k,
                                   const int* __restrict__ ids) {
    const int t = blockIdx.x;
    // A row that routed nowhere (padding, moe_topk_softmax) has no outputs: zeros.
    const bool none = ids[(size_t)t * k] < 0;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        float s = 0.f;
        if (!none)
            for (int j = 0; j < k; j++) s += bf2f(y[((size_t)t * k + j) * hidden + c]);
        out[(size_t)t * hidden + c] = f2bf(s);
    }
}

// Nearest e4m3fn of x, saturating at +-448 (no infinities in the format).
__device__ __forceinline__ unsigned char f2e4m3(float x) {
    unsigned char s = x < 0.f ? 0x80 : 0;
    float v = fminf(fabsf(x), 448.f);
    if (v < 0.015625f) return s | (unsigned char)__float2int_rn(v * 512.f);  // subnormals: m * 2^-9
    int e;
    float f = frexpf(v, &e);  // v = f * 2^e, f in [0.5, 1): v = (1 + m / 8) * 2^(e - 1)
    int m = __float2int_rn((2.f * f - 1.f) * 8.f);
    int eb = e - 1 + 7;
    if (m == 8) { m = 0; eb++; }
    if (eb > 15 || (eb == 15 && m == 7)) return s | 0x7e;
    return s | (unsigned char)(eb << 3) | (unsigned char)m;
}

// Seeded dummy FP8 weights: e4m3 of a uniform in [-448, 448) (with block scales a / 448,
// a uniform in [-a, a) as fill_uniform's bf16 weights).
extern "C" __global__ void fill_e4m3_uniform(unsigned char* __restrict__ out, unsigned long long n,
                                             unsigned long long seed) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) out[i] = f2e4m3(448.f * (2.f * uniform01(seed, i) - 1.f));
}

extern "C" __global__ void fill_f32(float* __restrict__ out, unsigned long long n, float v) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) out[i] = v;
}
