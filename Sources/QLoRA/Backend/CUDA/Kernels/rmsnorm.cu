// rmsnorm.cu: RMSNorm forward and input-gradient backward (the norm weight is frozen in QLoRA).
//
// x, y, dy, dx, residual: [rows, dim] h16 (the forward's y, the backward's dy and dx may have longer row strides: the
// trainer's folded LoRA keeps its columns past dim); w: [dim] h16. fp32 accumulation.
// Forward, with r = 1 / sqrt(mean(x^2) + eps) per row and the weight offset o:
//     o = 0 (HF LlamaRMSNorm, also Qwen3's q/k norms: normalise in fp32, round, then scale by the weight):
//         n_i = h16( h16(x_i * r) * w_i )
//     o != 0 (Gemma's x * (1 + w), Gemma2/3RMSNorm: everything in fp32, one rounding at the end):
//         n_i = h16( x_i * r * (w_i + o) )
//     with a residual (Gemma's norm after attention / after the MLP, then the residual add, rounded as transformers
//     does): y_i = h16( residual_i + n_i ), else y_i = n_i. y may be the residual buffer (each element is read
//     before the same thread writes it), or x.
// Backward (treating the roundings as identity), with w'_i = w_i + o:
//     y_i = w'_i x_i r,   dr/dx_j = -r^3 x_j / dim
//     dx_j = r * ( w'_j dy_j - x_j * r^2 * (1/dim) * sum_i(w'_i dy_i x_i) )
// Kernels: rmsnorm_forward (the Llama norm, a block per row; decode launches it directly), rmsnorm_forward_rows (every
// variation), rmsnorm_backward (every variation).
// `accumulate` != 0 adds into dx (the residual stream's gradient) instead of overwriting it.
// Rows of at most 256 values (per-head q/k norms, rows = tokens x heads) take one warp each, 8 rows to a block
// (`warp_rows`); longer rows take a block each. Rows whose length is a multiple of 8 (and 16-byte aligned) move 8
// values per 16-byte access.
#include "qlora_prelude.cuh"

// The row a thread works on, and its place among the row's threads: a warp per row or a block per row.
struct RowThreads {
    long long row;
    int lane, lanes;
    bool warp;
};

__device__ __forceinline__ RowThreads row_threads(int warp_rows) {
    RowThreads t;
    t.warp = warp_rows != 0;
    if (t.warp) {
        t.row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
        t.lane = threadIdx.x & 31;
        t.lanes = 32;
    } else {
        t.row = blockIdx.x;
        t.lane = threadIdx.x;
        t.lanes = blockDim.x;
    }
    return t;
}

/// Sum over the row's threads (a warp, or the whole block: then every thread of the block must call it).
__device__ __forceinline__ float row_sum(const RowThreads& t, float v, float* scratch) {
    return t.warp ? warp_sum(v) : block_sum(v, scratch);
}

/// The normalised value before its final rounding: LlamaRMSNorm's inner rounding when offset is 0, none otherwise.
__device__ __forceinline__ float norm_value(float x, float r, float w, float offset) {
    return offset == 0.0f ? round_h16(x * r) * w : x * r * (w + offset);
}

/// One row of the forward, by the row's threads.
__device__ __forceinline__ void rmsnorm_forward_row(const RowThreads& t, const h16* x, const h16* w, const h16* residual,
                                                    h16* y, int dim, long long y_stride, float eps, float offset, float* scratch) {
    const h16* xr = x + t.row * dim;
    h16* yr = y + t.row * y_stride;
    const h16* rr = residual ? residual + t.row * dim : nullptr;
    const bool vec = (dim & 7) == 0 && aligned16(xr) && aligned16(yr) && aligned16(w) && (!rr || aligned16(rr));
    float ss = 0.0f;
    if (vec) {
        for (int i = t.lane * 8; i < dim; i += t.lanes * 8) {
            float f[8];
            load_h16x8(xr + i, f);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += f[k] * f[k];
        }
    } else {
        for (int i = t.lane; i < dim; i += t.lanes) {
            const float v = h16_to_float(xr[i]);
            ss += v * v;
        }
    }
    ss = row_sum(t, ss, scratch);
    const float r = rsqrtf(ss / dim + eps);
    if (vec) {
        for (int i = t.lane * 8; i < dim; i += t.lanes * 8) {
            float f[8], g[8], res[8];
            load_h16x8(xr + i, f);
            load_h16x8(w + i, g);
            if (rr) load_h16x8(rr + i, res);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                f[k] = norm_value(f[k], r, g[k], offset);
                if (rr) f[k] = res[k] + round_h16(f[k]);
            }
            store_h16x8(yr + i, f);
        }
    } else {
        for (int i = t.lane; i < dim; i += t.lanes) {
            float v = norm_value(h16_to_float(xr[i]), r, h16_to_float(w[i]), offset);
            if (rr) v = h16_to_float(rr[i]) + round_h16(v);
            yr[i] = float_to_h16(v);
        }
    }
}

