import XCTest
@testable import QLoRA

/// The Llama-2/Mistral-style tokenizers of Tests/Fixtures/sentencepiece-bpe (made by
/// scripts/make_sentencepiece_fixture.py with the Python tokenizers package) against its goldens.
final class SentencePieceBPETests: XCTestCase {
    func check(_ variant: String) throws {
        let dir = TestFixtures.path("sentencepiece-bpe/\(variant)")
        let tokenizer = try Tokenizer(directory: dir)
        XCTAssertEqual(tokenizer.bosTokenID, 1)
        XCTAssertEqual(tokenizer.eosTokenID, 2)
        XCTAssertEqual(tokenizer.unkTokenID, 0)
        XCTAssertNil(tokenizer.padTokenID)
        XCTAssertEqual(tokenizer.addBOSToken, true)
        let content = try String(contentsOfFile: dir + "/goldens.jsonl", encoding: .utf8)
        var texts = 0, decodes = 0
        for line in content.split(separator: "\n") {
            let g = try JSONValue.parse(String(line))
            let decoded = try XCTUnwrap(g["decoded"]?.string)
            if let text = g["text"]?.string {
                let ids = try XCTUnwrap(g["ids"]?.array?.compactMap { $0.int })
                let withSpecial = try XCTUnwrap(g["ids_with_special"]?.array?.compactMap { $0.int })
                XCTAssertEqual(tokenizer.encode(text), ids, "\(variant): encode \(text.debugDescription)")
                XCTAssertEqual(tokenizer.encode(text, addSpecialTokens: true), withSpecial, "\(variant): encode+special \(text.debugDescription)")
                XCTAssertEqual(tokenizer.decode(ids), decoded, "\(variant): decode \(ids)")
                XCTAssertEqual(tokenizer.decode(withSpecial, skipSpecialTokens: true), g["decoded_with_special_skipped"]?.string,
                               "\(variant): decode skipping special \(withSpecial)")
                var stream = StreamingDecoder(tokenizer: tokenizer)
                let streamed = ids.map { stream.append($0) }.joined() + stream.finish()
                XCTAssertEqual(streamed, decoded, "\(variant): streamed \(ids)")
                texts += 1
            } else {
                let ids = try XCTUnwrap(g["decode_ids"]?.array?.compactMap { $0.int })
                XCTAssertEqual(tokenizer.decode(ids), decoded, "\(variant): decode \(ids)")
                decodes += 1
            }
        }
        XCTAssertEqual(texts, 18)
        XCTAssertEqual(decodes, 15)
    }

    func testLegacyPrependReplaceNormalizer() throws { try check("legacy") }
    func testMetaspacePreTokenizer() throws { try check("metaspace") }
    func testUnknownCharactersWithoutByteFallback() throws { try check("no-fallback") }
    func testMetaspaceSplitAndMetaspaceDecoder() throws { try check("metaspace-decoder") }

    func testByteFallbackTokensForUnseenCharacters() throws {
        let tokenizer = try Tokenizer(directory: TestFixtures.path("sentencepiece-bpe/legacy"))
        // "☃" (E2 98 83) is not in the vocab: three byte tokens <0xE2> <0x98> <0x83>.
        let ids = tokenizer.encode("☃")
        XCTAssertEqual(ids.suffix(3).map { tokenizer.token(forID: $0) }, ["<0xE2>", "<0x98>", "<0x83>"])
        var stream = StreamingDecoder(tokenizer: tokenizer)
        XCTAssertEqual(ids.map { stream.append($0) }.joined(), "☃")
    }

    func testLongWordUsesHeapMergeWithSameResult() throws {
        // With no pre-tokenizer a whole sentence is one BPE word: compare the heap merge with the simple one.
        let tokenizer = try Tokenizer(directory: TestFixtures.path("sentencepiece-bpe/legacy"))
        let text = String(repeating: "the quick brown fox jumps over the lazy dog and then some ", count: 20)
        let word = Array(("▁" + text.replacingOccurrences(of: " ", with: "▁")).utf8)
        var heap = tokenizer.model.initialSymbols(word)
        var simple = heap
        XCTAssertGreaterThan(heap.count, 64)
        tokenizer.model.mergeWithHeap(&heap)
        tokenizer.model.mergeSmall(&simple)
        XCTAssertEqual(heap, simple)
        XCTAssertLessThan(heap.count, word.count / 2)
    }
}
