// The trainer's NF4 dequantization (Kernels/nf4.cu's nf4_dequantize_double_quant_tiles) against its CPU twins:
//   nf4 tiles         every output against CPUReference.nf4Dequantize (4e-3, as the "nf4" group), and bit for bit
//                     against the exact twin below and against the one-thread-per-8-outputs kernel on the same
//                     inputs: full tiles, a partial last tile and block, an odd count, three tensors in one launch
//                     (outputs in one buffer, one of them not 16-byte aligned), codes not 4-byte aligned, blocksizes
//                     128 and 4096 (a tile inside one block);
//   benchmarks        each Llama-3.1-8B weight shape (and q+k+v, gate+up in one launch) in µs and TB/s of bytes read
//                     + written, beside the old kernel.
// Exact twin: w = NF4[nibble] · fma(code[q], nested[b / nested blocksize], offset), rounded once to the run's type
// (the kernels' formula; CPUReference rounds the absmax's product and sum separately, hence its 4e-3).

import QLoRA

/// One double-quantized NF4 tensor on the host and the device.
struct NF4Case {
    let count: Int, blocksize: Int, nestedBlocksize: Int
    let packed: [UInt8], quantized: [UInt8], code: [Float], nested: [Float], offset: Float
    let device: (packed: DeviceBuffer<UInt8>, quantized: DeviceBuffer<UInt8>, code: DeviceBuffer<Float>, nested: DeviceBuffer<Float>)

    init(count: Int, blocksize: Int = 64, nestedBlocksize: Int = 256, packedShift: Int = 0) throws {
        self.count = count
        self.blocksize = blocksize
        self.nestedBlocksize = nestedBlocksize
        let blocks = (count + blocksize - 1) / blocksize
        packed = rng.bytes((count + 1) / 2)
        quantized = rng.bytes(blocks)
        code = (0..<256).map { Float($0 - 128) / 128 }
        nested = rng.floats((blocks + nestedBlocksize - 1) / nestedBlocksize, 0.01, 0.05)
        offset = 0.03
        // packedShift > 0: the codes start that many bytes into their buffer (not 4-byte aligned).
        let packedBuffer = try upload([UInt8](repeating: 0, count: packedShift) + packed)
        device = (packedShift > 0 ? packedBuffer.view(at: packedShift, count: packed.count) : packedBuffer, try upload(quantized),
                  try upload(code), try upload(nested))
    }

    var scales: NF4Scales {
        .doubleQuant(quantized: device.quantized, code: device.code, nestedAbsmax: device.nested, offset: offset,
                     nestedBlocksize: nestedBlocksize)
    }

    func task(into out: DeviceBuffer<UInt16>, at: Int = 0) -> NF4DequantizeTask {
        NF4DequantizeTask(packed: device.packed, quantized: device.quantized, code: device.code, nestedAbsmax: device.nested,
                          offset: offset, blocksize: blocksize, nestedBlocksize: nestedBlocksize, count: count, out: out, outOffset: at)
    }

    /// CPUReference's values (separately rounded absmax).
    var reference: [Float] {
        let absmax = CPUReference.doubleQuantAbsmax(quantized: quantized, code: code, nestedAbsmax: nested, offset: offset,
                                                    nestedBlocksize: nestedBlocksize)
        return CPUReference.nf4Dequantize(packed: packed, absmax: absmax, blocksize: blocksize, count: count)
    }

    /// The kernels' bits: the absmax with one fused multiply-add, one product, one rounding to the run's type.
    var exactBits: [UInt16] {
        (0..<count).map { e in
            let b = e / blocksize
            let absmax = offset.addingProduct(code[Int(quantized[b])], nested[b / nestedBlocksize])
            let byte = packed[e / 2]
            return dt.encode(CPUReference.nf4Code[Int(e % 2 == 0 ? byte >> 4 : byte & 15)] * absmax)
        }
    }
}

/// Counts of differing values.
func bitDifferences(_ a: [UInt16], _ b: [UInt16]) -> Int { a.count == b.count ? zip(a, b).filter { $0 != $1 }.count : max(a.count, b.count) }

