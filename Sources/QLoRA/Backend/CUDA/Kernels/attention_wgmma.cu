// attention_wgmma.cu: the flash-attention forward and backward of attention_mma.cu's attention_fa_forward and
// attention_fa_backward (same inputs, outputs and formulas: see attention.cu's header) for Hopper (sm_90a) at head
// dimension 128, on the warpgroup tensor-core instruction `wgmma.mma_async` (PTX ISA 8.x, "Asynchronous Warpgroup
// Level Matrix Multiply-Accumulate"). Other targets compile this file to nothing; CUDAAttention.swift launches it only
// on sm_90a, for d = 128 without soft-capping (causal, GQA, packed segments and sliding windows are supported;
// soft-capped calls and every other head dimension take the mma.sync flash kernels). The backward is described
// under "MARK: - Backward" below; the forward here.
//
// Block = 128 queries of one head, 2 warpgroups (256 threads); warpgroup w owns query rows 64 w.. of the block.
// Key tiles of 128 keys, double-buffered with cp.async (tile j + 1 loads while tile j is computed):
//   S = Q Kᵀ      wgmma m64n128k16, A = Q and B = K from shared memory (both K-major: d contiguous), 8 k-steps;
//   P = exp2(S·scale·log2 e − m) with the running row max m (base-2 units) and sum l (online softmax, masked by
//                 causality, window and segments only on tiles that need it);
//   O += P V      wgmma m64n128k16, A = P from registers (the fp32 accumulator fragment of two adjacent n8 column
//                 groups is exactly the A fragment of one k-step, as for mma.sync), B = V from shared memory read
//                 N-major (d contiguous per key: the transposed-B form), 8 k-steps over the tile's keys.
// Then o = O / l and lse = (m + log2 l)·ln 2. Blocks start with the last query tiles (the longest rows).
//
// Shared-memory tiles use the 128-byte swizzle that the wgmma descriptors name. A tile of R rows x 128 values is
// stored as two column halves of 64 values (128 bytes a row); in half c, row r's 16-byte chunk x (values 8x..8x+7)
// sits at byte  c·R·128 + r·128 + 16·(x XOR (r mod 8)).  The hardware applies that XOR to address bits [4,7) from
// bits [7,10), so every tile starts on a 1024-byte boundary. Descriptor fields (PTX ISA "Matrix Descriptor Format"):
// start address >> 4 in bits 0-13, leading byte offset (LBO) >> 4 in 16-29, stride byte offset (SBO) >> 4 in
// 32-45, swizzle mode 1 (128 B) in bits 62-63. Canonical layouts in 16-bit values:
//   K-major  (Q, K):  ((8, m), (8, 2)) : ((64, SBO), (1, 8))        SBO = 1024 B (next 8 rows); LBO unused (16 B);
//                     a k-step of 16 within a 64-value half moves the start by 32 B, the next half by R·128 B.
//   N-major  (V):     ((8, 8, n), (8, k)) : ((1, 8, LBO), (64, SBO))  LBO = R·128 B (the next 64 columns of d),
//                     SBO = 1024 B (the next 8 keys); the k-step over keys 16 kk.. moves the start by 2048 B.
// Accumulator fragment of m64nNk16 (warp v of the warpgroup, lane = 4 g + t): d[4 n + 0..1] = row 16 v + g, columns
// 8 n + 2 t, +1; d[4 n + 2..3] = row 16 v + g + 8. Ordering: cp.async data is made visible to the async proxy
// (fence.proxy.async) before the barrier that precedes the wgmma reading it; each batch of wgmma is opened by
// wgmma.fence and closed by commit_group + wait_group 0, and the accumulator registers are pinned around them
// (empty asm with "+f") so the compiler cannot move their reads or writes across the asynchronous product.
#include "qlora_prelude.cuh"
#include "attention_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#if QLORA_HALF
#define WG_TYPE "f16"
#else
#define WG_TYPE "bf16"
#endif

#define WG_THREADS 256
#define WG_ROWS 128  // queries per block
#define WG_KEYS 128  // keys per tile
#define WG_TILE_BYTES (128 * 128 * 2)
// Q, 2 stages of K and V, 2 stages of key segments, and slack to align the base to 1024 bytes (CUDAAttention
// computes the same: wgmmaForwardShared).
#define WG_SHARED (5 * WG_TILE_BYTES + 2 * WG_KEYS * 4 + 1024)

extern __shared__ __align__(1024) unsigned char wg_shared[];

__device__ __forceinline__ unsigned wg_shared_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

/// Byte offset of 16-byte chunk x (0..15: values 8x..8x+7 of d = 128) of row r in a swizzled tile of `rows` rows.
__device__ __forceinline__ unsigned wg_chunk_offset(int r, int x, int rows) {
    return (unsigned)((x >> 3) * rows * 128 + r * 128 + (((x & 7) ^ (r & 7)) << 4));
}

