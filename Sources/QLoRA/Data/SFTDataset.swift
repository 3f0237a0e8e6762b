// Supervised fine-tuning data: JSONL examples → token ids with labels.
//
// One example a line, in any of the formats TRL users have:
//   {"text": ...}                                   loss on every token
//   {"prompt": ..., "completion": ...}              loss on the completion (completion-only) or all
//   {"messages": [{"role", "content"}, ...]}        rendered with the model's chat template; loss on assistant turns
//   {"instruction": ..., "input": ..., "output": ...}  Alpaca, with the Alpaca prompt; loss on the output
//   {"input_ids": [...], "labels": [...]}           pre-tokenized (labels optional)

/// One tokenized example.
public struct TokenizedExample: Sendable, Equatable {
    public var tokens: [Int]
    /// Same length as tokens; -100 where the loss does not count.
    public var labels: [Int]
    /// The line of the file it came from (1-based), for messages.
    public var line: Int

    public init(tokens: [Int], labels: [Int], line: Int) {
        self.tokens = tokens
        self.labels = labels
        self.line = line
    }
}

/// A malformed line, reported with its file and number.
public struct DatasetLineError: Error, CustomStringConvertible {
    public let file: String
    public let line: Int
    public let message: String
    public var description: String { "\(file): line \(line): \(message)" }
}

/// How examples become tokens.
public struct SFTFormatting: Sendable {
    /// Mask everything but the completion / assistant turns / Alpaca output.
    public var completionOnly = true
    /// Longer examples are cut to this many tokens.
    public var maxSequenceLength = 1024
    /// Skip malformed lines (and count them) instead of stopping at the first.
    public var skipBadLines = false

    public init(completionOnly: Bool = true, maxSequenceLength: Int = 1024, skipBadLines: Bool = false) {
        self.completionOnly = completionOnly
        self.maxSequenceLength = maxSequenceLength
        self.skipBadLines = skipBadLines
    }
}

/// A tokenized dataset.
public struct SFTDataset: Sendable {
    public var examples: [TokenizedExample]
    /// Lines skipped as malformed (with `skipBadLines`).
    public var skippedLines: [DatasetLineError] = []
    public var source: String

    public var tokenCount: Int { examples.reduce(0) { $0 + $1.tokens.count } }

    /// The Alpaca prompt (Stanford Alpaca's template), with and without an input.
    static func alpacaPrompt(instruction: String, input: String) -> String {
        if input.isEmpty {
            return "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n\(instruction)\n\n### Response:\n"
        }
        return "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n\(instruction)\n\n### Input:\n\(input)\n\n### Response:\n"
    }

    /// Reads and tokenizes a JSONL file.
    public init(path: String, tokenizer: Tokenizer, template: ChatTemplate?, formatting: SFTFormatting) throws {
        guard FileSystem.exists(path) else { throw UsageError("dataset \(path) does not exist") }
        let text = try FileSystem.readText(path)
        try self.init(jsonl: text, source: path, tokenizer: tokenizer, template: template, formatting: formatting)
    }

