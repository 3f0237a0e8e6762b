// bitsandbytes 4-bit checkpoints ("pre-quantized" model folders that transformers writes with
// save_pretrained after load_in_4bit, and loads back without re-quantizing).
//
// Layout, for every quantized linear weight W (key prefix `P.weight`), in model.safetensors:
//   P.weight                                U8  [(n + 1) / 2, 1]   packed codes, row-major flatten of [out, in]
//   P.weight.absmax                         U8  [blocks]           double quant: 8-bit codes of absmax - offset
//                                           F32 [blocks]           otherwise: the absmax itself
//   P.weight.quant_map                      F32 [16]               the 4-bit code (get_4bit_type)
//   P.weight.nested_absmax                  F32 [ceil(blocks/256)] double quant only
//   P.weight.nested_quant_map               F32 [256]              double quant only (signed dynamic map)
//   P.weight.quant_state.bitsandbytes__nf4  U8  [bytes]            UTF-8 JSON (`__fp4` for FP4):
//       {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [out, in],
//        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": <mean of absmax>}
//   (Python's json.dumps with default separators; the last three keys only with double quant.)
// Every other tensor (embeddings, norms, lm_head, biases) is stored densely in the model dtype.
// Tensors are ordered as the safetensors Python writer orders them: by element size, largest first,
// then by name. config.json gains `quantization_config` and `dtype`, written by transformers as
// json.dumps(indent=2, sort_keys=True) + "\n".
//
// Which weights are quantized follows transformers' bitsandbytes integration: every nn.Linear except
// the output head (`lm_head`); for Llama models those are the 2-D `.weight` tensors under
// `model.layers.` (the embedding and the norms are not linear layers).

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Options of `qlora quantize` and of quantize-on-load.
public struct BnbQuantizeOptions: Sendable, Equatable {
    public var quantType: QuantType
    public var blocksize: Int
    public var doubleQuant: Bool
    /// `bnb_4bit_compute_dtype` in the config.
    public var computeDType: DType
    /// The model dtype: non-quantized tensors are stored in it, and it is the quant state's `dtype`.
    public var modelDType: DType

    public init(quantType: QuantType = .nf4, blocksize: Int = 64, doubleQuant: Bool = true, computeDType: DType = .f32, modelDType: DType? = nil) {
        self.quantType = quantType
        self.blocksize = blocksize
        self.doubleQuant = doubleQuant
        self.computeDType = computeDType
        self.modelDType = modelDType ?? computeDType
    }
}

extension DType {
    /// The torch name of a floating-point dtype, as configs and quant states spell it
    /// ("float32", "bfloat16", "float16"); nil for other types.
    public var torchName: String? {
        switch self {
        case .f32: return "float32"
        case .bf16: return "bfloat16"
        case .f16: return "float16"
        default: return nil
        }
    }

    /// The dtype of a torch floating-point dtype name ("float32"/"float", "bfloat16", "float16"/"half").
    public init?(torchName: String) {
        switch torchName {
        case "float32", "float": self = .f32
        case "bfloat16": self = .bf16
        case "float16", "half": self = .f16
        default: return nil
        }
    }
}

/// A bitsandbytes pre-quantized model folder, read and validated.
public final class BnbCheckpoint: @unchecked Sendable {
    public let directory: String
    public let tensors: SafeTensorsCheckpoint
    /// Parsed config.json.
    public let config: JSONValue
    /// Quantized weights by their dense name (e.g. `model.layers.0.mlp.down_proj.weight`).
    public let quantized: [String: QuantizedWeight]
    /// Names of the tensors stored densely (embeddings, norms, lm_head, ...), sorted.
    public let denseNames: [String]

    /// The suffixes of the tensors that belong to a quantized weight.
    static let stateSuffixes = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"]
    static let quantStatePrefix = ".quant_state.bitsandbytes__"

