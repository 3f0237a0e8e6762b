// tokenizer.json, tokenizer_config.json and chat_template.jinja from a GGUF file's tokenizer metadata.
//
// GGUF keys read:
//   tokenizer.ggml.model       "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE with byte fallback)
//   tokenizer.ggml.pre         pre-tokenizer name ("smollm", "llama-bpe", ...)
//   tokenizer.ggml.tokens      the vocabulary, id order
//   tokenizer.ggml.token_type  1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
//   tokenizer.ggml.merges      "left right" strings, rank order (gpt2)
//   tokenizer.ggml.scores      piece scores (llama): merges are ranked by the score of the merged piece
//   tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token, add_space_prefix
//   tokenizer.chat_template
// The output follows what transformers writes when it loads the same GGUF (Tests/Fixtures/smollm2-tokenizer):
// control and unknown tokens become special added tokens, user-defined tokens non-special added tokens.

/// The tokenizer files of an HF folder, built from GGUF metadata.
public struct GGUFTokenizerExport {
    public let tokenizerJSON: JSONValue
    public let tokenizerConfigJSON: JSONValue
    public let chatTemplate: String?

    public init(_ file: GGUFFile) throws {
        let model = try file.required("tokenizer.ggml.model", "a string", \.string)
        let tokens = try file.required("tokenizer.ggml.tokens", "an array of strings", \.strings)
        guard !tokens.isEmpty else { throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.tokens"), "empty vocabulary") }
        var types = [Int](repeating: 1, count: tokens.count)
        if file["tokenizer.ggml.token_type"] != nil {
            types = try file.required("tokenizer.ggml.token_type", "an array of integers", \.ints)
            guard types.count == tokens.count else {
                throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.token_type"),
                                      "\(types.count) token types for \(tokens.count) tokens")
            }
        }
        func tokenID(_ key: String) throws -> Int? {
            guard let value = file[key] else { return nil }
            guard let id = value.int, id >= 0, id < tokens.count else {
                throw FileFormatError(file: file.path, place: file.place(ofKey: key), "expected a token id below \(tokens.count), got \(value)")
            }
            return id
        }
        let bos = try tokenID("tokenizer.ggml.bos_token_id")
        let eos = try tokenID("tokenizer.ggml.eos_token_id")
        let unk = try tokenID("tokenizer.ggml.unknown_token_id")
        let pad = try tokenID("tokenizer.ggml.padding_token_id")
        let addBOS = file["tokenizer.ggml.add_bos_token"]?.bool ?? (model == "llama")
        let addEOS = file["tokenizer.ggml.add_eos_token"]?.bool ?? false

        var tokenizer = JSONObject()
        tokenizer["version"] = .string("1.0")
        tokenizer["truncation"] = .null
        tokenizer["padding"] = .null
        tokenizer["added_tokens"] = .array(Self.addedTokens(tokens: tokens, types: types, unk: unk))

        let vocab = JSONObject(tokens.enumerated().map { ($0.element, JSONValue.int(Int64($0.offset))) })
        guard vocab.count == tokens.count else {
            throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.tokens"), "the vocabulary holds duplicate tokens")
        }
        var bpe = JSONObject()
        bpe["type"] = .string("BPE")
        bpe["dropout"] = .null

        switch model {
        case "gpt2":
            let merges = try file.required("tokenizer.ggml.merges", "an array of strings", \.strings)
            var pairs: [JSONValue] = []
            pairs.reserveCapacity(merges.count)
            for (i, merge) in merges.enumerated() {
                let parts = merge.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
                    throw FileFormatError(file: file.path, place: "\(file.place(ofKey: "tokenizer.ggml.merges")), element \(i)",
                                          "merge '\(merge)' is not two tokens separated by one space")
                }
                pairs.append(.array([.string(String(parts[0])), .string(String(parts[1]))]))
            }
            tokenizer["normalizer"] = .null
            tokenizer["pre_tokenizer"] = Self.byteLevelPreTokenizer(pre: file["tokenizer.ggml.pre"]?.string,
                                                                    addPrefixSpace: file["tokenizer.ggml.add_space_prefix"]?.bool ?? false)
            tokenizer["post_processor"] = Self.templateProcessing(tokens: tokens, bos: addBOS ? bos : nil, eos: addEOS ? eos : nil)
            tokenizer["decoder"] = .object(JSONObject([
                ("type", .string("ByteLevel")), ("add_prefix_space", .bool(true)),
                ("trim_offsets", .bool(true)), ("use_regex", .bool(true)),
            ]))
            bpe["unk_token"] = .null
            bpe["continuing_subword_prefix"] = .string("")
            bpe["end_of_word_suffix"] = .string("")
            bpe["fuse_unk"] = .bool(false)
            bpe["byte_fallback"] = .bool(false)
            bpe["ignore_merges"] = .bool(false)
            bpe["vocab"] = .object(vocab)
            bpe["merges"] = .array(pairs)

        case "llama":
            let scores = try file.required("tokenizer.ggml.scores", "an array of numbers", \.floats)
            guard scores.count == tokens.count else {
                throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.scores"), "\(scores.count) scores for \(tokens.count) tokens")
            }
            let addSpacePrefix = file["tokenizer.ggml.add_space_prefix"]?.bool ?? true
            var normalizers: [JSONValue] = []
            if addSpacePrefix { normalizers.append(.object(JSONObject([("type", .string("Prepend")), ("prepend", .string("▁"))]))) }
            normalizers.append(.object(JSONObject([("type", .string("Replace")), ("pattern", .object(JSONObject([("String", .string(" "))]))), ("content", .string("▁"))])))
            tokenizer["normalizer"] = .object(JSONObject([("type", .string("Sequence")), ("normalizers", .array(normalizers))]))
            tokenizer["pre_tokenizer"] = .null
            tokenizer["post_processor"] = Self.templateProcessing(tokens: tokens, bos: addBOS ? bos : nil, eos: addEOS ? eos : nil)
            var decoders: [JSONValue] = [
                .object(JSONObject([("type", .string("Replace")), ("pattern", .object(JSONObject([("String", .string("▁"))]))), ("content", .string(" "))])),
                .object(JSONObject([("type", .string("ByteFallback"))])),
                .object(JSONObject([("type", .string("Fuse"))])),
            ]
            if addSpacePrefix {
                decoders.append(.object(JSONObject([("type", .string("Strip")), ("content", .string(" ")), ("start", .int(1)), ("stop", .int(0))])))
            }
            tokenizer["decoder"] = .object(JSONObject([("type", .string("Sequence")), ("decoders", .array(decoders))]))
            bpe["unk_token"] = unk.map { .string(tokens[$0]) } ?? .null
            bpe["continuing_subword_prefix"] = .null
            bpe["end_of_word_suffix"] = .null
            bpe["fuse_unk"] = .bool(true)
            bpe["byte_fallback"] = .bool(true)
            bpe["ignore_merges"] = .bool(false)
            bpe["vocab"] = .object(vocab)
            bpe["merges"] = .array(Self.mergesFromScores(tokens: tokens, types: types, scores: scores)
                .map { .array([.string($0.0), .string($0.1)]) })

        default:
            throw FileFormatError(file: file.path, place: file.place(ofKey: "tokenizer.ggml.model"),
                                  "tokenizer model '\(model)' is not supported; expected 'gpt2' or 'llama'")
        }
        tokenizer["model"] = .object(bpe)
        tokenizerJSON = .object(tokenizer)

