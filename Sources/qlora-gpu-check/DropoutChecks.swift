// The fused LoRA dropout kernels (Kernels/lora_dropout.cu, launched by Ops/CUDALoRADropout.swift) against CPU twins
// that draw the mask with Training/DropoutMask.swift, on random shapes (called from main.swift, group "lora dropout"):
//   xa = d(x)·Aᵀ            bf16 output: 1e-2 relative (main.swift's bf16 threshold; the sum itself is fp32)
//   dA += s·dyBᵀ·d(x)       fp32 output added onto a random dA: 1e-4
//   dx += d(s·dyB·A)        bf16: 1e-2 over the whole output, and every dropped element bit-identical to the input
//                           dx (the mask exactly), every kept one moved (where the added term is not tiny)
//   each run twice: the same bits (no atomics: --full-determinism)
//   mask bits               dA's kernel writing the mask as bits (the trainer's backward when the bits are not kept):
//                           the bytes equal the CPU's mask packed 8 columns a byte (bit for bit, 0 past `in`), dA
//                           unchanged by writing them, and dx from those bits bit-identical to dx that hashes (and
//                           untouched from all-zero bits); xa's kernel writing them (the trainer's forward): the same
//                           bytes, xa unchanged, and dA reading them bit-identical to dA that hashes (and dA
//                           untouched from all-zero bits)
// Shapes cover ranks 1 … 80 (every kernel variant, ranks past one block's 64), columns that are not a multiple of 64
// or of 8 (element-wise loads), token counts that are not a multiple of 16, and the 1/keep scaling (p 0.05 … 0.5).
// The check can fail: a wrong seed, index or fragment layout moves xa and dA by order 1, and dx's untouched elements
// compare bit for bit. d(x) = x·m/keep in fp32 on the CPU (exact operands: bf16 values times a power of two or a
// division by keep in Double).

import QLoRA

