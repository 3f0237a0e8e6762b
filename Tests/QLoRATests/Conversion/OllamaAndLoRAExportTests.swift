import XCTest
@testable import QLoRA

/// `qlora export --ollama` (the Modelfile beside the GGUF) and `qlora export --format gguf-lora` (the adapter alone as a
/// llama.cpp LoRA GGUF).
final class OllamaModelfileTests: XCTestCase {
    static let header = """
        # Ollama Modelfile written by `qlora export --ollama`; create the model with: ollama create NAME -f Modelfile
        # Ollama reads the chat template (tokenizer.chat_template) from the GGUF and uses its own Go-template form of it
        # when it recognises it as one of its built-in templates; otherwise it uses the bare prompt ({{ .Prompt }}).

        """

    func testTheSmolLM2ChatMLTokenizerGetsTheGoTemplateAndImEndAsStop() throws {
        let text = try OllamaModelfile.text(directory: TestFixtures.path("smollm2-tokenizer"), ggufFileName: "smollm2.gguf")
        XCTAssertEqual(text, Self.header + """
            # The chat template is ChatML, written out below so that Ollama does not depend on recognising it.
            FROM ./smollm2.gguf
            TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}
            {{ .Content }}<|im_end|>
            {{ end }}<|im_start|>assistant
            \"\"\"
            PARAMETER stop "<|im_end|>"

            """)
    }

    func testTheTinyFixtureGetsItsEOSAsStopAndNoTemplate() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()  // SentencePiece tokenizer, Llama 2 template (not ChatML or Llama 3)
        let out = try TestFixtures.temporaryDirectory("ollama-out") + "/model.gguf"
        let path = try OllamaModelfile.write(besides: out, directory: dir, inputs: [dir])
        XCTAssertEqual(path, String(out.dropLast("model.gguf".count)) + "Modelfile")
        XCTAssertEqual(try FileSystem.readText(path), Self.header + """
            FROM ./model.gguf
            PARAMETER stop "</s>"

            """)
        // Without a chat template, with a second eos id from generation_config.json.
        let bare = try GGUFExportTests.tinyLlamaFolder(template: nil)
        try FileSystem.writeAtomically(bare + "/generation_config.json", text: #"{"eos_token_id": [2, 650]}"#)
        XCTAssertEqual(try OllamaModelfile.text(directory: bare, ggufFileName: "a b.gguf"), Self.header + """
            # The model folder has no chat template.
            FROM "./a b.gguf"
            PARAMETER stop "</s>"
            PARAMETER stop "<|user|>"

            """)
    }

    func testQuotingAndRefusals() throws {
        XCTAssertEqual(try OllamaModelfile.quoted("<|eot_id|>", what: "x"), "\"<|eot_id|>\"")
        XCTAssertEqual(try OllamaModelfile.quoted("say \"hi\" now", what: "x"), "\"\"\"say \"hi\" now\"\"\"")
        XCTAssertEqual(try OllamaModelfile.quoted("a\nb", what: "x"), "\"\"\"a\nb\"\"\"")
        XCTAssertThrowsError(try OllamaModelfile.quoted("\"end", what: "stop token")) { XCTAssertTrue("\($0)".contains("stop token"), "\($0)") }
        XCTAssertThrowsError(try OllamaModelfile.quoted("a\"\"\"b", what: "x"))
        XCTAssertEqual(try OllamaModelfile.path(besides: "out/m.gguf"), "out/Modelfile")
        XCTAssertEqual(try OllamaModelfile.path(besides: "m.gguf"), "Modelfile")
        XCTAssertThrowsError(try OllamaModelfile.path(besides: "out/Modelfile")) { XCTAssertTrue("\($0)".contains("--out"), "\($0)") }
        // A Modelfile that is an input (here: inside the model folder) is never overwritten.
        let dir = try GGUFExportTests.tinyLlamaFolder()
        try FileSystem.writeAtomically(dir + "/Modelfile", text: "FROM ./original.gguf\n")
        XCTAssertThrowsError(try OllamaModelfile.write(besides: dir + "/new.gguf", directory: dir, inputs: [dir])) { error in
            XCTAssertTrue("\(error)".contains("--ollama's Modelfile"), "\(error)")
        }
        XCTAssertEqual(try FileSystem.readText(dir + "/Modelfile"), "FROM ./original.gguf\n")
        XCTAssertThrowsError(try OllamaModelfile.text(directory: TestFixtures.path("tiny-llama/base"), ggufFileName: "m.gguf")) { error in
            XCTAssertTrue("\(error)".contains("tokenizer.json"), "\(error)")
        }
    }
}

