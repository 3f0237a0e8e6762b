// The Jinja2 lexer, configured as transformers configures it for chat templates.
//
// transformers compiles chat templates with `ImmutableSandboxedEnvironment(trim_blocks=True,
// lstrip_blocks=True, extensions=[loopcontrols, ...])`, so whitespace handling follows jinja2 3.x's lexer:
//   - newlines ("\r\n", "\r") become "\n", and one trailing newline of the template is dropped;
//   - `{%-`, `{{-`, `{#-` strip all whitespace before the tag; `-%}`, `-}}`, `-#}` strip all after it;
//   - trim_blocks: a block or comment end `%}` / `#}` eats one directly following "\n" (`+%}` keeps it);
//   - lstrip_blocks: spaces and tabs between a line start and `{%` / `{#` are removed (`{%+` keeps them),
//     but never before `{{`;
//   - `}}` / `%}` inside open brackets do not end the tag (`{{ {'a': {'b': 1}} }}`).
// String literals are decoded like Python's "unicode-escape" codec, as jinja2 does.

/// One lexical token. Data tokens hold template text; `string` tokens hold the decoded literal.
struct JinjaToken {
    enum Kind: Equatable {
        case data, variableBegin, variableEnd, blockBegin, blockEnd
        case name, string, integer, float, op
        case end
    }
    var kind: Kind
    var text: String
    var intValue: Int = 0
    var floatValue: Double = 0
    /// Offset (in Unicode scalars) into the normalized source, for line/column reports.
    var offset: Int
}

struct JinjaLexer {
    private let s: [Unicode.Scalar]
    private var tokens: [JinjaToken] = []
    private let lines: JinjaSourceLines

    init(source: String) {
        // Normalize newlines and drop one trailing newline (keep_trailing_newline=False).
        var scalars: [Unicode.Scalar] = []
        scalars.reserveCapacity(source.unicodeScalars.count)
        var previousCR = false
        for c in source.unicodeScalars {
            if c == "\r" { scalars.append("\n"); previousCR = true; continue }
            if c == "\n" && previousCR { previousCR = false; continue }
            previousCR = false
            scalars.append(c)
        }
        if scalars.last == "\n" { scalars.removeLast() }
        s = scalars
        lines = JinjaSourceLines(scalars)
    }

    var sourceLines: JinjaSourceLines { lines }

    private func error(_ message: String, at offset: Int) -> ChatTemplateError {
        let (line, column) = lines.position(of: offset)
        return ChatTemplateError(kind: .syntax, line: line, column: column, message: message)
    }

    private func matches(_ literal: String, at p: Int) -> Bool {
        var i = p
        for c in literal.unicodeScalars {
            guard i < s.count, s[i] == c else { return false }
            i += 1
        }
        return true
    }

    private func skipWhitespace(from p: Int) -> Int {
        var i = p
        while i < s.count, PythonFormat.isSpace(s[i]) { i += 1 }
        return i
    }

    mutating func tokenize() throws -> [JinjaToken] {
        var pos = 0
        var lineStarting = true
        while pos < s.count {
            // Find the next tag opener.
            var i = pos
            var found = -1
            while i + 1 < s.count {
                if s[i] == "{", s[i + 1] == "{" || s[i + 1] == "%" || s[i + 1] == "#" { found = i; break }
                i += 1
            }
            if found < 0 {
                emitData(pos, s.count)
                break
            }
            let opener = s[found + 1]
            var afterOpener = found + 2
            var sign: Unicode.Scalar? = nil
            if afterOpener < s.count, s[afterOpener] == "-" || s[afterOpener] == "+" {
                sign = s[afterOpener]
                afterOpener += 1
            }
            // Whitespace control on the text before the tag.
            var textEnd = found
            if sign == "-" {
                while textEnd > pos, PythonFormat.isSpace(s[textEnd - 1]) { textEnd -= 1 }
            } else if sign != "+" && opener != "{" {
                var lineStart = found
                while lineStart > pos, s[lineStart - 1] != "\n" { lineStart -= 1 }
                // jinja2 strips only when the tag starts a line: a newline precedes it in this text,
                // or the previous tag ended with one (or this is the start of the template).
                if lineStart > pos || lineStarting {
                    var onlyBlanks = true
                    for k in lineStart..<found where s[k] != " " && s[k] != "\t" { onlyBlanks = false; break }
                    if onlyBlanks { textEnd = lineStart }
                }
            }
            emitData(pos, textEnd)

            switch opener {
            case "#":
                pos = try lexComment(from: afterOpener, start: found)
                lineStarting = pos > 0 && s[pos - 1] == "\n"
            case "%":
                if let rawStart = rawBlockStart(at: afterOpener) {
                    pos = try lexRaw(from: rawStart, start: found)
                } else {
                    tokens.append(JinjaToken(kind: .blockBegin, text: "{%", offset: found))
                    pos = try lexInside(from: afterOpener, block: true)
                }
                lineStarting = pos > 0 && s[pos - 1] == "\n"
            default:
                tokens.append(JinjaToken(kind: .variableBegin, text: "{{", offset: found))
                pos = try lexInside(from: afterOpener, block: false)
                lineStarting = pos > 0 && s[pos - 1] == "\n"
            }
        }
        tokens.append(JinjaToken(kind: .end, text: "", offset: s.count))
        return tokens
    }

