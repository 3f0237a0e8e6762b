// Launcher for Kernels/adamw.cu: one fp32 AdamW step, torch.optim.AdamW semantics.

#if canImport(Glibc)
import Glibc
#endif

/// AdamW hyper-parameters (torch's defaults except the learning rate).
public struct AdamWConfig {
    public var learningRate: Float
    public var beta1: Float = 0.9
    public var beta2: Float = 0.999
    public var eps: Float = 1e-8
    public var weightDecay: Float = 0.01

    public init(learningRate: Float, beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8, weightDecay: Float = 0.01) {
        self.learningRate = learningRate
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weightDecay = weightDecay
    }
}

extension CUDAContext {
    /// Step number `step` (1-based) of AdamW over `count` fp32 parameters with moments m and v (updated in place).
    public func adamwStep(params: DeviceBuffer<Float>, grads: DeviceBuffer<Float>, m: DeviceBuffer<Float>,
                          v: DeviceBuffer<Float>, count: Int, step: Int, config: AdamWConfig,
                          stream: CUDAStream? = nil) throws {
        try require(step >= 1, "adamwStep", "step numbers start at 1, got \(step)")
        try require([params.count, grads.count, m.count, v.count].allSatisfy { $0 >= count }, "adamwStep", "buffers shorter than \(count)")
        let bc1 = 1 - pow(Double(config.beta1), Double(step))
        let bc2 = 1 - pow(Double(config.beta2), Double(step))
        try device.launch(compiler.function(KernelSources.adamw, "adamw_step"), grid: (gridSize(items: count), 1, 1),
                          block: (256, 1, 1), stream: stream,
                          [params.arg, grads.arg, m.arg, v.arg, .int64(Int64(count)), .float(config.learningRate),
                           .float(config.beta1), .float(config.beta2), .float(config.eps), .float(config.weightDecay),
                           .float(Float(bc1)), .float(Float(bc2.squareRoot()))])
    }
}
