// The Hopper flash forward on wgmma (Kernels/attention_wgmma.cu, QLORA_ATTENTION=wgmma) against the Double CPU twin
// (CPUReference.attentionForward) and beside the mma.sync flash forward: head dimension 128, lengths off its
// 128-query / 128-key tiles (1, 127, 129, 200, 600), GQA groups of 1, 2 and 4, several batch rows, packed
// sequences, sliding windows that skip whole key tiles, and a soft-capped call that must fall back to the mma.sync
// kernels (bit-identical to them). Each output starts poisoned (NaN), so an unwritten row fails. The backward (the
// mma.sync flash backward, which wgmma does not replace yet) runs on the wgmma forward's o and lse, so a wrong lse
// shows in dq/dk/dv too. Thresholds as the "attention" group: o 1e-2, lse 1e-4, dq/dk/dv 2e-2; every line also
// prints the largest error and where it is (batch row, token, head, column), so one run tells what to fix.

import QLoRA

/// Where the largest |got − want| is, for a [batch, seq, heads, cols] tensor, and the first element whose error
/// exceeds `tolerance` (NaN counts as an error: a poisoned, unwritten output).
func attentionErrorNote(_ got: [Float], _ want: [Float], seq: Int, heads: Int, cols: Int, tolerance: Float) -> String {
    func place(_ i: Int) -> String {
        let c = i % cols, h = (i / cols) % heads, t = (i / cols / heads) % seq, b = i / cols / heads / seq
        return "b\(b) t\(t) h\(h)" + (cols > 1 ? " c\(c)" : "") + " (got \(fmt(Double(got[i]), 4)), want \(fmt(Double(want[i]), 4)))"
    }
    guard got.count == want.count, !got.isEmpty else { return "sizes \(got.count) vs \(want.count)" }
    var worst = 0, worstError: Float = -1, firstBad: Int? = nil, bad = 0
    for i in got.indices {
        let e = got[i].isNaN ? Float.infinity : abs(got[i] - want[i])
        if e > worstError { worst = i; worstError = e }
        if !(e <= tolerance) {
            bad += 1
            if firstBad == nil { firstBad = i }
        }
    }
    var note = "max |err| \(fmt(Double(worstError), 3)) at \(place(worst))"
    if let f = firstBad { note += "; \(bad) over \(fmt(Double(tolerance), 2)), first at \(place(f))" }
    return note
}

