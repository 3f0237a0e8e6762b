import ArgumentParser
import QLoRA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

private func printError(_ line: String) {
    fputs(line + "\n", stderr)
}

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

    @Flag(name: .long, help: "Print load and encode times (and tokens per second) to standard error.")
    var timing = false

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
        let clock = ContinuousClock()
        let start = clock.now
        let tokenizer = try Tokenizer(directory: model)
        let input = try inputText(tokenizer)
        let loaded = clock.now
        let ids = tokenizer.encode(input, addSpecialTokens: addSpecialTokens)
        let encoded = clock.now
        if timing {
            func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18 }
            let load = seconds(loaded - start), encode = seconds(encoded - loaded)
            let rate = encode > 0 ? Int(Double(ids.count) / encode) : 0
            printError("load \(load) s; encode \(input.utf8.count) bytes → \(ids.count) tokens in \(encode) s (\(rate) tokens/s)")
        }
        let json = JSONValue.object(JSONObject([("ids", .array(ids.map { .int(Int64($0)) }))]))
        print(json.serialized(JSONValue.WriteOptions()))
    }
}