/// What can be checked of the Modelfile without Ollama (which is neither on PyPI, where `ollama` is only the HTTP
/// client, nor in Debian): the Go templates we write, evaluated here, give Ollama's own rendering of its built-in
/// ChatML and Llama 3 templates on the conversation of Ollama's template tests (template/testdata/chatml.gotmpl and
/// llama3-instruct.gotmpl, "system-user-assistant-user", in github.com/ollama/ollama), and the model's own Jinja chat
/// template renders the same text; the FROM path is the GGUF written beside the Modelfile, and every stop string is a
/// control token of that GGUF's vocabulary.
final class OllamaModelfileRenderingTests: XCTestCase {
    static let conversation: [(role: String, content: String)] = [
        ("system", "You are a helpful assistant."), ("user", "Hello, how are you?"),
        ("assistant", "I'm doing great. How can I help you today?"), ("user", "I'd like to show off how chat templating works!"),
    ]

    /// Ollama's rendering of the conversation (its testdata files).
    static let ollamaChatML = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n<|im_start|>assistant\n"
    static let ollamaLlama3 = "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

    /// Go's text/template for the subset we write: text, {{ .Role }} / {{ .Content }} inside {{ range .Messages }}…
    /// {{ end }}, and the "{{-" / "-}}" markers that trim the white space before / after them.
    static func renderGoTemplate(_ template: String, _ messages: [(role: String, content: String)]) throws -> String {
        enum Piece { case text(String), field(String), range, end }
        var pieces: [Piece] = []
        var rest = Substring(template)
        var trimNext = false
        while !rest.isEmpty {
            guard let open = rest.range(of: "{{") else {
                pieces.append(.text(trimNext ? String(rest.drop { $0.isWhitespace }) : String(rest)))
                break
            }
            var text = String(rest[..<open.lowerBound])
            if trimNext { text = String(text.drop { $0.isWhitespace }) }
            var action = rest[open.upperBound...]
            let close = try XCTUnwrap(action.range(of: "}}"), "unclosed action")
            var inside = action[..<close.lowerBound]
            action = action[close.upperBound...]
            if inside.hasPrefix("-") { text = String(text.reversed().drop { $0.isWhitespace }.reversed()); inside = inside.dropFirst() }
            trimNext = inside.hasSuffix("-")
            if trimNext { inside = inside.dropLast() }
            pieces.append(.text(text))
            switch inside.trimmingCharacters(in: .whitespaces) {
            case "range .Messages": pieces.append(.range)
            case "end": pieces.append(.end)
            case ".Role": pieces.append(.field("Role"))
            case ".Content": pieces.append(.field("Content"))
            case let other: XCTFail("action {{\(other)}} is outside the subset"); return ""
            }
            rest = action
        }
        var out = ""
        var i = 0
        while i < pieces.count {
            switch pieces[i] {
            case .text(let t): out += t
            case .range:
                let body = pieces[(i + 1)...].prefix { if case .end = $0 { return false }; return true }
                for m in messages {
                    for p in body {
                        switch p {
                        case .text(let t): out += t
                        case .field(let f): out += f == "Role" ? m.role : m.content
                        default: break
                        }
                    }
                }
                i += body.count + 1
            case .field, .end: XCTFail("a field outside range")
            }
            i += 1
        }
        return out
    }

    func testTheGoTemplatesRenderAsOllamasBuiltInsAndAsTheJinjaTemplates() throws {
        XCTAssertEqual(try Self.renderGoTemplate(OllamaModelfile.chatMLTemplate, Self.conversation), Self.ollamaChatML)
        XCTAssertEqual(try Self.renderGoTemplate(OllamaModelfile.llama3Template, Self.conversation), Self.ollamaLlama3)
        let messages: [JSONValue] = Self.conversation.map { .object(JSONObject([("role", .string($0.role)), ("content", .string($0.content))])) }
        let smollm2 = try XCTUnwrap(try ChatTemplate.load(directory: TestFixtures.path("smollm2-tokenizer")))
        XCTAssertEqual(try smollm2.render(messages: messages, addGenerationPrompt: true, bosToken: nil, eosToken: nil), Self.ollamaChatML)
        // Llama 3's template starts with bos_token, which llama.cpp adds when it tokenizes (add_bos_token).
        let llama3 = try ChatTemplate(source: try FileSystem.readText(TestFixtures.path("chat-templates/llama-3.jinja")))
        XCTAssertEqual(try llama3.render(messages: messages, addGenerationPrompt: true, bosToken: "", eosToken: nil), Self.ollamaLlama3)
    }

