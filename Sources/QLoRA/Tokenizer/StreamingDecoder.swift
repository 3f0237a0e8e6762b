// Incremental decoding for generation: text comes out as tokens arrive, never half a character.
//
// Method (as tokenizers' DecodeStream): keep a window of ids made of the tokens that produced the last
// emitted text (the context) and those since. Decoders such as Strip or Metaspace treat the first token
// specially, so a token decoded on its own could differ from the same token decoded in place; decoding it
// after its context avoids that. When the window decodes to more than the context does and does not end
// in an incomplete UTF-8 sequence (or in U+FFFD, which ByteFallback makes of pending byte tokens), the
// extra text is emitted and the window moves on.

public struct StreamingDecoder {
    public let tokenizer: Tokenizer
    public let skipSpecialTokens: Bool
    private var ids: [Int] = []
    private var prefix: [UInt8] = []
    private var prefixIndex = 0

    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = false) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// Adds one generated id; returns the text it completes ("" while a character is incomplete).
    public mutating func append(_ id: Int) -> String {
        // A skipped token adds no text and no context; keeping it out stops the window from growing.
        if skipSpecialTokens && tokenizer.specialTokenIDs.contains(id) { return "" }
        ids.append(id)
        let text = tokenizer.decodeBytes(ids, skipSpecialTokens: skipSpecialTokens)
        guard text.count > prefix.count, !text.endsIncomplete else { return "" }
        // The window's text normally extends the context's; if a decoder made it differ, emit what is past the common part.
        var common = 0
        while common < prefix.count && text[common] == prefix[common] { common += 1 }
        let new = String(decoding: text[common...], as: UTF8.self)
        let newPrefixIndex = ids.count - prefixIndex
        ids.removeFirst(prefixIndex)
        prefix = tokenizer.decodeBytes(ids, skipSpecialTokens: skipSpecialTokens)
        prefixIndex = newPrefixIndex
        return new
    }

    /// Any text still held back (an incomplete character at the end becomes U+FFFD).
    public mutating func finish() -> String {
        let text = tokenizer.decodeBytes(ids, skipSpecialTokens: skipSpecialTokens)
        ids.removeAll()
        defer { prefix = []; prefixIndex = 0 }
        guard text.count > prefix.count else { return "" }
        var common = 0
        while common < prefix.count && text[common] == prefix[common] { common += 1 }
        return String(decoding: text[common...], as: UTF8.self)
    }
}

extension Array where Element == UInt8 {
    /// Whether the bytes end inside a UTF-8 sequence, or with U+FFFD.
    fileprivate var endsIncomplete: Bool {
        if count >= 3 && self[count - 3] == 0xEF && self[count - 2] == 0xBF && self[count - 1] == 0xBD { return true }
        // Look back at most 3 bytes for the lead byte of the last sequence.
        var i = count - 1
        var continuation = 0
        while i >= 0 && continuation < 4 && self[i] & 0xC0 == 0x80 { continuation += 1; i -= 1 }
        guard i >= 0 else { return continuation > 0 }
        let lead = self[i]
        let needed = lead < 0x80 ? 0 : lead >= 0xF0 ? 3 : lead >= 0xE0 ? 2 : lead >= 0xC0 ? 1 : 0
        return continuation < needed
    }
}
