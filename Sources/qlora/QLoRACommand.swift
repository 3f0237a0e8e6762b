import ArgumentParser
import QLoRA

@main
struct QLoRACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qlora",
        abstract: "QLoRA fine-tuning of Llama-family models: 4-bit NF4 base, LoRA adapters, PEFT-compatible files.",
        subcommands: [
            DemoCommand.self,
            FetchCommand.self,
            ConvertCommand.self,
            InspectCommand.self,
            TokenizeCommand.self,
            TrainCommand.self,
            GenerateCommand.self,
            EvalCommand.self,
            MergeCommand.self,
            QuantizeCommand.self,
            BenchCommand.self,
            QuantizeBenchmarkCommand.self,
            GemmBenchmarkCommand.self,
            BenchDecodeCommand.self,
        ]
    )

    /// ArgumentParser's main, then a check that the results printed reached standard output: on a full disk
    /// (`qlora tokenize ... > out.json`) print() fails silently, and the exit status must say so.
    static func main() async {
        await main(nil)
        if fflush(stdout) != 0 || ferror(stdout) != 0 {
            fputs("Error: cannot write the results to standard output: \(String(cString: strerror(errno)))\n", stderr)
            exit(1)
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
