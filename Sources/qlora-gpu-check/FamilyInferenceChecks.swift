// GPU generation of the model families (called from main.swift's "family generation" groups): per family a random
// model of the fixture's config (Tests/Fixtures/families/<name>/base/config.json) with sizes the GPU kernels take
// (head dims 32, 64, 96 and 256 among them), every norm random (Gemma's w of x·(1 + w) near 0, the others near 1, so
// q/k norms and sandwich norms matter), weights large enough that soft-capping changes the logits, LoRA r 8 on every
// projection with non-zero B, the linear weights NF4 on both sides and every other value rounded to the 16-bit type
// the GPU stores. Then:
//   - each variation the family switches on moves the CPU's logits (the CPU model with the variation removed vs the
//     real one) by more than 3x the GPU's own distance from the CPU (prefill logits of the prompt), and by more than
//     1e-2: the GPU computes the variation, not something near the model without it;
//   - prefill and decode logits of CUDAInference vs DecoderModel.forward (compareInference: both decode GEMVs, with
//     and without the graph), 3e-2 relative as InferenceChecks.swift;
//   - greedy answers of 16+ tokens, batch-1 (CUDAInference) and batched (CUDABatchedInference, 3 slots, 4 prompts),
//     equal to the CPU's (a first difference at a near-tie, gap ≤ 5% of the logits' rms, is reported and allowed, as
//     BatchedChecks.swift does); the packed prefill logits of the batched path vs the CPU.
// Prompts are longer than the sliding windows and prompt + answer several windows long (up to 55 positions over
// windows of 5 and 6), so the sliding layers' ring caches (min(window, capacity) rows, checked allocated so on both
// paths) wrap many times, in prefill and in decode. phi3 with longrope: prefill and decode cross
// original_max_position_embeddings (16), where the cache is recomputed with the long factors, batch-1 and batched (the
// scheduler feeds a crossing sequence again from position 0; a step that would continue it is refused, checked too),
// with and without a sliding window.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// The fixture's config of `family` with `overrides` (sizes the GPU takes), read as DecoderConfig reads config.json.
func familyConfig(_ family: String, _ overrides: [String: JSONValue], text: Bool = false) throws -> DecoderConfig {
    let root = fixtureDirectory().replacingSuffix("tiny-llama", with: "families")
    let path = root + "/\(family)/base/config.json"
    guard var fields = try JSONValue.parse(bytes: FileSystem.readFile(path)).object else {
        throw UsageError("\(path) is not a JSON object")
    }
    for (key, value) in overrides { fields[key] = value }
    return try DecoderConfig(json: .object(fields), file: path)
}

