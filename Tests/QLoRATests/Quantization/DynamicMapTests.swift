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
        var rng = SystemRandomNumberGenerator()
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
