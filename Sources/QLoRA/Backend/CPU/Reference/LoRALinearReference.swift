// A linear layer with a LoRA adapter, forward and backward (formulas in Backend/CUDA/Ops/LoRALinear.swift).

extension CPUReference {
    /// y = x W^T + s (x A^T) B^T. x [tokens, in], W [out, in], A [r, in], B [out, r].
    public static func loraLinearForward(x: [Float], weight: [Float], a: [Float], b: [Float], scale: Float, tokens: Int,
                                         inFeatures: Int, outFeatures: Int, rank: Int) -> [Float] {
        let base = matmul(x, weight, m: tokens, n: outFeatures, k: inFeatures, transB: true)
        let xa = matmul(x, a, m: tokens, n: rank, k: inFeatures, transB: true)
        let delta = matmul(xa, b, m: tokens, n: outFeatures, k: rank, transB: true)
        return zip(base, delta).map { $0 + scale * $1 }
    }

    /// (dx, dA, dB) for output gradient dy.
    public static func loraLinearBackward(x: [Float], weight: [Float], a: [Float], b: [Float], scale: Float, dy: [Float],
                                          tokens: Int, inFeatures: Int, outFeatures: Int, rank: Int)
        -> (dx: [Float], dA: [Float], dB: [Float]) {
        let xa = matmul(x, a, m: tokens, n: rank, k: inFeatures, transB: true)
        let dyB = matmul(dy, b, m: tokens, n: rank, k: outFeatures)
        let dB = matmul(dy, xa, m: outFeatures, n: rank, k: tokens, transA: true).map { scale * $0 }
        let dA = matmul(dyB, x, m: rank, n: inFeatures, k: tokens, transA: true).map { scale * $0 }
        let dxBase = matmul(dy, weight, m: tokens, n: inFeatures, k: outFeatures)
        let dxLoRA = matmul(dyB, a, m: tokens, n: inFeatures, k: rank)
        return (zip(dxBase, dxLoRA).map { $0 + scale * $1 }, dA, dB)
    }
}