/// Copies rows r0.. (token t0 + r0 + r, head `head`, d = 128) into the swizzled tile at shared address `dst`
/// with cp.async, zero-filled past seq.
template <int ROWS>
__device__ __forceinline__ void wg_async_rows(unsigned dst, const h16* src, long long t0, int r0, int seq, int heads, int head) {
    for (int idx = threadIdx.x; idx < ROWS * 16; idx += WG_THREADS) {
        const int rr = idx >> 4, x = idx & 15;
        const bool valid = r0 + rr < seq;
        const h16* from = valid ? src + ((t0 + r0 + rr) * heads + head) * 128 + x * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst + wg_chunk_offset(rr, x, ROWS)), "l"(from),
                     "r"(valid ? 16 : 0) : "memory");
    }
}

/// A shared-memory matrix descriptor with the 128-byte swizzle.
__device__ __forceinline__ unsigned long long wg_descriptor(unsigned address, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((address & 0x3ffffu) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16)
           | ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32) | (1ull << 62);
}

/// Keeps the compiler from moving accesses of v across the asynchronous products (see the header).
__device__ __forceinline__ void wg_pin(float (&v)[64]) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(v[i])::"memory");
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void wg_commit_and_wait() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}

/// d (64 x 128, fp32) = (accumulate ? d : 0) + A B with A (64 x 16) and B (16 x 128) both K-major in shared memory.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." WG_TYPE "." WG_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(a), "l"(b), "r"(accumulate));
}

/// d (64 x 128, fp32) += A B with A (64 x 16) from registers (the mma.sync A fragment of each warp's 16 rows) and
/// B (16 x 128) N-major in shared memory (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const unsigned (&a)[4], unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." WG_TYPE "." WG_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

__device__ __forceinline__ float wg_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned wg_pack(float lo, float hi) {
    return (unsigned)float_to_h16(lo) | ((unsigned)float_to_h16(hi) << 16);
}

// attention_wgmma_forward_pipelined_d128 (QLORA_ATTENTION=wgmma-pipelined): the same tiles and math, with each
// warpgroup's P V product of tile j − 1 on the tensor cores while it masks and exponentiates tile j (FA3's overlap
// inside a warpgroup). Per key tile of a block the products take ~2,048 cycles (2 x 2 x 64 x 128 x 128 MACs at 2,048
// a cycle) and the softmax ~1,000-1,500 (16,384 ex2 on 16 SFUs: 1,024, plus the max, the sums and the packing), which
// the simple kernel runs with the tensor cores idle (both warpgroups meet at the tile's barrier and reach the softmax
// together): up to ~35% on the forward, counted, not yet measured. Order in iteration j: Sⱼ = Q Kⱼᵀ, then
// O += Pⱼ₋₁ Vⱼ₋₁, committed as two groups; wait for Sⱼ only; mask, row max, P = exp2(…) and sums; wait for the P V
// product; O *= α; pack Pⱼ. The last P V follows the loop. Vⱼ₋₁ is read while tile j + 1 loads, so V has three
// stages (K two): WGF_PIPELINED_SHARED = Q + 2 K + 3 V tiles + 2 stages of key segments + 1024 = 198,656 bytes.
// O accumulates the same products in the same order and is scaled by the same α, so o and lse equal the simple
// kernel's bit for bit.
#define WGF_PIPELINED_SHARED (6 * WG_TILE_BYTES + 2 * WG_KEYS * 4 + 1024)

