import XCTest
@testable import QLoRA

/// Checks of the naive CPU references the GPU ops are compared against: gradients against finite differences,
/// forward passes against hand-worked values.
final class CPUReferenceTests: XCTestCase {
    /// Seeded, so that a failure reproduces.
    private var rng = SeededGenerator(seed: 20261123)
    private func random(_ n: Int, _ range: ClosedRange<Float> = -1...1) -> [Float] {
        (0..<n).map { _ in Float.random(in: range, using: &rng) }
    }

    func testNF4DequantizeUsesHighNibbleFirst() {
        // Byte 0x0F: element 0 = code[0] = -1, element 1 = code[15] = +1; byte 0x78: code[7] = 0, code[8].
        let out = CPUReference.nf4Dequantize(packed: [0x0F, 0x78], absmax: [2.0], blocksize: 64, count: 4)
        XCTAssertEqual(out, [-2.0, 2.0, 0.0, 2 * 0.07958029955625534])
    }

    func testNF4BlockScalesAndDoubleQuant() {
        let code = (0..<256).map { Float($0) / 255 }
        let absmax = CPUReference.doubleQuantAbsmax(quantized: [0, 255, 51], code: code, nestedAbsmax: [3.0],
                                                    offset: 0.5, nestedBlocksize: 256)
        XCTAssertEqual(absmax[0], 0.5, accuracy: 1e-6)
        XCTAssertEqual(absmax[1], 3.5, accuracy: 1e-6)
        XCTAssertEqual(absmax[2], 0.2 * 3 + 0.5, accuracy: 1e-6)
        // Second block of 64 uses the second scale.
        let packed = [UInt8](repeating: 0xFF, count: 64)
        let out = CPUReference.nf4Dequantize(packed: packed, absmax: [1, 4], blocksize: 64, count: 128)
        XCTAssertEqual(out[63], 1)
        XCTAssertEqual(out[64], 4)
    }

    func testRMSNormForwardMatchesFormula() {
        let x: [Float] = [1, 2, 3, 4].map(roundToBF16), w: [Float] = [1, 0.5, 2, 1]
        let y = CPUReference.rmsNormForward(x: x, weight: w, rows: 1, dim: 4, eps: 0)
        let r = 1 / Float((1 + 4 + 9 + 16) / 4.0).squareRoot()
        for i in 0..<4 { XCTAssertEqual(y[i], x[i] * r * w[i], accuracy: 0.01 * abs(x[i] * r * w[i])) }
    }

    func testRMSNormBackwardMatchesFiniteDifferences() {
        let rows = 2, dim = 16, eps: Float = 1e-5
        let x = random(rows * dim), w = random(dim, 0.5...1.5), dy = random(rows * dim)
        let dx = CPUReference.rmsNormBackward(x: x, weight: w, dy: dy, rows: rows, dim: dim, eps: eps)
        // L(x) = sum dy * y with the unrounded forward, in Double.
        func loss(_ x: [Double]) -> Double {
            var total = 0.0
            for row in 0..<rows {
                let xs = x[(row * dim)..<((row + 1) * dim)]
                let r = 1 / (xs.reduce(0) { $0 + $1 * $1 } / Double(dim) + Double(eps)).squareRoot()
                for i in 0..<dim { total += Double(dy[row * dim + i]) * x[row * dim + i] * r * Double(w[i]) }
            }
            return total
        }
        let x64 = x.map(Double.init), h = 1e-6
        var numeric = [Float]()
        for j in 0..<(rows * dim) {
            var plus = x64, minus = x64
            plus[j] += h
            minus[j] -= h
            numeric.append(Float((loss(plus) - loss(minus)) / (2 * h)))
        }
        XCTAssertLessThan(relativeError(dx, numeric), 1e-5)
    }

