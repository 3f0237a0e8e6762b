// decode.cu: the kernels of batch-1 generation with a KV cache (see Backend/CUDA/Inference/CUDAInference.swift).
//
// nf4_gemv — y = W x (+ s·B·xa) (+ residual) reading the 4-bit weight directly (dequantize in registers).
//   W [rows, cols] NF4 in bitsandbytes' layout: packed[e/2] holds elements e (high nibble) and e+1 (low) of the
//   row-major flatten; element e has scale absmax[b], b = e / blocksize, with double quantization
//       absmax[b] = code8[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset
//   so w[e] = NF4[nibble(e)] * absmax[b]. One launch runs up to 4 matrices that read the same x (q, k, v or
//   gate, up): each is a task (struct Nf4GemvTask below, an array in device memory), and the blocks of the grid
//   are dealt out to the tasks in order. Each warp owns 4 rows; lane l of a warp reads 16 packed bytes
//   (32 elements, inside one absmax block since cols and blocksize are multiples of 32) of each row per step,
//   so a warp has 4 independent 16-byte loads in flight and reads x once for 4 rows. x sits in shared memory
//   as bf16, read with a per-lane rotation of its four 16-byte pieces so the 8 lanes of a shared-memory
//   phase hit different banks. Products and sums in fp32; the LoRA term (B [rows, rank] bf16, xa [rank] fp32,
//   from bf16_gemv) and the residual are added before the one bf16 rounding of y.
//
// nf4_gemv_mma — the same product and tasks (16 rows per block), with the dequantization two codes per shared-memory
//   load and the dot products on the tensor cores (mma.sync m16n8k16, fp32 accumulation). nf4_gemv spends ~5
//   instructions per element (nibble extract, table load, FMA); this one ~1.5 per element, so it can stream at the
//   memory's speed.
//   Lookup: a packed byte v holds two consecutive elements, and entry v of a 256-entry table is the h16 pair
//   (NF4[v >> 4], NF4[v & 15]): one load dequantizes both, straight into an mma A register (low half = first k).
//   The table is replicated 32 times so that lane l always reads bank l (no conflicts whatever the codes): entry v of
//   lane l sits at byte 256 v + 4 l, an address one byte_perm forms from the packed word (64 KiB per block; the upper
//   half of each 256-byte row is unused).
//   Fragments: a warp owns 16 rows (mma M) over 1/8 of the columns. Lane (g, t) = (lane / 4, lane % 4) loads 8 packed
//   bytes of rows g and g + 8 per 64-value group kb (values 64 kb + 16 t ... + 16); k-step s (0..3) of the group puts
//   bytes 2s, 2s + 1 in its A slots (k 2t, 2t + 1 | 2t + 8, 2t + 9) and the x values 64 kb + 16 t + 4s + (0, 1 | 2, 3)
//   in its B slots. A dot product does not depend on the order of k, so this is W x.
//   Scales: the absmax multiplies a group's fp32 partial sum, not each element. Groups run in cycles of 4; group i of a
//   cycle accumulates only into mma columns 2i, 2i + 1 (lanes g = 2i, 2i + 1 give x as their B operand in its steps,
//   every other lane gives zeros), so after the cycle column 2t holds group t's sums: lane (g, t) scales c[0] (row g)
//   and c[2] (row g + 8) by that group's absmax and adds them to its fp32 accumulators; the 4 lanes of a row and the 8
//   warps are summed at the end, then the LoRA term and the residual as nf4_gemv. Products are exact in the mma;
//   the only rounding beyond nf4_gemv's is the NF4 values' own to h16 (bf16: at most 0.31% for code 2, fp16: none
//   above 2^-11), as bitsandbytes' kernels round their dequantized weights.
//   Needs cols % 64 == 0, a blocksize of at least 64 (a power of two) and, for bf16, sm_80 (Turing runs fp16).
//
// bf16_gemv — out[r] = scale * W[r, :] · x for bf16 W [rows, cols] and bf16 x, fp32 out (the LoRA A
//   projections stacked into one matrix, and the output head).
//
// (RoPE with the KV-cache append of a decode step is decode_batched.cu's rope_append_rows with one row, its position
// read from device memory, so a captured graph can replay.)
//
// attention_cached — queries [t, heads, D] at positions start + i attend to the keys of positions 0 ... start + i
//   (causal, GQA; only the last `window` on a sliding-window layer), position j at cache row j mod ring (a sliding
//   layer's cache is a ring of its window's rows; ring = capacity elsewhere): scores q·k · scale (one thread per key),
//   soft-capped c·tanh(s / c) when softcap > 0 (Gemma 2), softmax, then o = Σ p_j v_j (warps split the keys, lanes
//   own dimensions), fp32 throughout, bf16 out. `start` is read from device memory when start_ptr is not null.
//   D 32, 64, 96, 128 or 256.
#include "qlora_prelude.cuh"

