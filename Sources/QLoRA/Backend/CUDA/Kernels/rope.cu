// rope.cu: rotary position embedding, HF `rotate_half` convention, applied in place.
//
// x: [tokens, heads, head_dim] bf16; positions: [tokens] int; inv_freq: [head_dim/2] float
// (Llama-3 frequency scaling is applied on the host when inv_freq is made). For i < h = head_dim/2:
//     theta = positions[t] * inv_freq[i]
//     forward:   out_i = x_i cos - x_{i+h} sin,   out_{i+h} = x_{i+h} cos + x_i sin
// The rotation is orthogonal, so the backward is the rotation by -theta (its transpose):
//     backward:  dx_i = dy_i cos + dy_{i+h} sin,  dx_{i+h} = dy_{i+h} cos - dy_i sin
// `direction` is +1 for forward and -1 for backward. cos/sin in fp32 with accurate sincosf (positions can be large).
#include "qlora_prelude.cuh"

// One thread per (token, frequency i): cos/sin are computed once and applied to every head.
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