func checkAttentionWGMMA() throws {
    guard ctx.wgmmaAttentionApplies(AttentionShape(batch: 1, seq: 1, heads: 1, kvHeads: 1, headDim: 128)) else {
        print("SKIP  attention wgmma: the wgmma forward needs a Hopper card with sm_90a kernels (this run: \(ctx.compiler.target))")
        return
    }
    // (batch, seq, heads, kvHeads, window, packed segment starts, soft-capping)
    let cases: [(Int, Int, Int, Int, Int?, [Int], Float?)] = [
        (1, 1, 4, 2, nil, [], nil),                // one token
        (1, 127, 4, 2, nil, [], nil),              // one partial tile
        (2, 129, 4, 4, nil, [], nil),              // GQA 1, a diagonal tile of one key, two batch rows
        (2, 200, 4, 2, nil, [77], nil),            // GQA 2, packed: two sequences per row
        (1, 600, 8, 2, nil, [], nil),              // GQA 4, interior tiles (no mask), partial last tile
        (1, 600, 8, 2, nil, [5, 130, 131, 400], nil),  // several segments, one of one token, crossing tiles
        (2, 400, 4, 2, 45, [77], nil),             // window shorter than a tile: whole key tiles skipped
        (1, 600, 4, 1, 200, [], nil),              // window over tile edges
        (1, 300, 4, 2, nil, [], 3),                // soft-capped: falls back to the mma.sync flash forward
    ]
    let d = 128
    for (batch, seq, heads, kvHeads, window, starts, softcap) in cases {
        let shape = AttentionShape(batch: batch, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d, softcap: softcap,
                                   window: window)
        let qn = shape.tokens * heads * d, kn = shape.tokens * kvHeads * d
        let (qb, q) = rng.bf16(qn, -2, 2), (kb, k) = rng.bf16(kn, -2, 2), (vb, v) = rng.bf16(kn), (db, dout) = rng.bf16(qn)
        let segments: [Int32]? = starts.isEmpty ? nil : (0..<shape.tokens).map { i in Int32(starts.filter { $0 <= i % seq }.count) }
        let variation = CPUReference.AttentionVariation(scale: Double(shape.scale), softcap: softcap.map(Double.init), window: window)
        let ref = CPUReference.attentionForward(q: q, k: k, v: v, segments: segments, batch: batch, seq: seq, heads: heads,
                                                kvHeads: kvHeads, headDim: d, variation: variation)
        let grads = CPUReference.attentionBackward(q: q, k: k, v: v, dout: dout, segments: segments, batch: batch, seq: seq,
                                                   heads: heads, kvHeads: kvHeads, headDim: d, variation: variation)
        let qd = try upload(qb), kd = try upload(kb), vd = try upload(vb), dd = try upload(db)
        let segd = try segments.map { try upload($0) }
        let applies = ctx.wgmmaAttentionApplies(shape)
        let name = "attn \(applies ? "wgmma" : "wgmma->flash") b\(batch) s\(seq) h\(heads)/\(kvHeads) d\(d)"
            + (window.map { " window \($0)" } ?? "") + (softcap.map { " softcap \(Int($0))" } ?? "")
            + (starts.isEmpty ? "" : " packed \(starts.count + 1)")
        checkTrue("\(name): path", applies == (softcap == nil), applies ? "wgmma kernel" : "mma.sync flash kernel (fallback)")
        let o = try poisoned(UInt16.self, qn), lse = try poisoned(Float.self, shape.tokens * heads)
        try ctx.attentionForward(q: qd, k: kd, v: vd, into: o, lse: lse, segments: segd, shape: shape, kernel: .wgmma)
        let oValues = try downloadBF16(o), lseValues = try lse.download()
        check("\(name): o", relativeError(oValues, ref.o), 1e-2,
              attentionErrorNote(oValues, ref.o, seq: seq, heads: heads, cols: d, tolerance: 0.05))
        check("\(name): lse", relativeError(lseValues, ref.lse), 1e-4,
              attentionErrorNote(lseValues, ref.lse, seq: seq, heads: heads, cols: 1, tolerance: 1e-2))
        // Beside the mma.sync flash forward on the same inputs (bit-identical where the launcher fell back).
        let o2 = try poisoned(UInt16.self, qn), lse2 = try poisoned(Float.self, shape.tokens * heads)
        try ctx.attentionForward(q: qd, k: kd, v: vd, into: o2, lse: lse2, segments: segd, shape: shape, kernel: .mma)
        let o2Values = try downloadBF16(o2), lse2Values = try lse2.download()
        if applies {
            check("\(name): o vs mma.sync flash", relativeError(oValues, o2Values), 1e-2,
                  attentionErrorNote(oValues, o2Values, seq: seq, heads: heads, cols: d, tolerance: 0.05))
        } else {
            checkTrue("\(name): fallback bit-identical", oValues.map(\.bitPattern) == o2Values.map(\.bitPattern)
                        && lseValues.map(\.bitPattern) == lse2Values.map(\.bitPattern))
        }
        let dq = try poisoned(UInt16.self, qn), dk = try poisoned(UInt16.self, kn), dv = try poisoned(UInt16.self, kn)
        try ctx.attentionBackward(q: qd, k: kd, v: vd, o: o, dout: dd, lse: lse, segments: segd, dq: dq, dk: dk, dv: dv, shape: shape)
        for (label, buffer, want, h) in [("dq", dq, grads.dq, heads), ("dk", dk, grads.dk, kvHeads), ("dv", dv, grads.dv, kvHeads)] {
            let got = try downloadBF16(buffer)
            check("\(name): \(label) (from its o, lse)", relativeError(got, want), 2e-2,
                  attentionErrorNote(got, want, seq: seq, heads: h, cols: d, tolerance: 0.1))
        }
    }
}

/// The forward at the Llama-3.1-8B shape (32 query heads over 8 KV heads, d 128, causal): b2 s2048 and b1 s16384,
/// the mma.sync flash kernel and the wgmma one, useful TFLOP/s = 4 B H S² D / 2 over the time.
func timeAttentionWGMMA() throws {
    guard ctx.wgmmaAttentionApplies(AttentionShape(batch: 1, seq: 1, heads: 1, kvHeads: 1, headDim: 128)) else {
        print("  attention wgmma: skipped (needs sm_90a kernels; this run: \(ctx.compiler.target))")
        return
    }
    for (batch, seq) in [(2, 2048), (1, 16_384)] {
        let shape = AttentionShape(batch: batch, seq: seq, heads: 32, kvHeads: 8, headDim: 128)
        let qn = shape.tokens * shape.heads * 128, kn = shape.tokens * shape.kvHeads * 128
        let q = try A.buffer(UInt16.self, count: qn), k = try A.buffer(UInt16.self, count: kn), v = try A.buffer(UInt16.self, count: kn)
        try ctx.fillRandomBF16(q.pointer, count: qn, seed: seed ^ 0x51, std: 0.5)
        try ctx.fillRandomBF16(k.pointer, count: kn, seed: seed ^ 0x52, std: 0.5)
        try ctx.fillRandomBF16(v.pointer, count: kn, seed: seed ^ 0x53, std: 0.5)
        let o = try A.buffer(UInt16.self, count: qn), lse = try A.buffer(Float.self, count: shape.tokens * shape.heads)
        let flops = 4 * Double(batch * shape.heads) * Double(seq) * Double(seq) * 128 / 2
        var line = "  attention forward b\(batch) s\(seq) h32/8 d128:"
        for kernel in [AttentionKernel.mma, .wgmma] {
            let ms = try timeMedian(seq > 4096 ? 5 : 10, warmup: 1) {
                try ctx.attentionForward(q: q, k: k, v: v, into: o, lse: lse, shape: shape, kernel: kernel)
            }
            line += " \(kernel == .mma ? "mma.sync flash" : "wgmma") \(fmt(ms, 3)) ms = \(fmt(flops / (ms / 1000) / 1e12, 1)) TFLOP/s;"
        }
        print(line)
    }
}
