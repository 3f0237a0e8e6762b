// The syntax tree of a parsed chat template: expressions and statements of the Jinja2 subset we run.

/// A source position (1-based line and column), carried by nodes that can fail at render time.
struct JinjaPos {
    var line: Int32
    var column: Int32
}

indirect enum JinjaExpr {
    case const(JinjaValue)
    case name(String, JinjaPos)
    case getattr(JinjaExpr, String, JinjaPos)
    case getitem(JinjaExpr, JinjaExpr, JinjaPos)
    case slice(JinjaExpr, JinjaExpr?, JinjaExpr?, JinjaExpr?, JinjaPos)
    case call(JinjaExpr, JinjaArgs, JinjaPos)
    case filter(JinjaExpr, String, JinjaArgs, JinjaPos)
    case test(JinjaExpr, String, JinjaArgs, JinjaPos)
    case negate(JinjaExpr, JinjaPos)
    case plus(JinjaExpr, JinjaPos)
    case not(JinjaExpr)
    case and(JinjaExpr, JinjaExpr)
    case or(JinjaExpr, JinjaExpr)
    case binary(JinjaBinaryOp, JinjaExpr, JinjaExpr, JinjaPos)
    case concat([JinjaExpr], JinjaPos)
    case compare(JinjaExpr, [(JinjaCompareOp, JinjaExpr)], JinjaPos)
    case conditional(test: JinjaExpr, then: JinjaExpr, otherwise: JinjaExpr?)
    case list([JinjaExpr])
    case tuple([JinjaExpr])
    case dict([(JinjaExpr, JinjaExpr)], JinjaPos)
}

/// Arguments of a call, filter or test.
struct JinjaArgs {
    var positional: [JinjaExpr] = []
    var keyword: [(String, JinjaExpr)] = []
    static let empty = JinjaArgs()
}

enum JinjaBinaryOp: String {
    case add = "+", sub = "-", mul = "*", div = "/", floordiv = "//", mod = "%", pow = "**"
}

enum JinjaCompareOp: String {
    case eq = "==", ne = "!=", lt = "<", le = "<=", gt = ">", ge = ">=", `in` = "in", notIn = "not in"
}

/// The left side of `set` and the variables of `for`.
enum JinjaTarget {
    case name(String)
    case tuple([JinjaTarget])
    /// `ns.attr` (only namespaces may be assigned to).
    case attribute(String, String)
}

/// One macro parameter with its optional default.
struct JinjaParam {
    var name: String
    var defaultValue: JinjaExpr?
}

/// A jinja2 "frame" (template, loop body, macro body, ...): the names its code assigns before any read,
/// which jinja2 starts as undefined, hiding same-named outer or context values (filled by `JinjaScopeAnalysis`).
final class JinjaFrame {
    var shadowed: [String] = []
}

final class JinjaMacroDef {
    let name: String
    let params: [JinjaParam]
    let body: [JinjaStmt]
    let frame = JinjaFrame()
    init(name: String, params: [JinjaParam], body: [JinjaStmt]) {
        self.name = name
        self.params = params
        self.body = body
    }
}

/// A filter applied by `{% filter %}` blocks and block `set`.
struct JinjaFilterCall {
    var name: String
    var args: JinjaArgs
    var pos: JinjaPos
}

indirect enum JinjaStmt {
    case text(String)
    case output(JinjaExpr, JinjaPos)
    case ifChain([(JinjaExpr, [JinjaStmt])], otherwise: [JinjaStmt])
    case forLoop(JinjaForLoop)
    case set(JinjaTarget, JinjaExpr, JinjaPos)
    case setBlock(JinjaTarget, [JinjaFilterCall], [JinjaStmt], JinjaFrame, JinjaPos)
    case macro(JinjaMacroDef)
    /// `{% call m(...) %}body{% endcall %}`: `caller` is the body as a macro.
    case callBlock(call: JinjaExpr, caller: JinjaMacroDef, JinjaPos)
    case filterBlock([JinjaFilterCall], [JinjaStmt], JinjaFrame)
    case with([(JinjaTarget, JinjaExpr)], [JinjaStmt], JinjaFrame, JinjaPos)
    case breakLoop
    case continueLoop
}

struct JinjaForLoop {
    var target: JinjaTarget
    var iterable: JinjaExpr
    var condition: JinjaExpr?
    var body: [JinjaStmt]
    var otherwise: [JinjaStmt]
    var pos: JinjaPos
    let bodyFrame = JinjaFrame()
    let elseFrame = JinjaFrame()
    let testFrame = JinjaFrame()
}
