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

    @Option(name: .long, help: "A UTF-8 file whose whole content is the text to tokenize (instead of --text).")
    var textFile: String?

    @Flag(name: .long, help: "Add the bos/eos tokens the tokenizer adds by default (off: the plain ids of the text).")
    var addSpecialTokens = false

    func validate() throws {
        let inputs = [text != nil, textFile != nil].filter { $0 }.count
        guard inputs == 1 else { throw ValidationError("give exactly one input: --text or --text-file") }
    }

    /// The text to encode, from whichever input option was given.
    func inputText(_ tokenizer: Tokenizer) throws -> String {
        if let text { return text }
        if let textFile { return try FileSystem.readText(textFile) }
        throw ValidationError("give exactly one input: --text or --text-file")
    }

    func run() throws {
        let tokenizer = try Tokenizer(directory: model)
        let ids = tokenizer.encode(try inputText(tokenizer), addSpecialTokens: addSpecialTokens)
        let json = JSONValue.object(JSONObject([("ids", .array(ids.map { .int(Int64($0)) }))]))
        print(json.serialized(JSONValue.WriteOptions()))
    }
}
