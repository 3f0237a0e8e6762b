import XCTest
@testable import QLoRA

/// What a user sees for bad options and dangerous outputs, through the `qlora` binary.
final class CommandLineSafetyTests: XCTestCase {
    let cli = CommandLineTests(name: "qlora", testClosure: { _ in })

    /// A negative number after a space reaches our validation (it was "missing value" before).
    func testNegativeNumbersAfterASpaceAreValidatedNotMissing() throws {
        let cases: [([String], String)] = [
            (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature (--temperature) must be a finite number >= 0 (0: greedy), got -1.0"),
            (["generate", "--prompt", "hi", "--max-tokens=-5"], "max_tokens (--max-tokens) must be a positive integer, got -5"),
            (["generate", "--prompt", "hi", "--max-tokens", "-5"], "max_tokens (--max-tokens) must be a positive integer, got -5"),
            (["generate", "--prompt", "hi", "--top-p", "2"], "top_p (--top-p) must be in (0, 1] (1: no cut), got 2.0"),
            (["generate", "--prompt", "hi", "--top-k", "-3"], "top_k (--top-k) must be a non-negative integer (0: no cut), got -3"),
            (["train", "--data", "x.jsonl", "--learning-rate", "-1"], "learning_rate (--learning-rate) must be a positive number, got -1.0"),
            (["train", "--data", "x.jsonl", "--lora-dropout", "1.5"], "lora_dropout (--lora-dropout) must be in [0, 1), got 1.5"),
            (["eval", "--data", "x.jsonl", "--batch-size", "-2"], "--batch-size must be a positive integer, got -2"),
            (["train", "--data", "x.jsonl", "--gpu-memory", "-24"], "--gpu-memory must be a positive number of GiB, got -24.0"),
            (["bench", "--gpu-memory", "0"], "--gpu-memory must be a positive number of GiB, got 0.0"),
            (["bench", "--arch", "llama-3.1-8b", "--layers", "40"], "--layers must be 1...32 for llama-3.1-8b, got 40"),
            (["plan", "--gpu-memory", "24,-1"], "--gpu-memory: expected positive numbers of GiB separated by commas, got '24,-1'"),
            (["plan", "--host-memory", "0"], "--host-memory must be a positive number of GiB, got 0.0"),
        ]
        for (arguments, message) in cases {
            let result = try cli.qlora(arguments)
            XCTAssertNotEqual(result.status, 0, arguments.joined(separator: " "))
            XCTAssertTrue(result.err.contains(message), "\(arguments): \(result.err)")
            XCTAssertFalse(result.err.contains("Missing value"), result.err)
        }
        // The seed is unsigned, as numpy (transformers' set_seed) requires: -1 names the option and the value.
        let seed = try cli.qlora(["train", "--data", "x.jsonl", "--seed", "-1"])
        XCTAssertNotEqual(seed.status, 0)
        XCTAssertTrue(seed.err.contains("'-1'") && seed.err.contains("--seed"), seed.err)
        // --help still works after an option.
        let help = try cli.qlora(["generate", "--help"])
        XCTAssertEqual(help.status, 0)
        XCTAssertTrue(help.out.contains("--temperature"), help.out)
    }

    /// bench-decode's --gemv is checked before the GPU is touched: an unknown value (`fused`, removed in session 10)
    /// names the choices.
    func testBenchDecodeNamesTheGEMVChoices() throws {
        let result = try cli.qlora(["bench-decode", "--gemv", "fused"])
        XCTAssertNotEqual(result.status, 0)
        XCTAssertTrue(result.err.contains("unknown --gemv 'fused' (choose from rows, splitk, mma)"), result.err)
    }

    /// `bench --layers N` times the first N blocks of the architecture (the long-sequence working set without the
    /// other blocks' minutes).
    func testBenchLayersCutsTheArchitecture() throws {
        let result = try cli.qlora(["bench", "--device", "cpu", "--arch", "smollm2-135m", "--layers", "2", "--seq", "8", "--steps", "1",
                                    "--decode-tokens", "0"])
        XCTAssertEqual(result.status, 0, result.err)
        XCTAssertTrue(result.out.contains(#""layers": 2,"#), result.out)
    }

    /// `qlora plan` keeps the attention outputs only where the training machine's RAM holds their pinned copies, by
    /// the trainer's rule (three quarters of it), and says which way it went.
    func testPlanKeepsAttentionOutputsOnlyWhereTheHostHoldsThem() throws {
        let args = ["plan", "--arch", "llama-3.1-8b", "--batch", "1", "--seq", "65536", "--gpu-memory", "80"]
        let roomy = try cli.qlora(args + ["--host-memory", "1024"])
        XCTAssertEqual(roomy.status, 0, roomy.err)
        XCTAssertTrue(roomy.out.contains("attention outputs kept (pinned host"), roomy.out)
        let small = try cli.qlora(args + ["--host-memory", "16"])
        XCTAssertEqual(small.status, 0, small.err)
        XCTAssertTrue(small.out.contains("attention recomputed (keeping its outputs needs")
                      && small.out.contains("over three quarters of the host's 16.0 GiB"), small.out)
    }

    func testAFolderGivenAsDataSaysSo() throws {
        let dir = try TestFixtures.temporaryDirectory()
        for (from, name) in [("tiny-llama/base", "config.json"), ("tiny-llama/base", "model.safetensors"),
                             ("smollm2-tokenizer", "tokenizer.json"), ("smollm2-tokenizer", "tokenizer_config.json")] {
            try FileManager.default.copyItem(atPath: TestFixtures.path(from + "/" + name), toPath: dir + "/" + name)
        }
        let result = try cli.qlora(["eval", "--model", dir, "--data", dir, "--device", "cpu"])
        XCTAssertNotEqual(result.status, 0)
        // The dataset reader names it first; the file layer (MappedFile) would say the same for any other reader.
        XCTAssertTrue(result.err.contains("\(dir) is a folder; expected a JSONL file"), result.err)
    }

    func testMergeAndQuantizeRefuseToOverwriteTheirInputs() throws {
        let root = try TestFixtures.temporaryDirectory()
        let base = root + "/base"
        try FileManager.default.copyItem(atPath: TestFixtures.path("tiny-llama/base"), toPath: base)
        let before = try FileSystem.readFile(base + "/model.safetensors")
        let merge = try cli.qlora(["merge", "--model", base, "--adapter", TestFixtures.path("tiny-llama/adapter"), "--out", base + "/", "--device", "cpu"])
        XCTAssertNotEqual(merge.status, 0)
        XCTAssertTrue(merge.err.contains("--out \(base)/ is the base model folder"), merge.err)
        let intoAdapter = try cli.qlora(["merge", "--model", base, "--adapter", TestFixtures.path("tiny-llama/adapter"),
                                          "--out", TestFixtures.path("tiny-llama/adapter"), "--device", "cpu"])
        XCTAssertTrue(intoAdapter.err.contains("is the adapter folder"), intoAdapter.err)
        let quantize = try cli.qlora(["quantize", base, "--out", root + "/./base"])
        XCTAssertNotEqual(quantize.status, 0)
        XCTAssertTrue(quantize.err.contains("is the model folder"), quantize.err)
        XCTAssertEqual(try FileSystem.readFile(base + "/model.safetensors"), before)
        // A folder holding other files is not replaced.
        try FileSystem.createDirectory(root + "/mine")
        try FileSystem.writeAtomically(root + "/mine/notes.txt", text: "keep me")
        let other = try cli.qlora(["quantize", base, "--out", root + "/mine"])
        XCTAssertTrue(other.err.contains("already holds files this command does not write (notes.txt)"), other.err)
        XCTAssertEqual(try FileSystem.readText(root + "/mine/notes.txt"), "keep me")
        // A new folder, then the same again (an earlier output of the command is replaced).
        for _ in 0..<2 {
            let ok = try cli.qlora(["quantize", base, "--out", root + "/q"])
            XCTAssertEqual(ok.status, 0, ok.err)
        }
        XCTAssertEqual(try FileSystem.listDirectory(root), ["base", "mine", "q"])
    }
}

extension CommandLineSafetyTests {
    /// Results that cannot be written (standard output on a full disk) are an error, not exit status 0.
    func testAFullStandardOutputIsAnError() throws {
        guard let full = FileHandle(forWritingAtPath: "/dev/full") else { throw XCTSkip("no /dev/full") }
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0])
        var binary = bundle.deletingLastPathComponent().appendingPathComponent("qlora")
        if !FileManager.default.fileExists(atPath: binary.path) {
            binary = bundle.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("qlora")
        }
        guard FileManager.default.fileExists(atPath: binary.path) else { throw XCTSkip("the qlora binary is not built") }
        let process = Process()
        process.executableURL = binary
        process.arguments = ["tokenize", "--model", TestFixtures.smolTokenizer, "--text", "The capital of France is Paris."]
        let err = Pipe()
        process.standardOutput = full
        process.standardError = err
        try process.run()
        let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 1)
        XCTAssertTrue(message.contains("cannot write the results to standard output"), message)
    }
}
