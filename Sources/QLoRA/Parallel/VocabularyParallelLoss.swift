// The head's cross-entropy with the vocabulary sharded over the ranks (Megatron's vocabulary-parallel loss): rank r
// holds rows [v_r, v_{r+1}) of lm_head (contiguous slices, the first V mod W one row longer) and computes their logits
// for every rank's tokens. Without a collective (or in a world of one) it is the single-process loss, bit for bit.
//
// Forward, for the counted tokens x_i (rows after the final norm) of all ranks, z_ij = x_i · head_j (soft-capped when the
// family caps logits), each rank over its slice S_r:
//   m_ir = max_{j∈S_r} z_ij,  s_ir = Σ_{j∈S_r} e^(z_ij − m_ir) (Float terms, Double sum),  and z_i,target on its owner;
//   combined on every rank in rank order:  M_i = max_r m_ir,  Σ_i = Σ_r s_ir · e^(m_ir − M_i),
//   loss_i = M_i + log Σ_i − z_i,target.
// Backward (the loss scaled by 1/N, N the global batch's counted tokens):
//   d loss_i / d z_ij = (e^(z_ij − m_ir) · e^(m_ir − M_i) / Σ_i − [j = target]) / N          (times 1 − tanh² when capped)
//   d loss / d x_i = Σ_r Σ_{j∈S_r} d z_ij · head_j: each rank's partial product over its slice, summed over the ranks
//   in rank order by a reduce-scatter that hands each rank its own tokens' rows.
// With one rank e^(m − M) = 1 and Σ = s exactly, so every number is the unsharded loss's; with W ranks the differences
// stay in the two W-way sums (Σ_i and d x_i), each within fp32 (Double for Σ) summation order.
// The exchange per call: the counted rows' count (an all-reduce), the rows and targets (all-gathered, padded to the
// largest rank's count), the per-token statistics (all-gathered) and d x (reduce-scattered). The logits of a slice are
// computed twice (statistics, then gradients), a chunk of rows at a time, so no rank ever holds a whole logits matrix.

#if canImport(Glibc)
import Glibc
#endif

/// The head's cross-entropy over counted tokens, whole or sharded by vocabulary.
public enum VocabularyParallelLoss {
    /// Rank r's rows of a vocabulary of `vocab` over `worldSize` ranks.
    public static func slice(vocab: Int, rank: Int, worldSize: Int) -> Range<Int> {
        let base = vocab / worldSize, extra = vocab % worldSize
        let start = rank * base + min(rank, extra)
        return start..<(start + base + (rank < extra ? 1 : 0))
    }

