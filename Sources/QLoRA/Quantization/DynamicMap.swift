// bitsandbytes' 8-bit "dynamic" code maps and blockwise 8-bit quantization with them.
//
// create_dynamic_map(signed, max_exponent_bits = 7, total_bits = 8) (bitsandbytes/functional.py;
// Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning"): for each exponent
// i = 0 ..< max_exponent_bits the positive values are 10^(i - (max_exponent_bits - 1)) times the
// midpoints of an even fp32 linspace of [0.1, 1] (2^i + 1 points when signed, 2^(i+1) + 1 unsigned),
// the signed map adds their negatives, then 0 and 1.0 are appended, the list is padded with zeros to
// 256 and sorted. Every step is fp32 as torch computes it:
//   - torch.linspace(0.1, 1, k) on the CPU in float32: start = fp32(0.1), end = 1,
//     step = (end - start) / (k - 1); entry j = start + step * j for j < k/2, else end - step * (k - 1 - j),
//     where the compiler fused each multiply-add into one FMA (checked against torch 2.13: without
//     the fusion 5 of the 8 linspaces the maps use come out different);
//   - midpoints (b[j] + b[j+1]) / 2 in fp32;
//   - the Python-float power of ten times the fp32 tensor: the scalar is rounded to fp32 first,
//     then one fp32 multiply.
//
// 8-bit blockwise quantization (kQuantizeBlockwise with General8bit, dQuantize<0>): absmax per block,
// y = x * (1 / absmax), then a 7-step binary search over the sorted code from pivot 127, and a final
// choice between the found entry and its neighbour by comparing with their fp32 midpoint (see
// `quantize8Bit`). Dequantization: code[q] * absmax[block].

/// bitsandbytes' `create_dynamic_map`: 256 sorted fp32 values in [-1, 1] (signed) or [0, 1] (unsigned).
/// Defaults give the map of the nested absmax quantization (signed) and of 8-bit Adam's states
/// (signed for the first moment, unsigned for the second).
public func createDynamicMap(signed: Bool = true, maxExponentBits: Int = 7, totalBits: Int = 8) -> [Float] {
    precondition(maxExponentBits >= 1 && totalBits > maxExponentBits && totalBits <= 8, "unsupported dynamic map parameters")
    var data: [Double] = []
    let nonSignBits = totalBits - 1
    let additionalItems = (1 << (nonSignBits - maxExponentBits)) - 1

    func midpoints(_ count: Int) -> [Float] {
        let b = torchLinspaceFloat32(start: 0.1, end: 1, steps: count)
        return (0..<(count - 1)).map { (b[$0] + b[$0 + 1]) / 2 }
    }
    func appendScaled(_ means: [Float], exponent: Int) {
        // Python's 10 ** e (an int for e >= 0, else a correctly rounded float), rounded to fp32 by torch.
        let scale = Float(powerOfTen(exponent))
        data += means.map { Double(scale * $0) }
        if signed { data += means.map { Double(-(scale * $0)) } }
    }

    for i in 0..<maxExponentBits {
        let items = signed ? (1 << (i + nonSignBits - maxExponentBits)) + 1 : (1 << (i + nonSignBits - maxExponentBits + 1)) + 1
        appendScaled(midpoints(items), exponent: -(maxExponentBits - 1) + i)
    }
    if additionalItems > 0 {
        appendScaled(midpoints(additionalItems + 1), exponent: -(maxExponentBits - 1) + maxExponentBits - 1)
    }
    data.append(0)
    data.append(1)
    precondition(data.count == 1 << totalBits, "dynamic map has \(data.count) entries")
    while data.count < 256 { data.append(0) }
    data.sort()
    return data.map { Float($0) }
}

/// 10^e as Python computes `10 ** e` (exact for e >= 0; the correctly rounded double otherwise).
private func powerOfTen(_ e: Int) -> Double {
    if e >= 0 { var v = 1.0; for _ in 0..<e { v *= 10 }; return v }
    // Parsing the decimal string is correctly rounded, as CPython's float power is for these values.
    return Double("1e\(e)") ?? 0
}

/// torch.linspace(start, end, steps, dtype=torch.float32) on the CPU (aten linspace kernel).
func torchLinspaceFloat32(start: Double, end: Double, steps: Int) -> [Float] {
    let s = Float(start), e = Float(end)
    if steps == 1 { return [s] }
    let step = (e - s) / Float(steps - 1)
    let halfway = steps / 2
    return (0..<steps).map { j in
        j < halfway ? s.addingProduct(step, Float(j)) : e.addingProduct(-step, Float(steps - j - 1))
    }
}

// MARK: - 8-bit blockwise quantization

/// The 8-bit code of an already scaled value: bitsandbytes' `dQuantize<0>` (round to nearest by the
/// fp32 midpoint; ties go to the lower entry above the pivot and to the pivot below it).
/// `code` must hold 256 sorted values.
@inline(__always)
public func quantize8Bit(_ x: Float, code: UnsafePointer<Float>) -> UInt8 {
    var pivot = 127
    var upperPivot = 255
    var lowerPivot = 0
    var lower: Float = -1
    var upper: Float = 1
    var val = code[pivot]
    var i = 64
    while i > 0 {
        if x > val {
            lowerPivot = pivot
            lower = val
            pivot += i
        } else {
            upperPivot = pivot
            upper = val
            pivot -= i
        }
        val = code[pivot]
        i >>= 1
    }
    if upperPivot == 255 { upper = code[upperPivot] }
    if lowerPivot == 0 { lower = code[lowerPivot] }
    if x > val {
        let midpoint = (upper + val) * 0.5
        return UInt8(truncatingIfNeeded: x > midpoint ? upperPivot : pivot)
    } else {
        let midpoint = (lower + val) * 0.5
        return UInt8(truncatingIfNeeded: x < midpoint ? lowerPivot : pivot)
    }
}

/// Result of blockwise 8-bit quantization: one code per element and one fp32 absmax per block.
public struct Blockwise8Bit: Sendable, Equatable {
    public var codes: [UInt8]
    public var absmax: [Float]
}

/// `bitsandbytes.functional.quantize_blockwise(A, code, blocksize)` on CUDA (without nesting).
public func quantize8Bit(_ values: UnsafeBufferPointer<Float>, code: [Float], blocksize: Int) -> Blockwise8Bit {
    precondition(code.count == 256, "an 8-bit code has 256 entries")
    precondition(blocksize > 0)
    let n = values.count
    var codes = [UInt8](repeating: 0, count: n)
    var absmax = [Float](repeating: 0, count: (n + blocksize - 1) / blocksize)
    code.withUnsafeBufferPointer { cb in
        guard let c = cb.baseAddress else { return }
        var start = 0, block = 0
        while start < n {
            let end = min(start + blocksize, n)
            var m: Float = 0
            for i in start..<end { m = Float.maximum(m, abs(values[i])) }
            absmax[block] = m
            let scale: Float = 1 / m
            for i in start..<end { codes[i] = quantize8Bit(values[i] * scale, code: c) }
            start = end
            block += 1
        }
    }
    return Blockwise8Bit(codes: codes, absmax: absmax)
}

/// `dequantize_blockwise`: code[q] * absmax[block], fp32.
public func dequantize8Bit(_ codes: [UInt8], absmax: [Float], code: [Float], blocksize: Int) -> [Float] {
    precondition(code.count == 256, "an 8-bit code has 256 entries")
    var out = [Float](repeating: 0, count: codes.count)
    for i in codes.indices { out[i] = code[Int(codes[i])] * absmax[i / blocksize] }
    return out
}
