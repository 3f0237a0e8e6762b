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
// nf4_dequantize_double_quant_tiles (below) is the trainer's: whole warps on 2048-element tiles, up to three tensors
// per launch. nf4_dequantize_double_quant, one thread per 8 outputs, takes the block sizes it cannot (not powers of
// two, or blocks under 64) and stays as the benchmarks' baseline; both give the same bits.
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
            return fmaf(code[absmax_q[b]], nested_absmax[b / nested_blocksize], offset);  // as the tiles kernel
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

// MARK: - The trainer's dequantization: whole warps on 2048-element tiles, up to three tensors per launch
//
// nf4_dequantize_double_quant above spends its time on index arithmetic (two 64-bit divisions and an absmax decode
// per 8 outputs), not on memory. Here each warp dequantizes one tile of NF4_TILE = 2048 elements (1 KiB of codes,
// 4 KiB of h16) with the block sizes powers of two (shifts), so the work per byte is a few instructions:
//   lane t issues its 8 code loads first (4 bytes each, tile offset 128·j + 4t: each warp load reads 128 contiguous
//     bytes, each warp store writes 512 contiguous bytes), so 8 loads per thread are in flight;
//   lane L decodes the absmax of the tile's block L once (a tile spans at most 32 blocks of ≥ 64) and the lanes take
//     theirs with a shuffle;
//   the 16 NF4 codes sit in 16 shared-memory words, one bank each: a warp's lookups never conflict.
// Every output is fmaf(code8[q], nested, offset) · NF4[nibble] rounded once to h16, the formula (and the fused
// multiply-add the compiler makes of it) of nf4_dequantize_double_quant, so the two kernels give the same bits.
// A tile the vector path cannot take (the last, partial one; a misaligned tensor) goes element by element.
// Tensors: blockIdx.x < cta1 is tensor 0, < cta2 tensor 1, the rest tensor 2 (one launch for q, k, v or gate, up).
// Each tensor's output may have rows of `cols` values `ld` apart (ld = cols: dense; the trainer's folded LoRA puts
// s·B in the columns past cols): element e goes to (e / cols)·ld + e % cols, 8 at a time when cols and ld are
// multiples of 8, else element by element.

#define NF4_TILE 2048
#define NF4_TILE_WARPS 8

struct NF4DoubleQuantTensor {
    const unsigned char* packed;
    const unsigned char* absmax_q;
    const float* code8;
    const float* nested_absmax;
    float offset;
    h16* out;
    long long n;
    int cols;
    long long ld;
};

/// Where element e of the tensor goes in its (possibly strided) output.
__device__ __forceinline__ long long nf4_out_index(const NF4DoubleQuantTensor& t, long long e) {
    if (t.ld == t.cols) return e;
    const long long row = t.n <= 0xffffffffll ? (long long)((unsigned)e / (unsigned)t.cols) : e / t.cols;
    return row * t.ld + (e - row * t.cols);
}

__device__ __forceinline__ float nf4_block_absmax(const NF4DoubleQuantTensor& t, long long b, int log_nested) {
    return fmaf(t.code8[t.absmax_q[b]], t.nested_absmax[b >> log_nested], t.offset);
}

__device__ __forceinline__ void nf4_dequantize_tile(const float* nf4, const NF4DoubleQuantTensor& t, long long tile,
                                                    int log_blocksize, int log_nested) {
    const int lane = threadIdx.x & 31;
    const long long e0 = tile * NF4_TILE;
    if (e0 >= t.n) return;
    const long long blocks = (t.n + (1ll << log_blocksize) - 1) >> log_blocksize;
    const long long firstBlock = e0 >> log_blocksize;
    const bool vector = e0 + NF4_TILE <= t.n && ((unsigned long long)t.packed & 3ull) == 0 && aligned16(t.out)
                        && (t.ld == t.cols || ((t.cols & 7) == 0 && (t.ld & 7) == 0));
    if (!vector) {  // element by element (uniform per warp: same tile)
        for (long long e = e0 + lane; e < e0 + NF4_TILE && e < t.n; e += 32) {
            const unsigned char byte = t.packed[e >> 1];
            const int nibble = (e & 1) ? (byte & 15) : (byte >> 4);
            t.out[nf4_out_index(t, e)] = float_to_h16(nf4[nibble] * nf4_block_absmax(t, e >> log_blocksize, log_nested));
        }
        return;
    }
    const unsigned int* words = reinterpret_cast<const unsigned int*>(t.packed + (e0 >> 1));
    unsigned int w[8];
#pragma unroll
    for (int j = 0; j < 8; j++) w[j] = __ldg(words + 32 * j + lane);
    // Lane L holds the absmax of the tile's block L (blocks ≥ 64 elements: at most 32 in a tile).
    float mine = 0.0f;
    if (lane < (NF4_TILE >> log_blocksize) || lane == 0) {
        const long long b = firstBlock + lane;
        if (b < blocks) mine = nf4_block_absmax(t, b, log_nested);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const long long e = e0 + 256 * j + 8 * lane;  // this lane's 8 outputs of word j
        const float s = __shfl_sync(0xffffffffu, mine, (int)((e >> log_blocksize) - firstBlock));
        float f[8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const unsigned int byte = (w[j] >> (8 * k)) & 0xffu;
            f[2 * k] = nf4[byte >> 4] * s;
            f[2 * k + 1] = nf4[byte & 15] * s;
        }
        store_h16x8(t.out + nf4_out_index(t, e), f);
    }
}

/// Up to three double-quantized NF4 tensors to h16; blocksize = 1 << log_blocksize (≥ 64), nested blocksize
/// 1 << log_nested. Grid: cta2 + ceil(tiles of tensor 2 / NF4_TILE_WARPS) blocks of 32·NF4_TILE_WARPS threads.
extern "C" __global__ void nf4_dequantize_double_quant_tiles(
    const unsigned char* packed0, const unsigned char* absmax_q0, const float* code0, const float* nested0, float offset0,
    h16* out0, long long n0, int cols0, long long ld0,
    const unsigned char* packed1, const unsigned char* absmax_q1, const float* code1, const float* nested1, float offset1,
    h16* out1, long long n1, int cols1, long long ld1,
    const unsigned char* packed2, const unsigned char* absmax_q2, const float* code2, const float* nested2, float offset2,
    h16* out2, long long n2, int cols2, long long ld2,
    int cta1, int cta2, int log_blocksize, int log_nested) {
    __shared__ float nf4[16];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    __syncthreads();
    const int cta = blockIdx.x;
    const int index = cta < cta1 ? 0 : cta < cta2 ? 1 : 2;
    const int first = index == 0 ? 0 : index == 1 ? cta1 : cta2;
    NF4DoubleQuantTensor t;
    if (index == 0) t = {packed0, absmax_q0, code0, nested0, offset0, out0, n0, cols0, ld0};
    else if (index == 1) t = {packed1, absmax_q1, code1, nested1, offset1, out1, n1, cols1, ld1};
    else t = {packed2, absmax_q2, code2, nested2, offset2, out2, n2, cols2, ld2};
    const long long tile = (long long)(cta - first) * NF4_TILE_WARPS + (threadIdx.x >> 5);
    nf4_dequantize_tile(nf4, t, tile, log_blocksize, log_nested);
}
