// attention.cu: causal multi-head attention with grouped KV heads (GQA), flash-attention style: the [S, S] score
// matrix is never stored; each block walks the keys in tiles with an online softmax.
//
// Shapes (tokens = batch * seq, token t = b * seq + position):
//   q, o, do, dq: [tokens, heads, D] bf16;  k, v, dk, dv: [tokens, kv_heads, D] bf16 (query head h reads kv head
//   h / (heads / kv_heads));  lse, delta: [tokens, heads] fp32;  segments: [tokens] int or null.
// Query i may see key j of the same batch row iff j <= i, i - window < j (sliding window; window = 1 << 30 when
// there is none) and segments[i] == segments[j] (packed sequences are kept apart by giving each its own segment id).
// scale = 1/sqrt(D) usually (Gemma: query_pre_attn_scalar^-1/2).
//
// Forward (per query row i):  s_j = scale q_i.k_j, or with soft-capping (the `_cap` kernels, cap c)
//                             s_j = c tanh(scale q_i.k_j / c);
//                             m = max_j s_j,  l = sum_j exp(s_j - m),
//                             o_i = sum_j exp(s_j - m) v_j / l,   lse_i = m + log l      (kept for the backward)
// Backward, with p_ij = exp(s_ij - lse_i) recomputed from lse:
//   delta_i = sum_d do_i[d] o_i[d]                         (attention_backward_delta)
//   dp_ij = do_i . v_j,   ds_ij = p_ij (dp_ij - delta_i) (1 - tanh^2)   (the last factor with a cap only: the
//                                                         derivative of c tanh(x / c) at x = scale q.k)
//   dq_i = scale sum_j ds_ij k_j                             (attention_backward_dq: threads own queries)
//   dk_j = scale sum_i ds_ij q_i,   dv_j = sum_i p_ij do_i   (attention_backward_dkdv: threads own keys, summing
//                                                             over the query heads of the group, so no atomics)
// Work split: a block takes 64 rows (queries or keys) of one (batch, head); 4 threads share a row, each holding
// D/4 of its values as 16-byte chunks c = part, part+4, ... so that the 4 threads read 64 contiguous bytes.
// The other side (keys, or queries for dk/dv) goes through shared memory in tiles of 64 rows (32 at D = 256, to stay
// under 48 KB of static shared memory); tiles wholly outside the window are skipped.
// The inner products are fp32 FMAs (no tensor cores yet: the faster mma/wgmma version is future work).
#include "qlora_prelude.cuh"

#define TILE 64
#define TPR 4
#define THREADS (TILE * TPR)

/// Rows per shared-memory tile of the other side for head dimension D.
template <int D>
constexpr int side_tile() { return D > 128 ? 32 : TILE; }

/// The logit of a raw product q.k (see the header).
template <bool CAP>
__device__ __forceinline__ float logit(float raw, float scale, float cap) {
    return CAP ? cap * tanhf(raw * scale / cap) : raw * scale;
}

/// d logit / d(scale q.k) at a raw product: 1 - tanh^2 with a cap, else 1.
template <bool CAP>
__device__ __forceinline__ float logit_slope(float raw, float scale, float cap) {
    if (!CAP) return 1.0f;
    const float th = tanhf(raw * scale / cap);
    return 1.0f - th * th;
}

/// Loads the 16-byte chunks of this thread's part of a D-row (bf16) into f (fp32), D/32 chunks of 8.
template <int D>
__device__ __forceinline__ void load_part(const h16* row, int part, float* f) {
#pragma unroll
    for (int c = 0; c < D / 32; c++) load_h16x8(row + (part + 4 * c) * 8, f + 8 * c);
}

template <int D>
__device__ __forceinline__ void store_part(h16* row, int part, const float* f) {
#pragma unroll
    for (int c = 0; c < D / 32; c++) store_h16x8(row + (part + 4 * c) * 8, f + 8 * c);
}

