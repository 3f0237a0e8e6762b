// GGUF conversion of the Qwen3, Gemma 2, Gemma 3 and Phi-3 families (llama.cpp architectures qwen3, gemma2, gemma3,
// phi3), both ways, as llama.cpp's convert_hf_to_gguf.py writes them (its Qwen3Model, Gemma2Model, Gemma3Model and
// Phi3MiniModel classes; checked against its output in Tests/Fixtures/gguf-families).
//
// Tensor names (N = layer):                      HF                 →  GGUF
//   model.embed_tokens.weight                                         → token_embd.weight
//   model.norm.weight                                                 → output_norm.weight
//   lm_head.weight (untied; Gemma leaves it out: always tied)         → output.weight
//   model.layers.N.input_layernorm.weight                             → blk.N.attn_norm.weight
//   model.layers.N.self_attn.{q,k,v,o}_proj.weight                    → blk.N.attn_{q,k,v,output}.weight
//   model.layers.N.self_attn.{q,k}_norm.weight (Qwen3, Gemma 3)       → blk.N.attn_{q,k}_norm.weight
//   model.layers.N.self_attn.qkv_proj.weight (Phi-3, fused)           → blk.N.attn_qkv.weight
//   model.layers.N.mlp.{gate,up,down}_proj.weight                     → blk.N.ffn_{gate,up,down}.weight
//   model.layers.N.mlp.gate_up_proj.weight (Phi-3, fused gate|up)     → blk.N.ffn_up.weight
//   model.layers.N.post_attention_layernorm.weight  Qwen3, Phi-3      → blk.N.ffn_norm.weight
//                                                   Gemma 2/3         → blk.N.post_attention_norm.weight
//   model.layers.N.pre_feedforward_layernorm.weight (Gemma)           → blk.N.ffn_norm.weight
//   model.layers.N.post_feedforward_layernorm.weight (Gemma)          → blk.N.post_ffw_norm.weight
//   Phi-3 longrope short_factor / long_factor                         → rope_factors_short/long.weight (F32)
// A Gemma 3 multimodal checkpoint (`gemma3`) keeps its text model under `model.language_model.` (transformers 5)
// or `language_model.model.` (earlier); its vision tower and projector have no place in a text GGUF.
//
// Values: none of these architectures permutes q/k rows (llama.cpp runs them with the NEOX rope, as HF does). Gemma
// stores RMSNorm weights w of x·(1+w); llama.cpp's norm multiplies by its weight, so every `*norm.weight` is written
// as w+1 (and read back as w-1). Without tokenizer.model, Gemma 3's embedding is cut to the tokenizer's size
// (tokenizer.json's vocab plus added tokens) when that is smaller than vocab_size, as the converter does.
// The tokenizer keys: GGUFTokenizerVocab.swift (tokenizer.model or tokenizer.json, as the converter picks per family).
// With a LoRA adapter, each adapted linear (Phi-3's fused ones whole) is W + scale·B·A in fp32 from the model loaded
// from the folder, rounded once to the file's type, as GGUFExporter merges the Llama family; the rest is read as stored.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A llama.cpp architecture of the families beyond Llama, with its naming and metadata rules.
public enum GGUFFamily: String, CaseIterable, Sendable {
    case qwen3, gemma2, gemma3, phi3

    /// The family of a config.json `model_type`; nil for the Llama family (HFToGGUF.swift) and others.
    public init?(modelType: String) {
        switch modelType {
        case "qwen3": self = .qwen3
        case "gemma2": self = .gemma2
        case "gemma3", "gemma3_text": self = .gemma3
        case "phi3": self = .phi3
        default: return nil
        }
    }

    var isGemma: Bool { self == .gemma2 || self == .gemma3 }

    /// What is added to a norm weight on the way to GGUF (Gemma's x·(1+w) norm as llama.cpp's x·w').
    func normShift(_ ggufName: String) -> Float { isGemma && ggufName.hasSuffix("norm.weight") ? 1 : 0 }

    /// The text model's config: a multimodal Gemma 3 config's `text_config`, else the config itself.
    static func textConfig(_ raw: JSONValue) -> JSONValue {
        if raw["model_type"]?.string == "gemma3", let text = raw["text_config"], text.object != nil { return text }
        return raw
    }

