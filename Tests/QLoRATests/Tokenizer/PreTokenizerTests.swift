import XCTest
@testable import QLoRA

/// The simpler pre-tokenizers against pieces from Python tokenizers 0.23.3 (`pre_tokenize_str`).
final class PreTokenizerTests: XCTestCase {
    static let texts = ["Hello, world! It's 3.14 — “ok”…", "a_b c-d\te\u{e9}\u{301} 日本 x+y=z", "  lead  trail  "]

    func pieces(_ json: String, _ text: String) throws -> [String] {
        let pre = try PreTokenizer(json: try JSONValue.parse(json), file: "inline", place: "pre_tokenizer")
        return pre.apply([Piece(bytes: Array(text.utf8), atTextStart: true)]).map { String(decoding: $0.bytes, as: UTF8.self) }
    }

    func assertPieces(_ json: String, _ expected: [[String]], file: StaticString = #filePath, line: UInt = #line) throws {
        for (text, want) in zip(Self.texts, expected) {
            let got = try pieces(json, text)
            // Compare bytes: Swift String equality would hide a difference in canonical equivalents.
            XCTAssertEqual(got.map { Array($0.utf8) }, want.map { Array($0.utf8) }, "\(json) on \(text.debugDescription): \(got)", file: file, line: line)
        }
    }

    func testWhitespace() throws {
        try assertPieces(#"{"type": "Whitespace"}"#, [
            ["Hello", ",", "world", "!", "It", "'", "s", "3", ".", "14", "—", "“", "ok", "”…"],
            ["a_b", "c", "-", "d", "e\u{e9}\u{301}", "日本", "x", "+", "y", "=", "z"],
            ["lead", "trail"],
        ])
    }

    func testWhitespaceSplit() throws {
        try assertPieces(#"{"type": "WhitespaceSplit"}"#, [
            ["Hello,", "world!", "It's", "3.14", "—", "“ok”…"],
            ["a_b", "c-d", "e\u{e9}\u{301}", "日本", "x+y=z"],
            ["lead", "trail"],
        ])
    }

    func testPunctuation() throws {
        try assertPieces(#"{"type": "Punctuation"}"#, [
            ["Hello", ",", " world", "!", " It", "'", "s 3", ".", "14 ", "—", " ", "“", "ok", "”", "…"],
            ["a", "_", "b c", "-", "d\te\u{e9}\u{301} 日本 x", "+", "y", "=", "z"],
            ["  lead  trail  "],
        ])
        try assertPieces(#"{"type": "Punctuation", "behavior": "Contiguous"}"#, [
            ["Hello", ",", " world", "!", " It", "'", "s 3", ".", "14 ", "—", " ", "“", "ok", "”…"],
            ["a", "_", "b c", "-", "d\te\u{e9}\u{301} 日本 x", "+", "y", "=", "z"],
            ["  lead  trail  "],
        ])
    }

    func testDigitsGrouped() throws {
        XCTAssertEqual(try pieces(#"{"type": "Digits", "individual_digits": false}"#, "ab123c4٣"), ["ab", "123", "c", "4٣"])
        XCTAssertEqual(try pieces(#"{"type": "Digits", "individual_digits": true}"#, "ab123c"), ["ab", "1", "2", "3", "c"])
    }
}
