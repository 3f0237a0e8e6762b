import XCTest
@testable import QLoRA

/// Loading checks the tensors against config.json: none missing, none left over, shapes, finite values.
final class CheckpointValidationTests: XCTestCase {
    func load(_ dir: String, quantization: BaseQuantization = .none) throws -> LoadedModel {
        try ModelLoader.load(dir, quantization: quantization)
    }

    func testTheUneditedCopyLoads() throws {
        let dir = try EditedFixtures.tinyLlama()
        XCTAssertEqual(try load(dir).model.blocks.count, 2)
    }

    func testFewerLayersInTheConfigThanInTheCheckpointIsAnError() throws {
        let dir = try EditedFixtures.tinyLlama(config: { $0["num_hidden_layers"] = .int(1) })
        assertRejected(try load(dir), "tensor 'model.layers.1.", "num_hidden_layers 1")
    }

    func testMissingLayerIsAnError() throws {
        let dir = try EditedFixtures.tinyLlama(tensors: { $0.removeAll { $0.name.hasPrefix("model.layers.1.mlp.up_proj") } })
        assertRejected(try load(dir), "tensor 'model.layers.1.mlp.up_proj.weight'", "missing")
    }

    func testMissingUntiedHeadDoesNotReuseTheEmbedding() throws {
        let dir = try EditedFixtures.tinyLlama(tensors: { $0.removeAll { $0.name == "lm_head.weight" } })
        assertRejected(try load(dir), "tensor 'lm_head.weight'", "tie_word_embeddings false")
        // Tied, the head is the embedding and a stored copy is ignored, as transformers does.
        let tied = try EditedFixtures.tinyLlama(config: { $0["tie_word_embeddings"] = .bool(true) })
        let model = try load(tied).model
        XCTAssertTrue(model.head === model.embedding)
    }

    func testWrongShapeAndUnexpectedBiasAreErrors() throws {
        let wide = try EditedFixtures.tinyLlama(tensors: { list in
            let i = list.firstIndex { $0.name == "model.norm.weight" }!
            list[i] = TensorRecord(name: "model.norm.weight", floats: .init(repeating: 1, count: 129), shape: [129])
        })
        assertRejected(try load(wide), "tensor 'model.norm.weight'", "shape [129], expected [128]")
        let bias = try EditedFixtures.tinyLlama(tensors: {
            $0.append(TensorRecord(name: "model.layers.0.mlp.down_proj.bias", floats: .init(repeating: 0, count: 128), shape: [128]))
        })
        assertRejected(try load(bias), "tensor 'model.layers.0.mlp.down_proj.bias'", "bias that config.json does not enable")
    }

    func testNonFiniteBaseWeightsAreErrorsNamingTheTensor() throws {
        for (name, bad) in [("model.layers.0.self_attn.k_proj.weight", Float.nan), ("model.embed_tokens.weight", -.infinity),
                            ("model.layers.1.post_attention_layernorm.weight", .infinity)] {
            let dir = try EditedFixtures.tinyLlama(tensors: { try EditedFixtures.editValues(&$0, name) { $0[7] = bad } })
            assertRejected(try load(dir), "tensor '\(name)'", "element 7 is \(bad)", "finite")
            // Quantized on load the same weight would become blocks of zeros: also refused.
            assertRejected(try load(dir, quantization: .nf4), "tensor '\(name)'", "finite")
        }
    }

    func testNonFiniteScalesOfAPreQuantizedCheckpointAreErrors() throws {
        let name = "model.layers.0.mlp.gate_proj.weight.nested_absmax"
        let dir = try EditedFixtures.tinyLlama("base-bnb-nf4", tensors: { try EditedFixtures.editValues(&$0, name) { $0[0] = .nan } })
        assertRejected(try load(dir), "tensor '\(name)'", "finite")
        XCTAssertNoThrow(try load(try EditedFixtures.tinyLlama("base-bnb-nf4")))
    }

    func testQuantizeCommandRefusesNonFiniteWeights() throws {
        let dir = try EditedFixtures.tinyLlama(tensors: { try EditedFixtures.editValues(&$0, "model.layers.1.mlp.down_proj.weight") { $0[3] = .nan } })
        assertRejected(try BnbCheckpointWriter.quantizeModel(from: dir, to: dir + "-nf4"), "model.layers.1.mlp.down_proj.weight", "finite")
        XCTAssertFalse(FileSystem.exists(dir + "-nf4/model.safetensors"))
    }

    func testFiniteScanFindsTheFirstBadElement() {
        var values = [Float](repeating: 1, count: 100_000)
        XCTAssertNil(values.withUnsafeBufferPointer(firstNonFiniteIndex))
        values[70_001] = .nan
        values[90_000] = .infinity
        XCTAssertEqual(values.withUnsafeBufferPointer(firstNonFiniteIndex), 70_001)
        values[5] = -.infinity
        XCTAssertEqual(values.withUnsafeBufferPointer(firstNonFiniteIndex), 5)
        XCTAssertNil([Float.greatestFiniteMagnitude, -.leastNonzeroMagnitude].withUnsafeBufferPointer(firstNonFiniteIndex))
    }
}

extension CheckpointValidationTests {
    func testFourBitWeightsWithoutAQuantizationConfigAreNamed() throws {
        let dir = try EditedFixtures.tinyLlama("base-bnb-nf4", config: { $0["quantization_config"] = nil })
        assertRejected(try load(dir), "'quantization_config'", "bitsandbytes 4-bit")
    }
}