    // MARK: - Tensor names

    /// The GGUF name of an HF tensor; nil for tensors llama.cpp leaves out (Gemma's lm_head, a multimodal checkpoint's
    /// vision parts). Throws for a tensor this family does not have.
    func ggufName(_ hfName: String, file: String) throws -> String? {
        var name = hfName
        if self == .gemma3 {
            for prefix in ["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."] where name.hasPrefix(prefix) {
                return nil
            }
            if name.hasPrefix("model.language_model.") { name = "model." + name.dropFirst("model.language_model.".count) }
            if name.hasPrefix("language_model.") { name = String(name.dropFirst("language_model.".count)) }
        }
        switch name {
        case "model.embed_tokens.weight": return "token_embd.weight"
        case "model.norm.weight": return "output_norm.weight"
        case "lm_head.weight": return isGemma ? nil : "output.weight"
        default: break
        }
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        if parts.count == 6 || parts.count == 5, parts[0] == "model", parts[1] == "layers", let layer = Int(parts[2]), layer >= 0,
           parts.last == "weight" {
            let module = parts[3..<(parts.count - 1)].joined(separator: ".")
            if let short = blockTensor(module) { return "blk.\(layer).\(short).weight" }
        }
        throw FileFormatError(file: file, place: "tensor '\(hfName)'", "not a tensor of a \(rawValue) model that we know how to convert")
    }

    /// The GGUF short name of a block module (`self_attn.q_proj` → `attn_q`) in this family.
    private func blockTensor(_ module: String) -> String? {
        switch module {
        case "input_layernorm": return "attn_norm"
        case "self_attn.o_proj": return "attn_output"
        case "mlp.down_proj": return "ffn_down"
        case "post_attention_layernorm": return isGemma ? "post_attention_norm" : "ffn_norm"
        default: break
        }
        switch (self, module) {
        case (.phi3, "self_attn.qkv_proj"): return "attn_qkv"
        case (.phi3, "mlp.gate_up_proj"): return "ffn_up"
        case (.qwen3, _), (.gemma2, _), (.gemma3, _):
            switch module {
            case "self_attn.q_proj": return "attn_q"
            case "self_attn.k_proj": return "attn_k"
            case "self_attn.v_proj": return "attn_v"
            case "mlp.gate_proj": return "ffn_gate"
            case "mlp.up_proj": return "ffn_up"
            case "self_attn.q_norm" where self != .gemma2: return "attn_q_norm"
            case "self_attn.k_norm" where self != .gemma2: return "attn_k_norm"
            case "pre_feedforward_layernorm" where isGemma: return "ffn_norm"
            case "post_feedforward_layernorm" where isGemma: return "post_ffw_norm"
            default: return nil
            }
        default: return nil
        }
    }

