// The architectures benchmarks run with random weights: the shapes of real models, no checkpoint needed.

public enum Architecture: String, CaseIterable, Sendable {
    case smollm2_135m = "smollm2-135m"
    case llama3_2_1b = "llama-3.2-1b"
    case llama2_7b = "llama-2-7b"
    case llama3_1_8b = "llama-3.1-8b"
    /// The size DESIGN.md wants trained in 48 GB.
    case llama3_1_70b = "llama-3.1-70b"
    /// Phi-4-mini (phi3: fused qkv_proj / gate_up_proj, 96 of 128 head dimensions rotated, longrope); the CPU only for now.
    case phi4_mini = "phi-4-mini"
    /// Qwen3-8B (q/k norms, head_dim 128 beside hidden 4096, untied).
    case qwen3_8b = "qwen3-8b"
    /// Gemma-2-9B (sandwich norms, GeGLU, soft-capping, every other layer sliding over 4096, head_dim 256, vocabulary 256,000).
    case gemma2_9b = "gemma-2-9b"
    /// Gemma-3-12B's text model (q/k norms, 5 sliding layers of 1024 to 1 global, local/global RoPE, vocabulary 262,208).
    case gemma3_12b = "gemma-3-12b"

    /// config.json fields of the real model.
    public var config: DecoderConfig {
        let fields: [(String, JSONValue)]
        switch self {
        case .smollm2_135m:
            fields = [("hidden_size", .int(576)), ("intermediate_size", .int(1536)), ("num_hidden_layers", .int(30)),
                      ("num_attention_heads", .int(9)), ("num_key_value_heads", .int(3)), ("vocab_size", .int(49152)),
                      ("rope_theta", .double(100000)), ("tie_word_embeddings", .bool(true)), ("rms_norm_eps", .double(1e-5)),
                      ("max_position_embeddings", .int(8192))]
        case .llama3_2_1b:
            fields = [("hidden_size", .int(2048)), ("intermediate_size", .int(8192)), ("num_hidden_layers", .int(16)),
                      ("num_attention_heads", .int(32)), ("num_key_value_heads", .int(8)), ("vocab_size", .int(128256)),
                      ("tie_word_embeddings", .bool(true)), ("rms_norm_eps", .double(1e-5)), ("max_position_embeddings", .int(131072)),
                      ("rope_parameters", llama3RoPE(factor: 32))]
        case .llama2_7b:
            fields = [("hidden_size", .int(4096)), ("intermediate_size", .int(11008)), ("num_hidden_layers", .int(32)),
                      ("num_attention_heads", .int(32)), ("num_key_value_heads", .int(32)), ("vocab_size", .int(32000)),
                      ("tie_word_embeddings", .bool(false)), ("rms_norm_eps", .double(1e-5)), ("max_position_embeddings", .int(4096))]
        case .llama3_1_8b:
            fields = [("hidden_size", .int(4096)), ("intermediate_size", .int(14336)), ("num_hidden_layers", .int(32)),
                      ("num_attention_heads", .int(32)), ("num_key_value_heads", .int(8)), ("vocab_size", .int(128256)),
                      ("tie_word_embeddings", .bool(false)), ("rms_norm_eps", .double(1e-5)), ("max_position_embeddings", .int(131072)),
                      ("rope_parameters", llama3RoPE(factor: 8))]
        case .llama3_1_70b:
            fields = [("hidden_size", .int(8192)), ("intermediate_size", .int(28672)), ("num_hidden_layers", .int(80)),
                      ("num_attention_heads", .int(64)), ("num_key_value_heads", .int(8)), ("vocab_size", .int(128256)),
                      ("tie_word_embeddings", .bool(false)), ("rms_norm_eps", .double(1e-5)), ("max_position_embeddings", .int(131072)),
                      ("rope_parameters", llama3RoPE(factor: 8))]
        case .phi4_mini:
            // microsoft/Phi-4-mini-instruct's config.json.
            fields = [("hidden_size", .int(3072)), ("intermediate_size", .int(8192)), ("num_hidden_layers", .int(32)),
                      ("num_attention_heads", .int(24)), ("num_key_value_heads", .int(8)), ("vocab_size", .int(200064)),
                      ("tie_word_embeddings", .bool(true)), ("rms_norm_eps", .double(1e-5)), ("max_position_embeddings", .int(131072)),
                      ("original_max_position_embeddings", .int(4096)), ("partial_rotary_factor", .double(0.75)),
                      ("sliding_window", .int(262144)), ("resid_pdrop", .double(0)), ("rope_theta", .double(10000)),
                      ("rope_scaling", .object(JSONObject([("type", .string("longrope")),
                                                           ("short_factor", .array(Array(repeating: .double(1), count: 48))),
                                                           ("long_factor", .array(phi4MiniLongFactors.map { .double($0) }))])))]
        case .qwen3_8b:
            // Qwen/Qwen3-8B's config.json.
            fields = [("hidden_size", .int(4096)), ("intermediate_size", .int(12288)), ("num_hidden_layers", .int(36)),
                      ("num_attention_heads", .int(32)), ("num_key_value_heads", .int(8)), ("head_dim", .int(128)),
                      ("vocab_size", .int(151936)), ("tie_word_embeddings", .bool(false)), ("rms_norm_eps", .double(1e-6)),
                      ("max_position_embeddings", .int(40960)), ("rope_theta", .double(1_000_000)), ("rope_scaling", .null),
                      ("attention_bias", .bool(false)), ("sliding_window", .null), ("use_sliding_window", .bool(false)),
                      ("max_window_layers", .int(36)), ("bos_token_id", .int(151643)), ("eos_token_id", .int(151645))]
        case .gemma2_9b:
            // google/gemma-2-9b's config.json (no layer_types: Gemma2Config slides the even layers 0, 2, 4, ...).
            fields = [("hidden_size", .int(3584)), ("intermediate_size", .int(14336)), ("num_hidden_layers", .int(42)),
                      ("num_attention_heads", .int(16)), ("num_key_value_heads", .int(8)), ("head_dim", .int(256)),
                      ("vocab_size", .int(256000)), ("rms_norm_eps", .double(1e-6)), ("max_position_embeddings", .int(8192)),
                      ("rope_theta", .double(10000)), ("query_pre_attn_scalar", .int(256)), ("sliding_window", .int(4096)),
                      ("attn_logit_softcapping", .double(50)), ("final_logit_softcapping", .double(30)),
                      ("hidden_activation", .string("gelu_pytorch_tanh")), ("attention_bias", .bool(false)),
                      ("bos_token_id", .int(2)), ("eos_token_id", .int(1)), ("pad_token_id", .int(0))]
        case .gemma3_12b:
            // google/gemma-3-12b-pt's text_config, which lists only these; Gemma3TextConfig's defaults give the rest
            // (vocabulary 262,208, head_dim 256, query_pre_attn_scalar 256, global base 1e6, local base 10,000,
            // every 6th layer global, eps 1e-6, tied, no soft-capping), and the test checks each of them.
            fields = [("hidden_size", .int(3840)), ("intermediate_size", .int(15360)), ("num_hidden_layers", .int(48)),
                      ("num_attention_heads", .int(16)), ("num_key_value_heads", .int(8)), ("sliding_window", .int(1024)),
                      ("rope_scaling", .object(JSONObject([("factor", .double(8)), ("rope_type", .string("linear"))])))]
        }
        // The fields are fixed above, so parsing them cannot fail.
        return try! DecoderConfig(json: .object(JSONObject([("model_type", .string(modelType))] + fields)), file: "architecture \(rawValue)")
    }