    /// Reads `directory` (model.safetensors or shards, config.json) and validates every quantized weight.
    /// A missing or inconsistent quant-state tensor, a wrong shape or an unknown quant type throws a
    /// `FileFormatError` that names the tensor.
    public init(directory: String) throws {
        self.directory = directory
        tensors = try SafeTensorsCheckpoint(directory: directory)
        let configPath = directory + "/config.json"
        config = FileSystem.exists(configPath) ? try JSONValue.parse(bytes: FileSystem.readFile(configPath)) : .object(JSONObject())

        let names = tensors.names
        var quantized: [String: QuantizedWeight] = [:]
        var owned = Set<String>()
        for name in names {
            guard let (weightName, typeName) = Self.splitQuantStateKey(name) else { continue }
            let weight = try Self.readWeight(weightName, stateKey: name, typeName: typeName, tensors: tensors)
            quantized[weightName] = weight
            owned.insert(name)
            owned.insert(weightName)
            for suffix in Self.stateSuffixes where tensors.contains(weightName + suffix) { owned.insert(weightName + suffix) }
        }
        // State tensors without a quant state, and U8 weights without one, are broken checkpoints.
        for name in names where !owned.contains(name) {
            let file = (try? tensors.file(containing: name).path) ?? directory
            if let suffix = Self.stateSuffixes.first(where: { name.hasSuffix($0) }) {
                let weightName = String(name.dropLast(suffix.count))
                throw FileFormatError(file: file, place: "tensor '\(name)'",
                                      "quantization state without '\(weightName)\(Self.quantStatePrefix)nf4' (or __fp4)")
            }
            if tensors.info(name)?.dtype == .u8, name.hasSuffix(".weight") {
                throw FileFormatError(file: file, place: "tensor '\(name)'",
                                      "a packed 4-bit weight (U8) without its quant state '\(name)\(Self.quantStatePrefix)nf4'")
            }
        }
        self.quantized = quantized
        denseNames = names.filter { !owned.contains($0) }.sorted()
    }

    /// `P.weight.quant_state.bitsandbytes__nf4` → (`P.weight`, `nf4`).
    static func splitQuantStateKey(_ name: String) -> (String, String)? {
        let marker = Array(quantStatePrefix.utf8)
        let bytes = Array(name.utf8)
        guard bytes.count > marker.count else { return nil }
        for start in stride(from: bytes.count - marker.count, through: 0, by: -1) where bytes[start..<(start + marker.count)].elementsEqual(marker) {
            return (String(decoding: bytes[..<start], as: UTF8.self), String(decoding: bytes[(start + marker.count)...], as: UTF8.self))
        }
        return nil
    }

    /// The 4-bit linear weights of any model folder: read directly when it is a bitsandbytes 4-bit
    /// checkpoint, else quantized on load with `options` (which a pre-quantized folder ignores).
    public static func quantizedWeights(directory: String, options: BnbQuantizeOptions = .init()) throws -> [String: QuantizedWeight] {
        let tensors = try SafeTensorsCheckpoint(directory: directory)
        if tensors.names.contains(where: { splitQuantStateKey($0) != nil }) {
            return try BnbCheckpoint(directory: directory).quantized
        }
        return try BnbCheckpointWriter.quantizeAll(tensors, options: options)
    }

    /// A dense tensor's values in fp32.
    public func floats(_ name: String) throws -> [Float] { try tensors.floats(name) }

    /// All quantized weights' bits per parameter from their stored bytes (`qlora inspect`).
    public var bitsPerParameter: Double { QLoRA.bitsPerParameter(Array(quantized.values)) }

    /// Parameters held in 4 bits.
    public var quantizedParameterCount: Int { quantized.values.reduce(0) { $0 + $1.elementCount } }

    /// Bytes the quantized weights take in the checkpoint (codes, absmax, nested absmax, maps).
    public var quantizedStoredBytes: Int { quantized.values.reduce(0) { $0 + $1.storedByteCount } }

    /// Bytes saved against storing the same weights in bf16 (`qlora inspect`).
    public var bytesSavedVersusBF16: Int { quantizedParameterCount * 2 - quantizedStoredBytes }