    /// The HF name of a GGUF tensor of this family (the inverse of `ggufName`, text-model names); nil for tensors HF
    /// keeps in config.json instead (Phi-3's rope factors).
    func hfName(_ ggufName: String, file: String) throws -> String? {
        switch ggufName {
        case "token_embd.weight": return "model.embed_tokens.weight"
        case "output_norm.weight": return "model.norm.weight"
        case "output.weight": return "lm_head.weight"
        case "rope_factors_long.weight", "rope_factors_short.weight": return self == .phi3 ? nil : ggufName
        default: break
        }
        let parts = ggufName.split(separator: ".", omittingEmptySubsequences: false)
        if parts.count == 4, parts[0] == "blk", let layer = Int(parts[1]), layer >= 0, parts[3] == "weight" {
            let modules = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "self_attn.qkv_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
                           "mlp.gate_up_proj", "mlp.down_proj", "post_attention_layernorm", "pre_feedforward_layernorm",
                           "post_feedforward_layernorm"]
            if let module = modules.first(where: { blockTensor($0) == String(parts[2]) }) {
                return "model.layers.\(layer).\(module).weight"
            }
        }
        throw FileFormatError(file: file, place: "tensor '\(ggufName)'", "not a tensor of a \(rawValue) model that we know how to convert")
    }

    // MARK: - Metadata

    /// The `general.*` and `<arch>.*` keys, in the order and with the value types llama.cpp's converter writes them.
    func metadata(config raw: JSONValue, type: GGUFExportType, name: String, parameterCount: Int,
                  file: String) throws -> [(key: String, value: GGUFValue)] {
        let c = Self.textConfig(raw)
        let a = rawValue
        func fail(_ key: String, _ message: String) -> FileFormatError { FileFormatError(file: file, place: "'\(key)'", message) }
        func int(_ key: String) throws -> Int {
            guard let v = c[key]?.int, v >= 0 else { throw fail(key, "expected a non-negative integer") }
            return v
        }
        func double(_ key: String) throws -> Double {
            guard let v = c[key]?.double else { throw fail(key, "expected a number") }
            return v
        }
        var m: [(key: String, value: GGUFValue)] = [("general.architecture", .string(a)), ("general.type", .string("model")),
                                                    ("general.name", .string(name)),
                                                    ("general.size_label", .string(GGUFExporter.sizeLabel(parameterCount)))]
        func u32(_ key: String, _ v: Int) { m.append(("\(a).\(key)", .uint32(UInt32(v)))) }
        func f32(_ key: String, _ v: Double) { m.append(("\(a).\(key)", .float32(Float(v)))) }
        let rope = ropeParameters(c)
        let heads = try int("num_attention_heads")
        let kvHeads = c["num_key_value_heads"]?.int ?? heads
        switch self {
        case .qwen3, .gemma3:
            // TextModel.set_gguf_parameters, then Gemma3Model's additions and overrides.
            u32("block_count", try int("num_hidden_layers"))
            let context = self == .gemma3 ? (c["max_position_embeddings"]?.int ?? 131072) : try int("max_position_embeddings")
            u32("context_length", context)
            u32("embedding_length", try int("hidden_size"))
            u32("feed_forward_length", try int("intermediate_size"))
            u32("attention.head_count", heads)
            u32("attention.head_count_kv", kvHeads)
            let global = rope["full_attention"] ?? rope
            switch global["rope_type"]?.string {
            case "linear"? where global["factor"]?.double != nil:
                m.append(("\(a).rope.scaling.type", .string("linear")))
                f32("rope.scaling.factor", global["factor"]!.double!)
            case "yarn"? where global["factor"]?.double != nil:
                m.append(("\(a).rope.scaling.type", .string("yarn")))
                f32("rope.scaling.factor", global["factor"]!.double!)
                guard let original = global["original_max_position_embeddings"]?.int else {
                    throw fail("rope_parameters.original_max_position_embeddings", "yarn rope scaling needs it")
                }
                u32("rope.scaling.original_context_length", original)
                if let v = global["extrapolation_factor"]?.double { f32("rope.scaling.yarn_ext_factor", v) }
                if let v = (global["attention_factor"] ?? global["attn_factor"])?.double { f32("rope.scaling.yarn_attn_factor", v) }
                if let v = global["beta_fast"]?.double { f32("rope.scaling.yarn_beta_fast", v) }
                if let v = global["beta_slow"]?.double { f32("rope.scaling.yarn_beta_slow", v) }
            case nil, "default"?:
                break
            case let other?:
                throw fail("rope_parameters", "rope_type '\(other)' is not one we write for \(a) (default, linear, yarn)")
            }
            f32("rope.freq_base", global["rope_theta"]?.double ?? (self == .gemma3 ? 1_000_000 : 10_000))
            if let local = rope["sliding_attention"]?["rope_theta"]?.double { f32("rope.freq_base_swa", local) }
            f32("attention.layer_norm_rms_epsilon", c["rms_norm_eps"]?.double ?? 1e-6)
            if self == .gemma3 || c["head_dim"]?.int != nil {
                let headDim = c["head_dim"]?.int ?? 256
                u32("attention.key_length", headDim)
                u32("attention.value_length", headDim)
            }
            m.append(("general.file_type", .uint32(type.fileType)))
            if self == .gemma3 {
                if let cap = c["final_logit_softcapping"]?.double, cap != 0 { f32("final_logit_softcapping", cap) }
                if c["sliding_window_pattern"]?.int != 1 { u32("attention.sliding_window", try int("sliding_window")) }
            }
        case .gemma2:
            u32("context_length", try int("max_position_embeddings"))
            u32("embedding_length", try int("hidden_size"))
            u32("block_count", try int("num_hidden_layers"))
            u32("feed_forward_length", try int("intermediate_size"))
            u32("attention.head_count", heads)
            u32("attention.head_count_kv", kvHeads)
            f32("attention.layer_norm_rms_epsilon", try double("rms_norm_eps"))
            u32("attention.key_length", try int("head_dim"))
            u32("attention.value_length", try int("head_dim"))
            m.append(("general.file_type", .uint32(type.fileType)))
            f32("attn_logit_softcapping", try double("attn_logit_softcapping"))
            f32("final_logit_softcapping", try double("final_logit_softcapping"))
            u32("attention.sliding_window", try int("sliding_window"))
        case .phi3:
            let hidden = try int("hidden_size")
            let maxPositions = try int("max_position_embeddings")
            guard let original = rope["original_max_position_embeddings"]?.int ?? c["original_max_position_embeddings"]?.int, original > 0 else {
                throw fail("original_max_position_embeddings", "Phi-3 configs need it (rope_parameters or top level)")
            }
            if try phi3RopeFactors(c, file: file) != nil {
                let scale = Double(maxPositions) / Double(original)
                let attnFactor = scale > 1 ? (1 + log(scale) / log(Double(original))).squareRoot() : 1
                f32("rope.scaling.attn_factor", attnFactor)
                // The converter writes this key first of all (from generate_extra_tensors, before the parameters).
                m.insert(m.removeLast(), at: 1)
            }
            u32("context_length", maxPositions)
            u32("rope.scaling.original_context_length", original)
            u32("embedding_length", hidden)
            u32("feed_forward_length", try int("intermediate_size"))
            u32("block_count", try int("num_hidden_layers"))
            u32("attention.head_count", heads)
            u32("attention.head_count_kv", kvHeads)
            f32("attention.layer_norm_rms_epsilon", try double("rms_norm_eps"))
            u32("rope.dimension_count", Int(phi3PartialRotaryFactor(c) * Double(hidden)) / heads)
            f32("rope.freq_base", rope["rope_theta"]?.double ?? c["rope_theta"]?.double ?? 10_000)
            m.append(("general.file_type", .uint32(type.fileType)))
            u32("attention.sliding_window", c["sliding_window"]?.int ?? 0)
        }
        m.append(("general.quantization_version", .uint32(2)))
        return m
    }

    /// `rope_parameters` (transformers 5), else `rope_scaling` with `rope_theta` beside it (earlier configs).
    func ropeParameters(_ c: JSONValue) -> JSONValue {
        if let p = c["rope_parameters"], p.object != nil { return p }
        var o = c["rope_scaling"]?.object ?? JSONObject()
        if o["rope_type"] == nil, let t = o["type"] { o["rope_type"] = t }
        if o["rope_theta"] == nil, let theta = c["rope_theta"] { o["rope_theta"] = theta }
        return .object(o)
    }

    func phi3PartialRotaryFactor(_ c: JSONValue) -> Double {
        ropeParameters(c)["partial_rotary_factor"]?.double ?? c["partial_rotary_factor"]?.double ?? 1
    }

    /// Phi-3's longrope factors (short, long), checked to have one per rotated frequency; nil without them.
    func phi3RopeFactors(_ c: JSONValue, file: String) throws -> (short: [Float], long: [Float])? {
        let rope = ropeParameters(c)
        guard let long = rope["long_factor"]?.array, !long.isEmpty else { return nil }
        let short = rope["short_factor"]?.array ?? []
        let type = (rope["rope_type"]?.string ?? "").lowercased()
        guard type == "longrope" || type == "su" else {
            throw FileFormatError(file: file, place: "'rope_parameters.rope_type'", "'\(type)' with long/short factors is not one we write for phi3 (longrope)")
        }
        guard let hidden = c["hidden_size"]?.int, let heads = c["num_attention_heads"]?.int, heads > 0 else {
            throw FileFormatError(file: file, place: "'hidden_size'", "Phi-3 configs need hidden_size and num_attention_heads")
        }
        let rotaryDims = Int(phi3PartialRotaryFactor(c) * Double(hidden)) / heads
        let numbers = { (list: [JSONValue]) -> [Float] in list.compactMap { $0.double.map(Float.init) } }
        let s = numbers(short), l = numbers(long)
        guard s.count == short.count, l.count == long.count, s.count == l.count, 2 * l.count == rotaryDims else {
            throw FileFormatError(file: file, place: "'rope_parameters.long_factor'",
                                  "long and short factors must be \(rotaryDims / 2) numbers each (half the rotary dimensions), got \(long.count) and \(short.count)")
        }
        return (s, l)
    }
}