    private mutating func emitData(_ from: Int, _ to: Int) {
        guard to > from else { return }
        var text = ""
        text.unicodeScalars.append(contentsOf: s[from..<to])
        tokens.append(JinjaToken(kind: .data, text: text, offset: from))
    }

    /// `{# ... #}`: returns the position after the comment end (and its whitespace control).
    private func lexComment(from p: Int, start: Int) throws -> Int {
        var i = p
        while i < s.count {
            if matches("+#}", at: i) { return i + 3 }
            if matches("-#}", at: i) { return skipWhitespace(from: i + 3) }
            if matches("#}", at: i) {
                var end = i + 2
                if end < s.count, s[end] == "\n" { end += 1 }
                return end
            }
            i += 1
        }
        throw error("missing end of comment tag '#}'", at: start)
    }

    /// If `{%` at this point opens `{% raw %}`, the position after its end.
    private func rawBlockStart(at p: Int) -> Int? {
        var i = skipWhitespace(from: p)
        guard matches("raw", at: i) else { return nil }
        i = skipWhitespace(from: i + 3)
        if matches("-%}", at: i) { return skipWhitespace(from: i + 3) }
        if matches("%}", at: i) { return i + 2 }
        return nil
    }

    /// The text of a raw block up to `{% endraw %}`, with the same whitespace control as other tags.
    private mutating func lexRaw(from p: Int, start: Int) throws -> Int {
        var i = p
        while i < s.count {
            if matches("{%", at: i) {
                var j = i + 2
                var sign: Unicode.Scalar? = nil
                if j < s.count, s[j] == "-" || s[j] == "+" { sign = s[j]; j += 1 }
                j = skipWhitespace(from: j)
                if matches("endraw", at: j) {
                    j = skipWhitespace(from: j + 6)
                    var end = -1
                    if matches("+%}", at: j) { end = j + 3 }
                    else if matches("-%}", at: j) { end = skipWhitespace(from: j + 3) }
                    else if matches("%}", at: j) {
                        end = j + 2
                        if end < s.count, s[end] == "\n" { end += 1 }
                    }
                    if end >= 0 {
                        var textEnd = i
                        if sign == "-" {
                            while textEnd > p, PythonFormat.isSpace(s[textEnd - 1]) { textEnd -= 1 }
                        } else if sign != "+" {
                            var lineStart = i
                            while lineStart > p, s[lineStart - 1] != "\n" { lineStart -= 1 }
                            if lineStart > p || (p > 0 && s[p - 1] == "\n") {
                                var onlyBlanks = true
                                for k in lineStart..<i where s[k] != " " && s[k] != "\t" { onlyBlanks = false; break }
                                if onlyBlanks { textEnd = lineStart }
                            }
                        }
                        emitData(p, textEnd)
                        return end
                    }
                }
            }
            i += 1
        }
        throw error("missing '{% endraw %}' for this raw block", at: start)
    }

    private static let operators2: [String] = ["//", "**", "==", "!=", ">=", "<="]
    private static let operators1: Set<Unicode.Scalar> = ["+", "-", "/", "*", "%", "~", "[", "]", "(", ")", "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"]

