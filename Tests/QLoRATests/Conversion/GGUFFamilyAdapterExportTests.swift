import XCTest
@testable import QLoRA

/// `qlora export --format gguf --adapter` for the qwen3, gemma2, gemma3 (text and multimodal) and phi3 families: the
/// adapter merged by the exporter (W + scale·B·A in fp32, written once in the file's type) against the export of PEFT's
/// own merge (Tests/Fixtures/families/<family>: `merged-bf16/`, PEFT's merge_and_unload saved bf16; for Phi-3,
/// `merged.safetensors`, its merged block linears). The folders have no tokenizer, so gguf-families' tokenizer of the
/// same family is put beside them (96 tokens of the 128: the rest are padding, and Gemma 3's embedding is cut to 96).
final class GGUFFamilyAdapterExportTests: XCTestCase {
    /// (fixture folder, gguf-families folder whose tokenizer it borrows, adapted linears)
    static let fixtures = [("qwen3", "qwen3", 14), ("gemma2", "gemma2", 14), ("gemma3_text", "gemma3", 21),
                           ("gemma3", "gemma3", 21), ("phi3", "phi3", 8), ("phi3-longrope", "phi3", 8)]

    /// A copy of `source` (config.json, model.safetensors, generation_config.json) with the tokenizer of `tokenizer`.
    static func folder(_ source: String, tokenizer: String, name: String) throws -> String {
        let dir = try TestFixtures.temporaryDirectory("gguf-family-adapter-" + name)
        for file in ["config.json", "model.safetensors", "generation_config.json"] where FileSystem.exists(source + "/" + file) {
            try FileSystem.writeAtomically(dir + "/" + file, bytes: try FileSystem.readFile(source + "/" + file))
        }
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            let from = TestFixtures.path("gguf-families/\(tokenizer)/\(file)")
            try FileSystem.writeAtomically(dir + "/" + file, bytes: try FileSystem.readFile(from))
        }
        return dir
    }

    /// Our export with the fixture's adapter merged, and the export of PEFT's merge, both of `type`.
    static func exports(_ fixture: String, tokenizer: String, type: GGUFExportType) throws -> (ours: String, peft: String, report: GGUFExportReport) {
        let root = TestFixtures.path("families/" + fixture)
        let base = try folder(root + "/base", tokenizer: tokenizer, name: fixture + "-base")
        let loaded = try ModelLoader.load(base, quantization: .none)
        try PEFTAdapter.load(directory: root + "/adapter", into: loaded.model)
        let ours = base + "/merged-by-us.gguf"
        let report = try GGUFFamilyExporter.export(directory: base, merging: loaded.model, type: type, to: ours, name: fixture)
        let peft: String
        if FileSystem.exists(root + "/merged-bf16") {
            let merged = try folder(root + "/merged-bf16", tokenizer: tokenizer, name: fixture + "-peft")
            peft = merged + "/merged-by-peft.gguf"
            try GGUFFamilyExporter.export(directory: merged, type: type, to: peft, name: fixture)
        } else {
            // Phi-3's fixture keeps only the merged block linears: the base's files with those in their place.
            let linears = try SafeTensorsFile(path: root + "/merged.safetensors")
            let names = Set(linears.tensors.map(\.name))
            peft = base + "/merged-by-peft.gguf"
            try GGUFFamilyExporter.export(directory: base, type: type, to: peft, name: fixture,
                                          weight: { try names.contains($0) ? linears.floats($0) : nil })
        }
        return (ours, peft, report)
    }

    /// The largest |ours − peft| of a tensor in units of one bf16 step (2⁻⁷ of the larger value's power of two).
    static func bf16Steps(_ a: [Float], _ b: [Float]) -> Double {
        zip(a, b).reduce(0) { worst, pair in
            let m = max(abs(pair.0), abs(pair.1))
            guard m > 0 else { return worst }
            let step = Double(Float(sign: .plus, exponent: m.exponent - 7, significand: 1))
            return max(worst, Double(abs(pair.0 - pair.1)) / step)
        }
    }

    static let linearNames = ["attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]

    /// Every tensor of our f32 export equals PEFT's merge exported the same way: the merged linears within half a bf16
    /// step (PEFT's are its fp32 merge rounded to bf16; ours are not rounded), everything else (Gemma's norms with their +1,
    /// embeddings, Phi-3's rope factors) exactly. The same export without the merge is many steps away on the linears, so
    /// the comparison sees the merge.
    func testMergedExportMatchesPEFTsMerge() throws {
        for (fixture, tokenizer, adapted) in Self.fixtures {
            let (oursPath, peftPath, report) = try Self.exports(fixture, tokenizer: tokenizer, type: .f32)
            XCTAssertEqual(report.mergedLayers, adapted, fixture)
            let ours = try GGUFFile(path: oursPath), peft = try GGUFFile(path: peftPath)
            XCTAssertEqual(ours.tensorNames, peft.tensorNames, fixture)
            XCTAssertEqual(ours.metadata.map(\.key), peft.metadata.map(\.key), fixture)
            let unmergedFolder = try Self.folder(TestFixtures.path("families/\(fixture)/base"), tokenizer: tokenizer, name: fixture + "-unmerged")
            try GGUFFamilyExporter.export(directory: unmergedFolder, type: .f32, to: unmergedFolder + "/base.gguf", name: fixture)
            let unmerged = try GGUFFile(path: unmergedFolder + "/base.gguf")
            var worst = 0.0, linears = 0
            for info in peft.tensors {
                let theirs = try peft.floats(info)
                let mine = try ours.floats(try XCTUnwrap(ours.tensor(info.name), "\(fixture) \(info.name)"))
                XCTAssertEqual(ours.tensor(info.name)?.dimensions, info.dimensions, "\(fixture) \(info.name)")
                XCTAssertEqual(ours.tensor(info.name)?.type, .f32, "\(fixture) \(info.name)")
                let parts = info.name.split(separator: ".")
                if parts.count == 4, Self.linearNames.contains(String(parts[2])) {
                    linears += 1
                    let steps = Self.bf16Steps(mine, theirs)
                    worst = max(worst, steps)
                    // Half a step is PEFT's rounding to bf16; fp32 sums in another order add far less than the rest.
                    XCTAssertLessThanOrEqual(steps, 0.51, "\(fixture) \(info.name): \(steps) bf16 steps from PEFT's merge")
                    let without = try unmerged.floats(try XCTUnwrap(unmerged.tensor(info.name)))
                    XCTAssertGreaterThan(Self.bf16Steps(without, theirs), 4, "\(fixture) \(info.name): the adapter changes it too little to be seen")
                } else {
                    XCTAssertEqual(mine, theirs, "\(fixture) \(info.name)")
                }
            }
            XCTAssertEqual(linears, adapted, fixture)
            print("\(fixture): \(linears) merged linears, at most \(worst) bf16 steps from PEFT's merge")
        }
    }

    /// llama.cpp's Python reader (the gguf package) reads every merged export, f32 and f16, and finds what ours finds.
    func testTheGGUFPackageReadsTheMergedExports() throws {
        var files: [String] = []
        for (fixture, tokenizer, _) in Self.fixtures {
            files.append(try Self.exports(fixture, tokenizer: tokenizer, type: .f16).ours)
        }
        files.append(try Self.exports("gemma2", tokenizer: "gemma2", type: .q8_0).ours)
        let summaries = try GGUFPyReaderTests.summaries(files)
        XCTAssertEqual(summaries.count, files.count)
        for (path, summary) in zip(files, summaries) {
            try GGUFPyReaderTests.assertTensorsAgree(try GGUFFile(path: path), summary, path, checkSums: true)
        }
    }

    /// The f16 file holds the f32 merge rounded once to f16 (the llama path's rounding), not a bf16 rounding first.
    func testF16ExportRoundsTheFP32MergeOnce() throws {
        let (oursPath, _, _) = try Self.exports("qwen3", tokenizer: "qwen3", type: .f16)
        let (f32Path, _, _) = try Self.exports("qwen3", tokenizer: "qwen3", type: .f32)
        let f16 = try GGUFFile(path: oursPath), f32 = try GGUFFile(path: f32Path)
        let name = "blk.1.attn_q.weight"
        let rounded = try f32.floats(try XCTUnwrap(f32.tensor(name))).map { Float(Float16($0)) }
        XCTAssertEqual(try f16.floats(try XCTUnwrap(f16.tensor(name))), rounded)
    }

    func testAnAdapterOfAnotherModelIsRefused() throws {
        // The qwen3 model with its adapter, exported from the gemma2 folder: its layers' weights are not there.
        let root = TestFixtures.path("families/qwen3")
        let base = try Self.folder(root + "/base", tokenizer: "qwen3", name: "refuse-qwen3")
        let other = try Self.folder(TestFixtures.path("families/gemma3/base"), tokenizer: "gemma3", name: "refuse-gemma3")
        let loaded = try ModelLoader.load(base, quantization: .none)
        try PEFTAdapter.load(directory: root + "/adapter", into: loaded.model)
        XCTAssertThrowsError(try GGUFFamilyExporter.export(directory: other, merging: loaded.model, type: .f16, to: other + "/x.gguf")) { error in
            XCTAssertTrue("\(error)".contains("model.layers.") && "\(error)".contains("is not a tensor of"), "\(error)")
        }
        XCTAssertFalse(FileSystem.exists(other + "/x.gguf"))
    }
}
