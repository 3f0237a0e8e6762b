// `qlora generate --prompts-file`: prompts to answer, one JSON object a line.

public enum PromptsFile {
    /// The prompts of a JSONL file, as token ids with their line numbers. A line holds `"prompt"` (BOS + the text, as
    /// training tokenizes a prompt; with `chat`, the text as a user message through the chat template, after `system`)
    /// or `"messages"` (through the chat template with the generation prompt; a last assistant message, a reference
    /// answer, is left out).
    public static func read(path: String, tokenizer: Tokenizer, template: ChatTemplate?, chat: Bool, system: String?) throws -> [(line: Int, ids: [Int])] {
        guard FileSystem.exists(path) else { throw UsageError("--prompts-file \(path) does not exist") }
        guard !FileSystem.isDirectory(path) else { throw UsageError("--prompts-file \(path) is a folder; expected a JSONL file") }
        let bytes = try FileSystem.readFile(path)
        var prompts: [(line: Int, ids: [Int])] = []
        let bos = tokenizer.encode("", addSpecialTokens: true).filter { $0 == tokenizer.bosTokenID }
        func render(_ messages: [JSONValue], _ fail: (String) -> DatasetLineError) throws -> [Int] {
            guard let template else { throw fail("chat messages need a chat template, and the model has none") }
            do {
                return tokenizer.encode(try template.render(messages: messages, addGenerationPrompt: true, bosToken: tokenizer.bosToken,
                                                            eosToken: tokenizer.eosToken))
            } catch { throw fail("chat template: \(error)") }
        }
        for (number, range) in SFTDataset.lines(bytes) {
            let line = bytes[range]
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { continue }
            func fail(_ message: String) -> DatasetLineError { DatasetLineError(file: path, line: number, message: message) }
            guard String(validating: line, as: UTF8.self) != nil else { throw fail("not valid UTF-8") }
            let json: JSONValue
            do { json = try JSONValue.parse(bytes: line) } catch { throw fail("not valid JSON: \(error)") }
            var ids: [Int]
            if let messages = json["messages"] {
                guard var list = messages.array, !list.isEmpty else { throw fail("\"messages\" must be a non-empty array") }
                for (i, m) in list.enumerated() where m["role"]?.string == nil || m["content"] == nil {
                    throw fail("message \(i) needs \"role\" and \"content\"")
                }
                if list.count > 1 && list.last?["role"]?.string == "assistant" { list.removeLast() }
                ids = try render(list, fail)
            } else if let value = json["prompt"] {
                guard let text = value.string else { throw fail("\"prompt\" must be a string") }
                if chat {
                    var messages: [JSONValue] = []
                    if let system { messages.append(.object(JSONObject([("role", .string("system")), ("content", .string(system))]))) }
                    messages.append(.object(JSONObject([("role", .string("user")), ("content", .string(text))])))
                    ids = try render(messages, fail)
                } else {
                    ids = bos + tokenizer.encode(text)
                }
            } else {
                throw fail("expected \"prompt\" (a string) or \"messages\" (a list of {\"role\", \"content\"})")
            }
            guard !ids.isEmpty else { throw fail("the prompt is empty") }
            prompts.append((number, ids))
        }
        guard !prompts.isEmpty else { throw UsageError("--prompts-file \(path): no prompts") }
        return prompts
    }
}
