// The Hugging Face `config.json` of the Llama family (llama, mistral, qwen2).

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
    public enum Kind: String, Sendable { case `default`, llama3, linear }
    public var kind: Kind
    public var factor: Double = 1
    public var lowFrequencyFactor: Double = 1
    public var highFrequencyFactor: Double = 4
    public var originalMaxPositionEmbeddings: Int = 8192
}

/// The architecture fields of a Llama-family `config.json`.
public struct LlamaConfig: Equatable, Sendable {
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
    /// The whole file as read, so that writers can keep fields we do not model.
    public var raw: JSONValue

    public static let supportedModelTypes = ["llama", "mistral", "qwen2"]

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

    public init(json: JSONValue, file: String = "config.json") throws {
        func fail(_ key: String, _ message: String) -> FileFormatError { FileFormatError(file: file, place: "'\(key)'", message) }
        func int(_ key: String) throws -> Int {
            guard let v = json[key]?.int else { throw fail(key, "missing or not an integer") }
            guard v > 0 else { throw fail(key, "must be positive, got \(v)") }
            return v
        }
        guard let modelType = json["model_type"]?.string else { throw fail("model_type", "missing") }
        guard Self.supportedModelTypes.contains(modelType) else {
            throw fail("model_type", "'\(modelType)' is not supported (supported: \(Self.supportedModelTypes.joined(separator: ", ")))")
        }
        self.modelType = modelType
        hiddenSize = try int("hidden_size")
        intermediateSize = try int("intermediate_size")
        layerCount = try int("num_hidden_layers")
        headCount = try int("num_attention_heads")
        kvHeadCount = json["num_key_value_heads"]?.int ?? headCount
        guard kvHeadCount > 0 else { throw fail("num_key_value_heads", "must be positive, got \(kvHeadCount)") }
        vocabularySize = try int("vocab_size")
        if let hd = json["head_dim"]?.int { headDim = hd } else {
            guard hiddenSize % headCount == 0 else { throw fail("hidden_size", "\(hiddenSize) is not divisible by num_attention_heads \(headCount)") }
            headDim = hiddenSize / headCount
        }
        guard headCount % kvHeadCount == 0 else {
            throw fail("num_key_value_heads", "\(kvHeadCount) does not divide num_attention_heads \(headCount)")
        }
        guard headDim > 0, headDim <= 1 << 16, headDim % 2 == 0 else {
            throw fail("head_dim", "must be even and in 2...65536 for rotary embeddings, got \(headDim)")
        }
        rmsNormEps = Float(json["rms_norm_eps"]?.double ?? 1e-6)
        tieWordEmbeddings = json["tie_word_embeddings"]?.bool ?? false
        attentionBias = json["attention_bias"]?.bool ?? (modelType == "qwen2")
        maxPositionEmbeddings = json["max_position_embeddings"]?.int ?? 2048
        bosTokenID = json["bos_token_id"]?.int
        if let list = json["eos_token_id"]?.array { eosTokenIDs = list.compactMap(\.int) } else { eosTokenIDs = json["eos_token_id"]?.int.map { [$0] } ?? [] }
        padTokenID = json["pad_token_id"]?.int

        // transformers 5 writes `rope_parameters`; earlier versions `rope_theta` + `rope_scaling`.
        let rope = json["rope_parameters"] ?? json["rope_scaling"]
        ropeTheta = rope?["rope_theta"]?.double ?? json["rope_theta"]?.double ?? 10000
        let ropeType = rope?["rope_type"]?.string ?? rope?["type"]?.string ?? "default"
        guard let kind = RopeScaling.Kind(rawValue: ropeType) else {
            throw fail("rope_parameters", "rope_type '\(ropeType)' is not supported (supported: default, linear, llama3)")
        }
        ropeScaling = RopeScaling(kind: kind)
        if kind != .default {
            ropeScaling.factor = rope?["factor"]?.double ?? 1
            ropeScaling.lowFrequencyFactor = rope?["low_freq_factor"]?.double ?? 1
            ropeScaling.highFrequencyFactor = rope?["high_freq_factor"]?.double ?? 4
            ropeScaling.originalMaxPositionEmbeddings = rope?["original_max_position_embeddings"]?.int ?? 8192
        }
        raw = json
    }

    public var qDim: Int { headCount * headDim }
    public var kvDim: Int { kvHeadCount * headDim }

    /// The inverse frequencies of rotary embeddings, with llama3/linear scaling applied as transformers does.
    public func ropeInverseFrequencies() -> [Double] {
        var inv = (0..<(headDim / 2)).map { 1.0 / pow(ropeTheta, Double(2 * $0) / Double(headDim)) }
        switch ropeScaling.kind {
        case .default: break
        case .linear: inv = inv.map { $0 / ropeScaling.factor }
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