    /// Tokens inside `{{ ... }}` or `{% ... %}`; returns the position after the closing delimiter.
    private mutating func lexInside(from p: Int, block: Bool) throws -> Int {
        var i = p
        var balance: [Unicode.Scalar] = []
        let tagStart = p
        while true {
            guard i < s.count else {
                throw error(block ? "missing '%}' to end this block tag" : "missing '}}' to end this expression", at: tagStart - 2)
            }
            if balance.isEmpty {
                if block {
                    if matches("+%}", at: i) {
                        tokens.append(JinjaToken(kind: .blockEnd, text: "%}", offset: i)); return i + 3
                    }
                    if matches("-%}", at: i) {
                        tokens.append(JinjaToken(kind: .blockEnd, text: "%}", offset: i)); return skipWhitespace(from: i + 3)
                    }
                    if matches("%}", at: i) {
                        tokens.append(JinjaToken(kind: .blockEnd, text: "%}", offset: i))
                        var end = i + 2
                        if end < s.count, s[end] == "\n" { end += 1 }
                        return end
                    }
                } else {
                    if matches("-}}", at: i) {
                        tokens.append(JinjaToken(kind: .variableEnd, text: "}}", offset: i)); return skipWhitespace(from: i + 3)
                    }
                    if matches("}}", at: i) {
                        tokens.append(JinjaToken(kind: .variableEnd, text: "}}", offset: i)); return i + 2
                    }
                }
            }
            let c = s[i]
            if PythonFormat.isSpace(c) { i += 1; continue }
            if let (tok, next) = try lexNumber(at: i) {
                tokens.append(tok); i = next; continue
            }
            if c == "_" || c.properties.isAlphabetic {
                var j = i + 1
                while j < s.count, s[j] == "_" || s[j].properties.isAlphabetic || s[j].properties.numericType == .decimal { j += 1 }
                var name = ""
                name.unicodeScalars.append(contentsOf: s[i..<j])
                tokens.append(JinjaToken(kind: .name, text: name, offset: i))
                i = j
                continue
            }
            if c == "'" || c == "\"" {
                let (value, next) = try lexString(at: i)
                tokens.append(JinjaToken(kind: .string, text: value, offset: i))
                i = next
                continue
            }
            var op: String? = nil
            for o in Self.operators2 where matches(o, at: i) { op = o; break }
            if op == nil, Self.operators1.contains(c) { op = String(Character(c)) }
            guard let op else { throw error("unexpected character '\(Character(c))'", at: i) }
            switch op {
            case "(": balance.append(")")
            case "[": balance.append("]")
            case "{": balance.append("}")
            case ")", "]", "}":
                guard let expected = balance.popLast() else { throw error("unexpected '\(op)'", at: i) }
                guard expected == op.unicodeScalars.first! else {
                    throw error("unexpected '\(op)', expected '\(Character(expected))'", at: i)
                }
            default: break
            }
            tokens.append(JinjaToken(kind: .op, text: op, offset: i))
            i += op.unicodeScalars.count
        }
    }

    private func isDigit(_ i: Int) -> Bool { i < s.count && s[i].value >= 0x30 && s[i].value <= 0x39 }

    /// Digits with single underscores between them (`1_000`); returns the end, or nil if none.
    private func digitRun(_ p: Int) -> Int? {
        guard isDigit(p) else { return nil }
        var i = p + 1
        while true {
            if isDigit(i) { i += 1; continue }
            if i < s.count, s[i] == "_", isDigit(i + 1) { i += 2; continue }
            return i
        }
    }

