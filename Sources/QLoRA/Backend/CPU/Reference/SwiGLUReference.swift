// SwiGLU: h = silu(gate) * up, and its backward (formulas in Backend/CUDA/Kernels/swiglu.cu).

#if canImport(Glibc)
import Glibc
#endif

extension CPUReference {
    static func sigmoid(_ x: Double) -> Double { 1 / (1 + exp(-x)) }

    public static func swigluForward(gate: [Float], up: [Float]) -> [Float] {
        gate.indices.map { i in
            let g = Double(gate[i])
            return Float(g * sigmoid(g) * Double(up[i]))
        }
    }

    /// (dgate, dup) given dh.
    public static func swigluBackward(dh: [Float], gate: [Float], up: [Float]) -> (dgate: [Float], dup: [Float]) {
        var dgate = [Float](repeating: 0, count: gate.count), dup = dgate
        for i in gate.indices {
            let d = Double(dh[i]), g = Double(gate[i]), u = Double(up[i])
            let s = sigmoid(g)
            dup[i] = Float(d * g * s)
            dgate[i] = Float(d * u * s * (1 + g * (1 - s)))
        }
        return (dgate, dup)
    }
}
