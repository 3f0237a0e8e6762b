// The folded LoRA (Model/LoRAFoldLayout.swift, `CUDATrainerMemoryOptions.foldLoRA`) on the GPU:
//   lora fold kernels   each strided write against the same kernel's dense output (bit for bit, the columns past the
//                       row untouched: poisoned output buffers) and its CPU twin: rmsnorm's output stride (block and
//                       warp rows, 16-byte and element paths), the gated activations' (SwiGLU, GeGLU), NF4 tiles' (one
//                       and three tensors a launch, element path), the fused LoRA dropout's d(x)·Aᵀ and dA reading x
//                       with a row stride (16-byte and element paths), lora_fold_tail against h16(s·B) / 0, and
//                       cuBLASLt with row strides (lda, ldb, ldc) against the CPU product;
//   lora fold trainer   per family (Llama fixture, Qwen3, Gemma 2, Gemma 3, Phi-3, Mistral, and adapters on only some
//                       projections with mixed ranks), the folded trainer against the unfolded one on the same batch:
//                       loss 1e-2, each LoRA gradient (relative L2 per matrix, the worst) 5e-2, the adapter after an
//                       AdamW step 2e-2 (the sums are reordered and s·B rounded to the compute type: not bit for bit);
//                       each path bit for bit run to run (deterministic attention); the same with dropout 0.05.
//                       Folded means both folds (forward and the backward's, `foldLoRABackward`); each is also
//                       compared alone with the same tolerances ("forward fold", "backward fold"), both with every
//                       linear's dequantized weight kept in its own slot ("kept weights"), and with the
//                       backward's fold the residual gradient must have spare columns where o or down has an adapter
//                       (no sandwich norms), so a fold that does not run fails. The backward's fold rounds s·dy·B once
//                       (α = s in its GEMM) and dx once (not dy·W, then the s·dyB·A add): not bit for bit either.
//   lora fold memory    the backward's fold: the peak's change = the plan's (one weight scratch, and kept weights).
//   (kernels)           rmsnorm's backward with dy and dx row strides: bit for bit the dense kernel, dy's spare
//                       columns not read, dx's not written, with and without accumulate; against its CPU twin. The
//                       gated activations (SwiGLU, GeGLU) with gate's and up's rows strided: the forward (h dense and
//                       strided) and the backward (out of place and in place) bit for bit the dense kernels, the spare
//                       columns neither read (they hold large values) nor written (poison).

import QLoRA

/// Element index of the first difference of two arrays, or nil.
private func firstDifference<T: Equatable>(_ a: [T], _ b: [T]) -> Int? {
    guard a.count == b.count else { return min(a.count, b.count) }
    return zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset
}

/// `strided` holds rows of `columns` values `stride` apart: they equal `dense`'s rows, and the other values are still
/// the poison (0xFFFF). Returns a description of the first violation, or nil.
private func stridedMismatch(_ strided: [UInt16], dense: [UInt16], rows: Int, columns: Int, stride: Int) -> String? {
    for r in 0..<rows {
        for c in 0..<stride {
            let value = strided[r * stride + c]
            if c < columns, value != dense[r * columns + c] {
                return "row \(r) column \(c): \(dt.decode(value)) strided, \(dt.decode(dense[r * columns + c])) dense"
            }
            if c >= columns, value != 0xFFFF { return "row \(r) column \(c) past the row written (\(value))" }
        }
    }
    return nil
}

