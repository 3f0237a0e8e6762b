// The attention variations of the model families (Gemma 2/3, Qwen3, Phi-3, sliding-window Mistral) against the
// Double CPU twin (CPUReference.attentionForward/Backward with an AttentionVariation): every head dimension with
// kernels (32, 64, 96, 128, 256) and each of {logit scale only, soft-capping, sliding window, both}, on GQA shapes
// with packed sequences longer than the window, through the flash kernels (where they exist and fit), the 64-row
// tensor-core kernels and the fp32 kernels; the 64-row path (the one --full-determinism takes) gives the same bits
// twice. Thresholds as the "attention" group: o 1e-2, lse 1e-4, dq/dk/dv 2e-2.

import QLoRA

/// One attention check's inputs: random q, k (in ±2) and v, dout (in ±1) of the run's 16-bit type, optional packed
/// segment ids, uploaded; `reference` gives the Double CPU twin's o, lse and gradients for a shape with these sizes
/// (the variation checks reuse one case for several scales, caps and windows).
struct AttentionCase {
    let shape: AttentionShape
    let q: [Float], k: [Float], v: [Float], dout: [Float]
    let segments: [Int32]?
    let qd: DeviceBuffer<UInt16>, kd: DeviceBuffer<UInt16>, vd: DeviceBuffer<UInt16>, dd: DeviceBuffer<UInt16>
    let segd: DeviceBuffer<Int32>?
    var qCount: Int { shape.tokens * shape.heads * shape.headDim }
    var kCount: Int { shape.tokens * shape.kvHeads * shape.headDim }

    init(_ shape: AttentionShape, segments: [Int32]?) throws {
        self.shape = shape
        self.segments = segments
        let qn = shape.tokens * shape.heads * shape.headDim, kn = shape.tokens * shape.kvHeads * shape.headDim
        let (qb, q) = rng.bf16(qn, -2, 2), (kb, k) = rng.bf16(kn, -2, 2), (vb, v) = rng.bf16(kn), (db, dout) = rng.bf16(qn)
        self.q = q
        self.k = k
        self.v = v
        self.dout = dout
        qd = try upload(qb)
        kd = try upload(kb)
        vd = try upload(vb)
        dd = try upload(db)
        segd = try segments.map { try upload($0) }
    }

    /// The CPU twin at `shape`'s scale, soft-capping and window (its sizes must be this case's).
    func reference(_ shape: AttentionShape? = nil) -> (o: [Float], lse: [Float], dq: [Float], dk: [Float], dv: [Float]) {
        let s = shape ?? self.shape
        let variation = CPUReference.AttentionVariation(scale: Double(s.scale), softcap: s.softcap.map(Double.init), window: s.window)
        let forward = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: s.batch, seq: s.seq, heads: s.heads,
                                                    kvHeads: s.kvHeads, headDim: s.headDim, variation: variation)
        let grads = CPUReference.attentionBackward(q: q, k: k, v: v, dout: dout, segments: segments, batch: s.batch, seq: s.seq,
                                                   heads: s.heads, kvHeads: s.kvHeads, headDim: s.headDim, variation: variation)
        return (forward.o, forward.lse, grads.dq, grads.dk, grads.dv)
    }
}

