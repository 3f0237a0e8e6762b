import XCTest
@testable import QLoRA

/// Reads a fixture of Tests/Fixtures/optimizers (written by scripts/make_optimizer_fixtures.py).
private func optimizerFixture(_ name: String) throws -> SafeTensorsFile {
    try SafeTensorsFile(path: TestFixtures.path("optimizers/" + name))
}

/// How many elements differ in their bits.
private func bitMismatches(_ a: [Float], _ b: [Float]) -> Int {
    a.count != b.count ? max(a.count, b.count) : zip(a, b).filter { $0.bitPattern != $1.bitPattern }.count
}

private func lrs(_ file: SafeTensorsFile) throws -> [Double] {
    let json = try JSONValue.parse(file.metadata["lrs"] ?? "[]")
    return (json.array ?? []).compactMap(\.double)
}

final class DynamicQuantizationTests: XCTestCase {
    func testMapsEqualBitsandbytesCreateDynamicMap() throws {
        let file = try optimizerFixture("adamw_8bit.safetensors")
        XCTAssertEqual(bitMismatches(DynamicQuantizationMap.signed.values, try file.floats("code.signed")), 0)
        XCTAssertEqual(bitMismatches(DynamicQuantizationMap.unsigned.values, try file.floats("code.unsigned")), 0)
        XCTAssertEqual(DynamicQuantizationMap.signed.values[127], 0)
        XCTAssertEqual(DynamicQuantizationMap.signed.values[255], 1)
        XCTAssertEqual(DynamicQuantizationMap.unsigned.values[0], 0)
    }

    func testQuantizePicksANearestCode() {
        var rng = SeededGenerator(seed: 20261123)
        for map in [DynamicQuantizationMap.signed, .unsigned] {
            let lowest: Float = map.signed ? -1 : 0
            for _ in 0..<20_000 {
                // Magnitudes over many decades, as optimizer moments relative to their block max.
                var x = Float.random(in: 0...1, using: &rng)
                x = x * x * x * x * x * x
                if map.signed && Bool.random(using: &rng) { x = -x }
                x = max(lowest, x)
                let code = Int(map.quantize(x))
                let best = map.values.map { abs($0 - x) }.min()!
                // A value on the midpoint of two codes may go either way: the kernel compares with the midpoint
                // rounded to fp32, and the two distances differ only by that rounding (seen at x = 0.296875).
                XCTAssertEqual(abs(map.values[code] - x), best, accuracy: best * 1e-6 + 4 * x.magnitude.ulp + 1e-12, "x = \(x) got code \(code)")
            }
        }
    }

    /// The branch-free search equals a line-by-line port of the kernel's quantize_2D, sentinels included,
    /// on random values, every code, every midpoint and its neighbours, and the odd cases.
    func testQuantizeEqualsTheKernelsSearch() {
        func kernel(_ x: Float, _ code: [Float], signed: Bool) -> Int {
            var pivot = 127, upperPivot = 255, lowerPivot = 0
            var lower: Float = signed ? -1 : 0, upper: Float = 1
            var val = code[1 * 64 + 63]  // quadrants[1]
            var i = 64
            while i > 0 {
                if x > val { lowerPivot = pivot; lower = val; pivot += i } else { upperPivot = pivot; upper = val; pivot -= i }
                val = code[pivot]
                i >>= 1
            }
            if x > val { return x > (upper + val) * 0.5 ? upperPivot : pivot }
            return x < (lower + val) * 0.5 ? lowerPivot : pivot
        }
        var rng = SeededGenerator(seed: 9)
        for map in [DynamicQuantizationMap.signed, .unsigned] {
            var inputs: [Float] = [0, -0.0, 1, -1, 2, -2, .infinity, -.infinity, .nan, .leastNonzeroMagnitude, -.leastNonzeroMagnitude]
            for k in 0..<256 {
                let v = map.values[k]
                inputs += [v, v.nextUp, v.nextDown]
                if k < 255 {
                    let mid = (v + map.values[k + 1]) * 0.5
                    inputs += [mid, mid.nextUp, mid.nextDown]
                }
            }
            for _ in 0..<50_000 { inputs.append(rng.normal() * Float(pow(10.0, Double.random(in: -8...0, using: &rng)))) }
            // Every bucket of the shortcut table, at both ends and inside.
            for bucket in stride(from: 0, to: 1 << 16, by: 1) {
                inputs.append(Float(bitPattern: UInt32(bucket) << 16))
                inputs.append(Float(bitPattern: UInt32(bucket) << 16 | 0x8000))
                inputs.append(Float(bitPattern: UInt32(bucket) << 16 | 0xFFFF))
            }
            var mismatches = 0
            for x in inputs {
                let expected = kernel(x, map.values, signed: map.signed)
                if Int(map.quantize(x)) != expected || Int(map.quantizeBySearch(x)) != expected {
                    mismatches += 1
                    if mismatches < 5 { XCTFail("x = \(x) signed \(map.signed): \(map.quantize(x)) / \(map.quantizeBySearch(x)), kernel \(expected)") }
                }
            }
            XCTAssertEqual(mismatches, 0)
        }
    }

