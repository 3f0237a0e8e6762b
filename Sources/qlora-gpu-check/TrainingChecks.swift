// Training checks: the GPU trainer (CUDADecoderTrainer) against the CPU reference on the tiny-llama fixture, a
// forward-only (evaluation) loss against the forward+backward one, a short real training run whose loss must go down,
// and the out-of-memory plan error.
//
// The fixture is read from Tests/Fixtures/tiny-llama under the working directory (the repository checkout) or
// from $QLORA_FIXTURES. The CPU reference is the NF4 model (the fixture's base quantized on load, bitsandbytes-
// identical) with the fixture's adapter; the GPU trainer quantizes the same dense weights with the same function.
// Tolerances: the GPU computes activations and GEMM operands in bf16 (8 significant bits), the CPU in fp32, so
// the loss is held to 1e-2 relative and each LoRA gradient to 5e-2 (relative L2 over the whole matrix).

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

func fixtureDirectory() -> String {
    if let value = getenv("QLORA_FIXTURES") { return String(cString: value) + "/tiny-llama" }
    return "Tests/Fixtures/tiny-llama"
}

/// The fixture batch: input_ids rows with their labels, as the CPU tests build it.
func fixtureBatch(_ directory: String) throws -> TrainingBatch {
    let expected = try SafeTensorsFile(path: directory + "/expected.safetensors")
    let ids = try expected.floats("input_ids").map { Int($0) }
    let labels = try expected.floats("labels").map { Int($0) }
    guard let shape = expected.info("input_ids")?.shape, shape.count == 2 else {
        throw UsageError("\(directory)/expected.safetensors: input_ids is not 2-D")
    }
    let (rows, length) = (shape[0], shape[1])
    return TrainingBatch(examples: (0..<rows).map { r in
        (Array(ids[(r * length)..<((r + 1) * length)]), Array(labels[(r * length)..<((r + 1) * length)]))
    }, length: length, padID: 0)
}

func loadFixtureModel(_ directory: String, quantization: BaseQuantization) throws -> DecoderModel {
    let model = try ModelLoader.load(directory + "/base", quantization: quantization).model
    _ = try PEFTAdapter.load(directory: directory + "/adapter", into: model)
    return model
}

