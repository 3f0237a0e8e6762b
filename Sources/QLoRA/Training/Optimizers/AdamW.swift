// AdamW with fp32 state, in two arithmetics that agree to rounding:
//
// torch (`torch.optim.AdamW`, the single-tensor path torch takes on the CPU), per element, step t:
//     p  ← p · (1 − lr·wd)                                 decoupled decay first (when wd ≠ 0)
//     m  ← lerp(m, g, 1 − β1)                              = m + (1 − β1)(g − m)
//     v  ← v·β2 + (1 − β2)·g·g
//     p  ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//   with the scalars (1 − lr·wd, lr / bc1, √bc2) computed in Double, as Python does, then used as Float.
//   torch's vectorized CPU kernels fuse some of these multiply-adds (lerp, addcmul); fused multiply-adds
//   would cost a library call per element on the baseline x86-64 target, so results agree with torch to
//   about one ulp (relative error ~4e-10 on the fixture) rather than bit for bit.
//
// bitsandbytes (`kOptimizer32bit2State<ADAM>`, used by `paged_adamw_32bit` and by 8-bit AdamW for
// tensors under 4096 elements), all in Float:
//     c1 = 1 − β1^t,  c2 = √(1 − β2^t),  stepSize = −lr·c2 / c1
//     m  ← m·β1 + (1 − β1)·g
//     v  ← v·β2 + (1 − β2)·(g·g)
//     p  ← p + stepSize · m / (√v + ε·c2)
//     p  ← p · (1 − lr·wd)                                 decay after the update (when wd > 0)
//
// State records: `state.<param>.exp_avg`, `state.<param>.exp_avg_sq` (F32) and `optimizer.step`.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The first and second moments of one tensor.
final class AdamMoments {
    var expAvg: [Float]
    var expAvgSq: [Float]

    init(count: Int) {
        expAvg = [Float](repeating: 0, count: count)
        expAvgSq = [Float](repeating: 0, count: count)
    }

    init(expAvg: [Float], expAvgSq: [Float]) {
        self.expAvg = expAvg
        self.expAvgSq = expAvgSq
    }
}

/// AdamW with fp32 state (torch's, or bitsandbytes' 32-bit kernel's order of operations).
public final class AdamW: Optimizer {
    /// Whose order of floating-point operations to follow.
    public enum Arithmetic: Sendable {
        /// torch.optim.AdamW: weight decay before the update.
        case torch
        /// bitsandbytes' 32-bit kernel: weight decay after the update.
        case bitsandbytes
    }

    public let kind: OptimizerKind
    public let hyperparameters: AdamWHyperparameters
    public let arithmetic: Arithmetic
    public private(set) var stepCount = 0
    var moments: [String: AdamMoments] = [:]

    public init(_ hyperparameters: AdamWHyperparameters = AdamWHyperparameters(), arithmetic: Arithmetic = .torch,
                kind: OptimizerKind? = nil) throws {
        try hyperparameters.validate()
        self.hyperparameters = hyperparameters
        self.arithmetic = arithmetic
        self.kind = kind ?? (arithmetic == .torch ? .adamw : .pagedAdamw32bit)
    }

    public func step(_ slots: [ParameterSlot], learningRate: Double) throws {
        try checkSlots(slots)
        let t = stepCount + 1
        // Every state first, so that a size mismatch throws before any parameter has changed.
        let states = try slots.map { try fetchMoments(for: $0.name, count: $0.values.count, existing: &moments) }
        for (slot, state) in zip(slots, states) {
            switch arithmetic {
            case .torch:
                AdamW.torchUpdate(slot.values, slot.gradient, state, step: t, lr: learningRate, hyperparameters)
            case .bitsandbytes:
                AdamW.bitsandbytesUpdate(slot.values, slot.gradient, state, step: t, lr: learningRate, hyperparameters)
            }
        }
        stepCount = t
    }

