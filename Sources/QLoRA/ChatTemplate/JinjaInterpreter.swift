// Runs a parsed chat template: statements, expressions and jinja2's scoping rules.
//
// Scoping, as jinja2 behaves (checked against jinja2 3.1): `set` writes to the innermost scope;
// `if` opens no scope; every `for` iteration runs in a fresh scope whose parent is the scope around
// the loop (so a `set` inside a loop is gone after the loop and at the next iteration, which is why
// templates use `namespace()`); macros see the scope they were defined in, live, plus their arguments.
// Attribute and item lookups follow the sandbox's `getattr`/`getitem`: `d.key` falls back to `d['key']`,
// `d['items']` falls back to the `items` method, and a missing key is Undefined, not an error.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A failure inside a builtin, given a source position by the node that called it.
struct JinjaFailure: Error {
    var message: String
    /// True for the template's own `raise_exception(...)`.
    var raised = false
    init(_ message: String, raised: Bool = false) {
        self.message = message
        self.raised = raised
    }
}

/// One level of variables.
final class JinjaScope {
    var vars: [String: JinjaValue] = [:]
    let parent: JinjaScope?
    init(parent: JinjaScope?) { self.parent = parent }

    func lookup(_ name: String) -> JinjaValue? {
        var s: JinjaScope? = self
        while let scope = s {
            if let v = scope.vars[name] { return v }
            s = scope.parent
        }
        return nil
    }
}

/// What a statement list asks of the loop around it.
enum JinjaFlow {
    case normal, breakLoop, continueLoop
}

/// Limits on one render, so that a template (it comes with a model from the internet) cannot hang or exhaust
/// memory: nested `range(100000)` loops, macros calling themselves, huge string products. Real templates use a
/// few thousand steps per conversation; the limits are far above that.
public struct ChatTemplateBudget: Sendable, Equatable {
    /// Loop iterations plus statements and expressions evaluated.
    public var steps: Int
    /// Wall-clock seconds for one render.
    public var seconds: Double
    /// Bytes of any one string built (the output included).
    public var stringBytes: Int

    public init(steps: Int = 5_000_000, seconds: Double = 5, stringBytes: Int = 64 << 20) {
        self.steps = steps
        self.seconds = seconds
        self.stringBytes = stringBytes
    }

    public static let standard = ChatTemplateBudget()
}

final class JinjaInterpreter {
    /// Unix seconds to use for `strftime_now` (formatted in UTC), instead of the local clock.
    let fixedNow: Int64?
    let globals: [String: JinjaValue]
    let budget: ChatTemplateBudget
    private var steps = 0
    private let deadline: Double
    /// The innermost statement or loop being run, named when a budget runs out.
    private var currentPos = JinjaPos(line: 1, column: 1)
    /// Macro calls in progress; bounded like Python's recursion limit, so runaway recursion is an error, not a crash.
    private var macroDepth = 0
    private static let maxMacroDepth = 200

    init(fixedNow: Int64?, budget: ChatTemplateBudget = .standard) {
        self.fixedNow = fixedNow
        self.budget = budget
        deadline = monotonicSeconds() + budget.seconds
        globals = JinjaBuiltins.globals(fixedNow: fixedNow)
    }

    /// Counts one step; throws when the step or time budget is spent.
    @inline(__always)
    func tick() throws {
        steps += 1
        if steps > budget.steps {
            throw ChatTemplateError(kind: .runtime, line: Int(currentPos.line), column: Int(currentPos.column),
                                    message: "exceeded \(budget.steps) steps (loop iterations and evaluations) while rendering line \(currentPos.line) of the template; it may loop without end")
        }
        if steps & 4095 == 0 && monotonicSeconds() > deadline {
            throw ChatTemplateError(kind: .runtime, line: Int(currentPos.line), column: Int(currentPos.column),
                                    message: "exceeded the time budget of \(budget.seconds) s while rendering line \(currentPos.line) of the template; it may loop without end")
        }
    }

    /// Throws when a string being built passes the size budget.
    @inline(__always)
    func checkSize(_ s: String) throws {
        if s.utf8.count > budget.stringBytes {
            throw ChatTemplateError(kind: .runtime, line: Int(currentPos.line), column: Int(currentPos.column),
                                    message: "the rendered text passed \(budget.stringBytes) bytes while rendering line \(currentPos.line) of the template")
        }
    }

    // MARK: Errors

    static func error(_ f: JinjaFailure, _ pos: JinjaPos) -> ChatTemplateError {
        ChatTemplateError(kind: f.raised ? .raised : .runtime, line: Int(pos.line), column: Int(pos.column), message: f.message)
    }

