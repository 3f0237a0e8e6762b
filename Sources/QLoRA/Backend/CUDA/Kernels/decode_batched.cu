// decode_batched.cu: the kernels of batched generation (Backend/CUDA/Inference/CUDABatchedInference.swift): many
// sequences decoded together, the 4-bit weights read once per step for all of them.
//
// Rows. A step feeds M rows; row i is one token of the sequence held in KV-cache slot slots[i], at position
// positions[i] (that sequence's KV length before the token). A decode step has one row per running sequence; a
// prefill step packs all prompt tokens of the sequences it admits (each row with its own slot and position), so
// the same kernels serve both. The rows of one sequence in a step are a run: consecutive rows at consecutive positions.
// KV caches: [slots, capacity, kv_heads * D] h16 per layer, position p at row p mod capacity. A full-attention layer's
// capacity is the sequence's, so that is p; a sliding layer's is min(window, the sequence's), a ring of the last
// `window` positions (no query looks further back).
//
// nf4_gemm_pack_x — X [M, K] h16 (row-major) into the B-fragment order of nf4_gemm_rows, zeros past M (up to a
//   multiple of 8 rows) and past K (up to a multiple of 128): for k-block kb (128 values), n-tile nt (8 rows),
//   piece q (0..3) and lane L = 4g + t, the 16 bytes at uint4 index ((kb * NT + nt) * 4 + q) * 32 + L hold
//   X[8 nt + g][128 kb + 32 t + 8 q ... + 8]; a warp's 32 lanes read 512 contiguous bytes per piece.
//
// nf4_gemm_rows_nN — Y[m, n] (+)= Σ_k X[m, k] W[n, k] for up to 8N rows m, W [rows, K] in NF4 + double quant
//   (bitsandbytes' layout, as in decode.cu: w = NF4[nibble] · absmax, absmax = code8[q] · nested + offset; the
//   high nibble of a packed byte is the first element), on the tensor cores: mma.sync m16n8k16 on h16 with fp32
//   accumulation, W as the A operand (a warp owns 16 weight rows) and Xᵀ as B (an n-tile is 8 rows of X). Each
//   weight is dequantized once in registers (rounded to h16) and used for all rows of X. A dot product does not
//   depend on the order of k, so each lane's fragment slots take the k values it loaded itself: lane (g, t) loads
//   16 packed bytes of weight rows g and g + 8 (values 128 kb + 32 t ... + 32); in k-step j (0..7) its slots
//   (2t, 2t+1 | 2t+8, 2t+9) hold values 128 kb + 32 t + 4 j + (0, 1 | 2, 3), i.e. packed bytes 2j and 2j + 1, and
//   the matching B slots are the 32-bit words 2(j%2) and 2(j%2) + 1 of X piece q = j / 2 (same lane).
//   Several matrices reading the same X run in one launch as tasks (as decode.cu's nf4_gemv). Split-K over
//   gridDim.y: with one split each output is rounded once to h16 (after adding the old value when the task
//   accumulates: the residual stream, or a bias written first); with S splits each split writes fp32 partials
//   [S, M, ldc] (ldc = the tasks' rows together, task t's columns from col0) and nf4_gemm_finish sums them in split
//   order (deterministic: a row's result does not depend on the other rows).
//
// rope_append_rows — per row: [RMS-norms each head of q and k (Qwen3's and Gemma 3's q_norm, k_norm), then] rotates
//   the first rotary_dim dimensions of each head of q and k in the fused row [q | k | v] (HF rotate_half over those
//   dimensions, angle position · inv_freq[i], cos and sin times longrope's attention factor; a row flagged in long_rows
//   takes the second half of inv_freq, longrope's long factors), and writes the rotated k and v into the row's slot at
//   its position (no cache: only rotates). Batch-1 generation uses it too (one row, slot 0). grid (rows, head groups):
//   block y takes heads 4y ... 4y + 3 of q and k (a warp each) and its share of v, so one row spreads over
//   ceil((heads + kv_heads) / 4) blocks (batch-1 decode on one block took 18 µs a layer, its heads one after another).
//
// attention_rows — per (row, head): the row's query attends to keys of its slot up to its position (causal, GQA;
//   only the last `window` of them on a sliding-window layer), softmax(softcap(q·k · scale)) v in fp32 with an online
//   softmax over tiles of 128 keys (no limit on the cache length). scale is head_dim^-½ or query_pre_attn_scalar^-½;
//   softcap (Gemma 2) c·tanh(s / c), none when 0. D 32, 64, 96, 128 or 256. With run_start (a ring layer), the keys
//   and values of the row's own run come from the step's rows (row r − (p − j) holds position j), the earlier ones
//   from the cache: a run longer than one row would otherwise overwrite ring rows its earlier queries still read.
//
// kv_append_rows — after attention on a ring layer: the rotated k and the v of each row among the last `capacity` of
//   its run into its slot (the earlier rows of a long run would land on the same ring rows).
//
// argmax_rows — per row the index of the largest logit, the first on ties (torch.argmax, Sampler.argmax).
//
// gather_rows — dst[i] = src[index[i]] (rows of `cols` h16 values): the last prompt token of each sequence.
//
// add_bias_rows, swiglu_rows, copy_block — a bias into a fused output row, act(g)·u from a fused gate|up row (SwiGLU
//   as swiglu.cu, or GeGLU), and a LoRA B into its block of a group's block-diagonal B.
//
// rmsnorm_rows, embedding_rows, softcap_logits — the family's RMSNorm (x·w or Gemma's x·(1 + w), optionally added to
//   the residual stream: Gemma's sandwich norms), the embedding times Gemma's √hidden, and final-logit soft-capping.
#include "qlora_prelude.cuh"