    // MARK: Reading one weight

    static func readWeight(_ weightName: String, stateKey: String, typeName: String, tensors: SafeTensorsCheckpoint) throws -> QuantizedWeight {
        let file = (try? tensors.file(containing: stateKey).path) ?? tensors.directory
        func fail(_ tensor: String, _ message: String) -> FileFormatError {
            FileFormatError(file: file, place: "tensor '\(tensor)'", message)
        }
        guard let type = QuantType(rawValue: typeName) else {
            throw fail(stateKey, "unknown quant type '\(typeName)' (expected nf4 or fp4)")
        }
        // The quant-state JSON.
        guard let stateInfo = tensors.info(stateKey), stateInfo.dtype == .u8 else {
            throw fail(stateKey, "the quant state must be a U8 tensor holding UTF-8 JSON")
        }
        let state: JSONObject
        do {
            guard let object = try JSONValue.parse(bytes: tensors.bytes(stateKey)).object else {
                throw fail(stateKey, "the quant state is not a JSON object")
            }
            state = object
        } catch let error as FileFormatError {
            throw error
        } catch {
            throw fail(stateKey, "the quant state is not valid JSON: \(error)")
        }
        guard let stateType = state["quant_type"]?.string else { throw fail(stateKey, "quant state has no \"quant_type\"") }
        guard stateType == typeName else {
            throw fail(stateKey, "quant state says quant_type \"\(stateType)\" but its key says \(typeName)")
        }
        guard let blocksize = state["blocksize"]?.int else { throw fail(stateKey, "quant state has no integer \"blocksize\"") }
        guard supported4BitBlocksizes.contains(blocksize) else {
            throw fail(stateKey, "blocksize \(blocksize) is not one of \(supported4BitBlocksizes.sorted())")
        }
        guard let shapeValues = state["shape"]?.array else { throw fail(stateKey, "quant state has no \"shape\" list") }
        let shape = try shapeValues.map { v -> Int in
            guard let d = v.int, d >= 0 else { throw fail(stateKey, "\"shape\" must hold non-negative integers, got \(v.serialized())") }
            return d
        }
        guard let dtypeName = state["dtype"]?.string else { throw fail(stateKey, "quant state has no \"dtype\"") }
        guard let dtype = DType(torchName: dtypeName) else {
            throw fail(stateKey, "dtype \"\(dtypeName)\" is not float32, bfloat16 or float16")
        }
        guard let n = checkedElementCount(shape) else {
            throw fail(stateKey, "\"shape\" \(shape) is too large")
        }
        let blocks = (n + blocksize - 1) / blocksize

        func tensor(_ name: String, _ dtype: DType, _ expectedShape: [Int], what: String) throws -> UnsafeRawBufferPointer {
            guard let info = tensors.info(name) else { throw fail(name, "missing (\(what) of the quantized weight '\(weightName)')") }
            guard info.dtype == dtype else { throw fail(name, "dtype \(info.dtype.rawValue), expected \(dtype.rawValue) (\(what))") }
            guard info.shape == expectedShape else {
                throw fail(name, "shape \(info.shape), expected \(expectedShape) for \(what) of a \(shape) weight at blocksize \(blocksize)")
            }
            return try tensors.bytes(name)
        }
        func floatArray(_ raw: UnsafeRawBufferPointer) -> [Float] {
            (0..<(raw.count / 4)).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) }
        }

        let packed = Array(try tensor(weightName, .u8, [(n + 1) / 2, 1], what: "the packed 4-bit codes"))
        let quantMap = floatArray(try tensor(weightName + ".quant_map", .f32, [16], what: "the 4-bit code map"))
        guard quantMap.map(\.bitPattern) == type.quantMap.map(\.bitPattern) else {
            throw fail(weightName + ".quant_map", "does not hold bitsandbytes' \(typeName) code map \(type.quantMap)")
        }

        let nestedKeys = ["nested_blocksize", "nested_offset", "nested_dtype"]
        let isNested = tensors.contains(weightName + ".nested_absmax") || nestedKeys.contains { state[$0] != nil }
        let scales: QuantizationScales
        if isNested {
            guard let nestedBlocksize = state["nested_blocksize"]?.int, nestedBlocksize > 0 else {
                throw fail(stateKey, "double-quantized weight without a positive integer \"nested_blocksize\"")
            }
            guard let offset = state["nested_offset"]?.double else {
                throw fail(stateKey, "double-quantized weight without a number \"nested_offset\"")
            }
            if let nestedDType = state["nested_dtype"]?.string, nestedDType != "float32" {
                throw fail(stateKey, "nested_dtype \"\(nestedDType)\" is not supported (expected float32)")
            }
            let codes = Array(try tensor(weightName + ".absmax", .u8, [blocks], what: "the 8-bit absmax codes"))
            let nestedBlocks = (blocks + nestedBlocksize - 1) / nestedBlocksize
            let nestedAbsmax = floatArray(try tensor(weightName + ".nested_absmax", .f32, [nestedBlocks], what: "the nested absmax"))
            let nestedMap = floatArray(try tensor(weightName + ".nested_quant_map", .f32, [256], what: "the nested code map"))
            guard offset.isFinite else { throw fail(stateKey, "\"nested_offset\" must be finite, got \(offset)") }
            try checkFinite(nestedAbsmax, tensor: weightName + ".nested_absmax", origin: file)
            try checkFinite(nestedMap, tensor: weightName + ".nested_quant_map", origin: file)
            scales = .doubleQuantized(DoubleQuantizedAbsmax(codes: codes, nestedAbsmax: nestedAbsmax, offset: Float(offset),
                                                            code: nestedMap, blocksize: nestedBlocksize))
        } else {
            for suffix in [".nested_quant_map"] where tensors.contains(weightName + suffix) {
                throw fail(weightName + suffix, "present, but the weight is not double-quantized")
            }
            let absmax = floatArray(try tensor(weightName + ".absmax", .f32, [blocks], what: "the absmax"))
            try checkFinite(absmax, tensor: weightName + ".absmax", origin: file)
            scales = .plain(absmax)
        }
        do {
            return try QuantizedWeight(quantType: type, blocksize: blocksize, shape: shape, dtype: dtype, packed: packed, scales: scales)
        } catch {
            throw fail(weightName, "\(error)")
        }
    }
}

