// The decoder block's element-wise and attention ops on the CPU, fp32: the readable reference
// that every other backend is checked against. Shapes are in the comments: T tokens, H hidden.
//
// Variations (DecoderConfig) and their derivatives, used by DecoderBackward.swift:
// - RMSNorm times (w + o), o = 0 (Llama) or 1 (Gemma): the Llama formulas with w + o in place of w.
// - GeGLU, a = gelu(g)·u with gelu(g) = ½g(1 + tanh(k(g + 0.044715g³))), k = √(2/π):
//     du = da·gelu(g)     dg = da·u·(½(1 + t) + ½g(1 − t²)·k(1 + 3·0.044715g²)),  t = tanh(k(g + 0.044715g³))
// - Soft-capping, y = c·tanh(x / c):  dx = dy·(1 − (y / c)²)
// - Attention with logit scale s (head_dim^-½, or query_pre_attn_scalar^-½) and optional cap c:
//     S = cap(s·Q·Kᵀ), P = softmax(S + mask);  dS = P⊙(dP − rowsum(dP⊙P)),  dRaw = dS⊙(1 − (S / c)²),
//     dQ = dRaw·K·s,  dK = dRawᵀ·Q·s.  The mask of a sliding-window layer hides keys more than window − 1 back.

#if canImport(Glibc)
import Glibc
#endif

public enum CPUOps {
    // MARK: - RMSNorm

    /// y[t,:] = x[t,:] / sqrt(mean(x[t,:]²) + eps) * weight.   x, y: [T, H]; weight: [H]
    public static func rmsNorm(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, eps: Float,
                               rows: Int, width: Int, into y: UnsafeMutablePointer<Float>) {
        for t in 0..<rows {
            let row = x + t * width
            let out = y + t * width
            let meanSquare = CPUMatmul.dot(row, row, width) / Float(width)
            let inverse = 1 / (meanSquare + eps).squareRoot()
            for i in 0..<width { out[i] = row[i] * inverse * weight[i] }
        }
    }

    /// The same with the norm's weight as stored and `offset` added to it: y = x·r·(w + offset), Gemma's (1 + w) with offset 1.
    /// `y` may be `x` (each row is read before it is written).
    public static func rmsNorm(_ x: UnsafePointer<Float>, weight: [Float], offset: Float, eps: Float,
                               rows: Int, width: Int, into y: UnsafeMutablePointer<Float>) {
        precondition(weight.count == width, "norm weight of \(weight.count) for rows of \(width)")
        weight.withUnsafeBufferPointer { w in
            if offset == 0 { return rmsNorm(x, weight: w.baseAddress!, eps: eps, rows: rows, width: width, into: y) }
            let shifted = w.map { $0 + offset }
            shifted.withUnsafeBufferPointer { rmsNorm(x, weight: $0.baseAddress!, eps: eps, rows: rows, width: width, into: y) }
        }
    }

    /// The backward of `rmsNorm(_:weight:offset:…)`.
    public static func rmsNormBackward(_ x: UnsafePointer<Float>, weight: [Float], offset: Float, eps: Float,
                                       outputGradient dy: UnsafePointer<Float>, rows: Int, width: Int,
                                       into dx: UnsafeMutablePointer<Float>, accumulate: Bool) {
        precondition(weight.count == width, "norm weight of \(weight.count) for rows of \(width)")
        let shifted = offset == 0 ? weight : weight.map { $0 + offset }
        shifted.withUnsafeBufferPointer {
            rmsNormBackward(x, weight: $0.baseAddress!, eps: eps, outputGradient: dy, rows: rows, width: width, into: dx, accumulate: accumulate)
        }
    }

    // MARK: - Soft-capping

    /// x ← c·tanh(x / c), in place, as transformers computes it (divide, tanh, multiply).
    public static func softcap(_ x: UnsafeMutablePointer<Float>, count: Int, cap: Float) {
        for i in 0..<count { x[i] = tanhf(x[i] / cap) * cap }
    }

    // MARK: - Rotary embeddings

