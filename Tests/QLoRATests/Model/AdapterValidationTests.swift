import XCTest
@testable import QLoRA

/// adapter_config.json and the adapter's tensors, checked against each other, the model and what is implemented.
final class AdapterValidationTests: XCTestCase {
    let prefix = "base_model.model.model.layers."

    func load(_ dir: String) throws -> LoRAConfig {
        try PEFTAdapter.load(directory: dir, into: try LlamaForwardTests.loadTinyLlama())
    }

    func testTheUneditedCopyLoads() throws {
        XCTAssertEqual(try load(try EditedFixtures.adapter()).rank, 8)
    }

    func testTargetModulesWithoutTensorsAreAnError() throws {
        let dir = try EditedFixtures.adapter(tensors: { $0.removeAll { $0.name.contains("layers.1.self_attn.v_proj") } })
        assertRejected(try load(dir), "module 'model.layers.1.self_attn.v_proj'", "no lora_A/lora_B weights")
        let unknown = try EditedFixtures.adapter(config: { $0["target_modules"] = .array([.string("q_proj"), .string("c_attn")]) })
        assertRejected(try load(unknown), "'target_modules'", "'c_attn' names no linear layer")
    }

    func testTensorsForModulesNotTargetedAreAnError() throws {
        let dir = try EditedFixtures.adapter(config: {
            $0["target_modules"] = .array(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"].map { .string($0) })
        })
        assertRejected(try load(dir), "mlp.down_proj.lora_A.weight", "not selected by")
    }

    /// PEFT's layers_to_transform: only those blocks carry adapters.
    func testLayersToTransformSelectsBlocks() throws {
        let dir = try EditedFixtures.adapter(config: { $0["layers_to_transform"] = .array([.int(1)]); $0["layers_pattern"] = .string("layers") },
                                             tensors: { $0.removeAll { $0.name.hasPrefix(self.prefix + "0.") } })
        let model = try LlamaForwardTests.loadTinyLlama()
        let config = try PEFTAdapter.load(directory: dir, into: model)
        XCTAssertEqual(config.layersToTransform, [1])
        XCTAssertTrue(model.blocks[0].linears.allSatisfy { $0.lora == nil })
        XCTAssertTrue(model.blocks[1].linears.allSatisfy { $0.lora != nil })
        // A layer-0 tensor in such an adapter is not selected; a layer the model lacks is an error; so is another pattern.
        assertRejected(try load(try EditedFixtures.adapter(config: { $0["layers_to_transform"] = .int(1) })), "layers.0.", "layers_to_transform [1]")
        assertRejected(try load(try EditedFixtures.adapter(config: { $0["layers_to_transform"] = .array([.int(0), .int(2)]) })),
                       "'layers_to_transform'", "layer 2 does not exist")
        assertRejected(try load(try EditedFixtures.adapter(config: { $0["layers_to_transform"] = .int(0); $0["layers_pattern"] = .string("h") })),
                       "'layers_pattern'")
        // Saved again, the selection is kept.
        let out = try TestFixtures.temporaryDirectory()
        try PEFTAdapter.save(model: model, config: config, to: out)
        XCTAssertEqual(try PEFTAdapter.load(directory: out, into: try LlamaForwardTests.loadTinyLlama()).layersToTransform, [1])
    }

    func testUnimplementedOptionsAreRefusedByName() throws {
        let cases: [(String, JSONValue, String)] = [
            ("modules_to_save", .array([.string("lm_head")]), "modules_to_save"),
            ("use_dora", .bool(true), "DoRA"),
            ("bias", .string("lora_only"), "\"lora_only\""),
            ("lora_bias", .bool(true), "lora_B"),
            ("layer_replication", .array([.array([.int(0), .int(2)])]), "replication"),
            ("trainable_token_indices", .array([.int(3)]), "token"),
            ("target_modules", .string(".*q_proj"), "regular expression"),
        ]
        for (key, value, words) in cases {
            assertRejected(try load(try EditedFixtures.adapter(config: { $0[key] = value })), "adapter_config.json", "'\(key)'", words)
        }
        // Empty or null forms of the same options are the defaults PEFT writes.
        XCTAssertNoThrow(try load(try EditedFixtures.adapter(config: { $0["modules_to_save"] = .array([]); $0["exclude_modules"] = .null })))
        // fan_in_fan_out: PEFT turns it off for torch.nn.Linear, so the adapter computes the same.
        XCTAssertNoThrow(try load(try EditedFixtures.adapter(config: { $0["fan_in_fan_out"] = .bool(true) })))
    }

    func testRankAlphaAndPatternsAreChecked() throws {
        for (key, value) in [("r", JSONValue.int(0)), ("r", .string("8")), ("lora_alpha", .int(-16)), ("lora_alpha", .double(.infinity)),
                             ("lora_alpha", .string("16")), ("lora_dropout", .double(1)),
                             ("rank_pattern", .object(JSONObject([("q_proj", .int(0))]))),
                             ("alpha_pattern", .object(JSONObject([("q_proj", .string("x"))])))] {
            assertRejected(try load(try EditedFixtures.adapter(config: { $0[key] = value })), "'\(key)'")
        }
        // A rank pattern changes the expected shapes.
        assertRejected(try load(try EditedFixtures.adapter(config: { $0["rank_pattern"] = .object(JSONObject([("q_proj", .int(4))])) })),
                       "q_proj.lora_A.weight", "r=4")
    }

    func testAdapterValuesMustBeFiniteAndUnique() throws {
        let name = prefix + "0.mlp.up_proj.lora_B.weight"
        let nan = try EditedFixtures.adapter(tensors: { try EditedFixtures.editValues(&$0, name) { $0[2] = .nan } })
        assertRejected(try load(nan), "tensor '\(name)'", "finite")
        let twice = try EditedFixtures.adapter(tensors: { list in
            let a = list.first { $0.name == self.prefix + "0.self_attn.q_proj.lora_A.weight" }!
            list.append(TensorRecord(name: self.prefix + "0.self_attn.q_proj.lora_A.default.weight", dtype: a.dtype, shape: a.shape, data: a.data))
        })
        assertRejected(try load(twice), "a second lora_A weight")
    }

    /// target_modules as PEFT matches them: a name equal to the module path or ending it after a dot.
    func testTargetMatchingFollowsPEFT() {
        let c = LoRAConfig(rank: 8, alpha: 16, targetModules: ["self_attn.q_proj", "down_proj"])
        XCTAssertTrue(c.targets("model.layers.0.self_attn.q_proj"))
        XCTAssertTrue(c.targets("model.layers.3.mlp.down_proj"))
        XCTAssertFalse(c.targets("model.layers.0.self_attn.k_proj"))
        XCTAssertFalse(LoRAConfig(rank: 8, alpha: 16, targetModules: ["proj"]).targets("model.layers.0.self_attn.q_proj"))
    }
}

extension AdapterValidationTests {
    /// Training attaches fresh adapters from target_modules: a name matching no layer is an error, not fewer adapters.
    func testAttachingRefusesUnknownTargetModules() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        assertRejected(try model.attachLoRA(LoRAConfig(rank: 4, alpha: 8, targetModules: ["q_proj", "qkv_proj"]), seed: 1),
                       "target_modules", "'qkv_proj' names no linear layer")
        XCTAssertEqual(try model.attachLoRA(LoRAConfig(rank: 4, alpha: 8, targetModules: ["q_proj", "v_proj"]), seed: 1), 4)
    }
}