func runTrainingChecks(_ ctx: CUDAContext) {
    let directory = fixtureDirectory()

    // The clipping norm as the trainer computes it (training.cu's tensor_sum_squares, norm_from_tensor_squares,
    // clip_by_coefficient) against its CPU twin, GradientClipping: tensors of awkward sizes at aligned offsets with
    // garbage in the gaps, the norm within Double summation order (1e-12), each tensor's sum too, the clipped values
    // the CPU's bit for bit (the coefficient rounds to the same Float); no clipping at maxNorm ∞; a NaN leaves the
    // values alone; a ZeRO-2 rank's owned subset (the others' sums 0) gives the norm of those tensors alone.
    group("training: clipping norm per tensor = GradientClipping") {
        var r = SeededGenerator(seed: 41)
        let counts = [1, 5, 255, 256, 257, 4096, 100_003, 3000, 7]
        var offsets: [Int] = [], end = 0
        for n in counts { offsets.append(end); end = (end + n + 127) / 128 * 128 + 128 }  // a gap after every tensor
        var flat = r.floats(end, -50, 50)  // the gaps keep these values: a kernel reading them would be wrong
        func tensors(_ values: [Float]) -> [[Float]] { counts.indices.map { Array(values[offsets[$0]..<(offsets[$0] + counts[$0])]) } }
        for t in counts.indices { for i in 0..<counts[t] { flat[offsets[t] + i] = r.uniform(-0.01, 0.01) * Float(t + 1) } }
        let offsetBuffer = try ctx.allocator.buffer(copying: offsets.map { Int64($0) })
        let countBuffer = try ctx.allocator.buffer(copying: counts.map { Int64($0) })
        let squares = try ctx.allocator.buffer(Double.self, count: counts.count)
        let result = try ctx.allocator.buffer(Double.self, count: 2)
        func gpuClip(_ values: [Float], maxNorm: Double, owned: Range<Int>? = nil) throws -> (norm: Double, squares: [Double], values: [Float]) {
            let grads = try ctx.allocator.buffer(copying: values)
            try squares.fill(byte: 0)
            try ctx.tensorSumSquares(grads, offsets: offsetBuffer, counts: countBuffer, tensors: owned ?? counts.indices, into: squares)
            try ctx.normFromTensorSquares(squares, count: counts.count, maxNorm: maxNorm, into: result)
            try ctx.clipByCoefficient(grads.pointer, count: values.count, result: result)
            return (try result.download()[0], try squares.download(), try grads.download())
        }
        func cpuNorm(_ ts: [[Float]]) -> Double {
            GradientClipping.combine(ts.map { t in t.withUnsafeBufferPointer { GradientClipping.tensorSquares($0) } })
        }
        let whole = tensors(flat)
        let norm = cpuNorm(whole)
        let cpuSquares = whole.map { t in t.withUnsafeBufferPointer { GradientClipping.tensorSquares($0) } }
        let maxNorm = norm / 3
        let gpu = try gpuClip(flat, maxNorm: maxNorm)
        check("per-tensor norm (GPU \(fmt(gpu.norm, 6)), CPU \(fmt(norm, 6)))", abs(gpu.norm - norm) / norm, 1e-12)
        check("each tensor's sum of squares", zip(gpu.squares, cpuSquares).map { abs($0 - $1) / max($1, 1e-300) }.max() ?? .infinity, 1e-12)
        let coefficient = Float(GradientClipping.coefficient(norm: norm, maxNorm: maxNorm))
        let expected = whole.map { $0.map { $0 * coefficient } }
        let clipped = tensors(gpu.values)
        let differing = zip(clipped.joined(), expected.joined()).filter { $0.bitPattern != $1.bitPattern }.count
        checkTrue("clipped values = the CPU's (coefficient \(fmt(Double(coefficient), 6)))", differing == 0, "\(differing) values differ")
        let gaps = (0..<end).filter { i in !counts.indices.contains { offsets[$0] <= i && i < offsets[$0] + counts[$0] } }
        checkTrue("the gaps between tensors are scaled, never read", gaps.allSatisfy { gpu.values[$0] == flat[$0] * coefficient },
                  "\(gaps.count) gap values")
        let unclipped = try gpuClip(flat, maxNorm: .infinity)
        checkTrue("maxNorm ∞ measures only: the values unchanged", unclipped.values.map(\.bitPattern) == flat.map(\.bitPattern)
                  && abs(unclipped.norm - norm) / norm <= 1e-12)
        var poisoned = flat
        poisoned[offsets[5] + 17] = .nan
        let nan = try gpuClip(poisoned, maxNorm: maxNorm)
        checkTrue("a NaN gradient: a NaN norm, the values unchanged", nan.norm.isNaN
                  && zip(nan.values, poisoned).allSatisfy { $0.bitPattern == $1.bitPattern })
        let owned = 3..<7
        let part = try gpuClip(flat, maxNorm: .infinity, owned: owned)
        let ownedNorm = cpuNorm(Array(whole[owned]))
        check("a rank's own tensors (3..<7; the others 0)", abs(part.norm - ownedNorm) / ownedNorm, 1e-12)
        checkTrue("the others' sums are left 0", counts.indices.filter { !owned.contains($0) }.allSatisfy { part.squares[$0] == 0 })
    }

    group("training: fixture loss and LoRA gradients vs CPU") {
        let batch = try fixtureBatch(directory)
        let reference = try loadFixtureModel(directory, quantization: .nf4)
        let cpuGradients = LoRAGradients(model: reference)
        let cpuLoss = try reference.accumulateGradients(batch: batch, into: cpuGradients, normalizer: batch.countedTokens)

        let dense = try loadFixtureModel(directory, quantization: .none)
        let trainer = try CUDADecoderTrainer(context: ctx, model: dense, capacityTokens: batch.tokenCount)
        try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens)
        let gpuLoss = try trainer.lastLoss()
        checkTrue("training counts the same tokens", gpuLoss.count == cpuLoss.count, "GPU \(gpuLoss.count), CPU \(cpuLoss.count)")
        check("training loss (GPU \(fmt(gpuLoss.mean, 5)), CPU \(fmt(cpuLoss.mean, 5)))",
              abs(gpuLoss.mean - cpuLoss.mean) / abs(cpuLoss.mean), 1e-2)
        var worst = 0.0, sumErrors = 0.0, checked = 0
        for (name, a, b) in try trainer.loraGradients() {
            guard let refA = cpuGradients.a[name]?.values, let refB = cpuGradients.b[name]?.values else {
                checkTrue("gradient of \(name) has a CPU twin", false)
                continue
            }
            for (suffix, gpu, ref) in [("lora_A", a, refA), ("lora_B", b, refB)] {
                let error = relativeError(gpu, ref)
                worst = max(worst, error.isNaN ? .infinity : error)
                sumErrors += error
                checked += 1
                check("grad \(name.dropFirst("model.layers.".count)).\(suffix)", error, 5e-2)
            }
        }
        checkTrue("all 28 LoRA gradients compared", checked == 28,
                  "\(checked) compared; worst rel.err \(fmt(worst)), mean \(fmt(sumErrors / Double(max(checked, 1))))")
    }

    // Evaluation's forward-only loss: the same launches as the forward of forwardBackward up to the loss, so the
    // loss sum should be the same bits (held to 1e-6 relative in case a reduction's order ever differs) and the
    // counted tokens equal; the gradients of the preceding forwardBackward must be left exactly as they were.
    group("training: forward-only loss") {
        let batch = try fixtureBatch(directory)
        let dense = try loadFixtureModel(directory, quantization: .none)
        let trainer = try CUDADecoderTrainer(context: ctx, model: dense, capacityTokens: batch.tokenCount)
        func compare(_ name: String, _ trainer: CUDADecoderTrainer, _ batch: TrainingBatch) throws {
            try trainer.forwardBackward(batch: batch, normalizer: max(batch.countedTokens, 1))
            let full = try trainer.lastLoss()
            let gradients = try trainer.loraGradients()
            try trainer.forwardLoss(batch: batch)
            let forward = try trainer.lastLoss()
            check("\(name): forward-only loss = forward+backward loss", abs(forward.sum - full.sum) / max(abs(full.sum), 1e-30), 1e-6,
                  "sums \(fmt(forward.sum, 6)) and \(fmt(full.sum, 6))\(forward.sum == full.sum ? ", the same bits" : ""); "
                  + "\(forward.count) and \(full.count) tokens")
            checkTrue("\(name): forward-only loss counts the same tokens", forward.count == full.count && full.count > 0)
            let after = try trainer.loraGradients()
            let unchanged = gradients.count == after.count && zip(gradients, after).allSatisfy { $0.name == $1.name && $0.a == $1.a && $0.b == $1.b }
            checkTrue("\(name): forward-only loss leaves the gradients alone", unchanged, "\(after.count) LoRA gradient pairs compared")
        }
        try compare("fixture", trainer, batch)
        // After an optimizer step (B no longer zero anywhere), on a smaller batch of two of the fixture's rows.
        try trainer.optimizerStep(learningRate: 2e-3, maxGradNorm: 1)
        let rows = try fixtureBatch(directory)
        let two = TrainingBatch(examples: (0..<min(2, rows.rows)).map { r in
            (rows.tokens[(r * rows.length)..<((r + 1) * rows.length)].map { Int($0) },
             rows.labels[(r * rows.length)..<((r + 1) * rows.length)].map { Int($0) })
        }, length: rows.length, padID: 0)
        try compare("fixture after a step, 2 rows", trainer, two)
        // An odd number of blocks (the forward's two buffers end swapped), random weights.
        var config = try DecoderConfig(directory: directory + "/base")
        config.layerCount = 3
        let random = try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 4, alpha: 8, capacityTokens: 4 * 40, seed: 5)
        let examples = randomExamples(count: 4, length: 40, vocab: config.vocabularySize, seed: 9)
        try compare("random 3 blocks", random, TrainingBatch(examples: examples.map { ($0.tokens, $0.labels) }, length: 40, padID: 0))
    }

    group("training: short GPU run lowers the loss") {
        let batch = try fixtureBatch(directory)
        let dense = try loadFixtureModel(directory, quantization: .none)
        let trainer = try CUDADecoderTrainer(context: ctx, model: dense, capacityTokens: batch.tokenCount)
        var losses: [Double] = []
        for _ in 0..<30 {
            try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens)
            losses.append(try trainer.lastLoss().mean)
            try trainer.optimizerStep(learningRate: 2e-3, maxGradNorm: 1)
        }
        let norm = try trainer.lastGradientNorm()
        checkTrue("30 AdamW steps lower the fixture loss", losses.last! < 0.9 * losses[0] && losses.allSatisfy(\.isFinite),
                  "loss \(fmt(losses[0], 4)) -> \(fmt(losses[9], 4)) (10) -> \(fmt(losses.last!, 4)) (30); last grad norm \(fmt(norm, 3))")
    }

    runTrainerEngineChecks(ctx)

    group("training: out-of-memory plan") {
        let config = Architecture.llama3_1_8b.config
        do {
            // 128 × 8192 tokens: about 180 GiB even with the checkpoints offloaded (more than an H200 has).
            _ = try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 16, alpha: 32, capacityTokens: 128 * 8192)
            checkTrue("an impossible plan is refused", false, "128 x 8192 tokens of the 8B shape were accepted")
        } catch let error as CUDAOutOfMemoryError {
            let text = "\(error)"
            checkTrue("an impossible plan is refused with the plan", text.contains("activations") && text.contains("Lower --batch"),
                      String(text.prefix(160)) + "...")
        }
    }
}
