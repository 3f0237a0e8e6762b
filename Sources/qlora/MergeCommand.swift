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

    @Option(help: "The folder to write the merged model to (a new folder, or an earlier merge output, which is replaced).")
    var out: String

    @Option(help: "Where to compute W + scale·B·A: auto (the GPU when one is usable, else the CPU), cpu or cuda. The files are the same up to the last bit of a few bf16 values.")
    var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption

    func run() throws {
        // Nothing a command reads is overwritten by it: checked before the minutes of loading and merging.
        try FileSystem.refuseOverwrite(output: out, option: "--out", inputs: [("adapter folder", adapter)] + (FileSystem.exists(model) ? [("base model folder", model)] : []))
        try FileSystem.checkReplaceable(out, option: "--out", replaceable: AdapterMerge.outputFiles)
        let compute = try ComputeDevice.choose(device, computeDType: try computeDTypeOption.choice())
        // Dense weights as stored; a bitsandbytes-only folder can only give its dequantized weights.
        let loaded = try ModelLoader.load(model, quantization: .none, log: { printError($0) })
        if loaded.isPreQuantized {
            printError("note: \(loaded.directory) holds only 4-bit weights, so this merge is of the dequantized weights (the original bf16 weights are not available)")
        }
        try FileSystem.refuseOverwrite(output: out, option: "--out", inputs: [("base model folder", loaded.directory)])
        let config = try PEFTAdapter.load(directory: adapter, into: loaded.model)
        func write(on compute: ComputeDevice) throws -> MergeReport {
            switch compute {
            case .cpu:
                return try AdapterMerge.write(model: loaded.model, baseDirectory: loaded.directory, fromQuantizedBase: loaded.isPreQuantized,
                                              to: out)
            case .cuda(let context):
                let merge = try CUDAAdapterMerge(context: context)
                return try AdapterMerge.write(model: loaded.model, baseDirectory: loaded.directory, fromQuantizedBase: loaded.isPreQuantized,
                                              to: out, mergedWeight: merge.mergedWeight)
            }
        }
        let report: MergeReport
        do {
            report = try write(on: compute)
        } catch where device.lowercased() == "auto" && compute.isCUDA {
            // Nothing is written before every weight is merged, so the CPU can start over.
            printError("device: cpu after all (auto: \(error))")
            report = try write(on: .cpu)
        }
        try writeCard(loaded: loaded, config: config, fromQuantizedBase: report.fromQuantizedBase)
        print("merged \(report.mergedLayers) layers (r=\(config.rank), alpha=\(config.alpha)) into \(out): \(report.tensorsWritten) bf16 tensors")
    }

    /// README.md in the merged folder: the model card (written beside and renamed into place).
    func writeCard(loaded: LoadedModel, config: LoRAConfig, fromQuantizedBase: Bool) throws {
        let adapterFiles = try ["adapter_model.safetensors", "adapter_config.json"].filter { FileSystem.exists(adapter + "/" + $0) }
            .map { try CardFile.describe(adapter + "/" + $0) }
        let card = try ModelCard.merged(baseName: model, baseDirectory: loaded.directory, baseFiles: try ModelCard.weightsFiles(in: loaded.directory),
                                        adapterDirectory: adapter, adapterFiles: adapterFiles, lora: config,
                                        chatTemplate: ModelCard.chatTemplate(in: loaded.directory)?.source, fromQuantizedBase: fromQuantizedBase)
        try FileSystem.writeAtomically(out + "/README.md", text: card)
    }
}