        chatTemplate = file["tokenizer.chat_template"]?.string
        var config = JSONObject()
        if addBOS { config["add_bos_token"] = .bool(true) }
        if addEOS { config["add_eos_token"] = .bool(true) }
        config["backend"] = .string("tokenizers")
        if let bos { config["bos_token"] = .string(tokens[bos]) }
        if let chatTemplate { config["chat_template"] = .string(chatTemplate) }
        if let eos { config["eos_token"] = .string(tokens[eos]) }
        if let context = file["\(file["general.architecture"]?.string ?? "llama").context_length"]?.int {
            config["model_max_length"] = .int(Int64(context))
        }
        if let pad { config["pad_token"] = .string(tokens[pad]) }
        config["tokenizer_class"] = .string("TokenizersBackend")
        if let unk { config["unk_token"] = .string(tokens[unk]) }
        tokenizerConfigJSON = .object(config)
    }

    /// Writes tokenizer.json, tokenizer_config.json and (when there is a template) chat_template.jinja.
    public func write(to directory: String) throws {
        if let chatTemplate { try FileSystem.writeAtomically(directory + "/chat_template.jinja", text: chatTemplate) }
        try FileSystem.writeAtomically(directory + "/tokenizer_config.json", text: GGUFConverter.pythonJSON(tokenizerConfigJSON))
        try FileSystem.writeAtomically(directory + "/tokenizer.json",
                                       text: tokenizerJSON.serialized(.init(indent: 2)) + "\n")
    }

    // MARK: - Pieces

    /// Token types of llama.cpp's vocabulary.
    enum TokenType: Int { case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6 }

    static func addedTokens(tokens: [String], types: [Int], unk: Int?) -> [JSONValue] {
        var out: [JSONValue] = []
        for (id, token) in tokens.enumerated() {
            let type = TokenType(rawValue: types[id])
            let special: Bool
            switch type {
            case .control?, .unknown?: special = true
            case .userDefined?: special = false
            default:
                guard id == unk else { continue }
                special = true
            }
            out.append(.object(JSONObject([
                ("id", .int(Int64(id))), ("content", .string(token)), ("single_word", .bool(false)),
                ("lstrip", .bool(false)), ("rstrip", .bool(false)), ("normalized", .bool(!special)), ("special", .bool(special)),
            ])))
        }
        return out
    }

    /// The pre-tokenizer of a byte-level BPE vocabulary. Llama 3's splits with its own regex first; the others
    /// (gpt2, smollm, ...) use the GPT-2 regex built into ByteLevel, as transformers does for them.
    static func byteLevelPreTokenizer(pre: String?, addPrefixSpace: Bool) -> JSONValue {
        switch pre {
        case "llama-bpe"?, "llama3"?, "llama-v3"?:
            let regex = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
            return .object(JSONObject([
                ("type", .string("Sequence")),
                ("pretokenizers", .array([
                    .object(JSONObject([("type", .string("Split")), ("pattern", .object(JSONObject([("Regex", .string(regex))]))),
                                        ("behavior", .string("Isolated")), ("invert", .bool(false))])),
                    .object(JSONObject([("type", .string("ByteLevel")), ("add_prefix_space", .bool(addPrefixSpace)),
                                        ("trim_offsets", .bool(true)), ("use_regex", .bool(false))])),
                ])),
            ]))
        default:
            return .object(JSONObject([
                ("type", .string("ByteLevel")), ("add_prefix_space", .bool(addPrefixSpace)),
                ("trim_offsets", .bool(true)), ("use_regex", .bool(true)),
            ]))
        }
    }

    /// TemplateProcessing that adds `bos` before (and `eos` after) each sequence; with neither, it adds nothing.
    static func templateProcessing(tokens: [String], bos: Int?, eos: Int?) -> JSONValue {
        func special(_ id: Int, _ typeID: Int) -> JSONValue {
            .object(JSONObject([("SpecialToken", .object(JSONObject([("id", .string(tokens[id])), ("type_id", .int(Int64(typeID)))])))]))
        }
        func sequence(_ name: String, _ typeID: Int) -> JSONValue {
            .object(JSONObject([("Sequence", .object(JSONObject([("id", .string(name)), ("type_id", .int(Int64(typeID)))])))]))
        }
        var single: [JSONValue] = [], pair: [JSONValue] = []
        if let bos { single.append(special(bos, 0)) }
        single.append(sequence("A", 0))
        if let eos { single.append(special(eos, 0)) }
        if let bos { pair.append(special(bos, 0)) }
        pair.append(sequence("A", 0))
        if let eos { pair.append(special(eos, 0)) }
        if let bos { pair.append(special(bos, 1)) }
        pair.append(sequence("B", 1))
        if let eos { pair.append(special(eos, 1)) }
        var specials = JSONObject()
        for id in [bos, eos].compactMap({ $0 }) {
            specials[tokens[id]] = .object(JSONObject([("id", .string(tokens[id])), ("ids", .array([.int(Int64(id))])),
                                                       ("tokens", .array([.string(tokens[id])]))]))
        }
        return .object(JSONObject([("type", .string("TemplateProcessing")), ("single", .array(single)),
                                   ("pair", .array(pair)), ("special_tokens", .object(specials))]))
    }

    /// SentencePiece BPE merges recovered from piece scores: every split of a normal piece into two vocabulary
    /// pieces is a merge, ranked by the merged piece's score (higher first), ties by the piece's id, then the left and right ids.
    static func mergesFromScores(tokens: [String], types: [Int], scores: [Float]) -> [(String, String)] {
        var ids: [String: Int] = [:]
        for (i, t) in tokens.enumerated() where ids[t] == nil { ids[t] = i }
        var merges: [(left: String, right: String, score: Float, pieceID: Int, leftID: Int, rightID: Int)] = []
        for (id, piece) in tokens.enumerated() {
            guard TokenType(rawValue: types[id]) == .normal || TokenType(rawValue: types[id]) == .userDefined else { continue }
            let chars = Array(piece)
            guard chars.count > 1 else { continue }
            for cut in 1..<chars.count {
                let left = String(chars[..<cut]), right = String(chars[cut...])
                if let l = ids[left], let r = ids[right] {
                    merges.append((left, right, scores[id], id, l, r))
                }
            }
        }
        merges.sort { a, b in
            if a.score != b.score { return a.score > b.score }
            if a.pieceID != b.pieceID { return a.pieceID < b.pieceID }
            if a.leftID != b.leftID { return a.leftID < b.leftID }
            return a.rightID < b.rightID
        }
        return merges.map { ($0.left, $0.right) }
    }
}
