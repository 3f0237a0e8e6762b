// Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

#if canImport(Glibc)
import Glibc
#endif

/// A small, seedable generator (SplitMix64) so that sampling and training are reproducible from a seed.
public struct SeededGenerator: RandomNumberGenerator, Sendable, Equatable {
    public private(set) var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits.
    public mutating func nextFloat() -> Float { Float(next() >> 40) * (1.0 / 16_777_216.0) }
}

public struct SamplingOptions: Sendable, Equatable {
    /// 0 means greedy.
    public var temperature: Float = 0
    /// 0 means no top-k cut.
    public var topK: Int = 0
    /// 1 means no nucleus cut.
    public var topP: Float = 1
    public var seed: UInt64 = 0

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
    }

    /// Rejects values the sampler cannot honour (as transformers' logits processors do), naming the option.
    public func validate() throws {
        guard temperature.isFinite && temperature >= 0 else {
            throw UsageError("temperature (--temperature) must be a finite number >= 0 (0: greedy), got \(temperature)")
        }
        guard topK >= 0 else { throw UsageError("top_k (--top-k) must be a non-negative integer (0: no cut), got \(topK)") }
        guard topP.isFinite && topP > 0 && topP <= 1 else {
            throw UsageError("top_p (--top-p) must be in (0, 1] (1: no cut), got \(topP)")
        }
    }
}

public struct Sampler {
    public let options: SamplingOptions
    var generator: SeededGenerator

    public init(_ options: SamplingOptions) {
        self.options = options
        generator = SeededGenerator(seed: options.seed)
    }

    /// The index of the largest logit (the first one on ties, as torch.argmax does).
    public static func argmax(_ logits: UnsafeBufferPointer<Float>) -> Int {
        var best = 0
        for i in logits.indices where logits[i] > logits[best] { best = i }
        return best
    }

    /// Picks the next token. Order as transformers' logits processors: temperature, top-k, top-p.
    public mutating func next(_ logits: [Float]) -> Int {
        if options.temperature <= 0 { return logits.withUnsafeBufferPointer { Self.argmax($0) } }
        var candidates = logits.indices.map { (id: $0, logit: logits[$0] / options.temperature) }
        candidates.sort { $0.logit > $1.logit }
        if options.topK > 0 && options.topK < candidates.count { candidates.removeLast(candidates.count - options.topK) }
        let maximum = candidates[0].logit
        var probabilities = candidates.map { expf($0.logit - maximum) }
        let total = probabilities.reduce(0, +)
        for i in probabilities.indices { probabilities[i] /= total }
        if options.topP < 1 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            var mass: Float = 0
            var keep = 0
            while keep < probabilities.count {
                mass += probabilities[keep]
                keep += 1
                if mass >= options.topP { break }
            }
            probabilities.removeLast(probabilities.count - keep)
            candidates.removeLast(candidates.count - keep)
            let kept = probabilities.reduce(0, +)
            for i in probabilities.indices { probabilities[i] /= kept }
        }
        var u = generator.nextFloat()
        for (i, p) in probabilities.enumerated() {
            if u < p { return candidates[i].id }
            u -= p
        }
        return candidates[candidates.count - 1].id
    }
}
