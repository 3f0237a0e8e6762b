// training.cu: the small kernels a training step needs beside the op families: random initialisation of
// benchmark weights on the GPU, global-norm gradient clipping without a host round trip, LoRA dropout, and the
// broadcast of a linear's bias over rows.
//
// Random numbers: a counter-based hash (SplitMix64 finaliser of seed + index), so every element is independent
// of the launch shape and the same seed gives the same tensor.
//   fill_random_bytes:   p[i] = low byte of hash(i)              (NF4 codes: uniform over the 16 values)
//   fill_random_bf16:    p[i] = bf16(std * (u1 + u2 + u3 - 1.5) * 2)  (sum of uniforms, std `std`)
//   fill_random_uniform: p[i] = lo + (hi - lo) * u                (fp32, e.g. Kaiming-uniform LoRA A)
// Clipping, as torch.nn.utils.clip_grad_norm_ (norm type 2), summed as the CPU's GradientClipping sums it: per LoRA
// tensor, then those sums in tensor order, so the ZeRO-2 ranks (each summing its own tensors, the others' sums
// all-reduced as exact zeros) and the unsharded run get the same bits:
//   tensor_sum_squares:       s[t] = Σ_i double(g[i])² over tensor t (one block per tensor: a thread's strided share,
//                             then a fixed tree over the block's threads; no atomics, the same bits on every run)
//   norm_from_tensor_squares: one thread: norm = √(Σ_t s[t]) in tensor order (GradientClipping.combine);
//                             coef = min(1, max_norm / (norm + 1e-6)) in double (GradientClipping.coefficient), 1 when
//                             the norm is not finite; result = [norm, coef]
//   clip_by_coefficient:      g[i] *= float(coef) when coef < 1 (a non-finite norm leaves g unchanged, as on the CPU)
//   scale_values:    g[i] *= factor   (fp16 loss scaling: the gradients of S·loss times 1/S, before the norm)
// LoRA dropout, with the prelude's dropout_keeps (the twin of Training/DropoutMask.swift, bit for bit); the trainer
// fuses the mask into the LoRA products instead (lora_dropout.cu), these stay for checks and comparisons:
//   dropout_apply:       out[i] = kept ? bf16(x[i] / keep) : 0              d(x), the LoRA path's input
//   dropout_add_masked:  dx[i] = bf16(dx[i] + (kept ? t[i] / keep : 0))      dx += d(t), t = s·(dy·B)·A
//   dropout_keep_mask:   out[i] = kept                                        (for the GPU check)
//   Division by keep, not multiplication by 1/keep, exactly as the CPU does (NVRTC compiles IEEE-accurate division).
// Bias, y = x·Wᵀ + b: add_row_vector makes y[t, o] = (overwrite ? 0 : y[t, o]) + b[o] before the GEMM adds x·Wᵀ.
// Fused projections (Phi-3's qkv_proj, gate_up_proj): copy_columns copies a [rows, columns] block of h16 values between
// two row-major matrices of other widths, dst[r, c] = src[r, c] (row strides in elements): splitting q | k | v out of
// the fused output, and joining dq | dk | dv back into it. 16 bytes per access when strides, width and pointers allow.
// Folded LoRA (the trainer's y = [x | x·A_1ᵀ | … ]·[W | tail]ᵀ, CUDADecoderTrainer's "Folded LoRA"): lora_fold_tail
// writes the `width` columns of W's scratch past its `in` columns (rows `ld` apart): its own s·B [out, r] (fp32
// master, one rounding) at columns first … first+r−1 of the tail, zeros in the others (the other linears' x·Aᵀ):
//   w[o, in + c] = (first ≤ c < first + r) ? h16(s · B[o, c − first]) : 0
#include "qlora_prelude.cuh"

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float uniform01(unsigned long long h) { return (float)(h >> 40) * (1.0f / 16777216.0f); }

extern "C" __global__ void fill_random_bytes(unsigned char* p, long long n, unsigned long long seed) {
    GRID_STRIDE(i, n) { p[i] = (unsigned char)(mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1)) & 0xffu); }
}

extern "C" __global__ void fill_random_bf16(h16* p, long long n, unsigned long long seed, float std) {
    GRID_STRIDE(i, n) {
        const unsigned long long base = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(3 * i + 1);
        const float u = uniform01(mix64(base)) + uniform01(mix64(base + 0x9e3779b97f4a7c15ull)) +
                        uniform01(mix64(base + 2 * 0x9e3779b97f4a7c15ull)) - 1.5f;
        p[i] = float_to_h16(u * 2.0f * std);  // the sum of 3 uniforms has std 1/2
    }
}

