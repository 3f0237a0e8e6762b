#if canImport(Glibc)
import Glibc
#endif

// The optimizers on the GPU, with the CPU `Optimizer`'s shape: a step over named tensors (here device buffers),
// state records with the CPU's names (so a checkpoint resumes on either backend), and the same kinds:
//   adamw             torch.optim.AdamW (adamw.cu), fp32 moments on the device
//   adamw_8bit        bitsandbytes' blockwise 8-bit AdamW (adamw8bit.cu); tensors under 4096 elements keep fp32
//                     moments with bitsandbytes' 32-bit arithmetic
//   paged_adamw_8bit  the same, with the state in pinned host memory: before each tensor's update an asynchronous
//                     copy brings its state into a device staging buffer, and one after the kernel takes it back
//                     (all on the device's stream, so the staging buffer is reused in order). Device memory holds
//                     only the largest tensor's state.
//   paged_adamw_32bit bitsandbytes' 32-bit AdamW arithmetic, paged the same way.
// The CPU reference is Training/Optimizers/AdamW8bit.swift (and AdamW.swift); qlora-gpu-check compares them.

/// One trainable tensor on the device: fp32 values and their gradient (`count` elements of each).
public struct CUDAParameterSlot {
    public var name: String
    public var values: DeviceBuffer<Float>
    public var gradient: DeviceBuffer<Float>
    public var count: Int
    /// Where the tensor starts in `values` and `gradient` (elements), for tensors kept in one flat buffer.
    public var offset: Int

    public init(name: String, values: DeviceBuffer<Float>, gradient: DeviceBuffer<Float>, count: Int? = nil, offset: Int = 0) {
        self.name = name
        self.values = values
        self.gradient = gradient
        self.count = count ?? values.count
        self.offset = offset
    }

    var valuesArg: KernelArgument { .pointer(values.address(at: offset)) }
    var gradientArg: KernelArgument { .pointer(gradient.address(at: offset)) }
}

/// AdamW (torch, bitsandbytes 32-bit or 8-bit, paged or not) over device tensors.
public final class CUDAOptimizer {
    public let kind: OptimizerKind
    public let hyperparameters: AdamWHyperparameters
    public let context: CUDAContext
    /// Updates applied so far; the next is step `stepCount + 1`.
    public private(set) var stepCount = 0

    /// Whether the state lives in pinned host memory between steps.
    public var isPaged: Bool { kind == .pagedAdamw8bit || kind == .pagedAdamw32bit }

    /// A tensor's state as one region: 8-bit [state1 (n) | state2 (n) | pad | absmax1 | absmax2], else [m | v] fp32.
    final class TensorState {
        let count: Int
        let is8bit: Bool
        let device: DeviceBuffer<UInt8>?
        let host: PinnedHostBuffer?

        init(count: Int, is8bit: Bool, context: CUDAContext, paged: Bool) throws {
            self.count = count
            self.is8bit = is8bit
            let bytes = TensorState.bytes(count: count, is8bit: is8bit)
            if paged {
                host = try PinnedHostBuffer(device: context.device, bytes: bytes)
                host!.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
                device = nil
            } else {
                let d = try context.allocator.buffer(UInt8.self, count: bytes)
                try d.fill(byte: 0)
                device = d
                host = nil
            }
        }

        var blocks: Int { (count + AdamW8bit.blockSize - 1) / AdamW8bit.blockSize }
        var absmaxOffset: Int { (2 * count + 15) / 16 * 16 }
        var byteCount: Int { TensorState.bytes(count: count, is8bit: is8bit) }

        static func bytes(count: Int, is8bit: Bool) -> Int {
            guard is8bit else { return 8 * count }
            let blocks = (count + AdamW8bit.blockSize - 1) / AdamW8bit.blockSize
            return (2 * count + 15) / 16 * 16 + 8 * blocks
        }
    }

    var states: [String: TensorState] = [:]
    private var staging: DeviceBuffer<UInt8>?
    private lazy var signedMap: DeviceBuffer<Float>? = try? context.allocator.buffer(copying: DynamicQuantizationMap.signed.values)
    private lazy var unsignedMap: DeviceBuffer<Float>? = try? context.allocator.buffer(copying: DynamicQuantizationMap.unsigned.values)

    public init(context: CUDAContext, kind: OptimizerKind, _ hyperparameters: AdamWHyperparameters = AdamWHyperparameters()) throws {
        try hyperparameters.validate()
        self.context = context
        self.kind = kind
        self.hyperparameters = hyperparameters
    }

