// The SFT training loop: batches → forward/backward → clipping → optimizer → schedule,
// with logging, evaluation, checkpoints, best-adapter keeping, early stopping and exact resume.
//
// Determinism is what makes resume exact: the data order of epoch e is a shuffle seeded by
// (seed, e), and the dropout masks of a micro-batch are seeded by (seed, step, micro-batch), so
// the state to save is only the adapter, the optimizer and the step counter.
//
// Data parallel (a `Collective` of W ranks, Parallel/): every rank holds the whole data set and the same adapter; the
// epoch order is sharded as torch's DistributedSampler shards it (Parallel/DistributedSampling.swift), so at step s the
// W ranks with accumulation A take together the micro-batches one process with accumulation A·W takes. Each rank
// divides its loss by the counted tokens of the whole global batch (all ranks' micro-batches, known to every rank), so
// the sum of the ranks' gradients is the one-process gradient: d(Σ_r Σ_m loss_rm / N) = Σ_r d(Σ_m loss_rm / N).
// (transformers gets the same by multiplying the loss by W before DDP averages.) The dropout seed of rank r's m-th
// micro-batch is the one-process seed of micro-batch m·W + r. The steps per epoch are ceil(ceil(M/W)/A) for M
// micro-batches; logged losses and tokens are reduced over the ranks; evaluation is sharded (without padding) and its
// loss sums reduced. Rank 0 alone writes files (metrics, TensorBoard, checkpoints, best/, the adapter, the report);
// every rank restores a checkpoint on resume.
// Sharded (shard_base, shard_adapters, shard_head; GPU ranks through NCCL: Weights/CUDAShardedBase.swift,
// Training/CUDATrainingEngine.swift, Model/CUDADecoderTrainer+VocabularyParallelHead.swift): the base's blocks are gathered around their use
// (Parallel/ShardedBase.swift), each rank reduces, clips and steps only the LoRA tensors it owns and gathers the rest
// (ZeRO-2, Parallel/ShardedAdapters.swift; its optimizer state comes to rank 0 for checkpoints), and the head's loss is
// computed over vocabulary slices (Parallel/VocabularyParallelLoss.swift). The last two make every forward a collective
// call, so evaluation pads a rank a batch short with a forward whose loss it drops.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// What a finished run reports.
public struct TrainingSummary: Sendable {
    public var steps: Int
    public var finalTrainLoss: Double?
    /// The eval loss of the best evaluation (by metric_for_best_model).
    public var bestEvalLoss: Double?
    public var bestStep: Int?
    /// The best-model metric's name (eval_loss, eval_rouge_l, ...) and best value.
    public var bestMetricName: String
    public var bestMetric: Double?
    /// The task metrics of the best evaluation.
    public var bestTaskMetrics: [(String, Double)]
    public var stoppedEarly: Bool
    /// Tokens per second of the whole job (every rank's tokens).
    public var tokensPerSecond: Double
    public var outputDirectory: String
    /// Each rank's peak memory (`TrainingEngine.peakMemoryBytes`), by rank; one entry in a single process.
    public var rankPeakBytes: [Int] = []
}

/// One step's numbers.
public struct StepRecord: Sendable, Equatable {
    public var step: Int
    public var loss: Double
    public var learningRate: Double
    public var gradientNorm: Double
    public var tokens: Int
}

public final class Trainer {
    public let configuration: TrainingConfiguration
    public let model: DecoderModel
    public let train: [TrainingBatch]
    public let eval: [TrainingBatch]
    /// Micro-batches in one epoch, in the unshuffled order (all ranks together).
    let microBatchesPerEpoch: Int
    /// The data-parallel world this trainer is one rank of (`LocalCollective`: a plain single-process run).
    public let collective: Collective
    public let stepsPerEpoch: Int
    public let totalSteps: Int
    /// Where the forward/backward, clipping and optimizer run (CPU or GPU).
    public let engine: TrainingEngine
    let schedule: LearningRateSchedule

    /// The step the learning-rate schedule is at: the optimizer steps actually taken. A step skipped by the fp16 loss
    /// scaler (its gradients overflowed) does not advance the schedule, as accelerate holds the scheduler back when
    /// `optimizer.step_was_skipped`; it still counts as a training step (global_step), as in transformers' Trainer.
    static func schedulerStep(trainerStep: Int, skippedSteps: Int) -> Int { max(0, trainerStep - skippedSteps) }
    let loraConfig: LoRAConfig
    /// The base model folder, whose tokenizer files are copied beside saved adapters.
    let baseDirectory: String?

