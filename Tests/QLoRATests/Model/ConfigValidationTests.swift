import XCTest
@testable import QLoRA

/// config.json: every field the model reads is checked, and values it does not implement are refused by name.
final class ConfigValidationTests: XCTestCase {
    /// The tiny-llama config with `fields` replaced (nil removes a field).
    func config(_ fields: [String: JSONValue?]) throws -> DecoderConfig {
        var json = try XCTUnwrap(try JSONValue.parse(bytes: FileSystem.readFile(TestFixtures.path("tiny-llama/base/config.json"))).object)
        for (k, v) in fields { json[k] = v }
        return try DecoderConfig(json: .object(json), file: "m/config.json")
    }

    func testTheFixtureStillReads() throws {
        let c = try config([:])
        XCTAssertEqual(c.kvHeadCount, 2)
        XCTAssertNil(c.slidingWindow)
        XCTAssertEqual(c.eosTokenIDs, [2])
    }

    func testZeroOrNegativeSizesAreErrorsNotCrashes() {
        assertRejected(try config(["num_key_value_heads": .int(0)]), "m/config.json", "'num_key_value_heads'", "must be positive, got 0")
        assertRejected(try config(["num_key_value_heads": .int(3)]), "'num_key_value_heads'", "does not divide num_attention_heads 4")
        assertRejected(try config(["head_dim": .int(-32)]), "'head_dim'", "must be positive")
        assertRejected(try config(["head_dim": .int(31)]), "'head_dim'", "must be even")
        assertRejected(try config(["max_position_embeddings": .int(0)]), "'max_position_embeddings'", "must be positive")
        assertRejected(try config(["hidden_size": .int(1 << 40)]), "'hidden_size'", "larger than this program accepts")
    }

    func testWrongJSONTypesNameTheField() {
        assertRejected(try config(["hidden_size": .string("128")]), "'hidden_size'", "expected a positive integer, got \"128\"")
        assertRejected(try config(["rms_norm_eps": .string("1e-5")]), "'rms_norm_eps'", "expected a number")
        assertRejected(try config(["tie_word_embeddings": .int(1)]), "'tie_word_embeddings'", "expected true or false")
        assertRejected(try config(["hidden_act": .int(1)]), "'hidden_act'", "expected a string")
        assertRejected(try config(["model_type": .array([])]), "'model_type'", "expected a string")
        assertRejected(try config(["eos_token_id": .array([.int(2), .string("x")])]), "'eos_token_id'", "expected a token id")
    }

    func testNumericRanges() {
        assertRejected(try config(["rms_norm_eps": .double(-1e-5)]), "'rms_norm_eps'", "finite number > 0")
        assertRejected(try config(["rms_norm_eps": .double(.nan)]), "'rms_norm_eps'")
        assertRejected(try config(["rms_norm_eps": .double(1e-60)]), "'rms_norm_eps'", "float32")
        assertRejected(try config(["rope_parameters": .object(JSONObject([("rope_theta", .double(0)), ("rope_type", .string("default"))]))]),
                       "'rope_theta'", "finite number > 0, got 0.0")
        assertRejected(try config(["rope_parameters": .object(JSONObject([("rope_theta", .double(.infinity))]))]), "'rope_theta'")
        let llama3 = { (factor: JSONValue, low: Double, high: Double) -> JSONValue in
            .object(JSONObject([("rope_type", .string("llama3")), ("rope_theta", .double(500000)), ("factor", factor),
                                ("low_freq_factor", .double(low)), ("high_freq_factor", .double(high))]))
        }
        assertRejected(try config(["rope_parameters": llama3(.double(-8), 1, 4)]), "'rope_parameters.factor'", "finite number > 0")
        assertRejected(try config(["rope_parameters": llama3(.double(8), 4, 4)]), "'rope_parameters.high_freq_factor'", "greater than low_freq_factor")
        assertRejected(try config(["rope_parameters": llama3(.string("8"), 1, 4)]), "'rope_parameters.factor'", "expected a number")
        assertRejected(try config(["rope_parameters": .string("default")]), "'rope_parameters'", "expected an object")
    }

    func testTokenIDsMustBeInTheVocabulary() {
        assertRejected(try config(["bos_token_id": .int(1000)]), "'bos_token_id'", "outside the vocabulary (0..<1000)")
        assertRejected(try config(["eos_token_id": .array([.int(2), .int(-1)])]), "'eos_token_id'", "token id -1")
        assertRejected(try config(["pad_token_id": .int(5000)]), "'pad_token_id'")
        XCTAssertNoThrow(try config(["pad_token_id": .null, "bos_token_id": nil]))
    }

