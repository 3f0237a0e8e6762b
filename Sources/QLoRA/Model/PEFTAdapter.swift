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
    /// PEFT's `layers_to_transform`: only these block indices get adapters (nil: every block).
    public var layersToTransform: [Int]?

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

    /// Phi-3's fused projections, the same choice as `llamaProjections` on a fused model.
    public static let fusedProjections = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

    /// This config for `model`: the default targets (`llamaProjections`, every projection of a block) become the
    /// fused model's own projections (`fusedProjections`); any other list is kept, and must name the model's modules.
    public func resolvingDefaultTargets(for model: DecoderModel) -> LoRAConfig {
        guard model.config.fusedProjections, targetModules.sorted() == Self.llamaProjections.sorted() else { return self }
        var resolved = self
        resolved.targetModules = Self.fusedProjections.sorted()
        return resolved
    }

    /// The scale applied to B·A for a module.
    public func scale(rank r: Int, alpha a: Double) -> Float {
        Float(useRSLoRA ? a / Double(r).squareRoot() : a / Double(r))
    }

    /// Whether the linear layer `modulePath` gets an adapter: PEFT's rule, a name equal to the path or
    /// ending it after a dot, within `layersToTransform` when given.
    public func targets(_ modulePath: String) -> Bool {
        if let layers = layersToTransform {
            guard let layer = DecoderModel.layerIndex(of: modulePath), layers.contains(layer) else { return false }
        }
        if targetModules.contains("all-linear") { return !modulePath.hasSuffix("lm_head") }
        return targetModules.contains { Self.name($0, matches: modulePath) }
    }

    static func name(_ target: String, matches modulePath: String) -> Bool {
        modulePath == target || modulePath.hasSuffix("." + target)
    }

    func override<T>(_ pattern: [String: T], for modulePath: String) -> T? {
        pattern.first { modulePath == $0.key || modulePath.hasSuffix("." + $0.key) }?.value
    }

    public func rank(for modulePath: String) -> Int { override(rankPattern, for: modulePath) ?? rank }
    public func alpha(for modulePath: String) -> Double { override(alphaPattern, for: modulePath) ?? alpha }
}