    /// Rotates pairs (i, i + R/2) of the first R = `table.rotaryDim` dimensions of each head by angle
    /// position · invFreq[i], HF's `rotate_half` layout on that slice; dimensions R..<D pass through (partial rotary).
    /// x: [T, heads, D], in place; positions: [T]. `long`: longrope's long-factor table.
    /// With `inverse`, applies the transpose: the rotation by the opposite angle, times the same cos/sin scale
    /// (longrope's attention factor m: the forward is m·R(θ), whose transpose is m·R(−θ)) — the backward.
    public static func applyRope(_ x: UnsafeMutablePointer<Float>, positions: UnsafePointer<Int32>, rows: Int, heads: Int,
                                 headDim: Int, table: RopeTable, long: Bool = false, inverse: Bool = false) {
        let direction: Float = inverse ? -1 : 1
        let rotated = table.rotaryDim
        precondition(rotated <= headDim, "rotary dimension \(rotated) exceeds the head dimension \(headDim)")
        let half = rotated / 2
        table.withValues(long: long) { cosTable, sinTable in
        for t in 0..<rows {
            let cos = cosTable + Int(positions[t]) * rotated
            let sin = sinTable + Int(positions[t]) * rotated
            for h in 0..<heads {
                let v = x + (t * heads + h) * headDim
                for i in 0..<half {
                    let a = v[i], b = v[i + half]
                    v[i] = a * cos[i] - b * sin[i] * direction
                    v[i + half] = b * cos[i + half] + a * sin[i + half] * direction
                }
            }
        }
        }
    }

    /// dx (+)= r·(dy⊙w) − x·r³·mean(dy⊙w⊙x), r = (mean(x²) + eps)^-½.   x, dy, dx: [T, H]
    public static func rmsNormBackward(_ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, eps: Float,
                                       outputGradient dy: UnsafePointer<Float>, rows: Int, width: Int,
                                       into dx: UnsafeMutablePointer<Float>, accumulate: Bool) {
        for t in 0..<rows {
            let row = x + t * width, g = dy + t * width, out = dx + t * width
            let r = 1 / (CPUMatmul.dot(row, row, width) / Float(width) + eps).squareRoot()
            var projection: Float = 0
            for i in 0..<width { projection += g[i] * weight[i] * row[i] }
            let correction = r * r * r * projection / Float(width)
            for i in 0..<width {
                let value = r * g[i] * weight[i] - row[i] * correction
                out[i] = accumulate ? out[i] + value : value
            }
        }
    }

    // MARK: - Fused projections

    /// Copies the column blocks of `fused` [T, Σ widths] into `parts` ([T, width] each), left to right: the split
    /// of a fused projection's output (Phi-3's q | k | v and gate | up).
    public static func splitColumns(_ fused: UnsafePointer<Float>, rows: Int, into parts: [(UnsafeMutablePointer<Float>, Int)]) {
        let total = parts.reduce(0) { $0 + $1.1 }
        for t in 0..<rows {
            var offset = 0
            for (part, width) in parts {
                (part + t * width).update(from: fused + t * total + offset, count: width)
                offset += width
            }
        }
    }

    /// The reverse of `splitColumns`: `parts` side by side into `fused` — the gradient of the split.
    public static func joinColumns(_ parts: [(UnsafePointer<Float>, Int)], rows: Int, into fused: UnsafeMutablePointer<Float>) {
        let total = parts.reduce(0) { $0 + $1.1 }
        for t in 0..<rows {
            var offset = 0
            for (part, width) in parts {
                (fused + t * total + offset).update(from: part + t * width, count: width)
                offset += width
            }
        }
    }

    // MARK: - SwiGLU

    /// out = silu(gate) * up, silu(g) = g / (1 + e^-g).   All [T, I].
    public static func swiglu(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, count: Int, into out: UnsafeMutablePointer<Float>) {
        for i in 0..<count {
            let g = gate[i]
            out[i] = g / (1 + expf(-g)) * up[i]
        }
    }