// Mirrored in Swift (Ops/CUDABatchedDecode.swift, `NF4GemmTask.encode`): 64 bytes, 8-byte aligned.
struct Nf4GemmTask {
    const unsigned char* packed;   // [rows * cols / 2]
    const unsigned char* absmax_q; // [rows * cols / blocksize]
    const float* nested_absmax;
    const float* code;             // 256-entry map of the absmax codes
    h16* out;                     // row m of Y at out + m * out_stride
    float offset;
    int rows;
    int out_stride;
    int col0;                      // this task's first column in the split-K partials
    int first_block;               // first grid block (x) of this task
    int accumulate;                // 1: Y += ..., 0: Y = ...
};

#define GEMM_WARPS 4
#define GEMM_ROWS_PER_BLOCK (GEMM_WARPS * 16)

extern "C" __global__ void nf4_gemm_pack_x(const h16* __restrict__ x, uint4* __restrict__ xp, int m_rows, int cols, int ntiles,
                                           int kblocks) {
    const long long total = (long long)kblocks * ntiles * 4 * 32;
    GRID_STRIDE(idx, total) {
        const int lane = (int)(idx & 31);
        const int q = (int)((idx >> 5) & 3);
        const long long rest = idx >> 7;  // kb * ntiles + nt
        const int nt = (int)(rest % ntiles), kb = (int)(rest / ntiles);
        const int m = nt * 8 + (lane >> 2);
        const int k = kb * 128 + 32 * (lane & 3) + 8 * q;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (m < m_rows && k < cols) v = *reinterpret_cast<const uint4*>(x + (long long)m * cols + k);  // cols % 32 == 0
        xp[idx] = v;
    }
}


__device__ __forceinline__ unsigned pick_u32(uint4 v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }

/// The h16 pair of one packed byte: high nibble first (low half of the register), times the block's absmax.
__device__ __forceinline__ unsigned nf4_byte_pair(unsigned byte, float scale, const float* nf4) {
    const h16 first = float_to_h16(nf4[(byte >> 4) & 15u] * scale), second = float_to_h16(nf4[byte & 15u] * scale);
    return (unsigned)first | ((unsigned)second << 16);
}

