import XCTest
@testable import QLoRA

/// The 4-bit CPU linear layer (dequantize a block of rows, then multiply) against the dense product
/// with the same dequantized values.
final class FrozenWeightTests: XCTestCase {
    func testFourBitProductsEqualDenseProductsOfTheDequantizedWeight() throws {
        var rng = SeededGenerator(seed: 5)
        let rows = 300, columns = 96, tokens = 7  // 300 rows: blocks of 128 with a partial last block
        let values = (0..<(rows * columns)).map { _ in rng.nextFloat() - 0.5 }
        let quantized = try FrozenWeight(quantized: try QuantizedWeight.quantize(values, shape: [rows, columns]))
        let dense = FrozenWeight(dense: Matrix(rows: rows, columns: columns, values: quantized.values()))
        XCTAssertLessThan(quantized.storedBytes * 6, dense.storedBytes, "4-bit storage is about an eighth of fp32")
        let x = (0..<(tokens * columns)).map { _ in rng.nextFloat() - 0.5 }
        let dy = (0..<(tokens * rows)).map { _ in rng.nextFloat() - 0.5 }
        for accumulate in [false, true] {
            var y1 = [Float](repeating: 1, count: tokens * rows), y2 = y1
            x.withUnsafeBufferPointer { xp in
                quantized.multiplyTransposed(xp.baseAddress!, rows: tokens, into: &y1, accumulate: accumulate)
                dense.multiplyTransposed(xp.baseAddress!, rows: tokens, into: &y2, accumulate: accumulate)
            }
            XCTAssertLessThan(relativeError(y1, y2), 1e-6)
            var dx1 = [Float](repeating: 1, count: tokens * columns), dx2 = dx1
            dy.withUnsafeBufferPointer { g in
                quantized.multiply(g.baseAddress!, rows: tokens, into: &dx1, accumulate: accumulate)
                dense.multiply(g.baseAddress!, rows: tokens, into: &dx2, accumulate: accumulate)
            }
            XCTAssertLessThan(relativeError(dx1, dx2), 1e-6)
        }
    }
}
