// attention_mma.cu: the same causal GQA attention as attention.cu (shapes, masking, formulas: see there), on the
// tensor cores: `mma.sync.aligned.m16n8k16` on h16 (bf16, or fp16 with QLORA_HALF) with fp32 accumulation,
// flash-attention-2 style. On Turing (sm_75, fp16 only) each m16n8k16 is two m16n8k8 and cp.async a plain copy.
//
// Fragments of m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 g + t:
//   A (16x16, row-major):  a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   B (16x8, "col"):       b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   C (16x8, fp32):        c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// (each 32-bit register holds two bf16, the lower index in the low half). The C fragments of two adjacent n-tiles
// are exactly the A fragment of one k-step, so softmax probabilities go from one product into the next in
// registers. B operands come from shared memory through ldmatrix (.trans where the pairs run across rows); A
// operands (Q, dO, K, V rows) are loaded once from global memory as 32-bit words. Tiles are copied to shared memory with cp.async so the
// next tile's loads overlap this tile's products (see each kernel's pipeline comment). Shared rows are padded by 8 values (16 bytes) so the
// 8 rows a fragment reads fall in different banks.
//
// Variations (formulas in attention.cu's header): any logit scale; soft-capping in the `_cap_d<D>` kernels (tanh
// after the product, its slope 1 − tanh² on dS; the uncapped kernels have no tanh); a sliding window, whose key tiles
// (forward) or query tiles (backward) wholly outside it are skipped. Head dims 32, 64, 96, 128 and 256 everywhere (the
// 64-row kernels at 256: key tiles of 32, dk/dv query tiles of 16, so static shared memory stays under 48 KB; the
// flash kernels at 256: 8-warp forward blocks and a backward that splits the head dimension, see fa_backward_wide).
//
// The default path is the flash section further down (attention_fa_*: 128-row tiles, fused backward); the 64-row
// kernels below stay selectable (`flash: false` in CUDAAttention.swift) as a second tensor-core implementation.
// Kernels (4 warps; each warp owns 16 rows of the block's 64):
//   attention_mma_forward:   block = 64 queries of one head; loops over key tiles of 64 up to the diagonal:
//                            S = Q Kᵀ, online softmax (m, l per row), O += P V; writes O and lse.
//   attention_mma_backward_dq:   block = 64 queries: S, P = exp(scale S - lse), dP = dO Vᵀ,
//                            dS = P (dP - delta), dQ += dS K; dq = scale dQ.
//   attention_mma_backward_dkdv: block = 64 keys of one KV head; loops over the group's query heads and query
//                            tiles of 32 from the diagonal on: Sᵀ = K Qᵀ, Pᵀ, dV += Pᵀ dO, dPᵀ = V dOᵀ,
//                            dSᵀ = Pᵀ (dPᵀ - delta), dK += dSᵀ Q; dk = scale dK.
#include "qlora_prelude.cuh"
#include "attention_common.cuh"

#define MMA_THREADS 128

#if !QLORA_HALF && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "bf16 tensor-core mma needs sm_80 or newer; Turing (sm_75) runs the fp16 path (-DQLORA_HALF=1, --compute-dtype fp16)"
#endif

// One m16n8k16 product (the prelude's mma_16816_h16: bf16 or fp16, two m16n8k8 on Turing).
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) { mma_16816_h16(c, a, b0, b1); }

__device__ __forceinline__ unsigned ld32(const h16* p) { return *reinterpret_cast<const unsigned*>(p); }
__device__ __forceinline__ unsigned pack2(h16 lo, h16 hi) { return (unsigned)lo | ((unsigned)hi << 16); }
__device__ __forceinline__ unsigned pack_f2(float lo, float hi) { return pack2(float_to_h16(lo), float_to_h16(hi)); }

/// The logit of a raw product q·k: scale·q·k, or with soft-capping (CAP, Gemma 2) cap·tanh(scale·q·k / cap).
template <bool CAP>
__device__ __forceinline__ float attention_logit(float raw, float scale, float cap) {
    return CAP ? cap * tanhf(raw * (scale / cap)) : raw * scale;
}

/// p = exp(logit − lse) of a raw product and the slope d logit / d(scale·q·k) (1 − tanh² with a cap, else 1).
template <bool CAP>
__device__ __forceinline__ float attention_probability(float raw, float scale, float cap, float lse, float* slope) {
    if (CAP) {
        const float th = tanhf(raw * (scale / cap));
        *slope = 1.0f - th * th;
        return __expf(cap * th - lse);
    }
    *slope = 1.0f;
    return __expf(raw * scale - lse);
}

/// A fragments of a warp's 16 rows x D from global memory rows r0 (= row g) and r0 + 8 (zeros where invalid).
template <int D>
__device__ __forceinline__ void load_a_rows(unsigned (*a)[4], const h16* row0, const h16* row1, int t) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        a[kk][0] = row0 ? ld32(row0 + kk * 16 + 2 * t) : 0u;
        a[kk][1] = row1 ? ld32(row1 + kk * 16 + 2 * t) : 0u;
        a[kk][2] = row0 ? ld32(row0 + kk * 16 + 2 * t + 8) : 0u;
        a[kk][3] = row1 ? ld32(row1 + kk * 16 + 2 * t + 8) : 0u;
    }
}

/// Copies `rows` rows of one head (row r -> token t0 + r0 + r) into shared memory with row stride LD (zeros past seq).
template <int D, int ROWS>
__device__ __forceinline__ void load_rows_shared(h16* dst, const h16* src, long long t0, int r0, int seq, int heads, int head) {
    constexpr int LD = D + 8;
    for (int idx = threadIdx.x; idx < ROWS * D / 8; idx += blockDim.x) {
        const int rr = idx / (D / 8), ch = idx % (D / 8);
        h16x8_raw v = {{0u, 0u, 0u, 0u}};
        if (r0 + rr < seq) v = *reinterpret_cast<const h16x8_raw*>(src + ((t0 + r0 + rr) * heads + head) * D + ch * 8);
        *reinterpret_cast<h16x8_raw*>(dst + rr * LD + ch * 8) = v;
    }
}

__device__ __forceinline__ unsigned shared_address(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

/// The shared-memory address of p for ldmatrix: with C, the compiler's own conversion, whose constant offsets it can
/// fold and schedule freely (fewer registers in the flash forward, more in the flash backward: each picks its own).
template <bool C>
__device__ __forceinline__ unsigned ldsm_address(const void* p) {
    return C ? (unsigned)__cvta_generic_to_shared(p) : shared_address(p);
}

/// As load_rows_shared, with cp.async (16 bytes per copy, zero-filled past seq): the copies run in the background
/// until `cp_async_wait`. Every thread calls `cp_async_commit` after issuing a group (also an empty one).
template <int D, int ROWS>
__device__ __forceinline__ void async_rows_shared(h16* dst, const h16* src, long long t0, int r0, int seq, int heads, int head) {
    constexpr int LD = D + 8;
    for (int idx = threadIdx.x; idx < ROWS * D / 8; idx += blockDim.x) {
        const int rr = idx / (D / 8), ch = idx % (D / 8);
        const bool valid = r0 + rr < seq;
        const h16* from = valid ? src + ((t0 + r0 + rr) * heads + head) * D + ch * 8 : src;
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst + rr * LD + ch * 8)), "l"(from),
                     "r"(valid ? 16 : 0) : "memory");
#else
        // Turing has no cp.async (sm_80): a plain 16-byte load and store. The pipelines stay correct, since an
        // asynchronous copy may land at any time before its wait, so no stage reads a buffer still being filled.
        h16x8_raw v = {{0u, 0u, 0u, 0u}};
        if (valid) v = *reinterpret_cast<const h16x8_raw*>(from);
        *reinterpret_cast<h16x8_raw*>(dst + rr * LD + ch * 8) = v;
#endif
    }
}

__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

