import ArgumentParser
import QLoRA

/// Hidden: GFLOP/s of the CPU matrix products at the shapes training uses.
struct GemmBenchmarkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-gemm", abstract: "CPU GEMM throughput (GFLOP/s).", shouldDisplay: false)

    @Option(parsing: .unconditional, help: "Rows of A (tokens).") var m: Int = 512
    @Option(parsing: .unconditional, help: "Columns of C (output features).") var n: Int = 1536
    @Option(parsing: .unconditional, help: "Inner dimension (input features).") var k: Int = 576
    @Option(parsing: .unconditional, help: "Repetitions.") var repeats: Int = 5

    func run() throws {
        guard m > 0, n > 0, k > 0, repeats > 0 else { throw ValidationError("--m, --n, --k and --repeats must be positive integers") }
        let a = Matrix(rows: m, columns: k), bNT = Matrix(rows: n, columns: k), bNN = Matrix(rows: k, columns: n), c = Matrix(rows: m, columns: n)
        var rng = SeededGenerator(seed: 1)
        for mtx in [a, bNT, bNN] { for i in 0..<mtx.count { mtx.pointer[i] = rng.nextFloat() - 0.5 } }
        let flops = 2.0 * Double(m) * Double(n) * Double(k)
        for (name, kernel) in [("gemmNT", { CPUMatmul.gemmNT(a.pointer, bNT.pointer, c.pointer, m: m, n: n, k: k) }),
                               ("gemmNN", { CPUMatmul.gemmNN(a.pointer, bNN.pointer, c.pointer, m: m, n: n, k: k) })] {
            kernel()
            var best = Double.infinity
            for _ in 0..<repeats {
                let t = monotonicSeconds()
                kernel()
                best = min(best, monotonicSeconds() - t)
            }
            print(name + String(cFormat: " m=%d n=%d k=%d: %.2f ms, %.1f GFLOP/s", m, n, k, best * 1e3, flops / best / 1e9))
        }
    }
}
