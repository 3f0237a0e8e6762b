import ArgumentParser
import QLoRA
#if canImport(Glibc)
import Glibc
#endif

struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "QLoRA supervised fine-tuning: a frozen 4-bit base, LoRA adapters saved in PEFT's format.",
        discussion: "Settings come from --config (YAML, with the names transformers/TRL/PEFT use) and the flags below; flags win."
    )

    @Option(help: "A YAML file of settings (keys such as learning_rate, lora_r, per_device_train_batch_size).")
    var config: String?

    @Option(help: "Base model folder or known name (default smollm2-135m).") var model: String?
    @Option(help: "Quantize the base on load: nf4 (default), fp4 or none.") var quantize: String?
    @Option(name: .customLong("data"), help: "Training data (JSONL); repeat for several files.") var data: [String] = []
    @Option(help: "Evaluation data (JSONL).") var evalData: String?
    @Option(parsing: .unconditional, help: "Hold out this fraction of the training data for evaluation when there is no --eval-data.") var evalSplit: Double?
    @Option(name: .customLong("lora-r"), parsing: .unconditional, help: "LoRA rank.") var loraR: Int?
    @Option(parsing: .unconditional, help: "LoRA alpha (scale = alpha/r).") var loraAlpha: Double?
    @Option(parsing: .unconditional, help: "Dropout on the LoRA input path.") var loraDropout: Double?
    @Option(help: "Comma-separated module names (q_proj,v_proj,...) or all-linear.") var targetModules: String?
    @Flag(help: "rsLoRA scaling: alpha/sqrt(r).") var useRslora = false
    @Option(parsing: .unconditional, help: "Longest example (and packed row) in tokens.") var maxSeqLength: Int?
    @Flag(inversion: .prefixedNo, help: "Pack examples into rows of max-seq-length tokens.") var packing: Bool?
    @Flag(inversion: .prefixedNo, help: "Loss only on completions / assistant turns.") var completionOnly: Bool?
    @Option(parsing: .unconditional, help: "Examples (or packed rows) per micro-batch.") var batchSize: Int?
    @Option(parsing: .unconditional, help: "Micro-batches per optimizer step.") var gradientAccumulationSteps: Int?
    @Option(parsing: .unconditional, help: "Epochs over the training data.") var epochs: Double?
    @Option(parsing: .unconditional, help: "Optimizer steps (overrides --epochs).") var maxSteps: Int?
    @Option(parsing: .unconditional, help: "Peak learning rate.") var learningRate: Double?
    @Option(parsing: .unconditional, help: "Warmup as a fraction of the steps.") var warmupRatio: Double?
    @Option(parsing: .unconditional, help: "Warmup steps (overrides --warmup-ratio).") var warmupSteps: Int?
    @Option(help: "Schedule: constant, constant_with_warmup, linear or cosine.") var scheduler: String?
    @Option(parsing: .unconditional, help: "Decoupled weight decay.") var weightDecay: Double?
    @Option(parsing: .unconditional, help: "Clip the global gradient norm to this (0: no clipping).") var maxGradNorm: Double?
    @Option(help: "adamw, adamw_8bit, paged_adamw_8bit or paged_adamw_32bit.") var optimizer: String?
    @Flag(inversion: .prefixedNo, help: "Recompute each block in the backward pass instead of keeping its activations.") var gradientCheckpointing: Bool?
    @Option(parsing: .unconditional, help: "Random seed (adapter initialisation, data order, dropout): an integer from 0 to 2^64-1.") var seed: UInt64?
    @Flag(help: "Bit-identical runs on the GPU (attention without atomics, about 2x slower attention); the CPU always is.") var fullDeterminism = false
    @Flag(help: "Shard the frozen base's blocks over the ranks of --world (FSDP's FULL_SHARD for the 4-bit base): each rank keeps 1/N of every block and gathers a block before its use.")
    var shardBase = false
    @Option(help: "on or off: shard the adapters' gradients and optimizer state over the ranks (ZeRO-2; each rank steps the LoRA tensors it owns). Default: on with --shard-base.")
    var shardAdapters: OnOff?
    @Option(help: "on or off: shard the head by vocabulary over the ranks (each rank keeps its rows of lm_head and computes their logits for every rank's tokens; on the GPU too). Default: on with --shard-base.")
    var shardHead: OnOff?
    @Option(parsing: .unconditional, help: "Log every N steps.") var loggingSteps: Int?
    @Option(parsing: .unconditional, help: "Evaluate every N steps (0: each epoch).") var evalSteps: Int?
    @Option(parsing: .unconditional, help: "Save a checkpoint every N steps (0: each epoch).") var saveSteps: Int?
    @Option(parsing: .unconditional, help: "Checkpoints to keep (the best is always kept).") var saveTotalLimit: Int?
    @Option(parsing: .unconditional, help: "Stop after this many evaluations without improvement (0: never).") var earlyStoppingPatience: Int?
    @Option(help: "Output folder: adapter, checkpoints, metrics.jsonl, report.html.") var output: String?
    @Flag(help: "Continue from the latest checkpoint in the output folder (an error when there is none).") var resume = false
    @Flag(help: "Replace an earlier run in the output folder (its adapter, checkpoints and metrics); without it, or --resume, such a folder is refused.")
    var overwrite = false
    @Option(help: "Where to train: auto (the GPU when one is usable, else the CPU), cpu or cuda.") var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption
    @Option(name: .customLong("gpu-memory"), parsing: .unconditional,
            help: "GPU: train as on a card with this many GiB (the memory plan refuses what would not fit it; also QLORA_GPU_MEMORY).")
    var gpuMemory: Double?
    @Flag(help: "Skip malformed dataset lines (and count them) instead of stopping.") var skipBadLines = false
    @Option(help: "Where metrics go, comma-separated: jsonl (metrics.jsonl, the default), tensorboard (event files in OUTPUT/runs/), all or none.")
    var reportTo: String?
    @Option(help: "What best/ is chosen by: eval_loss (default) or a task metric of generated answers (exact_match, rouge_l, bleu, accuracy).")
    var metricForBest: String?
    @Option(help: "Whether a larger --metric-for-best is better: true or false (default: false for eval_loss, true for the task metrics).")
    var greaterIsBetter: Bool?
    @Option(help: "More task metrics to compute at each evaluation, comma-separated (exact_match, rouge_l, bleu, accuracy).")
    var evalMetrics: String?
    @Option(parsing: .unconditional, help: "Eval examples answered at each evaluation for the task metrics (the first N; 0: all; default 64).")
    var generationEvalExamples: Int?
    @Option(parsing: .unconditional, help: "The most tokens of each answer generated for the task metrics (default 64).")
    var generationMaxNewTokens: Int?
    @Option(help: "Data parallel on this machine's GPUs: a count (the first N) or indices such as 0,2,3. One process per GPU, the LoRA gradients summed through NCCL; the global batch is batch × accumulation × GPUs (docs/MULTI_GPU.md).")
    var gpus: String?
    @Option(parsing: .unconditional, help: "Data parallel over N CPU processes on this machine, the gradients summed over local sockets (the multi-process path without GPUs).")
    var world: Int?

    /// The configuration: defaults, then the YAML file, then the flags given. `checkOutput`: refuse an output folder
    /// holding an earlier run (every rank but 0 skips it: rank 0 may already be writing there).
    func configuration(checkOutput: Bool = true) throws -> TrainingConfiguration {
        var c = try config.map { try TrainingConfiguration(yamlFile: $0) } ?? TrainingConfiguration()
        func set<T>(_ value: T?, _ path: WritableKeyPath<TrainingConfiguration, T>) { if let value { c[keyPath: path] = value } }
        set(model, \.model); set(quantize, \.quantize)
        if let reportTo { c.reportTo = try ReportTargets.parse(flag: reportTo) }
        if !data.isEmpty { c.datasets = data }
        if let evalData { c.evalDataset = evalData }
        set(evalSplit, \.evalSplit); set(loraR, \.loraR); set(loraAlpha, \.loraAlpha); set(loraDropout, \.loraDropout)
        if let targetModules { c.targetModules = targetModules.split(separator: ",").map { $0.filter { !$0.isWhitespace } } }
        if useRslora { c.useRSLoRA = true }
        set(maxSeqLength, \.maxSeqLength); set(packing, \.packing); set(completionOnly, \.completionOnlyLoss)
        set(batchSize, \.batchSize); set(gradientAccumulationSteps, \.gradientAccumulationSteps); set(epochs, \.epochs)
        set(maxSteps, \.maxSteps); set(learningRate, \.learningRate); set(warmupRatio, \.warmupRatio); set(warmupSteps, \.warmupSteps)
        set(scheduler, \.scheduler); set(weightDecay, \.weightDecay); set(maxGradNorm, \.maxGradNorm); set(optimizer, \.optimizer)
        set(gradientCheckpointing, \.gradientCheckpointing); set(seed, \.seed); set(loggingSteps, \.loggingSteps)
        set(evalSteps, \.evalSteps); set(saveSteps, \.saveSteps); set(saveTotalLimit, \.saveTotalLimit)
        set(earlyStoppingPatience, \.earlyStoppingPatience); set(output, \.outputDirectory)
        if resume { c.resume = true }
        if overwrite { c.overwriteOutputDirectory = true }
        if skipBadLines { c.skipBadLines = true }
        if fullDeterminism { c.fullDeterminism = true }
        if shardBase { c.shardBase = true }
        if let shardAdapters { c.shardAdapters = shardAdapters == .on }
        if let shardHead { c.shardHead = shardHead == .on }
        set(metricForBest, \.metricForBestModel)
        if let greaterIsBetter { c.greaterIsBetter = greaterIsBetter }
        if let evalMetrics { c.evalMetrics = evalMetrics.split(separator: ",").map { $0.filter { !$0.isWhitespace } } }
        set(generationEvalExamples, \.generationEvalExamples); set(generationMaxNewTokens, \.generationMaxNewTokens)
        if let choice = try computeDTypeOption.choice() { c.computeDType = choice }
        try c.validate()
        if checkOutput { try Trainer.checkOutputDirectory(c) }  // before minutes of loading
        return c
    }

    func run() throws {
        if let gpuMemory, !(gpuMemory > 0 && gpuMemory.isFinite) {
            throw ValidationError("--gpu-memory must be a positive number of GiB, got \(gpuMemory)")
        }
        let environment = LaunchEnvironment.processEnvironment()
        if let job = try LaunchEnvironment.from(environment) {
            // One rank of a job (started by --gpus/--world, torchrun or SLURM): its error goes to the launcher too.
            do { try train(job: job) } catch {
                // A rank stopped by another's failure leaves the report to that rank.
                if !(error is RankFailedError) { Launcher.reportRankError("\(error)") }
                throw error
            }
        } else if gpus != nil || world != nil {
            try launch(environment)
        } else {
            try train(job: nil)
        }
    }

    func train(job: LaunchEnvironment?) throws {
        let rank = job?.rank ?? 0
        let say: (String) -> Void = rank == 0 ? { printError($0) } : { _ in }
        let c = try configuration(checkOutput: rank == 0)
        if let job, device.lowercased() != "cpu" {
            // Before CUDA starts: this rank's GPU (the one the launcher gave it, or the LOCAL_RANK-th visible one).
            let visible = getenv("CUDA_VISIBLE_DEVICES").map { String(cString: $0) }
            setenv("CUDA_VISIBLE_DEVICES", try LaunchEnvironment.visibleDevice(localRank: job.localRank, visible: visible), 1)
        }
        let trainingDevice = try ComputeDevice.choose(device, computeDType: c.computeDType == .auto ? nil : c.computeDType)
        let collective: Collective = try job.map { try Self.joinJob($0, device: trainingDevice) } ?? LocalCollective()
        do {
            try train(c, device: trainingDevice, collective: collective, say: say)
        } catch {
            collective.abort("\(error)")
            throw error
        }
    }

    func train(_ c: TrainingConfiguration, device trainingDevice: ComputeDevice, collective: Collective, say printError: @escaping (String) -> Void) throws {
        if let gpuMemory, case .cuda(let context) = trainingDevice { try context.setMemoryBudget(gib: gpuMemory) }
        let loaded = try ModelLoader.load(c.model, quantization: try BaseQuantization.parse(c.quantize), log: { printError($0) })
        printError("model: \(loaded.description)")
        // Pre-tokenized data needs no tokenizer: the dataset asks for one only on a line that does.
        let tokenizer = loaded.tokenizer
        let vocabularySize = loaded.model.config.vocabularySize
        let formatting = SFTFormatting(completionOnly: c.completionOnlyLoss, maxSequenceLength: c.maxSeqLength, skipBadLines: c.skipBadLines)
        var train: [TokenizedExample] = []
        for path in c.datasets {
            let dataset = try SFTDataset(path: path, tokenizer: tokenizer, template: loaded.template, formatting: formatting,
                                         vocabularySize: vocabularySize)
            for skipped in dataset.skippedLines { printError("skipped \(skipped)") }
            if !dataset.skippedLines.isEmpty { printError("\(path): skipped \(dataset.skippedLines.count) malformed lines") }
            train += dataset.examples
        }
        var eval: [TokenizedExample] = []
        if let evalPath = c.evalDataset {
            let dataset = try SFTDataset(path: evalPath, tokenizer: tokenizer, template: loaded.template, formatting: formatting,
                                         vocabularySize: vocabularySize)
            for skipped in dataset.skippedLines { printError("skipped \(skipped)") }
            eval = dataset.examples
        } else if c.evalSplit > 0 {
            (train, eval) = DatasetSplit.holdOut(train, fraction: c.evalSplit, seed: c.seed)
        }
        printError("data: \(train.count) training examples (\(train.reduce(0) { $0 + $1.tokens.count }) tokens), \(eval.count) eval examples")
        // Warnings only where some token counts: the trainer turns data that counts none into an error saying why.
        for (examples, what) in [(train, "training data"), (eval, "evaluation data")] {
            let report = CountedTokensReport(examples)
            guard report.countedTokens > 0 else { continue }
            for warning in report.warnings(what, maxSeqLength: c.maxSeqLength) { printError(warning) }
        }
        let padID = tokenizer?.padTokenID ?? tokenizer?.eosTokenID ?? 0
        let trainer: Trainer
        var usedDevice = trainingDevice
        do {
            trainer = try Trainer(configuration: c, model: loaded.model, train: train, eval: eval, padID: padID,
                                  baseDirectory: loaded.directory, device: trainingDevice, collective: collective)
        } catch where device.lowercased() == "auto" && trainingDevice.isCUDA && collective.worldSize == 1 {
            usedDevice = .cpu
            // What the GPU trainer cannot hold or does not support (memory, head dimensions): the CPU, saying why.
            printError("device: cpu after all (auto: \(error))")
            trainer = try Trainer(configuration: c, model: loaded.model, train: train, eval: eval, padID: padID,
                                  baseDirectory: loaded.directory, device: .cpu)
        }
        try prepareCard(trainer, loaded: loaded, c: c, train: train, eval: eval, device: usedDevice)
        if !collective.isMainRank {
            // Rank 0 prints the job's lines; each other rank keeps its own in OUTPUT/rank-R.log (its device, its
            // progress: the same global losses and tokens/s, so a rank that lags or stops shows there).
            let rankLog = RankLog(path: c.outputDirectory + "/rank-\(collective.rank).log")
            trainer.log = { rankLog.append($0) }
            trainer.showProgress = { rankLog.append($0) }
        }
        if let failure = Self.testFailure(rank: collective.rank) {
            // A test hook (QLORA_TEST_FAIL_RANK=RANK:STEP): this rank dies at that step, as a crashed rank would.
            trainer.shouldStop = { step in
                if step == failure { Launcher.reportRankError("test failure of rank \(collective.rank) at step \(step)"); Glibc.exit(3) }
                return false
            }
        }
        let summary = try trainer.run()
        guard collective.isMainRank else { return }
        var lines = ["trained \(summary.steps) steps at \(Int(summary.tokensPerSecond)) tokens/s; adapter in \(summary.outputDirectory)"]
        if let loss = summary.finalTrainLoss { lines.append(String(cFormat: "last train loss %.4f", loss)) }
        if let best = summary.bestEvalLoss, let step = summary.bestStep {
            var text = String(cFormat: "best eval loss %.4f (perplexity %.3f)", best, exp(best)) + " at step \(step)"
            if summary.bestMetricName != "eval_loss", let value = summary.bestMetric {
                text = "best \(summary.bestMetricName) " + String(cFormat: "%.4f", value) + " at step \(step) (eval loss " + String(cFormat: "%.4f", best) + ")"
            }
            lines.append(text)
        }
        if summary.stoppedEarly { lines.append("stopped early") }
        if collective.worldSize > 1 {
            // The job's summary: tokens of all ranks, and each rank's peak memory.
            let peaks = summary.rankPeakBytes.map { DeviceAllocator.formatGiB($0) }.joined(separator: ", ")
            let sharded = c.shardedParts
            lines.append("\(collective.worldSize) ranks\(sharded.isEmpty ? "" : " (\(sharded.joined(separator: ", ")) sharded)"), "
                         + "\(Int(summary.tokensPerSecond / Double(collective.worldSize))) tokens/s per rank, peak memory per rank \(peaks) GiB")
        }
        print(lines.joined(separator: "; "))
    }
}

