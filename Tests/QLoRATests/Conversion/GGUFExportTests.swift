import XCTest
@testable import QLoRA

/// `qlora export --format gguf`: the tiny fixture (with and without its adapter) written as GGUF, read back with our
/// GGUF reader and GGUF → HF converter, and compared with the merged model, its config and its tokenizer.
final class GGUFExportTests: XCTestCase {
    /// A copy of tiny-llama/base with a tokenizer (the SentencePiece-style `legacy` fixture, or another) and a chat template.
    static func tinyLlamaFolder(tokenizer: String = "sentencepiece-bpe/legacy", template: String? = "llama-2.jinja") throws -> String {
        let dir = try TestFixtures.temporaryDirectory("gguf-export-base")
        for name in ["config.json", "generation_config.json", "model.safetensors"] {
            try FileSystem.writeAtomically(dir + "/" + name, bytes: try FileSystem.readFile(TestFixtures.path("tiny-llama/base/" + name)))
        }
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            try FileSystem.writeAtomically(dir + "/" + name, bytes: try FileSystem.readFile(TestFixtures.path(tokenizer + "/" + name)))
        }
        if let template {
            try FileSystem.writeAtomically(dir + "/chat_template.jinja", bytes: try FileSystem.readFile(TestFixtures.path("chat-templates/" + template)))
        }
        return dir
    }

    /// Exports `dir` (+ adapter) as `type`; returns the model that was exported (adapter attached) and the file.
    static func export(_ dir: String, adapter: Bool, type: GGUFExportType) throws -> (model: DecoderModel, file: GGUFFile, report: GGUFExportReport) {
        let loaded = try ModelLoader.load(dir, quantization: .none)
        if adapter { try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: loaded.model) }
        let out = try TestFixtures.temporaryDirectory("gguf-export-out") + "/model-\(type.rawValue).gguf"
        let report = try GGUFExporter.export(model: loaded.model, directory: dir, type: type, to: out)
        return (loaded.model, try GGUFFile(path: out), report)
    }

    /// The HF weights the exported file must hold: merged linear weights, embeddings, norms, head.
    static func expectedTensors(_ model: DecoderModel) -> [String: (gguf: String, values: [Float])] {
        var out: [String: (String, [Float])] = [:]
        out["model.embed_tokens.weight"] = ("token_embd.weight", Array(model.embedding.storage))
        for (l, block) in model.blocks.enumerated() {
            out["model.layers.\(l).input_layernorm.weight"] = ("blk.\(l).attn_norm.weight", block.inputNorm)
            out["model.layers.\(l).post_attention_layernorm.weight"] = ("blk.\(l).ffn_norm.weight", block.mlpInputNorm)
            for (layer, short) in zip(block.linears, ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]) {
                out[layer.name + ".weight"] = ("blk.\(l).\(short).weight", AdapterMerge.mergedWeight(layer))
            }
        }
        out["model.norm.weight"] = ("output_norm.weight", model.finalNorm)
        if model.head !== model.embedding { out["lm_head.weight"] = ("output.weight", Array(model.head.storage)) }
        return out
    }

    /// The GGUF tensor's values in HF layout (q/k rows un-permuted).
    static func hfValues(_ file: GGUFFile, _ name: String, _ config: DecoderConfig) throws -> [Float] {
        let info = try XCTUnwrap(file.tensor(name), name)
        let values = try file.floats(info)
        if name.hasSuffix("attn_q.weight") || name.hasSuffix("attn_k.weight") {
            let heads = name.hasSuffix("attn_q.weight") ? config.headCount : config.kvHeadCount
            return GGUFConverter.unpermuteRotaryRows(values, heads: heads, headDim: config.headDim, columns: info.dimensions[0])
        }
        return values
    }

    func testF16AndBF16ExportsHoldTheMergedWeightsAndReadBackAsTheSameModel() throws {
        let dir = try Self.tinyLlamaFolder()
        for type in [GGUFExportType.f16, .bf16] {
            let (model, file, report) = try Self.export(dir, adapter: true, type: type)
            XCTAssertEqual(report.mergedLayers, 14)
            XCTAssertEqual(file["general.architecture"]?.string, "llama")
            XCTAssertEqual(file["general.file_type"]?.int, Int(type.fileType))
            let expected = Self.expectedTensors(model)
            XCTAssertEqual(Set(file.tensorNames), Set(expected.values.map(\.gguf)))
            // Rounding of one f16 / bf16 step (relative 2^-11 / 2^-8), with f16's subnormal spacing as the floor.
            let step: Float = type == .f16 ? 1.0 / 2048 : 1.0 / 256
            for (hfName, e) in expected {
                let info = try XCTUnwrap(file.tensor(e.gguf))
                let oneD = info.dimensions.count == 1
                XCTAssertEqual(info.type, oneD ? .f32 : type.weightType, e.gguf)
                XCTAssertEqual(info.shape.reduce(1, *), e.values.count, e.gguf)
                let got = try Self.hfValues(file, e.gguf, model.config)
                for i in got.indices {
                    if oneD { XCTAssertEqual(got[i], e.values[i], "\(e.gguf)[\(i)]"); continue }
                    XCTAssertLessThanOrEqual(abs(got[i] - e.values[i]), abs(e.values[i]) * step + 6e-8, "\(type) \(hfName)[\(i)]")
                }
            }

            // Our GGUF → HF converter gives back the config and the weights (now in bf16).
            let back = try TestFixtures.temporaryDirectory("gguf-export-back")
            try GGUFConverter.convert(gguf: file.path, to: back)
            let original = try DecoderConfig(directory: dir), converted = try DecoderConfig(directory: back)
            XCTAssertEqual(converted.hiddenSize, original.hiddenSize)
            XCTAssertEqual(converted.intermediateSize, original.intermediateSize)
            XCTAssertEqual(converted.layerCount, original.layerCount)
            XCTAssertEqual(converted.headCount, original.headCount)
            XCTAssertEqual(converted.kvHeadCount, original.kvHeadCount)
            XCTAssertEqual(converted.headDim, original.headDim)
            XCTAssertEqual(converted.vocabularySize, original.vocabularySize)
            XCTAssertEqual(converted.rmsNormEps, original.rmsNormEps)
            XCTAssertEqual(converted.ropeTheta, original.ropeTheta)
            XCTAssertEqual(converted.ropeScaling, original.ropeScaling)
            XCTAssertEqual(converted.maxPositionEmbeddings, original.maxPositionEmbeddings)
            XCTAssertEqual(converted.tieWordEmbeddings, original.tieWordEmbeddings)
            XCTAssertEqual(converted.bosTokenID, 1)
            XCTAssertEqual(converted.eosTokenIDs, [2])
            let weights = try SafeTensorsFile(path: back + "/model.safetensors")
            XCTAssertEqual(Set(weights.names), Set(expected.keys))
            for (hfName, e) in expected {
                let got = try weights.floats(hfName)
                for i in got.indices {
                    XCTAssertLessThanOrEqual(abs(got[i] - e.values[i]), abs(e.values[i]) * (step + 1.0 / 256) + 6e-8, "\(type) \(hfName)[\(i)]")
                }
            }
            // The converted folder is the merged model: its logits are the adapter's (as MergeTests checks for merge).
            let merged = try DecoderModel(config: converted, weights: try SafeTensorsCheckpoint(directory: back))
            let row = try LlamaForwardTests.inputRows()[0]
            let logits = try merged.forward(tokens: row, cache: KVCache(config: merged.config, capacity: row.count))
            let reference = Array(try LlamaForwardTests.expected().floats("logits_bf16base_lora").prefix(logits.count))
            XCTAssertLessThan(relativeError(logits, reference), 1e-2, "\(type)")
        }
    }

    func testTheSentencePieceTokenizerAndChatTemplateRoundTrip() throws {
        let dir = try Self.tinyLlamaFolder()
        let (_, file, report) = try Self.export(dir, adapter: false, type: .f16)
        XCTAssertEqual(report.tokenizerModel, "llama")
        XCTAssertEqual(file["tokenizer.ggml.model"]?.string, "llama")
        XCTAssertEqual(file["tokenizer.ggml.pre"]?.string, "default")
        let tokens = try XCTUnwrap(file["tokenizer.ggml.tokens"]?.strings)
        let types = try XCTUnwrap(file["tokenizer.ggml.token_type"]?.ints)
        XCTAssertEqual(tokens.count, 1000)  // config.json's vocab_size: ids past the tokenizer's are padding
        XCTAssertEqual(tokens[999], "[PAD999]")
        XCTAssertEqual(types[999], 5)
        XCTAssertEqual(Array(types[0...2]), [2, 3, 3])  // <unk> unknown, <s> and </s> control
        XCTAssertEqual(tokens[650], "<|user|>")
        XCTAssertEqual(types[650], 3)
        XCTAssertEqual(tokens[651], "foo bar")
        XCTAssertEqual(types[651], 4)
        XCTAssertEqual(types[tokens.firstIndex(of: "<0x41>")!], 6)
        XCTAssertEqual(file["tokenizer.ggml.bos_token_id"]?.int, 1)
        XCTAssertEqual(file["tokenizer.ggml.eos_token_id"]?.int, 2)
        XCTAssertEqual(file["tokenizer.ggml.unknown_token_id"]?.int, 0)
        XCTAssertNil(file["tokenizer.ggml.padding_token_id"])
        XCTAssertEqual(file["tokenizer.ggml.add_bos_token"]?.bool, true)
        XCTAssertEqual(file["tokenizer.ggml.add_eos_token"]?.bool, false)
        let template = try FileSystem.readText(TestFixtures.path("chat-templates/llama-2.jinja"))
        XCTAssertEqual(file["tokenizer.chat_template"]?.string, template)

        // The tokenizer rebuilt from the GGUF metadata encodes the fixture's texts as the original does.
        let back = try TestFixtures.temporaryDirectory("gguf-export-tokenizer")
        try GGUFTokenizerExport(file).write(to: back)
        let rebuilt = try Tokenizer(directory: back)
        let original = try Tokenizer(directory: TestFixtures.path("sentencepiece-bpe/legacy"))
        let goldens = try String(contentsOfFile: TestFixtures.path("sentencepiece-bpe/legacy/goldens.jsonl"), encoding: .utf8)
        var checked = 0
        for line in goldens.split(separator: "\n") {
            guard let text = try JSONValue.parse(String(line))["text"]?.string else { continue }
            XCTAssertEqual(rebuilt.encode(text, addSpecialTokens: true), original.encode(text, addSpecialTokens: true), text.debugDescription)
            checked += 1
        }
        XCTAssertEqual(checked, 18)
        XCTAssertEqual(try FileSystem.readText(back + "/chat_template.jinja"), template)
    }

    func testAByteLevelTokenizerIsWrittenAsGPT2WithItsMergesAndPreTokenizer() throws {
        let dir = try Self.tinyLlamaFolder(tokenizer: "bytelevel-bpe/llama3", template: nil)
        let (_, file, _) = try Self.export(dir, adapter: false, type: .f16)
        XCTAssertEqual(file["tokenizer.ggml.model"]?.string, "gpt2")
        XCTAssertEqual(file["tokenizer.ggml.pre"]?.string, "llama-bpe")
        XCTAssertNil(file["tokenizer.ggml.scores"])
        XCTAssertNil(file["tokenizer.chat_template"])
        let json = try JSONValue.parse(bytes: try FileSystem.readFile(dir + "/tokenizer.json"))
        let tokens = try XCTUnwrap(file["tokenizer.ggml.tokens"]?.strings)
        let types = try XCTUnwrap(file["tokenizer.ggml.token_type"]?.ints)
        for (token, id) in try XCTUnwrap(json["model"]?["vocab"]?.object) { XCTAssertEqual(tokens[try XCTUnwrap(id.int)], token) }
        let merges = try XCTUnwrap(json["model"]?["merges"]?.array).map { pair in pair.array!.map { $0.string! }.joined(separator: " ") }
        XCTAssertEqual(file["tokenizer.ggml.merges"]?.strings, merges)
        XCTAssertEqual(tokens[0], "<|eot|>")
        XCTAssertEqual(types[0], 3)
        XCTAssertEqual(tokens[533], "hello world")
        XCTAssertEqual(types[533], 4)
        XCTAssertEqual(types[600], 5)
        XCTAssertEqual(file["tokenizer.ggml.eos_token_id"]?.int, 0)  // tokenizer_config.json's eos_token
        XCTAssertEqual(file["tokenizer.ggml.bos_token_id"]?.int, 1)  // config.json's bos_token_id
    }

    func testQuantizedExportsFollowLlamaCppTypeRulesWithinTheirBlockError() throws {
        let dir = try Self.tinyLlamaFolder()
        for type in [GGUFExportType.q8_0, .q4_0, .q4_k_m, .q5_k_m] {
            let (model, file, _) = try Self.export(dir, adapter: true, type: type)
            XCTAssertEqual(file["general.file_type"]?.int, Int(type.fileType))
            for (hfName, e) in Self.expectedTensors(model) {
                let info = try XCTUnwrap(file.tensor(e.gguf))
                if info.dimensions.count == 1 {
                    XCTAssertEqual(info.type, .f32, e.gguf)
                    XCTAssertEqual(try file.floats(info), e.values, e.gguf)
                    continue
                }
                // llama-quantize gives the output matrix more bits (Q6_K needs ne0 % 256 == 0; here 128, so Q8_0).
                // The K mixtures' Q4_K/Q5_K need rows of 256 too: rows of 128 and 352 fall back to Q5_0/Q5_1, and
                // the layers use_more_bits picks (layer 1 of 2) have attn_v and ffn_down in Q6_K, so Q8_0.
                var expectedType: GGMLType = e.gguf == "output.weight" ? .q8_0 : type.weightType
                if type == .q4_k_m || type == .q5_k_m {
                    let more = e.gguf == "blk.1.attn_v.weight" || e.gguf == "blk.1.ffn_down.weight" || e.gguf == "output.weight"
                    expectedType = more ? .q8_0 : type == .q4_k_m ? .q5_0 : .q5_1
                }
                XCTAssertEqual(info.type, expectedType, "\(type) \(e.gguf)")
                let got = try Self.hfValues(file, e.gguf, model.config)
                // Q8_0's grid is symmetric: half a step (amax/127). Q4_0's runs from −7/8 to 8/8 of the block's
                // extreme value, so a value of the other sign near −amax is up to a whole step (amax/8) away; Q5_0
                // likewise amax/16. Q5_1 spans min…max in 31 steps: half a step is at most amax/31.
                let bound: Float = [.q8_0: 0.5 / 127, .q4_0: 1.0 / 8, .q5_0: 1.0 / 16, .q5_1: 1.0 / 31][info.type]!
                for b in 0..<(got.count / 32) {
                    let block = e.values[(32 * b)..<(32 * b + 32)]
                    let amax = block.map(abs).max()!
                    for i in (32 * b)..<(32 * b + 32) {
                        // The bound, plus the f16 rounding of the scale.
                        XCTAssertLessThanOrEqual(abs(got[i] - e.values[i]), amax * bound * 1.01 + amax / 1024 + 1e-7, "\(type) \(hfName)[\(i)]")
                    }
                }
            }
        }
    }

    /// Q6_K as ggml's reference quantizer makes it: each value within half a step of its group's 6-bit grid, a zero
    /// group exact, and the type chosen for a q4_0 export's output matrix when its rows are a multiple of 256.
    func testQ6KQuantizationStaysWithinItsStep() throws {
        var rng = SeededGenerator(seed: 0x6_6)  // seeded: a failure reproduces
        var values = (0..<(8 * 256)).map { _ in Float.random(in: -2...2, using: &rng) }
        for i in 0..<16 { values[i] = 0 }             // an all-zero group
        for i in 256..<512 { values[i] *= 0.05 }      // a block on the scale of real weights (its f16 d is subnormal)
        values[600] = 40                              // an outlier
        let bytes = GGMLType.q6_K.quantize(values)
        XCTAssertEqual(bytes.count, 8 * 210)
        var back = [Float](repeating: 0, count: values.count)
        bytes.withUnsafeBytes { src in back.withUnsafeMutableBufferPointer { GGMLType.q6_K.dequantize(src, into: $0) } }
        for g in 0..<(values.count / 16) {
            let group = values[(16 * g)..<(16 * g + 16)]
            let amax = group.map(abs).max()!
            let blockMax = values[(256 * (g / 16))..<(256 * (g / 16) + 256)].map(abs).max()!
            for i in group.indices {
                // Half a step of the group's grid (about amax/31 wide), the step widened by the 8-bit rounding of the
                // group's scale against the block's largest (blockMax/31/128 per level, 32 levels).
                // And the f16 rounding of d (relative 2^-11, or 3e-8 where subnormal) times at most 127·32.
                let dRounding = max(blockMax / 31 / 128 / 2048, 3e-8) * 127 * 32
                XCTAssertLessThanOrEqual(abs(back[i] - values[i]), amax / 31 * 0.75 + blockMax / 31 / 128 * 32 + dRounding, "[\(i)]")
            }
        }
        XCTAssertEqual(Array(back[0..<16]), [Float](repeating: 0, count: 16))
        // Away from the outlier's block (whose small groups share its large 8-bit-quantized scale), about 1% error.
        let others = Array(0..<512) + Array(768..<values.count)
        XCTAssertLessThan(relativeError(others.map { back[$0] }, others.map { values[$0] }), 0.015)
        XCTAssertEqual(GGUFExporter.tensorType(name: "output.weight", dimensions: [2048, 10], type: .q4_0, context: Self.oneLayer), .q6_K)
        XCTAssertEqual(GGUFExporter.tensorType(name: "token_embd.weight", dimensions: [2048, 10], type: .q4_0, context: Self.oneLayerTied), .q6_K)
        XCTAssertEqual(GGUFExporter.tensorType(name: "token_embd.weight", dimensions: [2048, 10], type: .q4_0, context: Self.oneLayer), .q4_0)
        XCTAssertEqual(GGUFExporter.tensorType(name: "output.weight", dimensions: [576, 10], type: .q4_0, context: Self.oneLayer), .q8_0)
        XCTAssertEqual(GGUFExporter.tensorType(name: "blk.0.ffn_down.weight", dimensions: [40, 10], type: .q8_0, context: Self.oneLayer), .f16)
        XCTAssertEqual(GGUFExporter.tensorType(name: "blk.0.attn_q.bias", dimensions: [64], type: .q8_0, context: Self.oneLayer), .f32)
        XCTAssertEqual(GGUFExporter.tensorType(name: "token_embd.weight", dimensions: [2048, 10], type: .q6_k, context: Self.oneLayer), .q6_K)
        XCTAssertEqual(GGUFExporter.tensorType(name: "blk.0.ffn_down.weight", dimensions: [352, 10], type: .q6_k, context: Self.oneLayer), .q8_0)
        XCTAssertEqual(GGUFExporter.tensorType(name: "blk.0.ffn_down.weight", dimensions: [40, 10], type: .q6_k, context: Self.oneLayer), .f16)
    }

    static let oneLayer = GGUFTypeContext(layerCount: 1, tiedEmbeddings: false)
    static let oneLayerTied = GGUFTypeContext(layerCount: 1, tiedEmbeddings: true)

    /// Our Q4_K, Q5_K and Q6_K bytes are ggml's: Tests/Fixtures/gguf/kquant-blocks.gguf holds 16 rows of 256 values
    /// chosen to reach every branch of the reference quantizers and what libggml-base's ggml_quantize_chunk (what
    /// llama-quantize runs) made of them (scripts/make_kquant_fixture.py).
    func testKQuantBytesAreGGMLsReferenceQuantizers() throws {
        let file = try GGUFFile(path: TestFixtures.path("gguf/kquant-blocks.gguf"))
        let input = try file.floats("input")
        XCTAssertEqual(input.count, 16 * 256)
        for type in [GGMLType.q4_K, .q5_K, .q6_K] {
            let info = try XCTUnwrap(file.tensor(type.name))
            XCTAssertEqual(info.type, type)
            let want = Array(file.bytes(info)), got = type.quantize(input)
            XCTAssertEqual(got.count, want.count, type.name)
            for row in 0..<16 {
                let range = (row * type.blockBytes)..<((row + 1) * type.blockBytes)
                XCTAssertEqual(Array(got[range]), Array(want[range]), "\(type.name) row \(row)")
            }
        }
    }

    /// The types llama-quantize chose, tensor by tensor, for exports of synthetic models (a 24-layer llama with
    /// rows of 256 and 352, a tied 10-layer one with rows of 96 and 80, and an 80-layer llama with grouped-query
    /// attention, a "70B" to llama.cpp) in each mixture (Tests/Fixtures/gguf/llama-quantize-types.json, written by
    /// scripts/check_gguf_llamacpp.py bytes --make-type-fixture from llama_model_quantize's output) are the types we choose.
    func testTensorTypesAreLlamaQuantizesChoices() throws {
        let reference = try JSONValue.parse(bytes: try FileSystem.readFile(TestFixtures.path("gguf/llama-quantize-types.json")))
        var checked = 0, mixtures = Set<String>()
        for model in try XCTUnwrap(reference["models"]?.array) {
            let name = try XCTUnwrap(model["name"]?.string)
            let context = GGUFTypeContext(layerCount: try XCTUnwrap(model["layers"]?.int), tiedEmbeddings: try XCTUnwrap(model["tied"]?.bool),
                                          is70B: try XCTUnwrap(model["is70B"]?.bool))
            for (typeName, tensors) in try XCTUnwrap(model["types"]?.object) {
                let type = try GGUFExportType.parse(typeName)
                for tensor in try XCTUnwrap(tensors.array) {
                    let tensorName = try XCTUnwrap(tensor["name"]?.string)
                    let dimensions = try XCTUnwrap(tensor["shape"]?.array?.compactMap(\.int))
                    let chosen = GGUFExporter.tensorType(name: tensorName, dimensions: dimensions, type: type, context: context)
                    XCTAssertEqual(chosen.name, tensor["type"]?.string, "\(name) \(typeName) \(tensorName) \(dimensions)")
                    checked += 1
                }
                mixtures.insert(typeName)
            }
        }
        XCTAssertEqual(mixtures, ["q4_0", "q4_k_m", "q5_k_m", "q6_k"])
        XCTAssertGreaterThan(checked, 1000)
        // The context a config gives: llama.cpp's 70B class.
        var config = try DecoderConfig(directory: TestFixtures.path("tiny-llama/base"))
        XCTAssertFalse(GGUFTypeContext(config: config, architecture: "llama", tiedEmbeddings: false).is70B)
        config.layerCount = 80
        XCTAssertTrue(GGUFTypeContext(config: config, architecture: "llama", tiedEmbeddings: false).is70B)
        config.kvHeadCount = config.headCount
        XCTAssertFalse(GGUFTypeContext(config: config, architecture: "llama", tiedEmbeddings: false).is70B)
        XCTAssertTrue(GGUFTypeContext(config: config, architecture: "qwen2", tiedEmbeddings: false).is70B)
    }

    func testQwen2IsWrittenWithItsBiasesAndWithoutTheRotaryPermutation() throws {
        let dir = try TestFixtures.temporaryDirectory("gguf-export-qwen2")
        for name in ["config.json", "generation_config.json", "model.safetensors"] {
            try FileSystem.writeAtomically(dir + "/" + name, bytes: try FileSystem.readFile(TestFixtures.path("tiny-qwen2/" + name)))
        }
        // A minimal byte-level vocabulary of 299 tokens (one made by a merge) and an end-of-text token.
        var vocab = JSONObject()
        for i in 0..<298 { vocab["t\(i)"] = .int(Int64(i)) }
        vocab["t1t2"] = .int(298)
        let tokenizer: JSONValue = .object(JSONObject([
            ("added_tokens", .array([.object(JSONObject([("id", .int(299)), ("content", .string("<|endoftext|>")), ("special", .bool(true)),
                                                         ("normalized", .bool(false))]))])),
            ("pre_tokenizer", .object(JSONObject([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("use_regex", .bool(true))]))),
            ("decoder", .object(JSONObject([("type", .string("ByteLevel"))]))),
            ("model", .object(JSONObject([("type", .string("BPE")), ("vocab", .object(vocab)), ("merges", .array([.string("t1 t2")]))]))),
        ]))
        try FileSystem.writeAtomically(dir + "/tokenizer.json", text: tokenizer.serialized(.init()))
        try FileSystem.writeAtomically(dir + "/tokenizer_config.json", text: #"{"eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}"#)
        let loaded = try ModelLoader.load(dir, quantization: .none)
        let out = dir + "/qwen2.gguf"
        let report = try GGUFExporter.export(model: loaded.model, directory: dir, type: .f16, to: out)
        XCTAssertEqual(report.architecture, "qwen2")
        let file = try GGUFFile(path: out)
        XCTAssertEqual(file["general.architecture"]?.string, "qwen2")
        XCTAssertEqual(file["qwen2.rope.freq_base"]?.double, 1_000_000)
        XCTAssertNil(file["qwen2.vocab_size"])
        XCTAssertNil(file.tensor("output.weight"))  // tied
        XCTAssertEqual(file["tokenizer.ggml.pre"]?.string, "gpt-2")
        XCTAssertEqual(file["tokenizer.ggml.eos_token_id"]?.int, 299)
        XCTAssertEqual(file["tokenizer.chat_template"]?.string, "{{ messages }}")
        let q = try XCTUnwrap(loaded.model.blocks[0].q)
        let bias = try XCTUnwrap(file.tensor("blk.0.attn_q.bias"))
        XCTAssertEqual(bias.type, .f32)
        XCTAssertEqual(try file.floats(bias), q.bias)
        let weight = try file.floats("blk.0.attn_q.weight"), expected = q.weight.values()
        for i in weight.indices { XCTAssertLessThanOrEqual(abs(weight[i] - expected[i]), abs(expected[i]) / 2048 + 6e-8) }
    }

    /// Our export of the tiny model next to what llama.cpp's convert_hf_to_gguf.py wrote for the same folder
    /// (Tests/Fixtures/gguf/tiny-llama-llamacpp-*.json, made by scripts/make_gguf_export_reference.sh): the same keys
    /// with the same value types and values, the same tensors with the same types and shapes. One difference is
    /// deliberate: the converter writes the tokenizer's 652 tokens for a model of 1000 rows (its tokenizer.json path
    /// does not pad), and llama.cpp then refuses its own file ("tensor 'token_embd.weight' has wrong shape; expected
    /// 128, 652, got 128, 1000"); we pad to the model's vocab_size with "[PAD<id>]" as its other vocabulary paths do.
    func testTheExportMatchesWhatLlamaCppsConverterWrites() throws {
        let dir = try Self.tinyLlamaFolder()
        for type in [GGUFExportType.f16, .q8_0] {
            let loaded = try ModelLoader.load(dir, quantization: .none)
            let out = dir + "/tiny-\(type.rawValue).gguf"
            try GGUFExporter.export(model: loaded.model, directory: dir, type: type, to: out, name: "Tiny Llama")
            let file = try GGUFFile(path: out)
            let reference = try JSONValue.parse(bytes: try FileSystem.readFile(TestFixtures.path("gguf/tiny-llama-llamacpp-\(type.rawValue).json")))
            let keys = try XCTUnwrap(reference["keys"]?.object)
            XCTAssertEqual(file.metadata.map(\.key).sorted(), keys.map(\.key).sorted(), "\(type)")
            for (key, ref) in keys {
                let ours = try XCTUnwrap(file[key], key)
                XCTAssertEqual("\(ours.type)".uppercased(), ref["type"]?.string, "\(type) \(key)")
                if let array = ours.array {
                    let count = try XCTUnwrap(ref["value"]?["count"]?.int)
                    if key.hasPrefix("tokenizer.ggml.") && [652].contains(count) {
                        XCTAssertEqual(array.count, 1000, "\(type) \(key): padded to vocab_size")
                    } else {
                        XCTAssertEqual(array.count, count, "\(type) \(key)")
                    }
                } else if let s = ours.string {
                    XCTAssertEqual(s, ref["value"]?.string, "\(type) \(key)")
                } else if let b = ours.bool {
                    XCTAssertEqual(b, ref["value"]?.bool, "\(type) \(key)")
                } else if let d = ours.double {
                    XCTAssertEqual(d, try XCTUnwrap(ref["value"]?.double), accuracy: abs(d) * 1e-7, "\(type) \(key)")
                } else {
                    XCTAssertEqual(ours.int, ref["value"]?.int, "\(type) \(key)")
                }
            }
            var expected: [String: (String, [Int])] = [:]
            for t in try XCTUnwrap(reference["tensors"]?.array) {
                expected[try XCTUnwrap(t["name"]?.string)] = (try XCTUnwrap(t["type"]?.string), try XCTUnwrap(t["shape"]?.array?.compactMap(\.int)))
            }
            XCTAssertEqual(Set(file.tensorNames), Set(expected.keys), "\(type)")
            for info in file.tensors {
                XCTAssertEqual(info.type.name, expected[info.name]?.0, "\(type) \(info.name)")
                XCTAssertEqual(info.dimensions, expected[info.name]?.1, "\(type) \(info.name)")
            }
        }
    }

    func testRefusalsNameTheProblem() throws {
        let dir = try Self.tinyLlamaFolder()
        XCTAssertThrowsError(try GGUFExporter.refuseOverwriting(dir + "/model.safetensors", inputs: [dir])) { error in
            XCTAssertTrue("\(error)".contains("--out"), "\(error)")
        }
        XCTAssertThrowsError(try GGUFExporter.refuseOverwriting(dir, inputs: [dir]))
        XCTAssertNoThrow(try GGUFExporter.refuseOverwriting(dir + "/new.gguf", inputs: [dir]))
        XCTAssertThrowsError(try GGUFExportType.parse("q3_k")) { error in XCTAssertTrue("\(error)".contains("--type"), "\(error)") }
        let bare = TestFixtures.path("tiny-llama/base")
        let loaded = try ModelLoader.load(bare, quantization: .none)
        XCTAssertThrowsError(try GGUFExporter.export(model: loaded.model, directory: bare, type: .f16, to: dir + "/x.gguf")) { error in
            XCTAssertTrue("\(error)".contains("tokenizer.json"), "\(error)")
        }
        XCTAssertFalse(FileSystem.exists(dir + "/x.gguf"))
    }
}