template <bool PIPELINED>
__device__ __forceinline__ void wgf_forward(const h16* q, const h16* k, const h16* v, h16* o, float* lse,
                                            const int* segments, int seq, int heads, int kv_heads, float scale,
                                            int window) {
    constexpr int V_STAGES = PIPELINED ? 3 : 2;
    // The dynamic shared memory, from its first 1024-byte boundary.
    const unsigned raw = wg_shared_address(wg_shared);
    const unsigned pad = (1024u - (raw & 1023u)) & 1023u;
    const unsigned qs = raw + pad, ks = qs + WG_TILE_BYTES, vs = ks + 2 * WG_TILE_BYTES;  // shared addresses
    int* segk = reinterpret_cast<int*>(wg_shared + pad + (3 + V_STAGES) * WG_TILE_BYTES);  // [2][WG_KEYS]

    const int h = blockIdx.x, b = blockIdx.y, q0 = (gridDim.z - 1 - blockIdx.z) * WG_ROWS;  // longest rows first
    const int hk = h / (heads / kv_heads);
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long t0 = (long long)b * seq;
    const int wg_first = q0 + 64 * wg, wg_last = wg_first + 63;
    const int rows[2] = {wg_first + 16 * warp + g, wg_first + 16 * warp + g + 8};
    int segq[2];
#pragma unroll
    for (int i = 0; i < 2; i++) segq[i] = (segments && rows[i] < seq) ? segments[t0 + rows[i]] : 0;

    float oacc[64], s[64];
#pragma unroll
    for (int x = 0; x < 64; x++) oacc[x] = 0.0f;
    float m[2] = {-QLORA_INFINITY, -QLORA_INFINITY}, l[2] = {0.0f, 0.0f};
    const float sl2 = scale * 1.4426950408889634f;  // logits to base 2
    // PIPELINED: P of the tile whose P V is pending, as the A fragments of its 8 k-steps, and that tile's V stage
    // (-1 before the first). The P V product is issued on every path (ptxas serializes wgmma issued under a branch it
    // cannot prove uniform): before the first tile with P = 0 against a loaded V stage, which adds exact zeros.
    unsigned pa[8][4];
#pragma unroll
    for (int kk = 0; kk < 8; kk++) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
    int pending = -1;

    // Key tiles from the one holding the block's first row's first visible key (window) to the diagonal.
    const int key_end = min(seq, q0 + WG_ROWS), tiles = (key_end + WG_KEYS - 1) / WG_KEYS;
    const int first_tile = max(0, q0 - window + 1) / WG_KEYS;
    auto issue = [&](int j) {
        const int stage = j & 1, vstage = j % V_STAGES;
        wg_async_rows<WG_KEYS>(ks + stage * WG_TILE_BYTES, k, t0, j * WG_KEYS, seq, kv_heads, hk);
        wg_async_rows<WG_KEYS>(vs + vstage * WG_TILE_BYTES, v, t0, j * WG_KEYS, seq, kv_heads, hk);
        if (segments && threadIdx.x < WG_KEYS) {
            const int key = j * WG_KEYS + threadIdx.x;
            segk[stage * WG_KEYS + threadIdx.x] = key < seq ? segments[t0 + key] : -1;
        }
    };
    // O += P V for the V tile in stage vstage: k-step kk covers keys 16 kk..16 kk + 15 (P's s[8 kk .. 8 kk + 7]).
    auto accumulate_pv = [&](int vstage) {
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            wgmma_rs(oacc, pa[kk], wg_descriptor(vs + vstage * WG_TILE_BYTES + kk * 2048, WG_TILE_BYTES / 2, 1024));
    };
    wg_async_rows<WG_ROWS>(qs, q, t0, q0, seq, heads, h);
    issue(first_tile);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    for (int j = first_tile; j < tiles; j++) {
        // Tile j has landed for every thread and is visible to the tensor cores' (async) proxy; every warpgroup is
        // done with tile j - 1's K (and, PIPELINED, with tile j - 2's V), whose stages are refilled next.
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (j + 1 < tiles) issue(j + 1);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        const int j0 = j * WG_KEYS, stage = j & 1;
        if (j0 > wg_last) continue;                      // every key is after every row of this warpgroup
        if (j0 + WG_KEYS - 1 <= wg_first - window) continue;  // every key is before every row's window

        // S = Q Kᵀ over d = 128: 8 k-steps, two per 16 values of each 64-value half.
        const unsigned ktile = ks + stage * WG_TILE_BYTES;
        wg_pin(s);
        if constexpr (PIPELINED) wg_pin(oacc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            const unsigned step = (kk >> 2) * WG_TILE_BYTES / 2 + (kk & 3) * 32;
            wgmma_ss(s, wg_descriptor(qs + 64 * wg * 128 + step, 16, 1024), wg_descriptor(ktile + step, 16, 1024), kk > 0);
        }
        if constexpr (PIPELINED) {
            wg_commit();  // group: S of tile j
            accumulate_pv(pending >= 0 ? pending : j % V_STAGES);
            wg_commit();  // group: P V of the previous tile (zeros before the first)
            wg_wait<1>();
        } else {
            wg_commit_and_wait();
        }
        wg_pin(s);

        // Mask where the tile crosses this warpgroup's diagonal or its window's lower edge (or segments apply).
        if (segments || j0 + WG_KEYS - 1 > wg_first || j0 <= wg_last - window) {
            const int* sk = segk + stage * WG_KEYS;
#pragma unroll
            for (int x = 0; x < 64; x++) {
                const int i = (x >> 1) & 1, col = j0 + (x >> 2) * 8 + 2 * t + (x & 1);
                const bool ok = col <= rows[i] && col > rows[i] - window && (!segments || sk[col - j0] == segq[i]);
                if (!ok) s[x] = -QLORA_INFINITY;
            }
        }
        // Online softmax per row (rows g and g + 8 of the warp; a row's 128 values are spread over the 4 lanes t).
        float mx[2] = {-QLORA_INFINITY, -QLORA_INFINITY};
#pragma unroll
        for (int x = 0; x < 64; x++) mx[(x >> 1) & 1] = fmaxf(mx[(x >> 1) & 1], s[x]);
        float msub[2], alpha[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            const float m_new = fmaxf(m[i], mx[i] * sl2);  // running max in base-2 units
            msub[i] = m_new == -QLORA_INFINITY ? 0.0f : m_new;
            alpha[i] = wg_exp2(m[i] - msub[i]);  // 0 on the first tile (m = -inf)
            l[i] *= alpha[i];
            m[i] = m_new;
        }
#pragma unroll
        for (int x = 0; x < 64; x++) {
            const float p = wg_exp2(fmaf(s[x], sl2, -msub[(x >> 1) & 1]));
            s[x] = p;
            l[(x >> 1) & 1] += p;
        }
        if constexpr (PIPELINED) {
            wg_wait<0>();  // the previous tile's P V: O and pa are free
            wg_pin(oacc);
        }
#pragma unroll
        for (int x = 0; x < 64; x++) oacc[x] *= alpha[(x >> 1) & 1];

        // All of P is packed before the products start (registers written between them would make ptxas insert
        // a warpgroup.arrive before each).
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            pa[kk][0] = wg_pack(s[8 * kk], s[8 * kk + 1]);
            pa[kk][1] = wg_pack(s[8 * kk + 2], s[8 * kk + 3]);
            pa[kk][2] = wg_pack(s[8 * kk + 4], s[8 * kk + 5]);
            pa[kk][3] = wg_pack(s[8 * kk + 6], s[8 * kk + 7]);
        }
        if constexpr (PIPELINED) {
            pending = j % V_STAGES;  // issued with the next tile's S, or after the loop
        } else {
            wg_pin(oacc);
            wg_fence();
            accumulate_pv(j % V_STAGES);
            wg_commit_and_wait();
            wg_pin(oacc);
        }
    }
    if constexpr (PIPELINED) {
        // The last tile's P V (zeros against the last loaded stage where this warpgroup skipped every tile).
        wg_pin(oacc);
        wg_fence();
        accumulate_pv(pending >= 0 ? pending : (tiles - 1) % V_STAGES);
        wg_commit_and_wait();
        wg_pin(oacc);
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float sum = l[i];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int row = rows[i];
        if (row >= seq) continue;
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        h16* out = o + ((t0 + row) * heads + h) * 128;
#pragma unroll
        for (int n = 0; n < 16; n++)
            *reinterpret_cast<unsigned*>(out + n * 8 + 2 * t) = wg_pack(oacc[4 * n + 2 * i] * inv, oacc[4 * n + 2 * i + 1] * inv);
        if (t == 0) lse[(t0 + row) * heads + h] = m[i] * 0.6931471805599453f + logf(sum);
    }
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
attention_wgmma_forward_d128(const h16* q, const h16* k, const h16* v, h16* o, float* lse, const int* segments, int seq,
                             int heads, int kv_heads, float scale, float softcap, int window) {
    (void)softcap;  // soft-capped calls take the mma.sync kernels
    wgf_forward<false>(q, k, v, o, lse, segments, seq, heads, kv_heads, scale, window);
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
attention_wgmma_forward_pipelined_d128(const h16* q, const h16* k, const h16* v, h16* o, float* lse,
                                       const int* segments, int seq, int heads, int kv_heads, float scale,
                                       float softcap, int window) {
    (void)softcap;  // soft-capped calls take the mma.sync kernels
    wgf_forward<true>(q, k, v, o, lse, segments, seq, heads, kv_heads, scale, window);
}

// MARK: - Backward
//
// attention_wgmma_backward_d128: the fused flash backward of attention_mma.cu's attention_fa_backward (same inputs and
// outputs; delta = rowsum(dO ∘ O) and the zeroed fp32 dQ accumulator come from attention_fa_prep, dq = scale·dQ from
// attention_fa_dq) on wgmma. Math (per query head h of the KV head's group, query i, key j, s = scale):
//   P[i][j]  = exp2(s·log2 e·(q_i·k_j) − log2 e·lse_i)      (0 where masked: causal, window, segments, i ≥ seq)
//   dP[i][j] = dO_i·v_j,   dS[i][j] = P[i][j]·(dP[i][j] − δ_i),   δ_i = Σ_d dO_i[d]·O_i[d]
//   dV_j += Σ_i P[i][j]·dO_i,   dK_j += Σ_i dS[i][j]·q_i,   dQ_i += Σ_j dS[i][j]·k_j;   dk = s·dK, dv = dV, dq = s·dQ.
// Block = 128 keys of one KV head (key tile blockIdx.y, the first tiles, which see the most queries, start first),
// 2 warpgroups (256 threads); warpgroup w owns keys 64 w.. of the block. K and V stay in shared memory (swizzled as
// the forward's tiles); the block loops over the group's query heads and, per head, the query tiles of 64 from the
// diagonal to the last query whose window reaches the block (Q, dO, lse·log2 e, delta and query segments
// double-buffered by cp.async and plain stores). Per query tile, each warpgroup:
//   Sᵀ = K Qᵀ and dPᵀ = V dOᵀ   wgmma m64n64k16 from shared memory (A = its 64 K or V rows, B = Q or dO, both
//                               K-major: d contiguous), 8 k-steps each;
//   Pᵀ, dSᵀ in registers        (keys are the fragment's rows, queries its columns; lse and δ are per column);
//   dV += Pᵀ dO, dK += dSᵀ Q    wgmma m64n128k16 with A = Pᵀ / dSᵀ from registers (the accumulator fragment of two
//                               adjacent n8 groups is the A fragment of one k-step, as in the forward's P V) and
//                               B = dO / Q read N-major (the transposed-B form of the forward's V), 4 k-steps;
//   dSᵀ to shared memory        as a swizzled [128 keys][64 queries] tile (128 bytes a key);
// then, after a barrier (every key's dSᵀ is needed), warpgroup w adds dQ[:, 64 w..64 w + 63] += dS K over the 128
// keys: wgmma m64n64k16 with A = dS read from the dSᵀ tile through the transposed-A form (imm-trans-a = 1: the tile is
// M-major, queries contiguous; 16-bit types allow it for A and B) and B = K's column half w, N-major (imm-trans-b =
// 1), 8 k-steps; the fp32 result goes to the dQ accumulator by red.global.add.v2.f32, as fa_backward does.
// M-major (transposed) descriptors use the forward's N-major V layout: LBO = the next 64 values of M or N (unused
// when the product spans 64), SBO = 1024 B (the next 8 rows of K), a k-step of 16 rows = 2048 B.
// Shared memory (WGB_SHARED, CUDAAttention's wgmmaBackwardShared): K and V (128 rows), Q and dO (2 stages x 64 rows),
// dSᵀ (128 x 64), lse/delta/segments (2 stages x 64), 1024 bytes of alignment slack: 150,016 bytes.

#define WGB_QUERIES 64                              // queries per tile
#define WGB_QTILE_BYTES (WGB_QUERIES * 128 * 2)     // a Q or dO tile: 64 rows x 128 values
#define WGB_DS_BYTES (128 * WGB_QUERIES * 2)        // dSᵀ: 128 keys x 64 queries
#define WGB_SHARED (2 * WG_TILE_BYTES + 4 * WGB_QTILE_BYTES + WGB_DS_BYTES + 3 * 2 * WGB_QUERIES * 4 + 1024)

/// Keeps the compiler from moving accesses of v across the asynchronous products (see the header).
__device__ __forceinline__ void wg_pin32(float (&v)[32]) {
#pragma unroll
    for (int i = 0; i < 32; i++) asm volatile("" : "+f"(v[i])::"memory");
}

/// d (64 x 64, fp32) = (accumulate ? d : 0) + A B, A (64 x 16) and B (16 x 64) from shared memory; TA / TB: the
/// operand is stored M- / N-major (imm-trans-a / imm-trans-b).
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." WG_TYPE "." WG_TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}

/// The [key][query] offset of dSᵀ value pair (key r, queries 8 x + 2 t, +1) in the swizzled 128 x 64 tile.
__device__ __forceinline__ unsigned wgb_ds_offset(int r, int x, int t) {
    return (unsigned)(r * 128 + ((x ^ (r & 7)) << 4) + 4 * t);
}

// MARK: - Backward, pipelined
//
// attention_wgmma_backward_pipelined_d128 (QLORA_ATTENTION=wgmma-pipelined): the same block, tiles, products and
// math as attention_wgmma_backward_d128, in an order that keeps the tensor cores fed. A query tile costs a block
// ~11,500 cycles in the simple kernel (session 8's 1 × 32,768 step: 3.36 s of backward over ~15,900 tiles an SM)
// against ~2,560 of tensor-core work (5 products of 64 x 64 x 128 per warpgroup at 2,048 MACs a cycle an SM). What
// changes, and what each should gain (counted, not yet measured):
//  1. The tile's lse, δ and segments come by 4-byte cp.async in the Q/dO group, raw lse scaled by log2 e where it is
//     used: no thread waits on a global load at the top of a tile (there, warps 0-1 held warpgroup 0's first wgmma
//     back by an L2 round trip, ~600-800 cycles a tile, 5-7%).
//  2. Sᵀ = K Qᵀ and dPᵀ = V dOᵀ committed as two wgmma groups; P = exp2(…) (8,192 ex2 a tile on 16 SFUs: ~512
//     cycles) runs while dPᵀ is still on the tensor cores (~512 cycles for both warpgroups): up to ~4%.
//  3. dV += Pᵀ dO issued as soon as P is packed, before dSᵀ is formed, and dK += dSᵀ Q before the barrier that
//     precedes dQ, both waited for only with dQ's group at the tile's end: the dS work (~200 cycles) and the
//     barrier run under ~1,000 cycles of products: ~2-3%.
//  4. dQ = dS K leaves through shared memory: each warpgroup writes its 64 x 64 fp32 half into a [64][128] tile
//     (rows padded to 544 bytes: the float2 stores of a half-warp hit 16 distinct bank pairs), and after the next
//     tile's top barrier threads 0..63 each add one 512-byte query row to the accumulator with one bulk reduction
//     (cp.reduce.async.bulk .add.f32) instead of 4,096 red.global.add.v2 a tile (1,024 L2 sectors as scattered
//     8-byte atomics, and 16 LSU issues a thread). Two tiles of staging, so tile n writes one while tile n − 1's
//     leaves; a thread's bulk group is waited for (.read) at the top of the tile that rewrites its source. The gain
//     depends on what the atomics cost today (the mma.sync backward's profile: 477 GB/s of L2 traffic, mostly dQ).
// Shared memory: WGB_SHARED + 2 x 64 x 544 bytes of dQ staging = 219,648 bytes (Hopper's limit: 232,448).

#define WGBP_DQ_STRIDE 544                                   // bytes per staged dQ row: 512 + 32 of padding
#define WGBP_DQ_BYTES (WGB_QUERIES * WGBP_DQ_STRIDE)         // one stage of dQ rows
#define WGBP_SHARED (WGB_SHARED + 2 * WGBP_DQ_BYTES)

/// A 4-byte cp.async into shared memory; `valid` false writes 0 (src is then not read, but must be a valid address).
__device__ __forceinline__ void wg_async_word(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0) : "memory");
}