template <int NT>
__device__ __forceinline__ void nf4_gemm_rows_impl(const Nf4GemmTask* __restrict__ tasks, int ntasks, const uint4* __restrict__ xp,
                                                   int m_rows, int cols, int blocksize_shift, int nested_shift,
                                                   float* __restrict__ partial, int ldc) {
    __shared__ float code[256], nf4[16];
    int ti = 0;
    while (ti + 1 < ntasks && (int)blockIdx.x >= tasks[ti + 1].first_block) ti++;
    const Nf4GemmTask task = tasks[ti];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = task.code[i];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int row0 = ((int)blockIdx.x - task.first_block) * GEMM_ROWS_PER_BLOCK + warp * 16;
    const int kblocks = (cols + 127) / 128;
    const int splits = gridDim.y, split = blockIdx.y;
    const int per_split = (kblocks + splits - 1) / splits;
    const int kb_begin = min(kblocks, split * per_split), kb_end = min(kblocks, kb_begin + per_split);
    // Rows past the end repeat the last row (loaded, never stored).
    const int ra = min(row0 + g, task.rows - 1), rb = min(row0 + g + 8, task.rows - 1);
    const unsigned char* __restrict__ pa = task.packed + (long long)ra * cols / 2;
    const unsigned char* __restrict__ pb = task.packed + (long long)rb * cols / 2;
    const long long ea = (long long)ra * cols, eb = (long long)rb * cols;

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    if (row0 < task.rows) {
        for (int kb = kb_begin; kb < kb_end; kb++) {
            const int k0 = kb * 128 + 32 * t;  // this lane's first value in the k-block
            uint4 wa = make_uint4(0u, 0u, 0u, 0u), wb = wa;
            float sa = 0.0f, sb = 0.0f;
            if (k0 < cols) {  // cols % 32 == 0: a lane's 32 values are all inside or all outside
                wa = __ldg(reinterpret_cast<const uint4*>(pa + k0 / 2));
                wb = __ldg(reinterpret_cast<const uint4*>(pb + k0 / 2));
                const long long ba = (ea + k0) >> blocksize_shift, bb = (eb + k0) >> blocksize_shift;
                sa = code[__ldg(task.absmax_q + ba)] * __ldg(task.nested_absmax + (ba >> nested_shift)) + task.offset;
                sb = code[__ldg(task.absmax_q + bb)] * __ldg(task.nested_absmax + (bb >> nested_shift)) + task.offset;
            }
            const uint4* xk = xp + (long long)kb * NT * 128 + lane;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                uint4 xv[NT];
#pragma unroll
                for (int n = 0; n < NT; n++) xv[n] = __ldg(xk + (n * 4 + q) * 32);
                const unsigned worda = pick_u32(wa, q), wordb = pick_u32(wb, q);
#pragma unroll
                for (int h = 0; h < 2; h++) {  // k-step j = 2q + h: packed bytes 2j, 2j + 1 = bytes 2h, 2h + 1 of word q
                    unsigned a[4];
                    a[0] = nf4_byte_pair((worda >> (16 * h)) & 0xffu, sa, nf4);
                    a[1] = nf4_byte_pair((wordb >> (16 * h)) & 0xffu, sb, nf4);
                    a[2] = nf4_byte_pair((worda >> (16 * h + 8)) & 0xffu, sa, nf4);
                    a[3] = nf4_byte_pair((wordb >> (16 * h + 8)) & 0xffu, sb, nf4);
#pragma unroll
                    for (int n = 0; n < NT; n++)
                        mma_16816_h16(acc[n], a, h == 0 ? xv[n].x : xv[n].z, h == 0 ? xv[n].y : xv[n].w);
                }
            }
        }
    }
    // c[0], c[1]: weight row g, X rows 2t, 2t + 1 of the n-tile; c[2], c[3]: weight row g + 8.
#pragma unroll
    for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int col = row0 + g + (e >= 2 ? 8 : 0);
            const int m = n * 8 + 2 * t + (e & 1);
            if (col >= task.rows || m >= m_rows) continue;
            if (splits == 1) {
                h16* o = task.out + (long long)m * task.out_stride + col;
                const float old = task.accumulate ? h16_to_float(*o) : 0.0f;
                *o = float_to_h16(old + acc[n][e]);
            } else {
                partial[((long long)split * m_rows + m) * ldc + task.col0 + col] = acc[n][e];
            }
        }
    }
}

#define NF4_GEMM_ROWS(NT)                                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMM_WARPS * 32)                                                       \
    nf4_gemm_rows_n##NT(const Nf4GemmTask* __restrict__ tasks, int ntasks, const uint4* __restrict__ xp, int m_rows,     \
                        int cols, int blocksize_shift, int nested_shift, float* __restrict__ partial, int ldc) {       \
        nf4_gemm_rows_impl<NT>(tasks, ntasks, xp, m_rows, cols, blocksize_shift, nested_shift, partial, ldc);          \
    }
