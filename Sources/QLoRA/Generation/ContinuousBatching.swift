// Continuous batching: many prompts answered together on a device that steps many sequences at once (the GPU's
// `CUDABatchedInference`; `CPUBatchedSession` is the CPU's reference of the same steps). `BatchScheduler` admits
// waiting prompts into free KV-cache slots (their prompts packed into one prefill step), advances every running
// sequence one token per decode step, and hands a finished sequence's slot to the next waiting prompt.
// longrope (Phi-3): a sequence whose keys were rotated with the short factors and whose next token passes
// original_max_position_embeddings is fed again from position 0, all its tokens in a prefill step (rotated with the long
// factors), as batch-1 generation and transformers recompute its cache; its answer goes on from the logits of that step.
//
// Answers do not depend on the batching: prompt i is answered with its own `SamplingOptions` (its own seed, so its own
// `Sampler` stream), fed the logits of its own sequence, ending at its first stop id (not included) or after
// `maxTokens` tokens, as `Generator.generate(session:...)` answers it alone. (The batch interface of evaluation,
// `BatchGenerator` with per-request sampling, maps onto `BatchScheduler.generate` one to one.)

/// The answers of one `BatchScheduler.generate` call, in the order of the prompts.
public struct BatchedAnswers: Sendable {
    /// Per prompt: its tokens (without the stop id) and whether a stop id ended it; the speeds are the call's
    /// (a batched decoder has no per-sequence clock).
    public var answers: [GenerationResult]
    public var promptTokens: Int
    public var generatedTokens: Int
    /// Wall-clock seconds of the whole call.
    public var seconds: Double

    public var tokensPerSecond: Double { Double(generatedTokens) / max(seconds, 1e-9) }
}

// MARK: - Continuous batching

/// One row of a batched step: `token` of the sequence held in KV-cache slot `slot`, at `position` (that sequence's
/// KV length before the token).
public struct BatchRow: Sendable, Equatable {
    public var token: Int
    public var slot: Int
    public var position: Int
    public init(token: Int, slot: Int, position: Int) {
        self.token = token
        self.slot = slot
        self.position = position
    }
}

/// A model with one KV cache per sequence slot, stepping many sequences at once (the GPU's `CUDABatchedInference`,
/// the CPU's `CPUBatchedSession`). `BatchScheduler` drives it.
public protocol BatchedSession: AnyObject {
    var config: DecoderConfig { get }
    /// Sequences held at once.
    var slots: Int { get }
    /// Positions per slot.
    var capacity: Int { get }
    /// Prompt tokens one prefill step packs at most (a longer prompt that fits `capacity` runs alone).
    var prefillTokens: Int { get }
    /// Runs `rows` (each appends its k and v to its slot at its position; a row at position 0 starts its slot anew)
    /// and keeps the logits of the rows listed in `logitRows` (indices into `rows`, at most `slots`).
    func step(_ rows: [BatchRow], logitRows: [Int]) throws
    /// The argmax (first on ties) of the first `count` kept logit rows.
    func greedyTokens(count: Int) throws -> [Int]
    /// The first `count` kept logit rows, [count, vocab].
    func keptLogits(count: Int) throws -> [Float]
}

/// Continuous batching over a `BatchedSession`: waiting prompts are admitted into free slots (their prompts packed
/// into one prefill step up to the session's budget), every running sequence then advances one token per decode
/// step, and a sequence that ends frees its slot for the next waiting prompt. Each sequence samples with its own
/// options and generator, so its answer does not depend on when it ran or beside which others.
public enum BatchScheduler {
    struct Running {
        let index: Int
        let slot: Int
        var length: Int          // tokens in its KV cache
        var next = 0             // the last picked token, fed by the next decode step
        var tokens: [Int] = []
        var sampler: Sampler
        var usesLongRopeFactors: Bool   // whether its cache was rotated with longrope's long factors
    }

