// The tokenizer.* keys of a GGUF export as llama.cpp's convert_hf_to_gguf.py writes them for each family (its
// set_vocab), beyond the tokenizer.json reading of GGUFTokenizerMetadata (HFToGGUF.swift):
//
//   family   llama.cpp's set_vocab                                what we read
//   gemma2   _set_vocab_sentencepiece, add_space_prefix = false    tokenizer.model (without it llama.cpp fails; we read
//                                                                  tokenizer.json as a SentencePiece-style BPE)
//   gemma3   the same when tokenizer.model is there, else gpt2     tokenizer.model, else tokenizer.json
//   phi3     its own SentencePiece reading, or _set_vocab_gpt2     tokenizer_class GPT2Tokenizer (Phi-4-mini): tokenizer.json;
//            when tokenizer_config.json names GPT2Tokenizer        else tokenizer.model, else tokenizer.json
//   qwen3    _set_vocab_sentencepiece, else _set_vocab_gpt2        tokenizer.model if there, else tokenizer.json (gpt2)
//
// SentencePiece vocabulary (tokenizer.ggml.model "llama", pre "default"), one entry per id below config.json's
// vocab_size; ids no piece has are "[PAD<id>]" with score -10000 and type UNUSED (5):
//   _set_vocab_sentencepiece: each piece with its score and type (UNKNOWN 2, CONTROL 3, UNUSED 5, BYTE 6, all others
//     NORMAL 1: a user-defined piece stays NORMAL); then added_tokens.json (ids below vocab_size) as USER_DEFINED (4)
//     with score -1000; then tokenizer_config.json's added_tokens_decoder (ids below vocab_size): CONTROL when marked
//     special or when it looks special (<pad>, <mask>, <|...|>, <unused...>, ...), else USER_DEFINED with "▁" written
//     as " "; score -1000.
//   Phi-3: pieces as above; added_tokens.json the same; then tokenizer_config.json's added_tokens_decoder and then
//     tokenizer.json's added_tokens: USER_DEFINED, or CONTROL when marked special (no look-special test, no "▁"
//     rewriting), score -1000.
// Special tokens, add_*_token and the chat template: gguf-py's SpecialVocab (specialVocab below), with the vocabulary
// size as its bound for the SentencePiece paths.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension GGUFTokenizerMetadata {
    /// Which vocabulary reader llama.cpp's converter uses for a family's folder.
    enum VocabularySource: Equatable {
        /// tokenizer.json (GGUFTokenizerMetadata's own reading: gpt2 for byte-level BPE, llama for SentencePiece-style).
        case tokenizerJSON
        /// tokenizer.model, by TextModel._create_vocab_sentencepiece's rules (Gemma 2/3, Qwen3).
        case sentencePiece
        /// tokenizer.model, by Phi3MiniModel.set_vocab's rules.
        case phi3SentencePiece
    }

    /// The reader llama.cpp's converter picks for `family` in `directory`.
    static func vocabularySource(family: GGUFFamily, directory: String, tokenizerConfig: JSONValue?) -> VocabularySource {
        let hasModel = FileSystem.exists(directory + "/tokenizer.model")
        switch family {
        case .gemma2, .gemma3, .qwen3:
            return hasModel ? .sentencePiece : .tokenizerJSON
        case .phi3:
            if tokenizerConfig?["tokenizer_class"]?.string == "GPT2Tokenizer" { return .tokenizerJSON }
            return hasModel ? .phi3SentencePiece : .tokenizerJSON
        }
    }

    /// The tokenizer keys of a folder for a family's GGUF, read as llama.cpp's converter reads them.
    init(family: GGUFFamily, directory: String, vocabularySize: Int, log: (String) -> Void) throws {
        let tokenizerConfig = try Self.parseIfPresent(directory + "/tokenizer_config.json")
        switch Self.vocabularySource(family: family, directory: directory, tokenizerConfig: tokenizerConfig) {
        case .tokenizerJSON:
            try self.init(directory: directory, vocabularySize: vocabularySize, log: log)
        case .sentencePiece:
            try self.init(sentencePieceIn: directory, vocabularySize: vocabularySize, phi3: false)
        case .phi3SentencePiece:
            try self.init(sentencePieceIn: directory, vocabularySize: vocabularySize, phi3: true)
        }
        if family.isGemma && model == "llama" {
            // Gemma's converters write add_space_prefix = false last: its tokenizer puts no space in front of a text,
            // and llama.cpp's SentencePiece default would.
            entries.removeAll { $0.key == "tokenizer.ggml.add_space_prefix" }
            entries.append(("tokenizer.ggml.add_space_prefix", .bool(false)))
        }
    }

    static func parseIfPresent(_ path: String) throws -> JSONValue? {
        guard FileSystem.exists(path) else { return nil }
        do { return try JSONValue.parse(bytes: try FileSystem.readFile(path)) } catch let e as JSONParseError {
            throw FileFormatError(file: path, place: "JSON", e.description)
        }
    }

    /// A SentencePiece vocabulary from tokenizer.model (see the header for the two rule sets).
    init(sentencePieceIn directory: String, vocabularySize: Int, phi3: Bool) throws {
        let modelPath = directory + "/tokenizer.model"
        let sp = try SentencePieceModel(path: modelPath)
        if phi3 && sp.pieces.count > vocabularySize {
            // llama.cpp's Phi-3 reader has no bound here and fails; say what is wrong instead.
            throw FileFormatError(file: modelPath, place: "ModelProto.pieces",
                                  "\(sp.pieces.count) pieces, more than config.json's vocab_size \(vocabularySize)")
        }
        var tokens = (0..<vocabularySize).map { "[PAD\($0)]" }
        var scores = [Float](repeating: -10000, count: vocabularySize)
        var types = [TokenType](repeating: .unused, count: vocabularySize)
        for (id, piece) in sp.pieces.enumerated() where id < vocabularySize {
            tokens[id] = piece.text
            scores[id] = piece.score
            switch piece.type {
            case .unknown: types[id] = .unknown
            case .control: types[id] = .control
            case .unused: types[id] = .unused
            case .byte: types[id] = .byte
            case .normal, .userDefined: types[id] = .normal
            }
        }
        let addedPath = directory + "/added_tokens.json"
        if let added = try Self.parseIfPresent(addedPath) {
            guard let object = added.object else { throw FileFormatError(file: addedPath, place: "top level", "expected an object of token: id") }
            for (token, value) in object {
                guard let id = value.int, id >= 0 else { throw FileFormatError(file: addedPath, place: "'\(token)'", "expected a non-negative id") }
                guard id < vocabularySize else { continue }
                tokens[id] = token
                scores[id] = -1000
                types[id] = .userDefined
            }
        }
        // Added tokens: (where, id, content, special), in the order the converter applies them.
        var added: [(file: String, place: String, id: Int, content: String, special: Bool)] = []
        let configPath = directory + "/tokenizer_config.json"
        let tokenizerConfig = try Self.parseIfPresent(configPath)
        for (key, entry) in tokenizerConfig?["added_tokens_decoder"]?.object ?? JSONObject() {
            let place = "added_tokens_decoder['\(key)']"
            guard let id = Int(key), id >= 0, let content = entry["content"]?.string else {
                throw FileFormatError(file: configPath, place: place, "expected a non-negative id with a content")
            }
            added.append((configPath, place, id, content, entry["special"]?.bool ?? false))
        }
        let jsonPath = directory + "/tokenizer.json"
        let json = try Self.parseIfPresent(jsonPath)
        if phi3 {
            for (i, entry) in (json?["added_tokens"]?.array ?? []).enumerated() {
                guard let id = entry["id"]?.int, id >= 0, let content = entry["content"]?.string else {
                    throw FileFormatError(file: jsonPath, place: "added_tokens[\(i)]", "expected a non-negative id and a content")
                }
                added.append((jsonPath, "added_tokens[\(i)]", id, content, entry["special"]?.bool ?? false))
            }
        }
        for token in added {
            guard token.id < vocabularySize else {
                // The generic reader skips these; Phi-3's would fail on them.
                if phi3 { throw FileFormatError(file: token.file, place: token.place, "id \(token.id) is not below config.json's vocab_size \(vocabularySize)") }
                continue
            }
            var content = token.content
            if phi3 {
                types[token.id] = token.special ? .control : .userDefined
            } else if token.special || Self.looksSpecial(content) {
                types[token.id] = .control
            } else {
                content = content.replacing("\u{2581}", with: " ")
                types[token.id] = .userDefined
            }
            tokens[token.id] = content
            scores[token.id] = -1000
        }

        model = "llama"
        entries = [
            ("tokenizer.ggml.model", .string("llama")),
            ("tokenizer.ggml.pre", .string("default")),
            ("tokenizer.ggml.tokens", .array(.string, tokens.map { .string($0) })),
            ("tokenizer.ggml.scores", .array(.float32, scores.map { .float32($0) })),
            ("tokenizer.ggml.token_type", .array(.int32, types.map { .int32($0.rawValue) })),
        ]
        let modelConfig = try Self.parseIfPresent(directory + "/config.json")
        entries += try Self.specialVocab(tokenizer: json, tokenizerConfig: tokenizerConfig, modelConfig: modelConfig,
                                         directory: directory, vocabularySize: vocabularySize)
    }

    /// gguf-py's SpecialVocab: special token ids (tokenizer_config.json's <kind>_token looked up among tokenizer.json's
    /// added tokens, then config.json's <kind>_token_id, the first found winning, each below `vocabularySize` when
    /// given), add_{bos,eos,sep}_token (from tokenizer.json's post-processor, then tokenizer_config.json's
    /// add_<kind>_token), the chat template, and the normalizer's lowercase / strip-accents flags; in that order.
    static func specialVocab(tokenizer json: JSONValue?, tokenizerConfig: JSONValue?, modelConfig: JSONValue?,
                             directory: String, vocabularySize: Int?) throws -> [(key: String, value: GGUFValue)] {
        var kinds = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"]
        var ids: [(kind: String, id: Int)] = []
        var adds: [(kind: String, value: Bool)] = []
        func setID(_ kind: String, _ id: Int?) {
            guard let id, id >= 0, vocabularySize.map({ id < $0 }) ?? true, !ids.contains(where: { $0.kind == kind }) else { return }
            ids.append((kind, id))
        }
        func setAdd(_ kind: String, _ value: Bool, overwrite: Bool) {
            if let i = adds.firstIndex(where: { $0.kind == kind }) {
                if overwrite { adds[i].value = value }
            } else {
                adds.append((kind, value))
            }
        }
        // tokenizer_config.json's token contents, which the post-processor's reading may change.
        var contents: [String: String] = [:]
        for kind in kinds + ["eot", "eom"] {
            let entry = tokenizerConfig?["\(kind)_token"]
            if let text = entry?.string ?? entry?["content"]?.string { contents[kind] = text }
        }
        let hasConfig = (tokenizerConfig?.object?.count ?? 0) > 0
        func content(_ kind: String) -> String? { contents[kind].flatMap { $0.isEmpty ? nil : $0 } }
        var lowercase: Bool?, stripAccents: Bool?

        if let json {
            if content("bos") == nil, let cls = content("cls"), hasConfig { contents["bos"] = cls }
            if content("eos") == nil, let sep = content("sep"), hasConfig { contents["eos"] = sep }
            let post = json["post_processor"].flatMap { $0 == .null ? nil : $0 }
            for p in post.map({ $0["processors"]?.array ?? [$0] }) ?? [] {
                switch p["type"]?.string {
                case "ByteLevel"?:
                    setAdd("bos", false, overwrite: false)
                    setAdd("eos", false, overwrite: false)
                case "RobertaProcessing"?:
                    for kind in ["bos", "eos", "sep"] { setAdd(kind, true, overwrite: true) }
                    if content("cls") == nil, hasConfig { contents["cls"] = p["cls"]?.array?.first?.string ?? contents["bos"] }
                    if content("sep") == nil, hasConfig { contents["sep"] = p["sep"]?.array?.first?.string ?? contents["eos"] }
                case "TemplateProcessing"?:
                    let single = p["single"]?.array ?? []
                    var pair = p["pair"]?.array ?? []
                    var first: String?, last: String?
                    func specialID(_ item: JSONValue?) -> String? {
                        item?["SpecialToken"]?["id"]?.string.flatMap { $0.isEmpty ? nil : $0 }
                    }
                    if single.count > 1 {
                        if let f = specialID(single.first) {
                            first = f
                            if !hasConfig {
                                contents["bos"] = f
                            } else if f != content("bos") && f != content("cls") {
                                if content("bos") == nil { contents["bos"] = f }
                                if content("cls") == nil { contents["cls"] = f }
                            }
                            setAdd("bos", f == content("bos") || f == content("cls"), overwrite: true)
                        }
                        if let l = specialID(single.last) {
                            last = l
                            if !hasConfig {
                                contents["eos"] = l
                            } else if l != content("eos") {
                                // The old end token becomes the end-of-turn (or end-of-message) token.
                                if !kinds.contains("eot") {
                                    kinds.append("eot"); contents["eot"] = contents["eos"]
                                } else if !kinds.contains("eom") {
                                    kinds.append("eom"); contents["eom"] = contents["eos"]
                                }
                                contents["eos"] = l
                            }
                            setAdd("eos", l == content("eos"), overwrite: true)
                        }
                    }
                    if !pair.isEmpty {
                        if let first, specialID(pair.first) == first { pair.removeFirst() }
                        if let last, !pair.isEmpty, specialID(pair.last) == last { pair.removeLast() }
                        if !pair.isEmpty, pair.first?["Sequence"]?["id"]?.string == "A", pair.last?["Sequence"]?["id"]?.string == "B",
                           pair.count > 2 {
                            let middle = Array(pair.dropFirst().dropLast())
                            let separators = [content("sep"), content("eos")]
                            var addSEP = false
                            if let entry = specialID(middle[0]), separators.contains(entry), last == nil { addSEP = true }
                            if middle.count == 2, let entry = specialID(middle[1]), separators.contains(entry) { addSEP = true }
                            setAdd("sep", addSEP, overwrite: true)
                            if addSEP, content("sep") == nil, hasConfig { contents["sep"] = contents["eos"] }
                        }
                    }
                default: break
                }
            }
            func normalizer(_ n: JSONValue) {
                switch n["type"]?.string {
                case "Lowercase"?: lowercase = true
                case "StripAccents"?: stripAccents = true
                case "BertNormalizer"?:
                    if let v = n["lowercase"]?.bool { lowercase = v }
                    if let v = n["strip_accents"]?.bool { stripAccents = v }
                case "Sequence"?: for inner in n["normalizers"]?.array ?? [] { normalizer(inner) }
                default: break
                }
            }
            if let n = json["normalizer"], n != .null { normalizer(n) }
        }

        var templates: [(key: String, value: GGUFValue)] = []
        if let tokenizerConfig, hasConfig {
            // The chat template: tokenizer_config.json's, else chat_template.jinja (with additional_chat_templates/*.jinja
            // as named ones), else chat_template.json's.
            var template: JSONValue? = tokenizerConfig["chat_template"]
            if tokenizerConfig["chat_template"] == nil {
                if FileSystem.exists(directory + "/chat_template.jinja") {
                    let text = try FileSystem.readText(directory + "/chat_template.jinja")
                    let extraDirectory = directory + "/additional_chat_templates"
                    let extra = FileSystem.exists(extraDirectory)
                        ? try FileSystem.listDirectory(extraDirectory).filter { $0.hasSuffix(".jinja") }.sorted() : []
                    if extra.isEmpty {
                        template = .string(text)
                    } else {
                        var list: [JSONValue] = [.object(JSONObject([("name", .string("default")), ("template", .string(text))]))]
                        for file in extra {
                            list.append(.object(JSONObject([("name", .string(String(file.dropLast(".jinja".count)))),
                                                            ("template", .string(try FileSystem.readText(extraDirectory + "/" + file)))])))
                        }
                        template = .array(list)
                    }
                } else if let alt = try parseIfPresent(directory + "/chat_template.json") {
                    template = alt["chat_template"]
                }
            }
            if let text = template?.string {
                templates.append(("tokenizer.chat_template", .string(text)))
            } else if let list = template?.array {
                var named: [String] = [], defaultText: String?
                for item in list {
                    guard let rawName = item["name"]?.string, let text = item["template"]?.string else { continue }
                    let name = String(rawName.map { $0.isASCII && ($0.isLetter || $0.isNumber) ? $0 : "_" })
                    guard !name.isEmpty else { continue }
                    if name == "default" { defaultText = text } else {
                        named.append(name)
                        templates.append(("tokenizer.chat_template.\(name)", .string(text)))
                    }
                }
                if !named.isEmpty { templates.append(("tokenizer.chat_templates", .array(.string, named.map { .string($0) }))) }
                if let defaultText { templates.append(("tokenizer.chat_template", .string(defaultText))) }
            }
            let addedTokens = json?["added_tokens"]?.array ?? []
            for kind in kinds {
                if let add = tokenizerConfig["add_\(kind)_token"]?.bool { setAdd(kind, add, overwrite: false) }
                guard let text = contents[kind] else { continue }
                setID(kind, addedTokens.first { $0["content"]?.string == text }?["id"]?.int)
            }
        }
        for kind in kinds {
            let id = modelConfig?["\(kind)_token_id"]?.int ?? modelConfig?["text_config"]?["\(kind)_token_id"]?.int
            setID(kind, id)
        }

        let idKeys = ["bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
                      "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id", "eot": "eot_token_id",
                      "eom": "eom_token_id"]
        var out: [(key: String, value: GGUFValue)] = []
        for (kind, id) in ids { if let key = idKeys[kind] { out.append(("tokenizer.ggml." + key, .uint32(UInt32(id)))) } }
        // gguf-py writes add_<kind>_token only for the kinds its writer has a method for.
        for (kind, value) in adds where ["bos", "eos", "sep"].contains(kind) {
            out.append(("tokenizer.ggml.add_\(kind)_token", .bool(value)))
        }
        out += templates
        if let lowercase { out.append(("tokenizer.ggml.normalizer.lowercase", .bool(lowercase))) }
        if let stripAccents { out.append(("tokenizer.ggml.normalizer.strip_accents", .bool(stripAccents))) }
        return out
    }
}