// Mirrored in Swift (CUDAInference.swift, `NF4GemvTask.bytes`): 88 bytes, 8-byte aligned.
struct Nf4GemvTask {
    const unsigned char* packed;
    const unsigned char* absmax_q;
    const float* nested_absmax;
    const float* code;        // 256-entry map of the absmax codes
    const h16* lora_b;       // [rows, rank] or null
    const float* xa;          // [rank] (already includes nothing else; scaled here by lora_scale)
    h16* out;                // [rows]
    const h16* residual;     // null, or added to y (may be `out`)
    float offset;
    float lora_scale;
    int rows;
    int rank;
    int first_block;          // first grid block of this task
    int pad;
};

#define GEMV_WARPS 4
#define GEMV_ROWS 4  // rows per warp

__device__ __forceinline__ unsigned int pick_word(uint4 v, int k) {
    return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

/// The absmax of chunk c (32 elements, inside one absmax block) of each of a warp's rows: code8[q] · nested + offset.
__device__ __forceinline__ void nf4_chunk_scales(float* scale, const long long* e0, int c, const unsigned char* __restrict__ absmax_q,
                                                 const float* __restrict__ nested, const float* code, float offset,
                                                 int blocksize_shift, int nested_shift) {
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        const long long b = (e0[r] + (long long)c * 32) >> blocksize_shift;  // blocksizes are powers of two
        scale[r] = code[__ldg(absmax_q + b)] * __ldg(nested + (b >> nested_shift)) + offset;
    }
}

/// part[r] += NF4 values of word k of w[r] (8 elements, 4 packed bytes) · the 8 bf16 x values in xv.
__device__ __forceinline__ void nf4_piece_dot(float* part, const uint4* w, uint4 xv, int k, const float* nf4) {
    float xf[8];
    xf[0] = h16_low(xv.x); xf[1] = h16_high(xv.x);
    xf[2] = h16_low(xv.y); xf[3] = h16_high(xv.y);
    xf[4] = h16_low(xv.z); xf[5] = h16_high(xv.z);
    xf[6] = h16_low(xv.w); xf[7] = h16_high(xv.w);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        const unsigned int word = pick_word(w[r], k);
        float s = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; q++) {  // byte q of the word: elements 2q (high nibble), 2q+1 (low)
            s += nf4[(word >> (8 * q + 4)) & 15u] * xf[2 * q] + nf4[(word >> (8 * q)) & 15u] * xf[2 * q + 1];
        }
        part[r] += s;
    }
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 4)
nf4_gemv(const Nf4GemvTask* __restrict__ tasks, int ntasks, const h16* __restrict__ x, int cols, int blocksize_shift,
         int nested_shift) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    h16* sx = reinterpret_cast<h16*>(smem_raw);  // cols values
    __shared__ float code[256], nf4[16];
    int ti = 0;
    while (ti + 1 < ntasks && (int)blockIdx.x >= tasks[ti + 1].first_block) ti++;
    const Nf4GemvTask task = tasks[ti];  // a copy in registers
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = task.code[i];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    {
        const uint4* src = reinterpret_cast<const uint4*>(x);
        uint4* dst = reinterpret_cast<uint4*>(sx);
        for (int i = threadIdx.x; i < cols / 8; i += blockDim.x) dst[i] = src[i];
    }
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = ((int)blockIdx.x - task.first_block) * (GEMV_WARPS * GEMV_ROWS) + warp * GEMV_ROWS;
    if (row0 >= task.rows) return;
    const int chunks = cols / 32;  // 32 elements = 16 packed bytes
    const float offset = task.offset;
    const unsigned char* __restrict__ absmax_q = task.absmax_q;
    const float* __restrict__ nested = task.nested_absmax;
    float acc[GEMV_ROWS];
    const uint4* prow[GEMV_ROWS];
    long long e0[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        acc[r] = 0.0f;
        const int row = min(row0 + r, task.rows - 1);  // rows past the end repeat the last (not stored)
        e0[r] = (long long)row * cols;
        prow[r] = reinterpret_cast<const uint4*>(task.packed + e0[r] / 2);
    }
    const int rot = (lane >> 1) & 3;
    // Software pipelining: the next chunk's packed bytes are loaded while this chunk is computed.
    uint4 next[GEMV_ROWS];
    if (lane < chunks) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) next[r] = __ldg(prow[r] + lane);
    }
    for (int c = lane; c < chunks; c += 32) {
        uint4 w[GEMV_ROWS];
        float scale[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) w[r] = next[r];
        if (c + 32 < chunks) {
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) next[r] = __ldg(prow[r] + c + 32);
        }
        nf4_chunk_scales(scale, e0, c, absmax_q, nested, code, offset, blocksize_shift, nested_shift);
        const uint4* xs = reinterpret_cast<const uint4*>(sx + c * 32);
        float part[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) part[r] = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int k = (j + rot) & 3;  // which 16-byte piece (8 elements, 4 packed bytes)
            nf4_piece_dot(part, w, xs[k], k, nf4);
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] += part[r] * scale[r];
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        const int row = row0 + r;
        float v = acc[r];
        if (task.lora_b != nullptr && lane < task.rank && row < task.rows)
            v += task.lora_scale * h16_to_float(task.lora_b[(long long)row * task.rank + lane]) * task.xa[lane];
        v = warp_sum(v);
        if (lane == 0 && row < task.rows) {
            if (task.residual != nullptr) v += h16_to_float(task.residual[row]);
            task.out[row] = float_to_h16(v);
        }
    }
}