// MARK: - Data parallel

extension TrainCommand {
    /// The collective of this rank: NCCL on a GPU (rank 0's unique id handed out at the rendezvous), sockets on the CPU.
    static func joinJob(_ job: LaunchEnvironment, device: ComputeDevice) throws -> Collective {
        guard job.worldSize > 1 else { return LocalCollective() }
        let timeout = try Rendezvous.defaultTimeout()
        switch device {
        case .cpu:
            return try SocketCollective(rank: job.rank, worldSize: job.worldSize, host: job.masterAddress, port: job.masterPort, timeout: timeout)
        case .cuda(let context):
            let nccl = try NCCLLibrary()
            let id = job.rank == 0 ? try nccl.uniqueID() : []
            let meeting = try SocketCollective(rank: job.rank, worldSize: job.worldSize, host: job.masterAddress, port: job.masterPort,
                                               payload: id, payloadBytes: NCCLLibrary.uniqueIDBytes, timeout: timeout)
            if job.rank == 0 { printError("data parallel: NCCL \(nccl.versionString), \(job.worldSize) ranks") }
            return try NCCLCollective(nccl: nccl, context: context, rank: job.rank, worldSize: job.worldSize, uniqueID: meeting.payload)
        }
    }

    /// QLORA_TEST_FAIL_RANK=RANK:STEP (tests only): the step at which `rank` dies.
    static func testFailure(rank: Int) -> Int? {
        guard let text = getenv("QLORA_TEST_FAIL_RANK").map({ String(cString: $0) }) else { return nil }
        let parts = text.split(separator: ":").compactMap { Int($0) }
        return parts.count == 2 && parts[0] == rank ? parts[1] : nil
    }

