import XCTest
@testable import QLoRA

/// Held-out prompts as training renders them, answered through `AnswerGeneration`, and the metrics over the answers;
/// the task metrics during training (best adapter by metric, metrics.jsonl, TensorBoard, the report); model cards.
final class GenerationEvaluationTests: XCTestCase {
    /// The tiny Llama with a SentencePiece tokenizer and the Llama 2 chat template.
    static func tinyModel() throws -> (dir: String, loaded: LoadedModel) {
        let dir = try GGUFExportTests.tinyLlamaFolder()
        return (dir, try ModelLoader.load(dir, quantization: .none))
    }

    static let evalLines = [
        #"{"prompt": "Translate: cat", "completion": " chat"}"#,
        #"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}"#,
        #"{"instruction": "Say yes", "input": "", "output": "yes", "references": ["yes", "Yes."]}"#,
        #"{"prompt": "1 2 3", "completion": " 4 5"}"#,
        #"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello again"}]}"#,
    ]

    static func writeLines(_ lines: [String], name: String = "eval.jsonl") throws -> String {
        let path = try TestFixtures.temporaryDirectory() + "/" + name
        try FileSystem.writeAtomically(path, text: lines.joined(separator: "\n") + "\n")
        return path
    }

    func testPromptsAreTheTrainingTokensBeforeTheAnswer() throws {
        let (_, loaded) = try Self.tinyModel()
        let tokenizer = try XCTUnwrap(loaded.tokenizer), template = try XCTUnwrap(loaded.template)
        let path = try Self.writeLines(Self.evalLines)
        let cases = try GenerationEvaluation.cases(path: path, tokenizer: tokenizer, template: template)
        XCTAssertEqual(cases.count, 5)
        let training = try SFTDataset(path: path, tokenizer: tokenizer, template: template, formatting: SFTFormatting()).examples
        for (c, example) in zip(cases, training) {
            XCTAssertEqual(Array(example.tokens.prefix(c.prompt.count)), c.prompt, "line \(c.origin.line)")
            XCTAssertEqual(example.labels[c.prompt.count - 1], -100, "the prompt ends before the answer")
            XCTAssertNotEqual(example.labels[c.prompt.count], -100, "the answer starts right after the prompt")
        }
        XCTAssertEqual(cases.map(\.references), [[" chat"], ["Paris"], ["yes", "Yes."], [" 4 5"], ["hello again"]])
        XCTAssertEqual(cases.map(\.question), ["Translate: cat", "Capital of France?", "Say yes", "1 2 3", "again"])
        // A single-turn chat prompt is the template rendered with the generation prompt, tokenized whole.
        let messages = try JSONValue.parse(Self.evalLines[1])["messages"]!.array!.dropLast()
        XCTAssertEqual(cases[1].prompt, tokenizer.encode(try template.render(messages: Array(messages), addGenerationPrompt: true,
                                                                             bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken)))
        // A multi-turn chat is answered at its last assistant turn: the earlier turns, the first answer included, are prompt.
        let multiTurn = tokenizer.decode(cases[4].prompt)
        XCTAssertTrue(multiTurn.contains("hello") && multiTurn.hasSuffix("again [/INST]"), multiTurn)
        // The Alpaca prompt after BOS, as training tokenizes it.
        XCTAssertEqual(cases[2].prompt, [tokenizer.bosTokenID!] + tokenizer.encode(SFTDataset.alpacaPrompt(instruction: "Say yes", input: "")))
        XCTAssertEqual(try GenerationEvaluation.cases(path: path, tokenizer: tokenizer, template: template, limit: 2).count, 2)

        let text = try Self.writeLines([Self.evalLines[0], #"{"text": "no answer here"}"#])
        XCTAssertThrowsError(try GenerationEvaluation.cases(path: text, tokenizer: tokenizer, template: template)) {
            XCTAssertTrue("\($0)".contains("eval.jsonl: line 2: a \"text\" line has no answer to compare with"), "\($0)")
        }
        let open = try Self.writeLines([#"{"messages": [{"role": "user", "content": "hi"}]}"#])
        XCTAssertThrowsError(try GenerationEvaluation.cases(path: open, tokenizer: tokenizer, template: template)) {
            XCTAssertTrue("\($0)".contains("line 1: generation needs \"messages\" that end with the assistant's answer"), "\($0)")
        }
    }

    /// Batches of any size give each prompt the answer `Generator.generate` gives it alone; prompt i samples with seed + i.
    func testAnswersDoNotDependOnBatchingAndEqualTheGenerator() throws {
        let (_, loaded) = try Self.tinyModel()
        let tokenizer = try XCTUnwrap(loaded.tokenizer)
        let cases = try GenerationEvaluation.cases(path: try Self.writeLines(Self.evalLines), tokenizer: tokenizer, template: loaded.template)
        let stops = Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer)
        for sampling in [SamplingOptions(), SamplingOptions(temperature: 0.9, topK: 50, seed: 7)] {
            let one = try AnswerGeneration.generate(prompts: cases.map(\.prompt), generator: SessionBatchGenerator.cpu(loaded.model), tokenizer: tokenizer,
                                                    maxTokens: 6, sampling: sampling, stopIDs: stops)
            var progress: [Int] = []
            let batched = SessionBatchGenerator(deviceName: "cpu", config: loaded.model.config, maxBatchSize: 3) {
                CPUInferenceSession(model: loaded.model, capacity: $0)
            }
            let three = try AnswerGeneration.generate(prompts: cases.map(\.prompt), generator: batched, tokenizer: tokenizer, maxTokens: 6,
                                                      sampling: sampling, stopIDs: stops) { done, _ in progress.append(done) }
            XCTAssertEqual(one, three)
            XCTAssertEqual(progress, [3, 5])
            for (i, c) in cases.enumerated() {
                var options = sampling
                options.seed = sampling.seed + UInt64(i)
                let alone = try Generator.generate(model: loaded.model, prompt: c.prompt, maxTokens: 6, sampling: options, stopIDs: stops)
                XCTAssertEqual(one[i].tokens, alone.tokens, "prompt \(i)")
                XCTAssertEqual(one[i].text, tokenizer.decode(alone.tokens, skipSpecialTokens: true))
            }
        }
    }

    /// The result's metrics are the metric functions over its answers; the answers file holds every example.
    func testResultMetricsAndAnswersFile() throws {
        let (_, loaded) = try Self.tinyModel()
        let tokenizer = try XCTUnwrap(loaded.tokenizer)
        let cases = try GenerationEvaluation.cases(path: try Self.writeLines(Self.evalLines), tokenizer: tokenizer, template: loaded.template)
        let result = try GenerationEvaluation.run(cases: cases, metrics: TaskMetric.allCases, generator: SessionBatchGenerator.cpu(loaded.model),
                                                  tokenizer: tokenizer, maxTokens: 5, stopIDs: Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer))
        let predictions = result.answers.map(\.text)
        XCTAssertEqual(result.value(.bleu), SacreBLEU.corpusScore(hypotheses: predictions, references: cases.map(\.references)).score)
        XCTAssertEqual(result.value(.rougeL), zip(predictions, cases).map { RougeL.score(prediction: $0, references: $1.references).fmeasure }.reduce(0, +) / 5)
        XCTAssertEqual(result.fields.map(\.0), ["eval_exact_match", "eval_rouge_l", "eval_bleu", "eval_accuracy"])
        // Answers scored by hand: the right answer for two cases, a wrong one for the rest.
        var answers = result.answers
        answers[1].text = " Paris\n"
        answers[2].text = "Yes."
        let scored = GenerationEvaluation.score(cases: cases, answers: answers, metrics: [.exactMatch, .accuracy])
        XCTAssertEqual(scored.scores[0].values[1], 1)
        XCTAssertEqual(scored.scores[0].values[2], 1)
        XCTAssertEqual(scored.scores[1].values[2], 1)
        let path = try TestFixtures.temporaryDirectory() + "/answers.jsonl"
        try scored.writeAnswers(to: path, tokenizer: tokenizer)
        let lines = try FileSystem.readText(path).split(separator: "\n").map { try JSONValue.parse(String($0)) }
        XCTAssertEqual(lines.count, 5)
        XCTAssertEqual(lines[1]["answer"]?.string, " Paris\n")
        XCTAssertEqual(lines[1]["reference"]?.string, "Paris")
        XCTAssertEqual(lines[1]["scores"]?["exact_match"]?.double, 1)
        XCTAssertEqual(lines[2]["references"]?.array?.count, 2)
        XCTAssertEqual(lines[0]["line"]?.int, 1)
        XCTAssertTrue(lines[1]["prompt"]?.string?.contains("Capital of France?") ?? false)
    }

    func trainingSetup(_ name: String, metric: String, greater: Bool? = nil) throws -> (Trainer, String, LoadedModel) {
        let (dir, loaded) = try Self.tinyModel()
        let tokenizer = try XCTUnwrap(loaded.tokenizer)
        let trainPath = try Self.writeLines((0..<8).map { i in #"{"prompt": "count \#(i)", "completion": " \#(i) \#(i + 1) \#(i + 2)"}"# }, name: "train.jsonl")
        let evalPath = try Self.writeLines(Self.evalLines)
        let out = try TestFixtures.temporaryDirectory(name) + "/run"
        var c = TrainingConfiguration()
        c.model = dir
        c.datasets = [trainPath]
        c.evalDataset = evalPath
        c.outputDirectory = out
        c.loraR = 4
        c.loraAlpha = 8
        c.loraDropout = 0
        c.batchSize = 4
        c.maxSteps = 4
        c.evalSteps = 1
        c.saveSteps = 2
        c.learningRate = 3e-2
        c.optimizer = "adamw"
        c.metricForBestModel = metric
        c.greaterIsBetter = greater
        c.evalMetrics = ["bleu"]
        c.generationMaxNewTokens = 4
        c.reportTo = .all
        let formatting = SFTFormatting(completionOnly: true, maxSequenceLength: 64)
        let train = try SFTDataset(path: trainPath, tokenizer: tokenizer, template: loaded.template, formatting: formatting).examples
        let eval = try SFTDataset(path: evalPath, tokenizer: tokenizer, template: loaded.template, formatting: formatting).examples
        let trainer = try Trainer(configuration: c, model: loaded.model, train: train, eval: eval, padID: 0, baseDirectory: dir)
        trainer.log = { _ in }
        trainer.showProgress = { _ in }
        trainer.generation = TrainingGeneration(cases: try GenerationEvaluation.cases(path: evalPath, tokenizer: tokenizer, template: loaded.template),
                                                tokenizer: tokenizer, stopIDs: Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer))
        return (trainer, out, loaded)
    }

    /// best/ follows metric_for_best_model in the direction greater_is_better says; the metrics, samples and text summaries
    /// are logged at each evaluation.
    func testBestAdapterByTaskMetricAndItsLogs() throws {
        for greater in [nil, false] as [Bool?] {
            let (trainer, out, _) = try trainingSetup("best\(greater.map { "\($0)" } ?? "default")", metric: "eval_rouge_l", greater: greater)
            let summary = try trainer.run()
            XCTAssertEqual(trainer.metricHistory.count, 4)
            let values = trainer.metricHistory.map { e in e.values.first { $0.0 == "eval_rouge_l" }!.1 }
            XCTAssertEqual(trainer.metricHistory[0].values.map(\.0), ["eval_rouge_l", "eval_bleu"])
            let pick = greater == false ? values.min()! : values.max()!
            let bestStep = trainer.metricHistory[values.firstIndex(of: pick)!].step
            XCTAssertEqual(summary.bestStep, bestStep, "rouge_l by step: \(values)")
            XCTAssertEqual(summary.bestMetric, pick)
            XCTAssertEqual(summary.bestMetricName, "eval_rouge_l")
            let state = try JSONValue.parse(bytes: try FileSystem.readFile(out + "/checkpoint-4/trainer_state.json"))
            XCTAssertEqual(state["best_step"]?.int, bestStep)
            XCTAssertEqual(state["eval_metric_history"]?.array?.count, 4)
            let metrics = try FileSystem.readText(out + "/metrics.jsonl").split(separator: "\n").map { try JSONValue.parse(String($0)) }
            XCTAssertEqual(metrics.filter { $0["eval_rouge_l"] != nil }.count, 4)
            XCTAssertEqual(metrics.filter { $0["eval_bleu"] != nil }.count, 4)
            let samples = try XCTUnwrap(metrics.last { $0["eval_samples"] != nil }?["eval_samples"]?.array)
            XCTAssertEqual(samples.count, 4)
            XCTAssertEqual(samples[1]["reference"]?.string, "Paris")
            XCTAssertEqual(samples[1]["question"]?.string, "Capital of France?")
            let report = try FileSystem.readText(out + "/report.html")
            XCTAssertTrue(report.contains("eval_rouge_l") && report.contains("Sample answers") && report.contains("Capital of France?"))
            let events = try FileSystem.listDirectory(out + "/runs")
            let records = TFRecord.records(in: try FileSystem.readFile(out + "/runs/" + events[0])).records.map { String(decoding: $0.data, as: UTF8.self) }
            XCTAssertTrue(records.contains { $0.contains("eval/rouge_l") })
            XCTAssertTrue(records.contains { $0.contains("eval/samples") && $0.contains("text") && $0.contains("| question | reference | answer |") })
        }
    }

    func testTaskMetricWithoutPromptsAndBadNamesAreErrors() throws {
        var c = TrainingConfiguration()
        c.datasets = ["x.jsonl"]
        c.metricForBestModel = "meteor"
        XCTAssertThrowsError(try c.validate()) {
            XCTAssertEqual("\($0)", "metric_for_best_model (--metric-for-best) must be eval_loss or one of exact_match, rouge_l, bleu, accuracy, got 'meteor'")
        }
        c.metricForBestModel = "loss"
        XCTAssertNil(try c.bestModelMetric)
        XCTAssertFalse(c.bestModelGreaterIsBetter)
        c.metricForBestModel = "bleu"
        XCTAssertEqual(try c.bestModelMetric, .bleu)
        XCTAssertTrue(c.bestModelGreaterIsBetter)
        c.greaterIsBetter = false
        XCTAssertFalse(c.bestModelGreaterIsBetter)
        let (trainer, _, _) = try trainingSetup(#function, metric: "exact_match")
        trainer.generation = nil
        XCTAssertThrowsError(try trainer.run()) { XCTAssertTrue("\($0)".contains("need eval prompts with reference answers"), "\($0)") }
    }

    /// Every saved adapter has a card; its YAML header parses and every field is filled.
    func testModelCardsOfATrainedAdapter() throws {
        let (trainer, out, loaded) = try trainingSetup(#function, metric: "exact_match")
        trainer.cardDetails = ModelCardDetails(chatTemplate: ModelCard.chatTemplate(in: loaded.directory)?.source, chatTemplateFile: "chat_template.jinja",
                                               examplePrompt: "[INST] example [/INST]")
        _ = try trainer.run()
        for folder in [out, out + "/best", out + "/checkpoint-4"] {
            let card = try FileSystem.readText(folder + "/README.md")
            try Self.checkCard(card, baseDirectory: loaded.directory, configuration: trainer.configuration)
        }
        let final = try FileSystem.readText(out + "/README.md")
        XCTAssertTrue(final.contains("| eval_exact_match |"), final)
        XCTAssertTrue(final.contains("| `metric_for_best_model` | exact_match | eval_loss |"), final)
        XCTAssertTrue(final.contains("[INST] example [/INST]"))
    }

    static func checkCard(_ card: String, baseDirectory: String, configuration c: TrainingConfiguration) throws {
        XCTAssertTrue(card.hasPrefix("---\n"))
        let parts = card.components(separatedBy: "\n---\n")
        XCTAssertGreaterThan(parts.count, 1)
        let header = try SimpleYAML.parse(String(parts[0].dropFirst(4)), file: "README.md")
        XCTAssertEqual(header["base_model"]?.string, c.model)
        XCTAssertEqual(header["library_name"]?.string, "peft")
        XCTAssertEqual(header["tags"]?.array?.compactMap(\.string).contains("base_model:adapter:\(c.model)"), true)
        for section in ["## Base model", "## Training recipe", "## Data", "## Evaluation", "## Prompt format", "## How to load"] {
            XCTAssertTrue(card.contains(section), section)
        }
        let weights = try SHA256.file(baseDirectory + "/model.safetensors")
        XCTAssertTrue(card.contains("| `\(baseDirectory)/model.safetensors` | \(weights.bytes) | `\(weights.hex)` |"), card)
        for path in c.datasets + [c.evalDataset!] {
            let file = try SHA256.file(path)
            XCTAssertTrue(card.contains("`\(path)` | \(file.lines) | \(file.bytes) | `\(file.hex)` |"), path)
        }
        XCTAssertTrue(card.contains("```jinja\n"))
        XCTAssertTrue(card.contains("AutoPeftModelForCausalLM") && card.contains("load_adapter") && card.contains("qlora generate"))
        for missing in ["not readable", "No evaluation ran", "no weights file", "has no chat template"] {
            XCTAssertFalse(card.contains(missing), missing)
        }
    }
}