/// Waits until at most N of this thread's committed groups are still in flight (Turing: the copies were synchronous).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of 8x8 matrix j; register j of lane (g, t) receives
// M_j[g][2t..2t+1], or with .trans M_j[2t..2t+1][g]. The memory clobber keeps them between the barriers.
template <bool C = false>
__device__ __forceinline__ void ldsm_x4(unsigned* r, const h16* p) {
    asm("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(ldsm_address<C>(p)) : "memory");
}

template <bool C = false>
__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, const h16* p) {
    asm("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(ldsm_address<C>(p)) : "memory");
}

/// B fragments of an operand stored [n][k] in shared memory (pairs along k contiguous), n-tile n0, for the two
/// k-steps k0 and k0 + 16: r[0..1] and r[2..3].
template <bool C = false>
__device__ __forceinline__ void b_frags_nk(unsigned* r, const h16* s, int ld, int k0, int n0, int lane) {
    ldsm_x4<C>(r, s + (n0 + (lane & 7)) * ld + k0 + (lane >> 3) * 8);
}

/// B fragments of an operand stored [k][n] in shared memory (pairs along k in different rows: transposed load),
/// k-step k0, for the two n-tiles n0 and n0 + 8: r[0..1] and r[2..3].
template <bool C = false>
__device__ __forceinline__ void b_frags_kn(unsigned* r, const h16* s, int ld, int k0, int n0, int lane) {
    ldsm_x4_trans<C>(r, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// MARK: - Forward

/// The A fragment (16 × 16, bf16) of k-step kk from two 16x8 fp32 accumulator tiles (P, Pᵀ or dSᵀ).
__device__ __forceinline__ void pack_a_frag(unsigned* a, const float (*tiles)[4], int kk) {
    a[0] = pack_f2(tiles[2 * kk][0], tiles[2 * kk][1]);
    a[1] = pack_f2(tiles[2 * kk][2], tiles[2 * kk][3]);
    a[2] = pack_f2(tiles[2 * kk + 1][0], tiles[2 * kk + 1][1]);
    a[3] = pack_f2(tiles[2 * kk + 1][2], tiles[2 * kk + 1][3]);
}

/// acc (16 rows × D) += A (the 16 × 16 fragment of k-step kk) · rows kk·16 ... of `src` (shared memory, row stride ld).
template <int D>
__device__ __forceinline__ void mma_a_rows(float (*acc)[4], const unsigned* a, const h16* src, int ld, int kk, int lane) {
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
        unsigned r[4];
        b_frags_kn(r, src, ld, kk * 16, dt * 8, lane);
        mma16816(acc[dt], a, r[0], r[1]);
        mma16816(acc[dt + 1], a, r[2], r[3]);
    }
}

/// dV += Pᵀ dO and dK += dSᵀ Q for k-step kk (the two products interleaved, as mma_a_rows twice would not be): `dos` and `qs` hold the tile's dO and Q rows (row stride ld) in shared memory.
template <int D>
__device__ __forceinline__ void accumulate_dkv(float (*dka)[4], float (*dva)[4], const unsigned* pa, const unsigned* sa,
                                               const h16* dos, const h16* qs, int ld, int kk, int lane) {
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
        unsigned r[4];
        b_frags_kn(r, dos, ld, kk * 16, dt * 8, lane);
        mma16816(dva[dt], pa, r[0], r[1]);
        mma16816(dva[dt + 1], pa, r[2], r[3]);
        b_frags_kn(r, qs, ld, kk * 16, dt * 8, lane);
        mma16816(dka[dt], sa, r[0], r[1]);
        mma16816(dka[dt + 1], sa, r[2], r[3]);
    }
}

/// The start of a backward block over 16 keys per warp: each lane's two keys' segment ids (0 without segments or past
/// the end) and its dK, dV accumulator fragments zeroed.
template <int D>
__device__ __forceinline__ void begin_key_rows(int* segk, float (*dka)[4], float (*dva)[4], const int* segments, long long t0,
                                               const int* keys, int seq) {
#pragma unroll
    for (int i = 0; i < 2; i++) segk[i] = (segments && keys[i] < seq) ? segments[t0 + keys[i]] : 0;
#pragma unroll
    for (int x = 0; x < D / 8; x++) {
        dka[x][0] = dka[x][1] = dka[x][2] = dka[x][3] = 0.0f;
        dva[x][0] = dva[x][1] = dva[x][2] = dva[x][3] = 0.0f;
    }
}

template <int D, bool CAP>
__device__ __forceinline__ void mma_forward(const h16* q, const h16* k, const h16* v, h16* o, float* lse,
                                            const int* segments, int seq, int heads, int kv_heads, float scale,
                                            float softcap, int window) {
    constexpr int LD = D + 8, BK = D > 128 ? 32 : 64;  // D = 256: key tiles of 32 keep K and V under 48 KB
    __shared__ alignas(16) h16 ks[BK * LD];
    __shared__ alignas(16) h16 vs[BK * LD];
    __shared__ int segk[BK];
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * 64;  // longest rows first
    const int hk = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long t0 = (long long)b * seq;
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    unsigned qa[D / 16][4];
    load_a_rows<D>(qa, rows[0] < seq ? q + ((t0 + rows[0]) * heads + h) * D : nullptr,
                   rows[1] < seq ? q + ((t0 + rows[1]) * heads + h) * D : nullptr, t);
    int segq[2];
#pragma unroll
    for (int i = 0; i < 2; i++) segq[i] = (segments && rows[i] < seq) ? segments[t0 + rows[i]] : 0;
    float oacc[D / 8][4];
#pragma unroll
    for (int x = 0; x < D / 8; x++) oacc[x][0] = oacc[x][1] = oacc[x][2] = oacc[x][3] = 0.0f;
    float m[2] = {-QLORA_INFINITY, -QLORA_INFINITY}, l[2] = {0.0f, 0.0f};

    // Pipeline (one buffer each): K(j+1) loads while softmax and P·V of tile j run, V(j+1) while S of tile j+1 runs.
    // Groups in flight at each wait, oldest first: [K(j), V(j)] -> wait<1> gives K(j); [V(j), K(j+1)] -> V(j).
    // Keys before the first row's window are never loaded.
    const int key_begin = max(0, q0 - window + 1) / BK * BK, key_end = min(seq, q0 + 64);
    async_rows_shared<D, BK>(ks, k, t0, key_begin, seq, kv_heads, hk);
    cp_async_commit();
    async_rows_shared<D, BK>(vs, v, t0, key_begin, seq, kv_heads, hk);
    cp_async_commit();
    for (int j0 = key_begin; j0 < key_end; j0 += BK) {
        cp_async_wait<1>();
        if (threadIdx.x < BK) segk[threadIdx.x] = (segments && j0 + threadIdx.x < seq) ? segments[t0 + j0 + threadIdx.x] : 0;
        __syncthreads();
        float s[BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned r[4];
                b_frags_nk(r, ks, LD, kk * 16, nt * 8, lane);
                mma16816(s[nt], qa[kk], r[0], r[1]);
                mma16816(s[nt], qa[kk + 1], r[2], r[3]);
            }
        }
        __syncthreads();  // every warp is done with ks
        if (j0 + BK < key_end) async_rows_shared<D, BK>(ks, k, t0, j0 + BK, seq, kv_heads, hk);
        cp_async_commit();
        float mx[2] = {-QLORA_INFINITY, -QLORA_INFINITY};
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = e >> 1, col = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = rows[i] < seq && col <= rows[i] && col > rows[i] - window && segk[col - j0] == segq[i];
                s[nt][e] = ok ? attention_logit<CAP>(s[nt][e], scale, softcap) : -QLORA_INFINITY;
                mx[i] = fmaxf(mx[i], s[nt][e]);
            }
        }
        float msub[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            const float m_new = fmaxf(m[i], mx[i]);
            const float alpha = m_new == -QLORA_INFINITY ? 1.0f : __expf(m[i] - m_new);
            msub[i] = m_new == -QLORA_INFINITY ? 0.0f : m_new;
            l[i] *= alpha;
#pragma unroll
            for (int x = 0; x < D / 8; x++) { oacc[x][2 * i] *= alpha; oacc[x][2 * i + 1] *= alpha; }
            m[i] = m_new;
        }
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = __expf(s[nt][e] - msub[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }
        cp_async_wait<1>();
        __syncthreads();  // V(j) has landed for every thread's copies
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned pa[4];
            pack_a_frag(pa, s, kk);
            mma_a_rows<D>(oacc, pa, vs, LD, kk, lane);
        }
        __syncthreads();  // every warp is done with vs
        if (j0 + BK < key_end) async_rows_shared<D, BK>(vs, v, t0, j0 + BK, seq, kv_heads, hk);
        cp_async_commit();
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        if (rows[i] >= seq) continue;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        h16* out = o + ((t0 + rows[i]) * heads + h) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<unsigned*>(out + dt * 8 + 2 * t) = pack_f2(oacc[dt][2 * i] * inv, oacc[dt][2 * i + 1] * inv);
        if (t == 0) lse[(t0 + rows[i]) * heads + h] = m[i] + logf(l[i]);
    }
}

