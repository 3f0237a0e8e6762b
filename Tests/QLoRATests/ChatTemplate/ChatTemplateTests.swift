import XCTest
@testable import QLoRA

/// Chat templates rendered by our interpreter must equal Python jinja2's output (configured as transformers
/// configures it) byte for byte. Goldens: Tests/Fixtures/smollm2-tokenizer/goldens.jsonl (chat lines) and
/// Tests/Fixtures/chat-templates/goldens.jsonl (scripts/make_chat_template_goldens.py).
final class ChatTemplateTests: XCTestCase {
    /// 2024-07-26 12:00:00 UTC, the instant the golden script pins `strftime_now` to.
    static let goldenNow: Int64 = 1_721_995_200

    private func goldenLines(_ relative: String) throws -> [JSONValue] {
        let text = try String(contentsOfFile: TestFixtures.path(relative), encoding: .utf8)
        return try text.split(separator: "\n").map { try JSONValue.parse(String($0)) }
    }

    private func extra(_ json: JSONValue?) -> [String: JSONValue] {
        var out: [String: JSONValue] = [:]
        if case .object(let o)? = json { for (k, v) in o { out[k] = v } }
        return out
    }

    // MARK: Goldens

    func testSmolLM2ChatGoldens() throws {
        let template = try XCTUnwrap(try ChatTemplate.load(directory: TestFixtures.smolTokenizer))
        var checked = 0
        for line in try goldenLines("smollm2-tokenizer/goldens.jsonl") {
            guard let chat = line["chat"]?.array else { continue }
            let rendered = try template.render(messages: chat, addGenerationPrompt: line["add_generation_prompt"]?.bool ?? false,
                                               bosToken: "<|im_start|>", eosToken: "<|im_end|>")
            XCTAssertEqual(rendered, line["rendered"]?.string)
            checked += 1
        }
        XCTAssertEqual(checked, 4)
    }

    func testModelFamilyTemplatesMatchJinja2() throws {
        var templates: [String: ChatTemplate] = [:]
        var rendered = 0, failures = 0
        for line in try goldenLines("chat-templates/goldens.jsonl") {
            guard let file = line["template"]?.string else { continue }
            if templates[file] == nil {
                var t = try ChatTemplate(source: try String(contentsOfFile: TestFixtures.path("chat-templates/" + file), encoding: .utf8))
                t.fixedNow = Self.goldenNow
                templates[file] = t
            }
            let template = templates[file]!
            let label = "\(file) / \(line["case"]?.string ?? "?") / agp=\(line["add_generation_prompt"]?.bool ?? false)"
            do {
                let out = try template.render(messages: line["messages"]?.array ?? [],
                                              addGenerationPrompt: line["add_generation_prompt"]?.bool ?? false,
                                              bosToken: line["bos_token"]?.string, eosToken: line["eos_token"]?.string,
                                              extra: extra(line["extra"]))
                if let expected = line["rendered"]?.string {
                    XCTAssertEqual(out, expected, label)
                    rendered += 1
                } else {
                    XCTFail("\(label): jinja2 failed with \(line["error"]?.string ?? "") but we rendered \(out.debugDescription)")
                }
            } catch let e as ChatTemplateError {
                if let message = line["error"]?.string {
                    failures += 1
                    if line["raised"]?.bool == true {
                        XCTAssertEqual(e.kind, .raised, label)
                        XCTAssertEqual(e.message, message, label)
                    } else {
                        XCTAssertNotEqual(e.kind, .raised, label)
                    }
                } else {
                    XCTFail("\(label): \(e)")
                }
            }
        }
        // 23 templates × 42 conversations × add_generation_prompt both ways (see the fixture's README).
        XCTAssertEqual(templates.count, 23)
        XCTAssertEqual(rendered + failures, 23 * 84)
        XCTAssertGreaterThan(rendered, 1500)
        XCTAssertGreaterThan(failures, 200)
    }

    func testLanguageSnippetsMatchJinja2() throws {
        var count = 0
        let lines = try goldenLines("chat-templates/goldens.jsonl")
        let randomContext = lines.compactMap { $0["random_context"] }.first
        for line in lines {
            guard let source = line["snippet"]?.string else { continue }
            count += 1
            let context = extra(line["context"]?.string == "random" ? randomContext : line["context"])
            var vars = context
            vars["messages"] = nil
            do {
                var t = try ChatTemplate(source: source)
                t.fixedNow = Self.goldenNow
                let out = try t.renderAllowingEmpty(messages: context["messages"]?.array ?? [], addGenerationPrompt: false,
                                       bosToken: nil, eosToken: nil, extra: vars)
                if let expected = line["rendered"]?.string {
                    XCTAssertEqual(out, expected, source)
                } else {
                    XCTFail("\(source.debugDescription): jinja2 failed with \(line["error"]?.string ?? "") but we rendered \(out.debugDescription)")
                }
            } catch let e as ChatTemplateError {
                if let message = line["error"]?.string {
                    if line["raised"]?.bool == true {
                        XCTAssertEqual(e.kind, .raised, source)
                        XCTAssertEqual(e.message, message, source)
                    }
                } else {
                    XCTFail("\(source.debugDescription): \(e)")
                }
            }
        }
        XCTAssertGreaterThan(count, 700)
    }

