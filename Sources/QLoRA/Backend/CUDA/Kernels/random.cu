// random.cu: reproducible random fills on the device (benchmarks' random weights, made without a host copy).
// Each output element is a hash (SplitMix64 finaliser) of its index and the seed, so the result does not depend on
// the grid.
#include "qlora_prelude.cuh"

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/// out[i] = uniformly random bytes.
extern "C" __global__ void random_bytes(unsigned char* out, long long n, unsigned long long seed) {
    GRID_STRIDE(i, n) out[i] = (unsigned char)(mix64(seed ^ (unsigned long long)(i * 0x632be59bd9b4e019ll)) >> 24);
}

/// out[i] = bf16(uniform in [lo, hi)).
extern "C" __global__ void random_bf16(h16* out, long long n, float lo, float hi, unsigned long long seed) {
    GRID_STRIDE(i, n) {
        const float u = (float)(mix64(seed ^ (unsigned long long)(i * 0x632be59bd9b4e019ll)) >> 40) * (1.0f / 16777216.0f);
        out[i] = float_to_h16(lo + (hi - lo) * u);
    }
}

/// out[i] = uniform in [lo, hi) (fp32).
extern "C" __global__ void random_f32(float* out, long long n, float lo, float hi, unsigned long long seed) {
    GRID_STRIDE(i, n) {
        const float u = (float)(mix64(seed ^ (unsigned long long)(i * 0x632be59bd9b4e019ll)) >> 40) * (1.0f / 16777216.0f);
        out[i] = lo + (hi - lo) * u;
    }
}
