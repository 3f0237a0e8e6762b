import XCTest
@testable import QLoRA

/// `eval --generate`, `generate --prompts-file`, `train --metric-for-best` and the cards of `train` and `merge`, as a user types them.
extension CommandLineTests {
    func testEvalGenerateWritesMetricsAndAnswers() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let data = try GenerationEvaluationTests.writeLines(GenerationEvaluationTests.evalLines)
        let answers = try TestFixtures.temporaryDirectory() + "/answers.jsonl"
        let result = try qlora(["eval", "--model", dir, "--data", data, "--generate", "--max-new-tokens", "5", "--json", "--answers", answers, "--device", "cpu"])
        XCTAssertEqual(result.status, 0, result.err)
        let json = try JSONValue.parse(result.out.trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertNotNil(json["loss"]?.double)
        XCTAssertEqual(json["answers_file"]?.string, answers)
        let lines = try FileSystem.readText(answers).split(separator: "\n").map { try JSONValue.parse(String($0)) }
        XCTAssertEqual(lines.count, 5)
        let predictions = lines.map { $0["answer"]!.string! }
        let references = lines.map { l in l["references"]?.array?.map { $0.string! } ?? [l["reference"]!.string!] }
        XCTAssertEqual(json["eval_bleu"]?.double, SacreBLEU.corpusScore(hypotheses: predictions, references: references).score)
        for metric in [TaskMetric.exactMatch, .rougeL, .accuracy] {
            let per = zip(predictions, references).map { metric.score(prediction: $0, references: $1) }
            XCTAssertEqual(json[metric.evalKey]?.double, per.reduce(0, +) / 5, metric.rawValue)
            XCTAssertEqual(lines.map { $0["scores"]![metric.rawValue]!.double! }, per)
        }
        // The same answers from the library on the same model.
        let loaded = try ModelLoader.load(dir, quantization: .none)
        let cases = try GenerationEvaluation.cases(path: data, tokenizer: loaded.tokenizer!, template: loaded.template)
        let direct = try AnswerGeneration.generate(prompts: cases.map(\.prompt), generator: SessionBatchGenerator.cpu(loaded.model), tokenizer: loaded.tokenizer!,
                                                   maxTokens: 5, sampling: SamplingOptions(), stopIDs: Generator.stopIDs(config: loaded.model.config, tokenizer: loaded.tokenizer!))
        XCTAssertEqual(direct.map(\.text), predictions)

        let only = try qlora(["eval", "--model", dir, "--data", data, "--generate", "--no-loss", "--metric", "rouge_l", "--max-new-tokens", "3", "--device", "cpu"])
        XCTAssertEqual(only.status, 0, only.err)
        XCTAssertTrue(only.out.hasPrefix("rouge_l "), only.out)
        XCTAssertFalse(only.out.contains("perplexity"))
        let bad = try qlora(["eval", "--model", dir, "--data", data, "--generate", "--metric", "rouge_l,meteor"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.err.contains("--metric: unknown metric 'meteor'"), bad.err)
        let text = try GenerationEvaluationTests.writeLines([#"{"text": "hello"}"#], name: "text.jsonl")
        let refused = try qlora(["eval", "--model", dir, "--data", text, "--generate", "--no-loss", "--device", "cpu"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.err.contains("text.jsonl: line 1: a \"text\" line has no answer to compare with"), refused.err)
    }

    func testGeneratePromptsFileAnswersEachLine() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let prompts = try GenerationEvaluationTests.writeLines([#"{"prompt": "Hello there"}"#, "",
                                                                 #"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}"#],
                                                                name: "prompts.jsonl")
        let out = try TestFixtures.temporaryDirectory() + "/answers.jsonl"
        let result = try qlora(["generate", "--model", dir, "--prompts-file", prompts, "--max-tokens", "6", "--out", out, "--device", "cpu"])
        XCTAssertEqual(result.status, 0, result.err)
        let lines = try FileSystem.readText(out).split(separator: "\n").map { try JSONValue.parse(String($0)) }
        XCTAssertEqual(lines.map { $0["line"]?.int }, [1, 3])
        XCTAssertTrue(lines[1]["prompt"]?.string?.contains("[INST] hi [/INST]") ?? false, "\(lines[1])")
        XCTAssertFalse(lines[1]["prompt"]?.string?.contains("x") ?? true, "the trailing assistant message is left out")
        // The first answer is what `generate --prompt` streams for the same prompt.
        let single = try qlora(["generate", "--model", dir, "--prompt", "Hello there", "--max-tokens", "6", "--device", "cpu"])
        XCTAssertEqual(single.status, 0, single.err)
        XCTAssertEqual(single.out.trimmingCharacters(in: .whitespacesAndNewlines), lines[0]["answer"]?.string?.trimmingCharacters(in: .whitespacesAndNewlines))
        let both = try qlora(["generate", "--model", dir, "--prompt", "x", "--prompts-file", prompts])
        XCTAssertTrue(both.err.contains("give one of --prompt and --prompts-file"), both.err)
        let bad = try GenerationEvaluationTests.writeLines([#"{"question": "x"}"#], name: "bad.jsonl")
        let refused = try qlora(["generate", "--model", dir, "--prompts-file", bad, "--device", "cpu"])
        XCTAssertTrue(refused.err.contains("bad.jsonl: line 1: expected \"prompt\""), refused.err)
    }

    /// `train --metric-for-best rouge_l` keeps best/ by it and writes cards; `merge` writes the merged card and replaces an earlier merge.
    func testTrainByTaskMetricWritesCardsAndMergeCarriesThem() throws {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        let train = try GenerationEvaluationTests.writeLines((0..<6).map { i in #"{"prompt": "n \#(i)", "completion": " \#(i + 1)"}"# }, name: "train.jsonl")
        let eval = try GenerationEvaluationTests.writeLines(GenerationEvaluationTests.evalLines)
        let out = try TestFixtures.temporaryDirectory() + "/run"
        let result = try qlora(["train", "--model", dir, "--data", train, "--eval-data", eval, "--max-steps", "2", "--eval-steps", "1", "--batch-size", "2",
                                "--metric-for-best", "rouge_l", "--eval-metrics", "exact_match", "--generation-max-new-tokens", "4",
                                "--output", out, "--device", "cpu"])
        XCTAssertEqual(result.status, 0, result.err)
        XCTAssertTrue(result.out.contains("best eval_rouge_l "), result.out)
        XCTAssertTrue(result.err.contains("eval_rouge_l "), result.err)
        var c = TrainingConfiguration()
        c.model = dir
        c.datasets = [train]
        c.evalDataset = eval
        for folder in [out, out + "/best"] {
            let card = try FileSystem.readText(folder + "/README.md")
            try GenerationEvaluationTests.checkCard(card, baseDirectory: dir, configuration: c)
            XCTAssertTrue(card.contains("[INST]"), "the example prompt")
            XCTAssertTrue(card.contains("| eval_rouge_l |") && card.contains("| eval_exact_match |"), card)
        }
        let merged = try TestFixtures.temporaryDirectory() + "/merged"
        for _ in 0..<2 {
            let merge = try qlora(["merge", "--model", dir, "--adapter", out, "--out", merged, "--device", "cpu"])
            XCTAssertEqual(merge.status, 0, merge.err)
        }
        let card = try FileSystem.readText(merged + "/README.md")
        let header = try SimpleYAML.parse(String(card.components(separatedBy: "\n---\n")[0].dropFirst(4)), file: "README.md")
        XCTAssertEqual(header["library_name"]?.string, "transformers")
        XCTAssertEqual(header["base_model"]?.string, dir)
        for section in ["## Base model", "## Adapter", "## Training recipe", "## Data", "## Evaluation", "## Prompt format", "## How to load"] {
            XCTAssertTrue(card.contains(section), section)
        }
        XCTAssertTrue(card.contains(try SHA256.file(out + "/adapter_model.safetensors").hex))
    }
}
