// tokenizer.json post-processors: the special tokens that `encode(addSpecialTokens: true)` adds
// around a single sequence. Supported: TemplateProcessing, ByteLevel (no change to ids), Sequence,
// RobertaProcessing and BertProcessing (cls … sep).

indirect enum PostProcessor: @unchecked Sendable {
    /// Ids before and after the sequence.
    case wrap(prefix: [Int], suffix: [Int])
    case identity
    case sequence([PostProcessor])

    init(json: JSONValue, file: String, place: String) throws {
        func fail(_ message: String) -> FileFormatError { FileFormatError(file: file, place: place, message) }
        guard let type = json["type"]?.string else { throw fail("expected an object with a \"type\"") }
        switch type {
        case "TemplateProcessing":
            guard let single = json["single"]?.array else { throw fail("TemplateProcessing needs a \"single\" template") }
            var prefix: [Int] = [], suffix: [Int] = [], seenSequence = false
            for (i, item) in single.enumerated() {
                if item["Sequence"] != nil { seenSequence = true; continue }
                guard let name = item["SpecialToken"]?["id"]?.string else {
                    throw fail("single[\(i)]: expected {\"Sequence\": ...} or {\"SpecialToken\": {\"id\": ...}}")
                }
                guard let ids = json["special_tokens"]?[name]?["ids"]?.array?.compactMap({ $0.int }) else {
                    throw fail("special token \"\(name)\" of the template is not in \"special_tokens\"")
                }
                if seenSequence { suffix += ids } else { prefix += ids }
            }
            self = .wrap(prefix: prefix, suffix: suffix)
        case "RobertaProcessing", "BertProcessing":
            guard let cls = json["cls"]?.array, cls.count == 2, let clsID = cls[1].int,
                  let sep = json["sep"]?.array, sep.count == 2, let sepID = sep[1].int else {
                throw fail("\(type) needs \"cls\" and \"sep\" as [token, id]")
            }
            self = .wrap(prefix: [clsID], suffix: [sepID])
        case "ByteLevel":
            self = .identity
        case "Sequence":
            guard let list = json["processors"]?.array else { throw fail("Sequence needs a \"processors\" array") }
            self = .sequence(try list.enumerated().map { try PostProcessor(json: $1, file: file, place: "\(place).processors[\($0)]") })
        default:
            throw fail("unsupported post-processor type \"\(type)\" (supported: TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence)")
        }
    }

    func apply(_ ids: [Int]) -> [Int] {
        switch self {
        case .wrap(let prefix, let suffix): return prefix + ids + suffix
        case .identity: return ids
        case .sequence(let list): return list.reduce(ids) { $1.apply($0) }
        }
    }
}
