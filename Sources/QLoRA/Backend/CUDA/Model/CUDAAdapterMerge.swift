// Merging a LoRA adapter into its base on the GPU: the twin of `AdapterMerge.mergedWeight` (Model/Merge.swift), one
// linear layer at a time, for `AdapterMerge.write(..., mergedWeight:)`:
//   W   dense weights are uploaded as fp32; NF4 + double quant is dequantized on the device to fp32 with the CPU's
//       rounding (nf4_dequantize_double_quant_f32, then rounded to bf16 when the weight's dtype is bf16, as
//       `QuantizedWeight.dequantize()` does); any other 4-bit weight is dequantized on the CPU and uploaded.
//   W' = W + scale·(B·A): one fp32 cuBLASLt GEMM (CUBLAS_COMPUTE_32F, no TF32), [out, r]·[r, in], alpha = scale,
//       beta = 1, in place over W; then downloaded in fp32, and `AdapterMerge.write` rounds to bf16 as for the CPU.
// Against the CPU merge (fp32 B·A, then w += delta·scale) only the order of the r products in each sum and the
// GEMM epilogue's rounding of scale·sum + W may differ: a few fp32 ulps, which can flip the last bit of the bf16
// result where it falls near a rounding boundary; never more than one bf16 ulp away from the CPU's value except
// where W and scale·B·A nearly cancel.
// Layers without an adapter are left as they are (no GPU work for dense ones).

/// Computes merged linear weights on one GPU.
public final class CUDAAdapterMerge {
    public let context: CUDAContext
    /// bitsandbytes' absmax map on the device, shared by the weights that use it.
    private let signedDynamicMap: DeviceBuffer<Float>

    public init(context: CUDAContext) throws {
        self.context = context
        signedDynamicMap = try context.allocator.buffer(copying: DoubleQuantizedAbsmax.signedDynamicMap)
    }

    /// Whether `q` is dequantized on the device: NF4 with double quantization, 2-D [rows, columns], stored for fp32 or
    /// bf16 (fp16 rounding stays on the CPU).
    static func dequantizesOnDevice(_ q: QuantizedWeight, rows: Int, columns: Int) -> Bool {
        guard q.quantType == .nf4, case .doubleQuantized = q.scales, q.shape == [rows, columns], q.blocksize > 0 else { return false }
        return q.dtype == .f32 || q.dtype == .bf16
    }

    /// W + scale·B·A in fp32 for `layer` (its base weight alone when it has no adapter), as
    /// `AdapterMerge.mergedWeight` computes it on the CPU up to the summation order (see the header).
    public func mergedWeight(_ layer: Linear) throws -> [Float] {
        let rows = layer.outFeatures, columns = layer.inFeatures
        let allocator = context.allocator
        let weight: DeviceBuffer<Float>
        if case .quantized(let q) = layer.weight.storage, Self.dequantizesOnDevice(q, rows: rows, columns: columns) {
            let nf4 = try CUDANF4Weight(q, allocator: allocator, signedDynamicMap: signedDynamicMap)
            weight = try allocator.buffer(Float.self, count: rows * columns)
            try context.dequantize(nf4, into: weight, roundingToBF16: q.dtype == .bf16)
        } else {
            guard layer.lora != nil else { return layer.weight.values() }
            weight = try allocator.buffer(copying: layer.weight.values())
        }
        if let lora = layer.lora {
            guard lora.b.rows == rows, lora.a.columns == columns, lora.b.columns == lora.rank else {
                throw UsageError("\(layer.name): the adapter's B [\(lora.b.rows), \(lora.b.columns)] and A [\(lora.a.rows), \(lora.a.columns)] do not fit the weight [\(rows), \(columns)]")
            }
            let a = try allocator.buffer(copying: lora.a.values), b = try allocator.buffer(copying: lora.b.values)
            try context.blas().gemm(m: rows, n: columns, k: lora.rank, a: b.pointer, b: a.pointer, c: weight.pointer,
                                    inputType: .float32, outputType: .float32, alpha: lora.scale, beta: 1)
        }
        return try weight.download()
    }
}