    func testRoPEBackwardUndoesForwardAndPositionZeroIsIdentity() {
        let tokens = 3, heads = 2, headDim = 8
        let x = random(tokens * heads * headDim)
        let inv = CPUReference.ropeInverseFrequencies(headDim: headDim, theta: 10000)
        XCTAssertEqual(inv[0], 1)
        XCTAssertEqual(inv[1], Float(1 / 10000.0.squareRoot().squareRoot()), accuracy: 1e-7)  // 10000^(-2/8)
        let positions: [Int32] = [0, 5, 1000]
        let y = CPUReference.rope(x: x, positions: positions, inverseFrequencies: inv, tokens: tokens, heads: heads, headDim: headDim)
        XCTAssertEqual(Array(y[0..<(heads * headDim)]), Array(x[0..<(heads * headDim)]))
        XCTAssertNotEqual(Array(y[(heads * headDim)...]), Array(x[(heads * headDim)...]))
        let back = CPUReference.rope(x: y, positions: positions, inverseFrequencies: inv, tokens: tokens, heads: heads,
                                     headDim: headDim, backward: true)
        XCTAssertLessThan(relativeError(back, x), 1e-6)
        // rotate_half pairing: element i pairs with i + headDim/2. Position 1, frequency 1 for i = 0.
        let one = CPUReference.rope(x: [1, 0, 0, 0, 0, 0, 0, 0], positions: [1], inverseFrequencies: inv, tokens: 1,
                                    heads: 1, headDim: 8)
        XCTAssertEqual(one[0], Float(cos(1.0)), accuracy: 1e-6)
        XCTAssertEqual(one[4], Float(sin(1.0)), accuracy: 1e-6)
    }

    func testSwiGLUBackwardMatchesFiniteDifferences() {
        let n = 32
        let gate = random(n, -4...4), up = random(n), dh = random(n)
        let (dgate, dup) = CPUReference.swigluBackward(dh: dh, gate: gate, up: up)
        func silu(_ g: Double) -> Double { g / (1 + exp(-g)) }
        let h = 1e-6
        let numericGate = (0..<n).map { i in Float(Double(dh[i]) * Double(up[i]) * (silu(Double(gate[i]) + h) - silu(Double(gate[i]) - h)) / (2 * h)) }
        let numericUp = (0..<n).map { i in Float(Double(dh[i]) * silu(Double(gate[i]))) }
        XCTAssertLessThan(relativeError(dgate, numericGate), 1e-6)
        XCTAssertLessThan(relativeError(dup, numericUp), 1e-6)
        let fwd = CPUReference.swigluForward(gate: [0, 1], up: [3, 2])
        XCTAssertEqual(fwd[0], 0)
        XCTAssertEqual(fwd[1], Float(2 / (1 + exp(-1.0))), accuracy: 1e-6)
    }

    func testEmbeddingLooksUpRowsAndZeroesBadIds() {
        let table: [Float] = [1, 2, 3, 4, 5, 6]  // vocab 3, dim 2
        XCTAssertEqual(CPUReference.embedding(ids: [2, 0, 7, -1], table: table, vocab: 3, dim: 2), [5, 6, 1, 2, 0, 0, 0, 0])
    }

    func testCrossEntropyLossAndGradient() {
        let rows = 3, vocab = 5
        let logits = random(rows * vocab, -3...3)
        let labels: [Int32] = [1, -100, 4]
        let (rowLoss, dlogits) = CPUReference.crossEntropy(logits: logits, labels: labels, rows: rows, vocab: vocab, gradScale: 0.5)
        // Loss of row 0 by the definition -log softmax.
        let z0 = logits[0..<5].map(Double.init)
        let expected0 = -log(exp(z0[1]) / z0.reduce(0) { $0 + exp($1) })
        XCTAssertEqual(Double(rowLoss[0]), expected0, accuracy: 1e-5)
        XCTAssertEqual(rowLoss[1], 0)
        XCTAssertEqual(Array(dlogits[5..<10]), [Float](repeating: 0, count: 5))
        // Gradient rows sum to zero (softmax sums to one), and match finite differences of 0.5 * loss.
        XCTAssertEqual(dlogits[10..<15].reduce(0, +), 0, accuracy: 1e-6)
        let h: Float = 1e-2
        for j in 0..<vocab {
            var plus = logits, minus = logits
            plus[10 + j] += h
            minus[10 + j] -= h
            let lp = CPUReference.crossEntropy(logits: plus, labels: labels, rows: rows, vocab: vocab, gradScale: 0).rowLoss[2]
            let lm = CPUReference.crossEntropy(logits: minus, labels: labels, rows: rows, vocab: vocab, gradScale: 0).rowLoss[2]
            XCTAssertEqual(dlogits[10 + j], 0.5 * (lp - lm) / (2 * h), accuracy: 1e-3)
        }
    }

    func testAdamWFirstStepIsSignedLearningRate() {
        // Step 1 from zero moments: mhat = g, vhat = g^2, so the update is lr * g / (|g| + eps).
        var p: [Float] = [1, -2], m: [Float] = [0, 0], v: [Float] = [0, 0]
        CPUReference.adamwStep(params: &p, grads: [0.3, -4], m: &m, v: &v, step: 1, learningRate: 0.1, beta1: 0.9,
                               beta2: 0.999, eps: 1e-8, weightDecay: 0.01)
        XCTAssertEqual(p[0], 1 * (1 - 0.001) - 0.1, accuracy: 1e-6)
        XCTAssertEqual(p[1], -2 * (1 - 0.001) + 0.1, accuracy: 1e-6)
        XCTAssertEqual(m[0], 0.03, accuracy: 1e-7)
        XCTAssertEqual(v[1], 0.016, accuracy: 1e-6)  // 1 - Float(0.999) is not exactly 0.001
    }

