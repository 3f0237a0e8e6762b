import ArgumentParser
import QLoRA

@main
struct QLoRACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qlora",
        abstract: "QLoRA fine-tuning of Llama-family models: 4-bit NF4 base, LoRA adapters, PEFT-compatible files.",
        subcommands: [
            InspectCommand.self,
            QuantizeCommand.self,
            QuantizeBenchmarkCommand.self,
        ]
    )
}
