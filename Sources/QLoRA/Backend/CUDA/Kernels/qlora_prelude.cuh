// qlora_prelude.cuh: the only header our kernels include (handed to NVRTC in memory; no CUDA toolkit needed).
//
// `h16` is the 16-bit storage type of activations, dequantized weights and LoRA copies: bfloat16 by default, IEEE
// half (fp16) when the kernels are compiled with -DQLORA_HALF=1 (the fp16 compute path for Turing, `--compute-dtype
// fp16`). It is kept as raw bits (unsigned short); all arithmetic is done in float32, and only the conversions
// below know which format the bits are.
//   bf16: the top half of a float32, so widening is a shift, and narrowing rounds to nearest-even on the dropped
//         16 bits (NaN kept quiet).
//   fp16: PTX cvt (cvt.f32.f16, cvt.rn.f16.f32: round to nearest-even). A value beyond ±65504 becomes ±inf, never
//         clamped, so an overflow reaches the loss scaler's inf check instead of hiding as a large finite number.
#pragma once

typedef unsigned short h16;

// math.h's INFINITY is not available without headers.
#define QLORA_INFINITY __int_as_float(0x7f800000)

#if QLORA_HALF
#define QLORA_H16_NAME "fp16"

__device__ __forceinline__ float h16_to_float(h16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}

__device__ __forceinline__ h16 float_to_h16(float f) {
    h16 x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
}

/// The values of the low and high halves of a 32-bit word holding two h16 (the lower index in the low half).
__device__ __forceinline__ float h16_low(unsigned int w) { return h16_to_float((h16)(w & 0xffffu)); }
__device__ __forceinline__ float h16_high(unsigned int w) { return h16_to_float((h16)(w >> 16)); }
#else
#define QLORA_H16_NAME "bf16"

__device__ __forceinline__ float h16_to_float(h16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ h16 float_to_h16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (h16)((u >> 16) | 0x40u);  // NaN: keep it a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                        // round to nearest, ties to even
    return (h16)(u >> 16);
}

__device__ __forceinline__ float h16_low(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float h16_high(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }
#endif

/// Rounds a float to the nearest bfloat16 value, whatever h16 is (a stored weight's dtype, e.g. the merge's base).
__device__ __forceinline__ float round_to_bfloat16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
}

/// Rounds a float to the nearest h16 value, staying in float (for formulas that round mid-way, like HF's).
__device__ __forceinline__ float round_h16(float f) { return h16_to_float(float_to_h16(f)); }

// 16-byte vector of 8 h16 values, for coalesced 128-bit loads and stores.
struct alignas(16) h16x8_raw { unsigned int w[4]; };

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

__device__ __forceinline__ void load_h16x8(const h16* p, float* f) {
    h16x8_raw v = *reinterpret_cast<const h16x8_raw*>(p);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        f[2 * k] = h16_low(v.w[k]);
        f[2 * k + 1] = h16_high(v.w[k]);
    }
}

__device__ __forceinline__ void store_h16x8(h16* p, const float* f) {
    h16x8_raw v;
#pragma unroll
    for (int k = 0; k < 4; k++)
        v.w[k] = (unsigned int)float_to_h16(f[2 * k]) | ((unsigned int)float_to_h16(f[2 * k + 1]) << 16);
    *reinterpret_cast<h16x8_raw*>(p) = v;
}