/// out[r] = scale * W[r, :] · x; W [rows, cols] bf16 (cols a multiple of 8), x bf16, out fp32. 4 rows per warp.
extern "C" __global__ void __launch_bounds__(128, 8)
bf16_gemv(const h16* __restrict__ w, const h16* __restrict__ x, float* __restrict__ out, int rows, int cols, float scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * 4 + warp) * 4;
    if (row0 >= rows) return;
    const int chunks = cols / 8;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        float xf[8];
        load_h16x8(x + c * 8, xf);
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int row = min(row0 + r, rows - 1);
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(w + (long long)row * cols) + c);
            const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; k++)
                acc[r] += h16_low(words[k]) * xf[2 * k] + h16_high(words[k]) * xf[2 * k + 1];
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < rows) out[row0 + r] = v * scale;
    }
}

/// grid (t, heads), 256 threads; dynamic shared memory: (max keys + 8 * D + D + 64) floats.
/// q: row i at q + i * q_stride; kcache, vcache: [ring, kv_heads, D]; out: [t, heads, D].
template <int D>
__device__ void attention_cached_impl(const h16* __restrict__ q, int q_stride, const h16* __restrict__ kcache,
                                      const h16* __restrict__ vcache, h16* __restrict__ out, const int* start_ptr,
                                      int start_value, int heads, int kv_heads, float scale, float softcap, int window,
                                      int ring) {
    extern __shared__ __align__(16) float smem[];
    const int i = blockIdx.x, h = blockIdx.y;
    const int start = start_ptr != nullptr ? *start_ptr : start_value;
    // Keys of positions first ..< first + keys: the causal prefix, or its last `window`; key j at row (first + j) mod ring.
    const int end = start + i + 1;
    const int first = window > 0 ? max(0, end - window) : 0;
    const int keys = end - first;
    const int first_row = first % ring;
    const int kvh = h / (heads / kv_heads);
    const int kv_dim = kv_heads * D;
    float* qs = smem;               // D
    float* combine = qs + D;        // 8 * D
    float* red = combine + 8 * D;   // 64
    float* scores = red + 64;       // keys
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const h16* qrow = q + (long long)i * q_stride + h * D;
    for (int d = tid; d < D; d += blockDim.x) qs[d] = h16_to_float(qrow[d]) * scale;
    __syncthreads();
    // Scores, one thread per key.
    float local_max = -QLORA_INFINITY;
    for (int j = tid; j < keys; j += blockDim.x) {
        const int row = first_row + j < ring ? first_row + j : first_row + j - ring;
        const h16* kr = kcache + (long long)row * kv_dim + kvh * D;
        float s = 0.0f;
#pragma unroll  // all of the key's 16-byte loads in flight at once
        for (int d = 0; d < D; d += 8) {
            float kf[8];
            load_h16x8(kr + d, kf);
#pragma unroll
            for (int e = 0; e < 8; e++) s += qs[d + e] * kf[e];
        }
        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
        scores[j] = s;
        local_max = fmaxf(local_max, s);
    }
    // Block max.
    local_max = warp_max(local_max);
    if (lane == 0) red[warp] = local_max;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float local_sum = 0.0f;
    for (int j = tid; j < keys; j += blockDim.x) {
        const float p = __expf(scores[j] - m);
        scores[j] = p;
        local_sum += p;
    }
    const float total = block_sum(local_sum, red + 32);
    // o = Σ p_j v_j: warp w takes keys w, w + 8, ...; lane owns D/32 dimensions.
    constexpr int PER = D / 32;
    float acc[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) acc[e] = 0.0f;
    const int warps = blockDim.x >> 5;
#pragma unroll 8
    for (int j = warp; j < keys; j += warps) {
        const float p = scores[j];
        const int row = first_row + j < ring ? first_row + j : first_row + j - ring;
        const h16* vr = vcache + (long long)row * kv_dim + kvh * D + lane * PER;
#pragma unroll
        for (int e = 0; e < PER; e++) acc[e] += p * h16_to_float(vr[e]);
    }
#pragma unroll
    for (int e = 0; e < PER; e++) combine[warp * D + lane * PER + e] = acc[e];
    __syncthreads();
    for (int d = tid; d < D; d += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < warps; w++) s += combine[w * D + d];
        out[((long long)i * heads + h) * D + d] = float_to_h16(s / total);
    }
}

