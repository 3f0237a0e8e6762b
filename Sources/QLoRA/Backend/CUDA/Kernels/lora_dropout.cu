// lora_dropout.cu: LoRA dropout fused into the rank-r products, so d(x) = x·m/(1−p) is never written to memory.
// x [tokens, in] is the LoRA path's input, m its keep mask (dropout_keep8 in the prelude: Training/DropoutMask.swift's
// hash of seed and element index token·in + column, bit for bit), keep = 1 − p, A [r, in], dyB = dy·B [tokens, r],
// s the LoRA scale. Because m only selects, the 1/keep comes out of every sum: (m⊙x)·Aᵀ/keep is d(x)·Aᵀ.
//   lora_dropout_xa_rN:     xa = h16((m⊙x)·Aᵀ / keep)                        [tokens, r]  (forward), and, given
//                           `mask_out`, m itself as bits (below) for the backward's dA and dx
//   lora_dropout_da_rN:     P[sp] = dyB[rows of split sp]ᵀ · (m⊙x)[same rows]  [splits, r, in] fp32 partial sums;
//                           m read from `mask_in` (the forward's bits), or hashed and, given `mask_out`, written as
//                           bits for lora_dropout_dx
//   lora_dropout_da_finish: dA += s · (Σ_sp P[sp]) / keep, the splits added in order (no atomics: same bits every run)
//   lora_dropout_dx:        dx = h16(dx + m ⊙ (dyB·A) · s/keep)                 [tokens, in] (d/dx of the LoRA path),
//                           m hashed again or read from the bits lora_dropout_da wrote
// The mask bits: [tokens, ⌈in/8⌉] bytes, bit e of byte b of row t = m[t][8b + e] (0 past `in`): 1/16 of x's bytes.
// The hash (about 9 integer operations an element: one 32-bit hash a pair) is what the fused kernels spend their time on, so the trainer
// hashes each element once a step: the forward's xa writes the bits, dA and dx read them, and the recomputation
// reuses the forward's xa (when the bits do not fit in memory, dA hashes again and writes them for dx).
// Each reads x (or dx) once with 16-byte loads and hashes each element at most once; the products run on the tensor cores
// (the prelude's mma_16816_h16, fp32 accumulation). An mma's k (and the m or n of its output) may be numbered in any
// order as long as both operands agree, so each lane takes 8 consecutive columns of a row in one 16-byte load:
//   xa:  k = columns of x and A. In a 32-column step, lane (g = lane/4, t = lane%4) loads columns 8t … 8t+7 of x rows g
//        and g+8 and of A row j = g; its mma k pairs (2t, 2t+1) and (2t+8, 2t+9) of sub-step s ∈ {0, 1} are columns
//        8t+4s+{0,1} and 8t+4s+{2,3}, i.e. the 32-bit words 2s and 2s+1 of each load, for x and A alike.
//   dA:  C[m = column][n = rank], k = tokens. Lane (g, t) loads columns 8g … 8g+7 of tokens 4t … 4t+3; m-tile i's row g
//        is column 8g+2i, row g+8 column 8g+2i+1; k pairs (2t, 2t+1), (2t+8, 2t+9) are tokens 4t+{0,1}, 4t+{2,3}
//        (pairs of two tokens' halves: __byte_perm); n = q of n-tile nt is rank q·NT + nt, so lane g reads dyB's
//        ranks g·NT … g·NT+NT−1 of a token in one 2·NT-byte load.
//   dx:  C[m = column][n = token], k = ranks: columns as in dA, k pairs (2t, 2t+1), (2t+8, 2t+9) are ranks 4t+{0,1},
//        4t+{2,3}, so lane (g, t) holds tokens 2t and 2t+1 of each 8-token n-tile at its 8 columns: one 16-byte
//        read-modify-write per token; its dyB ranks 4t … 4t+3 of a token are one 8-byte load, and at rank ≤ 16 its A
//        fragment is loaded once for all its token tiles.
// Sums are in a fixed order everywhere (per warp in k order, warps of a block in index order, splits in index order).
// x's rows are `ldx` ≥ in apart (the trainer's folded LoRA keeps x·Aᵀ in the columns past in); the mask's element
// index stays token·in + column.
// Bounds: rows past `tokens`, columns past `in` and ranks past r read as 0 and are not written; when `in` is not a
// multiple of 8 (or a pointer not 16-byte aligned) the loads go element by element, and dyB's when r is not a
// multiple of the ranks a lane loads at once.
#include "qlora_prelude.cuh"

