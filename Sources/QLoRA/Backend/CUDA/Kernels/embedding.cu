// embedding.cu: token embedding lookup (the table is frozen in QLoRA, so there is no backward).
//
// ids: [tokens] int; table: [vocab, dim] h16; out: [tokens, dim] h16. One block per token.
//     embedding_forward:         out[t] = table[ids[t]]                (an exact copy; decode launches it directly)
//     embedding_forward_scaled:  out[t] = h16(table[ids[t]] * scale)   (Gemma: scale = √hidden, which transformers
//                                                                       rounds to the compute dtype before multiplying)
// An id outside [0, vocab) writes a zero row and sets *bad_id_flag to 1 (when the flag pointer is not null),
// so the host can report the bad input instead of reading out of bounds.
#include "qlora_prelude.cuh"

__device__ __forceinline__ void embedding_row(const int* ids, const h16* table, h16* out, int vocab, int dim,
                                              int* bad_id_flag, bool scaled, float scale) {
    const long long t = blockIdx.x;
    const int id = ids[t];
    h16* o = out + t * dim;
    if (id < 0 || id >= vocab) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = 0;
        if (threadIdx.x == 0 && bad_id_flag) *bad_id_flag = 1;
        return;
    }
    const h16* row = table + (long long)id * dim;
    const bool vec = (dim & 7) == 0 && aligned16(row) && aligned16(o);
    if (!scaled && vec) {
        const h16x8_raw* src = reinterpret_cast<const h16x8_raw*>(row);
        h16x8_raw* dst = reinterpret_cast<h16x8_raw*>(o);
        for (int i = threadIdx.x; i < dim / 8; i += blockDim.x) dst[i] = src[i];
    } else if (!scaled) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = row[i];
    } else if (vec) {
        for (int i = threadIdx.x * 8; i < dim; i += blockDim.x * 8) {
            float f[8];
            load_h16x8(row + i, f);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] *= scale;
            store_h16x8(o + i, f);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = float_to_h16(h16_to_float(row[i]) * scale);
    }
}

extern "C" __global__ void embedding_forward(const int* ids, const h16* table, h16* out, int vocab, int dim,
                                             int* bad_id_flag) {
    embedding_row(ids, table, out, vocab, dim, bad_id_flag, false, 1.0f);
}

extern "C" __global__ void embedding_forward_scaled(const int* ids, const h16* table, h16* out, int vocab, int dim,
                                                    int* bad_id_flag, float scale) {
    embedding_row(ids, table, out, vocab, dim, bad_id_flag, true, scale);
}
