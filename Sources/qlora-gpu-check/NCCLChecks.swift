// NCCL on one GPU (data parallel, Backend/CUDA/NCCL.swift): the library loads through dlopen, a world of one rank
// all-reduces and broadcasts device and host buffers correctly, and the Trainer run through the data-parallel path
// (an NCCLCollective of one rank: gradient buckets all-reduced on NCCL's stream as the backward finishes each block,
// the loss reduced) gives the same bits as the plain path: with full determinism the losses, gradient norms, eval loss
// and adapter bytes of the two runs must be identical, for one bucket and for buckets of one block each.
// What a world of one cannot check (sums over several GPUs, the launcher's processes) waits for a machine with
// several GPUs: docs/MULTI_GPU.md.

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
}
