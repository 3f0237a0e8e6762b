// Parity checks for what the GPU trainer and GPU generation take over from the CPU (called from main.swift):
//   dropout mask                  training.cu's dropout kernels vs Training/DropoutMask.swift, bit for bit: the keep
//                                 mask on random seeds, sizes and rates, d(x) = bf16(x / keep), dx + t / keep; and
//                                 add_row_vector (a linear's bias over rows) exactly
//   training: dropout             CUDADecoderTrainer with LoRA dropout 0.1 on the tiny-llama fixture vs
//                                 DecoderModel.accumulateGradients with the same dropout seed, the CPU with gradient
//                                 checkpointing on and off (the GPU always recomputes: forward, recomputation and
//                                 backward must all draw the CPU's masks)
//   training: LoRA ranks          different ranks per projection (PEFT rank_pattern) on the fixture vs the CPU
//   training: q_proj, v_proj      LoRA on two projections only (PEFT's Llama default), with and without dropout
//   qwen2                         the tiny-qwen2 fixture (q, k, v biases, tied embeddings): GPU trainer loss and
//                                 gradients vs the CPU, and CUDAInference prefill/decode logits vs DecoderModel.forward
//                                 (biases scaled by 1/4 and all values rounded to bf16: see QwenCheckWeights)
// The fixture's Qwen2 has head dimension 16, which the GPU attention kernels do not take (32, 64 or 128), so these
// checks read the same weights as 2 query heads and 1 KV head of dimension 32: every weight keeps its shape, the
// model is a valid (different) Qwen2, and CPU and GPU compute the same one.
// Tolerances as TrainingChecks.swift: loss 1e-2 relative, each LoRA gradient 5e-2 (relative L2 per matrix; the
// worst of all is checked); logits 3e-2 as InferenceChecks.swift.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Dropout kernels

func checkDropoutKernels() throws {
    for (count, p) in [(1, 0.1), (4097, 0.05), (100_003, 0.1), (65_536, 0.5), (3000, 0.9)] as [(Int, Float)] {
        let seed = rng.next()
        let keep: Float = 1 - p
        let mask = try poisoned(UInt8.self, count)
        try ctx.dropoutKeepMask(into: mask.pointer, count: count, seed: seed, keep: keep)
        let gpuMask = try mask.download()
        var mismatches = 0, kept = 0
        for i in 0..<count {
            let expected: UInt8 = DropoutMask.keeps(seed: seed, index: i, keep: keep) ? 1 : 0
            if gpuMask[i] != expected { mismatches += 1 }
            if expected == 1 { kept += 1 }
        }
        checkTrue("dropout mask = DropoutMask (n \(count), p \(p))", mismatches == 0,
                  "\(mismatches) of \(count) differ; kept \(fmt(Double(kept) / Double(count), 3)), seed \(seed)")

        let (xb, x) = rng.bf16(count)
        let xd = try upload(xb), out = try poisoned(UInt16.self, count)
        try ctx.dropoutApply(x: xd.pointer, into: out.pointer, count: count, seed: seed, keep: keep)
        let applied = try out.download()
        let expectedApplied = (0..<count).map { DropoutMask.keeps(seed: seed, index: $0, keep: keep) ? dt.encode(x[$0] / keep) : 0 }
        checkTrue("dropout apply bit-exact (n \(count), p \(p))", applied == expectedApplied,
                  "\(zip(applied, expectedApplied).filter { $0 != $1 }.count) of \(count) differ")

        let (db, dx) = rng.bf16(count)
        let (tb, t) = rng.bf16(count)
        let dd = try upload(db), td = try upload(tb)
        try ctx.dropoutAddMasked(td.pointer, into: dd.pointer, count: count, seed: seed, keep: keep)
        let added = try dd.download()
        let expectedAdded = (0..<count).map {
            DropoutMask.keeps(seed: seed, index: $0, keep: keep) ? dt.encode(dx[$0] + t[$0] / keep) : db[$0]
        }
        checkTrue("dropout masked add bit-exact (n \(count), p \(p))", added == expectedAdded,
                  "\(zip(added, expectedAdded).filter { $0 != $1 }.count) of \(count) differ")
    }

    let rows = 37, columns = 96
    let (yb, y) = rng.bf16(rows * columns)
    let (vb, v) = rng.bf16(columns)
    let vd = try upload(vb)
    for overwrite in [false, true] {
        let yd = try upload(yb)
        try ctx.addRowVector(vd.pointer, to: yd.pointer, rows: rows, columns: columns, overwrite: overwrite)
        let expected = (0..<(rows * columns)).map { overwrite ? vb[$0 % columns] : dt.encode(y[$0] + v[$0 % columns]) }
        checkTrue("add_row_vector \(rows)x\(columns)\(overwrite ? " (overwrite)" : "") bit-exact", try yd.download() == expected)
    }
}

