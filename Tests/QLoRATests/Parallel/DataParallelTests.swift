import XCTest
@testable import QLoRA

/// The data-parallel contract on the CPU: sharding as torch's DistributedSampler, the collectives (threads and
/// sockets), and W ranks giving the one-process run with the same global batch.
final class DataParallelTests: XCTestCase {
    // MARK: Sharding

    /// Every rank's indices equal DistributedSampler's (torch 2.13, Tests/Fixtures/distributed-sampler), shuffled or not,
    /// with the padding of a size that does not divide (also when the world is larger than the data).
    func testShardingMatchesDistributedSampler() throws {
        let goldens = try JSONValue.parse(bytes: try FileSystem.readFile(TestFixtures.path("distributed-sampler/goldens.json")))
        guard case .array(let cases)? = goldens["cases"] else { return XCTFail("no cases") }
        XCTAssertGreaterThanOrEqual(cases.count, 9)
        for c in cases {
            let n = c["n"]!.int!, world = c["world_size"]!.int!
            let order = c["order"]!.array!.map { $0.int! }
            XCTAssertEqual(order.count, n)
            let ranks = c["ranks"]!.array!.map { $0.array!.map { $0.int! } }
            for rank in 0..<world {
                XCTAssertEqual(DistributedSampling.shard(order, rank: rank, worldSize: world), ranks[rank], "n \(n), world \(world), rank \(rank)")
            }
            XCTAssertEqual(DistributedSampling.itemsPerRank(count: n, worldSize: world), ranks[0].count)
        }
    }

    /// Together the ranks' items of step s (accumulation A) are the one-process step with accumulation A·W.
    func testRanksTogetherTakeTheOneProcessGlobalBatch() {
        let order = [5, 2, 7, 0, 3, 6, 1, 4]
        for (world, accumulation) in [(2, 2), (4, 1), (2, 1)] {
            let shards = (0..<world).map { DistributedSampling.shard(order, rank: $0, worldSize: world) }
            for step in 0..<(order.count / (world * accumulation)) {
                let together = shards.flatMap { $0[(step * accumulation)..<((step + 1) * accumulation)] }.sorted()
                let single = order[(step * accumulation * world)..<((step + 1) * accumulation * world)].sorted()
                XCTAssertEqual(together, Array(single), "world \(world), accumulation \(accumulation), step \(step)")
            }
        }
    }

    // MARK: Collectives

    func checkCollectives(_ collective: Collective) throws -> [Double] {
        let r = Float(collective.rank)
        var floats: [Float] = [r + 1, 2 * r, -r]
        try collective.allReduce(&floats, .sum)
        var mean: [Double] = [Double(collective.rank) * 3]
        try collective.allReduce(&mean, .average)
        let root = collective.worldSize - 1
        let bytes = try collective.broadcast((0..<5).map { UInt8(collective.rank * 10 + $0) }, root: root)
        try collective.barrier()
        let anyFlag = try collective.any(collective.rank == 1)
        return floats.map(Double.init) + mean + bytes.map(Double.init) + [anyFlag ? 1 : 0]
    }

    func expectedCollectiveResults(world: Int) -> [Double] {
        let w = Double(world), sumRanks = w * (w - 1) / 2
        let root = world - 1
        return [w + sumRanks, 2 * sumRanks, -sumRanks, 3 * sumRanks / w] + (0..<5).map { Double(root * 10 + $0) } + [world > 1 ? 1 : 0]
    }

    func testThreadWorldCollectives() throws {
        for world in [1, 3, 4] {
            let results = try ThreadWorld.run(size: world) { try self.checkCollectives($0) }
            for (rank, result) in results.enumerated() {
                XCTAssertEqual(result, expectedCollectiveResults(world: world), "world \(world), rank \(rank)")
            }
        }
    }

