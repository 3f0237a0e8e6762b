// Which examples the loss counts, and why the others count nothing: a run or an evaluation in which no token is
// counted would report a loss of 0 and learn nothing, so it is an error that says why.

/// What the loss will count in a set of tokenized examples.
public struct CountedTokensReport: Sendable {
    public var examples: Int
    /// Tokens the loss counts, over all examples.
    public var countedTokens: Int
    /// Examples cut to `max_seq_length`.
    public var truncated: [ExampleOrigin] = []
    /// Examples whose every counted token was cut (they contribute nothing).
    public var completionLost: [ExampleOrigin] = []
    /// The longest prompt among those, in tokens: `max_seq_length` must exceed it.
    public var longestLostPrompt = 0
    /// Examples with nothing to count even uncut: empty texts, conversations without an assistant turn, labels all -100.
    public var nothingToCount: [ExampleOrigin] = []

    public init(_ examples: [TokenizedExample]) {
        self.examples = examples.count
        countedTokens = 0
        for e in examples {
            let counted = e.countedTokens
            countedTokens += counted
            if let cut = e.truncation {
                truncated.append(e.origin)
                if cut.completionLost {
                    completionLost.append(e.origin)
                    longestLostPrompt = max(longestLostPrompt, cut.promptLength)
                    continue
                }
            }
            if counted == 0 { nothingToCount.append(e.origin) }
        }
    }

    /// Warnings worth printing before a run: many truncated examples, examples that count nothing.
    /// `what`: "training data", "evaluation data", ...
    public func warnings(_ what: String, maxSeqLength: Int) -> [String] {
        var lines: [String] = []
        if examples > 0, Double(truncated.count) > 0.05 * Double(examples) {
            lines.append("warning: \(what): \(truncated.count) of \(examples) examples (\(percent(truncated.count))) are longer than "
                         + "max_seq_length \(maxSeqLength) and were cut")
        }
        if !completionLost.isEmpty {
            lines.append("warning: \(what): \(completionLost.count) examples lost their whole completion to max_seq_length \(maxSeqLength) "
                         + "and count nothing (the longest of their prompts is \(longestLostPrompt) tokens): "
                         + ExampleOrigin.describe(completionLost))
        }
        if !nothingToCount.isEmpty {
            lines.append("warning: \(what): \(nothingToCount.count) examples have no token the loss counts (empty text, no assistant "
                         + "turn, or labels all -100): " + ExampleOrigin.describe(nothingToCount))
        }
        return lines
    }

    /// The error for data in which no token is counted, saying why.
    public func noCountedTokensError(_ what: String, maxSeqLength: Int) -> UsageError {
        var reasons: [String] = []
        if !completionLost.isEmpty {
            reasons.append("\(completionLost.count) of \(examples) examples lost their completion to truncation at max_seq_length "
                           + "\(maxSeqLength) (the longest of their prompts is \(longestLostPrompt) tokens: raise max_seq_length above it)")
        }
        if !nothingToCount.isEmpty {
            reasons.append("\(nothingToCount.count) of \(examples) examples have nothing to count (empty text, no assistant turn, "
                           + "or labels all -100: \(ExampleOrigin.describe(nothingToCount)))")
        }
        if reasons.isEmpty { reasons.append("every label is -100 or the first of its example") }
        return UsageError("\(what): no token is counted in the loss, so there is nothing to learn or measure: " + reasons.joined(separator: "; "))
    }

    func percent(_ n: Int) -> String { String(cFormat: "%.1f%%", 100 * Double(n) / Double(max(examples, 1))) }
}
