import XCTest
@testable import QLoRA

/// A template cannot hang or exhaust memory: a step, time and size budget per render, with an error naming the line.
final class ChatTemplateBudgetTests: XCTestCase {
    func render(_ source: String, budget: ChatTemplateBudget = .standard) throws -> String {
        var t = try ChatTemplate(source: source)
        t.budget = budget
        return try t.renderAllowingEmpty(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil)
    }

    /// The hang of issue 9: nested range(100000) loops (10^10 iterations) now stop within the budget.
    func testNestedHugeLoopsStopWithTheLineOfTheLoop() throws {
        let source = "{{ 'start' }}\n{% for i in range(100000) %}\n{% for j in range(100000) %}{% endfor %}{% endfor %}"
        let start = monotonicSeconds()
        XCTAssertThrowsError(try render(source)) { error in
            guard let e = error as? ChatTemplateError else { return XCTFail("\(error)") }
            XCTAssertEqual(e.kind, .runtime)
            XCTAssertEqual(e.line, 3)
            XCTAssertTrue(e.message.hasPrefix("exceeded 5000000 steps") || e.message.hasPrefix("exceeded the time budget"), e.message)
            XCTAssertTrue(e.message.contains("while rendering line 3 of the template"), e.message)
        }
        XCTAssertLessThan(monotonicSeconds() - start, 8)
    }

    func testTheTimeBudgetStopsASlowRender() throws {
        let budget = ChatTemplateBudget(steps: .max, seconds: 0.05)
        XCTAssertThrowsError(try render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", budget: budget)) {
            XCTAssertTrue("\($0)".contains("exceeded the time budget of 0.05 s while rendering line 1"), "\($0)")
        }
    }

    func testHugeStringsAreRefused() throws {
        for source in ["{{ 'x' * 10**12 }}", "{{ 'abc' * 100000000 }}", "{{ [1, 2] * 10**15 }}", "{{ 'a' | indent(10**12) }}"] {
            XCTAssertThrowsError(try render(source), source) { XCTAssertTrue("\($0)".contains("larger than"), "\($0)") }
        }
        // Doubling a string in a loop passes the output budget.
        let doubling = "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
        XCTAssertThrowsError(try render(doubling)) { XCTAssertTrue("\($0)".contains("larger than"), "\($0)") }
        let budget = ChatTemplateBudget(stringBytes: 1000)
        XCTAssertThrowsError(try render("{% for i in range(100) %}{{ 'twenty bytes of text.' }}{% endfor %}", budget: budget)) {
            XCTAssertTrue("\($0)".contains("passed 1000 bytes"), "\($0)")
        }
        XCTAssertEqual(try render("{{ 'ab' * 3 }}"), "ababab")
    }

    func testIntegerOverflowInDivisionIsAnError() throws {
        XCTAssertThrowsError(try render("{{ (-9223372036854775807 - 1) // -1 }}"))
        XCTAssertEqual(try render("{{ (-9223372036854775807 - 1) % -1 }}"), "0")
    }

    /// Every real template renders its goldens well inside the budget: a tenth of the steps is plenty.
    func testRealTemplatesUseAFractionOfTheBudget() throws {
        let lines = try String(contentsOfFile: TestFixtures.path("chat-templates/goldens.jsonl"), encoding: .utf8).split(separator: "\n")
        var rendered = 0
        for line in lines {
            let golden = try JSONValue.parse(String(line))
            guard let name = golden["template"]?.string, let messages = golden["messages"]?.array, golden["error"] == nil,
                  let source = try? String(contentsOfFile: TestFixtures.path("chat-templates/" + name), encoding: .utf8) else { continue }
            var t = try ChatTemplate(source: source)
            t.fixedNow = 0
            t.budget = ChatTemplateBudget(steps: ChatTemplateBudget.standard.steps / 10)
            var extra: [String: JSONValue] = [:]
            for (key, value) in golden["extra"]?.object ?? JSONObject() { extra[key] = value }
            do {
                _ = try t.render(messages: messages, addGenerationPrompt: golden["add_generation_prompt"]?.bool ?? false,
                                 bosToken: golden["bos_token"]?.string, eosToken: golden["eos_token"]?.string, extra: extra)
                rendered += 1
            } catch let e as ChatTemplateError where e.kind == .raised {
                continue
            }
        }
        XCTAssertGreaterThan(rendered, 250)
    }
}
