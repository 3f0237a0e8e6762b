// Twins of the batched-generation kernels (formulas in Backend/CUDA/Kernels/decode_batched.cu). A step's rows are
// tokens of different sequences: row i belongs to KV-cache slot slots[i] at position positions[i].

#if canImport(Glibc)
import Glibc
#endif

extension CPUReference {
    /// Y[m, n] = (accumulate ? old[m, n] : 0) + Σ_k x[m, k] · bf16(w[n, k]), x [rows, cols], w [outputs, cols]
    /// (the dequantized NF4 weight; the kernel rounds each weight to bf16 before its tensor-core product).
    public static func nf4GemmRows(x: [Float], weight: [Float], old: [Float]?, rows: Int, outputs: Int, cols: Int) -> [Float] {
        let w = weight.map(roundToBF16)
        var y = [Float](repeating: 0, count: rows * outputs)
        for m in 0..<rows {
            for n in 0..<outputs {
                var s = 0.0
                for k in 0..<cols { s += Double(x[m * cols + k]) * Double(w[n * cols + k]) }
                y[m * outputs + n] = Float(s) + (old?[m * outputs + n] ?? 0)
            }
        }
        return y
    }

    /// qkv [rows, stride] with [q (heads·D) | k (kvHeads·D) | v] at the start of each row: returns the row with q
    /// and k rotated at each row's position, and the caches [slots · capacity, kvHeads·D] with the rotated k and v
    /// written at row (slot · capacity + position mod capacity) unless `append` is false. With `qNorm`/`kNorm` each head
    /// is first RMS-normed as the family rounds it (normOffset 0: bf16(bf16(x·r)·w); else bf16(x·r·(w + offset))); only
    /// the first `rotaryDim` dimensions rotate (pairs (i, i + rotaryDim / 2)), with cos and sin times `ropeScale`, at
    /// inverseFrequencies[i], or inverseFrequencies[rotaryDim / 2 + i] for a row with longRows[r] nonzero.
    public static func ropeAppendRows(qkv: [Float], stride: Int, kcache: [Float], vcache: [Float], slots: [Int32], positions: [Int32],
                                      inverseFrequencies: [Float], capacity: Int, heads: Int, kvHeads: Int, headDim: Int,
                                      rotaryDim: Int? = nil, ropeScale: Float = 1, qNorm: [Float]? = nil, kNorm: [Float]? = nil,
                                      normOffset: Float = 0, eps: Float = 1e-6, longRows: [Int32]? = nil, append: Bool = true)
        -> (qkv: [Float], kcache: [Float], vcache: [Float]) {
        var out = qkv, k = kcache, v = vcache
        let kvDim = kvHeads * headDim, half = (rotaryDim ?? headDim) / 2
        for r in slots.indices {
            let row = r * stride, cacheRow = (Int(slots[r]) * capacity + Int(positions[r]) % capacity) * kvDim
            let frequencies = (longRows?[r] ?? 0) != 0 ? half : 0
            for h in 0..<(heads + kvHeads) {
                let base = row + h * headDim
                var x = Array(qkv[base..<(base + headDim)])
                if let w = h < heads ? qNorm : kNorm {
                    let ss = x.reduce(0.0) { $0 + Double($1) * Double($1) }
                    let inv = Float(1 / (ss / Double(headDim) + Double(eps)).squareRoot())
                    x = x.indices.map { normOffset != 0 ? roundToBF16(x[$0] * inv * (w[$0] + normOffset)) : roundToBF16(roundToBF16(x[$0] * inv) * w[$0]) }
                }
                var y = x
                for i in 0..<half {
                    let angle = Double(Float(positions[r]) * inverseFrequencies[frequencies + i])
                    let c = cos(angle) * Double(ropeScale), s = sin(angle) * Double(ropeScale)
                    y[i] = Float(Double(x[i]) * c - Double(x[i + half]) * s)
                    y[i + half] = Float(Double(x[i + half]) * c + Double(x[i]) * s)
                }
                for d in 0..<headDim {
                    let o = roundToBF16(y[d])
                    out[base + d] = o
                    if h >= heads && append { k[cacheRow + (h - heads) * headDim + d] = o }
                }
            }
            if append { for e in 0..<kvDim { v[cacheRow + e] = qkv[row + (heads + kvHeads) * headDim + e] } }
        }
        return (out, k, v)
    }

