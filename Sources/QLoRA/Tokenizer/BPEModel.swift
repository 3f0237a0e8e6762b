// The BPE model of tokenizer.json (`"model": {"type": "BPE", ...}`), as Hugging Face tokenizers runs it.
//
// A word (one pre-tokenized piece) starts as one symbol per character, each looked up in the vocab:
// with `continuing_subword_prefix` on all but the first and `end_of_word_suffix` on the last; a
// character not in the vocab becomes its `<0xNN>` byte tokens when `byte_fallback` is set, else the
// unk token (consecutive unks fused into one when `fuse_unk`), else it is dropped. Then, repeatedly,
// the adjacent pair with the lowest merge rank (the leftmost among equals) is merged into the token
// `left + right` (right without its prefix). With `ignore_merges`, a word that is itself in the
// vocab is one token. `dropout` is not applied (encoding stays deterministic).
//
// Speed: merges are a dictionary keyed by the pair of ids; results are cached per word.

final class BPEModel: @unchecked Sendable {
    /// Token bytes → id.
    let vocab: [ByteString: Int]
    /// Id → token bytes (holes for ids that only added tokens use).
    let tokens: [[UInt8]?]
    /// (left id << 32 | right id) → (rank << 32 | merged id).
    private let merges: [UInt64: UInt64]
    let unkID: Int?
    let fuseUnk: Bool
    let byteFallback: Bool
    let ignoreMerges: Bool
    private let prefix: [UInt8]
    private let suffix: [UInt8]
    /// Id of each single-scalar token below U+0800 (-1 when absent), for the common fast path.
    private let smallScalarIDs: [Int32]
    /// `<0xNN>` token ids (-1 when absent).
    private let byteTokenIDs: [Int32]

    /// Ids at or above this are refused (a corrupt file must not make us allocate gigabytes).
    static let maxTokenID = 1 << 24

    private let cacheLock = TokenizerLock()
    private var cache: [ByteString: [Int32]] = [:]
    private static let cacheCapacity = 100_000
    private static let maxCachedWordLength = 256

    init(json: JSONValue, file: String) throws {
        func fail(_ place: String, _ message: String) -> FileFormatError {
            FileFormatError(file: file, place: place, message)
        }
        guard let vocabObject = json["vocab"]?.object else { throw fail("model.vocab", "expected an object of token → id") }
        var vocab: [ByteString: Int] = [:]
        vocab.reserveCapacity(vocabObject.count)
        var maxID = -1
        for (token, value) in vocabObject {
            guard let id = value.int, id >= 0, id < Self.maxTokenID else {
                throw fail("model.vocab[\"\(token)\"]", "expected an integer id from 0 to \(Self.maxTokenID - 1)")
            }
            vocab[ByteString(token)] = id
            maxID = max(maxID, id)
        }
        var tokens = [[UInt8]?](repeating: nil, count: maxID + 1)
        for (key, id) in vocab { tokens[id] = key.bytes }
        self.vocab = vocab
        self.tokens = tokens

        func optionalString(_ key: String) throws -> String? {
            guard let v = json[key], !v.isNull else { return nil }
            guard let s = v.string else { throw fail("model.\(key)", "expected a string or null") }
            return s
        }
        prefix = Array((try optionalString("continuing_subword_prefix") ?? "").utf8)
        suffix = Array((try optionalString("end_of_word_suffix") ?? "").utf8)
        fuseUnk = json["fuse_unk"]?.bool ?? false
        byteFallback = json["byte_fallback"]?.bool ?? false
        ignoreMerges = json["ignore_merges"]?.bool ?? false
        if let unk = try optionalString("unk_token") {
            // tokenizers only fails when an unknown character actually needs the unk token; we resolve it once.
            unkID = vocab[ByteString(unk)]
        } else {
            unkID = nil
        }

        // Merges: ["a b", ...] (older files) or [["a", "b"], ...].
        guard let mergeList = json["merges"]?.array else { throw fail("model.merges", "expected an array of merges") }
        var merges: [UInt64: UInt64] = [:]
        merges.reserveCapacity(mergeList.count)
        for (rank, entry) in mergeList.enumerated() {
            let left: String, right: String
            if let s = entry.string {
                // Split on the space byte, not on Characters: a space followed by a combining mark is one Character.
                let parts = Array(s.utf8).split(separator: 0x20, omittingEmptySubsequences: false)
                guard parts.count == 2 else { throw fail("model.merges[\(rank)]", "expected \"left right\", got \"\(s)\"") }
                left = String(decoding: parts[0], as: UTF8.self); right = String(decoding: parts[1], as: UTF8.self)
            } else if let a = entry.array, a.count == 2, let l = a[0].string, let r = a[1].string {
                left = l; right = r
            } else {
                throw fail("model.merges[\(rank)]", "expected \"left right\" or [\"left\", \"right\"]")
            }
            guard let leftID = vocab[ByteString(left)] else { throw fail("model.merges[\(rank)]", "token \"\(left)\" is not in the vocab") }
            guard let rightID = vocab[ByteString(right)] else { throw fail("model.merges[\(rank)]", "token \"\(right)\" is not in the vocab") }
            var mergedBytes = Array(left.utf8)
            let rightBytes = Array(right.utf8)
            if !prefix.isEmpty, rightBytes.starts(with: prefix) {
                mergedBytes.append(contentsOf: rightBytes[prefix.count...])
            } else {
                mergedBytes.append(contentsOf: rightBytes)
            }
            guard let mergedID = vocab[ByteString(mergedBytes)] else {
                throw fail("model.merges[\(rank)]", "merged token \"\(String(decoding: mergedBytes, as: UTF8.self))\" is not in the vocab")
            }
            // A repeated pair keeps its last rank, as tokenizers' map does.
            merges[UInt64(leftID) << 32 | UInt64(rightID)] = UInt64(rank) << 32 | UInt64(mergedID)
        }
        self.merges = merges

        var small = [Int32](repeating: -1, count: 0x800)
        for v in 0..<0x800 {
            if let id = vocab[ByteString(UnicodeText.utf8(UInt32(v)))] { small[v] = Int32(id) }
        }
        smallScalarIDs = small
        var bytesIDs = [Int32](repeating: -1, count: 256)
        let hex = Array("0123456789ABCDEF".utf8)
        for b in 0..<256 {
            let name: [UInt8] = Array("<0x".utf8) + [hex[b >> 4], hex[b & 15], UInt8(ascii: ">")]
            if let id = vocab[ByteString(name)] { bytesIDs[b] = Int32(id) }
        }
        byteTokenIDs = bytesIDs
    }