func checkFoldKernels() throws {
    // rmsnorm: block rows (2048, 16-byte path; 1000, element path) and warp rows (128).
    for (rows, dim, stride) in [(37, 2048, 2048 + 48), (9, 1000, 1000 + 21), (70, 128, 128 + 8)] {
        let x = rng.floats(rows * dim).map(dt.round), w = rng.floats(dim, 0.5, 1.5).map(dt.round)
        let xd = try upload(x.map(dt.encode)), wd = try upload(w.map(dt.encode))
        let dense = try poisoned(UInt16.self, rows * dim), strided = try poisoned(UInt16.self, rows * stride)
        try ctx.rmsNormForward(x: xd, weight: wd, into: dense, rows: rows, dim: dim, eps: 1e-5)
        try ctx.rmsNormForward(x: xd, weight: wd, into: strided, rows: rows, dim: dim, eps: 1e-5, outputStride: stride)
        let d = try dense.download(), s = try strided.download()
        let mismatch = stridedMismatch(s, dense: d, rows: rows, columns: dim, stride: stride)
        checkTrue("rmsnorm output stride \(rows)x\(dim) in rows of \(stride) = dense", mismatch == nil, mismatch ?? "bit for bit")
        check("rmsnorm output stride \(rows)x\(dim) vs CPU", relativeError(d.map(dt.decode),
              CPUReference.rmsNormForward(x: x, weight: w, rows: rows, dim: dim, eps: 1e-5, round: dt.round)), 1e-2)
    }
    // rmsnorm backward with dy and dx row strides (the backward fold's residual gradient): dy's spare columns hold
    // large values (read, they would change dx), dx's the poison (written, the mismatch check sees it).
    for (rows, dim, stride) in [(37, 2048, 2048 + 16), (9, 1000, 1000 + 21), (70, 128, 128 + 8)] {
        let x = rng.floats(rows * dim).map(dt.round), w = rng.floats(dim, 0.5, 1.5).map(dt.round)
        let dy = rng.floats(rows * dim).map(dt.round), start = rng.floats(rows * dim).map(dt.round)
        var dyStrided = [UInt16](repeating: dt.encode(1000), count: rows * stride)
        var startStrided = [UInt16](repeating: 0xFFFF, count: rows * stride)
        for r in 0..<rows {
            for c in 0..<dim {
                dyStrided[r * stride + c] = dt.encode(dy[r * dim + c])
                startStrided[r * stride + c] = dt.encode(start[r * dim + c])
            }
        }
        let xd = try upload(x.map(dt.encode)), wd = try upload(w.map(dt.encode))
        let dyDense = try upload(dy.map(dt.encode)), dyRows = try upload(dyStrided)
        for accumulate in [false, true] {
            let dense = try upload(start.map(dt.encode)), strided = try upload(startStrided)
            try ctx.rmsNormBackward(x: xd, weight: wd, dy: dyDense, into: dense, rows: rows, dim: dim, eps: 1e-5, accumulate: accumulate)
            try ctx.rmsNormBackward(x: xd, weight: wd, dy: dyRows, into: strided, rows: rows, dim: dim, eps: 1e-5, accumulate: accumulate,
                                    dyStride: stride, dxStride: stride)
            let d = try dense.download()
            let mismatch = stridedMismatch(try strided.download(), dense: d, rows: rows, columns: dim, stride: stride)
            checkTrue("rmsnorm backward dy, dx strides \(rows)x\(dim) in rows of \(stride)\(accumulate ? ", accumulate" : "") = dense",
                      mismatch == nil, mismatch ?? "bit for bit")
            if !accumulate {
                check("rmsnorm backward strides \(rows)x\(dim) vs CPU", relativeError(d.map(dt.decode),
                      CPUReference.rmsNormBackward(x: x, weight: w, dy: dy, rows: rows, dim: dim, eps: 1e-5)), 1e-2)
            }
        }
    }
    // The gated activations: 16-byte path (columns and stride multiples of 8) and element path.
    for activation in [MLPActivation.silu, .geluTanh] {
        for (rows, cols, stride) in [(33, 1024, 1024 + 16), (7, 1000, 1000 + 5), (5, 64, 64 + 3)] {
            let n = rows * cols
            let g = try upload(rng.floats(n, -3, 3).map(dt.encode)), u = try upload(rng.floats(n, -2, 2).map(dt.encode))
            let dense = try poisoned(UInt16.self, n), strided = try poisoned(UInt16.self, rows * stride)
            try ctx.gatedActivationForward(activation, gate: g, up: u, into: dense, count: n)
            try ctx.gatedActivationForward(activation, gate: g, up: u, into: strided, count: n, outputRows: (cols, stride))
            let mismatch = stridedMismatch(try strided.download(), dense: try dense.download(), rows: rows, columns: cols, stride: stride)
            checkTrue("\(activation == .silu ? "swiglu" : "geglu") output stride \(rows)x\(cols) in rows of \(stride) = dense",
                      mismatch == nil, mismatch ?? "bit for bit")
        }
    }
    // The gated activations with gate's and up's rows strided (the backward fold's s·dy·B columns past them).
    for activation in [MLPActivation.silu, .geluTanh] {
        let name = activation == .silu ? "swiglu" : "geglu"
        for (rows, cols, stride) in [(33, 1024, 1024 + 16), (7, 1000, 1000 + 5), (5, 64, 64 + 3)] {
            let n = rows * cols
            let g = rng.floats(n, -3, 3).map(dt.encode), u = rng.floats(n, -2, 2).map(dt.encode), dh = rng.floats(n, -1, 1).map(dt.encode)
            func rowsOf(_ dense: [UInt16], spare: UInt16) -> [UInt16] {
                var out = [UInt16](repeating: spare, count: rows * stride)
                for r in 0..<rows { for c in 0..<cols { out[r * stride + c] = dense[r * cols + c] } }
                return out
            }
            let big = dt.encode(1000)
            let gd = try upload(g), ud = try upload(u), gs = try upload(rowsOf(g, spare: big)), us = try upload(rowsOf(u, spare: big))
            // Forward: h dense, then h strided too.
            let dense = try poisoned(UInt16.self, n), hDense = try poisoned(UInt16.self, n), hStrided = try poisoned(UInt16.self, rows * stride)
            try ctx.gatedActivationForward(activation, gate: gd, up: ud, into: dense, count: n)
            try ctx.gatedActivationForward(activation, gate: gs, up: us, into: hDense, count: n, outputRows: (cols, cols), inputStride: stride)
            try ctx.gatedActivationForward(activation, gate: gs, up: us, into: hStrided, count: n, outputRows: (cols, stride), inputStride: stride)
            let d = try dense.download()
            checkTrue("\(name) forward, gate and up in rows of \(stride) (\(rows)x\(cols)) = dense", try hDense.download() == d, "bit for bit")
            let mismatch = stridedMismatch(try hStrided.download(), dense: d, rows: rows, columns: cols, stride: stride)
            checkTrue("\(name) forward, all strided (\(rows)x\(cols) in rows of \(stride)) = dense", mismatch == nil, mismatch ?? "bit for bit")
            // Backward: dense reference, strided out of place (poisoned outputs), strided in place.
            let dhd = try upload(dh)
            let dgD = try poisoned(UInt16.self, n), duD = try poisoned(UInt16.self, n)
            try ctx.gatedActivationBackward(activation, dh: dhd, gate: gd, up: ud, dgate: dgD, dup: duD, count: n)
            let dgS = try poisoned(UInt16.self, rows * stride), duS = try poisoned(UInt16.self, rows * stride)
            try ctx.gatedActivationBackward(activation, dh: dhd, gate: gs, up: us, dgate: dgS, dup: duS, count: n, rows: (cols, stride))
            let dgRef = try dgD.download(), duRef = try duD.download()
            let dgOut = try dgS.download(), duOut = try duS.download()
            let outOfPlace = stridedMismatch(dgOut, dense: dgRef, rows: rows, columns: cols, stride: stride)
                ?? stridedMismatch(duOut, dense: duRef, rows: rows, columns: cols, stride: stride)
            checkTrue("\(name) backward, strided out of place (\(rows)x\(cols) in rows of \(stride)) = dense", outOfPlace == nil,
                      outOfPlace ?? "bit for bit")
            let gIn = try upload(rowsOf(g, spare: 0xFFFF)), uIn = try upload(rowsOf(u, spare: 0xFFFF))
            try ctx.gatedActivationBackward(activation, dh: dhd, gate: gIn, up: uIn, dgate: gIn, dup: uIn, count: n, rows: (cols, stride))
            let dgIn = try gIn.download(), duIn = try uIn.download()
            let inPlace = stridedMismatch(dgIn, dense: dgRef, rows: rows, columns: cols, stride: stride)
                ?? stridedMismatch(duIn, dense: duRef, rows: rows, columns: cols, stride: stride)
            checkTrue("\(name) backward, strided in place (\(rows)x\(cols) in rows of \(stride)) = dense", inPlace == nil, inPlace ?? "bit for bit")
        }
    }
    // NF4 tiles with a row stride: one tensor (full tiles and a partial one), three in a launch, an element-path row.
    do {
        let shapes = [(rows: 96, cols: 2048, stride: 2048 + 40), (rows: 17, cols: 4096, stride: 4096 + 48), (rows: 33, cols: 1000, stride: 1003)]
        let cases = try shapes.map { try NF4Case(count: $0.rows * $0.cols) }
        var denseOut: [DeviceBuffer<UInt16>] = [], stridedOut: [DeviceBuffer<UInt16>] = []
        var tasks: [NF4DequantizeTask] = []
        for (shape, c) in zip(shapes, cases) {
            let dense = try poisoned(UInt16.self, c.count), strided = try poisoned(UInt16.self, shape.rows * shape.stride)
            try ctx.nf4DequantizeTiles([c.task(into: dense)])
            var task = c.task(into: strided)
            task.rowStride = (shape.cols, shape.stride)
            tasks.append(task)
            denseOut.append(dense)
            stridedOut.append(strided)
        }
        try ctx.nf4DequantizeTiles(Array(tasks.prefix(1)))  // alone
        try ctx.nf4DequantizeTiles(Array(tasks.suffix(2)))  // two in one launch (a third slot empty)
        try ctx.nf4DequantizeTiles(tasks)  // three in one launch: the same bits again
        for (i, shape) in shapes.enumerated() {
            let dense = try denseOut[i].download()
            let mismatch = stridedMismatch(try stridedOut[i].download(), dense: dense, rows: shape.rows, columns: shape.cols, stride: shape.stride)
            checkTrue("nf4 tiles row stride \(shape.rows)x\(shape.cols) in rows of \(shape.stride) = dense", mismatch == nil, mismatch ?? "bit for bit")
            let diff = firstDifference(dense, cases[i].exactBits)
            checkTrue("nf4 tiles dense \(shape.rows)x\(shape.cols) = exact twin", diff == nil, diff.map { "first difference at \($0)" } ?? "bit for bit")
        }
    }
    // The fused dropout's d(x)·Aᵀ and dA reading x with a row stride: the dense x's bits (the mask indexes token·in + column).
    for (n, inF, r, stride) in [(70, 1024, 16, 1024 + 48), (33, 1000, 8, 1000 + 13)] {
        let x = rng.floats(n * inF).map(dt.encode), a = try upload(rng.floats(r * inF, -0.1, 0.1).map(dt.encode))
        var wide = [UInt16](repeating: dt.encode(7), count: n * stride)
        for t in 0..<n { for c in 0..<inF { wide[t * stride + c] = x[t * inF + c] } }
        let dense = try upload(x), strided = try upload(wide)
        let mask = LoRADropoutMask(seed: 1234, keep: 0.9)
        let xaDense = try poisoned(UInt16.self, n * r), xaStrided = try poisoned(UInt16.self, n * r)
        try ctx.loraDropoutXA(x: dense.pointer, a: a.pointer, into: xaDense.pointer, tokens: n, inFeatures: inF, rank: r, mask: mask)
        try ctx.loraDropoutXA(x: strided.pointer, a: a.pointer, into: xaStrided.pointer, tokens: n, inFeatures: inF, rank: r, mask: mask,
                              xStride: stride)
        let xaDiff = firstDifference(try xaStrided.download(), try xaDense.download())
        checkTrue("lora dropout xa, x rows \(stride) apart (\(n)x\(inF), r \(r)) = dense", xaDiff == nil,
                  xaDiff.map { "first difference at \($0)" } ?? "bit for bit")
        let dyB = try upload(rng.floats(n * r).map(dt.encode))
        let scratch = try A.buffer(Float.self, count: CUDAContext.loraDropoutScratchCount(tokens: n, inFeatures: inF, rank: r))
        let daDense = try upload([Float](repeating: 0, count: r * inF)), daStrided = try upload([Float](repeating: 0, count: r * inF))
        try ctx.loraDropoutGradA(x: dense.pointer, dyB: dyB.pointer, into: daDense.pointer, scratch: scratch, tokens: n, inFeatures: inF,
                                 rank: r, scale: 2, mask: mask)
        try ctx.loraDropoutGradA(x: strided.pointer, dyB: dyB.pointer, into: daStrided.pointer, scratch: scratch, tokens: n, inFeatures: inF,
                                 rank: r, scale: 2, mask: mask, xStride: stride)
        let daDiff = firstDifference(try daStrided.download().map(\.bitPattern), try daDense.download().map(\.bitPattern))
        checkTrue("lora dropout dA, x rows \(stride) apart (\(n)x\(inF), r \(r)) = dense", daDiff == nil,
                  daDiff.map { "first difference at \($0)" } ?? "bit for bit")
    }
    // lora_fold_tail against its CPU twin: columns in + c of each row, s·B in [first, first + r), zeros elsewhere.
    for (out, inF, width, first, r, ld) in [(48, 64, 24, 8, 8, 64 + 24), (100, 1000, 48, 32, 16, 1000 + 48 + 5), (64, 256, 16, 0, 16, 272)] {
        let b = rng.floats(out * r, -0.5, 0.5), scale: Float = 2
        let w = try poisoned(UInt16.self, out * ld)
        try ctx.loraFoldTail(b: try upload(b).pointer, scale: scale, into: w.pointer, out: out, in: inF, ld: ld, width: width, first: first, rank: r)
        let got = try w.download()
        var bad: String? = nil
        for o in 0..<out where bad == nil {
            for c in 0..<ld {
                let expected: UInt16 = c < inF || c >= inF + width ? 0xFFFF
                    : (c - inF >= first && c - inF < first + r ? dt.encode(scale * b[o * r + c - inF - first]) : dt.encode(0))
                if got[o * ld + c] != expected {
                    bad = "row \(o) column \(c): \(got[o * ld + c]) for \(expected)"
                    break
                }
            }
        }
        checkTrue("lora fold tail \(out)x\(inF)+\(width) (rank \(r) from \(first), rows \(ld) apart) = CPU twin", bad == nil, bad ?? "bit for bit")
    }
    // cuBLASLt with row strides: y = x·Wᵀ with x's rows and W's rows and y's rows longer than the product reads.
    do {
        let m = 300, n = 272, k = 1040, lda = k + 48, ldb = k + 16, ldc = n + 8
        let x = rng.floats(m * lda).map(dt.round), w = rng.floats(n * ldb).map(dt.round)
        let xd = try upload(x.map(dt.encode)), wd = try upload(w.map(dt.encode))
        let xDense = (0..<m).flatMap { r in x[(r * lda)..<(r * lda + k)] }, wDense = (0..<n).flatMap { r in w[(r * ldb)..<(r * ldb + k)] }
        let y = try poisoned(UInt16.self, m * ldc)
        try ctx.blas().gemm(m: m, n: n, k: k, a: xd.pointer, b: wd.pointer, transB: true, c: y.pointer, lda: lda, ldb: ldb, ldc: ldc)
        let got = try y.download()
        let rowsOfY = (0..<m).flatMap { r in got[(r * ldc)..<(r * ldc + n)].map(dt.decode) }
        var reference = [Float](repeating: 0, count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var sum: Float = 0
                for p in 0..<k { sum += xDense[i * k + p] * wDense[j * k + p] }
                reference[i * n + j] = sum
            }
        }
        check("gemm with lda, ldb, ldc vs CPU (\(m)x\(n)x\(k))", relativeError(rowsOfY, reference), 1e-2)
        let untouched = (0..<m).allSatisfy { r in got[(r * ldc + n)..<(r * ldc + ldc)].allSatisfy { $0 == 0xFFFF } }
        checkTrue("gemm with ldc leaves the columns past n", untouched)
    }
}

