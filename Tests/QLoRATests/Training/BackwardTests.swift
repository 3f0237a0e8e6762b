import XCTest
@testable import QLoRA

final class BackwardTests: XCTestCase {
    /// The tiny model with the reference adapter (B non-zero) and the fixture's batch.
    func modelAndBatch() throws -> (DecoderModel, TrainingBatch) {
        let model = try LlamaForwardTests.loadTinyLlama()
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        return (model, try Self.fixtureBatch())
    }

    /// The fixture's two rows with their labels (the first 7 of row 0 masked).
    static func fixtureBatch() throws -> TrainingBatch {
        let labels = try LlamaForwardTests.expected().floats("labels").map { Int($0) }
        let rows = try LlamaForwardTests.inputRows()
        return TrainingBatch(examples: rows.enumerated().map { (i, r) in (r, Array(labels[(i * r.count)..<((i + 1) * r.count)])) },
                             length: rows[0].count, padID: 0)
    }

    func testLossEqualsCrossEntropyOfReferenceLogits() throws {
        let (model, batch) = try modelAndBatch()
        let logits = try LlamaForwardTests.expected().floats("logits_bf16base_lora")
        let vocab = model.config.vocabularySize
        var sum = 0.0, count = 0
        for r in 0..<batch.rows {
            for t in 0..<(batch.length - 1) {
                let label = Int(batch.labels[r * batch.length + t + 1])
                guard label != -100 else { continue }
                let row = Array(logits[((r * batch.length + t) * vocab)..<((r * batch.length + t + 1) * vocab)]).map(Double.init)
                let m = row.max()!
                sum += m + log(row.map { exp($0 - m) }.reduce(0, +)) - row[label]
                count += 1
            }
        }
        let loss = try model.loss(batch: batch)
        XCTAssertEqual(loss.count, count)
        XCTAssertEqual(loss.mean, sum / Double(count), accuracy: 1e-4 * sum / Double(count))
    }

    /// Directional derivative along the gradient, by central differences, for the A and the B matrices.
    func testGradientsMatchFiniteDifferences() throws {
        for checkpointing in [true, false] {
            let (model, batch) = try modelAndBatch()
            let gradients = LoRAGradients(model: model)
            let count = batch.countedTokens
            _ = try model.accumulateGradients(batch: batch, into: gradients, normalizer: count,
                                              options: TrainingStepOptions(gradientCheckpointing: checkpointing))
            for which in ["A", "B"] {
                let layers = model.linearLayers.filter { $0.lora != nil }
                func parameter(_ layer: Linear) -> Matrix { which == "A" ? layer.lora!.a : layer.lora!.b }
                func gradient(_ layer: Linear) -> Matrix { which == "A" ? gradients.a[layer.name]! : gradients.b[layer.name]! }
                var norm2 = 0.0
                for layer in layers { for v in gradient(layer).storage { norm2 += Double(v) * Double(v) } }
                let norm = norm2.squareRoot()
                XCTAssertGreaterThan(norm, 0)
                let h: Float = 1e-2
                func shifted(_ sign: Float) throws -> Double {
                    for layer in layers {
                        let p = parameter(layer), g = gradient(layer)
                        for i in 0..<p.count { p.pointer[i] += sign * h * Float(Double(g.pointer[i]) / norm) }
                    }
                    defer {
                        for layer in layers {
                            let p = parameter(layer), g = gradient(layer)
                            for i in 0..<p.count { p.pointer[i] -= sign * h * Float(Double(g.pointer[i]) / norm) }
                        }
                    }
                    return try model.loss(batch: batch).mean
                }
                let numeric = (try shifted(1) - shifted(-1)) / (2 * Double(h))
                XCTAssertEqual(numeric, norm, accuracy: 0.02 * norm, "lora_\(which), checkpointing \(checkpointing): numeric \(numeric) vs analytic \(norm)")
            }
        }
    }

    func testCheckpointingGivesTheSameGradients() throws {
        let (model, batch) = try modelAndBatch()
        let withRecompute = LoRAGradients(model: model), withoutRecompute = LoRAGradients(model: model)
        for layer in model.linearLayers { layer.lora?.dropout = 0.1 }
        let a = try model.accumulateGradients(batch: batch, into: withRecompute, normalizer: 10, options: .init(gradientCheckpointing: true, dropoutSeed: 7))
        let b = try model.accumulateGradients(batch: batch, into: withoutRecompute, normalizer: 10, options: .init(gradientCheckpointing: false, dropoutSeed: 7))
        XCTAssertEqual(a.sum, b.sum)
        for ((name, g1), (_, g2)) in zip(withRecompute.named, withoutRecompute.named) {
            XCTAssertTrue(g1.values == g2.values, "\(name) differs: relative error \(relativeError(g1.values, g2.values))")
        }
    }
}

/// The fixture's reference run: NF4 base (fp32 compute) with the adapter, train mode, no dropout.
final class NF4ReferenceGradientTests: XCTestCase {
    func check(_ loaded: LoadedModel) throws {
        let model = loaded.model
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        let expected = try LlamaForwardTests.expected()
        let rows = try LlamaForwardTests.inputRows()
        let batch = try BackwardTests.fixtureBatch()
        var ours: [Float] = []
        for row in rows { ours += try model.forward(tokens: row, cache: KVCache(config: model.config, capacity: row.count)) }
        XCTAssertLessThan(relativeError(ours, try expected.floats("logits_nf4_lora")), 1e-4)
        let gradients = LoRAGradients(model: model)
        let loss = try model.accumulateGradients(batch: batch, into: gradients, normalizer: batch.countedTokens)
        let referenceLoss = try expected.floats("loss_nf4_lora")[0]
        XCTAssertEqual(loss.mean, Double(referenceLoss), accuracy: 1e-4 * Double(referenceLoss))
        var checked = 0
        for (name, gradient) in gradients.named {
            let reference = try expected.floats("grad." + name)
            let error = relativeError(gradient.values, reference)
            XCTAssertLessThan(error, 1e-4, "\(name): relative error \(error)")
            checked += 1
        }
        XCTAssertEqual(checked, 28)
    }

    func testPreQuantizedCheckpointMatchesBitsandbytes() throws {
        let loaded = try ModelLoader.load(TestFixtures.path("tiny-llama/base-bnb-nf4"), quantization: .nf4)
        XCTAssertTrue(loaded.isPreQuantized)
        XCTAssertTrue(loaded.model.linearLayers.allSatisfy { $0.weight.isQuantized }, "the base stays 4-bit in memory")
        try check(loaded)
    }

    func testQuantizingOnLoadMatchesBitsandbytes() throws {
        let loaded = try ModelLoader.load(TestFixtures.path("tiny-llama/base"), quantization: .nf4)
        XCTAssertFalse(loaded.isPreQuantized)
        XCTAssertTrue(loaded.model.linearLayers.allSatisfy { $0.weight.isQuantized }, "the base stays 4-bit in memory")
        try check(loaded)
    }
}
