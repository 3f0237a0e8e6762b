// Timing QLoRA training steps on the GPU with random NF4 weights of a real architecture (made on the GPU).

#if canImport(Glibc)
import Glibc
#endif

public struct CUDABenchmarkResult {
    public var tokensPerSecond: Double
    public var stepSeconds: Double
    /// Device time of the optimizer's part of a step (clipping, the update, the bf16 copies; a paged kind's copies
    /// that the device stream waits for), timed steps averaged (CUDA events).
    public var optimizerSeconds: Double
    public var usefulTFLOPs: Double
    /// The same rate counted as ../shared/bench/reference_qlora.py counts it (attention 12·s·heads·D per token and
    /// layer, no causal halving), for a like-for-like column beside the reference stack.
    public var usefulTFLOPsReferenceFormula: Double
    /// The caching allocator's high-water mark of live bytes, and of bytes obtained from the driver.
    public var peakAllocatedBytes: Int
    public var peakReservedBytes: Int
    /// total − free from cuMemGetInfo after the timed steps (includes the CUDA context and libraries).
    public var driverUsedBytes: Int
    public var plan: CUDAMemoryPlan
    public var firstLoss: Double
    public var lastLoss: Double
}

public enum CUDABenchmark {
    /// FLOPs per token as reference_qlora.py counts them: 4·(linear + head parameters) + 12·s·heads·D·layers.
    public static func referenceFlopsPerToken(config c: DecoderConfig, sequenceLength t: Int) -> Double {
        let linear = Double(c.layerCount) * Double(c.hiddenSize * (c.qDim + 2 * c.kvDim) + c.qDim * c.hiddenSize
                                                   + 3 * c.hiddenSize * c.intermediateSize)
        let head = Double(c.vocabularySize * c.hiddenSize)
        return 4 * (linear + head) + 12 * Double(t) * Double(c.headCount * c.headDim * c.layerCount)
    }

    /// Builds a random-weight trainer and runs `warmupSteps` then `steps` timed training steps (forward, backward,
    /// clipping at 1.0, AdamW) on random tokens, with LoRA dropout `dropout` (a new mask seed each step); one host
    /// synchronisation per timed run. `memory`: where checkpoints and the embedding live (nil: the automatic choice).
    /// `optimizer`: the kind a `CUDAOptimizer` steps with, as the Trainer does (its state is its own, a paged kind's in
    /// pinned host memory); nil: the trainer's own fused fp32 AdamW (`optimizerStep`).
    public static func training(context: CUDAContext, config: DecoderConfig, batch rows: Int, sequenceLength t: Int, rank: Int,
                                dropout: Float = 0, memory: CUDATrainerMemoryOptions? = nil, optimizer kind: OptimizerKind? = nil,
                                warmupSteps: Int, steps: Int) throws -> CUDABenchmarkResult {
        context.allocator.resetPeak()
        let trainer = try CUDADecoderTrainer(context: context, randomConfig: config, rank: rank, alpha: Double(2 * rank),
                                           capacityTokens: rows * t, dropout: dropout, memory: memory, optimizer: kind)
        let optimizer = try kind.map { try CUDAOptimizer(context: context, kind: $0) }
        var rng = SeededGenerator(seed: 1)
        let tokens = (0..<(rows * t)).map { _ in Int(rng.next() % UInt64(config.vocabularySize)) }
        let batch = TrainingBatch(examples: (0..<rows).map { r in
            (Array(tokens[(r * t)..<((r + 1) * t)]), Array(tokens[(r * t)..<((r + 1) * t)]))
        }, length: t, padID: 0)
        var stepIndex: UInt64 = 0
        // Per timed step: events before and after the optimizer's part on the device stream.
        var marks: [(CUDAEvent, CUDAEvent)] = []
        func step(timed: Bool = false) throws {
            stepIndex += 1
            try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens, dropoutSeed: stepIndex)
            if timed {
                marks.append((try CUDAEvent(device: context.device), try CUDAEvent(device: context.device)))
                try marks[marks.count - 1].0.record(on: context.device.stream)
            }
            defer { if timed { try? marks[marks.count - 1].1.record(on: context.device.stream) } }
            if let optimizer {
                try trainer.clipGradients(maxNorm: 1)
                try optimizer.step(trainer.parameterSlots(), learningRate: 2e-4)
                try trainer.refreshParameterCopies()
            } else {
                try trainer.optimizerStep(learningRate: 2e-4, maxGradNorm: 1)
            }
        }
        for _ in 0..<warmupSteps { try step() }
        let first = warmupSteps > 0 ? try trainer.lastLoss().mean : .nan
        try context.device.synchronize()
        let start = monotonicSeconds()
        for _ in 0..<steps { try step(timed: true) }
        try context.device.synchronize()
        let seconds = (monotonicSeconds() - start) / Double(steps)
        let optimizerSeconds = try marks.reduce(0.0) { $0 + (try $1.1.milliseconds(since: $1.0)) } / 1000 / Double(max(steps, 1))
        let last = try trainer.lastLoss().mean
        let info = try context.device.memoryInfo()
        let tokensPerSecond = Double(rows * t) / seconds
        return CUDABenchmarkResult(
            tokensPerSecond: tokensPerSecond, stepSeconds: seconds, optimizerSeconds: optimizerSeconds,
            usefulTFLOPs: tokensPerSecond * CPUBenchmark.usefulFlopsPerToken(config: config, sequenceLength: t) / 1e12,
            usefulTFLOPsReferenceFormula: tokensPerSecond * referenceFlopsPerToken(config: config, sequenceLength: t) / 1e12,
            peakAllocatedBytes: context.allocator.peakBytes, peakReservedBytes: context.allocator.peakReservedBytes,
            driverUsedBytes: info.total - info.free, plan: trainer.plan, firstLoss: first, lastLoss: last)
    }
}
