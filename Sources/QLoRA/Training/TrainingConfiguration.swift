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
    /// Shard the frozen base's blocks over the data-parallel ranks (fsdp_qlora's FULL_SHARD for the 4-bit base): each
    /// rank keeps 1/W of every block and gathers a block just before its use (Parallel/ShardedBase.swift).
    public var shardBase = false
    /// ZeRO-2 for the adapters (Parallel/ShardedAdapters.swift): each rank keeps summed gradients and optimizer state
    /// only for the LoRA tensors it owns. nil: on with shard_base.
    public var shardAdapters: Bool?
    /// The head's loss sharded by vocabulary over the ranks (Parallel/VocabularyParallelLoss.swift). nil: on with
    /// shard_base.
    public var shardHead: Bool?
    /// Whether the adapters are sharded when the run has several ranks (explicit, or following shard_base).
    public var shardsAdapters: Bool { shardAdapters ?? shardBase }
    /// Whether the head's loss is sharded by vocabulary when the run has several ranks.
    public var shardsHead: Bool { shardHead ?? shardBase }
    /// What a job of several ranks shards, as its summary names it (the CPU ranks and the GPU trainer alike).
    public var shardedParts: [String] {
        (shardBase ? ["base"] : []) + (shardsAdapters ? ["adapters"] : []) + (shardsHead ? ["head"] : [])
    }
    /// The GPU's 16-bit compute type (`bnb_4bit_compute_dtype`, or TrainingArguments' `bf16: true` / `fp16: true`):
    /// auto is bf16 where the card has it (compute capability 8.0+), fp16 with loss scaling before (a T4).
    public var computeDType: ComputeDTypeChoice = .auto

    // Bookkeeping
    public var loggingSteps = 10
    /// Where metrics go (transformers' `report_to`): metrics.jsonl, TensorBoard event files in OUTPUT/runs/, both or neither.
    public var reportTo: ReportTargets = .jsonl
    /// Evaluate every N steps (0: at the end of each epoch).
    public var evalSteps = 0
    /// Save a checkpoint every N steps (0: at the end of each epoch).
    public var saveSteps = 0
    /// Keep at most this many checkpoints (0: all); the best one is always kept.
    public var saveTotalLimit = 2
    public var outputDirectory = "runs/qlora"
    /// Stop when the best-model metric has not improved for this many evaluations (0: never).
    public var earlyStoppingPatience = 0
    /// What best/ is chosen by (transformers' `metric_for_best_model`): "loss" (eval_loss) or a task metric of generated
    /// answers (exact_match, rouge_l, bleu, accuracy; "eval_" prefix optional).
    public var metricForBestModel = "eval_loss"
    /// Whether a larger best-model metric is better (transformers' `greater_is_better`); nil: true unless the metric is a loss.
    public var greaterIsBetter: Bool?
    /// More task metrics to compute at each evaluation (the best-model metric, when it is one, is always computed).
    public var evalMetrics: [String] = []
    /// Eval examples answered at each evaluation for the task metrics (the first N of eval_dataset; 0: all).
    public var generationEvalExamples = 64
    /// The most tokens of each answer generated for the task metrics.
    public var generationMaxNewTokens = 64
    public var resume = false
    /// Replace an earlier run in the output folder (transformers' `overwrite_output_dir`); without it, or `resume`,
    /// such a folder is refused.
    public var overwriteOutputDirectory = false

    public init() {}

    /// Reads a YAML file; unknown keys are errors, so that a typo does not silently train with a default.
    public init(yamlFile path: String) throws {
        self.init()
        let (object, lines) = try SimpleYAML.parseWithLines(try FileSystem.readText(path), file: path)
        try apply(object, file: path, lines: lines)
    }

    /// Every YAML key `apply` knows, for the nearest-name suggestion on a typo.
    public static let knownKeys = [
        "model", "model_name_or_path", "quantize", "dataset", "datasets", "train_file", "data", "eval_dataset", "eval_file", "eval_split",
        "max_seq_length", "max_length", "packing", "completion_only_loss", "completion_only", "skip_bad_lines", "lora_r", "r", "lora_alpha",
        "lora_dropout", "target_modules", "use_rslora", "per_device_train_batch_size", "batch_size", "micro_batch_size",
        "gradient_accumulation_steps", "num_train_epochs", "epochs", "max_steps", "learning_rate", "lr", "warmup_ratio", "warmup_steps",
        "lr_scheduler_type", "scheduler", "weight_decay", "max_grad_norm", "optim", "optimizer", "gradient_checkpointing", "seed",
        "full_determinism", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "output_dir", "early_stopping_patience",
        "resume", "resume_from_checkpoint", "overwrite_output_dir", "report_to", "metric_for_best_model", "greater_is_better",
        "eval_metrics", "generation_eval_examples", "generation_max_new_tokens",
        "bnb_4bit_compute_dtype", "compute_dtype", "bf16", "fp16", "shard_base", "shard_adapters", "shard_head",
    ]

    public mutating func apply(_ object: JSONObject, file: String, lines: [String: Int] = [:]) throws {
        // Two names of one setting (`lr` and `learning_rate`) in one file: which wins would be a guess.
        var setBy: [String: String] = [:]
        for (key, value) in object {
            let place = lines[key].map { "line \($0): '\(key)'" } ?? "'\(key)'"
            func fail(_ expected: String) -> FileFormatError { FileFormatError(file: file, place: place, "expected \(expected), got \(value.serialized())") }
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
            func field(_ name: String) throws {
                if let other = setBy[name] {
                    throw FileFormatError(file: file, place: place, "sets the same setting as '\(other)' (line \(lines[other] ?? 0)); give one of them")
                }
                setBy[name] = key
            }
            switch key {
            case "model", "model_name_or_path": try field("model"); model = try string()
            case "quantize": quantize = try string()
            case "dataset", "datasets", "train_file", "data": try field("dataset"); datasets = try strings()
            case "eval_dataset", "eval_file": try field("eval_dataset"); evalDataset = try string()
            case "eval_split": evalSplit = try double()
            case "max_seq_length", "max_length": try field("max_seq_length"); maxSeqLength = try int()
            case "packing": packing = try bool()
            case "completion_only_loss", "completion_only": try field("completion_only_loss"); completionOnlyLoss = try bool()
            case "skip_bad_lines": skipBadLines = try bool()
            case "lora_r", "r": try field("lora_r"); loraR = try int()
            case "lora_alpha": loraAlpha = try double()
            case "lora_dropout": loraDropout = try double()
            case "target_modules": targetModules = try strings()
            case "use_rslora": useRSLoRA = try bool()
            case "per_device_train_batch_size", "batch_size", "micro_batch_size": try field("batch_size"); batchSize = try int()
            case "gradient_accumulation_steps": gradientAccumulationSteps = try int()
            case "num_train_epochs", "epochs": try field("num_train_epochs"); epochs = try double()
            case "max_steps": maxSteps = try int()
            case "learning_rate", "lr": try field("learning_rate"); learningRate = try double()
            case "warmup_ratio": warmupRatio = try double()
            case "warmup_steps": warmupSteps = try int()
            case "lr_scheduler_type", "scheduler": try field("lr_scheduler_type"); scheduler = try string()
            case "weight_decay": weightDecay = try double()
            case "max_grad_norm": maxGradNorm = try double()
            case "optim", "optimizer": try field("optim"); optimizer = try string()
            case "gradient_checkpointing": gradientCheckpointing = try bool()
            case "seed":
                // numpy (and so transformers' set_seed) takes seeds in 0 ..< 2^32; ours is any 64-bit unsigned value.
                guard let v = value.int, v >= 0 else { throw fail("a non-negative integer") }
                seed = UInt64(v)
            case "full_determinism": fullDeterminism = try bool()
            case "shard_base": shardBase = try bool()
            case "shard_adapters": shardAdapters = try bool()
            case "shard_head": shardHead = try bool()
            case "logging_steps": loggingSteps = try int()
            case "report_to":
                do { reportTo = try ReportTargets.parse(try strings()) } catch let error as UsageError { throw fail("\(ReportTargets.accepted), as a string or a list (\(error.message))") }
            case "eval_steps": evalSteps = try int()
            case "save_steps": saveSteps = try int()
            case "save_total_limit": saveTotalLimit = try int()
            case "output_dir": outputDirectory = try string()
            case "early_stopping_patience": earlyStoppingPatience = try int()
            case "resume", "resume_from_checkpoint": try field("resume"); resume = try bool()
            case "overwrite_output_dir": overwriteOutputDirectory = try bool()
            case "metric_for_best_model": metricForBestModel = try string()
            case "greater_is_better": greaterIsBetter = try bool()
            case "eval_metrics": evalMetrics = try strings()
            case "generation_eval_examples": generationEvalExamples = try int()
            case "generation_max_new_tokens": generationMaxNewTokens = try int()
            case "bnb_4bit_compute_dtype", "compute_dtype":
                try field("compute_dtype")
                do { computeDType = try ComputeDTypeChoice(parsing: try string(), what: key) } catch {
                    throw fail("auto, bfloat16 or float16")
                }
            case "bf16", "fp16":
                // TrainingArguments' switches: true picks that type; false leaves the choice to the card.
                try field("compute_dtype")
                if try bool() { computeDType = key == "bf16" ? .bf16 : .fp16 }
            default:
                let hint = Self.nearestKey(to: key).map { "; did you mean '\($0)'?" } ?? " (see `qlora train --help` for the names)"
                throw FileFormatError(file: file, place: place, "unknown setting" + hint)
            }
        }
    }

    /// The known key closest to `key` by edit distance, when close enough to be a likely typo.
    static func nearestKey(to key: String) -> String? {
        let lowered = key.lowercased().replacing("-", with: "_")
        let scored = knownKeys.map { (key: $0, distance: editDistance(lowered, $0)) }
        guard let best = scored.min(by: { $0.distance < $1.distance }) else { return nil }
        return best.distance <= max(2, lowered.count / 3) ? best.key : nil
    }

    /// Levenshtein distance over characters.
    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        var previous = Array(0...b.count)
        for i in 1...max(a.count, 1) where !a.isEmpty {
            var current = [i] + [Int](repeating: 0, count: b.count)
            for j in 1...max(b.count, 1) where !b.isEmpty {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = current
        }
        return a.isEmpty ? b.count : previous[b.count]
    }

    /// Rejects out-of-range and inconsistent settings before any work starts. Each message names the YAML key and the
    /// flag, the value given and what is expected.
    public func validate() throws {
        func check(_ ok: Bool, _ key: String, _ expected: String, _ value: Any) throws {
            if !ok {
                let flag = Self.flags[key].map { " (\($0))" } ?? ""
                throw UsageError("\(key)\(flag) must be \(expected), got \(value)")
            }
        }
        func positive(_ x: Double) -> Bool { x.isFinite && x > 0 }
        if datasets.isEmpty { throw UsageError("no training data: give --data FILE.jsonl (or `dataset:` in the config)") }
        try check(!model.isEmpty, "model", "a model folder or known name", "an empty name")
        try check(["nf4", "fp4", "none"].contains(quantize), "quantize", "nf4, fp4 or none", "'\(quantize)'")
        try check(evalSplit.isFinite && (0...0.5).contains(evalSplit), "eval_split", "a fraction between 0 and 0.5", evalSplit)
        try check(maxSeqLength >= 2 && maxSeqLength <= 1 << 20, "max_seq_length", "an integer from 2 to 1048576", maxSeqLength)
        try check(loraR > 0 && loraR <= 1 << 16, "lora_r", "a positive integer (at most 65536)", loraR)
        try check(positive(loraAlpha), "lora_alpha", "a positive number", loraAlpha)
        try check(loraDropout.isFinite && (0..<1).contains(loraDropout), "lora_dropout", "in [0, 1)", loraDropout)
        try check(!targetModules.isEmpty && !targetModules.contains(""), "target_modules", "a list of module names or all-linear",
                  targetModules.joined(separator: ","))
        try check(batchSize > 0, "per_device_train_batch_size", "a positive integer", batchSize)
        try check(gradientAccumulationSteps > 0, "gradient_accumulation_steps", "a positive integer", gradientAccumulationSteps)
        try check(epochs.isFinite && epochs >= 0, "num_train_epochs", "a non-negative number", epochs)
        try check(maxSteps >= -1, "max_steps", "a positive integer, or -1 to use num_train_epochs", maxSteps)
        try check(maxSteps > 0 || epochs > 0, "num_train_epochs", "positive when max_steps is not set", epochs)
        try check(positive(learningRate), "learning_rate", "a positive number", learningRate)
        try check(warmupRatio.isFinite && (0...1).contains(warmupRatio), "warmup_ratio", "a fraction between 0 and 1", warmupRatio)
        try check(warmupSteps >= 0, "warmup_steps", "a non-negative integer", warmupSteps)
        try check(weightDecay.isFinite && weightDecay >= 0, "weight_decay", "a non-negative number", weightDecay)
        try check(maxGradNorm.isFinite && maxGradNorm >= 0, "max_grad_norm", "a non-negative number (0: no clipping)", maxGradNorm)
        try check(loggingSteps > 0, "logging_steps", "a positive integer", loggingSteps)
        try check(evalSteps >= 0, "eval_steps", "a non-negative integer (0: each epoch)", evalSteps)
        try check(saveSteps >= 0, "save_steps", "a non-negative integer (0: each epoch)", saveSteps)
        try check(saveTotalLimit >= 0, "save_total_limit", "a non-negative integer (0: keep all)", saveTotalLimit)
        try check(earlyStoppingPatience >= 0, "early_stopping_patience", "a non-negative integer (0: never stop early)", earlyStoppingPatience)
        try check(!outputDirectory.isEmpty, "output_dir", "a folder", "an empty path")
        _ = try bestModelMetric
        _ = try taskMetrics
        try check(generationEvalExamples >= 0, "generation_eval_examples", "a non-negative integer (0: all)", generationEvalExamples)
        try check(generationMaxNewTokens > 0, "generation_max_new_tokens", "a positive integer", generationMaxNewTokens)
        if resume && overwriteOutputDirectory {
            throw UsageError("resume (--resume) continues the run in \(outputDirectory) and overwrite_output_dir (--overwrite) replaces it: give one")
        }
        _ = try OptimizerKind.parse(optimizer)
        _ = try ScheduleKind.parse(scheduler)
    }

    /// The `qlora train` flag of each YAML key, named in validation errors.
    static let flags: [String: String] = [
        "quantize": "--quantize", "eval_split": "--eval-split", "max_seq_length": "--max-seq-length", "lora_r": "--lora-r",
        "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout", "target_modules": "--target-modules", "model": "--model",
        "per_device_train_batch_size": "--batch-size", "gradient_accumulation_steps": "--gradient-accumulation-steps",
        "num_train_epochs": "--epochs", "max_steps": "--max-steps", "learning_rate": "--learning-rate", "warmup_ratio": "--warmup-ratio",
        "warmup_steps": "--warmup-steps", "weight_decay": "--weight-decay", "max_grad_norm": "--max-grad-norm",
        "logging_steps": "--logging-steps", "eval_steps": "--eval-steps", "save_steps": "--save-steps",
        "save_total_limit": "--save-total-limit", "early_stopping_patience": "--early-stopping-patience", "output_dir": "--output",
        "metric_for_best_model": "--metric-for-best", "eval_metrics": "--eval-metrics", "generation_eval_examples": "--generation-eval-examples",
        "generation_max_new_tokens": "--generation-max-new-tokens", "shard_base": "--shard-base",
        "shard_adapters": "--shard-adapters", "shard_head": "--shard-head",
    ]

    /// The best-model metric: nil for the eval loss, else a task metric.
    public var bestModelMetric: TaskMetric? {
        get throws {
            let key = metricForBestModel.lowercased()
            if key == "loss" || key == "eval_loss" { return nil }
            guard let metric = TaskMetric.parse(metricForBestModel) else {
                throw UsageError("metric_for_best_model (--metric-for-best) must be eval_loss or one of "
                                 + TaskMetric.allCases.map(\.rawValue).joined(separator: ", ") + ", got '\(metricForBestModel)'")
            }
            return metric
        }
    }

    /// The best-model metric's name as logged: eval_loss or eval_<metric>.
    public var bestModelMetricKey: String { ((try? bestModelMetric) ?? nil)?.evalKey ?? "eval_loss" }

    /// Whether larger is better for the best-model metric: `greater_is_better`, else as transformers defaults it (false
    /// for a loss, true for the task metrics).
    public var bestModelGreaterIsBetter: Bool { greaterIsBetter ?? !bestModelMetricKey.hasSuffix("loss") }

    /// The task metrics computed at each evaluation: the best-model metric (when it is one), then eval_metrics.
    public var taskMetrics: [TaskMetric] {
        get throws {
            var out: [TaskMetric] = []
            if let best = try bestModelMetric { out.append(best) }
            if !evalMetrics.isEmpty {
                for m in try TaskMetric.parseList(evalMetrics.joined(separator: ","), option: "eval_metrics (--eval-metrics)") where !out.contains(m) {
                    out.append(m)
                }
            }
            return out
        }
    }

    public var loraConfig: LoRAConfig {
        LoRAConfig(rank: loraR, alpha: loraAlpha, dropout: loraDropout, targetModules: targetModules.sorted(), useRSLoRA: useRSLoRA, baseModelNameOrPath: model)
    }
}
