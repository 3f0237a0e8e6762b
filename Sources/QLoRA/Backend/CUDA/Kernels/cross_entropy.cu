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
    float m = -QLORA_INFINITY, s = 0.0f;
    if (vec) {
        for (int j = threadIdx.x * 8; j < vocab; j += blockDim.x * 8) {
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
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
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
        if (lane == 0) {
            const float lse = m + logf(s);
            shared_lse = lse;
            const bool valid = !ignored && label >= 0 && label < vocab;
            row_loss[row] = valid ? lse - capped_logit(h16_to_float(z[label]), softcap) : 0.0f;
        }
    }
    __syncthreads();
    if (dlogits == nullptr) return;
    const float lse = shared_lse;
    h16* d = dlogits + row * vocab;
    if (vec) {
        for (int j = threadIdx.x * 8; j < vocab; j += blockDim.x * 8) {
            float f[8];
            load_h16x8(z + j, f);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = ignored ? 0.0f : logit_gradient(f[k], j + k == label, lse, grad_scale, softcap);
            store_h16x8(d + j, f);
        }
    } else {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float g = 0.0f;
            if (!ignored) g = logit_gradient(h16_to_float(z[j]), j == label, lse, grad_scale, softcap);
            d[j] = float_to_h16(g);
        }
    }
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