    /// A rank that throws stops the others at their next collective call with its message; run() rethrows its own error.
    func testAFailingRankStopsTheOthers() throws {
        final class Seen: @unchecked Sendable { var errors: [String] = [] ; let lock = NSLock() }
        let seen = Seen()
        XCTAssertThrowsError(try ThreadWorld.run(size: 3) { collective -> Int in
            var x: [Float] = [1]
            try collective.allReduce(&x, .sum)
            if collective.rank == 1 { throw UsageError("rank one broke") }
            do {
                for _ in 0..<1000 { try collective.barrier() }
            } catch {
                seen.lock.lock(); seen.errors.append("\(error)"); seen.lock.unlock()
                throw error
            }
            return 0
        }) { error in
            XCTAssertEqual("\(error)", "rank one broke")
        }
        XCTAssertEqual(seen.errors.count, 2)
        XCTAssertTrue(seen.errors.allSatisfy { $0 == "rank 1 failed: rank one broke" }, "\(seen.errors)")
    }

    func testMismatchedBufferSizesAreAnError() {
        XCTAssertThrowsError(try ThreadWorld.run(size: 2) { collective -> Int in
            var x = [Float](repeating: 1, count: collective.rank + 1)
            try collective.allReduce(&x, .sum)
            return 0
        }) { error in XCTAssertTrue("\(error)".contains("buffers of different sizes (1, 2 elements)"), "\(error)") }
    }

    /// The socket collective over loopback: three ranks (threads here, processes in a job) meet at a port, reduce in
    /// rank order, broadcast, and a rank's abort reaches the others with its message.
    func testSocketCollectiveOverLoopback() throws {
        let port = try Launcher.freePort()
        let results = try ThreadWorld.run(size: 3) { thread -> [Double] in
            let socket = try SocketCollective(rank: thread.rank, worldSize: 3, host: "127.0.0.1", port: port,
                                              payload: thread.rank == 0 ? [7, 8, 9] : [], payloadBytes: 3, timeout: 20)
            XCTAssertEqual(socket.payload, [7, 8, 9])
            return try self.checkCollectives(socket)
        }
        for result in results { XCTAssertEqual(result, expectedCollectiveResults(world: 3)) }

        let port2 = try Launcher.freePort()
        final class Seen: @unchecked Sendable { var errors: [String?] = [nil, nil, nil]; let lock = NSLock() }
        let seen = Seen()
        _ = try? ThreadWorld.run(size: 3) { thread -> Int in
            let socket = try SocketCollective(rank: thread.rank, worldSize: 3, host: "127.0.0.1", port: port2, timeout: 20)
            try socket.barrier()
            if thread.rank == 2 { socket.abort("out of memory on rank two"); return 0 }
            do { try socket.barrier() } catch {
                seen.lock.lock(); seen.errors[thread.rank] = "\(error)"; seen.lock.unlock()
            }
            return 0
        }
        XCTAssertEqual(seen.errors[0], "rank 2 failed: out of memory on rank two")
        XCTAssertEqual(seen.errors[1], "rank 2 failed: out of memory on rank two")
    }

    /// A rank that cannot reach rank 0 says where it looked and how long it waited.
    func testRendezvousTimeoutIsAClearError() throws {
        let port = try Launcher.freePort()
        XCTAssertThrowsError(try SocketCollective(rank: 1, worldSize: 2, host: "127.0.0.1", port: port, timeout: 0.5)) { error in
            XCTAssertTrue("\(error)".contains("rank 1 could not reach rank 0 at 127.0.0.1:\(port) (MASTER_ADDR:MASTER_PORT)"), "\(error)")
        }
    }

    // MARK: Launch environment