    public init(jsonl text: String, source: String, tokenizer: Tokenizer, template: ChatTemplate?, formatting: SFTFormatting) throws {
        self.source = source
        examples = []
        var lineNumber = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = rawLine.trimmingCharacters(in: " \t\r")
            if line.isEmpty { continue }
            do {
                let json: JSONValue
                do { json = try JSONValue.parse(line) } catch { throw DatasetLineError(file: source, line: lineNumber, message: "not valid JSON: \(error)") }
                var example = try Self.tokenize(json, line: lineNumber, source: source, tokenizer: tokenizer, template: template, formatting: formatting)
                if example.tokens.count > formatting.maxSequenceLength {
                    example.tokens.removeLast(example.tokens.count - formatting.maxSequenceLength)
                    example.labels.removeLast(example.labels.count - formatting.maxSequenceLength)
                }
                examples.append(example)
            } catch let error as DatasetLineError {
                guard formatting.skipBadLines else { throw error }
                skippedLines.append(error)
            }
        }
        guard !examples.isEmpty else { throw UsageError("\(source): no examples (\(skippedLines.count) lines skipped as malformed)") }
    }

    static func tokenize(_ json: JSONValue, line: Int, source: String, tokenizer: Tokenizer, template: ChatTemplate?,
                         formatting: SFTFormatting) throws -> TokenizedExample {
        func fail(_ message: String) -> DatasetLineError { DatasetLineError(file: source, line: line, message: message) }
        guard let object = json.object else { throw fail("expected a JSON object") }
        func string(_ key: String) throws -> String {
            guard let value = object[key] else { throw fail("missing \"\(key)\"") }
            guard let s = value.string else { throw fail("\"\(key)\" must be a string") }
            return s
        }
        let eos = tokenizer.eosTokenID.map { [$0] } ?? []
        // Whatever special tokens the tokenizer puts in front of a text (a BOS for Llama, nothing for SmolLM2).
        let bos = tokenizer.encode("", addSpecialTokens: true).filter { $0 == tokenizer.bosTokenID }
        /// Pieces of text, each counted in the loss or not, tokenized piece by piece.
        func pieces(_ parts: [(text: String, counted: Bool)], appendEOS: Bool) -> TokenizedExample {
            var tokens = bos, labels = bos.map { _ in -100 }
            for (text, counted) in parts where !text.isEmpty {
                let ids = tokenizer.encode(text)
                tokens += ids
                labels += (counted || !formatting.completionOnly) ? ids : ids.map { _ in -100 }
            }
            if appendEOS && tokens.last != eos.first { tokens += eos; labels += eos }
            return TokenizedExample(tokens: tokens, labels: labels, line: line)
        }

        if object["input_ids"] != nil {
            guard let ids = object["input_ids"]?.array?.compactMap(\.int), ids.count == object["input_ids"]?.array?.count, !ids.isEmpty else {
                throw fail("\"input_ids\" must be a non-empty array of integers")
            }
            for id in ids where id < 0 || id >= tokenizer.vocabularySize { throw fail("token id \(id) is outside the vocabulary (0..<\(tokenizer.vocabularySize))") }
            var labels = ids
            if let given = object["labels"] {
                guard let l = given.array?.compactMap(\.int), l.count == ids.count else {
                    throw fail("\"labels\" must be an array of integers as long as \"input_ids\" (\(ids.count))")
                }
                labels = l
            }
            return TokenizedExample(tokens: ids, labels: labels, line: line)
        }
        if let messages = object["messages"] {
            guard let list = messages.array, !list.isEmpty else { throw fail("\"messages\" must be a non-empty array") }
            for (i, m) in list.enumerated() {
                guard m["role"]?.string != nil, m["content"] != nil else { throw fail("message \(i) needs \"role\" and \"content\"") }
            }
            guard let template else { throw fail("\"messages\" needs a chat template, and the model has none") }
            return try chatExample(list, template: template, tokenizer: tokenizer, formatting: formatting, line: line, fail: fail)
        }
        if object["prompt"] != nil || object["completion"] != nil {
            return pieces([(try string("prompt"), false), (try string("completion"), true)], appendEOS: true)
        }
        if object["instruction"] != nil || object["output"] != nil {
            let input = object["input"]?.string ?? ""
            return pieces([(alpacaPrompt(instruction: try string("instruction"), input: input), false), (try string("output"), true)], appendEOS: true)
        }
        if object["text"] != nil {
            return pieces([(try string("text"), true)], appendEOS: true)
        }
        throw fail("no known fields: expected \"text\", \"prompt\"+\"completion\", \"messages\", \"instruction\"+\"output\" or \"input_ids\" (found \(object.keys.joined(separator: ", ")))")
    }

    /// Renders the conversation and finds each assistant turn as the text between the rendering of
    /// the conversation before it (with the generation prompt) and the rendering including it.
    static func chatExample(_ messages: [JSONValue], template: ChatTemplate, tokenizer: Tokenizer, formatting: SFTFormatting,
                            line: Int, fail: (String) -> DatasetLineError) throws -> TokenizedExample {
        func render(_ prefix: ArraySlice<JSONValue>, generationPrompt: Bool) throws -> String {
            do {
                return try template.render(messages: Array(prefix), addGenerationPrompt: generationPrompt,
                                           bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken)
            } catch { throw fail("chat template: \(error)") }
        }
        let full = try render(messages[...], generationPrompt: false)
        var parts: [(text: String, counted: Bool)] = []
        var consumed = full.startIndex
        for (i, message) in messages.enumerated() where message["role"]?.string == "assistant" {
            let before = try render(messages[..<i], generationPrompt: true)
            let through = try render(messages[...i], generationPrompt: false)
            guard full.hasPrefix(through), through.hasPrefix(before),
                  let start = full.index(full.startIndex, offsetBy: before.count, limitedBy: full.endIndex),
                  start >= consumed else {
                throw fail("the chat template does not render conversations prefix by prefix, so assistant turns cannot be located")
            }
            let end = full.index(full.startIndex, offsetBy: through.count)
            parts.append((String(full[consumed..<start]), false))
            parts.append((String(full[start..<end]), true))
            consumed = end
        }
        parts.append((String(full[consumed...]), false))
        var tokens: [Int] = [], labels: [Int] = []
        for (text, counted) in parts where !text.isEmpty {
            let ids = tokenizer.encode(text)
            tokens += ids
            labels += (counted || !formatting.completionOnly) ? ids : ids.map { _ in -100 }
        }
        return TokenizedExample(tokens: tokens, labels: labels, line: line)
    }
}

extension StringProtocol {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}