/// llama.cpp's own Python reader (the `gguf` package from PyPI) reads every file the export writes, and finds the
/// tensors and metadata our reader finds.
final class GGUFPyReaderTests: XCTestCase {
    static var packageRoot: String { String(TestFixtures.root.dropLast("/Tests/Fixtures".count)) }

    /// `.build/pydeps` holding the gguf package, installed with pip on first use; skips when pip cannot install it.
    static func pythonPath() throws -> String {
        let target = packageRoot + "/.build/pydeps"
        if !FileSystem.exists(target + "/gguf/__init__.py") {
            let rc = try Subprocess.run(["python3", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", target, "gguf"])
            guard rc == 0, FileSystem.exists(target + "/gguf/__init__.py") else {
                throw XCTSkip("pip could not install the gguf package into \(target) (exit \(rc); no network to PyPI?)")
            }
        }
        return target
    }

    /// One JSON summary per file from scripts/gguf_py_summary.py.
    static func summaries(_ files: [String]) throws -> [JSONValue] {
        let pythonPath = try pythonPath()
        let out = try TestFixtures.temporaryDirectory("gguf-py") + "/summary.jsonl"
        let quoted = files.map { "'\($0)'" }.joined(separator: " ")
        let rc = try Subprocess.run(["sh", "-c", "PYTHONPATH='\(pythonPath)' python3 '\(packageRoot)/scripts/gguf_py_summary.py' \(quoted) > '\(out)'"])
        XCTAssertEqual(rc, 0, "gguf-py failed to read \(files)")
        return try FileSystem.readText(out).split(separator: "\n").map { try JSONValue.parse(String($0)) }
    }

    func testTheGGUFPackageReadsEveryFileTheExportWrites() throws {
        var files: [String] = []
        let spm = try GGUFExportTests.tinyLlamaFolder()
        for type in GGUFExportType.allCases { files.append(try GGUFExportTests.export(spm, adapter: true, type: type).file.path) }
        let byteLevel = try GGUFExportTests.tinyLlamaFolder(tokenizer: "bytelevel-bpe/llama3", template: "llama-3.1.jinja")
        files.append(try GGUFExportTests.export(byteLevel, adapter: false, type: .q8_0).file.path)
        // A Q6_K tensor (the type q4_0 exports give a large output matrix) of values on several scales.
        let q6 = try TestFixtures.temporaryDirectory("gguf-q6k") + "/q6_k.gguf"
        var rng = SeededGenerator(seed: 0x6_6)
        var values = [Float](repeating: 0, count: 4 * 256)
        for i in values.indices where i % 256 >= 16 {
            let scale = Float(1 + i / 256)
            values[i] = Float.random(in: -1...1, using: &rng) * scale
        }
        // And Q4_K and Q5_K tensors of the same values (the bulk of q4_k_m / q5_k_m exports with rows of 256).
        try GGUFWriter.write(metadata: [("general.architecture", .string("llama"))],
                             tensors: [GGMLType.q6_K, .q4_K, .q5_K].map { GGUFTensorRecord(name: "x.\($0.name)", floats: values, dimensions: [512, 2], type: $0) },
                             to: q6)
        files.append(q6)
        let summaries = try Self.summaries(files)
        XCTAssertEqual(summaries.count, files.count)
        for (path, summary) in zip(files, summaries) {
            let ours = try GGUFFile(path: path)
            let keys = try XCTUnwrap(summary["keys"]?.object)
            XCTAssertEqual(Set(keys.map(\.key)), Set(ours.metadata.map(\.key)), path)
            for (key, value) in ours.metadata {
                XCTAssertEqual(keys[key]?["type"]?.string, "\(value.type)".uppercased(), "\(path): \(key)")
                if let s = value.string { XCTAssertEqual(keys[key]?["value"]?.string, s, "\(path): \(key)") }
                if let i = value.int { XCTAssertEqual(keys[key]?["value"]?.int, i, "\(path): \(key)") }
                if let a = value.array { XCTAssertEqual(keys[key]?["value"]?["count"]?.int, a.count, "\(path): \(key)") }
            }
            try Self.assertTensorsAgree(ours, summary, path, checkSums: true)
        }
    }

    /// The `gguf` package's summary of a file (tensor names, types, shapes, sums) against what our reader gives.
    static func assertTensorsAgree(_ ours: GGUFFile, _ summary: JSONValue, _ path: String, checkSums: Bool) throws {
        let tensors = try XCTUnwrap(summary["tensors"]?.array)
        XCTAssertEqual(tensors.compactMap { $0["name"]?.string }, ours.tensorNames, path)
        for t in tensors {
            let info = try XCTUnwrap(ours.tensor(try XCTUnwrap(t["name"]?.string)))
            XCTAssertEqual(t["type"]?.string, info.type.name, info.name)
            XCTAssertEqual(t["shape"]?.array?.compactMap(\.int), info.dimensions, info.name)
            let values = try ours.floats(info).map(Double.init)
            let sumsq = values.reduce(0) { $0 + $1 * $1 }
            XCTAssertEqual(try XCTUnwrap(t["sumsq"]?.double), sumsq, accuracy: 1e-9 * max(1, sumsq), info.name)
            if checkSums {
                XCTAssertEqual(try XCTUnwrap(t["sum"]?.double), values.reduce(0, +), accuracy: 1e-6 * max(1, sumsq.squareRoot()), info.name)
            }
        }
    }
}

/// llama.cpp itself runs our exports, when it has been built here (scripts/build_llamacpp.sh: libllama and
/// scripts/llamacpp_judge.c in .build/llama.cpp; building it takes minutes, so the suite does not). Runs the tiny
/// fixture's parts of scripts/check_gguf_llamacpp.py: every export type's logits against transformers', and the LoRA
/// GGUF applied by llama.cpp over the base against the merged model. Skips, saying so, when llama.cpp is not built.
final class LlamaCppJudgeTests: XCTestCase {
    /// Runs scripts/check_gguf_llamacpp.py's `parts`; skips, saying why, when llama.cpp, qlora or numpy is missing.
    func judge(_ parts: [String]) throws {
        let root = GGUFPyReaderTests.packageRoot
        let judge = root + "/.build/llama.cpp/llamacpp_judge"
        guard FileSystem.exists(judge) else {
            throw XCTSkip("llama.cpp is not built here (\(judge) is missing): run scripts/build_llamacpp.sh to check the exports with llama.cpp")
        }
        let qlora = root + "/.build/release/qlora"
        guard FileSystem.exists(qlora) else { throw XCTSkip("\(qlora) is not built (swift build -c release)") }
        guard try Subprocess.run(["python3", "-c", "import numpy"]) == 0 else { throw XCTSkip("python3 has no numpy") }
        let rc = try Subprocess.run(["env", "QLORA=\(qlora)", "python3", root + "/scripts/check_gguf_llamacpp.py"] + parts)
        XCTAssertEqual(rc, 0, "scripts/check_gguf_llamacpp.py \(parts.joined(separator: " ")) failed: llama.cpp disagrees with the exports (run it to see which)")
    }

    func testLlamaCppRunsTheTinyExportsAndTheLoRAGGUF() throws {
        try judge(["tiny", "lora"])
    }

    /// The family fixtures (Qwen3, Mistral, Gemma 2, Gemma 3 text and multimodal, Phi-3 and Phi-3 longrope) as f16 and
    /// q8_0 GGUFs, merged with their adapter, and with the adapter as a LoRA GGUF, against transformers' logits.
    func testLlamaCppRunsTheFamilyExportsAndTheirLoRAGGUFs() throws {
        try judge(["families"])
    }
}