    func testLaunchEnvironmentReadsTorchrunAndSLURM() throws {
        XCTAssertNil(try LaunchEnvironment.from([:]))
        XCTAssertEqual(try LaunchEnvironment.from(["RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"]),
                       LaunchEnvironment(rank: 2, worldSize: 4, localRank: 0, masterAddress: "node1", masterPort: 29500))
        XCTAssertEqual(try LaunchEnvironment.from(["SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"]),
                       LaunchEnvironment(rank: 3, worldSize: 8, localRank: 1, masterAddress: "10.0.0.2", masterPort: 1234))
        XCTAssertThrowsError(try LaunchEnvironment.from(["RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"])) {
            XCTAssertTrue("\($0)".contains("RANK=4: expected an integer from 0 to 3"), "\($0)")
        }
        XCTAssertThrowsError(try LaunchEnvironment.from(["RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"])) {
            XCTAssertTrue("\($0)".contains("needs MASTER_ADDR"), "\($0)")
        }
        XCTAssertEqual(try LaunchEnvironment.visibleDevice(localRank: 2, visible: nil), "2")
        XCTAssertEqual(try LaunchEnvironment.visibleDevice(localRank: 1, visible: "4,6"), "6")
        XCTAssertEqual(try LaunchEnvironment.visibleDevice(localRank: 3, visible: "5"), "5")
        XCTAssertThrowsError(try LaunchEnvironment.visibleDevice(localRank: 2, visible: "0,1"))
    }

    // MARK: Training

    /// Token rows of different lengths (shared with ShardedBaseTests).
    static func examples(_ count: Int, seed: UInt64) -> [TokenizedExample] {
        var rng = SeededGenerator(seed: seed)
        return (0..<count).map { i in
            // Different lengths, so that micro-batches count different tokens (the global normalizer matters).
            let length = 6 + Int(rng.next() % 9)
            let tokens = (0..<length).map { _ in Int(rng.next() % 900) + 10 }
            return TokenizedExample(tokens: tokens, labels: tokens.enumerated().map { $0.offset < 2 ? -100 : $0.element }, line: i + 1)
        }
    }

    /// LoRA r 4 with dropout 0.1, batch 2, clipping, eval and saves every 2 steps (shared with ShardedBaseTests).
    static func configuration(_ output: String, accumulation: Int, steps: Int = 4, shardBase: Bool = false) -> TrainingConfiguration {
        var c = TrainingConfiguration()
        c.model = TestFixtures.path("tiny-llama/base")
        c.datasets = ["synthetic"]
        c.outputDirectory = output
        c.loraR = 4
        c.loraAlpha = 8
        c.loraDropout = 0.1
        c.batchSize = 2
        c.packing = false
        c.gradientAccumulationSteps = accumulation
        c.maxSteps = steps
        c.learningRate = 5e-3
        c.warmupSteps = 1
        c.loggingSteps = 1
        c.saveSteps = 2
        c.evalSteps = 2
        c.maxGradNorm = 0.5
        c.optimizer = "adamw"
        c.seed = 11
        c.shardBase = shardBase
        return c
    }

    func trainer(_ c: TrainingConfiguration, collective: Collective = LocalCollective()) throws -> Trainer {
        let t = try Trainer(configuration: c, model: try LlamaForwardTests.loadTinyLlama(), train: Self.examples(16, seed: 1), eval: Self.examples(5, seed: 2),
                            padID: 0, baseDirectory: nil, collective: collective)
        t.log = { _ in }
        t.showProgress = { _ in }
        return t
    }

