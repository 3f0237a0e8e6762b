// The GPU trainer on every model family DecoderConfig describes, against the CPU reference (called from main.swift).
//
// The family fixtures (Tests/Fixtures/families/<name>) have head dimensions of 16 and 24, which the GPU attention
// kernels are not built for, so each check reads the fixture's config with GPU-sized heads (head dims 32, 64, 96, 128
// and 256 between them; Phi-3's hidden size follows its heads, and longrope's factor lists the rotated pairs) and makes a
// random model of it (`DecoderModel.random`: weights of std 0.83/√hidden, large enough that soft-capping bites, every
// norm ±30% away from 1, all values rounded to the compute type), LoRA r 8 on every projection with B random, the linears in NF4. The CPU
// reference is exact against transformers + PEFT on the fixtures themselves (the CPU test suite); here the GPU must
// agree with it: loss 1e-2 relative, each LoRA gradient 5e-2 (relative L2 per matrix, the worst of all checked),
// as ParityChecks.swift. Each family's check first shows that its variations move the CPU's loss or gradients far
// beyond those tolerances (so a GPU path that left one out could not pass).

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// A family fixture's directory (QLORA_FIXTURES as fixtureDirectory()).
func familyFixtureDirectory(_ name: String) -> String {
    fixtureDirectory().replacingSuffix("tiny-llama", with: "families/" + name)
}

/// The fixture's config with `heads` query heads and `kvHeads` KV heads of dimension `headDim`.
func familyConfigForGPU(_ fixture: String, headDim d: Int, heads: Int, kvHeads: Int) throws -> DecoderConfig {
    let path = familyFixtureDirectory(fixture) + "/base/config.json"
    guard var top = try JSONValue.parse(bytes: FileSystem.readFile(path)).object else {
        throw UsageError("\(path) is not a JSON object")
    }
    func resize(_ fields: inout JSONObject) {
        fields["num_attention_heads"] = .int(Int64(heads))
        fields["num_key_value_heads"] = .int(Int64(kvHeads))
        guard fields["model_type"]?.string == "phi3" else {
            fields["head_dim"] = .int(Int64(d))
            return
        }
        // Phi-3's head dimension is hidden / heads; longrope has one factor per rotated pair.
        fields["hidden_size"] = .int(Int64(heads * d))
        fields["head_dim"] = nil
        guard var rope = fields["rope_parameters"]?.object, rope["rope_type"]?.string == "longrope" else { return }
        let partial = fields["partial_rotary_factor"]?.double ?? 1
        let pairs = Int(Double(d) * partial) / 2
        rope["short_factor"] = .array((0..<pairs).map { .double(1 + 0.1 * Double($0)) })
        rope["long_factor"] = .array((0..<pairs).map { .double(1 + 0.6 * Double($0)) })
        fields["rope_parameters"] = .object(rope)
    }
    if var text = top["text_config"]?.object {
        resize(&text)
        top["text_config"] = .object(text)
    } else {
        resize(&top)
    }
    let config = try DecoderConfig(json: .object(top), file: path)
    guard config.headDim == d, config.headCount == heads else {
        throw UsageError("\(path) read with \(heads) heads of \(d): got \(config.headCount) of \(config.headDim)")
    }
    return config
}

/// A random model of `config` with LoRA r 8 on every projection (B random) and its linears in NF4 on the CPU too.
func familyModelForGPU(_ config: DecoderConfig, seed: UInt64) throws -> DecoderModel {
    // Weights of std 0.83/√hidden (0.12 at the fixtures' hidden 48): each projection scales its input's size by
    // about the same factor whatever the width, so a wider check model (Phi-3's 2 × 96 = 192) is not worse conditioned
    // than the others (at a flat 0.12 its bf16 run missed the gradient tolerance by 13% while fp16 passed).
    let weightStd = 0.83 / Float(config.hiddenSize).squareRoot()
    let model = DecoderModel.random(config: config, seed: seed, weightStd: weightStd, embeddingStd: 0.5, normSpread: 0.3, round: dt.round)
    let targets = config.fusedProjections ? LoRAConfig.fusedProjections : LoRAConfig.llamaProjections
    _ = try model.attachLoRA(LoRAConfig(rank: 8, alpha: 16, targetModules: targets), seed: seed &+ 1)
    randomizeB(model, seed: seed &+ 2)
    _ = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
    return model
}

