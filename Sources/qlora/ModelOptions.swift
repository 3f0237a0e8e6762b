import ArgumentParser
import QLoRA

/// The options every command that runs a model shares.
struct ModelOptions: ParsableArguments {
    @Option(help: "A model folder (Hugging Face layout) or a known name (smollm2-135m, fetched on first use).")
    var model: String = ModelCatalog.defaultModel

    @Option(help: "A PEFT LoRA adapter folder to apply (ours or any PEFT adapter).")
    var adapter: String?

    @Option(help: "Quantize the base on load: nf4, fp4 or none. A bitsandbytes 4-bit folder loads as it is.")
    var quantize: String = "none"

    /// Loads the model and applies the adapter, saying what it did on standard error.
    func load() throws -> LoadedModel {
        let loaded = try ModelLoader.load(model, quantization: try BaseQuantization.parse(quantize), log: { printError($0) })
        printError("model: \(loaded.description)")
        if let adapter {
            let config = try PEFTAdapter.load(directory: adapter, into: loaded.model)
            printError("adapter: \(adapter) (r=\(config.rank), alpha=\(config.alpha), \(loaded.model.linearLayers.filter { $0.lora != nil }.count) layers)")
        }
        return loaded
    }
}

extension ComputeDevice {
    /// Resolves `--device auto|cpu|cuda` and says on standard error which device was chosen. `auto` takes the GPU when
    /// the driver loads, a GPU is present and the kernels' compiler (NVRTC) is found; otherwise the CPU, saying why.
    static func choose(_ name: String) throws -> ComputeDevice {
        switch name.lowercased() {
        case "cpu":
            printError("device: cpu")
            return .cpu
        case "cuda", "gpu":
            let context = try CUDAContext()
            printError("device: cuda (\(context.device.name); kernels \(context.kernelDescription))")
            return .cuda(context)
        case "auto":
            do {
                guard try CUDADriver.shared().deviceCount() > 0 else {
                    printError("device: cpu (auto: the CUDA driver reports no GPU)")
                    return .cpu
                }
                let context = try CUDAContext()
                printError("device: cuda (auto: \(context.device.name); kernels \(context.kernelDescription))")
                return .cuda(context)
            } catch {
                printError("device: cpu (auto: \(error))")
                return .cpu
            }
        default:
            throw ValidationError("unknown device '\(name)' (choose from auto, cpu, cuda)")
        }
    }
}

/// Writes a line to standard error (progress and diagnostics; results go to standard output).
func printError(_ line: String) {
    var stream = StandardError()
    print(line, to: &stream)
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) { fputs(string, stderr) }
}

#if canImport(Glibc)
import Glibc
#endif
