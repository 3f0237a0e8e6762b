// The CUDA training engine: `CUDADecoderTrainer` (bf16 forward/backward with fp32 LoRA masters and gradients) with
// `CUDAOptimizer` over the trainer's flat LoRA buffers, so every optimizer kind (adamw, adamw_8bit and the paged
// variants) runs on the GPU with the CPU's state names: a checkpoint saved on one backend resumes on the other.
//
// LoRA dropout draws the CPU's masks (the step's dropout seed goes to the trainer), linear biases stay frozen, and
// each projection may have its own rank or no adapter at all (PEFT's target_modules naming only some projections).
// Evaluation runs the forward alone (`CUDADecoderTrainer.forwardLoss`), without dropout: no backward, and the gradients
// are not touched.
//
// With fp16 compute (`CUDAContext.computeDType`) the engine scales the loss as torch.amp.GradScaler does
// (Training/GradScaler.swift): the cross-entropy's gradient is multiplied by the scale S, the fp32 LoRA gradients
// are multiplied by 1/S before clipping, and a step whose unscaled gradient norm is inf or nan applies nothing and
// halves S (`lastStepSkipped`).
//
// ZeRO-2 adapters (`adapterSharding`, over NCCL ranks; Parallel/ShardedAdapters.swift has the contract the CPU ranks
// keep): ownership by whole LoRA tensors (`AdapterOwnership`, the CPU's), each rank's tensors one span of the flat
// buffers (`AdapterOwnership.flatSpans`). A step:
//   1. the last micro-batch's backward reduces each gradient bucket to its owners as it finishes (per bucket, one
//      in-place ncclReduce per owner of a piece of it, grouped; the data-parallel buckets below, with reduces instead
//      of all-reduces: no padding is sent, where a padded reduce-scatter would send W − 1 parts of zeros per block);
//   2. the clipping norm: each rank sums its own tensors' squares (Double, per tensor), the T sums are all-reduced
//      (the others add exact zeros) and added in tensor order on every rank: the unsharded run's norm, whose
//      trainer sums it the same way (`CUDADecoderTrainer.clipGradients`); each rank scales its own span;
//   3. the optimizer steps the owned tensors only, so its state (paged or not, 8-bit or fp32) exists for them only;
//   4. every span's fp32 masters are broadcast from their owner (grouped) and the bf16 copies refreshed from them.
// What stays whole on every rank: the fp32 masters and gradients (the backward's GEMMs accumulate each linear's LoRA
// gradients into the flat buffer across micro-batches, and the folded forward reads B's fp32 masters), so the saving
// is the optimizer state; see docs/MULTI_GPU.md. Checkpoints: the owners' optimizer records are gathered to every
// rank before rank 0 writes (the unsharded run's file); a resumed rank loads its own tensors' state from the file.

#if canImport(Glibc)
import Glibc
#endif

/// Training compute on one GPU.
public final class CUDATrainingEngine: TrainingEngine {
    public let context: CUDAContext
    public let model: DecoderModel
    public let trainer: CUDADecoderTrainer
    public let optimizer: CUDAOptimizer
    /// fp16 only: the dynamic loss scale.
    public private(set) var lossScaler: GradScaler?
    public private(set) var lastStepSkipped = false
    /// Data parallel: the NCCL reduction that overlaps the current backward (set by `prepareGradientReduction`).
    var overlappedReduction: GradientReduction?
    /// Data parallel: gradient elements per NCCL all-reduce (a bucket closes at the first block boundary past it).
    public var gradientBucketElements = CUDATrainingEngine.bucketElements
    /// ZeRO-2 over NCCL ranks (the header): nil when every rank steps every tensor.
    public let adapterSharding: CUDAAdapterSharding?
    /// The whole optimizer state gathered from the owners for the next checkpoint (`gatherStateForSave`).
    var gatheredState: [TensorRecord]?