// MARK: - Backward: dq

template <int D, bool CAP>
__device__ __forceinline__ void mma_backward_dq(const h16* q, const h16* k, const h16* v, const h16* dout, const float* lse,
                                                const float* delta, const int* segments, h16* dq, int seq, int heads,
                                                int kv_heads, float scale, float softcap, int window) {
    constexpr int LD = D + 8, BK = D > 128 ? 32 : 64;
    __shared__ alignas(16) h16 ks[BK * LD];
    __shared__ alignas(16) h16 vs[BK * LD];
    __shared__ int segk[BK];
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * 64;  // longest rows first
    const int hk = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long t0 = (long long)b * seq;
    int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    unsigned qa[D / 16][4], da[D / 16][4];
    const h16* r0 = rows[0] < seq ? q + ((t0 + rows[0]) * heads + h) * D : nullptr;
    const h16* r1 = rows[1] < seq ? q + ((t0 + rows[1]) * heads + h) * D : nullptr;
    load_a_rows<D>(qa, r0, r1, t);
    load_a_rows<D>(da, r0 ? dout + (r0 - q) : nullptr, r1 ? dout + (r1 - q) : nullptr, t);
    int segq[2];
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const bool valid = rows[i] < seq;
        segq[i] = (segments && valid) ? segments[t0 + rows[i]] : 0;
        row_lse[i] = valid ? lse[(t0 + rows[i]) * heads + h] : 0.0f;
        row_delta[i] = valid ? delta[(t0 + rows[i]) * heads + h] : 0.0f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int x = 0; x < D / 8; x++) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.0f;

    // Pipeline (one buffer each): dP = dO Vᵀ first, then V(j+1) loads while S, dS and dQ of tile j run; K(j+1)
    // loads while dP of tile j+1 runs. In flight at each wait, oldest first: [V(j), K(j)] -> wait<1> gives V(j);
    // [K(j), V(j+1)] -> wait<1> gives K(j).
    const int key_begin = max(0, q0 - window + 1) / BK * BK, key_end = min(seq, q0 + 64);
    async_rows_shared<D, BK>(vs, v, t0, key_begin, seq, kv_heads, hk);
    cp_async_commit();
    async_rows_shared<D, BK>(ks, k, t0, key_begin, seq, kv_heads, hk);
    cp_async_commit();
    for (int j0 = key_begin; j0 < key_end; j0 += BK) {
        cp_async_wait<1>();
        if (threadIdx.x < BK) segk[threadIdx.x] = (segments && j0 + threadIdx.x < seq) ? segments[t0 + j0 + threadIdx.x] : 0;
        __syncthreads();
        float s[BK / 8][4], dp[BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
            dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned r[4];
                b_frags_nk(r, vs, LD, kk * 16, nt * 8, lane);
                mma16816(dp[nt], da[kk], r[0], r[1]);
                mma16816(dp[nt], da[kk + 1], r[2], r[3]);
            }
        }
        __syncthreads();  // every warp is done with vs
        if (j0 + BK < key_end) async_rows_shared<D, BK>(vs, v, t0, j0 + BK, seq, kv_heads, hk);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // K(j) has landed
#pragma unroll
        for (int nt = 0; nt < BK / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned r[4];
                b_frags_nk(r, ks, LD, kk * 16, nt * 8, lane);
                mma16816(s[nt], qa[kk], r[0], r[1]);
                mma16816(s[nt], qa[kk + 1], r[2], r[3]);
            }
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = e >> 1, col = j0 + nt * 8 + 2 * t + (e & 1);
                const bool ok = rows[i] < seq && col <= rows[i] && col > rows[i] - window && segk[col - j0] == segq[i];
                float slope = 1.0f;
                const float p = ok ? attention_probability<CAP>(s[nt][e], scale, softcap, row_lse[i], &slope) : 0.0f;
                s[nt][e] = p * (dp[nt][e] - row_delta[i]);  // dS
                if (CAP) s[nt][e] *= slope;                 // through the cap
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned pa[4];
            pack_a_frag(pa, s, kk);
            mma_a_rows<D>(acc, pa, ks, LD, kk, lane);
        }
        __syncthreads();  // every warp is done with ks
        if (j0 + BK < key_end) async_rows_shared<D, BK>(ks, k, t0, j0 + BK, seq, kv_heads, hk);
        cp_async_commit();
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (rows[i] >= seq) continue;
        h16* out = dq + ((t0 + rows[i]) * heads + h) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<unsigned*>(out + dt * 8 + 2 * t) = pack_f2(acc[dt][2 * i] * scale, acc[dt][2 * i + 1] * scale);
    }
}

// MARK: - Backward: dk, dv

template <int D, bool CAP>
__device__ __forceinline__ void mma_backward_dkdv(const h16* q, const h16* k, const h16* v, const h16* dout,
                                                  const float* lse, const float* delta, const int* segments, h16* dk,
                                                  h16* dv, int seq, int heads, int kv_heads, float scale, float softcap,
                                                  int window) {
    constexpr int LD = D + 8, BQ = D > 128 ? 16 : 32;  // D = 256: query tiles of 16 keep the buffers under 48 KB
    __shared__ alignas(16) h16 qs_buffers[2][BQ * LD];
    __shared__ alignas(16) h16 dos_buffers[2][BQ * LD];
    __shared__ float lse_buffers[2][BQ], delta_buffers[2][BQ];
    __shared__ int segq_buffers[2][BQ];
    const int b = blockIdx.z, hk = blockIdx.y, k0 = blockIdx.x * 64;
    const int group = heads / kv_heads;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long t0 = (long long)b * seq;
    int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    unsigned ka[D / 16][4], va[D / 16][4];
    const h16* r0 = keys[0] < seq ? k + ((t0 + keys[0]) * kv_heads + hk) * D : nullptr;
    const h16* r1 = keys[1] < seq ? k + ((t0 + keys[1]) * kv_heads + hk) * D : nullptr;
    load_a_rows<D>(ka, r0, r1, t);
    load_a_rows<D>(va, r0 ? v + (r0 - k) : nullptr, r1 ? v + (r1 - k) : nullptr, t);
    int segk[2];
    float dka[D / 8][4], dva[D / 8][4];
    begin_key_rows<D>(segk, dka, dva, segments, t0, keys, seq);
    // Tiles (query head of the group, BQ queries from the diagonal on, up to the last query whose window reaches the
    // block's last key), double-buffered: tile n+1 loads (cp.async) while tile n is computed.
    const int query_end = min(seq, k0 + 64 + window - 1);
    const int tiles_per_head = (query_end - k0 + BQ - 1) / BQ, tiles = group * tiles_per_head;
    auto issue = [&](int n, int stage) {
        const int h = hk * group + n / tiles_per_head, i0 = k0 + (n % tiles_per_head) * BQ;
        async_rows_shared<D, BQ>(qs_buffers[stage], q, t0, i0, seq, heads, h);
        async_rows_shared<D, BQ>(dos_buffers[stage], dout, t0, i0, seq, heads, h);
        if (threadIdx.x < BQ) {
            const int i = i0 + threadIdx.x;
            const bool valid = i < seq;
            lse_buffers[stage][threadIdx.x] = valid ? lse[(t0 + i) * heads + h] : 0.0f;
            delta_buffers[stage][threadIdx.x] = valid ? delta[(t0 + i) * heads + h] : 0.0f;
            segq_buffers[stage][threadIdx.x] = (segments && valid) ? segments[t0 + i] : 0;
        }
    };
    if (tiles > 0) issue(0, 0);
    cp_async_commit();
    for (int n = 0; n < tiles; n++) {
        const int stage = n & 1;
        if (n + 1 < tiles) issue(n + 1, stage ^ 1);  // its buffers were last read in tile n - 1
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();  // tile n has landed
        const int i0 = k0 + (n % tiles_per_head) * BQ;
        const h16* qs = qs_buffers[stage];
        const h16* dos = dos_buffers[stage];
        const float* lse_s = lse_buffers[stage];
        const float* delta_s = delta_buffers[stage];
        const int* segq_s = segq_buffers[stage];
        {
            float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
            for (int nt = 0; nt < BQ / 8; nt++) {
                st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
                dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk += 2) {
                    unsigned r[4];
                    b_frags_nk(r, qs, LD, kk * 16, nt * 8, lane);
                    mma16816(st[nt], ka[kk], r[0], r[1]);
                    mma16816(st[nt], ka[kk + 1], r[2], r[3]);
                    b_frags_nk(r, dos, LD, kk * 16, nt * 8, lane);
                    mma16816(dpt[nt], va[kk], r[0], r[1]);
                    mma16816(dpt[nt], va[kk + 1], r[2], r[3]);
                }
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = e >> 1, cq = nt * 8 + 2 * t + (e & 1), query = i0 + cq;
                    const bool ok = keys[i] < seq && query < seq && keys[i] <= query && keys[i] > query - window
                                    && segq_s[cq] == segk[i];
                    float slope = 1.0f;
                    const float p = ok ? attention_probability<CAP>(st[nt][e], scale, softcap, lse_s[cq], &slope) : 0.0f;
                    st[nt][e] = p;                              // Pᵀ
                    dpt[nt][e] = p * (dpt[nt][e] - delta_s[cq]);  // dSᵀ
                    if (CAP) dpt[nt][e] *= slope;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BQ / 16; kk++) {
                unsigned pa[4], sa[4];
                pack_a_frag(pa, st, kk);
                pack_a_frag(sa, dpt, kk);
                accumulate_dkv<D>(dka, dva, pa, sa, dos, qs, LD, kk, lane);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (keys[i] >= seq) continue;
        h16* outk = dk + ((t0 + keys[i]) * kv_heads + hk) * D;
        h16* outv = dv + ((t0 + keys[i]) * kv_heads + hk) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<unsigned*>(outk + dt * 8 + 2 * t) = pack_f2(dka[dt][2 * i] * scale, dka[dt][2 * i + 1] * scale);
            *reinterpret_cast<unsigned*>(outv + dt * 8 + 2 * t) = pack_f2(dva[dt][2 * i], dva[dt][2 * i + 1]);
        }
    }
}