func checkNF4Tiles() throws {
    // One tensor at a time through the launcher: the tiles kernel, then the old kernel on the same inputs.
    for (label, c) in [("32 full tiles + a partial tile (65,728)", try NF4Case(count: 1027 * 64)),
                       ("exact tiles (4 x 2048)", try NF4Case(count: 4 * 2048)),
                       ("odd count, partial block (4,099)", try NF4Case(count: 4099)),
                       ("codes 1 byte off 4-byte alignment", try NF4Case(count: 3 * 2048 + 64, packedShift: 1)),
                       ("blocksize 128", try NF4Case(count: 5 * 2048 + 128 * 3, blocksize: 128)),
                       ("blocksize 4096 (tiles inside one block)", try NF4Case(count: 3 * 4096 + 2048, blocksize: 4096))] {
        let tiled = try poisoned(UInt16.self, c.count), old = try poisoned(UInt16.self, c.count)
        try ctx.nf4Dequantize(packed: c.device.packed, scales: c.scales, blocksize: c.blocksize, count: c.count, into: tiled)
        try ctx.nf4Dequantize(packed: c.device.packed, scales: c.scales, blocksize: c.blocksize, count: c.count, into: old, tiled: false)
        let got = try tiled.download(), exact = c.exactBits
        check("nf4 tiles, \(label)", relativeError(got.map(dt.decode), c.reference), 4e-3)
        checkTrue("nf4 tiles, \(label): = exact twin", bitDifferences(got, exact) == 0, "\(bitDifferences(got, exact)) of \(c.count) values differ")
        let oldBits = try old.download()
        checkTrue("nf4 tiles, \(label): = old kernel", bitDifferences(got, oldBits) == 0,
                  "\(bitDifferences(got, oldBits)) of \(c.count) values differ")
    }

    // Three tensors in one launch, into one buffer: the second's output starts 3 elements in (not 16-byte aligned).
    let cases = [try NF4Case(count: 7 * 2048), try NF4Case(count: 2048 + 192), try NF4Case(count: 1027 * 64)]
    let starts = [0, 7 * 2048 + 3, 7 * 2048 + 3 + 2048 + 192 + 61]
    let out = try poisoned(UInt16.self, starts[2] + cases[2].count + 5)
    try ctx.nf4DequantizeTiles(zip(cases, starts).map { $0.task(into: out, at: $1) })
    let all = try out.download()
    for (i, (c, start)) in zip(cases, starts).enumerated() {
        let got = Array(all[start..<(start + c.count)])
        check("nf4 tiles, 3 in one launch: tensor \(i) (\(c.count) at \(start))", relativeError(got.map(dt.decode), c.reference), 4e-3)
        checkTrue("nf4 tiles, 3 in one launch: tensor \(i) = exact twin", bitDifferences(got, c.exactBits) == 0,
                  "\(bitDifferences(got, c.exactBits)) of \(c.count) values differ")
    }
    // Between and after the outputs nothing is written.
    let gaps = Array(all[(7 * 2048)..<starts[1]]) + Array(all[(starts[1] + cases[1].count)..<starts[2]])
        + Array(all[(starts[2] + cases[2].count)...])
    checkTrue("nf4 tiles, 3 in one launch: gaps untouched", gaps.allSatisfy { $0 == 0xFFFF }, "\(gaps.filter { $0 != 0xFFFF }.count) written")

    // The launcher refuses what the kernel cannot take.
    var refused = 0
    for bad in [[cases[0].task(into: out)] + cases.map { $0.task(into: out) },  // 4 tensors
                [NF4DequantizeTask(packed: cases[0].device.packed, quantized: cases[0].device.quantized, code: cases[0].device.code,
                                   nestedAbsmax: cases[0].device.nested, offset: 0, blocksize: 32, count: 64, out: out)],  // blocks of 32
                [cases[2].task(into: out, at: out.count - 10)]] {  // output too small
        do { try ctx.nf4DequantizeTiles(bad) } catch { refused += 1 }
    }
    checkTrue("nf4 tiles: 4 tensors, blocks of 32, a short output refused", refused == 3, "\(refused) of 3 refused")
}

/// µs and TB/s (codes + absmax codes read, h16 written) of the tiles kernel and the old kernel at the 8B shapes.
func timeNF4Dequantize() throws {
    let hidden = 4096, kv = 1024, intermediate = 14336
    let shapes = [("q/o 4096x4096", hidden * hidden), ("k/v 1024x4096", kv * hidden), ("gate/up/down 14336x4096", intermediate * hidden)]
    let largest = intermediate * hidden
    let packed = try A.buffer(UInt8.self, count: largest / 2), quantized = try A.buffer(UInt8.self, count: largest / 64)
    try ctx.fillRandomBytes(packed.pointer, count: packed.count, seed: 11)
    try ctx.fillRandomBytes(quantized.pointer, count: quantized.count, seed: 12)
    let code = try upload((0..<256).map { Float($0 - 128) / 128 })
    let nested = try upload([Float](repeating: 0.01, count: largest / 64 / 256 + 1))
    let scales = NF4Scales.doubleQuant(quantized: quantized, code: code, nestedAbsmax: nested, offset: 0.04, nestedBlocksize: 256)
    let out = try A.buffer(UInt16.self, count: 2 * largest + hidden * hidden)
    func bytes(_ n: Int) -> Double { Double(n) / 2 + Double(n) * 2 + Double(n) / 64 }
    func line(_ name: String, _ ms: Double, _ n: Int) -> String {
        "\(fmt(ms * 1000, 1)) µs = \(fmt(bytes(n) / (ms / 1000) / 1e12, 2)) TB/s"
    }
    for (name, n) in shapes {
        let tiles = try timeMedian { try ctx.nf4Dequantize(packed: packed, scales: scales, count: n, into: out) }
        let old = try timeMedian { try ctx.nf4Dequantize(packed: packed, scales: scales, count: n, into: out, tiled: false) }
        print("  \(pad("nf4 dequantize " + name, 50)) tiles \(line(name, tiles, n)); old \(line(name, old, n))")
    }
    // The trainer's launches with kept block weights: q, k, v in one; gate, up in one (the same codes twice is fine).
    func task(_ n: Int, at: Int) -> NF4DequantizeTask {
        NF4DequantizeTask(packed: packed, quantized: quantized, code: code, nestedAbsmax: nested, offset: 0.04, count: n, out: out, outOffset: at)
    }
    for (name, counts) in [("q+k+v in one launch", [hidden * hidden, kv * hidden, kv * hidden]), ("gate+up in one launch", [largest, largest])] {
        var at = 0
        let tasks = counts.map { n -> NF4DequantizeTask in
            defer { at += n }
            return task(n, at: at)
        }
        let together = try timeMedian { try ctx.nf4DequantizeTiles(tasks) }
        let apart = try timeMedian { for n in counts { try ctx.nf4Dequantize(packed: packed, scales: scales, count: n, into: out, tiled: false) } }
        let total = counts.reduce(0, +)
        print("  \(pad("nf4 dequantize " + name, 50)) tiles \(line(name, together, total)); old, one by one \(line(name, apart, total))")
    }
}
