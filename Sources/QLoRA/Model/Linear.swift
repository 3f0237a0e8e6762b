// A linear layer of the model: a frozen base weight, an optional bias, and an optional LoRA adapter.

/// A row-major fp32 matrix owned by the CPU backend.
public final class Matrix: @unchecked Sendable {
    public let rows: Int
    public let columns: Int
    public let storage: UnsafeMutableBufferPointer<Float>

    public init(rows: Int, columns: Int) {
        self.rows = rows
        self.columns = columns
        storage = .allocate(capacity: rows * columns)
        storage.initialize(repeating: 0)
    }

    public convenience init(rows: Int, columns: Int, values: [Float]) {
        precondition(values.count == rows * columns, "matrix \(rows)×\(columns) needs \(rows * columns) values, got \(values.count)")
        self.init(rows: rows, columns: columns)
        _ = storage.initialize(from: values)
    }

    deinit { storage.deallocate() }

    public var pointer: UnsafeMutablePointer<Float> { storage.baseAddress! }
    public var values: [Float] { Array(storage) }
    public var count: Int { rows * columns }
}

/// LoRA on one linear layer: delta = B·A·scale, A: [r, in], B: [out, r].
public final class LoRAAdapter: @unchecked Sendable {
    public let a: Matrix
    public let b: Matrix
    public let scale: Float
    /// Dropout probability on the LoRA input path (training only).
    public var dropout: Float

    public init(a: Matrix, b: Matrix, scale: Float, dropout: Float = 0) {
        precondition(a.rows == b.columns, "LoRA rank mismatch: A is \(a.rows)×\(a.columns), B is \(b.rows)×\(b.columns)")
        self.a = a
        self.b = b
        self.scale = scale
        self.dropout = dropout
    }

    public var rank: Int { a.rows }
}

/// y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ.
public final class Linear: @unchecked Sendable {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    public let name: String
    /// The frozen base weight, [out, in]: dense fp32, or 4-bit kept packed.
    public var weight: FrozenWeight
    public let bias: [Float]?
    public var lora: LoRAAdapter?

    public init(name: String, weight: FrozenWeight, bias: [Float]? = nil) {
        self.name = name
        self.weight = weight
        self.bias = bias
    }

    public var inFeatures: Int { weight.columns }
    public var outFeatures: Int { weight.rows }

    /// x: [T, in] → y: [T, out].
    public func forward(_ x: UnsafePointer<Float>, rows: Int, into y: UnsafeMutablePointer<Float>) {
        weight.multiplyTransposed(x, rows: rows, into: y)
        if let bias {
            for t in 0..<rows { for o in 0..<outFeatures { y[t * outFeatures + o] += bias[o] } }
        }
        if let lora {
            let hidden = UnsafeMutablePointer<Float>.allocate(capacity: rows * lora.rank)
            defer { hidden.deallocate() }
            CPUMatmul.gemmNT(x, lora.a.pointer, hidden, m: rows, n: lora.rank, k: inFeatures)
            for i in 0..<(rows * lora.rank) { hidden[i] *= lora.scale }
            CPUMatmul.gemmNT(hidden, lora.b.pointer, y, m: rows, n: outFeatures, k: lora.rank, accumulate: true)
        }
    }
}
