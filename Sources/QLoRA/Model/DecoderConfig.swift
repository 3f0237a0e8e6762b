// The Hugging Face `config.json` of a decoder-only model: the Llama family (llama, mistral, qwen2) and its variations
// (phi3: fused projections, partial rotary embeddings, longrope).

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// RoPE frequency scaling, from `rope_parameters` (transformers 5) or `rope_scaling` (earlier).
public struct RopeScaling: Equatable, Sendable {
    public enum Kind: String, Sendable { case `default`, llama3, linear, longrope }
    public var kind: Kind
    public var factor: Double = 1
    public var lowFrequencyFactor: Double = 1
    public var highFrequencyFactor: Double = 4
    public var originalMaxPositionEmbeddings: Int = 8192
    /// longrope (Phi-3): each rotated pair's frequency is divided by `shortFactors[i]` while the sequence is at most
    /// `originalMaxPositionEmbeddings` long and by `longFactors[i]` beyond; cos and sin are scaled by `attentionFactor`.
    public var shortFactors: [Double] = []
    public var longFactors: [Double] = []
    public var attentionFactor: Double = 1
}

/// The architecture fields of a Llama-family `config.json`.
public struct DecoderConfig: Equatable, Sendable {
    public var modelType: String
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layerCount: Int
    public var headCount: Int
    public var kvHeadCount: Int
    public var headDim: Int
    public var vocabularySize: Int
    public var rmsNormEps: Float
    public var ropeTheta: Double
    public var ropeScaling: RopeScaling
    public var tieWordEmbeddings: Bool
    /// Bias on q, k and v (Qwen2 has them; `attention_bias` in Llama configs).
    public var attentionBias: Bool
    public var maxPositionEmbeddings: Int
    public var bosTokenID: Int?
    public var eosTokenIDs: [Int]
    public var padTokenID: Int?
    /// Mistral's / Qwen2's / Phi-3's attention window, when the model uses one (see `slidingWindow(_:modelType:layerCount:)`).
    public var slidingWindow: Int?
    /// Phi-3's fused projections: one `qkv_proj` whose output columns are q | k | v, and one `gate_up_proj` whose
    /// output columns are gate | up (transformers splits them in that order), in place of the five separate linears.
    public var fusedProjections = false
    /// The leading dimensions of each head that rotary embeddings rotate: int(head_dim × partial_rotary_factor), as
    /// transformers truncates it (Phi-4-mini: 96 of 128); the rest pass through unrotated.
    public var rotaryDim: Int
    /// Dropout on the two residual branches in training (Phi-3's `resid_pdrop`); 0 for the other families.
    public var residualDropout: Double = 0
    /// The whole file as read, so that writers can keep fields we do not model.
    public var raw: JSONValue

    public static let supportedModelTypes = ["llama", "mistral", "qwen2", "phi3"]

    /// Reads `config.json` in `directory`.
    public init(directory: String) throws {
        let path = directory + "/config.json"
        guard FileSystem.exists(path) else { throw UsageError("\(directory): no config.json (is this a Hugging Face model folder?)") }
        let json: JSONValue
        do { json = try JSONValue.parse(bytes: try FileSystem.readFile(path)) } catch let e as JSONParseError {
            throw FileFormatError(file: path, place: "JSON", e.description)
        }
        try self.init(json: json, file: path)
    }

