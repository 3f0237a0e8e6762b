import XCTest
@testable import QLoRA

/// Each family's tiny fixture (Tests/Fixtures/families, scripts/make_family_fixtures.py) against transformers 5 + PEFT:
/// logits, loss and every LoRA gradient within 1e-4 relative, the merge equal to PEFT's, greedy generation with the
/// KV cache equal to transformers' tokens (crossing the sliding windows), and every variation shown to matter.
final class DecoderFamilyTests: XCTestCase {
    static let families = ["qwen3", "mistral", "gemma2", "gemma3_text", "gemma3"]

    struct Fixture {
        let directory: String
        let model: DecoderModel
        let expected: SafeTensorsFile
        let rows: [[Int]]
        let batch: TrainingBatch
    }

    static func load(_ family: String, adapter: Bool = true) throws -> Fixture {
        let dir = TestFixtures.path("families/" + family)
        let model = try DecoderModel(config: try DecoderConfig(directory: dir + "/base"), weights: try SafeTensorsCheckpoint(directory: dir + "/base"))
        if adapter { try PEFTAdapter.load(directory: dir + "/adapter", into: model) }
        let expected = try SafeTensorsFile(path: dir + "/expected.safetensors")
        let shape = expected.info("input_ids")!.shape
        let ids = try expected.floats("input_ids").map { Int($0) }
        let labels = try expected.floats("labels").map { Int($0) }
        let rows = (0..<shape[0]).map { Array(ids[($0 * shape[1])..<(($0 + 1) * shape[1])]) }
        let batch = TrainingBatch(examples: rows.indices.map { (rows[$0], Array(labels[($0 * shape[1])..<(($0 + 1) * shape[1])])) },
                                  length: shape[1], padID: 0)
        return Fixture(directory: dir, model: model, expected: expected, rows: rows, batch: batch)
    }