    // MARK: API and errors

    func testRaiseExceptionOnRoleAlternation() throws {
        let t = try ChatTemplate(source: try String(contentsOfFile: TestFixtures.path("chat-templates/llama-2.jinja"), encoding: .utf8))
        let messages: [JSONValue] = [
            .object(JSONObject([("role", .string("user")), ("content", .string("a"))])),
            .object(JSONObject([("role", .string("user")), ("content", .string("b"))])),
        ]
        XCTAssertThrowsError(try t.render(messages: messages, addGenerationPrompt: false, bosToken: "<s>", eosToken: "</s>")) { error in
            guard let e = error as? ChatTemplateError else { return XCTFail("\(error)") }
            XCTAssertEqual(e.kind, .raised)
            XCTAssertEqual(e.message, "Conversation roles must alternate user/assistant/user/assistant/...")
            XCTAssertEqual(e.line, 1)
            XCTAssertGreaterThan(e.column, 1)
        }
    }

    func testSyntaxErrorsGiveLineAndColumn() {
        func failure(_ source: String) -> ChatTemplateError? {
            do { _ = try ChatTemplate(source: source); return nil } catch { return error as? ChatTemplateError }
        }
        let unclosed = failure("a\n{% if x %}\nb")
        XCTAssertEqual(unclosed?.kind, .syntax)
        XCTAssertTrue(unclosed?.message.contains("endif") ?? false, "\(String(describing: unclosed))")

        let badExpr = failure("line one\n  {{ 1 + }}")
        XCTAssertEqual(badExpr?.line, 2)
        XCTAssertEqual(badExpr?.column, 10)
        XCTAssertEqual(badExpr?.kind, .syntax)

        XCTAssertEqual(failure("{{ x | nosuchfilter }}")?.kind, .unsupported)
        XCTAssertEqual(failure("{{ x is nosuchtest }}")?.kind, .unsupported)
        XCTAssertEqual(failure("{% include 'other.jinja' %}")?.kind, .unsupported)
        XCTAssertEqual(failure("{% for x in y recursive %}{% endfor %}")?.kind, .unsupported)
        XCTAssertEqual(failure("{% endfor %}")?.kind, .syntax)
        XCTAssertEqual(failure("{{ 'unterminated }}")?.kind, .syntax)
        XCTAssertEqual(failure("{# never closed")?.kind, .syntax)
        XCTAssertEqual(failure("{{ (1 }}")?.kind, .syntax)
        XCTAssertNotNil(failure("{% set %}"))
    }

    func testRuntimeErrorsGiveLineAndColumn() throws {
        let t = try ChatTemplate(source: "ok\n{{ messages[0].missing.deeper }}")
        XCTAssertThrowsError(try t.render(messages: [.object(JSONObject())], addGenerationPrompt: false, bosToken: nil, eosToken: nil)) { error in
            guard let e = error as? ChatTemplateError else { return XCTFail("\(error)") }
            XCTAssertEqual(e.kind, .runtime)
            XCTAssertEqual(e.line, 2)
            XCTAssertTrue(e.message.contains("missing"), e.message)
        }
    }

    func testLoadFindsTemplateWhereTransformersKeepsIt() throws {
        let dir = try TestFixtures.temporaryDirectory()
        XCTAssertNil(try ChatTemplate.load(directory: dir))

        try #"{"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}"#
            .write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        let fromConfig = try XCTUnwrap(try ChatTemplate.load(directory: dir))
        let msgs: [JSONValue] = [.object(JSONObject([("role", .string("user")), ("content", .string("hi"))]))]
        XCTAssertEqual(try fromConfig.render(messages: msgs, addGenerationPrompt: false, bosToken: "<s>", eosToken: nil), "<s>hi")

        try #"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]}"#
            .write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(directory: dir)?.render(messages: msgs, addGenerationPrompt: false, bosToken: nil, eosToken: nil), "D1")