/// One run of `trainer` on `batch`: the loss, every LoRA gradient, the adapter after one AdamW step, and the
/// evaluation loss after it.
private struct FoldRun {
    var loss: LossSum
    var gradients: [(name: String, a: [Float], b: [Float])]
    var parameters: [Float]
    var evaluation: LossSum

    var bits: [UInt32] {
        [UInt32(truncatingIfNeeded: loss.sum.bitPattern), UInt32(truncatingIfNeeded: evaluation.sum.bitPattern)]
            + gradients.flatMap { ($0.a + $0.b).map(\.bitPattern) } + parameters.map(\.bitPattern)
    }
}

private func foldRun(_ model: DecoderModel, _ batch: TrainingBatch, fold: Bool, backward: Bool = false, keepWeights: Bool = false,
                     dropoutSeed: UInt64?) throws -> FoldRun {
    var memory = CUDATrainerMemoryOptions.allOnDevice
    memory.foldLoRA = fold
    memory.foldLoRABackward = backward
    memory.keepBlockWeights = keepWeights
    let trainer = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount, memory: memory)
    trainer.deterministic = true
    // Under LoRA dropout the plan leaves the backward fold off (nothing folds there): the run asked for it is the
    // unfolded backward's, which the comparison then checks.
    let dropout = model.linearLayers.contains { ($0.lora?.dropout ?? 0) > 0 }
    let backward = backward && !dropout
    guard trainer.memory.foldLoRA == fold, trainer.memory.foldLoRABackward == backward, trainer.memory.keepBlockWeights == keepWeights else {
        throw UsageError("the trainer did not take foldLoRA = \(fold), foldLoRABackward = \(backward)")
    }
    // The backward's fold needs the residual gradient's spare columns wherever o or down has an adapter, and gate's
    // and up's wherever one of them has (not Phi-3's fused gate_up).
    let c = model.config, (o, down) = c.fusedProjections ? (1, 3) : (3, 6)
    let foldable = backward && !c.sandwichNorms && model.blocks.contains { $0.linears[o].lora != nil || $0.linears[down].lora != nil }
    guard (trainer.residualStride > c.hiddenSize) == foldable else {
        throw UsageError("the residual gradient has rows of \(trainer.residualStride) for hidden \(c.hiddenSize) (backward fold \(foldable ? "expected" : "not expected"))")
    }
    let mlpFoldable = backward && !c.fusedProjections && model.blocks.contains { $0.linears[4].lora != nil || $0.linears[5].lora != nil }
    guard (trainer.gateStride > c.intermediateSize) == mlpFoldable else {
        throw UsageError("gate and up have rows of \(trainer.gateStride) for intermediate \(c.intermediateSize) (backward fold \(mlpFoldable ? "expected" : "not expected"))")
    }
    try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens, dropoutSeed: dropoutSeed)
    let loss = try trainer.lastLoss()
    let gradients = try trainer.loraGradients()
    try trainer.optimizerStep(learningRate: 2e-3, maxGradNorm: nil)
    let parameters = try trainer.loraParameters().flatMap { $0.a + $0.b }
    try trainer.forwardLoss(batch: batch)
    return FoldRun(loss: loss, gradients: gradients, parameters: parameters, evaluation: try trainer.lastLoss())
}