    @inline(__always)
    func at<T>(_ pos: JinjaPos, _ body: () throws -> T) throws -> T {
        do { return try body() } catch let f as JinjaFailure { throw Self.error(f, pos) }
    }

    // MARK: Statements

    func exec(_ stmts: [JinjaStmt], _ scope: JinjaScope, _ out: inout String) throws -> JinjaFlow {
        for stmt in stmts {
            try tick()
            switch stmt {
            case .text(let t):
                out += t
                try checkSize(out)
            case .output(let e, let pos):
                currentPos = pos
                let v = try eval(e, scope)
                switch v {
                case .string(let s): out += s
                case .undefined: break
                default: try at(pos) { out += v.pyStr }
                }
                try checkSize(out)
            case .ifChain(let branches, let otherwise):
                var taken = false
                for (cond, body) in branches {
                    guard try eval(cond, scope).truthy else { continue }
                    taken = true
                    let flow = try exec(body, scope, &out)
                    if flow != .normal { return flow }
                    break
                }
                if !taken {
                    let flow = try exec(otherwise, scope, &out)
                    if flow != .normal { return flow }
                }
            case .forLoop(let loop):
                try execFor(loop, scope, &out)
            case .set(let target, let e, let pos):
                currentPos = pos
                let v = try eval(e, scope)
                try at(pos) { try assign(target, v, scope) }
            case .setBlock(let target, let filters, let body, let frame, let pos):
                var text = ""
                _ = try exec(body, enter(frame, scope), &text)
                var v = JinjaValue.string(text)
                for f in filters { v = try applyFilter(f.name, v, f.args, scope, f.pos) }
                try at(pos) { try assign(target, v, scope) }
            case .macro(let def):
                scope.vars[def.name] = .callable(makeMacro(def, scope))
            case .callBlock(let call, let callerDef, let pos):
                guard case .call(let callee, let args, _) = call else { break }
                let caller = makeMacro(callerDef, scope)
                let f = try eval(callee, scope)
                let (positional, keyword0) = try evalArgs(args, scope)
                let keyword = keyword0 + [("caller", JinjaValue.callable(caller))]
                let v = try at(pos) { () throws -> JinjaValue in
                    guard case .callable(let c) = f else { throw JinjaFailure("'\(f.typeName)' object is not callable") }
                    return try c.call(positional, keyword)
                }
                out += v.pyStr
                try checkSize(out)
            case .filterBlock(let filters, let body, let frame):
                var text = ""
                _ = try exec(body, enter(frame, scope), &text)
                var v = JinjaValue.string(text)
                for f in filters { v = try applyFilter(f.name, v, f.args, scope, f.pos) }
                out += v.pyStr
                try checkSize(out)
            case .with(let assignments, let body, let frame, let pos):
                let values = try assignments.map { try eval($0.1, scope) }
                let inner = enter(frame, scope)
                for (i, (target, _)) in assignments.enumerated() {
                    try at(pos) { try assign(target, values[i], inner) }
                }
                let flow = try exec(body, inner, &out)
                if flow != .normal { return flow }
            case .breakLoop:
                return .breakLoop
            case .continueLoop:
                return .continueLoop
            }
        }
        return .normal
    }

    /// A new scope for a frame, with the frame's assigned-before-read names starting undefined (as jinja2's
    /// `l_N_name = missing`), so they hide outer and context values until assigned.
    func enter(_ frame: JinjaFrame, _ parent: JinjaScope) -> JinjaScope {
        let s = JinjaScope(parent: parent)
        for name in frame.shadowed { s.vars[name] = .undefined("'\(name)' is undefined") }
        return s
    }

    private func execFor(_ loop: JinjaForLoop, _ scope: JinjaScope, _ out: inout String) throws {
        let iterable = try eval(loop.iterable, scope)
        guard var items = iterable.pyIterate else {
            throw Self.error(JinjaFailure("'\(iterable.typeName)' object is not iterable"), loop.pos)
        }
        if let condition = loop.condition {
            var kept: [JinjaValue] = []
            for item in items {
                try tick()
                let s = enter(loop.testFrame, scope)
                try at(loop.pos) { try assign(loop.target, item, s) }
                if try eval(condition, s).truthy { kept.append(item) }
            }
            items = kept
        }
        // `loop.depth` only grows in recursive loops, which are not supported: always 1 here, as in jinja2.
        let state = JinjaLoop(items: items, depth0: 0)
        // jinja2 clears its "no iteration" flag at the end of the loop body, so `else` also runs when every
        // iteration ended in `continue`/`break` before reaching the end.
        var completedAnIteration = false
        for (i, item) in items.enumerated() {
            currentPos = loop.pos
            try tick()
            state.index0 = i
            let s = enter(loop.bodyFrame, scope)
            try at(loop.pos) { try assign(loop.target, item, s) }
            s.vars["loop"] = .loop(state)
            let flow = try exec(loop.body, s, &out)
            if flow == .breakLoop { break }
            if flow == .normal { completedAnIteration = true }
        }
        if !completedAnIteration && !loop.otherwise.isEmpty {
            _ = try exec(loop.otherwise, enter(loop.elseFrame, scope), &out)
        }
    }