        try #"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#
            .write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ChatTemplate.load(directory: dir))

        // chat_template.jinja wins over tokenizer_config.json, as in transformers.
        try "J{{ add_generation_prompt }}".write(toFile: dir + "/chat_template.jinja", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(directory: dir)?.render(messages: msgs, addGenerationPrompt: true, bosToken: nil, eosToken: nil), "JTrue")

        try "{{ x | bogus }}".write(toFile: dir + "/chat_template.jinja", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ChatTemplate.load(directory: dir)) { error in
            XCTAssertTrue(error is FileFormatError, "\(error)")
        }
    }

    func testRunawayRecursionAndNestingAreErrorsNotCrashes() throws {
        let t = try ChatTemplate(source: "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}")
        XCTAssertThrowsError(try t.renderAllowingEmpty(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil)) { error in
            XCTAssertEqual((error as? ChatTemplateError)?.kind, .runtime, "\(error)")
        }
        let deep = "{{ " + String(repeating: "(", count: 5000) + "1" + String(repeating: ")", count: 5000) + " }}"
        XCTAssertThrowsError(try ChatTemplate(source: deep))
        let deepBlocks = String(repeating: "{% if true %}", count: 2000) + String(repeating: "{% endif %}", count: 2000)
        XCTAssertThrowsError(try ChatTemplate(source: deepBlocks))
        // Reasonable nesting still works.
        let ok = try ChatTemplate(source: "{{ " + String(repeating: "(", count: 50) + "1" + String(repeating: ")", count: 50) + " }}")
        XCTAssertEqual(try ok.renderAllowingEmpty(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil), "1")
    }

    /// transformers' `{% generation %}` (assistant-mask marker) renders its body unchanged.
    func testGenerationBlockRendersItsBody() throws {
        let t = try ChatTemplate(source: "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A:{{ m.content }}{% endgeneration %}{% else %}U:{{ m.content }}{% endif %}\n{% endfor %}")
        let msgs: [JSONValue] = [
            .object(JSONObject([("role", .string("user")), ("content", .string("q"))])),
            .object(JSONObject([("role", .string("assistant")), ("content", .string("a"))])),
        ]
        XCTAssertEqual(try t.render(messages: msgs, addGenerationPrompt: false, bosToken: nil, eosToken: nil), "U:qA:a")  // trim_blocks eats the newlines
    }

    func testSpecialTokensFromTokenizerConfig() throws {
        let tokens = try ChatTemplate.specialTokens(directory: TestFixtures.smolTokenizer)
        XCTAssertEqual(tokens["bos_token"], .string("<|im_start|>"))
        XCTAssertEqual(tokens["eos_token"], .string("<|im_end|>"))
        XCTAssertEqual(tokens["unk_token"], .string("<|endoftext|>"))
        XCTAssertEqual(tokens["pad_token"], .string("<|im_end|>"))
        XCTAssertNil(tokens["mask_token"])

        let dir = try TestFixtures.temporaryDirectory()
        try #"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false}, "eos_token": null, "additional_special_tokens": ["<a>", {"content": "<b>"}]}"#
            .write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        let other = try ChatTemplate.specialTokens(directory: dir)
        XCTAssertEqual(other["bos_token"], .string("<s>"))
        XCTAssertNil(other["eos_token"])
        XCTAssertEqual(other["additional_special_tokens"], .array([.string("<a>"), .string("<b>")]))
        let t = try ChatTemplate(source: "{{ bos_token }}{{ additional_special_tokens|join(',') }}")
        XCTAssertEqual(try t.renderAllowingEmpty(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil, extra: other), "<s><a>,<b>")
    }

    func testStrftimeNowUsesTheClock() throws {
        let t = try ChatTemplate(source: "{{ strftime_now('%Y') }}")
        let year = try t.renderAllowingEmpty(messages: [], addGenerationPrompt: false, bosToken: nil, eosToken: nil)
        XCTAssertEqual(year.count, 4)
        XCTAssertGreaterThanOrEqual(Int(year) ?? 0, 2024)
    }

    /// A typical 10-message chat through the Llama-3.1 template (the brief asks for well under 1 ms in release).
    func testRenderSpeed() throws {
        let t = try ChatTemplate(source: try String(contentsOfFile: TestFixtures.path("chat-templates/llama-3.1.jinja"), encoding: .utf8))
        var messages: [JSONValue] = [.object(JSONObject([("role", .string("system")), ("content", .string("You are a helpful assistant."))]))]
        for i in 0..<9 {
            let role = i % 2 == 0 ? "user" : "assistant"
            messages.append(.object(JSONObject([("role", .string(role)),
                                                ("content", .string("Message number \(i) with some ordinary text in it, about forty words long."))])))
        }
        let runs = 200
        let start = Date()
        for _ in 0..<runs {
            _ = try t.render(messages: messages, addGenerationPrompt: true, bosToken: "<|begin_of_text|>", eosToken: "<|eot_id|>")
        }
        let perRender = Date().timeIntervalSince(start) / Double(runs)
        print("ChatTemplate: 10-message Llama-3.1 render: \(String(format: "%.1f", perRender * 1e6)) µs")
        #if DEBUG
        XCTAssertLessThan(perRender, 0.02)
        #else
        XCTAssertLessThan(perRender, 0.001)
        #endif
    }
}
