// Softmax cross-entropy with ignored labels (formulas in Backend/CUDA/Kernels/cross_entropy.cu).

#if canImport(Glibc)
import Glibc
#endif

extension CPUReference {
    /// The label value that marks a position as not counted (HF's ignore_index).
    public static let ignoreIndex: Int32 = -100

    /// Per-row loss (0 for ignored rows) and dlogits = gradScale * (softmax - onehot) (0 on ignored rows).
    public static func crossEntropy(logits: [Float], labels: [Int32], rows: Int, vocab: Int, gradScale: Float)
        -> (rowLoss: [Float], dlogits: [Float]) {
        var rowLoss = [Float](repeating: 0, count: rows)
        var dlogits = [Float](repeating: 0, count: rows * vocab)
        for r in 0..<rows where labels[r] != ignoreIndex {
            let z = logits[(r * vocab)..<((r + 1) * vocab)].map(Double.init)
            let m = z.max() ?? 0
            let lse = m + log(z.reduce(0) { $0 + exp($1 - m) })
            let label = Int(labels[r])
            rowLoss[r] = Float(lse - z[label])
            for j in 0..<vocab {
                dlogits[r * vocab + j] = Float(Double(gradScale) * (exp(z[j] - lse) - (j == label ? 1 : 0)))
            }
        }
        return (rowLoss, dlogits)
    }
}

// The vocabulary-parallel loss's three kernels (cross_entropy.cu: cross_entropy_slice_statistics, cross_entropy_combine,
// cross_entropy_slice_gradient), in Double. Soft-capping as the kernels cap: z' = c·tanh(z / c), d z'/d z = 1 − tanh².
extension CPUReference {
    static func cappedLogit(_ z: Double, _ softcap: Float?) -> Double {
        guard let c = softcap.map(Double.init) else { return z }
        return tanh(z / c) * c
    }

    /// (m, s, t) per row of a slice's logits [rows, width] starting at vocabulary column `columnStart`: the max of the
    /// (capped) logits, Σ e^(z − m), and the target's (capped) logit when the slice holds it, else 0. A slice without
    /// columns gives (−∞, 0, 0).
    public static func crossEntropySliceStatistics(logits: [Float], labels: [Int32], rows: Int, width: Int, columnStart: Int,
                                                   softcap: Float?) -> [Float] {
        var out = [Float](repeating: 0, count: 3 * rows)
        for r in 0..<rows {
            let z = (0..<width).map { cappedLogit(Double(logits[r * width + $0]), softcap) }
            let m = z.max() ?? -.infinity
            let s = width == 0 ? 0 : z.reduce(0) { $0 + exp($1 - m) }
            let t = Int(labels[r]) - columnStart
            out[3 * r] = Float(m)
            out[3 * r + 1] = Float(s)
            out[3 * r + 2] = labels[r] != ignoreIndex && (0..<width).contains(t) ? Float(z[t]) : 0
        }
        return out
    }

    /// lse of every row from every rank's statistics ([world][rows][3]) combined in rank order over the slices with
    /// columns, and the row losses of rows `lossRows` (lse − the target logit from its owner; 0 where ignored).
    public static func crossEntropyCombine(statistics: [Float], labels: [Int32], rows: Int, worldSize: Int, vocab: Int,
                                           lossRows: Range<Int>) -> (lse: [Float], rowLoss: [Float]) {
        var lse = [Float](repeating: 0, count: rows), rowLoss = [Float](repeating: 0, count: lossRows.count)
        let filled = (0..<worldSize).filter { !VocabularyParallelLoss.slice(vocab: vocab, rank: $0, worldSize: worldSize).isEmpty }
        for r in 0..<rows {
            let m = filled.map { Double(statistics[3 * ($0 * rows + r)]) }.max() ?? -.infinity
            let s = filled.reduce(0.0) { $0 + Double(statistics[3 * ($1 * rows + r) + 1]) * exp(Double(statistics[3 * ($1 * rows + r)]) - m) }
            let l = m + log(s)
            lse[r] = Float(l)
            if lossRows.contains(r), labels[r] != ignoreIndex {
                let owner = VocabularyParallelLoss.owner(of: Int(labels[r]), vocab: vocab, worldSize: worldSize)
                rowLoss[r - lossRows.lowerBound] = Float(l - Double(statistics[3 * (owner * rows + r) + 2]))
            }
        }
        return (lse, rowLoss)
    }

    /// d logits of a slice's logits [rows, width] given each row's lse: gradScale · (e^(z' − lse) − [target]) · the
    /// cap's slope (0 on ignored rows).
    public static func crossEntropySliceGradient(logits: [Float], labels: [Int32], lse: [Float], rows: Int, width: Int,
                                                 columnStart: Int, gradScale: Float, softcap: Float?) -> [Float] {
        var out = [Float](repeating: 0, count: rows * width)
        for r in 0..<rows where labels[r] != ignoreIndex {
            for j in 0..<width {
                let z = Double(logits[r * width + j])
                let capped = cappedLogit(z, softcap)
                let slope = softcap.map { 1 - pow(tanh(z / Double($0)), 2) } ?? 1
                let onehot: Double = Int(labels[r]) == columnStart + j ? 1 : 0
                out[r * width + j] = Float(Double(gradScale) * (exp(capped - Double(lse[r])) - onehot) * slope)
            }
        }
        return out
    }
}