    func testFromNamesTheGGUFBesideItAndEveryStopIsAControlTokenOfIt() throws {
        // The tiny model with a byte-level vocabulary that has ChatML's special tokens, and SmolLM2's template.
        let tiny = try GGUFExportTests.tinyLlamaFolder(tokenizer: "bytelevel-bpe/llama3", template: "smollm2.jinja")
        var tokenizer = try XCTUnwrap(JSONValue.parse(bytes: try FileSystem.readFile(tiny + "/tokenizer.json")).object)
        var added = try XCTUnwrap(tokenizer["added_tokens"]?.array)
        for (id, content) in [(990, "<|im_start|>"), (991, "<|im_end|>")] {
            added.append(.object(JSONObject([("id", .int(Int64(id))), ("content", .string(content)), ("special", .bool(true)),
                                             ("normalized", .bool(false))])))
        }
        tokenizer["added_tokens"] = .array(added)
        try FileSystem.writeAtomically(tiny + "/tokenizer.json", text: JSONValue.object(tokenizer).serialized(.init()))
        try FileSystem.writeAtomically(tiny + "/tokenizer_config.json", text: #"{"eos_token": "<|im_end|>"}"#)
        var config = try XCTUnwrap(JSONValue.parse(bytes: try FileSystem.readFile(tiny + "/config.json")).object)
        config["eos_token_id"] = .int(991)
        try FileSystem.writeAtomically(tiny + "/config.json", text: JSONValue.object(config).serialized(.init()))
        FileSystem.remove(tiny + "/generation_config.json")

        let dir = try TestFixtures.temporaryDirectory("ollama-from") + "/out"
        try FileSystem.createDirectory(dir)
        let out = dir + "/model.gguf"
        try GGUFExporter.export(model: try ModelLoader.load(tiny, quantization: .none).model, directory: tiny, type: .q8_0, to: out)
        let path = try OllamaModelfile.write(besides: out, directory: tiny, inputs: [tiny])
        let text = try FileSystem.readText(path)
        let lines = text.split(separator: "\n").map(String.init)
        let from = try XCTUnwrap(lines.first { $0.hasPrefix("FROM ") })
        XCTAssertEqual(from, "FROM ./model.gguf")
        let gguf = try GGUFFile(path: dir + "/" + String(from.dropFirst("FROM ./".count)))
        let tokens = try XCTUnwrap(gguf["tokenizer.ggml.tokens"]?.strings), types = try XCTUnwrap(gguf["tokenizer.ggml.token_type"]?.ints)
        let stops = lines.filter { $0.hasPrefix("PARAMETER stop ") }.map { String($0.dropFirst("PARAMETER stop ".count).dropFirst().dropLast()) }
        XCTAssertFalse(stops.isEmpty)
        for stop in stops {
            let id = try XCTUnwrap(tokens.firstIndex(of: stop), stop)
            XCTAssertEqual(types[id], 3, "\(stop) is a control token")
        }
        XCTAssertEqual(stops, ["<|im_end|>"])
        XCTAssertTrue(text.contains("TEMPLATE \"\"\"" + OllamaModelfile.chatMLTemplate + "\"\"\""), text)
        XCTAssertEqual(gguf["tokenizer.chat_template"]?.string, try FileSystem.readText(TestFixtures.path("chat-templates/smollm2.jinja")))
        // Every line is a Modelfile instruction Ollama's parser knows (or a comment), outside the template's quotes.
        var inQuotes = false
        for line in lines {
            if inQuotes { if line.contains("\"\"\"") { inQuotes = false }; continue }
            let word = line.split(separator: " ").first.map(String.init) ?? ""
            XCTAssertTrue(line.hasPrefix("#") || ["FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"].contains(word), line)
            if line.components(separatedBy: "\"\"\"").count == 2 { inQuotes = true }
        }
    }
}

final class GGUFLoRAExportTests: XCTestCase {
    static let names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]

    /// The tiny fixture with its adapter, exported as a LoRA GGUF of `type`.
    static func exportAdapter(_ dir: String, type: GGUFExportType, adapter: String = TestFixtures.path("tiny-llama/adapter")) throws -> (model: DecoderModel, file: GGUFFile) {
        let loaded = try ModelLoader.load(dir, quantization: .none)
        try PEFTAdapter.load(directory: adapter, into: loaded.model)
        let out = try TestFixtures.temporaryDirectory("gguf-lora-out") + "/adapter-\(type.rawValue).gguf"
        let report = try GGUFExporter.exportLoRA(model: loaded.model, type: type, to: out, name: "adapter")
        XCTAssertEqual(report.adaptedLayers, 14)
        XCTAssertEqual(report.tensorCount, 28)
        return (loaded.model, try GGUFFile(path: out))
    }

