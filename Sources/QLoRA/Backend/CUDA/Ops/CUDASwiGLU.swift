// Launchers for Kernels/swiglu.cu: the gated MLP activation h = act(gate) * up and its backward, for SwiGLU
// (act = silu) and GeGLU (act = gelu with the tanh approximation).

extension CUDAContext {
    /// h = act(gate) · up over `count` values; `h` may be `gate` (when dense). `outputRows`: h as rows of `columns`
    /// values `stride` apart (gate and up stay dense), as the trainer's folded LoRA reads down_proj's input.
    public func gatedActivationForward(_ activation: MLPActivation, gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>,
                                       into h: DeviceBuffer<UInt16>, count: Int, outputRows: (columns: Int, stride: Int)? = nil,
                                       stream: CUDAStream? = nil) throws {
        let (columns, stride) = outputRows ?? (max(count, 1), max(count, 1))
        try require(columns > 0 && stride >= columns && count % columns == 0 && columns <= Int(Int32.max)
                        && (stride == columns || h.pointer != gate.pointer), "gatedActivationForward",
                    "\(count) values do not make rows of \(columns) values \(stride) apart (strided only out of place)")
        let extent = count == 0 ? 0 : (count / columns - 1) * stride + columns
        try require(gate.count >= count && up.count >= count && h.count >= extent, "gatedActivationForward",
                    "buffers shorter than \(count) (h: \(extent))")
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.swiglu, Self.gatedKernel(activation, "forward")),
                          grid: (gridSize(items: (count + 7) / 8), 1, 1), block: (256, 1, 1), stream: stream,
                          [gate.arg, up.arg, h.arg, .int64(Int64(count)), .int(columns), .int64(Int64(stride))])
    }

    /// dgate and dup from dh; dgate may be `gate` and dup may be `up` (in place).
    public func gatedActivationBackward(_ activation: MLPActivation, dh: DeviceBuffer<UInt16>, gate: DeviceBuffer<UInt16>,
                                        up: DeviceBuffer<UInt16>, dgate: DeviceBuffer<UInt16>, dup: DeviceBuffer<UInt16>,
                                        count: Int, stream: CUDAStream? = nil) throws {
        try require([dh.count, gate.count, up.count, dgate.count, dup.count].allSatisfy { $0 >= count }, "gatedActivationBackward",
                    "buffers shorter than \(count)")
        guard count > 0 else { return }
        try device.launch(compiler.function(KernelSources.swiglu, Self.gatedKernel(activation, "backward")),
                          grid: (gridSize(items: (count + 7) / 8), 1, 1), block: (256, 1, 1), stream: stream,
                          [dh.arg, gate.arg, up.arg, dgate.arg, dup.arg, .int64(Int64(count))])
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
