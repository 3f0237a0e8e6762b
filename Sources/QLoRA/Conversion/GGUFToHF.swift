// Conversion of a llama-architecture GGUF file into a Hugging Face model folder:
//   config.json, generation_config.json, model.safetensors (bf16, HF tensor names),
//   tokenizer.json, tokenizer_config.json, chat_template.jinja (see GGUFTokenizerExport.swift).
//
// Tensor names (N = layer):          GGUF                    →  HF
//   token_embd.weight          → model.embed_tokens.weight
//   blk.N.attn_q / attn_k / attn_v / attn_output.weight
//                              → model.layers.N.self_attn.{q,k,v,o}_proj.weight
//   blk.N.ffn_gate / ffn_up / ffn_down.weight → model.layers.N.mlp.{gate,up,down}_proj.weight
//   blk.N.attn_norm.weight     → model.layers.N.input_layernorm.weight
//   blk.N.ffn_norm.weight      → model.layers.N.post_attention_layernorm.weight
//   output_norm.weight         → model.norm.weight
//   output.weight              → lm_head.weight (absent: tied embeddings)
//   rope_freqs.weight          → none; Llama 3 rope scaling goes into config.json
// A GGUF tensor with dims [ne0, ne1] is the row-major HF matrix [out = ne1, in = ne0].
//
// Rotary un-permutation. llama.cpp's converter reorders the rows of q_proj and k_proj so that ggml's
// rope, which rotates adjacent pairs (x[2i], x[2i+1]), matches HF's, which rotates halves (x[i], x[i + d/2]):
//     gguf = hf.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
// so GGUF row h·d + 2b + a holds HF row h·d + a·d/2 + b (a ∈ {0, 1}, b < d/2). We undo it with
//     hf = gguf.reshape(n_head, d/2, 2, in).swapaxes(1, 2).reshape(out, in)
// with n_head = attention heads for q and KV heads for k.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// GGUF → Hugging Face folder conversion.
public enum GGUFConverter {
    /// The names `convert` writes (and the catalog's marker): an existing output folder holding only these is replaced.
    public static let outputFiles: Set<String> = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "chat_template.jinja", ModelCatalog.completeMarker]

    /// Bumped whenever the output changes, so that cached conversions are redone.
    public static let version = 1

    /// Converts `ggufPath` into an HF folder at `directory` (created if needed). Everything is built and checked
    /// before the first file is written; each file is written atomically.
    public static func convert(gguf ggufPath: String, to directory: String, log: (String) -> Void = { _ in }) throws {
        try FileSystem.refuseOverwrite(output: directory, option: "the convert output", inputs: [("GGUF file", ggufPath)])
        try FileSystem.checkReplaceable(directory, option: "the convert output", replaceable: outputFiles)
        let file = try GGUFFile(path: ggufPath)
        try checkDataRanges(file)
        if let family = GGUFFamilyConverter.family(file) {
            try convertFamily(file, family, to: directory, log: log)
            return
        }
        let hyper = try LlamaHyperParameters(file)
        let config = try configJSON(file, hyper)
        let model = try loadableConfig(config, file)
        let tokenizer = try GGUFTokenizerExport(file)
        if let tokens = file["tokenizer.ggml.tokens"]?.array, tokens.count > model.vocabularySize {
            throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.tokens"),
                                  "\(tokens.count) tokens but the model's vocabulary (embedding rows) is \(model.vocabularySize)")
        }
        log("converting \(file.tensors.count) tensors to bf16")
        let records = try tensorRecords(file, hyper)
        try checkRecords(records, model, file)

        try writeModelFolder(directory, config: config, file: file, tokenizer: tokenizer, records: records, log: log)
    }

    /// The converted folder: config, generation config, tokenizer files and bf16 weights, written beside the target and
    /// renamed into place (an interrupted convert leaves the old folder or none).
    static func writeModelFolder(_ directory: String, config: JSONValue, file: GGUFFile, tokenizer: GGUFTokenizerExport,
                                 records: [TensorRecord], log: (String) -> Void) throws {
        try FileSystem.writeDirectory(directory) { directory in
            try FileSystem.writeAtomically(directory + "/config.json", text: pythonJSON(config))
            try FileSystem.writeAtomically(directory + "/generation_config.json", text: pythonJSON(generationConfigJSON(file)))
            try tokenizer.write(to: directory)
            try SafeTensorsWriter.write(records, metadata: ["format": "pt"], to: directory + "/model.safetensors")
        }
        log("wrote \(directory)")
    }

    /// The qwen3, gemma2, gemma3 and phi3 architectures (GGUFFamilies.swift).
    static func convertFamily(_ file: GGUFFile, _ family: GGUFFamily, to directory: String, log: (String) -> Void) throws {
        let config = try GGUFFamilyConverter.configJSON(file, family)
        let layers = config["num_hidden_layers"]?.int ?? 0
        let tokenizer = try GGUFTokenizerExport(file)
        let vocabulary = config["vocab_size"]?.int ?? 0
        if let tokens = file["tokenizer.ggml.tokens"]?.array, tokens.count > vocabulary {
            throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.tokens"),
                                  "\(tokens.count) tokens but the model's vocabulary (embedding rows) is \(vocabulary)")
        }
        log("converting \(file.tensors.count) tensors to bf16")
        let records = try GGUFFamilyConverter.tensorRecords(file, family, layers: layers)
        // The loader's own shape checks, where it knows the family.
        if DecoderConfig.supportedModelTypes.contains(config["model_type"]?.string ?? "") {
            try checkRecords(records, try loadableConfig(config, file), file)
        }
        try writeModelFolder(directory, config: config, file: file, tokenizer: tokenizer, records: records, log: log)
    }

    // MARK: - Checks before anything is written (the folder must load)

    /// Tensor data must not overlap: llama.cpp lays tensors out one after another, and overlapping
    /// ranges mean a corrupt or crafted file whose tensors would alias each other.
    static func checkDataRanges(_ file: GGUFFile) throws {
        let sorted = file.tensors.filter { !$0.dataRange.isEmpty }.sorted { $0.dataRange.lowerBound < $1.dataRange.lowerBound }
        for (previous, next) in zip(sorted, sorted.dropFirst()) where next.dataRange.lowerBound < previous.dataRange.upperBound {
            throw FileFormatError(file: file.path, place: "tensor '\(next.name)'",
                                  "data [\(next.dataRange.lowerBound), \(next.dataRange.upperBound)) overlaps that of tensor '\(previous.name)' [\(previous.dataRange.lowerBound), \(previous.dataRange.upperBound))")
        }
    }

    /// The config.json we would write, read back as the loader reads it.
    static func loadableConfig(_ config: JSONValue, _ file: GGUFFile) throws -> DecoderConfig {
        do {
            return try DecoderConfig(json: config, file: "config.json")
        } catch let e as FileFormatError {
            throw FileFormatError(file: file.path, place: "metadata", "gives a config.json the model cannot load: \(e.place): \(e.message)")
        }
    }

    /// Every tensor the config asks for, with its shape, and no other (block_count must agree with the tensors).
    static func checkRecords(_ records: [TensorRecord], _ config: DecoderConfig, _ file: GGUFFile) throws {
        var expected = DecoderModel.tensorShapes(config: config)
        for record in records {
            guard let shape = expected.removeValue(forKey: record.name) else {
                throw FileFormatError(file: file.path, place: "tensor '\(record.name)'", "not part of the model the metadata describes (\(config.layerCount) blocks)")
            }
            guard record.shape == shape else {
                throw FileFormatError(file: file.path, place: "tensor that becomes '\(record.name)'",
                                      "shape \(record.shape), expected \(shape) from the metadata (\(config.hiddenSize) hidden, \(config.intermediateSize) feed-forward, \(config.headCount) × \(config.headDim) heads, \(config.kvHeadCount) KV heads, vocabulary \(config.vocabularySize))")
            }
        }
        if let missing = expected.keys.sorted().first {
            throw FileFormatError(file: file.path, place: "tensors", "missing the tensor that becomes '\(missing)' (metadata says \(config.layerCount) blocks)")
        }
    }

    /// JSON text as Python's `json.dumps(value, indent=2, sort_keys=True)` + newline, as transformers writes configs.
    static func pythonJSON(_ value: JSONValue, sortKeys: Bool = true) -> String {
        value.serialized(.init(indent: 2, sortKeys: sortKeys)) + "\n"
    }

    // MARK: - config.json

    /// The `LlamaForCausalLM` config.json for a GGUF file.
    public static func configJSON(_ file: GGUFFile) throws -> JSONValue {
        try configJSON(file, LlamaHyperParameters(file))
    }

    static func configJSON(_ file: GGUFFile, _ h: LlamaHyperParameters) throws -> JSONValue {
        var c = JSONObject()
        c["architectures"] = .array([.string("LlamaForCausalLM")])
        c["attention_bias"] = .bool(false)
        c["attention_dropout"] = .double(0)
        if let id = file["tokenizer.ggml.bos_token_id"]?.int { c["bos_token_id"] = .int(Int64(id)) }
        c["dtype"] = .string("bfloat16")
        if let id = file["tokenizer.ggml.eos_token_id"]?.int { c["eos_token_id"] = .int(Int64(id)) }
        c["head_dim"] = .int(Int64(h.headDim))
        c["hidden_act"] = .string("silu")
        c["hidden_size"] = .int(Int64(h.hidden))
        c["initializer_range"] = .double(0.02)
        c["intermediate_size"] = .int(Int64(h.intermediate))
        c["max_position_embeddings"] = .int(Int64(h.contextLength))
        c["mlp_bias"] = .bool(false)
        c["model_type"] = .string("llama")
        c["num_attention_heads"] = .int(Int64(h.heads))
        c["num_hidden_layers"] = .int(Int64(h.layers))
        c["num_key_value_heads"] = .int(Int64(h.kvHeads))
        if let id = file["tokenizer.ggml.padding_token_id"]?.int { c["pad_token_id"] = .int(Int64(id)) }
        c["pretraining_tp"] = .int(1)
        c["rms_norm_eps"] = .double(h.rmsNormEps)
        c["rope_parameters"] = .object(try ropeParameters(file, h))
        c["tie_word_embeddings"] = .bool(file.tensor("output.weight") == nil)
        if let id = file["tokenizer.ggml.unknown_token_id"]?.int { c["unk_token_id"] = .int(Int64(id)) }
        c["use_cache"] = .bool(true)
        c["vocab_size"] = .int(Int64(h.vocabSize))
        return .object(c)
    }

    /// `rope_parameters` (transformers 5): default rope, linear scaling from metadata, or Llama 3 scaling
    /// recovered from the `rope_freqs.weight` factors that llama.cpp stores instead of the parameters.
    static func ropeParameters(_ file: GGUFFile, _ h: LlamaHyperParameters) throws -> JSONObject {
        var rope = JSONObject()
        rope["rope_theta"] = .double(h.ropeTheta)
        let arch = h.architecture
        if let freqs = file.tensor("rope_freqs.weight") {
            let factors = try file.floats(freqs)
            guard let llama3 = LlamaRopeScaling.recover(factors: factors, theta: h.ropeTheta, headDim: h.headDim) else {
                throw FileFormatError(file: file.path, place: "tensor 'rope_freqs.weight'",
                                      "these rope frequency factors match no Llama 3 rope scaling (factor, low/high frequency factors, original context) we know")
            }
            rope["rope_type"] = .string("llama3")
            rope["factor"] = .double(llama3.factor)
            rope["low_freq_factor"] = .double(llama3.lowFreqFactor)
            rope["high_freq_factor"] = .double(llama3.highFreqFactor)
            rope["original_max_position_embeddings"] = .int(Int64(llama3.originalContext))
            return rope
        }
        switch file["\(arch).rope.scaling.type"]?.string {
        case nil, "none"?:
            rope["rope_type"] = .string("default")
        case "linear"?:
            guard let factor = file["\(arch).rope.scaling.factor"]?.double else {
                throw FileFormatError(file: file.path, place: "metadata", "linear rope scaling without '\(arch).rope.scaling.factor'")
            }
            rope["rope_type"] = .string("linear")
            rope["factor"] = .double(factor)
        case let other?:
            throw FileFormatError(file: file.path, place: file.place(ofKey: "\(arch).rope.scaling.type"),
                                  "rope scaling '\(other)' is not supported (expected none, linear, or Llama 3 rope_freqs)")
        }
        return rope
    }

    // MARK: - generation_config.json

    static func generationConfigJSON(_ file: GGUFFile) -> JSONValue {
        var g = JSONObject()
        g["_from_model_config"] = .bool(true)
        if let id = file["tokenizer.ggml.bos_token_id"]?.int { g["bos_token_id"] = .int(Int64(id)) }
        if let id = file["tokenizer.ggml.eos_token_id"]?.int { g["eos_token_id"] = .int(Int64(id)) }
        g["output_attentions"] = .bool(false)
        g["output_hidden_states"] = .bool(false)
        if let id = file["tokenizer.ggml.padding_token_id"]?.int { g["pad_token_id"] = .int(Int64(id)) }
        g["use_cache"] = .bool(true)
        return .object(g)
    }

    // MARK: - Tensors

    /// The HF name of a GGUF tensor of a llama model; nil for tensors HF has no place for (rope_freqs).
    /// Throws for names it does not know.
    public static func hfTensorName(_ name: String, file: String = "<gguf>") throws -> String? {
        switch name {
        case "token_embd.weight": return "model.embed_tokens.weight"
        case "output_norm.weight": return "model.norm.weight"
        case "output.weight": return "lm_head.weight"
        case "rope_freqs.weight": return nil
        default: break
        }
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        if parts.count == 4, parts[0] == "blk", let layer = Int(parts[1]), layer >= 0, parts[3] == "weight" {
            let prefix = "model.layers.\(layer)."
            switch parts[2] {
            case "attn_q": return prefix + "self_attn.q_proj.weight"
            case "attn_k": return prefix + "self_attn.k_proj.weight"
            case "attn_v": return prefix + "self_attn.v_proj.weight"
            case "attn_output": return prefix + "self_attn.o_proj.weight"
            case "ffn_gate": return prefix + "mlp.gate_proj.weight"
            case "ffn_up": return prefix + "mlp.up_proj.weight"
            case "ffn_down": return prefix + "mlp.down_proj.weight"
            case "attn_norm": return prefix + "input_layernorm.weight"
            case "ffn_norm": return prefix + "post_attention_layernorm.weight"
            default: break
            }
        }
        throw FileFormatError(file: file, place: "tensor '\(name)'", "not a tensor of a llama model that we know how to convert")
    }

    /// Every tensor dequantized, un-permuted where needed, and rounded to bf16, sorted by HF name.
    static func tensorRecords(_ file: GGUFFile, _ h: LlamaHyperParameters) throws -> [TensorRecord] {
        var records: [TensorRecord] = []
        var seen = Set<String>()
        for info in file.tensors {
            guard let hfName = try hfTensorName(info.name, file: file.path) else { continue }
            let place = "tensor '\(info.name)'"
            var values = try file.floats(info)
            try checkFinite(values, tensor: info.name, origin: file.path)
            let shape = info.shape
            if let layer = layerIndex(info.name), layer >= h.layers {
                throw FileFormatError(file: file.path, place: place, "layer \(layer) but the model has \(h.layers) layers")
            }
            if info.name.hasSuffix(".attn_q.weight") || info.name.hasSuffix(".attn_k.weight") {
                let heads = info.name.hasSuffix(".attn_q.weight") ? h.heads : h.kvHeads
                guard shape.count == 2, shape[0] == heads * h.headDim else {
                    throw FileFormatError(file: file.path, place: place, "shape \(shape), expected [\(heads * h.headDim), in] for \(heads) heads of \(h.headDim)")
                }
                values = unpermuteRotaryRows(values, heads: heads, headDim: h.headDim, columns: shape[1])
            }
            guard seen.insert(hfName).inserted else { throw FileFormatError(file: file.path, place: place, "maps to '\(hfName)' twice") }
            records.append(TensorRecord(name: hfName, floats: values, shape: shape, dtype: .bf16))
        }
        for required in ["model.embed_tokens.weight", "model.norm.weight"] where !seen.contains(required) {
            throw FileFormatError(file: file.path, place: "tensors", "missing the tensor that becomes '\(required)'")
        }
        return records.sorted { $0.name < $1.name }
    }

    private static func layerIndex(_ name: String) -> Int? {
        let parts = name.split(separator: ".")
        guard parts.count >= 2, parts[0] == "blk" else { return nil }
        return Int(parts[1])
    }

    /// Undoes llama.cpp's rotary row permutation of a [heads·headDim, columns] row-major matrix (see the header).
    public static func unpermuteRotaryRows(_ w: [Float], heads: Int, headDim: Int, columns: Int) -> [Float] {
        precondition(w.count == heads * headDim * columns && headDim % 2 == 0)
        var out = [Float](repeating: 0, count: w.count)
        let half = headDim / 2
        w.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for h in 0..<heads {
                    for a in 0..<2 {
                        for b in 0..<half {
                            let from = (h * headDim + 2 * b + a) * columns
                            let to = (h * headDim + a * half + b) * columns
                            for c in 0..<columns { dst[to + c] = src[from + c] }
                        }
                    }
                }
            }
        }
        return out
    }

    /// llama.cpp's permutation (the inverse of `unpermuteRotaryRows`), for writing GGUF files and for tests.
    public static func permuteRotaryRows(_ w: [Float], heads: Int, headDim: Int, columns: Int) -> [Float] {
        precondition(w.count == heads * headDim * columns && headDim % 2 == 0)
        var out = [Float](repeating: 0, count: w.count)
        let half = headDim / 2
        for h in 0..<heads {
            for a in 0..<2 {
                for b in 0..<half {
                    let hf = (h * headDim + a * half + b) * columns
                    let gguf = (h * headDim + 2 * b + a) * columns
                    for c in 0..<columns { out[gguf + c] = w[hf + c] }
                }
            }
        }
        return out
    }
}

