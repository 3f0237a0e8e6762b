import XCTest
@testable import QLoRA

/// Tokenizers laid out as Qwen3's, Gemma's, Phi-3's and Phi-4-mini's tokenizer.json files are (built by transformers'
/// own tokenizer classes for those families; Tests/Fixtures/family-tokenizers, scripts/make_family_tokenizer_fixtures.py)
/// against the `tokenizers` library: ids with and without special tokens, decodes, each family's chat renderings.
final class FamilyTokenizerTests: XCTestCase {
    func check(_ family: String, bos: String?, expectBOSAdded: Bool, ggufModel: String, ggufPre: String) throws {
        let dir = TestFixtures.path("family-tokenizers/\(family)")
        let tokenizer = try Tokenizer(directory: dir)
        XCTAssertEqual(tokenizer.bosTokenID, bos.flatMap { tokenizer.id(forToken: $0) }, family)
        XCTAssertEqual(bos == nil, tokenizer.bosTokenID == nil, family)
        // What the GGUF export writes for this tokenizer: llama.cpp's tokenizer model and pre-tokenizer names.
        let gguf = try GGUFTokenizerMetadata(directory: dir, vocabularySize: tokenizer.vocabularySize, log: { _ in })
        XCTAssertEqual(gguf.model, ggufModel, family)
        XCTAssertEqual(gguf.entries.first { $0.key == "tokenizer.ggml.pre" }?.value.string, ggufPre, family)
        let content = try String(contentsOfFile: dir + "/goldens.jsonl", encoding: .utf8)
        var texts = 0, decodes = 0, bosAdded = 0
        for line in content.split(separator: "\n") {
            let g = try JSONValue.parse(String(line))
            let decoded = try XCTUnwrap(g["decoded"]?.string)
            if let text = g["text"]?.string {
                let ids = try XCTUnwrap(g["ids"]?.array?.compactMap { $0.int })
                let withSpecial = try XCTUnwrap(g["ids_with_special"]?.array?.compactMap { $0.int })
                XCTAssertEqual(tokenizer.encode(text), ids, "\(family): encode \(text.debugDescription)")
                XCTAssertEqual(tokenizer.encode(text, addSpecialTokens: true), withSpecial, "\(family): encode+special \(text.debugDescription)")
                XCTAssertEqual(tokenizer.decode(ids), decoded, "\(family): decode \(ids)")
                XCTAssertEqual(tokenizer.decode(withSpecial, skipSpecialTokens: true), g["decoded_with_special_skipped"]?.string,
                               "\(family): decode skipping special \(withSpecial)")
                if withSpecial.count == ids.count + 1 { bosAdded += 1 }
                texts += 1
            } else {
                let ids = try XCTUnwrap(g["decode_ids"]?.array?.compactMap { $0.int })
                XCTAssertEqual(tokenizer.decode(ids), decoded, "\(family): decode \(ids)")
                decodes += 1
            }
        }
        XCTAssertEqual(texts, 21, family)
        XCTAssertEqual(decodes, 20, family)
        XCTAssertEqual(bosAdded, expectBOSAdded ? texts : 0, family)
    }

    /// SentencePiece-style BPE with byte fallback, spaces as ▁ by a Replace normalizer (no prefix space), a Split
    /// pre-tokenizer that never splits, <bos> added, <start_of_turn>/<end_of_turn> special.
    func testGemma() throws { try check("gemma", bos: "<bos>", expectBOSAdded: true, ggufModel: "llama", ggufPre: "default") }
    /// Byte-level BPE with the Qwen 2 split and NFC; <|im_start|>/<|im_end|> special, <think> </think> not.
    func testQwen3() throws { try check("qwen3", bos: nil, expectBOSAdded: false, ggufModel: "gpt2", ggufPre: "qwen2") }
    /// Llama's Metaspace layout with Phi-3's chat tokens, which strip the whitespace after them (rstrip).
    func testPhi3() throws { try check("phi3", bos: "<s>", expectBOSAdded: false, ggufModel: "llama", ggufPre: "default") }
    /// Byte-level BPE with the GPT-4o (o200k) split: case-aware letter runs, contractions attached, digits by three.
    func testPhi4Mini() throws { try check("phi4-mini", bos: "<|endoftext|>", expectBOSAdded: false, ggufModel: "gpt2", ggufPre: "gpt-4o") }
}