// MARK: - Writing

/// Turning a dense model folder into a bitsandbytes 4-bit folder.
public enum BnbCheckpointWriter {
    /// Whether bitsandbytes (through transformers) would quantize this tensor: the 2-D weights of the
    /// linear layers in the decoder blocks; never the embedding, the norms or `lm_head`.
    public static func shouldQuantize(name: String, shape: [Int]) -> Bool {
        shape.count == 2 && name.hasSuffix(".weight") && name.contains(".layers.")
            && !name.contains("embed") && !name.contains("norm") && !name.hasPrefix("lm_head")
    }

    /// The checkpoint tensors of one quantized weight, named from its dense name (`P.weight`).
    public static func records(name: String, weight: QuantizedWeight) -> [TensorRecord] {
        var out: [TensorRecord] = [
            TensorRecord(name: name, dtype: .u8, shape: [weight.packed.count, 1], data: weight.packed),
            TensorRecord(name: name + ".quant_map", floats: weight.quantType.quantMap, shape: [16]),
        ]
        var state = JSONObject([
            ("quant_type", .string(weight.quantType.rawValue)),
            ("blocksize", .int(Int64(weight.blocksize))),
            ("dtype", .string(weight.dtype.torchName ?? "float32")),
            ("shape", .array(weight.shape.map { .int(Int64($0)) })),
        ])
        switch weight.scales {
        case .plain(let absmax):
            out.append(TensorRecord(name: name + ".absmax", floats: absmax, shape: [absmax.count]))
        case .doubleQuantized(let d):
            out.append(TensorRecord(name: name + ".absmax", dtype: .u8, shape: [d.codes.count], data: d.codes))
            out.append(TensorRecord(name: name + ".nested_absmax", floats: d.nestedAbsmax, shape: [d.nestedAbsmax.count]))
            out.append(TensorRecord(name: name + ".nested_quant_map", floats: d.code, shape: [d.code.count]))
            state["nested_blocksize"] = .int(Int64(d.blocksize))
            state["nested_dtype"] = .string("float32")
            state["nested_offset"] = .double(Double(d.offset))
        }
        let json = Array(JSONValue.object(state).serialized(.init(itemSeparator: ", ", keySeparator: ": ")).utf8)
        out.append(TensorRecord(name: name + BnbCheckpoint.quantStatePrefix + weight.quantType.rawValue, dtype: .u8, shape: [json.count], data: json))
        return out
    }