    /// du = da·silu(g); dg = da·u·σ(g)·(1 + g·(1 − σ(g))).
    public static func swigluBackward(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, outputGradient da: UnsafePointer<Float>,
                                      count: Int, gateGradient dg: UnsafeMutablePointer<Float>, upGradient du: UnsafeMutablePointer<Float>) {
        for i in 0..<count {
            let g = gate[i]
            let sigmoid = 1 / (1 + expf(-g))
            du[i] = da[i] * g * sigmoid
            dg[i] = da[i] * up[i] * sigmoid * (1 + g * (1 - sigmoid))
        }
    }

    // MARK: - GeGLU (tanh GELU)

    /// gelu(g) = ½·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))), PyTorch's `gelu(approximate="tanh")`.
    @inline(__always)
    static func geluTanh(_ g: Float) -> (value: Float, tanh: Float) {
        let k: Float = 0.7978845608028654  // √(2/π)
        let t = tanhf(k * (g + 0.044715 * g * g * g))
        return (0.5 * g * (1 + t), t)
    }

    /// out = gelu(gate) * up.   All [T, I].
    public static func geglu(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, count: Int, into out: UnsafeMutablePointer<Float>) {
        for i in 0..<count { out[i] = geluTanh(gate[i]).value * up[i] }
    }

    /// du = da·gelu(g); dg = da·u·(½(1 + t) + ½g(1 − t²)·√(2/π)·(1 + 3·0.044715·g²)).
    public static func gegluBackward(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, outputGradient da: UnsafePointer<Float>,
                                     count: Int, gateGradient dg: UnsafeMutablePointer<Float>, upGradient du: UnsafeMutablePointer<Float>) {
        let k: Float = 0.7978845608028654
        for i in 0..<count {
            let g = gate[i]
            let (value, t) = geluTanh(g)
            du[i] = da[i] * value
            dg[i] = da[i] * up[i] * (0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * 0.044715 * g * g))
        }
    }

    /// The MLP's gated activation, act(gate)·up, for the family's activation. `out` may be `gate`.
    public static func gatedActivation(_ activation: MLPActivation, gate: UnsafePointer<Float>, up: UnsafePointer<Float>,
                                       count: Int, into out: UnsafeMutablePointer<Float>) {
        switch activation {
        case .silu: swiglu(gate: gate, up: up, count: count, into: out)
        case .geluTanh: geglu(gate: gate, up: up, count: count, into: out)
        }
    }

    /// The backward of `gatedActivation`.
    public static func gatedActivationBackward(_ activation: MLPActivation, gate: UnsafePointer<Float>, up: UnsafePointer<Float>,
                                               outputGradient da: UnsafePointer<Float>, count: Int,
                                               gateGradient dg: UnsafeMutablePointer<Float>, upGradient du: UnsafeMutablePointer<Float>) {
        switch activation {
        case .silu: swigluBackward(gate: gate, up: up, outputGradient: da, count: count, gateGradient: dg, upGradient: du)
        case .geluTanh: gegluBackward(gate: gate, up: up, outputGradient: da, count: count, gateGradient: dg, upGradient: du)
        }
    }

    // MARK: - Attention

    /// Causal grouped-query attention of T new queries against a cache of keys and values.
    ///   q: [T, heads, D]; keys, values: [S, kvHeads, D] (S ≥ positions seen so far); out: [T, heads, D]
    /// Query t attends to cache rows `visible(t)`: for plain decoding 0...start+t; for packed
    /// sequences only the rows of its own example.
    /// Logits are q·k times `scale` (default head_dim^-½), then c·tanh(logit / c) when `softcap` is c.
    public static func attention(q: UnsafePointer<Float>, keys: UnsafePointer<Float>, values: UnsafePointer<Float>,
                                 rows: Int, heads: Int, kvHeads: Int, headDim: Int, scale: Float? = nil, softcap: Float? = nil,
                                 visible: (Int) -> Range<Int>, into out: UnsafeMutablePointer<Float>) {
        let group = heads / kvHeads
        let scale = scale ?? 1 / Float(headDim).squareRoot()
        let kvStride = kvHeads * headDim
        let cacheRows = visible(rows - 1).upperBound
        CPUParallelism.forEach(heads, work: rows * heads * headDim * cacheRows) { h in
            let g = h / group
            // Raw scratch, no per-element bounds checks in the loops over cache rows; the range is checked once per query.
            let scores = UnsafeMutablePointer<Float>.allocate(capacity: cacheRows)
            defer { scores.deallocate() }
            for t in 0..<rows {
                let range = visible(t)
                precondition(range.lowerBound >= 0 && range.upperBound <= cacheRows, "query \(t) sees rows \(range) of \(cacheRows)")
                let query = q + (t * heads + h) * headDim
                var maximum = -Float.infinity
                for s in range {
                    var score = CPUMatmul.dot(query, keys + s * kvStride + g * headDim, headDim) * scale
                    if let softcap { score = tanhf(score / softcap) * softcap }
                    scores[s] = score
                    maximum = max(maximum, score)
                }
                var total: Float = 0
                for s in range {
                    let e = expf(scores[s] - maximum)
                    scores[s] = e
                    total += e
                }
                let o = out + (t * heads + h) * headDim
                for i in 0..<headDim { o[i] = 0 }
                let inverse = 1 / total
                for s in range {
                    let w = scores[s] * inverse
                    let v = values + s * kvStride + g * headDim
                    for i in 0..<headDim { o[i] += w * v[i] }
                }
            }
        }
    }
}