    public func state() -> [TensorRecord] {
        var records = [OptimizerStateRecords.step(stepCount)]
        for name in moments.keys.sorted() {
            let m = moments[name]!
            records.append(OptimizerStateRecords.floats("state.\(name).exp_avg", m.expAvg))
            records.append(OptimizerStateRecords.floats("state.\(name).exp_avg_sq", m.expAvgSq))
        }
        return records
    }

    public func load(state file: SafeTensorsFile) throws {
        let step = try OptimizerStateRecords.readStep(file)
        moments = try AdamW.readMoments(file, allowing: [])
        stepCount = step
    }

    public func retainState(of names: Set<String>) { moments = moments.filter { names.contains($0.key) } }

    /// Reads every `state.<p>.exp_avg` / `exp_avg_sq` pair; other `state.` buffers must be in `allowing`.
    static func readMoments(_ file: SafeTensorsFile, allowing: Set<String>) throws -> [String: AdamMoments] {
        var avg: [String: [Float]] = [:], avgSq: [String: [Float]] = [:]
        for info in file.tensors where info.name != OptimizerStateRecords.stepName {
            guard let (parameter, buffer) = OptimizerStateRecords.split(info.name) else {
                throw FileFormatError(file: file.path, place: "tensor '\(info.name)'", "expected names 'state.<parameter>.<buffer>' or '\(OptimizerStateRecords.stepName)'")
            }
            switch buffer {
            case "exp_avg": avg[parameter] = try OptimizerStateRecords.readFloats(file, info)
            case "exp_avg_sq": avgSq[parameter] = try OptimizerStateRecords.readFloats(file, info)
            default:
                guard allowing.contains(buffer) else {
                    throw FileFormatError(file: file.path, place: "tensor '\(info.name)'", "unknown optimizer state buffer '\(buffer)' (expected exp_avg or exp_avg_sq)")
                }
            }
        }
        var result: [String: AdamMoments] = [:]
        for (parameter, m) in avg {
            guard let v = avgSq[parameter], v.count == m.count else {
                throw FileFormatError(file: file.path, place: "tensor 'state.\(parameter).exp_avg_sq'", "missing, or not the size of exp_avg (\(m.count) values)")
            }
            result[parameter] = AdamMoments(expAvg: m, expAvgSq: v)
        }
        if let orphan = avgSq.keys.first(where: { avg[$0] == nil }) {
            throw FileFormatError(file: file.path, place: "tensor 'state.\(orphan).exp_avg'", "missing (exp_avg_sq is present)")
        }
        return result
    }

    // MARK: Kernels

    /// torch.optim.AdamW's single-tensor update of one tensor.
    static func torchUpdate(_ p: UnsafeMutableBufferPointer<Float>, _ g: UnsafeBufferPointer<Float>, _ state: AdamMoments,
                            step t: Int, lr: Double, _ h: AdamWHyperparameters) {
        let n = p.count
        let decay = h.weightDecay != 0 ? Float(1 - lr * h.weightDecay) : 1
        let weight1 = Float(1 - h.beta1)
        let beta2 = Float(h.beta2), weight2 = Float(1 - h.beta2)
        let biasCorrection1 = 1 - pow(h.beta1, Double(t))
        let biasCorrection2Sqrt = Float((1 - pow(h.beta2, Double(t))).squareRoot())
        let negStepSize = Float(-(lr / biasCorrection1))
        let eps = Float(h.eps)
        // torch's lerp: start + w·(end − start) when w < 0.5, else end − (end − start)·(1 − w).
        let lerpLow = weight1 < 0.5
        let oneMinusWeight1 = 1 - weight1
        // Multiplying by a decay of exactly 1 (weight decay 0) changes nothing, so the loops need no branch on it.
        state.expAvg.withUnsafeMutableBufferPointer { m in
            state.expAvgSq.withUnsafeMutableBufferPointer { v in
                guard let p = p.baseAddress, let g = g.baseAddress, let m = m.baseAddress, let v = v.baseAddress else { return }
                if lerpLow {
                    for i in 0..<n {
                        let gi = g[i]
                        let mi = m[i] + weight1 * (gi - m[i])
                        let vi = v[i] * beta2 + weight2 * gi * gi
                        p[i] = p[i] * decay + negStepSize * (mi / (vi.squareRoot() / biasCorrection2Sqrt + eps))
                        m[i] = mi
                        v[i] = vi
                    }
                } else {
                    for i in 0..<n {
                        let gi = g[i]
                        let mi = gi - (gi - m[i]) * oneMinusWeight1
                        let vi = v[i] * beta2 + weight2 * gi * gi
                        p[i] = p[i] * decay + negStepSize * (mi / (vi.squareRoot() / biasCorrection2Sqrt + eps))
                        m[i] = mi
                        v[i] = vi
                    }
                }
            }
        }
    }