// MARK: - Export (HF folder → GGUF)

public enum GGUFFamilyExporter {
    /// Writes the model folder `directory` as `export(directory:…)` does, with `model`'s LoRA adapters merged: each
    /// adapted linear's weight is W + scale·B·A in fp32 from the weights `model` holds (AdapterMerge.mergedWeight, as
    /// GGUFExporter merges the Llama family), rounded once to the file's type, under llama.cpp's name and unchanged
    /// otherwise (Gemma's +1 is for norms; Phi-3's qkv_proj and gate_up_proj stay fused). `model` must have been
    /// loaded from `directory`'s dense weights; every other tensor is read from the files as stored.
    @discardableResult
    public static func export(directory: String, merging model: DecoderModel, type: GGUFExportType, to path: String,
                              name: String? = nil, log: (String) -> Void = { _ in }) throws -> GGUFExportReport {
        let c = model.config
        // The adapted linears by the names their weights have in the folder's files (Gemma 3 multimodal:
        // `language_model.model.…` for the module `model.language_model.…`).
        var adapted: [String: Linear] = [:]
        for layer in model.linearLayers where layer.lora != nil { adapted[c.checkpointName(layer.name + ".weight")] = layer }
        let stored = Set(try SafeTensorsCheckpoint(directory: directory).names)
        if let missing = adapted.keys.sorted().first(where: { !stored.contains($0) }) {
            throw UsageError("GGUF export: the adapted layer's weight '\(missing)' is not a tensor of \(directory) (was the model loaded from another folder?)")
        }
        var written = Set<String>()
        var report = try export(directory: directory, type: type, to: path, name: name, weight: { hfName in
            guard let layer = adapted[hfName] else { return nil }
            let merged = AdapterMerge.mergedWeight(layer)
            // A base and adapter that are finite can still overflow here; llama.cpp would run such a file to garbage.
            try checkFinite(merged, tensor: hfName, origin: path + " (merged weights)")
            written.insert(hfName)
            return merged
        }, log: log)
        report.mergedLayers = written.count
        return report
    }