/// cos/sin of position · inverse frequency, precomputed per position, duplicated over both halves of the rotated
/// dimensions, times longrope's attention factor (1 otherwise). Longrope models have a second table, of the long factors.
public final class RopeTable: @unchecked Sendable {
    /// The rotated leading dimensions of a head (`DecoderConfig.rotaryDim`).
    public let rotaryDim: Int
    public private(set) var positions: Int
    private var short: (cos: [Float], sin: [Float]) = ([], [])
    private var long: (cos: [Float], sin: [Float])?
    private let shortFrequencies: [Double]
    private let longFrequencies: [Double]?
    private let scale: Float

    /// The table of the full-attention layers' RoPE.
    public convenience init(config: DecoderConfig, positions: Int = 256) {
        self.init(config: config, rope: RopeParameters(theta: config.ropeTheta, scaling: config.ropeScaling), positions: positions)
    }

    /// The table of `rope` (a layer type's own base and scaling).
    public init(config: DecoderConfig, rope: RopeParameters, positions: Int = 256) {
        rotaryDim = config.rotaryDim
        shortFrequencies = config.ropeInverseFrequencies(rope)
        let isLongrope = rope.scaling.kind == .longrope
        longFrequencies = isLongrope ? config.ropeInverseFrequencies(rope, long: true) : nil
        if isLongrope { long = ([], []) }
        scale = Float(isLongrope ? rope.scaling.attentionFactor : 1)
        self.positions = 0
        grow(to: positions)
    }

    /// Extends the table so positions < `count` are available.
    public func grow(to count: Int) {
        guard count > positions else { return }
        Self.append(positions..<count, frequencies: shortFrequencies, scale: scale, to: &short)
        if let longFrequencies, var table = long {
            long = nil  // uniquely referenced while it grows
            Self.append(positions..<count, frequencies: longFrequencies, scale: scale, to: &table)
            long = table
        }
        positions = count
    }

    private static func append(_ range: Range<Int>, frequencies: [Double], scale: Float, to table: inout (cos: [Float], sin: [Float])) {
        let half = frequencies.count
        table.cos.reserveCapacity(range.upperBound * 2 * half)
        table.sin.reserveCapacity(range.upperBound * 2 * half)
        for p in range {
            // transformers computes the angle in fp32: inv_freq (fp32) times the position (fp32); then cos·scale in fp32.
            var angles = [Float](repeating: 0, count: 2 * half)
            for i in 0..<half {
                let angle = Float(frequencies[i]) * Float(p)
                angles[i] = angle
                angles[i + half] = angle
            }
            table.cos += angles.map { cosf($0) * scale }
            table.sin += angles.map { sinf($0) * scale }
        }
    }

