// Autoregressive generation with a KV cache: prefill the prompt, then one token at a time.

public struct GenerationResult: Sendable {
    public var tokens: [Int]
    /// Why generation ended.
    public var stoppedAtEOS: Bool
    public var promptTokensPerSecond: Double
    public var decodeTokensPerSecond: Double
}

public enum Generator {
    /// Generates up to `maxTokens` tokens after `prompt`, calling `onToken` with each as it comes.
    /// Stops at any id in `stopIDs` (which is not passed to `onToken`).
    public static func generate(model: DecoderModel, prompt: [Int], maxTokens: Int, sampling: SamplingOptions,
                                stopIDs: Set<Int>, onToken: (Int) -> Void = { _ in }) throws -> GenerationResult {
        try validate(maxTokens: maxTokens, sampling: sampling)
        let capacity = prompt.count + maxTokens
        guard capacity <= model.config.maxPositionEmbeddings else {
            throw UsageError("prompt (\(prompt.count) tokens) + max tokens (\(maxTokens)) exceed the model's \(model.config.maxPositionEmbeddings) positions")
        }
        return try generate(session: CPUInferenceSession(model: model, capacity: capacity), prompt: prompt, maxTokens: maxTokens,
                            sampling: sampling, stopIDs: stopIDs, onToken: onToken)
    }

    /// The same on any backend's session (which must have room for the prompt and `maxTokens`).
    public static func generate(session: InferenceSession, prompt: [Int], maxTokens: Int, sampling: SamplingOptions,
                                stopIDs: Set<Int>, onToken: (Int) -> Void = { _ in }) throws -> GenerationResult {
        try validate(maxTokens: maxTokens, sampling: sampling)
        guard !prompt.isEmpty else { throw UsageError("the prompt is empty") }
        guard session.length + prompt.count + maxTokens <= session.capacity else {
            throw UsageError("prompt (\(prompt.count) tokens) + max tokens (\(maxTokens)) exceed the session's \(session.capacity - session.length) free positions")
        }
        var sampler = Sampler(sampling)
        let start = monotonicSeconds()
        var logits = try session.next(prompt)
        let prefillSeconds = monotonicSeconds() - start
        var out: [Int] = []
        var stopped = false
        let decodeStart = monotonicSeconds()
        while out.count < maxTokens {
            let next = sampler.next(logits)
            if stopIDs.contains(next) { stopped = true; break }
            out.append(next)
            onToken(next)
            if out.count == maxTokens { break }
            logits = try session.next([next])
        }
        let decodeSeconds = monotonicSeconds() - decodeStart
        return GenerationResult(tokens: out, stoppedAtEOS: stopped, promptTokensPerSecond: Double(prompt.count) / max(prefillSeconds, 1e-9),
                                decodeTokensPerSecond: Double(out.count) / max(decodeSeconds, 1e-9))
    }

    /// The options' ranges: checked before anything is allocated (a negative count would size a cache of 2^64 bytes).
    public static func validate(maxTokens: Int, sampling: SamplingOptions) throws {
        guard maxTokens > 0 else { throw UsageError("max_tokens (--max-tokens) must be a positive integer, got \(maxTokens)") }
        try sampling.validate()
    }

    /// The ids that end generation: the config's eos ids and the tokenizer's eos token.
    public static func stopIDs(config: DecoderConfig, tokenizer: Tokenizer) -> Set<Int> {
        var ids = Set(config.eosTokenIDs)
        if let eos = tokenizer.eosTokenID { ids.insert(eos) }
        return ids
    }
}
