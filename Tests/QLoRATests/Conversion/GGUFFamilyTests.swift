import XCTest
@testable import QLoRA

/// GGUF export and conversion of the qwen3, gemma2, gemma3 and phi3 architectures, against what llama.cpp's own
/// convert_hf_to_gguf.py writes for the same tiny models (Tests/Fixtures/gguf-families, made by
/// scripts/make_gguf_family_fixtures.py). Only tensors and config are involved: no forward pass of these families.
final class GGUFFamilyTests: XCTestCase {
    static let families = [("qwen3", "Qwen3"), ("gemma2", "Gemma2"), ("gemma3", "Gemma3"), ("phi3", "Phi3")]

    private func reference(_ family: String) throws -> JSONValue {
        try JSONValue.parse(bytes: try FileSystem.readFile(TestFixtures.path("gguf-families/\(family)-llamacpp-f16.json")))
    }

    /// Every key the converter writes for the model (the tokenizer's are GGUFTokenizerExport's and left out of the
    /// reference) with its value type and value; every tensor with its type, ggml shape and the sums of its values
    /// (so Gemma's norm +1, Phi-3's fused tensors and rope factors are checked, not only named).
    func testExportMatchesLlamaCppsConverter() throws {
        for (family, name) in Self.families {
            let folder = TestFixtures.path("gguf-families/" + family)
            let out = try TestFixtures.temporaryDirectory("gguf-family-\(family)") + "/model.gguf"
            try GGUFFamilyExporter.export(directory: folder, type: .f16, to: out, name: name)
            let file = try GGUFFile(path: out)
            let ref = try reference(family)
            let keys = try XCTUnwrap(ref["keys"]?.object)
            let ours = file.metadata.map(\.key).filter { !$0.hasPrefix("tokenizer.") }
            XCTAssertEqual(ours, keys.map(\.key), "\(family): keys and their order")
            for (key, expected) in keys {
                let value = try XCTUnwrap(file[key], "\(family) \(key)")
                XCTAssertEqual("\(value.type)".uppercased(), expected["type"]?.string, "\(family) \(key)")
                if let s = value.string {
                    XCTAssertEqual(s, expected["value"]?.string, "\(family) \(key)")
                } else if case .float32(let f) = value {
                    XCTAssertEqual(Double(f), try XCTUnwrap(expected["value"]?.double), accuracy: abs(Double(f)) * 1e-7, "\(family) \(key)")
                } else {
                    XCTAssertEqual(value.int, expected["value"]?.int, "\(family) \(key)")
                }
            }
            // llama.cpp's Gemma converters also write this tokenizer key (its SentencePiece default would add a space).
            XCTAssertEqual(file["tokenizer.ggml.add_space_prefix"]?.bool, family.hasPrefix("gemma") ? false : nil, family)
            let tensors = try XCTUnwrap(ref["tensors"]?.array)
            XCTAssertEqual(Set(file.tensorNames), Set(tensors.compactMap { $0["name"]?.string }), family)
            for t in tensors {
                let tensorName = try XCTUnwrap(t["name"]?.string)
                guard let info = file.tensor(tensorName) else { continue }
                XCTAssertEqual(info.type.name, t["type"]?.string, "\(family) \(tensorName)")
                XCTAssertEqual(info.dimensions, t["shape"]?.array?.compactMap(\.int), "\(family) \(tensorName)")
                let values = try file.floats(info).map(Double.init)
                let sum = values.reduce(0, +), sumsq = values.reduce(0) { $0 + $1 * $1 }
                let refSum = try XCTUnwrap(t["sum"]?.double), refSumsq = try XCTUnwrap(t["sumsq"]?.double)
                XCTAssertEqual(sum, refSum, accuracy: 1e-6 * max(1, refSumsq), "\(family) \(tensorName) sum")
                XCTAssertEqual(sumsq, refSumsq, accuracy: 1e-6 * max(1, refSumsq), "\(family) \(tensorName) sum of squares")
            }
        }
    }