extern "C" __global__ void fill_random_uniform(float* p, long long n, unsigned long long seed, float lo, float hi) {
    GRID_STRIDE(i, n) { p[i] = lo + (hi - lo) * uniform01(mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1))); }
}

extern "C" __global__ void tensor_sum_squares(const float* __restrict__ g, const long long* __restrict__ offsets,
                                              const long long* __restrict__ counts, int first, double* __restrict__ squares) {
    __shared__ double scratch[256];  // blockDim.x = 256
    const int t = first + blockIdx.x;
    const float* p = g + offsets[t];
    const long long n = counts[t];
    double s = 0.0;
    // Unrolled so that a thread has 8 loads in flight (one block per tensor: rolled, each iteration waited for its
    // load, 0.36 ms for 229,376 values in session 11's profile); the additions stay in index order, the same bits.
#pragma unroll 8
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        const double x = (double)p[i];
        s += x * x;
    }
    scratch[threadIdx.x] = s;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) scratch[threadIdx.x] += scratch[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) squares[t] = scratch[0];
}

extern "C" __global__ void norm_from_tensor_squares(const double* __restrict__ squares, int count, double max_norm,
                                                    double* __restrict__ result) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double total = 0.0;
    for (int t = 0; t < count; ++t) total += squares[t];
    const double norm = sqrt(total);
    const bool finite = norm <= 1.7976931348623157e308;  // false for inf and NaN
    result[0] = norm;
    result[1] = finite ? fmin(1.0, max_norm / (norm + 1e-6)) : 1.0;
}

extern "C" __global__ void clip_by_coefficient(float* g, long long n, const double* __restrict__ result) {
    const double coef = result[1];
    if (!(coef < 1.0)) return;
    const float c = (float)coef;
    GRID_STRIDE(i, n) { g[i] *= c; }
}

extern "C" __global__ void scale_values(float* g, long long n, float factor) {
    GRID_STRIDE(i, n) { g[i] *= factor; }
}

extern "C" __global__ void dropout_apply(const h16* __restrict__ x, h16* __restrict__ out, long long n, unsigned long long seed,
                                         float keep) {
    GRID_STRIDE(i, n) { out[i] = dropout_keeps(seed, i, keep) ? float_to_h16(h16_to_float(x[i]) / keep) : (h16)0; }
}

extern "C" __global__ void dropout_add_masked(h16* __restrict__ dx, const h16* __restrict__ t, long long n, unsigned long long seed,
                                              float keep) {
    GRID_STRIDE(i, n) {
        if (dropout_keeps(seed, i, keep)) dx[i] = float_to_h16(h16_to_float(dx[i]) + h16_to_float(t[i]) / keep);
    }
}

extern "C" __global__ void dropout_keep_mask(unsigned char* out, long long n, unsigned long long seed, float keep) {
    GRID_STRIDE(i, n) { out[i] = dropout_keeps(seed, i, keep) ? 1 : 0; }
}

extern "C" __global__ void add_row_vector(h16* y, const h16* __restrict__ v, long long rows, int cols, int overwrite) {
    GRID_STRIDE(e, rows * (long long)cols) {
        const h16 b = v[e % cols];
        y[e] = overwrite ? b : float_to_h16(h16_to_float(y[e]) + h16_to_float(b));
    }
}

extern "C" __global__ void copy_columns(const h16* __restrict__ src, long long src_stride, h16* __restrict__ dst,
                                        long long dst_stride, long long rows, long long columns) {
    const bool vec = (columns & 7) == 0 && (src_stride & 7) == 0 && (dst_stride & 7) == 0 && aligned16(src) && aligned16(dst);
    if (vec) {
        const long long per_row = columns / 8;
        GRID_STRIDE(e, rows * per_row) {
            const long long r = e / per_row, c = (e % per_row) * 8;
            *reinterpret_cast<h16x8_raw*>(dst + r * dst_stride + c) = *reinterpret_cast<const h16x8_raw*>(src + r * src_stride + c);
        }
    } else {
        GRID_STRIDE(e, rows * columns) {
            const long long r = e / columns, c = e % columns;
            dst[r * dst_stride + c] = src[r * src_stride + c];
        }
    }
}

extern "C" __global__ void lora_fold_tail(const float* __restrict__ b, float scale, h16* __restrict__ w, int out, int in,
                                          long long ld, int width, int first, int r) {
    GRID_STRIDE(i, (long long)out * width) {
        const long long o = i / width;
        const int c = (int)(i - o * width);
        const int k = c - first;
        w[o * ld + in + c] = float_to_h16(k >= 0 && k < r ? scale * b[o * r + k] : 0.0f);
    }
}
