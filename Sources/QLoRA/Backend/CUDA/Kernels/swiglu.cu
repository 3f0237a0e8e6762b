// swiglu.cu: the gated MLP activations, forward and backward: SwiGLU (Llama, Mistral, Qwen, Phi-3) and GeGLU (Gemma,
// below). All tensors h16, n elements.
//
// With s = sigmoid(g), silu(g) = g s, and d silu/dg = s (1 + g (1 - s)):
//     forward:   h  = g s u
//     backward:  du = dh * g s
//                dg = dh * u * s (1 + g (1 - s))
// The backward may write dg over g and du over up (each element is read before it is written).
#include "qlora_prelude.cuh"

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

extern "C" __global__ void swiglu_forward(const h16* gate, const h16* up, h16* h, long long n) {
    const bool vec = aligned16(gate) && aligned16(up) && aligned16(h);
    GRID_STRIDE(g8, (n + 7) / 8) {
        const long long e0 = g8 * 8;
        if (vec && e0 + 8 <= n) {
            float g[8], u[8], o[8];
            load_h16x8(gate + e0, g);
            load_h16x8(up + e0, u);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = g[k] * sigmoidf(g[k]) * u[k];
            store_h16x8(h + e0, o);
        } else {
            for (long long e = e0; e < e0 + 8 && e < n; e++) {
                const float g = h16_to_float(gate[e]);
                h[e] = float_to_h16(g * sigmoidf(g) * h16_to_float(up[e]));
            }
        }
    }
}

extern "C" __global__ void swiglu_backward(const h16* dh, const h16* gate, const h16* up, h16* dgate, h16* dup,
                                           long long n) {
    const bool vec = aligned16(dh) && aligned16(gate) && aligned16(up) && aligned16(dgate) && aligned16(dup);
    GRID_STRIDE(g8, (n + 7) / 8) {
        const long long e0 = g8 * 8;
        if (vec && e0 + 8 <= n) {
            float d[8], g[8], u[8], dg[8], du[8];
            load_h16x8(dh + e0, d);
            load_h16x8(gate + e0, g);
            load_h16x8(up + e0, u);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float s = sigmoidf(g[k]);
                du[k] = d[k] * g[k] * s;
                dg[k] = d[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
            }
            store_h16x8(dgate + e0, dg);
            store_h16x8(dup + e0, du);
        } else {
            for (long long e = e0; e < e0 + 8 && e < n; e++) {
                const float d = h16_to_float(dh[e]), g = h16_to_float(gate[e]), u = h16_to_float(up[e]);
                const float s = sigmoidf(g);
                dup[e] = float_to_h16(d * g * s);
                dgate[e] = float_to_h16(d * u * s * (1.0f + g * (1.0f - s)));
            }
        }
    }
}

// GeGLU, Gemma's MLP activation: h = gelu(g) * u with gelu's tanh approximation (transformers' `gelu_pytorch_tanh`,
// PyTorch's gelu(approximate="tanh")). With k = sqrt(2/pi) and t = tanh(k (g + 0.044715 g^3)):
//     forward:   h  = ½ g (1 + t) u
//     backward:  du = dh * ½ g (1 + t)
//                dg = dh * u * ( ½ (1 + t) + ½ g (1 - t^2) k (1 + 3 * 0.044715 g^2) )
// Same layout and aliasing as swiglu (dg over g and du over u allowed; h over g too). tanhf is the accurate one.
struct GeluTanh {
    float value, slope;  // gelu(g) and d gelu / dg
};

__device__ __forceinline__ GeluTanh gelu_tanh(float g) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    const float t = tanhf(k * (g + 0.044715f * g * g * g));
    GeluTanh r;
    r.value = 0.5f * g * (1.0f + t);
    r.slope = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * g * g);
    return r;
}

extern "C" __global__ void geglu_forward(const h16* gate, const h16* up, h16* h, long long n) {
    const bool vec = aligned16(gate) && aligned16(up) && aligned16(h);
    GRID_STRIDE(g8, (n + 7) / 8) {
        const long long e0 = g8 * 8;
        if (vec && e0 + 8 <= n) {
            float g[8], u[8], o[8];
            load_h16x8(gate + e0, g);
            load_h16x8(up + e0, u);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = gelu_tanh(g[k]).value * u[k];
            store_h16x8(h + e0, o);
        } else {
            for (long long e = e0; e < e0 + 8 && e < n; e++)
                h[e] = float_to_h16(gelu_tanh(h16_to_float(gate[e])).value * h16_to_float(up[e]));
        }
    }
}

extern "C" __global__ void geglu_backward(const h16* dh, const h16* gate, const h16* up, h16* dgate, h16* dup,
                                          long long n) {
    const bool vec = aligned16(dh) && aligned16(gate) && aligned16(up) && aligned16(dgate) && aligned16(dup);
    GRID_STRIDE(g8, (n + 7) / 8) {
        const long long e0 = g8 * 8;
        if (vec && e0 + 8 <= n) {
            float d[8], g[8], u[8], dg[8], du[8];
            load_h16x8(dh + e0, d);
            load_h16x8(gate + e0, g);
            load_h16x8(up + e0, u);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const GeluTanh a = gelu_tanh(g[k]);
                du[k] = d[k] * a.value;
                dg[k] = d[k] * u[k] * a.slope;
            }
            store_h16x8(dgate + e0, dg);
            store_h16x8(dup + e0, du);
        } else {
            for (long long e = e0; e < e0 + 8 && e < n; e++) {
                const float d = h16_to_float(dh[e]), u = h16_to_float(up[e]);
                const GeluTanh a = gelu_tanh(h16_to_float(gate[e]));
                dup[e] = float_to_h16(d * a.value);
                dgate[e] = float_to_h16(d * u * a.slope);
            }
        }
    }
}