#define ATTENTION_CACHED(D)                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                                   \
    attention_cached_d##D(const h16* q, int q_stride, const h16* kcache, const h16* vcache, h16* out, const int* start_ptr, \
                          int start_value, int heads, int kv_heads, float scale, float softcap, int window, int ring) { \
        attention_cached_impl<D>(q, q_stride, kcache, vcache, out, start_ptr, start_value, heads, kv_heads, scale,      \
                                 softcap, window, ring);                                                                \
    }
ATTENTION_CACHED(32)
ATTENTION_CACHED(64)
ATTENTION_CACHED(96)
ATTENTION_CACHED(128)
ATTENTION_CACHED(256)

/// y = x + a (bf16, n elements): the residual add of the prefill path.
extern "C" __global__ void add_bf16(h16* y, const h16* a, long long n) {
    GRID_STRIDE(e, n) y[e] = float_to_h16(h16_to_float(y[e]) + h16_to_float(a[e]));
}

/// The LoRA A projections of one group, with the op that makes their input fused in (one launch instead of two):
///   mode 0: in = x                                  (x: [cols] bf16)
///   mode 1: in = RMSNorm(x) * norm_w  (as rmsnorm.cu: bf16(bf16(x r) w); with norm_offset ≠ 0 Gemma's
///                                      bf16(x r (w + offset)))
///   mode 2: in = act(x) * x2          (as swiglu.cu: gate x, up x2; act silu, or GELU-tanh when activation is 1)
/// Block 0 writes `in` to in_out (bf16) when in_out is not null; block b < rows writes
/// xa[b] = A[b, :] · in (fp32). grid max(rows, 1), any multiple of 32 threads up to 1024 (the launcher gives about 2
/// groups of 8 values per thread). Each thread keeps its own values of in, so no shared copy is needed; the loads of
/// its first LORA_A_REG_GROUPS groups (x, the norm weight or x2, and its A row) all go out at the start, since none
/// depends on another, and only groups beyond those (cols > 8 · 2 · threads) are loaded in the loops.
#define LORA_A_REG_GROUPS 2
__device__ __forceinline__ void lora_a_input(float* f, const float* g, int mode, float r, float norm_offset, int activation) {
#pragma unroll
    for (int k = 0; k < 8; k++) {
        if (mode == 1) f[k] = norm_offset != 0.0f ? f[k] * r * (g[k] + norm_offset) : round_h16(f[k] * r) * g[k];
        else if (mode == 2) f[k] = gated_activation(f[k], activation) * g[k];
    }
}

extern "C" __global__ void __launch_bounds__(1024)
lora_a_rows(const h16* __restrict__ a, const h16* __restrict__ x, const h16* __restrict__ x2,
            const h16* __restrict__ norm_w, h16* __restrict__ in_out, float* __restrict__ xa, int rows, int cols,
            int mode, float eps, float norm_offset, int activation) {
    __shared__ float scratch[64];
    const int tid = threadIdx.x, threads = blockDim.x;
    const int groups = cols / 8;  // cols is a multiple of 8
    const bool has_row = (int)blockIdx.x < rows;
    const h16* ar = a + (long long)blockIdx.x * cols;
    const h16* second = mode == 1 ? norm_w : x2;
    float f[LORA_A_REG_GROUPS][8], g[LORA_A_REG_GROUPS][8], w[LORA_A_REG_GROUPS][8];
#pragma unroll
    for (int k = 0; k < LORA_A_REG_GROUPS; k++) {
        const int i = tid + k * threads;
        if (i < groups) {
            load_h16x8(x + i * 8, f[k]);
            if (mode != 0) load_h16x8(second + i * 8, g[k]);
            if (has_row) load_h16x8(ar + i * 8, w[k]);
        }
    }
    float r = 1.0f;
    if (mode == 1) {
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < LORA_A_REG_GROUPS; k++) {
            if (tid + k * threads < groups) {
#pragma unroll
                for (int e = 0; e < 8; e++) ss += f[k][e] * f[k][e];
            }
        }
        for (int i = tid + LORA_A_REG_GROUPS * threads; i < groups; i += threads) {
            float h[8];
            load_h16x8(x + i * 8, h);
#pragma unroll
            for (int e = 0; e < 8; e++) ss += h[e] * h[e];
        }
        ss = block_sum(ss, scratch);
        r = rsqrtf(ss / cols + eps);
    }
    const bool writes_in = blockIdx.x == 0 && in_out != nullptr;
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < LORA_A_REG_GROUPS; k++) {
        const int i = tid + k * threads;
        if (i < groups) {
            lora_a_input(f[k], g[k], mode, r, norm_offset, activation);
            if (writes_in) store_h16x8(in_out + i * 8, f[k]);
            if (has_row) {
                // The product uses `in` rounded to h16, as the GEMVs that read in_out do.
#pragma unroll
                for (int e = 0; e < 8; e++) s += round_h16(f[k][e]) * w[k][e];
            }
        }
    }
    for (int i = tid + LORA_A_REG_GROUPS * threads; i < groups; i += threads) {
        float h[8], q[8];
        load_h16x8(x + i * 8, h);
        if (mode != 0) load_h16x8(second + i * 8, q);
        lora_a_input(h, q, mode, r, norm_offset, activation);
        if (writes_in) store_h16x8(in_out + i * 8, h);
        if (has_row) {
            float v[8];
            load_h16x8(ar + i * 8, v);
#pragma unroll
            for (int e = 0; e < 8; e++) s += round_h16(h[e]) * v[e];
        }
    }
    if (!has_row) return;
    s = block_sum(s, scratch + 32);
    if (tid == 0) xa[blockIdx.x] = s;
}

