import ArgumentParser
import QLoRA

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Time QLoRA training steps (and batch-1 decoding on the CPU) on random weights of a real architecture; prints one JSON line."
    )

    @Option(help: "Architecture: \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")).")
    var arch: String = "smollm2-135m"
    @Option(help: "Only the first N blocks of the architecture (its layer pattern kept): a long sequence's working set and time per block without the other blocks' minutes (their weights add what the plan counts).")
    var layers: Int?
    @Option(help: "Device: auto (the GPU when the CUDA driver loads and a GPU is present), cpu or cuda.")
    var device: String = "auto"
    @OptionGroup var computeDTypeOption: ComputeDTypeOption
    @Option(parsing: .unconditional, help: "Micro-batch size (rows).")
    var batch: Int = 1
    @Option(parsing: .unconditional, help: "Sequence length of each row.")
    var seq: Int = 256
    @Option(name: .customLong("lora-r"), parsing: .unconditional, help: "LoRA rank on the seven projections (a fused model's four; alpha = 2r).")
    var loraR: Int = 16
    @Option(name: .customLong("lora-dropout"), parsing: .unconditional, help: "LoRA dropout on the seven projections (qlora train's default is 0.05).")
    var loraDropout: Double = 0
    @Option(help: "GPU: the optimizer to step with: adamw, adamw_8bit, paged_adamw_8bit (qlora train's default, and so this one's), paged_adamw_32bit, or fused_adamw (the trainer's own fused fp32 AdamW).")
    var optimizer: String = TrainingConfiguration().optimizer
    @Option(parsing: .unconditional, help: "Timed steps after the warm-up steps.")
    var steps: Int = 2
    @Option(parsing: .unconditional, help: "Warm-up steps before timing (GPU; the CPU does one).")
    var warmup: Int = 2
    @Option(parsing: .unconditional, help: "Tokens to decode for the CPU batch-1 decode measurement (0 to skip).")
    var decodeTokens: Int = 32
    @Option(name: .customLong("offload-checkpoints"),
            help: "GPU: keep the gradient checkpoints in pinned host memory (on), on the GPU (off), or auto (on when the model has 3 or more blocks).")
    var offloadCheckpoints: String = "auto"
    @Option(name: .customLong("host-embedding"),
            help: "GPU: keep an untied input embedding in host memory and gather the rows there (on), on the GPU (off), or auto (on when untied).")
    var hostEmbedding: String = "auto"
    @Option(name: .customLong("keep-dropout-masks"),
            help: "GPU, with --lora-dropout: keep every block's masks as bits from the forward to the backward, hashing them once a step (on: when they fit), or hash them again in the backward (off, or auto: the default).")
    var keepDropoutMasks: String = "auto"
    @Option(name: .customLong("gpu-memory"), parsing: .unconditional, help: "GPU: behave as a card with this many GiB (the memory plan and the allocator keep within it).")
    var gpuMemory: Double?
    @Option(name: .customLong("keep-block-weights"),
            help: "GPU: keep a block's dequantized weights from its recomputation for its backward when the memory plan has room (on), or dequantize them again (off, or auto: the default).")
    var keepBlockWeights: String = "auto"
    @Option(name: .customLong("keep-attention"),
            help: "GPU: keep every block's attention output and log-sum-exp from the forward for its backward, offloaded to host memory with the checkpoints (on, or auto: the default where checkpoints are offloaded), so the recomputation skips the attention forward, or recompute it (off).")
    var keepAttention: String = "auto"
    @Option(name: .customLong("fold-lora"),
            help: "GPU: fold the LoRA rank-r products into the base GEMMs by concatenating along K (on, or auto: the default), or run them as their own GEMMs adding onto the output (off).")
    var foldLoRA: String = "auto"
    @Option(name: .customLong("fold-lora-backward"),
            help: "GPU: fold the LoRA backward's rank-r product into the dx GEMM of o_proj, gate_proj, up_proj and down_proj, dx = [dy | s·dy·B]·[W ; A] (on), or add it apart (off); auto: on, as the trainer's default. Under LoRA dropout nothing folds, and the plan leaves it off.")
    var foldLoRABackward: String = "auto"

    /// Sets each memory option whose switch is on or off (auto leaves the automatic choice): one table, so a new
    /// switch is named, checked and applied in one place.
    func applyMemorySwitches(to memory: inout CUDATrainerMemoryOptions) throws {
        let switches: [(option: String, value: String, field: WritableKeyPath<CUDATrainerMemoryOptions, Bool>)] = [
            ("offload-checkpoints", offloadCheckpoints, \.offloadCheckpoints),
            ("host-embedding", hostEmbedding, \.hostEmbedding),
            ("keep-dropout-masks", keepDropoutMasks, \.keepDropoutMasks),
            ("keep-block-weights", keepBlockWeights, \.keepBlockWeights),
            ("keep-attention", keepAttention, \.keepAttentionOutputs),
            ("fold-lora", foldLoRA, \.foldLoRA),
            ("fold-lora-backward", foldLoRABackward, \.foldLoRABackward),
        ]
        for s in switches { if let on = try Self.parseSwitch(s.value, s.option) { memory[keyPath: s.field] = on } }
    }

    /// "on", "off" or "auto" (nil).
    static func parseSwitch(_ value: String, _ option: String) throws -> Bool? {
        switch value.lowercased() {
        case "on", "true", "yes": return true
        case "off", "false", "no": return false
        case "auto": return nil
        default: throw ValidationError("--\(option) must be on, off or auto (got '\(value)')")
        }
    }

    func run() throws {
        guard let architecture = Architecture(rawValue: arch) else {
            throw ValidationError("unknown --arch '\(arch)' (choose from \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard batch > 0, seq > 1, loraR > 0, steps > 0, warmup >= 0 else {
            throw ValidationError("--batch, --lora-r and --steps must be positive, --seq at least 2")
        }
        if let layers, !(1...architecture.config.layerCount).contains(layers) {
            throw ValidationError("--layers must be 1...\(architecture.config.layerCount) for \(arch), got \(layers)")
        }
        guard (0..<1).contains(loraDropout) else { throw ValidationError("--lora-dropout must be in [0, 1), got \(loraDropout)") }
        guard decodeTokens >= 0 else { throw ValidationError("--decode-tokens must be a non-negative integer (0: skip), got \(decodeTokens)") }
        if let gpuMemory, !(gpuMemory > 0 && gpuMemory.isFinite) { throw ValidationError("--gpu-memory must be a positive number of GiB, got \(gpuMemory)") }
        do { _ = try optimizerKind() } catch { throw ValidationError("--optimizer: \(error), or \(Self.fusedAdamW) (the trainer's own fp32 AdamW)") }
        var unused = CUDATrainerMemoryOptions.allOnDevice
        try applyMemorySwitches(to: &unused)  // each switch's value checked before anything runs
        var chosen = device
        do {
            try architecture.config.checkCUDASupport(what: "bench --arch \(arch)")
        } catch {
            // The GPU kernels are not built for this architecture's head dimension: cuda is refused by name before any
            // GPU work, auto runs on the CPU.
            if ["cuda", "gpu"].contains(device.lowercased()) { throw error }
            chosen = "cpu"
        }
        switch try ComputeDevice.choose(chosen, computeDType: try computeDTypeOption.choice()) {
        case .cuda(let context):
            try runCUDA(architecture: architecture, context: context)
        case .cpu:
            try runCPU(architecture: architecture)
        }
    }

    /// The architecture's configuration, cut to `--layers` blocks.
    func config(_ architecture: Architecture) -> DecoderConfig {
        var config = architecture.config
        if let layers { config.layerCount = layers }
        return config
    }

    func runCPU(architecture: Architecture) throws {
        let config = config(architecture)
        let model = DecoderModel.random(config: config)
        // The seven projections, or a fused model's four (qkv_proj, o_proj, gate_up_proj, down_proj).
        let lora = LoRAConfig(rank: loraR, alpha: Double(2 * loraR), dropout: loraDropout, targetModules: LoRAConfig.llamaProjections)
        try model.attachLoRA(lora.resolvingDefaultTargets(for: model), seed: 0)
        let training = try CPUBenchmark.training(model: model, batch: batch, sequenceLength: seq, steps: steps)
        for layer in model.linearLayers { layer.lora = nil }
        let decode = decodeTokens > 0 ? try CPUBenchmark.decode(model: model, promptLength: 16, tokens: decodeTokens) : 0
        print(#"{"device": "cpu", "arch": "\#(arch)", "layers": \#(config.layerCount), "batch": \#(batch), "seq": \#(seq), "lora_r": \#(loraR), "lora_dropout": \#(loraDropout), "threads": \#(CPUParallelism.threads), "tokens_per_s": \#(rounded(training.tokensPerSecond)), "step_s": \#(rounded(training.stepSeconds)), "useful_tflops": \#(rounded(training.usefulTFLOPs * 1000) / 1000), "decode_tokens_per_s": \#(rounded(decode))}"#)
    }

    func runCUDA(architecture: Architecture, context: CUDAContext) throws {
        if let gpuMemory { try context.setMemoryBudget(gib: gpuMemory) }
        let config = config(architecture)
        var memory = CUDATrainerMemoryOptions.automatic(for: config)
        try applyMemorySwitches(to: &memory)
        let result = try CUDABenchmark.training(context: context, config: config, batch: batch, sequenceLength: seq,
                                                rank: loraR, dropout: Float(loraDropout), memory: memory,
                                                optimizer: try optimizerKind(), warmupSteps: warmup, steps: steps)
        let gib = { (b: Int) in rounded(Double(b) / Double(1 << 30)) }
        let used = result.plan.memory
        print(#"{"device": "cuda", "gpu": "\#(context.device.name)", "arch": "\#(arch)", "layers": \#(config.layerCount), "batch": \#(batch), "seq": \#(seq), "lora_r": \#(loraR), "lora_dropout": \#(loraDropout), "optimizer": "\#(optimizer)", "optimizer_ms": \#(rounded(result.optimizerSeconds * 1e5) / 100), "dropout_masks_kept": \#(loraDropout > 0 && used.keepDropoutMasks), "block_weights_kept": \#(used.keepBlockWeights), "attention_outputs_kept": \#(used.keepAttentionOutputs), "lora_folded": \#(used.foldLoRA), "lora_backward_folded": \#(used.foldLoRABackward), "offload_checkpoints": \#(used.offloadCheckpoints), "host_embedding": \#(used.hostEmbedding), "steps": \#(steps), "tokens_per_s": \#(rounded(result.tokensPerSecond)), "step_s": \#(rounded(result.stepSeconds * 1000) / 1000), "useful_tflops": \#(rounded(result.usefulTFLOPs)), "useful_tflops_ref_formula": \#(rounded(result.usefulTFLOPsReferenceFormula)), "peak_alloc_gib": \#(gib(result.peakAllocatedBytes)), "peak_reserved_gib": \#(gib(result.peakReservedBytes)), "driver_used_gib": \#(gib(result.driverUsedBytes)), "planned_gib": \#(gib(result.plan.total)), "planned_host_gib": \#(gib(result.plan.host)), "context_gib": \#(gib(context.contextBytes)), "budget_gib": \#(context.memoryBudget.map { "\(gib($0))" } ?? "null"), "loss_first": \#(result.firstLoss.isFinite ? "\(rounded(result.firstLoss * 1000) / 1000)" : "null"), "loss_last": \#(rounded(result.lastLoss * 1000) / 1000)}"#)
    }

    func rounded(_ x: Double) -> Double { (x * 100).rounded() / 100 }

    /// The kind `--optimizer` names; nil: fused_adamw, the trainer's own.
    func optimizerKind() throws -> OptimizerKind? {
        optimizer.lowercased() == Self.fusedAdamW ? nil : try OptimizerKind.parse(optimizer)
    }

    static let fusedAdamW = "fused_adamw"

}
