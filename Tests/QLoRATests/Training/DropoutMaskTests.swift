import XCTest
@testable import QLoRA

/// The counter-based dropout hash (Training/DropoutMask.swift). Its GPU twin in Kernels/qlora_prelude.cuh must give the
/// same values: these pinned values (computed independently with Python integers) hold the Swift side, and
/// qlora-gpu-check's "dropout mask" group holds the GPU to the Swift side bit for bit.
final class DropoutMaskTests: XCTestCase {
    func testPinnedHashValues() {
        let pinned: [(seed: UInt64, index: UInt64, hash: UInt64)] = [
            (0, 0, 0xE220_A839_7B1D_CDAF),  // SplitMix64's well-known first output for seed 0
            (0, 1, 0x6E78_9E6A_A1B9_65F4),
            (7, 0, 0x63CB_E1E4_5932_0DD7),
            (7, 12345, 0x9C34_4DE3_FEA3_E759),
            (0xDEAD_BEEF_CAFE_F00D, 3, 0xE7A8_6DC5_BE61_8392),
            (123_456_789, 1 << 33, 0xE378_4628_67DE_5FFF),
        ]
        for p in pinned {
            XCTAssertEqual(DropoutMask.hash(seed: p.seed, index: p.index), p.hash, "hash(\(p.seed), \(p.index))")
        }
        XCTAssertEqual(DropoutMask.uniform(seed: 0, index: 0), Float(14_819_496) / 16_777_216)
        XCTAssertEqual(DropoutMask.uniform(seed: 7, index: 12345), Float(10_237_005) / 16_777_216)
        XCTAssertEqual(DropoutMask.linearSeed(stepSeed: 7, block: 1, linear: 4), 0x5847_9141_8A14_2DED)
        XCTAssertEqual(DropoutMask.blockSeed(stepSeed: 7, block: 1), DropoutMask.hash(seed: 7, index: 1))
        // u(7, 0) = 0.3898…: kept at p = 0.5, dropped at p = 0.7.
        XCTAssertTrue(DropoutMask.keeps(seed: 7, index: 0, keep: 0.5))
        XCTAssertFalse(DropoutMask.keeps(seed: 7, index: 0, keep: 0.3))
    }

    /// The GPU evaluates the keep test with less integer work (Kernels/qlora_prelude.cuh: `dropout_high`,
    /// `dropout_limit`, `dropout_keep8`): only the high word of the last product, the shifts as 32-bit multiplies'
    /// high halves, an integer threshold, and the drop bits as the carries of hi(w) + ~limit. The same steps in 32-bit
    /// Swift arithmetic give DropoutMask.keeps for every element, at keep probabilities from 2⁻²⁴ to 1 (the kernels'
    /// checks hold the GPU to the same masks).
    func testGPUFormulationEqualsTheDefinition() {
        func umulhi(_ a: UInt32, _ b: UInt32) -> UInt32 { UInt32((UInt64(a) * UInt64(b)) >> 32) }
        func high(_ z: UInt64) -> UInt32 {
            let lo = UInt32(truncatingIfNeeded: z), hi = UInt32(z >> 32)
            let xlo = lo ^ umulhi(lo, 4) ^ (hi << 2), xhi = hi ^ umulhi(hi, 4)
            let p = UInt64(xlo) * 0x1CE4_E5B9
            let z1lo = UInt32(truncatingIfNeeded: p), z1hi = UInt32(p >> 32) &+ xlo &* 0xBF58_476D &+ xhi &* 0x1CE4_E5B9
            let ylo = z1lo ^ umulhi(z1lo, 32) ^ (z1hi << 5), yhi = z1hi ^ umulhi(z1hi, 32)
            return umulhi(ylo, 0x1331_11EB) &+ ylo &* 0x94D0_49BB &+ yhi &* 0x1331_11EB
        }
        func limit(_ keep: Float) -> UInt32 { UInt32(truncatingIfNeeded: 256 * UInt64((keep * 16_777_216).rounded(.up)) - 1) }
        func keep8(seed: UInt64, index i0: Int, keep: Float) -> UInt8 {
            let z0 = seed &+ DropoutMask.gamma &* UInt64(i0 + 1), above = ~limit(keep)
            var drops: UInt32 = 0
            for e in stride(from: 7, through: 0, by: -1) {
                let carry: UInt32 = high(z0 &+ DropoutMask.gamma &* UInt64(e)).addingReportingOverflow(above).overflow ? 1 : 0
                drops = drops &+ drops &+ carry
            }
            return UInt8(truncatingIfNeeded: ~drops)
        }
        var rng = SeededGenerator(seed: 11)
        let keeps: [Float] = [0.95, 0.9, 0.5, 0.1, 1, 1 - 0x1p-24, 0x1p-24, 0.3]
        var compared = 0
        for keep in keeps {
            for _ in 0..<500 {
                let seed = rng.next(), i0 = Int(rng.next() >> 24)
                let bits = keep8(seed: seed, index: i0, keep: keep)
                for e in 0..<8 {
                    let expected = DropoutMask.keeps(seed: seed, index: i0 + e, keep: keep)
                    XCTAssertEqual((bits >> e) & 1 == 1, expected, "seed \(seed), index \(i0 + e), keep \(keep)")
                    XCTAssertEqual(high(seed &+ DropoutMask.gamma &* UInt64(i0 + e + 1)) <= limit(keep), expected)
                    compared += 1
                }
            }
        }
        XCTAssertEqual(compared, keeps.count * 4000)
    }