    /// Reads and validates every field the model uses: a wrong type, an out-of-range value, or a value
    /// that asks for math this code does not implement is an error naming the field.
    public init(json: JSONValue, file: String = "config.json") throws {
        let fields = ConfigFields(json: json, file: file)
        guard json.object != nil else { throw FileFormatError(file: file, place: "top level", "expected a JSON object") }
        let modelType = try fields.string("model_type") ?? ""
        guard Self.supportedModelTypes.contains(modelType) else {
            throw fields.fail("model_type", modelType.isEmpty ? "missing"
                : "'\(modelType)' is not supported (supported: \(Self.supportedModelTypes.joined(separator: ", ")))")
        }
        self.modelType = modelType
        // Sizes are bounded so that no product of them can overflow (the release build does not trap).
        hiddenSize = try fields.size("hidden_size")
        intermediateSize = try fields.size("intermediate_size")
        layerCount = try fields.size("num_hidden_layers", max: 1 << 16)
        headCount = try fields.size("num_attention_heads", max: 1 << 16)
        kvHeadCount = try fields.optionalSize("num_key_value_heads", max: 1 << 16) ?? headCount
        vocabularySize = try fields.size("vocab_size")
        if let hd = try fields.optionalSize("head_dim", max: 1 << 16) {
            headDim = hd
        } else {
            guard hiddenSize % headCount == 0 else { throw fields.fail("hidden_size", "\(hiddenSize) is not divisible by num_attention_heads \(headCount)") }
            headDim = hiddenSize / headCount
        }
        guard headCount % kvHeadCount == 0 else {
            throw fields.fail("num_key_value_heads", "\(kvHeadCount) does not divide num_attention_heads \(headCount)")
        }
        guard headDim % 2 == 0 else { throw fields.fail("head_dim", "must be even for rotary embeddings, got \(headDim)") }
        let isPhi3 = modelType == "phi3"
        // Phi3Config's defaults differ from Llama's for these two.
        let eps = try fields.double("rms_norm_eps") ?? (isPhi3 ? 1e-5 : 1e-6)
        guard eps.isFinite, eps > 0, Float(eps) > 0 else { throw fields.fail("rms_norm_eps", "must be a finite number > 0 (and > 0 in float32), got \(eps)") }
        rmsNormEps = Float(eps)
        tieWordEmbeddings = try fields.bool("tie_word_embeddings") ?? false
        maxPositionEmbeddings = try fields.optionalSize("max_position_embeddings") ?? (isPhi3 ? 4096 : 2048)
        let vocab = vocabularySize
        func tokenID(_ key: String, _ value: JSONValue) throws -> Int {
            guard let id = value.int else { throw fields.fail(key, "expected a token id (integer), got \(value.serialized())") }
            guard id >= 0, id < vocab else { throw fields.fail(key, "token id \(id) is outside the vocabulary (0..<\(vocab))") }
            return id
        }
        func optionalTokenID(_ key: String) throws -> Int? {
            guard let v = json[key], !v.isNull else { return nil }
            return try tokenID(key, v)
        }
        bosTokenID = try optionalTokenID("bos_token_id")
        padTokenID = try optionalTokenID("pad_token_id")
        if let list = json["eos_token_id"]?.array {
            eosTokenIDs = try list.map { try tokenID("eos_token_id", $0) }
        } else {
            eosTokenIDs = try optionalTokenID("eos_token_id").map { [$0] } ?? []
        }

        // Switches that change the math: accepted only at the values this code computes.
        let act = try fields.string("hidden_act") ?? "silu"
        guard act == "silu" || act == "swish" else {
            throw fields.fail("hidden_act", "'\(act)' is not implemented (only silu, the Llama-family SwiGLU)")
        }
        if try fields.bool("mlp_bias") == true { throw fields.fail("mlp_bias", "biases on the MLP projections are not implemented") }
        switch modelType {
        case "qwen2":
            // Qwen2 always has q, k, v biases (transformers ignores attention_bias there).
            attentionBias = true
        case "mistral":
            attentionBias = false
        case "phi3":
            // Phi-3's qkv_proj has no bias, whatever attention_bias says (transformers ignores the field there).
            attentionBias = false
            fusedProjections = true
            // transformers 5 applies resid_pdrop to both residual branches in training (embd_pdrop is read by nothing).
            let dropout = try fields.double("resid_pdrop") ?? 0
            guard dropout >= 0, dropout < 1 else { throw fields.fail("resid_pdrop", "expected a number in [0, 1), got \(dropout)") }
            residualDropout = dropout
        default:
            // Llama's attention_bias also puts a bias on o_proj, which is not implemented.
            if try fields.bool("attention_bias") == true {
                throw fields.fail("attention_bias", "Llama attention biases (on q, k, v and o_proj) are not implemented")
            }
            attentionBias = false
        }
        if let dropout = try fields.double("attention_dropout"), dropout != 0 {
            throw fields.fail("attention_dropout", "attention dropout is not implemented (expected 0, got \(dropout))")
        }
        slidingWindow = try Self.slidingWindow(fields, modelType: modelType, layerCount: layerCount)
        if let q = json["quantization_config"], !q.isNull {
            let method = q["quant_method"]?.string ?? ""
            guard method == "bitsandbytes" else {
                throw fields.fail("quantization_config", "quant_method '\(method)' is not supported (only bitsandbytes 4-bit checkpoints load)")
            }
            if q["load_in_8bit"]?.bool == true || q["_load_in_8bit"]?.bool == true {
                throw fields.fail("quantization_config", "8-bit bitsandbytes checkpoints are not supported (only 4-bit)")
            }
        }

        // transformers 5 writes `rope_parameters`; earlier versions `rope_theta` + `rope_scaling` (either may be null).
        let ropeKey = json["rope_parameters"].map { !$0.isNull } == true ? "rope_parameters" : "rope_scaling"
        let rope = json[ropeKey].flatMap { $0.isNull ? nil : $0 }
        if let rope, rope.object == nil { throw fields.fail(ropeKey, "expected an object, got \(rope.serialized())") }
        let ropeFields = ConfigFields(json: rope ?? .object(JSONObject()), file: file, prefix: ropeKey + ".")
        ropeTheta = try ropeFields.double("rope_theta") ?? fields.double("rope_theta") ?? 10000
        guard ropeTheta.isFinite, ropeTheta > 0 else { throw fields.fail("rope_theta", "must be a finite number > 0, got \(ropeTheta)") }
        // The rope object's partial_rotary_factor wins over the top-level one (transformers copies the top-level
        // value in only when the rope object has none).
        let partialFields = try ropeFields.double("partial_rotary_factor") != nil ? ropeFields : fields
        let partial = try partialFields.double("partial_rotary_factor") ?? 1
        if partial != 1 && !isPhi3 {
            throw partialFields.fail("partial_rotary_factor", "partial rotary embeddings are implemented for phi3 only (expected 1, got \(partial))")
        }
        guard partial > 0, partial <= 1 else { throw partialFields.fail("partial_rotary_factor", "expected a number in (0, 1], got \(partial)") }
        rotaryDim = Int(Double(headDim) * partial)
        guard rotaryDim >= 2, rotaryDim % 2 == 0 else {
            throw partialFields.fail("partial_rotary_factor", "head_dim \(headDim) × \(partial) gives \(rotaryDim) rotated dimensions; expected an even number ≥ 2")
        }
        var ropeType = try ropeFields.string("rope_type") ?? ropeFields.string("type") ?? "default"
        // Phi3Config renames the types early Phi-3 checkpoints wrote.
        if isPhi3 && (ropeType == "su" || ropeType == "yarn") { ropeType = "longrope" }
        let supportedTypes: [RopeScaling.Kind] = isPhi3 ? [.default, .longrope] : [.default, .linear, .llama3]
        guard let kind = RopeScaling.Kind(rawValue: ropeType), supportedTypes.contains(kind) else {
            throw fields.fail(ropeKey, "rope_type '\(ropeType)' is not supported for \(modelType) (supported: \(supportedTypes.map(\.rawValue).joined(separator: ", ")))")
        }
        ropeScaling = RopeScaling(kind: kind)
        if kind == .longrope {
            ropeScaling = try Self.longrope(fields, ropeFields, rotaryPairs: rotaryDim / 2, maxPositionEmbeddings: maxPositionEmbeddings)
        } else if kind != .default {
            func positive(_ key: String, _ fallback: Double) throws -> Double {
                let v = try ropeFields.double(key) ?? fallback
                guard v.isFinite, v > 0 else { throw ropeFields.fail(key, "must be a finite number > 0, got \(v)") }
                return v
            }
            ropeScaling.factor = try positive("factor", 1)
            if kind == .llama3 {
                ropeScaling.lowFrequencyFactor = try positive("low_freq_factor", 1)
                ropeScaling.highFrequencyFactor = try positive("high_freq_factor", 4)
                guard ropeScaling.highFrequencyFactor > ropeScaling.lowFrequencyFactor else {
                    throw ropeFields.fail("high_freq_factor", "must be greater than low_freq_factor (\(ropeScaling.highFrequencyFactor) ≤ \(ropeScaling.lowFrequencyFactor))")
                }
                ropeScaling.originalMaxPositionEmbeddings = try ropeFields.optionalSize("original_max_position_embeddings") ?? 8192
            }
        }
        raw = json
    }

