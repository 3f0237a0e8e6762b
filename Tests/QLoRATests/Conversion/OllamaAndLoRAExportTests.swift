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