    /// Called with each line of progress (default: standard error).
    public var log: (String) -> Void = { line in
        fputs(line + "\n", stderr)
    }
    /// Shows the one-line progress bar (default: standard error, rewritten in place on a terminal;
    /// elsewhere, such as a CI log, one line per logging step).
    public lazy var showProgress: (String) -> Void = { [loggingSteps = configuration.loggingSteps, totalSteps] line in
        if isatty(2) != 0 {
            fputs(line, stderr)
        } else if let step = Int(line.dropFirst("\rstep ".count).prefix { $0.isNumber }),
                  step % max(loggingSteps, 1) == 0 || step == totalSteps {
            fputs(String(line.dropFirst()) + "\n", stderr)
        }
        fflush(stderr)
    }
    /// Called after each step; returning true stops the run there (after its checkpoint, if one is due).
    public var shouldStop: (Int) -> Bool = { _ in false }
    /// Every step's record, in order (also written to metrics.jsonl).
    public private(set) var history: [StepRecord] = []
    public private(set) var evalHistory: [(step: Int, loss: Double)] = []
    /// The task metrics of each evaluation (eval_<metric> keys), when generation metrics are computed.
    public private(set) var metricHistory: [(step: Int, values: [(String, Double)])] = []
    /// The last evaluation's sample answers (question, reference, answer).
    public private(set) var lastSamples: [(question: String, reference: String, answer: String)] = []
    /// How task metrics are computed during training: the eval prompts and the generator (set by the command before
    /// `run()`; needed when metric_for_best_model or eval_metrics names a task metric).
    public var generation: TrainingGeneration?
    /// What model cards (README.md beside every saved adapter) say beyond the configuration: the base model's chat
    /// template and an example prompt (set by the command; without it the card says what the trainer knows).
    public var cardDetails = ModelCardDetails()
    /// The base weights and data files named in model cards, hashed once per run (at the first save).
    var cardFiles: (base: [CardFile], data: [(role: String, file: CardFile?, path: String)])?
    /// This run's TensorBoard event file (report_to tensorboard), opened by `run()`; `appendMetrics` writes to it.
    public private(set) var tensorBoard: TensorBoardWriter?

    public init(configuration: TrainingConfiguration, model: DecoderModel, train: [TokenizedExample], eval: [TokenizedExample],
                padID: Int, baseDirectory: String?, device: ComputeDevice = .cpu, collective: Collective = LocalCollective()) throws {
        try configuration.validate()
        self.configuration = configuration
        self.model = model
        self.baseDirectory = baseDirectory
        self.collective = collective
        let c = configuration
        // Ids index the embedding and the loss: every one is checked against the model before any batch is built.
        for e in train + eval { try e.validate(vocabularySize: model.config.vocabularySize) }
        self.train = Batching.batches(train, size: c.batchSize, packing: c.packing, length: c.maxSeqLength, padID: padID)
        self.eval = Batching.paddedBatches(eval, size: c.batchSize, padID: padID)
        guard !self.train.isEmpty else { throw UsageError("no training batches: the dataset is empty") }
        // Training refuses what it does not compute (evaluation and generation of the same model run).
        try model.config.checkTrainable()
        microBatchesPerEpoch = self.train.count
        // Each rank's share of an epoch (padded as DistributedSampler pads), then its accumulation.
        let perRank = DistributedSampling.itemsPerRank(count: microBatchesPerEpoch, worldSize: collective.worldSize)
        stepsPerEpoch = (perRank + c.gradientAccumulationSteps - 1) / c.gradientAccumulationSteps
        totalSteps = c.maxSteps > 0 ? c.maxSteps : max(1, Int((c.epochs * Double(stepsPerEpoch)).rounded(.up)))
        // A run that counts no token would report loss 0 and save an untrained adapter.
        if self.train.reduce(0, { $0 + $1.countedTokens }) == 0 {
            throw CountedTokensReport(train).noCountedTokensError("training data", maxSeqLength: c.maxSeqLength)
        }
        if !eval.isEmpty && self.eval.reduce(0, { $0 + $1.countedTokens }) == 0 {
            throw CountedTokensReport(eval).noCountedTokensError("evaluation data", maxSeqLength: c.maxSeqLength)
        }
        loraConfig = c.loraConfig.resolvingDefaultTargets(for: model)
        if model.linearLayers.allSatisfy({ $0.lora == nil }) {
            try model.attachLoRA(loraConfig, seed: c.seed)
        }
        let optimizerKind = try OptimizerKind.parse(c.optimizer)
        let hyperparameters = AdamWHyperparameters(weightDecay: c.weightDecay)
        if c.shardBase {
            // Every forward gathers blocks on every rank, so every rank must make the same forwards: generation on
            // rank 0 alone (the task metrics) would leave the others behind.
            let metrics = try c.taskMetrics
            if !metrics.isEmpty {
                throw UsageError("shard_base (--shard-base) trains with the base sharded over the ranks, and the task metrics "
                                 + "(\(metrics.map(\.rawValue).joined(separator: ", "))) generate on rank 0 alone: "
                                 + "use eval_loss (metric_for_best_model) with a sharded base")
            }
        }
        switch device {
        case .cpu:
            let cpu = CPUTrainingEngine(model: model, optimizer: try optimizerKind.make(hyperparameters))
            engine = cpu
            if c.shardBase { _ = try ShardedDecoderBase(model: model, collective: collective) }
            // A single process (LocalCollective) has nothing to shard; a world of one through a collective takes the path.
            if !(collective is LocalCollective) {
                if c.shardsAdapters { cpu.shardAdapters(over: collective) }
                if c.shardsHead { model.vocabularyParallel = collective }
            }
        case .cuda(let context):
            // The NCCL ranks a sharded part spreads over (nil: a single process, which has nothing to shard); another
            // collective cannot carry the GPU's device buffers.
            func ncclRanks(_ wanted: Bool, _ option: String, _ flag: String) throws -> NCCLCollective? {
                guard wanted && !(collective is LocalCollective) else { return nil }
                guard let nccl = collective as? NCCLCollective else {
                    throw UsageError("\(option) (\(flag) on) on the GPU shards over NCCL ranks: start the job with "
                                     + "--gpus N (or a launcher), or train on the CPU ranks of --world N")
                }
                return nccl
            }
            // The head by vocabulary (CUDADecoderTrainer+VocabularyParallelHead.swift) and ZeRO-2 adapters
            // (CUDATrainingEngine's header).
            let headSharding = try ncclRanks(c.shardsHead, "shard_head", "--shard-head")
            let adapterSharding = try ncclRanks(c.shardsAdapters, "shard_adapters", "--shard-adapters")
            var sharding: NCCLCollective? = nil
            if c.shardBase {
                guard let nccl = collective as? NCCLCollective else {
                    throw UsageError("shard_base (--shard-base) on the GPU shards the base over NCCL ranks: start the job with --gpus N "
                                     + "(or a launcher), or train on the CPU ranks of --world N")
                }
                sharding = nccl
            }
            try model.config.checkCUDASupport(what: "training")
            let capacity = (self.train + self.eval).map(\.tokenCount).max() ?? 1
            engine = try CUDATrainingEngine(context: context, model: model, capacityTokens: capacity, optimizer: optimizerKind,
                                            hyperparameters: hyperparameters, deterministic: c.fullDeterminism, sharding: sharding,
                                            shardAdapters: adapterSharding, shardHead: headSharding)
        }
        schedule = try LearningRateSchedule(kind: try ScheduleKind.parse(c.scheduler), baseLearningRate: c.learningRate,
                                            trainingSteps: totalSteps, warmupSteps: c.warmupSteps, warmupRatio: c.warmupRatio)
    }

