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
