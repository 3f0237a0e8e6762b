// embedding.cu: token embedding lookup (the table is frozen in QLoRA, so there is no backward).
//
// ids: [tokens] int; table: [vocab, dim] bf16; out: [tokens, dim] bf16. One block per token.
// An id outside [0, vocab) writes a zero row and sets *bad_id_flag to 1 (when the flag pointer is not null),
// so the host can report the bad input instead of reading out of bounds.
#include "qlora_prelude.cuh"

extern "C" __global__ void embedding_forward(const int* ids, const h16* table, h16* out, int vocab, int dim,
                                             int* bad_id_flag) {
    const long long t = blockIdx.x;
    const int id = ids[t];
    h16* o = out + t * dim;
    if (id < 0 || id >= vocab) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = 0;
        if (threadIdx.x == 0 && bad_id_flag) *bad_id_flag = 1;
        return;
    }
    const h16* row = table + (long long)id * dim;
    if ((dim & 7) == 0 && aligned16(row) && aligned16(o)) {
        const h16x8_raw* src = reinterpret_cast<const h16x8_raw*>(row);
        h16x8_raw* dst = reinterpret_cast<h16x8_raw*>(o);
        for (int i = threadIdx.x; i < dim / 8; i += blockDim.x) dst[i] = src[i];
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = row[i];
    }
}
