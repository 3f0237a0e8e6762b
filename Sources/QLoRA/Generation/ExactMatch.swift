// Exact-match accuracy of greedy answers: the measure of the demo task.

public struct ExactMatchCase: Sendable {
    /// The conversation up to the answer.
    public var messages: [JSONValue]
    public var expected: String
}

public struct ExactMatchResult: Sendable {
    public var correct: Int
    public var total: Int
    /// (question, answer given, expected) for each case.
    public var answers: [(prompt: String, answer: String, expected: String)]
    public var accuracy: Double { total == 0 ? 0 : Double(correct) / Double(total) }
}

public enum ExactMatch {
    /// Cases from a JSONL file of `messages` lines whose last message is the assistant's answer.
    public static func cases(path: String) throws -> [ExactMatchCase] {
        var cases: [ExactMatchCase] = []
        for (i, line) in try FileSystem.readText(path).split(separator: "\n").enumerated() where !line.allSatisfy(\.isWhitespace) {
            let json: JSONValue
            do { json = try JSONValue.parse(String(line)) } catch { throw DatasetLineError(file: path, line: i + 1, message: "not valid JSON: \(error)") }
            guard let messages = json["messages"]?.array, let last = messages.last, last["role"]?.string == "assistant",
                  let expected = last["content"]?.string else {
                throw DatasetLineError(file: path, line: i + 1, message: "expected \"messages\" ending with an assistant answer")
            }
            cases.append(ExactMatchCase(messages: Array(messages.dropLast()), expected: expected))
        }
        return cases
    }

    /// Greedy answers (up to `maxTokens`) of the CPU model, compared with the expected text after trimming whitespace.
    public static func evaluate(model: DecoderModel, tokenizer: Tokenizer, template: ChatTemplate, cases: [ExactMatchCase],
                                maxTokens: Int = 24) throws -> ExactMatchResult {
        let session = CPUInferenceSession(model: model, capacity: try longestPrompt(cases, tokenizer: tokenizer, template: template) + maxTokens)
        return try evaluate(session: session, tokenizer: tokenizer, template: template, cases: cases, maxTokens: maxTokens)
    }

    /// The same on any backend's session, which needs room for the longest prompt and `maxTokens`; it is reset before each case.
    public static func evaluate(session: InferenceSession, tokenizer: Tokenizer, template: ChatTemplate, cases: [ExactMatchCase],
                                maxTokens: Int = 24) throws -> ExactMatchResult {
        var result = ExactMatchResult(correct: 0, total: 0, answers: [])
        let stops = Generator.stopIDs(config: session.config, tokenizer: tokenizer)
        for c in cases {
            session.reset()
            let generated = try Generator.generate(session: session, prompt: try promptIDs(c, tokenizer: tokenizer, template: template),
                                                   maxTokens: maxTokens, sampling: SamplingOptions(), stopIDs: stops)
            let answer = trimmed(tokenizer.decode(generated.tokens, skipSpecialTokens: true))
            if answer == trimmed(c.expected) { result.correct += 1 }
            result.total += 1
            result.answers.append((c.messages.last?["content"]?.string ?? "", answer, c.expected))
        }
        return result
    }

    /// Tokens of the longest prompt among `cases` (to size a session).
    public static func longestPrompt(_ cases: [ExactMatchCase], tokenizer: Tokenizer, template: ChatTemplate) throws -> Int {
        try cases.map { try promptIDs($0, tokenizer: tokenizer, template: template).count }.max() ?? 1
    }

    static func promptIDs(_ c: ExactMatchCase, tokenizer: Tokenizer, template: ChatTemplate) throws -> [Int] {
        let prompt = try template.render(messages: c.messages, addGenerationPrompt: true, bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken)
        return tokenizer.encode(prompt)
    }

    static func trimmed(_ s: String) -> String {
        String(s.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
    }
}
