// The element-wise ops of the model families (Qwen3, Gemma 2/3, Phi-3) against their CPU twins in CPUOps on random
// inputs: RMSNorm with Gemma's (1 + w) offset and the sandwich norm's residual add (also over head-sized rows, the q/k
// norms), GeGLU beside SwiGLU, partial rotary embeddings with longrope's attention factor, the scaled embedding,
// soft-capped cross-entropy and the soft-cap alone, and the column copies of fused projections.
// Thresholds as main.swift's header says: 1e-2 relative for h16 outputs, 1e-4 for fp32 losses, exact for copies.
// Where a variation changes a value by less than the 1e-2 threshold (one rounding or two; gelu's tanh form or
// another), an agreement check asks that at least 98% of the h16 outputs have exactly the CPU twin's bits: the twin
// rounds where the kernel rounds, so only fp32 noise at rounding ties may differ.
// Groups: family rmsnorm, family gated activation, family rope, family embedding, family softcap, family copy columns;
// `timeFamilyOps` adds their timings at the new bench shapes to the benchmarks group.

import QLoRA

/// The fraction of elements whose values are identical (an h16 output against a twin that rounds the same way).
func agreement(_ a: [Float], _ b: [Float]) -> Double {
    guard a.count == b.count, !a.isEmpty else { return 0 }
    return Double(zip(a, b).filter { $0 == $1 }.count) / Double(a.count)
}

func checkAgreement(_ name: String, _ gpu: [Float], _ reference: [Float], atLeast minimum: Double = 0.98) {
    let fraction = agreement(gpu, reference)
    checkTrue(name, fraction >= minimum, "\(fmt(100 * fraction, 3))% of values bit-identical to the CPU twin (min \(fmt(100 * minimum))%)")
}

func runFamilyOpChecks() {
    group("family rmsnorm") { try checkFamilyRMSNorm() }
    group("family gated activation") { try checkGatedActivation() }
    group("family rope") { try checkPartialRope() }
    group("family embedding") { try checkScaledEmbedding() }
    group("family softcap") { try checkSoftcap() }
    group("family copy columns") { try checkCopyColumns() }
}

// MARK: - RMSNorm: weight offset, residual, head-sized rows

/// The CPU twin of the forward, rounding where rmsnorm.cu rounds: LlamaRMSNorm's inner rounding with offset 0
/// (CPUReference), one rounding of x·r·(w + offset) otherwise (CPUOps, Gemma); then h16(residual + norm).
func familyRMSNormReference(x: [Float], weight: [Float], offset: Float, residual: [Float]?, rows: Int, dim: Int, eps: Float) -> [Float] {
    var norm: [Float]
    if offset == 0 {
        norm = CPUReference.rmsNormForward(x: x, weight: weight, rows: rows, dim: dim, eps: eps, round: dt.round)
    } else {
        norm = [Float](repeating: 0, count: rows * dim)
        x.withUnsafeBufferPointer { xp in
            norm.withUnsafeMutableBufferPointer { CPUOps.rmsNorm(xp.baseAddress!, weight: weight, offset: offset, eps: eps, rows: rows,
                                                                 width: dim, into: $0.baseAddress!) }
        }
        norm = norm.map(dt.round)
    }
    guard let residual else { return norm }
    return zip(residual, norm).map { dt.round($0 + $1) }
}

