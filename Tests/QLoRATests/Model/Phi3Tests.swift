import XCTest
@testable import QLoRA

/// The Phi-3 family against transformers 5 + PEFT (Tests/Fixtures/families, scripts/make_phi3_fixture.py): fused
/// qkv_proj / gate_up_proj, partial rotary (18 of 24 dims), longrope with its short and long factors, and a PEFT
/// adapter on the four fused and unfused modules.
final class Phi3Tests: XCTestCase {
    /// The two fixtures and their sets of rows (the longrope sets select the short and the long factors).
    static let cases: [(fixture: String, sets: [String])] = [("phi3", ["main"]), ("phi3-longrope", ["short", "long"])]

    static func directory(_ fixture: String) -> String { TestFixtures.path("families/" + fixture) }

    static func load(_ fixture: String, adapter: Bool = true, base: String? = nil) throws -> DecoderModel {
        let dir = base ?? directory(fixture) + "/base"
        let model = try DecoderModel(config: try DecoderConfig(directory: dir), weights: try SafeTensorsCheckpoint(directory: dir))
        if adapter { try PEFTAdapter.load(directory: directory(fixture) + "/adapter", into: model) }
        return model
    }

    static func expected(_ fixture: String) throws -> SafeTensorsFile {
        try SafeTensorsFile(path: directory(fixture) + "/expected.safetensors")
    }

    /// The rows of `set` and their labels.
    static func rows(_ fixture: String, _ set: String) throws -> (ids: [[Int]], labels: [[Int]]) {
        let file = try expected(fixture)
        let shape = file.info(set + ".input_ids")!.shape
        let ids = try file.floats(set + ".input_ids").map { Int($0) }, labels = try file.floats(set + ".labels").map { Int($0) }
        let split = { (v: [Int]) in (0..<shape[0]).map { Array(v[($0 * shape[1])..<(($0 + 1) * shape[1])]) } }
        return (split(ids), split(labels))
    }

    static func batch(_ fixture: String, _ set: String) throws -> TrainingBatch {
        let (ids, labels) = try rows(fixture, set)
        return TrainingBatch(examples: Array(zip(ids, labels)), length: ids[0].count, padID: 0)
    }

    /// Logits of every row, one forward per row through a fresh cache.
    static func logits(_ model: DecoderModel, _ rows: [[Int]]) throws -> [Float] {
        try rows.flatMap { try model.forward(tokens: $0, cache: KVCache(config: model.config, capacity: $0.count)) }
    }

    /// A copy of a fixture's base folder with config.json edited (the weights are the same file).
    static func editedBase(_ fixture: String, name: String = #function, _ edit: (inout JSONObject) -> Void) throws -> String {
        let source = directory(fixture) + "/base"
        let dir = try TestFixtures.temporaryDirectory(name + fixture)
        var json = try XCTUnwrap(try JSONValue.parse(bytes: FileSystem.readFile(source + "/config.json")).object)
        edit(&json)
        try FileSystem.writeAtomically(dir + "/config.json", text: JSONValue.object(json).serialized(.init(indent: 2)))
        try FileSystem.writeAtomically(dir + "/model.safetensors", bytes: try FileSystem.readFile(source + "/model.safetensors"))
        return dir
    }

    // MARK: - Config

