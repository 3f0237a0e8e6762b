// The Hugging Face `config.json` of a decoder-only model: the Llama block and the variations of it that
// Mistral, Qwen2/3, Gemma 2/3 and Phi-3 (fused projections, partial rotary embeddings, longrope) switch on.

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

/// What Phi-3's longrope reads beside its rope object: the top-level fields (original_max_position_embeddings)
/// and the sizes its factor lists must have.
struct LongropeContext {
    let fields: ConfigFields
    let rotaryPairs: Int
    let maxPositionEmbeddings: Int
}

/// A base frequency with its scaling: what one kind of layer rotates q and k by.
public struct RopeParameters: Equatable, Sendable {
    public var theta: Double
    public var scaling: RopeScaling
}

/// What the attention of one layer sees.
public enum AttentionKind: Equatable, Sendable {
    /// Every earlier position of the sequence.
    case full
    /// The last `window` positions, itself included: query i sees keys j with i − window < j ≤ i
    /// (transformers' `sliding_window_overlay`: kv_idx > q_idx − sliding_window), in training and in the KV cache.
    case sliding(window: Int)

    /// The keys a query at `position` sees, clipped below at `first` (its example's start).
    @inline(__always)
    public func visible(position: Int, first: Int = 0) -> Range<Int> {
        switch self {
        case .full: return first..<(position + 1)
        case .sliding(let window): return max(first, position - window + 1)..<(position + 1)
        }
    }
}

/// The activation of the gated MLP: down(act(gate(x)) · up(x)).
public enum MLPActivation: String, Sendable {
    /// SwiGLU (Llama, Mistral, Qwen).
    case silu
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    case geluTanh = "gelu_pytorch_tanh"
}

/// One description of a decoder-only model, read from a Hugging Face `config.json`: the Llama block and
/// the variations of it that each family switches on. Every path (CPU reference, GPU, merge, GGUF) reads this.
///
/// The block, with the variations in brackets:
///   a = attention(rope(qn(q_proj(n1(x)))), rope(kn(k_proj(n1(x)))), v_proj(n1(x)))      [qn, kn: q/k norm]
///   h = x + [n_ao](o_proj(a))                                                         [n_ao: sandwich norms]
///   y = h + [n_mo](down_proj(act(gate_proj(n2(h))) · up_proj(n2(h))))
/// where every norm is RMSNorm times w (or 1 + w), attention logits are scaled by `attentionScale`, [soft-capped]
/// and [limited to a sliding window] per layer, and the embedding is [multiplied by √hidden].
public struct DecoderConfig: Equatable, Sendable {
    public var modelType: String
    public var hiddenSize: Int
    public var intermediateSize: Int
    /// Changing it (shallower benchmark or check models) keeps the layer pattern: layer l then attends as layer
    /// l mod the old count did, so `layerAttention` always has one entry per layer.
    public var layerCount: Int {
        didSet {
            let old = layerAttention
            layerAttention = (0..<layerCount).map { old.isEmpty ? .full : old[$0 % old.count] }
        }
    }
    public var headCount: Int
    public var kvHeadCount: Int
    public var headDim: Int
    public var vocabularySize: Int
    public var rmsNormEps: Float
    /// RoPE of every layer (of the full-attention layers when `slidingRope` is set).
    public var ropeTheta: Double
    public var ropeScaling: RopeScaling
    public var tieWordEmbeddings: Bool
    /// Bias on q, k and v (Qwen2 has them; `attention_bias` in Llama configs).
    public var attentionBias: Bool
    public var maxPositionEmbeddings: Int
    public var bosTokenID: Int?
    public var eosTokenIDs: [Int]
    public var padTokenID: Int?
    /// The window of the sliding-window layers, nil when every layer attends to all positions.
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

    // MARK: Variations of the block

