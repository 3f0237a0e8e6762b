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

/// `--compute-dtype`, shared by the commands that run a model on the GPU.
struct ComputeDTypeOption: ParsableArguments {
    @Option(name: .customLong("compute-dtype"),
            help: "GPU compute type: auto (bf16 where the card has it, compute capability 8.0+; fp16 before, e.g. a T4), bf16 or fp16 (training scales the loss dynamically). Also QLORA_COMPUTE_DTYPE.")
    var computeDType: String?

    /// The choice given, or nil (then QLORA_COMPUTE_DTYPE, else auto).
    func choice() throws -> ComputeDTypeChoice? {
        do { return try computeDType.map { try ComputeDTypeChoice(parsing: $0) } } catch { throw ValidationError("\(error)") }
    }
}

extension ComputeDevice {
    /// Resolves `--device auto|cpu|cuda` and says on standard error which device was chosen. `auto` takes the GPU when
    /// the driver loads, a GPU is present and the kernels' compiler (NVRTC) is found; otherwise the CPU, saying why.
    /// `computeDType`: the GPU's 16-bit type (nil: QLORA_COMPUTE_DTYPE, else auto); the CPU always computes in fp32.
    static func choose(_ name: String, computeDType: ComputeDTypeChoice? = nil) throws -> ComputeDevice {
        switch name.lowercased() {
        case "cpu":
            printError("device: cpu" + (computeDType.map { $0 == .auto ? "" : " (fp32; --compute-dtype \($0) applies to the GPU)" } ?? ""))
            return .cpu
        case "cuda", "gpu":
            let context = try CUDAContext(computeDType: computeDType)
            printError("device: cuda (\(context.device.name); kernels \(context.kernelDescription))")
            return .cuda(context)
        case "auto":
            do {
                guard try CUDADriver.shared().deviceCount() > 0 else {
                    printError("device: cpu (auto: the CUDA driver reports no GPU)")
                    return .cpu
                }
                let context = try CUDAContext(computeDType: computeDType)
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
