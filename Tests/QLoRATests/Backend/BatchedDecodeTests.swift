import XCTest
@testable import QLoRA

/// CPU-side parts of batched generation: the NF4 small-GEMM task layout (decode_batched.cu's `Nf4GemmTask`), its
/// sizes and K splits, and the kernels' CPU twins against the references they generalise.
final class BatchedDecodeTests: XCTestCase {
    private var rng = SeededGenerator(seed: 20261206)
    private func random(_ n: Int, _ range: ClosedRange<Float> = -1...1) -> [Float] {
        (0..<n).map { _ in roundToBF16(Float.random(in: range, using: &rng)) }
    }

    /// 5 pointers, a float, 5 ints: 64 bytes per task, columns and blocks counted over the tasks.
    func testTaskEncodingLayout() {
        let a = NF4GemmTask(packed: 0x1000, absmaxCodes: 0x2000, nestedAbsmax: 0x3000, code: 0x4000, offset: 0.25, rows: 130, columns: 256,
                            out: 0x5000, outStride: 300, accumulate: true)
        let b = NF4GemmTask(packed: 1, absmaxCodes: 2, nestedAbsmax: 3, code: 4, offset: 0, rows: 64, columns: 256, out: 6, outStride: 300,
                            accumulate: false)
        let (bytes, blocks, columns) = NF4GemmTask.encode([a, b])
        XCTAssertEqual(bytes.count, 2 * 64)
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) } }
        XCTAssertEqual([u64(0), u64(8), u64(16), u64(24), u64(32)], [0x1000, 0x2000, 0x3000, 0x4000, 0x5000])
        XCTAssertEqual(Float(bitPattern: u32(40)), 0.25)
        XCTAssertEqual([u32(44), u32(48), u32(52), u32(56), u32(60)], [130, 300, 0, 0, 1])  // rows, stride, col0, first block, accumulate
        XCTAssertEqual([u32(64 + 44), u32(64 + 52), u32(64 + 56), u32(64 + 60)], [64, 130, 3, 0])  // 130 rows = 3 blocks of 64
        XCTAssertEqual(blocks, 4)
        XCTAssertEqual(columns, 194)
        XCTAssertEqual(NF4GemmTask.packedBytes(rows: 5, cols: 352), 8 * 384 * 2)
        // Splits: enough blocks for 4 per multiprocessor, at least 4 k-blocks of 128 each.
        XCTAssertEqual(NF4GemmTask.splits(blocks: 448, cols: 4096, sms: 132), 2)
        XCTAssertEqual(NF4GemmTask.splits(blocks: 64, cols: 14336, sms: 132), 16)
        XCTAssertEqual(NF4GemmTask.splits(blocks: 64, cols: 128, sms: 132), 1)
        XCTAssertEqual(NF4GemmTask.splits(blocks: 1000, cols: 4096, sms: 132), 1)
    }

    func testGemmTwinIsMatmulWithBF16Weights() {
        let m = 3, n = 5, k = 64
        let x = random(m * k), w = (0..<(n * k)).map { _ in Float.random(in: -1...1, using: &rng) }, old = random(m * n)
        let y = CPUReference.nf4GemmRows(x: x, weight: w, old: old, rows: m, outputs: n, cols: k)
        let ref = CPUReference.matmul(x, w.map(roundToBF16), m: m, n: n, k: k, transB: true)
        for i in 0..<(m * n) { XCTAssertEqual(y[i], ref[i] + old[i], accuracy: 1e-4) }
    }

    /// Rows of one sequence at every position of its slot = causal attention over that sequence; the other slot is
    /// never read (filled with NaN).
    func testAttentionRowsTwinIsCausalAttention() {
        let seq = 7, heads = 4, kvHeads = 2, d = 8, capacity = 10, kvDim = kvHeads * d
        let q = random(seq * heads * d), k = random(seq * kvDim), v = random(seq * kvDim)
        var kcache = [Float](repeating: .nan, count: 2 * capacity * kvDim), vcache = kcache
        for j in 0..<(seq * kvDim) { kcache[capacity * kvDim + j] = k[j]; vcache[capacity * kvDim + j] = v[j] }
        let out = CPUReference.attentionRows(qkv: q, stride: heads * d, kcache: kcache, vcache: vcache, slots: [Int32](repeating: 1, count: seq),
                                             positions: (0..<seq).map(Int32.init), capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d)
        let ref = CPUReference.attentionForward(q: q, k: k, v: v, batch: 1, seq: seq, heads: heads, kvHeads: kvHeads, headDim: d).o
        for i in ref.indices { XCTAssertEqual(out[i], ref[i], accuracy: 1e-5) }
    }

    /// RoPE per row = the rope reference at each row's position (rounded to bf16), k and v written at (slot, position).
    func testRopeAppendRowsTwin() {
        let heads = 2, kvHeads = 1, d = 8, capacity = 6, kvDim = kvHeads * d, stride = (heads + 2 * kvHeads) * d
        let slots: [Int32] = [1, 0], positions: [Int32] = [4, 2]
        let qkv = random(2 * stride), inv = CPUReference.ropeInverseFrequencies(headDim: d, theta: 10_000)
        let r = CPUReference.ropeAppendRows(qkv: qkv, stride: stride, kcache: [Float](repeating: 0, count: 2 * capacity * kvDim),
                                            vcache: [Float](repeating: 0, count: 2 * capacity * kvDim), slots: slots, positions: positions,
                                            inverseFrequencies: inv, capacity: capacity, heads: heads, kvHeads: kvHeads, headDim: d)
        for row in 0..<2 {
            let qk = Array(qkv[(row * stride)..<(row * stride + (heads + kvHeads) * d)])
            let rotated = CPUReference.rope(x: qk, positions: [positions[row]], inverseFrequencies: inv, tokens: 1, heads: heads + kvHeads, headDim: d)
            for i in rotated.indices { XCTAssertEqual(r.qkv[row * stride + i], rotated[i], accuracy: 1e-2 * max(1, abs(rotated[i]))) }
            let cacheRow = (Int(slots[row]) * capacity + Int(positions[row])) * kvDim
            XCTAssertEqual(Array(r.kcache[cacheRow..<(cacheRow + kvDim)]), Array(r.qkv[(row * stride + heads * d)..<(row * stride + (heads + 1) * d)]))
            XCTAssertEqual(Array(r.vcache[cacheRow..<(cacheRow + kvDim)]), Array(qkv[(row * stride + (heads + 1) * d)..<((row + 1) * stride)]))
        }
        XCTAssertEqual(r.kcache.filter { $0 != 0 }.count, 2 * kvDim, "nothing written but the two rows")
    }

    func testArgmaxRowsTakesTheFirstMaximum() {
        XCTAssertEqual(CPUReference.argmaxRows([1, 3, 3, 0, -1, -1, -1, -1], rows: 2, vocab: 4), [1, 0])
    }
}
