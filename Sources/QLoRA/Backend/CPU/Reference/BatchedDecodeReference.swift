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
    /// written at row (slot · capacity + position).
    public static func ropeAppendRows(qkv: [Float], stride: Int, kcache: [Float], vcache: [Float], slots: [Int32], positions: [Int32],
                                      inverseFrequencies: [Float], capacity: Int, heads: Int, kvHeads: Int, headDim: Int)
        -> (qkv: [Float], kcache: [Float], vcache: [Float]) {
        var out = qkv, k = kcache, v = vcache
        let kvDim = kvHeads * headDim, half = headDim / 2
        for r in slots.indices {
            let row = r * stride, cacheRow = (Int(slots[r]) * capacity + Int(positions[r])) * kvDim
            for h in 0..<(heads + kvHeads) {
                for i in 0..<half {
                    let angle = Double(Float(positions[r]) * inverseFrequencies[i])
                    let a = Double(qkv[row + h * headDim + i]), b = Double(qkv[row + h * headDim + i + half])
                    let lo = roundToBF16(Float(a * cos(angle) - b * sin(angle))), hi = roundToBF16(Float(b * cos(angle) + a * sin(angle)))
                    out[row + h * headDim + i] = lo
                    out[row + h * headDim + i + half] = hi
                    if h >= heads {
                        k[cacheRow + (h - heads) * headDim + i] = lo
                        k[cacheRow + (h - heads) * headDim + i + half] = hi
                    }
                }
            }
            for e in 0..<kvDim { v[cacheRow + e] = qkv[row + (heads + kvHeads) * headDim + e] }
        }
        return (out, k, v)
    }

    /// out [rows, heads·D]: the query of row r (head h at qkv[r · stride + h · D]) attends to cache rows
    /// slot · capacity + 0 ... position (GQA: head h reads KV head h / (heads / kvHeads)), softmax(q·k/√D) v.
    public static func attentionRows(qkv: [Float], stride: Int, kcache: [Float], vcache: [Float], slots: [Int32], positions: [Int32],
                                     capacity: Int, heads: Int, kvHeads: Int, headDim d: Int) -> [Float] {
        let kvDim = kvHeads * d, scale = 1 / Double(d).squareRoot()
        var out = [Float](repeating: 0, count: slots.count * heads * d)
        for r in slots.indices {
            let keys = Int(positions[r]) + 1, base = Int(slots[r]) * capacity * kvDim
            for h in 0..<heads {
                let kvh = h / (heads / kvHeads), q = r * stride + h * d
                var scores = [Double](repeating: 0, count: keys)
                for j in 0..<keys {
                    var s = 0.0
                    for e in 0..<d { s += Double(qkv[q + e]) * Double(kcache[base + j * kvDim + kvh * d + e]) }
                    scores[j] = s * scale
                }
                let top = scores.max()!
                let p = scores.map { exp($0 - top) }
                let total = p.reduce(0, +)
                for e in 0..<d {
                    var o = 0.0
                    for j in 0..<keys { o += p[j] * Double(vcache[base + j * kvDim + kvh * d + e]) }
                    out[(r * heads + h) * d + e] = Float(o / total)
                }
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
