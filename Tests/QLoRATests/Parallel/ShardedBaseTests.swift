import XCTest
@testable import QLoRA

/// The sharded base on the CPU (ranks as threads): the gathered shards are the whole weights bit for bit, and a
/// training run with the base sharded over 2 and 3 ranks is the data-parallel run without sharding (bit for bit) and
/// the one-process run with the same global batch (within float rounding).
final class ShardedBaseTests: XCTestCase {
    static func nf4TinyLlama() throws -> DecoderModel {
        try ModelLoader.load(TestFixtures.path("tiny-llama/base"), quantization: .nf4).model
    }

    /// Weights of awkward sizes, so the flat bytes do not divide by the world size: a dense one, a 4-bit one with
    /// plain fp32 absmax, and NF4 with double quantization of an odd element count (half a byte of packing).
    func awkwardWeights() throws -> [FrozenWeight] {
        var rng = SeededGenerator(seed: 5)
        func values(_ n: Int) -> [Float] { (0..<n).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 } }
        let dense = FrozenWeight(dense: Matrix(rows: 3, columns: 5, values: values(15)))
        let plain = try values(7 * 9).withUnsafeBufferPointer {
            try QuantizedWeight.quantize($0, shape: [7, 9], type: .fp4, blocksize: 64, doubleQuant: false)
        }
        let nested = try values(33 * 65).withUnsafeBufferPointer {
            try QuantizedWeight.quantize($0, shape: [33, 65], type: .nf4, blocksize: 64, doubleQuant: true)
        }
        return [dense, try FrozenWeight(quantized: plain), try FrozenWeight(quantized: nested)]
    }

    func assertSameStorage(_ a: FrozenWeight, _ b: FrozenWeight, _ what: String) {
        switch (a.storage, b.storage) {
        case (.dense(let x), .dense(let y)):
            XCTAssertEqual(x.values.map(\.bitPattern), y.values.map(\.bitPattern), what)
        case (.quantized(let x), .quantized(let y)):
            XCTAssertEqual(x, y, what)
        default:
            XCTFail("\(what): \(a.storage) against \(b.storage)")
        }
    }

    /// Every world size from 1 to 4 shards unevenly (padding in the last shard) and gathers back the same bytes.
    func testLayoutShardsAndRebuildsAwkwardWeights() throws {
        let weights = try awkwardWeights()
        for world in 1...4 {
            let layout = try ShardedBlockLayout(weights: weights, worldSize: world)
            XCTAssertEqual(layout.paddedBytes, layout.shardBytes * world)
            XCTAssertGreaterThanOrEqual(layout.paddedBytes, layout.bytes)
            XCTAssertLessThan(layout.paddedBytes - layout.bytes, 16 * world, "world \(world): the padding is less than one alignment a shard")
            XCTAssertEqual(layout.shardBytes % 16, 0)
            let flat = layout.flatten(weights)
            // The ranks' shards are contiguous, equal, and cover the flat bytes in rank order.
            let joined = (0..<world).flatMap { Array(flat[layout.shardRange(rank: $0)]) }
            XCTAssertEqual(joined, flat)
            let rebuilt = try flat.withUnsafeBytes { try layout.weights(from: $0) }
            for (j, (a, b)) in zip(weights, rebuilt).enumerated() { assertSameStorage(a, b, "world \(world), weight \(j)") }
            // The comparison can fail: shards joined in another order give other weights.
            if world > 1 {
                let swapped = (0..<world).reversed().flatMap { Array(flat[layout.shardRange(rank: $0)]) }
                let wrong = try swapped.withUnsafeBytes { try layout.weights(from: $0) }
                XCTAssertFalse(zip(weights, wrong).allSatisfy { a, b in
                    if case .quantized(let x) = a.storage, case .quantized(let y) = b.storage { return x == y }
                    if case .dense(let x) = a.storage, case .dense(let y) = b.storage { return x.values == y.values }
                    return false
                }, "world \(world): shards in reverse order must not rebuild the weights")
            }
        }
        // 3 × 5 fp32 = 60 bytes → 64; the fp4 weight's 32 packed bytes; its single fp32 absmax: part offsets on 16 bytes.
        let layout = try ShardedBlockLayout(weights: weights, worldSize: 3)
        XCTAssertEqual(layout.parts.map { $0.map(\.offset) }.joined().allSatisfy { $0 % 16 == 0 }, true)
        XCTAssertNotEqual(layout.bytes % 3, 0, "the layout must not divide evenly, or the padding goes untested")
        XCTAssertThrowsError(try flat(short: layout))
    }

    func flat(short layout: ShardedBlockLayout) throws -> [FrozenWeight] {
        let bytes = [UInt8](repeating: 0, count: layout.bytes - 1)
        return try bytes.withUnsafeBytes { try layout.weights(from: $0) }
    }

    /// The tiny Llama in NF4, sharded over 1–4 thread-ranks: each rank holds only its shard (its linears hold
    /// placeholders), and every block gathered on every rank is the unsharded model's block, bit for bit.
    func testGatheredBlocksAreTheUnshardedWeightsBitForBit() throws {
        let reference = try Self.nf4TinyLlama()
        XCTAssertTrue(reference.linearLayers.allSatisfy { $0.weight.isQuantized })
        for world in 1...4 {
            let results = try ThreadWorld.run(size: world) { collective -> (shardBytes: Int, whole: Int, sharded: Bool, unequal: [String]) in
                let model = try Self.nf4TinyLlama()
                let base = try ShardedDecoderBase(model: model, collective: collective)
                let sharded = model.linearLayers.allSatisfy(\.weight.isSharded)
                var unequal: [String] = []
                for l in model.blocks.indices {
                    try base.gather(l)
                    for (j, (a, b)) in zip(reference.blocks[l].linears, model.blocks[l].linears).enumerated() {
                        guard case .quantized(let x) = a.weight.storage, case .quantized(let y) = b.weight.storage, x == y else {
                            unequal.append("block \(l), linear \(j)")
                            continue
                        }
                    }
                    base.release(l)
                    if !model.blocks[l].linears.allSatisfy(\.weight.isSharded) { unequal.append("block \(l) not released") }
                }
                return (base.shardBytes, base.wholeBytes, sharded, unequal)
            }
            for (rank, r) in results.enumerated() {
                XCTAssertTrue(r.sharded, "world \(world), rank \(rank): the linears hold placeholders after sharding")
                XCTAssertEqual(r.unequal, [], "world \(world), rank \(rank)")
                // Each rank keeps 1/W of the blocks (plus at most one alignment of padding per block).
                XCTAssertLessThanOrEqual(r.shardBytes * world - r.whole, 16 * world * reference.blocks.count, "world \(world)")
                XCTAssertGreaterThanOrEqual(r.shardBytes * world, r.whole)
            }
            let whole = reference.linearLayers.reduce(0) { $0 + $1.weight.storedBytes }
            XCTAssertLessThan(results[0].shardBytes, whole / world + 16 * reference.blocks.count + 4096, "world \(world)")
        }
    }

    // MARK: Training

    func adapterValues(_ directory: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: directory + "/adapter_model.safetensors")
        return try Dictionary(uniqueKeysWithValues: file.tensors.map { ($0.name, try file.floats($0.name)) })
    }

    func trainer(_ c: TrainingConfiguration, collective: Collective = LocalCollective()) throws -> Trainer {
        let t = try Trainer(configuration: c, model: try Self.nf4TinyLlama(), train: DataParallelTests.examples(12, seed: 1),
                            eval: DataParallelTests.examples(5, seed: 2), padID: 0, baseDirectory: nil, collective: collective)
        t.log = { _ in }
        t.showProgress = { _ in }
        return t
    }

    /// 12 examples in batches of 2 are 6 micro-batches an epoch: one process with accumulation 6, 2 ranks with 3 and 3
    /// ranks with 2 take the same 6 a step. With the base sharded, 2 and 3 ranks give the unsharded data-parallel run's
    /// losses, norms, eval losses and adapter bit for bit (the same weights, the same sums), and the one-process run's
    /// within float rounding (the ranks add their gradients in another order). 3 eval batches over 2 ranks: the rank
    /// with one fewer makes an extra forward, or the all-gathers would not pair up.
    func testShardedBaseTrainsAsTheOneProcessRun() throws {
        let singleDir = try TestFixtures.temporaryDirectory("shard-single")
        let single = try trainer(DataParallelTests.configuration(singleDir, accumulation: 6, shardBase: false))
        _ = try single.run()
        XCTAssertEqual(single.history.count, 4)
        let singleAdapter = try self.adapterValues(singleDir)
        for world in [2, 3] {
            let plainDir = try TestFixtures.temporaryDirectory("shard-plain\(world)")
            let plain = try ThreadWorld.run(size: world) { collective -> Trainer in
                let t = try self.trainer(DataParallelTests.configuration(plainDir, accumulation: 6 / world, shardBase: false), collective: collective)
                _ = try t.run()
                return t
            }
            let dir = try TestFixtures.temporaryDirectory("shard-world\(world)")
            let sharded = try ThreadWorld.run(size: world) { collective -> (Trainer, Int, Bool) in
                // The adapters sharded too (on by default with the base; the same bits); the head whole here, since its
                // vocabulary-parallel loss adds its sums in another order (ShardedAdaptersTests).
                var c = DataParallelTests.configuration(dir, accumulation: 6 / world, shardBase: true)
                c.shardHead = false
                let t = try self.trainer(c, collective: collective)
                XCTAssertNotNil((t.engine as? CPUTrainingEngine)?.adapterSharding)
                _ = try t.run()
                let base = try XCTUnwrap(t.model.shardedBase)
                return (t, base.gatherCount, t.model.linearLayers.allSatisfy(\.weight.isSharded))
            }
            for (rank, (t, gathers, released)) in sharded.enumerated() {
                XCTAssertTrue(released, "world \(world), rank \(rank): no block stays gathered after the run")
                // Per micro-batch with checkpointing: L forward gathers and L backward ones; per eval forward L.
                let blocks = t.model.blocks.count
                XCTAssertEqual(gathers, blocks * (2 * 4 * (6 / world) + 2 * ((3 + world - 1) / world)), "world \(world), rank \(rank)")
                XCTAssertEqual(t.history, plain[rank].history, "world \(world), rank \(rank): sharded against unsharded, bit for bit")
                XCTAssertEqual(t.evalHistory.map(\.loss), plain[rank].evalHistory.map(\.loss), "world \(world), rank \(rank)")
                XCTAssertEqual(t.history.count, single.history.count)
                for (a, b) in zip(single.history, t.history) {
                    XCTAssertEqual(b.loss, a.loss, accuracy: 1e-5 * a.loss, "world \(world), rank \(rank), step \(a.step)")
                    XCTAssertEqual(b.gradientNorm, a.gradientNorm, accuracy: 1e-4 * a.gradientNorm, "world \(world), rank \(rank), step \(a.step)")
                    XCTAssertEqual(b.tokens, a.tokens)
                }
                XCTAssertEqual(t.evalHistory.map(\.step), single.evalHistory.map(\.step))
                for (a, b) in zip(single.evalHistory, t.evalHistory) {
                    XCTAssertEqual(b.loss, a.loss, accuracy: 1e-5 * a.loss, "world \(world), rank \(rank), eval at step \(a.step)")
                }
            }
            let adapter = try self.adapterValues(dir)
            XCTAssertEqual(adapter, try self.adapterValues(plainDir), "world \(world): the adapter bit for bit")
            var worst = 0.0
            for (name, values) in singleAdapter {
                for (x, y) in zip(values, adapter[name]!) { worst = max(worst, Double(abs(x - y)) / max(Double(abs(x)), 1e-3)) }
            }
            XCTAssertLessThan(worst, 1e-3, "world \(world): the adapter's largest relative difference from one process")
            print("sharded base, world \(world): adapter's largest relative difference from one process \(worst)")
        }
    }

    /// Task metrics generate on rank 0 alone, which a sharded base cannot follow: refused with the way out.
    func testTaskMetricsWithAShardedBaseAreRefused() throws {
        var c = DataParallelTests.configuration(try TestFixtures.temporaryDirectory("shard-metrics"), accumulation: 1, shardBase: true)
        c.metricForBestModel = "rouge_l"
        XCTAssertThrowsError(try trainer(c)) { error in
            XCTAssertTrue("\(error)".contains("--shard-base") && "\(error)".contains("eval_loss"), "\(error)")
        }
    }

    // MARK: All-gather

    /// Each rank's shard in rank order on every rank, through threads and through sockets over loopback; in place
    /// (the shard inside the result, as NCCL allows); a gathered buffer of the wrong size is an error.
    func testAllGatherOverThreadsAndSockets() throws {
        func gather(_ collective: Collective) throws -> [[UInt8]] {
            let shard = (0..<7).map { UInt8(collective.rank * 10 + $0) }
            var gathered = [UInt8](repeating: 0, count: 7 * collective.worldSize)
            try shard.withUnsafeBytes { s in try gathered.withUnsafeMutableBytes { try collective.allGather(s, into: $0) } }
            // In place: this rank's shard already at its place in the result.
            var inPlace = [UInt8](repeating: 0, count: 7 * collective.worldSize)
            inPlace.replaceSubrange((7 * collective.rank)..<(7 * collective.rank + 7), with: shard)
            try inPlace.withUnsafeMutableBytes { all in
                try collective.allGather(UnsafeRawBufferPointer(rebasing: all[(7 * collective.rank)..<(7 * collective.rank + 7)]), into: all)
            }
            return [gathered, inPlace]
        }
        let expected = (0..<3).flatMap { r in (0..<7).map { UInt8(r * 10 + $0) } }
        for result in try ThreadWorld.run(size: 3, { try gather($0) }) { XCTAssertEqual(result, [expected, expected]) }
        let port = try Launcher.freePort()
        let overSockets = try ThreadWorld.run(size: 3) { thread -> [[UInt8]] in
            try gather(try SocketCollective(rank: thread.rank, worldSize: 3, host: "127.0.0.1", port: port, timeout: 20))
        }
        for result in overSockets { XCTAssertEqual(result, [expected, expected]) }
        XCTAssertEqual(try gather(LocalCollective()), [Array(expected.prefix(7)), Array(expected.prefix(7))])
        XCTAssertThrowsError(try ThreadWorld.run(size: 2) { collective -> Int in
            var wrong = [UInt8](repeating: 0, count: 5)
            try [UInt8](repeating: 1, count: 3).withUnsafeBytes { s in try wrong.withUnsafeMutableBytes { try collective.allGather(s, into: $0) } }
            return 0
        }) { error in XCTAssertTrue("\(error)".contains("allGather") && "\(error)".contains("expected 6"), "\(error)") }
    }

    // MARK: The plan per rank

    /// Each rank holds its shard of every block and two staging blocks instead of the whole base; the 70B shape at
    /// 2 × 2048 (LoRA r 16) over two ranks needs 25.88 GiB a rank: 2.76 GiB over a 24 GiB card (its context and
    /// margin taken), within a 48 GiB card's budget, and three 24 GiB cards fit it.
    func testShardedPlanPerRank() throws {
        let c = Architecture.llama3_1_70b.config
        let s = DeviceAllocator.sizeClass
        let whole = CUDAMemoryPlan(config: c, tokens: 4096, rank: 16)
        let layout = try XCTUnwrap(CUDAMemoryPlan.shardedBlockLayout(c, world: 2))
        let blockBytes = CUDAMemoryPlan.linearShapes(c).reduce(0) { $0 + CUDAMemoryPlan.nf4Bytes($1.out * $1.in) }
        // The shard of a block is half its flat bytes (each part on 16 bytes, then padded to 16 per shard); the flat
        // bytes are the parts' exact sizes, a little under the allocator's rounding of separate buffers.
        let exact = CUDAMemoryPlan.linearShapes(c).reduce(0) { total, shape in
            let n = shape.out * shape.in, blocks = (n + 63) / 64
            return total + (n + 1) / 2 + blocks + 4 * ((blocks + 255) / 256)
        }
        XCTAssertGreaterThanOrEqual(layout.bytes, exact)
        XCTAssertLessThan(layout.bytes, exact + 16 * 3 * 7)
        XCTAssertEqual(layout.shardBytes, (layout.bytes / 2 + 15) / 16 * 16)
        XCTAssertLessThan(layout.bytes, blockBytes)
        let two = CUDAMemoryPlan(config: c, tokens: 4096, rank: 16, shardedOver: 2)
        XCTAssertEqual(two.baseShards, c.layerCount * s(layout.shardBytes))
        XCTAssertEqual(two.baseStaging, 2 * s(layout.paddedBytes))
        XCTAssertEqual(whole.weights - two.weights, c.layerCount * blockBytes - two.baseShards - two.baseStaging)
        XCTAssertEqual(two.total - two.weights, whole.total - whole.weights, "only the base's bytes change")
        let gib = Double(1 << 30)
        XCTAssertEqual(Double(two.total) / gib, 25.95, accuracy: 0.01)  // 25.94 before the backward fold's buffers (session 10)
        XCTAssertEqual(Double(two.spareBytes(budgetBytes: 24 << 30)) / gib, -2.82, accuracy: 0.01)
        XCTAssertFalse(two.fits(budgetBytes: 24 << 30))
        XCTAssertTrue(two.fits(budgetBytes: 48 << 30))
        let three = CUDAMemoryPlan(config: c, tokens: 4096, rank: 16, shardedOver: 3)
        XCTAssertTrue(three.fits(budgetBytes: 24 << 30))
        XCTAssertEqual(Double(three.spareBytes(budgetBytes: 24 << 30)) / gib, 3.43, accuracy: 0.01)
        // As qlora train runs it (paged_adamw_8bit, whose state is in pinned host memory; LoRA dropout 0.05 counted):
        // 24.41 GiB a rank, 1.28 GiB over a 24 GiB card.
        let trained = CUDAMemoryPlan(config: c, tokens: 4096, rank: 16, dropout: true, shardedOver: 2, optimizer: .pagedAdamw8bit)
        XCTAssertEqual(Double(trained.total) / gib, 24.41, accuracy: 0.01)
        XCTAssertEqual(Double(trained.spareBytes(budgetBytes: 24 << 30)) / gib, -1.28, accuracy: 0.01)
        XCTAssertEqual(Double(two.optimizer - trained.optimizer) / gib, 1.63, accuracy: 0.01)
        // A world of one keeps the whole base in its one shard, plus the staging.
        let one = CUDAMemoryPlan(config: c, tokens: 4096, rank: 16, shardedOver: 1)
        XCTAssertGreaterThan(one.weights, whole.weights)
        XCTAssertEqual(one.weights - whole.weights, one.baseShards + one.baseStaging - c.layerCount * blockBytes)
    }

    /// `qlora plan --gpus 2 --shard-base --gpu-memory 24` answers for the job: the 70B shape fits as qlora train runs it
    /// (session 11), with what to spare; with adamw's fp32 moments it does not, by how much and what to change (exit
    /// status 1); with four cards it fits.
    func testPlanCommandAnswersForTheJob() throws {
        let cli = CommandLineTests(name: "qlora", testClosure: { _ in })
        let args = ["plan", "--arch", "llama-3.1-70b", "--shard-base", "--gpu-memory", "24", "--batch", "2", "--seq", "2048"]
        let two = try cli.qlora(args + ["--gpus", "2"])
        XCTAssertEqual(two.status, 0, two.out + two.err)
        // As qlora train runs it: paged_adamw_8bit (its state in pinned host memory) and LoRA dropout 0.05 counted.
        // Session 10: 1.22 GiB short. Session 11 shards the adapters' fp32 masters and gradients (0.79 GiB a rank, the
        // fold's buffers off with them) and the head by vocabulary (0.91 GiB), both train's default with --shard-base on
        // the GPU as well: the rank fits.
        XCTAssertTrue(two.out.contains("per rank of 2 GPUs, base sharded") && two.out.contains("24.0 GiB card: fits, 0.46 GiB to spare"), two.out)
        XCTAssertTrue(two.out.contains("saved: 0.91 GiB of head by sharding it by vocabulary over 2 ranks (its slice 1.0 GiB of 2.0 GiB; "
                                       + "counted: the other ranks' normed rows, the statistics and a chunk of fp32 d(hidden), 0.09 GiB)"), two.out)
        // The adapters sharded too (ZeRO-2, train's default with --shard-base): each rank's paged state is its own tensors'
        // (0.2 GiB of the 0.39 in pinned host memory; the device slots stay), against adamw's moments of its own tensors;
        // its masters and gradients are its own tensors', with two gradient buckets.
        XCTAssertTrue(two.out.contains("saved: 0.83 GiB of optimizer state that paged_adamw_8bit keeps in pinned host memory (0.2 GiB there)")
                      && two.out.contains("saved: 0.2 GiB of pinned host memory by sharding the adapters over 2 ranks")
                      && two.out.contains("saved: 0.79 GiB of adapters by sharding their fp32 masters and gradients over 2 ranks")
                      && two.out.contains("saved: 14.63 GiB of NF4 base by sharding its blocks over 2 ranks")
                      && two.out.contains("counted: LoRA dropout 0.05"), two.out)
        XCTAssertTrue(two.err.isEmpty, two.err)
        // The optimizer and dropout of the run to plan: adamw's fp32 moments on the GPU, no dropout; each rank's moments are
        // its own tensors' (session 9, whole on every rank: 2.79 GiB short; 1.63 GiB of moments, 0.83 a rank now), and so
        // are its masters and gradients, with the head by vocabulary (session 10: 1.97 GiB short); without dropout the
        // backward's fold adds its buffers (0.01 GiB).
        let fp32 = try cli.qlora(args + ["--gpus", "2", "--optimizer", "adamw", "--lora-dropout", "0"])
        XCTAssertEqual(fp32.status, 1)
        XCTAssertTrue(fp32.out.contains("does not fit, 0.25 GiB short") && !fp32.out.contains("that paged_adamw_8bit keeps")
                      && fp32.out.contains("saved: 0.83 GiB of optimizer state on the GPU by sharding the adapters over 2 ranks")
                      && !fp32.out.contains("counted: LoRA dropout"), fp32.out)
        XCTAssertTrue(fp32.err.contains("does not fit 2 cards of 24.0 GiB") && fp32.err.contains("0.25 GiB too much")
                      && fp32.err.contains("more GPUs"), fp32.err)
        let bad = try cli.qlora(args + ["--gpus", "2", "--optimizer", "sgd"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.err.contains("--optimizer") && bad.err.contains("paged_adamw_8bit"), bad.err)
        XCTAssertFalse(two.err.contains("Usage:"), two.err)
        let four = try cli.qlora(args + ["--gpus", "4"])
        XCTAssertEqual(four.status, 0, four.err)
        XCTAssertTrue(four.out.contains("24.0 GiB card: fits, 9.99 GiB to spare"), four.out)  // session 10: 7.46
    }
}