    // MARK: - Tokenizing

    /// Appends the ids of one word (UTF-8 bytes of the pre-tokenized piece).
    func tokenize(_ word: [UInt8], into out: inout [Int]) {
        if word.isEmpty { return }
        if ignoreMerges, let id = vocab[ByteString(word)] {
            out.append(id)
            return
        }
        let cacheable = word.count <= Self.maxCachedWordLength
        let key = ByteString(word)
        if cacheable, let hit = cacheLock.withLock({ cache[key] }) {
            for id in hit { out.append(Int(id)) }
            return
        }
        var symbols = initialSymbols(word)
        if symbols.count > 1 {
            if symbols.count <= 64 { mergeSmall(&symbols) } else { mergeWithHeap(&symbols) }
        }
        for id in symbols { out.append(Int(id)) }
        if cacheable {
            cacheLock.withLock {
                if cache.count < Self.cacheCapacity { cache[key] = symbols }
            }
        }
    }

    /// The symbols of a word before merging (tokenizers' `merge_word` up to `merge_all`).
    func initialSymbols(_ word: [UInt8]) -> [Int32] {
        var symbols: [Int32] = []
        symbols.reserveCapacity(word.count)
        var pendingUnk: Int32? = nil  // an unk not yet added, so that the next one can fuse with it
        let simple = prefix.isEmpty && suffix.isEmpty
        word.withUnsafeBufferPointer { b in
            var i = 0
            while i < b.count {
                let (v, l) = UnicodeText.scalar(b, i)
                let isFirst = i == 0
                let isLast = i + l >= b.count
                var id: Int32 = -1
                var piece: [UInt8] = []
                if simple && v < 0x800 {
                    id = smallScalarIDs[Int(v)]
                } else {
                    piece = Array(b[i..<(i + l)])
                    if !isFirst && !prefix.isEmpty { piece = prefix + piece }
                    if isLast && !suffix.isEmpty { piece += suffix }
                    if let found = vocab[ByteString(piece)] { id = Int32(found) }
                }
                if id >= 0 {
                    if let unk = pendingUnk { symbols.append(unk); pendingUnk = nil }
                    symbols.append(id)
                    i += l
                    continue
                }
                if piece.isEmpty { piece = Array(b[i..<(i + l)]) }
                i += l
                if byteFallback {
                    let ids = piece.map { byteTokenIDs[Int($0)] }
                    if !ids.contains(-1) {
                        // As in tokenizers, a pending unk is not flushed before byte tokens.
                        symbols.append(contentsOf: ids)
                        continue
                    }
                }
                if let unkID {
                    if let unk = pendingUnk, !fuseUnk { symbols.append(unk) }
                    pendingUnk = Int32(unkID)
                }
            }
        }
        if let unk = pendingUnk { symbols.append(unk) }
        return symbols
    }

