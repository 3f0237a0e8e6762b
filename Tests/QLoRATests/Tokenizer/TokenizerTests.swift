import XCTest
@testable import QLoRA

/// One line of a goldens.jsonl file.
struct TokenizerGolden {
    var text: String
    var ids: [Int]
    var decoded: String?

    /// Text lines ("text") and chat lines ("rendered") of a goldens file.
    static func load(_ path: String) throws -> [TokenizerGolden] {
        let content = try String(contentsOfFile: path, encoding: .utf8)
        var out: [TokenizerGolden] = []
        for line in content.split(separator: "\n") where !line.isEmpty {
            let json = try JSONValue.parse(String(line))
            let ids = try XCTUnwrap(json["ids"]?.array?.compactMap { $0.int })
            if let text = json["text"]?.string {
                out.append(TokenizerGolden(text: text, ids: ids, decoded: json["decoded"]?.string))
            } else if let rendered = json["rendered"]?.string {
                out.append(TokenizerGolden(text: rendered, ids: ids, decoded: nil))
            }
        }
        return out
    }
}

final class TokenizerTests: XCTestCase {
    static let smol = Result { try Tokenizer(directory: TestFixtures.smolTokenizer) }

    func smolTokenizer() throws -> Tokenizer { try Self.smol.get() }

    func testSmolGoldenTexts() throws {
        let tokenizer = try smolTokenizer()
        let goldens = try TokenizerGolden.load(TestFixtures.path("smollm2-tokenizer/goldens.jsonl"))
        XCTAssertEqual(goldens.filter { $0.decoded != nil }.count, 16)
        for g in goldens {
            XCTAssertEqual(tokenizer.encode(g.text), g.ids, "encode \(g.text.debugDescription)")
            if let decoded = g.decoded {
                XCTAssertEqual(tokenizer.decode(g.ids), decoded, "decode \(g.ids)")
            }
        }
    }

    func testSmolSpecialTokens() throws {
        let tokenizer = try smolTokenizer()
        XCTAssertEqual(tokenizer.bosToken, "<|im_start|>")
        XCTAssertEqual(tokenizer.eosToken, "<|im_end|>")
        XCTAssertEqual(tokenizer.padToken, "<|im_end|>")
        XCTAssertEqual(tokenizer.unkToken, "<|endoftext|>")
        XCTAssertEqual(tokenizer.bosTokenID, 1)
        XCTAssertEqual(tokenizer.eosTokenID, 2)
        XCTAssertEqual(tokenizer.padTokenID, 2)
        XCTAssertEqual(tokenizer.unkTokenID, 0)
        XCTAssertEqual(tokenizer.vocabularySize, 49152)
        XCTAssertEqual(tokenizer.specialTokenIDs, Set(0...16))
        XCTAssertEqual(tokenizer.id(forToken: "<|im_end|>"), 2)
        XCTAssertEqual(tokenizer.id(forToken: "Ġthe"), tokenizer.encode(" the").first)
        XCTAssertEqual(tokenizer.token(forID: 1), "<|im_start|>")
        XCTAssertEqual(tokenizer.token(forID: 216), "Ġ")
        XCTAssertNil(tokenizer.token(forID: 49152))
        XCTAssertNil(tokenizer.token(forID: -1))
        XCTAssertNil(tokenizer.id(forToken: "no such token here"))
        // The fixture's post-processor adds nothing, and the config has no add_bos_token.
        XCTAssertEqual(tokenizer.encode("Hi", addSpecialTokens: true), tokenizer.encode("Hi"))
        // Skipping special tokens when decoding.
        XCTAssertEqual(tokenizer.decode([1, 4093, 198, 26843, 2, 198], skipSpecialTokens: true), "user\nHi\n")
        // Unknown ids are left out.
        XCTAssertEqual(tokenizer.decode([26843, 1_000_000, -5]), "Hi")
    }

    func testLoadingFromTheFilePath() throws {
        let tokenizer = try Tokenizer(directory: TestFixtures.path("sentencepiece-bpe/legacy/tokenizer.json"))
        XCTAssertEqual(tokenizer.bosTokenID, 1)  // tokenizer_config.json beside it was read
        XCTAssertEqual(tokenizer.config?["tokenizer_class"]?.string, "LlamaTokenizer")
        XCTAssertEqual(tokenizer.encode("the", addSpecialTokens: true).first, 1)
    }