    func testConfigsReadAsTransformersReadsThem() throws {
        let c = try DecoderConfig(directory: Self.directory("phi3") + "/base")
        XCTAssertEqual(c.modelType, "phi3")
        XCTAssertTrue(c.fusedProjections)
        XCTAssertEqual(c.headDim, 24)
        XCTAssertEqual(c.rotaryDim, 18, "int(24 × 0.75)")
        XCTAssertEqual(c.ropeScaling.kind, .default)
        XCTAssertNil(c.slidingWindow)
        XCTAssertEqual(c.ropeInverseFrequencies().count, 9)
        XCTAssertEqual(c.ropeInverseFrequencies()[1], 1 / pow(10000, 2.0 / 18), accuracy: 1e-12)

        let l = try DecoderConfig(directory: Self.directory("phi3-longrope") + "/base")
        XCTAssertEqual(l.ropeScaling.kind, .longrope)
        XCTAssertEqual(l.ropeScaling.originalMaxPositionEmbeddings, 16)
        XCTAssertEqual(l.ropeScaling.factor, 4, "max_position_embeddings / original_max_position_embeddings")
        // transformers: sqrt(1 + ln(factor) / ln(original_max_position_embeddings)), 1.224744871391589 for 64 / 16.
        XCTAssertEqual(l.ropeScaling.attentionFactor, 1.224744871391589, accuracy: 1e-15)
        XCTAssertEqual(l.ropeScaling.shortFactors.count, 9)
        XCTAssertEqual(l.ropeInverseFrequencies(long: true)[8], 1 / (16 * pow(10000, 16.0 / 18)), accuracy: 1e-15)
        XCTAssertFalse(l.usesLongRopeFactors(sequenceLength: 16))
        XCTAssertTrue(l.usesLongRopeFactors(sequenceLength: 17))
        XCTAssertTrue(l.tieWordEmbeddings)
    }

    func testBadPhi3FieldsAreErrorsNamingThem() throws {
        func config(_ edit: (inout JSONObject) -> Void) throws -> DecoderConfig {
            var json = try XCTUnwrap(try JSONValue.parse(bytes: FileSystem.readFile(Self.directory("phi3-longrope") + "/base/config.json")).object)
            edit(&json)
            return try DecoderConfig(json: .object(json), file: "phi/config.json")
        }
        func rope(_ key: String, _ value: JSONValue) -> (inout JSONObject) -> Void {
            { json in
                var r = json["rope_parameters"]!.object!
                r[key] = value
                json["rope_parameters"] = .object(r)
            }
        }
        func assertRejected(_ edit: @escaping (inout JSONObject) -> Void, _ parts: String..., line: UInt = #line) {
            XCTAssertThrowsError(try config(edit), line: line) { error in
                for part in parts { XCTAssertTrue("\(error)".contains(part), "\(error) lacks \(part)", line: line) }
            }
        }
        assertRejected(rope("short_factor", .array([.double(1), .double(2)])), "'rope_parameters.short_factor'", "list of 9 numbers")
        assertRejected(rope("long_factor", .null), "'rope_parameters.long_factor'", "missing")
        assertRejected(rope("long_factor", .array(Array(repeating: .double(-1), count: 9))), "'rope_parameters.long_factor'", "> 0")
        assertRejected(rope("attention_factor", .double(0)), "'rope_parameters.attention_factor'")
        assertRejected(rope("rope_type", .string("llama3")), "rope_type 'llama3' is not supported for phi3", "default, longrope")
        assertRejected(rope("partial_rotary_factor", .double(0.72)), "'rope_parameters.partial_rotary_factor'", "gives 17 rotated", "even")
        assertRejected({ $0["resid_pdrop"] = .double(1.5) }, "'resid_pdrop'")
        // Early Phi-3 checkpoints name longrope "su"; a given attention_factor wins over the computed one.
        var c = try config(rope("rope_type", .string("su")))
        XCTAssertEqual(c.ropeScaling.kind, .longrope)
        c = try config(rope("attention_factor", .double(1.5)))
        XCTAssertEqual(c.ropeScaling.attentionFactor, 1.5)
        // The top-level original_max_position_embeddings overrides the rope object's, as Phi3Config does.
        c = try config(rope("original_max_position_embeddings", .int(8)))
        XCTAssertEqual(c.ropeScaling.originalMaxPositionEmbeddings, 16)
        // Partial rotary stays a phi3 variation: a llama config asking for it is refused.
        XCTAssertThrowsError(try config { $0["model_type"] = .string("llama"); $0["rope_parameters"] = .null }) {
            XCTAssertTrue("\($0)".contains("partial rotary embeddings are implemented for phi3 only"), "\($0)")
        }
    }

    // MARK: - Forward, loss and gradients against transformers + PEFT

