// A linear layer with a LoRA adapter, forward and backward, as cuBLASLt GEMMs (bf16 operands, fp32 accumulation).
//
// Shapes: x [tokens, in], frozen W [out, in] (bf16, e.g. dequantized from NF4 just before), A [r, in], B [out, r],
// s = lora_alpha / r (or alpha / sqrt(r) with rsLoRA). PEFT's forward:
//     y  = x W^T + s (x A^T) B^T                 xa = x A^T [tokens, r] is kept for the backward
// Backward, for dy [tokens, out]:
//     dyB = dy B                      [tokens, r]
//     dx  = dy W + s dyB A            [tokens, in]
//     dA  = s dyB^T x                 [r, in]     (fp32)
//     dB  = s dy^T xa                 [out, r]    (fp32)
// The small intermediates xa and dyB are rounded to bf16 like the activations (PEFT under bf16 autocast does
// the same). Row-major GEMM conventions: see CuBLASLt.swift.
// With LoRA dropout (a `LoRADropoutMask`), the LoRA path reads d(x) = x·m/keep: xa = d(x) A^T, dA = s dyB^T d(x),
// dx = dy W + d(s dyB A), the three through the fused kernels of CUDALoRADropout.swift.

/// The bf16 LoRA matrices of one linear layer as the GEMMs read them, and its scale.
public struct LoRADeviceWeights {
    public var a: DeviceBuffer<UInt16>
    public var b: DeviceBuffer<UInt16>
    public var rank: Int
    public var scale: Float

    public init(a: DeviceBuffer<UInt16>, b: DeviceBuffer<UInt16>, rank: Int, scale: Float) {
        self.a = a
        self.b = b
        self.rank = rank
        self.scale = scale
    }
}

extension CUDAContext {
    /// y = x W^T + s (d(x) A^T) B^T; writes xa = d(x) A^T (bf16, [tokens, r]) for the backward (d(x) = x without
    /// `dropout`), and the dropout mask as bits into `dropoutMaskBits` (`CUDAContext.loraDropoutMaskBytes`) when given.
    public func loraLinearForward(x: DeviceBuffer<UInt16>, weight: DeviceBuffer<UInt16>, lora: LoRADeviceWeights,
                                  tokens: Int, inFeatures: Int, outFeatures: Int, xa: DeviceBuffer<UInt16>,
                                  into y: DeviceBuffer<UInt16>, dropout: LoRADropoutMask? = nil,
                                  dropoutMaskBits: DeviceBuffer<UInt8>? = nil, stream: CUDAStream? = nil) throws {
        let r = lora.rank
        try require(x.count >= tokens * inFeatures && weight.count >= outFeatures * inFeatures && y.count >= tokens * outFeatures
                        && lora.a.count >= r * inFeatures && lora.b.count >= outFeatures * r && xa.count >= tokens * r,
                    "loraLinearForward", "buffers too small for \(tokens) x \(inFeatures) -> \(outFeatures), r \(r)")
        let blas = try self.blas()
        try blas.gemm(m: tokens, n: outFeatures, k: inFeatures, a: x.pointer, b: weight.pointer, transB: true, c: y.pointer,
                      stream: stream)
        if let dropout {
            try loraDropoutXA(x: x.pointer, a: lora.a.pointer, into: xa.pointer, tokens: tokens, inFeatures: inFeatures, rank: r,
                              mask: dropout, maskBits: dropoutMaskBits, stream: stream)
        } else {
            try blas.gemm(m: tokens, n: r, k: inFeatures, a: x.pointer, b: lora.a.pointer, transB: true, c: xa.pointer, stream: stream)
        }
        try blas.gemm(m: tokens, n: outFeatures, k: r, a: xa.pointer, b: lora.b.pointer, transB: true, c: y.pointer,
                      alpha: lora.scale, beta: 1, stream: stream)
    }