    // MARK: - The loop

    public func run() throws -> TrainingSummary {
        let c = configuration
        // Rank 0 prepares the folder (it may remove an interrupted save's leftovers) before any rank reads a checkpoint.
        if collective.isMainRank { try prepareOutputDirectory() }
        try collective.barrier()
        var state = TrainerState()
        if c.resume {
            guard let latest = try Checkpoints.latest(in: c.outputDirectory) else { throw Self.noCheckpoint(c.outputDirectory) }
            state = try Checkpoints.restore(latest, model: model, engine: engine)
            history = state.history
            evalHistory = state.evalHistory
            metricHistory = state.metricHistory
            if collective.isMainRank { try truncateMetrics(afterStep: state.step) }
            log("resumed from \(latest) at step \(state.step)")
        }
        let counts = model.parameterCounts
        log(String(cFormat: "trainable params: %d || all params: %d || trainable%%: %.4f", counts.trainable, counts.total,
                   100 * Double(counts.trainable) / Double(counts.total)))
        log("device: \(engine.deviceName)")
        log(memoryEstimate())
        log("\(train.count) micro-batches of \(c.batchSize) per epoch, accumulation \(c.gradientAccumulationSteps), \(totalSteps) steps, \(eval.count) eval batches")
        let world = collective.worldSize, rank = collective.rank
        // Any collective but the single-process one takes the data-parallel path, also a world of one (the GPU check
        // runs NCCL's path that way on one GPU).
        let parallel = !(collective is LocalCollective)
        if world > 1 {
            log("data parallel: rank \(rank) of \(world), global batch \(c.batchSize) × \(c.gradientAccumulationSteps) × \(world) = "
                + "\(c.batchSize * c.gradientAccumulationSteps * world) rows a step, \(DistributedSampling.itemsPerRank(count: train.count, worldSize: world)) micro-batches per rank and epoch")
        }

        if let sharding = (engine as? CPUTrainingEngine)?.adapterSharding ?? (engine as? CUDATrainingEngine)?.adapterSharding?.exchange {
            let o = sharding.ownership, owned = sharding.owned
            log("sharded adapters: rank \(rank) owns LoRA tensors \(owned.lowerBound)..<\(owned.upperBound) of \(o.counts.count) "
                + "(\(o.ownedCount(rank: rank)) of \(o.counts.reduce(0, +)) values): their summed gradients and optimizer state"
                + (engine is CUDATrainingEngine ? " (on the GPU the fp32 masters and gradients stay whole on every rank)" : ""))
        }
        if let v = model.vocabularyParallel.map({ _ in VocabularyParallelLoss.slice(vocab: model.config.vocabularySize, rank: rank, worldSize: world) })
            ?? (engine as? CUDATrainingEngine)?.trainer.headColumns {
            log("vocabulary-parallel head: rank \(rank) computes the logits of vocabulary rows \(v.lowerBound)..<\(v.upperBound) for every rank's tokens"
                + (engine is CUDATrainingEngine ? " and keeps only those rows of lm_head on its GPU" : ""))
        }
        if let shards = model.shardedBase {
            func mib(_ b: Int) -> String { String(cFormat: "%.1f MiB", Double(b) / 1_048_576) }
            log("sharded base: rank \(rank) keeps \(mib(shards.shardBytes)) of the blocks' \(mib(shards.wholeBytes)), gathering each block "
                + "before its forward, recomputation and backward")
        }

        let taskMetrics = try c.taskMetrics
        if !taskMetrics.isEmpty && !eval.isEmpty && generation == nil {
            throw UsageError("the task metrics (\(taskMetrics.map(\.rawValue).joined(separator: ", "))) need eval prompts with reference answers: "
                             + "give eval_dataset (--eval-data), a JSONL of prompt/completion, messages or instruction/output lines")
        }
        if !taskMetrics.isEmpty && eval.isEmpty {
            log("note: \(c.bestModelMetricKey) needs evaluation, and there is no eval data: the last adapter is kept")
        }
        let runStart = monotonicSeconds()
        let firstStep = state.step  // steps before this one were done by an earlier (resumed) run
        tensorBoard = collective.isMainRank ? try TensorBoardWriter.forRun(c, resumedAfter: firstStep, log: log) : nil
        var tokensSeen = 0
        var windowLoss = 0.0, windowSteps = 0
        var stoppedEarly = false
        var currentEpoch = -1
        var order: [Int] = []        // this rank's micro-batches of the epoch
        var globalOrder: [Int] = []  // every rank's, padded: rank r's i-th is globalOrder[i·W + r]
        while state.step < totalSteps {
            let step = state.step
            let epoch = step / stepsPerEpoch
            if epoch != currentEpoch {
                globalOrder = DistributedSampling.padded(epochOrder(epoch), worldSize: world)
                order = DistributedSampling.shard(epochOrder(epoch), rank: rank, worldSize: world)
                currentEpoch = epoch
            }
            let first = (step % stepsPerEpoch) * c.gradientAccumulationSteps
            let end = min(first + c.gradientAccumulationSteps, order.count)
            let micro = Array(order[first..<end])

            // The counted tokens of the whole global batch (every rank's micro-batches of this step).
            let normalizer = globalOrder[(first * world)..<(end * world)].reduce(0) { $0 + train[$1].countedTokens }
            var loss = LossSum(sum: 0, count: 0)
            var stepTokens = 0
            for (m, index) in micro.enumerated() {
                let options = TrainingStepOptions(gradientCheckpointing: c.gradientCheckpointing,
                                                  dropoutSeed: c.seed &* 1_000_003 &+ UInt64(step) &* 1009 &+ UInt64(m * world + rank))
                if parallel && m == micro.count - 1 { try engine.prepareGradientReduction(over: collective) }
                let part = try engine.accumulate(batch: train[index], normalizer: normalizer, options: options, first: m == 0)
                guard part.sum.isFinite else {
                    throw nonFinite("the loss is \(NonFiniteError.name(part.sum)) in micro-batch \(m + 1) of \(micro.count)",
                                    step: step + 1, batches: [train[index]])
                }
                loss.sum += part.sum
                loss.count += part.count
                stepTokens += train[index].tokenCount
            }
            if parallel {
                // The gradients summed over the ranks (see the header); the logged loss and tokens are the global batch's.
                try engine.reduceGradients(over: collective)
                var sums = [loss.sum, Double(loss.count), Double(stepTokens)]
                try collective.allReduce(&sums, .sum)
                loss = LossSum(sum: sums[0], count: Int(sums[1]))
                stepTokens = Int(sums[2])
            }
            tokensSeen += stepTokens
            let learningRate = schedule.learningRate(atStep: Self.schedulerStep(trainerStep: step, skippedSteps: engine.lossScaler?.skippedSteps ?? 0))
            let norm = try engine.step(learningRate: learningRate, maxGradNorm: c.maxGradNorm)
            if engine.lastStepSkipped, let scaler = engine.lossScaler {
                // fp16: the scaled gradients overflowed; the scaler skipped the update and halved the scale. Only a
                // collapsed scale stops the run (Training/GradScaler.swift).
                guard !scaler.hasCollapsed else {
                    throw nonFinite("the fp16 loss scale fell to \(scaler.scale) after \(scaler.consecutiveSkips) skipped steps in a row "
                                    + "(the gradient norm is \(NonFiniteError.name(norm)) even unscaled; train in bf16 where the card has it, "
                                    + "or lower the learning rate)", step: step + 1, batches: micro.map { train[$0] })
                }
                log("\nstep \(step + 1): gradients overflowed fp16 (norm \(NonFiniteError.name(norm))); step skipped, loss scale now "
                    + "\(scaler.scale) (\(scaler.skippedSteps) skipped so far)")
            } else {
                guard norm.isFinite else {
                    throw nonFinite("the gradient norm is \(NonFiniteError.name(norm)) (the optimizer step was not applied)",
                                    step: step + 1, batches: micro.map { train[$0] })
                }
            }
            state.step += 1

            let record = StepRecord(step: state.step, loss: loss.mean, learningRate: learningRate, gradientNorm: norm, tokens: stepTokens)
            history.append(record)
            windowLoss += record.loss
            windowSteps += 1
            let elapsed = monotonicSeconds() - runStart
            let tokensPerSecond = Double(tokensSeen) / max(elapsed, 1e-9)
            progress(step: state.step, loss: record.loss, learningRate: learningRate, tokensPerSecond: tokensPerSecond,
                     secondsPerStep: elapsed / Double(state.step - firstStep))
            if state.step % max(c.loggingSteps, 1) == 0 || state.step == totalSteps {
                try appendMetrics([("step", .int(Int64(state.step))), ("epoch", .double(roundTo(Double(state.step) / Double(stepsPerEpoch), 4))),
                                   ("loss", .double(roundTo(windowLoss / Double(windowSteps), 6))), ("learning_rate", .double(learningRate)),
                                   ("grad_norm", .double(roundTo(norm, 6))), ("tokens_per_second", .double(roundTo(tokensPerSecond, 1)))]
                                  + scalerMetrics())
                windowLoss = 0
                windowSteps = 0
            }

            let endOfEpoch = state.step % stepsPerEpoch == 0 || state.step == totalSteps
            let evalDue = !eval.isEmpty && (c.evalSteps > 0 ? state.step % c.evalSteps == 0 || state.step == totalSteps : endOfEpoch)
            if evalDue {
                // A NaN or infinite adapter weight makes every eval output non-finite, so a finite eval loss also
                // keeps best/ finite.
                let evalLoss: Double
                do { evalLoss = try evaluate() } catch let error as NonFiniteError {
                    throw nonFinite("after the update, \(error.message)", step: state.step, batches: [])
                }
                evalHistory.append((state.step, evalLoss))
                try appendMetrics([("step", .int(Int64(state.step))), ("eval_loss", .double(roundTo(evalLoss, 6))),
                                   ("eval_perplexity", .double(roundTo(exp(evalLoss), 4)))])
                log(String(cFormat: "\nstep %d: eval loss %.4f, perplexity %.3f", state.step, evalLoss, exp(evalLoss)))
                var current = evalLoss
                if !taskMetrics.isEmpty {
                    // Generation runs on rank 0 (it needs no gradients); the others take its metric.
                    try engine.gatherWeights()  // every rank: rank 0 alone copies the adapter
                    if collective.isMainRank, let generation {
                        let values = try evaluateGeneration(generation, metrics: taskMetrics, step: state.step)
                        if let best = try c.bestModelMetric { current = values.first { $0.0 == best.evalKey }?.1 ?? .nan }
                    }
                    if world > 1 { current = try collective.broadcast(current, root: 0) }
                }
                let greater = c.bestModelGreaterIsBetter
                if current.isFinite, state.bestMetric.map({ greater ? current > $0 : current < $0 }) ?? true {
                    state.bestMetric = current
                    state.bestStep = state.step
                    state.evaluationsWithoutImprovement = 0
                    try engine.gatherWeights()  // every rank: rank 0 alone writes best/
                    if collective.isMainRank { try saveAdapter(to: c.outputDirectory + "/best", wholeFolder: true, step: state.step) }
                } else {
                    state.evaluationsWithoutImprovement += 1
                }
            }
            let saveDue = c.saveSteps > 0 ? state.step % c.saveSteps == 0 : endOfEpoch
            let stopRequested = try collective.any(shouldStop(state.step))
            let patienceExhausted = c.earlyStoppingPatience > 0 && state.evaluationsWithoutImprovement >= c.earlyStoppingPatience
            if saveDue || stopRequested || patienceExhausted || state.step == totalSteps {
                state.history = history
                state.evalHistory = evalHistory
                state.metricHistory = metricHistory
                state.lossScaler = engine.lossScaler.map { ($0.scale, $0.growthTracker, $0.skippedSteps) }
                try engine.gatherWeights()
                try engine.copyWeightsToModel()
                try requireFiniteAdapter(step: state.step)
                try engine.gatherStateForSave()  // every rank: sharded optimizer state comes to rank 0
                if collective.isMainRank {
                    let card = try modelCard(kind: .checkpoint(state.step), bestStep: state.bestStep)
                    try Checkpoints.save(step: state.step, state: state, model: model, loraConfig: loraConfig, engine: engine,
                                         in: c.outputDirectory, keep: c.saveTotalLimit, protectStep: state.bestStep, card: card)
                    try writeReport()
                }
            }
            if patienceExhausted {
                log("\nearly stopping: \(c.bestModelMetricKey) has not improved for \(state.evaluationsWithoutImprovement) evaluations")
                stoppedEarly = true
                break
            }
            if stopRequested { break }
        }
        log("")

        // The result: the best adapter when there was evaluation, else the last (written by rank 0; the others wait, so
        // a failed save stops them with its error).
        try engine.gatherWeights()
        if collective.isMainRank {
            if state.bestStep != nil, FileSystem.exists(c.outputDirectory + "/best/adapter_model.safetensors") {
                try Checkpoints.loadAdapterWeights(from: c.outputDirectory + "/best", into: model)
                try engine.loadWeightsFromModel()
                log("the adapter in \(c.outputDirectory) is the best by \(c.bestModelMetricKey) (step \(state.bestStep!))")
            }
            try engine.copyWeightsToModel()
            try requireFiniteAdapter(step: state.step)
            try saveAdapter(to: c.outputDirectory, step: state.bestStep ?? state.step)
            try writeReport()
        } else {
            try engine.copyWeightsToModel()
        }
        // Each rank's peak, summed into its own slot so every rank knows all (also the barrier after the save).
        var peaks = [Double](repeating: 0, count: collective.worldSize)
        peaks[collective.rank] = Double(engine.peakMemoryBytes)
        try collective.allReduce(&peaks, .sum)
        let elapsed = monotonicSeconds() - runStart
        let bestLoss = state.bestStep.flatMap { best in evalHistory.last { $0.step == best }?.loss }
        return TrainingSummary(steps: state.step, finalTrainLoss: history.last?.loss, bestEvalLoss: bestLoss, bestStep: state.bestStep,
                               bestMetricName: c.bestModelMetricKey, bestMetric: state.bestMetric,
                               bestTaskMetrics: state.bestStep.flatMap { best in metricHistory.last { $0.step == best }?.values } ?? [],
                               stoppedEarly: stoppedEarly, tokensPerSecond: Double(tokensSeen) / max(elapsed, 1e-9),
                               outputDirectory: c.outputDirectory, rankPeakBytes: peaks.map { Int($0) })
    }