func checkAttentionVariations() throws {
    // (label, soft-capping, window). Logits use scale 1/√(D/2), twice Llama's spread, so caps of 3 matter.
    let variations: [(String, Float?, Int?)] = [("scale", nil, nil), ("softcap", 3, nil), ("window", nil, 45), ("softcap+window", 3, 45)]
    for d in CUDAContext.attentionHeadDims {
        // Two rows of 200 tokens, each two packed sequences (0..<77, 77..<200): the window (45) is shorter than both,
        // so whole key tiles fall outside it (128-row flash tiles from query 128 on, 64-row tiles from 64 on).
        let base = AttentionShape(batch: 2, seq: 200, heads: 4, kvHeads: 2, headDim: d)
        let inputs = try AttentionCase(base, segments: (0..<base.tokens).map { $0 % base.seq < 77 ? 0 : 1 })
        let (qn, kn) = (inputs.qCount, inputs.kCount)
        let (qd, kd, vd, dd, segd) = (inputs.qd, inputs.kd, inputs.vd, inputs.dd, inputs.segd)
        let scale = 1 / (Float(d) / 2).squareRoot()
        for (label, softcap, window) in variations {
            var shape = base
            shape.scale = scale
            shape.softcap = softcap
            shape.window = window
            let ref = inputs.reference(shape)
            for (tensorCores, flash) in [(true, true), (true, false), (false, false)] {
                let kind = tensorCores ? (flash ? (ctx.flashAttentionFits(headDim: d) ? "flash" : "flash->mma") : "mma") : "fp32"
                let name = "attn \(kind) d\(d) \(label)"
                let o = try poisoned(UInt16.self, qn), lse = try poisoned(Float.self, shape.tokens * shape.heads)
                try ctx.attentionForward(q: qd, k: kd, v: vd, into: o, lse: lse, segments: segd, shape: shape,
                                         tensorCores: tensorCores, flash: flash)
                let oValues = try o.download(), lseValues = try lse.download()
                check("\(name): o", relativeError(oValues.map(dt.decode), ref.o), 1e-2)
                check("\(name): lse", relativeError(lseValues, ref.lse), 1e-4)
                let dq = try poisoned(UInt16.self, qn), dk = try poisoned(UInt16.self, kn), dv = try poisoned(UInt16.self, kn)
                try ctx.attentionBackward(q: qd, k: kd, v: vd, o: o, dout: dd, lse: lse, segments: segd, dq: dq, dk: dk, dv: dv,
                                          shape: shape, tensorCores: tensorCores, flash: flash)
                let dqValues = try dq.download(), dkValues = try dk.download(), dvValues = try dv.download()
                check("\(name): dq", relativeError(dqValues.map(dt.decode), ref.dq), 2e-2)
                check("\(name): dk", relativeError(dkValues.map(dt.decode), ref.dk), 2e-2)
                check("\(name): dv", relativeError(dvValues.map(dt.decode), ref.dv), 2e-2)
                // The 64-row kernels have no atomics: a second run gives the same bits (--full-determinism's promise).
                if tensorCores && !flash {
                    let o2 = try poisoned(UInt16.self, qn), lse2 = try poisoned(Float.self, shape.tokens * shape.heads)
                    try ctx.attentionForward(q: qd, k: kd, v: vd, into: o2, lse: lse2, segments: segd, shape: shape, flash: false)
                    let dq2 = try poisoned(UInt16.self, qn), dk2 = try poisoned(UInt16.self, kn), dv2 = try poisoned(UInt16.self, kn)
                    try ctx.attentionBackward(q: qd, k: kd, v: vd, o: o2, dout: dd, lse: lse2, segments: segd, dq: dq2, dk: dk2,
                                              dv: dv2, shape: shape, flash: false)
                    let same = [try o2.download() == oValues, try lse2.download().map(\.bitPattern) == lseValues.map(\.bitPattern),
                                try dq2.download() == dqValues, try dk2.download() == dkValues, try dv2.download() == dvValues]
                    checkTrue("\(name): bit-identical rerun", !same.contains(false),
                              "o, lse, dq, dk, dv identical: \(same.map { $0 ? "yes" : "NO" }.joined(separator: ", "))")
                }
            }
        }
    }
}

