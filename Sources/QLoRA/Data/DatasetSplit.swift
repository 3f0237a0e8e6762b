// Holding out part of the training data for evaluation.

public enum DatasetSplit {
    /// A seeded shuffle, then the last `fraction` (at least one example) goes to evaluation.
    public static func holdOut(_ examples: [TokenizedExample], fraction: Double, seed: UInt64) -> (train: [TokenizedExample], eval: [TokenizedExample]) {
        guard fraction > 0, examples.count > 1 else { return (examples, []) }
        var shuffled = examples
        var rng = SeededGenerator(seed: seed ^ 0x5EED)
        for i in stride(from: shuffled.count - 1, to: 0, by: -1) { shuffled.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
        let evalCount = min(examples.count - 1, max(1, Int((Double(examples.count) * fraction).rounded())))
        return (Array(shuffled.dropLast(evalCount)), Array(shuffled.suffix(evalCount)))
    }
}