func checkFamilyRMSNorm() throws {
    let eps: Float = 1e-6
    // Hidden-sized rows (a block per row; vectorized, then ragged) and head-sized rows of q/k norms (a warp per row;
    // Qwen3's 128 with offset 0, Gemma 3's 256 with offset 1, Phi-3's 96, a ragged 100; row counts not multiples of 8).
    let shapes = [(64, 2304), (7, 1003), (4099, 128), (4097, 256), (1001, 96), (75, 100)]
    for (rows, dim) in shapes {
        for offset: Float in [0, 1] {
            let name = "rmsnorm \(rows)x\(dim) offset \(Int(offset))"
            let (xb, x) = rng.bf16(rows * dim, -2, 2)
            // Gemma's stored weights sit around 0 (the norm multiplies by 1 + w), Llama's around 1: an offset the
            // kernel ignored would then change the output by ~100%.
            let (wb, w) = offset == 0 ? rng.bf16(dim, 0.5, 1.5) : rng.bf16(dim, -0.5, 0.5)
            let (rb, residual) = rng.bf16(rows * dim, -4, 4)
            let (dyb, dy) = rng.bf16(rows * dim)
            let xd = try upload(xb), wd = try upload(wb)

            let y = try poisoned(UInt16.self, rows * dim)
            try ctx.rmsNormForward(x: xd, weight: wd, into: y, rows: rows, dim: dim, eps: eps, weightOffset: offset)
            let ref = familyRMSNormReference(x: x, weight: w, offset: offset, residual: nil, rows: rows, dim: dim, eps: eps)
            let gpu = try downloadBF16(y)
            check(name + " forward", relativeError(gpu, ref), 1e-2)
            checkAgreement(name + " forward rounding", gpu, ref)

            // Residual add into the residual buffer itself (Gemma's post-attention / post-MLP norm).
            let sum = try upload(rb)
            try ctx.rmsNormForward(x: xd, weight: wd, into: sum, rows: rows, dim: dim, eps: eps, weightOffset: offset, residual: sum)
            let refSum = familyRMSNormReference(x: x, weight: w, offset: offset, residual: residual, rows: rows, dim: dim, eps: eps)
            let gpuSum = try downloadBF16(sum)
            check(name + " + residual, in place", relativeError(gpuSum, refSum), 1e-2)
            checkAgreement(name + " + residual rounding", gpuSum, refSum)

            var refDx = [Float](repeating: 0, count: rows * dim)
            x.withUnsafeBufferPointer { xp in
                dy.withUnsafeBufferPointer { dp in
                    refDx.withUnsafeMutableBufferPointer {
                        CPUOps.rmsNormBackward(xp.baseAddress!, weight: w, offset: offset, eps: eps, outputGradient: dp.baseAddress!,
                                               rows: rows, width: dim, into: $0.baseAddress!, accumulate: false)
                    }
                }
            }
            let dx = try poisoned(UInt16.self, rows * dim)
            let dyd = try upload(dyb)
            try ctx.rmsNormBackward(x: xd, weight: wd, dy: dyd, into: dx, rows: rows, dim: dim, eps: eps, weightOffset: offset)
            check(name + " backward", relativeError(try downloadBF16(dx), refDx), 1e-2)
            try ctx.rmsNormBackward(x: xd, weight: wd, dy: dyd, into: dx, rows: rows, dim: dim, eps: eps, weightOffset: offset,
                                    accumulate: true)
            check(name + " backward accumulate", relativeError(try downloadBF16(dx), refDx.map { 2 * $0 }), 1e-2)
        }
    }
}

// MARK: - Gated activations: SwiGLU and GeGLU

func checkGatedActivation() throws {
    for activation in [MLPActivation.silu, .geluTanh] {
        for n in [(1 << 20) + 5, 37] {
            let name = "\(activation == .silu ? "swiglu" : "geglu (tanh)") (\(n))"
            let (gb, g) = rng.bf16(n, -6, 6)
            let (ub, u) = rng.bf16(n, -2, 2)
            let (db, d) = rng.bf16(n)
            var ref = [Float](repeating: 0, count: n), refDg = ref, refDu = ref
            g.withUnsafeBufferPointer { gp in
                u.withUnsafeBufferPointer { up in
                    d.withUnsafeBufferPointer { dp in
                        ref.withUnsafeMutableBufferPointer {
                            CPUOps.gatedActivation(activation, gate: gp.baseAddress!, up: up.baseAddress!, count: n, into: $0.baseAddress!)
                        }
                        refDg.withUnsafeMutableBufferPointer { dg in
                            refDu.withUnsafeMutableBufferPointer { du in
                                CPUOps.gatedActivationBackward(activation, gate: gp.baseAddress!, up: up.baseAddress!,
                                                               outputGradient: dp.baseAddress!, count: n,
                                                               gateGradient: dg.baseAddress!, upGradient: du.baseAddress!)
                            }
                        }
                    }
                }
            }
            ref = ref.map(dt.round)
            let gd = try upload(gb), ud = try upload(ub)
            let h = try poisoned(UInt16.self, n)
            try ctx.gatedActivationForward(activation, gate: gd, up: ud, into: h, count: n)
            let gpu = try downloadBF16(h)
            check(name + " forward", relativeError(gpu, ref), 1e-2)
            // GELU's erf form (or silu) in place of the tanh form moves most values by a fraction of an h16 step.
            checkAgreement(name + " forward rounding", gpu, ref)
            // In place, as the trainer calls it: h over gate; then dgate over gate and dup over up.
            let gate2 = try upload(gb)
            try ctx.gatedActivationForward(activation, gate: gate2, up: ud, into: gate2, count: n)
            check(name + " forward into gate", relativeError(try downloadBF16(gate2), ref), 1e-2)
            try ctx.gatedActivationBackward(activation, dh: upload(db), gate: gd, up: ud, dgate: gd, dup: ud, count: n)
            check(name + " backward dgate, in place", relativeError(try downloadBF16(gd), refDg), 1e-2)
            check(name + " backward dup, in place", relativeError(try downloadBF16(ud), refDu), 1e-2)
        }
    }
}

