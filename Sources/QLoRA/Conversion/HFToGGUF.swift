// Export of a model (with its LoRA adapter merged) into one GGUF file that llama.cpp and Ollama run:
// the inverse of GGUFToHF.swift, written as llama.cpp's `convert_hf_to_gguf.py` writes the same model.
//
// Tensor names (N = layer):                        HF                →  GGUF
//   model.embed_tokens.weight                                         → token_embd.weight
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight                    → blk.N.attn_{q,k,v,output}.weight
//   model.layers.N.self_attn.{q,k,v}_proj.bias (qwen2)                → blk.N.attn_{q,k,v}.bias
//   model.layers.N.mlp.{gate,up,down}_proj.weight                     → blk.N.ffn_{gate,up,down}.weight
//   model.layers.N.input_layernorm.weight                             → blk.N.attn_norm.weight
//   model.layers.N.post_attention_layernorm.weight                    → blk.N.ffn_norm.weight
//   model.norm.weight                                                 → output_norm.weight
//   lm_head.weight (absent when tied)                                 → output.weight
//   Llama 3 rope scaling                                              → rope_freqs.weight (headDim/2 divisors)
// A row-major HF matrix [out, in] is the GGUF tensor of dims [ne0 = in, ne1 = out].
//
// The llama architecture (llama, and mistral, which llama.cpp runs as llama) stores q_proj and k_proj (weights
// and biases) with their rows permuted to ggml's adjacent-pair rotary layout (see GGUFToHF.swift's header);
// qwen2 is run by llama.cpp with the NEOX (rotate-half) rope and keeps HF's order.
//
// Tensor types, as llama.cpp's tools choose them (`--type`, see GGUFExportType):
//   - 1-D tensors and norms: F32 (the converter's rule).
//   - f32, f16, bf16, q8_0: every other weight in that type, token_embd and output included (convert_hf_to_gguf.py).
//   - q4_0, q4_k_m, q5_k_m, q6_k: llama-quantize's choice without an importance matrix (llama_tensor_get_type in
//     llama.cpp's src/llama-quant.cpp, for the llama and qwen2 architectures, no experts). The bulk is Q4_0, Q4_K,
//     Q5_K or Q6_K; output.weight (token_embd.weight when the embeddings are tied) is Q6_K (Q8_0 when ne0 is not a
//     multiple of the bulk's block size); for q4_k_m and q5_k_m, attn_v and ffn_down of layer i of n are Q6_K when
//     i < n/8, i ≥ 7n/8 or (i − n/8) % 3 == 2 ("use_more_bits"), and a 70B-class model (80 layers; llama with
//     grouped-query attention) has its other attn_v in Q5_K instead of Q4_K.
//   - then a matrix whose ne0 is not a multiple of the chosen type's block falls back as llama-quantize does: Q4_K to
//     Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and (ne0 not a multiple of 32) to F16, which the converter also does.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// The `--type` of a GGUF export: of the merged model (`--format gguf`, every case) or of a LoRA adapter alone
/// (`--format gguf-lora`: f32, f16, bf16, q8_0).
public enum GGUFExportType: String, CaseIterable, Sendable {
    case f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k

    /// The types a LoRA GGUF may use (llama.cpp's convert_lora_to_gguf.py's).
    public static let adapterTypes: [GGUFExportType] = [.f32, .f16, .bf16, .q8_0]

    /// Parses a `--type` for the model export, or for the adapter export when `adapter` is true.
    public static func parse(_ name: String, adapter: Bool = false) throws -> GGUFExportType {
        let allowed = adapter ? adapterTypes : allCases
        guard let t = GGUFExportType(rawValue: name.lowercased()), allowed.contains(t) else {
            let format = adapter ? "--format gguf-lora" : "--format gguf"
            throw UsageError("--type: '\(name)' is not a type of \(format) (choose from \(allowed.map(\.rawValue).joined(separator: ", ")))")
        }
        return t
    }