    /// The task metrics on the first `generation_eval_examples` eval prompts, generated with the current adapter; logged
    /// (metrics.jsonl, TensorBoard, the progress log) with a few sample answers. Returns the eval_<metric> values.
    func evaluateGeneration(_ generation: TrainingGeneration, metrics: [TaskMetric], step: Int) throws -> [(String, Double)] {
        let c = configuration
        try engine.copyWeightsToModel()
        let cases = c.generationEvalExamples > 0 ? Array(generation.cases.prefix(c.generationEvalExamples)) : generation.cases
        let generator = try engine.batchGenerator(model: model)
        let result = try GenerationEvaluation.run(cases: cases, metrics: metrics, generator: generator, tokenizer: generation.tokenizer,
                                                  maxTokens: c.generationMaxNewTokens, stopIDs: generation.stopIDs)
        let values = result.metrics.compactMap { m in m.value.map { (m.metric.evalKey, roundTo($0, 6)) } }
        metricHistory.append((step, values))
        try appendMetrics([("step", .int(Int64(step)))] + values.map { ($0.0, .double($0.1)) })
        lastSamples = (0..<min(Self.sampleCount, cases.count)).map { (cases[$0].question, cases[$0].references.first ?? "", result.answers[$0].text) }
        try appendMetrics([("step", .int(Int64(step))), ("eval_samples", .array(lastSamples.map { s in
            .object(JSONObject([("question", .string(s.question)), ("reference", .string(s.reference)), ("answer", .string(s.answer))]))
        }))])
        try tensorBoard?.addText(step: step, tag: "eval/samples", markdown: TrainingReport.samplesMarkdown(lastSamples))
        log(values.map { "\($0.0) " + String(cFormat: "%.4f", $0.1) }.joined(separator: ", ")
            + String(cFormat: " (%d answers in %.1f s", cases.count, result.seconds) + " on the \(generator.deviceName))")
        return values
    }

