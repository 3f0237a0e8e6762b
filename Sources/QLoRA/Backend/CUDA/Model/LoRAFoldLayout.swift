// Folded LoRA (issue 11): a linear's rank-r product folded into its base GEMM by concatenating along K,
//   y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ = [x | x·Aᵀ]·[W | s·B]ᵀ,
// so y is written once instead of written by the base GEMM and then read and written again by the rank-r one
// (β = 1). The input buffer that holds x gets rows of in + R values: x in the first `in` columns, the x·Aᵀ of the
// linears that read x side by side after it (q, k, v read norm1; gate, up read norm2; down reads the activation;
// Phi-3: qkv; gate_up; down), R the sum of their ranks. Linear j's weight scratch holds W with rows in + t_j + r_j
// apart and, in the columns past `in`, zeros under the x·Aᵀ of the linears before it and its own s·B (fp32 master ×
// s, rounded once) under its x·Aᵀ; its product reads the first in + t_j + r_j columns of the input (K grows by
// t_j + r_j: q, k, v at rank 16 of the 8B shape: (16 + 32 + 48)/3/4096 ≈ 0.8% more FLOPs). o_proj (its input is the
// attention kernels' output) and linears without an adapter keep the plain product. The backward reads the same
// buffers: x with its row stride for dA, x·Aᵀ in place for dB.
//
// Bytes saved per step (bf16, N tokens, per block): the rank-r GEMM re-read and re-wrote y (2 · 2N·out) for each
// folded linear: 2 · 2N·(q + 2kv + 2I + H) per forward pass; two forward passes a step (the forward, the
// recomputation, which skips down_proj's: 2N·(q + 2kv + 2I) more) — `scripts/count_step_work.py --fold`.

// The backward's fold (`CUDATrainerMemoryOptions.foldLoRABackward`). A linear's input gradient
//   dx = dy·W + s·(dy·B)·A = [dy | s·dy·B] · [W ; A]
// is one product along K = out + r instead of the base GEMM writing dx and the rank-r GEMM reading and writing it again
// (β = 1). dy needs r spare columns after each row, which its producer must leave (a strided copy of dy would cost
// the 2·2N·out bytes the fold saves on a square linear), and the weight scratch r extra rows under W (A's bf16 copy,
// copied there: r·in values, against re-reading dx's N·in twice). With s folded into the dy·B columns (written by the
// dy·B GEMM with α = s), the other two products read them as they are:
//   dyB' = s·dy·B      [N, r], dy's columns out … out + r − 1 (rows ldy = out + R apart)
//   dB  += s·dyᵀ·xa    unchanged
//   dA  += dyB'ᵀ·x     = s·(dy·B)ᵀ·x, α 1 (bit for bit the unfolded dA when s is a power of two, e.g. α = 2r)
//   dx (+)= [dy | dyB']·[W ; A]    one GEMM, K = out + r, dx written once
// What folds and what stays:
//   - o_proj and down_proj fold: their dy is the residual stream's gradient (`gradient`), whose writers (the final
//     norm's and the blocks' RMSNorm backward, rows `dxStride` apart) leave R = the largest o/down rank of spare columns.
//   - Under LoRA dropout nothing folds: dx = dy·W + d(s·(dy·B)·A) masks the A-side term element by element after the
//     product (the mask is on the LoRA input, so its gradient is masked), which no K-concatenation expresses; those
//     linears run the unfolded path (dyB in its own buffer, the fused masked add), reading dy with its stride.
//   - gate_proj and up_proj fold: their dy is the gated activation's backward, written in place over gate and up,
//     which therefore have rows of I + R' from the forward on (R' the largest gate/up rank: their GEMMs write with that
//     row stride, both activation kernels read and write it). Phi-3's gate_up_proj stays unfolded (its dy is joined
//     into the fused buffer; gate and up still have the stride).
//   - q, k, v: dy comes from the attention backward's dq, dk, dv (attention_*.cu, not strided); Gemma's sandwich norms
//     put o/down's dy in dNorm: these stay unfolded.
//   Bytes saved per step (bf16): 2·2N·in per folded linear (dx re-read and re-written), i.e. 2·2N·(H + I) per block
//   — `scripts/count_step_work.py --fold`.