    func adapterValues(_ directory: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: directory + "/adapter_model.safetensors")
        return try Dictionary(uniqueKeysWithValues: file.tensors.map { ($0.name, try file.floats($0.name)) })
    }

    /// 2 and 4 ranks (threads) with accumulation 2 and 1 give one process with accumulation 4 (16 examples, batch 2,
    /// 8 micro-batches an epoch, 4 steps over 2 epochs): the same losses, gradient norms, eval losses and adapter,
    /// within float rounding (the ranks add their gradients in another order). Only rank 0 writes files.
    func testTwoAndFourRanksGiveTheOneProcessRun() throws {
        let singleDir = try TestFixtures.temporaryDirectory("dp-single")
        let single = try trainer(Self.configuration(singleDir, accumulation: 4))
        _ = try single.run()
        XCTAssertEqual(single.history.count, 4)
        let singleAdapter = try adapterValues(singleDir)
        for world in [2, 4] {
            let dir = try TestFixtures.temporaryDirectory("dp-world\(world)")
            let trainers = try ThreadWorld.run(size: world) { collective -> Trainer in
                let t = try self.trainer(Self.configuration(dir, accumulation: 4 / world), collective: collective)
                _ = try t.run()
                return t
            }
            for (rank, t) in trainers.enumerated() {
                XCTAssertEqual(t.stepsPerEpoch, single.stepsPerEpoch)
                XCTAssertEqual(t.history.count, single.history.count, "world \(world), rank \(rank)")
                for (a, b) in zip(single.history, t.history) {
                    XCTAssertEqual(b.loss, a.loss, accuracy: 1e-5 * a.loss, "world \(world), rank \(rank), step \(a.step)")
                    XCTAssertEqual(b.gradientNorm, a.gradientNorm, accuracy: 1e-4 * a.gradientNorm, "world \(world), rank \(rank), step \(a.step)")
                    XCTAssertEqual(b.tokens, a.tokens, "world \(world), step \(a.step): the global batch's tokens")
                }
                XCTAssertEqual(t.evalHistory.map(\.step), single.evalHistory.map(\.step))
                for (a, b) in zip(single.evalHistory, t.evalHistory) {
                    XCTAssertEqual(b.loss, a.loss, accuracy: 1e-5 * a.loss, "world \(world), rank \(rank), eval at step \(a.step)")
                }
            }
            let adapter = try adapterValues(dir)
            XCTAssertEqual(Set(adapter.keys), Set(singleAdapter.keys))
            var worst = 0.0
            for (name, values) in singleAdapter {
                for (x, y) in zip(values, adapter[name]!) { worst = max(worst, Double(abs(x - y)) / max(Double(abs(x)), 1e-3)) }
            }
            XCTAssertLessThan(worst, 1e-3, "world \(world): the adapter's largest relative difference")
            XCTAssertEqual(try Checkpoints.steps(in: dir), try Checkpoints.steps(in: singleDir))
            XCTAssertEqual(try FileSystem.readText(dir + "/metrics.jsonl").split(separator: "\n").count,
                           try FileSystem.readText(singleDir + "/metrics.jsonl").split(separator: "\n").count, "rank 0 alone writes metrics")
        }
    }

    /// A data-parallel run stopped at step 2 and resumed (every rank restoring the checkpoint) continues as the run
    /// that never stopped.
    func testResumeRestoresEveryRank() throws {
        let straightDir = try TestFixtures.temporaryDirectory("dp-straight")
        let straight = try ThreadWorld.run(size: 2) { collective -> [StepRecord] in
            let t = try self.trainer(Self.configuration(straightDir, accumulation: 2), collective: collective)
            _ = try t.run()
            return t.history
        }
        let dir = try TestFixtures.temporaryDirectory("dp-resumed")
        _ = try ThreadWorld.run(size: 2) { collective -> Int in
            let t = try self.trainer(Self.configuration(dir, accumulation: 2), collective: collective)
            if collective.rank == 0 { t.shouldStop = { $0 == 2 } }  // one rank asks; every rank stops
            _ = try t.run()
            XCTAssertEqual(t.history.count, 2)
            return 0
        }
        let resumed = try ThreadWorld.run(size: 2) { collective -> [StepRecord] in
            var c = Self.configuration(dir, accumulation: 2)
            c.resume = true
            let t = try self.trainer(c, collective: collective)
            _ = try t.run()
            return t.history
        }
        for rank in 0..<2 {
            XCTAssertEqual(resumed[rank].count, 4)
            for (a, b) in zip(straight[rank], resumed[rank]) {
                XCTAssertEqual(a.loss, b.loss, "rank \(rank), step \(a.step)")
                XCTAssertEqual(a.gradientNorm, b.gradientNorm, "rank \(rank), step \(a.step)")
            }
        }
    }

    /// A data set whose micro-batches do not divide by the world: the last step's shards are padded from the start of
    /// the epoch order, as DistributedSampler pads (7 micro-batches over 2 ranks: 4 each, 2 steps at accumulation 2).
    func testUnevenShardsArePadded() throws {
        let dir = try TestFixtures.temporaryDirectory("dp-uneven")
        let trainers = try ThreadWorld.run(size: 2) { collective -> Trainer in
            var c = Self.configuration(dir, accumulation: 2, steps: 0)
            c.maxSteps = 0
            c.epochs = 1
            let t = try Trainer(configuration: c, model: try LlamaForwardTests.loadTinyLlama(), train: Self.examples(14, seed: 1),
                                eval: [], padID: 0, baseDirectory: nil, collective: collective)
            t.log = { _ in }
            t.showProgress = { _ in }
            _ = try t.run()
            return t
        }
        XCTAssertEqual(trainers[0].stepsPerEpoch, 2)
        XCTAssertEqual(trainers[0].history.count, 2)
        XCTAssertEqual(trainers[0].history.map(\.loss), trainers[1].history.map(\.loss))
    }
}

