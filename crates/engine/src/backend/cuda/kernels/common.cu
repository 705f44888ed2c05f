// Helpers shared by the engine's kernel files (engine.cu, moe.cu): each is compiled with
// this file in front. bf16 is handled as raw 16-bit storage with our own conversions (round
// to nearest even, as cuda_bf16.h does), so compilation needs no CUDA headers on the
// machine: NVRTC alone.
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

// D += A B on tensor cores: mma.sync m16n8k16, bf16 (mma_bf16) or f16 (mma_f16) inputs,
// fp32 accumulation (A row-major 16x16 in four registers, B column-major 16x8 in two).
#define MMA_M16N8K16(name, type)                                                                    \
    __device__ __forceinline__ void name(float* c, const unsigned* a, unsigned b0, unsigned b1) {  \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                        \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                 \
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                 \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));              \
    }
MMA_M16N8K16(mma_bf16, "bf16")
MMA_M16N8K16(mma_f16, "f16")
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// SiLU(gate) * up of elements idx and idx + 1 of a row-major [rows, inter] result whose
// gate/up input is [rows, 2 * inter] bf16 (gate then up in each row), in fp32.
__device__ __forceinline__ float2 silu_mul_pair(const bf16* __restrict__ gu, int inter, int idx) {
    int t = idx / inter, i = idx - t * inter;
    unsigned g = *(const unsigned*)(gu + (size_t)t * 2 * inter + i);
    unsigned u = *(const unsigned*)(gu + (size_t)t * 2 * inter + inter + i);
    float g0 = __uint_as_float(g << 16), g1 = __uint_as_float(g & 0xffff0000u);
    float u0 = __uint_as_float(u << 16), u1 = __uint_as_float(u & 0xffff0000u);
    return make_float2(g0 / (1.f + expf(-g0)) * u0, g1 / (1.f + expf(-g1)) * u1);
}
// A uniform in [0, 1) from a counter-based hash (splitmix64) of (seed, i): dummy weights
// of any shape at memory speed, without host work.
__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + i * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}
