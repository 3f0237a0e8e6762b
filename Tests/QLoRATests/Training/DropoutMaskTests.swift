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