NF4_GEMM_ROWS(1)
NF4_GEMM_ROWS(2)
NF4_GEMM_ROWS(3)
NF4_GEMM_ROWS(4)
NF4_GEMM_ROWS(5)
NF4_GEMM_ROWS(6)
NF4_GEMM_ROWS(7)
NF4_GEMM_ROWS(8)

/// Y[m, n] (+)= Σ_s partial[s, m, col0 + n] for the tasks of one nf4_gemm_rows launch with `splits` splits.
extern "C" __global__ void nf4_gemm_finish(const Nf4GemmTask* __restrict__ tasks, int ntasks, const float* __restrict__ partial,
                                           int m_rows, int ldc, int splits) {
    GRID_STRIDE(idx, (long long)m_rows * ldc) {
        const int m = (int)(idx / ldc), c = (int)(idx % ldc);
        int ti = 0;
        while (ti + 1 < ntasks && c >= tasks[ti + 1].col0) ti++;
        float s = 0.0f;
        for (int k = 0; k < splits; k++) s += partial[((long long)k * m_rows + m) * ldc + c];
        h16* o = tasks[ti].out + (long long)m * tasks[ti].out_stride + (c - tasks[ti].col0);
        if (tasks[ti].accumulate) s = h16_to_float(*o) + s;
        *o = float_to_h16(s);
    }
}

/// Per row (grid (rows, ceil((heads + kv_heads) / 4)), 128 threads: a warp per head): the heads of q and k in the
/// fused row qkv[r] = [q | k | v] are [RMS-normed per head: q_norm, k_norm; nullable] then rotated (the first rotary_dim dimensions, pairs (i, i +
/// rotary_dim / 2), angle position · inv_freq[i], or inv_freq[rotary_dim / 2 + i] when long_rows[r] is set (nullable),
/// cos and sin times rope_scale), in place; the rotated k and the v go into the row's slot (slots null: slot 0) at
/// row position mod capacity, unless kcache is null. The norm rounds as the family's RMSNorm (norm_offset 0:
/// bf16(bf16(x·r)·w), else bf16(x·r·(w + offset))) before the rotation, which rounds once.
extern "C" __global__ void __launch_bounds__(128)
rope_append_rows(h16* qkv, int q_stride, h16* kcache, h16* vcache, const int* __restrict__ slots,
                 const int* __restrict__ positions, const float* __restrict__ inv_freq, int rows, int capacity, int heads,
                 int kv_heads, int head_dim, int rotary_dim, float rope_scale, const h16* __restrict__ q_norm,
                 const h16* __restrict__ k_norm, float norm_offset, float eps, const int* __restrict__ long_rows) {
    __shared__ float buf[4][256];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pos = positions[r];
    const int kv_dim = kv_heads * head_dim;
    h16* row = qkv + (long long)r * q_stride;
    const long long cache_row = ((long long)(slots != nullptr ? slots[r] : 0) * capacity + pos % capacity) * kv_dim;
    const int half = rotary_dim / 2;
    if (long_rows != nullptr && long_rows[r] != 0) inv_freq += half;
    float* b = buf[warp];
    for (int h = blockIdx.y * 4 + warp; h < heads + kv_heads; h += 4 * gridDim.y) {
        h16* p = row + h * head_dim;
        const h16* w = h < heads ? q_norm : k_norm;
        float ss = 0.0f;
        for (int d = lane; d < head_dim; d += 32) {
            const float v = h16_to_float(p[d]);
            b[d] = v;
            ss += v * v;
        }
        if (w != nullptr) {
            const float inv = rsqrtf(warp_sum(ss) / head_dim + eps);
            for (int d = lane; d < head_dim; d += 32) {
                const float g = h16_to_float(w[d]);
                b[d] = norm_offset != 0.0f ? round_h16(b[d] * inv * (g + norm_offset)) : round_h16(round_h16(b[d] * inv) * g);
            }
        }
        __syncwarp();
        for (int d = lane; d < head_dim; d += 32) {
            float v = b[d];
            if (d < rotary_dim) {
                const int i = d < half ? d : d - half;
                float sn, cs;
                sincosf((float)pos * inv_freq[i], &sn, &cs);
                v = d < half ? b[d] * (cs * rope_scale) - b[d + half] * (sn * rope_scale)
                             : b[d] * (cs * rope_scale) + b[d - half] * (sn * rope_scale);
            }
            const h16 o = float_to_h16(v);
            p[d] = o;
            if (h >= heads && kcache != nullptr) kcache[cache_row + (h - heads) * head_dim + d] = o;
        }
        __syncwarp();  // b is rewritten by the next head
    }
    if (kcache == nullptr) return;
    for (int e = blockIdx.y * blockDim.x + threadIdx.x; e < kv_dim; e += blockDim.x * gridDim.y)
        vcache[cache_row + e] = row[(heads + kv_heads) * head_dim + e];
}