// MARK: - Rotary embeddings: partial rotary, longrope's attention factor

/// A Phi-3 config with longrope (factors rising from 1, attention factor from 131072 / 4096 positions, ≈ 1.19).
func longropeConfig(heads: Int, headDim: Int, partialRotaryFactor: Double) throws -> DecoderConfig {
    let pairs = Int(Double(headDim) * partialRotaryFactor) / 2
    let short = (0..<pairs).map { "\(1 + Double($0) * 0.05)" }.joined(separator: ", ")
    let long = (0..<pairs).map { "\(1 + Double($0) * 0.5)" }.joined(separator: ", ")
    let json = try JSONValue.parse(bytes: Array("""
    {"model_type": "phi3", "hidden_size": \(heads * headDim), "intermediate_size": 256, "num_hidden_layers": 1,
     "num_attention_heads": \(heads), "num_key_value_heads": \(heads), "vocab_size": 256, "rms_norm_eps": 1e-5,
     "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": \(partialRotaryFactor),
     "rope_scaling": {"type": "longrope", "short_factor": [\(short)], "long_factor": [\(long)]}, "rope_theta": 10000.0}
    """.utf8))
    return try DecoderConfig(json: json, file: "family rope check")
}

func checkPartialRope() throws {
    // Phi-3-mini's head of 96 all rotated; Phi-4-mini's 128 with 0.75 rotated (96, pairs even: the paired path);
    // a head of 72 with 0.25 rotated (18 dimensions, 9 pairs: the one-frequency-per-thread path).
    let tokens = 200, heads = 4
    for (headDim, partial) in [(96, 1.0), (128, 0.75), (72, 0.25)] {
        let config = try longropeConfig(heads: heads, headDim: headDim, partialRotaryFactor: partial)
        let factor = Float(config.ropeScaling.attentionFactor)
        let rotary = config.rotaryDim
        let positions = (0..<tokens).map { _ in Int32(rng.int(8192)) }
        let table = RopeTable(config: config, positions: 8192)
        let pd = try upload(positions)
        for long in [false, true] {
            let name = "rope d\(headDim) rotary \(rotary) \(long ? "long" : "short") factors, m \(fmt(Double(factor), 3))"
            let (xb, x) = rng.bf16(tokens * heads * headDim)
            let fd = try upload(config.ropeInverseFrequencies(long: long).map { Float($0) })
            let xd = try upload(xb)
            try ctx.rope(xd, positions: pd, inverseFrequencies: fd, tokens: tokens, heads: heads, headDim: headDim, rotaryDim: rotary,
                         attentionFactor: factor)
            var ref = x
            ref.withUnsafeMutableBufferPointer { r in
                positions.withUnsafeBufferPointer {
                    CPUOps.applyRope(r.baseAddress!, positions: $0.baseAddress!, rows: tokens, heads: heads, headDim: headDim,
                                     table: table, long: long)
                }
            }
            ref = ref.map(dt.round)
            let gpu = try downloadBF16(xd)
            check(name + " forward", relativeError(gpu, ref), 1e-2)
            checkAgreement(name + " forward rounding", gpu, ref)
            let passThrough = (0..<(tokens * heads)).allSatisfy { row in
                (rotary..<headDim).allSatisfy { gpu[row * headDim + $0] == x[row * headDim + $0] }
            }
            checkTrue(name + " leaves dims \(rotary)..<\(headDim) alone", passThrough)

            // The backward, m·R(−θ), applied to the forward's output.
            try ctx.rope(xd, positions: pd, inverseFrequencies: fd, tokens: tokens, heads: heads, headDim: headDim, rotaryDim: rotary,
                         attentionFactor: factor, backward: true)
            var refBack = gpu
            refBack.withUnsafeMutableBufferPointer { r in
                positions.withUnsafeBufferPointer {
                    CPUOps.applyRope(r.baseAddress!, positions: $0.baseAddress!, rows: tokens, heads: heads, headDim: headDim,
                                     table: table, long: long, inverse: true)
                }
            }
            check(name + " backward", relativeError(try downloadBF16(xd), refBack.map(dt.round)), 1e-2)
        }
    }
}