// MARK: - Flash kernels: 128-row tiles, 8 warps, fused backward
//
// The default path (the kernels above stay as a second tensor-core implementation to check against):
//   attention_fa_forward:  block = 128 queries of one head (4 warps x 32 rows: two m-tiles share each K/V fragment
//                          read from shared memory; Q stays in shared memory), two blocks per SM; key tiles of 64
//                          (at D = 256: 8 warps x 16 rows, one block per SM, key tiles of 32),
//                          K and V double-buffered with cp.async (tile j+1 loads while tile j is computed).
//                          Scores go to base 2 (scale·log2 e folded into one multiply, ex2.approx); the causal and
//                          segment masks are only evaluated on tiles that cross a warp's diagonal or when segments
//                          are given, and a warp skips key tiles entirely above its rows.
//   attention_fa_prep:     delta = rowsum(dO ∘ O) and zeroes the fp32 dQ accumulator.
//   attention_fa_backward: (D = 256: fa_backward_wide, further down)
//                          block = 128 keys of one KV head (8 warps x 16 keys); loops over the group's query heads
//                          and query tiles of 64 from the diagonal on (Q, dO, lse, delta double-buffered):
//                          Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e), dSᵀ = Pᵀ ∘ (dPᵀ − delta),
//                          dV += Pᵀ dO, dK += dSᵀ Q in registers; dSᵀ goes to shared memory and the block adds
//                          dQ += dS K to the fp32 accumulator with vector reductions (red.global.add.v2.f32).
//   attention_fa_dq:       dq = bf16(scale · accumulator).
// Blocks are ordered heaviest first (the causal triangle): the forward's last query tiles and the backward's first
// key tiles start in the first wave.

#define FA_THREADS 256

