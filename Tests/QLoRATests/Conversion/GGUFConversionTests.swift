import XCTest
@testable import QLoRA

/// GGUF → HF folder conversion on small synthetic llama files.
final class GGUFConversionTests: XCTestCase {
    // A tiny llama: hidden 64, 4 heads of 16, 2 KV heads, intermediate 96, 2 layers, vocab 40.
    static let hidden = 64, heads = 4, kvHeads = 2, headDim = 16, intermediate = 96, layers = 2, vocab = 40

    /// Deterministic pseudo-random values that are exact in bf16 (so the bf16 output can be compared exactly).
    static func values(_ count: Int, seed: Int) -> [Float] {
        (0..<count).map { i in roundToBF16(Float((i * 7919 + seed * 104_729) % 2001 - 1000) / 512) }
    }

    /// llama.cpp's row permutation, written out independently of the library:
    /// gguf[h][b][a] = hf[h][a][b] for a row index split as (head, half, position).
    static func llamaCppPermute(_ w: [Float], heads: Int, rows: Int, cols: Int) -> [Float] {
        let d = rows / heads
        var out = w
        for h in 0..<heads {
            for a in 0..<2 {
                for b in 0..<(d / 2) {
                    let src = h * d + a * (d / 2) + b, dst = h * d + b * 2 + a
                    for c in 0..<cols { out[dst * cols + c] = w[src * cols + c] }
                }
            }
        }
        return out
    }

    struct TinyModel {
        var gguf: [UInt8]
        /// HF name → (shape, values) of what the converter should produce.
        var expected: [String: ([Int], [Float])]
    }

    static let tokens: [String] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"]
        + ["a", "b", "c", "Ġ", "ab", "Ġa", "abc"] + (0..<29).map { "t\($0)" }
    static let merges = ["a b", "Ġ a", "ab c"]

    static func tinyModel(untied: Bool = true, ropeTheta: Float = 10000, extraMetadata: [(key: String, value: GGUFValue)] = [],
                          extraTensors: [GGUFTensorRecord] = []) throws -> TinyModel {
        var tensors: [GGUFTensorRecord] = []
        var expected: [String: ([Int], [Float])] = [:]
        var seed = 1
        func add(_ gguf: String, _ hf: String, rows: Int, cols: Int, permuteHeads: Int? = nil, type: GGMLType = .f32) {
            seed += 1
            let hfValues = values(rows * cols, seed: seed)
            var stored = hfValues
            if let h = permuteHeads { stored = llamaCppPermute(hfValues, heads: h, rows: rows, cols: cols) }
            let dims = rows == 1 ? [cols] : [cols, rows]
            tensors.append(GGUFTensorRecord(name: gguf, floats: stored, dimensions: dims, type: type))
            expected[hf] = (rows == 1 ? [cols] : [rows, cols], hfValues)
        }
        add("token_embd.weight", "model.embed_tokens.weight", rows: vocab, cols: hidden, type: .bf16)
        for l in 0..<layers {
            let p = "model.layers.\(l)."
            add("blk.\(l).attn_norm.weight", p + "input_layernorm.weight", rows: 1, cols: hidden)
            add("blk.\(l).attn_q.weight", p + "self_attn.q_proj.weight", rows: heads * headDim, cols: hidden, permuteHeads: heads)
            add("blk.\(l).attn_k.weight", p + "self_attn.k_proj.weight", rows: kvHeads * headDim, cols: hidden, permuteHeads: kvHeads, type: .f16)
            add("blk.\(l).attn_v.weight", p + "self_attn.v_proj.weight", rows: kvHeads * headDim, cols: hidden)
            add("blk.\(l).attn_output.weight", p + "self_attn.o_proj.weight", rows: hidden, cols: heads * headDim)
            add("blk.\(l).ffn_norm.weight", p + "post_attention_layernorm.weight", rows: 1, cols: hidden)
            add("blk.\(l).ffn_gate.weight", p + "mlp.gate_proj.weight", rows: intermediate, cols: hidden)
            add("blk.\(l).ffn_up.weight", p + "mlp.up_proj.weight", rows: intermediate, cols: hidden)
            add("blk.\(l).ffn_down.weight", p + "mlp.down_proj.weight", rows: hidden, cols: intermediate)
        }
        add("output_norm.weight", "model.norm.weight", rows: 1, cols: hidden)
        if untied { add("output.weight", "lm_head.weight", rows: vocab, cols: hidden) }
        var types = [GGUFValue](repeating: .int32(1), count: tokens.count)
        for i in 0..<3 { types[i] = .int32(3) }
        types[3] = .int32(4)
        let metadata: [(key: String, value: GGUFValue)] = [
            ("general.architecture", .string("llama")),
            ("general.name", .string("tiny")),
            ("llama.block_count", .uint32(UInt32(layers))),
            ("llama.context_length", .uint32(2048)),
            ("llama.embedding_length", .uint32(UInt32(hidden))),
            ("llama.feed_forward_length", .uint32(UInt32(intermediate))),
            ("llama.attention.head_count", .uint32(UInt32(heads))),
            ("llama.attention.head_count_kv", .uint32(UInt32(kvHeads))),
            ("llama.rope.freq_base", .float32(ropeTheta)),
            ("llama.attention.layer_norm_rms_epsilon", .float32(1e-5)),
            ("llama.vocab_size", .uint32(UInt32(vocab))),
            ("tokenizer.ggml.model", .string("gpt2")),
            ("tokenizer.ggml.pre", .string("smollm")),
            ("tokenizer.ggml.tokens", .array(.string, tokens.map { .string($0) })),
            ("tokenizer.ggml.token_type", .array(.int32, types)),
            ("tokenizer.ggml.merges", .array(.string, merges.map { .string($0) })),
            ("tokenizer.ggml.bos_token_id", .uint32(1)),
            ("tokenizer.ggml.eos_token_id", .uint32(2)),
            ("tokenizer.ggml.unknown_token_id", .uint32(0)),
            ("tokenizer.ggml.padding_token_id", .uint32(2)),
            ("tokenizer.ggml.add_bos_token", .bool(false)),
            ("tokenizer.chat_template", .string("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>\n{% endfor %}")),
        ] + extraMetadata
        return TinyModel(gguf: try GGUFWriter.serialize(metadata: metadata, tensors: tensors + extraTensors), expected: expected)
    }

