import ArgumentParser
import QLoRA

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a model folder, safetensors file or GGUF file: architecture, parameter count, tensors with dtypes and shapes, bytes."
    )

    @Argument(help: "A model folder, a .safetensors file or a .gguf file.")
    var path: String

    @Flag(help: "List only the summary, not every tensor.")
    var summary = false

    func run() throws {
        if path.hasSuffix(".gguf") {
            try inspectGGUF()
        } else if FileSystem.isDirectory(path) {
            try inspectFolder()
        } else {
            let file = try SafeTensorsFile(path: path)
            printTensors(file.tensors)
            print("\(file.tensors.count) tensors, \(bytes(file.tensors.reduce(0) { $0 + $1.byteCount }))")
        }
    }

    func inspectFolder() throws {
        let config = try DecoderConfig(directory: path)
        print("architecture: \(config.modelType), \(config.layerCount) layers, hidden \(config.hiddenSize), intermediate \(config.intermediateSize), "
              + "\(config.headCount) heads (\(config.kvHeadCount) KV, dim \(config.headDim)), vocabulary \(config.vocabularySize)"
              + (config.tieWordEmbeddings ? ", tied embeddings" : ""))
        print("parameters: \(grouped(config.parameterCount))")
        let tensors = try SafeTensorsCheckpoint(directory: path)
        let infos = tensors.names.compactMap { tensors.info($0) }
        if config.raw["quantization_config"]?["quant_method"]?.string == "bitsandbytes" {
            let checkpoint = try BnbCheckpoint(directory: path)
            print("4-bit: \(checkpoint.quantized.count) quantized weights, \(grouped(checkpoint.quantizedParameterCount)) parameters at "
                  + String(cFormat: "%.3f", checkpoint.bitsPerParameter) + " bits per parameter ("
                  + "\(bytes(checkpoint.quantizedStoredBytes)), saving \(bytes(checkpoint.bytesSavedVersusBF16)) against bf16)")
        }
        if !summary { printTensors(infos) }
        print("\(infos.count) tensors in \(tensors.files.count) file(s), \(bytes(infos.reduce(0) { $0 + $1.byteCount }))")
    }

    func inspectGGUF() throws {
        let file = try GGUFFile(path: path)
        print("GGUF v\(file.version), \(file.metadata.count) metadata keys, \(file.tensors.count) tensors, alignment \(file.alignment)")
        for key in ["general.architecture", "general.name", "llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                    "llama.attention.head_count_kv", "llama.context_length", "tokenizer.ggml.model"] {
            if let value = file[key] { print("  \(key): \(value.string ?? value.int.map(String.init) ?? "\(value)")") }
        }
        let parameters = file.tensors.reduce(0) { $0 + $1.elementCount }
        print("parameters: \(grouped(parameters))")
        if !summary {
            for t in file.tensors { print("  \(t.name)  \(t.type)  \(t.shape)  \(bytes(t.byteCount))") }
        }
        let total = file.tensors.reduce(0) { $0 + $1.byteCount }
        print("\(bytes(total)) of tensor data, " + String(cFormat: "%.3f", Double(total * 8) / Double(max(parameters, 1))) + " bits per parameter")
    }

    func printTensors(_ tensors: [TensorInfo]) {
        for t in tensors { print("  \(t.name)  \(t.dtype.rawValue)  \(t.shape)  \(bytes(t.byteCount))") }
    }

    func bytes(_ n: Int) -> String {
        if n >= 1 << 30 { return String(cFormat: "%.2f GiB", Double(n) / Double(1 << 30)) }
        if n >= 1 << 20 { return String(cFormat: "%.1f MiB", Double(n) / Double(1 << 20)) }
        if n >= 1 << 10 { return String(cFormat: "%.1f KiB", Double(n) / Double(1 << 10)) }
        return "\(n) B"
    }

    func grouped(_ n: Int) -> String {
        let digits = Array(String(n))
        var out = ""
        for (i, d) in digits.enumerated() {
            if i > 0 && (digits.count - i) % 3 == 0 { out += "," }
            out.append(d)
        }
        return out
    }
}