#if !QLORA_HALF && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "bf16 tensor-core mma needs sm_80 or newer; Turing (sm_75) runs the fp16 path (-DQLORA_HALF=1, --compute-dtype fp16)"
#endif

#define XA_WARPS 8   // lora_dropout_xa: warps per block, splitting the columns of 16 rows
#define DA_WARPS 4   // lora_dropout_da and lora_dropout_dx: warps per block, 64 columns each
#define COLS_PER_WARP 64

/// Columns c … c+7 of `row` (zeros past `cols`, or all zeros for a null row), one 16-byte load when `vec`.
__device__ __forceinline__ h16x8_raw load_row8(const h16* row, int c, int cols, bool vec) {
    h16x8_raw v = {{0u, 0u, 0u, 0u}};
    if (row == nullptr || c >= cols) return v;
    if (vec && c + 8 <= cols) return *reinterpret_cast<const h16x8_raw*>(row + c);
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (c + e < cols) v.w[e >> 1] |= (unsigned)row[c + e] << (16 * (e & 1));
    return v;
}

/// Zeroes the h16 values of `v` whose keep bit (bit e: value e) is clear.
__device__ __forceinline__ void mask_row8(h16x8_raw& v, unsigned bits) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const unsigned lo = (bits >> (2 * q)) & 1u ? 0x0000ffffu : 0u, hi = (bits >> (2 * q + 1)) & 1u ? 0xffff0000u : 0u;
        v.w[q] &= lo | hi;
    }
}

/// Halves of two words as one mma register: (low of a, low of b) with HIGH = 0, (high of a, high of b) with HIGH = 1.
template <int HIGH>
__device__ __forceinline__ unsigned pair_halves(unsigned a, unsigned b) { return __byte_perm(a, b, HIGH ? 0x7632 : 0x5410); }