    /// llama.cpp's `general.file_type` (enum llama_ftype).
    public var fileType: UInt32 {
        switch self {
        case .f32: return 0
        case .f16: return 1
        case .q4_0: return 2
        case .q8_0: return 7
        case .q4_k_m: return 15
        case .q5_k_m: return 17
        case .q6_k: return 18
        case .bf16: return 32
        }
    }

    /// The type of the bulk of the weights (llama.cpp's `llama_ftype_get_default_type`).
    public var weightType: GGMLType {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .q8_0: return .q8_0
        case .q4_0: return .q4_0
        case .q4_k_m: return .q4_K
        case .q5_k_m: return .q5_K
        case .q6_k: return .q6_K
        }
    }
}

/// What llama-quantize's choice of a tensor's type reads of the model besides the tensor's name and shape.
public struct GGUFTypeContext: Sendable {
    /// Layers (llama.cpp's n_attention_wv and n_ffn_down: one attn_v and one ffn_down per layer here).
    public var layerCount: Int
    /// No output.weight: token_embd.weight is also the output matrix and is typed as one.
    public var tiedEmbeddings: Bool
    /// llama.cpp's LLM_TYPE_70B: 80 layers, and for llama fewer key/value heads than query heads.
    public var is70B: Bool

    public init(layerCount: Int, tiedEmbeddings: Bool, is70B: Bool = false) {
        self.layerCount = layerCount
        self.tiedEmbeddings = tiedEmbeddings
        self.is70B = is70B
    }

    public init(config: DecoderConfig, architecture: String, tiedEmbeddings: Bool) {
        let is70B = config.layerCount == 80 && (architecture == "qwen2" || config.kvHeadCount != config.headCount)
        self.init(layerCount: config.layerCount, tiedEmbeddings: tiedEmbeddings, is70B: is70B)
    }
}

/// What an export wrote, for the command to report.
public struct GGUFExportReport: Sendable {
    public var architecture: String
    public var tensorCount: Int
    public var mergedLayers: Int
    /// How many tensors of each type ("F32": 5, "Q8_0": 14).
    public var typeCounts: [String: Int]
    public var vocabularySize: Int
    public var tokenizerModel: String
}

public enum GGUFExporter {
    /// llama.cpp's architecture for a config's `model_type`.
    public static func architecture(_ config: DecoderConfig) throws -> String {
        switch config.modelType {
        case "llama", "mistral": return "llama"
        case "qwen2": return "qwen2"
        default: throw UsageError("GGUF export: model_type '\(config.modelType)' has no llama.cpp architecture we write (supported: llama, mistral, qwen2)")
        }
    }

    /// The ggml type llama.cpp gives a tensor of `dimensions` (ggml order) in an export of `type` (see the header).
    public static func tensorType(name: String, dimensions: [Int], type: GGUFExportType, context: GGUFTypeContext) -> GGMLType {
        if dimensions.count < 2 || name.hasSuffix("_norm.weight") || !name.hasSuffix(".weight") || name == "rope_freqs.weight" { return .f32 }
        let bulk = type.weightType
        guard bulk.blockSize > 1 else { return bulk }  // f32, f16, bf16: the converter's one type
        var chosen = bulk
        let mixture = type == .q4_k_m || type == .q5_k_m
        if name == "output.weight" || (context.tiedEmbeddings && name == "token_embd.weight") {
            chosen = bulk == .q8_0 ? .q8_0 : .q6_K
        } else if name.hasSuffix(".attn_v.weight") {
            if mixture, let layer = layerIndex(name), useMoreBits(layer, context.layerCount) { chosen = .q6_K }
            if context.is70B && chosen == .q4_K { chosen = .q5_K }
        } else if name.hasSuffix(".ffn_down.weight") {
            if mixture, let layer = layerIndex(name), useMoreBits(layer, context.layerCount) { chosen = .q6_K }
        }
        // llama-quantize's fallback for rows its type cannot split into blocks, then F16.
        if dimensions[0] % chosen.blockSize != 0 {
            switch chosen {
            case .q4_K: chosen = .q5_0
            case .q5_K: chosen = .q5_1
            case .q6_K: chosen = .q8_0
            default: break
            }
            if dimensions[0] % chosen.blockSize != 0 { chosen = .f16 }
        }
        return chosen
    }