/// A random model of `c` as the header describes: linear weights U(±weightScale) (q_proj and k_proj U(±qkWeightScale)
/// when given: large attention logits, for soft-capping), embedding (and untied head) U(±embeddingScale), random norms,
/// LoRA r 8 on every projection with B U(±0.05), all rounded to the GPU's 16-bit type and the linear weights quantized
/// to NF4 on the CPU model (the GPU quantizes the same values).
func randomFamilyModel(_ c: DecoderConfig, seed: UInt64, weightScale: Float, qkWeightScale: Float? = nil,
                       embeddingScale: Float) throws -> (DecoderModel, [String: QuantizedWeight]) {
    var r = SeededGenerator(seed: seed)
    func values(_ n: Int, _ center: Float, _ spread: Float) -> [Float] { (0..<n).map { _ in dt.round(center + r.uniform(-spread, spread)) } }
    func matrix(_ rows: Int, _ columns: Int, _ scale: Float) -> Matrix { Matrix(rows: rows, columns: columns, values: values(rows * columns, 0, scale)) }
    func linear(_ name: String, _ out: Int, _ inFeatures: Int, scale: Float? = nil) -> Linear {
        Linear(name: name, weight: FrozenWeight(dense: matrix(out, inFeatures, scale ?? weightScale)))
    }
    let center: Float = c.normWeightOffset != 0 ? 0 : 1
    func norm(_ n: Int) -> [Float] { values(n, center, 0.4) }
    let h = c.hiddenSize, inter = c.intermediateSize
    let blocks = (0..<c.layerCount).map { l -> DecoderBlock in
        let p = c.layerPrefix(l)
        if c.fusedProjections {
            return DecoderBlock(inputNorm: norm(h), mlpInputNorm: norm(h), qkv: linear(p + "self_attn.qkv_proj", c.qDim + 2 * c.kvDim, h),
                                o: linear(p + "self_attn.o_proj", h, c.qDim), gateUp: linear(p + "mlp.gate_up_proj", 2 * inter, h),
                                down: linear(p + "mlp.down_proj", h, inter))
        }
        return DecoderBlock(inputNorm: norm(h), mlpInputNorm: norm(h), attentionOutputNorm: c.sandwichNorms ? norm(h) : nil,
                            mlpOutputNorm: c.sandwichNorms ? norm(h) : nil, qNorm: c.qkNorm ? norm(c.headDim) : nil,
                            kNorm: c.qkNorm ? norm(c.headDim) : nil,
                            q: linear(p + "self_attn.q_proj", c.qDim, h, scale: qkWeightScale),
                            k: linear(p + "self_attn.k_proj", c.kvDim, h, scale: qkWeightScale),
                            v: linear(p + "self_attn.v_proj", c.kvDim, h), o: linear(p + "self_attn.o_proj", h, c.qDim),
                            gate: linear(p + "mlp.gate_proj", inter, h), up: linear(p + "mlp.up_proj", inter, h),
                            down: linear(p + "mlp.down_proj", h, inter))
    }
    let embedding = matrix(c.vocabularySize, h, embeddingScale)
    let head = c.tieWordEmbeddings ? embedding : matrix(c.vocabularySize, h, embeddingScale)
    let model = DecoderModel(config: c, embedding: embedding, blocks: blocks, finalNorm: norm(h), head: head)
    _ = try model.attachLoRA(LoRAConfig(rank: 8, alpha: 16, targetModules: ["all-linear"]), seed: seed ^ 0xA)
    randomizeB(model, seed: seed ^ 0xB)
    for layer in model.linearLayers {
        guard let lora = layer.lora else { continue }
        for m in [lora.a, lora.b] { for i in 0..<m.count { m.pointer[i] = dt.round(m.pointer[i]) } }
    }
    let quantized = try CUDAInference.quantizeBase(model, replacingCPUWeights: true)
    return (model, quantized)
}

/// The same weights under another config (a variation removed), optionally with other blocks.
func variant(_ model: DecoderModel, _ edit: (inout DecoderConfig) -> Void, blocks: [DecoderBlock]? = nil) -> DecoderModel {
    var c = model.config
    edit(&c)
    return DecoderModel(config: c, embedding: model.embedding, blocks: blocks ?? model.blocks, finalNorm: model.finalNorm, head: model.head)
}

/// The blocks without their q/k norms (`qk`) or without their sandwich norms (`sandwich`).
func blocksWithout(_ model: DecoderModel, qk: Bool = false, sandwich: Bool = false) -> [DecoderBlock] {
    model.blocks.map { b in
        DecoderBlock(inputNorm: b.inputNorm, mlpInputNorm: b.mlpInputNorm,
                     attentionOutputNorm: sandwich ? nil : b.attentionOutputNorm, mlpOutputNorm: sandwich ? nil : b.mlpOutputNorm,
                     qNorm: qk ? nil : b.qNorm, kNorm: qk ? nil : b.kNorm,
                     q: b.q!, k: b.k!, v: b.v!, o: b.o, gate: b.gate!, up: b.up!, down: b.down)
    }
}

/// CPU logits of every position of `tokens` from an empty cache.
func cpuAllLogits(_ model: DecoderModel, _ tokens: [Int]) throws -> [Float] {
    try model.forward(tokens: tokens, cache: KVCache(config: model.config, capacity: tokens.count))
}

/// Checks that each named variant's CPU logits on `prompt` differ from the model's by more than 3x the GPU's distance
/// from the model (prefill logits through CUDAInference, the same NF4 weights) and by more than 1e-2.
func checkVariationsMatter(_ family: String, _ model: DecoderModel, quantized: [String: QuantizedWeight], prompt: [Int],
                           _ variants: [(String, DecoderModel)]) throws {
    let reference = try cpuAllLogits(model, prompt)
    let gpu = try CUDAInference(context: ctx, model: model, capacity: prompt.count, quantized: quantized)
    let distance = relativeError(try gpu.forward(tokens: prompt), reference)
    for (name, other) in variants {
        let e = relativeError(try cpuAllLogits(other, prompt), reference)
        checkTrue("\(family): \(name) matters", e > 3 * distance && e > 1e-2,
                  "the CPU logits move by \(fmt(e)) without it; the GPU is \(fmt(distance)) from the CPU with it")
    }
}

