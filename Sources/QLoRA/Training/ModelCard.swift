// README.md beside every saved adapter (checkpoint-N/, best/, the final adapter) and merged model: a model card as the
// Hugging Face Hub reads it — a YAML metadata header (`base_model`, `library_name`, `tags`) between "---" lines, then
// Markdown: the base model (name, the SHA-256 of its weights files), the training recipe (every setting that differs
// from the defaults), the data files (lines, bytes, SHA-256), the final and best evaluation metrics, the prompt format
// (the chat template and an example rendered prompt) and how to load it (PEFT, transformers, qlora).

#if canImport(Glibc)
import Glibc
#endif

/// What the card says beyond what the trainer knows: set by the command that has the tokenizer and template.
public struct ModelCardDetails: Sendable {
    /// The chat template's source and where it came from (chat_template.jinja or tokenizer_config.json).
    public var chatTemplate: String?
    public var chatTemplateFile: String?
    /// One prompt as the model sees it in training and evaluation (the first eval or training example's prompt).
    public var examplePrompt: String?

    public init(chatTemplate: String? = nil, chatTemplateFile: String? = nil, examplePrompt: String? = nil) {
        self.chatTemplate = chatTemplate
        self.chatTemplateFile = chatTemplateFile
        self.examplePrompt = examplePrompt
    }
}

/// A file the card names, with its size, line count (for data) and SHA-256.
public struct CardFile: Sendable, Equatable {
    public var path: String
    public var bytes: Int
    public var lines: Int
    public var sha256: String

    public static func describe(_ path: String) throws -> CardFile {
        let (hex, bytes, lines) = try SHA256.file(path)
        return CardFile(path: path, bytes: bytes, lines: lines, sha256: hex)
    }
}

/// What the adapter was saved as.
enum SavedAdapterKind {
    case checkpoint(Int), best(Int), final(Int)

    var description: String {
        switch self {
        case .checkpoint(let step): "the checkpoint at step \(step)"
        case .best(let step): "the best adapter (step \(step))"
        case .final(let step): "the adapter this run kept (step \(step))"
        }
    }
}

public enum ModelCard {
    /// Hub repositories of the catalog's models (the card's `base_model` links there).
    static let hubIDs = ["smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"]

    /// The base model's name for `base_model`: a catalog model's Hub repository, else the name as given.
    static func baseModelID(_ name: String) -> String { hubIDs[name.lowercased()] ?? name }

    /// The weights files of a model folder (safetensors, GGUF, PyTorch bins), sorted, with their hashes.
    public static func weightsFiles(in directory: String) throws -> [CardFile] {
        let names = try FileSystem.listDirectory(directory).filter { n in
            [".safetensors", ".gguf", ".bin", ".pth", ".pt"].contains { n.hasSuffix($0) } && !n.hasPrefix(".")
        }.sorted()
        return try names.map { try CardFile.describe(directory + "/" + $0) }
    }

