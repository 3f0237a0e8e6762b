// Launchers for Kernels/swiglu.cu: h = silu(gate) * up and its backward.

extension CUDAContext {
    public func swigluForward(gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>, into h: DeviceBuffer<UInt16>,
                              count: Int, stream: CUDAStream? = nil) throws {
        try require(gate.count >= count && up.count >= count && h.count >= count, "swigluForward", "buffers shorter than \(count)")
        try device.launch(compiler.function(KernelSources.swiglu, "swiglu_forward"),
                          grid: (gridSize(items: (count + 7) / 8), 1, 1), block: (256, 1, 1), stream: stream,
                          [gate.arg, up.arg, h.arg, .int64(Int64(count))])
    }

    /// dgate and dup from dh; dgate may be `gate` and dup may be `up` (in place).
    public func swigluBackward(dh: DeviceBuffer<UInt16>, gate: DeviceBuffer<UInt16>, up: DeviceBuffer<UInt16>,
                               dgate: DeviceBuffer<UInt16>, dup: DeviceBuffer<UInt16>, count: Int,
                               stream: CUDAStream? = nil) throws {
        try require([dh.count, gate.count, up.count, dgate.count, dup.count].allSatisfy { $0 >= count }, "swigluBackward",
                    "buffers shorter than \(count)")
        try device.launch(compiler.function(KernelSources.swiglu, "swiglu_backward"),
                          grid: (gridSize(items: (count + 7) / 8), 1, 1), block: (256, 1, 1), stream: stream,
                          [dh.arg, gate.arg, up.arg, dgate.arg, dup.arg, .int64(Int64(count))])
    }
}
