// The Hopper flash kernels on wgmma (Kernels/attention_wgmma.cu: QLORA_ATTENTION=wgmma runs the forward and the
// backward there, wgmma-pipelined their pipelined variants, wgmma-forward only the forward) against the Double CPU
// twin (CPUReference.attentionForward / attentionBackward) and beside the mma.sync flash kernels: head dimension 128,
// lengths off their tiles (forward: 128 queries x 128 keys; backward: 128 keys x 64 queries; 1, 127, 129, 200, 600),
// GQA groups of 1, 2 and 4, several batch rows, packed sequences, sliding windows that skip whole tiles, and a
// soft-capped call that must fall back to the mma.sync kernels (bit-identical to them where they have no atomics).
// Each output starts poisoned (NaN), so an unwritten row fails. The backward runs on the wgmma forward's o and lse,
// so a wrong lse shows in dq/dk/dv too.
// The pipelined kernels make the same products in the same order per accumulator, so the forward's o and lse and the
// backward's dk and dv must equal the simple wgmma kernels' bit for bit (dq only to the order of its fp32 additions).
// Thresholds as the "attention" group: o 1e-2, lse 1e-4, dq/dk/dv 2e-2; every line also prints the largest error and
// the first element over the tolerance with where it is (batch row, token, head, column), so one run tells what to fix.

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
        let segments: [Int32]? = starts.isEmpty ? nil : (0..<shape.tokens).map { i in Int32(starts.filter { $0 <= i % seq }.count) }
        let inputs = try AttentionCase(shape, segments: segments)
        let ref = inputs.reference()
        let (qn, kn) = (inputs.qCount, inputs.kCount)
        let (qd, kd, vd, dd, segd) = (inputs.qd, inputs.kd, inputs.vd, inputs.dd, inputs.segd)
        let applies = ctx.wgmmaAttentionApplies(shape)
        let name = "attn \(applies ? "wgmma" : "wgmma->flash") b\(batch) s\(seq) h\(heads)/\(kvHeads) d\(d)"
            + (window.map { " window \($0)" } ?? "") + (softcap.map { " softcap \(Int($0))" } ?? "")
            + (starts.isEmpty ? "" : " packed \(starts.count + 1)")
        checkTrue("\(name): path", applies == (softcap == nil), applies ? "wgmma kernels" : "mma.sync flash kernels (fallback)")
        // The wgmma forward, then the pipelined one, each against the CPU; below, the pipelined bit for bit the simple
        // forward's o and lse (the same products in the same order per accumulator), or the fallback's.
        var forward: [AttentionKernel: (o: DeviceBuffer<UInt16>, lse: DeviceBuffer<Float>, oValues: [Float], lseValues: [Float])] = [:]
        for kernel in [AttentionKernel.wgmma, .wgmmaPipelined] {
            let o = try poisoned(UInt16.self, qn), lse = try poisoned(Float.self, shape.tokens * heads)
            try ctx.attentionForward(q: qd, k: kd, v: vd, into: o, lse: lse, segments: segd, shape: shape, kernel: kernel)
            let oValues = try downloadBF16(o), lseValues = try lse.download()
            let suffix = kernel == .wgmma ? "" : " (pipelined)"
            check("\(name): o\(suffix)", relativeError(oValues, ref.o), 1e-2,
                  attentionErrorNote(oValues, ref.o, seq: seq, heads: heads, cols: d, tolerance: 0.05))
            check("\(name): lse\(suffix)", relativeError(lseValues, ref.lse), 1e-4,
                  attentionErrorNote(lseValues, ref.lse, seq: seq, heads: heads, cols: 1, tolerance: 1e-2))
            forward[kernel] = (o, lse, oValues, lseValues)
        }
        let (o, lse, oValues, lseValues) = forward[.wgmma]!
        let (opValues, lsepValues) = (forward[.wgmmaPipelined]!.oValues, forward[.wgmmaPipelined]!.lseValues)
        for (output, got, want, cols) in [("o", opValues, oValues, d), ("lse", lsepValues, lseValues, 1)] {
            let same = zip(got, want).filter { $0.bitPattern == $1.bitPattern }.count
            checkTrue("\(name): pipelined forward \(output) bit-identical to the wgmma forward", same == got.count,
                      "\(got.count - same) of \(got.count) values differ; "
                        + attentionErrorNote(got, want, seq: seq, heads: heads, cols: cols, tolerance: 0))
        }
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
        // The backward on the wgmma forward's o and lse: the wgmma backward (or its fallback), then the mma.sync flash
        // backward on the same o and lse as a second opinion.
        var backward: [AttentionKernel: [Float]] = [:]
        for kernel in [AttentionKernel.wgmma, .wgmmaPipelined, .mma] {
            let dq = try poisoned(UInt16.self, qn), dk = try poisoned(UInt16.self, kn), dv = try poisoned(UInt16.self, kn)
            try ctx.attentionBackward(q: qd, k: kd, v: vd, o: o, dout: dd, lse: lse, segments: segd, dq: dq, dk: dk, dv: dv,
                                      shape: shape, kernel: kernel)
            let values = [try downloadBF16(dq), try downloadBF16(dk), try downloadBF16(dv)]
            backward[kernel] = values.flatMap { $0 }
            let label = kernel == .mma ? "mma.sync flash backward"
                : "\(kernel == .wgmma ? "wgmma" : "pipelined wgmma")\(applies ? "" : "->flash") backward"
            for (index, (gradient, want, h)) in [("dq", ref.dq, heads), ("dk", ref.dk, kvHeads), ("dv", ref.dv, kvHeads)].enumerated() {
                check("\(name): \(gradient) (\(label))", relativeError(values[index], want), 2e-2,
                      attentionErrorNote(values[index], want, seq: seq, heads: h, cols: d, tolerance: 0.1))
            }
        }
        // dk and dv have no atomics in any of the kernels: where the launcher fell back, the same bits; the pipelined
        // wgmma backward against the simple one: dk, dv the same bits, dq to its additions' order.
        if !applies, let a = backward[.wgmma], let p = backward[.wgmmaPipelined], let b = backward[.mma] {
            checkTrue("\(name): backward fallback dk, dv bit-identical",
                      a[qn...].map(\.bitPattern) == b[qn...].map(\.bitPattern))
            checkTrue("\(name): pipelined backward fallback dk, dv bit-identical",
                      p[qn...].map(\.bitPattern) == b[qn...].map(\.bitPattern))
        }
        if applies, let a = backward[.wgmma], let p = backward[.wgmmaPipelined] {
            for (gradient, start) in [("dk", qn), ("dv", qn + kn)] {
                let (pg, ag) = (Array(p[start..<start + kn]), Array(a[start..<start + kn]))
                let same = zip(pg, ag).filter { $0.bitPattern == $1.bitPattern }.count
                checkTrue("\(name): pipelined backward \(gradient) bit-identical to the wgmma backward", same == pg.count,
                          "\(pg.count - same) of \(pg.count) values differ; "
                            + attentionErrorNote(pg, ag, seq: seq, heads: kvHeads, cols: d, tolerance: 0))
            }
            let (pq, aq) = (Array(p[..<qn]), Array(a[..<qn]))
            check("\(name): dq pipelined vs wgmma backward", relativeError(pq, aq), 5e-3,
                  attentionErrorNote(pq, aq, seq: seq, heads: heads, cols: d, tolerance: 0.05))
        }
    }
}