    /// The GPU indices of --gpus: "N" is the first N, "0,2,3" those.
    static func gpuList(_ text: String) throws -> [Int] {
        if !text.contains(","), let n = Int(text) {
            guard n >= 1 else { throw ValidationError("--gpus \(text): expected a count of at least 1 or a list of GPU indices such as 0,2,3") }
            return Array(0..<n)
        }
        let ids = text.split(separator: ",").map { Int($0.filter { !$0.isWhitespace }) }
        guard !ids.isEmpty, ids.allSatisfy({ ($0 ?? -1) >= 0 }) else {
            throw ValidationError("--gpus \(text): expected a count or a list of GPU indices such as 0,2,3")
        }
        let list = ids.map { $0! }
        guard Set(list).count == list.count else { throw ValidationError("--gpus \(text): a GPU is listed twice") }
        return list
    }

    /// The arguments of the children: these, without the launcher's own options (and --device, which it sets).
    static func childArguments(_ arguments: [String]) -> [String] {
        var result: [String] = []
        var skipNext = false
        for argument in arguments {
            if skipNext { skipNext = false; continue }
            if ["--gpus", "--world", "--device"].contains(argument) { skipNext = true; continue }
            if ["--gpus=", "--world=", "--device="].contains(where: { argument.hasPrefix($0) }) { continue }
            result.append(argument)
        }
        return result
    }