    /// Writes the model folder `directory` (config.json, *.safetensors, tokenizer files) of a Qwen3, Gemma 2/3 or Phi-3
    /// model as one GGUF file of `type`, tensors and metadata as llama.cpp's converter writes them. `weight` may supply
    /// a tensor's values in place of the file's (an adapter merged into a projection, by HF name); the rest are read
    /// from the safetensors as they are.
    @discardableResult
    public static func export(directory: String, type: GGUFExportType, to path: String, name: String? = nil,
                              weight: (String) throws -> [Float]? = { _ in nil }, log: (String) -> Void = { _ in }) throws -> GGUFExportReport {
        let configPath = directory + "/config.json"
        let raw: JSONValue
        do { raw = try JSONValue.parse(bytes: try FileSystem.readFile(configPath)) } catch let e as JSONParseError {
            throw FileFormatError(file: configPath, place: "JSON", e.description)
        }
        let modelType = raw["model_type"]?.string ?? ""
        guard let family = GGUFFamily(modelType: modelType) else {
            throw UsageError("GGUF export: model_type '\(modelType)' is not one of qwen3, gemma2, gemma3, gemma3_text, phi3")
        }
        let text = GGUFFamily.textConfig(raw)
        let checkpoint = try SafeTensorsCheckpoint(directory: directory)
        let tied = text["tie_word_embeddings"]?.bool ?? (family.isGemma)

        // Gemma 3: the embedding rows beyond the tokenizer's tokens are cut, as the converter does (with tokenizer.model
        // its vocabulary is vocab_size long, so nothing is cut).
        var vocabulary = text["vocab_size"]?.int ?? 0
        var keepRows: Int? = nil
        if family == .gemma3, !FileSystem.exists(directory + "/tokenizer.model"), let json = try? JSONValue.parse(bytes: try FileSystem.readFile(directory + "/tokenizer.json")),
           let count = json["model"]?["vocab"]?.object?.count {
            let real = count + (json["added_tokens"]?.array?.count ?? 0)
            if real < vocabulary { keepRows = real; vocabulary = real }
        }
        let tokenizer = try GGUFTokenizerMetadata(family: family, directory: directory, vocabularySize: vocabulary, log: log)

        // Each tensor: its GGUF name and dims, and where its values come from (the rope factors, or an HF tensor
        // with the rows kept and the norm shift).
        var plan: [(name: String, dimensions: [Int], factors: [Float]?, hfName: String, shift: Float)] = []
        if family == .phi3, let factors = try family.phi3RopeFactors(text, file: configPath) {
            plan.append(("rope_factors_long.weight", [factors.long.count], factors.long, "", 0))
            plan.append(("rope_factors_short.weight", [factors.short.count], factors.short, "", 0))
        }
        for hfName in checkpoint.names {
            guard let ggufName = try family.ggufName(hfName, file: configPath), let info = checkpoint.info(hfName) else { continue }
            if ggufName == "output.weight" && tied { continue }
            var shape = info.shape
            if ggufName == "token_embd.weight", let keep = keepRows, shape.count == 2 { shape[0] = keep }
            plan.append((ggufName, shape.reversed(), nil, hfName, family.normShift(ggufName)))
        }
        func values(_ i: Int) throws -> [Float] {
            let entry = plan[i]
            if let factors = entry.factors { return factors }
            var values = try weight(entry.hfName) ?? checkpoint.floats(entry.hfName)
            let count = entry.dimensions.reduce(1, *)
            if values.count > count { values = Array(values.prefix(count)) }
            if entry.shift != 0 { values = values.map { $0 + entry.shift } }
            return values
        }
        guard plan.contains(where: { $0.name == "token_embd.weight" }) else {
            throw FileFormatError(file: directory, place: "tensors", "no model.embed_tokens.weight")
        }
        let typeContext = GGUFTypeContext(layerCount: text["num_hidden_layers"]?.int ?? 0, tiedEmbeddings: tied)
        let tokenizerEntries = tokenizer.entries
        let counts = try GGUFExporter.writeModel(tensors: plan.map { ($0.name, $0.dimensions) }, type: type, context: typeContext, metadata: { parameters in
            try family.metadata(config: raw, type: type, name: name ?? GGUFExporter.lastPathComponent(directory),
                                parameterCount: parameters, file: configPath) + tokenizerEntries
        }, to: path, log: log, values: values)
        return GGUFExportReport(architecture: family.rawValue, tensorCount: plan.count, mergedLayers: 0, typeCounts: counts,
                                vocabularySize: vocabulary, tokenizerModel: tokenizer.model)
    }
}

