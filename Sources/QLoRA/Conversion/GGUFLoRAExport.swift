// Export of a LoRA adapter alone as a llama.cpp LoRA GGUF (`qlora export --format gguf-lora`), which llama.cpp applies
// at run time over the base model's GGUF (`llama-cli -m base.gguf --lora adapter.gguf`), as llama.cpp's
// `convert_lora_to_gguf.py` writes a PEFT adapter.
//
// Metadata: general.architecture (the base's, which llama.cpp checks), general.type = "adapter", general.name,
// adapter.type = "lora", adapter.lora.alpha (float32), general.file_type, general.quantization_version.
//
// Tensors, per adapted linear layer (GGUF name of the base weight W, e.g. blk.0.attn_q.weight):
//   W.lora_a   PEFT's A, [r, in] row-major: ggml dims [ne0 = in, ne1 = r]
//   W.lora_b   PEFT's B, [out, r] row-major: ggml dims [ne0 = r, ne1 = out]
// llama.cpp checks W.ne0 == lora_a.ne0, W.ne1 == lora_b.ne1 and lora_a.ne1 == lora_b.ne0, and applies
// W·x + (alpha / r)·B·(A·x) with r = lora_b.ne0, so one alpha serves the file: a layer whose scale is not alpha / r
// (rsLoRA, rank_pattern, alpha_pattern) has the difference folded into its B.
// Qwen3, Gemma 2/3 and Phi-3 (general.architecture qwen3, gemma2, gemma3, phi3) name W as GGUFFamily does, rows
// unpermuted; Phi-3's fused qkv_proj and gate_up_proj adapters are the A and B of blk.N.attn_qkv and blk.N.ffn_up.
// The llama architecture stores q and k rows permuted (see HFToGGUF.swift); B's rows are the output rows, so B of
// q_proj and k_proj is permuted the same way, and A (whose rows are the rank) is not.
// Types (GGUFExportType.adapterTypes): f32, f16, bf16 or q8_0 for every tensor; a tensor whose ne0 is not a multiple
// of 32 (lora_b for r < 32, say) falls back from q8_0 to f16, as the converter does.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What a LoRA GGUF export wrote.
public struct GGUFLoRAExportReport: Sendable {
    public var architecture: String
    public var tensorCount: Int
    public var adaptedLayers: Int
    public var alpha: Float
    public var typeCounts: [String: Int]
}

extension GGUFExporter {
    /// The GGUF names of a block's linear layers, in `TransformerBlock.linears` order.
    static let linearNames = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]

    /// Writes the LoRA adapters attached to `model` as a llama.cpp LoRA GGUF of `type` to `path` (a temporary file
    /// beside it, renamed when complete). Throws when no layer has an adapter.
    @discardableResult
    public static func exportLoRA(model: DecoderModel, type: GGUFExportType, to path: String, name: String,
                                  log: (String) -> Void = { _ in }) throws -> GGUFLoRAExportReport {
        guard GGUFExportType.adapterTypes.contains(type) else {
            throw UsageError("--type: '\(type.rawValue)' is not a type of --format gguf-lora (choose from \(GGUFExportType.adapterTypes.map(\.rawValue).joined(separator: ", ")))")
        }
        let config = model.config
        // Qwen3, Gemma 2/3 and Phi-3: the base tensor names of GGUFFamily (Phi-3's fused attn_qkv and ffn_up whole).
        let family = GGUFFamily(modelType: config.modelType)
        let arch = try family?.rawValue ?? architecture(config)
        let permute = arch == "llama"
        var layers: [(name: String, layer: Linear, adapter: LoRAAdapter, heads: Int)] = []
        for (l, block) in model.blocks.enumerated() {
            for (i, layer) in block.linears.enumerated() {
                guard let adapter = layer.lora else { continue }
                if let family {
                    guard let name = try family.ggufName(layer.name + ".weight", file: "the model") else { continue }
                    layers.append((name, layer, adapter, 0))
                } else {
                    let short = linearNames[i]
                    let heads = short == "attn_q" ? config.headCount : short == "attn_k" ? config.kvHeadCount : 0
                    layers.append(("blk.\(l).\(short).weight", layer, adapter, heads))
                }
            }
        }
        guard let first = layers.first else {
            throw UsageError("--format gguf-lora: the model has no LoRA adapter attached (pass --adapter with a PEFT LoRA adapter folder)")
        }
        // llama.cpp's one alpha; each layer's own scale·r / alpha is folded into its B (1 for a plain PEFT adapter).
        let alpha = first.adapter.scale * Float(first.adapter.rank)

        var plan: [(name: String, dimensions: [Int], values: () -> [Float])] = []
        for entry in layers {
            let a = entry.adapter.a, b = entry.adapter.b, r = entry.adapter.rank
            guard a.columns == entry.layer.inFeatures, b.rows == entry.layer.outFeatures, b.columns == r else {
                throw UsageError("--format gguf-lora: \(entry.layer.name)'s adapter is A \(a.rows)×\(a.columns), B \(b.rows)×\(b.columns), which does not fit the \(entry.layer.outFeatures)×\(entry.layer.inFeatures) weight")
            }
            let factor = entry.adapter.scale * Float(r) / alpha
            let heads = permute ? entry.heads : 0
            plan.append((entry.name + ".lora_a", [a.columns, r], { Array(a.storage) }))
            plan.append((entry.name + ".lora_b", [r, b.rows], {
                var values = Array(b.storage)
                if factor != 1 { for i in values.indices { values[i] *= factor } }
                guard heads > 0 else { return values }
                return GGUFConverter.permuteRotaryRows(values, heads: heads, headDim: config.headDim, columns: r)
            }))
        }
        let types: [GGMLType] = plan.map { $0.dimensions[0] % type.weightType.blockSize == 0 ? type.weightType : .f16 }
        var counts: [String: Int] = [:]
        for t in types { counts[t.name, default: 0] += 1 }
        let metadata: [(key: String, value: GGUFValue)] = [
            ("general.architecture", .string(arch)),
            ("general.type", .string("adapter")),
            ("general.name", .string(name)),
            ("adapter.type", .string("lora")),
            ("adapter.lora.alpha", .float32(alpha)),
            ("general.file_type", .uint32(type.fileType)),
            ("general.quantization_version", .uint32(2)),
        ]
        log("writing \(plan.count) LoRA tensors of \(layers.count) layers (alpha \(alpha)) to \(path)")
        try GGUFWriter.write(metadata: metadata, tensors: zip(plan, types).map { ($0.name, $1, $0.dimensions) }, to: path) { i in
            types[i].quantize(plan[i].values())
        }
        return GGUFLoRAExportReport(architecture: arch, tensorCount: plan.count, adaptedLayers: layers.count, alpha: alpha,
                                    typeCounts: counts)
    }
}
