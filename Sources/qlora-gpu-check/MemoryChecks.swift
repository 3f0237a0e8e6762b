// Memory checks (called from main.swift): where the GPU trainer keeps its checkpoints and its embedding must change
// where data lives and nothing else, since the same kernels run on the same values.
//   memory: offload bit-identical (fixture)   tiny-llama (2 blocks, untied): all on the GPU vs checkpoints offloaded
//                                             through 2 slots (x₀ goes to the host and back), vs the embedding
//                                             gathered on the host, vs both: every loss sum, every LoRA gradient,
//                                             the parameters after AdamW steps and the evaluation loss, bit for bit
//   memory: offload bit-identical (random)    random weights, 6 blocks, untied, LoRA dropout 0.1, two micro-batches
//                                             per step: the same with 2 and 3 slots, the host embedding, and a run
//                                             queued without any host synchronisation between steps (a missing
//                                             event wait shows up as a difference here, or run it under
//                                             compute-sanitizer), and the dropout masks hashed again by the backward
//                                             instead of kept from the forward; a tied embedding stays on the GPU
//   memory: peak allocator bytes              the SmolLM2-135M shape made untied, 2 × 512 tokens: the allocator's peak
//                                             over construction and a step drops by exactly what the plan says
//                                             ((L + 1 − 3) checkpoints for offloading, the [V, H] table for the host
//                                             embedding), and is within 1 MiB of the plan less cuBLASLt's 32 MiB
//                                             workspace (made once per context; the plan leaves out a few small
//                                             buffers: the absmax code map, RoPE frequencies, the loss sum); a
//                                             trainer made for adamw or paged_adamw_8bit allocates no moments of its
//                                             own, and the peak over a step with that CUDAOptimizer drops by what
//                                             the plan says (paged: only a staging buffer on the GPU)
// Bit-identical needs deterministic kernels: the trainers run with `deterministic` attention (the flash backward's
// dQ atomics would vary the last bits), and the all-on-GPU run is repeated to show it reproduces itself.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// What a short run produced, as bit patterns.
struct MemoryRunRecord: Equatable {
    /// Loss sums and counts of every forwardBackward (empty when the run did not synchronise between steps).
    var losses: [UInt64] = []
    /// All LoRA gradients after each optimizer step's micro-batches (only the last step's without synchronising).
    var gradients: [[UInt32]] = []
    /// The evaluation loss after the last step and the fp32 LoRA masters.
    var evaluation: [UInt64] = []
    var parameters: [UInt32] = []

    /// How many values differ from `other` (arrays of other lengths count as all different).
    func differences(from other: MemoryRunRecord) -> Int {
        func count<T: Equatable>(_ a: [T], _ b: [T]) -> Int {
            a.count == b.count ? zip(a, b).filter { $0 != $1 }.count : max(a.count, b.count)
        }
        var n = count(losses, other.losses) + count(evaluation, other.evaluation) + count(parameters, other.parameters)
        n += gradients.count == other.gradients.count ? zip(gradients, other.gradients).map { count($0, $1) }.reduce(0, +)
            : max(gradients.count, other.gradients.count)
        return n
    }
}

/// Runs `steps` optimizer steps of `batches` (the first full, the others accumulated), AdamW without clipping, with
/// a dropout seed per step when `dropout`; records every loss and gradient when `synchronise`, else queues all the
/// steps before reading anything back.
func recordMemoryRun(_ trainer: CUDADecoderTrainer, batches: [TrainingBatch], steps: Int, dropout: Bool,
                     synchronise: Bool = true) throws -> MemoryRunRecord {
    var record = MemoryRunRecord()
    func flat(_ pairs: [(name: String, a: [Float], b: [Float])]) -> [UInt32] { pairs.flatMap { ($0.a + $0.b).map(\.bitPattern) } }
    let normalizer = max(batches.map(\.countedTokens).reduce(0, +), 1)
    for step in 0..<steps {
        for (i, batch) in batches.enumerated() {
            try trainer.forwardBackward(batch: batch, normalizer: normalizer, accumulate: i > 0, dropoutSeed: dropout ? UInt64(step + 1) : nil)
            if synchronise {
                let loss = try trainer.lastLoss()
                record.losses += [loss.sum.bitPattern, UInt64(loss.count)]
            }
        }
        if synchronise || step == steps - 1 { record.gradients.append(flat(try trainer.loraGradients())) }
        try trainer.optimizerStep(learningRate: 2e-3, maxGradNorm: nil)
    }
    try trainer.forwardLoss(batch: batches[0])
    let loss = try trainer.lastLoss()
    record.evaluation = [loss.sum.bitPattern, UInt64(loss.count)]
    record.parameters = flat(try trainer.loraParameters())
    return record
}