    /// out [rows, heads·D]: the query of row r (head h at qkv[r · stride + h · D]) attends to the keys of positions
    /// 0 ... position (the last `window` of them when window > 0; GQA: head h reads KV head h / (heads / kvHeads)),
    /// softmax(softcap(q·k · scale)) v with scale D^-½ by default and softcap c·tanh(s / c) when softcap > 0. Position j
    /// is at cache row slot · capacity + j mod capacity, or, with `runStart` and j at or after the position of row
    /// runStart[r], in the k | v of row r − (position − j) of qkv.
    public static func attentionRows(qkv: [Float], stride: Int, kcache: [Float], vcache: [Float], slots: [Int32], positions: [Int32],
                                     capacity: Int, heads: Int, kvHeads: Int, headDim d: Int, scale: Float? = nil, softcap: Float = 0,
                                     window: Int = 0, runStart: [Int32]? = nil) -> [Float] {
        let kvDim = kvHeads * d, scale = Double(scale ?? 1 / Float(d).squareRoot())
        var out = [Float](repeating: 0, count: slots.count * heads * d)
        for r in slots.indices {
            let keys = Int(positions[r]) + 1, base = Int(slots[r]) * capacity * kvDim
            let first = window > 0 ? max(0, keys - window) : 0
            let inRows = runStart.map { Int(positions[Int($0[r])]) } ?? keys
            /// Key j's k (v: kvDim further in a row; the same index of vcache in the cache), without the head offset.
            func key(_ j: Int) -> (fromRows: Bool, index: Int) {
                j >= inRows ? (true, (r - (keys - 1 - j)) * stride + heads * d) : (false, base + (j % capacity) * kvDim)
            }
            func k(_ j: Int, _ e: Int) -> Float { let (rows, i) = key(j); return rows ? qkv[i + e] : kcache[i + e] }
            func v(_ j: Int, _ e: Int) -> Float { let (rows, i) = key(j); return rows ? qkv[i + kvDim + e] : vcache[i + e] }
            for h in 0..<heads {
                let kvh = h / (heads / kvHeads), q = r * stride + h * d
                var scores: [Double] = []
                for j in first..<keys {
                    var s = 0.0
                    for e in 0..<d { s += Double(qkv[q + e]) * Double(k(j, kvh * d + e)) }
                    s *= scale
                    if softcap > 0 { s = Double(softcap) * tanh(s / Double(softcap)) }
                    scores.append(s)
                }
                let top = scores.max()!
                let p = scores.map { exp($0 - top) }
                let total = p.reduce(0, +)
                for e in 0..<d {
                    var o = 0.0
                    for (n, j) in (first..<keys).enumerated() { o += p[n] * Double(v(j, kvh * d + e)) }
                    out[(r * heads + h) * d + e] = Float(o / total)
                }
            }
        }
        return out
    }

    /// The caches [slots · capacity, kvHeads·D] with the k and v of each row (from its qkv row [q | k | v]) written at
    /// row slot · capacity + position mod capacity, for the rows among the last `capacity` of their run (row r's run ends
    /// before row runEnd[r]): a ring layer's append after its attention.
    public static func kvAppendRows(qkv: [Float], stride: Int, kcache: [Float], vcache: [Float], slots: [Int32], positions: [Int32],
                                    runEnd: [Int32], capacity: Int, heads: Int, kvHeads: Int, headDim: Int) -> (kcache: [Float], vcache: [Float]) {
        var k = kcache, v = vcache
        let kvDim = kvHeads * headDim
        for r in slots.indices where Int(runEnd[r]) - r <= capacity {
            let cacheRow = (Int(slots[r]) * capacity + Int(positions[r]) % capacity) * kvDim, row = r * stride + heads * headDim
            for e in 0..<kvDim {
                k[cacheRow + e] = qkv[row + e]
                v[cacheRow + e] = qkv[row + kvDim + e]
            }
        }
        return (k, v)
    }

    /// Per row: RMSNorm(x)·w as the family rounds it (offset 0: bf16(bf16(x·r)·w); else bf16(x·r·(w + offset))), or
    /// bf16(residual + that) when `residual` is given (Gemma's norms on the attention and MLP outputs).
    public static func rmsNormRows(x: [Float], weight: [Float], rows: Int, dim: Int, eps: Float, offset: Float = 0,
                                   residual: [Float]? = nil) -> [Float] {
        var out = [Float](repeating: 0, count: rows * dim)
        for r in 0..<rows {
            let row = x[(r * dim)..<((r + 1) * dim)]
            let ss = row.reduce(0.0) { $0 + Double($1) * Double($1) }
            let inv = Float(1 / (ss / Double(dim) + Double(eps)).squareRoot())
            for i in 0..<dim {
                let v = x[r * dim + i]
                let n = offset != 0 ? roundToBF16(v * inv * (weight[i] + offset)) : roundToBF16(roundToBF16(v * inv) * weight[i])
                out[r * dim + i] = residual.map { roundToBF16($0[r * dim + i] + n) } ?? n
            }
        }
        return out
    }

    /// The first index of each row's largest value (torch.argmax).
    public static func argmaxRows(_ logits: [Float], rows: Int, vocab: Int) -> [Int32] {
        (0..<rows).map { r in
            var best = 0
            for i in 0..<vocab where logits[r * vocab + i] > logits[r * vocab + best] { best = i }
            return Int32(best)
        }
    }
}
