// A micro-batch for training: rows of tokens with labels, positions and example boundaries.

/// `rows × length` tokens. Labels follow transformers: `labels[t]` is the token at t itself
/// (the loss shifts them: logits at t predict labels at t + 1), -100 is ignored.
/// Packed rows hold several examples; positions restart at each example and attention never
/// crosses from one example into another.
public struct TrainingBatch: Sendable, Equatable {
    public static let ignoreIndex: Int32 = -100

    public var rows: Int
    public var length: Int
    public var tokens: [Int32]
    public var labels: [Int32]
    public var positions: [Int32]
    /// For each token, the index within its row of its example's first token.
    public var exampleStarts: [Int32]
    /// Where its examples came from (file and line), for messages; empty when unknown.
    public var origins: [ExampleOrigin] = []

    public var tokenCount: Int { rows * length }

    /// The number of tokens the loss counts (labels that are not ignored, after the shift).
    public var countedTokens: Int {
        var n = 0
        for r in 0..<rows { for t in 1..<max(length, 1) where labels[r * length + t] != Self.ignoreIndex { n += 1 } }
        return n
    }

    /// Throws unless every token id is in [0, vocabularySize) and every label is -100 or in [0, vocabularySize):
    /// the embedding and the loss index by them.
    public func checkIDs(vocabularySize: Int) throws {
        let lines = origins.isEmpty ? "" : " (\(ExampleOrigin.describe(origins)))"
        if let id = tokens.first(where: { $0 < 0 || Int($0) >= vocabularySize }) {
            throw UsageError("token id \(id) is outside the vocabulary (0..<\(vocabularySize))\(lines)")
        }
        if let label = labels.first(where: { $0 != Self.ignoreIndex && ($0 < 0 || Int($0) >= vocabularySize) }) {
            throw UsageError("label \(label) is outside the vocabulary (0..<\(vocabularySize)) and is not -100\(lines)")
        }
    }

    public init(rows: Int, length: Int, tokens: [Int32], labels: [Int32], positions: [Int32], exampleStarts: [Int32]) {
        precondition(tokens.count == rows * length && labels.count == tokens.count && positions.count == tokens.count && exampleStarts.count == tokens.count)
        self.rows = rows
        self.length = length
        self.tokens = tokens
        self.labels = labels
        self.positions = positions
        self.exampleStarts = exampleStarts
    }

    /// One example per row, padded on the right with `padID` (padding is ignored by the loss and,
    /// being after the example, never attended to by its tokens).
    public init(examples: [(tokens: [Int], labels: [Int])], length: Int, padID: Int) {
        rows = examples.count
        self.length = length
        tokens = []; labels = []; positions = []; exampleStarts = []
        for (t, l) in examples {
            precondition(t.count <= length && t.count == l.count, "example of \(t.count) tokens does not fit a row of \(length)")
            tokens += t.map { Int32($0) } + Array(repeating: Int32(padID), count: length - t.count)
            labels += l.map { Int32($0) } + Array(repeating: Self.ignoreIndex, count: length - t.count)
            positions += (0..<length).map { Int32($0) }
            exampleStarts += Array(repeating: 0, count: length)
        }
    }
}