/// Per row (grid rows, 128 threads): when the row is among the last `capacity` of its run (its rows end before row
/// run_end[r]), its rotated k and its v (fused row [q | k | v], stride q_stride) go into its slot at row position mod
/// capacity. The ring layers' append, after their attention read the run's keys from the rows.
extern "C" __global__ void __launch_bounds__(128)
kv_append_rows(const h16* __restrict__ qkv, int q_stride, h16* kcache, h16* vcache, const int* __restrict__ slots,
               const int* __restrict__ positions, const int* __restrict__ run_end, int rows, int capacity, int heads,
               int kv_heads, int head_dim) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int pos = positions[r];
    if (run_end[r] - r > capacity) return;  // a later row of the run takes this ring row
    const int kv_dim = kv_heads * head_dim;
    const h16* k = qkv + (long long)r * q_stride + heads * head_dim;
    const long long cache_row = ((long long)(slots != nullptr ? slots[r] : 0) * capacity + pos % capacity) * kv_dim;
    for (int e = threadIdx.x; e < kv_dim; e += blockDim.x) {
        kcache[cache_row + e] = k[e];
        vcache[cache_row + e] = k[kv_dim + e];
    }
}

#define ATT_THREADS 128

__device__ __forceinline__ float block_max128(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = fmaxf(fmaxf(scratch[0], scratch[1]), fmaxf(scratch[2], scratch[3]));
    __syncthreads();
    return v;
}