    func testSwitchesThatChangeTheMathAreRefusedByName() {
        assertRejected(try config(["hidden_act": .string("gelu")]), "'hidden_act'", "'gelu' is not implemented")
        XCTAssertNoThrow(try config(["hidden_act": .string("swish")]))  // transformers' swish is SiLU
        assertRejected(try config(["mlp_bias": .bool(true)]), "'mlp_bias'", "not implemented")
        assertRejected(try config(["attention_bias": .bool(true)]), "'attention_bias'", "o_proj")
        assertRejected(try config(["attention_dropout": .double(0.1)]), "'attention_dropout'")
        assertRejected(try config(["rope_parameters": .object(JSONObject([("rope_type", .string("yarn")), ("rope_theta", .double(1e4))]))]),
                       "rope_type 'yarn' is not supported")
        assertRejected(try config(["partial_rotary_factor": .double(0.5)]), "'partial_rotary_factor'")
        assertRejected(try config(["quantization_config": .object(JSONObject([("quant_method", .string("gptq"))]))]),
                       "'quantization_config'", "'gptq' is not supported")
    }

    /// transformers 4 configs: `rope_parameters` null (or absent) and the scaling in `rope_scaling`.
    func testLegacyRopeScalingIsReadWhenRopeParametersIsNull() throws {
        let c = try config(["rope_parameters": .null, "rope_theta": .double(500000),
                            "rope_scaling": .object(JSONObject([("type", .string("linear")), ("factor", .double(2))]))])
        XCTAssertEqual(c.ropeTheta, 500000)
        XCTAssertEqual(c.ropeScaling.kind, .linear)
        XCTAssertEqual(c.ropeScaling.factor, 2)
    }

    /// Qwen2 always has q, k, v biases (transformers ignores attention_bias there); Mistral never.
    func testAttentionBiasFollowsTheFamily() throws {
        XCTAssertTrue(try config(["model_type": .string("qwen2"), "attention_bias": .bool(false)]).attentionBias)
        XCTAssertFalse(try config(["model_type": .string("mistral"), "sliding_window": .null]).attentionBias)
    }

    /// Sliding-window attention is not implemented: sequences within the window compute exactly as full
    /// attention and run; longer ones are refused wherever a sequence length is chosen.
    func testSlidingWindowLimitsTheSequenceLength() throws {
        let mistral = try config(["model_type": .string("mistral"), "sliding_window": .int(16)])
        XCTAssertEqual(mistral.slidingWindow, 16)
        XCTAssertNoThrow(try mistral.checkSequenceLength(16, what: "x"))
        assertRejected(try mistral.checkSequenceLength(17, what: "max_seq_length 17"), "max_seq_length 17", "sliding window of 16")
        XCTAssertNil(try config(["model_type": .string("mistral"), "sliding_window": .null]).slidingWindow)

        let qwen = ["model_type": JSONValue.string("qwen2"), "sliding_window": .int(8)]
        XCTAssertNil(try config(qwen.merging(["use_sliding_window": .bool(false)]) { $1 }).slidingWindow)
        XCTAssertNil(try config(qwen.merging(["use_sliding_window": .bool(true), "max_window_layers": .int(2)]) { $1 }).slidingWindow)
        XCTAssertEqual(try config(qwen.merging(["use_sliding_window": .bool(true), "max_window_layers": .int(1)]) { $1 }).slidingWindow, 8)
        XCTAssertEqual(try config(qwen.merging(["use_sliding_window": .bool(true),
                                                "layer_types": .array([.string("full_attention"), .string("sliding_attention")])]) { $1 }).slidingWindow, 8)
        assertRejected(try config(qwen.merging(["use_sliding_window": .bool(true), "layer_types": .array([.string("full_attention")])]) { $1 }),
                       "'layer_types'", "2 layer types")

        // The CPU forward refuses a longer input rather than attending over all of it.
        let dir = TestFixtures.path("tiny-llama/base")
        var json = try XCTUnwrap(try JSONValue.parse(bytes: FileSystem.readFile(dir + "/config.json")).object)
        json["model_type"] = .string("mistral")
        json["sliding_window"] = .int(4)
        let model = try DecoderModel(config: DecoderConfig(json: .object(json)), weights: SafeTensorsCheckpoint(directory: dir))
        let cache = KVCache(config: model.config, capacity: 8)
        XCTAssertNoThrow(try model.forward(tokens: [1, 2, 3, 4], cache: cache))
        assertRejected(try model.forward(tokens: [5], cache: cache), "sliding window of 4")
    }
}

extension ConfigValidationTests {
    /// The benchmark architectures are built with `try!`: they must pass the checks.
    func testBenchmarkArchitecturesAreValidConfigs() {
        for a in Architecture.allCases { XCTAssertGreaterThan(a.config.layerCount, 0, a.rawValue) }
    }
}
