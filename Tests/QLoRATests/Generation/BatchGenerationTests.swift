import XCTest
@testable import QLoRA

/// The batch interface's CPU side: per-sequence sampling seeds and the sequential reference generator (the GPU's
/// batched decoder is checked against it by qlora-gpu-check).
final class BatchGenerationTests: XCTestCase {
    func testSequenceSeeds() {
        let options = SamplingOptions(temperature: 0.7, topK: 5, topP: 0.9, seed: 1234)
        XCTAssertEqual(options.forSequence(0).seed, 1234, "sequence 0 samples as Generator.generate does")
        let seeds = (0..<500).map { options.forSequence($0).seed }
        XCTAssertEqual(Set(seeds).count, seeds.count, "every sequence has its own stream")
        XCTAssertEqual(options.forSequence(7).seed, options.forSequence(7).seed)
        XCTAssertNotEqual(options.forSequence(7).seed, SamplingOptions(seed: 1235).forSequence(7).seed)
        let o = options.forSequence(3)
        XCTAssertEqual([o.temperature, o.topP], [0.7, 0.9])
        XCTAssertEqual(o.topK, 5)
    }

    func testSequentialGeneratorAnswersEachPromptAsGenerate() throws {
        let loaded = try ModelLoader.load(TestFixtures.path("tiny-llama/base"), quantization: .none)
        let model = loaded.model
        let prompts = [[1, 17, 345], [1, 99, 500, 3, 42, 7, 810, 5, 6], [2]]
        let session = CPUInferenceSession(model: model, capacity: 32)
        let generator = SequentialBatchGenerator(session: session, deviceName: "cpu")
        for sampling in [SamplingOptions(), SamplingOptions(temperature: 0.9, topK: 50, seed: 9)] {
            var order: [Int] = []
            let result = try generator.generate(prompts: prompts, maxTokens: 6, sampling: sampling, stopIDs: [], onAnswer: { i, _ in order.append(i) })
            XCTAssertEqual(order, [0, 1, 2])
            XCTAssertEqual(result.promptTokens, 13)
            XCTAssertEqual(result.generatedTokens, 18)
            for (i, prompt) in prompts.enumerated() {
                let alone = try Generator.generate(model: model, prompt: prompt, maxTokens: 6, sampling: sampling.forSequence(i), stopIDs: [])
                XCTAssertEqual(result.answers[i].tokens, alone.tokens, "prompt \(i)")
            }
        }
        // A stop id ends an answer early and is not part of it.
        let free = try generator.generate(prompts: prompts, maxTokens: 6, sampling: SamplingOptions(), stopIDs: [])
        let stop = free.answers[1].tokens[2]
        let stopped = try generator.generate(prompts: prompts, maxTokens: 6, sampling: SamplingOptions(), stopIDs: [stop])
        XCTAssertTrue(stopped.answers[1].stoppedAtEOS)
        XCTAssertEqual(stopped.answers[1].tokens, Array(free.answers[1].tokens.prefix { $0 != stop }))
        XCTAssertFalse(stopped.answers[1].tokens.contains(stop))
    }

    func testSequentialGeneratorRejectsBadInput() throws {
        let loaded = try ModelLoader.load(TestFixtures.path("tiny-llama/base"), quantization: .none)
        let generator = SequentialBatchGenerator(session: CPUInferenceSession(model: loaded.model, capacity: 8), deviceName: "cpu")
        XCTAssertThrowsError(try generator.generate(prompts: [[1, 2]], maxTokens: 0, sampling: SamplingOptions(), stopIDs: []))
        XCTAssertThrowsError(try generator.generate(prompts: [[1, 2], []], maxTokens: 2, sampling: SamplingOptions(), stopIDs: []))
        XCTAssertThrowsError(try generator.generate(prompts: [[1, 2, 3, 4, 5]], maxTokens: 4, sampling: SamplingOptions(), stopIDs: []))
    }
}
