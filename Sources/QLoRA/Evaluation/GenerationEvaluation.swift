// Task metrics on generated answers: held-out prompts rendered exactly as training renders them, answered through
// `AnswerGeneration`, scored against the reference completions (TextMetrics.swift).

/// One held-out example to answer.
public struct GenerationCase: Sendable, Equatable {
    /// The prompt's token ids: the example's tokens before its answer, exactly as training tokenized them (chat template
    /// with the generation prompt for `messages`, the Alpaca prompt, or BOS + prompt).
    public var prompt: [Int]
    /// What the answer is compared with: the completion, the last assistant message or the Alpaca output, or the line's
    /// `"references"` (a list of strings) when it has one.
    public var references: [String]
    /// What was asked, for people to read: the last user message, the prompt, or the instruction (and its input).
    public var question: String
    public var origin: ExampleOrigin
}

/// Every example's answer and scores, and the metrics over them.
public struct GenerationEvaluationResult: Sendable {
    public var cases: [GenerationCase]
    public var answers: [GeneratedAnswer]
    /// Per metric, every example's score (in the cases' order).
    public var scores: [(metric: TaskMetric, values: [Double])]
    /// Per metric, its value over all examples (nil: no example).
    public var metrics: [(metric: TaskMetric, value: Double?)]
    public var seconds: Double

    public func value(_ metric: TaskMetric) -> Double? { metrics.first { $0.metric == metric }?.value ?? nil }

    /// The metrics as eval_<name> fields (metrics.jsonl, eval's JSON, TensorBoard's eval/<name>).
    public var fields: [(String, JSONValue)] {
        metrics.compactMap { m in m.value.map { (m.metric.evalKey, .double($0)) } }
    }

    /// One JSON object per example: where it came from, the prompt as the model saw it, the references, the answer and its scores.
    public func answerRecords(tokenizer: Tokenizer) -> [JSONValue] {
        cases.indices.map { i in
            let c = cases[i]
            var fields: [(String, JSONValue)] = [
                ("file", .string(c.origin.file)), ("line", .int(Int64(c.origin.line))),
                ("question", .string(c.question)), ("prompt", .string(tokenizer.decode(c.prompt))),
                ("reference", .string(c.references.first ?? "")),
            ]
            if c.references.count > 1 { fields.append(("references", .array(c.references.map { .string($0) }))) }
            fields.append(("answer", .string(answers[i].text)))
            fields.append(("answer_tokens", .int(Int64(answers[i].tokens.count))))
            fields.append(("stopped_at_eos", .bool(answers[i].stoppedAtEOS)))
            fields.append(("scores", .object(JSONObject(scores.map { ($0.metric.rawValue, .double($0.values[i])) }))))
            return .object(JSONObject(fields))
        }
    }

    /// Writes `answerRecords` as JSONL (atomically).
    public func writeAnswers(to path: String, tokenizer: Tokenizer) throws {
        let text = answerRecords(tokenizer: tokenizer).map { $0.serialized(.init()) + "\n" }.joined()
        try FileSystem.writeAtomically(path, text: text)
    }
}

