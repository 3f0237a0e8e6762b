// NCCL on one GPU (data parallel, Backend/CUDA/NCCL.swift): the library loads through dlopen, a world of one rank
// all-reduces and broadcasts device and host buffers correctly, and the Trainer run through the data-parallel path
// (an NCCLCollective of one rank: gradient buckets all-reduced on NCCL's stream as the backward finishes each block,
// the loss reduced) gives the same bits as the plain path: with full determinism the losses, gradient norms, eval loss
// and adapter bytes of the two runs must be identical, for one bucket and for buckets of one block each.
// The sharded base (Weights/CUDAShardedBase.swift) in a world of one: ncclAllGather of device and host buffers, and
// the Trainer with its base sharded (every block gathered into the two staging buffers on NCCL's stream before use)
// against the plain path, bit for bit under full determinism; the sharded trainer's peak memory against its plan.
// Reduce-scatter (ZeRO-style adapter sharding): a world of one through ncclReduceScatter, device (out of place and in
// place) and host (staged), must return its one part bit for bit.
// ZeRO-2 adapters on the GPU (CUDATrainingEngine's header): ncclReduce to a root and grouped broadcasts in a world of
// one; the Trainer with its adapters sharded (fp32 masters and gradients of its own span, each block's gradients
// written into a bucket reduced to their owners every micro-batch, the norm's per-tensor sums all-reduced, the owners'
// step, the bf16 copies broadcast from their owners, the adapter gathered for the write) against the plain path, bit
// for bit under full determinism, with adamw and paged_adamw_8bit, accumulation 1 and 2, clipping: losses, gradient
// norms, eval loss, the adapter's bytes and the last checkpoint's optimizer.safetensors byte for byte; a sharded run
// stopped at step 3 and resumed = the straight one; and for each rank of a world of 2 and 3 (made on this one GPU):
// its masters, gradients and buckets against the plan, and its optimizer state (stepping its own tensors) against the
// plan's per-rank optimizer bytes.
// What a world of one cannot check (sums over several GPUs, shards of several ranks, the launcher's processes) waits
// for a machine with several GPUs: docs/MULTI_GPU.md.

import QLoRA
#if canImport(Glibc)
import Glibc
#endif