    func testBlockwiseRoundTrip() {
        let values = (0..<1000).map { i in Float(sin(Double(i) * 0.37)) * Float(i % 7 + 1) }
        let (codes, absmax) = BlockwiseQuantization.quantize(values, map: .signed, blockSize: 256)
        XCTAssertEqual(absmax.count, 4)
        let back = BlockwiseQuantization.dequantize(codes, absmax: absmax, map: .signed, blockSize: 256)
        for i in values.indices {
            let block = absmax[i / 256]
            XCTAssertEqual(back[i], values[i], accuracy: block * 0.01, "element \(i)")
        }
    }
}

final class AdamWTests: XCTestCase {
    func testMatchesTorchAdamW() throws {
        let file = try optimizerFixture("adamw_torch.safetensors")
        let names = ["layer.0.lora_A", "layer.0.lora_B", "bias"]
        let rates = try lrs(file)
        XCTAssertEqual(rates.count, 5)
        var params = try names.map { ParameterTensor(name: $0, shape: file.info("init.\($0)")!.shape, values: try file.floats("init.\($0)")) }
        let optimizer = try OptimizerKind.adamw.make(AdamWHyperparameters(weightDecay: 0.01))
        for (k, lr) in rates.enumerated() {
            let step = k + 1
            let grads = try names.map { try file.floats("step\(step).grad.\($0)") }
            try optimizer.step(parameters: &params, gradients: grads, learningRate: lr)
            for (i, name) in names.enumerated() {
                let expected = try file.floats("step\(step).param.\(name)")
                XCTAssertLessThan(relativeError(params[i].values, expected), 1e-6, "step \(step) \(name)")
                if ProcessInfo.processInfo.environment["SHOW_ERRORS"] != nil { print("torch AdamW step \(step) \(name): relative error \(relativeError(params[i].values, expected)), \(zip(params[i].values, expected).filter { $0.bitPattern != $1.bitPattern }.count) of \(expected.count) differ in bits") }
            }
        }
        XCTAssertEqual(optimizer.stepCount, 5)
        let state = Dictionary(uniqueKeysWithValues: optimizer.state().map { ($0.name, $0) })
        for name in names {
            for buffer in ["exp_avg", "exp_avg_sq"] {
                let record = try XCTUnwrap(state["state.\(name).\(buffer)"])
                let values = record.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
                XCTAssertLessThan(relativeError(values, try file.floats("final.\(buffer).\(name)")), 1e-6, "\(buffer) of \(name)")
            }
        }
    }

    func testBitsandbytes32bitArithmeticMatchesReference() throws {
        // The fixture's "small" tensor (300 values) went through bitsandbytes' 32-bit kernel.
        let file = try optimizerFixture("adamw_8bit.safetensors")
        var p = try file.floats("init.small")
        let optimizer = try OptimizerKind.pagedAdamw32bit.make(AdamWHyperparameters(weightDecay: 0.01))
        for (k, lr) in try lrs(file).enumerated() {
            let g = try file.floats("step\(k + 1).grad.small")
            var params = [ParameterTensor(name: "small", shape: [p.count], values: p)]
            try optimizer.step(parameters: &params, gradients: [g], learningRate: lr)
            p = params[0].values
            XCTAssertEqual(bitMismatches(p, try file.floats("step\(k + 1).param.small")), 0, "step \(k + 1)")
        }
    }