    /// Sample answers kept per evaluation (metrics.jsonl, TensorBoard, the report).
    static let sampleCount = 4

    /// Mean loss over the eval batches (a NaN or infinite batch loss is a `NonFiniteError`). Data parallel: each rank
    /// computes batches rank, rank + W, ... (each batch once) and the loss sums and counts are added over the ranks.
    public func evaluate() throws -> Double {
        let world = collective.worldSize
        guard !(collective is LocalCollective) else { return try Evaluation.loss(engine: engine, batches: eval).mean }
        let mine = DistributedSampling.shardWithoutPadding(count: eval.count, rank: collective.rank, worldSize: world).map { eval[$0] }
        let part = try Evaluation.loss(engine: engine, batches: mine)
        if configuration.shardBase || model.vocabularyParallel != nil || (engine as? CUDATrainingEngine)?.trainer.headColumns != nil,
           let first = eval.first {
            // Every forward gathers blocks (the CPU model's shards or the GPU trainer's) or the head's rows from every rank: a rank with
            // a batch fewer makes one more forward, and drops its loss, so all ranks make the same all-gathers.
            for _ in mine.count..<DistributedSampling.itemsPerRank(count: eval.count, worldSize: world) { _ = try engine.loss(batch: first) }
        }
        var sums = [part.sum, Double(part.count)]
        try collective.allReduce(&sums, .sum)
        return LossSum(sum: sums[0], count: Int(sums[1])).mean
    }

