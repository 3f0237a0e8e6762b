// The frozen base weight of a linear layer on the CPU: dense fp32, or 4-bit (NF4/FP4) kept packed.
//
// A 4-bit weight is never expanded whole: each product dequantizes a block of rows into a small
// scratch buffer and multiplies with it, so the model stays at about 4.1 bits per base parameter in
// memory. The values are exactly bitsandbytes' dequantized values (QuantizedWeight.dequantizeRows).
//
// With a sharded base (Parallel/ShardedBase.swift) a weight's storage lives spread over the ranks between uses:
// `.sharded` keeps only the shape, and the block's weights are gathered back before its products run.

public final class FrozenWeight: @unchecked Sendable {
    public enum Storage {
        case dense(Matrix)
        case quantized(QuantizedWeight)
        /// Held by the ranks in shards (ShardedBase): not usable until gathered.
        case sharded
    }

    public let storage: Storage
    /// [rows = out features, columns = in features]
    public let rows: Int
    public let columns: Int

    /// Output rows dequantized at a time: big enough for efficient products, small enough for the cache.
    static let rowBlock = 128

    public init(dense matrix: Matrix) {
        storage = .dense(matrix)
        rows = matrix.rows
        columns = matrix.columns
    }

    /// The placeholder of a weight whose storage the ranks hold in shards.
    public init(shardedRows rows: Int, columns: Int) {
        storage = .sharded
        self.rows = rows
        self.columns = columns
    }

    public var isSharded: Bool { if case .sharded = storage { return true }; return false }

    /// A product on a weight that was not gathered is a bug in the caller (the gather hook was skipped).
    func notGathered() -> Never {
        preconditionFailure("a \(rows)×\(columns) base weight was used while sharded across ranks: its block must be gathered first")
    }

    public init(quantized weight: QuantizedWeight) throws {
        guard weight.shape.count == 2 else { throw UsageError("a 4-bit linear weight must be 2-D, got shape \(weight.shape)") }
        storage = .quantized(weight)
        rows = weight.shape[0]
        columns = weight.shape[1]
    }

    public var count: Int { rows * columns }
    public var isQuantized: Bool { if case .quantized = storage { return true }; return false }

    /// Bytes the weight occupies in memory.
    public var storedBytes: Int {
        switch storage {
        case .dense(let m): return m.count * 4
        case .quantized(let q): return q.storedByteCount
        case .sharded: return 0
        }
    }

    /// All values in fp32 ([rows, columns] row-major): the dense values or the dequantized ones.
    public func values() -> [Float] {
        switch storage {
        case .dense(let m): return m.values
        case .quantized(let q): return q.dequantize()
        case .sharded: notGathered()
        }
    }

    /// y[m, rows] (+)= x[m, columns] · Wᵀ — the forward of the linear layer.
    public func multiplyTransposed(_ x: UnsafePointer<Float>, rows m: Int, into y: UnsafeMutablePointer<Float>, accumulate: Bool = false) {
        switch storage {
        case .dense(let w):
            CPUMatmul.gemmNT(x, w.pointer, y, m: m, n: rows, k: columns, accumulate: accumulate)
        case .quantized(let q):
            // Each thread takes whole blocks of output rows: dequantize them, multiply, write its columns of y.
            let blocks = (rows + Self.rowBlock - 1) / Self.rowBlock
            CPUParallelism.forEach(blocks, work: m * rows * columns + rows * columns) { b in
                let r0 = b * Self.rowBlock, r = min(Self.rowBlock, rows - r0)
                let block = UnsafeMutableBufferPointer<Float>.allocate(capacity: r * columns)
                let partial = UnsafeMutablePointer<Float>.allocate(capacity: m * r)
                defer { block.deallocate(); partial.deallocate() }
                q.dequantizeRows(r0..<(r0 + r), into: block)
                CPUMatmul.gemmNTBlock(x, block.baseAddress!, partial, m: m, n: r, k: columns, columns: 0..<r, accumulate: false)
                for t in 0..<m {
                    let out = y + t * rows + r0, part = partial + t * r
                    if accumulate { for i in 0..<r { out[i] += part[i] } } else { out.update(from: part, count: r) }
                }
            }
        case .sharded:
            notGathered()
        }
    }

    /// dx[m, columns] (+)= dy[m, rows] · W — the input gradient of the linear layer.
    public func multiply(_ dy: UnsafePointer<Float>, rows m: Int, into dx: UnsafeMutablePointer<Float>, accumulate: Bool) {
        switch storage {
        case .dense(let w):
            CPUMatmul.gemmNN(dy, w.pointer, dx, m: m, n: columns, k: rows, accumulate: accumulate)
        case .quantized(let q):
            // A block of rows is a slice of the inner dimension: dequantize it (split over the threads),
            // then one multiply-accumulate into all of dx (the matmul splits its columns over the threads).
            let blockRows = Self.rowBlock * 4
            let block = UnsafeMutableBufferPointer<Float>.allocate(capacity: blockRows * columns)
            let dyBlock = UnsafeMutablePointer<Float>.allocate(capacity: m * blockRows)
            defer { block.deallocate(); dyBlock.deallocate() }
            for r0 in stride(from: 0, to: rows, by: blockRows) {
                let r = min(blockRows, rows - r0)
                let pieces = (r + Self.rowBlock - 1) / Self.rowBlock
                CPUParallelism.forEach(pieces, work: r * columns * 8) { p in
                    let p0 = p * Self.rowBlock, p1 = min(r, p0 + Self.rowBlock)
                    q.dequantizeRows((r0 + p0)..<(r0 + p1), into: UnsafeMutableBufferPointer(rebasing: block[(p0 * columns)..<(p1 * columns)]))
                }
                for t in 0..<m { (dyBlock + t * r).update(from: dy + t * rows + r0, count: r) }
                CPUMatmul.gemmNN(dyBlock, block.baseAddress!, dx, m: m, n: columns, k: r, accumulate: accumulate || r0 > 0)
            }
        case .sharded:
            notGathered()
        }
    }
}
