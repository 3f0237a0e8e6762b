import ArgumentParser
import QLoRA
#if canImport(Glibc)
import Glibc
#endif

struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Generate text from a prompt (with --chat, through the model's chat template), streaming tokens as they come.",
        discussion: """
        --prompts-file F.jsonl answers many prompts (one JSON object a line: "prompt", rendered as training renders it, or \
        through the chat template with --chat; or "messages", rendered with the generation prompt) and writes one JSON line \
        per answer ({"line", "prompt", "answer", "tokens", "stopped_at_eos"}) to standard output or --out.
        """
    )

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "The prompt (with --chat, the user message).")
    var prompt: String?

    @Option(help: "A JSONL file of prompts to answer, one a line ({\"prompt\": ...} or {\"messages\": [...]}); JSONL out.")
    var promptsFile: String?

    @Option(help: "With --prompts-file: write the answers' JSONL here (written beside and renamed) instead of standard output.")
    var out: String?

    @Flag(help: "Apply the model's chat template to the prompt as a user message, with the generation prompt.")
    var chat = false

    @Option(help: "A system message for --chat.")
    var system: String?

    @Option(parsing: .unconditional, help: "The most tokens to generate.")
    var maxTokens: Int = 256

    @OptionGroup var samplingArguments: SamplingArguments

    @Option(help: "Where to run: auto (the GPU when one is usable, else the CPU), cpu or cuda.")
    var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption

    func validate() throws {
        // Before the model loads: a bad option is reported at once.
        try Generator.validate(maxTokens: maxTokens, sampling: samplingArguments.options)
        guard (prompt == nil) != (promptsFile == nil) else { throw ValidationError("give one of --prompt and --prompts-file") }
        if out != nil && promptsFile == nil { throw ValidationError("--out goes with --prompts-file") }
    }

    func run() throws {
        let compute = try ComputeDevice.choose(device, computeDType: try computeDTypeOption.choice())
        let loaded = try modelOptions.load()
        guard let tokenizer = loaded.tokenizer else { throw ValidationError("\(loaded.directory) has no tokenizer.json") }
        if let promptsFile { return try answerFile(promptsFile, compute: compute, loaded: loaded, tokenizer: tokenizer) }
        let prompt = prompt ?? ""
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
        let sampling = samplingArguments.options
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

    /// --prompts-file: every line's prompt through `AnswerGeneration` (the path eval --generate takes), JSONL out.
    func answerFile(_ path: String, compute: ComputeDevice, loaded: LoadedModel, tokenizer: Tokenizer) throws {
        if let out { try FileSystem.refuseOverwrite(output: out, option: "--out", inputs: [("prompts file", path)]) }
        let prompts = try PromptsFile.read(path: path, tokenizer: tokenizer, template: loaded.template, chat: chat, system: system)
        let stopIDs = Generator.stopIDs(config: loaded.model.config, tokenizer: tokenizer)
        func answer(on compute: ComputeDevice) throws -> [GeneratedAnswer] {
            let generator = try compute.batchGenerator(model: loaded.model)
            printError("answering \(prompts.count) prompts on the \(generator.deviceName)...")
            return try AnswerGeneration.generate(prompts: prompts.map(\.ids), generator: generator, tokenizer: tokenizer, maxTokens: maxTokens,
                                                 sampling: samplingArguments.options, stopIDs: stopIDs)
        }
        let start = monotonicSeconds()
        let answers: [GeneratedAnswer]
        do {
            answers = try answer(on: compute)
        } catch where device.lowercased() == "auto" && compute.isCUDA {
            printError("device: cpu after all (auto: \(error))")
            answers = try answer(on: .cpu)
        }
        let seconds = monotonicSeconds() - start
        let text = zip(prompts, answers).map { p, a in
            JSONValue.object(JSONObject([
                ("line", .int(Int64(p.line))), ("prompt", .string(tokenizer.decode(p.ids))), ("answer", .string(a.text)),
                ("tokens", .int(Int64(a.tokens.count))), ("stopped_at_eos", .bool(a.stoppedAtEOS)),
            ])).serialized(.init()) + "\n"
        }.joined()
        if let out { try FileSystem.writeAtomically(out, text: text) } else { print(text, terminator: "") }
        let tokens = answers.reduce(0) { $0 + $1.tokens.count }
        printError(String(cFormat: "[%d answers, %d tokens in %.1f s: %.1f tok/s]", answers.count, tokens, seconds, Double(tokens) / max(seconds, 1e-9)))
    }
}