    /// The fp16 path's first loss scale: torch's 2^16, or `QLORA_INITIAL_LOSS_SCALE` (a positive number; a huge one
    /// such as 1e30 makes the first steps overflow, to see the scaler skip and recover).
    public static func initialLossScale() throws -> Float {
        guard let text = getenv("QLORA_INITIAL_LOSS_SCALE").map({ String(cString: $0) }), !text.isEmpty else { return 65536 }
        guard let value = Float(text), value > 0, value.isFinite else {
            throw UsageError("QLORA_INITIAL_LOSS_SCALE=\(text): expected a positive finite number, such as 65536")
        }
        return value
    }

    /// An engine for `model` (adapters attached) holding batches of up to `capacityTokens` tokens.
    /// `deterministic`: the same bits on every run (see `CUDADecoderTrainer.deterministic`). `initialLossScale`
    /// (fp16 only): nil for `initialLossScale()`. `sharding`, `shardAdapters`, `shardHead`: the base, the adapters (ZeRO-2)
    /// and the head (by vocabulary: CUDADecoderTrainer+VocabularyParallelHead.swift) sharded over these NCCL ranks.
    public init(context: CUDAContext, model: DecoderModel, capacityTokens: Int, optimizer kind: OptimizerKind,
                hyperparameters: AdamWHyperparameters, deterministic: Bool = false, initialLossScale: Float? = nil,
                sharding: NCCLCollective? = nil, shardAdapters: NCCLCollective? = nil, shardHead: NCCLCollective? = nil) throws {
        self.context = context
        self.model = model
        // The optimizer keeps its own state (a paged kind in pinned host memory): the trainer allocates no moments.
        let trainer = try CUDADecoderTrainer(context: context, model: model, capacityTokens: capacityTokens, sharding: sharding,
                                             optimizer: kind, adaptersShardedOver: shardAdapters?.worldSize, shardHead: shardHead)
        self.trainer = trainer
        adapterSharding = try shardAdapters.map { try CUDAAdapterSharding(trainer: trainer, collective: $0) }
        trainer.deterministic = deterministic
        optimizer = try CUDAOptimizer(context: context, kind: kind, hyperparameters)
        if context.computeDType == .fp16 { lossScaler = GradScaler(initialScale: try initialLossScale ?? Self.initialLossScale()) }
    }

    public var deviceName: String { "cuda" }
    public var peakMemoryBytes: Int { context.allocator.peakBytes }
    public var computeType: String { context.computeDType == .fp16 ? "fp16" : "bf16" }
    public var optimizerKind: OptimizerKind { optimizer.kind }

    public func accumulate(batch: TrainingBatch, normalizer: Int, options: TrainingStepOptions, first: Bool) throws -> LossSum {
        if let scaler = lossScaler { trainer.lossScale = scaler.scale }
        try trainer.forwardBackward(batch: batch, normalizer: normalizer, accumulate: !first, dropoutSeed: options.dropoutSeed)
        return try trainer.lastLoss()
    }

    public func step(learningRate: Double, maxGradNorm: Double) throws -> Double {
        lastStepSkipped = false
        gatheredState = nil
        try trainer.clipGradients(maxNorm: maxGradNorm > 0 ? maxGradNorm : .infinity,
                                  sharded: adapterSharding.map { (owned: $0.owned, span: $0.spans[$0.collective.rank], collective: $0.collective) })
        // Read before the update (the step waited for it anyway): a NaN or infinite norm applies nothing.
        let norm = try trainer.lastGradientNorm()
        if var scaler = lossScaler {
            lastStepSkipped = !scaler.update(foundInf: !norm.isFinite)
            lossScaler = scaler
        }
        guard norm.isFinite else { return norm }
        if let sharding = adapterSharding {
            try optimizer.step(Array(trainer.parameterSlots()[sharding.owned]), learningRate: learningRate)
            try trainer.broadcastOwnedParameters(spans: sharding.spans, over: sharding.collective)
        } else {
            try optimizer.step(trainer.parameterSlots(), learningRate: learningRate)
            try trainer.refreshParameterCopies()
        }
        return norm
    }