    private func convert(_ model: TinyModel) throws -> String {
        let dir = try TestFixtures.temporaryDirectory()
        try FileSystem.writeAtomically(dir + "/tiny.gguf", bytes: model.gguf)
        try GGUFConverter.convert(gguf: dir + "/tiny.gguf", to: dir + "/hf")
        return dir + "/hf"
    }

    private func json(_ path: String) throws -> JSONValue { try JSONValue.parse(bytes: FileSystem.readFile(path)) }

    // MARK: - Tests

    func testTensorsAreRenamedUnpermutedAndBF16() throws {
        let model = try Self.tinyModel()
        let folder = try convert(model)
        let st = try SafeTensorsFile(path: folder + "/model.safetensors")
        XCTAssertEqual(Set(st.names), Set(model.expected.keys))
        XCTAssertEqual(st.names.count, 2 + Self.layers * 9 + 1)
        for (name, (shape, values)) in model.expected {
            let info = try XCTUnwrap(st.info(name), name)
            XCTAssertEqual(info.dtype, .bf16, name)
            XCTAssertEqual(info.shape, shape, name)
            XCTAssertEqual(try st.floats(name), values, name)
        }
    }

    func testConfigJSON() throws {
        let folder = try convert(try Self.tinyModel())
        let config = try json(folder + "/config.json")
        XCTAssertEqual(config["architectures"], .array([.string("LlamaForCausalLM")]))
        XCTAssertEqual(config["model_type"]?.string, "llama")
        XCTAssertEqual(config["hidden_size"]?.int, Self.hidden)
        XCTAssertEqual(config["intermediate_size"]?.int, Self.intermediate)
        XCTAssertEqual(config["num_hidden_layers"]?.int, Self.layers)
        XCTAssertEqual(config["num_attention_heads"]?.int, Self.heads)
        XCTAssertEqual(config["num_key_value_heads"]?.int, Self.kvHeads)
        XCTAssertEqual(config["head_dim"]?.int, Self.headDim)
        XCTAssertEqual(config["max_position_embeddings"]?.int, 2048)
        XCTAssertEqual(config["vocab_size"]?.int, Self.vocab)
        XCTAssertEqual(config["rms_norm_eps"]?.double, Double(Float(1e-5)))
        XCTAssertEqual(config["rope_parameters"], .object(JSONObject([("rope_theta", .double(10000)), ("rope_type", .string("default"))])))
        XCTAssertEqual(config["tie_word_embeddings"]?.bool, false)
        XCTAssertEqual(config["bos_token_id"]?.int, 1)
        XCTAssertEqual(config["eos_token_id"]?.int, 2)
        XCTAssertEqual(config["pad_token_id"]?.int, 2)
        XCTAssertEqual(config["dtype"]?.string, "bfloat16")
        let generation = try json(folder + "/generation_config.json")
        XCTAssertEqual(generation["eos_token_id"]?.int, 2)
        XCTAssertEqual(generation["bos_token_id"]?.int, 1)
    }

