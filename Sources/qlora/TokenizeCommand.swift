import ArgumentParser
import QLoRA

/// `qlora tokenize --model DIR --text TEXT`: prints the token ids of a text as `{"ids": [...]}`.
///
/// The folder needs only tokenizer.json (tokenizer_config.json is read when present). Inputs are
/// resolved in `inputText(_:)`; a chat input (`--messages`, rendered with the chat template) slots in
/// there as one more case.
struct TokenizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tokenize",
        abstract: "Print the token ids of a text as JSON: {\"ids\": [...]}."
    )

    @Option(name: .long, help: "A model folder holding tokenizer.json (and optionally tokenizer_config.json).")
    var model: String

    @Option(name: .long, help: "The text to tokenize.")
    var text: String?

    @Flag(name: .long, help: "Add the bos/eos tokens the tokenizer adds by default (off: the plain ids of the text).")
    var addSpecialTokens = false

    func validate() throws {
        guard text != nil else { throw ValidationError("give the input with --text") }
    }

    /// The text to encode, from whichever input option was given.
    func inputText(_ tokenizer: Tokenizer) throws -> String {
        if let text { return text }
        throw ValidationError("give the input with --text")
    }

    func run() throws {
        let tokenizer = try Tokenizer(directory: model)
        let ids = tokenizer.encode(try inputText(tokenizer), addSpecialTokens: addSpecialTokens)
        let json = JSONValue.object(JSONObject([("ids", .array(ids.map { .int(Int64($0)) }))]))
        print(json.serialized(JSONValue.WriteOptions()))
    }
}
