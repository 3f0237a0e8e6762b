// Global-norm gradient clipping like torch.nn.utils.clip_grad_norm_ (norm_type 2):
//     total = ‖(‖g₁‖, ‖g₂‖, …)‖ = √(Σ g²) over every gradient
//     coef  = maxNorm / (total + 1e-6), clamped to at most 1; every gradient is multiplied by coef
// (torch multiplies even when coef is 1, a no-op). Norms accumulate in Double here, torch in Float, so
// the reported norm agrees to Float rounding. Also the buffer helpers gradient accumulation needs.

/// Gradient clipping and gradient-buffer helpers.
public enum GradientClipping {
    /// The L2 norm over all buffers together: each buffer's sum of squares, then those sums in buffer order. The
    /// adapters sharded over ranks (Parallel/ShardedAdapters.swift) get each tensor's sum from its owner and combine
    /// them the same way, so the sharded and unsharded runs share the norm's bits.
    public static func globalNorm(_ gradients: [UnsafeBufferPointer<Float>]) -> Double {
        combine(gradients.map(tensorSquares))
    }

    /// Σ g² of one buffer.
    public static func tensorSquares(_ g: UnsafeBufferPointer<Float>) -> Double {
        var total = 0.0
        // Float partial sums in chunks keep the loop vectorizable; Double across chunks keeps it accurate.
        var i = 0
        while i < g.count {
            let end = min(g.count, i + 1024)
            var partial = 0.0
            for j in i..<end { let x = Double(g[j]); partial += x * x }
            total += partial
            i = end
        }
        return total
    }

    /// √(Σ of the buffers' sums of squares), added in buffer order.
    public static func combine(_ squares: [Double]) -> Double {
        var total = 0.0
        for s in squares { total += s }
        return total.squareRoot()
    }

    /// What clip_grad_norm_ multiplies the gradients by: maxNorm / (norm + 1e-6), at most 1.
    public static func coefficient(norm: Double, maxNorm: Double) -> Double { min(1.0, maxNorm / (norm + 1e-6)) }

    /// Scales all gradients so their global L2 norm is at most `maxNorm`; returns the norm before clipping.
    /// A non-finite norm leaves the gradients untouched (the caller decides whether to skip the step).
    @discardableResult
    public static func clip(_ gradients: [UnsafeMutableBufferPointer<Float>], maxNorm: Double) -> Double {
        let total = globalNorm(gradients.map { UnsafeBufferPointer($0) })
        guard total.isFinite else { return total }
        let coefficient = coefficient(norm: total, maxNorm: maxNorm)
        if coefficient < 1 {
            let c = Float(coefficient)
            for g in gradients { scale(g, by: c) }
        }
        return total
    }

    /// Clips gradients held as arrays; returns the norm before clipping.
    @discardableResult
    public static func clip(_ gradients: inout [[Float]], maxNorm: Double) -> Double {
        var total = 0.0
        for g in gradients {
            total += g.withUnsafeBufferPointer { globalNorm([$0]) }.squared
        }
        total = total.squareRoot()
        guard total.isFinite else { return total }
        let coefficient = min(1.0, maxNorm / (total + 1e-6))
        if coefficient < 1 {
            for i in gradients.indices { gradients[i].withUnsafeMutableBufferPointer { scale($0, by: Float(coefficient)) } }
        }
        return total
    }

    /// buffer ← buffer · factor (e.g. 1 / accumulation steps).
    public static func scale(_ buffer: UnsafeMutableBufferPointer<Float>, by factor: Float) {
        guard let p = buffer.baseAddress else { return }
        for i in 0..<buffer.count { p[i] *= factor }
    }

    /// buffer ← 0.
    public static func zero(_ buffer: UnsafeMutableBufferPointer<Float>) {
        guard let p = buffer.baseAddress else { return }
        p.update(repeating: 0, count: buffer.count)
    }

    /// into ← into + other · factor (accumulating a micro-batch's gradient).
    public static func accumulate(_ other: UnsafeBufferPointer<Float>, into buffer: UnsafeMutableBufferPointer<Float>, scale factor: Float = 1) {
        precondition(other.count == buffer.count, "accumulate: \(other.count) values into \(buffer.count)")
        guard let p = buffer.baseAddress, let q = other.baseAddress else { return }
        if factor == 1 {
            for i in 0..<buffer.count { p[i] += q[i] }
        } else {
            for i in 0..<buffer.count { p[i] += q[i] * factor }
        }
    }
}

extension Double {
    fileprivate var squared: Double { self * self }
}
