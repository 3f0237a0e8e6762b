import ArgumentParser
import QLoRA

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a model folder, safetensors file or GGUF file: architecture, parameters, tensors, bytes."
    )

    @Argument(help: "A model folder, a .safetensors file or a .gguf file.")
    var path: String

    func run() throws {
        let file = try SafeTensorsFile(path: path)
        for t in file.tensors { print(t.name, t.dtype.rawValue, t.shape, t.byteCount) }
    }
}