/// c += A·B on the tensor cores for one 16x8x16 tile of h16 values with fp32 accumulation (`mma.sync` m16n8k16;
/// the fragment layout is in attention_mma.cu's header). fp16 uses the .f16 variant; Turing (sm_75, fp16 only) has no
/// m16n8k16, so there it is two m16n8k8 products, over k 0..7 (a[0], a[1], b0) and k 8..15 (a[2], a[3], b1), whose
/// fragments are exactly those halves. bf16 before sm_80 does not exist: a kernel using this there fails in ptxas.
/// Not volatile: a pure function of its registers, so the compiler may schedule fragment loads ahead of it.
__device__ __forceinline__ void mma_16816_h16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if QLORA_HALF && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#else
    asm(
#if QLORA_HALF
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#else
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#endif
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// The names before the fp16 path (the storage type was bf16 only). They mean the same as the h16 names, whichever
// format is compiled in; kept so kernels written against them still build. New code: use the h16 names.
typedef h16 bf16;
typedef h16x8_raw bf16x8_raw;
__device__ __forceinline__ float bf16_to_float(h16 x) { return h16_to_float(x); }
__device__ __forceinline__ h16 float_to_bf16(float f) { return float_to_h16(f); }
__device__ __forceinline__ float round_bf16(float f) { return round_h16(f); }
__device__ __forceinline__ void load_bf16x8(const h16* p, float* f) { load_h16x8(p, f); }
__device__ __forceinline__ void store_bf16x8(h16* p, const float* f) { store_h16x8(p, f); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/// Sum over the block; every thread gets the result. `scratch` holds 32 floats of shared memory.
/// blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();  // scratch may be reused right after
    return v;
}

// LoRA dropout's keep mask, the twin of Training/DropoutMask.swift (bit for bit; training.cu and lora_dropout.cu use it):
//   pairHash(s, j) = fmix32(lo(z) ^ hi(z)), z = s + (j + 1)·γ mod 2^64 (γ = 0x9E3779B97F4A7C15, MurmurHash3's fmix32);
//   element i's 16 bits u = half (i & 1) of pairHash(s, i >> 1); kept iff u < T = ⌈keep·2^16⌉ (keep = 1 − p in fp32),
//   i.e. u ≤ limit = T − 1. One 32-bit hash (two multiplies, a 64-bit counter step) serves two elements: the fused
//   kernels spend their time hashing, and this is about half the integer work of the SplitMix64 per element it
//   replaced (session 11).
#define QLORA_DROPOUT_GAMMA 0x9e3779b97f4a7c15ull

/// The largest u that keeps an element at keep probability `keep` in (0, 1]: T − 1, 0 … 65535.
__device__ __forceinline__ unsigned dropout_limit(float keep) {
    return (unsigned)ceilf(keep * 65536.0f) - 1u;
}

/// pairHash for counter value z = s + (j + 1)·γ.
__device__ __forceinline__ unsigned dropout_pair_hash(unsigned long long z) {
    unsigned h = (unsigned)z ^ (unsigned)(z >> 32);
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

/// The keep bits of one pair: bit 0 its even element (the low half), bit 1 its odd one.
__device__ __forceinline__ unsigned dropout_pair_bits(unsigned h, unsigned limit) {
    return ((h & 0xffffu) <= limit ? 1u : 0u) | ((h >> 16) <= limit ? 2u : 0u);
}

__device__ __forceinline__ bool dropout_keeps(unsigned long long seed, long long i, float keep) {
    const unsigned h = dropout_pair_hash(seed + QLORA_DROPOUT_GAMMA * (unsigned long long)((i >> 1) + 1));
    return ((h >> (16 * (unsigned)(i & 1))) & 0xffffu) <= dropout_limit(keep);
}

/// The keep bits of elements i0 … i0 + 7 (bit e: element i0 + e; i0 ≥ 0); consecutive pairs' counters differ by γ.
/// `limit`: dropout_limit(keep). An even i0 (the vectorised kernels': 8 columns of a row whose length is a multiple
/// of 8) takes 4 pair hashes, an odd one 5.
__device__ __forceinline__ unsigned dropout_keep8(unsigned long long seed, long long i0, unsigned limit) {
    unsigned long long z = seed + QLORA_DROPOUT_GAMMA * (unsigned long long)((i0 >> 1) + 1);
    unsigned bits = 0;
    if ((i0 & 1) == 0) {
#pragma unroll
        for (int k = 0; k < 4; k++, z += QLORA_DROPOUT_GAMMA) bits |= dropout_pair_bits(dropout_pair_hash(z), limit) << (2 * k);
        return bits;
    }
#pragma unroll
    for (int k = 0; k < 5; k++, z += QLORA_DROPOUT_GAMMA) bits |= dropout_pair_bits(dropout_pair_hash(z), limit) << (2 * k);
    return (bits >> 1) & 0xffu;  // element i0 is pair (i0 >> 1)'s odd one
}

/// The NF4 code book (bitsandbytes' levels, index 0..15). Kernels copy it to shared memory: lanes index it with
/// different codes, which constant memory would serialise.
__constant__ float NF4_CODE_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/// The gate's activation of the gated MLP in the decode kernels: 0 silu (SwiGLU), 1 GELU with the tanh approximation
/// (Gemma's GeGLU, PyTorch's gelu(approximate="tanh")); the same arithmetic as swiglu.cu's forward.
__device__ __forceinline__ float gated_activation(float g, int activation) {
    if (activation == 1) return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return g * (1.0f / (1.0f + __expf(-g)));
}

/// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)
