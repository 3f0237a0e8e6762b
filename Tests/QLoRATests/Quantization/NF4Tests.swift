import XCTest
@testable import QLoRA

/// NF4/FP4 blockwise quantization against bitsandbytes' bytes (nf4_vectors.safetensors, made on CUDA).
final class NF4Tests: XCTestCase {
    static let vectors = TestFixtures.path("tiny-llama/nf4_vectors.safetensors")

    func bytes(_ file: SafeTensorsFile, _ name: String) throws -> [UInt8] { Array(try file.bytes(name)) }
    func bits(_ values: [Float]) -> [UInt32] { values.map(\.bitPattern) }

    func testPlainVectorsAreByteIdentical() throws {
        let file = try SafeTensorsFile(path: Self.vectors)
        for v in 0..<4 {
            let p = "v\(v)_plain."
            // The inputs are bf16 values stored as F32: bitsandbytes quantized bf16 tensors, so its
            // dequantized output is bf16 too.
            XCTAssertEqual(file.info(p + "input")?.dtype, .f32)
            let input = try file.floats(p + "input")
            XCTAssertTrue(input.allSatisfy { $0.bitPattern & 0xFFFF == 0 }, "bf16 inputs")
            let q = quantize4Bit(input, blocksize: 64, type: .nf4)
            XCTAssertEqual(q.packed, try bytes(file, p + "packed"), "v\(v) packed")
            XCTAssertEqual(bits(q.absmax), bits(try file.floats(p + "absmax")), "v\(v) absmax")
            let weight = try QuantizedWeight(quantType: .nf4, blocksize: 64, shape: [input.count], dtype: .bf16,
                                             packed: q.packed, scales: .plain(q.absmax))
            XCTAssertEqual(bits(weight.dequantize()), bits(try file.floats(p + "dequant")), "v\(v) dequant")
        }
    }

    func testDoubleQuantVectorsAreByteIdentical() throws {
        let file = try SafeTensorsFile(path: Self.vectors)
        for v in 0..<4 {
            let p = "v\(v)_dq."
            let input = try file.floats(p + "input")
            let w = try QuantizedWeight.quantize(input, shape: [input.count], type: .nf4, blocksize: 64, doubleQuant: true, dtype: .bf16)
            XCTAssertEqual(w.packed, try bytes(file, p + "packed"), "v\(v) packed")
            guard case .doubleQuantized(let d) = w.scales else { return XCTFail("not double-quantized") }
            XCTAssertEqual(d.codes, try bytes(file, p + "absmax_q"), "v\(v) absmax_q")
            XCTAssertEqual(bits(d.nestedAbsmax), bits(try file.floats(p + "nested_absmax")), "v\(v) nested_absmax")
            XCTAssertEqual(d.offset.bitPattern, try file.floats(p + "offset")[0].bitPattern, "v\(v) offset")
            XCTAssertEqual(bits(w.dequantize()), bits(try file.floats(p + "dequant")), "v\(v) dequant")
        }
    }

    func testCodebookIsTheSavedQuantMap() throws {
        let file = try SafeTensorsFile(path: TestFixtures.path("tiny-llama/base-bnb-nf4/model.safetensors"))
        let saved = try file.floats("model.layers.0.self_attn.q_proj.weight.quant_map")
        XCTAssertEqual(bits(QuantType.nf4.codebook), bits(saved))
        XCTAssertEqual(bits(QuantType.nf4.quantMap), bits(saved))
    }