    /// Answers `prompts` (token ids), prompt i sampled with `sampling[i]` (greedy at temperature 0); `onAnswer(i, answer)`
    /// is called as each answer is complete (in the order they finish).
    public static func generate(session: BatchedSession, prompts: [[Int]], sampling: [SamplingOptions], maxTokens: Int, stopIDs: Set<Int>,
                                onAnswer: (Int, GenerationResult) -> Void = { _, _ in }) throws -> BatchedAnswers {
        guard sampling.count == prompts.count else {
            throw UsageError("\(sampling.count) sampling options for \(prompts.count) prompts")
        }
        for options in sampling { try Generator.validate(maxTokens: maxTokens, sampling: options) }
        let vocab = session.config.vocabularySize, slots = session.slots
        for (i, prompt) in prompts.enumerated() {
            guard !prompt.isEmpty else { throw UsageError("prompt \(i + 1) is empty") }
            guard prompt.count + maxTokens <= session.capacity else {
                throw UsageError("prompt \(i + 1) (\(prompt.count) tokens) + max tokens (\(maxTokens)) exceed the \(session.capacity) positions of a batched sequence slot")
            }
            if let bad = prompt.first(where: { $0 < 0 || $0 >= vocab }) {
                throw UsageError("prompt \(i + 1): token id \(bad) is outside the vocabulary (0..<\(vocab))")
            }
        }
        let start = monotonicSeconds()
        var answers = [GenerationResult?](repeating: nil, count: prompts.count)
        var waiting = prompts.indices.makeIterator()
        var nextWaiting = waiting.next()
        var freeSlots = Array((0..<slots).reversed())
        var running: [Running] = []
        /// Sequences to feed again from position 0 (longrope's switch), with the token that made them switch.
        var refeeding: [Running] = []
        var generated = 0
        let config = session.config

        /// Picks each listed sequence's next token from the kept logit rows 0..<n; returns those still running.
        func pick(_ sequences: [Running]) throws -> [Running] {
            var sequences = sequences
            let n = sequences.count
            var chosen = try session.greedyTokens(count: n)  // argmax on the device: 4 bytes a sequence come back
            if sequences.contains(where: { $0.sampler.options.temperature > 0 }) {
                let rows = try session.keptLogits(count: n)
                for i in 0..<n where sequences[i].sampler.options.temperature > 0 {
                    chosen[i] = sequences[i].sampler.next(Array(rows[(i * vocab)..<((i + 1) * vocab)]))
                }
            }
            var still: [Running] = []
            for (sequence, token) in zip(sequences, chosen) {
                var s = sequence
                let stopped = stopIDs.contains(token)
                if !stopped {
                    s.tokens.append(token)
                    generated += 1
                }
                if stopped || s.tokens.count == maxTokens {
                    let answer = GenerationResult(tokens: s.tokens, stoppedAtEOS: stopped, promptTokensPerSecond: 0, decodeTokensPerSecond: 0)
                    answers[s.index] = answer
                    onAnswer(s.index, answer)
                    freeSlots.append(s.slot)
                } else {
                    s.next = token
                    still.append(s)
                }
            }
            return still
        }

        while nextWaiting != nil || !running.isEmpty || !refeeding.isEmpty {
            // Feed switching sequences again, then admit waiting prompts into free slots, packed up to the prefill budget.
            var admitted: [Running] = [], rows: [BatchRow] = [], logitRows: [Int] = []
            func fits(_ count: Int) -> Bool { rows.isEmpty || rows.count + count <= session.prefillTokens }
            while let s = refeeding.first, fits(s.length + 1) {
                refeeding.removeFirst()
                for (p, token) in (prompts[s.index] + s.tokens).enumerated() { rows.append(BatchRow(token: token, slot: s.slot, position: p)) }
                logitRows.append(rows.count - 1)
                var fed = s
                fed.length += 1
                fed.usesLongRopeFactors = true
                admitted.append(fed)
            }
            while refeeding.isEmpty, let i = nextWaiting, let slot = freeSlots.last, fits(prompts[i].count) {
                freeSlots.removeLast()
                for (p, token) in prompts[i].enumerated() { rows.append(BatchRow(token: token, slot: slot, position: p)) }
                logitRows.append(rows.count - 1)
                admitted.append(Running(index: i, slot: slot, length: prompts[i].count, sampler: Sampler(sampling[i]),
                                        usesLongRopeFactors: config.usesLongRopeFactors(sequenceLength: prompts[i].count)))
                nextWaiting = waiting.next()
            }
            if !admitted.isEmpty {
                try session.step(rows, logitRows: logitRows)
                running += try pick(admitted)
            }
            // A sequence whose next token passes longrope's original length on short-factor keys waits to be fed again.
            let switching = running.filter { !$0.usesLongRopeFactors && config.usesLongRopeFactors(sequenceLength: $0.length + 1) }
            if !switching.isEmpty {
                refeeding += switching
                running.removeAll { !$0.usesLongRopeFactors && config.usesLongRopeFactors(sequenceLength: $0.length + 1) }
            }
            if !running.isEmpty {
                try session.step(running.map { BatchRow(token: $0.next, slot: $0.slot, position: $0.length) }, logitRows: Array(running.indices))
                for i in running.indices { running[i].length += 1 }
                running = try pick(running)
            }
        }
        let seconds = monotonicSeconds() - start
        let rate = Double(generated) / max(seconds, 1e-9)
        return BatchedAnswers(answers: answers.map { a in
            var a = a!
            a.decodeTokensPerSecond = rate
            return a
        }, promptTokens: prompts.reduce(0) { $0 + $1.count }, generatedTokens: generated, seconds: seconds)
    }
}