/// grid (rows, heads), 128 threads. q: row r at qkv + r * q_stride (head h at h * D); out: [rows, heads * D].
/// slots null: slot 0. Scores s = q·k · scale, then softcap · tanh(s / softcap) when softcap > 0; with window > 0 the
/// row at position p sees keys p − window < j ≤ p only. Key j is at cache row j mod capacity, or, with run_start
/// (nullable) and j at or after the position of row run_start[r] (the first of r's run), in the k and v of row r − (p − j).
template <int D>
__device__ void attention_rows_impl(const h16* __restrict__ qkv, int q_stride, const h16* __restrict__ kcache,
                                    const h16* __restrict__ vcache, h16* __restrict__ out, const int* __restrict__ slots,
                                    const int* __restrict__ positions, int capacity, int heads, int kv_heads, float scale,
                                    float softcap, int window, const int* __restrict__ run_start) {
    __shared__ float qs[D], scores[ATT_THREADS], red[64], combine[ATT_THREADS / 32][D];
    const int r = blockIdx.x, h = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int keys = positions[r] + 1;
    const int first = window > 0 ? max(0, keys - window) : 0;
    const int kvh = h / (heads / kv_heads);
    const int kv_dim = kv_heads * D;
    const long long base = (long long)(slots != nullptr ? slots[r] : 0) * capacity * kv_dim + kvh * D;
    // Positions from `in_rows` on are the run's own rows.
    const int in_rows = run_start != nullptr ? positions[run_start[r]] : keys;
    // Key j's k and v: in its step row [q | k | v], or in the cache.
    auto k_at = [&](int j) -> const h16* {
        return j >= in_rows ? qkv + (long long)(r - (keys - 1 - j)) * q_stride + heads * D + kvh * D
                            : kcache + base + (long long)(j % capacity) * kv_dim;
    };
    auto v_at = [&](int j) -> const h16* {
        return j >= in_rows ? qkv + (long long)(r - (keys - 1 - j)) * q_stride + heads * D + kv_dim + kvh * D
                            : vcache + base + (long long)(j % capacity) * kv_dim;
    };
    const h16* qrow = qkv + (long long)r * q_stride + h * D;
    for (int d = tid; d < D; d += ATT_THREADS) qs[d] = h16_to_float(qrow[d]) * scale;
    __syncthreads();
    constexpr int PER = D / 32;  // dimensions per lane in o
    float acc[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) acc[e] = 0.0f;
    float m_run = -QLORA_INFINITY, l_run = 0.0f;
    for (int j0 = first; j0 < keys; j0 += ATT_THREADS) {
        const int n = min(ATT_THREADS, keys - j0);
        float s = -QLORA_INFINITY;
        if (tid < n) {
            const h16* kr = k_at(j0 + tid);
            s = 0.0f;
#pragma unroll
            for (int d = 0; d < D; d += 8) {
                float kf[8];
                load_h16x8(kr + d, kf);
#pragma unroll
                for (int e = 0; e < 8; e++) s += qs[d + e] * kf[e];
            }
            if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
        }
        const float m_new = fmaxf(m_run, block_max128(s, red));
        const float alpha = __expf(m_run - m_new);  // 0 on the first tile (m_run = -inf)
        const float p = tid < n ? __expf(s - m_new) : 0.0f;
        scores[tid] = p;
        l_run = l_run * alpha + block_sum(p, red + 32);  // its barriers also publish scores[]
#pragma unroll
        for (int e = 0; e < PER; e++) acc[e] *= alpha;
        for (int j = warp; j < n; j += ATT_THREADS / 32) {
            const float pj = scores[j];
            const h16* vr = v_at(j0 + j) + lane * PER;
#pragma unroll
            for (int e = 0; e < PER; e++) acc[e] += pj * h16_to_float(vr[e]);
        }
        m_run = m_new;
        __syncthreads();  // scores[] is rewritten by the next tile
    }
#pragma unroll
    for (int e = 0; e < PER; e++) combine[warp][lane * PER + e] = acc[e];
    __syncthreads();
    for (int d = tid; d < D; d += ATT_THREADS) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_THREADS / 32; w++) o += combine[w][d];
        out[((long long)r * heads + h) * D + d] = float_to_h16(o / l_run);
    }
}

#define ATTENTION_ROWS(D)                                                                                               \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                           \
    attention_rows_d##D(const h16* qkv, int q_stride, const h16* kcache, const h16* vcache, h16* out, const int* slots, \
                        const int* positions, int capacity, int heads, int kv_heads, float scale, float softcap,        \
                        int window, const int* run_start) {                                                             \
        attention_rows_impl<D>(qkv, q_stride, kcache, vcache, out, slots, positions, capacity, heads, kv_heads, scale,  \
                               softcap, window, run_start);                                                             \
    }
ATTENTION_ROWS(32)
ATTENTION_ROWS(64)
ATTENTION_ROWS(96)
ATTENTION_ROWS(128)
ATTENTION_ROWS(256)

/// out[r] = the first index of the largest of logits[r, 0..vocab). grid rows, 256 threads.
extern "C" __global__ void __launch_bounds__(256) argmax_rows(const float* __restrict__ logits, int* __restrict__ out, int vocab) {
    __shared__ float best_v[8];
    __shared__ int best_i[8];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float v = -QLORA_INFINITY;
    int index = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = row[i];
        if (x > v) { v = x; index = i; }  // strided: the first maximum of this thread's indices
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, index, o);
        if (ov > v || (ov == v && oi < index)) { v = ov; index = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { best_v[warp] = v; best_i[warp] = index; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (best_v[w] > v || (best_v[w] == v && best_i[w] < index)) { v = best_v[w]; index = best_i[w]; }
        out[blockIdx.x] = index == 0x7fffffff ? 0 : index;  // all NaN or -inf: 0, as Sampler.argmax
    }
}

/// dst[i, :] = src[index[i], :] for `rows` rows of `cols` h16 values.
extern "C" __global__ void gather_rows(const h16* __restrict__ src, h16* __restrict__ dst, const int* __restrict__ index, int rows,
                                       int cols) {
    GRID_STRIDE(e, (long long)rows * cols) {
        const long long i = e / cols, c = e % cols;
        dst[e] = src[(long long)index[i] * cols + c];
    }
}