/// Forward and backward times at a training shape (batch 2 x 2048, 8 query heads over 4 KV heads) for the new head
/// dimensions, with soft-capping and with a window of 512 (which should take about a quarter of the causal time).
func timeAttentionVariations() throws {
    for (d, softcap, window) in [(96, nil, nil), (256, nil, nil), (256, Float(50), nil), (256, nil, 512)] as [(Int, Float?, Int?)] {
        let shape = AttentionShape(batch: 2, seq: 2048, heads: 8, kvHeads: 4, headDim: d, softcap: softcap, window: window)
        let qn = shape.tokens * shape.heads * d, kn = shape.tokens * shape.kvHeads * d
        let q = try upload(rng.bf16(qn).0), k = try upload(rng.bf16(kn).0), v = try upload(rng.bf16(kn).0)
        let o = try A.buffer(UInt16.self, count: qn), lse = try A.buffer(Float.self, count: shape.tokens * shape.heads)
        let dq = try A.buffer(UInt16.self, count: qn), dk = try A.buffer(UInt16.self, count: kn), dv = try A.buffer(UInt16.self, count: kn)
        let delta = try A.buffer(Float.self, count: shape.tokens * shape.heads), accumulator = try A.buffer(Float.self, count: qn)
        // Causal FLOPs as the d128 line: 4 B H S² D / 2 forward, 2.5x that backward (a window: the visible keys only).
        let visiblePairs = window.map { w in Double(shape.seq) * Double(w) - Double(w) * Double(w) / 2 } ?? Double(shape.seq * shape.seq) / 2
        let flops = 4 * Double(shape.batch * shape.heads) * visiblePairs * Double(d)
        let kind = ctx.flashAttentionFits(headDim: d) ? "flash" : "mma 64-row"
        let fwdMs = try timeMedian(5, warmup: 1) {
            try ctx.attentionForward(q: q, k: k, v: v, into: o, lse: lse, shape: shape)
        }
        let bwdMs = try timeMedian(5, warmup: 1) {
            try ctx.attentionBackward(q: q, k: k, v: v, o: o, dout: o, lse: lse, dq: dq, dk: dk, dv: dv, delta: delta,
                                      dqAccumulator: accumulator, shape: shape)
        }
        let label = "b2 s2048 h8/4 d\(d)" + (softcap.map { " softcap \(Int($0))" } ?? "") + (window.map { " window \($0)" } ?? "")
        print("  attention \(label) (\(kind)): forward \(fmt(fwdMs, 3)) ms = \(fmt(flops / (fwdMs / 1000) / 1e12, 1)) TFLOP/s, "
              + "backward \(fmt(bwdMs, 3)) ms = \(fmt(2.5 * flops / (bwdMs / 1000) / 1e12, 1)) TFLOP/s")
    }
}

/// Head dimension 256 (Gemma 2/3) on the flash path (the 8-warp forward, the split-column backward): lengths that
/// are not multiples of its tiles (forward 128 queries x 32 keys, backward 64 keys x 32 queries), GQA groups of 1, 2
/// and 4, several key blocks, windows that skip whole tiles in both directions, soft-capping, packed sequences, and
/// the 64-row kernels beside it as a second opinion. Thresholds as the "attention" group.
func checkAttentionWide() throws {
    // (batch, seq, heads, kvHeads, soft-capping, window, packed)
    let cases: [(Int, Int, Int, Int, Float?, Int?, Bool)] = [
        (1, 333, 8, 2, nil, nil, false),
        (2, 97, 2, 1, 3, nil, true),
        (1, 333, 4, 2, nil, 100, false),
        (1, 390, 4, 4, 3, 70, true),
    ]
    let d = 256
    for (batch, seq, heads, kvHeads, softcap, window, packed) in cases {
        var shape = AttentionShape(batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d, softcap: softcap,
                                   window: window)
        shape.scale = 1 / (Float(d) / 2).squareRoot()  // twice the default spread, so a cap of 3 matters
        let inputs = try AttentionCase(shape, segments: packed ? (0..<shape.tokens).map { $0 % seq < 77 ? 0 : 1 } : nil)
        let (qn, kn) = (inputs.qCount, inputs.kCount)
        let (qd, kd, vd, dd, segd) = (inputs.qd, inputs.kd, inputs.vd, inputs.dd, inputs.segd)
        let ref = inputs.reference()
        let label = "b\(batch) s\(seq) h\(heads)/\(kvHeads) d\(d)" + (softcap.map { " softcap \(Int($0))" } ?? "")
            + (window.map { " window \($0)" } ?? "") + (packed ? " packed" : "")
        for flash in [true, false] {
            let kind = flash ? (ctx.flashAttentionFits(headDim: d) ? "flash" : "flash->mma") : "mma"
            let name = "attn \(kind) \(label)"
            let o = try poisoned(UInt16.self, qn), lse = try poisoned(Float.self, shape.tokens * heads)
            try ctx.attentionForward(q: qd, k: kd, v: vd, into: o, lse: lse, segments: segd, shape: shape, flash: flash)
            check("\(name): o", relativeError(try downloadBF16(o), ref.o), 1e-2)
            check("\(name): lse", relativeError(try lse.download(), ref.lse), 1e-4)
            let dq = try poisoned(UInt16.self, qn), dk = try poisoned(UInt16.self, kn), dv = try poisoned(UInt16.self, kn)
            try ctx.attentionBackward(q: qd, k: kd, v: vd, o: o, dout: dd, lse: lse, segments: segd, dq: dq, dk: dk, dv: dv,
                                      shape: shape, flash: flash)
            check("\(name): dq", relativeError(try downloadBF16(dq), ref.dq), 2e-2)
            check("\(name): dk", relativeError(try downloadBF16(dk), ref.dk), 2e-2)
            check("\(name): dv", relativeError(try downloadBF16(dv), ref.dv), 2e-2)
        }
    }
}

