// A small YAML reader for flat configuration files: `key: value` lines, `#` comments,
// block lists (`- item`) and flow lists (`[a, b]`), quoted or plain scalars.
//
// Why not a YAML library: the one available (Yams) pulls all of Foundation into the static binary
// (DESIGN.md: 76 MB instead of 24 MB); training configs need only this subset. Nested mappings are
// rejected with the line number rather than misread.

public enum SimpleYAML {
    /// Parses `text` into an ordered object whose values are strings, numbers, booleans, null or lists.
    public static func parse(_ text: String, file: String) throws -> JSONObject {
        try parseWithLines(text, file: file).object
    }

    /// The same, with the line each key is on (for errors about a value); a key given twice is an error.
    public static func parseWithLines(_ text: String, file: String) throws -> (object: JSONObject, lines: [String: Int]) {
        var result = JSONObject()
        var lines: [String: Int] = [:]
        var openList: String?
        for (index, rawLine) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let lineNumber = index + 1
            let line = stripComment(String(rawLine))
            if line.trimmingCharacters(in: " \t\r").isEmpty { continue }
            let indented = line.first == " " || line.first == "\t"
            let content = line.trimmingCharacters(in: " \t\r")
            if content.hasPrefix("- ") || content == "-" {
                guard let key = openList else { throw FileFormatError(file: file, place: "line \(lineNumber)", "a list item without a key above it") }
                let item = scalar(String(content.dropFirst()).trimmingCharacters(in: " \t"))
                if case .array(var items) = result[key] ?? .array([]) { items.append(item); result[key] = .array(items) }
                continue
            }
            guard !indented else {
                throw FileFormatError(file: file, place: "line \(lineNumber)", "nested mappings are not supported; write `key: value` at the top level")
            }
            guard let colon = content.firstIndex(of: ":") else {
                throw FileFormatError(file: file, place: "line \(lineNumber)", "expected `key: value`")
            }
            let key = String(content[..<colon]).trimmingCharacters(in: " \t\"'")
            if let earlier = lines[key] {
                throw FileFormatError(file: file, place: "line \(lineNumber)", "'\(key)' is set again (first on line \(earlier)); give each setting once")
            }
            lines[key] = lineNumber
            let value = String(content[content.index(after: colon)...]).trimmingCharacters(in: " \t")
            if value.isEmpty {
                result[key] = .array([])
                openList = key
            } else {
                result[key] = scalar(value)
                openList = nil
            }
        }
        return (result, lines)
    }

    static func stripComment(_ line: String) -> String {
        var inSingle = false, inDouble = false
        var previous: Character = " "
        for (offset, c) in line.enumerated() {
            if c == "'" && !inDouble { inSingle.toggle() }
            if c == "\"" && !inSingle { inDouble.toggle() }
            if c == "#" && !inSingle && !inDouble && (previous == " " || previous == "\t" || offset == 0) {
                return String(line.prefix(offset))
            }
            previous = c
        }
        return line
    }

    static func scalar(_ text: String) -> JSONValue {
        if text.hasPrefix("[") && text.hasSuffix("]") {
            let inner = text.dropFirst().dropLast()
            if inner.trimmingCharacters(in: " ").isEmpty { return .array([]) }
            return .array(inner.split(separator: ",").map { scalar(String($0).trimmingCharacters(in: " \t")) })
        }
        if text.count >= 2, (text.hasPrefix("\"") && text.hasSuffix("\"")) || (text.hasPrefix("'") && text.hasSuffix("'")) {
            return .string(String(text.dropFirst().dropLast()))
        }
        switch text.lowercased() {
        case "true", "yes", "on": return .bool(true)
        case "false", "no", "off": return .bool(false)
        case "null", "~": return .null
        default: break
        }
        if let i = Int64(text) { return .int(i) }
        if let d = Double(text) { return .double(d) }
        return .string(text)
    }
}