    /// The cos and sin tables, [positions, rotaryDim] each; `long`: longrope's long-factor tables.
    @inline(__always)
    func withValues<R>(long useLong: Bool = false, _ body: (UnsafePointer<Float>, UnsafePointer<Float>) -> R) -> R {
        precondition(!useLong || long != nil, "long rope factors asked of a model without longrope")
        let table = useLong ? long! : short
        return table.cos.withUnsafeBufferPointer { c in table.sin.withUnsafeBufferPointer { s in body(c.baseAddress!, s.baseAddress!) } }
    }
}

extension CPUOps {
    /// The backward of `attention` for one sequence (the cache is the sequence itself, S = T):
    /// recomputes P per query, then dV = Pᵀ·dO, dS = P⊙(dP − rowsum(dP⊙P)), dQ = dS·K·c, dK = dSᵀ·Q·c.
    /// Gradients are written (not accumulated); key and value gradients sum over the heads of a group.
    /// With `softcap` c, dS is multiplied by 1 − (S / c)², the derivative of the cap at the capped logit S.
    public static func attentionBackward(q: UnsafePointer<Float>, keys: UnsafePointer<Float>, values: UnsafePointer<Float>,
                                         outputGradient dOut: UnsafePointer<Float>,
                                         rows: Int, heads: Int, kvHeads: Int, headDim: Int, scale: Float? = nil, softcap: Float? = nil,
                                         visible: (Int) -> Range<Int>,
                                         queryGradient dq: UnsafeMutablePointer<Float>, keyGradient dk: UnsafeMutablePointer<Float>,
                                         valueGradient dv: UnsafeMutablePointer<Float>) {
        let group = heads / kvHeads
        let scale = scale ?? 1 / Float(headDim).squareRoot()
        let kvStride = kvHeads * headDim
        let qStride = heads * headDim
        for i in 0..<(rows * kvStride) { dk[i] = 0; dv[i] = 0 }
        // One task per KV head, so that no two threads write the same key/value gradient rows.
        CPUParallelism.forEach(kvHeads, work: rows * rows * headDim * heads) { g in
            // Raw scratch, no per-element bounds checks in the loops over keys; the range is checked once per query.
            let p = UnsafeMutablePointer<Float>.allocate(capacity: rows)
            let dp = UnsafeMutablePointer<Float>.allocate(capacity: rows)
            // 1 − tanh² of each capped logit (1 without a cap).
            let capSlope = UnsafeMutablePointer<Float>.allocate(capacity: rows)
            defer { p.deallocate(); dp.deallocate(); capSlope.deallocate() }
            for h in (g * group)..<((g + 1) * group) {
                for t in 0..<rows {
                    let range = visible(t)
                    precondition(range.lowerBound >= 0 && range.upperBound <= rows, "query \(t) sees rows \(range) of \(rows)")
                    let query = q + t * qStride + h * headDim
                    let dO = dOut + t * qStride + h * headDim
                    var maximum = -Float.infinity
                    for s in range {
                        p[s] = CPUMatmul.dot(query, keys + s * kvStride + g * headDim, headDim) * scale
                        if let softcap {
                            let t = tanhf(p[s] / softcap)
                            p[s] = t * softcap
                            capSlope[s] = 1 - t * t
                        } else {
                            capSlope[s] = 1
                        }
                        maximum = max(maximum, p[s])
                    }
                    var total: Float = 0
                    for s in range { p[s] = expf(p[s] - maximum); total += p[s] }
                    var rowSum: Float = 0
                    for s in range {
                        p[s] /= total
                        dp[s] = CPUMatmul.dot(dO, values + s * kvStride + g * headDim, headDim)
                        rowSum += dp[s] * p[s]
                    }
                    let dQuery = dq + t * qStride + h * headDim
                    for i in 0..<headDim { dQuery[i] = 0 }
                    for s in range {
                        let dValue = dv + s * kvStride + g * headDim
                        for i in 0..<headDim { dValue[i] += p[s] * dO[i] }
                        let ds = p[s] * (dp[s] - rowSum) * capSlope[s] * scale
                        let key = keys + s * kvStride + g * headDim
                        let dKey = dk + s * kvStride + g * headDim
                        for i in 0..<headDim {
                            dQuery[i] += ds * key[i]
                            dKey[i] += ds * query[i]
                        }
                    }
                }
            }
        }
    }
}
