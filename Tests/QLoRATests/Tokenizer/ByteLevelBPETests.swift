import XCTest
@testable import QLoRA

/// The byte-level tokenizers of Tests/Fixtures/bytelevel-bpe (made by scripts/make_bytelevel_fixture.py
/// with the Python tokenizers package): pre-tokenizer pieces, ids and decodes against its goldens.
final class ByteLevelBPETests: XCTestCase {
    func check(_ variant: String) throws {
        let dir = TestFixtures.path("bytelevel-bpe/\(variant)")
        let tokenizer = try Tokenizer(directory: dir)
        let pre = try XCTUnwrap(tokenizer.preTokenizer)
        let content = try String(contentsOfFile: dir + "/goldens.jsonl", encoding: .utf8)
        var count = 0, decodes = 0
        for line in content.split(separator: "\n") {
            let g = try JSONValue.parse(String(line))
            if let ids = g["decode_ids"]?.array?.compactMap({ $0.int }) {
                XCTAssertEqual(tokenizer.decode(ids), g["decoded"]?.string, "\(variant): decode \(ids)")
                XCTAssertEqual(tokenizer.decode(ids, skipSpecialTokens: true), g["decoded_skipping_special"]?.string,
                               "\(variant): decode skipping special \(ids)")
                decodes += 1
                continue
            }
            let text = try XCTUnwrap(g["text"]?.string)
            let splits = try XCTUnwrap(g["splits"]?.array?.compactMap { $0.string })
            let ids = try XCTUnwrap(g["ids"]?.array?.compactMap { $0.int })
            let normalized = tokenizer.normalizer?.apply(Array(text.utf8)) ?? Array(text.utf8)
            let pieces = pre.apply([Piece(bytes: normalized, atTextStart: true)]).map { String(decoding: $0.bytes, as: UTF8.self) }
            XCTAssertEqual(pieces.map { Array($0.utf8) }, splits.map { Array($0.utf8) }, "\(variant): pieces of \(text.debugDescription)")
            XCTAssertEqual(tokenizer.encode(text), ids, "\(variant): encode \(text.debugDescription)")
            XCTAssertEqual(tokenizer.decode(ids), g["decoded"]?.string, "\(variant): decode \(ids)")
            count += 1
        }
        XCTAssertEqual(count, 176)
        XCTAssertEqual(decodes, 40)
    }

    func testLlama3SplitRegexWithIgnoreMerges() throws { try check("llama3") }
    func testQwen2SplitRegexWithNFC() throws { try check("qwen2") }
    func testDigitsThenByteLevel() throws { try check("digits") }
    func testGPT2ByteLevelWithPrefixSpace() throws { try check("gpt2") }

    /// The hand-written scanners against Swift Regex running the same pattern text, on random strings.
    /// (Not with "'ſ": Oniguruma's case folding matches it as "'s" — see the llama3 goldens — Swift Regex does not.)
    func testHandWrittenScannersMatchGeneralRegex() throws {
        let pool: [String] = Array("abcXYZ019 ") .map(String.init) + [
            " ", " ", "  ", "\n", "\r", "\r\n", "\t", "\u{a0}", "\u{3000}", "'", "'s", "'S", "'ll", "'RE", "'ve", ".",
            "!", "(", "\"", "é", "ß", "\u{301}", "日", "🤗", "½", "٣", "\u{1c}", "\u{85}", "𝔸", "𝟙",
        ]
        var rng = SeededGenerator(seed: 42)
        for source in [SplitPattern.gpt2Source, SplitPattern.llama3Source, SplitPattern.qwen2Source] {
            let fast = try SplitPattern.regex(source)
            let general = try SplitPattern.regex(source, forceGeneral: true)
            if case .regex = fast { XCTFail("pattern not recognised: \(source)") }
            for _ in 0..<300 {
                let text = (0..<Int.random(in: 1...25, using: &rng)).map { _ in pool.randomElement(using: &rng)! }.joined()
                let bytes = Array(text.utf8)
                XCTAssertEqual(fast.matches(in: bytes), general.matches(in: bytes), "\(source) on \(text.debugDescription)")
            }
        }
    }

    /// A pattern we do not recognise still works, through Swift Regex.
    func testUnknownSplitRegexFallsBackToSwiftRegex() throws {
        let json = try JSONValue.parse(#"""
        {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\d+|[a-z]+"}, "behavior": "Removed", "invert": true},
         "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "1": 2, "2": 3}, "merges": []}}
        """#)
        let tokenizer = try Tokenizer(json: json, config: nil, source: "inline")
        XCTAssertEqual(tokenizer.encode("ab 12-a"), [0, 1, 2, 3, 0])
        let pieces = try XCTUnwrap(tokenizer.preTokenizer).apply([Piece(bytes: Array("ab 12-a".utf8), atTextStart: true)])
        XCTAssertEqual(pieces.map { String(decoding: $0.bytes, as: UTF8.self) }, ["ab", "12", "a"])
    }

    func testSplitBehaviors() {
        // "a--b-" with matches of "-" at 1, 2 and 4.
        let m = [1..<2, 2..<3, 4..<5]
        func run(_ b: SplitBehavior) -> [Range<Int>] { Splitting.pieces(count: 5, matches: m, behavior: b) }
        XCTAssertEqual(run(.removed), [0..<1, 3..<4])
        XCTAssertEqual(run(.isolated), [0..<1, 1..<2, 2..<3, 3..<4, 4..<5])
        XCTAssertEqual(run(.mergedWithPrevious), [0..<2, 2..<3, 3..<5])
        XCTAssertEqual(run(.mergedWithNext), [0..<1, 1..<2, 2..<4, 4..<5])
        XCTAssertEqual(run(.contiguous), [0..<1, 1..<3, 3..<4, 4..<5])
    }
}