/// dyB[token][j0 … j0+N−1] (N = 2, 4 or 8), two h16 a word (the lower rank in the low half), 0 outside
/// [0, tokens) x [0, rank). `vec`: rank is a multiple of N and dyB 2·N-byte aligned, so that with j0 a multiple of
/// N the N values are one aligned load, all inside the rank or all past it.
template <int N>
__device__ __forceinline__ void dyb_ranks(const h16* dyB, int token, int tokens, int j0, int rank, bool vec, unsigned (&w)[N / 2]) {
#pragma unroll
    for (int q = 0; q < N / 2; q++) w[q] = 0u;
    if (token >= tokens || j0 >= rank) return;
    const h16* p = dyB + (long long)token * rank + j0;
    if (vec) {
        if constexpr (N == 2) {
            w[0] = *reinterpret_cast<const unsigned*>(p);
        } else if constexpr (N == 4) {
            const uint2 u = *reinterpret_cast<const uint2*>(p);
            w[0] = u.x; w[1] = u.y;
        } else {
            const uint4 u = *reinterpret_cast<const uint4*>(p);
            w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < N; e++)
        if (j0 + e < rank) w[e >> 1] |= (unsigned)p[e] << (16 * (e & 1));
}

/// The keep bits of columns c … c+7 (`in` > c), those past `in` cleared: the byte the mask bits hold.
__device__ __forceinline__ unsigned keep_byte(unsigned long long seed, long long row_start, int c, int in, unsigned limit) {
    unsigned bits = dropout_keep8(seed, row_start + c, limit);
    if (c + 8 > in) bits &= (1u << (in - c)) - 1u;
    return bits;
}

// MARK: - Forward: xa = (m⊙x)·Aᵀ / keep

/// One block: 16 rows x 8·NT ranks (rank chunk blockIdx.y); warp w takes the 32-column steps w, w + XA_WARPS, ….
/// The blocks of rank chunk 0 write the mask bits when `mask_out` is not null.
template <int NT>
__device__ __forceinline__ void dropout_xa(const h16* __restrict__ x, const h16* __restrict__ a, h16* __restrict__ xa,
                                           unsigned char* __restrict__ mask_out, int tokens, int in, int rank,
                                           unsigned long long seed, float keep, long long ldx) {
    __shared__ float sum[16][NT * 8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16 + g, row1 = row0 + 8, jbase = blockIdx.y * NT * 8;
    const bool vec = (in & 7) == 0 && (ldx & 7) == 0 && aligned16(x) && aligned16(a);
    const unsigned limit = dropout_limit(keep);
    const long long mask_stride = (in + 7) >> 3;
    unsigned char* const bits_out = blockIdx.y == 0 ? mask_out : nullptr;
    const h16* x0 = row0 < tokens ? x + (long long)row0 * ldx : nullptr;
    const h16* x1 = row1 < tokens ? x + (long long)row1 * ldx : nullptr;
    const h16* arow[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int j = jbase + nt * 8 + g;
        arow[nt] = j < rank ? a + (long long)j * in : nullptr;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

    for (int k0 = warp * 32; k0 < in; k0 += XA_WARPS * 32) {
        const int c = k0 + 8 * t;
        h16x8_raw v0 = load_row8(x0, c, in, vec), v1 = load_row8(x1, c, in, vec);
        if (x0 && c < in) {
            const unsigned bits = keep_byte(seed, (long long)row0 * in, c, in, limit);
            if (bits_out) bits_out[row0 * mask_stride + (c >> 3)] = (unsigned char)bits;
            mask_row8(v0, bits);
        }
        if (x1 && c < in) {
            const unsigned bits = keep_byte(seed, (long long)row1 * in, c, in, limit);
            if (bits_out) bits_out[row1 * mask_stride + (c >> 3)] = (unsigned char)bits;
            mask_row8(v1, bits);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const h16x8_raw b = load_row8(arow[nt], c, in, vec);
            const unsigned f0[4] = {v0.w[0], v1.w[0], v0.w[1], v1.w[1]};
            mma_16816_h16(acc[nt], f0, b.w[0], b.w[1]);
            const unsigned f1[4] = {v0.w[2], v1.w[2], v0.w[3], v1.w[3]};
            mma_16816_h16(acc[nt], f1, b.w[2], b.w[3]);
        }
    }
    // The warps' partial sums, added in warp order.
    for (int w = 0; w < XA_WARPS; w++) {
        if (warp == w) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float& s = sum[g + (e >> 1) * 8][nt * 8 + 2 * t + (e & 1)];
                    s = w == 0 ? acc[nt][e] : s + acc[nt][e];
                }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < 16 * NT * 8; i += blockDim.x) {
        const int r = i / (NT * 8), jj = i % (NT * 8), row = blockIdx.x * 16 + r, j = jbase + jj;
        if (row < tokens && j < rank) xa[(long long)row * rank + j] = float_to_h16(sum[r][jj] / keep);
    }
}

extern "C" __global__ void __launch_bounds__(XA_WARPS * 32)
lora_dropout_xa_r16(const h16* x, const h16* a, h16* xa, unsigned char* mask_out, int tokens, int in, int rank,
                    unsigned long long seed, float keep, long long ldx) {
    dropout_xa<2>(x, a, xa, mask_out, tokens, in, rank, seed, keep, ldx);
}
extern "C" __global__ void __launch_bounds__(XA_WARPS * 32)
lora_dropout_xa_r32(const h16* x, const h16* a, h16* xa, unsigned char* mask_out, int tokens, int in, int rank,
                    unsigned long long seed, float keep, long long ldx) {
    dropout_xa<4>(x, a, xa, mask_out, tokens, in, rank, seed, keep, ldx);
}
extern "C" __global__ void __launch_bounds__(XA_WARPS * 32)
lora_dropout_xa_r64(const h16* x, const h16* a, h16* xa, unsigned char* mask_out, int tokens, int in, int rank,
                    unsigned long long seed, float keep, long long ldx) {
    dropout_xa<8>(x, a, xa, mask_out, tokens, in, rank, seed, keep, ldx);
}

// MARK: - Backward: dA partial sums over token splits

/// Warp (blockIdx.x·DA_WARPS + warp) takes 64 columns, blockIdx.y the token split, blockIdx.z the chunk of 8·NT ranks.
/// The mask: read from `mask_in` when not null; else hashed, and written by the blocks of rank chunk 0 into `mask_out`
/// when that is not null.
template <int NT>
__device__ __forceinline__ void dropout_da(const h16* __restrict__ x, const h16* __restrict__ dyB, float* __restrict__ partial,
                                           const unsigned char* __restrict__ mask_in, unsigned char* __restrict__ mask_out,
                                           int tokens, int in, int rank, int splits, unsigned long long seed, float keep,
                                           long long ldx) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int col0 = (blockIdx.x * DA_WARPS + warp) * COLS_PER_WARP, c = col0 + 8 * g, jbase = blockIdx.z * NT * 8;
    if (col0 >= in) return;
    const bool vec = (in & 7) == 0 && (ldx & 7) == 0 && aligned16(x);
    const bool dyb_vec = rank % NT == 0 && (((unsigned long long)dyB) & (2 * NT - 1)) == 0;
    const unsigned limit = dropout_limit(keep);
    const long long mask_stride = (in + 7) >> 3;
    unsigned char* const bits_out = blockIdx.z == 0 && mask_in == nullptr ? mask_out : nullptr;
    const int per = (((tokens + splits - 1) / splits) + 15) & ~15;
    const int first = blockIdx.y * per, end = min(tokens, first + per);
    float acc[4][NT][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[i][nt][0] = acc[i][nt][1] = acc[i][nt][2] = acc[i][nt][3] = 0.0f;

    for (int t0 = first; t0 < end; t0 += 16) {
        h16x8_raw v[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int token = t0 + 4 * t + e;
            v[e] = load_row8(token < end ? x + (long long)token * ldx : nullptr, c, in, vec);
            if (token < end && c < in) {
                unsigned bits;
                if (mask_in) {
                    bits = mask_in[token * mask_stride + (c >> 3)];
                } else {
                    bits = keep_byte(seed, (long long)token * in, c, in, limit);
                    if (bits_out) bits_out[token * mask_stride + (c >> 3)] = (unsigned char)bits;
                }
                mask_row8(v[e], bits);
            }
        }
        // Ranks jbase + g·NT … + NT − 1 of tokens t0 + 4t … t0 + 4t + 3; b[nt] pairs two tokens' rank jbase + g·NT + nt.
        unsigned w[4][NT / 2];
#pragma unroll
        for (int e = 0; e < 4; e++) dyb_ranks<NT>(dyB, t0 + 4 * t + e, end, jbase + g * NT, rank, dyb_vec, w[e]);
        unsigned b[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int q = nt >> 1;
            b[nt][0] = nt & 1 ? pair_halves<1>(w[0][q], w[1][q]) : pair_halves<0>(w[0][q], w[1][q]);
            b[nt][1] = nt & 1 ? pair_halves<1>(w[2][q], w[3][q]) : pair_halves<0>(w[2][q], w[3][q]);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned f[4] = {pair_halves<0>(v[0].w[i], v[1].w[i]), pair_halves<1>(v[0].w[i], v[1].w[i]),
                                   pair_halves<0>(v[2].w[i], v[3].w[i]), pair_halves<1>(v[2].w[i], v[3].w[i])};
#pragma unroll
            for (int nt = 0; nt < NT; nt++) mma_16816_h16(acc[i][nt], f, b[nt][0], b[nt][1]);
        }
    }
    // C[m][n]: m = g (column c + 2i) or g + 8 (column c + 2i + 1), n = 2t + (e & 1) (rank (2t + (e & 1))·NT + nt).
    float* out = partial + (long long)blockIdx.y * rank * in;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int column = c + 2 * i + (e >> 1), j = jbase + (2 * t + (e & 1)) * NT + nt;
                if (column < in && j < rank) out[(long long)j * in + column] = acc[i][nt][e];
            }
}

extern "C" __global__ void __launch_bounds__(DA_WARPS * 32)
lora_dropout_da_r16(const h16* x, const h16* dyB, float* partial, const unsigned char* mask_in, unsigned char* mask_out, int tokens,
                    int in, int rank, int splits, unsigned long long seed, float keep, long long ldx) {
    dropout_da<2>(x, dyB, partial, mask_in, mask_out, tokens, in, rank, splits, seed, keep, ldx);
}
extern "C" __global__ void __launch_bounds__(DA_WARPS * 32)
lora_dropout_da_r32(const h16* x, const h16* dyB, float* partial, const unsigned char* mask_in, unsigned char* mask_out, int tokens,
                    int in, int rank, int splits, unsigned long long seed, float keep, long long ldx) {
    dropout_da<4>(x, dyB, partial, mask_in, mask_out, tokens, in, rank, splits, seed, keep, ldx);
}

/// dA[i] += scale · (Σ_sp partial[sp][i]) / keep over the r·in elements, the splits in index order.
extern "C" __global__ void lora_dropout_da_finish(const float* __restrict__ partial, float* __restrict__ dA, long long count, int splits,
                                                  float scale, float keep) {
    GRID_STRIDE(i, count) {
        float s = 0.0f;
        for (int sp = 0; sp < splits; sp++) s += partial[(long long)sp * count + i];
        dA[i] += scale * (s / keep);
    }
}

// MARK: - Backward: dx += m ⊙ (dyB·A) · s/keep

/// Warp (blockIdx.x·DA_WARPS + warp) takes 64 columns; blocks along y take 16-token tiles in turn. All ranks summed
/// before the one rounding of dx. The mask comes from `mask_in` (lora_dropout_da's bits) or, when null, the hash.
extern "C" __global__ void __launch_bounds__(DA_WARPS * 32)
lora_dropout_dx(const h16* __restrict__ dyB, const h16* __restrict__ a, h16* __restrict__ dx, const unsigned char* __restrict__ mask_in,
                int tokens, int in, int rank, unsigned long long seed, float keep, float factor) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int col0 = (blockIdx.x * DA_WARPS + warp) * COLS_PER_WARP, c = col0 + 8 * g;
    if (col0 >= in) return;
    const bool vec = (in & 7) == 0 && aligned16(a) && aligned16(dx);
    const bool dyb_vec = (rank & 3) == 0 && (((unsigned long long)dyB) & 7) == 0;
    const unsigned limit = dropout_limit(keep);
    const long long mask_stride = (in + 7) >> 3;
    const int ksteps = (rank + 15) / 16;
    // A's rows 4t … 4t+3 at columns c … c+7: the whole fragment when the rank fits one k step, kept for every tile.
    h16x8_raw a_once[4];
#pragma unroll
    for (int e = 0; e < 4; e++) a_once[e] = load_row8(ksteps == 1 && 4 * t + e < rank ? a + (long long)(4 * t + e) * in : nullptr, c, in, vec);
    for (int t0 = blockIdx.y * 16; t0 < tokens; t0 += gridDim.y * 16) {
        float acc[4][2][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int nt = 0; nt < 2; nt++) acc[i][nt][0] = acc[i][nt][1] = acc[i][nt][2] = acc[i][nt][3] = 0.0f;
        for (int ks = 0; ks < ksteps; ks++) {
            h16x8_raw av[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = ks * 16 + 4 * t + e;
                av[e] = ksteps == 1 ? a_once[e] : load_row8(j < rank ? a + (long long)j * in : nullptr, c, in, vec);
            }
            unsigned b[2][2];
#pragma unroll
            for (int nt = 0; nt < 2; nt++) dyb_ranks<4>(dyB, t0 + nt * 8 + g, tokens, ks * 16 + 4 * t, rank, dyb_vec, b[nt]);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const unsigned f[4] = {pair_halves<0>(av[0].w[i], av[1].w[i]), pair_halves<1>(av[0].w[i], av[1].w[i]),
                                       pair_halves<0>(av[2].w[i], av[3].w[i]), pair_halves<1>(av[2].w[i], av[3].w[i])};
#pragma unroll
                for (int nt = 0; nt < 2; nt++) mma_16816_h16(acc[i][nt], f, b[nt][0], b[nt][1]);
            }
        }
        // C[m][n]: column c + 2i + (e >> 1), token t0 + 8·nt + 2t + (e & 1).
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int token = t0 + nt * 8 + 2 * t + half;
                if (token >= tokens || c >= in) continue;
                h16* row = dx + (long long)token * in;
                const unsigned bits = mask_in ? (unsigned)mask_in[token * mask_stride + (c >> 3)]
                                              : dropout_keep8(seed, (long long)token * in + c, limit);
                h16x8_raw v = load_row8(row, c, in, vec);
                float f[8];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    f[2 * q] = h16_low(v.w[q]);
                    f[2 * q + 1] = h16_high(v.w[q]);
                }
#pragma unroll
                for (int e = 0; e < 8; e++)
                    if ((bits >> e) & 1u) f[e] = f[e] + acc[e >> 1][nt][half + 2 * (e & 1)] * factor;
                if (vec && c + 8 <= in) {
                    store_h16x8(row + c, f);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        if (c + e < in) row[c + e] = float_to_h16(f[e]);
                }
            }
    }
}