    /// The `quantization_config` transformers writes for these options.
    public static func quantizationConfig(_ options: BnbQuantizeOptions) -> JSONValue {
        .object(JSONObject([
            ("_load_in_4bit", .bool(true)),
            ("_load_in_8bit", .bool(false)),
            ("bnb_4bit_compute_dtype", .string(options.computeDType.torchName ?? "float32")),
            ("bnb_4bit_quant_storage", .string("uint8")),
            ("bnb_4bit_quant_type", .string(options.quantType.rawValue)),
            ("bnb_4bit_use_double_quant", .bool(options.doubleQuant)),
            ("llm_int8_enable_fp32_cpu_offload", .bool(false)),
            ("llm_int8_has_fp16_weight", .bool(false)),
            ("llm_int8_skip_modules", .null),
            ("llm_int8_threshold", .double(6.0)),
            ("load_in_4bit", .bool(true)),
            ("load_in_8bit", .bool(false)),
            ("quant_method", .string("bitsandbytes")),
        ]))
    }

    /// Files copied unchanged from the source folder.
    static let companionFiles = [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    ]

    /// What `quantizeModel` did.
    public struct Summary: Sendable {
        public var quantizedTensors: Int
        public var denseTensors: Int
        public var quantizedParameters: Int
        public var bitsPerParameter: Double
        public var bytesWritten: Int
    }

    /// Values of a dense tensor as the model dtype holds them (bitsandbytes quantizes the weight after
    /// transformers cast it to the model dtype).
    static func modelValues(_ tensors: SafeTensorsCheckpoint, _ name: String, dtype: DType) throws -> [Float] {
        var values = try tensors.floats(name)
        switch dtype {
        case .bf16: for i in values.indices { values[i] = roundToBF16(values[i]) }
        case .f16: for i in values.indices { values[i] = f16ToFloat(floatToF16(values[i])) }
        default: break
        }
        return values
    }

    /// Quantizes one dense weight of a checkpoint (quantize on load).
    public static func quantize(_ tensors: SafeTensorsCheckpoint, name: String, options: BnbQuantizeOptions = .init()) throws -> QuantizedWeight {
        guard let info = tensors.info(name) else {
            throw FileFormatError(file: tensors.directory, place: "tensor '\(name)'", "no such tensor")
        }
        guard info.dtype.isFloatingPoint else {
            throw FileFormatError(file: tensors.directory, place: "tensor '\(name)'", "dtype \(info.dtype.rawValue) cannot be quantized (expected a float type)")
        }
        let values = try modelValues(tensors, name, dtype: options.modelDType)
        try checkFinite(values, tensor: name, origin: tensors.directory)
        return try QuantizedWeight.quantize(values, shape: info.shape, type: options.quantType, blocksize: options.blocksize,
                                            doubleQuant: options.doubleQuant, dtype: options.modelDType)
    }

    /// Quantizes every weight `shouldQuantize` selects (quantize on load), keyed by tensor name.
    public static func quantizeAll(_ tensors: SafeTensorsCheckpoint, options: BnbQuantizeOptions = .init()) throws -> [String: QuantizedWeight] {
        var out: [String: QuantizedWeight] = [:]
        for name in tensors.names {
            guard let info = tensors.info(name), shouldQuantize(name: name, shape: info.shape) else { continue }
            out[name] = try quantize(tensors, name: name, options: options)
        }
        return out
    }

