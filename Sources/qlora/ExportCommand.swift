import ArgumentParser
import QLoRA

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Export a model, with a LoRA adapter merged in, as one GGUF file for llama.cpp and Ollama; or the adapter alone as a llama.cpp LoRA GGUF.",
        discussion: """
        gguf: the adapter is merged (W + scale·B·A in fp32) into the base's original weights, never into re-quantized ones, \
        and the result is written with llama.cpp's tensor names and metadata, the tokenizer and the chat template. \
        Norms and other 1-D tensors stay F32. q4_0, q4_k_m, q5_k_m and q6_k follow llama-quantize (without an \
        importance matrix), tensor by tensor and byte for byte: the output matrix (the embeddings when tied) gets Q6_K, \
        q4_k_m/q5_k_m give attn_v and ffn_down of some layers Q6_K, and rows that are not a multiple of 256 fall back \
        to 32-element types. --ollama also writes a Modelfile beside it for `ollama create NAME -f Modelfile`.

        gguf-lora: the adapter alone (tensors NAME.lora_a / NAME.lora_b, adapter.lora.alpha), which llama.cpp applies \
        over the base model's GGUF at run time: llama-cli -m base.gguf --lora adapter.gguf. Types: f32, f16, bf16, q8_0.
        """
    )

    @Option(help: "The base model folder (or a known name). Its original weights are used, never re-quantized.")
    var model: String

    @Option(help: "A PEFT LoRA adapter folder to merge in (gguf), or to export (gguf-lora).")
    var adapter: String?

    @Option(help: "The output format: gguf (the merged model) or gguf-lora (the adapter alone).")
    var format: String = "gguf"

    @Option(help: "The tensor type: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k (gguf); f32, f16, bf16 or q8_0 (gguf-lora).")
    var type: String = "f16"

    @Option(help: "The GGUF file to write (written beside as a temporary file, then renamed).")
    var out: String

    @Option(help: "general.name in the file (default: the model folder's name).")
    var name: String?

    @Flag(help: "Also write an Ollama Modelfile beside the GGUF (FROM, stop tokens, the template when needed); --format gguf only.")
    var ollama = false

    func run() throws {
        switch format.lowercased() {
        case "gguf": try exportModel()
        case "gguf-lora": try exportAdapter()
        default: throw ValidationError("--format: '\(format)' is not supported (expected gguf or gguf-lora)")
        }
    }

    func exportModel() throws {
        let type = try GGUFExportType.parse(type)
        let directory = try ModelCatalog.resolve(model, log: { printError($0) })
        // Qwen3, Gemma 2/3 and Phi-3 folders: tensors and metadata as llama.cpp's converter writes them, read from the
        // files, with the adapter's linears merged from the model; the Llama family's come from the model.
        let modelType = try? JSONValue.parse(bytes: try FileSystem.readFile(directory + "/config.json"))["model_type"]?.string
        let family = modelType.flatMap { GGUFFamily(modelType: $0) }
        let inputs = [directory] + (adapter.map { [$0] } ?? [])
        try GGUFExporter.refuseOverwriting(out, inputs: inputs)
        if ollama {
            // Checked before the export, so that a refused Modelfile leaves no GGUF behind.
            try GGUFExporter.refuseOverwriting(try OllamaModelfile.path(besides: out), inputs: inputs, option: "--ollama's Modelfile")
            _ = try OllamaModelfile.text(directory: directory, ggufFileName: "x.gguf")
        }
        // Dense weights as stored; a bitsandbytes-only folder can only give its dequantized weights.
        var loaded: LoadedModel?
        if family == nil || adapter != nil {
            let model = try ModelLoader.load(directory, quantization: .none, log: { printError($0) })
            if model.isPreQuantized {
                guard family == nil else {
                    throw ValidationError("--model: \(directory) holds only 4-bit weights; a \(modelType ?? "") GGUF export needs the original weights")
                }
                printError("note: \(directory) holds only 4-bit weights, so the export is of the dequantized 4-bit weights (the original weights are not available), stored as \(type.rawValue)")
            }
            if let adapter {
                let config = try PEFTAdapter.load(directory: adapter, into: model.model)
                printError("adapter: \(adapter) (r=\(config.rank), alpha=\(config.alpha))")
            }
            loaded = model
        }
        let report: GGUFExportReport
        switch (family, loaded) {
        case (nil, let loaded?):
            report = try GGUFExporter.export(model: loaded.model, directory: directory, type: type, to: out, name: name, log: { printError($0) })
        case (_?, let loaded?):
            report = try GGUFFamilyExporter.export(directory: directory, merging: loaded.model, type: type, to: out, name: name,
                                                   log: { printError($0) })
        default:
            report = try GGUFFamilyExporter.export(directory: directory, type: type, to: out, name: name, log: { printError($0) })
        }
        let types = report.typeCounts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        let merged = loaded == nil ? "" : ", \(report.mergedLayers) layers with the adapter merged"
        print("wrote \(out): \(report.architecture), \(report.tensorCount) tensors (\(types))\(merged), tokenizer \(report.tokenizerModel) with \(report.vocabularySize) tokens")
        if ollama {
            let path = try OllamaModelfile.write(besides: out, directory: directory, inputs: inputs, log: { printError($0) })
            print("wrote \(path): ollama create NAME -f \(path)")
        }
    }

    func exportAdapter() throws {
        guard let adapter else {
            throw ValidationError("--format gguf-lora exports a LoRA adapter: pass --adapter with a PEFT adapter folder")
        }
        guard !ollama else {
            throw ValidationError("--ollama writes a Modelfile for a --format gguf export; for a LoRA GGUF write FROM base.gguf and ADAPTER ./\(out) yourself")
        }
        let type = try GGUFExportType.parse(type, adapter: true)
        let loaded = try ModelLoader.load(model, quantization: .none, log: { printError($0) })
        try GGUFExporter.refuseOverwriting(out, inputs: [loaded.directory, adapter])
        let config = try PEFTAdapter.load(directory: adapter, into: loaded.model)
        printError("adapter: \(adapter) (r=\(config.rank), alpha=\(config.alpha))")
        let report = try GGUFExporter.exportLoRA(model: loaded.model, type: type, to: out,
                                                 name: name ?? GGUFExporter.lastPathComponent(adapter), log: { printError($0) })
        let types = report.typeCounts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        print("wrote \(out): LoRA adapter for \(report.architecture), \(report.adaptedLayers) layers, \(report.tensorCount) tensors (\(types)), alpha \(report.alpha); run it over the base GGUF with llama.cpp's --lora \(out)")
    }
}
