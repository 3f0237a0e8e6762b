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
    /// The file it came from, for messages ("" when it came from no file).
    public var file: String
    /// What cutting the example to `max_seq_length` removed (nil: it fitted).
    public var truncation: Truncation?

    /// An example cut to `max_seq_length`.
    public struct Truncation: Sendable, Equatable {
        /// Its length in tokens before the cut.
        public var originalLength: Int
        /// Tokens before its first counted one (its prompt), before the cut.
        public var promptLength: Int
        /// Whether the cut took every counted token (the example then teaches nothing).
        public var completionLost: Bool
    }

    public init(tokens: [Int], labels: [Int], line: Int, file: String = "") {
        self.tokens = tokens
        self.labels = labels
        self.line = line
        self.file = file
    }

    /// Tokens the loss counts: labels that are not -100, after the shift (the first label predicts nothing).
    public var countedTokens: Int { labels.dropFirst().reduce(0) { $0 + ($1 == -100 ? 0 : 1) } }

    public var origin: ExampleOrigin { ExampleOrigin(file: file, line: line) }

    /// Checks every token id and label against the model's vocabulary, so nothing later indexes out of bounds.
    public func validate(vocabularySize: Int) throws {
        guard tokens.count == labels.count else {
            throw DatasetLineError(file: file, line: line, message: "\(tokens.count) token ids but \(labels.count) labels")
        }
        if let id = tokens.first(where: { $0 < 0 || $0 >= vocabularySize }) {
            throw DatasetLineError(file: file, line: line, message: "token id \(id) is outside the model's vocabulary (0..<\(vocabularySize))")
        }
        if let label = labels.first(where: { $0 != -100 && ($0 < 0 || $0 >= vocabularySize) }) {
            throw DatasetLineError(file: file, line: line,
                                   message: "label \(label) is outside the model's vocabulary (0..<\(vocabularySize)) and is not -100")
        }
    }
}

/// Where an example came from: a file and a line.
public struct ExampleOrigin: Sendable, Hashable {
    public var file: String
    public var line: Int

    public init(file: String, line: Int) {
        self.file = file
        self.line = line
    }