    /// Phi-3's longrope fields, computed as transformers' `_compute_longrope_parameters` does.
    static func longrope(_ fields: ConfigFields, _ ropeFields: ConfigFields, rotaryPairs: Int, maxPositionEmbeddings: Int) throws -> RopeScaling {
        var s = RopeScaling(kind: .longrope)
        // Phi3Config always overwrites the rope object's original_max_position_embeddings with its own top-level
        // field (default 4096), so that one is the threshold between the short and the long factors.
        s.originalMaxPositionEmbeddings = try fields.optionalSize("original_max_position_embeddings") ?? 4096
        func factors(_ key: String) throws -> [Double] {
            guard let v = ropeFields.json[key], !v.isNull else { throw ropeFields.fail(key, "missing (longrope needs \(rotaryPairs) factors, one per rotated pair)") }
            guard let list = v.array, list.count == rotaryPairs else {
                throw ropeFields.fail(key, "expected a list of \(rotaryPairs) numbers (rotated dimensions / 2), got \(v.serialized())")
            }
            return try list.map { x in
                guard let d = x.double, d.isFinite, d > 0 else { throw ropeFields.fail(key, "expected finite numbers > 0, got \(x.serialized())") }
                return d
            }
        }
        s.shortFactors = try factors("short_factor")
        s.longFactors = try factors("long_factor")
        // Without `factor`, the context extension is max_position_embeddings / original_max_position_embeddings.
        s.factor = try ropeFields.double("factor") ?? Double(maxPositionEmbeddings) / Double(s.originalMaxPositionEmbeddings)
        guard s.factor.isFinite, s.factor > 0 else { throw ropeFields.fail("factor", "must be a finite number > 0, got \(s.factor)") }
        if let given = try ropeFields.double("attention_factor") {
            s.attentionFactor = given
        } else if s.factor > 1 {
            s.attentionFactor = (1 + log(s.factor) / log(Double(s.originalMaxPositionEmbeddings))).squareRoot()
        }
        guard s.attentionFactor.isFinite, s.attentionFactor > 0 else {
            throw ropeFields.fail("attention_factor", "must be a finite number > 0, got \(s.attentionFactor)")
        }
        return s
    }