// MARK: - Hyper-parameters

/// The architecture numbers of a llama GGUF file, checked against each other.
struct LlamaHyperParameters {
    let architecture: String
    let hidden, intermediate, layers, heads, kvHeads, headDim, contextLength, vocabSize: Int
    let rmsNormEps, ropeTheta: Double

    init(_ file: GGUFFile) throws {
        let arch = try file.required("general.architecture", "a string", \.string)
        guard arch == "llama" else {
            throw FileFormatError(file: file.path, place: file.place(ofKey: "general.architecture"),
                                  "architecture '\(arch)' is not supported; expected 'llama'")
        }
        architecture = arch
        func positive(_ key: String) throws -> Int {
            let v = try file.required("\(arch).\(key)", "a positive integer", \.int)
            guard v > 0 else { throw FileFormatError(file: file.path, place: file.place(ofKey: "\(arch).\(key)"), "expected a positive integer, got \(v)") }
            return v
        }
        hidden = try positive("embedding_length")
        intermediate = try positive("feed_forward_length")
        layers = try positive("block_count")
        heads = try positive("attention.head_count")
        kvHeads = file["\(arch).attention.head_count_kv"] == nil ? heads : try positive("attention.head_count_kv")
        contextLength = try positive("context_length")
        if file["\(arch).attention.key_length"] != nil {
            headDim = try positive("attention.key_length")
        } else {
            guard hidden % heads == 0 else {
                throw FileFormatError(file: file.path, place: "metadata", "hidden size \(hidden) is not a multiple of \(heads) heads and no key_length is given")
            }
            headDim = hidden / heads
        }
        guard heads % kvHeads == 0, headDim % 2 == 0 else {
            throw FileFormatError(file: file.path, place: "metadata", "\(heads) heads, \(kvHeads) KV heads, head size \(headDim): expected heads a multiple of KV heads and an even head size")
        }
        rmsNormEps = try file.required("\(arch).attention.layer_norm_rms_epsilon", "a number", \.double)
        guard rmsNormEps.isFinite, rmsNormEps > 0 else {
            throw FileFormatError(file: file.path, place: file.place(ofKey: "\(arch).attention.layer_norm_rms_epsilon"), "expected a finite number > 0, got \(rmsNormEps)")
        }
        ropeTheta = file["\(arch).rope.freq_base"]?.double ?? 10000.0
        guard ropeTheta.isFinite, ropeTheta > 0 else {
            throw FileFormatError(file: file.path, place: file.place(ofKey: "\(arch).rope.freq_base"), "expected a finite number > 0, got \(ropeTheta)")
        }
        if let v = file["\(arch).vocab_size"]?.int {
            vocabSize = v
        } else if let tokens = file["tokenizer.ggml.tokens"]?.array {
            vocabSize = tokens.count
        } else if let embed = file.tensor("token_embd.weight"), embed.dimensions.count == 2 {
            vocabSize = embed.dimensions[1]
        } else {
            throw FileFormatError(file: file.path, place: "metadata", "cannot tell the vocabulary size")
        }
        if let embed = file.tensor("token_embd.weight"), embed.dimensions != [hidden, vocabSize] {
            throw FileFormatError(file: file.path, place: "tensor 'token_embd.weight'", "dims \(embed.dimensions), expected [\(hidden), \(vocabSize)]")
        }
    }
}