    @inline(__always)
    private func merge(_ a: Int32, _ b: Int32) -> UInt64? {
        merges[UInt64(UInt32(bitPattern: a)) << 32 | UInt64(UInt32(bitPattern: b))]
    }

    /// Merging for short words: keep the rank of every adjacent pair, merge the lowest (leftmost on ties).
    func mergeSmall(_ symbols: inout [Int32]) {
        let none = UInt64.max
        var ranks = [UInt64](repeating: none, count: symbols.count - 1)  // rank << 32 | merged id
        for k in 0..<(symbols.count - 1) { ranks[k] = merge(symbols[k], symbols[k + 1]) ?? none }
        while !ranks.isEmpty {
            // Packed rank-then-id order: the lowest rank wins, the leftmost among equal ones.
            var best = none, pos = -1
            for k in 0..<ranks.count where ranks[k] < best { best = ranks[k]; pos = k }
            if pos < 0 { break }
            symbols[pos] = Int32(truncatingIfNeeded: best & 0xFFFF_FFFF)
            symbols.remove(at: pos + 1)
            ranks.remove(at: pos)
            if pos > 0 { ranks[pos - 1] = merge(symbols[pos - 1], symbols[pos]) ?? none }
            if pos < ranks.count { ranks[pos] = merge(symbols[pos], symbols[pos + 1]) ?? none }
        }
    }

    /// Merging for long words (a whole sentence when there is no pre-tokenizer): a priority queue of
    /// (rank, position) over a linked list of symbols, as tokenizers' `Word::merge_all`.
    func mergeWithHeap(_ symbols: inout [Int32]) {
        let n = symbols.count
        var prev = [Int](repeating: -1, count: n)
        var next = [Int](repeating: -1, count: n)
        var alive = [Bool](repeating: true, count: n)
        for k in 0..<n { prev[k] = k - 1; next[k] = k + 1 < n ? k + 1 : -1 }
        var heap = MinHeap()
        for k in 0..<(n - 1) {
            if let m = merge(symbols[k], symbols[k + 1]) { heap.push((m & 0xFFFF_FFFF_0000_0000) | UInt64(k)) }
        }
        while let top = heap.pop() {
            let rank = top >> 32
            let pos = Int(top & 0xFFFF_FFFF)
            guard alive[pos], next[pos] >= 0 else { continue }
            let right = next[pos]
            // Skip entries whose pair has changed since they were queued.
            guard let m = merge(symbols[pos], symbols[right]), m >> 32 == rank else { continue }
            symbols[pos] = Int32(truncatingIfNeeded: m & 0xFFFF_FFFF)
            alive[right] = false
            next[pos] = next[right]
            if next[right] >= 0 { prev[next[right]] = pos }
            if prev[pos] >= 0, let m2 = merge(symbols[prev[pos]], symbols[pos]) {
                heap.push((m2 & 0xFFFF_FFFF_0000_0000) | UInt64(prev[pos]))
            }
            if next[pos] >= 0, let m2 = merge(symbols[pos], symbols[next[pos]]) {
                heap.push((m2 & 0xFFFF_FFFF_0000_0000) | UInt64(pos))
            }
        }
        var out: [Int32] = []
        out.reserveCapacity(n)
        var k = 0
        while k >= 0 { out.append(symbols[k]); k = next[k] }
        symbols = out
    }
}

/// A binary min-heap of packed (rank << 32 | position) keys.
struct MinHeap {
    private var items: [UInt64] = []

    mutating func push(_ x: UInt64) {
        items.append(x)
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            if items[p] <= items[i] { break }
            items.swapAt(p, i)
            i = p
        }
    }

    mutating func pop() -> UInt64? {
        guard let first = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count && items[l] < items[m] { m = l }
                if r < items.count && items[r] < items[m] { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return first
    }
}
