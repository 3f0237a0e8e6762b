// The paged optimizers' state streamed through two device slots (CUDAOptimizer's header):
//   paged optimizer streamed   paged_adamw_8bit over 41 tensors of mixed sizes (8-bit regions from 4,096 values to
//                              the largest, fp32 ones under 4,096; several to a chunk, chunks alternating between the
//                              slots, one tensor alone filling a slot) against adamw_8bit with its state on the device:
//                              the same kernels on the same bytes, so the state records and the parameters after 4 steps
//                              (one with a NaN and an infinite gradient) are equal bit for bit; the state saved and
//                              loaded into a fresh paged optimizer steps on equally; the device holds the two slots.
//                              With the benchmarks: one step over the LoRA tensors of the 8B shape at r 16 (448
//                              tensors, 42M values), paged (streamed) against adamw_8bit on the device, ms a step.

#if canImport(Glibc)
import Glibc
#endif
import QLoRA

/// `count` values of `values` and `gradient` at element offsets, one slot per tensor (as the trainer's flat buffers).
private func flatSlots(_ sizes: [Int], values: DeviceBuffer<Float>, gradient: DeviceBuffer<Float>) -> [CUDAParameterSlot] {
    var offset = 0
    return sizes.enumerated().map { (i, n) in
        defer { offset += (n + 127) / 128 * 128 }
        return CUDAParameterSlot(name: "t\(i)", values: values, gradient: gradient, count: n, offset: offset)
    }
}

private func flatCount(_ sizes: [Int]) -> Int { sizes.reduce(0) { $0 + ($1 + 127) / 128 * 128 } }

func checkPagedOptimizerStreamed() throws {
    let pattern = [70_000, 5_000, 1_000, 131_072, 65_536, 4_096, 4_095, 300, 16_384, 8_192]
    let sizes = (0..<4).flatMap { _ in pattern } + [262_144]  // the last fills a slot alone
    let hyper = AdamWHyperparameters(weightDecay: 0.01)
    let count = flatCount(sizes)
    let initial = rng.floats(count, -1, 1)
    let valuesU = try upload(initial), valuesP = try upload(initial), valuesL = try upload(initial)
    let gradient = try A.buffer(Float.self, count: count)
    let slotsU = flatSlots(sizes, values: valuesU, gradient: gradient), slotsP = flatSlots(sizes, values: valuesP, gradient: gradient)
    let slotsL = flatSlots(sizes, values: valuesL, gradient: gradient)
    let unpaged = try CUDAOptimizer(context: ctx, kind: .adamw8bit, hyper)
    let paged = try CUDAOptimizer(context: ctx, kind: .pagedAdamw8bit, hyper)
    var reloaded: CUDAOptimizer? = nil
    for step in 1...4 {
        var g = rng.floats(count, -0.1, 0.1)
        if step == 2 { g[7] = .nan; g[70_200] = .infinity }
        try gradient.upload(g)
        try unpaged.step(slotsU, learningRate: 1e-2)
        try paged.step(slotsP, learningRate: 1e-2)
        if step == 2 {
            // The paged state after two steps, saved and loaded into a fresh paged optimizer that goes on from there.
            let path = "/tmp/qlora-gpu-check-paged-state-\(getpid()).safetensors"
            try SafeTensorsWriter.write(try paged.state(), to: path)
            defer { unlink(path) }
            let file = try SafeTensorsFile(path: path)
            let fresh = try CUDAOptimizer(context: ctx, kind: .pagedAdamw8bit, hyper)
            try fresh.load(state: file)
            try valuesL.upload(try valuesP.download())
            reloaded = fresh
        } else if step > 2, let reloaded {
            try reloaded.step(slotsL, learningRate: 1e-2)
        }
    }
    let stateU = try unpaged.state(), stateP = try paged.state()
    let sameNames = stateU.map(\.name) == stateP.map(\.name)
    let differing = zip(stateU, stateP).filter { $0.data != $1.data }.map { $0.0.name }
    checkTrue("paged streamed: state records = adamw8bit, bit for bit", sameNames && differing.isEmpty && stateU.count == 1 + sizes.reduce(0) { $0 + ($1 >= 4096 ? 4 : 2) },
              "\(stateU.count) records" + (differing.isEmpty ? "" : "; differing: \(differing.prefix(4).joined(separator: ", "))"))
    let u = try valuesU.download(), p = try valuesP.download()
    let firstDifference = zip(u, p).enumerated().first { $0.element.0.bitPattern != $0.element.1.bitPattern }?.offset
    checkTrue("paged streamed: parameters after 4 steps = adamw8bit, bit for bit", firstDifference == nil,
              firstDifference.map { "first difference at \($0): \(p[$0]) vs \(u[$0])" } ?? "\(count) values")
    let l = try valuesL.download()
    let loadDifference = zip(l, p).enumerated().first { $0.element.0.bitPattern != $0.element.1.bitPattern }?.offset
    let stateL = try reloaded.map { try $0.state() } ?? []
    checkTrue("paged streamed: saved, loaded and stepped on = uninterrupted", loadDifference == nil
                  && stateL.map(\.data) == stateP.map(\.data),
              loadDifference.map { "first parameter difference at \($0)" } ?? "parameters and state bit for bit")
    // The two slots: each the largest tensor's 8-bit region (262,144 values).
    let largest = 2 * 262_144 + 8 * (262_144 / 256)
    checkTrue("paged streamed: the device holds two slots of the largest state", paged.deviceStateBytes >= 2 * largest
                  && paged.deviceStateBytes <= 2 * DeviceAllocator.sizeClass(largest),
              "\(paged.deviceStateBytes) bytes, slots of \(largest)")
}

/// One optimizer step over the LoRA tensors of the 8B shape at r 16, paged (streamed) and with the state on the device.
func benchPagedOptimizer() throws {
    let config = Architecture.llama3_1_8b.config, r = 16
    let (h, i, q, kv) = (config.hiddenSize, config.intermediateSize, config.qDim, config.kvDim)
    let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  // (out, in) of q, k, v, o, gate, up, down
    let sizes = (0..<config.layerCount).flatMap { _ in shapes.flatMap { [r * $0.1, $0.0 * r] } }
    let count = flatCount(sizes)
    let values = try upload(rng.floats(count, -0.02, 0.02)), gradient = try upload(rng.floats(count, -1e-3, 1e-3))
    let slots = flatSlots(sizes, values: values, gradient: gradient)
    var line = "bench optimizer step, 8B r16 (\(sizes.count) tensors, \(count / 1_000_000)M values):"
    for kind in [OptimizerKind.pagedAdamw8bit, .adamw8bit] {
        let optimizer = try CUDAOptimizer(context: ctx, kind: kind)
        let ms = try timeMedian(10, warmup: 2) { try optimizer.step(slots, learningRate: 1e-4) }
        line += " \(kind.rawValue) \(fmt(ms, 3)) ms (device state \(fmt(Double(optimizer.deviceStateBytes) / Double(1 << 20), 1)) MiB);"
    }
    print(line)
}

func runOptimizerChecks() {
    group("paged optimizer streamed") {
        try checkPagedOptimizerStreamed()
        if runBench { try benchPagedOptimizer() }
    }
}
