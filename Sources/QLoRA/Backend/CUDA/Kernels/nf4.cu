// nf4.cu: NF4 (4-bit NormalFloat) dequantization to bf16, bitsandbytes layout.
//
// Layout (bitsandbytes `quantize_4bit(quant_type="nf4")`):
//   packed[i] holds elements 2i (high nibble) and 2i+1 (low nibble) of the row-major flattened weight.
//   Element e belongs to quantization block b = e / blocksize (blocksize 64) with scale absmax[b]:
//       w[e] = NF4_CODE[nibble(e)] * absmax[b]
//   With double quantization the absmax values are themselves 8-bit codes:
//       absmax[b] = code8[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset
//   where code8 is the 256-entry signed dynamic map (stored as `nested_quant_map`), nested_blocksize is 256
//   and offset = mean of the original absmax values.
// Each thread produces 8 consecutive outputs (4 packed bytes -> one 16-byte store).
// nf4_dequantize_double_quant_f32 (the GPU merge) writes fp32 with the CPU's rounding instead: every product and sum
// rounded on its own (__fmul_rn / __fadd_rn, which the compiler may not fuse), one element per thread.
#include "qlora_prelude.cuh"

// Writes elements [e0, e0+8) (clipped to n) given a per-element scale function.
template <typename Scale>
__device__ __forceinline__ void nf4_write8(const float* NF4_CODE, const unsigned char* packed, h16* out, long long e0,
                                           long long n, Scale scale) {
    if (e0 + 8 <= n && (e0 & 1) == 0 && aligned16(out + e0)) {
        float f[8];
        const float s = scale(e0);  // blocksize is a multiple of 8, so the 8 elements share one block
        const unsigned char* p = packed + (e0 >> 1);
        // One 4-byte load when aligned (byte k of the word is packed[e0/2 + k]: little-endian).
        const unsigned int word = (((unsigned long long)p) & 3ull) == 0
                                      ? *reinterpret_cast<const unsigned int*>(p)
                                      : (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16) |
                                            ((unsigned int)p[3] << 24);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const unsigned int byte = (word >> (8 * k)) & 0xffu;
            f[2 * k] = NF4_CODE[byte >> 4] * s;
            f[2 * k + 1] = NF4_CODE[byte & 15] * s;
        }
        store_h16x8(out + e0, f);
    } else {
        for (long long e = e0; e < e0 + 8 && e < n; e++) {
            const unsigned char byte = packed[e >> 1];
            const int nibble = (e & 1) ? (byte & 15) : (byte >> 4);
            out[e] = float_to_h16(NF4_CODE[nibble] * scale(e));
        }
    }
}

/// Double-quantized absmax. n: element count; blocksize must be a multiple of 8.
extern "C" __global__ void nf4_dequantize_double_quant(
    const unsigned char* __restrict__ packed, const unsigned char* __restrict__ absmax_q, const float* __restrict__ code8,
    const float* __restrict__ nested_absmax, float offset, int blocksize, int nested_blocksize, h16* __restrict__ out,
    long long n) {
    __shared__ float code[256], nf4[16];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code8[i];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    __syncthreads();
    const long long groups = (n + 7) / 8;
#pragma unroll 4
    GRID_STRIDE(g, groups) {
        nf4_write8(nf4, packed, out, g * 8, n, [&](long long e) {
            const long long b = e / blocksize;
            return code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset;
        });
    }
}

/// Plain fp32 absmax (no double quantization).
extern "C" __global__ void nf4_dequantize(const unsigned char* __restrict__ packed, const float* __restrict__ absmax,
                                          int blocksize, h16* __restrict__ out, long long n) {
    __shared__ float nf4[16];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    __syncthreads();
    const long long groups = (n + 7) / 8;
#pragma unroll 4
    GRID_STRIDE(g, groups) {
        nf4_write8(nf4, packed, out, g * 8, n, [&](long long e) { return absmax[e / blocksize]; });
    }
}

/// Double-quantized absmax, fp32 output equal bit for bit to the CPU's `QuantizedWeight.dequantize()`:
///   out[e] = NF4[nibble(e)] * (code8[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset), b = e / blocksize,
/// rounded to the nearest bf16 value (kept in fp32) when `round_bf16_output` is nonzero (a weight whose dtype is bf16).
extern "C" __global__ void nf4_dequantize_double_quant_f32(
    const unsigned char* __restrict__ packed, const unsigned char* __restrict__ absmax_q, const float* __restrict__ code8,
    const float* __restrict__ nested_absmax, float offset, int blocksize, int nested_blocksize, int round_bf16_output,
    float* __restrict__ out, long long n) {
    __shared__ float nf4[16];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    __syncthreads();
    GRID_STRIDE(e, n) {
        const unsigned char byte = packed[e >> 1];
        const int nibble = (e & 1) ? (byte & 15) : (byte >> 4);
        const long long b = e / blocksize;
        const float absmax = __fadd_rn(__fmul_rn(code8[absmax_q[b]], nested_absmax[b / nested_blocksize]), offset);
        const float w = __fmul_rn(nf4[nibble], absmax);
        out[e] = round_bf16_output ? round_to_bfloat16(w) : w;  // the checkpoint's dtype, not h16
    }
}
