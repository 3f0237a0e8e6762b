// jinja2's compile-time name analysis (jinja2/idtracking.py), reduced to the one fact our dynamic scopes
// cannot see: which names a frame starts as *undefined*.
//
// jinja2 compiles each frame (the template, a loop body, a macro body, a `with` body, ...) to Python
// locals. A name the frame assigns gets a local whose initial value depends on the first thing the
// analysis meets in that frame: a read first means "look it up outside" (like our scope chain); an
// assignment first means "alias the enclosing frame's variable" when an enclosing frame mentions the
// name anywhere, and otherwise "missing" (undefined), even if the render context has that name. So in
//
//     {% for m in messages %}{{ bos_token }}{% endfor %}{% set bos_token = '' %}
//
// the loop prints nothing: the template frame assigns `bos_token` before reading it. Names assigned in
// only some branches of an `if` are looked up outside instead. We record the "missing" names per frame and
// the interpreter starts them as Undefined when it enters the frame.

/// How a frame's local starts (jinja2's VAR_LOAD_* kinds).
private enum JinjaLoadKind {
    case parameter, resolve, alias, undefined
}

/// jinja2's `Symbols` for one frame.
private final class JinjaSymbols {
    let parent: JinjaSymbols?
    var refs: [String: JinjaLoadKind] = [:]
    var stores: Set<String> = []

    init(parent: JinjaSymbols?) { self.parent = parent }

    func copy() -> JinjaSymbols {
        let c = JinjaSymbols(parent: parent)
        c.refs = refs
        c.stores = stores
        return c
    }

    func findRef(_ name: String) -> Bool {
        if refs[name] != nil { return true }
        return parent?.findRef(name) ?? false
    }

    func load(_ name: String) {
        if !findRef(name) { refs[name] = .resolve }
    }

    func store(_ name: String) {
        stores.insert(name)
        if refs[name] == nil {
            refs[name] = (parent?.findRef(name) ?? false) ? .alias : .undefined
        }
    }

    func parameter(_ name: String) {
        stores.insert(name)
        refs[name] = .parameter
    }

    /// After an `if`: names first assigned inside a branch are looked up outside instead of starting undefined.
    func branchUpdate(_ branches: [JinjaSymbols]) {
        var newStores = Set<String>()
        for b in branches { newStores.formUnion(b.stores) }
        newStores.subtract(stores)
        for b in branches {
            refs.merge(b.refs) { _, new in new }
            stores.formUnion(b.stores)
        }
        for name in newStores {
            refs[name] = (parent?.findRef(name) ?? false) ? .alias : .resolve
        }
    }

    var undefinedNames: [String] {
        refs.filter { $0.value == .undefined }.map(\.key).sorted()
    }
}

enum JinjaScopeAnalysis {
    /// Fills `shadowed` for the template frame and every frame nested in it.
    static func analyze(template body: [JinjaStmt], root: JinjaFrame) {
        analyzeFrame(root, parent: nil) { v in v.visit(body) }
    }

    /// Analyzes one frame: `fill` visits its direct code; nested frames are analyzed afterwards, against the
    /// finished symbols of this one (as jinja2 compiles them).
    private static func analyzeFrame(_ frame: JinjaFrame, parent: JinjaSymbols?, _ fill: (FrameVisitor) -> Void) {
        let visitor = FrameVisitor(JinjaSymbols(parent: parent))
        fill(visitor)
        frame.shadowed = visitor.symbols.undefinedNames
        let symbols = visitor.symbols
        for child in visitor.children { child(symbols) }
    }

    private static func targetNames(_ t: JinjaTarget) -> [String] {
        switch t {
        case .name(let n): return [n]
        case .tuple(let items): return items.flatMap(targetNames)
        case .attribute: return []
        }
    }

    private static func analyzeMacro(_ def: JinjaMacroDef, parent: JinjaSymbols) {
        analyzeFrame(def.frame, parent: parent) { v in
            for p in def.params { v.symbols.parameter(p.name) }
            for p in def.params { if let d = p.defaultValue { v.visit(d) } }
            for special in ["caller", "varargs", "kwargs"] { v.symbols.parameter(special) }
            v.visit(def.body)
        }
    }

    /// jinja2's FrameSymbolVisitor: records loads and stores of one frame, queueing nested frames.
    private final class FrameVisitor {
        var symbols: JinjaSymbols
        var children: [(JinjaSymbols) -> Void] = []

        init(_ symbols: JinjaSymbols) { self.symbols = symbols }

        func visit(_ stmts: [JinjaStmt]) {
            for s in stmts { visit(s) }
        }

