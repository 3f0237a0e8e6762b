import ArgumentParser
import QLoRA

#if canImport(Glibc)
import Glibc
#endif

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Convert a llama GGUF file into a Hugging Face model folder (config.json, bf16 model.safetensors, tokenizer files)."
    )

    @Argument(help: "The GGUF file to convert (llama architecture; F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 or K-quant tensors).")
    var gguf: String

    @Option(name: .long, help: "The folder to write: a new folder, or an earlier convert output, which is replaced as a whole.")
    var out: String

    func run() throws {
        try FileSystem.refuseOverwrite(output: out, option: "--out", inputs: [("GGUF file", gguf)])
        try FileSystem.checkReplaceable(out, option: "--out", replaceable: GGUFConverter.outputFiles)
        try GGUFConverter.convert(gguf: gguf, to: out) { message in
            fputs(message + "\n", stderr)
        }
        print(out)
    }
}