extern __shared__ __align__(16) unsigned char fa_shared[];

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/// A fragment (16 rows x 16 k) of a row-major [m][k] operand in shared memory: rows m0.., columns k0...
template <bool C = false>
__device__ __forceinline__ void a_frag_mk(unsigned* r, const h16* s, int ld, int m0, int k0, int lane) {
    ldsm_x4<C>(r, s + (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

/// A fragment of an operand stored transposed, [k][m], in shared memory (ldmatrix .trans).
template <bool C = false>
__device__ __forceinline__ void a_frag_km(unsigned* r, const h16* s, int ld, int m0, int k0, int lane) {
    ldsm_x4_trans<C>(r, s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8);
}

/// B fragments of an operand stored [n][k] in shared memory, k-step k0, for the two n-tiles n0 and n0 + 8:
/// r[0..1] and r[2..3].
template <bool C = false>
__device__ __forceinline__ void b_frags_nk_pair(unsigned* r, const h16* s, int ld, int k0, int n0, int lane) {
    ldsm_x4<C>(r, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

/// p[0] += a, p[1] += b in global memory, with no result returned. Hopper has a vector reduction for the pair
/// (one instruction, one L2 transaction); earlier cards (ptxas: "red instruction with vector types requires sm_90")
/// take two scalar reductions, the same sums.
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(a) : "memory");
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p + 1), "f"(b) : "memory");
#endif
}

/// dQ of one warp's 16 queries (rows mq.. of the block's dS, stored [query][key] at `ds` with stride lds) and NT
/// n-tiles of 8 columns from c0: dQ += dS (16 x BN keys) K (`ks`, [key][D] with stride ld), summed into the fp32
/// dq_accum rows of the block's queries i0.. (those below seq) by vector reductions, as the flash backward kernels do.
template <int NT, int BN>
__device__ __forceinline__ void add_dq_rows(float* dq_accum, const h16* ds, int lds, const h16* ks, int ld, int mq, int c0,
                                            int i0, int seq, long long t0, int heads, int h, int D, int lane) {
    const int g = lane >> 2, t = lane & 3;
    float acc[NT][4];
#pragma unroll
    for (int x = 0; x < NT; x++) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        unsigned a[4];
        a_frag_km(a, ds, lds, mq, kk * 16, lane);
#pragma unroll
        for (int dt = 0; dt < NT; dt += 2) {
            unsigned r[4];
            b_frags_kn(r, ks, ld, kk * 16, c0 + dt * 8, lane);
            mma16816(acc[dt], a, r[0], r[1]);
            mma16816(acc[dt + 1], a, r[2], r[3]);
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int query = i0 + mq + g + 8 * i;
        if (query >= seq) continue;
        float* row = dq_accum + ((t0 + query) * heads + h) * D + c0 + 2 * t;
#pragma unroll
        for (int dt = 0; dt < NT; dt++) red_add_v2(row + dt * 8, acc[dt][2 * i], acc[dt][2 * i + 1]);
    }
}

/// Starts loading query tile n of a flash backward block into `stage`: tile n is query head h0 + n / tiles_per_head
/// (h0 = the block's KV head x group), queries i0 = k0 + (n mod tiles_per_head)·BQ..; Q and dO rows by cp.async, lse
/// (times log2 e), delta and the query segments by plain stores (zeros past seq). Both backward kernels use it.
template <int D, int BQ>
__device__ __forceinline__ void fa_issue_query_tile(h16* qs, h16* dos, float* lse_s, float* delta_s, int* segq_s,
                                                    const h16* q, const h16* dout, const float* lse, const float* delta,
                                                    const int* segments, int n, int stage, int tiles_per_head, int h0,
                                                    int k0, long long t0, int seq, int heads) {
    constexpr int QT = BQ * (D + 8);
    const int h = h0 + n / tiles_per_head, i0 = k0 + (n % tiles_per_head) * BQ;
    async_rows_shared<D, BQ>(qs + stage * QT, q, t0, i0, seq, heads, h);
    async_rows_shared<D, BQ>(dos + stage * QT, dout, t0, i0, seq, heads, h);
    attention_stage_query_rows(lse_s + stage * BQ, delta_s + stage * BQ, segq_s + stage * BQ, lse, delta, segments, BQ, i0,
                               h, t0, seq, heads);
}

/// What a flash backward block derives from its index: KV head hk of batch row b (token offset t0), keys k0..k0 + BN
/// (the first key blocks, which see the most queries, start first), a warp's 16 key rows from k0 + 16 kw, and the
/// query tiles of BQ it visits: per head of the group, from the diagonal to the last query whose window reaches the
/// block's last key.
struct FaBackwardBlock {
    int hk, group, k0, tiles_per_head, tiles, warp_first, warp_last;
    int keys[2];
    long long t0;
};

/// The start both flash backward kernels share: the block's indices (FaBackwardBlock) and the cp.async loads of its
/// K and V rows and of query tile 0 into stage 0, committed as one group.
template <int D, int BN, int BQ>
__device__ __forceinline__ FaBackwardBlock fa_backward_begin(h16* ks, h16* vs, h16* qs, h16* dos, float* lse_s,
                                                             float* delta_s, int* segq_s, const h16* q, const h16* k,
                                                             const h16* v, const h16* dout, const float* lse,
                                                             const float* delta, const int* segments, int kw, int g,
                                                             int seq, int heads, int kv_heads, int window) {
    FaBackwardBlock blk;
    blk.hk = blockIdx.x % kv_heads;
    blk.group = heads / kv_heads;
    blk.k0 = blockIdx.y * BN;
    blk.t0 = (long long)(blockIdx.x / kv_heads) * seq;
    blk.warp_first = blk.k0 + kw * 16;
    blk.warp_last = blk.warp_first + 15;
    blk.keys[0] = blk.warp_first + g;
    blk.keys[1] = blk.warp_first + g + 8;
    const int query_end = min(seq, blk.k0 + BN + window - 1);
    blk.tiles_per_head = (query_end - blk.k0 + BQ - 1) / BQ;
    blk.tiles = blk.group * blk.tiles_per_head;
    async_rows_shared<D, BN>(ks, k, blk.t0, blk.k0, seq, kv_heads, blk.hk);
    async_rows_shared<D, BN>(vs, v, blk.t0, blk.k0, seq, kv_heads, blk.hk);
    if (blk.tiles > 0)
        fa_issue_query_tile<D, BQ>(qs, dos, lse_s, delta_s, segq_s, q, dout, lse, delta, segments, 0, 0, blk.tiles_per_head,
                                   blk.hk * blk.group, blk.k0, blk.t0, seq, heads);
    cp_async_commit();
    return blk;
}

/// The forward's shape by head dimension: up to 128, 4 warps of two m-tiles (32 rows) and key tiles of 64; at 256
/// (Gemma 2/3) the output accumulator of two m-tiles (2 x 128 registers) would spill, so 8 warps of one m-tile
/// (16 rows: 128 accumulator registers) share the block's 128 rows, and key tiles of 32 keep the double-buffered
/// K and V beside Q within an A100's 163 KB.
template <int D> constexpr int fa_forward_mtiles() { return D > 128 ? 1 : 2; }
template <int D> constexpr int fa_forward_keys() { return D > 128 ? 32 : 64; }
#define FA_FORWARD_THREADS(D) ((D) > 128 ? 256 : 128)
#define FA_FORWARD_MIN_BLOCKS(D) ((D) > 128 ? 1 : 2)

/// Dynamic shared memory of attention_fa_forward for head dimension D (the launcher computes the same):
/// Q (128 rows), K and V (2 stages x BK rows), key segments (2 x BK).
template <int D>
constexpr int fa_forward_shared() { return (128 + 4 * fa_forward_keys<D>()) * (D + 8) * 2 + 2 * fa_forward_keys<D>() * 4; }

template <int D, bool CAP>
__device__ __forceinline__ void fa_forward(const h16* q, const h16* k, const h16* v, h16* o, float* lse,
                                           const int* segments, int seq, int heads, int kv_heads, float scale,
                                           float softcap, int window) {
    constexpr int LD = D + 8, BM = 128, BK = fa_forward_keys<D>(), TILE = BK * LD;
    constexpr int MI = fa_forward_mtiles<D>(), WR = 16 * MI;  // m-tiles and rows per warp
    h16* qs = reinterpret_cast<h16*>(fa_shared);  // [BM * LD]
    h16* ks = qs + BM * LD;                        // [2][TILE]
    h16* vs = ks + 2 * TILE;                       // [2][TILE]
    int* segk = reinterpret_cast<int*>(vs + 2 * TILE);  // [2][BK]
    const int h = blockIdx.x, b = blockIdx.y, q0 = (gridDim.z - 1 - blockIdx.z) * BM;  // longest rows first
    const int hk = h / (heads / kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long t0 = (long long)b * seq;
    // Warp w owns rows WR w.. of the block as MI m-tiles; thread rows[mi][i] = WR w + 16 mi + g + 8 i.
    int rows[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++) { rows[mi][0] = q0 + warp * WR + mi * 16 + g; rows[mi][1] = rows[mi][0] + 8; }
    const int warp_first = q0 + warp * WR, warp_last = warp_first + WR - 1;
    int segq[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int i = 0; i < 2; i++) segq[mi][i] = (segments && rows[mi][i] < seq) ? segments[t0 + rows[mi][i]] : 0;
    float oacc[MI][D / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int x = 0; x < D / 8; x++) oacc[mi][x][0] = oacc[mi][x][1] = oacc[mi][x][2] = oacc[mi][x][3] = 0.0f;
    float m[MI][2], l[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++) { m[mi][0] = m[mi][1] = -QLORA_INFINITY; l[mi][0] = l[mi][1] = 0.0f; }
    // Logits to base 2: scale·log2 e, or with a cap log2 e after the cap (which takes the scale).
    const float sl2 = (CAP ? 1.0f : scale) * 1.4426950408889634f, cap_scale = CAP ? scale / softcap : 0.0f;

    // Key tiles from the one holding the block's first row's first visible key (window) to the diagonal.
    const int key_end = min(seq, q0 + BM), tiles = (key_end + BK - 1) / BK, first_tile = max(0, q0 - window + 1) / BK;
    auto issue = [&](int j, int stage) {
        async_rows_shared<D, BK>(ks + stage * TILE, k, t0, j * BK, seq, kv_heads, hk);
        async_rows_shared<D, BK>(vs + stage * TILE, v, t0, j * BK, seq, kv_heads, hk);
        if (segments && threadIdx.x < BK) {
            const int key = j * BK + threadIdx.x;
            segk[stage * BK + threadIdx.x] = key < seq ? segments[t0 + key] : -1;
        }
    };
    async_rows_shared<D, BM>(qs, q, t0, q0, seq, heads, h);
    issue(first_tile, first_tile & 1);
    cp_async_commit();
    for (int j = first_tile; j < tiles; j++) {
        // Tile j has landed for every thread, and every warp is done with tile j - 1, whose stage is refilled next.
        cp_async_wait<0>();
        __syncthreads();
        if (j + 1 < tiles) issue(j + 1, (j + 1) & 1);
        cp_async_commit();
        const int j0 = j * BK;
        if (j0 > warp_last) continue;  // every key of the tile is after every row of this warp
        if (j0 + BK - 1 <= warp_first - window) continue;  // every key is before every row's window
        const h16* kt = ks + (j & 1) * TILE;
        const h16* vt = vs + (j & 1) * TILE;
        float s[MI][BK / 8][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) s[mi][nt][0] = s[mi][nt][1] = s[mi][nt][2] = s[mi][nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned qa[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) a_frag_mk<true>(qa[mi], qs, LD, warp * WR + mi * 16, kk * 16, lane);
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt += 2) {
                unsigned r[4];
                b_frags_nk_pair<true>(r, kt, LD, kk * 16, nt * 8, lane);
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    mma16816(s[mi][nt], qa[mi], r[0], r[1]);
                    mma16816(s[mi][nt + 1], qa[mi], r[2], r[3]);
                }
            }
        }
        if (CAP) {
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mi][nt][e] = softcap * tanhf(s[mi][nt][e] * cap_scale);
        }
        // The tile crosses this warp's diagonal or its window's lower edge (or segments apply).
        if (segments || j0 + BK - 1 > warp_first || j0 <= warp_last - window) {
            const int* sk = segk + (j & 1) * BK;
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int nt = 0; nt < BK / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int i = e >> 1, col = j0 + nt * 8 + 2 * t + (e & 1);
                        const bool ok = col <= rows[mi][i] && col > rows[mi][i] - window
                                        && (!segments || sk[col - j0] == segq[mi][i]);
                        if (!ok) s[mi][nt][e] = -QLORA_INFINITY;
                    }
        }
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
            float mx[2] = {-QLORA_INFINITY, -QLORA_INFINITY};
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
                mx[0] = fmaxf(mx[0], fmaxf(s[mi][nt][0], s[mi][nt][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[mi][nt][2], s[mi][nt][3]));
            }
            float msub[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
                mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
                const float m_new = fmaxf(m[mi][i], mx[i] * sl2);  // running max in base-2 units
                msub[i] = m_new == -QLORA_INFINITY ? 0.0f : m_new;
                const float alpha = fast_exp2(m[mi][i] - msub[i]);  // 0 on the first tile (m = -inf)
                l[mi][i] *= alpha;
#pragma unroll
                for (int x = 0; x < D / 8; x++) { oacc[mi][x][2 * i] *= alpha; oacc[mi][x][2 * i + 1] *= alpha; }
                m[mi][i] = m_new;
            }