extension LoRAConfig {
    /// Reads and validates `adapter_config.json`: wrong types and out-of-range values are errors naming
    /// the field, and so is every PEFT option that changes the adapter's math and is not implemented.
    public init(json: JSONValue, file: String) throws {
        func fail(_ key: String, _ message: String) -> FileFormatError { FileFormatError(file: file, place: "'\(key)'", message) }
        func value(_ key: String) -> JSONValue? { json[key].flatMap { $0.isNull ? nil : $0 } }
        func number(_ key: String, _ fallback: Double) throws -> Double {
            guard let v = value(key) else { return fallback }
            guard let d = v.double else { throw fail(key, "expected a number, got \(v.serialized())") }
            return d
        }
        func flag(_ key: String) throws -> Bool {
            guard let v = value(key) else { return false }
            guard let b = v.bool else { throw fail(key, "expected true or false, got \(v.serialized())") }
            return b
        }
        guard json.object != nil else { throw FileFormatError(file: file, place: "top level", "expected a JSON object") }
        guard json["peft_type"]?.string == "LORA" else {
            throw fail("peft_type", "expected \"LORA\", got \(json["peft_type"]?.serialized() ?? "nothing")")
        }
        guard let rValue = value("r"), let r = rValue.int, r > 0 else {
            throw fail("r", "expected a positive integer, got \(json["r"]?.serialized() ?? "nothing")")
        }
        guard value("lora_alpha") != nil else { throw fail("lora_alpha", "missing (expected a number > 0)") }
        let alpha = try number("lora_alpha", 0)
        guard alpha.isFinite, alpha > 0 else { throw fail("lora_alpha", "expected a finite number > 0, got \(alpha)") }
        let dropout = try number("lora_dropout", 0)
        guard dropout >= 0, dropout < 1 else { throw fail("lora_dropout", "expected a number in [0, 1), got \(dropout)") }

        var targets: [String]
        switch value("target_modules") {
        case .string("all-linear")?:
            targets = ["all-linear"]
        case .string(let pattern)?:
            // PEFT full-matches a single string as a regular expression against module paths.
            throw fail("target_modules", "a regular expression (\"\(pattern)\") is not supported; list the module names (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\"")
        case .array(let list)?:
            targets = try list.map { v in
                guard let name = v.string, !name.isEmpty else { throw fail("target_modules", "expected module names (strings), got \(v.serialized())") }
                return name
            }
        default:
            targets = []
        }
        guard !targets.isEmpty else { throw fail("target_modules", "expected module names") }
        targets.sort()
        self.init(rank: r, alpha: alpha, dropout: dropout, targetModules: targets,
                  useRSLoRA: try flag("use_rslora"), baseModelNameOrPath: value("base_model_name_or_path")?.string ?? "")

        for (k, v) in value("rank_pattern")?.object ?? JSONObject() {
            guard let n = v.int, n > 0 else { throw fail("rank_pattern", "'\(k)': expected a positive integer rank, got \(v.serialized())") }
            rankPattern[k] = n
        }
        for (k, v) in value("alpha_pattern")?.object ?? JSONObject() {
            guard let a = v.double, a.isFinite, a > 0 else { throw fail("alpha_pattern", "'\(k)': expected a finite alpha > 0, got \(v.serialized())") }
            alphaPattern[k] = a
        }
        if let layers = value("layers_to_transform") {
            let list = layers.array ?? [layers]
            layersToTransform = try list.map { v in
                guard let i = v.int, i >= 0 else { throw fail("layers_to_transform", "expected layer indices (non-negative integers), got \(v.serialized())") }
                return i
            }
            // PEFT finds the index after one of these names; a Llama's blocks are `model.layers.N`.
            if let pattern = value("layers_pattern") {
                let names = (pattern.array ?? [pattern]).compactMap(\.string)
                guard names.contains("layers") else {
                    throw fail("layers_pattern", "\(pattern.serialized()) names no layer list of a Llama-family model (its blocks are 'model.layers.N'; use \"layers\")")
                }
            }
        }

        // Options that change what the adapter computes and are not implemented: refused by name.
        if try flag("use_dora") { throw fail("use_dora", "DoRA adapters are not supported") }
        if let bias = value("bias") {
            guard bias.string == "none" else { throw fail("bias", "only bias \"none\" is supported, got \(bias.serialized())") }
        }
        if try flag("lora_bias") { throw fail("lora_bias", "a bias on lora_B is not supported") }
        if try flag("use_qalora") { throw fail("use_qalora", "QA-LoRA adapters are not supported") }
        for (key, what) in [("modules_to_save", "fully trained copies of modules (modules_to_save) are not supported"),
                            ("layer_replication", "layer replication is not supported"),
                            ("target_parameters", "LoRA on parameters (target_parameters) is not supported"),
                            ("trainable_token_indices", "trainable token embeddings are not supported"),
                            ("exclude_modules", "exclude_modules is not supported; list the target modules instead"),
                            ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens) is not supported"),
                            ("arrow_config", "Arrow routing is not supported")] {
            guard let v = value(key) else { continue }
            if v.array?.isEmpty == true || v.object?.count == 0 { continue }
            throw fail(key, "\(what) (got \(v.serialized()))")
        }
        // fan_in_fan_out is ignored, as PEFT ignores it (with a warning) for torch.nn.Linear layers.
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
            ("layers_to_transform", layersToTransform.map { .array($0.map { .int(Int64($0)) }) } ?? .null),
            ("lora_alpha", alpha == alpha.rounded() && abs(alpha) < 1e15 ? .int(Int64(alpha)) : .double(alpha)),
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
    public static func load(directory: String, into model: DecoderModel) throws -> LoRAConfig {
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
        try checkConfig(config, against: model, file: configPath)
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
            guard config.targets(module) else {
                throw fail("'\(module)' is not selected by \(configPath) (target_modules \(config.targetModules)\(config.layersToTransform.map { ", layers_to_transform \($0)" } ?? ""))")
            }
            let r = config.rank(for: module)
            let expected = isA ? [r, layer.inFeatures] : [layer.outFeatures, r]
            guard tensor.shape == expected else {
                throw fail("shape \(tensor.shape) does not fit the base layer (expected \(expected): r=\(r), \(layer.outFeatures)×\(layer.inFeatures))")
            }
            let values = try file.floats(tensor.name)
            try checkFinite(values, tensor: tensor.name, origin: weightsPath)
            let m = Matrix(rows: expected[0], columns: expected[1], values: values)
            guard (isA ? pending[module]?.a : pending[module]?.b) == nil else {
                throw fail("a second lora_\(isA ? "A" : "B") weight for '\(module)' (with and without the adapter name)")
            }
            if isA { pending[module, default: (nil, nil)].a = m } else { pending[module, default: (nil, nil)].b = m }
        }
        guard !pending.isEmpty else { throw FileFormatError(file: weightsPath, place: "tensors", "no LoRA weights found") }
        // PEFT would give a selected module without weights a fresh adapter (B = 0): an adapter folder
        // missing them is incomplete, not a smaller adapter.
        for layer in model.linearLayers where config.targets(layer.name) && pending[layer.name] == nil {
            throw FileFormatError(file: weightsPath, place: "module '\(layer.name)'",
                                  "selected by \(configPath) but the file has no lora_A/lora_B weights for it")
        }
        for (module, pair) in pending {
            guard let a = pair.a, let b = pair.b else {
                throw FileFormatError(file: weightsPath, place: "module '\(module)'", "has lora_\(pair.a == nil ? "A" : "B") missing")
            }
            layers[module]!.lora = LoRAAdapter(a: a, b: b, scale: config.scale(rank: config.rank(for: module), alpha: config.alpha(for: module)),
                                                dropout: Float(config.dropout))
        }
        return config
    }

    /// The parts of the config that refer to the model: every target module and layer index must exist.
    static func checkConfig(_ config: LoRAConfig, against model: DecoderModel, file: String) throws {
        let names = model.linearLayers.map(\.name)
        for target in config.targetModules where target != "all-linear" {
            guard names.contains(where: { LoRAConfig.name(target, matches: $0) }) else {
                throw FileFormatError(file: file, place: "'target_modules'",
                                      "'\(target)' names no linear layer of the model (its projections: \(model.projectionNames.joined(separator: ", ")))")
            }
        }
        for layer in config.layersToTransform ?? [] where layer >= model.blocks.count {
            throw FileFormatError(file: file, place: "'layers_to_transform'", "layer \(layer) does not exist (the model has \(model.blocks.count) layers)")
        }
    }

    /// Writes the model's adapters in PEFT's format (weights in fp32, as PEFT saves fp32 adapters).
    /// The files go into a temporary folder first and are renamed into `directory` only once all are written, so an
    /// interrupted save leaves the previous adapter; other files in `directory` are kept.
    public static func save(model: DecoderModel, config: LoRAConfig, to directory: String) throws {
        try FileSystem.writeFilesInto(directory) { try writeFiles(model: model, config: config, into: $0) }
    }

    /// Writes adapter_model.safetensors and adapter_config.json into the existing folder `directory`.
    static func writeFiles(model: DecoderModel, config: LoRAConfig, into directory: String) throws {
        var config = config
        // PEFT resolves all-linear over the whole checkpoint, a multimodal one's vision tower included, which this adapter
        // does not train: the text model's modules by full path make PEFT build exactly the adapters saved here.
        if config.targetModules == ["all-linear"], model.config.modulePrefix != "model." {
            config.targetModules = model.linearLayers.filter { $0.lora != nil }.map(\.name)
        }
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