/// nf4_gemv with the columns split over the warps of a block (split-K) and x read through the L1 cache instead of
/// a shared-memory copy: a block of 8 warps computes 4 * (8 / splits) rows, each group of `splits` warps the same 4
/// rows over 1/splits of the columns; partial sums meet in shared memory. More warps stream each matrix (the
/// down projection has 4096 rows but 14336 columns), and no block waits for a copy of x before its first load.
/// Tasks as for nf4_gemv, with first_block counted in blocks of 4 * (8 / splits) rows.
extern "C" __global__ void __launch_bounds__(256, 4)
nf4_gemv_splitk(const Nf4GemvTask* __restrict__ tasks, int ntasks, const h16* __restrict__ x, int cols,
                int blocksize_shift, int nested_shift, int splits) {
    __shared__ float code[256], nf4[16], partial[8][GEMV_ROWS];
    int ti = 0;
    while (ti + 1 < ntasks && (int)blockIdx.x >= tasks[ti + 1].first_block) ti++;
    const Nf4GemvTask task = tasks[ti];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups = 8 / splits, group = warp / splits, seg = warp % splits;
    const int row0 = ((int)blockIdx.x - task.first_block) * (GEMV_ROWS * groups) + group * GEMV_ROWS;
    const int chunks = cols / 32;
    const int per_seg = (chunks + splits - 1) / splits;
    const int c_begin = seg * per_seg, c_end = min(chunks, c_begin + per_seg);
    const uint4* prow[GEMV_ROWS];
    long long e0[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        const int row = min(row0 + r, task.rows - 1);
        e0[r] = (long long)row * cols;
        prow[r] = reinterpret_cast<const uint4*>(task.packed + e0[r] / 2);
    }
    // The first loads go out before the tables are staged.
    uint4 next[GEMV_ROWS];
    if (c_begin + lane < c_end) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) next[r] = __ldg(prow[r] + c_begin + lane);
    }
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = task.code[i];
    if (threadIdx.x < 16) nf4[threadIdx.x] = NF4_CODE_TABLE[threadIdx.x];
    __syncthreads();
    const float offset = task.offset;
    const unsigned char* __restrict__ absmax_q = task.absmax_q;
    const float* __restrict__ nested = task.nested_absmax;
    float acc[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
    for (int c = c_begin + lane; c < c_end; c += 32) {
        uint4 w[GEMV_ROWS];
        float scale[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) w[r] = next[r];
        if (c + 32 < c_end) {
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) next[r] = __ldg(prow[r] + c + 32);
        }
        nf4_chunk_scales(scale, e0, c, absmax_q, nested, code, offset, blocksize_shift, nested_shift);
        const uint4* xg = reinterpret_cast<const uint4*>(x + c * 32);
        float part[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) part[r] = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++) nf4_piece_dot(part, w, __ldg(xg + k), k, nf4);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] += part[r] * scale[r];
    }
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
        float v = acc[r];
        const int row = row0 + r;
        if (seg == 0 && task.lora_b != nullptr && lane < task.rank && row < task.rows)
            v += task.lora_scale * h16_to_float(task.lora_b[(long long)row * task.rank + lane]) * task.xa[lane];
        v = warp_sum(v);
        if (lane == 0) partial[warp][r] = v;
    }
    __syncthreads();
    if (seg == 0 && lane < GEMV_ROWS) {
        const int row = row0 + lane;
        if (row < task.rows) {
            float v = 0.0f;
            for (int k = 0; k < splits; k++) v += partial[group * splits + k][lane];
            if (task.residual != nullptr) v += h16_to_float(task.residual[row]);
            task.out[row] = float_to_h16(v);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// nf4_gemv_mma: nf4_gemv's product (same tasks, 16 rows per block) with a pair lookup and the tensor cores.

#define GEMV_MMA_WARPS 8
#define GEMV_MMA_LUT_BYTES (256 * 256)  // 256 entries, 256 bytes apart (128 used: 32 copies of 4 bytes)
#define GEMV_MMA_SHARED (GEMV_MMA_LUT_BYTES + 512 * 4 + GEMV_MMA_WARPS * 16 * 4)  // + code, pairs, partial sums

/// The table entry of byte q of `word` for this lane: at byte 256 · byte + 4 · lane, an address one byte_perm
/// forms (byte 0 = lane4 = 4 · lane, byte 1 = the packed byte, bytes 2 and 3 = byte 1 of lane4, which is 0).
__device__ __forceinline__ unsigned gemv_lut(const unsigned char* lut, unsigned word, unsigned lane4, int q) {
    const unsigned addr = __byte_perm(word, lane4, 0x5504u | ((unsigned)q << 4));
    return *reinterpret_cast<const unsigned*>(lut + addr);
}

/// One k-step: A slots (row g, k 2t..2t+1 | row g+8 | row g, k 2t+8.. | row g+8) from packed bytes q and q + 1 of
/// the rows' words; B slots b0, b1 (x values matching those bytes, or zeros).
__device__ __forceinline__ void gemv_mma_step(float* c, const unsigned char* lut, unsigned lane4, unsigned wa, unsigned wb,
                                              int q, unsigned b0, unsigned b1) {
    unsigned a[4];
    a[0] = gemv_lut(lut, wa, lane4, q);
    a[1] = gemv_lut(lut, wb, lane4, q);
    a[2] = gemv_lut(lut, wa, lane4, q + 1);
    a[3] = gemv_lut(lut, wb, lane4, q + 1);
    mma_16816_h16(c, a, b0, b1);
}

#if QLORA_HALF || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bf16 mma needs sm_80 (Turing runs fp16)
/// A 16-row tile of nf4_gemv_mma as one warp sees it: addresses, the warp's groups [gb, ge), and the loads kept a cycle
/// (4 groups) ahead: packed bytes, this lane's x piece, the absmax code and nested absmax of the group whose sums this
/// lane scales (group c0 + t); and the epilogue's LoRA term and residual.
struct GemvMmaTile {
    const unsigned char* pa;
    const unsigned char* pb;
    const uint4* xl;
    long long ea, eb;
    int row0, gb, ge, my_step;
    uint2 wa[4], wb[4];
    uint4 xn0, xn1;
    unsigned qa, qb;
    float na, nb;
    float lora_term[2], residual[2];
};

/// Sets up tile rows row0 ... row0 + 15 of `task` for this warp and issues the first cycle's loads of packed bytes.
__device__ __forceinline__ void gemv_mma_begin_weights(GemvMmaTile& s, const Nf4GemvTask& task, int row0, int cols,
                                                       int warp, int lane) {
    const int g = lane >> 2, t = lane & 3;
    s.row0 = row0;
    // Rows past the end repeat the last row (loaded, never stored).
    const int ra = min(row0 + g, task.rows - 1), rb = min(row0 + g + 8, task.rows - 1);
    s.ea = (long long)ra * cols;
    s.eb = (long long)rb * cols;
    // This lane's 8 bytes of group kb of rows g and g + 8 are at pa + 32 kb, pb + 32 kb (values 64 kb + 16 t ...).
    s.pa = task.packed + s.ea / 2 + t * 8;
    s.pb = task.packed + s.eb / 2 + t * 8;
    // Warp w takes groups [gb, ge) of the row (64 values each), a multiple of 4 of them where the row allows.
    const int groups = cols >> 6;
    const int per_warp = (((groups + GEMV_MMA_WARPS - 1) / GEMV_MMA_WARPS) + 3) & ~3;
    s.gb = min(groups, warp * per_warp);
    s.ge = min(groups, s.gb + per_warp);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        s.wa[i] = s.wb[i] = make_uint2(0u, 0u);
        if (s.gb + i < s.ge) {
            s.wa[i] = __ldg(reinterpret_cast<const uint2*>(s.pa + (s.gb + i) * 32));
            s.wb[i] = __ldg(reinterpret_cast<const uint2*>(s.pb + (s.gb + i) * 32));
        }
    }
    s.my_step = g >> 1;
}

/// The absmax code and nested absmax of the group whose sums this lane scales in the first cycle (group gb + t).
__device__ __forceinline__ void gemv_mma_begin_scales(GemvMmaTile& s, const Nf4GemvTask& task, int blocksize_shift,
                                                      int nested_shift, int lane) {
    const int t = lane & 3;
    s.qa = s.qb = 0u;
    s.na = s.nb = 0.0f;
    if (s.gb + t < s.ge) {
        const long long ba = (s.ea + (long long)(s.gb + t) * 64) >> blocksize_shift;
        const long long bb = (s.eb + (long long)(s.gb + t) * 64) >> blocksize_shift;
        s.qa = __ldg(task.absmax_q + ba);
        s.qb = __ldg(task.absmax_q + bb);
        s.na = __ldg(task.nested_absmax + (ba >> nested_shift));
        s.nb = __ldg(task.nested_absmax + (bb >> nested_shift));
    }
}

/// x: lane (g, t) is the B operand of columns g only in step g / 2 of a cycle, so it needs one 16-value piece of x
/// per cycle (group c0 + g / 2, values 16 t ...); the first cycle's piece is loaded here (through the non-coherent
/// cache).
__device__ __forceinline__ void gemv_mma_begin_x(GemvMmaTile& s, const h16* __restrict__ x, int lane) {
    const int t = lane & 3;
    s.xl = reinterpret_cast<const uint4*>(x + t * 16);
    s.xn0 = s.xn1 = make_uint4(0u, 0u, 0u, 0u);
    if (s.gb + s.my_step < s.ge) {
        s.xn0 = __ldg(s.xl + (s.gb + s.my_step) * 8);
        s.xn1 = __ldg(s.xl + (s.gb + s.my_step) * 8 + 1);
    }
}

/// The epilogue's LoRA term (B row entry `lane` times xa[lane], scaled) and residual of rows 2w, 2w + 1, which warp w
/// finishes.
__device__ __forceinline__ void gemv_mma_epilogue_terms(GemvMmaTile& s, const Nf4GemvTask& task, int row0, int warp, int lane) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int row = row0 + warp * 2 + j;
        s.lora_term[j] = s.residual[j] = 0.0f;
        if (task.lora_b != nullptr && lane < task.rank && row < task.rows) {
            const float xa = task.xa[lane];
            s.lora_term[j] = task.lora_scale * h16_to_float(task.lora_b[(long long)row * task.rank + lane]) * xa;
        }
        if (task.residual != nullptr && lane == 0 && row < task.rows) s.residual[j] = h16_to_float(task.residual[row]);
    }
}