#pragma unroll
            for (int nt = 0; nt < BK / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float p = fast_exp2(fmaf(s[mi][nt][e], sl2, -msub[e >> 1]));
                    s[mi][nt][e] = p;
                    l[mi][e >> 1] += p;
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned pa[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                pack_a_frag(pa[mi], s[mi], kk);
            }
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                unsigned r[4];
                b_frags_kn<true>(r, vt, LD, kk * 16, dt * 8, lane);
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    mma16816(oacc[mi][dt], pa[mi], r[0], r[1]);
                    mma16816(oacc[mi][dt + 1], pa[mi], r[2], r[3]);
                }
            }
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float sum = l[mi][i];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int row = rows[mi][i];
            if (row >= seq) continue;
            const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            h16* out = o + ((t0 + row) * heads + h) * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *reinterpret_cast<unsigned*>(out + dt * 8 + 2 * t) =
                    pack_f2(oacc[mi][dt][2 * i] * inv, oacc[mi][dt][2 * i + 1] * inv);
            if (t == 0) lse[(t0 + row) * heads + h] = m[mi][i] * 0.6931471805599453f + logf(sum);
        }
}

/// Dynamic shared memory of attention_fa_backward for head dimension D (the launcher computes the same):
/// K and V (128 rows), Q and dO (2 stages x 64 rows), dSᵀ (128 x 72), lse/delta/segments (2 stages x 64).
template <int D>
constexpr int fa_backward_shared() { return (2 * 128 + 4 * 64) * (D + 8) * 2 + 128 * 72 * 2 + 3 * 2 * 64 * 4; }

template <int D, bool CAP>
__device__ __forceinline__ void fa_backward(const h16* q, const h16* k, const h16* v, const h16* dout,
                                            const float* lse, const float* delta, const int* segments, float* dq_accum,
                                            h16* dk, h16* dv, int seq, int heads, int kv_heads, float scale,
                                            float softcap, int window) {
    constexpr int LD = D + 8, BN = 128, BQ = 64, LDS = BQ + 8, QT = BQ * LD;
    h16* ks = reinterpret_cast<h16*>(fa_shared);  // [BN * LD]
    h16* vs = ks + BN * LD;                        // [BN * LD]
    h16* qs = vs + BN * LD;                        // [2][QT]
    h16* dos = qs + 2 * QT;                        // [2][QT]
    h16* dst = dos + 2 * QT;                       // dSᵀ [BN][LDS]
    float* lse_s = reinterpret_cast<float*>(dst + BN * LDS);  // [2][BQ], times log2 e
    float* delta_s = lse_s + 2 * BQ;                           // [2][BQ]
    int* segq_s = reinterpret_cast<int*>(delta_s + 2 * BQ);    // [2][BQ]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const FaBackwardBlock blk = fa_backward_begin<D, BN, BQ>(ks, vs, qs, dos, lse_s, delta_s, segq_s, q, k, v, dout, lse,
                                                             delta, segments, warp, g, seq, heads, kv_heads, window);
    const int hk = blk.hk, group = blk.group, k0 = blk.k0, tiles_per_head = blk.tiles_per_head, tiles = blk.tiles;
    const int warp_first = blk.warp_first, warp_last = blk.warp_last, keys[2] = {blk.keys[0], blk.keys[1]};
    const long long t0 = blk.t0;
    const float sl2 = scale * 1.4426950408889634f;
    const float cap_scale = CAP ? scale / softcap : 0.0f, cap_l2 = CAP ? softcap * 1.4426950408889634f : 0.0f;
    int segk[2];
    float dka[D / 8][4], dva[D / 8][4];
    begin_key_rows<D>(segk, dka, dva, segments, t0, keys, seq);
    auto issue = [&](int n, int stage) {
        fa_issue_query_tile<D, BQ>(qs, dos, lse_s, delta_s, segq_s, q, dout, lse, delta, segments, n, stage, tiles_per_head,
                                   hk * group, k0, t0, seq, heads);
    };
    for (int n = 0; n < tiles; n++) {
        // Tile n has landed; every warp is done with tile n - 1 (its stage and dSᵀ are rewritten below).
        cp_async_wait<0>();
        __syncthreads();
        if (n + 1 < tiles) issue(n + 1, (n + 1) & 1);
        cp_async_commit();
        const int stage = n & 1;
        const int h = hk * group + n / tiles_per_head, i0 = k0 + (n % tiles_per_head) * BQ;
        const h16* qt = qs + stage * QT;
        const h16* dot = dos + stage * QT;
        const float* lse_t = lse_s + stage * BQ;
        const float* delta_t = delta_s + stage * BQ;
        float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
            st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
            dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            unsigned ka[2][4], va[2][4];
            a_frag_mk(ka[0], ks, LD, warp * 16, kk * 16, lane);
            a_frag_mk(ka[1], ks, LD, warp * 16, kk * 16 + 16, lane);
            a_frag_mk(va[0], vs, LD, warp * 16, kk * 16, lane);
            a_frag_mk(va[1], vs, LD, warp * 16, kk * 16 + 16, lane);
#pragma unroll
            for (int nt = 0; nt < BQ / 8; nt++) {
                unsigned r[4];
                b_frags_nk(r, qt, LD, kk * 16, nt * 8, lane);
                mma16816(st[nt], ka[0], r[0], r[1]);
                mma16816(st[nt], ka[1], r[2], r[3]);
                b_frags_nk(r, dot, LD, kk * 16, nt * 8, lane);
                mma16816(dpt[nt], va[0], r[0], r[1]);
                mma16816(dpt[nt], va[1], r[2], r[3]);
            }
        }
        const bool masked = segments || i0 < warp_last || i0 + BQ > seq || i0 + BQ - 1 - window >= warp_first;
        const int* segq_t = segq_s + stage * BQ;
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int cq = nt * 8 + 2 * t + (e & 1);
                float p, slope = 1.0f;
                if (CAP) {
                    const float th = tanhf(st[nt][e] * cap_scale);
                    p = fast_exp2(fmaf(th, cap_l2, -lse_t[cq]));
                    slope = 1.0f - th * th;
                } else {
                    p = fast_exp2(fmaf(st[nt][e], sl2, -lse_t[cq]));
                }
                if (masked) {
                    const int i = e >> 1, query = i0 + cq;
                    const bool ok = query < seq && keys[i] <= query && keys[i] > query - window
                                    && (!segments || segq_t[cq] == segk[i]);
                    p = ok ? p : 0.0f;
                }
                st[nt][e] = p;                              // Pᵀ
                dpt[nt][e] = p * (dpt[nt][e] - delta_t[cq]);  // dSᵀ
                if (CAP) dpt[nt][e] *= slope;               // through the cap
            }
        }
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            unsigned pa[4], sa[4];
            pack_a_frag(pa, st, kk);
            pack_a_frag(sa, dpt, kk);
            // dSᵀ rows (keys) of this warp, columns (queries) 16 kk..: the same bf16 values dK uses.
            h16* drow = dst + (warp * 16 + g) * LDS + kk * 16 + 2 * t;
            *reinterpret_cast<unsigned*>(drow) = sa[0];
            *reinterpret_cast<unsigned*>(drow + 8 * LDS) = sa[1];
            *reinterpret_cast<unsigned*>(drow + 8) = sa[2];
            *reinterpret_cast<unsigned*>(drow + 8 * LDS + 8) = sa[3];
            accumulate_dkv<D>(dka, dva, pa, sa, dot, qt, LD, kk, lane);
        }
        __syncthreads();  // dSᵀ of every warp is in shared memory
        // dQ (64 queries x D) += dS (64 x 128 keys) K: warp w takes queries 16 (w % 4).. and columns (w / 4) D/2...
        add_dq_rows<D / 16, BN>(dq_accum, dst, LDS, ks, LD, (warp & 3) * 16, (warp >> 2) * (D / 2), i0, seq, t0, heads, h, D, lane);
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (keys[i] >= seq) continue;
        h16* outk = dk + ((t0 + keys[i]) * kv_heads + hk) * D;
        h16* outv = dv + ((t0 + keys[i]) * kv_heads + hk) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<unsigned*>(outk + dt * 8 + 2 * t) = pack_f2(dka[dt][2 * i] * scale, dka[dt][2 * i + 1] * scale);
            *reinterpret_cast<unsigned*>(outv + dt * 8 + 2 * t) = pack_f2(dva[dt][2 * i], dva[dt][2 * i + 1]);
        }
    }
}