// MARK: - Trainer vs CPU

/// The GPU trainer's loss and LoRA gradients vs the CPU backward on `model` (whose linear weights are already the
/// NF4 values both sides use), with `dropoutSeed` (nil: no dropout on the GPU, seed 0 on the CPU, whose adapters
/// must then have dropout 0). One check for the loss, one for the worst of all gradients.
func compareTrainer(_ name: String, model: DecoderModel, batch: TrainingBatch, dropoutSeed: UInt64?,
                    checkpointing: [Bool] = [true]) throws {
    let trainer = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount)
    try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens, dropoutSeed: dropoutSeed)
    let gpuLoss = try trainer.lastLoss()
    let gpuGradients = try trainer.loraGradients()
    for recompute in checkpointing {
        let cpuGradients = LoRAGradients(model: model)
        let cpuLoss = try model.accumulateGradients(batch: batch, into: cpuGradients, normalizer: batch.countedTokens,
                                                    options: TrainingStepOptions(gradientCheckpointing: recompute,
                                                                                 dropoutSeed: dropoutSeed ?? 0))
        let mode = checkpointing.count > 1 ? (recompute ? ", CPU checkpointing" : ", CPU no checkpointing") : ""
        checkTrue("\(name): same counted tokens\(mode)", gpuLoss.count == cpuLoss.count, "GPU \(gpuLoss.count), CPU \(cpuLoss.count)")
        check("\(name): loss\(mode) (GPU \(fmt(gpuLoss.mean, 5)), CPU \(fmt(cpuLoss.mean, 5)))",
              abs(gpuLoss.mean - cpuLoss.mean) / abs(cpuLoss.mean), 1e-2)
        var worst = 0.0, sum = 0.0, compared = 0, worstName = ""
        for (module, a, b) in gpuGradients {
            guard let refA = cpuGradients.a[module]?.values, let refB = cpuGradients.b[module]?.values else {
                checkTrue("\(name): gradient of \(module) has a CPU twin", false)
                continue
            }
            for (suffix, gpu, ref) in [("lora_A", a, refA), ("lora_B", b, refB)] {
                var error = relativeError(gpu, ref)
                if error.isNaN { error = .infinity }
                if error >= worst { worst = error; worstName = "\(module.dropFirst("model.layers.".count)).\(suffix)" }
                sum += error
                compared += 1
            }
        }
        let expected = model.linearLayers.filter { $0.lora != nil }.count * 2
        check("\(name): worst of \(compared)/\(expected) LoRA gradients\(mode)", compared == expected ? worst : .infinity, 5e-2,
              "\(worstName); mean \(fmt(sum / Double(max(compared, 1))))")
    }
}

/// Relative L2 distance between two sets of LoRA gradients over all matrices (for the "the check can fail" notes).
func gradientDistance(_ a: LoRAGradients, _ b: LoRAGradients) -> Double {
    var x: [Float] = [], y: [Float] = []
    for ((_, ga), (_, gb)) in zip(a.named, b.named) { x += ga.values; y += gb.values }
    return relativeError(x, y)
}