    /// The YAML header's value, quoted when YAML would read it as something else.
    static func yamlString(_ s: String) -> String {
        let plain = !s.isEmpty && s.allSatisfy { $0.isLetter || $0.isNumber || "-_./".contains($0) } && !s.hasPrefix("-")
            && !["true", "false", "null", "yes", "no", "on", "off", "~"].contains(s.lowercased()) && Double(s) == nil
        if plain { return s }
        return "\"" + s.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"") + "\""
    }

    static func header(baseModel: String, library: String, tags: [String], extra: [(String, String)] = []) -> String {
        var out = "---\nbase_model: \(yamlString(baseModel))\nlibrary_name: \(library)\npipeline_tag: text-generation\n"
        for (k, v) in extra { out += "\(k): \(yamlString(v))\n" }
        out += "tags:\n" + tags.map { "- \(yamlString($0))\n" }.joined() + "---\n"
        return out
    }

    static func code(_ text: String, _ language: String = "") -> String {
        // A fence longer than any run of backticks inside.
        var fence = "```"
        while text.contains(fence) { fence += "`" }
        return fence + language + "\n" + text + (text.hasSuffix("\n") ? "" : "\n") + fence + "\n"
    }

    static func cell(_ s: String) -> String { s.replacing("|", with: "\\|").replacing("\n", with: " ") }

    static func filesTable(_ files: [CardFile], lines: Bool) -> String {
        var out = lines ? "| file | lines | bytes | SHA-256 |\n| --- | --- | --- | --- |\n" : "| file | bytes | SHA-256 |\n| --- | --- | --- |\n"
        for f in files {
            out += "| `\(cell(f.path))` | " + (lines ? "\(f.lines) | " : "") + "\(f.bytes) | `\(f.sha256)` |\n"
        }
        return out
    }

    /// The settings of `c` that differ from `TrainingConfiguration()`, by YAML key, in a stable order.
    static func changedSettings(_ c: TrainingConfiguration) -> [(key: String, value: String, defaultValue: String)] {
        let d = TrainingConfiguration()
        func text(_ v: Any) -> String {
            if let list = v as? [String] { return "[" + list.joined(separator: ", ") + "]" }
            return "\(v)"
        }
        func optional(_ v: String?) -> String { v ?? "unset" }
        func optional(_ v: Bool?) -> String { v.map { "\($0)" } ?? "unset" }
        let rows: [(String, Any, Any)] = [
            ("model", c.model, d.model), ("quantize", c.quantize, d.quantize), ("dataset", c.datasets, d.datasets),
            ("eval_dataset", optional(c.evalDataset), optional(d.evalDataset)), ("eval_split", c.evalSplit, d.evalSplit),
            ("max_seq_length", c.maxSeqLength, d.maxSeqLength), ("packing", c.packing, d.packing),
            ("completion_only_loss", c.completionOnlyLoss, d.completionOnlyLoss), ("lora_r", c.loraR, d.loraR),
            ("lora_alpha", c.loraAlpha, d.loraAlpha), ("lora_dropout", c.loraDropout, d.loraDropout),
            ("target_modules", c.targetModules, d.targetModules), ("use_rslora", c.useRSLoRA, d.useRSLoRA),
            ("per_device_train_batch_size", c.batchSize, d.batchSize),
            ("gradient_accumulation_steps", c.gradientAccumulationSteps, d.gradientAccumulationSteps),
            ("num_train_epochs", c.epochs, d.epochs), ("max_steps", c.maxSteps, d.maxSteps), ("learning_rate", c.learningRate, d.learningRate),
            ("warmup_ratio", c.warmupRatio, d.warmupRatio), ("warmup_steps", c.warmupSteps, d.warmupSteps),
            ("lr_scheduler_type", c.scheduler, d.scheduler), ("weight_decay", c.weightDecay, d.weightDecay),
            ("max_grad_norm", c.maxGradNorm, d.maxGradNorm), ("optim", c.optimizer, d.optimizer),
            ("gradient_checkpointing", c.gradientCheckpointing, d.gradientCheckpointing), ("seed", c.seed, d.seed),
            ("full_determinism", c.fullDeterminism, d.fullDeterminism), ("logging_steps", c.loggingSteps, d.loggingSteps),
            ("eval_steps", c.evalSteps, d.evalSteps), ("save_steps", c.saveSteps, d.saveSteps),
            ("save_total_limit", c.saveTotalLimit, d.saveTotalLimit), ("early_stopping_patience", c.earlyStoppingPatience, d.earlyStoppingPatience),
            ("metric_for_best_model", c.metricForBestModel, d.metricForBestModel), ("greater_is_better", optional(c.greaterIsBetter), optional(d.greaterIsBetter)), ("report_to", c.reportTo.description, d.reportTo.description),
            ("eval_metrics", c.evalMetrics, d.evalMetrics), ("generation_eval_examples", c.generationEvalExamples, d.generationEvalExamples),
            ("generation_max_new_tokens", c.generationMaxNewTokens, d.generationMaxNewTokens),
        ]
        return rows.compactMap { key, value, defaultValue in
            let v = text(value), dv = text(defaultValue)
            return v == dv ? nil : (key, v, dv)
        }
    }

    /// Metrics of one evaluation: eval_loss, eval_perplexity and the task metrics.
    struct Evaluation {
        var step: Int
        var values: [(String, Double)]
    }

    /// The card of a trained adapter.
    static func adapter(configuration c: TrainingConfiguration, lora: LoRAConfig, kind: SavedAdapterKind, stepsTrained: Int,
                        baseDirectory: String?, baseFiles: [CardFile], dataFiles: [(role: String, file: CardFile?, path: String)],
                        latest: Evaluation?, best: Evaluation?, details: ModelCardDetails) -> String {
        let base = baseModelID(c.model)
        var out = header(baseModel: base, library: "peft",
                         tags: ["base_model:adapter:\(base)", "lora", "qlora", "sft", "swift-qlora", "text-generation"])
        out += "\n# LoRA adapter for \(base)\n\n"
        out += "A LoRA adapter in PEFT's format, QLoRA-trained by swift-qlora \(QLoRAVersion.version) on a frozen \(c.quantize == "none" ? "dense" : c.quantize.uppercased()) base. "
        out += "This folder holds \(kind.description), after \(stepsTrained) optimizer steps.\n\n"

        out += "## Base model\n\n"
        out += "- name: `\(c.model)`" + (base != c.model ? " (Hugging Face: [\(base)](https://huggingface.co/\(base)))" : "") + "\n"
        if let baseDirectory { out += "- loaded from: `\(baseDirectory)`\n" }
        out += "- weights:\n\n" + (baseFiles.isEmpty ? "(no weights file was found in the base folder)\n" : filesTable(baseFiles, lines: false)) + "\n"

        out += "## Training recipe\n\n"
        out += "LoRA r=\(lora.rank), alpha=\(Self.number(lora.alpha)), dropout=\(Self.number(lora.dropout)), "
            + "\(lora.useRSLoRA ? "rsLoRA scaling alpha/sqrt(r)" : "scaling alpha/r") on \(lora.targetModules.joined(separator: ", ")); "
            + "base quantized to \(c.quantize); optimizer \(c.optimizer), learning rate \(Self.number(c.learningRate)) (\(c.scheduler)).\n\n"
        let changed = changedSettings(c)
        out += "Every setting that differs from the defaults (`qlora train --config` takes these YAML keys):\n\n| setting | value | default |\n| --- | --- | --- |\n"
        for row in changed { out += "| `\(row.key)` | \(cell(row.value)) | \(cell(row.defaultValue)) |\n" }
        out += "\n"

        out += "## Data\n\n| role | file | lines | bytes | SHA-256 |\n| --- | --- | --- | --- | --- |\n"
        for d in dataFiles {
            if let f = d.file {
                out += "| \(d.role) | `\(cell(f.path))` | \(f.lines) | \(f.bytes) | `\(f.sha256)` |\n"
            } else {
                out += "| \(d.role) | `\(cell(d.path))` | not readable when the card was written | | |\n"
            }
        }
        if c.evalDataset == nil && c.evalSplit > 0 {
            out += "\nEvaluation held out \(Self.number(c.evalSplit * 100))% of the training examples (seeded by `seed`).\n"
        }
        out += "\n"

        out += "## Evaluation\n\n"
        let metricName = c.bestModelMetricKey
        out += "The best adapter is chosen by `\(metricName)` (\(c.bestModelGreaterIsBetter ? "greater" : "smaller") is better).\n\n"
        if latest == nil && best == nil {
            out += "No evaluation ran before this save (no eval data, or none due yet).\n\n"
        } else {
            var names: [String] = []
            for e in [latest, best].compactMap({ $0 }) { for (k, _) in e.values where !names.contains(k) { names.append(k) } }
            out += "| metric | latest evaluation" + (latest.map { " (step \($0.step))" } ?? "") + " | best" + (best.map { " (step \($0.step))" } ?? "") + " |\n| --- | --- | --- |\n"
            for name in names {
                func value(_ e: Evaluation?) -> String { e?.values.first { $0.0 == name }.map { Self.number($0.1, digits: 4) } ?? "" }
                out += "| \(name) | \(value(latest)) | \(value(best)) |\n"
            }
            out += "\nexact_match, accuracy and rouge_l are fractions (rouge_l: rouge-score's ROUGE-L F), bleu is sacrebleu's corpus BLEU (0-100); "
                + "the task metrics are measured on the first \(c.generationEvalExamples == 0 ? "" : "\(c.generationEvalExamples) ")eval examples, greedy, "
                + "up to \(c.generationMaxNewTokens) new tokens.\n\n"
        }

        out += "## Prompt format\n\n"
        if let template = details.chatTemplate {
            out += "`messages` examples are rendered with the base model's chat template" + (details.chatTemplateFile.map { " (the base's `\($0)`)" } ?? "") + ":\n\n"
            out += code(template, "jinja") + "\n"
        } else {
            out += "The base model has no chat template: prompts are the text as given (prompt/completion lines: BOS + prompt; Alpaca lines: the Alpaca prompt).\n\n"
        }
        if let example = details.examplePrompt {
            out += "An example prompt as the model sees it in training and evaluation (the answer follows it):\n\n" + code(example, "text") + "\n"
        }

        let folder = "path/to/this/folder"
        out += "## How to load\n\nWith PEFT (it reads `base_model_name_or_path` from `adapter_config.json`, here `\(lora.baseModelNameOrPath)`):\n\n"
        out += code("""
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained("\(folder)")
        tokenizer = AutoTokenizer.from_pretrained("\(folder)")
        """, "python") + "\n"
        out += "With transformers (PEFT installed), on a base you load yourself:\n\n"
        out += code("""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained("\(base)")
        model.load_adapter("\(folder)")
        """, "python") + "\n"
        out += "With qlora:\n\n"
        out += code("""
        qlora generate --model \(c.model) --adapter \(folder) --chat --prompt "..."
        qlora eval --model \(c.model) --adapter \(folder) --data eval.jsonl --generate
        qlora merge --model \(c.model) --adapter \(folder) --out merged
        """, "bash")
        return out
    }

    /// The card of a merged model: the base and adapter, with the adapter card's recipe, data, evaluation and prompt
    /// sections carried over when the adapter has one of ours.
    public static func merged(baseName: String, baseDirectory: String, baseFiles: [CardFile], adapterDirectory: String,
                              adapterFiles: [CardFile], lora: LoRAConfig, chatTemplate: String?, fromQuantizedBase: Bool) throws -> String {
        let base = baseModelID(baseName)
        var out = header(baseModel: base, library: "transformers", tags: ["lora", "qlora", "merged", "swift-qlora", "text-generation"],
                         extra: [("base_model_relation", "finetune")])
        out += "\n# \(base) with a LoRA adapter merged in\n\n"
        out += "The adapter's B·A·scale added to the base's \(fromQuantizedBase ? "dequantized 4-bit" : "original") weights and saved in bf16 "
            + "by swift-qlora \(QLoRAVersion.version) (`qlora merge`); transformers loads it without PEFT.\n\n"
        out += "## Base model\n\n- name: `\(baseName)`\n- loaded from: `\(baseDirectory)`\n- weights:\n\n"
            + (baseFiles.isEmpty ? "(no weights file was found in the base folder)\n" : filesTable(baseFiles, lines: false)) + "\n"
        out += "## Adapter\n\n- folder: `\(adapterDirectory)`\n- LoRA r=\(lora.rank), alpha=\(number(lora.alpha)), "
            + "\(lora.useRSLoRA ? "rsLoRA" : "scaling alpha/r"), on \(lora.targetModules.joined(separator: ", "))\n\n"
            + filesTable(adapterFiles, lines: false) + "\n"
        let carried = ["Training recipe", "Data", "Evaluation", "Prompt format"]
        var found = Set<String>()
        let adapterCard = adapterDirectory + "/README.md"
        if FileSystem.exists(adapterCard) {
            for (title, body) in sections(try FileSystem.readText(adapterCard)) where carried.contains(title) {
                out += "## \(title)\n\n(From the adapter's card.)\n\n" + body
                found.insert(title)
            }
        }
        if !found.contains("Prompt format") {
            out += "## Prompt format\n\n" + (chatTemplate.map { "The base model's chat template:\n\n" + code($0, "jinja") + "\n" }
                ?? "The base model has no chat template.\n\n")
        }
        if found.isEmpty { out += "The adapter folder has no swift-qlora card, so its training recipe, data and metrics are not known here.\n\n" }
        out += "## How to load\n\n" + code("""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", dtype="bfloat16")
        tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
        """, "python") + "\nWith qlora:\n\n" + code("""
        qlora generate --model path/to/this/folder --chat --prompt "..."
        qlora export --model path/to/this/folder --format gguf --type q8_0 --out model.gguf
        """, "bash")
        return out
    }

    /// The "## " sections of a Markdown text, as (title, body up to the next section).
    static func sections(_ text: String) -> [(String, String)] {
        var out: [(String, String)] = []
        var title: String?, body = ""
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("## ") {
                if let title { out.append((title, body)) }
                title = String(line.dropFirst(3))
                body = ""
            } else if title != nil {
                body += line + "\n"
            }
        }
        if let title { out.append((title, body)) }
        return out
    }

    static func number(_ x: Double, digits: Int? = nil) -> String {
        if let digits { return String(cFormat: "%.\(digits)f", x) }
        return x == x.rounded() && abs(x) < 1e15 ? String(Int(x)) : "\(x)"
    }

    /// The chat template of a model folder, and the file it came from.
    public static func chatTemplate(in directory: String) -> (source: String, file: String)? {
        if let text = try? FileSystem.readText(directory + "/chat_template.jinja") { return (text, "chat_template.jinja") }
        if let bytes = try? FileSystem.readFile(directory + "/tokenizer_config.json"), let json = try? JSONValue.parse(bytes: bytes),
           let template = json["chat_template"]?.string {
            return (template, "tokenizer_config.json")
        }
        return nil
    }
}