// MARK: - Scaled embedding

func checkScaledEmbedding() throws {
    for (vocab, dim) in [(1000, 3072), (300, 1003)] {
        let scale = dt.round(Float(dim).squareRoot())  // Gemma's normalizer, rounded to the compute dtype
        let (tb, t) = rng.bf16(vocab * dim)
        var ids = (0..<257).map { _ in Int32(rng.int(vocab)) }
        let flag = try upload([Int32(0)])
        let out = try poisoned(UInt16.self, ids.count * dim)
        let table = try upload(tb)
        try ctx.embeddingForward(ids: upload(ids), table: table, into: out, tokens: ids.count, vocab: vocab, dim: dim, badIdFlag: flag,
                                 scale: scale)
        // Each product of two h16 values is exact in fp32, so the one rounding makes the result exact.
        let ref = CPUReference.embedding(ids: ids, table: t, vocab: vocab, dim: dim).map { dt.round($0 * scale) }
        check("embedding x \(fmt(Double(scale), 3)) \(ids.count) of \(vocab)x\(dim)", relativeError(try downloadBF16(out), ref), 0)
        checkTrue("embedding x scale: valid ids leave the flag clear", try flag.download()[0] == 0)
        ids[5] = -1
        try ctx.embeddingForward(ids: upload(ids), table: table, into: out, tokens: ids.count, vocab: vocab, dim: dim, badIdFlag: flag,
                                 scale: scale)
        let gpu = try downloadBF16(out)
        checkTrue("embedding x scale: bad id sets the flag, zero row",
                  try flag.download()[0] == 1 && gpu[(5 * dim)..<(6 * dim)].allSatisfy { $0 == 0 })
    }
}

// MARK: - Soft-capping: in the cross-entropy, and alone

func checkSoftcap() throws {
    let cap: Float = 30  // Gemma 2's final_logit_softcapping
    // Logits out to ±60, so the cap changes most of them; a vocabulary not a multiple of 8 takes the scalar path.
    for (rows, vocab) in [(8, 256_000), (13, 32_003)] {
        let (lb, l) = rng.bf16(rows * vocab, -60, 60)
        var labels = (0..<rows).map { _ in Int32(rng.int(vocab)) }
        labels[2] = -100
        let counted = labels.filter { $0 != -100 }.count
        let gradScale = 1 / Float(counted)
        var capped = l
        capped.withUnsafeMutableBufferPointer { CPUOps.softcap($0.baseAddress!, count: rows * vocab, cap: cap) }
        let (refLoss, softmaxGrad) = CPUReference.crossEntropy(logits: capped, labels: labels, rows: rows, vocab: vocab, gradScale: gradScale)
        let refGrad = zip(softmaxGrad, capped).map { g, z in g * (1 - (z / cap) * (z / cap)) }
        let ld = try upload(lb), labd = try upload(labels)
        let rowLoss = try poisoned(Float.self, rows)
        let grad = try poisoned(UInt16.self, rows * vocab)
        try ctx.crossEntropy(logits: ld, labels: labd, rows: rows, vocab: vocab, gradScale: gradScale, rowLoss: rowLoss, dlogits: grad,
                             softcap: cap)
        let name = "cross entropy softcap \(Int(cap)) \(rows)x\(vocab)"
        check(name + " row losses", relativeError(try rowLoss.download(), refLoss), 1e-4)
        check(name + " dlogits", relativeError(try downloadBF16(grad), refGrad), 1e-2)
        // Loss alone, then the gradient in place over the logits (the trainer's chunks).
        let lossOnly = try poisoned(Float.self, rows)
        try ctx.crossEntropy(logits: ld, labels: labd, rows: rows, vocab: vocab, gradScale: gradScale, rowLoss: lossOnly, dlogits: nil,
                             softcap: cap)
        check(name + " row losses, no gradient", relativeError(try lossOnly.download(), refLoss), 1e-4)
        try ctx.crossEntropy(logits: ld, labels: labd, rows: rows, vocab: vocab, gradScale: gradScale, rowLoss: rowLoss, dlogits: ld,
                             softcap: cap)
        check(name + " dlogits in place", relativeError(try downloadBF16(ld), refGrad), 1e-2)
    }

    // The cap alone over decode's fp32 logits and over h16 values.
    let n = 100_003
    let logits = rng.floats(n, -80, 80)
    var ref = logits
    ref.withUnsafeMutableBufferPointer { CPUOps.softcap($0.baseAddress!, count: n, cap: cap) }
    let fd = try upload(logits)
    try ctx.applySoftcap(fd, count: n, cap: cap)
    check("softcap fp32 (\(n))", relativeError(try fd.download(), ref), 1e-5)
    let (hb, h) = rng.bf16(n, -80, 80)
    var refH = h
    refH.withUnsafeMutableBufferPointer { CPUOps.softcap($0.baseAddress!, count: n, cap: cap) }
    let hd = try upload(hb)
    try ctx.applySoftcap(hd, count: n, cap: cap)
    check("softcap \(dt) (\(n))", relativeError(try downloadBF16(hd), refH.map(dt.round)), 1e-2)
}