    func testTiedEmbeddingsWhenThereIsNoOutputWeight() throws {
        let model = try Self.tinyModel(untied: false)
        let folder = try convert(model)
        XCTAssertEqual(try json(folder + "/config.json")["tie_word_embeddings"]?.bool, true)
        XCTAssertNil(try SafeTensorsFile(path: folder + "/model.safetensors").info("lm_head.weight"))
    }

    func testTokenizerFiles() throws {
        let folder = try convert(try Self.tinyModel())
        let tokenizer = try json(folder + "/tokenizer.json")
        let model = try XCTUnwrap(tokenizer["model"])
        XCTAssertEqual(model["type"]?.string, "BPE")
        let vocab = try XCTUnwrap(model["vocab"]?.object)
        XCTAssertEqual(vocab.keys, Self.tokens)
        XCTAssertEqual(vocab["abc"]?.int, 10)
        XCTAssertEqual(model["merges"], .array([.array([.string("a"), .string("b")]), .array([.string("Ġ"), .string("a")]),
                                                 .array([.string("ab"), .string("c")])]))
        let added = try XCTUnwrap(tokenizer["added_tokens"]?.array)
        XCTAssertEqual(added.compactMap { $0["content"]?.string }, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"])
        XCTAssertEqual(added.compactMap { $0["special"]?.bool }, [true, true, true, false])
        XCTAssertEqual(tokenizer["pre_tokenizer"]?["type"]?.string, "ByteLevel")
        XCTAssertEqual(tokenizer["decoder"]?["type"]?.string, "ByteLevel")
        XCTAssertEqual(tokenizer["post_processor"]?["single"], .array([.object(JSONObject([("Sequence", .object(JSONObject([("id", .string("A")), ("type_id", .int(0))])))]))]))

        let config = try json(folder + "/tokenizer_config.json")
        XCTAssertEqual(config["bos_token"]?.string, "<|im_start|>")
        XCTAssertEqual(config["eos_token"]?.string, "<|im_end|>")
        XCTAssertEqual(config["pad_token"]?.string, "<|im_end|>")
        XCTAssertEqual(config["unk_token"]?.string, "<|endoftext|>")
        let template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>\n{% endfor %}"
        XCTAssertEqual(config["chat_template"]?.string, template)
        XCTAssertEqual(try FileSystem.readText(folder + "/chat_template.jinja"), template)
    }

    func testAddBOSTokenGivesATemplateWithBOS() throws {
        let folder = try convert(try Self.tinyModel(extraMetadata: [("tokenizer.ggml.add_eos_token", .bool(true))]))
        let post = try XCTUnwrap(try json(folder + "/tokenizer.json")["post_processor"])
        XCTAssertEqual(post["single"]?.array?.count, 2)  // $A, then EOS
        XCTAssertEqual(post["special_tokens"]?["<|im_end|>"]?["ids"], .array([.int(2)]))
    }

    func testLlama3RopeScalingIsRecoveredFromRopeFreqs() throws {
        let scaling = LlamaRopeScaling(factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalContext: 8192)
        let factors = scaling.divisors(theta: 500_000, headDim: Self.headDim).map { Float($0) }
        XCTAssertTrue(factors.contains(1) && factors.contains(8), "the test should span both ends: \(factors)")
        let model = try Self.tinyModel(ropeTheta: 500_000,
                                       extraTensors: [GGUFTensorRecord(name: "rope_freqs.weight", floats: factors, dimensions: [Self.headDim / 2])])
        let folder = try convert(model)
        let config = try json(folder + "/config.json")
        XCTAssertEqual(config["rope_parameters"], .object(JSONObject([
            ("factor", .double(8)), ("high_freq_factor", .double(4)), ("low_freq_factor", .double(1)),
            ("original_max_position_embeddings", .int(8192)), ("rope_theta", .double(500_000)), ("rope_type", .string("llama3")),
        ])))
        XCTAssertNil(try SafeTensorsFile(path: folder + "/model.safetensors").info("rope_freqs.weight"))
    }

    func testSentencePieceTokenizer() throws {
        // A llama (SentencePiece) vocabulary: merges come from the scores of the merged pieces.
        let tokens = ["<unk>", "<s>", "</s>", "<0x41>", "▁", "a", "b", "▁a", "ab", "▁ab"]
        let scores: [Float] = [0, 0, 0, 0, -1, -2, -3, -4, -5, -6]
        let types: [Int32] = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1]
        let model = try Self.tinyModel()
        let metadata = try metadataOf(model.gguf).filter { !$0.key.hasPrefix("tokenizer.") && $0.key != "llama.vocab_size" } + [
            ("tokenizer.ggml.model", .string("llama")),
            ("tokenizer.ggml.tokens", .array(.string, tokens.map { .string($0) })),
            ("tokenizer.ggml.scores", .array(.float32, scores.map { .float32($0) })),
            ("tokenizer.ggml.token_type", .array(.int32, types.map { .int32($0) })),
            ("tokenizer.ggml.bos_token_id", .uint32(1)), ("tokenizer.ggml.eos_token_id", .uint32(2)),
            ("tokenizer.ggml.unknown_token_id", .uint32(0)),
            ("llama.vocab_size", .uint32(UInt32(Self.vocab))),
        ]
        let export = try GGUFTokenizerExport(try GGUFFile(unsafeBytes: try keep(GGUFWriter.serialize(metadata: metadata, tensors: [])), name: "sp"))
        let json = export.tokenizerJSON
        XCTAssertEqual(json["model"]?["byte_fallback"]?.bool, true)
        XCTAssertEqual(json["model"]?["unk_token"]?.string, "<unk>")
        // "▁a" (score −4) first, then "ab" (−5), then "▁ab" = "▁"+"ab" and "▁a"+"b" (−6, by left id).
        XCTAssertEqual(json["model"]?["merges"], .array([["▁", "a"], ["a", "b"], ["▁", "ab"], ["▁a", "b"]].map { .array($0.map { .string($0) }) }))
        XCTAssertEqual(json["added_tokens"]?.array?.compactMap { $0["content"]?.string }, ["<unk>", "<s>", "</s>"])
        XCTAssertEqual(json["post_processor"]?["single"]?.array?.count, 2)  // BOS, $A (add_bos_token defaults to true)
        XCTAssertEqual(json["normalizer"]?["type"]?.string, "Sequence")
        XCTAssertEqual(export.tokenizerConfigJSON["add_bos_token"]?.bool, true)
    }