func checkFusedDropoutKernels() throws {
    let shapes: [(tokens: Int, inFeatures: Int, rank: Int, p: Float)] = [
        (37, 72, 5, 0.1), (16, 64, 16, 0.5), (300, 576, 16, 0.05), (129, 520, 24, 0.1), (64, 256, 48, 0.2),
        (45, 50, 3, 0.25), (200, 384, 80, 0.1), (1, 8, 1, 0.05),
    ]
    for shape in shapes {
        let (n, inF, r) = (shape.tokens, shape.inFeatures, shape.rank)
        let keep: Float = 1 - shape.p, seed = rng.next(), scale: Float = 2.5
        let mask = LoRADropoutMask(seed: seed, keep: keep)
        let label = "\(n)x\(inF) r\(r) p\(shape.p)"
        let (xb, x) = rng.bf16(n * inF), (ab, a) = rng.bf16(r * inF), (dyBb, dyB) = rng.bf16(n * r)
        let kept = (0..<(n * inF)).map { DropoutMask.keeps(seed: seed, index: $0, keep: keep) }
        let dropped = (0..<(n * inF)).map { kept[$0] ? Double(x[$0]) / Double(keep) : 0 }
        let xd = try upload(xb), ad = try upload(ab), dyBd = try upload(dyBb)

        // xa = d(x)·Aᵀ
        var xaRef = [Float](repeating: 0, count: n * r)
        for t in 0..<n {
            for j in 0..<r {
                var s = 0.0
                for i in 0..<inF { s += dropped[t * inF + i] * Double(a[j * inF + i]) }
                xaRef[t * r + j] = Float(s)
            }
        }
        var xaBits: [[UInt16]] = []
        for _ in 0..<2 {
            let xa = try poisoned(UInt16.self, n * r)
            try ctx.loraDropoutXA(x: xd.pointer, a: ad.pointer, into: xa.pointer, tokens: n, inFeatures: inF, rank: r, mask: mask)
            xaBits.append(try xa.download())
        }
        check("lora dropout xa = d(x)·Aᵀ \(label)", relativeError(xaBits[0].map(dt.decode), xaRef), 1e-2)
        checkTrue("lora dropout xa same bits twice \(label)", xaBits[0] == xaBits[1])

        // dA += s·dyBᵀ·d(x), onto a random dA
        let dA0 = rng.floats(r * inF)
        var dARef = dA0
        for j in 0..<r {
            for i in 0..<inF {
                var s = 0.0
                for t in 0..<n { s += Double(dyB[t * r + j]) * dropped[t * inF + i] }
                dARef[j * inF + i] += Float(Double(scale) * s)
            }
        }
        let scratch = try poisoned(Float.self, CUDAContext.loraDropoutScratchCount(tokens: n, inFeatures: inF, rank: r))
        var dABits: [[Float]] = []
        for _ in 0..<2 {
            let dA = try upload(dA0)
            try ctx.loraDropoutGradA(x: xd.pointer, dyB: dyBd.pointer, into: dA.pointer, scratch: scratch, tokens: n, inFeatures: inF,
                                     rank: r, scale: scale, mask: mask)
            dABits.append(try dA.download())
        }
        check("lora dropout dA += s·dyBᵀ·d(x) \(label)", relativeError(dABits[0], dARef), 1e-4,
              "\(CUDAContext.loraDropoutSplits(tokens: n, inFeatures: inF)) token splits")
        checkTrue("lora dropout dA same bits twice \(label)", dABits[0].map(\.bitPattern) == dABits[1].map(\.bitPattern))

        // The mask as bits, written by dA's kernel (bit e of byte b in row t: column 8b + e).
        let stride = (inF + 7) / 8, maskBytes = CUDAContext.loraDropoutMaskBytes(tokens: n, inFeatures: inF)
        var packed = [UInt8](repeating: 0, count: maskBytes)
        for t in 0..<n {
            for i in 0..<inF where kept[t * inF + i] { packed[t * stride + i / 8] |= UInt8(1) << UInt8(i % 8) }
        }
        let maskBits = try poisoned(UInt8.self, maskBytes)
        let dAWithBits = try upload(dA0)
        try ctx.loraDropoutGradA(x: xd.pointer, dyB: dyBd.pointer, into: dAWithBits.pointer, scratch: scratch, tokens: n, inFeatures: inF,
                                 rank: r, scale: scale, mask: mask, maskBits: maskBits)
        let gotBits = try maskBits.download()
        let wrongBytes = zip(gotBits, packed).filter { $0 != $1 }.count
        checkTrue("lora dropout mask bits = DropoutMask \(label)", wrongBytes == 0, "\(wrongBytes) of \(maskBytes) bytes differ")
        checkTrue("lora dropout dA writing bits same bits \(label)",
                  try dAWithBits.download().map(\.bitPattern) == dABits[0].map(\.bitPattern))

        // The forward writing the bits, dA reading them (the trainer's path when it keeps every block's masks).
        let forwardBits = try poisoned(UInt8.self, maskBytes), xaWithBits = try poisoned(UInt16.self, n * r)
        try ctx.loraDropoutXA(x: xd.pointer, a: ad.pointer, into: xaWithBits.pointer, tokens: n, inFeatures: inF, rank: r, mask: mask,
                              maskBits: forwardBits)
        let gotForwardBits = try forwardBits.download()
        let wrongForwardBytes = zip(gotForwardBits, packed).filter { $0 != $1 }.count
        checkTrue("lora dropout xa mask bits = DropoutMask \(label)", wrongForwardBytes == 0,
                  "\(wrongForwardBytes) of \(maskBytes) bytes differ")
        checkTrue("lora dropout xa writing bits same bits \(label)", try xaWithBits.download() == xaBits[0])
        let dAFromBits = try upload(dA0)
        try ctx.loraDropoutGradA(x: xd.pointer, dyB: dyBd.pointer, into: dAFromBits.pointer, scratch: scratch, tokens: n, inFeatures: inF,
                                 rank: r, scale: scale, mask: mask, storedMaskBits: forwardBits)
        let fromForwardBits = try dAFromBits.download()
        checkTrue("lora dropout dA from mask bits = hashed \(label)", fromForwardBits.map(\.bitPattern) == dABits[0].map(\.bitPattern),
                  "\(zip(fromForwardBits, dABits[0]).filter { $0.bitPattern != $1.bitPattern }.count) of \(r * inF) values differ")
        // All bits clear: every element dropped, dA += 0 (so the bits, not the hash, decide).
        let noBits = try poisoned(UInt8.self, maskBytes)
        try noBits.fill(byte: 0)
        let dANoneKept = try upload(dA0)
        try ctx.loraDropoutGradA(x: xd.pointer, dyB: dyBd.pointer, into: dANoneKept.pointer, scratch: scratch, tokens: n, inFeatures: inF,
                                 rank: r, scale: scale, mask: mask, storedMaskBits: noBits)
        checkTrue("lora dropout dA reads the mask bits \(label)", try dANoneKept.download().map(\.bitPattern) == dA0.map(\.bitPattern))

        // dx += d(s·dyB·A), onto a random dx
        let (dxb, dx) = rng.bf16(n * inF)
        var dxRef = dx
        var added = [Double](repeating: 0, count: n * inF)
        for t in 0..<n {
            for i in 0..<inF where kept[t * inF + i] {
                var s = 0.0
                for j in 0..<r { s += Double(dyB[t * r + j]) * Double(a[j * inF + i]) }
                added[t * inF + i] = Double(scale) * s / Double(keep)
                dxRef[t * inF + i] = Float(Double(dx[t * inF + i]) + added[t * inF + i])
            }
        }
        var dxBits: [[UInt16]] = []
        for _ in 0..<2 {
            let dxd = try upload(dxb)
            try ctx.loraDropoutAddDX(dyB: dyBd.pointer, a: ad.pointer, into: dxd.pointer, tokens: n, inFeatures: inF, rank: r,
                                     scale: scale, mask: mask)
            dxBits.append(try dxd.download())
        }
        check("lora dropout dx += d(s·dyB·A) \(label)", relativeError(dxBits[0].map(dt.decode), dxRef), 1e-2)
        var droppedChanged = 0, keptUnchanged = 0, keptVisible = 0
        for e in 0..<(n * inF) {
            if !kept[e] {
                if dxBits[0][e] != dxb[e] { droppedChanged += 1 }
            } else if abs(added[e]) > 0.05 * Double(abs(dx[e])) + 1e-3 {  // large enough to move a bf16 value
                keptVisible += 1
                if dxBits[0][e] == dxb[e] { keptUnchanged += 1 }
            }
        }
        checkTrue("lora dropout dx mask exact \(label)", droppedChanged == 0 && keptUnchanged == 0,
                  "\(droppedChanged) dropped elements changed, \(keptUnchanged) of \(keptVisible) kept ones unchanged")
        checkTrue("lora dropout dx same bits twice \(label)", dxBits[0] == dxBits[1])
        let dxFromBits = try upload(dxb)
        try ctx.loraDropoutAddDX(dyB: dyBd.pointer, a: ad.pointer, into: dxFromBits.pointer, tokens: n, inFeatures: inF, rank: r,
                                 scale: scale, mask: mask, maskBits: maskBits)
        let fromBits = try dxFromBits.download()
        // All bits clear: every element dropped, dx untouched (so the bits, not the hash, decide).
        try maskBits.fill(byte: 0)
        let dxNoneKept = try upload(dxb)
        try ctx.loraDropoutAddDX(dyB: dyBd.pointer, a: ad.pointer, into: dxNoneKept.pointer, tokens: n, inFeatures: inF, rank: r,
                                 scale: scale, mask: mask, maskBits: maskBits)
        checkTrue("lora dropout dx reads the mask bits \(label)", try dxNoneKept.download() == dxb)
        checkTrue("lora dropout dx from mask bits = hashed \(label)", fromBits == dxBits[0],
                  "\(zip(fromBits, dxBits[0]).filter { $0 != $1 }.count) of \(n * inF) elements differ")
    }
}

