#if canImport(Glibc)
import Glibc
#endif

// The optimizers on the GPU, with the CPU `Optimizer`'s shape: a step over named tensors (here device buffers),
// state records with the CPU's names (so a checkpoint resumes on either backend), and the same kinds:
//   adamw             torch.optim.AdamW (adamw.cu), fp32 moments on the device
//   adamw_8bit        bitsandbytes' blockwise 8-bit AdamW (adamw8bit.cu); tensors under 4096 elements keep fp32
//                     moments with bitsandbytes' 32-bit arithmetic
//   paged_adamw_8bit  the same, with the state in pinned host memory, streamed through two device slots (each
//                     the size of the largest tensor's state; a chunk = consecutive tensors that fit one slot):
//                       upload stream    chunk c's states host → slot c % 2        then records loaded[s]
//                       device stream    waits loaded[s], the update kernels       then records updated[s]
//                       download stream  waits updated[s], slot → host             then records written[s]
//                     and chunk c + 2's upload into the same slot waits written[s]. So chunk c + 1 arrives while
//                     chunk c is updated and chunk c − 1 goes back (both copy directions at once), and the first two
//                     chunks' uploads run under the end of the backward (they wait only for the previous step's
//                     downloads, `downloaded`). The kernels, their arguments and the state bytes are the ones of the
//                     unpaged kinds (bit for bit; qlora-gpu-check "paged optimizer streamed"). Device memory: the two
//                     slots. Keeping the 8-bit state on the device instead would cost 2 bytes a LoRA value (8B, r 16:
//                     80 MiB; the 7B shape's whole margin below Unsloth's peak is ~30 MiB), so the state stays paged.
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
    /// Paged kinds: the two device slots the state streams through, the copy streams and their events (see the header).
    private var pagedSlots: [DeviceBuffer<UInt8>] = []
    private var uploadStream: CUDAStream?, downloadStream: CUDAStream?
    private var loaded: [CUDAEvent] = [], updated: [CUDAEvent] = [], written: [CUDAEvent] = []
    /// Recorded on the download stream after a step's last copy back: the next step's uploads (and the host) wait for it.
    private var downloaded: CUDAEvent?
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
        var work: [(CUDAParameterSlot, TensorState)] = []
        for s in slots {
            let is8bit = kind.is8bit && s.count >= AdamW8bit.minimum8bitSize
            let state = try states[s.name] ?? TensorState(count: s.count, is8bit: is8bit, context: context, paged: isPaged)
            states[s.name] = state
            work.append((s, state))
        }
        if isPaged {
            try pagedStep(work, step: t, lr: learningRate)
        } else {
            for (s, state) in work { try update(s, state, region: state.device!.pointer, step: t, lr: learningRate) }
        }
        stepCount = t
    }

    /// Byte offsets of state regions in a paged slot (each on 256 bytes, as the allocator aligns a buffer).
    static func slotOffset(_ bytes: Int) -> Int { (bytes + 255) / 256 * 256 }

    /// The paged kinds' chunks: consecutive tensors (indices into `regions`, the state bytes of each) whose regions fit
    /// one slot of `slotBytes` together, each with its offset in the slot.
    static func pagedChunks(_ regions: [Int], slotBytes: Int) -> [[(index: Int, offset: Int)]] {
        var chunks: [[(index: Int, offset: Int)]] = []
        var current: [(index: Int, offset: Int)] = [], end = 0
        for (i, bytes) in regions.enumerated() {
            if !current.isEmpty && end + bytes > slotBytes {
                chunks.append(current)
                current = []
                end = 0
            }
            current.append((i, end))
            end += slotOffset(bytes)
        }
        if !current.isEmpty { chunks.append(current) }
        return chunks
    }

    /// One update of every tensor with its state streamed through the two slots (the header's pipeline).
    private func pagedStep(_ work: [(CUDAParameterSlot, TensorState)], step t: Int, lr: Double) throws {
        let dev = context.device
        let slotBytes = work.map(\.1.byteCount).max() ?? 0
        guard slotBytes > 0 else { return }
        if uploadStream == nil {
            uploadStream = try CUDAStream(device: dev)
            downloadStream = try CUDAStream(device: dev)
            func events() throws -> [CUDAEvent] { try (0..<2).map { _ in try CUDAEvent(device: dev, timing: false) } }
            loaded = try events(); updated = try events(); written = try events()
            downloaded = try CUDAEvent(device: dev, timing: false)
        }
        guard let upload = uploadStream, let download = downloadStream, let downloaded else { return }
        if pagedSlots.isEmpty || pagedSlots[0].count < slotBytes {
            // Larger tensors than before: the old slots' copies and updates must be over before they go back to the
            // allocator (which does not order its blocks by stream).
            try dev.stream.synchronize()
            try synchronizeCopies()
            pagedSlots = []
            pagedSlots = try (0..<2).map { _ in try context.allocator.buffer(UInt8.self, count: slotBytes) }
        }
        // The previous step's copies back must land before this step reads the host state again.
        try upload.wait(for: downloaded)
        let chunks = Self.pagedChunks(work.map(\.1.byteCount), slotBytes: slotBytes)
        func load(_ c: Int) throws {
            let s = c % 2
            if c >= 2 { try upload.wait(for: written[s]) }  // chunk c − 2 has left the slot
            for (i, offset) in chunks[c] {
                let state = work[i].1
                try dev.copy(toDevice: pagedSlots[s].pointer + UInt64(offset), from: state.host!.pointer, bytes: state.byteCount, stream: upload)
            }
            try loaded[s].record(on: upload)
        }
        for c in 0..<min(2, chunks.count) { try load(c) }
        for c in chunks.indices {
            let s = c % 2
            try dev.stream.wait(for: loaded[s])
            for (i, offset) in chunks[c] {
                try update(work[i].0, work[i].1, region: pagedSlots[s].pointer + UInt64(offset), step: t, lr: lr)
            }
            try updated[s].record(on: dev.stream)
            try download.wait(for: updated[s])
            for (i, offset) in chunks[c] {
                let state = work[i].1
                try dev.copy(toHost: state.host!.pointer, from: pagedSlots[s].pointer + UInt64(offset), bytes: state.byteCount, stream: download)
            }
            try written[s].record(on: download)
            if c + 2 < chunks.count { try load(c + 2) }
        }
        try downloaded.record(on: download)
    }

    /// Waits on the host until every paged copy queued so far has finished (before the host reads or writes the
    /// pinned state, or the slots are freed).
    private func synchronizeCopies() throws {
        try uploadStream?.synchronize()
        try downloadStream?.synchronize()
    }

    deinit {
        // The pinned state goes with the optimizer: the copies that read or write it must be over first.
        try? synchronizeCopies()
    }

    /// One tensor's update on the device's stream, its state at `region` (its own buffer, or a paged slot).
    private func update(_ s: CUDAParameterSlot, _ state: TensorState, region: CUdeviceptr, step t: Int, lr: Double) throws {
        let dev = context.device
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
    }

    /// Bytes of optimizer state on the device now (the two slots when paged).
    public var deviceStateBytes: Int {
        isPaged ? pagedSlots.reduce(0) { $0 + $1.byteCount } : states.values.reduce(0) { $0 + $1.byteCount }
    }

    // MARK: State

    /// A tensor's state region copied to the host (waits for the stream).
    private func hostBytes(_ state: TensorState) throws -> [UInt8] {
        try context.device.stream.synchronize()
        try synchronizeCopies()
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
    /// `keeping`: only these tensors' state is loaded (a ZeRO-2 rank's own tensors); nil: every tensor's.
    public func load(state file: SafeTensorsFile, keeping names: Set<String>? = nil) throws {
        let step = try OptimizerStateRecords.readStep(file)
        var buffers: [String: [String: TensorInfo]] = [:]
        for info in file.tensors {
            guard let (parameter, buffer) = OptimizerStateRecords.split(info.name) else { continue }
            if let names, !names.contains(parameter) { continue }
            buffers[parameter, default: [:]][buffer] = info
        }
        // Queued copies of the current state must not land on the host after it is replaced (nor read freed buffers).
        try context.device.stream.synchronize()
        try synchronizeCopies()
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
