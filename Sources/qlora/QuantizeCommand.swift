import ArgumentParser
import QLoRA

/// `qlora quantize`: a dense model folder → a bitsandbytes 4-bit folder that transformers loads pre-quantized.
struct QuantizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quantize",
        abstract: "Write a bitsandbytes 4-bit (NF4/FP4) checkpoint of a model folder, byte-identical to bitsandbytes."
    )

    @Argument(help: "The model folder (config.json and model.safetensors or shards).")
    var modelDir: String

    @Option(name: .long, help: "The output folder: a new folder, or an earlier quantize output, which is replaced.")
    var out: String

    @Option(name: .customLong("quant-type"), help: "The 4-bit data type: nf4 or fp4.")
    var quantType: String = "nf4"

    @Option(name: .long, parsing: .unconditional, help: "Elements per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096.")
    var blocksize: Int = 64

    @Flag(name: .customLong("double-quant"), inversion: .prefixedNo,
          help: "Quantize the absmax constants again to 8 bits (blocks of 256), as QLoRA does.")
    var doubleQuant: Bool = true

    @Option(name: .customLong("compute-dtype"), help: "bnb_4bit_compute_dtype: float32, bfloat16 or float16.")
    var computeDType: String = "float32"

    @Option(name: .customLong("dtype"),
            help: "The model dtype for the tensors that stay dense (embeddings, norms, lm_head); defaults to the compute dtype.")
    var modelDType: String?

    func run() throws {
        guard let type = QuantType(rawValue: quantType) else {
            throw ValidationError("--quant-type must be nf4 or fp4, got '\(quantType)'")
        }
        guard supported4BitBlocksizes.contains(blocksize) else {
            throw ValidationError("--blocksize must be one of \(supported4BitBlocksizes.sorted().map(String.init).joined(separator: ", "))")
        }
        guard let compute = DType(torchName: computeDType) else {
            throw ValidationError("--compute-dtype must be float32, bfloat16 or float16, got '\(computeDType)'")
        }
        var model: DType? = nil
        if let name = modelDType {
            guard let d = DType(torchName: name) else {
                throw ValidationError("--dtype must be float32, bfloat16 or float16, got '\(name)'")
            }
            model = d
        }
        try FileSystem.refuseOverwrite(output: out, option: "--out", inputs: [("model folder", modelDir)])
        try FileSystem.checkReplaceable(out, option: "--out", replaceable: BnbCheckpointWriter.outputFiles)
        let options = BnbQuantizeOptions(quantType: type, blocksize: blocksize, doubleQuant: doubleQuant, computeDType: compute, modelDType: model)
        let summary = try BnbCheckpointWriter.quantizeModel(from: modelDir, to: out, options: options)
        print("quantized \(summary.quantizedTensors) linear weights (\(summary.quantizedParameters) parameters, "
            + "\(String(format4: summary.bitsPerParameter)) bits/parameter), kept \(summary.denseTensors) tensors dense; "
            + "wrote \(summary.bytesWritten) bytes of tensors to \(out)")
    }
}

extension String {
    /// A number with 4 decimals, without Foundation's String(format:).
    init(format4 value: Double) {
        let scaled = (value * 10_000).rounded()
        let whole = Int(scaled) / 10_000
        let frac = abs(Int(scaled)) % 10_000
        let f = String(frac)
        self = "\(whole)." + String(repeating: "0", count: 4 - f.count) + f
    }
}
