import ArgumentParser
import QLoRA

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Export a model, with a LoRA adapter merged in, as one GGUF file for llama.cpp and Ollama.",
        discussion: """
        The adapter is merged (W + scale·B·A in fp32) into the base's original weights, never into re-quantized ones, \
        and the result is written with llama.cpp's tensor names and metadata, the tokenizer and the chat template. \
        Norms and other 1-D tensors stay F32. q4_0 follows llama-quantize: the output matrix (the embeddings when tied) \
        gets more bits.
        """
    )

    @Option(help: "The base model folder (or a known name). Its original weights are used, never re-quantized.")
    var model: String

    @Option(help: "A PEFT LoRA adapter folder to merge in.")
    var adapter: String?

    @Option(help: "The output format: gguf.")
    var format: String = "gguf"

    @Option(help: "The tensor type: f16, bf16, q8_0, q4_0 or q6_k.")
    var type: String = "f16"

    @Option(help: "The GGUF file to write (written beside as a temporary file, then renamed).")
    var out: String

    @Option(help: "general.name in the file (default: the model folder's name).")
    var name: String?

    func run() throws {
        guard format.lowercased() == "gguf" else {
            throw ValidationError("--format: '\(format)' is not supported (expected gguf)")
        }
        let type = try GGUFExportType.parse(type)
        // Dense weights as stored; a bitsandbytes-only folder can only give its dequantized weights.
        let loaded = try ModelLoader.load(model, quantization: .none, log: { printError($0) })
        try GGUFExporter.refuseOverwriting(out, inputs: [loaded.directory] + (adapter.map { [$0] } ?? []))
        if loaded.isPreQuantized {
            printError("note: \(loaded.directory) holds only 4-bit weights, so the export is of the dequantized 4-bit weights (the original weights are not available), stored as \(type.rawValue)")
        }
        if let adapter {
            let config = try PEFTAdapter.load(directory: adapter, into: loaded.model)
            printError("adapter: \(adapter) (r=\(config.rank), alpha=\(config.alpha))")
        }
        let report = try GGUFExporter.export(model: loaded.model, directory: loaded.directory, type: type, to: out, name: name,
                                             log: { printError($0) })
        let types = report.typeCounts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        print("wrote \(out): \(report.architecture), \(report.tensorCount) tensors (\(types)), \(report.mergedLayers) layers with the adapter merged, tokenizer \(report.tokenizerModel) with \(report.vocabularySize) tokens")
    }
}