/// `qlora train --world 3 --shard-base`: three CPU processes, each with a third of the NF4 base, gather over sockets
/// (the adapters' gradients reduce-scattered and their values gathered, the head's loss shared by vocabulary, both by
/// default with the base) and log one process's losses; ranks 1 and 2 keep their lines in OUTPUT/rank-R.log; the summary has each rank's peak.
extension CommandLineTests {
    func testTrainWorldWithAShardedBaseMatchesOneProcess() throws {
        let model = TestFixtures.path("tiny-llama/base")
        let data = try writeData((0..<9).map { i in #"{"input_ids": [\#(i + 1), \#(20 + i), 30, \#(40 + 2 * i), 50, 60], "labels": [-100, \#(20 + i), 30, \#(40 + 2 * i), 50, 60]}"# })
        let common = ["train", "--model", model, "--data", data, "--max-steps", "3", "--batch-size", "1", "--learning-rate", "1e-2",
                      "--logging-steps", "1", "--lora-dropout", "0", "--optimizer", "adamw", "--quantize", "nf4"]
        let singleDir = try TestFixtures.temporaryDirectory("cli-shard-single") + "/run"
        let single = try qlora(common + ["--gradient-accumulation-steps", "3", "--output", singleDir, "--device", "cpu"])
        XCTAssertEqual(single.status, 0, single.err)
        let worldDir = try TestFixtures.temporaryDirectory("cli-shard-world") + "/run"
        let world = try qlora(common + ["--gradient-accumulation-steps", "1", "--output", worldDir, "--world", "3", "--shard-base"])
        XCTAssertEqual(world.status, 0, world.err)
        XCTAssertTrue(world.err.contains("sharded base: rank 0 keeps"), world.err)
        // With the base, the adapters (ZeRO-2) and the head (by vocabulary) are sharded by default.
        XCTAssertTrue(world.err.contains("sharded adapters: rank 0 owns LoRA tensors 0..<"), world.err)
        XCTAssertTrue(world.err.contains("vocabulary-parallel head: rank 0 computes the logits of vocabulary rows 0..<"), world.err)
        XCTAssertTrue(world.out.contains("3 ranks (base, adapters, head sharded)") && world.out.contains("peak memory per rank"), world.out)
        let (a, b) = (try losses(singleDir), try losses(worldDir))
        XCTAssertEqual(a.count, 3)
        XCTAssertEqual(b.count, 3)
        for (x, y) in zip(a, b) { XCTAssertEqual(x, y, accuracy: 1e-5 * x) }
        for rank in 1...2 {
            let log = try FileSystem.readText(worldDir + "/rank-\(rank).log")
            XCTAssertTrue(log.contains("sharded base: rank \(rank) keeps") && log.contains("step 3/3"), log)
            XCTAssertTrue(log.contains("sharded adapters: rank \(rank) owns") && log.contains("vocabulary-parallel head: rank \(rank)"), log)
        }
    }
}