func runParityTrainingChecks() {
    let directory = fixtureDirectory()

    group("training: dropout 0.1 loss and LoRA gradients vs CPU") {
        let batch = try fixtureBatch(directory)
        let model = try loadFixtureModel(directory, quantization: .nf4)
        for layer in model.linearLayers { layer.lora?.dropout = 0.1 }
        // The check can fail: dropout moves the CPU's gradients far beyond the tolerance.
        let seed: UInt64 = 0x5EED_0000 &+ (rng.next() % 1000)
        let withDropout = LoRAGradients(model: model), other = LoRAGradients(model: model)
        _ = try model.accumulateGradients(batch: batch, into: withDropout, normalizer: batch.countedTokens,
                                          options: TrainingStepOptions(dropoutSeed: seed))
        _ = try model.accumulateGradients(batch: batch, into: other, normalizer: batch.countedTokens,
                                          options: TrainingStepOptions(dropoutSeed: seed &+ 1))
        let distance = gradientDistance(other, withDropout)
        checkTrue("dropout: another seed moves the CPU gradients", distance > 0.2, "by \(fmt(distance)) (tolerance 5e-2); seed \(seed)")
        try compareTrainer("dropout 0.1", model: model, batch: batch, dropoutSeed: seed, checkpointing: [true, false])
        // Every block's masks kept as bits from the forward (when asked) or hashed again by the backward (the
        // default): the same masks, so the same loss and gradients bit for bit.
        var keeping = CUDATrainerMemoryOptions.automatic(for: model.config)
        keeping.keepDropoutMasks = true
        let kept = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount, memory: keeping)
        let rehashed = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount)
        checkTrue("dropout: masks rehashed by default, kept when asked", kept.memory.keepDropoutMasks && !rehashed.memory.keepDropoutMasks)
        for trainer in [kept, rehashed] { try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens, dropoutSeed: seed) }
        let (keptLoss, rehashedLoss) = (try kept.lastLoss(), try rehashed.lastLoss())
        checkTrue("dropout: kept masks give the rehashed loss bit for bit", keptLoss.mean.bitPattern == rehashedLoss.mean.bitPattern,
                  "\(keptLoss.mean) vs \(rehashedLoss.mean)")
        let keptGradients = try kept.loraGradients(), rehashedGradients = try rehashed.loraGradients()
        let differing = zip(keptGradients, rehashedGradients).filter { k, h in
            k.name != h.name || k.a.map(\.bitPattern) != h.a.map(\.bitPattern) || k.b.map(\.bitPattern) != h.b.map(\.bitPattern)
        }.count
        checkTrue("dropout: kept masks give the rehashed LoRA gradients bit for bit", differing == 0 && keptGradients.count > 0,
                  "\(differing) of \(keptGradients.count) linears differ")
    }

    group("training: dropout 0.1, evaluation has none") {
        let batch = try fixtureBatch(directory)
        let model = try loadFixtureModel(directory, quantization: .nf4)
        for layer in model.linearLayers { layer.lora?.dropout = 0.1 }
        let trainer = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount)
        try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens)  // no dropout seed: evaluation
        let gpu = try trainer.lastLoss()
        let cpu = try model.loss(batch: batch)
        check("eval loss without dropout (GPU \(fmt(gpu.mean, 5)), CPU \(fmt(cpu.mean, 5)))", abs(gpu.mean - cpu.mean) / abs(cpu.mean), 1e-2)
    }

    group("training: LoRA ranks per projection vs CPU") {
        let batch = try fixtureBatch(directory)
        let model = try ModelLoader.load(directory + "/base", quantization: .nf4).model
        var lora = LoRAConfig(rank: 8, alpha: 16, targetModules: LoRAConfig.llamaProjections)
        lora.rankPattern = ["q_proj": 4, "v_proj": 12, "down_proj": 16, "layers.1.mlp.gate_proj": 2]
        try model.attachLoRA(lora, seed: 11)
        randomizeB(model, seed: 12)
        let ranks = Set(model.linearLayers.compactMap { $0.lora?.rank })
        checkTrue("LoRA ranks differ per projection", ranks == [2, 4, 8, 12, 16], "ranks \(ranks.sorted())")
        try compareTrainer("ranks 2-16", model: model, batch: batch, dropoutSeed: nil)
    }

    // PEFT's default for Llama: LoRA on q_proj and v_proj only; the other five projections are the frozen base alone.
    group("training: LoRA on q_proj and v_proj only vs CPU") {
        let batch = try fixtureBatch(directory)
        let model = try ModelLoader.load(directory + "/base", quantization: .nf4).model
        try model.attachLoRA(LoRAConfig(rank: 8, alpha: 16, targetModules: ["q_proj", "v_proj"]), seed: 13)
        randomizeB(model, seed: 14)
        let adapted = model.linearLayers.filter { $0.lora != nil }.map(\.name)
        checkTrue("q_proj and v_proj only", adapted.count == 2 * model.blocks.count
                  && adapted.allSatisfy { $0.hasSuffix("q_proj") || $0.hasSuffix("v_proj") }, "\(adapted.count) adapted linears")
        try compareTrainer("q_proj, v_proj", model: model, batch: batch, dropoutSeed: nil)
        for layer in model.linearLayers { layer.lora?.dropout = 0.1 }  // (the CPU drops out whenever a layer's rate is > 0)
        try compareTrainer("q_proj, v_proj + dropout 0.1", model: model, batch: batch, dropoutSeed: 91)
    }
}

/// B ≠ 0 (PEFT starts from B = 0, which makes every A gradient zero and the comparison of A empty).
func randomizeB(_ model: DecoderModel, seed: UInt64) {
    var r = SeededGenerator(seed: seed)
    for layer in model.linearLayers {
        guard let b = layer.lora?.b else { continue }
        for i in 0..<b.count { b.pointer[i] = (r.nextFloat() * 2 - 1) * 0.05 }
    }
}

// MARK: - Qwen2 (linear biases)