    func testMatmulTransposesAgree() {
        let m = 3, n = 4, k = 5
        let a = random(m * k), b = random(k * n)
        let c = CPUReference.matmul(a, b, m: m, n: n, k: k)
        func transpose(_ x: [Float], _ r: Int, _ c: Int) -> [Float] { (0..<(r * c)).map { i in x[(i % r) * c + i / r] } }
        let at = transpose(a, m, k), bt = transpose(b, k, n)
        XCTAssertEqual(CPUReference.matmul(at, bt, m: m, n: n, k: k, transA: true, transB: true), c)
        XCTAssertEqual(c[0], (0..<k).reduce(Float(0)) { $0 + a[$1] * b[$1 * n] }, accuracy: 1e-5)
    }

    func testAttentionBackwardMatchesFiniteDifferencesAndSegmentsSeparate() {
        let (batch, seq, heads, kvHeads, d) = (1, 5, 2, 1, 4)
        let q = random(batch * seq * heads * d, -2...2), k = random(batch * seq * kvHeads * d, -2...2)
        let v = random(k.count), dout = random(q.count)
        let segments: [Int32] = [0, 0, 1, 1, 1]
        let grads = CPUReference.attentionBackward(q: q, k: k, v: v, dout: dout, segments: segments, batch: batch, seq: seq,
                                                   heads: heads, kvHeads: kvHeads, headDim: d)
        func loss(_ q: [Float], _ k: [Float], _ v: [Float]) -> Double {
            let o = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: batch, seq: seq, heads: heads,
                                                  kvHeads: kvHeads, headDim: d).o
            return zip(o, dout).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let h: Float = 1e-2
        func numeric(_ which: Int, _ count: Int) -> [Float] {
            (0..<count).map { i in
                var qp = q, kp = k, vp = v, qm = q, km = k, vm = v
                switch which {
                case 0: qp[i] += h; qm[i] -= h
                case 1: kp[i] += h; km[i] -= h
                default: vp[i] += h; vm[i] -= h
                }
                return Float((loss(qp, kp, vp) - loss(qm, km, vm)) / (2 * Double(h)))
            }
        }
        XCTAssertLessThan(relativeError(grads.dq, numeric(0, q.count)), 1e-3)
        XCTAssertLessThan(relativeError(grads.dk, numeric(1, k.count)), 1e-3)
        XCTAssertLessThan(relativeError(grads.dv, numeric(2, v.count)), 1e-3)
        // Position 2 starts a new segment: it sees only itself, so its output is v at position 2 (per head).
        let o = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: batch, seq: seq, heads: heads,
                                              kvHeads: kvHeads, headDim: d).o
        for hd in 0..<heads {
            for x in 0..<d { XCTAssertEqual(o[(2 * heads + hd) * d + x], v[2 * d + x], accuracy: 1e-6) }
        }
    }

    /// The GPU checks' twin with the families' variations (scale, soft-capping, sliding window) against the CPU
    /// trainer's own attention (CPUOps, checked against transformers through the family fixtures), and its cap's
    /// backward against finite differences.
    func testAttentionVariationsMatchCPUOpsAndFiniteDifferences() {
        let (batch, seq, heads, kvHeads, d, window) = (2, 9, 2, 1, 4, 3)
        let q = random(batch * seq * heads * d, -2...2), k = random(batch * seq * kvHeads * d, -2...2)
        let v = random(k.count), dout = random(q.count)
        let segments: [Int32] = (0..<(batch * seq)).map { $0 % seq < 6 ? 0 : 1 }  // sequences of 6 and 3 per row
        let variation = CPUReference.AttentionVariation(scale: 0.6, softcap: 1.5, window: window)
        let ref = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: batch, seq: seq, heads: heads,
                                                kvHeads: kvHeads, headDim: d, variation: variation)
        let grads = CPUReference.attentionBackward(q: q, k: k, v: v, dout: dout, segments: segments, batch: batch, seq: seq,
                                                   heads: heads, kvHeads: kvHeads, headDim: d, variation: variation)
        var o = [Float](repeating: 0, count: q.count), dq = o, dk = [Float](repeating: 0, count: k.count), dv = dk
        let kind = AttentionKind.sliding(window: window)
        for b in 0..<batch {
            let qo = b * seq * heads * d, ko = b * seq * kvHeads * d
            let visible = { (t: Int) in kind.visible(position: t, first: t < 6 ? 0 : 6) }
            q.withUnsafeBufferPointer { qp in k.withUnsafeBufferPointer { kp in v.withUnsafeBufferPointer { vp in
                dout.withUnsafeBufferPointer { dp in
                    o.withUnsafeMutableBufferPointer { op in
                        CPUOps.attention(q: qp.baseAddress! + qo, keys: kp.baseAddress! + ko, values: vp.baseAddress! + ko, rows: seq,
                                         heads: heads, kvHeads: kvHeads, headDim: d, scale: 0.6, softcap: 1.5, visible: visible,
                                         into: op.baseAddress! + qo)
                    }
                    dq.withUnsafeMutableBufferPointer { dqp in dk.withUnsafeMutableBufferPointer { dkp in
                        dv.withUnsafeMutableBufferPointer { dvp in
                            CPUOps.attentionBackward(q: qp.baseAddress! + qo, keys: kp.baseAddress! + ko, values: vp.baseAddress! + ko,
                                                     outputGradient: dp.baseAddress! + qo, rows: seq, heads: heads, kvHeads: kvHeads,
                                                     headDim: d, scale: 0.6, softcap: 1.5, visible: visible,
                                                     queryGradient: dqp.baseAddress! + qo, keyGradient: dkp.baseAddress! + ko,
                                                     valueGradient: dvp.baseAddress! + ko)
                        }
                    } }
                }
            } } }
        }
        XCTAssertLessThan(relativeError(ref.o, o), 1e-5)
        XCTAssertLessThan(relativeError(grads.dq, dq), 1e-5)
        XCTAssertLessThan(relativeError(grads.dk, dk), 1e-5)
        XCTAssertLessThan(relativeError(grads.dv, dv), 1e-5)
        // Each variation changes the output (so each of the comparisons above would catch a twin that ignored it).
        for other in [CPUReference.AttentionVariation(softcap: 1.5, window: window), .init(scale: 0.6, window: window),
                      .init(scale: 0.6, softcap: 1.5)] {
            let changed = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: batch, seq: seq,
                                                        heads: heads, kvHeads: kvHeads, headDim: d, variation: other).o
            XCTAssertGreaterThan(relativeError(changed, ref.o), 1e-2)
        }
        // dq through the cap against finite differences of the reference's forward.
        let h: Float = 1e-2
        func loss(_ q: [Float]) -> Double {
            let o = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: batch, seq: seq, heads: heads,
                                                  kvHeads: kvHeads, headDim: d, variation: variation).o
            return zip(o, dout).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let numeric = q.indices.map { i -> Float in
            var p = q, m = q
            p[i] += h
            m[i] -= h
            return Float((loss(p) - loss(m)) / (2 * Double(h)))
        }
        XCTAssertLessThan(relativeError(grads.dq, numeric), 1e-3)
    }

    func testLoRALinearBackwardMatchesFiniteDifferences() {
        let (tokens, inF, outF, r) = (3, 5, 4, 2)
        let scale: Float = 1.5
        let x = random(tokens * inF), w = random(outF * inF), a = random(r * inF), b = random(outF * r), dy = random(tokens * outF)
        let g = CPUReference.loraLinearBackward(x: x, weight: w, a: a, b: b, scale: scale, dy: dy, tokens: tokens,
                                                inFeatures: inF, outFeatures: outF, rank: r)
        func loss(x: [Float], a: [Float], b: [Float]) -> Double {
            let y = CPUReference.loraLinearForward(x: x, weight: w, a: a, b: b, scale: scale, tokens: tokens, inFeatures: inF,
                                                   outFeatures: outF, rank: r)
            return zip(y, dy).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let h: Float = 1e-2
        func numeric(_ v: [Float], _ f: ([Float]) -> Double) -> [Float] {
            v.indices.map { i in
                var p = v, m = v
                p[i] += h
                m[i] -= h
                return Float((f(p) - f(m)) / (2 * Double(h)))
            }
        }
        XCTAssertLessThan(relativeError(g.dx, numeric(x) { loss(x: $0, a: a, b: b) }), 1e-3)
        XCTAssertLessThan(relativeError(g.dA, numeric(a) { loss(x: x, a: $0, b: b) }), 1e-3)
        XCTAssertLessThan(relativeError(g.dB, numeric(b) { loss(x: x, a: a, b: $0) }), 1e-3)
    }
}