    func testLogitsMatchTransformersWithAndWithoutTheAdapter() throws {
        for (fixture, sets) in Self.cases {
            let base = try Self.load(fixture, adapter: false), adapted = try Self.load(fixture)
            XCTAssertEqual(adapted.linearLayers.filter { $0.lora != nil }.count, 8)
            for set in sets {
                let ids = try Self.rows(fixture, set).ids
                let expected = try Self.expected(fixture)
                let e1 = relativeError(try Self.logits(base, ids), try expected.floats(set + ".logits_base"))
                let e2 = relativeError(try Self.logits(adapted, ids), try expected.floats(set + ".logits_lora"))
                XCTAssertLessThan(e1, 1e-5, "\(fixture) \(set) base: relative error \(e1)")
                XCTAssertLessThan(e2, 1e-5, "\(fixture) \(set) with adapter: relative error \(e2)")
                print("\(fixture) \(set): logits relative error \(e1) (base), \(e2) (adapter)")
            }
        }
    }

    func testLossAndEveryLoRAGradientMatchPEFT() throws {
        for (fixture, sets) in Self.cases {
            for set in sets {
                for checkpointing in [true, false] {
                    let model = try Self.load(fixture)
                    let batch = try Self.batch(fixture, set)
                    let expected = try Self.expected(fixture)
                    let gradients = LoRAGradients(model: model)
                    let loss = try model.accumulateGradients(batch: batch, into: gradients, normalizer: batch.countedTokens,
                                                             options: TrainingStepOptions(gradientCheckpointing: checkpointing))
                    let reference = Double(try expected.floats(set + ".loss")[0])
                    XCTAssertEqual(loss.mean, reference, accuracy: 1e-5 * reference, "\(fixture) \(set)")
                    XCTAssertEqual(try model.loss(batch: batch).mean, reference, accuracy: 1e-5 * reference, "\(fixture) \(set) eval")
                    var checked = 0, worst = 0.0
                    for (name, gradient) in gradients.named {
                        let error = relativeError(gradient.values, try expected.floats(set + ".grad." + name))
                        XCTAssertLessThan(error, 1e-4, "\(fixture) \(set) \(name): relative error \(error)")
                        checked += 1
                        worst = max(worst, error)
                    }
                    print("\(fixture) \(set) checkpointing \(checkpointing): loss \(loss.mean) vs \(reference), worst LoRA gradient relative error \(worst)")
                    XCTAssertEqual(checked, 16, "2 layers × qkv_proj, o_proj, gate_up_proj, down_proj × A, B")
                }
            }
        }
    }

    // MARK: - Generation through the KV cache

    func testGreedyGenerationThroughTheCacheEqualsTransformers() throws {
        for (fixture, _) in Self.cases {
            let model = try Self.load(fixture)
            let expected = try Self.expected(fixture)
            let prompt = try expected.floats("greedy.prompt").map { Int($0) }
            let reference = try expected.floats("greedy.tokens").map { Int($0) }
            let result = try Generator.generate(model: model, prompt: prompt, maxTokens: reference.count, sampling: SamplingOptions(),
                                                stopIDs: [])
            XCTAssertEqual(result.tokens, reference, fixture)
        }
    }