    /// `--gpus` / `--world`: starts one rank per GPU (or CPU process) and watches them.
    func launch(_ environment: [String: String]) throws {
        guard gpus == nil || world == nil else { throw ValidationError("--gpus and --world exclude each other: --gpus for GPUs, --world for CPU processes") }
        _ = try configuration()  // the settings and the output folder are checked once, before any rank starts
        var ranks: [Launcher.Rank] = []
        var arguments = Self.childArguments(Array(CommandLine.arguments.dropFirst()))
        if let gpus {
            let list = try Self.gpuList(gpus)
            let available: Int
            do { available = try CUDADriver.shared().deviceCount() } catch {
                throw ValidationError("--gpus \(gpus): no usable GPU on this machine (\(error)); train on the CPU without --gpus, or with --world N for CPU processes")
            }
            guard available > 0 else { throw ValidationError("--gpus \(gpus): the CUDA driver reports no GPU on this machine; train without --gpus") }
            if let missing = list.first(where: { $0 >= available }) {
                throw ValidationError("--gpus \(gpus): GPU \(missing) does not exist; this machine shows \(available) GPU(s), 0 to \(available - 1)")
            }
            arguments += ["--device", "cuda"]
            ranks = list.enumerated().map { Launcher.Rank(rank: $0.offset, environment: ["CUDA_VISIBLE_DEVICES": String($0.element)]) }
        } else if let world {
            guard world >= 1 else { throw ValidationError("--world \(world): expected at least 1 process") }
            arguments += ["--device", "cpu"]
            ranks = (0..<world).map { Launcher.Rank(rank: $0, environment: [:]) }
        }
        var common = environment
        common["WORLD_SIZE"] = String(ranks.count)
        common["LOCAL_WORLD_SIZE"] = String(ranks.count)
        common["MASTER_ADDR"] = environment["MASTER_ADDR"] ?? "127.0.0.1"
        common["MASTER_PORT"] = try environment["MASTER_PORT"] ?? String(Launcher.freePort())
        common["NCCL_NVLS_ENABLE"] = "0"
        for i in ranks.indices {
            ranks[i].environment["RANK"] = String(ranks[i].rank)
            ranks[i].environment["LOCAL_RANK"] = String(ranks[i].rank)
        }
        printError("data parallel: \(ranks.count) \(gpus != nil ? "GPU" : "CPU") ranks, rendezvous at \(common["MASTER_ADDR"]!):\(common["MASTER_PORT"]!)")
        try Launcher.run(executable: try Launcher.currentExecutable(), arguments: arguments, environment: common, ranks: ranks) { printError($0) }
    }
}