    func testKindsParse() throws {
        XCTAssertEqual(try OptimizerKind.parse("adamw"), .adamw)
        XCTAssertEqual(try OptimizerKind.parse("adamw_torch"), .adamw)
        XCTAssertEqual(try OptimizerKind.parse("adamw_8bit"), .adamw8bit)
        XCTAssertEqual(try OptimizerKind.parse("paged_adamw_8bit"), .pagedAdamw8bit)
        XCTAssertEqual(try OptimizerKind.parse("paged_adamw_32bit"), .pagedAdamw32bit)
        XCTAssertThrowsError(try OptimizerKind.parse("sgd")) { error in
            XCTAssertTrue("\(error)".contains("paged_adamw_8bit"), "\(error)")
        }
        XCTAssertTrue(try OptimizerKind.pagedAdamw8bit.make() is AdamW8bit)
        XCTAssertTrue(try OptimizerKind.adamw.make() is AdamW)
        XCTAssertEqual(OptimizerKind.adamw8bit.stateBytes(count: 8192), 2 * 8192 + 8 * 32)
        XCTAssertEqual(OptimizerKind.adamw8bit.stateBytes(count: 100), 800)
        XCTAssertThrowsError(try AdamW(AdamWHyperparameters(beta1: 1.0)))
    }

    func testMismatchedInputsThrow() throws {
        let optimizer = try AdamW()
        var params = [ParameterTensor(name: "a", shape: [3], values: [1, 2, 3])]
        XCTAssertThrowsError(try optimizer.step(parameters: &params, gradients: [[1, 2]], learningRate: 0.1))
        XCTAssertThrowsError(try optimizer.step(parameters: &params, gradients: [], learningRate: 0.1))
        try optimizer.step(parameters: &params, gradients: [[1, 2, 3]], learningRate: 0.1)
        var other = [ParameterTensor(name: "a", shape: [4], values: [1, 2, 3, 4])]
        XCTAssertThrowsError(try optimizer.step(parameters: &other, gradients: [[1, 2, 3, 4]], learningRate: 0.1)) { error in
            XCTAssertTrue("\(error)".contains("'a'"), "\(error)")
        }
    }
}

final class AdamW8bitTests: XCTestCase {
    /// The 8-bit states (codes and absmax) and parameters equal the numpy re-implementation of
    /// bitsandbytes' blockwise kernel at every step, including a short last block, an all-zero block
    /// and non-finite gradients.
    func testStatesMatchBitsandbytesReference() throws {
        let file = try optimizerFixture("adamw_8bit.safetensors")
        var params = [
            ParameterTensor(name: "big", shape: [5000], values: try file.floats("init.big")),
            ParameterTensor(name: "small", shape: [300], values: try file.floats("init.small")),
        ]
        let optimizer = try AdamW8bit(AdamWHyperparameters(weightDecay: 0.01))
        for (k, lr) in try lrs(file).enumerated() {
            let step = k + 1
            let grads = [try file.floats("step\(step).grad.big"), try file.floats("step\(step).grad.small")]
            try optimizer.step(parameters: &params, gradients: grads, learningRate: lr)
            let q = try XCTUnwrap(optimizer.quantized["big"])
            let s1 = Array(try file.bytes("step\(step).state1.big"))
            let s2 = Array(try file.bytes("step\(step).state2.big"))
            XCTAssertEqual(zip(q.state1, s1).filter { $0 != $1 }.count, 0, "state1 codes differ at step \(step)")
            XCTAssertEqual(zip(q.state2, s2).filter { $0 != $1 }.count, 0, "state2 codes differ at step \(step)")
            XCTAssertEqual(bitMismatches(Array(q.absmax1), try file.floats("step\(step).absmax1.big")), 0, "absmax1 step \(step)")
            XCTAssertEqual(bitMismatches(Array(q.absmax2), try file.floats("step\(step).absmax2.big")), 0, "absmax2 step \(step)")
            XCTAssertEqual(bitMismatches(params[0].values, try file.floats("step\(step).param.big")), 0, "big params step \(step)")
            XCTAssertEqual(bitMismatches(params[1].values, try file.floats("step\(step).param.small")), 0, "small params step \(step)")
            let m = try XCTUnwrap(optimizer.small["small"])
            XCTAssertEqual(bitMismatches(m.expAvg, try file.floats("step\(step).exp_avg.small")), 0)
            XCTAssertEqual(bitMismatches(m.expAvgSq, try file.floats("step\(step).exp_avg_sq.small")), 0)
        }
        XCTAssertNil(optimizer.quantized["small"], "tensors under 4096 elements keep fp32 state")
        XCTAssertEqual(params[0].values[10], try file.floats("init.big")[10] * 1, accuracy: 1, "non-finite gradient keeps the parameter finite")
        XCTAssertTrue(params[0].values.allSatisfy(\.isFinite))
    }

