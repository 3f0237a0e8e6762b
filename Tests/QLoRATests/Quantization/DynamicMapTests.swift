import XCTest
@testable import QLoRA

/// bitsandbytes' create_dynamic_map, against the map saved in the 4-bit checkpoint and against
/// torch-computed maps (Tests/Fixtures/quantization/dynamic_maps.safetensors, written by torch 2.13 on the CPU).
final class DynamicMapTests: XCTestCase {
    func bits(_ values: [Float]) -> [UInt32] { values.map(\.bitPattern) }

    func testSignedMapIsTheSavedNestedQuantMap() throws {
        let file = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/base-bnb-nf4/model.safetensors"))
        let saved = try file.floats("model.layers.0.mlp.down_proj.weight.nested_quant_map")
        XCTAssertEqual(bits(createDynamicMap(signed: true)), bits(saved))
    }

    func testMapsEqualTorch() throws {
        let file = try SafeTensorsFile(path: TestFixtures.path("quantization/dynamic_maps.safetensors"))
        XCTAssertEqual(bits(createDynamicMap(signed: true)), bits(try file.floats("signed")))
        XCTAssertEqual(bits(createDynamicMap(signed: false)), bits(try file.floats("unsigned")))
        XCTAssertEqual(bits(createDynamicMap(signed: true, maxExponentBits: 4)), bits(try file.floats("signed_max_exponent_4")))
    }

    func testEightBitQuantizationPicksNearestCode() {
        let code = createDynamicMap(signed: true)
        var rng = SeededGenerator(seed: 20261123)
        code.withUnsafeBufferPointer { c in
            for _ in 0..<20_000 {
                let x = Float.random(in: -1...1, using: &rng) * (Bool.random(using: &rng) ? 1 : 0.001)
                let q = Int(quantize8Bit(x, code: c.baseAddress!))
                let bestDistance = code.map { abs($0 - x) }.min()!
                XCTAssertLessThanOrEqual(abs(code[q] - x), bestDistance * 1.0001 + 1e-12, "x=\(x)")
            }
            for (i, v) in code.enumerated() where i == 0 || code[i - 1] != v {
                XCTAssertEqual(code[Int(quantize8Bit(v, code: c.baseAddress!))], v, "code value \(v) maps to itself")
            }
        }
    }
}

/// torch's CUDA mean (the double-quant offset), against means an H100 computed (torch, 2026-11-23)
/// for x[i] = fp32((i * 2654435761) mod 1000003) / 1000003 * fp32(0.1).
final class TorchCUDAMeanTests: XCTestCase {
    static let expected: [(Int, UInt32)] = [
        (1, 0x0000_0000), (2, 0x3CAF_39D7), (3, 0x3D2F_39D7), (4, 0x3D20_705C), (100, 0x3D57_71BB), (127, 0x3D54_3FAA),
        (128, 0x3D53_A5C2), (129, 0x3D54_69F8), (704, 0x3D4E_0756), (2816, 0x3D4D_5A83), (5000, 0x3D4D_0AF1),
        (131_072, 0x3D4C_D016), (140_000, 0x3D4C_CEFB), (704_512, 0x3D4C_CD6E), (2_000_000, 0x3D4C_CCBF),
    ]

    func testMatchesH100() {
        for (n, bits) in Self.expected {
            let x = (0..<n).map { i -> Float in
                let a = Float((UInt64(i) &* 2_654_435_761) % 1_000_003)
                return a / Float(1_000_003) * Float(0.1)
            }
            XCTAssertEqual(torchCUDAMean(x, device: .h100).bitPattern, bits, "n = \(n)")
        }
    }
}
