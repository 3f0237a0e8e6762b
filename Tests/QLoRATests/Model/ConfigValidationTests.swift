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
                       "'rope_parameters.rope_theta'", "finite number > 0, got 0.0")
        assertRejected(try config(["rope_parameters": .object(JSONObject([("rope_theta", .double(.infinity))]))]), "'rope_parameters.rope_theta'")
        assertRejected(try config(["rope_parameters": nil, "rope_theta": .double(-1)]), "'rope_theta'", "finite number > 0")
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
                       "'rope_parameters.rope_type'", "'yarn' is not supported")
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

    /// The GPU computes every variation of every family in training and generation (FamilyTrainingChecks.swift and
    /// FamilyInferenceChecks.swift check it on the GPU), so its check passes every bench architecture and refuses the
    /// fixtures only for their head dimensions (16 and 24), which have no attention kernels.
    func testCUDARefusesOnlyHeadDimensionsWithoutKernels() throws {
        for architecture in Architecture.allCases {
            XCTAssertNoThrow(try architecture.config.checkCUDASupport(what: "bench"), architecture.rawValue)
        }
        for family in ["qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", "phi3-longrope", "mistral"] {
            let c = try DecoderConfig(directory: TestFixtures.path("families/\(family)/base"))
            XCTAssertThrowsError(try c.checkCUDASupport(what: "a KV cache"), family) {
                XCTAssertTrue("\($0)".contains("head dimensions 32, 64, 96, 128, 256, not \(c.headDim)"), "\($0)")
            }
        }
    }

    /// Which layers slide, and by how much, as each family's transformers config decides it. The CPU computes
    /// the window (DecoderFamilyTests check it against transformers), and so does the CUDA backend.
    func testSlidingWindowPerLayerFollowsTheFamily() throws {
        let mistral = try config(["model_type": .string("mistral"), "sliding_window": .int(16)])
        XCTAssertEqual(mistral.slidingWindow, 16)
        XCTAssertEqual(mistral.layerAttention, [.sliding(window: 16), .sliding(window: 16)])
        XCTAssertNoThrow(try mistral.checkCUDASupport(what: "x"), "the GPU computes sliding windows")
        XCTAssertNil(try config(["model_type": .string("mistral"), "sliding_window": .null]).slidingWindow)
        // Absent, Mistral's default window (transformers' MistralConfig) applies.
        XCTAssertEqual(try config(["model_type": .string("mistral"), "sliding_window": nil]).slidingWindow, 4096)

        let qwen = ["model_type": JSONValue.string("qwen2"), "sliding_window": .int(8)]
        XCTAssertNil(try config(qwen.merging(["use_sliding_window": .bool(false)]) { $1 }).slidingWindow)
        XCTAssertNil(try config(qwen.merging(["use_sliding_window": .bool(true), "max_window_layers": .int(2)]) { $1 }).slidingWindow)
        XCTAssertEqual(try config(qwen.merging(["use_sliding_window": .bool(true), "max_window_layers": .int(1)]) { $1 }).layerAttention,
                       [.full, .sliding(window: 8)])
        XCTAssertEqual(try config(qwen.merging(["use_sliding_window": .bool(true),
                                                "layer_types": .array([.string("sliding_attention"), .string("full_attention")])]) { $1 }).layerAttention,
                       [.sliding(window: 8), .full])
        assertRejected(try config(qwen.merging(["use_sliding_window": .bool(true), "layer_types": .array([.string("full_attention")])]) { $1 }),
                       "'layer_types'", "2 layer types")
        assertRejected(try config(["model_type": .string("gemma2"), "layer_types": .array([.string("full_attention"), .string("local")])]),
                       "'layer_types'", "unknown layer type \"local\"")
        // Gemma 2: even layers slide; Gemma 3: every sixth layer is global (sliding_window_pattern).
        XCTAssertEqual(try config(["model_type": .string("gemma2"), "sliding_window": .int(5)]).layerAttention, [.sliding(window: 5), .full])
        let gemma3 = try config(["model_type": .string("gemma3_text"), "num_hidden_layers": .int(7), "sliding_window": .int(3)])
        XCTAssertEqual(gemma3.layerAttention, [.sliding(window: 3), .sliding(window: 3), .sliding(window: 3), .sliding(window: 3),
                                               .sliding(window: 3), .full, .sliding(window: 3)])
        XCTAssertEqual(try config(["model_type": .string("gemma3_text"), "sliding_window_pattern": .int(2)]).layerAttention,
                       [.sliding(window: 4096), .full])
    }

    /// Gemma's switches, their defaults (absent fields take transformers' config-class defaults) and their checks.
    func testGemmaVariationsAndDefaults() throws {
        let gemma2 = try config(["model_type": .string("gemma2"), "head_dim": nil, "tie_word_embeddings": nil])
        XCTAssertEqual(gemma2.headDim, 256)
        XCTAssertTrue(gemma2.tieWordEmbeddings)
        XCTAssertEqual(gemma2.normWeightOffset, 1)
        XCTAssertTrue(gemma2.sandwichNorms)
        XCTAssertEqual(gemma2.mlpActivation, .geluTanh)
        XCTAssertEqual(gemma2.attentionSoftcap, 50)
        XCTAssertEqual(gemma2.finalLogitSoftcap, 30)
        XCTAssertEqual(gemma2.attentionScale, 1 / 16)
        XCTAssertFalse(gemma2.qkNorm)
        XCTAssertNil(try config(["model_type": .string("gemma2"), "final_logit_softcapping": .null]).finalLogitSoftcap)
        assertRejected(try config(["model_type": .string("gemma2"), "attn_logit_softcapping": .double(-1)]), "'attn_logit_softcapping'", "> 0")
        assertRejected(try config(["model_type": .string("gemma2"), "hidden_activation": .string("gelu")]), "'hidden_activation'", "not implemented")
        assertRejected(try config(["model_type": .string("gemma2"), "query_pre_attn_scalar": .int(0)]), "'query_pre_attn_scalar'", "> 0")
        assertRejected(try config(["model_type": .string("gemma3_text"), "use_bidirectional_attention": .bool(true)]), "'use_bidirectional_attention'")
        // √hidden as transformers rounds it: fp32 for an fp32 model, bf16 for a bf16 one (√3072 = 55.4256 → 55.5).
        XCTAssertEqual(try config(["model_type": .string("gemma2"), "hidden_size": .int(3072)]).embeddingScale(dtype: .bf16), 55.5)
        XCTAssertEqual(gemma2.embeddingScale(dtype: .f32), Float(Double(128).squareRoot()))

        // Gemma 3: q/k norms, no caps, RoPE per layer type (older files: rope_theta, rope_local_base_freq, rope_scaling on global layers).
        let gemma3 = try config(["model_type": .string("gemma3_text"), "sliding_window_pattern": .int(2), "rope_parameters": nil, "rope_scaling": .object(JSONObject([("rope_type", .string("linear")), ("factor", .double(8))]))])
        XCTAssertTrue(gemma3.qkNorm)
        XCTAssertNil(gemma3.attentionSoftcap)
        XCTAssertEqual(gemma3.rope(layer: 1), RopeParameters(theta: 1_000_000, scaling: RopeScaling(kind: .linear, factor: 8)))
        XCTAssertEqual(gemma3.rope(layer: 0), RopeParameters(theta: 10_000, scaling: RopeScaling(kind: .default)))
        let perType = JSONValue.object(JSONObject([
            ("full_attention", .object(JSONObject([("rope_type", .string("default")), ("rope_theta", .double(5e5))]))),
            ("sliding_attention", .object(JSONObject([("rope_type", .string("default")), ("rope_theta", .double(1e3))])))]))
        let typed = try config(["model_type": .string("gemma3_text"), "sliding_window_pattern": .int(2), "rope_parameters": perType])
        XCTAssertEqual(typed.rope(layer: 0).theta, 1e3)
        XCTAssertEqual(typed.rope(layer: 1).theta, 5e5)
        assertRejected(try config(["model_type": .string("gemma3_text"), "rope_parameters": .object(JSONObject([("full_attention", .object(JSONObject([("rope_type", .string("yarn"))])))]))]),
                       "'rope_parameters.full_attention.rope_type'", "'yarn' is not supported")

        // Qwen3: q/k norms, head_dim 128 by default, attention_bias (which would put one on o_proj) refused.
        let qwen3 = try config(["model_type": .string("qwen3"), "head_dim": nil])
        XCTAssertTrue(qwen3.qkNorm)
        XCTAssertEqual(qwen3.headDim, 128)
        XCTAssertEqual(qwen3.normWeightOffset, 0)
        assertRejected(try config(["model_type": .string("qwen3"), "attention_bias": .bool(true)]), "'attention_bias'")
    }

    /// A multimodal Gemma 3: the text model from `text_config`, errors named under it.
    func testGemma3MultimodalReadsItsTextConfig() throws {
        var text = try XCTUnwrap(try JSONValue.parse(bytes: FileSystem.readFile(TestFixtures.path("tiny-llama/base/config.json"))).object)
        text["model_type"] = .string("gemma3_text")
        let json = JSONValue.object(JSONObject([("model_type", .string("gemma3")), ("text_config", .object(text)), ("tie_word_embeddings", .bool(false))]))
        let c = try DecoderConfig(json: json)
        XCTAssertEqual(c.modulePrefix, "model.language_model.")
        XCTAssertEqual(c.checkpointName("model.language_model.layers.0.self_attn.q_proj.weight"), "language_model.model.layers.0.self_attn.q_proj.weight")
        XCTAssertEqual(c.checkpointName("lm_head.weight"), "language_model.lm_head.weight")
        XCTAssertFalse(c.tieWordEmbeddings)
        text["num_hidden_layers"] = .int(0)
        assertRejected(try DecoderConfig(json: .object(JSONObject([("model_type", .string("gemma3")), ("text_config", .object(text))]))),
                       "'text_config.num_hidden_layers'", "must be positive")
        assertRejected(try DecoderConfig(json: .object(JSONObject([("model_type", .string("gemma3"))]))), "'text_config'", "missing")
    }
}

extension ConfigValidationTests {
    /// The benchmark architectures are built with `try!`: they must pass the checks.
    func testBenchmarkArchitecturesAreValidConfigs() {
        for a in Architecture.allCases { XCTAssertGreaterThan(a.config.layerCount, 0, a.rawValue) }
    }
}