/// The forward and the backward at the Llama-3.1-8B shape (32 query heads over 8 KV heads, d 128, causal): b2 s2048,
/// b1 s16384 and b1 s32768, the mma.sync flash kernels, the wgmma ones and their pipelined variants; useful TFLOP/s =
/// 4 B H S² D / 2 over the forward's time, 2.5 times that over the backward's (delta, the dQ accumulator and its conversion included).
func timeAttentionWGMMA() throws {
    guard ctx.wgmmaAttentionApplies(AttentionShape(batch: 1, seq: 1, heads: 1, kvHeads: 1, headDim: 128)) else {
        print("  attention wgmma: skipped (needs sm_90a kernels; this run: \(ctx.compiler.target))")
        return
    }
    for (batch, seq) in [(2, 2048), (1, 16_384), (1, 32_768)] {
        let shape = AttentionShape(batch: batch, seq: seq, heads: 32, kvHeads: 8, headDim: 128)
        let qn = shape.tokens * shape.heads * 128, kn = shape.tokens * shape.kvHeads * 128
        let q = try A.buffer(UInt16.self, count: qn), k = try A.buffer(UInt16.self, count: kn), v = try A.buffer(UInt16.self, count: kn)
        try ctx.fillRandomBF16(q.pointer, count: qn, seed: seed ^ 0x51, std: 0.5)
        try ctx.fillRandomBF16(k.pointer, count: kn, seed: seed ^ 0x52, std: 0.5)
        try ctx.fillRandomBF16(v.pointer, count: kn, seed: seed ^ 0x53, std: 0.5)
        let o = try A.buffer(UInt16.self, count: qn), lse = try A.buffer(Float.self, count: shape.tokens * shape.heads)
        let dq = try A.buffer(UInt16.self, count: qn), dk = try A.buffer(UInt16.self, count: kn), dv = try A.buffer(UInt16.self, count: kn)
        let delta = try A.buffer(Float.self, count: shape.tokens * shape.heads), accumulator = try A.buffer(Float.self, count: qn)
        let flops = 4 * Double(batch * shape.heads) * Double(seq) * Double(seq) * 128 / 2
        let iterations = seq > 16_384 ? 3 : seq > 4096 ? 5 : 10
        var line = "  attention forward b\(batch) s\(seq) h32/8 d128:"
        for kernel in [AttentionKernel.mma, .wgmma, .wgmmaPipelined] {
            let ms = try timeMedian(iterations, warmup: 1) {
                try ctx.attentionForward(q: q, k: k, v: v, into: o, lse: lse, shape: shape, kernel: kernel)
            }
            let label = kernel == .mma ? "mma.sync flash" : kernel == .wgmma ? "wgmma" : "wgmma pipelined"
            line += " \(label) \(fmt(ms, 3)) ms = \(fmt(flops / (ms / 1000) / 1e12, 1)) TFLOP/s;"
        }
        print(line)
        // dout = o (any bf16 tensor of the right size times the same).
        line = "  attention backward b\(batch) s\(seq) h32/8 d128:"
        for kernel in [AttentionKernel.mma, .wgmma, .wgmmaPipelined] {
            let ms = try timeMedian(iterations, warmup: 1) {
                try ctx.attentionBackward(q: q, k: k, v: v, o: o, dout: o, lse: lse, dq: dq, dk: dk, dv: dv, delta: delta,
                                          dqAccumulator: accumulator, shape: shape, kernel: kernel)
            }
            let label = kernel == .mma ? "mma.sync flash" : kernel == .wgmma ? "wgmma" : "wgmma pipelined"
            line += " \(label) \(fmt(ms, 3)) ms = \(fmt(2.5 * flops / (ms / 1000) / 1e12, 1)) TFLOP/s;"
        }
        print(line)
    }
}