// MARK: - Column copies of fused projections

func checkCopyColumns() throws {
    // Phi-3's q | k | v with GQA widths (16-byte path), and ragged widths (element path).
    for widths in [[96 * 8, 96 * 2, 96 * 2], [13, 7, 5]] {
        let rows = 37, total = widths.reduce(0, +)
        let (fb, fused) = rng.bf16(rows * total)
        let fusedDevice = try upload(fb)
        var parts = [DeviceBuffer<UInt16>]()
        var offset = 0
        for width in widths {
            let part = try poisoned(UInt16.self, rows * width)
            try ctx.copyColumns(from: fusedDevice.address(at: offset), sourceStride: total, to: part.pointer, destinationStride: width,
                                rows: rows, columns: width)
            parts.append(part)
            offset += width
        }
        var refParts = widths.map { [Float](repeating: 0, count: rows * $0) }
        fused.withUnsafeBufferPointer { f in
            let pointers = (0..<widths.count).map { i in (UnsafeMutablePointer<Float>.allocate(capacity: rows * widths[i]), widths[i]) }
            CPUOps.splitColumns(f.baseAddress!, rows: rows, into: pointers)
            for (i, (p, w)) in pointers.enumerated() {
                refParts[i] = Array(UnsafeBufferPointer(start: p, count: rows * w))
                p.deallocate()
            }
        }
        let name = "copy columns \(rows)x(\(widths.map(String.init).joined(separator: "|")))"
        for (i, part) in parts.enumerated() {
            check(name + " split part \(i)", relativeError(try downloadBF16(part), refParts[i]), 0)
        }
        // Join the parts back into a poisoned fused buffer: every column must be written.
        let joined = try poisoned(UInt16.self, rows * total)
        offset = 0
        for (i, width) in widths.enumerated() {
            try ctx.copyColumns(from: parts[i].pointer, sourceStride: width, to: joined.address(at: offset), destinationStride: total,
                                rows: rows, columns: width)
            offset += width
        }
        var refJoined = [Float](repeating: .nan, count: rows * total)
        let partPointers = refParts.enumerated().map { i, p in
            let copy = UnsafeMutablePointer<Float>.allocate(capacity: p.count)
            copy.initialize(from: p, count: p.count)
            return (UnsafePointer(copy), widths[i])
        }
        refJoined.withUnsafeMutableBufferPointer { CPUOps.joinColumns(partPointers, rows: rows, into: $0.baseAddress!) }
        for (p, _) in partPointers { UnsafeMutablePointer(mutating: p).deallocate() }
        check(name + " join", relativeError(try downloadBF16(joined), refJoined), 0)
        check(name + " join equals the fused input", relativeError(try downloadBF16(joined), fused), 0)
    }
}

// MARK: - Timings (in the benchmarks group)