    /// llama-quantize's `use_more_bits`: the first and last eighth of the layers and every third one between.
    static func useMoreBits(_ layer: Int, _ layers: Int) -> Bool {
        layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
    }

    /// N of a "blk.N." tensor name.
    static func layerIndex(_ name: String) -> Int? {
        guard name.hasPrefix("blk.") else { return nil }
        return Int(name.dropFirst(4).prefix { $0 != "." })
    }

    /// Writes `model` (with its adapters merged: W + scale·B·A in fp32, from the weights the model holds) to `path` as
    /// a GGUF file of `type`. `directory` is the model folder: config.json, tokenizer.json, tokenizer_config.json,
    /// chat_template.jinja. Every tensor is merged, converted and written one at a time into a temporary file beside
    /// `path`, which is renamed over `path` only when complete.
    @discardableResult
    public static func export(model: DecoderModel, directory: String, type: GGUFExportType, to path: String,
                              name: String? = nil, log: (String) -> Void = { _ in }) throws -> GGUFExportReport {
        let config = model.config
        let arch = try architecture(config)
        let tokenizer = try GGUFTokenizerMetadata(directory: directory, vocabularySize: config.vocabularySize, log: log)
        let tied = model.head === model.embedding
        let permute = arch == "llama"

        // The tensors in the order llama.cpp writes them for a llama-family model, each with a producer of its values.
        var plan: [(name: String, dimensions: [Int], values: () throws -> [Float])] = []
        var merged = 0
        if let factors = try ropeFrequencyFactors(config) {
            plan.append(("rope_freqs.weight", [factors.count], { factors }))
        }
        let embedding = model.embedding
        plan.append(("token_embd.weight", [embedding.columns, embedding.rows], { Array(embedding.storage) }))
        for (l, block) in model.blocks.enumerated() {
            let p = "blk.\(l)."
            let inputNorm = block.inputNorm, postNorm = block.mlpInputNorm
            plan.append((p + "attn_norm.weight", [inputNorm.count], { inputNorm }))
            for (layer, short) in zip(block.linears, linearNames) {
                if layer.lora != nil { merged += 1 }
                let heads = short == "attn_q" ? config.headCount : short == "attn_k" ? config.kvHeadCount : 0
                let rows = layer.outFeatures, columns = layer.inFeatures
                plan.append((p + short + ".weight", [columns, rows], {
                    let w = AdapterMerge.mergedWeight(layer)
                    guard permute && heads > 0 else { return w }
                    return GGUFConverter.permuteRotaryRows(w, heads: heads, headDim: config.headDim, columns: columns)
                }))
                if let bias = layer.bias {
                    plan.append((p + short + ".bias", [bias.count], {
                        guard permute && heads > 0 else { return bias }
                        return GGUFConverter.permuteRotaryRows(bias, heads: heads, headDim: config.headDim, columns: 1)
                    }))
                }
                if short == "attn_output" {
                    plan.append((p + "ffn_norm.weight", [postNorm.count], { postNorm }))
                }
            }
        }
        let finalNorm = model.finalNorm
        plan.append(("output_norm.weight", [finalNorm.count], { finalNorm }))
        if !tied {
            let head = model.head
            plan.append(("output.weight", [head.columns, head.rows], { Array(head.storage) }))
        }

        let context = GGUFTypeContext(config: config, architecture: arch, tiedEmbeddings: tied)
        let counts = try writeModel(tensors: plan.map { ($0.name, $0.dimensions) }, type: type, context: context, metadata: { parameters in
            try modelMetadata(config: config, architecture: arch, type: type, name: name ?? lastPathComponent(directory),
                              parameterCount: parameters) + tokenizer.entries
        }, to: path, log: log, values: { try plan[$0].values() })
        return GGUFExportReport(architecture: arch, tensorCount: plan.count, mergedLayers: merged, typeCounts: counts,
                                vocabularySize: config.vocabularySize, tokenizerModel: tokenizer.model)
    }

