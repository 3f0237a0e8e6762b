// The optimizer interface shared by AdamW (torch's and bitsandbytes' 32-bit arithmetic) and 8-bit AdamW.
//
// Parameters are flat Float buffers, one per named tensor (a LoRA A or B matrix). An optimizer keeps its
// per-tensor state under that name, so the same names must be passed at every step. The state saves to
// and loads from safetensors records named `state.<param>.<buffer>` plus one `optimizer.step` (I64),
// which restores the run bit for bit.

/// One trainable tensor owned by the caller: its name, shape and values.
public struct ParameterTensor: Sendable {
    public var name: String
    public var shape: [Int]
    public var values: [Float]

    public init(name: String, shape: [Int], values: [Float]) {
        precondition(shape.reduce(1, *) == values.count, "parameter '\(name)': shape \(shape) does not hold \(values.count) values")
        self.name = name
        self.shape = shape
        self.values = values
    }
}

/// A parameter and its gradient, as raw buffers: lets a trainer update tensors that live in its own
/// structures (LoRA layers) without copying them into `ParameterTensor`s.
public struct ParameterSlot {
    public var name: String
    public var values: UnsafeMutableBufferPointer<Float>
    public var gradient: UnsafeBufferPointer<Float>

    public init(name: String, values: UnsafeMutableBufferPointer<Float>, gradient: UnsafeBufferPointer<Float>) {
        self.name = name
        self.values = values
        self.gradient = gradient
    }
}

/// AdamW hyperparameters; the defaults are torch's and the HF Trainer's (weight decay 0).
public struct AdamWHyperparameters: Equatable, Sendable {
    public var beta1: Double
    public var beta2: Double
    public var eps: Double
    /// Decoupled weight decay: each step multiplies parameters by (1 - lr * weightDecay).
    public var weightDecay: Double

    public init(beta1: Double = 0.9, beta2: Double = 0.999, eps: Double = 1e-8, weightDecay: Double = 0) {
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weightDecay = weightDecay
    }

    func validate() throws {
        guard (0..<1).contains(beta1), (0..<1).contains(beta2) else {
            throw UsageError("AdamW betas must lie in [0, 1); got (\(beta1), \(beta2))")
        }
        guard eps >= 0, weightDecay >= 0 else {
            throw UsageError("AdamW eps and weight decay must be >= 0; got eps \(eps), weight decay \(weightDecay)")
        }
    }
}

/// A first-order optimizer over named flat tensors.
public protocol Optimizer: AnyObject {
    /// Which algorithm, as named on the command line.
    var kind: OptimizerKind { get }
    /// Updates applied so far (torch's `state["step"]`); the next update is step `stepCount + 1`.
    var stepCount: Int { get }
    /// Applies one update to every slot with `learningRate`. Each name must keep its size from step to step.
    func step(_ slots: [ParameterSlot], learningRate: Double) throws
    /// Every state buffer and the step counter, for a checkpoint.
    func state() -> [TensorRecord]
    /// Restores what `state()` returned (read back from a safetensors file). Replaces all current state.
    func load(state file: SafeTensorsFile) throws
    /// Drops the state of every tensor not named in `names` (a rank of sharded adapters keeps its own tensors' state).
    func retainState(of names: Set<String>)
}

extension Optimizer {
    /// Applies one update; `gradients[i]` belongs to `parameters[i]`.
    public func step(parameters: inout [ParameterTensor], gradients: [[Float]], learningRate: Double) throws {
        guard parameters.count == gradients.count else {
            throw UsageError("optimizer step: \(parameters.count) parameters but \(gradients.count) gradients")
        }
        for i in parameters.indices where parameters[i].values.count != gradients[i].count {
            throw UsageError("optimizer step: parameter '\(parameters[i].name)' has \(parameters[i].values.count) values but its gradient \(gradients[i].count)")
        }
        // Move the value arrays out (keeping them uniquely referenced, so no copy), borrow every buffer
        // for the duration of the call through nested closures, and move them back.
        var buffers: [[Float]] = []
        buffers.reserveCapacity(parameters.count)
        for i in parameters.indices {
            buffers.append(parameters[i].values)
            parameters[i].values = []
        }
        defer { for i in parameters.indices { parameters[i].values = buffers[i] } }
        let names = parameters.map(\.name)
        var slots: [ParameterSlot] = []
        slots.reserveCapacity(names.count)
        try buffers.withUnsafeMutableBufferPointer { outer in
            try withSlots(outer, gradients, names, 0, &slots) { try step($0, learningRate: learningRate) }
        }
    }

    /// Saves `state()` as a safetensors file, atomically.
    public func save(to path: String) throws {
        try SafeTensorsWriter.write(state(), metadata: ["optimizer": kind.rawValue, "format": "swift-qlora optimizer state v1"], to: path)
    }

    /// Loads a file written by `save(to:)`.
    public func load(from path: String) throws {
        let file = try SafeTensorsFile(path: path)
        if let saved = file.metadata["optimizer"], let savedKind = OptimizerKind(name: saved), savedKind.stateLayout != kind.stateLayout {
            throw FileFormatError(file: path, place: "__metadata__", "optimizer state of '\(saved)' cannot resume '\(kind.rawValue)'")
        }
        try load(state: file)
    }
}