/// The folded trainer against the unfolded one on `model` and `batch`, without and with dropout 0.05.
func compareFolded(_ name: String, model: DecoderModel, batch: TrainingBatch) throws {
    try compareFolded(name, model: model, batch: batch, dropoutSeed: nil)
    for layer in model.linearLayers { layer.lora?.dropout = 0.05 }
    defer { for layer in model.linearLayers { layer.lora?.dropout = 0 } }
    try compareFolded(name + " + dropout 0.05", model: model, batch: batch, dropoutSeed: 77)
}

private func compareFolded(_ name: String, model: DecoderModel, batch: TrainingBatch, dropoutSeed: UInt64?) throws {
    let plain = try foldRun(model, batch, fold: false, dropoutSeed: dropoutSeed)
    try compareFolded(name, model: model, batch: batch, dropoutSeed: dropoutSeed, plain: plain, fold: true, backward: true)
    try compareFolded(name + " (forward fold)", model: model, batch: batch, dropoutSeed: dropoutSeed, plain: plain, fold: true, backward: false)
    try compareFolded(name + " (backward fold)", model: model, batch: batch, dropoutSeed: dropoutSeed, plain: plain, fold: false, backward: true)
    // Kept block weights: A's rows go under W in each linear's own slot.
    try compareFolded(name + " (kept weights)", model: model, batch: batch, dropoutSeed: dropoutSeed, plain: plain, fold: true, backward: true,
                      keepWeights: true)
}

