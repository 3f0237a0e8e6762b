import XCTest
@testable import QLoRA

/// The continuous-batching scheduler on the CPU's batched session (the GPU's session runs the same scheduler and is
/// checked against the CPU by qlora-gpu-check): answers equal one prompt at a time, whatever the slots and budgets.
final class ContinuousBatchingTests: XCTestCase {
    private func model(adapter: Bool = true) throws -> DecoderModel {
        let loaded = try ModelLoader.load(TestFixtures.path("tiny-llama/base"), quantization: .none)
        if adapter { _ = try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: loaded.model) }
        return loaded.model
    }

    private func oneAtATime(_ model: DecoderModel, _ prompts: [[Int]], _ sampling: [SamplingOptions], maxTokens: Int,
                            stopIDs: Set<Int>) throws -> [GenerationResult] {
        try zip(prompts, sampling).map {
            try Generator.generate(model: model, prompt: $0, maxTokens: maxTokens, sampling: $1, stopIDs: stopIDs)
        }
    }

    /// 5 prompts of different lengths through 2 slots (packed prefills under a 12-token budget, slots refilled as
    /// answers end, a stop id ending some early): the same answers as one prompt at a time, greedy and sampled
    /// (each prompt with its own seed).
    func testContinuousBatchingMatchesOnePromptAtATime() throws {
        let model = try model()
        let prompts = [[1, 17, 345, 99], [1, 500], [1, 3, 42, 7, 810, 5, 6, 8, 9, 10, 11, 12, 13, 14], [7], [1, 2, 3]]
        let greedy = [SamplingOptions](repeating: SamplingOptions(), count: prompts.count)
        let free = try oneAtATime(model, prompts, greedy, maxTokens: 7, stopIDs: [])
        let stop = free[0].tokens[2]
        let sampled = prompts.indices.map { SamplingOptions(temperature: 1.2, topK: 40, topP: 0.95, seed: 5 + UInt64($0)) }
        let batched = try CPUBatchedSession(model: model, slots: 2, capacity: 32, prefillTokens: 12)
        for sampling in [greedy, sampled] {
            let reference = try oneAtATime(model, prompts, sampling, maxTokens: 7, stopIDs: [stop])
            var finished: [Int] = []
            let result = try BatchScheduler.generate(session: batched, prompts: prompts, sampling: sampling, maxTokens: 7, stopIDs: [stop],
                                                     onAnswer: { i, _ in finished.append(i) })
            XCTAssertEqual(result.answers.map(\.tokens), reference.map(\.tokens), "temperature \(sampling[0].temperature)")
            XCTAssertEqual(result.answers.map(\.stoppedAtEOS), reference.map(\.stoppedAtEOS))
            XCTAssertEqual(finished.sorted(), Array(prompts.indices))
            XCTAssertEqual(result.generatedTokens, reference.reduce(0) { $0 + $1.tokens.count })
            XCTAssertEqual(result.promptTokens, 24)
            XCTAssertTrue(reference[0].stoppedAtEOS || sampling[0].temperature > 0)
        }
        // One slot and a 1-token budget: strictly one sequence after the other, the same answers.
        let one = try CPUBatchedSession(model: model, slots: 1, capacity: 32, prefillTokens: 1)
        XCTAssertEqual(try BatchScheduler.generate(session: one, prompts: prompts, sampling: greedy, maxTokens: 5, stopIDs: []).answers.map(\.tokens),
                       try oneAtATime(model, prompts, greedy, maxTokens: 5, stopIDs: []).map(\.tokens))
    }

    func testBatchedSessionRejectsBadRowsAndPrompts() throws {
        let session = try CPUBatchedSession(model: try model(adapter: false), slots: 2, capacity: 8)
        let greedy = [SamplingOptions()]
        XCTAssertThrowsError(try session.step([BatchRow(token: 1, slot: 2, position: 0)], logitRows: [0]))
        XCTAssertThrowsError(try session.step([BatchRow(token: 1, slot: 0, position: 3)], logitRows: [0]), "a gap in the slot's positions")
        XCTAssertThrowsError(try session.step([BatchRow(token: 1, slot: 0, position: 0)], logitRows: [1]))
        func generate(_ prompts: [[Int]], _ sampling: [SamplingOptions], maxTokens: Int = 2) throws {
            _ = try BatchScheduler.generate(session: session, prompts: prompts, sampling: sampling, maxTokens: maxTokens, stopIDs: [])
        }
        XCTAssertThrowsError(try generate([[1, 2, 3, 4, 5]], greedy, maxTokens: 4), "prompt + max tokens beyond the slot")
        XCTAssertThrowsError(try generate([[1, 5000]], greedy), "a token outside the vocabulary")
        XCTAssertThrowsError(try generate([[]], greedy), "an empty prompt")
        XCTAssertThrowsError(try generate([[1], [2]], greedy), "one sampling option per prompt")
        XCTAssertThrowsError(try generate([[1]], greedy, maxTokens: 0))
        XCTAssertThrowsError(try CPUBatchedSession(model: try model(adapter: false), slots: 0, capacity: 8))
        XCTAssertEqual(try BatchScheduler.generate(session: session, prompts: [], sampling: [], maxTokens: 2, stopIDs: []).answers.count, 0)
    }
}
