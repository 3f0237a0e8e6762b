import XCTest
@testable import QLoRA

/// The counter-based dropout hash (Training/DropoutMask.swift). Its GPU twin in Kernels/qlora_prelude.cuh must give the
/// same values: these pinned values (computed independently with Python integers) hold the Swift side, and
/// qlora-gpu-check's "dropout mask" group holds the GPU to the Swift side bit for bit.
final class DropoutMaskTests: XCTestCase {
    func testPinnedHashValues() {
        // The seeds' hash: SplitMix64.
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
        // The masks' pair hash (values from Python integers: fmix32 of the folded Weyl counter).
        let pairs: [(seed: UInt64, pair: UInt64, hash: UInt32)] = [
            (0, 0, 0x8FFD_0E06), (0, 1, 0x8633_EF6D), (7, 0, 0x1FB7_6C37), (7, 12345, 0x6C93_1624),
            (0xDEAD_BEEF_CAFE_F00D, 3, 0x9441_A592), (123_456_789, 1 << 33, 0x9D92_E937),
        ]
        for p in pairs {
            XCTAssertEqual(DropoutMask.pairHash(seed: p.seed, pair: p.pair), p.hash, "pairHash(\(p.seed), \(p.pair))")
        }
        XCTAssertEqual(DropoutMask.uniform16(seed: 0, index: 0), 3590)    // the low half of pair 0
        XCTAssertEqual(DropoutMask.uniform16(seed: 0, index: 1), 36861)   // its high half
        XCTAssertEqual(DropoutMask.uniform16(seed: 7, index: 24691), 27795)
        XCTAssertEqual(DropoutMask.linearSeed(stepSeed: 7, block: 1, linear: 4), 0x5847_9141_8A14_2DED)
        XCTAssertEqual(DropoutMask.blockSeed(stepSeed: 7, block: 1), DropoutMask.hash(seed: 7, index: 1))
        // u(7, 0) = 27703 (0.4227 of 2¹⁶): kept at p = 0.5 (T = 32768), dropped at p = 0.7 (T = ⌈0.3·2¹⁶⌉ = 19661).
        XCTAssertEqual(DropoutMask.uniform16(seed: 7, index: 0), 27703)
        XCTAssertTrue(DropoutMask.keeps(seed: 7, index: 0, keep: 0.5))
        XCTAssertFalse(DropoutMask.keeps(seed: 7, index: 0, keep: 0.3))
        XCTAssertEqual(DropoutMask.threshold(keep: 1), 65536)
        XCTAssertEqual(DropoutMask.threshold(keep: 0.3), 19661)
    }

    /// The GPU's formulation (Kernels/qlora_prelude.cuh: `dropout_limit`, `dropout_pair_bits`, `dropout_keep8`): an
    /// integer limit T − 1, and eight elements' bits from 4 pair hashes (even first index) or 5 (odd), the counter
    /// stepped by γ. The same steps in Swift give DropoutMask.keeps for every element, at keep probabilities from
    /// 2⁻¹⁶ to 1 (the kernels' checks hold the GPU to the same masks).
    func testGPUFormulationEqualsTheDefinition() {
        func fmix(_ z: UInt64) -> UInt32 {
            var h = UInt32(truncatingIfNeeded: z) ^ UInt32(truncatingIfNeeded: z >> 32)
            h ^= h >> 16; h = h &* 0x85EB_CA6B; h ^= h >> 13; h = h &* 0xC2B2_AE35
            return h ^ (h >> 16)
        }
        func limit(_ keep: Float) -> UInt32 { UInt32((keep * 65536).rounded(.up)) - 1 }
        func pairBits(_ h: UInt32, _ limit: UInt32) -> UInt32 { ((h & 0xFFFF) <= limit ? 1 : 0) | ((h >> 16) <= limit ? 2 : 0) }
        func keep8(seed: UInt64, index i0: Int, keep: Float) -> UInt8 {
            var z = seed &+ DropoutMask.gamma &* UInt64((i0 >> 1) + 1)
            var bits: UInt32 = 0
            for k in 0..<(i0 & 1 == 0 ? 4 : 5) {
                bits |= pairBits(fmix(z), limit(keep)) << (2 * k)
                z = z &+ DropoutMask.gamma
            }
            return UInt8(truncatingIfNeeded: i0 & 1 == 0 ? bits : bits >> 1)
        }
        var rng = SeededGenerator(seed: 11)
        let keeps: [Float] = [0.95, 0.9, 0.5, 0.1, 1, 1 - 0x1p-16, 0x1p-16, 0.3]
        var compared = 0, odd = 0
        for keep in keeps {
            for _ in 0..<500 {
                let seed = rng.next(), i0 = Int(rng.next() >> 24)
                if i0 & 1 == 1 { odd += 1 }
                let bits = keep8(seed: seed, index: i0, keep: keep)
                for e in 0..<8 {
                    let expected = DropoutMask.keeps(seed: seed, index: i0 + e, keep: keep)
                    XCTAssertEqual((bits >> e) & 1 == 1, expected, "seed \(seed), index \(i0 + e), keep \(keep)")
                    compared += 1
                }
            }
        }
        XCTAssertEqual(compared, keeps.count * 4000)
        XCTAssertGreaterThan(odd, 1000)  // both of keep8's cases were compared
    }

    /// The masks keep each element with probability T/2¹⁶ (within 2⁻¹⁶ of 1 − p), the two halves of a pair hash and
    /// neighbouring pairs independently: over 2²⁰ elements the kept fraction is within 4.5 standard deviations, and
    /// so is the fraction of (even, odd) neighbours both kept.
    func testMaskStatistics() {
        let n = 1 << 20
        for (seed, keep) in [(UInt64(42), Float(0.95)), (0x1234_5678_9ABC_DEF0, 0.5), (3, 0.1)] {
            let q = Double(DropoutMask.threshold(keep: keep)) / 65536
            XCTAssertLessThan(q - Double(keep), 1.0 / 65536)
            var kept = 0, both = 0, pairsAcross = 0
            var previous = false
            for i in 0..<n {
                let k = DropoutMask.keeps(seed: seed, index: i, keep: keep)
                if k { kept += 1 }
                if i & 1 == 1, k, previous { both += 1 }           // the two halves of one hash
                if i & 1 == 0, i > 0, k, previous { pairsAcross += 1 }  // the last of one pair, the first of the next
                previous = k
            }
            let sd = (q * (1 - q) / Double(n)).squareRoot()
            XCTAssertEqual(Double(kept) / Double(n), q, accuracy: 4.5 * sd, "keep \(keep)")
            let sd2 = (q * q * (1 - q * q) / Double(n / 2)).squareRoot()
            XCTAssertEqual(Double(both) / Double(n / 2), q * q, accuracy: 4.5 * sd2, "keep \(keep): halves of a pair")
            XCTAssertEqual(Double(pairsAcross) / Double(n / 2 - 1), q * q, accuracy: 4.5 * sd2, "keep \(keep): across pairs")
        }
    }

    /// hash(s, i), which draws the seeds, is the (i + 1)-th draw of SeededGenerator(seed: s).
    func testHashIsTheSeededGeneratorStream() {
        for seed: UInt64 in [0, 1, 42, 0xFFFF_FFFF_FFFF_FFFF] {
            var rng = SeededGenerator(seed: seed)
            for i in 0..<1000 {
                XCTAssertEqual(DropoutMask.hash(seed: seed, index: UInt64(i)), rng.next())
            }
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