    /// Σ loss_i over this rank's `count` rows (`rows`: count × hidden, after the final norm; `targets`: each a valid id).
    /// With `gradient`, writes d(Σ loss / normalizer)/d rows there (count × hidden). `collective` nil: the whole
    /// vocabulary on this process. Every rank of `collective` must call it together (also with no rows).
    static func lossAndGradient(rows: UnsafePointer<Float>, count: Int, targets: [Int32], head: UnsafePointer<Float>,
                                hidden h: Int, vocab: Int, softcap: Float?, normalizer: Int, chunkRows: Int,
                                gradient: UnsafeMutablePointer<Float>?, collective: Collective?) throws -> Double {
        precondition(targets.count == count, "one target per row")
        let world = collective?.worldSize ?? 1, rank = collective?.rank ?? 0
        let scale = 1 / Float(max(normalizer, 1))

        // Every rank's rows (padded to the largest count), or this rank's alone.
        var part = count
        var counts = [count]
        var allRows = UnsafePointer(rows), allTargets = targets
        var gatheredRows: UnsafeMutablePointer<Float>? = nil
        defer { gatheredRows?.deallocate() }
        if let collective {
            var sizes = [Double](repeating: 0, count: world)
            sizes[rank] = Double(count)
            try collective.allReduce(&sizes, .sum)
            counts = sizes.map { Int($0) }
            part = counts.max() ?? 0
            if part == 0 { return 0 }
            var mine = [Float](repeating: 0, count: part * h)
            for i in 0..<(count * h) { mine[i] = rows[i] }
            let gathered = UnsafeMutablePointer<Float>.allocate(capacity: world * part * h)
            gatheredRows = gathered
            try mine.withUnsafeBytes { s in
                try collective.allGather(s, into: UnsafeMutableRawBufferPointer(start: gathered, count: world * part * h * 4))
            }
            let myTargets = targets + [Int32](repeating: TrainingBatch.ignoreIndex, count: part - count)
            allTargets = [Int32](repeating: 0, count: world * part)
            try myTargets.withUnsafeBytes { s in try allTargets.withUnsafeMutableBytes { try collective.allGather(s, into: $0) } }
            allRows = UnsafePointer(gathered)
        }
        let total = world * part
        if total == 0 { return 0 }
        let columns = slice(vocab: vocab, rank: rank, worldSize: world)
        let width = columns.count
        let sliceHead = head + columns.lowerBound * h

        let chunk = max(1, chunkRows)
        let logits = UnsafeMutablePointer<Float>.allocate(capacity: chunk * max(width, 1))
        let capSlope = softcap != nil ? UnsafeMutablePointer<Float>.allocate(capacity: chunk * max(width, 1)) : nil
        defer { logits.deallocate(); capSlope?.deallocate() }
        // The logits of rows [start, start + n) over this slice, capped where the family caps them.
        func computeLogits(_ start: Int, _ n: Int) {
            guard width > 0 else { return }
            CPUMatmul.gemmNT(allRows + start * h, sliceHead, logits, m: n, n: width, k: h)
            if let cap = softcap, let capSlope {
                for j in 0..<(n * width) {
                    let t = tanhf(logits[j] / cap)
                    logits[j] = t * cap
                    capSlope[j] = 1 - t * t
                }
            }
        }
        // A row's max over this slice, Σ e^(z − max) and the target's logit (0 where another slice has it).
        func rowStatistics(_ row: UnsafeMutablePointer<Float>, target: Int) -> (maximum: Float, sum: Double, targetLogit: Float) {
            var maximum = -Float.infinity
            for j in 0..<width { maximum = max(maximum, row[j]) }
            let targetLogit = columns.contains(target) ? row[target - columns.lowerBound] : 0
            // e^(z − max) kept in place: the gradient needs the values.
            var sum: Double = 0
            for j in 0..<width {
                let e = expf(row[j] - maximum)
                row[j] = e
                sum += Double(e)
            }
            return (maximum, sum, targetLogit)
        }
        var loss = 0.0
        let partial: UnsafeMutablePointer<Float>? = gradient == nil ? nil : .allocate(capacity: total * h)
        defer { partial?.deallocate() }
        // d x of rows [start, start + n) over this slice: the scaled softmax (times the cap's slope) · the slice's rows.
        func backward(_ start: Int, _ n: Int) {
            guard let partial else { return }
            guard width > 0 else { (partial + start * h).update(repeating: 0, count: n * h); return }
            if let capSlope { for j in 0..<(n * width) { logits[j] *= capSlope[j] } }
            CPUMatmul.gemmNN(logits, sliceHead, partial + start * h, m: n, n: h, k: width)
        }

        guard let collective else {
            // One pass: the whole vocabulary needs no exchange between the statistics and the gradients.
            for start in stride(from: 0, to: total, by: chunk) {
                let n = min(chunk, total - start)
                computeLogits(start, n)
                for r in 0..<n {
                    let target = Int(allTargets[start + r])
                    let row = logits + r * width
                    let s = rowStatistics(row, target: target)
                    loss += Double(s.maximum) + log(s.sum) - Double(s.targetLogit)
                    if gradient != nil {
                        // d loss / d logit_j = softmax_j − [j = target], scaled by 1/normalizer.
                        let factor = Float(1 / s.sum) * scale
                        for j in 0..<width { row[j] *= factor }
                        row[target] -= scale
                    }
                }
                backward(start, n)
            }
            if let gradient, let partial { gradient.update(from: partial, count: count * h) }
            return loss
        }

        // Statistics of this slice for every rank's rows (padding rows stay 0).
        var statistics = [Double](repeating: 0, count: 3 * total)
        for start in stride(from: 0, to: total, by: chunk) {
            let n = min(chunk, total - start)
            computeLogits(start, n)
            for r in 0..<n where allTargets[start + r] != TrainingBatch.ignoreIndex {
                let i = start + r
                let s = rowStatistics(logits + r * width, target: Int(allTargets[i]))
                statistics[3 * i] = Double(s.maximum)
                statistics[3 * i + 1] = s.sum
                statistics[3 * i + 2] = Double(s.targetLogit)
            }
        }
        var everyRank = [Double](repeating: 0, count: world * 3 * total)
        try statistics.withUnsafeBytes { s in try everyRank.withUnsafeMutableBytes { try collective.allGather(s, into: $0) } }
        let owners = (0..<world).map { slice(vocab: vocab, rank: $0, worldSize: world) }
        // (M_i, Σ_i, z_i,target), combined over the ranks' slices in rank order.
        func combined(_ i: Int) -> (maximum: Float, sum: Double, targetLogit: Float) {
            let target = Int(allTargets[i])
            var maximum = -Float.infinity
            for (q, columns) in owners.enumerated() where !columns.isEmpty { maximum = max(maximum, Float(everyRank[q * 3 * total + 3 * i])) }
            var sum = 0.0
            for (q, columns) in owners.enumerated() where !columns.isEmpty {
                sum += everyRank[q * 3 * total + 3 * i + 1] * exp(everyRank[q * 3 * total + 3 * i] - Double(maximum))
            }
            let owner = owners.firstIndex { $0.contains(target) } ?? 0
            return (maximum, sum, Float(everyRank[owner * 3 * total + 3 * i + 2]))
        }
        for r in 0..<count {
            let s = combined(rank * part + r)
            loss += Double(s.maximum) + log(s.sum) - Double(s.targetLogit)
        }
        guard let gradient, let partial else { return loss }

        // Gradients of this slice's logits for every rank's rows, and their partial products with this slice's rows.
        for start in stride(from: 0, to: total, by: chunk) {
            let n = min(chunk, total - start)
            computeLogits(start, n)
            for r in 0..<n {
                let i = start + r, row = logits + r * width
                guard allTargets[i] != TrainingBatch.ignoreIndex else {
                    for j in 0..<width { row[j] = 0 }
                    continue
                }
                let target = Int(allTargets[i])
                let mine = rowStatistics(row, target: target)
                let whole = combined(i)
                let factor = Float(exp(Double(mine.maximum) - Double(whole.maximum)) / whole.sum) * scale
                for j in 0..<width { row[j] *= factor }
                if columns.contains(target) { row[target - columns.lowerBound] -= scale }
            }
            backward(start, n)
        }
        // Each rank's rows of d x, summed over the ranks' slices in rank order.
        var mine = [Float](repeating: 0, count: part * h)
        try mine.withUnsafeMutableBufferPointer { out in
            try collective.reduceScatter(UnsafeBufferPointer(start: partial, count: total * h), into: out, .sum)
        }
        for i in 0..<(count * h) { gradient[i] = mine[i] }
        return loss
    }
}
