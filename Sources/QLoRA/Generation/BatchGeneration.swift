// Answering many prompts at once: the interface evaluation (`eval --generate`), `generate --prompts-file` and the
// demo's exact match use. `SequentialBatchGenerator` answers one prompt after the other on any `InferenceSession`
// (the CPU reference, or the GPU's batch-1 path); `CUDABatchedInference` decodes many sequences together on the GPU.
//
// Sampling: sequence i of a call draws from its own generator, seeded by `SamplingOptions.forSequence(i)` (sequence 0
// with the options' seed itself, so a one-prompt call samples exactly as `Generator.generate`), so an answer does not
// depend on which other prompts share its batch or in which order sequences finish.

/// The answers of one `BatchGenerator.generate` call, in the order of the prompts.
public struct BatchGenerationResult: Sendable {
    /// Per prompt: its tokens (without the stop id) and whether a stop id ended it. The per-answer speeds are the
    /// call's (a batched decoder has no per-sequence clock).
    public var answers: [GenerationResult]
    public var promptTokens: Int
    public var generatedTokens: Int
    /// Wall-clock seconds of the whole call.
    public var seconds: Double

    public var tokensPerSecond: Double { Double(generatedTokens) / max(seconds, 1e-9) }
}

/// Generates answers for many prompts.
public protocol BatchGenerator: AnyObject {
    /// "cpu", "cuda" or "cuda batched", for logs.
    var deviceName: String { get }
    /// Up to `maxTokens` tokens after each prompt (token ids), ending at any id in `stopIDs` (not included), greedy
    /// or sampled as `sampling` says (sequence i with `sampling.forSequence(i)`). `onAnswer(i, answer)` is called as
    /// each prompt's answer is complete (in the order they finish).
    func generate(prompts: [[Int]], maxTokens: Int, sampling: SamplingOptions, stopIDs: Set<Int>,
                  onAnswer: (Int, GenerationResult) -> Void) throws -> BatchGenerationResult
}

extension BatchGenerator {
    public func generate(prompts: [[Int]], maxTokens: Int, sampling: SamplingOptions, stopIDs: Set<Int>) throws -> BatchGenerationResult {
        try generate(prompts: prompts, maxTokens: maxTokens, sampling: sampling, stopIDs: stopIDs, onAnswer: { _, _ in })
    }
}

extension SamplingOptions {
    /// The options of sequence `index` of a batch: the same cuts and temperature, its own seed (the seed itself for
    /// sequence 0; SplitMix64 of seed and index for the others, so neighbouring sequences' streams are unrelated).
    public func forSequence(_ index: Int) -> SamplingOptions {
        var o = self
        if index > 0 {
            var g = SeededGenerator(seed: seed ^ (UInt64(index) &* 0xD1B5_4A32_D192_ED03))
            o.seed = g.next()
        }
        return o
    }
}

/// One prompt after the other on one session (reset before each prompt): the CPU reference of batched generation,
/// and the GPU's batch-1 baseline.
public final class SequentialBatchGenerator: BatchGenerator {
    public let session: InferenceSession
    public let deviceName: String

    public init(session: InferenceSession, deviceName: String) {
        self.session = session
        self.deviceName = deviceName
    }

    public func generate(prompts: [[Int]], maxTokens: Int, sampling: SamplingOptions, stopIDs: Set<Int>,
                         onAnswer: (Int, GenerationResult) -> Void) throws -> BatchGenerationResult {
        try Generator.validate(maxTokens: maxTokens, sampling: sampling)
        let start = monotonicSeconds()
        var answers: [GenerationResult] = []
        for (i, prompt) in prompts.enumerated() {
            session.reset()
            let answer = try Generator.generate(session: session, prompt: prompt, maxTokens: maxTokens, sampling: sampling.forSequence(i),
                                                stopIDs: stopIDs)
            onAnswer(i, answer)
            answers.append(answer)
        }
        return BatchGenerationResult(answers: answers, promptTokens: prompts.reduce(0) { $0 + $1.count },
                                     generatedTokens: answers.reduce(0) { $0 + $1.tokens.count }, seconds: monotonicSeconds() - start)
    }
}
