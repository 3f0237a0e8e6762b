// PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`.
//
// Keys as PEFT saves them: `base_model.model.<module path>.lora_A.weight` ([r, in]) and
// `...lora_B.weight` ([out, r]); delta = B·A·(alpha/r), or alpha/√r with `use_rslora`.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The fields of `adapter_config.json` that decide the adapter's shape and scaling.
public struct LoRAConfig: Equatable, Sendable {
    public var rank: Int
    public var alpha: Double
    public var dropout: Double
    /// Module names (`q_proj`, ...) or `["all-linear"]`.
    public var targetModules: [String]
    public var useRSLoRA: Bool
    public var baseModelNameOrPath: String
    /// Per-module rank and alpha overrides (PEFT's `rank_pattern` / `alpha_pattern`), by module-name suffix.
    public var rankPattern: [String: Int] = [:]
    public var alphaPattern: [String: Double] = [:]

    public init(rank: Int, alpha: Double, dropout: Double = 0, targetModules: [String], useRSLoRA: Bool = false, baseModelNameOrPath: String = "") {
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targetModules = targetModules
        self.useRSLoRA = useRSLoRA
        self.baseModelNameOrPath = baseModelNameOrPath
    }

    /// The seven projections of a Llama block, the usual QLoRA target.
    public static let llamaProjections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    /// The scale applied to B·A for a module.
    public func scale(rank r: Int, alpha a: Double) -> Float {
        Float(useRSLoRA ? a / Double(r).squareRoot() : a / Double(r))
    }

    /// Whether the linear layer `modulePath` gets an adapter.
    public func targets(_ modulePath: String) -> Bool {
        if targetModules.contains("all-linear") { return !modulePath.hasSuffix("lm_head") }
        let leaf = modulePath.split(separator: ".").last.map(String.init) ?? modulePath
        return targetModules.contains(leaf) || targetModules.contains(modulePath)
    }

    func override<T>(_ pattern: [String: T], for modulePath: String) -> T? {
        pattern.first { modulePath == $0.key || modulePath.hasSuffix("." + $0.key) }?.value
    }

    public func rank(for modulePath: String) -> Int { override(rankPattern, for: modulePath) ?? rank }
    public func alpha(for modulePath: String) -> Double { override(alphaPattern, for: modulePath) ?? alpha }
}

extension LoRAConfig {
    public init(json: JSONValue, file: String) throws {
        guard json["peft_type"]?.string == "LORA" else {
            throw FileFormatError(file: file, place: "'peft_type'", "expected \"LORA\", got \(json["peft_type"]?.serialized() ?? "nothing")")
        }
        guard let r = json["r"]?.int, r > 0 else { throw FileFormatError(file: file, place: "'r'", "expected a positive integer") }
        guard let alpha = json["lora_alpha"]?.double else { throw FileFormatError(file: file, place: "'lora_alpha'", "expected a number") }
        var targets: [String]
        if let s = json["target_modules"]?.string { targets = [s] } else {
            targets = json["target_modules"]?.array?.compactMap(\.string) ?? []
        }
        guard !targets.isEmpty else { throw FileFormatError(file: file, place: "'target_modules'", "expected module names") }
        targets.sort()
        self.init(rank: r, alpha: alpha, dropout: json["lora_dropout"]?.double ?? 0, targetModules: targets,
                  useRSLoRA: json["use_rslora"]?.bool ?? false, baseModelNameOrPath: json["base_model_name_or_path"]?.string ?? "")
        for (k, v) in json["rank_pattern"]?.object ?? JSONObject() { if let n = v.int { rankPattern[k] = n } }
        for (k, v) in json["alpha_pattern"]?.object ?? JSONObject() { if let n = v.double { alphaPattern[k] = n } }
        if json["use_dora"]?.bool == true { throw FileFormatError(file: file, place: "'use_dora'", "DoRA adapters are not supported") }
        if let bias = json["bias"]?.string, bias != "none" {
            throw FileFormatError(file: file, place: "'bias'", "only bias \"none\" is supported, got \"\(bias)\"")
        }
    }

    /// `adapter_config.json` as PEFT writes it (the fields PEFT needs to load it, with its defaults).
    public func json() -> JSONValue {
        .object(JSONObject([
            ("alpha_pattern", .object(JSONObject(alphaPattern.sorted { $0.key < $1.key }.map { ($0.key, .double($0.value)) }))),
            ("base_model_name_or_path", .string(baseModelNameOrPath)),
            ("bias", .string("none")),
            ("fan_in_fan_out", .bool(false)),
            ("inference_mode", .bool(true)),
            ("init_lora_weights", .bool(true)),
            ("lora_alpha", alpha == alpha.rounded() ? .int(Int64(alpha)) : .double(alpha)),
            ("lora_dropout", .double(dropout)),
            ("modules_to_save", .null),
            ("peft_type", .string("LORA")),
            ("r", .int(Int64(rank))),
            ("rank_pattern", .object(JSONObject(rankPattern.sorted { $0.key < $1.key }.map { ($0.key, .int(Int64($0.value))) }))),
            ("target_modules", targetModules == ["all-linear"] ? .string("all-linear") : .array(targetModules.map { .string($0) })),
            ("task_type", .string("CAUSAL_LM")),
            ("use_dora", .bool(false)),
            ("use_rslora", .bool(useRSLoRA)),
        ]))
    }
}

