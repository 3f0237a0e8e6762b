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
// layout (`LoRAFlatLayout.ownerSpans`), and each rank holds fp32 masters and gradients of its span only
// (CUDADecoderTrainer+OwnedAdapters.swift; the bf16 copies stay whole). A step:
//   1. every micro-batch's backward writes each block's LoRA gradients into a bucket (two, alternating), which is
//      reduced to its owners as the block finishes (one in-place ncclReduce per owner of a piece of it, grouped, on
//      NCCL's stream: no padding is sent) and whose own piece is copied into the rank's gradients; before the block,
//      the owner's running sum is put into its bucket, so accumulation is the plain path's arithmetic in a world of
//      one (the trainer's header says why every micro-batch is reduced);
//   2. the clipping norm: each rank sums its own tensors' squares (Double, per tensor), the T sums are all-reduced
//      (the others add exact zeros) and added in tensor order on every rank: the unsharded run's norm, whose
//      trainer sums it the same way (`CUDADecoderTrainer.clipGradients`); each rank scales its own span;
//   3. the optimizer steps the owned tensors only (`parameterSlots()` are those), so its state (paged or not, 8-bit
//      or fp32) exists for them only;
//   4. each owner converts its span to bf16 and broadcasts it (grouped): every rank's bf16 copies are whole again.
// The folded forward (which reads fp32 B of every linear) is off over more than one rank (the plan turns it off).
// Checkpoints: the owners' optimizer records are gathered to every rank before rank 0 writes (the unsharded run's
// file); a resumed rank loads its own tensors' state from the file. The adapter: every rank gathers the masters into
// the CPU model (`gatherWeights`) at the points where rank 0 may copy them (evaluation, checkpoints, the end).

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
    /// Sharded masters: the CPU model's adapter holds the current masters (gathered since the last step, or the
    /// source of the latest load), so `copyWeightsToModel` has nothing to do.
    var adapterInModel = true

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
                                             optimizer: kind, adaptersShardedOver: shardAdapters?.worldSize, adapterRank: shardAdapters?.rank ?? 0,
                                             shardHead: shardHead)
        self.trainer = trainer
        trainer.ownedAdapters?.collective = shardAdapters
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
        adapterInModel = false
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
            // The trainer's slots are its own tensors' (sharded masters).
            try optimizer.step(trainer.parameterSlots(), learningRate: learningRate)
            try trainer.publishOwnedParameters(over: sharding.collective)
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
        guard adapterSharding == nil else {
            guard adapterInModel else {
                throw UsageError("the adapters' masters are sharded over the ranks: every rank gathers them (gatherWeights) before one copies them")
            }
            return
        }
        try copyToModel(try trainer.loraParameters())
    }

    /// Every rank, where rank 0 may copy the weights: sharded masters are gathered into the CPU model's adapter.
    public func gatherWeights() throws {
        guard let sharding = adapterSharding, !adapterInModel else { return }
        try copyToModel(try trainer.gatherLoRAParameters(over: sharding.collective))
        adapterInModel = true
    }

    private func copyToModel(_ parameters: [(name: String, a: [Float], b: [Float])]) throws {
        let layers = Dictionary(model.linearLayers.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        for (name, a, b) in parameters {
            guard let lora = layers[name]?.lora, lora.a.count == a.count, lora.b.count == b.count else {
                throw UsageError("the GPU adapter \(name) has no CPU twin of its shape")
            }
            for i in 0..<a.count { lora.a.storage[i] = a[i] }
            for i in 0..<b.count { lora.b.storage[i] = b[i] }
        }
    }

    public func loadWeightsFromModel() throws {
        try trainer.setLoRAParameters(from: model)
        adapterInModel = true
    }
    public func optimizerState() throws -> [TensorRecord] { try gatheredState ?? optimizer.state() }

    public func loadOptimizerState(_ file: SafeTensorsFile) throws {
        gatheredState = nil
        // Every rank reads the whole file and keeps its own tensors' state.
        let names = adapterSharding.map { _ in Set(trainer.parameterSlots().map(\.name)) }
        try optimizer.load(state: file, keeping: names)
    }

    /// Every rank: gathers the owners' optimizer state, so that `optimizerState()` is the whole state for rank 0's
    /// checkpoint (the unsharded run's records).
    public func gatherStateForSave() throws {
        guard let sharding = adapterSharding else { return }
        gatheredState = try sharding.exchange.gatherState(optimizer.state(), tensorNames: trainer.loraTensorList.map(\.name))
    }
}