/// The flash backward on wgmma; PIPELINED picks the pipelined order described above (the simple kernel otherwise).
template <bool PIPELINED>
__device__ __forceinline__ void wgb_backward(const h16* q, const h16* k, const h16* v, const h16* dout, const float* lse,
                                             const float* delta, const int* segments, float* dq_accum, h16* dk, h16* dv,
                                             int seq, int heads, int kv_heads, float scale, int window) {
    const unsigned raw = wg_shared_address(wg_shared);
    const unsigned pad = (1024u - (raw & 1023u)) & 1023u;
    const unsigned ks = raw + pad, vs = ks + WG_TILE_BYTES;                        // shared addresses
    const unsigned qs = vs + WG_TILE_BYTES, dos = qs + 2 * WGB_QTILE_BYTES;         // [2] stages each
    const unsigned dss = dos + 2 * WGB_QTILE_BYTES;                                 // dSᵀ
    unsigned char* base = wg_shared + pad;
    unsigned char* ds_tile = base + (dss - ks);
    float* lse_s = reinterpret_cast<float*>(ds_tile + WGB_DS_BYTES);  // [2][64], times log2 e unless PIPELINED
    float* delta_s = lse_s + 2 * WGB_QUERIES;                          // [2][64]
    int* segq_s = reinterpret_cast<int*>(delta_s + 2 * WGB_QUERIES);   // [2][64]
    unsigned char* dq_stage = reinterpret_cast<unsigned char*>(segq_s + 2 * WGB_QUERIES);  // PIPELINED: [2][64 rows]
    const unsigned dq_stage_address = wg_shared_address(dq_stage);

    const int hk = blockIdx.x % kv_heads, b = blockIdx.x / kv_heads, k0 = blockIdx.y * WG_KEYS;
    const int group = heads / kv_heads;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long t0 = (long long)b * seq;
    const int wg_first = k0 + 64 * wg, wg_last = wg_first + 63;  // this warpgroup's keys
    const int keys[2] = {wg_first + 16 * warp + g, wg_first + 16 * warp + g + 8};
    int segk[2];
#pragma unroll
    for (int i = 0; i < 2; i++) segk[i] = (segments && keys[i] < seq) ? segments[t0 + keys[i]] : -1;
    const float sl2 = scale * 1.4426950408889634f;

    float dka[64], dva[64], st[32], dpt[32], dqa[32];
#pragma unroll
    for (int x = 0; x < 64; x++) dka[x] = dva[x] = 0.0f;

    // Query tiles from the diagonal up to the last query whose window reaches the block's last key, per head.
    const int query_end = min(seq, k0 + WG_KEYS + window - 1);
    const int tiles_per_head = (query_end - k0 + WGB_QUERIES - 1) / WGB_QUERIES, tiles = group * tiles_per_head;
    auto issue = [&](int n, int stage) {
        const int h = hk * group + n / tiles_per_head, i0 = k0 + (n % tiles_per_head) * WGB_QUERIES;
        wg_async_rows<WGB_QUERIES>(qs + stage * WGB_QTILE_BYTES, q, t0, i0, seq, heads, h);
        wg_async_rows<WGB_QUERIES>(dos + stage * WGB_QTILE_BYTES, dout, t0, i0, seq, heads, h);
        if constexpr (PIPELINED) {
            if (threadIdx.x < WGB_QUERIES) {
                const int i = i0 + threadIdx.x, r = stage * WGB_QUERIES + threadIdx.x;
                const bool valid = i < seq;
                const long long row = valid ? (t0 + i) * heads + h : 0;
                wg_async_word(wg_shared_address(lse_s + r), lse + row, valid);
                wg_async_word(wg_shared_address(delta_s + r), delta + row, valid);
                wg_async_word(wg_shared_address(segq_s + r), segments && valid ? (const void*)(segments + t0 + i) : (const void*)lse,
                              segments && valid);
            }
        } else {
            attention_stage_query_rows(lse_s + stage * WGB_QUERIES, delta_s + stage * WGB_QUERIES, segq_s + stage * WGB_QUERIES,
                                       lse, delta, segments, WGB_QUERIES, i0, h, t0, seq, heads);
        }
    };
    // PIPELINED: tile n's staged dQ rows (stage n & 1) added to the accumulator, one bulk reduction a query row.
    auto reduce_dq = [&](int n) {
        if (threadIdx.x < WGB_QUERIES) {
            const int h = hk * group + n / tiles_per_head, query = k0 + (n % tiles_per_head) * WGB_QUERIES + threadIdx.x;
            if (query < seq) {
                float* row = dq_accum + ((t0 + query) * heads + h) * 128;
                asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], 512;\n" ::"l"(row),
                             "r"(dq_stage_address + (n & 1) * WGBP_DQ_BYTES + threadIdx.x * WGBP_DQ_STRIDE) : "memory");
            }
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
    };
    wg_async_rows<WG_KEYS>(ks, k, t0, k0, seq, kv_heads, hk);
    wg_async_rows<WG_KEYS>(vs, v, t0, k0, seq, kv_heads, hk);
    if (tiles > 0) issue(0, 0);
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    for (int n = 0; n < tiles; n++) {
        // Tile n has landed and is visible to the async proxy; every warpgroup is done with tile n - 1 (its stage,
        // refilled next, and the dSᵀ tile, rewritten below). PIPELINED: tile n − 1's dQ rows are staged and visible
        // to the async proxy, and tile n − 2's have been read out of the stage this tile rewrites.
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        if constexpr (PIPELINED) {
            if (threadIdx.x < WGB_QUERIES) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if constexpr (PIPELINED) {
            if (n > 0) reduce_dq(n - 1);
        }
        if (n + 1 < tiles) issue(n + 1, (n + 1) & 1);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        const int stage = n & 1;
        const int h = hk * group + n / tiles_per_head, i0 = k0 + (n % tiles_per_head) * WGB_QUERIES;
        const unsigned qtile = qs + stage * WGB_QTILE_BYTES, dotile = dos + stage * WGB_QTILE_BYTES;
        const float* lse_t = lse_s + stage * WGB_QUERIES;
        const float* delta_t = delta_s + stage * WGB_QUERIES;
        const int* segq_t = segq_s + stage * WGB_QUERIES;
        const float lse_unit = PIPELINED ? 1.4426950408889634f : 1.0f;  // staged lse to base 2
        const bool masked = segments || i0 < wg_last || i0 + WGB_QUERIES > seq || i0 + WGB_QUERIES - 1 - window >= wg_first;
        // Pᵀ (into st) where fragment value x is key row keys[(x >> 1) & 1], query column 8 (x >> 2) + 2 t + (x & 1).
        auto probabilities = [&]() {
#pragma unroll
            for (int x = 0; x < 32; x++) {
                const int cq = (x >> 2) * 8 + 2 * t + (x & 1);
                float p = wg_exp2(fmaf(st[x], sl2, -lse_t[cq] * lse_unit));
                if (masked) {
                    const int i = (x >> 1) & 1, query = i0 + cq;
                    const bool ok = query < seq && keys[i] <= query && keys[i] > query - window
                                    && (!segments || segq_t[cq] == segk[i]);
                    p = ok ? p : 0.0f;
                }
                st[x] = p;
            }
        };

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ over d = 128 (k-step kk: half kk / 4 of the rows, 32 bytes per 16 values).
        wg_pin32(st);
        wg_pin32(dpt);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            const unsigned key_step = (kk >> 2) * (WG_TILE_BYTES / 2) + 64 * wg * 128 + (kk & 3) * 32;
            const unsigned query_step = (kk >> 2) * (WGB_QTILE_BYTES / 2) + (kk & 3) * 32;
            wgmma_ss_n64<0, 0>(st, wg_descriptor(ks + key_step, 16, 1024), wg_descriptor(qtile + query_step, 16, 1024), kk > 0);
            if constexpr (!PIPELINED)
                wgmma_ss_n64<0, 0>(dpt, wg_descriptor(vs + key_step, 16, 1024), wg_descriptor(dotile + query_step, 16, 1024), kk > 0);
        }
        unsigned pa[4][4], sa[4][4];
        if constexpr (PIPELINED) {
            wg_commit();  // group: Sᵀ
#pragma unroll
            for (int kk = 0; kk < 8; kk++) {
                const unsigned key_step = (kk >> 2) * (WG_TILE_BYTES / 2) + 64 * wg * 128 + (kk & 3) * 32;
                const unsigned query_step = (kk >> 2) * (WGB_QTILE_BYTES / 2) + (kk & 3) * 32;
                wgmma_ss_n64<0, 0>(dpt, wg_descriptor(vs + key_step, 16, 1024), wg_descriptor(dotile + query_step, 16, 1024), kk > 0);
            }
            wg_commit();  // group: dPᵀ
            wg_wait<1>();  // Sᵀ (dPᵀ may still run)
            wg_pin32(st);
            probabilities();
            // dV += Pᵀ dO now (B = the dO tile N-major, k-step = 16 queries); dSᵀ is formed while it runs.
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int r = 0; r < 4; r++) pa[kk][r] = wg_pack(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1]);
            wg_pin(dva);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) wgmma_rs(dva, pa[kk], wg_descriptor(dotile + kk * 2048, WGB_QTILE_BYTES / 2, 1024));
            wg_commit();  // group: dV
            wg_wait<1>();  // dPᵀ (dV may still run)
            wg_pin32(dpt);
