// A recursive-descent parser for the Jinja2 subset, following jinja2's grammar and precedence:
//
//   expression  := or ('if' or ('else' expression)?)*
//   or          := and ('or' and)*           and := not ('and' not)*      not := 'not' not | compare
//   compare     := math1 (('=='|'!='|'<'|'<='|'>'|'>='|'in'|'not' 'in') math1)*
//   math1       := concat (('+'|'-') concat)*   concat := math2 ('~' math2)*
//   math2       := pow (('*'|'/'|'//'|'%') pow)*   pow := unary ('**' unary)*
//   unary       := ('-'|'+') unary | primary postfix* ; then filters `|f(...)`, tests `is [not] t`, calls
//   primary     := name | string+ | number | '(' tuple ')' | '[' list ']' | '{' dict '}'
//
// Unknown tags, filters and tests are errors here, at parse time (jinja2 also rejects unknown filters
// and tests when it compiles), so an unsupported template never renders a wrong prompt.

struct JinjaParser {
    private var tokens: [JinjaToken]
    private var index = 0
    private let lines: JinjaSourceLines
    /// Nesting of expressions and blocks, bounded so a hostile template cannot overflow the stack.
    private var depth = 0
    private static let maxDepth = 400

    private mutating func enter() throws {
        depth += 1
        if depth > Self.maxDepth { throw error("template nested deeper than \(Self.maxDepth) levels", at: current, kind: .unsupported) }
    }

    init(tokens: [JinjaToken], lines: JinjaSourceLines) {
        self.tokens = tokens
        self.lines = lines
    }

    // MARK: Token stream

    private var current: JinjaToken { tokens[index] }
    private func peek(_ k: Int = 1) -> JinjaToken { tokens[min(index + k, tokens.count - 1)] }
    private mutating func advance() { if index < tokens.count - 1 { index += 1 } }

    private func pos(_ t: JinjaToken) -> JinjaPos {
        let (l, c) = lines.position(of: t.offset)
        return JinjaPos(line: Int32(l), column: Int32(c))
    }

    func error(_ message: String, at t: JinjaToken, kind: ChatTemplateError.Kind = .syntax) -> ChatTemplateError {
        let (l, c) = lines.position(of: t.offset)
        return ChatTemplateError(kind: kind, line: l, column: c, message: message)
    }

    private static func describe(_ t: JinjaToken) -> String {
        switch t.kind {
        case .end: return "end of template"
        case .blockEnd: return "end of statement block '%}'"
        case .variableEnd: return "end of print statement '}}'"
        case .string: return "string literal"
        case .data: return "template text"
        default: return "'\(t.text)'"
        }
    }

    private func isOp(_ op: String) -> Bool { current.kind == .op && current.text == op }
    private func isName(_ name: String) -> Bool { current.kind == .name && current.text == name }

    private mutating func skipOp(_ op: String) -> Bool {
        if isOp(op) { advance(); return true }
        return false
    }
    private mutating func skipName(_ name: String) -> Bool {
        if isName(name) { advance(); return true }
        return false
    }

    private mutating func expectOp(_ op: String) throws {
        guard skipOp(op) else { throw error("expected '\(op)', got \(Self.describe(current))", at: current) }
    }

    private mutating func expectName() throws -> String {
        guard current.kind == .name else { throw error("expected a name, got \(Self.describe(current))", at: current) }
        let name = current.text
        advance()
        return name
    }

    private mutating func expectBlockEnd() throws {
        guard current.kind == .blockEnd else {
            throw error("expected end of statement block '%}', got \(Self.describe(current))", at: current)
        }
        advance()
    }

    // MARK: Statements

    /// Parses the whole template.
    mutating func parseTemplate() throws -> [JinjaStmt] {
        let (body, end) = try parseStatements(until: [])
        if let end { throw error("unexpected '\(end)' with no open block to end", at: tokens[index - 1]) }
        return body
    }

    /// Statements up to one of the `until` tags (returned, with the stream after its name) or the end.
    private mutating func parseStatements(until: Set<String>) throws -> ([JinjaStmt], String?) {
        try enter()
        defer { depth -= 1 }
        var body: [JinjaStmt] = []
        while true {
            let t = current
            switch t.kind {
            case .end:
                if !until.isEmpty {
                    throw error("unexpected end of template; expected one of: \(until.sorted().map { "'\($0)'" }.joined(separator: ", "))", at: t)
                }
                return (body, nil)
            case .data:
                body.append(.text(t.text))
                advance()
            case .variableBegin:
                advance()
                let e = try parseTuple()
                guard current.kind == .variableEnd else {
                    throw error("expected end of print statement '}}', got \(Self.describe(current))", at: current)
                }
                advance()
                body.append(.output(e, pos(t)))
            case .blockBegin:
                advance()
                guard current.kind == .name else { throw error("expected a statement name after '{%', got \(Self.describe(current))", at: current) }
                let tag = current.text
                if until.contains(tag) {
                    advance()
                    return (body, tag)
                }
                body.append(try parseStatement(tag: tag))
            default:
                throw error("unexpected \(Self.describe(t))", at: t)
            }
        }
    }