    private func lexNumber(at p: Int) throws -> (JinjaToken, Int)? {
        guard isDigit(p) else { return nil }
        // Float: digits, then a fraction and/or an exponent; never directly after a '.' (`x.0.1`).
        if p == 0 || s[p - 1] != ".", let intEnd = digitRun(p) {
            var end = -1
            var j = intEnd
            var hasFraction = false
            if j < s.count, s[j] == ".", let fracEnd = digitRun(j + 1) { j = fracEnd; hasFraction = true }
            if j < s.count, s[j] == "e" || s[j] == "E" {
                var k = j + 1
                if k < s.count, s[k] == "+" || s[k] == "-" { k += 1 }
                if let expEnd = digitRun(k) { end = expEnd }
            }
            if end < 0 && hasFraction { end = j }
            if end >= 0 {
                var text = ""
                text.unicodeScalars.append(contentsOf: s[p..<end])
                let clean = text.filter { $0 != "_" }
                guard let value = Double(clean) else { throw error("bad number '\(text)'", at: p) }
                return (JinjaToken(kind: .float, text: text, floatValue: value, offset: p), end)
            }
        }
        // Integer: 0b.., 0o.., 0x.., decimal.
        if s[p] == "0", p + 1 < s.count, let radixChar = Character(s[p + 1]).lowercased().first, "box".contains(radixChar) {
            let radix = radixChar == "b" ? 2 : radixChar == "o" ? 8 : 16
            var j = p + 2
            var digits = ""
            while j < s.count {
                if s[j] == "_", j + 1 < s.count, Character(s[j + 1]).hexDigitValue.map({ $0 < radix }) == true { j += 1; continue }
                guard let v = Character(s[j]).hexDigitValue, v < radix else { break }
                digits.unicodeScalars.append(s[j])
                j += 1
            }
            if !digits.isEmpty {
                guard let value = Int(digits, radix: radix) else { throw error("integer too large", at: p) }
                return (JinjaToken(kind: .integer, text: digits, intValue: value, offset: p), j)
            }
        }
        var end: Int
        if s[p] == "0" {
            end = p + 1
            while true {
                if end < s.count, s[end] == "0" { end += 1; continue }
                if end + 1 < s.count, s[end] == "_", s[end + 1] == "0" { end += 2; continue }
                break
            }
        } else {
            end = digitRun(p)!
        }
        var text = ""
        text.unicodeScalars.append(contentsOf: s[p..<end])
        guard let value = Int(text.filter { $0 != "_" }) else { throw error("integer too large: \(text)", at: p) }
        return (JinjaToken(kind: .integer, text: text, intValue: value, offset: p), end)
    }

    /// A quoted literal, decoded like Python's unicode-escape codec.
    private func lexString(at p: Int) throws -> (String, Int) {
        let quote = s[p]
        var i = p + 1
        var out = ""
        func hexValue(_ count: Int) throws -> UInt32 {
            guard i + count <= s.count else { throw error("truncated escape in string", at: i) }
            var v: UInt32 = 0
            for k in 0..<count {
                guard let d = Character(s[i + k]).hexDigitValue, s[i + k].isASCII else { throw error("truncated escape in string", at: i) }
                v = v * 16 + UInt32(d)
            }
            i += count
            return v
        }
        while true {
            guard i < s.count else { throw error("unterminated string", at: p) }
            let c = s[i]
            if c == quote { return (out, i + 1) }
            if c != "\\" { out.unicodeScalars.append(c); i += 1; continue }
            i += 1
            guard i < s.count else { throw error("unterminated string", at: p) }
            let e = s[i]
            i += 1
            switch e {
            case "\n": break
            case "\\": out += "\\"
            case "'": out += "'"
            case "\"": out += "\""
            case "a": out += "\u{07}"
            case "b": out += "\u{08}"
            case "f": out += "\u{0C}"
            case "n": out += "\n"
            case "r": out += "\r"
            case "t": out += "\t"
            case "v": out += "\u{0B}"
            case "0"..."7":
                var v = e.value - 0x30
                var n = 1
                while n < 3, i < s.count, s[i].value >= 0x30, s[i].value <= 0x37 { v = v * 8 + s[i].value - 0x30; i += 1; n += 1 }
                out.unicodeScalars.append(Unicode.Scalar(v)!)
            case "x", "u", "U":
                let v = try hexValue(e == "x" ? 2 : e == "u" ? 4 : 8)
                guard let scalar = Unicode.Scalar(v) else { throw error("escape \\\(e) names no character", at: i) }
                out.unicodeScalars.append(scalar)
            case "N":
                throw error("\\N{...} escapes are not supported", at: i - 2)
            default:
                out += "\\"
                out.unicodeScalars.append(e)
            }
        }
    }
}

/// Maps scalar offsets of the normalized source to 1-based line and column numbers.
struct JinjaSourceLines {
    private var lineStarts: [Int] = [0]
    init(_ s: [Unicode.Scalar]) {
        for (i, c) in s.enumerated() where c == "\n" { lineStarts.append(i + 1) }
    }
    func position(of offset: Int) -> (line: Int, column: Int) {
        var lo = 0, hi = lineStarts.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if lineStarts[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        return (lo + 1, offset - lineStarts[lo] + 1)
    }
}
