// Double quantization of the 4-bit absmax constants (QLoRA §3, bitsandbytes quantize_4bit with
// compress_statistics=True):
//
//   offset          = mean(absmax)                       fp32, torch's CUDA mean (its summation order, then * fp32(1/n))
//   centered[b]     = absmax[b] - offset                 fp32
//   (q, nested)     = quantize_blockwise(centered, code = create_dynamic_map(signed=True), blocksize=256)
//   absmax'[b]      = code[q[b]] * nested[b / 256] + offset      (dequantize_blockwise, then += offset)
//
// Stored per weight: `absmax` (U8 codes), `nested_absmax` (F32, one per 256 blocks), `nested_quant_map`
// (the 256-entry code) and the offset in the quant-state JSON (`nested_offset`).
//
// On the mean: fp32 sums depend on their order, so `torchCUDAMean` follows torch's CUDA reduction
// exactly (a double-precision sum disagrees with the GPU in about 30% of random cases). Beyond 131,071
// absmax values (weights of 8.4M elements and more at blocksize 64) torch splits the sum over thread
// blocks by the GPU's multiprocessor count, so the offset then depends on the GPU that bitsandbytes
// ran on; we follow an H100 by default (`TorchCUDADevice`).

/// The double-quantized form of a 4-bit weight's absmax vector.
public struct DoubleQuantizedAbsmax: Sendable, Equatable {
    /// One 8-bit code per 4-bit block.
    public var codes: [UInt8]
    /// One fp32 absmax per `blocksize` codes.
    public var nestedAbsmax: [Float]
    /// The mean that was subtracted before quantizing.
    public var offset: Float
    /// The 8-bit code map (bitsandbytes' signed dynamic map when we quantize).
    public var code: [Float]
    /// Codes per nested block (256 in bitsandbytes).
    public var blocksize: Int

    public init(codes: [UInt8], nestedAbsmax: [Float], offset: Float, code: [Float], blocksize: Int) {
        self.codes = codes
        self.nestedAbsmax = nestedAbsmax
        self.offset = offset
        self.code = code
        self.blocksize = blocksize
    }

    /// The signed dynamic map, computed once.
    public static let signedDynamicMap: [Float] = createDynamicMap(signed: true)

    /// Double-quantizes `absmax` as bitsandbytes does.
    public init(quantizing absmax: [Float], blocksize: Int = 256, device: TorchCUDADevice = .h100) {
        let offset = torchCUDAMean(absmax, device: device)
        let centered = absmax.map { $0 - offset }
        let q = centered.withUnsafeBufferPointer { quantize8Bit($0, code: Self.signedDynamicMap, blocksize: blocksize) }
        self.init(codes: q.codes, nestedAbsmax: q.absmax, offset: offset, code: Self.signedDynamicMap, blocksize: blocksize)
    }

    /// The fp32 absmax the 4-bit dequantization uses: code[q] * nested + offset.
    public func dequantize() -> [Float] {
        var out = [Float](repeating: 0, count: codes.count)
        for i in codes.indices {
            out[i] = code[Int(codes[i])] * nestedAbsmax[i / blocksize] + offset
        }
        return out
    }
}

/// The GPU torch's mean is reproduced on: the reduction splits a long vector over thread blocks
/// according to the device's multiprocessor count, so means of more than 131,071 values depend on it.
public struct TorchCUDADevice: Sendable, Equatable {
    public var multiprocessors: Int
    public var maxThreadsPerMultiprocessor: Int
    public init(multiprocessors: Int, maxThreadsPerMultiprocessor: Int = 2048) {
        self.multiprocessors = multiprocessors
        self.maxThreadsPerMultiprocessor = maxThreadsPerMultiprocessor
    }
    /// H100 SXM (132 SMs); checked against torch on one.
    public static let h100 = TorchCUDADevice(multiprocessors: 132)
    /// A100 (108 SMs).
    public static let a100 = TorchCUDADevice(multiprocessors: 108)
}