    /// The names this writes: an existing output folder holding only these is replaced, anything else is refused.
    public static var outputFiles: Set<String> { Set(["model.safetensors", "config.json"] + companionFiles) }

    /// Writes the bitsandbytes 4-bit form of the model in `source` to `destination` (created if needed):
    /// model.safetensors, config.json with `quantization_config`, and the tokenizer/generation files.
    @discardableResult
    public static func quantizeModel(from source: String, to destination: String, options: BnbQuantizeOptions = .init()) throws -> Summary {
        guard supported4BitBlocksizes.contains(options.blocksize) else {
            throw UsageError("blocksize \(options.blocksize) is not one of \(supported4BitBlocksizes.sorted())")
        }
        guard let modelDTypeName = options.modelDType.torchName, options.computeDType.torchName != nil else {
            throw UsageError("the model and compute dtypes must be float32, bfloat16 or float16")
        }
        try FileSystem.refuseOverwrite(output: destination, option: "the quantize output", inputs: [("model folder", source)])
        try FileSystem.checkReplaceable(destination, option: "the quantize output", replaceable: outputFiles)
        let tensors = try SafeTensorsCheckpoint(directory: source)
        if let name = tensors.names.first(where: { BnbCheckpoint.splitQuantStateKey($0) != nil }) {
            throw UsageError("\(source) is already 4-bit quantized (it has '\(name)')")
        }
        var records: [TensorRecord] = []
        var weights: [QuantizedWeight] = []
        var dense = 0
        for name in tensors.names {
            guard let info = tensors.info(name) else { continue }
            if shouldQuantize(name: name, shape: info.shape) {
                let weight = try quantize(tensors, name: name, options: options)
                weights.append(weight)
                records += Self.records(name: name, weight: weight)
            } else if info.dtype.isFloatingPoint {
                let values = try tensors.floats(name)
                try checkFinite(values, tensor: name, origin: source)
                records.append(TensorRecord(name: name, floats: values, shape: info.shape, dtype: options.modelDType))
                dense += 1
            } else {
                records.append(TensorRecord(name: name, dtype: info.dtype, shape: info.shape, data: Array(try tensors.bytes(name))))
                dense += 1
            }
        }
        // The safetensors Python writer's order: larger element types first, then by name.
        records.sort { ($0.dtype.size, $1.name) > ($1.dtype.size, $0.name) }

        // Written beside the target and renamed into place: an interrupted quantize leaves the old folder or none.
        try FileSystem.writeDirectory(destination) { destination in
        try SafeTensorsWriter.write(records, metadata: ["format": "pt"], to: destination + "/model.safetensors")

        // config.json: the source config with the model dtype and the quantization config.
        let configPath = source + "/config.json"
        var config = JSONObject()
        if FileSystem.exists(configPath) {
            guard let object = try JSONValue.parse(bytes: FileSystem.readFile(configPath)).object else {
                throw FileFormatError(file: configPath, place: "top level", "expected a JSON object")
            }
            config = object
        }
        config["dtype"] = .string(modelDTypeName)
        config["quantization_config"] = quantizationConfig(options)
        let text = JSONValue.object(config).serialized(.init(indent: 2, ensureASCII: true, sortKeys: true)) + "\n"
        try FileSystem.writeAtomically(destination + "/config.json", text: text)

        for file in companionFiles where FileSystem.exists(source + "/" + file) {
            try FileSystem.writeAtomically(destination + "/" + file, bytes: FileSystem.readFile(source + "/" + file))
        }
        }
        return Summary(quantizedTensors: weights.count, denseTensors: dense,
                       quantizedParameters: weights.reduce(0) { $0 + $1.elementCount },
                       bitsPerParameter: bitsPerParameter(weights),
                       bytesWritten: records.reduce(0) { $0 + $1.data.count })
    }
}