/// Dot product of this thread's part of `a` (registers) with a shared-memory row, summed over the 4 threads.
template <int D>
__device__ __forceinline__ float dot_row(const float* a, const h16* row, int part) {
    float d = 0.0f;
#pragma unroll
    for (int c = 0; c < D / 32; c++) {
        float f[8];
        load_h16x8(row + (part + 4 * c) * 8, f);
#pragma unroll
        for (int e = 0; e < 8; e++) d += a[8 * c + e] * f[e];
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    return d;
}

/// acc += w * row (this thread's part).
template <int D>
__device__ __forceinline__ void axpy_row(float* acc, float w, const h16* row, int part) {
#pragma unroll
    for (int c = 0; c < D / 32; c++) {
        float f[8];
        load_h16x8(row + (part + 4 * c) * 8, f);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[8 * c + e] += w * f[e];
    }
}

/// Copies rows [r0, r0 + side_tile) of head `head` from src ([tokens, heads_in_src, D]) to shared (zeros past seq).
template <int D>
__device__ __forceinline__ void load_tile(h16* dst, const h16* src, long long batch_token0, int r0, int seq, int heads,
                                          int head) {
    for (int idx = threadIdx.x; idx < side_tile<D>() * D / 8; idx += blockDim.x) {
        const int rr = idx / (D / 8), ch = idx % (D / 8);
        const int r = r0 + rr;
        h16x8_raw v = {{0u, 0u, 0u, 0u}};
        if (r < seq) v = *reinterpret_cast<const h16x8_raw*>(src + ((batch_token0 + r) * heads + head) * D + ch * 8);
        *reinterpret_cast<h16x8_raw*>(dst + rr * D + ch * 8) = v;
    }
}

template <int D, bool CAP>
__device__ __forceinline__ void attention_forward_impl(const h16* q, const h16* k, const h16* v, h16* o, float* lse,
                                                       const int* segments, int seq, int heads, int kv_heads, float scale,
                                                       float softcap, int window) {
    constexpr int KT = side_tile<D>();
    __shared__ alignas(16) h16 ks[KT * D];
    __shared__ alignas(16) h16 vs[KT * D];
    __shared__ int segs[KT];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * TILE;
    const int hk = h / (heads / kv_heads);
    const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
    const int i = q0 + r;
    const bool valid = i < seq;
    const long long t0 = (long long)b * seq, ti = t0 + i;
    float qf[D / 4], acc[D / 4];
#pragma unroll
    for (int x = 0; x < D / 4; x++) { qf[x] = 0.0f; acc[x] = 0.0f; }
    if (valid) load_part<D>(q + (ti * heads + h) * D, part, qf);
    const int seg_i = (segments && valid) ? segments[ti] : 0;
    float m = -QLORA_INFINITY, l = 0.0f;
    const int key_begin = max(0, q0 - window + 1) / KT * KT, key_end = min(seq, q0 + TILE);
    for (int j0 = key_begin; j0 < key_end; j0 += KT) {
        __syncthreads();
        load_tile<D>(ks, k, t0, j0, seq, kv_heads, hk);
        load_tile<D>(vs, v, t0, j0, seq, kv_heads, hk);
        if (threadIdx.x < KT) segs[threadIdx.x] = (segments && j0 + threadIdx.x < seq) ? segments[t0 + j0 + threadIdx.x] : 0;
        __syncthreads();
        float s[KT];
        float tile_max = -QLORA_INFINITY;
#pragma unroll
        for (int jj = 0; jj < KT; jj++) {
            const float d = dot_row<D>(qf, ks + jj * D, part);
            const bool ok = valid && j0 + jj <= i && j0 + jj > i - window && segs[jj] == seg_i;
            s[jj] = ok ? logit<CAP>(d, scale, softcap) : -QLORA_INFINITY;
            tile_max = fmaxf(tile_max, s[jj]);
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new == -QLORA_INFINITY) continue;  // nothing visible yet in this row
        const float alpha = __expf(m - m_new);   // 0 when m was -inf
        l *= alpha;
#pragma unroll
        for (int x = 0; x < D / 4; x++) acc[x] *= alpha;
#pragma unroll
        for (int jj = 0; jj < KT; jj++) {
            const float p = __expf(s[jj] - m_new);
            l += p;
            axpy_row<D>(acc, p, vs + jj * D, part);
        }
        m = m_new;
    }
    if (!valid) return;
    const float inv = 1.0f / l;
#pragma unroll
    for (int x = 0; x < D / 4; x++) acc[x] *= inv;
    store_part<D>(o + (ti * heads + h) * D, part, acc);
    if (part == 0) lse[ti * heads + h] = m + logf(l);
}

// Entry points: at the end of the file.

/// delta[t, h] = sum_d do[t, h, d] * o[t, h, d]. One warp per (token, head) row; rows = tokens * heads.
extern "C" __global__ void attention_backward_delta(const h16* o, const h16* dout, float* delta, long long rows, int dim) {
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float sum = 0.0f;
    for (int d = lane; d < dim; d += 32) sum += h16_to_float(o[row * dim + d]) * h16_to_float(dout[row * dim + d]);
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

template <int D, bool CAP>
__device__ __forceinline__ void attention_backward_dq_impl(const h16* q, const h16* k, const h16* v, const h16* dout,
                                                           const float* lse, const float* delta, const int* segments,
                                                           h16* dq, int seq, int heads, int kv_heads, float scale,
                                                           float softcap, int window) {
    constexpr int KT = side_tile<D>();
    __shared__ alignas(16) h16 ks[KT * D];
    __shared__ alignas(16) h16 vs[KT * D];
    __shared__ int segs[KT];
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * TILE;
    const int hk = h / (heads / kv_heads);
    const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
    const int i = q0 + r;
    const bool valid = i < seq;
    const long long t0 = (long long)b * seq, ti = t0 + i;
    float qf[D / 4], df[D / 4], acc[D / 4];
#pragma unroll
    for (int x = 0; x < D / 4; x++) { qf[x] = 0.0f; df[x] = 0.0f; acc[x] = 0.0f; }
    float lse_i = 0.0f, delta_i = 0.0f;
    if (valid) {
        load_part<D>(q + (ti * heads + h) * D, part, qf);
        load_part<D>(dout + (ti * heads + h) * D, part, df);
        lse_i = lse[ti * heads + h];
        delta_i = delta[ti * heads + h];
    }
    const int seg_i = (segments && valid) ? segments[ti] : 0;
    const int key_begin = max(0, q0 - window + 1) / KT * KT, key_end = min(seq, q0 + TILE);
    for (int j0 = key_begin; j0 < key_end; j0 += KT) {
        __syncthreads();
        load_tile<D>(ks, k, t0, j0, seq, kv_heads, hk);
        load_tile<D>(vs, v, t0, j0, seq, kv_heads, hk);
        if (threadIdx.x < KT) segs[threadIdx.x] = (segments && j0 + threadIdx.x < seq) ? segments[t0 + j0 + threadIdx.x] : 0;
        __syncthreads();
#pragma unroll 4
        for (int jj = 0; jj < KT; jj++) {
            const float sd = dot_row<D>(qf, ks + jj * D, part);
            const float dp = dot_row<D>(df, vs + jj * D, part);
            const bool ok = valid && j0 + jj <= i && j0 + jj > i - window && segs[jj] == seg_i;
            const float p = ok ? __expf(logit<CAP>(sd, scale, softcap) - lse_i) : 0.0f;
            const float ds = p * (dp - delta_i) * logit_slope<CAP>(sd, scale, softcap);
            axpy_row<D>(acc, ds, ks + jj * D, part);
        }
    }
    if (!valid) return;
#pragma unroll
    for (int x = 0; x < D / 4; x++) acc[x] *= scale;
    store_part<D>(dq + (ti * heads + h) * D, part, acc);
}

template <int D, bool CAP>
__device__ __forceinline__ void attention_backward_dkdv_impl(const h16* q, const h16* k, const h16* v,
                                                             const h16* dout, const float* lse, const float* delta,
                                                             const int* segments, h16* dk, h16* dv, int seq, int heads,
                                                             int kv_heads, float scale, float softcap, int window) {
    constexpr int QT = side_tile<D>();
    __shared__ alignas(16) h16 qs[QT * D];
    __shared__ alignas(16) h16 ds_[QT * D];
    __shared__ float lses[QT], deltas[QT];
    __shared__ int segs[QT];
    const int b = blockIdx.z, hk = blockIdx.y, j0 = blockIdx.x * TILE;
    const int group = heads / kv_heads;
    const int r = threadIdx.x / TPR, part = threadIdx.x % TPR;
    const int j = j0 + r;
    const bool valid = j < seq;
    const long long t0 = (long long)b * seq, tj = t0 + j;
    float kf[D / 4], vf[D / 4], dkf[D / 4], dvf[D / 4];
#pragma unroll
    for (int x = 0; x < D / 4; x++) { kf[x] = 0.0f; vf[x] = 0.0f; dkf[x] = 0.0f; dvf[x] = 0.0f; }
    if (valid) {
        load_part<D>(k + (tj * kv_heads + hk) * D, part, kf);
        load_part<D>(v + (tj * kv_heads + hk) * D, part, vf);
    }
    const int seg_j = (segments && valid) ? segments[tj] : 0;
    // Queries before j0 cannot see these keys, nor those past the last key's window.
    const int query_end = min(seq, j0 + TILE + window - 1);
    for (int g = 0; g < group; g++) {
        const int h = hk * group + g;
        for (int i0 = j0; i0 < query_end; i0 += QT) {
            __syncthreads();
            load_tile<D>(qs, q, t0, i0, seq, heads, h);
            load_tile<D>(ds_, dout, t0, i0, seq, heads, h);
            if (threadIdx.x < QT) {
                const int i = i0 + threadIdx.x;
                lses[threadIdx.x] = i < seq ? lse[(t0 + i) * heads + h] : 0.0f;
                deltas[threadIdx.x] = i < seq ? delta[(t0 + i) * heads + h] : 0.0f;
                segs[threadIdx.x] = (segments && i < seq) ? segments[t0 + i] : 0;
            }
            __syncthreads();
#pragma unroll 4
            for (int ii = 0; ii < QT; ii++) {
                const int i = i0 + ii;
                const float sd = dot_row<D>(kf, qs + ii * D, part);
                const float dp = dot_row<D>(vf, ds_ + ii * D, part);
                const bool ok = valid && i < seq && j <= i && j > i - window && segs[ii] == seg_j;
                const float p = ok ? __expf(logit<CAP>(sd, scale, softcap) - lses[ii]) : 0.0f;
                const float dsv = p * (dp - deltas[ii]) * logit_slope<CAP>(sd, scale, softcap);
                axpy_row<D>(dvf, p, ds_ + ii * D, part);
                axpy_row<D>(dkf, dsv, qs + ii * D, part);
            }
        }
    }
    if (!valid) return;
#pragma unroll
    for (int x = 0; x < D / 4; x++) dkf[x] *= scale;
    store_part<D>(dk + (tj * kv_heads + hk) * D, part, dkf);
    store_part<D>(dv + (tj * kv_heads + hk) * D, part, dvf);
}

// MARK: - Entry points: each kernel for D = 32, 64, 96, 128, 256, as `..._d<D>` (no cap: softcap ignored) and
// `..._cap_d<D>`.

#define ENTRY_POINTS_V(D, CAP, NAME)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_forward##NAME##D(                                   \
        const h16* q, const h16* k, const h16* v, h16* o, float* lse, const int* segments, int seq, int heads,         \
        int kv_heads, float scale, float softcap, int window) {                                                         \
        attention_forward_impl<D, CAP>(q, k, v, o, lse, segments, seq, heads, kv_heads, scale, softcap, window);        \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_backward_dq##NAME##D(                               \
        const h16* q, const h16* k, const h16* v, const h16* dout, const float* lse, const float* delta,              \
        const int* segments, h16* dq, int seq, int heads, int kv_heads, float scale, float softcap, int window) {      \
        attention_backward_dq_impl<D, CAP>(q, k, v, dout, lse, delta, segments, dq, seq, heads, kv_heads, scale,       \
                                           softcap, window);                                                            \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) attention_backward_dkdv##NAME##D(                             \
        const h16* q, const h16* k, const h16* v, const h16* dout, const float* lse, const float* delta,              \
        const int* segments, h16* dk, h16* dv, int seq, int heads, int kv_heads, float scale, float softcap,           \
        int window) {                                                                                                   \
        attention_backward_dkdv_impl<D, CAP>(q, k, v, dout, lse, delta, segments, dk, dv, seq, heads, kv_heads, scale, \
                                             softcap, window);                                                          \
    }
#define ENTRY_POINTS(D) ENTRY_POINTS_V(D, false, _d) ENTRY_POINTS_V(D, true, _cap_d)

ENTRY_POINTS(32)
ENTRY_POINTS(64)
ENTRY_POINTS(96)
ENTRY_POINTS(128)
ENTRY_POINTS(256)