    /// The decision tree picks the nearest code; at the kernel's fp32 thresholds themselves it rounds down.
    func testNF4TreeIsNearestCode() {
        let cb = QuantType.nf4.codebook
        var rng = SeededGenerator(seed: 20261123)
        for _ in 0..<20_000 {
            let x = Float.random(in: -1...1, using: &rng)
            let c = Int(quantizeNF4(x))
            let best = cb.indices.min { abs(cb[$0] - x) < abs(cb[$1] - x) }!
            // Only within a hair of a midpoint may the tree and the exact nearest code disagree.
            if c != best {
                let mid = (cb[c] + cb[best]) / 2
                XCTAssertLessThan(abs(x - mid), 1e-6, "x=\(x) code \(c) nearest \(best)")
            }
        }
        // Exactly at a threshold: strict '>' keeps the lower code; one ulp above takes the upper.
        let t3 = Float(bitPattern: 0x3F5C_89D9)
        XCTAssertEqual(quantizeNF4(t3), 14)
        XCTAssertEqual(quantizeNF4(t3.nextUp), 15)
        XCTAssertEqual(quantizeNF4(0), 7)
        XCTAssertEqual(quantizeNF4(-0.0), 7)
        XCTAssertEqual(quantizeNF4(.nan), 0)
        XCTAssertEqual(quantizeNF4(1), 15)
        XCTAssertEqual(quantizeNF4(-1), 0)
    }

    /// An all-zero block: absmax 0, scale inf, 0 * inf = NaN → code 0 everywhere (as the GPU does).
    func testZeroBlockAndOddTail() {
        let q = quantize4Bit([Float](repeating: 0, count: 64), blocksize: 64, type: .nf4)
        XCTAssertEqual(q.absmax, [0])
        XCTAssertEqual(q.packed, [UInt8](repeating: 0, count: 32))
        // Odd count: the padding element is 0 * scale → code 7 in the low nibble.
        let odd = quantize4Bit([0.5, -1, 1], blocksize: 64, type: .nf4)
        XCTAssertEqual(odd.absmax, [1])
        XCTAssertEqual(odd.packed, [0xC0, 0xF7])  // 0.5 → 12 (0.4407 is nearer than 0.5626), -1 → 0, 1 → 15
    }

    /// FP4, derived by hand from the kernel's tree (no reference file): with absmax 12 the scaled
    /// values are x / 12 (x * fp32(1/12)), and the codes are those of the FP4 values
    /// 0, 0.0625, 8, 12, 4, 6, 2, 3 (bit patterns 000 ... 111), sign in bit 3.
    func testFP4HandDerived() throws {
        let x: [Float] = [12, -12, 8, -8, 6, 4, 3, 2, 0.0625, 0, -0.0625, -3, 7.1, 6.9, 1.2, -0.02]
        // 7.1/12 = 0.5917 > 0.583333 → 8 (010); 6.9/12 = 0.575 → 6 (101); 1.2/12 = 0.1 in (0.0859, 0.2083] → 2 (110);
        // -0.02/12 = -0.00167 < 0.0026 → sign | 000.
        let expected: [UInt8] = [0b0011, 0b1011, 0b0010, 0b1010, 0b0101, 0b0100, 0b0111, 0b0110,
                                 0b0001, 0b0000, 0b1001, 0b1111, 0b0010, 0b0101, 0b0110, 0b1000]
        let q = quantize4Bit(x, blocksize: 64, type: .fp4)
        XCTAssertEqual(q.absmax, [12])
        let codes = q.packed.flatMap { [$0 >> 4, $0 & 15] }
        XCTAssertEqual(codes, expected)
        // Dequantized: magnitude table * sign * absmax, so 12 → 12, 8 → 0.6666667 * 12, 0 with sign → -0.
        let w = try QuantizedWeight(quantType: .fp4, blocksize: 64, shape: [16], dtype: .f32, packed: q.packed, scales: .plain(q.absmax))
        let d = w.dequantize()
        XCTAssertEqual(d[0], 12)
        XCTAssertEqual(d[1], -12)
        XCTAssertEqual(d[2], Float(bitPattern: 0x3F2A_AAAB) * 12)
        XCTAssertEqual(d[9], 0)
        XCTAssertEqual(d[15].sign, .minus)
        XCTAssertEqual(d[15], 0)
        // The saved FP4 quant_map is get_4bit_type("fp4"): the list / 12, with +0 for code 8.
        XCTAssertEqual(QuantType.fp4.quantMap[2], Float(8) / 12)
        XCTAssertEqual(QuantType.fp4.quantMap[8].sign, .plus)
        XCTAssertEqual(quantizeFP4(.nan), 0)
    }