/// All of the first cycle's loads of nf4_gemv_mma and the epilogue's.
__device__ __forceinline__ void gemv_mma_begin(GemvMmaTile& s, const Nf4GemvTask& task, int row0, const h16* __restrict__ x,
                                               int cols, int blocksize_shift, int nested_shift, int warp, int lane) {
    gemv_mma_begin_weights(s, task, row0, cols, warp, lane);
    gemv_mma_begin_x(s, x, lane);
    gemv_mma_begin_scales(s, task, blocksize_shift, nested_shift, lane);
    gemv_mma_epilogue_terms(s, task, row0, warp, lane);
}

/// The pair table: entry v = (NF4[v >> 4], NF4[v & 15]) as h16 in the low and high half, made once (pairs), then copied
/// 32 times (thread j writes 4 copies of entry j / 8: a warp fills 4 whole rows per store, no bank conflicts). Ends
/// with a barrier.
__device__ __forceinline__ void gemv_mma_build_table(unsigned char* lut, unsigned* pairs) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        pairs[i] = (unsigned)float_to_h16(NF4_CODE_TABLE[i >> 4]) | ((unsigned)float_to_h16(NF4_CODE_TABLE[i & 15]) << 16);
    __syncthreads();
    for (int j = threadIdx.x; j < 256 * 8; j += blockDim.x) {
        const unsigned pair = pairs[j >> 3];
        *reinterpret_cast<uint4*>(lut + (j >> 3) * 256 + (j & 7) * 16) = make_uint4(pair, pair, pair, pair);
    }
    __syncthreads();
}