extension TrainCommand {
    /// The task metrics' prompts and generator (when metric_for_best_model or eval_metrics names one), and the model
    /// card's chat template and example prompt.
    func prepareCard(_ trainer: Trainer, loaded: LoadedModel, c: TrainingConfiguration, train: [TokenizedExample], eval: [TokenizedExample],
                     device: ComputeDevice) throws {
        if let template = ModelCard.chatTemplate(in: loaded.directory) {
            trainer.cardDetails.chatTemplate = template.source
            trainer.cardDetails.chatTemplateFile = template.file
        }
        if let tokenizer = loaded.tokenizer, let example = (eval + train).first {
            // The tokens before the first counted one: the prompt as training saw it (the whole start of a text line).
            let first = example.labels.firstIndex { $0 != -100 } ?? example.tokens.count
            let shown = first > 0 ? Array(example.tokens[..<first]) : Array(example.tokens.prefix(64))
            trainer.cardDetails.examplePrompt = tokenizer.decode(shown)
        }
        let metrics = try c.taskMetrics
        guard !metrics.isEmpty else { return }
        guard let evalPath = c.evalDataset else {
            throw ValidationError("the task metrics (\(metrics.map(\.rawValue).joined(separator: ", "))) need eval_dataset (--eval-data) "
                                  + "with reference answers; eval_split holds out tokenized examples only")
        }
        guard let tokenizer = loaded.tokenizer else { throw ValidationError("\(loaded.directory) has no tokenizer.json: the task metrics need one") }
        let cases = try GenerationEvaluation.cases(path: evalPath, tokenizer: tokenizer, template: loaded.template, limit: c.generationEvalExamples)
        trainer.generation = TrainingGeneration(cases: cases, tokenizer: tokenizer,
                                                stopIDs: Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer))
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// A non-main rank's log file: each line appended as it comes (a progress line without its carriage return). A file
/// that cannot be written is said once on stderr; training goes on.
final class RankLog: @unchecked Sendable {
    let path: String
    private var failed = false

    init(path: String) { self.path = path }

    func append(_ line: String) {
        guard !failed else { return }
        let text = (line.hasPrefix("\r") ? String(line.dropFirst()) : line) + "\n"
        guard let file = fopen(path, "a") else {
            failed = true
            printError("cannot write this rank's log \(path): \(String(cString: strerror(errno)))")
            return
        }
        fputs(text, file)
        fclose(file)
    }
}

/// A switch given as `on` or `off` (a flag whose default depends on another, such as --shard-adapters).
enum OnOff: String, ExpressibleByArgument, CaseIterable {
    case on, off
}