// MARK: - Flash backward for wide heads (D = 256)
//
// fa_backward keeps a warp's 16 keys' dK and dV rows in registers: 2 x D/2 = 256 registers at D = 256, which spill.
// Here the head dimension is split between warp pairs instead. Block = 64 keys of one KV head, 8 warps; warps w and
// w + 4 share keys 16 w.. (w < 4): warp w owns columns 0..D/2 of their dK and dV, warp w + 4 columns D/2..D
// (2 x D/4 = 128 accumulator registers). Per query tile of 32 (Q, dO, lse, delta double-buffered), the pair splits
// the two score-shaped products rather than computing both twice:
//   warp w:     Sᵀ = K Qᵀ (16 keys x 32 queries, over all of D), Pᵀ = exp2(Sᵀ·scale·log2 e − lse·log2 e) (masked;
//               with a cap Pᵀ = exp2(cap·tanh(scale Sᵀ / cap)·log2 e − lse·log2 e) and slope 1 − tanh²):
//               Pᵀ to shared memory as bf16, Pᵀ·slope as fp32 (in the lanes' own fragment order);
//   warp w + 4: dPᵀ = V dOᵀ, then (after the barrier) dSᵀ = Pᵀ·slope ∘ (dPᵀ − delta), to shared memory as bf16;
//   both:       dV[:, own columns] += Pᵀ dO[:, own columns], dK[:, own columns] += dSᵀ Q[:, own columns], with Pᵀ and
//               dSᵀ read back as A fragments (the same bf16 values the 128-key kernel packs from registers);
//   all 8:      dQ (32 queries x D) += dS (32 x 64 keys) K, warp w taking queries 16 (w % 2).. and columns
//               (w / 2) D/4.., added to the fp32 accumulator (red.global.add), as in fa_backward.
// dk = scale dK, dv = dV written by each warp for its columns. Shared memory (fa_backward_wide_shared): 150.75 KB,
// within an A100's 163 KB and an H100's 227 KB; 99 KB cards take the 64-row kernels.

/// Dynamic shared memory of attention_fa_backward at D = 256 (the launcher computes the same): K and V (64 rows),
/// Q and dO (2 stages x 32 rows), Pᵀ and dSᵀ (64 x 40 bf16), the Pᵀ·slope exchange (4 warps x 16 x 32 lanes fp32),
/// lse/delta/segments (2 stages x 32).
template <int D>
constexpr int fa_backward_wide_shared() {
    return (2 * 64 + 4 * 32) * (D + 8) * 2 + 2 * 64 * 40 * 2 + 4 * 16 * 32 * 4 + 3 * 2 * 32 * 4;
}

template <int D, bool CAP>
__device__ __forceinline__ void fa_backward_wide(const h16* q, const h16* k, const h16* v, const h16* dout,
                                                 const float* lse, const float* delta, const int* segments,
                                                 float* dq_accum, h16* dk, h16* dv, int seq, int heads, int kv_heads,
                                                 float scale, float softcap, int window) {
    constexpr int LD = D + 8, BN = 64, BQ = 32, LDS = BQ + 8, QT = BQ * LD, HALF = D / 2;
    h16* ks = reinterpret_cast<h16*>(fa_shared);  // [BN * LD]
    h16* vs = ks + BN * LD;                        // [BN * LD]
    h16* qs = vs + BN * LD;                        // [2][QT]
    h16* dos = qs + 2 * QT;                        // [2][QT]
    h16* pst = dos + 2 * QT;                       // Pᵀ [BN][LDS]
    h16* dst = pst + BN * LDS;                     // dSᵀ [BN][LDS]
    float* ps_x = reinterpret_cast<float*>(dst + BN * LDS);  // Pᵀ·slope [4 warps][BQ / 8 * 4][32 lanes]
    float* lse_s = ps_x + 4 * (BQ / 2) * 32;                  // [2][BQ], times log2 e
    float* delta_s = lse_s + 2 * BQ;                          // [2][BQ]
    int* segq_s = reinterpret_cast<int*>(delta_s + 2 * BQ);   // [2][BQ]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kw = warp & 3, half = warp >> 2, c0 = half * HALF;  // key rows 16 kw.., dK/dV columns c0..c0 + D/2
    const FaBackwardBlock blk = fa_backward_begin<D, BN, BQ>(ks, vs, qs, dos, lse_s, delta_s, segq_s, q, k, v, dout, lse,
                                                             delta, segments, kw, g, seq, heads, kv_heads, window);
    const int hk = blk.hk, group = blk.group, k0 = blk.k0, tiles_per_head = blk.tiles_per_head, tiles = blk.tiles;
    const int warp_first = blk.warp_first, warp_last = blk.warp_last, keys[2] = {blk.keys[0], blk.keys[1]};
    const long long t0 = blk.t0;
    const float sl2 = scale * 1.4426950408889634f;
    const float cap_scale = CAP ? scale / softcap : 0.0f, cap_l2 = CAP ? softcap * 1.4426950408889634f : 0.0f;
    int segk[2];
    float dka[HALF / 8][4], dva[HALF / 8][4];
    begin_key_rows<HALF>(segk, dka, dva, segments, t0, keys, seq);
    auto issue = [&](int n, int stage) {
        fa_issue_query_tile<D, BQ>(qs, dos, lse_s, delta_s, segq_s, q, dout, lse, delta, segments, n, stage, tiles_per_head,
                                   hk * group, k0, t0, seq, heads);
    };
    float* my_ps = ps_x + kw * (BQ / 2) * 32 + lane;  // this lane's Pᵀ·slope values, stride 32
    for (int n = 0; n < tiles; n++) {
        // Tile n has landed; every warp is done with tile n - 1 (its stage, Pᵀ, dSᵀ and the exchange are rewritten).
        cp_async_wait<0>();
        __syncthreads();
        if (n + 1 < tiles) issue(n + 1, (n + 1) & 1);
        cp_async_commit();
        const int stage = n & 1;
        const int h = hk * group + n / tiles_per_head, i0 = k0 + (n % tiles_per_head) * BQ;
        const h16* qt = qs + stage * QT;
        const h16* dot = dos + stage * QT;
        const float* lse_t = lse_s + stage * BQ;
        const float* delta_t = delta_s + stage * BQ;
        const int* segq_t = segq_s + stage * BQ;
        // Sᵀ (first warp of the pair) or dPᵀ (second): 16 keys x BQ queries over the whole head dimension.
        float acc[BQ / 8][4];
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        {
            const h16* rows_a = half ? vs : ks;
            const h16* rows_b = half ? dot : qt;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk += 2) {
                unsigned a0[4], a1[4];
                a_frag_mk(a0, rows_a, LD, kw * 16, kk * 16, lane);
                a_frag_mk(a1, rows_a, LD, kw * 16, kk * 16 + 16, lane);
#pragma unroll
                for (int nt = 0; nt < BQ / 8; nt++) {
                    unsigned r[4];
                    b_frags_nk(r, rows_b, LD, kk * 16, nt * 8, lane);
                    mma16816(acc[nt], a0, r[0], r[1]);
                    mma16816(acc[nt], a1, r[2], r[3]);
                }
            }
        }
        if (half == 0) {
            const bool masked = segments || i0 < warp_last || i0 + BQ > seq || i0 + BQ - 1 - window >= warp_first;
#pragma unroll
            for (int nt = 0; nt < BQ / 8; nt++) {
                float p[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int cq = nt * 8 + 2 * t + (e & 1);
                    float slope = 1.0f;
                    if (CAP) {
                        const float th = tanhf(acc[nt][e] * cap_scale);
                        p[e] = fast_exp2(fmaf(th, cap_l2, -lse_t[cq]));
                        slope = 1.0f - th * th;
                    } else {
                        p[e] = fast_exp2(fmaf(acc[nt][e], sl2, -lse_t[cq]));
                    }
                    if (masked) {
                        const int i = e >> 1, query = i0 + cq;
                        const bool ok = query < seq && keys[i] <= query && keys[i] > query - window
                                        && (!segments || segq_t[cq] == segk[i]);
                        p[e] = ok ? p[e] : 0.0f;
                    }
                    my_ps[(nt * 4 + e) * 32] = p[e] * slope;
                }
                h16* prow = pst + (kw * 16 + g) * LDS + nt * 8 + 2 * t;
                *reinterpret_cast<unsigned*>(prow) = pack_f2(p[0], p[1]);
                *reinterpret_cast<unsigned*>(prow + 8 * LDS) = pack_f2(p[2], p[3]);
            }
        }
        __syncthreads();  // Pᵀ and Pᵀ·slope of every pair are in shared memory
        if (half == 1) {
#pragma unroll
            for (int nt = 0; nt < BQ / 8; nt++) {
                float ds[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int cq = nt * 8 + 2 * t + (e & 1);
                    ds[e] = my_ps[(nt * 4 + e) * 32] * (acc[nt][e] - delta_t[cq]);  // dSᵀ (masked: Pᵀ = 0)
                }
                h16* drow = dst + (kw * 16 + g) * LDS + nt * 8 + 2 * t;
                *reinterpret_cast<unsigned*>(drow) = pack_f2(ds[0], ds[1]);
                *reinterpret_cast<unsigned*>(drow + 8 * LDS) = pack_f2(ds[2], ds[3]);
            }
        }
        __syncthreads();  // dSᵀ of every pair is in shared memory
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            unsigned pa[4], sa[4];
            a_frag_mk(pa, pst, LDS, kw * 16, kk * 16, lane);
            a_frag_mk(sa, dst, LDS, kw * 16, kk * 16, lane);
            accumulate_dkv<HALF>(dka, dva, pa, sa, dot + c0, qt + c0, LD, kk, lane);
        }
        // dQ (BQ queries x D) += dS (BQ x 64 keys) K: warp w takes queries 16 (w % 2).. and columns (w / 2) D/4...
        add_dq_rows<D / 32, BN>(dq_accum, dst, LDS, ks, LD, (warp & 1) * 16, (warp >> 1) * (D / 4), i0, seq, t0, heads, h, D, lane);
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (keys[i] >= seq) continue;
        h16* outk = dk + ((t0 + keys[i]) * kv_heads + hk) * D + c0;
        h16* outv = dv + ((t0 + keys[i]) * kv_heads + hk) * D + c0;