func runNCCLChecks(_ ctx: CUDAContext) {
    group("nccl: library, world of one") {
        let nccl = try NCCLLibrary()
        checkTrue("NCCL loads (\(nccl.versionString))", nccl.version >= 22300, nccl.libraryName)
        checkTrue("NCCL_NVLS_ENABLE=0 in the environment", getenv("NCCL_NVLS_ENABLE").map { String(cString: $0) } == "0")
        let id = try nccl.uniqueID()
        checkTrue("unique id: 128 bytes, not all zero", id.count == 128 && id.contains { $0 != 0 })
        let world = try NCCLCollective(nccl: nccl, context: ctx, rank: 0, worldSize: 1, uniqueID: id)
        var rng = SeededGenerator(seed: seed)
        let values = rng.floats(100_003, -3, 3)
        for operation in [ReduceOperation.sum, .average] {
            let buffer = try ctx.allocator.buffer(copying: values)
            try ctx.device.synchronize()
            try world.reduceDevice(buffer.pointer, count: values.count, operation)
            try world.stream.synchronize()
            let result = try buffer.download()
            check("ncclAllReduce \(operation) of 100,003 floats (device)", relativeError(result, values), 0)
        }
        var host = (0..<1000).map { Double($0) * 0.25 - 7 }
        let expected = host
        try world.allReduce(&host, .sum)
        checkTrue("allReduce of host doubles (staged)", host == expected, "first \(host[0]), last \(host[999])")
        let bytes = rng.bytes(4096)
        checkTrue("broadcast of host bytes from rank 0", try world.broadcast(bytes, root: 0) == bytes)
        try world.barrier()
        checkTrue("barrier returns", true)
        // All-gather: a world of one gathers its own shard, out of place and in place (the shard inside the result).
        let shard = rng.bytes(1_000_003)
        let source = try ctx.allocator.buffer(copying: shard)
        let gathered = try ctx.allocator.buffer(UInt8.self, count: shard.count)
        try gathered.fill(byte: 0)
        try ctx.device.synchronize()  // the upload and memset (context's stream) before NCCL's own stream reads
        try world.allGatherDevice(source.pointer, into: gathered.pointer, bytes: shard.count)
        try world.stream.synchronize()
        let out = try gathered.download()
        checkTrue("ncclAllGather of 1,000,003 bytes (device)", out == shard,
                  "\(zip(out, shard).filter { $0 != $1 }.count) bytes differ")
        try world.allGatherDevice(source.pointer, into: source.pointer, bytes: shard.count)
        try world.stream.synchronize()
        checkTrue("ncclAllGather in place (device)", try source.download() == shard)
        var hostGathered = [UInt8](repeating: 0, count: 4099)
        let hostShard = rng.bytes(4099)
        try hostShard.withUnsafeBytes { s in try hostGathered.withUnsafeMutableBytes { try world.allGather(s, into: $0) } }
        checkTrue("allGather of host bytes (staged)", hostGathered == hostShard)
        // Reduce-scatter (sums only: NCCLCollective.reduceScatterDevice says why): a world of one keeps its only part.
        let parts = rng.floats(250_007, -3, 3)
        do {
            let source = try ctx.allocator.buffer(copying: parts)
            let part = try ctx.allocator.buffer(Float.self, count: parts.count)
            try part.fill(byte: 0)
            // The upload and the memset are queued on the context's stream, NCCL runs on its own.
            try ctx.device.synchronize()
            try world.reduceScatterDevice(source.pointer, into: part.pointer, count: parts.count)
            try world.stream.synchronize()
            let out = try part.download()
            let differing = out.indices.filter { out[$0].bitPattern != parts[$0].bitPattern }
            let detail = differing.isEmpty ? "" : "\(differing.count) values differ at \(differing.first!)...\(differing.last!) "
                + "(first: \(out[differing.first!]) for \(parts[differing.first!]))"
            checkTrue("ncclReduceScatter of 250,007 floats (device)", differing.isEmpty, detail)
            try world.reduceScatterDevice(source.pointer, into: source.pointer, count: parts.count)
            try world.stream.synchronize()
            checkTrue("ncclReduceScatter in place (device)", try source.download().map(\.bitPattern) == parts.map(\.bitPattern))
        }
        let hostParts = rng.floats(4099, -3, 3)
        checkTrue("reduceScatter of host floats (staged)", try world.reduceScatter(hostParts).map(\.bitPattern) == hostParts.map(\.bitPattern))
        checkTrue("reduceScatter average of host floats (the sum, then divided)",
                  try world.reduceScatter(hostParts, .average).map(\.bitPattern) == hostParts.map(\.bitPattern))
        // ZeRO-2's calls: in-place ncclReduce of pieces to their owner (rank 0 here) and broadcasts, each set grouped,
        // ordered after the compute stream by afterMainStream (no explicit synchronisation of the upload).
        let grads = rng.floats(300_017, -3, 3)
        let gradBuffer = try ctx.allocator.buffer(copying: grads)
        try world.afterMainStream { nccl in
            try nccl.group {
                for piece in AdapterOwnership.pieces(of: 5..<300_000, spans: [0..<300_017]) {
                    try nccl.reduceDevice(gradBuffer.address(at: piece.range.lowerBound), count: piece.range.count, root: piece.rank)
                }
            }
        }
        checkTrue("grouped ncclReduce to the owner, in place (device)", try gradBuffer.download().map(\.bitPattern) == grads.map(\.bitPattern))
        let doubles = (0..<1121).map { Double($0) * 1.000001 - 3 }
        let doubleBuffer = try ctx.allocator.buffer(copying: doubles)
        try world.afterMainStream { try $0.reduceDoublesDevice(doubleBuffer.pointer, count: doubles.count, .sum) }
        checkTrue("ncclAllReduce of 1,121 doubles (device, the norm's sums)", try doubleBuffer.download() == doubles)
        try world.afterMainStream { nccl in
            try nccl.group {
                try nccl.broadcastDevice(gradBuffer.pointer, bytes: 4 * 1000, root: 0)
                try nccl.broadcastDevice(gradBuffer.address(at: 1000), bytes: 4 * 299_017, root: 0)
            }
        }
        checkTrue("grouped ncclBroadcast of two spans, in place (device)", try gradBuffer.download().map(\.bitPattern) == grads.map(\.bitPattern))
    }

    for optimizer in ["adamw", "paged_adamw_8bit"] { for accumulation in [1, 2] {
        group("nccl: Trainer with sharded adapters (world of one) = plain path (\(optimizer), accumulation \(accumulation))") {
            let directory = fixtureDirectory()
            let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
            let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
            let nccl = try NCCLLibrary()
            let base = "/tmp/qlora-gpu-check-zero2-\(optimizer)-\(accumulation)-\(getpid())"
            struct Run {
                var history: [StepRecord]; var evalLoss: Double; var adapter: [UInt8]; var state: [UInt8]; var owned: Range<Int>?
                var window: Range<Int>?; var parameterCount: Int
            }
            func run(_ name: String, sharded: Bool, stopAt: Int? = nil, resume: Bool = false) throws -> Run {
                let output = base + "-" + name
                let collective: Collective = sharded
                    ? try NCCLCollective(nccl: nccl, context: ctx, rank: 0, worldSize: 1, uniqueID: try nccl.uniqueID())
                    : LocalCollective()
                let trainer = try fixtureTrainer(directory, optimizer: optimizer, device: .cuda(ctx), output: output, train: train, eval: eval,
                                                 resume: resume, dropout: 0.05, fullDeterminism: true, collective: collective,
                                                 shardAdapters: sharded ? true : nil, accumulation: accumulation)
                if let stopAt { trainer.shouldStop = { $0 == stopAt } }
                let summary = try trainer.run()
                let finished = stopAt == nil
                return Run(history: trainer.history, evalLoss: summary.bestEvalLoss ?? .nan,
                           adapter: finished ? try FileSystem.readFile(output + "/adapter_model.safetensors") : [],
                           state: finished ? try FileSystem.readFile(output + "/checkpoint-6/optimizer.safetensors") : [],
                           owned: (trainer.engine as? CUDATrainingEngine)?.adapterSharding?.owned,
                           window: (trainer.engine as? CUDATrainingEngine)?.trainer.ownedAdapters?.window,
                           parameterCount: (trainer.engine as? CUDATrainingEngine)?.trainer.parameterCount ?? 0)
            }
            let plain = try run("plain", sharded: false)
            let sharded = try run("sharded", sharded: true)
            _ = try run("resumed", sharded: true, stopAt: 3)
            let resumed = try run("resumed", sharded: true, resume: true)
            let label = "sharded adapters (\(optimizer), accumulation \(accumulation))"
            checkTrue("\(label): the engine shards them, masters and gradients per owner (rank 0 owns every tensor)",
                      plain.owned == nil && plain.window == nil && sharded.owned?.lowerBound == 0 && (sharded.owned?.count ?? 0) > 0
                          && sharded.window == 0..<sharded.parameterCount,
                      "owned \(sharded.owned.map { "\($0)" } ?? "none"), window \(sharded.window.map { "\($0)" } ?? "none")")
            func differing(_ a: [StepRecord], _ b: [StepRecord]) -> String {
                let d = zip(a, b).filter { $0.loss.bitPattern != $1.loss.bitPattern || $0.gradientNorm.bitPattern != $1.gradientNorm.bitPattern }
                return "\(d.count) of \(a.count) steps differ"
                    + (d.first.map { ", e.g. step \($0.0.step): loss \($0.0.loss) vs \($0.1.loss), norm \($0.0.gradientNorm) vs \($0.1.gradientNorm)" } ?? "")
            }
            let same = { (a: [StepRecord], b: [StepRecord]) in
                a.count == b.count && zip(a, b).allSatisfy { $0.loss.bitPattern == $1.loss.bitPattern && $0.gradientNorm.bitPattern == $1.gradientNorm.bitPattern }
            }
            checkTrue("\(label): the plain path's losses and norms", same(plain.history, sharded.history) && plain.history.count == 6,
                      differing(plain.history, sharded.history))
            checkTrue("\(label): the same eval loss", plain.evalLoss.bitPattern == sharded.evalLoss.bitPattern,
                      "\(plain.evalLoss) and \(sharded.evalLoss)")
            checkTrue("\(label): the same adapter bytes", plain.adapter == sharded.adapter && !plain.adapter.isEmpty,
                      "\(plain.adapter.count) and \(sharded.adapter.count) bytes")
            checkTrue("\(label): checkpoint-6's optimizer.safetensors byte for byte",
                      plain.state == sharded.state && !plain.state.isEmpty, "\(plain.state.count) and \(sharded.state.count) bytes")
            checkTrue("\(label): stopped at 3 and resumed = straight", same(sharded.history, resumed.history)
                      && sharded.adapter == resumed.adapter && sharded.state == resumed.state,
                      differing(sharded.history, resumed.history) + ", adapter \(sharded.adapter == resumed.adapter ? "same" : "differs")"
                      + ", optimizer file \(sharded.state == resumed.state ? "same" : "differs")")
        }
    } }

    // Each rank of a world of W holds fp32 masters and gradients of its own span and two gradient buckets, and steps
    // only its own tensors: each rank's trainer (made as that rank on this GPU) allocates the whole trainer's bytes
    // less the masters and gradients it does not hold plus the buckets, the largest rank's = the plan's adapters; the
    // state its optimizer allocates (stepping its own slots) for the rank holding the most = the plan's optimizer
    // bytes. The trainers' random masters are the unsharded trainer's in every rank's span, and their bf16 copies whole.
    group("nccl: sharded adapters' allocations per rank = the plan's") {
        var config = Architecture.smollm2_135m.config
        config.tieWordEmbeddings = false
        _ = try ctx.blas()
        let mib = { (b: Int) in fmt(Double(b) / Double(1 << 20), 3) + " MiB" }
        func made(_ kind: OptimizerKind, world: Int?, rank: Int = 0) throws -> (trainer: CUDADecoderTrainer, bytes: Int) {
            try ctx.device.synchronize()
            let before = ctx.allocator.currentBytes
            let trainer = try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 8, alpha: 16, capacityTokens: 256,
                                                 memory: .allOnDevice, optimizer: kind, adaptersShardedOver: world, adapterRank: rank)
            try ctx.device.synchronize()
            return (trainer, ctx.allocator.currentBytes - before)
        }
        for kind in [OptimizerKind.adamw, .adamw8bit, .pagedAdamw8bit] {
            let whole = try made(kind, world: nil)
            let wholeMasters = try whole.trainer.ownedMasterValues(), wholeCopies = try whole.trainer.parameterCopies()
            let wholeBytes = whole.bytes, wholePlan = whole.trainer.plan
            let count = whole.trainer.parameterCount
            withExtendedLifetime(whole.trainer) {}
            for world in [2, 3] {
                var state: [Int] = [], bytes: [Int] = [], plans: [CUDAMemoryPlan] = []
                var spansAgree = true, mastersAgree = true
                for rank in 0..<world {
                    let (trainer, allocated) = try made(kind, world: world, rank: rank)
                    bytes.append(allocated)
                    plans.append(trainer.plan)
                    let owned = trainer.ownedAdapters
                    spansAgree = spansAgree && owned?.spans == trainer.plan.loraLayout.ownerSpans(worldSize: world) && owned?.rank == rank
                    // Its masters (gathered over a world of one would need every rank: read its own span here).
                    if let window = owned?.window, !window.isEmpty {
                        let mine = try trainer.ownedMasterValues()
                        let expected = Array(wholeMasters[window])
                        mastersAgree = mastersAgree && mine.map(\.bitPattern) == expected.map(\.bitPattern)
                    }
                    let copies = try trainer.parameterCopies()
                    mastersAgree = mastersAgree && copies == wholeCopies
                    try ctx.device.synchronize()
                    let before = ctx.allocator.currentBytes
                    let optimizer = try CUDAOptimizer(context: ctx, kind: kind)
                    try optimizer.step(trainer.parameterSlots(), learningRate: 1e-4)
                    try ctx.device.synchronize()
                    state.append(ctx.allocator.currentBytes - before)
                    withExtendedLifetime((optimizer, trainer)) {}
                }
                let plan = plans[0]
                let s = DeviceAllocator.sizeClass
                let expected = (0..<world).map { r in
                    wholeBytes - 2 * s(4 * count) + 2 * s(4 * max(plan.loraLayout.ownerSpans(worldSize: world)[r].count, 1)) + plan.gradientBuckets
                }
                checkTrue("\(kind.rawValue), \(world) ranks: each rank allocates the whole trainer's bytes less the masters and gradients it does not hold, plus two buckets",
                          bytes == expected, "ranks \(bytes.map(mib).joined(separator: ", ")); expected \(expected.map(mib).joined(separator: ", "))")
                checkTrue("\(kind.rawValue), \(world) ranks: the largest rank's = the plan's adapters (whole \(mib(wholePlan.adapters)))",
                          (bytes.max() ?? 0) - wholeBytes == plan.adapters - wholePlan.adapters && plans.allSatisfy { $0.total == plan.total },
                          "largest rank \(mib((bytes.max() ?? 0) - wholeBytes)) more than the whole trainer; plan \(mib(plan.adapters - wholePlan.adapters))")
                checkTrue("\(kind.rawValue), \(world) ranks: the trainers' spans are the plan's; each rank's random masters = the unsharded trainer's there, its bf16 copies whole",
                          spansAgree && mastersAgree, "spans \(spansAgree ? "agree" : "differ"), masters \(mastersAgree ? "agree" : "differ")")
                checkTrue("\(kind.rawValue), \(world) ranks: the largest rank's state = the plan's optimizer bytes",
                          state.max() == plan.optimizer && plan.adapterShardedWorld == world,
                          "ranks \(state.map(mib).joined(separator: ", ")); plan \(mib(plan.optimizer))")
            }
        }
    }

    for bucket in [CUDATrainingEngine.bucketElements, 1] {
        let label = bucket == 1 ? "a bucket per block" : "one bucket"
        group("nccl: Trainer through the data-parallel path = plain path (\(label))") {
            let directory = fixtureDirectory()
            let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
            let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
            let nccl = try NCCLLibrary()
            var histories: [[StepRecord]] = [], evalLosses: [Double] = [], adapters: [[UInt8]] = []
            for parallel in [false, true] {
                let output = "/tmp/qlora-gpu-check-nccl-\(bucket)-\(parallel)-\(getpid())"
                let collective: Collective = parallel
                    ? try NCCLCollective(nccl: nccl, context: ctx, rank: 0, worldSize: 1, uniqueID: try nccl.uniqueID())
                    : LocalCollective()
                let trainer = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cuda(ctx), output: output,
                                                 train: train, eval: eval, dropout: 0.05, fullDeterminism: true, collective: collective)
                (trainer.engine as? CUDATrainingEngine)?.gradientBucketElements = bucket
                let summary = try trainer.run()
                histories.append(trainer.history)
                evalLosses.append(summary.bestEvalLoss ?? .nan)
                adapters.append(try FileSystem.readFile(output + "/adapter_model.safetensors"))
            }
            let differing = zip(histories[0], histories[1]).filter {
                $0.loss.bitPattern != $1.loss.bitPattern || $0.gradientNorm.bitPattern != $1.gradientNorm.bitPattern
            }
            checkTrue("data-parallel path (\(label)): the plain path's step losses and gradient norms",
                      differing.isEmpty && histories[1].count == 6,
                      "\(differing.count) of \(histories[0].count) steps differ"
                      + (differing.first.map { ", e.g. step \($0.0.step): loss \($0.0.loss) vs \($0.1.loss), norm \($0.0.gradientNorm) vs \($0.1.gradientNorm)" } ?? ""))
            checkTrue("data-parallel path (\(label)): the same eval loss", evalLosses[0].bitPattern == evalLosses[1].bitPattern,
                      "\(evalLosses[0]) and \(evalLosses[1])")
            checkTrue("data-parallel path (\(label)): the same adapter bytes", adapters[0] == adapters[1] && !adapters[0].isEmpty,
                      "\(adapters[0].count) and \(adapters[1].count) bytes")
        }
    }

    group("nccl: Trainer with the base sharded (world of one) = plain path") {
        let directory = fixtureDirectory()
        let train = randomExamples(count: 8, length: 48, vocab: 1000, seed: 7)
        let eval = randomExamples(count: 3, length: 40, vocab: 1000, seed: 8)
        let nccl = try NCCLLibrary()
        var histories: [[StepRecord]] = [], evalLosses: [Double] = [], adapters: [[UInt8]] = [], gathers: [Int] = []
        for sharded in [false, true] {
            let output = "/tmp/qlora-gpu-check-shard-\(sharded)-\(getpid())"
            let collective: Collective = sharded
                ? try NCCLCollective(nccl: nccl, context: ctx, rank: 0, worldSize: 1, uniqueID: try nccl.uniqueID())
                : LocalCollective()
            let trainer = try fixtureTrainer(directory, optimizer: "paged_adamw_8bit", device: .cuda(ctx), output: output,
                                             train: train, eval: eval, dropout: 0.05, fullDeterminism: true, collective: collective,
                                             shardBase: sharded)
            let summary = try trainer.run()
            histories.append(trainer.history)
            evalLosses.append(summary.bestEvalLoss ?? .nan)
            adapters.append(try FileSystem.readFile(output + "/adapter_model.safetensors"))
            gathers.append((trainer.engine as? CUDATrainingEngine)?.trainer.baseGathers ?? -1)
        }
        // 6 steps of 2 micro-batches and an evaluation: every block gathered at least once per forward and backward,
        // less the blocks still in their staging buffers.
        checkTrue("sharded base: the blocks were gathered (plain path: none)", gathers[0] == 0 && gathers[1] > 0,
                  "plain \(gathers[0]), sharded \(gathers[1]) gathers")
        let differing = zip(histories[0], histories[1]).filter {
            $0.loss.bitPattern != $1.loss.bitPattern || $0.gradientNorm.bitPattern != $1.gradientNorm.bitPattern
        }
        checkTrue("sharded base: the plain path's step losses and gradient norms", differing.isEmpty && histories[1].count == 6,
                  "\(differing.count) of \(histories[0].count) steps differ"
                  + (differing.first.map { ", e.g. step \($0.0.step): loss \($0.0.loss) vs \($0.1.loss), norm \($0.0.gradientNorm) vs \($0.1.gradientNorm)" } ?? ""))
        checkTrue("sharded base: the same eval loss", evalLosses[0].bitPattern == evalLosses[1].bitPattern,
                  "\(evalLosses[0]) and \(evalLosses[1])")
        checkTrue("sharded base: the same adapter bytes", adapters[0] == adapters[1] && !adapters[0].isEmpty,
                  "\(adapters[0].count) and \(adapters[1].count) bytes")
    }

    group("nccl: sharded base's memory = its plan (random weights, world of one)") {
        let setting = try PlanMemorySetting()
        func peak(_ sharding: NCCLCollective?) throws -> (bytes: Int, plan: CUDAMemoryPlan, loss: Double, gathers: Int) {
            let run = try setting.peak { config, tokens in
                try CUDADecoderTrainer(context: ctx, randomConfig: config, rank: 8, alpha: 16, capacityTokens: tokens, memory: .allOnDevice,
                                       sharding: sharding)
            } run: { trainer, batch in
                try trainer.forwardBackward(batch: batch, normalizer: batch.countedTokens)
                try trainer.optimizerStep(learningRate: 1e-4)
                try trainer.forwardLoss(batch: batch)
                return (try trainer.lastLoss().mean, trainer.baseGathers)
            }
            return (run.bytes, run.plan, run.result.0, run.result.1)
        }
        let world = setting.world
        let plain = try peak(nil)
        let sharded = try peak(world)
        let mib = { (b: Int) in fmt(Double(b) / Double(1 << 20), 2) + " MiB" }
        checkTrue("sharded base (random weights) trains: a finite loss", sharded.loss.isFinite && sharded.gathers > 0,
                  "loss \(sharded.loss), \(sharded.gathers) gathers")
        checkTrue("sharded base: the peak changes by what the plan says",
                  plain.bytes - sharded.bytes == plain.plan.total - sharded.plan.total,
                  "peak \(mib(plain.bytes)) -> \(mib(sharded.bytes)); plan \(mib(plain.plan.total)) -> \(mib(sharded.plan.total)) "
                  + "(shards \(mib(sharded.plan.baseShards)), staging \(mib(sharded.plan.baseStaging)))")
    }
}

