// Rotary position embedding, HF rotate_half convention (formulas in Backend/CUDA/Kernels/rope.cu).

#if canImport(Glibc)
import Glibc
#endif

extension CPUReference {
    /// inv_freq[i] = 1 / theta^(2i / headDim), i < headDim/2 (plain Llama RoPE; Llama-3 scaling is applied on top).
    public static func ropeInverseFrequencies(headDim: Int, theta: Double) -> [Float] {
        (0..<headDim / 2).map { i in Float(1 / pow(theta, Double(2 * i) / Double(headDim))) }
    }

    /// x: [tokens, heads, headDim]; forward rotates by +theta, `backward` by -theta (the gradient).
    public static func rope(x: [Float], positions: [Int32], inverseFrequencies: [Float], tokens: Int, heads: Int,
                            headDim: Int, backward: Bool = false) -> [Float] {
        var out = x
        let half = headDim / 2
        for t in 0..<tokens {
            for h in 0..<heads {
                let base = (t * heads + h) * headDim
                for i in 0..<half {
                    let angle = Double(Float(positions[t]) * inverseFrequencies[i])
                    let c = cos(angle), s = backward ? -sin(angle) : sin(angle)
                    let a = Double(x[base + i]), b = Double(x[base + i + half])
                    out[base + i] = Float(a * c - b * s)
                    out[base + i + half] = Float(b * c + a * s)
                }
            }
        }
        return out
    }
}