/// Greedy answers vs the CPU's: equal, or first differing at a near-tie (gap ≤ 5% of the logits' rms).
func checkGreedy(_ name: String, model: DecoderModel, prompts: [[Int]], answers: [GenerationResult], maxTokens: Int) throws {
    var identical = 0, nearTies: [String] = [], failures: [String] = []
    for (i, prompt) in prompts.enumerated() {
        let cpu = try Generator.generate(model: model, prompt: prompt, maxTokens: maxTokens, sampling: SamplingOptions(), stopIDs: [])
        let gpu = answers[i]
        if gpu.tokens == cpu.tokens { identical += 1; continue }
        var k = 0
        while k < gpu.tokens.count && k < cpu.tokens.count && gpu.tokens[k] == cpu.tokens[k] { k += 1 }
        guard k < gpu.tokens.count, k < cpu.tokens.count else {
            failures.append("answer \(i + 1): \(gpu.tokens.count) tokens, CPU \(cpu.tokens.count)")
            continue
        }
        let logits = try cpuLastLogits(model, prompt + Array(cpu.tokens[0..<k]))
        let gap = Double(logits[cpu.tokens[k]] - logits[gpu.tokens[k]]), scale = rms(logits)
        let note = "answer \(i + 1) differs at token \(k + 1): gap \(fmt(gap)) (rms \(fmt(scale)))"
        if gap <= 0.05 * scale { nearTies.append(note) } else { failures.append(note) }
    }
    checkTrue("\(name): greedy answers = CPU (\(prompts.count) prompts x \(maxTokens) tokens)", failures.isEmpty,
              "\(identical)/\(prompts.count) identical" + (nearTies.isEmpty ? "" : "; near-ties: " + nearTies.joined(separator: ", "))
                  + (failures.isEmpty ? "" : "; " + failures.joined(separator: ", ")))
}

/// Batch-1 and batched greedy generation, and the batched path's packed prefill logits, vs the CPU.
func checkFamilyGeneration(_ name: String, model: DecoderModel, quantized: [String: QuantizedWeight], prompts: [[Int]],
                           maxTokens: Int, batched: Bool = true) throws {
    let longest = prompts.map(\.count).max()!
    let c = model.config, capacity = longest + maxTokens
    let single = try CUDAInference(context: ctx, model: model, capacity: capacity, quantized: quantized)
    let cacheRows = c.layerAttention.map { $0.cacheRows(capacity: capacity) }
    checkTrue("\(name): batch-1 KV cache rows per layer = min(window, \(capacity))", single.layerRows == cacheRows
                  && single.kvCacheBytes == c.kvCacheBytes(capacity: capacity),
              "rows \(single.layerRows), expected \(cacheRows); \(single.kvCacheBytes) bytes, expected \(c.kvCacheBytes(capacity: capacity))")
    let answers = try prompts.map {
        try Generator.generate(inference: single, prompt: $0, maxTokens: maxTokens, sampling: SamplingOptions(), stopIDs: [])
    }
    try checkGreedy("\(name) batch-1", model: model, prompts: prompts, answers: answers, maxTokens: maxTokens)
    // The same with the tensor-core GEMV (nf4_gemv_mma), where the family's shapes allow it.
    if ctx.nf4GemvMMASupported(cols: 64, blocksize: 64) {
        single.gemvKernel = .mma
        let mma = try prompts.map {
            try Generator.generate(inference: single, prompt: $0, maxTokens: maxTokens, sampling: SamplingOptions(), stopIDs: [])
        }
        try checkGreedy("\(name) batch-1, mma gemv", model: model, prompts: prompts, answers: mma, maxTokens: maxTokens)
    }
    guard batched else { return }
    let weights = try CUDAInference(context: ctx, model: model, capacity: 1, quantized: quantized)
    let vocab = model.config.vocabularySize
    for (path, fusedLimit) in [("fused nf4 gemm", 256), ("dequant + cuBLASLt", 0)] {
        let session = try CUDABatchedInference(weights: weights, slots: prompts.count, capacity: longest + maxTokens, prefillTokens: 128)
        session.fusedRowLimit = fusedLimit
        var rows: [BatchRow] = [], last: [Int] = []
        for (s, p) in prompts.enumerated() {
            for (i, t) in p.enumerated() { rows.append(BatchRow(token: t, slot: s, position: i)) }
            last.append(rows.count - 1)
        }
        let gpu = try session.logits(rows: rows, logitRows: last)
        var worst = 0.0
        for (s, p) in prompts.enumerated() {
            worst = max(worst, relativeError(Array(gpu[(s * vocab)..<((s + 1) * vocab)]), try cpuLastLogits(model, p)))
        }
        check("\(name) batched \(path): packed prefill logits", worst, 3e-2)
        let slots = try CUDABatchedInference(weights: weights, slots: 3, capacity: longest + maxTokens, prefillTokens: 40)
        slots.fusedRowLimit = fusedLimit
        checkTrue("\(name) batched: KV cache rows per layer and slot = min(window, \(capacity))", slots.layerRows == cacheRows
                      && slots.kvCacheBytes == c.kvCacheBytes(capacity: capacity, slots: 3),
                  "rows \(slots.layerRows), expected \(cacheRows); \(slots.kvCacheBytes) bytes, expected \(c.kvCacheBytes(capacity: capacity, slots: 3))")
        let greedy = [SamplingOptions](repeating: SamplingOptions(), count: prompts.count)
        let result = try slots.generate(prompts: prompts, sampling: greedy, maxTokens: maxTokens, stopIDs: [])
        try checkGreedy("\(name) batched \(path), 3 slots", model: model, prompts: prompts, answers: result.answers, maxTokens: maxTokens)
    }
}

