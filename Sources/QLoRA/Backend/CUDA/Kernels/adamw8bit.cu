// adamw8bit.cu: bitsandbytes' blockwise 8-bit AdamW update (kOptimizerStatic8bit2StateBlockwise<ADAM>, blocksize
// 256) and its 32-bit AdamW arithmetic for tensors under 4096 elements, mirroring the CPU reference
// Training/Optimizers/AdamW8bit.swift operation for operation (its header has the formulas). Every product, sum,
// quotient and square root is written with the _rn intrinsics so the compiler cannot fuse them into FMAs: the
// results are then the CPU's, bit for bit, and the 8-bit codes come from the same binary search.
#include "qlora_prelude.cuh"

#define QBLOCK 256

__device__ __forceinline__ bool is_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ unsigned int sign_bit(float x) { return __float_as_uint(x) >> 31; }

/// bitsandbytes' quantize_2D: a 7-step binary search from code 127, then the nearer of the final code and its
/// neighbour on x's side (DynamicQuantizationMap.search + finish).
__device__ __forceinline__ unsigned char quantize_dynamic(float x, const float* code) {
    int pivot = 127, upper = 255, lower = 0;
    float val = code[127];
    for (int i = 64; i > 0; i >>= 1) {
        const bool above = x > val;
        lower = above ? pivot : lower;
        upper = above ? upper : pivot;
        pivot = above ? pivot + i : pivot - i;
        val = code[pivot];
    }
    const bool above = x > val;
    const int neighbour = above ? upper : lower;
    const float midpoint = __fmul_rn(__fadd_rn(code[neighbour], val), 0.5f);
    const bool take = above ? x > midpoint : x < midpoint;
    return (unsigned char)(take ? neighbour : pivot);
}

/// One 256-thread block per 256-element quantization block. map1: signed map, map2: unsigned map (256 each).
extern "C" __global__ void __launch_bounds__(QBLOCK)
adamw8bit_blockwise(float* __restrict__ p, const float* __restrict__ g, unsigned char* __restrict__ state1,
                    unsigned char* __restrict__ state2, float* __restrict__ absmax1, float* __restrict__ absmax2,
                    const float* __restrict__ map1_g, const float* __restrict__ map2_g, long long n, float beta1,
                    float beta2, float one_minus_beta1, float one_minus_beta2, float step_size, float eps_correction2,
                    float decay) {
    __shared__ float map1[256], map2[256], red1[8], red2[8];
    map1[threadIdx.x] = map1_g[threadIdx.x];
    map2[threadIdx.x] = map2_g[threadIdx.x];
    __syncthreads();
    const long long b = blockIdx.x;
    const long long i = b * QBLOCK + threadIdx.x;
    const bool real = i < n;
    const float a1 = absmax1[b], a2 = absmax2[b];
    const float gi = real ? g[i] : 0.0f;
    const bool finite = real ? is_finite(gi) : true;
    // The kernel's padding of a short block: g = 0, state1 code 128, state2 code 0.
    const unsigned char s1 = real ? state1[i] : (unsigned char)128;
    const unsigned char s2 = real ? state2[i] : (unsigned char)0;
    float m = 0.0f, v = 0.0f;
    if (finite) {
        v = __fadd_rn(__fmul_rn(__fmul_rn(map2[s2], a2), beta2), __fmul_rn(__fmul_rn(one_minus_beta2, gi), gi));
        m = __fadd_rn(__fmul_rn(__fmul_rn(map1[s1], a1), beta1), __fmul_rn(one_minus_beta1, gi));
    }
    // Block max of |m| and |v| (a NaN does not become the max, as with fmaxf).
    float mx1 = fabsf(m), mx2 = fabsf(v);
    if (mx1 != mx1) mx1 = -3.402823466e38f;
    if (mx2 != mx2) mx2 = -3.402823466e38f;
    for (int o = 16; o > 0; o >>= 1) {
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
        mx2 = fmaxf(mx2, __shfl_xor_sync(0xffffffffu, mx2, o));
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { red1[warp] = mx1; red2[warp] = mx2; }
    __syncthreads();
    float max1 = red1[0], max2 = red2[0];
    for (int w = 1; w < QBLOCK / 32; w++) { max1 = fmaxf(max1, red1[w]); max2 = fmaxf(max2, red2[w]); }
    if (threadIdx.x == 0) { absmax1[b] = max1; absmax2[b] = max2; }
    if (!real) return;
    if (finite) {
        const float denom = __fadd_rn(__fsqrt_rn(v), eps_correction2);
        p[i] = __fmul_rn(__fadd_rn(p[i], __fmul_rn(step_size, __fdiv_rn(m, denom))), decay);
    }
    unsigned char q1 = quantize_dynamic(__fdiv_rn(m, max1), map1);
    if (sign_bit(map1[q1]) != sign_bit(m)) q1 = m > 0.0f ? (unsigned char)(q1 + 1) : (unsigned char)(q1 - 1);
    state1[i] = q1;
    state2[i] = quantize_dynamic(__fdiv_rn(v, max2), map2);
}

/// bitsandbytes' 32-bit AdamW arithmetic (AdamW.bitsandbytesUpdate): fp32 moments m, v.
extern "C" __global__ void adamw32_bnb(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                       float* __restrict__ v, long long n, float beta1, float beta2,
                                       float one_minus_beta1, float one_minus_beta2, float step_size,
                                       float eps_correction2, float decay) {
    GRID_STRIDE(i, n) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(one_minus_beta1, gi));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(one_minus_beta2, __fmul_rn(gi, gi)));
        const float denom = __fadd_rn(__fsqrt_rn(vi), eps_correction2);
        p[i] = __fmul_rn(__fadd_rn(p[i], __fmul_rn(step_size, __fdiv_rn(mi, denom))), decay);
        m[i] = mi;
        v[i] = vi;
    }
}
