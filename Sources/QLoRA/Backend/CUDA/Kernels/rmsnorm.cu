// rmsnorm.cu: RMSNorm forward and input-gradient backward (the norm weight is frozen in QLoRA).
//
// x, y, dy, dx: [rows, dim] bf16; w: [dim] bf16. One block per row, fp32 accumulation.
// Forward, as HF LlamaRMSNorm computes it (normalise in fp32, round to bf16, then scale by the weight):
//     r = 1 / sqrt(mean(x^2) + eps)          y_i = bf16( bf16(x_i * r) * w_i )
// Backward (treating the inner rounding as identity), with n_i = x_i * r:
//     dy_i/dx_j: y_i = w_i x_i r,  dr/dx_j = -r^3 x_j / dim
//     dx_j = r * ( w_j dy_j - x_j * r^2 * (1/dim) * sum_i(w_i dy_i x_i) )
// `accumulate` != 0 adds into dx (the residual stream's gradient) instead of overwriting it.
#include "qlora_prelude.cuh"

extern "C" __global__ void rmsnorm_forward(const bf16* x, const bf16* w, bf16* y, int dim, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * dim;
    bf16* yr = y + row * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = bf16_to_float(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = float_to_bf16(round_bf16(bf16_to_float(xr[i]) * r) * bf16_to_float(w[i]));
}

extern "C" __global__ void rmsnorm_backward(const bf16* x, const bf16* w, const bf16* dy, bf16* dx, int dim, float eps,
                                            int accumulate) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * dim;
    const bf16* dyr = dy + row * dim;
    bf16* dxr = dx + row * dim;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = bf16_to_float(xr[i]);
        ss += v * v;
        dot += bf16_to_float(w[i]) * bf16_to_float(dyr[i]) * v;
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float r = rsqrtf(ss / dim + eps);
    const float c = r * r * dot / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = r * (bf16_to_float(w[i]) * bf16_to_float(dyr[i]) - bf16_to_float(xr[i]) * c);
        if (accumulate) g += bf16_to_float(dxr[i]);
        dxr[i] = float_to_bf16(g);
    }
}
