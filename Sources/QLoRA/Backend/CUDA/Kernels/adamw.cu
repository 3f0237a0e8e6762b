// adamw.cu: one AdamW step on fp32 parameters, as torch.optim.AdamW computes it (decoupled weight decay):
//     p   <- p * (1 - lr * weight_decay)
//     m   <- beta1 m + (1 - beta1) g
//     v   <- beta2 v + (1 - beta2) g^2
//     p   <- p - (lr / bias_correction1) * m / (sqrt(v) / sqrt(bias_correction2) + eps)
// with bias_correction1 = 1 - beta1^t and bias_correction2 = 1 - beta2^t computed on the host for step t.
#include "qlora_prelude.cuh"

extern "C" __global__ void adamw_step(float* params, const float* grads, float* m, float* v, long long n, float lr,
                                      float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                                      float bias_correction2_sqrt) {
    const float step_size = lr / bias_correction1;
    GRID_STRIDE(i, n) {
        const float g = grads[i];
        float p = params[i] * (1.0f - lr * weight_decay);
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        p -= step_size * mi / (sqrtf(vi) / bias_correction2_sqrt + eps);
        params[i] = p;
    }
}