    /// hash(s, i) is the (i + 1)-th draw of SeededGenerator(seed: s): the masks the CPU drew before are unchanged.
    func testHashIsTheSeededGeneratorStream() {
        for seed: UInt64 in [0, 1, 42, 0xFFFF_FFFF_FFFF_FFFF] {
            var rng = SeededGenerator(seed: seed)
            for i in 0..<1000 {
                XCTAssertEqual(DropoutMask.hash(seed: seed, index: UInt64(i)), rng.next())
            }
            var floats = SeededGenerator(seed: seed)
            for i in 0..<100 { XCTAssertEqual(DropoutMask.uniform(seed: seed, index: i), floats.nextFloat()) }
        }
    }

    /// The CPU's per-linear seeds are DropoutMask.linearSeed(step seed, block, linear), which the GPU trainer uses.
    func testCPUSeedsAreTheLinearSeeds() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        let batch = try BackwardTests.fixtureBatch()
        let x = Matrix(rows: batch.tokenCount, columns: model.config.hiddenSize)
        let stepSeed: UInt64 = 99
        for (l, block) in model.blocks.enumerated() {
            let a = model.blockForward(block, layer: l, input: x, batch: batch, dropoutSeed: DropoutMask.blockSeed(stepSeed: stepSeed, block: l))
            for (j, layer) in block.linears.enumerated() {
                XCTAssertEqual(a.dropoutSeeds[layer.name], DropoutMask.linearSeed(stepSeed: stepSeed, block: l, linear: j), layer.name)
            }
        }
    }

    /// The training forward's LoRA input is x·m/(1 − p) with m from the hash of the linear's seed, element by element.
    func testLoRAInputIsMaskedByTheHash() throws {
        let model = try LlamaForwardTests.loadTinyLlama()
        try PEFTAdapter.load(directory: TestFixtures.path("tiny-llama/adapter"), into: model)
        let layer = model.blocks[0].q!
        let p: Float = 0.25
        layer.lora?.dropout = p
        let n = 5
        var values: [Float] = []
        var rng = SeededGenerator(seed: 3)
        for _ in 0..<(n * layer.inFeatures) { values.append(rng.nextFloat() * 2 - 1) }
        let x = Matrix(rows: n, columns: layer.inFeatures, values: values)
        let activations = BlockActivations(config: model.config, tokens: n, input: x)
        let seed: UInt64 = 0x1234_5678
        activations.dropoutSeeds[layer.name] = seed
        let y = Matrix(rows: n, columns: layer.outFeatures)
        model.linearForward(layer, x, saving: activations, into: y.pointer)
        let dropped = try XCTUnwrap(activations.loraInputs[layer.name])
        var kept = 0
        for i in 0..<x.count {
            let keep = DropoutMask.keeps(seed: seed, index: i, keep: 1 - p)
            XCTAssertEqual(dropped.pointer[i], keep ? values[i] / (1 - p) : 0, "element \(i)")
            if keep { kept += 1 }
        }
        // About 3/4 of 320 elements survive.
        XCTAssertEqual(Double(kept) / Double(x.count), 0.75, accuracy: 0.1)
    }
}
