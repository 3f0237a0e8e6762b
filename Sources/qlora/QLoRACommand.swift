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
}
