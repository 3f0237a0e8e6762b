import ArgumentParser
import QLoRA

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Loss and perplexity of a model (with an optional adapter) on a JSONL dataset; with --generate, task metrics of its answers.",
        discussion: """
        --generate answers every example's prompt (rendered as training renders it: the chat template with the generation \
        prompt, the Alpaca prompt, or the prompt) and compares the answer with the reference (the completion, the last \
        assistant message, the Alpaca output, or the line's "references" list): exact_match (after stripping whitespace), \
        rouge_l (rouge-score's ROUGE-L F, 0-1), bleu (sacrebleu's corpus BLEU with its defaults, 0-100) and accuracy (the \
        answer's first line against the label after SQuAD's normalisation). With --json the answers go to a JSONL file.
        """
    )

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "The JSONL dataset (text, prompt/completion, messages, Alpaca or input_ids lines).")
    var data: String

    @Option(parsing: .unconditional, help: "Examples are cut to this many tokens.")
    var maxSeqLength: Int = 1024

    @Option(parsing: .unconditional, help: "Examples per forward pass.")
    var batchSize: Int = 4

    @Flag(inversion: .prefixedNo, help: "Count only completions / assistant turns, as training does.")
    var completionOnly = true

    @Flag(help: "Skip malformed lines instead of stopping at the first.")
    var skipBadLines = false

    @Flag(help: "Print one JSON line instead of text.")
    var json = false

    @Option(help: "Where to run: auto (the GPU when one is usable, else the CPU), cpu or cuda.")
    var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption

    @Flag(help: "Generate an answer for every example and score it with --metric.")
    var generate = false

    @Option(help: "With --generate, comma-separated: exact_match, rouge_l, bleu, accuracy.")
    var metric: String = "exact_match,rouge_l,bleu,accuracy"

    @Flag(inversion: .prefixedNo, help: "Compute the loss and perplexity (with --generate, --no-loss skips them).")
    var loss = true

    @Option(parsing: .unconditional, help: "With --generate, the most tokens of each answer.")
    var maxNewTokens: Int = 128

    @Option(parsing: .unconditional, help: "With --generate, answer only the first N examples (0: all).")
    var limit: Int = 0

    @Option(help: "With --generate, where the per-example answers go as JSONL (written with --json or when given; default: DATA-NAME.answers.jsonl in the current folder).")
    var answers: String?

    @OptionGroup var sampling: SamplingArguments

    func validate() throws {
        guard loss || generate else { throw ValidationError("--no-loss leaves nothing to compute: give --generate") }
        if generate {
            _ = try TaskMetric.parseList(metric, option: "--metric")
            try Generator.validate(maxTokens: maxNewTokens, sampling: sampling.options)
            guard limit >= 0 else { throw ValidationError("--limit must be a non-negative integer (0: all), got \(limit)") }
        }
        guard maxSeqLength >= 2 && maxSeqLength <= 1 << 20 else {
            throw ValidationError("--max-seq-length must be an integer from 2 to 1048576, got \(maxSeqLength)")
        }
        guard batchSize > 0 else { throw ValidationError("--batch-size must be a positive integer, got \(batchSize)") }
    }

    /// Where the answers go: --answers, or DATA-NAME.answers.jsonl in the current folder.
    var answersPath: String {
        if let answers { return answers }
        let name = String(data.split(separator: "/").last ?? "eval")
        return (name.hasSuffix(".jsonl") ? String(name.dropLast(6)) : name) + ".answers.jsonl"
    }

    func run() throws {
        let metrics = generate ? try TaskMetric.parseList(metric, option: "--metric") : []
        if generate && (json || answers != nil) {
            try FileSystem.refuseOverwrite(output: answersPath, option: "--answers", inputs: [("dataset", data)])
        }
        let compute = try ComputeDevice.choose(device, computeDType: try computeDTypeOption.choice())
        let loaded = try modelOptions.load()
        var fields: [(String, JSONValue)] = []
        var lines: [String] = []
        if loss {
            let result = try lossResult(compute: compute, loaded: loaded)
            fields += result.fields
            lines.append(result.line)
        }
        if generate {
            guard let tokenizer = loaded.tokenizer else { throw ValidationError("\(loaded.directory) has no tokenizer.json: --generate needs one") }
            let cases = try GenerationEvaluation.cases(path: data, tokenizer: tokenizer, template: loaded.template, limit: limit)
            func answer(on compute: ComputeDevice) throws -> GenerationEvaluationResult {
                let generator = try compute.batchGenerator(model: loaded.model)
                printError("answering \(cases.count) prompts on the \(generator.deviceName) (up to \(maxNewTokens) tokens each)...")
                return try GenerationEvaluation.run(
                    cases: cases, metrics: metrics, generator: generator, tokenizer: tokenizer, maxTokens: maxNewTokens,
                    sampling: sampling.options, stopIDs: Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer))
            }
            let result: GenerationEvaluationResult
            do {
                result = try answer(on: compute)
            } catch where device.lowercased() == "auto" && compute.isCUDA {
                printError("device: cpu after all (auto: \(error))")
                result = try answer(on: .cpu)
            }
            fields += result.fields
            fields.append(("generated_examples", .int(Int64(cases.count))))
            fields.append(("generation_seconds", .double((result.seconds * 1000).rounded() / 1000)))
            if json || answers != nil {
                try result.writeAnswers(to: answersPath, tokenizer: tokenizer)
                fields.append(("answers_file", .string(answersPath)))
                printError("answers: \(answersPath)")
            }
            let shown = result.metrics.map { m in
                m.metric.rawValue + " " + (m.value.map { String(cFormat: m.metric == .bleu ? "%.2f" : "%.4f", $0) } ?? "n/a")
            }
            lines.append(shown.joined(separator: "  ") + String(cFormat: "  (%d answers in %.1f s)", cases.count, result.seconds))
        }
        if json {
            print(JSONValue.object(JSONObject(fields)).serialized(.init()))
        } else {
            for line in lines { print(line) }
        }
    }

    /// The loss part: fields for --json and the text line.
    func lossResult(compute: ComputeDevice, loaded: LoadedModel) throws -> (fields: [(String, JSONValue)], line: String) {
        // Pre-tokenized data needs no tokenizer: the dataset asks for one only on a line that does.
        let tokenizer = loaded.tokenizer
        let dataset = try SFTDataset(path: data, tokenizer: tokenizer, template: loaded.template,
                                     formatting: SFTFormatting(completionOnly: completionOnly, maxSequenceLength: maxSeqLength, skipBadLines: skipBadLines),
                                     vocabularySize: loaded.model.config.vocabularySize)
        for skipped in dataset.skippedLines { printError("skipped \(skipped)") }
        // A loss over no token would print 0 (perplexity 1) and mean nothing.
        let report = CountedTokensReport(dataset.examples)
        guard report.countedTokens > 0 else { throw report.noCountedTokensError(data, maxSeqLength: maxSeqLength) }
        for warning in report.warnings(data, maxSeqLength: maxSeqLength) { printError(warning) }
        let batches = Batching.paddedBatches(dataset.examples, size: max(1, batchSize), padID: tokenizer?.padTokenID ?? tokenizer?.eosTokenID ?? 0)
        var engine: CUDATrainingEngine?
        if case .cuda(let context) = compute {
            do {
                engine = try Evaluation.cudaEngine(context: context, model: loaded.model, batches: batches)
                if modelOptions.quantize.lowercased() != "nf4" {
                    printError("note: the GPU evaluates the base in NF4 (quantized on upload as bitsandbytes would)")
                }
            } catch where device.lowercased() == "auto" {
                printError("device: cpu after all (auto: \(error))")
            }
        }
        let result = try engine.map { try Evaluation.loss(engine: $0, batches: batches) }
            ?? Evaluation.loss(model: loaded.model, batches: batches)
        guard result.count > 0 else { throw report.noCountedTokensError(data, maxSeqLength: maxSeqLength) }
        return ([("loss", .double(result.mean)), ("perplexity", .double(result.perplexity)), ("tokens", .int(Int64(result.count))),
                 ("examples", .int(Int64(dataset.examples.count))), ("skipped_lines", .int(Int64(dataset.skippedLines.count)))],
                String(cFormat: "loss %.4f  perplexity %.3f  (%d counted tokens, %d examples)", result.mean, result.perplexity,
                       result.count, dataset.examples.count))
    }
}
