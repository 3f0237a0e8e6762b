// RMSNorm forward and input gradient (derivation in Backend/CUDA/Kernels/rmsnorm.cu).

extension CPUReference {
    /// y = bf16(bf16(x * r) * w) with r = 1/sqrt(mean(x^2) + eps), per row of `dim` values (HF's rounding order).
    /// `round` is the 16-bit store (bf16 by default; `ComputeDType.fp16.round` for the fp16 path).
    public static func rmsNormForward(x: [Float], weight: [Float], rows: Int, dim: Int, eps: Float,
                                      round: (Float) -> Float = roundToBF16) -> [Float] {
        var y = [Float](repeating: 0, count: rows * dim)
        for row in 0..<rows {
            var ss = 0.0
            for i in 0..<dim { ss += Double(x[row * dim + i]) * Double(x[row * dim + i]) }
            let r = Float(1 / (ss / Double(dim) + Double(eps)).squareRoot())
            for i in 0..<dim { y[row * dim + i] = round(round(x[row * dim + i] * r) * weight[i]) }
        }
        return y
    }

    /// dx_j = r * (w_j dy_j - x_j r^2 (1/dim) sum_i w_i dy_i x_i).
    public static func rmsNormBackward(x: [Float], weight: [Float], dy: [Float], rows: Int, dim: Int, eps: Float) -> [Float] {
        var dx = [Float](repeating: 0, count: rows * dim)
        for row in 0..<rows {
            var ss = 0.0, dot = 0.0
            for i in 0..<dim {
                let v = Double(x[row * dim + i])
                ss += v * v
                dot += Double(weight[i]) * Double(dy[row * dim + i]) * v
            }
            let r = 1 / (ss / Double(dim) + Double(eps)).squareRoot()
            for j in 0..<dim {
                let g = r * (Double(weight[j]) * Double(dy[row * dim + j]) - Double(x[row * dim + j]) * r * r * dot / Double(dim))
                dx[row * dim + j] = Float(g)
            }
        }
        return dx
    }
}