/// `qlora train --world N` (CPU processes over loopback sockets) and the launcher's handling of a failing rank.
extension CommandLineTests {
    func losses(_ directory: String) throws -> [Double] {
        try FileSystem.readText(directory + "/metrics.jsonl").split(separator: "\n").compactMap { try JSONValue.parse(String($0))["loss"]?.double }
    }

    /// Two CPU processes with accumulation 1 log the losses of one process with accumulation 2; a rank that dies stops
    /// the job with its message; --gpus on a machine without GPUs refuses.
    func testTrainWorldOfProcessesMatchesOneProcess() throws {
        let model = TestFixtures.path("tiny-llama/base")
        let data = try writeData((0..<8).map { i in #"{"input_ids": [\#(i + 1), \#(20 + i), 30, \#(40 + 2 * i), 50, 60], "labels": [-100, \#(20 + i), 30, \#(40 + 2 * i), 50, 60]}"# })
        let common = ["train", "--model", model, "--data", data, "--max-steps", "3", "--batch-size", "1", "--learning-rate", "1e-2",
                      "--logging-steps", "1", "--lora-dropout", "0", "--optimizer", "adamw"]
        let singleDir = try TestFixtures.temporaryDirectory("cli-dp-single") + "/run"
        let single = try qlora(common + ["--gradient-accumulation-steps", "2", "--output", singleDir, "--device", "cpu"])
        XCTAssertEqual(single.status, 0, single.err)
        let worldDir = try TestFixtures.temporaryDirectory("cli-dp-world") + "/run"
        let world = try qlora(common + ["--gradient-accumulation-steps", "1", "--output", worldDir, "--world", "2"])
        XCTAssertEqual(world.status, 0, world.err)
        XCTAssertTrue(world.err.contains("data parallel: 2 CPU ranks"), world.err)
        XCTAssertTrue(world.out.contains("2 ranks"), world.out)
        let (a, b) = (try losses(singleDir), try losses(worldDir))
        XCTAssertEqual(a.count, 3)
        XCTAssertEqual(b.count, 3)
        for (x, y) in zip(a, b) { XCTAssertEqual(x, y, accuracy: 1e-5 * x) }
        XCTAssertTrue(FileSystem.exists(worldDir + "/adapter_model.safetensors"))

        let failingDir = try TestFixtures.temporaryDirectory("cli-dp-fail") + "/run"
        let failing = try qlora(common + ["--max-steps", "20", "--output", failingDir, "--world", "3"], environment: ["QLORA_TEST_FAIL_RANK": "1:2"])
        XCTAssertNotEqual(failing.status, 0)
        XCTAssertTrue(failing.err.contains("rank 1 failed: test failure of rank 1 at step 2 (the other rank(s) were stopped)"), failing.err)
        XCTAssertTrue(failing.err.contains("were stopped"), failing.err)
        XCTAssertFalse(FileSystem.exists(failingDir + "/adapter_model.safetensors"))

        let gpus = try qlora(common + ["--output", failingDir + "-gpus", "--gpus", "2"])
        XCTAssertNotEqual(gpus.status, 0)
        XCTAssertTrue(gpus.err.contains("--gpus 2:"), gpus.err)
    }
}
