import ArgumentParser
import QLoRA
#if canImport(Glibc)
import Glibc
#endif

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Generate text from a prompt (with --chat, through the model's chat template), streaming tokens as they come."
    )

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "The prompt (with --chat, the user message).")
    var prompt: String

    @Flag(help: "Apply the model's chat template to the prompt as a user message, with the generation prompt.")
    var chat = false

    @Option(help: "A system message for --chat.")
    var system: String?

    @Option(parsing: .unconditional, help: "The most tokens to generate.")
    var maxTokens: Int = 256

    @Option(parsing: .unconditional, help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0

    @Option(parsing: .unconditional, help: "Sample only from the k most likely tokens (0: all).")
    var topK: Int = 0

    @Option(parsing: .unconditional, help: "Sample only from the smallest set of tokens whose probability reaches p (1: all).")
    var topP: Float = 1

    @Option(parsing: .unconditional, help: "Random seed for sampling: an integer from 0 to 2^64-1.")
    var seed: UInt64 = 0

    @Option(help: "Where to run: auto (the GPU when one is usable, else the CPU), cpu or cuda.")
    var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption

    func validate() throws {
        // Before the model loads: a bad option is reported at once.
        try Generator.validate(maxTokens: maxTokens, sampling: SamplingOptions(temperature: temperature, topK: topK, topP: topP, seed: seed))
    }

    func run() throws {
        let compute = try ComputeDevice.choose(device, computeDType: try computeDTypeOption.choice())
        let loaded = try modelOptions.load()
        guard let tokenizer = loaded.tokenizer else { throw ValidationError("\(loaded.directory) has no tokenizer.json") }
        var promptIDs: [Int]
        if chat {
            guard let template = loaded.template else { throw ValidationError("\(loaded.directory) has no chat template; drop --chat") }
            var messages: [JSONValue] = []
            if let system { messages.append(.object(JSONObject([("role", .string("system")), ("content", .string(system))]))) }
            messages.append(.object(JSONObject([("role", .string("user")), ("content", .string(prompt))])))
            let text = try template.render(messages: messages, addGenerationPrompt: true, bosToken: tokenizer.bosToken, eosToken: tokenizer.eosToken)
            promptIDs = tokenizer.encode(text)
        } else {
            promptIDs = tokenizer.encode(prompt, addSpecialTokens: true)
        }
        var decoder = StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true)
        let sampling = SamplingOptions(temperature: temperature, topK: topK, topP: topP, seed: seed)
        let stopIDs = Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer)
        let onToken = { (id: Int) in
            print(decoder.append(id), terminator: "")
            fflush(stdout)
        }
        let result: GenerationResult
        switch compute {
        case .cpu:
            result = try Generator.generate(model: loaded.model, prompt: promptIDs, maxTokens: maxTokens, sampling: sampling,
                                            stopIDs: stopIDs, onToken: onToken)
        case .cuda(let context):
            // The GPU holds the base in NF4 (quantized here when the model was loaded dense) and the adapter unmerged.
            let inference = try CUDAInference(context: context, model: loaded.model,
                                              capacity: min(promptIDs.count + maxTokens, loaded.model.config.maxPositionEmbeddings))
            printError("gpu: base weights in NF4 + double quant, adapter unmerged; "
                       + String(cFormat: "%.2f MB of weights read per token", Double(inference.weightBytesPerToken) / 1e6))
            result = try Generator.generate(inference: inference, prompt: promptIDs, maxTokens: maxTokens, sampling: sampling,
                                            stopIDs: stopIDs, onToken: onToken)
        }
        print(decoder.finish())
        let speeds = String(cFormat: "%d prompt tokens at %.1f tok/s, %d generated at %.1f tok/s", promptIDs.count, result.promptTokensPerSecond,
                            result.tokens.count, result.decodeTokensPerSecond)
        printError("[" + speeds + (result.stoppedAtEOS ? ", stopped at EOS]" : "]"))
    }
}