    /// Decoding one token at a time past original_max_position_embeddings gives the one-shot logits: the cache is
    /// recomputed with the long factors when the sequence first passes 16 tokens, as transformers' generation does.
    func testLongropeCacheIsRecomputedWhenTheSequencePassesTheOriginalLength() throws {
        let model = try Self.load("phi3-longrope")
        let row = try Self.rows("phi3-longrope", "long").ids[0]
        let vocab = model.config.vocabularySize
        let full = try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count))
        let cache = KVCache(config: model.config, capacity: row.count)
        var stepped = try model.forward(tokens: Array(row.prefix(10)), cache: cache)
        for id in row.dropFirst(10) {
            let last = try model.forward(tokens: [id], cache: cache, lastOnly: true)
            XCTAssertEqual(cache.usesLongRopeFactors, cache.length > 16)
            stepped += last
        }
        // Rows up to 16 positions saw the short factors in their own forward; from 17 on, the long ones.
        let fromLong = Array(full.suffix((row.count - 16) * vocab)), steppedLong = Array(stepped.suffix((row.count - 16) * vocab))
        XCTAssertLessThan(relativeError(steppedLong, fromLong), 1e-5)
        // A prompt longer than 16 prefills with the long factors; several new tokens at once past 16 recompute too.
        let again = KVCache(config: model.config, capacity: row.count)
        _ = try model.forward(tokens: Array(row.prefix(12)), cache: again)
        let tail = try model.forward(tokens: Array(row.dropFirst(12)), cache: again)
        XCTAssertLessThan(relativeError(tail, Array(full.suffix(12 * vocab))), 1e-5)
    }

    // MARK: - Adapter files and merge

    func testAdapterRoundTripsWithPEFTKeysAndFusedShapes() throws {
        let model = try Self.load("phi3")
        let config = try PEFTAdapter.load(directory: Self.directory("phi3") + "/adapter", into: model)
        XCTAssertEqual(config.targetModules, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"])
        let dir = try TestFixtures.temporaryDirectory()
        try PEFTAdapter.save(model: model, config: config, to: dir)
        let saved = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        let reference = try SafeTensorsFile(path: Self.directory("phi3") + "/adapter/adapter_model.safetensors")
        XCTAssertEqual(saved.names.sorted(), reference.names.sorted())
        // B of the fused modules has the fused output rows: q + 2·kv = 72 + 2·24, and 2 × intermediate 64.
        XCTAssertEqual(saved.info("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight")?.shape, [120, 8])
        XCTAssertEqual(saved.info("base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight")?.shape, [128, 8])
        for t in reference.tensors { XCTAssertEqual(try saved.floats(t.name), try reference.floats(t.name), t.name) }
    }

    func testMergeEqualsPEFTsMergeAndUnload() throws {
        for (fixture, sets) in Self.cases {
            let model = try Self.load(fixture)
            let out = try TestFixtures.temporaryDirectory(#function + fixture)
            let report = try AdapterMerge.write(model: model, baseDirectory: Self.directory(fixture) + "/base", fromQuantizedBase: false, to: out)
            XCTAssertEqual(report.mergedLayers, 8)
            let ours = try SafeTensorsFile(path: out + "/model.safetensors")
            let reference = try SafeTensorsFile(path: Self.directory(fixture) + "/merged.safetensors")
            XCTAssertEqual(reference.names.count, 8)
            var identical = 0, total = 0
            for t in reference.tensors {
                XCTAssertEqual(ours.info(t.name)?.shape, t.shape, t.name)
                let a = try ours.floats(t.name), b = try reference.floats(t.name)
                for i in a.indices {
                    total += 1
                    if a[i] == b[i] { identical += 1; continue }
                    // At most one bf16 step apart (the rounding of the same fp32 sum).
                    XCTAssertLessThanOrEqual(abs(a[i] - b[i]), abs(b[i]) * Float(1.0 / 128), "\(fixture) \(t.name)[\(i)]")
                }
            }
            XCTAssertGreaterThan(Double(identical) / Double(total), 0.99, "\(fixture): \(identical) of \(total) identical")
            // The merged folder is a plain phi3 model that gives the adapter's logits (within bf16 rounding).
            let merged = try Self.load(fixture, adapter: false, base: out)
            for set in sets {
                let e = relativeError(try Self.logits(merged, try Self.rows(fixture, set).ids), try Self.expected(fixture).floats(set + ".logits_lora"))
                XCTAssertLessThan(e, 1e-2, "\(fixture) \(set)")
            }
        }
    }

    // MARK: - Each variation matters on the fixtures

    /// Computing the fixtures without a variation (as a Llama block would) misses transformers' numbers by far more than
    /// the tolerance: the fixtures check every variation.
    func testEachVariationLeftOutMissesTheReference() throws {
        func error(_ fixture: String, _ set: String, _ edit: (inout JSONObject) -> Void, name: String = #function) throws -> Double {
            let model = try Self.load(fixture, base: try Self.editedBase(fixture, name: name + set, edit))
            return relativeError(try Self.logits(model, try Self.rows(fixture, set).ids), try Self.expected(fixture).floats(set + ".logits_lora"))
        }
        func rope(_ key: String, _ value: JSONValue) -> (inout JSONObject) -> Void {
            { json in
                var r = json["rope_parameters"]!.object!
                r[key] = value
                json["rope_parameters"] = .object(r)
            }
        }
        // Full rotary in place of partial rotary.
        let full: (inout JSONObject) -> Void = { json in
            json["partial_rotary_factor"] = .double(1)
            var r = json["rope_parameters"]!.object!
            r["partial_rotary_factor"] = nil
            r["short_factor"] = .array(Array(repeating: .double(1), count: 12))
            r["long_factor"] = .array(Array(repeating: .double(1), count: 12))
            json["rope_parameters"] = .object(r)
        }
        XCTAssertGreaterThan(try error("phi3", "main", full), 1e-3)
        let long = try DecoderConfig(directory: Self.directory("phi3-longrope") + "/base").ropeScaling.longFactors.map { JSONValue.double($0) }
        let short = try DecoderConfig(directory: Self.directory("phi3-longrope") + "/base").ropeScaling.shortFactors.map { JSONValue.double($0) }
        // No longrope at all; the short factors where the long ones apply, and the reverse; no attention factor.
        for set in ["short", "long"] {
            XCTAssertGreaterThan(try error("phi3-longrope", set, rope("rope_type", .string("default"))), 1e-3, set)
            XCTAssertGreaterThan(try error("phi3-longrope", set, rope("attention_factor", .double(1))), 1e-3, set)
        }
        XCTAssertGreaterThan(try error("phi3-longrope", "long", rope("long_factor", .array(short))), 1e-3)
        XCTAssertGreaterThan(try error("phi3-longrope", "short", rope("short_factor", .array(long))), 1e-3)
        // The switch point: with original_max_position_embeddings 24 the long rows would use the short factors.
        XCTAssertGreaterThan(try error("phi3-longrope", "long", { $0["original_max_position_embeddings"] = .int(24) }), 1e-3)
    }

    // MARK: - What the other paths do with phi3

    func testTrainingDefaultsTargetTheFusedModulesAndOtherNamesAreRefused() throws {
        let model = try Self.load("phi3", adapter: false)
        let resolved = TrainingConfiguration().loraConfig.resolvingDefaultTargets(for: model)
        XCTAssertEqual(resolved.targetModules, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"])
        XCTAssertEqual(try model.attachLoRA(resolved, seed: 1), 8)
        XCTAssertEqual(try Self.load("phi3", adapter: false).attachLoRA(LoRAConfig(rank: 4, alpha: 8, targetModules: ["all-linear"]), seed: 1), 8)
        XCTAssertThrowsError(try Self.load("phi3", adapter: false).attachLoRA(LoRAConfig(rank: 4, alpha: 8, targetModules: ["q_proj"]), seed: 1)) {
            XCTAssertTrue("\($0)".contains("'q_proj' names no linear layer"), "\($0)")
            XCTAssertTrue("\($0)".contains("qkv_proj, o_proj, gate_up_proj, down_proj"), "\($0)")
        }
        // A Llama model keeps the seven.
        XCTAssertEqual(TrainingConfiguration().loraConfig.resolvingDefaultTargets(for: try LlamaForwardTests.loadTinyLlama()).targetModules,
                       LoRAConfig.llamaProjections.sorted())
    }

    func testResidualDropoutIsRefusedForTrainingOnly() throws {
        let dir = try Self.editedBase("phi3") { $0["resid_pdrop"] = .double(0.1) }
        let model = try Self.load("phi3", base: dir)
        let batch = try Self.batch("phi3", "main")
        XCTAssertLessThan(relativeError(try Self.logits(model, try Self.rows("phi3", "main").ids), try Self.expected("phi3").floats("main.logits_lora")), 1e-5)
        XCTAssertThrowsError(try model.accumulateGradients(batch: batch, into: LoRAGradients(model: model), normalizer: 1)) {
            XCTAssertTrue("\($0)".contains("'resid_pdrop' is 0.1"), "\($0)")
        }
    }

    /// The GPU computes Phi-3's variations; its kernels are built for head dimensions 32 … 256, not the fixture's 24.
    func testCUDARefusesOnlyHeadDimensionsItHasNoKernelsFor() throws {
        XCTAssertNoThrow(try LlamaForwardTests.loadTinyLlama().config.checkCUDASupport(what: "training"))
        XCTAssertNoThrow(try Architecture.phi4_mini.config.checkCUDASupport(what: "bench"))
        XCTAssertThrowsError(try DecoderConfig(directory: Self.directory("phi3-longrope") + "/base").checkCUDASupport(what: "training")) {
            for part in ["head dimensions 32, 64, 96, 128, 256, not 24", "(phi3, training)", "--device cpu"] {
                XCTAssertTrue("\($0)".contains(part), "\($0) lacks \(part)")
            }
        }
    }

    /// The 4-bit base quantizes the fused linears like any other.
    func testQuantizedBaseKeepsTheFusedLinearsIn4Bit() throws {
        let loaded = try ModelLoader.load(Self.directory("phi3") + "/base", quantization: .nf4)
        XCTAssertTrue(loaded.model.linearLayers.allSatisfy { $0.weight.isQuantized })
        try PEFTAdapter.load(directory: Self.directory("phi3") + "/adapter", into: loaded.model)
        let e = relativeError(try Self.logits(loaded.model, try Self.rows("phi3", "main").ids), try Self.expected("phi3").floats("main.logits_lora"))
        XCTAssertLessThan(e, 0.5, "4-bit rounding of a tiny model's N(0, 0.08) weights")
    }

    /// sliding_window slides every phi3 layer (transformers' Phi3Model masks with it whenever it is set): the `window`
    /// set was made with sliding_window 10 on rows of 24 tokens. Logits, loss, every LoRA gradient and cached decoding.
    func testSlidingWindowMatchesTransformers() throws {
        let dir = try Self.editedBase("phi3") { $0["sliding_window"] = .int(10) }
        let expected = try Self.expected("phi3")
        let ids = try Self.rows("phi3", "window").ids
        let base = try Self.load("phi3", adapter: false, base: dir), adapted = try Self.load("phi3", base: dir)
        XCTAssertEqual(adapted.config.slidingWindow, 10)
        XCTAssertEqual(adapted.config.layerAttention, [.sliding(window: 10), .sliding(window: 10)])
        let e1 = relativeError(try Self.logits(base, ids), try expected.floats("window.logits_base"))
        let e2 = relativeError(try Self.logits(adapted, ids), try expected.floats("window.logits_lora"))
        XCTAssertLessThan(e1, 1e-5, "base")
        XCTAssertLessThan(e2, 1e-5, "with adapter")
        print("phi3 window: logits relative error \(e1) (base), \(e2) (adapter)")
        // Without the window, the same rows miss transformers' numbers: the fixture checks the window.
        XCTAssertGreaterThan(relativeError(try Self.logits(try Self.load("phi3"), ids), try expected.floats("window.logits_lora")), 1e-3)

        let batch = try Self.batch("phi3", "window")
        let reference = Double(try expected.floats("window.loss")[0])
        for checkpointing in [true, false] {
            let model = try Self.load("phi3", base: dir)
            let gradients = LoRAGradients(model: model)
            let loss = try model.accumulateGradients(batch: batch, into: gradients, normalizer: batch.countedTokens,
                                                     options: TrainingStepOptions(gradientCheckpointing: checkpointing))
            XCTAssertEqual(loss.mean, reference, accuracy: 1e-5 * reference)
            XCTAssertEqual(try model.loss(batch: batch).mean, reference, accuracy: 1e-5 * reference, "eval")
            var checked = 0, worst = 0.0
            for (name, gradient) in gradients.named {
                let error = relativeError(gradient.values, try expected.floats("window.grad." + name))
                XCTAssertLessThan(error, 1e-4, "\(name): relative error \(error)")
                checked += 1
                worst = max(worst, error)
            }
            XCTAssertEqual(checked, 16)
            print("phi3 window checkpointing \(checkpointing): loss \(loss.mean) vs \(reference), worst LoRA gradient relative error \(worst)")
        }

        // One token at a time through the KV cache, past the window: each query sees the same 10 keys.
        let row = ids[0]
        let full = try adapted.forward(tokens: row, cache: KVCache(config: adapted.config, capacity: row.count))
        let cache = KVCache(config: adapted.config, capacity: row.count)
        var stepped = try adapted.forward(tokens: Array(row.prefix(4)), cache: cache)
        for id in row.dropFirst(4) { stepped += try adapted.forward(tokens: [id], cache: cache, lastOnly: true) }
        XCTAssertLessThan(relativeError(stepped, full), 1e-5)
        // The GPU computes the window too; only the fixture's head dimension (24) has no GPU kernels.
        XCTAssertThrowsError(try adapted.config.checkCUDASupport(what: "training")) {
            XCTAssertTrue("\($0)".contains("not 24"), "\($0)")
        }
    }
}

extension Phi3Tests {
    /// `qlora bench --arch phi-4-mini`: Phi-4-mini's config.json read as transformers reads it; the GPU computes it.
    func testPhi4MiniBenchArchitecture() throws {
        let c = Architecture.phi4_mini.config
        XCTAssertEqual(c.modelType, "phi3")
        XCTAssertTrue(c.fusedProjections)
        XCTAssertEqual(c.headDim, 128)
        XCTAssertEqual(c.rotaryDim, 96, "int(128 × 0.75)")
        XCTAssertEqual(c.ropeScaling.kind, .longrope)
        XCTAssertEqual(c.ropeScaling.longFactors.count, 48)
        XCTAssertEqual(c.ropeScaling.shortFactors, Array(repeating: 1, count: 48))
        XCTAssertEqual(c.ropeScaling.originalMaxPositionEmbeddings, 4096)
        XCTAssertEqual(c.ropeScaling.factor, 32, "131072 / 4096")
        XCTAssertEqual(c.ropeScaling.attentionFactor, (1 + log(32.0) / log(4096.0)).squareRoot(), accuracy: 1e-15)
        XCTAssertEqual(c.layerAttention, Array(repeating: .sliding(window: 262144), count: 32))
        XCTAssertTrue(c.tieWordEmbeddings)
        // 3,836,021,760 parameters, as the checkpoint holds (fused or not, the linears have the same sizes).
        XCTAssertEqual(c.parameterCount, 3_836_021_760)
        // The bench's CPU path on one layer of it (a small vocabulary): random fused weights, LoRA on the four fused
        // and unfused modules, a timed training step and decoding.
        var one = c
        one.layerCount = 1
        one.layerAttention = [c.layerAttention[0]]
        one.vocabularySize = 256
        let model = DecoderModel.random(config: one)
        XCTAssertEqual(model.blocks[0].attentionInput.map(\.outFeatures), [3072 + 2 * 1024])
        XCTAssertNil(model.blocks[0].q)
        let lora = LoRAConfig(rank: 4, alpha: 8, targetModules: LoRAConfig.llamaProjections).resolvingDefaultTargets(for: model)
        XCTAssertEqual(try model.attachLoRA(lora, seed: 0), 4)
        let result = try CPUBenchmark.training(model: model, batch: 1, sequenceLength: 8, steps: 1)
        XCTAssertGreaterThan(result.tokensPerSecond, 0)
        XCTAssertGreaterThan(try CPUBenchmark.decode(model: model, promptLength: 4, tokens: 2), 0)
        XCTAssertNoThrow(try c.checkCUDASupport(what: "bench --arch phi-4-mini"), "the GPU computes Phi-4-mini's variations")
    }
}