    func testErrorsNameThePlace() throws {
        let model = try Self.tinyModel()
        // Not llama.
        let qwen = try GGUFWriter.serialize(metadata: try metadataOf(model.gguf).map {
            $0.key == "general.architecture" ? ($0.key, .string("qwen2")) : $0 }, tensors: [])
        XCTAssertThrowsError(try convert(TinyModel(gguf: qwen, expected: [:]))) { error in
            XCTAssertTrue("\(error)".contains("metadata key 0 'general.architecture'") && "\(error)".contains("qwen2"), "\(error)")
        }
        // An unknown tensor.
        let extra = try Self.tinyModel(extraTensors: [GGUFTensorRecord(name: "blk.0.attn_qkv.weight", floats: [1], dimensions: [1])])
        XCTAssertThrowsError(try convert(extra)) { error in
            XCTAssertTrue("\(error)".contains("tensor 'blk.0.attn_qkv.weight'"), "\(error)")
        }
        // A missing hyper-parameter.
        let noHeads = try GGUFWriter.serialize(metadata: try metadataOf(model.gguf).filter { $0.key != "llama.attention.head_count" }, tensors: [])
        XCTAssertThrowsError(try convert(TinyModel(gguf: noHeads, expected: [:]))) { error in
            XCTAssertTrue("\(error)".contains("llama.attention.head_count"), "\(error)")
        }
    }