        func visit(_ stmt: JinjaStmt) {
            switch stmt {
            case .text, .breakLoop, .continueLoop:
                break
            case .output(let e, _):
                visit(e)
            case .ifChain(let branches, let otherwise):
                visitIf(branches[...], otherwise)
            case .forLoop(let loop):
                visit(loop.iterable)
                children.append { parent in
                    JinjaScopeAnalysis.analyzeFrame(loop.bodyFrame, parent: parent) { v in
                        for n in JinjaScopeAnalysis.targetNames(loop.target) { v.symbols.parameter(n) }
                        v.symbols.parameter("loop")
                        v.visit(loop.body)
                    }
                    JinjaScopeAnalysis.analyzeFrame(loop.elseFrame, parent: parent) { v in v.visit(loop.otherwise) }
                    JinjaScopeAnalysis.analyzeFrame(loop.testFrame, parent: parent) { v in
                        for n in JinjaScopeAnalysis.targetNames(loop.target) { v.symbols.parameter(n) }
                        if let c = loop.condition { v.visit(c) }
                    }
                }
            case .set(let target, let e, _):
                visit(e)
                visitTarget(target)
            case .setBlock(let target, _, let body, let frame, _):
                visitTarget(target)
                children.append { parent in
                    JinjaScopeAnalysis.analyzeFrame(frame, parent: parent) { v in v.visit(body) }
                }
            case .macro(let def):
                symbols.store(def.name)
                children.append { parent in JinjaScopeAnalysis.analyzeMacro(def, parent: parent) }
            case .callBlock(let call, let caller, _):
                visit(call)
                children.append { parent in JinjaScopeAnalysis.analyzeMacro(caller, parent: parent) }
            case .filterBlock(let filters, let body, let frame):
                for f in filters { visit(f.args) }
                children.append { parent in
                    JinjaScopeAnalysis.analyzeFrame(frame, parent: parent) { v in v.visit(body) }
                }
            case .with(let assignments, let body, let frame, _):
                for (_, value) in assignments { visit(value) }
                children.append { parent in
                    JinjaScopeAnalysis.analyzeFrame(frame, parent: parent) { v in
                        for (target, _) in assignments {
                            for n in JinjaScopeAnalysis.targetNames(target) { v.symbols.parameter(n) }
                        }
                        v.visit(body)
                    }
                }
            }
        }

        /// jinja2 parses `if/elif/else` as If(test, body, elif_=[If, ...], else_), each branch analyzed in a copy.
        private func visitIf(_ branches: ArraySlice<(JinjaExpr, [JinjaStmt])>, _ otherwise: [JinjaStmt]) {
            guard let (test, body) = branches.first else { return }
            visit(test)
            let original = symbols
            func inner(_ work: () -> Void) -> JinjaSymbols {
                symbols = original.copy()
                work()
                let result = symbols
                symbols = original
                return result
            }
            let bodySymbols = inner { visit(body) }
            let elifSymbols = inner {
                for (t, b) in branches.dropFirst() {
                    // Each elif is an If with no elif/else of its own.
                    visit(t)
                    let here = symbols
                    symbols = here.copy()
                    visit(b)
                    let branchSymbols = symbols
                    symbols = here
                    here.branchUpdate([branchSymbols, here.copy(), here.copy()])
                }
            }
            let elseSymbols = inner { visit(otherwise) }
            original.branchUpdate([bodySymbols, elifSymbols, elseSymbols])
        }

        func visitTarget(_ t: JinjaTarget) {
            switch t {
            case .name(let n): symbols.store(n)
            case .tuple(let items): for i in items { visitTarget(i) }
            case .attribute(let ns, _): symbols.load(ns)
            }
        }

        func visit(_ args: JinjaArgs) {
            for a in args.positional { visit(a) }
            for (_, a) in args.keyword { visit(a) }
        }

        func visit(_ e: JinjaExpr) {
            switch e {
            case .const: break
            case .name(let n, _): symbols.load(n)
            case .getattr(let o, _, _): visit(o)
            case .getitem(let o, let k, _): visit(o); visit(k)
            case .slice(let o, let a, let b, let c, _):
                visit(o)
                for x in [a, b, c] { if let x { visit(x) } }
            case .call(let f, let args, _): visit(f); visit(args)
            case .filter(let v, _, let args, _): visit(v); visit(args)
            case .test(let v, _, let args, _): visit(v); visit(args)
            case .negate(let x, _), .plus(let x, _), .not(let x): visit(x)
            case .and(let a, let b), .or(let a, let b): visit(a); visit(b)
            case .binary(_, let a, let b, _): visit(a); visit(b)
            case .concat(let items, _), .list(let items), .tuple(let items): for i in items { visit(i) }
            case .compare(let first, let ops, _):
                visit(first)
                for (_, x) in ops { visit(x) }
            case .conditional(let test, let then, let otherwise):
                // jinja2's CondExpr fields are (test, expr1, expr2), visited in that order.
                visit(test); visit(then)
                if let otherwise { visit(otherwise) }
            case .dict(let pairs, _):
                for (k, v) in pairs { visit(k); visit(v) }
            }
        }
    }
}
