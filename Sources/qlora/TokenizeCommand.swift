import ArgumentParser
import QLoRA

/// `qlora tokenize --model DIR --text TEXT`: prints the token ids of a text as `{"ids": [...]}`.
/// `qlora tokenize --model DIR --messages FILE.json [--add-generation-prompt]`: renders the chat template
/// and prints `{"text": ..., "ids": [...]}`.
///
/// The folder needs only the tokenizer files (tokenizer.json; tokenizer_config.json and chat_template.jinja
/// when present).
struct TokenizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokenize",
        abstract: "Print the token ids of a text, or of a chat rendered with the model's template, as JSON."
    )

    @Option(name: .long, help: "A model folder holding tokenizer.json (and optionally tokenizer_config.json, chat_template.jinja).")
    var model: String

    @Option(name: .long, help: "The text to tokenize.")
    var text: String?

    @Option(name: .long, help: "A UTF-8 file whose whole content is the text to tokenize (instead of --text).")
    var textFile: String?

    @Option(name: .long, help: "A JSON file holding an array of {\"role\", \"content\"} messages, rendered with the chat template.")
    var messages: String?

    @Flag(name: .long, help: "With --messages: end with the template's generation prompt (the assistant's turn).")
    var addGenerationPrompt = false

    @Flag(name: .long, help: "Add the bos/eos tokens the tokenizer adds by default (off: the plain ids of the text).")
    var addSpecialTokens = false

    @Flag(name: .long, help: "Print load and encode times (and tokens per second) to standard error.")
    var timing = false

    func validate() throws {
        let inputs = [text != nil, textFile != nil, messages != nil].filter { $0 }.count
        guard inputs == 1 else { throw ValidationError("give exactly one input: --text, --text-file or --messages") }
        if addGenerationPrompt && messages == nil { throw ValidationError("--add-generation-prompt goes with --messages") }
    }

    /// The text to encode, from whichever input option was given.
    func inputText(_ tokenizer: Tokenizer) throws -> String {
        if let text { return text }
        if let textFile { return try FileSystem.readText(textFile) }
        guard let messages else { throw ValidationError("give exactly one input: --text, --text-file or --messages") }
        let json: JSONValue
        do { json = try JSONValue.parse(bytes: try FileSystem.readFile(messages)) } catch let e as JSONParseError {
            throw FileFormatError(file: messages, place: "JSON", e.description)
        }
        guard let list = json.array else {
            throw FileFormatError(file: messages, place: "top level", "expected an array of {\"role\", \"content\"} messages")
        }
        guard let template = try ChatTemplate.load(directory: model) else {
            throw ValidationError("\(model) has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json)")
        }
        return try template.render(messages: list, addGenerationPrompt: addGenerationPrompt, bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken)
    }

    func run() throws {
        let start = monotonicSeconds()
        let tokenizer = try Tokenizer(directory: model)
        let input = try inputText(tokenizer)
        let loaded = monotonicSeconds()
        let ids = tokenizer.encode(input, addSpecialTokens: addSpecialTokens)
        let encoded = monotonicSeconds()
        if timing {
            let rate = encoded > loaded ? Int(Double(ids.count) / (encoded - loaded)) : 0
            printError("load \(loaded - start) s; encode \(input.utf8.count) bytes → \(ids.count) tokens in \(encoded - loaded) s (\(rate) tokens/s)")
        }
        var fields: [(String, JSONValue)] = [("ids", .array(ids.map { .int(Int64($0)) }))]
        if messages != nil { fields.insert(("text", .string(input)), at: 0) }
        print(JSONValue.object(JSONObject(fields)).serialized(JSONValue.WriteOptions()))
    }
}