// MARK: - Llama 3 rope scaling

/// Llama 3 rope scaling parameters, recovered from llama.cpp's per-frequency divisors (`rope_freqs.weight`).
struct LlamaRopeScaling: Equatable {
    var factor: Double
    var lowFreqFactor: Double
    var highFreqFactor: Double
    var originalContext: Int

    /// The divisor llama.cpp stores for each of the headDim/2 frequencies (transformers' `_compute_llama3_parameters`).
    func divisors(theta: Double, headDim: Int) -> [Double] {
        let lowWavelen = Double(originalContext) / lowFreqFactor
        let highWavelen = Double(originalContext) / highFreqFactor
        return (0..<(headDim / 2)).map { i in
            let freq = 1.0 / pow(theta, Double(2 * i) / Double(headDim))
            let wavelen = 2 * Double.pi / freq
            if wavelen < highWavelen { return 1 }
            if wavelen > lowWavelen { return factor }
            let smooth = (Double(originalContext) / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor)
            return 1 / ((1 - smooth) / factor + smooth)
        }
    }

    /// The parameters that reproduce `factors`, tried over the values Llama 3.x releases use.
    static func recover(factors: [Float], theta: Double, headDim: Int) -> LlamaRopeScaling? {
        guard factors.count == headDim / 2, let maxFactor = factors.max(), maxFactor >= 1 else { return nil }
        let factor = Double(maxFactor)
        for original in [8192, 4096, 2048, 16384, 32768, 65536, 131072] {
            for (low, high) in [(1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)] {
                let candidate = LlamaRopeScaling(factor: factor, lowFreqFactor: low, highFreqFactor: high, originalContext: original)
                let expected = candidate.divisors(theta: theta, headDim: headDim)
                if zip(expected, factors).allSatisfy({ abs($0 - Double($1)) <= 1e-4 * max(1, $0) }) { return candidate }
            }
        }
        return nil
    }
}
