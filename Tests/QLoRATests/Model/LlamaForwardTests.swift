import XCTest
@testable import QLoRA

final class LlamaForwardTests: XCTestCase {
    static func loadTinyLlama() throws -> DecoderModel {
        let dir = TestFixtures.path("tiny-llama/base")
        return try DecoderModel(config: try DecoderConfig(directory: dir), weights: try SafeTensorsCheckpoint(directory: dir))
    }

    static func expected() throws -> SafeTensorsFile {
        try SafeTensorsFile(path: TestFixtures.path("tiny-llama/expected.safetensors"))
    }

    /// The fixture's input ids, one array per row.
    static func inputRows() throws -> [[Int]] {
        let file = try expected()
        let ids = try file.floats("input_ids").map { Int($0) }
        let shape = file.info("input_ids")!.shape
        return (0..<shape[0]).map { Array(ids[($0 * shape[1])..<(($0 + 1) * shape[1])]) }
    }

    func testConfigOfTinyLlama() throws {
        let config = try DecoderConfig(directory: TestFixtures.path("tiny-llama/base"))
        XCTAssertEqual(config.hiddenSize, 128)
        XCTAssertEqual(config.headCount, 4)
        XCTAssertEqual(config.kvHeadCount, 2)
        XCTAssertEqual(config.headDim, 32)
        XCTAssertEqual(config.ropeTheta, 10000)
        XCTAssertFalse(config.tieWordEmbeddings)
    }