/// A copy of `model` on `config` (the same weights, one variation switched off): for "the check can fail".
func withConfig(_ model: DecoderModel, _ config: DecoderConfig) -> DecoderModel {
    DecoderModel(config: config, embedding: model.embedding, blocks: model.blocks, finalNorm: model.finalNorm, head: model.head)
}

/// The CPU's loss and LoRA gradients of `model` on `batch`.
func cpuLossAndGradients(_ model: DecoderModel, _ batch: TrainingBatch) throws -> (loss: Double, gradients: LoRAGradients) {
    let gradients = LoRAGradients(model: model)
    let loss = try model.accumulateGradients(batch: batch, into: gradients, normalizer: batch.countedTokens)
    return (loss.mean, gradients)
}

/// One family's GPU check: the variations matter on the CPU, then the GPU trainer (with and without dropout) agrees.
func checkFamilyTrainer(_ name: String, fixture: String, headDim: Int, heads: Int, kvHeads: Int, length: Int,
                        variations: [(String, (inout DecoderConfig) -> Void)]) throws {
    let config = try familyConfigForGPU(fixture, headDim: headDim, heads: heads, kvHeads: kvHeads)
    let model = try familyModelForGPU(config, seed: 500 &+ UInt64(length))
    let examples = randomExamples(count: 2, length: length, vocab: config.vocabularySize, seed: 600 &+ UInt64(length))
    // Two rows, the first with its first tokens not counted (a prompt).
    var rows = examples.map { ($0.tokens, $0.labels) }
    rows[0].1 = rows[0].1.enumerated().map { $0.offset < 4 ? -100 : $0.element }
    let batch = TrainingBatch(examples: rows, length: length, padID: 0)
    let (loss, gradients) = try cpuLossAndGradients(model, batch)
    for (variation, switchOff) in variations {
        var other = config
        switchOff(&other)
        let (otherLoss, otherGradients) = try cpuLossAndGradients(withConfig(model, other), batch)
        let lossMove = abs(otherLoss - loss) / abs(loss), gradientMove = gradientDistance(otherGradients, gradients)
        checkTrue("\(name): \(variation) moves the CPU's loss or gradients", lossMove > 3e-2 || gradientMove > 0.15,
                  "loss by \(fmt(lossMove, 4)) (tolerance 1e-2), gradients by \(fmt(gradientMove, 3)) (tolerance 5e-2)")
    }
    try compareTrainer("\(name) (\(heads)×\(headDim), \(length) tokens)", model: model, batch: batch, dropoutSeed: nil)
    for layer in model.linearLayers { layer.lora?.dropout = 0.1 }
    try compareTrainer("\(name) + dropout 0.1", model: model, batch: batch, dropoutSeed: 91)
    for layer in model.linearLayers { layer.lora?.dropout = 0 }
    // Evaluation: the forward alone gives the training forward's loss.
    let trainer = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount)
    try trainer.forwardLoss(batch: batch)
    let eval = try trainer.lastLoss()
    check("\(name): forward-only loss (GPU \(fmt(eval.mean, 5)), CPU \(fmt(loss, 5)))", abs(eval.mean - loss) / abs(loss), 1e-2)
    // A block's dequantized weights kept for its backward (the default) or dequantized again: the same bits, with
    // this family's sandwich norms (down_proj's base recomputed) or fused projections.
    func run(keep: Bool, keepAttention: Bool = false) throws -> (MemoryRunRecord, CUDATrainerMemoryOptions) {
        var memory = CUDATrainerMemoryOptions.allOnDevice
        memory.keepBlockWeights = keep
        memory.keepAttentionOutputs = keepAttention
        let trainer = try CUDADecoderTrainer(context: ctx, model: model, capacityTokens: batch.tokenCount, memory: memory)
        trainer.deterministic = true
        return (try recordMemoryRun(trainer, batches: [batch, firstRows(batch, 1)], steps: 2, dropout: false), trainer.memory)
    }
    let (kept, keptMemory) = try run(keep: true), (again, againMemory) = try run(keep: false)
    checkTrue("\(name): weights kept per block = dequantized again, bit for bit",
              kept == again && keptMemory.keepBlockWeights && !againMemory.keepBlockWeights,
              "\(kept.differences(from: again)) values differ (\(keptMemory); \(againMemory))")
    // Every block's attention output kept for its recomputation (which then skips the attention forward).
    let (attentionKept, attentionMemory) = try run(keep: true, keepAttention: true)
    checkTrue("\(name): attention outputs kept = recomputed, bit for bit",
              attentionKept == kept && attentionMemory.keepAttentionOutputs,
              "\(attentionKept.differences(from: kept)) values differ (\(attentionMemory))")
}