/// The warp's dot products over its groups of the tile: acc_a, acc_b = rows g and g + 8, groups ≡ t (mod 4), scaled.
__device__ __forceinline__ void gemv_mma_cycles(GemvMmaTile& s, float& acc_a, float& acc_b, const unsigned char* lut,
                                                const float* code, const Nf4GemvTask& task, int blocksize_shift,
                                                int nested_shift, int lane) {
    const int t = lane & 3;
    const unsigned lane4 = (unsigned)lane * 4u;
    const float offset = task.offset;
    const unsigned char* __restrict__ absmax_q = task.absmax_q;
    const float* __restrict__ nested = task.nested_absmax;
    const int gb = s.gb, ge = s.ge, my_step = s.my_step;
    acc_a = acc_b = 0.0f;
    for (int c0 = gb; c0 < ge; c0 += 4) {
        // Group c0 + i goes to mma columns 2i, 2i + 1: only lanes g = 2i, 2i + 1 give x as B in step i.
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        // This cycle's x piece and scales (from last cycle's loads), then the next cycle's loads.
        const uint4 x0 = s.xn0, x1 = s.xn1;
        if (c0 + 4 + my_step < ge) {
            s.xn0 = __ldg(s.xl + (c0 + 4 + my_step) * 8);
            s.xn1 = __ldg(s.xl + (c0 + 4 + my_step) * 8 + 1);
        }
        const bool scaled = c0 + t < ge;
        const float scale_a = code[s.qa] * s.na + offset, scale_b = code[s.qb] * s.nb + offset;
        if (c0 + 4 + t < ge) {
            const long long ba = (s.ea + (long long)(c0 + 4 + t) * 64) >> blocksize_shift;
            const long long bb = (s.eb + (long long)(c0 + 4 + t) * 64) >> blocksize_shift;
            s.qa = __ldg(absmax_q + ba);
            s.qb = __ldg(absmax_q + bb);
            s.na = __ldg(nested + (ba >> nested_shift));
            s.nb = __ldg(nested + (bb >> nested_shift));
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int kb = c0 + i;
            if (kb < ge) {  // the same for the whole warp
                const uint2 a2 = s.wa[i], b2 = s.wb[i];
                if (kb + 4 < ge) {
                    s.wa[i] = __ldg(reinterpret_cast<const uint2*>(s.pa + (kb + 4) * 32));
                    s.wb[i] = __ldg(reinterpret_cast<const uint2*>(s.pb + (kb + 4) * 32));
                }
                // k-step s: packed bytes 2s, 2s + 1; x values 4s + (0, 1 | 2, 3) of this lane's 16, or zeros.
                const unsigned keep = my_step == i ? 0xffffffffu : 0u;
                gemv_mma_step(c, lut, lane4, a2.x, b2.x, 0, x0.x & keep, x0.y & keep);
                gemv_mma_step(c, lut, lane4, a2.x, b2.x, 2, x0.z & keep, x0.w & keep);
                gemv_mma_step(c, lut, lane4, a2.y, b2.y, 0, x1.x & keep, x1.y & keep);
                gemv_mma_step(c, lut, lane4, a2.y, b2.y, 2, x1.z & keep, x1.w & keep);
            }
        }
        // c[0] (row g) and c[2] (row g + 8) are column 2t: group c0 + t's partial sums; its absmax scales them.
        if (scaled) {
            acc_a += c[0] * scale_a;
            acc_b += c[2] * scale_b;
        }
    }
}