// MARK: - Conversion (GGUF → HF folder)

/// GGUF files of the qwen3, gemma2, gemma3 and phi3 architectures as Hugging Face folders: the inverse of the export
/// (norms shifted back, Phi-3's rope factors into config.json), with config.json rebuilt from the metadata.
/// Not in a GGUF and so chosen as llama.cpp runs the model: Gemma's `query_pre_attn_scalar` (head_dim, or hidden/heads
/// for the 27B shapes of 46 and 62 layers, as llama.cpp scales attention), Gemma 2's alternating and Gemma 3's
/// 5-local-to-1-global `layer_types`, Phi-3's `partial_rotary_factor` (rope dimensions × heads / hidden).
enum GGUFFamilyConverter {
    static func family(_ file: GGUFFile) -> GGUFFamily? {
        guard let arch = file["general.architecture"]?.string else { return nil }
        return GGUFFamily(rawValue: arch)
    }

    /// config.json of a family GGUF file.
    static func configJSON(_ file: GGUFFile, _ family: GGUFFamily) throws -> JSONValue {
        let a = family.rawValue
        func positive(_ key: String) throws -> Int {
            let v = try file.required("\(a).\(key)", "a positive integer", \.int)
            guard v > 0 else { throw FileFormatError(file: file.path, place: file.place(ofKey: "\(a).\(key)"), "expected a positive integer, got \(v)") }
            return v
        }
        func number(_ key: String) throws -> Double {
            let v = try file.required("\(a).\(key)", "a number", \.double)
            guard v.isFinite else { throw FileFormatError(file: file.path, place: file.place(ofKey: "\(a).\(key)"), "expected a finite number, got \(v)") }
            return v
        }
        let hidden = try positive("embedding_length"), layers = try positive("block_count"), heads = try positive("attention.head_count")
        let kvHeads = file["\(a).attention.head_count_kv"] == nil ? heads : try positive("attention.head_count_kv")
        guard let embed = file.tensor("token_embd.weight"), embed.dimensions.count == 2, embed.dimensions[0] == hidden else {
            throw FileFormatError(file: file.path, place: "tensor 'token_embd.weight'", "missing, or not [\(hidden), vocabulary]")
        }
        let headDim = file["\(a).attention.key_length"] == nil ? hidden / heads : try positive("attention.key_length")
        var c = JSONObject()
        let architecture = ["qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"][a]!
        c["architectures"] = .array([.string(architecture)])
        c["attention_bias"] = .bool(false)
        c["attention_dropout"] = .double(0)
        for (key, gguf) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")] {
            if let id = file["tokenizer.ggml.\(gguf)"]?.int { c[key] = .int(Int64(id)) }
        }
        c["dtype"] = .string("bfloat16")
        c["head_dim"] = .int(Int64(headDim))
        c["hidden_size"] = .int(Int64(hidden))
        c["initializer_range"] = .double(0.02)
        c["intermediate_size"] = .int(Int64(try positive("feed_forward_length")))
        c["max_position_embeddings"] = .int(Int64(try positive("context_length")))
        c["model_type"] = .string(family == .gemma3 ? "gemma3_text" : a)
        c["num_attention_heads"] = .int(Int64(heads))
        c["num_hidden_layers"] = .int(Int64(layers))
        c["num_key_value_heads"] = .int(Int64(kvHeads))
        c["rms_norm_eps"] = .double(try number("attention.layer_norm_rms_epsilon"))
        c["tie_word_embeddings"] = .bool(file.tensor("output.weight") == nil)
        c["use_cache"] = .bool(true)
        c["vocab_size"] = .int(Int64(embed.dimensions[1]))
        func ropeScaling(_ base: JSONObject) throws -> JSONObject {
            var r = base
            switch file["\(a).rope.scaling.type"]?.string {
            case nil, "none"?: r["rope_type"] = .string("default")
            case "linear"?:
                r["rope_type"] = .string("linear")
                r["factor"] = .double(try number("rope.scaling.factor"))
            case "yarn"? where family == .qwen3:
                r["rope_type"] = .string("yarn")
                r["factor"] = .double(try number("rope.scaling.factor"))
                r["original_max_position_embeddings"] = .int(Int64(try positive("rope.scaling.original_context_length")))
                for (key, hf) in [("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
                                  ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")] {
                    if file["\(a).rope.scaling.\(key)"] != nil { r[hf] = .double(try number("rope.scaling.\(key)")) }
                }
            case let other?:
                throw FileFormatError(file: file.path, place: file.place(ofKey: "\(a).rope.scaling.type"), "rope scaling '\(other)' is not supported for \(a)")
            }
            return r
        }
        let theta = file["\(a).rope.freq_base"] == nil ? nil : try number("rope.freq_base")
        // llama.cpp's attention scale for Gemma: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B models.
        let queryScalar = (family == .gemma2 && layers == 46) || (family == .gemma3 && layers == 62) ? hidden / heads : headDim
        switch family {
        case .qwen3:
            c["hidden_act"] = .string("silu")
            // llama.cpp runs qwen3 with full attention in every layer.
            c["layer_types"] = .array((0..<layers).map { _ in .string("full_attention") })
            c["use_sliding_window"] = .bool(false)
            c["rope_parameters"] = .object(try ropeScaling(JSONObject([("rope_theta", .double(theta ?? 10_000))])))
        case .gemma2:
            c["hidden_activation"] = .string("gelu_pytorch_tanh")
            c["query_pre_attn_scalar"] = .int(Int64(queryScalar))
            c["attn_logit_softcapping"] = .double(try number("attn_logit_softcapping"))
            c["final_logit_softcapping"] = .double(try number("final_logit_softcapping"))
            c["sliding_window"] = .int(Int64(try positive("attention.sliding_window")))
            c["layer_types"] = .array((0..<layers).map { .string($0 % 2 == 0 ? "sliding_attention" : "full_attention") })
            c["rope_parameters"] = .object(JSONObject([("rope_theta", .double(theta ?? 10_000)), ("rope_type", .string("default"))]))
        case .gemma3:
            c["hidden_activation"] = .string("gelu_pytorch_tanh")
            c["query_pre_attn_scalar"] = .int(Int64(queryScalar))
            if file["\(a).final_logit_softcapping"] != nil { c["final_logit_softcapping"] = .double(try number("final_logit_softcapping")) }
            if file["\(a).attention.sliding_window"] != nil { c["sliding_window"] = .int(Int64(try positive("attention.sliding_window"))) }
            c["layer_types"] = .array((0..<layers).map { .string(($0 + 1) % 6 == 0 ? "full_attention" : "sliding_attention") })
            let local = file["\(a).rope.freq_base_swa"] == nil ? 10_000 : try number("rope.freq_base_swa")
            c["rope_parameters"] = .object(JSONObject([
                ("full_attention", .object(try ropeScaling(JSONObject([("rope_theta", .double(theta ?? 1_000_000))])))),
                ("sliding_attention", .object(JSONObject([("rope_theta", .double(local)), ("rope_type", .string("default"))]))),
            ]))
        case .phi3:
            c["hidden_act"] = .string("silu")
            let rotary = file["\(a).rope.dimension_count"] == nil ? headDim : try positive("rope.dimension_count")
            let original = file["\(a).rope.scaling.original_context_length"] == nil ? nil : try positive("rope.scaling.original_context_length")
            c["original_max_position_embeddings"] = original.map { .int(Int64($0)) } ?? .null
            var rope = JSONObject([("rope_theta", .double(theta ?? 10_000))])
            if rotary != headDim { rope["partial_rotary_factor"] = .double(Double(rotary * heads) / Double(hidden)) }
            if let long = file.tensor("rope_factors_long.weight"), let short = file.tensor("rope_factors_short.weight") {
                let l = try file.floats(long), s = try file.floats(short)
                guard l.count == rotary / 2, s.count == rotary / 2 else {
                    throw FileFormatError(file: file.path, place: "tensor 'rope_factors_long.weight'", "\(l.count) long and \(s.count) short factors, expected \(rotary / 2) (half the rope dimensions)")
                }
                rope["rope_type"] = .string("longrope")
                rope["long_factor"] = .array(l.map { .double(Double($0)) })
                rope["short_factor"] = .array(s.map { .double(Double($0)) })
                if let original { rope["original_max_position_embeddings"] = .int(Int64(original)) }
            } else {
                rope["rope_type"] = .string("default")
            }
            c["rope_parameters"] = .object(rope)
            let window = file["\(a).attention.sliding_window"]?.int ?? 0
            c["sliding_window"] = window > 0 ? .int(Int64(window)) : .null
        }
        return .object(c)
    }