#pragma unroll
            for (int x = 0; x < 32; x++) dpt[x] = st[x] * (dpt[x] - delta_t[(x >> 2) * 8 + 2 * t + (x & 1)]);  // dSᵀ
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int r = 0; r < 4; r++) sa[kk][r] = wg_pack(dpt[8 * kk + 2 * r], dpt[8 * kk + 2 * r + 1]);
        } else {
            wg_commit_and_wait();
            wg_pin32(st);
            wg_pin32(dpt);
            probabilities();
#pragma unroll
            for (int x = 0; x < 32; x++) dpt[x] = st[x] * (dpt[x] - delta_t[(x >> 2) * 8 + 2 * t + (x & 1)]);  // dSᵀ
            // A fragments of the k-steps over the tile's 64 queries, and dSᵀ (the same bf16 values) into shared memory.
#pragma unroll
            for (int kk = 0; kk < 4; kk++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    pa[kk][r] = wg_pack(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1]);
                    sa[kk][r] = wg_pack(dpt[8 * kk + 2 * r], dpt[8 * kk + 2 * r + 1]);
                }
        }
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                // register r: key row 16 warp + g (+8 for r odd), queries 16 kk + 8 (r >> 1) + 2 t..
                const int row = 64 * wg + 16 * warp + g + 8 * (r & 1);
                *reinterpret_cast<unsigned*>(ds_tile + wgb_ds_offset(row, 2 * kk + (r >> 1), t)) = sa[kk][r];
            }

        // dV += Pᵀ dO (unless issued above) and dK += dSᵀ Q: B = the dO / Q tile N-major (d contiguous per query).
        wg_pin(dva);
        wg_pin(dka);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            if constexpr (!PIPELINED) wgmma_rs(dva, pa[kk], wg_descriptor(dotile + kk * 2048, WGB_QTILE_BYTES / 2, 1024));
            wgmma_rs(dka, sa[kk], wg_descriptor(qtile + kk * 2048, WGB_QTILE_BYTES / 2, 1024));
        }
        if constexpr (PIPELINED) {
            wg_commit();  // group: dK, waited for with dQ's
        } else {
            wg_commit_and_wait();
            wg_pin(dva);
            wg_pin(dka);
        }

        // Every warpgroup's dSᵀ is written and visible to the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        // dQ[:, 64 wg..] = dS K over the 128 keys: A = dS (M-major: the dSᵀ tile), B = K's column half wg (N-major).
        wg_pin32(dqa);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            wgmma_ss_n64<1, 1>(dqa, wg_descriptor(dss + kk * 2048, WGB_DS_BYTES, 1024),
                               wg_descriptor(ks + wg * (WG_TILE_BYTES / 2) + kk * 2048, WG_TILE_BYTES / 2, 1024), kk > 0);
        wg_commit_and_wait();
        wg_pin32(dqa);
        if constexpr (PIPELINED) {
            wg_pin(dva);
            wg_pin(dka);
            // Fragment value 4 nn + 2 i + c: query row 16 warp + g + 8 i, column 64 wg + 8 nn + 2 t + c.
            unsigned char* rows = dq_stage + stage * WGBP_DQ_BYTES;
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int nn = 0; nn < 8; nn++)
                    *reinterpret_cast<float2*>(rows + (16 * warp + g + 8 * i) * WGBP_DQ_STRIDE + (64 * wg + 8 * nn + 2 * t) * 4)
                        = make_float2(dqa[4 * nn + 2 * i], dqa[4 * nn + 2 * i + 1]);
        } else {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int query = i0 + 16 * warp + g + 8 * i;
                if (query >= seq) continue;
                float* row = dq_accum + ((t0 + query) * heads + h) * 128 + 64 * wg + 2 * t;
#pragma unroll
                for (int nn = 0; nn < 8; nn++)
                    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(row + 8 * nn), "f"(dqa[4 * nn + 2 * i]),
                                 "f"(dqa[4 * nn + 2 * i + 1]) : "memory");
            }
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    if constexpr (PIPELINED) {
        // The last tile's dQ rows, then every bulk reduction complete before the block's shared memory goes.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        if (tiles > 0) reduce_dq(tiles - 1);
        if (threadIdx.x < WGB_QUERIES) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
    // dk = scale·dK, dv = dV: fragment value 4 n + 2 i + c is key keys[i], column 8 n + 2 t + c.
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (keys[i] >= seq) continue;
        h16* outk = dk + ((t0 + keys[i]) * kv_heads + hk) * 128;
        h16* outv = dv + ((t0 + keys[i]) * kv_heads + hk) * 128;
#pragma unroll
        for (int nn = 0; nn < 16; nn++) {
            *reinterpret_cast<unsigned*>(outk + nn * 8 + 2 * t) = wg_pack(dka[4 * nn + 2 * i] * scale, dka[4 * nn + 2 * i + 1] * scale);
            *reinterpret_cast<unsigned*>(outv + nn * 8 + 2 * t) = wg_pack(dva[4 * nn + 2 * i], dva[4 * nn + 2 * i + 1]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
attention_wgmma_backward_d128(const h16* q, const h16* k, const h16* v, const h16* dout, const float* lse,
                              const float* delta, const int* segments, float* dq_accum, h16* dk, h16* dv, int seq,
                              int heads, int kv_heads, float scale, float softcap, int window) {
    (void)softcap;  // soft-capped calls take the mma.sync kernels
    wgb_backward<false>(q, k, v, dout, lse, delta, segments, dq_accum, dk, dv, seq, heads, kv_heads, scale, window);
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
attention_wgmma_backward_pipelined_d128(const h16* q, const h16* k, const h16* v, const h16* dout, const float* lse,
                                        const float* delta, const int* segments, float* dq_accum, h16* dk, h16* dv,
                                        int seq, int heads, int kv_heads, float scale, float softcap, int window) {
    (void)softcap;  // soft-capped calls take the mma.sync kernels
    wgb_backward<true>(q, k, v, dout, lse, delta, segments, dq_accum, dk, dv, seq, heads, kv_heads, scale, window);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
