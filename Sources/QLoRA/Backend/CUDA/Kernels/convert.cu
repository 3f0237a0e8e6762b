// convert.cu: fp32 <-> bf16 conversion (e.g. fp32 LoRA master weights to the bf16 copies the GEMMs read).
// Round to nearest even, as torch's .to(torch.bfloat16) does.
#include "qlora_prelude.cuh"

extern "C" __global__ void convert_f32_to_bf16(const float* in, h16* out, long long n) {
    GRID_STRIDE(i, n) out[i] = float_to_h16(in[i]);
}

extern "C" __global__ void convert_bf16_to_f32(const h16* in, float* out, long long n) {
    GRID_STRIDE(i, n) out[i] = h16_to_float(in[i]);
}