    func testSmolStreamingDecoderMatchesDecode() throws {
        let tokenizer = try smolTokenizer()
        let goldens = try TokenizerGolden.load(TestFixtures.path("smollm2-tokenizer/goldens.jsonl"))
        for g in goldens {
            var stream = StreamingDecoder(tokenizer: tokenizer)
            var pieces: [String] = []
            for id in g.ids { pieces.append(stream.append(id)) }
            pieces.append(stream.finish())
            XCTAssertEqual(pieces.joined(), tokenizer.decode(g.ids), "stream \(g.text.debugDescription)")
            var skipping = StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true)
            let streamed = g.ids.map { skipping.append($0) }.joined() + skipping.finish()
            XCTAssertEqual(streamed, tokenizer.decode(g.ids, skipSpecialTokens: true), "stream skipping special \(g.text.debugDescription)")
            // Never half a character: every piece is valid on its own (no U+FFFD made up by splitting).
            for p in pieces { XCTAssertFalse(p.unicodeScalars.contains("\u{FFFD}"), "piece \(p.debugDescription)") }
        }
    }

    func testStreamingDecoderHoldsBackIncompleteCharacters() throws {
        let tokenizer = try smolTokenizer()
        // "🤗" is 4 bytes; SmolLM2 encodes it as several byte-level tokens.
        let ids = tokenizer.encode("🤗")
        XCTAssertGreaterThan(ids.count, 1)
        var stream = StreamingDecoder(tokenizer: tokenizer)
        for id in ids.dropLast() { XCTAssertEqual(stream.append(id), "") }
        XCTAssertEqual(stream.append(ids.last!), "🤗")
        XCTAssertEqual(stream.finish(), "")
        // An incomplete character at the end comes out as U+FFFD only at finish().
        var cut = StreamingDecoder(tokenizer: tokenizer)
        XCTAssertEqual(cut.append(ids[0]), "")
        XCTAssertEqual(cut.finish(), "\u{FFFD}")
    }

    func testAddedTokenFlags() throws {
        // A hand-made byte-level tokenizer: vocab of the bytes of "ab <x>", merges none.
        func make(_ flags: String) throws -> Tokenizer {
            let json = try JSONValue.parse("""
            {"added_tokens": [{"id": 10, "content": "<x>", "special": true, \(flags)}],
             "normalizer": null,
             "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
             "decoder": {"type": "ByteLevel"},
             "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "Ġ": 2, "<": 3, "x": 4, ">": 5, "Ġa": 6},
                       "merges": [["Ġ", "a"]]}}
            """)
            return try Tokenizer(json: json, config: nil, source: "inline")
        }
        let plain = try make("\"lstrip\": false, \"rstrip\": false, \"single_word\": false")
        XCTAssertEqual(plain.encode("a <x> a"), [0, 2, 10, 6])
        XCTAssertEqual(plain.encode("a<x>b"), [0, 10, 1])
        let lstrip = try make("\"lstrip\": true")
        XCTAssertEqual(lstrip.encode("a  <x> a"), [0, 10, 6])
        let rstrip = try make("\"rstrip\": true")
        XCTAssertEqual(rstrip.encode("a <x>  a"), [0, 2, 10, 0])
        let single = try make("\"single_word\": true")
        XCTAssertEqual(single.encode("a <x> a"), [0, 2, 10, 6])
        XCTAssertEqual(single.encode("a<x>b"), [0, 3, 4, 5, 1])
        XCTAssertEqual(single.decode([0, 10, 6]), "a<x> a")
        XCTAssertEqual(single.decode([0, 10, 6], skipSpecialTokens: true), "a a")
    }

    func testUnknownCharactersFusedOrNotAndByteFallbackOrder() throws {
        // Expected ids from Python tokenizers 0.23.3: byte tokens go in before a pending unk.
        for (fuse, expected1, expected2) in [(false, [0, 0, 1, 2, 0], [2, 0, 0]), (true, [0, 1, 2, 0], [2, 0])] {
            let json = try JSONValue.parse("""
            {"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1, "<0x78>": 2}, "merges": [],
                       "unk_token": "<unk>", "fuse_unk": \(fuse), "byte_fallback": true}}
            """)
            let tokenizer = try Tokenizer(json: json, config: nil, source: "inline")
            XCTAssertEqual(tokenizer.encode("yzaxy"), expected1, "fuse_unk \(fuse)")
            XCTAssertEqual(tokenizer.encode("yxz"), expected2, "fuse_unk \(fuse)")
        }
    }

    func testStringMergesSplitOnTheSpaceByte() throws {
        // "a \u{301}" is "a", " \u{301}" in Characters (a space with a combining mark); tokenizers splits bytes.
        let json = try JSONValue.parse(#"{"model": {"type": "BPE", "vocab": {"a": 0, "\u0301": 1, "a\u0301": 2}, "merges": ["a \u0301"]}}"#)
        let tokenizer = try Tokenizer(json: json, config: nil, source: "inline")
        XCTAssertEqual(tokenizer.encode("a\u{301}a"), [2, 0])
        XCTAssertEqual(tokenizer.decode([2, 0]), "a\u{301} a")  // no decoder: tokens joined by spaces
    }

    func testCanonicallyEquivalentVocabEntriesStayDistinct() throws {
        // "\u00e9" and "e\u0301" are different tokens (Swift's String == would call them equal).
        let json = try JSONValue.parse(#"{"model": {"type": "BPE", "vocab": {"e": 0, "\u0301": 1, "\u00e9": 2, "e\u0301": 3}, "merges": [["e", "\u0301"]]}}"#)
        let tokenizer = try Tokenizer(json: json, config: nil, source: "inline")
        XCTAssertEqual(tokenizer.vocabularySize, 4)
        XCTAssertEqual(tokenizer.encode("\u{e9}"), [2])
        XCTAssertEqual(tokenizer.encode("e\u{301}"), [3])
        XCTAssertEqual(tokenizer.id(forToken: "\u{e9}"), 2)
        XCTAssertEqual(tokenizer.id(forToken: "e\u{301}"), 3)
        XCTAssertEqual(tokenizer.token(forID: 3).map { Array($0.utf8) }, Array("e\u{301}".utf8))
    }

    func testEncodingFromManyThreads() throws {
        let tokenizer = try smolTokenizer()
        let goldens = try TokenizerGolden.load(TestFixtures.path("smollm2-tokenizer/goldens.jsonl"))
        let failures = UnsafeMutablePointer<Int>.allocate(capacity: goldens.count * 8)
        defer { failures.deallocate() }
        DispatchQueue.concurrentPerform(iterations: goldens.count * 8) { i in
            let g = goldens[i % goldens.count]
            failures[i] = tokenizer.encode(g.text) == g.ids ? 0 : 1
        }
        XCTAssertEqual((0..<(goldens.count * 8)).map { failures[$0] }.reduce(0, +), 0)
    }

    func testBadTokenizerFilesGiveFileFormatErrors() throws {
        func error(_ text: String) -> FileFormatError? {
            do {
                _ = try Tokenizer(json: try JSONValue.parse(text), config: nil, source: "bad/tokenizer.json")
                return nil
            } catch let e as FileFormatError {
                return e
            } catch {
                XCTFail("unexpected error \(error)")
                return nil
            }
        }
        let missing = try XCTUnwrap(error(#"{"version": "1.0"}"#))
        XCTAssertEqual(missing.file, "bad/tokenizer.json")
        XCTAssertTrue(missing.message.contains("model"), missing.description)
        let unigram = try XCTUnwrap(error(#"{"model": {"type": "Unigram", "vocab": []}}"#))
        XCTAssertEqual(unigram.place, "model.type")
        XCTAssertTrue(unigram.message.contains("Unigram"), unigram.description)
        let badMerge = try XCTUnwrap(error(#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "z"]]}}"#))
        XCTAssertEqual(badMerge.place, "model.merges[0]")
        let badPre = try XCTUnwrap(error(#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Mystery"}}"#))
        XCTAssertEqual(badPre.place, "pre_tokenizer")
        XCTAssertTrue(badPre.message.contains("Mystery"))
        let badVocab = try XCTUnwrap(error(#"{"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}}"#))
        XCTAssertTrue(badVocab.place.hasPrefix("model.vocab"))
        let hugeID = try XCTUnwrap(error(#"{"model": {"type": "BPE", "vocab": {"a": 4000000000}, "merges": []}}"#))
        XCTAssertTrue(hugeID.place.hasPrefix("model.vocab"))
        let badAdded = try XCTUnwrap(error(#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": [{"content": "x"}]}"#))
        XCTAssertEqual(badAdded.place, "added_tokens[0]")
        let badRegex = try XCTUnwrap(error(#"{"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"}}"#))
        XCTAssertEqual(badRegex.place, "pre_tokenizer.pattern")

        // A folder without tokenizer.json, and a file that is not JSON.
        let dir = try TestFixtures.temporaryDirectory()
        XCTAssertThrowsError(try Tokenizer(directory: dir)) { e in
            XCTAssertTrue("\(e)".contains("tokenizer.json"), "\(e)")
        }
        try "{\"model\": ".write(toFile: dir + "/tokenizer.json", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try Tokenizer(directory: dir)) { e in
            XCTAssertTrue(e is FileFormatError, "\(e)")
        }
    }
}