/// Attention at the Gemma-2-9B shape (16 query heads over 8 KV heads, head dimension 256, scale 256^-½), batch
/// 2 x 2048: causal, and as its layers run it (soft-cap 50, the sliding layers' window of 4096, which at 2048 tokens
/// hides nothing), on the flash kernels and the 64-row ones.
func timeAttentionGemma2() throws {
    for softcap in [nil, Float(50)] as [Float?] {
        let shape = AttentionShape(batch: 2, seq: 2048, heads: 16, kvHeads: 8, headDim: 256, softcap: softcap,
                                   window: softcap == nil ? nil : 4096)
        let d = shape.headDim, qn = shape.tokens * shape.heads * d, kn = shape.tokens * shape.kvHeads * d
        let q = try upload(rng.bf16(qn).0), k = try upload(rng.bf16(kn).0), v = try upload(rng.bf16(kn).0)
        let o = try A.buffer(UInt16.self, count: qn), lse = try A.buffer(Float.self, count: shape.tokens * shape.heads)
        let dq = try A.buffer(UInt16.self, count: qn), dk = try A.buffer(UInt16.self, count: kn), dv = try A.buffer(UInt16.self, count: kn)
        let delta = try A.buffer(Float.self, count: shape.tokens * shape.heads), accumulator = try A.buffer(Float.self, count: qn)
        // Causal FLOPs (the window is longer than the sequence): 4 B H S² D / 2 forward, 2.5x that backward.
        let flops = 4 * Double(shape.batch * shape.heads) * Double(shape.seq * shape.seq) / 2 * Double(d)
        let label = "b2 s2048 h16/8 d256 (gemma-2-9b)" + (softcap == nil ? " causal" : " softcap 50 window 4096")
        for flash in [true, false] {
            let kind = flash ? (ctx.flashAttentionFits(headDim: d) ? "flash" : "flash->mma 64-row") : "mma 64-row"
            let fwdMs = try timeMedian(5, warmup: 1) {
                try ctx.attentionForward(q: q, k: k, v: v, into: o, lse: lse, shape: shape, flash: flash)
            }
            let bwdMs = try timeMedian(5, warmup: 1) {
                try ctx.attentionBackward(q: q, k: k, v: v, o: o, dout: o, lse: lse, dq: dq, dk: dk, dv: dv, delta: delta,
                                          dqAccumulator: accumulator, shape: shape, flash: flash)
            }
            print("  attention \(label) (\(kind)): forward \(fmt(fwdMs, 3)) ms = \(fmt(flops / (fwdMs / 1000) / 1e12, 1)) TFLOP/s, "
                  + "backward \(fmt(bwdMs, 3)) ms = \(fmt(2.5 * flops / (bwdMs / 1000) / 1e12, 1)) TFLOP/s")
        }
    }
}