    private mutating func parseStatement(tag: String) throws -> JinjaStmt {
        let tagToken = current
        advance()
        switch tag {
        case "if": return try parseIf()
        case "for": return try parseFor(tagToken)
        case "set": return try parseSet(tagToken)
        case "macro": return try parseMacro()
        case "call": return try parseCallBlock(tagToken)
        case "filter":
            let filters = try parseFilterChain(startInline: true)
            try expectBlockEnd()
            let (body, _) = try parseStatements(until: ["endfilter"])
            try expectBlockEnd()
            return .filterBlock(filters, body, JinjaFrame())
        case "with":
            var assignments: [(JinjaTarget, JinjaExpr)] = []
            while current.kind != .blockEnd {
                if !assignments.isEmpty { try expectOp(",") }
                let target = try parseAssignTarget(allowNamespace: false)
                try expectOp("=")
                assignments.append((target, try parseExpression()))
            }
            try expectBlockEnd()
            let (body, _) = try parseStatements(until: ["endwith"])
            try expectBlockEnd()
            return .with(assignments, body, JinjaFrame(), pos(tagToken))
        case "break", "continue":
            try expectBlockEnd()
            return tag == "break" ? .breakLoop : .continueLoop
        case "generation":
            // transformers' `{% generation %}` marks assistant text for masks; it renders its body as is.
            try expectBlockEnd()
            let (body, _) = try parseStatements(until: ["endgeneration"])
            try expectBlockEnd()
            return .ifChain([(.const(.bool(true)), body)], otherwise: [])
        case "include", "extends", "import", "from", "block", "do", "autoescape", "trans":
            throw error("the '\(tag)' tag is not supported in chat templates", at: tagToken, kind: .unsupported)
        default:
            throw error("unknown tag '\(tag)'", at: tagToken)
        }
    }

    private mutating func parseIf() throws -> JinjaStmt {
        var branches: [(JinjaExpr, [JinjaStmt])] = []
        var otherwise: [JinjaStmt] = []
        var condition = try parseTuple(withConditional: false)
        while true {
            try expectBlockEnd()
            let (body, end) = try parseStatements(until: ["elif", "else", "endif"])
            branches.append((condition, body))
            if end == "elif" {
                condition = try parseTuple(withConditional: false)
                continue
            }
            if end == "else" {
                try expectBlockEnd()
                (otherwise, _) = try parseStatements(until: ["endif"])
            }
            try expectBlockEnd()
            return .ifChain(branches, otherwise: otherwise)
        }
    }

    private mutating func parseFor(_ tagToken: JinjaToken) throws -> JinjaStmt {
        let target = try parseAssignTarget(allowNamespace: false, endNames: ["in"])
        guard skipName("in") else { throw error("expected 'in' in for loop, got \(Self.describe(current))", at: current) }
        let iterable = try parseTuple(withConditional: false, endNames: ["recursive"])
        var condition: JinjaExpr? = nil
        if skipName("if") { condition = try parseExpression() }
        if isName("recursive") {
            throw error("recursive for loops are not supported", at: current, kind: .unsupported)
        }
        try expectBlockEnd()
        let (body, end) = try parseStatements(until: ["endfor", "else"])
        var otherwise: [JinjaStmt] = []
        if end == "else" {
            try expectBlockEnd()
            (otherwise, _) = try parseStatements(until: ["endfor"])
        }
        try expectBlockEnd()
        return .forLoop(JinjaForLoop(target: target, iterable: iterable, condition: condition, body: body, otherwise: otherwise, pos: pos(tagToken)))
    }

    private mutating func parseSet(_ tagToken: JinjaToken) throws -> JinjaStmt {
        let target = try parseAssignTarget(allowNamespace: true)
        if skipOp("=") {
            let value = try parseTuple()
            try expectBlockEnd()
            return .set(target, value, pos(tagToken))
        }
        var filters: [JinjaFilterCall] = []
        if isOp("|") { filters = try parseFilterChain(startInline: false) }
        try expectBlockEnd()
        let (body, _) = try parseStatements(until: ["endset"])
        try expectBlockEnd()
        return .setBlock(target, filters, body, JinjaFrame(), pos(tagToken))
    }