    /// Writes `tensors` (GGUF names, ggml dimensions) into the GGUF file `path`, each typed as llama.cpp types it in an
    /// export of `type` and its values made by `values(i)` only when it is written (one tensor in memory at a time),
    /// after `metadata(parameterCount)`. The one writing step of every model export (GGUFExporter's from a model,
    /// GGUFFamilyExporter's from a folder); returns how many tensors of each ggml type were written.
    static func writeModel(tensors: [(name: String, dimensions: [Int])], type: GGUFExportType, context: GGUFTypeContext,
                           metadata: (_ parameterCount: Int) throws -> [(key: String, value: GGUFValue)], to path: String,
                           log: (String) -> Void, values: (Int) throws -> [Float]) throws -> [String: Int] {
        let types = tensors.map { tensorType(name: $0.name, dimensions: $0.dimensions, type: type, context: context) }
        let keys = try metadata(tensors.reduce(0) { $0 + $1.dimensions.reduce(1, *) })
        var counts: [String: Int] = [:]
        for t in types { counts[t.name, default: 0] += 1 }
        log("writing \(tensors.count) tensors (\(counts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", "))) to \(path)")
        try GGUFWriter.write(metadata: keys, tensors: zip(tensors, types).map { ($0.name, $1, $0.dimensions) }, to: path) { i in
            let tensor = try values(i)
            let count = tensors[i].dimensions.reduce(1, *)
            guard tensor.count == count else {
                throw UsageError("GGUF export: tensor '\(tensors[i].name)' has \(tensor.count) values, expected \(count)")
            }
            return types[i].quantize(tensor)
        }
        return counts
    }

    // MARK: - Model metadata

    /// The `general.*` and `<arch>.*` keys, in the order and with the value types llama.cpp's converter writes.
    static func modelMetadata(config c: DecoderConfig, architecture arch: String, type: GGUFExportType, name: String,
                              parameterCount: Int) throws -> [(key: String, value: GGUFValue)] {
        var m: [(key: String, value: GGUFValue)] = []
        func u32(_ key: String, _ v: Int) { m.append((key, .uint32(UInt32(v)))) }
        m.append(("general.architecture", .string(arch)))
        m.append(("general.type", .string("model")))
        m.append(("general.name", .string(name)))
        m.append(("general.size_label", .string(sizeLabel(parameterCount))))
        u32("\(arch).block_count", c.layerCount)
        u32("\(arch).context_length", c.maxPositionEmbeddings)
        u32("\(arch).embedding_length", c.hiddenSize)
        u32("\(arch).feed_forward_length", c.intermediateSize)
        u32("\(arch).attention.head_count", c.headCount)
        u32("\(arch).attention.head_count_kv", c.kvHeadCount)
        if c.ropeScaling.kind == .linear {
            m.append(("\(arch).rope.scaling.type", .string("linear")))
            m.append(("\(arch).rope.scaling.factor", .float32(Float(c.ropeScaling.factor))))
        }
        m.append(("\(arch).rope.freq_base", .float32(Float(c.ropeTheta))))
        m.append(("\(arch).attention.layer_norm_rms_epsilon", .float32(c.rmsNormEps)))
        if c.raw["head_dim"]?.int != nil {
            u32("\(arch).attention.key_length", c.headDim)
            u32("\(arch).attention.value_length", c.headDim)
        } else if c.headDim * c.headCount != c.hiddenSize {
            throw UsageError("GGUF export: head size \(c.headDim) × \(c.headCount) heads ≠ hidden size \(c.hiddenSize) and config.json has no head_dim")
        }
        u32("general.file_type", Int(type.fileType))
        if arch == "llama" {
            u32("\(arch).vocab_size", c.vocabularySize)
            u32("\(arch).rope.dimension_count", c.headDim)
        }
        u32("general.quantization_version", 2)
        return m
    }

