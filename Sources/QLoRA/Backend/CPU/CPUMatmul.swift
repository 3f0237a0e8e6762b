// Matrix products on the CPU, fp32, SIMD and two-level blocking, spread over the cores.
//
// Two shapes cover the whole model:
//   gemmNT: C[M,N] (+)= A[M,K] · B[N,K]ᵀ   — the forward of a linear layer (B is the HF weight [out, in])
//   gemmNN: C[M,N] (+)= A[M,K] · B[K,N]    — the input gradient of a linear layer (B is the same weight)
// All matrices are row-major and dense (leading dimension = row length).

import Dispatch

/// The number of threads the CPU kernels spread work over.
public enum CPUParallelism {
    nonisolated(unsafe) public static var threads: Int = max(1, System.activeProcessorCount)

    /// Runs `body(chunk)` for chunk in 0..<chunks, on all threads when there is enough work.
    @inline(__always)
    static func forEach(_ chunks: Int, work: Int, _ body: (Int) -> Void) {
        if chunks <= 1 || threads <= 1 || work < 32_768 {
            for c in 0..<chunks { body(c) }
        } else {
            DispatchQueue.concurrentPerform(iterations: chunks, execute: body)
        }
    }
}

enum System {
    static var activeProcessorCount: Int {
        #if canImport(Glibc)
        return Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #else
        return 1
        #endif
    }
}

#if canImport(Glibc)
import Glibc
#endif

public enum CPUMatmul {
    /// C[M,N] = A[M,K] · B[N,K]ᵀ, or C += … when `accumulate`.
    public static func gemmNT(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int, accumulate: Bool = false
    ) {
        // Split the output columns (weight rows) across threads: each thread streams its own part of B.
        let columnBlock = max(4, (n + CPUParallelism.threads * 4 - 1) / (CPUParallelism.threads * 4) / 4 * 4)
        let chunks = (n + columnBlock - 1) / columnBlock
        CPUParallelism.forEach(chunks, work: m * n * k) { chunk in
            let j0 = chunk * columnBlock
            let j1 = min(n, j0 + columnBlock)
            gemmNTBlock(a, b, c, m: m, n: n, k: k, columns: j0..<j1, accumulate: accumulate)
        }
    }

    /// One thread's share of gemmNT: columns j0..<j1 of C, all rows. Rows of A are taken two at a
    /// time and columns four at a time, so each loaded vector feeds several FMAs.
    @inline(__always)
    static func gemmNTBlock(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int, columns: Range<Int>, accumulate: Bool
    ) {
        let k8 = k & ~7
        // Keep a panel of B small enough to stay in cache while every row of A passes over it.
        let panel = 64
        var jp = columns.lowerBound
        while jp < columns.upperBound {
            let jEnd = min(columns.upperBound, jp + panel)
            var i = 0
            while i < m {
                let rows = min(2, m - i)
                var j = jp
                while j < jEnd {
                    let cols = min(4, jEnd - j)
                    if rows == 2 && cols == 4 {
                        dotBlock2x4(a + i * k, a + (i + 1) * k, b + j * k, k: k, k8: k8, c: c, ldc: n, i: i, j: j, accumulate: accumulate)
                    } else {
                        // Edges, and every row of a batch-1 (decode) product: wrapping index arithmetic, as the
                        // indices stay below m·k, n·k and m·n, which the caller's buffers hold.
                        for r in 0..<rows {
                            for q in 0..<cols {
                                let v = dot(a + (i &+ r) &* k, b + (j &+ q) &* k, k)
                                let index = (i &+ r) &* n &+ j &+ q
                                c[index] = accumulate ? c[index] + v : v
                            }
                        }
                    }
                    j += cols
                }
                i += rows
            }
            jp = jEnd
        }
    }