    /// The error that stops a run at a non-finite number: the step, the dataset lines, and what is left on disk
    /// (nothing of this step is saved; the checkpoints before it are kept).
    func nonFinite(_ what: String, step: Int, batches: [TrainingBatch]) -> NonFiniteError {
        let origins = batches.flatMap(\.origins)
        let lines = origins.isEmpty ? "" : " (\(ExampleOrigin.describe(origins)))"
        let kept = (try? Checkpoints.latest(in: configuration.outputDirectory)).flatMap { $0 }
            .map { "the last good checkpoint is \($0)" } ?? "no checkpoint had been saved yet"
        return NonFiniteError("step \(step): \(what)\(lines); training stopped, nothing of this step was saved and \(kept)")
    }

    /// Refuses to save an adapter holding a NaN or infinite weight.
    func requireFiniteAdapter(step: Int) throws {
        if let name = model.firstNonFiniteAdapter() {
            throw nonFinite("the adapter weight \(name) is not finite", step: step, batches: [])
        }
    }

    /// The micro-batch order of an epoch: a Fisher–Yates shuffle seeded by (seed, epoch).
    func epochOrder(_ epoch: Int) -> [Int] {
        var order = Array(0..<microBatchesPerEpoch)
        var rng = SeededGenerator(seed: configuration.seed &+ UInt64(epoch) &* 0x9E37_79B9)
        if order.count > 1 {
            for i in stride(from: order.count - 1, to: 0, by: -1) {
                let j = Int(rng.next() % UInt64(i + 1))
                order.swapAt(i, j)
            }
        }
        return order
    }

