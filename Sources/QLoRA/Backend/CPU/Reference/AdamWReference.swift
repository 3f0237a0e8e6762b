// One AdamW step, torch.optim.AdamW semantics (formula in Backend/CUDA/Kernels/adamw.cu).

#if canImport(Glibc)
import Glibc
#endif

extension CPUReference {
    public static func adamwStep(params: inout [Float], grads: [Float], m: inout [Float], v: inout [Float], step: Int,
                                 learningRate lr: Float, beta1: Float, beta2: Float, eps: Float, weightDecay: Float) {
        let bc1 = 1 - pow(Double(beta1), Double(step))
        let bc2 = 1 - pow(Double(beta2), Double(step))
        for i in params.indices {
            let g = Double(grads[i])
            var p = Double(params[i]) * (1 - Double(lr) * Double(weightDecay))
            let mi = Double(beta1) * Double(m[i]) + (1 - Double(beta1)) * g
            let vi = Double(beta2) * Double(v[i]) + (1 - Double(beta2)) * g * g
            p -= Double(lr) / bc1 * mi / (vi.squareRoot() / bc2.squareRoot() + Double(eps))
            m[i] = Float(mi)
            v[i] = Float(vi)
            params[i] = Float(p)
        }
    }
}
