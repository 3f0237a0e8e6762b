import ArgumentParser
import QLoRA

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

    /// The configuration: defaults, then the YAML file, then the flags given.
    func configuration() throws -> TrainingConfiguration {
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
        set(metricForBest, \.metricForBestModel)
        if let greaterIsBetter { c.greaterIsBetter = greaterIsBetter }
        if let evalMetrics { c.evalMetrics = evalMetrics.split(separator: ",").map { $0.filter { !$0.isWhitespace } } }
        set(generationEvalExamples, \.generationEvalExamples); set(generationMaxNewTokens, \.generationMaxNewTokens)
        if let choice = try computeDTypeOption.choice() { c.computeDType = choice }
        try c.validate()
        try Trainer.checkOutputDirectory(c)  // before minutes of loading
        return c
    }

    func run() throws {
        if let gpuMemory, !(gpuMemory > 0 && gpuMemory.isFinite) {
            throw ValidationError("--gpu-memory must be a positive number of GiB, got \(gpuMemory)")
        }
        let c = try configuration()
        let trainingDevice = try ComputeDevice.choose(device, computeDType: c.computeDType == .auto ? nil : c.computeDType)
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
                                  baseDirectory: loaded.directory, device: trainingDevice)
        } catch where device.lowercased() == "auto" && trainingDevice.isCUDA {
            usedDevice = .cpu
            // What the GPU trainer cannot hold or does not support (memory, head dimensions): the CPU, saying why.
            printError("device: cpu after all (auto: \(error))")
            trainer = try Trainer(configuration: c, model: loaded.model, train: train, eval: eval, padID: padID,
                                  baseDirectory: loaded.directory, device: .cpu)
        }
        try prepareCard(trainer, loaded: loaded, c: c, train: train, eval: eval, device: usedDevice)
        let summary = try trainer.run()
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
        print(lines.joined(separator: "; "))
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