// The Llama norm, one block per row (offset 0, no residual); decode launches this one directly with these arguments.
extern "C" __global__ void rmsnorm_forward(const h16* x, const h16* w, h16* y, int dim, float eps) {
    __shared__ float scratch[32];
    rmsnorm_forward_row(row_threads(0), x, w, nullptr, y, dim, dim, eps, 0.0f, scratch);
}

// Every variation: `offset` (0 or Gemma's 1), `residual` (null for none), a warp per row when `warp_rows`; y's rows
// `y_stride` apart (≥ dim: the trainer's folded LoRA writes x·Aᵀ into the columns past dim).
extern "C" __global__ void rmsnorm_forward_rows(const h16* x, const h16* w, const h16* residual, h16* y, int rows, int dim,
                                                float eps, float offset, int warp_rows, long long y_stride) {
    __shared__ float scratch[32];
    const RowThreads t = row_threads(warp_rows);
    if (t.warp && t.row >= rows) return;  // whole warps leave; the block path has exactly `rows` blocks
    rmsnorm_forward_row(t, x, w, residual, y, dim, y_stride, eps, offset, scratch);
}

// dy's rows `dy_stride` apart, dx's `dx_stride` (≥ dim; the columns past dim are neither read nor written).
extern "C" __global__ void rmsnorm_backward(const h16* x, const h16* w, const h16* dy, h16* dx, int rows, int dim, float eps,
                                            float offset, int accumulate, int warp_rows, long long dy_stride, long long dx_stride) {
    __shared__ float scratch[32];
    const RowThreads t = row_threads(warp_rows);
    if (t.warp && t.row >= rows) return;
    const h16* xr = x + t.row * dim;
    const h16* dyr = dy + t.row * dy_stride;
    h16* dxr = dx + t.row * dx_stride;
    const bool vec = (dim & 7) == 0 && aligned16(xr) && aligned16(dyr) && aligned16(dxr) && aligned16(w);
    float ss = 0.0f, dot = 0.0f;
    if (vec) {
        for (int i = t.lane * 8; i < dim; i += t.lanes * 8) {
            float xf[8], wf[8], df[8];
            load_h16x8(xr + i, xf);
            load_h16x8(w + i, wf);
            load_h16x8(dyr + i, df);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                ss += xf[k] * xf[k];
                dot += (wf[k] + offset) * df[k] * xf[k];
            }
        }
    } else {
        for (int i = t.lane; i < dim; i += t.lanes) {
            const float v = h16_to_float(xr[i]);
            ss += v * v;
            dot += (h16_to_float(w[i]) + offset) * h16_to_float(dyr[i]) * v;
        }
    }
    ss = row_sum(t, ss, scratch);
    dot = row_sum(t, dot, scratch);
    const float r = rsqrtf(ss / dim + eps);
    const float c = r * r * dot / dim;
    if (vec) {
        for (int i = t.lane * 8; i < dim; i += t.lanes * 8) {
            float xf[8], wf[8], df[8], o[8];
            load_h16x8(xr + i, xf);
            load_h16x8(w + i, wf);
            load_h16x8(dyr + i, df);
            if (accumulate) load_h16x8(dxr + i, o);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float g = r * ((wf[k] + offset) * df[k] - xf[k] * c);
                o[k] = accumulate ? o[k] + g : g;
            }
            store_h16x8(dxr + i, o);
        }
    } else {
        for (int i = t.lane; i < dim; i += t.lanes) {
            float g = r * ((h16_to_float(w[i]) + offset) * h16_to_float(dyr[i]) - h16_to_float(xr[i]) * c);
            if (accumulate) g += h16_to_float(dxr[i]);
            dxr[i] = float_to_h16(g);
        }
    }
}