/// Sums a tile's rows over the 4 lanes of a row and the 8 warps (through `partial`, with a barrier), adds the LoRA term
/// and the residual, rounds once and stores: warp w finishes rows 2w, 2w + 1.
__device__ __forceinline__ void gemv_mma_finish(const GemvMmaTile& s, float acc_a, float acc_b, float* partial,
                                                const Nf4GemvTask& task, int warp, int lane) {
    const int g = lane >> 2, t = lane & 3;
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 2);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 2);
    if (t == 0) {
        partial[warp * 16 + g] = acc_a;
        partial[warp * 16 + g + 8] = acc_b;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int r = warp * 2 + j, row = s.row0 + r;
        float v = (lane < GEMV_MMA_WARPS ? partial[lane * 16 + r] : 0.0f) + s.lora_term[j];
        v = warp_sum(v);
        if (lane == 0 && row < task.rows) task.out[row] = float_to_h16(v + s.residual[j]);
    }
}

/// The task of grid block `block`: tasks are dealt consecutive blocks in order.
__device__ __forceinline__ int gemv_task_of(const Nf4GemvTask* __restrict__ tasks, int ntasks, int block) {
    int ti = 0;
    while (ti + 1 < ntasks && block >= tasks[ti + 1].first_block) ti++;
    return ti;
}

extern "C" __global__ void __launch_bounds__(GEMV_MMA_WARPS * 32, 3)
nf4_gemv_mma(const Nf4GemvTask* __restrict__ tasks, int ntasks, const h16* __restrict__ x, int cols, int blocksize_shift,
             int nested_shift) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char* lut = smem_raw;
    float* code = reinterpret_cast<float*>(smem_raw + GEMV_MMA_LUT_BYTES);  // 256
    unsigned* pairs = reinterpret_cast<unsigned*>(code + 256);              // 256
    float* partial = code + 512;                                            // [warp][16 rows]
    const Nf4GemvTask task = tasks[gemv_task_of(tasks, ntasks, blockIdx.x)];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // The first cycle's loads and the epilogue's go out before the tables are built.
    GemvMmaTile s;
    gemv_mma_begin(s, task, ((int)blockIdx.x - task.first_block) * 16, x, cols, blocksize_shift, nested_shift, warp, lane);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = task.code[i];
    gemv_mma_build_table(lut, pairs);
    float acc_a, acc_b;
    gemv_mma_cycles(s, acc_a, acc_b, lut, code, task, blocksize_shift, nested_shift, lane);
    gemv_mma_finish(s, acc_a, acc_b, partial, task, warp, lane);
}
#endif
