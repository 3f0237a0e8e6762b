// training.cu: the small kernels a training step needs beside the op families: random initialisation of
// benchmark weights on the GPU, global-norm gradient clipping without a host round trip, LoRA dropout, and the
// broadcast of a linear's bias over rows.
//
// Random numbers: a counter-based hash (SplitMix64 finaliser of seed + index), so every element is independent
// of the launch shape and the same seed gives the same tensor.
//   fill_random_bytes:   p[i] = low byte of hash(i)              (NF4 codes: uniform over the 16 values)
//   fill_random_bf16:    p[i] = bf16(std * (u1 + u2 + u3 - 1.5) * 2)  (sum of uniforms, std `std`)
//   fill_random_uniform: p[i] = lo + (hi - lo) * u                (fp32, e.g. Kaiming-uniform LoRA A)
// Clipping, as torch.nn.utils.clip_grad_norm_ (norm type 2):
//   sum_squares:     partial[b] = sum of g[i]^2 over block b's grid-stride share; then sum_partials (one block):
//                    out[0] = sum_b partial[b], in a fixed order, so the norm has the same bits on every run
//   clip_gradients:  total = sqrt(out[0]), coef = min(1, max_norm / (total + 1e-6)); g *= coef
//                    (a non-finite total leaves g unchanged, as the CPU trainer does)
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

extern "C" __global__ void sum_squares(const float* g, long long n, float* partial) {
    __shared__ float scratch[32];
    float s = 0.0f;
    GRID_STRIDE(i, n) { s += g[i] * g[i]; }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/// One block: out[0] = the sum of partial[0 ..< count].
extern "C" __global__ void sum_partials(const float* partial, int count, float* out) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}

extern "C" __global__ void clip_gradients(float* g, long long n, const float* sum_sq, float max_norm) {
    const float total = sqrtf(sum_sq[0]);
    if (!(total < QLORA_INFINITY)) return;  // NaN or inf: leave the gradients alone
    const float coef = fminf(1.0f, max_norm / (total + 1e-6f));
    if (coef >= 1.0f) return;
    GRID_STRIDE(i, n) { g[i] *= coef; }
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