    /// The logits of every row, one forward with a fresh KV cache each.
    static func logits(_ model: DecoderModel, _ rows: [[Int]]) throws -> [Float] {
        var out: [Float] = []
        for row in rows { out += try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count)) }
        return out
    }

    func testEachFamilyReadsItsVariations() throws {
        let qwen3 = try Self.load("qwen3", adapter: false).model.config
        XCTAssertTrue(qwen3.qkNorm)
        XCTAssertEqual(qwen3.layerAttention, [.full, .sliding(window: 6)])
        XCTAssertEqual(try Self.load("mistral", adapter: false).model.config.layerAttention, [.sliding(window: 6), .sliding(window: 6)])
        let gemma2 = try Self.load("gemma2", adapter: false).model.config
        XCTAssertEqual(gemma2.layerAttention, [.sliding(window: 5), .full])
        XCTAssertEqual(gemma2.attentionSoftcap, 2)
        XCTAssertEqual(gemma2.finalLogitSoftcap, 3)
        XCTAssertTrue(gemma2.tieWordEmbeddings)
        for family in ["gemma3_text", "gemma3"] {
            let c = try Self.load(family, adapter: false).model.config
            XCTAssertEqual(c.layerAttention, [.sliding(window: 5), .full, .sliding(window: 5)], family)
            XCTAssertEqual(c.slidingRope?.theta, 10, family)
            XCTAssertEqual(c.ropeScaling, RopeScaling(kind: .linear, factor: 4), family)
            XCTAssertTrue(c.qkNorm && c.sandwichNorms, family)
        }
        XCTAssertEqual(try Self.load("gemma3", adapter: false).model.linearLayers[0].name, "model.language_model.layers.0.self_attn.q_proj")
    }

    func testBaseLogitsMatchTransformers() throws {
        for family in Self.families {
            let f = try Self.load(family, adapter: false)
            let error = relativeError(try Self.logits(f.model, f.rows), try f.expected.floats("logits_base"))
            XCTAssertLessThan(error, 1e-4, "\(family): relative error \(error)")
        }
    }

    /// With the PEFT adapter: logits, the loss over the labels and every lora_A / lora_B gradient (with and
    /// without gradient checkpointing).
    func testLogitsLossAndEveryLoRAGradientMatchPEFT() throws {
        for family in Self.families {
            let f = try Self.load(family)
            let logitsError = relativeError(try Self.logits(f.model, f.rows), try f.expected.floats("logits_lora"))
            XCTAssertLessThan(logitsError, 1e-4, "\(family) logits: relative error \(logitsError)")
            let reference = Double(try f.expected.floats("loss_lora")[0])
            XCTAssertEqual(try f.model.loss(batch: f.batch).mean, reference, accuracy: 1e-4 * reference, family)
            for checkpointing in [true, false] {
                let gradients = LoRAGradients(model: f.model)
                let loss = try f.model.accumulateGradients(batch: f.batch, into: gradients, normalizer: f.batch.countedTokens,
                                                           options: TrainingStepOptions(gradientCheckpointing: checkpointing))
                XCTAssertEqual(loss.mean, reference, accuracy: 1e-4 * reference, family)
                var worst = 0.0
                for (name, gradient) in gradients.named {
                    let error = relativeError(gradient.values, try f.expected.floats("grad." + name))
                    worst = max(worst, error)
                    XCTAssertLessThan(error, 1e-4, "\(family) \(name): relative error \(error)")
                }
                XCTAssertEqual(gradients.named.count, f.expected.names.filter { $0.hasPrefix("grad.") }.count, family)
                XCTAssertEqual(gradients.named.count, 14 * f.model.blocks.count, family)
                if checkpointing { print("\(family): logits \(logitsError), loss \(loss.mean) vs \(reference), worst gradient \(worst)") }
            }
        }
    }

    /// Greedy decoding with the KV cache gives transformers' tokens, and each step's logits equal the one-shot forward's
    /// (the cached sliding-window layers see only the window).
    func testGreedyGenerationWithTheKVCacheMatchesTransformers() throws {
        for family in Self.families {
            let f = try Self.load(family)
            let prompt = try f.expected.floats("prompt").map { Int($0) }
            let reference = try f.expected.floats("generated").map { Int($0) }
            let vocab = f.model.config.vocabularySize
            let cache = KVCache(config: f.model.config, capacity: prompt.count + reference.count)
            var last = Array(try f.model.forward(tokens: prompt, cache: cache).suffix(vocab))
            var tokens = prompt
            for _ in reference {
                let next = last.indices.max { last[$0] < last[$1] }!
                tokens.append(next)
                let full = try f.model.forward(tokens: tokens, cache: KVCache(config: f.model.config, capacity: tokens.count))
                last = try f.model.forward(tokens: [next], cache: cache, lastOnly: true)
                XCTAssertLessThan(relativeError(last, Array(full.suffix(vocab))), 1e-5, "\(family) at \(tokens.count)")
            }
            XCTAssertEqual(Array(tokens.dropFirst(prompt.count)), reference, family)
            XCTAssertGreaterThan(tokens.count, f.model.config.slidingWindow ?? 0, family)
        }
    }

    func testMergeEqualsPEFTMergeAndUnload() throws {
        for family in Self.families {
            let f = try Self.load(family)
            let out = try TestFixtures.temporaryDirectory()
            let report = try AdapterMerge.write(model: f.model, baseDirectory: f.directory + "/base", fromQuantizedBase: false, to: out)
            XCTAssertEqual(report.mergedLayers, 7 * f.model.blocks.count, family)
            let ours = try SafeTensorsFile(path: out + "/model.safetensors")
            let reference = try SafeTensorsFile(path: f.directory + "/merged-bf16/model.safetensors")
            XCTAssertEqual(ours.names.sorted(), reference.names.sorted(), family)
            var identical = 0, total = 0
            for t in reference.tensors {
                XCTAssertEqual(ours.info(t.name)?.dtype, t.dtype, t.name)
                XCTAssertEqual(ours.info(t.name)?.shape, t.shape, t.name)
                guard ours.info(t.name) != nil else { continue }
                let a = try ours.floats(t.name), b = try reference.floats(t.name)
                for i in a.indices {
                    total += 1
                    if a[i] == b[i] { identical += 1; continue }
                    XCTAssertLessThanOrEqual(abs(a[i] - b[i]), abs(b[i]) * Float(1.0 / 128), "\(family) \(t.name)[\(i)]")
                }
            }
            XCTAssertGreaterThan(Double(identical) / Double(max(total, 1)), 0.99, "\(family): \(identical) of \(total) identical")
            // The merged folder loads as a plain model of the family.
            let merged = try DecoderModel(config: try DecoderConfig(directory: out), weights: try SafeTensorsCheckpoint(directory: out))
            XCTAssertEqual(merged.config.modelType, f.model.config.modelType)
        }
    }

    /// The adapter saves under PEFT's keys for the family's module paths and reloads to the same adapter.
    func testSavedAdapterKeepsPEFTKeys() throws {
        for family in Self.families {
            let f = try Self.load(family)
            let config = try PEFTAdapter.load(directory: f.directory + "/adapter", into: f.model)
            let dir = try TestFixtures.temporaryDirectory()
            try PEFTAdapter.save(model: f.model, config: config, to: dir)
            let saved = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
            let reference = try SafeTensorsFile(path: f.directory + "/adapter/adapter_model.safetensors")
            XCTAssertEqual(saved.names.sorted(), reference.names.sorted(), family)
        }
        // all-linear on a multimodal checkpoint is saved as the text model's modules: PEFT would otherwise resolve it over
        // the vision tower too.
        let f = try Self.load("gemma3")
        var all = try PEFTAdapter.load(directory: f.directory + "/adapter", into: f.model)
        all.targetModules = ["all-linear"]
        let dir = try TestFixtures.temporaryDirectory()
        try PEFTAdapter.save(model: f.model, config: all, to: dir)
        let targets = try JSONValue.parse(bytes: FileSystem.readFile(dir + "/adapter_config.json"))["target_modules"]?.array?.compactMap(\.string)
        XCTAssertEqual(targets?.count, 21)
        XCTAssertTrue(targets?.allSatisfy { $0.hasPrefix("model.language_model.layers.") } == true, "\(targets ?? [])")
        XCTAssertNoThrow(try PEFTAdapter.load(directory: dir, into: try Self.load("gemma3", adapter: false).model))
    }

    // MARK: - Every variation matters

    /// A copy of `model` with one variation switched off (the config's switch, and the block's weights it reads).
    static func without(_ variation: String, _ model: DecoderModel) -> DecoderModel {
        var c = model.config
        var blocks = model.blocks
        func rebuild(qk: Bool, sandwich: Bool) {
            blocks = blocks.map { b in
                DecoderBlock(inputNorm: b.inputNorm, mlpInputNorm: b.mlpInputNorm,
                             attentionOutputNorm: sandwich ? b.attentionOutputNorm : nil, mlpOutputNorm: sandwich ? b.mlpOutputNorm : nil,
                             qNorm: qk ? b.qNorm : nil, kNorm: qk ? b.kNorm : nil,
                             attentionInput: b.attentionInput, o: b.o, mlpInput: b.mlpInput, down: b.down)
            }
        }
        switch variation {
        case "sliding window": c.layerAttention = c.layerAttention.map { _ in .full }
        case "q/k norm": c.qkNorm = false; rebuild(qk: false, sandwich: true)
        case "(1 + w) norms": c.normWeightOffset = 0
        case "sandwich norms": c.sandwichNorms = false; rebuild(qk: true, sandwich: false)
        case "GeGLU": c.mlpActivation = .silu
        case "embedding scale": c.scalesEmbedding = false
        case "query_pre_attn_scalar": c.queryPreAttentionScalar = nil
        case "attention soft-cap": c.attentionSoftcap = nil
        case "final soft-cap": c.finalLogitSoftcap = nil
        case "sliding-layer RoPE": c.slidingRope = nil
        default: fatalError(variation)
        }
        return DecoderModel(config: c, embedding: model.embedding, blocks: blocks, finalNorm: model.finalNorm, head: model.head)
    }

    static let variations: [String: [String]] = [
        "qwen3": ["sliding window", "q/k norm"],
        "mistral": ["sliding window"],
        "gemma2": ["sliding window", "(1 + w) norms", "sandwich norms", "GeGLU", "embedding scale", "query_pre_attn_scalar",
                   "attention soft-cap", "final soft-cap"],
        "gemma3_text": ["sliding window", "q/k norm", "(1 + w) norms", "sandwich norms", "GeGLU", "embedding scale",
                        "query_pre_attn_scalar", "sliding-layer RoPE"],
        "gemma3": ["sliding window", "q/k norm", "(1 + w) norms", "sandwich norms", "GeGLU", "embedding scale",
                   "query_pre_attn_scalar", "sliding-layer RoPE"],
    ]

    /// Leaving any variation out breaks the fixture's check by far more than its tolerance: the logits, the loss and the
    /// gradients each move by more than 1e-3 relative (the checks above allow 1e-4).
    func testLeavingOutAnyVariationFailsTheFixture() throws {
        for family in Self.families {
            let f = try Self.load(family)
            let referenceLogits = try f.expected.floats("logits_lora")
            let referenceLoss = Double(try f.expected.floats("loss_lora")[0])
            for variation in Self.variations[family]! {
                let model = Self.without(variation, f.model)
                let logitsError = relativeError(try Self.logits(model, f.rows), referenceLogits)
                let gradients = LoRAGradients(model: model)
                let loss = try model.accumulateGradients(batch: f.batch, into: gradients, normalizer: f.batch.countedTokens).mean
                var worst = 0.0
                for (name, gradient) in gradients.named { worst = max(worst, relativeError(gradient.values, try f.expected.floats("grad." + name))) }
                let lossError = abs(loss - referenceLoss) / referenceLoss
                print("\(family) without \(variation): logits \(logitsError), loss \(lossError), worst gradient \(worst)")
                XCTAssertGreaterThan(logitsError, 1e-3, "\(family) without \(variation)")
                XCTAssertGreaterThan(lossError, 1e-4, "\(family) without \(variation)")
                XCTAssertGreaterThan(worst, 1e-3, "\(family) without \(variation)")
            }
        }
    }
}
