// cross_entropy.cu: softmax cross-entropy over the vocabulary, its loss and its gradient wrt the logits.
//
// logits: [rows, vocab] bf16 (rows is a chunk of token positions: the full-vocabulary logits are never held in
// fp32); labels: [rows] int, -100 = ignored. One block per row.
//   Pass 1, online logsumexp: each thread keeps (m, s) with s = sum_j exp(z_j - m) over its slice, rescaling s
//   when m grows; the block merges pairs with m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m).
//   lse = m + log(s);   row_loss = lse - z[label]   (0 for ignored rows)
//   Pass 2 (when dlogits is not null): dlogits_j = grad_scale * (exp(z_j - lse) - [j == label]), 0 for ignored
//   rows. grad_scale is d(loss)/d(row_loss), e.g. 1/count for a mean. dlogits may alias logits (each element is
//   read before it is written, by the same thread).
// Final-logit soft-capping (Gemma 2), softcap = c > 0 (0: none): the loss is over z'_j = c tanh(z_j / c), computed in
// fp32 from the h16 logits (transformers divides, takes tanh, multiplies), and with t_j = tanh(z_j / c)
//   dlogits_j = grad_scale * (exp(z'_j - lse') - [j == label]) * (1 - t_j^2)      (d z'/dz = 1 - tanh^2)
// cross_entropy_reduce then sums row losses and counts the rows that are not ignored, in a fixed order.
// softcap_f32 / softcap_h16: x = c tanh(x / c) in place, for the logits decode samples from.
#include "qlora_prelude.cuh"

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == -QLORA_INFINITY) return;  // both empty
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

/// The soft-capped logit c tanh(z / c), or z itself when cap is 0.
__device__ __forceinline__ float capped_logit(float z, float cap) { return cap > 0.0f ? tanhf(z / cap) * cap : z; }

/// d(loss)/dz for the logit z (before the cap): grad_scale (softmax - onehot) at the capped logit, times 1 - tanh^2.
__device__ __forceinline__ float logit_gradient(float z, bool is_label, float lse, float grad_scale, float cap) {
    if (cap > 0.0f) {
        const float t = tanhf(z / cap);
        return grad_scale * (__expf(t * cap - lse) - (is_label ? 1.0f : 0.0f)) * (1.0f - t * t);
    }
    return grad_scale * (__expf(z - lse) - (is_label ? 1.0f : 0.0f));
}