    private mutating func parseMacro() throws -> JinjaStmt {
        let name = try expectName()
        let params = try parseSignature()
        try expectBlockEnd()
        let (body, _) = try parseStatements(until: ["endmacro"])
        try expectBlockEnd()
        return .macro(JinjaMacroDef(name: name, params: params, body: body))
    }

    private mutating func parseCallBlock(_ tagToken: JinjaToken) throws -> JinjaStmt {
        var params: [JinjaParam] = []
        if isOp("(") { params = try parseSignature() }
        let call = try parseExpression()
        guard case .call = call else { throw error("expected a macro call after 'call'", at: tagToken) }
        try expectBlockEnd()
        let (body, _) = try parseStatements(until: ["endcall"])
        try expectBlockEnd()
        return .callBlock(call: call, caller: JinjaMacroDef(name: "caller", params: params, body: body), pos(tagToken))
    }

    /// `(a, b=default, ...)` of a macro or call block.
    private mutating func parseSignature() throws -> [JinjaParam] {
        try expectOp("(")
        var params: [JinjaParam] = []
        while !isOp(")") {
            if !params.isEmpty { try expectOp(",") }
            if isOp(")") { break }
            let name = try expectName()
            var def: JinjaExpr? = nil
            if skipOp("=") { def = try parseExpression() }
            params.append(JinjaParam(name: name, defaultValue: def))
        }
        try expectOp(")")
        return params
    }

    /// `name`, `a, b`, `(a, b)` or (for `set`) `ns.attr`.
    private mutating func parseAssignTarget(allowNamespace: Bool, endNames: Set<String> = []) throws -> JinjaTarget {
        if allowNamespace, current.kind == .name, peek().kind == .op, peek().text == ".", peek(2).kind == .name {
            let ns = current.text
            advance(); advance()
            let attr = current.text
            advance()
            return .attribute(ns, attr)
        }
        var items: [JinjaTarget] = []
        var isTuple = false
        while true {
            if !items.isEmpty { try expectOp(",") }
            if current.kind == .blockEnd || isOp(")") || isOp("=") || (current.kind == .name && endNames.contains(current.text)) { break }
            items.append(try parseTargetPrimary())
            if isOp(",") { isTuple = true } else { break }
        }
        if items.isEmpty { throw error("expected a variable name to assign to, got \(Self.describe(current))", at: current) }
        return isTuple ? .tuple(items) : items[0]
    }

    private mutating func parseTargetPrimary() throws -> JinjaTarget {
        if skipOp("(") {
            let inner = try parseAssignTarget(allowNamespace: false)
            try expectOp(")")
            return inner
        }
        guard current.kind == .name else { throw error("can't assign to \(Self.describe(current))", at: current) }
        let name = current.text
        if ["true", "false", "none", "True", "False", "None"].contains(name) {
            throw error("can't assign to '\(name)'", at: current)
        }
        advance()
        return .name(name)
    }

    // MARK: Expressions

    /// An expression or a bare tuple (`a, b`), as jinja2's `parse_tuple`.
    private mutating func parseTuple(withConditional: Bool = true, endNames: Set<String> = [], explicitParens: Bool = false) throws -> JinjaExpr {
        var items: [JinjaExpr] = []
        var isTuple = false
        let start = current
        while true {
            if !items.isEmpty { try expectOp(",") }
            if current.kind == .variableEnd || current.kind == .blockEnd || isOp(")") || (current.kind == .name && endNames.contains(current.text)) { break }
            items.append(withConditional ? try parseExpression() : try parseOr())
            if isOp(",") { isTuple = true } else { break }
        }
        if !isTuple {
            if let first = items.first { return first }
            if !explicitParens { throw error("expected an expression, got \(Self.describe(current))", at: start) }
        }
        return .tuple(items)
    }

    mutating func parseExpression() throws -> JinjaExpr {
        var e = try parseOr()
        while skipName("if") {
            let test = try parseOr()
            var otherwise: JinjaExpr? = nil
            if skipName("else") { otherwise = try parseExpression() }
            e = .conditional(test: test, then: e, otherwise: otherwise)
        }
        return e
    }

    private mutating func parseOr() throws -> JinjaExpr {
        var e = try parseAnd()
        while skipName("or") { e = .or(e, try parseAnd()) }
        return e
    }

    private mutating func parseAnd() throws -> JinjaExpr {
        var e = try parseNot()
        while skipName("and") { e = .and(e, try parseNot()) }
        return e
    }

