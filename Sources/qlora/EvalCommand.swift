import ArgumentParser
import QLoRA

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Loss and perplexity of a model (with an optional adapter) on a JSONL dataset."
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

    func validate() throws {
        guard maxSeqLength >= 2 && maxSeqLength <= 1 << 20 else {
            throw ValidationError("--max-seq-length must be an integer from 2 to 1048576, got \(maxSeqLength)")
        }
        guard batchSize > 0 else { throw ValidationError("--batch-size must be a positive integer, got \(batchSize)") }
    }

    func run() throws {
        let compute = try ComputeDevice.choose(device, computeDType: try computeDTypeOption.choice())
        let loaded = try modelOptions.load()
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
        if json {
            print(JSONValue.object(JSONObject([
                ("loss", .double(result.mean)), ("perplexity", .double(result.perplexity)), ("tokens", .int(Int64(result.count))),
                ("examples", .int(Int64(dataset.examples.count))), ("skipped_lines", .int(Int64(dataset.skippedLines.count))),
            ])).serialized(.init()))
        } else {
            print(String(cFormat: "loss %.4f  perplexity %.3f  (%d counted tokens, %d examples)", result.mean, result.perplexity,
                         result.count, dataset.examples.count))
        }
    }
}