    /// What each layer's attention sees (`layer_types`; Mistral's `sliding_window` slides every layer).
    public var layerAttention: [AttentionKind]
    /// RoPE of the sliding-window layers when it differs from the full ones (Gemma 3's local base frequency).
    public var slidingRope: RopeParameters?
    /// RMSNorm over each head of q and of k, before RoPE (`q_norm`, `k_norm`: Qwen3, Gemma 3).
    public var qkNorm = false
    /// Norms multiply by `w + normWeightOffset`: 0 for Llama's x·w, 1 for Gemma's x·(1 + w).
    public var normWeightOffset: Float = 0
    /// Gemma's sandwich: a norm on the attention output (its `post_attention_layernorm`) and one on the MLP output
    /// (`post_feedforward_layernorm`); the MLP's input norm is then `pre_feedforward_layernorm`.
    public var sandwichNorms = false
    public var mlpActivation: MLPActivation = .silu
    /// The embedding is multiplied by √hidden (Gemma).
    public var scalesEmbedding = false
    /// `query_pre_attn_scalar` (Gemma): attention logits are scaled by its inverse square root instead of head_dim's.
    public var queryPreAttentionScalar: Double?
    /// Attention logits become c·tanh(logit / c) before the mask and softmax (Gemma 2's `attn_logit_softcapping`).
    public var attentionSoftcap: Float?
    /// The output logits become c·tanh(logit / c) (Gemma 2's `final_logit_softcapping`).
    public var finalLogitSoftcap: Float?
    /// Where the text model's modules sit: `model.` (causal LMs) or `model.language_model.` (Gemma 3's multimodal
    /// checkpoints, as transformers 5 names the modules and PEFT the adapter keys).
    public var modulePrefix = "model."
    /// The prefix of the text model's tensors in the checkpoint files when it differs from `modulePrefix`
    /// (`language_model.model.`: transformers saves Gemma 3 multimodal checkpoints in this older layout).
    public var checkpointPrefix = "model."
    /// The untied output head's tensor in the checkpoint files.
    public var headTensorName = "lm_head.weight"