    /// Applies one update to every slot (asynchronously on the device's stream). Names keep their sizes across steps.
    public func step(_ slots: [CUDAParameterSlot], learningRate: Double) throws {
        var seen = Set<String>()
        for s in slots {
            guard seen.insert(s.name).inserted else { throw UsageError("optimizer step: parameter '\(s.name)' is given twice") }
            guard s.offset >= 0, s.values.count >= s.offset + s.count, s.gradient.count >= s.offset + s.count else {
                throw UsageError("optimizer step: parameter '\(s.name)': buffers shorter than \(s.count)")
            }
            if let st = states[s.name], st.count != s.count {
                throw UsageError("optimizer state of '\(s.name)' holds \(st.count) values but the parameter has \(s.count)")
            }
        }
        let t = stepCount + 1
        for s in slots {
            let is8bit = kind.is8bit && s.count >= AdamW8bit.minimum8bitSize
            let state = try states[s.name] ?? TensorState(count: s.count, is8bit: is8bit, context: context, paged: isPaged)
            states[s.name] = state
            try update(s, state, step: t, lr: learningRate)
        }
        stepCount = t
    }

    private func update(_ s: CUDAParameterSlot, _ state: TensorState, step t: Int, lr: Double) throws {
        let dev = context.device
        let region: CUdeviceptr
        if let host = state.host {
            if staging == nil || staging!.count < state.byteCount {
                staging = nil
                staging = try context.allocator.buffer(UInt8.self, count: state.byteCount)
            }
            region = staging!.pointer
            try dev.copy(toDevice: region, from: host.pointer, bytes: state.byteCount)
        } else {
            region = state.device!.pointer
        }
        let n = s.count
        if kind == .adamw {
            let f = try context.compiler.function(KernelSources.adamw, "adamw_step")
            let bc1 = 1 - pow(hyperparameters.beta1, Double(t)), bc2 = 1 - pow(hyperparameters.beta2, Double(t))
            try dev.launch(f, grid: (context.gridSize(items: n), 1, 1), block: (256, 1, 1),
                           [s.valuesArg, s.gradientArg, .pointer(region), .pointer(region + UInt64(4 * n)), .int64(Int64(n)),
                            .float(Float(lr)), .float(Float(hyperparameters.beta1)), .float(Float(hyperparameters.beta2)),
                            .float(Float(hyperparameters.eps)), .float(Float(hyperparameters.weightDecay)), .float(Float(bc1)),
                            .float(Float(bc2.squareRoot()))])
        } else {
            let c = BitsandbytesAdamScalars(step: t, lr: lr, hyperparameters)
            let scalars: [KernelArgument] = [.float(c.beta1), .float(c.beta2), .float(c.oneMinusBeta1), .float(c.oneMinusBeta2),
                                             .float(c.stepSize), .float(c.epsCorrection2), .float(c.decay)]
            if state.is8bit {
                guard let map1 = signedMap, let map2 = unsignedMap else {
                    throw CUDAError(call: "CUDAOptimizer", "could not upload the 8-bit code maps")
                }
                let absmax1 = region + UInt64(state.absmaxOffset), absmax2 = absmax1 + UInt64(4 * state.blocks)
                try dev.launch(context.compiler.function(KernelSources.adamw8bit, "adamw8bit_blockwise"), grid: (state.blocks, 1, 1),
                               block: (AdamW8bit.blockSize, 1, 1),
                               [s.valuesArg, s.gradientArg, .pointer(region), .pointer(region + UInt64(n)), .pointer(absmax1),
                                .pointer(absmax2), map1.arg, map2.arg, .int64(Int64(n))] + scalars)
            } else {
                try dev.launch(context.compiler.function(KernelSources.adamw8bit, "adamw32_bnb"), grid: (context.gridSize(items: n), 1, 1),
                               block: (256, 1, 1),
                               [s.valuesArg, s.gradientArg, .pointer(region), .pointer(region + UInt64(4 * n)), .int64(Int64(n))] + scalars)
            }
        }
        if let host = state.host {
            try dev.copy(toHost: host.pointer, from: region, bytes: state.byteCount, stream: dev.stream)
        }
    }

    /// Bytes of optimizer state on the device now (the staging buffer when paged).
    public var deviceStateBytes: Int {
        isPaged ? (staging?.byteCount ?? 0) : states.values.reduce(0) { $0 + $1.byteCount }
    }

    // MARK: State

    /// A tensor's state region copied to the host (waits for the stream).
    private func hostBytes(_ state: TensorState) throws -> [UInt8] {
        try context.device.stream.synchronize()
        if let host = state.host {
            return Array(UnsafeRawBufferPointer(start: host.pointer, count: state.byteCount))
        }
        return try state.device!.download()
    }