    @inline(__always)
    static func load8(_ p: UnsafePointer<Float>) -> SIMD8<Float> {
        UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self)
    }

    @inline(__always)
    static func dotBlock2x4(
        _ a0: UnsafePointer<Float>, _ a1: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
        k: Int, k8: Int, c: UnsafeMutablePointer<Float>, ldc: Int, i: Int, j: Int, accumulate: Bool
    ) {
        let b0 = b, b1 = b + k, b2 = b + 2 * k, b3 = b + 3 * k
        var s00 = SIMD8<Float>(), s01 = SIMD8<Float>(), s02 = SIMD8<Float>(), s03 = SIMD8<Float>()
        var s10 = SIMD8<Float>(), s11 = SIMD8<Float>(), s12 = SIMD8<Float>(), s13 = SIMD8<Float>()
        // The inner loops count with wrapping adds (&+): p < k, and checked adds cost the micro-kernels speed.
        var p = 0
        while p < k8 {
            let x0 = load8(a0 + p), x1 = load8(a1 + p)
            let w0 = load8(b0 + p), w1 = load8(b1 + p), w2 = load8(b2 + p), w3 = load8(b3 + p)
            s00 = s00.addingProduct(x0, w0); s01 = s01.addingProduct(x0, w1)
            s02 = s02.addingProduct(x0, w2); s03 = s03.addingProduct(x0, w3)
            s10 = s10.addingProduct(x1, w0); s11 = s11.addingProduct(x1, w1)
            s12 = s12.addingProduct(x1, w2); s13 = s13.addingProduct(x1, w3)
            p &+= 8
        }
        var r = SIMD8<Float>(s00.sum(), s01.sum(), s02.sum(), s03.sum(), s10.sum(), s11.sum(), s12.sum(), s13.sum())
        while p < k {
            let x0 = a0[p], x1 = a1[p]
            r[0] += x0 * b0[p]; r[1] += x0 * b1[p]; r[2] += x0 * b2[p]; r[3] += x0 * b3[p]
            r[4] += x1 * b0[p]; r[5] += x1 * b1[p]; r[6] += x1 * b2[p]; r[7] += x1 * b3[p]
            p &+= 1
        }
        for q in 0..<4 {
            let i0 = i * ldc + j + q, i1 = (i + 1) * ldc + j + q
            c[i0] = accumulate ? c[i0] + r[q] : r[q]
            c[i1] = accumulate ? c[i1] + r[4 + q] : r[4 + q]
        }
    }

    /// Σ a[p]·b[p] over p < k.
    @inline(__always)
    public static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ k: Int) -> Float {
        var s0 = SIMD8<Float>(), s1 = SIMD8<Float>()
        var p = 0
        while p &+ 16 <= k {
            s0 = s0.addingProduct(load8(a + p), load8(b + p))
            s1 = s1.addingProduct(load8(a + (p &+ 8)), load8(b + (p &+ 8)))
            p &+= 16
        }
        var sum = (s0 + s1).sum()
        while p < k { sum += a[p] * b[p]; p &+= 1 }
        return sum
    }

    /// C[M,N] = A[M,K] · B[K,N], or C += … when `accumulate`.
    public static func gemmNN(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int, accumulate: Bool = false
    ) {
        // Split the output columns across threads; each computes a vertical strip of C.
        let strip = max(16, (n + CPUParallelism.threads - 1) / CPUParallelism.threads / 16 * 16)
        let chunks = (n + strip - 1) / strip
        CPUParallelism.forEach(chunks, work: m * n * k) { chunk in
            let j0 = chunk * strip
            let j1 = min(n, j0 + strip)
            gemmNNStrip(a, b, c, m: m, n: n, k: k, columns: j0..<j1, accumulate: accumulate)
        }
    }

    /// Rows four at a time, columns sixteen at a time: an outer-product micro-kernel with the
    /// accumulators in registers; one row of B (two vectors) is broadcast against four A values.
    /// The inner dimension runs in panels so that the panel of B stays in cache while every row
    /// block of A passes over it (the head's backward has K = vocabulary size).
    @inline(__always)
    static func gemmNNStrip(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int, columns: Range<Int>, accumulate: Bool
    ) {
        let panel = 256
        var p0 = 0
        while p0 < k || (k == 0 && p0 == 0) {
            let p1 = min(k, p0 + panel)
            let add = accumulate || p0 > 0
            var i = 0
            while i < m {
                let rows = min(4, m - i)
                var j = columns.lowerBound
                while j < columns.upperBound {
                    if rows == 4 && j + 16 <= columns.upperBound {
                        var c00 = SIMD8<Float>(), c01 = SIMD8<Float>(), c10 = SIMD8<Float>(), c11 = SIMD8<Float>()
                        var c20 = SIMD8<Float>(), c21 = SIMD8<Float>(), c30 = SIMD8<Float>(), c31 = SIMD8<Float>()
                        let a0 = a + i * k, a1 = a0 + k, a2 = a1 + k, a3 = a2 + k
                        for p in p0..<p1 {
                            let row = b + (p &* n &+ j)
                            let w0 = load8(row), w1 = load8(row + 8)
                            let x0 = SIMD8<Float>(repeating: a0[p]), x1 = SIMD8<Float>(repeating: a1[p])
                            let x2 = SIMD8<Float>(repeating: a2[p]), x3 = SIMD8<Float>(repeating: a3[p])
                            c00 = c00.addingProduct(x0, w0); c01 = c01.addingProduct(x0, w1)
                            c10 = c10.addingProduct(x1, w0); c11 = c11.addingProduct(x1, w1)
                            c20 = c20.addingProduct(x2, w0); c21 = c21.addingProduct(x2, w1)
                            c30 = c30.addingProduct(x3, w0); c31 = c31.addingProduct(x3, w1)
                        }
                        store(c00, c01, c + i * n + j, add)
                        store(c10, c11, c + (i + 1) * n + j, add)
                        store(c20, c21, c + (i + 2) * n + j, add)
                        store(c30, c31, c + (i + 3) * n + j, add)
                        j += 16
                    } else {
                        let cols = min(16, columns.upperBound - j)
                        for r in 0..<rows {
                            for q in 0..<cols {
                                var s: Float = 0
                                for p in p0..<p1 { s += a[(i + r) * k + p] * b[p * n + j + q] }
                                let index = (i + r) * n + j + q
                                c[index] = add ? c[index] + s : s
                            }
                        }
                        j += cols
                    }
                }
                i += rows
            }
            if k == 0 { break }
            p0 = p1
        }
    }

    @inline(__always)
    static func store(_ v0: SIMD8<Float>, _ v1: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>, _ accumulate: Bool) {
        let raw = UnsafeMutableRawPointer(p)
        if accumulate {
            raw.storeBytes(of: v0 + load8(p), as: SIMD8<Float>.self)
            raw.storeBytes(of: v1 + load8(p + 8), toByteOffset: 32, as: SIMD8<Float>.self)
        } else {
            raw.storeBytes(of: v0, as: SIMD8<Float>.self)
            raw.storeBytes(of: v1, toByteOffset: 32, as: SIMD8<Float>.self)
        }
    }

    /// C[M,N] = A[K,M]ᵀ · B[K,N], or C += …: the weight gradient of a linear layer (A = output grads, B = inputs).
    public static func gemmTN(
        _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>,
        m: Int, n: Int, k: Int, accumulate: Bool = false
    ) {
        // Transpose A (small in LoRA: K tokens × r) so the NN kernel can run.
        let at = UnsafeMutablePointer<Float>.allocate(capacity: m * k)
        defer { at.deallocate() }
        for p in 0..<k { for i in 0..<m { at[i * k + p] = a[p * m + i] } }
        gemmNN(at, b, c, m: m, n: n, k: k, accumulate: accumulate)
    }
}