    /// The config's model_type.
    public var modelType: String {
        switch self {
        case .phi4_mini: return "phi3"
        case .qwen3_8b: return "qwen3"
        case .gemma2_9b: return "gemma2"
        case .gemma3_12b: return "gemma3_text"
        default: return "llama"
        }
    }
}

/// Phi-4-mini's longrope long factors, one per rotated pair (48 = 96 rotated dimensions / 2).
private let phi4MiniLongFactors: [Double] = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898, 2.735880826,
    3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894,
    8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807,
    22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97,
    33.28, 33.49, 33.5, 44.16, 47.77,
]

/// Llama 3's RoPE scaling (theta 500000, low/high frequency factors 1 and 4 around 8192 original positions).
private func llama3RoPE(factor: Double) -> JSONValue {
    .object(JSONObject([("rope_type", .string("llama3")), ("rope_theta", .double(500000)), ("factor", .double(factor)),
                        ("low_freq_factor", .double(1)), ("high_freq_factor", .double(4)),
                        ("original_max_position_embeddings", .int(8192))]))
}

extension DecoderModel {
    /// A model of `config`'s shape with random weights, for benchmarks and GPU checks: linear weights roughly normal
    /// with std `weightStd`, the embedding (and an untied head) with `embeddingStd` (default `weightStd`), every norm
    /// the family has (sandwich and q/k norms included) multiplying by 1 ± `normSpread` (uniform; Gemma's stored w of
    /// x·(1 + w) is then ±spread around 0). Values pass through `round` (e.g. to bf16, so that a GPU holding them in
    /// 16 bits computes the same model).
    public static func random(config c: DecoderConfig, seed: UInt64 = 0, weightStd: Float = 0.02, embeddingStd: Float? = nil,
                              normSpread: Float = 0, round: (Float) -> Float = { $0 }) -> DecoderModel {
        var rng = SeededGenerator(seed: seed)
        func matrix(_ rows: Int, _ columns: Int, std: Float = weightStd) -> Matrix {
            let m = Matrix(rows: rows, columns: columns)
            // Sum of three uniforms: cheap, roughly normal (its std is 0.5 before scaling).
            for i in 0..<m.count { m.pointer[i] = round((rng.nextFloat() + rng.nextFloat() + rng.nextFloat() - 1.5) * 2 * std) }
            return m
        }
        func norm(_ count: Int) -> [Float] {
            (0..<count).map { _ in round(1 - c.normWeightOffset + (normSpread == 0 ? 0 : (rng.nextFloat() * 2 - 1) * normSpread)) }
        }
        func linear(_ name: String, _ out: Int, _ inFeatures: Int) -> Linear { Linear(name: name, weight: FrozenWeight(dense: matrix(out, inFeatures))) }
        let blocks = (0..<c.layerCount).map { l -> DecoderBlock in
            let p = c.modulePrefix + "layers.\(l)."
            let h = c.hiddenSize
            if c.fusedProjections {
                return DecoderBlock(inputNorm: norm(h), mlpInputNorm: norm(h),
                                    qkv: linear(p + "self_attn.qkv_proj", c.qDim + 2 * c.kvDim, h),
                                    o: linear(p + "self_attn.o_proj", h, c.qDim),
                                    gateUp: linear(p + "mlp.gate_up_proj", 2 * c.intermediateSize, h),
                                    down: linear(p + "mlp.down_proj", h, c.intermediateSize))
            }
            return DecoderBlock(inputNorm: norm(h), mlpInputNorm: norm(h),
                                attentionOutputNorm: c.sandwichNorms ? norm(h) : nil, mlpOutputNorm: c.sandwichNorms ? norm(h) : nil,
                                qNorm: c.qkNorm ? norm(c.headDim) : nil, kNorm: c.qkNorm ? norm(c.headDim) : nil,
                                q: linear(p + "self_attn.q_proj", c.qDim, h), k: linear(p + "self_attn.k_proj", c.kvDim, h),
                                v: linear(p + "self_attn.v_proj", c.kvDim, h), o: linear(p + "self_attn.o_proj", h, c.qDim),
                                gate: linear(p + "mlp.gate_proj", c.intermediateSize, h), up: linear(p + "mlp.up_proj", c.intermediateSize, h),
                                down: linear(p + "mlp.down_proj", h, c.intermediateSize))
        }
        let embedding = matrix(c.vocabularySize, c.hiddenSize, std: embeddingStd ?? weightStd)
        return DecoderModel(config: c, embedding: embedding, blocks: blocks, finalNorm: norm(c.hiddenSize),
                            head: c.tieWordEmbeddings ? embedding : matrix(c.vocabularySize, c.hiddenSize, std: embeddingStd ?? weightStd))
    }
}