    private func assign(_ target: JinjaTarget, _ value: JinjaValue, _ scope: JinjaScope) throws {
        switch target {
        case .name(let n):
            scope.vars[n] = value
        case .tuple(let targets):
            guard let items = value.pyIterate else { throw JinjaFailure("cannot unpack non-iterable \(value.typeName) object") }
            guard items.count == targets.count else {
                throw JinjaFailure(items.count < targets.count
                    ? "not enough values to unpack (expected \(targets.count), got \(items.count))"
                    : "too many values to unpack (expected \(targets.count))")
            }
            for (t, v) in zip(targets, items) { try assign(t, v, scope) }
        case .attribute(let ns, let attr):
            guard case .namespace(let n)? = scope.lookup(ns) ?? globals[ns] else {
                throw JinjaFailure("cannot assign attribute on non-namespace object")
            }
            n.attributes[attr] = value
        }
    }

    /// Scopes that defined macros, kept for the whole render: a macro may outlive its scope (stored in a
    /// namespace from inside a loop), and the macro holds its scope weakly to avoid a reference cycle.
    private var macroScopes: [JinjaScope] = []

    private func makeMacro(_ def: JinjaMacroDef, _ scope: JinjaScope) -> JinjaCallable {
        macroScopes.append(scope)
        return JinjaCallable(name: def.name) { [weak self, weak scope] args, kwargs in
            guard let self, let scope else { throw JinjaFailure("macro '\(def.name)' called after its template finished") }
            guard self.macroDepth < Self.maxMacroDepth else {
                throw JinjaFailure("macro '\(def.name)': maximum recursion depth (\(Self.maxMacroDepth)) exceeded")
            }
            self.macroDepth += 1
            defer { self.macroDepth -= 1 }
            let s = self.enter(def.frame, scope)
            var extraKw = JinjaDict()
            var given: [String: JinjaValue] = [:]
            for (k, v) in kwargs {
                if def.params.contains(where: { $0.name == k }) { given[k] = v }
                else if k == "caller" { s.vars["caller"] = v }
                else { extraKw[k] = v }
            }
            for (i, p) in def.params.enumerated() {
                if i < args.count {
                    if given[p.name] != nil { throw JinjaFailure("macro '\(def.name)' got multiple values for argument '\(p.name)'") }
                    s.vars[p.name] = args[i]
                } else if let v = given[p.name] {
                    s.vars[p.name] = v
                } else if let d = p.defaultValue {
                    s.vars[p.name] = try self.eval(d, s)
                } else {
                    s.vars[p.name] = .undefined("parameter '\(p.name)' was not provided")
                }
            }
            s.vars["varargs"] = .tuple(args.count > def.params.count ? Array(args[def.params.count...]) : [])
            s.vars["kwargs"] = .dict(extraKw)
            var text = ""
            _ = try self.exec(def.body, s, &text)
            return .string(text)
        }
    }

    // MARK: Expressions