    /// Llama 3 rope scaling as the per-frequency divisors llama.cpp reads from `rope_freqs.weight`; nil for other ropes.
    static func ropeFrequencyFactors(_ c: DecoderConfig) throws -> [Float]? {
        guard c.ropeScaling.kind == .llama3 else { return nil }
        let s = c.ropeScaling
        let scaling = LlamaRopeScaling(factor: s.factor, lowFreqFactor: s.lowFrequencyFactor, highFreqFactor: s.highFrequencyFactor,
                                       originalContext: s.originalMaxPositionEmbeddings)
        return scaling.divisors(theta: c.ropeTheta, headDim: c.headDim).map { Float($0) }
    }

    /// gguf-py's size label: the parameter count in K, M, B or T with at least two significant digits ("625K", "1.2B").
    static func sizeLabel(_ count: Int) -> String {
        let n = Double(count)
        let (scaled, suffix): (Double, String) = n > 1e12 ? (n * 1e-12, "T") : n > 1e9 ? (n * 1e-9, "B") : n > 1e6 ? (n * 1e-6, "M") : (n * 1e-3, "K")
        let integerDigits = String(Int(scaled.rounded(.toNearestOrEven))).drop { $0 == "0" }.count
        return String(cFormat: "%.\(max(2 - integerDigits, 0))f", scaled) + suffix
    }

    public static func lastPathComponent(_ path: String) -> String {
        let trimmed = path.hasSuffix("/") ? String(path.dropLast()) : path
        return trimmed.split(separator: "/").last.map(String.init) ?? trimmed
    }

    // MARK: - Refusing to overwrite an input

    /// Throws when `out` names one of `inputs` (files or folders, or a file inside an input folder), following links.
    public static func refuseOverwriting(_ out: String, inputs: [String], option: String = "--out") throws {
        guard let target = realPath(out) else { return }  // does not exist yet: cannot be an input
        for input in inputs {
            guard let resolved = realPath(input) else { continue }
            var candidates = [resolved]
            if FileSystem.isDirectory(resolved) {
                candidates += ((try? FileSystem.listDirectory(resolved)) ?? []).compactMap { realPath(resolved + "/" + $0) }
            }
            if candidates.contains(target) {
                throw UsageError("\(option) \(out) is one of the inputs (\(input)); choose another file name")
            }
        }
    }

    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }
}

// MARK: - Tokenizer metadata

/// The `tokenizer.*` keys of a model folder, as llama.cpp's converter derives them from tokenizer.json,
/// tokenizer_config.json, chat_template.jinja and config.json:
///   tokenizer.ggml.model        "gpt2" for byte-level BPE, "llama" for SentencePiece-style BPE with byte fallback
///   tokenizer.ggml.pre          the pre-tokenizer llama.cpp must use (gpt2 only; "default" for llama)
///   tokenizer.ggml.tokens       one string per id up to config.json's vocab_size; ids no token has are "[PAD<id>]"
///   tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control (special added tokens), 4 user-defined, 5 unused, 6 byte
///   tokenizer.ggml.scores       (llama) a piece's score: minus the rank of the first merge that makes it, so llama.cpp's
///                               highest-score-first merging follows tokenizer.json's merge ranks
///   tokenizer.ggml.merges       (gpt2) "left right", spaces inside a side written as U+0120 as the converter does
///   tokenizer.ggml.{bos,eos,unknown,seperator,padding,cls,mask}_token_id
///   tokenizer.ggml.add_{bos,sep,eos}_token   from the post-processor, else tokenizer_config.json
///   tokenizer.chat_template     tokenizer_config.json's chat_template, else chat_template.jinja
struct GGUFTokenizerMetadata {
    var entries: [(key: String, value: GGUFValue)] = []
    var model: String = ""