/// ZeRO-2 of one GPU rank (CUDATrainingEngine's header): which LoRA tensors it owns and every rank's span of the flat
/// buffers.
public struct CUDAAdapterSharding {
    public let collective: NCCLCollective
    /// The ownership and the host exchange of optimizer state for checkpoints (the CPU ranks' own).
    public let exchange: ShardedAdapters
    /// Each rank's elements of the trainer's flat LoRA layout (`LoRAFlatLayout.ownerSpans`, the trainer's own).
    public let spans: [Range<Int>]
    /// This rank's tensors (indices into `trainer.loraTensorList`).
    public var owned: Range<Int> { exchange.owned }

    init(trainer: CUDADecoderTrainer, collective: NCCLCollective) throws {
        guard let owned = trainer.ownedAdapters, owned.spans.count == collective.worldSize, owned.rank == collective.rank else {
            throw UsageError("sharded adapters: the trainer's masters are not sharded as rank \(collective.rank) of \(collective.worldSize)")
        }
        self.collective = collective
        exchange = ShardedAdapters(counts: trainer.loraTensorList.map(\.count), collective: collective)
        spans = owned.spans
    }
}

// MARK: - Data parallel

/// The LoRA gradients summed over the ranks. With NCCL the sum overlaps the backward of the step's last micro-batch:
/// once the backward of block l is queued, the finished gradients above it (blocks l..<L, contiguous at the end of
/// the flat buffer) are reduced in place on the collective's stream once they reach `bucketElements` (and at block 0),
/// ordered after the main stream by an event (a sharded base's all-gathers share that stream, so every rank issues
/// NCCL's calls on one stream in one order); `reduceGradients` makes the main stream wait for the last bucket. With
/// another collective (threads, sockets) the gradients go through the host. With sharded adapters the trainer reduces
/// its own per-block buckets to their owners every micro-batch (CUDADecoderTrainer+OwnedAdapters.swift), so nothing
/// happens here.
extension CUDATrainingEngine {
    /// 25 MiB of fp32 gradients per all-reduce, as torch's DDP buckets them.
    public static let bucketElements = 25 << 18

    final class GradientReduction {
        let collective: NCCLCollective
        let mainDone: CUDAEvent
        let commDone: CUDAEvent
        /// Elements [pendingStart, pendingEnd) are final and not yet queued for reduction.
        var pendingEnd: Int
        init(collective: NCCLCollective, parameterCount: Int) throws {
            self.collective = collective
            mainDone = try CUDAEvent(device: collective.context.device, timing: false)
            commDone = try CUDAEvent(device: collective.context.device, timing: false)
            pendingEnd = parameterCount
        }
    }

    public func prepareGradientReduction(over collective: Collective) throws {
        guard let nccl = collective as? NCCLCollective else { return }
        // Sharded masters: the trainer reduces every block's bucket to its owners itself, every micro-batch.
        if try reducedByTheTrainer(nccl) { return }
        let reduction = try GradientReduction(collective: nccl, parameterCount: trainer.parameterCount)
        overlappedReduction = reduction
        let bucket = max(1, gradientBucketElements)
        trainer.afterBlockBackward = { [unowned trainer = self.trainer] block in
            let start = trainer.gradientRange(ofBlock: block).lowerBound
            guard reduction.pendingEnd - start >= bucket || block == 0 else { return }
            try Self.queueBucket(reduction, trainer: trainer, from: start)
        }
    }

    /// Whether the adapters are sharded (then the trainer's backward reduces the gradients to their owners), over
    /// `collective` and no other.
    func reducedByTheTrainer(_ collective: NCCLCollective) throws -> Bool {
        guard let sharding = adapterSharding else { return false }
        guard sharding.collective === collective else {
            throw UsageError("the adapters are sharded over another NCCL communicator than the one reducing the gradients")
        }
        return true
    }

    /// Queues the all-reduce of gradients [start, pendingEnd) after everything the main stream has queued so far.
    static func queueBucket(_ r: GradientReduction, trainer: CUDADecoderTrainer, from start: Int) throws {
        guard r.pendingEnd > start else { return }
        try r.mainDone.record(on: r.collective.context.device.stream)
        try r.collective.stream.wait(for: r.mainDone)
        try r.collective.reduceDevice(trainer.grads.address(at: start), count: r.pendingEnd - start, .sum)
        r.pendingEnd = start
    }

    public func reduceGradients(over collective: Collective) throws {
        guard !(collective is LocalCollective) else { return }
        trainer.afterBlockBackward = nil
        if let nccl = collective as? NCCLCollective {
            // Sharded masters: reduced by the backward, which waited for its last bucket.
            if try reducedByTheTrainer(nccl) { return }
            let r = try overlappedReduction ?? GradientReduction(collective: nccl, parameterCount: trainer.parameterCount)
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
