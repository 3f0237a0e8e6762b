// swiglu.cu: the gated MLP activations, forward and backward: SwiGLU (Llama, Mistral, Qwen, Phi-3) and GeGLU (Gemma).
// All tensors h16, n elements; h = act(g) * u. The forward's h may have rows of `cols` values `h_stride` apart
// (the trainer's folded LoRA: x·Aᵀ of down_proj sits in the columns past cols); the forward may write h over g
// only when it is dense. g and u (and the backward's dg, du) may have rows of `cols` values `g_stride` apart (the
// trainer's backward fold: s·dy·B of gate_proj and up_proj sits in the columns past cols, neither read nor written
// here); dh is dense. Dense callers pass cols = stride (any value: the index is then the element's).
//
// SwiGLU, with s = sigmoid(g), silu(g) = g s, and d silu/dg = s (1 + g (1 - s)):
//     forward:   h  = g s u
//     backward:  du = dh * g s
//                dg = dh * u * s (1 + g (1 - s))
// GeGLU with gelu's tanh approximation (transformers' `gelu_pytorch_tanh`, PyTorch's gelu(approximate="tanh")),
// with k = sqrt(2/pi) and t = tanh(k (g + 0.044715 g^3)):
//     forward:   h  = ½ g (1 + t) u
//     backward:  du = dh * ½ g (1 + t)
//                dg = dh * u * ( ½ (1 + t) + ½ g (1 - t^2) k (1 + 3 * 0.044715 g^2) )
// One element loop per direction (8 values per 16-byte access where aligned) serves both; each activation is a
// struct with its forward value and backward pair. The backward may write dg over g and du over up, the forward h
// over g (each element is read before it is written, by the same thread).
#include "qlora_prelude.cuh"

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

struct SiLU {
    __device__ __forceinline__ static float forward(float g, float u) { return g * sigmoidf(g) * u; }
    __device__ __forceinline__ static void backward(float d, float g, float u, float& dg, float& du) {
        const float s = sigmoidf(g);
        du = d * g * s;
        dg = d * u * s * (1.0f + g * (1.0f - s));
    }
};

struct GeluTanh {
    /// gelu(g) and d gelu / dg (tanhf is the accurate one).
    __device__ __forceinline__ static void gelu(float g, float& value, float& slope) {
        const float k = 0.7978845608028654f;  // sqrt(2/pi)
        const float t = tanhf(k * (g + 0.044715f * g * g * g));
        value = 0.5f * g * (1.0f + t);
        slope = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * g * g);
    }
    __device__ __forceinline__ static float forward(float g, float u) {
        float value, slope;
        gelu(g, value, slope);
        return value * u;
    }
    __device__ __forceinline__ static void backward(float d, float g, float u, float& dg, float& du) {
        float value, slope;
        gelu(g, value, slope);
        du = d * value;
        dg = d * u * slope;
    }
};

/// h's index of element e of gate and up ([rows, cols] dense): h's rows are `h_stride` apart (the trainer's folded LoRA
/// writes x·Aᵀ into the columns past cols); 32-bit division while the indices fit.
__device__ __forceinline__ long long strided_index(long long e, long long n, int cols, long long h_stride) {
    if (h_stride == cols) return e;
    const long long row = n <= 0xffffffffll ? (long long)((unsigned)e / (unsigned)cols) : e / cols;
    return row * h_stride + (e - row * cols);
}

/// Whether rows of `cols` values `stride` apart keep 8 consecutive elements (from a multiple of 8) in one row, at
/// 16-byte offsets: dense, or both multiples of 8.
__device__ __forceinline__ bool rows_of_8(int cols, long long stride) {
    return stride == cols || ((cols & 7) == 0 && (stride & 7) == 0);
}

template <class Act>
__device__ __forceinline__ void gated_forward(const h16* gate, const h16* up, h16* h, long long n, int cols, long long h_stride,
                                              long long g_stride) {
    const bool vec = aligned16(gate) && aligned16(up) && aligned16(h) && rows_of_8(cols, h_stride) && rows_of_8(cols, g_stride);
    GRID_STRIDE(g8, (n + 7) / 8) {
        const long long e0 = g8 * 8;
        if (vec && e0 + 8 <= n) {
            float g[8], u[8], o[8];
            const long long gi = strided_index(e0, n, cols, g_stride);
            load_h16x8(gate + gi, g);
            load_h16x8(up + gi, u);
#pragma unroll
            for (int k = 0; k < 8; k++) o[k] = Act::forward(g[k], u[k]);
            store_h16x8(h + strided_index(e0, n, cols, h_stride), o);
        } else {
            for (long long e = e0; e < e0 + 8 && e < n; e++) {
                const long long gi = strided_index(e, n, cols, g_stride);
                h[strided_index(e, n, cols, h_stride)] = float_to_h16(Act::forward(h16_to_float(gate[gi]), h16_to_float(up[gi])));
            }
        }
    }
}

template <class Act>
__device__ __forceinline__ void gated_backward(const h16* dh, const h16* gate, const h16* up, h16* dgate, h16* dup, long long n,
                                               int cols, long long g_stride) {
    const bool vec = aligned16(dh) && aligned16(gate) && aligned16(up) && aligned16(dgate) && aligned16(dup) && rows_of_8(cols, g_stride);
    GRID_STRIDE(g8, (n + 7) / 8) {
        const long long e0 = g8 * 8;
        if (vec && e0 + 8 <= n) {
            float d[8], g[8], u[8], dg[8], du[8];
            const long long gi = strided_index(e0, n, cols, g_stride);
            load_h16x8(dh + e0, d);
            load_h16x8(gate + gi, g);
            load_h16x8(up + gi, u);
#pragma unroll
            for (int k = 0; k < 8; k++) Act::backward(d[k], g[k], u[k], dg[k], du[k]);
            store_h16x8(dgate + gi, dg);
            store_h16x8(dup + gi, du);
        } else {
            for (long long e = e0; e < e0 + 8 && e < n; e++) {
                float dg, du;
                const long long gi = strided_index(e, n, cols, g_stride);
                Act::backward(h16_to_float(dh[e]), h16_to_float(gate[gi]), h16_to_float(up[gi]), dg, du);
                dup[gi] = float_to_h16(du);
                dgate[gi] = float_to_h16(dg);
            }
        }
    }
}

extern "C" __global__ void swiglu_forward(const h16* gate, const h16* up, h16* h, long long n, int cols, long long h_stride,
                                          long long g_stride) {
    gated_forward<SiLU>(gate, up, h, n, cols, h_stride, g_stride);
}

extern "C" __global__ void swiglu_backward(const h16* dh, const h16* gate, const h16* up, h16* dgate, h16* dup, long long n, int cols,
                                           long long g_stride) {
    gated_backward<SiLU>(dh, gate, up, dgate, dup, n, cols, g_stride);
}

extern "C" __global__ void geglu_forward(const h16* gate, const h16* up, h16* h, long long n, int cols, long long h_stride,
                                         long long g_stride) {
    gated_forward<GeluTanh>(gate, up, h, n, cols, h_stride, g_stride);
}

extern "C" __global__ void geglu_backward(const h16* dh, const h16* gate, const h16* up, h16* dgate, h16* dup, long long n, int cols,
                                          long long g_stride) {
    gated_backward<GeluTanh>(dh, gate, up, dgate, dup, n, cols, g_stride);
}
