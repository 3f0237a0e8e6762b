import XCTest
@testable import QLoRA

/// Completion-only labels of chat conversations in the Qwen3, Gemma and Phi families.
final class ChatFamilyLabelsTests: XCTestCase {
    /// Qwen3's template drops the reasoning of assistant turns before the last user message when a longer conversation
    /// is rendered. The tokens must be those of the final rendering and the counted ones exactly its assistant replies,
    /// as transformers' `return_assistant_tokens_mask` marks them (Tests/Fixtures/qwen3-chat, made by
    /// scripts/make_qwen3_chat_fixture.py with `{% generation %}` around each reply of the real template).
    func testQwen3LabelsAreThoseOfTheFinalRendering() throws {
        let folder = TestFixtures.path("qwen3-chat")
        let tokenizer = try Tokenizer(directory: folder)
        let template = try XCTUnwrap(try ChatTemplate.load(directory: folder))
        let text = try String(contentsOfFile: folder + "/expected.jsonl", encoding: .utf8)
        var checked = 0, droppedReasoning = 0
        for (n, line) in text.split(separator: "\n").enumerated() {
            let golden = try JSONValue.parse(String(line))
            let messages = try XCTUnwrap(golden["messages"]?.array)
            let ids = try XCTUnwrap(golden["input_ids"]?.array).map { $0.int! }
            let mask = try XCTUnwrap(golden["assistant_mask"]?.array).map { $0.int! }
            let jsonl = JSONValue.object(JSONObject([("messages", .array(messages))])).serialized()
            let data = try SFTDataset(jsonl: jsonl, source: "qwen3.jsonl", tokenizer: tokenizer, template: template, formatting: SFTFormatting())
            let example = data.examples[0]
            XCTAssertEqual(example.tokens, ids, "conversation \(n)")
            XCTAssertEqual(example.labels, zip(ids, mask).map { $1 == 1 ? $0 : -100 }, "conversation \(n)")
            let rendered = try XCTUnwrap(golden["rendered"]?.string)
            // The earlier turns' reasoning is in the data but not in what is trained on.
            for m in messages.dropLast() where m["role"]?.string == "assistant" {
                if let r = m["reasoning_content"]?.string, !rendered.contains(r) { droppedReasoning += 1 }
            }
            checked += 1
        }
        XCTAssertEqual(checked, 4)
        XCTAssertEqual(droppedReasoning, 1)
    }

    /// Gemma 2's template refuses a system message and non-alternating roles with raise_exception: the dataset error
    /// names the file, the line and the template's own message.
    func testGemmaTemplateExceptionsNameTheDatasetLine() throws {
        let tokenizer = try Tokenizer(directory: TestFixtures.smolTokenizer)
        let template = try ChatTemplate(source: try String(contentsOfFile: TestFixtures.path("chat-templates/gemma-2.jinja"), encoding: .utf8))
        let jsonl = """
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        """
        XCTAssertThrowsError(try SFTDataset(jsonl: jsonl, source: "gemma.jsonl", tokenizer: tokenizer, template: template, formatting: SFTFormatting())) { error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix("gemma.jsonl: line 2: "), text)
            XCTAssertTrue(text.contains("System role not supported"), text)
        }
        let alternation = #"{"messages": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}, {"role": "assistant", "content": "ok"}]}"#
        XCTAssertThrowsError(try SFTDataset(jsonl: alternation, source: "gemma.jsonl", tokenizer: tokenizer, template: template, formatting: SFTFormatting())) { error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix("gemma.jsonl: line 1: "), text)
            XCTAssertTrue(text.contains("Conversation roles must alternate user/assistant/user/assistant/..."), text)
        }
        // Gemma 3 folds the system message into the first user turn instead; the reply alone is counted.
        let gemma3 = try ChatTemplate(source: try String(contentsOfFile: TestFixtures.path("chat-templates/gemma-3.jinja"), encoding: .utf8))
        let line = #"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#
        let e = try SFTDataset(jsonl: line, source: "gemma3.jsonl", tokenizer: tokenizer, template: gemma3, formatting: SFTFormatting()).examples[0]
        XCTAssertTrue(tokenizer.decode(e.tokens).hasSuffix("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"))
        XCTAssertEqual(tokenizer.decode(zip(e.tokens, e.labels).filter { $0.1 != -100 }.map(\.0)), "Hello<end_of_turn>\n")
    }
}