/// y[r * stride + c] = (overwrite ? 0 : y[...]) + bias[c] (bias null: + 0) for `rows` rows of `cols` values: a
/// linear's bias in a fused output row (q|k|v, gate|up) before the product adds onto it.
extern "C" __global__ void add_bias_rows(h16* y, int stride, const h16* __restrict__ bias, int rows, int cols, int overwrite) {
    GRID_STRIDE(e, (long long)rows * cols) {
        const long long r = e / cols, c = e % cols;
        h16* p = y + r * stride + c;
        const float b = bias != nullptr ? h16_to_float(bias[c]) : 0.0f;
        *p = float_to_h16((overwrite ? 0.0f : h16_to_float(*p)) + b);
    }
}

/// h[r, i] = act(g) · u with g = gu[r, i], u = gu[r, inter + i] (the fused gate|up row): act silu (activation 0, as
/// swiglu.cu's forward) or GELU's tanh approximation (1, the prelude's gated_activation), rounded once.
extern "C" __global__ void swiglu_rows(const h16* __restrict__ gu, h16* __restrict__ h, int rows, int inter, int activation) {
    GRID_STRIDE(e, (long long)rows * inter) {
        const long long r = e / inter, i = e % inter;
        const float g = h16_to_float(gu[r * 2 * inter + i]), u = h16_to_float(gu[r * 2 * inter + inter + i]);
        h[e] = float_to_h16(gated_activation(g, activation) * u);
    }
}

/// Per row (grid rows, 256 threads): n = RMSNorm(x)·w as the family rounds it (offset 0: bf16(bf16(x·r)·w), Llama's;
/// else bf16(x·r·(w + offset)), Gemma's (1 + w) in fp32); out = n, or out = bf16(out + n) with `add` (Gemma's norms on
/// the attention and MLP outputs, added to the residual stream). x and out may be the same rows when add is 0.
extern "C" __global__ void __launch_bounds__(256)
rmsnorm_rows(const h16* x, const h16* __restrict__ w, h16* out, int dim, float eps, float offset, int add) {
    __shared__ float scratch[32];
    const h16* xr = x + (long long)blockIdx.x * dim;
    h16* o = out + (long long)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = h16_to_float(xr[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = h16_to_float(xr[i]), g = h16_to_float(w[i]);
        const float n = offset != 0.0f ? round_h16(v * inv * (g + offset)) : round_h16(round_h16(v * inv) * g);
        o[i] = float_to_h16(add ? h16_to_float(o[i]) + n : n);
    }
}

/// out[t] = table[ids[t]] · scale (grid tokens): the embedding, scaled by Gemma's √hidden (already rounded to h16 by
/// the caller, as transformers' normalizer tensor) and rounded once; scale 1 copies. ids are checked by the caller.
extern "C" __global__ void embedding_rows(const int* __restrict__ ids, const h16* __restrict__ table, h16* __restrict__ out, int dim,
                                          float scale) {
    const h16* row = table + (long long)ids[blockIdx.x] * dim;
    h16* o = out + (long long)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = scale == 1.0f ? row[i] : float_to_h16(h16_to_float(row[i]) * scale);
}

/// logits = cap · tanh(logits / cap) (fp32, n values): final-logit soft-capping.
extern "C" __global__ void softcap_logits(float* logits, long long n, float cap) {
    GRID_STRIDE(e, n) logits[e] = cap * tanhf(logits[e] / cap);
}

/// dst[r * dst_stride + dst_col + c] = src[r * src_stride + c] for `rows` rows of `cols` values (a LoRA B into its
/// block of the group's block-diagonal B; a matrix's output into its columns of a fused row, or q out of one).
extern "C" __global__ void copy_block(const h16* __restrict__ src, h16* __restrict__ dst, int rows, int cols, int dst_stride,
                                      int dst_col, int src_stride) {
    GRID_STRIDE(e, (long long)rows * cols) {
        const long long r = e / cols, c = e % cols;
        dst[r * dst_stride + dst_col + c] = src[r * src_stride + c];
    }
}
