// A Hugging Face tokenizer loaded from tokenizer.json (+ tokenizer_config.json), giving the same ids as
// the Python `tokenizers` library.
//
// Encoding: added/special tokens are cut out of the raw text → the other pieces are normalized →
// pre-tokenized into words → each word is BPE-encoded → (optionally) special tokens are added around.
// Decoding: ids → token strings (skipping special ones on request) → the decoder chain → text.
//
// Supported: the BPE model (byte-level as in GPT-2 / Llama 3 / SmolLM, and SentencePiece-style with
// byte fallback as in Llama 2 / Mistral) and the normalizers, pre-tokenizers, decoders and
// post-processors listed in their files. Anything else is refused at load time with a FileFormatError.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

public final class Tokenizer: @unchecked Sendable {
    /// The file or folder the tokenizer came from (for messages).
    public let source: String
    let model: BPEModel
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let decoder: TokenDecoder?
    let postProcessor: PostProcessor?
    let addedVocabulary: AddedVocabulary
    private let addedByContent: [ByteString: Int]

    /// Special token strings from tokenizer_config.json (the model's `unk_token` when the config has none).
    public let bosToken: String?
    public let eosToken: String?
    public let padToken: String?
    public let unkToken: String?
    public let bosTokenID: Int?
    public let eosTokenID: Int?
    public let padTokenID: Int?
    public let unkTokenID: Int?
    /// `add_bos_token` / `add_eos_token` from tokenizer_config.json, when given.
    public let addBOSToken: Bool?
    public let addEOSToken: Bool?
    /// Ids of the added tokens marked special, plus the bos / eos / pad / unk ids.
    public let specialTokenIDs: Set<Int>
    /// One more than the largest id of the vocab and the added tokens.
    public let vocabularySize: Int
    /// The parsed tokenizer_config.json, when there was one (e.g. for its "chat_template").
    public let config: JSONValue?
    /// The "added_tokens" entries, in file order.
    public var addedTokens: [AddedToken] { addedVocabulary.tokens }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a folder. A path to a
    /// tokenizer.json file itself is accepted too (the config is then looked for beside it).
    public convenience init(directory: String) throws {
        var folder = directory
        var path = directory + "/tokenizer.json"
        if !FileSystem.isDirectory(directory) && FileSystem.exists(directory) {
            path = directory
            if let slash = directory.lastIndex(of: "/") { folder = String(directory[..<slash]) } else { folder = "." }
        }
        guard FileSystem.exists(path) else {
            throw FileFormatError(file: directory, place: "folder", "no tokenizer.json in this folder")
        }
        let json = try Self.readJSON(path)
        let configPath = folder + "/tokenizer_config.json"
        let config = FileSystem.exists(configPath) ? try Self.readJSON(configPath) : nil
        try self.init(json: json, config: config, source: path)
    }

    private static func readJSON(_ path: String) throws -> JSONValue {
        let bytes = try FileSystem.readFile(path)
        do {
            return try JSONValue.parse(bytes: bytes)
        } catch let e as JSONParseError {
            throw FileFormatError(file: path, place: "byte \(e.offset)", "invalid JSON: \(e.message)")
        }
    }

