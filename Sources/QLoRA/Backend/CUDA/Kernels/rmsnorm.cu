// rmsnorm.cu: RMSNorm forward and input-gradient backward (the norm weight is frozen in QLoRA).
//
// x, y, dy, dx: [rows, dim] bf16; w: [dim] bf16. One block per row, fp32 accumulation.
// Forward, as HF LlamaRMSNorm computes it (normalise in fp32, round to bf16, then scale by the weight):
//     r = 1 / sqrt(mean(x^2) + eps)          y_i = bf16( bf16(x_i * r) * w_i )
// Backward (treating the inner rounding as identity):
//     y_i = w_i x_i r,   dr/dx_j = -r^3 x_j / dim
//     dx_j = r * ( w_j dy_j - x_j * r^2 * (1/dim) * sum_i(w_i dy_i x_i) )
// `accumulate` != 0 adds into dx (the residual stream's gradient) instead of overwriting it.
// Rows whose length is a multiple of 8 (and 16-byte aligned) move 8 values per 16-byte access.
#include "qlora_prelude.cuh"

extern "C" __global__ void rmsnorm_forward(const h16* x, const h16* w, h16* y, int dim, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const h16* xr = x + row * dim;
    h16* yr = y + row * dim;
    const bool vec = (dim & 7) == 0 && aligned16(xr) && aligned16(yr) && aligned16(w);
    float ss = 0.0f;
    if (vec) {
        for (int i = threadIdx.x * 8; i < dim; i += blockDim.x * 8) {
            float f[8];
            load_h16x8(xr + i, f);
#pragma unroll
            for (int k = 0; k < 8; k++) ss += f[k] * f[k];
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = h16_to_float(xr[i]);
            ss += v * v;
        }
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / dim + eps);
    if (vec) {
        for (int i = threadIdx.x * 8; i < dim; i += blockDim.x * 8) {
            float f[8], g[8];
            load_h16x8(xr + i, f);
            load_h16x8(w + i, g);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = round_h16(f[k] * r) * g[k];
            store_h16x8(yr + i, f);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x)
            yr[i] = float_to_h16(round_h16(h16_to_float(xr[i]) * r) * h16_to_float(w[i]));
    }
}

extern "C" __global__ void rmsnorm_backward(const h16* x, const h16* w, const h16* dy, h16* dx, int dim, float eps,
                                            int accumulate) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const h16* xr = x + row * dim;
    const h16* dyr = dy + row * dim;
    h16* dxr = dx + row * dim;
    const bool vec = (dim & 7) == 0 && aligned16(xr) && aligned16(dyr) && aligned16(dxr) && aligned16(w);
    float ss = 0.0f, dot = 0.0f;
    if (vec) {
        for (int i = threadIdx.x * 8; i < dim; i += blockDim.x * 8) {
            float xf[8], wf[8], df[8];
            load_h16x8(xr + i, xf);
            load_h16x8(w + i, wf);
            load_h16x8(dyr + i, df);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                ss += xf[k] * xf[k];
                dot += wf[k] * df[k] * xf[k];
            }
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = h16_to_float(xr[i]);
            ss += v * v;
            dot += h16_to_float(w[i]) * h16_to_float(dyr[i]) * v;
        }
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float r = rsqrtf(ss / dim + eps);
    const float c = r * r * dot / dim;
    if (vec) {
        for (int i = threadIdx.x * 8; i < dim; i += blockDim.x * 8) {
            float xf[8], wf[8], df[8], o[8];
            load_h16x8(xr + i, xf);
            load_h16x8(w + i, wf);
            load_h16x8(dyr + i, df);
            if (accumulate) load_h16x8(dxr + i, o);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float g = r * (wf[k] * df[k] - xf[k] * c);
                o[k] = accumulate ? o[k] + g : g;
            }
            store_h16x8(dxr + i, o);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            float g = r * (h16_to_float(w[i]) * h16_to_float(dyr[i]) - h16_to_float(xr[i]) * c);
            if (accumulate) g += h16_to_float(dxr[i]);
            dxr[i] = float_to_h16(g);
        }
    }
}