    func testTheAdapterRoundTripsAndBasePlusLoRAIsTheMergedExport() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let (model, file) = try Self.exportAdapter(dir, type: .f32)
        let config = model.config
        XCTAssertEqual(file["general.architecture"]?.string, "llama")
        XCTAssertEqual(file["general.type"]?.string, "adapter")
        XCTAssertEqual(file["adapter.type"]?.string, "lora")
        XCTAssertEqual(file["adapter.lora.alpha"]?.type, .float32)
        XCTAssertEqual(file["adapter.lora.alpha"]?.double, 16)
        XCTAssertEqual(file["general.file_type"]?.int, 0)
        var expectedNames: [String] = []
        for l in 0..<config.layerCount {
            for n in Self.names { expectedNames += ["blk.\(l).\(n).weight.lora_a", "blk.\(l).\(n).weight.lora_b"] }
        }
        XCTAssertEqual(file.tensorNames, expectedNames)

        let base = try GGUFExportTests.export(dir, adapter: false, type: .f16).file
        let r = 8
        for l in 0..<config.layerCount {
            for (n, layer) in zip(Self.names, model.blocks[l].linears) {
                let w = "blk.\(l).\(n).weight"
                let baseInfo = try XCTUnwrap(base.tensor(w)), a = try XCTUnwrap(file.tensor(w + ".lora_a")), b = try XCTUnwrap(file.tensor(w + ".lora_b"))
                // llama.cpp's checks: W.ne0 == A.ne0, W.ne1 == B.ne1, A.ne1 == B.ne0.
                XCTAssertEqual(a.dimensions, [layer.inFeatures, r], w)
                XCTAssertEqual(b.dimensions, [r, layer.outFeatures], w)
                XCTAssertEqual(a.type, .f32)
                XCTAssertEqual(a.dimensions[0], baseInfo.dimensions[0])
                XCTAssertEqual(b.dimensions[1], baseInfo.dimensions[1])
                // A is PEFT's A as stored; B is PEFT's B with q/k rows permuted as the base's.
                XCTAssertEqual(try file.floats(a), Array(layer.lora!.a.storage), w)
                let heads = n == "attn_q" ? config.headCount : n == "attn_k" ? config.kvHeadCount : 0
                let bHF = heads > 0 ? GGUFConverter.unpermuteRotaryRows(try file.floats(b), heads: heads, headDim: config.headDim, columns: r)
                                    : try file.floats(b)
                XCTAssertEqual(bHF, Array(layer.lora!.b.storage), w)
                if heads > 0 { XCTAssertNotEqual(try file.floats(b), Array(layer.lora!.b.storage), w) }
            }
        }
        try Self.assertBasePlusLoRAIsTheMergedExport(dir, model: model, lora: file, alpha: 16)
    }

    /// rsLoRA and alpha_pattern give layers scales other than alpha / r: folded into B, llama.cpp's one alpha still
    /// gives the merged weights.
    func testLayerScalesOtherThanAlphaOverRAreFoldedIntoB() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let adapter = try EditedFixtures.adapter(config: {
            $0["use_rslora"] = .bool(true)
            $0["alpha_pattern"] = .object(JSONObject([("v_proj", .int(32))]))
        })
        let (model, file) = try Self.exportAdapter(dir, type: .f32, adapter: adapter)
        let alpha = Float(16 / Double(8).squareRoot()) * 8  // the first layer's (q_proj's) scale · r
        XCTAssertEqual(try XCTUnwrap(file["adapter.lora.alpha"]?.double), Double(alpha), accuracy: 1e-5)
        XCTAssertNotEqual(model.blocks[0].linears[2].lora!.scale, model.blocks[0].linears[0].lora!.scale)
        try Self.assertBasePlusLoRAIsTheMergedExport(dir, model: model, lora: file, alpha: Float(try XCTUnwrap(file["adapter.lora.alpha"]?.double)))
    }

    /// base (f16, in the GGUF's row order) + (alpha / r)·B·A, all read from GGUF files, is the f16 merged export of
    /// `model` (which has the adapter attached) within f16 rounding.
    static func assertBasePlusLoRAIsTheMergedExport(_ dir: String, model: DecoderModel, lora file: GGUFFile, alpha: Float) throws {
        let outs = try TestFixtures.temporaryDirectory("gguf-lora-merged")
        try GGUFExporter.export(model: model, directory: dir, type: .f16, to: outs + "/merged.gguf")
        let merged = try GGUFFile(path: outs + "/merged.gguf")
        let base = try GGUFExportTests.export(dir, adapter: false, type: .f16).file
        for l in 0..<model.config.layerCount {
            for n in names {
                let w = "blk.\(l).\(n).weight"
                let a = try XCTUnwrap(file.tensor(w + ".lora_a")), b = try XCTUnwrap(file.tensor(w + ".lora_b"))
                let baseInfo = try XCTUnwrap(base.tensor(w))
                let W = try base.floats(baseInfo), M = try merged.floats(try XCTUnwrap(merged.tensor(w)))
                let A = try file.floats(a), B = try file.floats(b)
                let (r, rows, columns) = (b.dimensions[0], baseInfo.dimensions[1], baseInfo.dimensions[0])
                let scale = alpha / Float(r)
                for o in 0..<rows {
                    for i in 0..<columns {
                        var delta: Float = 0
                        for k in 0..<r { delta += B[o * r + k] * A[k * columns + i] }
                        let got = W[o * columns + i] + scale * delta, want = M[o * columns + i]
                        XCTAssertLessThanOrEqual(abs(got - want), (abs(want) + abs(W[o * columns + i])) / 2048 + 1e-6, "\(w)[\(o), \(i)]")
                    }
                }
            }
        }
    }

    func testTypesAndRefusals() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        for type in [GGUFExportType.f16, .bf16, .q8_0] {
            let (model, file) = try Self.exportAdapter(dir, type: type)
            XCTAssertEqual(file["general.file_type"]?.int, Int(type.fileType))
            for info in file.tensors {
                // q8_0 needs ne0 a multiple of 32: lora_b's ne0 is r = 8, so it falls back to F16 as the converter does.
                XCTAssertEqual(info.type, type == .q8_0 && info.name.hasSuffix("lora_b") ? .f16 : type.weightType, info.name)
            }
            let a = try file.floats(try XCTUnwrap(file.tensor("blk.1.ffn_down.weight.lora_a")))
            let expected = Array(model.blocks[1].linears[6].lora!.a.storage)
            let step: Float = type == .f16 ? 1.0 / 2048 : type == .bf16 ? 1.0 / 256 : 1.0 / 64
            let largest = expected.map(abs).max()!
            for i in a.indices { XCTAssertLessThanOrEqual(abs(a[i] - expected[i]), max(abs(expected[i]) * step, largest / 254) + 1e-7, "\(type) [\(i)]") }
        }
        XCTAssertThrowsError(try GGUFExportType.parse("q4_0", adapter: true)) { XCTAssertTrue("\($0)".contains("--type") && "\($0)".contains("gguf-lora"), "\($0)") }
        XCTAssertEqual(try GGUFExportType.parse("Q8_0", adapter: true), .q8_0)
        XCTAssertEqual(try GGUFExportType.parse("q4_0"), .q4_0)
        let loaded = try ModelLoader.load(dir, quantization: .none)
        let out = try TestFixtures.temporaryDirectory("gguf-lora-none") + "/a.gguf"
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: loaded.model)
        XCTAssertThrowsError(try GGUFExporter.exportLoRA(model: loaded.model, type: .q4_k_m, to: out, name: "x")) { error in
            XCTAssertTrue("\(error)".contains("gguf-lora"), "\(error)")
        }
        for layer in loaded.model.blocks.flatMap(\.linears) { layer.lora = nil }
        XCTAssertThrowsError(try GGUFExporter.exportLoRA(model: loaded.model, type: .f16, to: out, name: "x")) { error in
            XCTAssertTrue("\(error)".contains("--adapter"), "\(error)")
        }
        XCTAssertFalse(FileSystem.exists(out))
    }

    func testTheGGUFPackageReadsTheLoRAFile() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let files = try [GGUFExportType.f32, .q8_0].map { try Self.exportAdapter(dir, type: $0).file }
        let summaries = try GGUFPyReaderTests.summaries(files.map(\.path))
        XCTAssertEqual(summaries.count, files.count)
        for (ours, summary) in zip(files, summaries) {
            let keys = try XCTUnwrap(summary["keys"]?.object)
            XCTAssertEqual(keys["general.type"]?["value"]?.string, "adapter")
            XCTAssertEqual(keys["adapter.type"]?["value"]?.string, "lora")
            XCTAssertEqual(keys["adapter.lora.alpha"]?["type"]?.string, "FLOAT32")
            XCTAssertEqual(keys["adapter.lora.alpha"]?["value"]?.double, 16)
            try GGUFPyReaderTests.assertTensorsAgree(ours, summary, "gguf-lora", checkSums: false)
        }
    }
}