public enum PEFTAdapter {
    static let keyPrefix = "base_model.model."

    /// Reads an adapter folder and attaches its LoRA weights to the model's linear layers.
    /// Every adapter tensor must fit a layer of the model; a mismatch is an error naming the tensor.
    @discardableResult
    public static func load(directory: String, into model: LlamaModel) throws -> LoRAConfig {
        let configPath = directory + "/adapter_config.json"
        guard FileSystem.exists(configPath) else { throw UsageError("\(directory): no adapter_config.json (is this a PEFT adapter folder?)") }
        let json: JSONValue
        do { json = try JSONValue.parse(bytes: try FileSystem.readFile(configPath)) } catch let e as JSONParseError {
            throw FileFormatError(file: configPath, place: "JSON", e.description)
        }
        let config = try LoRAConfig(json: json, file: configPath)
        let weightsPath = directory + "/adapter_model.safetensors"
        guard FileSystem.exists(weightsPath) else {
            throw UsageError("\(directory): no adapter_model.safetensors (only the safetensors format is read)")
        }
        let file = try SafeTensorsFile(path: weightsPath)
        let layers = Dictionary(uniqueKeysWithValues: model.linearLayers.map { ($0.name, $0) })
        var pending: [String: (a: Matrix?, b: Matrix?)] = [:]
        for tensor in file.tensors {
            func fail(_ message: String) -> FileFormatError { FileFormatError(file: weightsPath, place: "tensor '\(tensor.name)'", message) }
            guard tensor.name.hasPrefix(keyPrefix) else { throw fail("expected a key starting with '\(keyPrefix)'") }
            var key = String(tensor.name.dropFirst(keyPrefix.count))
            // PEFT may or may not keep the adapter name ("default") in saved keys.
            key = key.replacing(".lora_A.default.weight", with: ".lora_A.weight")
                .replacing(".lora_B.default.weight", with: ".lora_B.weight")
            let isA = key.hasSuffix(".lora_A.weight"), isB = key.hasSuffix(".lora_B.weight")
            guard isA || isB else { throw fail("not a LoRA weight (expected ...lora_A.weight or ...lora_B.weight)") }
            let module = String(key.dropLast(".lora_A.weight".count))
            guard let layer = layers[module] else { throw fail("the base model has no linear layer '\(module)'") }
            let r = config.rank(for: module)
            let expected = isA ? [r, layer.inFeatures] : [layer.outFeatures, r]
            guard tensor.shape == expected else {
                throw fail("shape \(tensor.shape) does not fit the base layer (expected \(expected): r=\(r), \(layer.outFeatures)×\(layer.inFeatures))")
            }
            let m = Matrix(rows: expected[0], columns: expected[1], values: try file.floats(tensor.name))
            if isA { pending[module, default: (nil, nil)].a = m } else { pending[module, default: (nil, nil)].b = m }
        }
        for (module, pair) in pending {
            guard let a = pair.a, let b = pair.b else {
                throw FileFormatError(file: weightsPath, place: "module '\(module)'", "has lora_\(pair.a == nil ? "A" : "B") missing")
            }
            layers[module]!.lora = LoRAAdapter(a: a, b: b, scale: config.scale(rank: config.rank(for: module), alpha: config.alpha(for: module)),
                                                dropout: Float(config.dropout))
        }
        guard !pending.isEmpty else { throw FileFormatError(file: weightsPath, place: "tensors", "no LoRA weights found") }
        return config
    }

    /// Writes the model's adapters in PEFT's format (weights in fp32, as PEFT saves fp32 adapters).
    /// The files go into a temporary folder first and are renamed into `directory` only once all are written, so an
    /// interrupted save leaves the previous adapter; other files in `directory` are kept.
    public static func save(model: LlamaModel, config: LoRAConfig, to directory: String) throws {
        try FileSystem.writeFilesInto(directory) { try writeFiles(model: model, config: config, into: $0) }
    }

    /// Writes adapter_model.safetensors and adapter_config.json into the existing folder `directory`.
    static func writeFiles(model: LlamaModel, config: LoRAConfig, into directory: String) throws {
        var records: [TensorRecord] = []
        for layer in model.linearLayers {
            guard let lora = layer.lora else { continue }
            records.append(TensorRecord(name: keyPrefix + layer.name + ".lora_A.weight", floats: lora.a.values, shape: [lora.a.rows, lora.a.columns]))
            records.append(TensorRecord(name: keyPrefix + layer.name + ".lora_B.weight", floats: lora.b.values, shape: [lora.b.rows, lora.b.columns]))
        }
        records.sort { $0.name < $1.name }
        try SafeTensorsWriter.write(records, metadata: ["format": "pt"], to: directory + "/adapter_model.safetensors")
        try FileSystem.writeAtomically(directory + "/adapter_config.json", text: config.json().serialized(.init(indent: 2)) + "\n")
    }
}
