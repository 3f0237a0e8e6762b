// The SFT training loop: batches → forward/backward → clipping → optimizer → schedule,
// with logging, evaluation, checkpoints, best-adapter keeping, early stopping and exact resume.
//
// Determinism is what makes resume exact: the data order of epoch e is a shuffle seeded by
// (seed, e), and the dropout masks of a micro-batch are seeded by (seed, step, micro-batch), so
// the state to save is only the adapter, the optimizer and the step counter.

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
    public var bestEvalLoss: Double?
    public var bestStep: Int?
    public var stoppedEarly: Bool
    public var tokensPerSecond: Double
    public var outputDirectory: String
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
    public let model: LlamaModel
    public let train: [TrainingBatch]
    public let eval: [TrainingBatch]
    /// Micro-batches in one epoch, in the unshuffled order.
    let microBatchesPerEpoch: Int
    public let stepsPerEpoch: Int
    public let totalSteps: Int
    /// Where the forward/backward, clipping and optimizer run (CPU or GPU).
    public let engine: TrainingEngine
    let schedule: LearningRateSchedule
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

    public init(configuration: TrainingConfiguration, model: LlamaModel, train: [TokenizedExample], eval: [TokenizedExample],
                padID: Int, baseDirectory: String?, device: ComputeDevice = .cpu) throws {
        try configuration.validate()
        self.configuration = configuration
        self.model = model
        self.baseDirectory = baseDirectory
        let c = configuration
        self.train = Batching.batches(train, size: c.batchSize, packing: c.packing, length: c.maxSeqLength, padID: padID)
        self.eval = Batching.paddedBatches(eval, size: c.batchSize, padID: padID)
        guard !self.train.isEmpty else { throw UsageError("no training batches: the dataset is empty") }
        if let longest = (self.train + self.eval).map(\.length).max() {
            try model.config.checkSequenceLength(longest, what: "the longest batch (max_seq_length \(c.maxSeqLength))")
        }
        microBatchesPerEpoch = self.train.count
        stepsPerEpoch = (microBatchesPerEpoch + c.gradientAccumulationSteps - 1) / c.gradientAccumulationSteps
        totalSteps = c.maxSteps > 0 ? c.maxSteps : max(1, Int((c.epochs * Double(stepsPerEpoch)).rounded(.up)))
        loraConfig = c.loraConfig
        if model.linearLayers.allSatisfy({ $0.lora == nil }) {
            try model.attachLoRA(loraConfig, seed: c.seed)
        }
        let optimizerKind = try OptimizerKind.parse(c.optimizer)
        let hyperparameters = AdamWHyperparameters(weightDecay: c.weightDecay)
        switch device {
        case .cpu:
            engine = CPUTrainingEngine(model: model, optimizer: try optimizerKind.make(hyperparameters))
        case .cuda(let context):
            let capacity = (self.train + self.eval).map(\.tokenCount).max() ?? 1
            engine = try CUDATrainingEngine(context: context, model: model, capacityTokens: capacity, optimizer: optimizerKind,
                                            hyperparameters: hyperparameters, deterministic: c.fullDeterminism)
        }
        schedule = try LearningRateSchedule(kind: try ScheduleKind.parse(c.scheduler), baseLearningRate: c.learningRate,
                                            trainingSteps: totalSteps, warmupSteps: c.warmupSteps, warmupRatio: c.warmupRatio)
    }

    // MARK: - The loop

    public func run() throws -> TrainingSummary {
        let c = configuration
        try FileSystem.createDirectory(c.outputDirectory)
        var state = TrainerState()
        if c.resume, let latest = try Checkpoints.latest(in: c.outputDirectory) {
            state = try Checkpoints.restore(latest, model: model, engine: engine)
            history = state.history
            evalHistory = state.evalHistory
            log("resumed from \(latest) at step \(state.step)")
        } else {
            FileSystem.remove(metricsPath)
        }
        let counts = model.parameterCounts
        log(String(cFormat: "trainable params: %d || all params: %d || trainable%%: %.4f", counts.trainable, counts.total,
                   100 * Double(counts.trainable) / Double(counts.total)))
        log("device: \(engine.deviceName)")
        log(memoryEstimate())
        log("\(train.count) micro-batches of \(c.batchSize) per epoch, accumulation \(c.gradientAccumulationSteps), \(totalSteps) steps, \(eval.count) eval batches")

        let runStart = monotonicSeconds()
        let firstStep = state.step  // steps before this one were done by an earlier (resumed) run
        var tokensSeen = 0
        var windowLoss = 0.0, windowSteps = 0
        var stoppedEarly = false
        var currentEpoch = -1
        var order: [Int] = []
        while state.step < totalSteps {
            let step = state.step
            let epoch = step / stepsPerEpoch
            if epoch != currentEpoch { order = epochOrder(epoch); currentEpoch = epoch }
            let first = (step % stepsPerEpoch) * c.gradientAccumulationSteps
            let micro = Array(order[first..<min(first + c.gradientAccumulationSteps, microBatchesPerEpoch)])

            let normalizer = micro.reduce(0) { $0 + train[$1].countedTokens }
            var loss = LossSum(sum: 0, count: 0)
            for (m, index) in micro.enumerated() {
                let options = TrainingStepOptions(gradientCheckpointing: c.gradientCheckpointing,
                                                  dropoutSeed: c.seed &* 1_000_003 &+ UInt64(step) &* 1009 &+ UInt64(m))
                let part = try engine.accumulate(batch: train[index], normalizer: normalizer, options: options, first: m == 0)
                loss.sum += part.sum
                loss.count += part.count
                tokensSeen += train[index].tokenCount
            }
            let learningRate = schedule.learningRate(atStep: step)
            let norm = try engine.step(learningRate: learningRate, maxGradNorm: c.maxGradNorm)
            state.step += 1

            let record = StepRecord(step: state.step, loss: loss.mean, learningRate: learningRate, gradientNorm: norm,
                                    tokens: micro.reduce(0) { $0 + train[$1].tokenCount })
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
                                   ("grad_norm", .double(roundTo(norm, 6))), ("tokens_per_second", .double(roundTo(tokensPerSecond, 1)))])
                windowLoss = 0
                windowSteps = 0
            }

            let endOfEpoch = state.step % stepsPerEpoch == 0 || state.step == totalSteps
            let evalDue = !eval.isEmpty && (c.evalSteps > 0 ? state.step % c.evalSteps == 0 || state.step == totalSteps : endOfEpoch)
            if evalDue {
                let evalLoss = try evaluate()
                evalHistory.append((state.step, evalLoss))
                try appendMetrics([("step", .int(Int64(state.step))), ("eval_loss", .double(roundTo(evalLoss, 6))),
                                   ("eval_perplexity", .double(roundTo(exp(evalLoss), 4)))])
                log(String(cFormat: "\nstep %d: eval loss %.4f, perplexity %.3f", state.step, evalLoss, exp(evalLoss)))
                if state.bestEvalLoss.map({ evalLoss < $0 }) ?? true {
                    state.bestEvalLoss = evalLoss
                    state.bestStep = state.step
                    state.evaluationsWithoutImprovement = 0
                    try saveAdapter(to: c.outputDirectory + "/best")
                } else {
                    state.evaluationsWithoutImprovement += 1
                }
            }
            let saveDue = c.saveSteps > 0 ? state.step % c.saveSteps == 0 : endOfEpoch
            let stopRequested = shouldStop(state.step)
            let patienceExhausted = c.earlyStoppingPatience > 0 && state.evaluationsWithoutImprovement >= c.earlyStoppingPatience
            if saveDue || stopRequested || patienceExhausted || state.step == totalSteps {
                state.history = history
                state.evalHistory = evalHistory
                try engine.copyWeightsToModel()
                try Checkpoints.save(step: state.step, state: state, model: model, loraConfig: loraConfig, engine: engine,
                                     in: c.outputDirectory, keep: c.saveTotalLimit, protectStep: state.bestStep)
                try writeReport()
            }
            if patienceExhausted {
                log("\nearly stopping: eval loss has not improved for \(state.evaluationsWithoutImprovement) evaluations")
                stoppedEarly = true
                break
            }
            if stopRequested { break }
        }
        log("")

        // The result: the best adapter when there was evaluation, else the last.
        if state.bestStep != nil, FileSystem.exists(c.outputDirectory + "/best/adapter_model.safetensors") {
            try Checkpoints.loadAdapterWeights(from: c.outputDirectory + "/best", into: model)
            try engine.loadWeightsFromModel()
            log("the adapter in \(c.outputDirectory) is the best by eval loss (step \(state.bestStep!))")
        }
        try saveAdapter(to: c.outputDirectory)
        try writeReport()
        let elapsed = monotonicSeconds() - runStart
        return TrainingSummary(steps: state.step, finalTrainLoss: history.last?.loss, bestEvalLoss: state.bestEvalLoss, bestStep: state.bestStep,
                               stoppedEarly: stoppedEarly, tokensPerSecond: Double(tokensSeen) / max(elapsed, 1e-9),
                               outputDirectory: c.outputDirectory)
    }

    /// Mean loss over the eval batches.
    public func evaluate() throws -> Double {
        var total = LossSum(sum: 0, count: 0)
        for batch in eval {
            let part = try engine.loss(batch: batch)
            total.sum += part.sum
            total.count += part.count
        }
        return total.mean
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

    /// The adapter in PEFT's format, with the base's tokenizer files beside it.
    func saveAdapter(to directory: String) throws {
        try engine.copyWeightsToModel()
        try PEFTAdapter.save(model: model, config: loraConfig, to: directory)
        if let base = baseDirectory {
            for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
            where FileSystem.exists(base + "/" + name) {
                try FileSystem.writeAtomically(directory + "/" + name, bytes: try FileSystem.readFile(base + "/" + name))
            }
        }
    }

    // MARK: - Reporting

    var metricsPath: String { configuration.outputDirectory + "/metrics.jsonl" }

    func appendMetrics(_ fields: [(String, JSONValue)]) throws {
        let line = JSONValue.object(JSONObject(fields)).serialized(.init()) + "\n"
        guard let file = fopen(metricsPath, "a") else { throw UsageError("cannot append to \(metricsPath)") }
        fputs(line, file)
        fclose(file)
    }

    func writeReport() throws {
        try TrainingReport.write(configuration: configuration, history: history, evalHistory: evalHistory,
                                 to: configuration.outputDirectory + "/report.html")
    }

    func progress(step: Int, loss: Double, learningRate: Double, tokensPerSecond: Double, secondsPerStep: Double) {
        let width = 24
        let done = Int(Double(width) * Double(step) / Double(totalSteps))
        let bar = String(repeating: "=", count: done) + (done < width ? ">" : "") + String(repeating: " ", count: max(0, width - done - 1))
        let eta = Int(secondsPerStep * Double(totalSteps - step))
        let line = "\rstep \(step)/\(totalSteps) [\(bar)]" + String(cFormat: " loss %.4f lr %.2e %.0f tok/s ETA %dm%02ds ", loss,
                          learningRate, tokensPerSecond, eta / 60, eta % 60)
        showProgress(line)
    }

    /// What the run will hold in memory, as PEFT/TRL users like to know before it starts.
    func memoryEstimate() -> String {
        let c = model.config
        let weights = model.linearLayers.reduce(0) { $0 + $1.weight.storedBytes } + (model.embedding.count + (model.head === model.embedding ? 0 : model.head.count)) * 4
        let adapters = model.parameterCounts.trainable * 4
        let optimizerBytes = (try? OptimizerKind.parse(configuration.optimizer).stateBytes(count: model.parameterCounts.trainable)) ?? 0
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