func runFamilyTrainingChecks() {
    // Each family's variations, and how to switch each off for "the check can fail".
    group("families: qwen3 trainer vs CPU (q/k norms, sliding layers)") {
        try checkFamilyTrainer("qwen3", fixture: "qwen3", headDim: 128, heads: 2, kvHeads: 1, length: 24, variations: [
            ("q/k norms", { $0.qkNorm = false }),
            ("the sliding window", { $0.layerAttention = $0.layerAttention.map { _ in .full } }),
        ])
    }
    group("families: gemma2 trainer vs CPU (head dim 256, soft-capping, sandwich norms, GeGLU)") {
        try checkFamilyTrainer("gemma2", fixture: "gemma2", headDim: 256, heads: 2, kvHeads: 1, length: 20, variations: [
            ("attention soft-capping", { $0.attentionSoftcap = nil }),
            ("final-logit soft-capping", { $0.finalLogitSoftcap = nil }),
            ("(1 + w) norms", { $0.normWeightOffset = 0 }),
            ("GeGLU", { $0.mlpActivation = .silu }),
            ("query_pre_attn_scalar", { $0.queryPreAttentionScalar = nil }),
            ("the sliding window", { $0.layerAttention = $0.layerAttention.map { _ in .full } }),
            ("the embedding scale", { $0.scalesEmbedding = false }),
        ])
    }
    group("families: gemma3_text trainer vs CPU (q/k norms, local RoPE base, sandwich norms)") {
        try checkFamilyTrainer("gemma3_text", fixture: "gemma3_text", headDim: 64, heads: 2, kvHeads: 1, length: 20, variations: [
            ("q/k norms", { $0.qkNorm = false }),
            ("the local RoPE base", { $0.slidingRope = nil }),
            ("the sliding window", { $0.layerAttention = $0.layerAttention.map { _ in .full } }),
        ])
    }
    group("families: gemma3 multimodal (text model under language_model) trainer vs CPU") {
        try checkFamilyTrainer("gemma3", fixture: "gemma3", headDim: 32, heads: 4, kvHeads: 2, length: 18, variations: [])
    }
    group("families: phi3 trainer vs CPU (head dim 96, fused projections, partial rotary)") {
        try checkFamilyTrainer("phi3", fixture: "phi3", headDim: 96, heads: 2, kvHeads: 1, length: 20, variations: [
            ("partial rotary", { $0.rotaryDim = $0.headDim }),
        ])
    }
    group("families: phi3 longrope trainer vs CPU (short and long factors)") {
        // The fixture's original context is 16 positions: 12 tokens rotate with the short factors, 24 with the long.
        try checkFamilyTrainer("phi3 longrope short", fixture: "phi3-longrope", headDim: 32, heads: 2, kvHeads: 1, length: 12, variations: [])
        try checkFamilyTrainer("phi3 longrope long", fixture: "phi3-longrope", headDim: 32, heads: 2, kvHeads: 1, length: 24, variations: [
            ("the long factors", { $0.ropeScaling.longFactors = $0.ropeScaling.shortFactors }),
        ])
    }
    group("families: mistral sliding window trainer vs CPU") {
        try checkFamilyTrainer("mistral", fixture: "mistral", headDim: 32, heads: 2, kvHeads: 1, length: 22, variations: [
            ("the sliding window", { $0.layerAttention = $0.layerAttention.map { _ in .full } }),
        ])
    }
}