    /// Threads split the blocks of a tensor; the result must not depend on how many.
    func testThreadsDoNotChangeTheResult() throws {
        let n = 70_000
        var rng = SeededGenerator(seed: 5)
        let p0 = (0..<n).map { _ in rng.normal() }
        let grads = (0..<3).map { _ in (0..<n).map { _ in rng.normal() * 0.01 } }
        var results: [[Float]] = []
        for threads in [1, 2] {
            let optimizer = try AdamW8bit(AdamWHyperparameters(weightDecay: 0.1))
            optimizer.threads = threads
            var params = [ParameterTensor(name: "w", shape: [n], values: p0)]
            for g in grads { try optimizer.step(parameters: &params, gradients: [g], learningRate: 1e-3) }
            results.append(params[0].values)
        }
        XCTAssertEqual(bitMismatches(results[0], results[1]), 0)
    }

    /// On a quadratic bowl 8-bit AdamW follows fp32 AdamW closely over 20 steps.
    func testTracksFp32AdamWOnAQuadratic() throws {
        let n = 8192
        var rng = SeededGenerator(seed: 11)
        let curvature = (0..<n).map { _ in Float.random(in: 0.1...10, using: &rng) }
        let target = (0..<n).map { _ in rng.normal() }
        let start = (0..<n).map { _ in rng.normal() }
        func gradient(_ x: [Float]) -> [Float] { (0..<n).map { curvature[$0] * (x[$0] - target[$0]) } }
        func loss(_ x: [Float]) -> Double {
            var total = 0.0
            for i in 0..<n {
                let d = Double(x[i]) - Double(target[i])
                total += 0.5 * Double(curvature[i]) * d * d
            }
            return total
        }
        var trajectories: [[Float]] = []
        var losses: [Double] = []
        for kind in [OptimizerKind.pagedAdamw32bit, .adamw8bit] {
            let optimizer = try kind.make(AdamWHyperparameters(weightDecay: 0.01))
            var params = [ParameterTensor(name: "x", shape: [n], values: start)]
            for _ in 0..<20 {
                try optimizer.step(parameters: &params, gradients: [gradient(params[0].values)], learningRate: 0.05)
            }
            trajectories.append(params[0].values)
            losses.append(loss(params[0].values))
        }
        let moved32 = zip(trajectories[0], start).map { $0 - $1 }
        let moved8 = zip(trajectories[1], start).map { $0 - $1 }
        let error = relativeError(moved8, moved32)
        // The dynamic map's codes are 0.9/64 of the block max apart in the top decade, so moments a decade
        // below their block max carry a few percent of error: the displacements agree to ~4%, the losses to <1%.
        XCTAssertLessThan(error, 0.06, "8-bit displacement differs from fp32 by \(error); losses \(losses), start \(loss(start))")
        XCTAssertLessThan(abs(losses[1] - losses[0]) / losses[0], 0.02, "losses \(losses)")
        XCTAssertLessThan(losses[0], loss(start) * 0.6)
        XCTAssertLessThan(losses[1], loss(start) * 0.6)
    }
}