    private mutating func parseNot() throws -> JinjaExpr {
        if skipName("not") { return .not(try parseNot()) }
        return try parseCompare()
    }

    private mutating func parseCompare() throws -> JinjaExpr {
        let start = current
        let left = try parseMath1()
        var ops: [(JinjaCompareOp, JinjaExpr)] = []
        while true {
            if current.kind == .op, let op = JinjaCompareOp(rawValue: current.text), op != .in, op != .notIn {
                advance()
                ops.append((op, try parseMath1()))
            } else if skipName("in") {
                ops.append((.in, try parseMath1()))
            } else if isName("not"), peek().kind == .name, peek().text == "in" {
                advance(); advance()
                ops.append((.notIn, try parseMath1()))
            } else {
                break
            }
        }
        return ops.isEmpty ? left : .compare(left, ops, pos(start))
    }

    private mutating func parseMath1() throws -> JinjaExpr {
        var e = try parseConcat()
        while current.kind == .op, current.text == "+" || current.text == "-" {
            let t = current
            advance()
            e = .binary(t.text == "+" ? .add : .sub, e, try parseConcat(), pos(t))
        }
        return e
    }

    private mutating func parseConcat() throws -> JinjaExpr {
        let start = current
        var items = [try parseMath2()]
        while skipOp("~") { items.append(try parseMath2()) }
        return items.count == 1 ? items[0] : .concat(items, pos(start))
    }

    private mutating func parseMath2() throws -> JinjaExpr {
        var e = try parsePow()
        while current.kind == .op, let op = JinjaBinaryOp(rawValue: current.text), [.mul, .div, .floordiv, .mod].contains(op) {
            let t = current
            advance()
            e = .binary(op, e, try parsePow(), pos(t))
        }
        return e
    }

    private mutating func parsePow() throws -> JinjaExpr {
        var e = try parseUnary()
        while isOp("**") {
            let t = current
            advance()
            e = .binary(.pow, e, try parseUnary(), pos(t))
        }
        return e
    }

    private mutating func parseUnary(withFilters: Bool = true) throws -> JinjaExpr {
        try enter()
        defer { depth -= 1 }
        let t = current
        var e: JinjaExpr
        if skipOp("-") {
            e = .negate(try parseUnary(withFilters: false), pos(t))
        } else if skipOp("+") {
            e = .plus(try parseUnary(withFilters: false), pos(t))
        } else {
            e = try parsePrimary()
        }
        e = try parsePostfix(e)
        if withFilters { e = try parseFilterExpr(e) }
        return e
    }

    private mutating func parsePrimary() throws -> JinjaExpr {
        let t = current
        switch t.kind {
        case .name:
            advance()
            switch t.text {
            case "true", "True": return .const(.bool(true))
            case "false", "False": return .const(.bool(false))
            case "none", "None": return .const(.none)
            default: return .name(t.text, pos(t))
            }
        case .string:
            var text = t.text
            advance()
            while current.kind == .string { text += current.text; advance() }
            return .const(.string(text))
        case .integer:
            advance()
            return .const(.int(t.intValue))
        case .float:
            advance()
            return .const(.float(t.floatValue))
        case .op where t.text == "(":
            advance()
            let e = try parseTuple(explicitParens: true)
            try expectOp(")")
            return e
        case .op where t.text == "[":
            advance()
            var items: [JinjaExpr] = []
            while !isOp("]") {
                if !items.isEmpty { try expectOp(",") }
                if isOp("]") { break }
                items.append(try parseExpression())
            }
            try expectOp("]")
            return .list(items)
        case .op where t.text == "{":
            advance()
            var items: [(JinjaExpr, JinjaExpr)] = []
            while !isOp("}") {
                if !items.isEmpty { try expectOp(",") }
                if isOp("}") { break }
                let key = try parseExpression()
                try expectOp(":")
                items.append((key, try parseExpression()))
            }
            try expectOp("}")
            return .dict(items, pos(t))
        default:
            throw error("unexpected \(Self.describe(t)); expected an expression", at: t)
        }
    }

    private mutating func parsePostfix(_ node: JinjaExpr) throws -> JinjaExpr {
        var e = node
        while true {
            if isOp(".") || isOp("[") {
                e = try parseSubscript(e)
            } else if isOp("(") {
                e = try parseCall(e)
            } else {
                return e
            }
        }
    }

    private mutating func parseFilterExpr(_ node: JinjaExpr) throws -> JinjaExpr {
        var e = node
        while true {
            if isOp("|") {
                for f in try parseFilterChain(startInline: false) { e = .filter(e, f.name, f.args, f.pos) }
            } else if isName("is") {
                e = try parseTest(e)
            } else if isOp("(") {
                e = try parseCall(e)
            } else {
                return e
            }
        }
    }