/// The batch's first `rows` rows as a batch of their own.
func firstRows(_ batch: TrainingBatch, _ rows: Int) -> TrainingBatch {
    let r = min(rows, batch.rows), n = r * batch.length
    return TrainingBatch(rows: r, length: batch.length, tokens: Array(batch.tokens[0..<n]), labels: Array(batch.labels[0..<n]),
                         positions: Array(batch.positions[0..<n]), exampleStarts: Array(batch.exampleStarts[0..<n]))
}

/// The memory checks' measurement: a trainer's peak allocator bytes, above what was allocated before it, over a
/// forward and backward, an optimizer step (the trainer's own unless `step` is given) and a forward-only loss, on a
/// 2 × 512-token batch of the untied SmolLM2-135M shape (random weights) — what the plan must equal.
struct PeakMeasurement {
    let config: DecoderConfig
    let tokens: Int
    let batch: TrainingBatch

    init() throws {
        var config = Architecture.smollm2_135m.config
        config.tieWordEmbeddings = false
        let rows = 2, length = 512
        let examples = randomExamples(count: rows, length: length, vocab: config.vocabularySize, seed: 3)
        (self.config, tokens) = (config, rows * length)
        batch = TrainingBatch(examples: examples.map { ($0.tokens, $0.labels) }, length: length, padID: 0)
        _ = try ctx.blas()  // its workspace is made once per context, before any measurement
    }

    func peak(_ make: () throws -> CUDADecoderTrainer, dropoutSeed: UInt64? = nil,
              step: ((CUDADecoderTrainer) throws -> Void)? = nil) throws -> (bytes: Int, plan: CUDAMemoryPlan, trainer: CUDADecoderTrainer) {
        let A = ctx.allocator
        try ctx.device.synchronize()
        A.resetPeak()
        let base = A.currentBytes
        let trainer = try make()
        try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens, dropoutSeed: dropoutSeed)
        if let step { try step(trainer) } else { try trainer.optimizerStep(learningRate: 1e-4) }
        try trainer.forwardLoss(batch: batch)
        _ = try trainer.lastLoss()
        return (A.peakBytes - base, trainer.plan, trainer)
    }
}