final class OptimizerStateTests: XCTestCase {
    /// Saving after k steps and loading into a fresh optimizer continues bit for bit.
    func testResumeIsExact() throws {
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for kind in OptimizerKind.allCases {
            var rng = SeededGenerator(seed: 3)
            let shapes = [("m.lora_A", 5000), ("m.lora_B", 700)]
            let start = shapes.map { ParameterTensor(name: $0.0, shape: [$0.1], values: (0..<$0.1).map { _ in rng.normal() }) }
            let grads = (0..<6).map { _ in shapes.map { s in (0..<s.1).map { _ in rng.normal() * 0.1 } } }
            let h = AdamWHyperparameters(weightDecay: 0.05)

            let straight = try kind.make(h)
            var a = start
            for g in grads { try straight.step(parameters: &a, gradients: g, learningRate: 2e-3) }

            let first = try kind.make(h)
            var b = start
            for g in grads[0..<3] { try first.step(parameters: &b, gradients: g, learningRate: 2e-3) }
            let path = dir + "/\(kind.rawValue).safetensors"
            try first.save(to: path)
            let resumed = try kind.make(h)
            try resumed.load(from: path)
            XCTAssertEqual(resumed.stepCount, 3)
            for g in grads[3...] { try resumed.step(parameters: &b, gradients: g, learningRate: 2e-3) }
            for i in a.indices {
                XCTAssertEqual(bitMismatches(a[i].values, b[i].values), 0, "\(kind) \(a[i].name)")
            }
            let names = Set(first.state().map(\.name))
            XCTAssertTrue(names.contains("optimizer.step"))
            if kind.is8bit {
                XCTAssertTrue(names.isSuperset(of: ["state.m.lora_A.state1", "state.m.lora_A.state2", "state.m.lora_A.absmax1",
                                                    "state.m.lora_A.absmax2", "state.m.lora_B.exp_avg", "state.m.lora_B.exp_avg_sq"]), "\(names)")
            } else {
                XCTAssertEqual(names, ["optimizer.step", "state.m.lora_A.exp_avg", "state.m.lora_A.exp_avg_sq",
                                       "state.m.lora_B.exp_avg", "state.m.lora_B.exp_avg_sq"])
            }
        }
    }

    func testBadStateFilesAreReported() throws {
        let dir = try TestFixtures.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/bad.safetensors"
        // Missing step counter.
        try SafeTensorsWriter.write([TensorRecord(name: "state.a.exp_avg", floats: [1, 2], shape: [2])], to: path)
        XCTAssertThrowsError(try AdamW().load(from: path)) { error in
            XCTAssertTrue("\(error)".contains("optimizer.step"), "\(error)")
        }
        // exp_avg without exp_avg_sq.
        try SafeTensorsWriter.write([OptimizerStateRecords.step(2), TensorRecord(name: "state.a.exp_avg", floats: [1, 2], shape: [2])], to: path)
        XCTAssertThrowsError(try AdamW().load(from: path)) { error in
            XCTAssertTrue("\(error)".contains("state.a.exp_avg_sq"), "\(error)")
        }
        // 8-bit state missing absmax2.
        try SafeTensorsWriter.write([OptimizerStateRecords.step(2),
                                     OptimizerStateRecords.bytes("state.w.state1", [UInt8](repeating: 0, count: 4096)),
                                     OptimizerStateRecords.bytes("state.w.state2", [UInt8](repeating: 0, count: 4096)),
                                     OptimizerStateRecords.floats("state.w.absmax1", [Float](repeating: 0, count: 16))], to: path)
        XCTAssertThrowsError(try AdamW8bit().load(from: path)) { error in
            XCTAssertTrue("\(error)".contains("absmax2"), "\(error)")
        }
        // An 8-bit state file cannot resume fp32 AdamW.
        let eight = try AdamW8bit()
        var p = [ParameterTensor(name: "w", shape: [4096], values: [Float](repeating: 1, count: 4096))]
        try eight.step(parameters: &p, gradients: [[Float](repeating: 0.5, count: 4096)], learningRate: 0.1)
        try eight.save(to: path)
        XCTAssertThrowsError(try AdamW().load(from: path))
        // A state of the wrong size for the parameter is refused at the next step.
        let resumed = try AdamW8bit()
        try resumed.load(from: path)
        var wrong = [ParameterTensor(name: "w", shape: [5000], values: [Float](repeating: 1, count: 5000))]
        XCTAssertThrowsError(try resumed.step(parameters: &wrong, gradients: [[Float](repeating: 0.5, count: 5000)], learningRate: 0.1))
    }
}

/// Normal test data from the library's seeded generator (Box-Muller).
extension SeededGenerator {
    mutating func normal() -> Float {
        let u1 = Double.random(in: Double.ulpOfOne..<1, using: &self)
        let u2 = Double.random(in: 0..<1, using: &self)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}
