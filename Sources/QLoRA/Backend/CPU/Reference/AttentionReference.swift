// Causal GQA attention with optional segment ids, forward and backward, computed with the full score matrix
// in Double (formulas in Backend/CUDA/Kernels/attention.cu), with the families' variations: a logit scale other
// than 1/√d, soft-capped logits (c·tanh(x / c), whose derivative 1 − tanh² multiplies dS), a sliding window.

#if canImport(Glibc)
import Glibc
#endif

extension CPUReference {
    /// How logits are made and masked: scale·q·k (then c·tanh(· / c) with a cap); keys j > i − window only.
    public struct AttentionVariation {
        public var scale: Double?
        public var softcap: Double?
        public var window: Int?
        public init(scale: Double? = nil, softcap: Double? = nil, window: Int? = nil) {
            self.scale = scale
            self.softcap = softcap
            self.window = window
        }
    }

    /// Whether query position i of a batch row may see key position j.
    static func attends(_ i: Int, _ j: Int, rowStart: Int, segments: [Int32]?, window: Int? = nil) -> Bool {
        j <= i && (window == nil || j > i - window!) && (segments == nil || segments![rowStart + i] == segments![rowStart + j])
    }

    /// Row i's softmax over the keys it attends (0 elsewhere) and its log-sum-exp, for query head offset `qi` and KV
    /// head `hk` of the batch row starting at token `row`.
    /// `slope[j]` is d logit / d(scale·q·k): 1 − tanh² with a cap, 1 without.
    static func probabilities(q: [Float], k: [Float], qi: Int, i: Int, row: Int, hk: Int, seq: Int, kvHeads: Int, d: Int,
                              scale: Double, softcap: Double?, window: Int?, segments: [Int32]?)
        -> (p: [Double], lse: Double, slope: [Double]) {
        var p = [Double](repeating: 0, count: seq), slope = [Double](repeating: 1, count: seq)
        var m = -Double.infinity
        for j in 0..<seq where attends(i, j, rowStart: row, segments: segments, window: window) {
            let kj = ((row + j) * kvHeads + hk) * d
            var s = 0.0
            for x in 0..<d { s += Double(q[qi + x]) * Double(k[kj + x]) }
            p[j] = s * scale
            if let c = softcap {
                let t = tanh(p[j] / c)
                p[j] = c * t
                slope[j] = 1 - t * t
            }
            m = max(m, p[j])
        }
        var l = 0.0
        for j in 0..<seq where attends(i, j, rowStart: row, segments: segments, window: window) {
            p[j] = exp(p[j] - m)
            l += p[j]
        }
        for j in 0..<seq where attends(i, j, rowStart: row, segments: segments, window: window) { p[j] /= l }
        return (p, m + log(l), slope)
    }

    /// (o, lse). q: [tokens, heads, d]; k, v: [tokens, kvHeads, d]; tokens = batch * seq.
    public static func attentionForward(q: [Float], k: [Float], v: [Float], segments: [Int32]? = nil, batch: Int, seq: Int,
                                        heads: Int, kvHeads: Int, headDim d: Int, variation: AttentionVariation = .init())
        -> (o: [Float], lse: [Float]) {
        var o = [Float](repeating: 0, count: batch * seq * heads * d)
        var lse = [Float](repeating: 0, count: batch * seq * heads)
        let scale = variation.scale ?? 1 / Double(d).squareRoot(), group = heads / kvHeads
        let window = variation.window
        for b in 0..<batch {
            let row = b * seq
            for h in 0..<heads {
                let hk = h / group
                for i in 0..<seq {
                    let qi = ((row + i) * heads + h) * d
                    let (p, rowLSE, _) = probabilities(q: q, k: k, qi: qi, i: i, row: row, hk: hk, seq: seq, kvHeads: kvHeads,
                                                       d: d, scale: scale, softcap: variation.softcap, window: window,
                                                       segments: segments)
                    lse[(row + i) * heads + h] = Float(rowLSE)
                    for j in 0..<seq where attends(i, j, rowStart: row, segments: segments, window: window) {
                        let vj = ((row + j) * kvHeads + hk) * d
                        for x in 0..<d { o[qi + x] += Float(p[j] * Double(v[vj + x])) }
                    }
                }
            }
        }
        return (o, lse)
    }

    /// (dq, dk, dv) for output gradient dout.
    public static func attentionBackward(q: [Float], k: [Float], v: [Float], dout: [Float], segments: [Int32]? = nil,
                                         batch: Int, seq: Int, heads: Int, kvHeads: Int, headDim d: Int,
                                         variation: AttentionVariation = .init())
        -> (dq: [Float], dk: [Float], dv: [Float]) {
        var dq = [Double](repeating: 0, count: q.count), dk = [Double](repeating: 0, count: k.count), dv = dk
        let scale = variation.scale ?? 1 / Double(d).squareRoot(), group = heads / kvHeads
        let window = variation.window
        for b in 0..<batch {
            let row = b * seq
            for h in 0..<heads {
                let hk = h / group
                for i in 0..<seq {
                    let qi = ((row + i) * heads + h) * d
                    let (p, _, slope) = probabilities(q: q, k: k, qi: qi, i: i, row: row, hk: hk, seq: seq, kvHeads: kvHeads,
                                                      d: d, scale: scale, softcap: variation.softcap, window: window,
                                                      segments: segments)
                    // dp_j = dout_i . v_j; delta = sum_j p_j dp_j (= dout_i . o_i); ds_j = p_j (dp_j - delta) slope_j.
                    var dp = [Double](repeating: 0, count: seq)
                    var delta = 0.0
                    for j in 0..<seq where attends(i, j, rowStart: row, segments: segments, window: window) {
                        let vj = ((row + j) * kvHeads + hk) * d
                        for x in 0..<d { dp[j] += Double(dout[qi + x]) * Double(v[vj + x]) }
                        delta += p[j] * dp[j]
                    }
                    for j in 0..<seq where attends(i, j, rowStart: row, segments: segments, window: window) {
                        let ds = p[j] * (dp[j] - delta) * slope[j]
                        let kj = ((row + j) * kvHeads + hk) * d
                        for x in 0..<d {
                            dq[qi + x] += scale * ds * Double(k[kj + x])
                            dk[kj + x] += scale * ds * Double(q[qi + x])
                            dv[kj + x] += p[j] * Double(dout[qi + x])
                        }
                    }
                }
            }
        }
        return (dq.map(Float.init), dk.map(Float.init), dv.map(Float.init))
    }
}
