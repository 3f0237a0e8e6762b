import ArgumentParser
import QLoRA

/// What a QLoRA run holds on the GPU, and what fits a card of a given size, computed by the trainer's own memory
/// plan (no GPU needed). `--table` prints docs/MEMORY.md's table.
struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "GPU memory of a QLoRA training run, and the longest sequence and largest batch that fit a card (no GPU needed).",
        discussion: "The plan is the one `qlora train`/`bench` check before allocating (NF4 base, LoRA on the seven projections, "
            + "gradient checkpointing, the optimizer's state, LoRA dropout's buffers; --optimizer and --lora-dropout default as "
            + "`qlora train` does); a card's budget is its memory less the CUDA context (about "
            + "\(DeviceAllocator.formatGiB(CUDAMemoryPlan.typicalContextBytes)) GiB) and a safety margin."
    )

    @Option(help: "Architecture: \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")).")
    var arch: String = "llama-3.1-8b"
    @Option(parsing: .unconditional, help: "Rows per micro-batch.") var batch: Int = 1
    @Option(parsing: .unconditional, help: "Tokens per row.") var seq: Int = 2048
    @Option(name: .customLong("lora-r"), parsing: .unconditional, help: "LoRA rank on the seven projections.") var loraR: Int = 16
    @Option(name: .customLong("offload-checkpoints"), help: "Gradient checkpoints in pinned host memory: on, off or auto.")
    var offloadCheckpoints: String = "auto"
    @Option(name: .customLong("gpu-memory"), parsing: .unconditional, help: "Card sizes in GiB, comma-separated (e.g. 24 or 12,16,24,48,80).")
    var gpuMemory: String = "12,16,24,48,80"
    @Flag(help: "Print the markdown table of docs/MEMORY.md (every architecture, rank 16 and 64, offload on and off).")
    var table = false
    @Option(parsing: .unconditional, help: "GPUs of the job (data parallel: the plan is each rank's; --batch is per GPU).")
    var gpus: Int = 1
    @Option(help: "The optimizer whose state is counted: adamw, adamw_8bit, paged_adamw_8bit (train's default: state in pinned host memory) or paged_adamw_32bit.")
    var optimizer: String = TrainingConfiguration().optimizer
    @Option(name: .customLong("lora-dropout"), parsing: .unconditional, help: "LoRA dropout (train's default; above 0 the plan counts its scratch and mask bits).")
    var loraDropout: Double = TrainingConfiguration().loraDropout
    @Flag(help: "The base sharded over the --gpus ranks (train --shard-base): each rank holds 1/N of the blocks and two gathered blocks. With one --gpu-memory, refuses (exit status 1) when a rank does not fit.")
    var shardBase = false
    @Option(name: .customLong("host-memory"), parsing: .unconditional, help: "RAM of the machine that trains, in GiB (default: this machine's). Kept attention outputs are planned only where three quarters of it hold the pinned copies, as the trainer decides.")
    var hostMemory: Double?

    func budgets() throws -> [Double] {
        let values = gpuMemory.split(separator: ",").map { Double($0.filter { !$0.isWhitespace }) }
        guard !values.isEmpty, values.allSatisfy({ ($0 ?? 0) > 0 && ($0 ?? 0).isFinite }) else {
            throw ValidationError("--gpu-memory: expected positive numbers of GiB separated by commas, got '\(gpuMemory)'")
        }
        return values.map { $0! }
    }

    func run() throws {
        let budgets = try budgets()
        guard batch > 0, seq > 0, loraR > 0 else { throw ValidationError("--batch, --seq and --lora-r must be positive") }
        let kind: OptimizerKind
        do { kind = try OptimizerKind.parse(optimizer) } catch { throw ValidationError("--optimizer: \(error)") }
        guard loraDropout.isFinite, loraDropout >= 0, loraDropout < 1 else {
            throw ValidationError("--lora-dropout must be in [0, 1), got \(loraDropout)")
        }
        let dropout = loraDropout > 0
        if let hostMemory, !(hostMemory.isFinite && hostMemory > 0) {
            throw ValidationError("--host-memory must be a positive number of GiB, got \(hostMemory)")
        }
        if table { return printTable(budgets: budgets, dropout: dropout, optimizer: kind) }
        guard let architecture = Architecture(rawValue: arch) else {
            throw ValidationError("unknown --arch '\(arch)' (choose from \(Architecture.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        let config = architecture.config
        // The plan is the GPU trainer's; a model the GPU does not compute has none.
        do { try config.checkCUDASupport(what: "plan --arch \(arch)") } catch {
            throw ValidationError("\(error) (plan is the GPU trainer's memory; `qlora bench --arch \(arch) --device cpu` runs it on the CPU)")
        }
        guard gpus >= 1 else { throw ValidationError("--gpus must be at least 1, got \(gpus)") }
        var memory = CUDATrainerMemoryOptions.automatic(for: config)
        if let on = try BenchCommand.parseSwitch(offloadCheckpoints, "offload-checkpoints") { memory.offloadCheckpoints = on }
        let world: Int? = shardBase ? gpus : nil
        // train --shard-base shards the adapters' optimizer state (ZeRO-2) and the head by vocabulary too (both on by default with it).
        let adapterWorld: Int? = shardBase && gpus > 1 ? gpus : nil
        let headWorld = adapterWorld
        let plan = CUDAMemoryPlan(config: config, tokens: batch * seq, rank: loraR, dropout: dropout, memory: memory, shardedOver: world,
                                  optimizer: kind, adaptersShardedOver: adapterWorld, headShardedOver: headWorld)
        let job = gpus > 1 || shardBase ? " per rank of \(gpus) GPU\(gpus > 1 ? "s" : "")" + (shardBase ? ", base sharded" : ", whole base on each") : ""
        print("\(arch), \(batch) x \(seq) tokens\(job), LoRA r=\(loraR): \(plan)")
        if dropout {
            let cost = plan.total - plan.replanned(dropout: false).total
            print("  counted: LoRA dropout \(loraDropout) (qlora train's default 0.05; --lora-dropout 0 leaves it out): its scratch, mask "
                  + "bits and every block's d(x)·Aᵀ, \(DeviceAllocator.formatGiB(cost)) GiB")
        }
        for line in Self.savings(plan) { print("  " + line) }
        for gib in budgets {
            let bytes = Int(gib * Double(1 << 30))
            let longest = CUDAMemoryPlan.longestSequence(config: config, batch: batch, rank: loraR, memory: memory, budgetBytes: bytes,
                                                         shardedOver: world, dropout: dropout, optimizer: kind, adaptersShardedOver: adapterWorld,
                                                         headShardedOver: headWorld)
            let widest = CUDAMemoryPlan.largestBatch(config: config, sequenceLength: seq, rank: loraR, memory: memory, budgetBytes: bytes,
                                                     shardedOver: world, dropout: dropout, optimizer: kind, adaptersShardedOver: adapterWorld,
                                                     headShardedOver: headWorld)
            // Without room for a block's dequantized weights the trainer drops back to dequantizing them again.
            let fitted = plan.fitting(budgetBytes: bytes, hostBytes: pinnableHostBytes)
            var path = ""
            if fitted.fits(budgetBytes: bytes) && plan.memory.keepBlockWeights {
                path += fitted.memory.keepBlockWeights ? ", a block's dequantized weights kept for its backward"
                    : ", weights dequantized again in the backward (no room to keep a block's)"
            }
            if fitted.fits(budgetBytes: bytes) && dropout && plan.memory.keepDropoutMasks {
                path += fitted.memory.keepDropoutMasks ? ", every block's dropout masks kept"
                    : ", dropout masks hashed again in the backward (no room to keep every block's)"
            }
            if fitted.fits(budgetBytes: bytes) && plan.memory.keepAttentionOutputs {
                let withKept = fitted.replanned(memory: { var m = fitted.memory; m.keepAttentionOutputs = true; return m }())
                path += fitted.memory.keepAttentionOutputs ? ", attention outputs kept (pinned host \(DeviceAllocator.formatGiB(fitted.host)) GiB)"
                    : withKept.fits(budgetBytes: bytes) && pinnableHostBytes.map({ withKept.host > $0 }) == true
                        ? ", attention recomputed (keeping its outputs needs \(DeviceAllocator.formatGiB(withKept.host)) GiB of pinned host memory, "
                            + "over three quarters of the host's \(DeviceAllocator.formatGiB(hostPhysicalBytes ?? 0)) GiB)"
                        : ", attention recomputed (no room to keep its outputs)"
            }
            print("  \(gib) GiB card: \(Self.verdict(fitted, budgetBytes: bytes))\(path); longest sequence at batch \(batch): "
                  + (longest.map { "\($0)" } ?? "none (the weights alone do not fit)") + "; largest batch of \(seq): \(widest)")
        }
        // One card size asked about a job: an answer a script can act on.
        if budgets.count == 1, gpus > 1 || shardBase {
            let bytes = Int(budgets[0] * Double(1 << 30))
            let fitted = plan.fitting(budgetBytes: bytes, hostBytes: pinnableHostBytes)
            guard fitted.fits(budgetBytes: bytes) else {
                // Not a usage mistake (no usage text): an answer, with the exit status a script can test.
                throw UsageError("\(arch) at \(batch) x \(seq) does not fit \(gpus) card\(gpus > 1 ? "s" : "") of \(budgets[0]) GiB: "
                                 + "each rank needs \(DeviceAllocator.formatGiB(fitted.total)) GiB besides the CUDA context and margin "
                                 + "(\(DeviceAllocator.formatGiB(CUDAMemoryPlan.typicalContextBytes + CUDAMemoryPlan.safetyMarginBytes)) GiB), "
                                 + "\(DeviceAllocator.formatGiB(-fitted.spareBytes(budgetBytes: bytes))) GiB too much. "
                                 + (shardBase ? "Use" : "Shard the base over the GPUs (--shard-base), use")
                                 + " more GPUs, or lower --batch, --seq or --lora-r")
            }
        }
    }

    /// The RAM of the machine that trains: --host-memory, else this machine's.
    var hostPhysicalBytes: Int? { hostMemory.map { Int($0 * Double(1 << 30)) } ?? HostMemory.physicalBytes }
    var pinnableHostBytes: Int? { hostPhysicalBytes.map(HostMemory.pinnableBytes) }

    /// What the plan saves against the whole-state, whole-base layout, one line each (empty when nothing is saved).
    static func savings(_ plan: CUDAMemoryPlan) -> [String] {
        let g = { (b: Int) in DeviceAllocator.formatGiB(b) + " GiB" }
        var lines: [String] = []
        let unpaged = plan.replanned(optimizer: .some(.adamw))
        if plan.optimizer < unpaged.optimizer, let kind = plan.optimizerKind {
            lines.append("saved: \(g(unpaged.optimizer - plan.optimizer)) of optimizer state that \(kind.rawValue) keeps "
                         + (plan.optimizerHost > 0 ? "in pinned host memory (\(g(plan.optimizerHost)) there)" : "in 8 bits")
                         + " instead of adamw's fp32 moments on the GPU")
        }
        if plan.adapterShardedWorld > 1 {
            let whole = plan.replanned(adaptersShardedOver: .some(nil))
            // The paged kinds keep their state on the host: there the saving is host memory (the device slots stay).
            let parts = [(whole.optimizer - plan.optimizer, "of optimizer state on the GPU"),
                         (whole.optimizerHost - plan.optimizerHost, "of pinned host memory")].filter { $0.0 > 0 }
            if !parts.isEmpty {
                lines.append("saved: " + parts.map { "\(g($0.0)) \($0.1)" }.joined(separator: " and ")
                             + " by sharding the adapters over \(plan.adapterShardedWorld) ranks (ZeRO-2: each rank steps its own LoRA tensors "
                             + "and holds their optimizer state only)")
            }
            if whole.adapters > plan.adapters {
                lines.append("saved: \(g(whole.adapters - plan.adapters)) of adapters by sharding their fp32 masters and gradients over "
                             + "\(plan.adapterShardedWorld) ranks (ZeRO-2: each rank its own tensors', with two gradient buckets of a block, "
                             + "\(g(plan.gradientBuckets)), the bf16 copies whole)")
            }
        }
        if plan.headShardedWorld > 1 {
            let whole = plan.replanned(headShardedOver: .some(nil))
            if whole.weights > plan.weights {
                lines.append("saved: \(g(whole.total - plan.total)) of head by sharding it by vocabulary over \(plan.headShardedWorld) ranks "
                             + "(its slice \(g(plan.headSlice)) of \(g(whole.weights - plan.weights + plan.headSlice)); counted: the other ranks' "
                             + "normed rows, the statistics and a chunk of fp32 d(hidden), \(g(plan.headExchange)))")
            } else {
                lines.append("counted: \(g(plan.headExchange)) for the head's loss by vocabulary over \(plan.headShardedWorld) ranks "
                             + "(tied embeddings: the table stays whole for the embedding, so the head saves nothing)")
            }
        }
        if plan.baseShards > 0 {
            let whole = plan.replanned(shardedOver: .some(nil))
            if whole.weights > plan.weights {
                lines.append("saved: \(g(whole.weights - plan.weights)) of NF4 base by sharding its blocks over \(plan.shardedWorld) ranks")
            }
        }
        return lines
    }

    /// "fits, 1.2 GiB to spare" or "does not fit, 3.4 GiB short".
    static func verdict(_ plan: CUDAMemoryPlan, budgetBytes: Int) -> String {
        verdict(spare: plan.spareBytes(budgetBytes: budgetBytes))
    }

    static func verdict(spare: Int) -> String {
        return spare >= 0 ? "fits, \(DeviceAllocator.formatGiB(spare)) GiB to spare" : "does not fit, \(DeviceAllocator.formatGiB(-spare)) GiB short"
    }

    /// Rows: architecture × rank × checkpoint placement; cells: the longest batch-1 sequence / the largest batch of
    /// 2048-token rows.
    func printTable(budgets: [Double], dropout: Bool, optimizer: OptimizerKind) {
        let header = budgets.map { "\(Int($0)) GB" }
        print("| model | LoRA r | checkpoints | " + header.joined(separator: " | ") + " |")
        print("| --- | --- | --- | " + header.map { _ in "---" }.joined(separator: " | ") + " |")
        // Only the architectures the GPU trainer computes (the others run on the CPU for now).
        for architecture in Architecture.allCases where (try? architecture.config.checkCUDASupport(what: "")) != nil {
            let config = architecture.config
            for rank in [16, 64] {
                for offload in [true, false] {
                    var memory = CUDATrainerMemoryOptions.automatic(for: config)
                    memory.offloadCheckpoints = offload
                    let cells = budgets.map { gib -> String in
                        let bytes = Int(gib * Double(1 << 30))
                        guard let longest = CUDAMemoryPlan.longestSequence(config: config, batch: 1, rank: rank, memory: memory,
                                                                            budgetBytes: bytes, dropout: dropout, optimizer: optimizer)
                        else { return "—" }
                        let widest = CUDAMemoryPlan.largestBatch(config: config, sequenceLength: 2048, rank: rank, memory: memory,
                                                                 budgetBytes: bytes, dropout: dropout, optimizer: optimizer)
                        // Offloaded checkpoints (and a paged optimizer's state) wait in pinned host memory: the
                        // machine needs that much RAM too.
                        let host = CUDAMemoryPlan(config: config, tokens: longest, rank: rank, dropout: dropout, memory: memory,
                                                  optimizer: optimizer).fitting(budgetBytes: bytes).host
                        return "\(longest.formatted()) / \(widest)" + (offload ? " (host \(DeviceAllocator.formatGiB(host)))" : "")
                    }
                    print("| \(architecture.rawValue) | \(rank) | \(offload ? "host" : "GPU") | " + cells.joined(separator: " | ") + " |")
                }
            }
        }
    }
}

private extension Int {
    /// 131072 → "131,072".
    func formatted() -> String {
        let digits = String(self)
        var out = ""
        for (i, ch) in digits.enumerated() {
            if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
            out.append(ch)
        }
        return out
    }
}