    /// `|a(...)|b` (or `a(...)|b` when `startInline`, as in `{% filter %}`).
    private mutating func parseFilterChain(startInline: Bool) throws -> [JinjaFilterCall] {
        var filters: [JinjaFilterCall] = []
        var inline = startInline
        while isOp("|") || inline {
            if !inline { advance() }
            inline = false
            let t = current
            var name = try expectName()
            while skipOp(".") { name += "." + (try expectName()) }
            guard JinjaBuiltins.filterNames.contains(name) else {
                throw error("no filter named '\(name)' (unsupported or unknown)", at: t, kind: .unsupported)
            }
            let args = isOp("(") ? try parseCallArgs() : .empty
            filters.append(JinjaFilterCall(name: name, args: args, pos: pos(t)))
        }
        return filters
    }

    private mutating func parseTest(_ node: JinjaExpr) throws -> JinjaExpr {
        let isToken = current
        advance()
        let negated = skipName("not")
        let t = current
        var name = try expectName()
        while skipOp(".") { name += "." + (try expectName()) }
        guard JinjaBuiltins.testNames.contains(name) else {
            throw error("no test named '\(name)' (unsupported or unknown)", at: t, kind: .unsupported)
        }
        var args = JinjaArgs.empty
        if isOp("(") {
            args = try parseCallArgs()
        } else if [.name, .string, .integer, .float].contains(current.kind) || isOp("(") || isOp("[") || isOp("{"),
                  !(current.kind == .name && ["else", "or", "and"].contains(current.text)) {
            if isName("is") { throw error("you cannot chain multiple tests with 'is'", at: current) }
            args.positional = [try parsePostfix(try parsePrimary())]
        }
        let test = JinjaExpr.test(node, name, args, pos(isToken))
        return negated ? .not(test) : test
    }

    private mutating func parseSubscript(_ node: JinjaExpr) throws -> JinjaExpr {
        let t = current
        advance()
        if t.text == "." {
            let attr = current
            advance()
            if attr.kind == .name { return .getattr(node, attr.text, pos(t)) }
            if attr.kind == .integer { return .getitem(node, .const(.int(attr.intValue)), pos(t)) }
            throw error("expected a name or number after '.', got \(Self.describe(attr))", at: attr)
        }
        var args: [JinjaExpr] = []
        while !isOp("]") {
            if !args.isEmpty { try expectOp(",") }
            args.append(try parseSubscribed())
        }
        try expectOp("]")
        if args.isEmpty { throw error("expected an index or slice inside '[]'", at: t) }
        let arg = args.count == 1 ? args[0] : .tuple(args)
        if case .slice(_, let a, let b, let c, let p) = arg { return .slice(node, a, b, c, p) }
        return .getitem(node, arg, pos(t))
    }

    /// An index, or a slice `a:b:c` (returned as `.slice` with a placeholder base).
    private mutating func parseSubscribed() throws -> JinjaExpr {
        let t = current
        var parts: [JinjaExpr?] = []
        if skipOp(":") {
            parts.append(nil)
        } else {
            let e = try parseExpression()
            if !skipOp(":") { return e }
            parts.append(e)
        }
        if isOp(":") || isOp("]") || isOp(",") {
            parts.append(nil)
        } else {
            parts.append(try parseExpression())
        }
        if skipOp(":") {
            if isOp("]") || isOp(",") { parts.append(nil) } else { parts.append(try parseExpression()) }
        } else {
            parts.append(nil)
        }
        return .slice(.const(.none), parts[0], parts[1], parts[2], pos(t))
    }

    private mutating func parseCall(_ node: JinjaExpr) throws -> JinjaExpr {
        let t = current
        let args = try parseCallArgs()
        return .call(node, args, pos(t))
    }

    private mutating func parseCallArgs() throws -> JinjaArgs {
        try expectOp("(")
        var args = JinjaArgs()
        var needComma = false
        while !isOp(")") {
            if needComma {
                try expectOp(",")
                if isOp(")") { break }
            }
            if isOp("*") || isOp("**") {
                throw error("'*args' and '**kwargs' in calls are not supported", at: current, kind: .unsupported)
            }
            if current.kind == .name, peek().kind == .op, peek().text == "=" {
                let key = current.text
                advance(); advance()
                args.keyword.append((key, try parseExpression()))
            } else {
                if !args.keyword.isEmpty { throw error("positional argument after keyword argument", at: current) }
                args.positional.append(try parseExpression())
            }
            needComma = true
        }
        try expectOp(")")
        return args
    }
}
