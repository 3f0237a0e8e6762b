// Batched generation checks (called from main.swift's groups):
//   batched kernels     every decode_batched.cu kernel against its CPU twin (CPUReference, BatchedDecodeReference.swift)
//                       on random inputs: the NF4 small-GEMM (1...64 rows, two tasks, strided outputs, accumulation,
//                       K not a multiple of 128, one and several K splits), RoPE + cache append and attention per row
//                       (slots, positions across several key tiles, GQA, head dims 32/64/128), argmax (ties), the
//                       strided bias, SwiGLU, gather and block copy
//   batched generation  CUDABatchedInference on Tests/Fixtures/tiny-llama (+ adapter), the CPU model holding the same NF4
//                       weights: packed-prefill and decode-step logits of prompts of different lengths in one step
//                       (3e-2 relative, as the batch-1 path), then greedy answers of 6 prompts through 3 slots (slots
//                       refilled as sequences end; a stop id that ends some early) equal to the CPU's, on the fused
//                       GEMM (automatic and 2 K splits) and on the dequantize + cuBLASLt path; a differing answer
//                       passes only where the CPU's own logits are a near-tie there (gap < 5% of their RMS); sampled
//                       answers do not depend on the slot count; and a timing line, batch-1 vs batched tokens/s

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

func checkBatchedKernels() throws {
    // NF4 small-GEMM: two tasks over one X, outputs side by side in a fused row of 272 + 8 values.
    for (cols, rowList) in [(352, [1, 5, 8, 13]), (1024, [24, 64])] {
        let rowsA = 200, rowsB = 72, stride = rowsA + rowsB + 8
        let wa = rng.floats(rowsA * cols, -0.05, 0.05), wb = rng.floats(rowsB * cols, -0.05, 0.05)
        let qa = try QuantizedWeight.quantize(wa, shape: [rowsA, cols]), qb = try QuantizedWeight.quantize(wb, shape: [rowsB, cols])
        let ma = try CUDANF4Weight(qa, allocator: A), mb = try CUDANF4Weight(qb, allocator: A)
        let da = qa.dequantize(), db = qb.dequantize()
        for m in rowList {
            let (xb, x) = rng.bf16(m * cols)
            let (ob, old) = rng.bf16(m * stride)
            for splits in [1, 3] {
                let xd = try upload(xb), out = try upload(ob)
                let tasks = [NF4GemmTask(weight: ma, out: out.pointer, outStride: stride, accumulate: false),
                             NF4GemmTask(weight: mb, out: out.address(at: rowsA), outStride: stride, accumulate: true)]
                let encoded = try upload(NF4GemmTask.encodedBytes(tasks))
                let packed = try A.buffer(UInt8.self, count: NF4GemmTask.packedBytes(rows: m, cols: cols))
                let partial = try poisoned(Float.self, splits * m * (rowsA + rowsB))
                try ctx.nf4GemmRows(tasks: tasks, encodedTasks: encoded.pointer, x: xd.pointer, rows: m, cols: cols, packedX: packed.pointer,
                                    splits: splits, partial: partial.pointer)
                let got = try downloadBF16(out)
                let refA = CPUReference.nf4GemmRows(x: x, weight: da, old: nil, rows: m, outputs: rowsA, cols: cols)
                let oldB = (0..<m).flatMap { r in (0..<rowsB).map { old[r * stride + rowsA + $0] } }
                let refB = CPUReference.nf4GemmRows(x: x, weight: db, old: oldB, rows: m, outputs: rowsB, cols: cols)
                var gotA: [Float] = [], gotB: [Float] = [], untouched = true
                for r in 0..<m {
                    gotA += got[(r * stride)..<(r * stride + rowsA)]
                    gotB += got[(r * stride + rowsA)..<(r * stride + rowsA + rowsB)]
                    for c in (rowsA + rowsB)..<stride where got[r * stride + c] != old[r * stride + c] { untouched = false }
                }
                check("nf4 gemm rows \(m)x\(cols), \(splits) split(s): task 1", relativeError(gotA, refA), 1e-2)
                check("nf4 gemm rows \(m)x\(cols), \(splits) split(s): task 2 (+= old)", relativeError(gotB, refB), 1e-2)
                checkTrue("nf4 gemm rows \(m)x\(cols), \(splits) split(s): padding kept", untouched)
            }
        }
    }

    // RoPE + cache append and attention per row: 3 slots of 300 positions, rows at assorted positions.
    for (heads, kvHeads, d) in [(4, 2, 32), (8, 2, 64), (4, 4, 128)] {
        let slots = 3, capacity = 300, kvDim = kvHeads * d, stride = (heads + 2 * kvHeads) * d + 16
        let rowSlots: [Int32] = [0, 2, 1, 2, 0, 1], rowPositions: [Int32] = [0, 5, 127, 128, 250, 299]
        let r = rowSlots.count
        let (qb, q) = rng.bf16(r * stride)
        let (kb, k) = rng.bf16(slots * capacity * kvDim), (vb, v) = rng.bf16(slots * capacity * kvDim)
        let inv = CPUReference.ropeInverseFrequencies(headDim: d, theta: 10_000)
        let qd = try upload(qb), kd = try upload(kb), vd = try upload(vb)
        let sd = try upload(rowSlots), pd = try upload(rowPositions), invd = try upload(inv)
        try ctx.ropeAppendRows(qkv: qd.pointer, stride: stride, kcache: kd.pointer, vcache: vd.pointer, slots: sd.pointer, positions: pd.pointer,
                               inverseFrequencies: invd.pointer, rows: r, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d)
        let ref = CPUReference.ropeAppendRows(qkv: q, stride: stride, kcache: k, vcache: v, slots: rowSlots, positions: rowPositions,
                                              inverseFrequencies: inv, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d)
        check("rope append rows h\(heads)/\(kvHeads) d\(d): q|k|v rows", relativeError(try downloadBF16(qd), ref.qkv), 1e-2)
        check("rope append rows h\(heads)/\(kvHeads) d\(d): k cache", relativeError(try downloadBF16(kd), ref.kcache), 1e-2)
        check("rope append rows h\(heads)/\(kvHeads) d\(d): v cache", relativeError(try downloadBF16(vd), ref.vcache), 0)
        let out = try poisoned(UInt16.self, r * heads * d)
        try ctx.attentionRows(qkv: qd.pointer, stride: stride, kcache: kd.pointer, vcache: vd.pointer, out: out.pointer, slots: sd.pointer,
                              positions: pd.pointer, rows: r, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d)
        let refOut = CPUReference.attentionRows(qkv: try downloadBF16(qd), stride: stride, kcache: try downloadBF16(kd),
                                                vcache: try downloadBF16(vd), slots: rowSlots, positions: rowPositions, capacity: capacity,
                                                heads: heads, kvHeads: kvHeads, headDim: d)
        check("attention rows h\(heads)/\(kvHeads) d\(d), keys 1...300", relativeError(try downloadBF16(out), refOut), 1e-2)
    }

    // The families' variations: q/k norms (Gemma's (1 + w) and Qwen3's x·w), partial rotary, longrope's cos/sin scale,
    // a logit scale, soft-capping and a sliding window, head dims 96 and 256; batch-1 decode's attention_cached too.
    for (heads, kvHeads, d, offset) in [(2, 1, 96, Float(1)), (4, 2, 256, Float(0)), (2, 2, 64, Float(0))] {
        let slots = 2, capacity = 200, kvDim = kvHeads * d, stride = (heads + 2 * kvHeads) * d
        let rowSlots: [Int32] = [0, 1, 1, 0], rowPositions: [Int32] = [0, 7, 150, 199]
        let r = rowSlots.count, rotary = d * 3 / 4
        let ropeScale: Float = 1.2, scale: Float = 0.3, softcap: Float = 2, window = 40
        let (qb, q) = rng.bf16(r * stride, -2, 2)
        let (kb, k) = rng.bf16(slots * capacity * kvDim), (vb, v) = rng.bf16(slots * capacity * kvDim)
        let center: Float = offset != 0 ? 0 : 1
        let (qnb, qn) = rng.bf16(d, center - 0.5, center + 0.5), (knb, kn) = rng.bf16(d, center - 0.5, center + 0.5)
        let inv = CPUReference.ropeInverseFrequencies(headDim: rotary, theta: 10_000)
        let qd = try upload(qb), kd = try upload(kb), vd = try upload(vb), qnd = try upload(qnb), knd = try upload(knb)
        let sd = try upload(rowSlots), pd = try upload(rowPositions), invd = try upload(inv)
        let name = "h\(heads)/\(kvHeads) d\(d) (q/k norm offset \(Int(offset)), \(rotary) rotated)"
        try ctx.ropeAppendRows(qkv: qd.pointer, stride: stride, kcache: kd.pointer, vcache: vd.pointer, slots: sd.pointer, positions: pd.pointer,
                               inverseFrequencies: invd.pointer, rows: r, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d,
                               rotaryDim: rotary, ropeScale: ropeScale, qNorm: qnd.pointer, kNorm: knd.pointer, normOffset: offset, eps: 1e-6)
        let ref = CPUReference.ropeAppendRows(qkv: q, stride: stride, kcache: k, vcache: v, slots: rowSlots, positions: rowPositions,
                                              inverseFrequencies: inv, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d,
                                              rotaryDim: rotary, ropeScale: ropeScale, qNorm: qn, kNorm: kn, normOffset: offset, eps: 1e-6)
        let gotQ = try downloadBF16(qd), gotK = try downloadBF16(kd), gotV = try downloadBF16(vd)
        check("q/k norm + rope append rows \(name): q|k|v rows", relativeError(gotQ, ref.qkv), 1e-2)
        check("q/k norm + rope append rows \(name): k cache", relativeError(gotK, ref.kcache), 1e-2)
        check("q/k norm + rope append rows \(name): v cache", relativeError(gotV, ref.vcache), 0)
        let out = try poisoned(UInt16.self, r * heads * d)
        try ctx.attentionRows(qkv: qd.pointer, stride: stride, kcache: kd.pointer, vcache: vd.pointer, out: out.pointer, slots: sd.pointer,
                              positions: pd.pointer, rows: r, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d,
                              scale: scale, softcap: softcap, window: window)
        let refOut = CPUReference.attentionRows(qkv: gotQ, stride: stride, kcache: gotK, vcache: gotV, slots: rowSlots, positions: rowPositions,
                                                capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d, scale: scale,
                                                softcap: softcap, window: window)
        check("attention rows h\(heads)/\(kvHeads) d\(d): scale, softcap 2, window 40", relativeError(try downloadBF16(out), refOut), 1e-2)
        let plain = CPUReference.attentionRows(qkv: gotQ, stride: stride, kcache: gotK, vcache: gotV, slots: rowSlots, positions: rowPositions,
                                               capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d, scale: scale)
        checkTrue("attention rows d\(d): softcap and window change the result", relativeError(plain, refOut) > 0.05,
                  "by \(fmt(relativeError(plain, refOut)))")
        // attention_cached: slot 0's rows, one query at its position (the batch-1 decode step).
        var worst = 0.0
        for (i, p) in rowPositions.enumerated() where rowSlots[i] == 0 {
            let o = try poisoned(UInt16.self, heads * d)
            try ctx.attentionCached(q: qd.address(at: i * stride), qStride: stride, kcache: kd.pointer, vcache: vd.pointer, out: o.pointer,
                                    startPointer: 0, start: Int(p), tokens: 1, heads: heads, kvHeads: kvHeads, headDim: d, maxKeys: capacity,
                                    scale: scale, softcap: softcap, window: window)
            let refRow = CPUReference.attentionRows(qkv: Array(gotQ[(i * stride)..<((i + 1) * stride)]), stride: stride, kcache: gotK,
                                                    vcache: gotV, slots: [0], positions: [p], capacity: capacity, heads: heads,
                                                    kvHeads: kvHeads, headDim: d, scale: scale, softcap: softcap, window: window)
            worst = max(worst, relativeError(try downloadBF16(o), refRow))
        }
        check("attention cached (decode) d\(d): scale, softcap 2, window 40", worst, 1e-2)
    }

    // RMSNorm rows (x·w and Gemma's x·(1 + w), alone and added to a residual), the scaled embedding, logit
    // soft-capping and GeGLU on fused rows.
    do {
        let rows = 5, dim = 96
        let (xb, x) = rng.bf16(rows * dim, -3, 3), (resb, res) = rng.bf16(rows * dim, -3, 3)
        for offset: Float in [0, 1] {
            let (wb, w) = rng.bf16(dim, offset == 0 ? 0.5 : -0.5, offset == 0 ? 1.5 : 0.5)
            let xd = try upload(xb), wd = try upload(wb), out = try poisoned(UInt16.self, rows * dim)
            try ctx.rmsNormRows(x: xd.pointer, weight: wd.pointer, out: out.pointer, rows: rows, dim: dim, eps: 1e-6, offset: offset)
            let ref = CPUReference.rmsNormRows(x: x, weight: w, rows: rows, dim: dim, eps: 1e-6, offset: offset)
            check("rmsnorm rows, weight offset \(Int(offset))", relativeError(try downloadBF16(out), ref), 1e-2)
            let sum = try upload(resb)
            try ctx.rmsNormRows(x: xd.pointer, weight: wd.pointer, out: sum.pointer, rows: rows, dim: dim, eps: 1e-6, offset: offset, add: true)
            let refSum = CPUReference.rmsNormRows(x: x, weight: w, rows: rows, dim: dim, eps: 1e-6, offset: offset, residual: res)
            check("rmsnorm rows + residual, weight offset \(Int(offset))", relativeError(try downloadBF16(sum), refSum), 1e-2)
        }
        let vocab = 50
        let (tb, table) = rng.bf16(vocab * dim)
        let ids: [Int32] = [3, 49, 0, 3]
        let td = try upload(tb), idd = try upload(ids)
        for scale: Float in [1, dt.round(Float(96).squareRoot())] {
            let out = try poisoned(UInt16.self, ids.count * dim)
            try ctx.embeddingRows(ids: idd.pointer, table: td.pointer, out: out.pointer, rows: ids.count, dim: dim, scale: scale)
            let ref = ids.flatMap { id in (0..<dim).map { dt.round(table[Int(id) * dim + $0] * scale) } }
            check("embedding rows x \(fmt(Double(scale), 4))", relativeError(try downloadBF16(out), ref), 0)
        }
        let logits = rng.floats(3000, -20, 20)
        let ld = try upload(logits)
        try ctx.softcapLogits(ld.pointer, count: logits.count, cap: 30)
        check("logit soft-capping (cap 30)", relativeError(try ld.download(), logits.map { 30 * tanh($0 / 30) }), 1e-6)
        let inter = 96
        let (gub, gu) = rng.bf16(rows * 2 * inter, -4, 4)
        let gud = try upload(gub), hd = try poisoned(UInt16.self, rows * inter)
        try ctx.swigluRows(gateUp: gud.pointer, into: hd.pointer, rows: rows, inter: inter, activation: .geluTanh)
        let refH = (0..<(rows * inter)).map { e -> Float in
            let row = e / inter, i = e % inter
            let g = Double(gu[row * 2 * inter + i]), u = Double(gu[row * 2 * inter + inter + i])
            return dt.round(Float(0.5 * g * (1 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * u))
        }
        check("geglu rows (gelu tanh, fused gate|up)", relativeError(try downloadBF16(hd), refH), 1e-2)
    }

    // argmax with ties (the first index wins), and a row of -inf.
    do {
        let rows = 5, vocab = 1000
        var logits = rng.floats(rows * vocab, -3, 3)
        logits[1 * vocab + 10] = 7; logits[1 * vocab + 900] = 7; logits[1 * vocab + 11] = 7
        logits[2 * vocab + 999] = 9
        for i in 0..<vocab { logits[4 * vocab + i] = -.infinity }
        let ld = try upload(logits), out = try poisoned(Int32.self, rows)
        try ctx.argmaxRows(logits: ld.pointer, out: out.pointer, rows: rows, vocab: vocab)
        let got = try out.download(), ref = CPUReference.argmaxRows(logits, rows: rows, vocab: vocab)
        checkTrue("argmax rows (ties: first index)", got == ref, "got \(got), CPU \(ref)")
    }

    // The small helpers: strided bias, SwiGLU on fused rows, gather, block copy.
    do {
        let rows = 7, cols = 40, stride = 100, inter = 96
        let (yb, y) = rng.bf16(rows * stride), (bb, b) = rng.bf16(cols)
        let yd = try upload(yb), bd = try upload(bb)
        try ctx.addBiasRows(bd.pointer, to: yd.address(at: 30), stride: stride, rows: rows, cols: cols, overwrite: false)
        var ref = y
        for r in 0..<rows { for c in 0..<cols { ref[r * stride + 30 + c] = dt.round(y[r * stride + 30 + c] + b[c]) } }
        check("add bias rows (strided, +=)", relativeError(try downloadBF16(yd), ref), 0)
        try ctx.addBiasRows(0, to: yd.pointer, stride: stride, rows: rows, cols: 20, overwrite: true)
        for r in 0..<rows { for c in 0..<20 { ref[r * stride + c] = 0 } }
        check("add bias rows (no bias, overwrite: zeros)", relativeError(try downloadBF16(yd), ref), 0)

        let (gub, gu) = rng.bf16(rows * 2 * inter, -4, 4)
        let gud = try upload(gub), hd = try poisoned(UInt16.self, rows * inter)
        try ctx.swigluRows(gateUp: gud.pointer, into: hd.pointer, rows: rows, inter: inter)
        var gate: [Float] = [], up: [Float] = []
        for r in 0..<rows {
            let row = r * 2 * inter
            gate += gu[row..<(row + inter)]
            up += gu[(row + inter)..<(row + 2 * inter)]
        }
        let refH = CPUReference.swigluForward(gate: gate, up: up)
        check("swiglu rows (fused gate|up)", relativeError(try downloadBF16(hd), refH), 1e-2)

        let index: [Int32] = [6, 0, 3, 3]
        let id = try upload(index), gd = try poisoned(UInt16.self, index.count * stride)
        try ctx.gatherRows(src: yd.pointer, dst: gd.pointer, index: id.pointer, rows: index.count, cols: stride)
        var refGather: [Float] = []
        for i in index { refGather += ref[(Int(i) * stride)..<((Int(i) + 1) * stride)] }
        check("gather rows", relativeError(try downloadBF16(gd), refGather), 0)

        let cd = try upload([UInt16](repeating: 0, count: rows * stride))
        try ctx.copyBlock(bd.pointer, to: cd.pointer, rows: 5, cols: 8, dstStride: stride, dstColumn: 17)
        var refCopy = [Float](repeating: 0, count: rows * stride)
        for r in 0..<5 { for c in 0..<8 { refCopy[r * stride + 17 + c] = b[r * 8 + c] } }
        check("copy block", relativeError(try downloadBF16(cd), refCopy), 0)
    }
}

/// CPU logits of `tokens` from an empty cache (the last row).
func cpuLastLogits(_ model: DecoderModel, _ tokens: [Int]) throws -> [Float] {
    let cache = KVCache(config: model.config, capacity: tokens.count)
    return try model.forward(tokens: tokens, cache: cache, lastOnly: true)
}

func rms(_ x: [Float]) -> Double { (x.reduce(0.0) { $0 + Double($1) * Double($1) } / Double(max(x.count, 1))).squareRoot() }

func checkBatchedGeneration() throws {
    let dir = "Tests/Fixtures/tiny-llama"
    let loaded = try ModelLoader.load(dir + "/base", quantization: .none)
    _ = try PEFTAdapter.load(directory: dir + "/adapter", into: loaded.model)
    let model = loaded.model
    let quantized = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
    let weights = try CUDAInference(context: ctx, model: model, capacity: 1, quantized: quantized)
    let vocab = model.config.vocabularySize
    let lengths = [3, 9, 17, 1, 30, 6]
    let prompts = lengths.map { n in (0..<n).map { _ in rng.int(vocab) } }
    let maxTokens = 12

    // Logits of one packed prefill step (all prompts, each in its slot) and of one decode step (different positions).
    for fusedLimit in [256, 0] {
        let path = fusedLimit > 0 ? "fused nf4 gemm" : "dequant + cuBLASLt"
        let batched = try CUDABatchedInference(weights: weights, slots: prompts.count, capacity: 64, prefillTokens: 128)
        batched.fusedRowLimit = fusedLimit
        var rows: [BatchRow] = [], last: [Int] = []
        for (s, p) in prompts.enumerated() {
            for (i, t) in p.enumerated() { rows.append(BatchRow(token: t, slot: s, position: i)) }
            last.append(rows.count - 1)
        }
        let gpu = try batched.logits(rows: rows, logitRows: last)
        var worst = 0.0, firstTokens: [Int] = []
        for (s, p) in prompts.enumerated() {
            let cpu = try cpuLastLogits(model, p)
            worst = max(worst, relativeError(Array(gpu[(s * vocab)..<((s + 1) * vocab)]), cpu))
            firstTokens.append(argmax(cpu))
        }
        check("batched \(path): packed prefill logits (6 prompts, 1-30 tokens)", worst, 3e-2)
        // Rows in a shuffled slot order, as a running batch is after refills.
        let order = [4, 1, 5, 0, 3, 2]
        let step = try batched.logits(rows: order.map { BatchRow(token: firstTokens[$0], slot: $0, position: prompts[$0].count) },
                                      logitRows: Array(order.indices))
        worst = 0
        for (row, s) in order.enumerated() {
            let cpu = try cpuLastLogits(model, prompts[s] + [firstTokens[s]])
            worst = max(worst, relativeError(Array(step[(row * vocab)..<((row + 1) * vocab)]), cpu))
        }
        check("batched \(path): decode step logits (6 positions)", worst, 3e-2)
    }

    // Greedy answers against the CPU's, 6 prompts through 3 slots, a stop id ending some answers early.
    let greedy = [SamplingOptions](repeating: SamplingOptions(), count: prompts.count)
    func cpuAnswers(stopIDs: Set<Int>) throws -> [GenerationResult] {
        try prompts.map { try Generator.generate(model: model, prompt: $0, maxTokens: maxTokens, sampling: SamplingOptions(), stopIDs: stopIDs) }
    }
    let stop = try cpuAnswers(stopIDs: [])[1].tokens[3]
    let reference = try cpuAnswers(stopIDs: [stop])
    let early = reference.filter { $0.stoppedAtEOS }.count
    for (name, fusedLimit, splits) in [("fused nf4 gemm", 256, 0), ("fused nf4 gemm, 2 K splits", 256, 2), ("dequant + cuBLASLt", 0, 0)] {
        let batched = try CUDABatchedInference(weights: weights, slots: 3, capacity: 64, prefillTokens: 40)
        batched.fusedRowLimit = fusedLimit
        try batched.forceSplits(splits)
        var finishedOrder: [Int] = []
        let result = try batched.generate(prompts: prompts, sampling: greedy, maxTokens: maxTokens, stopIDs: [stop],
                                          onAnswer: { i, _ in finishedOrder.append(i) })
        var identical = 0, nearTies: [String] = [], failures: [String] = []
        for (i, (g, c)) in zip(result.answers, reference).enumerated() {
            if g.tokens == c.tokens && g.stoppedAtEOS == c.stoppedAtEOS { identical += 1; continue }
            // First difference: the CPU's logits after the common prefix; a near-tie when the gap is small.
            var k = 0
            while k < g.tokens.count && k < c.tokens.count && g.tokens[k] == c.tokens[k] { k += 1 }
            let logits = try cpuLastLogits(model, prompts[i] + Array(c.tokens[0..<k]))
            let cpuToken = k < c.tokens.count ? c.tokens[k] : stop, gpuToken = k < g.tokens.count ? g.tokens[k] : stop
            let gap = Double(logits[cpuToken] - logits[gpuToken]), scale = rms(logits)
            let note = "answer \(i + 1) differs at token \(k + 1): gap \(fmt(gap)) (rms \(fmt(scale)))"
            if gap <= 0.05 * scale { nearTies.append(note) } else { failures.append(note) }
        }
        checkTrue("batched \(name): greedy answers = CPU (3 slots, 6 prompts)", failures.isEmpty,
                  "\(identical)/6 identical, \(early) end at the stop id; finished in order \(finishedOrder.map { $0 + 1 })"
                      + (nearTies.isEmpty ? "" : "; near-ties: " + nearTies.joined(separator: ", "))
                      + (failures.isEmpty ? "" : "; " + failures.joined(separator: ", ")))
    }

    // Sampling: each sequence's own generator, so the answers do not depend on the slot count (3 slots vs 6).
    let sampling = prompts.indices.map { SamplingOptions(temperature: 0.8, topK: 20, topP: 0.95, seed: 42 + UInt64($0)) }
    let three = try CUDABatchedInference(weights: weights, slots: 3, capacity: 64, prefillTokens: 40)
    let six = try CUDABatchedInference(weights: weights, slots: 6, capacity: 64, prefillTokens: 128)
    let a = try three.generate(prompts: prompts, sampling: sampling, maxTokens: 8, stopIDs: [])
    let b = try six.generate(prompts: prompts, sampling: sampling, maxTokens: 8, stopIDs: [])
    let same = zip(a.answers, b.answers).filter { $0.tokens == $1.tokens }.count
    checkTrue("batched sampling: answers independent of the slot count", same == prompts.count, "\(same)/\(prompts.count) equal")
}

/// Batch-1 vs batched greedy tokens/s on random weights of a mid-sized shape (no stop ids: every answer full length).
func timeBatchedGeneration() throws {
    let json = try JSONValue.parse(bytes: Array("""
    {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16,
     "num_key_value_heads": 4, "vocab_size": 32000, "rope_theta": 500000.0, "tie_word_embeddings": false, "rms_norm_eps": 1e-5,
     "max_position_embeddings": 4096}
    """.utf8))
    let config = try DecoderConfig(json: json, file: "batched timing")
    let promptTokens = 32, newTokens = 32, count = 128
    let single = try CUDAInference(context: ctx, randomConfig: config, loraRank: 16, capacity: promptTokens + newTokens)
    var r = SeededGenerator(seed: seed ^ 0x5eed)
    let prompts = (0..<count).map { _ in (0..<promptTokens).map { _ in r.int(config.vocabularySize) } }
    // Batch-1: the graph-replayed decode of CUDAInference, one prompt after the other (prefill included).
    _ = try Generator.generate(inference: single, prompt: prompts[0], maxTokens: 4, sampling: SamplingOptions(), stopIDs: [])  // warm-up
    let start = monotonicSeconds()
    var singleTokens = 0
    for p in prompts.prefix(8) {
        singleTokens += try Generator.generate(inference: single, prompt: p, maxTokens: newTokens, sampling: SamplingOptions(), stopIDs: []).tokens.count
    }
    let oneRate = Double(singleTokens) / (monotonicSeconds() - start)
    let greedy = [SamplingOptions](repeating: SamplingOptions(), count: count)
    for slots in [16, 64] {
        let batched = try CUDABatchedInference(weights: single, slots: slots, capacity: promptTokens + newTokens)
        _ = try batched.generate(prompts: Array(prompts.prefix(slots)), sampling: Array(greedy.prefix(slots)), maxTokens: 4, stopIDs: [])
        let many = try batched.generate(prompts: prompts, sampling: greedy, maxTokens: newTokens, stopIDs: [])
        print("  batched generation 2048/5632 x8 r16, \(count) prompts x \(newTokens) tokens, \(slots) slots: "
              + "\(fmt(many.tokensPerSecond, 0)) tokens/s vs batch-1 \(fmt(oneRate, 0)) tokens/s = "
              + "\(fmt(many.tokensPerSecond / oneRate, 1))x (prefill included)")
    }
}

/// The sliding layers' ring caches (decode_batched.cu's header): a step whose slot 0 runs 50 rows at positions 30...79
/// (longer than the ring of 40 rows, so its queries read the run's keys from the step's rows) and whose slot 1 decodes one
/// row at position 133 (its ring wrapped three times). The ring path (rope without append, attention with run starts,
/// kv_append_rows) against a cache that keeps every position (rope_append_rows, attention): the same attention output and
/// rotated rows bit for bit, and the ring holding the last 40 positions of each slot; each kernel against its CPU twin;
/// longrope's per-row long factors (slot 0's rows) against the short ones; attention_cached (batch-1 decode) on a ring.
func checkRingKernels() throws {
    for (heads, kvHeads, d) in [(4, 2, 32), (2, 1, 96), (2, 1, 256)] {
        let slots = 2, capacity = 200, ring = 40, window = 40, kvDim = kvHeads * d, stride = (heads + 2 * kvHeads) * d
        let rowSlots = [Int32](repeating: 0, count: 50) + [1], rowPositions = (30..<80).map { Int32($0) } + [133]
        let runStart = [Int32](repeating: 0, count: 50) + [50], runEnd = [Int32](repeating: 50, count: 50) + [51]
        let longRows = [Int32](repeating: 1, count: 50) + [0]
        let r = rowSlots.count, rotary = d / 2
        let name = "h\(heads)/\(kvHeads) d\(d)"
        let (qb, q) = rng.bf16(r * stride, -2, 2)
        // Every position's k and v (rotated already) in a full cache; the ring holds positions p at row p mod 40 of
        // those before each run (slot 0: 0...29, rows 30...39 stale; slot 1: 93...132).
        let (fullKB, _) = rng.bf16(slots * capacity * kvDim), (fullVB, _) = rng.bf16(slots * capacity * kvDim)
        var (ringKB, _) = rng.bf16(slots * ring * kvDim), (ringVB, _) = rng.bf16(slots * ring * kvDim)
        for (slot, held) in [(0, 0..<30), (1, 93..<133)] {
            for p in held {
                for e in 0..<kvDim {
                    ringKB[(slot * ring + p % ring) * kvDim + e] = fullKB[(slot * capacity + p) * kvDim + e]
                    ringVB[(slot * ring + p % ring) * kvDim + e] = fullVB[(slot * capacity + p) * kvDim + e]
                }
            }
        }
        let short = CPUReference.ropeInverseFrequencies(headDim: rotary, theta: 10_000)
        let table = short + short.enumerated().map { $1 / (1 + 0.7 * Float($0)) }  // [short | long]
        let sd = try upload(rowSlots), pd = try upload(rowPositions), starts = try upload(runStart), ends = try upload(runEnd)
        let longs = try upload(longRows), tabled = try upload(table)
        // Full cache.
        let qFull = try upload(qb), kFull = try upload(fullKB), vFull = try upload(fullVB), outFull = try poisoned(UInt16.self, r * heads * d)
        try ctx.ropeAppendRows(qkv: qFull.pointer, stride: stride, kcache: kFull.pointer, vcache: vFull.pointer, slots: sd.pointer,
                               positions: pd.pointer, inverseFrequencies: tabled.pointer, rows: r, capacity: capacity, heads: heads,
                               kvHeads: kvHeads, headDim: d, rotaryDim: rotary, longRows: longs.pointer)
        try ctx.attentionRows(qkv: qFull.pointer, stride: stride, kcache: kFull.pointer, vcache: vFull.pointer, out: outFull.pointer,
                              slots: sd.pointer, positions: pd.pointer, rows: r, capacity: capacity, heads: heads, kvHeads: kvHeads,
                              headDim: d, window: window)
        // Ring.
        let qRing = try upload(qb), kRing = try upload(ringKB), vRing = try upload(ringVB), outRing = try poisoned(UInt16.self, r * heads * d)
        try ctx.ropeAppendRows(qkv: qRing.pointer, stride: stride, kcache: 0, vcache: 0, slots: sd.pointer, positions: pd.pointer,
                               inverseFrequencies: tabled.pointer, rows: r, capacity: ring, heads: heads, kvHeads: kvHeads, headDim: d,
                               rotaryDim: rotary, longRows: longs.pointer)
        let rotated = try downloadBF16(qRing)
        try ctx.attentionRows(qkv: qRing.pointer, stride: stride, kcache: kRing.pointer, vcache: vRing.pointer, out: outRing.pointer,
                              slots: sd.pointer, positions: pd.pointer, rows: r, capacity: ring, heads: heads, kvHeads: kvHeads,
                              headDim: d, window: window, runStart: starts.pointer)
        try ctx.kvAppendRows(qkv: qRing.pointer, stride: stride, kcache: kRing.pointer, vcache: vRing.pointer, slots: sd.pointer,
                             positions: pd.pointer, runEnd: ends.pointer, rows: r, capacity: ring, heads: heads, kvHeads: kvHeads, headDim: d)
        let gotRing = try downloadBF16(outRing), gotFull = try downloadBF16(outFull)
        check("ring \(name): attention = the full cache's (bit for bit)", relativeError(gotRing, gotFull), 0)
        check("ring \(name): rotated rows = the full cache path's", relativeError(rotated, try downloadBF16(qFull)), 0)
        // The ring holds each slot's last 40 positions, as the full cache holds them.
        let kr = try downloadBF16(kRing), vr = try downloadBF16(vRing), kf = try downloadBF16(kFull), vf = try downloadBF16(vFull)
        var mismatches = 0
        for (slot, end) in [(0, 80), (1, 134)] {
            for p in (end - ring)..<end {
                for e in 0..<kvDim {
                    if kr[(slot * ring + p % ring) * kvDim + e] != kf[(slot * capacity + p) * kvDim + e] { mismatches += 1 }
                    if vr[(slot * ring + p % ring) * kvDim + e] != vf[(slot * capacity + p) * kvDim + e] { mismatches += 1 }
                }
            }
        }
        checkTrue("ring \(name): holds each slot's last \(ring) positions", mismatches == 0, "\(mismatches) values differ")
        // Twins.
        let refRope = CPUReference.ropeAppendRows(qkv: q, stride: stride, kcache: [], vcache: [], slots: rowSlots, positions: rowPositions,
                                                  inverseFrequencies: table, capacity: ring, heads: heads, kvHeads: kvHeads, headDim: d,
                                                  rotaryDim: rotary, longRows: longRows, append: false)
        check("ring \(name): rope rows (long factors on slot 0's rows) vs CPU", relativeError(rotated, refRope.qkv), 1e-2)
        let ringBefore = (ringKB.map(dt.decode), ringVB.map(dt.decode))
        let refOut = CPUReference.attentionRows(qkv: rotated, stride: stride, kcache: ringBefore.0, vcache: ringBefore.1, slots: rowSlots,
                                                positions: rowPositions, capacity: ring, heads: heads, kvHeads: kvHeads, headDim: d,
                                                window: window, runStart: runStart)
        check("ring \(name): attention rows with run starts vs CPU", relativeError(gotRing, refOut), 1e-2)
        let refAppend = CPUReference.kvAppendRows(qkv: rotated, stride: stride, kcache: ringBefore.0, vcache: ringBefore.1, slots: rowSlots,
                                                  positions: rowPositions, runEnd: runEnd, capacity: ring, heads: heads, kvHeads: kvHeads,
                                                  headDim: d)
        check("ring \(name): kv append rows vs CPU", relativeError(kr + vr, refAppend.kcache + refAppend.vcache), 0)
        let shortOnly = CPUReference.ropeAppendRows(qkv: q, stride: stride, kcache: [], vcache: [], slots: rowSlots, positions: rowPositions,
                                                    inverseFrequencies: table, capacity: ring, heads: heads, kvHeads: kvHeads, headDim: d,
                                                    rotaryDim: rotary, append: false)
        checkTrue("ring \(name): the long rows' factors change the rotation", relativeError(shortOnly.qkv, refRope.qkv) > 0.05,
                  "by \(fmt(relativeError(shortOnly.qkv, refRope.qkv)))")
        // attention_cached (batch-1 decode) on slot 1's ring after the step: its query at 133 vs the full cache.
        let row = 50
        let oRing = try poisoned(UInt16.self, heads * d), oFull = try poisoned(UInt16.self, heads * d)
        try ctx.attentionCached(q: qRing.address(at: row * stride), qStride: stride, kcache: kRing.address(at: ring * kvDim),
                                vcache: vRing.address(at: ring * kvDim), out: oRing.pointer, startPointer: 0, start: 133, tokens: 1,
                                heads: heads, kvHeads: kvHeads, headDim: d, maxKeys: capacity, window: window, ring: ring)
        try ctx.attentionCached(q: qFull.address(at: row * stride), qStride: stride, kcache: kFull.address(at: capacity * kvDim),
                                vcache: vFull.address(at: capacity * kvDim), out: oFull.pointer, startPointer: 0, start: 133, tokens: 1,
                                heads: heads, kvHeads: kvHeads, headDim: d, maxKeys: capacity, window: window)
        let cachedRing = try downloadBF16(oRing)
        check("ring \(name): attention cached (decode) on the ring = the full cache's", relativeError(cachedRing, try downloadBF16(oFull)), 0)
        check("ring \(name): attention cached (decode) on the ring vs attention rows",
              relativeError(cachedRing, Array(gotFull[(row * heads * d)...])), 1e-2)
    }
}