/// The setting of the "memory = its plan" checks: SmolLM2's shape with an untied head, a random batch of 2 × 256
/// tokens, NCCL's world of one (its staging buffer made before anything is measured).
struct PlanMemorySetting {
    var config = Architecture.smollm2_135m.config
    let batch: TrainingBatch
    let tokens: Int
    let world: NCCLCollective

    init() throws {
        config.tieWordEmbeddings = false
        let rows = 2, length = 256
        tokens = rows * length
        let examples = randomExamples(count: rows, length: length, vocab: config.vocabularySize, seed: 3)
        batch = TrainingBatch(examples: examples.map { ($0.tokens, $0.labels) }, length: length, padID: 0)
        _ = try ctx.blas()
        let nccl = try NCCLLibrary()
        world = try NCCLCollective(nccl: nccl, context: ctx, rank: 0, worldSize: 1, uniqueID: try nccl.uniqueID())
        try world.barrier()
    }

    /// The allocator's peak above its level before `make` made the trainer and `run` ran it, the trainer's plan, and
    /// what `run` returned.
    func peak<R>(_ make: (DecoderConfig, Int) throws -> CUDADecoderTrainer,
                 run: (CUDADecoderTrainer, TrainingBatch) throws -> R) throws -> (bytes: Int, plan: CUDAMemoryPlan, result: R) {
        let A = ctx.allocator
        try ctx.device.synchronize()
        A.resetPeak()
        let base = A.currentBytes
        let trainer = try make(config, tokens)
        let result = try run(trainer, batch)
        return (A.peakBytes - base, trainer.plan, result)
    }
}
