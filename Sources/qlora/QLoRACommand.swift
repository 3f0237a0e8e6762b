import ArgumentParser
import QLoRA

@main
struct QLoRACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qlora",
        abstract: "QLoRA fine-tuning of Llama-family models: 4-bit NF4 base, LoRA adapters, PEFT-compatible files.",
        version: BuildInfo.versionLine,
        subcommands: [
            DemoCommand.self,
            FetchCommand.self,
            ConvertCommand.self,
            ExportCommand.self,
            InspectCommand.self,
            TokenizeCommand.self,
            TrainCommand.self,
            GenerateCommand.self,
            EvalCommand.self,
            MergeCommand.self,
            QuantizeCommand.self,
            BenchCommand.self,
            PlanCommand.self,
            QuantizeBenchmarkCommand.self,
            GemmBenchmarkCommand.self,
            BenchDecodeCommand.self,
        ]
    )

    /// ArgumentParser's main, then a check that the results printed reached standard output: on a full disk
    /// (`qlora tokenize ... > out.json`) print() fails silently, and the exit status must say so.
    static func main() async {
        await main(nil)
        errno = 0
        let flushed = fflush(stdout) == 0
        let reason = flushed ? "an earlier write failed" : String(cString: strerror(errno))
        if !flushed || ferror(stdout) != 0 {
            fputs("Error: cannot write the results to standard output: \(reason)\n", stderr)
            Glibc.exit(1)
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
