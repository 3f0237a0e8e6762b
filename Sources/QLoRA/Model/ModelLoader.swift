// Loading a model for any command: a catalog name or a folder; dense, quantized on load, or a
// bitsandbytes pre-quantized folder; with its tokenizer and chat template when the folder has them.

/// How the frozen base is held.
public enum BaseQuantization: String, Sendable, CaseIterable {
    /// The dense weights as stored.
    case none
    /// Quantized to NF4 (+ double quant) on load, bitsandbytes-identical; the CPU computes with the dequantized values.
    case nf4
    case fp4

    public static func parse(_ name: String) throws -> BaseQuantization {
        guard let q = BaseQuantization(rawValue: name.lowercased()) else {
            throw UsageError("unknown quantization '\(name)' (choose from nf4, fp4, none)")
        }
        return q
    }
}

/// A model with what commands need beside it.
public struct LoadedModel {
    public let model: DecoderModel
    public let directory: String
    public let tokenizer: Tokenizer?
    public let template: ChatTemplate?
    /// True when the base weights went through 4-bit quantization (on load or in the files).
    public let isQuantized: Bool
    /// True when the folder holds only 4-bit weights (a bitsandbytes checkpoint).
    public let isPreQuantized: Bool
    /// One line saying what was loaded.
    public let description: String
}

public enum ModelLoader {
    /// Loads `nameOrPath` (a catalog name such as `smollm2-135m`, fetched if needed, or a model folder).
    public static func load(_ nameOrPath: String, quantization: BaseQuantization, log: (String) -> Void = { _ in }) throws -> LoadedModel {
        let directory = try ModelCatalog.resolve(nameOrPath, log: log)
        guard FileSystem.isDirectory(directory) else {
            if nameOrPath.hasSuffix(".gguf") {
                throw UsageError("\(nameOrPath) is a GGUF file: convert it first with `qlora convert \(nameOrPath) --out DIR`")
            }
            throw UsageError("\(nameOrPath): not a model folder or a known model name (known: \(ModelCatalog.entries.map(\.name).joined(separator: ", ")))")
        }
        let config = try DecoderConfig(directory: directory)
        let source: BaseWeightSource
        let preQuantized = config.raw["quantization_config"]?["quant_method"]?.string == "bitsandbytes"
        let quantized: Bool
        var what: String
        if preQuantized {
            let checkpoint = try BnbCheckpoint(directory: directory)
            source = checkpoint
            quantized = true
            what = "bitsandbytes 4-bit checkpoint (\(String(cFormat: "%.3f", checkpoint.bitsPerParameter)) bits per quantized parameter)"
        } else {
            let tensors = try SafeTensorsCheckpoint(directory: directory)
            if let name = tensors.names.first(where: { BnbCheckpoint.splitQuantStateKey($0) != nil }) {
                throw FileFormatError(file: directory + "/config.json", place: "'quantization_config'",
                                      "missing, but the weights are bitsandbytes 4-bit (tensor '\(name)'); expected quant_method \"bitsandbytes\"")
            }
            switch quantization {
            case .none:
                source = tensors
                quantized = false
                what = "dense weights"
            case .nf4, .fp4:
                source = QuantizingWeightSource(tensors: tensors, type: quantization == .nf4 ? .nf4 : .fp4)
                quantized = true
                what = "weights quantized to \(quantization.rawValue.uppercased()) on load (blocksize 64, double quant)"
            }
        }
        let model = try DecoderModel(config: config, weights: source)
        let hasTokenizer = FileSystem.exists(directory + "/tokenizer.json")
        let tokenizer = hasTokenizer ? try Tokenizer(directory: directory) : nil
        let template = hasTokenizer ? try ChatTemplate.load(directory: directory) : nil
        what = "\(directory): \(config.modelType), \(config.layerCount) layers, hidden \(config.hiddenSize), \(what)"
        return LoadedModel(model: model, directory: directory, tokenizer: tokenizer, template: template,
                           isQuantized: quantized, isPreQuantized: preQuantized, description: what)
    }
}

// MARK: - Weight sources for 4-bit bases

extension BnbCheckpoint: BaseWeightSource {
    public var origin: String { directory }
    public var tensorNames: [String] { denseNames + quantized.keys.sorted() }
    public func contains(_ name: String) -> Bool { quantized[name] != nil || tensors.contains(name) }
    /// Quantized weights come back dequantized, exactly as bitsandbytes dequantizes them.
    public func tensor(_ name: String) throws -> (values: [Float], shape: [Int]) {
        if let q = quantized[name] { return (q.dequantize(), q.shape) }
        return try tensors.tensor(name)
    }
    public func quantizedWeight(_ name: String) throws -> QuantizedWeight? { quantized[name] }
}

/// A dense checkpoint whose block linear weights are quantized on load, as bitsandbytes would: the
/// model keeps them 4-bit and computes exactly as the 4-bit model does.
struct QuantizingWeightSource: BaseWeightSource {
    let tensors: SafeTensorsCheckpoint
    let type: QuantType
    var origin: String { tensors.directory }
    var tensorNames: [String] { tensors.names }
    func contains(_ name: String) -> Bool { tensors.contains(name) }
    func tensor(_ name: String) throws -> (values: [Float], shape: [Int]) { try tensors.tensor(name) }
    func quantizedWeight(_ name: String) throws -> QuantizedWeight? {
        guard let info = tensors.info(name), BnbCheckpointWriter.shouldQuantize(name: name, shape: info.shape) else { return nil }
        // The CPU computes in fp32, as transformers does with `torch_dtype=float32` (the fixture's setting):
        // the quant state's dtype is then float32 and dequantized values are not rounded to bf16.
        let values = try tensors.tensor(name).values  // checked finite: NaN would quantize to a block of zeros
        return try QuantizedWeight.quantize(values, shape: info.shape, type: type, dtype: .f32)
    }
}