    /// The adapter in PEFT's format, with the base's tokenizer files beside it. `best/` is a folder of its own, so it is
    /// written beside and renamed as a whole; the final adapter goes into the output folder (with the checkpoints), so its
    /// files are written into a temporary folder and renamed in. Either way an interrupted save keeps the previous adapter.
    func saveAdapter(to directory: String, wholeFolder: Bool = false, step: Int) throws {
        try engine.copyWeightsToModel()
        let card = try modelCard(kind: wholeFolder ? .best(step) : .final(step), bestStep: step)
        let write = { (folder: String) throws in
            try PEFTAdapter.writeFiles(model: self.model, config: self.loraConfig, into: folder)
            try FileSystem.writeAtomically(folder + "/README.md", text: card)
            if let base = self.baseDirectory {
                for name in Self.tokenizerFiles where FileSystem.exists(base + "/" + name) {
                    try FileSystem.writeAtomically(folder + "/" + name, bytes: try FileSystem.readFile(base + "/" + name))
                }
            }
        }
        if wholeFolder { try FileSystem.writeDirectory(directory, write) } else { try FileSystem.writeFilesInto(directory, write) }
    }

    // MARK: - Reporting

    var metricsPath: String { configuration.outputDirectory + "/metrics.jsonl" }

    /// What a run writes into its output folder (besides checkpoint-N folders): an earlier run is recognised by these.
    static let runFiles = ["adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "report.html", "best"]
    /// Copied beside saved adapters; removed with an overwritten run.
    static let tokenizerFiles = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]

    /// Creates the output folder, refusing one that holds an earlier run unless resuming or overwriting it; with
    /// `overwrite_output_dir` the earlier run's files are removed first, so a later resume cannot mix two runs.
    func prepareOutputDirectory() throws {
        let c = configuration
        let directory = c.outputDirectory
        try Self.checkOutputDirectory(c)
        // The run writes files into the folder (it never replaces the folder): refuse only what it would overwrite.
        try FileSystem.refuseOverwrite(output: directory, option: "output_dir (--output)",
                                       inputs: baseDirectory.map { [("base model", $0)] } ?? [], replacesFolder: false)
        let written = Set((Self.runFiles + Self.tokenizerFiles).map { FileSystem.canonicalPath(directory + "/" + $0) })
        for data in c.datasets + (c.evalDataset.map { [$0] } ?? []) where written.contains(FileSystem.canonicalPath(data)) {
            throw UsageError("output_dir (--output) \(directory): the run would overwrite the dataset \(data); choose another folder")
        }
        try FileSystem.createDirectory(directory)
        let names = try FileSystem.listDirectory(directory)
        // Leftovers of an interrupted save (folders written beside their place), never complete data.
        for name in names where Self.isSaveLeftover(name) {
            // A kill between the two renames of a replace leaves the old folder aside and none in place: put it back.
            let owner = String(name.prefix { $0 != "." })
            if name.contains(".old-"), !owner.isEmpty, !FileSystem.exists(directory + "/" + owner),
               rename(directory + "/" + name, directory + "/" + owner) == 0 { continue }
            FileSystem.removeTree(directory + "/" + name)
        }
        let earlier = try Self.earlierRun(in: directory)
        guard !earlier.isEmpty, c.overwriteOutputDirectory else { return }
        log("overwriting the earlier run in \(directory)")
        for name in earlier + Self.tokenizerFiles { FileSystem.removeTree(directory + "/" + name) }
    }

    /// `checkpoint-N.tmp-<pid>`, `best.old-<pid>`, `.tmp-<pid>`, `checkpoint-N.partial` (older versions): what a killed save
    /// leaves; only these names, so that no file of the user's is touched.
    static func isSaveLeftover(_ name: String) -> Bool {
        let stem = name.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard stem.count == 2 else { return false }
        let owner = stem[0], suffix = stem[1]
        let ours = owner.isEmpty || owner == "best" || (owner.hasPrefix(Checkpoints.prefix) && Int(owner.dropFirst(Checkpoints.prefix.count)) != nil)
        let temporary = ["tmp-", "old-"].contains { suffix.hasPrefix($0) && Int(suffix.dropFirst(4)) != nil } || (suffix == "partial" && !owner.isEmpty)
        return ours && temporary
    }

    /// The files and checkpoints of an earlier run in `directory` (none when it does not exist).
    static func earlierRun(in directory: String) throws -> [String] {
        guard FileSystem.isDirectory(directory) else { return [] }
        let names = try FileSystem.listDirectory(directory)
        return runFiles.filter { names.contains($0) } + (try Checkpoints.steps(in: directory).map { Checkpoints.prefix + String($0) })
    }

    static func noCheckpoint(_ directory: String) -> UsageError {
        // As transformers' "No valid checkpoint found in output directory": never a silent fresh start.
        UsageError("resume: no valid checkpoint found in \(directory) (no checkpoint-N folder with a trainer_state.json); drop --resume to start a new run")
    }

    /// The output folder checks that need no model: call before loading anything, so a mistake costs no time.
    /// An earlier run is refused unless resuming or overwriting it; resuming needs a checkpoint.
    public static func checkOutputDirectory(_ c: TrainingConfiguration) throws {
        let directory = c.outputDirectory
        guard !FileSystem.exists(directory) || FileSystem.isDirectory(directory) else {
            throw UsageError("output_dir (--output) \(directory) exists and is not a folder")
        }
        if c.resume {
            guard try Checkpoints.latest(in: directory) != nil else { throw noCheckpoint(directory) }
            return
        }
        let earlier = try earlierRun(in: directory)
        guard !earlier.isEmpty, !c.overwriteOutputDirectory else { return }
        let shown = earlier.prefix(4).joined(separator: ", ") + (earlier.count > 4 ? ", ..." : "")
        throw UsageError("output_dir (--output) \(directory) holds an earlier run (\(shown)): give --resume to continue it, "
                         + "--overwrite (overwrite_output_dir: true) to replace it, or another --output")
    }