    public func restoreLossScaler(scale: Float, growthTracker: Int, skippedSteps: Int) {
        lossScaler?.restore(scale: scale, growthTracker: growthTracker, skippedSteps: skippedSteps)
    }

    public func loss(batch: TrainingBatch) throws -> LossSum {
        try trainer.forwardLoss(batch: batch)
        return try trainer.lastLoss()
    }

    public func batchGenerator(model: DecoderModel) throws -> BatchGenerator {
        // The trainer's weights are views into staging buffers that hold whichever block was gathered last.
        guard trainer.shardedBase == nil else {
            throw UsageError("generation during training needs the whole base on the GPU; with a sharded base (--shard-base) use eval_loss")
        }
        return try CUDABatchedGenerator(context: trainer.context, model: model, sharing: trainer.frozenWeights)
    }

    public func copyWeightsToModel() throws {
        let layers = Dictionary(model.linearLayers.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for (name, a, b) in try trainer.loraParameters() {
            guard let lora = layers[name]?.lora, lora.a.count == a.count, lora.b.count == b.count else {
                throw UsageError("the GPU adapter \(name) has no CPU twin of its shape")
            }
            for i in 0..<a.count { lora.a.storage[i] = a[i] }
            for i in 0..<b.count { lora.b.storage[i] = b[i] }
        }
    }

    public func loadWeightsFromModel() throws { try trainer.setLoRAParameters(from: model) }
    public func optimizerState() throws -> [TensorRecord] { try gatheredState ?? optimizer.state() }

    public func loadOptimizerState(_ file: SafeTensorsFile) throws {
        gatheredState = nil
        // Every rank reads the whole file and keeps its own tensors' state.
        let names = adapterSharding.map { sharding in Set(trainer.parameterSlots()[sharding.owned].map(\.name)) }
        try optimizer.load(state: file, keeping: names)
    }

    /// Every rank: gathers the owners' optimizer state, so that `optimizerState()` is the whole state for rank 0's
    /// checkpoint (the unsharded run's records).
    public func gatherStateForSave() throws {
        guard let sharding = adapterSharding else { return }
        gatheredState = try sharding.exchange.gatherState(optimizer.state(), tensorNames: trainer.parameterSlots().map(\.name))
    }
}

/// ZeRO-2 of one GPU rank (CUDATrainingEngine's header): which LoRA tensors it owns and every rank's span of the flat
/// buffers.
public struct CUDAAdapterSharding {
    public let collective: NCCLCollective
    /// The ownership and the host exchange of optimizer state for checkpoints (the CPU ranks' own).
    public let exchange: ShardedAdapters
    /// Each rank's elements of the trainer's flat LoRA buffers (`AdapterOwnership.flatSpans`).
    public let spans: [Range<Int>]
    /// This rank's tensors (indices into `parameterSlots()`).
    public var owned: Range<Int> { exchange.owned }

    init(trainer: CUDADecoderTrainer, collective: NCCLCollective) throws {
        let slots = trainer.parameterSlots()
        self.collective = collective
        exchange = ShardedAdapters(counts: slots.map(\.count), collective: collective)
        spans = exchange.ownership.flatSpans(starts: slots.map(\.offset), end: trainer.parameterCount)
    }
}

// MARK: - Data parallel

/// The LoRA gradients summed over the ranks. With NCCL the sum overlaps the backward of the step's last micro-batch:
/// once the backward of block l is queued, the finished gradients above it (blocks l..<L, contiguous at the end of
/// the flat buffer) are reduced in place on the collective's stream once they reach `bucketElements` (and at block 0),
/// ordered after the main stream by an event (a sharded base's all-gathers share that stream, so every rank issues
/// NCCL's calls on one stream in one order); `reduceGradients` makes the main stream wait for the last bucket. With
/// another collective (threads, sockets) the gradients go through the host.
extension CUDATrainingEngine {
    /// 25 MiB of fp32 gradients per all-reduce, as torch's DDP buckets them.
    public static let bucketElements = 25 << 18

