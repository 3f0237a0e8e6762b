import ArgumentParser
import QLoRA

struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Merge a LoRA adapter into its base and write a bf16 checkpoint that transformers loads."
    )

    @Option(help: "The base model folder (or a known name). Its original weights are used, never re-quantized.")
    var model: String

    @Option(help: "The PEFT LoRA adapter folder.")
    var adapter: String

    @Option(help: "The folder to write the merged model to.")
    var out: String

    func run() throws {
        // Dense weights as stored; a bitsandbytes-only folder can only give its dequantized weights.
        let loaded = try ModelLoader.load(model, quantization: .none, log: { printError($0) })
        if loaded.isPreQuantized {
            printError("note: \(loaded.directory) holds only 4-bit weights, so this merge is of the dequantized weights (the original bf16 weights are not available)")
        }
        let config = try PEFTAdapter.load(directory: adapter, into: loaded.model)
        let report = try AdapterMerge.write(model: loaded.model, baseDirectory: loaded.directory, fromQuantizedBase: loaded.isPreQuantized, to: out)
        print("merged \(report.mergedLayers) layers (r=\(config.rank), alpha=\(config.alpha)) into \(out): \(report.tensorsWritten) bf16 tensors")
    }
}
