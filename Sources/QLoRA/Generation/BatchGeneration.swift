// Answers for a list of prompts: the one path from token prompts to answer texts (eval --generate, the demo's exact
// match, generate --prompts-file, evaluation during training), over any `BatchGenerator` (Backend/Backend.swift).

/// The reference batch generator: one request after the other through an `InferenceSession` (the CPU model's, or the
/// GPU's batch-1 decoder), reusing one session while it is large enough.
public final class SessionBatchGenerator: BatchGenerator {
    public let deviceName: String
    public let maxBatchSize: Int
    let config: DecoderConfig
    let makeSession: (_ capacity: Int) throws -> InferenceSession
    var session: InferenceSession?

    /// `makeSession` makes a session with room for `capacity` positions.
    public init(deviceName: String, config: DecoderConfig, maxBatchSize: Int = 1, makeSession: @escaping (_ capacity: Int) throws -> InferenceSession) {
        self.deviceName = deviceName
        self.config = config
        self.maxBatchSize = max(1, maxBatchSize)
        self.makeSession = makeSession
    }

    /// The CPU model's fp32 forward, one sequence at a time.
    public static func cpu(_ model: DecoderModel) -> SessionBatchGenerator {
        SessionBatchGenerator(deviceName: "cpu", config: model.config) { CPUInferenceSession(model: model, capacity: $0) }
    }

    public func generate(_ requests: [GenerationRequest], maxTokens: Int, stopIDs: Set<Int>) throws -> [GeneratedSequence] {
        guard let longest = requests.map(\.prompt.count).max() else { return [] }
        let capacity = longest + maxTokens
        guard capacity <= config.maxPositionEmbeddings else {
            throw UsageError("the longest prompt (\(longest) tokens) + max new tokens (\(maxTokens)) exceed the model's \(config.maxPositionEmbeddings) positions")
        }
        if session.map({ $0.capacity < capacity }) ?? true { session = try makeSession(capacity) }
        let session = session!
        return try requests.map { request in
            session.reset()
            let result = try Generator.generate(session: session, prompt: request.prompt, maxTokens: maxTokens, sampling: request.sampling,
                                                stopIDs: stopIDs)
            return GeneratedSequence(tokens: result.tokens, stoppedAtEOS: result.stoppedAtEOS)
        }
    }
}

/// One generated answer, decoded.
public struct GeneratedAnswer: Sendable, Equatable {
    /// The answer's text (special tokens skipped).
    public var text: String
    public var tokens: [Int]
    public var stoppedAtEOS: Bool
}

public enum AnswerGeneration {
    /// Answers `prompts` (token ids) with up to `maxTokens` new tokens each, through `generator` in batches of its
    /// `maxBatchSize`. Prompt i samples with seed `sampling.seed + i` (greedy ignores it), so a prompt's answer does
    /// not depend on the batches, and the first prompt's equals `qlora generate --prompt` with the same seed.
    /// `progress(done, total)` is called after each batch.
    public static func generate(prompts: [[Int]], generator: BatchGenerator, tokenizer: Tokenizer, maxTokens: Int,
                                sampling: SamplingOptions, stopIDs: Set<Int>,
                                progress: (Int, Int) -> Void = { _, _ in }) throws -> [GeneratedAnswer] {
        try Generator.validate(maxTokens: maxTokens, sampling: sampling)
        if let empty = prompts.firstIndex(where: \.isEmpty) { throw UsageError("prompt \(empty + 1) is empty") }
        var answers: [GeneratedAnswer] = []
        answers.reserveCapacity(prompts.count)
        var start = 0
        while start < prompts.count {
            let end = min(start + generator.maxBatchSize, prompts.count)
            let requests = (start..<end).map { i in
                var options = sampling
                options.seed = sampling.seed &+ UInt64(i)
                return GenerationRequest(prompt: prompts[i], sampling: options)
            }
            let sequences = try generator.generate(requests, maxTokens: maxTokens, stopIDs: stopIDs)
            guard sequences.count == requests.count else {
                throw UsageError("the \(generator.deviceName) generator returned \(sequences.count) answers for \(requests.count) prompts")
            }
            for s in sequences {
                answers.append(GeneratedAnswer(text: tokenizer.decode(s.tokens, skipSpecialTokens: true), tokens: s.tokens,
                                               stoppedAtEOS: s.stoppedAtEOS))
            }
            start = end
            progress(start, prompts.count)
        }
        return answers
    }
}

extension ComputeDevice {
    /// The batch generator of this device for `model` (with its adapter, unmerged): the CPU's reference (one request
    /// at a time), or on the GPU the continuous-batching decoder (Backend/CUDA/Inference/CUDABatchedInference.swift).
    public func batchGenerator(model: DecoderModel) throws -> BatchGenerator {
        switch self {
        case .cpu:
            return SessionBatchGenerator.cpu(model)
        case .cuda(let context):
            return try CUDABatchedGenerator(context: context, model: model)
        }
    }
}