/// Pass 1 over one row's logits z[0, width) (soft-capped when softcap > 0): each thread's online (m, s), merged over
/// the warp and then over the block's warps, in that fixed order. The result is valid in thread 0 only. Shared by the
/// whole-vocabulary kernel and a vocabulary slice's statistics, so a slice of the whole vocabulary gives its bits.
/// `vec`: the row is read 8 values per access (width a multiple of 8, 16-byte aligned).
__device__ __forceinline__ void block_row_statistics(const h16* z, int width, float softcap, bool vec, float* shared_m,
                                                     float* shared_s, float& m, float& s) {
    m = -QLORA_INFINITY;
    s = 0.0f;
    if (vec) {
        for (int j = threadIdx.x * 8; j < width; j += blockDim.x * 8) {
            float f[8];
            load_h16x8(z + j, f);
            if (softcap > 0.0f) {
#pragma unroll
                for (int k = 0; k < 8; k++) f[k] = capped_logit(f[k], softcap);
            }
            float mx = f[0];
#pragma unroll
            for (int k = 1; k < 8; k++) mx = fmaxf(mx, f[k]);
            float part = 0.0f;
#pragma unroll
            for (int k = 0; k < 8; k++) part += __expf(f[k] - mx);
            lse_merge(m, s, mx, part);
        }
    } else {
        for (int j = threadIdx.x; j < width; j += blockDim.x) {
            const float v = capped_logit(h16_to_float(z[j]), softcap);
            if (v > m) {
                s = s * __expf(m - v) + 1.0f;
                m = v;
            } else {
                s += __expf(v - m);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { shared_m[warp] = m; shared_s[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        m = lane < warps ? shared_m[lane] : -QLORA_INFINITY;
        s = lane < warps ? shared_s[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
    }
}

/// Pass 2 over one row: d[j] = logit_gradient(z[j], j == label, lse) for j in [0, width) (0 on an ignored row).
/// `label` indexes this row's columns (outside [0, width): the target is in another slice). d may alias z.
__device__ __forceinline__ void block_row_gradients(const h16* z, h16* d, int width, int label, bool ignored, float lse,
                                                    float grad_scale, float softcap, bool vec) {
    if (vec) {
        for (int j = threadIdx.x * 8; j < width; j += blockDim.x * 8) {
            float f[8];
            load_h16x8(z + j, f);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = ignored ? 0.0f : logit_gradient(f[k], j + k == label, lse, grad_scale, softcap);
            store_h16x8(d + j, f);
        }
    } else {
        for (int j = threadIdx.x; j < width; j += blockDim.x) {
            float g = 0.0f;
            if (!ignored) g = logit_gradient(h16_to_float(z[j]), j == label, lse, grad_scale, softcap);
            d[j] = float_to_h16(g);
        }
    }
}

extern "C" __global__ void cross_entropy_forward_backward(const h16* logits, const int* labels, int vocab,
                                                          float grad_scale, float* row_loss, h16* dlogits, float softcap) {
    __shared__ float shared_m[32], shared_s[32];
    __shared__ float shared_lse;
    const long long row = blockIdx.x;
    const h16* z = logits + row * vocab;
    const int label = labels[row];
    const bool ignored = label == -100;

    // Rows of a multiple of 8 logits (16-byte aligned) are read 8 values per access.
    const bool vec = (vocab & 7) == 0 && aligned16(z) && (dlogits == nullptr || aligned16(dlogits + row * vocab));
    float m, s;
    block_row_statistics(z, vocab, softcap, vec, shared_m, shared_s, m, s);
    if (threadIdx.x == 0) {
        const float lse = m + logf(s);
        shared_lse = lse;
        const bool valid = !ignored && label >= 0 && label < vocab;
        row_loss[row] = valid ? lse - capped_logit(h16_to_float(z[label]), softcap) : 0.0f;
    }
    __syncthreads();
    if (dlogits == nullptr) return;
    block_row_gradients(z, dlogits + row * vocab, vocab, label, ignored, shared_lse, grad_scale, softcap, vec);
}

// The vocabulary-parallel loss (Model/CUDADecoderTrainer+VocabularyParallelHead.swift; Parallel/VocabularyParallelLoss.swift
// is its CPU contract). Rank q of W holds the head's rows [v_q, v_q + w_q) (the first V mod W ranks one row more) and
// computes the logits z of its slice for every rank's rows, a chunk at a time ([rows, w_q] bf16, as the whole
// vocabulary's chunk). Per row:
//   statistics   (m_q, s_q) = pass 1 over the slice (block_row_statistics: the same merge order as the whole row's),
//                t_q = the target's soft-capped logit when the slice holds it, else 0
//   combine      (all ranks' statistics gathered, in rank order, slices without rows left out)
//                M = max_q m_q,  S = Σ_q s_q e^(m_q − M),  lse = M + log S,  row loss = lse − t_owner (0 if ignored)
//   gradient     d z_j = pass 2 of the slice given lse (block_row_gradients, the target's column when it is here)
// With one rank M = m, S = 0 + s·e^0 = s exactly, and lse = m + log s is the whole-vocabulary kernel's formula:
// its bits, so the loss and d logits of a world of one are the plain path's.

/// statistics[3 row + (0, 1, 2)] = (m, s, t) of this slice's `width` logits of each row (labels: vocabulary ids;
/// -100 ignored); the slice starts at vocabulary column `column_start`. One block of 512 threads per row (the
/// whole-vocabulary kernel's block, so its merge order).
extern "C" __global__ void cross_entropy_slice_statistics(const h16* logits, const int* labels, int width, int column_start,
                                                          float softcap, float* statistics) {
    __shared__ float shared_m[32], shared_s[32];
    const long long row = blockIdx.x;
    const h16* z = logits + row * width;
    const bool vec = (width & 7) == 0 && aligned16(z);
    float m, s;
    block_row_statistics(z, width, softcap, vec, shared_m, shared_s, m, s);
    if (threadIdx.x == 0) {
        const int label = labels[row], t = label - column_start;
        const bool held = label != -100 && t >= 0 && t < width;
        statistics[3 * row] = m;
        statistics[3 * row + 1] = s;
        statistics[3 * row + 2] = held ? capped_logit(h16_to_float(z[t]), softcap) : 0.0f;
    }
}

/// The rank whose slice of `vocab` over `world` ranks holds column `v` (the first vocab % world ranks hold one more).
__device__ __forceinline__ int slice_owner(int v, int vocab, int world) {
    const int base = vocab / world, extra = vocab % world;
    return v < extra * (base + 1) ? v / (base + 1) : extra + (v - extra * (base + 1)) / base;
}

/// For each of `rows` rows: lse[row] from every rank's statistics (`statistics`: [world][rows][3], rank q's at
/// q·rows·3), combined in rank order; and for the rows [loss_start, loss_start + loss_count) (this rank's tokens),
/// row_loss[row − loss_start] = lse − the target logit from the rank that holds it (0 on an ignored row).
extern "C" __global__ void cross_entropy_combine(const float* statistics, const int* labels, int rows, int world, int vocab,
                                                 float* lse, float* row_loss, int loss_start, int loss_count) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const int base = vocab / world, extra = vocab % world;
    float M = -QLORA_INFINITY;
    for (int q = 0; q < world; q++) {
        if (base + (q < extra ? 1 : 0) > 0) M = fmaxf(M, statistics[3 * ((long long)q * rows + row)]);
    }
    float S = 0.0f;
    for (int q = 0; q < world; q++) {
        if (base + (q < extra ? 1 : 0) == 0) continue;
        const float* st = statistics + 3 * ((long long)q * rows + row);
        S += st[1] * expf(st[0] - M);
    }
    const float L = M + logf(S);
    lse[row] = L;
    if (row >= loss_start && row < loss_start + loss_count) {
        const int label = labels[row];
        const bool valid = label != -100 && label >= 0 && label < vocab;
        row_loss[row - loss_start] =
            valid ? L - statistics[3 * ((long long)slice_owner(label, vocab, world) * rows + row) + 2] : 0.0f;
    }
}

/// d logits of a chunk of this slice's logits, in place: rows of `width` values starting at vocabulary column
/// `column_start`, lse[row] from cross_entropy_combine. One block of 512 threads per row.
extern "C" __global__ void cross_entropy_slice_gradient(h16* logits, const int* labels, const float* lse, int width,
                                                        int column_start, float grad_scale, float softcap) {
    const long long row = blockIdx.x;
    h16* z = logits + row * width;
    const int label = labels[row];
    const bool vec = (width & 7) == 0 && aligned16(z);
    block_row_gradients(z, z, width, label - column_start, label == -100, lse[row], grad_scale, softcap, vec);
}

/// out[0] = sum of row losses, out[1] = number of rows whose label is not -100. One block.
extern "C" __global__ void cross_entropy_reduce(const float* row_loss, const int* labels, int rows, float* out) {
    __shared__ float scratch[32];
    float sum = 0.0f, count = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        sum += row_loss[r];
        count += labels[r] != -100 ? 1.0f : 0.0f;
    }
    sum = block_sum(sum, scratch);
    count = block_sum(count, scratch);
    if (threadIdx.x == 0) { out[0] = sum; out[1] = count; }
}

extern "C" __global__ void softcap_f32(float* x, long long n, float cap) {
    GRID_STRIDE(i, n) { x[i] = tanhf(x[i] / cap) * cap; }
}

extern "C" __global__ void softcap_h16(h16* x, long long n, float cap) {
    GRID_STRIDE(i, n) { x[i] = float_to_h16(tanhf(h16_to_float(x[i]) / cap) * cap); }
}
