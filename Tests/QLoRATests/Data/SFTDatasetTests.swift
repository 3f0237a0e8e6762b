import XCTest
@testable import QLoRA

final class SFTDatasetTests: XCTestCase {
    static let tokenizer: Tokenizer = try! Tokenizer(directory: TestFixtures.smolTokenizer)
    static let template: ChatTemplate? = try! ChatTemplate.load(directory: TestFixtures.smolTokenizer)

    func load(_ jsonl: String, _ formatting: SFTFormatting = SFTFormatting()) throws -> SFTDataset {
        try SFTDataset(jsonl: jsonl, source: "data.jsonl", tokenizer: Self.tokenizer, template: Self.template, formatting: formatting)
    }

    func testPromptCompletionMasksThePrompt() throws {
        let data = try load(#"{"prompt": "Capital of France?", "completion": " Paris."}"#)
        let e = data.examples[0]
        let prompt = Self.tokenizer.encode("Capital of France?")
        let completion = Self.tokenizer.encode(" Paris.")
        XCTAssertEqual(e.tokens, prompt + completion + [Self.tokenizer.eosTokenID!])
        XCTAssertEqual(e.labels, prompt.map { _ in -100 } + completion + [Self.tokenizer.eosTokenID!])
        let all = try load(#"{"prompt": "Capital of France?", "completion": " Paris."}"#, SFTFormatting(completionOnly: false))
        XCTAssertEqual(all.examples[0].labels, all.examples[0].tokens)
    }

    func testMessagesCountOnlyAssistantTurns() throws {
        let line = #"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}"#
        let e = try load(line).examples[0]
        let rendered = try Self.template!.render(messages: try JSONValue.parse(line)["messages"]!.array!, addGenerationPrompt: false,
                                                 bosToken: Self.tokenizer.bosToken, eosToken: Self.tokenizer.eosToken)
        XCTAssertEqual(Self.tokenizer.decode(e.tokens), rendered)
        let counted = Self.tokenizer.decode(zip(e.tokens, e.labels).filter { $0.1 != -100 }.map(\.0))
        XCTAssertEqual(counted, "Hello!<|im_end|>\nGoodbye.<|im_end|>\n")
    }

    func testAlpacaTextAndPreTokenized() throws {
        let data = try load("""
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
        {"text": "plain text"}
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
        """)
        XCTAssertEqual(data.examples.count, 3)
        let alpaca = data.examples[0]
        XCTAssertTrue(Self.tokenizer.decode(alpaca.tokens).contains("### Input:\n2 and 3\n\n### Response:\n5"))
        XCTAssertEqual(Self.tokenizer.decode(zip(alpaca.tokens, alpaca.labels).filter { $0.1 != -100 }.map(\.0)), "5<|im_end|>")
        XCTAssertEqual(data.examples[1].labels, data.examples[1].tokens)
        XCTAssertEqual(data.examples[2].tokens, [1, 2, 3])
        XCTAssertEqual(data.examples[2].labels, [-100, 2, 3])
    }

    func testMalformedLinesNameTheFileAndLine() throws {
        let text = """
        {"text": "fine"}

        {"text": "fine too"}
        {"text": broken
        {"prompt": "no completion"}
        {"unknown": 1}
        """
        XCTAssertThrowsError(try load(text)) { error in
            XCTAssertEqual("\(error)".prefix(24), "data.jsonl: line 4: not ")
        }
        let skipped = try load(text, SFTFormatting(skipBadLines: true))
        XCTAssertEqual(skipped.examples.count, 2)
        XCTAssertEqual(skipped.skippedLines.map(\.line), [4, 5, 6])
        XCTAssertTrue(skipped.skippedLines[1].message.contains("missing \"completion\""))
        XCTAssertTrue(skipped.skippedLines[2].message.contains("no known fields"))
    }

    func testLongExamplesAreTruncated() throws {
        let data = try load(#"{"text": "one two three four five six seven eight nine ten"}"#, SFTFormatting(maxSequenceLength: 4))
        XCTAssertEqual(data.examples[0].tokens.count, 4)
    }
}