    /// dequantizeRows equals slices of dequantize, for rows whose length is odd and blocks that span rows.
    func testDequantizeRowsMatchesFullDequantize() throws {
        var rng = SeededGenerator(seed: 20261123)
        for (rows, cols, blocksize, type) in [(7, 45, 64, QuantType.nf4), (5, 128, 32, .fp4), (9, 33, 128, .nf4), (3, 64, 64, .nf4)] {
            let values = (0..<(rows * cols)).map { _ in Float.random(in: -2...2, using: &rng) }
            let w = try QuantizedWeight.quantize(values, shape: [rows, cols], type: type, blocksize: blocksize, doubleQuant: true)
            let full = w.dequantize()
            for start in 0..<rows {
                for end in (start + 1)...rows {
                    var out = [Float](repeating: .nan, count: (end - start) * cols)
                    out.withUnsafeMutableBufferPointer { w.dequantizeRows(start..<end, into: $0) }
                    XCTAssertEqual(bits(out), bits(Array(full[(start * cols)..<(end * cols)])), "rows \(start)..<\(end) of [\(rows), \(cols)]")
                }
            }
        }
    }

    func testBitsPerParameter() throws {
        // A 4096 x 4096 NF4 weight with double quant at 64/256, built from zeros (sizes are all that matter).
        let n = 4096 * 4096
        let blocks = n / 64
        let d = DoubleQuantizedAbsmax(codes: [UInt8](repeating: 0, count: blocks), nestedAbsmax: [Float](repeating: 1, count: blocks / 256),
                                      offset: 0, code: DoubleQuantizedAbsmax.signedDynamicMap, blocksize: 256)
        let w = try QuantizedWeight(quantType: .nf4, blocksize: 64, shape: [4096, 4096], dtype: .bf16,
                                    packed: [UInt8](repeating: 0, count: n / 2), scales: .doubleQuantized(d))
        XCTAssertEqual(w.bitsPerParameter, 4.127, accuracy: 0.001)
        let plain = try QuantizedWeight(quantType: .nf4, blocksize: 64, shape: [4096, 4096], dtype: .bf16,
                                        packed: [UInt8](repeating: 0, count: n / 2), scales: .plain([Float](repeating: 1, count: blocks)))
        XCTAssertEqual(plain.bitsPerParameter, 4.5, accuracy: 0.001)
    }
}

extension NF4Tests {
    /// The vectorized quantizer (threshold counting) equals the kernel's decision trees element by element,
    /// including thresholds ± one ulp, zeros of both signs and NaN.
    func testVectorizedQuantizerEqualsDecisionTree() {
        var special: [Float] = [0, -0.0, .nan, 1, -1, 0.5, -0.5]
        for t in QuantizeThresholds.nf4 + QuantizeThresholds.fp4 + QuantizeThresholds.fp4.map({ -$0 }) {
            special += [t, t.nextUp, t.nextDown]
        }
        var rng = SeededGenerator(seed: 20261123)
        for type in QuantType.allCases {
            for trial in 0..<50 {
                // One block with absmax exactly 1 (so values are their own scaled values), then random blocks.
                var values: [Float] = trial == 0 ? [1] + special : (0..<(64 * 3 + 8)).map { _ in Float.random(in: -3...3, using: &rng) }
                if values.count % 2 == 1 { values.append(0.25) }
                let q = quantize4Bit(values, blocksize: 64, type: type)
                for (i, x) in values.enumerated() {
                    let scale = 1 / q.absmax[i / 64]
                    let code = i % 2 == 0 ? q.packed[i / 2] >> 4 : q.packed[i / 2] & 15
                    XCTAssertEqual(code, type.code(x * scale), "\(type) element \(i) = \(x)")
                }
            }
        }
    }
}
