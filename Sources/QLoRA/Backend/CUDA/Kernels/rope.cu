// rope.cu: rotary position embedding, HF `rotate_half` convention, applied in place.
//
// x: [tokens, heads, head_dim] h16; positions: [tokens] int; inv_freq: [rotary_dim/2] float
// (Llama-3, linear and longrope frequency scaling are applied on the host when inv_freq is made). Only the first
// rotary_dim dimensions of each head rotate (partial rotary, Phi-3/Phi-4: rotary_dim = head_dim × partial_rotary_factor);
// dimensions rotary_dim..<head_dim pass through untouched. For i < h = rotary_dim/2:
//     theta = positions[t] * inv_freq[i],  C = m cos(theta),  S = m sin(theta)
//     forward:   out_i = x_i C - x_{i+h} S,   out_{i+h} = x_{i+h} C + x_i S
// m is longrope's attention factor (1 otherwise): transformers multiplies its cos and sin tables by it, so the forward
// is m·R(theta). Its transpose, the backward, is m·R(-theta):
//     backward:  dx_i = dy_i C + dy_{i+h} S,  dx_{i+h} = dy_{i+h} C - dy_i S
// `direction` is +1 for forward and -1 for backward. cos/sin in fp32 with accurate sincosf (positions can be large);
// the angle is the fp32 product position · inv_freq, as transformers computes it.
#include "qlora_prelude.cuh"

// One thread per (token, frequency i): cos/sin are computed once and applied to every head. Full rotary, m = 1;
// decode launches this one directly with these arguments.
extern "C" __global__ void rope_apply(h16* x, const int* positions, const float* inv_freq, int tokens, int heads,
                                      int head_dim, float direction) {
    const int half = head_dim / 2;
    const long long items = (long long)tokens * half;
    GRID_STRIDE(idx, items) {
        const int i = (int)(idx % half);
        const long long token = idx / half;
        float s, c;
        sincosf((float)positions[token] * inv_freq[i], &s, &c);
        s *= direction;
        h16* p = x + token * heads * head_dim;
        for (int h = 0; h < heads; h++, p += head_dim) {
            const float a = h16_to_float(p[i]), b = h16_to_float(p[i + half]);
            p[i] = float_to_h16(a * c - b * s);
            p[i + half] = float_to_h16(b * c + a * s);
        }
    }
}

/// Rotates the pair (p[i], p[i + half]) by (c, s), the sin already signed by the direction.
__device__ __forceinline__ void rotate_pair(h16* p, int i, int half, float c, float s) {
    const float a = h16_to_float(p[i]), b = h16_to_float(p[i + half]);
    p[i] = float_to_h16(a * c - b * s);
    p[i + half] = float_to_h16(b * c + a * s);
}

// Partial rotary and the attention factor. One thread per (token, two adjacent frequencies i, i+1), looping over the
// heads; the two values at i, i+1 (and at i+h, i+h+1) move as one 32-bit word when h is even (every head then
// starts 4-byte aligned, since head_dim is even), else one thread per frequency.
extern "C" __global__ void rope_apply_partial(h16* x, const int* positions, const float* inv_freq, int tokens, int heads,
                                              int head_dim, int rotary_dim, float direction, float factor) {
    const int half = rotary_dim / 2;
    const bool paired = (half & 1) == 0 && (((unsigned long long)x) & 3ull) == 0;
    const int per_token = paired ? half / 2 : half;
    const long long items = (long long)tokens * per_token;
    GRID_STRIDE(idx, items) {
        const long long token = idx / per_token;
        const int i = (int)(idx % per_token) * (paired ? 2 : 1);
        const float position = (float)positions[token];
        h16* p = x + token * heads * head_dim;
        if (paired) {
            float s0, c0, s1, c1;
            sincosf(position * inv_freq[i], &s0, &c0);
            sincosf(position * inv_freq[i + 1], &s1, &c1);
            c0 *= factor; c1 *= factor;
            s0 *= factor * direction; s1 *= factor * direction;
            for (int h = 0; h < heads; h++, p += head_dim) {
                unsigned int* lo = reinterpret_cast<unsigned int*>(p + i);
                unsigned int* hi = reinterpret_cast<unsigned int*>(p + i + half);
                const unsigned int wa = *lo, wb = *hi;
                const float a0 = h16_low(wa), a1 = h16_high(wa), b0 = h16_low(wb), b1 = h16_high(wb);
                *lo = (unsigned int)float_to_h16(a0 * c0 - b0 * s0) | ((unsigned int)float_to_h16(a1 * c1 - b1 * s1) << 16);
                *hi = (unsigned int)float_to_h16(b0 * c0 + a0 * s0) | ((unsigned int)float_to_h16(b1 * c1 + a1 * s1) << 16);
            }
        } else {
            float s, c;
            sincosf(position * inv_freq[i], &s, &c);
            c *= factor;
            s *= factor * direction;
            for (int h = 0; h < heads; h++, p += head_dim) rotate_pair(p, i, half, c, s);
        }
    }
}