// MARK: - Benchmark

/// A LoRA linear's work in one training step with gradient checkpointing (forward, recomputation, backward; bf16
/// weight, no NF4 dequantization: the same with and without dropout) at the Llama-3.1-8B shapes, 4096 tokens, r 16:
///   no dropout      x·Aᵀ twice (forward, recomputation), dA and dx through cuBLAS
///   dropout 0.05    the trainer's path: x·Aᵀ fused once writing the mask bits (the recomputation reuses the
///                   forward's x·Aᵀ), dA and dx fused reading them: each element hashed once
///   hashing 2x      the trainer's path when the bits are not kept: x·Aᵀ fused once, dA fused writing the mask
///                   bits, dx fused reading them (session 6's path)
///   hashing 4×      the fused kernels as before the mask bits: hashed in the forward, the recomputation, dA and dx
///   unfused         d(x) written by dropout_apply before the cuBLAS products, d(s·dyB·A) through dropout_add_masked
/// then each fused kernel beside the cuBLAS GEMM it replaces, with its time and effective bandwidth (the bytes it
/// must move: x or dx, the small operands, dA's partial sums, the mask bits). `host`: random h16 values.
func timeLoRADropout(_ host: [UInt16]) throws {
    let (tokens, r) = (4096, 16)
    let blas = try ctx.blas()
    let mask = LoRADropoutMask(seed: 0x5EED, keep: 0.95)
    for (inF, outF) in [(4096, 14336), (4096, 4096), (14336, 4096)] {
        func filled(_ count: Int, from offset: Int = 0) throws -> DeviceBuffer<UInt16> {
            let b = try A.buffer(UInt16.self, count: count)
            try b.upload(Array(host[offset..<(offset + count)]))
            return b
        }
        let x = try filled(tokens * inF), w = try filled(outF * inF, from: 1), dy = try filled(tokens * outF, from: 2)
        let lora = LoRADeviceWeights(a: try filled(r * inF, from: 3), b: try filled(outF * r, from: 4), rank: r, scale: 2)
        let xa = try A.buffer(UInt16.self, count: tokens * r), y = try A.buffer(UInt16.self, count: tokens * outF)
        let dyB = try A.buffer(UInt16.self, count: tokens * r), dx = try A.buffer(UInt16.self, count: tokens * inF)
        let dA = try A.buffer(Float.self, count: r * inF), dB = try A.buffer(Float.self, count: outF * r)
        let partialCount = CUDAContext.loraDropoutScratchCount(tokens: tokens, inFeatures: inF, rank: r)
        let partials = try A.buffer(Float.self, count: partialCount)
        let maskBytes = CUDAContext.loraDropoutMaskBytes(tokens: tokens, inFeatures: inF)
        let maskBits = try A.buffer(UInt8.self, count: maskBytes)
        func forward(_ dropout: LoRADropoutMask?) throws {
            try ctx.loraLinearForward(x: x, weight: w, lora: lora, tokens: tokens, inFeatures: inF, outFeatures: outF, xa: xa, into: y,
                                      dropout: dropout)
        }
        func backward(_ dropout: LoRADropoutMask?, bits: DeviceBuffer<UInt8>?) throws {
            try ctx.loraLinearBackward(x: x, weight: w, lora: lora, xa: xa, dy: dy, tokens: tokens, inFeatures: inF, outFeatures: outF,
                                       dyB: dyB, dx: dx, dA: dA, dB: dB, accumulateGradients: true, dropout: dropout,
                                       dropoutScratch: partials, dropoutMaskBits: bits)
        }
        let plain = try timeMedian(10, warmup: 2) {
            try forward(nil)
            try forward(nil)
            try backward(nil, bits: nil)
        }
        // The recomputation with the forward's x·Aᵀ: the base product and the LoRA B product only.
        func recomputation() throws {
            try blas.gemm(m: tokens, n: outF, k: inF, a: x.pointer, b: w.pointer, transB: true, c: y.pointer)
            try blas.gemm(m: tokens, n: outF, k: r, a: xa.pointer, b: lora.b.pointer, transB: true, c: y.pointer, alpha: lora.scale, beta: 1)
        }
        let trainerPath = try timeMedian(10, warmup: 2) {
            try ctx.loraLinearForward(x: x, weight: w, lora: lora, tokens: tokens, inFeatures: inF, outFeatures: outF, xa: xa, into: y,
                                      dropout: mask, dropoutMaskBits: maskBits)
            try recomputation()
            try ctx.loraLinearBackward(x: x, weight: w, lora: lora, xa: xa, dy: dy, tokens: tokens, inFeatures: inF, outFeatures: outF,
                                       dyB: dyB, dx: dx, dA: dA, dB: dB, accumulateGradients: true, dropout: mask,
                                       dropoutScratch: partials, dropoutMaskBits: maskBits, maskBitsFromForward: true)
        }
        let hashing2 = try timeMedian(10, warmup: 2) {
            try forward(mask)
            try recomputation()
            try backward(mask, bits: maskBits)
        }
        let hashing4 = try timeMedian(10, warmup: 2) {
            try forward(mask)
            try forward(mask)
            try backward(mask, bits: nil)
        }
        // The unfused path, as the trainer ran it before the fused kernels (forward and recomputation alike).
        let scratch = try A.buffer(UInt16.self, count: tokens * inF)
        let unfused = try timeMedian(10, warmup: 2) {
            for _ in 0..<2 {
                try blas.gemm(m: tokens, n: outF, k: inF, a: x.pointer, b: w.pointer, transB: true, c: y.pointer)
                try ctx.dropoutApply(x: x.pointer, into: scratch.pointer, count: tokens * inF, seed: mask.seed, keep: mask.keep)
                try blas.gemm(m: tokens, n: r, k: inF, a: scratch.pointer, b: lora.a.pointer, transB: true, c: xa.pointer)
                try blas.gemm(m: tokens, n: outF, k: r, a: xa.pointer, b: lora.b.pointer, transB: true, c: y.pointer, alpha: lora.scale,
                              beta: 1)
            }
            try blas.gemm(m: outF, n: r, k: tokens, a: dy.pointer, transA: true, b: xa.pointer, c: dB.pointer, outputType: .float32,
                          alpha: lora.scale, beta: 1)
            try blas.gemm(m: tokens, n: r, k: outF, a: dy.pointer, b: lora.b.pointer, c: dyB.pointer)
            try ctx.dropoutApply(x: x.pointer, into: scratch.pointer, count: tokens * inF, seed: mask.seed, keep: mask.keep)
            try blas.gemm(m: r, n: inF, k: tokens, a: dyB.pointer, transA: true, b: scratch.pointer, c: dA.pointer, outputType: .float32,
                          alpha: lora.scale, beta: 1)
            try blas.gemm(m: tokens, n: inF, k: outF, a: dy.pointer, b: w.pointer, c: dx.pointer)
            try blas.gemm(m: tokens, n: inF, k: r, a: dyB.pointer, b: lora.a.pointer, c: scratch.pointer, alpha: lora.scale)
            try ctx.dropoutAddMasked(scratch.pointer, into: dx.pointer, count: tokens * inF, seed: mask.seed, keep: mask.keep)
        }
        func extra(_ ms: Double) -> String { "\(fmt(ms, 3)) ms (\(ms >= plain ? "+" : "")\(fmt(100 * (ms - plain) / plain, 1))%)" }
        print("  lora linear step (fwd + recompute + bwd) \(tokens) tok \(inF)->\(outF) r\(r): no dropout \(fmt(plain, 3)) ms; "
              + "dropout 0.05 \(extra(trainerPath)), hashing 2x \(extra(hashing2)), hashing 4x \(extra(hashing4)), unfused \(extra(unfused))")

        // Each fused kernel beside the GEMM it replaces. Bytes: x (or dx read and written), A, xa / dyB, dA, the
        // partial sums (written and read), the mask bits.
        let xBytes = 2.0 * Double(tokens * inF), small = 2.0 * Double(r * inF + tokens * r), dABytes = 8.0 * Double(r * inF)
        func line(_ name: String, _ ms: Double, _ bytes: Double, _ gemmMs: Double, _ gemmBytes: Double) {
            print("    \(pad(name, 26)) \(fmt(ms, 4)) ms \(pad(fmt(bytes / (ms / 1000) / 1e9, 0), 5)) GB/s  |  cuBLAS "
                  + "\(fmt(gemmMs, 4)) ms \(pad(fmt(gemmBytes / (gemmMs / 1000) / 1e9, 0), 5)) GB/s  |  \(fmt(ms / gemmMs, 2))x")
        }
        let xaMs = try timeMedian(10, warmup: 2) {
            try ctx.loraDropoutXA(x: x.pointer, a: lora.a.pointer, into: xa.pointer, tokens: tokens, inFeatures: inF, rank: r, mask: mask)
        }
        let xaBitsMs = try timeMedian(10, warmup: 2) {
            try ctx.loraDropoutXA(x: x.pointer, a: lora.a.pointer, into: xa.pointer, tokens: tokens, inFeatures: inF, rank: r, mask: mask,
                                  maskBits: maskBits)
        }
        let xaGemmMs = try timeMedian(10, warmup: 2) {
            try blas.gemm(m: tokens, n: r, k: inF, a: x.pointer, b: lora.a.pointer, transB: true, c: xa.pointer)
        }
        func gradA(_ bits: DeviceBuffer<UInt8>?, stored: DeviceBuffer<UInt8>? = nil) throws {
            try ctx.loraDropoutGradA(x: x.pointer, dyB: dyB.pointer, into: dA.pointer, scratch: partials, tokens: tokens, inFeatures: inF,
                                     rank: r, scale: lora.scale, mask: mask, maskBits: bits, storedMaskBits: stored)
        }
        let dAMs = try timeMedian(10, warmup: 2) { try gradA(nil) }
        let dABitsMs = try timeMedian(10, warmup: 2) { try gradA(maskBits) }
        let dAReadMs = try timeMedian(10, warmup: 2) { try gradA(nil, stored: maskBits) }
        let dAGemmMs = try timeMedian(10, warmup: 2) {
            try blas.gemm(m: r, n: inF, k: tokens, a: dyB.pointer, transA: true, b: x.pointer, c: dA.pointer, outputType: .float32,
                          alpha: lora.scale, beta: 1)
        }
        func addDX(_ bits: DeviceBuffer<UInt8>?) throws {
            try ctx.loraDropoutAddDX(dyB: dyB.pointer, a: lora.a.pointer, into: dx.pointer, tokens: tokens, inFeatures: inF, rank: r,
                                     scale: lora.scale, mask: mask, maskBits: bits)
        }
        let dxMs = try timeMedian(10, warmup: 2) { try addDX(nil) }
        let dxBitsMs = try timeMedian(10, warmup: 2) { try addDX(maskBits) }
        let dxGemmMs = try timeMedian(10, warmup: 2) {
            try blas.gemm(m: tokens, n: inF, k: r, a: dyB.pointer, b: lora.a.pointer, c: dx.pointer, alpha: lora.scale, beta: 1)
        }
        let partialBytes = 8.0 * Double(partialCount), bitBytes = Double(maskBytes)
        line("xa = d(x)·Aᵀ (hash)", xaMs, xBytes + small, xaGemmMs, xBytes + small)
        line("xa (hash, write bits)", xaBitsMs, xBytes + small + bitBytes, xaGemmMs, xBytes + small)
        line("dA (hash)", dAMs, xBytes + small + partialBytes + dABytes, dAGemmMs, xBytes + small + dABytes)
        line("dA (hash, write bits)", dABitsMs, xBytes + small + partialBytes + dABytes + bitBytes, dAGemmMs, xBytes + small + dABytes)
        line("dA (read bits)", dAReadMs, xBytes + small + partialBytes + dABytes + bitBytes, dAGemmMs, xBytes + small + dABytes)
        line("dx (hash)", dxMs, 2 * xBytes + small, dxGemmMs, 2 * xBytes + small)
        line("dx (read bits)", dxBitsMs, 2 * xBytes + small + bitBytes, dxGemmMs, 2 * xBytes + small)
    }
}