    func eval(_ e: JinjaExpr, _ scope: JinjaScope) throws -> JinjaValue {
        try tick()
        switch e {
        case .const(let v):
            return v
        case .name(let n, _):
            if let v = scope.lookup(n) ?? globals[n] { return v }
            return .undefined("'\(n)' is undefined")
        case .getattr(let obj, let name, let pos):
            let o = try eval(obj, scope)
            return try at(pos) { try getattr(o, name) }
        case .getitem(let obj, let key, let pos):
            let o = try eval(obj, scope)
            let k = try eval(key, scope)
            return try at(pos) { try getitem(o, k) }
        case .slice(let obj, let a, let b, let c, let pos):
            let o = try eval(obj, scope)
            let start = try a.map { try eval($0, scope) }
            let stop = try b.map { try eval($0, scope) }
            let step = try c.map { try eval($0, scope) }
            return try at(pos) { try JinjaBuiltins.slice(o, start, stop, step) }
        case .call(let callee, let args, let pos):
            // Method calls (`s.strip()`, `d.items()`) skip making a bound-method value.
            if case .getattr(let objExpr, let name, _) = callee {
                let o = try eval(objExpr, scope)
                let (positional, keyword) = try evalArgs(args, scope)
                return try at(pos) { () throws -> JinjaValue in
                    if let v = try JinjaBuiltins.callMethod(o, name, positional, keyword) { return v }
                    let f = try getattr(o, name)
                    return try call(f, positional, keyword)
                }
            }
            let f = try eval(callee, scope)
            let (positional, keyword) = try evalArgs(args, scope)
            return try at(pos) { try call(f, positional, keyword) }
        case .filter(let value, let name, let args, let pos):
            let v = try eval(value, scope)
            return try applyFilter(name, v, args, scope, pos)
        case .test(let value, let name, let args, let pos):
            let v = try eval(value, scope)
            let (positional, keyword) = try evalArgs(args, scope)
            return try at(pos) { .bool(try JinjaBuiltins.test(name, v, positional, keyword)) }
        case .negate(let x, let pos):
            let v = try eval(x, scope)
            return try at(pos) { () throws -> JinjaValue in
                switch v {
                case .int(let i):
                    guard i != .min else { throw JinjaFailure("integer overflow") }
                    return .int(-i)
                case .float(let d): return .float(-d)
                case .bool(let b): return .int(b ? -1 : 0)
                case .undefined(let m): throw JinjaFailure(m)
                default: throw JinjaFailure("bad operand type for unary -: '\(v.typeName)'")
                }
            }
        case .plus(let x, let pos):
            let v = try eval(x, scope)
            return try at(pos) { () throws -> JinjaValue in
                switch v {
                case .int, .float: return v
                case .bool(let b): return .int(b ? 1 : 0)
                case .undefined(let m): throw JinjaFailure(m)
                default: throw JinjaFailure("bad operand type for unary +: '\(v.typeName)'")
                }
            }
        case .not(let x):
            return .bool(!(try eval(x, scope).truthy))
        case .and(let a, let b):
            let l = try eval(a, scope)
            return l.truthy ? try eval(b, scope) : l
        case .or(let a, let b):
            let l = try eval(a, scope)
            return l.truthy ? l : try eval(b, scope)
        case .binary(let op, let a, let b, let pos):
            let l = try eval(a, scope)
            let r = try eval(b, scope)
            return try at(pos) { try JinjaBuiltins.binary(op, l, r) }
        case .concat(let items, _):
            var s = ""
            for item in items {
                s += try eval(item, scope).pyStr
                try checkSize(s)
            }
            return .string(s)
        case .compare(let first, let ops, let pos):
            var left = try eval(first, scope)
            for (op, expr) in ops {
                let right = try eval(expr, scope)
                let ok = try at(pos) { try JinjaBuiltins.compare(op, left, right) }
                if !ok { return .bool(false) }
                left = right
            }
            return .bool(true)
        case .conditional(let test, let then, let otherwise):
            if try eval(test, scope).truthy { return try eval(then, scope) }
            if let otherwise { return try eval(otherwise, scope) }
            return .undefined("the inline if-expression evaluated to false and no else section was defined")
        case .list(let items):
            return .list(try items.map { try eval($0, scope) })
        case .tuple(let items):
            return .tuple(try items.map { try eval($0, scope) })
        case .dict(let pairs, let pos):
            var d = JinjaDict()
            for (k, v) in pairs {
                let key = try eval(k, scope)
                guard case .string(let ks) = key else {
                    throw Self.error(JinjaFailure("only string keys are supported in dict literals, got \(key.typeName)"), pos)
                }
                d[ks] = try eval(v, scope)
            }
            return .dict(d)
        }
    }

    func evalArgs(_ args: JinjaArgs, _ scope: JinjaScope) throws -> ([JinjaValue], [(String, JinjaValue)]) {
        if args.positional.isEmpty && args.keyword.isEmpty { return ([], []) }
        let positional = try args.positional.map { try eval($0, scope) }
        let keyword = try args.keyword.map { ($0.0, try eval($0.1, scope)) }
        return (positional, keyword)
    }

    func call(_ f: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue {
        switch f {
        case .callable(let c): return try c.call(args, kwargs)
        case .undefined(let m): throw JinjaFailure(m)
        default: throw JinjaFailure("'\(f.typeName)' object is not callable")
        }
    }

    private func applyFilter(_ name: String, _ v: JinjaValue, _ args: JinjaArgs, _ scope: JinjaScope, _ pos: JinjaPos) throws -> JinjaValue {
        let (positional, keyword) = try evalArgs(args, scope)
        return try at(pos) { try JinjaBuiltins.filter(name, v, positional, keyword) }
    }

    func getattr(_ o: JinjaValue, _ name: String) throws -> JinjaValue { try JinjaBuiltins.getattr(o, name) }
    func getitem(_ o: JinjaValue, _ key: JinjaValue) throws -> JinjaValue { try JinjaBuiltins.getitem(o, key) }
}

extension JinjaValue {
    var isFloat: Bool { if case .float = self { return true }; return false }
}