    /// Keeps metrics.jsonl lines up to `step` (those after it were logged by the interrupted run and come again).
    func truncateMetrics(afterStep step: Int) throws {
        guard FileSystem.exists(metricsPath) else { return }
        let text = try FileSystem.readText(metricsPath)
        var kept = ""
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            // A line cut short by the kill (no step to read) is dropped too.
            guard let lineStep = (try? JSONValue.parse(String(line)))?["step"]?.int, lineStep <= step else { continue }
            kept += line + "\n"
        }
        try FileSystem.writeAtomically(metricsPath, text: kept)
    }

    func appendMetrics(_ fields: [(String, JSONValue)]) throws {
        guard collective.isMainRank else { return }  // rank 0 writes the job's metrics
        try tensorBoard?.addMetrics(fields)
        guard configuration.reportTo.contains(.jsonl) else { return }
        let line = JSONValue.object(JSONObject(fields)).serialized(.init()) + "\n"
        guard let file = fopen(metricsPath, "a") else { throw UsageError("cannot append to \(metricsPath): \(String(cString: strerror(errno)))") }
        // A full disk shows at the write, the flush or the close: each is checked.
        let written = fputs(line, file) >= 0 && fflush(file) == 0
        let reason = String(cString: strerror(errno))
        guard fclose(file) == 0, written else { throw UsageError("cannot append to \(metricsPath): \(written ? String(cString: strerror(errno)) : reason)") }
    }

    /// fp16: the loss scale and the steps skipped so far, for metrics.jsonl (nothing in bf16 or on the CPU).
    func scalerMetrics() -> [(String, JSONValue)] {
        guard let s = engine.lossScaler else { return [] }
        return [("loss_scale", .double(Double(s.scale))), ("skipped_steps", .int(Int64(s.skippedSteps)))]
    }

    func writeReport() throws {
        try TrainingReport.write(configuration: configuration, history: history, evalHistory: evalHistory, metricHistory: metricHistory,
                                 samples: lastSamples, device: "\(engine.deviceName) (\(engine.computeType))",
                                 to: configuration.outputDirectory + "/report.html")
    }

    func progress(step: Int, loss: Double, learningRate: Double, tokensPerSecond: Double, secondsPerStep: Double) {
        let width = 24
        let done = Int(Double(width) * Double(step) / Double(totalSteps))
        let bar = String(repeating: "=", count: done) + (done < width ? ">" : "") + String(repeating: " ", count: max(0, width - done - 1))
        let eta = Int(secondsPerStep * Double(totalSteps - step))
        let skipped = engine.lossScaler.map { $0.skippedSteps > 0 ? "skipped \($0.skippedSteps) " : "" } ?? ""
        let line = "\rstep \(step)/\(totalSteps) [\(bar)]" + String(cFormat: " loss %.4f lr %.2e %.0f tok/s ETA %dm%02ds ", loss,
                          learningRate, tokensPerSecond, eta / 60, eta % 60) + skipped
        showProgress(line)
    }

    /// What the run will hold in memory, as PEFT/TRL users like to know before it starts.
    func memoryEstimate() -> String {
        let c = model.config
        let weights = model.linearLayers.reduce(0) { $0 + $1.weight.storedBytes } + (model.shardedBase?.shardBytes ?? 0) + (model.embedding.count + (model.head === model.embedding ? 0 : model.head.count)) * 4
        let adapters = model.parameterCounts.trainable * 4
        // State per tensor (8-bit AdamW's by tensor size), of this rank's own tensors when the adapters are sharded.
        let slots = (engine as? CPUTrainingEngine)?.parameterSlots() ?? []
        let owned = (engine as? CPUTrainingEngine)?.adapterSharding?.owned ?? slots.indices
        let kind = try? OptimizerKind.parse(configuration.optimizer)
        let optimizerBytes = slots.isEmpty ? (kind?.stateBytes(count: model.parameterCounts.trainable) ?? 0)
            : owned.reduce(0) { $0 + (kind?.stateBytes(count: slots[$1].values.count) ?? 0) }
        let tokens = (train.map(\.tokenCount).max() ?? 0)
        let perBlock = tokens * (6 * c.hiddenSize + 3 * c.qDim + 4 * c.intermediateSize) * 4
        let activations = configuration.gradientCheckpointing ? tokens * c.hiddenSize * 4 * c.layerCount + perBlock : perBlock * c.layerCount
        func mib(_ b: Int) -> String { String(cFormat: "%.1f MiB", Double(b) / 1_048_576) }
        return "memory estimate: base weights \(mib(weights)), adapters \(mib(adapters)), optimizer \(mib(optimizerBytes)), activations \(mib(activations)), gradients \(mib(adapters))"
    }

    func roundTo(_ x: Double, _ digits: Int) -> Double {
        let p = pow(10.0, Double(digits))
        return (x * p).rounded() / p
    }
}