    final class GradientReduction {
        let collective: NCCLCollective
        let mainDone: CUDAEvent
        let commDone: CUDAEvent
        /// Elements [pendingStart, pendingEnd) are final and not yet queued for reduction.
        var pendingEnd: Int
        /// ZeRO-2: each rank's span of the flat buffer; a bucket's pieces are reduced to their owners (nil: all-reduced).
        let ownerSpans: [Range<Int>]?
        init(collective: NCCLCollective, parameterCount: Int, ownerSpans: [Range<Int>]?) throws {
            self.collective = collective
            self.ownerSpans = ownerSpans
            mainDone = try CUDAEvent(device: collective.context.device, timing: false)
            commDone = try CUDAEvent(device: collective.context.device, timing: false)
            pendingEnd = parameterCount
        }
    }

    public func prepareGradientReduction(over collective: Collective) throws {
        guard let nccl = collective as? NCCLCollective else { return }
        let reduction = try GradientReduction(collective: nccl, parameterCount: trainer.parameterCount, ownerSpans: try ownerSpans(nccl))
        overlappedReduction = reduction
        let bucket = max(1, gradientBucketElements)
        trainer.afterBlockBackward = { [unowned trainer = self.trainer] block in
            let start = trainer.gradientRange(ofBlock: block).lowerBound
            guard reduction.pendingEnd - start >= bucket || block == 0 else { return }
            try Self.queueBucket(reduction, trainer: trainer, from: start)
        }
    }

    /// ZeRO-2's owner spans when the adapters are sharded over `collective` (nil: not sharded).
    func ownerSpans(_ collective: NCCLCollective) throws -> [Range<Int>]? {
        guard let sharding = adapterSharding else { return nil }
        guard sharding.collective === collective else {
            throw UsageError("the adapters are sharded over another NCCL communicator than the one reducing the gradients")
        }
        return sharding.spans
    }

    /// Queues the reduction of gradients [start, pendingEnd) after everything the main stream has queued so far: an
    /// all-reduce, or with sharded adapters a grouped in-place reduce of each owner's piece to that owner.
    static func queueBucket(_ r: GradientReduction, trainer: CUDADecoderTrainer, from start: Int) throws {
        guard r.pendingEnd > start else { return }
        try r.mainDone.record(on: r.collective.context.device.stream)
        try r.collective.stream.wait(for: r.mainDone)
        if let spans = r.ownerSpans {
            try r.collective.group {
                for piece in AdapterOwnership.pieces(of: start..<r.pendingEnd, spans: spans) {
                    try r.collective.reduceDevice(trainer.grads.address(at: piece.range.lowerBound), count: piece.range.count, root: piece.rank)
                }
            }
        } else {
            try r.collective.reduceDevice(trainer.grads.address(at: start), count: r.pendingEnd - start, .sum)
        }
        r.pendingEnd = start
    }

    public func reduceGradients(over collective: Collective) throws {
        guard !(collective is LocalCollective) else { return }
        trainer.afterBlockBackward = nil
        if let nccl = collective as? NCCLCollective {
            let r = try overlappedReduction
                ?? GradientReduction(collective: nccl, parameterCount: trainer.parameterCount, ownerSpans: try ownerSpans(nccl))
            overlappedReduction = nil
            try Self.queueBucket(r, trainer: trainer, from: 0)
            try r.commDone.record(on: nccl.stream)
            try nccl.context.device.stream.wait(for: r.commDone)
            return
        }
        guard adapterSharding == nil else { throw UsageError("sharded adapters on the GPU reduce their gradients over NCCL only") }
        // Through the host: the gradients (with whatever loss scale they hold, the same on every rank) summed in place.
        var values = try trainer.grads.download()
        try collective.allReduce(&values, .sum)
        try trainer.grads.upload(values)
    }
}