#pragma unroll
        for (int dt = 0; dt < HALF / 8; dt++) {
            *reinterpret_cast<unsigned*>(outk + dt * 8 + 2 * t) = pack_f2(dka[dt][2 * i] * scale, dka[dt][2 * i + 1] * scale);
            *reinterpret_cast<unsigned*>(outv + dt * 8 + 2 * t) = pack_f2(dva[dt][2 * i], dva[dt][2 * i + 1]);
        }
    }
}

/// The backward of head dimension D: the 128-key kernel up to 128, the split-column one above.
template <int D, bool CAP>
__device__ __forceinline__ void fa_backward_any(const h16* q, const h16* k, const h16* v, const h16* dout,
                                                const float* lse, const float* delta, const int* segments,
                                                float* dq_accum, h16* dk, h16* dv, int seq, int heads, int kv_heads,
                                                float scale, float softcap, int window) {
    if constexpr (D > 128)
        fa_backward_wide<D, CAP>(q, k, v, dout, lse, delta, segments, dq_accum, dk, dv, seq, heads, kv_heads, scale,
                                 softcap, window);
    else
        fa_backward<D, CAP>(q, k, v, dout, lse, delta, segments, dq_accum, dk, dv, seq, heads, kv_heads, scale,
                            softcap, window);
}

/// delta[row] = Σ_d o[row][d] dout[row][d] for rows = tokens x heads (one warp per row), and accumulator row = 0.
extern "C" __global__ void attention_fa_prep(const h16* o, const h16* dout, float* delta, float* dq_accum, long long rows,
                                             int dim) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float sum = 0.0f;
    for (int d = lane; d < dim; d += 32) {
        sum += h16_to_float(o[row * dim + d]) * h16_to_float(dout[row * dim + d]);
        dq_accum[row * dim + d] = 0.0f;
    }
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

/// dq = bf16(scale · accumulator), `count` values (a multiple of 4).
extern "C" __global__ void attention_fa_dq(const float* dq_accum, h16* dq, long long count, float scale) {
    GRID_STRIDE(i4, count / 4) {
        const float4 a = reinterpret_cast<const float4*>(dq_accum)[i4];
        const unsigned lo = pack_f2(a.x * scale, a.y * scale), hi = pack_f2(a.z * scale, a.w * scale);
        reinterpret_cast<uint2*>(dq)[i4] = make_uint2(lo, hi);
    }
}

// MARK: - Entry points

#define FORWARD_ARGS const h16 *q, const h16 *k, const h16 *v, h16 *o, float *lse, const int *segments, int seq, \
                     int heads, int kv_heads, float scale, float softcap, int window
#define DQ_ARGS const h16 *q, const h16 *k, const h16 *v, const h16 *dout, const float *lse, const float *delta, \
                const int *segments, h16 *dq, int seq, int heads, int kv_heads, float scale, float softcap, int window
#define DKDV_ARGS const h16 *q, const h16 *k, const h16 *v, const h16 *dout, const float *lse, const float *delta, \
                  const int *segments, h16 *dk, h16 *dv, int seq, int heads, int kv_heads, float scale, float softcap, \
                  int window
#define FA_BACKWARD_ARGS const h16 *q, const h16 *k, const h16 *v, const h16 *dout, const float *lse, const float *delta, \
                         const int *segments, float *dq_accum, h16 *dk, h16 *dv, int seq, int heads, int kv_heads, \
                         float scale, float softcap, int window

// Each kernel twice: `..._d<D>` without a cap (softcap ignored) and `..._cap_d<D>` with it. window = the sliding
// window in keys (1 << 30 when there is none).
#define ENTRY_POINTS_V(D, CAP, NAME)                                                                                    \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) attention_mma_forward##NAME##D(FORWARD_ARGS) {            \
        mma_forward<D, CAP>(q, k, v, o, lse, segments, seq, heads, kv_heads, scale, softcap, window);                   \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) attention_mma_backward_dq##NAME##D(DQ_ARGS) {             \
        mma_backward_dq<D, CAP>(q, k, v, dout, lse, delta, segments, dq, seq, heads, kv_heads, scale, softcap, window); \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) attention_mma_backward_dkdv##NAME##D(DKDV_ARGS) {         \
        mma_backward_dkdv<D, CAP>(q, k, v, dout, lse, delta, segments, dk, dv, seq, heads, kv_heads, scale, softcap,    \
                                  window);                                                                              \
    }
#define ENTRY_POINTS(D) ENTRY_POINTS_V(D, false, _d) ENTRY_POINTS_V(D, true, _cap_d)

#define FA_ENTRY_POINTS_V(D, CAP, NAME)                                                                                 \
    extern "C" __global__ void __launch_bounds__(FA_FORWARD_THREADS(D), FA_FORWARD_MIN_BLOCKS(D))                     \
        attention_fa_forward##NAME##D(FORWARD_ARGS) {                                                                   \
        fa_forward<D, CAP>(q, k, v, o, lse, segments, seq, heads, kv_heads, scale, softcap, window);                    \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 1) attention_fa_backward##NAME##D(FA_BACKWARD_ARGS) {      \
        fa_backward_any<D, CAP>(q, k, v, dout, lse, delta, segments, dq_accum, dk, dv, seq, heads, kv_heads, scale,     \
                                softcap, window);                                                                       \
    }
#define FA_ENTRY_POINTS(D) FA_ENTRY_POINTS_V(D, false, _d) FA_ENTRY_POINTS_V(D, true, _cap_d)

ENTRY_POINTS(32)
ENTRY_POINTS(64)
ENTRY_POINTS(96)
ENTRY_POINTS(128)
ENTRY_POINTS(256)
// Flash kernels for every head dimension; at 256 the 8-warp forward and the split-column backward (132.25 and
// 150.75 KB of shared memory: cards with less, 99 KB ones, run the 64-row kernels: CUDAAttention's flashAttentionFits).
FA_ENTRY_POINTS(32)
FA_ENTRY_POINTS(64)
FA_ENTRY_POINTS(96)
FA_ENTRY_POINTS(128)
FA_ENTRY_POINTS(256)