private func compareFolded(_ name: String, model: DecoderModel, batch: TrainingBatch, dropoutSeed: UInt64?, plain: FoldRun,
                           fold: Bool, backward: Bool, keepWeights: Bool = false) throws {
    let folded = try foldRun(model, batch, fold: fold, backward: backward, keepWeights: keepWeights, dropoutSeed: dropoutSeed)
    check("\(name): folded loss (\(fmt(folded.loss.mean, 5)) vs \(fmt(plain.loss.mean, 5)))",
          abs(folded.loss.mean - plain.loss.mean) / abs(plain.loss.mean), 1e-2)
    check("\(name): folded evaluation loss after a step", abs(folded.evaluation.mean - plain.evaluation.mean) / abs(plain.evaluation.mean), 1e-2)
    var worst = 0.0, worstName = "", compared = 0
    for (f, p) in zip(folded.gradients, plain.gradients) {
        for (suffix, x, y) in [("lora_A", f.a, p.a), ("lora_B", f.b, p.b)] {
            var error = relativeError(x, y)
            if error.isNaN { error = .infinity }
            if error >= worst { worst = error; worstName = "\(f.name).\(suffix)" }
            compared += 1
        }
    }
    check("\(name): folded worst of \(compared) LoRA gradients", compared == 2 * plain.gradients.count && compared > 0 ? worst : .infinity,
          5e-2, worstName)
    let paramError = relativeError(folded.parameters, plain.parameters)
    let worstIndex = folded.parameters.indices.max { abs(folded.parameters[$0] - plain.parameters[$0]) < abs(folded.parameters[$1] - plain.parameters[$1]) }
    // AdamW's first step moves each value by about ±lr whatever the gradient's size: a gradient near 0 whose sign
    // differs between the two sums moves by 2·lr, hence 2e-2 (a wrong gradient moves about half of them).
    check("\(name): folded adapter after a step", paramError, 2e-2,
          worstIndex.map { "largest difference at \($0): \(folded.parameters[$0]) vs \(plain.parameters[$0])" } ?? "")
    let again = try foldRun(model, batch, fold: fold, backward: backward, keepWeights: keepWeights, dropoutSeed: dropoutSeed)
    let diff = firstDifference(again.bits, folded.bits)
    checkTrue("\(name): folded run to run, bit for bit", diff == nil, diff.map { "first difference at \($0) of \(folded.bits.count)" } ?? "")
}

