import XCTest
@testable import QLoRA

/// The `qlora` binary itself, built beside the test bundle: what a user types, what they see.
final class CommandLineTests: XCTestCase {
    /// Runs qlora with `arguments` (and `extra` in its environment, without the data-parallel launch variables of the
    /// test's own environment); returns (exit status, standard output, standard error).
    func qlora(_ arguments: [String], environment extra: [String: String] = [:]) throws -> (status: Int32, out: String, err: String) {
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0])
        var binary = bundle.deletingLastPathComponent().appendingPathComponent("qlora")
        if !FileManager.default.fileExists(atPath: binary.path) {
            binary = bundle.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("qlora")
        }
        guard FileManager.default.fileExists(atPath: binary.path) else { throw XCTSkip("the qlora binary is not built beside \(bundle.path)") }
        let process = Process()
        process.executableURL = binary
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        for key in ["WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"] { environment[key] = nil }
        process.environment = environment.merging(extra) { _, new in new }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
    }

    /// `export --ollama` writes FILE.gguf and a Modelfile beside it; `export --format gguf-lora` writes the adapter alone;
    /// refusals name the option.
    func testExportOllamaAndGGUFLoRA() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let adapter = TestFixtures.path("tiny-llama/adapter")
        let out = try TestFixtures.temporaryDirectory("cli-export")
        let merged = try qlora(["export", "--model", dir, "--adapter", adapter, "--out", out + "/m.gguf", "--ollama"])
        XCTAssertEqual(merged.status, 0, merged.err)
        XCTAssertTrue(FileSystem.exists(out + "/m.gguf"))
        XCTAssertTrue(try FileSystem.readText(out + "/Modelfile").contains("\nFROM ./m.gguf\nPARAMETER stop \"</s>\"\n"))
        let lora = try qlora(["export", "--model", dir, "--adapter", adapter, "--format", "gguf-lora", "--type", "f32", "--out", out + "/a.gguf"])
        XCTAssertEqual(lora.status, 0, lora.err)
        XCTAssertEqual(try GGUFFile(path: out + "/a.gguf")["general.type"]?.string, "adapter")
        let noAdapter = try qlora(["export", "--model", dir, "--format", "gguf-lora", "--out", out + "/b.gguf"])
        XCTAssertNotEqual(noAdapter.status, 0)
        XCTAssertTrue(noAdapter.err.contains("--adapter"), noAdapter.err)
        let badType = try qlora(["export", "--model", dir, "--adapter", adapter, "--format", "gguf-lora", "--type", "q4_0", "--out", out + "/b.gguf"])
        XCTAssertTrue(badType.err.contains("--type"), badType.err)
        // A Modelfile that is an input (inside the model folder) is refused before any GGUF is written.
        try FileSystem.writeAtomically(dir + "/Modelfile", text: "FROM x\n")
        let refused = try qlora(["export", "--model", dir, "--out", dir + "/m.gguf", "--ollama"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.err.contains("Modelfile"), refused.err)
        XCTAssertFalse(FileSystem.exists(dir + "/m.gguf"))
        XCTAssertFalse(FileSystem.exists(out + "/b.gguf"))
    }

    /// `export --adapter` on a Gemma 2 folder merges the adapter (the same file as the library's merged export) and
    /// `--ollama` writes its Modelfile with Gemma's end-of-turn stop.
    func testExportMergesAnAdapterIntoAFamilyModel() throws {
        let dir = try GGUFFamilyAdapterExportTests.folder(TestFixtures.path("families/gemma2/base"), tokenizer: "gemma2", name: "cli")
        let adapter = TestFixtures.path("families/gemma2/adapter")
        let out = try TestFixtures.temporaryDirectory("cli-export-family")
        let run = try qlora(["export", "--model", dir, "--adapter", adapter, "--type", "f32", "--out", out + "/m.gguf", "--ollama"])
        XCTAssertEqual(run.status, 0, run.err)
        XCTAssertTrue(run.out.contains("14 layers with the adapter merged"), run.out)
        XCTAssertTrue(FileSystem.exists(out + "/Modelfile"))
        let (library, _, _) = try GGUFFamilyAdapterExportTests.exports("gemma2", tokenizer: "gemma2", type: .f32)
        let ours = try GGUFFile(path: out + "/m.gguf"), expected = try GGUFFile(path: library)
        XCTAssertEqual(ours.tensorNames, expected.tensorNames)
        for info in expected.tensors {
            XCTAssertEqual(try ours.floats(try XCTUnwrap(ours.tensor(info.name))), try expected.floats(info), info.name)
        }
    }

    /// `tokenize --messages` on a folder holding only the tokenizer files equals the chat goldens (text and ids).
    func testTokenizeMessagesMatchesTheGoldens() throws {
        let goldens = try String(contentsOfFile: TestFixtures.path("smollm2-tokenizer/goldens.jsonl"), encoding: .utf8)
        var checked = 0
        for line in goldens.split(separator: "\n") {
            let golden = try JSONValue.parse(String(line))
            guard let chat = golden["chat"] else { continue }
            let file = try TestFixtures.temporaryDirectory() + "/messages.json"
            try chat.serialized().write(toFile: file, atomically: true, encoding: .utf8)
            let generationPrompt = golden["add_generation_prompt"]?.bool ?? false
            let result = try qlora(["tokenize", "--model", TestFixtures.smolTokenizer, "--messages", file] + (generationPrompt ? ["--add-generation-prompt"] : []))
            XCTAssertEqual(result.status, 0, result.err)
            let json = try JSONValue.parse(result.out.trimmingCharacters(in: .whitespacesAndNewlines))
            XCTAssertEqual(json["text"]?.string, golden["rendered"]?.string)
            XCTAssertEqual(json["ids"]?.array, golden["ids"]?.array)
            checked += 1
        }
        XCTAssertEqual(checked, 4, "the goldens hold four chat lines")
        let text = try qlora(["tokenize", "--model", TestFixtures.smolTokenizer, "--text", "The capital of France is Paris."])
        XCTAssertEqual(text.out.trimmingCharacters(in: .whitespacesAndNewlines), #"{"ids": [504, 3575, 282, 4649, 314, 7042, 30]}"#)
    }

    func testInspectReportsFourBitCheckpoint() throws {
        let result = try qlora(["inspect", TestFixtures.path("tiny-llama/base-bnb-nf4"), "--summary"])
        XCTAssertEqual(result.status, 0, result.err)
        XCTAssertTrue(result.out.contains("architecture: llama, 2 layers"), result.out)
        XCTAssertTrue(result.out.contains("bits per parameter"), result.out)
    }

    func testBadDatasetLineIsReportedWithItsLineNumber() throws {
        // A model folder: the tiny model's weights with the SmolLM2 tokenizer files (the data fails before any forward).
        let dir = try TestFixtures.temporaryDirectory()
        for (from, name) in [("tiny-llama/base", "config.json"), ("tiny-llama/base", "model.safetensors"),
                             ("smollm2-tokenizer", "tokenizer.json"), ("smollm2-tokenizer", "tokenizer_config.json")] {
            try FileManager.default.copyItem(atPath: TestFixtures.path(from + "/" + name), toPath: dir + "/" + name)
        }
        // Line 1 is fine ("a" is a token id the tiny model's 1000-entry vocabulary holds).
        try "{\"text\": \"a\"}\n{\"text\": oops}\n".write(toFile: dir + "/data.jsonl", atomically: true, encoding: .utf8)
        let result = try qlora(["eval", "--model", dir, "--data", dir + "/data.jsonl"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.err.contains("data.jsonl: line 2: not valid JSON"), result.err)
    }
}