    func testUnsupportedModelTypeIsAClearError() {
        XCTAssertThrowsError(try DecoderConfig(json: try JSONValue.parse(#"{"model_type": "gpt2", "hidden_size": 8}"#), file: "x/config.json")) {
            XCTAssertTrue("\($0)".contains("'gpt2' is not supported"), "\($0)")
        }
    }

    func testLlama3RopeScalingFollowsTransformers() throws {
        let json = try JSONValue.parse(#"""
        {"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":1,"num_attention_heads":2,
         "vocab_size":10,"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
         "high_freq_factor":4.0,"original_max_position_embeddings":8192}}
        """#)
        let inv = try DecoderConfig(json: json).ropeInverseFrequencies()
        // High frequencies stay, the lowest are divided by the factor.
        XCTAssertEqual(inv[0], 1, accuracy: 1e-12)
        let plain = 1 / pow(500000.0, 30.0 / 32.0)
        XCTAssertEqual(inv[15], plain / 8, accuracy: plain * 1e-9)
    }

    func testLogitsMatchTransformersOnBF16Base() throws {
        let model = try Self.loadTinyLlama()
        let expected = try Self.expected()
        let reference = try expected.floats("logits_bf16base_fp32")
        var ours: [Float] = []
        for row in try Self.inputRows() {
            ours += try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count))
        }
        let error = relativeError(ours, reference)
        XCTAssertLessThan(error, 1e-4, "relative error \(error)")
    }

    func testIncrementalDecodingEqualsOneShotForward() throws {
        let model = try Self.loadTinyLlama()
        let row = try Self.inputRows()[0]
        let full = try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count))
        let cache = KVCache(config: model.config, capacity: row.count)
        _ = try model.forward(tokens: Array(row.prefix(10)), cache: cache)
        var last: [Float] = []
        for id in row.dropFirst(10) { last = try model.forward(tokens: [id], cache: cache, lastOnly: true) }
        let vocab = model.config.vocabularySize
        XCTAssertLessThan(relativeError(last, Array(full.suffix(vocab))), 1e-5)
    }
}

final class PEFTAdapterTests: XCTestCase {
    func testLogitsWithReferenceAdapterMatchTransformers() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        let config = try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        XCTAssertEqual(config.rank, 8)
        XCTAssertEqual(model.linearLayers.filter { $0.lora != nil }.count, 14)
        let reference = try LlamaForwardTests.expected().floats("logits_bf16base_lora")
        var ours: [Float] = []
        for row in try LlamaForwardTests.inputRows() {
            ours += try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count))
        }
        let error = relativeError(ours, reference)
        XCTAssertLessThan(error, 1e-4, "relative error \(error)")
    }

    func testSavedAdapterRoundTripsWithPEFTKeyNames() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        let config = try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        let dir = try TestFixtures.temporaryDirectory()
        try PEFTAdapter.save(model: model, config: config, to: dir)
        let saved = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        let reference = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/adapter/adapter_model.safetensors"))
        XCTAssertEqual(saved.names.sorted(), reference.names.sorted())
        XCTAssertTrue(saved.names.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"))
        for t in reference.tensors {
            XCTAssertEqual(saved.info(t.name)?.shape, t.shape)
            XCTAssertEqual(try saved.floats(t.name), try reference.floats(t.name), t.name)
        }
        let reloaded = try LlamaForwardTests.loadTinyLlama()
        XCTAssertEqual(try PEFTAdapter.load(directory: dir, into: reloaded), config)
    }

    func testAdapterThatDoesNotFitTheBaseIsAClearError() throws {
        let dir = try TestFixtures.temporaryDirectory()
        try FileManager.default.copyItem(atPath: TestFixtures.path("tiny-llama/adapter/adapter_config.json"), toPath: dir + "/adapter_config.json")
        try SafeTensorsWriter.write([
            TensorRecord(name: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", floats: .init(repeating: 0, count: 8 * 64), shape: [8, 64]),
        ], to: dir + "/adapter_model.safetensors")
        let model = try LlamaForwardTests.loadTinyLlama()
        XCTAssertThrowsError(try PEFTAdapter.load(directory: dir, into: model)) {
            XCTAssertTrue("\($0)".contains("does not fit the base layer"), "\($0)")
            XCTAssertTrue("\($0)".contains("q_proj.lora_A.weight"), "\($0)")
        }
    }
}

final class ArchitectureVariantTests: XCTestCase {
    /// Qwen2: biases on q, k and v, GQA, tied embeddings; logits from transformers (fp32).
    func testQwen2LogitsMatchTransformers() throws {
        let dir = TestFixtures.path("tiny-qwen2")
        let config = try DecoderConfig(directory: dir)
        XCTAssertTrue(config.attentionBias)
        XCTAssertTrue(config.tieWordEmbeddings)
        let model = try DecoderModel(config: config, weights: try SafeTensorsCheckpoint(directory: dir))
        XCTAssertNotNil(model.blocks[0].q?.bias)
        let expected = try SafeTensorsFile(path: dir + "/expected.safetensors")
        let ids = try expected.floats("input_ids").map { Int($0) }
        let logits = try model.forward(tokens: ids, cache: KVCache(config: config, capacity: ids.count))
        XCTAssertLessThan(relativeError(logits, try expected.floats("logits")), 1e-4)
    }

    /// A checkpoint split into shards with model.safetensors.index.json loads as the single file does.
    func testShardedCheckpointLoadsLikeTheSingleFile() throws {
        let source = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/base/model.safetensors"))
        let dir = try TestFixtures.temporaryDirectory()
        try FileManager.default.copyItem(atPath: TestFixtures.path("tiny-llama/base/config.json"), toPath: dir + "/config.json")
        let names = source.names.sorted()
        var weightMap = JSONObject()
        for (shard, part) in [names.prefix(names.count / 2), names.dropFirst(names.count / 2)].enumerated() {
            let file = "model-0000\(shard + 1)-of-00002.safetensors"
            try SafeTensorsWriter.write(try part.map { n in
                let info = source.info(n)!
                return TensorRecord(name: n, dtype: info.dtype, shape: info.shape, data: Array(try source.bytes(n)))
            }, to: dir + "/" + file)
            for n in part { weightMap[n] = .string(file) }
        }
        try FileSystem.writeAtomically(dir + "/model.safetensors.index.json",
                                       text: JSONValue.object(JSONObject([("metadata", .object(JSONObject())), ("weight_map", .object(weightMap))])).serialized())
        let checkpoint = try SafeTensorsCheckpoint(directory: dir)
        XCTAssertEqual(checkpoint.files.count, 2)
        let model = try DecoderModel(config: try DecoderConfig(directory: dir), weights: checkpoint)
        let row = try LlamaForwardTests.inputRows()[0]
        let logits = try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count))
        let reference = try LlamaForwardTests.expected().floats("logits_bf16base_fp32")
        XCTAssertLessThan(relativeError(logits, Array(reference.prefix(logits.count))), 1e-4)

        // An index naming a shard that lacks the tensor is an error naming both.
        weightMap[names[0]] = .string("model-00002-of-00002.safetensors")
        try FileSystem.writeAtomically(dir + "/model.safetensors.index.json",
                                       text: JSONValue.object(JSONObject([("weight_map", .object(weightMap))])).serialized())
        XCTAssertThrowsError(try SafeTensorsCheckpoint(directory: dir)) {
            XCTAssertTrue("\($0)".contains("does not contain this tensor"), "\($0)")
        }

        // A shard named by a path outside the folder (even one that exists and holds the tensor) is refused by name.
        let outside = try TestFixtures.temporaryDirectory()
        try FileManager.default.copyItem(atPath: dir + "/model-00001-of-00002.safetensors", toPath: outside + "/stolen.safetensors")
        for path in ["../\(outside.split(separator: "/").last!)/stolen.safetensors", outside + "/stolen.safetensors", "..", ""] {
            weightMap[names[0]] = .string(path)
            try FileSystem.writeAtomically(dir + "/model.safetensors.index.json",
                                           text: JSONValue.object(JSONObject([("weight_map", .object(weightMap))])).serialized())
            XCTAssertThrowsError(try SafeTensorsCheckpoint(directory: dir), path) {
                XCTAssertTrue("\($0)".contains("is not a file name in the model folder"), "\($0)")
            }
        }
    }
}
