// training.cu: the small kernels a training step needs beside the op families: random initialisation of
// benchmark weights on the GPU, and global-norm gradient clipping without a host round trip.
//
// Random numbers: a counter-based hash (SplitMix64 finaliser of seed + index), so every element is independent
// of the launch shape and the same seed gives the same tensor.
//   fill_random_bytes:   p[i] = low byte of hash(i)              (NF4 codes: uniform over the 16 values)
//   fill_random_bf16:    p[i] = bf16(std * (u1 + u2 + u3 - 1.5) * 2)  (sum of uniforms, std `std`)
//   fill_random_uniform: p[i] = lo + (hi - lo) * u                (fp32, e.g. Kaiming-uniform LoRA A)
// Clipping, as torch.nn.utils.clip_grad_norm_ (norm type 2):
//   sum_squares:     out[0] += sum_i g[i]^2                        (out zeroed before; atomics across blocks)
//   clip_gradients:  total = sqrt(out[0]), coef = min(1, max_norm / (total + 1e-6)); g *= coef
//                    (a non-finite total leaves g unchanged, as the CPU trainer does)
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

extern "C" __global__ void fill_random_bf16(bf16* p, long long n, unsigned long long seed, float std) {
    GRID_STRIDE(i, n) {
        const unsigned long long base = seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(3 * i + 1);
        const float u = uniform01(mix64(base)) + uniform01(mix64(base + 0x9e3779b97f4a7c15ull)) +
                        uniform01(mix64(base + 2 * 0x9e3779b97f4a7c15ull)) - 1.5f;
        p[i] = float_to_bf16(u * 2.0f * std);  // the sum of 3 uniforms has std 1/2
    }
}

extern "C" __global__ void fill_random_uniform(float* p, long long n, unsigned long long seed, float lo, float hi) {
    GRID_STRIDE(i, n) { p[i] = lo + (hi - lo) * uniform01(mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(i + 1))); }
}

extern "C" __global__ void sum_squares(const float* g, long long n, float* out) {
    __shared__ float scratch[32];
    float s = 0.0f;
    GRID_STRIDE(i, n) { s += g[i] * g[i]; }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

extern "C" __global__ void clip_gradients(float* g, long long n, const float* sum_sq, float max_norm) {
    const float total = sqrtf(sum_sq[0]);
    if (!(total < QLORA_INFINITY)) return;  // NaN or inf: leave the gradients alone
    const float coef = fminf(1.0f, max_norm / (total + 1e-6f));
    if (coef >= 1.0f) return;
    GRID_STRIDE(i, n) { g[i] *= coef; }
}