    /// The catalog's cache logic without the network: a GGUF already unpacked where pip's would be.
    func testCatalogFetchUsesTheCacheAndRedoesStaleFolders() throws {
        let root = try TestFixtures.temporaryDirectory()
        let entry = try XCTUnwrap(ModelCatalog.entry("smollm2-135m"))
        let gguf = root + "/downloads/smollm2-135m/" + entry.ggufMember
        try FileSystem.createDirectory(String(gguf[..<gguf.lastIndex(of: "/")!]))
        try FileSystem.writeAtomically(gguf, bytes: try Self.tinyModel().gguf)
        try FileSystem.writeAtomically(gguf + ".ok", text: "\n")
        XCTAssertFalse(ModelCatalog.isComplete("smollm2-135m", cache: root))

        let folder = try ModelCatalog.fetch("smollm2-135m", cache: root, python: "/nonexistent/python")
        XCTAssertEqual(folder, root + "/smollm2-135m")
        XCTAssertTrue(ModelCatalog.isComplete("smollm2-135m", cache: root))
        XCTAssertEqual(try json(folder + "/config.json")["hidden_size"]?.int, Self.hidden)
        XCTAssertEqual(try ModelCatalog.resolve("smollm2-135m", cache: root), folder)

        // Complete: nothing is redone (a deleted file stays deleted).
        FileSystem.remove(folder + "/generation_config.json")
        _ = try ModelCatalog.fetch("smollm2-135m", cache: root)
        XCTAssertFalse(FileSystem.exists(folder + "/generation_config.json"))
        // A marker from another converter version: converted again.
        try FileSystem.writeAtomically(folder + "/" + ModelCatalog.completeMarker, text: "converter 0\n")
        XCTAssertFalse(ModelCatalog.isComplete("smollm2-135m", cache: root))
        _ = try ModelCatalog.fetch("smollm2-135m", cache: root)
        XCTAssertTrue(FileSystem.exists(folder + "/generation_config.json"))

        XCTAssertThrowsError(try ModelCatalog.fetch("no-such-model", cache: root)) { error in
            XCTAssertTrue("\(error)".contains("smollm2-135m"), "the error lists the known names: \(error)")
        }
    }

    func testPermuteAndUnpermuteAreInverse() {
        let w = Self.values(4 * 16 * 3, seed: 9)
        let p = GGUFConverter.permuteRotaryRows(w, heads: 4, headDim: 16, columns: 3)
        XCTAssertEqual(p, Self.llamaCppPermute(w, heads: 4, rows: 64, cols: 3))
        XCTAssertNotEqual(p, w)
        XCTAssertEqual(GGUFConverter.unpermuteRotaryRows(p, heads: 4, headDim: 16, columns: 3), w)
    }

    // MARK: - Helpers

    /// Keeps bytes alive for the test and returns a pointer to them.
    private func keep(_ bytes: [UInt8]) -> UnsafeRawBufferPointer {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 64)
        buffer.copyBytes(from: bytes)
        pointers.append(buffer)
        return UnsafeRawBufferPointer(buffer)
    }
    private var pointers: [UnsafeMutableRawBufferPointer] = []
    override func tearDown() { for p in pointers { p.deallocate() }; pointers.removeAll() }

    private func metadataOf(_ bytes: [UInt8]) throws -> [(key: String, value: GGUFValue)] {
        try GGUFFile(unsafeBytes: keep(bytes), name: "m").metadata
    }

    private func tensorsOf(_ bytes: [UInt8]) throws -> [GGUFTensorRecord] {
        let file = try GGUFFile(unsafeBytes: keep(bytes), name: "m")
        return file.tensors.map { GGUFTensorRecord(name: $0.name, type: $0.type, dimensions: $0.dimensions, data: Array(file.bytes($0))) }
    }
}
