import XCTest
@testable import QLoRA

/// `qlora bench/plan --arch qwen3-8b | gemma-2-9b | gemma-3-12b`: the published config.json of each model (Qwen/Qwen3-8B,
/// google/gemma-2-9b, google/gemma-3-12b-pt's text_config) read as transformers reads it. The parameter counts are
/// transformers 5.25's, counted on its models built from the same configs (tied embeddings once).
final class FamilyArchitectureTests: XCTestCase {
    func testQwen3_8B() {
        let c = Architecture.qwen3_8b.config
        XCTAssertEqual(c.modelType, "qwen3")
        XCTAssertEqual([c.hiddenSize, c.intermediateSize, c.layerCount, c.headCount, c.kvHeadCount, c.headDim, c.vocabularySize],
                       [4096, 12288, 36, 32, 8, 128, 151936])
        XCTAssertEqual(c.rotaryDim, 128)
        XCTAssertEqual(c.ropeTheta, 1_000_000)
        XCTAssertEqual(c.ropeScaling.kind, .default)
        XCTAssertEqual(c.rmsNormEps, 1e-6)
        XCTAssertFalse(c.tieWordEmbeddings)
        XCTAssertTrue(c.qkNorm)
        XCTAssertFalse(c.attentionBias)
        XCTAssertNil(c.slidingWindow)
        XCTAssertEqual(c.layerAttention, Array(repeating: .full, count: 36))
        XCTAssertEqual(c.normWeightOffset, 0)
        XCTAssertFalse(c.sandwichNorms)
        XCTAssertEqual(c.maxPositionEmbeddings, 40960)
        XCTAssertEqual(c.attentionScale, 1 / Float(128).squareRoot())
        XCTAssertEqual(c.parameterCount, 8_190_735_360)
        assertClose(c.parameterCount, 8.19e9)
    }

    func testGemma2_9B() {
        let c = Architecture.gemma2_9b.config
        XCTAssertEqual(c.modelType, "gemma2")
        XCTAssertEqual([c.hiddenSize, c.intermediateSize, c.layerCount, c.headCount, c.kvHeadCount, c.headDim, c.vocabularySize],
                       [3584, 14336, 42, 16, 8, 256, 256000])
        XCTAssertEqual(c.ropeTheta, 10000)
        XCTAssertEqual(c.ropeScaling.kind, .default)
        XCTAssertNil(c.slidingRope)
        XCTAssertEqual(c.rmsNormEps, 1e-6)
        XCTAssertTrue(c.tieWordEmbeddings)
        XCTAssertFalse(c.qkNorm)
        XCTAssertEqual(c.normWeightOffset, 1)
        XCTAssertTrue(c.sandwichNorms)
        XCTAssertTrue(c.scalesEmbedding)
        XCTAssertEqual(c.mlpActivation, .geluTanh)
        XCTAssertEqual(c.queryPreAttentionScalar, 256)
        XCTAssertEqual(c.attentionSoftcap, 50)
        XCTAssertEqual(c.finalLogitSoftcap, 30)
        // Gemma2Config's default layer_types: layer 0 slides, layer 1 is global, and so on.
        XCTAssertEqual(c.layerAttention, (0..<42).map { $0 % 2 == 0 ? .sliding(window: 4096) : .full })
        XCTAssertEqual(c.slidingWindow, 4096)
        XCTAssertEqual(c.parameterCount, 9_241_705_984)
        assertClose(c.parameterCount, 9.24e9)
    }

    func testGemma3_12B() {
        let c = Architecture.gemma3_12b.config
        XCTAssertEqual(c.modelType, "gemma3_text")
        XCTAssertEqual(c.modulePrefix, "model.", "the text model alone, as Gemma3ForCausalLM names it")
        XCTAssertEqual([c.hiddenSize, c.intermediateSize, c.layerCount, c.headCount, c.kvHeadCount, c.headDim, c.vocabularySize],
                       [3840, 15360, 48, 16, 8, 256, 262208])
        // Global layers: base 1e6 with linear scaling by 8; local layers: base 10,000 unscaled.
        XCTAssertEqual(c.ropeTheta, 1_000_000)
        XCTAssertEqual(c.ropeScaling.kind, .linear)
        XCTAssertEqual(c.ropeScaling.factor, 8)
        XCTAssertEqual(c.slidingRope?.theta, 10000)
        XCTAssertEqual(c.slidingRope?.scaling.kind, .default)
        XCTAssertEqual(c.rope(layer: 0).theta, 10000)
        XCTAssertEqual(c.rope(layer: 5), RopeParameters(theta: 1_000_000, scaling: c.ropeScaling))
        XCTAssertEqual(c.rmsNormEps, 1e-6)
        XCTAssertTrue(c.tieWordEmbeddings)
        XCTAssertTrue(c.qkNorm)
        XCTAssertEqual(c.normWeightOffset, 1)
        XCTAssertTrue(c.sandwichNorms)
        XCTAssertTrue(c.scalesEmbedding)
        XCTAssertEqual(c.mlpActivation, .geluTanh)
        XCTAssertEqual(c.queryPreAttentionScalar, 256)
        XCTAssertNil(c.attentionSoftcap)
        XCTAssertNil(c.finalLogitSoftcap)
        // Five local layers of window 1024, then one global.
        XCTAssertEqual(c.layerAttention, (0..<48).map { ($0 + 1) % 6 == 0 ? .full : .sliding(window: 1024) })
        XCTAssertEqual(c.maxPositionEmbeddings, 131072)
        XCTAssertEqual(c.parameterCount, 11_766_034_176)
        assertClose(c.parameterCount, 11.77e9)
    }

