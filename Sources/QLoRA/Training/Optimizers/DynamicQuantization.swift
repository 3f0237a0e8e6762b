// bitsandbytes' 8-bit "dynamic" data type and its nearest-code search, as the 8-bit optimizers use them.
//
// The map (bitsandbytes.functional.create_dynamic_map, max_exponent_bits 7, total_bits 8): for each
// exponent e = 0…6, the midpoints of an evenly spaced grid on [0.1, 1] (2^e + 1 points signed,
// 2^(e+1) + 1 unsigned), scaled by 10^(e−6); negated copies for the signed map; plus 0 and 1; sorted.
// 256 values, increasing, from −0.993 (signed) or 0 (unsigned) to 1; the signed map has 0 at index 127.
// The grid is torch.linspace in float32 (first half fma(step, i, start), second half fma(−step, n−1−i, end)),
// the midpoints (a + b) / 2 in float32, the scale a Double power of ten applied in float32.
//
// Quantizing (the optimizer kernel's quantize_2D): a 7-step binary search from index 127 that remembers
// the last codes above and below, then the nearer of the final code and that neighbour by comparing with
// their float midpoint. Out-of-range or NaN inputs land on index 0 or 254/255, as in the kernel.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A sorted table of 256 Float values an 8-bit code indexes.
public struct DynamicQuantizationMap: Sendable, Equatable {
    /// The 256 values, increasing.
    public let values: [Float]
    /// Whether the map covers [−1, 1] (true) or [0, 1].
    public let signed: Bool

    /// `create_dynamic_map(signed: true)`: the first-moment map of 8-bit Adam and of NF4 double quantization.
    public static let signed = DynamicQuantizationMap(signed: true)
    /// `create_dynamic_map(signed: false)`: the second-moment map of 8-bit Adam.
    public static let unsigned = DynamicQuantizationMap(signed: false)

    /// The maps' values in memory that lives for the whole program, for the kernels' inner loops.
    static let signedTable: UnsafePointer<Float> = table(DynamicQuantizationMap.signed.values)
    static let unsignedTable: UnsafePointer<Float> = table(DynamicQuantizationMap.unsigned.values)

    private static func table(_ values: [Float]) -> UnsafePointer<Float> {
        let p = UnsafeMutablePointer<Float>.allocate(capacity: values.count)
        p.initialize(from: values, count: values.count)
        return UnsafePointer(p)
    }

    /// bitsandbytes' `create_dynamic_map(signed:)` (Quantization/DynamicMap.swift builds it, bit-exact with torch).
    init(signed: Bool) {
        values = createDynamicMap(signed: signed)
        self.signed = signed
    }

    /// The code of `x` (already divided by its block's absmax), found as the optimizer kernel does.
    @inline(__always)
    public func quantize(_ x: Float) -> UInt8 {
        signed ? DynamicQuantizationMap.quantize(x, DynamicQuantizationMap.signedTable, shortcut: DynamicQuantizationMap.signedShortcut)
            : DynamicQuantizationMap.quantize(x, DynamicQuantizationMap.unsignedTable, shortcut: DynamicQuantizationMap.unsignedShortcut)
    }

    /// The code of `x` by the plain 7-step search (no shortcut table).
    public func quantizeBySearch(_ x: Float) -> UInt8 {
        values.withUnsafeBufferPointer { DynamicQuantizationMap.quantize(x, $0.baseAddress!, signed: signed) }
    }

    /// bitsandbytes' quantize_2D: binary search over a 256-entry sorted `code`, then the nearer neighbour.
    @inline(__always)
    static func quantize(_ x: Float, _ code: UnsafePointer<Float>, signed: Bool) -> UInt8 {
        finish(x, search(x, code), code)
    }

    /// The same result, with the 7 comparisons looked up by the top 16 bits of `x` where they are
    /// the same for the whole bucket (all but a few hundred of the 65536 buckets; see `shortcutTable`).
    @inline(__always)
    static func quantize(_ x: Float, _ code: UnsafePointer<Float>, shortcut: UnsafePointer<UInt32>) -> UInt8 {
        let known = shortcut[Int(x.bitPattern >> 16)]
        return finish(x, known != unknownState ? known : search(x, code), code)
    }

    /// The search state after the 7 comparisons: pivot | lowerPivot << 8 | upperPivot << 16.
    ///
    /// Written without branches (the comparisons are data-dependent and would mispredict). The kernel keeps
    /// the values of the last codes above and below, starting from the sentinels 1 and −1 (signed) or 0; here
    /// they are read from the table at the end. That is the same: the upper sentinel equals code[255] = 1, and
    /// the lower one is only used when the search never went up, where both outcomes are index 0.
    @inline(__always)
    static func search(_ x: Float, _ code: UnsafePointer<Float>) -> UInt32 {
        var pivot = 127, upperPivot = 255, lowerPivot = 0
        var val = code[127]
        var i = 64
        while i > 0 {
            let above = x > val
            lowerPivot = above ? pivot : lowerPivot
            upperPivot = above ? upperPivot : pivot
            pivot = above ? pivot + i : pivot - i
            val = code[pivot]
            i >>= 1
        }
        return UInt32(pivot) | UInt32(lowerPivot) << 8 | UInt32(upperPivot) << 16
    }

    /// The kernel's last step: the final code, or its neighbour on x's side when x is past their midpoint.
    @inline(__always)
    static func finish(_ x: Float, _ state: UInt32, _ code: UnsafePointer<Float>) -> UInt8 {
        let pivot = Int(state & 0xFF), lowerPivot = Int((state >> 8) & 0xFF), upperPivot = Int(state >> 16)
        let val = code[pivot]
        let above = x > val
        let neighbour = above ? upperPivot : lowerPivot
        let midpoint = (code[neighbour] + val) * 0.5
        let takeNeighbour = above ? x > midpoint : x < midpoint
        return UInt8(truncatingIfNeeded: takeNeighbour ? neighbour : pivot)
    }

    static let unknownState: UInt32 = 0xFFFF_FFFF

    /// For each value of a Float's top 16 bits (sign, exponent, 7 mantissa bits: a contiguous interval of
    /// values), the search state shared by every x in it, or `unknownState`. Each comparison x > code[p] is
    /// monotone in x, so the set of x taking one search path is an interval: if the interval's two ends
    /// take the same path, all of it does. Buckets holding NaN are unknown and take the full search.
    static func shortcutTable(_ code: UnsafePointer<Float>) -> UnsafePointer<UInt32> {
        let table = UnsafeMutablePointer<UInt32>.allocate(capacity: 1 << 16)
        for bucket in 0..<(1 << 16) {
            let first = Float(bitPattern: UInt32(bucket) << 16)
            let last = Float(bitPattern: UInt32(bucket) << 16 | 0xFFFF)
            let a = search(first, code), b = search(last, code)
            table[bucket] = first.isNaN || last.isNaN || a != b ? unknownState : a
        }
        return UnsafePointer(table)
    }

    static let signedShortcut = shortcutTable(signedTable)
    static let unsignedShortcut = shortcutTable(unsignedTable)
}