public enum GenerationEvaluation {
    /// The examples of a JSONL file that have a prompt and an answer (prompt/completion, messages ending with an
    /// assistant turn, Alpaca). Lines are tokenized by the training code itself (`SFTDataset`), and the prompt is
    /// everything before the last counted (answer) tokens. A text or pre-tokenized line has no answer to compare: an
    /// error naming the line. `limit` > 0 keeps the first `limit` examples.
    public static func cases(path: String, tokenizer: Tokenizer, template: ChatTemplate?, limit: Int = 0) throws -> [GenerationCase] {
        guard FileSystem.exists(path) else { throw UsageError("dataset \(path) does not exist") }
        guard !FileSystem.isDirectory(path) else { throw UsageError("dataset \(path) is a folder; expected a JSONL file") }
        let bytes = try FileSystem.readFile(path)
        var cases: [GenerationCase] = []
        // Completion-only labels mark the answer; no length cut (the prompt is needed whole).
        let formatting = SFTFormatting(completionOnly: true, maxSequenceLength: Int.max)
        for (lineNumber, range) in SFTDataset.lines(bytes) {
            if limit > 0 && cases.count >= limit { break }
            let line = bytes[range]
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            func fail(_ message: String) -> DatasetLineError { DatasetLineError(file: path, line: lineNumber, message: message) }
            guard String(validating: line, as: UTF8.self) != nil else { throw fail("not valid UTF-8") }
            let json: JSONValue
            do { json = try JSONValue.parse(bytes: line) } catch { throw fail("not valid JSON: \(error)") }
            guard let object = json.object else { throw fail("expected a JSON object") }
            var reference: String?
            var question = ""
            if let messages = object["messages"]?.array {
                question = messages.last(where: { $0["role"]?.string == "user" })?["content"]?.string ?? ""
                guard let last = messages.last, last["role"]?.string == "assistant" else {
                    throw fail("generation needs \"messages\" that end with the assistant's answer (the reference)")
                }
                guard let content = last["content"]?.string else { throw fail("the last message's \"content\" must be a string") }
                reference = content
            } else if object["prompt"] != nil || object["completion"] != nil {
                reference = object["completion"]?.string
                question = object["prompt"]?.string ?? ""
            } else if object["instruction"] != nil || object["output"] != nil {
                reference = object["output"]?.string
                let input = object["input"]?.string ?? ""
                question = (object["instruction"]?.string ?? "") + (input.isEmpty ? "" : "\n" + input)
            } else if object["text"] != nil || object["input_ids"] != nil {
                throw fail("a \(object["text"] != nil ? "\"text\"" : "pre-tokenized") line has no answer to compare with; generation metrics "
                           + "need prompt/completion, messages ending with an assistant turn, or instruction/output lines")
            }
            // The training tokenization (it also reports missing fields and template errors for this line).
            let example = try SFTDataset.tokenize(json, line: lineNumber, source: path, tokenizer: tokenizer, template: template,
                                                  formatting: formatting, vocabularySize: nil)
            guard let reference else { throw fail("no reference answer") }
            guard let lastCounted = example.labels.lastIndex(where: { $0 != -100 }) else { throw fail("no answer tokens") }
            var start = lastCounted
            while start > 0 && example.labels[start - 1] != -100 { start -= 1 }
            guard start > 0 else { throw fail("the prompt is empty: nothing comes before the answer") }
            var references = [reference]
            if let given = object["references"] {
                guard let list = given.array, !list.isEmpty, list.allSatisfy({ $0.string != nil }) else {
                    throw fail("\"references\" must be a non-empty list of strings")
                }
                references = list.map { $0.string! }
            }
            cases.append(GenerationCase(prompt: Array(example.tokens[..<start]), references: references, question: question,
                                        origin: ExampleOrigin(file: path, line: lineNumber)))
        }
        guard !cases.isEmpty else { throw UsageError("\(path): no examples to answer") }
        return cases
    }

    /// Answers every case and scores the answers with `metrics`.
    public static func run(cases: [GenerationCase], metrics: [TaskMetric], generator: BatchGenerator, tokenizer: Tokenizer,
                           maxTokens: Int, sampling: SamplingOptions = SamplingOptions(), stopIDs: Set<Int>,
                           progress: (Int, Int) -> Void = { _, _ in }) throws -> GenerationEvaluationResult {
        let start = monotonicSeconds()
        let answers = try AnswerGeneration.generate(prompts: cases.map(\.prompt), generator: generator, tokenizer: tokenizer,
                                                    maxTokens: maxTokens, sampling: sampling, stopIDs: stopIDs, progress: progress)
        let seconds = monotonicSeconds() - start
        return score(cases: cases, answers: answers, metrics: metrics, seconds: seconds)
    }

    /// Scores given answers (one per case).
    public static func score(cases: [GenerationCase], answers: [GeneratedAnswer], metrics: [TaskMetric], seconds: Double = 0) -> GenerationEvaluationResult {
        let predictions = answers.map(\.text), references = cases.map(\.references)
        let scores = metrics.map { metric in
            (metric, zip(predictions, references).map { metric.score(prediction: $0, references: $1) })
        }
        let values = scores.map { ($0.0, $0.0.aggregate(predictions: predictions, references: references, perExample: $0.1)) }
        return GenerationEvaluationResult(cases: cases, answers: answers, scores: scores, metrics: values, seconds: seconds)
    }
}