/// Where one block's folded LoRA puts each x·Aᵀ (CUDADecoderTrainer with `CUDATrainerMemoryOptions.foldLoRA`).
struct LoRAFoldLayout: Equatable {
    /// The linears that read one input, in the order their x·Aᵀ sit after it: q, k, v; gate, up; down (Phi-3: qkv;
    /// gate_up; down). o_proj is in none.
    static func groups(_ c: DecoderConfig) -> [[Int]] {
        c.fusedProjections ? [[0], [2], [3]] : [[0, 1, 2], [4, 5], [6]]
    }

    /// Per linear j: its x·Aᵀ's first column past `in` in its input (nil: not folded: o_proj, or no adapter).
    let tailStart: [Int?]
    /// Per linear j: its input's row stride (in + R of its group; `in` when not folded).
    let inputStride: [Int]
    /// Per group (`groups`): R, the x·Aᵀ columns past `in` of its input.
    let groupColumns: [Int]

    /// One block's layout for its linears' ranks (0: no adapter).
    init(config c: DecoderConfig, ranks: [Int]) {
        let shapes = CUDAMemoryPlan.linearShapes(c)
        var tails = [Int?](repeating: nil, count: shapes.count)
        var strides = shapes.map(\.in)
        var columns: [Int] = []
        for group in Self.groups(c) {
            var r = 0
            for j in group where j < ranks.count && ranks[j] > 0 {
                tails[j] = r
                r += ranks[j]
            }
            for j in group { strides[j] = shapes[j].in + r }
            columns.append(r)
        }
        tailStart = tails
        inputStride = strides
        groupColumns = columns
    }

    /// K of linear j's folded product (its input's first columns): in + its tail's end; `in` when not folded.
    func foldedK(_ j: Int, in inFeatures: Int, rank: Int) -> Int {
        tailStart[j].map { inFeatures + $0 + rank } ?? inFeatures
    }

    /// Per group, the largest R over all blocks (what the trainer's input buffers are sized for).
    static func widestColumns(_ c: DecoderConfig, ranks: [[Int]]) -> [Int] {
        var widest = [Int](repeating: 0, count: groups(c).count)
        for block in ranks {
            for (g, r) in LoRAFoldLayout(config: c, ranks: block).groupColumns.enumerated() { widest[g] = max(widest[g], r) }
        }
        return widest
    }

    /// Per linear j, the largest folded K over all blocks (its weight scratch holds out × that).
    static func widestK(_ c: DecoderConfig, ranks: [[Int]]) -> [Int] {
        let shapes = CUDAMemoryPlan.linearShapes(c)
        var widest = shapes.map(\.in)
        for block in ranks {
            let layout = LoRAFoldLayout(config: c, ranks: block)
            for j in shapes.indices where j < block.count {
                widest[j] = max(widest[j], layout.foldedK(j, in: shapes[j].in, rank: block[j]))
            }
        }
        return widest
    }
}

/// The backward's fold (`CUDATrainerMemoryOptions.foldLoRABackward`, the header's second part): which linears fold,
/// the spare columns of the residual gradient, and the extra rows of each weight scratch.
struct LoRABackwardFold: Equatable {
    /// Linear j folds its backward when it has an adapter (and, per step, no dropout): o_proj and down_proj, unless
    /// the family's sandwich norms put their dy in dNorm; gate_proj and up_proj (not Phi-3's fused gate_up_proj).
    let folds: [Bool]
    /// R: columns past `hidden` in each row of the residual gradient (the largest o/down rank; 0 without a fold).
    let residualColumns: Int
    /// R': columns past `intermediate` in each row of gate and up (the largest gate/up rank; 0 without a fold).
    let mlpColumns: Int
    /// Per linear j, the rows its weight scratch holds past `out` (its largest rank when it folds).
    let extraRows: [Int]

    init(config c: DecoderConfig, ranks: [[Int]], enabled: Bool) {
        let shapes = CUDAMemoryPlan.linearShapes(c)
        let (o, down) = c.fusedProjections ? (1, 3) : (3, 6)
        var folds = [Bool](repeating: false, count: shapes.count)
        if enabled && !c.sandwichNorms {
            folds[o] = true
            folds[down] = true
        }
        if enabled && !c.fusedProjections {
            folds[4] = true  // gate
            folds[5] = true  // up
        }
        let largest = CUDAMemoryPlan.largestRanks(ranks)
        extraRows = shapes.indices.map { j in folds[j] && j < largest.count ? largest[j] : 0 }
        residualColumns = max(extraRows[o], extraRows[down])
        mlpColumns = c.fusedProjections ? 0 : max(extraRows[4], extraRows[5])
        self.folds = folds
    }
}