    /// Whether a forward over positions 0..<`sequenceLength` rotates with longrope's long factors. transformers decides
    /// once per forward call from the largest position id (+ 1) in it, for every token of the call.
    public func usesLongRopeFactors(sequenceLength: Int) -> Bool {
        ropeScaling.kind == .longrope && sequenceLength > ropeScaling.originalMaxPositionEmbeddings
    }

    /// Throws when training (unlike evaluation and generation) would need math this code does not compute.
    public func checkTrainable() throws {
        if residualDropout != 0 {
            throw UsageError("config.json 'resid_pdrop' is \(residualDropout): dropout on the residual branches in training is not implemented; set it to 0.0 (as Phi-3 and Phi-4 checkpoints ship it)")
        }
    }

    /// The attention window when the model restricts attention to the last `n` positions (Mistral's
    /// `sliding_window`, Qwen2's with `use_sliding_window`); nil when every layer sees all positions.
    /// Sequences no longer than the window compute exactly as full attention, so we run those and
    /// refuse longer ones (`checkSequenceLength`) rather than compute them wrongly.
    static func slidingWindow(_ fields: ConfigFields, modelType: String, layerCount: Int) throws -> Int? {
        switch modelType {
        case "mistral", "phi3":
            // transformers' Phi3Model masks with the window whenever sliding_window is set (Phi-3-mini-4k: 2047).
            return try fields.optionalSize("sliding_window", max: Int.max >> 1)
        case "qwen2":
            guard try fields.bool("use_sliding_window") == true else { return nil }
            let window = try fields.optionalSize("sliding_window", max: Int.max >> 1) ?? 4096
            var sliding: Bool
            if let types = fields.json["layer_types"], !types.isNull {
                guard let list = types.array, list.count == layerCount else {
                    throw fields.fail("layer_types", "expected a list of \(layerCount) layer types (num_hidden_layers)")
                }
                sliding = false
                for t in list {
                    switch t.string {
                    case "full_attention"?: break
                    case "sliding_attention"?: sliding = true
                    default: throw fields.fail("layer_types", "unknown layer type \(t.serialized()) (expected full_attention or sliding_attention)")
                    }
                }
            } else {
                // Layers from max_window_layers on slide (transformers' default layer_types); 0 means all.
                let v = fields.json["max_window_layers"].flatMap { $0.isNull ? nil : $0 } ?? .int(28)
                guard let first = v.int, first >= 0 else { throw fields.fail("max_window_layers", "expected a non-negative integer, got \(v.serialized())") }
                sliding = first < layerCount
            }
            return sliding ? window : nil
        default:
            return nil
        }
    }