    enum TokenType: Int32 { case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6 }

    init(directory: String, vocabularySize: Int, log: (String) -> Void) throws {
        let path = directory + "/tokenizer.json"
        guard FileSystem.exists(path) else {
            throw UsageError("GGUF export: \(directory) has no tokenizer.json; llama.cpp needs the vocabulary inside the GGUF (copy the base model's tokenizer files into the folder)")
        }
        func parse(_ file: String) throws -> JSONValue {
            do { return try JSONValue.parse(bytes: try FileSystem.readFile(file)) } catch let e as JSONParseError {
                throw FileFormatError(file: file, place: "JSON", e.description)
            }
        }
        let json = try parse(path)
        let configPath = directory + "/tokenizer_config.json"
        let tokenizerConfig = FileSystem.exists(configPath) ? try parse(configPath) : nil
        let modelConfig = FileSystem.exists(directory + "/config.json") ? try parse(directory + "/config.json") : nil
        func fail(_ place: String, _ message: String) -> FileFormatError { FileFormatError(file: path, place: place, message) }

        guard let bpe = json["model"], bpe["type"]?.string == "BPE", let vocab = bpe["vocab"]?.object else {
            throw fail("model", "expected a BPE model with a vocab (the tokenizers llama.cpp reads as gpt2 or llama)")
        }
        let byteFallback = bpe["byte_fallback"]?.bool ?? false
        let sentencePiece = byteFallback && json["decoder"]?["type"]?.string == "Sequence"
        model = sentencePiece ? "llama" : "gpt2"

        // id → (token, type), from the vocabulary and then the added tokens (which win).
        var tokens = [String?](repeating: nil, count: vocabularySize)
        var types = [TokenType](repeating: .unused, count: vocabularySize)
        for (token, value) in vocab {
            guard let id = value.int, id >= 0 else { throw fail("model.vocab['\(token)']", "expected a non-negative id") }
            guard id < vocabularySize else {
                throw fail("model.vocab['\(token)']", "id \(id) is not below config.json's vocab_size \(vocabularySize)")
            }
            tokens[id] = token
            types[id] = .normal
            if sentencePiece, token.utf8.count == 6, token.hasPrefix("<0x"), token.hasSuffix(">"),
               UInt8(token.dropFirst(3).dropLast(), radix: 16) != nil {
                types[id] = .byte
            }
        }
        for (i, added) in (json["added_tokens"]?.array ?? []).enumerated() {
            guard let id = added["id"]?.int, id >= 0, var content = added["content"]?.string else {
                throw fail("added_tokens[\(i)]", "expected an id and a content")
            }
            guard id < vocabularySize else { throw fail("added_tokens[\(i)]", "id \(id) is not below config.json's vocab_size \(vocabularySize)") }
            if added["special"]?.bool == true || Self.looksSpecial(content) {
                types[id] = .control
            } else {
                content = content.replacing("\u{2581}", with: " ")
                types[id] = .userDefined
            }
            tokens[id] = content
        }

        if sentencePiece, let unk = bpe["unk_token"]?.string, let id = vocab[unk]?.int, id < vocabularySize { types[id] = .unknown }

        let names = tokens.enumerated().map { $0.element ?? "[PAD\($0.offset)]" }
        entries.append(("tokenizer.ggml.model", .string(model)))
        entries.append(("tokenizer.ggml.pre", .string(sentencePiece ? "default" : Self.preTokenizerName(json["pre_tokenizer"], log: log))))
        entries.append(("tokenizer.ggml.tokens", .array(.string, names.map { .string($0) })))
        let merges = try Self.merges(bpe, file: path)
        if sentencePiece {
            var rank: [String: Int] = [:]
            for (i, pair) in merges.enumerated() where rank[pair.0 + pair.1] == nil { rank[pair.0 + pair.1] = i }
            let scores: [Float] = names.indices.map { id in
                switch types[id] {
                case .normal: return rank[names[id]].map { -Float($0) } ?? -Float(merges.count + id)
                case .unused, .userDefined: return -1000
                default: return 0
                }
            }
            entries.append(("tokenizer.ggml.scores", .array(.float32, scores.map { .float32($0) })))
        }
        entries.append(("tokenizer.ggml.token_type", .array(.int32, types.map { .int32($0.rawValue) })))
        if !sentencePiece {
            let encoded = merges.map { pair in
                [pair.0, pair.1].map { $0.replacing(" ", with: "\u{0120}") }.joined(separator: " ")
            }
            entries.append(("tokenizer.ggml.merges", .array(.string, encoded.map { .string($0) })))
        }
        // Special tokens, add_*_token and the chat template as gguf-py's SpecialVocab reads them (GGUFTokenizerVocab.swift).
        entries += try Self.specialVocab(tokenizer: json, tokenizerConfig: tokenizerConfig, modelConfig: modelConfig,
                                         directory: directory, vocabularySize: vocabularySize)
        if sentencePiece, let prefix = tokenizerConfig?["add_prefix_space"]?.bool {
            entries.append(("tokenizer.ggml.add_space_prefix", .bool(prefix)))
        }
    }