    public static let supportedModelTypes = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3"]

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
    /// that asks for math this code does not implement is an error naming the field. Absent fields take
    /// the defaults of the family's transformers config class (Gemma 3's Hub configs leave most out).
    public init(json: JSONValue, file: String = "config.json") throws {
        let top = ConfigFields(json: json, file: file)
        guard top.json.object != nil else { throw FileFormatError(file: file, place: "top level", "expected a JSON object") }
        let modelType = try top.string("model_type") ?? ""
        guard Self.supportedModelTypes.contains(modelType) else {
            throw top.fail("model_type", modelType.isEmpty ? "missing"
                : "'\(modelType)' is not supported (supported: \(Self.supportedModelTypes.joined(separator: ", ")))")
        }
        self.modelType = modelType
        // A Gemma 3 multimodal checkpoint: its text model is described by `text_config`.
        let fields: ConfigFields
        let family: String
        if modelType == "gemma3" {
            guard let text = top.json["text_config"], text.object != nil else {
                throw top.fail("text_config", "missing (a gemma3 checkpoint describes its language model there)")
            }
            fields = ConfigFields(json: text, file: file, prefix: "text_config.")
            let textType = try fields.string("model_type") ?? "gemma3_text"
            guard textType == "gemma3_text" else { throw fields.fail("model_type", "expected gemma3_text, got '\(textType)'") }
            family = "gemma3_text"
            modulePrefix = "model.language_model."
            checkpointPrefix = "language_model.model."
            headTensorName = "language_model.lm_head.weight"
        } else {
            fields = top
            family = modelType
        }
        let isGemma = family == "gemma2" || family == "gemma3_text"
        let json = fields.json
        // Sizes are bounded so that no product of them can overflow (the release build does not trap).
        hiddenSize = try fields.size("hidden_size")
        intermediateSize = try fields.size("intermediate_size")
        layerCount = try fields.size("num_hidden_layers", max: 1 << 16)
        headCount = try fields.size("num_attention_heads", max: 1 << 16)
        kvHeadCount = try fields.optionalSize("num_key_value_heads", max: 1 << 16) ?? headCount
        let defaultVocabulary = ["gemma2": 256_000, "gemma3_text": 262_208][family]
        vocabularySize = try fields.optionalSize("vocab_size") ?? defaultVocabulary ?? fields.size("vocab_size")
        // Qwen3 and Gemma default head_dim to a constant, not hidden / heads.
        let defaultHeadDim = ["qwen3": 128, "gemma2": 256, "gemma3_text": 256][family]
        if let hd = try fields.optionalSize("head_dim", max: 1 << 16) ?? defaultHeadDim {
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
        // Gemma ties by default; a multimodal Gemma 3 ties (or not) at the top level.
        tieWordEmbeddings = try top.bool("tie_word_embeddings") ?? fields.bool("tie_word_embeddings") ?? isGemma
        // Absent (Gemma 3's pt checkpoints leave it out of text_config): the family config class's default.
        let defaultPositions = ["mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768, "gemma2": 8192, "gemma3_text": 131_072,
                                "phi3": 4096][family] ?? 2048
        maxPositionEmbeddings = try fields.optionalSize("max_position_embeddings") ?? defaultPositions
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
        if isGemma {
            // Gemma reads `hidden_activation` (its configs may also carry an unused `hidden_act`).
            let act = try fields.string("hidden_activation") ?? "gelu_pytorch_tanh"
            guard let activation = MLPActivation(rawValue: act), activation == .geluTanh else {
                throw fields.fail("hidden_activation", "'\(act)' is not implemented (only gelu_pytorch_tanh, Gemma's GeGLU)")
            }
            mlpActivation = activation
        } else {
            let act = try fields.string("hidden_act") ?? "silu"
            guard act == "silu" || act == "swish" else {
                throw fields.fail("hidden_act", "'\(act)' is not implemented (only silu, the Llama-family SwiGLU)")
            }
        }
        if try fields.bool("mlp_bias") == true { throw fields.fail("mlp_bias", "biases on the MLP projections are not implemented") }
        switch family {
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
            // Elsewhere attention_bias also puts a bias on o_proj, which is not implemented.
            if try fields.bool("attention_bias") == true {
                throw fields.fail("attention_bias", "attention biases (on q, k, v and o_proj) are not implemented")
            }
            attentionBias = false
        }
        if let dropout = try fields.double("attention_dropout"), dropout != 0 {
            throw fields.fail("attention_dropout", "attention dropout is not implemented (expected 0, got \(dropout))")
        }
        if isGemma {
            if try fields.bool("use_bidirectional_attention") == true {
                throw fields.fail("use_bidirectional_attention", "bidirectional attention is not implemented (a causal language model is expected)")
            }
            normWeightOffset = 1
            sandwichNorms = true
            scalesEmbedding = true
            let scalar = try fields.double("query_pre_attn_scalar") ?? 256
            guard scalar.isFinite, scalar > 0 else { throw fields.fail("query_pre_attn_scalar", "must be a finite number > 0, got \(scalar)") }
            queryPreAttentionScalar = scalar
            let defaultCap: (attention: Double?, final: Double?) = family == "gemma2" ? (50, 30) : (nil, nil)
            func softcap(_ key: String, _ fallback: Double?) throws -> Float? {
                // Present and null means no capping; absent takes the family default.
                if let v = json[key], v.isNull { return nil }
                guard let c = try fields.double(key) ?? fallback else { return nil }
                guard c.isFinite, c > 0, Float(c).isFinite else { throw fields.fail(key, "must be a finite number > 0 or null, got \(c)") }
                return Float(c)
            }
            attentionSoftcap = try softcap("attn_logit_softcapping", defaultCap.attention)
            finalLogitSoftcap = try softcap("final_logit_softcapping", defaultCap.final)
        }
        qkNorm = family == "qwen3" || family == "gemma3_text"
        layerAttention = try Self.layerAttention(fields, family: family, layerCount: layerCount)
        slidingWindow = nil
        for case .sliding(let w) in layerAttention { slidingWindow = w; break }
        if let q = top.json["quantization_config"], !q.isNull {
            let method = q["quant_method"]?.string ?? ""
            guard method == "bitsandbytes" else {
                throw top.fail("quantization_config", "quant_method '\(method)' is not supported (only bitsandbytes 4-bit checkpoints load)")
            }
            if q["load_in_8bit"]?.bool == true || q["_load_in_8bit"]?.bool == true {
                throw top.fail("quantization_config", "8-bit bitsandbytes checkpoints are not supported (only 4-bit)")
            }
        }

        // transformers 5 writes `rope_parameters`; earlier versions `rope_theta` + `rope_scaling` (either may be null).
        // Gemma 3 keeps one set per layer type (`full_attention`, `sliding_attention`), or in older files
        // `rope_theta` (global) and `rope_local_base_freq` with `rope_scaling` for the global layers only.
        let ropeKey = json["rope_parameters"].map { !$0.isNull } == true ? "rope_parameters" : "rope_scaling"
        let rope = json[ropeKey].flatMap { $0.isNull ? nil : $0 }
        if let rope, rope.object == nil { throw fields.fail(ropeKey, "expected an object, got \(rope.serialized())") }
        // Phi-3's partial rotary: the rope object's partial_rotary_factor wins over the top-level one (transformers
        // copies the top-level value in only when the rope object has none). The other families refuse it.
        if isPhi3 {
            let ropeFields = ConfigFields(json: rope ?? .object(JSONObject()), file: file, prefix: fields.prefix + ropeKey + ".")
            let partialFields = try ropeFields.double("partial_rotary_factor") != nil ? ropeFields : fields
            let partial = try partialFields.double("partial_rotary_factor") ?? 1
            guard partial > 0, partial <= 1 else { throw partialFields.fail("partial_rotary_factor", "expected a number in (0, 1], got \(partial)") }
            rotaryDim = Int(Double(headDim) * partial)
            guard rotaryDim >= 2, rotaryDim % 2 == 0 else {
                throw partialFields.fail("partial_rotary_factor", "head_dim \(headDim) × \(partial) gives \(rotaryDim) rotated dimensions; expected an even number ≥ 2")
            }
        } else {
            if let partial = try fields.double("partial_rotary_factor"), partial != 1 {
                throw fields.fail("partial_rotary_factor", "partial rotary embeddings are implemented for phi3 only (expected 1, got \(partial))")
            }
            rotaryDim = headDim
        }
        let longrope = isPhi3 ? LongropeContext(fields: fields, rotaryPairs: rotaryDim / 2, maxPositionEmbeddings: maxPositionEmbeddings) : nil
        let perLayerType = family == "gemma3_text" && ropeKey == "rope_parameters"
            && (rope?["full_attention"] != nil || rope?["sliding_attention"] != nil)
        /// One RoPE object; its theta defaults to the top-level field `thetaKey` (or `defaultTheta`), and an
        /// invalid theta is named where it was read.
        func ropeParameters(_ object: JSONValue?, place: String, thetaKey: String = "rope_theta", defaultTheta: Double) throws -> RopeParameters {
            if let object, object.object == nil { throw fields.fail(place, "expected an object, got \(object.serialized())") }
            let ropeFields = ConfigFields(json: object ?? .object(JSONObject()), file: file, prefix: fields.prefix + place + ".")
            let theta: Double
            if let own = try ropeFields.double("rope_theta") {
                theta = own
                guard theta.isFinite, theta > 0 else { throw ropeFields.fail("rope_theta", "must be a finite number > 0, got \(theta)") }
            } else {
                theta = try fields.double(thetaKey) ?? defaultTheta
                guard theta.isFinite, theta > 0 else { throw fields.fail(thetaKey, "must be a finite number > 0, got \(theta)") }
            }
            return RopeParameters(theta: theta, scaling: try Self.ropeScaling(ropeFields, family: family, longrope: longrope))
        }
        if family == "gemma3_text" {
            let full, sliding: RopeParameters
            if perLayerType {
                full = try ropeParameters(rope?["full_attention"].flatMap { $0.isNull ? nil : $0 }, place: ropeKey + ".full_attention",
                                          defaultTheta: 1_000_000)
                sliding = try ropeParameters(rope?["sliding_attention"].flatMap { $0.isNull ? nil : $0 }, place: ropeKey + ".sliding_attention",
                                             thetaKey: "rope_local_base_freq", defaultTheta: 10_000)
            } else {
                full = try ropeParameters(rope, place: ropeKey, defaultTheta: 1_000_000)
                sliding = try ropeParameters(nil, place: "rope_local_base_freq", thetaKey: "rope_local_base_freq", defaultTheta: 10_000)
            }
            ropeTheta = full.theta
            ropeScaling = full.scaling
            slidingRope = sliding
        } else {
            let parameters = try ropeParameters(rope, place: ropeKey, defaultTheta: 10000)
            ropeTheta = parameters.theta
            ropeScaling = parameters.scaling
        }
        raw = top.json
    }

    /// The scaling in one RoPE object (`rope_parameters`, `rope_scaling` or one layer type's), validated.
    /// `longrope`: Phi-3's context for its longrope (the rotated pairs, the top-level fields); nil for the other
    /// families, which refuse longrope and partial rotary.
    static func ropeScaling(_ ropeFields: ConfigFields, family: String, longrope: LongropeContext? = nil) throws -> RopeScaling {
        if longrope == nil, let partial = try ropeFields.double("partial_rotary_factor"), partial != 1 {
            throw ropeFields.fail("partial_rotary_factor", "partial rotary embeddings are implemented for phi3 only (expected 1, got \(partial))")
        }
        var ropeType = try ropeFields.string("rope_type") ?? ropeFields.string("type") ?? "default"
        // Phi3Config renames the types early Phi-3 checkpoints wrote.
        if longrope != nil && (ropeType == "su" || ropeType == "yarn") { ropeType = "longrope" }
        let supportedTypes: [RopeScaling.Kind] = longrope != nil ? [.default, .longrope] : [.default, .linear, .llama3]
        guard let kind = RopeScaling.Kind(rawValue: ropeType), supportedTypes.contains(kind) else {
            throw ropeFields.fail("rope_type", "rope_type '\(ropeType)' is not supported for \(family) (supported: \(supportedTypes.map(\.rawValue).joined(separator: ", ")))")
        }
        if kind == .longrope, let longrope {
            return try Self.longrope(longrope.fields, ropeFields, rotaryPairs: longrope.rotaryPairs, maxPositionEmbeddings: longrope.maxPositionEmbeddings)
        }
        var scaling = RopeScaling(kind: kind)
        if kind != .default {
            func positive(_ key: String, _ fallback: Double) throws -> Double {
                let v = try ropeFields.double(key) ?? fallback
                guard v.isFinite, v > 0 else { throw ropeFields.fail(key, "must be a finite number > 0, got \(v)") }
                return v
            }
            scaling.factor = try positive("factor", 1)
            if kind == .llama3 {
                scaling.lowFrequencyFactor = try positive("low_freq_factor", 1)
                scaling.highFrequencyFactor = try positive("high_freq_factor", 4)
                guard scaling.highFrequencyFactor > scaling.lowFrequencyFactor else {
                    throw ropeFields.fail("high_freq_factor", "must be greater than low_freq_factor (\(scaling.highFrequencyFactor) ≤ \(scaling.lowFrequencyFactor))")
                }
                scaling.originalMaxPositionEmbeddings = try ropeFields.optionalSize("original_max_position_embeddings") ?? 8192
            }
        }
        return scaling
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

    /// Each layer's attention, as the family's transformers config decides it:
    /// - Mistral: `sliding_window` (default 4096, null for none) on every layer;
    /// - Qwen2/Qwen3: only with `use_sliding_window`, on the layers `layer_types` marks (default: from `max_window_layers` on);
    /// - Gemma 2: `layer_types` (default: even layers slide), window `sliding_window` (default 4096);
    /// - Gemma 3: `layer_types` (default: every `sliding_window_pattern`-th layer, default 6, is global, the rest slide);
    /// - Phi-3: `sliding_window` (default none) on every layer (transformers' Phi3Model masks with it whenever it is set).
    static func layerAttention(_ fields: ConfigFields, family: String, layerCount: Int) throws -> [AttentionKind] {
        let all = [AttentionKind](repeating: .full, count: layerCount)
        func window(default fallback: Int?) throws -> Int? {
            if let v = fields.json["sliding_window"], v.isNull { return nil }
            return try fields.optionalSize("sliding_window", max: Int.max >> 1) ?? fallback
        }
        /// `layer_types` as a list of "is sliding", nil when absent.
        func layerTypes() throws -> [Bool]? {
            guard let types = fields.json["layer_types"], !types.isNull else { return nil }
            guard let list = types.array, list.count == layerCount else {
                throw fields.fail("layer_types", "expected a list of \(layerCount) layer types (num_hidden_layers)")
            }
            return try list.map { t in
                switch t.string {
                case "full_attention"?: return false
                case "sliding_attention"?: return true
                default: throw fields.fail("layer_types", "unknown layer type \(t.serialized()) (expected full_attention or sliding_attention)")
                }
            }
        }
        func apply(_ sliding: [Bool], _ window: Int?) -> [AttentionKind] {
            guard let window else { return all }
            return sliding.map { $0 ? .sliding(window: window) : .full }
        }
        switch family {
        case "mistral", "phi3":
            guard let w = try window(default: family == "mistral" ? 4096 : nil) else { return all }
            return [AttentionKind](repeating: .sliding(window: w), count: layerCount)
        case "qwen2", "qwen3":
            let types = try layerTypes()
            guard try fields.bool("use_sliding_window") == true else { return all }
            let w = try window(default: 4096)
            if let types { return apply(types, w) }
            let v = fields.json["max_window_layers"].flatMap { $0.isNull ? nil : $0 } ?? .int(28)
            guard let first = v.int, first >= 0 else { throw fields.fail("max_window_layers", "expected a non-negative integer, got \(v.serialized())") }
            return apply((0..<layerCount).map { $0 >= first }, w)
        case "gemma2":
            let types = try layerTypes() ?? (0..<layerCount).map { ($0 + 1) % 2 != 0 }
            return apply(types, try window(default: 4096))
        case "gemma3_text":
            var types = try layerTypes()
            if types == nil {
                let key = fields.json["sliding_window_pattern"] != nil ? "sliding_window_pattern" : "_sliding_window_pattern"
                let pattern = try fields.optionalSize(key, max: 1 << 16) ?? 6
                types = (0..<layerCount).map { ($0 + 1) % pattern != 0 }
            }
            return apply(types!, try window(default: 4096))
        default:
            return all
        }
    }

    /// Whether any layer restricts attention to a window.
    public var hasSlidingLayers: Bool { slidingWindow != nil }

    /// The attention-logit scale: query_pre_attn_scalar^-½ (Gemma) or head_dim^-½.
    public var attentionScale: Float {
        Float(1 / (queryPreAttentionScalar ?? Double(headDim)).squareRoot())
    }

    /// The embedding multiplier √hidden in `dtype`, as transformers applies it: a float32 buffer cast to the
    /// weights' dtype (so 55.4256 becomes 55.5 for a bf16 model of hidden 3072). 1 when the family does not scale.
    public func embeddingScale(dtype: DType = .f32) -> Float {
        guard scalesEmbedding else { return 1 }
        let scale = Float(Double(hiddenSize).squareRoot())
        return dtype == .bf16 ? bf16ToFloat(floatToBF16(scale)) : scale
    }

    /// The RoPE a layer rotates by.
    public func rope(layer: Int) -> RopeParameters {
        if let slidingRope, case .sliding = layerAttention[layer] { return slidingRope }
        return RopeParameters(theta: ropeTheta, scaling: ropeScaling)
    }

    /// Throws when the CUDA kernels cannot compute this model. Every variation of the block is computed on the GPU,
    /// in training, evaluation and generation; the attention kernels are built for head dimensions 32, 64, 96, 128 and
    /// 256. `what` names the input.
    public func checkCUDASupport(what: String) throws {
        let dims = CUDAContext.attentionHeadDims
        guard dims.contains(headDim) else {
            throw UsageError("the CUDA kernels take head dimensions \(dims.map(String.init).joined(separator: ", ")), not \(headDim) "
                             + "(\(modelType), \(what)); use --device cpu")
        }
        guard rotaryDim % 2 == 0 else {
            throw UsageError("the CUDA kernels rotate pairs of dimensions: \(rotaryDim) rotated dimensions (\(modelType), \(what)); use --device cpu")
        }
    }

    public var qDim: Int { headCount * headDim }
    public var kvDim: Int { kvHeadCount * headDim }

    /// The inverse frequencies of rotary embeddings (of the full-attention layers), one per rotated pair
    /// (`rotaryDim / 2`), with llama3/linear/longrope scaling applied as transformers does (`long`: longrope's long factors).
    public func ropeInverseFrequencies(long: Bool = false) -> [Double] {
        ropeInverseFrequencies(RopeParameters(theta: ropeTheta, scaling: ropeScaling), long: long)
    }

    /// The inverse frequencies of `rope`, with its scaling applied as transformers does.
    public func ropeInverseFrequencies(_ rope: RopeParameters, long: Bool = false) -> [Double] {
        var inv = (0..<(rotaryDim / 2)).map { 1.0 / pow(rope.theta, Double(2 * $0) / Double(rotaryDim)) }
        let s = rope.scaling
        switch s.kind {
        case .default: break
        case .linear: inv = inv.map { $0 / s.factor }
        case .longrope: inv = zip(inv, long ? s.longFactors : s.shortFactors).map { $0 / $1 }
        case .llama3:
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
        let norms = hiddenSize * (sandwichNorms ? 4 : 2) + (qkNorm ? 2 * headDim : 0)
        let perLayer = attention + mlp + norms
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