private func withSlots(_ buffers: UnsafeMutableBufferPointer<[Float]>, _ gradients: [[Float]], _ names: [String], _ i: Int,
                       _ slots: inout [ParameterSlot], _ body: ([ParameterSlot]) throws -> Void) throws {
    if i == buffers.count { return try body(slots) }
    try buffers[i].withUnsafeMutableBufferPointer { values in
        try gradients[i].withUnsafeBufferPointer { gradient in
            slots.append(ParameterSlot(name: names[i], values: values, gradient: gradient))
            try withSlots(buffers, gradients, names, i + 1, &slots, body)
        }
    }
}

// MARK: - Kinds

/// The optimizers the trainer offers, by the names the HF Trainer uses.
public enum OptimizerKind: String, CaseIterable, Sendable {
    /// torch.optim.AdamW.
    case adamw
    /// bitsandbytes AdamW with 8-bit blockwise state (`bnb.optim.AdamW8bit`).
    case adamw8bit = "adamw_8bit"
    /// The same on the CPU; on CUDA the state lives in managed (paged) memory.
    case pagedAdamw8bit = "paged_adamw_8bit"
    /// bitsandbytes' 32-bit AdamW (`bnb.optim.PagedAdamW32bit`): fp32 state, weight decay after the update.
    case pagedAdamw32bit = "paged_adamw_32bit"

    /// Parses a name; accepts the HF aliases `adamw_torch`, `adamw_bnb_8bit`.
    public init?(name: String) {
        switch name.lowercased() {
        case "adamw", "adamw_torch": self = .adamw
        case "adamw_8bit", "adamw_bnb_8bit": self = .adamw8bit
        case "paged_adamw_8bit": self = .pagedAdamw8bit
        case "paged_adamw_32bit", "paged_adamw": self = .pagedAdamw32bit
        default: return nil
        }
    }

    /// Parses a name or throws a usage error that lists the choices.
    public static func parse(_ name: String) throws -> OptimizerKind {
        guard let kind = OptimizerKind(name: name) else {
            throw UsageError("unknown optimizer '\(name)' (expected one of \(allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return kind
    }

    /// Whether the state is 8-bit.
    public var is8bit: Bool { self == .adamw8bit || self == .pagedAdamw8bit }

    /// Kinds with the same state layout can resume each other (paged and unpaged are the same on the CPU).
    var stateLayout: Int {
        switch self {
        case .adamw, .pagedAdamw32bit: return 32
        case .adamw8bit, .pagedAdamw8bit: return 8
        }
    }

    /// Bytes of optimizer state for a tensor of `count` elements.
    public func stateBytes(count: Int) -> Int {
        if is8bit && count >= AdamW8bit.minimum8bitSize {
            return 2 * count + 2 * 4 * ((count + AdamW8bit.blockSize - 1) / AdamW8bit.blockSize)
        }
        return 8 * count
    }

    /// A fresh optimizer of this kind.
    public func make(_ hyperparameters: AdamWHyperparameters = AdamWHyperparameters()) throws -> Optimizer {
        switch self {
        case .adamw: return try AdamW(hyperparameters, arithmetic: .torch)
        case .pagedAdamw32bit: return try AdamW(hyperparameters, arithmetic: .bitsandbytes, kind: .pagedAdamw32bit)
        case .adamw8bit, .pagedAdamw8bit: return try AdamW8bit(hyperparameters, kind: self)
        }
    }
}

// MARK: - State records

enum OptimizerStateRecords {
    static let stepName = "optimizer.step"

    static func step(_ value: Int) -> TensorRecord {
        var v = Int64(value).littleEndian
        return TensorRecord(name: stepName, dtype: .i64, shape: [1], data: withUnsafeBytes(of: &v) { Array($0) })
    }

    static func floats(_ name: String, _ values: [Float]) -> TensorRecord {
        TensorRecord(name: name, dtype: .f32, shape: [values.count],
                     data: values.withUnsafeBytes { Array($0) })
    }

    static func bytes(_ name: String, _ values: [UInt8]) -> TensorRecord {
        TensorRecord(name: name, dtype: .u8, shape: [values.count], data: values)
    }

    static func readStep(_ file: SafeTensorsFile) throws -> Int {
        guard let info = file.info(stepName), info.dtype == .i64, info.elementCount == 1 else {
            throw FileFormatError(file: file.path, place: "tensor '\(stepName)'", "expected an I64 tensor of one element (the step counter)")
        }
        let value = Int64(littleEndian: file.bytes(info).loadUnaligned(as: Int64.self))
        guard value >= 0 else { throw FileFormatError(file: file.path, place: "tensor '\(stepName)'", "negative step \(value)") }
        return Int(value)
    }

    static func readFloats(_ file: SafeTensorsFile, _ info: TensorInfo) throws -> [Float] {
        guard info.dtype == .f32 else {
            throw FileFormatError(file: file.path, place: "tensor '\(info.name)'", "expected F32, found \(info.dtype.rawValue)")
        }
        return try file.floats(info.name)
    }

    static func readBytes(_ file: SafeTensorsFile, _ info: TensorInfo) throws -> [UInt8] {
        guard info.dtype == .u8 else {
            throw FileFormatError(file: file.path, place: "tensor '\(info.name)'", "expected U8, found \(info.dtype.rawValue)")
        }
        return Array(file.bytes(info))
    }

    /// Splits `state.<param>.<buffer>` into its parameter name and buffer name (parameter names may contain dots).
    static func split(_ name: String) -> (parameter: String, buffer: String)? {
        guard name.hasPrefix("state."), let dot = name.lastIndex(of: ".") else { return nil }
        let start = name.index(name.startIndex, offsetBy: 6)
        guard start < dot else { return nil }
        return (String(name[start..<dot]), String(name[name.index(after: dot)...]))
    }
}
