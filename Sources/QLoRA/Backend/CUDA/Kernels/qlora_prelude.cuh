// qlora_prelude.cuh: the only header our kernels include (handed to NVRTC in memory; no CUDA toolkit needed).
//
// bf16 is kept as raw 16-bit storage (`bf16` = unsigned short): a bfloat16 is the top half of a float32, so
// widening is a shift, and narrowing rounds to nearest-even on the dropped 16 bits (NaN kept quiet).
// All arithmetic is done in float32.
#pragma once

typedef unsigned short bf16;

// math.h's INFINITY is not available without headers.
#define QLORA_INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_float(bf16 x) { return __uint_as_float(((unsigned int)x) << 16); }

__device__ __forceinline__ bf16 float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);  // NaN: keep it a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest, ties to even
    return (bf16)(u >> 16);
}

/// Rounds a float to the nearest bf16 value, staying in float (for formulas that round mid-way, like HF's).
__device__ __forceinline__ float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// 16-byte vector of 8 bf16 values, for coalesced 128-bit loads and stores.
struct alignas(16) bf16x8_raw { unsigned int w[4]; };

__device__ __forceinline__ bool aligned16(const void* p) { return (((unsigned long long)p) & 15ull) == 0; }

__device__ __forceinline__ void load_bf16x8(const bf16* p, float* f) {
    bf16x8_raw v = *reinterpret_cast<const bf16x8_raw*>(p);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        f[2 * k] = __uint_as_float(v.w[k] << 16);
        f[2 * k + 1] = __uint_as_float(v.w[k] & 0xffff0000u);
    }
}

__device__ __forceinline__ void store_bf16x8(bf16* p, const float* f) {
    bf16x8_raw v;
#pragma unroll
    for (int k = 0; k < 4; k++)
        v.w[k] = (unsigned int)float_to_bf16(f[2 * k]) | ((unsigned int)float_to_bf16(f[2 * k + 1]) << 16);
    *reinterpret_cast<bf16x8_raw*>(p) = v;
}

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

/// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)
