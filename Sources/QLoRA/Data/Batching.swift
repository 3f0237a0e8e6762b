// Turning tokenized examples into micro-batches: padded rows, or packed rows.

public enum Batching {
    /// Packs examples into rows of `length` tokens, first-fit by decreasing length, examples kept whole.
    /// Positions restart at each example; its first label is ignored so that the previous example's
    /// last token does not learn to predict it; attention stays inside each example.
    public static func packedRows(_ examples: [TokenizedExample], length: Int) -> [TrainingBatch] {
        let order = examples.indices.sorted { (examples[$0].tokens.count, $1) > (examples[$1].tokens.count, $0) }
        var bins: [[Int]] = []
        var space: [Int] = []
        for i in order {
            let n = min(examples[i].tokens.count, length)
            if let b = space.firstIndex(where: { $0 >= n }) {
                bins[b].append(i)
                space[b] -= n
            } else {
                bins.append([i])
                space.append(length - n)
            }
        }
        return bins.map { row(of: $0.map { examples[$0] }, length: length) }
    }

    /// One row holding `examples` back to back, padded to `length`.
    static func row(of examples: [TokenizedExample], length: Int) -> TrainingBatch {
        var tokens: [Int32] = [], labels: [Int32] = [], positions: [Int32] = [], starts: [Int32] = []
        for e in examples {
            let n = min(e.tokens.count, length - tokens.count)
            let start = Int32(tokens.count)
            tokens += e.tokens.prefix(n).map { Int32($0) }
            var l = e.labels.prefix(n).map { Int32($0) }
            if start > 0, !l.isEmpty { l[0] = TrainingBatch.ignoreIndex }
            labels += l
            positions += (0..<n).map { Int32($0) }
            starts += Array(repeating: start, count: n)
        }
        // Padding: its own "example" that nothing counts and nothing real attends to.
        let padStart = Int32(tokens.count)
        while tokens.count < length {
            tokens.append(0)
            labels.append(TrainingBatch.ignoreIndex)
            positions.append(Int32(positions.count) - padStart)
            starts.append(padStart)
        }
        var batch = TrainingBatch(rows: 1, length: length, tokens: tokens, labels: labels, positions: positions, exampleStarts: starts)
        batch.origins = examples.map(\.origin)
        return batch
    }

    /// Stacks single rows (all of the same length) into one micro-batch.
    public static func stack(_ rows: [TrainingBatch]) -> TrainingBatch {
        precondition(!rows.isEmpty && rows.allSatisfy { $0.length == rows[0].length })
        var batch = TrainingBatch(rows: rows.reduce(0) { $0 + $1.rows }, length: rows[0].length, tokens: rows.flatMap(\.tokens),
                                  labels: rows.flatMap(\.labels), positions: rows.flatMap(\.positions), exampleStarts: rows.flatMap(\.exampleStarts))
        batch.origins = rows.flatMap(\.origins)
        return batch
    }

    /// Micro-batches of `size` examples each, one example a row, padded to the longest in the batch.
    public static func paddedBatches(_ examples: [TokenizedExample], size: Int, padID: Int) -> [TrainingBatch] {
        stride(from: 0, to: examples.count, by: size).map { start in
            let group = Array(examples[start..<min(examples.count, start + size)])
            let length = group.map(\.tokens.count).max() ?? 1
            var batch = TrainingBatch(examples: group.map { ($0.tokens, $0.labels) }, length: max(length, 2), padID: padID)
            batch.origins = group.map(\.origin)
            return batch
        }
    }

    /// Micro-batches from examples in the given order: packed rows grouped `size` at a time, or padded batches.
    public static func batches(_ examples: [TokenizedExample], size: Int, packing: Bool, length: Int, padID: Int) -> [TrainingBatch] {
        if packing {
            let rows = packedRows(examples, length: length)
            return stride(from: 0, to: rows.count, by: size).map { stack(Array(rows[$0..<min(rows.count, $0 + size)])) }
        }
        return paddedBatches(examples, size: size, padID: padID)
    }
}
