// The CPU training engine: the model's fp32 forward/backward (Training/DecoderBackward.swift), gradient clipping
// and the CPU optimizers, exactly as the trainer ran them before the engine seam existed.

/// Training compute on the CPU, on the model's own adapters.
public final class CPUTrainingEngine: TrainingEngine {
    public let model: DecoderModel
    public let gradients: LoRAGradients
    public let optimizer: Optimizer
    /// ZeRO-2 over the data-parallel ranks (Parallel/ShardedAdapters.swift): this rank reduces, clips and steps only the
    /// tensors it owns and keeps optimizer state only for them; nil: every rank steps every tensor.
    public private(set) var adapterSharding: ShardedAdapters?
    /// The whole optimizer state gathered from the owners for the next checkpoint (`gatherStateForSave`).
    var gatheredState: [TensorRecord]?

    public init(model: DecoderModel, optimizer: Optimizer) {
        self.model = model
        self.optimizer = optimizer
        gradients = LoRAGradients(model: model)
    }

    public var deviceName: String { "cpu" }
    public var computeType: String { "fp32" }
    public var optimizerKind: OptimizerKind { optimizer.kind }

    public func accumulate(batch: TrainingBatch, normalizer: Int, options: TrainingStepOptions, first: Bool) throws -> LossSum {
        if first { gradients.zero() }
        return try model.accumulateGradients(batch: batch, into: gradients, normalizer: normalizer, options: options)
    }

    public func step(learningRate: Double, maxGradNorm: Double) throws -> Double {
        let slots = parameterSlots()
        gatheredState = nil
        if let sharding = adapterSharding {
            let norm = try sharding.clip(slots.map { UnsafeMutableBufferPointer(mutating: $0.gradient) }, maxNorm: maxGradNorm)
            guard norm.isFinite else { return norm }
            try optimizer.step(Array(slots[sharding.owned]), learningRate: learningRate)
            try sharding.allGather(slots.map(\.values))
            return norm
        }
        let norm = maxGradNorm > 0
            ? GradientClipping.clip(slots.map { UnsafeMutableBufferPointer(mutating: $0.gradient) }, maxNorm: maxGradNorm)
            : GradientClipping.globalNorm(slots.map(\.gradient))
        // A NaN or infinite gradient would poison the adapter and the optimizer state: no update (the trainer stops).
        guard norm.isFinite else { return norm }
        try optimizer.step(slots, learningRate: learningRate)
        return norm
    }

    public func loss(batch: TrainingBatch) throws -> LossSum { try model.loss(batch: batch) }
    public func copyWeightsToModel() throws {}
    public func loadWeightsFromModel() throws {}
    public func batchGenerator(model: DecoderModel) throws -> BatchGenerator { SessionBatchGenerator.cpu(model) }
    public func optimizerState() throws -> [TensorRecord] { gatheredState ?? optimizer.state() }
    public func loadOptimizerState(_ file: SafeTensorsFile) throws {
        try optimizer.load(state: file)
        gatheredState = nil
        // Every rank reads the whole file and keeps its own tensors' state.
        if let sharding = adapterSharding {
            let names = parameterSlots().map(\.name)
            optimizer.retainState(of: Set(sharding.owned.map { names[$0] }))
        }
    }

    func parameterSlots() -> [ParameterSlot] {
        model.linearLayers.compactMap { layer -> [ParameterSlot]? in
            guard let lora = layer.lora, let ga = gradients.a[layer.name], let gb = gradients.b[layer.name] else { return nil }
            return [ParameterSlot(name: layer.name + ".lora_A.weight", values: lora.a.storage, gradient: UnsafeBufferPointer(ga.storage)),
                    ParameterSlot(name: layer.name + ".lora_B.weight", values: lora.b.storage, gradient: UnsafeBufferPointer(gb.storage))]
        }.flatMap { $0 }
    }
}

// MARK: - Data parallel

extension CPUTrainingEngine {
    /// Shards the adapters over `collective`'s ranks (ZeRO-2): from the next step on, this rank keeps optimizer state
    /// only for its own tensors. Call before the first step (or before a checkpoint is restored).
    public func shardAdapters(over collective: Collective) {
        adapterSharding = ShardedAdapters(counts: parameterSlots().map(\.values.count), collective: collective)
    }

    /// Every rank: gathers the owners' optimizer state, so that `optimizerState()` is the whole state for rank 0's
    /// checkpoint.
    public func gatherStateForSave() throws {
        guard let sharding = adapterSharding else { return }
        gatheredState = try sharding.gatherState(optimizer.state(), tensorNames: parameterSlots().map(\.name))
    }

    /// Floats summed per collective call: large enough that the per-call cost vanishes, small enough to bound the copy.
    static let bucketElements = 1 << 20

    /// Sums the LoRA gradients over the ranks in buckets: the gradients (in `parameterSlots` order, the same on every
    /// rank) are packed into a bucket, reduced, and unpacked. On the CPU the reduction follows the backward (no overlap).
    public func reduceGradients(over collective: Collective) throws {
        guard !(collective is LocalCollective) else { return }
        let slots = parameterSlots()
        if let sharding = adapterSharding {
            precondition(sharding.collective === collective, "the adapters are sharded over another collective")
            try sharding.reduceScatter(slots.map { UnsafeMutableBufferPointer(mutating: $0.gradient) })
            return
        }
        var bucket = [Float](repeating: 0, count: min(Self.bucketElements, max(1, slots.reduce(0) { $0 + $1.gradient.count })))
        var pending: [(slot: Int, start: Int, count: Int)] = []
        var filled = 0
        func flush() throws {
            guard filled > 0 else { return }
            try bucket.withUnsafeMutableBufferPointer { try collective.allReduce(UnsafeMutableBufferPointer(rebasing: $0[0..<filled]), .sum) }
            var offset = 0
            for piece in pending {
                let target = UnsafeMutableBufferPointer(mutating: slots[piece.slot].gradient)
                for i in 0..<piece.count { target[piece.start + i] = bucket[offset + i] }
                offset += piece.count
            }
            pending.removeAll(keepingCapacity: true)
            filled = 0
        }
        for (s, slot) in slots.enumerated() {
            var start = 0
            while start < slot.gradient.count {
                let count = min(slot.gradient.count - start, bucket.count - filled)
                for i in 0..<count { bucket[filled + i] = slot.gradient[start + i] }
                pending.append((s, start, count))
                filled += count
                start += count
                if filled == bucket.count { try flush() }
            }
        }
        try flush()
    }
}