    /// Export → convert back → the original bf16 tensors exactly (norm shifts undone, fused tensors kept), with a
    /// config.json that keeps the architecture numbers and the family's switches.
    func testConvertBackGivesTheOriginalTensors() throws {
        for (family, name) in Self.families {
            let folder = TestFixtures.path("gguf-families/" + family)
            let work = try TestFixtures.temporaryDirectory("gguf-family-back-\(family)")
            try GGUFFamilyExporter.export(directory: folder, type: .bf16, to: work + "/model.gguf", name: name)
            try GGUFConverter.convert(gguf: work + "/model.gguf", to: work + "/hf")
            let original = try SafeTensorsCheckpoint(directory: folder)
            let back = try SafeTensorsCheckpoint(directory: work + "/hf")
            let expectedNames = original.names.filter { !(family.hasPrefix("gemma") && $0 == "lm_head.weight") }
            XCTAssertEqual(back.names, expectedNames, family)
            for tensor in expectedNames {
                XCTAssertEqual(back.info(tensor)?.shape, original.info(tensor)?.shape, "\(family) \(tensor)")
                XCTAssertEqual(try back.floats(tensor), try original.floats(tensor), "\(family) \(tensor)")
            }
            let config = try JSONValue.parse(bytes: try FileSystem.readFile(work + "/hf/config.json"))
            let source = try JSONValue.parse(bytes: try FileSystem.readFile(folder + "/config.json"))
            for key in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "sliding_window",
                        "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "layer_types"] {
                guard let expected = source[key], !expected.isNull || config[key] != nil else { continue }
                XCTAssertEqual(config[key], expected, "\(family) config.json '\(key)'")
            }
            XCTAssertEqual(config["rms_norm_eps"]?.double ?? 0, source["rms_norm_eps"]?.double ?? 1, accuracy: 1e-12, family)
            if family != "qwen3" || source["head_dim"] != nil {
                XCTAssertEqual(config["head_dim"], source["head_dim"] ?? .int(Int64(32 / (source["num_attention_heads"]?.int ?? 1))), family)
            }
            let rope = try XCTUnwrap(config["rope_parameters"])
            switch family {
            case "gemma3":
                XCTAssertEqual(rope["full_attention"]?["rope_type"], .string("linear"))
                XCTAssertEqual(rope["full_attention"]?["factor"]?.double, 8)
                XCTAssertEqual(rope["full_attention"]?["rope_theta"]?.double, 1e6)
                XCTAssertEqual(rope["sliding_attention"]?["rope_theta"]?.double, 1e4)
            case "phi3":
                XCTAssertEqual(rope["rope_type"], .string("longrope"))
                XCTAssertEqual(rope["partial_rotary_factor"]?.double, 0.75)
                let long = try XCTUnwrap(rope["long_factor"]?.array).compactMap(\.double)
                XCTAssertEqual(long.map { Float($0) }, (0..<3).map { Float(2.0 + 0.5 * Double($0)) })
                XCTAssertEqual(config["original_max_position_embeddings"]?.int, 64)
            default:
                XCTAssertEqual(rope["rope_theta"]?.double, source["rope_parameters"]?["rope_theta"]?.double ?? 10_000, family)
            }
        }
    }

    func testUnknownTensorsAndBadFactorsAreNamed() throws {
        XCTAssertThrowsError(try GGUFFamily.qwen3.ggufName("model.layers.0.mlp.gate_up_proj.weight", file: "x")) { error in
            XCTAssertTrue("\(error)".contains("model.layers.0.mlp.gate_up_proj.weight"), "\(error)")
        }
        XCTAssertEqual(try GGUFFamily.phi3.ggufName("model.layers.3.mlp.gate_up_proj.weight", file: "x"), "blk.3.ffn_up.weight")
        XCTAssertEqual(try GGUFFamily.gemma2.ggufName("model.layers.1.post_attention_layernorm.weight", file: "x"), "blk.1.post_attention_norm.weight")
        XCTAssertEqual(try GGUFFamily.qwen3.ggufName("model.layers.1.post_attention_layernorm.weight", file: "x"), "blk.1.ffn_norm.weight")
        XCTAssertEqual(try GGUFFamily.gemma3.ggufName("model.language_model.layers.0.self_attn.q_norm.weight", file: "x"), "blk.0.attn_q_norm.weight")
        XCTAssertNil(try GGUFFamily.gemma3.ggufName("model.vision_tower.vision_model.embeddings.patch_embedding.weight", file: "x"))
        XCTAssertNil(try GGUFFamily.gemma2.ggufName("lm_head.weight", file: "x"))
        var config = try JSONValue.parse(bytes: try FileSystem.readFile(TestFixtures.path("gguf-families/phi3/config.json"))).object!
        var rope = config["rope_parameters"]!.object!
        rope["long_factor"] = .array([.double(1), .double(2)])
        config["rope_parameters"] = .object(rope)
        XCTAssertThrowsError(try GGUFFamily.phi3.metadata(config: .object(config), type: .f16, name: "p", parameterCount: 1, file: "config.json")) { error in
            XCTAssertTrue("\(error)".contains("long and short factors must be 3 numbers each"), "\(error)")
        }
    }
}