/// The CPU's batched session: the model's fp32 forward with a KV cache per slot, each slot's rows run in order (the
/// reference of the scheduler; the GPU's session runs the same rows as one step, and refuses the same rows).
public final class CPUBatchedSession: BatchedSession {
    public let model: DecoderModel
    public let slots: Int
    public let capacity: Int
    public let prefillTokens: Int
    let caches: [KVCache]
    var kept: [[Float]] = []

    public init(model: DecoderModel, slots: Int, capacity: Int, prefillTokens: Int = 2048) throws {
        guard slots > 0, capacity > 0, prefillTokens > 0 else {
            throw UsageError("a batched session needs positive slots, capacity and prefill budget (got \(slots), \(capacity), \(prefillTokens))")
        }
        self.model = model
        self.slots = slots
        self.capacity = capacity
        self.prefillTokens = prefillTokens
        caches = (0..<slots).map { _ in KVCache(config: model.config, capacity: capacity) }
    }

    public var config: DecoderConfig { model.config }

    public func step(_ rows: [BatchRow], logitRows: [Int]) throws {
        var logits: [Int: [Float]] = [:]
        var seen = Set<Int>()
        var i = 0
        while i < rows.count {
            // A run of rows of one slot at consecutive positions goes through one forward.
            var j = i + 1
            while j < rows.count && rows[j].slot == rows[i].slot && rows[j].position == rows[j - 1].position + 1 { j += 1 }
            let slot = rows[i].slot
            guard slot >= 0 && slot < slots else { throw UsageError("row \(i): slot \(slot) outside 0..<\(slots)") }
            guard seen.insert(slot).inserted else {
                throw UsageError("row \(i): slot \(slot) has two runs in one step (its rows must be consecutive, at consecutive positions)")
            }
            let cache = caches[slot]
            if rows[i].position == 0 { cache.reset() }
            guard rows[i].position == cache.length else {
                throw UsageError("row \(i): position \(rows[i].position) of slot \(slot), whose cache holds \(cache.length)")
            }
            // As the GPU's session: a sequence does not pass longrope's switch on short-factor keys (the scheduler feeds it again).
            if rows[i].position > 0 && config.usesLongRopeFactors(sequenceLength: rows[j - 1].position + 1) != cache.usesLongRopeFactors {
                throw UsageError("row \(i): slot \(slot) passes longrope's original_max_position_embeddings (\(config.ropeScaling.originalMaxPositionEmbeddings)) at position \(rows[j - 1].position); its keys were rotated with the short factors, so its sequence must be fed again from position 0 (BatchScheduler does)")
            }
            // Only the run's last row wanted (as the scheduler asks): the forward generation runs, lastOnly.
            let vocab = config.vocabularySize
            let lastOnly = !logitRows.contains { $0 >= i && $0 < j - 1 }
            let out = try model.forward(tokens: rows[i..<j].map(\.token), cache: cache, lastOnly: lastOnly)
            if lastOnly {
                logits[j - 1] = out
            } else {
                for r in i..<j { logits[r] = Array(out[((r - i) * vocab)..<((r - i + 1) * vocab)]) }
            }
            i = j
        }
        kept = try logitRows.map { r in
            guard let row = logits[r] else { throw UsageError("logit row \(r) outside the step's \(rows.count) rows") }
            return row
        }
    }

    public func greedyTokens(count: Int) throws -> [Int] {
        kept.prefix(count).map { row in row.withUnsafeBufferPointer { Sampler.argmax($0) } }
    }

    public func keptLogits(count: Int) throws -> [Float] { Array(kept.prefix(count).joined()) }
}
