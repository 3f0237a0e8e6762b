import ArgumentParser
import QLoRA
#if canImport(Glibc)
import Glibc
#endif

/// `qlora bench-quantize`: CPU throughput of 4-bit quantization and row dequantization on random weights.
struct QuantizeBenchmarkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench-quantize",
        abstract: "Measure CPU NF4/FP4 quantize and dequantize throughput on a random [rows, cols] weight.",
        shouldDisplay: false
    )

    @Option(parsing: .unconditional, help: "Rows (output features) of the random weight.")
    var rows: Int = 4096

    @Option(parsing: .unconditional, help: "Columns (input features) of the random weight.")
    var cols: Int = 11008

    @Option(name: .customLong("quant-type"), help: "nf4 or fp4.")
    var quantType: String = "nf4"

    @Option(parsing: .unconditional, help: "Repetitions; the best time is reported.")
    var repeats: Int = 3

    @Option(name: .customLong("row-block"), parsing: .unconditional, help: "Rows per dequantizeRows call.")
    var rowBlock: Int = 64

    func run() throws {
        guard let type = QuantType(rawValue: quantType) else { throw ValidationError("--quant-type must be nf4 or fp4") }
        guard rows > 0, cols > 0, repeats > 0, rowBlock > 0 else {
            throw ValidationError("--rows, --cols, --repeats and --row-block must be positive integers")
        }
        let n = rows * cols
        // Normal-ish weights (sum of uniforms), scaled like a real layer's.
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        func next() -> Float {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(state >> 40) / Float(1 << 24)
        }
        var values = [Float](repeating: 0, count: n)
        for i in 0..<n { values[i] = (next() + next() + next() - 1.5) * 0.04 }

        func now() -> Double {
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
        }
        var best = Double.infinity
        var weight: QuantizedWeight? = nil
        for _ in 0..<repeats {
            let t0 = now()
            weight = try QuantizedWeight.quantize(values, shape: [rows, cols], type: type, blocksize: 64, doubleQuant: true)
            best = min(best, now() - t0)
        }
        guard let w = weight else { return }
        print("quantize \(type.rawValue) [\(rows), \(cols)] + double quant: \(String(format3: best * 1000)) ms, \(String(format3: Double(n) / best / 1e6)) M elements/s")

        var out = [Float](repeating: 0, count: rowBlock * cols)
        var bestDequant = Double.infinity
        var checksum: Float = 0
        for _ in 0..<repeats {
            let t0 = now()
            var r = 0
            while r < rows {
                let end = min(r + rowBlock, rows)
                out.withUnsafeMutableBufferPointer { w.dequantizeRows(r..<end, into: $0) }
                checksum += out[0]
                r = end
            }
            bestDequant = min(bestDequant, now() - t0)
        }
        print("dequantizeRows (\(rowBlock) rows a call, fp32 out): \(String(format3: bestDequant * 1000)) ms, \(String(format3: Double(n) / bestDequant / 1e6)) M elements/s, \(String(format3: Double(n) * 4 / bestDequant / 1e9)) GB/s written (checksum \(checksum))")
    }
}

extension String {
    init(format3 value: Double) {
        let scaled = (value * 1000).rounded()
        let whole = Int(scaled) / 1000
        let frac = abs(Int(scaled)) % 1000
        let f = String(frac)
        self = "\(whole)." + String(repeating: "0", count: 3 - f.count) + f
    }
}