    /// Every tensor as HF names it, norms shifted back, rounded to bf16, sorted by name.
    static func tensorRecords(_ file: GGUFFile, _ family: GGUFFamily, layers: Int) throws -> [TensorRecord] {
        var records: [TensorRecord] = []
        var seen = Set<String>()
        for info in file.tensors {
            guard let hfName = try family.hfName(info.name, file: file.path) else { continue }
            let parts = info.name.split(separator: ".")
            if parts.count >= 2, parts[0] == "blk", let layer = Int(parts[1]), layer >= layers {
                throw FileFormatError(file: file.path, place: "tensor '\(info.name)'", "layer \(layer) but the model has \(layers) layers")
            }
            var values = try file.floats(info)
            try checkFinite(values, tensor: info.name, origin: file.path)
            let shift = family.normShift(info.name)
            if shift != 0 { values = values.map { $0 - shift } }
            guard seen.insert(hfName).inserted else { throw FileFormatError(file: file.path, place: "tensor '\(info.name)'", "maps to '\(hfName)' twice") }
            records.append(TensorRecord(name: hfName, floats: values, shape: info.shape, dtype: .bf16))
        }
        for required in ["model.embed_tokens.weight", "model.norm.weight"] where !seen.contains(required) {
            throw FileFormatError(file: file.path, place: "tensors", "missing the tensor that becomes '\(required)'")
        }
        return records.sorted { $0.name < $1.name }
    }
}
