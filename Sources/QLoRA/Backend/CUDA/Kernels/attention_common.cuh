// attention_common.cuh: steps that the flash backward kernels of attention_mma.cu and attention_wgmma.cu share.
#pragma once

/// Stages the per-query values of a query tile (rows i0.. of head h; thread r < rows stages row r): lse·log2 e (the
/// kernels' exponentials are base 2), δ = rowsum(dO ∘ O), and the query's packed-sequence id; rows past seq get 0.
/// lse_s, delta_s, segq_s point at the tile's stage.
__device__ __forceinline__ void attention_stage_query_rows(float* lse_s, float* delta_s, int* segq_s, const float* lse,
                                                           const float* delta, const int* segments, int rows, int i0,
                                                           int h, long long t0, int seq, int heads) {
    if (threadIdx.x < rows) {
        const int i = i0 + threadIdx.x;
        const bool valid = i < seq;
        lse_s[threadIdx.x] = valid ? lse[(t0 + i) * heads + h] * 1.4426950408889634f : 0.0f;
        delta_s[threadIdx.x] = valid ? delta[(t0 + i) * heads + h] : 0.0f;
        segq_s[threadIdx.x] = (segments && valid) ? segments[t0 + i] : 0;
    }
}