/// `x.mean()` of a contiguous fp32 CUDA tensor, bit for bit: torch's reduction order (ATen
/// cuda/Reduce.cuh), then `sum * fp32(1 / n)` (MeanOps.project).
///
/// The order, for n values and one output:
///   - n >= 128 is "vectorized": threads read float4s; per thread, 4 accumulators (one per vector lane)
///     over vectors t, t + stride, ...; thread t of block 0 also takes tail element 4*(n/4) + t;
///     the accumulators combine as ((a0 + a1) + a2) + a3. Below 128 each thread keeps 4 accumulators
///     over elements t, t + stride, t + 2 stride, ... (unrolled by 4), combined the same way.
///   - block width = 512 threads, or the largest power of two <= n/4 (vectorized) or n (not);
///   - with 256 or more values per thread the input is split over
///     max(min(SMs * (maxThreadsPerSM / width), ceil(v / 16)), ceil(v / 256)) blocks (v = ceil(n / width));
///   - each block reduces its threads through shared memory (halving offsets down to 32), then a warp
///     shuffle tree (offsets 16, 8, 4, 2, 1); the last block adds the block partials the same way.
/// Checked against torch 2.x on an H100 for 1,362 vector lengths from 1 to 2,000,000.
public func torchCUDAMean(_ x: [Float], device: TorchCUDADevice = .h100) -> Float {
    let n = x.count
    guard n > 0 else { return .nan }
    let factor: Float = 1 / Float(n)
    return x.withUnsafeBufferPointer { torchCUDASum($0, device: device) } * factor
}

/// The sum part of `torchCUDAMean`.
func torchCUDASum(_ x: UnsafeBufferPointer<Float>, device: TorchCUDADevice) -> Float {
    let n = x.count
    func lastPow2(_ v: Int) -> Int {
        var v = v
        v |= v >> 1; v |= v >> 2; v |= v >> 4; v |= v >> 8; v |= v >> 16
        return max(1, v - (v >> 1))
    }
    let vectorized = n >= 128
    let dim0 = vectorized ? n / 4 : n
    let width = dim0 >= 512 ? 512 : lastPow2(dim0)
    let valuesPerThread = (n + width - 1) / width
    var blocks = 1
    if valuesPerThread >= 256 {
        let target = device.multiprocessors * (device.maxThreadsPerMultiprocessor / width)
        blocks = max(min(target, (valuesPerThread + 15) / 16), (valuesPerThread + 255) / 256)
    }
    let stride = width * blocks

    // Shared-memory halving down to a warp, then the shuffle tree; `v` has a power-of-two count.
    func blockReduce(_ v: inout [Float]) -> Float {
        var offset = v.count / 2
        while offset >= 1 {
            for t in 0..<offset { v[t] = v[t] + v[t + offset] }
            offset /= 2
        }
        return v[0]
    }

    var partials = [Float](repeating: 0, count: blocks)
    var threads = [Float](repeating: 0, count: width)
    for block in 0..<blocks {
        for t in 0..<width {
            var a0: Float = 0, a1: Float = 0, a2: Float = 0, a3: Float = 0
            var idx = t + block * width
            if vectorized {
                while idx * 4 + 3 < n {
                    a0 += x[idx * 4]; a1 += x[idx * 4 + 1]; a2 += x[idx * 4 + 2]; a3 += x[idx * 4 + 3]
                    idx += stride
                }
                let tail = n - n % 4 + t
                if block == 0 && tail < n { a0 += x[tail] }
            } else {
                while idx + 3 * stride < n {
                    a0 += x[idx]; a1 += x[idx + stride]; a2 += x[idx + 2 * stride]; a3 += x[idx + 3 * stride]
                    idx += 4 * stride
                }
                if idx < n { a0 += x[idx]; idx += stride }
                if idx < n { a1 += x[idx]; idx += stride }
                if idx < n { a2 += x[idx]; idx += stride }
                if idx < n { a3 += x[idx] }
            }
            threads[t] = ((a0 + a1) + a2) + a3
        }
        partials[block] = blockReduce(&threads)
    }
    if blocks == 1 { return partials[0] }
    // The last block to finish gathers the partials: thread t adds partials t, t + width, ...
    for t in 0..<width {
        var s: Float = 0
        var i = t
        while i < blocks { s += partials[i]; i += width }
        threads[t] = s
    }
    return blockReduce(&threads)
}