func runMemoryChecks(_ ctx: CUDAContext) {
    let directory = fixtureDirectory()
    let offload2 = CUDATrainerMemoryOptions(offloadCheckpoints: true, checkpointSlots: 2, hostEmbedding: false)
    let offload3 = CUDATrainerMemoryOptions(offloadCheckpoints: true, checkpointSlots: 3, hostEmbedding: false)
    let hostOnly = CUDATrainerMemoryOptions(offloadCheckpoints: false, hostEmbedding: true)
    let both2 = CUDATrainerMemoryOptions(offloadCheckpoints: true, checkpointSlots: 2, hostEmbedding: true)
    let both3 = CUDATrainerMemoryOptions(offloadCheckpoints: true, checkpointSlots: 3, hostEmbedding: true)
    // The reference (allOnDevice) keeps a block's dequantized weights for its backward; this dequantizes them again.
    let dequantizeAgain = CUDATrainerMemoryOptions(offloadCheckpoints: false, hostEmbedding: false, keepBlockWeights: false)
    // Every block's attention output and lse kept for its recomputation: each block's own on the GPU, or two slots
    // offloaded to the host with the checkpoints.
    func keepingAttention(_ options: CUDATrainerMemoryOptions) -> CUDATrainerMemoryOptions {
        var kept = options
        kept.keepAttentionOutputs = true
        return kept
    }
    let attentionOnDevice = keepingAttention(.allOnDevice)

    /// Compares each variant's record with the all-on-GPU one (and that one with a repeat of itself).
    func compareVariants(_ name: String, _ variants: [(String, CUDATrainerMemoryOptions)],
                         make: (CUDATrainerMemoryOptions) throws -> CUDADecoderTrainer,
                         run: (CUDADecoderTrainer) throws -> MemoryRunRecord) throws {
        // The deterministic attention kernels: the flash backward adds dQ with fp32 atomics (last bits vary by run).
        func build(_ options: CUDATrainerMemoryOptions) throws -> CUDADecoderTrainer {
            let trainer = try make(options)
            trainer.deterministic = true
            return trainer
        }
        let reference = try run(build(.allOnDevice))
        let repeated = try run(build(.allOnDevice))
        checkTrue("\(name): all on the GPU reproduces itself", repeated == reference,
                  "\(repeated.differences(from: reference)) of \(reference.parameters.count) parameters, "
                  + "\(reference.gradients.count) gradient sets and \(reference.losses.count / 2) losses differ")
        for (label, options) in variants {
            let trainer = try build(options)
            let record = try run(trainer)
            checkTrue("\(name): \(label) = all on the GPU, bit for bit", record == reference,
                      "\(record.differences(from: reference)) values differ (\(trainer.memory); plan \(trainer.plan))")
        }
    }

    group("memory: offload bit-identical (fixture)") {
        let batch = try fixtureBatch(directory)
        let dense = try loadFixtureModel(directory, quantization: .none)
        let batches = [batch, firstRows(batch, 1)]
        try compareVariants("fixture", [("checkpoints offloaded, 2 slots", offload2), ("host embedding", hostOnly),
                                        ("both, 2 slots", both2), ("both, 3 slots (no checkpoint leaves)", both3),
                                        ("weights dequantized again in the backward", dequantizeAgain),
                                        ("attention outputs kept on the GPU", attentionOnDevice),
                                        ("attention outputs kept, both offloaded, 2 slots", keepingAttention(both2))],
                            make: { try CUDADecoderTrainer(context: ctx, model: dense, capacityTokens: batch.tokenCount, memory: $0) },
                            run: { try recordMemoryRun($0, batches: batches, steps: 3, dropout: false) })
        let trainer = try CUDADecoderTrainer(context: ctx, model: dense, capacityTokens: batch.tokenCount, memory: both2)
        checkTrue("fixture: 2 slots offload x0, embedding on the host",
                  trainer.plan.host == batch.tokenCount * 128 * 2 * 2 + 1000 * 128 * 2 && trainer.memory.hostEmbedding,
                  "plan \(trainer.plan)")
    }

    group("memory: offload bit-identical (random)") {
        var config = try DecoderConfig(directory: directory + "/base")
        config.layerCount = 6
        config.tieWordEmbeddings = false
        let length = 40
        let examples = randomExamples(count: 4, length: length, vocab: config.vocabularySize, seed: 21)
        let full = TrainingBatch(examples: examples.map { ($0.tokens, $0.labels) }, length: length, padID: 0)
        let batches = [full, firstRows(full, 3)]
        func make(_ options: CUDATrainerMemoryOptions) throws -> CUDADecoderTrainer {
            try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 4, alpha: 8, capacityTokens: full.tokenCount, dropout: 0.1,
                                 seed: 7, memory: options)
        }
        var rehashedMasks = CUDATrainerMemoryOptions.allOnDevice
        rehashedMasks.keepDropoutMasks = false
        let variants = [("checkpoints offloaded, 2 slots", offload2), ("checkpoints offloaded, 3 slots", offload3),
                        ("host embedding", hostOnly), ("both, 3 slots", both3), ("dropout masks rehashed", rehashedMasks),
                        ("weights dequantized again in the backward", dequantizeAgain),
                        ("attention outputs kept on the GPU", attentionOnDevice),
                        ("attention outputs kept, checkpoints offloaded, 3 slots", keepingAttention(offload3))]
        try compareVariants("random 6 blocks", variants, make: make,
                            run: { try recordMemoryRun($0, batches: batches, steps: 3, dropout: true) })
        // Queued without synchronising between steps: the copies of one step overlap the next step's host work.
        try compareVariants("random 6 blocks, no sync between steps", [("both, 2 slots", both2), ("both, 3 slots", both3),
                                                                       ("both, 2 slots, attention outputs kept", keepingAttention(both2))],
                            make: make,
                            run: { try recordMemoryRun($0, batches: batches, steps: 4, dropout: true, synchronise: false) })
        // A tied embedding stays on the GPU whatever the options say.
        var tied = config
        tied.tieWordEmbeddings = true
        let trainer = try CUDADecoderTrainer(context: ctx, randomConfig: tied, rank: 4, alpha: 8, capacityTokens: full.tokenCount,
                                           memory: both3)
        checkTrue("a tied embedding stays on the GPU", !trainer.memory.hostEmbedding && trainer.memory.offloadCheckpoints,
                  "\(trainer.memory)")
    }

    group("memory: peak allocator bytes") {
        let measurement = try PeakMeasurement()
        let (config, tokens) = (measurement.config, measurement.tokens)
        func peak(_ options: CUDATrainerMemoryOptions, dropout: Float = 0) throws -> (bytes: Int, plan: CUDAMemoryPlan) {
            let measured = try measurement.peak({ try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 8, alpha: 16,
                                                                         capacityTokens: tokens, dropout: dropout, memory: options) },
                                                dropoutSeed: dropout > 0 ? 5 : nil)
            return (measured.bytes, measured.plan)
        }
        let s = DeviceAllocator.sizeClass
        let checkpoint = s(2 * tokens * config.hiddenSize), table = s(2 * config.vocabularySize * config.hiddenSize)
        let device = try peak(.allOnDevice)
        let mib = { (b: Int) in fmt(Double(b) / Double(1 << 20), 2) + " MiB" }
        let workspace = 32 << 20
        checkTrue("peak: all on the GPU within 1 MiB of the plan",
                  abs(device.bytes - (device.plan.total - workspace)) <= 1 << 20,
                  "peak \(mib(device.bytes)), plan \(mib(device.plan.total)) less the 32 MiB cuBLASLt workspace")
        // Kept attention outputs, offloaded: one more o and lse slot on the GPU than the block in hand's.
        let attentionSlot = s(2 * tokens * config.qDim) + s(4 * tokens * config.headCount)
        for (label, options, expected) in [("offloaded checkpoints", offload3, (config.layerCount + 1 - 3) * checkpoint),
                                           ("offloaded checkpoints and attention outputs", keepingAttention(offload3),
                                            (config.layerCount + 1 - 3) * checkpoint - attentionSlot),
                                           ("host embedding", hostOnly, table),
                                           ("both", both3, (config.layerCount + 1 - 3) * checkpoint + table)] {
            let measured = try peak(options)
            let drop = device.bytes - measured.bytes
            checkTrue("peak: \(label) saves what the plan says", drop == device.plan.total - measured.plan.total && drop == expected,
                      "peak \(mib(device.bytes)) -> \(mib(measured.bytes)): \(mib(drop)) less; plan \(mib(device.plan.total - measured.plan.total)), "
                      + "expected \(mib(expected)); host \(mib(measured.plan.host))")
        }
        // The optimizer in use keeps its own state: the trainer made for it holds no moments, and one step through
        // CUDAOptimizer peaks where the plan says (paged: two slots of the largest tensor's state, the rest on the host).
        for kind in [OptimizerKind.adamw, .pagedAdamw8bit] {
            let optimizer = try CUDAOptimizer(context: ctx, kind: kind)
            let (bytes, _, trainer) = try measurement.peak(
                { try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 8, alpha: 16, capacityTokens: tokens,
                                         memory: .allOnDevice, optimizer: kind) },
                step: { trainer in
                    try trainer.clipGradients(maxNorm: 1)
                    try optimizer.step(trainer.parameterSlots(), learningRate: 1e-4)
                    try trainer.refreshParameterCopies()
                })
            let drop = device.bytes - bytes, planned = device.plan.total - trainer.plan.total
            checkTrue("peak: \(kind.rawValue) state as the plan says", drop == planned && optimizer.deviceStateBytes <= trainer.plan.optimizer,
                      "peak \(mib(device.bytes)) -> \(mib(bytes)): \(mib(drop)) less; plan \(mib(planned)) less "
                      + "(optimizer \(mib(device.plan.optimizer)) -> \(mib(trainer.plan.optimizer)), host \(mib(trainer.plan.optimizerHost)))")
            checkTrue("\(kind.rawValue): the trainer's own optimizerStep refuses", (try? trainer.optimizerStep(learningRate: 1e-4)) == nil)
        }
        // LoRA dropout: dA's partial sums, every block's own d(x)·Aᵀ, and the mask bits: every block's, kept from the
        // forward (the default), or one linear's, hashed again by the backward (keepDropoutMasks off).
        let inputs = [config.hiddenSize, config.qDim, config.intermediateSize]
        let common = s(4 * inputs.map { CUDAContext.loraDropoutScratchCount(tokens: tokens, inFeatures: $0, rank: 8) }.max()!)
            + config.layerCount * 7 * s(2 * tokens * 8)
        let blockInputs = [config.hiddenSize, config.hiddenSize, config.hiddenSize, config.qDim, config.hiddenSize, config.hiddenSize,
                           config.intermediateSize]
        let keptBits = config.layerCount * blockInputs.map { (CUDAContext.loraDropoutMaskBytes(tokens: tokens, inFeatures: $0) + 255) / 256 * 256 }
            .reduce(0, +)
        let oneLinearBits = inputs.map { CUDAContext.loraDropoutMaskBytes(tokens: tokens, inFeatures: $0) }.max()!
        var rehashing = CUDATrainerMemoryOptions.allOnDevice
        rehashing.keepDropoutMasks = false
        for (label, options, bits) in [("masks kept", CUDATrainerMemoryOptions.allOnDevice, keptBits), ("masks rehashed", rehashing, oneLinearBits)] {
            let dropped = try peak(options, dropout: 0.05)
            let extra = common + s(bits)
            checkTrue("peak: LoRA dropout (\(label)) adds what the plan says",
                      dropped.bytes - device.bytes == dropped.plan.total - device.plan.total
                          && dropped.plan.total - device.plan.total == extra && dropped.plan.memory.keepDropoutMasks == options.keepDropoutMasks,
                      "peak \(mib(device.bytes)) -> \(mib(dropped.bytes)); plan \(mib(dropped.plan.total - device.plan.total)) more, "
                      + "expected \(mib(extra))")
        }
    }
}