/// The family ops at the sizes of the new bench shapes (Qwen3-8B's q/k norms, Gemma-2-9B's hidden and MLP,
/// Phi-4-mini's partial rotary and fused q|k|v, Gemma's 256,000-token vocabulary), as GB/s of the bytes each must move.
func timeFamilyOps() throws {
    func report(_ name: String, _ ms: Double, _ movedBytes: Double) {
        print("  \(pad(name, 50)) \(pad(fmt(ms, 3) + " ms", 12)) \(fmt(movedBytes / (ms / 1000) / 1e9, 0)) GB/s")
    }
    func randomH16(_ count: Int, _ salt: UInt64, std: Float = 1) throws -> DeviceBuffer<UInt16> {
        let b = try A.buffer(UInt16.self, count: count)
        try ctx.fillRandomBF16(b.pointer, count: count, seed: seed ^ salt, std: std)
        return b
    }
    // q/k norms: 8192 tokens x 32 heads of 128 (a warp per row).
    do {
        let rows = 8192 * 32, dim = 128
        let x = try randomH16(rows * dim, 1), w = try randomH16(dim, 2), y = try randomH16(rows * dim, 3)
        report("rmsnorm forward \(rows)x\(dim) (q/k norm)", try timeMedian {
            try ctx.rmsNormForward(x: x, weight: w, into: y, rows: rows, dim: dim, eps: 1e-6)
        }, Double(rows * dim) * 4)
        report("rmsnorm backward \(rows)x\(dim) (q/k norm)", try timeMedian {
            try ctx.rmsNormBackward(x: x, weight: w, dy: x, into: y, rows: rows, dim: dim, eps: 1e-6)
        }, Double(rows * dim) * 6)
    }
    // Gemma's norm after attention with the residual add, 8192 x 3584.
    do {
        let rows = 8192, dim = 3584
        let x = try randomH16(rows * dim, 4), w = try randomH16(dim, 5, std: 0.1), residual = try randomH16(rows * dim, 6)
        report("rmsnorm (1 + w) + residual \(rows)x\(dim)", try timeMedian {
            try ctx.rmsNormForward(x: x, weight: w, into: residual, rows: rows, dim: dim, eps: 1e-6, weightOffset: 1, residual: residual)
        }, Double(rows * dim) * 6)
    }
    // GeGLU over 4096 tokens of Gemma-2-9B's 14336.
    do {
        let count = 4096 * 14336
        let g = try randomH16(count, 7), u = try randomH16(count, 8), h = try randomH16(count, 9)
        report("geglu forward 4096x14336", try timeMedian { try ctx.gatedActivationForward(.geluTanh, gate: g, up: u, into: h, count: count) },
               Double(count) * 6)
        report("geglu backward 4096x14336", try timeMedian {
            try ctx.gatedActivationBackward(.geluTanh, dh: h, gate: g, up: u, dgate: g, dup: u, count: count)
        }, Double(count) * 10)
    }
    // Phi-4-mini: 8192 tokens x 24 heads of 128, 96 rotated; its fused q|k|v (3072 | 1024 | 1024) split into q.
    do {
        let tokens = 8192, heads = 24, headDim = 128, rotary = 96
        let x = try randomH16(tokens * heads * headDim, 10)
        let positions = try upload((0..<tokens).map { Int32($0 % 4096) })
        let inv = try upload(CPUReference.ropeInverseFrequencies(headDim: rotary, theta: 10_000))
        report("rope \(tokens)x\(heads)x\(headDim), \(rotary) rotated, m 1.19", try timeMedian {
            try ctx.rope(x, positions: positions, inverseFrequencies: inv, tokens: tokens, heads: heads, headDim: headDim, rotaryDim: rotary,
                         attentionFactor: 1.19)
        }, Double(tokens * heads * rotary) * 4)
        let fused = try randomH16(tokens * 5120, 11), q = try randomH16(tokens * 3072, 12)
        report("copy columns \(tokens)x3072 of 5120 (q of q|k|v)", try timeMedian {
            try ctx.copyColumns(from: fused.pointer, sourceStride: 5120, to: q.pointer, destinationStride: 3072, rows: tokens, columns: 3072)
        }, Double(tokens * 3072) * 4)
    }
    // Soft-capped cross-entropy over Gemma's vocabulary, a chunk of 256 rows, loss and gradient in place.
    do {
        let rows = 256, vocab = 256_000
        let logits = try randomH16(rows * vocab, 13, std: 10)
        let labels = try upload((0..<rows).map { Int32($0 * 997) })
        let rowLoss = try A.buffer(Float.self, count: rows)
        report("cross entropy softcap fwd+bwd \(rows)x\(vocab)", try timeMedian {
            try ctx.crossEntropy(logits: logits, labels: labels, rows: rows, vocab: vocab, gradScale: 1e-3, rowLoss: rowLoss, dlogits: logits,
                                 softcap: 30)
        }, Double(rows * vocab) * 6)
    }
}