/// The tiny-qwen2 fixture read as 2 query heads and 1 KV head of dimension 32 (see the header), with LoRA r 8 on the
/// seven projections (B random), its linear weights quantized to NF4 on the CPU model (the GPU quantizes the same).
func loadQwen2ForGPU(biases: Bool = true) throws -> DecoderModel {
    let directory = fixtureDirectory().replacingSuffix("tiny-llama", with: "tiny-qwen2")
    guard var fields = try JSONValue.parse(bytes: FileSystem.readFile(directory + "/config.json")).object else {
        throw UsageError("\(directory)/config.json is not a JSON object")
    }
    fields["num_attention_heads"] = .int(2)
    fields["num_key_value_heads"] = .int(1)
    fields["head_dim"] = nil
    // Qwen2 always has q, k, v biases; the same shapes read as a Llama have none.
    if !biases { fields["model_type"] = .string("llama") }
    let config = try DecoderConfig(json: .object(fields), file: directory + "/config.json")
    guard config.headDim == 32, config.attentionBias == biases else {
        throw UsageError("tiny-qwen2 read with 2 heads: head dim \(config.headDim), attention bias \(config.attentionBias)")
    }
    let model = try DecoderModel(config: config, weights: QwenCheckWeights(inner: try SafeTensorsCheckpoint(directory: directory), biasScale: 0.25, keepBiases: biases))
    try model.attachLoRA(LoRAConfig(rank: 8, alpha: 16, targetModules: LoRAConfig.llamaProjections), seed: 21)
    randomizeB(model, seed: 22)
    _ = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
    return model
}

/// The fixture as the check reads it: its biases scaled by `biasScale`, then every value rounded to bf16. The
/// fixture's biases are drawn N(0, 0.5) (so that a missing bias shows) next to weights of std 0.02; at that size they
/// dominate q·k and make the attention-side LoRA gradients so ill-conditioned that bf16 storage of the inputs alone
/// moves the CPU's own layer-1 q_proj gradient by 5%, and the GPU's bf16 activations move it by 22% (measured, with
/// either attention kernel). Scaled by 1/4 they still change every gradient far beyond the tolerance (the check
/// prints by how much) while the arithmetic stays comparable. The GPU keeps biases, norms and the embedding in bf16,
/// so the CPU reads the same rounded values.
struct QwenCheckWeights: BaseWeightSource {
    let inner: SafeTensorsCheckpoint
    let biasScale: Float
    /// Without them the biases are not offered, as a checkpoint without biases would not.
    let keepBiases: Bool
    var origin: String { inner.origin }
    var tensorNames: [String] { inner.names.filter { keepBiases || !$0.hasSuffix(".bias") } }
    func contains(_ name: String) -> Bool { (keepBiases || !name.hasSuffix(".bias")) && inner.contains(name) }
    func tensor(_ name: String) throws -> (values: [Float], shape: [Int]) {
        let (values, shape) = try inner.tensor(name)
        let scale: Float = name.hasSuffix(".bias") ? biasScale : 1
        return (values.map { dt.round($0 * scale) }, shape)
    }
}

extension String {
    func replacingSuffix(_ suffix: String, with replacement: String) -> String {
        hasSuffix(suffix) ? String(dropLast(suffix.count)) + replacement : self
    }
}

func runQwen2Checks() {
    group("qwen2: trainer loss and LoRA gradients vs CPU (q, k, v biases)") {
        let model = try loadQwen2ForGPU()
        checkTrue("qwen2: q, k, v have biases", model.blocks.allSatisfy { $0.attentionInput.allSatisfy { $0.bias != nil } })
        let examples = randomExamples(count: 2, length: 20, vocab: model.config.vocabularySize, seed: 31)
        let batch = TrainingBatch(examples: examples.enumerated().map { (i, e) in
            (e.tokens, e.labels.enumerated().map { i == 0 && $0.offset < 5 ? -100 : $0.element })
        }, length: 20, padID: 0)
        // The check can fail: without its biases the CPU's gradients move far beyond the tolerance.
        let unbiased = try loadQwen2ForGPU(biases: false)
        let withBiases = LoRAGradients(model: model), without = LoRAGradients(model: unbiased)
        _ = try model.accumulateGradients(batch: batch, into: withBiases, normalizer: batch.countedTokens)
        _ = try unbiased.accumulateGradients(batch: batch, into: without, normalizer: batch.countedTokens)
        let distance = gradientDistance(without, withBiases)
        checkTrue("qwen2: the biases move the CPU gradients", distance > 0.2, "by \(fmt(distance)) (tolerance 5e-2)")
        try compareTrainer("qwen2", model: model, batch: batch, dropoutSeed: nil)
        for layer in model.linearLayers { layer.lora?.dropout = 0.1 }
        try compareTrainer("qwen2 + dropout 0.1", model: model, batch: batch, dropoutSeed: 77)
    }

    group("qwen2: inference logits vs CPU (q, k, v biases)") {
        let model = try loadQwen2ForGPU()
        let prompt = randomExamples(count: 1, length: 12, vocab: model.config.vocabularySize, seed: 41)[0].tokens
        try compareInference("qwen2", model: model, prompt: prompt, decodeSteps: 6, threshold: 3e-2)
    }
}