    /// The converter's test for added tokens that should be control tokens though not marked special.
    static func looksSpecial(_ token: String) -> Bool {
        ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(token)
            || (token.hasPrefix("<|") && token.hasSuffix("|>"))
            || (token.hasPrefix("<｜") && token.hasSuffix("｜>"))
            || (token.hasPrefix("<unused") && token.hasSuffix(">"))
    }

    /// Merges as pairs, from either tokenizer.json form ("a b" strings or ["a", "b"] lists).
    static func merges(_ bpe: JSONValue, file: String) throws -> [(String, String)] {
        try (bpe["merges"]?.array ?? []).enumerated().map { i, merge in
            if let pair = merge.array, pair.count == 2, let a = pair[0].string, let b = pair[1].string { return (a, b) }
            if let text = merge.string {
                let parts = text.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
                if parts.count == 2 { return (String(parts[0]), String(parts[1])) }
            }
            throw FileFormatError(file: file, place: "model.merges[\(i)]", "expected \"left right\" or [left, right]")
        }
    }

    /// The `tokenizer.ggml.pre` name llama.cpp uses for a byte-level pre-tokenizer. llama.cpp recognises tokenizers by
    /// hashing what they make of a test text; this recognises the pre-tokenizer configurations themselves.
    static func preTokenizerName(_ pre: JSONValue?, log: (String) -> Void) -> String {
        let llama3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        let qwen2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        let steps = pre?["type"]?.string == "Sequence" ? (pre?["pretokenizers"]?.array ?? []) : (pre.map { [$0] } ?? [])
        let kinds = steps.map { $0["type"]?.string ?? "" }
        if let split = steps.first(where: { $0["type"]?.string == "Split" }), let regex = split["pattern"]?["Regex"]?.string {
            // The GPT-4o (o200k) split of Phi-4-mini and others: llama.cpp's "gpt-4o" pre-tokenizer.
            let gpt4o = "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            if regex == llama3 { return "llama-bpe" }
            if regex == gpt4o { return "gpt-4o" }
            if regex == qwen2 { return "qwen2" }
        }
        if kinds == ["Digits", "ByteLevel"], steps[0]["individual_digits"]?.bool == true { return "smollm" }
        if kinds == ["ByteLevel"], steps[0]["use_regex"]?.bool != false { return "gpt-2" }
        log("warning: tokenizer.json's pre-tokenizer is not one llama.cpp knows by name; writing tokenizer.ggml.pre = \"default\", so llama.cpp may split text differently")
        return "default"
    }
}