    /// Builds a tokenizer from a parsed tokenizer.json and an optional parsed tokenizer_config.json.
    /// - Parameter source: the file name to use in error messages.
    public init(json: JSONValue, config: JSONValue?, source: String) throws {
        self.source = source
        self.config = config
        func fail(_ place: String, _ message: String) -> FileFormatError {
            FileFormatError(file: source, place: place, message)
        }
        guard json.object != nil else { throw fail("top level", "expected a JSON object") }
        guard let modelJSON = json["model"], modelJSON.object != nil else {
            throw fail("model", "missing \"model\" (a tokenizer.json needs a model object)")
        }
        let type = modelJSON["type"]?.string ?? (modelJSON["merges"] != nil ? "BPE" : "")
        guard type == "BPE" else {
            throw fail("model.type", type.isEmpty ? "missing model type" : "unsupported model type \"\(type)\" (only BPE is supported)")
        }
        let model = try BPEModel(json: modelJSON, file: source)
        self.model = model

        func optional<T>(_ key: String, _ make: (JSONValue) throws -> T) throws -> T? {
            guard let v = json[key], !v.isNull else { return nil }
            return try make(v)
        }
        normalizer = try optional("normalizer") { try Normalizer(json: $0, file: source, place: "normalizer") }
        preTokenizer = try optional("pre_tokenizer") { try PreTokenizer(json: $0, file: source, place: "pre_tokenizer") }
        decoder = try optional("decoder") { try TokenDecoder(json: $0, file: source, place: "decoder") }
        postProcessor = try optional("post_processor") { try PostProcessor(json: $0, file: source, place: "post_processor") }

        var added: [AddedToken] = []
        if let list = json["added_tokens"], !list.isNull {
            guard let array = list.array else { throw fail("added_tokens", "expected an array") }
            for (i, entry) in array.enumerated() {
                guard let id = entry["id"]?.int, id >= 0, id < BPEModel.maxTokenID, let content = entry["content"]?.string else {
                    throw fail("added_tokens[\(i)]", "expected an object with \"id\" (0 to \(BPEModel.maxTokenID - 1)) and \"content\"")
                }
                guard !content.isEmpty else { throw fail("added_tokens[\(i)]", "empty token content") }
                added.append(AddedToken(
                    id: id, content: content, special: entry["special"]?.bool ?? false,
                    singleWord: entry["single_word"]?.bool ?? false, lstrip: entry["lstrip"]?.bool ?? false,
                    rstrip: entry["rstrip"]?.bool ?? false, normalized: entry["normalized"]?.bool ?? !(entry["special"]?.bool ?? false)))
            }
        }
        addedVocabulary = AddedVocabulary(tokens: added, normalizer: normalizer)
        var byContent: [ByteString: Int] = [:]
        for t in added where byContent[ByteString(t.content)] == nil { byContent[ByteString(t.content)] = t.id }
        addedByContent = byContent
        vocabularySize = max(model.tokens.count, (added.map(\.id).max() ?? -1) + 1)

        // Special tokens: a string, or an AddedToken-like object {"content": ...}.
        func configToken(_ key: String) throws -> String? {
            guard let v = config?[key], !v.isNull else { return nil }
            if let s = v.string { return s }
            if let s = v["content"]?.string { return s }
            throw FileFormatError(file: source, place: "tokenizer_config.json \(key)", "expected a string or {\"content\": ...}")
        }
        func lookup(_ token: String?) -> Int? {
            guard let token else { return nil }
            let key = ByteString(token)
            return byContent[key] ?? model.vocab[key]
        }
        bosToken = try configToken("bos_token")
        eosToken = try configToken("eos_token")
        padToken = try configToken("pad_token")
        let unk = try configToken("unk_token")
        unkToken = unk ?? modelJSON["unk_token"]?.string
        bosTokenID = lookup(bosToken)
        eosTokenID = lookup(eosToken)
        padTokenID = lookup(padToken)
        unkTokenID = lookup(unkToken)
        addBOSToken = config?["add_bos_token"]?.bool
        addEOSToken = config?["add_eos_token"]?.bool
        var special = Set(added.filter(\.special).map(\.id))
        for id in [bosTokenID, eosTokenID, padTokenID, unkTokenID].compactMap({ $0 }) { special.insert(id) }
        specialTokenIDs = special
    }

    // MARK: - Encoding

    /// The ids of `text`. With `addSpecialTokens`, the bos/eos tokens are added as tokenizer_config.json's
    /// `add_bos_token` / `add_eos_token` say when it gives either, else as the post-processor says.
    public func encode(_ text: String, addSpecialTokens: Bool = false) -> [Int] {
        var ids: [Int] = []
        ids.reserveCapacity(text.utf8.count / 3 + 4)
        for segment in addedVocabulary.split(Array(text.utf8), normalizer: normalizer) {
            switch segment {
            case .token(let id):
                ids.append(id)
            case .text(let piece):
                if let preTokenizer {
                    for word in preTokenizer.apply([piece]) { model.tokenize(word.bytes, into: &ids) }
                } else {
                    model.tokenize(piece.bytes, into: &ids)
                }
            }
        }
        guard addSpecialTokens else { return ids }
        if addBOSToken != nil || addEOSToken != nil {
            var out: [Int] = []
            if addBOSToken == true, let bos = bosTokenID { out.append(bos) }
            out += ids
            if addEOSToken == true, let eos = eosTokenID { out.append(eos) }
            return out
        }
        return postProcessor?.apply(ids) ?? ids
    }

    // MARK: - Decoding

    /// The text of `ids`. Unknown ids are left out, as tokenizers does.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        String(decoding: decodeBytes(ids, skipSpecialTokens: skipSpecialTokens), as: UTF8.self)
    }

    func decodeBytes(_ ids: [Int], skipSpecialTokens: Bool) -> [UInt8] {
        var tokens: [[UInt8]] = []
        tokens.reserveCapacity(ids.count)
        for id in ids {
            if skipSpecialTokens && specialTokenIDs.contains(id) { continue }
            if let bytes = tokenBytes(id) { tokens.append(bytes) }
        }
        guard let decoder else {
            // No decoder: tokens joined by spaces.
            return Array(tokens.map { String(decoding: $0, as: UTF8.self) }.joined(separator: " ").utf8)
        }
        return decoder.decodeChain(tokens).flatMap { $0 }
    }

    private func tokenBytes(_ id: Int) -> [UInt8]? {
        if let t = addedVocabulary.decodeForms[id] { return t }
        guard id >= 0, id < model.tokens.count else { return nil }
        return model.tokens[id]
    }

    // MARK: - Lookups

    /// The id of a token string (an added token or a vocab entry), compared byte for byte.
    public func id(forToken token: String) -> Int? {
        let key = ByteString(token)
        return addedByContent[key] ?? model.vocab[key]
    }

    /// The token string of an id, or nil for an id that is not in the vocab. An added token with
    /// `normalized: true` gives its normalized form, as tokenizers' `id_to_token` does.
    public func token(forID id: Int) -> String? {
        tokenBytes(id).map { String(decoding: $0, as: UTF8.self) }
    }
}