func prompts(_ lengths: [Int], vocab: Int, seed: UInt64) -> [[Int]] {
    var r = SeededGenerator(seed: seed)
    return lengths.map { n in (0..<n).map { _ in r.int(vocab) } }
}

func runFamilyInferenceChecks() {
    let lengths = [9, 14, 31, 7]  // longer than the windows (5, 6); with 24 new tokens up to 55 positions
    let newTokens = 24

    group("family generation: qwen3 (q/k norms, sliding window on layer 1)") {
        let c = try familyConfig("qwen3", ["hidden_size": .int(64), "intermediate_size": .int(96), "head_dim": .int(32),
                                           "num_attention_heads": .int(4), "num_key_value_heads": .int(2)])
        let (model, quantized) = try randomFamilyModel(c, seed: seed ^ 0x31, weightScale: 0.08, embeddingScale: 0.5)
        let ps = prompts(lengths, vocab: c.vocabularySize, seed: seed ^ 0x32)
        try checkVariationsMatter("qwen3", model, quantized: quantized, prompt: ps[2], [
            ("q/k norms", variant(model, { $0.qkNorm = false }, blocks: blocksWithout(model, qk: true))),
            ("the sliding window", variant(model, { $0.layerAttention = $0.layerAttention.map { _ in .full } })),
        ])
        try compareInference("qwen3", model: model, prompt: ps[2], decodeSteps: 8, threshold: 3e-2)
        try checkFamilyGeneration("qwen3", model: model, quantized: quantized, prompts: ps, maxTokens: newTokens)
    }

    group("family generation: gemma2 (head dim 256, soft-capping, sandwich norms, GeGLU, window)") {
        let c = try familyConfig("gemma2", ["hidden_size": .int(64), "intermediate_size": .int(96), "head_dim": .int(256),
                                            "num_attention_heads": .int(2), "num_key_value_heads": .int(1)])
        // q and k weights U(±0.25): attention logits of std ~7 before the cap of 2.
        let (model, quantized) = try randomFamilyModel(c, seed: seed ^ 0x41, weightScale: 0.08, qkWeightScale: 0.25, embeddingScale: 0.8)
        let ps = prompts(lengths, vocab: c.vocabularySize, seed: seed ^ 0x42)
        try checkVariationsMatter("gemma2", model, quantized: quantized, prompt: ps[2], [
            ("attention soft-capping", variant(model, { $0.attentionSoftcap = nil })),
            ("final-logit soft-capping", variant(model, { $0.finalLogitSoftcap = nil })),
            ("sandwich norms", variant(model, { $0.sandwichNorms = false }, blocks: blocksWithout(model, sandwich: true))),
            ("(1 + w) norms", variant(model, { $0.normWeightOffset = 0 })),
            ("GeGLU", variant(model, { $0.mlpActivation = .silu })),
            ("the embedding scale", variant(model, { $0.scalesEmbedding = false })),
            ("query_pre_attn_scalar", variant(model, { $0.queryPreAttentionScalar = nil })),
            ("the sliding window", variant(model, { $0.layerAttention = $0.layerAttention.map { _ in .full } })),
        ])
        try compareInference("gemma2", model: model, prompt: ps[2], decodeSteps: 8, threshold: 3e-2)
        try checkFamilyGeneration("gemma2", model: model, quantized: quantized, prompts: ps, maxTokens: newTokens)
    }

    group("family generation: gemma3_text (head dim 96, q/k norms, per-layer-type RoPE, window)") {
        let c = try familyConfig("gemma3_text", ["hidden_size": .int(96), "intermediate_size": .int(128), "head_dim": .int(96),
                                                 "num_attention_heads": .int(2), "num_key_value_heads": .int(1)])
        let (model, quantized) = try randomFamilyModel(c, seed: seed ^ 0x51, weightScale: 0.08, embeddingScale: 0.5)
        let ps = prompts(lengths, vocab: c.vocabularySize, seed: seed ^ 0x52)
        try checkVariationsMatter("gemma3_text", model, quantized: quantized, prompt: ps[2], [
            ("q/k norms", variant(model, { $0.qkNorm = false }, blocks: blocksWithout(model, qk: true))),
            ("the sliding layers' RoPE", variant(model, { $0.slidingRope = nil })),
            ("the sliding window", variant(model, { $0.layerAttention = $0.layerAttention.map { _ in .full } })),
        ])
        try compareInference("gemma3_text", model: model, prompt: ps[2], decodeSteps: 8, threshold: 3e-2)
        try checkFamilyGeneration("gemma3_text", model: model, quantized: quantized, prompts: ps, maxTokens: newTokens)
    }

    group("family generation: phi3 (fused projections, head dim 96, 72 dims rotated)") {
        let c = try familyConfig("phi3", ["hidden_size": .int(192), "intermediate_size": .int(128), "num_attention_heads": .int(2),
                                          "num_key_value_heads": .int(1)])
        let (model, quantized) = try randomFamilyModel(c, seed: seed ^ 0x61, weightScale: 0.06, embeddingScale: 0.5)
        checkTrue("phi3: head dim 96, 72 rotated, fused", c.headDim == 96 && c.rotaryDim == 72 && c.fusedProjections,
                  "head dim \(c.headDim), rotary \(c.rotaryDim)")
        let ps = prompts(lengths, vocab: c.vocabularySize, seed: seed ^ 0x62)
        try checkVariationsMatter("phi3", model, quantized: quantized, prompt: ps[2], [
            ("partial rotary", variant(model, { $0.rotaryDim = $0.headDim })),
        ])
        try compareInference("phi3", model: model, prompt: ps[2], decodeSteps: 8, threshold: 3e-2)
        try checkFamilyGeneration("phi3", model: model, quantized: quantized, prompts: ps, maxTokens: newTokens)
    }

    group("family generation: phi3 longrope (short/long factors, the cache recomputed at 16 positions)") {
        // 2 heads of 64 (48 rotated: 24 factors each).
        let short: [JSONValue] = (0..<24).map { .double(1 + 0.15 * Double($0)) }
        let long: [JSONValue] = (0..<24).map { .double(1 + 0.9 * Double($0)) }
        let rope: JSONValue = .object(JSONObject([("rope_type", .string("longrope")), ("rope_theta", .double(10000)),
                                                  ("partial_rotary_factor", .double(0.75)), ("original_max_position_embeddings", .int(16)),
                                                  ("short_factor", .array(short)), ("long_factor", .array(long))]))
        let c = try familyConfig("phi3-longrope", ["hidden_size": .int(128), "intermediate_size": .int(128), "num_attention_heads": .int(2),
                                                   "num_key_value_heads": .int(1), "rope_parameters": rope])
        let (model, quantized) = try randomFamilyModel(c, seed: seed ^ 0x71, weightScale: 0.08, embeddingScale: 0.5)
        checkTrue("phi3 longrope: factors switch at 16, attention factor", c.ropeScaling.kind == .longrope
                      && c.ropeScaling.originalMaxPositionEmbeddings == 16 && c.ropeScaling.attentionFactor > 1,
                  "attention factor \(fmt(c.ropeScaling.attentionFactor, 4))")
        let ps = prompts([12, 20], vocab: c.vocabularySize, seed: seed ^ 0x72)
        try checkVariationsMatter("phi3 longrope", model, quantized: quantized, prompt: ps[1], [
            ("the long factors (20 positions)", variant(model, { $0.ropeScaling.longFactors = $0.ropeScaling.shortFactors })),
        ])
        // 12 prompt tokens then 8 steps: the step to position 16 recomputes the cache with the long factors.
        try compareInference("phi3 longrope, crossing", model: model, prompt: ps[0], decodeSteps: 8, threshold: 3e-2)
        try compareInference("phi3 longrope, long prompt", model: model, prompt: ps[1], decodeSteps: 4, threshold: 3e-2)
        // Batch-1 and batched: prompts of 3...20 tokens (20: long factors from the start), answers crossing 16.
        let crossing = ps + prompts([3, 9], vocab: c.vocabularySize, seed: seed ^ 0x73)
        try checkFamilyGeneration("phi3 longrope, crossing", model: model, quantized: quantized, prompts: crossing, maxTokens: 16)
        // Within the short range (prompt + answer ≤ 16).
        try checkFamilyGeneration("phi3 longrope, short", model: model, quantized: quantized,
                                  prompts: prompts([3, 7, 5, 6], vocab: c.vocabularySize, seed: seed ^ 0x73), maxTokens: 9)
        // The batched session refuses to continue a sequence past 16 on short-factor keys (the scheduler feeds it again).
        let weights = try CUDAInference(context: ctx, model: model, capacity: 1, quantized: quantized)
        let session = try CUDABatchedInference(weights: weights, slots: 1, capacity: 30)
        let prompt = prompts([15], vocab: c.vocabularySize, seed: seed ^ 0x74)[0]
        try session.step(prompt.enumerated().map { BatchRow(token: $1, slot: 0, position: $0) }, logitRows: [14])
        try session.step([BatchRow(token: 1, slot: 0, position: 15)], logitRows: [0])
        do {
            try session.step([BatchRow(token: 2, slot: 0, position: 16)], logitRows: [0])
            checkTrue("phi3 longrope: a batched step past 16 on short-factor keys is refused", false, "it was accepted")
        } catch {
            checkTrue("phi3 longrope: a batched step past 16 on short-factor keys is refused",
                      "\(error)".contains("original_max_position_embeddings"), "\(error)")
        }
        // With a sliding window of 6 as well: ring caches recomputed at the switch.
        let windowed = try familyConfig("phi3-longrope", ["hidden_size": .int(128), "intermediate_size": .int(128), "num_attention_heads": .int(2),
                                                          "num_key_value_heads": .int(1), "rope_parameters": rope, "sliding_window": .int(6)])
        let (windowModel, windowQuantized) = try randomFamilyModel(windowed, seed: seed ^ 0x75, weightScale: 0.08, embeddingScale: 0.5)
        try checkVariationsMatter("phi3 longrope + window 6", windowModel, quantized: windowQuantized, prompt: ps[1], [
            ("the sliding window", variant(windowModel, { $0.layerAttention = $0.layerAttention.map { _ in .full } })),
        ])
        try compareInference("phi3 longrope + window 6, crossing", model: windowModel, prompt: ps[0], decodeSteps: 8, threshold: 3e-2)
        try checkFamilyGeneration("phi3 longrope + window 6, crossing", model: windowModel, quantized: windowQuantized, prompts: crossing,
                                  maxTokens: 16)
    }

    group("family generation: mistral (window 6, shorter than the prompts)") {
        let c = try familyConfig("mistral", ["hidden_size": .int(64), "intermediate_size": .int(96), "head_dim": .int(32),
                                             "num_attention_heads": .int(4), "num_key_value_heads": .int(2)])
        let (model, quantized) = try randomFamilyModel(c, seed: seed ^ 0x81, weightScale: 0.08, embeddingScale: 0.5)
        let ps = prompts(lengths, vocab: c.vocabularySize, seed: seed ^ 0x82)
        try checkVariationsMatter("mistral", model, quantized: quantized, prompt: ps[2], [
            ("the sliding window", variant(model, { $0.layerAttention = $0.layerAttention.map { _ in .full } })),
        ])
        try compareInference("mistral window 6", model: model, prompt: ps[2], decodeSteps: 8, threshold: 3e-2)
        try checkFamilyGeneration("mistral window 6", model: model, quantized: quantized, prompts: ps, maxTokens: newTokens)
    }
}