/// The backward's fold allocates what the plan counts for it (the residual gradient's and gate's and up's spare
/// columns, A's rows under each folded weight): the peak's change between the fold off and on = the plan's, with one
/// weight scratch and with every linear's kept.
func checkBackwardFoldPeak() throws {
    let measurement = try PeakMeasurement()
    func peak(backward: Bool, keep: Bool) throws -> (bytes: Int, plan: CUDAMemoryPlan) {
        var options = CUDATrainerMemoryOptions.allOnDevice
        options.foldLoRA = true
        options.keepBlockWeights = keep
        options.foldLoRABackward = backward
        let measured = try measurement.peak {
            let trainer = try CUDADecoderTrainer(context: ctx, randomConfig: measurement.config, rank: 64, alpha: 128,
                                                 capacityTokens: measurement.tokens, memory: options)
            guard trainer.memory.foldLoRABackward == backward, trainer.memory.keepBlockWeights == keep else {
                throw UsageError("the trainer did not take the options \(options)")
            }
            return trainer
        }
        return (measured.bytes, measured.plan)
    }
    for keep in [false, true] {
        let off = try peak(backward: false, keep: keep), on = try peak(backward: true, keep: keep)
        checkTrue("peak: the backward fold adds what the plan says\(keep ? " (block weights kept)" : "")",
                  on.bytes - off.bytes == on.plan.total - off.plan.total,
                  "peak \(off.bytes) -> \(on.bytes) bytes, plan \(off.plan.total) -> \(on.plan.total)")
    }
}