    /// dx (bf16), dA and dB (fp32; added to when `accumulateGradients`) from dy. `dyB` is [tokens, r] bf16 scratch.
    /// With `dropout`, `dropoutScratch` holds `CUDAContext.loraDropoutScratchCount` floats; with `dropoutMaskBits`
    /// (`CUDAContext.loraDropoutMaskBytes`) dA and dx read the mask as bits: written by the forward when
    /// `maskBitsFromForward`, else by dA's kernel (which hashes it once for both).
    public func loraLinearBackward(x: DeviceBuffer<UInt16>, weight: DeviceBuffer<UInt16>, lora: LoRADeviceWeights,
                                   xa: DeviceBuffer<UInt16>, dy: DeviceBuffer<UInt16>, tokens: Int, inFeatures: Int,
                                   outFeatures: Int, dyB: DeviceBuffer<UInt16>, dx: DeviceBuffer<UInt16>,
                                   dA: DeviceBuffer<Float>, dB: DeviceBuffer<Float>, accumulateGradients: Bool = false,
                                   dropout: LoRADropoutMask? = nil, dropoutScratch: DeviceBuffer<Float>? = nil,
                                   dropoutMaskBits: DeviceBuffer<UInt8>? = nil, maskBitsFromForward: Bool = false,
                                   stream: CUDAStream? = nil) throws {
        let r = lora.rank
        try require(dy.count >= tokens * outFeatures && dx.count >= tokens * inFeatures && dyB.count >= tokens * r
                        && dA.count >= r * inFeatures && dB.count >= outFeatures * r,
                    "loraLinearBackward", "buffers too small for \(tokens) x \(inFeatures) -> \(outFeatures), r \(r)")
        let blas = try self.blas()
        let beta: Float = accumulateGradients ? 1 : 0
        // dB = s dy^T xa: [out, r] = [tokens, out]^T [tokens, r]
        try blas.gemm(m: outFeatures, n: r, k: tokens, a: dy.pointer, transA: true, b: xa.pointer, c: dB.pointer,
                      outputType: .float32, alpha: lora.scale, beta: beta, stream: stream)
        // dyB = dy B: [tokens, r] = [tokens, out] [out, r]
        try blas.gemm(m: tokens, n: r, k: outFeatures, a: dy.pointer, b: lora.b.pointer, c: dyB.pointer, stream: stream)
        // dA = s dyB^T d(x): [r, in] = [tokens, r]^T [tokens, in]
        if let dropout {
            guard let dropoutScratch else { throw CUDAError(call: "loraLinearBackward", "dropout needs a dropoutScratch buffer") }
            if !accumulateGradients { try device.memset(dA.pointer, value: 0, bytes: 4 * r * inFeatures, stream: stream) }
            try loraDropoutGradA(x: x.pointer, dyB: dyB.pointer, into: dA.pointer, scratch: dropoutScratch, tokens: tokens,
                                 inFeatures: inFeatures, rank: r, scale: lora.scale, mask: dropout,
                                 maskBits: maskBitsFromForward ? nil : dropoutMaskBits,
                                 storedMaskBits: maskBitsFromForward ? dropoutMaskBits : nil, stream: stream)
        } else {
            try blas.gemm(m: r, n: inFeatures, k: tokens, a: dyB.pointer, transA: true, b: x.pointer, c: dA.pointer,
                          outputType: .float32, alpha: lora.scale, beta: beta, stream: stream)
        }
        // dx = dy W + d(s dyB A)
        try blas.gemm(m: tokens, n: inFeatures, k: outFeatures, a: dy.pointer, b: weight.pointer, c: dx.pointer, stream: stream)
        if let dropout {
            try loraDropoutAddDX(dyB: dyB.pointer, a: lora.a.pointer, into: dx.pointer, tokens: tokens, inFeatures: inFeatures, rank: r,
                                 scale: lora.scale, mask: dropout, maskBits: dropoutMaskBits, stream: stream)
        } else {
            try blas.gemm(m: tokens, n: inFeatures, k: r, a: dyB.pointer, b: lora.a.pointer, c: dx.pointer, alpha: lora.scale,
                          beta: 1, stream: stream)
        }
    }
}