    /// "train.jsonl lines 12, 57; eval.jsonl line 3", at most `limit` lines named.
    public static func describe(_ origins: [ExampleOrigin], limit: Int = 12) -> String {
        var files: [String] = []
        var lines: [String: [Int]] = [:]
        for o in origins {
            if lines[o.file] == nil { files.append(o.file) }
            lines[o.file, default: []].append(o.line)
        }
        var named = 0
        var parts: [String] = []
        for file in files {
            let all = Array(Set(lines[file]!)).sorted()
            let shown = all.prefix(max(0, limit - named))
            named += shown.count
            guard !shown.isEmpty else { break }
            let list = shown.map(String.init).joined(separator: ", ") + (shown.count < all.count ? ", …" : "")
            parts.append((file.isEmpty ? "" : file + " ") + (all.count == 1 ? "line " : "lines ") + list)
        }
        let total = Set(origins).count
        return parts.joined(separator: "; ") + (named < total ? " (\(total) in all)" : "")
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

    /// Reads and tokenizes a JSONL file. `tokenizer` may be nil when every line is pre-tokenized; `vocabularySize`
    /// (the model's) bounds pre-tokenized ids and labels.
    public init(path: String, tokenizer: Tokenizer?, template: ChatTemplate?, formatting: SFTFormatting, vocabularySize: Int? = nil) throws {
        guard FileSystem.exists(path) else { throw UsageError("dataset \(path) does not exist") }
        guard !FileSystem.isDirectory(path) else { throw UsageError("dataset \(path) is a folder; expected a JSONL file") }
        let bytes = try FileSystem.readFile(path)
        try self.init(jsonl: bytes, source: path, tokenizer: tokenizer, template: template, formatting: formatting, vocabularySize: vocabularySize)
    }

    public init(jsonl text: String, source: String, tokenizer: Tokenizer?, template: ChatTemplate?, formatting: SFTFormatting,
                vocabularySize: Int? = nil) throws {
        try self.init(jsonl: Array(text.utf8), source: source, tokenizer: tokenizer, template: template, formatting: formatting,
                      vocabularySize: vocabularySize)
    }

    public init(jsonl bytes: [UInt8], source: String, tokenizer: Tokenizer?, template: ChatTemplate?, formatting: SFTFormatting,
                vocabularySize: Int? = nil) throws {
        self.source = source
        examples = []
        for (lineNumber, range) in Self.lines(bytes) {
            let line = bytes[range]
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            do {
                guard String(validating: line, as: UTF8.self) != nil else {
                    throw DatasetLineError(file: source, line: lineNumber, message: "not valid UTF-8")
                }
                let json: JSONValue
                do { json = try JSONValue.parse(bytes: line) } catch { throw DatasetLineError(file: source, line: lineNumber, message: "not valid JSON: \(error)") }
                var example = try Self.tokenize(json, line: lineNumber, source: source, tokenizer: tokenizer, template: template,
                                                formatting: formatting, vocabularySize: vocabularySize)
                example.file = source
                let length = formatting.maxSequenceLength
                if example.tokens.count > length {
                    let countedBefore = example.countedTokens
                    let prompt = example.labels.dropFirst().firstIndex { $0 != -100 } ?? example.tokens.count
                    let original = example.tokens.count
                    example.tokens.removeLast(original - length)
                    example.labels.removeLast(original - length)
                    example.truncation = .init(originalLength: original, promptLength: prompt,
                                               completionLost: countedBefore > 0 && example.countedTokens == 0)
                }
                examples.append(example)
            } catch let error as DatasetLineError {
                guard formatting.skipBadLines else { throw error }
                skippedLines.append(error)
            }
        }
        guard !examples.isEmpty else { throw UsageError("\(source): no examples (\(skippedLines.count) lines skipped as malformed)") }
    }

    /// The lines of a JSONL file as (1-based number, byte range without its line ending): a leading UTF-8 byte-order
    /// mark is skipped, and "\n", "\r\n" and a lone "\r" all end a line (JSON strings cannot hold a raw CR or LF).
    static func lines(_ bytes: [UInt8]) -> [(number: Int, range: Range<Int>)] {
        var start = bytes.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0
        var result: [(Int, Range<Int>)] = []
        var i = start
        while i < bytes.count {
            let b = bytes[i]
            if b == 0x0A || b == 0x0D {
                result.append((result.count + 1, start..<i))
                i += (b == 0x0D && i + 1 < bytes.count && bytes[i + 1] == 0x0A) ? 2 : 1
                start = i
            } else {
                i += 1
            }
        }
        if start < bytes.count { result.append((result.count + 1, start..<bytes.count)) }
        return result
    }

    static func tokenize(_ json: JSONValue, line: Int, source: String, tokenizer: Tokenizer?, template: ChatTemplate?,
                         formatting: SFTFormatting, vocabularySize: Int?) throws -> TokenizedExample {
        func fail(_ message: String) -> DatasetLineError { DatasetLineError(file: source, line: line, message: message) }
        guard let object = json.object else { throw fail("expected a JSON object") }
        if object["input_ids"] != nil {
            return try preTokenized(object, line: line, source: source, vocabularySize: vocabularySize ?? tokenizer?.vocabularySize, fail: fail)
        }
        guard let tokenizer else {
            throw fail("only pre-tokenized lines (\"input_ids\") can be read without a tokenizer, and the model folder has no tokenizer.json")
        }
        let example = try tokenizeText(object, line: line, tokenizer: tokenizer, template: template, formatting: formatting, fail: fail)
        if let vocabularySize, let id = example.tokens.first(where: { $0 >= vocabularySize }) {
            throw fail("the tokenizer gave token id \(id), outside the model's vocabulary (0..<\(vocabularySize)): "
                       + "tokenizer.json does not belong to this model")
        }
        return example
    }

    /// A text line (text, prompt/completion, messages or Alpaca) through the tokenizer and chat template.
    static func tokenizeText(_ object: JSONObject, line: Int, tokenizer: Tokenizer, template: ChatTemplate?,
                             formatting: SFTFormatting, fail: (String) -> DatasetLineError) throws -> TokenizedExample {
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

    /// An `input_ids` line (with optional `labels`), checked against the model's vocabulary.
    static func preTokenized(_ object: JSONObject, line: Int, source: String, vocabularySize: Int?,
                             fail: (String) -> DatasetLineError) throws -> TokenizedExample {
        func integers(_ key: String) throws -> [Int] {
            guard let values = object[key]?.array else { throw fail("\"\(key)\" must be an array of integers") }
            return try values.enumerated().map { i, v in
                guard let n = v.int else { throw fail("\"\(key)\"[\(i)] must be an integer, not \(v.serialized(.init()))") }
                return n
            }
        }
        let ids = try integers("input_ids")
        guard !ids.isEmpty else { throw fail("\"input_ids\" is empty") }
        var labels = ids
        if object["labels"] != nil {
            labels = try integers("labels")
            guard labels.count == ids.count else {
                throw fail("\"labels\" has \(labels.count) values but \"input_ids\" has \(ids.count); they must be as long")
            }
        }
        let vocab = vocabularySize ?? Int.max
        if let bad = ids.enumerated().first(where: { $0.element < 0 || $0.element >= vocab }) {
            throw fail("\"input_ids\"[\(bad.offset)] = \(bad.element) is outside the model's vocabulary (0..<\(vocab))")
        }
        if let bad = labels.enumerated().first(where: { $0.element != -100 && ($0.element < 0 || $0.element >= vocab) }) {
            throw fail("\"labels\"[\(bad.offset)] = \(bad.element) is outside the model's vocabulary (0..<\(vocab)) and is not -100")
        }
        return TokenizedExample(tokens: ids, labels: labels, line: line)
    }

    /// Renders the conversation once (the text trained on, as transformers renders it) and finds in it each assistant
    /// turn: it starts where the rendering of the conversation before it with the generation prompt ends, and ends
    /// where the rendering through it ends. The counted text is what `{% generation %}` would wrap: the reply and its
    /// end-of-turn marker, after the assistant header.
    ///
    /// Some templates render a turn differently once a later turn follows: Qwen3 keeps the `<think>` reasoning only
    /// of the assistant turns after the last user message, so the rendering through an earlier turn (which is then
    /// the last) is no prefix of the whole. The reference is the final rendering: the tokens counted are exactly those
    /// of that turn in the whole conversation (reasoning dropped where the template drops it), as transformers'
    /// `return_assistant_tokens_mask` (TRL's `assistant_only_loss`) marks them on the same template with
    /// `{% generation %}` around each reply. The turn's length is then measured with a user message appended after it
    /// (so that it renders as in the whole conversation): the rendering with the turn minus the rendering without it.
    static func chatExample(_ messages: [JSONValue], template: ChatTemplate, tokenizer: Tokenizer, formatting: SFTFormatting,
                            line: Int, fail: (String) -> DatasetLineError) throws -> TokenizedExample {
        func render(_ prefix: ArraySlice<JSONValue>, generationPrompt: Bool) throws -> String {
            do {
                return try template.renderAllowingEmpty(messages: Array(prefix), addGenerationPrompt: generationPrompt,
                                                        bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken)
            } catch { throw fail("chat template: \(error)") }
        }
        let full = try render(messages[...], generationPrompt: false)
        var parts: [(text: String, counted: Bool)] = []
        var consumed = full.startIndex
        for (i, message) in messages.enumerated() where message["role"]?.string == "assistant" {
            let before = try render(messages[..<i], generationPrompt: true)
            var through = try render(messages[...i], generationPrompt: false)
            if !full.hasPrefix(through), i + 1 < messages.count, i > 0 {
                // The turn renders differently as the last one (see above): its length as it renders before a user turn.
                let probe: JSONValue = .object(JSONObject([("role", .string("user")), ("content", .string("?"))]))
                let withTurn = try render(messages[...i] + [probe], generationPrompt: false)
                let withoutTurn = try render(messages[..<i] + [probe], generationPrompt: false)
                let header = try render(messages[..<i], generationPrompt: false)
                let length = withTurn.count - withoutTurn.count
                if length > 0, full.hasPrefix(header), withTurn.hasPrefix(header),
                   full.count >= header.count + length, withTurn.count >= header.count + length,
                   full.dropFirst(header.count).prefix(length) == withTurn.dropFirst(header.count).prefix(length) {
                    through = String(full.prefix(header.count + length))
                }
            }
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
