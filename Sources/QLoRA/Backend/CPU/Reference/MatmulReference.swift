// Row-major matrix product with Double accumulation (the yardstick for cuBLASLt).

extension CPUReference {
    /// C[m, n] = op(A)[m, k] · op(B)[k, n]; A stored [m, k] ([k, m] when transA), B [k, n] ([n, k] when transB).
    public static func matmul(_ a: [Float], _ b: [Float], m: Int, n: Int, k: Int, transA: Bool = false,
                              transB: Bool = false) -> [Float] {
        var c = [Float](repeating: 0, count: m * n)
        for i in 0..<m {
            for j in 0..<n {
                var sum = 0.0
                for p in 0..<k {
                    let av = transA ? a[p * m + i] : a[i * k + p]
                    let bv = transB ? b[j * k + p] : b[p * n + j]
                    sum += Double(av) * Double(bv)
                }
                c[i * n + j] = Float(sum)
            }
        }
        return c
    }
}