    /// Every state buffer and the step counter, named as the CPU optimizers name them.
    public func state() throws -> [TensorRecord] {
        var records = [OptimizerStateRecords.step(stepCount)]
        for name in states.keys.sorted() {
            let st = states[name]!
            let bytes = try hostBytes(st)
            let n = st.count
            func floats(_ from: Int, _ count: Int) -> [Float] {
                (0..<count).map { i in Float(bitPattern: UInt32(bytes[from + 4 * i]) | UInt32(bytes[from + 4 * i + 1]) << 8
                                                 | UInt32(bytes[from + 4 * i + 2]) << 16 | UInt32(bytes[from + 4 * i + 3]) << 24) }
            }
            if st.is8bit {
                records.append(OptimizerStateRecords.bytes("state.\(name).state1", Array(bytes[0..<n])))
                records.append(OptimizerStateRecords.bytes("state.\(name).state2", Array(bytes[n..<(2 * n)])))
                records.append(OptimizerStateRecords.floats("state.\(name).absmax1", floats(st.absmaxOffset, st.blocks)))
                records.append(OptimizerStateRecords.floats("state.\(name).absmax2", floats(st.absmaxOffset + 4 * st.blocks, st.blocks)))
            } else {
                records.append(OptimizerStateRecords.floats("state.\(name).exp_avg", floats(0, n)))
                records.append(OptimizerStateRecords.floats("state.\(name).exp_avg_sq", floats(4 * n, n)))
            }
        }
        return records
    }

    /// Restores state saved by this or the CPU optimizer of the same layout (e.g. `Optimizer.save(to:)`).
    public func load(state file: SafeTensorsFile) throws {
        let step = try OptimizerStateRecords.readStep(file)
        var buffers: [String: [String: TensorInfo]] = [:]
        for info in file.tensors {
            guard let (parameter, buffer) = OptimizerStateRecords.split(info.name) else { continue }
            buffers[parameter, default: [:]][buffer] = info
        }
        var newStates: [String: TensorState] = [:]
        for (name, parts) in buffers {
            var region: [UInt8]
            let st: TensorState
            if let s1 = parts["state1"] {
                guard kind.is8bit, let s2 = parts["state2"], let a1 = parts["absmax1"], let a2 = parts["absmax2"] else {
                    throw FileFormatError(file: file.path, place: "tensor 'state.\(name).state1'", "8-bit state, incomplete or for a 32-bit optimizer")
                }
                let b1 = try OptimizerStateRecords.readBytes(file, s1), b2 = try OptimizerStateRecords.readBytes(file, s2)
                let f1 = try OptimizerStateRecords.readFloats(file, a1), f2 = try OptimizerStateRecords.readFloats(file, a2)
                st = try TensorState(count: b1.count, is8bit: true, context: context, paged: isPaged)
                guard b2.count == b1.count, f1.count == st.blocks, f2.count == st.blocks else {
                    throw FileFormatError(file: file.path, place: "tensor 'state.\(name).state1'", "8-bit state sizes disagree")
                }
                region = [UInt8](repeating: 0, count: st.byteCount)
                region.replaceSubrange(0..<b1.count, with: b1)
                region.replaceSubrange(b1.count..<(2 * b1.count), with: b2)
                let floats = (f1 + f2).withUnsafeBytes { Array($0) }
                region.replaceSubrange(st.absmaxOffset..<(st.absmaxOffset + floats.count), with: floats)
            } else if let m = parts["exp_avg"], let v = parts["exp_avg_sq"] {
                let fm = try OptimizerStateRecords.readFloats(file, m), fv = try OptimizerStateRecords.readFloats(file, v)
                guard fm.count == fv.count else {
                    throw FileFormatError(file: file.path, place: "tensor 'state.\(name).exp_avg'", "exp_avg and exp_avg_sq sizes differ")
                }
                st = try TensorState(count: fm.count, is8bit: false, context: context, paged: isPaged)
                region = (fm + fv).withUnsafeBytes { Array($0) }
            } else {
                throw FileFormatError(file: file.path, place: "tensor 'state.\(name)'", "expected state1/state2/absmax1/absmax2 or exp_avg/exp_avg_sq")
            }
            if let host = st.host {
                region.withUnsafeBytes { host.pointer.copyMemory(from: $0.baseAddress!, byteCount: region.count) }
            } else {
                try st.device!.upload(region)
            }
            newStates[name] = st
        }
        try context.device.stream.synchronize()
        states = newStates
        stepCount = step
    }
}