func runFoldChecks() {
    group("lora fold kernels") { try checkFoldKernels() }
    group("lora fold memory") { try checkBackwardFoldPeak() }
    group("lora fold trainer: llama fixture") {
        let directory = fixtureDirectory()
        let model = try loadFixtureModel(directory, quantization: .nf4)
        randomizeB(model, seed: 41)
        try compareFolded("llama fixture", model: model, batch: try fixtureBatch(directory))
    }
    group("lora fold trainer: families") {
        for (name, fixture, headDim, heads, kvHeads, length) in [("qwen3", "qwen3", 128, 2, 1, 24), ("gemma2", "gemma2", 256, 2, 1, 20),
                                                                 ("gemma3_text", "gemma3_text", 64, 2, 1, 20), ("phi3", "phi3", 96, 2, 1, 20),
                                                                 ("mistral", "mistral", 32, 2, 1, 22)] {
            let config = try familyConfigForGPU(fixture, headDim: headDim, heads: heads, kvHeads: kvHeads)
            let model = try familyModelForGPU(config, seed: 700 &+ UInt64(length))
            let examples = randomExamples(count: 2, length: length, vocab: config.vocabularySize, seed: 800 &+ UInt64(length))
            let batch = TrainingBatch(examples: examples.map { ($0.tokens, $0.labels) }, length: length, padID: 0)
            try compareFolded(name, model: model, batch: batch)
        }
    }
    group("lora fold trainer: adapters on some projections, mixed ranks") {
        // q and v (k without: a gap in norm1's x·Aᵀ columns), up alone of gate/up, down; o without.
        let config = try familyConfigForGPU("qwen3", headDim: 64, heads: 2, kvHeads: 1)
        let model = DecoderModel.random(config: config, seed: 9, weightStd: 0.83 / Float(config.hiddenSize).squareRoot(), embeddingStd: 0.5,
                                        normSpread: 0.3, round: dt.round)
        _ = try model.attachLoRA(LoRAConfig(rank: 8, alpha: 16, targetModules: ["q_proj", "v_proj", "up_proj"]), seed: 10)
        _ = try model.attachLoRA(LoRAConfig(rank: 4, alpha: 4, targetModules: ["down_proj"]), seed: 11)
        randomizeB(model, seed: 12)
        _ = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
        let examples = randomExamples(count: 2, length: 16, vocab: config.vocabularySize, seed: 13)
        let batch = TrainingBatch(examples: examples.map { ($0.tokens, $0.labels) }, length: 16, padID: 0)
        try compareFolded("q, v, up r8 + down r4", model: model, batch: batch)
        try compareTrainer("q, v, up r8 + down r4 folded vs CPU", model: model, batch: batch, dropoutSeed: nil)
    }
}
