// Everything a training run is configured with. YAML keys are the names transformers/TRL/PEFT users
// know (`learning_rate`, `lr_scheduler_type`, `per_device_train_batch_size`, `lora_r`, ...).

public struct TrainingConfiguration: Sendable, Equatable {
    // Model and data
    public var model = "smollm2-135m"
    /// "nf4" (quantize the base on load), "fp4", or "none" (train on the dense base).
    public var quantize = "nf4"
    public var datasets: [String] = []
    public var evalDataset: String?
    /// Fraction of the training data held out for evaluation when no eval dataset is given (0: none).
    public var evalSplit = 0.0
    public var maxSeqLength = 1024
    public var packing = false
    public var completionOnlyLoss = true
    public var skipBadLines = false

    // LoRA
    public var loraR = 16
    public var loraAlpha = 32.0
    public var loraDropout = 0.05
    public var targetModules = LoRAConfig.llamaProjections
    public var useRSLoRA = false

    // Optimisation
    public var batchSize = 4
    public var gradientAccumulationSteps = 1
    public var epochs = 1.0
    /// Overrides `epochs` when positive.
    public var maxSteps = -1
    public var learningRate = 2e-4
    public var warmupRatio = 0.0
    public var warmupSteps = 0
    public var scheduler = "cosine"
    public var weightDecay = 0.0
    public var maxGradNorm = 1.0
    public var optimizer = "paged_adamw_8bit"
    public var gradientCheckpointing = true
    public var seed: UInt64 = 42
    /// Bit-identical runs on the GPU (transformers' `full_determinism`): attention through the kernels without
    /// atomics, about 2× slower attention. The CPU is always deterministic.
    public var fullDeterminism = false

    // Bookkeeping
    public var loggingSteps = 10
    /// Evaluate every N steps (0: at the end of each epoch).
    public var evalSteps = 0
    /// Save a checkpoint every N steps (0: at the end of each epoch).
    public var saveSteps = 0
    /// Keep at most this many checkpoints (0: all); the best one is always kept.
    public var saveTotalLimit = 2
    public var outputDirectory = "runs/qlora"
    /// Stop when eval loss has not improved for this many evaluations (0: never).
    public var earlyStoppingPatience = 0
    public var resume = false

    public init() {}

    /// Reads a YAML file; unknown keys are errors, so that a typo does not silently train with a default.
    public init(yamlFile path: String) throws {
        self.init()
        let object = try SimpleYAML.parse(try FileSystem.readText(path), file: path)
        try apply(object, file: path)
    }

    public mutating func apply(_ object: JSONObject, file: String) throws {
        for (key, value) in object {
            func fail(_ expected: String) -> FileFormatError { FileFormatError(file: file, place: "'\(key)'", "expected \(expected), got \(value.serialized())") }
            func int() throws -> Int { guard let v = value.int else { throw fail("an integer") }; return v }
            func double() throws -> Double { guard let v = value.double else { throw fail("a number") }; return v }
            func bool() throws -> Bool { guard let v = value.bool else { throw fail("true or false") }; return v }
            func string() throws -> String {
                switch value {
                case .string(let s): return s
                case .int(let i): return String(i)
                case .double(let d): return String(d)
                default: throw fail("a string")
                }
            }
            func strings() throws -> [String] {
                if let s = value.string { return [s] }
                guard let list = value.array else { throw fail("a list of strings") }
                return try list.map { guard let s = $0.string else { throw fail("a list of strings") }; return s }
            }
            switch key {
            case "model", "model_name_or_path": model = try string()
            case "quantize": quantize = try string()
            case "dataset", "datasets", "train_file", "data": datasets = try strings()
            case "eval_dataset", "eval_file": evalDataset = try string()
            case "eval_split": evalSplit = try double()
            case "max_seq_length", "max_length": maxSeqLength = try int()
            case "packing": packing = try bool()
            case "completion_only_loss", "completion_only": completionOnlyLoss = try bool()
            case "skip_bad_lines": skipBadLines = try bool()
            case "lora_r", "r": loraR = try int()
            case "lora_alpha": loraAlpha = try double()
            case "lora_dropout": loraDropout = try double()
            case "target_modules": targetModules = try strings()
            case "use_rslora": useRSLoRA = try bool()
            case "per_device_train_batch_size", "batch_size", "micro_batch_size": batchSize = try int()
            case "gradient_accumulation_steps": gradientAccumulationSteps = try int()
            case "num_train_epochs", "epochs": epochs = try double()
            case "max_steps": maxSteps = try int()
            case "learning_rate", "lr": learningRate = try double()
            case "warmup_ratio": warmupRatio = try double()
            case "warmup_steps": warmupSteps = try int()
            case "lr_scheduler_type", "scheduler": scheduler = try string()
            case "weight_decay": weightDecay = try double()
            case "max_grad_norm": maxGradNorm = try double()
            case "optim", "optimizer": optimizer = try string()
            case "gradient_checkpointing": gradientCheckpointing = try bool()
            case "seed":
                guard let v = UInt64(exactly: try int()) else { throw fail("a non-negative integer") }
                seed = v
            case "full_determinism": fullDeterminism = try bool()
            case "logging_steps": loggingSteps = try int()
            case "eval_steps": evalSteps = try int()
            case "save_steps": saveSteps = try int()
            case "save_total_limit": saveTotalLimit = try int()
            case "output_dir": outputDirectory = try string()
            case "early_stopping_patience": earlyStoppingPatience = try int()
            case "resume", "resume_from_checkpoint": resume = try bool()
            default:
                throw FileFormatError(file: file, place: "'\(key)'", "unknown setting (see `qlora train --help` for the names)")
            }
        }
    }

    /// Rejects inconsistent settings before any work starts.
    public func validate() throws {
        func check(_ ok: Bool, _ message: String) throws { if !ok { throw UsageError(message) } }
        try check(!datasets.isEmpty, "no training data: give --data FILE.jsonl (or `dataset:` in the config)")
        try check(loraR > 0, "lora_r must be positive")
        try check(batchSize > 0 && gradientAccumulationSteps > 0, "batch size and gradient accumulation steps must be positive")
        try check(maxSeqLength >= 2, "max_seq_length must be at least 2")
        try check(learningRate > 0, "learning_rate must be positive")
        try check((0...0.5).contains(evalSplit), "eval_split must be between 0 and 0.5")
        try check(["nf4", "fp4", "none"].contains(quantize), "quantize must be nf4, fp4 or none")
        try check(maxSteps > 0 || epochs > 0, "give a positive num_train_epochs or max_steps")
        try check((0..<1).contains(loraDropout), "lora_dropout must be in [0, 1)")
        _ = try OptimizerKind.parse(optimizer)
        _ = try ScheduleKind.parse(scheduler)
    }

    public var loraConfig: LoRAConfig {
        LoRAConfig(rank: loraR, alpha: loraAlpha, dropout: loraDropout, targetModules: targetModules.sorted(), useRSLoRA: useRSLoRA, baseModelNameOrPath: model)
    }
}