    /// Throws when sequences of `length` positions would need attention this code does not compute
    /// (beyond a sliding window); `what` names the option or input that asked for them.
    public func checkSequenceLength(_ length: Int, what: String) throws {
        if let window = slidingWindow, length > window {
            throw UsageError("\(what) asks for \(length) positions, but this \(modelType) model attends within a sliding window of \(window) (config.json 'sliding_window') and sliding-window attention is not implemented; use at most \(window)")
        }
    }

    public var qDim: Int { headCount * headDim }
    public var kvDim: Int { kvHeadCount * headDim }

    /// The inverse frequencies of rotary embeddings, one per rotated pair (`rotaryDim / 2`), with llama3/linear/longrope
    /// scaling applied as transformers does (`long`: longrope's long factors).
    public func ropeInverseFrequencies(long: Bool = false) -> [Double] {
        var inv = (0..<(rotaryDim / 2)).map { 1.0 / pow(ropeTheta, Double(2 * $0) / Double(rotaryDim)) }
        switch ropeScaling.kind {
        case .default: break
        case .linear: inv = inv.map { $0 / ropeScaling.factor }
        case .longrope: inv = zip(inv, long ? ropeScaling.longFactors : ropeScaling.shortFactors).map { $0 / $1 }
        case .llama3:
            let s = ropeScaling
            let lowWavelength = Double(s.originalMaxPositionEmbeddings) / s.lowFrequencyFactor
            let highWavelength = Double(s.originalMaxPositionEmbeddings) / s.highFrequencyFactor
            inv = inv.map { f in
                let wavelength = 2 * Double.pi / f
                if wavelength < highWavelength { return f }
                if wavelength > lowWavelength { return f / s.factor }
                let smooth = (Double(s.originalMaxPositionEmbeddings) / wavelength - s.lowFrequencyFactor) / (s.highFrequencyFactor - s.lowFrequencyFactor)
                return (1 - smooth) * f / s.factor + smooth * f
            }
        }
        return inv
    }

    /// Parameter count of the dense model (the embedding counted once when tied).
    public var parameterCount: Int {
        let attention = hiddenSize * qDim + 2 * hiddenSize * kvDim + qDim * hiddenSize + (attentionBias ? qDim + 2 * kvDim : 0)
        let mlp = 3 * hiddenSize * intermediateSize
        let perLayer = attention + mlp + 2 * hiddenSize
        return vocabularySize * hiddenSize * (tieWordEmbeddings ? 1 : 2) + layerCount * perLayer + hiddenSize
    }
}

/// Typed access to a config's fields: a value of the wrong JSON type is an error naming the field;
/// absent and null fields read as nil.
struct ConfigFields {
    let json: JSONValue
    let file: String
    /// Prefix of the place in messages, for nested objects ("rope_parameters.").
    var prefix = ""

    func fail(_ key: String, _ message: String) -> FileFormatError { FileFormatError(file: file, place: "'\(prefix)\(key)'", message) }

    private func value(_ key: String) -> JSONValue? {
        guard let v = json[key], !v.isNull else { return nil }
        return v
    }

    private func wrongType(_ key: String, _ expected: String, _ v: JSONValue) -> FileFormatError {
        fail(key, "expected \(expected), got \(v.serialized())")
    }

    func string(_ key: String) throws -> String? {
        guard let v = value(key) else { return nil }
        guard let s = v.string else { throw wrongType(key, "a string", v) }
        return s
    }

    func bool(_ key: String) throws -> Bool? {
        guard let v = value(key) else { return nil }
        guard let b = v.bool else { throw wrongType(key, "true or false", v) }
        return b
    }

    func double(_ key: String) throws -> Double? {
        guard let v = value(key) else { return nil }
        guard let d = v.double else { throw wrongType(key, "a number", v) }
        return d
    }

    /// A positive integer no larger than `max`, or nil when absent.
    func optionalSize(_ key: String, max: Int = 1 << 24) throws -> Int? {
        guard let v = value(key) else { return nil }
        guard let n = v.int else { throw wrongType(key, "a positive integer", v) }
        guard n > 0 else { throw fail(key, "must be positive, got \(n)") }
        guard n <= max else { throw fail(key, "\(n) is larger than this program accepts (at most \(max))") }
        return n
    }

    /// A required positive integer no larger than `max`.
    func size(_ key: String, max: Int = 1 << 24) throws -> Int {
        guard let n = try optionalSize(key, max: max) else { throw fail(key, "missing (expected a positive integer)") }
        return n
    }
}
