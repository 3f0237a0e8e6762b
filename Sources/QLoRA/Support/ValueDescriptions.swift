// How parsed values read inside messages: as the file wrote them (JSON text, GGUF numbers and strings), never as
// Swift's enum dump (`QLoRA.JSONValue.int(-128)`), so every `\(value)` in an error shows what the user can find.

extension JSONValue: CustomStringConvertible {
    public var description: String {
        let text = serialized()
        return text.count > 200 ? String(text.prefix(200)) + "..." : text
    }
}

extension GGUFValue: CustomStringConvertible {
    public var description: String {
        switch self {
        case .uint8(let v): return String(v)
        case .int8(let v): return String(v)
        case .uint16(let v): return String(v)
        case .int16(let v): return String(v)
        case .uint32(let v): return String(v)
        case .int32(let v): return String(v)
        case .uint64(let v): return String(v)
        case .int64(let v): return String(v)
        case .float32(let v): return String(v)
        case .float64(let v): return String(v)
        case .bool(let v): return String(v)
        case .string(let s): return JSONValue.string(s).serialized()
        case .array(let type, let items):
            let shown = items.prefix(8).map(\.description).joined(separator: ", ")
            return "[" + shown + (items.count > 8 ? ", ... (\(items.count) \(type) values)" : "") + "]"
        }
    }
}