    /// The bench's CPU path on each new shape, narrowed (hidden 64, MLP 128, vocabulary 256, two layers: a sliding and a
    /// global one where the model has both) but with its heads, head_dim and variations: random weights with the q/k and
    /// sandwich norms the block needs, LoRA on the seven projections, a training step and decoding.
    func testNarrowedShapesRunTheCPUBench() throws {
        for arch in [Architecture.qwen3_8b, .gemma2_9b, .gemma3_12b] {
            var c = arch.config
            let global = c.layerAttention.firstIndex(of: .full) ?? 0
            c.layerAttention = [c.layerAttention[0], c.layerAttention[global]]
            c.layerCount = 2
            c.hiddenSize = 64
            c.intermediateSize = 128
            c.vocabularySize = 256
            let model = DecoderModel.random(config: c)
            let block = model.blocks[0]
            XCTAssertEqual(block.qNorm?.count, c.qkNorm ? c.headDim : nil, arch.rawValue)
            XCTAssertEqual(block.kNorm?.count, c.qkNorm ? c.headDim : nil, arch.rawValue)
            XCTAssertEqual(block.attentionOutputNorm?.count, c.sandwichNorms ? 64 : nil, arch.rawValue)
            XCTAssertEqual(block.mlpOutputNorm?.count, c.sandwichNorms ? 64 : nil, arch.rawValue)
            // Norms multiply by 1: weight 0 under Gemma's (1 + w).
            XCTAssertEqual(block.inputNorm.first, 1 - c.normWeightOffset, arch.rawValue)
            XCTAssertEqual(block.q?.outFeatures, c.headCount * c.headDim, arch.rawValue)
            let lora = LoRAConfig(rank: 4, alpha: 8, targetModules: LoRAConfig.llamaProjections).resolvingDefaultTargets(for: model)
            XCTAssertEqual(try model.attachLoRA(lora, seed: 0), 14, arch.rawValue)
            let result = try CPUBenchmark.training(model: model, batch: 1, sequenceLength: 8, steps: 1)
            XCTAssertGreaterThan(result.tokensPerSecond, 0, arch.rawValue)
            XCTAssertGreaterThan(try CPUBenchmark.decode(model: model, promptLength: 4, tokens: 2), 0, arch.rawValue)
        }
    }

    /// A config without max_position_embeddings (Gemma 3's pt checkpoints leave it out of text_config) takes the family
    /// config class's default (transformers 5.25), which bounds generation and goes into a GGUF's context_length.
    func testMaxPositionEmbeddingsDefaultsPerFamily() throws {
        let expected = ["llama": 2048, "mistral": 131_072, "qwen2": 32768, "qwen3": 32768, "gemma2": 8192, "gemma3_text": 131_072,
                        "phi3": 4096]
        for (family, positions) in expected {
            let json = JSONValue.object(JSONObject([("model_type", .string(family)), ("hidden_size", .int(64)),
                                                    ("intermediate_size", .int(128)), ("num_hidden_layers", .int(2)),
                                                    ("num_attention_heads", .int(4)), ("vocab_size", .int(256)), ("head_dim", .int(16))]))
            XCTAssertEqual(try DecoderConfig(json: json).maxPositionEmbeddings, positions, family)
        }
    }

    /// What a user sees: the names in the commands' help; `plan --arch NAME` prints the GPU trainer's plan once the
    /// trainer computes the family, and until then names what it lacks and the CPU way out (never "unknown --arch").
    func testCommandLineKnowsTheNewArchitectures() throws {
        let cli = CommandLineTests(name: "qlora", testClosure: { _ in })
        let names = [Architecture.qwen3_8b, .gemma2_9b, .gemma3_12b, .phi4_mini].map(\.rawValue)
        for command in ["bench", "plan", "bench-decode"] {
            let help = try cli.qlora([command, "--help"])
            XCTAssertEqual(help.status, 0, help.err)
            // The help text wraps lines: compare without the line breaks and indentation.
            let text = help.out.split(whereSeparator: \.isWhitespace).joined(separator: " ")
            for name in names { XCTAssertTrue(text.contains(name), "\(command) --help lacks \(name): \(help.out)") }
        }
        for name in names {
            let plan = try cli.qlora(["plan", "--arch", name, "--batch", "2", "--seq", "2048", "--gpu-memory", "80"])
            if (try? Architecture(rawValue: name)!.config.checkCUDASupport(what: "")) != nil {
                XCTAssertEqual(plan.status, 0, plan.err)
                XCTAssertTrue(plan.out.contains("\(name), 2 x 2048 tokens, LoRA r=16:"), plan.out)
                XCTAssertTrue(plan.out.contains("80.0 GiB card: fits"), plan.out)
            } else {
                XCTAssertNotEqual(plan.status, 0, plan.out)
                XCTAssertTrue(plan.err.contains("plan --arch \(name)") && plan.err.contains("--device cpu"), plan.err)
            }
            XCTAssertFalse(plan.err.contains("unknown --arch"), plan.err)
        }
    }

    /// Within 1% of the size the model is known by.
    func assertClose(_ count: Int, _ stated: Double, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertLessThan(abs(Double(count) / stated - 1), 0.01, "\(count) vs \(stated)", file: file, line: line)
    }
}