/// How the trainer computes task metrics at each evaluation: the eval prompts and their references. The generator is
/// the training engine's (`TrainingEngine.batchGenerator`), made for the current adapter weights.
public struct TrainingGeneration {
    public var cases: [GenerationCase]
    public var tokenizer: Tokenizer
    public var stopIDs: Set<Int>

    public init(cases: [GenerationCase], tokenizer: Tokenizer, stopIDs: Set<Int>) {
        self.cases = cases
        self.tokenizer = tokenizer
        self.stopIDs = stopIDs
    }
}

extension Trainer {
    /// The card of an adapter saved now; the base and data hashes are computed once per run.
    func modelCard(kind: SavedAdapterKind, bestStep: Int?) throws -> String {
        let c = configuration
        if cardFiles == nil {
            let base = try baseDirectory.map { try ModelCard.weightsFiles(in: $0) } ?? []
            var data: [(String, CardFile?, String)] = c.datasets.map { ("train", try? CardFile.describe($0), $0) }
            if let e = c.evalDataset { data.append(("eval", try? CardFile.describe(e), e)) }
            cardFiles = (base, data)
        }
        func evaluation(_ step: Int?) -> ModelCard.Evaluation? {
            guard let step, let loss = evalHistory.last(where: { $0.step == step })?.loss else { return nil }
            let tasks = metricHistory.last { $0.step == step }?.values ?? []
            return ModelCard.Evaluation(step: step, values: [("eval_loss", loss), ("eval_perplexity", exp(loss))] + tasks)
        }
        let steps: Int
        switch kind { case .checkpoint(let s), .final(let s), .best(let s): steps = s }
        var stepsTrained = history.last?.step ?? steps
        if case .checkpoint(let s) = kind { stepsTrained = s }
        if case .best(let s) = kind { stepsTrained = s }
        return ModelCard.adapter(configuration: c, lora: loraConfig, kind: kind, stepsTrained: stepsTrained, baseDirectory: baseDirectory,
                                 baseFiles: cardFiles!.base, dataFiles: cardFiles!.data, latest: evaluation(evalHistory.last?.step),
                                 best: evaluation(bestStep), details: cardDetails)
    }
}
