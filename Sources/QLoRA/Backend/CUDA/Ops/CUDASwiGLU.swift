// Launchers for Kernels/swiglu.cu: the gated MLP activation h = act(gate) * up and its backward, for SwiGLU
// (act = silu) and GeGLU (act = gelu with the tanh approximation).

extension CUDAContext {
    /// h = act(gate) · up over `count` values; `h` may be `gate` (when dense). `outputRows`: h as rows of `columns`
    /// values `stride` apart, as the trainer's folded LoRA reads down_proj's input; `inputStride`: gate's and up's rows
    /// (of the same `columns`) that far apart, as the trainer's backward fold leaves them (dense without).
    public func gatedActivationForward(_ activation: MLPActivation, gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>,
                                       into h: DeviceBuffer<UInt16>, count: Int, outputRows: (columns: Int, stride: Int)? = nil,
                                       inputStride: Int? = nil, stream: CUDAStream? = nil) throws {
        // Dense: rows of 1 (the kernels' index is then the element's; no limit from the 32-bit column count).
        let (columns, stride) = outputRows ?? (1, 1)
        let gStride = inputStride ?? columns
        try require(columns > 0 && stride >= columns && gStride >= columns && count % columns == 0 && columns <= Int(Int32.max)
                        && (inputStride == nil || outputRows != nil)
                        && ((stride == columns && gStride == columns) || h.pointer != gate.pointer), "gatedActivationForward",
                    "\(count) values do not make rows of \(columns) values \(stride) (h), \(gStride) (gate, up) apart (strided only out of place)")
        func extent(_ s: Int) -> Int { count == 0 ? 0 : (count / columns - 1) * s + columns }
        try require(gate.count >= extent(gStride) && up.count >= extent(gStride) && h.count >= extent(stride), "gatedActivationForward",
                    "buffers shorter than \(count) values in their rows (gate, up: \(extent(gStride)), h: \(extent(stride)))")
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.swiglu, Self.gatedKernel(activation, "forward")),
                          grid: (gridSize(items: (count + 7) / 8), 1, 1), block: (256, 1, 1), stream: stream,
                          [gate.arg, up.arg, h.arg, .int64(Int64(count)), .int(columns), .int64(Int64(stride)), .int64(Int64(gStride))])
    }

    /// dgate and dup from dh; dgate may be `gate` and dup may be `up` (in place). `rows`: gate, up, dgate and dup as
    /// rows of `columns` values `stride` apart (the trainer's backward fold; dh stays dense, the columns past a row are
    /// neither read nor written).
    public func gatedActivationBackward(_ activation: MLPActivation, dh: DeviceBuffer<UInt16>, gate: DeviceBuffer<UInt16>,
                                        up: DeviceBuffer<UInt16>, dgate: DeviceBuffer<UInt16>, dup: DeviceBuffer<UInt16>,
                                        count: Int, rows: (columns: Int, stride: Int)? = nil, stream: CUDAStream? = nil) throws {
        let (columns, stride) = rows ?? (1, 1)
        try require(columns > 0 && stride >= columns && count % columns == 0 && columns <= Int(Int32.max), "gatedActivationBackward",
                    "\(count) values do not make rows of \(columns) values \(stride) apart")
        let extent = count == 0 ? 0 : (count / columns - 1) * stride + columns
        try require(dh.count >= count && [gate.count, up.count, dgate.count, dup.count].allSatisfy { $0 >= extent }, "gatedActivationBackward",
                    "buffers shorter than \(count) (gate, up, dgate, dup in their rows: \(extent))")
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.swiglu, Self.gatedKernel(activation, "backward")),
                          grid: (gridSize(items: (count + 7) / 8), 1, 1), block: (256, 1, 1), stream: stream,
                          [dh.arg, gate.arg, up.arg, dgate.arg, dup.arg, .int64(Int64(count)), .int(columns), .int64(Int64(stride))])
    }

    /// h = silu(gate) · up (the Llama MLP).
    public func swigluForward(gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>, into h: DeviceBuffer<UInt16>,
                              count: Int, stream: CUDAStream? = nil) throws {
        try gatedActivationForward(.silu, gate: gate, up: up, into: h, count: count, stream: stream)
    }

    /// dgate and dup from dh; dgate may be `gate` and dup may be `up` (in place).
    public func swigluBackward(dh: DeviceBuffer<UInt16>, gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>,
                               dgate: DeviceBuffer<UInt16>, dup: DeviceBuffer<UInt16>, count: Int,
                               stream: CUDAStream? = nil) throws {
        try gatedActivationBackward(.silu, dh: dh, gate: gate, up: up, dgate: dgate, dup: dup, count: count, stream: stream)
    }

    static func gatedKernel(_ activation: MLPActivation, _ direction: String) -> String {
        switch activation {
        case .silu: return "swiglu_" + direction
        case .geluTanh: return "geglu_" + direction
        }
    }
}
