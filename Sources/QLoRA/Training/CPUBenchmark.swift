// Timing training steps and decoding on the CPU with random weights of a real architecture.

#if canImport(Glibc)
import Glibc
#endif

/// Monotonic seconds.
public func monotonicSeconds() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
}

public struct BenchmarkResult: Sendable {
    public var tokensPerSecond: Double
    public var stepSeconds: Double
    public var usefulTFLOPs: Double
}

public enum CPUBenchmark {
    /// "Useful" FLOPs per trained token as DESIGN.md counts them: forward 2N + input-gradient 2N for
    /// the linear layers and the head, plus attention (QKᵀ and PV, forward and backward: 4·2·T·D per head per token, causal half).
    public static func usefulFlopsPerToken(config c: DecoderConfig, sequenceLength t: Int) -> Double {
        let linear = Double(c.layerCount) * Double(c.hiddenSize * (c.qDim + 2 * c.kvDim) + c.qDim * c.hiddenSize + 3 * c.hiddenSize * c.intermediateSize)
        let head = Double(c.vocabularySize * c.hiddenSize)
        let attention = Double(c.layerCount) * Double(c.headCount * c.headDim) * Double(t) * 2 * 2 / 2
        return 4 * (linear + head) + 2 * attention
    }

    /// Runs `steps` forward+backward passes (after one warm-up) on random tokens.
    public static func training(model: DecoderModel, batch rows: Int, sequenceLength t: Int, steps: Int,
                                checkpointing: Bool = true) throws -> BenchmarkResult {
        var rng = SeededGenerator(seed: 1)
        let tokens = (0..<(rows * t)).map { _ in Int(rng.next() % UInt64(model.config.vocabularySize)) }
        let batch = TrainingBatch(examples: (0..<rows).map { r in (Array(tokens[(r * t)..<((r + 1) * t)]), Array(tokens[(r * t)..<((r + 1) * t)])) },
                                  length: t, padID: 0)
        let gradients = LoRAGradients(model: model)
        let options = TrainingStepOptions(gradientCheckpointing: checkpointing)
        _ = try model.accumulateGradients(batch: batch, into: gradients, normalizer: batch.countedTokens, options: options)
        let start = monotonicSeconds()
        for _ in 0..<steps {
            _ = try model.accumulateGradients(batch: batch, into: gradients, normalizer: batch.countedTokens, options: options)
        }
        let seconds = (monotonicSeconds() - start) / Double(steps)
        let tokensPerSecond = Double(rows * t) / seconds
        return BenchmarkResult(tokensPerSecond: tokensPerSecond, stepSeconds: seconds,
                               usefulTFLOPs: tokensPerSecond * usefulFlopsPerToken(config: model.config, sequenceLength: t) / 1e12)
    }

    /// Batch-1 greedy decode speed after a prompt of `promptLength` tokens.
    public static func decode(model: DecoderModel, promptLength: Int, tokens: Int) throws -> Double {
        let cache = KVCache(config: model.config, capacity: promptLength + tokens + 1)
        var logits = try model.forward(tokens: Array(repeating: 1, count: promptLength), cache: cache, lastOnly: true)
        let start = monotonicSeconds()
        for _ in 0..<tokens {
            let next = logits.withUnsafeBufferPointer { Sampler.argmax($0) }
            logits = try model.forward(tokens: [next], cache: cache, lastOnly: true)
        }
        return Double(tokens) / (monotonicSeconds() - start)
    }
}
