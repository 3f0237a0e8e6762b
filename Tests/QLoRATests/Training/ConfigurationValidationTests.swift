import XCTest
@testable import QLoRA

/// Every training setting is range-checked with a message naming the YAML key and the flag; YAML typos, wrong types
/// and repeated keys are errors naming the key and the line.
final class ConfigurationValidationTests: XCTestCase {
    func valid() -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.datasets = ["train.jsonl"]
        return c
    }

    func testTheDefaultsAndTheExampleConfigAreValid() throws {
        XCTAssertNoThrow(try valid().validate())
        let example = TestFixtures.root + "/../../examples/dates.yaml"
        var c = try TrainingConfiguration(yamlFile: example)
        c.datasets = c.datasets.isEmpty ? ["x"] : c.datasets
        XCTAssertNoThrow(try c.validate())
    }

    func testOutOfRangeValuesNameTheSettingAndTheFlag() {
        let cases: [(String, (inout TrainingConfiguration) -> Void)] = [
            ("learning_rate (--learning-rate) must be a positive number, got -1.0", { $0.learningRate = -1 }),
            ("learning_rate (--learning-rate) must be a positive number, got nan", { $0.learningRate = .nan }),
            ("num_train_epochs (--epochs) must be a non-negative number, got -2.0", { $0.epochs = -2 }),
            ("num_train_epochs (--epochs) must be a non-negative number, got inf", { $0.epochs = .infinity }),
            ("lora_r (--lora-r) must be a positive integer (at most 65536), got 0", { $0.loraR = 0 }),
            ("lora_alpha (--lora-alpha) must be a positive number, got -8.0", { $0.loraAlpha = -8 }),
            ("lora_dropout (--lora-dropout) must be in [0, 1), got 1.0", { $0.loraDropout = 1 }),
            ("per_device_train_batch_size (--batch-size) must be a positive integer, got 0", { $0.batchSize = 0 }),
            ("gradient_accumulation_steps (--gradient-accumulation-steps) must be a positive integer, got -1", { $0.gradientAccumulationSteps = -1 }),
            ("max_seq_length (--max-seq-length) must be an integer from 2 to 1048576, got 1", { $0.maxSeqLength = 1 }),
            ("max_steps (--max-steps) must be a positive integer, or -1 to use num_train_epochs, got -5", { $0.maxSteps = -5 }),
            ("warmup_ratio (--warmup-ratio) must be a fraction between 0 and 1, got 1.5", { $0.warmupRatio = 1.5 }),
            ("warmup_steps (--warmup-steps) must be a non-negative integer, got -1", { $0.warmupSteps = -1 }),
            ("weight_decay (--weight-decay) must be a non-negative number, got -0.1", { $0.weightDecay = -0.1 }),
            ("max_grad_norm (--max-grad-norm) must be a non-negative number (0: no clipping), got -1.0", { $0.maxGradNorm = -1 }),
            ("eval_split (--eval-split) must be a fraction between 0 and 0.5, got 0.9", { $0.evalSplit = 0.9 }),
            ("logging_steps (--logging-steps) must be a positive integer, got 0", { $0.loggingSteps = 0 }),
            ("eval_steps (--eval-steps) must be a non-negative integer (0: each epoch), got -1", { $0.evalSteps = -1 }),
            ("save_steps (--save-steps) must be a non-negative integer (0: each epoch), got -1", { $0.saveSteps = -1 }),
            ("save_total_limit (--save-total-limit) must be a non-negative integer (0: keep all), got -1", { $0.saveTotalLimit = -1 }),
            ("early_stopping_patience (--early-stopping-patience) must be a non-negative integer (0: never stop early), got -1",
             { $0.earlyStoppingPatience = -1 }),
        ]
        for (message, change) in cases {
            var c = valid()
            change(&c)
            XCTAssertThrowsError(try c.validate(), message) { XCTAssertEqual("\($0)", message) }
        }
    }

    func yaml(_ text: String) throws -> TrainingConfiguration {
        let dir = try TestFixtures.temporaryDirectory()
        try FileSystem.writeAtomically(dir + "/c.yaml", text: text)
        return try TrainingConfiguration(yamlFile: dir + "/c.yaml")
    }

    func assertYAMLError(_ text: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try yaml(text), file: file, line: line) { error in
            XCTAssertTrue("\(error)".hasSuffix(expected), "\(error)", file: file, line: line)
        }
    }

    func testYAMLTyposWrongTypesAndRepeatsNameTheKeyAndLine() {
        assertYAMLError("lora_r: 8\nlearning_rte: 1e-4\n", "c.yaml: line 2: 'learning_rte': unknown setting; did you mean 'learning_rate'?")
        assertYAMLError("num_train_epoch: 3\n", "line 1: 'num_train_epoch': unknown setting; did you mean 'num_train_epochs'?")
        assertYAMLError("completely_unrelated_thing: 3\n", "'completely_unrelated_thing': unknown setting (see `qlora train --help` for the names)")
        assertYAMLError("# settings\n\nlora_r: eight\n", "line 3: 'lora_r': expected an integer, got \"eight\"")
        assertYAMLError("packing: 3\n", "line 1: 'packing': expected true or false, got 3")
        assertYAMLError("seed: -1\n", "line 1: 'seed': expected a non-negative integer, got -1")
        assertYAMLError("lora_r: 8\nlora_r: 16\n", "line 2: 'lora_r' is set again (first on line 1); give each setting once")
        assertYAMLError("lr: 1e-4\nlearning_rate: 2e-4\n", "line 2: 'learning_rate': sets the same setting as 'lr' (line 1); give one of them")
    }

    func testYAMLComputeDType() throws {
        XCTAssertEqual(try yaml("lora_r: 8\n").computeDType, .auto)
        XCTAssertEqual(try yaml("bnb_4bit_compute_dtype: float16\n").computeDType, .fp16)
        XCTAssertEqual(try yaml("bnb_4bit_compute_dtype: torch.bfloat16\n").computeDType, .bf16)
        XCTAssertEqual(try yaml("fp16: true\n").computeDType, .fp16)
        XCTAssertEqual(try yaml("bf16: false\n").computeDType, .auto)
        assertYAMLError("lora_r: 8\nbnb_4bit_compute_dtype: float32\n",
                        "line 2: 'bnb_4bit_compute_dtype': expected auto, bfloat16 or float16, got \"float32\"")
        assertYAMLError("bf16: true\nbnb_4bit_compute_dtype: float16\n",
                        "line 2: 'bnb_4bit_compute_dtype': sets the same setting as 'bf16' (line 1); give one of them")
    }

    func testYAMLOverwriteAndSeed() throws {
        let c = try yaml("overwrite_output_dir: true\nseed: 7\n")
        XCTAssertTrue(c.overwriteOutputDirectory)
        XCTAssertEqual(c.seed, 7)
    }
}