    /// bitsandbytes' kOptimizer32bit2State<ADAM> on one tensor.
    static func bitsandbytesUpdate(_ p: UnsafeMutableBufferPointer<Float>, _ g: UnsafeBufferPointer<Float>, _ state: AdamMoments,
                                   step t: Int, lr: Double, _ h: AdamWHyperparameters) {
        let n = p.count
        let c = BitsandbytesAdamScalars(step: t, lr: lr, h)
        state.expAvg.withUnsafeMutableBufferPointer { m in
            state.expAvgSq.withUnsafeMutableBufferPointer { v in
                guard let p = p.baseAddress, let g = g.baseAddress, let m = m.baseAddress, let v = v.baseAddress else { return }
                for i in 0..<n {
                    let gi = g[i]
                    let mi = m[i] * c.beta1 + c.oneMinusBeta1 * gi
                    let vi = v[i] * c.beta2 + c.oneMinusBeta2 * (gi * gi)
                    p[i] = (p[i] + c.stepSize * (mi / (vi.squareRoot() + c.epsCorrection2))) * c.decay
                    m[i] = mi
                    v[i] = vi
                }
            }
        }
    }
}

/// The Float scalars of a bitsandbytes Adam kernel call at step t.
struct BitsandbytesAdamScalars {
    let beta1, beta2, oneMinusBeta1, oneMinusBeta2: Float
    let correction2, stepSize, epsCorrection2: Float
    /// 1 − lr·wd, or exactly 1 when wd is 0 (the kernel then skips the multiplication; ×1 is the same).
    let decay: Float

    init(step t: Int, lr: Double, _ h: AdamWHyperparameters) {
        beta1 = Float(h.beta1)
        beta2 = Float(h.beta2)
        oneMinusBeta1 = 1 - beta1
        oneMinusBeta2 = 1 - beta2
        let lr = Float(lr), eps = Float(h.eps), wd = Float(h.weightDecay)
        let correction1 = 1 - powf(beta1, Float(t))
        correction2 = (1 - powf(beta2, Float(t))).squareRoot()
        stepSize = (-lr * correction2) / correction1
        epsCorrection2 = eps * correction2
        decay = wd > 0 ? 1 - lr * wd : 1
    }
}

/// Checks a step's slots: no name twice.
func checkSlots(_ slots: [ParameterSlot]) throws {
    var seen = Set<String>()
    for s in slots {
        guard seen.insert(s.name).inserted else { throw UsageError("optimizer step: parameter '\(s.name)' is given twice") }
        guard s.values.count == s.gradient.count else {
            throw UsageError("optimizer step: parameter '\(s.name)' has \(s.values.count) values but its gradient \(s.gradient.count)")
        }
    }
}

/// The moments of `name`, created at zero on first use; a size change is an error.
func fetchMoments(for name: String, count: Int, existing: inout [String: AdamMoments]) throws -> AdamMoments {
    if let m = existing[name] {
        guard m.expAvg.count == count else {
            throw UsageError("optimizer state of '\(name)' holds \(m.expAvg.count) values but the parameter has \(count)")
        }
        return m
    }
    let m = AdamMoments(count: count)
    existing[name] = m
    return m
}
